#![cfg(target_os = "linux")]
//! Real filesystems on loopback files (Linux loop devices).

use std::path::{Path, PathBuf};

use crate::run;

/// A filesystem on a loopback file, mounted for the test and cleaned up on drop.
pub struct LoopFs {
    pub mnt: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// `kind`: `btrfs`, `xfs` (with reflinks), `xfs-noreflink` or `ext4`. Sizes in MiB
    /// (XFS needs 300 at least).
    pub fn new(kind: &str, size_mib: u64) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("obuilder-loopfs-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        let image = dir.path().join(format!("{kind}.img"));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size_mib * 1024 * 1024).unwrap();
        drop(f);
        let img = image.to_str().unwrap();
        match kind {
            "btrfs" => run(&["mkfs.btrfs", "-q", img]),
            "xfs" => run(&["mkfs.xfs", "-q", "-m", "reflink=1", img]),
            "xfs-noreflink" => run(&["mkfs.xfs", "-q", "-m", "reflink=0", img]),
            "ext4" => run(&["mkfs.ext4", "-q", "-F", img]),
            other => panic!("unknown loop fs kind {other}"),
        }
        .expect("mkfs");
        run(&["mount", "-o", "loop", img, mnt.to_str().unwrap()]).expect("mount loop fs");
        LoopFs {
            mnt,
            image,
            _dir: dir,
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        // Anything a failed test left mounted below us goes first.
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let mut below: Vec<&str> = info
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| {
                    m.starts_with(self.mnt.to_str().unwrap_or("\0")) && Path::new(m) != self.mnt
                })
                .collect();
            below.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in below {
                let _ = run(&["umount", "-l", m]);
            }
        }
        if run(&["umount", self.mnt.to_str().unwrap()]).is_err() {
            let _ = run(&["umount", "-l", self.mnt.to_str().unwrap()]);
        }
        let _ = std::fs::remove_file(&self.image);
    }
}
