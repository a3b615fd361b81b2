//! Extracting image layers (tar, optionally gzip or zstd) into a root filesystem.
//!
//! Every path is resolved inside the root (`obuilder_engine::confined`): an absolute
//! symlink in the image (Debian's `/var/run -> /run`) resolves inside the rootfs as it would
//! in the container, and a malicious layer with `../` paths or symlinks pointing out can never
//! write to the host. OCI whiteouts are applied (`.wh.NAME` deletes NAME, `.wh..wh..opq`
//! empties its directory); hard links, symlinks, devices, fifos, ownership, modes (incl.
//! set-id bits), mtimes and xattrs (where the filesystem allows) are kept.

use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::path::{Component, Path};

use obuilder_engine::confined::{self, ConfinedRoot, Follow, Owner};
use rustix::fs::{AtFlags, Mode};

/// A layer that cannot be extracted.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("{what} {path}: {source}")]
    Io {
        what: String,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Bad(String),
}

fn io_err(what: &str, path: &str) -> impl FnOnce(io::Error) -> ExtractError {
    let (what, path) = (what.to_string(), path.to_string());
    move |source| ExtractError::Io { what, path, source }
}

fn errno(what: &str, path: &str) -> impl FnOnce(rustix::io::Errno) -> ExtractError {
    let f = io_err(what, path);
    move |e| f(e.into())
}

/// Wraps a reader, decompressing gzip or zstd if its first bytes say so.
pub fn decompress<'a>(r: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(256 * 1024, r);
    let head = br.fill_buf()?.to_vec();
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(br))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(br)?)
    } else {
        Box::new(br)
    })
}

/// Normalises an archive path to components relative to the root; `..` is refused.
fn clean(path: &Path) -> Result<Vec<String>, ExtractError> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(
                n.to_str()
                    .ok_or_else(|| {
                        ExtractError::Bad(format!("path {} is not UTF-8", path.display()))
                    })?
                    .to_string(),
            ),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                return Err(ExtractError::Bad(format!(
                    "refusing entry {}: `..` in a layer path would write outside the root",
                    path.display()
                )))
            }
            Component::Prefix(_) => {
                return Err(ExtractError::Bad(format!("bad path {}", path.display())))
            }
        }
    }
    Ok(out)
}

struct Root {
    tree: ConfinedRoot,
    /// The last parent directory opened, by path: layers list a directory's entries
    /// together, so most entries reuse it. Creating a new name never changes what an
    /// existing path resolves to; anything that removes one calls `invalidate`.
    last: std::cell::RefCell<Option<(Vec<String>, std::rc::Rc<OwnedFd>)>>,
}

impl Root {
    fn invalidate(&self) {
        self.last.borrow_mut().take();
    }

    /// [`Root::parent`], reusing the last one when it is the same directory.
    fn parent_cached(&self, parts: &[String]) -> Result<std::rc::Rc<OwnedFd>, ExtractError> {
        let dir = &parts[..parts.len() - 1];
        if let Some((p, fd)) = &*self.last.borrow() {
            if p.as_slice() == dir {
                return Ok(fd.clone());
            }
        }
        let fd = std::rc::Rc::new(self.parent(parts)?);
        *self.last.borrow_mut() = Some((dir.to_vec(), fd.clone()));
        Ok(fd)
    }

    fn open_dir(&self, parts: &[String]) -> Result<OwnedFd, ExtractError> {
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.tree.dir_parts(&refs, Follow::InRoot).map_err(io_err(
            "cannot open directory",
            &format!("/{}", parts.join("/")),
        ))
    }

    /// Opens the parent of `parts`, creating missing directories (0755, root) on the way.
    fn parent(&self, parts: &[String]) -> Result<OwnedFd, ExtractError> {
        let parent = &parts[..parts.len() - 1];
        match self.open_dir(parent) {
            Ok(fd) => Ok(fd),
            Err(_) => {
                let shown = format!("/{}", parent.join("/"));
                self.tree
                    .create_dirs(&shown, 0o755, None)
                    .map_err(io_err("cannot create directory", &shown))
            }
        }
    }
}

/// Removes `name` in `dir`, recursively if it is a directory.
fn remove_at(dir: &OwnedFd, name: &str, shown: &str) -> Result<(), ExtractError> {
    confined::remove_at(dir, name).map_err(io_err("cannot remove", shown))
}

/// Removes everything inside a directory.
fn clear_dir(dir: &OwnedFd, shown: &str) -> Result<(), ExtractError> {
    confined::clear_dir(dir).map_err(io_err("cannot clear", shown))
}

/// Extracts one layer into `rootfs`. Blocking.
pub fn extract_layer(rootfs: &Path, layer: impl Read + Send) -> Result<(), ExtractError> {
    // Decompression runs on its own thread, ahead of the file writes: on a gzip layer the
    // two cost about the same, so the pipeline nearly halves the wall time.
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(8);
        s.spawn(move || {
            let mut r = match decompress(layer) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0;
                // Fill the chunk (a decoder returns little at a time).
                while n < buf.len() {
                    match r.read(&mut buf[n..]) {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                if n == 0 {
                    return; // end: dropping tx ends the reader
                }
                buf.truncate(n);
                if tx.send(Ok(buf)).is_err() {
                    return; // the extractor stopped
                }
            }
        });
        // A closed channel is the end; an error the thread sent is the reader's error.
        extract_from(
            rootfs,
            ChunkReader::new(move || rx.recv().map_or(Ok(None), |c| c.map(Some))),
        )
    })
}

/// A reader over the chunks `next` hands out (`Ok(None)` at the end): what a decompression
/// thread or a download sends through a channel.
pub(crate) struct ChunkReader<F> {
    next: F,
    cur: Vec<u8>,
    pos: usize,
}

impl<F: FnMut() -> io::Result<Option<Vec<u8>>>> ChunkReader<F> {
    pub(crate) fn new(next: F) -> Self {
        ChunkReader {
            next,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl<F: FnMut() -> io::Result<Option<Vec<u8>>>> Read for ChunkReader<F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match (self.next)()? {
                Some(chunk) => {
                    self.cur = chunk;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn extract_from(rootfs: &Path, reader: impl Read) -> Result<(), ExtractError> {
    let tree =
        ConfinedRoot::open(rootfs).map_err(io_err("cannot open", &rootfs.display().to_string()))?;
    let root = Root {
        tree,
        last: Default::default(),
    };
    let mut archive = tar::Archive::new(reader);
    // Directory times are set after their contents, as tar does.
    let mut dir_times: Vec<(Vec<String>, i64)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(io_err("cannot read layer", "-"))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| ExtractError::Bad(format!("truncated or corrupt layer: {e}")))?;
        let path = entry
            .path()
            .map_err(io_err("bad entry path", "-"))?
            .into_owned();
        let parts = clean(&path)?;
        let shown = format!("/{}", parts.join("/"));
        let Some(name) = parts.last().cloned() else {
            continue; // the root itself
        };
        // Whiteouts.
        if name == ".wh..wh..opq" {
            root.invalidate();
            let dir = root.open_dir(&parts[..parts.len() - 1])?;
            clear_dir(&dir, &shown)?;
            continue;
        }
        if let Some(target) = name.strip_prefix(".wh.") {
            root.invalidate();
            let dir = root.parent(&parts)?;
            remove_at(&dir, target, &shown)?;
            continue;
        }
        let h = entry.header().clone();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32);
        let mtime = h.mtime().unwrap_or(0) as i64;
        let parent = root.parent_cached(&parts)?;
        let parent = &*parent;
        let kind = h.entry_type();
        let owner = |fd_name: &str| {
            confined::chown_at(parent, fd_name, Owner { uid, gid })
                .map_err(io_err("cannot chown", &shown))
        };
        if kind.is_dir() {
            match rustix::fs::mkdirat(parent, name.as_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => {
                    // A non-directory in the way is replaced; a directory is kept (merged).
                    let st = rustix::fs::statat(parent, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(errno("cannot stat", &shown))?;
                    if rustix::fs::FileType::from_raw_mode(st.st_mode)
                        != rustix::fs::FileType::Directory
                    {
                        root.invalidate();
                        remove_at(parent, &name, &shown)?;
                        rustix::fs::mkdirat(parent, name.as_str(), Mode::from_raw_mode(0o700))
                            .map_err(errno("cannot create directory", &shown))?;
                    }
                }
                Err(e) => return Err(errno("cannot create directory", &shown)(e)),
            }
            owner(&name)?;
            rustix::fs::chmodat(
                parent,
                name.as_str(),
                Mode::from_raw_mode(mode as rustix::fs::RawMode),
                AtFlags::empty(),
            )
            .map_err(errno("cannot chmod", &shown))?;
            set_xattrs(&mut entry, parent, &name, &shown);
            dir_times.push((parts, mtime));
            continue;
        }
        // Anything else replaces what is there (a directory too, as tar does).
        let replacing = |what: &str, op: &mut dyn FnMut() -> rustix::io::Result<()>| match op() {
            Err(rustix::io::Errno::EXIST) => {
                root.invalidate();
                remove_at(parent, &name, &shown)?;
                op().map_err(errno(what, &shown))
            }
            r => r.map_err(errno(what, &shown)),
        };
        if kind.is_file() || kind == tar::EntryType::Continuous {
            let mut fd = None;
            replacing("cannot create", &mut || {
                fd = Some(confined::create_file_at(parent, &name, 0o600).map_err(|e| {
                    rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)
                })?);
                Ok(())
            })?;
            let Some(mut f) = fd else {
                continue;
            };
            io::copy(&mut entry, &mut f).map_err(|e| {
                ExtractError::Bad(format!("truncated layer while writing {shown}: {e}"))
            })?;
            rustix::fs::fchown(
                &f,
                Some(rustix::fs::Uid::from_raw(uid)),
                Some(rustix::fs::Gid::from_raw(gid)),
            )
            .map_err(errno("cannot chown", &shown))?;
            rustix::fs::fchmod(&f, Mode::from_raw_mode(mode as rustix::fs::RawMode))
                .map_err(errno("cannot chmod", &shown))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| ExtractError::Bad(format!("symlink {shown} has no target")))?;
            replacing("cannot create symlink", &mut || {
                confined::symlink_at(parent, &name, &target).map_err(|e| {
                    rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO)
                })
            })?;
            owner(&name)?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(io_err("bad link", &shown))?
                .ok_or_else(|| ExtractError::Bad(format!("hard link {shown} has no target")))?;
            let tparts = clean(&target)?;
            if tparts.is_empty() {
                return Err(ExtractError::Bad(format!(
                    "hard link {shown} points at the root"
                )));
            }
            let tdir = root.open_dir(&tparts[..tparts.len() - 1])?;
            let tname = tparts.last().cloned().unwrap_or_default();
            replacing(
                &format!("cannot hard-link /{} to", tparts.join("/")),
                &mut || {
                    rustix::fs::linkat(
                        &tdir,
                        tname.as_str(),
                        parent,
                        name.as_str(),
                        AtFlags::empty(),
                    )
                },
            )?;
            continue; // the link shares the target's metadata
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let (major, minor) = (
                h.device_major().ok().flatten().unwrap_or(0),
                h.device_minor().ok().flatten().unwrap_or(0),
            );
            replacing("cannot create device", &mut || {
                crate::special::make_node(parent, &name, kind, mode, major, minor)
            })?;
            owner(&name)?;
            rustix::fs::chmodat(
                parent,
                name.as_str(),
                Mode::from_raw_mode(mode as rustix::fs::RawMode),
                AtFlags::empty(),
            )
            .map_err(errno("cannot chmod", &shown))?;
        } else {
            tracing::debug!("skipping {shown}: entry type {kind:?}");
            continue;
        }
        if !kind.is_symlink() {
            set_xattrs(&mut entry, parent, &name, &shown);
        }
        let _ = confined::set_mtime_at(parent, &name, mtime, 0);
    }
    for (parts, mtime) in dir_times.into_iter().rev() {
        if let Some((name, dir)) = parts.split_last() {
            if let Ok(p) = root.open_dir(dir) {
                let _ = confined::set_mtime_at(&p, name, mtime, 0);
            }
        }
    }
    Ok(())
}

/// Applies `SCHILY.xattr.*` PAX records to `name` in `dir`; a filesystem that refuses them
/// is not an error.
fn set_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, dir: &OwnedFd, name: &str, shown: &str) {
    let Ok(Some(exts)) = entry.pax_extensions() else {
        return;
    };
    let mut attrs = Vec::new();
    for e in exts.flatten() {
        if let Ok(k) = e.key() {
            if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                attrs.push((name.to_string(), e.value_bytes().to_vec()));
            }
        }
    }
    for (k, v) in attrs {
        if let Err(e) = crate::special::set_xattr_at(dir, name, &k, &v) {
            tracing::debug!("xattr {k} on {shown}: {e}");
        }
    }
}
