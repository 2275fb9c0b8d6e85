//! The job: its identity, its states and the transitions between them, and the job object that
//! callers see.
//!
//! The life of a job (see `docs/state_machine.md`):
//!
//! ```text
//!   waiting ──(every parent succeeded, or all final with run_on_parent_failure)──▶ queued
//!      └──(a parent failed or was cancelled)──▶ cancelled (dependency_failed)
//!
//!             claim                succeed / fail (no attempts left)
//!   queued ─────────────▶ running ─────────────────────────────────▶ succeeded | failed
//!     ▲  │                  │  │
//!     │  │ cancel           │  └── cancel ──▶ cancelled
//!     │  ▼                  │
//!     │ cancelled           │ fail, time out or crash with attempts left (backoff),
//!     └─────────────────────┘ or the server stopped while it ran
//! ```
//!
//! A `failed` or `cancelled` job goes back to `queued` (or `waiting`, while its parents are
//! unfinished) only when retried by hand (`POST /v1/jobs/{id}/retry`); see [`after_parents`]
//! for what a job with parents moves to.
//!
//! The same states are enforced by a `CHECK` constraint in SQL (`migrations/`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::clock::Micros;
use crate::flow::{Concurrency, Rate, WaitingFor};

/// A job's id: a UUID v7, so ids sort by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a job is in its life. `succeeded`, `failed` and `cancelled` are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Its parents (`depends_on`) have not all finished.
    Waiting,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Waiting,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Waiting => "waiting",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// The state machine, in one place. Every write in the store is one of these moves, and is
    /// guarded in SQL by the status it starts from (and, for a running job, its attempt number).
    pub fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Waiting, Queued)       // its parents finished as it needs (see `after_parents`)
                | (Waiting, Cancelled)  // a parent failed (dependency_failed), or by request
                | (Failed | Cancelled, Queued | Waiting) // retried by hand
                | (Queued, Running)       // a lane claimed it
                | (Queued, Cancelled)   // cancelled before it ran
                | (Running, Succeeded)  // the task returned a result
                | (Running, Failed)     // failed with no attempts left (or lost in a crash)
                | (Running, Queued)     // retry after backoff, or requeued after a restart
                | (Running, Cancelled) // cancelled while it ran
        )
    }
}

impl FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown status `{s}`: use waiting, queued, running, succeeded, failed or \
                     cancelled"
                )
            })
    }
}

/// What the caller says the work is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Io,
    Cpu,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Io => "io",
            Kind::Cpu => "cpu",
        }
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "io" => Ok(Kind::Io),
            "cpu" => Ok(Kind::Cpu),
            _ => Err(format!("unknown kind `{s}`: use io or cpu")),
        }
    }
}

/// The lane a job runs in, picked by the router from the kind and the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    /// A task on the tokio runtime, for work that awaits.
    Async,
    /// tokio's `spawn_blocking` pool, for synchronous calls that block.
    Blocking,
    /// The rayon pool, for CPU work.
    Rayon,
    /// Worker processes, for isolated jobs and large arrays.
    Process,
}

impl ExecutorKind {
    pub const ALL: [ExecutorKind; 4] = [
        ExecutorKind::Async,
        ExecutorKind::Blocking,
        ExecutorKind::Rayon,
        ExecutorKind::Process,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Async => "async",
            ExecutorKind::Blocking => "blocking",
            ExecutorKind::Rayon => "rayon",
            ExecutorKind::Process => "process",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl FromStr for ExecutorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ExecutorKind::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| format!("unknown executor `{s}`"))
    }
}

/// What kind of failure ended an attempt (the `type` of the job's `error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The task said it failed (permanent or transient).
    TaskError,
    /// The attempt ran past the job's `timeout_ms`.
    Timeout,
    /// The task panicked, or its worker process died.
    Crashed,
    /// The server running it died (or stopped renewing its lease) and no attempts remain.
    Lost,
    /// Cancelled by request.
    Cancelled,
    /// Never ran: a parent it depends on failed or was cancelled.
    DependencyFailed,
}

/// Why a job failed (or why its last attempt did).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    #[serde(rename = "type")]
    pub kind: ErrorKind,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ErrorInfo {
            kind,
            message: message.into(),
        }
    }
}

/// How one attempt ended, as the dispatcher saw it. [`next_state`] turns it into the move the
/// store writes.
#[derive(Debug)]
pub enum AttemptEnd {
    Succeeded(Value),
    /// The task failed and says retrying cannot help.
    Permanent(String),
    /// The task failed; another attempt may succeed.
    Transient(String),
    /// The task panicked or its worker process died.
    Crashed(String),
    TimedOut,
    /// Cancelled by request (the cancel has already written the job's state), or stopped by a
    /// drain (which hands the job back itself): nothing to write.
    Cancelled,
    /// A graceful shutdown ran out of time: the job goes back without using up its attempt.
    Drained,
    /// The server running the attempt died or stopped renewing its lease.
    Lost,
}

/// The state a running job moves to: what the store is told to write, guarded by the job's
/// status (`running`) and attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    Succeeded(Value),
    Failed(ErrorInfo),
    /// Queued again for a new attempt at `at`.
    Retry {
        error: ErrorInfo,
        at: Micros,
    },
    /// Queued again now, the attempt given back (a drain that ran out of time).
    Release,
}

impl Next {
    pub fn status(&self) -> JobStatus {
        match self {
            Next::Succeeded(_) => JobStatus::Succeeded,
            Next::Failed(_) => JobStatus::Failed,
            Next::Retry { .. } | Next::Release => JobStatus::Queued,
        }
    }
}

/// The one place policy lives: which state a running job goes to after an attempt ends.
/// `backoff` is the wait before a retry (the dispatcher's [`crate::dispatch::RetryPolicy`]);
/// `None` means there is nothing to write (a cancel already wrote the final state).
///
/// - a result → `succeeded`;
/// - a permanent error → `failed` at once;
/// - a transient error, a crash, a timeout → `queued` after the backoff while attempts remain,
///   else `failed`;
/// - a lost server → `queued` at once while attempts remain (the attempt counts), else
///   `failed` with `lost`;
/// - a drain that ran out of time → `queued`, the attempt given back.
pub fn next_state(job: &Job, end: AttemptEnd, backoff: Duration, now: Micros) -> Option<Next> {
    let retry_or_fail = |error: ErrorInfo, at: Micros| {
        if job.attempt < job.max_attempts {
            Next::Retry { error, at }
        } else {
            Next::Failed(error)
        }
    };
    let next = match end {
        AttemptEnd::Succeeded(value) => Next::Succeeded(value),
        AttemptEnd::Permanent(msg) => Next::Failed(ErrorInfo::new(ErrorKind::TaskError, msg)),
        AttemptEnd::Transient(msg) => {
            retry_or_fail(ErrorInfo::new(ErrorKind::TaskError, msg), now.plus(backoff))
        }
        AttemptEnd::Crashed(msg) => {
            retry_or_fail(ErrorInfo::new(ErrorKind::Crashed, msg), now.plus(backoff))
        }
        AttemptEnd::TimedOut => retry_or_fail(
            ErrorInfo::new(
                ErrorKind::Timeout,
                format!(
                    "attempt {} ran past its timeout of {} ms",
                    job.attempt,
                    job.timeout_ms.unwrap_or(0)
                ),
            ),
            now.plus(backoff),
        ),
        AttemptEnd::Cancelled => return None,
        AttemptEnd::Drained => Next::Release,
        AttemptEnd::Lost => {
            if job.attempt < job.max_attempts {
                Next::Retry {
                    error: ErrorInfo::new(
                        ErrorKind::Crashed,
                        "the server running the job stopped; it was requeued",
                    ),
                    at: now,
                }
            } else {
                Next::Failed(ErrorInfo::new(
                    ErrorKind::Lost,
                    "the server running the job stopped, and no attempts remain",
                ))
            }
        }
    };
    debug_assert!(JobStatus::Running.can_become(next.status()));
    Some(next)
}

/// Where a job's completion callback stands: `pending` until it is delivered (a 2xx answer) or
/// its retry window (`--callback-retry-secs`) runs out (`failed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallbackStatus {
    Pending,
    Delivered,
    Failed,
}

impl CallbackStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackStatus::Pending => "pending",
            CallbackStatus::Delivered => "delivered",
            CallbackStatus::Failed => "failed",
        }
    }
}

impl FromStr for CallbackStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pending" => Ok(CallbackStatus::Pending),
            "delivered" => Ok(CallbackStatus::Delivered),
            "failed" => Ok(CallbackStatus::Failed),
            _ => Err(format!("unknown callback status `{s}`")),
        }
    }
}

/// A job's completion callback: the URL the job object is POSTed to once the job is final,
/// and how its delivery goes (`crate::callback`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Callback {
    pub url: String,
    pub status: CallbackStatus,
    /// Deliveries tried so far.
    pub attempts: u32,
    pub last_error: Option<String>,
}

impl Callback {
    /// A callback not tried yet.
    pub fn pending(url: String) -> Self {
        Callback {
            url,
            status: CallbackStatus::Pending,
            attempts: 0,
            last_error: None,
        }
    }
}

/// What a job with parents moves to, given where its parents are: the one place that decides
/// it, at submit (a child whose parents are already final), when a parent reaches a final state
/// (in the same transaction), in the maintenance sweep, and on a retry by hand.
#[derive(Clone, Debug, PartialEq)]
pub enum AfterParents {
    /// Some parent it needs has not finished: `waiting`.
    Wait,
    /// It may run: `queued`.
    Queue,
    /// A parent failed or was cancelled and the job does not run on a parent's failure:
    /// `cancelled` with `dependency_failed`.
    Cancel(ErrorInfo),
}

/// Decides [`AfterParents`] from each parent's id and status (`None`: the parent is gone,
/// deleted or pruned after it finished; it counts as succeeded, since a parent that failed has
/// already cancelled its children when it did).
///
/// - any parent `failed` or `cancelled` → `Cancel` (at once, even while other parents run),
///   unless `run_on_parent_failure`;
/// - else any parent unfinished → `Wait`;
/// - else (every parent final) → `Queue`.
pub fn after_parents(
    run_on_parent_failure: bool,
    parents: &[(JobId, Option<JobStatus>)],
) -> AfterParents {
    if !run_on_parent_failure {
        let failed = parents
            .iter()
            .find(|(_, s)| matches!(s, Some(JobStatus::Failed | JobStatus::Cancelled)));
        if let Some((id, status)) = failed {
            let what = match status {
                Some(JobStatus::Failed) => "failed",
                _ => "was cancelled",
            };
            return AfterParents::Cancel(ErrorInfo::new(
                ErrorKind::DependencyFailed,
                format!("parent {id} {what}"),
            ));
        }
    }
    if parents
        .iter()
        .any(|(_, s)| s.is_some_and(|s| !s.is_final()))
    {
        AfterParents::Wait
    } else {
        AfterParents::Queue
    }
}

impl AfterParents {
    pub fn status(&self) -> JobStatus {
        match self {
            AfterParents::Wait => JobStatus::Waiting,
            AfterParents::Queue => JobStatus::Queued,
            AfterParents::Cancel(_) => JobStatus::Cancelled,
        }
    }
}

/// Time spent waiting and running, in milliseconds, for the latest attempt.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timings {
    pub queued_ms: Option<f64>,
    pub run_ms: Option<f64>,
}

/// The job object, as stored and as shown to callers.
#[derive(Clone, Debug, Serialize)]
pub struct Job {
    pub id: JobId,
    pub task: String,
    pub kind: Kind,
    pub executor: ExecutorKind,
    pub status: JobStatus,
    pub args: Value,
    pub result: Option<Value>,
    pub error: Option<ErrorInfo>,
    pub priority: i32,
    pub attempt: u32,
    pub max_attempts: u32,
    pub timeout_ms: Option<u64>,
    pub progress: f64,
    pub idempotency_key: Option<String>,
    pub created_at: Micros,
    pub scheduled_at: Micros,
    pub started_at: Option<Micros>,
    pub finished_at: Option<Micros>,
    pub timings: Timings,
    /// Shares the lane with other tenants' jobs round-robin (`None`: no tenant).
    pub tenant: Option<String>,
    /// At most `limit` jobs with this key run at once.
    pub concurrency: Option<Concurrency>,
    /// Jobs with this key start at most this fast.
    pub rate: Option<Rate>,
    /// Why a due queued job does not start: flow control holds it back. Filled in when the
    /// job is shown, not stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<WaitingFor>,
    /// For `waiting_for: rate`: when its key next has a token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_until: Option<Micros>,
    /// The completion callback, if the spec gave a `callback_url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<Callback>,
    /// The parents this job waits for (`depends_on` in its spec), as stored ids.
    pub depends_on: Vec<JobId>,
    /// Whether it runs once its parents are final even if one failed or was cancelled.
    pub run_on_parent_failure: bool,
    /// How many times it was retried by hand (`POST /v1/jobs/{id}/retry`).
    pub retried: u32,
    /// The jobs that depend on this one, when asked for (`?children=true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub children: Option<Vec<JobId>>,
    #[serde(skip)]
    pub spec_hash: Option<String>,
}

impl Job {
    /// The job as a move out of `running` leaves it: what the store writes (its guard is the
    /// status and attempt this job has now). `progress` is the attempt's last progress.
    pub fn after(&self, next: &Next, progress: f64, now: Micros) -> Job {
        let mut job = self.clone();
        job.status = next.status();
        match next {
            Next::Succeeded(value) => {
                job.result = Some(value.clone());
                job.error = None;
                job.progress = 1.0;
                job.finished_at = Some(now);
            }
            Next::Failed(error) => {
                job.error = Some(error.clone());
                job.progress = progress.clamp(0.0, 1.0);
                job.finished_at = Some(now);
            }
            Next::Retry { error, at } => {
                job.error = Some(error.clone());
                job.progress = 0.0;
                job.scheduled_at = *at;
            }
            Next::Release => {
                job.attempt = job.attempt.saturating_sub(1);
                job.progress = 0.0;
            }
        }
        job.compute_timings();
        job
    }

    /// Whether moving this job to `next` owes a completion callback: it has a callback URL
    /// and `next` is final. Every store writes the callback's outbox row in the same
    /// transaction as such a move, whichever path makes it (a settle, a rescue, a cancel).
    pub fn calls_back_on(&self, next: JobStatus) -> bool {
        self.callback.is_some() && next.is_final()
    }

    /// Fills `timings` from the timestamps.
    pub fn compute_timings(&mut self) {
        self.timings = Timings {
            queued_ms: self
                .started_at
                .map(|s| s.ms_since(self.scheduled_at).max(0.0)),
            run_ms: match (self.started_at, self.finished_at) {
                (Some(s), Some(f)) => Some(f.ms_since(s).max(0.0)),
                _ => None,
            },
        };
    }
}

/// A validated job, ready to be stored. Built by [`crate::spec::JobSpec`] parsing at the edge.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: JobId,
    pub task: String,
    pub kind: Kind,
    pub executor: ExecutorKind,
    pub args: Value,
    pub priority: i32,
    pub max_attempts: u32,
    pub timeout_ms: Option<u64>,
    pub created_at: Micros,
    pub scheduled_at: Micros,
    pub idempotency_key: Option<String>,
    /// A hash of the spec, so a reused idempotency key can be told apart from a replay.
    pub spec_hash: Option<String>,
    /// The blobs the job names: the values of its task's blob arguments
    /// (`Task::blob_args`), in canonical form.
    pub blobs: Vec<String>,
    pub tenant: Option<String>,
    pub concurrency: Option<Concurrency>,
    pub rate: Option<Rate>,
    /// Where to POST the job once it is final (checked against the address rules at submit).
    pub callback_url: Option<String>,
    /// The jobs it waits for: stored jobs, or earlier specs of the same batch.
    pub depends_on: Vec<Parent>,
    pub run_on_parent_failure: bool,
}

/// A parent named in a spec's `depends_on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Parent {
    /// A stored job.
    Job(JobId),
    /// The spec at this index of the same batch (`"#2"`).
    Batch(usize),
}

impl NewJob {
    /// Whether the job is under flow control (a tenant, a concurrency key or a rate): claimed
    /// by the flow-aware claim instead of the plain one.
    pub fn has_flow(&self) -> bool {
        self.tenant.is_some() || self.concurrency.is_some() || self.rate.is_some()
    }

    /// The job object this becomes once stored.
    pub fn to_job(&self) -> Job {
        Job {
            id: self.id,
            task: self.task.clone(),
            kind: self.kind,
            executor: self.executor,
            status: JobStatus::Queued,
            args: self.args.clone(),
            result: None,
            error: None,
            priority: self.priority,
            attempt: 0,
            max_attempts: self.max_attempts,
            timeout_ms: self.timeout_ms,
            progress: 0.0,
            idempotency_key: self.idempotency_key.clone(),
            created_at: self.created_at,
            scheduled_at: self.scheduled_at,
            started_at: None,
            finished_at: None,
            timings: Timings {
                queued_ms: None,
                run_ms: None,
            },
            tenant: self.tenant.clone(),
            concurrency: self.concurrency.clone(),
            rate: self.rate.clone(),
            waiting_for: None,
            waiting_until: None,
            callback: self.callback_url.clone().map(Callback::pending),
            depends_on: Vec::new(),
            run_on_parent_failure: self.run_on_parent_failure,
            retried: 0,
            children: None,
            spec_hash: self.spec_hash.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_move_only_back_by_a_retry() {
        for from in JobStatus::ALL.into_iter().filter(|s| s.is_final()) {
            for to in JobStatus::ALL {
                let retry = from != JobStatus::Succeeded
                    && matches!(to, JobStatus::Queued | JobStatus::Waiting);
                assert_eq!(from.can_become(to), retry, "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn a_waiting_job_never_runs_straight_away() {
        assert!(!JobStatus::Waiting.can_become(JobStatus::Running));
        assert!(JobStatus::Waiting.can_become(JobStatus::Queued));
        assert!(JobStatus::Waiting.can_become(JobStatus::Cancelled));
    }

    #[test]
    fn after_parents_waits_queues_or_cancels() {
        use JobStatus::*;
        let (a, b) = (JobId::new(), JobId::new());
        assert_eq!(
            after_parents(false, &[(a, Some(Succeeded)), (b, Some(Running))]),
            AfterParents::Wait
        );
        assert_eq!(
            after_parents(false, &[(a, Some(Succeeded)), (b, None)]),
            AfterParents::Queue
        );
        match after_parents(false, &[(a, Some(Queued)), (b, Some(Failed))]) {
            AfterParents::Cancel(e) => {
                assert_eq!(e.kind, ErrorKind::DependencyFailed);
                assert!(e.message.contains(&b.to_string()), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        // run_on_parent_failure: waits for every parent to be final, whatever it became.
        assert_eq!(
            after_parents(true, &[(a, Some(Queued)), (b, Some(Failed))]),
            AfterParents::Wait
        );
        assert_eq!(
            after_parents(true, &[(a, Some(Cancelled)), (b, Some(Failed))]),
            AfterParents::Queue
        );
        assert_eq!(after_parents(false, &[]), AfterParents::Queue);
    }

    #[test]
    fn queued_cannot_finish_without_running() {
        assert!(!JobStatus::Queued.can_become(JobStatus::Succeeded));
        assert!(!JobStatus::Queued.can_become(JobStatus::Failed));
        assert!(JobStatus::Queued.can_become(JobStatus::Running));
    }

    #[test]
    fn ids_sort_by_creation() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a.to_string() < b.to_string());
    }
}
