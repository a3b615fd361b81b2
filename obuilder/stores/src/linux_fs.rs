#![cfg(target_os = "linux")]
//! Which filesystem a path is on (`statfs(2)`'s magic number, Linux only).

use std::path::Path;

/// The filesystem magic of `path`, 0 if it cannot be read.
pub fn magic(path: &Path) -> u64 {
    rustix::fs::statfs(path)
        .map(|s| s.f_type as u64)
        .unwrap_or(0)
}

/// Writes everything of the filesystem holding `path` to its disk and waits for it
/// (`syncfs(2)`: its dirty data, then a commit of its metadata).
pub fn sync_filesystem(path: &Path) -> std::io::Result<()> {
    let dir = std::fs::File::open(path)?;
    rustix::fs::syncfs(&dir)?;
    Ok(())
}
