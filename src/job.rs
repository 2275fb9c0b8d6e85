//! The job: its identity, its states and the transitions between them, and the job object that
//! callers see.
//!
//! The life of a job (see `docs/state_machine.md`):
//!
//! ```text
//!             claim                succeed / fail (no attempts left)
//!   queued ─────────────▶ running ─────────────────────────────────▶ succeeded | failed
//!     ▲  │                  │  │
//!     │  │ cancel           │  └── cancel ──▶ cancelled
//!     │  ▼                  │
//!     │ cancelled           │ fail, time out or crash with attempts left (backoff),
//!     └─────────────────────┘ or the server stopped while it ran
//! ```
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
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
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
            (Queued, Running)       // a lane claimed it
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
                format!("unknown status `{s}`: use queued, running, succeeded, failed or cancelled")
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
            spec_hash: self.spec_hash.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_states_never_move() {
        for from in JobStatus::ALL.into_iter().filter(|s| s.is_final()) {
            for to in JobStatus::ALL {
                assert!(!from.can_become(to), "{from:?} -> {to:?}");
            }
        }
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
