#![cfg(target_os = "linux")]
//! `btrfs:/path`: each result's `rootfs` is a btrfs subvolume; a step's build dir is a
//! writable snapshot of its parent's, made read-only and renamed into place on commit.
//!
//! Layout: see [`crate::layout`]; `result/ID/rootfs` is a read-only subvolume. Wiped at
//! start-up: every subvolume and directory under `result-tmp/`. Commit is a read-only flag
//! and one rename (no second snapshot as in OBuilder). The per-step operations (snapshot,
//! read-only flag) are ioctls; create, delete and sync go through `btrfs` via the Exec seam.
//! Shared caches are subvolumes too, snapshotted per checkout.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::store::StoreError;

use crate::dirstore::{DirStore, TreeOps};
use crate::layout::{path_str, remove_tree};

/// btrfs subvolumes as trees.
pub struct Btrfs {
    exec: SharedExec,
}

pub type BtrfsStore = DirStore<Btrfs>;

impl DirStore<Btrfs> {
    pub fn new(root: impl Into<PathBuf>, exec: SharedExec) -> BtrfsStore {
        DirStore::with_ops(root, Btrfs { exec })
    }
}

impl Btrfs {
    async fn btrfs(&self, args: &[&str]) -> Result<(), StoreError> {
        let mut argv = vec!["btrfs"];
        argv.extend_from_slice(args);
        self.exec.output(&Cmd::new(argv)).await?;
        Ok(())
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
impl TreeOps for Btrfs {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    async fn create_empty(&self, dst: &Path) -> Result<(), StoreError> {
        self.btrfs(&["subvolume", "create", &path_str(dst)]).await
    }

    async fn clone_tree(&self, src: &Path, dst: &Path) -> Result<(), StoreError> {
        crate::btrfs_ioctl::snapshot(src, dst).map_err(StoreError::io("cannot snapshot into", dst))
    }

    async fn remove(&self, path: &Path) -> Result<(), StoreError> {
        if is_subvolume(path) {
            self.btrfs(&["subvolume", "delete", &path_str(path)])
                .await?;
        }
        remove_tree(path)
    }

    async fn seal(&self, tree: &Path, _parent: Option<&Path>) -> Result<(), StoreError> {
        crate::btrfs_ioctl::set_readonly(tree)
            .map_err(StoreError::io("cannot make read-only", tree))
    }

    async fn complete_deletes(&self, root: &Path) -> Result<(), StoreError> {
        // `subvolume sync` has hung for days in production (OBuilder #69): bound it.
        let root = path_str(root);
        let cmd = Cmd::new(["timeout", "60", "btrfs", "subvolume", "sync", root.as_str()]);
        if let Err(e) = self.exec.output(&cmd).await {
            tracing::warn!("btrfs subvolume sync did not finish: {e}");
        }
        Ok(())
    }
}
