//! `obuilder`: the command-line tool. Each subcommand lives in `commands/<name>.rs` with a
//! `run(args) -> anyhow::Result<ExitCode>`; this file only parses and dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;

/// Build OBuilder specs: each step runs in a sandbox on a copy-on-write snapshot of the
/// previous one and is cached under a content hash.
#[derive(Parser)]
#[command(name = "obuilder", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a spec as a Dockerfile (or a BuildKit one with --buildkit).
    Dockerfile(commands::dockerfile::Args),
    /// Pretty-print specs in place, keeping comments (or check that they are formatted).
    Fmt(commands::fmt::Args),
    /// Read and scope-check specs, reporting every error with file:line:col.
    Check(commands::check::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dockerfile(args) => commands::dockerfile::run(args),
        Command::Fmt(args) => commands::fmt::run(args),
        Command::Check(args) => commands::check::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("obuilder: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
