//! The OCI distribution protocol, spoken directly (no Docker daemon).
//!
//! * Manifests: `GET /v2/REPO/manifests/REF` accepting OCI and Docker manifests and indexes;
//!   an index picks the host's platform (or the one asked for). The manifest's digest is
//!   computed from its bytes and checked against a pinned digest and the registry's
//!   `Docker-Content-Digest`.
//! * Blobs: `GET /v2/REPO/blobs/DIGEST`, streamed into the blob store, verified against the
//!   digest and the size the manifest gives; a blob already in the store is not fetched again.
//!   Layers download concurrently.
//! * Auth: anonymous first; on `401` with a `Bearer` challenge, a token from the realm (with
//!   Basic credentials from `~/.docker/config.json` or `$DOCKER_CONFIG/config.json` when there
//!   are some); on a `Basic` challenge, those credentials directly.
//! * Transport: HTTPS, except plain HTTP for registries on loopback and those the operator
//!   marks insecure (`--insecure-registry HOST[:PORT]`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use obuilder_engine::fetch::ImageConfig;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::images::{ImageStore, ImageStoreError};
use crate::import::{config_of, select_platform, INDEX_TYPES};
use crate::reference::Reference;

pub const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Why a registry operation failed; every message names the image (and the layer).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{image}: not found in the registry ({detail})")]
    NotFound { image: String, detail: String },
    #[error("{image}: access denied by the registry ({status}); log in with `obuilder login {registry}` (credentials are read from containers' auth.json and ~/.docker/config.json, as podman does)")]
    Denied {
        image: String,
        registry: String,
        status: u16,
    },
    #[error("{image}: cannot reach registry {registry}: {detail}")]
    Unreachable {
        image: String,
        registry: String,
        detail: String,
    },
    #[error("{image}: {what}: {detail}")]
    Bad {
        image: String,
        what: String,
        detail: String,
    },
}

/// What happens to a layer download, for progress display.
#[derive(Debug, Clone)]
pub enum Progress {
    Start { digest: String, size: u64 },
    Advance { digest: String, bytes: u64 },
    Done { digest: String },
    Cached { digest: String },
}

/// What a push did.
#[derive(Debug, Clone, Default)]
pub struct PushStats {
    /// The manifest's digest, `sha256:…`.
    pub digest: String,
    pub uploaded: usize,
    pub skipped: usize,
    pub bytes: u64,
}

pub type ProgressSink = Arc<dyn Fn(&Progress) + Send + Sync>;

#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Registries (`host` or `host:port`) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// `os/arch` to take from multi-platform images (default: this host's).
    pub platform: String,
    /// Layers downloaded at once.
    pub concurrency: usize,
    /// Where `config.json` with credentials is (default: `$DOCKER_CONFIG` or `~/.docker`).
    pub docker_config: Option<PathBuf>,
}

impl Default for RegistryOptions {
    fn default() -> RegistryOptions {
        RegistryOptions {
            insecure: Vec::new(),
            platform: crate::import::host_platform(),
            concurrency: 4,
            docker_config: None,
        }
    }
}

/// A resolved image: its manifest digest, config and layers (digest, size).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub reference: Reference,
    pub digest: String,
    pub config: ImageConfig,
    pub layers: Vec<(String, u64)>,
    /// `os/arch` as the image's config says (None if it does not).
    pub platform: Option<String>,
    /// The config's `rootfs.diff_ids`.
    pub diff_ids: Vec<String>,
}

pub struct Registry {
    /// Made on first use: loading the system's CA certificates costs milliseconds that a
    /// build served from the cache should not pay.
    http: std::sync::OnceLock<reqwest::Client>,
    opts: RegistryOptions,
    creds: std::sync::OnceLock<crate::credentials::Credentials>,
    /// `Authorization` header values by `registry/repository`.
    auth: tokio::sync::Mutex<HashMap<String, String>>,
}

/// Basic credentials by registry from every source (see [`crate::credentials`]), with
/// `path` as the Docker config.
pub fn load_docker_credentials(path: Option<PathBuf>) -> HashMap<String, String> {
    crate::credentials::Credentials::load(path).auths()
}

/// Parses `Bearer realm="…",service="…",scope="…"` (or `Basic realm="…"`).
pub fn parse_challenge(h: &str) -> Option<(String, HashMap<String, String>)> {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        params.insert(k.trim().to_ascii_lowercase(), v.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_ascii_lowercase(), params))
}

fn sha256_hex(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

impl Registry {
    /// A client; nothing is read or connected until the first request.
    pub fn new(opts: RegistryOptions) -> Registry {
        Registry {
            http: Default::default(),
            opts,
            creds: Default::default(),
            auth: Default::default(),
        }
    }

    /// The `os/arch` taken from multi-platform images.
    pub fn platform(&self) -> &str {
        &self.opts.platform
    }

    fn http(&self, r: &Reference) -> Result<&reqwest::Client, RegistryError> {
        if let Some(c) = self.http.get() {
            return Ok(c);
        }
        let c = reqwest::Client::builder()
            .user_agent(concat!("obuilder/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| RegistryError::Unreachable {
                image: r.to_string(),
                registry: r.registry.clone(),
                detail: format!("cannot set up the HTTP client: {e}"),
            })?;
        Ok(self.http.get_or_init(|| c))
    }

    fn creds(&self) -> &crate::credentials::Credentials {
        self.creds
            .get_or_init(|| crate::credentials::Credentials::load(self.opts.docker_config.clone()))
    }

    fn scheme(&self, r: &Reference) -> &'static str {
        if r.is_loopback() || self.opts.insecure.iter().any(|h| h == &r.registry) {
            "http"
        } else {
            "https"
        }
    }

    fn url(&self, r: &Reference, tail: &str) -> String {
        format!(
            "{}://{}/v2/{}/{}",
            self.scheme(r),
            r.api_host(),
            r.repository,
            tail
        )
    }

    fn unreachable(&self, r: &Reference, e: &reqwest::Error) -> RegistryError {
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
        while let Some(s) = src {
            detail = format!("{detail}: {s}");
            src = s.source();
        }
        let dns = detail.contains("dns error") || detail.contains("failed to lookup address");
        let tls = detail.contains("InvalidContentType")
            || detail.contains("invalid peer certificate")
            || detail.contains("record overflow")
            || detail.contains("corrupt message")
            || detail.contains("HTTP/");
        if self.scheme(r) == "https" && !dns && tls {
            detail.push_str(&format!(
                " (a plain-HTTP registry needs --insecure-registry {})",
                r.registry
            ));
        }
        RegistryError::Unreachable {
            image: r.to_string(),
            registry: r.registry.clone(),
            detail,
        }
    }

    /// GET with auth: anonymous (or a cached token) first; on 401, authenticate and retry once.
    async fn get(
        &self,
        r: &Reference,
        url: &str,
        accept: &[&str],
    ) -> Result<reqwest::Response, RegistryError> {
        self.send(r, &|c| {
            let req = c.get(url);
            if accept.is_empty() {
                req
            } else {
                req.header(reqwest::header::ACCEPT, accept.join(", "))
            }
        })
        .await
    }

    /// A request with auth, as [`Registry::get`]; `make` builds it afresh for the retry.
    async fn send(
        &self,
        r: &Reference,
        make: &(dyn Fn(&reqwest::Client) -> reqwest::RequestBuilder + Sync),
    ) -> Result<reqwest::Response, RegistryError> {
        let key = format!("{}/{}", r.registry, r.repository);
        let mut authz = self.auth.lock().await.get(&key).cloned();
        for attempt in 0..2 {
            let mut req = make(self.http(r)?);
            if let Some(a) = &authz {
                req = req.header(reqwest::header::AUTHORIZATION, a);
            }
            let resp = req.send().await.map_err(|e| self.unreachable(r, &e))?;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
                    .unwrap_or_default();
                authz = Some(self.authenticate(r, &challenge).await?);
                self.auth
                    .lock()
                    .await
                    .insert(key.clone(), authz.clone().unwrap_or_default());
                continue;
            }
            return Ok(resp);
        }
        Err(RegistryError::Denied {
            image: r.to_string(),
            registry: r.registry.clone(),
            status: 401,
        })
    }

    async fn authenticate(&self, r: &Reference, challenge: &str) -> Result<String, RegistryError> {
        self.authenticate_with(r, challenge, self.creds().get(&r.registry))
            .await
    }

    /// Checks `basic` (base64 `user:password`) against `registry` as a pull would use it:
    /// `GET /v2/`, and on a challenge, the token server or Basic auth.
    pub async fn check_login(&self, registry: &str, basic: &str) -> Result<(), RegistryError> {
        let r = Reference {
            registry: registry.to_string(),
            repository: String::new(),
            tag: None,
            digest: None,
        };
        let url = format!("{}://{}/v2/", self.scheme(&r), r.api_host());
        let resp = self
            .http(&r)?
            .get(&url)
            .send()
            .await
            .map_err(|e| self.unreachable(&r, &e))?;
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            return self.check(&r, resp, "login").await.map(|_| ());
        }
        let challenge = resp
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string();
        // (A token server that hands out tokens anonymously is asked with the credentials.)
        let authz = self
            .authenticate_with(&r, &challenge, Some(basic.to_string()))
            .await?;
        let resp = self
            .http(&r)?
            .get(&url)
            .header(reqwest::header::AUTHORIZATION, authz)
            .send()
            .await
            .map_err(|e| self.unreachable(&r, &e))?;
        self.check(&r, resp, "login").await.map(|_| ())
    }

    async fn authenticate_with(
        &self,
        r: &Reference,
        challenge: &str,
        basic: Option<String>,
    ) -> Result<String, RegistryError> {
        let denied = |status| RegistryError::Denied {
            image: r.to_string(),
            registry: r.registry.clone(),
            status,
        };
        let Some((scheme, params)) = parse_challenge(challenge) else {
            return Err(denied(401));
        };
        match scheme.as_str() {
            "basic" => basic
                .map(|b| format!("Basic {b}"))
                .ok_or_else(|| denied(401)),
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| RegistryError::Bad {
                    image: r.to_string(),
                    what: "authentication".into(),
                    detail: format!("Bearer challenge without a realm: {challenge}"),
                })?;
                let scope = params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", r.repository));
                let mut req = self.http(r)?.get(realm).query(&[("scope", scope.as_str())]);
                if let Some(service) = params.get("service") {
                    req = req.query(&[("service", service.as_str())]);
                }
                if let Some(b) = &basic {
                    req = req.header(reqwest::header::AUTHORIZATION, format!("Basic {b}"));
                }
                let resp = req.send().await.map_err(|e| self.unreachable(r, &e))?;
                if !resp.status().is_success() {
                    return Err(denied(resp.status().as_u16()));
                }
                let v: Value = resp.json().await.map_err(|e| RegistryError::Bad {
                    image: r.to_string(),
                    what: "token".into(),
                    detail: e.to_string(),
                })?;
                let token = v["token"]
                    .as_str()
                    .or(v["access_token"].as_str())
                    .ok_or_else(|| RegistryError::Bad {
                        image: r.to_string(),
                        what: "token".into(),
                        detail: "the token server's answer has no token".into(),
                    })?;
                Ok(format!("Bearer {token}"))
            }
            _ => Err(denied(401)),
        }
    }

    async fn check(
        &self,
        r: &Reference,
        resp: reqwest::Response,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let code = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
            .unwrap_or_else(|| status.to_string());
        Err(match status.as_u16() {
            404 => RegistryError::NotFound {
                image: r.to_string(),
                detail: format!("{what}: {code}"),
            },
            401 | 403 => RegistryError::Denied {
                image: r.to_string(),
                registry: r.registry.clone(),
                status: status.as_u16(),
            },
            _ => RegistryError::Bad {
                image: r.to_string(),
                what: what.into(),
                detail: format!("HTTP {status}: {code}"),
            },
        })
    }

    async fn manifest(
        &self,
        r: &Reference,
        reference: &str,
    ) -> Result<(String, Value, Option<String>), RegistryError> {
        let resp = self
            .get(
                r,
                &self.url(r, &format!("manifests/{reference}")),
                &MANIFEST_TYPES,
            )
            .await?;
        let resp = self
            .check(r, resp, &format!("manifest {reference}"))
            .await?;
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(r, &e))?;
        let digest = sha256_hex(&bytes);
        let bad = |detail: String| RegistryError::Bad {
            image: r.to_string(),
            what: format!("manifest {reference}"),
            detail,
        };
        if reference.starts_with("sha256:") && reference != digest {
            return Err(bad(format!(
                "content digest {digest} does not match the requested {reference}"
            )));
        }
        if let Some(h) = &header_digest {
            if h.starts_with("sha256:") && *h != digest {
                return Err(bad(format!("content digest {digest} does not match the registry's Docker-Content-Digest {h}")));
            }
        }
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        Ok((digest, v, ctype))
    }

    /// Resolves a reference to its manifest digest, config and layers (no layer download).
    pub async fn resolve(&self, r: &Reference) -> Result<Resolved, RegistryError> {
        let (mut digest, mut manifest, ctype) = self.manifest(r, r.reference()).await?;
        let mt = manifest["mediaType"]
            .as_str()
            .map(str::to_string)
            .or(ctype)
            .unwrap_or_default();
        if INDEX_TYPES.contains(&mt.as_str()) || manifest["manifests"].is_array() {
            let d = select_platform(&manifest, &self.opts.platform).map_err(|detail| {
                RegistryError::Bad {
                    image: r.to_string(),
                    what: "platform".into(),
                    detail,
                }
            })?;
            let (d2, m2, _) = self.manifest(r, &d).await?;
            digest = d2;
            manifest = m2;
        }
        let bad = |detail: &str| RegistryError::Bad {
            image: r.to_string(),
            what: "manifest".into(),
            detail: detail.into(),
        };
        if manifest["schemaVersion"].as_i64() == Some(1) {
            return Err(bad(
                "schema 1 manifests are not supported; push the image again with a current client",
            ));
        }
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .ok_or_else(|| bad("no config"))?
            .to_string();
        let resp = self
            .get(r, &self.url(r, &format!("blobs/{config_digest}")), &[])
            .await?;
        let resp = self
            .check(r, resp, &format!("config {config_digest}"))
            .await?;
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(r, &e))?;
        if sha256_hex(&bytes) != config_digest {
            return Err(RegistryError::Bad {
                image: r.to_string(),
                what: format!("config {config_digest}"),
                detail: format!("content digest {} does not match", sha256_hex(&bytes)),
            });
        }
        let config: Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(&format!("config is not JSON: {e}")))?;
        let mut layers = Vec::new();
        for l in manifest["layers"].as_array().cloned().unwrap_or_default() {
            let d = l["digest"]
                .as_str()
                .ok_or_else(|| bad("a layer without digest"))?;
            if !d.starts_with("sha256:") || d.len() != 71 {
                return Err(bad(&format!("unsupported layer digest {d:?}")));
            }
            layers.push((d.to_string(), l["size"].as_u64().unwrap_or(0)));
        }
        let platform = match (config["os"].as_str(), config["architecture"].as_str()) {
            (Some(os), Some(arch)) => Some(format!("{os}/{arch}")),
            _ => None,
        };
        Ok(Resolved {
            reference: r.clone(),
            digest,
            config: config_of(&config),
            layers,
            platform,
            diff_ids: crate::images::diff_ids_of(&config),
        })
    }

    /// Downloads the layers the blob store lacks, concurrently, verifying each.
    pub async fn download(
        &self,
        res: &Resolved,
        images: &ImageStore,
        progress: &ProgressSink,
    ) -> Result<(), RegistryError> {
        self.download_tapped(res, images, progress, None).await
    }

    /// [`Registry::download`], also sending the bytes of one layer (`tap`: its digest and a
    /// channel) as they arrive, so that it can be extracted while it downloads. The receiver
    /// must not trust what it got until this returns `Ok` (the digest is checked at the end);
    /// if the layer is already stored, nothing is sent. A receiver that goes away does not
    /// stop the download.
    pub async fn download_tapped(
        &self,
        res: &Resolved,
        images: &ImageStore,
        progress: &ProgressSink,
        tap: Option<(String, tokio::sync::mpsc::Sender<Vec<u8>>)>,
    ) -> Result<(), RegistryError> {
        let todo: Vec<(String, u64)> = res
            .layers
            .iter()
            .filter(|(d, _)| {
                let have = images.blob_path(d).map(|p| p.exists()).unwrap_or(false);
                if have {
                    progress(&Progress::Cached { digest: d.clone() });
                }
                !have
            })
            .cloned()
            .collect();
        futures_util::stream::iter(todo.into_iter().map(|(d, size)| {
            let tap = tap
                .as_ref()
                .filter(|(t, _)| *t == d)
                .map(|(_, tx)| tx.clone());
            self.blob(&res.reference, d, size, images, progress, tap)
        }))
        .buffer_unordered(self.opts.concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
        Ok(())
    }

    /// Uploads `image` as `r` (its tag, else `latest`): each blob the registry does not
    /// have yet (asked with `HEAD`), then the manifest. Returns the manifest's digest and
    /// how many blobs and bytes were sent.
    pub async fn push(
        &self,
        r: &Reference,
        images: &ImageStore,
        image: &crate::export::Image,
        progress: &ProgressSink,
    ) -> Result<PushStats, RegistryError> {
        let mut stats = PushStats::default();
        let mut blobs = vec![image.config.clone()];
        blobs.extend(image.layers.iter().map(crate::export::Layer::blob));
        let mut seen = std::collections::HashSet::new();
        let blobs: Vec<_> = blobs
            .into_iter()
            .filter(|b| seen.insert(b.digest.clone()))
            .collect();
        // Each blob: asked for, then sent if missing; a few at once (the first push
        // after a `401` gets the token the others reuse).
        let one = |b: crate::export::Blob| async move {
            let head = self
                .send(r, &|c| c.head(self.url(r, &format!("blobs/{}", b.digest))))
                .await?;
            if head.status().is_success() {
                progress(&Progress::Cached {
                    digest: b.digest.clone(),
                });
                return Ok::<_, RegistryError>(None);
            }
            self.upload(r, images, &b, progress).await?;
            Ok(Some(b.size))
        };
        let mut results = futures_util::stream::iter(blobs.into_iter().map(one))
            .buffer_unordered(self.opts.concurrency.max(1));
        while let Some(r) = results.next().await {
            match r? {
                None => stats.skipped += 1,
                Some(size) => {
                    stats.uploaded += 1;
                    stats.bytes += size;
                }
            }
        }
        let tag = r.tag.clone().unwrap_or_else(|| "latest".into());
        let manifest = image.manifest.clone();
        let resp = self
            .send(r, &|c| {
                c.put(self.url(r, &format!("manifests/{tag}")))
                    .header(reqwest::header::CONTENT_TYPE, crate::export::MANIFEST_TYPE)
                    .body(manifest.clone())
            })
            .await?;
        self.check(r, resp, "manifest upload").await?;
        stats.digest = image.manifest_digest();
        Ok(stats)
    }

    /// One blob: `POST` an upload session, then `PUT` the bytes to it in one request.
    async fn upload(
        &self,
        r: &Reference,
        images: &ImageStore,
        b: &crate::export::Blob,
        progress: &ProgressSink,
    ) -> Result<(), RegistryError> {
        let bad = |detail: String| RegistryError::Bad {
            image: r.to_string(),
            what: format!("upload of {}", b.digest),
            detail,
        };
        let resp = self
            .send(r, &|c| {
                c.post(self.url(r, "blobs/uploads/"))
                    .header(reqwest::header::CONTENT_LENGTH, "0")
            })
            .await?;
        let resp = self.check(r, resp, "upload session").await?;
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| bad("the registry gave no Location for the upload".into()))?
            .to_string();
        // A relative Location is relative to the registry.
        let mut url = if location.starts_with('/') {
            format!("{}://{}{location}", self.scheme(r), r.api_host())
        } else {
            location
        };
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("digest={}", b.digest));
        let path = images
            .blob_path(&b.digest)
            .map_err(|e| bad(e.to_string()))?;
        progress(&Progress::Start {
            digest: b.digest.clone(),
            size: b.size,
        });
        let (digest, size, sink) = (b.digest.clone(), b.size, progress.clone());
        // The registry's credentials go only to the registry: an upload URL elsewhere (a
        // storage service it hands out) gets none.
        let own = format!("{}://{}/", self.scheme(r), r.api_host());
        let same_host = url.starts_with(&own);
        let make = |c: &reqwest::Client| {
            let (path, digest, sink) = (path.clone(), digest.clone(), sink.clone());
            let chunks = futures_util::stream::unfold(None, move |file| {
                let (path, digest, sink) = (path.clone(), digest.clone(), sink.clone());
                async move {
                    use tokio::io::AsyncReadExt;
                    let mut file = match file {
                        Some(f) => f,
                        None => match tokio::fs::File::open(&path).await {
                            Ok(f) => f,
                            Err(e) => return Some((Err(e), None)),
                        },
                    };
                    let mut buf = vec![0u8; 1 << 20];
                    match file.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            sink(&Progress::Advance {
                                digest,
                                bytes: n as u64,
                            });
                            Some((Ok(buf), Some(file)))
                        }
                        Err(e) => Some((Err(e), None)),
                    }
                }
            });
            c.put(url.as_str())
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, size.to_string())
                .body(reqwest::Body::wrap_stream(chunks))
        };
        let resp = if same_host {
            self.send(r, &make).await?
        } else {
            make(self.http(r)?)
                .send()
                .await
                .map_err(|e| self.unreachable(r, &e))?
        };
        self.check(r, resp, &format!("upload of {}", b.digest))
            .await?;
        progress(&Progress::Done {
            digest: b.digest.clone(),
        });
        Ok(())
    }

    async fn blob(
        &self,
        r: &Reference,
        digest: String,
        size: u64,
        images: &ImageStore,
        progress: &ProgressSink,
        mut tap: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    ) -> Result<(), RegistryError> {
        let bad = |detail: String| RegistryError::Bad {
            image: r.to_string(),
            what: format!("layer {digest}"),
            detail,
        };
        let resp = self
            .get(r, &self.url(r, &format!("blobs/{digest}")), &[])
            .await?;
        let resp = self.check(r, resp, &format!("layer {digest}")).await?;
        progress(&Progress::Start {
            digest: digest.clone(),
            size,
        });
        let mut w = images.blob_writer().map_err(|e| bad(e.to_string()))?;
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| bad(format!("download interrupted: {e}")))?;
            w.write(&chunk).map_err(|e| bad(e.to_string()))?;
            if let Some(tx) = &tap {
                if tx.send(chunk.to_vec()).await.is_err() {
                    tap = None; // the extractor stopped; the blob is still stored
                }
            }
            progress(&Progress::Advance {
                digest: digest.clone(),
                bytes: chunk.len() as u64,
            });
        }
        if size > 0 && w.len() != size {
            return Err(bad(format!(
                "truncated download: got {} of {size} bytes",
                w.len()
            )));
        }
        w.finish(images, Some(&digest))
            .map_err(|e: ImageStoreError| bad(e.to_string()))?;
        progress(&Progress::Done { digest });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#).unwrap();
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/alpine:pull");
        let (s, p) = parse_challenge(r#"Basic realm="basic-realm""#).unwrap();
        assert_eq!((s.as_str(), p["realm"].as_str()), ("basic", "basic-realm"));
    }

    #[test]
    fn credentials_from_docker_config() {
        let d = std::env::temp_dir().join(format!("obuilder-dockercfg-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("config.json");
        std::fs::write(&p, r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"127.0.0.1:5000":{"auth":"YTpi"}}}"#).unwrap();
        let c = load_docker_credentials(Some(p));
        assert_eq!(c["docker.io"], "dTpw");
        assert_eq!(c["127.0.0.1:5000"], "YTpi");
        let _ = std::fs::remove_dir_all(d);
    }
}
