//! `obuilder base-image build`: a macOS base image from a spec. The seeds kept macOS
//! workers' base images (a home with `.obuilder_profile.sh`, and a Homebrew tree) up to
//! date by hand; here they are built like anything else, with the user sandbox, usually
//! starting `(from scratch)`, and pushed to a registry (or written to a file) as an OCI
//! image whose layers hold `home/` and `brew/`. A worker's `(from REF)` then pulls it.

use std::path::PathBuf;
use std::process::ExitCode;

use super::build;
use super::process::{exit, usage};
use super::result::{Compress, ExportArgs, PushArgs};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Build a base image from a spec with the user sandbox and push or export it.
    Build(super::lazy::Lazy<BuildArgs>),
}

#[derive(clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    build: build::Args,
    /// Push the image to HOST[:PORT]/REPO[:TAG] (credentials as for pulls).
    #[arg(long, value_name = "REF")]
    push: Option<String>,
    /// Write the image as oci:DIR[:TAG], oci-archive:FILE[:TAG] or
    /// docker-archive:FILE[:NAME:TAG].
    #[arg(long, value_name = "DEST")]
    export: Option<String>,
    /// Compress the layers: auto (gzip for a registry off this machine), gzip or none.
    #[arg(long, value_enum, value_name = "HOW", default_value_t = Compress::Auto)]
    compress: Compress,
}

/// What every base image must hold: the profile the user sandbox sources before each
/// command (under the home tree).
pub const PROFILE: &str = "home/.obuilder_profile.sh";

pub async fn run(c: Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Build(a) => build_image(a.0).await,
    }
}

async fn build_image(mut a: BuildArgs) -> anyhow::Result<ExitCode> {
    if a.push.is_none() && a.export.is_none() {
        return Err(usage(
            "say where the base image goes: --push HOST[:PORT]/REPO[:TAG] and/or --export DEST",
        ));
    }
    if a.build.sandbox.sandbox.as_deref() != Some("user") {
        let given = match a.build.sandbox.sandbox.as_deref() {
            Some(s) => format!("--sandbox {s}: "),
            None => String::new(),
        };
        return Err(usage(format!(
            "{given}a base image is built with --sandbox user (its trees are the build \
             user's home and Homebrew prefix)"
        )));
    }
    if matches!(a.export.as_deref(), Some(d) if d.starts_with("tar:")) {
        return Err(usage(
            "--export tar: has no image metadata; use oci:, oci-archive: or docker-archive:",
        ));
    }
    let iid = id_file();
    a.build.iidfile = Some(iid.clone());
    let store = a.build.store.clone();
    let registry = a.build.registry.clone();
    let code = build::run(a.build).await?;
    let id = std::fs::read_to_string(&iid).unwrap_or_default();
    let _ = std::fs::remove_file(&iid);
    if code != ExitCode::SUCCESS || id.is_empty() {
        return Ok(code);
    }
    // The profile is what makes a tree a base image: say so now, not on a worker.
    let config = store.config()?;
    let b = super::setup::open(&config).await?;
    let view = b.store().view(&id).await?;
    let has_profile = view.join(PROFILE).is_file();
    b.store().release_view(&view).await?;
    if !has_profile {
        eprintln!(
            "Base image {id} has no {PROFILE}: the user sandbox sources it before every \
             command (set PATH, opam's env); add a step that writes it, e.g. \
             (run (shell \"echo 'export PATH=/opt/homebrew/bin:$PATH' > ~/.obuilder_profile.sh\"))"
        );
        return Ok(ExitCode::from(exit::USAGE));
    }
    drop(b);
    if let Some(dest) = a.export {
        let code = super::result::export(ExportArgs {
            id: id.clone(),
            dest,
            compress: a.compress,
            store: store.clone(),
        })
        .await?;
        if code != ExitCode::SUCCESS {
            return Ok(code);
        }
    }
    if let Some(reference) = a.push {
        return super::result::push(PushArgs {
            id,
            reference,
            compress: a.compress,
            store,
            registry,
        })
        .await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the build writes its result's id (this process's own file).
fn id_file() -> PathBuf {
    let p = std::env::temp_dir().join(format!("obuilder-base-image-{}.id", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}
