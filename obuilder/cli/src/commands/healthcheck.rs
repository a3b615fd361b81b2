//! `obuilder healthcheck`: build a tiny image from the host's static busybox and run
//! `echo` in it, with a timeout. Needs no registry and no Docker; leaves nothing behind.
//! On an engine of Windows containers it builds on servercore instead (`--image`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use obuilder_config::{healthcheck, HealthcheckOptions};

use super::process::{exit, interrupt, interrupted_code};
use super::setup::{builder_config, open, SandboxArgs, StoreArgs};

#[derive(clap::Args)]
pub struct Args {
    /// A statically linked busybox to build the test image from.
    #[arg(long, value_name = "PATH", default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Build on this image instead of one made from busybox (default with
    /// --docker-platform windows: mcr.microsoft.com/windows/servercore:ltsc2022, run
    /// with cmd).
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    timeout: u64,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    let config = builder_config(&a.store, &a.sandbox, None, None)?;
    let b = open(&config).await?;
    let mut opts = HealthcheckOptions::for_store(&config.store);
    opts.busybox = a.busybox.clone();
    opts.timeout = Duration::from_secs(a.timeout);
    opts.cancel = interrupt().child_token();
    if a.image.is_some() {
        opts.image = a.image.clone();
    }
    match healthcheck(&b, &config.images(), &config.exec, &opts).await {
        Ok(()) => {
            crate::outln!("Healthcheck passed")?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if let Some(code) = interrupted_code() {
                return Ok(code);
            }
            eprintln!("Healthcheck failed: {e}");
            Ok(ExitCode::from(exit::FAILED))
        }
    }
}
