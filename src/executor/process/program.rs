//! Task programs: `--task-program 'python3 tasks.py'` starts a pool of workers running that
//! command, which speak docs/worker-protocol.md. The first worker's `ready` line declares the
//! program's tasks; they join the catalogue as [`ProgramTask`]s, whose jobs always run in
//! that program's pool.

use std::sync::Arc;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::ChildStderr;
use tokio::sync::Semaphore;

use super::pool::{Inner, PoolSpec};
use super::protocol::TaskDecl;
use super::start::{handshake, spawn_child, Launch};
use super::LaneSpec;
use crate::job::Kind;
use crate::task::Task;

/// Why the process lane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("cannot start worker processes: {0}")]
    Builtin(std::io::Error),
    /// A task program that cannot serve: the server stops at start, naming it.
    #[error("task program `{program}`: {why}")]
    Program { program: String, why: String },
}

/// Starts a task program's pool: its first worker must shake hands (the server stops
/// otherwise) and declare valid tasks; the others then start beside it.
pub(super) async fn start(
    command: &str,
    lane: &LaneSpec,
    budget: Arc<Semaphore>,
) -> Result<Arc<Inner>, ProgramError> {
    let fail = |why: String| ProgramError::Program {
        program: command.to_string(),
        why,
    };
    let launch = Launch::Program {
        command: command.to_string(),
    };
    let child = spawn_child(&launch, Some(command), &lane.data_dir)
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    let first = handshake(child)
        .await
        .map_err(|why| fail(format!("its handshake failed: {why}")))?;
    let declared = match first.ready.tasks.as_slice() {
        [] => Err("its ready message declares no tasks".to_string()),
        tasks => tasks.iter().try_for_each(TaskDecl::check),
    };
    if let Err(why) = declared {
        first.abandon();
        return Err(fail(why));
    }
    let names: Vec<String> = first.ready.tasks.iter().map(|t| t.name.clone()).collect();
    let pool = Inner::new(
        PoolSpec {
            program: Some(command.to_string()),
            launch,
            data_dir: lane.data_dir.clone(),
            capacity: lane.program_workers,
            recycle: lane.recycle,
            budget,
        },
        Some(first),
    );
    pool.fill()
        .await
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    tracing::info!(program = command, tasks = ?names, workers = pool.live(),
        concurrency = pool.concurrency, "task program ready");
    Ok(pool)
}

/// Logs a program worker's stderr, line by line, with the program and the worker's pid (the
/// shell's, which leads its process group), and the job id when the line starts with
/// `[job <id>] `.
pub(super) async fn log_stderr(program: String, pid: u32, stderr: ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match line
            .strip_prefix("[job ")
            .and_then(|rest| rest.split_once("] "))
        {
            Some((job, text)) => tracing::info!(program = %program, pid, job, "{text}"),
            None => tracing::info!(program = %program, pid, "{line}"),
        }
    }
}

/// A task a program serves: its declaration in the catalogue. Its body is the program's:
/// the process lane sends its jobs to the program's pool (`Task::program`).
pub struct ProgramTask {
    program: String,
    decl: TaskDecl,
    kinds: [Kind; 1],
    blob_args: Vec<&'static str>,
}

impl ProgramTask {
    pub fn new(program: String, decl: TaskDecl) -> Self {
        // `Task::blob_args` lends `&str`s. The catalogue is built once, at start, and lives
        // as long as the server: leaking these few names is the simplest owner.
        let blob_args = decl
            .blob_args
            .iter()
            .map(|a| &*Box::leak(a.clone().into_boxed_str()))
            .collect();
        ProgramTask {
            program,
            kinds: [decl.kind],
            decl,
            blob_args,
        }
    }
}

impl Task for ProgramTask {
    fn name(&self) -> &str {
        &self.decl.name
    }
    fn description(&self) -> &str {
        &self.decl.description
    }
    fn kinds(&self) -> &[Kind] {
        &self.kinds
    }
    fn args_schema(&self) -> Value {
        self.decl.args_schema.clone()
    }
    fn blob_args(&self) -> &[&str] {
        &self.blob_args
    }
    fn program(&self) -> Option<&str> {
        Some(&self.program)
    }
    fn version(&self) -> Option<&str> {
        Some(&self.decl.version)
    }
    fn parent_results(&self) -> bool {
        self.decl.parent_results
    }
}
