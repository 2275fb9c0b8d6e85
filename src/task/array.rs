//! `array_stats`: count, sum, mean, min, max and population standard deviation of an array
//! blob, read in place from a shared mapping and split across the rayon pool.

use std::path::PathBuf;

use async_trait::async_trait;
use rayon::prelude::*;
use serde_json::{json, Value};
use sha2::Digest;

use super::{arg_str, JobCtx, Split, Task, TaskError, TaskResult};
use crate::job::Kind;
use crate::shm::{Dtype, MappedBlob, OutputMap};

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

/// Where blob `id` lives under `blobs`, if `id` is a blob id at all.
pub(crate) fn blob_path(blobs: &std::path::Path, id: &str) -> Result<PathBuf, TaskError> {
    uuid::Uuid::parse_str(id)
        .map(|u| blobs.join(u.hyphenated().to_string()))
        .map_err(|_| TaskError::Permanent(format!("`{id}` is not a blob id")))
}

/// Maps the blob named by `args.blob` and checks it holds whole elements.
fn open_array(
    blobs: &std::path::Path,
    args: &Value,
) -> Result<(MappedBlob, Dtype, usize), TaskError> {
    let dtype = dtype_of(args)?;
    let id = arg_str(args, "blob")?;
    let map = MappedBlob::open(&blob_path(blobs, id)?)
        .map_err(|e| TaskError::Permanent(format!("blob {id} cannot be read: {e}")))?;
    let len = map.bytes().len();
    if !len.is_multiple_of(dtype.size()) {
        return Err(TaskError::Permanent(format!(
            "blob {id} has {len} bytes, not a whole number of {}-byte elements",
            dtype.size()
        )));
    }
    Ok((map, dtype, len / dtype.size()))
}

/// The statistics of elements [start, end) of the array in `args`: one worker's share of a
/// job split across worker processes.
fn stats_part(
    blobs: &std::path::Path,
    args: &Value,
    start: usize,
    end: usize,
) -> Result<Partial, TaskError> {
    let (map, dtype, n) = open_array(blobs, args)?;
    let (start, end) = (start.min(n), end.min(n));
    let mut total = Partial::EMPTY;
    let mut at = start;
    while at < end {
        let to = (at + CHUNK).min(end);
        total = total.merge(Partial::of(map.bytes(), dtype, at, to));
        at = to;
    }
    Ok(total)
}

impl Partial {
    /// The merge-ready form a worker sends back.
    pub fn to_parts(self) -> Value {
        json!({"count": self.count, "sum": self.sum, "mean": self.mean, "m2": self.m2,
               "min": self.min, "max": self.max})
    }

    pub fn from_parts(v: &Value) -> Option<Partial> {
        let f = |k: &str| v.get(k).and_then(Value::as_f64);
        Some(Partial {
            count: v.get("count")?.as_u64()?,
            sum: f("sum")?,
            mean: f("mean")?,
            m2: f("m2")?,
            // JSON has no infinities: an empty part's min and max come back as null.
            min: f("min").unwrap_or(f64::INFINITY),
            max: f("max").unwrap_or(f64::NEG_INFINITY),
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
    fn split(&self) -> Option<&dyn Split> {
        Some(self)
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        let (map, dtype, n) = open_array(&self.blobs, &args)?;
        let bytes = map.bytes();
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

/// Across worker processes: each maps the same blob and computes one range's [`Partial`]; the
/// parts travel as [`Partial::to_parts`] and merge exactly in any order.
impl Split for ArrayStats {
    fn units(&self, args: &Value) -> Result<usize, TaskError> {
        open_array(&self.blobs, args).map(|(_, _, n)| n)
    }
    fn part(&self, _ctx: &JobCtx, args: &Value, start: usize, end: usize) -> TaskResult {
        // No stop checks: a split job's workers are killed on a cancel or a timeout.
        stats_part(&self.blobs, args, start, end).map(Partial::to_parts)
    }
    fn merge(&self, parts: Vec<Value>) -> TaskResult {
        let mut total = Partial::EMPTY;
        for value in &parts {
            let part = Partial::from_parts(value)
                .ok_or_else(|| TaskError::Crashed("a worker sent a malformed part".into()))?;
            total = total.merge(part);
        }
        Ok(total.to_json())
    }
}

/// `array_sort`: sorts an array blob into a new blob, written through a shared writable
/// mapping of a file whose space is reserved before the first write.
pub struct ArraySort {
    blobs: PathBuf,
}

impl ArraySort {
    pub fn new(blobs: PathBuf) -> Self {
        ArraySort { blobs }
    }
}

/// Decodes, sorts (NaNs last for floats) and encodes into `out`.
fn sort_into(dtype: Dtype, input: &[u8], out: &mut [u8], ctx: &JobCtx) -> Result<(), TaskError> {
    macro_rules! sort_as {
        ($t:ty, $cmp:expr) => {{
            const W: usize = std::mem::size_of::<$t>();
            let mut v: Vec<$t> = input
                .chunks_exact(W)
                .map(|c| <$t>::from_le_bytes(c.try_into().expect("whole elements")))
                .collect();
            ctx.check()?;
            v.sort_unstable_by($cmp);
            ctx.set_progress(0.8);
            ctx.check()?;
            for (dst, x) in out.chunks_exact_mut(W).zip(&v) {
                dst.copy_from_slice(&x.to_le_bytes());
            }
        }};
    }
    match dtype {
        Dtype::F64 => sort_as!(f64, f64::total_cmp),
        Dtype::F32 => sort_as!(f32, f32::total_cmp),
        Dtype::I64 => sort_as!(i64, i64::cmp),
        Dtype::U8 => sort_as!(u8, u8::cmp),
    }
    Ok(())
}

#[async_trait]
impl Task for ArraySort {
    fn name(&self) -> &str {
        "array_sort"
    }
    fn description(&self) -> &str {
        "Sorts an array blob into a new blob (ascending; NaNs last); its id, size and sha256."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Cpu]
    }
    fn args_schema(&self) -> Value {
        ArrayStats::new(PathBuf::new()).args_schema()
    }
    fn blob_args(&self) -> &[&str] {
        &["blob"]
    }
    fn check_blob(&self, args: &Value, size: u64) -> Result<(), String> {
        ArrayStats::new(PathBuf::new()).check_blob(args, size)
    }
    fn writes_blob(&self) -> bool {
        true
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        let (map, dtype, _) = open_array(&self.blobs, &args)?;
        let input = map.bytes();
        let path = crate::blob::output_temp_path(&self.blobs, ctx.id, ctx.attempt);
        // A file left by an earlier run of this same attempt number (a worker killed
        // mid-write, then a restart) is stale.
        let _ = std::fs::remove_file(&path);
        let mut out = OutputMap::create(&path, input.len() as u64)
            .map_err(|e| TaskError::Transient(format!("cannot reserve the output blob: {e}")))?;
        sort_into(dtype, input, out.bytes_mut(), ctx)?;
        out.flush()
            .map_err(|e| TaskError::Transient(format!("cannot write the output blob: {e}")))?;
        let sha = crate::task::hex(&sha2::Sha256::digest(out.bytes_mut()));
        Ok(
            json!({ "size": input.len(), "sha256": sha, "dtype": args.get("dtype").and_then(Value::as_str).unwrap_or("f64") }),
        )
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
