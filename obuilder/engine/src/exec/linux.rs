#![cfg(target_os = "linux")]
//! Children that die with the thread that started them; descriptors that no child gets.

use std::os::unix::process::CommandExt;

/// Asks the kernel to SIGKILL the child when the thread that forked it exits (which, for
/// `run_to_end`, is when the whole process dies).
pub fn die_with_parent(c: &mut std::process::Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: prctl and getppid are async-signal-safe and touch nothing of the parent's.
    unsafe {
        c.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the request was made.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the builder died"));
            }
            Ok(())
        });
    }
}

/// Marks every descriptor from 3 up close-on-exec in one `close_range` call; false where
/// the kernel refuses it (before Linux 5.11). One system call, no allocation: a forked
/// child may call it (the native sandbox's does, before `execve`).
pub fn cloexec_above_stdio() -> bool {
    // SAFETY: a system call on this process's own descriptor table.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
    }
}

/// [`super::seal_inherited_descriptors`] on Linux: one `close_range` call from 5.11,
/// else each descriptor `/proc/self/fd` lists.
pub fn seal_inherited_descriptors() {
    if !cloexec_above_stdio() {
        super::cloexec_listed("/proc/self/fd");
    }
}
