//! `obuilder image import NAME FILE|DIR`: local image sources into the image store.
//!
//! Recognised sources:
//! * a directory with an `oci-layout` file: an OCI image layout;
//! * any other directory: a plain root filesystem (packed as one layer);
//! * a tar file (plain, gzip or zstd) holding `oci-layout` + `index.json`: an OCI archive;
//! * a tar file holding `manifest.json`: a `docker save` archive;
//! * any other tar file: a root filesystem tarball (one layer, stored as given).
//!
//! Every blob named by a digest is verified against it. For a plain root filesystem the env
//! is the caller's `--env`, or Docker's default `PATH`.

use std::path::{Path, PathBuf};

use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::fetch::ImageConfig;
use serde_json::Value;

use crate::extract::decompress;
use crate::images::{ioe, record_digest, ImageRecord, ImageStore, ImageStoreError};

/// Docker's default `PATH`, for images that say nothing.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn bad(m: impl Into<String>) -> ImageStoreError {
    ImageStoreError::Bad(printable(&m.into()))
}

/// A message as it may be shown: control characters escaped (a binary file's bytes never
/// reach the terminal raw), and clipped.
pub fn printable(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().take(400) {
        if c.is_control() && c != '\n' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if s.chars().count() > 400 {
        out.push('…');
    }
    out
}

fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("@{secs}")
}

/// What to import.
pub struct ImportRequest<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    /// Env for a plain root filesystem (ignored for images that carry a config).
    pub env: Option<Vec<(String, String)>>,
    /// `os/arch` to pick from a multi-platform OCI index (default: this host's).
    pub platform: Option<String>,
}

/// The host's platform in OCI terms, e.g. `linux/amd64`.
pub fn host_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("linux/{arch}")
}

pub async fn import(
    store: &ImageStore,
    exec: &SharedExec,
    req: ImportRequest<'_>,
) -> Result<ImageRecord, ImageStoreError> {
    // `DIR:TAG` / `FILE:TAG`: one image of an OCI layout or archive holding several.
    let (path, tag) = match std::fs::metadata(req.path) {
        Ok(_) => (req.path.to_path_buf(), None),
        Err(_) => match req.path.to_str().and_then(|s| s.rsplit_once(':')) {
            Some((p, t)) if !t.is_empty() && !t.contains('/') && Path::new(p).exists() => {
                (std::path::PathBuf::from(p), Some(t.to_string()))
            }
            _ => (req.path.to_path_buf(), None),
        },
    };
    let req = ImportRequest { path: &path, ..req };
    let meta = std::fs::metadata(req.path).map_err(ioe("cannot read", req.path))?;
    let is_layout = |p: &Path| p.join("oci-layout").exists();
    if tag.is_some() && !(meta.is_dir() && is_layout(req.path)) && meta.is_dir() {
        return Err(bad(format!(
            "{}: only an OCI layout or archive can take :TAG",
            req.path.display()
        )));
    }
    let rec = if meta.is_dir() {
        if is_layout(req.path) {
            import_oci_layout(
                store,
                req.name,
                req.path,
                req.platform.as_deref(),
                tag.as_deref(),
            )?
        } else {
            import_rootfs_dir(store, exec, &req).await?
        }
    } else {
        let kind = archive_kind(req.path)?;
        if tag.is_some() && kind != ArchiveKind::Oci {
            return Err(bad(format!(
                "{}: only an OCI layout or archive can take :TAG",
                req.path.display()
            )));
        }
        match kind {
            ArchiveKind::Oci | ArchiveKind::Docker => {
                let scratch = store.scratch()?;
                unpack_plain(req.path, scratch.path())?;
                if kind == ArchiveKind::Oci {
                    import_oci_layout(
                        store,
                        req.name,
                        scratch.path(),
                        req.platform.as_deref(),
                        tag.as_deref(),
                    )?
                } else {
                    import_docker_save(store, req.name, scratch.path())?
                }
            }
            ArchiveKind::Rootfs => {
                let layer = store.put_blob_file(req.path, None)?;
                plain_record(req.name, vec![layer], req.env.clone(), req.path)
            }
        }
    };
    let mut rec = rec;
    rec.source = req.path.display().to_string();
    rec.imported = now();
    store.put(&rec)?;
    Ok(rec)
}

fn plain_record(
    name: &str,
    layers: Vec<String>,
    env: Option<Vec<(String, String)>>,
    path: &Path,
) -> ImageRecord {
    let config = ImageConfig {
        env: env.unwrap_or_else(|| vec![("PATH".into(), DEFAULT_PATH.into())]),
        ..ImageConfig::default()
    };
    ImageRecord {
        name: name.to_string(),
        digest: record_digest(&layers, &config),
        layers,
        config,
        source: path.display().to_string(),
        imported: String::new(),
        registry: None,
        result: None,
        diff_ids: Vec::new(),
    }
}

async fn import_rootfs_dir(
    store: &ImageStore,
    exec: &SharedExec,
    req: &ImportRequest<'_>,
) -> Result<ImageRecord, ImageStoreError> {
    let scratch = store.scratch()?;
    let tar = scratch.path().join("layer.tar");
    // GNU tar keeps owners, modes, hard links, devices and xattrs; sorted names and the
    // files' own mtimes make the same tree give the same bytes, hence the same digest.
    let cmd = Cmd::new([
        "tar",
        "--create",
        "--file",
        &tar.to_string_lossy(),
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--sort=name",
        "--format=pax",
        "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
        "--directory",
        &req.path.to_string_lossy(),
        ".",
    ]);
    exec.output(&cmd)
        .await
        .map_err(|e| bad(format!("cannot pack {}: {e}", req.path.display())))?;
    let layer = store.put_blob_file(&tar, None)?;
    Ok(plain_record(
        req.name,
        vec![layer],
        req.env.clone(),
        req.path,
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArchiveKind {
    Oci,
    Docker,
    Rootfs,
}

fn archive_kind(path: &Path) -> Result<ArchiveKind, ImageStoreError> {
    let f = std::fs::File::open(path).map_err(ioe("cannot open", path))?;
    let r = decompress(f).map_err(ioe("cannot read", path))?;
    let mut a = tar::Archive::new(r);
    let (mut oci_layout, mut index, mut manifest) = (false, false, false);
    // The tar reader's own words quote the bad header's bytes: shown only when they are
    // plain text.
    let why = |e: std::io::Error| {
        let d = e.to_string();
        let detail = if d.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
            format!(" ({d})")
        } else {
            String::new()
        };
        bad(format!(
            "{} is not a tar archive (plain, gzip or zstd), an OCI layout or archive, or a `docker save` archive{detail}",
            path.display()
        ))
    };
    let entries = a.entries().map_err(why)?;
    for (n, e) in entries.enumerate() {
        let e = e.map_err(why)?;
        let p = e
            .path()
            .map(|p| p.to_string_lossy().trim_start_matches("./").to_string())
            .unwrap_or_default();
        match p.as_str() {
            "oci-layout" => oci_layout = true,
            "index.json" => index = true,
            "manifest.json" => manifest = true,
            _ => {}
        }
        // Image archives put their metadata near the top; a root filesystem has bin/, etc/…
        if n > 10_000 {
            break;
        }
    }
    Ok(if oci_layout && index {
        ArchiveKind::Oci
    } else if manifest {
        ArchiveKind::Docker
    } else {
        ArchiveKind::Rootfs
    })
}

/// Unpacks an image archive (metadata and blobs only, never a root filesystem) to `dir`.
fn unpack_plain(path: &Path, dir: &Path) -> Result<(), ImageStoreError> {
    let f = std::fs::File::open(path).map_err(ioe("cannot open", path))?;
    let r = decompress(f).map_err(ioe("cannot read", path))?;
    let mut a = tar::Archive::new(r);
    for e in a.entries().map_err(ioe("cannot read", path))? {
        let mut e = e.map_err(|e| bad(format!("{}: corrupt archive: {e}", path.display())))?;
        if e.header().entry_type().is_file() || e.header().entry_type().is_dir() {
            // unpack_in refuses `..` and absolute paths.
            e.unpack_in(dir)
                .map_err(|er| bad(format!("{}: cannot unpack an entry: {er}", path.display())))?;
        }
    }
    Ok(())
}

fn read_json(path: &Path) -> Result<Value, ImageStoreError> {
    let b = std::fs::read(path).map_err(ioe("cannot read", path))?;
    serde_json::from_slice(&b).map_err(|e| bad(format!("{}: invalid JSON: {e}", path.display())))
}

fn blob_in_layout(layout: &Path, digest: &str) -> Result<PathBuf, ImageStoreError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| bad(format!("unsupported digest {digest:?}")))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad(format!("malformed digest {digest:?}")));
    }
    Ok(layout.join("blobs/sha256").join(hex))
}

/// The parts of an image config builds use (and keep).
pub fn config_of(v: &Value) -> ImageConfig {
    let c = &v["config"];
    let env = c["Env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let s = |k: &str| c[k].as_str().filter(|s| !s.is_empty()).map(str::to_string);
    ImageConfig {
        env,
        workdir: s("WorkingDir"),
        user: s("User"),
        shell: None,
        entrypoint: c["Entrypoint"].as_array().map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        }),
    }
}

pub const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// The digest of the manifest for `platform` (`os/arch`) in an index; the error lists the
/// platforms the index offers.
pub fn select_platform(index: &Value, platform: &str) -> Result<String, String> {
    let manifests = index["manifests"]
        .as_array()
        .ok_or("the index has no manifests")?;
    let (os, arch) = platform.split_once('/').unwrap_or(("linux", platform));
    let mut seen = Vec::new();
    for d in manifests {
        let p = &d["platform"];
        seen.push(format!(
            "{}/{}",
            p["os"].as_str().unwrap_or("?"),
            p["architecture"].as_str().unwrap_or("?")
        ));
        // Attestation manifests (unknown/unknown) are not images.
        if p.is_null() || (p["os"] == os && p["architecture"] == arch) {
            return d["digest"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| "a manifest descriptor has no digest".into());
        }
    }
    Err(format!(
        "no manifest for platform {platform} (the index offers: {})",
        seen.join(", ")
    ))
}

/// Picks the manifest for `platform` from an index (recursing into nested indexes).
fn pick_manifest(
    layout: &Path,
    index: &Value,
    platform: &str,
    name: &str,
) -> Result<(String, Value), ImageStoreError> {
    let digest = select_platform(index, platform).map_err(|e| bad(format!("{name}: {e}")))?;
    let path = blob_in_layout(layout, &digest)?;
    let bytes = std::fs::read(&path).map_err(ioe("cannot read", &path))?;
    verify(&bytes, &digest, name)?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("{name}: manifest {digest}: {e}")))?;
    let mt = v["mediaType"].as_str().unwrap_or("");
    if INDEX_TYPES.contains(&mt)
        || INDEX_TYPES.contains(&"application/vnd.oci.image.index.v1+json")
            && v["manifests"].is_array()
    {
        return pick_manifest(layout, &v, platform, name);
    }
    Ok((digest, v))
}

fn verify(bytes: &[u8], digest: &str, what: &str) -> Result<(), ImageStoreError> {
    use sha2::Digest;
    let got = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    if got != digest {
        return Err(bad(format!(
            "{what}: blob {digest} has digest {got}: corrupt or tampered"
        )));
    }
    Ok(())
}

fn import_oci_layout(
    store: &ImageStore,
    name: &str,
    layout: &Path,
    platform: Option<&str>,
    tag: Option<&str>,
) -> Result<ImageRecord, ImageStoreError> {
    let mut index = read_json(&layout.join("index.json"))?;
    // A layout may hold several images, told apart by their ref names: take the one asked
    // for, and never guess between several.
    let ref_name = |d: &Value| {
        d["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .map(str::to_string)
    };
    let descriptors = index["manifests"].as_array().cloned().unwrap_or_default();
    let mut names: Vec<String> = descriptors.iter().filter_map(ref_name).collect();
    names.sort();
    names.dedup();
    match tag {
        Some(t) => {
            let chosen: Vec<Value> = descriptors
                .iter()
                .filter(|d| ref_name(d).as_deref() == Some(t))
                .cloned()
                .collect();
            if chosen.is_empty() {
                return Err(bad(format!(
                    "{}: no image tagged {t:?} (it has: {})",
                    layout.display(),
                    if names.is_empty() {
                        "no tags".into()
                    } else {
                        names.join(", ")
                    }
                )));
            }
            index["manifests"] = Value::Array(chosen);
        }
        None if names.len() > 1 => {
            return Err(bad(format!(
                "{} holds {} images ({}); say which with PATH:TAG",
                layout.display(),
                names.len(),
                names.join(", ")
            )))
        }
        None => {}
    }
    let platform = platform.map(str::to_string).unwrap_or_else(host_platform);
    let (digest, manifest) = pick_manifest(layout, &index, &platform, name)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| bad(format!("{name}: manifest has no config")))?;
    let cpath = blob_in_layout(layout, config_digest)?;
    let cbytes = std::fs::read(&cpath).map_err(ioe("cannot read", &cpath))?;
    verify(&cbytes, config_digest, name)?;
    let config: Value =
        serde_json::from_slice(&cbytes).map_err(|e| bad(format!("{name}: config: {e}")))?;
    let mut layers = Vec::new();
    for l in manifest["layers"].as_array().cloned().unwrap_or_default() {
        let d = l["digest"]
            .as_str()
            .ok_or_else(|| bad(format!("{name}: layer without digest")))?;
        let p = blob_in_layout(layout, d)?;
        layers.push(
            store
                .put_blob_file(&p, Some(d))
                .map_err(|e| bad(format!("{name}: layer {d}: {e}")))?,
        );
    }
    Ok(ImageRecord {
        name: name.to_string(),
        digest,
        layers,
        config: config_of(&config),
        source: String::new(),
        imported: String::new(),
        registry: None,
        result: None,
        diff_ids: Vec::new(),
    })
}

fn import_docker_save(
    store: &ImageStore,
    name: &str,
    dir: &Path,
) -> Result<ImageRecord, ImageStoreError> {
    let manifest = read_json(&dir.join("manifest.json"))?;
    let entries = manifest
        .as_array()
        .ok_or_else(|| bad(format!("{name}: manifest.json is not a list")))?;
    // One image per archive is the common case; with several, prefer the one tagged `name`.
    let entry = entries
        .iter()
        .find(|e| {
            e["RepoTags"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t.as_str() == Some(name)))
        })
        .or(entries.first())
        .ok_or_else(|| bad(format!("{name}: manifest.json lists no image")))?;
    let rel = |v: &Value, what: &str| -> Result<PathBuf, ImageStoreError> {
        let s = v
            .as_str()
            .ok_or_else(|| bad(format!("{name}: {what} missing in manifest.json")))?;
        if s.split('/').any(|p| p == "..") || s.starts_with('/') {
            return Err(bad(format!("{name}: refusing path {s:?} in manifest.json")));
        }
        Ok(dir.join(s))
    };
    let cpath = rel(&entry["Config"], "Config")?;
    let config = read_json(&cpath)?;
    let mut layers = Vec::new();
    for l in entry["Layers"].as_array().cloned().unwrap_or_default() {
        let p = rel(&l, "a layer")?;
        // Newer `docker save` names layers by digest (blobs/sha256/HEX): verify those.
        let expect = p
            .strip_prefix(dir.join("blobs/sha256"))
            .ok()
            .map(|h| format!("sha256:{}", h.to_string_lossy()));
        layers.push(store.put_blob_file(&p, expect.as_deref())?);
    }
    let config = config_of(&config);
    Ok(ImageRecord {
        name: name.to_string(),
        digest: record_digest(&layers, &config),
        layers,
        config,
        source: String::new(),
        imported: String::new(),
        registry: None,
        result: None,
        diff_ids: Vec::new(),
    })
}
