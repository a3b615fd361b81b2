//! `btrfs:/path`: each result's `rootfs` is a btrfs subvolume; a step's build dir is a
//! writable snapshot of its parent's, made read-only and renamed into place on commit.
//!
//! Layout: see [`crate::common`]; `result/ID/rootfs` is a read-only subvolume. Wiped at
//! start-up: every subvolume and directory under `result-tmp/`. Commit is a read-only flag
//! and one rename (no second snapshot as in OBuilder). The per-step operations (snapshot,
//! read-only flag) are ioctls; create, delete and sync go through `btrfs` via the Exec seam.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::store::{BuildDir, Store, StoreError};

use crate::cache::{CacheOps, Caches};
use crate::common::{entries, path_str, remove_tree, Layout};
use obuilder_engine::store::{CacheCopy, CacheInfo};

pub struct BtrfsStore {
    layout: Layout,
    exec: SharedExec,
    caches: Caches,
}

/// Cache trees as subvolumes: created empty, snapshotted per checkout.
struct SubvolOps<'a>(&'a BtrfsStore);

#[async_trait]
impl CacheOps for SubvolOps<'_> {
    async fn create_empty(&self, dst: &Path) -> Result<(), StoreError> {
        self.0.btrfs(&["subvolume", "create", &path_str(dst)]).await
    }
    async fn clone_tree(&self, src: &Path, dst: &Path) -> Result<(), StoreError> {
        crate::btrfs_ioctl::snapshot(src, dst).map_err(|e| {
            StoreError::Other(format!(
                "cannot snapshot {} to {}: {e}",
                src.display(),
                dst.display()
            ))
        })
    }
    async fn remove(&self, path: &Path) -> Result<(), StoreError> {
        if is_subvolume(path) {
            self.0
                .btrfs(&["subvolume", "delete", &path_str(path)])
                .await?;
        }
        remove_tree(path)
    }
}

impl BtrfsStore {
    pub fn new(root: impl Into<PathBuf>, exec: SharedExec) -> BtrfsStore {
        let root = root.into();
        BtrfsStore {
            caches: Caches::new(&root),
            layout: Layout::new(root),
            exec,
        }
    }

    async fn btrfs(&self, args: &[&str]) -> Result<(), StoreError> {
        let mut argv = vec!["btrfs"];
        argv.extend_from_slice(args);
        self.exec.output(&Cmd::new(argv)).await?;
        Ok(())
    }

    /// Deletes a directory that may hold a `rootfs` subvolume.
    async fn remove_build_dir(&self, dir: &Path) -> Result<(), StoreError> {
        let rootfs = dir.join("rootfs");
        if is_subvolume(&rootfs) {
            self.btrfs(&["subvolume", "delete", &path_str(&rootfs)])
                .await?;
        }
        remove_tree(dir)
    }
}

/// A btrfs subvolume's root has inode number 256.
fn is_subvolume(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    p.symlink_metadata()
        .map(|m| m.is_dir() && m.ino() == 256)
        .unwrap_or(false)
}

#[async_trait]
impl Store for BtrfsStore {
    fn root(&self) -> &Path {
        &self.layout.root
    }

    fn describe(&self) -> String {
        format!("btrfs:{}", self.layout.root.display())
    }

    async fn recover(&self) -> Result<(), StoreError> {
        self.layout.create()?;
        self.caches.recover(&SubvolOps(self)).await?;
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
        let dir = self.layout.make_tmp(id)?;
        let rootfs = dir.join("rootfs");
        let r = match base {
            None => {
                self.btrfs(&["subvolume", "create", &path_str(&rootfs)])
                    .await
            }
            Some(b) => {
                let src = self.layout.result(b).join("rootfs");
                crate::btrfs_ioctl::snapshot(&src, &rootfs).map_err(|e| {
                    StoreError::Other(format!(
                        "cannot snapshot {} to {}: {e}",
                        src.display(),
                        rootfs.display()
                    ))
                })
            }
        };
        if let Err(e) = r {
            let _ = remove_tree(&dir);
            return Err(e);
        }
        Ok(BuildDir {
            id: id.to_string(),
            dir,
            rootfs,
        })
    }

    async fn commit(&self, dir: &BuildDir) -> Result<PathBuf, StoreError> {
        crate::btrfs_ioctl::set_readonly(&dir.rootfs).map_err(|e| {
            StoreError::Other(format!(
                "cannot make {} read-only: {e}",
                dir.rootfs.display()
            ))
        })?;
        self.layout.publish(&dir.id)
    }

    async fn discard(&self, dir: &BuildDir) -> Result<(), StoreError> {
        self.remove_build_dir(&dir.dir).await
    }

    async fn cache_checkout(
        &self,
        name: &str,
        uid: u32,
        gid: u32,
    ) -> Result<CacheCopy, StoreError> {
        self.caches.checkout(&SubvolOps(self), name, uid, gid).await
    }

    async fn cache_release(&self, copy: CacheCopy, keep: bool) -> Result<(), StoreError> {
        self.caches.release(&SubvolOps(self), copy, keep).await
    }

    async fn cache_list(&self) -> Result<Vec<CacheInfo>, StoreError> {
        self.caches.list()
    }

    async fn cache_delete(&self, name: &str) -> Result<(), StoreError> {
        self.caches.delete(&SubvolOps(self), name).await
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        if let Some(moved) = self.layout.unpublish(id)? {
            self.remove_build_dir(&moved).await?;
        }
        Ok(())
    }

    async fn complete_deletes(&self) -> Result<(), StoreError> {
        // `subvolume sync` has hung for days in production (OBuilder #69): bound it.
        let root = path_str(&self.layout.root);
        let cmd = Cmd::new(["timeout", "60", "btrfs", "subvolume", "sync", root.as_str()]);
        if let Err(e) = self.exec.output(&cmd).await {
            tracing::warn!("btrfs subvolume sync did not finish: {e}");
        }
        Ok(())
    }
}
