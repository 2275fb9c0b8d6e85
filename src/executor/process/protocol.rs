//! The messages of the worker protocol, version 1 (docs/worker-protocol.md): one JSON object
//! per line with exactly one key, the message's type. Server → worker on the worker's stdin,
//! worker → server on its stdout. Built-in workers and task programs speak the same lines.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::job::Kind;
use crate::task::{TaskError, TaskResult};

/// The protocol version this server speaks; a worker that says another is refused.
pub(super) const PROTOCOL: u32 = 1;

/// Server → worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ToWorker {
    Run(Run),
    /// Stop running job `id` (io workers; a cpu worker is killed instead).
    Cancel {
        id: String,
    },
    /// Take nothing new and exit.
    Shutdown {},
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Run {
    pub(super) id: String,
    pub(super) attempt: u32,
    pub(super) task: String,
    pub(super) args: Value,
    /// For each blob argument, the path of its file (the worker maps it; the bytes never
    /// cross the pipe).
    #[serde(default)]
    pub(super) blobs: BTreeMap<String, String>,
    /// For built-in split tasks: the element range [start, end) this worker computes.
    #[serde(default)]
    pub(super) part: Option<[u64; 2]>,
    /// For a task declared with `parent_results`: `{parent id: result}`. Left out otherwise,
    /// so a worker that never asked sees the same lines as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) parents: Option<Value>,
}

/// Worker → server.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum FromWorker {
    /// The first line: the worker reads runs from now on.
    Ready(Ready),
    Progress {
        id: String,
        value: f64,
    },
    Ok {
        id: String,
        result: Value,
    },
    Error {
        id: String,
        kind: ErrorKind,
        #[serde(rename = "type", default)]
        type_: String,
        #[serde(default)]
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Ready {
    pub(super) protocol: u32,
    #[serde(default)]
    pub(super) pid: u32,
    #[serde(default = "one")]
    pub(super) concurrency: usize,
    #[serde(default)]
    pub(super) tasks: Vec<TaskDecl>,
}

fn one() -> usize {
    1
}

/// A task a program serves, as its `ready` line declares it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskDecl {
    pub name: String,
    pub kind: Kind,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "any_object")]
    pub args_schema: Value,
    #[serde(default)]
    pub blob_args: Vec<String>,
    /// Whether the task wants its parents' results (`run.parents`).
    #[serde(default)]
    pub parent_results: bool,
}

fn any_object() -> Value {
    serde_json::json!({"type": "object"})
}

impl TaskDecl {
    /// What a declaration must satisfy to join the catalogue.
    pub(super) fn check(&self) -> Result<(), String> {
        let name_ok = self.name.len() <= 64
            && self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !name_ok {
            return Err(format!(
                "task name {:?} is not [a-z][a-z0-9_]* of at most 64 bytes",
                self.name
            ));
        }
        if !self.args_schema.is_object() {
            return Err(format!(
                "task `{}`: args_schema is not a JSON object",
                self.name
            ));
        }
        // Checked now, so that a schema no value can get through (a `$ref` cycle) stops the
        // server at start rather than failing, or worse, every submit.
        crate::schema::check(&self.args_schema)
            .map_err(|e| format!("task `{}`: args_schema: {e}", self.name))
    }
}

/// How a failed run should be treated (the `kind` of an `error` message).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum ErrorKind {
    Permanent,
    Transient,
    Crashed,
}

impl FromWorker {
    /// The job a message is about (none for `ready`).
    pub(super) fn id(&self) -> Option<&str> {
        match self {
            FromWorker::Ready(_) => None,
            FromWorker::Progress { id, .. }
            | FromWorker::Ok { id, .. }
            | FromWorker::Error { id, .. } => Some(id),
        }
    }
}

/// The error message for a task's failure, and back.
pub(super) fn error_message(id: String, e: &TaskError, type_: &str) -> FromWorker {
    let (kind, message) = match e {
        TaskError::Permanent(m) => (ErrorKind::Permanent, m.clone()),
        TaskError::Transient(m) => (ErrorKind::Transient, m.clone()),
        TaskError::Crashed(m) => (ErrorKind::Crashed, m.clone()),
        TaskError::Stopped => (ErrorKind::Transient, "stopped".into()),
    };
    FromWorker::Error {
        id,
        kind,
        type_: type_.into(),
        message,
    }
}

pub(super) fn task_error(kind: ErrorKind, type_: &str, message: &str) -> TaskError {
    let text = if type_.is_empty() {
        message.to_string()
    } else {
        format!("{type_}: {message}")
    };
    match kind {
        ErrorKind::Permanent => TaskError::Permanent(text),
        ErrorKind::Transient => TaskError::Transient(text),
        ErrorKind::Crashed => TaskError::Crashed(text),
    }
}

/// One line of the protocol: the message as JSON and a newline.
pub(super) fn line<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("a protocol message serializes");
    line.push(b'\n');
    line
}

/// The result a run ended with, from its `ok` or `error` message.
pub(super) fn result_of(message: FromWorker) -> Option<TaskResult> {
    match message {
        FromWorker::Ok { result, .. } => Some(Ok(result)),
        FromWorker::Error {
            kind,
            type_,
            message,
            ..
        } => Some(Err(task_error(kind, &type_, &message))),
        FromWorker::Ready(_) | FromWorker::Progress { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The lines are those of docs/worker-protocol.md, byte for byte in shape.
    #[test]
    fn messages_have_the_documented_shape() {
        let cancel = serde_json::to_value(ToWorker::Cancel { id: "j".into() }).unwrap();
        assert_eq!(cancel, json!({"cancel": {"id": "j"}}));
        let shutdown = serde_json::to_value(ToWorker::Shutdown {}).unwrap();
        assert_eq!(shutdown, json!({"shutdown": {}}));
        let run: ToWorker = serde_json::from_value(json!({"run": {"id": "j", "attempt": 1,
            "task": "t", "args": {}, "blobs": {"data": "/d/blobs/b"}, "part": null}}))
        .unwrap();
        assert!(matches!(run, ToWorker::Run(Run { attempt: 1, .. })));

        let error: FromWorker = serde_json::from_value(json!({"error": {"id": "j",
            "kind": "transient", "type": "ValueError", "message": "no"}}))
        .unwrap();
        match result_of(error) {
            Some(Err(TaskError::Transient(m))) => assert_eq!(m, "ValueError: no"),
            other => panic!("{other:?}"),
        }
        let ready: FromWorker = serde_json::from_value(json!({"ready": {"protocol": 1,
            "pid": 42, "concurrency": 100, "tasks": [{"name": "primes_below", "kind": "cpu",
            "version": "1", "description": "d", "args_schema": {"type": "object"},
            "blob_args": []}]}}))
        .unwrap();
        let FromWorker::Ready(ready) = ready else {
            panic!("ready")
        };
        assert_eq!(ready.concurrency, 100);
        assert_eq!(ready.tasks[0].kind, Kind::Cpu);
        assert!(ready.tasks[0].check().is_ok());
        // Not a message: a second key, an unknown type.
        assert!(
            serde_json::from_str::<FromWorker>(r#"{"ok":{"id":"j","result":1},"x":{}}"#).is_err()
        );
        assert!(serde_json::from_str::<FromWorker>(r#"{"hello":{}}"#).is_err());
    }

    #[test]
    fn task_names_are_checked() {
        let decl = |name: &str| TaskDecl {
            name: name.into(),
            kind: Kind::Io,
            version: String::new(),
            description: String::new(),
            args_schema: json!({"type": "object"}),
            blob_args: Vec::new(),
            parent_results: false,
        };
        assert!(decl("fetch_2").check().is_ok());
        for bad in ["", "2fetch", "Fetch", "fe-tch", &"a".repeat(65)] {
            assert!(decl(bad).check().is_err(), "{bad:?}");
        }
    }
}
