//! Sandboxes for obuilder, and [`SandboxSpec`], the `--sandbox` value that picks one at
//! run time.
//!
//! * `runc` (Linux): OCI containers, with a config made by the pure function
//!   [`oci::config`] and the default seccomp filter of [`seccomp`].
//! * `native` (Linux): the same container as runc's, set up by the builder itself with no
//!   runtime binary (see [`native`]).
//! * `user` (macOS, and Linux): a build user per step, with the step's snapshot as its
//!   home and Homebrew prefix through obuilderfs (see [`user`]).
//! * `jail` (FreeBSD): a jail per step on the step's tree (see [`jail`]).
//! * `docker`: a container of a Docker-compatible engine per step, on the `docker:` store
//!   (see [`docker`]).

pub mod docker;
pub mod jail;
#[cfg(target_os = "linux")]
pub mod native;
pub mod oci;
#[cfg(target_os = "linux")]
pub mod runc;
pub mod seccomp;
pub mod user;

use std::path::Path;
use std::sync::Arc;

use obuilder_engine::exec::SharedExec;
use obuilder_engine::sandbox::{Sandbox, SandboxError};

#[cfg(target_os = "linux")]
pub use native::NativeSandbox;
#[cfg(target_os = "linux")]
pub use runc::RuncSandbox;
pub use user::{UserOptions, UserSandbox};

/// Copies what a step prints into its log until every writer has closed the pipe: a task
/// on the runtime, reading the pipe as the runtime's other I/O (a blocking thread per step
/// cost a single-step build 0.2 ms to start).
pub(crate) fn pump(
    read: std::os::fd::OwnedFd,
    log: obuilder_engine::log::StepLog,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut pipe = match tokio::net::unix::pipe::Receiver::from_owned_fd(read) {
            Ok(p) => p,
            Err(e) => {
                let _ =
                    log.write(format!("obuilder: cannot read the step's output: {e}\n").as_bytes());
                return;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    let _ = log.write(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    })
}

/// Starts `cmd` with its standard output and error going to `log` (through a pipe pumped
/// by a task); returns the child and the pump, which ends when every writer is
/// gone. `about` names the step's tree in errors.
pub(crate) fn spawn_to_log(
    exec: &SharedExec,
    cmd: &obuilder_engine::exec::Cmd,
    stdin: std::process::Stdio,
    log: &obuilder_engine::log::StepLog,
    about: &Path,
) -> Result<(tokio::process::Child, tokio::task::JoinHandle<()>), SandboxError> {
    let pipe_err = |e: std::io::Error| SandboxError::io("cannot make a pipe for", about)(e);
    let (read, write) = cloexec_pipe().map_err(|e| pipe_err(e.into()))?;
    let write2 = write.try_clone().map_err(pipe_err)?;
    let child = exec.spawn(
        cmd,
        stdin,
        std::process::Stdio::from(write),
        std::process::Stdio::from(write2),
    )?;
    Ok((child, pump(read, log.clone())))
}

/// The ids of a `(user …)` for a container sandbox, which has no access to the image's
/// user database: numeric users only.
pub(crate) fn numeric_user(
    user: &obuilder_spec::User,
    sandbox: &str,
) -> Result<obuilder_engine::sandbox::UserIds, SandboxError> {
    match user {
        obuilder_spec::User::Unix { uid, gid } => Ok(obuilder_engine::sandbox::UserIds {
            uid: *uid,
            gid: *gid,
        }),
        obuilder_spec::User::Name(n) => Err(SandboxError::Unsupported(format!(
            "user {n:?}: the {sandbox} sandbox runs numeric users only; use (user (uid N) (gid N))"
        ))),
    }
}

/// A pipe whose ends are closed on exec (pipe then fcntl: macOS has no pipe2).
pub(crate) fn cloexec_pipe() -> rustix::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let (r, w) = rustix::pipe::pipe()?;
    for fd in [&r, &w] {
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC)?;
    }
    Ok((r, w))
}

/// A command's exit status as a step's result.
pub(crate) fn exit_result(
    argv: &[String],
    status: std::process::ExitStatus,
) -> Result<(), SandboxError> {
    let cmd = obuilder_engine::exec::Cmd::new(argv.to_vec()).display();
    match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(0), _) => Ok(()),
        (Some(code), _) => Err(SandboxError::Failed { cmd, status: code }),
        (None, Some(signal)) => Err(SandboxError::Signalled {
            cmd,
            signal,
            hint: None,
        }),
        (None, None) => Err(SandboxError::Failed { cmd, status: -1 }),
    }
}

/// Flags of the runc sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncOptions {
    /// Make sync syscalls no-ops inside the sandbox (`--fast-sync`).
    pub fast_sync: bool,
    /// The runc binary.
    pub runc: String,
    /// Most processes (threads included) a step may have at once; `None`: no limit.
    pub max_pids: Option<u64>,
    /// Most memory a step may use, in bytes; `None`: no limit.
    pub max_memory: Option<u64>,
}

/// The default process limit of a step: far above what `make -j` on a big machine
/// starts, far below what a fork bomb would.
pub const DEFAULT_MAX_PIDS: u64 = 4096;

impl Default for RuncOptions {
    fn default() -> RuncOptions {
        RuncOptions {
            fast_sync: false,
            runc: "runc".into(),
            max_pids: Some(DEFAULT_MAX_PIDS),
            max_memory: None,
        }
    }
}

/// Flags of the native sandbox (those of the runc sandbox but the binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeOptions {
    /// Make sync syscalls no-ops inside the sandbox (`--fast-sync`).
    pub fast_sync: bool,
    /// Most processes (threads included) a step may have at once; `None`: no limit.
    pub max_pids: Option<u64>,
    /// Most memory a step may use, in bytes; `None`: no limit.
    pub max_memory: Option<u64>,
}

impl Default for NativeOptions {
    fn default() -> NativeOptions {
        NativeOptions {
            fast_sync: false,
            max_pids: Some(DEFAULT_MAX_PIDS),
            max_memory: None,
        }
    }
}

/// Which sandbox runs the steps, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxSpec {
    /// OCI containers run by `runc` (Linux only).
    Runc(RuncOptions),
    /// The runc sandbox's container, set up in-process (Linux only).
    Native(NativeOptions),
    /// A build user per step (the macOS design; also on Linux).
    User(UserOptions),
    /// A jail per step (FreeBSD only).
    Jail,
    /// A container per step, by a Docker-compatible CLI (with the `docker:` store).
    Docker(docker::DockerOptions),
}

/// Every accepted `--sandbox` form, for error messages and help.
pub const FORMS: &str = "native (Linux containers set up by obuilder itself; the default on Linux), \
                         runc (the same containers, run by runc), runc:/PATH/TO/RUNC, \
                         user (a build user per step: the macOS design, also on Linux), \
                         jail (a FreeBSD jail per step), \
                         docker (containers of a Docker-compatible engine, with --store docker:PATH)";

/// A `--sandbox` value that is not one of [`FORMS`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --sandbox {given:?}: {why}; accepted forms: {FORMS}")]
pub struct SandboxSpecError {
    pub given: String,
    pub why: String,
}

impl std::str::FromStr for SandboxSpec {
    type Err = SandboxSpecError;

    fn from_str(s: &str) -> Result<SandboxSpec, SandboxSpecError> {
        let bad = |why: &str| SandboxSpecError {
            given: s.to_string(),
            why: why.to_string(),
        };
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        match kind {
            "runc" => {
                let mut o = RuncOptions::default();
                if let Some(path) = arg {
                    if path.is_empty() {
                        return Err(bad("runc: needs the path of a runc binary after the colon"));
                    }
                    o.runc = path.to_string();
                }
                Ok(SandboxSpec::Runc(o))
            }
            "native" if arg.is_none() => Ok(SandboxSpec::Native(NativeOptions::default())),
            "native" => Err(bad("native takes no argument")),
            "user" if arg.is_none() => Ok(SandboxSpec::User(UserOptions::default())),
            "user" => Err(bad(
                "user takes no argument; see --user-pool and --home-path",
            )),
            "jail" if arg.is_none() => Ok(SandboxSpec::Jail),
            "docker" if arg.is_none() => Ok(SandboxSpec::Docker(docker::DockerOptions::default())),
            "docker" => Err(bad("docker takes no argument; see --docker-cli")),
            "jail" => Err(bad("jail takes no argument")),
            other => Err(bad(&format!("unknown sandbox {other:?}"))),
        }
    }
}

impl SandboxSpec {
    /// The default sandbox of this platform: on Linux the native one (the runc sandbox's
    /// container, started without a runtime binary: docs/performance.md, The native
    /// sandbox), on macOS a build user per step.
    pub fn platform_default() -> Option<SandboxSpec> {
        #[cfg(target_os = "linux")]
        return Some(SandboxSpec::Native(NativeOptions::default()));
        #[cfg(target_os = "macos")]
        return Some(SandboxSpec::User(UserOptions::default()));
        #[cfg(not(any(target_os = "linux", target_os = "macos")))]
        return None;
    }

    /// Makes the sandbox; it keeps its state under the store's `state_dir`.
    pub fn open(
        &self,
        state_dir: &Path,
        exec: SharedExec,
    ) -> Result<Arc<dyn Sandbox>, SandboxError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxSpec::Runc(o) => Ok(Arc::new(RuncSandbox::new(state_dir, o.clone(), exec))),
            #[cfg(not(target_os = "linux"))]
            SandboxSpec::Runc(_) => {
                let _ = (state_dir, exec);
                Err(SandboxError::Unsupported(
                    "the runc sandbox runs on Linux only".into(),
                ))
            }
            #[cfg(target_os = "linux")]
            SandboxSpec::Native(o) => Ok(Arc::new(NativeSandbox::new(state_dir, o.clone()))),
            #[cfg(not(target_os = "linux"))]
            SandboxSpec::Native(_) => Err(SandboxError::Unsupported(
                "the native sandbox runs on Linux only".into(),
            )),
            SandboxSpec::User(o) => Ok(Arc::new(UserSandbox::new(state_dir, o.clone(), exec)?)),
            #[cfg(target_os = "freebsd")]
            SandboxSpec::Jail => Ok(Arc::new(jail::JailSandbox::new(state_dir, exec))),
            #[cfg(not(target_os = "freebsd"))]
            SandboxSpec::Jail => Err(SandboxError::Unsupported(
                "the jail sandbox runs on FreeBSD only".into(),
            )),
            SandboxSpec::Docker(o) => Ok(Arc::new(docker::DockerSandbox::new(
                state_dir,
                o.clone(),
                exec,
            ))),
        }
    }
}

impl std::fmt::Display for SandboxSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SandboxSpec::Runc(o) if o.runc == "runc" => write!(f, "runc"),
            SandboxSpec::Runc(o) => write!(f, "runc:{}", o.runc),
            SandboxSpec::Native(_) => write!(f, "native"),
            SandboxSpec::User(_) => write!(f, "user"),
            SandboxSpec::Jail => write!(f, "jail"),
            SandboxSpec::Docker(_) => write!(f, "docker"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_lists_them_when_wrong() {
        assert_eq!(
            "runc".parse::<SandboxSpec>(),
            Ok(SandboxSpec::Runc(RuncOptions::default()))
        );
        let Ok(SandboxSpec::Runc(o)) = "runc:/opt/runc".parse::<SandboxSpec>() else {
            panic!("runc:PATH")
        };
        assert_eq!(o.runc, "/opt/runc");
        assert_eq!(
            "user".parse::<SandboxSpec>(),
            Ok(SandboxSpec::User(UserOptions::default()))
        );
        assert_eq!(o.max_pids, Some(DEFAULT_MAX_PIDS));
        for (bad, why) in [
            ("crun", "unknown sandbox"),
            ("runc:", "needs the path"),
            ("user:x", "takes no argument"),
        ] {
            let e = bad.parse::<SandboxSpec>().unwrap_err().to_string();
            assert!(e.contains(why) && e.contains(FORMS), "{bad}: {e}");
        }
        assert_eq!(
            "runc:/x".parse::<SandboxSpec>().unwrap().to_string(),
            "runc:/x"
        );
    }
}
