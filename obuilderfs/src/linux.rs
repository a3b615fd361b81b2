#![cfg(target_os = "linux")]
//! What only Linux has: `openat2` to open a directory beneath a root without following
//! any symlink (one system call for the whole path), device-free `mknodat`, `renameat2`'s
//! flags and `fallocate`.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;

/// Opens directory `rel` beneath `root`, refusing symlinks and `..` out of it.
pub fn open_dir_beneath(root: impl AsFd, rel: &Path) -> Result<OwnedFd, Errno> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rustix::fs::openat2(
        root,
        rel,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// A regular file, FIFO or socket (never a device: the daemon is root, its callers are
/// not).
pub fn mknod(
    dir: impl AsFd,
    name: &std::ffi::OsStr,
    kind: FileType,
    mode: Mode,
) -> Result<(), Errno> {
    rustix::fs::mknodat(dir, name, kind, mode, 0)
}

pub fn rename(
    from: impl AsFd,
    from_name: &std::ffi::OsStr,
    to: impl AsFd,
    to_name: &std::ffi::OsStr,
    flags: u32,
) -> Result<(), Errno> {
    rustix::fs::renameat_with(
        from,
        from_name,
        to,
        to_name,
        RenameFlags::from_bits_retain(flags),
    )
}

pub fn fallocate(fd: impl AsFd, mode: i32, offset: u64, len: u64) -> Result<(), Errno> {
    rustix::fs::fallocate(
        fd,
        rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
        offset,
        len,
    )
}

/// Detaches the mount at `path` (lazily: open files keep working until closed); no error
/// if it is not mounted any more.
pub fn detach(path: &Path) {
    let _ = rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH);
}

/// fusermount3's auto-unmount helper unmounts a dead daemon's mount only if opening the
/// mount point then fails with ENOTCONN, that is, once the kernel has ended the
/// connection, when the last `/dev/fuse` descriptor is released. A dying process's files
/// are released in the reverse order of their descriptors' numbers (task work runs last
/// queued first), and fuser's `/dev/fuse` descriptor is below the helper's socket: the
/// socket went first, the helper woke, and when its open came before the connection's
/// end it failed otherwise and the mount stayed, dead (10 times in 1 000 `kill -9`s
/// under load here; seen in CI). A second `/dev/fuse` descriptor above every socket,
/// kept until the process ends, makes the connection end first.
pub fn fuse_ends_before_helper_wakes() {
    let mut fuse = None;
    let mut top_socket = None;
    for e in std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        match std::fs::read_link(e.path()) {
            Ok(l) if l == Path::new("/dev/fuse") => fuse = Some(fd),
            Ok(l) if l.to_string_lossy().starts_with("socket:") => {
                top_socket = top_socket.max(Some(fd))
            }
            _ => {}
        }
    }
    if let (Some(fuse), Some(top)) = (fuse, top_socket) {
        // SAFETY: duplicates a descriptor this process holds; the copy is never closed
        // here (the process's end closes it).
        unsafe { libc::fcntl(fuse, libc::F_DUPFD_CLOEXEC, top + 1) };
    }
}

/// `file` opened again, read-write or read-only, through `/proc/self/fd`: the very file
/// the caller opened, never its path again (which may name another file by now).
pub fn reopen(file: &std::fs::File, write: bool) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}
