use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;

use super::{panic_error, Executor};
use crate::job::ExecutorKind;
use crate::task::{JobCtx, Task, TaskResult};

/// Runs blocking io tasks on tokio's blocking thread pool, never on a runtime worker, so a
/// `thread::sleep` or a sync file read cannot stall the async jobs and the HTTP server.
pub struct BlockingLane {
    threads: usize,
}

impl BlockingLane {
    /// `threads` should not exceed the runtime's `max_blocking_threads` (see `app.rs`).
    pub fn new(threads: usize) -> Self {
        BlockingLane { threads }
    }
}

#[async_trait]
impl Executor for BlockingLane {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Blocking
    }
    fn capacity(&self) -> usize {
        self.threads
    }
    async fn run(
        &self,
        task: Arc<dyn Task>,
        ctx: JobCtx,
        args: Value,
        permit: OwnedSemaphorePermit,
    ) -> TaskResult {
        // Carry the job's span onto the blocking thread.
        let span = tracing::Span::current();
        let handle = tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            // Held until the work returns, even if the awaiting side has given up on it.
            let _permit = permit;
            task.run_sync(&ctx, args)
        });
        match handle.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(panic_error(e.into_panic())),
            Err(e) => Err(crate::task::TaskError::Crashed(format!(
                "the blocking task was lost: {e}"
            ))),
        }
    }
}
