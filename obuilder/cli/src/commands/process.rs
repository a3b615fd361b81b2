//! How the process behaves in CI: exit codes, signals, and a closed standard output.
//!
//! * Exit codes ([`exit`]): 0 success; 1 a build step failed (its command exited non-zero,
//!   was killed or timed out, or its `copy` could not be done); 2 a usage error (bad flags,
//!   a spec that does not parse or asks for something not given); 3 obuilder itself could
//!   not do its part (store, sandbox, registry, disk); 128+N stopped by signal N (130
//!   Ctrl-C, 143 SIGTERM, 129 SIGHUP); 141 standard output was closed (`| head`).
//! * SIGINT, SIGTERM and SIGHUP (a CI cancel, `timeout`, systemd) all cancel: a running
//!   build kills its container and discards the half-done step before exiting. A second
//!   signal exits at once.
//! * A closed standard output ends the command quietly (no panic), after the store
//!   operation under way.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;

use obuilder_engine::CancellationToken;

pub mod exit {
    pub const STEP_FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const FAILED: u8 = 3;
    /// `SIGPIPE`'s code: standard output was closed.
    pub const STDOUT_CLOSED: u8 = 128 + 13;

    /// The code for being stopped by `signal`.
    pub fn signal(signal: i32) -> u8 {
        (128 + signal).clamp(0, 255) as u8
    }
}

/// A usage error (exit 2): the message is the whole story.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// Shorthand for a usage error.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    Usage(msg.into()).into()
}

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The process-wide cancellation: fired by a signal or a closed standard output.
pub fn interrupt() -> &'static CancellationToken {
    static TOKEN: OnceLock<CancellationToken> = OnceLock::new();
    TOKEN.get_or_init(CancellationToken::new)
}

/// The signal that interrupted the process, if one did.
pub fn interrupted_by() -> Option<i32> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::SeqCst)
}

/// Writes to standard output. A closed one is remembered (the command then ends quietly
/// with 141) and reported as `BrokenPipe`.
pub fn out(args: std::fmt::Arguments<'_>) -> std::io::Result<()> {
    if stdout_closed() {
        return Err(std::io::ErrorKind::BrokenPipe.into());
    }
    let mut o = std::io::stdout().lock();
    let r = o.write_fmt(args).and_then(|()| o.flush());
    if let Err(e) = &r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            STDOUT_CLOSED.store(true, Ordering::SeqCst);
            interrupt().cancel();
        }
    }
    r
}

/// `outln!("…")?`: a line on standard output (see [`out`]).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::commands::process::out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// Starts listening for SIGINT, SIGTERM and SIGHUP (in the runtime).
pub fn watch_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    for (kind, num, name) in [
        (SignalKind::interrupt(), 2, "interrupted"),
        (SignalKind::terminate(), 15, "terminated (SIGTERM)"),
        (SignalKind::hangup(), 1, "hung up (SIGHUP)"),
    ] {
        let Ok(mut s) = signal(kind) else { continue };
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if SIGNAL.swap(num, Ordering::SeqCst) != 0 {
                    // A second signal: no more waiting for clean-up.
                    std::process::exit(i32::from(exit::signal(num)));
                }
                eprintln!("obuilder: {name}; stopping");
                interrupt().cancel();
            }
        });
    }
}

/// The exit code for a command that was interrupted, if it was.
pub fn interrupted_code() -> Option<ExitCode> {
    if let Some(s) = interrupted_by() {
        return Some(ExitCode::from(exit::signal(s)));
    }
    stdout_closed().then(|| ExitCode::from(exit::STDOUT_CLOSED))
}

/// The exit code and message for a command's error.
pub fn report(e: &anyhow::Error) -> ExitCode {
    let broken_pipe = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe || stdout_closed() {
        return ExitCode::from(exit::STDOUT_CLOSED);
    }
    if let Some(code) = interrupted_code() {
        return code;
    }
    eprintln!("obuilder: error: {e:#}");
    // A store and a sandbox that cannot go together is a mistake in the flags.
    let pairing = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<obuilder_config::ConfigError>(),
            Some(obuilder_config::ConfigError::Pairing(_))
        )
    });
    if e.downcast_ref::<Usage>().is_some() || pairing {
        ExitCode::from(exit::USAGE)
    } else {
        ExitCode::from(exit::FAILED)
    }
}
