//! The whole cluster for real: `ocluster-scheduler`, `ocluster-worker`s running OBuilder
//! jobs in the native sandbox and runc on btrfs stores on a loopback filesystem, and
//! `ocluster-client`, each in its own process, over TLS on 127.0.0.1.

// Tests start the real programs as processes.
#![allow(clippy::disallowed_methods)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Scheduler, TIMEOUT};
use testkit::Cap;

/// A process whose stdout lines are read as they come.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = common::read_lines(child.stdout.take().unwrap(), None);
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `text`.
    fn expect(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(text) {
                        return l;
                    }
                }
                Err(_) => panic!("no line with {text:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Reads to the end and returns the exit code.
    fn finish(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(50));
                while let Ok(l) = self.lines.try_recv() {
                    self.seen.push(l);
                }
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "{}", self.seen.join("\n"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self) -> String {
        self.seen.join("\n")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker process with its own btrfs store (busybox imported) and state dir.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(s: &Scheduler, fs: &Path, name: &str, capacity: u32) -> Worker {
        Worker::start_with(s, fs, name, capacity, &[])
    }

    fn start_with(s: &Scheduler, fs: &Path, name: &str, capacity: u32, extra: &[&str]) -> Worker {
        let store = fs.join(format!("store-{name}"));
        import_busybox(&store, &fs.join("busybox"));
        let log = s.dir.path().join(format!("worker-{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_ocluster-worker"))
            .arg("-c")
            .arg(s.pool_cap("linux"))
            .args(["--name", name, "--capacity", &capacity.to_string()])
            .arg("--state-dir")
            .arg(s.dir.path().join(format!("state-{name}")))
            .arg(format!("--obuilder-store=btrfs:{}", store.display()))
            .args(["--fast-sync", "-v"])
            .args(
                (!extra.contains(&"--obuilder-healthcheck"))
                    .then_some(["--obuilder-healthcheck", "0"])
                    .into_iter()
                    .flatten(),
            )
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let w = Worker { child, log };
        w.wait_log("Registered as");
        w
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the worker's log has `text` `n` times.
    fn wait_log_n(&self, text: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log().matches(text).count() < n {
            assert!(Instant::now() < deadline, "no {text:?} in:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_log(&self, text: &str) {
        self.wait_log_n(text, 1)
    }
}

impl Worker {
    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// `kill -9`: no chance to clean up.
    fn kill_hard(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SIGINT aborts the running jobs (SIGTERM would wait for them).
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + TIMEOUT;
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn import_busybox(store: &Path, rootfs: &Path) {
    if !rootfs.exists() {
        testkit::e2e::make_busybox(rootfs);
    }
    let config = obuilder_config::BuilderConfig::new(
        obuilder_config::StoreSpec::parse(&format!("btrfs:{}", store.display()), None).unwrap(),
    );
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        obuilder_fetch::import::import(
            &config.images(),
            &config.exec,
            obuilder_fetch::import::ImportRequest {
                name: "busybox",
                path: rootfs,
                env: Some(vec![(
                    "PATH".into(),
                    "/usr/sbin:/usr/bin:/sbin:/bin".into(),
                )]),
                platform: None,
            },
        )
        .await
        .unwrap();
    });
}

fn client(cap: &Path, spec: &Path, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocluster-client"));
    cmd.arg("submit-obuilder")
        .arg("-c")
        .arg(cap)
        .args(["--pool", "linux", "--local-file"])
        .arg(spec)
        .args(extra);
    Proc::spawn(cmd)
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A repository with a base commit and two branches off it: `one` adds b.txt, `two` adds
/// c.txt, and `clash` changes a.txt as `one` does, differently.
fn repo(dir: &Path) -> (String, String, String, String) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q"]);
    std::fs::write(dir.join("a.txt"), "base\n").unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "base"]);
    git(dir, &["checkout", "-qb", "one"]);
    std::fs::write(dir.join("b.txt"), "from one\n").unwrap();
    std::fs::write(dir.join("a.txt"), "one\n").unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "one"]);
    let one = git(dir, &["rev-parse", "HEAD"]);
    git(dir, &["checkout", "-q", "main"]);
    git(dir, &["checkout", "-qb", "two"]);
    std::fs::write(dir.join("c.txt"), "from two\n").unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "two"]);
    let two = git(dir, &["rev-parse", "HEAD"]);
    git(dir, &["checkout", "-q", "main"]);
    git(dir, &["checkout", "-qb", "clash"]);
    std::fs::write(dir.join("a.txt"), "clash\n").unwrap();
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "clash"]);
    let clash = git(dir, &["rev-parse", "HEAD"]);
    (format!("file://{}", dir.display()), one, two, clash)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut t = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    t.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(t, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut s = String::new();
    t.read_to_string(&mut s).unwrap();
    s
}

/// What every test here needs from the machine, beyond `more`; false (skip, or fail
/// under OBUILDER_TEST_STRICT=1) if something is missing.
fn machine_has(test: &str, more: &[Cap]) -> bool {
    let mut caps = vec![
        Cap::Root,
        Cap::Tool("runc"),
        Cap::File("/bin/busybox"),
        Cap::Tool("mkfs.btrfs"),
        Cap::Tool("tar"),
    ];
    caps.extend_from_slice(more);
    testkit::require(test, &caps)
}

/// A btrfs filesystem for the workers' stores, a scheduler with `args`, and client
/// alice's cap file.
fn cluster(args: &[&str]) -> (testkit::LoopFs, Scheduler, PathBuf) {
    let fs = testkit::LoopFs::new("btrfs", 1024);
    let s = Scheduler::start(&["linux"], args);
    let alice = s.add_client("alice");
    (fs, s, alice)
}

/// A one-step spec running `cmd` under `/bin/sh -c`.
fn sh_spec(dir: &Path, name: &str, cmd: &str) -> PathBuf {
    spec(
        dir,
        name,
        &format!("((from busybox)\n (shell /bin/sh -c)\n (run (shell {cmd:?})))\n"),
    )
}

fn spec(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// Git contexts with two commits merged, the log streamed live, the same cache hint on
/// the same worker, and bad input that fails its job while the worker goes on.
#[test]
fn git_jobs_logs_affinity_and_bad_input() {
    if !machine_has("git_jobs", &[Cap::Tool("git")]) {
        return;
    }
    let prom = free_port();
    let (fs, s, alice) = cluster(&[&format!("--listen-prometheus=127.0.0.1:{prom}")]);
    // An additional metric the worker relays: a one-shot HTTP server.
    let extra = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra_uri = format!("extra:http://{}/m", extra.local_addr().unwrap());
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = extra.accept() {
            use std::io::{Read, Write};
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf);
            let _ = c
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nextra_metric 42\n");
        }
    });
    let w1 = Worker::start_with(&s, &fs.mnt, "w1", 2, &["--additional-metrics", &extra_uri]);
    // w1 runs its jobs in the default (native) sandbox, w2 in runc.
    let w2 = Worker::start_with(&s, &fs.mnt, "w2", 2, &["--sandbox", "runc"]);
    let (url, one, two, clash) = repo(&s.dir.path().join("repo"));

    // Two commits merged: the context has the files of both.
    let merged = spec(
        s.dir.path(),
        "merged",
        "((from busybox)\n (shell /bin/sh -c)\n (copy (src a.txt b.txt c.txt) (dst /src/))\n \
         (run (shell \"cat /src/a.txt /src/b.txt /src/c.txt\")))\n",
    );
    let mut c = client(&alice, &merged, &["--cache-hint", "opam", &url, &one, &two]);
    c.expect("Tailing log:");
    let building = c.expect("Building on");
    c.expect("one");
    c.expect("from one");
    c.expect("from two");
    c.expect("Job succeeded");
    c.expect("Result: \"");
    assert_eq!(c.finish(), 0, "{}", c.output());
    let first = building.trim_start_matches("Building on ").to_string();

    // The same hint goes to the same worker (several times, both workers idle).
    for i in 0..3 {
        let body =
            format!("((from busybox)\n (shell /bin/sh -c)\n (run (shell \"echo again {i}\")))\n");
        let p = spec(s.dir.path(), &format!("again{i}"), &body);
        let mut c = client(&alice, &p, &["--cache-hint", "opam"]);
        assert_eq!(c.expect("Building on"), format!("Building on {first}"));
        c.expect(&format!("again {i}"));
        assert_eq!(c.finish(), 0, "{}", c.output());
    }

    // The log arrives while the step runs.
    let slow = spec(
        s.dir.path(),
        "slow",
        "((from busybox)\n (shell /bin/sh -c)\n \
         (run (shell \"echo tick-1; sleep 3; echo tick-2\")))\n",
    );
    let mut c = client(&alice, &slow, &[]);
    c.expect("tick-1");
    let t = Instant::now();
    assert!(
        c.child.try_wait().unwrap().is_none(),
        "the job was over already"
    );
    c.expect("tick-2");
    assert!(
        t.elapsed() > Duration::from_millis(500),
        "tick-1 came with the end"
    );
    assert_eq!(c.finish(), 0, "{}", c.output());

    // A secret reaches the step, and is masked in the log the client sees.
    let token = s.dir.path().join("token");
    std::fs::write(&token, "s3cr3t-value").unwrap();
    let with_secret = spec(
        s.dir.path(),
        "with-secret",
        "((from busybox)\n (shell /bin/sh -c)\n \
         (run (secrets (token (target /run/secrets/token))) \
              (shell \"echo token=$(cat /run/secrets/token)\")))\n",
    );
    let arg = format!("token:{}", token.display());
    let mut c = client(&alice, &with_secret, &["--secret", &arg]);
    c.expect("(run (secrets");
    assert_eq!(c.expect("token="), "token=***");
    assert_eq!(c.finish(), 0, "{}", c.output());
    assert!(!c.output().contains("s3cr3t-value"));

    // Bad input: each job fails clearly.
    let plain = sh_spec(s.dir.path(), "plain", "echo fine");
    let unparsable = spec(s.dir.path(), "bad", "((from busybox) (run oops)\n");
    let mut c = client(&alice, &unparsable, &[]);
    c.expect("Invalid spec");
    c.expect("Failed: Build failed.");
    assert_eq!(c.finish(), 1);
    let secret = spec(
        s.dir.path(),
        "secret",
        "((from busybox)\n (shell /bin/sh -c)\n \
         (run (secrets (token (target /run/secrets/token))) (shell \"true\")))\n",
    );
    let mut c = client(&alice, &secret, &[]);
    c.expect("token");
    assert_eq!(c.finish(), 1, "{}", c.output());
    let mut c = client(&alice, &plain, &[&url, &"0".repeat(40)]);
    c.expect("is not in");
    assert_eq!(c.finish(), 1, "{}", c.output());
    let mut c = client(&alice, &plain, &[&url, &one, &clash]);
    c.expect("merge conflict");
    assert_eq!(c.finish(), 1, "{}", c.output());
    let gone = format!("file://{}/nowhere", s.dir.path().display());
    let mut c = client(&alice, &plain, &[&gone, &one]);
    c.expect("cannot fetch");
    assert_eq!(c.finish(), 1, "{}", c.output());
    // And the workers go on.
    let mut c = client(&alice, &plain, &[]);
    c.expect("fine");
    assert_eq!(c.finish(), 0, "{}", c.output());
    // The worker's metrics, through the scheduler's relay.
    let agent = http_get(prom, "/pool/linux/worker/w1/metrics");
    assert!(
        agent.contains("ocluster_worker_jobs_accepted_total"),
        "{agent}"
    );
    assert!(agent.contains("ocluster_worker_running_jobs 0"), "{agent}");
    let extra = http_get(prom, "/pool/linux/worker/w1/extra");
    assert!(extra.ends_with("extra_metric 42\n"), "{extra}");
    let none = http_get(prom, "/pool/linux/worker/w2/extra");
    assert!(none.starts_with("HTTP/1.1 404"), "{none}");

    // No build context is left behind.
    for w in ["w1", "w2"] {
        let tmp = s.dir.path().join(format!("state-{w}/tmp"));
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "{w}");
    }
    drop((w1, w2));
}

/// How many processes have `sleep 1000` in their command line (the step's shell, inside
/// its container).
fn sleepers() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| {
            c.windows(10)
                .any(|w| w == b"sleep 1000" || w == b"sleep\x001000")
        })
        .count()
}

/// Waits (at most `secs`) until no more step processes run than `before`.
fn sleepers_gone(before: usize, secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while sleepers() > before {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ctrl-C at the client cancels the job: its container is gone within a second or two.
/// Then a worker killed mid-job gives its client a clear error, and a worker that loses
/// the scheduler reconnects and takes jobs again.
#[test]
fn cancel_worker_death_and_reconnect() {
    if !machine_has("cluster", &[]) {
        return;
    }
    // As the original: a job whose worker dies fails (no second attempt).
    let (fs, mut s, alice) = cluster(&["--max-attempts=1"]);
    let w1 = Worker::start(&s, &fs.mnt, "w1", 1);
    let before = sleepers();
    let sleepy = sh_spec(s.dir.path(), "sleepy", "echo sleeping; sleep 1000");
    let mut c = client(&alice, &sleepy, &[]);
    c.expect("sleeping");
    let deadline = Instant::now() + Duration::from_secs(10);
    while sleepers() == before {
        assert!(Instant::now() < deadline, "no step process seen");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.signal(libc::SIGINT);
    c.expect("Job cancelled");
    c.expect("Failed: Build cancelled.");
    assert_eq!(c.finish(), 1);
    sleepers_gone(before, 5, "the step's process is still running");

    // The worker is killed mid-job: the client says so and fails, and the worker's
    // supervisor removes the container.
    let mut c = client(&alice, &sleepy, &[]);
    c.expect("sleeping");
    w1.kill_hard();
    let code = c.finish();
    assert_eq!(code, 1, "{}", c.output());
    let out = c.output();
    eprintln!("client after its worker died:\n{out}");
    assert!(out.contains("Disconnected"), "no clear error: {out}");
    sleepers_gone(before, 10, "the dead worker's step still runs");

    // A worker that loses the scheduler reconnects and takes jobs again.
    let w2 = Worker::start(&s, &fs.mnt, "w2", 1);
    s.restart();
    w2.wait_log_n("Registered as", 2);
    let alice2 = s.dir.path().join("alice.cap");
    let plain = sh_spec(s.dir.path(), "plain", "echo after restart");
    let mut c = client(&alice2, &plain, &[]);
    c.expect("after restart");
    assert_eq!(c.finish(), 0, "{}", c.output());
    assert!(
        w2.log().contains("Lost connection to scheduler"),
        "{}",
        w2.log()
    );

    // `ocluster-admin update`: the worker drains and exits with status 1 for its service
    // manager to start the new binary; the update completes when it is back.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocluster-admin"));
    cmd.arg("-c")
        .arg(s.admin_cap())
        .args(["update", "linux", "w2"]);
    let update = std::thread::spawn(move || common::run_bounded(cmd));
    let mut w2 = w2;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = w2.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not exit for the update"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "{}", w2.log());
    let _w2 = Worker::start(&s, &fs.mnt, "w2", 1);
    let out = update.join().unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    assert_eq!(common::stdout(&out), "w2: Restarting\nRestarted\n");
}

/// A worker whose jobs run in the native sandbox (`--sandbox native`): a job's log comes
/// back, a cancelled job's step is gone at once, and so is the step of a job whose worker
/// is killed with SIGKILL (its process dies with the worker's spawner thread).
#[test]
fn native_sandbox_jobs_run_cancel_and_die_with_their_worker() {
    if !machine_has("cluster", &[]) {
        return;
    }
    let (fs, s, alice) = cluster(&["--max-attempts=1"]);
    let w = Worker::start_with(&s, &fs.mnt, "n1", 2, &["--sandbox", "native"]);
    // (runc names a step's cgroups obuilder-PID-N; the native sandbox obuilder-n-PID-N)
    let hello = sh_spec(
        s.dir.path(),
        "hello",
        "echo hello from $(hostname) pid $$ in $(grep -o obuilder-n- /proc/self/cgroup | head -1)",
    );
    let mut c = client(&alice, &hello, &[]);
    c.expect("hello from builder pid 1 in obuilder-n-");
    assert_eq!(c.finish(), 0, "{}", c.output());

    // Two steps at once in one worker process, each in its own container.
    let jobs: Vec<Proc> = ["a", "b"]
        .iter()
        .map(|n| {
            let spec = sh_spec(
                s.dir.path(),
                &format!("two-{n}"),
                &format!("echo {n}-started; sleep 2; echo {n}-done $(hostname)"),
            );
            client(&alice, &spec, &[])
        })
        .collect();
    let mut jobs = jobs;
    for (j, n) in jobs.iter_mut().zip(["a", "b"]) {
        j.expect(&format!("{n}-started"));
    }
    for (j, n) in jobs.iter_mut().zip(["a", "b"]) {
        // Both started before either was done: they ran at the same time.
        assert!(!j.output().contains("-done builder"), "{n}: {}", j.output());
        j.expect(&format!("{n}-done builder"));
        assert_eq!(j.finish(), 0, "{}", j.output());
    }

    let before = sleepers();
    let sleepy = sh_spec(s.dir.path(), "sleepy", "echo sleeping; sleep 1000");
    let mut c = client(&alice, &sleepy, &[]);
    c.expect("sleeping");
    c.signal(libc::SIGINT);
    c.expect("Job cancelled");
    assert_eq!(c.finish(), 1);
    sleepers_gone(before, 5, "the cancelled step still runs");

    let mut c = client(&alice, &sleepy, &[]);
    c.expect("sleeping");
    let dead = w.child.id();
    w.kill_hard();
    assert_eq!(c.finish(), 1, "{}", c.output());
    sleepers_gone(before, 10, "the dead worker's step still runs");

    // Its step cgroups (empty now) are left to the next builder alone on the store: a
    // worker started again there removes them (and nothing is left on the host).
    let _w = Worker::start_with(&s, &fs.mnt, "n1", 2, &["--sandbox", "native"]);
    testkit::e2e::eventually(
        "the killed worker's step cgroups removed after a restart",
        TIMEOUT.as_secs(),
        || !testkit::e2e::native_cgroup_left(dead),
    );
}

/// A Dockerfile job built with Debian's buildah from a base image in a local registry,
/// pushed back to it: the result is the pushed digest. A push to a repository the worker
/// does not allow fails the job.
#[test]
fn dockerfile_job_with_buildah_and_a_push() {
    let tools = [
        Cap::Tool("buildah"),
        Cap::Tool("skopeo"),
        Cap::Tool("docker-registry"),
    ];
    if !machine_has("dockerfile_job", &tools) {
        return;
    }
    let fs = testkit::LoopFs::new("btrfs", 1024);
    let registry = testkit::registry::TestRegistry::start();
    let addr = registry.addr.clone();
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = tmp.path().join("rootfs");
    testkit::e2e::make_busybox(&rootfs);
    let layout = tmp.path().join("layout");
    testkit::registry::oci::write_layout(
        &layout,
        &[testkit::registry::oci::Image {
            os: "linux",
            arch: "amd64",
            layers: vec![testkit::registry::oci::layer_of_dir(&rootfs)],
            env: vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        }],
    );
    registry.push(&layout, "busybox", "latest");

    let s = Scheduler::start(&["linux"], &[]);
    let alice = s.add_client("alice");
    let allowed = format!("{addr}/app");
    let _w = Worker::start_with(
        &s,
        &fs.mnt,
        "w1",
        1,
        &[
            "--docker-cli",
            "buildah",
            "--insecure-registry",
            &addr,
            "--allow-push",
            &allowed,
        ],
    );
    let df = spec(
        s.dir.path(),
        "Dockerfile",
        &format!(
            "FROM {addr}/busybox:latest\nARG MSG\nRUN echo built-$MSG > /built && cat /built\n"
        ),
    );
    let docker = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocluster-client"));
        cmd.arg("submit-docker")
            .arg("-c")
            .arg(&alice)
            .args(["--pool", "linux", "--local-dockerfile"])
            .arg(&df)
            .args(["--build-arg", "MSG=hi"])
            .args(extra);
        Proc::spawn(cmd)
    };
    let target = format!("{addr}/app:v1");
    let mut c = docker(&["--push-to", &target]);
    c.expect("built-hi");
    let result = c.expect("Result: ");
    assert_eq!(c.finish(), 0, "{}", c.output());
    let digest = result
        .split('@')
        .nth(1)
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    assert!(
        result.starts_with(&format!("Result: \"{addr}/app@sha256:")),
        "{result}"
    );
    let inspect = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--format", "{{.Digest}}"])
        .arg(format!("docker://{target}"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&inspect.stdout).trim(), digest);

    // Not on --allow-push.
    let elsewhere = format!("{addr}/other:v1");
    let mut c = docker(&["--push-to", &elsewhere]);
    c.expect("is not allowed by this worker");
    assert_eq!(c.finish(), 1, "{}", c.output());
    // Without a push the result is the image id.
    let mut c = docker(&[]);
    let result = c.expect("Result: ");
    assert_eq!(c.finish(), 0, "{}", c.output());
    assert!(!result.contains('@'), "{result}");
}

/// Worker w1 with the job `echo begin; sleep 2; echo end` started on it.
fn job_running_on_w1(s: &Scheduler, fs: &testkit::LoopFs, alice: &Path) -> (Worker, Proc) {
    let w1 = Worker::start(s, &fs.mnt, "w1", 1);
    let job = sh_spec(s.dir.path(), "job", "echo begin; sleep 2; echo end");
    let mut c = client(alice, &job, &[]);
    c.expect("Building on w1");
    c.expect("begin");
    (w1, c)
}

/// A worker killed (`kill -9`) mid-job: the job completes on another worker, and the
/// client sees one job and one result.
#[test]
fn a_job_survives_its_worker() {
    if !machine_has("cluster", &[]) {
        return;
    }
    let (fs, s, alice) = cluster(&[]);
    let (w1, mut c) = job_running_on_w1(&s, &fs, &alice);
    let w2 = Worker::start(&s, &fs.mnt, "w2", 1);
    w1.kill_hard();
    c.expect("Worker w1 was lost");
    c.expect("Running again on w2");
    c.expect("Building on w2");
    c.expect("end");
    c.expect("Job succeeded");
    assert_eq!(c.finish(), 0, "{}", c.output());
    drop(w2);
}

/// A service manager's stop (SIGTERM) drains the worker: the running job finishes on
/// it, a job submitted meanwhile waits for another worker, and the worker exits 0. A
/// second SIGTERM aborts: the running job is run again on another worker, never lost.
#[test]
fn sigterm_drains_and_a_second_one_requeues() {
    if !machine_has("cluster", &[]) {
        return;
    }
    let (fs, s, alice) = cluster(&[]);
    let (w1, mut c) = job_running_on_w1(&s, &fs, &alice);
    w1.signal(libc::SIGTERM);
    w1.wait_log("taking no more jobs, finishing the 1 running");
    let later = sh_spec(s.dir.path(), "later", "echo later");
    let mut c2 = client(&alice, &later, &[]);
    c.expect("end");
    c.expect("Job succeeded");
    assert_eq!(c.finish(), 0, "{}", c.output());
    let mut w1 = w1;
    testkit::e2e::eventually("the drained worker's exit", 30, || {
        w1.child.try_wait().unwrap().is_some()
    });
    assert_eq!(w1.child.wait().unwrap().code(), Some(0), "{}", w1.log());
    assert!(!c2.output().contains("Building on w1"), "{}", c2.output());

    let w2 = Worker::start(&s, &fs.mnt, "w2", 1);
    c2.expect("Building on w2");
    c2.expect("later");
    assert_eq!(c2.finish(), 0, "{}", c2.output());

    let slow = sh_spec(s.dir.path(), "slow", "echo slow-begin; sleep 1000");
    let mut c3 = client(&alice, &slow, &[]);
    c3.expect("Building on w2");
    c3.expect("slow-begin");
    let _w3 = Worker::start(&s, &fs.mnt, "w3", 1);
    for _ in 0..2 {
        w2.signal(libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
    }
    c3.expect("queued again (attempt 2 of");
    c3.expect("Building on w3");
    c3.expect("slow-begin");
    assert!(
        w2.log().contains("second SIGTERM: aborting"),
        "{}",
        w2.log()
    );
    assert!(!c3.output().contains("Job cancelled"), "{}", c3.output());
}

/// The worker takes `obuilder build`'s sandbox flags (and the original's `--uid`), and a
/// bad one stops it with status 2 and the reason, before it connects anywhere.
#[test]
fn sandbox_flags_are_obuilders_and_bad_ones_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("pool.cap");
    std::fs::write(&cap, "capnp://insecure@127.0.0.1:9/pool\n").unwrap();
    let worker = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ocluster-worker"))
            .arg("-c")
            .arg(&cap)
            .args(["--name", "w", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg(format!(
                "--obuilder-store=rsync:{}",
                dir.path().join("store").display()
            ))
            .args(["--rsync-mode", "copy"])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = worker(&["--sandbox", "bogus"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown sandbox \"bogus\""), "{err}");
    let (code, err) = worker(&["--sandbox", "user", "--uid", "1000", "--user-pool", "1-2"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, err) = worker(&["--sandbox", "user", "--user-pool", "5-1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("expected FROM-TO"), "{err}");
    let (code, err) = worker(&["--obuilder-docker-platform", "windows"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--obuilder-docker-platform needs --obuilder-store docker:/PATH"),
        "{err}"
    );
    let (code, err) = worker(&["--obuilder-docker-platform", "beos"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("linux or windows"), "{err}");
}

/// The worker pauses itself at the scheduler while it prunes and while its healthcheck
/// fails, and takes jobs again afterwards.
#[test]
fn prune_and_healthcheck_pause_the_worker() {
    if !machine_has("cluster", &[]) {
        return;
    }
    let (fs, s, alice) = cluster(&[]);
    let busybox = s.dir.path().join("busybox");
    std::fs::copy("/bin/busybox", &busybox).unwrap();
    let marks = |what: &str| {
        s.log()
            .lines()
            .filter(|l| l.contains(what) && l.contains("worker=w1"))
            .count()
    };
    let wait_marks = |what: &str, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while marks(what) < n {
            assert!(Instant::now() < deadline, "no {what:?} x{n}:\n{}", s.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Healthchecks every second; a store always "below" the threshold: it prunes each round.
    let w = Worker::start_with(
        &s,
        &fs.mnt,
        "w1",
        1,
        &[
            "--obuilder-healthcheck",
            "1",
            "--obuilder-healthcheck-busybox",
            busybox.to_str().unwrap(),
            "--obuilder-prune-threshold",
            "100",
        ],
    );
    // Paused while pruning, active again after.
    let active = marks("worker active");
    wait_marks("worker marked inactive", 1);
    wait_marks("worker active", active + 1);
    w.wait_log("pruning");
    // A failing healthcheck pauses it until it passes again.
    std::fs::remove_file(&busybox).unwrap();
    w.wait_log("healthcheck failed");
    let paused = marks("worker marked inactive");
    let plain = sh_spec(s.dir.path(), "plain", "echo healthy again");
    let mut c = client(&alice, &plain, &[]);
    c.expect("Tailing log:");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !c.output().contains("Building on"),
        "an unhealthy worker took a job:\n{}",
        c.output()
    );
    assert!(marks("worker marked inactive") >= paused);
    std::fs::copy("/bin/busybox", &busybox).unwrap();
    c.expect("healthy again");
    assert_eq!(c.finish(), 0, "{}", c.output());
}

/// The original scheduler's messages to the original `ocluster-worker` (the golden files'
/// `plain/`, one `spec-hi-sh` job), played to our `ocluster-worker` over plain TCP: the
/// same answers to its bootstrap, `register` and `pop`, then the same calls on the job it
/// offered (`result`, `log` with the original's offsets, question ids reused after each
/// `Finish`). Our worker must ask as the original did, run the job, and answer every call.
#[test]
fn our_worker_answers_the_original_schedulers_messages() {
    use capnp_rpc::rpc_capnp::{message, return_};
    use common::replay::{capture, params, parse, plain, raw_capture, root, show, Msg, Served};
    use ocluster_api::{ids, job, registration};

    let Some(plain) = plain() else { return };
    if !machine_has("our_worker_answers_the_original_schedulers_messages", &[]) {
        return;
    }
    let fs = testkit::LoopFs::new("btrfs", 1024);
    let pool = std::fs::read_to_string(plain.join("pool-linux-x86_64.cap")).unwrap();
    let id = pool.trim_end().rsplit('/').next().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let store = fs.mnt.join("store");
    import_busybox(&store, &fs.mnt.join("busybox"));
    let raws = raw_capture(&plain, "worker-scheduler-to-worker.bin");
    // Our worker, connected to a listener of the test's as to the original scheduler.
    let start = |name: &str| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cap = dir.path().join(format!("{name}.cap"));
        std::fs::write(&cap, format!("capnp://insecure@127.0.0.1:{port}/{id}\n")).unwrap();
        let log = dir.path().join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_ocluster-worker"))
            .arg("-c")
            .arg(&cap)
            .args(["--name", "worker-1", "--capacity", "1"])
            .arg("--state-dir")
            .arg(dir.path().join(format!("state-{name}")))
            .arg(format!("--obuilder-store=btrfs:{}", store.display()))
            .args(["--fast-sync", "-v", "--obuilder-healthcheck", "0"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let worker = Worker { child, log };
        let served = Served::accept(listener, TIMEOUT, || worker.log());
        (worker, served)
    };

    // First, as the original's store had it from the job before (`spec-hi`): the base
    // image's first use, a job `((from busybox))`, given in answer to our worker's first
    // `pop` after the original's answers to its bootstrap and `register`.
    {
        let (worker, mut warm) = start("warm-up");
        let deadline = Instant::now() + Duration::from_secs(120);
        warm.play(&raws[..2], deadline, || worker.log());
        assert!(warm.until(deadline, |s| s.asked(2)), "{}", warm.shown());
        let mut b = capnp::message::Builder::new_default();
        {
            let mut r = b.init_root::<message::Builder<'_>>().init_return();
            r.set_answer_id(2);
            let mut p = r.init_results();
            p.reborrow()
                .get_content()
                .init_as::<ocluster_api::queue::pop_results::Builder<'_>>()
                .init_descr()
                .get_action()
                .init_obuilder()
                .set_spec("((from busybox))");
            p.init_cap_table(0);
        }
        warm.send(&b);
        warm.call(0, 1, ids::JOB, 1, |_| {});
        assert!(
            warm.until(deadline, Served::all_answered),
            "{}\n{}",
            warm.shown(),
            worker.log()
        );
    }

    let (worker, mut served) = start("replay");
    let deadline = Instant::now() + Duration::from_secs(120);
    // Everything up to the original's release of the job (kept for the end, below).
    let release = raws
        .iter()
        .rposition(|r| matches!(root(&parse(r)).which().unwrap(), message::Release(_)))
        .unwrap();
    served.play(&raws[..release], deadline, || worker.log());
    // Every call made on our worker's job is answered.
    assert!(
        served.until(deadline, Served::all_answered),
        "our worker did not answer every call\nours:\n{}",
        served.shown()
    );
    // A little longer for the next `pop`, which the original worker made at once.
    served.until(Instant::now() + Duration::from_secs(1), |_| false);
    // The job's whole log as our worker keeps it (a `log` call from 0 of ours, on the job
    // it offered, export 1 as the original's): the original's, but for times and ids.
    served.call(100, 1, ids::JOB, 0, |p| {
        p.init_as::<job::log_params::Builder<'_>>().set_start(0)
    });
    assert!(
        served.until(deadline, Served::all_answered),
        "{}",
        served.shown()
    );
    let whole: job::log_results::Reader<'_> = common::replay::results(served.answer(100).unwrap())
        .unwrap()
        .get_content()
        .get_as()
        .unwrap();
    let ours_log = String::from_utf8_lossy(whole.get_log().unwrap()).into_owned();
    let golden = std::fs::read_to_string(plain.join("submit-alice-spec-hi-sh.txt")).unwrap();
    let from = golden.find("Tailing log:\n").unwrap() + "Tailing log:\n".len();
    let to = golden.find("Job succeeded\n").unwrap() + "Job succeeded\n".len();
    // Ids redacted; a note's time (`2026-12-01 07:50.44`) stands just before its `--->`.
    let normal = |s: &str| {
        testkit::e2e::redact(s)
            .lines()
            .map(|l| {
                match l
                    .find(" ---> ")
                    .and_then(|i| Some((l.get(..i.checked_sub(19)?)?, i)))
                {
                    Some((before, i)) => format!("{before}TIME{}\n", &l[i..]),
                    None => format!("{l}\n"),
                }
            })
            .collect::<String>()
    };
    assert_eq!(normal(&ours_log), normal(&golden[from..to]));
    served.play(&raws[release..], deadline, || worker.log());
    let ours = &served.ours;

    // It asked as the original worker did: the bootstrap byte for byte (the service id),
    // then `register` and `pop` pipelined, with the same capabilities.
    let theirs = capture(&plain, "worker-worker-to-scheduler.bin");
    for i in 0..3 {
        assert_eq!(
            show(&ours[i]),
            show(&theirs[i]),
            "message {i}\nours:\n{}",
            served.shown()
        );
    }
    let bootstrap = |m: &Msg| {
        let message::Bootstrap(b) = root(m).which().unwrap() else {
            unreachable!()
        };
        let t: capnp::text::Reader<'_> = b.unwrap().get_deprecated_object_id().get_as().unwrap();
        t.as_bytes().to_vec()
    };
    assert_eq!(bootstrap(&ours[0]), bootstrap(&theirs[0]));
    let register = |m: &Msg| {
        let message::Call(c) = root(m).which().unwrap() else {
            unreachable!()
        };
        let p: registration::register_params::Reader<'_> = params(c.unwrap());
        (p.get_name().unwrap().to_string().unwrap(), p.get_capacity())
    };
    assert_eq!(register(&ours[1]), register(&theirs[1]));
    assert_eq!(register(&ours[1]), ("worker-1".to_string(), 1));

    // Every answer is a result, none an exception: the result is the build's id, and the
    // log from the start opens as the original's.
    let mut outputs = Vec::new();
    let mut first_log = None;
    for m in ours {
        if let message::Return(r) = root(m).which().unwrap() {
            let r = r.unwrap();
            let p = match r.which().unwrap() {
                return_::Results(p) => p.unwrap(),
                _ => panic!(
                    "{}\nours:\n{}\nworker log:\n{}",
                    show(m),
                    served.shown(),
                    worker.log()
                ),
            };
            if let Ok(o) = p.get_content().get_as::<job::result_results::Reader<'_>>() {
                if let Ok(t) = o.get_output() {
                    outputs.push(t.to_string().unwrap());
                }
            }
            let l: job::log_results::Reader<'_> = p.get_content().get_as().unwrap();
            if first_log.is_none() {
                first_log = l
                    .get_log()
                    .ok()
                    .map(|d| String::from_utf8_lossy(d).into_owned());
            }
        }
    }
    assert!(
        outputs
            .iter()
            .any(|o| o.len() == 64 && o.bytes().all(|b| b.is_ascii_hexdigit())),
        "{outputs:?}\n{}",
        served.shown()
    );
    let first_log = first_log.unwrap_or_default();
    assert!(
        first_log.starts_with("Building on worker-1"),
        "{first_log:?}"
    );
    // And then it asked for the next job, as the original did.
    let pops = ours
        .iter()
        .filter(|m| {
            matches!(root(m).which().unwrap(),
                message::Call(Ok(c)) if c.get_interface_id() == ids::QUEUE && c.get_method_id() == 0)
        })
        .count();
    assert_eq!(pops, 2, "{}", served.shown());
    drop(worker);
}
