//! `--store` values: which backend, and where.
//!
//! Accepted forms (as OBuilder's, plus `overlayfs:`): `btrfs:/abs/path`,
//! `overlayfs:/abs/path`, `rsync:/abs/path` (with `--rsync-mode copy|hardlink|hardlink_unsafe`),
//! `xfs:/abs/path`. `zfs:POOL` is recognised and refused until the ZFS store lands.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use obuilder_engine::exec::SharedExec;
use obuilder_engine::store::Store;

use crate::rsync::RsyncMode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Btrfs(PathBuf),
    Overlayfs(PathBuf),
    Rsync(PathBuf, RsyncMode),
    Xfs(PathBuf),
}

pub const FORMS: &str = "btrfs:/ABS/PATH, overlayfs:/ABS/PATH, rsync:/ABS/PATH (with --rsync-mode copy|hardlink|hardlink_unsafe), xfs:/ABS/PATH";

impl StoreSpec {
    /// Parses a `--store` value; `rsync_mode` is the `--rsync-mode` flag.
    pub fn parse(s: &str, rsync_mode: Option<RsyncMode>) -> Result<StoreSpec, String> {
        let bad = |why: &str| format!("invalid --store {s:?}: {why}; accepted forms: {FORMS}");
        let (kind, path) = s.split_once(':').ok_or_else(|| bad("expected KIND:PATH"))?;
        if kind == "zfs" {
            return Err(bad("the zfs store is not available in this build yet"));
        }
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(bad("the path must be absolute"));
        }
        let spec = match kind {
            "btrfs" => StoreSpec::Btrfs(path),
            "overlayfs" => StoreSpec::Overlayfs(path),
            "xfs" => StoreSpec::Xfs(path),
            "rsync" => StoreSpec::Rsync(
                path,
                rsync_mode.ok_or_else(|| {
                    bad("an rsync store needs --rsync-mode copy|hardlink|hardlink_unsafe")
                })?,
            ),
            _ => return Err(bad(&format!("unknown store kind {kind:?}"))),
        };
        if rsync_mode.is_some() && !matches!(spec, StoreSpec::Rsync(..)) {
            return Err(bad("--rsync-mode only applies to rsync: stores"));
        }
        Ok(spec)
    }

    pub fn path(&self) -> &Path {
        match self {
            StoreSpec::Btrfs(p)
            | StoreSpec::Overlayfs(p)
            | StoreSpec::Rsync(p, _)
            | StoreSpec::Xfs(p) => p,
        }
    }

    pub fn open(&self, exec: SharedExec) -> Arc<dyn Store> {
        match self {
            StoreSpec::Btrfs(p) => Arc::new(crate::btrfs::BtrfsStore::new(p, exec)),
            StoreSpec::Overlayfs(p) => Arc::new(crate::overlayfs::OverlayStore::new(p, exec)),
            StoreSpec::Rsync(p, m) => Arc::new(crate::rsync::RsyncStore::new(p, *m, exec)),
            StoreSpec::Xfs(p) => Arc::new(crate::xfs::XfsStore::new(p, exec)),
        }
    }
}

impl std::fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Btrfs(p) => write!(f, "btrfs:{}", p.display()),
            StoreSpec::Overlayfs(p) => write!(f, "overlayfs:{}", p.display()),
            StoreSpec::Rsync(p, m) => write!(f, "rsync:{} ({m:?})", p.display()),
            StoreSpec::Xfs(p) => write!(f, "xfs:{}", p.display()),
        }
    }
}

const BTRFS_MAGIC: u64 = 0x9123_683E;
const XFS_MAGIC: u64 = 0x5846_5342;

/// The best store for `path` (or its nearest existing ancestor): btrfs snapshots on btrfs,
/// reflinks on XFS, overlayfs elsewhere.
pub fn detect_default(path: &Path) -> StoreSpec {
    let mut probe = path;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    let magic = rustix::fs::statfs(probe)
        .map(|s| s.f_type as u64)
        .unwrap_or(0);
    match magic {
        BTRFS_MAGIC => StoreSpec::Btrfs(path.to_path_buf()),
        XFS_MAGIC => StoreSpec::Xfs(path.to_path_buf()),
        _ => StoreSpec::Overlayfs(path.to_path_buf()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_explains_mistakes() {
        assert_eq!(
            StoreSpec::parse("btrfs:/s", None),
            Ok(StoreSpec::Btrfs("/s".into()))
        );
        assert_eq!(
            StoreSpec::parse("overlayfs:/s", None),
            Ok(StoreSpec::Overlayfs("/s".into()))
        );
        assert_eq!(
            StoreSpec::parse("xfs:/s", None),
            Ok(StoreSpec::Xfs("/s".into()))
        );
        assert_eq!(
            StoreSpec::parse("rsync:/s", Some(RsyncMode::Hardlink)),
            Ok(StoreSpec::Rsync("/s".into(), RsyncMode::Hardlink))
        );
        for (bad, why) in [
            ("btrfs:rel", "must be absolute"),
            ("rsync:/s", "needs --rsync-mode"),
            ("nfs:/s", "unknown store kind"),
            ("/s", "expected KIND:PATH"),
            ("zfs:tank", "zfs store is not available"),
        ] {
            let e = StoreSpec::parse(bad, None).unwrap_err();
            assert!(e.contains(why) && e.contains(FORMS), "{bad}: {e}");
        }
        let e = StoreSpec::parse("btrfs:/s", Some(RsyncMode::Copy)).unwrap_err();
        assert!(e.contains("only applies to rsync"), "{e}");
    }
}
