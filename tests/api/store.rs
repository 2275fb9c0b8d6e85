//! The store conformance suite: what every `JobStore` must do, whatever the database. It runs
//! against SQLite here; a PostgreSQL store must pass the same functions.

use std::sync::Arc;
use std::time::Duration;

use offload::clock::Micros;
use offload::config::Durability;
use offload::job::{ErrorInfo, ExecutorKind, JobId, JobStatus, Kind, NewJob};
use offload::store::{
    CancelOutcome, DeleteOutcome, Finish, Inserted, JobStore, ListFilter, PostgresStore,
    SqliteStore, StoreError,
};
use serde_json::json;

fn new_job(task: &str, key: Option<&str>, hash: Option<&str>) -> NewJob {
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
    }
}

async fn sqlite() -> (tempfile::TempDir, Arc<dyn JobStore>) {
    let dir = tempfile::tempdir().unwrap();
    let url = offload::config::sqlite_url(dir.path());
    let store = SqliteStore::open(&url, Durability::Full).await.unwrap();
    (dir, Arc::new(store))
}

/// A PostgreSQL store in a schema of its own (it creates it), dropped by `drop_pg_schema`;
/// `None` (the test is skipped) when `OFFLOAD_TEST_DATABASE_URL` is not set.
async fn postgres() -> Option<(String, Arc<dyn JobStore>)> {
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

conformance!(insert_then_get_and_list);
async fn insert_then_get_and_list(store: Arc<dyn JobStore>) {
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
    assert!(store.get(JobId::new()).await.unwrap().is_none());
    assert_eq!(store.queued().await.unwrap().len(), 2);
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

conformance!(a_late_finisher_cannot_overwrite_a_newer_attempt_or_a_cancel);
async fn a_late_finisher_cannot_overwrite_a_newer_attempt_or_a_cancel(store: Arc<dyn JobStore>) {
    let job = new_job("a", None, None);
    store.insert(vec![job.clone()]).await.unwrap();
    let now = Micros::now();
    let claimed = store.claim(vec![job.id], now).await.unwrap();
    let first = claimed[0].clone();
    assert_eq!(claimed[0].attempt, 1);
    assert_eq!(claimed[0].status, JobStatus::Running);
    assert!(
        store.claim(vec![job.id], now).await.unwrap().is_empty(),
        "claimed once"
    );
    // Attempt 1 fails and is retried; attempt 2 starts.
    let err = ErrorInfo::new("task_error", "x");
    let retried = store
        .retry(job.id, 1, err.clone(), now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retried.status, JobStatus::Queued);
    let second = store.claim(vec![job.id], now).await.unwrap()[0].clone();
    assert_eq!(second.attempt, 2);
    // Attempt 1 comes back late: nothing changes.
    let late = store
        .finish(&first, Finish::Succeeded(json!({"late": true})), 1.0, now)
        .await
        .unwrap();
    assert!(late.is_none());
    assert!(store.retry(job.id, 1, err, now).await.unwrap().is_none());
    // A cancel wins over the running attempt 2.
    assert!(matches!(
        store.cancel(job.id, now).await.unwrap(),
        CancelOutcome::Cancelled(_)
    ));
    let after = store
        .finish(&second, Finish::Succeeded(json!({})), 1.0, now)
        .await
        .unwrap();
    assert!(after.is_none());
    let got = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(got.status, JobStatus::Cancelled);
    assert!(matches!(
        store.cancel(job.id, now).await.unwrap(),
        CancelOutcome::AlreadyFinal(_)
    ));
    assert!(matches!(
        store.cancel(JobId::new(), now).await.unwrap(),
        CancelOutcome::NotFound
    ));
}

conformance!(retries_stop_at_max_attempts);
async fn retries_stop_at_max_attempts(store: Arc<dyn JobStore>) {
    let job = new_job("a", None, None);
    store.insert(vec![job.clone()]).await.unwrap();
    let now = Micros::now();
    store.claim(vec![job.id], now).await.unwrap();
    let err = ErrorInfo::new("task_error", "x");
    store
        .retry(job.id, 1, err.clone(), now)
        .await
        .unwrap()
        .unwrap();
    let second = store.claim(vec![job.id], now).await.unwrap()[0].clone();
    assert!(
        store
            .retry(job.id, 2, err.clone(), now)
            .await
            .unwrap()
            .is_none(),
        "no third attempt"
    );
    let failed = store
        .finish(&second, Finish::Failed(err), 0.5, now)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.status, JobStatus::Failed);
    assert_eq!(failed.progress, 0.5);
    // What finish answers is what a read finds.
    let read = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(read.status, failed.status);
    assert_eq!(read.finished_at, failed.finished_at);
    assert_eq!(read.progress, failed.progress);
    assert_eq!(read.error, failed.error);
    assert_eq!(failed.error.unwrap().kind, "task_error");
}

conformance!(recovery_requeues_or_loses_running_jobs);
async fn recovery_requeues_or_loses_running_jobs(store: Arc<dyn JobStore>) {
    let mut once = new_job("a", None, None);
    once.max_attempts = 1;
    let twice = new_job("b", None, None);
    store
        .insert(vec![once.clone(), twice.clone()])
        .await
        .unwrap();
    let now = Micros::now();
    store.claim(vec![once.id, twice.id], now).await.unwrap();
    let r = store.recover(now).await.unwrap();
    assert_eq!((r.requeued, r.lost), (1, 1));
    let lost = store.get(once.id).await.unwrap().unwrap();
    assert_eq!(lost.status, JobStatus::Failed);
    assert_eq!(lost.error.unwrap().kind, "lost");
    let requeued = store.get(twice.id).await.unwrap().unwrap();
    assert_eq!(requeued.status, JobStatus::Queued);
    assert_eq!(
        store.claim(vec![twice.id], now).await.unwrap()[0].attempt,
        2
    );
    // release hands an attempt back (graceful shutdown) without using it up.
    let released = store.release(twice.id, 2).await.unwrap().unwrap();
    assert_eq!((released.status, released.attempt), (JobStatus::Queued, 1));
}

conformance!(delete_and_prune_remove_only_finished_jobs);
async fn delete_and_prune_remove_only_finished_jobs(store: Arc<dyn JobStore>) {
    let done = new_job("a", None, None);
    let open = new_job("b", None, None);
    store
        .insert(vec![done.clone(), open.clone()])
        .await
        .unwrap();
    let now = Micros::now();
    let running = store.claim(vec![done.id], now).await.unwrap()[0].clone();
    store
        .finish(&running, Finish::Succeeded(json!({})), 1.0, now)
        .await
        .unwrap();
    assert!(matches!(
        store.delete(open.id).await.unwrap(),
        DeleteOutcome::Unfinished(_)
    ));
    assert_eq!(
        store.prune(now, 10).await.unwrap(),
        0,
        "finished at `now`, not before"
    );
    let later = now.plus(Duration::from_secs(1));
    assert_eq!(store.prune(later, 10).await.unwrap(), 1);
    assert!(matches!(
        store.delete(done.id).await.unwrap(),
        DeleteOutcome::NotFound
    ));
    assert!(store.get(open.id).await.unwrap().is_some());
}

conformance!(blobs_are_recorded_and_guarded_by_unfinished_jobs);
async fn blobs_are_recorded_and_guarded_by_unfinished_jobs(store: Arc<dyn JobStore>) {
    use offload::blob::BlobMeta;
    use offload::store::BlobDeleteOutcome;
    let id = JobId::new().to_string();
    let meta = BlobMeta {
        id: id.clone(),
        size: 24,
        sha256: "ab".repeat(32),
        keep: false,
        origin: None,
        created_at: Micros::now(),
    };
    store.insert_blob(meta.clone()).await.unwrap();
    assert_eq!(store.get_blob(&id).await.unwrap().unwrap().size, 24);
    assert!(store.get_blob("not-a-blob").await.unwrap().is_none());
    let mut user = new_job("array_stats", None, None);
    user.args = json!({ "blob": id });
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
    use offload::blob::BlobMeta;
    let blob = |keep| BlobMeta {
        id: JobId::new().to_string(),
        size: 8,
        sha256: "cd".repeat(32),
        keep,
        origin: None,
        created_at: Micros::now(),
    };
    let (used, kept, unused) = (blob(false), blob(true), blob(false));
    for b in [&used, &kept, &unused] {
        store.insert_blob(b.clone()).await.unwrap();
    }
    let mut jobs = Vec::new();
    for b in [&used, &kept] {
        let mut j = new_job("array_stats", None, None);
        j.args = json!({ "blob": b.id });
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
