//! `obuilder healthcheck`: build a tiny image from the host's static busybox and run
//! `echo` in it, with a timeout. Needs no registry and no Docker.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use obuilder_engine::exec::RealExec;
use obuilder_engine::log::buffer_sink;
use obuilder_engine::{BuildError, BuildOptions};
use obuilder_fetch::import::{import, ImportRequest};
use obuilder_spec::Spec;

use super::setup::{builder, images, SandboxArgs, StoreArgs};

pub const IMAGE: &str = "obuilder-healthcheck";

#[derive(clap::Args)]
pub struct Args {
    /// A statically linked busybox to build the test image from.
    #[arg(long, value_name = "PATH", default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    timeout: u64,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub async fn run(a: Args) -> anyhow::Result<ExitCode> {
    match check(&a).await {
        Ok(()) => {
            println!("Healthcheck passed");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("Healthcheck failed: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn check(a: &Args) -> anyhow::Result<()> {
    let b = builder(&a.store, &a.sandbox).await?;
    let images = images(&a.store)?;
    let scratch = images.scratch()?;
    let bin = scratch.path().join("rootfs/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(&a.busybox, bin.join("busybox")).map_err(|e| {
        anyhow::anyhow!(
            "cannot copy {}: {e} (install busybox-static or pass --busybox)",
            a.busybox.display()
        )
    })?;
    for applet in ["sh", "echo"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    let root = scratch.path().join("rootfs");
    let env = Some(vec![("PATH".to_string(), "/bin".to_string())]);
    import(
        &images,
        &RealExec::shared(),
        ImportRequest {
            name: IMAGE,
            path: &root,
            env,
            platform: None,
        },
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let spec = Spec::parse(&format!(
        "((from {IMAGE}) (shell /bin/sh -c) (run (shell \"echo healthcheck\")))"
    ))?;
    let (sink, text) = buffer_sink();
    let opts = BuildOptions::new(scratch.path(), sink);
    let cancel = opts.cancel.clone();
    let r = tokio::select! {
        r = b.build(&spec, &opts) => r,
        _ = tokio::time::sleep(Duration::from_secs(a.timeout)) => {
            cancel.cancel();
            Err(BuildError::Failed(format!("timed out after {} s", a.timeout)))
        }
    };
    b.wait_idle().await;
    match r {
        Ok(id) => {
            b.delete(&id, &obuilder_engine::log::null_sink()).await?;
            let out = text.lock().unwrap_or_else(|p| p.into_inner()).clone();
            anyhow::ensure!(
                out.contains("healthcheck\n"),
                "the command ran but printed no `healthcheck`:\n{out}"
            );
            Ok(())
        }
        Err(e) => {
            let out = text.lock().unwrap_or_else(|p| p.into_inner()).clone();
            anyhow::bail!("{e}\n{}", out.trim())
        }
    }
}
