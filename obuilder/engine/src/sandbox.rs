//! The Sandbox interface: run one command against a root directory.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::exec::ExecError;
use crate::log::StepLog;

/// A bind mount into the sandbox (a shared cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub src: PathBuf,
    pub dst: String,
    pub readonly: bool,
}

/// A secret for one step: its value and where it appears (read-only) in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretMount {
    pub value: Vec<u8>,
    pub target: String,
}

/// Everything a sandbox needs to run one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    /// `[]` for an isolated network, `["host"]` for the host's.
    pub network: Vec<String>,
    pub mounts: Vec<BindMount>,
    pub secrets: Vec<SecretMount>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cancelled")]
    Cancelled,
    #[error("`{cmd}` failed with exit status {status}")]
    Failed { cmd: String, status: i32 },
    #[error("`{cmd}` was killed by signal {signal}")]
    Signalled { cmd: String, signal: i32 },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs commands in isolation.
///
/// Caller's promises: `rootfs` is a writable tree owned by this run alone. Implementor's
/// guarantees: stdout and stderr go to `log` as they come (stdin reads EOF); when `cancel`
/// fires, the command and everything it started are killed and `Cancelled` is returned; on
/// return nothing of the run is left running or mounted.
#[async_trait]
pub trait Sandbox: Send + Sync {
    /// The shell used when a spec sets none (OBuilder's is `/bin/bash -c`).
    fn default_shell(&self) -> Vec<String> {
        vec!["/bin/bash".into(), "-c".into()]
    }

    /// Removes leftovers of runs a crash interrupted (containers, temp dirs).
    async fn recover(&self) -> Result<(), SandboxError> {
        Ok(())
    }

    async fn run(
        &self,
        config: &RunConfig,
        rootfs: &Path,
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<(), SandboxError>;
}
