//! Base images for obuilder.
//!
//! * [`images::ImageStore`]: content-addressed blobs and a name index under the store's
//!   state dir; [`import`] fills it from local sources (rootfs dirs and tarballs, OCI
//!   layouts and archives, `docker save` archives).
//! * [`extract`]: layer extraction confined to the rootfs, with OCI whiteouts.
//! * [`LocalFetcher`]: the engine's `Fetcher` over the image store. Registries come next.

pub mod extract;
pub mod images;
pub mod import;

use std::path::Path;

use async_trait::async_trait;
use obuilder_engine::fetch::{FetchError, Fetcher, ImageConfig, ResolvedImage};
use obuilder_engine::log::{LogEvent, LogSink};

use images::{ImageRecord, ImageStore};

/// Resolves `(from NAME)` to an image imported into the local image store.
pub struct LocalFetcher {
    images: ImageStore,
}

impl LocalFetcher {
    pub fn new(images: ImageStore) -> LocalFetcher {
        LocalFetcher { images }
    }
}

#[async_trait]
impl Fetcher for LocalFetcher {
    async fn resolve(&self, name: &str, _log: &LogSink) -> Result<ResolvedImage, FetchError> {
        let rec = self
            .images
            .get(name)
            .map_err(|e| FetchError::Bad { name: name.into(), message: e.to_string() })?
            .ok_or_else(|| FetchError::Unknown {
                name: name.into(),
                hint: format!("no local image of that name; import one with `obuilder image import {name} FILE|DIR`"),
            })?;
        Ok(ResolvedImage {
            name: name.to_string(),
            digest: rec.digest.clone(),
            source: serde_json::to_value(&rec).map_err(|e| FetchError::Bad {
                name: name.into(),
                message: e.to_string(),
            })?,
        })
    }

    async fn fetch(
        &self,
        image: &ResolvedImage,
        rootfs: &Path,
        log: &LogSink,
    ) -> Result<ImageConfig, FetchError> {
        let name = image.name.clone();
        let rec: ImageRecord =
            serde_json::from_value(image.source.clone()).map_err(|e| FetchError::Bad {
                name: name.clone(),
                message: format!("bad image record: {e}"),
            })?;
        let total = rec.layers.len();
        for (i, layer) in rec.layers.iter().enumerate() {
            log(&LogEvent::Note(format!(
                "Extracting layer {}/{total} {layer}",
                i + 1
            )));
            let path = self.images.blob_path(layer).map_err(|e| FetchError::Bad {
                name: name.clone(),
                message: e.to_string(),
            })?;
            let (rootfs, layer_name) = (rootfs.to_path_buf(), layer.clone());
            let n = name.clone();
            tokio::task::spawn_blocking(move || {
                let f = std::fs::File::open(&path).map_err(|source| FetchError::Io {
                    name: n.clone(),
                    what: format!("layer {layer_name}"),
                    source,
                })?;
                extract::extract_layer(&rootfs, f).map_err(|e| FetchError::Bad {
                    name: n,
                    message: format!("layer {layer_name}: {e}"),
                })
            })
            .await
            .map_err(|e| FetchError::Bad {
                name: name.clone(),
                message: e.to_string(),
            })??;
        }
        Ok(rec.config)
    }
}
