#![cfg(target_os = "linux")]
//! The store conformance suite on real filesystems made by the test (loopback files).

use std::sync::Arc;

use obuilder_engine::exec::RealExec;
use obuilder_engine::store::Store;
use obuilder_stores::btrfs::BtrfsStore;
use obuilder_stores::overlayfs::OverlayStore;
use obuilder_stores::rsync::{RsyncMode, RsyncStore};
use obuilder_stores::xfs::XfsStore;
use testkit::conformance::store_conformance;
use testkit::{require, Cap, LoopFs};

#[tokio::test]
async fn btrfs_store_conformance() {
    require!(Cap::Root, Cap::Tool("mkfs.btrfs"), Cap::Tool("btrfs"));
    let fs = LoopFs::new("btrfs", 512);
    let root = fs.mnt.join("store");
    store_conformance(|| Arc::new(BtrfsStore::new(&root, RealExec::shared())) as Arc<dyn Store>)
        .await;
    // Committed results are read-only subvolumes.
    let e = std::fs::write(root.join("result/a/rootfs/x"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");
}

fn libc_erofs() -> i32 {
    30
}

fn is_subvolume(p: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.ino() == 256)
}

/// A btrfs result is one read-only subvolume, log and tree together (published by one
/// read-only snapshot: one transaction commit); a child keeps only its parent's tree. A
/// store made before, whose results have their `rootfs` alone as the subvolume, goes on
/// working: such a result's children are made that way too, and both delete cleanly.
#[tokio::test]
#[allow(clippy::disallowed_methods)] // (the older layout, made by hand as it was made)
async fn btrfs_results_are_whole_subvolumes_beside_those_of_the_older_layout() {
    require!(Cap::Root, Cap::Tool("mkfs.btrfs"), Cap::Tool("btrfs"));
    let fs = LoopFs::new("btrfs", 512);
    let root = fs.mnt.join("store");
    let store = BtrfsStore::new(&root, RealExec::shared());
    store.recover().await.unwrap();

    let base = store.prepare("base", None).await.unwrap();
    std::fs::write(base.rootfs.join("f"), "base").unwrap();
    std::fs::write(base.dir.join("log"), "base log").unwrap();
    let r = store.commit(&base).await.unwrap();
    assert!(is_subvolume(&r) && !is_subvolume(&r.join("rootfs")));
    assert!(
        !root.join("result-tmp/base").exists(),
        "the build's subvolume is deleted"
    );
    let e = std::fs::write(r.join("log"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");

    let child = store.prepare("child", Some("base")).await.unwrap();
    let mut kept: Vec<String> = std::fs::read_dir(&child.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(kept, ["parent", "rootfs"], "only the tree is inherited");
    assert_eq!(
        std::fs::read_to_string(child.dir.join("parent")).unwrap(),
        "base"
    );
    assert_eq!(
        std::fs::read_to_string(child.rootfs.join("f")).unwrap(),
        "base"
    );
    std::fs::write(child.rootfs.join("f"), "child").unwrap();
    // A step can make subvolumes of its own (the ioctl needs no privilege).
    let run = |args: &[&str]| {
        let st = std::process::Command::new("btrfs")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "btrfs {args:?}");
    };
    let nest = |tree: &std::path::Path| {
        run(&["subvolume", "create", tree.join("sub").to_str().unwrap()]);
        run(&[
            "subvolume",
            "create",
            tree.join("sub/deeper").to_str().unwrap(),
        ]);
        std::fs::write(tree.join("sub/deeper/x"), "x").unwrap();
        run(&[
            "property",
            "set",
            "-ts",
            tree.join("sub").to_str().unwrap(),
            "ro",
            "true",
        ]);
    };
    nest(&child.rootfs);
    let c = store.commit(&child).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(c.join("rootfs/f")).unwrap(),
        "child"
    );
    assert_eq!(std::fs::read_to_string(r.join("rootfs/f")).unwrap(), "base");
    // (A snapshot holds no nested subvolume: an empty directory in its place.)
    assert!(std::fs::read_dir(c.join("rootfs/sub"))
        .unwrap()
        .next()
        .is_none());
    assert!(
        !root.join("result-tmp/child").exists(),
        "deleted, nested subvolumes and all"
    );
    let failed = store.prepare("failed", Some("base")).await.unwrap();
    nest(&failed.rootfs);
    store.discard(&failed).await.unwrap();
    assert!(!failed.dir.exists());
    // A crash mid-build: the next start removes it, nested subvolumes and all.
    let crashed = store.prepare("crashed", Some("base")).await.unwrap();
    nest(&crashed.rootfs);
    let store = BtrfsStore::new(&root, RealExec::shared());
    store.recover().await.unwrap();
    assert!(!crashed.dir.exists());

    // A result of the older layout, as the previous version made it.
    let old = root.join("result/old");
    std::fs::create_dir(&old).unwrap();
    run(&["subvolume", "create", old.join("rootfs").to_str().unwrap()]);
    std::fs::write(old.join("rootfs/f"), "old").unwrap();
    std::fs::write(old.join("log"), "old log").unwrap();
    run(&[
        "property",
        "set",
        "-ts",
        old.join("rootfs").to_str().unwrap(),
        "ro",
        "true",
    ]);

    let on_old = store.prepare("on-old", Some("old")).await.unwrap();
    assert!(is_subvolume(&on_old.rootfs) && !is_subvolume(&on_old.dir));
    assert_eq!(
        std::fs::read_to_string(on_old.rootfs.join("f")).unwrap(),
        "old"
    );
    std::fs::write(on_old.rootfs.join("g"), "new").unwrap();
    nest(&on_old.rootfs);
    let o = store.commit(&on_old).await.unwrap();
    assert!(is_subvolume(&o.join("rootfs")) && !is_subvolume(&o));
    let e = std::fs::write(o.join("rootfs/x"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");

    let mut ids = store.list().await.unwrap();
    ids.sort();
    assert_eq!(ids, ["base", "child", "old", "on-old"]);
    for id in ["child", "on-old", "old", "base"] {
        store.delete(id).await.unwrap();
        assert_eq!(store.result(id).await.unwrap(), None, "{id}");
    }
    assert!(store.list().await.unwrap().is_empty());
    assert!(std::fs::read_dir(root.join("result-tmp"))
        .unwrap()
        .next()
        .is_none());
    assert_eq!(subvolumes_in(&root.join("spare")), Vec::<String>::new());
}

/// The subvolumes directly in `dir`, by name.
fn subvolumes_in(dir: &std::path::Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| is_subvolume(&e.path()))
                .map(|e| e.file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// `btrfs subvolume show`'s UUID line for `p`.
fn uuid_of(p: &std::path::Path) -> String {
    let out = btrfs(&["subvolume".as_ref(), "show".as_ref(), p.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.trim_start().starts_with("UUID:"))
        .unwrap_or_else(|| panic!("no UUID in {text}"))
        .to_string()
}

/// A published build's subvolume is kept as its result's spare, and the next step on that
/// result takes it instead of a snapshot (a transaction commit): the step's tree is that
/// very subvolume. A result built on again gets a new spare while each such step runs.
/// Spares are never
/// taken for another result, nor kept when a step made subvolumes of its own, and go with
/// their results.
#[tokio::test]
async fn btrfs_spares_take_the_place_of_a_snapshot_and_never_of_another_result() {
    require!(Cap::Root, Cap::Tool("mkfs.btrfs"), Cap::Tool("btrfs"));
    let fs = LoopFs::new("btrfs", 512);
    let root = fs.mnt.join("store");
    let spares = root.join("spare");
    let store = BtrfsStore::new(&root, RealExec::shared());
    store.recover().await.unwrap();

    let base = store.prepare("base", None).await.unwrap();
    std::fs::write(base.rootfs.join("f"), "base").unwrap();
    let build_uuid = uuid_of(&base.dir);
    store.commit(&base).await.unwrap();
    assert_eq!(subvolumes_in(&spares), ["base"]);
    assert_eq!(
        uuid_of(&spares.join("base")),
        build_uuid,
        "kept, not copied"
    );

    // The first child takes the spare, and starts no other: in a chain built cold,
    // nothing else builds on `base`.
    let a = store.prepare("a", Some("base")).await.unwrap();
    assert_eq!(uuid_of(&a.dir), build_uuid, "the spare itself");
    assert_eq!(std::fs::read_to_string(a.rootfs.join("f")).unwrap(), "base");
    std::fs::write(a.rootfs.join("f"), "a").unwrap();
    store.commit(&a).await.unwrap();
    drop(store); // (waits for any thread)
    let store = BtrfsStore::new(&root, RealExec::shared());
    store.recover().await.unwrap();
    assert_eq!(subvolumes_in(&spares), ["a"]);

    // A second child finds none: it takes a snapshot, and a thread makes a spare for the
    // next; the child that takes that spare starts the one after.
    let b = store.prepare("b", Some("base")).await.unwrap();
    assert_eq!(std::fs::read_to_string(b.rootfs.join("f")).unwrap(), "base");
    store.discard(&b).await.unwrap();
    drop(store);
    let store = BtrfsStore::new(&root, RealExec::shared());
    store.recover().await.unwrap();
    assert_eq!(subvolumes_in(&spares), ["a", "base"]);
    let made = uuid_of(&spares.join("base"));
    let b = store.prepare("b", Some("base")).await.unwrap();
    assert_eq!(uuid_of(&b.dir), made, "the spare made for it");
    assert_eq!(
        std::fs::read_to_string(b.rootfs.join("f")).unwrap(),
        "base",
        "the new spare is the result's tree, not the child's"
    );
    store.discard(&b).await.unwrap();
    drop(store);
    let store = BtrfsStore::new(&root, RealExec::shared());
    store.recover().await.unwrap();
    assert_eq!(subvolumes_in(&spares), ["a", "base"], "and the next one");
    assert_ne!(uuid_of(&spares.join("base")), made);
    assert_eq!(
        std::fs::read_to_string(root.join("result/a/rootfs/f")).unwrap(),
        "a"
    );

    // A result deleted and built again (another outcome under the same id): the spare
    // of the old one, as another builder racing the delete may leave, is not taken.
    drop(store);
    let store = BtrfsStore::new(&root, RealExec::shared());
    store.recover().await.unwrap();
    let stale = root.join("stale-spare");
    snapshot(&root.join("result/a"), &stale);
    store.delete("a").await.unwrap();
    assert!(!spares.join("a").exists(), "a result's spare goes first");
    let a2 = store.prepare("a", Some("base")).await.unwrap();
    std::fs::write(a2.rootfs.join("f"), "a again").unwrap();
    store.commit(&a2).await.unwrap();
    remove_subvolume(&spares.join("a"));
    std::fs::rename(&stale, spares.join("a")).unwrap();
    let c = store.prepare("c", Some("a")).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(c.rootfs.join("f")).unwrap(),
        "a again",
        "built on the result, not on the stale spare"
    );
    store.discard(&c).await.unwrap();

    // A step that made a subvolume of its own leaves no spare (its result, a snapshot,
    // holds an empty directory there).
    let nested = store.prepare("nested", Some("base")).await.unwrap();
    let sub = nested.rootfs.join("sub");
    let out = btrfs(&["subvolume".as_ref(), "create".as_ref(), sub.as_os_str()]);
    assert!(out.status.success(), "{out:?}");
    store.commit(&nested).await.unwrap();
    assert!(!spares.join("nested").exists());
    assert!(!root.join("result-tmp/nested").exists());

    // A spare whose result is gone (a crash between the two deletes) is swept.
    drop(store);
    let store = BtrfsStore::new(&root, RealExec::shared());
    let orphan = spares.join("gone");
    snapshot(&root.join("result/base"), &orphan);
    store.complete_deletes().await.unwrap();
    assert!(!orphan.exists());

    for id in store.list().await.unwrap() {
        store.delete(&id).await.unwrap();
    }
    drop(store);
    assert_eq!(subvolumes_in(&spares), Vec::<String>::new());
}

fn remove_subvolume(p: &std::path::Path) {
    if p.exists() {
        let out = btrfs(&["subvolume".as_ref(), "delete".as_ref(), p.as_os_str()]);
        assert!(out.status.success(), "{out:?}");
    }
}

fn snapshot(src: &std::path::Path, dst: &std::path::Path) {
    let out = btrfs(&[
        "subvolume".as_ref(),
        "snapshot".as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
    ]);
    assert!(out.status.success(), "{out:?}");
}

/// `btrfs ARGS`, run by the test itself (what it checks is the store's own doing).
#[allow(clippy::disallowed_methods)]
fn btrfs(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new("btrfs")
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn xfs_reflink_store_conformance() {
    require!(Cap::Root, Cap::Tool("mkfs.xfs"));
    let fs = LoopFs::new("xfs", 512);
    let root = fs.mnt.join("store");
    store_conformance(|| Arc::new(XfsStore::new(&root, RealExec::shared())) as Arc<dyn Store>)
        .await;
}

#[tokio::test]
async fn overlayfs_store_conformance() {
    require!(Cap::Root, Cap::Tool("mkfs.ext4"), Cap::OverlayLowerdirPlus);
    let fs = LoopFs::new("ext4", 256);
    let root = fs.mnt.join("store");
    store_conformance(|| Arc::new(OverlayStore::new(&root, RealExec::shared())) as Arc<dyn Store>)
        .await;
}

#[tokio::test]
async fn rsync_copy_store_conformance() {
    require!(Cap::Root, Cap::Tool("mkfs.ext4"), Cap::Tool("rsync"));
    let fs = LoopFs::new("ext4", 256);
    let root = fs.mnt.join("store");
    store_conformance(|| {
        Arc::new(RsyncStore::new(&root, RsyncMode::Copy, RealExec::shared())) as Arc<dyn Store>
    })
    .await;
}

#[tokio::test]
async fn rsync_hardlink_store_conformance() {
    require!(Cap::Root, Cap::Tool("mkfs.ext4"), Cap::Tool("rsync"));
    let fs = LoopFs::new("ext4", 256);
    let root = fs.mnt.join("store");
    store_conformance(|| {
        Arc::new(RsyncStore::new(
            &root,
            RsyncMode::Hardlink,
            RealExec::shared(),
        )) as Arc<dyn Store>
    })
    .await;
    // Unchanged files of a child are hard links to its parent's.
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(root.join(p)).unwrap().ino();
    assert_eq!(ino("result/a/rootfs/suid"), ino("result/b/rootfs/suid"));
    assert_ne!(
        ino("result/a/rootfs/etc/conf"),
        ino("result/b/rootfs/etc/conf")
    );
}

/// Chains deeper than the classic `lowerdir=a:b:…` option can hold (one page) still mount.
#[tokio::test]
async fn overlayfs_long_chains_pass_the_page_limit() {
    require!(Cap::Root, Cap::Tool("mkfs.ext4"), Cap::OverlayLowerdirPlus);
    let fs = LoopFs::new("ext4", 256);
    let store = OverlayStore::new(fs.mnt.join("store"), RealExec::shared());
    store.recover().await.unwrap();
    let id = |i: usize| format!("{:064x}", i);
    let mut base: Option<String> = None;
    for i in 0..80 {
        let d = store
            .prepare(&id(i), base.as_deref())
            .await
            .unwrap_or_else(|e| panic!("layer {i}: {e}"));
        std::fs::write(d.rootfs.join(format!("f{i}")), "x").unwrap();
        store.commit(&d).await.unwrap();
        base = Some(id(i));
    }
    let top = store.prepare("top", base.as_deref()).await.unwrap();
    assert_eq!(std::fs::read_dir(&top.rootfs).unwrap().count(), 80);
    store.discard(&top).await.unwrap();
}

/// A step's overlay is mounted `volatile` (its unmount and its own fsyncs do not write the
/// upper filesystem out: the commit does, once), and a step thrown away after a crash
/// leaves nothing that stops the store from building it again (a volatile mount's work
/// dir refuses a second mount).
#[tokio::test]
async fn overlayfs_steps_are_volatile_and_a_crashed_one_builds_again() {
    require!(Cap::Root, Cap::Tool("mkfs.ext4"), Cap::OverlayLowerdirPlus);
    let fs = LoopFs::new("ext4", 256);
    let root = fs.mnt.join("store");
    let store = OverlayStore::new(root.clone(), RealExec::shared());
    store.recover().await.unwrap();
    let base = store.prepare("base", None).await.unwrap();
    std::fs::write(base.rootfs.join("old"), "x").unwrap();
    store.commit(&base).await.unwrap();
    let dir = store.prepare("step", Some("base")).await.unwrap();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(dir.rootfs.to_str().unwrap()))
        .unwrap_or_else(|| panic!("no mount at {}:\n{mountinfo}", dir.rootfs.display()));
    assert!(line.contains("volatile"), "{line}");
    // A crash here (the store dropped with the step mounted), then a new store process.
    std::fs::write(dir.rootfs.join("new"), "y").unwrap();
    drop(store);
    let store = OverlayStore::new(root, RealExec::shared());
    store.recover().await.unwrap();
    let again = store.prepare("step", Some("base")).await.unwrap();
    assert!(!again.rootfs.join("new").exists());
    std::fs::write(again.rootfs.join("new"), "z").unwrap();
    let result = store.commit(&again).await.unwrap();
    assert_eq!(std::fs::read(result.join("rootfs/new")).unwrap(), b"z");
}

/// Opens a store at a root.
type OpenStore = Box<dyn Fn(&std::path::Path) -> Arc<dyn Store>>;

/// A committed result's file data is on the disk when `commit` returns, not only in the
/// page cache: `filefrag` (FIEMAP, without its sync flag) shows no extent still waiting
/// for delayed allocation. Before, a btrfs result kept such extents for ~30 s after its
/// read-only commit, and one on ext4 or XFS likewise: a power cut then left a published
/// result with empty files.
#[tokio::test]
#[allow(clippy::disallowed_methods)] // (a test's own probe, not the store's commands)
async fn committed_data_is_on_the_disk_on_every_store() {
    require!(
        Cap::Root,
        Cap::Tool("mkfs.btrfs"),
        Cap::Tool("mkfs.xfs"),
        Cap::Tool("mkfs.ext4"),
        Cap::Tool("rsync"),
        Cap::Tool("filefrag"),
        Cap::OverlayLowerdirPlus
    );
    let stores: Vec<(&str, &str, OpenStore)> = vec![
        (
            "btrfs",
            "btrfs",
            Box::new(|r| Arc::new(BtrfsStore::new(r, RealExec::shared())) as Arc<dyn Store>),
        ),
        (
            "xfs",
            "xfs",
            Box::new(|r| Arc::new(XfsStore::new(r, RealExec::shared())) as Arc<dyn Store>),
        ),
        (
            "overlayfs",
            "ext4",
            Box::new(|r| Arc::new(OverlayStore::new(r, RealExec::shared())) as Arc<dyn Store>),
        ),
        (
            "rsync hardlink",
            "ext4",
            Box::new(|r| {
                Arc::new(RsyncStore::new(r, RsyncMode::Hardlink, RealExec::shared()))
                    as Arc<dyn Store>
            }),
        ),
    ];
    for (name, fs_kind, make) in stores {
        let fs = LoopFs::new(fs_kind, 512);
        let store = make(&fs.mnt.join("store"));
        store.recover().await.unwrap();
        let base = store.prepare("base", None).await.unwrap();
        std::fs::write(base.rootfs.join("old"), "x").unwrap();
        store.commit(&base).await.unwrap();
        let dir = store.prepare("step", Some("base")).await.unwrap();
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(dir.rootfs.join("big"), &data).unwrap();
        // (the step's log, beside the tree, which the engine then does not flush itself)
        std::fs::write(dir.dir.join("log"), &data[..100_000]).unwrap();
        assert!(store.commit_is_durable(), "{name}");
        let result = store.commit(&dir).await.unwrap();
        for file in [result.join("rootfs/big"), result.join("log")] {
            let out = std::process::Command::new("filefrag")
                .arg("-v")
                .arg(&file)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{name}: {text}");
            assert!(
                !text.contains("delalloc") && !text.contains("unknown_loc"),
                "{name}: committed data not on the disk yet:\n{text}"
            );
        }
        assert_eq!(
            std::fs::read(result.join("rootfs/big")).unwrap(),
            data,
            "{name}"
        );
    }
}
