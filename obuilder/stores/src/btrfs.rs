#![cfg(target_os = "linux")]
//! `btrfs:/path`: each result dir is a read-only btrfs subvolume holding its `rootfs/`, log
//! and metadata. A step's build dir is a writable snapshot of its parent's result dir
//! (with only `rootfs/` kept), published by a read-only snapshot into `result/ID`, as
//! OBuilder publishes, then deleted.
//!
//! Why the whole dir is one subvolume: a read-only snapshot writes its source's data to
//! the disk first and lands in one transaction commit, so the step's tree and its log
//! are published, durable and read-only, in one commit. A result whose `rootfs` alone is
//! the subvolume (made before, and still read) needs a read-only flag and a `syncfs`
//! instead: two commits, ~4 ms more per step on a loop device (docs/performance.md).
//! Children of such a result are made that way too (a snapshot holds no nested
//! subvolume), so both layouts live side by side.
//!
//! Spares: taking a snapshot costs a transaction commit (3 to 8 ms on a loop device),
//! which was half of what btrfs added to a changed step. A published build's own
//! subvolume holds exactly what its read-only result holds, so it is kept, writable, as
//! `spare/ID`. The first step built on result `ID` takes it by a `rename` instead of a
//! snapshot. A step that finds no spare starts a thread making one for the next step
//! built on `ID` (a snapshot), and a step that takes such a snapshot starts the next
//! one: its commit overlaps the step's run instead of preceding it. Taking the source
//! starts none (in a chain built cold, its commit would only delay this step's
//! publish, for a spare nothing takes). A spare is taken only if its UUIDs show it is a snapshot of
//! that very result or its source (a result deleted and built again has another UUID),
//! and a build that made subvolumes of its own leaves none (a snapshot holds no nested
//! subvolume, so its spare would differ from its result). A result's spare is deleted
//! before it; `complete_deletes` sweeps spares left by a crash or a race.
//!
//! Layout: see [`crate::layout`], plus `spare/ID`. Wiped at start-up: every subvolume and
//! directory under `result-tmp/`. The per-step operations (snapshots, the delete of a
//! published build) are ioctls; create, delete and sync go through `btrfs` via the Exec
//! seam. Shared caches are subvolumes too, snapshotted per checkout.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::store::StoreError;

use crate::dirstore::{DirStore, TreeOps};
use crate::layout::{path_str, remove_tree};

/// btrfs subvolumes as trees.
pub struct Btrfs {
    exec: SharedExec,
    /// `ROOT/result`, and `ROOT/spare` where published builds' subvolumes are kept.
    results: PathBuf,
    spares: PathBuf,
    /// The threads making spares, joined before a delete and on drop.
    making: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

pub type BtrfsStore = DirStore<Btrfs>;

impl DirStore<Btrfs> {
    pub fn new(root: impl Into<PathBuf>, exec: SharedExec) -> BtrfsStore {
        let root = root.into();
        let ops = Btrfs {
            exec,
            results: root.join("result"),
            spares: root.join("spare"),
            making: Mutex::new(Vec::new()),
        };
        DirStore::with_ops(root, ops)
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        self.wait_for_spares();
    }
}

impl Btrfs {
    /// Where result `base`'s spare is kept (None for a path outside `result/`).
    fn spare_of(&self, result: &Path) -> Option<PathBuf> {
        (result.parent() == Some(self.results.as_path()))
            .then(|| result.file_name().map(|n| self.spares.join(n)))
            .flatten()
    }

    /// Moves result `base`'s spare to `dst`, if it has one that is still its copy. None
    /// (and nothing at `dst`) otherwise.
    async fn take_spare(&self, base: &Path, dst: &Path) -> Option<Spare> {
        let spare = self.spare_of(base)?;
        std::fs::rename(&spare, dst).ok()?;
        let kind = match (
            crate::btrfs_ioctl::subvolume_ids(dst),
            crate::btrfs_ioctl::subvolume_ids(base),
        ) {
            (Ok(s), Ok(r)) if s.uuid == r.parent_uuid => Some(Spare::Source),
            (Ok(s), Ok(r)) if s.parent_uuid == r.uuid => Some(Spare::Snapshot),
            _ => None,
        };
        if kind.is_none() {
            tracing::info!("deleting {}, a spare of another result", spare.display());
            if let Err(e) = self.remove(dst).await {
                tracing::warn!("cannot delete {}: {e}", dst.display());
            }
        }
        kind
    }

    /// Starts making a spare of result `base` on a thread (its commit then overlaps the
    /// step's run), unless it has one.
    fn start_spare(&self, base: &Path) {
        let Some(spare) = self.spare_of(base) else {
            return;
        };
        if spare.symlink_metadata().is_ok() {
            return;
        }
        let (base, spares) = (base.to_path_buf(), self.spares.clone());
        let t = std::thread::spawn(move || make_spare(&base, &spare, &spares));
        let mut making = self.making.lock().unwrap_or_else(|e| e.into_inner());
        // Those that ended are joined here, in a long-lived builder (a thread's stack is
        // kept until it is).
        let (ended, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *making)
            .into_iter()
            .partition(|t| t.is_finished());
        *making = running;
        making.push(t);
        drop(making);
        for t in ended {
            let _ = t.join();
        }
    }

    /// Keeps published build `src` as result `dst`'s spare, if it holds what `dst` holds.
    fn keep_as_spare(&self, src: &Path, dst: &Path) -> bool {
        let Some(spare) = self.spare_of(dst) else {
            return false;
        };
        if crate::btrfs_ioctl::holds_subvolumes(src) {
            return false;
        }
        let _ = std::fs::create_dir(&self.spares);
        std::fs::rename(src, &spare).is_ok()
    }

    /// Deletes result `result`'s spare, if it has one.
    async fn drop_spare(&self, result: &Path) -> Result<(), StoreError> {
        self.wait_for_spares();
        match self.spare_of(result) {
            Some(spare) if is_subvolume(&spare) => self.remove(&spare).await,
            _ => Ok(()),
        }
    }

    fn wait_for_spares(&self) {
        let making = std::mem::take(&mut *self.making.lock().unwrap_or_else(|e| e.into_inner()));
        for t in making {
            let _ = t.join();
        }
    }

    async fn btrfs(&self, args: &[&str]) -> Result<(), StoreError> {
        let mut argv = vec!["btrfs"];
        argv.extend_from_slice(args);
        self.exec.output(&Cmd::new(argv)).await?;
        Ok(())
    }
}

/// What a taken spare was.
enum Spare {
    /// The result's source, kept when it was published.
    Source,
    /// A snapshot of the result, made for a step after the first.
    Snapshot,
}

/// Makes `spare`, a writable snapshot of result `base` (on a thread of its own: its commit
/// overlaps the step that took the last one). Another builder may make it first.
fn make_spare(base: &Path, spare: &Path, spares: &Path) {
    let _ = std::fs::create_dir(spares);
    if let Err(e) = crate::btrfs_ioctl::snapshot(base, spare) {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            tracing::debug!("no spare of {}: {e}", base.display());
        }
    }
}

/// A btrfs subvolume's root has inode number 256.
fn is_subvolume(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    p.symlink_metadata()
        .map(|m| m.is_dir() && m.ino() == 256)
        .unwrap_or(false)
}

/// The subvolumes below `root` (not `root` itself), parents before their children. A
/// subvolume's root directory has inode 256 and a device number of its own.
fn nested_subvolumes(root: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(dev) = dir.symlink_metadata().map(|m| m.dev()) else {
            continue;
        };
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if !m.is_dir() {
                continue;
            }
            if m.ino() == 256 && m.dev() != dev {
                out.push(e.path());
            }
            stack.push(e.path());
        }
    }
    // Walked depth-first from a stack: order by depth so that parents come first.
    out.sort_by_key(|p| p.components().count());
    out
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
            if let Err(e) = self.btrfs(&["subvolume", "delete", &path_str(path)]).await {
                // A step may make subvolumes of its own in its tree (the ioctl needs no
                // privilege), and a subvolume holding one cannot be deleted: delete
                // those first, deepest first, then this one.
                let nested = nested_subvolumes(path);
                if nested.is_empty() {
                    return Err(e);
                }
                // (Their entries are in this one, which a result of the older layout
                // has read-only, or in one another, which the step may have made
                // read-only: they all go anyway.)
                for p in std::iter::once(path).chain(nested.iter().map(PathBuf::as_path)) {
                    crate::btrfs_ioctl::set_readonly_to(p, false)
                        .map_err(StoreError::io("cannot make writable", p))?;
                }
                for n in nested.iter().rev() {
                    tracing::info!("deleting {}, a subvolume a step made", n.display());
                    self.btrfs(&["subvolume", "delete", &path_str(n)]).await?;
                }
                self.btrfs(&["subvolume", "delete", &path_str(path)])
                    .await?;
            }
        }
        remove_tree(path)
    }

    async fn make_dir(&self, base: Option<&Path>, dst: &Path) -> Result<bool, StoreError> {
        match base {
            None => self.btrfs(&["subvolume", "create", &path_str(dst)]).await?,
            Some(b) if is_subvolume(b) => {
                match self.take_spare(b, dst).await {
                    // The result's own source, taken by its first child: in a chain built
                    // cold nothing else builds on this result, and a spare made now would
                    // put its commit in front of this step's publish. One is made when a
                    // second child finds none.
                    Some(Spare::Source) => {}
                    // A result built on again and again (the step after it changes).
                    Some(Spare::Snapshot) => self.start_spare(b),
                    None => {
                        crate::btrfs_ioctl::snapshot(b, dst)
                            .map_err(StoreError::io("cannot snapshot into", dst))?;
                        // (After the snapshot: two snapshots at once do not share a
                        // commit, they take one each, one after the other.)
                        self.start_spare(b);
                    }
                }
            }
            // A result of the older layout: its `rootfs` is the subvolume.
            Some(_) => return Ok(false),
        }
        let made = (|| {
            let rootfs = dst.join("rootfs");
            if base.is_none() {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(&rootfs)
                    .map_err(StoreError::io("cannot create", &rootfs))?;
            }
            // The base's log and metadata are not this build's.
            for e in crate::layout::entries(dst)? {
                if e == rootfs {
                    continue;
                }
                match e.symlink_metadata() {
                    Ok(m) if m.is_dir() => remove_tree(&e)?,
                    _ => std::fs::remove_file(&e).map_err(StoreError::io("cannot remove", &e))?,
                }
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = self.remove(dst).await;
            return Err(e);
        }
        Ok(true)
    }

    async fn publish_dir(&self, src: &Path, dst: &Path) -> Result<bool, StoreError> {
        if !is_subvolume(src) {
            return Ok(false);
        }
        crate::btrfs_ioctl::snapshot_readonly(src, dst)
            .map_err(StoreError::io("cannot publish", dst))?;
        if self.keep_as_spare(src, dst) {
            return Ok(true);
        }
        // Published: the build's own subvolume is only space now (the start-up wipe
        // removes it if this fails).
        if crate::btrfs_ioctl::delete_subvolume(src).is_err() {
            // (One holding a subvolume the step made: see `remove`.)
            if let Err(e) = self.remove(src).await {
                tracing::warn!("cannot delete {} once published: {e}", src.display());
            }
        }
        Ok(true)
    }

    async fn remove_dir(&self, dir: &Path) -> Result<bool, StoreError> {
        if !is_subvolume(dir) {
            return Ok(false);
        }
        self.drop_spare(dir).await?;
        self.remove(dir).await?;
        Ok(true)
    }

    async fn seal(&self, tree: &Path, _parent: Option<&Path>) -> Result<(), StoreError> {
        crate::btrfs_ioctl::set_readonly(tree)
            .map_err(StoreError::io("cannot make read-only", tree))
    }

    async fn complete_deletes(&self, root: &Path) -> Result<(), StoreError> {
        // Spares whose result is gone: left by a crash between the two deletes, or made
        // by another builder while this one deleted the result.
        self.wait_for_spares();
        for spare in crate::layout::entries(&self.spares)? {
            let result = spare.file_name().map(|n| self.results.join(n));
            if result.is_some_and(|r| r.symlink_metadata().is_err()) {
                tracing::info!(
                    "deleting {}, the spare of a deleted result",
                    spare.display()
                );
                self.remove(&spare).await?;
            }
        }
        // The cleaner that frees deleted subvolumes is woken after a periodic commit,
        // every 30 s: commit and wake it now.
        if let Err(e) = crate::btrfs_ioctl::sync(root) {
            tracing::warn!("cannot sync {}: {e}", root.display());
        }
        // `subvolume sync` has hung for days in production (OBuilder #69): bound it.
        let root = path_str(root);
        let cmd = Cmd::new(["timeout", "60", "btrfs", "subvolume", "sync", root.as_str()]);
        if let Err(e) = self.exec.output(&cmd).await {
            tracing::warn!("btrfs subvolume sync did not finish: {e}");
        }
        Ok(())
    }
}
