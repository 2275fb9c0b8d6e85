//! The lanes. Each runs one attempt of a job in its own kind of place:
//!
//! - [`AsyncLane`]: a future on the tokio runtime (io that awaits);
//! - [`BlockingLane`]: tokio's `spawn_blocking` pool (io that blocks);
//! - [`RayonLane`]: a rayon pool, awaited through a oneshot channel (cpu).
//!
//! A lane's capacity is a semaphore owned by the dispatcher; the permit it hands to
//! [`Executor::run`] is held until the work really ends. For the synchronous lanes that can
//! be after `run`'s future was dropped by a timeout or a cancel: the thread goes on until the
//! task looks at its stop flag, and until then its slot stays taken, so a lane never runs more
//! work at once than its capacity.

mod async_lane;
mod blocking;
pub mod process;
pub mod rayon_lane;

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;

use crate::job::ExecutorKind;
use crate::task::{JobCtx, Task, TaskError, TaskResult};

pub use async_lane::AsyncLane;
pub use blocking::BlockingLane;
pub use process::ProcessLane;
pub use rayon_lane::RayonLane;

#[async_trait]
pub trait Executor: Send + Sync + 'static {
    fn kind(&self) -> ExecutorKind;
    /// How many jobs may run in this lane at once.
    fn capacity(&self) -> usize;
    /// How many it can run now: `capacity`, less what the lane lacks for a while (the process
    /// lane's workers that died and are not yet replaced). A claim loop that claims no more
    /// than this leaves the rest queued in the store rather than waiting inside the lane.
    fn live_capacity(&self) -> usize {
        self.capacity()
    }
    /// Per-worker figures, for lanes that have workers (the process lane).
    /// The server stops (after the dispatcher's drain): end what the lane started that
    /// would outlive it. Nothing by default.
    fn shutdown(&self) {}
    fn workers(&self) -> Option<Value> {
        None
    }
    /// Runs one attempt of `task`. Resolves with its result; dropping the future abandons the
    /// attempt (the dispatcher raises the stop flag first).
    async fn run(
        &self,
        task: Arc<dyn Task>,
        ctx: JobCtx,
        args: Value,
        permit: OwnedSemaphorePermit,
    ) -> TaskResult;
}

/// Turns a panic's payload into the `crashed` error a job records.
pub(crate) fn panic_error(payload: Box<dyn Any + Send>) -> TaskError {
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string());
    TaskError::Crashed(format!("the task panicked: {msg}"))
}
