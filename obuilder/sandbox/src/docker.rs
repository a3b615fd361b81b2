//! The Docker sandbox (`--sandbox docker`, with `--store docker:/PATH`), as the original's
//! `docker_sandbox.ml`: each step is `docker run` of a container named after the build,
//! from its parent's image; the store commits the container when the step succeeds and
//! removes it otherwise. Works with any Docker-compatible CLI (`--docker-cli podman`).
//!
//! ```text
//! CLI run --name PREFIX-ID --hostname builder --workdir CWD --user UID:GID|NAME
//!     [--cpus N] [--memory M] [--isolation I] --network none|host|NAME…
//!     --env K=V… --mount type=bind,src=CACHE,dst=TARGET…
//!     --mount type=bind,src=SECRET,dst=TARGET,readonly… --entrypoint ARGV0 PREFIX:PARENT ARGV1…
//! ```
//!
//! Unlike the original, a step without `(network …)` gets no network (`none`), as with
//! runc; `(network host)` gets `--docker-network` if given (Windows has no `host`), else
//! `host`. Secrets are files (0400, the step's user) bind-mounted read-only at their
//! targets, removed after the step (the engine may leave an empty mount point in the
//! image). Cancel removes the container (`rm -f`), which ends `docker run`.
//!
//! With an engine of Windows containers (`--docker-platform windows`, set from the
//! store's), whose files are not this host's: caches are the engine's volumes
//! (`--mount type=volume`), root is `ContainerAdministrator` (Windows users are names),
//! and secrets are refused, since a file of this host cannot be mounted there. As the
//! original's defaults there: Hyper-V isolation, `cmd /S /C` as the shell, and a
//! Unix-style workdir on `C:`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::log::StepLog;
use obuilder_engine::sandbox::{RunConfig, Sandbox, SandboxError, UserIds};
use obuilder_engine::CancellationToken;
use obuilder_spec::User;

/// Flags of the Docker sandbox (the original's `--docker-*`).
#[derive(Debug, Clone, PartialEq)]
pub struct DockerOptions {
    /// The CLI (`docker`, `podman`, a path); set from the store's.
    pub cli: String,
    /// The name prefix of the store's images and containers (`obuilder-stores`'
    /// `docker::prefix`); set from the store's. Empty: no docker: store.
    pub prefix: String,
    pub cpus: Option<f64>,
    /// As Docker takes it (`4g`).
    pub memory: Option<String>,
    /// `default`, `process` or `hyperv` (Windows).
    pub isolation: Option<String>,
    /// The network for steps with `(network host)`.
    pub network: Option<String>,
    /// The engine runs Windows containers; set from the store's.
    pub windows: bool,
}

impl Eq for DockerOptions {}

impl DockerOptions {
    /// The `--isolation` of steps (and of the store's helper containers): as given, else
    /// Hyper-V on Windows, as the original's (steadier, and a VM's kernel is its own: an
    /// image of another Windows build runs too).
    pub fn effective_isolation(&self) -> Option<&str> {
        match &self.isolation {
            Some(i) => Some(i.as_str()),
            None if self.windows => Some("hyperv"),
            None => None,
        }
    }
}

impl Default for DockerOptions {
    fn default() -> DockerOptions {
        DockerOptions {
            cli: "docker".into(),
            prefix: String::new(),
            cpus: None,
            memory: None,
            isolation: None,
            network: None,
            windows: false,
        }
    }
}

/// A copy destination in a Windows container as a path from `C:/`: `C:\\src\\` and
/// `c:/src/` are `/src/`; another drive is refused.
pub fn windows_copy_path(path: &str) -> Result<String, SandboxError> {
    obuilder_spec::portability::windows_path_on_c(path)
        .map_err(|e| SandboxError::Unsupported(format!("copy to {path}: {e}")))
}

pub struct DockerSandbox {
    opts: DockerOptions,
    exec: SharedExec,
    secrets: PathBuf,
}

fn io(what: &'static str, p: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SandboxError {
    SandboxError::io(what, p)
}

impl DockerSandbox {
    pub fn new(state_dir: &Path, opts: DockerOptions, exec: SharedExec) -> DockerSandbox {
        DockerSandbox {
            opts,
            exec,
            secrets: state_dir.join("docker-secrets"),
        }
    }

    /// The build's container and its parent's image, from the build's tree
    /// (`ROOT/result-tmp/ID/rootfs`).
    fn names(&self, rootfs: &Path) -> Result<(String, String), SandboxError> {
        let bad = || {
            SandboxError::Unsupported(format!(
                "{} is not a build of a docker: store (the Docker sandbox needs --store docker:PATH)",
                rootfs.display()
            ))
        };
        let p = &self.opts.prefix;
        if p.is_empty() {
            return Err(bad());
        }
        let dir = rootfs.parent().ok_or_else(bad)?;
        let id = dir.file_name().and_then(|n| n.to_str()).ok_or_else(bad)?;
        let parent = std::fs::read_to_string(dir.join("parent")).map_err(|_| bad())?;
        Ok((format!("{p}-{id}"), format!("{p}:{}", parent.trim())))
    }

    /// The `docker run` argv of a step (secrets already written to `secret_files`).
    pub fn run_argv(
        &self,
        c: &RunConfig,
        container: &str,
        image: &str,
        secret_files: &[PathBuf],
    ) -> Result<Vec<String>, SandboxError> {
        let mount = |src: &Path, dst: &str, ro: bool| {
            let src = src.to_string_lossy();
            if src.contains(',') || dst.contains(',') {
                return Err(SandboxError::Unsupported(format!(
                    "{src} -> {dst}: a path with a comma cannot be given to --mount"
                )));
            }
            Ok(format!(
                "type=bind,src={src},dst={dst}{}",
                if ro { ",readonly" } else { "" }
            ))
        };
        if self.opts.windows && !c.secrets.is_empty() {
            return Err(SandboxError::Unsupported(
                "secrets cannot be given to a step on an engine of Windows containers: a file \
                 of this host cannot be mounted in them"
                    .into(),
            ));
        }
        let user = match &c.user_name {
            // By name (Windows' `ContainerAdministrator`): the image resolves it.
            Some(n) => n.clone(),
            None if self.opts.windows => "ContainerAdministrator".into(),
            None => format!("{}:{}", c.user.uid, c.user.gid),
        };
        // A Unix-style workdir (the default `/`) is on the C: drive, as the original's.
        let cwd = if self.opts.windows && c.cwd.starts_with('/') {
            format!("C:{}", c.cwd)
        } else {
            c.cwd.clone()
        };
        let mut argv: Vec<String> = vec![self.opts.cli.clone(), "run".into()];
        if c.stdin {
            argv.push("-i".into());
        }
        argv.extend(
            [
                "--name",
                container,
                "--hostname",
                "builder",
                "--workdir",
                &cwd,
                "--user",
                &user,
            ]
            .map(String::from),
        );
        if let Some(n) = self.opts.cpus {
            argv.extend(["--cpus".into(), n.to_string()]);
        }
        if let Some(m) = &self.opts.memory {
            argv.extend(["--memory".into(), m.clone()]);
        }
        if let Some(i) = self.opts.effective_isolation() {
            argv.extend(["--isolation".into(), i.to_string()]);
        }
        if c.network.is_empty() {
            argv.extend(["--network".into(), "none".into()]);
        }
        for n in &c.network {
            let n = match (n.as_str(), &self.opts.network) {
                ("host", Some(given)) => given.clone(),
                _ => n.clone(),
            };
            argv.extend(["--network".into(), n]);
        }
        for (k, v) in &c.env {
            argv.extend(["--env".into(), format!("{k}={v}")]);
        }
        for m in &c.caches {
            let spec = match m.host.file_name() {
                // The store names a Windows cache copy by its volume (docker-volumes/NAME).
                Some(v) if self.opts.windows => {
                    let v = v.to_string_lossy();
                    if m.target.contains(',') {
                        return Err(SandboxError::Unsupported(format!(
                            "{}: a path with a comma cannot be given to --mount",
                            m.target
                        )));
                    }
                    format!("type=volume,src={v},dst={}", m.target)
                }
                _ => mount(&m.host, &m.target, false)?,
            };
            argv.extend(["--mount".into(), spec]);
        }
        for (s, f) in c.secrets.iter().zip(secret_files) {
            argv.extend(["--mount".into(), mount(f, &s.target, true)?]);
        }
        let (argv0, rest) = c
            .argv
            .split_first()
            .ok_or_else(|| SandboxError::Unsupported("an empty command".into()))?;
        argv.extend(["--entrypoint".into(), argv0.clone(), image.to_string()]);
        argv.extend(rest.iter().cloned());
        Ok(argv)
    }

    fn write_secrets(
        &self,
        c: &RunConfig,
        container: &str,
    ) -> Result<(PathBuf, Vec<PathBuf>), SandboxError> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.secrets.join(container);
        let mut files = Vec::new();
        if c.secrets.is_empty() {
            return Ok((dir, files));
        }
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        for (i, s) in c.secrets.iter().enumerate() {
            let f = dir.join(i.to_string());
            // A user given by name has no uid here: its secret is readable by every user
            // of the step's container (the only place it is mounted) rather than by root
            // alone, which would shut the user out.
            let mode = if c.user_name.is_some() { 0o444 } else { 0o400 };
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&f)
                .map_err(io("cannot write", &f))?;
            std::io::Write::write_all(&mut file, &s.value).map_err(io("cannot write", &f))?;
            std::os::unix::fs::chown(&f, Some(c.user.uid), Some(c.user.gid))
                .map_err(io("cannot chown", &f))?;
            files.push(f);
        }
        Ok((dir, files))
    }

    async fn rm(&self, container: &str) {
        let _ = self
            .exec
            .output(&Cmd::new([self.opts.cli.as_str(), "rm", "-f", container]))
            .await;
    }
}

#[async_trait]
impl Sandbox for DockerSandbox {
    /// Numeric users, and users by name (as the original's Docker backend takes Windows'
    /// `ContainerAdministrator`): a name goes to `--user` as it is, and what a `copy`
    /// writes for it is owned by uid 0.
    fn user(&self, user: &User) -> Result<UserIds, SandboxError> {
        match user {
            // (Nor one that looks like a flag: `--user` takes the next word whatever it
            // is, but a Docker-compatible CLI need not.)
            User::Name(n)
                if n.is_empty()
                    || n.starts_with('-')
                    || n.contains(':')
                    || n.contains(char::is_whitespace) =>
            {
                Err(SandboxError::Unsupported(format!(
                    "user {n:?}: a user name for the Docker sandbox is one word without `:`, \
                     not starting with `-`"
                )))
            }
            User::Name(_) => Ok(UserIds { uid: 0, gid: 0 }),
            // Windows users are names; root (the default) is ContainerAdministrator.
            User::Unix { uid, gid } if self.opts.windows && (*uid, *gid) != (0, 0) => {
                Err(SandboxError::Unsupported(format!(
                    "user {uid}:{gid}: Windows containers have users by name, e.g. \
                     (user (name ContainerUser)); root is ContainerAdministrator"
                )))
            }
            User::Unix { .. } => crate::numeric_user(user, "Docker"),
        }
    }

    /// `cmd /S /C` on Windows, as the original's default there (Windows images have no
    /// bash).
    fn default_shell(&self) -> Vec<String> {
        if self.opts.windows {
            vec!["cmd".into(), "/S".into(), "/C".into()]
        } else {
            vec!["/bin/bash".into(), "-c".into()]
        }
    }

    /// On Windows, a copy into `C:/src` (or `C:\\src`) is one into `/src`: the store
    /// extracts from `C:/` (a container has no other drive).
    fn copy_target(&self, rootfs: &Path, path: &str) -> Result<(PathBuf, String), SandboxError> {
        if !self.opts.windows {
            return Ok((rootfs.to_path_buf(), path.to_string()));
        }
        Ok((rootfs.to_path_buf(), windows_copy_path(path)?))
    }

    async fn recover(&self) -> Result<(), SandboxError> {
        let _ = std::fs::remove_dir_all(&self.secrets);
        Ok(())
    }

    async fn kill_stale(&self, rootfs: &Path) -> Result<(), SandboxError> {
        if let Ok((container, _)) = self.names(rootfs) {
            self.rm(&container).await;
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
        let (container, image) = self.names(rootfs)?;
        // A container of this name is left by a step that did not finish.
        self.rm(&container).await;
        let (secret_dir, files) = self.write_secrets(c, &container)?;
        let r = async {
            let argv = self.run_argv(c, &container, &image, &files)?;
            let stdin = if c.stdin {
                Stdio::inherit()
            } else {
                Stdio::null()
            };
            let (mut child, pumping) =
                crate::spawn_to_log(&self.exec, &Cmd::new(argv), stdin, log, rootfs)?;
            let status = tokio::select! {
                s = child.wait() => Some(s.map_err(io("cannot wait for the container of", rootfs))?),
                _ = cancel.cancelled() => None,
            };
            let Some(status) = status else {
                self.rm(&container).await;
                let _ = child.wait().await;
                let _ = pumping.await;
                return Err(SandboxError::Cancelled);
            };
            let _ = pumping.await;
            crate::exit_result(&c.argv, status)
        }
        .await;
        if !files.is_empty() {
            let _ = std::fs::remove_dir_all(&secret_dir);
        }
        r
    }
}
