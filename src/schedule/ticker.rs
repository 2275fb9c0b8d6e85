//! The ticker: one task per server that sleeps until the soonest tick of any active schedule,
//! fires what is due, and sleeps again. It wakes sooner when the store announces a schedule
//! change (`Notice::Schedules`, from this server or, on PostgreSQL, another), and looks at
//! least every [`LOOK_EVERY`] in case an announcement was lost (a dropped LISTEN connection).
//!
//! Every server runs one; which of them fires a tick does not matter: the store stores a
//! wake-up only if the schedule is still due at the `next_run` the ticker read (see
//! [`crate::store::Fire`]), so a tick makes one job however many servers wake for it, and a
//! restart never makes it again.

use std::sync::Arc;
use std::time::Duration;

use super::{pick, tick_key, Schedule, MAX_CATCH_UP};
use crate::clock::Micros;
use crate::dispatch::Dispatcher;
use crate::spec::{self, SpecDefaults};
use crate::store::{Fire, StoreError};

/// The longest the ticker sleeps without looking at the store.
pub const LOOK_EVERY: Duration = Duration::from_secs(5);
/// How many due schedules one look fires before looking again.
const BATCH: u32 = 100;
/// After a store error, the wait before trying again.
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// When a schedule's own cron expression or time zone no longer parses (the system's tz
/// database lost the zone), how long until it is tried again.
const BROKEN_RETRY: Duration = Duration::from_secs(3600);

pub struct Ticker {
    dispatcher: Arc<Dispatcher>,
    defaults: SpecDefaults,
    grace: Duration,
}

impl Ticker {
    pub fn new(dispatcher: Arc<Dispatcher>, defaults: SpecDefaults, grace: Duration) -> Self {
        Ticker {
            dispatcher,
            defaults,
            grace,
        }
    }

    /// Runs until the server starts to drain.
    pub async fn run(self) {
        let wake = self.dispatcher.schedule_wake();
        let mut stopping = self.dispatcher.stopping();
        loop {
            if *stopping.borrow() {
                return;
            }
            let sleep = match self.round().await {
                Ok(sleep) => sleep,
                Err(e) => {
                    tracing::warn!(error = %e, "firing schedules failed; trying again");
                    ERROR_PAUSE
                }
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
                changed = stopping.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Fires every due schedule; answers how long to sleep until the next one is due.
    async fn round(&self) -> Result<Duration, StoreError> {
        let store = self.dispatcher.store().clone();
        loop {
            let now = Micros::now();
            let next = store.next_schedules(BATCH).await?;
            let Some(soonest) = next.first() else {
                return Ok(LOOK_EVERY);
            };
            if soonest.next_run > now {
                return Ok(soonest.next_run.until().min(LOOK_EVERY));
            }
            for schedule in next.iter().take_while(|s| s.next_run <= now) {
                if self.dispatcher.is_draining() {
                    return Ok(LOOK_EVERY);
                }
                self.fire(schedule, now).await?;
            }
            // Each one fired has moved on (or another server moved it): look again.
        }
    }

    /// One wake-up of a due schedule: its due ticks, which of them `catch_up` fires, their
    /// jobs, and the next tick after `now`.
    async fn fire(&self, schedule: &Schedule, now: Micros) -> Result<(), StoreError> {
        let store = self.dispatcher.store();
        let mut fire = Fire {
            name: schedule.name.clone(),
            expected: schedule.next_run,
            jobs: Vec::new(),
            next_run: now.plus(BROKEN_RETRY),
            last_tick: schedule.last_tick,
            error: None,
            now,
        };
        match schedule.timetable() {
            Err(e) => {
                tracing::warn!(schedule = %schedule.name, error = %e, "a schedule no longer parses");
                fire.error = Some(e);
            }
            Ok(timetable) => {
                if let Some(next) = timetable.next_after(now) {
                    fire.next_run = next;
                }
                let due = timetable.due(schedule.next_run, now, MAX_CATCH_UP);
                let ticks = pick(&due, now, self.grace, schedule.catch_up);
                if due.len() > ticks.len() {
                    tracing::info!(
                        schedule = %schedule.name,
                        missed = due.len() - ticks.len(),
                        catch_up = schedule.catch_up.as_str(),
                        "skipped missed ticks"
                    );
                }
                match self.jobs(schedule, &ticks, now).await? {
                    Ok(jobs) => {
                        fire.last_tick = ticks.last().copied().or(schedule.last_tick);
                        fire.jobs = jobs;
                    }
                    Err(e) => {
                        tracing::warn!(schedule = %schedule.name, error = %e, "a schedule's job spec is no longer valid; its ticks made no job");
                        fire.error = Some(e);
                    }
                }
            }
        }
        if let Some(jobs) = store.fire_schedule(fire).await? {
            self.dispatcher.stored(&jobs);
        }
        Ok(())
    }

    /// The jobs of `ticks`: the schedule's spec parsed as a submit is, keyed per tick, due at
    /// its tick (plus the spec's `delay_ms`). An error says why the spec is no longer valid
    /// (a task or a blob gone since the schedule was made).
    async fn jobs(
        &self,
        schedule: &Schedule,
        ticks: &[Micros],
        now: Micros,
    ) -> Result<Result<Vec<crate::job::NewJob>, String>, StoreError> {
        if ticks.is_empty() {
            return Ok(Ok(Vec::new()));
        }
        let registry = self.dispatcher.registry();
        let sizes =
            spec::blob_sizes(self.dispatcher.store().as_ref(), registry, &[&schedule.job]).await?;
        let mut jobs = Vec::with_capacity(ticks.len());
        for &tick in ticks {
            let key = tick_key(&schedule.name, tick);
            let mut job = match spec::parse(
                &schedule.job,
                "job",
                Some(&key),
                registry,
                &self.defaults,
                &sizes,
                now,
            ) {
                Ok(job) => job,
                Err(e) => return Ok(Err(e)),
            };
            let delay = job.scheduled_at.0 - now.0;
            job.scheduled_at = Micros(tick.0 + delay);
            jobs.push(job);
        }
        Ok(Ok(jobs))
    }
}
