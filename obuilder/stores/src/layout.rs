//! The on-disk layout every store shares, and the moves that make commit and delete
//! atomic.
//!
//! ```text
//! ROOT/result/ID/        committed results: rootfs/, log, env, image.json (+ parent for overlayfs)
//! ROOT/result-tmp/ID/    builds in progress; wiped at start-up
//! ROOT/result-tmp/del-ID deletes in progress (renamed out of result/ first); wiped at start-up
//! ROOT/state/            database, sandbox state
//! ```
//!
//! Commit is one `rename(2)` of `result-tmp/ID` to `result/ID`; delete first renames the
//! result out of `result/`, so a crash never leaves a half-present result.

use std::path::{Path, PathBuf};

use obuilder_engine::store::StoreError;

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn result_dir(&self) -> PathBuf {
        self.root.join("result")
    }

    pub fn result(&self, id: &str) -> PathBuf {
        self.result_dir().join(id)
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("result-tmp")
    }

    pub fn tmp(&self, id: &str) -> PathBuf {
        self.tmp_dir().join(id)
    }

    /// Creates `result/`, `result-tmp/` and `state/` (mode 0700 for the root: results hold
    /// container-owned files).
    pub fn create(&self) -> Result<(), StoreError> {
        for d in [
            self.root.clone(),
            self.result_dir(),
            self.tmp_dir(),
            self.root.join("state"),
        ] {
            std::fs::create_dir_all(&d).map_err(StoreError::io("cannot create", &d))?;
        }
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700));
        Ok(())
    }

    pub fn exists(&self, id: &str) -> Option<PathBuf> {
        let p = self.result(id);
        p.join("rootfs").symlink_metadata().is_ok().then_some(p)
    }

    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.result_dir();
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(StoreError::io("cannot list", &dir))? {
            let e = e.map_err(StoreError::io("cannot list", &dir))?;
            if let Some(name) = e.file_name().to_str() {
                out.push(name.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Makes `result-tmp/ID`. The builder discards a stale one first (under the step's
    /// lock), so one that exists here is an error.
    pub fn make_tmp(&self, id: &str) -> Result<PathBuf, StoreError> {
        let t = self.tmp(id);
        std::fs::create_dir(&t).map_err(StoreError::io("cannot create", &t))?;
        Ok(t)
    }

    /// `result-tmp/ID` if a builder left it behind.
    pub fn stale_tmp(&self, id: &str) -> Option<PathBuf> {
        let t = self.tmp(id);
        t.symlink_metadata().is_ok().then_some(t)
    }

    /// The build dir of `id` that a builder left behind (see [`Layout::stale_tmp`]).
    pub fn stale_build(&self, id: &str) -> Option<obuilder_engine::store::BuildDir> {
        self.stale_tmp(id)
            .map(|dir| obuilder_engine::store::BuildDir::at(id, dir))
    }

    /// Whether a store was ever made here (its database or its results exist).
    pub fn exists_store(&self) -> bool {
        self.root.join("state").is_dir() || self.result_dir().is_dir()
    }

    /// Publishes `result-tmp/ID` as `result/ID` in one rename.
    pub fn publish(&self, id: &str) -> Result<PathBuf, StoreError> {
        self.publish_as(id, id)
    }

    /// Renames the build dir of `from` into place as result `to`.
    pub fn publish_as(&self, from: &str, to: &str) -> Result<PathBuf, StoreError> {
        let (from, to) = (self.tmp(from), self.result(to));
        std::fs::rename(&from, &to).map_err(StoreError::io("cannot publish", &to))?;
        Ok(to)
    }

    /// Renames `result/ID` out of the way for deletion; returns where it went (None if it
    /// did not exist).
    pub fn unpublish(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        let from = self.result(id);
        let to = self.tmp_dir().join(format!("del-{id}"));
        match std::fs::rename(&from, &to) {
            Ok(()) => Ok(Some(to)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("cannot delete", &from)(e)),
        }
    }
}

/// Makes a finished tree's data durable before it is published: writes the filesystem
/// holding `tree` to its disk and waits. No store's own commit does it: a btrfs
/// transaction commit (the read-only flag) leaves file data in the page cache
/// (delayed allocation), as ext4 and XFS do, until the kernel's writeback half a minute
/// later; a power cut in between would leave a published result with empty or torn
/// files, reused by every later build. (The original's btrfs store published with a
/// read-only snapshot, which flushes; its other stores did not.)
pub fn make_durable(tree: &Path) -> Result<(), StoreError> {
    #[cfg(target_os = "linux")]
    {
        crate::linux_fs::sync_filesystem(tree).map_err(StoreError::io("cannot flush", tree))
    }
    #[cfg(not(target_os = "linux"))]
    {
        // No per-filesystem sync elsewhere: every filesystem's writes are started. (macOS
        // and FreeBSD may return before they end; `F_FULLFSYNC` of each file is the whole
        // answer on macOS, not done yet.)
        let _ = tree;
        unsafe { libc::sync() };
        Ok(())
    }
}

/// `rm -rf`, in-process; a missing path is fine.
pub fn remove_tree(path: &Path) -> Result<(), StoreError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("cannot remove", path)(e)),
    }
}

/// The entries of a directory (names), empty if it is missing.
pub fn entries(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.map(|e| e.path())
                    .map_err(StoreError::io("cannot list", dir))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::io("cannot list", dir)(e)),
    }
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
