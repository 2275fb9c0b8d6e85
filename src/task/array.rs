//! `array_stats`: count, sum, mean, min, max and population standard deviation of an array
//! blob, read in place from a shared mapping and split across the rayon pool.

use std::path::PathBuf;

use async_trait::async_trait;
use rayon::prelude::*;
use serde_json::{json, Value};

use super::{arg_str, JobCtx, Task, TaskError, TaskResult};
use crate::job::Kind;
use crate::shm::{Dtype, MappedBlob};

/// Elements per piece of work: big enough to stream memory, small enough to stop promptly.
const CHUNK: usize = 1 << 20;

/// Partial statistics of a piece of the array, combinable in any order (Chan et al.'s
/// parallel variance), so pieces computed by different threads or processes merge exactly.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Partial {
    pub count: u64,
    pub sum: f64,
    pub mean: f64,
    /// Sum of squared deviations from `mean`.
    pub m2: f64,
    pub min: f64,
    pub max: f64,
}

impl Partial {
    pub const EMPTY: Partial = Partial {
        count: 0,
        sum: 0.0,
        mean: 0.0,
        m2: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
    };

    /// Two passes over a piece that fits in cache: its mean, then the squared deviations.
    pub fn of(bytes: &[u8], dtype: Dtype, start: usize, end: usize) -> Partial {
        if start >= end {
            return Partial::EMPTY;
        }
        let (mut sum, mut min, mut max) = (0.0, f64::INFINITY, f64::NEG_INFINITY);
        for i in start..end {
            let x = dtype.get(bytes, i);
            sum += x;
            min = min.min(x);
            max = max.max(x);
        }
        let count = (end - start) as u64;
        let mean = sum / count as f64;
        let mut m2 = 0.0;
        for i in start..end {
            let d = dtype.get(bytes, i) - mean;
            m2 += d * d;
        }
        Partial {
            count,
            sum,
            mean,
            m2,
            min,
            max,
        }
    }

    pub fn merge(self, other: Partial) -> Partial {
        if self.count == 0 {
            return other;
        }
        if other.count == 0 {
            return self;
        }
        let count = self.count + other.count;
        let delta = other.mean - self.mean;
        let mean = self.mean + delta * other.count as f64 / count as f64;
        let m2 = self.m2
            + other.m2
            + delta * delta * (self.count as f64 * other.count as f64) / count as f64;
        Partial {
            count,
            sum: self.sum + other.sum,
            mean,
            m2,
            min: self.min.min(other.min),
            max: self.max.max(other.max),
        }
    }

    pub fn to_json(self) -> Value {
        if self.count == 0 {
            return json!({"count": 0, "sum": 0.0, "mean": null, "min": null, "max": null, "std": null});
        }
        json!({
            "count": self.count,
            "sum": self.sum,
            "mean": self.mean,
            "min": self.min,
            "max": self.max,
            "std": (self.m2 / self.count as f64).sqrt(),
        })
    }
}

pub struct ArrayStats {
    blobs: PathBuf,
}

impl ArrayStats {
    /// `blobs` is the folder of blob files (`<data-dir>/blobs`).
    pub fn new(blobs: PathBuf) -> Self {
        ArrayStats { blobs }
    }
}

pub(crate) fn dtype_of(args: &Value) -> Result<Dtype, TaskError> {
    let name = args.get("dtype").and_then(Value::as_str).unwrap_or("f64");
    Dtype::parse(name).ok_or_else(|| TaskError::Permanent(format!("unknown dtype `{name}`")))
}

#[async_trait]
impl Task for ArrayStats {
    fn name(&self) -> &str {
        "array_stats"
    }
    fn description(&self) -> &str {
        "count, sum, mean, min, max and population std of an array blob (raw little-endian numbers), read in place from shared memory."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Cpu]
    }
    fn args_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "blob": {"type": "string", "minLength": 1, "maxLength": 64},
                "dtype": {"type": "string", "enum": ["f64", "f32", "i64", "u8"], "default": "f64"}
            },
            "required": ["blob"],
            "additionalProperties": false
        })
    }
    fn blob_args(&self) -> &[&str] {
        &["blob"]
    }
    fn check_blob(&self, args: &Value, size: u64) -> Result<(), String> {
        let dtype = dtype_of(args).map_err(|e| e.to_string())?;
        if !size.is_multiple_of(dtype.size() as u64) {
            return Err(format!(
                "args.blob: its {size} bytes are not a whole number of {}-byte {} elements",
                dtype.size(),
                args.get("dtype").and_then(Value::as_str).unwrap_or("f64")
            ));
        }
        Ok(())
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        let dtype = dtype_of(&args)?;
        let id = arg_str(&args, "blob")?;
        let path = uuid::Uuid::parse_str(id)
            .map(|u| self.blobs.join(u.hyphenated().to_string()))
            .map_err(|_| TaskError::Permanent(format!("`{id}` is not a blob id")))?;
        let map = MappedBlob::open(&path)
            .map_err(|e| TaskError::Permanent(format!("blob {id} cannot be read: {e}")))?;
        let bytes = map.bytes();
        if !bytes.len().is_multiple_of(dtype.size()) {
            return Err(TaskError::Permanent(format!(
                "blob {id} has {} bytes, not a whole number of {}-byte elements",
                bytes.len(),
                dtype.size()
            )));
        }
        let n = bytes.len() / dtype.size();
        let chunks = n.div_ceil(CHUNK);
        let done = std::sync::atomic::AtomicUsize::new(0);
        let total = (0..chunks)
            .into_par_iter()
            .map(|c| {
                ctx.check()?;
                let p = Partial::of(bytes, dtype, c * CHUNK, ((c + 1) * CHUNK).min(n));
                let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                ctx.set_progress(d as f64 / chunks as f64);
                Ok(p)
            })
            .try_reduce(|| Partial::EMPTY, |a, b| Ok(a.merge(b)))?;
        Ok(total.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_pieces_equal_the_whole() {
        let xs: Vec<f64> = (0..1000).map(|i| ((i * 37) % 101) as f64 - 50.0).collect();
        let bytes: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let whole = Partial::of(&bytes, Dtype::F64, 0, 1000);
        let parts = Partial::of(&bytes, Dtype::F64, 0, 333)
            .merge(Partial::of(&bytes, Dtype::F64, 333, 334))
            .merge(Partial::of(&bytes, Dtype::F64, 334, 1000));
        assert_eq!(parts.count, whole.count);
        assert!((parts.m2 - whole.m2).abs() < 1e-6 * whole.m2);
        assert!((parts.mean - whole.mean).abs() < 1e-12);
        assert_eq!((parts.min, parts.max), (-50.0, 50.0));
    }
}
