//! Where jobs live: the `JobStore` trait, and its SQLite and PostgreSQL implementations.
//!
//! **The store is the queue.** A lane with room claims due jobs from the store ([`JobStore::claim`],
//! one statement, priority then schedule order); nothing holds a queued job in memory, so a
//! committed job is claimable whatever happens to the request that submitted it. Notices
//! ([`JobStore::listen`]) only tell lanes to look sooner: the SQLite writer sends them after
//! each commit, PostgreSQL through LISTEN/NOTIFY, so the same dispatcher runs on both.
//!
//! Every write is one move of the job state machine (`crate::job::JobStatus::can_become`).
//! What a running job moves to is decided in Rust (`crate::job::next_state`) and handed to
//! [`JobStore::settle`]; the SQL only guards (status, and for a running job its attempt) and
//! writes: a late finisher can never overwrite a newer attempt or a cancel. A write that loses
//! that race returns `None` (or the matching outcome) instead of changing anything.
//!
//! Running jobs hold a lease (an owner and an expiry) on both stores; one protocol, one
//! conformance suite (`tests/api/store.rs`) that every store passes.

mod flow;
pub(crate) mod graph;
mod postgres;
mod sqlite;

use async_trait::async_trait;

use crate::blob::BlobMeta;
use crate::clock::Micros;
use crate::flow::{FlowState, FlowStats};
use crate::job::{CallbackStatus, ExecutorKind, Job, JobId, JobStatus, Kind, NewJob, Next};
use crate::schedule::Schedule;
use serde_json::Value;

pub use postgres::PostgresStore;

use std::borrow::Cow;
use std::collections::HashMap;

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

/// The keys of a `flow_state` call, as the claim looks them up: sorted, each once.
pub(crate) fn flow_keys(
    concurrency: &[String],
    rate: &[String],
) -> Vec<(crate::flow::KeyKind, String)> {
    use crate::flow::KeyKind;
    let mut keys: Vec<(KeyKind, String)> = concurrency
        .iter()
        .map(|k| (KeyKind::Concurrency, k.clone()))
        .chain(rate.iter().map(|k| (KeyKind::Rate, k.clone())))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Whether a job's move out of `running` (or its cancel) frees a slot of a concurrency key,
/// so that its lane should look again.
pub(crate) fn frees_key(job: &Job) -> bool {
    job.concurrency.is_some()
}

/// An `ErrorInfo` as the JSON both stores keep in the `error` column.
pub(crate) fn error_json(e: &crate::job::ErrorInfo) -> String {
    serde_json::to_string(e).expect("an ErrorInfo always serializes")
}

/// A stored value that does not decode.
pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// `(executor, count)` rows of a `GROUP BY executor` count, decoded.
pub(crate) fn lane_counts(
    rows: Vec<(String, i64)>,
) -> Result<Vec<(ExecutorKind, u64)>, StoreError> {
    rows.into_iter()
        .map(|(lane, n)| Ok((lane.parse().map_err(|e| corrupt("executor", e))?, n as u64)))
        .collect()
}

/// How a submit's jobs meet their idempotency keys, decided the same way on every store.
/// The store looks up the jobs already stored under the submit's keys ([`KeyedSubmit::keys`]),
/// then [`KeyedSubmit::plan`] says which jobs are replays and which are new, or that a key was
/// reused with another spec (the whole submit is refused); [`KeyedSubmit::answer`] builds the
/// answer once the new ones are stored.
pub(crate) struct KeyedSubmit<'a> {
    jobs: &'a [NewJob],
    out: Vec<Option<Inserted>>,
    fresh: Vec<usize>,
    /// Specs that repeat the key of an earlier spec of the same submit, and that spec.
    alias: HashMap<usize, usize>,
}

impl<'a> KeyedSubmit<'a> {
    /// The distinct idempotency keys of `jobs`, in order.
    pub fn keys(jobs: &[NewJob]) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        jobs.iter()
            .filter_map(|j| j.idempotency_key.as_deref())
            .filter(|k| seen.insert(*k))
            .collect()
    }

    /// `stored`: the jobs found under those keys. A key seen earlier in the same submit names
    /// that earlier job.
    pub fn plan(
        jobs: &'a [NewJob],
        stored: &std::collections::HashMap<String, Job>,
    ) -> Result<Self, StoreError> {
        let mut out: Vec<Option<Inserted>> = vec![None; jobs.len()];
        let mut fresh = Vec::with_capacity(jobs.len());
        let mut alias = HashMap::new();
        let mut in_batch: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (i, job) in jobs.iter().enumerate() {
            let Some(key) = job.idempotency_key.as_deref() else {
                fresh.push(i);
                continue;
            };
            let existing = match in_batch.get(key) {
                Some(&first) => {
                    alias.insert(i, first);
                    Some(jobs[first].to_job())
                }
                None => stored.get(key).cloned(),
            };
            match existing {
                Some(found) if found.spec_hash == job.spec_hash => {
                    out[i] = Some(Inserted::Existing(found))
                }
                Some(_) => {
                    return Err(StoreError::IdempotencyConflict {
                        index: i,
                        key: key.to_string(),
                    })
                }
                None => {
                    in_batch.insert(key, i);
                    fresh.push(i);
                }
            }
        }
        Ok(KeyedSubmit {
            jobs,
            out,
            fresh,
            alias,
        })
    }

    /// The stored jobs the fresh jobs name as parents: the store looks up their statuses.
    pub fn parents(&self) -> Vec<JobId> {
        graph::stored_parents(self.jobs, &self.fresh)
    }

    /// The rows to store, given the statuses of [`KeyedSubmit::parents`] found in the store
    /// (one missing is an unknown parent: the whole submit is refused).
    pub fn rows(
        &self,
        found: &HashMap<JobId, JobStatus>,
    ) -> Result<Vec<graph::NewRow<'a>>, StoreError> {
        let mut ids: Vec<JobId> = self.jobs.iter().map(|j| j.id).collect();
        let mut replayed = HashMap::new();
        for (i, o) in self.out.iter().enumerate() {
            if let (Some(Inserted::Existing(job)), None) = (o, self.alias.get(&i)) {
                ids[i] = job.id;
                replayed.insert(i, job.status);
            }
        }
        graph::rows(self.jobs, &ids, &self.fresh, &replayed, &self.alias, found)
    }

    /// The answer, once the fresh jobs are stored (`rows`, from [`KeyedSubmit::rows`]): each
    /// job created or found, in order.
    pub fn answer(mut self, rows: &[graph::NewRow<'_>]) -> Vec<Inserted> {
        let mut made: HashMap<usize, Job> = HashMap::new();
        for (&i, row) in self.fresh.iter().zip(rows) {
            made.insert(i, row.to_job());
        }
        for (&i, &first) in &self.alias {
            if let Some(job) = made.get(&first) {
                self.out[i] = Some(Inserted::Existing(job.clone()));
            }
        }
        for (i, job) in made {
            self.out[i] = Some(Inserted::Created(job));
        }
        self.out
            .into_iter()
            .map(|o| o.expect("every job answered"))
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An idempotency key already names a job that was submitted with a different body.
    #[error("idempotency key `{key}` was already used with a different request")]
    IdempotencyConflict { index: usize, key: String },
    /// A spec's `depends_on` names no job, or makes a cycle: nothing of the submit is stored.
    #[error("job {index}: depends_on: {message}")]
    InvalidDependency { index: usize, message: String },
    /// A write could not be committed (disk full, I/O error, database unreachable): nothing of
    /// it was stored, and trying again later may work.
    #[error("the store could not commit: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("a stored row is malformed: {0}")]
    Corrupt(String),
    /// A move the state machine does not allow was asked for (a bug, not a race).
    #[error("a job cannot move from {from} to {to}")]
    Transition {
        from: &'static str,
        to: &'static str,
    },
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

#[derive(Debug)]
pub enum CancelOutcome {
    /// Cancelled now; `was` is the status it was cancelled from.
    Cancelled {
        job: Job,
        was: JobStatus,
    },
    AlreadyFinal(Job),
    NotFound,
}

#[derive(Debug)]
pub enum RetryOutcome {
    /// Back to `queued` (or `waiting`, while a parent is unfinished), with fresh attempts.
    Retried(Job),
    /// Only `failed` and `cancelled` jobs are retried; this one is not.
    NotRetryable(Job),
    /// A parent it needs failed or was cancelled: retrying it would cancel it again. The
    /// message names the parent (retry that one; its children come back with it).
    ParentFailed(Job, String),
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

#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub status: Option<JobStatus>,
    pub task: Option<String>,
    pub kind: Option<Kind>,
    /// Only jobs routed to this lane.
    pub executor: Option<ExecutorKind>,
    /// Only jobs created before this time (exclusive).
    pub created_before: Option<Micros>,
    /// Only jobs created at or after this time.
    pub created_after: Option<Micros>,
    /// Only jobs older than this one (the cursor).
    pub before: Option<JobId>,
    pub limit: u32,
}

/// Who runs a claimed job, and for how long without renewal: a server renews its leases while
/// it runs the jobs; a job whose lease ran out is rescued by whichever server does maintenance.
///
/// A lease is a duration, not an instant: the store stamps the expiry with its own clock (the
/// database's `now()` on PostgreSQL, the one process's clock on SQLite) when it claims or
/// renews, and [`JobStore::expired`] compares against that same clock. No server's wall clock
/// takes part, so a server whose clock is hours off can neither make its own leases look
/// endless nor another server's look expired.
#[derive(Debug, Clone)]
pub struct Lease {
    pub owner: String,
    pub ttl: std::time::Duration,
}

/// Which running jobs [`JobStore::expired`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Those whose lease ended, by the store's clock.
    Lapsed,
    /// Every running job, whatever its lease: on an exclusive store at start, the jobs of the
    /// process that stopped.
    All,
}

/// What [`JobStore::expired`] found.
#[derive(Debug, Default)]
pub struct Expired {
    pub jobs: Vec<Job>,
    /// The store's clock when it looked (for [`Expiry::All`], the end of time): a rescue of
    /// these jobs passes it as [`Settle::expired_before`], so a job whose owner renewed its
    /// lease since is left alone.
    pub before: Micros,
}

/// What a server writes on each heartbeat about itself.
#[derive(Debug, Clone)]
pub struct ServerBeat {
    /// The server's node id (the owner on its leases).
    pub id: String,
    /// Where other servers and clients reach it (its advertised URL), if known.
    pub address: Option<String>,
    /// Its lanes: capacity and running jobs per lane, as JSON.
    pub lanes: serde_json::Value,
}

/// A server using the store, as its last heartbeat left it. Times are the store's clock.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerInfo {
    pub id: String,
    pub address: Option<String>,
    pub started_at: Micros,
    pub heartbeat_at: Micros,
    pub lanes: serde_json::Value,
}

/// What a claim took.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Now `running`, with a new attempt, under the claimer's lease.
    pub jobs: Vec<Job>,
    /// When fewer jobs than asked for were due: when the lane's next queued job is due, if it
    /// has one (a delayed job or a retry's backoff), so the lane knows when to look again.
    pub next_due: Option<Micros>,
}

/// One running job's move out of `running`, as [`crate::job::next_state`] decided it.
#[derive(Debug, Clone)]
pub struct Settle {
    /// The job as its claim returned it: the guard is its id, `running` and its attempt.
    pub job: Job,
    pub next: Next,
    /// The attempt's last progress, kept on a failure.
    pub progress: f64,
    pub now: Micros,
    /// For a rescue: move only if the job's lease still ended before this (its owner may have
    /// renewed it since the rescuer looked).
    pub expired_before: Option<Micros>,
}

impl Settle {
    /// The job as the move leaves it.
    pub fn moved(&self) -> Job {
        self.job.after(&self.next, self.progress, self.now)
    }

    /// Whether this move owes a completion callback: the store writes its outbox row in the
    /// same transaction as the move.
    pub fn calls_back(&self) -> bool {
        self.job.calls_back_on(self.next.status())
    }

    /// Refuses a move the state machine does not allow; the store checks before it writes.
    pub fn check(&self) -> Result<(), StoreError> {
        let (from, to) = (self.job.status, self.next.status());
        if from.can_become(to) {
            Ok(())
        } else {
            Err(StoreError::Transition {
                from: from.as_str(),
                to: to.as_str(),
            })
        }
    }
}

/// A completion callback claimed for delivery ([`JobStore::claim_callbacks`]).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The job as it is now (final), its `callback` showing this try: what is POSTed.
    pub job: Job,
    /// Which try this is (1 for the first); the guard of [`JobStore::record_callback`].
    pub attempt: u32,
    /// When the job became final: the retry window starts here.
    pub since: Micros,
}

impl Delivery {
    /// The delivery of a claimed outbox row (`attempts` tries counting this one, the last
    /// error, the job's final time) for `job`, whose `callback` is made to show this try. The
    /// same on both stores.
    pub(crate) fn claimed(
        mut job: Job,
        attempts: i64,
        since: i64,
        last_error: Option<String>,
    ) -> Result<Self, StoreError> {
        let Some(cb) = job.callback.as_mut() else {
            return Err(corrupt(
                "callbacks",
                format!("job {} has no callback_url", job.id),
            ));
        };
        cb.attempts = attempts as u32;
        cb.last_error = last_error;
        Ok(Delivery {
            job,
            attempt: attempts as u32,
            since: Micros(since),
        })
    }
}

/// What claiming callbacks took.
#[derive(Debug, Default)]
pub struct ClaimedCallbacks {
    pub deliveries: Vec<Delivery>,
    /// When fewer than asked for were due: when the next pending one is due, if any.
    pub next_due: Option<Micros>,
}

/// How a delivery ended, as `crate::callback` decided it: what the store writes.
#[derive(Debug, Clone, PartialEq)]
pub enum CallbackOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Try again at `at`.
    Retry { error: String, at: Micros },
    /// The retry window ran out.
    Failed { error: String },
}

impl CallbackOutcome {
    pub fn status(&self) -> CallbackStatus {
        match self {
            CallbackOutcome::Delivered => CallbackStatus::Delivered,
            CallbackOutcome::Retry { .. } => CallbackStatus::Pending,
            CallbackOutcome::Failed { .. } => CallbackStatus::Failed,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            CallbackOutcome::Delivered => None,
            CallbackOutcome::Retry { error, .. } | CallbackOutcome::Failed { error } => Some(error),
        }
    }

    /// When the row is next due (only a retry is).
    pub fn due(&self) -> Option<Micros> {
        match self {
            CallbackOutcome::Retry { at, .. } => Some(*at),
            _ => None,
        }
    }
}

/// What a store announces after it commits: hints that make lanes, cancels and watchers act
/// sooner. Nothing depends on a notice arriving: lanes also look on a timer, and a missed
/// cancel is found by the next lease renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Jobs became queued in this lane, or a job with a concurrency key stopped running in it
    /// (its key's queued jobs may start): the lane should look. `added` of them were not
    /// counted by this server yet: those another server queued, and children a cascade queued
    /// on any server (this server counts the jobs it submits, requeues or retries itself as it
    /// writes them, so its own notices of those say 0).
    New { lane: ExecutorKind, added: u64 },
    /// A running job was cancelled: whoever runs it must stop it.
    Cancel(JobId),
    /// Jobs changed on another server (submitted, finished, requeued, cancelled, retried;
    /// claims and lease renewals are not announced), or moved by a cascade on any server, this
    /// one included (children a parent's final state or retry moved, which no server published
    /// itself): wake whoever follows them here.
    Changed(Vec<JobId>),
    /// Blobs were deleted or pruned (on any server): copies of their files here go too.
    BlobsDeleted(Vec<String>),
    /// A schedule was created, paused, resumed or deleted: tickers look again.
    Schedules,
}

/// One wake-up of a schedule, as the ticker decided it: the jobs for its ticks, stored only if
/// the schedule is still active and still due at `expected` (no other server fired it
/// first), in the same transaction that moves its `next_run` on.
#[derive(Debug, Clone)]
pub struct Fire {
    pub name: String,
    /// The `next_run` the ticker read: the guard.
    pub expected: Micros,
    /// One per fired tick, each keyed `schedule:<name>:<tick>`. A job whose key is already
    /// stored is left out (that tick's job exists).
    pub jobs: Vec<NewJob>,
    pub next_run: Micros,
    pub last_tick: Option<Micros>,
    /// Why this wake-up made no job (its spec no longer parses), or `None`.
    pub error: Option<String>,
    pub now: Micros,
}

/// The jobs of `jobs` whose idempotency key is not in `taken`.
pub(crate) fn untaken<'a>(
    jobs: &'a [NewJob],
    taken: &std::collections::HashSet<String>,
) -> Vec<&'a NewJob> {
    jobs.iter()
        .filter(|j| {
            j.idempotency_key
                .as_ref()
                .is_none_or(|k| !taken.contains(k))
        })
        .collect()
}

#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Whether this process is the store's only user (SQLite, under the data-dir lock). Then
    /// every job found `running` at start belongs to a dead process and is rescued at once;
    /// a shared store waits for the leases to run out. (A capability, not a second protocol.)
    fn exclusive(&self) -> bool {
        false
    }
    /// The store's announcements, for as long as the receiver lives. Call once.
    async fn listen(&self) -> Result<tokio::sync::mpsc::UnboundedReceiver<Notice>, StoreError>;
    /// Stores new jobs, all or nothing, and answers only once they are committed.
    async fn insert(&self, jobs: Vec<NewJob>) -> Result<Vec<Inserted>, StoreError>;
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError>;
    /// The jobs of `ids` that exist, in one query, in no particular order.
    async fn get_many(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError>;
    /// Newest first.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Job>, StoreError>;
    /// Claims up to `limit` due queued jobs of a lane, in priority then schedule order:
    /// queued → running, a new attempt, under `lease`. Rows another server is claiming at the
    /// same moment are skipped, not waited for.
    ///
    /// Flow control (`crate::flow`) holds: no job starts past its concurrency key's limit or
    /// without a token of its rate key (counted across every server of the store), tenants of
    /// one priority take turns, and a job held back does not hold back the jobs behind it.
    /// `next_due` then also says when a held-back job may start (a rate's next token); a key
    /// freed by a finishing job is announced instead ([`Notice::New`] for its lane).
    async fn claim(
        &self,
        lane: ExecutorKind,
        limit: u32,
        now: Micros,
        lease: &Lease,
    ) -> Result<Claimed, StoreError>;
    /// Moves running jobs out of `running` as decided ([`Settle`]), each only if it is still
    /// running the same attempt. Answers, in order, the job as moved or `None` where the guard
    /// refused (a cancel or a rescue got there first).
    async fn settle(&self, moves: Vec<Settle>) -> Result<Vec<Option<Job>>, StoreError>;
    /// waiting | queued | running → cancelled (its waiting children with it, as
    /// [`crate::job::after_parents`] decides).
    async fn cancel(&self, id: JobId, now: Micros) -> Result<CancelOutcome, StoreError>;
    /// Removes a finished job.
    async fn delete(&self, id: JobId) -> Result<DeleteOutcome, StoreError>;
    /// Extends the leases of the attempts `owner` runs (`running`: (job, attempt) pairs, and
    /// only those: a row the owner no longer runs lets its lease run out and is rescued) to
    /// `ttl` from now by the store's clock. An attempt is known by its job and its number: a
    /// job rescued and claimed again, even by the same owner, is not renewed for its old
    /// attempt. Answers which of `running` no longer run under its lease: cancelled, rescued
    /// or finished elsewhere; the owner stops them.
    async fn renew(
        &self,
        owner: &str,
        running: &[(JobId, u32)],
        ttl: std::time::Duration,
    ) -> Result<Vec<(JobId, u32)>, StoreError>;
    /// Up to `limit` running jobs whose lease ended by the store's clock (or all of them,
    /// [`Expiry::All`]): the jobs of a server that died or stopped renewing, and the clock
    /// reading a rescue guards with. One server at a time gets an answer on a shared store;
    /// the others get none that round.
    async fn expired(&self, which: Expiry, limit: u32) -> Result<Expired, StoreError>;
    /// Flow control as it stands for these keys, for showing why queued jobs wait: running
    /// jobs per concurrency key, stored buckets per rate key. Reads only.
    async fn flow_state(
        &self,
        concurrency_keys: &[String],
        rate_keys: &[String],
    ) -> Result<FlowState, StoreError>;
    /// Running and queued jobs per concurrency key, rate key and tenant: the `top` busiest of
    /// each, the rest summed.
    async fn flow_stats(&self, top: usize) -> Result<FlowStats, StoreError>;
    /// How many jobs are queued in each lane (for admission and `/v1/stats`).
    async fn queued_counts(&self) -> Result<Vec<(ExecutorKind, u64)>, StoreError>;
    /// Deletes up to `limit` jobs that finished before `before`; returns how many.
    async fn prune(&self, before: Micros, limit: u32) -> Result<u64, StoreError>;
    /// Records a blob whose file is complete and in place.
    async fn insert_blob(&self, meta: BlobMeta) -> Result<(), StoreError>;
    async fn get_blob(&self, id: &str) -> Result<Option<BlobMeta>, StoreError>;
    /// Which of `ids` name blobs the store has.
    async fn known_blobs(&self, ids: &[String]) -> Result<Vec<String>, StoreError>;
    /// Forgets a blob unless a queued or running job names it.
    async fn delete_blob(&self, id: &str) -> Result<BlobDeleteOutcome, StoreError>;
    /// Forgets up to `limit` blobs that jobs used, that no job names any more, and that were
    /// not uploaded to be kept; returns their ids so their files can go too.
    async fn prune_blobs(&self, limit: u32) -> Result<Vec<String>, StoreError>;
    /// Records that a server is alive, now by the store's clock: its address and lanes (its
    /// first beat also records its start).
    async fn beat(&self, beat: &ServerBeat) -> Result<(), StoreError>;
    /// The servers using the store, longest running first.
    async fn servers(&self) -> Result<Vec<ServerInfo>, StoreError>;
    /// Forgets servers whose last beat is older than `silent` by the store's clock (ones that
    /// died, or earlier processes of an exclusive store); returns how many.
    async fn forget_servers(&self, silent: std::time::Duration) -> Result<u64, StoreError>;
    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Housekeeping the database would otherwise leave undone (PostgreSQL with autovacuum
    /// off: vacuuming the jobs table once enough of its rows changed). Answers whether it did
    /// anything. Stores that need none keep this default.
    async fn tidy(&self) -> Result<bool, StoreError> {
        Ok(false)
    }

    // Schedules (`crate::schedule`). Every write announces `Notice::Schedules` at its commit,
    // except a fire, whose jobs announce themselves as submits do.

    /// Stores a new schedule; `false` (nothing stored) when its name is taken.
    async fn create_schedule(&self, schedule: Schedule) -> Result<bool, StoreError>;
    async fn get_schedule(&self, name: &str) -> Result<Option<Schedule>, StoreError>;
    /// In name order, after the name `after`.
    async fn list_schedules(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Schedule>, StoreError>;
    /// Up to `limit` active (not paused) schedules, soonest `next_run` first: what a ticker
    /// fires or sleeps until.
    async fn next_schedules(&self, limit: u32) -> Result<Vec<Schedule>, StoreError>;
    /// Pauses a schedule (no ticks until resumed); the schedule as it is now, `None` if
    /// unknown. Pausing a paused schedule changes nothing.
    async fn pause_schedule(&self, name: &str, now: Micros)
        -> Result<Option<Schedule>, StoreError>;
    /// Resumes a paused schedule, due next at `next_run`; the schedule as it is now, `None`
    /// if unknown. Resuming an active schedule changes nothing.
    async fn resume_schedule(
        &self,
        name: &str,
        next_run: Micros,
        now: Micros,
    ) -> Result<Option<Schedule>, StoreError>;
    /// Forgets a schedule (the jobs it made stay); `false` if unknown.
    async fn delete_schedule(&self, name: &str) -> Result<bool, StoreError>;
    /// Fires a wake-up of a schedule (see [`Fire`]), all or nothing. `None` when its guard
    /// refused (fired elsewhere, paused, resumed or deleted since it was read); else the jobs
    /// stored.
    async fn fire_schedule(&self, fire: Fire) -> Result<Option<Vec<Job>>, StoreError>;
    /// The latest `limit` jobs a schedule made, newest tick first.
    async fn schedule_jobs(&self, name: &str, limit: u32) -> Result<Vec<Job>, StoreError>;

    // Completion callbacks. The outbox row of a job with a `callback_url` is written in the
    // same transaction as the job's move into a final state (settle, rescue, cancel: every
    // write that makes a job final), so neither a crash nor a lost connection between the two
    // can lose it; a job made final again (a retried job) gets a fresh row.

    /// Claims up to `limit` pending callbacks due by `now`, oldest due first: each gets one
    /// more attempt, and is not due again before `until` (a lease: if the claimer dies
    /// mid-delivery, the callback is tried again after it). Rows another server is claiming at
    /// the same moment are skipped, not waited for, so no two servers deliver one row at once.
    ///
    /// Unlike a job's [`Lease`], `now` and `until` are the claiming server's own clock, not
    /// the store's: a server whose clock runs ahead of another's by more than the callback
    /// lease may take a row the other is still delivering, and the receiver gets it twice.
    /// Callbacks are at least once anyway (receivers tell tries apart by the job id and the
    /// signature's timestamp), so the outbox keeps the simpler clock; job leases, whose expiry
    /// requeues running work, do not.
    async fn claim_callbacks(
        &self,
        limit: u32,
        now: Micros,
        until: Micros,
    ) -> Result<ClaimedCallbacks, StoreError>;
    /// Writes how a delivery ended, only if the callback is still pending at `attempt` (a
    /// slower claimer whose lease ran out, or a job made final again, is refused). Answers
    /// whether it wrote.
    async fn record_callback(
        &self,
        job: JobId,
        attempt: u32,
        outcome: CallbackOutcome,
        now: Micros,
    ) -> Result<bool, StoreError>;

    // Jobs that depend on jobs (`crate::store::graph`). A parent's final state moves its
    // waiting children in the same transaction (settle, cancel); these are the rest.

    /// The jobs that name `id` in their `depends_on`, oldest first.
    async fn children(&self, id: JobId) -> Result<Vec<JobId>, StoreError>;
    /// Each of `ids` with its result: `None` if it has none (not succeeded, or gone).
    async fn results(&self, ids: &[JobId]) -> Result<Vec<(JobId, Option<Value>)>, StoreError>;
    /// failed | cancelled → queued, or waiting while a parent is unfinished (as
    /// [`crate::job::after_parents`] decides), with fresh attempts and `retried` counted up;
    /// its children (and theirs) that were cancelled with `dependency_failed` come back with
    /// it, as that decision says for each.
    async fn retry(&self, id: JobId, now: Micros) -> Result<RetryOutcome, StoreError>;
    /// [`JobStore::retry`] for up to `filter.limit` jobs that match `filter` (oldest first),
    /// each with one of `statuses` (`failed`, `cancelled`); answers the jobs retried.
    async fn retry_matching(
        &self,
        filter: &ListFilter,
        statuses: &[JobStatus],
        now: Micros,
    ) -> Result<Vec<Job>, StoreError>;
    /// [`JobStore::cancel`] for up to `filter.limit` jobs that match `filter` (oldest first),
    /// each with one of `statuses` (`waiting`, `queued`, `running`); answers each job
    /// cancelled and the status it was cancelled from.
    async fn cancel_matching(
        &self,
        filter: &ListFilter,
        statuses: &[JobStatus],
        now: Micros,
    ) -> Result<Vec<(Job, JobStatus)>, StoreError>;
    /// The safety net: decides again up to `limit` waiting jobs (with ids after `after`) that
    /// have a final parent, and moves those the decision moves. Answers how many moved, and
    /// the id to go on after (`None`: the end was reached). One server at a time on a shared
    /// store.
    async fn resolve_waiting(
        &self,
        after: Option<JobId>,
        limit: u32,
        now: Micros,
    ) -> Result<(u64, Option<JobId>), StoreError>;
}

/// Outbox rows as both stores read them, laid over the jobs they belong to: the `callback`
/// of a job read without them says `pending` with no attempts.
pub(crate) fn lay_callbacks(
    jobs: &mut [Job],
    rows: Vec<(JobId, String, i64, Option<String>)>,
) -> Result<(), StoreError> {
    let rows: std::collections::HashMap<JobId, (String, i64, Option<String>)> = rows
        .into_iter()
        .map(|(id, status, attempts, error)| (id, (status, attempts, error)))
        .collect();
    for job in jobs {
        let Some(cb) = job.callback.as_mut() else {
            continue;
        };
        if let Some((status, attempts, error)) = rows.get(&job.id) {
            cb.status = status.parse().map_err(|e| corrupt("callback status", e))?;
            cb.attempts = *attempts as u32;
            cb.last_error = error.clone();
        }
    }
    Ok(())
}
