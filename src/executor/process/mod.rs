//! The `process` lane: long-lived worker processes, for cpu jobs that ask to be isolated and
//! for arrays too large for the in-process pool.
//!
//! Starting workers: the server never calls `fork()` and goes on using the child (a forked
//! multi-threaded process may only make async-signal-safe calls). It re-executes its own binary
//! as the hidden `offload worker` subcommand (`Command::spawn`, which is fork+exec done
//! safely by std), so every worker starts from a clean single-threaded `main`.
//!
//! Talking to workers: one JSON line per request on the worker's stdin, one JSON line per
//! answer on its stdout. Only small messages cross the pipe: a job names its blob, and the
//! worker maps the blob file itself (`crate::shm`), sharing the page cache's pages with every
//! other reader.
//!
//! Faults: a timeout or a cancel kills the worker at once (SIGKILL) and starts a replacement; a
//! worker that dies mid-job fails the attempt as `crashed` (retried per `max_attempts`) and is
//! replaced too. Workers die with the server: they set PR_SET_PDEATHSIG and check their parent.
//!
//! Starting: a new worker is live once it has said so (a `ready` line on its stdout); until
//! then no job is given to it and `/v1/stats` does not list it. One that cannot be started
//! (the executable is gone, it exits at once, it never says ready) is started again by the
//! pool's supervisor, 100 ms later, then 200 ms, doubling up to 5 s, for as long as it takes.
//! Meanwhile the lane runs on the workers it has, and a job waits for a live one.
//!
//! Here: the lane (a job's run, split jobs). `pool`: the workers, their start, lease and
//! replacement, and the supervisor. `protocol`: the lines exchanged. `worker`: the worker
//! side.

mod pool;
mod protocol;
mod worker;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::process::Child;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::Executor;
use crate::job::ExecutorKind;
use crate::task::{JobCtx, Split, Task, TaskError, TaskResult};
use pool::{handshake, spawn_child, supervise, Inner, Lease, RETRY_MIN};
use protocol::{answer_to_result, Request};
pub use worker::{run_worker_if_asked, worker_main};

/// A worker's figures for `/v1/stats`.
#[derive(Clone, Debug, Serialize)]
struct WorkerInfo {
    pid: u32,
    state: &'static str,
    jobs_done: u64,
    /// Resident set size, read from /proc when stats are asked for.
    rss_bytes: u64,
}

/// When a worker is replaced by a fresh one between jobs (0 = never).
#[derive(Clone, Copy, Debug, Default)]
pub struct Recycle {
    pub max_jobs: u64,
    pub max_rss_bytes: u64,
}

/// Resident size of a process, from /proc/<pid>/statm (pages × page size; 4 KiB pages assumed
/// when the page size cannot be read).
fn rss_bytes(pid: u32) -> u64 {
    let pages = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u64>().ok())
        })
        .unwrap_or(0);
    pages * crate::shm::page_size()
}

pub struct ProcessLane {
    inner: Arc<Inner>,
}

impl ProcessLane {
    /// Starts `workers` worker processes from `exe` (the `offload` binary) and waits until
    /// each has said it is ready, and starts the supervisor that replaces workers that die.
    /// Fails if `exe` cannot be run at all; workers that start but fail are retried by the
    /// supervisor, so the lane may begin short of workers (`live_capacity`).
    pub async fn start(
        exe: PathBuf,
        data_dir: PathBuf,
        workers: usize,
        recycle: Recycle,
        budget: Arc<Semaphore>,
    ) -> std::io::Result<Self> {
        let wake = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            exe,
            data_dir,
            capacity: workers,
            recycle,
            budget,
            idle: Mutex::default(),
            returned: Notify::new(),
            info: Mutex::default(),
            missing: AtomicUsize::new(0),
            retry_ms: AtomicU64::new(RETRY_MIN.as_millis() as u64),
            wake: wake.clone(),
        });
        let children = (0..workers)
            .map(|_| spawn_child(&inner.exe, &inner.data_dir))
            .collect::<std::io::Result<Vec<Child>>>()?;
        let started = futures_util::future::join_all(children.into_iter().map(handshake)).await;
        for worker in started {
            match worker {
                Ok(w) => inner.adopt(w),
                Err(e) => inner.start_failed(e),
            }
        }
        tokio::spawn(supervise(Arc::downgrade(&inner), wake));
        Ok(ProcessLane { inner })
    }

    /// How many workers are live now: `capacity` less those that died and are not yet
    /// replaced. The most jobs this lane can run at this moment.
    pub fn live_workers(&self) -> usize {
        self.inner.live()
    }

    /// Pids of the workers now alive (for tests and stats).
    pub fn pids(&self) -> Vec<u32> {
        self.inner
            .info
            .lock()
            .expect("info lock")
            .keys()
            .copied()
            .collect()
    }
}

#[async_trait]
impl Executor for ProcessLane {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Process
    }
    fn capacity(&self) -> usize {
        self.inner.capacity
    }
    fn live_capacity(&self) -> usize {
        self.inner.live()
    }
    fn workers(&self) -> Option<Value> {
        let mut list: Vec<WorkerInfo> = self
            .inner
            .info
            .lock()
            .expect("info lock")
            .values()
            .cloned()
            .collect();
        for w in &mut list {
            w.rss_bytes = rss_bytes(w.pid);
        }
        list.sort_by_key(|w| w.pid);
        Some(json!(list))
    }
    async fn run(
        &self,
        task: Arc<dyn Task>,
        ctx: JobCtx,
        args: Value,
        permit: OwnedSemaphorePermit,
    ) -> TaskResult {
        // Declared first, dropped last: slots are freed after the leases have started the
        // replacement of any killed worker.
        let _permit = permit;
        let inner = &self.inner;
        // A live worker first, then a core: a job that waits while the lane is short of
        // workers must not hold a core the rayon lane could use. Either wait ends on a stop.
        let worker = tokio::select! {
            w = inner.take() => w,
            _ = ctx.stopped() => return Err(TaskError::Stopped),
        };
        let mut leases = vec![Lease::new(inner, worker)];
        let core = tokio::select! {
            c = inner.budget.clone().acquire_owned() => {
                c.map_err(|_| TaskError::Crashed("the cpu budget is closed".into()))?
            }
            _ = ctx.stopped() => return Err(TaskError::Stopped),
        };
        // A task that splits (`Task::split`) also takes every other idle worker that has a
        // free core.
        let split = task.split();
        let mut cores = vec![core];
        if split.is_some() {
            while let Ok(extra) = inner.budget.clone().try_acquire_owned() {
                match inner.try_take() {
                    Some(w) => {
                        leases.push(Lease::new(inner, w));
                        cores.push(extra);
                    }
                    None => break,
                }
            }
        }
        let work = async {
            if let (Some(split), 2..) = (split, leases.len()) {
                return run_split(split, task.name(), &ctx, args, &mut leases).await;
            }
            let request = Request {
                id: ctx.id.to_string(),
                attempt: ctx.attempt,
                task: task.name().to_string(),
                args,
                part: None,
            };
            let answer = leases[0].call(&request, Some(&ctx)).await?;
            let lease = leases.pop().expect("one lease");
            lease.give_back();
            answer_to_result(answer)
        };
        tokio::select! {
            r = work => r,
            // Kill at once on cancel or timeout: dropping the leases does it.
            _ = ctx.stopped() => Err(TaskError::Stopped),
        }
    }
}

/// Runs a split task as one range per leased worker, all reading the same input in place, and
/// merges the parts.
async fn run_split(
    split: &dyn Split,
    task: &str,
    ctx: &JobCtx,
    args: Value,
    leases: &mut Vec<Lease>,
) -> TaskResult {
    let n = split.units(&args)?;
    let k = leases.len();
    let requests: Vec<Request> = (0..k)
        .map(|i| Request {
            id: ctx.id.to_string(),
            attempt: ctx.attempt,
            task: task.to_string(),
            args: args.clone(),
            part: Some([(n * i / k) as u64, (n * (i + 1) / k) as u64]),
        })
        .collect();
    let answers = futures_util::future::join_all(
        leases
            .iter_mut()
            .zip(&requests)
            .map(|(lease, req)| lease.call(req, None)),
    )
    .await;
    let mut parts = Vec::with_capacity(k);
    for answer in answers {
        parts.push(answer_to_result(answer?)?);
    }
    for lease in leases.drain(..) {
        lease.give_back();
    }
    split.merge(parts)
}
