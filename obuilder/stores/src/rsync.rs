//! `rsync:/path`: plain directories copied with rsync. Portable and slow; meant for
//! filesystems without snapshots (and the macOS design).
//!
//! Modes: `copy` (a full copy per step); `hardlink` (the build dir is a full copy, and the
//! committed tree is hard-linked to its parent's identical files, compared by content);
//! `hardlink_unsafe` (the same, compared by size and time only). Hard links are safe
//! because results are never modified once committed. The mode a store was made with is
//! remembered in `state/rsync-mode`; opening it with another is refused.
//!
//! Layout: see [`crate::layout`]. Wiped at start-up: everything under `result-tmp/`
//! (OBuilder's rsync store left it behind). Shared caches are copied with rsync too.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::store::StoreError;

use crate::dirstore::{DirStore, TreeOps};
use crate::layout::{path_str, remove_tree};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsyncMode {
    Copy,
    Hardlink,
    HardlinkUnsafe,
}

impl RsyncMode {
    pub const ALL: [RsyncMode; 3] = [
        RsyncMode::Copy,
        RsyncMode::Hardlink,
        RsyncMode::HardlinkUnsafe,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RsyncMode::Copy => "copy",
            RsyncMode::Hardlink => "hardlink",
            RsyncMode::HardlinkUnsafe => "hardlink_unsafe",
        }
    }
}

impl std::fmt::Display for RsyncMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An rsync mode that is not one of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown rsync mode {0:?}: expected copy, hardlink or hardlink_unsafe")]
pub struct UnknownRsyncMode(pub String);

impl std::str::FromStr for RsyncMode {
    type Err = UnknownRsyncMode;
    fn from_str(s: &str) -> Result<RsyncMode, UnknownRsyncMode> {
        RsyncMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| UnknownRsyncMode(s.to_string()))
    }
}

/// Trees copied with rsync.
pub struct Rsync {
    mode: RsyncMode,
    exec: SharedExec,
}

pub type RsyncStore = DirStore<Rsync>;

impl DirStore<Rsync> {
    pub fn new(root: impl Into<PathBuf>, mode: RsyncMode, exec: SharedExec) -> RsyncStore {
        DirStore::with_ops(root, Rsync { mode, exec })
    }
}

impl Rsync {
    async fn rsync(&self, args: &[String]) -> Result<(), StoreError> {
        let mut argv = vec!["rsync".to_string()];
        argv.extend_from_slice(args);
        self.exec.output(&Cmd::new(argv)).await?;
        Ok(())
    }
}

#[async_trait]
impl TreeOps for Rsync {
    fn kind(&self) -> &'static str {
        "rsync"
    }

    async fn create_empty(&self, dst: &Path) -> Result<(), StoreError> {
        std::fs::create_dir(dst).map_err(StoreError::io("cannot create", dst))
    }

    async fn clone_tree(&self, src: &Path, dst: &Path) -> Result<(), StoreError> {
        self.rsync(&["-aHq".into(), format!("{}/", path_str(src)), path_str(dst)])
            .await
    }

    async fn remove(&self, path: &Path) -> Result<(), StoreError> {
        remove_tree(path)
    }

    /// In the hardlink modes: a copy of `tree` beside it, hard-linked to `parent`'s
    /// identical files, then swapped in.
    async fn seal(&self, tree: &Path, parent: Option<&Path>) -> Result<(), StoreError> {
        let Some(parent) = parent else {
            return Ok(());
        };
        if self.mode == RsyncMode::Copy {
            return Ok(());
        }
        let linked = tree.with_extension("link");
        let old = tree.with_extension("old");
        std::fs::create_dir(&linked).map_err(StoreError::io("cannot create", &linked))?;
        let mut args = vec!["-aHq".to_string()];
        if self.mode == RsyncMode::Hardlink {
            args.push("--checksum".into());
        }
        args.push(format!("--link-dest={}", path_str(parent)));
        args.push(format!("{}/", path_str(tree)));
        args.push(format!("{}/", path_str(&linked)));
        if let Err(e) = self.rsync(&args).await {
            let _ = remove_tree(&linked);
            return Err(e);
        }
        std::fs::rename(tree, &old).map_err(StoreError::io("cannot replace", tree))?;
        std::fs::rename(&linked, tree).map_err(StoreError::io("cannot replace", tree))?;
        remove_tree(&old)
    }
}

/// The mode a store at `root` was made with, if it says.
pub fn remembered_mode(root: &Path) -> Result<Option<RsyncMode>, StoreError> {
    let p = root.join("state/rsync-mode");
    match std::fs::read_to_string(&p) {
        Ok(s) => s.trim().parse().map(Some).map_err(|e: UnknownRsyncMode| {
            StoreError::io("unreadable", &p)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e,
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("cannot read", &p)(e)),
    }
}

/// Records the mode of a new store at `root`.
pub fn remember_mode(root: &Path, mode: RsyncMode) -> Result<(), StoreError> {
    let state = root.join("state");
    std::fs::create_dir_all(&state).map_err(StoreError::io("cannot create", &state))?;
    let p = state.join("rsync-mode");
    std::fs::write(&p, format!("{mode}\n")).map_err(StoreError::io("cannot write", &p))
}
