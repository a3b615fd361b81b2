//! Shared caches (`(run (cache (NAME (target PATH))) …)`), one implementation for every
//! store over its own clone primitive.
//!
//! ```text
//! ROOT/cache/c-NAME          the latest version of cache NAME (name escaped injectively)
//! ROOT/cache/c-NAME.gen      its generation; flock'd while a release compares and swaps
//! ROOT/cache-tmp/PID-N-c-NAME  checked-out copies; wiped at start-up when no other process
//!                              holds the store (see `recover`)
//! ```
//!
//! A step gets a private writable copy (a btrfs snapshot, a reflink copy, or a plain copy);
//! on release the copy replaces the latest version by rename, so deletions made in it survive
//! (OBuilder's overlayfs store merged copies back with `cp` and lost them). If another copy
//! was published since this one was taken, this one is discarded: first release wins, and
//! because the generation lives in a locked file, that holds across processes too.

use std::io::{Read, Seek, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use obuilder_engine::store::{CacheCopy, CacheInfo, StoreError};

use crate::dirstore::TreeOps;
use crate::layout::entries;

/// Escapes a cache name injectively into a file name: `c-` followed by the name with every
/// byte outside `[A-Za-z0-9._-]` (and a leading `.`) written as `%XX`.
pub fn escape(name: &str) -> String {
    let mut out = String::from("c-");
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The inverse of [`escape`], for listing.
pub fn unescape(file: &str) -> Option<String> {
    let s = file.strip_prefix("c-")?;
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 && i + 3 <= b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub struct Caches {
    dir: PathBuf,
    tmp: PathBuf,
    next: AtomicU64,
}

fn io(what: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    StoreError::io(what, p.to_path_buf())
}

/// A lock on a cache's generation file, held until dropped: exclusive to create or swap the
/// latest version, shared to copy it (so copies run side by side, and never while a release
/// renames the tree being copied).
pub(crate) struct GenLock {
    file: std::fs::File,
}

impl GenLock {
    /// Waits on a blocking thread: a lock held across an `.await` (a copy in progress) must
    /// not be waited for on a runtime worker, or the holder could never be polled again.
    pub(crate) async fn take(path: &Path) -> Result<GenLock, StoreError> {
        Self::take_async(path, rustix::fs::FlockOperation::LockExclusive).await
    }

    async fn take_shared(path: &Path) -> Result<GenLock, StoreError> {
        Self::take_async(path, rustix::fs::FlockOperation::LockShared).await
    }

    async fn take_async(
        path: &Path,
        op: rustix::fs::FlockOperation,
    ) -> Result<GenLock, StoreError> {
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::take_as(&p, op))
            .await
            .map_err(|e| io("cannot lock", path)(std::io::Error::other(e.to_string())))?
    }

    fn take_as(path: &Path, op: rustix::fs::FlockOperation) -> Result<GenLock, StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("cannot open", path))?;
        rustix::fs::flock(file.as_fd(), op).map_err(|e| io("cannot lock", path)(e.into()))?;
        Ok(GenLock { file })
    }

    pub(crate) fn read(&mut self) -> u64 {
        let mut s = String::new();
        let _ = self.file.rewind();
        let _ = self.file.read_to_string(&mut s);
        s.trim().parse().unwrap_or(0)
    }

    pub(crate) fn write(&mut self, g: u64) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(g.to_string().as_bytes())?;
        self.file.sync_data()
    }
}

impl Caches {
    pub fn new(root: &Path) -> Caches {
        Caches {
            dir: root.join("cache"),
            tmp: root.join("cache-tmp"),
            next: AtomicU64::new(0),
        }
    }

    /// Creates the dirs and removes copies left by a crash. Only call it when this process
    /// is the store's only user.
    pub async fn recover(&self, ops: &dyn TreeOps) -> Result<(), StoreError> {
        for d in [&self.dir, &self.tmp] {
            std::fs::create_dir_all(d).map_err(io("cannot create", d))?;
        }
        for leftover in entries(&self.tmp)? {
            tracing::info!("removing leftover cache copy {}", leftover.display());
            ops.remove(&leftover).await?;
        }
        Ok(())
    }

    pub async fn checkout(
        &self,
        ops: &dyn TreeOps,
        name: &str,
        uid: u32,
        gid: u32,
    ) -> Result<CacheCopy, StoreError> {
        let esc = escape(name);
        let master = self.dir.join(&esc);
        let gen_path = self.dir.join(format!("{esc}.gen"));
        {
            let _lock = GenLock::take(&gen_path).await?;
            if !master.exists() {
                let fresh = self.tmp.join(format!(
                    "new-{}-{}-{esc}",
                    std::process::id(),
                    self.next.fetch_add(1, Ordering::Relaxed)
                ));
                ops.create_empty(&fresh).await?;
                std::os::unix::fs::chown(&fresh, Some(uid), Some(gid))
                    .map_err(io("cannot chown", &fresh))?;
                std::fs::rename(&fresh, &master).map_err(io("cannot create cache", &master))?;
            }
        }
        let path = self.tmp.join(format!(
            "{}-{}-{esc}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        // The generation and the tree copied must be the same version: a release swaps the
        // tree only under the exclusive lock.
        let generation = {
            let mut lock = GenLock::take_shared(&gen_path).await?;
            let g = lock.read();
            ops.clone_tree(&master, &path).await?;
            g
        };
        // The step's user owns the top of its copy (the cache may have been made by another).
        std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(io("cannot chown", &path))?;
        Ok(CacheCopy {
            name: name.to_string(),
            path,
            generation,
        })
    }

    pub async fn release(
        &self,
        ops: &dyn TreeOps,
        copy: CacheCopy,
        keep: bool,
    ) -> Result<(), StoreError> {
        let esc = escape(&copy.name);
        let master = self.dir.join(&esc);
        if keep {
            let mut lock = GenLock::take(&self.dir.join(format!("{esc}.gen"))).await?;
            if lock.read() == copy.generation {
                let old = self.tmp.join(format!(
                    "old-{}-{}-{esc}",
                    std::process::id(),
                    self.next.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::rename(&master, &old).map_err(io("cannot replace cache", &master))?;
                std::fs::rename(&copy.path, &master)
                    .map_err(io("cannot publish cache", &master))?;
                lock.write(copy.generation + 1)
                    .map_err(io("cannot write", &self.dir))?;
                drop(lock);
                return ops.remove(&old).await;
            }
            tracing::info!(
                "cache {:?}: a newer version was published first; discarding this copy",
                copy.name
            );
        }
        ops.remove(&copy.path).await
    }

    fn copies_of(&self, esc: &str) -> usize {
        entries(&self.tmp)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            .filter(|n| !n.starts_with("old-") && !n.starts_with("new-"))
            .filter(|n| n.splitn(3, '-').nth(2) == Some(esc))
            .count()
    }

    pub fn list(&self) -> Result<Vec<CacheInfo>, StoreError> {
        let mut out = Vec::new();
        for p in entries(&self.dir)? {
            let Some(file) = p.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if file.ends_with(".gen") {
                continue;
            }
            if let Some(name) = unescape(file) {
                out.push(CacheInfo {
                    in_use: self.copies_of(file),
                    name,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub async fn delete(&self, ops: &dyn TreeOps, name: &str) -> Result<(), StoreError> {
        let esc = escape(name);
        let gen_path = self.dir.join(format!("{esc}.gen"));
        let master = self.dir.join(&esc);
        if !master.exists() {
            return Err(StoreError::NoCache {
                name: name.to_string(),
            });
        }
        let _lock = GenLock::take(&gen_path).await?;
        let n = self.copies_of(&esc);
        if n > 0 {
            return Err(StoreError::CacheInUse {
                name: name.to_string(),
                users: n,
            });
        }
        let old = self.tmp.join(format!(
            "old-{}-{}-{esc}",
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::rename(&master, &old).map_err(io("cannot delete cache", &master))?;
        let _ = std::fs::remove_file(&gen_path);
        ops.remove(&old).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_and_safe() {
        let names = [
            "opam-archives",
            "a/b",
            "..",
            ".",
            "x y",
            "\n1",
            "\u{a1}",
            "%0A1",
            "c-x",
            "",
            "dune_cache.v2",
        ];
        let escaped: Vec<String> = names.iter().map(|n| escape(n)).collect();
        let mut uniq = escaped.clone();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), names.len(), "{escaped:?}");
        for (n, e) in names.iter().zip(&escaped) {
            assert!(!e.contains('/') && e != "." && e != "..", "{e}");
            assert_eq!(unescape(e).as_deref(), Some(*n));
        }
        assert_eq!(escape("opam-archives"), "c-opam-archives");
        assert_eq!(escape("\n1"), "c-%0A1");
        assert_eq!(escape("\u{a1}"), "c-%C2%A1");
    }
}
