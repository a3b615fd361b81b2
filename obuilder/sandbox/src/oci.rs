//! The OCI runtime config for one step, as a pure function of its inputs.
//!
//! Security choices follow OBuilder's runc sandbox, each with its reason beside it. Root in
//! the container is root outside (no user namespace, as OBuilder); what limits it is the
//! capability set, the masked and read-only paths, and the namespaces.

use serde_json::{json, Value};

use obuilder_engine::sandbox::RunConfig;

/// Docker's default capability set minus NET_RAW and NET_BIND_SERVICE: enough for package
/// managers (chown, setuid to drop privileges, mknod for /dev in images), nothing that
/// reaches the host (no SYS_ADMIN, NET_ADMIN, SYS_PTRACE, SYS_MODULE).
pub const CAPABILITIES: [&str; 12] = [
    "CAP_CHOWN",        // change file owners (package installs)
    "CAP_DAC_OVERRIDE", // root ignores file permission bits, as on a normal system
    "CAP_FSETID",       // keep set-id bits when changing files
    "CAP_FOWNER",       // chmod/utime files root does not own
    "CAP_MKNOD",        // device nodes inside images (dev package postinst scripts)
    "CAP_SETGID",       // drop to another group (su, sudo, daemons)
    "CAP_SETUID",       // drop to another user
    "CAP_SETFCAP",      // set file capabilities (ping, …) in images
    "CAP_SETPCAP",      // manage its own capability sets
    "CAP_SYS_CHROOT",   // chroot (some build tools)
    "CAP_KILL",         // signal processes of other users in the container
    "CAP_AUDIT_WRITE",  // login tools write audit records
];

/// Kernel interfaces that leak host information or allow host-wide effects.
pub const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// Host-wide kernel settings a build must see but never change.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

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

/// Where the per-run files live on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFiles {
    /// The `/etc/hosts` to bind in (`127.0.0.1 localhost builder`).
    pub hosts: String,
    /// The host's resolver config, bound in for `(network host)`.
    pub resolv_conf: String,
    /// Per-secret files, in the order of `RunConfig::secrets`.
    pub secrets: Vec<String>,
}

fn mount(dst: &str, ty: &str, src: &str, options: &[&str]) -> Value {
    json!({ "destination": dst, "type": ty, "source": src, "options": options })
}

/// seccomp architectures for the host's `uname -m`.
pub fn seccomp_arches(machine: &str) -> Vec<&'static str> {
    match machine {
        "x86_64" => vec!["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64" => vec!["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        _ => vec![],
    }
}

/// The `config.json` for running `c` on `rootfs`.
///
/// Errors only for a network other than isolated (`[]`) or `["host"]`, which runc cannot
/// honour.
pub fn config(
    c: &RunConfig,
    rootfs: &str,
    files: &HostFiles,
    fast_sync: bool,
    machine: &str,
) -> Result<Value, String> {
    let host_network = match c.network.as_slice() {
        [] => false,
        [h] if h == "host" => true,
        other => {
            return Err(format!(
                "unsupported network configuration {other:?}: this sandbox offers an isolated network (no `network` field) or `(network host)`"
            ))
        }
    };
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        // Read-only: a build may inspect the kernel's view but not change it.
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        ),
        mount(
            "/etc/hosts",
            "bind",
            &files.hosts,
            &["rbind", "rprivate", "ro"],
        ),
    ];
    if host_network {
        // Read-only since OBuilder v0.3's security fix: a build must not redirect the host's DNS.
        mounts.push(mount(
            "/etc/resolv.conf",
            "bind",
            &files.resolv_conf,
            &["rbind", "rprivate", "ro"],
        ));
    }
    for (s, src) in c.secrets.iter().zip(&files.secrets) {
        // Secrets: read-only, for this step only, never in the snapshot.
        mounts.push(mount(
            &s.target,
            "bind",
            src,
            &["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"],
        ));
    }
    for m in &c.mounts {
        // Caches: writable, and without noexec (dune's _build caches run binaries, OBuilder #38).
        let mut opts = vec!["rbind", "rprivate", "nosuid", "nodev"];
        if m.readonly {
            opts.push("ro");
        }
        mounts.push(mount(&m.dst, "bind", &m.src.to_string_lossy(), &opts));
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if !host_network {
        // Isolated: a fresh network namespace with only a loopback interface.
        namespaces.insert(0, json!({"type": "network"}));
    }
    let mut linux = json!({
        "namespaces": namespaces,
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
    });
    if fast_sync {
        linux["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": seccomp_arches(machine),
            "syscalls": [{ "names": SYNC_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 0 }],
        });
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": c.uid, "gid": c.gid },
            "args": c.argv,
            "env": c.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "cwd": c.cwd,
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "inheritable": CAPABILITIES,
                "permitted": CAPABILITIES,
            },
            "rlimits": [{ "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 }],
            "noNewPrivileges": false,
        },
        "root": { "path": rootfs, "readonly": false },
        "hostname": c.hostname,
        "mounts": mounts,
        "linux": linux,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use obuilder_engine::sandbox::{BindMount, SecretMount};

    fn cfg(network: &[&str]) -> RunConfig {
        RunConfig {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/src".into(),
            uid: 1000,
            gid: 1001,
            hostname: "builder".into(),
            network: network.iter().map(|s| s.to_string()).collect(),
            mounts: vec![BindMount {
                src: "/cache/c-x".into(),
                dst: "/root/.cache".into(),
                readonly: false,
            }],
            secrets: vec![SecretMount {
                value: b"s3cret".to_vec(),
                target: "/run/secrets/tok".into(),
            }],
        }
    }

    fn files() -> HostFiles {
        HostFiles {
            hosts: "/tmp/r/hosts".into(),
            resolv_conf: "/etc/resolv.conf".into(),
            secrets: vec!["/tmp/r/secret-0".into()],
        }
    }

    fn mount_dsts(v: &Value) -> Vec<String> {
        v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn isolated_network_by_default() {
        let v = config(&cfg(&[]), "/r/rootfs", &files(), false, "x86_64").unwrap();
        assert_eq!(v["linux"]["namespaces"][0]["type"], "network");
        assert!(!mount_dsts(&v).contains(&"/etc/resolv.conf".to_string()));
        assert_eq!(v["process"]["user"], json!({"uid": 1000, "gid": 1001}));
        assert_eq!(v["process"]["env"], json!(["PATH=/bin"]));
        assert_eq!(v["process"]["cwd"], "/src");
        assert_eq!(v["hostname"], "builder");
        assert_eq!(v["root"], json!({"path": "/r/rootfs", "readonly": false}));
        assert_eq!(
            v["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            12
        );
        assert!(v["linux"].get("seccomp").is_none());
    }

    #[test]
    fn host_network_shares_the_namespace_and_resolv_conf_read_only() {
        let v = config(&cfg(&["host"]), "/r/rootfs", &files(), false, "x86_64").unwrap();
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount"]);
        let resolv = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/etc/resolv.conf")
            .unwrap();
        assert!(resolv["options"].as_array().unwrap().contains(&json!("ro")));
    }

    #[test]
    fn other_networks_are_refused() {
        let e = config(&cfg(&["nat"]), "/r", &files(), false, "x86_64").unwrap_err();
        assert!(
            e.contains("unsupported network configuration [\"nat\"]"),
            "{e}"
        );
    }

    #[test]
    fn secrets_read_only_and_caches_exec() {
        let v = config(&cfg(&[]), "/r", &files(), false, "x86_64").unwrap();
        let ms = v["mounts"].as_array().unwrap();
        let secret = ms
            .iter()
            .find(|m| m["destination"] == "/run/secrets/tok")
            .unwrap();
        assert_eq!(secret["source"], "/tmp/r/secret-0");
        assert!(secret["options"].as_array().unwrap().contains(&json!("ro")));
        let cache = ms
            .iter()
            .find(|m| m["destination"] == "/root/.cache")
            .unwrap();
        assert!(!cache["options"]
            .as_array()
            .unwrap()
            .contains(&json!("noexec")));
        assert!(!cache["options"].as_array().unwrap().contains(&json!("ro")));
        assert!(
            !v.to_string().contains("s3cret"),
            "secret values never enter the config"
        );
    }

    #[test]
    fn fast_sync_makes_sync_calls_no_ops() {
        let v = config(&cfg(&[]), "/r", &files(), true, "x86_64").unwrap();
        let s = &v["linux"]["seccomp"];
        assert_eq!(s["defaultAction"], "SCMP_ACT_ALLOW");
        assert_eq!(
            s["architectures"],
            json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
        );
        assert_eq!(s["syscalls"][0]["errnoRet"], 0);
        assert_eq!(s["syscalls"][0]["names"].as_array().unwrap().len(), 6);
    }

    #[test]
    fn masked_and_read_only_paths() {
        let v = config(&cfg(&[]), "/r", &files(), false, "x86_64").unwrap();
        assert!(v["linux"]["maskedPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/kcore")));
        assert!(v["linux"]["readonlyPaths"]
            .as_array()
            .unwrap()
            .contains(&json!("/proc/sys")));
        assert_eq!(v["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
    }
}
