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
//! Task programs (`--task-program`) are pools of their own in the same lane: each program's
//! workers declare its tasks at their handshake, and every job of those tasks runs there (a
//! cpu task takes a whole worker, an io task one of its `concurrency` places).
//!
//! Here: the lane (a job's run, split jobs). `pool`: a pool's workers, taking and giving back,
//! replacement, and the supervisor. `start`: starting a worker and its handshake. `keeper`: a
//! live worker, whose keeper task reads its answers and sees it die. `lease`: a run's hold on
//! a worker, and what a cancel does to it. `protocol`: the lines exchanged (docs/worker-protocol.md).
//! `program`: task programs and their tasks. `worker`: the built-in worker side.

mod keeper;
mod lease;
mod pool;
mod program;
mod protocol;
mod start;
mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Executor;
use crate::job::{ExecutorKind, Kind};
use crate::task::{JobCtx, Split, Task, TaskError, TaskResult};
use lease::Lease;
use pool::{Inner, PoolSpec};
pub use program::{ProgramError, ProgramTask};
use protocol::Run;
pub use protocol::TaskDecl;
use start::Launch;
pub use worker::{run_worker_if_asked, worker_main};

/// A worker's figures for `/v1/stats`.
#[derive(Clone, Debug, Serialize)]
struct WorkerInfo {
    pid: u32,
    state: &'static str,
    jobs_done: u64,
    /// Resident set size, read from /proc when stats are asked for.
    rss_bytes: u64,
    /// The task program it runs; absent for built-in workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    program: Option<String>,
    /// Runs it has now (more than one only for io tasks of a program).
    running: usize,
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

/// What the process lane starts: its built-in workers and its task programs.
pub struct LaneSpec {
    /// The `offload` binary the built-in workers run as `offload worker`.
    pub exe: PathBuf,
    pub data_dir: PathBuf,
    pub workers: usize,
    pub recycle: Recycle,
    /// Task programs (shell commands), each with `program_workers` workers.
    pub programs: Vec<String>,
    pub program_workers: usize,
}

pub struct ProcessLane {
    builtin: Arc<Inner>,
    /// Each task program's pool, with its command, in the order given: a task name taken
    /// twice is blamed on the later program.
    programs: Vec<(String, Arc<Inner>)>,
    data_dir: PathBuf,
}

impl ProcessLane {
    /// Starts the built-in workers and each task program's workers, waits until each has said
    /// it is ready, and starts the supervisors that replace workers that fail. Fails if the
    /// built-in worker cannot be run at all, or if a task program's first worker fails its
    /// handshake (a program that cannot serve stops the server at start). Other workers that
    /// fail are retried by the supervisors, so the lane may begin short of workers.
    pub async fn start(spec: LaneSpec, budget: Arc<Semaphore>) -> Result<Self, ProgramError> {
        let builtin = Inner::new(
            PoolSpec {
                program: None,
                launch: Launch::Builtin {
                    exe: spec.exe.clone(),
                },
                data_dir: spec.data_dir.clone(),
                capacity: spec.workers,
                recycle: spec.recycle,
                budget: budget.clone(),
            },
            None,
        );
        builtin.fill().await.map_err(ProgramError::Builtin)?;
        let mut programs = Vec::new();
        for command in &spec.programs {
            let pool = program::start(command, &spec, budget.clone()).await?;
            programs.push((command.clone(), pool));
        }
        Ok(ProcessLane {
            builtin,
            programs,
            data_dir: spec.data_dir,
        })
    }

    /// Every task the lane's programs serve, with the program that serves it.
    pub fn program_tasks(&self) -> Vec<ProgramTask> {
        self.programs
            .iter()
            .flat_map(|(command, pool)| {
                pool.tasks
                    .iter()
                    .map(|decl| ProgramTask::new(command.clone(), decl.clone()))
            })
            .collect()
    }

    fn pools(&self) -> impl Iterator<Item = &Arc<Inner>> {
        std::iter::once(&self.builtin).chain(self.programs.iter().map(|(_, pool)| pool))
    }

    /// How many built-in workers are live now.
    pub fn live_workers(&self) -> usize {
        self.builtin.live()
    }

    /// Pids of the workers now alive, built-in and programs' (for tests and stats).
    pub fn pids(&self) -> Vec<u32> {
        self.pools().flat_map(|p| p.pids()).collect()
    }
}

/// The paths of a run's blobs: `<data-dir>/blobs/<id>` for each blob argument.
fn blob_paths(task: &dyn Task, args: &Value, data_dir: &Path) -> BTreeMap<String, String> {
    task.blob_args()
        .iter()
        .filter_map(|name| {
            let id = args.get(*name)?.as_str()?;
            let path = data_dir.join("blobs").join(id);
            Some((name.to_string(), path.display().to_string()))
        })
        .collect()
}

#[async_trait]
impl Executor for ProcessLane {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Process
    }
    /// Built-in workers, plus each program's workers times the runs each takes at once.
    // Known limit: the dispatcher has one lane (one slot semaphore, one queue) for all the
    // pools here, built-in and programs'. Jobs waiting in `Inner::take` for a busy pool hold
    // lane slots, so a backlog for one program can starve the others' jobs of slots while
    // their workers sit idle.
    /// Saturating, and at most what a semaphore holds: it sizes the lane's slots.
    fn capacity(&self) -> usize {
        self.pools()
            .map(|p| p.capacity.saturating_mul(p.concurrency))
            .fold(0, usize::saturating_add)
            .min(Semaphore::MAX_PERMITS)
    }
    fn live_capacity(&self) -> usize {
        self.pools()
            .map(|p| p.live().saturating_mul(p.concurrency))
            .fold(0, usize::saturating_add)
            .min(Semaphore::MAX_PERMITS)
    }
    /// Kills every worker, with its process group (a program's): the task's children too.
    /// No worker is started again.
    fn shutdown(&self) {
        for pool in self.pools() {
            pool.shutdown();
        }
    }
    fn workers(&self) -> Option<Value> {
        let mut list: Vec<WorkerInfo> = self.pools().flat_map(|p| p.info()).collect();
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
        let (inner, exclusive) = match task.program() {
            None => (&self.builtin, true),
            Some(p) => match self.programs.iter().find(|(command, _)| command == p) {
                Some((_, pool)) => (pool, task.kinds()[0] == Kind::Cpu),
                None => {
                    return Err(TaskError::Permanent(format!(
                        "task program `{p}` is not running in this server"
                    )))
                }
            },
        };
        // A live worker first, then a core: a job that waits while the lane is short of
        // workers must not hold a core the rayon lane could use. Either wait ends on a stop.
        let job = ctx.id.to_string();
        let worker = tokio::select! {
            w = inner.take(exclusive, &job) => w,
            _ = ctx.stopped() => return Err(TaskError::Stopped),
        };
        let mut leases = vec![Lease::new(inner, worker, exclusive)];
        // Only cpu runs hold a core: an io run mostly waits.
        let mut cores = Vec::new();
        if exclusive {
            cores.push(tokio::select! {
                c = inner.budget.clone().acquire_owned() => {
                    c.map_err(|_| TaskError::Crashed("the cpu budget is closed".into()))?
                }
                _ = ctx.stopped() => return Err(TaskError::Stopped),
            });
        }
        // A task that splits (`Task::split`) also takes every other idle worker that has a
        // free core.
        let split = task.split();
        if split.is_some() {
            while let Ok(extra) = inner.budget.clone().try_acquire_owned() {
                match inner.try_take(true, &job) {
                    Some(w) => {
                        leases.push(Lease::new(inner, w, true));
                        cores.push(extra);
                    }
                    None => break,
                }
            }
        }
        let blobs = blob_paths(task.as_ref(), &args, &self.data_dir);
        let work = async {
            if let (Some(split), 2..) = (split, leases.len()) {
                return run_split(split, task.name(), &ctx, args, &mut leases).await;
            }
            let run = Run {
                id: ctx.id.to_string(),
                attempt: ctx.attempt,
                task: task.name().to_string(),
                args,
                blobs,
                part: None,
                parents: ctx.parents().cloned(),
            };
            leases[0].call(run, Some(&ctx)).await
        };
        tokio::select! {
            r = work => r,
            // Stop at once on cancel or timeout: dropping the leases kills the worker (cpu) or
            // cancels the run (io).
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
    leases: &mut [Lease],
) -> TaskResult {
    let n = split.units(&args)?;
    let k = leases.len();
    let runs = (0..k).map(|i| Run {
        id: ctx.id.to_string(),
        attempt: ctx.attempt,
        task: task.to_string(),
        args: args.clone(),
        blobs: BTreeMap::new(),
        part: Some([(n * i / k) as u64, (n * (i + 1) / k) as u64]),
        parents: ctx.parents().cloned(),
    });
    let answers = futures_util::future::join_all(
        leases
            .iter_mut()
            .zip(runs)
            .map(|(lease, run)| lease.call(run, None)),
    )
    .await;
    let mut parts = Vec::with_capacity(k);
    for answer in answers {
        parts.push(answer?);
    }
    split.merge(parts)
}
