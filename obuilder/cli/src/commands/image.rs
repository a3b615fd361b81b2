//! `obuilder image import|ls|rm`: the local images and tags `(from NAME)` can use.

use std::path::PathBuf;
use std::process::ExitCode;

use obuilder_engine::exec::RealExec;
use obuilder_fetch::import::{import, ImportRequest};

use super::process::{exit, usage};
use super::setup::{FormatArgs, StoreArgs};

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
    /// List local images and tags (`build --tag`), with their sizes.
    Ls {
        #[command(flatten)]
        format: FormatArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Forget local images or tags (results built on them stay until pruned).
    Rm {
        #[arg(required = true, value_name = "NAME")]
        names: Vec<String>,
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
            super::result::check_tag(&name)?;
            let images = store.config()?.images();
            let before = images.get(&name)?;
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
            if let Some(old) = before.filter(|o| o.digest != rec.digest) {
                eprintln!(
                    "Replaced the image {name:?} (it was {}); results built on it stay valid for it",
                    old.digest
                );
            }
            crate::outln!(
                "Imported {name:?}: {} ({} layer{})",
                rec.digest,
                rec.layers.len(),
                if rec.layers.len() == 1 { "" } else { "s" }
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { format, store } => {
            let images = store.config()?.images();
            let list = images.list()?;
            // Bytes of the layers in the blob store (a registry image's, once downloaded).
            let size = |r: &obuilder_fetch::images::ImageRecord| -> u64 {
                r.layers
                    .iter()
                    .filter_map(|l| images.blob_path(l).ok())
                    .filter_map(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum()
            };
            let origin = |r: &obuilder_fetch::images::ImageRecord| {
                if r.result.is_some() {
                    "tag of"
                } else if r.registry.is_some() {
                    "pulled from"
                } else {
                    "imported from"
                }
            };
            if format.json() {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|r| {
                        serde_json::json!({
                            "name": r.name, "digest": r.digest, "layers": r.layers.len(),
                            "size": size(r), "source": r.source, "imported": r.imported,
                            "registry": r.registry, "result": r.result,
                        })
                    })
                    .collect();
                crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            let width = list
                .iter()
                .map(|r| r.name.len())
                .max()
                .unwrap_or(0)
                .clamp(4, 60);
            crate::outln!(
                "{:<width$} {:<19} {:>6} {:>10}  SOURCE",
                "NAME",
                "DIGEST",
                "LAYERS",
                "SIZE"
            )?;
            for r in &list {
                crate::outln!(
                    "{:<width$} {:<19} {:>6} {:>10}  {} {}",
                    r.name,
                    &r.digest[..r.digest.len().min(19)],
                    r.layers.len(),
                    obuilder_engine::log::human_bytes(size(r)),
                    origin(r),
                    r.source
                )?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { names, store } => {
            let images = store.config()?.images();
            let mut code = ExitCode::SUCCESS;
            for name in &names {
                if images.remove(name)? {
                    crate::outln!("Removed image {name:?}")?;
                } else {
                    eprintln!("obuilder: no local image named {name:?} (see `obuilder image ls`)");
                    code = ExitCode::from(exit::USAGE);
                }
            }
            Ok(code)
        }
    }
}
