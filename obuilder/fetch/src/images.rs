//! The local image store: content-addressed blobs plus a name index.
//!
//! ```text
//! STATE/images/blobs/sha256/HEX     layers (tar, tar.gz, tar.zst) and configs, verified
//! STATE/images/index/HEX.json       one record per image name (HEX = sha256 of the name)
//! STATE/images/tmp/                 imports in progress; wiped when an import starts
//! ```
//!
//! An image's digest covers its layers and its config, so re-importing changed content
//! under the same name gives a new digest, hence a new base id: results built on the old
//! content stay valid for it and are never reused for the new one.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use obuilder_engine::fetch::ImageConfig;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What `(from NAME)` resolves to locally.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    /// `sha256:…` of the image (an OCI manifest, or our canonical record of layers + config).
    pub digest: String,
    /// Layer blobs, bottom first, as `sha256:…`.
    pub layers: Vec<String>,
    pub config: ImageConfig,
    /// Where it was imported from, for `image ls`.
    pub source: String,
    pub imported: String,
    /// The canonical reference this image was pulled from, for registry images (whose
    /// layers are downloaded when first needed).
    #[serde(default)]
    pub registry: Option<String>,
    /// For a name given to a result of this store (`build --tag`): the result's id. Such
    /// an image has no layers; `config` is the context its build ended in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// The image config's `rootfs.diff_ids` (digests of the uncompressed layers), when it
    /// has them: an export reuses the layers without decompressing them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub diff_ids: Vec<String>,
}

/// `rootfs.diff_ids` of an image config.
pub fn diff_ids_of(config: &serde_json::Value) -> Vec<String> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Bad(String),
}

/// `PATH.tmp`: where a file is written before it replaces `path`.
pub fn tmp_beside(path: &Path) -> PathBuf {
    let mut n = path.as_os_str().to_owned();
    n.push(".tmp");
    PathBuf::from(n)
}

/// Replaces `path` with `data` through `PATH.tmp` and a rename: a reader sees the old
/// content or the new, never a part of it.
pub fn write_replacing(path: &Path, data: &[u8]) -> Result<(), ImageStoreError> {
    let tmp = tmp_beside(path);
    std::fs::write(&tmp, data).map_err(ioe("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(ioe("cannot write", path))
}

pub fn ioe(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageStoreError {
    let path = path.to_path_buf();
    move |source| ImageStoreError::Io { what, path, source }
}

#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

/// One blob being written: hashed as it goes, stored under its digest by [`BlobWriter::finish`].
pub struct BlobWriter {
    tmp: tempfile_lite::NamedFile,
    hash: Sha256,
    len: u64,
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> Result<(), ImageStoreError> {
        let p = self.tmp.path().to_path_buf();
        self.tmp
            .file()
            .write_all(data)
            .map_err(ioe("cannot write", &p))?;
        self.hash.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Verifies the digest (if one is expected) and moves the blob into place. On a
    /// mismatch nothing is stored.
    pub fn finish(
        self,
        store: &ImageStore,
        expect: Option<&str>,
    ) -> Result<String, ImageStoreError> {
        let digest = format!("sha256:{}", hex::encode(self.hash.finalize()));
        if let Some(e) = expect {
            if e != digest {
                return Err(ImageStoreError::Bad(format!(
                    "content digest {digest} does not match the expected {e}"
                )));
            }
        }
        let dst = store.blob_path(&digest)?;
        self.tmp
            .persist(&dst)
            .map_err(ioe("cannot store blob", &dst))?;
        Ok(digest)
    }
}

fn hex_of(digest: &str) -> Result<&str, ImageStoreError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            ImageStoreError::Bad(format!(
                "unsupported digest {digest:?}: expected sha256:<64 hex digits>"
            ))
        })
}

impl ImageStore {
    /// The image store under a store's state dir.
    pub fn new(state_dir: &Path) -> ImageStore {
        ImageStore {
            dir: state_dir.join("images"),
        }
    }

    /// The image store's directory (`STATE/images`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn index_path(&self, name: &str) -> PathBuf {
        self.dir.join("index").join(format!(
            "{}.json",
            hex::encode(Sha256::digest(name.as_bytes()))
        ))
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageStoreError> {
        Ok(self.dir.join("blobs/sha256").join(hex_of(digest)?))
    }

    /// A fresh scratch dir for one import (removed by the caller, or at the next start).
    pub fn scratch(&self) -> Result<tempfile_lite::TempDir, ImageStoreError> {
        let tmp = self.dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(ioe("cannot create", &tmp))?;
        tempfile_lite::TempDir::new_in(&tmp).map_err(ioe("cannot create a scratch dir in", &tmp))
    }

    fn ensure(&self) -> Result<(), ImageStoreError> {
        for d in ["blobs/sha256", "index", "tmp"] {
            let p = self.dir.join(d);
            std::fs::create_dir_all(&p).map_err(ioe("cannot create", &p))?;
        }
        Ok(())
    }

    /// A writer for one blob: bytes go to a temp file and are hashed on the way.
    pub fn blob_writer(&self) -> Result<BlobWriter, ImageStoreError> {
        self.ensure()?;
        let tmp_dir = self.dir.join("tmp");
        let tmp = tempfile_lite::NamedFile::new_in(&tmp_dir)
            .map_err(ioe("cannot create a file in", &tmp_dir))?;
        Ok(BlobWriter {
            tmp,
            hash: Sha256::new(),
            len: 0,
        })
    }

    /// Copies a stream into the blob store; returns its digest. If `expect` is given, a
    /// mismatch is an error naming both digests, and nothing is stored.
    pub fn put_blob(
        &self,
        mut r: impl Read,
        expect: Option<&str>,
        what: &str,
    ) -> Result<String, ImageStoreError> {
        let mut w = self.blob_writer()?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r
                .read(&mut buf)
                .map_err(|e| ImageStoreError::Bad(format!("cannot read {what}: {e}")))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.finish(self, expect).map_err(|e| match e {
            ImageStoreError::Bad(m) => ImageStoreError::Bad(format!("{what}: {m}")),
            other => other,
        })
    }

    pub fn put_blob_file(
        &self,
        path: &Path,
        expect: Option<&str>,
    ) -> Result<String, ImageStoreError> {
        let f = std::fs::File::open(path).map_err(ioe("cannot open", path))?;
        self.put_blob(f, expect, &path.display().to_string())
    }

    pub fn get(&self, name: &str) -> Result<Option<ImageRecord>, ImageStoreError> {
        let p = self.index_path(name);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                ImageStoreError::Bad(format!("corrupt image record {}: {e}", p.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ioe("cannot read", &p)(e)),
        }
    }

    /// Records an image (atomically replacing any record of the same name). Imported
    /// images must have all their layers; registry images get theirs when first needed.
    pub fn put(&self, rec: &ImageRecord) -> Result<(), ImageStoreError> {
        self.ensure()?;
        for l in rec.layers.iter().filter(|_| rec.registry.is_none()) {
            let p = self.blob_path(l)?;
            if !p.exists() {
                return Err(ImageStoreError::Bad(format!(
                    "layer {l} of {} is not in the blob store",
                    rec.name
                )));
            }
        }
        let text =
            serde_json::to_vec_pretty(rec).map_err(|e| ImageStoreError::Bad(e.to_string()))?;
        write_replacing(&self.index_path(&rec.name), &text)
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageStoreError> {
        let dir = self.dir.join("index");
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(ioe("cannot list", &dir)(e)),
        };
        for e in rd {
            let p = e.map_err(ioe("cannot list", &dir))?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let b = std::fs::read(&p).map_err(ioe("cannot read", &p))?;
                if let Ok(r) = serde_json::from_slice::<ImageRecord>(&b) {
                    out.push(r);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Forgets an image name and drops the blobs no other image uses. Results built on it
    /// stay in the build store until pruned.
    pub fn remove(&self, name: &str) -> Result<bool, ImageStoreError> {
        let p = self.index_path(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(ioe("cannot remove", &p)(e)),
        }
        let used: std::collections::HashSet<String> = self
            .list()?
            .into_iter()
            .flat_map(|r| r.layers)
            .filter_map(|d| hex_of(&d).ok().map(str::to_string))
            .collect();
        let blobs = self.dir.join("blobs/sha256");
        if let Ok(rd) = std::fs::read_dir(&blobs) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !used.contains(&n) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(true)
    }
}

/// The digest of an image we describe ourselves (not an OCI manifest): layers and config.
pub fn record_digest(layers: &[String], config: &ImageConfig) -> String {
    let canonical = serde_json::json!({ "layers": layers, "config": config });
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    )
}

/// Minimal temp files/dirs inside the image store (no extra dependency).
pub mod tempfile_lite {
    use std::fs::File;
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    static N: AtomicU64 = AtomicU64::new(0);

    fn unique(dir: &Path, prefix: &str) -> PathBuf {
        dir.join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    pub struct NamedFile {
        path: PathBuf,
        file: Option<File>,
    }

    impl NamedFile {
        pub fn new_in(dir: &Path) -> io::Result<NamedFile> {
            let path = unique(dir, "blob");
            let file = File::create(&path)?;
            Ok(NamedFile {
                path,
                file: Some(file),
            })
        }
        pub fn file(&mut self) -> &mut File {
            self.file.as_mut().expect("file is open until persisted")
        }
        pub fn path(&self) -> &Path {
            &self.path
        }
        pub fn persist(mut self, to: &Path) -> io::Result<()> {
            if let Some(f) = self.file.take() {
                f.sync_all()?;
            }
            std::fs::rename(&self.path, to)
        }
    }

    impl Drop for NamedFile {
        fn drop(&mut self) {
            if self.file.is_some() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    pub struct TempDir {
        path: PathBuf,
    }

    impl TempDir {
        pub fn new_in(dir: &Path) -> io::Result<TempDir> {
            let path = unique(dir, "import");
            std::fs::create_dir(&path)?;
            Ok(TempDir { path })
        }
        pub fn path(&self) -> &Path {
            &self.path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
