//! The portable resolver: a component walk with `openat(O_NOFOLLOW)`, resolving symlinks
//! itself with the tree as `/`. It keeps a descriptor per level and never opens `..`
//! (it pops a level instead, never above the root), so no symlink or `..` can lead out.
//! Unlike `openat2`, it does not guard against a directory being renamed out of the tree
//! while it walks; the builder only walks trees that nothing else changes at the time.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use super::Follow;

/// As Linux's `MAXSYMLINKS`.
const MAX_LINKS: usize = 40;

fn open_here(dir: &impl AsFd, name: &[u8]) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        std::ffi::OsStr::from_bytes(name),
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

pub fn open_dir(root: &OwnedFd, parts: &[&str], follow: Follow) -> io::Result<OwnedFd> {
    let mut todo: VecDeque<Vec<u8>> = parts.iter().map(|s| s.as_bytes().to_vec()).collect();
    // Directories above the current one, the root first; `cur` is the current one.
    let mut above: Vec<OwnedFd> = Vec::new();
    let mut cur = open_here(root, b".")?;
    let mut links = 0;
    while let Some(part) = todo.pop_front() {
        match part.as_slice() {
            b"" | b"." => continue,
            b".." => {
                // At the root, `..` is the root (as in a chroot).
                if let Some(up) = above.pop() {
                    cur = up;
                }
                continue;
            }
            _ => {}
        }
        match open_here(&cur, &part) {
            Ok(fd) => {
                above.push(std::mem::replace(&mut cur, fd));
            }
            Err(e) => {
                // ELOOP (Linux, macOS) or EMLINK (FreeBSD) for a symlink, ENOTDIR for a
                // file: look at what it is.
                let name = std::ffi::OsStr::from_bytes(&part);
                let st = rustix::fs::statat(&cur, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|_| io::Error::from(e))?;
                if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
                    return Err(e.into());
                }
                if follow == Follow::Never {
                    return Err(rustix::io::Errno::LOOP.into());
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(rustix::io::Errno::LOOP.into());
                }
                let target = rustix::fs::readlinkat(&cur, name, Vec::new())?;
                let target = target.as_bytes();
                if target.starts_with(b"/") {
                    // Absolute: from the tree's root.
                    above.truncate(1);
                    if let Some(r) = above.pop() {
                        cur = r;
                    }
                }
                for p in target.split(|b| *b == b'/').rev() {
                    todo.push_front(p.to_vec());
                }
            }
        }
    }
    Ok(cur)
}
