//! The dispatcher: routing, admission, the in-memory queues, running attempts, retries,
//! timeouts, cancel and drain.
//!
//! The store records what happens; the dispatcher decides what happens next. Queued jobs are
//! held in memory, per lane, as small entries (id, priority, schedule), ordered by priority
//! then schedule; each lane has one loop that waits for a free slot and a due job, claims a
//! batch of jobs in one store write, and starts them. Nothing polls the database.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::blob::BlobDir;
use crate::clock::Micros;
use crate::events::Events;
use crate::executor::Executor;
use crate::job::{ErrorInfo, ExecutorKind, Job, JobId, Kind, NewJob};
use crate::store::{CancelOutcome, Finish, Inserted, JobStore, Notice, QueuedRef, StoreError};
use crate::task::{IoStyle, JobCtx, Registry, StopReason, Task, TaskError, TaskResult};

/// Most jobs one lane claims in one store write.
const CLAIM_BATCH: usize = 256;

/// The router: which lane runs `task` as `kind`.
pub fn route(task: &dyn Task, kind: Kind, isolate: bool) -> Result<ExecutorKind, String> {
    if isolate {
        return match kind {
            Kind::Cpu => Ok(ExecutorKind::Process),
            Kind::Io => Err(
                "isolate: only cpu jobs run in worker processes; drop `isolate` or use kind cpu"
                    .into(),
            ),
        };
    }
    Ok(match kind {
        Kind::Io => match task.io_style() {
            IoStyle::Async => ExecutorKind::Async,
            IoStyle::Blocking => ExecutorKind::Blocking,
        },
        Kind::Cpu => ExecutorKind::Rayon,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the {lane} lane has {queued} queued jobs, its limit; retry later")]
    QueueFull { lane: &'static str, queued: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1`: base × 2^(attempt-1), capped, then jittered to
    /// between 50% and 100% of that, so jobs that failed together do not retry together.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let full = self.base.saturating_mul(1u32 << exp).min(self.max);
        full.mul_f64(0.5 + 0.5 * unit_random())
    }
}

/// A number in [0, 1) from a shared splitmix64 sequence; plenty for jitter.
fn unit_random() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut s = STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    if s == 0 {
        s = Micros::now().0 as u64 | 1;
        STATE.store(s, Ordering::Relaxed);
    }
    let mut z = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// One lane's queued jobs: due ones by priority, then schedule; future ones by schedule.
#[derive(Default)]
struct LaneQueue {
    ready: BTreeSet<(Reverse<i32>, Micros, JobId)>,
    delayed: BTreeSet<(Micros, JobId)>,
    entries: HashMap<JobId, (i32, Micros)>,
    /// Slots promised to submits whose insert is still committing.
    reserved: usize,
}

impl LaneQueue {
    fn push(&mut self, r: &QueuedRef, now: Micros) {
        if self
            .entries
            .insert(r.id, (r.priority, r.scheduled_at))
            .is_some()
        {
            return;
        }
        if r.scheduled_at <= now {
            self.ready
                .insert((Reverse(r.priority), r.scheduled_at, r.id));
        } else {
            self.delayed.insert((r.scheduled_at, r.id));
        }
    }

    fn remove(&mut self, id: JobId) -> bool {
        match self.entries.remove(&id) {
            Some((priority, at)) => {
                self.ready.remove(&(Reverse(priority), at, id));
                self.delayed.remove(&(at, id));
                true
            }
            None => false,
        }
    }

    fn promote(&mut self, now: Micros) {
        while let Some(&(at, id)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            if let Some(&(priority, _)) = self.entries.get(&id) {
                self.ready.insert((Reverse(priority), at, id));
            }
        }
    }

    fn pop(&mut self) -> Option<JobId> {
        let (_, _, id) = self.ready.pop_first()?;
        self.entries.remove(&id);
        Some(id)
    }

    fn next_due(&self) -> Option<Micros> {
        self.delayed.first().map(|&(at, _)| at)
    }
}

struct Lane {
    executor: Arc<dyn Executor>,
    slots: Arc<Semaphore>,
    // A std Mutex: every critical section is a few map/set operations, never an await.
    queue: Mutex<LaneQueue>,
    wake: Notify,
    running: AtomicUsize,
    /// Taken off the queue, with their claim not yet committed: still queued in the store.
    claiming: AtomicUsize,
    succeeded: AtomicU64,
    failed: AtomicU64,
}

/// An attempt in progress.
struct Running {
    ctx: JobCtx,
    task: String,
    executor: ExecutorKind,
    /// The job as claimed, for progress events.
    job: Arc<Job>,
    /// The progress last published (f64 bits).
    published: AtomicU64,
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
    /// Attempts in progress, by job: how a cancel reaches them.
    running: Mutex<HashMap<JobId, Running>>,
    idle: Notify,
    retry: RetryPolicy,
    max_queued: usize,
    draining: AtomicBool,
    stop_lanes: watch::Sender<bool>,
    /// Where output blobs are adopted (tasks that write one).
    blobs: Option<BlobDir>,
    /// Several servers share the store: claim from the database, hold leases, listen.
    shared: bool,
    /// This server's name on the leases it holds.
    node: String,
    lease: Duration,
    api_token: Option<String>,
    /// For fetching blobs from other servers.
    http: reqwest::Client,
}

/// How the dispatcher behaves, from the settings.
pub struct DispatchOptions {
    pub retry: RetryPolicy,
    /// Queued jobs per lane before submits are refused (one server's memory; not applied to
    /// a shared store).
    pub max_queued: usize,
    /// Where output blobs are adopted.
    pub blobs: Option<BlobDir>,
    /// A running job's lease on a shared store.
    pub lease: Duration,
    /// The API token, for fetching a blob from the server that holds it.
    pub api_token: Option<String>,
}

/// Admission slots taken for a submit; given back when dropped.
struct Reservation<'a> {
    dispatcher: &'a Dispatcher,
    counts: Vec<(ExecutorKind, usize)>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        for (kind, n) in &self.counts {
            if let Some(lane) = self.dispatcher.lanes.get(kind) {
                lane.queue.lock().expect("queue lock").reserved -= n;
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
        } = options;
        let shared = store.shared();
        let lanes = executors
            .into_iter()
            .map(|executor| {
                let lane = Lane {
                    slots: Arc::new(Semaphore::new(executor.capacity())),
                    executor,
                    queue: Mutex::new(LaneQueue::default()),
                    wake: Notify::new(),
                    running: AtomicUsize::new(0),
                    claiming: AtomicUsize::new(0),
                    succeeded: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                };
                (lane.executor.kind(), lane)
            })
            .collect();
        Arc::new(Dispatcher {
            store,
            registry,
            events,
            lanes,
            running: Mutex::new(HashMap::new()),
            idle: Notify::new(),
            retry,
            max_queued,
            draining: AtomicBool::new(false),
            stop_lanes: watch::channel(false).0,
            blobs,
            shared,
            node: uuid::Uuid::now_v7().simple().to_string(),
            lease,
            api_token,
            http: reqwest::Client::new(),
        })
    }

    /// Recovers what a previous process left running, loads the queue, and starts the lanes.
    pub async fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        if self.shared {
            return self.start_shared().await;
        }
        let now = Micros::now();
        let recovered = self.store.recover(now).await?;
        if recovered.requeued + recovered.lost > 0 {
            tracing::warn!(
                requeued = recovered.requeued,
                lost = recovered.lost,
                "jobs were running when the previous server stopped"
            );
        }
        let queued = self.store.queued().await?;
        let count = queued.len();
        for r in &queued {
            if let Some(lane) = self.lanes.get(&r.executor) {
                lane.queue.lock().expect("queue lock").push(r, now);
            } else {
                tracing::warn!(job = %r.id, executor = r.executor.as_str(),
                    "a queued job needs a lane this server does not have; it stays queued");
            }
        }
        if count > 0 {
            tracing::info!(count, "loaded queued jobs");
        }
        for &kind in self.lanes.keys() {
            let this = self.clone();
            tokio::spawn(async move { this.lane_loop(kind).await });
        }
        self.spawn_progress_ticker();
        Ok(())
    }

    /// Starts the lanes against a shared store: no queue in memory, no start-up recovery
    /// (another server may be running the jobs); instead a listener for the store's notices,
    /// a heartbeat that renews this server's leases, and maintenance that requeues jobs
    /// whose server stopped renewing.
    async fn start_shared(self: &Arc<Self>) -> Result<(), StoreError> {
        let mut notices = self.store.listen().await?;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                let Some(this) = weak.upgrade() else { return };
                this.on_notice(notice).await;
            }
        });
        let weak = Arc::downgrade(self);
        let beat = (self.lease / 3).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(beat);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                let until = Micros::now().plus(this.lease);
                if let Err(e) = this.store.renew_leases(&this.node, until).await {
                    tracing::warn!(error = %e, "renewing leases failed");
                }
                match this.store.requeue_expired(Micros::now()).await {
                    Ok(r) if r.requeued + r.lost > 0 => tracing::warn!(
                        requeued = r.requeued,
                        lost = r.lost,
                        "jobs of a server that stopped renewing its leases"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "requeueing expired leases failed"),
                }
            }
        });
        for &kind in self.lanes.keys() {
            let this = self.clone();
            tokio::spawn(async move { this.shared_lane_loop(kind).await });
        }
        self.spawn_progress_ticker();
        tracing::info!(node = %self.node, "sharing the database with other servers");
        Ok(())
    }

    async fn on_notice(&self, notice: Notice) {
        match notice {
            Notice::New(kind) => {
                if let Some(lane) = self.lanes.get(&kind) {
                    lane.wake.notify_one();
                }
            }
            Notice::Cancel(id) => {
                if let Some(r) = self.running.lock().expect("running lock").get(&id) {
                    r.ctx.stop(StopReason::Cancelled);
                }
            }
            Notice::Changed(id) => {
                // Wake this server's long-polls and streams on a job another server moved.
                if self.events.is_watched_alone(id) {
                    if let Ok(Some(job)) = self.store.get(id).await {
                        self.events.publish_to_watchers(&job);
                    }
                }
            }
        }
    }

    /// A lane against a shared store: wait for a slot, claim due jobs from the database
    /// (skipping rows other servers are claiming), run them; when none are due, sleep until
    /// a notice, the next scheduled job, or a second at most (a missed notice costs a second).
    async fn shared_lane_loop(self: Arc<Self>, kind: ExecutorKind) {
        let lane = &self.lanes[&kind];
        let mut stop = self.stop_lanes.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let first = tokio::select! {
                p = lane.slots.clone().acquire_owned() => p.expect("lane semaphore is never closed"),
                _ = stop.changed() => return,
            };
            let mut permits = vec![first];
            while permits.len() < CLAIM_BATCH {
                match lane.slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let now = Micros::now();
            lane.claiming.fetch_add(permits.len(), Ordering::Relaxed);
            let claimed = self
                .store
                .claim_ready(
                    kind,
                    permits.len() as u32,
                    now,
                    &self.node,
                    now.plus(self.lease),
                )
                .await;
            lane.running
                .fetch_add(claimed.as_ref().map_or(0, Vec::len), Ordering::Relaxed);
            lane.claiming.fetch_sub(permits.len(), Ordering::Relaxed);
            match claimed {
                Ok(jobs) if !jobs.is_empty() => {
                    for (job, permit) in jobs.into_iter().zip(permits.drain(..)) {
                        self.spawn_attempt(kind, job, permit);
                    }
                }
                Ok(_) => {
                    drop(permits);
                    let due = self.store.next_due(kind).await.ok().flatten();
                    let wait = due
                        .map(|at| at.until())
                        .unwrap_or(Duration::from_secs(1))
                        .min(Duration::from_secs(1));
                    tokio::select! {
                        _ = lane.wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return,
                    }
                }
                Err(e) => {
                    drop(permits);
                    tracing::error!(error = %e, lane = kind.as_str(), "claiming jobs failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn spawn_attempt(self: &Arc<Self>, kind: ExecutorKind, job: Job, permit: OwnedSemaphorePermit) {
        self.events.publish(&job);
        let this = self.clone();
        let span = tracing::info_span!("job", id = %job.id, task = %job.task,
            attempt = job.attempt, executor = kind.as_str());
        tokio::spawn(async move { this.run_attempt(job, permit).await }.instrument(span));
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn has_lane(&self, kind: ExecutorKind) -> bool {
        self.lanes.contains_key(&kind)
    }

    fn reserve(&self, jobs: &[NewJob]) -> Result<Reservation<'_>, SubmitError> {
        let mut wanted: Vec<(ExecutorKind, usize)> = Vec::new();
        for job in jobs {
            match wanted.iter_mut().find(|(k, _)| *k == job.executor) {
                Some((_, n)) => *n += 1,
                None => wanted.push((job.executor, 1)),
            }
        }
        let mut reservation = Reservation {
            dispatcher: self,
            counts: Vec::with_capacity(wanted.len()),
        };
        for (kind, n) in wanted {
            let lane = self
                .lanes
                .get(&kind)
                .ok_or(SubmitError::Store(StoreError::Corrupt(format!(
                    "no {} lane",
                    kind.as_str()
                ))))?;
            let mut q = lane.queue.lock().expect("queue lock");
            let queued = q.entries.len() + q.reserved;
            if queued + n > self.max_queued {
                return Err(SubmitError::QueueFull {
                    lane: kind.as_str(),
                    queued,
                });
            }
            q.reserved += n;
            reservation.counts.push((kind, n));
        }
        Ok(reservation)
    }

    /// Stores jobs (all or nothing) and queues the new ones. Answers once they are committed.
    pub async fn submit(&self, jobs: Vec<NewJob>) -> Result<Vec<Inserted>, SubmitError> {
        if self.is_draining() {
            return Err(SubmitError::ShuttingDown);
        }
        // In shared mode the queue lives in the database, across servers: the per-lane bound
        // of one server's memory does not apply.
        let reservation = if self.shared {
            None
        } else {
            Some(self.reserve(&jobs)?)
        };
        let inserted = self.store.insert(jobs).await?;
        let now = Micros::now();
        for job in inserted.iter().filter_map(|i| match i {
            Inserted::Created(j) => Some(j),
            Inserted::Existing(_) => None,
        }) {
            self.enqueue(job, now);
            self.events.publish(job);
        }
        drop(reservation);
        Ok(inserted)
    }

    fn enqueue(&self, job: &Job, now: Micros) {
        if self.shared {
            // The database holds the queue; its notice wakes whichever server has room.
            return;
        }
        let Some(lane) = self.lanes.get(&job.executor) else {
            return;
        };
        let r = QueuedRef {
            id: job.id,
            executor: job.executor,
            priority: job.priority,
            scheduled_at: job.scheduled_at,
        };
        lane.queue.lock().expect("queue lock").push(&r, now);
        lane.wake.notify_one();
    }

    /// Cancels a queued or running job. A running async job is aborted; rayon and blocking work
    /// stop at their next check, and whatever they return is discarded.
    pub async fn cancel(&self, id: JobId) -> Result<CancelOutcome, StoreError> {
        let outcome = self.store.cancel(id, Micros::now()).await?;
        if let CancelOutcome::Cancelled(job) = &outcome {
            if let Some(lane) = self.lanes.get(&job.executor) {
                lane.queue.lock().expect("queue lock").remove(id);
            }
            if let Some(r) = self.running.lock().expect("running lock").get(&id) {
                r.ctx.stop(StopReason::Cancelled);
            }
            self.events.publish(job);
        }
        Ok(outcome)
    }

    /// The live progress of a running attempt, if it is running here.
    pub fn live_progress(&self, id: JobId) -> Option<f64> {
        self.running
            .lock()
            .expect("running lock")
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
            let running = self.running.lock().expect("running lock");
            running
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
        self.running
            .lock()
            .expect("running lock")
            .iter()
            .filter(|(_, r)| r.executor == ExecutorKind::Async)
            .map(|(id, r)| format!("{}({id})", r.task))
            .collect()
    }

    pub fn stats(&self) -> Vec<(ExecutorKind, LaneStats)> {
        let mut out: Vec<_> = self
            .lanes
            .iter()
            .map(|(&kind, lane)| {
                let queued = lane.queue.lock().expect("queue lock").entries.len()
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
            let busy = !self.running.lock().expect("running lock").is_empty()
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
        let left: Vec<(JobId, JobCtx)> = self
            .running
            .lock()
            .expect("running lock")
            .iter()
            .map(|(id, r)| (*id, r.ctx.clone()))
            .collect();
        tracing::warn!(
            count = left.len(),
            "drain timed out; unfinished jobs go back to the queue"
        );
        for (id, ctx) in left {
            ctx.stop(StopReason::Shutdown);
            match self.store.release(id, ctx.attempt).await {
                Ok(Some(job)) => self.events.publish(&job),
                Ok(None) => {}
                Err(e) => tracing::error!(job = %id, error = %e, "could not requeue a job"),
            }
        }
    }

    async fn lane_loop(self: Arc<Self>, kind: ExecutorKind) {
        let lane = &self.lanes[&kind];
        let mut stop = self.stop_lanes.subscribe();
        loop {
            if *stop.borrow() {
                return;
            }
            let first = tokio::select! {
                p = lane.slots.clone().acquire_owned() => p.expect("lane semaphore is never closed"),
                _ = stop.changed() => return,
            };
            let mut permits = vec![first];
            let ids = loop {
                let next_due = {
                    let mut q = lane.queue.lock().expect("queue lock");
                    q.promote(Micros::now());
                    if let Some(id) = q.pop() {
                        let mut ids = vec![id];
                        while ids.len() < CLAIM_BATCH && !q.ready.is_empty() {
                            match lane.slots.clone().try_acquire_owned() {
                                Ok(p) => {
                                    permits.push(p);
                                    ids.extend(q.pop());
                                }
                                Err(_) => break,
                            }
                        }
                        lane.claiming.fetch_add(ids.len(), Ordering::Relaxed);
                        break ids;
                    }
                    q.next_due()
                };
                let sleep = async {
                    match next_due {
                        Some(at) => tokio::time::sleep(at.until()).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = lane.wake.notified() => {}
                    _ = sleep => {}
                    _ = stop.changed() => return,
                }
            };
            let claimed = self.store.claim(ids.clone(), Micros::now()).await;
            // Counted as running from the claim until the outcome is committed (run_attempt).
            lane.running
                .fetch_add(claimed.as_ref().map_or(0, Vec::len), Ordering::Relaxed);
            lane.claiming.fetch_sub(ids.len(), Ordering::Relaxed);
            match claimed {
                Ok(jobs) => {
                    for (job, permit) in jobs.into_iter().zip(permits.drain(..)) {
                        self.spawn_attempt(kind, job, permit);
                    }
                }
                Err(e) => {
                    // The jobs are still queued in the database; put them back and try later.
                    tracing::error!(error = %e, lane = kind.as_str(), "claiming jobs failed");
                    drop(permits);
                    if let Ok(jobs) = self.store.queued().await {
                        let now = Micros::now();
                        let mut q = lane.queue.lock().expect("queue lock");
                        for r in jobs.iter().filter(|r| ids.contains(&r.id)) {
                            q.push(r, now);
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn run_attempt(self: Arc<Self>, job: Job, permit: OwnedSemaphorePermit) {
        let lane = &self.lanes[&job.executor];
        let ctx = JobCtx::new(job.id, job.attempt);
        self.running.lock().expect("running lock").insert(
            job.id,
            Running {
                ctx: ctx.clone(),
                task: job.task.clone(),
                executor: job.executor,
                job: Arc::new(job.clone()),
                published: AtomicU64::new(0f64.to_bits()),
            },
        );
        if let Some(started) = job.started_at {
            metrics::histogram!("offload_job_queue_seconds", "executor" => job.executor.as_str())
                .record(started.ms_since(job.scheduled_at).max(0.0) / 1000.0);
        }
        let run_started = std::time::Instant::now();

        let task = self.registry.get(&job.task).cloned();
        let writes_blob = task.as_ref().is_some_and(|t| t.writes_blob());
        let result: TaskResult = match task {
            None => Err(TaskError::Permanent(format!(
                "task `{}` is not registered in this server",
                job.task
            ))),
            Some(task) => match self.local_blobs(task.as_ref(), &job).await {
                Err(e) => Err(e),
                Ok(()) => {
                    let work =
                        lane.executor
                            .run(task.clone(), ctx.clone(), job.args.clone(), permit);
                    let timeout = async {
                        match job.timeout_ms {
                            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        r = work => r,
                        _ = timeout => {
                            ctx.stop(StopReason::TimedOut);
                            Err(TaskError::Stopped)
                        }
                        _ = ctx.stopped() => Err(TaskError::Stopped),
                    }
                }
            },
        };

        metrics::histogram!("offload_job_run_seconds", "executor" => job.executor.as_str())
            .record(run_started.elapsed().as_secs_f64());
        let result = match (writes_blob, &self.blobs) {
            (true, Some(blobs)) => match result {
                Ok(value) => self.adopt_output(blobs, &job, value).await,
                Err(e) => {
                    blobs.discard_output(job.id, job.attempt);
                    Err(e)
                }
            },
            _ => result,
        };
        if let Err(e) = self.record(&job, &ctx, result).await {
            // The job stays `running` in the database; the next start requeues it.
            tracing::error!(error = %e, "recording the outcome failed");
        }
        lane.running.fetch_sub(1, Ordering::Relaxed);
        // Only now is the attempt over: a drain waits for the outcome to be committed, not
        // just for the work to return.
        let mut running = self.running.lock().expect("running lock");
        running.remove(&job.id);
        if running.is_empty() {
            self.idle.notify_waiters();
        }
    }

    /// Makes sure the blobs a job names are on this server's disk, fetching any that another
    /// server took the upload of (a shared store). A blob that cannot be fetched now fails the
    /// attempt as transient: it is retried.
    async fn local_blobs(&self, task: &dyn Task, job: &Job) -> Result<(), TaskError> {
        let Some(blobs) = &self.blobs else {
            return Ok(());
        };
        for arg in task.blob_args() {
            let Some(id) = job.args.get(*arg).and_then(serde_json::Value::as_str) else {
                continue;
            };
            if blobs.path(id).is_some_and(|p| p.exists()) {
                continue;
            }
            let meta = self
                .store
                .get_blob(id)
                .await
                .map_err(|e| TaskError::Transient(format!("looking up blob {id}: {e}")))?
                .ok_or_else(|| TaskError::Permanent(format!("blob {id} no longer exists")))?;
            blobs
                .fetch(&meta, &self.http, self.api_token.as_deref())
                .await
                .map_err(TaskError::Transient)?;
            tracing::info!(blob = %id, origin = ?meta.origin, "fetched a blob from the server that holds it");
        }
        Ok(())
    }

    /// Makes an attempt's output file a stored blob and names it in the result.
    async fn adopt_output(
        &self,
        blobs: &BlobDir,
        job: &Job,
        mut value: serde_json::Value,
    ) -> TaskResult {
        let size = value.get("size").and_then(serde_json::Value::as_u64);
        let sha = value
            .get("sha256")
            .and_then(serde_json::Value::as_str)
            .map(String::from);
        let (Some(size), Some(sha)) = (size, sha) else {
            blobs.discard_output(job.id, job.attempt);
            return Err(TaskError::Permanent(
                "the task returned no size and sha256 for its output blob".into(),
            ));
        };
        let meta = blobs
            .adopt_output(job.id, job.attempt, size, sha)
            .map_err(|e| TaskError::Transient(format!("the output blob is missing: {e}")))?;
        if let Err(e) = self.store.insert_blob(meta.clone()).await {
            let _ = blobs.remove(&meta.id).await;
            return Err(TaskError::Transient(format!(
                "recording the output blob failed: {e}"
            )));
        }
        value["blob"] = serde_json::Value::String(meta.id);
        Ok(value)
    }

    async fn record(&self, job: &Job, ctx: &JobCtx, result: TaskResult) -> Result<(), StoreError> {
        let error = match result {
            Ok(value) => {
                let done = self
                    .store
                    .finish(job, Finish::Succeeded(value), 1.0, Micros::now())
                    .await?;
                return self.recorded(done, true);
            }
            Err(TaskError::Stopped) => match ctx.stop_reason() {
                // The cancel (or the shutdown) has already written the job's state.
                Some(StopReason::Cancelled) | Some(StopReason::Shutdown) => return Ok(()),
                Some(StopReason::TimedOut) => ErrorInfo::new(
                    "timeout",
                    format!(
                        "attempt {} ran past its timeout of {} ms",
                        job.attempt,
                        job.timeout_ms.unwrap_or(0)
                    ),
                ),
                None => ErrorInfo::new("task_error", "the task stopped without being asked to"),
            },
            Err(TaskError::Permanent(msg)) => {
                let done = self
                    .store
                    .finish(
                        job,
                        Finish::Failed(ErrorInfo::new("task_error", msg)),
                        ctx.progress(),
                        Micros::now(),
                    )
                    .await?;
                return self.recorded(done, false);
            }
            Err(TaskError::Transient(msg)) => ErrorInfo::new("task_error", msg),
            Err(TaskError::Crashed(msg)) => ErrorInfo::new("crashed", msg),
        };
        if job.attempt < job.max_attempts {
            let at = Micros::now().plus(self.retry.backoff(job.attempt));
            if let Some(queued) = self.store.retry(job.id, job.attempt, error, at).await? {
                self.events.publish(&queued);
                self.enqueue(&queued, Micros::now());
            }
            return Ok(());
        }
        let done = self
            .store
            .finish(job, Finish::Failed(error), ctx.progress(), Micros::now())
            .await?;
        self.recorded(done, false)
    }

    fn recorded(&self, job: Option<Job>, ok: bool) -> Result<(), StoreError> {
        // None: a cancel got there first; the attempt guard kept its state.
        if let Some(job) = job {
            let lane = &self.lanes[&job.executor];
            if ok {
                lane.succeeded.fetch_add(1, Ordering::Relaxed);
            } else {
                lane.failed.fetch_add(1, Ordering::Relaxed);
            }
            self.events.publish(&job);
        }
        Ok(())
    }

    /// Deletes finished jobs older than `retention`, in small batches so no single
    /// transaction holds the writer for long. Returns how many went.
    pub async fn prune(&self, retention: Duration) -> Result<u64, StoreError> {
        const BATCH: u32 = 500;
        let before = Micros::now().minus(retention);
        let mut total = 0;
        loop {
            let n = self.store.prune(before, BATCH).await?;
            total += n;
            if n < BATCH as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Then the blobs those jobs were the last to use (unless uploaded to be kept).
        loop {
            let gone = self.store.prune_blobs(BATCH).await?;
            if let Some(blobs) = &self.blobs {
                for id in &gone {
                    if let Err(e) = blobs.remove(id).await {
                        tracing::warn!(blob = %id, error = %e, "a pruned blob's file could not be removed");
                    }
                }
            }
            if gone.len() < BATCH as usize {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            base: Duration::from_millis(1000),
            max: Duration::from_millis(5000),
        };
        for _ in 0..100 {
            let b1 = p.backoff(1);
            assert!(b1 >= Duration::from_millis(500) && b1 <= Duration::from_millis(1000));
            let b3 = p.backoff(3);
            assert!(b3 >= Duration::from_millis(2000) && b3 <= Duration::from_millis(4000));
            assert!(p.backoff(20) <= Duration::from_millis(5000));
        }
    }

    #[test]
    fn queue_orders_by_priority_then_schedule_and_holds_future_jobs() {
        let mut q = LaneQueue::default();
        let now = Micros::now();
        let r = |priority, at| QueuedRef {
            id: JobId::new(),
            executor: ExecutorKind::Rayon,
            priority,
            scheduled_at: at,
        };
        let low = r(0, now);
        let high = r(5, now);
        let later = r(9, now.plus(Duration::from_secs(60)));
        for x in [&low, &high, &later] {
            q.push(x, now);
        }
        assert_eq!(q.pop(), Some(high.id));
        assert_eq!(q.pop(), Some(low.id));
        assert_eq!(q.pop(), None);
        q.promote(now.plus(Duration::from_secs(61)));
        assert_eq!(q.pop(), Some(later.id));
    }
}
