//! Tasks: the `Task` trait, the registry, and the built-in catalogue.
//!
//! A task is a named piece of work with a JSON Schema for its args. It says which kinds it can
//! run as (`io`, `cpu`) and how its io form runs: by awaiting (the `async` lane) or by blocking
//! (the `blocking` lane). Its cpu form always runs synchronously on the rayon pool.
//!
//! Synchronous bodies must call [`JobCtx::check`] now and then (every few milliseconds of work):
//! that is how a timeout or a cancel stops rayon and blocking work, which cannot be preempted.

pub mod array;
mod builtin;
mod compute;
mod files;
mod net;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::Notify;

use crate::config::Settings;
use crate::job::{JobId, Kind};

pub use array::{ArraySort, ArrayStats, Partial};
pub use builtin::{BlockingSleep, Fail, Noop, Sleep, SumParents};
pub use compute::{count_primes, sum_squares, CountPrimes, SumSquares};
pub use files::FileSha256;
pub use net::{AddressError, AddressRules, HttpGet};

/// How a task's failure should be treated. The dispatcher retries `Transient` failures while
/// attempts remain; `Permanent` ones fail the job at once.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TaskError {
    /// Bad input or a refusal that a retry cannot fix.
    #[error("{0}")]
    Permanent(String),
    /// Something that may work next time.
    #[error("{0}")]
    Transient(String),
    /// The work saw its stop flag (a cancel, a timeout, a shutdown) and stopped.
    #[error("stopped: the job was cancelled or timed out")]
    Stopped,
    /// The work panicked (or its process died): retried like a transient failure.
    #[error("{0}")]
    Crashed(String),
}

pub type TaskResult = Result<Value, TaskError>;

/// How a task's io form runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoStyle {
    /// It awaits (sockets, timers): a task on the tokio runtime.
    Async,
    /// It blocks (std::fs, thread::sleep, a sync library): tokio's blocking pool.
    Blocking,
}

/// A unit of work the service knows how to run.
///
/// Implement [`Task::run_async`] for io tasks with [`IoStyle::Async`], and [`Task::run_sync`]
/// for blocking io tasks and for cpu tasks. A task that runs as both io and cpu (like `noop`)
/// implements both.
#[async_trait]
pub trait Task: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn description(&self) -> &str;
    /// The kinds it can run as; the first is its default.
    fn kinds(&self) -> &[Kind];
    /// How its io form runs.
    fn io_style(&self) -> IoStyle {
        IoStyle::Async
    }
    /// A JSON Schema (the subset in [`crate::schema`]) that its args must match.
    fn args_schema(&self) -> Value;
    /// Checks that a schema cannot express (an allowlist, a path). Runs at submit time, so a
    /// bad job is a 422 and is never stored.
    fn check_args(&self, _args: &Value) -> Result<(), String> {
        Ok(())
    }
    /// Names of args that hold blob ids. The server checks at submit that each names a stored
    /// blob (a 422 if not), and passes its size to [`Task::check_blob`].
    fn blob_args(&self) -> &[&str] {
        &[]
    }
    /// Checks an arg's blob against the other args (e.g. its size against the element type).
    fn check_blob(&self, _args: &Value, _size: u64) -> Result<(), String> {
        Ok(())
    }
    /// Whether the task writes an output blob (to `crate::blob::output_temp_path` for its job
    /// and attempt, returning `{"size", "sha256"}`); on success the dispatcher adopts the file
    /// as a new blob and adds its id to the result as `blob`.
    fn writes_blob(&self) -> bool {
        false
    }
    /// Whether the process lane may split a job of this task across several workers, and how.
    /// `None` (the default): one worker runs [`Task::run_sync`] on the whole job.
    fn split(&self) -> Option<&dyn Split> {
        None
    }
    /// The task program that serves this task (its command), for tasks a program declared;
    /// `None` for tasks of this binary. A program's tasks always run in its worker processes.
    fn program(&self) -> Option<&str> {
        None
    }
    /// The version a task program declared for it.
    fn version(&self) -> Option<&str> {
        None
    }
    /// Whether the task wants its parents' results (the jobs its job names in `depends_on`):
    /// then [`JobCtx::parents`] is `{parent id: result}` when it runs (`null` for a parent
    /// with no result: one that failed or was cancelled, for a job that runs on a parent's
    /// failure, or one deleted since).
    fn parent_results(&self) -> bool {
        false
    }
    /// The body of an async io task. Dropping the future stops it (timeout, cancel).
    async fn run_async(&self, _ctx: JobCtx, _args: Value) -> TaskResult {
        Err(TaskError::Permanent(format!(
            "task `{}` has no async body",
            self.name()
        )))
    }
    /// The body of a blocking io task or a cpu task. Call `ctx.check()?` regularly.
    fn run_sync(&self, _ctx: &JobCtx, _args: Value) -> TaskResult {
        Err(TaskError::Permanent(format!(
            "task `{}` has no synchronous body",
            self.name()
        )))
    }
}

/// How a task's job divides across worker processes: its work is `units` long, each worker
/// computes one range of it in its own process, and the server merges the parts. Worth it
/// when the parts read shared input in place (a mapped blob) and merge cheaply.
pub trait Split: Send + Sync {
    /// How many units of work the job has (an array's elements). Runs in the server.
    fn units(&self, args: &Value) -> Result<usize, TaskError>;
    /// Computes units `[start, end)`: one worker's share, in that worker's process. Its value
    /// is one of the parts that [`Split::merge`] is given.
    fn part(&self, ctx: &JobCtx, args: &Value, start: usize, end: usize) -> TaskResult;
    /// Merges the parts, in range order, into the job's result. Runs in the server.
    fn merge(&self, parts: Vec<Value>) -> TaskResult;
}

/// Why a running job was told to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    Cancelled = 1,
    TimedOut = 2,
    /// The server is shutting down and the job was handed back to the queue.
    Shutdown = 3,
}

/// What a running job can see of itself: its id and attempt, its stop flag, its progress.
/// Cheap to clone; all clones share the same flag.
#[derive(Clone)]
pub struct JobCtx {
    pub id: JobId,
    pub attempt: u32,
    shared: Arc<CtxShared>,
}

struct CtxShared {
    stop: AtomicU8,
    stopped: Notify,
    /// Progress in [0, 1] as f64 bits.
    progress: AtomicU64,
    /// `{parent id: result}`, for a task that asks for its parents' results.
    parents: std::sync::OnceLock<Value>,
}

impl JobCtx {
    pub fn new(id: JobId, attempt: u32) -> Self {
        JobCtx {
            id,
            attempt,
            shared: Arc::new(CtxShared {
                stop: AtomicU8::new(0),
                stopped: Notify::new(),
                progress: AtomicU64::new(0f64.to_bits()),
                parents: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The job's parents' results, `{parent id: result}`, if its task asked for them
    /// ([`Task::parent_results`]) and the job has parents.
    pub fn parents(&self) -> Option<&Value> {
        self.shared.parents.get()
    }

    /// Hands the job its parents' results (once; before it runs).
    pub fn set_parents(&self, results: Value) {
        let _ = self.shared.parents.set(results);
    }

    /// `Err(Stopped)` once the job has been cancelled or has timed out.
    pub fn check(&self) -> Result<(), TaskError> {
        if self.shared.stop.load(Ordering::Relaxed) != 0 {
            Err(TaskError::Stopped)
        } else {
            Ok(())
        }
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        match self.shared.stop.load(Ordering::Acquire) {
            1 => Some(StopReason::Cancelled),
            2 => Some(StopReason::TimedOut),
            3 => Some(StopReason::Shutdown),
            _ => None,
        }
    }

    /// Raises the stop flag (the first reason wins) and wakes whoever awaits it.
    pub fn stop(&self, reason: StopReason) {
        let _ =
            self.shared
                .stop
                .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire);
        self.shared.stopped.notify_waiters();
    }

    /// Resolves once [`JobCtx::stop`] has been called.
    pub async fn stopped(&self) {
        loop {
            let notified = self.shared.stopped.notified();
            if self.stop_reason().is_some() {
                return;
            }
            notified.await;
        }
    }

    /// Reports progress, clamped to [0, 1].
    pub fn set_progress(&self, fraction: f64) {
        let f = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.shared.progress.store(f.to_bits(), Ordering::Relaxed);
    }

    pub fn progress(&self) -> f64 {
        f64::from_bits(self.shared.progress.load(Ordering::Relaxed))
    }
}

/// The catalogue: every task the service can run, by name.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<String, Arc<dyn Task>>,
    /// Each task's args schema, built once (submits validate against it on the hot path).
    schemas: BTreeMap<String, Arc<Value>>,
}

impl Registry {
    pub fn empty() -> Self {
        Self::default()
    }

    /// The built-in catalogue, configured from the settings (allowlists, data dir).
    pub fn builtin(settings: &Settings) -> Self {
        let mut r = Registry::empty();
        r.register(Noop);
        r.register(Sleep);
        r.register(BlockingSleep);
        r.register(Fail);
        r.register(SumParents);
        r.register(SumSquares);
        r.register(CountPrimes);
        r.register(FileSha256::new(settings.data_dir.join("files")));
        r.register(HttpGet::new(settings));
        r.register(ArrayStats::new(settings.data_dir.join("blobs")));
        r.register(ArraySort::new(settings.data_dir.join("blobs")));
        r
    }

    /// Adds a task, replacing any task of the same name.
    pub fn register<T: Task>(&mut self, task: T) -> &mut Self {
        let name = task.name().to_string();
        self.schemas
            .insert(name.clone(), Arc::new(task.args_schema()));
        self.tasks.insert(name, Arc::new(task));
        self
    }

    /// The args schema of task `name`, as built when it was registered.
    pub fn schema(&self, name: &str) -> Option<&Value> {
        self.schemas.get(name).map(|s| s.as_ref())
    }

    /// Adds a task unless one of that name is there already; gives back the one there.
    pub fn try_register<T: Task>(&mut self, task: T) -> Result<&mut Self, Arc<dyn Task>> {
        match self.tasks.get(task.name()) {
            Some(there) => Err(there.clone()),
            None => Ok(self.register(task)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Task>> {
        self.tasks.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn Task>> {
        self.tasks.values()
    }

    pub fn names(&self) -> Vec<&str> {
        self.tasks.keys().map(String::as_str).collect()
    }
}

/// Reads a typed value out of args that already passed the schema.
pub(crate) use files::hex;

pub(crate) fn arg_u64(args: &Value, key: &str) -> Result<u64, TaskError> {
    args.get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| TaskError::Permanent(format!("`{key}` must be a non-negative integer")))
}

pub(crate) fn arg_str<'a>(args: &'a Value, key: &str) -> Result<&'a str, TaskError> {
    args.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| TaskError::Permanent(format!("`{key}` must be a string")))
}
