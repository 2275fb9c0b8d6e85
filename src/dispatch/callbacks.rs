//! The delivery task of completion callbacks: claims due outbox rows from the store, sends
//! each ([`crate::callback::deliver`]), and records the outcome as
//! [`crate::callback::after_failure`] decides.
//!
//! Like the lanes, it works from the store, not from memory: a callback owed by a job that
//! became final anywhere (this server, another one, a server that died before it delivered)
//! is found in the outbox. A local wake-up only makes it look sooner; otherwise it looks
//! when the next row is due, and at least every [`POLL`] for rows written by other servers.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use super::retry::WriteBackoff;
use super::Dispatcher;
use crate::callback::{self, CallbackOptions};
use crate::clock::Micros;
use crate::job::Job;
use crate::store::{CallbackOutcome, Delivery, StoreError};

/// Most callbacks claimed (and sent at once) per round.
const BATCH: u32 = 32;
/// The longest the task sleeps without looking at the outbox.
const POLL: Duration = Duration::from_secs(1);

impl Dispatcher {
    /// Tells the delivery task that `job` may owe a callback now.
    pub(super) fn callback_owed(&self, job: &Job) {
        if job.calls_back_on(job.status) {
            self.callback_wake.notify_one();
        }
    }

    /// Starts the delivery task (when callbacks are configured). It stops when the server
    /// drains: a callback it has not sent stays in the outbox for the next server.
    pub(super) fn spawn_callbacks(self: &Arc<Self>) {
        let Some(options) = self.callbacks.clone() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let wake = self.callback_wake.clone();
        let mut stop = self.stop_lanes.subscribe();
        tokio::spawn(async move {
            let mut failing = WriteBackoff::new();
            loop {
                if *stop.borrow() {
                    return;
                }
                let Some(this) = weak.upgrade() else { return };
                let wait = match this.deliver_due(&options).await {
                    Ok(wait) => {
                        failing = WriteBackoff::new();
                        wait
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming callbacks failed");
                        failing.next()
                    }
                };
                // Not held while sleeping: the dispatcher may go.
                drop(this);
                if wait.is_zero() {
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = wake.notified() => {}
                    _ = stop.changed() => {}
                }
            }
        });
    }

    /// One round: claim what is due, send it all at once, record each outcome. Answers how
    /// long to wait before the next round.
    async fn deliver_due(&self, options: &CallbackOptions) -> Result<Duration, StoreError> {
        let now = Micros::now();
        let claimed = self
            .store
            .claim_callbacks(BATCH, now, now.plus(options.lease()))
            .await?;
        let full = claimed.deliveries.len() as u32 == BATCH;
        join_all(
            claimed
                .deliveries
                .iter()
                .map(|d| self.deliver_one(options, d)),
        )
        .await;
        Ok(match claimed.next_due {
            _ if full => Duration::ZERO,
            Some(at) => at.until().min(POLL),
            None => POLL,
        })
    }

    async fn deliver_one(&self, options: &CallbackOptions, d: &Delivery) {
        let result = callback::deliver(options, d).await;
        let now = Micros::now();
        let outcome = match result {
            Ok(()) => CallbackOutcome::Delivered,
            Err(error) => callback::after_failure(options, d.attempt, d.since, now, error),
        };
        let label = match &outcome {
            CallbackOutcome::Delivered => "delivered",
            CallbackOutcome::Retry { .. } => "retry",
            CallbackOutcome::Failed { .. } => "failed",
        };
        metrics::counter!("offload_callbacks_total", "outcome" => label).increment(1);
        match &outcome {
            CallbackOutcome::Delivered => {}
            CallbackOutcome::Retry { error, .. } => {
                tracing::info!(job = %d.job.id, attempt = d.attempt, %error, "a callback failed; it will be tried again")
            }
            CallbackOutcome::Failed { error } => {
                tracing::warn!(job = %d.job.id, attempt = d.attempt, %error, "a callback failed for good: its retry window ran out")
            }
        }
        match self
            .store
            .record_callback(d.job.id, d.attempt, outcome, now)
            .await
        {
            Ok(true) => {}
            // Its lease ran out and another try took it, or the job was made final again.
            Ok(false) => {
                tracing::info!(job = %d.job.id, "a callback's outcome came too late to record")
            }
            // The row stays pending: tried again once its lease ends (at least once).
            Err(e) => {
                tracing::warn!(job = %d.job.id, error = %e, "recording a callback's outcome failed")
            }
        }
    }
}
