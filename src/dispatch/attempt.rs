//! One attempt: make its blobs local, run it in its lane under its timeout and stop flag,
//! turn how it ended into the next state ([`crate::job::next_state`]), and write that.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use super::retry::WriteBackoff;
use super::Dispatcher;
use crate::blob::BlobDir;
use crate::clock::Micros;
use crate::job::{next_state, AttemptEnd, Job, JobStatus};
use crate::store::Settle;
use crate::task::{JobCtx, StopReason, Task, TaskError, TaskResult};

/// The longest a blob fetch from another server may take, whatever the job's own timeout.
const BLOB_FETCH_TIMEOUT: Duration = Duration::from_secs(600);

impl Dispatcher {
    pub(super) async fn run_attempt(
        self: Arc<Self>,
        job: Job,
        ctx: JobCtx,
        permit: OwnedSemaphorePermit,
    ) {
        let lane = &self.lanes[&job.executor];
        if let Some(started) = job.started_at {
            metrics::histogram!("offload_job_queue_seconds", "executor" => job.executor.as_str())
                .record(started.ms_since(job.scheduled_at).max(0.0) / 1000.0);
        }
        let run_started = std::time::Instant::now();

        let task = self.registry.get(&job.task).cloned();
        let writes_blob = task.as_ref().is_some_and(|t| t.writes_blob());
        let result: TaskResult = match task {
            None => Err(TaskError::Permanent(format!(
                "task `{}` is not registered in this server",
                job.task
            ))),
            Some(task) => {
                // Fetching the job's blobs is part of the attempt: it obeys the job's timeout
                // and its cancel like the work itself.
                let work = async {
                    self.local_blobs(task.as_ref(), &job).await?;
                    self.parent_results(task.as_ref(), &job, &ctx).await?;
                    lane.executor
                        .run(task.clone(), ctx.clone(), job.args.clone(), permit)
                        .await
                };
                let timeout = async {
                    match job.timeout_ms {
                        Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = work => r,
                    _ = timeout => {
                        ctx.stop(StopReason::TimedOut);
                        Err(TaskError::Stopped)
                    }
                    _ = ctx.stopped() => Err(TaskError::Stopped),
                }
            }
        };

        metrics::histogram!("offload_job_run_seconds", "executor" => job.executor.as_str())
            .record(run_started.elapsed().as_secs_f64());
        let result = match (writes_blob, &self.blobs) {
            (true, Some(blobs)) => match result {
                Ok(value) => self.adopt_output(blobs, &job, value).await,
                Err(e) => {
                    blobs.discard_output(job.id, job.attempt);
                    Err(e)
                }
            },
            _ => result,
        };
        let end = match result {
            Ok(value) => AttemptEnd::Succeeded(value),
            Err(TaskError::Permanent(msg)) => AttemptEnd::Permanent(msg),
            Err(TaskError::Transient(msg)) => AttemptEnd::Transient(msg),
            Err(TaskError::Crashed(msg)) => AttemptEnd::Crashed(msg),
            Err(TaskError::Stopped) => match ctx.stop_reason() {
                Some(StopReason::Cancelled) => AttemptEnd::Cancelled,
                Some(StopReason::TimedOut) => AttemptEnd::TimedOut,
                // The drain that stopped it hands the job back itself, once.
                Some(StopReason::Shutdown) => AttemptEnd::Cancelled,
                None => AttemptEnd::Transient("the task stopped without being asked to".into()),
            },
        };
        self.record(&job, &ctx, end).await;
        lane.running.fetch_sub(1, Ordering::AcqRel);
        // Only now is the attempt over: a drain waits for the outcome to be written, not just
        // for the work to return.
        self.unregister(&ctx);
    }

    /// Writes how an attempt ended. A write that fails (a full disk, a lost database) is tried
    /// again with backoff until it is written or the server stops; a job is never left
    /// `running` by a write that failed once. (If the server stops first, start-up recovery
    /// or a lease rescue moves the job on.)
    async fn record(&self, job: &Job, ctx: &JobCtx, end: AttemptEnd) {
        let now = Micros::now();
        let Some(next) = next_state(job, end, self.retry.backoff(job.attempt), now) else {
            return;
        };
        let settle = Settle {
            job: job.clone(),
            next,
            progress: ctx.progress(),
            now,
            expired_before: None,
        };
        let mut backoff = WriteBackoff::new();
        loop {
            match self.store.settle(vec![settle.clone()]).await {
                Ok(mut moved) => {
                    // None: a cancel or a rescue got there first; its state stands.
                    if let Some(job) = moved.pop().flatten() {
                        self.recorded(&job);
                    }
                    return;
                }
                Err(crate::store::StoreError::Closed) => return,
                Err(e) => {
                    let wait = backoff.next();
                    tracing::error!(error = %e, retry_in_ms = wait.as_millis() as u64,
                        "writing the outcome failed; trying again");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn recorded(&self, job: &Job) {
        let lane = &self.lanes[&job.executor];
        match job.status {
            JobStatus::Succeeded => {
                lane.succeeded.fetch_add(1, Ordering::Relaxed);
            }
            JobStatus::Failed => {
                lane.failed.fetch_add(1, Ordering::Relaxed);
            }
            JobStatus::Queued => lane.count_queued(1),
            JobStatus::Waiting | JobStatus::Running | JobStatus::Cancelled => {}
        }
        self.callback_owed(job);
        self.events.publish(job);
    }

    /// Makes sure the blobs a job names are on this server's disk, fetching any that another
    /// server took the upload of. A blob that cannot be fetched now fails the attempt as
    /// transient: it is retried.
    async fn local_blobs(&self, task: &dyn Task, job: &Job) -> Result<(), TaskError> {
        let Some(blobs) = &self.blobs else {
            return Ok(());
        };
        for arg in task.blob_args() {
            let Some(id) = job.args.get(*arg).and_then(serde_json::Value::as_str) else {
                continue;
            };
            if blobs.path(id).is_some_and(|p| p.exists()) {
                continue;
            }
            let meta = self
                .store
                .get_blob(id)
                .await
                .map_err(|e| TaskError::Transient(format!("looking up blob {id}: {e}")))?
                .ok_or_else(|| TaskError::Permanent(format!("blob {id} no longer exists")))?;
            tokio::time::timeout(
                BLOB_FETCH_TIMEOUT,
                blobs.fetch(&meta, &self.http, self.api_token.as_deref()),
            )
            .await
            .map_err(|_| {
                TaskError::Transient(format!(
                    "fetching blob {id} took longer than {} s",
                    BLOB_FETCH_TIMEOUT.as_secs()
                ))
            })?
            .map_err(TaskError::Transient)?;
            tracing::info!(blob = %id, origin = ?meta.origin, "fetched a blob from the server that holds it");
        }
        Ok(())
    }

    /// Hands a task that asks for them its parents' results, `{parent id: result}`. A read
    /// that fails now fails the attempt as transient: it is retried.
    async fn parent_results(
        &self,
        task: &dyn Task,
        job: &Job,
        ctx: &JobCtx,
    ) -> Result<(), TaskError> {
        if !task.parent_results() || job.depends_on.is_empty() {
            return Ok(());
        }
        let results = self
            .store
            .results(&job.depends_on)
            .await
            .map_err(|e| TaskError::Transient(format!("reading the parents' results: {e}")))?;
        ctx.set_parents(serde_json::Value::Object(
            results
                .into_iter()
                .map(|(id, r)| (id.to_string(), r.unwrap_or(serde_json::Value::Null)))
                .collect(),
        ));
        Ok(())
    }

    /// Makes an attempt's output file a stored blob and names it in the result.
    async fn adopt_output(
        &self,
        blobs: &BlobDir,
        job: &Job,
        mut value: serde_json::Value,
    ) -> TaskResult {
        let size = value.get("size").and_then(serde_json::Value::as_u64);
        let sha = value
            .get("sha256")
            .and_then(serde_json::Value::as_str)
            .map(String::from);
        let (Some(size), Some(sha)) = (size, sha) else {
            blobs.discard_output(job.id, job.attempt);
            return Err(TaskError::Permanent(
                "the task returned no size and sha256 for its output blob".into(),
            ));
        };
        let meta = blobs
            .adopt_output(job.id, job.attempt, size, sha)
            .map_err(|e| TaskError::Transient(format!("the output blob is missing: {e}")))?;
        if let Err(e) = self.store.insert_blob(meta.clone()).await {
            let _ = blobs.remove(&meta.id).await;
            return Err(TaskError::Transient(format!(
                "recording the output blob failed: {e}"
            )));
        }
        value["blob"] = serde_json::Value::String(meta.id);
        Ok(value)
    }
}
