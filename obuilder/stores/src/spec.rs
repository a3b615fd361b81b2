//! `--store` values: which backend, and where; and opening one, checked.
//!
//! Accepted forms (as OBuilder's, plus `overlayfs:`): `btrfs:/abs/path`,
//! `overlayfs:/abs/path`, `rsync:/abs/path` (with `--rsync-mode copy|hardlink|hardlink_unsafe`
//! for a new store), `xfs:/abs/path`, and `zfs:POOL` (mounted at `/POOL`; `POOL` may be a
//! dataset, `tank/obuilder`) or `zfs:/PREFIX/POOL` (the pool `POOL` mounted there, as
//! `zfs:/Volumes/tank` on macOS).
//!
//! Opening checks the filesystem first, so a wrong `--store` fails at once with the
//! filesystem named instead of at the first snapshot: `btrfs:` needs btrfs, `xfs:` needs
//! reflinks, `overlayfs:` cannot stack on overlayfs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use obuilder_engine::exec::SharedExec;
use obuilder_engine::store::{Store, StoreError};

use crate::rsync::RsyncMode;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    Btrfs(PathBuf),
    Overlayfs(PathBuf),
    /// With the `--rsync-mode` given, if any (an existing store remembers its own).
    Rsync(PathBuf, Option<RsyncMode>),
    Xfs(PathBuf),
    /// A ZFS dataset and where it is mounted.
    Zfs {
        pool: String,
        root: PathBuf,
    },
    /// Images of a Docker-compatible engine, driven by the `cli` program.
    Docker {
        root: PathBuf,
        cli: String,
        /// The kind of containers the engine runs (`--docker-platform`).
        platform: crate::docker::Platform,
        /// Base images are pulled by the engine (`--docker-pull`; always on Windows).
        pull: bool,
    },
}

pub const FORMS: &str = "btrfs:/ABS/PATH, overlayfs:/ABS/PATH, rsync:/ABS/PATH (with --rsync-mode copy|hardlink|hardlink_unsafe), xfs:/ABS/PATH, zfs:POOL, zfs:/PREFIX/POOL, docker:/ABS/PATH (with --sandbox docker)";

/// Whether `name` is a ZFS dataset name (components of letters, digits, `_-:.`).
fn valid_dataset(name: &str) -> bool {
    !name.is_empty()
        && name.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "_-:.".contains(ch))
        })
}

/// A `--store` value that is not one of [`FORMS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --store {given:?}: {why}; accepted forms: {FORMS}")]
pub struct StoreSpecError {
    pub given: String,
    pub why: String,
}

impl StoreSpec {
    /// Parses a `--store` value; `rsync_mode` is the `--rsync-mode` flag.
    pub fn parse(s: &str, rsync_mode: Option<RsyncMode>) -> Result<StoreSpec, StoreSpecError> {
        let bad = |why: &str| StoreSpecError {
            given: s.to_string(),
            why: why.to_string(),
        };
        let (kind, path) = s.split_once(':').ok_or_else(|| bad("expected KIND:PATH"))?;
        if kind == "zfs" {
            if rsync_mode.is_some() {
                return Err(bad("--rsync-mode only applies to rsync: stores"));
            }
            let (pool, root) = match path.strip_prefix('/') {
                Some(rest) => {
                    let last = rest.rsplit('/').next().unwrap_or_default();
                    (last.to_string(), PathBuf::from(path))
                }
                None => (path.to_string(), Path::new("/").join(path)),
            };
            if !valid_dataset(&pool) {
                return Err(bad(
                    "expected a ZFS pool or dataset name (letters, digits, _-:. and / between names)",
                ));
            }
            return Ok(StoreSpec::Zfs { pool, root });
        }
        let path = PathBuf::from(path);
        if !path.is_absolute() {
            return Err(bad("the path must be absolute"));
        }
        let spec = match kind {
            "btrfs" => StoreSpec::Btrfs(path),
            "overlayfs" => StoreSpec::Overlayfs(path),
            "xfs" => StoreSpec::Xfs(path),
            "rsync" => StoreSpec::Rsync(path, rsync_mode),
            "docker" => StoreSpec::Docker {
                root: path,
                cli: "docker".into(),
                platform: Default::default(),
                pull: false,
            },
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
            | StoreSpec::Xfs(p)
            | StoreSpec::Zfs { root: p, .. }
            | StoreSpec::Docker { root: p, .. } => p,
        }
    }

    /// Where the store keeps its database, images and sandbox state.
    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    /// Whether a store was ever made at the path.
    pub fn exists(&self) -> bool {
        crate::layout::Layout::new(self.path()).exists_store()
    }

    /// Opens the store (creating nothing yet: the builder's recovery makes the layout),
    /// after checking that its filesystem can hold it and, for rsync, which mode it has.
    pub fn open(&self, exec: SharedExec) -> Result<Arc<dyn Store>, StoreError> {
        self.open_with(exec, None)
    }

    /// As [`StoreSpec::open`]; a docker: store's helper containers run with
    /// `docker_isolation` (the steps').
    pub fn open_with(
        &self,
        exec: SharedExec,
        docker_isolation: Option<String>,
    ) -> Result<Arc<dyn Store>, StoreError> {
        self.check_filesystem()?;
        Ok(match self {
            #[cfg(target_os = "linux")]
            StoreSpec::Btrfs(p) => Arc::new(crate::btrfs::BtrfsStore::new(p, exec)),
            #[cfg(target_os = "linux")]
            StoreSpec::Overlayfs(p) => Arc::new(crate::overlayfs::OverlayStore::new(p, exec)),
            #[cfg(target_os = "linux")]
            StoreSpec::Xfs(p) => Arc::new(crate::xfs::XfsStore::new(p, exec)),
            #[cfg(not(target_os = "linux"))]
            StoreSpec::Btrfs(p) | StoreSpec::Overlayfs(p) | StoreSpec::Xfs(p) => {
                return Err(StoreError::WrongFilesystem {
                    store: self.to_string(),
                    path: p.clone(),
                    need: "Linux",
                    found: std::env::consts::OS.to_string(),
                })
            }
            StoreSpec::Rsync(p, given) => {
                let mode = self.rsync_mode(p, *given)?;
                Arc::new(crate::rsync::RsyncStore::new(p, mode, exec))
            }
            StoreSpec::Zfs { pool, root } => Arc::new(crate::zfs::ZfsStore::new(pool, root, exec)),
            StoreSpec::Docker {
                root,
                cli,
                platform,
                ..
            } => Arc::new(
                crate::docker::DockerStore::new(root, cli, exec)
                    .with_platform(*platform)
                    .with_isolation(docker_isolation),
            ),
        })
    }

    /// Opens a store that must already exist (for commands that only look at one):
    /// refuses, creating nothing, if there is none at the path.
    pub fn open_existing(&self, exec: SharedExec) -> Result<Arc<dyn Store>, StoreError> {
        if !self.exists() {
            return Err(StoreError::NoStore {
                path: self.path().to_path_buf(),
            });
        }
        match self {
            // An existing store knows its mode; a flag, if given, must agree.
            StoreSpec::Rsync(p, given) => {
                let mode = crate::rsync::remembered_mode(p)?
                    .or(*given)
                    .unwrap_or(RsyncMode::Copy);
                StoreSpec::Rsync(p.clone(), Some(mode)).open(exec)
            }
            _ => self.open(exec),
        }
    }

    /// The mode of the rsync store at `root`: the one it remembers, which a flag must
    /// agree with; for a new store, the flag's (then remembered).
    fn rsync_mode(&self, root: &Path, given: Option<RsyncMode>) -> Result<RsyncMode, StoreError> {
        match (crate::rsync::remembered_mode(root)?, given) {
            (Some(had), Some(g)) if had != g => Err(StoreError::Mismatch {
                store: self.to_string(),
                what: format!(
                    "this store was made with --rsync-mode {had}; it cannot be opened with --rsync-mode {g}"
                ),
            }),
            (Some(had), _) => Ok(had),
            (None, Some(g)) => {
                crate::rsync::remember_mode(root, g)?;
                Ok(g)
            }
            (None, None) if self.exists() => {
                // A store from before modes were remembered: OBuilder's default.
                crate::rsync::remember_mode(root, RsyncMode::Copy)?;
                Ok(RsyncMode::Copy)
            }
            (None, None) => Err(StoreError::Mismatch {
                store: self.to_string(),
                what: "a new rsync store needs --rsync-mode copy|hardlink|hardlink_unsafe"
                    .into(),
            }),
        }
    }

    #[cfg(target_os = "linux")]
    fn check_filesystem(&self) -> Result<(), StoreError> {
        let probe = nearest_existing(self.path());
        let found = || fs_name(&probe);
        let wrong = |need: &'static str| StoreError::WrongFilesystem {
            store: self.to_string(),
            path: self.path().to_path_buf(),
            need,
            found: found(),
        };
        match self {
            StoreSpec::Btrfs(_) if fs_magic(&probe) != BTRFS_MAGIC => Err(wrong("btrfs")),
            StoreSpec::Xfs(_) => match crate::xfs::can_reflink(&probe) {
                Ok(true) => Ok(()),
                Ok(false) => Err(wrong(
                    "reflinks (XFS made with `mkfs.xfs -m reflink=1`, or btrfs)",
                )),
                Err(e) => Err(StoreError::io("cannot test reflinks in", &probe)(e)),
            },
            StoreSpec::Overlayfs(_) if fs_magic(&probe) == OVERLAYFS_MAGIC => Err(wrong(
                "a filesystem other than overlayfs (ext4, xfs, btrfs, tmpfs)",
            )),
            _ => Ok(()),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn check_filesystem(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl std::fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Btrfs(p) => write!(f, "btrfs:{}", p.display()),
            StoreSpec::Overlayfs(p) => write!(f, "overlayfs:{}", p.display()),
            StoreSpec::Rsync(p, _) => write!(f, "rsync:{}", p.display()),
            StoreSpec::Xfs(p) => write!(f, "xfs:{}", p.display()),
            StoreSpec::Zfs { pool, root } if *root == Path::new("/").join(pool) => {
                write!(f, "zfs:{pool}")
            }
            StoreSpec::Zfs { root, .. } => write!(f, "zfs:{}", root.display()),
            StoreSpec::Docker { root, .. } => write!(f, "docker:{}", root.display()),
        }
    }
}

/// `path` or its nearest existing ancestor.
#[cfg(target_os = "linux")]
fn nearest_existing(path: &Path) -> PathBuf {
    let mut probe = path;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    probe.to_path_buf()
}

#[cfg(target_os = "linux")]
const BTRFS_MAGIC: u64 = 0x9123_683E;
#[cfg(target_os = "linux")]
const XFS_MAGIC: u64 = 0x5846_5342;
#[cfg(target_os = "linux")]
const OVERLAYFS_MAGIC: u64 = 0x794C_7630;

#[cfg(target_os = "linux")]
fn fs_magic(path: &Path) -> u64 {
    crate::linux_fs::magic(path)
}

/// The filesystem type at `path`, by name, for messages.
#[cfg(target_os = "linux")]
pub fn fs_name(path: &Path) -> String {
    let m = fs_magic(path);
    match m {
        BTRFS_MAGIC => "btrfs".into(),
        XFS_MAGIC => "xfs".into(),
        OVERLAYFS_MAGIC => "overlayfs".into(),
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0x6969 => "nfs".into(),
        0x6573_5546 => "a FUSE filesystem".into(),
        other => format!("a filesystem of type {other:#x}"),
    }
}

/// The best store for `path` (or its nearest existing ancestor): btrfs snapshots on btrfs,
/// reflinks on XFS, overlayfs elsewhere.
#[cfg(target_os = "linux")]
pub fn detect_default(path: &Path) -> StoreSpec {
    match fs_magic(&nearest_existing(path)) {
        BTRFS_MAGIC => StoreSpec::Btrfs(path.to_path_buf()),
        XFS_MAGIC => StoreSpec::Xfs(path.to_path_buf()),
        _ => StoreSpec::Overlayfs(path.to_path_buf()),
    }
}

/// The store for `path` where only rsync works everywhere (macOS without ZFS, BSDs).
#[cfg(not(target_os = "linux"))]
pub fn detect_default(path: &Path) -> StoreSpec {
    StoreSpec::Rsync(path.to_path_buf(), Some(RsyncMode::Copy))
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
            Ok(StoreSpec::Rsync("/s".into(), Some(RsyncMode::Hardlink)))
        );
        assert_eq!(
            StoreSpec::parse("rsync:/s", None),
            Ok(StoreSpec::Rsync("/s".into(), None))
        );
        for (bad, why) in [
            ("btrfs:rel", "must be absolute"),
            ("nfs:/s", "unknown store kind"),
            ("/s", "expected KIND:PATH"),
            ("zfs:", "ZFS pool or dataset name"),
            ("zfs:tank@snap", "ZFS pool or dataset name"),
            ("zfs:tank/../x", "ZFS pool or dataset name"),
        ] {
            let e = StoreSpec::parse(bad, None).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(FORMS), "{bad}: {e}");
        }
        for (given, pool, root) in [
            ("zfs:tank", "tank", "/tank"),
            ("zfs:tank/obuilder", "tank/obuilder", "/tank/obuilder"),
            ("zfs:/Volumes/tank", "tank", "/Volumes/tank"),
        ] {
            let spec = StoreSpec::parse(given, None).unwrap();
            assert_eq!(
                spec,
                StoreSpec::Zfs {
                    pool: pool.into(),
                    root: root.into()
                }
            );
            assert_eq!(spec.to_string(), given);
        }
        let e = StoreSpec::parse("btrfs:/s", Some(RsyncMode::Copy))
            .unwrap_err()
            .to_string();
        assert!(e.contains("only applies to rsync"), "{e}");
    }

    #[test]
    fn rsync_stores_remember_their_mode() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("s");
        let exec = obuilder_engine::exec::RealExec::shared();
        let e = StoreSpec::Rsync(root.clone(), None)
            .open(exec.clone())
            .err()
            .unwrap();
        assert!(e.to_string().contains("needs --rsync-mode"), "{e}");
        assert!(!root.exists(), "nothing made for a refused store");
        StoreSpec::Rsync(root.clone(), Some(RsyncMode::Hardlink))
            .open(exec.clone())
            .unwrap();
        // Later opens need no flag, and a different one is refused.
        StoreSpec::Rsync(root.clone(), None)
            .open(exec.clone())
            .unwrap();
        let e = StoreSpec::Rsync(root.clone(), Some(RsyncMode::Copy))
            .open(exec)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains(
                "made with --rsync-mode hardlink; it cannot be opened with --rsync-mode copy"
            ),
            "{e}"
        );
    }

    #[test]
    fn read_only_commands_refuse_a_missing_store_and_create_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("nothing-here");
        let exec = obuilder_engine::exec::RealExec::shared();
        for spec in [
            StoreSpec::Rsync(root.clone(), None),
            StoreSpec::Overlayfs(root.clone()),
        ] {
            let e = spec.open_existing(exec.clone()).err().unwrap();
            assert!(
                e.to_string().contains("there is no obuilder store at"),
                "{e}"
            );
        }
        assert!(!root.exists());
    }
}
