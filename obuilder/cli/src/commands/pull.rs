//! `obuilder pull REF`: resolve and download an image without building.

use std::process::ExitCode;

use obuilder_engine::log::{LogEvent, LogSink};
use obuilder_fetch::PullPolicy;

use super::setup::{RegistryArgs, StoreArgs};

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
    if a.registry.pull == PullPolicy::Missing {
        a.registry.pull = PullPolicy::Always;
    }
    let mut config = a.store.config()?;
    config.fetch = a.registry.fetch()?;
    let fetcher = config.fetcher();
    let log: LogSink = std::sync::Arc::new(|e: &LogEvent| {
        if let LogEvent::Note(n) = e {
            let _ = crate::outln!("{n}");
        }
    });
    let rec = fetcher.resolve_record(&a.reference, &log).await?;
    fetcher.download(&rec, &log).await?;
    crate::outln!(
        "Pulled {}: {} ({} layer{})",
        a.reference,
        rec.digest,
        rec.layers.len(),
        if rec.layers.len() == 1 { "" } else { "s" }
    )?;
    Ok(ExitCode::SUCCESS)
}
