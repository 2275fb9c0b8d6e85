//! A live worker and its keeper: the task that owns the process, reads its stdout, hands
//! each answer to the run it names (by job id, so one worker can run several io jobs), and is
//! the first to know when the worker dies.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, Notify};

use super::pool::Inner;
use super::protocol::{line, result_of, FromWorker, ToWorker};
use super::start::{KillGroupOnDrop, Line, LineReader};
use crate::task::{TaskError, TaskResult};

/// What a run hears from its worker.
pub(super) enum Event {
    Progress(f64),
    Done(TaskResult),
}

/// A live worker process, shared by the runs it serves and its keeper.
pub(super) struct Worker {
    /// Its key in its pool, given by the server: unique, whatever the worker says.
    pub(super) key: u64,
    /// The worker's own pid (as its `ready` said; for a program, not the shell's), for
    /// display and RSS only: a program in a pid namespace says the same pid for each worker.
    pub(super) pid: u32,
    /// Its process group (a program's: the shell's pid, which leads it), to kill at shutdown.
    pub(super) group: Option<u32>,
    /// Whole lines for its stdin, written in order by its writer task ([`write_lines`]):
    /// enqueuing is synchronous, so a run dropped mid-send (cancelled, timed out) can never
    /// leave half a line, and lines from concurrent runs never interleave.
    pub(super) lines: mpsc::UnboundedSender<Vec<u8>>,
    /// The runs waiting for an answer, by job id (answers name only the job: a worker never
    /// has two attempts of one job, see `Inner::try_take`), each with its run's token (so that
    /// a run removes its own entry only). A std Mutex: held for an insert or a remove.
    pub(super) pending: Mutex<HashMap<String, (u64, mpsc::UnboundedSender<Event>)>>,
    /// Tells the keeper to kill the process. `notify_one` keeps the signal if the keeper is
    /// not waiting at that moment.
    pub(super) kill: Notify,
}

impl Worker {
    /// Queues a message for the worker's stdin. Fails only once its writer has stopped (the
    /// pipe broke: the worker is dying).
    pub(super) fn send(&self, message: &ToWorker) -> Result<(), String> {
        self.lines
            .send(line(message))
            .map_err(|_| "its stdin is closed".to_string())
    }

    /// Hands an answer to the run it names; answers for runs no longer waiting (cancelled)
    /// are dropped.
    pub(super) fn deliver(&self, message: FromWorker) {
        let Some(id) = message.id().map(str::to_string) else {
            return;
        };
        let mut pending = self.pending.lock().expect("pending lock");
        if let FromWorker::Progress { value, .. } = message {
            if let Some((_, tx)) = pending.get(&id) {
                let _ = tx.send(Event::Progress(value));
            }
        } else if let (Some((_, tx)), Some(result)) = (pending.remove(&id), result_of(message)) {
            let _ = tx.send(Event::Done(result));
        }
    }
}

/// A worker's writer: writes the queued lines, whole and in order, to its stdin. Ends when the
/// pipe breaks (its keeper then counts the worker as crashed) or the worker is dropped.
pub(super) async fn write_lines(
    mut stdin: ChildStdin,
    mut lines: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(line) = lines.recv().await {
        if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
            return;
        }
    }
}

/// A worker's keeper: owns its process, hands each line it writes to the run it names, and,
/// when it dies (or must be killed), fails the runs it had as `crashed` and has it replaced.
pub(super) async fn keep(
    pool: Weak<Inner>,
    worker: Arc<Worker>,
    mut child: Child,
    mut stdout: LineReader,
    mut writer: tokio::task::JoinHandle<()>,
    group: bool,
) {
    let pid = worker.pid;
    // Its OS pid (the shell's, for a program: it leads the process group), known until reaped.
    let os_pid = child.id();
    // Should this task be dropped (the runtime ends), the group goes with it.
    let mut guard = KillGroupOnDrop(worker.group);
    let mut exited = None;
    let reason = loop {
        // `next_line` and `wait` are cancel-safe: a kill in between loses no line. The
        // process's exit is watched as well as its stdout: children it forked may hold the
        // pipe open long after it died.
        let text = tokio::select! {
            text = stdout.next_line() => text,
            status = child.wait() => {
                exited = Some(status);
                break Some("crashed");
            }
            // Its writer stops only when the pipe broke: it can take no more runs.
            _ = &mut writer => break Some("crashed"),
            _ = worker.kill.notified() => break None,
        };
        match text {
            Ok(Line::TooLong) => {
                tracing::error!(
                    pid,
                    max_bytes = stdout.max,
                    "a worker wrote a line longer than a protocol message may be; killing it"
                );
                break Some("protocol");
            }
            Ok(Line::Text(text)) => match serde_json::from_str::<FromWorker>(&text) {
                Ok(message) => worker.deliver(message),
                Err(e) => {
                    tracing::error!(pid, error = %e, line = %text.chars().take(200).collect::<String>(),
                        "a worker wrote a line that is not a protocol message; killing it");
                    break Some("protocol");
                }
            },
            Ok(Line::Eof) | Err(_) => break Some("crashed"),
        }
    };
    writer.abort();
    if group {
        if let Some(pgid) = os_pid {
            crate::shm::kill_process_group(pgid);
        }
    }
    guard.0 = None;
    let _ = child.start_kill();
    if exited.is_some() {
        // The answers it wrote before it died are still delivered (its group is dead now,
        // so the pipe ends soon; a moment at most).
        let drain = async {
            while let Ok(Line::Text(text)) = stdout.next_line().await {
                if let Ok(message) = serde_json::from_str::<FromWorker>(&text) {
                    worker.deliver(message);
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), drain).await;
    }
    let status = match exited {
        Some(status) => status,
        None => child.wait().await,
    }
    .map_or("unknown status".to_string(), |s| s.to_string());
    // First out of the pool (so no new run is given to it), then its runs fail.
    if let (Some(reason), Some(pool)) = (reason, pool.upgrade()) {
        if pool.retire(worker.key, reason) && !pool.is_closed() {
            tracing::warn!(pid, %status, program = pool.program.as_deref(),
                "a worker process died; replacing it");
        }
    }
    let runs: Vec<_> = worker
        .pending
        .lock()
        .expect("pending lock")
        .drain()
        .collect();
    for (_, (_, tx)) in runs {
        let why = match reason {
            Some("protocol") => format!("worker process {pid} broke the protocol ({status})"),
            _ => format!("worker process {pid} died ({status})"),
        };
        let _ = tx.send(Event::Done(Err(TaskError::Crashed(why))));
    }
}
