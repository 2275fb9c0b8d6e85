//! The small built-in tasks: `noop`, `sleep`, `blocking_sleep`, `fail`, `sum_parents`.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{arg_u64, IoStyle, JobCtx, Task, TaskError, TaskResult};
use crate::job::Kind;

/// The longest sleep a job may ask for: one day.
const MAX_SLEEP_MS: u64 = 86_400_000;

fn sleep_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"ms": {"type": "integer", "minimum": 0, "maximum": MAX_SLEEP_MS,
                              "description": "how long to sleep, in milliseconds"}},
        "required": ["ms"],
        "additionalProperties": false
    })
}

/// Does nothing: the cost of the machinery itself.
pub struct Noop;

#[async_trait]
impl Task for Noop {
    fn name(&self) -> &str {
        "noop"
    }
    fn description(&self) -> &str {
        "Does nothing and returns {}: measures the service's own overhead."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Io, Kind::Cpu]
    }
    fn args_schema(&self) -> Value {
        json!({"type": "object", "properties": {}, "additionalProperties": false})
    }
    async fn run_async(&self, _ctx: JobCtx, _args: Value) -> TaskResult {
        Ok(json!({}))
    }
    fn run_sync(&self, _ctx: &JobCtx, _args: Value) -> TaskResult {
        Ok(json!({}))
    }
}

/// Awaits a timer: the model of an io job that waits on the network.
pub struct Sleep;

#[async_trait]
impl Task for Sleep {
    fn name(&self) -> &str {
        "sleep"
    }
    fn description(&self) -> &str {
        "Awaits a tokio timer for `ms` milliseconds (async io)."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Io]
    }
    fn args_schema(&self) -> Value {
        sleep_schema()
    }
    async fn run_async(&self, _ctx: JobCtx, args: Value) -> TaskResult {
        let ms = arg_u64(&args, "ms")?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(json!({ "slept_ms": ms }))
    }
}

/// Blocks its thread with `std::thread::sleep`: the call that must never run on the runtime.
pub struct BlockingSleep;

#[async_trait]
impl Task for BlockingSleep {
    fn name(&self) -> &str {
        "blocking_sleep"
    }
    fn description(&self) -> &str {
        "Blocks its thread with std::thread::sleep for `ms` milliseconds (blocking io)."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Io]
    }
    fn io_style(&self) -> IoStyle {
        IoStyle::Blocking
    }
    fn args_schema(&self) -> Value {
        sleep_schema()
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        let ms = arg_u64(&args, "ms")?;
        let total = Duration::from_millis(ms);
        let start = Instant::now();
        // Sleep in short slices so a cancel or a timeout is seen within 10 ms.
        loop {
            ctx.check()?;
            let elapsed = start.elapsed();
            if elapsed >= total {
                break;
            }
            ctx.set_progress(elapsed.as_secs_f64() / total.as_secs_f64());
            std::thread::sleep((total - elapsed).min(Duration::from_millis(10)));
        }
        Ok(json!({ "slept_ms": ms }))
    }
}

/// Fails every attempt before `until_attempt`, then succeeds: for trying retry policies.
pub struct Fail;

impl Fail {
    fn attempt(ctx: &JobCtx, args: &Value) -> TaskResult {
        let until = args.get("until_attempt").and_then(Value::as_u64);
        let message = args
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("failed on purpose");
        match until {
            Some(k) if u64::from(ctx.attempt) >= k => Ok(json!({ "attempt": ctx.attempt })),
            _ => Err(TaskError::Transient(format!(
                "{message} (attempt {})",
                ctx.attempt
            ))),
        }
    }
}

#[async_trait]
impl Task for Fail {
    fn name(&self) -> &str {
        "fail"
    }
    fn description(&self) -> &str {
        "Fails every attempt before `until_attempt` (always, if it is absent), then returns {attempt}."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Io, Kind::Cpu]
    }
    fn args_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {
                "until_attempt": {"type": "integer", "minimum": 1, "maximum": 100},
                "message": {"type": "string", "maxLength": 1000}
            },
            "additionalProperties": false
        })
    }
    async fn run_async(&self, ctx: JobCtx, args: Value) -> TaskResult {
        Fail::attempt(&ctx, &args)
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        Fail::attempt(ctx, &args)
    }
}

/// Adds up the numbers its parents returned, plus `add`: the smallest task that uses a graph.
pub struct SumParents;

impl SumParents {
    fn sum(ctx: &JobCtx, args: &Value) -> TaskResult {
        let mut int: Option<i64> = Some(0);
        let mut float = 0f64;
        let mut add = |n: &serde_json::Number| {
            int = match (int, n.as_i64()) {
                (Some(a), Some(b)) => a.checked_add(b),
                _ => None,
            };
            float += n.as_f64().unwrap_or(0.0);
        };
        if let Some(Value::Number(n)) = args.get("add") {
            add(n);
        }
        if let Some(Value::Object(results)) = ctx.parents() {
            for result in results.values() {
                match result {
                    Value::Number(n) => add(n),
                    // Another sum_parents (or any task that answers {"sum": n}): its sum.
                    Value::Object(fields) if fields.get("sum").is_some_and(Value::is_number) => {
                        if let Some(Value::Number(n)) = fields.get("sum") {
                            add(n)
                        }
                    }
                    Value::Object(fields) => fields.values().for_each(|v| {
                        if let Value::Number(n) = v {
                            add(n)
                        }
                    }),
                    _ => {}
                }
            }
        }
        let sum = match int {
            Some(i) => json!(i),
            None => json!(float),
        };
        Ok(json!({ "sum": sum }))
    }
}

#[async_trait]
impl Task for SumParents {
    fn name(&self) -> &str {
        "sum_parents"
    }
    fn description(&self) -> &str {
        "Adds up the numbers its parents (depends_on) returned, plus `add`: a parent's result \
         that is a number counts as itself, an object with a numeric `sum` counts that, any \
         other object its top-level numbers. Returns {sum}."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Io, Kind::Cpu]
    }
    fn args_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"add": {"type": "number", "description": "added to the sum"}},
            "additionalProperties": false
        })
    }
    fn parent_results(&self) -> bool {
        true
    }
    async fn run_async(&self, ctx: JobCtx, args: Value) -> TaskResult {
        SumParents::sum(&ctx, &args)
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        SumParents::sum(ctx, &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobId;

    #[test]
    fn sum_parents_adds_numbers_and_the_numbers_of_objects() {
        let ctx = JobCtx::new(JobId::new(), 1);
        ctx.set_parents(
            json!({"a": 2, "b": {"sum": 3, "n": 7}, "c": {"x": 1, "y": 4},
            "d": null}),
        );
        let out = SumParents::sum(&ctx, &json!({"add": 10})).unwrap();
        assert_eq!(out, json!({"sum": 20}));
        let out = SumParents::sum(&ctx, &json!({"add": 0.5})).unwrap();
        assert_eq!(out, json!({"sum": 10.5}));
        let alone = JobCtx::new(JobId::new(), 1);
        assert_eq!(
            SumParents::sum(&alone, &json!({})).unwrap(),
            json!({"sum": 0})
        );
    }
}
