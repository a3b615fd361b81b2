//! Base images for obuilder.
//!
//! * [`images::ImageStore`]: content-addressed blobs and a name index under the store's
//!   state dir; [`import`] fills it from local sources (rootfs dirs and tarballs, OCI
//!   layouts and archives, `docker save` archives) and [`registry`] from OCI registries.
//! * [`extract`]: layer extraction confined to the rootfs, with OCI whiteouts.
//! * [`ImageFetcher`]: the engine's `Fetcher`: local images by name, registry images by
//!   reference under a pull policy.

pub mod extract;
pub mod images;
pub mod import;
pub mod reference;
pub mod registry;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use obuilder_engine::fetch::{FetchError, Fetcher, ImageConfig, ResolvedImage};
use obuilder_engine::log::{LogEvent, LogSink};

use images::{ImageRecord, ImageStore};
use reference::Reference;
use registry::{Progress, ProgressSink, Registry};

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

impl std::str::FromStr for PullPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<PullPolicy, String> {
        match s {
            "missing" => Ok(PullPolicy::Missing),
            "always" => Ok(PullPolicy::Always),
            "never" => Ok(PullPolicy::Never),
            _ => Err(format!(
                "unknown pull policy {s:?}: expected missing, always or never"
            )),
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

/// The local-only fetcher (no registry), as tests and offline set-ups use.
pub type LocalFetcher = ImageFetcher;

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
            hint: format!("{e}; and no local image has that name"),
        })?;
        log(&LogEvent::Note(format!("Resolving {reference}")));
        let res = registry
            .resolve(&reference)
            .await
            .map_err(|e| bad(name, e))?;
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
        };
        if local.as_ref().is_some_and(|l| l.digest != rec.digest) {
            log(&LogEvent::Note(format!("{name} moved to {}", rec.digest)));
        }
        self.images.put(&rec).map_err(|e| bad(name, e))?;
        Ok(rec)
    }

    /// Downloads the layers of a registry image that the blob store lacks.
    pub async fn download(&self, rec: &ImageRecord, log: &LogSink) -> Result<(), FetchError> {
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
                    "Downloading {digest} ({:.1} MB)",
                    *size as f64 / 1e6
                ))),
                Progress::Done { digest } => sink(&LogEvent::Note(format!("Downloaded {digest}"))),
                Progress::Cached { digest } => {
                    sink(&LogEvent::Note(format!("Already have {digest}")))
                }
                Progress::Advance { .. } => {}
            }
        });
        registry
            .download(&res, &self.images, &progress)
            .await
            .map_err(|e| bad(&rec.name, e))
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
        self.download(&rec, log).await?;
        let total = rec.layers.len();
        for (i, layer) in rec.layers.iter().enumerate() {
            log(&LogEvent::Note(format!(
                "Extracting layer {}/{total} {layer}",
                i + 1
            )));
            let path = self.images.blob_path(layer).map_err(|e| bad(&name, e))?;
            let (rootfs, layer_name) = (rootfs.to_path_buf(), layer.clone());
            let n = name.clone();
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&path).map_err(|source| FetchError::Io {
                    name: n.clone(),
                    what: format!("layer {layer_name}"),
                    source,
                })?;
                extract::extract_layer(&rootfs, f)
                    .map_err(|e| bad(&n, format!("layer {layer_name}: {e}")))
            })
            .await
            .map_err(|e| bad(&name, e))??;
        }
        Ok(rec.config)
    }
}
