//! The runc sandbox: each step is a `runc run` child of the builder.
//!
//! State: `<state dir>/runc` is runc's `--root` (only our containers live there) and
//! `<state dir>/runc-tmp/ID` holds each run's bundle (`config.json`, `hosts`, secret files;
//! mode 0700, removed after the run). Wiped at start-up: every container left in our runc
//! root (`runc delete --force`, OBuilder #53/#97) and every bundle dir.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use obuilder_engine::confined::{self, ConfinedRoot};
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::log::StepLog;
use obuilder_engine::sandbox::{RunConfig, Sandbox, SandboxError};
use obuilder_engine::CancellationToken;

use crate::oci::{self, HostFiles};

/// Flags of the runc sandbox.
#[derive(Debug, Clone)]
pub struct RuncOptions {
    /// Make sync syscalls no-ops inside the sandbox (`--fast-sync`).
    pub fast_sync: bool,
    /// The runc binary.
    pub runc: String,
}

impl Default for RuncOptions {
    fn default() -> RuncOptions {
        RuncOptions {
            fast_sync: false,
            runc: "runc".into(),
        }
    }
}

/// Container ids are `obuilder-PID-N` with N counted per process, not per sandbox: runc
/// names the container's cgroup after its id, so two sandboxes in one process (a worker
/// with several stores) must never hand out the same one.
static NEXT_CONTAINER: AtomicU64 = AtomicU64::new(0);

pub struct RuncSandbox {
    state_dir: PathBuf,
    opts: RuncOptions,
    exec: SharedExec,
    machine: String,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

impl RuncSandbox {
    /// `state_dir` is the store's state dir; the sandbox keeps its files below it.
    pub fn new(state_dir: &Path, opts: RuncOptions, exec: SharedExec) -> RuncSandbox {
        RuncSandbox {
            state_dir: state_dir.to_path_buf(),
            opts,
            exec,
            machine: rustix::system::uname()
                .machine()
                .to_string_lossy()
                .into_owned(),
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
    ) -> Result<(), SandboxError> {
        std::fs::create_dir_all(bundle)
            .map_err(io(format!("cannot create {}", bundle.display())))?;
        std::fs::set_permissions(bundle, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("cannot chmod {}", bundle.display())))?;
        let hosts = bundle.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost builder\n")
            .map_err(io("cannot write hosts"))?;
        let mut secrets = Vec::new();
        for (i, s) in c.secrets.iter().enumerate() {
            let p = bundle.join(format!("secret-{i}"));
            // Created 0400 from the start: never readable by others, not even briefly.
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&p)
                .map_err(io("cannot write a secret file"))?;
            std::io::Write::write_all(&mut f, &s.value)
                .map_err(io("cannot write a secret file"))?;
            std::os::unix::fs::chown(&p, Some(c.uid), Some(c.gid))
                .map_err(io("cannot chown a secret file"))?;
            secrets.push(p.to_string_lossy().into_owned());
        }
        let files = HostFiles {
            hosts: hosts.to_string_lossy().into_owned(),
            resolv_conf: "/etc/resolv.conf".into(),
            secrets,
        };
        let config = oci::config(
            c,
            &rootfs.to_string_lossy(),
            &files,
            self.opts.fast_sync,
            &self.machine,
        )
        .map_err(SandboxError::Unsupported)?;
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| SandboxError::Unsupported(e.to_string()))?;
        std::fs::write(bundle.join("config.json"), text).map_err(io("cannot write config.json"))
    }

    fn clear_bundles(&self) -> Result<(), SandboxError> {
        for e in std::fs::read_dir(self.bundles()).map_err(io("cannot list bundles"))? {
            let p = e.map_err(io("cannot list bundles"))?.path();
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
}

/// Reads the merged stdout/stderr pipe into the step log on a blocking thread.
fn pump(read: OwnedFd, log: StepLog) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::from(read);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if log.write(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

#[async_trait]
impl Sandbox for RuncSandbox {
    async fn recover(&self) -> Result<(), SandboxError> {
        for d in [self.runc_root(), self.bundles()] {
            std::fs::create_dir_all(&d).map_err(io(format!("cannot create {}", d.display())))?;
        }
        // runc keeps a directory per container in its root: with none, there is nothing to
        // ask runc about (and starting it costs more than the rest of a cached build).
        let any = std::fs::read_dir(self.runc_root())
            .map_err(io("cannot list the runc root"))?
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

    async fn run(
        &self,
        c: &RunConfig,
        rootfs: &Path,
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<(), SandboxError> {
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
        let confined =
            ConfinedRoot::open(rootfs).map_err(io(format!("cannot open {}", rootfs.display())))?;
        let made: Vec<Vec<String>> = c
            .secrets
            .iter()
            .map(|s| confined::missing_components(&confined, &s.target))
            .collect();
        let result = async {
            self.write_bundle(&bundle, c, rootfs)?;
            let (read, write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| io("cannot make a pipe")(e.into()))?;
            let write2 = write.try_clone().map_err(io("cannot make a pipe"))?;
            let bundle_s = bundle.to_string_lossy().into_owned();
            let mut child = self.exec.spawn(
                &self.runc(&["run", "--bundle", &bundle_s, &id]).cwd(&bundle),
                Stdio::null(),
                Stdio::from(write),
                Stdio::from(write2),
            )?;
            let pumping = pump(read, log.clone());
            let status = tokio::select! {
                s = child.wait() => Some(s.map_err(io("cannot wait for runc"))?),
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
            let cmd = Cmd::new(c.argv.clone()).display();
            match (
                status.code(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ) {
                (Some(0), _) => Ok(()),
                (Some(code), _) => Err(SandboxError::Failed { cmd, status: code }),
                (None, Some(sig)) => Err(SandboxError::Signalled { cmd, signal: sig }),
                (None, None) => Err(SandboxError::Failed { cmd, status: -1 }),
            }
        }
        .await;
        let _ = std::fs::remove_dir_all(&bundle);
        for paths in made {
            confined::remove_made(&confined, &paths);
        }
        result
    }
}
