//! `file_sha256`: hashes a file under the data dir's `files/`, with blocking std::fs calls.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{arg_str, IoStyle, JobCtx, Task, TaskError, TaskResult};
use crate::job::Kind;

pub struct FileSha256 {
    root: PathBuf,
}

impl FileSha256 {
    /// `root` is the only folder whose files may be read (the data dir's `files/`).
    pub fn new(root: PathBuf) -> Self {
        FileSha256 { root }
    }

    /// Rejects paths that could leave the root by their spelling alone: absolute paths, `..`,
    /// drive prefixes. Symlinks are checked when the job runs (they can change after submit).
    fn lexical_check(path: &str) -> Result<(), String> {
        if path.is_empty() {
            return Err("args.path: must not be empty".into());
        }
        if path.contains('\0') {
            return Err("args.path: must not contain NUL".into());
        }
        for c in Path::new(path).components() {
            match c {
                Component::Normal(_) | Component::CurDir => {}
                _ => {
                    return Err(format!(
                        "args.path: `{path}` must be relative to the data dir's files/ folder, \
                         without `..` or a leading `/`"
                    ))
                }
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Task for FileSha256 {
    fn name(&self) -> &str {
        "file_sha256"
    }
    fn description(&self) -> &str {
        "Reads a file under the data dir's files/ folder with blocking std::fs calls; its size and sha256."
    }
    fn kinds(&self) -> &[Kind] {
        &[Kind::Io]
    }
    fn io_style(&self) -> IoStyle {
        IoStyle::Blocking
    }
    fn args_schema(&self) -> Value {
        json!({
            "type": "object",
            "properties": {"path": {"type": "string", "minLength": 1, "maxLength": 4096,
                "description": "a path relative to <data-dir>/files/"}},
            "required": ["path"],
            "additionalProperties": false
        })
    }
    fn check_args(&self, args: &Value) -> Result<(), String> {
        match args.get("path").and_then(Value::as_str) {
            Some(p) => Self::lexical_check(p),
            None => Ok(()),
        }
    }
    fn run_sync(&self, ctx: &JobCtx, args: Value) -> TaskResult {
        let rel = arg_str(&args, "path")?;
        Self::lexical_check(rel).map_err(TaskError::Permanent)?;
        let root = self.root.canonicalize().map_err(|e| {
            TaskError::Permanent(format!("the files folder {:?} is missing: {e}", self.root))
        })?;
        // Resolve symlinks, then confirm the real path is still inside the root.
        let real = root
            .join(rel)
            .canonicalize()
            .map_err(|e| TaskError::Permanent(format!("cannot open `{rel}`: {e}")))?;
        if !real.starts_with(&root) {
            return Err(TaskError::Permanent(format!(
                "`{rel}` resolves outside the files folder; refused"
            )));
        }
        // Only regular files: a FIFO or a device would block or never end.
        let meta = std::fs::metadata(&real)
            .map_err(|e| TaskError::Permanent(format!("cannot open `{rel}`: {e}")))?;
        if !meta.is_file() {
            return Err(TaskError::Permanent(format!(
                "`{rel}` is not a regular file"
            )));
        }
        let mut file = std::fs::File::open(&real)
            .map_err(|e| TaskError::Permanent(format!("cannot open `{rel}`: {e}")))?;
        let total = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            ctx.check()?;
            let n = file
                .read(&mut buf)
                .map_err(|e| TaskError::Transient(format!("reading `{rel}` failed: {e}")))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
            if total > 0 {
                ctx.set_progress(bytes as f64 / total as f64);
            }
        }
        Ok(json!({ "bytes": bytes, "sha256": hex(&hasher.finalize()) }))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_check_refuses_escapes() {
        for bad in ["../etc/passwd", "/etc/passwd", "a/../../b", ""] {
            assert!(FileSha256::lexical_check(bad).is_err(), "{bad}");
        }
        for good in ["a.txt", "dir/b.bin", "./c"] {
            assert!(FileSha256::lexical_check(good).is_ok(), "{good}");
        }
    }
}
