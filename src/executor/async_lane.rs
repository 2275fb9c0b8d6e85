use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;

use super::{panic_error, Executor};
use crate::job::ExecutorKind;
use crate::task::{JobCtx, Task, TaskResult};

/// Runs async tasks as futures on the tokio runtime. Cheap: thousands may wait at once.
pub struct AsyncLane {
    capacity: usize,
}

impl AsyncLane {
    pub fn new(capacity: usize) -> Self {
        AsyncLane { capacity }
    }
}

#[async_trait]
impl Executor for AsyncLane {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Async
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    async fn run(
        &self,
        task: Arc<dyn Task>,
        ctx: JobCtx,
        args: Value,
        permit: OwnedSemaphorePermit,
    ) -> TaskResult {
        // The permit lives as long as this future: a timeout or cancel drops both.
        let _permit = permit;
        match AssertUnwindSafe(task.run_async(ctx, args))
            .catch_unwind()
            .await
        {
            Ok(result) => result,
            Err(payload) => Err(panic_error(payload)),
        }
    }
}
