//! A directory tree that must be written as if it were `/`: a step's snapshot, an image's
//! root filesystem. Every write the builder makes into a tree that a step or an image
//! controls goes through here, never through a host path string, so that no symlink in
//! the tree can make the builder create, change or delete a file outside it.
//!
//! Paths are container paths (`/usr/lib/x`); they are resolved one way or the other:
//!
//! * [`Follow::InRoot`]: symlinks are followed as the container would follow them, with
//!   the tree as `/` (an absolute target, or `..` past the top, stays inside). `copy` and
//!   layer extraction write this way, as `tar` would inside the container.
//! * [`Follow::Never`]: any symlink on the way is an error (`ELOOP`). Clean-up of what the
//!   builder itself made (mount points) resolves this way: after a step ran, a symlink
//!   where a directory was is the step's doing and must not be followed.
//!
//! Two resolvers give the same answers: `openat2(RESOLVE_IN_ROOT)` on Linux (one system
//! call, race-free against concurrent renames), and a portable component walk with
//! `O_NOFOLLOW` everywhere else (and on Linux kernels older than 5.6). Both are tested on
//! Linux against the same escape cases. The walk holds a descriptor per level and never
//! opens `..`, so it cannot climb out; it reads each symlink and resolves it itself.
//!
//! Callers work on a parent directory descriptor and a final name with the `*at` calls
//! below, which never follow a symlink in the final component either.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Gid, Mode, OFlags, Timespec, Timestamps, Uid};

#[cfg(target_os = "linux")]
mod linux;
mod walk;

/// How symlinks met while resolving a path are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// As the container would, with the tree as `/`.
    InRoot,
    /// Not at all: a symlink anywhere on the way is `ELOOP`.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolver {
    #[cfg(target_os = "linux")]
    Openat2,
    Walk,
}

/// A directory tree, opened once, written through descriptors confined to it.
#[derive(Debug)]
pub struct ConfinedRoot {
    fd: OwnedFd,
    path: PathBuf,
    resolver: Resolver,
}

/// The components of a container path: empty and `.` parts dropped; `..` kept (each
/// resolver keeps it inside the tree).
pub fn components(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect()
}

/// An owner to give to what is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl ConfinedRoot {
    /// Opens `path` as the tree's root, with the fastest resolver this system has.
    pub fn open(path: &Path) -> io::Result<ConfinedRoot> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        #[cfg(target_os = "linux")]
        let resolver = if linux::available() {
            Resolver::Openat2
        } else {
            Resolver::Walk
        };
        #[cfg(not(target_os = "linux"))]
        let resolver = Resolver::Walk;
        Ok(ConfinedRoot {
            fd,
            path: path.to_path_buf(),
            resolver,
        })
    }

    /// Opens `path` with the portable component walk whatever the system (for tests that
    /// hold both resolvers to the same cases).
    pub fn open_portable(path: &Path) -> io::Result<ConfinedRoot> {
        let mut r = ConfinedRoot::open(path)?;
        r.resolver = Resolver::Walk;
        Ok(r)
    }

    /// The tree's root on the host, for messages only: never open a path built from it.
    pub fn host_path(&self) -> &Path {
        &self.path
    }

    /// Where a container path would be on the host if nothing on the way were a symlink:
    /// for error messages only.
    pub fn shown(&self, path: &str) -> PathBuf {
        self.path.join(path.trim_start_matches('/'))
    }

    /// The root directory itself.
    pub fn root_fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Opens directory `path` of the tree.
    pub fn dir(&self, path: &str, follow: Follow) -> io::Result<OwnedFd> {
        self.dir_parts(&components(path), follow)
    }

    /// Opens the directory made of `parts` (as split by [`components`]).
    pub fn dir_parts(&self, parts: &[&str], follow: Follow) -> io::Result<OwnedFd> {
        match self.resolver {
            #[cfg(target_os = "linux")]
            Resolver::Openat2 => linux::open_dir(&self.fd, parts, follow),
            Resolver::Walk => walk::open_dir(&self.fd, parts, follow),
        }
    }

    /// Opens the parent directory of `path` and returns it with the final name. `None`
    /// for the root itself (which has no name).
    pub fn parent(&self, path: &str, follow: Follow) -> io::Result<Option<(OwnedFd, String)>> {
        let parts = components(path);
        let Some((name, dir)) = parts.split_last() else {
            return Ok(None);
        };
        if *name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: a path ending in `..` names no entry"),
            ));
        }
        Ok(Some((self.dir_parts(dir, follow)?, name.to_string())))
    }

    /// `mkdir -p` inside the tree, following symlinks in it as the container would:
    /// directories that exist are kept as they are; new ones get `mode` and `owner`.
    /// Returns the final directory.
    pub fn create_dirs(&self, path: &str, mode: u32, owner: Option<Owner>) -> io::Result<OwnedFd> {
        let parts = components(path);
        if let Ok(fd) = self.dir_parts(&parts, Follow::InRoot) {
            return Ok(fd);
        }
        let mut cur = rustix::fs::openat(
            &self.fd,
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        for (i, part) in parts.iter().enumerate() {
            if *part != ".." {
                match rustix::fs::mkdirat(
                    &cur,
                    *part,
                    Mode::from_raw_mode(mode as rustix::fs::RawMode),
                ) {
                    Ok(()) => {
                        if let Some(o) = owner {
                            chown_at(&cur, part, o)?;
                        }
                        // mkdir is subject to the umask: set the mode asked for.
                        rustix::fs::chmodat(
                            &cur,
                            *part,
                            Mode::from_raw_mode(mode as rustix::fs::RawMode),
                            AtFlags::empty(),
                        )?;
                    }
                    Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            // Re-resolve from the root: the part may be a symlink (followed in the tree).
            cur = self.dir_parts(&parts[..=i], Follow::InRoot)?;
        }
        Ok(cur)
    }
}

/// Sets the owner of `name` in `dir` (a symlink itself, not its target).
pub fn chown_at(dir: &impl AsFd, name: &str, owner: Owner) -> io::Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(Uid::from_raw(owner.uid)),
        Some(Gid::from_raw(owner.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(Into::into)
}

/// Sets the access and modification times of `name` in `dir` (not following a symlink).
pub fn set_mtime_at(dir: &impl AsFd, name: &str, secs: i64, nanos: i64) -> io::Result<()> {
    let t = Timespec {
        tv_sec: secs,
        tv_nsec: nanos as _,
    };
    rustix::fs::utimensat(
        dir,
        name,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(Into::into)
}

/// Creates regular file `name` in `dir` exclusively (never through a symlink), with
/// `mode` (not yet owner-adjusted: call `fchown` then `fchmod` on it).
pub fn create_file_at(dir: &impl AsFd, name: &str, mode: u32) -> io::Result<std::fs::File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode as rustix::fs::RawMode),
    )?;
    Ok(std::fs::File::from(fd))
}

/// Creates symlink `name` in `dir` pointing at `target` (stored as it is; never followed).
pub fn symlink_at(dir: &impl AsFd, name: &str, target: &[u8]) -> io::Result<()> {
    rustix::fs::symlinkat(OsStr::from_bytes(target), dir, name).map_err(Into::into)
}

/// What `name` in `dir` is, without following it; `None` if it does not exist.
pub fn kind_at(dir: &impl AsFd, name: &str) -> io::Result<Option<(rustix::fs::FileType, u64)>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some((
            rustix::fs::FileType::from_raw_mode(st.st_mode),
            st.st_size as u64,
        ))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` in `dir`, recursively if it is a directory, never following a symlink
/// (a symlink is removed, not what it points at). A missing name is fine.
pub fn remove_at(dir: &impl AsFd, name: &str) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        // Linux says EISDIR for a directory; POSIX allows EPERM (macOS says so).
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {
            let sub = rustix::fs::openat(
                dir,
                name,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            clear_dir(&sub)?;
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    }
}

/// Removes everything inside directory `dir` (see [`remove_at`]).
pub fn clear_dir(dir: &impl AsFd) -> io::Result<()> {
    let mut names = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(String::from_utf8_lossy(n).into_owned());
        }
    }
    for n in names {
        remove_at(dir, &n)?;
    }
    Ok(())
}

/// Removes what the builder made for a mount at `target` (a container path) after the
/// step: `made` lists the components it created, outermost first (from
/// [`missing_components`]). The innermost is removed if it is an empty file or an empty
/// directory, then each directory above it if empty. Every path is resolved with
/// [`Follow::Never`]: if the step put a symlink anywhere on the way, nothing past it is
/// touched (it may point at the host).
pub fn remove_made(root: &ConfinedRoot, made: &[String]) {
    for (i, p) in made.iter().enumerate().rev() {
        let Ok(Some((dir, name))) = root.parent(p, Follow::Never) else {
            continue;
        };
        match kind_at(&dir, &name) {
            Ok(Some((rustix::fs::FileType::RegularFile, 0))) if i + 1 == made.len() => {
                let _ = rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty());
            }
            Ok(Some((rustix::fs::FileType::Directory, _))) => {
                // Only if empty: rmdir refuses otherwise.
                let _ = rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::REMOVEDIR);
            }
            _ => {}
        }
    }
}

/// The components of `target` (a container path) that do not exist in the tree yet, as
/// container paths, outermost first. Stops at a symlink or anything that is not a
/// directory: what is beyond is not ours to create or remove.
pub fn missing_components(root: &ConfinedRoot, target: &str) -> Vec<String> {
    let parts = components(target);
    if parts.contains(&"..") {
        return Vec::new();
    }
    let mut out = Vec::new();
    for i in 0..parts.len() {
        let path = format!("/{}", parts[..=i].join("/"));
        if !out.is_empty() {
            out.push(path);
            continue;
        }
        let Ok(dir) = root.dir_parts(&parts[..i], Follow::Never) else {
            return Vec::new();
        };
        match kind_at(&dir, parts[i]) {
            Ok(None) => out.push(path),
            Ok(Some((rustix::fs::FileType::Directory, _))) => {}
            Ok(Some(_)) if i + 1 == parts.len() => {}
            _ => return Vec::new(),
        }
    }
    out
}

#[cfg(test)]
mod tests;
