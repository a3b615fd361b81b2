//! `copy`: source manifests (what the cache key hashes) and writing the files into a
//! snapshot.
//!
//! Manifests follow OBuilder's rules: a source is split on `/`, empty and `.` parts are
//! dropped, `..` is refused, every intermediate part must be a real directory (symlinked
//! directories are not followed), entries are sorted byte-wise and excluded by basename.
//!
//! Unlike OBuilder, which pipes a tar stream into the image's own `tar` (so an image needs a
//! working `tar`, and busybox's fails on directories), the builder writes the files itself.
//! Every path inside the snapshot is resolved inside it (`crate::confined`), so a symlink
//! in the image resolves inside the rootfs as it would in the container, never to the host.
//! Modes follow OBuilder's tar: files 0755 if any execute bit is set, else 0644;
//! directories 0755; owner = the step's user; mtimes copied.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode};
use sha2::{Digest, Sha256};

use crate::confined::{self, ConfinedRoot, Follow, Owner};

use crate::key::{CopyOp, Manifest};

/// A `copy` that cannot be done, with OBuilder's wording where it has one.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("No source items for copy!")]
    NoSources,
    #[error("When copying multiple items, the destination must end with '/'")]
    MultipleNeedsDir,
    #[error("Source path {0:?} not found")]
    NotFound(String),
    #[error("Can't use .. in source paths! (in {0:?})")]
    DotDot(String),
    #[error("Not a directory: {0} (in {1:?})")]
    NotADirectory(String, String),
    #[error("Not a regular file: {0} (in {1:?})")]
    NotARegularFile(String, String),
    #[error("Unsupported file type for {0:?}: only regular files, directories and symlinks can be copied")]
    Unsupported(String),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CopyError {
    let path = path.to_path_buf();
    move |source| CopyError::Io { what, path, source }
}

/// Remembers the SHA-256 of files by where they are and what `stat` says of them, so that
/// an unchanged context is not read again. Advisory: a miss only costs a hash.
pub trait HashCache: Sync {
    /// The hash recorded for `path` with this stat `key`, if any.
    fn get(&self, path: &Path, key: &str) -> Option<String>;
    /// Records a hash (the caller flushes a batch when the manifest is done).
    fn put(&self, path: &Path, key: &str, sha256: &str);
}

/// No cache: every file is read.
pub struct NoCache;

impl HashCache for NoCache {
    fn get(&self, _: &Path, _: &str) -> Option<String> {
        None
    }
    fn put(&self, _: &Path, _: &str, _: &str) {}
}

/// What must not change for a recorded hash to stay valid: device, inode, size, mtime and
/// ctime in nanoseconds (ctime moves on any write or metadata change and cannot be set
/// back by a user). `None` for a file changed in the last 2 s: a write landing in the same
/// clock tick as our read would leave these unchanged, so such a file is never recorded.
fn stat_key(m: &std::fs::Metadata) -> Option<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if now - m.ctime().max(m.mtime()) < RECENT_SECS.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    Some(format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// Files changed less than this many seconds ago are never recorded (2; tests set -1 to
/// record everything).
static RECENT_SECS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(2);

/// The manifest of one `src` of a `copy`, relative to `src_dir`.
pub fn manifest(src_dir: &Path, src: &str, exclude: &[String]) -> Result<Manifest, CopyError> {
    manifest_cached(src_dir, src, exclude, &NoCache)
}

/// [`manifest`], taking unchanged files' hashes from `cache` and recording new ones.
pub fn manifest_cached(
    src_dir: &Path,
    src: &str,
    exclude: &[String],
    cache: &dyn HashCache,
) -> Result<Manifest, CopyError> {
    let mut acc: Vec<&str> = Vec::new();
    let parts: Vec<&str> = src
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    for (i, part) in parts.iter().enumerate() {
        if *part == ".." {
            return Err(CopyError::DotDot(src.to_string()));
        }
        acc.push(part);
        let path = src_dir.join(acc.join("/"));
        let last = i + 1 == parts.len();
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CopyError::NotFound(src.to_string()))
            }
            Err(e) => return Err(io_err("cannot read", &path)(e)),
            Ok(m) if m.is_dir() => {}
            Ok(m) if last && (m.is_file() || m.file_type().is_symlink()) => {}
            Ok(m) if m.is_file() => {
                return Err(CopyError::NotADirectory(acc.join("/"), src.to_string()))
            }
            Ok(_) if !last => {
                return Err(CopyError::NotARegularFile(acc.join("/"), src.to_string()))
            }
            Ok(_) => return Err(CopyError::Unsupported(acc.join("/"))),
        }
    }
    generate(src_dir, &acc.join("/"), exclude, cache)
}

/// Whether an `exclude` entry excludes the entry at `rel` (named `name`). Entries without
/// glob characters match a basename at any depth, as in OBuilder; with `*`, `?` or `[…]`
/// they are globs, matched against the basename, or against the path relative to the copied
/// source when they contain a `/`.
pub fn excluded(exclude: &[String], rel: &str, name: &str) -> bool {
    exclude.iter().any(|x| {
        if !x.contains(['*', '?', '[']) {
            x == name
        } else if x.contains('/') {
            glob(x.trim_start_matches("./").as_bytes(), rel.as_bytes())
        } else {
            glob(x.as_bytes(), name.as_bytes())
        }
    })
}

/// Shell-style matching: `*` (not across `/`), `?`, `[abc]`, `[a-z]`, `[!…]`.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && s[0] != b'/' && glob(p, &s[1..])),
        (Some(b'?'), Some(c)) if *c != b'/' => glob(&p[1..], &s[1..]),
        (Some(b'['), Some(c)) => match p.iter().position(|&b| b == b']').filter(|&e| e > 1) {
            Some(end) => {
                let (neg, set) = if p[1] == b'!' {
                    (true, &p[2..end])
                } else {
                    (false, &p[1..end])
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == b'-' {
                        hit |= set[i] <= *c && *c <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == *c;
                        i += 1;
                    }
                }
                hit != neg && glob(&p[end + 1..], &s[1..])
            }
            None => *c == b'[' && glob(&p[1..], &s[1..]),
        },
        (Some(a), Some(b)) => a == b && glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Walks the tree (cheap) and records the files to hash; hashing happens afterwards, in
/// parallel.
fn walk(
    src_dir: &Path,
    rel: &str,
    top: &str,
    exclude: &[String],
    files: &mut Vec<(String, bool, Option<String>)>,
) -> Result<Manifest, CopyError> {
    let path = if rel.is_empty() {
        src_dir.to_path_buf()
    } else {
        src_dir.join(rel)
    };
    let meta = std::fs::symlink_metadata(&path).map_err(io_err("cannot read", &path))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        let mut names: Vec<Vec<u8>> = std::fs::read_dir(&path)
            .map_err(io_err("cannot list", &path))?
            .map(|e| e.map(|e| e.file_name().as_bytes().to_vec()))
            .collect::<Result<_, _>>()
            .map_err(io_err("cannot list", &path))?;
        names.sort();
        let mut entries = Vec::new();
        for name in names {
            let name = String::from_utf8(name).map_err(|n| {
                CopyError::Unsupported(format!("{rel}/{}", String::from_utf8_lossy(n.as_bytes())))
            })?;
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let within = child
                .strip_prefix(top)
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(&child);
            if excluded(exclude, within, &name) {
                continue;
            }
            entries.push(walk(src_dir, &child, top, exclude, files)?);
        }
        Ok(Manifest::Dir {
            path: rel.to_string(),
            entries,
        })
    } else if ft.is_file() {
        let exec = meta.permissions().mode() & 0o111 != 0;
        files.push((rel.to_string(), exec, stat_key(&meta)));
        // Filled in by `hash_all`.
        Ok(Manifest::File {
            path: rel.to_string(),
            sha256: String::new(),
        })
    } else if ft.is_symlink() {
        let target = std::fs::read_link(&path).map_err(io_err("cannot read link", &path))?;
        Ok(Manifest::Symlink {
            path: rel.to_string(),
            target: target.to_string_lossy().into_owned(),
        })
    } else {
        Err(CopyError::Unsupported(rel.to_string()))
    }
}

/// SHA-256 of one file, streamed.
fn hash_file(path: &Path) -> Result<String, CopyError> {
    let mut f = File::open(path).map_err(io_err("cannot open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf).map_err(io_err("cannot read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Hashes the files on all cores (those `cache` knows unchanged are not read); returns the
/// hashes in the order given.
fn hash_all(
    src_dir: &Path,
    files: &[(String, bool, Option<String>)],
    cache: &dyn HashCache,
) -> Result<Vec<String>, CopyError> {
    let abs = std::fs::canonicalize(src_dir).unwrap_or_else(|_| src_dir.to_path_buf());
    let one = |rel: &str, key: &Option<String>| -> Result<String, CopyError> {
        let path = abs.join(rel);
        if let Some(k) = key {
            if let Some(h) = cache.get(&path, k) {
                return Ok(h);
            }
        }
        let h = hash_file(&path)?;
        if let Some(k) = key {
            cache.put(&path, k, &h);
        }
        Ok(h)
    };
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(files.len().max(1));
    if workers == 1 || files.len() < 4 {
        return files.iter().map(|(rel, _, key)| one(rel, key)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<String, CopyError>>>> =
        files.iter().map(|_| Default::default()).collect();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((rel, _, key)) = files.get(i) else {
                    break;
                };
                let r = one(rel, key);
                *results[i].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or(Err(CopyError::NoSources))
        })
        .collect()
}

fn fill(m: &mut Manifest, hashes: &std::collections::HashMap<&str, (&String, bool)>) {
    match m {
        Manifest::File { path, sha256 } => {
            if let Some((h, exec)) = hashes.get(path.as_str()) {
                if *exec {
                    *m = Manifest::Executable {
                        path: path.clone(),
                        sha256: (*h).clone(),
                    };
                } else {
                    *sha256 = (*h).clone();
                }
            }
        }
        Manifest::Dir { entries, .. } => entries.iter_mut().for_each(|e| fill(e, hashes)),
        _ => {}
    }
}

fn generate(
    src_dir: &Path,
    rel: &str,
    exclude: &[String],
    cache: &dyn HashCache,
) -> Result<Manifest, CopyError> {
    let mut files = Vec::new();
    let mut m = walk(src_dir, rel, rel, exclude, &mut files)?;
    let hashes = hash_all(src_dir, &files, cache)?;
    let map = files
        .iter()
        .zip(&hashes)
        .map(|((p, exec, _), h)| (p.as_str(), (h, *exec)))
        .collect();
    fill(&mut m, &map);
    Ok(m)
}

/// Decides between one item copied as `dst` and several copied into `dst/`.
pub fn copy_op(items: Vec<Manifest>, dst: &str) -> Result<CopyOp, CopyError> {
    if items.is_empty() {
        return Err(CopyError::NoSources);
    }
    if dst.ends_with('/') {
        Ok(CopyOp::Items(items, dst.to_string()))
    } else if items.len() == 1 {
        Ok(CopyOp::Item(
            items.into_iter().next().unwrap_or(Manifest::Dir {
                path: String::new(),
                entries: vec![],
            }),
            dst.to_string(),
        ))
    } else {
        Err(CopyError::MultipleNeedsDir)
    }
}

/// `op` with its destination mapped by `f` (a sandbox's `copy_target`): the host tree to
/// write into, and the op with the destination inside that tree.
pub fn map_dst<E>(
    op: CopyOp,
    f: impl FnOnce(&str) -> Result<(PathBuf, String), E>,
) -> Result<(PathBuf, CopyOp), E> {
    Ok(match op {
        CopyOp::Item(item, dst) => {
            let (root, dst) = f(&dst)?;
            (root, CopyOp::Item(item, dst))
        }
        CopyOp::Items(items, dst) => {
            let (root, dst) = f(&dst)?;
            (root, CopyOp::Items(items, dst))
        }
    })
}

/// Writes the files of `op` from `src_dir` into the tree at `rootfs`, owned by uid:gid.
/// Every path in the tree is resolved inside it (`confined`), as the container would.
/// Blocking; run it on a blocking thread.
pub fn write_into(
    rootfs: &Path,
    src_dir: &Path,
    op: &CopyOp,
    uid: u32,
    gid: u32,
) -> Result<(), CopyError> {
    let root = ConfinedRoot::open(rootfs).map_err(io_err("cannot open rootfs", rootfs))?;
    let w = Writer {
        root,
        src_dir,
        owner: Owner { uid, gid },
    };
    match op {
        CopyOp::Item(item, dst) => {
            w.ensure_parents(dst)?;
            w.write(item, dst)
        }
        CopyOp::Items(items, dst) => {
            w.ensure_parents(&format!("{dst}x"))?;
            for item in items {
                match item {
                    // `.`: the directory's contents go into dst.
                    Manifest::Dir { path, entries } if path.is_empty() => {
                        w.dir(dst.trim_end_matches('/'))?;
                        for e in entries {
                            w.write(e, &format!("{dst}{}", basename(e.path())))?;
                        }
                    }
                    _ => w.write(item, &format!("{dst}{}", basename(item.path())))?,
                }
            }
            Ok(())
        }
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

struct Writer<'a> {
    root: ConfinedRoot,
    src_dir: &'a Path,
    owner: Owner,
}

impl Writer<'_> {
    fn err(&self, what: &'static str, path: &str) -> impl FnOnce(io::Error) -> CopyError {
        io_err(what, &self.root.shown(path))
    }

    /// The parent directory of `path` (resolved in the tree) and the final name.
    fn parent(&self, path: &str) -> Result<Option<(OwnedFd, String)>, CopyError> {
        self.root
            .parent(path, Follow::InRoot)
            .map_err(self.err("cannot open the directory of", path))
    }

    /// Creates the missing parent directories of `path` (owned by the user, 0755);
    /// existing ones are left as they are.
    fn ensure_parents(&self, path: &str) -> Result<(), CopyError> {
        let parts = confined::components(path);
        if let Some((_, dirs)) = parts.split_last() {
            let dir = format!("/{}", dirs.join("/"));
            self.root
                .create_dirs(&dir, 0o755, Some(self.owner))
                .map_err(self.err("cannot create directory", &dir))?;
        }
        Ok(())
    }

    /// Makes `path` a directory owned by the user with mode 0755 (creating it if needed).
    fn dir(&self, path: &str) -> Result<(), CopyError> {
        let Some((pfd, name)) = self.parent(path)? else {
            return Ok(()); // the root itself: leave it
        };
        match rustix::fs::mkdirat(&pfd, name.as_str(), Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(self.err("cannot create directory", path)(e.into())),
        }
        let fd = self
            .root
            .dir(path, Follow::InRoot)
            .map_err(self.err("cannot open directory", path))?;
        rustix::fs::fchown(
            &fd,
            Some(rustix::fs::Uid::from_raw(self.owner.uid)),
            Some(rustix::fs::Gid::from_raw(self.owner.gid)),
        )
        .map_err(|e| self.err("cannot chown", path)(e.into()))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
            .map_err(|e| self.err("cannot chmod", path)(e.into()))?;
        Ok(())
    }

    /// Removes a non-directory at `name` in `pfd`, as tar does before extracting over it.
    fn clear(&self, pfd: &OwnedFd, name: &str, path: &str) -> Result<(), CopyError> {
        match rustix::fs::unlinkat(pfd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => Err(CopyError::Io {
                what: "a directory is in the way of",
                path: self.root.shown(path),
                source: io::Error::from_raw_os_error(libc::EISDIR),
            }),
            Err(e) => Err(self.err("cannot replace", path)(e.into())),
        }
    }

    fn set_mtime(
        &self,
        pfd: &OwnedFd,
        name: &str,
        src: &Path,
        path: &str,
    ) -> Result<(), CopyError> {
        let m = std::fs::symlink_metadata(src).map_err(io_err("cannot read", src))?;
        confined::set_mtime_at(pfd, name, m.mtime(), m.mtime_nsec())
            .map_err(self.err("cannot set times of", path))
    }

    fn write(&self, item: &Manifest, dst: &str) -> Result<(), CopyError> {
        let src = self.src_dir.join(item.path());
        match item {
            Manifest::Dir { entries, .. } => {
                self.dir(dst)?;
                for e in entries {
                    self.write(
                        e,
                        &format!("{}/{}", dst.trim_end_matches('/'), basename(e.path())),
                    )?;
                }
                if let Some((pfd, name)) = self.parent(dst)? {
                    self.set_mtime(&pfd, &name, &src, dst)?;
                }
                Ok(())
            }
            Manifest::File { .. } | Manifest::Executable { .. } => {
                let (pfd, name) = self.parent(dst)?.ok_or_else(|| {
                    CopyError::Unsupported(format!("{dst} (a file cannot replace /)"))
                })?;
                self.clear(&pfd, &name, dst)?;
                let mut input = File::open(&src).map_err(io_err("cannot open", &src))?;
                let exec = input
                    .metadata()
                    .map_err(io_err("cannot read", &src))?
                    .permissions()
                    .mode()
                    & 0o111
                    != 0;
                let mode = if exec { 0o755 } else { 0o644 };
                let mut out = confined::create_file_at(&pfd, &name, mode)
                    .map_err(self.err("cannot create", dst))?;
                io::copy(&mut input, &mut out).map_err(self.err("cannot write", dst))?;
                rustix::fs::fchown(
                    &out,
                    Some(rustix::fs::Uid::from_raw(self.owner.uid)),
                    Some(rustix::fs::Gid::from_raw(self.owner.gid)),
                )
                .map_err(|e| self.err("cannot chown", dst)(e.into()))?;
                // chown clears set-id bits; set the mode after it (and past the umask).
                rustix::fs::fchmod(&out, Mode::from_raw_mode(mode as rustix::fs::RawMode))
                    .map_err(|e| self.err("cannot chmod", dst)(e.into()))?;
                drop(out);
                self.set_mtime(&pfd, &name, &src, dst)
            }
            Manifest::Symlink { target, .. } => {
                let (pfd, name) = self.parent(dst)?.ok_or_else(|| {
                    CopyError::Unsupported(format!("{dst} (a symlink cannot replace /)"))
                })?;
                self.clear(&pfd, &name, dst)?;
                confined::symlink_at(&pfd, &name, target.as_bytes())
                    .map_err(self.err("cannot create symlink", dst))?;
                confined::chown_at(&pfd, &name, self.owner)
                    .map_err(self.err("cannot chown", dst))?;
                self.set_mtime(&pfd, &name, &src, dst)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("src/sub")).unwrap();
        std::fs::write(p.join("src/a.c"), "int a;\n").unwrap();
        std::fs::write(p.join("src/sub/run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            p.join("src/sub/run.sh"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        std::fs::create_dir_all(p.join("src/.git")).unwrap();
        std::os::unix::fs::symlink("a.c", p.join("src/link")).unwrap();
        std::os::unix::fs::symlink("sub", p.join("src/dirlink")).unwrap();
        d
    }

    #[test]
    fn manifest_rules() {
        let d = ctx();
        let src = d.path().join("src");
        let m = manifest(&src, "./sub//run.sh", &[]).unwrap();
        assert_eq!(m.path(), "sub/run.sh");
        assert!(matches!(
            manifest(&src, "../x", &[]),
            Err(CopyError::DotDot(_))
        ));
        assert!(matches!(
            manifest(&src, "nope", &[]),
            Err(CopyError::NotFound(_))
        ));
        assert!(matches!(
            manifest(&src, "a.c/x", &[]),
            Err(CopyError::NotADirectory(..))
        ));
        assert!(matches!(
            manifest(&src, "dirlink/run.sh", &[]),
            Err(CopyError::NotARegularFile(..))
        ));
        // Special files are refused with a clear error, directly or inside a directory.
        let fifo = src.join("sub/fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = manifest(&src, "sub/fifo", &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("Unsupported file type for \"sub/fifo\""),
            "{e}"
        );
        let e = manifest(&src, "sub", &[]).unwrap_err();
        assert!(e.to_string().contains("sub/fifo"), "{e}");
        std::fs::remove_file(&fifo).unwrap();
        let all = manifest(&src, ".", &[".git".into()]).unwrap();
        let Manifest::Dir { path, entries } = &all else {
            panic!()
        };
        assert_eq!(path, "");
        let names: Vec<&str> = entries.iter().map(Manifest::path).collect();
        assert_eq!(names, ["a.c", "dirlink", "link", "sub"]);
        assert_eq!(
            all.to_sexp()
                .to_mach()
                .split("(File(a.c ")
                .nth(1)
                .map(|s| &s[..64]),
            Some(hex::encode(Sha256::digest(b"int a;\n")).as_str())
        );
    }

    /// A cache in memory that counts what it is asked.
    #[derive(Default)]
    struct MemCache {
        map: std::sync::Mutex<std::collections::HashMap<PathBuf, (String, String)>>,
        hits: std::sync::atomic::AtomicUsize,
    }

    impl HashCache for MemCache {
        fn get(&self, path: &Path, key: &str) -> Option<String> {
            let m = self.map.lock().unwrap();
            let (k, h) = m.get(path)?;
            (k == key).then(|| {
                self.hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                h.clone()
            })
        }
        fn put(&self, path: &Path, key: &str, sha256: &str) {
            self.map
                .lock()
                .unwrap()
                .insert(path.to_path_buf(), (key.to_string(), sha256.to_string()));
        }
    }

    #[test]
    fn hash_cache_serves_unchanged_files_and_notices_changes() {
        let d = ctx();
        let src = d.path().join("src");
        let plain = manifest(&src, ".", &[]).unwrap();
        let hits = |c: &MemCache| c.hits.load(std::sync::atomic::Ordering::SeqCst);

        // Files changed in the last 2 s are never recorded (a write in the same clock tick
        // as our read would not show in their stat).
        let c = MemCache::default();
        assert_eq!(manifest_cached(&src, ".", &[], &c).unwrap(), plain);
        assert!(c.map.lock().unwrap().is_empty(), "fresh files recorded");

        RECENT_SECS.store(-1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(manifest_cached(&src, ".", &[], &c).unwrap(), plain);
        assert_eq!(c.map.lock().unwrap().len(), 2, "a.c and sub/run.sh");
        assert_eq!(manifest_cached(&src, ".", &[], &c).unwrap(), plain);
        assert_eq!(hits(&c), 2, "unchanged files come from the cache");

        // Same size, mtime put back: ctime still moves, so the file is read again.
        let a = src.join("a.c");
        let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
        std::fs::write(&a, "int b;\n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let m = manifest_cached(&src, ".", &[], &c).unwrap();
        RECENT_SECS.store(2, std::sync::atomic::Ordering::Relaxed);
        assert_ne!(m, plain);
        assert_eq!(m, manifest(&src, ".", &[]).unwrap());
        assert_eq!(hits(&c), 3, "only sub/run.sh from the cache");
    }

    #[test]
    fn globs_and_basenames_in_exclude() {
        let x = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(
            excluded(&x(&[".git"]), "a/.git", ".git"),
            "a basename at any depth"
        );
        assert!(!excluded(&x(&[".git"]), "a/.gitignore", ".gitignore"));
        assert!(excluded(&x(&["*.o"]), "src/lib/a.o", "a.o"));
        assert!(!excluded(&x(&["*.o"]), "src/lib/a.oc", "a.oc"));
        assert!(excluded(&x(&["build/*"]), "build/out", "out"));
        assert!(
            !excluded(&x(&["build/*"]), "src/build/out", "out"),
            "a path glob is anchored"
        );
        assert!(excluded(&x(&["mod0[1-3].c"]), "m/mod02.c", "mod02.c"));
        assert!(!excluded(&x(&["mod0[!1-3].c"]), "m/mod02.c", "mod02.c"));
        assert!(excluded(&x(&["?.tmp"]), "x.tmp", "x.tmp"));
        let d = ctx();
        let src = d.path().join("src");
        let m = manifest(&src, ".", &x(&["*.c", "sub/*"])).unwrap();
        let Manifest::Dir { entries, .. } = &m else {
            panic!()
        };
        let names: Vec<&str> = entries.iter().map(Manifest::path).collect();
        assert_eq!(names, [".git", "dirlink", "link", "sub"]);
        let Manifest::Dir { entries, .. } = &entries[3] else {
            panic!()
        };
        assert!(entries.is_empty(), "sub/* excluded");
    }

    #[test]
    fn the_execute_bit_is_part_of_the_key() {
        let d = ctx();
        let src = d.path().join("src");
        let before = manifest(&src, "a.c", &[]).unwrap();
        assert!(
            matches!(before, Manifest::File { .. }),
            "non-executable files keep OBuilder's form"
        );
        std::fs::set_permissions(src.join("a.c"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let after = manifest(&src, "a.c", &[]).unwrap();
        assert!(matches!(after, Manifest::Executable { .. }));
        assert_ne!(
            before.to_sexp().to_mach(),
            after.to_sexp().to_mach(),
            "chmod +x alone changes the key"
        );
    }

    #[test]
    fn long_names_and_many_files_hash_in_parallel() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let long = "n".repeat(150);
        std::fs::create_dir_all(src.join(&long)).unwrap();
        for i in 0..200 {
            std::fs::write(src.join(&long).join(format!("{long}{i}")), format!("{i}")).unwrap();
        }
        let m = manifest(&src, ".", &[]).unwrap();
        let text = m.to_sexp().to_mach();
        assert_eq!(text.matches("(File(").count(), 200);
        assert!(text.contains(&hex::encode(Sha256::digest(b"199"))));
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        write_into(&root, &src, &copy_op(vec![m], "/dst/").unwrap(), uid, gid).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("dst").join(&long).join(format!("{long}7"))).unwrap(),
            "7"
        );
    }

    #[test]
    fn copy_op_rules() {
        let f = || Manifest::File {
            path: "a".into(),
            sha256: "h".into(),
        };
        assert!(matches!(copy_op(vec![], "/x"), Err(CopyError::NoSources)));
        assert!(matches!(
            copy_op(vec![f(), f()], "/x"),
            Err(CopyError::MultipleNeedsDir)
        ));
        assert!(matches!(copy_op(vec![f()], "/x"), Ok(CopyOp::Item(..))));
        assert!(matches!(
            copy_op(vec![f(), f()], "/x/"),
            Ok(CopyOp::Items(..))
        ));
    }

    #[test]
    fn writes_stay_inside_the_root_even_through_symlinks() {
        let d = ctx();
        let src = d.path().join("src");
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        // A hostile image: /app points at an absolute host path.
        std::os::unix::fs::symlink(&outside, root.join("app")).unwrap();
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let op = copy_op(
            vec![manifest(&src, ".", &[".git".into()]).unwrap()],
            "/app/",
        )
        .unwrap();
        // Inside the root the link dangles: a clear error, and nothing written anywhere.
        let e = write_into(&root, &src, &op, uid, gid).unwrap_err();
        assert!(
            e.to_string().contains("cannot create directory") && e.to_string().contains("/app"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing may land outside the root"
        );
        // `/app` -> `<outside>` resolved inside the root is `<root>/<outside>`.
        let landed = root.join(outside.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&landed).unwrap();
        write_into(&root, &src, &op, uid, gid).unwrap();
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing may land outside the root"
        );
        assert_eq!(
            std::fs::read_to_string(landed.join("a.c")).unwrap(),
            "int a;\n"
        );
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&landed.join("a.c")), 0o644);
        assert_eq!(mode(&landed.join("sub/run.sh")), 0o755);
        assert_eq!(mode(&landed.join("sub")), 0o755);
        assert_eq!(
            std::fs::read_link(landed.join("link")).unwrap(),
            Path::new("a.c")
        );

        // A single file copied as a new name, parents created.
        let op = copy_op(vec![manifest(&src, "a.c", &[]).unwrap()], "/opt/deep/b.c").unwrap();
        write_into(&root, &src, &op, uid, gid).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("opt/deep/b.c")).unwrap(),
            "int a;\n"
        );
        // Copying again over existing files works (tar semantics).
        write_into(&root, &src, &op, uid, gid).unwrap();
    }
}
