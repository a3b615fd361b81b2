#![cfg(target_os = "linux")]
//! `overlayfs:/path`: each result holds only its own layer (what its step changed) plus a
//! `parent` file naming the result below it; a step runs on an overlay mount of its
//! parent's chain with a fresh upper layer. Good on tmpfs; no copy at all per step.
//!
//! Layout: see [`crate::common`], plus `ROOT/merged/ID` mount points for builds in
//! progress; `result/ID/rootfs` is a layer (whiteouts included), `result/ID/parent` names
//! the layer below. Wiped at start-up: every mount under `merged/`, and `result-tmp/`.
//!
//! Long chains: the classic `lowerdir=a:b:c` option must fit in one page (about 45 layers
//! with paths of this length). Layers are passed one by one with the new mount API's
//! `lowerdir+` (Linux ≥ 6.8), which has no such limit; the kernel's own stack limit (500)
//! is the bound. The merged view is mounted with `redirect_dir=off,metacopy=off,index=off`
//! so a layer never refers to another by path and stays valid under any later stack.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use obuilder_engine::exec::SharedExec;
use obuilder_engine::store::{BuildDir, CacheCopy, CacheInfo, Store, StoreError};
use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, unmount, FsMountFlags,
    FsOpenFlags, MountAttrFlags, MoveMountFlags, UnmountFlags,
};

use crate::cache::Caches;
use crate::layout::{entries, remove_tree, Layout};
use crate::xfs::Reflink;

/// The kernel refuses deeper overlay stacks.
pub const MAX_LAYERS: usize = 500;

pub struct OverlayStore {
    layout: Layout,
    caches: Caches,
    exec: SharedExec,
}

impl OverlayStore {
    pub fn new(root: impl Into<PathBuf>, exec: SharedExec) -> OverlayStore {
        let root = root.into();
        OverlayStore {
            caches: Caches::new(&root),
            layout: Layout::new(root),
            exec,
        }
    }

    /// Caches are plain directories copied per checkout (reflinked where the filesystem
    /// can); the copy replaces the cache on release, so deletions survive.
    fn cache_ops(&self) -> Reflink {
        Reflink {
            exec: self.exec.clone(),
            reflink: "--reflink=auto",
        }
    }

    fn merged(&self, id: &str) -> PathBuf {
        self.layout.root.join("merged").join(id)
    }

    /// The layers of `id` from the top down: `result/ID/rootfs`, its parent's, …
    fn chain(&self, id: &str) -> Result<Vec<PathBuf>, StoreError> {
        let mut out = Vec::new();
        let mut cur = Some(id.to_string());
        while let Some(c) = cur {
            let dir = self.layout.result(&c);
            out.push(dir.join("rootfs"));
            if out.len() > MAX_LAYERS {
                return Err(StoreError::TooDeep {
                    id: id.to_string(),
                    max: MAX_LAYERS,
                });
            }
            cur = match std::fs::read_to_string(dir.join("parent")) {
                Ok(p) => Some(p.trim().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(StoreError::io("cannot read", dir.join("parent"))(e)),
            };
        }
        Ok(out)
    }

    /// Unmounts `path` if it is a mount. `EBUSY` (a process forked elsewhere in this program
    /// may hold a descriptor for a moment) is retried for up to a second; after that a
    /// `lazy` caller detaches the mount, others get the error (a commit must never leave a
    /// writer behind in what becomes a result).
    fn unmount_if_mounted(&self, path: &Path, lazy: bool) -> Result<(), StoreError> {
        for _ in 0..20 {
            match unmount(path, UnmountFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => {
                    return Ok(())
                }
                Err(rustix::io::Errno::BUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => return Err(StoreError::io("cannot unmount", path)(e.into())),
            }
        }
        if lazy {
            tracing::warn!("{} stays busy; detaching it", path.display());
            return unmount(path, UnmountFlags::DETACH)
                .map_err(|e| StoreError::io("cannot unmount", path)(e.into()));
        }
        Err(StoreError::Busy {
            path: path.to_path_buf(),
            secs: 1,
        })
    }
}

fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), StoreError> {
    let err = |what: &'static str| StoreError::io(what, target.to_path_buf());
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| err("overlayfs not available for")(e.into()))?;
    // (lowerdir+ needs Linux 6.8 or later)
    let set = |k: &'static str, v: &Path| {
        fsconfig_set_string(fs.as_fd(), k, v)
            .map_err(|e| StoreError::io(k, v.to_path_buf())(e.into()))
    };
    for l in lowers {
        set("lowerdir+", l)?;
    }
    set("upperdir", upper)?;
    set("workdir", work)?;
    for (k, v) in [
        ("redirect_dir", "off"),
        ("metacopy", "off"),
        ("index", "off"),
    ] {
        fsconfig_set_string(fs.as_fd(), k, v).map_err(|e| err(k)(e.into()))?;
    }
    // `volatile` (Linux 5.10+): the overlay neither syncs its upper filesystem when it is
    // unmounted nor passes on the step's own `fsync`s, which only cost time here: the
    // commit writes the whole upper filesystem to the disk (`make_durable`) before a
    // result is published, and a step cut short by a crash is thrown away with its work
    // dir (the one thing a volatile mount leaves that forbids mounting it again). A
    // kernel without it mounts as before.
    if let Err(e) = rustix::mount::fsconfig_set_flag(fs.as_fd(), "volatile") {
        tracing::debug!("overlayfs without `volatile`: {e}");
    }
    fsconfig_create(fs.as_fd()).map_err(|e| err("cannot create overlay for")(e.into()))?;
    let mnt = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::empty(),
    )
    .map_err(|e| err("cannot mount overlay for")(e.into()))?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| err("cannot attach overlay at")(e.into()))
}

/// A read-only overlay of `lowers` (top first) at `target`.
fn mount_overlay_ro(lowers: &[PathBuf], target: &Path) -> Result<(), StoreError> {
    let err = |what: &'static str| StoreError::io(what, target.to_path_buf());
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(|e| err("overlayfs not available for")(e.into()))?;
    for l in lowers {
        fsconfig_set_string(fs.as_fd(), "lowerdir+", l)
            .map_err(|e| StoreError::io("lowerdir+", l.clone())(e.into()))?;
    }
    for (k, v) in [("redirect_dir", "off"), ("metacopy", "off")] {
        fsconfig_set_string(fs.as_fd(), k, v).map_err(|e| err(k)(e.into()))?;
    }
    fsconfig_create(fs.as_fd()).map_err(|e| err("cannot create overlay for")(e.into()))?;
    let mnt = fsmount(
        fs.as_fd(),
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY,
    )
    .map_err(|e| err("cannot mount overlay for")(e.into()))?;
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| err("cannot attach overlay at")(e.into()))
}

#[async_trait]
impl Store for OverlayStore {
    fn root(&self) -> &Path {
        &self.layout.root
    }

    fn describe(&self) -> String {
        format!("overlayfs:{}", self.layout.root.display())
    }

    async fn recover(&self) -> Result<(), StoreError> {
        self.layout.create()?;
        self.caches.recover(&self.cache_ops()).await?;
        let merged = self.layout.root.join("merged");
        std::fs::create_dir_all(&merged).map_err(StoreError::io("cannot create", &merged))?;
        for m in entries(&merged)? {
            tracing::info!("unmounting leftover {}", m.display());
            self.unmount_if_mounted(&m, true)?;
            remove_tree(&m)?;
        }
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
        let upper = dir.join("rootfs");
        let r = (|| {
            std::fs::create_dir(&upper).map_err(StoreError::io("cannot create", &upper))?;
            let Some(b) = base else {
                return Ok(upper.clone());
            };
            let lowers = self.chain(b)?;
            let work = dir.join("work");
            std::fs::create_dir(&work).map_err(StoreError::io("cannot create", &work))?;
            std::fs::write(dir.join("parent"), b)
                .map_err(StoreError::io("cannot write", dir.join("parent")))?;
            let merged = self.merged(id);
            std::fs::create_dir_all(&merged).map_err(StoreError::io("cannot create", &merged))?;
            mount_overlay(&lowers, &upper, &work, &merged)?;
            Ok(merged)
        })();
        match r {
            Ok(rootfs) => Ok(BuildDir {
                id: id.to_string(),
                dir,
                rootfs,
            }),
            Err(e) => {
                let _ = self.unmount_if_mounted(&self.merged(id), true);
                let _ = remove_tree(&self.merged(id));
                let _ = remove_tree(&dir);
                Err(e)
            }
        }
    }

    async fn stale_build(&self, id: &str) -> Result<Option<BuildDir>, StoreError> {
        Ok(self.layout.stale_tmp(id).map(|dir| {
            let merged = self.merged(id);
            BuildDir {
                id: id.to_string(),
                rootfs: if merged.exists() {
                    merged
                } else {
                    dir.join("rootfs")
                },
                dir,
            }
        }))
    }

    async fn commit(&self, dir: &BuildDir) -> Result<PathBuf, StoreError> {
        self.commit_as(dir, &dir.id).await
    }

    /// `commit_as` writes the filesystem to the disk before the rename.
    fn commit_is_durable(&self) -> bool {
        true
    }

    async fn commit_as(&self, dir: &BuildDir, id: &str) -> Result<PathBuf, StoreError> {
        let merged = self.merged(&dir.id);
        if dir.rootfs == merged {
            self.unmount_if_mounted(&merged, false)?;
            remove_tree(&merged)?;
            remove_tree(&dir.dir.join("work"))?;
        }
        crate::layout::make_durable(&dir.dir)?;
        self.layout.publish_as(&dir.id, id)
    }

    async fn discard(&self, dir: &BuildDir) -> Result<(), StoreError> {
        let merged = self.merged(&dir.id);
        self.unmount_if_mounted(&merged, true)?;
        remove_tree(&merged)?;
        remove_tree(&dir.dir)
    }

    async fn view(&self, id: &str) -> Result<PathBuf, StoreError> {
        let lowers = self.chain(id)?;
        if lowers.len() == 1 {
            return Ok(lowers[0].clone());
        }
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let target = self.layout.root.join("merged").join(format!(
            "view-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&target).map_err(StoreError::io("cannot create", &target))?;
        // Lower layers only: overlayfs makes such a mount read-only.
        if let Err(e) = mount_overlay_ro(&lowers, &target) {
            let _ = std::fs::remove_dir(&target);
            return Err(e);
        }
        Ok(target)
    }

    async fn release_view(&self, view: &Path) -> Result<(), StoreError> {
        if view.starts_with(self.layout.root.join("merged")) {
            self.unmount_if_mounted(view, true)?;
            remove_tree(view)?;
        }
        Ok(())
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
