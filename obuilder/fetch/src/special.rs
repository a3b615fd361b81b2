//! What layer extraction needs beyond plain files, per platform: device nodes and fifos,
//! and extended attributes set through a descriptor (never a path lookup).

#[cfg(not(target_os = "linux"))]
use std::io;
#[cfg(not(target_os = "linux"))]
use std::os::fd::OwnedFd;

#[cfg(target_os = "linux")]
pub use crate::special_linux::{make_node, set_xattr_at};

/// Device nodes and fifos cannot be made here: macOS has no `mknodat`, and base images
/// for it hold none that a build needs.
#[cfg(not(target_os = "linux"))]
pub fn make_node(
    _dir: &OwnedFd,
    _name: &str,
    _kind: tar::EntryType,
    _mode: u32,
    _major: u32,
    _minor: u32,
) -> rustix::io::Result<()> {
    Ok(())
}

/// Extended attributes are skipped where no descriptor-based call exists.
#[cfg(not(target_os = "linux"))]
pub fn set_xattr_at(_dir: &OwnedFd, _name: &str, _key: &str, _value: &[u8]) -> io::Result<()> {
    Ok(())
}
