//! `rsync:/path`: plain directories copied with rsync. Portable and slow; meant for
//! filesystems without snapshots (and the macOS design).
//!
//! Modes: `copy` (a full copy per step); `hardlink` (the build dir is a full copy, and the
//! committed result is hard-linked to its parent's identical files, compared by content);
//! `hardlink_unsafe` (the same, compared by size and time only). Hard links are safe
//! because results are never modified once committed.
//!
//! Layout: see [`crate::common`]. Wiped at start-up: everything under `result-tmp/`
//! (OBuilder's rsync store left it behind).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::store::{BuildDir, CacheCopy, CacheInfo, Store, StoreError};

use crate::cache::{Caches, CopyOps};
use crate::common::{entries, path_str, remove_tree, Layout};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsyncMode {
    Copy,
    Hardlink,
    HardlinkUnsafe,
}

impl std::str::FromStr for RsyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<RsyncMode, String> {
        match s {
            "copy" => Ok(RsyncMode::Copy),
            "hardlink" => Ok(RsyncMode::Hardlink),
            "hardlink_unsafe" => Ok(RsyncMode::HardlinkUnsafe),
            _ => Err(format!(
                "unknown rsync mode {s:?}: expected copy, hardlink or hardlink_unsafe"
            )),
        }
    }
}

pub struct RsyncStore {
    caches: Caches,
    layout: Layout,
    mode: RsyncMode,
    exec: SharedExec,
}

impl RsyncStore {
    fn cache_ops(&self) -> CopyOps {
        CopyOps {
            exec: self.exec.clone(),
            reflink: "--reflink=auto",
        }
    }

    pub fn new(root: impl Into<PathBuf>, mode: RsyncMode, exec: SharedExec) -> RsyncStore {
        let root = root.into();
        RsyncStore {
            caches: Caches::new(&root),
            layout: Layout::new(root),
            mode,
            exec,
        }
    }

    async fn rsync(&self, args: &[String]) -> Result<(), StoreError> {
        let mut argv = vec!["rsync".to_string()];
        argv.extend_from_slice(args);
        self.exec.output(&Cmd::new(argv)).await?;
        Ok(())
    }
}

#[async_trait]
impl Store for RsyncStore {
    fn root(&self) -> &Path {
        &self.layout.root
    }

    fn describe(&self) -> String {
        format!("rsync:{}", self.layout.root.display())
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
                let src = format!("{}/", path_str(&self.layout.result(b).join("rootfs")));
                let parent = dir.join("parent");
                match std::fs::write(&parent, b) {
                    Ok(()) => self.rsync(&["-aHq".into(), src, path_str(&rootfs)]).await,
                    Err(e) => Err(StoreError::io("cannot write", &parent)(e)),
                }
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
        let parent = std::fs::read_to_string(dir.dir.join("parent")).ok();
        match (self.mode, parent) {
            (RsyncMode::Copy, _) | (_, None) => self.layout.publish(&dir.id),
            (mode, Some(parent)) => {
                // Build a hard-linked copy beside, then publish it in one rename.
                let linked = self.layout.tmp_dir().join(format!("{}.link", dir.id));
                std::fs::create_dir(&linked).map_err(StoreError::io("cannot create", &linked))?;
                let mut args = vec!["-aHq".to_string()];
                if mode == RsyncMode::Hardlink {
                    args.push("--checksum".into());
                }
                // The link dest mirrors the source's shape: result/PARENT/rootfs/… ↔ rootfs/….
                args.push(format!(
                    "--link-dest={}",
                    path_str(&self.layout.result(parent.trim()))
                ));
                args.push(format!("{}/", path_str(&dir.dir)));
                args.push(format!("{}/", path_str(&linked)));
                if let Err(e) = self.rsync(&args).await {
                    let _ = remove_tree(&linked);
                    return Err(e);
                }
                let to = self.layout.result(&dir.id);
                std::fs::rename(&linked, &to).map_err(StoreError::io("cannot publish", &to))?;
                remove_tree(&dir.dir)?;
                Ok(to)
            }
        }
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
