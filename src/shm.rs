//! Shared memory, and the few OS calls around it: blob files mapped into the address space
//! and read in place, output files mapped for writing, parent-death signals and thread
//! priorities for the lanes.
//!
//! A blob file is mapped `MAP_SHARED` and read-only, so every reader (a rayon job here, worker
//! processes later) reads the same physical pages of the page cache: nothing is copied, however
//! many jobs read the blob at once. This is the one module with `unsafe` code; each block says
//! why it is sound.

#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

/// A read-only mapping of a whole blob file.
pub struct MappedBlob {
    map: Option<Mmap>,
}

impl MappedBlob {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            // mmap of zero bytes is an error; an empty blob is an empty slice.
            return Ok(MappedBlob { map: None });
        }
        // SAFETY: blob files are immutable once renamed into place (src/blob.rs writes a temp
        // file, syncs it, then renames it; nothing opens a blob for writing afterwards), so
        // the mapped bytes cannot change under us. Deleting the blob unlinks the file, which
        // leaves an existing mapping valid. Truncation, the one way to SIGBUS a reader, is
        // never done to a blob file.
        let map = unsafe { Mmap::map(&file)? };
        Ok(MappedBlob { map: Some(map) })
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// The element types an array blob may hold: raw little-endian numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    I64,
    U8,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        match s {
            "f64" => Some(Dtype::F64),
            "f32" => Some(Dtype::F32),
            "i64" => Some(Dtype::I64),
            "u8" => Some(Dtype::U8),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 => 4,
            Dtype::U8 => 1,
        }
    }

    /// Reads element `i` of `bytes` as f64 (little-endian).
    #[inline]
    pub fn get(self, bytes: &[u8], i: usize) -> f64 {
        let at = i * self.size();
        match self {
            Dtype::F64 => f64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")),
            Dtype::F32 => f32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as f64,
            Dtype::I64 => i64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as f64,
            Dtype::U8 => bytes[at] as f64,
        }
    }
}

/// Makes the kernel send SIGKILL to this process when its parent dies, then checks that the
/// parent is still `parent` (it may have died before the call: the race PR_SET_PDEATHSIG
/// alone leaves open). Worker processes call it first thing, so a killed server leaves no
/// orphans. Returns false if the parent is already gone.
pub fn die_with_parent(parent: u32) -> bool {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no memory of ours.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    // SAFETY: getppid has no arguments and cannot fail.
    let ppid = unsafe { libc::getppid() };
    rc == 0 && ppid as u32 == parent
}

/// Sends SIGKILL to every process of group `pgid` (a task program started in a group of its
/// own: the shell that started it, the program, anything it started). Errors are ignored: the
/// group may be gone already.
pub fn kill_process_group(pgid: u32) {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return;
    }
    // SAFETY: killpg takes a group id and a signal number and touches no memory of ours;
    // pgid is a positive group id (0 would mean our own group, refused above).
    let _ = unsafe { libc::killpg(pgid as libc::pid_t, libc::SIGKILL) };
}

/// The size of a memory page.
pub fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system; it touches no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// A writable shared mapping of a new file of a fixed size, for a task's output blob.
pub struct OutputMap {
    map: Option<memmap2::MmapMut>,
}

impl OutputMap {
    /// Creates `path` with `len` bytes reserved on disk up front (posix_fallocate), then maps
    /// it shared. Reserving first turns "the disk is full" into a clean error here instead of
    /// a SIGBUS when a write through the mapping finds no block to land in.
    pub fn create(path: &Path, len: u64) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        if len == 0 {
            return Ok(OutputMap { map: None });
        }
        // SAFETY: the descriptor is open and owned by `file` for the duration of the call.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: the file was just created by us (create_new) with its space reserved; only
        // this mapping writes to it until it is flushed and handed over as a blob.
        let map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        Ok(OutputMap { map: Some(map) })
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }

    /// Writes the mapped pages back to the file.
    pub fn flush(&self) -> std::io::Result<()> {
        match &self.map {
            Some(m) => m.flush(),
            None => Ok(()),
        }
    }
}

/// Lowers the calling thread's scheduling priority to nice `niceness`. CPU-bound lanes call it
/// on their threads (and worker processes at start), so that when they keep every core busy the
/// runtime threads, which answer HTTP and hand out work, still get a core the moment they wake.
pub fn lower_thread_priority(niceness: i32) {
    // SAFETY: gettid has no arguments and cannot fail; setpriority takes plain integers and
    // only changes the scheduling of the thread named, which is this one.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, niceness)
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not lower a thread's priority");
    }
}
