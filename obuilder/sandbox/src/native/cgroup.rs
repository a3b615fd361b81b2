#![cfg(target_os = "linux")]
//! A cgroup per step, where the host lets the builder make one: the step's limits (pids,
//! memory), its devices allow-list, and a way to kill all its processes at once.
//!
//! Each hierarchy is used where it is mounted: cgroup v1 controllers (`pids`, `memory`,
//! `devices`) and the v2 tree (`cgroup.kill`, and `pids.max`/`memory.max` when those
//! controllers are enabled for the builder's cgroup). A step's cgroup is a child of the
//! builder's own in each hierarchy, named `obuilder-n-PID-N`, so host limits on the
//! builder still hold for its steps. Without any, the step's pid namespace still ends
//! every process of the step with its first one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The devices a step may open, as runc's default allow-list: the standard nodes, the
/// terminals, `/dev/net/tun`; and `mknod` of anything (package scripts make nodes), which
/// cannot then be opened.
const DEVICES_ALLOW: [&str; 12] = [
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",    // null
    "c 1:5 rwm",    // zero
    "c 1:7 rwm",    // full
    "c 1:8 rwm",    // random
    "c 1:9 rwm",    // urandom
    "c 5:0 rwm",    // tty
    "c 5:1 rwm",    // console
    "c 5:2 rwm",    // ptmx
    "c 136:* rwm",  // pts
    "c 10:200 rwm", // net/tun
];

/// Where this process's cgroups are, per hierarchy.
#[derive(Debug, Default, Clone)]
struct Hierarchies {
    /// (controller, the builder's cgroup directory)
    v1: Vec<(&'static str, PathBuf)>,
    v2: Option<PathBuf>,
}

fn hierarchies() -> &'static Hierarchies {
    static H: OnceLock<Hierarchies> = OnceLock::new();
    H.get_or_init(|| {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        find(&mountinfo, &own)
    })
}

/// The builder's cgroup directories, from `/proc/self/mountinfo` and `/proc/self/cgroup`.
fn find(mountinfo: &str, own: &str) -> Hierarchies {
    let mut h = Hierarchies::default();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let (root, mnt, fstype, opts) = (l[3], l[4], r[0], r[2]);
        // The path of this process's cgroup, relative to the mount's root.
        let place = |path: &str| -> Option<PathBuf> {
            let rel = path.strip_prefix(root.trim_end_matches('/'))?;
            Some(Path::new(mnt).join(rel.trim_start_matches('/')))
        };
        if fstype == "cgroup2" && h.v2.is_none() {
            if let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) {
                h.v2 = place(path);
            }
        } else if fstype == "cgroup" {
            for ctrl in ["pids", "memory", "devices"] {
                if !opts.split(',').any(|o| o == ctrl) || h.v1.iter().any(|(c, _)| *c == ctrl) {
                    continue;
                }
                let path = own.lines().find_map(|l| {
                    let mut f = l.splitn(3, ':');
                    let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
                    ctrls.split(',').any(|c| c == ctrl).then_some(path)
                });
                if let Some(dir) = path.and_then(place) {
                    h.v1.push((ctrl, dir));
                }
            }
        }
    }
    h
}

/// One step's cgroups.
#[derive(Debug, Default)]
pub struct StepCgroups {
    dirs: Vec<PathBuf>,
    v2: Option<PathBuf>,
}

/// A limit the host's cgroups could not apply, for the step's log.
pub type Unapplied = Vec<String>;

impl StepCgroups {
    /// Makes the step's cgroups and sets their limits. What cannot be made is left out
    /// (and a requested limit that could not be set is returned, to be said).
    pub fn create(
        name: &str,
        max_pids: Option<u64>,
        max_memory: Option<u64>,
    ) -> (StepCgroups, Unapplied) {
        let h = hierarchies();
        let mut cg = StepCgroups::default();
        let mut pids_set = false;
        let mut memory_set = false;
        for (ctrl, parent) in &h.v1 {
            // Joining a v1 memory cgroup costs ~9 ms (the kernel waits for an RCU grace
            // period): only when there is a limit to enforce.
            if *ctrl == "memory" && max_memory.is_none() {
                continue;
            }
            let dir = parent.join(name);
            if std::fs::create_dir(&dir).is_err() {
                continue;
            }
            cg.dirs.push(dir.clone());
            match *ctrl {
                "pids" => {
                    if let Some(n) = max_pids {
                        pids_set = std::fs::write(dir.join("pids.max"), n.to_string()).is_ok();
                    }
                }
                "memory" => {
                    if let Some(b) = max_memory {
                        memory_set =
                            std::fs::write(dir.join("memory.limit_in_bytes"), b.to_string())
                                .is_ok();
                    }
                }
                "devices" => {
                    let _ = std::fs::write(dir.join("devices.deny"), "a");
                    // One rule per write, all through one descriptor.
                    if let Ok(mut f) = std::fs::OpenOptions::new()
                        .write(true)
                        .open(dir.join("devices.allow"))
                    {
                        for rule in DEVICES_ALLOW {
                            let _ = std::io::Write::write(&mut f, rule.as_bytes());
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(parent) = &h.v2 {
            let dir = parent.join(name);
            if std::fs::create_dir(&dir).is_ok() {
                if let (Some(n), false) = (max_pids, pids_set) {
                    pids_set = std::fs::write(dir.join("pids.max"), n.to_string()).is_ok();
                }
                if let (Some(b), false) = (max_memory, memory_set) {
                    memory_set = std::fs::write(dir.join("memory.max"), b.to_string()).is_ok();
                }
                cg.v2 = Some(dir);
            }
        }
        let mut unapplied = Vec::new();
        if max_pids.is_some() && !pids_set {
            unapplied.push("--max-pids (no pids cgroup controller available here)".into());
        }
        if max_memory.is_some() && !memory_set {
            unapplied.push("--max-memory (no memory cgroup controller available here)".into());
        }
        (cg, unapplied)
    }

    /// Puts process `pid` (not yet running the step's command) in every cgroup.
    pub fn add(&self, pid: i32) -> io::Result<()> {
        for dir in self.dirs.iter().chain(self.v2.iter()) {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Kills every process in the step's cgroups.
    pub fn kill(&self) {
        if let Some(v2) = &self.v2 {
            if std::fs::write(v2.join("cgroup.kill"), "1").is_ok() {
                return;
            }
        }
        for dir in self.dirs.iter().chain(self.v2.iter()) {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    /// Removes the cgroups once their processes are gone (retrying while the kernel
    /// finishes taking the last ones out).
    pub fn remove(&self) {
        for dir in self.dirs.iter().chain(self.v2.iter()) {
            for _ in 0..100 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(_) => {
                        self.kill();
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        }
    }
}

/// Whether `pid` is a live process (not a thread id, not a zombie).
fn builder_alive(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    field("Tgid:") == pid.to_string() && !field("State:").starts_with('Z')
}

/// Removes the cgroups of steps whose builder died (`obuilder-n-PID-N` with no process
/// PID), killing what is left in them.
pub fn remove_stale() {
    let h = hierarchies();
    let parents = h.v1.iter().map(|(_, d)| d.clone()).chain(h.v2.clone());
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("obuilder-n-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            if builder_alive(pid) {
                continue;
            }
            let cg = StepCgroups {
                dirs: vec![e.path()],
                ..StepCgroups::default()
            };
            cg.kill();
            cg.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_v1_and_v2_places() {
        let mountinfo = "\
35 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:13 - cgroup cgroup rw,memory
36 25 0:31 / /sys/fs/cgroup/pids rw,relatime shared:14 - cgroup cgroup rw,pids
37 25 0:32 / /sys/fs/cgroup/cpu rw,relatime shared:15 - cgroup cgroup rw,cpu
38 25 0:33 / /sys/fs/cgroup/unified rw,relatime shared:16 - cgroup2 cgroup2 rw
";
        let own = "4:memory:/ci/job1\n8:pids:/\n1:cpu:/\n0::/\n";
        let h = find(mountinfo, own);
        assert_eq!(
            h.v1,
            vec![
                ("memory", PathBuf::from("/sys/fs/cgroup/memory/ci/job1")),
                ("pids", PathBuf::from("/sys/fs/cgroup/pids/")),
            ]
        );
        assert_eq!(h.v2, Some(PathBuf::from("/sys/fs/cgroup/unified/")));
    }

    #[test]
    fn a_namespaced_mount_root_is_taken_off() {
        let mountinfo =
            "30 25 0:27 /system.slice/x.service /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let h = find(mountinfo, "0::/system.slice/x.service/sub\n");
        assert_eq!(h.v2, Some(PathBuf::from("/sys/fs/cgroup/sub")));
        assert!(h.v1.is_empty());
    }
}
