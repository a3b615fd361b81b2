#![cfg(target_os = "linux")]
//! End-to-end helpers for tests that run the real `obuilder` binary: a store on its own
//! loopback filesystem with a busybox image imported, id redaction for transcripts, and a
//! check that nothing half-done is left.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{Cap, LoopFs};

/// Lossy text of a command's output.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Replaces every 64-hex id with `[ID]`.
pub fn redact(s: &str) -> String {
    let mut out = String::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if i + 64 <= b.len()
            && b[i..i + 64]
                .iter()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            out.push_str("[ID]");
            i += 64;
        } else {
            let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
            out.push(ch);
            i += ch.len_utf8().max(1);
        }
    }
    out
}

/// What every end-to-end build test needs from the machine.
pub fn caps() -> [Cap; 5] {
    [
        Cap::Root,
        Cap::Tool("runc"),
        Cap::File("/bin/busybox"),
        Cap::Tool("mkfs.btrfs"),
        Cap::Tool("tar"),
    ]
}

/// Runs `cmd` with `input` on its standard input; its output, both streams captured.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    // (A command that exits without reading is not an error here.)
    let _ = child.stdin.take().map(|mut i| i.write_all(input));
    child.wait_with_output().unwrap()
}

/// What an end-to-end build on a store of `kind` (one of [`STORES`]) needs.
pub fn store_caps(kind: &str) -> Vec<Cap> {
    let mut v = vec![Cap::Root, Cap::Tool("runc"), Cap::File("/bin/busybox")];
    match kind {
        "btrfs" => v.push(Cap::Tool("mkfs.btrfs")),
        "xfs" => v.push(Cap::Tool("mkfs.xfs")),
        "overlayfs" => v.extend([Cap::Tool("mkfs.ext4"), Cap::OverlayLowerdirPlus]),
        _ => v.extend([Cap::Tool("mkfs.ext4"), Cap::Tool("rsync")]),
    }
    v
}

/// The store kinds every store-dependent behaviour is tested on.
pub const STORES: [&str; 5] = ["btrfs", "xfs", "overlayfs", "rsync-copy", "rsync-hardlink"];

/// Makes a busybox root filesystem at `dir` with `scripts/make-busybox-rootfs.sh`.
pub fn make_busybox(dir: &Path) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/make-busybox-rootfs.sh"
    );
    let out = Command::new("bash")
        .args([script, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A store on its own loopback filesystem, with the busybox image imported.
pub struct Env {
    pub bin: PathBuf,
    pub fs: LoopFs,
    /// The `--store` value.
    pub store: String,
    /// Extra store flags (`--rsync-mode …`).
    pub extra: Vec<String>,
    /// A context directory holding `a.txt` and `sub/run.sh`.
    pub ctx: PathBuf,
    pub tmp: tempfile::TempDir,
    /// The `--sandbox` value (through `OBUILDER_SANDBOX`); the binary's default if `None`.
    pub sandbox: Option<String>,
}

/// The Linux container sandboxes, which every isolation test runs under.
pub const SANDBOXES: [&str; 2] = ["runc", "native"];

impl Env {
    /// `kind` is one of [`STORES`]; `bin` the `obuilder` binary under test.
    pub fn new(bin: &str, kind: &str) -> Env {
        Env::with_size(bin, kind, 512)
    }

    /// As [`Env::new`], on a filesystem of `size_mib`.
    pub fn with_size(bin: &str, kind: &str, size_mib: u64) -> Env {
        let (fs_kind, store_kind, extra): (&str, &str, Vec<String>) = match kind {
            "btrfs" => ("btrfs", "btrfs", vec![]),
            "xfs" => ("xfs", "xfs", vec![]),
            "overlayfs" => ("ext4", "overlayfs", vec![]),
            "rsync-copy" => ("ext4", "rsync", vec!["--rsync-mode".into(), "copy".into()]),
            "rsync-hardlink" => (
                "ext4",
                "rsync",
                vec!["--rsync-mode".into(), "hardlink".into()],
            ),
            other => panic!("unknown store kind {other}"),
        };
        let fs = LoopFs::new(fs_kind, size_mib);
        let store = format!("{store_kind}:{}", fs.mnt.join("store").display());
        let tmp = tempfile::tempdir().unwrap();
        let ctx = tmp.path().join("ctx");
        std::fs::create_dir_all(ctx.join("sub")).unwrap();
        std::fs::write(ctx.join("a.txt"), "hello\n").unwrap();
        std::fs::write(ctx.join("sub/run.sh"), "echo run-me\n").unwrap();
        let env = Env {
            bin: PathBuf::from(bin),
            fs,
            store,
            extra,
            ctx,
            tmp,
            sandbox: None,
        };
        let rootfs = env.tmp.path().join("busybox");
        make_busybox(&rootfs);
        let out = env.run(&[
            "image",
            "import",
            "busybox",
            rootfs.to_str().unwrap(),
            "--env",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        ]);
        assert!(out.status.success(), "import: {}", text(&out.stderr));
        env
    }

    /// This store, with its steps run by `sandbox`.
    pub fn sandboxed(mut self, sandbox: &str) -> Env {
        self.sandbox = Some(sandbox.to_string());
        self
    }

    /// `args` followed by the store flags.
    pub fn args(&self, args: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.push("--store".into());
        v.push(self.store.clone());
        v.extend(self.extra.iter().cloned());
        v
    }

    /// The binary with `args` and the store flags.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(self.args(args));
        if let Some(s) = &self.sandbox {
            c.env("OBUILDER_SANDBOX", s);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Writes a spec file in the test's temp dir.
    pub fn spec(&self, name: &str, body: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    /// `obuilder build -f SPEC CTX` plus `extra` flags.
    pub fn build_with(&self, spec: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "build",
            "-f",
            spec.to_str().unwrap(),
            self.ctx.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    pub fn build(&self, spec: &Path) -> Output {
        self.build_with(spec, &[])
    }

    /// The store's root directory.
    pub fn root(&self) -> PathBuf {
        PathBuf::from(self.store.split_once(':').unwrap().1)
    }

    /// Nothing half-done: no temp build, no mount, no container, no bundle.
    pub fn assert_clean(&self) {
        let root = self.root();
        let tmp: Vec<_> = std::fs::read_dir(root.join("result-tmp"))
            .unwrap()
            .collect();
        assert!(tmp.is_empty(), "result-tmp: {tmp:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&format!("{}/merged", root.display())),
            "a mount is left"
        );
        let runc = Command::new("runc")
            .args([
                "--root",
                root.join("state/runc").to_str().unwrap(),
                "list",
                "-q",
            ])
            .output()
            .unwrap();
        assert_eq!(text(&runc.stdout).trim(), "", "a container is left");
        let bundles: Vec<_> = std::fs::read_dir(root.join("state/runc-tmp"))
            .into_iter()
            .flatten()
            .collect();
        assert!(bundles.is_empty(), "bundles: {bundles:?}");
    }
}

/// A private mount namespace, held by a `sleep SECS` child until it is killed: enter it
/// with `nsenter -t PID -m`. Mounts made there (FUSE, loop filesystems) never show on the
/// host. Returns once the child runs `sleep` in a namespace other than this process's.
pub fn mount_namespace(secs: u32) -> std::process::Child {
    let holder = std::process::Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sleep",
            &secs.to_string(),
        ])
        .spawn()
        .unwrap();
    let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{}/ns/mnt", holder.id()))
        .ok()
        .as_ref()
        == Some(&own)
        || std::fs::read_to_string(format!("/proc/{}/comm", holder.id()))
            .unwrap_or_default()
            .trim()
            != "sleep"
    {
        assert!(std::time::Instant::now() < deadline, "no mount namespace");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    holder
}

/// Whether a process whose command line holds `marker` is alive.
pub fn process_alive(marker: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(marker)
            })
            .unwrap_or(false)
    })
}

/// Whether a cgroup of a native-sandbox step (`obuilder-n-PID-N`) of builder `pid` is
/// left in any hierarchy.
pub fn native_cgroup_left(pid: u32) -> bool {
    let prefix = format!("obuilder-n-{pid}-");
    let mut dirs = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    let mut seen = 0;
    while let Some(d) = dirs.pop() {
        seen += 1;
        if seen > 10_000 {
            break;
        }
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    return true;
                }
                dirs.push(e.path());
            }
        }
    }
    false
}

/// Waits (bounded) until `cond` holds; panics naming `what` after `secs`.
pub fn eventually(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Starts `build -f SPEC CTX EXTRA…` in `env` and returns once its step printed the line
/// `marker` (within 60 s); the rest of its output is drained in the background.
pub fn start_until(env: &Env, spec: &Path, extra: &[&str], marker: &str) -> std::process::Child {
    let (child, _rest) = start_until_line(
        env,
        spec,
        extra,
        std::process::Stdio::null(),
        |l| l == marker,
        marker,
    );
    child
}

/// Starts `build -f SPEC CTX EXTRA…` in `env` (its stderr as given) and returns once a line
/// of its stdout satisfies `is_marker` (within 60 s; `what` names it in failures), with
/// the rest of its stdout, read in the background so that the child never blocks on a
/// full pipe.
pub fn start_until_line(
    env: &Env,
    spec: &Path,
    extra: &[&str],
    stderr: std::process::Stdio,
    is_marker: impl Fn(&str) -> bool,
    what: &str,
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::{BufRead, BufReader};
    let mut args = vec![
        "build",
        "-f",
        spec.to_str().unwrap(),
        env.ctx.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut child = env
        .command(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    // Split on bytes: a line that is not UTF-8 must not stop the reading (the child would
    // block on a full pipe); only a read error does.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).split(b'\n');
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        assert!(std::time::Instant::now() < deadline, "{what} never came");
        match lines.next() {
            Some(Ok(l)) if is_marker(&String::from_utf8_lossy(&l)) => break,
            Some(_) => {}
            None => panic!("the build ended before printing {what}"),
        }
    }
    let rest = std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    });
    (child, rest)
}

/// The short id of a failed step kept by `build --keep-failed`, from the build's log
/// (which says "`obuilder shell ID`").
pub fn kept_id(log: &str) -> String {
    log.split("`obuilder shell ")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .unwrap_or_else(|| panic!("no kept id in:\n{log}"))
        .to_string()
}

/// Makes `cmd` start with `fd` open as descriptor `as_fd` without close-on-exec: what a
/// careless parent (a CI runner, a shell) may leave a builder.
pub fn leave_open(cmd: &mut Command, fd: std::os::fd::RawFd, as_fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: dup2 is async-signal-safe; its new descriptor has no close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, as_fd) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `cmd` start with umask `mask` (as a careful operator's shell or service may).
pub fn with_umask(cmd: &mut Command, mask: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(mask as libc::mode_t);
            Ok(())
        });
    }
}
