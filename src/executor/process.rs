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
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::Executor;
use crate::config::Settings;
use crate::job::ExecutorKind;
use crate::task::{JobCtx, Registry, Split, Task, TaskError, TaskResult};

#[derive(Serialize, Deserialize)]
struct Request {
    id: String,
    attempt: u32,
    task: String,
    args: Value,
    /// For split tasks: the element range [start, end) this worker computes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    part: Option<[u64; 2]>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Answer {
    /// Not an answer yet: the job's progress, sent while it runs.
    Progress(f64),
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
    inner: Arc<Inner>,
}

struct Inner {
    exe: PathBuf,
    data_dir: PathBuf,
    capacity: usize,
    recycle: Recycle,
    /// Cores for cpu work, shared with the rayon lane: a job holds one per process it keeps
    /// busy, so the two lanes together never run more cpu work than there are cores.
    budget: Arc<Semaphore>,
    // std Mutexes: held for a push or a pop, never across an await.
    idle: Mutex<Vec<Worker>>,
    /// Signalled whenever a worker goes back into `idle`.
    returned: Notify,
    info: Mutex<HashMap<u32, WorkerInfo>>,
}

impl ProcessLane {
    /// Starts `workers` worker processes from `exe` (the `offload` binary), and a watcher that
    /// replaces idle workers that die.
    pub fn start(
        exe: PathBuf,
        data_dir: PathBuf,
        workers: usize,
        recycle: Recycle,
        budget: Arc<Semaphore>,
    ) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            exe,
            data_dir,
            capacity: workers,
            recycle,
            budget,
            idle: Mutex::default(),
            returned: Notify::new(),
            info: Mutex::default(),
        });
        for _ in 0..workers {
            let w = inner.spawn()?;
            inner.idle.lock().expect("idle lock").push(w);
        }
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.replace_dead_idle();
            }
        });
        Ok(ProcessLane { inner })
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

impl Inner {
    fn spawn(&self) -> std::io::Result<Worker> {
        spawn_worker(&self.exe, &self.data_dir, &self.info)
    }

    fn push_idle(&self, w: Worker) {
        self.idle.lock().expect("idle lock").push(w);
        self.returned.notify_one();
    }

    /// Replaces a dead worker with a fresh one (or logs why it cannot).
    fn replace(&self, dead_pid: u32, reason: &'static str) {
        metrics::counter!("offload_worker_restarts_total", "reason" => reason).increment(1);
        self.info.lock().expect("info lock").remove(&dead_pid);
        match self.spawn() {
            Ok(fresh) => self.push_idle(fresh),
            Err(e) => tracing::error!(error = %e, "could not start a replacement worker"),
        }
    }

    /// An idle worker that died (killed, out of memory) is replaced at once, not when the next
    /// job finds it dead.
    fn replace_dead_idle(&self) {
        let dead: Vec<u32> = {
            let mut idle = self.idle.lock().expect("idle lock");
            let mut dead = Vec::new();
            idle.retain_mut(|w| match w.child.try_wait() {
                Ok(None) => true,
                _ => {
                    dead.push(w.pid);
                    false
                }
            });
            dead
        };
        for pid in dead {
            tracing::warn!(pid, "an idle worker process died; replacing it");
            self.replace(pid, "died_idle");
        }
    }

    /// Takes an idle worker, waiting for one to come back if all are busy.
    async fn take(&self) -> Worker {
        loop {
            let returned = self.returned.notified();
            if let Some(w) = self.idle.lock().expect("idle lock").pop() {
                return w;
            }
            returned.await;
        }
    }

    fn try_take(&self) -> Option<Worker> {
        self.idle.lock().expect("idle lock").pop()
    }

    fn mark(&self, pid: u32, state: &'static str) {
        if let Some(i) = self.info.lock().expect("info lock").get_mut(&pid) {
            i.state = state;
        }
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

/// A worker taken for one request. Given back when the request ends normally; if the job's
/// future is dropped instead (timeout, cancel) or the worker misbehaved, the worker is killed
/// and a fresh one takes its place.
struct Lease {
    inner: Arc<Inner>,
    worker: Option<Worker>,
    /// Why the worker is replaced if the lease is dropped holding it.
    reason: &'static str,
}

impl Lease {
    fn new(inner: &Arc<Inner>, worker: Worker) -> Self {
        inner.mark(worker.pid, "busy");
        Lease {
            inner: inner.clone(),
            worker: Some(worker),
            reason: "killed",
        }
    }

    /// Returns the worker to the pool, or, past its job or memory allowance, leaves it to
    /// `drop`, which kills it and starts a fresh one.
    fn give_back(mut self) {
        if let Some(w) = self.worker.take() {
            let recycle = self.inner.recycle;
            let done = {
                let mut info = self.inner.info.lock().expect("info lock");
                info.get_mut(&w.pid)
                    .map(|i| {
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
                self.reason = "recycled";
                self.worker = Some(w);
                return;
            }
            self.inner.push_idle(w);
        }
    }

    /// Sends one request and reads its answer, passing progress reports on to `ctx`
    /// (when given) as they come.
    async fn call(&mut self, request: &Request, ctx: Option<&JobCtx>) -> Result<Answer, TaskError> {
        let w = self
            .worker
            .as_mut()
            .expect("a lease holds a worker until given back");
        let mut line = serde_json::to_vec(request).expect("a request serializes");
        line.push(b'\n');
        if let Err(e) = w.stdin.write_all(&line).await {
            return Err(TaskError::Crashed(format!("worker {} is gone: {e}", w.pid)));
        }
        while let Ok(Some(text)) = w.stdout.next_line().await {
            match serde_json::from_str::<Answer>(&text) {
                Ok(Answer::Progress(p)) => {
                    if let Some(ctx) = ctx {
                        ctx.set_progress(p);
                    }
                }
                Ok(answer) => return Ok(answer),
                Err(e) => return Err(TaskError::Crashed(format!("worker answered garbage: {e}"))),
            }
        }
        // The pipe closed: the worker died mid-job.
        let pid = w.pid;
        let status = w.child.wait().await.ok();
        self.reason = "crashed";
        Err(TaskError::Crashed(format!(
            "worker process {pid} died ({})",
            status.map_or("unknown status".to_string(), |s| s.to_string())
        )))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(mut w) = self.worker.take() {
            let _ = w.child.start_kill();
            self.inner.replace(w.pid, self.reason);
        }
    }
}

fn answer_to_result(answer: Answer) -> TaskResult {
    match answer {
        Answer::Ok(v) => Ok(v),
        Answer::Permanent(m) => Err(TaskError::Permanent(m)),
        Answer::Transient(m) => Err(TaskError::Transient(m)),
        Answer::Crashed(m) => Err(TaskError::Crashed(m)),
        Answer::Progress(_) => Err(TaskError::Crashed(
            "a worker sent progress as its answer".into(),
        )),
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
        // Declared first, dropped last: slots are freed after the leases have replaced any
        // killed worker.
        let _permit = permit;
        let inner = &self.inner;
        let core = inner
            .budget
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TaskError::Crashed("the cpu budget is closed".into()))?;
        let mut leases = vec![Lease::new(inner, inner.take().await)];
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

fn write_line(out: &Mutex<std::io::Stdout>, answer: &Answer) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(answer).expect("an answer serializes");
    line.push(b'\n');
    let mut out = out.lock().expect("stdout lock");
    out.write_all(&line)?;
    out.flush()
}

/// A thread that reports a running job's progress to the server every 100 ms, when it moved.
struct ProgressReporter {
    done: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl ProgressReporter {
    fn start(ctx: JobCtx, out: Arc<Mutex<std::io::Stdout>>) -> Self {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let mut sent = 0.0;
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::park_timeout(std::time::Duration::from_millis(100));
                let p = ctx.progress();
                if p != sent && !flag.load(std::sync::atomic::Ordering::Acquire) {
                    sent = p;
                    if write_line(&out, &Answer::Progress(p)).is_err() {
                        return;
                    }
                }
            }
        });
        ProgressReporter { done, thread }
    }

    /// Stops the reporter before the answer is written, so no progress line follows it.
    fn stop(self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
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

/// What a worker answers for a task's result (or its panic).
fn answer_of(result: std::thread::Result<TaskResult>) -> Answer {
    match result {
        Ok(Ok(v)) => Answer::Ok(v),
        Ok(Err(TaskError::Permanent(m))) => Answer::Permanent(m),
        Ok(Err(TaskError::Transient(m))) | Ok(Err(TaskError::Crashed(m))) => Answer::Transient(m),
        Ok(Err(TaskError::Stopped)) => Answer::Transient("stopped".into()),
        Err(_) => Answer::Crashed("the task panicked in the worker".into()),
    }
}

/// The `offload worker` subcommand: runs jobs from stdin until stdin closes.
pub fn worker_main(data_dir: &Path, parent: u32) -> std::process::ExitCode {
    let log_format = match std::env::var("OFFLOAD_LOG_FORMAT").as_deref() {
        Ok("json") => crate::config::LogFormat::Json,
        _ => crate::config::LogFormat::Text,
    };
    if !crate::shm::die_with_parent(parent) {
        return std::process::ExitCode::FAILURE;
    }
    crate::telemetry::init_worker(log_format);
    // A worker is single-threaded: lowering this thread lowers the process.
    crate::shm::lower_thread_priority(super::rayon_lane::CPU_NICENESS);
    let settings = Settings::with_data_dir(data_dir);
    let registry = Registry::builtin(&settings);
    let stdin = std::io::stdin().lock();
    // Shared with the progress reporter thread: whole lines only, under the lock.
    let out = Arc::new(Mutex::new(std::io::stdout()));
    for line in stdin.lines() {
        let Ok(line) = line else { break };
        let answer = match serde_json::from_str::<Request>(&line) {
            Err(e) => Answer::Permanent(format!("bad request to worker: {e}")),
            Ok(Request {
                id,
                attempt,
                task,
                args,
                part: Some([start, end]),
            }) => match registry.get(&task).and_then(|t| t.split()) {
                None => Answer::Permanent(format!("task `{task}` does not split")),
                Some(split) => {
                    let ctx = JobCtx::new(id.parse().unwrap_or_default(), attempt);
                    answer_of(catch_unwind(AssertUnwindSafe(|| {
                        split.part(&ctx, &args, start as usize, end as usize)
                    })))
                }
            },
            Ok(req) => match registry.get(&req.task) {
                None => Answer::Permanent(format!("task `{}` is not in the worker", req.task)),
                Some(task) => {
                    let id = req.id.parse().unwrap_or_default();
                    let ctx = JobCtx::new(id, req.attempt);
                    // The job's span, carried across the process boundary by its id.
                    let span = tracing::info_span!("job", id = %req.id, task = %req.task,
                        attempt = req.attempt, worker = std::process::id());
                    let _enter = span.enter();
                    tracing::debug!("running in a worker process");
                    let reporter = ProgressReporter::start(ctx.clone(), out.clone());
                    let result = catch_unwind(AssertUnwindSafe(|| task.run_sync(&ctx, req.args)));
                    reporter.stop();
                    answer_of(result)
                }
            },
        };
        if write_line(&out, &answer).is_err() {
            break;
        }
    }
    std::process::ExitCode::SUCCESS
}
