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
    /// The command's umask; `None`: this process's.
    pub umask: Option<u32>,
    /// Start it with every signal's default disposition, whatever this process's parent
    /// had set to be ignored (as a container runtime starts a step).
    pub default_signals: bool,
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

    pub fn umask(mut self, mask: u32) -> Cmd {
        self.umask = Some(mask);
        self
    }

    pub fn default_signals(mut self) -> Cmd {
        self.default_signals = true;
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

/// Marks every descriptor this process inherited beyond the standard three close-on-exec,
/// so that none reaches a command or a step: whoever started the builder (a CI runner, a
/// shell, a service manager) may have left some open without close-on-exec, and a
/// directory or file descriptor in a step's hands is a way around its sandbox (`setpriv`,
/// which starts a user-sandbox step, passes every open descriptor on). Called first thing
/// by the programs that run builds; the descriptors stay usable here.
pub fn seal_inherited_descriptors() {
    #[cfg(target_os = "linux")]
    linux::seal_inherited_descriptors();
    #[cfg(not(target_os = "linux"))]
    cloexec_listed("/dev/fd");
}

/// Marks close-on-exec every descriptor above 2 that `listing` (this process's descriptor
/// directory) names.
pub(crate) fn cloexec_listed(listing: &str) {
    let fds: Vec<libc::c_int> = std::fs::read_dir(listing)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl on a descriptor number; EBADF at worst (the listing's own, closed
        // since). FD_CLOEXEC is the only descriptor flag.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// What Rust's runtime does before `main`, for a program that starts without it
/// (`obuilder` on Linux with glibc, see its `main.rs`), less the stack-overflow handler:
/// a standard descriptor that is closed is opened on `/dev/null` (so that no file the
/// program opens takes its number and receives what is meant for stdout), and `SIGPIPE`
/// is ignored (a closed pipe is an `EPIPE` error, handled where it is written). The
/// runtime's own children get `SIGPIPE` back at its default, as before: the standard
/// library resets it in every command it starts unless told otherwise, and the native
/// sandbox resets every signal.
pub fn start_like_the_runtime() {
    for fd in 0..3 {
        // SAFETY: fcntl(F_GETFD) on a descriptor number only reads its flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
        {
            // SAFETY: a NUL-terminated path; the lowest free number is `fd`.
            let got = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            if got != fd {
                // As the runtime does: running with a standard descriptor that anything
                // may take is worse than not running.
                std::process::abort();
            }
        }
    }
    // SAFETY: sets a signal's disposition to ignore; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// Sets this process's umask to 022, as Docker's daemon does at its start: what a build
/// makes (a store's new trees, a base image's implied directories, a workdir, a copy's
/// parents) and what its steps make must not depend on the umask of whoever started the
/// builder. Under 077 a base image's root came out 0700, and no step of a non-root user
/// could run at all. For the programs that open a builder, before they do.
pub fn use_build_umask() {
    // SAFETY: umask only swaps this process's mask.
    unsafe { libc::umask(0o022) };
}

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
    if cmd.umask.is_some() || cmd.default_signals {
        // SAFETY: see `child_setup`.
        unsafe { c.pre_exec(child_setup(cmd.umask, cmd.default_signals)) };
    }
    c
}

/// A `pre_exec` hook that sets the child's umask and resets ignored signals to their
/// default (async-signal-safe: system calls only, nothing of the parent's touched).
fn child_setup(
    umask: Option<u32>,
    default_signals: bool,
) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
    move || {
        // SAFETY: umask and signal only change the calling (child) process.
        unsafe {
            if let Some(mask) = umask {
                libc::umask(mask as libc::mode_t);
            }
            if default_signals {
                // Handlers do not survive execve; ignored signals do. (SIGKILL and SIGSTOP
                // refuse, harmlessly.)
                for sig in 1..32 {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
        }
        Ok(())
    }
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
    if cmd.umask.is_some() || cmd.default_signals {
        use std::os::unix::process::CommandExt;
        // SAFETY: see `child_setup`.
        unsafe { c.pre_exec(child_setup(cmd.umask, cmd.default_signals)) };
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
#[cfg(target_os = "linux")]
pub use linux::cloexec_above_stdio;

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

#[cfg(test)]
mod tests {
    /// The way kernels without `close_range`'s flag (and other systems) take: each listed
    /// descriptor is marked, and stays open.
    #[test]
    fn inherited_descriptors_are_marked_close_on_exec_by_the_listing() {
        // SAFETY: a descriptor opened and closed here.
        unsafe {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            assert!(fd > 2);
            assert_eq!(libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC, 0);
            // (`/dev/fd` is this process's descriptors on Linux, macOS and FreeBSD.)
            super::cloexec_listed("/dev/fd");
            assert_ne!(libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC, 0);
            libc::close(fd);
        }
    }
}
