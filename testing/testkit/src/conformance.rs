#![cfg(target_os = "linux")]
//! The store conformance suite: one body, run against every backend on a real filesystem.
//!
//! It checks the [`Store`] contract: empty and cloned build dirs, copy-on-write isolation
//! between a result and its children, atomic commit, discard leaving nothing, delete,
//! metadata kept by clones (owners, modes, set-id bits, symlinks, hard links, fifos,
//! devices), and start-up recovery after a crash in the middle of a build.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use obuilder_engine::store::{BuildDir, Store};

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn tmp_entries(root: &Path) -> Vec<String> {
    match std::fs::read_dir(root.join("result-tmp")) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    }
}

fn mounts_below(root: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root = root.to_string_lossy().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&format!("{root}/")))
        .map(str::to_string)
        .collect()
}

async fn build(
    store: &dyn Store,
    id: &str,
    base: Option<&str>,
    f: impl FnOnce(&BuildDir),
) -> std::path::PathBuf {
    let dir = store
        .prepare(id, base)
        .await
        .unwrap_or_else(|e| panic!("prepare {id}: {e}"));
    std::fs::write(dir.dir.join("log"), format!("log of {id}\n")).unwrap();
    f(&dir);
    store
        .commit(&dir)
        .await
        .unwrap_or_else(|e| panic!("commit {id}: {e}"))
}

/// Runs the whole suite. `open` makes a fresh handle on the same store root (to simulate a
/// restart after a crash).
pub async fn store_conformance(open: impl Fn() -> Arc<dyn Store>) {
    let store = open();
    store.recover().await.expect("recover on a fresh root");
    let root = store.root().to_path_buf();
    assert_eq!(store.result("a").await.unwrap(), None);
    assert!(store.list().await.unwrap().is_empty());

    // An empty build dir, committed.
    let a = build(&*store, "a", None, |d| {
        assert_eq!(
            std::fs::read_dir(&d.rootfs).unwrap().count(),
            0,
            "a base build starts empty"
        );
        std::fs::create_dir(d.rootfs.join("etc")).unwrap();
        std::fs::write(d.rootfs.join("etc/conf"), "v1").unwrap();
        std::fs::write(d.rootfs.join("gone"), "x").unwrap();
        std::fs::set_permissions(&d.rootfs, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Metadata a clone must keep.
        let f = d.rootfs.join("suid");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        std::os::unix::fs::chown(&f, Some(1000), Some(1001)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("etc/conf", d.rootfs.join("link")).unwrap();
        std::fs::hard_link(d.rootfs.join("etc/conf"), d.rootfs.join("hard")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.rootfs.join("fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.rootfs.join("null"),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
    })
    .await;
    assert_eq!(
        store.result("a").await.unwrap().as_deref(),
        Some(a.as_path())
    );
    assert_eq!(read(&a.join("log")), "log of a\n");
    assert_eq!(store.list().await.unwrap(), ["a"]);

    // A clone sees its parent, keeps metadata, and its changes stay its own.
    let b = build(&*store, "b", Some("a"), |d| {
        let r = &d.rootfs;
        assert_eq!(read(&r.join("etc/conf")), "v1");
        let m = std::fs::symlink_metadata(r.join("suid")).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (1000, 1001, 0o4755),
            "owner and set-id bits kept"
        );
        assert_eq!(
            std::fs::read_link(r.join("link")).unwrap(),
            Path::new("etc/conf")
        );
        assert!(std::fs::symlink_metadata(r.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo_like());
        assert_eq!(
            std::fs::symlink_metadata(r.join("null")).unwrap().rdev(),
            rustix::fs::makedev(1, 3)
        );
        assert_eq!(read(&r.join("hard")), "v1");
        std::fs::write(r.join("etc/conf"), "v2").unwrap();
        std::fs::remove_file(r.join("gone")).unwrap();
        std::fs::write(r.join("new"), "n").unwrap();
    })
    .await;
    assert_eq!(read(&b.join("rootfs/etc/conf")), "v2");
    assert!(!b.join("rootfs/gone").exists() || store.describe().starts_with("overlayfs:"));
    assert_eq!(
        read(&a.join("rootfs/etc/conf")),
        "v1",
        "the parent is untouched by its child"
    );
    assert!(a.join("rootfs/gone").exists());
    assert!(!a.join("rootfs/new").exists());

    // A read-only view of a result holds its whole tree (overlayfs: all its layers).
    let v = store.view("b").await.unwrap();
    assert_eq!(read(&v.join("etc/conf")), "v2");
    assert_eq!(read(&v.join("new")), "n");
    assert!(
        v.join("suid").exists(),
        "the parent's files are in the view"
    );
    assert!(!v.join("gone").exists(), "deletions too");
    store.release_view(&v).await.unwrap();
    assert!(
        mounts_below(&root).is_empty(),
        "a released view leaves no mount"
    );

    // A grandchild sees the deletion and the changes.
    let c = store.prepare("c", Some("b")).await.unwrap();
    assert!(!c.rootfs.join("gone").exists(), "a deletion is inherited");
    assert_eq!(read(&c.rootfs.join("etc/conf")), "v2");
    assert_eq!(read(&c.rootfs.join("new")), "n");
    std::fs::write(c.rootfs.join("junk"), "j").unwrap();
    // Discard leaves nothing.
    store.discard(&c).await.unwrap();
    assert_eq!(store.result("c").await.unwrap(), None);
    assert!(
        tmp_entries(&root).is_empty(),
        "discard leaves nothing: {:?}",
        tmp_entries(&root)
    );
    assert!(
        mounts_below(&root).is_empty(),
        "discard leaves no mount: {:?}",
        mounts_below(&root)
    );
    // …and the same id can be built again.
    build(&*store, "c", Some("b"), |d| {
        assert!(!d.rootfs.join("junk").exists())
    })
    .await;

    // Delete removes just that result.
    store.delete("c").await.unwrap();
    assert_eq!(store.result("c").await.unwrap(), None);
    assert!(store.result("b").await.unwrap().is_some());
    let mut ids = store.list().await.unwrap();
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
    store.delete("never-existed").await.unwrap();

    // A crash in the middle of a build: the next start removes every trace.
    let half = store.prepare("d", Some("b")).await.unwrap();
    std::fs::write(half.rootfs.join("partial"), "p").unwrap();
    drop(store);
    let store = open();
    store.recover().await.expect("recover after a crash");
    assert!(
        tmp_entries(&root).is_empty(),
        "recovery wipes result-tmp: {:?}",
        tmp_entries(&root)
    );
    assert!(
        mounts_below(&root).is_empty(),
        "recovery unmounts: {:?}",
        mounts_below(&root)
    );
    assert_eq!(store.result("d").await.unwrap(), None);
    let d = build(&*store, "d", Some("b"), |d| {
        assert!(!d.rootfs.join("partial").exists())
    })
    .await;
    assert!(d.join("rootfs").exists());

    store.df().await.expect("df");
    cache_conformance(&*store).await;
}

/// Shared caches: private copies, publish on release, deletions kept, first release wins,
/// ownership, odd names, delete refused while in use.
pub async fn cache_conformance(store: &dyn Store) {
    use std::os::unix::fs::MetadataExt;
    // First use: an empty directory owned by the step's user.
    let a = store.cache_checkout("downloads", 1000, 1000).await.unwrap();
    assert_eq!(std::fs::read_dir(&a.path).unwrap().count(), 0);
    let m = std::fs::metadata(&a.path).unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    std::fs::write(a.path.join("one"), "1").unwrap();
    std::fs::write(a.path.join("doomed"), "d").unwrap();
    store.cache_release(a, true).await.unwrap();

    // The next step sees it; its deletion survives its release.
    let b = store.cache_checkout("downloads", 0, 0).await.unwrap();
    assert_eq!(read(&b.path.join("one")), "1");
    assert_eq!(
        std::fs::metadata(&b.path).unwrap().uid(),
        0,
        "each user owns the top of its copy"
    );
    std::fs::remove_file(b.path.join("doomed")).unwrap();
    store.cache_release(b, true).await.unwrap();
    let c = store.cache_checkout("downloads", 0, 0).await.unwrap();
    assert!(
        !c.path.join("doomed").exists(),
        "a deletion inside a cache survives"
    );
    store.cache_release(c, false).await.unwrap();

    // Two copies at once: private to each; the first released wins, the other is dropped.
    let x = store.cache_checkout("downloads", 0, 0).await.unwrap();
    let y = store.cache_checkout("downloads", 0, 0).await.unwrap();
    std::fs::write(x.path.join("x"), "x").unwrap();
    assert!(!y.path.join("x").exists(), "copies are private");
    std::fs::write(y.path.join("y"), "y").unwrap();
    assert_eq!(
        store
            .cache_list()
            .await
            .unwrap()
            .iter()
            .find(|c| c.name == "downloads")
            .map(|c| c.in_use),
        Some(2)
    );
    let e = store
        .cache_delete("downloads")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use"), "{e}");
    store.cache_release(y, true).await.unwrap();
    store.cache_release(x, true).await.unwrap();
    let z = store.cache_checkout("downloads", 0, 0).await.unwrap();
    assert!(
        z.path.join("y").exists() && !z.path.join("x").exists(),
        "first release wins"
    );
    // A discarded copy changes nothing.
    std::fs::write(z.path.join("junk"), "j").unwrap();
    store.cache_release(z, false).await.unwrap();

    // Names that are paths, dots, blanks or collide under a lossy escape stay apart.
    for (i, name) in ["a/b", "..", "x y", "\n1", "\u{a1}"].iter().enumerate() {
        let c = store.cache_checkout(name, 0, 0).await.unwrap();
        assert!(
            c.path.starts_with(store.root()),
            "{name:?} stays in the store"
        );
        std::fs::write(c.path.join("id"), i.to_string()).unwrap();
        store.cache_release(c, true).await.unwrap();
    }
    for (i, name) in ["a/b", "..", "x y", "\n1", "\u{a1}"].iter().enumerate() {
        let c = store.cache_checkout(name, 0, 0).await.unwrap();
        assert_eq!(read(&c.path.join("id")), i.to_string(), "{name:?}");
        store.cache_release(c, false).await.unwrap();
    }
    let names: Vec<String> = store
        .cache_list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.contains(&"a/b".to_string()) && names.contains(&"downloads".to_string()));
    store.cache_delete("downloads").await.unwrap();
    assert!(store.cache_delete("downloads").await.is_err());
    let fresh = store.cache_checkout("downloads", 0, 0).await.unwrap();
    assert_eq!(
        std::fs::read_dir(&fresh.path).unwrap().count(),
        0,
        "deleted means gone"
    );
    store.cache_release(fresh, false).await.unwrap();
    assert!(
        std::fs::read_dir(store.root().join("cache-tmp"))
            .unwrap()
            .next()
            .is_none(),
        "no copy is left behind"
    );
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}
