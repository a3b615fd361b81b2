//! The OCI runtime config for one step, as a pure function of its inputs.
//!
//! Security choices follow OBuilder's runc sandbox, each with its reason beside it. Root in
//! the container is root outside (no user namespace, as OBuilder); what limits it is the
//! capability set, the masked and read-only paths, and the namespaces.

use serde_json::{json, Value};

use obuilder_engine::sandbox::{RunConfig, SandboxError};

use crate::seccomp;

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

/// The hostname every step sees (as OBuilder's).
pub const HOSTNAME: &str = "builder";

/// Limits and filters of a step, from the sandbox's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Make sync calls no-ops (`--fast-sync`).
    pub fast_sync: bool,
    /// The host's `uname -m`, for the seccomp filter.
    pub machine: String,
    /// Most processes and threads a step may have at once (`--max-pids`).
    pub max_pids: Option<u64>,
    /// Most memory a step may use, in bytes (`--max-memory`).
    pub max_memory: Option<u64>,
}

impl Limits {
    /// The limits of a step from a container sandbox's flags, for this host's machine.
    #[cfg(unix)]
    pub fn for_host(fast_sync: bool, max_pids: Option<u64>, max_memory: Option<u64>) -> Limits {
        Limits {
            fast_sync,
            machine: rustix::system::uname()
                .machine()
                .to_string_lossy()
                .into_owned(),
            max_pids,
            max_memory,
        }
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
    limits: &Limits,
) -> Result<Value, SandboxError> {
    let host_network = match c.network.as_slice() {
        [] => false,
        [h] if h == "host" => true,
        other => {
            return Err(SandboxError::Unsupported(format!(
                "unsupported network configuration {other:?}: this sandbox offers an isolated network (no `network` field) or `(network host)`"
            )))
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
    for m in &c.caches {
        // Caches: writable, and without noexec (dune's _build caches run binaries, OBuilder #38).
        mounts.push(mount(
            &m.target,
            "bind",
            &m.host.to_string_lossy(),
            &["rbind", "rprivate", "nosuid", "nodev"],
        ));
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
        // The default filter (keyrings, mounts, kernel modules, …), see `seccomp`.
        "seccomp": seccomp::profile(limits.fast_sync, &limits.machine),
    });
    let mut resources = serde_json::Map::new();
    if let Some(n) = limits.max_pids {
        // A fork bomb stops at the limit instead of taking the host's process table.
        resources.insert("pids".into(), json!({ "limit": n }));
    }
    if let Some(bytes) = limits.max_memory {
        // Past it the kernel's OOM killer ends the step's processes, not the host's.
        resources.insert("memory".into(), json!({ "limit": bytes }));
    }
    if !resources.is_empty() {
        linux["resources"] = Value::Object(resources);
    }
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            // Supplementary groups are cleared (none listed): only uid and gid.
            "user": { "uid": c.user.uid, "gid": c.user.gid },
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
        "hostname": HOSTNAME,
        "mounts": mounts,
        "linux": linux,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use obuilder_engine::sandbox::{CacheMount, SecretMount, UserIds};

    fn cfg(network: &[&str]) -> RunConfig {
        RunConfig {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/src".into(),
            user: UserIds {
                uid: 1000,
                gid: 1001,
            },
            user_name: None,
            network: network.iter().map(|s| s.to_string()).collect(),
            caches: vec![CacheMount {
                host: "/cache/c-x".into(),
                target: "/root/.cache".into(),
            }],
            secrets: vec![SecretMount {
                value: b"s3cret".to_vec(),
                target: "/run/secrets/tok".into(),
            }],
            stdin: false,
        }
    }

    fn limits(fast_sync: bool) -> Limits {
        Limits {
            fast_sync,
            machine: "x86_64".into(),
            max_pids: Some(100),
            max_memory: None,
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
        let v = config(&cfg(&[]), "/r/rootfs", &files(), &limits(false)).unwrap();
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
        assert_eq!(v["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
        assert_eq!(v["linux"]["resources"], json!({"pids": {"limit": 100}}));
    }

    #[test]
    fn host_network_shares_the_namespace_and_resolv_conf_read_only() {
        let v = config(&cfg(&["host"]), "/r/rootfs", &files(), &limits(false)).unwrap();
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
        let e = config(&cfg(&["nat"]), "/r", &files(), &limits(false)).unwrap_err();
        assert!(
            e.to_string()
                .contains("unsupported network configuration [\"nat\"]"),
            "{e}"
        );
    }

    #[test]
    fn secrets_read_only_and_caches_exec() {
        let v = config(&cfg(&[]), "/r", &files(), &limits(false)).unwrap();
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
    fn fast_sync_makes_sync_calls_no_ops_in_the_default_filter() {
        let v = config(&cfg(&[]), "/r", &files(), &limits(true)).unwrap();
        let s = &v["linux"]["seccomp"];
        assert_eq!(s["defaultAction"], "SCMP_ACT_ALLOW");
        assert_eq!(
            s["architectures"],
            json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
        );
        let rules = s["syscalls"].as_array().unwrap();
        assert!(rules[0]["names"]
            .as_array()
            .unwrap()
            .contains(&json!("keyctl")));
        let sync = rules.last().unwrap();
        assert_eq!(sync["errnoRet"], 0);
        assert_eq!(sync["names"].as_array().unwrap().len(), 6);
    }

    #[test]
    fn memory_limit_when_asked() {
        let mut l = limits(false);
        l.max_memory = Some(64 << 20);
        l.max_pids = None;
        let v = config(&cfg(&[]), "/r", &files(), &l).unwrap();
        assert_eq!(
            v["linux"]["resources"],
            json!({"memory": {"limit": 64 << 20}})
        );
    }

    #[test]
    fn masked_and_read_only_paths() {
        let v = config(&cfg(&[]), "/r", &files(), &limits(false)).unwrap();
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
