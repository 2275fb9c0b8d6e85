//! A lane's claim loop: wait for room, claim due jobs from the store, start them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tracing::Instrument;

use super::{Dispatcher, CLAIM_BATCH};
use crate::clock::Micros;
use crate::job::{next_state, AttemptEnd, ExecutorKind, Job};
use crate::store::{Lease, Settle};

/// The longest a lane with room waits before it looks at the store again without being told
/// to: what a lost notice costs at most.
const LOOK_AGAIN: Duration = Duration::from_secs(1);
/// How often a lane whose executor cannot start anything now (no live worker) looks again.
const SHORT_OF_WORKERS: Duration = Duration::from_millis(100);

impl Dispatcher {
    /// One lane: take every free slot (at least one), claim that many due jobs in one store
    /// call, start them. With fewer jobs due than slots, sleep until a notice, the next
    /// scheduled job, or [`LOOK_AGAIN`].
    pub(super) async fn lane_loop(self: Arc<Self>, kind: ExecutorKind) {
        let lane = &self.lanes[&kind];
        let mut stop = self.stop_lanes.subscribe();
        let mut failures = super::retry::WriteBackoff::new();
        loop {
            if *stop.borrow() {
                return;
            }
            let first = tokio::select! {
                biased;
                _ = stop.changed() => return,
                p = lane.slots.clone().acquire_owned() => p.expect("lane semaphore is never closed"),
            };
            let mut permits = vec![first];
            while permits.len() < CLAIM_BATCH {
                match lane.slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            // Claim no more than the lane can start now: its free slots less what it lacks for a
            // while (the process lane's dead workers, not yet replaced). The rest stay queued
            // in the store instead of waiting inside the lane.
            let missing = lane
                .executor
                .capacity()
                .saturating_sub(lane.executor.live_capacity());
            if missing >= permits.len() {
                drop(permits);
                tokio::select! {
                    _ = tokio::time::sleep(SHORT_OF_WORKERS) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            permits.truncate(permits.len() - missing);
            let wanted = permits.len();
            let now = Micros::now();
            let lease = Lease {
                owner: self.node.clone(),
                ttl: self.lease,
            };
            lane.claiming.fetch_add(wanted, Ordering::AcqRel);
            // A drain that began meanwhile may have seen no claim in flight: claim nothing.
            if *stop.borrow() {
                lane.claiming.fetch_sub(wanted, Ordering::AcqRel);
                return;
            }
            let claimed = self.store.claim(kind, wanted as u32, now, &lease).await;
            let wait = match claimed {
                Ok(mut claimed) => {
                    failures = super::retry::WriteBackoff::new();
                    if claimed.jobs.len() > wanted {
                        // A store must not hand out more than asked; if one does, the surplus
                        // goes straight back rather than sitting `running` with no attempt.
                        let surplus = claimed.jobs.split_off(wanted);
                        tracing::error!(
                            count = surplus.len(),
                            "a claim returned more jobs than asked for"
                        );
                        self.hand_back(surplus).await;
                    }
                    let got = claimed.jobs.len();
                    // Counted as running from the claim until the outcome is written.
                    lane.running.fetch_add(got, Ordering::AcqRel);
                    lane.claiming.fetch_sub(wanted, Ordering::AcqRel);
                    lane.count_queued(-(got as i64));
                    for (job, permit) in claimed.jobs.into_iter().zip(permits.drain(..)) {
                        self.start_attempt(kind, job, permit);
                    }
                    drop(permits);
                    if got == wanted {
                        continue;
                    }
                    claimed
                        .next_due
                        .map(|at| at.until().max(Duration::from_millis(1)))
                        .unwrap_or(LOOK_AGAIN)
                        .min(LOOK_AGAIN)
                }
                Err(e) => {
                    lane.claiming.fetch_sub(wanted, Ordering::AcqRel);
                    drop(permits);
                    // The jobs are still queued in the store; look again after a pause.
                    tracing::error!(error = %e, lane = kind.as_str(), "claiming jobs failed");
                    failures.next()
                }
            };
            tokio::select! {
                _ = lane.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Puts claimed jobs that will not run here back in the queue, their attempt given back.
    async fn hand_back(&self, jobs: Vec<Job>) {
        let now = Micros::now();
        let moves = jobs
            .into_iter()
            .filter_map(|job| {
                let next = next_state(&job, AttemptEnd::Drained, Duration::ZERO, now)?;
                Some(Settle {
                    progress: 0.0,
                    job,
                    next,
                    now,
                    expired_before: None,
                })
            })
            .collect();
        if let Err(e) = self.store.settle(moves).await {
            // Their leases run out and they are rescued.
            tracing::error!(error = %e, "handing back surplus jobs failed");
        }
    }

    /// Registers a claimed attempt and runs it in a task of its own.
    fn start_attempt(self: &Arc<Self>, kind: ExecutorKind, job: Job, permit: OwnedSemaphorePermit) {
        let ctx = self.register(&job);
        self.events.publish(&job);
        let this = self.clone();
        let span = tracing::info_span!("job", id = %job.id, task = %job.task,
            attempt = job.attempt, executor = kind.as_str());
        tokio::spawn(async move { this.run_attempt(job, ctx, permit).await }.instrument(span));
    }
}
