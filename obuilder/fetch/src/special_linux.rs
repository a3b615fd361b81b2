#![cfg(target_os = "linux")]
//! Device nodes and xattrs on Linux.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::fs::{FileType, Mode, OFlags};

/// Makes device node or fifo `name` in `dir`.
pub fn make_node(
    dir: &OwnedFd,
    name: &str,
    kind: tar::EntryType,
    mode: u32,
    major: u32,
    minor: u32,
) -> rustix::io::Result<()> {
    let ft = if kind.is_fifo() {
        FileType::Fifo
    } else if kind.is_character_special() {
        FileType::CharacterDevice
    } else {
        FileType::BlockDevice
    };
    rustix::fs::mknodat(
        dir,
        name,
        ft,
        Mode::from_raw_mode(mode),
        rustix::fs::makedev(major, minor),
    )
}

/// Sets xattr `key` on `name` in `dir` (not following a symlink): through the `O_PATH`
/// descriptor's `/proc/self/fd` link, so the very inode just made is changed, never
/// whatever a path lookup would find.
pub fn set_xattr_at(dir: &OwnedFd, name: &str, key: &str, value: &[u8]) -> io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let proc = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::setxattr(proc.as_str(), key, value, rustix::fs::XattrFlags::empty())?;
    Ok(())
}
