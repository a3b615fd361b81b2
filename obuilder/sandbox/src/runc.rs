#![cfg(target_os = "linux")]
//! The runc sandbox: each step is a `runc run` child of the builder.
//!
//! State: `<state dir>/runc` is runc's `--root` (only our containers live there) and
//! `<state dir>/runc-tmp/ID` holds each run's bundle (`config.json`, `hosts`, secret files;
//! mode 0700, removed after the run). Wiped at start-up: every container left in our runc
//! root (`runc delete --force`, OBuilder #53/#97) and every bundle dir.
//!
//! Nothing outlives its builder: beside each container runs a tiny supervisor (`sh`, in
//! its own process group, deaf to the terminal's signals) that holds the read end of a
//! pipe whose write end only the builder has. When the run ends the builder tells it so;
//! if the builder dies instead (`kill -9`, OOM), the pipe closes and the supervisor
//! deletes the container and its bundle, secret files included, at once rather than at
//! the next start on that store.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use obuilder_engine::confined::{self, ConfinedRoot, Follow};
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::log::{human_bytes, StepLog};
use obuilder_engine::sandbox::{RunConfig, Sandbox, SandboxError, UserIds};
use obuilder_engine::CancellationToken;
use obuilder_spec::User;

use crate::oci::{self, HostFiles, Limits};
use crate::RuncOptions;

/// Container ids are `obuilder-PID-N` with N counted per process, not per sandbox: runc
/// names the container's cgroup after its id, so two sandboxes in one process (a worker
/// with several stores) must never hand out the same one.
static NEXT_CONTAINER: AtomicU64 = AtomicU64::new(0);

/// The supervisor: waits for a line on stdin; `done` means the builder cleaned up itself;
/// anything else (EOF: the builder died) deletes the container (retrying while runc may
/// still be creating it) and the bundle. Arguments: RUNC ROOT ID BUNDLE.
const SUPERVISOR: &str = r#"trap '' INT TERM HUP PIPE
read -r line
[ "$line" = done ] && exit 0
for i in 1 2 3 4 5; do
  "$1" --root "$2" delete --force "$3" >/dev/null 2>&1 && break
  sleep 1
done
rm -rf -- "$4"
"#;

pub struct RuncSandbox {
    state_dir: PathBuf,
    opts: RuncOptions,
    exec: SharedExec,
    limits: Limits,
}

fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SandboxError {
    SandboxError::io(what, path)
}

impl RuncSandbox {
    /// `state_dir` is the store's state dir; the sandbox keeps its files below it.
    pub fn new(state_dir: &Path, opts: RuncOptions, exec: SharedExec) -> RuncSandbox {
        RuncSandbox {
            state_dir: state_dir.to_path_buf(),
            limits: Limits::for_host(opts.fast_sync, opts.max_pids, opts.max_memory),
            opts,
            exec,
        }
    }

    fn runc_root(&self) -> PathBuf {
        self.state_dir.join("runc")
    }

    fn bundles(&self) -> PathBuf {
        self.state_dir.join("runc-tmp")
    }

    fn runc(&self, args: &[&str]) -> Cmd {
        let root = self.runc_root().to_string_lossy().into_owned();
        let mut argv = vec![self.opts.runc.clone(), "--root".into(), root];
        argv.extend(args.iter().map(|s| s.to_string()));
        Cmd::new(argv)
    }

    /// Writes the bundle: config.json, hosts, secret files.
    fn write_bundle(
        &self,
        bundle: &Path,
        c: &RunConfig,
        rootfs: &Path,
        tty: bool,
    ) -> Result<(), SandboxError> {
        std::fs::create_dir_all(bundle).map_err(io("cannot create", bundle))?;
        std::fs::set_permissions(bundle, std::fs::Permissions::from_mode(0o700))
            .map_err(io("cannot chmod", bundle))?;
        let hosts = bundle.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost builder\n")
            .map_err(io("cannot write", &hosts))?;
        let mut secrets = Vec::new();
        for (i, s) in c.secrets.iter().enumerate() {
            let p = bundle.join(format!("secret-{i}"));
            // Created 0400 from the start: never readable by others, not even briefly.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&p)
                .map_err(io("cannot write", &p))?;
            f.write_all(&s.value).map_err(io("cannot write", &p))?;
            std::os::unix::fs::chown(&p, Some(c.user.uid), Some(c.user.gid))
                .map_err(io("cannot chown", &p))?;
            secrets.push(p.to_string_lossy().into_owned());
        }
        let files = HostFiles {
            hosts: hosts.to_string_lossy().into_owned(),
            resolv_conf: "/etc/resolv.conf".into(),
            secrets,
        };
        let mut config = oci::config(c, &rootfs.to_string_lossy(), &files, &self.limits)?;
        if tty {
            // runc in the foreground makes the pseudo-terminal and relays it to its own
            // standard streams (this terminal), raw mode and window size included.
            config["process"]["terminal"] = serde_json::Value::Bool(true);
        }
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| SandboxError::Unsupported(e.to_string()))?;
        let p = bundle.join("config.json");
        std::fs::write(&p, text).map_err(io("cannot write", &p))
    }

    fn clear_bundles(&self) -> Result<(), SandboxError> {
        let dir = self.bundles();
        for e in std::fs::read_dir(&dir).map_err(io("cannot list", &dir))? {
            let p = e.map_err(io("cannot list", &dir))?.path();
            let _ = std::fs::remove_dir_all(&p);
        }
        Ok(())
    }

    async fn kill(&self, id: &str) {
        // The container may not exist yet (runc still creating it): retry briefly.
        for _ in 0..50 {
            match self.exec.output(&self.runc(&["kill", id, "KILL"])).await {
                Ok(_) => return,
                Err(e) => tracing::debug!("runc kill {id}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts the supervisor of container `id`; returns the builder's end of its pipe.
    fn supervise(&self, id: &str, bundle: &Path) -> Result<std::fs::File, SandboxError> {
        let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| io("cannot make a pipe for", bundle)(e.into()))?;
        let root = self.runc_root().to_string_lossy().into_owned();
        let cmd = Cmd::new([
            "sh",
            "-c",
            SUPERVISOR,
            "obuilder-supervisor",
            &self.opts.runc,
            &root,
            id,
            &bundle.to_string_lossy(),
        ]);
        // Dropped at once: tokio reaps the child when it exits.
        self.exec
            .spawn(&cmd, Stdio::from(read), Stdio::null(), Stdio::null())?;
        Ok(std::fs::File::from(write))
    }
}

/// Whether the command `argv0` names exists in the tree (resolving symlinks inside it);
/// true for a bare name (found on the image's `PATH` at run time).
fn command_exists(root: &ConfinedRoot, argv0: &str) -> bool {
    if !argv0.starts_with('/') {
        return true;
    }
    let mut path = argv0.to_string();
    for _ in 0..40 {
        let Ok(Some((dir, name))) = root.parent(&path, Follow::InRoot) else {
            return false;
        };
        match confined::kind_at(&dir, &name) {
            Ok(Some((rustix::fs::FileType::Symlink, _))) => {
                let Ok(target) = rustix::fs::readlinkat(&dir, name.as_str(), Vec::new()) else {
                    return false;
                };
                let target = target.to_string_lossy().into_owned();
                path = if target.starts_with('/') {
                    target
                } else {
                    let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
                    format!("{parent}/{target}")
                };
            }
            Ok(Some(_)) => return true,
            _ => return false,
        }
    }
    false
}

/// Refuses a command given by path that is not in the tree, before any container is made
/// (with a hint for the default shell, which small images lack).
pub(crate) fn check_command(root: &ConfinedRoot, argv0: &str) -> Result<(), SandboxError> {
    if command_exists(root, argv0) {
        return Ok(());
    }
    let hint = if argv0 == "/bin/bash" {
        "; /bin/bash is the default shell: images without bash (busybox, alpine) \
         need (shell /bin/sh -c) in the spec"
    } else {
        ""
    };
    Err(SandboxError::NoCommand(format!(
        "{argv0} does not exist in the image{hint}"
    )))
}

/// Whether the end of a step's log says it could not start a process.
fn hit_process_limit(tail: &[u8]) -> bool {
    let t = String::from_utf8_lossy(tail);
    (t.contains("fork") || t.contains("pthread_create") || t.contains("spawn"))
        && (t.contains("Resource temporarily unavailable") || t.contains("retry: "))
}

/// A container's end as the step's result: `code` is its exit status (128+N when its
/// process was killed by signal N, as runc and shells report it), `signal` the signal
/// that ended it directly. Says in the log when the process limit was probably hit, and
/// names the memory limit when the step was killed with SIGKILL under one.
pub(crate) fn step_status(
    argv: &[String],
    code: Option<i32>,
    signal: Option<i32>,
    max_pids: Option<u64>,
    max_memory: Option<u64>,
    log: &StepLog,
) -> Result<(), SandboxError> {
    let cmd = Cmd::new(argv.to_vec()).display();
    let signalled = |signal: i32| {
        let hint = match (signal, max_memory) {
            (9, Some(m)) => Some(format!(
                "the step may use at most {} (--max-memory): it probably ran out",
                human_bytes(m)
            )),
            _ => None,
        };
        Err(SandboxError::Signalled {
            cmd: cmd.clone(),
            signal,
            hint,
        })
    };
    match (code, signal) {
        (Some(0), _) => Ok(()),
        (Some(code), _) => {
            if let Some(n) = max_pids {
                if hit_process_limit(&log.last_bytes(4096)) {
                    let _ = log.write(
                        format!(
                            "\nobuilder: the step could not start more processes: it may have reached its limit of {n} (--max-pids)\n"
                        )
                        .as_bytes(),
                    );
                }
            }
            if code > 128 && code < 128 + 65 {
                signalled(code - 128)
            } else {
                Err(SandboxError::Failed { cmd, status: code })
            }
        }
        (None, Some(signal)) => signalled(signal),
        (None, None) => Err(SandboxError::Failed { cmd, status: -1 }),
    }
}

#[async_trait]
impl Sandbox for RuncSandbox {
    /// runc runs numeric users only: it has no access to the image's user database.
    fn user(&self, user: &User) -> Result<UserIds, SandboxError> {
        crate::numeric_user(user, "runc")
    }

    async fn recover(&self) -> Result<(), SandboxError> {
        for d in [self.runc_root(), self.bundles()] {
            std::fs::create_dir_all(&d).map_err(io("cannot create", &d))?;
        }
        // runc keeps a directory per container in its root: with none, there is nothing to
        // ask runc about (and starting it costs more than the rest of a cached build).
        let root = self.runc_root();
        let any = std::fs::read_dir(&root)
            .map_err(io("cannot list", &root))?
            .next()
            .is_some();
        if !any {
            return self.clear_bundles();
        }
        let out = self.exec.output(&self.runc(&["list", "-q"])).await?;
        for id in out
            .stdout_str()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            tracing::info!("removing leftover container {id}");
            self.exec
                .output(&self.runc(&["delete", "--force", id]))
                .await?;
        }
        self.clear_bundles()
    }

    async fn kill_stale(&self, rootfs: &Path) -> Result<(), SandboxError> {
        let root = self.runc_root();
        if std::fs::read_dir(&root).map_or(true, |mut d| d.next().is_none()) {
            return Ok(());
        }
        let out = self
            .exec
            .output(&self.runc(&["list", "--format", "json"]))
            .await?;
        let list: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let want = rootfs.to_string_lossy();
        for c in list.as_array().into_iter().flatten() {
            if c["rootfs"].as_str() == Some(&want) {
                if let Some(id) = c["id"].as_str() {
                    tracing::warn!("deleting container {id}, left running on {want}");
                    self.exec
                        .output(&self.runc(&["delete", "--force", id]))
                        .await?;
                }
            }
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
        let confined = ConfinedRoot::open(rootfs).map_err(io("cannot open", rootfs))?;
        if let Some(argv0) = c.argv.first() {
            check_command(&confined, argv0)?;
        }
        let id = format!(
            "obuilder-{}-{}",
            std::process::id(),
            NEXT_CONTAINER.fetch_add(1, Ordering::Relaxed)
        );
        let bundle = self.bundles().join(&id);
        // Secret targets that do not exist get mount points made by runc; remember them to
        // remove afterwards, so the snapshot keeps no trace of the secret. Both the look
        // and the removal go through descriptors confined to the rootfs that never follow
        // a symlink: the step may have swapped a directory for a link to the host.
        let made: Vec<Vec<String>> = c
            .secrets
            .iter()
            .map(|s| confined::missing_components(&confined, &s.target))
            .collect();
        let mut supervisor = None;
        let result = async {
            // A command given this process's terminal (`obuilder shell`) gets a terminal of
            // its own; its output then goes to the terminal, not to the log.
            let tty = c.stdin
                && std::io::IsTerminal::is_terminal(&std::io::stdin())
                && std::io::IsTerminal::is_terminal(&std::io::stdout());
            self.write_bundle(&bundle, c, rootfs, tty)?;
            supervisor = Some(self.supervise(&id, &bundle)?);
            let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| io("cannot make a pipe for", &bundle)(e.into()))?;
            let write2 = write
                .try_clone()
                .map_err(io("cannot make a pipe for", &bundle))?;
            let (stdout, stderr) = if tty {
                // (closed here, so that the log's pump ends at once)
                drop((write, write2));
                (Stdio::inherit(), Stdio::inherit())
            } else {
                (Stdio::from(write), Stdio::from(write2))
            };
            let bundle_s = bundle.to_string_lossy().into_owned();
            let mut child = self.exec.spawn(
                &self.runc(&["run", "--bundle", &bundle_s, &id]).cwd(&bundle),
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
                s = child.wait() => Some(s.map_err(io("cannot wait for runc in", &bundle))?),
                _ = cancel.cancelled() => None,
            };
            let status = match status {
                Some(s) => s,
                None => {
                    self.kill(&id).await;
                    let _ = child.wait().await;
                    let _ = self
                        .exec
                        .output(&self.runc(&["delete", "--force", &id]))
                        .await;
                    let _ = pumping.await;
                    return Err(SandboxError::Cancelled);
                }
            };
            let _ = pumping.await;
            step_status(
                &c.argv,
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
                self.opts.max_pids,
                self.opts.max_memory,
                log,
            )
        }
        .await;
        let _ = std::fs::remove_dir_all(&bundle);
        for paths in made {
            confined::remove_made(&confined, &paths);
        }
        if let Some(mut s) = supervisor {
            // Everything is cleaned up: the supervisor can go.
            let _ = s.write_all(b"done\n");
        }
        result
    }
}
