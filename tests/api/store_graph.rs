//! The store conformance suite, continued: jobs that depend on jobs, retries by hand, bulk
//! cancel and retry, and the sweep. Every check runs against SQLite and, when
//! `OFFLOAD_TEST_DATABASE_URL` is set, PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use offload::clock::Micros;
use offload::job::ExecutorKind;
use offload::job::{AttemptEnd, ErrorKind, Job, JobId, JobStatus, NewJob, Parent};
use offload::store::{
    CancelOutcome, JobStore, ListFilter, Notice, PostgresStore, RetryOutcome, StoreError,
};
use serde_json::json;

use crate::store::{claim_all, conformance, new_job, postgres, settle, sqlite};

fn child(task: &str, parents: &[Parent]) -> NewJob {
    NewJob {
        depends_on: parents.to_vec(),
        ..new_job(task, None, None)
    }
}

async fn status(store: &Arc<dyn JobStore>, id: JobId) -> Job {
    store.get(id).await.unwrap().expect("the job exists")
}

/// Claims the queued jobs and settles each of `ids` among them with `end`.
async fn run_as(store: &Arc<dyn JobStore>, ids: &[JobId], end: fn() -> AttemptEnd) {
    let claimed = claim_all(store, 1000).await;
    for job in claimed.iter().filter(|j| ids.contains(&j.id)) {
        settle(store, job, end()).await.expect("it moved");
    }
    // Whatever else was claimed goes back to the queue, its attempt given back.
    for job in claimed.iter().filter(|j| !ids.contains(&j.id)) {
        settle(store, job, AttemptEnd::Drained).await;
    }
}

fn ok() -> AttemptEnd {
    AttemptEnd::Succeeded(json!({"sum": 2}))
}

fn broken() -> AttemptEnd {
    AttemptEnd::Permanent("broken".into())
}

conformance!(a_child_waits_until_every_parent_succeeded);
async fn a_child_waits_until_every_parent_succeeded(store: Arc<dyn JobStore>) {
    let (a, b) = (new_job("a", None, None), new_job("b", None, None));
    store.insert(vec![a.clone(), b.clone()]).await.unwrap();
    // A stored pair of parents by id, and one parent of the same batch by index.
    let c = child("c", &[Parent::Job(a.id), Parent::Job(b.id)]);
    let e = new_job("e", None, None);
    let f = child("f", &[Parent::Batch(0), Parent::Job(a.id)]);
    let out = store
        .insert(vec![c.clone(), e.clone(), f.clone()])
        .await
        .unwrap();
    let c_job = out[0].job();
    assert_eq!(c_job.status, JobStatus::Waiting);
    assert_eq!(c_job.depends_on, vec![a.id, b.id]);
    assert_eq!(out[2].job().depends_on, vec![c.id, a.id], "#0 is c");
    assert_eq!(status(&store, c.id).await.depends_on, vec![a.id, b.id]);
    assert_eq!(store.children(a.id).await.unwrap(), vec![c.id, f.id]);

    // Only jobs without unfinished parents are claimed.
    let claimed = claim_all(&store, 1000).await;
    let ids: Vec<JobId> = claimed.iter().map(|j| j.id).collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(&a.id) && ids.contains(&b.id) && ids.contains(&e.id));
    let job = |id| claimed.iter().find(|j| j.id == id).unwrap().clone();
    settle(&store, &job(a.id), ok()).await.unwrap();
    settle(&store, &job(e.id), ok()).await.unwrap();
    assert_eq!(status(&store, c.id).await.status, JobStatus::Waiting);
    settle(&store, &job(b.id), ok()).await.unwrap();
    assert_eq!(status(&store, c.id).await.status, JobStatus::Queued);
    assert_eq!(status(&store, f.id).await.status, JobStatus::Waiting);

    let results = store.results(&[a.id, b.id, c.id]).await.unwrap();
    assert_eq!(
        results,
        vec![
            (a.id, Some(json!({"sum": 2}))),
            (b.id, Some(json!({"sum": 2}))),
            (c.id, None)
        ]
    );
    run_as(&store, &[c.id], ok).await;
    assert_eq!(status(&store, f.id).await.status, JobStatus::Queued);
}

conformance!(a_failed_parent_cancels_its_descendants_unless_they_run_on_failure);
async fn a_failed_parent_cancels_its_descendants_unless_they_run_on_failure(
    store: Arc<dyn JobStore>,
) {
    let a = new_job("a", None, None);
    let b = child("b", &[Parent::Batch(0)]);
    let c = child("c", &[Parent::Batch(1)]);
    let d = NewJob {
        run_on_parent_failure: true,
        ..child("d", &[Parent::Batch(0)])
    };
    store
        .insert(vec![a.clone(), b.clone(), c.clone(), d.clone()])
        .await
        .unwrap();
    run_as(&store, &[a.id], broken).await;
    for (id, parent) in [(b.id, a.id), (c.id, b.id)] {
        let job = status(&store, id).await;
        assert_eq!(job.status, JobStatus::Cancelled);
        let error = job.error.expect("an error");
        assert_eq!(error.kind, ErrorKind::DependencyFailed);
        assert!(
            error.message.contains(&parent.to_string()),
            "{}",
            error.message
        );
        assert!(job.finished_at.is_some());
    }
    let d_job = status(&store, d.id).await;
    assert_eq!(
        d_job.status,
        JobStatus::Queued,
        "runs on its parent's failure"
    );
    assert!(d_job.run_on_parent_failure);
    // A child submitted after its parent failed is cancelled at once; after it succeeded,
    // queued at once.
    let late = store
        .insert(vec![child("late", &[Parent::Job(a.id)])])
        .await
        .unwrap();
    assert_eq!(late[0].job().status, JobStatus::Cancelled);
    let stored = status(&store, late[0].job().id).await;
    assert_eq!(stored.error.unwrap().kind, ErrorKind::DependencyFailed);
    run_as(&store, &[d.id], ok).await;
    let after = store
        .insert(vec![child("after", &[Parent::Job(d.id)])])
        .await
        .unwrap();
    assert_eq!(after[0].job().status, JobStatus::Queued);
}

conformance!(cancelling_a_waiting_job_cancels_its_children);
async fn cancelling_a_waiting_job_cancels_its_children(store: Arc<dyn JobStore>) {
    let a = new_job("a", None, None);
    let b = child("b", &[Parent::Batch(0)]);
    let c = child("c", &[Parent::Batch(1)]);
    store
        .insert(vec![a.clone(), b.clone(), c.clone()])
        .await
        .unwrap();
    match store.cancel(b.id, Micros::now()).await.unwrap() {
        CancelOutcome::Cancelled { was, job } => {
            assert_eq!(was, JobStatus::Waiting);
            assert_eq!(job.error.unwrap().kind, ErrorKind::Cancelled);
        }
        other => panic!("{other:?}"),
    }
    let c_job = status(&store, c.id).await;
    assert_eq!(c_job.status, JobStatus::Cancelled);
    assert_eq!(c_job.error.unwrap().kind, ErrorKind::DependencyFailed);
    assert_eq!(status(&store, a.id).await.status, JobStatus::Queued);
}

conformance!(unknown_parents_and_cycles_store_nothing);
async fn unknown_parents_and_cycles_store_nothing(store: Arc<dyn JobStore>) {
    let a = new_job("a", None, None);
    let ghost = JobId::new();
    let b = child("b", &[Parent::Job(ghost)]);
    let err = store.insert(vec![a.clone(), b.clone()]).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::InvalidDependency { index: 1, message } if message.contains(&ghost.to_string())),
        "{err}"
    );
    assert!(store.get(a.id).await.unwrap().is_none(), "nothing stored");
    let x = child("x", &[Parent::Batch(1)]);
    let y = child("y", &[Parent::Batch(0)]);
    let err = store.insert(vec![x.clone(), y]).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidDependency { .. }), "{err}");
    assert!(store.get(x.id).await.unwrap().is_none(), "nothing stored");
}

conformance!(a_retry_gives_fresh_attempts_and_brings_back_cancelled_children);
async fn a_retry_gives_fresh_attempts_and_brings_back_cancelled_children(store: Arc<dyn JobStore>) {
    let a = new_job("a", None, None);
    let b = child("b", &[Parent::Batch(0)]);
    let c = child("c", &[Parent::Batch(1)]);
    store
        .insert(vec![a.clone(), b.clone(), c.clone()])
        .await
        .unwrap();
    assert!(matches!(
        store.retry(a.id, Micros::now()).await.unwrap(),
        RetryOutcome::NotRetryable(j) if j.status == JobStatus::Queued
    ));
    run_as(&store, &[a.id], broken).await;
    assert_eq!(status(&store, c.id).await.status, JobStatus::Cancelled);
    // The child cannot come back while its parent is still failed.
    match store.retry(b.id, Micros::now()).await.unwrap() {
        RetryOutcome::ParentFailed(job, why) => {
            assert_eq!(job.id, b.id);
            assert!(why.contains(&a.id.to_string()), "{why}");
        }
        other => panic!("{other:?}"),
    }
    let retried = match store.retry(a.id, Micros::now()).await.unwrap() {
        RetryOutcome::Retried(job) => job,
        other => panic!("{other:?}"),
    };
    assert_eq!(retried.status, JobStatus::Queued);
    // The attempt it used stays counted; the retry grants the budget it was submitted with.
    assert_eq!(
        (retried.attempt, retried.max_attempts, retried.retried),
        (1, 3, 1)
    );
    assert!(retried.error.is_none() && retried.finished_at.is_none());
    assert_eq!(status(&store, a.id).await.retried, 1);
    for id in [b.id, c.id] {
        let job = status(&store, id).await;
        assert_eq!(job.status, JobStatus::Waiting, "back with its parent");
        assert!(job.error.is_none() && job.finished_at.is_none());
    }
    run_as(&store, &[a.id], ok).await;
    run_as(&store, &[b.id], ok).await;
    run_as(&store, &[c.id], ok).await;
    assert_eq!(status(&store, c.id).await.status, JobStatus::Succeeded);
    assert!(matches!(
        store.retry(JobId::new(), Micros::now()).await.unwrap(),
        RetryOutcome::NotFound
    ));
}

conformance!(a_retried_job_runs_under_a_new_attempt_number_the_old_one_cannot_touch);
async fn a_retried_job_runs_under_a_new_attempt_number_the_old_one_cannot_touch(
    store: Arc<dyn JobStore>,
) {
    let a = new_job("a", None, None);
    store.insert(vec![a.clone()]).await.unwrap();
    let first = claim_all(&store, 10).await.pop().expect("claimed");
    assert_eq!(first.attempt, 1);
    // Cancelled while running; the attempt winds down slowly. Retried meanwhile, and run again.
    assert!(matches!(
        store.cancel(a.id, Micros::now()).await.unwrap(),
        CancelOutcome::Cancelled { .. }
    ));
    let retried = match store.retry(a.id, Micros::now()).await.unwrap() {
        RetryOutcome::Retried(job) => job,
        other => panic!("{other:?}"),
    };
    assert_eq!((retried.attempt, retried.max_attempts), (1, 3));
    let second = claim_all(&store, 10).await.pop().expect("claimed again");
    assert_eq!(second.attempt, 2, "attempt numbers only grow");
    // The old attempt's renewal and its outcome name attempt 1: neither touches the new run.
    let gone = store
        .renew("me", &[(a.id, 1), (a.id, 2)], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(gone, vec![(a.id, 1)]);
    assert!(settle(&store, &first, broken()).await.is_none());
    let job = status(&store, a.id).await;
    assert_eq!((job.status, job.attempt), (JobStatus::Running, 2));
    // The new run fails transiently: its budget (2, as submitted) allows one more attempt.
    let failed = AttemptEnd::Transient("flaky".into());
    let moved = settle(&store, &second, failed).await.expect("it moved");
    assert_eq!(moved.status, JobStatus::Queued);
    let third = claim_all(&store, 10)
        .await
        .pop()
        .expect("claimed a third time");
    assert_eq!(third.attempt, 3);
    let last = settle(&store, &third, AttemptEnd::Transient("flaky".into()))
        .await
        .expect("it moved");
    assert_eq!(last.status, JobStatus::Failed, "the budget is spent");
    // A second retry grants the same budget again, not a bigger one.
    let again = match store.retry(a.id, Micros::now()).await.unwrap() {
        RetryOutcome::Retried(job) => job,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (again.attempt, again.max_attempts, again.retried),
        (3, 5, 2)
    );
}

conformance!(bulk_cancel_and_retry_act_on_matches_oldest_first_up_to_the_limit);
async fn bulk_cancel_and_retry_act_on_matches_oldest_first_up_to_the_limit(
    store: Arc<dyn JobStore>,
) {
    let xs: Vec<NewJob> = (0..5).map(|_| new_job("x", None, None)).collect();
    store.insert(xs.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    let between = Micros::now();
    tokio::time::sleep(Duration::from_millis(2)).await;
    let ys: Vec<NewJob> = (0..2).map(|_| new_job("y", None, None)).collect();
    store.insert(ys.clone()).await.unwrap();
    let x_filter = ListFilter {
        task: Some("x".into()),
        limit: 3,
        ..Default::default()
    };
    let unfinished = [JobStatus::Waiting, JobStatus::Queued, JobStatus::Running];
    let cancelled = store
        .cancel_matching(&x_filter, &unfinished, Micros::now())
        .await
        .unwrap();
    let ids: Vec<JobId> = cancelled.iter().map(|(j, _)| j.id).collect();
    assert_eq!(ids, xs[..3].iter().map(|j| j.id).collect::<Vec<_>>());
    assert!(cancelled.iter().all(|(_, was)| *was == JobStatus::Queued));
    // Created before the ys: the xs only.
    let early = ListFilter {
        created_before: Some(between),
        limit: 100,
        ..Default::default()
    };
    let cancelled = store
        .cancel_matching(&early, &unfinished, Micros::now())
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 2, "the two xs left");
    let listed = store
        .list(&ListFilter {
            created_after: Some(between),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 2, "only the ys were created after");
    assert!(listed
        .iter()
        .all(|j| j.task == "y" && j.status == JobStatus::Queued));

    let retried = store
        .retry_matching(
            &ListFilter {
                task: Some("x".into()),
                limit: 1000,
                ..Default::default()
            },
            &[JobStatus::Failed, JobStatus::Cancelled],
            Micros::now(),
        )
        .await
        .unwrap();
    assert_eq!(retried.len(), 5);
    assert!(retried
        .iter()
        .all(|j| j.status == JobStatus::Queued && j.retried == 1));
    assert_eq!(claim_all(&store, 1000).await.len(), 7);
}

conformance!(the_sweep_leaves_jobs_that_rightly_wait);
async fn the_sweep_leaves_jobs_that_rightly_wait(store: Arc<dyn JobStore>) {
    let a = new_job("a", None, None);
    let b = new_job("b", None, None);
    let c = child("c", &[Parent::Batch(0), Parent::Batch(1)]);
    store
        .insert(vec![a.clone(), b.clone(), c.clone()])
        .await
        .unwrap();
    run_as(&store, &[a.id], ok).await;
    // c has a final parent and an unfinished one: the sweep looks at it and leaves it.
    let (moved, next) = store
        .resolve_waiting(None, 100, Micros::now())
        .await
        .unwrap();
    assert_eq!((moved, next), (0, None));
    assert_eq!(status(&store, c.id).await.status, JobStatus::Waiting);
}

/// What the sweep is for: a waiting job whose parents all finished without moving it (here,
/// a parent's row written behind the store's back), moved on by the sweep.
#[tokio::test]
async fn the_sweep_moves_a_stranded_waiting_job_on_sqlite() {
    use sqlx::Connection;
    let (dir, store) = sqlite().await;
    let a = new_job("a", None, None);
    let c = child("c", &[Parent::Batch(0)]);
    store.insert(vec![a.clone(), c.clone()]).await.unwrap();
    let url = offload::config::sqlite_url(dir.path());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query(
        "UPDATE jobs SET status = 'succeeded', result = '1', attempt = 1, started_at = 1, \
         finished_at = 2 WHERE id = ?",
    )
    .bind(a.id.to_string())
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    assert_eq!(status(&store, c.id).await.status, JobStatus::Waiting);
    let (moved, _) = store
        .resolve_waiting(None, 100, Micros::now())
        .await
        .unwrap();
    assert_eq!(moved, 1);
    assert_eq!(status(&store, c.id).await.status, JobStatus::Queued);
}

/// An op that moves a job and then meets a malformed row in the graph walk after it (here a
/// child whose lane no build knows) answers the error and changes nothing: the SQLite writer
/// runs it in a savepoint, as PostgreSQL runs it in a transaction.
#[tokio::test]
async fn an_op_that_fails_midway_writes_nothing_on_sqlite() {
    use sqlx::Connection;
    let (dir, store) = sqlite().await;
    let a = new_job("a", None, None);
    let c = NewJob {
        run_on_parent_failure: true,
        ..child("c", &[Parent::Batch(0)])
    };
    store.insert(vec![a.clone(), c.clone()]).await.unwrap();
    let url = offload::config::sqlite_url(dir.path());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("PRAGMA ignore_check_constraints = ON")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE jobs SET executor = 'gpu' WHERE id = ?")
        .bind(c.id.to_string())
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    // Cancelling the parent would queue the child (it runs on failure): its lane is unknown.
    let err = store.cancel(a.id, Micros::now()).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    assert_eq!(
        status(&store, a.id).await.status,
        JobStatus::Queued,
        "not half-cancelled"
    );
    // Nor a settle: the parent's failure is not written either.
    let claimed = claim_all(&store, 10).await.pop().expect("claimed");
    assert_eq!(claimed.id, a.id);
    let next = offload::job::next_state(&claimed, broken(), Duration::ZERO, Micros::now()).unwrap();
    let err = store
        .settle(vec![offload::store::Settle {
            job: claimed.clone(),
            next,
            progress: 0.5,
            now: Micros::now(),
            expired_before: None,
        }])
        .await;
    assert!(err.is_err(), "{err:?}");
    assert_eq!(
        status(&store, a.id).await.status,
        JobStatus::Running,
        "not half-settled"
    );
    // The writer goes on: other ops apply.
    let b = new_job("b", None, None);
    store.insert(vec![b.clone()]).await.unwrap();
    assert!(matches!(
        store.cancel(b.id, Micros::now()).await.unwrap(),
        CancelOutcome::Cancelled { .. }
    ));
}

/// Two servers finish the two parents of many children at the same moment, each in a
/// transaction of its own: every child is queued (none left waiting because each transaction
/// saw the other parent still running).
#[tokio::test]
async fn parents_finishing_on_two_servers_at_once_queue_every_child_on_postgres() {
    let Some((schema, one)) = postgres().await else {
        return;
    };
    let url = crate::helpers::pg_url().unwrap();
    let two: Arc<dyn JobStore> = Arc::new(PostgresStore::open(&url, Some(&schema)).await.unwrap());
    let mut children = Vec::new();
    for _ in 0..30 {
        let (a, b) = (new_job("a", None, None), new_job("b", None, None));
        let c = child("c", &[Parent::Batch(0), Parent::Batch(1)]);
        children.push(c.id);
        one.insert(vec![a, b, c]).await.unwrap();
    }
    let claimed = claim_all(&one, 1000).await;
    assert_eq!(claimed.len(), 60);
    let settles = claimed.iter().map(|job| {
        let store = if job.task == "a" {
            one.clone()
        } else {
            two.clone()
        };
        let job = job.clone();
        async move { settle(&store, &job, ok()).await }
    });
    futures_util::future::join_all(settles).await;
    for id in children {
        assert_eq!(status(&one, id).await.status, JobStatus::Queued, "{id}");
    }
    crate::helpers::drop_pg_schema(&schema).await;
}

/// Waits for a notice that `want` accepts, up to five seconds.
async fn hear(
    notices: &mut tokio::sync::mpsc::UnboundedReceiver<Notice>,
    what: &str,
    want: impl Fn(&Notice) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline, notices.recv())
            .await
            .unwrap_or_else(|_| panic!("no notice of {what}"))
            .unwrap();
        if want(&n) {
            return;
        }
    }
}

conformance!(what_a_cascade_moves_is_announced_to_the_writers_own_server);
/// No server counted or published the children a parent's outcome (or a retry) moved, the
/// writer's own included: the store announces them to it too, the children queued with their
/// count, every child moved as a change.
async fn what_a_cascade_moves_is_announced_to_the_writers_own_server(store: Arc<dyn JobStore>) {
    let mut notices = store.listen().await.unwrap();
    let a = new_job("a", None, None);
    let c = NewJob {
        executor: ExecutorKind::Blocking,
        ..child("c", &[Parent::Batch(0)])
    };
    store.insert(vec![a.clone(), c.clone()]).await.unwrap();
    run_as(&store, &[a.id], ok).await;
    hear(&mut notices, "the child queued, counted", |n| {
        *n == Notice::New {
            lane: ExecutorKind::Blocking,
            added: 1,
        }
    })
    .await;
    hear(
        &mut notices,
        "the child's change",
        |n| matches!(n, Notice::Changed(ids) if ids.contains(&c.id)),
    )
    .await;

    // A failed parent cancels its child; retried, it brings the child back to waiting.
    let (p, q) = (new_job("p", None, None), new_job("q", None, None));
    let q = NewJob {
        depends_on: vec![Parent::Job(p.id)],
        ..q
    };
    store.insert(vec![p.clone()]).await.unwrap();
    store.insert(vec![q.clone()]).await.unwrap();
    run_as(&store, &[p.id], broken).await;
    hear(
        &mut notices,
        "the child cancelled for its parent",
        |n| matches!(n, Notice::Changed(ids) if ids.contains(&q.id)),
    )
    .await;
    assert_eq!(status(&store, q.id).await.status, JobStatus::Cancelled);
    store.retry(p.id, Micros::now()).await.unwrap();
    hear(
        &mut notices,
        "the child back to waiting",
        |n| matches!(n, Notice::Changed(ids) if ids.contains(&q.id)),
    )
    .await;
    assert_eq!(status(&store, q.id).await.status, JobStatus::Waiting);
}
