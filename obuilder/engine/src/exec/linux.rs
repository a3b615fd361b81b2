#![cfg(target_os = "linux")]
//! Children that die with the thread that started them.

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
