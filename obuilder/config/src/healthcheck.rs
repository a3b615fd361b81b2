//! Is this machine able to build? Builds a tiny image from the host's static busybox and
//! runs `echo` in it, with a timeout; needs no registry and no network.
//!
//! It leaves nothing behind, so a worker can run it every few minutes: the image's files
//! get fixed times (the same busybox gives the same digest, so the same base id), and
//! afterwards its results and its image record (with the blobs no other image uses) are
//! removed again.
//!
//! An engine of Windows containers cannot run busybox: there the check builds on a
//! Windows image the engine pulls (servercore by default, `image`), with `cmd`.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use obuilder_engine::confined;
use obuilder_engine::exec::SharedExec;
use obuilder_engine::log::{buffer_sink, null_sink};
use obuilder_engine::{BuildError, BuildOptions, Builder};
use obuilder_fetch::images::{ImageStore, ImageStoreError};
use obuilder_fetch::import::{import, ImportRequest};
use obuilder_spec::Spec;

/// The image name the healthcheck uses while it runs.
pub const IMAGE: &str = "obuilder-healthcheck";

/// Fixed times for the image's files: the same busybox always gives the same image.
const MTIME: i64 = 1_700_000_000;

#[derive(Debug, Clone)]
pub struct HealthcheckOptions {
    /// A statically linked busybox to build the image from.
    pub busybox: PathBuf,
    /// Give up after this long.
    pub timeout: Duration,
    /// Cancels the check (e.g. on SIGTERM).
    pub cancel: obuilder_engine::CancellationToken,
    /// Build on this image (as the store's fetcher finds it) instead of one made from
    /// busybox.
    pub image: Option<String>,
    /// The image is a Windows one: its step runs in `cmd /S /C`, not `/bin/sh -c`.
    pub windows: bool,
}

/// The servercore image a Windows engine's healthcheck builds on by default.
pub const WINDOWS_IMAGE: &str = "mcr.microsoft.com/windows/servercore:ltsc2022";

impl HealthcheckOptions {
    /// The defaults for a store: on an engine of Windows containers, servercore and `cmd`.
    pub fn for_store(store: &obuilder_stores::spec::StoreSpec) -> HealthcheckOptions {
        let windows = matches!(
            store,
            obuilder_stores::spec::StoreSpec::Docker {
                platform: obuilder_stores::docker::Platform::Windows,
                ..
            }
        );
        HealthcheckOptions {
            image: windows.then(|| WINDOWS_IMAGE.to_string()),
            windows,
            ..Default::default()
        }
    }
}

impl Default for HealthcheckOptions {
    fn default() -> HealthcheckOptions {
        HealthcheckOptions {
            busybox: "/bin/busybox".into(),
            timeout: Duration::from_secs(300),
            cancel: Default::default(),
            image: None,
            windows: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("cannot copy {} into the test image: {source} (install busybox-static or pass --busybox)", path.display())]
    Busybox {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make the test image: {0}")]
    Image(#[from] ImageStoreError),
    #[error("cannot make the test image in {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the test build failed: {error}\n{log}")]
    Build {
        #[source]
        error: BuildError,
        log: String,
    },
    #[error("the image {0:?} cannot be named in a spec: {1}")]
    BadImage(String, String),
    #[error("the test build timed out after {0:?}")]
    TimedOut(Duration),
    #[error("the command ran but printed no `healthcheck`:\n{0}")]
    NoOutput(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HealthcheckError + '_ {
    move |source| HealthcheckError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the test image's root filesystem in `root`: busybox, `sh` and `echo`, all with
/// fixed times.
fn make_rootfs(root: &Path, busybox: &Path) -> Result<(), HealthcheckError> {
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).map_err(io(&bin))?;
    std::fs::copy(busybox, bin.join("busybox")).map_err(|source| HealthcheckError::Busybox {
        path: busybox.to_path_buf(),
        source,
    })?;
    for applet in ["sh", "echo"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).map_err(io(&bin))?;
    }
    let bin_fd = std::fs::File::open(&bin).map_err(io(&bin))?;
    for name in ["busybox", "sh", "echo"] {
        confined::set_mtime_at(&bin_fd.as_fd(), name, MTIME, 0).map_err(io(&bin))?;
    }
    let root_fd = std::fs::File::open(root).map_err(io(root))?;
    confined::set_mtime_at(&root_fd.as_fd(), "bin", MTIME, 0).map_err(io(root))?;
    Ok(())
}

/// Runs the check on `builder`, whose store keeps its images in `images`.
pub async fn healthcheck(
    builder: &Builder,
    images: &ImageStore,
    exec: &SharedExec,
    opts: &HealthcheckOptions,
) -> Result<(), HealthcheckError> {
    let scratch = images.scratch()?;
    if let Some(image) = &opts.image {
        let r = build(builder, scratch.path(), image, opts).await;
        // Only the step goes: the base is the image's, which real builds share (their
        // results would go with it).
        if let Ok((id, _)) = &r {
            remove_result(builder, id).await;
        }
        let (_, out) = r?;
        return checked(out);
    }
    let root = scratch.path().join("rootfs");
    make_rootfs(&root, &opts.busybox)?;
    import(
        images,
        exec,
        ImportRequest {
            name: IMAGE,
            path: &root,
            env: Some(vec![("PATH".to_string(), "/bin".to_string())]),
            platform: None,
        },
    )
    .await?;
    let r = build(builder, scratch.path(), IMAGE, opts).await;
    // Whatever happened, leave nothing: the results (the base holds the step) and the
    // image with its blobs.
    if let Ok((id, _)) = &r {
        let base = builder
            .info(id)
            .ok()
            .flatten()
            .and_then(|i| i.parent)
            .unwrap_or_else(|| id.clone());
        remove_result(builder, &base).await;
    }
    images.remove(IMAGE)?;
    let (_, out) = r?;
    checked(out)
}

/// Deletes result `id` and what builds on it.
async fn remove_result(builder: &Builder, id: &str) {
    if let Err(e) = builder.delete(id, &null_sink()).await {
        tracing::warn!("healthcheck: cannot remove its results: {e}");
    }
}

fn checked(out: String) -> Result<(), HealthcheckError> {
    // (`cmd`'s echo ends its lines with CR LF.)
    if !out.contains("healthcheck\n") && !out.contains("healthcheck\r\n") {
        return Err(HealthcheckError::NoOutput(out));
    }
    Ok(())
}

async fn build(
    builder: &Builder,
    ctx: &Path,
    image: &str,
    opts: &HealthcheckOptions,
) -> Result<(String, String), HealthcheckError> {
    let shell = if opts.windows {
        "cmd /S /C"
    } else {
        "/bin/sh -c"
    };
    let spec = Spec::parse(&format!(
        "((from {}) (shell {shell}) (run (shell \"echo healthcheck\")))",
        obuilder_spec::Sexp::atom(image.to_string())
    ))
    .map_err(|e| HealthcheckError::BadImage(image.to_string(), e.to_string()))?;
    let (sink, text) = buffer_sink();
    let mut bo = BuildOptions::new(ctx, sink);
    bo.cancel = opts.cancel.child_token();
    let cancel = bo.cancel.clone();
    let r = tokio::select! {
        r = builder.build(&spec, &bo) => r.map_err(Some),
        _ = tokio::time::sleep(opts.timeout) => {
            cancel.cancel();
            Err(None)
        }
    };
    builder.wait_idle().await;
    let out = text.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match r {
        Ok(id) => Ok((id, out)),
        Err(Some(error)) => Err(HealthcheckError::Build {
            error,
            log: out.trim().to_string(),
        }),
        Err(None) => Err(HealthcheckError::TimedOut(opts.timeout)),
    }
}
