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

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::OwnedSemaphorePermit;

use super::Executor;
use crate::config::Settings;
use crate::job::ExecutorKind;
use crate::task::{JobCtx, Registry, Task, TaskError, TaskResult};

#[derive(Serialize, Deserialize)]
struct Request {
    id: String,
    attempt: u32,
    task: String,
    args: Value,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Answer {
    Ok(Value),
    Permanent(String),
    Transient(String),
    Crashed(String),
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    pid: u32,
}

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
    exe: PathBuf,
    data_dir: PathBuf,
    capacity: usize,
    recycle: Recycle,
    // std Mutexes: held for a push or a pop, never across an await.
    idle: Arc<Mutex<Vec<Worker>>>,
    info: Arc<Mutex<HashMap<u32, WorkerInfo>>>,
}

impl ProcessLane {
    /// Starts `workers` worker processes from `exe` (the `offload` binary).
    pub fn start(
        exe: PathBuf,
        data_dir: PathBuf,
        workers: usize,
        recycle: Recycle,
    ) -> std::io::Result<Self> {
        let lane = ProcessLane {
            exe,
            data_dir,
            capacity: workers,
            recycle,
            idle: Arc::default(),
            info: Arc::default(),
        };
        for _ in 0..workers {
            let w = lane.spawn()?;
            lane.idle.lock().expect("idle lock").push(w);
        }
        Ok(lane)
    }

    fn spawn(&self) -> std::io::Result<Worker> {
        spawn_worker(&self.exe, &self.data_dir, &self.info)
    }

    /// Pids of the workers now alive (for tests and stats).
    pub fn pids(&self) -> Vec<u32> {
        self.info
            .lock()
            .expect("info lock")
            .keys()
            .copied()
            .collect()
    }
}

fn spawn_worker(
    exe: &Path,
    data_dir: &Path,
    info: &Mutex<HashMap<u32, WorkerInfo>>,
) -> std::io::Result<Worker> {
    let mut child = Command::new(exe)
        .arg("worker")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--parent")
        .arg(std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or(0);
    let stdin = child.stdin.take().expect("stdin is piped");
    let stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    info.lock().expect("info lock").insert(
        pid,
        WorkerInfo {
            pid,
            state: "idle",
            jobs_done: 0,
            rss_bytes: 0,
        },
    );
    Ok(Worker {
        child,
        stdin,
        stdout,
        pid,
    })
}

/// A worker taken for one job. Given back when the job ends normally; if the job's future is
/// dropped instead (timeout, cancel) or the worker misbehaved, the worker is killed and a fresh
/// one takes its place.
struct Lease<'a> {
    lane: &'a ProcessLane,
    worker: Option<Worker>,
}

impl Lease<'_> {
    /// Returns the worker to the pool, or, past its job or memory allowance, leaves it to
    /// `drop`, which kills it and starts a fresh one.
    fn give_back(mut self) {
        if let Some(w) = self.worker.take() {
            let recycle = self.lane.recycle;
            let done = {
                let mut info = self.lane.info.lock().expect("info lock");
                let i = info.get_mut(&w.pid);
                i.map(|i| {
                    i.state = "idle";
                    i.jobs_done += 1;
                    i.jobs_done
                })
                .unwrap_or(0)
            };
            let worn_out = (recycle.max_jobs > 0 && done >= recycle.max_jobs)
                || (recycle.max_rss_bytes > 0 && rss_bytes(w.pid) > recycle.max_rss_bytes);
            if worn_out {
                tracing::debug!(pid = w.pid, jobs = done, "recycling a worker");
                self.worker = Some(w);
                return;
            }
            self.lane.idle.lock().expect("idle lock").push(w);
        }
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(mut w) = self.worker.take() {
            let _ = w.child.start_kill();
            self.lane.info.lock().expect("info lock").remove(&w.pid);
            match self.lane.spawn() {
                Ok(fresh) => self.lane.idle.lock().expect("idle lock").push(fresh),
                Err(e) => tracing::error!(error = %e, "could not start a replacement worker"),
            }
        }
    }
}

#[async_trait]
impl Executor for ProcessLane {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Process
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn workers(&self) -> Option<Value> {
        let mut list: Vec<WorkerInfo> = self
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
        // Declared first, dropped last: the slot is freed after the lease has replaced a
        // killed worker.
        let _permit = permit;
        let taken = self.idle.lock().expect("idle lock").pop();
        let worker = match taken {
            Some(w) => w,
            None => self
                .spawn()
                .map_err(|e| TaskError::Crashed(format!("cannot start a worker: {e}")))?,
        };
        if let Some(i) = self.info.lock().expect("info lock").get_mut(&worker.pid) {
            i.state = "busy";
        }
        let mut lease = Lease {
            lane: self,
            worker: Some(worker),
        };
        let w = lease.worker.as_mut().expect("just set");
        let request = Request {
            id: ctx.id.to_string(),
            attempt: ctx.attempt,
            task: task.name().to_string(),
            args,
        };
        let mut line = serde_json::to_vec(&request).expect("a request serializes");
        line.push(b'\n');
        if let Err(e) = w.stdin.write_all(&line).await {
            return Err(TaskError::Crashed(format!("worker {} is gone: {e}", w.pid)));
        }
        let answer = tokio::select! {
            line = w.stdout.next_line() => line,
            // Kill at once on cancel or timeout: dropping the lease does it.
            _ = ctx.stopped() => return Err(TaskError::Stopped),
        };
        match answer {
            Ok(Some(text)) => match serde_json::from_str::<Answer>(&text) {
                Ok(a) => {
                    lease.give_back();
                    match a {
                        Answer::Ok(v) => Ok(v),
                        Answer::Permanent(m) => Err(TaskError::Permanent(m)),
                        Answer::Transient(m) => Err(TaskError::Transient(m)),
                        Answer::Crashed(m) => Err(TaskError::Crashed(m)),
                    }
                }
                Err(e) => Err(TaskError::Crashed(format!("worker answered garbage: {e}"))),
            },
            _ => {
                let pid = w.pid;
                let status = w.child.wait().await.ok();
                Err(TaskError::Crashed(format!(
                    "worker process {pid} died ({})",
                    status.map_or("unknown status".to_string(), |s| s.to_string())
                )))
            }
        }
    }
}

/// For programs that embed the library: if this process was started as a worker
/// (`<exe> worker --data-dir D --parent P`), runs as one and returns its exit code. Call it
/// first thing in `main`; the process lane re-executes the program's own binary. Workers run
/// the built-in tasks.
pub fn run_worker_if_asked() -> Option<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("worker") {
        return None;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match (
        value("--data-dir"),
        value("--parent").and_then(|p| p.parse().ok()),
    ) {
        (Some(dir), Some(parent)) => Some(worker_main(Path::new(&dir), parent)),
        _ => Some(std::process::ExitCode::FAILURE),
    }
}

/// The `offload worker` subcommand: runs jobs from stdin until stdin closes.
pub fn worker_main(data_dir: &Path, parent: u32) -> std::process::ExitCode {
    if !crate::shm::die_with_parent(parent) {
        return std::process::ExitCode::FAILURE;
    }
    let settings = Settings::with_data_dir(data_dir);
    let registry = Registry::builtin(&settings);
    let stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lines() {
        let Ok(line) = line else { break };
        let answer = match serde_json::from_str::<Request>(&line) {
            Err(e) => Answer::Permanent(format!("bad request to worker: {e}")),
            Ok(req) => match registry.get(&req.task) {
                None => Answer::Permanent(format!("task `{}` is not in the worker", req.task)),
                Some(task) => {
                    let id = req.id.parse().unwrap_or_default();
                    let ctx = JobCtx::new(id, req.attempt);
                    match catch_unwind(AssertUnwindSafe(|| task.run_sync(&ctx, req.args))) {
                        Ok(Ok(v)) => Answer::Ok(v),
                        Ok(Err(TaskError::Permanent(m))) => Answer::Permanent(m),
                        Ok(Err(TaskError::Transient(m))) | Ok(Err(TaskError::Crashed(m))) => {
                            Answer::Transient(m)
                        }
                        Ok(Err(TaskError::Stopped)) => Answer::Transient("stopped".into()),
                        Err(_) => Answer::Crashed("the task panicked in the worker".into()),
                    }
                }
            },
        };
        let mut out = serde_json::to_vec(&answer).expect("an answer serializes");
        out.push(b'\n');
        if stdout.write_all(&out).and_then(|_| stdout.flush()).is_err() {
            break;
        }
    }
    std::process::ExitCode::SUCCESS
}
