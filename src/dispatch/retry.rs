//! The retry policy: how long a job waits before its next attempt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::Micros;

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
pub(crate) fn unit_random() -> f64 {
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

/// Backoff for the server's own writes that failed (a full disk, a lost database): doubles
/// from 50 ms to 5 s.
pub(crate) struct WriteBackoff(Duration);

impl WriteBackoff {
    pub fn new() -> Self {
        WriteBackoff(Duration::from_millis(50))
    }

    pub fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        now
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
    fn write_backoff_doubles_to_five_seconds() {
        let mut b = WriteBackoff::new();
        let waits: Vec<u128> = (0..10).map(|_| b.next().as_millis()).collect();
        assert_eq!(waits[..4], [50, 100, 200, 400]);
        assert_eq!(*waits.last().unwrap(), 5000);
    }
}
