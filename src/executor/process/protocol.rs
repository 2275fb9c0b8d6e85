//! What the server and a worker say to each other: one JSON line per request on the worker's
//! stdin, one JSON line per answer on its stdout, and a `ready` line when it starts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::task::{TaskError, TaskResult};

#[derive(Serialize, Deserialize)]
pub(super) struct Request {
    pub(super) id: String,
    pub(super) attempt: u32,
    pub(super) task: String,
    pub(super) args: Value,
    /// For split tasks: the element range [start, end) this worker computes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) part: Option<[u64; 2]>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Answer {
    /// Sent once, by a worker that has started and reads requests: its pid.
    Ready(u32),
    /// Not an answer yet: the job's progress, sent while it runs.
    Progress(f64),
    Ok(Value),
    Permanent(String),
    Transient(String),
    Crashed(String),
}

pub(super) fn answer_to_result(answer: Answer) -> TaskResult {
    match answer {
        Answer::Ok(v) => Ok(v),
        Answer::Permanent(m) => Err(TaskError::Permanent(m)),
        Answer::Transient(m) => Err(TaskError::Transient(m)),
        Answer::Crashed(m) => Err(TaskError::Crashed(m)),
        Answer::Progress(_) | Answer::Ready(_) => Err(TaskError::Crashed(
            "a worker sent progress or ready as its answer".into(),
        )),
    }
}
