use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::{panic_error, Executor};
use crate::job::ExecutorKind;
use crate::task::{JobCtx, Task, TaskError, TaskResult};

/// The nice value of threads and processes that do CPU work.
pub const CPU_NICENESS: i32 = 10;

/// Runs cpu tasks on a dedicated rayon pool and awaits them through a oneshot channel, so the
/// runtime thread that awaits is free to do other work meanwhile.
pub struct RayonLane {
    pool: rayon::ThreadPool,
    threads: usize,
    /// Cores for cpu work, shared with the process lane.
    budget: Arc<Semaphore>,
}

impl RayonLane {
    pub fn new(
        threads: usize,
        budget: Arc<Semaphore>,
    ) -> Result<Self, rayon::ThreadPoolBuildError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("offload-cpu-{i}"))
            // Below the runtime threads: CPU work must not delay answering requests.
            .start_handler(|_| crate::shm::lower_thread_priority(CPU_NICENESS))
            .build()?;
        Ok(RayonLane {
            pool,
            threads,
            budget,
        })
    }
}

#[async_trait]
impl Executor for RayonLane {
    fn kind(&self) -> ExecutorKind {
        ExecutorKind::Rayon
    }
    fn capacity(&self) -> usize {
        // One job per pool thread: the dispatcher never queues work inside rayon, so the
        // queue order (priority, schedule) is the order jobs start in.
        self.threads
    }
    async fn run(
        &self,
        task: Arc<dyn Task>,
        ctx: JobCtx,
        args: Value,
        permit: OwnedSemaphorePermit,
    ) -> TaskResult {
        // A core from the shared budget, held (like the lane slot) until the work returns.
        let core = self
            .budget
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TaskError::Crashed("the cpu budget is closed".into()))?;
        let (tx, rx) = oneshot::channel();
        let span = tracing::Span::current();
        self.pool.spawn(move || {
            let _enter = span.enter();
            let result = catch_unwind(AssertUnwindSafe(|| task.run_sync(&ctx, args)))
                .unwrap_or_else(|payload| Err(panic_error(payload)));
            // Free the slot and the core before anyone hears of the result: a caller who sees
            // the job finish and submits the next must find them free.
            drop(core);
            drop(permit);
            // The receiver is gone if the job timed out or was cancelled: nothing to do.
            let _ = tx.send(result);
        });
        rx.await
            .unwrap_or_else(|_| Err(TaskError::Crashed("the cpu task was lost".into())))
    }
}
