//! The FUSE filesystem: every operation is done on the caller's view (see `resolve`),
//! through file descriptors opened beneath the view's root without following symlinks,
//! so that nothing a caller can put in its tree makes the daemon (root) touch a file
//! outside it.
//!
//! * Inodes are (view root, path in it): a caller's files have inode numbers of their own,
//!   so the kernel's caches (dentries, attributes, page cache) never give one caller
//!   another's data. The mount's root is the one inode every caller shares: its entries
//!   and its own attributes are never cached (timeout 0), so each path walk asks again
//!   which view the caller's first name is in, and follows the scoreboard as it changes.
//!   Below that first name every directory is one view's, reached only through it, so
//!   its entries and every other inode's attributes are cached for [`TTL`] (a `stat` of
//!   `~/a/b/c` asks three times, about the root and `a`, not seven). A view's tree replaced by a new one at the
//!   same path (a build step run again) is told by its root's identity: the old tree's
//!   inodes are then stale, and the new one's get new numbers.
//! * The kernel checks permissions (`default_permissions`) against the owners and modes
//!   shown; what a caller creates is owned by the caller. With an `owner` (the uid the
//!   stored trees belong to), files of that uid are shown as the caller's, and what a
//!   caller creates or takes is stored as that uid's: a tree made by one build user is
//!   then every build user's own, and a result can go on as another user. The mount's
//!   root, the one inode all callers share, shows its owner's rights to its group too
//!   (see `shown`).
//! * An inode may only be used by a caller whose view it belongs to (else `EACCES`): a
//!   build user cannot reach another's files through a handle kept from before. (What the
//!   kernel holds for a second below the first level, names and attributes, it answers
//!   without asking: a process given another view's directory fd, by a process of that
//!   view, can `stat` the names the kernel holds under it; opening, reading and listing
//!   still ask, and are refused.)
//! * Devices cannot be created (the daemon is root; its callers are not).

// `stat`'s fields and `mode_t` differ in width between Linux and macOS: the casts that
// are no-ops here are not there.
#![allow(clippy::unnecessary_cast)]

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;

#[cfg(target_os = "linux")]
use crate::linux as sys;
#[cfg(not(target_os = "linux"))]
use crate::portable as sys;
use crate::resolve::{self, Views};

/// How long the kernel may keep an entry below the first level, or an attribute of an
/// inode other than the root (see the module's doc).
const TTL: Duration = Duration::from_secs(1);
/// For the root's entries and attributes, which every caller shares: never kept.
const NO_TTL: Duration = Duration::ZERO;

/// The timeout of an entry in directory `parent`.
fn entry_ttl(parent: u64) -> &'static Duration {
    if parent == ROOT {
        &NO_TTL
    } else {
        &TTL
    }
}

/// The timeout of inode `ino`'s attributes.
fn attr_ttl(ino: u64) -> &'static Duration {
    if ino == ROOT {
        &NO_TTL
    } else {
        &TTL
    }
}
const ROOT: u64 = fuser::FUSE_ROOT_ID;

struct Node {
    root: PathBuf,
    rel: PathBuf,
    lookups: u64,
}

struct DirHandle {
    entries: Vec<(u64, FileType, OsString)>,
}

pub struct ObuilderFs<V: Views> {
    views: V,
    fallback: PathBuf,
    nodes: HashMap<u64, Node>,
    by_path: HashMap<(PathBuf, PathBuf), u64>,
    /// Each view root's identity (device, inode) when its inodes were given out: another
    /// tree at the same path makes them stale.
    roots: HashMap<PathBuf, (u64, u64)>,
    next_ino: u64,
    files: HashMap<u64, (PathBuf, std::fs::File)>,
    /// Passthrough (Linux 6.9+): each open regular file is read and written by the kernel
    /// straight from the stored file, with no request to the daemon.
    #[cfg(target_os = "linux")]
    passthrough: Option<Passthrough>,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    want_passthrough: bool,
    dirs: HashMap<u64, DirHandle>,
    next_fh: u64,
    /// The kernel drops a file's cached pages when its mtime or size changes, so they
    /// may be kept across opens.
    keep_cache: bool,
    /// The uid stored trees belong to, shown to each caller as its own.
    owner: Option<u32>,
}

/// The stored files that open inodes are passed through to.
///
/// The kernel allows one backing file per inode at a time (a second one makes the open
/// fail with EIO), and an inode open in passthrough mode cannot also be open in caching
/// mode. So every open of an inode shares one backing file, registered at its first open
/// and let go at its last release, and files are never opened in caching mode: `create`
/// is declined (the kernel then makes the file with `mknod` and opens it with `open`).
#[cfg(target_os = "linux")]
#[derive(Default)]
struct Passthrough {
    /// Inode -> its backing file, whether that was opened for writing, and how many of
    /// the daemon's handles use it.
    backing: HashMap<u64, (fuser::BackingId, bool, u64)>,
    /// Handle -> the inode whose backing file it uses.
    users: HashMap<u64, u64>,
}

/// `FUSE_PASSTHROUGH` (protocol 7.40).
#[cfg(target_os = "linux")]
const PASSTHROUGH: u64 = 1 << 37;
/// `FOPEN_DIRECT_IO`: this handle neither caches nor passes through (see `open`).
#[cfg(target_os = "linux")]
const DIRECT_IO: u32 = 1 << 0;

/// `FUSE_AUTO_INVAL_DATA` (protocol 7.20): cached pages go when mtime or size change.
const AUTO_INVAL_DATA: u64 = 1 << 12;
/// `FOPEN_KEEP_CACHE`: an open does not drop the file's cached pages.
const KEEP_CACHE: u32 = 1 << 1;

fn err(e: Errno) -> i32 {
    e.raw_os_error()
}

fn io_err(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT as u32 {
        m if m == libc::S_IFDIR as u32 => FileType::Directory,
        m if m == libc::S_IFLNK as u32 => FileType::Symlink,
        m if m == libc::S_IFIFO as u32 => FileType::NamedPipe,
        m if m == libc::S_IFSOCK as u32 => FileType::Socket,
        m if m == libc::S_IFCHR as u32 => FileType::CharDevice,
        m if m == libc::S_IFBLK as u32 => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, st: &rustix::fs::Stat) -> FileAttr {
    let mode = st.st_mode as u32;
    FileAttr {
        ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime as i64, st.st_atime_nsec as i64),
        mtime: time(st.st_mtime as i64, st.st_mtime_nsec as i64),
        ctime: time(st.st_ctime as i64, st.st_ctime_nsec as i64),
        crtime: time(st.st_ctime as i64, st.st_ctime_nsec as i64),
        kind: kind_of(mode),
        perm: (mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn timestamp(t: Option<TimeOrNow>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            Timespec {
                tv_sec: d.as_secs() as _,
                tv_nsec: d.subsec_nanos() as _,
            }
        }
    }
}

/// Answers a call whose reply is empty.
fn answer_empty(r: Result<(), i32>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

/// Answers a call that makes or finds an entry in directory `parent`.
fn answer_entry(parent: u64, r: Result<FileAttr, i32>, reply: ReplyEntry) {
    match r {
        Ok(a) => reply.entry(entry_ttl(parent), &a, 0),
        Err(e) => reply.error(e),
    }
}

/// Answers `getxattr`/`listxattr`: the size wanted (`size` 0) or the bytes.
fn xattr_reply(
    fd: Result<OwnedFd, i32>,
    size: u32,
    reply: ReplyXattr,
    get: impl FnOnce(&OwnedFd, &mut [u8]) -> Result<usize, Errno>,
) {
    let mut buf = vec![0u8; size as usize];
    match fd.and_then(|fd| get(&fd, &mut buf[..]).map_err(err)) {
        Ok(n) if size == 0 => reply.size(n as u32),
        Ok(n) => reply.data(&buf[..n]),
        Err(e) => reply.error(e),
    }
}

/// (parent, name) of a path in a view; the root has no parent.
fn split(rel: &Path) -> Option<(&Path, &OsStr)> {
    Some((rel.parent()?, rel.file_name()?))
}

impl<V: Views> ObuilderFs<V> {
    pub fn new(views: V, fallback: PathBuf) -> ObuilderFs<V> {
        ObuilderFs {
            views,
            fallback,
            nodes: HashMap::new(),
            by_path: HashMap::new(),
            roots: HashMap::new(),
            next_ino: ROOT + 1,
            files: HashMap::new(),
            #[cfg(target_os = "linux")]
            passthrough: None,
            want_passthrough: true,
            dirs: HashMap::new(),
            next_fh: 1,
            keep_cache: false,
            owner: None,
        }
    }

    /// Files of uid `owner` are shown to every caller as its own, and what a caller
    /// creates (or `chown`s to itself) is stored as `owner`'s.
    pub fn with_owner(mut self, owner: Option<u32>) -> ObuilderFs<V> {
        self.owner = owner;
        self
    }

    /// Whether to pass open files through to the stored ones when the kernel can (Linux
    /// only; the default).
    pub fn with_passthrough(mut self, on: bool) -> ObuilderFs<V> {
        self.want_passthrough = on;
        self
    }

    /// Attributes as `req`'s caller sees them.
    fn shown(&self, req: &Request<'_>, mut a: FileAttr) -> FileAttr {
        if self.owner == Some(a.uid) && req.uid() != 0 {
            a.uid = req.uid();
            // The root is one kernel inode for all callers, holding the attributes of the
            // last one asked for: the kernel may check one build user's write into the
            // home against another's owner (seen: `Permission denied` on `~/x` while
            // another user's step ran). The owner's rights are shown to the group as well
            // (the build users'), so that the check comes out the same whichever caller's
            // attributes the kernel holds.
            if a.ino == ROOT {
                a.perm |= (a.perm & 0o700) >> 3;
            }
        }
        a
    }

    /// The uid stored for a file the caller gives to `uid`.
    fn stored_uid(&self, req: &Request<'_>, uid: u32) -> u32 {
        match self.owner {
            Some(o) if uid == req.uid() && uid != 0 => o,
            _ => uid,
        }
    }

    fn view(&self, req: &Request<'_>) -> PathBuf {
        resolve::view_root(&self.views, &self.fallback, req.uid())
    }

    /// A view's root, opened afresh for each operation: a kept descriptor would pin a
    /// finished step's tree (an overlay mount could not be unmounted) and would still name
    /// the old directory once a new one is made at the same path.
    fn root_fd(&mut self, root: &Path) -> Result<OwnedFd, i32> {
        rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)
    }

    /// The view and path of an inode, for this caller.
    fn locate(&mut self, req: &Request<'_>, ino: u64) -> Result<(PathBuf, PathBuf), i32> {
        let (view, id) = resolve::view_root_with_id(&self.views, &self.fallback, req.uid());
        self.check_root(&view, id);
        if ino == ROOT {
            return Ok((view, PathBuf::new()));
        }
        let n = self.nodes.get(&ino).ok_or(libc::ESTALE)?;
        if n.root.as_os_str().as_encoded_bytes().starts_with(b"\0") {
            return Err(libc::ESTALE);
        }
        if n.root != view {
            return Err(libc::EACCES);
        }
        Ok((n.root.clone(), n.rel.clone()))
    }

    /// Makes the inodes of `root` stale if another tree is there now than when they were
    /// given out (a step's tree made again at the same path): the kernel may keep them
    /// (their entries and attributes), and must not see the new tree's files through them.
    /// `id` is the root's identity if the caller has it already.
    fn check_root(&mut self, root: &Path, id: Option<(u64, u64)>) {
        let id = match id {
            Some(id) => id,
            None => match rustix::fs::stat(root) {
                Ok(st) => (st.st_dev as u64, st.st_ino as u64),
                Err(_) => return,
            },
        };
        if self.roots.len() > 4096 && !self.roots.contains_key(root) {
            // Forget the roots no inode is left of (finished steps' trees).
            let live: std::collections::HashSet<&PathBuf> =
                self.nodes.values().map(|n| &n.root).collect();
            self.roots.retain(|r, _| live.contains(r));
        }
        match self.roots.get_mut(root) {
            Some(old) if *old == id => return,
            Some(old) => *old = id,
            None => {
                self.roots.insert(root.to_path_buf(), id);
                return;
            }
        }
        tracing::info!(
            "{} is another tree now: its old inodes are stale",
            root.display()
        );
        self.by_path.retain(|(r, _), _| r != root);
        for n in self.nodes.values_mut() {
            if n.root == root {
                n.root = PathBuf::from("\0stale");
            }
        }
    }

    /// A directory of a view, opened beneath its root.
    fn open_dir(&mut self, root: &Path, rel: &Path) -> Result<OwnedFd, i32> {
        let r = self.root_fd(root)?;
        sys::open_dir_beneath(&r, rel).map_err(err)
    }

    /// The directory holding an inode, and its name in it.
    fn parent_of(&mut self, root: &Path, rel: &Path) -> Result<(OwnedFd, OsString), i32> {
        let (parent, name) = split(rel).ok_or(libc::EPERM)?;
        let name = name.to_os_string();
        Ok((self.open_dir(root, parent)?, name))
    }

    fn fresh_fh(&mut self) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        fh
    }

    fn intern(&mut self, root: &Path, rel: PathBuf) -> u64 {
        let key = (root.to_path_buf(), rel);
        if let Some(ino) = self.by_path.get(&key) {
            let ino = *ino;
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.lookups += 1;
            }
            return ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                root: key.0.clone(),
                rel: key.1.clone(),
                lookups: 1,
            },
        );
        self.by_path.insert(key, ino);
        ino
    }

    fn stat_ino(&mut self, root: &Path, rel: &Path, ino: u64) -> Result<FileAttr, i32> {
        let st = match split(rel) {
            None => rustix::fs::fstat(&self.root_fd(root)?).map_err(err)?,
            Some(_) => {
                let (dir, name) = self.parent_of(root, rel)?;
                rustix::fs::statat(&dir, &name, AtFlags::SYMLINK_NOFOLLOW).map_err(err)?
            }
        };
        Ok(attr(ino, &st))
    }

    /// A new entry `name` in directory `parent`: made by `make` (in the parent's fd), then
    /// given to the caller, and looked up.
    fn make_entry(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(&OwnedFd, &OsStr) -> Result<(), Errno>,
    ) -> Result<FileAttr, i32> {
        if !resolve::valid_name(name) {
            return Err(libc::EINVAL);
        }
        let (root, rel) = self.locate(req, parent)?;
        let dir = self.open_dir(&root, &rel)?;
        make(&dir, name).map_err(err)?;
        let owner = (
            Some(rustix::fs::Uid::from_raw(self.stored_uid(req, req.uid()))),
            Some(rustix::fs::Gid::from_raw(req.gid())),
        );
        rustix::fs::chownat(&dir, name, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(err)?;
        let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(err)?;
        let ino = self.intern(&root, rel.join(name));
        Ok(self.shown(req, attr(ino, &st)))
    }

    /// Opens an inode's file with `flags`, never through a symlink.
    fn open_file(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        flags: OFlags,
    ) -> Result<(PathBuf, std::fs::File), i32> {
        let (root, rel) = self.locate(req, ino)?;
        let (dir, name) = self.parent_of(&root, &rel)?;
        let fd = rustix::fs::openat(
            &dir,
            &name,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        Ok((root, std::fs::File::from(fd)))
    }

    /// An open file. Its opening was checked against the caller's view; what the handle
    /// is used for afterwards may come from the kernel itself (writeback of an mmap, for
    /// one, as root), so the handle is what counts.
    fn file(&self, _req: &Request<'_>, fh: u64) -> Result<&std::fs::File, i32> {
        self.files.get(&fh).map(|(_, f)| f).ok_or(libc::EBADF)
    }

    /// The paths under `from` are now under `to` (a rename).
    fn moved(&mut self, root: &Path, from: &Path, to: &Path) {
        let mut changes = Vec::new();
        for (ino, n) in &self.nodes {
            if n.root == root {
                if let Ok(rest) = n.rel.strip_prefix(from) {
                    changes.push((*ino, n.rel.clone(), to.join(rest)));
                }
            }
        }
        for (ino, old, new) in changes {
            self.by_path.remove(&(root.to_path_buf(), old));
            // What was at the destination is gone from it.
            if let Some(gone) = self.by_path.insert((root.to_path_buf(), new.clone()), ino) {
                if let Some(n) = self.nodes.get_mut(&gone) {
                    n.rel = PathBuf::from("\0replaced");
                }
            }
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.rel = new;
            }
        }
    }

    fn xattr_fd(&mut self, req: &Request<'_>, ino: u64) -> Result<OwnedFd, i32> {
        let (root, rel) = self.locate(req, ino)?;
        if split(&rel).is_none() {
            return self.open_dir(&root, Path::new(""));
        }
        let (dir, name) = self.parent_of(&root, &rel)?;
        // Symlinks have no extended attributes here (they cannot be opened safely).
        rustix::fs::openat(
            &dir,
            &name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| {
            if e == Errno::LOOP {
                libc::ENOTSUP
            } else {
                err(e)
            }
        })
    }
}

impl<V: Views> Filesystem for ObuilderFs<V> {
    fn init(
        &mut self,
        _req: &Request<'_>,
        config: &mut fuser::KernelConfig,
    ) -> Result<(), libc::c_int> {
        // Inodes are per view, so a page cache kept across opens is never another
        // user's; files may also change outside the mount (the builder), which the
        // kernel sees by their mtime and size at the next getattr (at once for the root's
        // entries, within `TTL` below them).
        self.keep_cache = config.add_capabilities(AUTO_INVAL_DATA).is_ok();
        // Passthrough needs the kernel's support and CAP_SYS_ADMIN (the daemon is root).
        // A stacking depth of 2 lets the stored files be on overlayfs (the overlayfs
        // store); this filesystem itself then cannot be stacked under another.
        #[cfg(target_os = "linux")]
        if self.want_passthrough
            && config.set_max_stack_depth(2).is_ok()
            && config.add_capabilities(PASSTHROUGH).is_ok()
        {
            self.passthrough = Some(Passthrough::default());
        }
        Ok(())
    }

    fn lookup(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let r = (|| {
            if !resolve::valid_name(name) {
                return Err(libc::ENOENT);
            }
            let (root, rel) = self.locate(req, parent)?;
            let dir = self.open_dir(&root, &rel)?;
            let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(err)?;
            let ino = self.intern(&root, rel.join(name));
            Ok(self.shown(req, attr(ino, &st)))
        })();
        answer_entry(parent, r, reply)
    }

    fn forget(&mut self, _req: &Request<'_>, ino: u64, nlookup: u64) {
        let gone = match self.nodes.get_mut(&ino) {
            Some(n) => {
                n.lookups = n.lookups.saturating_sub(nlookup);
                n.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(n) = self.nodes.remove(&ino) {
                if self.by_path.get(&(n.root.clone(), n.rel.clone())) == Some(&ino) {
                    self.by_path.remove(&(n.root, n.rel));
                }
            }
        }
    }

    fn getattr(&mut self, req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self
            .locate(req, ino)
            .and_then(|(root, rel)| self.stat_ino(&root, &rel, ino))
        {
            Ok(a) => reply.attr(attr_ttl(ino), &self.shown(req, a)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let r = (|| {
            let (root, rel) = self.locate(req, ino)?;
            if split(&rel).is_none() {
                // The view's root itself is the builder's, not the caller's.
                if mode.is_some() || uid.is_some() || gid.is_some() || size.is_some() {
                    return Err(libc::EPERM);
                }
            }
            if let Some(size) = size {
                match fh.and_then(|fh| self.files.get(&fh)) {
                    Some((_, f)) => f.set_len(size).map_err(io_err)?,
                    None => {
                        let (_, f) = self.open_file(req, ino, OFlags::WRONLY | OFlags::NONBLOCK)?;
                        f.set_len(size).map_err(io_err)?;
                    }
                }
            }
            if let Some(mode) = mode {
                // chmod follows symlinks: open the file itself (never a link) instead.
                let (_, f) = self.open_file(req, ino, OFlags::RDONLY | OFlags::NONBLOCK)?;
                rustix::fs::fchmod(&f, Mode::from_raw_mode(mode & 0o7777)).map_err(err)?;
            }
            if uid.is_some() || gid.is_some() || atime.is_some() || mtime.is_some() {
                if let Some((dir, name)) = match split(&rel) {
                    Some(_) => Some(self.parent_of(&root, &rel)?),
                    None => None,
                } {
                    if uid.is_some() || gid.is_some() {
                        rustix::fs::chownat(
                            &dir,
                            &name,
                            uid.map(|u| rustix::fs::Uid::from_raw(self.stored_uid(req, u))),
                            gid.map(rustix::fs::Gid::from_raw),
                            AtFlags::SYMLINK_NOFOLLOW,
                        )
                        .map_err(err)?;
                    }
                    if atime.is_some() || mtime.is_some() {
                        let times = Timestamps {
                            last_access: timestamp(atime),
                            last_modification: timestamp(mtime),
                        };
                        rustix::fs::utimensat(&dir, &name, &times, AtFlags::SYMLINK_NOFOLLOW)
                            .map_err(err)?;
                    }
                }
            }
            self.stat_ino(&root, &rel, ino)
        })();
        match r {
            Ok(a) => reply.attr(attr_ttl(ino), &self.shown(req, a)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, req: &Request<'_>, ino: u64, reply: ReplyData) {
        let r = (|| {
            let (root, rel) = self.locate(req, ino)?;
            let (dir, name) = self.parent_of(&root, &rel)?;
            rustix::fs::readlinkat(&dir, &name, Vec::new()).map_err(err)
        })();
        match r {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = match mode & libc::S_IFMT as u32 {
            m if m == libc::S_IFREG as u32 || m == 0 => rustix::fs::FileType::RegularFile,
            m if m == libc::S_IFIFO as u32 => rustix::fs::FileType::Fifo,
            m if m == libc::S_IFSOCK as u32 => rustix::fs::FileType::Socket,
            _ => return reply.error(libc::EPERM),
        };
        let perm = Mode::from_raw_mode(mode & 0o7777 & !umask);
        answer_entry(
            parent,
            self.make_entry(req, parent, name, |dir, name| {
                sys::mknod(dir, name, kind, perm)
            }),
            reply,
        )
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = Mode::from_raw_mode(mode & 0o7777 & !umask);
        answer_entry(
            parent,
            self.make_entry(req, parent, name, |dir, name| {
                rustix::fs::mkdirat(dir, name, perm)
            }),
            reply,
        )
    }

    fn unlink(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, AtFlags::empty(), reply)
    }

    fn rmdir(&mut self, req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req, parent, name, AtFlags::REMOVEDIR, reply)
    }

    fn symlink(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        answer_entry(
            parent,
            self.make_entry(req, parent, link_name, |dir, name| {
                rustix::fs::symlinkat(target, dir, name)
            }),
            reply,
        )
    }

    fn rename(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            if !resolve::valid_name(name) || !resolve::valid_name(newname) {
                return Err(libc::EINVAL);
            }
            let (root, rel) = self.locate(req, parent)?;
            let (root2, rel2) = self.locate(req, newparent)?;
            if root != root2 {
                return Err(libc::EXDEV);
            }
            let from = self.open_dir(&root, &rel)?;
            let to = self.open_dir(&root, &rel2)?;
            sys::rename(&from, name, &to, newname, flags).map_err(err)?;
            self.moved(&root, &rel.join(name), &rel2.join(newname));
            Ok(())
        })();
        answer_empty(r, reply)
    }

    fn link(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = (|| {
            if !resolve::valid_name(newname) {
                return Err(libc::EINVAL);
            }
            let (root, rel) = self.locate(req, ino)?;
            let (root2, rel2) = self.locate(req, newparent)?;
            if root != root2 {
                return Err(libc::EXDEV);
            }
            let (from, name) = self.parent_of(&root, &rel)?;
            let to = self.open_dir(&root, &rel2)?;
            rustix::fs::linkat(&from, &name, &to, newname, AtFlags::empty()).map_err(err)?;
            let st = rustix::fs::statat(&to, newname, AtFlags::SYMLINK_NOFOLLOW).map_err(err)?;
            let ino = self.intern(&root, rel2.join(newname));
            Ok(self.shown(req, attr(ino, &st)))
        })();
        answer_entry(newparent, r, reply)
    }

    fn open(&mut self, req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let flags = OFlags::from_bits_retain(flags as _)
            & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY);
        match self.open_file(req, ino, flags) {
            Ok(f) => {
                let fh = self.fresh_fh();
                #[cfg(target_os = "linux")]
                if self.passthrough.is_some() {
                    let writes = flags.bits() & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
                    let r = self.pass_through(ino, fh, &f.1, writes, &reply);
                    self.files.insert(fh, f);
                    return match r {
                        // The kernel would not take a backing file: served as below.
                        Ok(None) => reply.opened(fh, if self.keep_cache { KEEP_CACHE } else { 0 }),
                        Ok(Some(true)) => {
                            let p = self.passthrough.as_ref().expect("passthrough is on");
                            reply.opened_passthrough(fh, 0, &p.backing[&ino].0)
                        }
                        // This inode's backing file was opened read-only and is in use:
                        // the handle goes through the daemon, uncached (a caching open
                        // would fail beside the passthrough ones).
                        Ok(Some(false)) => reply.opened(fh, DIRECT_IO),
                        Err(e) => {
                            self.files.remove(&fh);
                            reply.error(e)
                        }
                    };
                }
                self.files.insert(fh, f);
                reply.opened(fh, if self.keep_cache { KEEP_CACHE } else { 0 })
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let r = self.file(req, fh).and_then(|f| {
            let mut buf = vec![0u8; size as usize];
            let mut n = 0;
            while n < buf.len() {
                match f.read_at(&mut buf[n..], offset as u64 + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(e)),
                }
            }
            buf.truncate(n);
            Ok(buf)
        });
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        match self
            .file(req, fh)
            .and_then(|f| f.write_all_at(data, offset as u64).map_err(io_err))
        {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok()
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.files.remove(&fh);
        #[cfg(target_os = "linux")]
        if let Some(p) = &mut self.passthrough {
            if let Some(ino) = p.users.remove(&fh) {
                if let Some(b) = p.backing.get_mut(&ino) {
                    b.2 -= 1;
                    if b.2 == 0 {
                        // Dropping the id unregisters it; the kernel keeps its own
                        // reference for as long as it needs the file.
                        p.backing.remove(&ino);
                    }
                }
            }
        }
        reply.ok()
    }

    fn fsync(&mut self, req: &Request<'_>, _ino: u64, fh: u64, datasync: bool, reply: ReplyEmpty) {
        let r = self.file(req, fh).and_then(|f| {
            if datasync {
                f.sync_data().map_err(io_err)
            } else {
                f.sync_all().map_err(io_err)
            }
        });
        answer_empty(r, reply)
    }

    fn opendir(&mut self, req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let r = (|| {
            let (root, rel) = self.locate(req, ino)?;
            let dir = self.open_dir(&root, &rel)?;
            let mut entries = Vec::new();
            let listing = rustix::fs::Dir::read_from(&dir).map_err(err)?;
            for e in listing {
                let e = e.map_err(err)?;
                let name = OsStr::from_bytes(e.file_name().to_bytes()).to_os_string();
                let kind = match e.file_type() {
                    rustix::fs::FileType::Directory => FileType::Directory,
                    rustix::fs::FileType::Symlink => FileType::Symlink,
                    rustix::fs::FileType::Fifo => FileType::NamedPipe,
                    rustix::fs::FileType::Socket => FileType::Socket,
                    rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
                    rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
                    _ => FileType::RegularFile,
                };
                entries.push((e.ino() as u64, kind, name));
            }
            Ok(DirHandle { entries })
        })();
        match r {
            Ok(d) => {
                let fh = self.fresh_fh();
                self.dirs.insert(fh, d);
                reply.opened(fh, 0)
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &mut self,
        req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let _ = req;
        let Some(d) = self.dirs.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        for (i, (ino, kind, name)) in d.entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add((*ino).max(2), i as i64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        self.dirs.remove(&fh);
        reply.ok()
    }

    fn statfs(&mut self, req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let view = self.view(req);
        match self
            .root_fd(&view)
            .and_then(|fd| rustix::fs::fstatvfs(&fd).map_err(err))
        {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self.xattr_fd(req, ino).and_then(|fd| {
            rustix::fs::fsetxattr(
                &fd,
                name,
                value,
                rustix::fs::XattrFlags::from_bits_retain(flags as _),
            )
            .map_err(err)
        });
        answer_empty(r, reply)
    }

    fn getxattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        let r = self.xattr_fd(req, ino);
        xattr_reply(r, size, reply, |fd, buf| {
            rustix::fs::fgetxattr(fd, name, buf)
        })
    }

    fn listxattr(&mut self, req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let r = self.xattr_fd(req, ino);
        xattr_reply(r, size, reply, |fd, buf| rustix::fs::flistxattr(fd, buf))
    }

    fn removexattr(&mut self, req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        answer_empty(
            self.xattr_fd(req, ino)
                .and_then(|fd| rustix::fs::fremovexattr(&fd, name).map_err(err)),
            reply,
        )
    }

    fn ioctl(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _flags: u32,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctl is passed through (a build asking whether a file is a terminal, for
        // one, is told it is not).
        reply.error(libc::ENOTTY)
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        // `default_permissions`: the kernel has checked already.
        reply.ok()
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        #[cfg(target_os = "linux")]
        if self.passthrough.is_some() {
            // A created file could only be answered in caching mode (the protocol's create
            // reply has no backing file), which would make every passthrough open of it
            // fail while it is open. Declined once, the kernel then makes new files with
            // `mknod` and opens them with `open`.
            return reply.error(libc::ENOSYS);
        }
        let r = (|| {
            if !resolve::valid_name(name) {
                return Err(libc::EINVAL);
            }
            let (root, rel) = self.locate(req, parent)?;
            let dir = self.open_dir(&root, &rel)?;
            let oflags = OFlags::from_bits_retain(flags as _)
                | OFlags::CREATE
                | OFlags::NOFOLLOW
                | OFlags::CLOEXEC;
            let fd = rustix::fs::openat(
                &dir,
                name,
                oflags,
                Mode::from_raw_mode(mode & 0o7777 & !umask),
            )
            .map_err(err)?;
            rustix::fs::fchown(
                &fd,
                Some(rustix::fs::Uid::from_raw(self.stored_uid(req, req.uid()))),
                Some(rustix::fs::Gid::from_raw(req.gid())),
            )
            .map_err(err)?;
            let st = rustix::fs::fstat(&fd).map_err(err)?;
            let ino = self.intern(&root, rel.join(name));
            let fh = self.fresh_fh();
            self.files.insert(fh, (root, std::fs::File::from(fd)));
            Ok((self.shown(req, attr(ino, &st)), fh))
        })();
        match r {
            Ok((a, fh)) => {
                let flags = if self.keep_cache { KEEP_CACHE } else { 0 };
                reply.created(entry_ttl(parent), &a, 0, fh, flags)
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &mut self,
        req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        answer_empty(
            self.file(req, fh).and_then(|f| {
                sys::fallocate(f.as_fd(), mode, offset as u64, length as u64).map_err(err)
            }),
            reply,
        )
    }
}

#[cfg(target_os = "linux")]
impl<V: Views> ObuilderFs<V> {
    /// The backing file handle `fh` of inode `ino` uses (`file` is the handle's own
    /// file): the inode's current one, or a new one opened read-write if it can be (so
    /// that later writers may share it), else read-only. False when a writer comes to an
    /// inode whose backing file in use is read-only. None when the kernel refuses to
    /// register a backing file (a daemon without CAP_SYS_ADMIN in the initial user
    /// namespace): passthrough is then off for good, and files are served by the daemon.
    fn pass_through(
        &mut self,
        ino: u64,
        fh: u64,
        file: &std::fs::File,
        writes: bool,
        reply: &ReplyOpen,
    ) -> Result<Option<bool>, i32> {
        let p = self.passthrough.as_mut().expect("passthrough is on");
        let b = match p.backing.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let (backing, writable) = match sys::reopen(file, true) {
                    Ok(f) => (f, true),
                    Err(_) if !writes => (sys::reopen(file, false).map_err(io_err)?, false),
                    Err(e) => return Err(io_err(e)),
                };
                match reply.open_backing(&backing) {
                    Ok(id) => e.insert((id, writable, 0)),
                    Err(err) => {
                        tracing::warn!(
                            "FUSE passthrough is not available ({err}): files are served by the daemon"
                        );
                        self.passthrough = None;
                        return Ok(None);
                    }
                }
            }
        };
        if writes && !b.1 {
            return Ok(Some(false));
        }
        b.2 += 1;
        p.users.insert(fh, ino);
        Ok(Some(true))
    }
}

impl<V: Views> ObuilderFs<V> {
    fn remove(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        flags: AtFlags,
        reply: ReplyEmpty,
    ) {
        let r = (|| {
            if !resolve::valid_name(name) {
                return Err(libc::EINVAL);
            }
            let (root, rel) = self.locate(req, parent)?;
            let dir = self.open_dir(&root, &rel)?;
            rustix::fs::unlinkat(&dir, name, flags).map_err(err)
        })();
        answer_empty(r, reply)
    }
}
