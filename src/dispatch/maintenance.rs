//! Maintenance: leases (renewal, and the rescue of jobs whose server stopped renewing),
//! recounting the queues, the servers list, the sweep of waiting jobs, and pruning.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::Dispatcher;
use crate::clock::Micros;
use crate::job::{next_state, AttemptEnd, JobId, JobStatus};
use crate::store::{Expired, Expiry, Settle, StoreError};
use crate::task::StopReason;

/// Most jobs rescued per store call.
const RESCUE_BATCH: u32 = 500;
/// A server whose heartbeat is older than this many leases (and than [`SERVER_GONE_MIN`]) is
/// taken off the servers list: it died or was cut off. Its jobs are rescued sooner, by their
/// leases; the list is for people, and a server that only paused should not blink out of it.
const SERVER_GONE_LEASES: u32 = 4;
const SERVER_GONE_MIN: Duration = Duration::from_secs(30);
/// How often a server on a shared store recounts the queues. Other servers' submits reach it
/// at once through the store's notices (with their counts), but their claims and cancels are
/// not announced: this recount, one cheap `GROUP BY` on the queued rows' partial index, is
/// what brings the count down again, so admission refuses (429) no longer than this after
/// the database's queue has room again.
const SHARED_RECOUNT: Duration = Duration::from_secs(1);
/// How often a server runs its store's housekeeping.
const TIDY_EVERY: Duration = Duration::from_secs(10);
/// Most waiting jobs the sweep decides again per beat.
const SWEEP_BATCH: u32 = 500;

impl Dispatcher {
    /// Every third of a lease: renew this server's leases (stopping attempts the store says
    /// are no longer ours: cancelled, or rescued elsewhere), rescue the jobs of servers whose
    /// leases ran out, and recount the queues.
    pub(super) fn spawn_heartbeat(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let beat = (self.lease / 3).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(beat);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                this.heartbeat().await;
            }
        });
    }

    /// On a shared store, recounts the queues every [`SHARED_RECOUNT`] (the heartbeat
    /// recounts too, on every store).
    pub(super) fn spawn_recount(self: &Arc<Self>) {
        if self.store.exclusive() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SHARED_RECOUNT);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                if let Err(e) = this.recount().await {
                    tracing::warn!(error = %e, "counting queued jobs failed");
                }
            }
        });
    }

    /// Every [`TIDY_EVERY`], the store's housekeeping ([`crate::store::JobStore::tidy`]), in
    /// a task of its own: a long vacuum must not hold up lease renewals.
    pub(super) fn spawn_tidy(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TIDY_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                let store = this.store.clone();
                drop(this);
                let t = std::time::Instant::now();
                match store.tidy().await {
                    Ok(true) => tracing::info!(
                        ms = t.elapsed().as_millis() as u64,
                        "vacuumed the jobs table (autovacuum is off)"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "store housekeeping failed"),
                }
            }
        });
    }

    async fn heartbeat(&self) {
        let running: Vec<(JobId, u32)> = self
            .attempts
            .lock()
            .expect("attempts lock")
            .live
            .iter()
            .map(|(id, r)| (*id, r.ctx.attempt))
            .collect();
        match self.store.renew(&self.node, &running, self.lease).await {
            Ok(gone) => {
                for (id, attempt) in gone {
                    // Cancelled (a notice this server missed) or rescued by another server:
                    // either way the attempt's outcome would be refused; stop the work.
                    self.stop_attempt(id, Some(attempt), StopReason::Cancelled);
                }
            }
            Err(e) => tracing::warn!(error = %e, "renewing leases failed"),
        }
        // Attempts running here are never rescued by this server, even if their lease ran out
        // (a renewal delayed by a full disk): the work is still going on.
        let mine: HashSet<(JobId, u32)> = running.into_iter().collect();
        match self.rescue(Expiry::Lapsed, &mine).await {
            Ok((requeued, lost)) if requeued + lost > 0 => tracing::warn!(
                requeued,
                lost,
                "rescued the jobs of a server that stopped renewing its leases"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "rescuing expired leases failed"),
        }
        match self.sweep_waiting().await {
            Ok(0) => {}
            Ok(moved) => tracing::warn!(
                moved,
                "waiting jobs whose parents had finished were moved on by the sweep"
            ),
            Err(e) => tracing::warn!(error = %e, "sweeping waiting jobs failed"),
        }
        if let Err(e) = self.recount().await {
            tracing::warn!(error = %e, "counting queued jobs failed");
        }
        if let Err(e) = self.store.beat(&self.server_beat()).await {
            tracing::warn!(error = %e, "recording this server's heartbeat failed");
        }
        let silent = (self.lease * SERVER_GONE_LEASES).max(SERVER_GONE_MIN);
        match self.store.forget_servers(silent).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(servers = n, "forgot servers that stopped beating"),
            Err(e) => tracing::warn!(error = %e, "forgetting silent servers failed"),
        }
    }

    /// What this server's heartbeat writes about it.
    pub(super) fn server_beat(&self) -> crate::store::ServerBeat {
        let lanes: serde_json::Map<String, serde_json::Value> = self
            .lanes
            .iter()
            .map(|(kind, lane)| {
                (
                    kind.as_str().to_string(),
                    serde_json::json!({
                        "capacity": lane.executor.capacity(),
                        "running": lane.running.load(std::sync::atomic::Ordering::Relaxed),
                    }),
                )
            })
            .collect();
        crate::store::ServerBeat {
            id: self.node.clone(),
            address: self.address.clone(),
            lanes: serde_json::Value::Object(lanes),
        }
    }

    /// The safety net for jobs that depend on jobs: a parent's final state moves its children
    /// in the same transaction, so this finds nothing unless that failed somehow. Each beat
    /// decides again one page of waiting jobs that have a final parent, going on from where
    /// the last beat stopped, and starting over at the end. Returns how many moved.
    pub(super) async fn sweep_waiting(&self) -> Result<u64, StoreError> {
        let after = *self.sweep_after.lock().expect("sweep lock");
        let (moved, next) = self
            .store
            .resolve_waiting(after, SWEEP_BATCH, Micros::now())
            .await?;
        *self.sweep_after.lock().expect("sweep lock") = next;
        Ok(moved)
    }

    /// Moves running jobs whose lease ran out (by the store's clock; or all of them, at the
    /// start of an exclusive store) on, as [`next_state`] decides for a lost attempt: queued
    /// again while attempts remain, else failed as `lost`. Attempts in `skip` (job, attempt)
    /// are left alone. Returns how many were requeued and how many lost.
    pub(super) async fn rescue(
        &self,
        which: Expiry,
        skip: &HashSet<(JobId, u32)>,
    ) -> Result<(u64, u64), StoreError> {
        let (mut requeued, mut lost) = (0, 0);
        loop {
            let Expired { jobs, before } = self.store.expired(which, RESCUE_BATCH).await?;
            if jobs.is_empty() {
                break;
            }
            let now = Micros::now();
            let full = jobs.len() as u32 == RESCUE_BATCH;
            let moves: Vec<Settle> = jobs
                .into_iter()
                .filter(|job| !skip.contains(&(job.id, job.attempt)))
                .filter_map(|job| {
                    let next = next_state(&job, AttemptEnd::Lost, Duration::ZERO, now)?;
                    Some(Settle {
                        progress: job.progress,
                        job,
                        next,
                        now,
                        // Only if its owner has not renewed the lease since we looked.
                        expired_before: Some(before),
                    })
                })
                .collect();
            let mut moved_any = false;
            for job in self.store.settle(moves).await?.into_iter().flatten() {
                moved_any = true;
                match job.status {
                    JobStatus::Queued => {
                        requeued += 1;
                        if let Some(lane) = self.lanes.get(&job.executor) {
                            lane.count_queued(1);
                        }
                    }
                    _ => lost += 1,
                }
                self.callback_owed(&job);
                self.events.publish(&job);
            }
            if !full || !moved_any {
                break;
            }
        }
        Ok((requeued, lost))
    }

    /// Sets each lane's queued count from the store.
    pub(super) async fn recount(&self) -> Result<(), StoreError> {
        let counts = self.store.queued_counts().await?;
        for (kind, lane) in &self.lanes {
            let n = counts
                .iter()
                .find(|(k, _)| k == kind)
                .map_or(0, |(_, n)| *n);
            lane.admission.lock().expect("admission lock").queued = n as i64;
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
        // Then the blobs those jobs were the last to use (unless uploaded to be kept); other
        // servers remove their copies when the store announces it.
        loop {
            let gone = self.store.prune_blobs(BATCH).await?;
            self.remove_blob_files(&gone).await;
            if gone.len() < BATCH as usize {
                break;
            }
            tokio::task::yield_now().await;
        }
        // And the files of blobs that went while this server was not listening.
        let swept = self.sweep_blob_files().await?;
        if swept > 0 {
            tracing::info!(
                files = swept,
                "removed the files of blobs that no longer exist"
            );
        }
        Ok(total)
    }
}
