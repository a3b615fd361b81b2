//! The Store interface: snapshots keyed by build id. Backends (in `obuilder-stores`) do
//! filesystem work only; the policy (database, de-duplication, pruning) lives in
//! [`crate::Builder`].

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::exec::ExecError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A command that only reads a store found none.
    #[error("there is no obuilder store at {} (check --store; a build creates one)", path.display())]
    NoStore { path: PathBuf },
    /// The filesystem cannot hold this kind of store.
    #[error("{store}: {} is on {found}, but this store needs {need}; choose another --store kind or path", path.display())]
    WrongFilesystem {
        store: String,
        path: PathBuf,
        need: &'static str,
        found: String,
    },
    /// The store was made with settings other than those given.
    #[error("{store}: {what}")]
    Mismatch { store: String, what: String },
    #[error("no cache named {name:?}")]
    NoCache { name: String },
    #[error("cache {name:?} is in use by {users} running step(s); try again when they finish")]
    CacheInUse { name: String, users: usize },
    /// A result's chain of layers is deeper than the store can stack.
    #[error("{id}: more than {max} layers, the kernel's overlayfs limit; build a shorter chain or use another store")]
    TooDeep { id: String, max: usize },
    #[error("cannot unmount {}: still in use after {secs} s", path.display())]
    Busy { path: PathBuf, secs: u64 },
}

impl StoreError {
    pub fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { what, path, source }
    }
}

/// A build in progress: `dir` holds what becomes the result (`log`, `env`, …) and `rootfs`
/// is the writable tree the step works on (inside `dir` for most stores; a mount point
/// elsewhere for overlayfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildDir {
    pub id: String,
    pub dir: PathBuf,
    pub rootfs: PathBuf,
}

impl BuildDir {
    /// Build dir `dir` of `id`, whose tree is `dir/rootfs` (every store but overlayfs).
    pub fn at(id: &str, dir: PathBuf) -> BuildDir {
        BuildDir {
            id: id.to_string(),
            rootfs: dir.join("rootfs"),
            dir,
        }
    }
}

/// A private writable copy of a shared cache, checked out for one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheCopy {
    pub name: String,
    /// The directory to mount at the cache's target.
    pub path: PathBuf,
    /// The cache's generation when the copy was taken (first release wins).
    pub generation: u64,
}

/// A shared cache and how many copies are checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheInfo {
    pub name: String,
    pub in_use: usize,
}

/// Free space as a store sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskUsage {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

impl DiskUsage {
    pub fn free_percent(&self) -> f64 {
        if self.total_bytes == 0 {
            0.0
        } else {
            100.0 * self.free_bytes as f64 / self.total_bytes as f64
        }
    }
}

/// Snapshot storage.
///
/// Caller's promises (kept by the builder): [`Store::recover`] is called before anything
/// else when the process has the store to itself (a process sharing the store with others
/// never calls it); `prepare` is never called for an id that is already a result, nor
/// twice concurrently for one id (across processes too: under the step's lock), and a
/// stale build dir of that id is first discarded; every `prepare` is followed by exactly one `commit` or
/// `discard` of the returned dir; results are never modified once committed.
///
/// Implementor's guarantees: `commit` publishes atomically (a crash leaves either no result
/// or a complete one); `discard` and a failed `commit` leave nothing under the result name;
/// `recover` removes every half-done build a crash left behind.
#[async_trait]
pub trait Store: Send + Sync {
    /// The store's root directory.
    fn root(&self) -> &Path;

    /// Where the builder keeps its database and the sandbox its state.
    fn state_dir(&self) -> PathBuf {
        self.root().join("state")
    }

    /// Makes [`Store::state_dir`] usable before anything is written there: a no-op for
    /// most stores; ZFS checks its pool and mounts (or makes) its `state` dataset, which a
    /// file written first would otherwise end up under. Called before the sandbox or the
    /// builder touch the state directory, by any process (it must not remove anything).
    async fn ready_state(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// A short description for messages, e.g. `btrfs:/var/lib/obuilder`.
    fn describe(&self) -> String;

    /// Creates the layout if needed and removes leftovers of interrupted builds.
    async fn recover(&self) -> Result<(), StoreError>;

    /// The directory of committed result `id` (holding `rootfs/`, `log`, …), if it exists.
    async fn result(&self, id: &str) -> Result<Option<PathBuf>, StoreError>;

    /// The ids of all committed results.
    async fn list(&self) -> Result<Vec<String>, StoreError>;

    /// A writable build dir for `id`: an empty `rootfs` when `base` is `None`, otherwise a
    /// copy-on-write clone of `base`'s rootfs (`base` must be a result).
    async fn prepare(&self, id: &str, base: Option<&str>) -> Result<BuildDir, StoreError>;

    /// The build dir of `id` that a builder left when it died mid-step, if any (the
    /// caller then discards it). Only called under the step's lock, where any such dir is
    /// stale by definition.
    async fn stale_build(&self, id: &str) -> Result<Option<BuildDir>, StoreError>;

    /// Publishes a prepared build atomically as result `dir.id`; returns the result dir.
    async fn commit(&self, dir: &BuildDir) -> Result<PathBuf, StoreError>;

    /// Whether `commit` writes the whole build dir (the step's log included) to the disk
    /// before publishing it, so that nothing needs flushing on its own before.
    fn commit_is_durable(&self) -> bool {
        false
    }

    /// Publishes a prepared build as result `id` rather than `dir.id`: a failed step kept
    /// for inspection (`build --keep-failed`), under an id no step ever has. A store that
    /// cannot says so (the caller then discards the build).
    async fn commit_as(&self, _dir: &BuildDir, _id: &str) -> Result<PathBuf, StoreError> {
        Err(StoreError::Mismatch {
            store: self.describe(),
            what: "this store cannot keep a failed step".into(),
        })
    }

    /// Throws a prepared build away, leaving nothing behind.
    async fn discard(&self, dir: &BuildDir) -> Result<(), StoreError>;

    /// Deletes result `id` (the builder deletes dependants first).
    async fn delete(&self, id: &str) -> Result<(), StoreError>;

    /// A read-only view of result `id`'s whole root filesystem (for `copy (from (build …))`),
    /// valid until [`Store::release_view`]. Most stores hand out the result's own `rootfs`;
    /// overlayfs mounts its layers read-only.
    async fn view(&self, id: &str) -> Result<PathBuf, StoreError> {
        Ok(self.root().join("result").join(id).join("rootfs"))
    }

    /// A view holding at least `paths` of result `id` (a copy's sources, as the spec gives
    /// them): the whole tree by default; a store that cannot give a whole tree (an engine
    /// of Windows containers) gives just those. Ended by [`Store::release_view`].
    async fn view_paths(&self, id: &str, _paths: &[String]) -> Result<PathBuf, StoreError> {
        self.view(id).await
    }

    /// Ends a view made by [`Store::view`].
    async fn release_view(&self, _view: &Path) -> Result<(), StoreError> {
        Ok(())
    }

    /// Checks out a private writable copy of shared cache `name` (created empty on first
    /// use), its top directory owned by `uid:gid`.
    async fn cache_checkout(&self, name: &str, uid: u32, gid: u32)
        -> Result<CacheCopy, StoreError>;

    /// Ends a checkout. With `keep`, the copy becomes the cache's latest version unless
    /// another copy was published since this one was taken (first release wins; the later
    /// one is discarded). Deletions made in the copy survive. Without `keep`, discarded.
    async fn cache_release(&self, copy: CacheCopy, keep: bool) -> Result<(), StoreError>;

    /// The shared caches, with how many copies each has checked out (by any process).
    async fn cache_list(&self) -> Result<Vec<CacheInfo>, StoreError>;

    /// Deletes a shared cache; refused while a copy is checked out.
    async fn cache_delete(&self, name: &str) -> Result<(), StoreError>;

    /// Waits for deletes to free their space, where the filesystem defers it.
    async fn complete_deletes(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Space on the filesystem holding the store.
    async fn df(&self) -> Result<DiskUsage, StoreError> {
        statvfs_usage(self.root())
    }
}

/// Disk usage from `statvfs(2)`.
pub fn statvfs_usage(path: &Path) -> Result<DiskUsage, StoreError> {
    let s = rustix::fs::statvfs(path).map_err(|e| StoreError::Io {
        what: "statvfs",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(DiskUsage {
        total_bytes: s.f_blocks * s.f_frsize,
        free_bytes: s.f_bavail * s.f_frsize,
    })
}
