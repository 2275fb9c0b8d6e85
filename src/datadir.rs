//! One server per data dir: an exclusive lock on `<data-dir>/offload.lock`, held for the life
//! of the [`App`](crate::App).
//!
//! Two servers on one data dir would both recover "running" jobs that the other is running,
//! both prune and adopt blobs, and (on SQLite) both write the same file. So the first thing a
//! server does with its data dir, before it opens the database, is take this lock; a second
//! server finds it held and stops, naming the pid that holds it.
//!
//! The lock is `flock(2)` (std's [`File::try_lock`]): the kernel drops it when the holder's
//! last descriptor closes, which includes the process dying by SIGKILL, so a crash never leaves
//! a stale lock behind. The pid written into the file only names the holder in the message;
//! the lock, not the file's content, is what excludes.
//!
//! The lock is taken whatever the database: on PostgreSQL several servers share the database,
//! but each needs a data dir of its own for its blobs.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

/// The lock file's name inside the data dir.
pub const LOCK_FILE: &str = "offload.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another server holds the lock: this one must not start.
    #[error(
        "{what} {dir} is in use by another offload server ({}); stop it or pass another {flag}",
        holder.map_or("pid unknown".to_string(), |pid| format!("pid {pid}"))
    )]
    InUse {
        /// "data dir", or "SQLite file" for a database outside the data dir.
        what: &'static str,
        dir: String,
        holder: Option<u32>,
        /// The setting that picks another one.
        flag: &'static str,
    },
    #[error("cannot lock data dir {dir} ({path}): {source}")]
    Io {
        dir: String,
        path: String,
        source: std::io::Error,
    },
}

/// The held lock. Dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct DataDirLock {
    // Never read: holding the open file is holding the lock.
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock on `data_dir` (which must exist) without waiting, and writes this
    /// process's pid into the lock file.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
        Self::acquire_file(
            data_dir,
            data_dir.join(LOCK_FILE),
            ("data dir", "--data-dir"),
        )
    }

    /// Takes the lock of a SQLite file that lives outside the data dir
    /// (`--database-url sqlite:///elsewhere/jobs.db`): `<file>.offload-lock` beside it, so two
    /// servers with different data dirs cannot share one SQLite file either (each would take
    /// the other's running jobs for a dead process's).
    pub fn acquire_sqlite(db_file: &Path) -> Result<DataDirLock, LockError> {
        let mut name = db_file.as_os_str().to_owned();
        name.push(".offload-lock");
        Self::acquire_file(
            db_file,
            PathBuf::from(name),
            ("SQLite file", "--database-url"),
        )
    }

    fn acquire_file(
        data_dir: &Path,
        path: PathBuf,
        (what, flag): (&'static str, &'static str),
    ) -> Result<DataDirLock, LockError> {
        let io_error = |source| LockError::Io {
            dir: data_dir.display().to_string(),
            path: path.display().to_string(),
            source,
        };
        // Not truncated on open: until we hold the lock, the content is the holder's pid.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::InUse {
                    what,
                    flag,
                    dir: data_dir.display().to_string(),
                    holder: holder_pid(&path),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io_error(e)),
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush())
            .map_err(io_error)?;
        Ok(DataDirLock { _file: file, path })
    }

    /// Where the lock file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid the holder wrote, if it has written one yet (it writes just after locking, so a
/// reader can find the file still empty).
fn holder_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_dir_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file, so a second open in this process conflicts
        // just as another process's would.
        match DataDirLock::acquire(dir.path()) {
            Err(LockError::InUse { holder, .. }) => {
                assert_eq!(holder, Some(std::process::id()))
            }
            other => panic!("expected InUse, got {other:?}"),
        }
        drop(held);
        DataDirLock::acquire(dir.path()).expect("released when dropped");
    }
}
