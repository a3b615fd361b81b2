//! `obuilder dockerfile -f SPEC [--buildkit] [--escape unix|windows]`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use obuilder_spec::docker::{dockerfile, Escape};
use obuilder_spec::Spec;

#[derive(clap::Args)]
pub struct Args {
    /// The spec file to convert.
    #[arg(short = 'f', long = "file", value_name = "SPEC")]
    file: PathBuf,
    /// Turn caches and secrets into BuildKit `--mount` options (dropped otherwise).
    #[arg(long)]
    buildkit: bool,
    /// Escape style: `windows` adds an `#escape=`` line and uses backticks.
    #[arg(long, value_name = "STYLE", default_value = "unix", value_parser = ["unix", "windows"])]
    escape: String,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let text = super::read_spec_text(&args.file)?;
    let spec = match Spec::parse_named(&args.file.display().to_string(), &text) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let escape: Escape = args.escape.parse().map_err(anyhow::Error::msg)?;
    let out = dockerfile(&spec, args.buildkit, escape)
        .with_context(|| format!("cannot export {} as a Dockerfile", args.file.display()))?;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
