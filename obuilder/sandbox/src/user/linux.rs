#![cfg(target_os = "linux")]
//! Whether obuilderfs is mounted on a path, from the mount table.

use std::path::Path;

use super::MountState;

/// `scoreboard`: the one an obuilderfs mounted there must serve to be ours (`None`: any).
pub(crate) fn mount_state(path: &Path, scoreboard: Option<&Path>) -> MountState {
    if let Err(e) = std::fs::metadata(path) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            return MountState::Stale;
        }
    }
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return MountState::None;
    };
    let want = path.to_string_lossy();
    let mut found = MountState::None;
    for line in info.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPEROPTS
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 5 || unescape_mountinfo(fields[4]) != want {
            continue;
        }
        let mut tail = line.split(" - ").nth(1).unwrap_or("").split(' ');
        let fstype = tail.next().unwrap_or("");
        let source = unescape_mountinfo(tail.next().unwrap_or(""));
        // The last mount on a path is the one seen. An obuilderfs names the scoreboard it
        // serves as its source (an older one, or a path with a comma, says just
        // `obuilderfs`, which cannot be told apart).
        found = match (fstype, scoreboard) {
            ("fuse.obuilderfs", Some(sb))
                if source != "obuilderfs" && source != format!("obuilderfs:{}", sb.display()) =>
            {
                MountState::Foreign(source)
            }
            ("fuse.obuilderfs", _) => MountState::Ours,
            _ => MountState::Other(fstype.to_string()),
        };
    }
    found
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}
