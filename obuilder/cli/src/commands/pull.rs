//! `obuilder pull REF`: resolve and download an image without building.

use std::process::ExitCode;

use obuilder_engine::log::{LogEvent, LogSink};

use super::setup::{images, RegistryArgs, StoreArgs};

#[derive(clap::Args)]
pub struct Args {
    /// The image: `alpine`, `alpine:3.20`, `ghcr.io/o/r:tag`, `host:5000/r@sha256:…`.
    #[arg(value_name = "REF")]
    reference: String,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub async fn run(mut a: Args) -> anyhow::Result<ExitCode> {
    // `pull` means: ask the registry now (unless told never).
    if a.registry.pull == "missing" {
        a.registry.pull = "always".into();
    }
    let fetcher = a.registry.fetcher(images(&a.store)?)?;
    let log: LogSink = std::sync::Arc::new(|e: &LogEvent| {
        if let LogEvent::Note(n) = e {
            println!("{n}");
        }
    });
    let rec = fetcher
        .resolve_record(&a.reference, &log)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    fetcher
        .download(&rec, &log)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "Pulled {}: {} ({} layer{})",
        a.reference,
        rec.digest,
        rec.layers.len(),
        if rec.layers.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}
