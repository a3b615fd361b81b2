#![cfg(target_os = "linux")]
//! The exact commands the stores run, through the command seam (no root needed).

use std::sync::Arc;

use obuilder_engine::store::Store;
use obuilder_stores::btrfs::BtrfsStore;
use obuilder_stores::xfs::XfsStore;
use testkit::RecordingExec;

#[tokio::test]
async fn btrfs_command_sequence() {
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    let exec = RecordingExec::new();
    let store = BtrfsStore::new(&dir, Arc::new(exec.clone()));
    store.recover().await.unwrap();
    let d = store.prepare("a", None).await.unwrap();
    assert_eq!(
        exec.argvs(),
        [format!(
            "btrfs subvolume create {}/result-tmp/a",
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
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
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
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
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

/// A fresh directory, removed with the returned guard.
fn tempfile_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("obuilder-store-cmds-")
        .tempdir()
        .unwrap()
}

#[tokio::test]
async fn rsync_command_sequences() {
    use obuilder_stores::rsync::{RsyncMode, RsyncStore};
    for (mode, checksum) in [
        (RsyncMode::Copy, None),
        (RsyncMode::Hardlink, Some(true)),
        (RsyncMode::HardlinkUnsafe, Some(false)),
    ] {
        let tmp = tempfile_dir();
        let dir = tmp.path().to_path_buf();
        let exec = RecordingExec::new();
        let store = RsyncStore::new(&dir, mode, Arc::new(exec.clone()));
        store.recover().await.unwrap();
        let a = store.prepare("a", None).await.unwrap();
        store.commit(&a).await.unwrap();
        let b = store.prepare("b", Some("a")).await.unwrap();
        // (what the recorded rsync would have made)
        std::fs::create_dir_all(&b.rootfs).unwrap();
        store.commit(&b).await.unwrap();
        let r = dir.display();
        let mut want = vec![format!(
            "rsync -aHq {r}/result/a/rootfs/ {r}/result-tmp/b/rootfs"
        )];
        if let Some(c) = checksum {
            want.push(format!(
                "rsync -aHq{} --link-dest={r}/result/a/rootfs {r}/result-tmp/b/rootfs/ {r}/result-tmp/b/rootfs.link/",
                if c { " --checksum" } else { "" }
            ));
        }
        assert_eq!(exec.argvs(), want, "{mode:?}");
        assert!(dir.join("result/b").is_dir(), "{mode:?}: published");
        assert!(
            dir.join("result/b/rootfs").is_dir(),
            "{mode:?}: the tree swapped in"
        );
        assert!(!dir.join("result-tmp/b").exists());
        assert!(
            !dir.join("result/b/rootfs.link").exists() && !dir.join("result/b/rootfs.old").exists()
        );
    }
}

#[tokio::test]
async fn btrfs_delete_and_sync_commands() {
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    let exec = RecordingExec::new();
    let store = BtrfsStore::new(&dir, Arc::new(exec.clone()));
    store.recover().await.unwrap();
    std::fs::create_dir_all(dir.join("result/x/rootfs")).unwrap();
    store.delete("x").await.unwrap();
    assert!(!dir.join("result/x").exists(), "renamed away, then removed");
    store.complete_deletes().await.unwrap();
    assert_eq!(
        exec.argvs(),
        [format!("timeout 60 btrfs subvolume sync {}", dir.display())]
    );
}

/// The original's `delete_cache` deleted a cache while containers used it and refused an
/// idle one; here a cache with a copy checked out is refused, an idle one deleted.
#[tokio::test]
async fn docker_cache_delete_is_refused_while_in_use_only() {
    use obuilder_stores::docker::{prefix, DockerStore};
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let exec = RecordingExec::new();
    let p = prefix(&dir);
    let hexname = "646c"; // "dl"
    exec.answer(
        &["docker", "volume", "inspect"],
        "/var/lib/docker/volumes/v/_data\n",
    );
    exec.answer(
        &[
            "docker",
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("name={p}-ct-"),
        ],
        &format!("{p}-ct-77-0-{hexname}\n"),
    );
    let store = DockerStore::new(&dir, "docker", Arc::new(exec.clone()));
    let e = store.cache_delete("dl").await.unwrap_err().to_string();
    assert!(e.contains("in use by 1"), "{e}");
    assert!(!exec.argvs().iter().any(|c| c.contains("volume rm")));

    let exec = RecordingExec::new();
    exec.answer(
        &["docker", "volume", "inspect"],
        "/var/lib/docker/volumes/v/_data\n",
    );
    let store = DockerStore::new(&dir, "docker", Arc::new(exec.clone()));
    store.cache_delete("dl").await.unwrap();
    assert_eq!(
        exec.argvs().last().unwrap(),
        &format!("docker volume rm {p}-c-{hexname}")
    );
}
