//! Where jobs live: the `JobStore` trait, and its SQLite and PostgreSQL implementations.
//!
//! Every write is one move of the job state machine (`crate::job::JobStatus::can_become`),
//! guarded in SQL by the status it moves from and, for a running job, by its attempt number:
//! a late finisher can never overwrite a newer attempt or a cancel. A write that loses that
//! race returns `None` (or the matching outcome) instead of changing anything.
//!
//! Both stores pass the same conformance suite (`tests/api/store.rs`). PostgreSQL is also a
//! *shared* store: several servers claim from it, hold leases, and hear its notices.

mod postgres;
mod sqlite;

use async_trait::async_trait;
use serde_json::Value;

use crate::blob::BlobMeta;
use crate::clock::Micros;
use crate::job::{ErrorInfo, ExecutorKind, Job, JobId, JobStatus, Kind, NewJob};

pub use postgres::PostgresStore;

use std::borrow::Cow;

use futures_util::future::BoxFuture;
use sqlx::migrate::{Migration, MigrationSource, MigrationType};

/// Migrations compiled into the binary (version, name, SQL), so it runs from anywhere; each
/// backend has its own list under `migrations/`.
#[derive(Debug)]
pub(crate) struct Embedded(pub &'static [(i64, &'static str, &'static str)]);

impl MigrationSource<'static> for Embedded {
    fn resolve(self) -> BoxFuture<'static, Result<Vec<Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async move {
            Ok(self
                .0
                .iter()
                .map(|(version, name, sql)| {
                    Migration::new(
                        *version,
                        Cow::Borrowed(*name),
                        MigrationType::Simple,
                        Cow::Borrowed(*sql),
                        false,
                    )
                })
                .collect())
        })
    }
}
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An idempotency key already names a job that was submitted with a different body.
    #[error("idempotency key `{key}` was already used with a different request")]
    IdempotencyConflict { index: usize, key: String },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("a stored row is malformed: {0}")]
    Corrupt(String),
    #[error("the store is shut down")]
    Closed,
}

/// The result of storing one job spec.
#[derive(Debug, Clone)]
pub enum Inserted {
    Created(Job),
    /// The idempotency key named this job, submitted earlier with the same spec.
    Existing(Job),
}

impl Inserted {
    pub fn job(&self) -> &Job {
        match self {
            Inserted::Created(j) | Inserted::Existing(j) => j,
        }
    }
}

/// How an attempt ended, for a job that is not coming back.
#[derive(Debug, Clone)]
pub enum Finish {
    Succeeded(Value),
    Failed(ErrorInfo),
}

#[derive(Debug)]
pub enum CancelOutcome {
    Cancelled(Job),
    AlreadyFinal(Job),
    NotFound,
}

#[derive(Debug)]
pub enum DeleteOutcome {
    Deleted,
    Unfinished(Box<Job>),
    NotFound,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BlobDeleteOutcome {
    Deleted,
    /// Unfinished jobs (this many) still name the blob.
    InUse(u64),
    NotFound,
}

/// What the dispatcher needs in memory for a queued job: not its args.
#[derive(Debug, Clone)]
pub struct QueuedRef {
    pub id: JobId,
    pub executor: ExecutorKind,
    pub priority: i32,
    pub scheduled_at: Micros,
}

#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub task: Option<String>,
    pub kind: Option<Kind>,
    /// Only jobs older than this one (the cursor).
    pub before: Option<JobId>,
    pub limit: u32,
}

/// What start-up recovery did with jobs a previous process left running.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub requeued: u64,
    pub lost: u64,
}

/// What a shared store announces to every server (PostgreSQL LISTEN/NOTIFY).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A job became queued in this lane.
    New(ExecutorKind),
    /// A running job was cancelled: whoever runs it must stop it.
    Cancel(JobId),
    /// A job changed: wake whoever waits on it.
    Changed(JobId),
}

fn unsupported(what: &str) -> StoreError {
    StoreError::Corrupt(format!("{what} needs a shared store (PostgreSQL)"))
}

#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Whether several servers may share this store: then queued jobs are claimed from the
    /// database (not held in one server's memory), running jobs hold leases, and changes are
    /// announced through [`JobStore::listen`].
    fn shared(&self) -> bool {
        false
    }
    /// Claims up to `limit` due jobs of a lane, in priority and schedule order, skipping rows
    /// other servers are claiming; they run under `owner`'s lease until `lease_until`.
    async fn claim_ready(
        &self,
        _executor: ExecutorKind,
        _limit: u32,
        _now: Micros,
        _owner: &str,
        _lease_until: Micros,
    ) -> Result<Vec<Job>, StoreError> {
        Err(unsupported("claim_ready"))
    }
    /// Extends the leases of every job `owner` runs.
    async fn renew_leases(&self, _owner: &str, _until: Micros) -> Result<u64, StoreError> {
        Err(unsupported("renew_leases"))
    }
    /// Requeues (or fails as `lost`) running jobs whose lease ran out; one server at a time.
    async fn requeue_expired(&self, _now: Micros) -> Result<Recovered, StoreError> {
        Err(unsupported("requeue_expired"))
    }
    /// When the next queued job of a lane is due, if any.
    async fn next_due(&self, _executor: ExecutorKind) -> Result<Option<Micros>, StoreError> {
        Err(unsupported("next_due"))
    }
    /// The store's announcements, for as long as the receiver lives.
    async fn listen(&self) -> Result<tokio::sync::mpsc::Receiver<Notice>, StoreError> {
        Err(unsupported("listen"))
    }
    /// Stores new jobs, all or nothing, and answers only once they are committed.
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Inserted>, StoreError>;
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError>;
    /// Newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError>;
    /// queued → running, starting a new attempt. Returns the jobs it moved (a job cancelled
    /// meanwhile is left out).
    async fn claim(&self, ids: Vec<JobId>, now: Micros) -> Result<Vec<Job>, StoreError>;
    /// running → succeeded | failed, if `job.attempt` is still the current one. `job` is the
    /// job as its claim returned it; the answer is the job as the move left it.
    async fn finish(
        &self,
        job: &Job,
        outcome: Finish,
        progress: f64,
        now: Micros,
    ) -> Result<Option<Job>, StoreError>;
    /// running → queued for another attempt at `at`.
    async fn retry(
        &self,
        id: JobId,
        attempt: u32,
        error: ErrorInfo,
        at: Micros,
    ) -> Result<Option<Job>, StoreError>;
    /// running → queued without using up the attempt (a graceful shutdown ran out of time).
    async fn release(&self, id: JobId, attempt: u32) -> Result<Option<Job>, StoreError>;
    /// queued | running → cancelled.
    async fn cancel(&self, id: JobId, now: Micros) -> Result<CancelOutcome, StoreError>;
    /// Removes a finished job.
    async fn delete(&self, id: JobId) -> Result<DeleteOutcome, StoreError>;
    /// At start: jobs left running by a dead process become queued (a new attempt) or, with no
    /// attempts left, failed with `lost`.
    async fn recover(&self, now: Micros) -> Result<Recovered, StoreError>;
    /// Every queued job, for the dispatcher's in-memory queues.
    async fn queued(&self) -> Result<Vec<QueuedRef>, StoreError>;
    /// Deletes up to `limit` jobs that finished before `before`; returns how many.
    async fn prune(&self, before: Micros, limit: u32) -> Result<u64, StoreError>;
    /// Records a blob whose file is complete and in place.
    async fn insert_blob(&self, meta: BlobMeta) -> Result<(), StoreError>;
    async fn get_blob(&self, id: &str) -> Result<Option<BlobMeta>, StoreError>;
    /// Forgets a blob unless a queued or running job names it in its args.
    async fn delete_blob(&self, id: &str) -> Result<BlobDeleteOutcome, StoreError>;
    /// Forgets up to `limit` blobs that jobs used, that no job names any more, and that were
    /// not uploaded to be kept; returns their ids so their files can go too.
    async fn prune_blobs(&self, limit: u32) -> Result<Vec<String>, StoreError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
}
