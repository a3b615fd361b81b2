//! The user sandbox: the macOS design, which also runs on Linux. Each step runs as a build
//! user of a pool (one per concurrent step), directly on the host, with the step's
//! snapshot as that user's home directory and Homebrew prefix.
//!
//! A step's tree holds two children, `home` and `brew` (as the ZFS datasets of the
//! original). Every build user has the same logical home path (`--home-path`) and prefix
//! (`--brew-path`); `obuilderfs`, mounted on both, shows each build user its own step's
//! children there, through a scoreboard of symlinks `UID -> tree`. Absolute paths written
//! into files under the home (opam's) are then the same whichever user runs the next step,
//! so results are portable between build users, and N steps run at once. Files of the
//! stored trees belong to the pool's first uid, which obuilderfs shows to each build user
//! as its own (`obuilderfs --owner`).
//!
//! Without FUSE (`--no-fuse`), the original's first design: the trees are copied with
//! rsync into the real home path and prefix before the step and back after it, one step at
//! a time, always as the first build user.
//!
//! What a step can reach: the home path, the prefix and their caches are the build's;
//! everything else is the host's, protected only by Unix permissions (no containers on
//! macOS). A workdir, `copy` destination or cache target elsewhere is refused. On Linux the
//! command runs in a new network namespace unless the step asks for `(network host)`;
//! macOS has no network isolation.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use obuilder_engine::confined::{self, ConfinedRoot, Follow, Owner};
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::log::StepLog;
use obuilder_engine::sandbox::{RunConfig, Sandbox, SandboxError, UserIds};
use obuilder_engine::CancellationToken;
use obuilder_spec::User;

/// Which host commands the sandbox speaks (chosen at run time, so that the macOS
/// sequences are tested on Linux through the command seam).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// `useradd`/`groupadd`, `setpriv`, `unshare --net`.
    Linux,
    /// `dscl`, `sudo su -l`; no network isolation.
    MacOs,
}

impl Platform {
    pub fn this() -> Platform {
        if cfg!(target_os = "macos") {
            Platform::MacOs
        } else {
            Platform::Linux
        }
    }

    /// The name of build user `uid`.
    pub fn user_name(self, uid: u32) -> String {
        match self {
            Platform::MacOs => format!("mac{uid}"),
            Platform::Linux => format!("obuilder{uid}"),
        }
    }
}

/// Flags of the user sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserOptions {
    /// The build users' uids, first to last (`--user-pool FROM-TO`).
    pub first_uid: u32,
    pub last_uid: u32,
    /// The build users' primary group (default: the first uid).
    pub gid: Option<u32>,
    /// The home path every build user sees (`--home-path`).
    pub home: Option<String>,
    /// The Homebrew prefix every build user sees (`--brew-path`); none on Linux by default.
    pub prefix: Option<String>,
    /// Redirect with obuilderfs (else rsync into the real paths, one step at a time).
    pub fuse: bool,
    /// The obuilderfs binary, started when nothing is mounted yet.
    pub obuilderfs: String,
    pub platform: Platform,
}

impl Default for UserOptions {
    fn default() -> UserOptions {
        let platform = Platform::this();
        let (first_uid, last_uid) = match platform {
            Platform::MacOs => (1000, 1000),
            Platform::Linux => (61000, 61003),
        };
        UserOptions {
            first_uid,
            last_uid,
            gid: None,
            home: None,
            prefix: None,
            fuse: true,
            obuilderfs: "obuilderfs".into(),
            platform,
        }
    }
}

impl UserOptions {
    pub fn gid(&self) -> u32 {
        self.gid.unwrap_or(self.first_uid)
    }

    /// The logical home path: the given one, or the first build user's home.
    pub fn home(&self) -> String {
        match &self.home {
            Some(h) => h.trim_end_matches('/').to_string(),
            None => match self.platform {
                Platform::MacOs => format!("/Users/{}", self.platform.user_name(self.first_uid)),
                Platform::Linux => format!("/home/{}", self.platform.user_name(self.first_uid)),
            },
        }
    }

    /// The Homebrew prefix: the given one; on macOS, Homebrew's own for the machine.
    pub fn prefix(&self) -> Option<String> {
        match (&self.prefix, self.platform) {
            (Some(p), _) => Some(p.trim_end_matches('/').to_string()),
            (None, Platform::MacOs) if cfg!(target_arch = "aarch64") => {
                Some("/opt/homebrew".into())
            }
            (None, Platform::MacOs) => Some("/usr/local".into()),
            (None, Platform::Linux) => None,
        }
    }

    /// Checks the flags together.
    pub fn validate(&self) -> Result<(), String> {
        if self.first_uid == 0 || self.last_uid < self.first_uid {
            return Err(format!(
                "--user-pool {}-{}: expected FROM-TO with 0 < FROM <= TO",
                self.first_uid, self.last_uid
            ));
        }
        if self.last_uid - self.first_uid >= 1024 {
            return Err("--user-pool: at most 1024 build users".into());
        }
        let mut paths = vec![("--home-path", self.home())];
        if let Some(p) = self.prefix() {
            paths.push(("--brew-path", p));
        }
        for (flag, p) in &paths {
            if !p.starts_with('/') || p == "/" || p.split('/').any(|c| c == "..") {
                return Err(format!(
                    "{flag} {p:?}: must be an absolute path below / without `..`"
                ));
            }
        }
        if let [(_, h), (_, p)] = &paths[..] {
            if within(h, p).is_some() || within(p, h).is_some() {
                return Err(format!(
                    "--home-path {h} and --brew-path {p} must not contain one another"
                ));
            }
        }
        Ok(())
    }
}

/// `path` relative to `base` when it is `base` or below it.
fn within<'a>(base: &str, path: &'a str) -> Option<&'a str> {
    let rest = path.strip_prefix(base)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('/')
    }
}

/// One of a step's two redirected trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    Home,
    Brew,
}

impl Tree {
    /// Its directory in a step's snapshot.
    pub fn child(self) -> &'static str {
        match self {
            Tree::Home => "home",
            Tree::Brew => "brew",
        }
    }
}

/// Single-quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// What one step runs as, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub uid: u32,
    pub gid: u32,
    /// The working directory, a logical path (under the home or the prefix).
    pub cwd: String,
    /// The step's environment, newest binding first (as the build context keeps it),
    /// with TMPDIR and OBUILDER_SECRETS_DIR added.
    pub env: Vec<(String, String)>,
    pub argv: Vec<String>,
    /// A new network namespace (Linux only).
    pub isolate_network: bool,
}

/// The script the login shell runs: into the workdir, the profile, then the command with
/// the step's environment (`"$0" "$@"` are the command's argv).
pub fn script(inv: &Invocation) -> String {
    let mut s = format!(
        "cd -- {} || exit 1\nif [ -e \"$HOME/.obuilder_profile.sh\" ]; then . \"$HOME/.obuilder_profile.sh\" || exit 1; fi\nexec env",
        sh_quote(&inv.cwd)
    );
    // env(1) keeps the last of two bindings of a name: oldest first, newest last.
    for (k, v) in inv.env.iter().rev() {
        s.push(' ');
        s.push_str(&sh_quote(&format!("{k}={v}")));
    }
    s.push_str(" \"$0\" \"$@\"");
    s
}

/// The exact argv that runs a step (pure, for tests of both platforms).
pub fn command_argv(platform: Platform, inv: &Invocation) -> Vec<String> {
    let name = platform.user_name(inv.uid);
    let mut argv: Vec<String> = Vec::new();
    match platform {
        Platform::MacOs => {
            // As the original: `sudo su -l macUID -c -- SCRIPT ARGV…`.
            argv.extend(["sudo", "su", "-l", &name, "-c", "--"].map(String::from));
            argv.push(script(inv));
        }
        Platform::Linux => {
            if inv.isolate_network {
                argv.extend(
                    [
                        "unshare",
                        "--net",
                        "--",
                        "/bin/sh",
                        "-c",
                        "ip link set lo up 2>/dev/null; exec \"$@\"",
                        "obuilder-net",
                    ]
                    .map(String::from),
                );
            }
            argv.extend([
                "setpriv".to_string(),
                format!("--reuid={}", inv.uid),
                format!("--regid={}", inv.gid),
                "--init-groups".into(),
                "--reset-env".into(),
                "--".into(),
                "/bin/bash".into(),
                "--login".into(),
                "-c".into(),
                script(inv),
            ]);
        }
    }
    argv.extend(inv.argv.iter().cloned());
    argv
}

/// The commands that create build user `uid` (after checks that found it missing).
pub fn create_user_argvs(platform: Platform, uid: u32, gid: u32, home: &str) -> Vec<Vec<String>> {
    let name = platform.user_name(uid);
    let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match platform {
        Platform::MacOs => {
            let path = format!("/Users/{name}");
            let (uid, gid) = (uid.to_string(), gid.to_string());
            vec![
                v(&["dscl", ".", "-create", &path]),
                v(&["dscl", ".", "-create", &path, "UserShell", "/bin/bash"]),
                v(&["dscl", ".", "-create", &path, "RealName", &name]),
                v(&["dscl", ".", "-create", &path, "UniqueID", &uid]),
                v(&["dscl", ".", "-create", &path, "PrimaryGroupID", &gid]),
                v(&["dscl", ".", "-create", &path, "NFSHomeDirectory", home]),
            ]
        }
        Platform::Linux => vec![v(&[
            "useradd",
            "--uid",
            &uid.to_string(),
            "--gid",
            &gid.to_string(),
            "--no-user-group",
            "--no-create-home",
            "--home-dir",
            home,
            "--shell",
            "/bin/bash",
            &name,
        ])],
    }
}

/// The command that kills every process of `uid` (exit 1: there was none).
pub fn kill_argv(uid: u32) -> Vec<String> {
    vec!["pkill".into(), "-9".into(), "-U".into(), uid.to_string()]
}

static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// Kills the step's user's processes if the builder dies before saying `done` (a second
/// Ctrl-C, `kill -9`): it reads the pipe whose only writer is the builder.
const SUPERVISOR: &str = r#"trap '' INT TERM HUP PIPE
read -r line
[ "$line" = done ] && exit 0
i=0
while [ $i -lt 100 ]; do
  pkill -9 -U "$1" || exit 0
  sleep 0.1
  i=$((i+1))
done
"#;

pub struct UserSandbox {
    opts: UserOptions,
    exec: SharedExec,
    /// `STATE/user-sandbox`: locks, scoreboards, fallbacks.
    dir: PathBuf,
    /// Build users known to exist.
    known: Mutex<HashSet<u32>>,
    /// Serialises the check-and-mount of obuilderfs within this process.
    mounting: tokio::sync::Mutex<()>,
}

fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SandboxError {
    SandboxError::io(what, path)
}

/// A build user held by one step (its lock file, released on drop).
struct Lease {
    uid: u32,
    /// The user's lock (`flock`), held for the step; the step's supervisor holds it too.
    lock: std::fs::File,
}

/// A cache put in place for a step, to take back after it.
struct Placed {
    /// The cache's copy on the host (where it goes back).
    host: PathBuf,
    /// Where it was put: the tree's host directory and the path in it.
    tree_dir: PathBuf,
    rel: String,
    /// Moved by rename (else copied in, and copied back).
    renamed: bool,
    /// What was at the target before, moved aside (its name in the same directory).
    hidden: Option<String>,
}

impl UserSandbox {
    pub fn new(
        state_dir: &Path,
        opts: UserOptions,
        exec: SharedExec,
    ) -> Result<UserSandbox, SandboxError> {
        opts.validate().map_err(SandboxError::Unsupported)?;
        Ok(UserSandbox {
            opts,
            exec,
            dir: state_dir.join("user-sandbox"),
            known: Mutex::new(HashSet::new()),
            mounting: tokio::sync::Mutex::new(()),
        })
    }

    fn canonical(&self) -> Owner {
        Owner {
            uid: self.opts.first_uid,
            gid: self.opts.gid(),
        }
    }

    fn uids(&self) -> impl Iterator<Item = u32> {
        self.opts.first_uid..=self.opts.last_uid
    }

    /// The tree and path inside it of logical path `path`, if it is a redirected one.
    pub fn place(&self, path: &str) -> Option<(Tree, String)> {
        let path = if path == "/" || path.is_empty() {
            self.opts.home()
        } else {
            path.to_string()
        };
        if let Some(rel) = within(&self.opts.home(), &path) {
            return Some((Tree::Home, rel.to_string()));
        }
        let prefix = self.opts.prefix()?;
        within(&prefix, &path).map(|rel| (Tree::Brew, rel.to_string()))
    }

    fn refuse(&self, what: &str, path: &str) -> SandboxError {
        let prefix = match self.opts.prefix() {
            Some(p) => format!(" or the Homebrew prefix ({p})"),
            None => String::new(),
        };
        SandboxError::Unsupported(format!(
            "{what} {path:?} is outside the build user's home ({}){prefix}: the user sandbox runs \
             on the host's filesystem, where only those paths are the build's own (redirected \
             to its snapshot); use a path under them",
            self.opts.home()
        ))
    }

    fn logical(&self, tree: Tree) -> String {
        match tree {
            Tree::Home => self.opts.home(),
            Tree::Brew => self.opts.prefix().unwrap_or_default(),
        }
    }

    fn trees(&self) -> Vec<Tree> {
        let mut t = vec![Tree::Home];
        if self.opts.prefix().is_some() {
            t.push(Tree::Brew);
        }
        t
    }

    /// The host directory where a step's command finds `tree`: its snapshot child with
    /// obuilderfs, the real path without.
    fn tree_dir(&self, rootfs: &Path, tree: Tree) -> PathBuf {
        if self.opts.fuse {
            rootfs.join(tree.child())
        } else {
            PathBuf::from(self.logical(tree))
        }
    }

    fn scoreboard(&self, tree: Tree) -> PathBuf {
        self.dir.join("scoreboard").join(tree.child())
    }

    fn fallback(&self, tree: Tree) -> PathBuf {
        self.dir.join("fallback").join(tree.child())
    }

    /// Takes a free build user: each has a lock file, held while a step runs as it. Waits
    /// (cancellably) while all are busy.
    async fn lease(&self, cancel: &CancellationToken) -> Result<Lease, SandboxError> {
        let locks = self.dir.join("locks");
        std::fs::create_dir_all(&locks).map_err(io("cannot create", &locks))?;
        let candidates: Vec<u32> = if self.opts.fuse {
            self.uids().collect()
        } else {
            // One home path on the host: one step at a time, as the first user.
            vec![self.opts.first_uid]
        };
        let mut delay = Duration::from_millis(5);
        loop {
            for &uid in &candidates {
                let p = locks.join(uid.to_string());
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .mode(0o600)
                    .open(&p)
                    .map_err(io("cannot open", &p))?;
                if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                    .is_ok()
                {
                    return Ok(Lease { uid, lock: f });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return Err(SandboxError::Cancelled),
            }
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// Creates build user `uid` (and the group) unless they exist; refuses a uid that
    /// belongs to someone else.
    ///
    /// Builders that start at once on a new host all find the users missing: creation
    /// is one process at a time per store (`STATE/user-sandbox/users.lock`), each looks
    /// again once it holds the lock, and a creation that fails is retried after looking
    /// again (another store's builder may have made the user or group meanwhile, or held
    /// the password file's lock).
    async fn ensure_user(&self, uid: u32) -> Result<(), SandboxError> {
        if self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&uid)
        {
            return Ok(());
        }
        let _lock = self.lock_file("users.lock").await?;
        let mut attempt = 0;
        loop {
            match self.lookup_user(uid).await {
                Some(line) => self.check_user(uid, &line).await?,
                None => match self.create_user(uid).await {
                    Ok(()) => {}
                    Err(e) if attempt < 4 => {
                        tracing::debug!("creating build user {uid}: {e}; looking again");
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            }
            break;
        }
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid);
        Ok(())
    }

    /// Holds `STATE/user-sandbox/NAME` locked (`flock`, waiting for other processes).
    async fn lock_file(&self, name: &str) -> Result<std::fs::File, SandboxError> {
        std::fs::create_dir_all(&self.dir).map_err(io("cannot create", &self.dir))?;
        let lock_path = self.dir.join(name);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("cannot open", &lock_path))?;
        tokio::task::spawn_blocking(move || {
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map(|_| lock)
        })
        .await
        .map_err(|_| SandboxError::Unsupported("the locking thread panicked".into()))?
        .map_err(|e| io("cannot lock", &lock_path)(e.into()))
    }

    /// The account database's line for `uid`, if it has one.
    async fn lookup_user(&self, uid: u32) -> Option<String> {
        match self.opts.platform {
            Platform::Linux => self
                .exec
                .output(&Cmd::new(["getent", "passwd", &uid.to_string()]))
                .await
                .ok()
                .map(|o| o.stdout_str()),
            Platform::MacOs => self
                .exec
                .output(&Cmd::new([
                    "dscl",
                    ".",
                    "-search",
                    "/Users",
                    "UniqueID",
                    &uid.to_string(),
                ]))
                .await
                .ok()
                .map(|o| o.stdout_str())
                .filter(|s| !s.trim().is_empty()),
        }
    }

    /// Checks that existing account `line` (of `uid`) is the build user's, and points its
    /// home at the logical home path.
    async fn check_user(&self, uid: u32, line: &str) -> Result<(), SandboxError> {
        let p = self.opts.platform;
        let name = p.user_name(uid);
        let home = self.opts.home();
        let owner = line.split([':', '\t', ' ']).next().unwrap_or("").trim();
        if owner != name {
            return Err(SandboxError::Unsupported(format!(
                "uid {uid} of --user-pool belongs to {owner:?}, not to the build user \
                 {name:?}: choose a range of unused uids"
            )));
        }
        // The user's home is the logical one (it may have changed with --home-path).
        match p {
            Platform::Linux if line.split(':').nth(5) != Some(home.as_str()) => {
                self.exec
                    .output(&Cmd::new(["usermod", "--home", &home, &name]))
                    .await?;
            }
            Platform::MacOs => {
                let path = format!("/Users/{name}");
                self.exec
                    .output(&Cmd::new([
                        "dscl",
                        ".",
                        "-create",
                        &path,
                        "NFSHomeDirectory",
                        &home,
                    ]))
                    .await?;
            }
            Platform::Linux => {}
        }
        Ok(())
    }

    /// Creates build user `uid`, and on Linux its group if missing.
    async fn create_user(&self, uid: u32) -> Result<(), SandboxError> {
        let p = self.opts.platform;
        let gid = self.opts.gid();
        if p == Platform::Linux
            && self
                .exec
                .output(&Cmd::new(["getent", "group", &gid.to_string()]))
                .await
                .is_err()
        {
            self.exec
                .output(&Cmd::new([
                    "groupadd",
                    "--gid",
                    &gid.to_string(),
                    &format!("obuilder{gid}"),
                ]))
                .await?;
        }
        tracing::info!("creating build user {} (uid {uid})", p.user_name(uid));
        for argv in create_user_argvs(p, uid, gid, &self.opts.home()) {
            self.exec.output(&Cmd::new(argv)).await?;
        }
        Ok(())
    }

    /// Kills every process of `uid`, again and again until none is left (a process may
    /// fork while the first signals go out). `child`, if given, is reaped on the way.
    async fn kill_all(&self, uid: u32, mut child: Option<&mut tokio::process::Child>) {
        for round in 0..200 {
            if let Some(c) = child.as_deref_mut() {
                let _ = c.try_wait();
            }
            match self.exec.output(&Cmd::new(kill_argv(uid))).await {
                // None matched: nothing of the user's is left.
                Err(obuilder_engine::exec::ExecError::Failed { status, .. })
                    if status.ends_with(" 1") =>
                {
                    return
                }
                Err(e) => {
                    tracing::warn!("cannot kill the processes of uid {uid}: {e}");
                    return;
                }
                Ok(_) => {}
            }
            let ms = if round < 10 { 10 } else { 100 };
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        tracing::warn!("uid {uid} still has processes after 200 rounds of SIGKILL");
    }

    /// Mounts obuilderfs on `tree`'s logical path unless it is there already.
    async fn ensure_mounted(&self, tree: Tree) -> Result<(), SandboxError> {
        let path = self.logical(tree);
        // The common case, every step: mounted already; no lock needed to see it.
        let sb = self.scoreboard(tree);
        if mount_state(Path::new(&path), Some(&sb)) == MountState::Ours {
            return Ok(());
        }
        let _g = self.mounting.lock().await;
        let fb = self.fallback(tree);
        for d in [&sb, &fb] {
            std::fs::create_dir_all(d).map_err(io("cannot create", d))?;
        }
        // Another obuilder process may be mounting it: one at a time, across processes.
        let lock = self.lock_file("mount.lock").await?;
        match mount_state(Path::new(&path), Some(&sb)) {
            MountState::Ours => return Ok(()),
            MountState::Foreign(source) => {
                return Err(SandboxError::Unsupported(format!(
                    "{path} is served by an obuilderfs of another store ({source}): a home \
                     path and prefix serve one store at a time; stop that store's builds and \
                     unmount it (`umount {path}`), or give this store another --home-path \
                     and --brew-path"
                )))
            }
            MountState::Stale => {
                tracing::warn!("{path}: obuilderfs died; unmounting the stale mount");
                let argv = match self.opts.platform {
                    Platform::Linux => vec!["umount", "-l", &path],
                    Platform::MacOs => vec!["umount", "-f", &path],
                };
                self.exec.output(&Cmd::new(argv)).await?;
            }
            MountState::Other(fs) => {
                return Err(SandboxError::Unsupported(format!(
                    "{path} is a mount point of a {fs} filesystem, not obuilderfs: unmount it or \
                     choose another path"
                )))
            }
            MountState::None => {}
        }
        std::fs::create_dir_all(&path).map_err(io("cannot create", &path))?;
        let log_path = self.dir.join(format!("obuilderfs-{}.log", tree.child()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("cannot open", &log_path))?;
        let log2 = log.try_clone().map_err(io("cannot open", &log_path))?;
        let mut argv: Vec<String> = Vec::new();
        if self.opts.platform == Platform::Linux {
            // Its own session, outliving this process: other builders use the mount too.
            argv.extend(["setsid".to_string(), "-f".to_string()]);
        }
        argv.extend([
            self.opts.obuilderfs.clone(),
            "--scoreboard".into(),
            sb.to_string_lossy().into_owned(),
            "--fallback".into(),
            fb.to_string_lossy().into_owned(),
            "--owner".into(),
            self.opts.first_uid.to_string(),
            path.clone(),
        ]);
        tracing::info!("mounting obuilderfs on {path}");
        let mut child = self.exec.spawn(
            &Cmd::new(argv.clone()),
            Stdio::null(),
            Stdio::from(log),
            Stdio::from(log2),
        )?;
        if self.opts.platform == Platform::Linux {
            let _ = child.wait().await;
        }
        for _ in 0..200 {
            match mount_state(Path::new(&path), Some(&sb)) {
                MountState::Ours => {
                    drop(lock);
                    return Ok(());
                }
                _ => tokio::time::sleep(Duration::from_millis(25)).await,
            }
            if let Ok(Some(status)) = child.try_wait() {
                if self.opts.platform == Platform::MacOs {
                    return Err(SandboxError::Unsupported(format!(
                        "obuilderfs exited ({status}) without mounting {path}; see {}",
                        log_path.display()
                    )));
                }
            }
        }
        Err(SandboxError::Unsupported(format!(
            "obuilderfs did not mount {path} within 5 s (`{}`); see {}",
            Cmd::new(argv).display(),
            log_path.display()
        )))
    }

    /// Points the scoreboard entry of `uid` for `tree` at `target` (atomically).
    fn register(&self, tree: Tree, uid: u32, target: &Path) -> Result<(), SandboxError> {
        let sb = self.scoreboard(tree);
        let tmp = sb.join(format!(".{uid}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).map_err(io("cannot write", &tmp))?;
        let entry = sb.join(uid.to_string());
        std::fs::rename(&tmp, &entry).map_err(io("cannot write", &entry))
    }

    fn unregister(&self, uid: u32) {
        for tree in [Tree::Home, Tree::Brew] {
            let _ = std::fs::remove_file(self.scoreboard(tree).join(uid.to_string()));
        }
    }

    async fn rsync(&self, from: &Path, to: &Path) -> Result<(), SandboxError> {
        std::fs::create_dir_all(to).map_err(io("cannot create", to))?;
        let src = format!("{}/", from.display());
        let dst = format!("{}/", to.display());
        self.exec
            .output(&Cmd::new(["rsync", "-aHq", "--delete", &src, &dst]))
            .await?;
        Ok(())
    }

    /// A private directory for the step's user: 0700, owned by it, in the system's temp
    /// directory under a fresh name (never one a user could have made beforehand).
    fn private_dir(&self, what: &str, uid: u32) -> Result<PathBuf, SandboxError> {
        // (named `obuilder-WHAT-UID-PID-N`: see `remove_private_dirs`)
        let base = std::env::temp_dir();
        loop {
            let p = base.join(format!(
                "obuilder-{what}-{uid}-{}-{}",
                std::process::id(),
                NEXT_TMP.fetch_add(1, Ordering::Relaxed)
            ));
            match rustix::fs::mkdir(&p, rustix::fs::Mode::from_raw_mode(0o700)) {
                Ok(()) => return Ok(p),
                Err(rustix::io::Errno::EXIST) => continue,
                Err(e) => return Err(io("cannot create", &p)(e.into())),
            }
        }
    }

    /// Puts each cache at its target in the step's trees (by rename when on the same
    /// filesystem, else by copy), moving aside what was there.
    async fn place_caches(
        &self,
        c: &RunConfig,
        rootfs: &Path,
        placed: &mut Vec<Placed>,
    ) -> Result<(), SandboxError> {
        let owner = self.canonical();
        for (i, cache) in c.caches.iter().enumerate() {
            let (tree, rel) = self
                .place(&cache.target)
                .ok_or_else(|| self.refuse("cache target", &cache.target))?;
            if rel.is_empty() {
                return Err(self.refuse("cache target", &cache.target));
            }
            let tree_dir = self.tree_dir(rootfs, tree);
            let root = ConfinedRoot::open(&tree_dir).map_err(io("cannot open", &tree_dir))?;
            let (parent_path, name) = match rel.rsplit_once('/') {
                Some((p, n)) => (p.to_string(), n.to_string()),
                None => (String::new(), rel.clone()),
            };
            let parent = root
                .create_dirs(&parent_path, 0o755, Some(owner))
                .map_err(io("cannot create", tree_dir.join(&parent_path)))?;
            let mut hidden = None;
            if confined::kind_at(&parent, &name)
                .map_err(io("cannot read", tree_dir.join(&rel)))?
                .is_some()
            {
                let aside = format!(".obuilder-hidden-{i}-{name}");
                rustix::fs::renameat(&parent, name.as_str(), &parent, aside.as_str())
                    .map_err(|e| io("cannot move aside", tree_dir.join(&rel))(e.into()))?;
                hidden = Some(aside);
            }
            let (cache_dir, cache_name) = open_parent(&cache.host)?;
            let renamed = match rustix::fs::renameat(&cache_dir, cache_name, &parent, name.as_str())
            {
                Ok(()) => true,
                Err(rustix::io::Errno::XDEV) => {
                    rustix::fs::mkdirat(
                        &parent,
                        name.as_str(),
                        rustix::fs::Mode::from_raw_mode(0o755),
                    )
                    .map_err(|e| io("cannot create", tree_dir.join(&rel))(e.into()))?;
                    confined::chown_at(&parent, &name, owner)
                        .map_err(io("cannot chown", tree_dir.join(&rel)))?;
                    let target = open_dir_at(&parent, &name)
                        .map_err(io("cannot open", tree_dir.join(&rel)))?;
                    let from = format!("{}/.", cache.host.display());
                    let to = format!("{}/", fd_path(&target, &tree_dir.join(&rel)));
                    self.exec
                        .output(&Cmd::new(["cp", "-a", &from, &to]))
                        .await?;
                    false
                }
                Err(e) => return Err(io("cannot move", &cache.host)(e.into())),
            };
            placed.push(Placed {
                host: cache.host.clone(),
                tree_dir,
                rel,
                renamed,
                hidden,
            });
        }
        Ok(())
    }

    /// Takes the caches back to their copies and puts back what they hid. Never follows a
    /// symlink the step may have put on the way.
    async fn take_back_caches(&self, placed: Vec<Placed>) -> Result<(), SandboxError> {
        let mut first_err = None;
        for p in placed.into_iter().rev() {
            let r: Result<(), SandboxError> = async {
                let root =
                    ConfinedRoot::open(&p.tree_dir).map_err(io("cannot open", &p.tree_dir))?;
                let shown = p.tree_dir.join(&p.rel);
                let Some((parent, name)) = root
                    .parent(&p.rel, Follow::Never)
                    .map_err(io("cannot open", &shown))?
                else {
                    return Ok(());
                };
                let (cache_dir, cache_name) = open_parent(&p.host)?;
                let is_dir = matches!(
                    confined::kind_at(&parent, &name),
                    Ok(Some((rustix::fs::FileType::Directory, _)))
                );
                if p.renamed {
                    if is_dir {
                        rustix::fs::renameat(&parent, name.as_str(), &cache_dir, cache_name)
                            .map_err(|e| io("cannot move back", &shown)(e.into()))?;
                    } else {
                        // The step replaced the cache with something else: drop that.
                        let _ = confined::remove_at(&parent, &name);
                        std::fs::create_dir_all(&p.host).map_err(io("cannot create", &p.host))?;
                    }
                } else {
                    let _ = std::fs::remove_dir_all(&p.host);
                    std::fs::create_dir_all(&p.host).map_err(io("cannot create", &p.host))?;
                    if is_dir {
                        let target =
                            open_dir_at(&parent, &name).map_err(io("cannot open", &shown))?;
                        let from = format!("{}/.", fd_path(&target, &shown));
                        let to = format!("{}/", p.host.display());
                        self.exec
                            .output(&Cmd::new(["cp", "-a", &from, &to]))
                            .await?;
                    }
                    let _ = confined::remove_at(&parent, &name);
                }
                if let Some(h) = &p.hidden {
                    rustix::fs::renameat(&parent, h.as_str(), &parent, name.as_str())
                        .map_err(|e| io("cannot restore", &shown)(e.into()))?;
                }
                Ok(())
            }
            .await;
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Writes the secrets, one file per secret named by its target's basename, 0400 and
    /// owned by the user, in a private directory (as the original's macOS sandbox).
    fn write_secrets(&self, c: &RunConfig, uid: u32) -> Result<Option<PathBuf>, SandboxError> {
        if c.secrets.is_empty() {
            return Ok(None);
        }
        let mut names = HashSet::new();
        for s in &c.secrets {
            let base = s.target.rsplit('/').next().unwrap_or("");
            if base.is_empty() || base == "." || base == ".." {
                return Err(SandboxError::Unsupported(format!(
                    "secret target {:?}: needs a file name",
                    s.target
                )));
            }
            if !names.insert(base.to_string()) {
                return Err(SandboxError::Unsupported(format!(
                    "two secrets have targets named {base:?}: the user sandbox puts secrets in \
                     one directory ($OBUILDER_SECRETS_DIR) by the targets' basenames"
                )));
            }
        }
        let dir = self.private_dir("secrets", uid)?;
        for s in &c.secrets {
            let base = s.target.rsplit('/').next().unwrap_or("");
            let p = dir.join(base);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&p)
                .map_err(io("cannot write", &p))?;
            std::io::Write::write_all(&mut f, &s.value).map_err(io("cannot write", &p))?;
            rustix::fs::fchown(
                &f,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(self.opts.gid())),
            )
            .map_err(|e| io("cannot chown", &p)(e.into()))?;
        }
        give(&dir, uid, self.opts.gid())?;
        Ok(Some(dir))
    }

    /// Everything a step needs before its command: the trees, the user, the redirect.
    async fn prepare(&self, c: &RunConfig, rootfs: &Path, uid: u32) -> Result<(), SandboxError> {
        let owner = self.canonical();
        let root = ConfinedRoot::open(rootfs).map_err(io("cannot open", rootfs))?;
        for tree in self.trees() {
            // The step's children, as the store's base images have them (made if missing).
            root.create_dirs(tree.child(), 0o755, Some(owner))
                .map_err(io("cannot create", rootfs.join(tree.child())))?;
            // A tree not yet the build users' (a base image imported as root) becomes
            // theirs once; its results then are.
            let (dir, name) = (root.root_fd(), tree.child());
            let st = rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|e| io("cannot read", rootfs.join(name))(e.into()))?;
            if st.st_uid != owner.uid || st.st_gid != owner.gid {
                let path = rootfs.join(name).to_string_lossy().into_owned();
                let ids = format!("{}:{}", owner.uid, owner.gid);
                tracing::info!("giving {path} to the build users ({ids})");
                self.exec
                    .output(&Cmd::new(["chown", "-R", "-h", &ids, &path]))
                    .await?;
            }
        }
        self.ensure_user(uid).await?;
        if self.opts.fuse {
            for tree in self.trees() {
                self.ensure_mounted(tree).await?;
                self.register(tree, uid, &rootfs.join(tree.child()))?;
            }
        } else {
            for tree in self.trees() {
                let real = PathBuf::from(self.logical(tree));
                if mount_state(&real, None) != MountState::None {
                    return Err(SandboxError::Unsupported(format!(
                        "--no-fuse copies into {} itself, but a filesystem is mounted there \
                         (obuilderfs, from builds without --no-fuse?): unmount it with \
                         `umount {}` first, or drop --no-fuse",
                        real.display(),
                        real.display()
                    )));
                }
                self.rsync(&rootfs.join(tree.child()), &real).await?;
                give(&real, owner.uid, owner.gid)?;
            }
        }
        // The workdir, made in the tree as the build user's.
        let (tree, rel) = self
            .place(&c.cwd)
            .ok_or_else(|| self.refuse("workdir", &c.cwd))?;
        let dir = self.tree_dir(rootfs, tree);
        let t = ConfinedRoot::open(&dir).map_err(io("cannot open", &dir))?;
        t.create_dirs(&rel, 0o755, Some(owner))
            .map_err(io("cannot create the workdir in", &dir))?;
        Ok(())
    }

    /// Undoes `prepare` (and copies the trees back without FUSE).
    async fn finish(&self, rootfs: &Path, uid: u32, copy_back: bool) -> Result<(), SandboxError> {
        if self.opts.fuse {
            self.unregister(uid);
            Ok(())
        } else if copy_back {
            for tree in self.trees() {
                let real = PathBuf::from(self.logical(tree));
                self.rsync(&real, &rootfs.join(tree.child())).await?;
            }
            Ok(())
        } else {
            Ok(())
        }
    }
}

/// Directory `name` of `dir`, never through a symlink.
fn open_dir_at(dir: &impl AsFd, name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// The directory holding `path` (opened) and `path`'s name in it.
fn open_parent(path: &Path) -> Result<(std::os::fd::OwnedFd, &std::ffi::OsStr), SandboxError> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let dir = rustix::fs::open(
        parent,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io("cannot open", parent)(e.into()))?;
    Ok((dir, path.file_name().unwrap_or_default()))
}

/// Removes the private dirs (`obuilder-tmp-UID-…`, `obuilder-secrets-UID-…`) left in the
/// temp dir by steps of `uid`: real directories only (a symlink a build user planted there
/// is removed as a link, never followed).
fn remove_private_dirs(uid: u32) {
    let base = std::env::temp_dir();
    let Ok(rd) = std::fs::read_dir(&base) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = ["tmp", "secrets"]
            .iter()
            .any(|w| name.starts_with(&format!("obuilder-{w}-{uid}-")));
        if !ours {
            continue;
        }
        let p = e.path();
        let removed = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p),
            Ok(_) => std::fs::remove_file(&p),
            Err(_) => continue,
        };
        match removed {
            Ok(()) => tracing::info!("removed {} left by a step of uid {uid}", p.display()),
            Err(e) => tracing::warn!("cannot remove {}: {e}", p.display()),
        }
    }
}

/// Gives directory `path` to `uid:gid` without following a symlink.
fn give(path: &Path, uid: u32, gid: u32) -> Result<(), SandboxError> {
    let f = rustix::fs::open(
        path,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| io("cannot open", path)(e.into()))?;
    rustix::fs::fchown(
        &f,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )
    .map_err(|e| io("cannot chown", path)(e.into()))
}

/// A path naming open directory `fd` for a helper command: through /proc on Linux (so a
/// symlink swapped in since it was opened changes nothing), else `shown`.
fn fd_path(fd: &impl AsFd, shown: &Path) -> String {
    if cfg!(target_os = "linux") {
        format!("/proc/{}/fd/{}", std::process::id(), fd.as_fd().as_raw_fd())
    } else {
        shown.to_string_lossy().into_owned()
    }
}

// Told apart from mount tables on Linux and macOS only.
#[cfg_attr(not(any(target_os = "linux", target_os = "macos")), allow(dead_code))]
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum MountState {
    None,
    Ours,
    /// Mounted, but its daemon is gone (`ENOTCONN`).
    Stale,
    Other(String),
    /// An obuilderfs serving another scoreboard (another store), named by its source.
    Foreign(String),
}

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux::mount_state;

#[cfg(not(target_os = "linux"))]
fn mount_state(path: &Path, _scoreboard: Option<&Path>) -> MountState {
    match std::fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => MountState::Stale,
        Err(_) => MountState::None,
        Ok(m) => {
            use std::os::unix::fs::MetadataExt;
            let parent = path.parent().and_then(|p| std::fs::metadata(p).ok());
            match parent {
                Some(p) if p.dev() != m.dev() => MountState::Ours,
                _ => MountState::None,
            }
        }
    }
}

#[async_trait]
impl Sandbox for UserSandbox {
    /// The user's login shell runs the command; bash, as the original.
    fn default_shell(&self) -> Vec<String> {
        vec!["/bin/bash".into(), "-c".into()]
    }

    fn user(&self, user: &User) -> Result<UserIds, SandboxError> {
        let build = self.canonical();
        let ok = match user {
            // The default: the build user.
            User::Unix { uid: 0, gid: 0 } => true,
            User::Unix { uid, gid } => *uid == build.uid && *gid == build.gid,
            User::Name(n) => *n == self.opts.platform.user_name(build.uid),
        };
        if ok {
            Ok(UserIds {
                uid: build.uid,
                gid: build.gid,
            })
        } else {
            Err(SandboxError::Unsupported(format!(
                "{user:?}: the user sandbox runs every step as a build user of its pool, \
                 seen as uid {} gid {} (the owner of the stored trees); it cannot run as \
                 another user without a container. Remove the (user …) op, or use \
                 (user (uid {}) (gid {}))",
                build.uid, build.gid, build.uid, build.gid
            )))
        }
    }

    fn copy_target(&self, rootfs: &Path, path: &str) -> Result<(PathBuf, String), SandboxError> {
        let (tree, rel) = self
            .place(path)
            .ok_or_else(|| self.refuse("copy destination", path))?;
        let mut rel = format!("/{rel}");
        if path.ends_with('/') && !rel.ends_with('/') {
            rel.push('/');
        }
        Ok((rootfs.join(tree.child()), rel))
    }

    async fn recover(&self) -> Result<(), SandboxError> {
        let locks = self.dir.join("locks");
        std::fs::create_dir_all(&locks).map_err(io("cannot create", &locks))?;
        // A build user nobody holds has nothing to run: kill what a dead builder left.
        for uid in self.uids() {
            let p = locks.join(uid.to_string());
            let Ok(f) = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
            else {
                continue;
            };
            if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
            {
                continue;
            }
            if self.opts.fuse
                && self
                    .scoreboard(Tree::Home)
                    .join(uid.to_string())
                    .is_symlink()
            {
                tracing::warn!("killing what a dead builder left running as uid {uid}");
                self.kill_all(uid, None).await;
                self.unregister(uid);
            }
            // Private temp and secret dirs of this user's steps: with its lock free, no step
            // uses them (a builder killed mid-step could not remove them).
            remove_private_dirs(uid);
        }
        Ok(())
    }

    async fn run(
        &self,
        c: &RunConfig,
        rootfs: &Path,
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<(), SandboxError> {
        // Everything that can be refused, before anything is taken.
        let isolate_network = match c.network.as_slice() {
            [] => self.opts.platform == Platform::Linux,
            [h] if h == "host" => false,
            other => {
                return Err(SandboxError::Unsupported(format!(
                    "network {other:?}: the user sandbox has the host's network or (on Linux) none"
                )))
            }
        };
        if self.place(&c.cwd).is_none() {
            return Err(self.refuse("workdir", &c.cwd));
        }
        for cache in &c.caches {
            if !matches!(self.place(&cache.target), Some((_, rel)) if !rel.is_empty()) {
                return Err(self.refuse("cache target", &cache.target));
            }
        }
        let lease = self.lease(cancel).await?;
        let uid = lease.uid;
        let gid = self.opts.gid();
        let mut placed = Vec::new();
        let mut private = Vec::new();
        let mut started = false;
        let mut supervisor: Option<std::fs::File> = None;
        let result = async {
            self.prepare(c, rootfs, uid).await?;
            self.place_caches(c, rootfs, &mut placed).await?;
            let tmp = self.private_dir("tmp", uid)?;
            give(&tmp, uid, gid)?;
            private.push(tmp.clone());
            let mut env = c.env.clone();
            env.insert(0, ("TMPDIR".into(), tmp.to_string_lossy().into_owned()));
            if let Some(dir) = self.write_secrets(c, uid)? {
                env.insert(
                    0,
                    (
                        "OBUILDER_SECRETS_DIR".into(),
                        dir.to_string_lossy().into_owned(),
                    ),
                );
                private.push(dir);
            }
            let cwd = if c.cwd == "/" {
                self.opts.home()
            } else {
                c.cwd.clone()
            };
            let inv = Invocation {
                uid,
                gid,
                cwd,
                env,
                argv: c.argv.clone(),
                isolate_network,
            };
            let (read, write) = crate::cloexec_pipe()
                .map_err(|e| io("cannot make a pipe for", rootfs)(e.into()))?;
            let write2 = write
                .try_clone()
                .map_err(io("cannot make a pipe for", rootfs))?;
            // A command given this process's terminal (`obuilder shell`) keeps it for its
            // output too: it runs on the host, so the terminal is its own.
            let tty = c.stdin
                && std::io::IsTerminal::is_terminal(&std::io::stdin())
                && std::io::IsTerminal::is_terminal(&std::io::stdout());
            let (stdout, stderr) = if tty {
                drop((write, write2));
                (Stdio::inherit(), Stdio::inherit())
            } else {
                (Stdio::from(write), Stdio::from(write2))
            };
            let argv = command_argv(self.opts.platform, &inv);
            let (sup_read, sup_write) = crate::cloexec_pipe()
                .map_err(|e| io("cannot make a pipe for", rootfs)(e.into()))?;
            // The supervisor holds the user's lock as its (unused) standard output: if this
            // builder dies, the user is not leased to the next step until the supervisor has
            // killed everything and exited, so its last `pkill` cannot hit that step.
            let sup_lock = lease
                .lock
                .try_clone()
                .map_err(io("cannot share the build user's lock for", rootfs))?;
            let mut sup = self.exec.spawn(
                &Cmd::new([
                    "/bin/sh",
                    "-c",
                    SUPERVISOR,
                    "obuilder-user-supervisor",
                    &uid.to_string(),
                ]),
                Stdio::from(sup_read),
                Stdio::from(sup_lock),
                Stdio::null(),
            )?;
            supervisor = Some(std::fs::File::from(sup_write));
            // Reaped in the background once told `done`.
            tokio::spawn(async move {
                let _ = sup.wait().await;
            });
            started = true;
            // The umask runc gives a step, and no signal ignored because the builder's
            // parent ignored it: a result never depends on how the builder was started (a
            // login profile may still set its own umask).
            let mut child = self.exec.spawn(
                &Cmd::new(argv).umask(0o022).default_signals(),
                if c.stdin {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                },
                stdout,
                stderr,
            )?;
            let pumping = crate::pump(read, log.clone());
            let status = tokio::select! {
                s = child.wait() => Some(s.map_err(io("cannot wait for the step in", rootfs))?),
                _ = cancel.cancelled() => None,
            };
            // Nothing the step started outlives it: its user's processes all go.
            self.kill_all(uid, Some(&mut child)).await;
            let status = match status {
                Some(s) => s,
                None => {
                    let _ = child.wait().await;
                    let _ = pumping.await;
                    return Err(SandboxError::Cancelled);
                }
            };
            let _ = pumping.await;
            crate::exit_result(&c.argv, status)
        }
        .await;
        if started {
            // Whatever happened, nothing may still run before the trees go back.
            self.kill_all(uid, None).await;
        }
        if let Some(mut s) = supervisor {
            let _ = std::io::Write::write_all(&mut s, b"done\n");
        }
        for d in private {
            let _ = std::fs::remove_dir_all(&d);
        }
        let caches = self.take_back_caches(placed).await;
        let finished = self
            .finish(rootfs, uid, result.is_ok() && caches.is_ok())
            .await;
        drop(lease);
        result?;
        caches?;
        finished
    }
}

#[cfg(test)]
mod tests;
