//! The dispatcher: admission, the lanes' claim loops, attempts, cancel, maintenance, drain.
//!
//! **The store is the queue.** A lane with room claims due jobs from the store ([`claim`]);
//! the store's notices (the SQLite writer after each commit, PostgreSQL's LISTEN/NOTIFY) only
//! wake it sooner. Nothing queued lives only in memory, and everything that must follow a
//! commit (waking lanes, reaching a cancelled attempt) is done by the store's notices or by a
//! task of its own, never by a request handler's future, which the HTTP server drops when
//! its client hangs up.
//!
//! - [`route`]: which lane runs a job, decided once at submit.
//! - [`claim`]: a lane's loop: wait for room, claim, start attempts.
//! - [`attempt`]: one attempt: blobs, run, timeout, cancel, and writing its outcome.
//! - [`retry`]: the backoff between attempts, and for the server's own failed writes.
//! - [`maintenance`]: leases (renewal, rescue), counts, the servers list, pruning, the sweep
//!   of waiting jobs.
//! - [`blobs`]: blobs across servers: fetching a copy from the origin, removing copies.
//! - [`callbacks`]: the delivery task of completion callbacks (claims due outbox rows).

mod attempt;
mod blobs;
mod callbacks;
mod claim;
mod maintenance;
mod retry;
mod route;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{watch, Notify, Semaphore};

use crate::blob::BlobDir;
use crate::callback::CallbackOptions;
use crate::clock::Micros;
use crate::events::Events;
use crate::executor::Executor;
use crate::job::{AttemptEnd, ExecutorKind, Job, JobId, JobStatus, NewJob};
use crate::store::{
    CancelOutcome, Expiry, Inserted, JobStore, ListFilter, Notice, RetryOutcome, Settle, StoreError,
};
use crate::task::{JobCtx, Registry, StopReason};

pub use blobs::BlobFetchError;
pub use retry::RetryPolicy;
pub use route::{route, RouteHints};

/// Most jobs one lane claims in one store write.
const CLAIM_BATCH: usize = 256;
/// How long a cancel that found no attempt is remembered, for an attempt whose claim
/// committed before the cancel but that registers after the cancel's notice arrived.
const CANCEL_MEMORY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the {lane} lane has {queued} queued jobs, its limit; retry later")]
    QueueFull { lane: &'static str, queued: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many jobs a lane has queued in the store, as far as this server knows: recounted from
/// the store on every heartbeat (and every second on a shared store), kept up to date in
/// between by what this server adds and takes and by the counts other servers' submits
/// announce. Used for admission (a bound per lane, over the whole database) and `/v1/stats`.
#[derive(Default)]
struct Admission {
    queued: i64,
    /// Slots promised to submits whose insert is still committing.
    reserved: usize,
}

struct Lane {
    executor: Arc<dyn Executor>,
    slots: Arc<Semaphore>,
    // A std Mutex: every critical section is a little arithmetic, never an await.
    admission: Mutex<Admission>,
    wake: Notify,
    running: AtomicUsize,
    /// Slots held by a claim in flight.
    claiming: AtomicUsize,
    succeeded: AtomicU64,
    failed: AtomicU64,
}

impl Lane {
    /// Adds to the queued count. Not clamped: a claim may count its jobs out before the
    /// submit that stored them counts them in, and the two must cancel out.
    fn count_queued(&self, delta: i64) {
        self.admission.lock().expect("admission lock").queued += delta;
    }
}

/// An attempt in progress.
struct Running {
    ctx: JobCtx,
    /// The job as claimed, for progress events and a drain's release.
    job: Arc<Job>,
    /// The progress last published (f64 bits).
    published: AtomicU64,
}

/// The attempts running here, and cancels that arrived before their attempt registered.
#[derive(Default)]
struct Attempts {
    live: HashMap<JobId, Running>,
    cancelled: HashMap<JobId, Instant>,
}

/// A lane's figures for `/v1/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct LaneStats {
    pub capacity: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<serde_json::Value>,
    pub running: usize,
    pub queued: usize,
    pub succeeded: u64,
    pub failed: u64,
}

pub struct Dispatcher {
    store: Arc<dyn JobStore>,
    registry: Arc<Registry>,
    events: Arc<Events>,
    lanes: HashMap<ExecutorKind, Lane>,
    // A std Mutex: held for map operations only, never across an await.
    attempts: Mutex<Attempts>,
    idle: Notify,
    retry: RetryPolicy,
    max_queued: usize,
    draining: AtomicBool,
    stop_lanes: watch::Sender<bool>,
    /// Where output blobs are adopted (tasks that write one).
    blobs: Option<BlobDir>,
    /// This server's name on the leases it holds.
    node: String,
    lease: Duration,
    api_token: Option<String>,
    /// For fetching blobs from other servers.
    http: reqwest::Client,
    /// Wakes the schedule ticker (`crate::schedule::ticker`) when schedules change.
    schedule_wake: Arc<Notify>,
    /// Where other servers reach this one.
    address: Option<String>,
    /// How completion callbacks are sent; `None` (no secret): none are.
    callbacks: Option<CallbackOptions>,
    /// Wakes the callback delivery task when a job with a callback became final here.
    callback_wake: Arc<Notify>,
    /// Where the sweep of waiting jobs goes on from (`maintenance::sweep_waiting`). A std
    /// Mutex: read and written around one store call, never held across it.
    sweep_after: Mutex<Option<JobId>>,
}

/// How the dispatcher behaves, from the settings.
pub struct DispatchOptions {
    pub retry: RetryPolicy,
    /// Queued jobs per lane before submits are refused (429).
    pub max_queued: usize,
    /// Where output blobs are adopted.
    pub blobs: Option<BlobDir>,
    /// How long a running job's lease lasts without renewal.
    pub lease: Duration,
    /// The API token, for fetching a blob from the server that holds it.
    pub api_token: Option<String>,
    /// Where other servers reach this one (its advertised URL), for the servers list.
    pub address: Option<String>,
    /// How completion callbacks are sent; `None`: none are, and specs may not ask for them.
    pub callbacks: Option<CallbackOptions>,
}

/// Admission slots taken for a submit; given back when dropped.
struct Reservation {
    dispatcher: Arc<Dispatcher>,
    counts: Vec<(ExecutorKind, usize)>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        for (kind, n) in &self.counts {
            if let Some(lane) = self.dispatcher.lanes.get(kind) {
                lane.admission.lock().expect("admission lock").reserved -= n;
            }
        }
    }
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn JobStore>,
        registry: Arc<Registry>,
        events: Arc<Events>,
        executors: Vec<Arc<dyn Executor>>,
        options: DispatchOptions,
    ) -> Arc<Self> {
        let DispatchOptions {
            retry,
            max_queued,
            blobs,
            lease,
            api_token,
            address,
            callbacks,
        } = options;
        let lanes = executors
            .into_iter()
            .map(|executor| {
                let lane = Lane {
                    slots: Arc::new(Semaphore::new(executor.capacity())),
                    executor,
                    admission: Mutex::default(),
                    wake: Notify::new(),
                    running: AtomicUsize::new(0),
                    claiming: AtomicUsize::new(0),
                    succeeded: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                };
                (lane.executor.kind(), lane)
            })
            .collect();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Arc::new(Dispatcher {
            store,
            registry,
            events,
            lanes,
            attempts: Mutex::default(),
            idle: Notify::new(),
            retry,
            max_queued,
            draining: AtomicBool::new(false),
            stop_lanes: watch::channel(false).0,
            blobs,
            node: uuid::Uuid::now_v7().simple().to_string(),
            lease,
            api_token,
            http,
            schedule_wake: Arc::new(Notify::new()),
            address,
            callbacks,
            callback_wake: Arc::new(Notify::new()),
            sweep_after: Mutex::new(None),
        })
    }

    /// Listens to the store, rescues what a dead process left running (at once on an
    /// exclusive store; a shared store waits for the leases to run out), and starts the lanes
    /// and maintenance.
    pub async fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        let mut notices = self.store.listen().await?;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                let Some(this) = weak.upgrade() else { return };
                this.on_notice(notice).await;
            }
        });
        if self.store.exclusive() {
            let (requeued, lost) = self.rescue(Expiry::All, &HashSet::new()).await?;
            if requeued + lost > 0 {
                tracing::warn!(
                    requeued,
                    lost,
                    "jobs were running when the previous server stopped"
                );
            }
        }
        if self.store.exclusive() {
            // The servers listed are earlier processes of this one.
            self.store.forget_servers(Duration::ZERO).await?;
        }
        self.store.beat(&self.server_beat()).await?;
        // On an exclusive store, a crash cannot have left work half done (a parent's final
        // state and its children's moves commit together), but the sweep costs little once.
        if self.store.exclusive() {
            self.sweep_waiting().await?;
        }
        self.recount().await?;
        for &kind in self.lanes.keys() {
            let this = self.clone();
            tokio::spawn(async move { this.lane_loop(kind).await });
        }
        self.spawn_heartbeat();
        self.spawn_recount();
        self.spawn_tidy();
        self.spawn_progress_ticker();
        self.spawn_callbacks();
        tracing::info!(node = %self.node, exclusive = self.store.exclusive(), "lanes started");
        Ok(())
    }

    async fn on_notice(&self, notice: Notice) {
        match notice {
            Notice::New { lane: kind, added } => {
                if let Some(lane) = self.lanes.get(&kind) {
                    // Jobs another server queued: counted here at once, so admission and
                    // `/v1/stats` see the whole database's queue before the next recount.
                    if added > 0 {
                        lane.count_queued(added as i64);
                    }
                    lane.wake.notify_one();
                }
            }
            Notice::Cancel(id) => self.stop_attempt(id, None, StopReason::Cancelled),
            // A permit is kept if the ticker is busy: it looks again when it is done.
            Notice::Schedules => self.schedule_wake.notify_one(),
            Notice::Changed(ids) => {
                // Jobs another server moved, or a cascade moved (children of a job that
                // became final or was retried, here or elsewhere): wake this server's
                // long-polls and streams that follow them, and the stream of every change,
                // with their rows (one query).
                let watched = self.events.watched_of(ids);
                if watched.is_empty() {
                    return;
                }
                match self.store.get_many(&watched).await {
                    Ok(mut jobs) => {
                        jobs.sort_by_key(|j| j.id);
                        for job in &jobs {
                            self.events.publish(job);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading jobs another server changed failed")
                    }
                }
            }
            // Copies fetched from the blob's origin (or the origin's own file).
            Notice::BlobsDeleted(ids) => self.remove_blob_files(&ids).await,
        }
    }

    /// Stops the attempt of job `id` running here (only attempt `attempt`, if given). A cancel
    /// of the job itself (`attempt` not given: the job is `cancelled` for good) that finds no
    /// attempt is remembered for a while: its attempt may be about to register. A stop aimed
    /// at one attempt is never remembered: the job's next attempt must run.
    fn stop_attempt(&self, id: JobId, attempt: Option<u32>, reason: StopReason) {
        let mut attempts = self.attempts.lock().expect("attempts lock");
        match attempts.live.get(&id) {
            Some(r) if attempt.is_none_or(|a| a == r.ctx.attempt) => r.ctx.stop(reason),
            Some(_) => {}
            None if reason == StopReason::Cancelled && attempt.is_none() => {
                let now = Instant::now();
                if attempts.cancelled.len() >= 1024 {
                    attempts
                        .cancelled
                        .retain(|_, at| now.duration_since(*at) < CANCEL_MEMORY);
                }
                attempts.cancelled.insert(id, now);
            }
            None => {}
        }
    }

    /// Registers a claimed attempt, so cancels, progress and drains reach it. A cancel that
    /// arrived first stops it at once.
    ///
    /// An older attempt of the same job may still be running here: its lease ran out (renewals
    /// failed for a while), another server rescued the job, and this server claimed it again
    /// before its next renewal said the old attempt was gone. The store refuses that attempt's
    /// outcome (its attempt number is stale), so it is stopped now and the new attempt takes
    /// its place: the old one's unregister and stops, which name their attempt, cannot touch
    /// the new one.
    fn register(&self, job: &Job) -> JobCtx {
        let ctx = JobCtx::new(job.id, job.attempt);
        let mut attempts = self.attempts.lock().expect("attempts lock");
        let running = Running {
            ctx: ctx.clone(),
            job: Arc::new(job.clone()),
            published: AtomicU64::new(0f64.to_bits()),
        };
        match attempts.live.insert(job.id, running) {
            Some(old) if old.ctx.attempt < job.attempt => {
                tracing::warn!(job = %job.id, old = old.ctx.attempt, new = job.attempt,
                    "a newer attempt of a job still running here was claimed; stopping the old one");
                old.ctx.stop(StopReason::Cancelled);
            }
            // Never expected (attempts only grow), but a newer attempt must stay the one known.
            Some(newer) if newer.ctx.attempt > job.attempt => {
                ctx.stop(StopReason::Cancelled);
                attempts.live.insert(job.id, newer);
                return ctx;
            }
            _ => {}
        }
        if attempts.cancelled.remove(&job.id).is_some() {
            ctx.stop(StopReason::Cancelled);
        }
        ctx
    }

    /// Forgets a finished attempt (if it is still the registered one).
    fn unregister(&self, ctx: &JobCtx) {
        let mut attempts = self.attempts.lock().expect("attempts lock");
        if attempts
            .live
            .get(&ctx.id)
            .is_some_and(|r| r.ctx.attempt == ctx.attempt)
        {
            attempts.live.remove(&ctx.id);
        }
        if attempts.live.is_empty() {
            self.idle.notify_waiters();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// This server's id: the owner on its leases, its row in the servers list.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn has_lane(&self, kind: ExecutorKind) -> bool {
        self.lanes.contains_key(&kind)
    }

    fn reserve(self: &Arc<Self>, jobs: &[NewJob]) -> Result<Reservation, SubmitError> {
        let mut wanted: Vec<(ExecutorKind, usize)> = Vec::new();
        for job in jobs {
            match wanted.iter_mut().find(|(k, _)| *k == job.executor) {
                Some((_, n)) => *n += 1,
                None => wanted.push((job.executor, 1)),
            }
        }
        let mut reservation = Reservation {
            dispatcher: self.clone(),
            counts: Vec::with_capacity(wanted.len()),
        };
        for (kind, n) in wanted {
            let lane = self.lanes.get(&kind).ok_or_else(|| {
                SubmitError::Store(StoreError::Corrupt(format!("no {} lane", kind.as_str())))
            })?;
            let mut a = lane.admission.lock().expect("admission lock");
            let queued = a.queued.max(0) as usize + a.reserved;
            if queued + n > self.max_queued {
                return Err(SubmitError::QueueFull {
                    lane: kind.as_str(),
                    queued,
                });
            }
            a.reserved += n;
            reservation.counts.push((kind, n));
        }
        Ok(reservation)
    }

    /// Stores jobs (all or nothing). Answers once they are committed; the lanes hear of them
    /// from the store.
    pub async fn submit(self: &Arc<Self>, jobs: Vec<NewJob>) -> Result<Vec<Inserted>, SubmitError> {
        if self.is_draining() {
            return Err(SubmitError::ShuttingDown);
        }
        let reservation = self.reserve(&jobs)?;
        let this = self.clone();
        // What follows the commit runs in a task of its own: a client that hangs up drops
        // this future, never the bookkeeping of a job that is already stored.
        let done = tokio::spawn(async move {
            let inserted = this.store.insert(jobs).await?;
            for job in inserted.iter().filter_map(|i| match i {
                Inserted::Created(j) => Some(j),
                Inserted::Existing(_) => None,
            }) {
                if job.status == JobStatus::Queued {
                    if let Some(lane) = this.lanes.get(&job.executor) {
                        lane.count_queued(1);
                    }
                }
                this.events.publish(job);
            }
            drop(reservation);
            Ok::<_, StoreError>(inserted)
        });
        Ok(done
            .await
            .map_err(|e| StoreError::Corrupt(e.to_string()))??)
    }

    /// Cancels a queued or running job. The store's cancel notice stops the attempt wherever
    /// it runs; here, the attempt is also stopped at once if it runs on this server.
    pub async fn cancel(self: &Arc<Self>, id: JobId) -> Result<CancelOutcome, StoreError> {
        let this = self.clone();
        // Its own task, as for submits: the steps after the commit must not depend on the
        // client staying connected.
        let done = tokio::spawn(async move {
            let outcome = this.store.cancel(id, Micros::now()).await?;
            if let CancelOutcome::Cancelled { job, was } = &outcome {
                this.cancelled(job, *was);
            }
            Ok(outcome)
        });
        done.await.map_err(|e| StoreError::Corrupt(e.to_string()))?
    }

    /// Cancels up to `filter.limit` unfinished jobs that match `filter` (with one of
    /// `statuses`), as [`Dispatcher::cancel`] does one.
    pub async fn cancel_matching(
        self: &Arc<Self>,
        filter: ListFilter,
        statuses: Vec<JobStatus>,
    ) -> Result<Vec<Job>, StoreError> {
        let this = self.clone();
        let done = tokio::spawn(async move {
            let cancelled = this
                .store
                .cancel_matching(&filter, &statuses, Micros::now())
                .await?;
            let mut out = Vec::with_capacity(cancelled.len());
            for (job, was) in cancelled {
                this.cancelled(&job, was);
                out.push(job);
            }
            Ok(out)
        });
        done.await.map_err(|e| StoreError::Corrupt(e.to_string()))?
    }

    /// The bookkeeping after a cancel: counts, the attempt stopped, watchers told.
    fn cancelled(&self, job: &Job, was: JobStatus) {
        match was {
            JobStatus::Queued => {
                if let Some(lane) = self.lanes.get(&job.executor) {
                    lane.count_queued(-1);
                }
            }
            JobStatus::Running => self.stop_attempt(job.id, None, StopReason::Cancelled),
            _ => {}
        }
        self.callback_owed(job);
        self.events.publish(job);
    }

    /// Retries a failed or cancelled job ([`JobStore::retry`]).
    pub async fn retry(self: &Arc<Self>, id: JobId) -> Result<RetryOutcome, StoreError> {
        let this = self.clone();
        let done = tokio::spawn(async move {
            let outcome = this.store.retry(id, Micros::now()).await?;
            if let RetryOutcome::Retried(job) = &outcome {
                this.retried(job);
            }
            Ok(outcome)
        });
        done.await.map_err(|e| StoreError::Corrupt(e.to_string()))?
    }

    /// Retries up to `filter.limit` jobs that match `filter` (with one of `statuses`).
    pub async fn retry_matching(
        self: &Arc<Self>,
        filter: ListFilter,
        statuses: Vec<JobStatus>,
    ) -> Result<Vec<Job>, StoreError> {
        let this = self.clone();
        let done = tokio::spawn(async move {
            let jobs = this
                .store
                .retry_matching(&filter, &statuses, Micros::now())
                .await?;
            for job in &jobs {
                this.retried(job);
            }
            Ok(jobs)
        });
        done.await.map_err(|e| StoreError::Corrupt(e.to_string()))?
    }

    fn retried(&self, job: &Job) {
        if job.status == JobStatus::Queued {
            if let Some(lane) = self.lanes.get(&job.executor) {
                lane.count_queued(1);
            }
        }
        self.events.publish(job);
    }

    /// The live progress of a running attempt, if it is running here.
    pub fn live_progress(&self, id: JobId) -> Option<f64> {
        self.attempts
            .lock()
            .expect("attempts lock")
            .live
            .get(&id)
            .map(|r| r.ctx.progress())
    }

    fn spawn_progress_ticker(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(this) => this.publish_progress(),
                    None => return,
                }
            }
        });
    }

    /// Publishes the progress of running jobs that someone watches, if it moved since the
    /// last tick. Progress lives in memory (an atomic the task writes); only watchers pay for
    /// turning it into events.
    pub fn publish_progress(&self) {
        let snapshots: Vec<Job> = {
            let attempts = self.attempts.lock().expect("attempts lock");
            attempts
                .live
                .iter()
                .filter(|(id, _)| self.events.is_watched(**id))
                .filter_map(|(_, r)| {
                    let now = r.ctx.progress();
                    let before = f64::from_bits(r.published.swap(now.to_bits(), Ordering::Relaxed));
                    (now != before).then(|| {
                        let mut job = (*r.job).clone();
                        job.progress = now;
                        job
                    })
                })
                .collect()
        };
        for job in &snapshots {
            self.events.publish(job);
        }
    }

    /// The async-lane jobs running now, as `task(id)`: the suspects when the runtime stalls.
    pub fn running_async(&self) -> Vec<String> {
        self.attempts
            .lock()
            .expect("attempts lock")
            .live
            .iter()
            .filter(|(_, r)| r.job.executor == ExecutorKind::Async)
            .map(|(id, r)| format!("{}({id})", r.job.task))
            .collect()
    }

    pub fn stats(&self) -> Vec<(ExecutorKind, LaneStats)> {
        let mut out: Vec<_> = self
            .lanes
            .iter()
            .map(|(&kind, lane)| {
                let queued = lane.admission.lock().expect("admission lock").queued.max(0) as usize
                    + lane.claiming.load(Ordering::Relaxed);
                (
                    kind,
                    LaneStats {
                        capacity: lane.executor.capacity(),
                        workers: lane.executor.workers(),
                        running: lane.running.load(Ordering::Relaxed),
                        queued,
                        succeeded: lane.succeeded.load(Ordering::Relaxed),
                        failed: lane.failed.load(Ordering::Relaxed),
                    },
                )
            })
            .collect();
        out.sort_by_key(|(k, _)| k.index());
        out
    }

    /// Stops claiming jobs, gives running ones up to `timeout` to finish, then hands the rest
    /// back to the queue (without using up their attempt) and stops them. Safe to call twice.
    pub async fn drain(&self, timeout: Duration) {
        self.draining.store(true, Ordering::Release);
        self.stop_lanes.send_replace(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let idle = self.idle.notified();
            // Busy while an attempt runs, and while a claim is in flight (its jobs are about
            // to start; they must finish or be handed back too).
            let busy = !self.attempts.lock().expect("attempts lock").live.is_empty()
                || self.lanes.values().any(|l| {
                    l.running.load(Ordering::Acquire) > 0 || l.claiming.load(Ordering::Acquire) > 0
                });
            if !busy {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            // Woken when the last attempt ends; the short sleep covers a claim finishing.
            tokio::select! {
                _ = idle => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let left: Vec<(Arc<Job>, JobCtx)> = self
            .attempts
            .lock()
            .expect("attempts lock")
            .live
            .values()
            .map(|r| (r.job.clone(), r.ctx.clone()))
            .collect();
        tracing::warn!(
            count = left.len(),
            "drain timed out; unfinished jobs go back to the queue"
        );
        let now = Micros::now();
        let moves: Vec<Settle> = left
            .iter()
            .filter_map(|(job, ctx)| {
                ctx.stop(StopReason::Shutdown);
                let next = crate::job::next_state(job, AttemptEnd::Drained, Duration::ZERO, now)?;
                Some(Settle {
                    job: (**job).clone(),
                    next,
                    progress: ctx.progress(),
                    now,
                    expired_before: None,
                })
            })
            .collect();
        match self.store.settle(moves).await {
            Ok(jobs) => {
                for job in jobs.iter().flatten() {
                    self.events.publish(job);
                }
            }
            // Start-up recovery finds them running and requeues them.
            Err(e) => tracing::error!(error = %e, "could not hand unfinished jobs back"),
        }
    }

    /// After the drain: each lane ends what would outlive the server (worker processes).
    pub fn shutdown_lanes(&self) {
        for lane in self.lanes.values() {
            lane.executor.shutdown();
        }
    }

    /// Accounts for jobs stored by another part of this server (a schedule's ticks): the
    /// lanes' queued counts and whoever watches.
    pub fn stored(&self, jobs: &[Job]) {
        for job in jobs {
            if let Some(lane) = self.lanes.get(&job.executor) {
                lane.count_queued(1);
            }
            self.events.publish(job);
        }
    }

    /// Notified when the store announces a schedule change.
    pub fn schedule_wake(&self) -> Arc<Notify> {
        self.schedule_wake.clone()
    }

    /// Turns `true` when the server starts to drain: whatever makes new jobs stops.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop_lanes.subscribe()
    }

    /// The address rules a spec's `callback_url` must pass; `None` when this server sends no
    /// callbacks (no secret), which refuses every `callback_url`.
    pub fn callback_rules(&self) -> Option<Arc<crate::task::AddressRules>> {
        self.callbacks.as_ref().map(|c| c.rules.clone())
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }
}
