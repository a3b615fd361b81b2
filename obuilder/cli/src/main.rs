//! `obuilder`: the command-line tool. Each subcommand lives in `commands/<name>.rs` with a
//! `run(args) -> anyhow::Result<ExitCode>`; this file only parses and dispatches. Exit
//! codes, signals and a closed stdout are handled in `commands/process.rs`.
//!
//! On Linux with glibc the program starts at a C `main` of its own instead of Rust's
//! runtime entry: that entry's stack-overflow handler asks glibc for the main thread's
//! stack, which reads and parses `/proc/self/maps` (and the CPU affinity) at every start,
//! a twentieth of a fully cached build (docs/performance.md). A stack overflow is then a
//! plain `SIGSEGV`, without the runtime's message. The arguments still reach
//! `std::env::args` (glibc hands them to the standard library's initialiser).
#![cfg_attr(all(target_os = "linux", target_env = "gnu", not(test)), no_main)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;

use commands::lazy::Lazy;
use commands::{
    base_image, build, cache, check, dockerfile, fmt, healthcheck, image, login, maintenance,
    process, pull, result,
};

/// Build OBuilder specs: each step runs in a sandbox on a copy-on-write snapshot of the
/// previous one and is cached under a content hash.
#[derive(Parser)]
#[command(name = "obuilder", version, propagate_version = true)]
struct Cli {
    /// Log what obuilder does (every external command at debug level) to stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a spec: `obuilder build -f SPEC CONTEXT_DIR`.
    Build(Lazy<build::Args>),
    /// Run a command in a throw-away snapshot of a result: `obuilder run ID -- CMD…`.
    Run(Lazy<result::RunArgs>),
    /// An interactive shell in a throw-away snapshot of a result.
    Shell(Lazy<result::ShellArgs>),
    /// Print a result's stored log.
    Log(Lazy<result::LogArgs>),
    /// Show a result: parents, times, size, tags, env/workdir/user.
    Inspect(Lazy<result::InspectArgs>),
    /// Write a result as an image (a layer per step) or a tar: oci:DIR, oci-archive:FILE,
    /// docker-archive:FILE, tar:FILE.
    Export(Lazy<result::ExportArgs>),
    /// Upload a result to a registry as an image, skipping blobs it already has.
    Push(Lazy<result::PushArgs>),
    /// Fetch an image from a registry without building.
    Pull(Lazy<pull::Args>),
    /// macOS base images (a home with .obuilder_profile.sh and a Homebrew tree): build one
    /// from a spec with the user sandbox and push or export it as an OCI image.
    #[command(subcommand, name = "base-image")]
    BaseImage(base_image::Command),
    /// Check and keep credentials for a registry (in the Docker config).
    Login(Lazy<login::LoginArgs>),
    /// Forget the credentials for a registry.
    Logout(Lazy<login::LogoutArgs>),
    /// Local images and tags: import, list, remove.
    #[command(subcommand)]
    Image(image::Command),
    /// Shared caches: list, remove.
    #[command(subcommand)]
    Cache(cache::Command),
    /// Delete a result and everything built on it.
    Delete(Lazy<maintenance::DeleteArgs>),
    /// Delete every result not in use.
    Clean(Lazy<maintenance::CleanArgs>),
    /// Delete least-recently-used results last used before a date or age.
    Prune(Lazy<maintenance::PruneArgs>),
    /// Show the store's free space and number of results.
    Df(Lazy<maintenance::DfArgs>),
    /// Build a tiny image and run `echo` in it: is this machine able to build?
    Healthcheck(Lazy<healthcheck::Args>),
    /// Print a spec as a Dockerfile (or a BuildKit one with --buildkit).
    Dockerfile(Lazy<dockerfile::Args>),
    /// Pretty-print specs in place, keeping comments (or check that they are formatted).
    Fmt(Lazy<fmt::Args>),
    /// Read and scope-check specs, reporting every error with file:line:col.
    Check(Lazy<check::Args>),
}

/// The process's entry (see the module's documentation): what the runtime would do
/// first, then [`run`], then the runtime's exit (which flushes stdout). A panic is exit
/// status 101, as under the runtime.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
#[no_mangle]
extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    obuilder_engine::exec::start_like_the_runtime();
    let code = std::panic::catch_unwind(run).unwrap_or(ExitCode::from(101));
    // `ExitCode` does not give its number back; it compares, though.
    let status = (0..=u8::MAX).find(|&n| ExitCode::from(n) == code);
    std::process::exit(status.map_or(1, i32::from))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(test))))]
fn main() -> ExitCode {
    run()
}

fn run() -> ExitCode {
    obuilder_engine::exec::seal_inherited_descriptors();
    cli_docs::generate_if_asked(<Cli as clap::CommandFactory>::command);
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("OBUILDER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // OBUILDER_TIMINGS=1: per-phase timings (fetch, hash, snapshot, sandbox, copy, publish, record).
    if std::env::var_os("OBUILDER_TIMINGS").is_some_and(|v| v == "1") {
        if let Ok(d) = "obuilder::timing=info".parse() {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Dockerfile(a) => dockerfile::run(a.0),
        Command::Fmt(a) => fmt::run(a.0),
        Command::Check(a) => check::run(a.0),
        // One thread: the builder's work is waiting (on the store, its steps, the network),
        // and what is heavy runs in blocking threads or processes. A multi-threaded
        // runtime's workers, started and joined for nothing, were a tenth of a fully
        // cached build's time.
        async_cmd => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(async move {
                process::watch_signals();
                let cancel = process::interrupt().clone();
                // Builds and the healthcheck stop themselves cleanly when cancelled; any
                // other command stops at once (each store operation is crash-safe).
                let graceful = matches!(
                    async_cmd,
                    Command::Build(_)
                        | Command::BaseImage(_)
                        | Command::Healthcheck(_)
                        | Command::Run(_)
                        | Command::Shell(_)
                );
                let cmd = async move {
                    match async_cmd {
                        Command::Build(a) => build::run(a.0).await,
                        Command::Image(c) => image::run(c).await,
                        Command::Pull(a) => pull::run(a.0).await,
                        Command::BaseImage(c) => base_image::run(c).await,
                        Command::Login(a) => login::login(a.0).await,
                        Command::Logout(a) => login::logout(a.0).await,
                        Command::Run(a) => result::run(a.0).await,
                        Command::Shell(a) => result::shell(a.0).await,
                        Command::Log(a) => result::log(a.0).await,
                        Command::Inspect(a) => result::inspect(a.0).await,
                        Command::Export(a) => result::export(a.0).await,
                        Command::Push(a) => result::push(a.0).await,
                        Command::Cache(c) => cache::run(c).await,
                        Command::Delete(a) => maintenance::delete(a.0).await,
                        Command::Clean(a) => maintenance::clean(a.0).await,
                        Command::Prune(a) => maintenance::prune(a.0).await,
                        Command::Df(a) => maintenance::df(a.0).await,
                        Command::Healthcheck(a) => healthcheck::run(a.0).await,
                        Command::Dockerfile(_) | Command::Fmt(_) | Command::Check(_) => {
                            unreachable!("run without a runtime")
                        }
                    }
                };
                if graceful {
                    return cmd.await;
                }
                tokio::select! {
                    r = cmd => r,
                    _ = cancel.cancelled(), if !process::stdout_closed() => {
                        Ok(process::interrupted_code().unwrap_or(ExitCode::FAILURE))
                    }
                }
            }),
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => process::report(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own consistency checks, over every subcommand with its deferred arguments.
    #[test]
    fn the_command_line_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }
}
