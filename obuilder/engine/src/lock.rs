//! Coordination between obuilder processes sharing one store (`flock(2)` locks, released by
//! the kernel when a process dies, so a crash never leaves a lock behind).
//!
//! * `state/store.lock`: every builder holds it shared. A process that gets it exclusively
//!   at start-up is alone, and only then recovers the store (wiping temp dirs and leftover
//!   containers that would otherwise be another process's live work). Pruning from the CLI
//!   takes it exclusively too.
//! * `state/locks/XYZ.lock` (4096 buckets by id prefix): held while a step is built, so
//!   two processes never build the same id at once; the second waits and then finds the
//!   result in the store.
//! * `state/open/PID`: exists while a builder has the store open; one found by a process
//!   that is alone was left by a process that died: the database is reconciled with the disk.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{flock, FlockOperation};

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// The store-wide lock.
pub struct StoreLock {
    file: File,
    path: PathBuf,
}

impl StoreLock {
    pub fn open(state_dir: &Path) -> std::io::Result<StoreLock> {
        let path = state_dir.join("store.lock");
        Ok(StoreLock {
            file: open(&path)?,
            path,
        })
    }

    /// Takes the lock exclusively if no other process holds it; true if it did.
    pub fn try_exclusive(&self) -> bool {
        flock(self.file.as_fd(), FlockOperation::NonBlockingLockExclusive).is_ok()
    }

    /// Holds the lock shared (waiting while another process holds it exclusively).
    pub async fn shared(&self) -> std::io::Result<()> {
        let mut backoff = Backoff::default();
        loop {
            match flock(self.file.as_fd(), FlockOperation::NonBlockingLockShared) {
                Ok(()) => return Ok(()),
                Err(rustix::io::Errno::WOULDBLOCK) => backoff.wait().await,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Polling for a lock (polled, not waited for, so that a cancelled build stops waiting):
/// 1 ms at first, doubling to 50 ms. Another process's start-up or a short step is
/// typically done in a few milliseconds; a fixed 50 ms made every such wait cost 50.
#[derive(Default)]
struct Backoff {
    ms: u64,
}

impl Backoff {
    async fn wait(&mut self) {
        self.ms = (self.ms * 2).clamp(1, 50);
        tokio::time::sleep(Duration::from_millis(self.ms)).await;
    }
}

/// A per-step lock, held until dropped.
pub struct StepLock {
    _file: File,
}

/// Who holds a step's bucket lock, as it wrote in the lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The step it builds (the bucket is shared by ids with the same prefix).
    pub id: String,
}

fn read_holder(file: &File) -> Option<Holder> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 128];
    let n = file.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let (pid, id) = text.trim().split_once(' ')?;
    Some(Holder {
        pid: pid.parse().ok()?,
        id: id.to_string(),
    })
}

impl StepLock {
    /// Waits for the lock of `id`'s bucket; `None` if `cancelled` fired first. While it
    /// waits, `waiting` hears who holds it (once per holder). The holder's pid and step
    /// are written into the lock file for the next waiter to read.
    pub async fn acquire(
        state_dir: &Path,
        id: &str,
        cancelled: impl Fn() -> bool,
        mut waiting: impl FnMut(&Option<Holder>),
    ) -> std::io::Result<Option<StepLock>> {
        use std::os::unix::fs::FileExt;
        let bucket: String = id.chars().take(3).collect();
        let file = open(&state_dir.join("locks").join(format!("{bucket}.lock")))?;
        let mut told = None;
        let mut backoff = Backoff::default();
        loop {
            match flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    let me = format!("{} {id}\n", std::process::id());
                    file.set_len(0)?;
                    file.write_at(me.as_bytes(), 0)?;
                    return Ok(Some(StepLock { _file: file }));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    if cancelled() {
                        return Ok(None);
                    }
                    let h = read_holder(&file);
                    if told.as_ref() != Some(&h) {
                        waiting(&h);
                        told = Some(h);
                    }
                    backoff.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The open markers in `state/open` (when this process is alone, all of them are left by
/// processes that died).
pub fn markers(state_dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(state_dir.join("open")) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// This process's open marker.
pub fn marker(state_dir: &Path) -> PathBuf {
    state_dir.join("open").join(std::process::id().to_string())
}
