//! The directory-store core: one [`Store`] for every backend whose results are whole
//! trees (btrfs, xfs reflinks, rsync; ZFS builds in place and publishes by snapshot, so it
//! shares only the cache-name escape and the lock, see [`crate::zfs`]), over a small primitive, [`TreeOps`]:
//! make an empty tree, clone one, remove one, seal one. Layout, atomic commit and delete,
//! crash recovery and shared caches are the same for all of them and live here once.
//!
//! Layout: see [`crate::layout`]; `result/ID/rootfs` is the tree. Wiped at start-up (when
//! the process has the store to itself): everything under `result-tmp/` and the cache
//! copies left by a crash.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use obuilder_engine::store::{BuildDir, CacheCopy, CacheInfo, DiskUsage, Store, StoreError};

use crate::cache::Caches;
use crate::layout::{entries, remove_tree, Layout};

/// How a backend makes and removes trees: the only thing backends differ in.
#[async_trait]
pub trait TreeOps: Send + Sync + 'static {
    /// The `--store` kind, for messages: `btrfs`, `xfs`, `rsync`.
    fn kind(&self) -> &'static str;

    /// Makes `dst` (which does not exist) an empty tree.
    async fn create_empty(&self, dst: &Path) -> Result<(), StoreError>;

    /// Makes `dst` (which does not exist) a writable copy of tree `src`.
    async fn clone_tree(&self, src: &Path, dst: &Path) -> Result<(), StoreError>;

    /// Removes a tree made by the two above (or a plain directory); a missing one is fine.
    async fn remove(&self, path: &Path) -> Result<(), StoreError>;

    /// Readies a finished build's tree for publishing: made read-only, or deduplicated
    /// against its parent's tree. Trees are never changed after this.
    async fn seal(&self, _tree: &Path, _parent: Option<&Path>) -> Result<(), StoreError> {
        Ok(())
    }

    /// Makes build dir `dst` (which does not exist) whole, as one tree holding `rootfs/`:
    /// empty, or a writable copy of result dir `base` with only its `rootfs/` kept.
    /// Returns false where the backend does not (the default; and btrfs below a result
    /// made before it did): the core then makes a plain directory with `rootfs` a tree
    /// of its own.
    async fn make_dir(&self, _base: Option<&Path>, _dst: &Path) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Publishes build dir `src`, made whole by [`TreeOps::make_dir`], as the result dir
    /// `dst`: read-only and on the disk, data included, when this returns (so the core
    /// neither seals nor flushes it). False if `src` was not made whole.
    async fn publish_dir(&self, _src: &Path, _dst: &Path) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Removes a build or result dir made whole by [`TreeOps::make_dir`]; false if `dir`
    /// is not one.
    async fn remove_dir(&self, _dir: &Path) -> Result<bool, StoreError> {
        Ok(false)
    }

    /// Waits for removals to free their space, where the filesystem defers it.
    async fn complete_deletes(&self, _root: &Path) -> Result<(), StoreError> {
        Ok(())
    }

    /// Space on the filesystem holding `root`.
    async fn df(&self, root: &Path) -> Result<DiskUsage, StoreError> {
        obuilder_engine::store::statvfs_usage(root)
    }
}

/// A store of whole trees over [`TreeOps`].
pub struct DirStore<T> {
    pub(crate) layout: Layout,
    caches: Caches,
    pub(crate) ops: T,
}

impl<T: TreeOps> DirStore<T> {
    pub fn with_ops(root: impl Into<PathBuf>, ops: T) -> DirStore<T> {
        let root = root.into();
        DirStore {
            caches: Caches::new(&root),
            layout: Layout::new(root),
            ops,
        }
    }

    /// Removes a build dir and the tree in it.
    async fn remove_build_dir(&self, dir: &Path) -> Result<(), StoreError> {
        if self.ops.remove_dir(dir).await? {
            return Ok(());
        }
        self.ops.remove(&dir.join("rootfs")).await?;
        remove_tree(dir)
    }
}

#[async_trait]
impl<T: TreeOps> Store for DirStore<T> {
    fn root(&self) -> &Path {
        &self.layout.root
    }

    fn describe(&self) -> String {
        format!("{}:{}", self.ops.kind(), self.layout.root.display())
    }

    async fn recover(&self) -> Result<(), StoreError> {
        self.layout.create()?;
        self.caches.recover(&self.ops).await?;
        for leftover in entries(&self.layout.tmp_dir())? {
            tracing::info!("removing leftover {}", leftover.display());
            self.remove_build_dir(&leftover).await?;
        }
        Ok(())
    }

    async fn result(&self, id: &str) -> Result<Option<PathBuf>, StoreError> {
        Ok(self.layout.exists(id))
    }

    async fn list(&self) -> Result<Vec<String>, StoreError> {
        self.layout.list()
    }

    async fn prepare(&self, id: &str, base: Option<&str>) -> Result<BuildDir, StoreError> {
        let dir = self.layout.tmp(id);
        let base_dir = base.map(|b| self.layout.result(b));
        // The backend makes the build dir whole, or the core makes it with the tree in it.
        let r = if self.ops.make_dir(base_dir.as_deref(), &dir).await? {
            Ok(())
        } else {
            self.layout.make_tmp(id)?;
            let rootfs = dir.join("rootfs");
            match &base_dir {
                None => self.ops.create_empty(&rootfs).await,
                Some(b) => self.ops.clone_tree(&b.join("rootfs"), &rootfs).await,
            }
        };
        let r = r.and_then(|()| match base {
            Some(b) => {
                let parent = dir.join("parent");
                std::fs::write(&parent, b).map_err(StoreError::io("cannot write", &parent))
            }
            None => Ok(()),
        });
        if let Err(e) = r {
            let _ = self.remove_build_dir(&dir).await;
            return Err(e);
        }
        Ok(BuildDir::at(id, dir))
    }

    async fn stale_build(&self, id: &str) -> Result<Option<BuildDir>, StoreError> {
        Ok(self.layout.stale_build(id))
    }

    async fn commit(&self, dir: &BuildDir) -> Result<PathBuf, StoreError> {
        self.commit_as(dir, &dir.id).await
    }

    /// `commit_as` writes the filesystem to the disk before the rename.
    fn commit_is_durable(&self) -> bool {
        true
    }

    async fn commit_as(&self, dir: &BuildDir, id: &str) -> Result<PathBuf, StoreError> {
        let to = self.layout.result(id);
        if self.ops.publish_dir(&dir.dir, &to).await? {
            return Ok(to);
        }
        let parent = std::fs::read_to_string(dir.dir.join("parent")).ok();
        let parent_tree = parent.map(|p| self.layout.result(p.trim()).join("rootfs"));
        self.ops.seal(&dir.rootfs, parent_tree.as_deref()).await?;
        // (After the seal, which may rewrite the tree: rsync's hard-linked copy.)
        crate::layout::make_durable(&dir.dir)?;
        self.layout.publish_as(&dir.id, id)
    }

    async fn discard(&self, dir: &BuildDir) -> Result<(), StoreError> {
        self.remove_build_dir(&dir.dir).await
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        // A whole-dir result goes in one step (a btrfs subvolume delete is atomic, and a
        // read-only subvolume cannot be renamed out of `result/` first).
        if self.ops.remove_dir(&self.layout.result(id)).await? {
            return Ok(());
        }
        if let Some(moved) = self.layout.unpublish(id)? {
            self.remove_build_dir(&moved).await?;
        }
        Ok(())
    }

    async fn cache_checkout(
        &self,
        name: &str,
        uid: u32,
        gid: u32,
    ) -> Result<CacheCopy, StoreError> {
        self.caches.checkout(&self.ops, name, uid, gid).await
    }

    async fn cache_release(&self, copy: CacheCopy, keep: bool) -> Result<(), StoreError> {
        self.caches.release(&self.ops, copy, keep).await
    }

    async fn cache_list(&self) -> Result<Vec<CacheInfo>, StoreError> {
        self.caches.list()
    }

    async fn cache_delete(&self, name: &str) -> Result<(), StoreError> {
        self.caches.delete(&self.ops, name).await
    }

    async fn complete_deletes(&self) -> Result<(), StoreError> {
        self.ops.complete_deletes(&self.layout.root).await
    }

    async fn df(&self) -> Result<DiskUsage, StoreError> {
        self.ops.df(&self.layout.root).await
    }
}
