//! The Sandbox interface: run one command against a step's tree.
//!
//! The engine knows nothing of how a sandbox isolates a command; it asks the sandbox for
//! everything that differs between them: the default shell, which users it can run as,
//! and where a container path of the step lives on the host (for `copy`).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use obuilder_spec::User;
use tokio_util::sync::CancellationToken;

use crate::exec::ExecError;
use crate::log::StepLog;

/// A shared cache for one step: a private writable copy, seen at `target` by the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMount {
    /// The copy on the host.
    pub host: PathBuf,
    /// Where the command sees it.
    pub target: String,
}

/// A secret for one step: its value and where it appears (read-only) to the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMount {
    pub value: Vec<u8>,
    pub target: String,
}

/// The numeric ids a step runs as (what its files are owned by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIds {
    pub uid: u32,
    pub gid: u32,
}

/// Everything a sandbox needs to run one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    /// As given by [`Sandbox::user`].
    pub user: UserIds,
    /// The step's `(user (name N))`, for a sandbox that runs users by name (Docker,
    /// e.g. Windows' `ContainerAdministrator`); the others refuse names in `user`.
    pub user_name: Option<String>,
    /// `[]` for an isolated network, `["host"]` for the host's.
    pub network: Vec<String>,
    pub caches: Vec<CacheMount>,
    pub secrets: Vec<SecretMount>,
    /// The command reads this process's standard input (`obuilder run -i`, `shell`);
    /// a step's never does (it gets /dev/null).
    pub stdin: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cancelled")]
    Cancelled,
    #[error("`{cmd}` failed with exit status {status}")]
    Failed { cmd: String, status: i32 },
    #[error("`{cmd}` was killed by signal {signal}")]
    Signalled {
        cmd: String,
        signal: i32,
        /// What probably sent it (e.g. a memory limit).
        hint: Option<String>,
    },
    /// The step cannot run in this sandbox as written (a user, a network, a path).
    #[error("{0}")]
    Unsupported(String),
    /// The command to run does not exist in the step's tree.
    #[error("{0}")]
    NoCommand(String),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SandboxError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| SandboxError::Io { what, path, source }
    }
}

/// Runs commands in isolation.
///
/// Caller's promises: `rootfs` is a writable tree owned by this run alone; `config.user`
/// came from [`Sandbox::user`]. Implementor's guarantees: stdout and stderr go to `log` as
/// they come (stdin reads EOF); when `cancel` fires, the command and everything it started
/// are killed and `Cancelled` is returned; on return nothing of the run is left running or
/// mounted, and nothing it made outside `rootfs` (secret files, mount points) is left.
#[async_trait]
pub trait Sandbox: Send + Sync {
    /// The shell used when a spec sets none (OBuilder's is `/bin/bash -c`).
    fn default_shell(&self) -> Vec<String> {
        vec!["/bin/bash".into(), "-c".into()]
    }

    /// The ids a step with this `(user …)` runs as, or why this sandbox cannot run it.
    /// Checked before the step's id is computed, so a refusal costs nothing.
    fn user(&self, user: &User) -> Result<UserIds, SandboxError>;

    /// Where `copy` writes container path `path` of a step whose tree is `rootfs`: a host
    /// directory to confine the writes to, and the path inside it. Most sandboxes run the
    /// command on `rootfs` as `/`; the user sandbox maps the home directory.
    fn copy_target(&self, rootfs: &Path, path: &str) -> Result<(PathBuf, String), SandboxError> {
        Ok((rootfs.to_path_buf(), path.to_string()))
    }

    /// A step is about to run (it missed the cache; its tree is about to be made): a
    /// sandbox may prepare, in the background, what a step needs that does not depend on
    /// its tree. Called on the builder's thread before the step's run is started, so it
    /// must return at once (start threads, do not wait for them). Never fails: a step
    /// that finds nothing prepared does the work itself.
    fn warm(&self) {}

    /// Removes leftovers of runs a crash interrupted (containers, temp dirs).
    async fn recover(&self) -> Result<(), SandboxError> {
        Ok(())
    }

    /// Kills whatever may still run on `rootfs` from a builder that died (its build dir is
    /// about to be removed). Only called while holding that step's lock.
    async fn kill_stale(&self, _rootfs: &Path) -> Result<(), SandboxError> {
        Ok(())
    }

    /// Runs `config` on `rootfs` (see the trait's contract).
    async fn run(
        &self,
        config: &RunConfig,
        rootfs: &Path,
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<(), SandboxError>;
}
