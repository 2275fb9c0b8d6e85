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
        let mut file = open_beneath(&self.root, rel)?;
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

/// Opens `rel` inside `root` without following a symbolic link anywhere below `root`, and only
/// if it is a regular file.
///
/// Checking a path and then opening it races with whoever can write in `files/`: a component
/// swapped for a symlink between a `canonicalize` and an `open` leads anywhere. So each
/// component is opened relative to the directory *already opened* before it, never by its
/// full path again: `/proc/self/fd/N/<name>` names the entry `<name>` inside the directory
/// that descriptor N holds open (the kernel follows the magic link to that open directory, not
/// to whatever its path names now), which is `openat(N, name)` without `unsafe`. Every open
/// carries `O_NOFOLLOW`, so a symlink in any component fails with `ELOOP` instead of being
/// followed; intermediate components also carry `O_DIRECTORY`. The last one is opened with
/// `O_NONBLOCK` so that a FIFO cannot block the thread in `open`, and must then be a regular
/// file by `fstat` of the descriptor we hold (the thing read is the thing checked). The root
/// itself is the operator's choice and may be reached through a symlink.
fn open_beneath(root: &Path, rel: &str) -> Result<std::fs::File, TaskError> {
    use std::fs::{File, OpenOptions};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    let cannot = |e: std::io::Error| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            TaskError::Permanent(format!(
                "`{rel}` goes through a symbolic link, which could lead outside the files \
                 folder; refused"
            ))
        } else {
            TaskError::Permanent(format!("cannot open `{rel}`: {e}"))
        }
    };
    let mut dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)
        .map_err(|e| TaskError::Permanent(format!("the files folder {root:?} is missing: {e}")))?;
    let names: Vec<&std::ffi::OsStr> = Path::new(rel)
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            // `lexical_check` let only these and `.` through.
            _ => None,
        })
        .collect();
    let Some((last, parents)) = names.split_last() else {
        return Err(TaskError::Permanent(format!(
            "`{rel}` names the files folder itself, not a file"
        )));
    };
    let beneath = |dir: &File, name: &std::ffi::OsStr| {
        Path::new("/proc/self/fd")
            .join(dir.as_raw_fd().to_string())
            .join(name)
    };
    for name in parents {
        let path = beneath(&dir, name);
        dir = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(d) => d,
            // With O_DIRECTORY, a symlink fails as "not a directory", not ELOOP: say which.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                let link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_symlink());
                return Err(cannot(if link {
                    std::io::Error::from_raw_os_error(libc::ELOOP)
                } else {
                    e
                }));
            }
            Err(e) => return Err(cannot(e)),
        };
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(beneath(&dir, last))
        .map_err(cannot)?;
    // Only regular files: a FIFO or a device would block or never end.
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(TaskError::Permanent(format!(
            "`{rel}` is not a regular file"
        )));
    }
    Ok(file)
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

    fn hash(root: &Path, rel: &str) -> TaskResult {
        let task = FileSha256::new(root.to_path_buf());
        let ctx = JobCtx::new(crate::job::JobId::new(), 1);
        task.run_sync(&ctx, json!({ "path": rel }))
    }

    fn message(r: TaskResult) -> String {
        match r {
            Err(TaskError::Permanent(m)) => m,
            other => panic!("expected a permanent error, got {other:?}"),
        }
    }

    #[test]
    fn a_regular_file_is_hashed_also_in_a_subfolder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "abc").unwrap();
        let done = hash(dir.path(), "./sub/a.txt").unwrap();
        assert_eq!(done["bytes"], 3);
        assert_eq!(
            done["sha256"],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_symlink_in_any_component_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "not for jobs").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // The last component a link to a file outside; a middle one a link to a folder outside.
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        // Even a link that stays inside is refused: no symlink is ever followed.
        std::fs::write(root.join("inside"), "x").unwrap();
        std::os::unix::fs::symlink(root.join("inside"), root.join("alias")).unwrap();
        for rel in ["escape", "out/secret", "alias"] {
            let m = message(hash(root, rel));
            assert!(m.contains("symbolic link"), "{rel}: {m}");
        }
    }

    #[test]
    fn a_fifo_or_a_folder_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        for rel in ["pipe", "sub"] {
            assert!(
                message(hash(dir.path(), rel)).contains("regular file"),
                "{rel}"
            );
        }
        assert!(message(hash(dir.path(), "missing")).contains("cannot open"));
    }
}
