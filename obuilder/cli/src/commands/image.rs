//! `obuilder image import|ls|rm`: the local images `(from NAME)` can use.

use std::path::PathBuf;
use std::process::ExitCode;

use obuilder_engine::exec::RealExec;
use obuilder_fetch::import::{import, ImportRequest};

use super::process::{exit, usage};
use super::setup::StoreArgs;

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
                                .ok_or_else(|| usage(format!("--env {kv:?}: expected K=V")))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?,
                )
            };
            let images = store.config()?.images();
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
            .map_err(|e| {
                anyhow::Error::new(e)
                    .context(format!("cannot import {} as {name:?}", path.display()))
            })?;
            crate::outln!(
                "Imported {name:?}: {} ({} layer{})",
                rec.digest,
                rec.layers.len(),
                if rec.layers.len() == 1 { "" } else { "s" }
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { store } => {
            let list = store.config()?.images().list()?;
            crate::outln!("{:<32} {:<19} {:>6}  SOURCE", "NAME", "DIGEST", "LAYERS")?;
            for r in list {
                let origin = if r.registry.is_some() {
                    "pulled from"
                } else {
                    "imported from"
                };
                crate::outln!(
                    "{:<32} {:<19} {:>6}  {origin} {}",
                    r.name,
                    &r.digest[..r.digest.len().min(19)],
                    r.layers.len(),
                    r.source
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { name, store } => {
            if store.config()?.images().remove(&name)? {
                crate::outln!("Removed image {name:?}")?;
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("obuilder: no local image named {name:?} (see `obuilder image ls`)");
                Ok(ExitCode::from(exit::USAGE))
            }
        }
    }
}
