//! The exact commands the stores run, through the command seam (no root needed).

use std::sync::Arc;

use obuilder_engine::store::Store;
use obuilder_stores::btrfs::BtrfsStore;
use obuilder_stores::xfs::XfsStore;
use testkit::RecordingExec;

#[tokio::test]
async fn btrfs_command_sequence() {
    let dir = tempfile_dir();
    let exec = RecordingExec::new();
    let store = BtrfsStore::new(&dir, Arc::new(exec.clone()));
    store.recover().await.unwrap();
    let d = store.prepare("a", None).await.unwrap();
    assert_eq!(
        exec.argvs(),
        [format!(
            "btrfs subvolume create {}/result-tmp/a/rootfs",
            dir.display()
        )]
    );
    // (the recorder makes no subvolume: discard only removes the directory; snapshots and
    // the read-only flag are ioctls, exercised by the conformance suite on real btrfs)
    store.discard(&d).await.unwrap();
    assert!(!dir.join("result-tmp/a").exists());
}

#[tokio::test]
async fn xfs_command_sequence() {
    let dir = tempfile_dir();
    let exec = RecordingExec::new();
    let store = XfsStore::new(&dir, Arc::new(exec.clone()));
    store.recover().await.unwrap();
    let d = store.prepare("a", None).await.unwrap();
    store.commit(&d).await.unwrap();
    store.prepare("b", Some("a")).await.unwrap();
    let r = dir.display();
    assert_eq!(
        exec.argvs(),
        [format!("cp --archive --reflink=always --no-target-directory {r}/result/a/rootfs {r}/result-tmp/b/rootfs")]
    );
}

#[tokio::test]
async fn a_failed_snapshot_leaves_nothing() {
    let dir = tempfile_dir();
    let exec = RecordingExec::new();
    exec.fail(
        &["btrfs", "subvolume", "create"],
        "ERROR: not a btrfs filesystem",
    );
    let store = BtrfsStore::new(&dir, Arc::new(exec.clone()));
    store.recover().await.unwrap();
    let e = store.prepare("a", None).await.unwrap_err();
    assert!(e.to_string().contains("not a btrfs filesystem"), "{e}");
    assert!(!dir.join("result-tmp/a").exists());
    // A snapshot of a base that is not there: a clear error, nothing left.
    let e = store.prepare("b", Some("missing")).await.unwrap_err();
    assert!(e.to_string().contains("cannot snapshot"), "{e}");
    assert!(!dir.join("result-tmp/b").exists());
}

fn tempfile_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "obuilder-store-cmds-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}
