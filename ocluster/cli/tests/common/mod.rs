//! A real `ocluster-scheduler` process on 127.0.0.1, the real `ocluster-admin`, and test
//! peers in other processes (see `peer.rs`).

#![allow(dead_code)]

pub mod peer;
pub mod replay;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Scheduler {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub pools: Vec<String>,
    pub extra: Vec<String>,
    /// The port of the first start, kept across restarts so that cap files stay valid.
    pub port: u16,
    /// The network namespace it runs in (and its admin tool), if not this one's.
    pub netns: Option<String>,
}

impl Scheduler {
    pub fn secrets(&self) -> PathBuf {
        self.dir.path().join("secrets")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn cap(&self, name: &str) -> PathBuf {
        self.secrets().join(format!("{name}.cap"))
    }
    pub fn admin_cap(&self) -> PathBuf {
        self.cap("admin")
    }
    pub fn pool_cap(&self, pool: &str) -> PathBuf {
        self.cap(&format!("pool-{pool}"))
    }

    /// Starts a scheduler on a free port with pools `pools`.
    pub fn start(pools: &[&str], extra: &[&str]) -> Scheduler {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        Self::start_in(dir, pools, extra)
    }

    /// Starts a scheduler in `dir` (which has `secrets/` and maybe `state/` and `key.pem`).
    pub fn start_in(dir: tempfile::TempDir, pools: &[&str], extra: &[&str]) -> Scheduler {
        Self::start_in_netns(dir, None, pools, extra)
    }

    /// Starts a scheduler in network namespace `netns` (`extra` names its listen
    /// address).
    pub fn start_in_netns(
        dir: tempfile::TempDir,
        netns: Option<&str>,
        pools: &[&str],
        extra: &[&str],
    ) -> Scheduler {
        let mut s = Scheduler {
            dir,
            child: None,
            pools: pools.iter().map(|p| p.to_string()).collect(),
            extra: extra.iter().map(|p| p.to_string()).collect(),
            port: 0,
            netns: netns.map(str::to_string),
        };
        s.restart();
        s
    }

    /// (Re)starts the process, waiting until its cap files are written.
    pub fn restart(&mut self) {
        self.stop();
        for p in std::iter::once("admin".to_string())
            .chain(self.pools.iter().map(|p| format!("pool-{p}")))
        {
            let _ = std::fs::remove_file(self.cap(&p));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("scheduler.log"))
            .unwrap();
        let child = in_netns(
            self.netns.as_deref(),
            env!("CARGO_BIN_EXE_ocluster-scheduler"),
        )
        .arg("--capnp-secret-key-file")
        .arg(self.dir.path().join("key.pem"))
        .args(
            (!self
                .extra
                .iter()
                .any(|a| a.starts_with("--capnp-listen-address")))
            .then(|| format!("--capnp-listen-address=tcp:127.0.0.1:{}", self.port)),
        )
        .arg("--secrets-dir")
        .arg(self.secrets())
        .arg("--state-dir")
        .arg(self.state())
        .arg(format!("--pools={}", self.pools.join(",")))
        .args(&self.extra)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        let shared = !self.extra.iter().any(|a| a == "--no-shared-pool-cap");
        while (shared && !self.pools.iter().all(|p| self.pool_cap(p).exists()))
            || !self.admin_cap().exists()
        {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("scheduler exited with {st}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "scheduler did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let uri = std::fs::read_to_string(self.admin_cap()).unwrap();
        let slash = uri.rfind('/').unwrap();
        self.port = uri[..slash]
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
    }

    /// Kills the process with SIGKILL, as a crash would: nothing is flushed or closed.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + TIMEOUT;
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("scheduler.log")).unwrap_or_default()
    }

    /// Runs `ocluster-admin -c admin.cap ARGS`.
    pub fn admin(&self, args: &[&str]) -> Output {
        let mut cmd = in_netns(self.netns.as_deref(), env!("CARGO_BIN_EXE_ocluster-admin"));
        cmd.arg("-c").arg(self.admin_cap()).args(args);
        run_bounded(cmd)
    }

    /// Runs the admin tool and returns its stdout, failing the test if it fails.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "ocluster-admin {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Adds a client and writes its cap file; returns the path.
    pub fn add_client(&self, name: &str) -> PathBuf {
        let uri = self.admin_ok(&["add-client", name]);
        let path = self.dir.path().join(format!("{name}.cap"));
        std::fs::write(&path, uri).unwrap();
        path
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `program`, run in network namespace `netns` if there is one.
pub fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        None => Command::new(program),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
    }
}

/// Two network namespaces made for a test, joined by a veth pair: `a` (10.X.Y.1) and
/// `b` (10.X.Y.2). Servers listen inside them; `cut` takes `b`'s end of the link down.
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub a_ip: String,
    pub b_ip: String,
}

impl NetPair {
    /// `None` when this machine cannot make them (not root, or no `ip`).
    pub fn new(tag: &str) -> Option<NetPair> {
        if !testkit::require(
            &format!("netns {tag}"),
            &[testkit::Cap::Root, testkit::Cap::Tool("ip")],
        ) {
            return None;
        }
        let id = std::process::id() % 10_000;
        let sub = (std::process::id() / 7 + tag.bytes().map(u32::from).sum::<u32>() * 31) % 250;
        let pair = NetPair {
            a: format!("ocl{id}{tag}a"),
            b: format!("ocl{id}{tag}b"),
            a_ip: format!("10.213.{sub}.1"),
            b_ip: format!("10.213.{sub}.2"),
        };
        let (va, vb) = (format!("v{id}{tag}a"), format!("v{id}{tag}b"));
        for ns in [&pair.a, &pair.b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ]);
        ip(&[
            "-n",
            &pair.a,
            "addr",
            "add",
            &format!("{}/30", pair.a_ip),
            "dev",
            &va,
        ]);
        ip(&[
            "-n",
            &pair.b,
            "addr",
            "add",
            &format!("{}/30", pair.b_ip),
            "dev",
            &vb,
        ]);
        ip(&["-n", &pair.a, "link", "set", &va, "up"]);
        ip(&["-n", &pair.b, "link", "set", &vb, "up"]);
        Some(pair)
    }

    fn veth_b(&self) -> String {
        format!("v{}b", &self.b[3..self.b.len() - 1])
    }

    /// Partitions `b`: its end of the link goes down (packets are dropped, connections
    /// are not reset).
    pub fn cut(&self) {
        ip(&["-n", &self.b, "link", "set", &self.veth_b(), "down"]);
    }

    pub fn heal(&self) {
        ip(&["-n", &self.b, "link", "set", &self.veth_b(), "up"]);
    }

    /// Runs `f` on a thread inside namespace `ns` (its sockets are that namespace's).
    pub fn run_in<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns(2) on this thread only, with a namespace file we opened.
            let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `done` until it holds, failing the test with `why()` after `TIMEOUT`.
pub fn wait_until(mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn admin_with(cap: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ocluster-admin"));
    cmd.arg("-c").arg(cap).args(args);
    run_bounded(cmd)
}

/// Runs a command to its end, killing it after `TIMEOUT`.
pub fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// A process's stdout lines as they come, on a thread of their own. With `marker`, only
/// the lines holding it, from after it (the harness's own "test peer ... " may come first
/// on the line).
pub fn read_lines(
    out: std::process::ChildStdout,
    marker: Option<&'static str>,
) -> mpsc::Receiver<String> {
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let line = match marker {
                None => line,
                Some(m) => match line.find(m) {
                    Some(at) => line[at + m.len()..].to_string(),
                    None => continue,
                },
            };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// A test peer in its own process, with its `PEER:` lines read as they come.
pub struct Peer {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Peer {
    pub fn spawn(role: &[&str]) -> Peer {
        Peer::spawn_in(None, role)
    }

    /// A peer in network namespace `netns`.
    pub fn spawn_in(netns: Option<&str>, role: &[&str]) -> Peer {
        let exe = std::env::current_exe().unwrap();
        let mut child = in_netns(netns, exe.to_str().unwrap())
            .args(["--exact", "peer", "--nocapture", "--test-threads=1"])
            .env(peer::ENV, role.join("|"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = read_lines(child.stdout.take().unwrap(), Some("PEER: "));
        Peer {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    pub fn worker(cap: &Path, name: &str, capacity: u32) -> Peer {
        let mut w = Peer::spawn(&["worker", cap.to_str().unwrap(), name, &capacity.to_string()]);
        w.expect("registered");
        w
    }

    pub fn client(cap: &Path, pool: &str, spec: &str, hint: &str, action: &str) -> Peer {
        Peer::spawn(&[
            "client",
            cap.to_str().unwrap(),
            pool,
            spec,
            hint,
            "",
            action,
        ])
    }

    /// Waits for a line that starts with `prefix` and returns it.
    pub fn expect(&mut self, prefix: &str) -> String {
        self.expect_within(prefix, TIMEOUT)
            .unwrap_or_else(|| panic!("no line {prefix:?} in time; saw {:?}", self.seen))
    }

    pub fn expect_within(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Takes in the lines that have come so far (into `seen`).
    pub fn drain(&mut self) {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
    }

    /// Waits for the process to end and returns its exit code.
    pub fn wait(&mut self) -> i32 {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "peer did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
