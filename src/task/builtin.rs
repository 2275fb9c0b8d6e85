//! The small built-in tasks: `noop`, `sleep`, `blocking_sleep`, `fail`.

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
