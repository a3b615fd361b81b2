//! The one seam for external commands.
//!
//! Every command a store, sandbox or fetcher runs goes through an [`Exec`] passed in
//! explicitly, so tests can assert the exact argv and sequence without root (and run the
//! ZFS/macOS command sequences that cannot run here). There is no global switch and no
//! `cfg!(test)`: production code gets [`RealExec`], tests a recorder (see `testkit`).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;

/// A command to run: argv plus optional working directory and standard input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmd {
    pub argv: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// Bytes fed to standard input (closed after them); `None` gives `/dev/null`.
    pub stdin: Option<Vec<u8>>,
}

impl Cmd {
    pub fn new<I, S>(argv: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Cmd {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Cmd::default()
        }
    }

    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Cmd {
        self.cwd = Some(dir.into());
        self
    }

    /// The command as a shell-like string, for messages (clipped: a step's command can be
    /// megabytes long).
    pub fn display(&self) -> String {
        let full = self
            .argv
            .iter()
            .map(|a| {
                if a.is_empty()
                    || a.chars()
                        .any(|c| c.is_whitespace() || "'\"\\$`".contains(c))
                {
                    format!("{a:?}")
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        obuilder_spec::clip(&full, MAX_SHOWN).into_owned()
    }
}

/// The most characters of a command a message shows.
pub const MAX_SHOWN: usize = 300;

/// What a finished command printed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// A command that could not be started or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run `{cmd}`: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed ({status}){}", stderr_suffix(.stderr))]
    Failed {
        cmd: String,
        status: String,
        stderr: String,
    },
}

fn stderr_suffix(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        String::new()
    } else {
        format!(": {s}")
    }
}

/// Runs external commands.
#[async_trait]
pub trait Exec: Send + Sync {
    /// Runs `cmd` to completion and captures its output. A non-zero exit is an
    /// [`ExecError::Failed`] carrying the command line and its standard error.
    async fn output(&self, cmd: &Cmd) -> Result<Output, ExecError>;

    /// Starts `cmd` with the given stdio and returns the child, for long-running processes
    /// whose output is streamed (sandboxes). The caller waits for (and, on cancellation,
    /// kills) the child.
    fn spawn(
        &self,
        cmd: &Cmd,
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<tokio::process::Child, ExecError>;
}

pub type SharedExec = Arc<dyn Exec>;

/// Runs commands for real, logging each at debug level.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealExec;

impl RealExec {
    pub fn shared() -> SharedExec {
        Arc::new(RealExec)
    }
}

fn command(cmd: &Cmd) -> tokio::process::Command {
    // The one place that starts processes (see the crate's clippy.toml).
    #[allow(clippy::disallowed_methods)]
    let mut c = tokio::process::Command::new(&cmd.argv[0]);
    c.args(&cmd.argv[1..]);
    if let Some(dir) = &cmd.cwd {
        c.current_dir(dir);
    }
    c
}

/// Runs `cmd` to completion on a thread of its own that forks it and waits for it, so
/// that the child can be told to die with that thread: if the builder is killed
/// (`kill -9`) mid-command, its helpers (a `cp` or `rsync` filling a build dir) die too
/// instead of writing on into a directory the next builder cleans up. (Linux delivers
/// `PR_SET_PDEATHSIG` when the forking *thread* exits: a pool thread could exit while
/// the child runs, this one cannot.)
fn run_to_end(cmd: &Cmd) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    #[allow(clippy::disallowed_methods)]
    let mut c = std::process::Command::new(&cmd.argv[0]);
    c.args(&cmd.argv[1..]);
    if let Some(dir) = &cmd.cwd {
        c.current_dir(dir);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    c.stdin(if cmd.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    #[cfg(target_os = "linux")]
    linux::die_with_parent(&mut c);
    let mut child = c.spawn()?;
    let feeder = match (&cmd.stdin, child.stdin.take()) {
        (Some(data), Some(mut stdin)) => {
            let data = data.clone();
            Some(std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            }))
        }
        _ => None,
    };
    let out = child.wait_with_output();
    if let Some(f) = feeder {
        let _ = f.join();
    }
    out
}

#[cfg(target_os = "linux")]
mod linux;

#[async_trait]
impl Exec for RealExec {
    async fn output(&self, cmd: &Cmd) -> Result<Output, ExecError> {
        tracing::debug!(cmd = %cmd.display(), "exec");
        let spawn_err = |source| ExecError::Spawn {
            cmd: cmd.display(),
            source,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let owned = cmd.clone();
        std::thread::Builder::new()
            .name("obuilder-exec".into())
            .spawn(move || {
                let _ = tx.send(run_to_end(&owned));
            })
            .map_err(spawn_err)?;
        let out = rx
            .await
            .map_err(|_| spawn_err(std::io::Error::other("the command's thread died")))?
            .map_err(spawn_err)?;
        if out.status.success() {
            Ok(Output {
                stdout: out.stdout,
                stderr: out.stderr,
            })
        } else {
            Err(ExecError::Failed {
                cmd: cmd.display(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    fn spawn(
        &self,
        cmd: &Cmd,
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<tokio::process::Child, ExecError> {
        tracing::debug!(cmd = %cmd.display(), "spawn");
        let mut c = command(cmd);
        c.stdin(stdin).stdout(stdout).stderr(stderr);
        c.spawn().map_err(|source| ExecError::Spawn {
            cmd: cmd.display(),
            source,
        })
    }
}
