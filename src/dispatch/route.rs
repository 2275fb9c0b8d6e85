//! The router: which lane runs a job, decided once, at submit.

use crate::job::{ExecutorKind, Kind};
use crate::task::{IoStyle, Task};

/// What routing looks at besides the task and its kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct RouteHints {
    /// The spec asked for a worker process.
    pub isolate: bool,
    /// The largest blob the job names, if any.
    pub largest_blob: Option<u64>,
    /// Blobs at least this large send cpu work to worker processes (mapping the file there
    /// instead of reading it into this process).
    pub process_threshold: u64,
}

/// The lane that runs `task` as `kind`.
pub fn route(task: &dyn Task, kind: Kind, hints: RouteHints) -> Result<ExecutorKind, String> {
    // A task program's tasks run in its worker processes, whatever their kind.
    if task.program().is_some() {
        return Ok(ExecutorKind::Process);
    }
    if hints.isolate {
        return match kind {
            Kind::Cpu => Ok(ExecutorKind::Process),
            Kind::Io => Err(
                "isolate: only cpu jobs run in worker processes; drop `isolate` or use kind cpu"
                    .into(),
            ),
        };
    }
    Ok(match kind {
        Kind::Io => match task.io_style() {
            IoStyle::Async => ExecutorKind::Async,
            IoStyle::Blocking => ExecutorKind::Blocking,
        },
        Kind::Cpu
            if hints
                .largest_blob
                .is_some_and(|size| size >= hints.process_threshold) =>
        {
            ExecutorKind::Process
        }
        Kind::Cpu => ExecutorKind::Rayon,
    })
}
