//! The CPU-heavy built-ins: `sum_squares` and `count_primes`.
//!
//! Both do real work whose cost grows with their input (no closed forms), report progress, and
//! look at their stop flag every chunk so that a timeout or a cancel ends them within
//! milliseconds.

use std::hint::black_box;

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{arg_u64, JobCtx, Task, TaskResult};
use crate::job::Kind;

/// The largest `n` for `sum_squares`: the sum stays far below u128::MAX (about 3.3e35).
pub const SUM_SQUARES_MAX_N: u64 = 1_000_000_000_000;
/// The largest `limit` for `count_primes`.
pub const COUNT_PRIMES_MAX_LIMIT: u64 = 100_000_000_000;

/// Numbers summed between two looks at the stop flag: about a millisecond of work.
const SUM_CHUNK: u64 = 1 << 20;

/// Sum of i² for i in [0, n), exactly, by iterating. Stops early when `ctx` says so.
pub fn sum_squares(n: u64, ctx: &JobCtx) -> Result<u128, super::TaskError> {
    let mut total: u128 = 0;
    let mut start = 0u64;
    while start < n {
        ctx.check()?;
        let end = start.saturating_add(SUM_CHUNK).min(n);
        let mut acc: u128 = 0;
        for i in start..end {
            // black_box keeps the optimizer from replacing the loop with n(n-1)(2n-1)/6.
            let x = black_box(i) as u128;
            acc += x * x;
        }
        total += acc;
        start = end;
        ctx.set_progress(start as f64 / n as f64);
    }
    Ok(total)
}

pub struct SumSquares;

#[async_trait]
impl Task for SumSquares {
    fn name(&self) -> &str {
        "sum_squares"
    }
    fn description(&self) -> &str {
        "Sums i² for i < n by iterating (the standard CPU-bound workload); the exact sum as a decimal string."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Cpu]
    }
    fn args_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": SUM_SQUARES_MAX_N}},
            "required": ["n"],
            "additionalProperties": false
        })
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        let n = arg_u64(&args, "n")?;
        let sum = sum_squares(n, ctx)?;
        Ok(json!({ "sum": sum.to_string() }))
    }
}

/// Odd numbers per sieve segment: 256 KiB of flags, which stays in L2.
const SEGMENT: u64 = 1 << 18;

/// How many primes are below `limit`, by a segmented sieve of odd numbers (memory bounded by
/// the segment size and the primes up to √limit).
pub fn count_primes(limit: u64, ctx: &JobCtx) -> Result<u64, super::TaskError> {
    if limit <= 2 {
        return Ok(0);
    }
    // Odd primes p with p² < limit sieve the rest.
    let root = isqrt(limit - 1);
    let base = small_odd_primes(root);
    let mut count = 1; // the prime 2
                       // Odd n = 2k + 1 < limit  <=>  k < limit / 2. Start at k = 1 (n = 3).
    let k_end = limit / 2;
    let mut flags = vec![false; SEGMENT as usize];
    let mut lo = 1u64;
    while lo < k_end {
        ctx.check()?;
        let hi = (lo + SEGMENT).min(k_end);
        let len = (hi - lo) as usize;
        flags[..len].iter_mut().for_each(|f| *f = false);
        let n_lo = 2 * lo + 1;
        for &p in &base {
            let pp = p * p;
            let n_hi = 2 * hi + 1;
            if pp >= n_hi {
                break;
            }
            // First odd multiple of p that is >= max(p², n_lo).
            let mut n = if pp >= n_lo {
                pp
            } else {
                let m = n_lo.div_ceil(p);
                let m = if m % 2 == 0 { m + 1 } else { m };
                m * p
            };
            while n < n_hi {
                flags[((n - 1) / 2 - lo) as usize] = true;
                n += 2 * p;
            }
        }
        count += flags[..len].iter().filter(|&&composite| !composite).count() as u64;
        lo = hi;
        ctx.set_progress(lo as f64 / k_end as f64);
    }
    Ok(count)
}

fn isqrt(n: u64) -> u64 {
    let mut r = (n as f64).sqrt() as u64;
    while r * r > n {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r
}

/// Odd primes up to and including `max`, by a plain sieve.
fn small_odd_primes(max: u64) -> Vec<u64> {
    let max = max as usize;
    let mut composite = vec![false; max + 1];
    let mut primes = Vec::new();
    let mut i = 3;
    while i <= max {
        if !composite[i] {
            primes.push(i as u64);
            let mut j = i * i;
            while j <= max {
                composite[j] = true;
                j += 2 * i;
            }
        }
        i += 2;
    }
    primes
}

pub struct CountPrimes;

#[async_trait]
impl Task for CountPrimes {
    fn name(&self) -> &str {
        "count_primes"
    }
    fn description(&self) -> &str {
        "Counts the primes below `limit` with a segmented sieve (CPU-bound, bounded memory)."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Cpu]
    }
    fn args_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"limit": {"type": "integer", "minimum": 0, "maximum": COUNT_PRIMES_MAX_LIMIT}},
            "required": ["limit"],
            "additionalProperties": false
        })
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        let limit = arg_u64(&args, "limit")?;
        Ok(json!({ "count": count_primes(limit, ctx)? }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobId;

    fn ctx() -> JobCtx {
        JobCtx::new(JobId::new(), 1)
    }

    #[test]
    fn sum_squares_matches_the_formula() {
        for n in [0u64, 1, 2, 3, 10, 1000, SUM_CHUNK + 7] {
            let n128 = n as u128;
            let formula = if n == 0 {
                0
            } else {
                (n128 - 1) * n128 * (2 * n128 - 1) / 6
            };
            assert_eq!(sum_squares(n, &ctx()).unwrap(), formula, "n = {n}");
        }
    }

    #[test]
    fn count_primes_small_limits() {
        let naive = |limit: u64| (2..limit).filter(|&n| (2..n).all(|d| n % d != 0)).count() as u64;
        for limit in [0u64, 1, 2, 3, 4, 10, 11, 100, 1000, 4099] {
            assert_eq!(
                count_primes(limit, &ctx()).unwrap(),
                naive(limit),
                "limit {limit}"
            );
        }
    }

    #[test]
    fn count_primes_across_segments() {
        // π(10^6) = 78498; 10^6 / 2 spans several segments.
        assert_eq!(count_primes(1_000_000, &ctx()).unwrap(), 78_498);
    }

    #[test]
    fn stops_when_told() {
        let c = ctx();
        c.stop(crate::task::StopReason::Cancelled);
        assert!(sum_squares(1 << 30, &c).is_err());
        assert!(count_primes(1 << 30, &c).is_err());
    }
}
