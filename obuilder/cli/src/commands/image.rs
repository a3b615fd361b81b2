//! `obuilder image import|ls|rm`: the local images `(from NAME)` can use.

use std::path::PathBuf;
use std::process::ExitCode;

use obuilder_engine::exec::RealExec;
use obuilder_fetch::import::{import, ImportRequest};

use super::setup::{images, StoreArgs};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Import a root filesystem (directory or tarball), an OCI layout or archive, or a
    /// `docker save` archive under NAME, so that a spec can say `(from NAME)`.
    Import {
        /// The name specs use in `(from NAME)`.
        name: String,
        /// A directory or a tar file (plain, .gz or .zst).
        #[arg(value_name = "FILE|DIR")]
        path: PathBuf,
        /// For a plain root filesystem: an environment variable of the image (repeatable).
        /// Default: Docker's PATH.
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// For a multi-platform OCI image: the platform to take (default: this host's).
        #[arg(long, value_name = "OS/ARCH")]
        platform: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List local images.
    Ls {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Forget a local image (results built on it stay until pruned).
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

pub async fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Import {
            name,
            path,
            env,
            platform,
            store,
        } => {
            let env = if env.is_empty() {
                None
            } else {
                Some(
                    env.iter()
                        .map(|kv| {
                            kv.split_once('=')
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .ok_or_else(|| anyhow::anyhow!("--env {kv:?}: expected K=V"))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?,
                )
            };
            let images = images(&store)?;
            let rec = import(
                &images,
                &RealExec::shared(),
                ImportRequest {
                    name: &name,
                    path: &path,
                    env,
                    platform,
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot import {} as {name:?}: {e}", path.display()))?;
            println!(
                "Imported {name:?}: {} ({} layer{})",
                rec.digest,
                rec.layers.len(),
                if rec.layers.len() == 1 { "" } else { "s" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { store } => {
            let list = images(&store)?.list().map_err(anyhow::Error::msg)?;
            println!("{:<32} {:<19} {:>6}  SOURCE", "NAME", "DIGEST", "LAYERS");
            for r in list {
                let origin = if r.registry.is_some() {
                    "pulled from"
                } else {
                    "imported from"
                };
                println!(
                    "{:<32} {:<19} {:>6}  {origin} {}",
                    r.name,
                    &r.digest[..r.digest.len().min(19)],
                    r.layers.len(),
                    r.source
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { name, store } => {
            if images(&store)?.remove(&name).map_err(anyhow::Error::msg)? {
                println!("Removed image {name:?}");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("obuilder: no local image named {name:?} (see `obuilder image ls`)");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
