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
