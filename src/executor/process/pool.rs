//! The pool of worker processes: starting one and hearing it is ready, taking and giving
//! back, replacing the dead, and the supervisor that starts again, with backoff, those that
//! failed to start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Notify, Semaphore};

use super::protocol::{Answer, Request};
use super::{rss_bytes, Recycle, WorkerInfo};
use crate::task::{JobCtx, TaskError};

pub(super) struct Worker {
    pub(super) child: Child,
    pub(super) stdin: ChildStdin,
    pub(super) stdout: Lines<BufReader<ChildStdout>>,
    pub(super) pid: u32,
}

/// How long a new worker has to say it is ready before it counts as failing to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The wait before starting again a worker that failed to start: doubled after each failure,
/// up to `RETRY_MAX`, and back to `RETRY_MIN` once one starts.
pub(super) const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the supervisor looks for idle workers that died.
const IDLE_CHECK: Duration = Duration::from_millis(250);

pub(super) struct Inner {
    pub(super) exe: PathBuf,
    pub(super) data_dir: PathBuf,
    pub(super) capacity: usize,
    pub(super) recycle: Recycle,
    /// Cores for cpu work, shared with the rayon lane: a job holds one per process it keeps
    /// busy, so the two lanes together never run more cpu work than there are cores.
    pub(super) budget: Arc<Semaphore>,
    // std Mutexes: held for a push or a pop, never across an await.
    pub(super) idle: Mutex<Vec<Worker>>,
    /// Signalled whenever a worker goes back into `idle`.
    pub(super) returned: Notify,
    /// The live workers (idle or busy): started, and said ready.
    pub(super) info: Mutex<HashMap<u32, WorkerInfo>>,
    /// Workers the pool lacks because starting them failed; the supervisor starts them again.
    pub(super) missing: AtomicUsize,
    /// The supervisor's next wait before starting them, in ms.
    pub(super) retry_ms: AtomicU64,
    /// Wakes the supervisor. An Arc of its own: the supervisor holds it, and only a weak
    /// reference to the pool, so that dropping the lane ends it.
    pub(super) wake: Arc<Notify>,
}

impl Inner {
    pub(super) fn live(&self) -> usize {
        self.info.lock().expect("info lock").len()
    }

    pub(super) fn push_idle(&self, w: Worker) {
        self.idle.lock().expect("idle lock").push(w);
        self.returned.notify_one();
    }

    /// A worker that said ready joins the pool.
    pub(super) fn adopt(&self, w: Worker) {
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
    pub(super) fn start_failed(&self, e: std::io::Error) {
        metrics::counter!("offload_worker_start_failures_total").increment(1);
        let missing = self.missing.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::error!(error = %e, missing, live = self.live(),
            "a worker process failed to start; retrying");
        self.wake.notify_one();
    }

    /// Starts a worker; it joins the pool once it says ready. A failure, now or at its
    /// handshake, leaves it to the supervisor.
    pub(super) fn launch(self: &Arc<Self>) {
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
    pub(super) fn replace(self: &Arc<Self>, dead_pid: u32, reason: &'static str) {
        metrics::counter!("offload_worker_restarts_total", "reason" => reason).increment(1);
        self.info.lock().expect("info lock").remove(&dead_pid);
        metrics::gauge!("offload_workers_live").set(self.live() as f64);
        self.launch();
    }

    /// An idle worker that died (killed, out of memory) is replaced at once, not when the next
    /// job finds it dead.
    pub(super) fn replace_dead_idle(self: &Arc<Self>) {
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
    pub(super) async fn take(&self) -> Worker {
        loop {
            let returned = self.returned.notified();
            if let Some(w) = self.idle.lock().expect("idle lock").pop() {
                return w;
            }
            returned.await;
        }
    }

    pub(super) fn try_take(&self) -> Option<Worker> {
        self.idle.lock().expect("idle lock").pop()
    }

    pub(super) fn mark(&self, pid: u32, state: &'static str) {
        if let Some(i) = self.info.lock().expect("info lock").get_mut(&pid) {
            i.state = state;
        }
    }
}

/// The pool's supervisor: replaces idle workers that die, and starts again, with backoff,
/// workers that failed to start. Ends when the lane is dropped.
pub(super) async fn supervise(pool: Weak<Inner>, wake: Arc<Notify>) {
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
pub(super) fn spawn_child(exe: &Path, data_dir: &Path) -> std::io::Result<Child> {
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
pub(super) async fn handshake(mut child: Child) -> std::io::Result<Worker> {
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
pub(super) struct Lease {
    inner: Arc<Inner>,
    worker: Option<Worker>,
    /// Why the worker is replaced if the lease is dropped holding it.
    reason: &'static str,
    /// Whether a request was sent. A lease dropped before that (a job stopped while waiting
    /// for a core) gives its worker back untouched.
    used: bool,
}

impl Lease {
    pub(super) fn new(inner: &Arc<Inner>, worker: Worker) -> Self {
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
    pub(super) fn give_back(mut self) {
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
    pub(super) async fn call(
        &mut self,
        request: &Request,
        ctx: Option<&JobCtx>,
    ) -> Result<Answer, TaskError> {
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
