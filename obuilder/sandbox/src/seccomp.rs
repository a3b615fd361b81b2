//! The default seccomp filter of every step, in the OCI runtime config's form.
//!
//! Root in a step is root outside (no user namespace, as OBuilder), so what a step may ask
//! of the kernel is limited by capabilities, masked paths, namespaces, and this filter.
//! It follows Docker's default profile where that matters for a build machine: a denylist
//! (every other call is allowed) of the calls that reach state shared with the host or
//! widen the kernel's attack surface, each with its reason. Calls unknown on the host's
//! architecture are skipped by runc. With `--fast-sync` the sync calls are added as no-ops
//! in the same filter.

use serde_json::{json, Value};

/// `EPERM`: what a denied call returns (as for a missing capability).
pub const EPERM: i64 = 1;
/// `ENOSYS`: makes glibc fall back from `clone3` to `clone`, whose flags can be filtered.
pub const ENOSYS: i64 = 38;
/// `CLONE_NEWUSER`.
pub const CLONE_NEWUSER: u64 = 0x1000_0000;

/// Denied calls, each with why.
pub const DENIED: &[(&str, &str)] = &[
    // The kernel keyring is not namespaced: a step could read and add keys of the host's
    // root (its user keyring, credentials of NFS, CIFS, Kerberos, dm-crypt).
    ("keyctl", "reads and changes the host's kernel keyrings"),
    ("add_key", "adds keys to the host's kernel keyrings"),
    ("request_key", "asks the host's key services for keys"),
    // Observability and programmable kernel hooks: host-wide information and attack surface.
    (
        "perf_event_open",
        "profiles the whole host; a frequent kernel exploit vector",
    ),
    ("bpf", "loads programs into the kernel"),
    ("userfaultfd", "a common building block of kernel exploits"),
    (
        "io_uring_setup",
        "a large kernel attack surface (Docker denies it too)",
    ),
    (
        "io_uring_enter",
        "a large kernel attack surface (Docker denies it too)",
    ),
    (
        "io_uring_register",
        "a large kernel attack surface (Docker denies it too)",
    ),
    // Mounts and namespaces: the step's view of the filesystem is set up by the sandbox.
    ("mount", "mounts are the sandbox's to make"),
    ("umount", "mounts are the sandbox's to remove"),
    ("umount2", "mounts are the sandbox's to remove"),
    ("pivot_root", "changes the root the sandbox set up"),
    (
        "move_mount",
        "the new mount API: mounts are the sandbox's to make",
    ),
    (
        "open_tree",
        "the new mount API: mounts are the sandbox's to make",
    ),
    (
        "fsopen",
        "the new mount API: mounts are the sandbox's to make",
    ),
    (
        "fsconfig",
        "the new mount API: mounts are the sandbox's to make",
    ),
    (
        "fsmount",
        "the new mount API: mounts are the sandbox's to make",
    ),
    (
        "fspick",
        "the new mount API: mounts are the sandbox's to make",
    ),
    ("setns", "joins another namespace, possibly the host's"),
    // Files by handle bypass the mount namespace (the "shocker" escape).
    (
        "open_by_handle_at",
        "opens host files by handle, past the sandbox's root",
    ),
    ("name_to_handle_at", "makes handles for open_by_handle_at"),
    // The host's clock, power, swap, modules and kernel.
    ("clock_settime", "sets the host's clock"),
    ("clock_adjtime", "adjusts the host's clock"),
    ("settimeofday", "sets the host's clock"),
    ("stime", "sets the host's clock"),
    ("reboot", "reboots the host or loads a new kernel"),
    ("kexec_load", "loads a new kernel"),
    ("kexec_file_load", "loads a new kernel"),
    ("init_module", "loads kernel modules"),
    ("finit_module", "loads kernel modules"),
    ("delete_module", "unloads kernel modules"),
    ("create_module", "obsolete module call"),
    ("get_kernel_syms", "obsolete module call"),
    ("query_module", "obsolete module call"),
    ("swapon", "changes the host's swap"),
    ("swapoff", "changes the host's swap"),
    ("acct", "switches the host's process accounting"),
    ("quotactl", "changes the host's disk quotas"),
    ("lookup_dcookie", "kernel profiling internals"),
    ("nfsservctl", "obsolete NFS server control"),
    (
        "_sysctl",
        "obsolete sysctl that bypasses /proc/sys being read-only",
    ),
    ("sysfs", "obsolete filesystem type queries"),
    ("ustat", "obsolete filesystem statistics"),
    ("uselib", "obsolete library loading, past exploits"),
    // Raw hardware access.
    ("iopl", "raw I/O port access"),
    ("ioperm", "raw I/O port access"),
    ("vm86", "virtual 8086 mode, past exploits"),
    ("vm86old", "virtual 8086 mode, past exploits"),
    // Comparing kernel objects of other processes.
    ("kcmp", "inspects other processes' kernel objects"),
    // NUMA policy: host-wide memory placement (Docker denies it without CAP_SYS_NICE).
    ("mbind", "host memory placement"),
    ("set_mempolicy", "host memory placement"),
    ("get_mempolicy", "host memory placement"),
    ("move_pages", "moves other processes' memory between nodes"),
];

/// Calls whose flags must not ask for a new user namespace, with the argument holding them.
/// A user namespace gives its creator every capability inside it: the way to most kernel
/// privilege escalations. Namespaces a step may need otherwise (none by default) would
/// need capabilities it lacks anyway.
pub const NO_NEW_USERNS: &[(&str, u32)] = &[("unshare", 0), ("clone", 0)];

/// Made to fail with `ENOSYS` so callers fall back to `clone`, whose flags the filter can
/// see (`clone3` passes them in memory, out of a filter's reach), as Docker does.
pub const UNFILTERABLE: &[&str] = &["clone3"];

/// Sync calls that `--fast-sync` turns into no-ops (they are slow on btrfs, and a build's
/// durability comes from the snapshot commit, not from each fsync).
pub const SYNC_SYSCALLS: [&str; 6] = [
    "fsync",
    "fdatasync",
    "msync",
    "sync",
    "syncfs",
    "sync_file_range",
];

/// seccomp architectures for the host's `uname -m`.
pub fn arches(machine: &str) -> Vec<&'static str> {
    match machine {
        "x86_64" => vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64" => vec!["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        _ => vec![],
    }
}

/// The `linux.seccomp` object of a step's config.
pub fn profile(fast_sync: bool, machine: &str) -> Value {
    let denied: Vec<&str> = DENIED.iter().map(|(name, _)| *name).collect();
    let mut syscalls = vec![json!({
        "names": denied,
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": EPERM,
    })];
    for (name, arg) in NO_NEW_USERNS {
        syscalls.push(json!({
            "names": [name],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{
                "index": arg,
                "value": CLONE_NEWUSER,
                "valueTwo": CLONE_NEWUSER,
                "op": "SCMP_CMP_MASKED_EQ",
            }],
        }));
    }
    syscalls.push(json!({
        "names": UNFILTERABLE,
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": ENOSYS,
    }));
    if fast_sync {
        syscalls.push(json!({
            "names": SYNC_SYSCALLS,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 0,
        }));
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": arches(machine),
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_has_a_reason_and_appears_once() {
        let mut names: Vec<&str> = DENIED.iter().map(|(n, _)| *n).collect();
        for (n, why) in DENIED {
            assert!(!why.is_empty(), "{n}");
        }
        names.sort();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
        for must in [
            "keyctl",
            "add_key",
            "request_key",
            "perf_event_open",
            "bpf",
            "mount",
            "setns",
            "open_by_handle_at",
        ] {
            assert!(names.contains(&must), "{must}");
        }
    }

    #[test]
    fn the_profile_composes_with_fast_sync() {
        let p = profile(false, "x86_64");
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        let rules = p["syscalls"].as_array().unwrap();
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[1]["names"], json!(["unshare"]));
        assert_eq!(rules[1]["args"][0]["value"], CLONE_NEWUSER);
        assert_eq!(rules[3]["errnoRet"], ENOSYS);
        let fast = profile(true, "x86_64");
        let rules = fast["syscalls"].as_array().unwrap();
        assert_eq!(rules.len(), 5);
        assert_eq!(rules[4]["errnoRet"], 0);
        assert_eq!(rules[4]["names"].as_array().unwrap().len(), 6);
    }
}
