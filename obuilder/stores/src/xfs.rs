//! `xfs:/path`: any filesystem with reflinks (XFS made with `reflink=1`, or btrfs used as a
//! plain filesystem). A step's build dir is a reflink copy of its parent's rootfs: data
//! blocks are shared until written.
//!
//! Layout: see [`crate::common`]. Wiped at start-up: everything under `result-tmp/`.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::store::{BuildDir, CacheCopy, CacheInfo, Store, StoreError};

use crate::cache::{Caches, CopyOps};
use crate::common::{entries, path_str, remove_tree, Layout};

pub struct XfsStore {
    caches: Caches,
    layout: Layout,
    exec: SharedExec,
}

impl XfsStore {
    fn cache_ops(&self) -> CopyOps {
        CopyOps {
            exec: self.exec.clone(),
            reflink: "--reflink=always",
        }
    }

    pub fn new(root: impl Into<PathBuf>, exec: SharedExec) -> XfsStore {
        let root = root.into();
        XfsStore {
            caches: Caches::new(&root),
            layout: Layout::new(root),
            exec,
        }
    }
}

#[async_trait]
impl Store for XfsStore {
    fn root(&self) -> &Path {
        &self.layout.root
    }

    fn describe(&self) -> String {
        format!("xfs:{}", self.layout.root.display())
    }

    async fn recover(&self) -> Result<(), StoreError> {
        self.layout.create()?;
        self.caches.recover(&self.cache_ops()).await?;
        for leftover in entries(&self.layout.tmp_dir())? {
            tracing::info!("removing leftover {}", leftover.display());
            remove_tree(&leftover)?;
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
            None => std::fs::create_dir(&rootfs).map_err(StoreError::io("cannot create", &rootfs)),
            Some(b) => {
                let src = path_str(&self.layout.result(b).join("rootfs"));
                let cmd = Cmd::new([
                    "cp",
                    "--archive",
                    "--reflink=always",
                    "--no-target-directory",
                    &src,
                    &path_str(&rootfs),
                ]);
                self.exec
                    .output(&cmd)
                    .await
                    .map(|_| ())
                    .map_err(StoreError::from)
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
        self.layout.publish(&dir.id)
    }

    async fn discard(&self, dir: &BuildDir) -> Result<(), StoreError> {
        remove_tree(&dir.dir)
    }

    async fn cache_checkout(
        &self,
        name: &str,
        uid: u32,
        gid: u32,
    ) -> Result<CacheCopy, StoreError> {
        self.caches
            .checkout(&self.cache_ops(), name, uid, gid)
            .await
    }

    async fn cache_release(&self, copy: CacheCopy, keep: bool) -> Result<(), StoreError> {
        self.caches.release(&self.cache_ops(), copy, keep).await
    }

    async fn cache_list(&self) -> Result<Vec<CacheInfo>, StoreError> {
        self.caches.list()
    }

    async fn cache_delete(&self, name: &str) -> Result<(), StoreError> {
        self.caches.delete(&self.cache_ops(), name).await
    }

    async fn delete(&self, id: &str) -> Result<(), StoreError> {
        if let Some(moved) = self.layout.unpublish(id)? {
            remove_tree(&moved)?;
        }
        Ok(())
    }
}
