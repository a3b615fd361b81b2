#![cfg(target_os = "linux")]
//! The Linux resolver: one `openat2(2)` with `RESOLVE_IN_ROOT` (Linux ≥ 5.6), which the
//! kernel keeps inside the tree even against renames racing with the lookup.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::OnceLock;

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::Follow;

/// Whether this kernel has `openat2` (checked once).
pub fn available() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        !matches!(
            rustix::fs::openat2(
                rustix::fs::CWD,
                ".",
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::empty(),
            ),
            Err(rustix::io::Errno::NOSYS)
        )
    })
}

pub fn open_dir(root: &OwnedFd, parts: &[&str], follow: Follow) -> io::Result<OwnedFd> {
    let rel = if parts.is_empty() {
        ".".to_string()
    } else {
        parts.join("/")
    };
    // NO_MAGICLINKS: a `/proc/self/fd/N` style link inside an image must not lead out.
    let mut how = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    if follow == Follow::Never {
        how |= ResolveFlags::NO_SYMLINKS;
    }
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(
            root.as_fd(),
            rel.as_str(),
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        ) {
            // The kernel saw a rename race and refused to guess: look again.
            Err(rustix::io::Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r.map_err(Into::into),
        }
    }
}
