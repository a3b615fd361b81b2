//! Results as OCI images: one layer per step, taken as the difference between the step's
//! tree and its parent's, plus an image config from the context the result was made in.
//!
//! * [`write_diff`]: the tar of what changed from one tree to another. A path is changed
//!   when its type, mode, owner, size, mtime, device numbers, symlink target or xattrs
//!   differ (mtime and size as containers/storage's naive diff does: a step that rewrites
//!   a file with the same bytes, size and mtime is not seen, which no real tool does).
//!   Deleted paths become OCI whiteouts (`.wh.NAME`, one per deleted directory); hard
//!   links between files of the same layer stay links. Entries are sorted by name and
//!   carry no uname/gname, so the same trees always give the same bytes (and digest).
//! * [`Image`]: the layers (uncompressed tar, `application/vnd.oci.image.layer.v1.tar`),
//!   config and manifest of a result, with its blobs in the local blob store; a layer is
//!   made once per step and reused (`STATE/images/layers/ID`).
//! * Writers: an OCI layout directory (`oci:DIR[:TAG]`, merged with one already there),
//!   an OCI archive, a `docker load` archive, and the flattened tree (`tar:FILE`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use obuilder_engine::fetch::ImageConfig;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::images::{ioe, tmp_beside, write_replacing, ImageStore, ImageStoreError};

pub const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
pub const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_TYPE: &str = "application/vnd.oci.image.index.v1+json";

/// Where an export goes, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An OCI layout directory, with an optional tag (`org.opencontainers.image.ref.name`).
    Oci {
        dir: PathBuf,
        tag: Option<String>,
    },
    OciArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    /// `docker load` format, with an optional `NAME:TAG` in `RepoTags`.
    DockerArchive {
        file: PathBuf,
        tag: Option<String>,
    },
    /// The whole tree as one tar (no image metadata), as `docker export` writes.
    Tar {
        file: PathBuf,
    },
}

impl std::str::FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Destination, String> {
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            format!(
                "{s:?}: say where to write, as oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG] or tar:FILE"
            )
        })?;
        if rest.is_empty() {
            return Err(format!("{s:?}: no path after {kind}:"));
        }
        // A tag follows the path's first ':' (paths with ':' cannot take a tag).
        let split = |rest: &str| match rest.split_once(':') {
            Some((p, t)) if !t.is_empty() => (PathBuf::from(p), Some(t.to_string())),
            _ => (PathBuf::from(rest.trim_end_matches(':')), None),
        };
        match kind {
            "oci" => {
                let (dir, tag) = split(rest);
                Ok(Destination::Oci { dir, tag })
            }
            "oci-archive" => {
                let (file, tag) = split(rest);
                Ok(Destination::OciArchive { file, tag })
            }
            "docker-archive" => {
                let (file, tag) = split(rest);
                Ok(Destination::DockerArchive { file, tag })
            }
            "tar" => Ok(Destination::Tar {
                file: PathBuf::from(rest),
            }),
            _ => Err(format!(
                "{s:?}: unknown destination kind {kind:?}; use oci:, oci-archive:, docker-archive: or tar:"
            )),
        }
    }
}

/// One file's metadata as the diff compares it.
fn same(a: &Metadata, b: &Metadata) -> bool {
    a.mode() == b.mode()
        && a.uid() == b.uid()
        && a.gid() == b.gid()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec()
        && a.rdev() == b.rdev()
        && (a.is_dir() || a.size() == b.size())
}

/// Names in `dir`, sorted by bytes.
fn names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut v = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<Vec<_>>>()?;
    v.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(v)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn xattrs(_path: &Path) -> Vec<(String, Vec<u8>)> {
    Vec::new() // (no xattr API this build knows of)
}

#[cfg(any(target_os = "linux", target_os = "macos"))]
fn xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(path, &mut buf) {
        Ok(n) => n,
        Err(rustix::io::Errno::RANGE) => {
            buf = vec![0u8; 65536];
            match rustix::fs::llistxattr(path, &mut buf) {
                Ok(n) => n,
                Err(_) => return out,
            }
        }
        Err(_) => return out,
    };
    for name in buf[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        // Overlayfs' own, and what a sandbox may have set for itself, are not content.
        if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
            continue;
        }
        let mut val = vec![0u8; 65536];
        if let Ok(len) = rustix::fs::lgetxattr(path, name, &mut val) {
            val.truncate(len);
            out.push((name.to_string(), val));
        }
    }
    out.sort();
    out
}

/// Writes the changes from `parent` (`None`: an empty tree) to `child` as a tar layer.
pub fn write_diff(parent: Option<&Path>, child: &Path, w: impl Write) -> io::Result<()> {
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let mut diff = Diff {
        tar: &mut b,
        links: HashMap::new(),
    };
    diff.tree(parent, child)?;
    b.finish()
}

/// One entry of a layer, in the order written.
enum Action {
    /// `.wh.NAME` for a path of the parent that the child lacks.
    Whiteout(PathBuf),
    /// The path as it is in the child (relative name, host path, metadata).
    Entry(PathBuf, PathBuf, Metadata),
}

/// What changed under `child` against `parent`. A directory whose own metadata did not
/// change is still written when something under it did: extracting the layer changes its
/// mtime, which the directory's entry then restores (extractors set directory times last).
fn plan(rel: &Path, parent: Option<&Path>, child: &Path, out: &mut Vec<Action>) -> io::Result<()> {
    let theirs = match parent {
        Some(p) => names(p)?,
        None => Vec::new(),
    };
    let ours = names(child)?;
    for gone in theirs.iter().filter(|n| ours.binary_search(n).is_err()) {
        let mut wh = OsString::from(".wh.");
        wh.push(gone);
        out.push(Action::Whiteout(rel.join(wh)));
    }
    for name in &ours {
        let c = child.join(name);
        let cm = std::fs::symlink_metadata(&c)?;
        let p = parent.map(|p| p.join(name));
        let pm = p.as_ref().and_then(|p| std::fs::symlink_metadata(p).ok());
        let rel = rel.join(name);
        let changed = match (&pm, &p) {
            (Some(pm), Some(p)) => {
                !same(pm, &cm)
                    || (pm.file_type() != cm.file_type())
                    || (cm.file_type().is_symlink()
                        && std::fs::read_link(p)? != std::fs::read_link(&c)?)
                    // (xattrs change only the ctime; a snapshot keeps it, so equal ctimes
                    // spare the two reads on btrfs and overlayfs.)
                    || ((pm.ctime(), pm.ctime_nsec()) != (cm.ctime(), cm.ctime_nsec())
                        && xattrs(p) != xattrs(&c))
            }
            _ => true,
        };
        if cm.is_dir() {
            let mark = out.len();
            out.push(Action::Entry(rel.clone(), c.clone(), cm.clone()));
            let sub = p
                .as_deref()
                .filter(|_| pm.as_ref().is_some_and(|m| m.is_dir()));
            plan(&rel, sub, &c, out)?;
            if !changed && out.len() == mark + 1 {
                out.pop();
            }
        } else if changed {
            out.push(Action::Entry(rel, c, cm));
        }
    }
    Ok(())
}

struct Diff<'a, W: Write> {
    tar: &'a mut tar::Builder<W>,
    /// (dev, ino) of files with several links already in this layer → their path.
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> Diff<'_, W> {
    fn tree(&mut self, parent: Option<&Path>, child: &Path) -> io::Result<()> {
        let mut actions = Vec::new();
        plan(Path::new(""), parent, child, &mut actions)?;
        for a in actions {
            match a {
                Action::Whiteout(rel) => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(0);
                    h.set_mtime(0);
                    self.tar.append_data(&mut h, rel, io::empty())?;
                }
                Action::Entry(rel, path, m) => self.entry(&rel, &path, &m)?,
            }
        }
        Ok(())
    }

    fn entry(&mut self, rel: &Path, path: &Path, m: &Metadata) -> io::Result<()> {
        let ft = m.file_type();
        if ft.is_socket() {
            return Ok(()); // (tar has no sockets; a daemon's leftover is not content)
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(m.mode() & 0o7777);
        h.set_uid(m.uid().into());
        h.set_gid(m.gid().into());
        h.set_mtime(m.mtime().max(0) as u64);
        h.set_size(0);
        let xattrs = xattrs(path);
        if !xattrs.is_empty() {
            let recs: Vec<(String, Vec<u8>)> = xattrs
                .into_iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v))
                .collect();
            self.tar
                .append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            self.tar.append_data(&mut h, rel, io::empty())
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = std::fs::read_link(path)?;
            self.tar.append_link(&mut h, rel, target)
        } else if ft.is_file() {
            if m.nlink() > 1 {
                let key = (m.dev(), m.ino());
                if let Some(first) = self.links.get(&key) {
                    h.set_entry_type(tar::EntryType::Link);
                    let first = first.clone();
                    return self.tar.append_link(&mut h, rel, first);
                }
                self.links.insert(key, rel.to_path_buf());
            }
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(m.size());
            let f = File::open(path)?;
            // Exactly the size stat gave: a tar header promised it.
            self.tar.append_data(&mut h, rel, f.take(m.size()))
        } else {
            h.set_entry_type(if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            });
            let rdev = m.rdev();
            h.set_device_major(rustix::fs::major(rdev))?;
            h.set_device_minor(rustix::fs::minor(rdev))?;
            self.tar.append_data(&mut h, rel, io::empty())
        }
    }
}

/// A blob in the local blob store: digest and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
}

/// A layer of an image: its blob, how it is compressed, and the digest of its tar.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    /// `sha256:…` of the uncompressed tar (the config's `diff_ids`).
    pub diff_id: String,
}

impl Layer {
    pub fn blob(&self) -> Blob {
        Blob {
            digest: self.digest.clone(),
            size: self.size,
        }
    }
}

/// `io::Write` into a blob of the store, hashed on the way.
struct BlobSink(crate::images::BlobWriter);

impl Write for BlobSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn read_memo(images: &ImageStore, memo: &Path) -> Option<Vec<Layer>> {
    let text = std::fs::read_to_string(memo).ok()?;
    let layers: Vec<Layer> = serde_json::from_str(&text).ok()?;
    let mut out = Vec::new();
    for mut l in layers {
        l.size = std::fs::metadata(images.blob_path(&l.digest).ok()?)
            .ok()?
            .len();
        out.push(l);
    }
    Some(out)
}

fn write_memo(memo: &Path, layers: &[Layer]) -> Result<(), ImageStoreError> {
    let dir = memo.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(ioe("cannot create", dir))?;
    let text = serde_json::to_vec(layers).map_err(|e| ImageStoreError::Bad(e.to_string()))?;
    write_replacing(memo, &text)
}

/// The layer of step `id` (its tree `child` against its parent's tree `parent`): made
/// once and remembered under the step's id (results never change).
pub fn step_layer(
    images: &ImageStore,
    id: &str,
    parent: Option<&Path>,
    child: &Path,
) -> Result<Layer, ImageStoreError> {
    let memo = images.dir().join("layers").join(id);
    if let Some(mut l) = read_memo(images, &memo) {
        if l.len() == 1 {
            return Ok(l.remove(0));
        }
    }
    let mut sink = BlobSink(images.blob_writer()?);
    write_diff(parent, child, &mut sink).map_err(|e| {
        ImageStoreError::Bad(format!(
            "cannot write the layer of {id} from {}: {e}",
            child.display()
        ))
    })?;
    let size = sink.0.len();
    let digest = sink.0.finish(images, None)?;
    let layer = Layer {
        diff_id: digest.clone(),
        digest,
        size,
        media_type: LAYER_TYPE.into(),
    };
    write_memo(&memo, std::slice::from_ref(&layer))?;
    Ok(layer)
}

/// The layers of step `id` with the uncompressed ones compressed with gzip (made once,
/// remembered as `ID.gz`); diff ids stay those of the tars.
pub fn gzipped(
    images: &ImageStore,
    id: &str,
    layers: Vec<Layer>,
) -> Result<Vec<Layer>, ImageStoreError> {
    if layers.iter().all(|l| l.media_type != LAYER_TYPE) {
        return Ok(layers);
    }
    let memo = images.dir().join("layers").join(format!("{id}.gz"));
    if let Some(g) = read_memo(images, &memo) {
        if g.len() == layers.len() {
            return Ok(g);
        }
    }
    let mut out = Vec::new();
    for l in layers {
        if l.media_type != LAYER_TYPE {
            out.push(l);
            continue;
        }
        let src = images.blob_path(&l.digest)?;
        let mut input = File::open(&src).map_err(ioe("cannot read", &src))?;
        let sink = BlobSink(images.blob_writer()?);
        // Level 1: most of the gain for little of the time.
        let mut gz = flate2::write::GzEncoder::new(sink, flate2::Compression::fast());
        io::copy(&mut input, &mut gz).map_err(ioe("cannot compress", &src))?;
        let sink = gz.finish().map_err(ioe("cannot compress", &src))?;
        let size = sink.0.len();
        let digest = sink.0.finish(images, None)?;
        out.push(Layer {
            digest,
            size,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            diff_id: l.diff_id,
        });
    }
    write_memo(&memo, &out)?;
    Ok(out)
}

/// The layers of the image base step `id` was made from, as they are in the blob store
/// (compressed as they came), when that image is known and all its layers are here: the
/// base's tree is those layers applied, so they need not be made again (and a push sends
/// the image's own compressed blobs).
pub fn base_layers(images: &ImageStore, id: &str) -> Option<Vec<Layer>> {
    let memo = images.dir().join("layers").join(id);
    if let Some(l) = read_memo(images, &memo) {
        return Some(l);
    }
    let rec = images.list().ok()?.into_iter().find(|r| {
        r.result.is_none()
            && !r.layers.is_empty()
            && obuilder_engine::key::sha256_hex(
                format!("obuilder-base-v1\0{}", r.digest).as_bytes(),
            ) == id
    })?;
    let known = (rec.diff_ids.len() == rec.layers.len()).then_some(&rec.diff_ids);
    let mut out = Vec::new();
    for (i, d) in rec.layers.iter().enumerate() {
        let path = images.blob_path(d).ok()?;
        let mut f = File::open(&path).ok()?;
        let size = f.metadata().ok()?.len();
        let mut head = [0u8; 4];
        let n = f.read(&mut head).ok()?;
        let media_type = if head[..n].starts_with(&[0x1f, 0x8b]) {
            "application/vnd.oci.image.layer.v1.tar+gzip"
        } else if head[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            "application/vnd.oci.image.layer.v1.tar+zstd"
        } else {
            LAYER_TYPE
        };
        let diff_id = if media_type == LAYER_TYPE {
            d.clone()
        } else if let Some(k) = known {
            k[i].clone()
        } else {
            let mut r = crate::extract::decompress(File::open(&path).ok()?).ok()?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let k = r.read(&mut buf).ok()?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
            }
            format!("sha256:{}", hex::encode(h.finalize()))
        };
        out.push(Layer {
            digest: d.clone(),
            size,
            media_type: media_type.into(),
            diff_id,
        });
    }
    write_memo(&memo, &out).ok()?;
    Some(out)
}

/// Result `id` as an image: its chain of steps from the base, a layer for each (made on
/// first need), and `config` (or the result's own recorded context). `progress` hears of
/// each layer made.
pub async fn image_of(
    builder: &obuilder_engine::Builder,
    images: &ImageStore,
    id: &str,
    config: Option<ImageConfig>,
    compress: bool,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<Image, String> {
    let e = |e: obuilder_engine::error::BuildError| e.to_string();
    let info = builder.info(id).map_err(e)?.ok_or_else(|| {
        format!("no result {id} in the store (see `obuilder image ls`, or the id a build printed)")
    })?;
    let created = info.created.clone();
    let mut chain = vec![id.to_string()];
    let mut at = info.parent;
    while let Some(p) = at {
        at = builder.info(&p).map_err(e)?.and_then(|i| i.parent);
        chain.push(p);
        if chain.len() > 100_000 {
            return Err(format!("{id}: its chain of parents does not end"));
        }
    }
    chain.reverse();
    let config = match config {
        Some(c) => c,
        None => builder
            .result_config(id)
            .await
            .map_err(e)?
            .unwrap_or_default(),
    };
    let store = builder.store().clone();
    let total = chain.len();
    // Each step's layer from its own view and its parent's (taken and released by the
    // task), two at a time: the diffs are independent and each mostly waits on the disk.
    let tasks = chain.iter().enumerate().map(|(n, step)| {
        let parent = n.checked_sub(1).map(|p| chain[p].clone());
        let (store, imgs, step) = (store.clone(), images.clone(), step.clone());
        async move {
            progress(n + 1, total, &step);
            let child = store.view(&step).await.map_err(|e| e.to_string())?;
            let pview = match &parent {
                Some(p) => match store.view(p).await {
                    Ok(v) => Some(v),
                    Err(e) => {
                        let _ = store.release_view(&child).await;
                        return Err(e.to_string());
                    }
                },
                None => None,
            };
            let (c, pv, id) = (child.clone(), pview.clone(), step.clone());
            let made = tokio::task::spawn_blocking(move || {
                let made = match pv.is_none().then(|| base_layers(&imgs, &id)).flatten() {
                    Some(l) => l,
                    None => vec![step_layer(&imgs, &id, pv.as_deref(), &c)?],
                };
                if compress {
                    gzipped(&imgs, &id, made)
                } else {
                    Ok(made)
                }
            })
            .await;
            let _ = store.release_view(&child).await;
            if let Some(v) = pview {
                let _ = store.release_view(&v).await;
            }
            made.map_err(|_| "the layer-writing thread panicked".to_string())?
                .map_err(|e| e.to_string())
                .map(|ls| {
                    ls.into_iter()
                        .map(|l| (step.clone(), l))
                        .collect::<Vec<_>>()
                })
        }
    });
    use futures_util::StreamExt;
    let made: Vec<Result<Vec<(String, Layer)>, String>> = futures_util::stream::iter(tasks)
        .buffered(2)
        .collect()
        .await;
    let mut layers = Vec::new();
    for m in made {
        layers.extend(m?);
    }
    Image::assemble(images, layers, &config, &created).map_err(|e| e.to_string())
}

/// Writes result `id`'s whole tree as one tar (`tar:FILE`).
pub async fn export_tree(
    builder: &obuilder_engine::Builder,
    id: &str,
    file: &Path,
) -> Result<(), String> {
    let store = builder.store().clone();
    if store.result(id).await.map_err(|e| e.to_string())?.is_none() {
        return Err(format!("no result {id} in the store"));
    }
    let view = store.view(id).await.map_err(|e| e.to_string())?;
    let (v, f) = (view.clone(), file.to_path_buf());
    let r = tokio::task::spawn_blocking(move || {
        write_tar_file(&f, |b| {
            let mut d = Diff {
                tar: b,
                links: HashMap::new(),
            };
            d.tree(None, &v)
        })
    })
    .await
    .map_err(|_| "the tar-writing thread panicked".to_string())
    .and_then(|r| r.map_err(|e| e.to_string()));
    let _ = store.release_view(&view).await;
    r
}

fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Go's names for this host's architecture, as image configs say them.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A result as an image: every blob is in the local blob store.
#[derive(Debug, Clone)]
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Blob,
    pub manifest: Vec<u8>,
}

impl Image {
    /// Makes the config and manifest for `layers` (bottom first, with the ids of the steps
    /// they come from) and stores them as blobs.
    pub fn assemble(
        images: &ImageStore,
        layers: Vec<(String, Layer)>,
        config: &ImageConfig,
        created: &str,
    ) -> Result<Image, ImageStoreError> {
        let mut c = serde_json::Map::new();
        c.insert(
            "Env".into(),
            json!(config
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()),
        );
        if let Some(w) = &config.workdir {
            c.insert("WorkingDir".into(), json!(w));
        }
        if let Some(u) = config.user.as_ref().filter(|u| *u != "0:0") {
            c.insert("User".into(), json!(u));
        }
        if let Some(e) = &config.entrypoint {
            c.insert("Entrypoint".into(), json!(e));
        }
        let created = rfc3339(created);
        let cfg = json!({
            "created": created,
            "architecture": host_arch(),
            "os": "linux",
            "config": Value::Object(c),
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|(_, l)| l.diff_id.clone()).collect::<Vec<_>>(),
            },
            "history": layers.iter().map(|(id, _)| json!({
                "created": created,
                "created_by": format!("obuilder step {id}"),
            })).collect::<Vec<_>>(),
        });
        let cfg_bytes =
            serde_json::to_vec(&cfg).map_err(|e| ImageStoreError::Bad(e.to_string()))?;
        let config_digest = images.put_blob(&cfg_bytes[..], None, "image config")?;
        let config = Blob {
            digest: config_digest,
            size: cfg_bytes.len() as u64,
        };
        let layers: Vec<Layer> = layers.into_iter().map(|(_, l)| l).collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size},
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type, "digest": l.digest, "size": l.size,
            })).collect::<Vec<_>>(),
        }))
        .map_err(|e| ImageStoreError::Bad(e.to_string()))?;
        images.put_blob(&manifest[..], None, "image manifest")?;
        Ok(Image {
            layers,
            config,
            manifest,
        })
    }

    pub fn manifest_digest(&self) -> String {
        sha256_digest(&self.manifest)
    }

    /// Every blob: config, layers, manifest.
    fn blobs(&self) -> Vec<Blob> {
        let mut v = vec![self.config.clone()];
        v.extend(self.layers.iter().map(Layer::blob));
        v.push(Blob {
            digest: self.manifest_digest(),
            size: self.manifest.len() as u64,
        });
        v
    }

    /// Writes the image as an OCI layout in `dir`, keeping what else is there (an entry of
    /// the same tag is replaced).
    pub fn write_oci_dir(
        &self,
        images: &ImageStore,
        dir: &Path,
        tag: Option<&str>,
    ) -> Result<(), ImageStoreError> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(ioe("cannot create", &blobs))?;
        let layout = dir.join("oci-layout");
        if !layout.exists() {
            std::fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(ioe("cannot write", &layout))?;
        }
        for b in self.blobs() {
            let to = blobs.join(&b.digest["sha256:".len()..]);
            if to.exists() {
                continue;
            }
            let from = images.blob_path(&b.digest)?;
            let tmp = to.with_extension("tmp");
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(&from, &tmp).is_err() {
                std::fs::copy(&from, &tmp).map_err(ioe("cannot copy a blob to", &tmp))?;
            }
            std::fs::rename(&tmp, &to).map_err(ioe("cannot write", &to))?;
        }
        let index_path = dir.join("index.json");
        let mut manifests: Vec<Value> = match std::fs::read(&index_path) {
            Ok(b) => serde_json::from_slice::<Value>(&b)
                .ok()
                .and_then(|v| v["manifests"].as_array().cloned())
                .ok_or_else(|| {
                    ImageStoreError::Bad(format!(
                        "{} is not an OCI index; choose an empty or OCI layout directory",
                        index_path.display()
                    ))
                })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(ioe("cannot read", &index_path)(e)),
        };
        let name_of = |m: &Value| {
            m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .map(str::to_string)
        };
        let digest = self.manifest_digest();
        manifests.retain(|m| match tag {
            Some(t) => name_of(m).as_deref() != Some(t),
            None => name_of(m).is_some() || m["digest"].as_str() != Some(&digest),
        });
        let mut desc = json!({
            "mediaType": MANIFEST_TYPE,
            "digest": digest,
            "size": self.manifest.len(),
            "platform": {"architecture": host_arch(), "os": "linux"},
        });
        if let Some(t) = tag {
            desc["annotations"] = json!({"org.opencontainers.image.ref.name": t});
        }
        manifests.push(desc);
        let index = serde_json::to_vec_pretty(&json!({
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": manifests,
        }))
        .map_err(|e| ImageStoreError::Bad(e.to_string()))?;
        write_replacing(&index_path, &index)
    }

    /// Writes the image as an OCI archive (a tar of an OCI layout).
    pub fn write_oci_archive(
        &self,
        images: &ImageStore,
        file: &Path,
        tag: Option<&str>,
    ) -> Result<(), ImageStoreError> {
        let scratch = images.scratch()?;
        let layout = scratch.path().join("layout");
        self.write_oci_dir(images, &layout, tag)?;
        write_tar_file(file, |b| {
            for name in ["oci-layout", "index.json"] {
                b.append_path_with_name(layout.join(name), name)?;
            }
            for blob in self.blobs() {
                let hex = &blob.digest["sha256:".len()..];
                append_blob(
                    b,
                    &layout.join("blobs/sha256").join(hex),
                    &format!("blobs/sha256/{hex}"),
                )?;
            }
            Ok(())
        })
    }

    /// Writes the image in `docker save` format (what `docker load` reads).
    pub fn write_docker_archive(
        &self,
        images: &ImageStore,
        file: &Path,
        tag: Option<&str>,
    ) -> Result<(), ImageStoreError> {
        let hex = |d: &str| d["sha256:".len()..].to_string();
        let layer_names: Vec<String> = self
            .layers
            .iter()
            .map(|l| format!("{}/layer.tar", hex(&l.digest)))
            .collect();
        let config_name = format!("{}.json", hex(&self.config.digest));
        let tags: Vec<String> = tag.map(|t| vec![t.to_string()]).unwrap_or_default();
        let manifest = serde_json::to_vec(&json!([{
            "Config": config_name,
            "RepoTags": tags,
            "Layers": layer_names,
        }]))
        .map_err(|e| ImageStoreError::Bad(e.to_string()))?;
        write_tar_file(file, |b| {
            append_blob(
                b,
                &images
                    .blob_path(&self.config.digest)
                    .map_err(io::Error::other)?,
                &config_name,
            )?;
            let mut seen = std::collections::HashSet::new();
            for (l, name) in self.layers.iter().zip(&layer_names) {
                if seen.insert(name.clone()) {
                    append_blob(
                        b,
                        &images.blob_path(&l.digest).map_err(io::Error::other)?,
                        name,
                    )?;
                }
            }
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_size(manifest.len() as u64);
            h.set_mtime(0);
            b.append_data(&mut h, "manifest.json", &manifest[..])
        })
    }
}

fn append_blob(b: &mut tar::Builder<File>, path: &Path, name: &str) -> io::Result<()> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(len);
    h.set_mtime(0);
    b.append_data(&mut h, name, f.take(len))
}

/// Writes a tar file through a temporary name, so that a failure leaves no half file.
pub fn write_tar_file(
    file: &Path,
    fill: impl FnOnce(&mut tar::Builder<File>) -> io::Result<()>,
) -> Result<(), ImageStoreError> {
    let tmp = tmp_beside(file);
    let f = File::create(&tmp).map_err(ioe("cannot create", &tmp))?;
    let mut b = tar::Builder::new(f);
    let r = fill(&mut b)
        .and_then(|_| b.into_inner())
        .and_then(|f| f.sync_all());
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(ioe("cannot write", file)(e));
    }
    std::fs::rename(&tmp, file).map_err(ioe("cannot write", file))
}

/// `YYYY-MM-DD HH:MM:SS.mmm` (the database's times) as RFC 3339.
fn rfc3339(t: &str) -> String {
    match t.split_once(' ') {
        Some((d, time)) => format!("{d}T{time}Z"),
        None => "1970-01-01T00:00:00Z".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse() {
        let d = |s: &str| s.parse::<Destination>();
        assert_eq!(
            d("oci:/tmp/x:v1").unwrap(),
            Destination::Oci {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            d("oci:out").unwrap(),
            Destination::Oci {
                dir: "out".into(),
                tag: None
            }
        );
        assert_eq!(
            d("docker-archive:a.tar:me/x:1").unwrap(),
            Destination::DockerArchive {
                file: "a.tar".into(),
                tag: Some("me/x:1".into())
            }
        );
        assert_eq!(
            d("tar:/a:b").unwrap(),
            Destination::Tar {
                file: "/a:b".into()
            }
        );
        assert!(d("out").unwrap_err().contains("oci:DIR"));
        assert!(d("zip:x").unwrap_err().contains("unknown destination kind"));
        assert!(d("oci:").unwrap_err().contains("no path"));
    }

    fn entries(tar: &[u8]) -> Vec<(String, tar::EntryType)> {
        let mut a = tar::Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().entry_type(),
                )
            })
            .collect()
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn an_xattr_change_alone_is_a_change_and_travels_as_pax() {
        let t = tempfile::tempdir().unwrap();
        let (p, c) = (t.path().join("p"), t.path().join("c"));
        for d in [&p, &c] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("f"), "same").unwrap();
        }
        let m = std::fs::metadata(p.join("f")).unwrap();
        File::options()
            .write(true)
            .open(c.join("f"))
            .unwrap()
            .set_modified(m.modified().unwrap())
            .unwrap();
        for d in ["", "f"] {
            let m = std::fs::metadata(p.join(d)).unwrap();
            File::open(c.join(d))
                .unwrap()
                .set_modified(m.modified().unwrap())
                .unwrap();
        }
        let mut none = Vec::new();
        write_diff(Some(&p), &c, &mut none).unwrap();
        assert!(entries(&none).is_empty(), "{:?}", entries(&none));
        let f = File::options().write(true).open(c.join("f")).unwrap();
        if rustix::fs::fsetxattr(&f, "user.obuilder", b"v1", rustix::fs::XattrFlags::empty())
            .is_err()
        {
            eprintln!("skipping the xattr half: this filesystem has no user xattrs");
            return;
        }
        let mut out = Vec::new();
        write_diff(Some(&p), &c, &mut out).unwrap();
        let mut a = tar::Archive::new(&out[..]);
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str(), Some("f"));
        let pax: Vec<(String, Vec<u8>)> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|x| {
                let x = x.unwrap();
                (x.key().unwrap().to_string(), x.value_bytes().to_vec())
            })
            .collect();
        assert!(
            pax.contains(&("SCHILY.xattr.user.obuilder".into(), b"v1".to_vec())),
            "{pax:?}"
        );
    }

    #[test]
    fn a_diff_holds_what_changed_and_whiteouts_for_what_went() {
        let t = tempfile::tempdir().unwrap();
        let (p, c) = (t.path().join("p"), t.path().join("c"));
        for d in [&p, &c] {
            std::fs::create_dir_all(d.join("keep/sub")).unwrap();
            std::fs::create_dir_all(d.join("gone-dir/x")).unwrap();
            std::fs::write(d.join("keep/same"), "same").unwrap();
            std::fs::write(d.join("gone"), "x").unwrap();
        }
        // The same mtimes on both sides, as a snapshot keeps them.
        let copy_times = |rel: &str| {
            let m = std::fs::metadata(p.join(rel)).unwrap();
            let f = File::options().write(true).open(c.join(rel)).unwrap();
            f.set_modified(m.modified().unwrap()).unwrap();
        };
        copy_times("keep/same");
        std::fs::remove_file(c.join("gone")).unwrap();
        std::fs::remove_dir_all(c.join("gone-dir")).unwrap();
        std::fs::write(c.join("keep/new"), "new").unwrap();
        std::fs::hard_link(c.join("keep/new"), c.join("keep/new2")).unwrap();
        std::os::unix::fs::symlink("new", c.join("keep/ln")).unwrap();
        for d in ["keep/sub", "keep", ""] {
            let m = std::fs::metadata(p.join(d)).unwrap();
            let f = File::open(c.join(d)).unwrap();
            f.set_modified(m.modified().unwrap()).unwrap();
        }
        let mut out = Vec::new();
        write_diff(Some(&p), &c, &mut out).unwrap();
        let e = entries(&out);
        let names: Vec<&str> = e.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                ".wh.gone",
                ".wh.gone-dir",
                "keep",
                "keep/ln",
                "keep/new",
                "keep/new2"
            ],
            "{e:?}: keep/ is written for its mtime, which what is new in it changes"
        );
        assert_eq!(e[3].1, tar::EntryType::Symlink);
        assert_eq!(e[5].1, tar::EntryType::Link);
        // The same trees give the same bytes.
        let mut again = Vec::new();
        write_diff(Some(&p), &c, &mut again).unwrap();
        assert_eq!(out, again);
        // Against nothing: every path.
        let mut all = Vec::new();
        write_diff(None, &c, &mut all).unwrap();
        assert_eq!(entries(&all).len(), 6, "keep/ and its five");
    }
}
