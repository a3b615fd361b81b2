#![cfg(target_os = "linux")]
//! What the step's first process does between its `clone` and `execve`.
//!
//! It runs in the memory of a multi-threaded process, shared (`CLONE_VM`, see
//! [`super::spawn`]): any lock another thread holds (the allocator's, stdio's) may be held
//! at any time, and whatever it wrote would be the builder's. So this code allocates
//! nothing, formats nothing, never panics and writes only to its own stack (errno is the
//! suspended spawner thread's): every path, argument and flag it needs was
//! made by the parent in a [`Plan`] before the clone, and failures are reported as two
//! numbers (the stage and its index, then `errno`) on a close-on-exec pipe that the parent
//! reads until `execve` closes it.
//!
//! The order follows runc's `standard_init`: mounts in the tree and `pivot_root`; then,
//! once the parent has put the process in the step's cgroups, the network namespace made
//! ahead, the kernel's file systems, masks, hostname, loopback, limits, the seccomp filter
//! (loaded while the process still has `CAP_SYS_ADMIN`, as runc does without
//! `no_new_privs`), the user and the capabilities, and last the working directory and
//! `execve`.

use std::ffi::{c_char, c_int, c_ulong, c_void, CStr, CString};
use std::os::fd::RawFd;

/// Declares [`Stage`] and the list of its values, in order, from 1.
macro_rules! stages {
    ($($name:ident),+ $(,)?) => {
        /// One step of the set-up, as reported to the parent on failure.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Stage {
            $($name),+
        }

        impl Stage {
            const ALL: &'static [Stage] = &[$(Stage::$name),+];

            /// The stage numbered `n` on the report pipe.
            pub fn from_u32(n: u32) -> Option<Stage> {
                Stage::ALL.get((n as usize).checked_sub(1)?).copied()
            }

            /// Its number on the report pipe (from 1: 0 is no report).
            pub fn number(self) -> u32 {
                self as u32 + 1
            }
        }
    };
}

stages!(
    Propagation,
    Files,
    RootBind,
    RootOpen,
    BindOpen,
    Bind,
    BindRemount,
    PivotRoot,
    Wait,
    NetNs,
    Mkdir,
    Mount,
    Device,
    DevLink,
    Mask,
    ReadOnly,
    Hostname,
    Loopback,
    Rlimit,
    Workdir,
    Seccomp,
    Capabilities,
    Groups,
    Gid,
    Uid,
    Chdir,
    Stdio,
    Exec,
);

/// A bind mount of a host path into the tree, made before `pivot_root` (its source is on
/// the host). The target is resolved with `openat2(RESOLVE_IN_ROOT)` from the tree's root,
/// so a symlink the previous step left on the way stays inside the tree.
pub struct Bind {
    pub source: CString,
    /// Relative to the tree's root.
    pub target: CString,
    /// `MS_RDONLY | MS_NOSUID | …` applied by a remount after the bind; 0 for none.
    pub remount: c_ulong,
}

/// A file system mounted after `pivot_root`, at a path of the container.
pub struct Mount {
    pub target: CString,
    pub fstype: CString,
    pub source: CString,
    pub flags: c_ulong,
    pub data: Option<CString>,
}

/// A device node made in the container's `/dev` (as runc does without a user namespace).
pub struct Device {
    pub path: CString,
    /// `S_IFCHR | 0666`.
    pub mode: u32,
    pub dev: u64,
}

/// A file the child writes into its private scratch tmpfs (the hosts file, secrets):
/// nothing of it ever reaches a disk, and it is gone with the step's mount namespace, even
/// if the builder is killed.
pub struct ScratchFile {
    pub path: CString,
    pub data: Vec<u8>,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Everything the child needs, made by the parent before the clone.
pub struct Plan {
    /// A host directory outside the tree, covered in the child's namespace by a tmpfs
    /// that holds [`Plan::files`].
    pub scratch: CString,
    pub files: Vec<ScratchFile>,
    /// The tree, on the host.
    pub rootfs: CString,
    pub binds: Vec<Bind>,
    pub mounts: Vec<Mount>,
    pub devices: Vec<Device>,
    /// (target, link path)
    pub dev_links: Vec<(CString, CString)>,
    pub masked: Vec<CString>,
    pub readonly: Vec<CString>,
    pub hostname: CString,
    /// A network namespace made beforehand (its loopback up) to join, or -1: then the
    /// clone made a new one if the step has one, and `loopback` brings its loopback up.
    pub netns: RawFd,
    pub loopback: bool,
    /// (resource, soft, hard)
    pub rlimits: Vec<(c_int, u64, u64)>,
    pub cwd: CString,
    pub uid: u32,
    pub gid: u32,
    /// The capability set (bounding, effective, permitted, inheritable), as a bit mask.
    pub caps: u64,
    /// The highest capability number this kernel knows.
    pub last_cap: u32,
    /// The seccomp program (`struct sock_filter`s), or empty for none.
    pub filter: Vec<libc::sock_filter>,
    /// The paths to try `execve` with, in order (one for a path, one per `PATH` entry for
    /// a bare name).
    pub exec: Vec<CString>,
    pub argv: Vec<*const c_char>,
    pub envp: Vec<*const c_char>,
    /// The strings `argv` and `envp` point into, owned here (moving a `CString` does not
    /// move its bytes).
    pub _strings: (Vec<CString>, Vec<CString>),
    /// The step's standard streams, dup'ed to 0, 1, 2.
    pub stdio: [RawFd; 3],
    /// The parent writes one byte here once the process is in its cgroups; EOF means the
    /// parent gave up. Also watched just before `execve`: hung up means the parent died.
    pub go: RawFd,
    /// The parent's end of `go`, closed first thing here (else `go` never hangs up).
    pub go_parent: RawFd,
    /// Close-on-exec: the failure report.
    pub report: RawFd,
    /// The largest descriptor number this kernel allows (`fs.nr_open`): how far
    /// [`seal_descriptors`] looks on a kernel without `close_range`.
    pub fd_limit: c_int,
    /// One byte is written here first thing: the process exists (its pid is known to the
    /// parent, see `super::spawn`). Closed right after.
    pub started: RawFd,
}

// The plan's raw pointers point into its own CStrings (argv, envp), which move with it.
// Once made it is only read, by the parent and by the child (which shares its memory).
unsafe impl Send for Plan {}
unsafe impl Sync for Plan {}

/// Makes every descriptor from 3 up close-on-exec, or closes it, but `report` (which is
/// close-on-exec itself and written to until `execve`). `close_range` with
/// `CLOSE_RANGE_CLOEXEC` does it in one call from Linux 5.11; before, `close_range`
/// closes the ranges around `report` (5.9, 5.10); before that, each number up to
/// `fd_limit` is marked. Nothing may be allocated here (the child shares the builder's
/// memory), and none of the three can be skipped: an unchecked `close_range` on an older
/// kernel leaves every descriptor open.
///
/// # Safety
/// Only in the child, after everything else that uses a descriptor but `report`.
pub(crate) unsafe fn seal_descriptors(report: RawFd, fd_limit: c_int) {
    if obuilder_engine::exec::cloexec_above_stdio() || close_around(report) {
        return;
    }
    cloexec_each(fd_limit);
}

unsafe fn close_around(report: RawFd) -> bool {
    let range = |first: c_int, last: u32| {
        libc::syscall(libc::SYS_close_range, first as u32, last, 0u32) == 0
    };
    if report < 3 {
        return range(3, u32::MAX);
    }
    (report == 3 || range(3, report as u32 - 1)) && range(report + 1, u32::MAX)
}

unsafe fn cloexec_each(fd_limit: c_int) {
    for fd in 3..fd_limit {
        // EBADF for a number not in use: nothing to do.
        libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Reports `stage` (with `index`: which mount, which path) and errno, then exits.
fn fail(p: &Plan, stage: Stage, index: usize, err: i32) -> ! {
    let mut buf = [0u8; 12];
    buf[..4].copy_from_slice(&stage.number().to_ne_bytes());
    buf[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    buf[8..].copy_from_slice(&err.to_ne_bytes());
    unsafe {
        libc::write(p.report, buf.as_ptr() as *const c_void, buf.len());
        libc::_exit(127)
    }
}

fn check(p: &Plan, r: c_int, stage: Stage, index: usize) {
    if r < 0 {
        fail(p, stage, index, errno());
    }
}

/// `/proc/self/fd/N` in `buf`, NUL-terminated, without allocating.
fn proc_fd(buf: &mut [u8; 32], fd: c_int) -> *const c_char {
    let prefix = b"/proc/self/fd/";
    buf[..prefix.len()].copy_from_slice(prefix);
    let mut digits = [0u8; 12];
    let mut n = fd as u32;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let d = &digits[i..];
    buf[prefix.len()..prefix.len() + d.len()].copy_from_slice(d);
    buf[prefix.len() + d.len()] = 0;
    buf.as_ptr() as *const c_char
}

/// `struct open_how` (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` (relative) under `root` as the container would resolve it: a symlink on
/// the way, absolute or with `..`, stays inside the tree; `/proc/*/fd`-style magic links
/// are refused.
fn open_in_root(root: c_int, path: &CStr) -> c_int {
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        ) as c_int
    }
}

/// `mkdir -p` of an absolute container path, after `pivot_root`, as root: what runc does
/// for a working directory that does not exist.
fn mkdir_all(path: &CStr) -> c_int {
    let bytes = path.to_bytes();
    let mut buf = [0u8; 4096];
    if bytes.len() >= buf.len() {
        return -1;
    }
    buf[..bytes.len()].copy_from_slice(bytes);
    let mut i = 1;
    while i <= bytes.len() {
        if i == bytes.len() || buf[i] == b'/' {
            let keep = buf[i];
            buf[i] = 0;
            let r = unsafe { libc::mkdir(buf.as_ptr() as *const c_char, 0o755) };
            if r < 0 && errno() != libc::EEXIST {
                return r;
            }
            buf[i] = keep;
        }
        i += 1;
    }
    0
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `struct ifreq` for the interface flags (libc's is a union per platform).
#[repr(C)]
pub(super) struct IfFlags {
    pub(super) name: [u8; 16],
    pub(super) flags: i16,
    pub(super) _pad: [u8; 22],
}

/// Brings the new network namespace's loopback up, as runc does: a step's servers on
/// 127.0.0.1 must work without reaching the host's.
pub(super) fn loopback_up() -> c_int {
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return s;
        }
        let mut req = IfFlags {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..2].copy_from_slice(b"lo");
        let mut r = libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut req as *mut IfFlags);
        if r == 0 {
            req.flags |= libc::IFF_UP as i16;
            r = libc::ioctl(s, libc::SIOCSIFFLAGS as _, &mut req as *mut IfFlags);
        }
        libc::close(s);
        r
    }
}

/// The child's whole life: never returns.
///
/// # Safety
/// Called only in the child of the `clone` made by [`super::spawn`], with `p` valid. The
/// child shares the builder's memory until its `execve` (`CLONE_VM`, with the spawner
/// thread suspended meanwhile): it reads the plan and writes nothing but its own stack.
pub unsafe fn run(p: &Plan) -> ! {
    // Killed with the builder (its spawner thread, which never exits before the process):
    // a step never outlives the process that runs it. Set again after the credential
    // change, which clears it.
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    libc::write(p.started, b"s".as_ptr() as *const c_void, 1);
    libc::close(p.started);
    libc::close(p.go_parent);
    // The builder ignores SIGPIPE (Rust does) and tokio blocks nothing, but an ignored
    // signal would stay ignored across execve: every signal back to its default.
    for sig in 1..32 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::signal(sig, libc::SIG_DFL);
        }
    }
    let mut none: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut none);
    libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());

    // Standard streams first: what fails later may still print.
    for (i, fd) in p.stdio.iter().enumerate() {
        check(p, libc::dup2(*fd, i as c_int), Stage::Stdio, i);
    }
    // Mount events of this namespace never reach the host's (runc's default rslave).
    let null = std::ptr::null::<c_char>();
    check(
        p,
        libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ),
        Stage::Propagation,
        0,
    );
    // The per-step files, in memory only.
    check(
        p,
        libc::mount(
            c"tmpfs".as_ptr(),
            p.scratch.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"mode=0700".as_ptr() as *const c_void,
        ),
        Stage::Files,
        0,
    );
    for (i, f) in p.files.iter().enumerate() {
        // Created with its final mode: a secret is never readable by others, not even
        // briefly.
        let fd = libc::open(
            f.path.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            f.mode,
        );
        check(p, fd, Stage::Files, i + 1);
        let mut done = 0;
        while done < f.data.len() {
            let n = libc::write(
                fd,
                f.data[done..].as_ptr() as *const c_void,
                f.data.len() - done,
            );
            if n < 0 {
                fail(p, Stage::Files, i + 1, errno());
            }
            done += n as usize;
        }
        check(p, libc::fchown(fd, f.uid, f.gid), Stage::Files, i + 1);
        libc::close(fd);
    }
    // The tree becomes a mount of its own, for pivot_root.
    check(
        p,
        libc::mount(
            p.rootfs.as_ptr(),
            p.rootfs.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ),
        Stage::RootBind,
        0,
    );
    let root = libc::open(
        p.rootfs.as_ptr(),
        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    check(p, root, Stage::RootOpen, 0);

    // Host paths into the tree: caches, secrets, /etc/hosts, resolv.conf. Each target
    // exists (the parent made missing ones through a confined root) and is resolved
    // inside the tree; the mount goes onto the descriptor, never onto a path string.
    let mut fdbuf = [0u8; 32];
    for (i, b) in p.binds.iter().enumerate() {
        let fd = open_in_root(root, &b.target);
        check(p, fd, Stage::BindOpen, i);
        check(
            p,
            libc::mount(
                b.source.as_ptr(),
                proc_fd(&mut fdbuf, fd),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            Stage::Bind,
            i,
        );
        libc::close(fd);
        if b.remount != 0 {
            // Flags of a bind apply only on a remount of the new mount, which a fresh
            // resolution reaches (the walk enters the mount just made).
            let fd = open_in_root(root, &b.target);
            check(p, fd, Stage::BindOpen, i);
            check(
                p,
                libc::mount(
                    null,
                    proc_fd(&mut fdbuf, fd),
                    null,
                    libc::MS_BIND | libc::MS_REMOUNT | b.remount,
                    std::ptr::null(),
                ),
                Stage::BindRemount,
                i,
            );
            libc::close(fd);
        }
    }
    libc::close(root);

    // pivot_root into the tree; the old root is stacked under it and detached, so no
    // path of the host is reachable any more.
    check(p, libc::chdir(p.rootfs.as_ptr()), Stage::PivotRoot, 0);
    check(
        p,
        libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as c_int,
        Stage::PivotRoot,
        1,
    );
    check(
        p,
        libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
        Stage::PivotRoot,
        2,
    );
    check(p, libc::chdir(c"/".as_ptr()), Stage::PivotRoot, 3);

    // Wait until the parent has put this process in its cgroups (made while the tree was
    // set up above): nothing of the step's runs before.
    let mut byte = 0u8;
    loop {
        let n = libc::read(p.go, &mut byte as *mut u8 as *mut c_void, 1);
        if n == 1 {
            break;
        }
        if n == 0 {
            libc::_exit(127);
        }
        if errno() != libc::EINTR {
            fail(p, Stage::Wait, 0, errno());
        }
    }

    // The network namespace made for this step while its tree was made (see
    // `super::netns_ahead`): joined before /sys is mounted, which shows the mounter's.
    if p.netns >= 0 {
        check(p, libc::setns(p.netns, libc::CLONE_NEWNET), Stage::NetNs, 0);
        libc::close(p.netns);
    }

    // The kernel's file systems, now inside the container: a symlink in the tree where
    // /proc should be can only point elsewhere in the tree.
    for (i, m) in p.mounts.iter().enumerate() {
        let r = libc::mkdir(m.target.as_ptr(), 0o755);
        if r < 0 && errno() != libc::EEXIST {
            fail(p, Stage::Mkdir, i, errno());
        }
        check(
            p,
            libc::mount(
                m.source.as_ptr(),
                m.target.as_ptr(),
                m.fstype.as_ptr(),
                m.flags,
                m.data
                    .as_ref()
                    .map_or(std::ptr::null(), |d| d.as_ptr() as *const c_void),
            ),
            Stage::Mount,
            i,
        );
    }
    // The standard nodes, made rather than bound from the host (as runc without a user
    // namespace); what else a step may open is the devices cgroup's to say.
    libc::umask(0);
    for (i, d) in p.devices.iter().enumerate() {
        check(
            p,
            libc::mknod(d.path.as_ptr(), d.mode, d.dev),
            Stage::Device,
            i,
        );
    }
    // From here, and for the step, runc's umask (the OCI config sets none): a step's files
    // never depend on the umask of whoever started the builder.
    libc::umask(0o022);
    for (i, (target, link)) in p.dev_links.iter().enumerate() {
        let r = libc::symlink(target.as_ptr(), link.as_ptr());
        if r < 0 && errno() != libc::EEXIST {
            fail(p, Stage::DevLink, i, errno());
        }
    }

    // Masked paths: an empty read-only tmpfs over a directory, /dev/null over a file.
    for (i, path) in p.masked.iter().enumerate() {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(path.as_ptr(), &mut st) < 0 {
            continue; // not on this kernel
        }
        let r = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            libc::mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY,
                std::ptr::null(),
            )
        } else {
            libc::mount(
                c"/dev/null".as_ptr(),
                path.as_ptr(),
                null,
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        check(p, r, Stage::Mask, i);
    }
    // Read-only paths: bound onto themselves, then remounted read-only keeping the flags
    // they had (proc's nosuid, nodev, noexec).
    for (i, path) in p.readonly.iter().enumerate() {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(path.as_ptr(), &mut st) < 0 {
            continue;
        }
        check(
            p,
            libc::mount(
                path.as_ptr(),
                path.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            Stage::ReadOnly,
            i,
        );
        // (statvfs's ST_NOSUID, ST_NODEV, ST_NOEXEC are the MS_ values)
        let mut fs: libc::statvfs = std::mem::zeroed();
        libc::statvfs(path.as_ptr(), &mut fs);
        let keep = (fs.f_flag as c_ulong) & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
        check(
            p,
            libc::mount(
                null,
                path.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_REC | keep,
                std::ptr::null(),
            ),
            Stage::ReadOnly,
            i,
        );
    }

    let h = p.hostname.to_bytes();
    check(
        p,
        libc::sethostname(h.as_ptr() as *const c_char, h.len()),
        Stage::Hostname,
        0,
    );
    if p.loopback {
        check(p, loopback_up(), Stage::Loopback, 0);
    }
    for (i, (res, soft, hard)) in p.rlimits.iter().enumerate() {
        let l = libc::rlimit {
            rlim_cur: *soft,
            rlim_max: *hard,
        };
        check(p, libc::setrlimit(*res as _, &l), Stage::Rlimit, i);
    }
    // The working directory is made as root, as runc makes it; entered below as the user.
    check(p, mkdir_all(&p.cwd), Stage::Workdir, 0);

    // The filter is loaded while this process still has CAP_SYS_ADMIN, so no_new_privs is
    // not needed (runc's order when noNewPrivileges is false): set-uid programs in the
    // image keep working for builds that use su or sudo.
    if !p.filter.is_empty() {
        let prog = libc::sock_fprog {
            len: p.filter.len() as u16,
            filter: p.filter.as_ptr() as *mut libc::sock_filter,
        };
        check(
            p,
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            ) as c_int,
            Stage::Seccomp,
            0,
        );
    }

    // Capabilities: the bounding set first (needs CAP_SETPCAP, still held), then keep the
    // permitted set across the change of user, then set the three sets to the list.
    for cap in 0..=p.last_cap {
        if p.caps & (1u64 << cap) == 0 {
            check(
                p,
                libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0),
                Stage::Capabilities,
                cap as usize,
            );
        }
    }
    check(
        p,
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0),
        Stage::Capabilities,
        100,
    );
    // Supplementary groups are cleared: only the step's uid and gid. Raw system calls:
    // glibc's wrappers would broadcast the change to the builder's other threads (its
    // setxid protocol), which do not exist in this process.
    check(
        p,
        libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) as c_int,
        Stage::Groups,
        0,
    );
    check(
        p,
        libc::syscall(libc::SYS_setresgid, p.gid, p.gid, p.gid) as c_int,
        Stage::Gid,
        0,
    );
    check(
        p,
        libc::syscall(libc::SYS_setresuid, p.uid, p.uid, p.uid) as c_int,
        Stage::Uid,
        0,
    );
    let header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let lo = p.caps as u32;
    let hi = (p.caps >> 32) as u32;
    let data = [
        CapData {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        CapData {
            effective: hi,
            permitted: hi,
            inheritable: hi,
        },
    ];
    check(
        p,
        libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr()) as c_int,
        Stage::Capabilities,
        101,
    );
    // No ambient capabilities: a non-root user's command starts with none.
    libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL,
        0,
        0,
        0,
    );
    libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);

    check(p, libc::chdir(p.cwd.as_ptr()), Stage::Chdir, 0);

    // The parent may have died between the two PR_SET_PDEATHSIGs: its end of `go` closed.
    let mut pfd = libc::pollfd {
        fd: p.go,
        events: 0,
        revents: 0,
    };
    if libc::poll(&mut pfd, 1, 0) > 0 && pfd.revents & libc::POLLHUP != 0 {
        libc::_exit(127);
    }
    // Nothing of the builder's but the three streams and the report pipe survives execve
    // (a descriptor its own parent left open without close-on-exec would give the step a
    // way out of its tree).
    seal_descriptors(p.report, p.fd_limit);

    let mut seen = libc::ENOENT;
    for c in &p.exec {
        libc::execve(c.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
        match errno() {
            // Not here: the next PATH entry.
            libc::ENOENT | libc::ENOTDIR => {}
            // Found but not executable: remembered (as a shell does) and keep looking.
            libc::EACCES => seen = libc::EACCES,
            e => {
                seen = e;
                break;
            }
        }
    }
    fail(p, Stage::Exec, 0, seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `seal` in a forked child holding three descriptors without close-on-exec (one
    /// of them standing for the report pipe); true if afterwards the report pipe alone is
    /// open and not marked, and each other is closed or marked close-on-exec.
    fn sealed_in_a_child(seal: unsafe fn(RawFd)) -> bool {
        // SAFETY: plain descriptor calls; the forked child only makes system calls and
        // leaves with _exit.
        unsafe {
            let dev_null = c"/dev/null".as_ptr();
            let fds: Vec<RawFd> = (0..3)
                .map(|_| libc::open(dev_null, libc::O_RDONLY))
                .collect();
            assert!(fds.iter().all(|&fd| fd >= 3));
            let (report, others) = (fds[1], [fds[0], fds[2]]);
            let pid = libc::fork();
            if pid == 0 {
                seal(report);
                let kept = libc::fcntl(report, libc::F_GETFD) == 0;
                let gone = others.iter().all(|&fd| {
                    let f = libc::fcntl(fd, libc::F_GETFD);
                    f == -1 || f & libc::FD_CLOEXEC != 0
                });
                libc::_exit(if kept && gone { 0 } else { 1 });
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            for fd in fds {
                libc::close(fd);
            }
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
        }
    }

    /// Each way of keeping the builder's descriptors from the step works on this kernel,
    /// the fallbacks for kernels before 5.11 and 5.9 included (which cannot be had here
    /// otherwise: this kernel has the one-call way).
    #[test]
    fn no_descriptor_of_the_builder_reaches_the_step_on_any_kernel() {
        // (No panics in the forked child: a failure is its exit status.)
        unsafe fn whole(_: RawFd) {
            if !obuilder_engine::exec::cloexec_above_stdio() {
                libc::_exit(2);
            }
        }
        unsafe fn around(report: RawFd) {
            if !close_around(report) {
                libc::_exit(2);
            }
        }
        unsafe fn each(report: RawFd) {
            cloexec_each(4096);
            // (The report pipe is close-on-exec in the sandbox: here it stands apart.)
            libc::fcntl(report, libc::F_SETFD, 0);
        }
        unsafe fn all(report: RawFd) {
            seal_descriptors(report, 4096);
            libc::fcntl(report, libc::F_SETFD, 0);
        }
        assert!(
            sealed_in_a_child(around),
            "close_range around the report pipe"
        );
        assert!(sealed_in_a_child(each), "one by one");
        assert!(sealed_in_a_child(all), "the three in order");
        // The one-call way marks the report pipe too, as the sandbox's is marked already.
        // SAFETY: as above.
        unsafe {
            let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
            let pid = libc::fork();
            if pid == 0 {
                whole(fd);
                libc::_exit(i32::from(
                    libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC == 0,
                ));
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            libc::close(fd);
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        }
    }
}
