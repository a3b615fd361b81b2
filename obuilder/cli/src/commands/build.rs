//! `obuilder build -f SPEC CONTEXT_DIR`: run a spec, printing its log live.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use obuilder_engine::{BuildError, BuildOptions};
use obuilder_spec::Spec;

use super::setup::{builder_with, console_sink, Color, RegistryArgs, SandboxArgs, StoreArgs};

#[derive(clap::Args)]
pub struct Args {
    /// The spec file to build.
    #[arg(short = 'f', long = "file", value_name = "SPEC")]
    file: PathBuf,
    /// The context directory `copy` reads from.
    #[arg(value_name = "CONTEXT_DIR")]
    context: PathBuf,
    /// A secret for `(run (secrets (ID …)))`: the whole of FILE is its value. Repeatable.
    #[arg(long = "secret", value_name = "ID:FILE")]
    secrets: Vec<String>,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Colour headings and notes.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    color: Color,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let text = super::read_spec_text(&args.file)?;
    let spec = match Spec::parse_named(&args.file.display().to_string(), &text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut secrets = Vec::new();
    for s in &args.secrets {
        let (id, file) = s
            .split_once(':')
            .with_context(|| format!("--secret {s:?}: expected ID:FILE"))?;
        let value =
            std::fs::read(file).with_context(|| format!("--secret {id}: cannot read {file}"))?;
        secrets.push((id.to_string(), value));
    }
    if !args.context.is_dir() {
        anyhow::bail!(
            "context directory {} does not exist or is not a directory",
            args.context.display()
        );
    }
    let builder = builder_with(&args.store, &args.sandbox, Some(&args.registry)).await?;
    let mut opts = BuildOptions::new(&args.context, console_sink(args.color.enabled()));
    opts.secrets = secrets;
    let cancel = opts.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("obuilder: interrupted; stopping the build");
            cancel.cancel();
        }
    });
    let result = builder.build(&spec, &opts).await;
    // Let cancelled steps kill their containers and discard their snapshots.
    builder.wait_idle().await;
    match result {
        Ok(id) => {
            println!("Got: {id:?}");
            Ok(ExitCode::SUCCESS)
        }
        Err(BuildError::Cancelled) => {
            eprintln!("Cancelled at user's request");
            Ok(ExitCode::from(130))
        }
        Err(BuildError::Failed(msg)) => {
            eprintln!("Build step failed: {msg}");
            Ok(ExitCode::FAILURE)
        }
    }
}
