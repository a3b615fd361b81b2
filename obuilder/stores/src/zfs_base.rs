//! ZFS base images (the original's `Zfs_clone` fetcher): `(from NAME)` on a ZFS store,
//! when the dataset `POOL/base-image/NAME` exists, clones its children (`home` and `brew`
//! for macOS, `rootfs` for FreeBSD; each with an `@snap`, as `zfs send | zfs recv` or a
//! base-image build leaves them) into the base step's dataset, instead of extracting an
//! image. Anything else goes to the wrapped fetcher (local images, registries).
//!
//! The base id comes from the snapshots' `guid`s: a base image replaced by a new one (new
//! snapshots) is a new base, and no stale result is reused. The children are mounted where
//! the store mounts a build's children (`rootfs/SUB`, or `rootfs` itself), so the sandboxes
//! find them, and the store's recursive snapshot publishes them with the step.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::fetch::{FetchError, Fetcher, ImageConfig, ResolvedImage};
use obuilder_engine::log::{LogEvent, LogSink};

pub struct ZfsBaseImages {
    pool: String,
    exec: SharedExec,
    inner: Arc<dyn Fetcher>,
}

/// Whether `name` can be one dataset name component (a registry reference cannot).
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

impl ZfsBaseImages {
    /// Base images under `POOL/base-image`, else `inner`.
    pub fn new(pool: impl Into<String>, exec: SharedExec, inner: Arc<dyn Fetcher>) -> Self {
        ZfsBaseImages {
            pool: pool.into(),
            exec,
            inner,
        }
    }

    /// The snapshots `@snap` of the base image's children, with their guids; `None` if
    /// there is no such base image.
    async fn snapshots(&self, name: &str) -> Result<Option<Vec<(String, String)>>, FetchError> {
        let ds = format!("{}/base-image/{name}", self.pool);
        let cmd = Cmd::new([
            "zfs",
            "list",
            "-H",
            "-o",
            "name,guid",
            "-t",
            "snapshot",
            "-r",
            "-d",
            "2",
            &ds,
        ]);
        let out = match self.exec.output(&cmd).await {
            Ok(o) => o.stdout_str(),
            Err(e) if e.to_string().contains("does not exist") => return Ok(None),
            Err(e) => {
                return Err(FetchError::Bad {
                    name: name.into(),
                    message: e.to_string(),
                })
            }
        };
        let prefix = format!("{ds}/");
        let mut snaps: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| {
                let (n, guid) = l.split_once('\t')?;
                let sub = n.strip_prefix(&prefix)?.strip_suffix("@snap")?;
                (!sub.contains('/')).then(|| (sub.to_string(), guid.trim().to_string()))
            })
            .collect();
        snaps.sort();
        Ok(Some(snaps))
    }
}

#[async_trait]
impl Fetcher for ZfsBaseImages {
    async fn resolve(&self, name: &str, log: &LogSink) -> Result<ResolvedImage, FetchError> {
        if !plain_name(name) {
            return self.inner.resolve(name, log).await;
        }
        let Some(snaps) = self.snapshots(name).await? else {
            return self.inner.resolve(name, log).await;
        };
        if snaps.is_empty() {
            return Err(FetchError::Bad {
                name: name.into(),
                message: format!(
                    "{}/base-image/{name} has no child dataset with an @snap snapshot (home and \
                     brew for macOS, rootfs for FreeBSD)",
                    self.pool
                ),
            });
        }
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"obuilder-zfs-base-image-v1\0");
        for (sub, guid) in &snaps {
            h.update(format!("{sub}\0{guid}\0").as_bytes());
        }
        Ok(ResolvedImage {
            name: name.into(),
            digest: format!("sha256:{}", hex::encode(h.finalize())),
            source: serde_json::json!({
                "zfs_base_image": format!("{}/base-image/{name}", self.pool),
                "children": snaps.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>(),
            }),
            result: None,
        })
    }

    async fn fetch(
        &self,
        image: &ResolvedImage,
        rootfs: &Path,
        log: &LogSink,
    ) -> Result<ImageConfig, FetchError> {
        let Some(ds) = image.source["zfs_base_image"].as_str() else {
            return self.inner.fetch(image, rootfs, log).await;
        };
        let bad = |message: String| FetchError::Bad {
            name: image.name.clone(),
            message,
        };
        // The base step's dataset, from its tree's path (ROOT/result/ID/rootfs).
        let id = rootfs
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad(format!("{} is not a ZFS build's tree", rootfs.display())))?;
        let target = format!("{}/result/{id}", self.pool);
        let children: Vec<String> = image.source["children"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        for sub in &children {
            let mp = if sub == "rootfs" {
                rootfs.to_path_buf()
            } else {
                rootfs.join(sub)
            };
            let mp = format!("mountpoint={}", mp.display());
            let (from, to) = (format!("{ds}/{sub}@snap"), format!("{target}/{sub}"));
            for argv in [
                vec![
                    "zfs",
                    "clone",
                    "-o",
                    "canmount=noauto",
                    "-o",
                    &mp,
                    &from,
                    &to,
                ],
                vec!["zfs", "mount", &to],
            ] {
                self.exec
                    .output(&Cmd::new(argv))
                    .await
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        log(&LogEvent::Note(format!(
            "Cloned base image {ds} ({})",
            children.join(", ")
        )));
        // As the original: a ZFS base image carries no environment (its profile sets it).
        Ok(ImageConfig::default())
    }
}
