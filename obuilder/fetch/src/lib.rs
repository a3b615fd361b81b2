//! Base images for obuilder.
//!
//! * [`images::ImageStore`]: content-addressed blobs and a name index under the store's
//!   state dir; [`import`] fills it from local sources (rootfs dirs and tarballs, OCI
//!   layouts and archives, `docker save` archives) and [`registry`] from OCI registries.
//! * [`extract`]: layer extraction confined to the rootfs, with OCI whiteouts.
//! * [`ImageFetcher`]: the engine's `Fetcher`: local images by name, registry images by
//!   reference under a pull policy.

pub mod credentials;
pub mod export;
pub mod extract;
pub mod images;
pub mod import;
pub mod reference;
pub mod registry;
mod special;
#[cfg(target_os = "linux")]
mod special_linux;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use obuilder_engine::fetch::{FetchError, Fetcher, ImageConfig, ResolvedImage, TaggedResult};
use obuilder_engine::log::{LogEvent, LogSink};

use images::{ImageRecord, ImageStore};
use reference::Reference;
use registry::{Progress, ProgressSink, Registry, RegistryOptions};

/// When to ask a registry about a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Only for references never seen: a tag seen before reuses its recorded digest and
    /// works offline.
    #[default]
    Missing,
    /// Re-resolve tags every time (a moved tag gives a new base; old results stay valid for
    /// the old digest).
    Always,
    /// Never: only images already known locally.
    Never,
}

impl PullPolicy {
    pub const ALL: [PullPolicy; 3] = [PullPolicy::Missing, PullPolicy::Always, PullPolicy::Never];

    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Missing => "missing",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        }
    }
}

impl std::fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A pull policy that is not one of the three.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown pull policy {0:?}: expected missing, always or never")]
pub struct UnknownPullPolicy(pub String);

impl std::str::FromStr for PullPolicy {
    type Err = UnknownPullPolicy;
    fn from_str(s: &str) -> Result<PullPolicy, UnknownPullPolicy> {
        PullPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownPullPolicy(s.to_string()))
    }
}

/// How base images are found: the pull policy, the registry client's options, and where
/// download progress goes. `registry: None` keeps to local images.
#[derive(Clone)]
pub struct FetchConfig {
    pub pull: PullPolicy,
    pub registry: Option<RegistryOptions>,
    pub progress: Option<ProgressSink>,
}

impl Default for FetchConfig {
    /// Local images, then registries for references never seen.
    fn default() -> FetchConfig {
        FetchConfig {
            pull: PullPolicy::Missing,
            registry: Some(RegistryOptions::default()),
            progress: None,
        }
    }
}

impl FetchConfig {
    /// Local images only.
    pub fn local() -> FetchConfig {
        FetchConfig {
            pull: PullPolicy::Never,
            registry: None,
            progress: None,
        }
    }

    /// The fetcher over the image store `images`.
    pub fn fetcher(&self, images: ImageStore) -> ImageFetcher {
        match &self.registry {
            Some(opts) => ImageFetcher::with_registry(
                images,
                Arc::new(Registry::new(opts.clone())),
                self.pull,
                self.progress.clone().unwrap_or_else(|| Arc::new(|_| {})),
            ),
            None => ImageFetcher::new(images),
        }
    }
}

/// Resolves `(from NAME)`: an image imported under NAME, or else NAME as a registry reference.
pub struct ImageFetcher {
    images: ImageStore,
    registry: Option<Arc<Registry>>,
    policy: PullPolicy,
    progress: ProgressSink,
}

fn bad(name: &str, e: impl std::fmt::Display) -> FetchError {
    FetchError::Bad {
        name: name.into(),
        message: e.to_string(),
    }
}

impl ImageFetcher {
    /// Local images only.
    pub fn new(images: ImageStore) -> ImageFetcher {
        ImageFetcher {
            images,
            registry: None,
            policy: PullPolicy::Never,
            progress: Arc::new(|_| {}),
        }
    }

    /// Local images, then registries under `policy`; download progress goes to `progress`.
    pub fn with_registry(
        images: ImageStore,
        registry: Arc<Registry>,
        policy: PullPolicy,
        progress: ProgressSink,
    ) -> ImageFetcher {
        ImageFetcher {
            images,
            registry: Some(registry),
            policy,
            progress,
        }
    }

    pub fn images(&self) -> &ImageStore {
        &self.images
    }

    /// Resolves `name` to a record, asking the registry as the policy says; records it.
    pub async fn resolve_record(
        &self,
        name: &str,
        log: &LogSink,
    ) -> Result<ImageRecord, FetchError> {
        let local = self.images.get(name).map_err(|e| bad(name, e))?;
        if local.is_none() && name == SCRATCH {
            return Ok(scratch_record());
        }
        let pinned = name.contains("@sha256:");
        match (&local, self.policy) {
            // Imported images are local by nature.
            (Some(rec), _) if rec.registry.is_none() => return Ok(rec.clone()),
            // A digest never moves; a tag seen before is reused unless asked otherwise.
            (Some(rec), _) if pinned => return Ok(rec.clone()),
            (Some(rec), PullPolicy::Missing | PullPolicy::Never) => return Ok(rec.clone()),
            (None, PullPolicy::Never) => {
                return Err(FetchError::Unknown {
                    name: name.into(),
                    hint: format!(
                        "not known locally and --pull=never; pull it with `obuilder pull {name}` or import one with `obuilder image import {name} FILE|DIR`"
                    ),
                })
            }
            _ => {}
        }
        let Some(registry) = &self.registry else {
            return Err(FetchError::Unknown {
                name: name.into(),
                hint: format!("no local image of that name; import one with `obuilder image import {name} FILE|DIR`"),
            });
        };
        let reference: Reference = name.parse().map_err(|e: String| FetchError::Unknown {
            name: name.into(),
            hint: format!("no local image has that name (see `obuilder image ls`), and {e}"),
        })?;
        log(&LogEvent::Note(format!("Resolving {reference}")));
        // A slow registry is said to be slow, every few seconds.
        let resolving = registry.resolve(&reference);
        tokio::pin!(resolving);
        let mut waited = 0;
        let res = loop {
            tokio::select! {
                r = &mut resolving => break r,
                _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {
                    waited += 5;
                    log(&LogEvent::Note(format!(
                        "Still waiting for {} ({waited} s)...",
                        reference.registry
                    )));
                }
            }
        };
        // A bare name (`(from typo)`) is most likely a local image that is not there: say
        // that first, then what the registry said.
        let bare = !name.contains(['/', ':', '@', '.']);
        let res = res.map_err(|e| {
            if bare {
                FetchError::Unknown {
                    name: name.into(),
                    hint: format!(
                        "no local image has that name (see `obuilder image ls`; `obuilder image import {name} FILE|DIR` makes one), and as {reference}: {e}"
                    ),
                }
            } else {
                bad(name, e)
            }
        })?;
        if let Some(p) = res
            .platform
            .as_deref()
            .filter(|p| *p != registry.platform())
        {
            log(&LogEvent::Note(format!(
                "Warning: {reference} is for {p}, not {} (it has no other platform); using it anyway",
                registry.platform()
            )));
        }
        let rec = ImageRecord {
            name: name.to_string(),
            digest: res.digest.clone(),
            layers: res.layers.iter().map(|(d, _)| d.clone()).collect(),
            config: res.config.clone(),
            source: reference.to_string(),
            imported: String::new(),
            registry: Some(match &reference.digest {
                Some(_) => reference.to_string(),
                None => format!("{reference}@{}", res.digest),
            }),
            result: None,
            diff_ids: res.diff_ids.clone(),
        };
        if local.as_ref().is_some_and(|l| l.digest != rec.digest) {
            log(&LogEvent::Note(format!("{name} moved to {}", rec.digest)));
        }
        self.images.put(&rec).map_err(|e| bad(name, e))?;
        Ok(rec)
    }

    /// Downloads the layers of a registry image that the blob store lacks.
    pub async fn download(&self, rec: &ImageRecord, log: &LogSink) -> Result<(), FetchError> {
        self.download_tapped(rec, log, None).await
    }

    /// [`ImageFetcher::download`], streaming one layer's bytes to `tap` as they arrive
    /// (see [`Registry::download_tapped`]).
    async fn download_tapped(
        &self,
        rec: &ImageRecord,
        log: &LogSink,
        tap: Option<(String, tokio::sync::mpsc::Sender<Vec<u8>>)>,
    ) -> Result<(), FetchError> {
        let Some(pulled_from) = &rec.registry else {
            return Ok(());
        };
        let missing: Vec<&String> = rec
            .layers
            .iter()
            .filter(|l| {
                !self
                    .images
                    .blob_path(l)
                    .map(|p| p.exists())
                    .unwrap_or(false)
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let registry = self.registry.as_ref().ok_or_else(|| FetchError::Unknown {
            name: rec.name.clone(),
            hint: "its layers are not downloaded and registries are off (--pull=never)".into(),
        })?;
        let reference: Reference = pulled_from.parse().map_err(|e| bad(&rec.name, e))?;
        // Fetch by digest: the tag may have moved since it was resolved.
        let by_digest = Reference {
            tag: None,
            digest: Some(rec.digest.clone()),
            ..reference
        };
        let res = registry::Resolved {
            reference: by_digest,
            digest: rec.digest.clone(),
            config: rec.config.clone(),
            layers: rec.layers.iter().map(|l| (l.clone(), 0)).collect(),
            platform: None,
            diff_ids: Vec::new(),
        };
        let sizes = registry
            .resolve(&res.reference)
            .await
            .map_err(|e| bad(&rec.name, e))?;
        let res = registry::Resolved {
            layers: sizes.layers,
            ..res
        };
        let sink = log.clone();
        let user = self.progress.clone();
        let progress: ProgressSink = Arc::new(move |p: &Progress| {
            user(p);
            match p {
                Progress::Start { digest, size } => sink(&LogEvent::Note(format!(
                    "Downloading {digest} ({})",
                    obuilder_engine::log::human_bytes(*size)
                ))),
                Progress::Done { digest } => sink(&LogEvent::Note(format!("Downloaded {digest}"))),
                Progress::Cached { digest } => {
                    sink(&LogEvent::Note(format!("Already have {digest}")))
                }
                Progress::Advance { .. } => {}
            }
        });
        registry
            .download_tapped(&res, &self.images, &progress, tap)
            .await
            .map_err(|e| bad(&rec.name, e))
    }
}

/// `(from scratch)`: an empty tree, as Docker's `FROM scratch` (unless an image was
/// imported under that name). The start of an image made entirely by its spec, such as a
/// macOS base image (`obuilder base-image build`).
pub const SCRATCH: &str = "scratch";

fn scratch_record() -> ImageRecord {
    use sha2::Digest;
    ImageRecord {
        name: SCRATCH.into(),
        digest: format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(b"obuilder-scratch-v1"))
        ),
        layers: Vec::new(),
        config: ImageConfig::default(),
        source: "an empty tree".into(),
        imported: String::new(),
        registry: None,
        result: None,
        diff_ids: Vec::new(),
    }
}

#[async_trait]
impl Fetcher for ImageFetcher {
    async fn resolve(&self, name: &str, log: &LogSink) -> Result<ResolvedImage, FetchError> {
        let rec = self.resolve_record(name, log).await?;
        Ok(ResolvedImage {
            name: name.to_string(),
            digest: rec.digest.clone(),
            source: serde_json::to_value(&rec).map_err(|e| bad(name, e))?,
            result: rec.result.as_ref().map(|id| TaggedResult {
                id: id.clone(),
                env: rec.config.env.clone(),
            }),
        })
    }

    async fn fetch(
        &self,
        image: &ResolvedImage,
        rootfs: &Path,
        log: &LogSink,
    ) -> Result<ImageConfig, FetchError> {
        let name = image.name.clone();
        let rec: ImageRecord = serde_json::from_value(image.source.clone())
            .map_err(|e| bad(&name, format!("bad image record: {e}")))?;
        let _t = obuilder_engine::timing::phase("download+extract", &rec.digest);
        // The first layer that is not stored yet is extracted while it downloads (the
        // layers before it from the blob store first); the rest after the download. Nothing
        // is trusted before the download has checked every digest: on any error the caller
        // throws the half-made root filesystem away.
        let first_missing = rec.layers.iter().position(|l| {
            !self
                .images
                .blob_path(l)
                .map(|p| p.exists())
                .unwrap_or(false)
        });
        let (tap, rx) = match first_missing {
            Some(k) if rec.registry.is_some() => {
                let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
                (Some((rec.layers[k].clone(), tx)), Some((k, rx)))
            }
            _ => (None, None),
        };
        let upto = rx.as_ref().map(|(k, _)| *k + 1).unwrap_or(0);
        let early = {
            let (this, rootfs, rec, log) = (
                self.images.clone(),
                rootfs.to_path_buf(),
                rec.clone(),
                log.clone(),
            );
            tokio::task::spawn_blocking(move || -> Result<(), FetchError> {
                let total = rec.layers.len();
                let Some((k, mut rx)) = rx else {
                    return Ok(());
                };
                for i in 0..k {
                    extract_stored(&this, &rec, i, total, &rootfs, &log)?;
                }
                let mut first = rx.blocking_recv();
                if first.is_none() {
                    // Nothing streamed: another process stored the layer meanwhile.
                    return extract_stored(&this, &rec, k, total, &rootfs, &log);
                }
                log(&LogEvent::Note(format!(
                    "Extracting layer {}/{total} {} while it downloads",
                    k + 1,
                    rec.layers[k]
                )));
                let reader = extract::ChunkReader::new(move || {
                    Ok(first.take().or_else(|| rx.blocking_recv()))
                });
                extract::extract_layer(&rootfs, reader)
                    .map_err(|e| bad(&rec.name, format!("layer {}: {e}", rec.layers[k])))
            })
        };
        let downloaded = self.download_tapped(&rec, log, tap).await;
        let extracted = early.await.map_err(|e| bad(&name, e))?;
        downloaded?;
        extracted?;
        let total = rec.layers.len();
        for i in upto..total {
            let (images, rootfs, rec, log) = (
                self.images.clone(),
                rootfs.to_path_buf(),
                rec.clone(),
                log.clone(),
            );
            tokio::task::spawn_blocking(move || {
                extract_stored(&images, &rec, i, total, &rootfs, &log)
            })
            .await
            .map_err(|e| bad(&name, e))??;
        }
        Ok(rec.config)
    }
}

/// Extracts layer `i` of `rec` from the blob store.
fn extract_stored(
    images: &ImageStore,
    rec: &ImageRecord,
    i: usize,
    total: usize,
    rootfs: &Path,
    log: &LogSink,
) -> Result<(), FetchError> {
    let layer = &rec.layers[i];
    log(&LogEvent::Note(format!(
        "Extracting layer {}/{total} {layer}",
        i + 1
    )));
    let path = images.blob_path(layer).map_err(|e| bad(&rec.name, e))?;
    let f = std::fs::File::open(&path).map_err(|source| FetchError::Io {
        name: rec.name.clone(),
        what: format!("layer {layer}"),
        source,
    })?;
    extract::extract_layer(rootfs, f).map_err(|e| bad(&rec.name, format!("layer {layer}: {e}")))
}
