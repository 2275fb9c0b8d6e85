//! The store conformance suite: what every `JobStore` must do, whatever the database. Every
//! check runs against SQLite and, when `OFFLOAD_TEST_DATABASE_URL` is set, PostgreSQL; each
//! trait method is exercised by at least one check.

use std::sync::Arc;
use std::time::Duration;

use offload::blob::BlobMeta;
use offload::clock::Micros;
use offload::config::Durability;
use offload::job::CallbackStatus;
use offload::job::{
    next_state, AttemptEnd, ErrorKind, ExecutorKind, Job, JobId, JobStatus, Kind, NewJob, Next,
};
use offload::store::{
    BlobDeleteOutcome, CallbackOutcome, CancelOutcome, DeleteOutcome, Inserted, JobStore, Lease,
    ListFilter, Notice, PostgresStore, Settle, SqliteStore, StoreError,
};
use serde_json::json;

pub(crate) fn new_job(task: &str, key: Option<&str>, hash: Option<&str>) -> NewJob {
    let now = Micros::now();
    NewJob {
        id: JobId::new(),
        task: task.into(),
        kind: Kind::Io,
        executor: ExecutorKind::Async,
        args: json!({"x": 1}),
        priority: 0,
        max_attempts: 2,
        timeout_ms: None,
        created_at: now,
        scheduled_at: now,
        idempotency_key: key.map(String::from),
        spec_hash: hash.map(String::from),
        blobs: Vec::new(),
        depends_on: Vec::new(),
        run_on_parent_failure: false,
        callback_url: None,
    }
}

/// A job that calls back when it is final.
fn calling_back(task: &str) -> NewJob {
    NewJob {
        callback_url: Some(format!("http://receiver.example/{task}")),
        ..new_job(task, None, None)
    }
}

pub(crate) fn lease(owner: &str) -> Lease {
    Lease {
        owner: owner.into(),
        until: Micros::now().plus(Duration::from_secs(30)),
    }
}

pub(crate) async fn claim_all(store: &Arc<dyn JobStore>, limit: u32) -> Vec<Job> {
    store
        .claim(ExecutorKind::Async, limit, Micros::now(), &lease("me"))
        .await
        .unwrap()
        .jobs
}

/// Writes what `next_state` decides for `end`.
pub(crate) async fn settle(store: &Arc<dyn JobStore>, job: &Job, end: AttemptEnd) -> Option<Job> {
    let now = Micros::now();
    let next = next_state(job, end, Duration::ZERO, now).expect("a move");
    store
        .settle(vec![Settle {
            job: job.clone(),
            next,
            progress: 0.5,
            now,
            expired_before: None,
        }])
        .await
        .unwrap()
        .pop()
        .unwrap()
}

pub(crate) async fn sqlite() -> (tempfile::TempDir, Arc<dyn JobStore>) {
    let dir = tempfile::tempdir().unwrap();
    let url = offload::config::sqlite_url(dir.path());
    let store = SqliteStore::open(&url, Durability::Full).await.unwrap();
    (dir, Arc::new(store))
}

/// A PostgreSQL store in a schema of its own (it creates it), dropped by `drop_pg_schema`;
/// `None` (the test is skipped) when `OFFLOAD_TEST_DATABASE_URL` is not set.
pub(crate) async fn postgres() -> Option<(String, Arc<dyn JobStore>)> {
    let url = crate::helpers::pg_url()?;
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let store = PostgresStore::open(&url, Some(&schema))
        .await
        .expect("PostgreSQL at OFFLOAD_TEST_DATABASE_URL");
    Some((schema, Arc::new(store)))
}

/// Runs one conformance check against every backend: SQLite and PostgreSQL.
macro_rules! conformance {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let (_dir, store) = super::sqlite().await;
                super::$name(store).await;
            }

            #[tokio::test]
            async fn postgres() {
                let Some((schema, store)) = super::postgres().await else {
                    return;
                };
                super::$name(store).await;
                crate::helpers::drop_pg_schema(&schema).await;
            }
        }
    };
}
pub(crate) use conformance;

conformance!(insert_then_get_list_and_count);
async fn insert_then_get_list_and_count(store: Arc<dyn JobStore>) {
    store.ping().await.unwrap();
    let a = new_job("a", None, None);
    let b = new_job("b", None, None);
    let out = store.insert(vec![a.clone(), b.clone()]).await.unwrap();
    assert!(matches!(out[0], Inserted::Created(_)));
    let got = store.get(a.id).await.unwrap().unwrap();
    assert_eq!(got.status, JobStatus::Queued);
    assert_eq!(got.args, json!({"x": 1}));
    assert_eq!(got.attempt, 0);
    let listed = store
        .list(&ListFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<JobId> = listed.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![b.id, a.id], "newest first");
    let only_b = store
        .list(&ListFilter {
            task: Some("b".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only_b.len(), 1);
    let lane = |executor| ListFilter {
        executor: Some(executor),
        limit: 10,
        ..Default::default()
    };
    assert_eq!(
        store.list(&lane(ExecutorKind::Async)).await.unwrap().len(),
        2
    );
    assert!(store
        .list(&lane(ExecutorKind::Rayon))
        .await
        .unwrap()
        .is_empty());
    assert!(store.get(JobId::new()).await.unwrap().is_none());
    assert_eq!(
        store.queued_counts().await.unwrap(),
        vec![(ExecutorKind::Async, 2)]
    );
}

conformance!(an_idempotency_conflict_stores_nothing_of_the_batch);
async fn an_idempotency_conflict_stores_nothing_of_the_batch(store: Arc<dyn JobStore>) {
    store
        .insert(vec![new_job("a", Some("k"), Some("h1"))])
        .await
        .unwrap();
    let replay = store
        .insert(vec![new_job("a", Some("k"), Some("h1"))])
        .await
        .unwrap();
    assert!(matches!(replay[0], Inserted::Existing(_)));
    let free = new_job("b", None, None);
    let err = store
        .insert(vec![free.clone(), new_job("a", Some("k"), Some("h2"))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::IdempotencyConflict { index: 1, .. }),
        "{err}"
    );
    assert!(
        store.get(free.id).await.unwrap().is_none(),
        "all or nothing"
    );
}

conformance!(a_claim_takes_due_jobs_by_priority_then_schedule_up_to_its_limit);
async fn a_claim_takes_due_jobs_by_priority_then_schedule_up_to_its_limit(
    store: Arc<dyn JobStore>,
) {
    let now = Micros::now();
    let mut low = new_job("low", None, None);
    low.scheduled_at = now.minus(Duration::from_millis(20));
    let mut high = new_job("high", None, None);
    high.priority = 5;
    let mut early = new_job("early", None, None);
    early.scheduled_at = now.minus(Duration::from_millis(50));
    let mut later = new_job("later", None, None);
    later.priority = 9;
    later.scheduled_at = now.plus(Duration::from_secs(60));
    let mut other_lane = new_job("rayon", None, None);
    other_lane.executor = ExecutorKind::Rayon;
    store
        .insert(vec![
            low.clone(),
            high.clone(),
            early.clone(),
            later.clone(),
            other_lane,
        ])
        .await
        .unwrap();
    let first = store
        .claim(ExecutorKind::Async, 2, Micros::now(), &lease("me"))
        .await
        .unwrap();
    let names: Vec<&str> = first.jobs.iter().map(|j| j.task.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["early", "high"],
        "priority first, then the earliest"
    );
    assert!(first
        .jobs
        .iter()
        .all(|j| j.status == JobStatus::Running && j.attempt == 1));
    let rest = store
        .claim(ExecutorKind::Async, 10, Micros::now(), &lease("me"))
        .await
        .unwrap();
    assert_eq!(rest.jobs.len(), 1);
    assert_eq!(rest.jobs[0].task, "low");
    assert_eq!(
        rest.next_due,
        Some(later.scheduled_at),
        "a short claim says when the lane's next job is due"
    );
    let none = store
        .claim(ExecutorKind::Async, 10, Micros::now(), &lease("me"))
        .await
        .unwrap();
    assert!(none.jobs.is_empty(), "claimed once");
    // Due later: claimed once its time has come.
    let at_its_time = store
        .claim(ExecutorKind::Async, 10, later.scheduled_at, &lease("me"))
        .await
        .unwrap();
    assert_eq!(at_its_time.jobs.len(), 1);
    assert_eq!(at_its_time.next_due, None);
}

conformance!(a_late_finisher_cannot_overwrite_a_newer_attempt_or_a_cancel);
async fn a_late_finisher_cannot_overwrite_a_newer_attempt_or_a_cancel(store: Arc<dyn JobStore>) {
    let job = new_job("a", None, None);
    store.insert(vec![job.clone()]).await.unwrap();
    let first = claim_all(&store, 10).await.remove(0);
    assert_eq!((first.attempt, first.status), (1, JobStatus::Running));
    // Attempt 1 fails and is retried at once; attempt 2 starts.
    let retried = settle(&store, &first, AttemptEnd::Transient("x".into()))
        .await
        .unwrap();
    assert_eq!(retried.status, JobStatus::Queued);
    assert_eq!(retried.error.as_ref().unwrap().kind, ErrorKind::TaskError);
    let second = claim_all(&store, 10).await.remove(0);
    assert_eq!(second.attempt, 2);
    // Attempt 1 comes back late: nothing changes.
    assert!(
        settle(&store, &first, AttemptEnd::Succeeded(json!({"late": true})))
            .await
            .is_none()
    );
    // A cancel wins over the running attempt 2, and says it was running.
    match store.cancel(job.id, Micros::now()).await.unwrap() {
        CancelOutcome::Cancelled { job, was } => {
            assert_eq!(
                (job.status, was),
                (JobStatus::Cancelled, JobStatus::Running)
            );
            assert_eq!(job.error.unwrap().kind, ErrorKind::Cancelled);
        }
        other => panic!("{other:?}"),
    }
    assert!(settle(&store, &second, AttemptEnd::Succeeded(json!({})))
        .await
        .is_none());
    assert_eq!(
        store.get(job.id).await.unwrap().unwrap().status,
        JobStatus::Cancelled
    );
    assert!(matches!(
        store.cancel(job.id, Micros::now()).await.unwrap(),
        CancelOutcome::AlreadyFinal(_)
    ));
    assert!(matches!(
        store.cancel(JobId::new(), Micros::now()).await.unwrap(),
        CancelOutcome::NotFound
    ));
    // A queued job's cancel says so.
    let queued = new_job("q", None, None);
    store.insert(vec![queued.clone()]).await.unwrap();
    assert!(matches!(
        store.cancel(queued.id, Micros::now()).await.unwrap(),
        CancelOutcome::Cancelled {
            was: JobStatus::Queued,
            ..
        }
    ));
}

conformance!(settle_writes_what_next_state_decides);
async fn settle_writes_what_next_state_decides(store: Arc<dyn JobStore>) {
    let job = new_job("a", None, None);
    store.insert(vec![job.clone()]).await.unwrap();
    let first = claim_all(&store, 1).await.remove(0);
    let retried = settle(&store, &first, AttemptEnd::TimedOut).await.unwrap();
    assert_eq!(retried.error.as_ref().unwrap().kind, ErrorKind::Timeout);
    let second = claim_all(&store, 1).await.remove(0);
    // The last attempt: a transient error fails the job, keeping its progress.
    let failed = settle(&store, &second, AttemptEnd::Transient("x".into()))
        .await
        .unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.progress, 0.5);
    // What settle answers is what a read finds.
    let read = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(read.status, failed.status);
    assert_eq!(read.finished_at, failed.finished_at);
    assert_eq!(read.progress, failed.progress);
    assert_eq!(read.error, failed.error);
    assert_eq!(read.attempt, 2);

    // A drain hands an attempt back without using it up.
    let other = new_job("b", None, None);
    store.insert(vec![other.clone()]).await.unwrap();
    let running = claim_all(&store, 1).await.remove(0);
    let released = settle(&store, &running, AttemptEnd::Drained).await.unwrap();
    assert_eq!((released.status, released.attempt), (JobStatus::Queued, 0));
    let again = claim_all(&store, 1).await.remove(0);
    assert_eq!(again.attempt, 1);
    let done = settle(&store, &again, AttemptEnd::Succeeded(json!({"n": 7})))
        .await
        .unwrap();
    assert_eq!(done.result, Some(json!({"n": 7})));
    assert_eq!(
        store.get(other.id).await.unwrap().unwrap().result,
        Some(json!({"n": 7}))
    );

    // A move the state machine forbids is refused before anything is written.
    let queued = store.get(other.id).await.unwrap().unwrap();
    let mut not_running = queued.clone();
    not_running.status = JobStatus::Succeeded;
    let err = store
        .settle(vec![Settle {
            job: not_running,
            next: Next::Succeeded(json!({})),
            progress: 1.0,
            now: Micros::now(),
            expired_before: None,
        }])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Transition { .. }), "{err}");
}

conformance!(leases_are_renewed_and_expired_ones_rescued);
async fn leases_are_renewed_and_expired_ones_rescued(store: Arc<dyn JobStore>) {
    let mut once = new_job("once", None, None);
    once.max_attempts = 1;
    let twice = new_job("twice", None, None);
    let cancelled = new_job("cancelled", None, None);
    store
        .insert(vec![once.clone(), twice.clone(), cancelled.clone()])
        .await
        .unwrap();
    let now = Micros::now();
    let short = Lease {
        owner: "dead".into(),
        until: now.plus(Duration::from_millis(1)),
    };
    let claimed = store
        .claim(ExecutorKind::Async, 10, now, &short)
        .await
        .unwrap()
        .jobs;
    assert_eq!(claimed.len(), 3);
    store.cancel(cancelled.id, Micros::now()).await.unwrap();
    // The owner renews: the cancelled job is no longer its own; an unknown attempt neither.
    let mine: Vec<(JobId, u32)> = claimed.iter().map(|j| (j.id, j.attempt)).collect();
    let gone = store
        .renew("dead", &mine, now.plus(Duration::from_millis(2)))
        .await
        .unwrap();
    assert_eq!(gone, vec![(cancelled.id, 1)]);
    assert!(
        store.expired(now, 10).await.unwrap().is_empty(),
        "leases renewed to later than `now`"
    );
    // The owner stops renewing; later, its jobs are expired and rescued.
    let later = now.plus(Duration::from_secs(1));
    let expired = store.expired(later, 10).await.unwrap();
    assert_eq!(expired.len(), 2);
    // A rescue moves a job only if its lease still ended before the rescuer's look: here the
    // owner renews `twice` in between, and the first rescue of it is refused.
    let rescue = |job: &Job, before: Micros| Settle {
        job: job.clone(),
        next: next_state(job, AttemptEnd::Lost, Duration::ZERO, Micros::now()).unwrap(),
        progress: 0.0,
        now: Micros::now(),
        expired_before: Some(before),
    };
    let twice_running = expired.iter().find(|j| j.id == twice.id).unwrap();
    store
        .renew(
            "dead",
            &[(twice.id, 1)],
            later.plus(Duration::from_secs(10)),
        )
        .await
        .unwrap();
    let refused = store
        .settle(vec![rescue(twice_running, later)])
        .await
        .unwrap();
    assert!(refused[0].is_none(), "renewed since: not rescued");
    let much_later = later.plus(Duration::from_secs(20));
    for job in &expired {
        let moved = store.settle(vec![rescue(job, much_later)]).await.unwrap();
        assert!(moved[0].is_some(), "{job:?}");
    }
    let lost = store.get(once.id).await.unwrap().unwrap();
    assert_eq!(lost.status, JobStatus::Failed);
    assert_eq!(lost.error.unwrap().kind, ErrorKind::Lost);
    let requeued = store.get(twice.id).await.unwrap().unwrap();
    assert_eq!(requeued.status, JobStatus::Queued);
    assert_eq!(requeued.error.unwrap().kind, ErrorKind::Crashed);
    assert!(store.expired(later, 10).await.unwrap().is_empty());
    assert_eq!(claim_all(&store, 10).await[0].attempt, 2);
}

conformance!(delete_and_prune_remove_only_finished_jobs);
async fn delete_and_prune_remove_only_finished_jobs(store: Arc<dyn JobStore>) {
    let done = new_job("a", None, None);
    store.insert(vec![done.clone()]).await.unwrap();
    let running = claim_all(&store, 1).await.remove(0);
    let open = new_job("b", None, None);
    store.insert(vec![open.clone()]).await.unwrap();
    let now = Micros::now();
    let finished = settle(&store, &running, AttemptEnd::Succeeded(json!({})))
        .await
        .unwrap();
    assert!(matches!(
        store.delete(open.id).await.unwrap(),
        DeleteOutcome::Unfinished(_)
    ));
    assert_eq!(
        store
            .prune(now.minus(Duration::from_secs(1)), 10)
            .await
            .unwrap(),
        0,
        "finished after that"
    );
    let later = finished.finished_at.unwrap().plus(Duration::from_secs(1));
    assert_eq!(store.prune(later, 10).await.unwrap(), 1);
    assert!(matches!(
        store.delete(done.id).await.unwrap(),
        DeleteOutcome::NotFound
    ));
    assert!(store.get(open.id).await.unwrap().is_some());
    store.cancel(open.id, Micros::now()).await.unwrap();
    assert!(matches!(
        store.delete(open.id).await.unwrap(),
        DeleteOutcome::Deleted
    ));
}

fn blob(keep: bool) -> BlobMeta {
    BlobMeta {
        id: JobId::new().to_string(),
        size: 24,
        sha256: "ab".repeat(32),
        keep,
        origin: None,
        created_at: Micros::now(),
    }
}

conformance!(blobs_are_guarded_by_the_unfinished_jobs_that_name_them);
async fn blobs_are_guarded_by_the_unfinished_jobs_that_name_them(store: Arc<dyn JobStore>) {
    let meta = blob(false);
    let id = meta.id.clone();
    store.insert_blob(meta).await.unwrap();
    assert_eq!(store.get_blob(&id).await.unwrap().unwrap().size, 24);
    assert!(store.get_blob("not-a-blob").await.unwrap().is_none());
    // The task's blob argument has another name than `blob`: what guards it is the list the
    // job names, not a key in its args.
    let mut user = new_job("my_task", None, None);
    user.args = json!({ "matrix": id });
    user.blobs = vec![id.clone()];
    store.insert(vec![user.clone()]).await.unwrap();
    assert_eq!(
        store.delete_blob(&id).await.unwrap(),
        BlobDeleteOutcome::InUse(1)
    );
    store.cancel(user.id, Micros::now()).await.unwrap();
    assert_eq!(
        store.delete_blob(&id).await.unwrap(),
        BlobDeleteOutcome::Deleted
    );
    assert_eq!(
        store.delete_blob(&id).await.unwrap(),
        BlobDeleteOutcome::NotFound
    );
}

conformance!(a_used_blob_goes_with_its_last_job_unless_kept);
async fn a_used_blob_goes_with_its_last_job_unless_kept(store: Arc<dyn JobStore>) {
    let (used, kept, unused) = (blob(false), blob(true), blob(false));
    for b in [&used, &kept, &unused] {
        store.insert_blob(b.clone()).await.unwrap();
    }
    let mut jobs = Vec::new();
    for b in [&used, &kept] {
        let mut j = new_job("array_stats", None, None);
        j.args = json!({ "data": b.id });
        j.blobs = vec![b.id.clone()];
        jobs.push(j);
    }
    store.insert(jobs.clone()).await.unwrap();
    assert!(
        store.prune_blobs(10).await.unwrap().is_empty(),
        "their jobs still exist"
    );
    let now = Micros::now();
    for j in &jobs {
        store.cancel(j.id, now).await.unwrap();
    }
    store
        .prune(now.plus(Duration::from_secs(1)), 10)
        .await
        .unwrap();
    assert_eq!(store.prune_blobs(10).await.unwrap(), vec![used.id.clone()]);
    assert!(store.get_blob(&used.id).await.unwrap().is_none());
    assert!(store.get_blob(&kept.id).await.unwrap().unwrap().keep);
    assert!(
        store.get_blob(&unused.id).await.unwrap().is_some(),
        "never used: stays"
    );
}

conformance!(the_store_announces_new_jobs_and_cancels_of_running_ones);
async fn the_store_announces_new_jobs_and_cancels_of_running_ones(store: Arc<dyn JobStore>) {
    let mut notices = store.listen().await.unwrap();
    let job = new_job("a", None, None);
    store.insert(vec![job.clone()]).await.unwrap();
    let mut heard = Vec::new();
    let wait_for = |heard: &Vec<Notice>, n: &Notice| heard.contains(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !wait_for(&heard, &Notice::New(ExecutorKind::Async)) {
        let n = tokio::time::timeout_at(deadline, notices.recv())
            .await
            .expect("a notice of the new job")
            .unwrap();
        heard.push(n);
    }
    claim_all(&store, 1).await;
    store.cancel(job.id, Micros::now()).await.unwrap();
    // A submit with an idempotency key (a path of its own on PostgreSQL) announces too.
    heard.clear();
    let keyed = NewJob {
        executor: ExecutorKind::Blocking,
        ..new_job("k", Some("announce-k"), Some("h"))
    };
    store.insert(vec![keyed]).await.unwrap();
    while !wait_for(&heard, &Notice::New(ExecutorKind::Blocking)) {
        let n = tokio::time::timeout_at(deadline, notices.recv())
            .await
            .expect("a notice of the keyed job")
            .unwrap();
        heard.push(n);
    }
    while !wait_for(&heard, &Notice::Cancel(job.id)) {
        let n = tokio::time::timeout_at(deadline, notices.recv())
            .await
            .expect("a notice of the cancel")
            .unwrap();
        heard.push(n);
    }
}

conformance!(concurrent_writes_each_get_their_own_answer);
/// Many callers at once (which a store may merge into one transaction): every submit is
/// stored and answered, every settle hears which of its own moves applied, and two settles of
/// one job never both apply.
async fn concurrent_writes_each_get_their_own_answer(store: Arc<dyn JobStore>) {
    let submits = (0..50).map(|i| {
        let store = store.clone();
        async move {
            let jobs = vec![new_job(&format!("t{i}"), None, None); 1 + i % 3]
                .into_iter()
                .map(|mut j| {
                    j.id = JobId::new();
                    j
                })
                .collect::<Vec<_>>();
            let out = store.insert(jobs.clone()).await.unwrap();
            assert_eq!(out.len(), jobs.len());
            for (o, j) in out.iter().zip(&jobs) {
                assert!(matches!(o, Inserted::Created(c) if c.id == j.id));
            }
            jobs.len()
        }
    });
    let stored: usize = futures_util::future::join_all(submits)
        .await
        .into_iter()
        .sum();
    let running = claim_all(&store, 1000).await;
    assert_eq!(running.len(), stored, "every submit was stored");
    // Each job settled by two callers at once: one succeeds it, one fails it for good.
    let now = Micros::now();
    let settles = running.iter().flat_map(|job| {
        [
            AttemptEnd::Succeeded(json!({"by": "one"})),
            AttemptEnd::Permanent("two".into()),
        ]
        .into_iter()
        .map(|end| {
            let (store, job) = (store.clone(), job.clone());
            async move {
                let next = next_state(&job, end, Duration::ZERO, now).expect("a move");
                let moved = store
                    .settle(vec![Settle {
                        job: job.clone(),
                        next,
                        progress: 0.0,
                        now,
                        expired_before: None,
                    }])
                    .await
                    .unwrap();
                (job.id, moved.into_iter().next().unwrap())
            }
        })
    });
    let answers = futures_util::future::join_all(settles).await;
    for job in &running {
        let applied: Vec<&Job> = answers
            .iter()
            .filter(|(id, _)| *id == job.id)
            .filter_map(|(_, moved)| moved.as_ref())
            .collect();
        assert_eq!(applied.len(), 1, "exactly one of two settles applies");
        let stored = store.get(job.id).await.unwrap().unwrap();
        assert_eq!(
            stored.status, applied[0].status,
            "the answer is what was stored"
        );
    }
}

conformance!(a_write_that_fails_to_commit_stores_nothing_and_says_unavailable);
/// A store may commit many callers' writes together; when that fails, it fails for all of
/// them alike: each caller hears `Unavailable` and nothing of its write was stored (the API
/// answers 503 and the client submits again), or it hears success and its job is stored.
async fn a_write_that_fails_to_commit_stores_nothing_and_says_unavailable(
    store: Arc<dyn JobStore>,
) {
    // The schema's CHECK refuses it: the way to make a commit fail from a test.
    let mut bad = new_job("bad", None, None);
    bad.max_attempts = 0;
    let jobs = std::iter::once(bad.clone()).chain((0..20).map(|_| new_job("good", None, None)));
    let calls = jobs.map(|job| {
        let store = store.clone();
        async move { (job.id, store.insert(vec![job]).await) }
    });
    for (id, answer) in futures_util::future::join_all(calls).await {
        let stored = store.get(id).await.unwrap();
        match answer {
            Ok(_) => assert!(id != bad.id && stored.is_some(), "answered, so stored"),
            Err(StoreError::Unavailable(_)) => assert!(stored.is_none(), "refused, so not stored"),
            Err(e) => panic!("{e}"),
        }
    }
}

conformance!(claims_and_lease_renewals_announce_nothing);
/// Regression: PostgreSQL's per-row trigger announced every claim and every lease renewal,
/// a notification per running job per renewal round.
async fn claims_and_lease_renewals_announce_nothing(store: Arc<dyn JobStore>) {
    let mut notices = store.listen().await.unwrap();
    let job = new_job("a", None, None);
    store.insert(vec![job.clone()]).await.unwrap();
    async fn next(notices: &mut tokio::sync::mpsc::UnboundedReceiver<Notice>) -> Notice {
        tokio::time::timeout(Duration::from_secs(5), notices.recv())
            .await
            .expect("a notice")
            .unwrap()
    }
    assert_eq!(next(&mut notices).await, Notice::New(ExecutorKind::Async));
    let claimed = claim_all(&store, 1).await.remove(0);
    for _ in 0..3 {
        let until = Micros::now().plus(Duration::from_secs(60));
        let lost = store
            .renew("me", &[(claimed.id, claimed.attempt)], until)
            .await
            .unwrap();
        assert!(lost.is_empty());
    }
    store.cancel(job.id, Micros::now()).await.unwrap();
    // Notices arrive in commit order: anything the claim or the renewals announced would
    // come before the cancel's.
    assert_eq!(next(&mut notices).await, Notice::Cancel(job.id));
}

/// SQLite only: the exclusive store tells the dispatcher that every running job at start is
/// an orphan; a shared one does not.
#[tokio::test]
async fn only_the_sqlite_store_is_exclusive() {
    let (_dir, store) = sqlite().await;
    assert!(store.exclusive());
    if let Some((schema, pg)) = postgres().await {
        assert!(!pg.exclusive());
        crate::helpers::drop_pg_schema(&schema).await;
    }
}

/// Claims every due callback (`now`: far enough ahead that all are due).
async fn claim_callbacks(store: &Arc<dyn JobStore>, now: Micros) -> Vec<offload::store::Delivery> {
    store
        .claim_callbacks(100, now, now.plus(Duration::from_secs(30)))
        .await
        .unwrap()
        .deliveries
}

conformance!(every_move_into_a_final_state_writes_the_callback_outbox_row);
async fn every_move_into_a_final_state_writes_the_callback_outbox_row(store: Arc<dyn JobStore>) {
    // Five jobs with a callback, each made final another way, and two that owe none.
    let mut lost = calling_back("lost");
    lost.max_attempts = 1;
    let jobs = vec![
        calling_back("succeeds"),
        calling_back("fails"),
        lost.clone(),
        calling_back("cancelled-running"),
        calling_back("retried"),
        new_job("no-callback", None, None),
    ];
    store.insert(jobs.clone()).await.unwrap();
    let queued_cancel = calling_back("cancelled-queued");
    let inserted = store.insert(vec![queued_cancel.clone()]).await.unwrap();
    assert_eq!(
        inserted[0].job().callback.as_ref().unwrap().status,
        CallbackStatus::Pending
    );
    let running = claim_all(&store, 6).await;
    assert_eq!(running.len(), 6);
    let by_task = |t: &str| running.iter().find(|j| j.task == t).unwrap().clone();
    assert!(
        by_task("succeeds").callback.is_some(),
        "a claim reads the URL"
    );
    settle(
        &store,
        &by_task("succeeds"),
        AttemptEnd::Succeeded(json!(1)),
    )
    .await
    .unwrap();
    settle(
        &store,
        &by_task("fails"),
        AttemptEnd::Permanent("no".into()),
    )
    .await
    .unwrap();
    settle(
        &store,
        &by_task("no-callback"),
        AttemptEnd::Succeeded(json!(1)),
    )
    .await
    .unwrap();
    // A retry is not final: no callback yet.
    let retried = settle(
        &store,
        &by_task("retried"),
        AttemptEnd::Transient("again".into()),
    )
    .await
    .unwrap();
    assert_eq!(retried.status, JobStatus::Queued);
    // A rescue that finds no attempts left.
    let lost_job = by_task("lost");
    let rescued = store
        .settle(vec![Settle {
            job: lost_job.clone(),
            next: next_state(&lost_job, AttemptEnd::Lost, Duration::ZERO, Micros::now()).unwrap(),
            progress: 0.0,
            now: Micros::now(),
            expired_before: Some(Micros::now().plus(Duration::from_secs(60))),
        }])
        .await
        .unwrap();
    assert_eq!(rescued[0].as_ref().unwrap().status, JobStatus::Failed);
    for id in [by_task("cancelled-running").id, queued_cancel.id] {
        assert!(matches!(
            store.cancel(id, Micros::now()).await.unwrap(),
            CancelOutcome::Cancelled { .. }
        ));
    }

    let later = Micros::now().plus(Duration::from_secs(1));
    let claimed = claim_callbacks(&store, later).await;
    let mut tasks: Vec<&str> = claimed.iter().map(|d| d.job.task.as_str()).collect();
    tasks.sort();
    assert_eq!(
        tasks,
        [
            "cancelled-queued",
            "cancelled-running",
            "fails",
            "lost",
            "succeeds"
        ]
    );
    for d in &claimed {
        assert_eq!(d.attempt, 1);
        assert!(d.job.status.is_final());
        let cb = d.job.callback.as_ref().unwrap();
        assert_eq!(cb.url, format!("http://receiver.example/{}", d.job.task));
        assert_eq!((cb.status, cb.attempts), (CallbackStatus::Pending, 1));
        assert!(d.since <= later);
    }
    // Claimed: not due again until the claim's lease ends.
    assert!(claim_callbacks(&store, later).await.is_empty());
    let after_lease = later.plus(Duration::from_secs(31));
    assert_eq!(claim_callbacks(&store, after_lease).await.len(), 5);
}

conformance!(a_callback_outcome_is_recorded_once_under_its_attempt);
async fn a_callback_outcome_is_recorded_once_under_its_attempt(store: Arc<dyn JobStore>) {
    let a = calling_back("a");
    let b = calling_back("b");
    store.insert(vec![a.clone(), b.clone()]).await.unwrap();
    for id in [a.id, b.id] {
        store.cancel(id, Micros::now()).await.unwrap();
    }
    let now = Micros::now().plus(Duration::from_millis(1));
    let claimed = store
        .claim_callbacks(1, now, now.plus(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(claimed.deliveries.len(), 1, "up to the limit");
    let claimed = store
        .claim_callbacks(10, now, now.plus(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(claimed.deliveries.len(), 1, "the other one");
    assert_eq!(
        claimed.next_due,
        Some(now.plus(Duration::from_secs(30))),
        "fewer than asked for: when the next is due (the first claim's lease end)"
    );

    // Delivered: recorded once; a second record of the same attempt is refused.
    let t = Micros::now();
    assert!(store
        .record_callback(a.id, 1, CallbackOutcome::Delivered, t)
        .await
        .unwrap());
    assert!(!store
        .record_callback(a.id, 1, CallbackOutcome::Delivered, t)
        .await
        .unwrap());
    let got = store.get(a.id).await.unwrap().unwrap();
    let cb = got.callback.unwrap();
    assert_eq!(
        (cb.status, cb.attempts, cb.last_error),
        (CallbackStatus::Delivered, 1, None)
    );

    // A retry is due at its time, with one more attempt; the stale attempt cannot record.
    let retry_at = t.plus(Duration::from_secs(5));
    assert!(store
        .record_callback(
            b.id,
            1,
            CallbackOutcome::Retry {
                error: "the receiver answered 500".into(),
                at: retry_at,
            },
            t,
        )
        .await
        .unwrap());
    let listed = store
        .list(&ListFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let cb = listed
        .iter()
        .find(|j| j.id == b.id)
        .unwrap()
        .callback
        .clone()
        .unwrap();
    assert_eq!(cb.status, CallbackStatus::Pending);
    assert_eq!(cb.last_error.as_deref(), Some("the receiver answered 500"));
    assert!(claim_callbacks(&store, t).await.is_empty(), "not due yet");
    let again = claim_callbacks(&store, retry_at).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(
        again[0]
            .job
            .callback
            .as_ref()
            .unwrap()
            .last_error
            .as_deref(),
        Some("the receiver answered 500")
    );
    assert!(!store
        .record_callback(b.id, 1, CallbackOutcome::Delivered, t)
        .await
        .unwrap());
    assert!(store
        .record_callback(
            b.id,
            2,
            CallbackOutcome::Failed {
                error: "gone".into()
            },
            t
        )
        .await
        .unwrap());
    let cb = store.get(b.id).await.unwrap().unwrap().callback.unwrap();
    assert_eq!(
        (cb.status, cb.attempts, cb.last_error.as_deref()),
        (CallbackStatus::Failed, 2, Some("gone"))
    );
    assert!(
        claim_callbacks(&store, retry_at.plus(Duration::from_secs(60)))
            .await
            .is_empty()
    );

    // Deleting a job takes its callback with it.
    let c = calling_back("c");
    store.insert(vec![c.clone()]).await.unwrap();
    store.cancel(c.id, Micros::now()).await.unwrap();
    assert!(matches!(
        store.delete(c.id).await.unwrap(),
        DeleteOutcome::Deleted
    ));
    assert!(
        claim_callbacks(&store, Micros::now().plus(Duration::from_secs(60)))
            .await
            .is_empty()
    );
}

conformance!(concurrent_callback_claims_never_take_one_row_twice);
async fn concurrent_callback_claims_never_take_one_row_twice(store: Arc<dyn JobStore>) {
    let jobs: Vec<NewJob> = (0..60).map(|i| calling_back(&format!("j{i}"))).collect();
    store.insert(jobs.clone()).await.unwrap();
    for j in &jobs {
        store.cancel(j.id, Micros::now()).await.unwrap();
    }
    let now = Micros::now().plus(Duration::from_millis(1));
    let claims = (0..8).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let c = store
                    .claim_callbacks(5, now, now.plus(Duration::from_secs(30)))
                    .await
                    .unwrap();
                if c.deliveries.is_empty() {
                    return got;
                }
                got.extend(c.deliveries.into_iter().map(|d| d.job.id));
            }
        })
    });
    let mut all: Vec<JobId> = Vec::new();
    for c in claims {
        all.extend(c.await.unwrap());
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(
        (n, all.len()),
        (60, 60),
        "each callback claimed exactly once"
    );
}

mod schedules;
