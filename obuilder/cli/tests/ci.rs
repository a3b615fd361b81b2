#![cfg(target_os = "linux")]
//! The CLI as a CI system drives it: signals, a closed stdout, exit codes, the
//! healthcheck, stores checked when opened, secrets kept out of logs. Real binary, real
//! runc, stores on loopback filesystems.

// Tests drive the real binary and tools directly.
#![allow(clippy::disallowed_methods)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::e2e::{caps, start_until_line, text, Env};
use testkit::{Cap, LoopFs};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_obuilder")
}

/// Starts `obuilder build` of `body` and waits until the step prints `started`.
fn start_build(env: &Env, body: &str, extra: &[&str]) -> (Child, std::thread::JoinHandle<String>) {
    let spec = env.spec("long.spec", body);
    start_until_line(
        env,
        &spec,
        extra,
        Stdio::piped(),
        |l| l.starts_with("started "),
        "the step's start",
    )
}

fn signal(child: &Child, sig: i32) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::from_named_raw(sig).unwrap())
        .unwrap();
}

/// SIGTERM (a CI cancel, `timeout`, systemd) and SIGHUP act as Ctrl-C does: the container
/// is killed, the half-done step discarded, nothing is left, and the exit code says which
/// signal it was.
#[test]
fn sigterm_and_sighup_cancel_like_ctrl_c() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    for (sig, code, said) in [
        (15, 143, "terminated (SIGTERM)"),
        (1, 129, "hung up (SIGHUP)"),
    ] {
        let body = format!(
            "((from busybox) (shell /bin/sh -c) (run (shell \"echo started {sig}; sleep 300\")))"
        );
        let (mut child, _rest) = start_build(&env, &body, &[]);
        signal(&child, sig);
        let start = Instant::now();
        let status = child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(code), "{err}");
        assert!(err.contains(said) && err.contains("Cancelled"), "{err}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "stopped promptly"
        );
        env.assert_clean();
    }
}

/// `obuilder … | head -1`: a closed stdout ends the command quietly, with no panic, and a
/// build stops cleanly.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "overlayfs");
    let closed = || {
        let (r, w) = rustix::pipe::pipe().unwrap();
        drop(r);
        Stdio::from(w)
    };
    for args in [vec!["image", "ls"], vec!["df"], vec!["cache", "ls"]] {
        let out = env.command(&args).stdout(closed()).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(141),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), "", "{args:?}: quietly");
    }
    let spec = env.spec("q.spec", "((from busybox) (run (shell \"true\")))");
    let out = Command::new(bin())
        .args(["dockerfile", "-f", spec.to_str().unwrap()])
        .stdout(closed())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
    let spec = env.spec(
        "b.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo hi; sleep 1; echo again\")))",
    );
    let out = env
        .command(&[
            "build",
            "-f",
            spec.to_str().unwrap(),
            env.ctx.to_str().unwrap(),
        ])
        .stdout(closed())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(141), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
    env.assert_clean();
}

/// Started with its standard descriptors closed (a careless service manager or a `>&-`),
/// the builder runs as if they were `/dev/null`: the store's files must not take their
/// numbers and receive what is printed (`obuilder` starts without Rust's runtime on
/// Linux, and does this itself).
#[test]
fn closed_standard_descriptors_are_never_reused_for_the_store() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "overlayfs");
    let spec = env.spec(
        "c.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"echo printed-by-the-step\")))",
    );
    let mut cmd = env.command(&[
        "build",
        "-f",
        spec.to_str().unwrap(),
        env.ctx.to_str().unwrap(),
    ]);
    // SAFETY: close(2) only, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            for fd in 0..3 {
                libc::close(fd);
            }
            Ok(())
        });
    }
    let status = cmd.status().unwrap();
    assert!(status.success(), "{status:?}");
    // The store is whole: the step is cached, and its log replays.
    let out = env.build(&spec);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("---> using") && stdout.contains("printed-by-the-step"),
        "{stdout}"
    );
    for bad in ["printed-by-the-step", "(from busybox)"] {
        let hits = std::process::Command::new("grep")
            .args(["-rlF", bad, "--exclude=log"])
            .arg(env.root().join("state"))
            .output()
            .unwrap();
        assert_eq!(text(&hits.stdout), "", "printed into the store's files");
    }
    env.assert_clean();
}

#[test]
fn exit_codes_tell_a_failed_step_from_usage_from_obuilder_failing() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let fail = env.spec(
        "f.spec",
        "((from busybox) (shell /bin/sh -c) (run (shell \"exit 7\")))",
    );
    let out = env.build(&fail);
    assert_eq!(out.status.code(), Some(1), "a step failed");
    assert!(
        text(&out.stderr).contains("exited with status 7"),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["build", "--frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "usage");
    let out = env.run(&[
        "build",
        "-f",
        "/nonexistent.spec",
        env.ctx.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    // A missing default shell: a step failure that says what to do.
    let bash = env.spec("b.spec", "((from busybox) (run (shell \"echo hi\")))");
    let out = env.build(&bash);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("/bin/bash does not exist in the image") && err.contains("(shell /bin/sh -c)"),
        "{err}"
    );
    assert!(!err.contains("level=error"), "no raw runc log: {err}");
}

/// A worker runs the healthcheck every few minutes: it must leave no result, no image and
/// no blob behind.
#[test]
fn the_healthcheck_leaves_nothing_behind() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let blobs = env.root().join("state/images/blobs/sha256");
    let count = || std::fs::read_dir(&blobs).map_or(0, |d| d.count());
    let before = count();
    for _ in 0..3 {
        let hc = env.run(&["healthcheck"]);
        assert!(
            hc.status.success(),
            "{}{}",
            text(&hc.stdout),
            text(&hc.stderr)
        );
        let df = text(&env.run(&["df"]).stdout);
        assert!(df.contains("results: 0"), "{df}");
        let images = text(&env.run(&["image", "ls"]).stdout);
        assert!(!images.contains("obuilder-healthcheck"), "{images}");
        assert_eq!(count(), before, "no blob left");
    }
    env.assert_clean();
}

/// A store on the wrong filesystem is refused when opened, naming the filesystem; a
/// read-only command on a path with no store says so; neither creates anything.
#[test]
fn stores_are_checked_when_opened_and_read_only_commands_create_nothing() {
    if !testkit::require(
        module_path!(),
        &[Cap::Root, Cap::Tool("mkfs.ext4"), Cap::Tool("mkfs.xfs")],
    ) {
        return;
    }
    let ext4 = LoopFs::new("ext4", 64);
    let ctx = tempfile::tempdir().unwrap();
    let spec = ctx.path().join("s.spec");
    std::fs::write(&spec, "((from busybox) (run (shell true)))").unwrap();
    for (kind, want) in [
        ("btrfs", "is on ext4, but this store needs btrfs"),
        ("xfs", "is on ext4, but this store needs reflinks"),
    ] {
        let path = ext4.mnt.join(kind);
        let out = Command::new(bin())
            .args([
                "build",
                "-f",
                spec.to_str().unwrap(),
                ctx.path().to_str().unwrap(),
            ])
            .arg(format!("--store={kind}:{}", path.display()))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert!(text(&out.stderr).contains(want), "{}", text(&out.stderr));
        assert!(!path.exists(), "nothing created for {kind}");
    }
    // An XFS made without reflinks cannot hold an xfs: store either.
    let noreflink = LoopFs::new("xfs-noreflink", 320);
    let out = Command::new(bin())
        .args([
            "build",
            "-f",
            spec.to_str().unwrap(),
            ctx.path().to_str().unwrap(),
        ])
        .arg(format!("--store=xfs:{}", noreflink.mnt.join("s").display()))
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("is on xfs, but this store needs reflinks"),
        "{}",
        text(&out.stderr)
    );
    let missing = ext4.mnt.join("typo");
    for args in [vec!["df"], vec!["cache", "ls"], vec!["cache", "rm", "x"]] {
        let out = Command::new(bin())
            .args(&args)
            .arg(format!("--store=overlayfs:{}", missing.display()))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert!(
            text(&out.stderr).contains("there is no obuilder store at"),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(!missing.exists(), "{args:?} created a store");
    }
}

/// A step that prints its secret shows `***`, live and in the stored log, also when the
/// value reaches the log in two pieces; afterwards the value is nowhere in the store.
#[test]
fn secret_values_never_reach_a_log_or_the_store() {
    if !testkit::require(module_path!(), &caps()) {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let value = "Pq7-SECRET-9fz";
    let secret = env.tmp.path().join("tok");
    std::fs::write(&secret, format!("{value}\n")).unwrap();
    let spec = env.spec(
        "s.spec",
        "((from busybox) (shell /bin/sh -c)\n \
         (run (secrets (tok (target /run/secrets/tok)))\n  \
         (shell \"cat /run/secrets/tok; echo inline $(cat /run/secrets/tok) end; printf Pq7-SEC; sleep 0.5; printf 'RET-9fz split\\\\n'\")))",
    );
    let out = env.build_with(&spec, &["--secret", &format!("tok:{}", secret.display())]);
    let live = text(&out.stdout);
    assert!(out.status.success(), "{live}{}", text(&out.stderr));
    assert!(!live.contains(value), "{live}");
    assert!(
        live.contains("***\ninline *** end\n*** split\n"),
        "masked live: {live}"
    );
    // Cached: the stored log replays masked too.
    let again = text(
        &env.build_with(&spec, &["--secret", &format!("tok:{}", secret.display())])
            .stdout,
    );
    assert!(
        again.contains("*** split") && !again.contains(value),
        "{again}"
    );
    let grep = Command::new("grep")
        .args(["-r", "-l", "-a", value])
        .arg(env.root())
        .output()
        .unwrap();
    assert_eq!(text(&grep.stdout), "", "the secret is in the store");
    env.assert_clean();
}
