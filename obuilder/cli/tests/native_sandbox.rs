#![cfg(target_os = "linux")]
//! The native sandbox against the runc sandbox, for real: the same probe in both, compared
//! property by property; the escapes a reviewer would try, in both; nothing outliving a
//! step however it ends; and clear errors for commands that cannot start.

// Tests drive the real binary and tools directly.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use testkit::e2e::{
    caps, eventually, native_cgroup_left, process_alive, start_until, text, Env, SANDBOXES,
};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_obuilder")
}

/// Prints one `KEY=value` line per property of the container the step runs in.
const PROBE: &str = r#"
p() { printf '%s=%s\n' "$1" "$(echo "$2" | tr '\n\t' '  ')"; }
p id "$(id)"
p groups "$(grep '^Groups' /proc/self/status)"
p caps "$(grep '^Cap' /proc/self/status)"
p no-new-privs "$(grep '^NoNewPrivs' /proc/self/status)"
p seccomp "$(grep '^Seccomp:' /proc/self/status)"
p pid "$$ $(cut -d' ' -f4 /proc/self/stat)"
p processes "$(ls -d /proc/[0-9]* 2>/dev/null | wc -l)"
p hostname "$(hostname)"
p hosts "$(cat /etc/hosts)"
p hosts-writable "$(echo x 2>&1 >> /etc/hosts || echo refused)"
p resolv "$(head -c 200 /etc/resolv.conf 2>&1)"
p cwd "$(pwd)"
p umask "$(umask) $(rm -f /tmp/new; touch /tmp/new; stat -c %a /tmp/new)"
p root-mode "$(stat -c %a /)"
p env "$(env | sort)"
p nofile "$(ulimit -n) $(ulimit -Hn)"
p net-devices "$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort)"
p lo-flags "$(cat /sys/class/net/lo/flags)"
p mounts "$(awk '{print $5, $6}' /proc/self/mountinfo | grep -v '^/sys/fs/cgroup' | sort)"
p kernel-fs "$(awk '$5 ~ /^\/(proc|dev|sys)/ && $5 !~ /cgroup/ {print $5, $(NF-2)}' /proc/self/mountinfo | sort)"
p dev "$(for f in /dev/* /dev/pts/* /dev/shm /dev/mqueue; do printf '%s ' "$f"; stat -c '%F %a %u %g %t:%T' "$f"; done)"
p dev-links "$(for f in /dev/fd /dev/stdin /dev/stdout /dev/stderr /dev/ptmx; do printf '%s>%s ' $f $(readlink $f); done)"
p masked "$(wc -c < /proc/kcore) $(ls -A /proc/acpi | wc -l) $(ls -A /sys/firmware | wc -l) $(cat /proc/keys 2>&1 | wc -c)"
p proc-sys "$(echo 1 2>&1 > /proc/sys/vm/drop_caches || echo refused)"
p sysrq "$(echo h 2>&1 > /proc/sysrq-trigger || echo refused)"
p sys "$(touch /sys/kernel/x 2>&1 || echo refused)"
p root "$(ls /)"
p tmp "$(stat -c '%a %u' /tmp)"
p secret "$(stat -c '%a %u %g' /run/secrets/tok) $(cat /run/secrets/tok) $(echo x 2>&1 > /run/secrets/tok || echo refused)"
p cache "$(mkdir -p /cache/$(id -u) && cp /bin/busybox /cache/$(id -u)/busybox && /cache/$(id -u)/busybox true && echo writable-and-exec)"
"#;

fn properties(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !k.contains(' ') && !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

/// Runs the probe as root and as uid 1000 with a cache and a secret; returns the
/// properties of each run.
fn probe(sandbox: &str, network_host: bool) -> Vec<BTreeMap<String, String>> {
    let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
    std::fs::write(env.ctx.join("probe.sh"), PROBE).unwrap();
    let secret = env.tmp.path().join("tok");
    std::fs::write(&secret, "s3cret-value").unwrap();
    let network = if network_host { "(network host)" } else { "" };
    let step = |user: &str| {
        format!(
            "(run {network} (cache (c (target /cache))) (secrets (tok (target /run/secrets/tok))) \
             (shell \"printf '%s%s\\n' @@ {user}; sh /src/probe.sh\"))"
        )
    };
    let spec = env.spec(
        "probe.spec",
        &format!(
            "((from busybox) (shell /bin/sh -c) (workdir /src) (env FOO \"a b\")\n \
             (copy (src probe.sh) (dst /src/probe.sh))\n \
             (run (shell \"chmod 1777 /src\"))\n \
             {}\n (user (uid 1000) (gid 1000))\n {})",
            step("root"),
            step("user")
        ),
    );
    // Started under a umask of 077: the step's must not depend on it.
    let mut cmd = env.command(&[
        "build",
        "-f",
        spec.to_str().unwrap(),
        env.ctx.to_str().unwrap(),
        "--secret",
        &format!("tok:{}", secret.display()),
    ]);
    testkit::e2e::with_umask(&mut cmd, 0o077);
    let out = cmd.output().unwrap();
    let o = text(&out.stdout);
    assert!(out.status.success(), "{sandbox}: {o}{}", text(&out.stderr));
    // Each run's output starts with a line `@@root` or `@@user`.
    let mut runs = Vec::new();
    let mut cur: Option<String> = None;
    for line in o.lines() {
        if line.starts_with("@@") {
            runs.extend(cur.take().map(|t| properties(&t)));
            cur = Some(String::new());
        } else if let Some(t) = &mut cur {
            t.push_str(line);
            t.push('\n');
        }
    }
    runs.extend(cur.map(|t| properties(&t)));
    assert_eq!(runs.len(), 2, "{sandbox}: {o}");
    env.assert_clean();
    runs
}

/// Every property of the runc sandbox's container, the native one's too: namespaces,
/// loopback, pivot_root, /proc /dev /sys and their options, masks, read-only paths,
/// capabilities, no_new_privs, seccomp, rlimits, hostname, /etc/hosts, resolv.conf with
/// the host's network, caches, secrets, user and groups, cwd, umask and env.
#[test]
fn the_native_container_is_the_runc_container_property_by_property() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for network_host in [false, true] {
        let runc = probe("runc", network_host);
        let native = probe("native", network_host);
        for (who, (r, n)) in ["root", "uid 1000"].iter().zip(runc.iter().zip(&native)) {
            assert!(r.len() >= 25, "{r:?}");
            for (key, want) in r {
                // The number of processes a step sees includes runc's own init for a
                // moment; both see only their own namespace's.
                if key == "processes" {
                    continue;
                }
                assert_eq!(
                    n.get(key),
                    Some(want),
                    "{who}, network host {network_host}: property {key} differs"
                );
            }
            let only = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
                a.iter()
                    .filter(|(k, _)| !b.contains_key(*k))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                r.len(),
                n.len(),
                "{who}, network host {network_host}: only in runc's {:?}, only in native's {:?}",
                only(r, n),
                only(n, r)
            );
        }
        // A few values spelled out, so that "equal" is not "equally broken".
        let root = &native[0];
        // `$$` is 1; the probe's `cut` is a child of it.
        assert_eq!(
            root["pid"], "1 1",
            "the command is its pid namespace's first process"
        );
        assert_eq!(root["hostname"], "builder");
        assert_eq!(root["no-new-privs"], "NoNewPrivs: 0");
        // The 12 capabilities of oci::CAPABILITIES, in every set but the ambient one.
        assert_eq!(
            root["caps"].matches("00000000a80401fb").count(),
            4,
            "{}",
            root["caps"]
        );
        assert!(root["proc-sys"].contains("refused") && root["sys"].contains("refused"));
        assert!(
            // (the value itself is masked in the log)
            root["secret"].starts_with("400 0 0 ***"),
            "{}",
            root["secret"]
        );
        assert!(root["secret"].ends_with("refused"), "{}", root["secret"]);
        assert_eq!(native[1]["secret"].split(' ').nth(1), Some("1000"));
        assert!(root["cache"].ends_with("writable-and-exec"));
        assert_eq!(root["cwd"], "/src");
        // runc's umask, whatever the builder's (077 here); and the tree's root, which the
        // store made and no layer entry sets, as a base image has it.
        assert_eq!(root["umask"], "0022 644");
        assert_eq!(root["root-mode"], "755");
        assert!(
            native[1]["id"].starts_with("uid=1000 gid=1000"),
            "{}",
            native[1]["id"]
        );
        // A non-root user's command keeps only the inheritable and bounding sets.
        assert_eq!(
            native[1]["caps"].matches("0000000000000000").count(),
            3,
            "{}",
            native[1]["caps"]
        );
        if network_host {
            assert_ne!(root["net-devices"], "lo", "the host's interfaces");
        } else {
            assert_eq!(root["net-devices"], "lo");
            assert_eq!(root["lo-flags"], "0x9", "loopback up");
        }
    }
}

/// Every store kind gives the native sandbox a tree it can pivot into (a btrfs subvolume,
/// an overlay mount, a reflinked or rsynced directory): a copy, a cached step and a cache
/// mount, built twice (the second fully cached).
#[test]
fn the_native_sandbox_runs_on_every_store() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for kind in testkit::e2e::STORES {
        if !testkit::require(module_path!(), &testkit::e2e::store_caps(kind)) {
            return;
        }
        let env = Env::new(bin(), kind).sandboxed("native");
        let spec = env.spec(
            "s.spec",
            "((from busybox) (shell /bin/sh -c) (copy (src a.txt) (dst /a.txt))\n \
             (run (cache (c (target /cache))) (shell \"cat /a.txt; echo x >> /cache/n; wc -l < /cache/n; cat /proc/self/cgroup | grep -c obuilder-n-\")))",
        );
        let out = env.build(&spec);
        let o = text(&out.stdout);
        assert!(out.status.success(), "{kind}: {o}{}", text(&out.stderr));
        assert!(o.contains("hello\n1\n"), "{kind}: {o}");
        let again = env.build(&spec);
        assert!(again.status.success(), "{kind}");
        assert!(
            text(&again.stderr).contains("3 steps, 3 from the cache"),
            "{kind}: {}",
            text(&again.stderr)
        );
        env.assert_clean();
    }
}

/// An image whose /etc/resolv.conf is a dangling symlink into /run (as resolvconf leaves
/// it): with `(network host)` the host's file is bound where the link points, inside the
/// tree, in both sandboxes.
#[test]
fn resolv_conf_through_a_symlink_in_the_image() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let spec = env.spec(
            "r.spec",
            "((from busybox) (shell /bin/sh -c)\n \
             (run (shell \"rm -f /etc/resolv.conf && ln -s ../run/resolvconf/resolv.conf /etc/resolv.conf\"))\n \
             (run (network host) (shell \"test -s /etc/resolv.conf && echo resolv-ok; readlink /etc/resolv.conf\")))",
        );
        let out = env.build(&spec);
        let o = text(&out.stdout);
        assert!(out.status.success(), "{sandbox}: {o}{}", text(&out.stderr));
        assert!(
            o.contains("resolv-ok\n../run/resolvconf/resolv.conf\n"),
            "{sandbox}: {o}"
        );
        env.assert_clean();
    }
}

/// The escapes a reviewer would try, in both sandboxes, as root in the step: mounting,
/// writing /proc/sys and /sys, a disk's device node, the host's processes, the kernel
/// keyring, a TCP listener on the host's loopback, and the host's hostname.
#[test]
fn a_root_step_cannot_reach_the_host_in_either_sandbox() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let host_name = text(
        &std::process::Command::new("hostname")
            .output()
            .unwrap()
            .stdout,
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let me = std::process::id();
    // The first block device of the host (a disk or a loop device).
    let disk = std::fs::read_to_string("/proc/partitions")
        .unwrap()
        .lines()
        .skip(2)
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4).then(|| format!("{} {}", f[0], f[1]))
        })
        .unwrap();
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let script = format!(
            r#"
try() {{ name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name=ESCAPED"; else echo "$name=refused"; fi; }}
try mount mount -t tmpfs none /mnt
try proc-sys sh -c 'echo 1 > /proc/sys/kernel/sysrq'
try sys sh -c 'echo 1 > /sys/kernel/profiling'
mknod /tmp/disk b {disk}
try disk-read dd if=/tmp/disk of=/dev/null bs=512 count=1
try host-process kill -0 {me}
try host-proc test -e /proc/{me}/environ
try keyring sh -c 'cat /proc/keys | grep -q .'
try host-loopback nc -w 2 127.0.0.1 {port}
try hostname hostname evil-name
try sysrq sh -c 'echo h > /proc/sysrq-trigger'
echo hostname-now=$(hostname)
"#
        );
        std::fs::write(env.ctx.join("escape.sh"), script).unwrap();
        let spec = env.spec(
            "e.spec",
            "((from busybox) (shell /bin/sh -c) (copy (src escape.sh) (dst /escape.sh)) \
             (run (shell \"sh /escape.sh\")))",
        );
        let out = env.build(&spec);
        let o = text(&out.stdout);
        assert!(out.status.success(), "{sandbox}: {o}{}", text(&out.stderr));
        let props = properties(&o);
        for key in [
            "mount",
            "proc-sys",
            "sys",
            "disk-read",
            "host-process",
            "host-proc",
            "keyring",
            "host-loopback",
            "sysrq",
        ] {
            assert_eq!(
                props.get(key).map(String::as_str),
                Some("refused"),
                "{sandbox}: {key}\n{o}"
            );
        }
        // sethostname works in the step's own UTS namespace only.
        let _ = props.get("hostname");
        assert!(
            listener.accept().is_err(),
            "{sandbox}: the host's listener was reached"
        );
        let now = text(
            &std::process::Command::new("hostname")
                .output()
                .unwrap()
                .stdout,
        );
        assert_eq!(now, host_name, "{sandbox}: the host's hostname changed");
        env.assert_clean();
    }
}

/// How many step-cgroup records (`STATE/native/steps-PID-K`) builder `pid` has (any
/// builder's, for `pid` 0).
fn step_records(env: &Env, pid: u32) -> usize {
    let prefix = if pid == 0 {
        "steps-".to_string()
    } else {
        format!("steps-{pid}-")
    };
    std::fs::read_dir(env.root().join("state/native"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .count()
}

/// Nothing outlives a native step, however it ends: cancel (SIGINT), a step timeout, the
/// builder's SIGTERM and `kill -9` of the builder each leave no process of the step
/// (a daemon it started included), no cgroup and no mount.
#[test]
fn nothing_outlives_a_native_step() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs").sandboxed("native");
    for (how, marker) in [
        ("SIGINT", "4101"),
        ("timeout", "4102"),
        ("SIGTERM", "4103"),
        ("SIGKILL", "4104"),
    ] {
        let spec = env.spec(
            "o.spec",
            &format!(
                "((from busybox) (shell /bin/sh -c) (run (shell \"(setsid sleep {marker} &); echo started; sleep {marker}\")))"
            ),
        );
        let extra: &[&str] = if how == "timeout" {
            &["--step-timeout", "2s"]
        } else {
            &[]
        };
        let mut child = start_until(&env, &spec, extra, "started");
        let pid = child.id();
        assert!(process_alive(&format!("sleep {marker}")));
        match how {
            "SIGINT" => unsafe { libc::kill(pid as i32, libc::SIGINT) },
            "SIGTERM" => unsafe { libc::kill(pid as i32, libc::SIGTERM) },
            "SIGKILL" => unsafe { libc::kill(pid as i32, libc::SIGKILL) },
            _ => 0,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "{how}: the builder did not end");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(!status.success(), "{how}");
        eventually(&format!("{how}: the step's processes to end"), 20, || {
            !process_alive(&format!("sleep {marker}"))
        });
        if how != "SIGKILL" {
            // (a killed builder's cgroups go at the next start: below)
            assert!(!native_cgroup_left(pid), "{how}: a cgroup is left");
        }
        // The step's mounts lived in its own mount namespace: none shows here.
        let under = format!("{}/", env.root().display());
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts
                .lines()
                .any(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&under))),
            "{how}: a mount is left under the store"
        );
        if how == "SIGKILL" {
            // The killed builder's record of its step cgroups tells the next build on the
            // store (alone on it) to recover: the stale cgroups go, and the record.
            assert!(
                step_records(&env, pid) > 0,
                "no step record of a killed builder"
            );
            let next = env.spec(
                "n.spec",
                "((from busybox) (shell /bin/sh -c) (run (shell \"echo next\")))",
            );
            let out = env.build(&next);
            assert!(out.status.success(), "{}", text(&out.stderr));
            assert!(
                !native_cgroup_left(pid),
                "the next start removes a killed builder's cgroups"
            );
            assert_eq!(
                step_records(&env, pid),
                0,
                "a dead builder's record is left"
            );
            // (and a builder that ends normally takes its own record away)
            assert_eq!(
                step_records(&env, 0),
                0,
                "a finished builder's record is left"
            );
        }
    }
    assert!(env.run(&["clean"]).status.success());
    env.assert_clean();
}

/// A command that does not exist (by path or on PATH), is not executable, or a working
/// directory that cannot be made: a clear message naming it, the shell's status (127,
/// 126), and never a hang; the same specs under runc fail too.
#[test]
fn commands_that_cannot_start_fail_clearly() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs").sandboxed("native");
    let cases = [
        (
            "((from busybox) (run (shell \"true\")))",
            "/bin/bash does not exist in the image",
        ),
        (
            "((from busybox) (shell /bin/sh -c) (run (network host) (shell \"true\")) (shell no-such-shell -c) (run (shell \"true\")))",
            "cannot run `no-such-shell`: no such command in the image (PATH is /usr/sbin:/usr/bin:/sbin:/bin)",
        ),
        (
            "((from busybox) (shell /bin/sh -c) (run (shell \"printf 'echo hi' > /x; chmod 644 /x\")) (shell /x) (run (shell \"true\")))",
            "cannot run `/x`: not executable",
        ),
        (
            "((from busybox) (shell /bin/sh -c) (run (shell \"touch /file\")) (workdir /file/sub) (run (shell \"true\")))",
            "cannot make the working directory /file/sub",
        ),
    ];
    for (spec, want) in cases {
        let path = env.spec("bad.spec", spec);
        let start = Instant::now();
        let out = env.build(&path);
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{spec}: {all}");
        assert!(all.contains(want), "{spec}: want {want:?} in\n{all}");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{spec}: took too long"
        );
        if want.contains("no such command") {
            assert!(all.contains("exited with status 127"), "{all}");
        }
        if want.contains("not executable") {
            assert!(all.contains("exited with status 126"), "{all}");
        }
    }
    env.assert_clean();
}
