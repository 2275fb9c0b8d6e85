//! The worker side: the `offload worker` subcommand, which runs jobs from its stdin.

use std::io::{BufRead, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::protocol::{error_message, line, FromWorker, Ready, Run, ToWorker, PROTOCOL};
use crate::config::Settings;
use crate::task::{JobCtx, Registry, TaskError, TaskResult};

fn write_line(out: &Mutex<std::io::Stdout>, message: &FromWorker) -> std::io::Result<()> {
    let line = line(message);
    let mut out = out.lock().expect("stdout lock");
    out.write_all(&line)?;
    out.flush()
}

/// A thread that reports a running job's progress to the server every 100 ms, when it moved.
struct ProgressReporter {
    done: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl ProgressReporter {
    fn start(ctx: JobCtx, out: Arc<Mutex<std::io::Stdout>>) -> Self {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let mut sent = 0.0;
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::park_timeout(std::time::Duration::from_millis(100));
                let p = ctx.progress();
                if p != sent && !flag.load(std::sync::atomic::Ordering::Acquire) {
                    sent = p;
                    let progress = FromWorker::Progress {
                        id: ctx.id.to_string(),
                        value: p,
                    };
                    if write_line(&out, &progress).is_err() {
                        return;
                    }
                }
            }
        });
        ProgressReporter { done, thread }
    }

    /// Stops the reporter before the answer is written, so no progress line follows it.
    fn stop(self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

/// For programs that embed the library: if this process was started as a worker
/// (`<exe> worker --data-dir D --parent P`), runs as one and returns its exit code. Call it
/// first thing in `main`; the process lane re-executes the program's own binary. Workers run
/// the built-in tasks.
pub fn run_worker_if_asked() -> Option<std::process::ExitCode> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("worker") {
        return None;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match (
        value("--data-dir"),
        value("--parent").and_then(|p| p.parse().ok()),
    ) {
        (Some(dir), Some(parent)) => Some(worker_main(Path::new(&dir), parent)),
        _ => Some(std::process::ExitCode::FAILURE),
    }
}

/// What a worker answers for a task's result (or its panic).
fn answer_of(id: String, result: std::thread::Result<TaskResult>) -> FromWorker {
    match result {
        Ok(Ok(result)) => FromWorker::Ok { id, result },
        Ok(Err(e)) => error_message(id, &e, "TaskError"),
        Err(_) => error_message(
            id,
            &TaskError::Crashed("the task panicked in the worker".into()),
            "Panic",
        ),
    }
}

/// Runs one `run` message with the built-in catalogue.
fn run_one(registry: &Registry, out: &Arc<Mutex<std::io::Stdout>>, run: Run) -> FromWorker {
    let Run {
        id,
        attempt,
        task,
        args,
        part,
        parents,
        ..
    } = run;
    let ctx = JobCtx::new(id.parse().unwrap_or_default(), attempt);
    if let Some(parents) = parents {
        ctx.set_parents(parents);
    }
    let Some(t) = registry.get(&task) else {
        let e = TaskError::Permanent(format!("task `{task}` is not in the worker"));
        return error_message(id, &e, "UnknownTask");
    };
    if let Some([start, end]) = part {
        let Some(split) = t.split() else {
            let e = TaskError::Permanent(format!("task `{task}` does not split"));
            return error_message(id, &e, "UnknownTask");
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            split.part(&ctx, &args, start as usize, end as usize)
        }));
        return answer_of(id, result);
    }
    // The job's span, carried across the process boundary by its id.
    let span = tracing::info_span!("job", id = %id, task = %task, attempt,
        worker = std::process::id());
    let _enter = span.enter();
    tracing::debug!("running in a worker process");
    let reporter = ProgressReporter::start(ctx.clone(), out.clone());
    let result = catch_unwind(AssertUnwindSafe(|| t.run_sync(&ctx, args)));
    reporter.stop();
    answer_of(id, result)
}

/// The `offload worker` subcommand: runs jobs from stdin until stdin closes or the server
/// says `shutdown`. It speaks docs/worker-protocol.md, one job at a time.
pub fn worker_main(data_dir: &Path, parent: u32) -> std::process::ExitCode {
    let log_format = match std::env::var("OFFLOAD_LOG_FORMAT").as_deref() {
        Ok("json") => crate::config::LogFormat::Json,
        _ => crate::config::LogFormat::Text,
    };
    if !crate::shm::die_with_parent(parent) {
        return std::process::ExitCode::FAILURE;
    }
    crate::telemetry::init_worker(log_format);
    // A worker is single-threaded: lowering this thread lowers the process.
    crate::shm::lower_thread_priority(crate::executor::rayon_lane::CPU_NICENESS);
    let settings = Settings::with_data_dir(data_dir);
    let registry = Registry::builtin(&settings);
    let stdin = std::io::stdin().lock();
    // Shared with the progress reporter thread: whole lines only, under the lock.
    let out = Arc::new(Mutex::new(std::io::stdout()));
    // Until this line the server gives this worker no job. Built-in workers declare no
    // tasks: the server has the same catalogue.
    let ready = FromWorker::Ready(Ready {
        protocol: PROTOCOL,
        pid: std::process::id(),
        concurrency: 1,
        tasks: Vec::new(),
    });
    if write_line(&out, &ready).is_err() {
        return std::process::ExitCode::FAILURE;
    }
    for text in stdin.lines() {
        let Ok(text) = text else { break };
        let answer = match serde_json::from_str::<ToWorker>(&text) {
            Ok(ToWorker::Run(run)) => run_one(&registry, &out, run),
            // A built-in worker runs cpu work only: the server kills it to stop a job.
            Ok(ToWorker::Cancel { .. }) => continue,
            Ok(ToWorker::Shutdown {}) => break,
            Err(e) => {
                tracing::error!(error = %e, "a line from the server is not a protocol message");
                return std::process::ExitCode::FAILURE;
            }
        };
        if write_line(&out, &answer).is_err() {
            break;
        }
    }
    std::process::ExitCode::SUCCESS
}
