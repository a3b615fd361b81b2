//! The Fetcher interface: turn `(from IMAGE)` into a root filesystem and its config.

use std::path::Path;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::log::LogSink;

/// An image reference resolved to content: what a build's base id is derived from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedImage {
    /// The reference as written in the spec.
    pub name: String,
    /// `sha256:…` of the content (a manifest, an archive): a moved tag gives a new digest.
    pub digest: String,
    /// Fetcher-specific description of where the content is.
    pub source: serde_json::Value,
    /// A name given to a result of this store (`build --tag`): the base is that result
    /// itself, with this env, and nothing is fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaggedResult>,
}

/// A result known by a name, and the env its build ended with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaggedResult {
    pub id: String,
    pub env: Vec<(String, String)>,
}

impl ResolvedImage {
    /// The base id: derived from the content digest, not the name, so a rebuilt image never
    /// reuses stale results.
    pub fn base_id(&self) -> String {
        crate::key::sha256_hex(format!("obuilder-base-v1\0{}", self.digest).as_bytes())
    }
}

/// What a build takes from an image's config. Only `env` is applied (as OBuilder does);
/// the rest is kept for a later opt-in. A step's result records the context it ran in in
/// the same form (`config.json`: env, workdir, user as `UID:GID` or a name, shell), which
/// is what `obuilder run` and `export` give an image made from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// The shell of the step (results only; images have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown image {name:?}: {hint}")]
    Unknown { name: String, hint: String },
    #[error("image {name:?}: {message}")]
    Bad { name: String, message: String },
    #[error("image {name:?}: {what}: {source}")]
    Io {
        name: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Base-image sources.
#[async_trait]
pub trait Fetcher: Send + Sync {
    /// Resolves a reference to content, without fetching it if it can.
    async fn resolve(&self, name: &str, log: &LogSink) -> Result<ResolvedImage, FetchError>;

    /// Fills `rootfs` (an empty directory) with the image's files, ownership preserved,
    /// and returns its config. On error the caller discards `rootfs`.
    async fn fetch(
        &self,
        image: &ResolvedImage,
        rootfs: &Path,
        log: &LogSink,
    ) -> Result<ImageConfig, FetchError>;
}
