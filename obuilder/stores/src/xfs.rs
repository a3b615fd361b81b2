#![cfg(target_os = "linux")]
//! `xfs:/path`: any filesystem with reflinks (XFS made with `reflink=1`, or btrfs used as a
//! plain filesystem). A step's build dir is a reflink copy of its parent's rootfs: data
//! blocks are shared until written. Opening the store checks that the filesystem can
//! reflink at all.
//!
//! Layout: see [`crate::layout`]. Wiped at start-up: everything under `result-tmp/`.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::store::StoreError;

use crate::dirstore::{DirStore, TreeOps};
use crate::layout::{path_str, remove_tree};

/// Trees copied with `cp --reflink=always` (GNU cp).
pub struct Reflink {
    pub(crate) exec: SharedExec,
    /// `--reflink=always`, or `--reflink=auto` where sharing blocks is only a bonus.
    pub(crate) reflink: &'static str,
}

pub type XfsStore = DirStore<Reflink>;

impl DirStore<Reflink> {
    pub fn new(root: impl Into<PathBuf>, exec: SharedExec) -> XfsStore {
        DirStore::with_ops(
            root,
            Reflink {
                exec,
                reflink: "--reflink=always",
            },
        )
    }
}

#[async_trait]
impl TreeOps for Reflink {
    fn kind(&self) -> &'static str {
        "xfs"
    }

    async fn create_empty(&self, dst: &Path) -> Result<(), StoreError> {
        std::fs::create_dir(dst).map_err(StoreError::io("cannot create", dst))
    }

    async fn clone_tree(&self, src: &Path, dst: &Path) -> Result<(), StoreError> {
        let cmd = Cmd::new([
            "cp",
            "--archive",
            self.reflink,
            "--no-target-directory",
            &path_str(src),
            &path_str(dst),
        ]);
        self.exec.output(&cmd).await?;
        Ok(())
    }

    async fn remove(&self, path: &Path) -> Result<(), StoreError> {
        remove_tree(path)
    }
}

/// Whether files in `dir` can share blocks (`FICLONE` between two scratch files, removed
/// afterwards).
pub fn can_reflink(dir: &Path) -> std::io::Result<bool> {
    use std::io::Write;
    let a = dir.join(format!(".obuilder-reflink-probe-{}", std::process::id()));
    let b = dir.join(format!(".obuilder-reflink-probe-{}.b", std::process::id()));
    let r = (|| {
        let mut fa = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&a)?;
        fa.write_all(&[0u8; 4096])?;
        fa.sync_all()?;
        let fb = std::fs::File::create(&b)?;
        Ok(rustix::fs::ioctl_ficlone(&fb, &fa).is_ok())
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    r
}
