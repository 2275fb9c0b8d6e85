//! Starting a worker process: the command (built-in or a task program's), its environment,
//! and the handshake that makes it a worker (its `ready` line).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::protocol::{FromWorker, Ready, PROTOCOL};

/// How long a new worker has to say it is ready before it counts as failing to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The most runs one worker may say it takes at once: the lane's capacity is workers times
/// this, and must stay a sane number of semaphore permits.
pub(super) const MAX_CONCURRENCY: usize = 10_000;

/// How a pool's workers are started.
pub(super) enum Launch {
    /// `<exe> worker`: this binary (or `--worker-exe`), running the built-in catalogue.
    Builtin { exe: PathBuf },
    /// A task program: `sh -c <command>`, in a process group of its own, so that a kill
    /// reaches the program and not only the shell that started it.
    Program { command: String },
}

/// A started worker that has said ready, not yet in a pool.
pub(super) struct Started {
    pub(super) child: Child,
    pub(super) stdin: ChildStdin,
    pub(super) stdout: LineReader,
    pub(super) ready: Ready,
}

impl Started {
    /// Kills a worker that will not join a pool: its process group (a program's) and itself.
    pub(super) fn abandon(mut self) {
        if let Some(pgid) = self.child.id() {
            crate::shm::kill_process_group(pgid);
        }
        let _ = self.child.start_kill();
    }
}

/// Kills a process group when dropped (unless its id is taken out first): a worker's group
/// must not outlive the task that owns the worker, however that task ends.
pub(super) struct KillGroupOnDrop(pub(super) Option<u32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            crate::shm::kill_process_group(pgid);
        }
    }
}

/// Starts a worker process. It is not a [`Worker`] until [`handshake`] has heard from it.
/// Built-in or program, it finds in its environment what docs/worker-protocol.md promises.
pub(super) fn spawn_child(
    launch: &Launch,
    program: Option<&str>,
    data_dir: &Path,
) -> std::io::Result<Child> {
    let parent = std::process::id().to_string();
    let mut command = match launch {
        Launch::Builtin { exe } => {
            let mut c = Command::new(exe);
            c.arg("worker")
                .arg("--data-dir")
                .arg(data_dir)
                .arg("--parent")
                .arg(&parent)
                .stderr(Stdio::inherit());
            c
        }
        Launch::Program { command } => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(command)
                .process_group(0)
                .stderr(Stdio::piped());
            c
        }
    };
    let mut child = command
        .env("OFFLOAD_PROTOCOL", PROTOCOL.to_string())
        .env("OFFLOAD_DATA_DIR", data_dir)
        .env("OFFLOAD_PARENT_PID", &parent)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    if let (Some(stderr), Some(program)) = (child.stderr.take(), program) {
        tokio::spawn(super::program::log_stderr(
            program.to_string(),
            child.id().unwrap_or(0),
            stderr,
        ));
    }
    Ok(child)
}

/// Waits for a new worker's `ready` line. A worker that exits first, answers something else,
/// speaks another protocol version or says nothing within `START_TIMEOUT` failed to start
/// (and is killed). A worker that closes its stdout but keeps running is killed too: it can
/// never answer.
pub(super) async fn handshake(mut child: Child) -> Result<Started, String> {
    let pid = child.id().unwrap_or(0);
    // A handshake dropped half-way (the server stops while a worker starts) takes the
    // worker's group along (a built-in worker leads none: the kill finds nothing).
    let mut guard = KillGroupOnDrop(Some(pid));
    let stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = LineReader::new(child.stdout.take().expect("stdout is piped"), READY_MAX);
    let first = tokio::time::timeout(START_TIMEOUT, stdout.next_line()).await;
    // A moment to exit by itself after its stdin closes (its exit status tells more than a
    // kill's): only for a worker that closed its stdout, most likely exiting.
    let mut grace = Duration::ZERO;
    let why = match first {
        Ok(Ok(Line::TooLong)) => format!(
            "worker {pid} wrote a first line longer than {} MiB",
            READY_MAX >> 20
        ),
        Ok(Ok(Line::Text(line))) => match serde_json::from_str::<FromWorker>(&line) {
            Ok(FromWorker::Ready(ready)) if ready.protocol != PROTOCOL => format!(
                "worker {pid} speaks protocol {}; this server speaks {PROTOCOL}",
                ready.protocol
            ),
            Ok(FromWorker::Ready(ready)) if !(1..=MAX_CONCURRENCY).contains(&ready.concurrency) => {
                format!(
                    "worker {pid} said concurrency {}; it must be 1 to {MAX_CONCURRENCY}",
                    ready.concurrency
                )
            }
            Ok(FromWorker::Ready(ready)) => {
                guard.0 = None;
                stdout.max = ANSWER_MAX;
                return Ok(Started {
                    child,
                    stdin,
                    stdout,
                    ready,
                });
            }
            _ => format!(
                "worker {pid} said {:?} instead of a ready message",
                line.chars().take(200).collect::<String>()
            ),
        },
        Ok(Ok(Line::Eof)) => {
            grace = EXIT_GRACE;
            format!("worker {pid} closed its stdout before it was ready")
        }
        Ok(Err(e)) => format!("reading worker {pid}: {e}"),
        Err(_) => format!(
            "worker {pid} was not ready within {} s",
            START_TIMEOUT.as_secs()
        ),
    };
    drop(stdin);
    let status = end(&mut child, pid, grace).await;
    guard.0 = None;
    Err(format!("{why} ({status})"))
}

/// How long a worker that failed its handshake has to exit by itself, and then to be reaped
/// once killed.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// Ends a worker that failed its handshake (its stdin already closed): `grace` to exit by
/// itself, then its process group (a program's) and itself are killed, and it is reaped, for
/// at most `EXIT_GRACE` more (a process that cannot be reaped is left to `kill_on_drop`).
/// Returns how it ended, for the message.
async fn end(child: &mut Child, pid: u32, grace: Duration) -> String {
    let exited = tokio::time::timeout(grace, child.wait()).await.ok();
    // The group is killed even when the worker exited: its children may live on. (A
    // program's worker leads its group, whose id is its pid; a built-in worker leads none.)
    crate::shm::kill_process_group(pid);
    let _ = child.start_kill();
    let status = match exited {
        Some(status) => status.ok(),
        None => tokio::time::timeout(EXIT_GRACE, child.wait())
            .await
            .ok()
            .and_then(Result::ok),
    };
    status.map_or("unknown status".to_string(), |s| s.to_string())
}

/// The longest `ready` line a worker may write (its tasks and their schemas).
const READY_MAX: usize = 1 << 20;
/// The longest line a worker may write after it: a run's answer, its result inline.
const ANSWER_MAX: usize = 64 << 20;

/// One line read from a worker's stdout.
pub(super) enum Line {
    /// A line, without its newline (the last one may have none).
    Text(String),
    /// Its stdout closed.
    Eof,
    /// Longer than the reader's `max`: what it wrote is not a protocol message, and the
    /// rest of the line is not read (nor kept in memory).
    TooLong,
}

/// Reads a worker's stdout line by line, never keeping more than `max` bytes of one line: a
/// worker that writes endless bytes without a newline must not exhaust the server's memory.
pub(super) struct LineReader {
    reader: BufReader<ChildStdout>,
    /// The line read so far: kept between calls, so that `next_line` is cancel-safe.
    buf: Vec<u8>,
    pub(super) max: usize,
}

impl LineReader {
    pub(super) fn new(stdout: ChildStdout, max: usize) -> Self {
        LineReader {
            reader: BufReader::new(stdout),
            buf: Vec::new(),
            max,
        }
    }

    /// The next line. Cancel-safe: bytes read before a cancel stay in `buf` for the next call.
    pub(super) async fn next_line(&mut self) -> std::io::Result<Line> {
        // One byte past `max`, to tell a line of exactly `max` bytes from a longer one.
        let room = (self.max + 1).saturating_sub(self.buf.len()) as u64;
        let n = (&mut self.reader)
            .take(room)
            .read_until(b'\n', &mut self.buf)
            .await?;
        let mut line = if self.buf.last() == Some(&b'\n') {
            let mut line = std::mem::take(&mut self.buf);
            line.pop();
            line
        } else if self.buf.len() > self.max {
            self.buf = Vec::new();
            return Ok(Line::TooLong);
        } else if n == 0 && self.buf.is_empty() {
            return Ok(Line::Eof);
        } else {
            // The end of its stdout, after a last line without a newline.
            std::mem::take(&mut self.buf)
        };
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        String::from_utf8(line)
            .map(Line::Text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}
