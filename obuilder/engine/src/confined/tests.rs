//! The escape cases, held against both resolvers (the portable walk runs on Linux too).

use std::os::unix::fs::{symlink, MetadataExt};

use super::*;

/// A tree with traps, beside an "outside" directory that must never be reached.
struct Trap {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

fn trap() -> Trap {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    for d in ["root/etc", "root/usr/lib", "root/data", "outside/x"] {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    std::fs::write(outside.join("x/victim"), "").unwrap();
    // An absolute symlink to the host's view of `outside`: inside the tree it means
    // ROOT/<that path>, which does not exist.
    symlink(&outside, root.join("abs")).unwrap();
    symlink("/", root.join("slash")).unwrap();
    symlink("../../..", root.join("usr/lib/up")).unwrap();
    symlink("/usr/lib", root.join("lib")).unwrap();
    symlink("loop2", root.join("loop1")).unwrap();
    symlink("loop1", root.join("loop2")).unwrap();
    std::fs::write(root.join("data/file"), "f").unwrap();
    Trap {
        _tmp: tmp,
        root,
        outside,
    }
}

fn ino(fd: &OwnedFd) -> u64 {
    rustix::fs::fstat(fd).unwrap().st_ino
}

fn ino_of(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

fn roots(t: &Trap) -> Vec<(&'static str, ConfinedRoot)> {
    let mut v = vec![("walk", ConfinedRoot::open_portable(&t.root).unwrap())];
    let native = ConfinedRoot::open(&t.root).unwrap();
    if native.resolver != Resolver::Walk {
        v.push(("openat2", native));
    }
    v
}

#[test]
fn symlinks_resolve_inside_the_tree() {
    let t = trap();
    for (name, r) in roots(&t) {
        let root_ino = ino_of(&t.root);
        assert_eq!(
            ino(&r.dir("/slash", Follow::InRoot).unwrap()),
            root_ino,
            "{name}"
        );
        assert_eq!(
            ino(&r.dir("/slash/slash/..", Follow::InRoot).unwrap()),
            root_ino,
            "{name}"
        );
        assert_eq!(
            ino(&r.dir("/usr/lib/up", Follow::InRoot).unwrap()),
            root_ino,
            "{name}"
        );
        assert_eq!(
            ino(&r.dir("/../../..", Follow::InRoot).unwrap()),
            root_ino,
            "{name}"
        );
        assert_eq!(
            ino(&r.dir("/lib", Follow::InRoot).unwrap()),
            ino_of(&t.root.join("usr/lib")),
            "{name}"
        );
        assert_eq!(
            ino(&r.dir("/lib/up/data", Follow::InRoot).unwrap()),
            ino_of(&t.root.join("data")),
            "{name}"
        );
        // The host path the absolute link names does not exist inside the tree.
        let e = r.dir("/abs/x", Follow::InRoot).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{name}: {e}");
        let e = r.dir("/loop1", Follow::InRoot).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{name}: {e}");
        let e = r.dir("/data/file", Follow::InRoot).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR), "{name}: {e}");
    }
}

#[test]
fn never_follow_refuses_every_symlink() {
    let t = trap();
    for (name, r) in roots(&t) {
        for p in ["/slash", "/lib", "/usr/lib/up", "/abs", "/slash/data"] {
            let e = r.dir(p, Follow::Never).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ELOOP), "{name} {p}: {e}");
        }
        assert_eq!(
            ino(&r.dir("/usr/lib/../../data", Follow::Never).unwrap()),
            ino_of(&t.root.join("data")),
            "{name}"
        );
        assert_eq!(
            ino(&r.dir("/../..", Follow::Never).unwrap()),
            ino_of(&t.root),
            "{name}"
        );
    }
}

#[test]
fn create_dirs_through_symlinks_stays_inside() {
    let t = trap();
    for (name, r) in roots(&t) {
        // Through a link to a host path: refused (it dangles inside the tree), as
        // `mkdir -p` in the container would.
        assert!(r
            .create_dirs(&format!("/abs/{name}/deep"), 0o750, None)
            .is_err());
        let fd = r
            .create_dirs(&format!("/lib/up/new-{name}/deep"), 0o750, None)
            .unwrap();
        let inside = t.root.join(format!("new-{name}/deep"));
        assert_eq!(ino(&fd), ino_of(&inside), "{name}");
        assert_eq!(
            std::fs::metadata(&inside).unwrap().mode() & 0o7777,
            0o750,
            "{name}"
        );
        r.create_dirs(&format!("/slash/usr/lib/up/made-{name}"), 0o755, None)
            .unwrap();
        assert!(t.root.join(format!("made-{name}")).is_dir(), "{name}");
        assert!(!t.outside.join(name).exists(), "{name}");
    }
}

#[test]
fn parent_splits_and_refuses_dotdot_names() {
    let t = trap();
    for (name, r) in roots(&t) {
        assert!(r.parent("/", Follow::InRoot).unwrap().is_none(), "{name}");
        let (dir, n) = r
            .parent("/lib/up/data/file", Follow::InRoot)
            .unwrap()
            .unwrap();
        assert_eq!(n, "file");
        assert_eq!(ino(&dir), ino_of(&t.root.join("data")), "{name}");
        assert!(r.parent("/data/..", Follow::InRoot).is_err(), "{name}");
    }
}

/// OBuilder-style clean-up after a step that swapped a directory for a symlink to the
/// host: nothing outside the tree is removed.
#[test]
fn clean_up_of_mount_points_never_leaves_the_tree() {
    for resolver in ["walk", "native"] {
        let t = trap();
        let r = if resolver == "walk" {
            ConfinedRoot::open_portable(&t.root).unwrap()
        } else {
            ConfinedRoot::open(&t.root).unwrap()
        };
        let made = missing_components(&r, "/m/x/victim");
        assert_eq!(made, ["/m", "/m/x", "/m/x/victim"]);
        // The step replaces /m with a symlink to the host's `outside`, whose x/victim is
        // an empty file: exactly what the clean-up would remove.
        symlink(&t.outside, t.root.join("m")).unwrap();
        remove_made(&r, &made);
        assert!(t.outside.join("x/victim").exists(), "{resolver}");
        assert!(t.root.join("m").symlink_metadata().is_ok(), "{resolver}");
        // An honest run: made, then removed.
        std::fs::remove_file(t.root.join("m")).unwrap();
        std::fs::create_dir_all(t.root.join("m/x")).unwrap();
        std::fs::write(t.root.join("m/x/victim"), "").unwrap();
        remove_made(&r, &made);
        assert!(!t.root.join("m").exists(), "{resolver}");
        // Components behind a symlink are never reported as made.
        assert!(
            missing_components(&r, "/slash/new").is_empty(),
            "{resolver}"
        );
        assert!(missing_components(&r, "/a/../b").is_empty(), "{resolver}");
        assert_eq!(missing_components(&r, "/data/new"), ["/data/new"]);
        assert!(
            missing_components(&r, "/data/file").is_empty(),
            "{resolver}"
        );
    }
}

#[test]
fn remove_at_never_follows_symlinks() {
    let t = trap();
    let r = ConfinedRoot::open(&t.root).unwrap();
    std::fs::create_dir_all(t.root.join("tree/sub")).unwrap();
    symlink(&t.outside, t.root.join("tree/sub/out")).unwrap();
    remove_at(r.root_fd(), "tree").unwrap();
    assert!(!t.root.join("tree").exists());
    assert!(t.outside.join("x/victim").exists());
    remove_at(r.root_fd(), "missing").unwrap();
}
