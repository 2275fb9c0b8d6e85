//! A worker taken for one run, and what happens when the run is dropped before its answer.

use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::keeper::{Event, Worker};
use super::pool::Inner;
use super::protocol::{Run, ToWorker};
use crate::task::{JobCtx, TaskError, TaskResult};

/// How long an io worker has to answer a `cancel` before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// A worker taken for one run. Dropped once the run has its answer, it gives the worker back.
/// Dropped before (a timeout, a cancel, a stop): an exclusive (cpu) worker is killed and
/// replaced; a shared (io) worker is sent `cancel` and has `CANCEL_GRACE` to answer before
/// it is killed.
pub(super) struct Lease {
    inner: Arc<Inner>,
    worker: Arc<Worker>,
    exclusive: bool,
    /// Whether a run was sent. A lease dropped before that (a job stopped while waiting for
    /// a core) gives its worker back untouched.
    used: bool,
    /// The run sent and not yet answered: its job id, its token in the worker's `pending`,
    /// and where its answer comes.
    waiting: Option<(String, u64, mpsc::UnboundedReceiver<Event>)>,
}

impl Lease {
    pub(super) fn new(inner: &Arc<Inner>, worker: Arc<Worker>, exclusive: bool) -> Self {
        Lease {
            inner: inner.clone(),
            worker,
            exclusive,
            used: false,
            waiting: None,
        }
    }

    /// Sends one run and waits for its answer, passing progress on to `ctx` (when given).
    pub(super) async fn call(&mut self, run: Run, ctx: Option<&JobCtx>) -> TaskResult {
        static TOKENS: AtomicU64 = AtomicU64::new(0);
        let token = TOKENS.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let id = run.id.clone();
        match self
            .worker
            .pending
            .lock()
            .expect("pending lock")
            .entry(id.clone())
        {
            // Never replaces another run's entry (an earlier attempt of this job still being
            // cancelled): `try_take` does not give such a worker, so this is a bug's guard.
            Entry::Occupied(_) => {
                return Err(TaskError::Transient(format!(
                    "worker {} still has another attempt of job {id}",
                    self.worker.pid
                )))
            }
            Entry::Vacant(place) => {
                place.insert((token, tx));
            }
        }
        self.used = true;
        let (_, _, rx) = self.waiting.insert((id, token, rx));
        if let Err(e) = self.worker.send(&ToWorker::Run(run)) {
            return Err(TaskError::Crashed(format!(
                "worker {} is gone: {e}",
                self.worker.pid
            )));
        }
        while let Some(event) = rx.recv().await {
            match event {
                Event::Progress(p) => {
                    if let Some(ctx) = ctx {
                        ctx.set_progress(p);
                    }
                }
                Event::Done(result) => {
                    self.waiting = None;
                    return result;
                }
            }
        }
        Err(TaskError::Crashed(format!(
            "worker {} went away",
            self.worker.pid
        )))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let key = self.worker.key;
        match self.waiting.take() {
            None => self.inner.release(key, self.used),
            Some(_) if self.exclusive => self.inner.kill(key, "killed"),
            Some((id, token, rx)) => {
                tokio::spawn(cancel_io(
                    self.inner.clone(),
                    self.worker.clone(),
                    id,
                    token,
                    rx,
                ));
            }
        }
    }
}

/// Cancels one io run on a shared worker: `cancel`, then up to `CANCEL_GRACE` for its
/// answer (any answer: the run is over). A worker that does not answer is killed, and its
/// other runs fail as `crashed`.
async fn cancel_io(
    inner: Arc<Inner>,
    worker: Arc<Worker>,
    id: String,
    token: u64,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    // All of it within the grace: the send as well as the wait.
    let answered = async {
        if worker.send(&ToWorker::Cancel { id: id.clone() }).is_err() {
            return false;
        }
        while let Some(event) = rx.recv().await {
            if let Event::Done(_) = event {
                return true;
            }
        }
        false
    };
    let answered = tokio::time::timeout(CANCEL_GRACE, answered)
        .await
        .unwrap_or(false);
    if answered {
        inner.release(worker.key, true);
    } else {
        // Only its own entry: never another run's.
        let mut pending = worker.pending.lock().expect("pending lock");
        if pending.get(&id).is_some_and(|(t, _)| *t == token) {
            pending.remove(&id);
        }
        drop(pending);
        tracing::warn!(pid = worker.pid, job = %id, program = inner.program.as_deref(),
            "an io worker did not answer a cancel in time; killing it");
        inner.kill(worker.key, "cancel_ignored");
    }
}
