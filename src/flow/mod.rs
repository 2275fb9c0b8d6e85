//! Flow control: how many jobs of a key may run at once (concurrency keys), how fast jobs of a
//! key may start (rate limits: a token bucket per key), and how a lane's slots are shared
//! between tenants (weighted round-robin among the tenants with due jobs of the same
//! priority).
//!
//! The policy lives here, once, in Rust. A store's claim gathers the facts inside its
//! transaction (due candidates, page by page; how many jobs of each key run; each rate key's
//! bucket) and a [`ClaimPlan`] decides which candidates start; the store then moves exactly
//! those to `running` and writes the buckets back. The job object's `waiting_for` is decided
//! by the same rules ([`waiting_for`]). How each store makes the facts hold across servers
//! (PostgreSQL: advisory locks per key, taken without waiting) is the store's business.
//!
//! Jobs that use none of this (no tenant, no key, no rate) are claimed by the store's plain
//! statement as before: a lane only pays for flow control while a flow-controlled job is
//! queued in it.

//!
//! Layout: this file has the vocabulary (what a spec says, buckets, `waiting_for`, the
//! counts `/v1/stats` shows); [`plan`] has the claim's decisions and the tenants' rotation.

mod plan;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::clock::Micros;
use crate::job::{Job, JobStatus};

pub use plan::{
    Candidate, ClaimPlan, Group, KeyKind, Page, Rotation, Round, Sharing, MAX_ROUNDS, MAX_TENANTS,
};

/// The longest key or tenant name, in characters.
pub const MAX_NAME_CHARS: usize = 255;
pub const MAX_LIMIT: u32 = 1_000_000;
pub const MAX_PER_SECOND: f64 = 1_000_000.0;
pub const MAX_BURST: u32 = 1_000_000;
pub const MAX_WEIGHT: u32 = 1_000;
/// At most `limit` jobs with `key` run at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    pub key: String,
    pub limit: u32,
}

/// Jobs with `key` start at most `per_second` a second on average, `burst` at once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub key: String,
    pub per_second: f64,
    pub burst: u32,
}

/// A task's flow control defaults, from the config (`[task_flow.<task>]`): given to its jobs
/// whose spec names none. A key left out is the task's name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskFlow {
    pub concurrency: Option<ConcurrencyDefault>,
    pub rate: Option<RateDefault>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyDefault {
    pub key: Option<String>,
    pub limit: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateDefault {
    pub key: Option<String>,
    pub per_second: f64,
    #[serde(default = "one")]
    pub burst: u32,
}

fn one() -> u32 {
    1
}

impl TaskFlow {
    pub fn concurrency_for(&self, task: &str) -> Option<Concurrency> {
        self.concurrency.as_ref().map(|c| Concurrency {
            key: c.key.clone().unwrap_or_else(|| task.to_string()),
            limit: c.limit,
        })
    }

    pub fn rate_for(&self, task: &str) -> Option<Rate> {
        self.rate.as_ref().map(|r| Rate {
            key: r.key.clone().unwrap_or_else(|| task.to_string()),
            per_second: r.per_second,
            burst: r.burst,
        })
    }

    /// What is wrong with these defaults, if anything.
    pub fn check(&self) -> Result<(), String> {
        if let Some(c) = &self.concurrency {
            check_key(c.key.as_deref())?;
            check_limit(c.limit)?;
        }
        if let Some(r) = &self.rate {
            check_key(r.key.as_deref())?;
            check_rate(r.per_second, r.burst)?;
        }
        Ok(())
    }
}

fn check_key(key: Option<&str>) -> Result<(), String> {
    match key {
        Some(k) if k.is_empty() || k.chars().count() > MAX_NAME_CHARS => Err(format!(
            "a key must be 1 to {MAX_NAME_CHARS} characters long"
        )),
        _ => Ok(()),
    }
}

pub fn check_limit(limit: u32) -> Result<(), String> {
    if (1..=MAX_LIMIT).contains(&limit) {
        Ok(())
    } else {
        Err(format!("a concurrency limit must be 1 to {MAX_LIMIT}"))
    }
}

pub fn check_rate(per_second: f64, burst: u32) -> Result<(), String> {
    if !(per_second.is_finite() && per_second > 0.0 && per_second <= MAX_PER_SECOND) {
        return Err(format!(
            "per_second must be a number over 0 and at most {MAX_PER_SECOND}"
        ));
    }
    if !(1..=MAX_BURST).contains(&burst) {
        return Err(format!("burst must be 1 to {MAX_BURST}"));
    }
    Ok(())
}

/// Why a queued, due job does not start (its object's `waiting_for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitingFor {
    /// Its concurrency key has `limit` jobs running.
    Concurrency,
    /// Its rate key's bucket is empty; `waiting_until` says when it holds a token again.
    Rate,
}

/// A rate key's token bucket: `tokens` at time `at`. A key with no stored bucket has a full
/// one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    pub tokens: f64,
    pub at: Micros,
}

/// Tokens are counted in floats; a refill that lands a hair under a whole token (rounding)
/// still counts as one.
const WHOLE: f64 = 1.0 - 1e-9;

impl Bucket {
    pub fn full(rate: &Rate, now: Micros) -> Bucket {
        Bucket {
            tokens: rate.burst as f64,
            at: now,
        }
    }

    /// The bucket refilled at `rate` from its time to `now`, up to the burst. A bucket
    /// stamped ahead of `now` (by a clock since stepped back, or by a server that refilled
    /// buckets by its own clock before they were refilled by the database's) refills nothing
    /// and refills from `now` on, rather than holding its key until the clock reaches it.
    pub fn refilled(self, rate: &Rate, now: Micros) -> Bucket {
        let secs = (now.0 - self.at.0).max(0) as f64 / 1e6;
        Bucket {
            tokens: (self.tokens + secs * rate.per_second).min(rate.burst as f64),
            at: now,
        }
    }

    pub fn has_token(self) -> bool {
        self.tokens >= WHOLE
    }

    /// When the bucket holds a whole token (its own time if it holds one now).
    pub fn next_token(self, rate: &Rate) -> Micros {
        if self.has_token() {
            return self.at;
        }
        let secs = (1.0 - self.tokens) / rate.per_second;
        Micros(self.at.0.saturating_add((secs * 1e6).ceil() as i64))
    }
}

/// Why a queued job that is due does not start now, if flow control holds it back, and for a
/// rate until when (on this process's clock).
pub fn waiting_for(
    job: &Job,
    state: &FlowState,
    now: Micros,
) -> Option<(WaitingFor, Option<Micros>)> {
    if job.status != JobStatus::Queued || job.scheduled_at > now {
        return None;
    }
    if let Some(c) = &job.concurrency {
        if state.running.get(&c.key).copied().unwrap_or(0) >= c.limit {
            return Some((WaitingFor::Concurrency, None));
        }
    }
    if let Some(r) = &job.rate {
        if let Some(b) = state.buckets.get(&r.key) {
            let b = b.refilled(r, state.store_time(now));
            if !b.has_token() {
                return Some((WaitingFor::Rate, Some(state.local_time(b.next_token(r)))));
            }
        }
    }
    None
}

/// What flow control looks like for some keys, read without locks (for showing jobs).
#[derive(Clone, Debug, Default)]
pub struct FlowState {
    /// Running jobs per concurrency key (a key missing has none).
    pub running: HashMap<String, u32>,
    /// Stored buckets per rate key (a key missing has a full one), their times on the
    /// store's clock.
    pub buckets: HashMap<String, Bucket>,
    /// The store's clock less this process's, in microseconds, as read with the buckets
    /// (`None` where no bucket was read, or where the store's clock is this process's:
    /// SQLite). Servers sharing a database refill its buckets by its clock, so a server whose
    /// own clock is off neither overfills nor starves a bucket another server wrote.
    pub skew_us: Option<i64>,
}

impl FlowState {
    /// A time on this process's clock as the store's clock would read it.
    pub fn store_time(&self, local: Micros) -> Micros {
        Micros(local.0.saturating_add(self.skew_us.unwrap_or(0)))
    }

    /// A time on the store's clock as this process's clock would read it.
    pub fn local_time(&self, store: Micros) -> Micros {
        Micros(store.0.saturating_sub(self.skew_us.unwrap_or(0)))
    }
}

/// Running and queued jobs of one key or tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FlowCount {
    pub name: String,
    pub running: u64,
    pub queued: u64,
}

/// The busiest keys and tenants, and the rest summed (so a dashboard or a metrics scrape
/// has a bounded number of series however many keys there are).
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlowStats {
    pub concurrency: Top,
    pub rate: Top,
    pub tenants: Top,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Top {
    pub top: Vec<FlowCount>,
    /// The keys (or tenants) past the top, summed.
    pub others: FlowCount,
}

/// Which count a store's flow count row is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counted {
    Concurrency,
    Rate,
    Tenant,
}

impl Counted {
    /// The name stores give this kind in their rows.
    pub fn from_code(code: &str) -> Option<Counted> {
        match code {
            "c" => Some(Counted::Concurrency),
            "r" => Some(Counted::Rate),
            "t" => Some(Counted::Tenant),
            _ => None,
        }
    }
}

impl FlowStats {
    /// The busiest `top` of each kind (most running and queued jobs first, then by name) and
    /// the rest summed, from every key's and tenant's counts.
    pub fn from_counts(counts: impl IntoIterator<Item = (Counted, FlowCount)>, top: usize) -> Self {
        let mut kinds: [Vec<FlowCount>; 3] = Default::default();
        for (kind, count) in counts {
            kinds[kind as usize].push(count);
        }
        let [concurrency, rate, tenants] = kinds.map(|counts| Top::busiest(counts, top));
        FlowStats {
            concurrency,
            rate,
            tenants,
        }
    }
}

impl Top {
    fn busiest(mut counts: Vec<FlowCount>, top: usize) -> Top {
        counts.sort_by(|a, b| {
            (b.running + b.queued)
                .cmp(&(a.running + a.queued))
                .then_with(|| a.name.cmp(&b.name))
        });
        let rest = counts.split_off(top.min(counts.len()));
        let others = rest.iter().fold(FlowCount::default(), |sum, c| FlowCount {
            name: String::new(),
            running: sum.running + c.running,
            queued: sum.queued + c.queued,
        });
        Top {
            top: counts,
            others,
        }
    }
}

/// How many keys and tenants `/v1/stats` and `/metrics` name one by one.
pub const STATS_TOP: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let rate = Rate {
            key: "k".into(),
            per_second: 10.0,
            burst: 3,
        };
        let t0 = Micros(1_000_000);
        let empty = Bucket {
            tokens: 0.0,
            at: t0,
        };
        assert!(!empty.has_token());
        assert_eq!(empty.next_token(&rate), t0.plus(Duration::from_millis(100)));
        let later = empty.refilled(&rate, t0.plus(Duration::from_millis(100)));
        assert!(later.has_token());
        let much_later = empty.refilled(&rate, t0.plus(Duration::from_secs(60)));
        assert_eq!(much_later.tokens, 3.0);
        // A clock behind the bucket's refills nothing, and the bucket refills from then on.
        let behind = empty.refilled(&rate, Micros(0));
        assert_eq!(
            behind,
            Bucket {
                tokens: 0.0,
                at: Micros(0)
            }
        );
        assert_eq!(
            behind.next_token(&rate),
            Micros(0).plus(Duration::from_millis(100))
        );
    }
}
