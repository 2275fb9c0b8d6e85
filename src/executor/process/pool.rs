//! A pool of worker processes (the built-in workers, or one task program's): starting one and
//! hearing it is ready, taking a worker for a run and giving it back, replacing the dead, and
//! the supervisor that starts again, with backoff, those that failed to start.
//!
//! Each live worker has a keeper task (`keep`) that owns the process and reads its stdout:
//! it hands each answer to the run it names (by job id), so a worker can run several io jobs
//! at once, and it is the first to know when the worker dies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{mpsc, Notify, Semaphore};

use super::protocol::{line, result_of, FromWorker, Ready, Run, TaskDecl, ToWorker, PROTOCOL};
use super::{rss_bytes, Recycle, WorkerInfo};
use crate::task::{JobCtx, TaskError, TaskResult};

/// How long a new worker has to say it is ready before it counts as failing to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The wait before starting again a worker that failed to start: doubled after each failure,
/// up to `RETRY_MAX`, and back to `RETRY_MIN` once one starts.
pub(super) const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How long an io worker has to answer a `cancel` before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How a pool's workers are started.
pub(super) enum Launch {
    /// `<exe> worker`: this binary (or `--worker-exe`), running the built-in catalogue.
    Builtin { exe: PathBuf },
    /// A task program: `sh -c <command>`, in a process group of its own, so that a kill
    /// reaches the program and not only the shell that started it.
    Program { command: String },
}

/// What a run hears from its worker.
enum Event {
    Progress(f64),
    Done(TaskResult),
}

/// A live worker process, shared by the runs it serves and its keeper.
pub(super) struct Worker {
    /// The worker's own pid (as its `ready` said; for a program, not the shell's).
    pub(super) pid: u32,
    /// A tokio Mutex, held across the write: lines from concurrent runs must not interleave.
    stdin: tokio::sync::Mutex<ChildStdin>,
    /// The runs waiting for an answer, by job id. A std Mutex: held for an insert or a remove.
    pending: Mutex<HashMap<String, mpsc::UnboundedSender<Event>>>,
    /// Tells the keeper to kill the process. `notify_one` keeps the signal if the keeper is
    /// not waiting at that moment.
    kill: Notify,
}

impl Worker {
    async fn send(&self, message: &ToWorker) -> std::io::Result<()> {
        let line = line(message);
        let mut stdin = self.stdin.lock().await;
        stdin.write_all(&line).await?;
        stdin.flush().await
    }

    /// Hands an answer to the run it names; answers for runs no longer waiting (cancelled)
    /// are dropped.
    fn deliver(&self, message: FromWorker) {
        let Some(id) = message.id().map(str::to_string) else {
            return;
        };
        let mut pending = self.pending.lock().expect("pending lock");
        if let FromWorker::Progress { value, .. } = message {
            if let Some(tx) = pending.get(&id) {
                let _ = tx.send(Event::Progress(value));
            }
        } else if let (Some(tx), Some(result)) = (pending.remove(&id), result_of(message)) {
            let _ = tx.send(Event::Done(result));
        }
    }
}

/// A live worker's place in the pool.
struct Slot {
    worker: Arc<Worker>,
    /// Runs it has now.
    in_flight: usize,
    /// Taken whole (a cpu run): no other run is given to it.
    exclusive: bool,
    jobs_done: u64,
}

pub(super) struct Inner {
    /// The task program's command; `None` for the built-in workers.
    pub(super) program: Option<String>,
    launch: Launch,
    data_dir: PathBuf,
    /// Workers the pool keeps.
    pub(super) capacity: usize,
    /// Runs one worker takes at once (its `ready` says; 1 for the built-in workers).
    pub(super) concurrency: usize,
    /// The tasks every worker of the pool must declare (those of the first).
    pub(super) tasks: Vec<TaskDecl>,
    recycle: Recycle,
    /// Cores for cpu work, shared with the rayon lane: a cpu run holds one per process it
    /// keeps busy, so the lanes together never run more cpu work than there are cores.
    pub(super) budget: Arc<Semaphore>,
    /// The live workers (said ready, not known dead), by pid. A std Mutex: never held
    /// across an await.
    slots: Mutex<HashMap<u32, Slot>>,
    /// Signalled (all waiters) whenever a run gives a worker back or a worker joins.
    returned: Notify,
    /// Workers the pool lacks because starting them failed; the supervisor starts them again.
    missing: AtomicUsize,
    /// The supervisor's next wait before starting them, in ms.
    retry_ms: AtomicU64,
    /// Wakes the supervisor. An Arc of its own: the supervisor holds it, and only a weak
    /// reference to the pool, so that dropping the lane ends it.
    wake: Arc<Notify>,
}

/// A started worker that has said ready, not yet in a pool.
pub(super) struct Started {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    pub(super) ready: Ready,
}

impl Started {
    /// Kills a worker that will not join a pool: its process group (a program's) and itself.
    pub(super) fn abandon(mut self) {
        if let Some(pgid) = self.child.id() {
            crate::shm::kill_process_group(pgid);
        }
        let _ = self.child.start_kill();
    }
}

/// How to start a pool: its workers, their number, and what they must declare.
pub(super) struct PoolSpec {
    pub(super) program: Option<String>,
    pub(super) launch: Launch,
    pub(super) data_dir: PathBuf,
    pub(super) capacity: usize,
    pub(super) recycle: Recycle,
    pub(super) budget: Arc<Semaphore>,
}

impl Inner {
    /// A pool whose workers declare what `first` declared (it joins at once), and its
    /// supervisor.
    pub(super) fn new(spec: PoolSpec, first: Option<Started>) -> Arc<Inner> {
        let wake = Arc::new(Notify::new());
        let (concurrency, tasks) = first.as_ref().map_or((1, Vec::new()), |s| {
            (s.ready.concurrency, s.ready.tasks.clone())
        });
        let inner = Arc::new(Inner {
            program: spec.program,
            launch: spec.launch,
            data_dir: spec.data_dir,
            capacity: spec.capacity,
            concurrency,
            tasks,
            recycle: spec.recycle,
            budget: spec.budget,
            slots: Mutex::default(),
            returned: Notify::new(),
            missing: AtomicUsize::new(0),
            retry_ms: AtomicU64::new(RETRY_MIN.as_millis() as u64),
            wake: wake.clone(),
        });
        if let Some(first) = first {
            inner.adopt(first);
        }
        tokio::spawn(supervise(Arc::downgrade(&inner), wake));
        inner
    }

    /// Starts workers until the pool has `capacity`, and waits for their handshakes. Fails
    /// only if a process cannot be started at all (the executable is missing); workers that
    /// start and then fail are left to the supervisor.
    pub(super) async fn fill(self: &Arc<Self>) -> std::io::Result<()> {
        let children = (self.live()..self.capacity)
            .map(|_| self.spawn())
            .collect::<std::io::Result<Vec<Child>>>()?;
        let started = futures_util::future::join_all(children.into_iter().map(handshake)).await;
        for s in started {
            match s {
                Ok(s) => self.adopt(s),
                Err(e) => self.start_failed(e),
            }
        }
        Ok(())
    }

    pub(super) fn live(&self) -> usize {
        self.slots.lock().expect("slots lock").len()
    }

    pub(super) fn pids(&self) -> Vec<u32> {
        self.slots
            .lock()
            .expect("slots lock")
            .keys()
            .copied()
            .collect()
    }

    pub(super) fn info(&self) -> Vec<WorkerInfo> {
        self.slots
            .lock()
            .expect("slots lock")
            .values()
            .map(|s| WorkerInfo {
                pid: s.worker.pid,
                state: if s.in_flight > 0 { "busy" } else { "idle" },
                jobs_done: s.jobs_done,
                rss_bytes: 0,
                program: self.program.clone(),
                running: s.in_flight,
            })
            .collect()
    }

    pub(super) fn spawn(&self) -> std::io::Result<Child> {
        spawn_child(&self.launch, self.program.as_deref(), &self.data_dir)
    }

    /// A worker that said ready joins the pool, if it declares what the pool serves.
    fn adopt(self: &Arc<Self>, s: Started) {
        if s.ready.tasks != self.tasks {
            let why = format!(
                "worker {} declared other tasks than the program's first worker",
                s.ready.pid
            );
            s.abandon();
            self.start_failed(why);
            return;
        }
        let group = matches!(self.launch, Launch::Program { .. });
        let pid = match s.ready.pid {
            0 => s.child.id().unwrap_or(0),
            pid => pid,
        };
        let worker = Arc::new(Worker {
            pid,
            stdin: tokio::sync::Mutex::new(s.stdin),
            pending: Mutex::default(),
            kill: Notify::new(),
        });
        self.slots.lock().expect("slots lock").insert(
            pid,
            Slot {
                worker: worker.clone(),
                in_flight: 0,
                exclusive: false,
                jobs_done: 0,
            },
        );
        tokio::spawn(keep(Arc::downgrade(self), worker, s.child, s.stdout, group));
        self.retry_ms
            .store(RETRY_MIN.as_millis() as u64, Ordering::Relaxed);
        metrics::gauge!("offload_workers_live").set(self.live() as f64);
        self.returned.notify_waiters();
    }

    /// A worker could not be started: the supervisor tries again after its backoff.
    fn start_failed(&self, why: String) {
        metrics::counter!("offload_worker_start_failures_total").increment(1);
        let missing = self.missing.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::error!(error = %why, program = self.program.as_deref(), missing,
            live = self.live(), "a worker process failed to start; retrying");
        self.wake.notify_one();
    }

    /// Starts a worker; it joins the pool once it says ready. A failure, now or at its
    /// handshake, leaves it to the supervisor.
    fn launch(self: &Arc<Self>) {
        match self.spawn() {
            Err(e) => self.start_failed(e.to_string()),
            Ok(child) => {
                let inner = self.clone();
                tokio::spawn(async move {
                    match handshake(child).await {
                        Ok(s) => inner.adopt(s),
                        Err(e) => inner.start_failed(e),
                    }
                });
            }
        }
    }

    /// Takes worker `pid` out of the pool and starts its replacement, once: whoever sees it
    /// gone first (a kill, its keeper) does it. Returns whether it was still in the pool.
    fn retire(self: &Arc<Self>, pid: u32, reason: &'static str) -> bool {
        let gone = self.slots.lock().expect("slots lock").remove(&pid);
        let Some(slot) = gone else { return false };
        metrics::counter!("offload_worker_restarts_total", "reason" => reason).increment(1);
        metrics::gauge!("offload_workers_live").set(self.live() as f64);
        tracing::debug!(
            pid,
            reason,
            program = self.program.as_deref(),
            "replacing a worker"
        );
        slot.worker.kill.notify_one();
        self.launch();
        true
    }

    /// Kills worker `pid` (SIGKILL, by its keeper) and starts a fresh one. The pool forgets
    /// it at once, so that `/v1/stats` and the next run never see it again.
    fn kill(self: &Arc<Self>, pid: u32, reason: &'static str) {
        self.retire(pid, reason);
    }

    /// Takes a worker for one run: all of one (`exclusive`, a cpu run) or one of its
    /// `concurrency` places (an io run). Waits for one to come back, or for the supervisor
    /// to start one if none is live.
    pub(super) async fn take(&self, exclusive: bool) -> Arc<Worker> {
        loop {
            let returned = self.returned.notified();
            if let Some(w) = self.try_take(exclusive) {
                return w;
            }
            returned.await;
        }
    }

    pub(super) fn try_take(&self, exclusive: bool) -> Option<Arc<Worker>> {
        let mut slots = self.slots.lock().expect("slots lock");
        let slot = if exclusive {
            slots.values_mut().find(|s| s.in_flight == 0)
        } else {
            // The least busy: io runs spread over the workers.
            slots
                .values_mut()
                .filter(|s| !s.exclusive && s.in_flight < self.concurrency)
                .min_by_key(|s| s.in_flight)
        }?;
        slot.in_flight += 1;
        slot.exclusive = exclusive;
        Some(slot.worker.clone())
    }

    /// A run gives its worker back. After a finished job (`done`) a worker past its job or
    /// memory allowance, with no other run, is replaced by a fresh one.
    fn release(self: &Arc<Self>, pid: u32, done: bool) {
        let worn_out = {
            let mut slots = self.slots.lock().expect("slots lock");
            let Some(s) = slots.get_mut(&pid) else { return };
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.exclusive = false;
            }
            if done {
                s.jobs_done += 1;
            }
            let recycle = self.recycle;
            done && s.in_flight == 0
                && ((recycle.max_jobs > 0 && s.jobs_done >= recycle.max_jobs)
                    || (recycle.max_rss_bytes > 0 && rss_bytes(pid) > recycle.max_rss_bytes))
        };
        if worn_out {
            tracing::debug!(pid, "recycling a worker");
            self.kill(pid, "recycled");
        }
        self.returned.notify_waiters();
    }
}

impl Drop for Inner {
    /// The lane is gone (the server stops): its workers go with it.
    fn drop(&mut self) {
        for slot in self.slots.get_mut().expect("slots lock").values() {
            slot.worker.kill.notify_one();
        }
    }
}

/// A worker's keeper: owns its process, hands each line it writes to the run it names, and,
/// when it dies (or must be killed), fails the runs it had as `crashed` and has it replaced.
async fn keep(
    pool: Weak<Inner>,
    worker: Arc<Worker>,
    mut child: Child,
    mut stdout: Lines<BufReader<ChildStdout>>,
    group: bool,
) {
    let pid = worker.pid;
    let reason = loop {
        // `next_line` is cancel-safe: a kill in between loses no line.
        let text = tokio::select! {
            text = stdout.next_line() => text,
            _ = worker.kill.notified() => break None,
        };
        match text {
            Ok(Some(text)) => match serde_json::from_str::<FromWorker>(&text) {
                Ok(message) => worker.deliver(message),
                Err(e) => {
                    tracing::error!(pid, error = %e, line = %text.chars().take(200).collect::<String>(),
                        "a worker wrote a line that is not a protocol message; killing it");
                    break Some("protocol");
                }
            },
            Ok(None) | Err(_) => break Some("crashed"),
        }
    };
    if group {
        if let Some(pgid) = child.id() {
            crate::shm::kill_process_group(pgid);
        }
    }
    let _ = child.start_kill();
    let status = child
        .wait()
        .await
        .map_or("unknown status".to_string(), |s| s.to_string());
    // First out of the pool (so no new run is given to it), then its runs fail.
    if let (Some(reason), Some(pool)) = (reason, pool.upgrade()) {
        if pool.retire(pid, reason) {
            tracing::warn!(pid, %status, program = pool.program.as_deref(),
                "a worker process died; replacing it");
        }
    }
    let runs: Vec<_> = worker
        .pending
        .lock()
        .expect("pending lock")
        .drain()
        .collect();
    for (_, tx) in runs {
        let why = match reason {
            Some("protocol") => format!("worker process {pid} broke the protocol ({status})"),
            _ => format!("worker process {pid} died ({status})"),
        };
        let _ = tx.send(Event::Done(Err(TaskError::Crashed(why))));
    }
}

/// The pool's supervisor: starts again, with backoff, workers that failed to start. Ends
/// when the lane is dropped. (Workers that die are replaced by their keepers.)
async fn supervise(pool: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let (missing, retry) = {
            let Some(inner) = pool.upgrade() else { return };
            let retry = Duration::from_millis(inner.retry_ms.load(Ordering::Relaxed));
            (inner.missing.load(Ordering::Acquire), retry)
        };
        if missing == 0 {
            // Woken by a failure; the timeout only notices that the pool is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await;
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
/// Built-in or program, it finds in its environment what docs/worker-protocol.md promises.
pub(super) fn spawn_child(
    launch: &Launch,
    program: Option<&str>,
    data_dir: &Path,
) -> std::io::Result<Child> {
    let parent = std::process::id().to_string();
    let mut command = match launch {
        Launch::Builtin { exe } => {
            let mut c = Command::new(exe);
            c.arg("worker")
                .arg("--data-dir")
                .arg(data_dir)
                .arg("--parent")
                .arg(&parent)
                .stderr(Stdio::inherit());
            c
        }
        Launch::Program { command } => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(command)
                .process_group(0)
                .stderr(Stdio::piped());
            c
        }
    };
    let mut child = command
        .env("OFFLOAD_PROTOCOL", PROTOCOL.to_string())
        .env("OFFLOAD_DATA_DIR", data_dir)
        .env("OFFLOAD_PARENT_PID", &parent)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let (Some(stderr), Some(program)) = (child.stderr.take(), program) {
        tokio::spawn(super::program::log_stderr(
            program.to_string(),
            child.id().unwrap_or(0),
            stderr,
        ));
    }
    Ok(child)
}

/// Waits for a new worker's `ready` line. A worker that exits first, answers something else,
/// speaks another protocol version or says nothing within `START_TIMEOUT` failed to start
/// (and is killed).
pub(super) async fn handshake(mut child: Child) -> Result<Started, String> {
    let pid = child.id().unwrap_or(0);
    let stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    let first = tokio::time::timeout(START_TIMEOUT, stdout.next_line()).await;
    let why = match first {
        Ok(Ok(Some(line))) => match serde_json::from_str::<FromWorker>(&line) {
            Ok(FromWorker::Ready(ready)) if ready.protocol != PROTOCOL => format!(
                "worker {pid} speaks protocol {}; this server speaks {PROTOCOL}",
                ready.protocol
            ),
            Ok(FromWorker::Ready(ready)) if ready.concurrency == 0 => {
                format!("worker {pid} said concurrency 0")
            }
            Ok(FromWorker::Ready(ready)) => {
                return Ok(Started {
                    child,
                    stdin,
                    stdout,
                    ready,
                })
            }
            _ => format!(
                "worker {pid} said {:?} instead of a ready message",
                line.chars().take(200).collect::<String>()
            ),
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
    if let Some(pgid) = child.id() {
        crate::shm::kill_process_group(pgid);
    }
    let _ = child.start_kill();
    Err(why)
}

/// A worker taken for one run. Dropped once the run has its answer, it gives the worker back.
/// Dropped before (a timeout, a cancel, a stop): an exclusive (cpu) worker is killed and
/// replaced; a shared (io) worker is sent `cancel` and has `CANCEL_GRACE` to answer before
/// it is killed.
pub(super) struct Lease {
    inner: Arc<Inner>,
    worker: Arc<Worker>,
    exclusive: bool,
    /// Whether a run was sent. A lease dropped before that (a job stopped while waiting for
    /// a core) gives its worker back untouched.
    used: bool,
    /// The run sent and not yet answered: its job id and where its answer comes.
    waiting: Option<(String, mpsc::UnboundedReceiver<Event>)>,
}

impl Lease {
    pub(super) fn new(inner: &Arc<Inner>, worker: Arc<Worker>, exclusive: bool) -> Self {
        Lease {
            inner: inner.clone(),
            worker,
            exclusive,
            used: false,
            waiting: None,
        }
    }

    /// Sends one run and waits for its answer, passing progress on to `ctx` (when given).
    pub(super) async fn call(&mut self, run: Run, ctx: Option<&JobCtx>) -> TaskResult {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = run.id.clone();
        self.worker
            .pending
            .lock()
            .expect("pending lock")
            .insert(id.clone(), tx);
        self.used = true;
        let (_, rx) = self.waiting.insert((id, rx));
        if let Err(e) = self.worker.send(&ToWorker::Run(run)).await {
            return Err(TaskError::Crashed(format!(
                "worker {} is gone: {e}",
                self.worker.pid
            )));
        }
        while let Some(event) = rx.recv().await {
            match event {
                Event::Progress(p) => {
                    if let Some(ctx) = ctx {
                        ctx.set_progress(p);
                    }
                }
                Event::Done(result) => {
                    self.waiting = None;
                    return result;
                }
            }
        }
        Err(TaskError::Crashed(format!(
            "worker {} went away",
            self.worker.pid
        )))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let pid = self.worker.pid;
        match self.waiting.take() {
            None => self.inner.release(pid, self.used),
            Some(_) if self.exclusive => self.inner.kill(pid, "killed"),
            Some((id, rx)) => {
                tokio::spawn(cancel_io(self.inner.clone(), self.worker.clone(), id, rx));
            }
        }
    }
}

/// Cancels one io run on a shared worker: `cancel`, then up to `CANCEL_GRACE` for its
/// answer (any answer: the run is over). A worker that does not answer is killed, and its
/// other runs fail as `crashed`.
async fn cancel_io(
    inner: Arc<Inner>,
    worker: Arc<Worker>,
    id: String,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    let sent = worker.send(&ToWorker::Cancel { id: id.clone() }).await;
    let answered = async {
        while let Some(event) = rx.recv().await {
            if let Event::Done(_) = event {
                return true;
            }
        }
        false
    };
    let answered = sent.is_ok()
        && tokio::time::timeout(CANCEL_GRACE, answered)
            .await
            .unwrap_or(false);
    if answered {
        inner.release(worker.pid, true);
    } else {
        worker.pending.lock().expect("pending lock").remove(&id);
        tracing::warn!(pid = worker.pid, job = %id, program = inner.program.as_deref(),
            "an io worker did not answer a cancel in time; killing it");
        inner.kill(worker.pid, "cancel_ignored");
    }
}
