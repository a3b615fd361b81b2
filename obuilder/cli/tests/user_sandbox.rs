#![cfg(target_os = "linux")]
//! The user sandbox (the macOS design) end to end on this Linux machine, for real: real
//! build users (useradd), real obuilderfs on real FUSE, a btrfs and an rsync store on
//! loopback files. Every build runs inside a private mount namespace held by a `sleep`
//! process (entered with `nsenter`), so that the FUSE mounts on the home path and prefix
//! never show on the host. Each test has build users of its own (tests run in parallel,
//! and the sandbox kills every process of a build user after each step). The build users
//! (obuilder611xx–613xx) stay in /etc/passwd afterwards, as the sandbox leaves them: they
//! are reused by the next run, except those of the test of three builds at once, which
//! deletes its own first so that the three builders create them at once, as on a new host.

// Tests drive the real binary and tools directly.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::e2e::{caps, leave_open, text, Env};
use testkit::Cap;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_obuilder")
}

fn obuilderfs() -> PathBuf {
    Path::new(bin()).with_file_name("obuilderfs")
}

fn machine_ok(test: &str) -> bool {
    let mut need = caps().to_vec();
    need.extend([
        Cap::Tool("unshare"),
        Cap::Tool("nsenter"),
        Cap::Tool("setpriv"),
        Cap::Tool("useradd"),
        Cap::Tool("pkill"),
        Cap::Tool("script"),
        Cap::Tool("rsync"),
        Cap::File("/dev/fuse"),
    ]);
    if !testkit::require(test, &need) {
        return false;
    }
    if !obuilderfs().is_file() {
        // `cargo test --workspace` builds it; a lone `-p obuilder` run may not have.
        let out = Command::new(env!("CARGO"))
            .args(["build", "-p", "obuilderfs"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    true
}

/// A private mount namespace, and the build setup of one test.
struct Farm {
    holder: Child,
    /// The test's build users.
    pool: (u32, u32),
    home: String,
    brew: String,
    base: PathBuf,
}

impl Farm {
    /// `dir` must be 0755 (build users reach the home path through it).
    fn new(dir: &Path, pool: (u32, u32)) -> Farm {
        let holder = testkit::e2e::mount_namespace(900);
        // A base image as the original's: a home with the profile, and an empty prefix.
        let base = dir.join("base");
        std::fs::create_dir_all(base.join("home")).unwrap();
        std::fs::create_dir_all(base.join("brew")).unwrap();
        std::fs::write(
            base.join("home/.obuilder_profile.sh"),
            format!(
                "export FROM_PROFILE=yes\nexport PATH={}/bin:$PATH\n",
                dir.join("brew").display()
            ),
        )
        .unwrap();
        Farm {
            holder,
            pool,
            home: dir.join("Users/mac").to_string_lossy().into_owned(),
            brew: dir.join("brew").to_string_lossy().into_owned(),
            base,
        }
    }

    /// `obuilder ARGS --store … --sandbox user …` inside the namespace (bounded in time;
    /// `--foreground`: a signal to `timeout` reaches the builder once, not twice through
    /// its process group, so that a test's Ctrl-C is a graceful cancel).
    fn command(&self, env: &Env, args: &[&str], extra: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["--foreground", "300", "nsenter", "-t"])
            .arg(self.holder.id().to_string())
            .args(["-m", "--", bin()])
            .args(env.args(args))
            .args([
                "--sandbox",
                "user",
                "--user-pool",
                &format!("{}-{}", self.pool.0, self.pool.1),
                "--home-path",
                &self.home,
                "--brew-path",
                &self.brew,
                "--obuilderfs",
                obuilderfs().to_str().unwrap(),
            ])
            .args(extra);
        c
    }

    fn build(&self, env: &Env, spec: &Path, extra: &[&str]) -> Output {
        self.command(
            env,
            &[
                "build",
                "-f",
                spec.to_str().unwrap(),
                env.ctx.to_str().unwrap(),
            ],
            extra,
        )
        .output()
        .unwrap()
    }

    /// A build started in the background, its output to `out` (`Stdio::piped` or `null`).
    fn spawn(&self, env: &Env, spec: &Path, out: fn() -> Stdio) -> Child {
        self.command(
            env,
            &[
                "build",
                "-f",
                spec.to_str().unwrap(),
                env.ctx.to_str().unwrap(),
            ],
            &[],
        )
        .stdout(out())
        .stderr(out())
        .spawn()
        .unwrap()
    }

    fn import(&self, env: &Env) {
        // No PATH in the image: the profile sets it (an image's env overrides it).
        let out = env.run(&[
            "image",
            "import",
            "macbase",
            self.base.to_str().unwrap(),
            "--env",
            "HOMEBREW_NO_AUTO_UPDATE=1",
        ]);
        assert!(out.status.success(), "import: {}", text(&out.stderr));
    }

    /// Processes of the pool's users, as "uid pid cmd" lines.
    fn leftovers(&self) -> String {
        let uids: Vec<String> = (self.pool.0..=self.pool.1).map(|u| u.to_string()).collect();
        running(&uids.join(","))
    }
}

/// Live processes of the uids (comma-separated), as "pid cmd" lines; zombies, which run
/// nothing and wait for a parent that is not the builder's to reap them, are not counted.
fn running(uids: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-a", "-U", uids])
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .filter(|l| !l.ends_with("<defunct>"))
        .map(|l| format!("{l}\n"))
        .collect()
}

impl Drop for Farm {
    fn drop(&mut self) {
        let ns = std::fs::read_link(format!("/proc/{}/ns/mnt", self.holder.id())).ok();
        // The obuilderfs daemons the builds started in the namespace: unmount cleanly.
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if pid.parse::<i32>().is_err() {
                continue;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "obuilderfs"
                && std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok() == ns
            {
                let _ = Command::new("kill").arg(&pid).status();
            }
        }
        let uids: Vec<String> = (self.pool.0..=self.pool.1).map(|u| u.to_string()).collect();
        let _ = Command::new("pkill")
            .args(["-9", "-U", &uids.join(",")])
            .status();
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Deletes the build users of `pool` and their group (the first uid), if they exist.
fn forget_build_users((first, last): (u32, u32)) {
    for uid in first..=last {
        let _ = Command::new("userdel")
            .arg(format!("obuilder{uid}"))
            .output();
    }
    let _ = Command::new("groupdel")
        .arg(format!("obuilder{first}"))
        .output();
    for uid in first..=last {
        let out = Command::new("getent")
            .args(["passwd", &uid.to_string()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "build user {uid} is still there");
    }
}

fn tempdir_0755() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir
}

/// No half-done build and no scoreboard entry left.
fn assert_clean(env: &Env) {
    let root = env.root();
    let tmp: Vec<_> = std::fs::read_dir(root.join("result-tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "result-tmp: {tmp:?}");
    for tree in ["home", "brew"] {
        let sb = root.join("state/user-sandbox/scoreboard").join(tree);
        let left: Vec<_> = std::fs::read_dir(&sb).into_iter().flatten().collect();
        assert!(left.is_empty(), "{}: {left:?}", sb.display());
    }
}

fn ok(out: &Output, what: &str) -> String {
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{what}:\n{all}");
    all
}

/// Steps write into $HOME and into the redirected prefix, use a cache and a secret, run
/// as a build user in a login shell that read the profile; built twice, everything is
/// cached the second time. On btrfs, rsync and overlayfs with obuilderfs, and on rsync
/// without FUSE.
#[test]
fn home_and_prefix_steps_cached_on_every_store_kind() {
    if !machine_ok("home_and_prefix_steps_cached_on_every_store_kind") {
        return;
    }
    for (i, (kind, extra)) in [
        ("btrfs", &[][..]),
        ("rsync-copy", &[][..]),
        ("rsync-copy", &["--no-fuse"][..]),
        // A cache cannot be renamed into an overlay mount: copied in and out.
        ("overlayfs", &[][..]),
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("{kind} {extra:?}");
        let env = Env::new(bin(), kind);
        let dir = tempdir_0755();
        let pool = (61100 + 10 * i as u32, 61102 + 10 * i as u32);
        let farm = Farm::new(dir.path(), pool);
        farm.import(&env);
        let secret = env.tmp.path().join("tok");
        std::fs::write(&secret, "s3cret").unwrap();
        let spec = env.spec(
            "s.spec",
            &format!(
                "((from macbase)\n \
                 (workdir {home}/src)\n \
                 (run (shell \"id -u > uid; echo HOME=$HOME PROFILE=$FROM_PROFILE; echo $HOME > where; test -d $TMPDIR && test -w $TMPDIR && echo private-tmp\"))\n \
                 (run (shell \"mkdir -p {brew}/bin && printf '#!/bin/sh\\\\necho brewed\\\\n' > {brew}/bin/hello && chmod +x {brew}/bin/hello && hello\"))\n \
                 (run (cache (dl (target {home}/.cache/dl))) (shell \"echo once >> ~/.cache/dl/n; wc -l < ~/.cache/dl/n\"))\n \
                 (run (secrets (tok (target /run/secrets/tok))) (shell \"cat $OBUILDER_SECRETS_DIR/tok; echo; stat -c %a $OBUILDER_SECRETS_DIR/tok\"))\n \
                 (run (shell \"cat where; ls {brew}/bin; hello; ls -A ~/.cache/dl 2>/dev/null | wc -l\")))",
                home = farm.home,
                brew = farm.brew
            ),
        );
        let first = ok(
            &farm.build(
                &env,
                &spec,
                &["--secret", &format!("tok:{}", secret.display())],
            ),
            &what,
        );
        for want in [
            &format!("HOME={} PROFILE=yes", farm.home)[..],
            "private-tmp",
            "brewed",
            "\n1\n",
            "***",
            "\n400\n",
            &format!("{}\nhello\nbrewed\n0\n", farm.home),
        ] {
            assert!(first.contains(want), "{what}: no {want:?} in\n{first}");
        }
        assert!(!first.contains("s3cret"), "{what}: the secret was shown");
        // `run` on the result, in the same sandbox: as a build user, with its home.
        let id = first
            .split("Got: \"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_else(|| panic!("{what}: no id in\n{first}"))
            .to_string();
        let out = farm
            .command(&env, &["run", &id], &[])
            .args(["--", "/bin/sh", "-c", "cat where; hello; exit 4"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4), "{what}: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            format!("{}\nbrewed\n", farm.home),
            "{what}"
        );
        // `shell` on a terminal (script(1) gives it one): the shell runs as a build user on
        // that terminal, in the home, and exits as told.
        let sh = farm.command(&env, &["shell", &id], &[]);
        let cmdline = std::iter::once(sh.get_program())
            .chain(sh.get_args())
            .map(|a| format!("'{}'", a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ");
        let out = testkit::e2e::output_with_stdin(
            Command::new("script").args(["-qec", &cmdline, "/dev/null"]),
            b"tty; cat where; id -u; exit 5\n",
        );
        let o = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(5),
            "{what}: {o}{}",
            text(&out.stderr)
        );
        assert!(o.contains("/dev/pts/"), "{what}: {o}");
        assert!(o.contains(&format!("{}\r\n", farm.home)), "{what}: {o}");
        // The cache kept what the step wrote, outside the snapshot.
        let spec2 = env.spec(
            "s2.spec",
            &format!(
                "((from macbase) (run (cache (dl (target {}/.cache/dl))) (shell \"echo again >> ~/.cache/dl/n; wc -l < ~/.cache/dl/n\")))",
                farm.home
            ),
        );
        let cached = ok(&farm.build(&env, &spec2, &[]), &what);
        assert!(cached.contains("\n2\n"), "{what}: cache lost:\n{cached}");
        let again = ok(
            &farm.build(
                &env,
                &spec,
                &["--secret", &format!("tok:{}", secret.display())],
            ),
            &what,
        );
        assert!(
            !again.contains("saved as") && again.matches("from cache").count() >= 5,
            "{what}: a step ran again:\n{again}"
        );
        // Refusals name the rule.
        for (name, body, why) in [
            (
                "bad.spec",
                "((from macbase) (workdir /etc) (run (shell \"true\")))",
                "outside the build user's home",
            ),
            (
                "bad2.spec",
                "((from macbase) (user (uid 7) (gid 7)) (run (shell \"true\")))",
                "runs every step as a build user",
            ),
        ] {
            let out = farm.build(&env, &env.spec(name, body), &[]);
            let msg = text(&out.stderr);
            assert!(!out.status.success() && msg.contains(why), "{what}: {msg}");
        }
        assert_eq!(farm.leftovers(), "", "{what}: processes left");
        drop(farm);
        assert_clean(&env);
    }
}

/// A result built by one build user goes on as another: the later step reads back the
/// absolute $HOME path the first wrote, and finds (and may change) its files there.
#[test]
fn result_built_by_one_user_continues_as_another() {
    if !machine_ok("result_built_by_one_user_continues_as_another") {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let dir = tempdir_0755();
    let farm = Farm::new(dir.path(), (61200, 61202));
    farm.import(&env);
    let first =
        "(run (shell \"id -u; echo $HOME > where; mkdir -p lib && echo built > lib/file\"))";
    let spec = env.spec("a.spec", &format!("((from macbase) {first})"));
    let out = ok(&farm.build(&env, &spec, &[]), "first");
    assert!(
        out.contains("61200"),
        "the first step ran as the first user:\n{out}"
    );
    // Hold the first build user with a long step, so the next step gets another.
    let hold = env.spec(
        "hold.spec",
        "((from macbase) (run (shell \"echo holding; sleep 60\")))",
    );
    let mut holding = farm.spawn(&env, &hold, Stdio::null);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !farm.leftovers().contains("sleep 60") {
        assert!(Instant::now() < deadline, "the holding step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let spec2 = env.spec(
        "b.spec",
        &format!(
            "((from macbase) {first}\n (run (shell \"id -u; cat $(cat where)/lib/file && echo more >> $(cat where)/lib/file && ls -ln lib\")))"
        ),
    );
    let out = ok(&farm.build(&env, &spec2, &[]), "second");
    assert!(
        out.contains("61201\nbuilt\n"),
        "not run as another user, or lost:\n{out}"
    );
    // The stored files belong to the first uid, shown to the second as its own.
    assert!(
        out.contains(" 61201 61200 "),
        "owner as seen by 61201:\n{out}"
    );
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(holding.id().to_string())
        .status();
    let _ = holding.wait();
}

/// Three specs at once as three users: none sees another's files; cancelling one kills
/// all of its processes (a daemon it left behind included) and the others go on.
#[test]
fn three_builds_at_once_isolated_and_one_cancelled() {
    if !machine_ok("three_builds_at_once_isolated_and_one_cancelled") {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let dir = tempdir_0755();
    let farm = Farm::new(dir.path(), (61300, 61302));
    // As on a new host: the three builders find no build user and create them at once.
    forget_build_users(farm.pool);
    farm.import(&env);
    let mut builds = Vec::new();
    for name in ["a", "b"] {
        let spec = env.spec(
            &format!("{name}.spec"),
            &format!(
                "((from macbase) (run (shell \"echo {name} > mine-{name}; touch {brew}/brew-{name}; sleep 4; ls ~ {brew}\")))",
                brew = farm.brew
            ),
        );
        let child = farm.spawn(&env, &spec, Stdio::piped);
        builds.push((name, child));
    }
    let doomed = env.spec(
        "c.spec",
        "((from macbase) (run (shell \"(setsid sleep 301 >/dev/null 2>&1 &); echo started; sleep 300\")))",
    );
    let mut cancelled = farm.spawn(&env, &doomed, Stdio::piped);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(farm.leftovers().contains("sleep 301") && farm.leftovers().contains("sleep 300")) {
        assert!(Instant::now() < deadline, "the third step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let uid_of = |pat: &str| {
        let out = Command::new("pgrep")
            .args(["-f", "-x", pat])
            .output()
            .unwrap();
        let pid = text(&out.stdout).lines().next().unwrap_or("").to_string();
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(String::from))
            .unwrap_or_default()
    };
    let doomed_uid = uid_of("sleep 301");
    // Cancel (as Ctrl-C does) the third build.
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(cancelled.id().to_string())
        .status();
    let status = cancelled.wait().unwrap();
    assert!(!status.success());
    // One SIGINT (`timeout --foreground` passes it to the builder alone): the builder
    // cancels the step, whose processes are killed; zombies may take a moment to be reaped.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = running(&doomed_uid);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "uid {doomed_uid} kept processes:\n{left}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (name, child) in builds {
        let out = child.wait_with_output().unwrap();
        let all = ok(&out, name);
        let other = if name == "a" { "b" } else { "a" };
        assert!(all.contains(&format!("mine-{name}")), "{name}:\n{all}");
        assert!(all.contains(&format!("brew-{name}")), "{name}:\n{all}");
        assert!(
            !all.contains(&format!("mine-{other}")) && !all.contains(&format!("brew-{other}")),
            "{name} saw {other}'s files:\n{all}"
        );
    }
    assert_eq!(farm.leftovers(), "", "processes left");
    drop(farm);
    assert_clean(&env);
}

/// A builder killed with SIGKILL mid-step cannot kill its step's processes itself: its
/// supervisor does, as soon as the builder's end of the pipe closes.
#[test]
fn builder_killed_mid_step_leaves_no_process_of_the_user() {
    if !machine_ok("builder_killed_mid_step_leaves_no_process_of_the_user") {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let dir = tempdir_0755();
    let farm = Farm::new(dir.path(), (61400, 61400));
    farm.import(&env);
    let spec = env.spec(
        "k.spec",
        "((from macbase) (run (shell \"(setsid sleep 303 >/dev/null 2>&1 &); sleep 302\")))",
    );
    let mut build = farm.spawn(&env, &spec, Stdio::null);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(farm.leftovers().contains("sleep 303") && farm.leftovers().contains("sleep 302")) {
        assert!(Instant::now() < deadline, "the step never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // `timeout`'s child is the builder (nsenter execs it).
    let out = Command::new("pgrep")
        .args(["-P", &build.id().to_string()])
        .output()
        .unwrap();
    let builder = text(&out.stdout).trim().to_string();
    assert!(!builder.is_empty(), "no builder process");
    let _ = Command::new("kill").args(["-9", &builder]).status();
    let _ = build.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = farm.leftovers();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "processes left:\n{left}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its supervisor is gone too (it holds the user until then).
    let deadline = Instant::now() + Duration::from_secs(20);
    while Command::new("pgrep")
        .args(["-f", "obuilder-user-supervisor 61400"])
        .status()
        .unwrap()
        .success()
    {
        assert!(Instant::now() < deadline, "the supervisor never exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The killed step's private TMPDIR goes when the next builder starts.
    let private = || {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("obuilder-tmp-61400-")
            })
            .count()
    };
    assert!(private() > 0, "the killed step's TMPDIR is there");
    let next = env.spec("n.spec", "((from macbase) (run (shell \"true\")))");
    ok(&farm.build(&env, &next, &[]), "next build");
    assert_eq!(private(), 0, "left TMPDIRs removed");
}

/// A descriptor that whoever started the builder left open without close-on-exec never
/// reaches a build user's step (`setpriv` passes every open descriptor on): here a
/// directory the build user could otherwise read through `/proc/self/fd/N/`. Nor do its
/// umask and ignored signals.
#[test]
fn a_descriptor_the_builder_inherited_never_reaches_a_build_user() {
    use std::os::fd::AsRawFd;
    if !machine_ok("a_descriptor_the_builder_inherited_never_reaches_a_build_user") {
        return;
    }
    let env = Env::new(bin(), "btrfs");
    let dir = tempdir_0755();
    let farm = Farm::new(dir.path(), (61700, 61700));
    farm.import(&env);
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("marker"), "host-secret-3982\n").unwrap();
    let held = std::fs::File::open(&outside).unwrap();
    let spec = env.spec(
        "fd.spec",
        "((from macbase) (run (shell \"echo umask: $(umask); grep SigIgn /proc/self/status; echo fds: $(ls /proc/self/fd); for f in /proc/self/fd/*; do cat $f/marker 2>/dev/null; done; echo probed\")))",
    );
    let mut cmd = farm.command(
        &env,
        &[
            "build",
            "-f",
            spec.to_str().unwrap(),
            env.ctx.to_str().unwrap(),
        ],
        &[],
    );
    let held_fd = held.as_raw_fd();
    leave_open(&mut cmd, held_fd, 9);
    // And started under a umask of 077 and with SIGUSR1 ignored (`timeout` resets SIGINT),
    // which the build user's command must not get.
    testkit::e2e::with_umask(&mut cmd, 0o077);
    // SAFETY: signal is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGUSR1, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = ok(&cmd.output().unwrap(), "build");
    assert!(out.contains("probed"), "{out}");
    assert!(
        !out.contains("host-secret-3982"),
        "the build user read the host's file:\n{out}"
    );
    // The three streams and `ls`'s own directory: nothing else is open in the step.
    assert!(out.contains("fds: 0 1 2 3\n"), "{out}");
    assert!(out.contains("umask: 0022\n"), "{out}");
    let ignored = out
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok());
    assert_eq!(
        ignored.map(|m| m & (1 << (libc::SIGUSR1 - 1))),
        Some(0),
        "{out}"
    );
    drop(held);
}

/// `obuilder base-image build`: a macOS base image made by a spec `(from scratch)` with the
/// user sandbox, pushed to a registry as an OCI image of `home/` and `brew/`, then pulled by
/// another store's `(from REF)` and built on, as a worker would.
#[test]
fn base_image_built_from_scratch_pushed_and_built_on() {
    if !machine_ok("base_image_built_from_scratch_pushed_and_built_on")
        || !testkit::require(
            "base_image_built_from_scratch_pushed_and_built_on",
            &[Cap::Tool("docker-registry")],
        )
    {
        return;
    }
    let registry = testkit::registry::TestRegistry::start();
    let env = Env::new(bin(), "btrfs");
    let dir = tempdir_0755();
    let farm = Farm::new(dir.path(), (61500, 61501));
    let base = env.spec(
        "base.spec",
        &format!(
            "((from scratch)\n \
             (run (shell \"printf 'export PATH={brew}/bin:$PATH\\\\nexport FROM_BASE=yes\\\\n' > ~/.obuilder_profile.sh\"))\n \
             (run (shell \"mkdir -p {brew}/bin && printf '#!/bin/sh\\\\necho brewed\\\\n' > {brew}/bin/tool && chmod +x {brew}/bin/tool\")))",
            brew = farm.brew
        ),
    );
    let target = format!("{}/macos/base:1", registry.addr);
    let out = ok(
        &farm
            .command(
                &env,
                &[
                    "base-image",
                    "build",
                    "-f",
                    base.to_str().unwrap(),
                    env.ctx.to_str().unwrap(),
                ],
                &["--push", &target],
            )
            .output()
            .unwrap(),
        "base-image build",
    );
    assert!(out.contains("Pushed ") && out.contains(&target), "{out}");

    // A spec without the profile is refused as a base image, with what to add.
    let bad = env.spec(
        "bad.spec",
        "((from scratch) (run (shell \"echo no profile > ~/readme\")))",
    );
    let out = farm
        .command(
            &env,
            &[
                "base-image",
                "build",
                "-f",
                bad.to_str().unwrap(),
                env.ctx.to_str().unwrap(),
            ],
            &["--push", &format!("{}/macos/bad:1", registry.addr)],
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("has no home/.obuilder_profile.sh"),
        "{}",
        text(&out.stderr)
    );

    // `(from REF)` pulls it (a new base, from the registry's layers, not the results that
    // made it) and builds on it: the profile and the tool are there.
    let spec = env.spec(
        "use.spec",
        &format!("((from {target}) (run (shell \"echo base=$FROM_BASE; tool; id -u\")))"),
    );
    let out = ok(&farm.build(&env, &spec, &[]), "build on the pushed base");
    assert!(out.contains("Extracting layer 3/3"), "pulled: {out}");
    assert!(out.contains("base=yes\nbrewed\n61500"), "{out}");
    assert_clean(&env);

    // A second store cannot use the home path this store's obuilderfs serves: said plainly.
    let other = Env::new(bin(), "rsync-copy");
    let spec = other.spec(
        "o.spec",
        &format!("((from {target}) (run (shell \"true\")))"),
    );
    let out = farm.build(&other, &spec, &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is served by an obuilderfs of another store"),
        "{}",
        text(&out.stderr)
    );
}

/// The macOS design on a ZFS store (the original's, but several builds at once): `(from
/// macos)` clones `tank/base-image/macos`'s `home` and `brew` children, each step's
/// children are mounted in its tree and shown to its build user by obuilderfs at the one
/// home path and prefix. ZFS itself is the fake (`fake-zfs` as `zfs` and `zpool` on PATH:
/// no ZFS module for this kernel); the build users, obuilderfs and FUSE are real.
#[test]
fn macos_design_on_a_zfs_store_with_home_and_brew_children() {
    if !machine_ok("macos_design_on_a_zfs_store_with_home_and_brew_children") {
        return;
    }
    let fake_bin = Path::new(bin()).with_file_name("fake-zfs");
    if !fake_bin.is_file() {
        let out = Command::new(env!("CARGO"))
            .args(["build", "-p", "testkit", "--bin", "fake-zfs"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let mut env = Env::new(bin(), "btrfs");
    let dir = tempdir_0755();
    let farm = Farm::new(dir.path(), (61600, 61602));
    // The pool, and a base image as `zfs recv` would leave it.
    let zdir = env.tmp.path().join("fake-zfs");
    let root = dir.path().join("tank");
    let fake = testkit::fakezfs::FakeZfs::new("tank", &root, &zdir.join("files"));
    let zfs = |args: &[&str]| {
        let mut argv = vec!["zfs".to_string()];
        argv.extend(args.iter().map(|s| s.to_string()));
        fake.run_argv(&argv).unwrap();
    };
    zfs(&["create", "tank/base-image"]);
    zfs(&["create", "tank/base-image/macos"]);
    zfs(&["create", "tank/base-image/macos/home"]);
    zfs(&["create", "tank/base-image/macos/brew"]);
    std::fs::write(
        root.join("base-image/macos/home/.obuilder_profile.sh"),
        format!(
            "export FROM_BASE=zfs\nexport PATH={}/bin:$PATH\n",
            farm.brew
        ),
    )
    .unwrap();
    std::fs::create_dir(root.join("base-image/macos/brew/bin")).unwrap();
    zfs(&["snapshot", "-r", "tank/base-image/macos@snap"]);
    fake.save(&zdir).unwrap();
    let bindir = env.tmp.path().join("zfs-bin");
    std::fs::create_dir(&bindir).unwrap();
    for name in ["zfs", "zpool"] {
        std::os::unix::fs::symlink(&fake_bin, bindir.join(name)).unwrap();
    }
    env.store = format!("zfs:{}", root.display());
    let path = format!("{}:{}", bindir.display(), std::env::var("PATH").unwrap());
    let build = |name: &str, body: &str| {
        let spec = env.spec(name, body);
        let mut c = farm.command(
            &env,
            &[
                "build",
                "-f",
                spec.to_str().unwrap(),
                env.ctx.to_str().unwrap(),
            ],
            &[],
        );
        c.env("PATH", &path).env("FAKE_ZFS_DIR", &zdir);
        c
    };
    let spec = |n: &str| {
        format!(
            "((from macos)\n \
             (run (shell \"echo base=$FROM_BASE; echo {n} > ~/mine; printf '#!/bin/sh\\\\necho tool-{n}\\\\n' > {brew}/bin/tool; chmod +x {brew}/bin/tool; sleep 1\"))\n \
             (run (shell \"cat ~/mine; tool; id -u\")))",
            brew = farm.brew
        )
    };
    // Two builds at once, each its own build user, home and prefix.
    let start = |name: &str, n: &str| {
        build(name, &spec(n))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start("a.spec", "a"), start("b.spec", "b"));
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (a, b) = (ok(&a, "a"), ok(&b, "b"));
    assert!(a.contains("base=zfs") && a.contains("a\ntool-a\n"), "{a}");
    assert!(b.contains("base=zfs") && b.contains("b\ntool-b\n"), "{b}");
    assert!(
        a.contains("Cloned base image tank/base-image/macos (brew, home)")
            || b.contains("Cloned base image tank/base-image/macos (brew, home)"),
        "{a}\n{b}"
    );
    // Cached the second time.
    let again = ok(&build("a.spec", &spec("a")).output().unwrap(), "again");
    assert!(!again.contains("saved as"), "{again}");

    // Each result is a dataset whose home and brew children have their snapshot.
    let fake = testkit::fakezfs::FakeZfs::load(&zdir).unwrap();
    let names = fake.names();
    let children = names
        .iter()
        .filter(|n| n.starts_with("tank/result/") && n.ends_with("/home@snap"))
        .count();
    assert!(children >= 3, "base + two steps each: {names:?}");
    let scoreboard = root.join("state/user-sandbox/scoreboard/home");
    let left: Vec<_> = std::fs::read_dir(&scoreboard)
        .into_iter()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
