//! Which host directory a caller sees, and where a path inside the mount lands: the one
//! pure function every operation goes through.
//!
//! The scoreboard is a directory of symlinks named by uid (`SCOREBOARD/1000 →
//! /var/lib/obuilder/result/…/home`). A caller whose uid has a link to an existing
//! directory sees that directory at the mount point; every other caller (root included,
//! unless it has a link of its own) sees the fallback directory.
//!
//! A path inside the mount is taken apart into plain names: `.` is dropped, `..` goes up
//! but never above the view's root (as `/..` is `/`), and nothing else is interpreted.
//! Symbolic links are never followed by the filesystem itself: the kernel follows a link
//! the caller meets, with the caller's own rights, and the daemon opens every name with
//! "no symlinks" (see `confined`), so no path can leave its view through a link.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

/// Where callers' views come from.
pub trait Views {
    /// The directory `uid` sees, if it has one of its own.
    fn target(&self, uid: u32) -> Option<PathBuf>;

    /// [`Views::target`], with the directory's identity (device, inode) when it was
    /// looked at: a source that reads it anyway gives it, saving a second look.
    fn target_with_id(&self, uid: u32) -> Option<(PathBuf, Option<(u64, u64)>)> {
        self.target(uid).map(|p| (p, None))
    }
}

/// The scoreboard directory.
#[derive(Debug, Clone)]
pub struct Scoreboard {
    pub dir: PathBuf,
}

impl Views for Scoreboard {
    /// `DIR/UID`'s target, if it is an absolute path to an existing directory.
    fn target(&self, uid: u32) -> Option<PathBuf> {
        self.target_with_id(uid).map(|(p, _)| p)
    }

    fn target_with_id(&self, uid: u32) -> Option<(PathBuf, Option<(u64, u64)>)> {
        use std::os::unix::fs::MetadataExt;
        let link = std::fs::read_link(self.dir.join(uid.to_string())).ok()?;
        if !link.is_absolute() {
            return None;
        }
        let m = std::fs::metadata(&link).ok().filter(|m| m.is_dir())?;
        Some((link, Some((m.dev(), m.ino()))))
    }
}

/// The root directory `uid` sees: its own, or the fallback.
pub fn view_root<V: Views + ?Sized>(views: &V, fallback: &Path, uid: u32) -> PathBuf {
    view_root_with_id(views, fallback, uid).0
}

/// [`view_root`], with the root's identity if the views gave it.
pub fn view_root_with_id<V: Views + ?Sized>(
    views: &V,
    fallback: &Path,
    uid: u32,
) -> (PathBuf, Option<(u64, u64)>) {
    views
        .target_with_id(uid)
        .unwrap_or_else(|| (fallback.to_path_buf(), None))
}

/// A path inside the mount as plain names, relative to the view's root; `..` never goes
/// above the root.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// Where `path` (inside the mount) lands on the host for `uid`.
pub fn host_path<V: Views + ?Sized>(views: &V, fallback: &Path, uid: u32, path: &Path) -> PathBuf {
    view_root(views, fallback, uid).join(normalize(path))
}

/// A name the kernel may ask about in a directory: one component, not `.` or `..`.
pub fn valid_name(name: &OsStr) -> bool {
    let b = name.as_encoded_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/') && !b.contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Fixed(HashMap<u32, PathBuf>);

    impl Views for Fixed {
        fn target(&self, uid: u32) -> Option<PathBuf> {
            self.0.get(&uid).cloned()
        }
    }

    fn views() -> Fixed {
        Fixed(HashMap::from([
            (1000, PathBuf::from("/store/a/home")),
            (1001, PathBuf::from("/store/b/home")),
        ]))
    }

    #[test]
    fn each_uid_its_own_view_and_the_rest_the_fallback() {
        let v = views();
        let fb = Path::new("/var/empty");
        let cases: &[(u32, &str, &str)] = &[
            (1000, "/", "/store/a/home"),
            (1000, "/bin/opam", "/store/a/home/bin/opam"),
            (1001, "/bin/opam", "/store/b/home/bin/opam"),
            (1002, "/bin/opam", "/var/empty/bin/opam"),
            (0, "/bin/opam", "/var/empty/bin/opam"),
            (1000, "bin/./opam", "/store/a/home/bin/opam"),
            (1000, "/bin//opam/", "/store/a/home/bin/opam"),
        ];
        for (uid, path, want) in cases {
            assert_eq!(
                host_path(&v, fb, *uid, Path::new(path)),
                PathBuf::from(want),
                "{uid} {path}"
            );
        }
    }

    #[test]
    fn dot_dot_never_leaves_the_view() {
        let v = views();
        let fb = Path::new("/var/empty");
        for (path, want) in [
            ("/..", "/store/a/home"),
            ("/../../etc/passwd", "/store/a/home/etc/passwd"),
            ("/bin/../../..", "/store/a/home"),
            ("/bin/../lib/x", "/store/a/home/lib/x"),
            ("../b/home/secret", "/store/a/home/b/home/secret"),
        ] {
            assert_eq!(
                host_path(&v, fb, 1000, Path::new(path)),
                PathBuf::from(want)
            );
        }
    }

    #[test]
    fn names() {
        for ok in ["a", "a b", ".hidden", "..x", "x.."] {
            assert!(valid_name(OsStr::new(ok)), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "/", "a\0b"] {
            assert!(!valid_name(OsStr::new(bad)), "{bad:?}");
        }
    }

    /// The scoreboard: an absolute link to a directory counts; a dangling, relative or
    /// non-directory link, or none, gives the fallback.
    #[test]
    fn scoreboard_links() {
        let d = tempfile::tempdir().unwrap();
        let sb = d.path().join("sb");
        std::fs::create_dir(&sb).unwrap();
        let home = d.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let file = d.path().join("file");
        std::fs::write(&file, "").unwrap();
        std::os::unix::fs::symlink(&home, sb.join("1000")).unwrap();
        std::os::unix::fs::symlink("home", sb.join("1001")).unwrap();
        std::os::unix::fs::symlink(d.path().join("gone"), sb.join("1002")).unwrap();
        std::os::unix::fs::symlink(&file, sb.join("1003")).unwrap();
        let s = Scoreboard { dir: sb };
        assert_eq!(s.target(1000), Some(home.clone()));
        for uid in [1001, 1002, 1003, 1004] {
            assert_eq!(s.target(uid), None, "{uid}");
        }
        let fb = d.path().join("fallback");
        assert_eq!(view_root(&s, &fb, 1000), home);
        assert_eq!(view_root(&s, &fb, 1003), fb);
    }
}
