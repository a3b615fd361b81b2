#![cfg(target_os = "linux")]
//! What a hostile step must not be able to do to the host, tried for real: the real binary,
//! real runc, every store on its own loopback filesystem.

// Tests drive the real binary and tools directly.
#![allow(clippy::disallowed_methods)]

use testkit::e2e::{
    caps, eventually, leave_open, process_alive, start_until, text, Env, SANDBOXES, STORES,
};
use testkit::Cap;

/// The binary under test; `OBUILDER_TEST_BIN` points these probes at another build (an
/// older release, to see them fail there).
fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("OBUILDER_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_obuilder").into())
    })
}

/// A step that swaps a parent of its secret's mount point for a symlink to the host must
/// not make obuilder's clean-up of that mount point delete the host's files of the same
/// name (an empty file and its empty directories).
#[test]
fn secret_mount_point_clean_up_never_follows_a_step_made_symlink() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let runs = STORES
        .iter()
        .map(|k| (*k, "runc"))
        .chain([("btrfs", "native")]);
    for (kind, sandbox) in runs {
        let env = Env::new(bin(), kind).sandboxed(sandbox);
        let victim = env.tmp.path().join("victim");
        std::fs::create_dir_all(victim.join("b/c")).unwrap();
        std::fs::write(victim.join("b/c/x"), "").unwrap();
        let secret = env.tmp.path().join("tok");
        std::fs::write(&secret, "tok").unwrap();
        let spec = env.spec(
            "s.spec",
            &format!(
                "((from busybox) (shell /bin/sh -c)\n \
                 (run (secrets (t (target /a/b/c/x)))\n  \
                 (shell \"mv /a /a.old && ln -s {} /a\")))",
                victim.display()
            ),
        );
        let out = env.build_with(&spec, &["--secret", &format!("t:{}", secret.display())]);
        assert!(
            out.status.success(),
            "{kind}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(
            victim.join("b/c/x").exists(),
            "{kind}: obuilder deleted the host's {}",
            victim.join("b/c/x").display()
        );
        assert!(victim.join("b/c").is_dir(), "{kind}: host dir removed");
        env.assert_clean();
    }
}

/// A static probe that tries what a step must not do and prints `NAME ok` or
/// `NAME errno N` for each.
const PROBE: &str = r#"
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/syscall.h>
static void report(const char *name, long r) {
  if (r < 0) printf("%s errno %d\n", name, errno); else printf("%s ok\n", name);
}
int main(void) {
  report("keyctl", syscall(SYS_keyctl, 0 /* GET_KEYRING_ID */, -4 /* USER */, 0));
  report("add_key", syscall(SYS_add_key, "user", "obuilder-probe", "x", 1, -4));
  report("request_key", syscall(SYS_request_key, "user", "obuilder-probe", NULL, 0));
  report("unshare_user", unshare(CLONE_NEWUSER));
  report("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
  report("bpf", syscall(SYS_bpf, 0, NULL, 0));
  report("mount", mount("none", "/mnt", "tmpfs", 0, NULL));
  int fd = open("/probe-fsync", O_CREAT | O_WRONLY, 0600);
  report("fsync", fsync(fd));
  report("fork", fork() < 0 ? -1 : 0);
  return 0;
}
"#;

/// Compiles C `source`, statically, into `dir/probe`.
fn build_probe(dir: &std::path::Path, source: &str) {
    std::fs::write(dir.join("probe.c"), source).unwrap();
    let out = std::process::Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(dir.join("probe"))
        .arg(dir.join("probe.c"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Steps share the kernel keyring with host root unless a filter stops them: the default
/// seccomp filter denies the keyring calls, new user namespaces, perf, bpf and mounts, and
/// composes with --fast-sync (whose fsync becomes a no-op).
#[test]
fn the_default_seccomp_filter_denies_keyrings_user_namespaces_and_kernel_hooks() {
    if !testkit::require(module_path!(), &caps())
        || !testkit::require(module_path!(), &[Cap::Tool("cc")])
    {
        return;
    }
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        build_probe(&env.ctx, PROBE);
        let spec = env.spec(
        "p.spec",
        "((from busybox) (shell /bin/sh -c) (copy (src probe) (dst /probe)) (run (shell /probe)))",
    );
        for extra in [&[][..], &["--fast-sync"][..]] {
            let out = env.build_with(&spec, extra);
            let o = text(&out.stdout);
            assert!(out.status.success(), "{o}{}", text(&out.stderr));
            for denied in [
                "keyctl errno 1",
                "add_key errno 1",
                "request_key errno 1",
                "unshare_user errno 1",
                "perf_event_open errno 1",
                "bpf errno 1",
                "mount errno 1",
            ] {
                assert!(
                    o.contains(denied),
                    "{sandbox} {extra:?}: want `{denied}` in\n{o}"
                );
            }
            assert!(o.contains("fsync ok") && o.contains("fork ok"), "{o}");
            // The next run is a cache hit with the other flag (the filter is not in the key).
            env.run(&["clean"]);
        }
    }
}

/// The step id must not let anyone check a guess of a secret offline: the same secret
/// gives different ids in different stores, and a changed secret a changed id.
#[test]
fn secret_ids_are_keyed_per_store() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let spec = env.spec(
        "s.spec",
        "((from busybox) (shell /bin/sh -c) (run (secrets (pin (target /run/pin))) (shell \"test -s /run/pin\")))",
    );
    let id = |store: &str, value: &str| {
        let f = env.tmp.path().join("pin");
        std::fs::write(&f, value).unwrap();
        let out = std::process::Command::new(bin())
            .args([
                "build",
                "-f",
                spec.to_str().unwrap(),
                env.ctx.to_str().unwrap(),
            ])
            .arg(format!("--store={store}"))
            .arg(format!("--secret=pin:{}", f.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).lines().last().unwrap().to_string()
    };
    let other = format!("btrfs:{}", env.fs.mnt.join("other").display());
    let out = env.run(&[
        "image",
        "import",
        "busybox",
        env.tmp.path().join("busybox").to_str().unwrap(),
    ]);
    assert!(out.status.success());
    std::process::Command::new(bin())
        .args([
            "image",
            "import",
            "busybox",
            env.tmp.path().join("busybox").to_str().unwrap(),
        ])
        .arg(format!("--store={other}"))
        .output()
        .unwrap();
    let a = id(&env.store, "1234");
    assert_eq!(id(&env.store, "1234"), a, "stable in one store");
    assert_ne!(id(&env.store, "1235"), a, "a changed secret changes the id");
    assert_ne!(
        id(&other, "1234"),
        a,
        "another store's key gives another id"
    );
    let key = std::fs::metadata(env.root().join("state/secret-key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
}

fn runc_list(env: &Env) -> String {
    let out = std::process::Command::new("runc")
        .args([
            "--root",
            env.root().join("state/runc").to_str().unwrap(),
            "list",
            "-q",
        ])
        .output()
        .unwrap();
    text(&out.stdout).trim().to_string()
}

/// `kill -9` of obuilder: its step's processes die with it and the step's secret file
/// is wiped at once (runc: its supervisor deletes the container and bundle) or never
/// reaches the disk (native: it lives in the step's own tmpfs).
#[test]
fn killing_the_builder_kills_its_step_and_wipes_its_secret() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for (sandbox, marker) in SANDBOXES.iter().zip(["3071", "3072"]) {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let secret = env.tmp.path().join("tok");
        std::fs::write(&secret, "killed-builder-secret").unwrap();
        let spec = env.spec(
            "k.spec",
            &format!("((from busybox) (shell /bin/sh -c) (run (secrets (t (target /run/t))) (shell \"echo started; (sleep {marker} &); sleep {marker}\")))"),
        );
        let mut child = start_until(
            &env,
            &spec,
            &["--secret", &format!("t:{}", secret.display())],
            "started",
        );
        if *sandbox == "runc" {
            assert_ne!(runc_list(&env), "", "the container runs");
        }
        assert!(
            process_alive(&format!("sleep {marker}")),
            "{sandbox}: the step runs"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        eventually("the step's processes to die with their builder", 20, || {
            !process_alive(&format!("sleep {marker}"))
        });
        eventually("the container to die with its builder", 20, || {
            runc_list(&env).is_empty()
        });
        let bundles = env.root().join("state/runc-tmp");
        eventually("the bundle (and secret file) to go", 20, || {
            std::fs::read_dir(&bundles).map_or(0, |d| d.count()) == 0
        });
        let grep = std::process::Command::new("grep")
            .args(["-r", "-l", "-a", "killed-builder-secret"])
            .arg(env.root())
            .output()
            .unwrap();
        assert_eq!(
            text(&grep.stdout),
            "",
            "{sandbox}: the secret is left on disk"
        );
    }
}

/// A builder killed mid-step while another process keeps the store open (so nobody
/// recovers it at start-up) used to block that step for everyone: its build dir was
/// "already there". Under the step's lock a build dir is stale by definition.
#[test]
fn a_builder_killed_mid_step_does_not_block_the_step_on_a_shared_store() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for kind in STORES {
        let env = Env::new(bin(), kind);
        // Keeps the store shared for the whole test.
        let holder_spec = env.spec(
            "h.spec",
            "((from busybox) (shell /bin/sh -c) (run (shell \"echo holding; sleep 120\")))",
        );
        let mut holder = start_until(&env, &holder_spec, &[], "holding");
        let spec = env.spec(
            "s.spec",
            "((from busybox) (shell /bin/sh -c) (run (shell \"echo started; sleep 5; echo done\")))",
        );
        let mut victim = start_until(&env, &spec, &[], "started");
        victim.kill().unwrap();
        victim.wait().unwrap();
        let out = env.build(&spec);
        assert!(
            out.status.success(),
            "{kind}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("done"), "{kind}: built afresh");
        holder.kill().unwrap();
        holder.wait().unwrap();
        // The next process to have the store alone recovers what the holder left.
        assert!(env.run(&["df"]).status.success());
        let clean = env.run(&["clean"]);
        assert!(clean.status.success(), "{kind}: {}", text(&clean.stderr));
        env.assert_clean();
    }
}

/// A full disk: the step that filled it is not saved (whatever it wrote may be cut short)
/// and the error names the store and its free space; obuilder never dies of it (SQLite's
/// memory-mapped WAL index used to SIGBUS on btrfs), and `df`, `prune`, `delete` and
/// `clean` all work on the full store, after which it builds again.
#[test]
fn a_full_disk_is_a_clear_error_and_the_store_stays_usable() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for kind in STORES {
        let env = Env::with_size(bin(), kind, if kind == "xfs" { 320 } else { 200 });
        let spec = env.spec(
            "fill.spec",
            "((from busybox) (shell /bin/sh -c) (run (shell \"dd if=/dev/zero of=/fill bs=1M 2>/dev/null; echo filled\")))",
        );
        let out = env.build(&spec);
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{kind}: {}{err}",
            text(&out.stdout)
        );
        assert!(
            err.contains(&format!(
                "the store {} ran out of space during the step",
                env.store
            )) && err.contains(" left)"),
            "{kind}: {err}"
        );
        let df = env.run(&["df"]);
        assert!(df.status.success(), "{kind}: {}", text(&df.stderr));
        assert!(
            text(&df.stdout).contains("results: 1"),
            "{kind}: only the base"
        );
        let prune = env.run(&["prune", "--keep-free", "90", "--wait-for-space"]);
        assert!(prune.status.success(), "{kind}: {}", text(&prune.stderr));
        let small = env.spec(
            "ok.spec",
            "((from busybox) (shell /bin/sh -c) (run (shell \"echo fine\")))",
        );
        let out = env.build(&small);
        assert!(
            out.status.success(),
            "{kind}: builds again: {}",
            text(&out.stderr)
        );
        let id = text(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim_start_matches("Got: ")
            .trim_matches('"')
            .to_string();
        let del = env.run(&["delete", &id]);
        assert!(del.status.success(), "{kind}: {}", text(&del.stderr));
        let clean = env.run(&["clean"]);
        assert!(clean.status.success(), "{kind}: {}", text(&clean.stderr));
        env.assert_clean();
    }
}

/// Ten seconds of `yes` used to make a multi-GB log that every cache hit replayed. The
/// stored log keeps its start and its end, says what was cut, and the step's last words.
#[test]
fn step_logs_are_capped_and_keep_their_end() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let spec = env.spec(
        "y.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"yes | head -c 20000000; echo THE-END\")))",
    );
    let out = env.build_with(&spec, &["--max-log-size", "1M"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout)
        .lines()
        .last()
        .unwrap()
        .trim_start_matches("Got: ")
        .trim_matches('"')
        .to_string();
    let log = std::fs::read(env.root().join("result").join(&id).join("log")).unwrap();
    assert!(log.len() < 1_100_000, "stored log is {} bytes", log.len());
    let log = String::from_utf8_lossy(&log);
    assert!(log.starts_with("y\ny\n"));
    assert!(
        log.contains("of output cut here; the last 512.0 KiB follow"),
        "cut marked"
    );
    assert!(log.ends_with("THE-END\n"), "the last words are kept");
    // The cache hit replays the capped log.
    let again = env.build_with(&spec, &["--max-log-size", "1M"]);
    assert!(again.stdout.len() < 1_200_000, "{}", again.stdout.len());
}

/// A descriptor that whoever started the builder left open without close-on-exec (a CI
/// runner's, a shell's) never reaches a step: here a directory outside the tree, which a
/// step holding it could read through `/proc/self/fd/N/`.
#[test]
fn a_descriptor_the_builder_inherited_never_reaches_a_step() {
    use std::os::fd::AsRawFd;
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let outside = env.tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("marker"), "host-secret-3981\n").unwrap();
        let dir = std::fs::File::open(&outside).unwrap();
        let spec = env.spec(
            "s.spec",
            "((from busybox) (shell /bin/sh -c)\n \
             (run (shell \"echo fds: $(ls /proc/self/fd); for f in /proc/self/fd/*; do cat $f/marker 2>/dev/null; done; echo probed\")))",
        );
        let mut cmd = env.command(&[
            "build",
            "-f",
            spec.to_str().unwrap(),
            env.ctx.to_str().unwrap(),
        ]);
        let held_fd = dir.as_raw_fd();
        leave_open(&mut cmd, held_fd, 9);
        let out = cmd.output().unwrap();
        let o = text(&out.stdout);
        assert!(out.status.success(), "{sandbox}: {o}{}", text(&out.stderr));
        assert!(o.contains("probed"), "{sandbox}: {o}");
        assert!(
            !o.contains("host-secret-3981"),
            "{sandbox}: the step read the host's file:\n{o}"
        );
        // The three streams and `ls`'s own directory: nothing else is open in the step.
        assert!(o.contains("fds: 0 1 2 3\n"), "{sandbox}: {o}");
        drop(dir);
    }
}

/// A pids limit (default on), a memory limit and a step time limit, each with a clear
/// message, on this machine's v1/v2 hybrid cgroups.
#[test]
fn limits_stop_fork_bombs_memory_hogs_and_slow_steps() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        let bomb = env.spec(
        "bomb.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"i=0; while [ $i -lt 300 ]; do sleep 30 & i=$((i+1)); done; wait\")))",
    );
        let out = env.build_with(&bomb, &["--max-pids", "64"]);
        let o = text(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{o}{}", text(&out.stderr));
        assert!(
            o.contains("it may have reached its limit of 64 (--max-pids)"),
            "{o}"
        );
        env.assert_clean();
        let hog = env.spec(
        "hog.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"dd if=/dev/zero of=/dev/null bs=200M count=1\")))",
    );
        let out = env.build_with(&hog, &["--max-memory", "32M"]);
        let e = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{e}");
        assert!(
            e.contains("killed by signal 9") && e.contains("32.0 MiB (--max-memory)"),
            "{e}"
        );
        env.assert_clean();
        let slow = env.spec(
            "slow.spec",
            "((from busybox) (shell /bin/sh -c) (run (shell \"sleep 300\")))",
        );
        let start = std::time::Instant::now();
        let out = env.build_with(&slow, &["--step-timeout", "2s"]);
        let e = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{e}");
        assert!(
            e.contains("stopped after the step time limit of 2 s (--step-timeout)"),
            "{e}"
        );
        assert!(start.elapsed() < std::time::Duration::from_secs(60));
        env.assert_clean();
    }
}

/// Errors quote specs and commands: a 2 MB spec line and a 1 MB command are clipped.
#[test]
fn errors_clip_huge_inputs() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let big = "A".repeat(2 << 20);
    let spec = env.spec(
        "big.spec",
        &format!("((from busybox) (run (shell \"{big}\")) (rn x))"),
    );
    let out = env.build(&spec);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.len() < 4096,
        "{} bytes of error",
        out.stderr.len()
    );
    assert!(text(&out.stderr).contains("unknown operation `rn`"));
    let cmd = format!("false {}", "B".repeat(1 << 20));
    let spec = env.spec(
        "cmd.spec",
        &format!("((from busybox) (shell /bin/sh -c) (run (shell \"{cmd}\")))"),
    );
    let out = env.build(&spec);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.len() < 8192,
        "{} bytes of error",
        out.stderr.len()
    );
    assert!(
        out.stdout.len() < 16384,
        "{} bytes of log",
        out.stdout.len()
    );
    assert!(
        text(&out.stderr).contains("more bytes)"),
        "{}",
        text(&out.stderr)
    );
}

/// A process that waits for another process's step says whose, then replays that step's
/// log, instead of a bare `saved as`.
#[test]
fn a_process_waiting_on_another_replays_its_log() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    // The base first, so that the shared step is the second one.
    let base = env.spec("b.spec", "((from busybox) (shell /bin/sh -c))");
    assert!(env.build(&base).status.success());
    let spec = env.spec(
        "w.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo started; sleep 3; echo from-the-first\")))",
    );
    let mut first = start_until(&env, &spec, &[], "started");
    let second = env.build(&spec);
    let o = text(&second.stdout);
    assert!(second.status.success(), "{o}{}", text(&second.stderr));
    let pid = first.id();
    assert!(
        o.contains(&format!(
            "Waiting for process {pid}, which is building this step"
        )),
        "{o}"
    );
    assert!(
        o.contains("started\nfrom-the-first\n"),
        "its log is replayed: {o}"
    );
    assert!(o.contains(&format!("(built by process {pid})")), "{o}");
    first.wait().unwrap();
}

/// Makes btrfs subvolumes `/sub` and `/sub/deeper` in the step's own tree, the second
/// read-only, with the ioctls `btrfs subvolume create` and `btrfs property set` use
/// (neither needs a privilege on a directory one owns).
const SUBVOL_PROBE: &str = r#"
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/btrfs.h>
static int make(const char *dir, const char *name) {
  struct btrfs_ioctl_vol_args a;
  memset(&a, 0, sizeof a);
  strcpy(a.name, name);
  int fd = open(dir, O_RDONLY | O_DIRECTORY);
  return fd < 0 ? -1 : ioctl(fd, BTRFS_IOC_SUBVOL_CREATE, &a);
}
int main(void) {
  unsigned long long ro = BTRFS_SUBVOL_RDONLY;
  int a = make("/", "sub"), b = make("/sub", "deeper");
  int fd = open("/sub", O_RDONLY | O_DIRECTORY);
  int c = ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, &ro);
  printf("subvolumes %d %d %d\n", a, b, c);
  return 0;
}
"#;

/// A step that makes btrfs subvolumes of its own in its tree, nested and read-only, must
/// not leave the store unable to discard its build, delete its result or start again: a
/// subvolume holding another cannot be deleted until the inner one is.
#[test]
fn subvolumes_a_step_makes_do_not_wedge_the_btrfs_store() {
    if !testkit::require(module_path!(), &caps())
        || !testkit::require(module_path!(), &[Cap::Tool("cc")])
    {
        return;
    }
    for sandbox in SANDBOXES {
        let env = Env::new(bin(), "btrfs").sandboxed(sandbox);
        build_probe(&env.ctx, SUBVOL_PROBE);
        let base = "(from busybox) (shell /bin/sh -c) (copy (src probe) (dst /probe))";
        // Published: the nested subvolumes are not in the result (a snapshot holds none).
        let ok = env.spec("ok.spec", &format!("({base} (run (shell /probe)))"));
        let out = env.build(&ok);
        let o = text(&out.stdout);
        assert!(out.status.success(), "{sandbox}: {o}{}", text(&out.stderr));
        assert!(
            o.contains("subvolumes 0 0 0"),
            "{sandbox}: the probe failed:\n{o}"
        );
        // Failed: discarded.
        let failed = env.spec(
            "failed.spec",
            &format!("({base} (run (shell \"/probe; exit 3\")))"),
        );
        let out = env.build(&failed);
        assert!(!out.status.success(), "{sandbox}");
        env.assert_clean();
        // Deleted, and the store starts again.
        let out = env.run(&["clean"]);
        assert!(out.status.success(), "{sandbox}: {}", text(&out.stderr));
        let out = env.build(&ok);
        assert!(out.status.success(), "{sandbox}: {}", text(&out.stderr));
        env.assert_clean();
    }
}
