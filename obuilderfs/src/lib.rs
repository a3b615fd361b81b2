//! obuilderfs: a FUSE filesystem, mounted over a fixed path such as `/usr/local` or a
//! build user's home, that shows each caller the directory its uid's scoreboard entry
//! names (see `resolve`), so that many build users can each have their own Homebrew
//! prefix and home at the same paths at once.

#[cfg(any(target_os = "linux", target_os = "macos"))]
pub mod fs;
#[cfg(target_os = "linux")]
mod linux;
#[cfg(not(target_os = "linux"))]
mod portable;

/// Unmounts `path` if it is still mounted (the session's own unmount can lose a race
/// with a busy mount; this one detaches).
pub fn detach(path: &std::path::Path) {
    #[cfg(target_os = "linux")]
    linux::detach(path);
    #[cfg(not(target_os = "linux"))]
    portable::detach(path);
}

/// After mounting with auto-unmount: makes a `kill -9` of this process end the FUSE
/// connection before the auto-unmount helper hears of it (see the Linux version).
pub fn fuse_ends_before_helper_wakes() {
    #[cfg(target_os = "linux")]
    linux::fuse_ends_before_helper_wakes();
}
pub mod resolve;
