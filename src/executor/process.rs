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

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

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
    /// Sent once, by a worker that has started and reads requests: its pid.
    Ready(u32),
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

/// How long a new worker has to say it is ready before it counts as failing to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The wait before starting again a worker that failed to start: doubled after each failure,
/// up to `RETRY_MAX`, and back to `RETRY_MIN` once one starts.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the supervisor looks for idle workers that died.
const IDLE_CHECK: Duration = Duration::from_millis(250);

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
    /// The live workers (idle or busy): started, and said ready.
    info: Mutex<HashMap<u32, WorkerInfo>>,
    /// Workers the pool lacks because starting them failed; the supervisor starts them again.
    missing: AtomicUsize,
    /// The supervisor's next wait before starting them, in ms.
    retry_ms: AtomicU64,
    /// Wakes the supervisor. An Arc of its own: the supervisor holds it, and only a weak
    /// reference to the pool, so that dropping the lane ends it.
    wake: Arc<Notify>,
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

impl Inner {
    fn live(&self) -> usize {
        self.info.lock().expect("info lock").len()
    }

    fn push_idle(&self, w: Worker) {
        self.idle.lock().expect("idle lock").push(w);
        self.returned.notify_one();
    }

    /// A worker that said ready joins the pool.
    fn adopt(&self, w: Worker) {
        self.info.lock().expect("info lock").insert(
            w.pid,
            WorkerInfo {
                pid: w.pid,
                state: "idle",
                jobs_done: 0,
                rss_bytes: 0,
            },
        );
        self.retry_ms
            .store(RETRY_MIN.as_millis() as u64, Ordering::Relaxed);
        metrics::gauge!("offload_workers_live").set(self.live() as f64);
        self.push_idle(w);
    }

    /// A worker could not be started: the supervisor tries again after its backoff.
    fn start_failed(&self, e: std::io::Error) {
        metrics::counter!("offload_worker_start_failures_total").increment(1);
        let missing = self.missing.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::error!(error = %e, missing, live = self.live(),
            "a worker process failed to start; retrying");
        self.wake.notify_one();
    }

    /// Starts a worker; it joins the pool once it says ready. A failure, now or at its
    /// handshake, leaves it to the supervisor.
    fn launch(self: &Arc<Self>) {
        match spawn_child(&self.exe, &self.data_dir) {
            Err(e) => self.start_failed(e),
            Ok(child) => {
                let inner = self.clone();
                tokio::spawn(async move {
                    match handshake(child).await {
                        Ok(w) => inner.adopt(w),
                        Err(e) => inner.start_failed(e),
                    }
                });
            }
        }
    }

    /// Replaces a dead worker with a fresh one.
    fn replace(self: &Arc<Self>, dead_pid: u32, reason: &'static str) {
        metrics::counter!("offload_worker_restarts_total", "reason" => reason).increment(1);
        self.info.lock().expect("info lock").remove(&dead_pid);
        metrics::gauge!("offload_workers_live").set(self.live() as f64);
        self.launch();
    }

    /// An idle worker that died (killed, out of memory) is replaced at once, not when the next
    /// job finds it dead.
    fn replace_dead_idle(self: &Arc<Self>) {
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

    /// Takes an idle worker, waiting for one to come back if all are busy, or for the
    /// supervisor to start one if none is live.
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

/// The pool's supervisor: replaces idle workers that die, and starts again, with backoff,
/// workers that failed to start. Ends when the lane is dropped.
async fn supervise(pool: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let (missing, retry) = {
            let Some(inner) = pool.upgrade() else { return };
            inner.replace_dead_idle();
            let retry = Duration::from_millis(inner.retry_ms.load(Ordering::Relaxed));
            (inner.missing.load(Ordering::Acquire), retry)
        };
        if missing == 0 {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(IDLE_CHECK) => {}
            }
            continue;
        }
        tracing::warn!(
            missing,
            retry_in_ms = retry.as_millis() as u64,
            "the process lane is short of workers"
        );
        tokio::time::sleep(retry).await;
        let Some(inner) = pool.upgrade() else { return };
        // Doubled now; `adopt` sets it back once a worker starts.
        inner.retry_ms.store(
            (retry * 2).min(RETRY_MAX).as_millis() as u64,
            Ordering::Relaxed,
        );
        for _ in 0..inner.missing.swap(0, Ordering::AcqRel) {
            inner.launch();
        }
    }
}

/// Starts a worker process. It is not a [`Worker`] until [`handshake`] has heard from it.
fn spawn_child(exe: &Path, data_dir: &Path) -> std::io::Result<Child> {
    Command::new(exe)
        .arg("worker")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--parent")
        .arg(std::process::id().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
}

/// Waits for a new worker's `ready` line. A worker that exits first, answers something else
/// or says nothing within `START_TIMEOUT` failed to start (and is killed).
async fn handshake(mut child: Child) -> std::io::Result<Worker> {
    let pid = child.id().unwrap_or(0);
    let stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let first = tokio::time::timeout(START_TIMEOUT, stdout.next_line()).await;
    let why = match first {
        Ok(Ok(Some(line))) => match serde_json::from_str::<Answer>(&line) {
            Ok(Answer::Ready(_)) => {
                return Ok(Worker {
                    child,
                    stdin,
                    stdout,
                    pid,
                })
            }
            _ => format!("worker {pid} said {line:?} instead of ready"),
        },
        Ok(Ok(None)) => {
            let status = child.wait().await;
            format!(
                "worker {pid} exited before it was ready ({})",
                status.map_or("unknown status".to_string(), |s| s.to_string())
            )
        }
        Ok(Err(e)) => format!("reading worker {pid}: {e}"),
        Err(_) => format!(
            "worker {pid} was not ready within {} s",
            START_TIMEOUT.as_secs()
        ),
    };
    let _ = child.start_kill();
    Err(std::io::Error::other(why))
}

/// A worker taken for one request. Given back when the request ends normally; if the job's
/// future is dropped instead (timeout, cancel) or the worker misbehaved, the worker is killed
/// and a fresh one takes its place.
struct Lease {
    inner: Arc<Inner>,
    worker: Option<Worker>,
    /// Why the worker is replaced if the lease is dropped holding it.
    reason: &'static str,
    /// Whether a request was sent. A lease dropped before that (a job stopped while waiting
    /// for a core) gives its worker back untouched.
    used: bool,
}

impl Lease {
    fn new(inner: &Arc<Inner>, worker: Worker) -> Self {
        inner.mark(worker.pid, "busy");
        Lease {
            inner: inner.clone(),
            worker: Some(worker),
            reason: "killed",
            used: false,
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
        self.used = true;
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
            if !self.used {
                self.inner.mark(w.pid, "idle");
                self.inner.push_idle(w);
                return;
            }
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
        Answer::Progress(_) | Answer::Ready(_) => Err(TaskError::Crashed(
            "a worker sent progress or ready as its answer".into(),
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
    // Until this line the server gives this worker no job.
    if write_line(&out, &Answer::Ready(std::process::id())).is_err() {
        return std::process::ExitCode::FAILURE;
    }
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
