//! Coordination between obuilder processes sharing one store (`flock(2)` locks, released by
//! the kernel when a process dies, so a crash never leaves a lock behind).
//!
//! * `state/store.lock`: every builder holds it shared. A process that gets it exclusively
//!   at start-up is alone, and only then recovers the store (wiping temp dirs and leftover
//!   containers that would otherwise be another process's live work). Pruning from the CLI
//!   takes it exclusively too.
//! * `state/locks/ID.lock`: held while step `ID` is built, so two processes never build
//!   the same id at once; the second waits and then finds the result in the store. One
//!   file per step, removed by its holder (ids that merely share a prefix never wait for
//!   each other, as they did with the 4096 buckets by prefix this replaced: one build
//!   could wait hours for an unrelated long step). A crash leaves a file, unlocked;
//!   the next process that is alone after a crash clears the directory.
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

/// A per-step lock, held until dropped; its file is removed then.
pub struct StepLock {
    /// Holds the `flock` (released when it closes).
    _file: File,
    path: PathBuf,
}

/// Who holds a step's lock, as it wrote in the lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The step it builds.
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

/// Whether `file` is still the one at `path` (its holder removes it before unlocking, so
/// a lock taken on a removed file guards nothing).
fn still_at(file: &File, path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let held = file.metadata()?;
    Ok(match std::fs::metadata(path) {
        Ok(m) => m.dev() == held.dev() && m.ino() == held.ino(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    })
}

impl StepLock {
    /// Waits for the lock of step `id`; `None` if `cancelled` fired first. While it waits,
    /// `waiting` hears who holds it (once per holder). The holder's pid and step are
    /// written into the lock file for the next waiter to read.
    pub async fn acquire(
        state_dir: &Path,
        id: &str,
        cancelled: impl Fn() -> bool,
        mut waiting: impl FnMut(&Option<Holder>),
    ) -> std::io::Result<Option<StepLock>> {
        use std::os::unix::fs::FileExt;
        // A step id is a hash: a file name as it is. Anything else never reaches a path.
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{id:?} is not a step id"),
            ));
        }
        let path = state_dir.join("locks").join(format!("{id}.lock"));
        let mut told = None;
        let mut backoff = Backoff::default();
        loop {
            // Opened afresh each round: the holder removes the file when it is done.
            let file = open(&path)?;
            match flock(file.as_fd(), FlockOperation::NonBlockingLockExclusive) {
                Ok(()) if still_at(&file, &path)? => {
                    let me = format!("{} {id}\n", std::process::id());
                    file.set_len(0)?;
                    file.write_at(me.as_bytes(), 0)?;
                    return Ok(Some(StepLock { _file: file, path }));
                }
                // Taken just as its holder removed it: take the new one.
                Ok(()) => continue,
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    if cancelled() {
                        return Ok(None);
                    }
                    let h = read_holder(&file);
                    if told.as_ref() != Some(&h) {
                        waiting(&h);
                        told = Some(h);
                    }
                    drop(file);
                    backoff.wait().await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for StepLock {
    fn drop(&mut self) {
        // Removed while still locked, then unlocked by the close: a waiter that locks the
        // removed file sees it is gone and opens the path again.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes every step lock file (only for a process alone on the store, after a crash:
/// no other process holds any, and a dead one left its file behind).
pub fn clear_step_locks(state_dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(state_dir.join("locks")) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
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

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "abc0000000000000000000000000000000000000000000000000000000000001";
    // The same first three characters: the same bucket under the old scheme.
    const B: &str = "abc0000000000000000000000000000000000000000000000000000000000002";

    fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn file_of(dir: &Path, id: &str) -> PathBuf {
        dir.join("locks").join(format!("{id}.lock"))
    }

    #[test]
    fn a_step_waits_for_its_own_id_only_and_its_file_goes_with_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        block_on(async {
            let a = StepLock::acquire(d, A, || false, |_| {})
                .await
                .unwrap()
                .unwrap();
            assert!(file_of(d, A).exists());
            // (flock locks are per open file: a second open in this process conflicts as
            // another process's would.)
            let b = StepLock::acquire(d, B, || false, |h| panic!("{B} waited for {h:?}"))
                .await
                .unwrap()
                .unwrap();
            // The same id waits, says who holds it, and gives up when cancelled.
            let (rounds, mut heard) = (std::cell::Cell::new(0), Vec::new());
            let r = StepLock::acquire(
                d,
                A,
                || {
                    rounds.set(rounds.get() + 1);
                    rounds.get() > 3
                },
                |h| heard.push(h.clone()),
            )
            .await
            .unwrap();
            assert!(r.is_none());
            let me = Holder {
                pid: std::process::id(),
                id: A.into(),
            };
            assert_eq!(heard, vec![Some(me)]);
            // Released: the file is gone, and a waiter takes the lock.
            let waiter = StepLock::acquire(d, A, || false, |_| {});
            let release = async {
                tokio::time::sleep(Duration::from_millis(30)).await;
                drop(a);
            };
            let (again, ()) = tokio::join!(waiter, release);
            let again = again.unwrap().unwrap();
            assert!(file_of(d, A).exists(), "the new holder's file");
            drop((again, b));
            assert!(!file_of(d, A).exists() && !file_of(d, B).exists());
        });
    }

    #[test]
    fn a_lock_on_a_removed_file_is_not_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let old = open(&p).unwrap();
        assert!(still_at(&old, &p).unwrap());
        std::fs::remove_file(&p).unwrap();
        assert!(!still_at(&old, &p).unwrap(), "removed");
        let _new = open(&p).unwrap();
        assert!(!still_at(&old, &p).unwrap(), "replaced by another file");
    }

    #[test]
    fn only_step_ids_become_lock_files_and_a_crash_s_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        block_on(async {
            for bad in ["", "../x", "a/b", "a b"] {
                let e = StepLock::acquire(d, bad, || false, |_| {}).await.err();
                assert_eq!(e.map(|e| e.kind()), Some(std::io::ErrorKind::InvalidInput));
            }
        });
        assert!(!d.join("x").exists());
        // A dead process's file, and one of the old buckets.
        for f in [file_of(d, A), d.join("locks/abc.lock")] {
            open(&f).unwrap();
        }
        clear_step_locks(d);
        assert_eq!(std::fs::read_dir(d.join("locks")).unwrap().count(), 0);
    }
}
