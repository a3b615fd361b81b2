#![cfg_attr(not(target_os = "macos"), allow(dead_code))]
//! The same operations as `linux.rs` where there is no `openat2` (macOS, the BSDs): a
//! directory beneath a root is opened one name at a time, each with `O_NOFOLLOW`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};

use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;

pub fn open_dir_beneath(root: impl AsFd, rel: &Path) -> Result<OwnedFd, Errno> {
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let mut cur = rustix::fs::openat(root, ".", flags, Mode::empty())?;
    for c in rel.components() {
        match c {
            Component::Normal(n) => cur = rustix::fs::openat(&cur, n, flags, Mode::empty())?,
            Component::CurDir => {}
            _ => return Err(Errno::XDEV),
        }
    }
    Ok(cur)
}

pub fn mknod(
    dir: impl AsFd,
    name: &std::ffi::OsStr,
    kind: FileType,
    mode: Mode,
) -> Result<(), Errno> {
    match kind {
        FileType::RegularFile => {
            let flags =
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
            rustix::fs::openat(dir, name, flags, mode).map(drop)
        }
        _ => Err(Errno::NOTSUP),
    }
}

pub fn rename(
    from: impl AsFd,
    from_name: &std::ffi::OsStr,
    to: impl AsFd,
    to_name: &std::ffi::OsStr,
    flags: u32,
) -> Result<(), Errno> {
    if flags != 0 {
        return Err(Errno::INVAL);
    }
    rustix::fs::renameat(from, from_name, to, to_name)
}

pub fn fallocate(_fd: impl AsFd, _mode: i32, _offset: u64, _len: u64) -> Result<(), Errno> {
    Err(Errno::NOTSUP)
}

/// Unmounts `path`; no error if it is not mounted any more.
pub fn detach(path: &std::path::Path) {
    let _ = std::process::Command::new("umount").arg(path).status();
}
