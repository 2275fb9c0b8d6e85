//! A pool of worker processes (the built-in workers, or one task program's): starting one and
//! hearing it is ready, taking a worker for a run and giving it back, replacing the dead, and
//! the supervisor that starts again, with backoff, those that failed to start.
//! (`start`: starting one; `keeper`: a live worker; `lease`: a run's hold on one.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::process::Child;
use tokio::sync::{Notify, Semaphore};

use super::keeper::{keep, write_lines, Worker};
use super::protocol::TaskDecl;
use super::start::{handshake, spawn_child, Launch, Started};
use super::{rss_bytes, Recycle, WorkerInfo};

/// The wait before starting again a worker that failed to start: doubled after each failure,
/// up to `RETRY_MAX`, and back to `RETRY_MIN` once one starts.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

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
    /// The live workers (said ready, not known dead), by their key (`Worker::key`, the
    /// server's, not the pid a worker says). A std Mutex: never held across an await.
    slots: Mutex<HashMap<u64, Slot>>,
    /// Signalled (all waiters) whenever a run gives a worker back or a worker joins.
    returned: Notify,
    /// Workers the pool lacks because starting them failed; the supervisor starts them again.
    missing: AtomicUsize,
    /// The supervisor's next wait before starting them, in ms.
    retry_ms: AtomicU64,
    /// The server stops: no worker is started any more.
    closed: AtomicBool,
    /// Wakes the supervisor. An Arc of its own: the supervisor holds it, and only a weak
    /// reference to the pool, so that dropping the lane ends it.
    wake: Arc<Notify>,
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
            closed: AtomicBool::new(false),
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
            .values()
            .map(|s| s.worker.pid)
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
        // The same tasks, in any order.
        let by_name = |tasks: &[TaskDecl]| {
            let mut tasks: Vec<TaskDecl> = tasks.to_vec();
            tasks.sort_by(|a, b| a.name.cmp(&b.name));
            tasks
        };
        if by_name(&s.ready.tasks) != by_name(&self.tasks) {
            let why = format!(
                "worker {} declared other tasks than the program's first worker",
                s.ready.pid
            );
            s.abandon();
            self.start_failed(why);
            return;
        }
        let group = matches!(self.launch, Launch::Program { .. });
        if self.closed.load(Ordering::Acquire) {
            s.abandon();
            return;
        }
        let pid = match s.ready.pid {
            0 => s.child.id().unwrap_or(0),
            pid => pid,
        };
        let (lines, queued) = tokio::sync::mpsc::unbounded_channel();
        let writer = tokio::spawn(write_lines(s.stdin, queued));
        static KEYS: AtomicU64 = AtomicU64::new(0);
        let key = KEYS.fetch_add(1, Ordering::Relaxed);
        let worker = Arc::new(Worker {
            key,
            pid,
            group: if group { s.child.id() } else { None },
            lines,
            pending: Mutex::default(),
            kill: Notify::new(),
        });
        self.slots.lock().expect("slots lock").insert(
            key,
            Slot {
                worker: worker.clone(),
                in_flight: 0,
                exclusive: false,
                jobs_done: 0,
            },
        );
        tokio::spawn(keep(
            Arc::downgrade(self),
            worker,
            s.child,
            s.stdout,
            writer,
            group,
        ));
        self.retry_ms
            .store(RETRY_MIN.as_millis() as u64, Ordering::Relaxed);
        metrics::gauge!("offload_workers_live").set(self.live() as f64);
        self.returned.notify_waiters();
    }

    /// A worker could not be started: the supervisor tries again after its backoff.
    fn start_failed(&self, why: String) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        metrics::counter!("offload_worker_start_failures_total").increment(1);
        let missing = self.missing.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::error!(error = %why, program = self.program.as_deref(), missing,
            live = self.live(), "a worker process failed to start; retrying");
        self.wake.notify_one();
    }

    /// Starts a worker; it joins the pool once it says ready. A failure, now or at its
    /// handshake, leaves it to the supervisor.
    fn launch(self: &Arc<Self>) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
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

    /// Takes worker `key` out of the pool and starts its replacement, once: whoever sees it
    /// gone first (a kill, its keeper) does it. Returns whether it was still in the pool.
    pub(super) fn retire(self: &Arc<Self>, key: u64, reason: &'static str) -> bool {
        let gone = self.slots.lock().expect("slots lock").remove(&key);
        let Some(slot) = gone else { return false };
        self.replace(slot, reason);
        true
    }

    /// A worker taken out of the pool is killed (by its keeper) and a fresh one started.
    fn replace(self: &Arc<Self>, slot: Slot, reason: &'static str) {
        let pid = slot.worker.pid;
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
    }

    /// Kills worker `key` (SIGKILL, by its keeper) and starts a fresh one. The pool forgets
    /// it at once, so that `/v1/stats` and the next run never see it again.
    pub(super) fn kill(self: &Arc<Self>, key: u64, reason: &'static str) {
        self.retire(key, reason);
    }

    /// Takes a worker for one run: all of one (`exclusive`, a cpu run) or one of its
    /// `concurrency` places (an io run). Waits for one to come back, or for the supervisor
    /// to start one if none is live.
    /// Never a worker that still has a run of job `job` (an earlier attempt being cancelled):
    /// answers name only the job.
    pub(super) async fn take(&self, exclusive: bool, job: &str) -> Arc<Worker> {
        loop {
            let returned = self.returned.notified();
            if let Some(w) = self.try_take(exclusive, job) {
                return w;
            }
            returned.await;
        }
    }

    pub(super) fn try_take(&self, exclusive: bool, job: &str) -> Option<Arc<Worker>> {
        let mut slots = self.slots.lock().expect("slots lock");
        // Lock order: slots, then a worker's pending.
        let free_of_job = |s: &Slot| {
            !s.worker
                .pending
                .lock()
                .expect("pending lock")
                .contains_key(job)
        };
        // Known limit: a cpu run needs a worker with no run at all, and io runs go to the
        // least busy worker; under a steady io load on a program with both kinds, no worker
        // may ever be idle, so its cpu jobs can wait indefinitely.
        let slot = if exclusive {
            slots
                .values_mut()
                .find(|s| s.in_flight == 0 && free_of_job(s))
        } else {
            // The least busy: io runs spread over the workers.
            slots
                .values_mut()
                .filter(|s| !s.exclusive && s.in_flight < self.concurrency && free_of_job(s))
                .min_by_key(|s| s.in_flight)
        }?;
        slot.in_flight += 1;
        slot.exclusive = exclusive;
        Some(slot.worker.clone())
    }

    /// A run gives its worker back. After a finished job (`done`) a worker past its job or
    /// memory allowance, with no other run, is replaced by a fresh one.
    pub(super) fn release(self: &Arc<Self>, key: u64, done: bool) {
        let worn_out = {
            let mut slots = self.slots.lock().expect("slots lock");
            let Some(s) = slots.get_mut(&key) else { return };
            let pid = s.worker.pid;
            s.in_flight = s.in_flight.saturating_sub(1);
            if s.in_flight == 0 {
                s.exclusive = false;
            }
            if done {
                s.jobs_done += 1;
            }
            let recycle = self.recycle;
            let worn_out = done
                && s.in_flight == 0
                && ((recycle.max_jobs > 0 && s.jobs_done >= recycle.max_jobs)
                    || (recycle.max_rss_bytes > 0 && rss_bytes(pid) > recycle.max_rss_bytes));
            // Out of the pool in the same critical section as the decision: no run can take
            // it in between and be killed with it.
            if worn_out {
                slots.remove(&key)
            } else {
                None
            }
        };
        if let Some(slot) = worn_out {
            tracing::debug!(key, "recycling a worker");
            self.replace(slot, "recycled");
        }
        self.returned.notify_waiters();
    }
}

impl Inner {
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The server stops: every worker is killed, its process group (a program's) at once,
    /// here, so that none outlives the server; none is started again.
    pub(super) fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        for slot in self.slots.lock().expect("slots lock").values() {
            if let Some(pgid) = slot.worker.group {
                crate::shm::kill_process_group(pgid);
            }
            slot.worker.kill.notify_one();
        }
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
