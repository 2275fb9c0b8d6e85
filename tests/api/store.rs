//! The store conformance suite: what every `JobStore` must do, whatever the database. Every
//! check runs against SQLite and, when `OFFLOAD_TEST_DATABASE_URL` is set, PostgreSQL; each
//! trait method is exercised by at least one check.

use std::sync::Arc;
use std::time::Duration;

use offload::blob::BlobMeta;
use offload::clock::Micros;
use offload::config::Durability;
use offload::flow::{Concurrency, Rate};
use offload::job::CallbackStatus;
use offload::job::{
    next_state, AttemptEnd, ErrorKind, ExecutorKind, Job, JobId, JobStatus, Kind, NewJob, Next,
};
use offload::store::{
    BlobDeleteOutcome, CallbackOutcome, CancelOutcome, DeleteOutcome, Expiry, Inserted, JobStore,
    Lease, ListFilter, Notice, PostgresStore, ServerBeat, Settle, SqliteStore, StoreError,
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
        tenant: None,
        concurrency: None,
        rate: None,
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
        ttl: Duration::from_secs(30),
    }
}

/// Long enough for a lease of a millisecond to have run out by any clock.
async fn lapse() {
    tokio::time::sleep(Duration::from_millis(30)).await;
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
    let mut many: Vec<JobId> = store
        .get_many(&[a.id, JobId::new(), b.id])
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    many.sort();
    assert_eq!(many, vec![a.id, b.id], "the ones that exist");
    assert!(store.get_many(&[]).await.unwrap().is_empty());
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
    let short = Lease {
        owner: "dead".into(),
        ttl: Duration::from_millis(1),
    };
    let claimed = store
        .claim(ExecutorKind::Async, 10, Micros::now(), &short)
        .await
        .unwrap()
        .jobs;
    assert_eq!(claimed.len(), 3);
    store.cancel(cancelled.id, Micros::now()).await.unwrap();
    lapse().await;
    // The owner renews: the cancelled job is no longer its own; an unknown attempt neither.
    let mine: Vec<(JobId, u32)> = claimed.iter().map(|j| (j.id, j.attempt)).collect();
    let gone = store
        .renew("dead", &mine, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(gone, vec![(cancelled.id, 1)]);
    let found = store.expired(Expiry::Lapsed, 10).await.unwrap();
    assert!(found.jobs.is_empty(), "renewed by the store's clock");
    // Every running job, lease or not, is what an exclusive store rescues at start.
    let all = store.expired(Expiry::All, 10).await.unwrap();
    assert_eq!(all.jobs.len(), 2);
    // The owner stops renewing (its last renewal was short); its jobs are expired and rescued.
    store
        .renew("dead", &mine, Duration::from_millis(1))
        .await
        .unwrap();
    lapse().await;
    let found = store.expired(Expiry::Lapsed, 10).await.unwrap();
    assert_eq!(found.jobs.len(), 2);
    // A rescue moves a job only if its lease still ended before the rescuer's look: here the
    // owner renews `twice` in between, and the first rescue of it is refused.
    let rescue = |job: &Job, before: Micros| Settle {
        job: job.clone(),
        next: next_state(job, AttemptEnd::Lost, Duration::ZERO, Micros::now()).unwrap(),
        progress: 0.0,
        now: Micros::now(),
        expired_before: Some(before),
    };
    let twice_running = found.jobs.iter().find(|j| j.id == twice.id).unwrap();
    store
        .renew("dead", &[(twice.id, 1)], Duration::from_secs(60))
        .await
        .unwrap();
    let refused = store
        .settle(vec![rescue(twice_running, found.before)])
        .await
        .unwrap();
    assert!(refused[0].is_none(), "renewed since: not rescued");
    store
        .renew("dead", &[(twice.id, 1)], Duration::from_millis(1))
        .await
        .unwrap();
    lapse().await;
    let found = store.expired(Expiry::Lapsed, 10).await.unwrap();
    assert_eq!(found.jobs.len(), 2);
    for job in &found.jobs {
        let moved = store.settle(vec![rescue(job, found.before)]).await.unwrap();
        assert!(moved[0].is_some(), "{job:?}");
    }
    let lost = store.get(once.id).await.unwrap().unwrap();
    assert_eq!(lost.status, JobStatus::Failed);
    assert_eq!(lost.error.unwrap().kind, ErrorKind::Lost);
    let requeued = store.get(twice.id).await.unwrap().unwrap();
    assert_eq!(requeued.status, JobStatus::Queued);
    assert_eq!(requeued.error.unwrap().kind, ErrorKind::Crashed);
    let found = store.expired(Expiry::Lapsed, 10).await.unwrap();
    assert!(found.jobs.is_empty());
    assert_eq!(claim_all(&store, 10).await[0].attempt, 2);
}

conformance!(an_attempt_is_known_by_its_job_and_number);
/// A job rescued and claimed again by the same owner: renewing its old attempt neither
/// extends the new attempt's lease nor counts as holding it.
async fn an_attempt_is_known_by_its_job_and_number(store: Arc<dyn JobStore>) {
    let job = new_job("again", None, None);
    store.insert(vec![job.clone()]).await.unwrap();
    let short = Lease {
        owner: "me".into(),
        ttl: Duration::from_millis(1),
    };
    let first = store
        .claim(ExecutorKind::Async, 1, Micros::now(), &short)
        .await
        .unwrap()
        .jobs
        .remove(0);
    lapse().await;
    let found = store.expired(Expiry::Lapsed, 10).await.unwrap();
    assert_eq!(found.jobs.len(), 1);
    let next = next_state(&first, AttemptEnd::Lost, Duration::ZERO, Micros::now()).unwrap();
    let requeued = store
        .settle(vec![Settle {
            job: first.clone(),
            next,
            progress: 0.0,
            now: Micros::now(),
            expired_before: Some(found.before),
        }])
        .await
        .unwrap();
    assert!(requeued[0].is_some());
    let second = store
        .claim(ExecutorKind::Async, 1, Micros::now(), &short)
        .await
        .unwrap()
        .jobs
        .remove(0);
    assert_eq!((second.id, second.attempt), (job.id, 2));
    lapse().await;
    // The old attempt's renewal: refused, and the new attempt's lease is left to run out.
    let gone = store
        .renew("me", &[(job.id, 1)], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(gone, vec![(job.id, 1)]);
    let found = store.expired(Expiry::Lapsed, 10).await.unwrap();
    assert_eq!(
        found
            .jobs
            .iter()
            .map(|j| (j.id, j.attempt))
            .collect::<Vec<_>>(),
        vec![(job.id, 2)],
        "the old attempt's renewal did not extend the new one's lease"
    );
    // The new attempt's renewal holds it.
    let gone = store
        .renew("me", &[(job.id, 2)], Duration::from_secs(60))
        .await
        .unwrap();
    assert!(gone.is_empty());
    assert!(store
        .expired(Expiry::Lapsed, 10)
        .await
        .unwrap()
        .jobs
        .is_empty());
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
    while !wait_for(
        &heard,
        &Notice::New {
            lane: ExecutorKind::Async,
            added: 0,
        },
    ) {
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
    while !wait_for(
        &heard,
        &Notice::New {
            lane: ExecutorKind::Blocking,
            added: 0,
        },
    ) {
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

conformance!(the_store_announces_deleted_blobs);
/// Every server removes its copies of a blob deleted or pruned anywhere: the store says which.
async fn the_store_announces_deleted_blobs(store: Arc<dyn JobStore>) {
    let mut notices = store.listen().await.unwrap();
    let gone = blob(false);
    store.insert_blob(gone.clone()).await.unwrap();
    assert_eq!(
        store.delete_blob(&gone.id).await.unwrap(),
        BlobDeleteOutcome::Deleted
    );
    let pruned = blob(false);
    store.insert_blob(pruned.clone()).await.unwrap();
    let mut job = new_job("uses", None, None);
    job.blobs = vec![pruned.id.clone()];
    store.insert(vec![job.clone()]).await.unwrap();
    store.cancel(job.id, Micros::now()).await.unwrap();
    store.delete(job.id).await.unwrap();
    assert_eq!(
        store.prune_blobs(10).await.unwrap(),
        vec![pruned.id.clone()]
    );
    let mut deleted = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while deleted.len() < 2 {
        if let Notice::BlobsDeleted(ids) = tokio::time::timeout_at(deadline, notices.recv())
            .await
            .expect("notices of both deletions")
            .unwrap()
        {
            deleted.extend(ids);
        }
    }
    assert_eq!(deleted, vec![gone.id, pruned.id]);
}

/// PostgreSQL only: two stores on one schema (two servers) hear each other's submits with
/// their counts and each other's changes, and not their own changes.
#[tokio::test]
async fn stores_sharing_a_schema_hear_each_others_counts_and_changes() {
    let Some((schema, one)) = postgres().await else {
        return;
    };
    let url = crate::helpers::pg_url().unwrap();
    let other: Arc<dyn JobStore> =
        Arc::new(PostgresStore::open(&url, Some(&schema)).await.unwrap());
    let mut heard_by_one = one.listen().await.unwrap();
    let jobs: Vec<NewJob> = (0..3).map(|_| new_job("x", None, None)).collect();
    other.insert(jobs.clone()).await.unwrap();
    one.insert(vec![new_job("mine", None, None)]).await.unwrap();
    let mut heard = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while heard.len() < 3 {
        heard.push(
            tokio::time::timeout_at(deadline, heard_by_one.recv())
                .await
                .expect("notices")
                .unwrap(),
        );
    }
    assert_eq!(
        heard,
        vec![
            Notice::New {
                lane: ExecutorKind::Async,
                added: 3
            },
            Notice::Changed(jobs.iter().map(|j| j.id).collect()),
            Notice::New {
                lane: ExecutorKind::Async,
                added: 0
            },
        ],
        "the other's submit with its count and its jobs; its own submit counts nothing and \
         its own changes are not announced back to it"
    );
    drop(other);
    crate::helpers::drop_pg_schema(&schema).await;
}

conformance!(servers_beat_and_the_silent_are_forgotten);
async fn servers_beat_and_the_silent_are_forgotten(store: Arc<dyn JobStore>) {
    let beat = |id: &str, capacity: u64| ServerBeat {
        id: id.into(),
        address: Some(format!("http://{id}:8080")),
        lanes: json!({"async": {"capacity": capacity, "running": 0}}),
    };
    store.beat(&beat("old", 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    store.beat(&beat("new", 1)).await.unwrap();
    // A second beat keeps the start and moves the heartbeat and the lanes.
    lapse().await;
    store.beat(&beat("new", 7)).await.unwrap();
    let servers = store.servers().await.unwrap();
    let ids: Vec<&str> = servers.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, vec!["old", "new"], "longest running first");
    let new = &servers[1];
    assert!(new.started_at < new.heartbeat_at, "{new:?}");
    assert_eq!(new.lanes["async"]["capacity"], 7);
    assert_eq!(new.address.as_deref(), Some("http://new:8080"));
    // `old` has been silent for over a second, `new` for a moment.
    assert_eq!(
        store
            .forget_servers(Duration::from_millis(600))
            .await
            .unwrap(),
        1
    );
    let ids: Vec<String> = store
        .servers()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, vec!["new"]);
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
    assert_eq!(
        next(&mut notices).await,
        Notice::New {
            lane: ExecutorKind::Async,
            added: 0,
        }
    );
    let claimed = claim_all(&store, 1).await.remove(0);
    for _ in 0..3 {
        let lost = store
            .renew(
                "me",
                &[(claimed.id, claimed.attempt)],
                Duration::from_secs(60),
            )
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

fn keyed(key: &str, limit: u32) -> NewJob {
    NewJob {
        concurrency: Some(Concurrency {
            key: key.into(),
            limit,
        }),
        ..new_job("keyed", None, None)
    }
}

fn tenant_job(tenant: &str) -> NewJob {
    NewJob {
        tenant: Some(tenant.into()),
        ..new_job(tenant, None, None)
    }
}

/// Settles a claimed job as succeeded.
async fn succeed(store: &Arc<dyn JobStore>, job: &Job) {
    settle(store, job, AttemptEnd::Succeeded(json!({})))
        .await
        .expect("still running");
}

conformance!(a_concurrency_key_caps_its_running_jobs_and_holds_back_nothing_else);
async fn a_concurrency_key_caps_its_running_jobs_and_holds_back_nothing_else(
    store: Arc<dyn JobStore>,
) {
    let mut notices = store.listen().await.unwrap();
    // Keyed jobs first, so a claim in plain order would meet them before the free ones.
    let k: Vec<NewJob> = (0..3).map(|_| keyed("k", 2)).collect();
    let l: Vec<NewJob> = (0..2).map(|_| keyed("l", 1)).collect();
    let free: Vec<NewJob> = (0..2).map(|_| new_job("free", None, None)).collect();
    let all: Vec<NewJob> = k.iter().chain(&l).chain(&free).cloned().collect();
    store.insert(all).await.unwrap();
    let got = store
        .claim(ExecutorKind::Async, 10, Micros::now(), &lease("me"))
        .await
        .unwrap();
    let count = |key: &str| {
        got.jobs
            .iter()
            .filter(|j| j.concurrency.as_ref().is_some_and(|c| c.key == key))
            .count()
    };
    assert_eq!((count("k"), count("l")), (2, 1), "each key up to its limit");
    assert_eq!(
        got.jobs.iter().filter(|j| j.concurrency.is_none()).count(),
        2,
        "jobs without a key are not held back by keyed ones ahead of them"
    );
    assert_eq!(
        got.next_due, None,
        "held back by keys only: nothing to poll for, a finish announces itself"
    );
    assert_eq!(got.jobs[0].concurrency.as_ref().unwrap().key, "k");
    let state = store
        .flow_state(&["k".into(), "l".into(), "none".into()], &[])
        .await
        .unwrap();
    assert_eq!(state.running.get("k"), Some(&2));
    assert_eq!(state.running.get("l"), Some(&1));
    assert_eq!(state.running.get("none"), None);
    let stats = store.flow_stats(10).await.unwrap();
    let k_stats = stats
        .concurrency
        .top
        .iter()
        .find(|c| c.name == "k")
        .unwrap();
    assert_eq!((k_stats.running, k_stats.queued), (2, 1));

    // Nothing more starts while the keys are full...
    assert!(claim_all(&store, 10).await.is_empty());
    // ...and a keyed job's end is announced to its lane, then frees one slot of its key.
    while tokio::time::timeout(Duration::from_millis(200), notices.recv())
        .await
        .is_ok()
    {}
    let first_k = got
        .jobs
        .iter()
        .find(|j| j.concurrency.as_ref().is_some_and(|c| c.key == "k"))
        .unwrap();
    succeed(&store, first_k).await;
    let heard = tokio::time::timeout(Duration::from_secs(5), notices.recv())
        .await
        .expect("a notice of the freed key")
        .unwrap();
    assert_eq!(
        heard,
        Notice::New {
            lane: ExecutorKind::Async,
            added: 0
        }
    );
    let next = claim_all(&store, 10).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].concurrency.as_ref().unwrap().key, "k");
    assert!(next[0].started_at.unwrap() >= first_k.started_at.unwrap());
}

/// Forgets the notices said so far (PostgreSQL's come a moment after the commit).
async fn drain(notices: &mut tokio::sync::mpsc::UnboundedReceiver<Notice>) {
    while tokio::time::timeout(Duration::from_millis(200), notices.recv())
        .await
        .is_ok()
    {}
}

/// Waits until every notice of `want` has been heard, with anything else around them.
async fn hear(notices: &mut tokio::sync::mpsc::UnboundedReceiver<Notice>, mut want: Vec<Notice>) {
    while !want.is_empty() {
        let heard = tokio::time::timeout(Duration::from_secs(5), notices.recv())
            .await
            .unwrap_or_else(|_| panic!("heard none of {want:?}"))
            .unwrap();
        want.retain(|n| *n != heard);
    }
}

conformance!(a_cancelled_keyed_job_alone_or_in_bulk_frees_its_key_and_says_so);
async fn a_cancelled_keyed_job_alone_or_in_bulk_frees_its_key_and_says_so(
    store: Arc<dyn JobStore>,
) {
    let mut notices = store.listen().await.unwrap();
    let jobs: Vec<NewJob> = (0..3).map(|_| keyed("one", 1)).collect();
    store.insert(jobs).await.unwrap();
    let first = claim_all(&store, 10).await;
    assert_eq!(first.len(), 1, "limit 1");
    assert!(claim_all(&store, 10).await.is_empty(), "the key is full");
    // A cancel by id: `cancel` to whoever runs it, `new` to its lane (the key is free).
    drain(&mut notices).await;
    let out = store.cancel(first[0].id, Micros::now()).await.unwrap();
    assert!(matches!(
        out,
        CancelOutcome::Cancelled {
            was: JobStatus::Running,
            ..
        }
    ));
    hear(
        &mut notices,
        vec![
            Notice::Cancel(first[0].id),
            Notice::New {
                lane: ExecutorKind::Async,
                added: 0,
            },
        ],
    )
    .await;
    let second = claim_all(&store, 10).await;
    assert_eq!(second.len(), 1, "the freed key lets the next start");
    // A bulk cancel of the running ones does the same.
    drain(&mut notices).await;
    let running = ListFilter {
        task: Some("keyed".into()),
        limit: 10,
        ..Default::default()
    };
    let cancelled = store
        .cancel_matching(&running, &[JobStatus::Running], Micros::now())
        .await
        .unwrap();
    assert_eq!(
        cancelled.iter().map(|(j, _)| j.id).collect::<Vec<_>>(),
        vec![second[0].id]
    );
    hear(
        &mut notices,
        vec![
            Notice::Cancel(second[0].id),
            Notice::New {
                lane: ExecutorKind::Async,
                added: 0,
            },
        ],
    )
    .await;
    assert_eq!(claim_all(&store, 10).await.len(), 1, "the last one starts");
}

conformance!(a_rate_key_spends_its_burst_then_says_when_its_next_token_is_due);
async fn a_rate_key_spends_its_burst_then_says_when_its_next_token_is_due(
    store: Arc<dyn JobStore>,
) {
    let rate = Rate {
        key: "api".into(),
        per_second: 1.0,
        burst: 2,
    };
    let jobs: Vec<NewJob> = (0..5)
        .map(|_| NewJob {
            rate: Some(rate.clone()),
            ..new_job("rated", None, None)
        })
        .collect();
    store.insert(jobs).await.unwrap();
    store
        .insert(vec![new_job("free", None, None)])
        .await
        .unwrap();
    let before = Micros::now();
    let got = store
        .claim(ExecutorKind::Async, 10, before, &lease("me"))
        .await
        .unwrap();
    assert_eq!(
        got.jobs.len(),
        3,
        "the burst of two, and the job without a rate"
    );
    let due = got.next_due.expect("when the next token comes");
    let wait = due.0 - before.0;
    // A token a second, counted from the claim's moment (a little after `before`).
    assert!(
        (1_000_000..=1_500_000).contains(&wait),
        "a token a second: {wait} µs"
    );
    let state = store.flow_state(&[], &["api".into()]).await.unwrap();
    assert!(state.buckets["api"].tokens < 1.0);
    assert!(claim_all(&store, 10).await.is_empty(), "no token yet");
    // The next token, without sleeping for it: a claim at the moment it is due. The bucket
    // fills by the claim's clock (never earlier than the real one), so a second token would
    // take a second more: a loaded machine does not change the answer.
    let bucket = store
        .flow_state(&[], &["api".into()])
        .await
        .unwrap()
        .buckets["api"];
    let due = bucket.at.0 + ((1.0 - bucket.tokens) * 1e6) as i64 + 100_000;
    let got = store
        .claim(ExecutorKind::Async, 10, Micros(due), &lease("me"))
        .await
        .unwrap();
    assert_eq!(got.jobs.len(), 1, "one token came");
}

conformance!(tenants_of_one_priority_take_turns_whatever_their_backlogs);
async fn tenants_of_one_priority_take_turns_whatever_their_backlogs(store: Arc<dyn JobStore>) {
    store
        .insert((0..40).map(|_| tenant_job("big")).collect())
        .await
        .unwrap();
    store
        .insert((0..5).map(|_| tenant_job("small")).collect())
        .await
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..10 {
        for job in claim_all(&store, 1).await {
            order.push(job.tenant.unwrap());
        }
    }
    assert_eq!(order.len(), 10);
    assert_eq!(
        order.iter().filter(|t| *t == "small").count(),
        5,
        "one-job claims alternate: {order:?}"
    );
    // A higher priority goes first, whatever the turns.
    let urgent = NewJob {
        priority: 9,
        ..tenant_job("big")
    };
    store.insert(vec![urgent.clone()]).await.unwrap();
    assert_eq!(claim_all(&store, 1).await[0].id, urgent.id);
    let stats = store.flow_stats(1).await.unwrap();
    assert_eq!(stats.tenants.top.len(), 1);
    assert_eq!(stats.tenants.top[0].name, "big");
    assert_eq!(
        stats.tenants.top[0].running + stats.tenants.top[0].queued,
        41
    );
    assert_eq!(stats.tenants.others.running, 5, "small's, summed");
}

/// PostgreSQL only (one SQLite file has one server): two stores on one schema, claiming at
/// once, never run more jobs of a key than its limit, nor take more tokens than its bucket
/// holds.
#[tokio::test]
async fn claims_from_two_servers_keep_a_keys_limit_and_a_rates_bucket() {
    let Some((schema, a)) = postgres().await else {
        return;
    };
    let url = crate::helpers::pg_url().unwrap();
    let b: Arc<dyn JobStore> = Arc::new(PostgresStore::open(&url, Some(&schema)).await.unwrap());
    let rate = Rate {
        key: "shared-rate".into(),
        per_second: 0.001,
        burst: 7,
    };
    let mut jobs: Vec<NewJob> = (0..60).map(|_| keyed("shared", 3)).collect();
    jobs.extend((0..30).map(|_| NewJob {
        rate: Some(rate.clone()),
        ..new_job("rated", None, None)
    }));
    a.insert(jobs).await.unwrap();
    let claimers = [a.clone(), b.clone(), a.clone(), b.clone()].map(|store| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..20 {
                got.extend(claim_all(&store, 2).await);
            }
            got
        })
    });
    let mut all = Vec::new();
    for c in claimers {
        all.extend(c.await.unwrap());
    }
    let keyed = all.iter().filter(|j| j.concurrency.is_some()).count();
    let rated = all.iter().filter(|j| j.rate.is_some()).count();
    assert_eq!(keyed, 3, "the key's limit, across servers");
    assert_eq!(rated, 7, "the bucket's burst, across servers");
    crate::helpers::drop_pg_schema(&schema).await;
}

/// Weights given to a store (`--tenant-weight`) tilt the turns: a weighs 3, b 1.
#[tokio::test]
async fn tenant_weights_tilt_the_turns_on_both_stores() {
    async fn check(store: Arc<dyn JobStore>) {
        store
            .insert((0..20).map(|_| tenant_job("a")).collect())
            .await
            .unwrap();
        store
            .insert((0..20).map(|_| tenant_job("b")).collect())
            .await
            .unwrap();
        let mut a = 0;
        for _ in 0..16 {
            let got = claim_all(&store, 1).await;
            a += got
                .iter()
                .filter(|j| j.tenant.as_deref() == Some("a"))
                .count();
        }
        assert_eq!(a, 12, "three of every four");
    }
    let weights = || [("a".to_string(), 3)];
    let dir = tempfile::tempdir().unwrap();
    let url = offload::config::sqlite_url(dir.path());
    let sqlite = SqliteStore::open(&url, Durability::Full)
        .await
        .unwrap()
        .with_tenant_weights(weights());
    check(Arc::new(sqlite)).await;
    if let Some(url) = crate::helpers::pg_url() {
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        let pg = PostgresStore::open(&url, Some(&schema))
            .await
            .unwrap()
            .with_tenant_weights(weights());
        check(Arc::new(pg)).await;
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

conformance!(a_retried_job_is_not_called_back_until_final_again_and_old_deliveries_cannot_record);
async fn a_retried_job_is_not_called_back_until_final_again_and_old_deliveries_cannot_record(
    store: Arc<dyn JobStore>,
) {
    let a = calling_back("a");
    store.insert(vec![a.clone()]).await.unwrap();
    store.cancel(a.id, Micros::now()).await.unwrap();
    let now = Micros::now().plus(Duration::from_millis(1));
    let first = claim_callbacks(&store, now).await;
    assert_eq!(first.len(), 1);
    let stale = first[0].attempt;
    // While the first delivery is in flight, the job is retried: it is queued, not final.
    assert!(matches!(
        store.retry(a.id, Micros::now()).await.unwrap(),
        offload::store::RetryOutcome::Retried(_)
    ));
    let later = now.plus(Duration::from_secs(60));
    let claimed = store
        .claim_callbacks(10, later, later.plus(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(
        claimed.deliveries.is_empty(),
        "a queued job is not delivered as its completion"
    );
    assert_eq!(claimed.next_due, None, "nothing is owed until it is final");
    assert!(
        !store
            .record_callback(a.id, stale, CallbackOutcome::Delivered, later)
            .await
            .unwrap(),
        "the stale delivery records nothing"
    );
    // Final again (succeeded): delivered afresh, and the stale delivery still cannot record.
    let job = claim_all(&store, 10).await.pop().expect("claimed");
    settle(&store, &job, AttemptEnd::Succeeded(json!({"ok": true})))
        .await
        .expect("it moved");
    let again = claim_callbacks(&store, Micros::now().plus(Duration::from_millis(1))).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].job.status, JobStatus::Succeeded);
    assert!(again[0].attempt > stale, "tries keep counting");
    let t = Micros::now();
    assert!(!store
        .record_callback(a.id, stale, CallbackOutcome::Delivered, t)
        .await
        .unwrap());
    assert!(store
        .record_callback(a.id, again[0].attempt, CallbackOutcome::Delivered, t)
        .await
        .unwrap());
    let cb = store.get(a.id).await.unwrap().unwrap().callback.unwrap();
    assert_eq!(cb.status, CallbackStatus::Delivered);
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
