//! `obuilder check SPEC…`: parse and scope-check every file, report every error; with
//! `--platform`, also warn about what that platform's sandbox cannot do.

use std::path::PathBuf;
use std::process::ExitCode;

use obuilder_spec::portability::{self, MacPaths, Platform};
use obuilder_spec::Spec;

#[derive(clap::Args)]
pub struct Args {
    /// Spec files to check (`-`: standard input).
    #[arg(required = true, value_name = "SPEC")]
    specs: Vec<PathBuf>,
    /// Also warn about what this platform's sandbox cannot do: macos (the user sandbox:
    /// paths outside the home and Homebrew prefix, (user …), no network isolation,
    /// secrets as files), freebsd (jails: no secrets, users by uid), windows (Docker:
    /// drive paths, users by name, no host network, the default shell) or linux (none).
    /// Warnings do not fail the check.
    #[arg(long, value_name = "PLATFORM")]
    platform: Option<Platform>,
    /// --platform macos: the build users' home path.
    #[arg(long, value_name = "PATH", default_value = "/Users/mac1000")]
    home_path: String,
    /// --platform macos: the Homebrew prefix (default: both /opt/homebrew and /usr/local).
    #[arg(long, value_name = "PATH")]
    brew_path: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut failed = 0;
    let mut warned = 0;
    let mut mac = MacPaths {
        home: args.home_path.clone(),
        ..MacPaths::default()
    };
    if let Some(p) = &args.brew_path {
        mac.prefixes = vec![p.clone()];
    }
    for path in &args.specs {
        let name = if path.as_os_str() == "-" {
            "<stdin>".to_string()
        } else {
            path.display().to_string()
        };
        let text = match super::read_spec_text(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e:#}");
                failed += 1;
                continue;
            }
        };
        match Spec::parse_named(&name, &text) {
            Err(e) => {
                eprintln!("{e}\n");
                failed += 1;
            }
            Ok(spec) => {
                if let Some(platform) = args.platform {
                    for w in portability::check(&spec, &text, platform, &mac) {
                        let at = w.span.start;
                        eprintln!("{name}:{}:{}: warning: {}", at.line, at.col, w.message);
                        warned += 1;
                    }
                }
            }
        }
    }
    if failed == 0 {
        let n = args.specs.len();
        let s = if n == 1 { "" } else { "s" };
        match args.platform {
            Some(p) if warned > 0 => {
                eprintln!("{n} spec{s} OK, {warned} warning(s) for {p}")
            }
            _ => eprintln!("{n} spec{s} OK"),
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{failed} of {} spec file(s) have errors", args.specs.len());
        Ok(ExitCode::FAILURE)
    }
}
