//! Wall-clock timestamps as microseconds since the Unix epoch.
//!
//! Jobs are stored with integer timestamps (cheap to compare, index and subtract) and shown to
//! callers as RFC 3339 strings.
//!
//! Leases are not timed by this clock on a shared store: PostgreSQL stamps lease expiries with
//! its own clock (`now()`), so servers whose clocks disagree cannot requeue each other's live
//! jobs (see `crate::store::Lease`).
//!
//! **Test only:** `OFFLOAD_TEST_CLOCK_OFFSET_MS` (a signed number of milliseconds, read once)
//! shifts this process's clock, so tests can run a server whose clock is far off. It is not a
//! setting: it is not in `--help`, the config file or the README's settings, and nothing but
//! tests should set it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Microseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micros(pub i64);

/// The test-only shift of this process's clock, in microseconds (`OFFLOAD_TEST_CLOCK_OFFSET_MS`).
fn test_offset() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var("OFFLOAD_TEST_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .map_or(0, |ms| ms.saturating_mul(1000))
    })
}

impl Micros {
    /// This process's wall clock (shifted by the test-only offset, if set).
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Micros((since.as_micros() as i64).saturating_add(test_offset()))
    }

    pub fn plus(self, d: Duration) -> Self {
        Micros(
            self.0
                .saturating_add(d.as_micros().min(i64::MAX as u128) as i64),
        )
    }

    pub fn minus(self, d: Duration) -> Self {
        Micros(
            self.0
                .saturating_sub(d.as_micros().min(i64::MAX as u128) as i64),
        )
    }

    /// Milliseconds from `earlier` to `self`, as a float (negative if `earlier` is later).
    pub fn ms_since(self, earlier: Micros) -> f64 {
        (self.0 - earlier.0) as f64 / 1000.0
    }

    /// How long from now until this instant; zero if it has passed.
    pub fn until(self) -> Duration {
        let now = Micros::now();
        Duration::from_micros(self.0.saturating_sub(now.0).max(0) as u64)
    }

    pub fn parse_rfc3339(s: &str) -> Result<Self, String> {
        let t = OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|e| format!("`{s}` is not an RFC 3339 timestamp: {e}"))?;
        Ok(Micros((t.unix_timestamp_nanos() / 1000) as i64))
    }

    pub fn to_rfc3339(self) -> String {
        let nanos = self.0 as i128 * 1000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
    }
}

impl Serialize for Micros {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip_keeps_microseconds() {
        let t = Micros(1_764_060_000_123_456);
        assert_eq!(Micros::parse_rfc3339(&t.to_rfc3339()).unwrap(), t);
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(Micros::parse_rfc3339("tomorrow").is_err());
    }
}
