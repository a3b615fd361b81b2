#![cfg(target_os = "linux")]
//! The native sandbox (`--sandbox native`): the same container as the runc sandbox's, set
//! up by the builder itself with no runtime binary.
//!
//! The container is described by the very OCI config the runc sandbox hands to runc
//! ([`crate::oci::config`]), read here property by property: namespaces, mounts, masked
//! and read-only paths, capabilities, rlimits, hostname, user, working directory, env,
//! the seccomp profile (compiled with libseccomp, as runc compiles it) and the resources
//! (cgroups). What differs is said where it differs: `/sys/fs/cgroup` is an empty
//! read-only tmpfs (runc shows the step's own cgroups there), and the per-step files (the
//! hosts file, secrets) live in a tmpfs of the step's mount namespace instead of a bundle
//! on disk.
//!
//! A step is one `clone` with the new namespaces, `vfork`-like (sharing the builder's
//! memory until its `execve`), made by a thread that lives as long as the builder
//! ([`spawn`]), and a pid file descriptor of the child; the child sets itself up
//! ([`child::run`]) and `execve`s the command, which is the pid namespace's first
//! process. Nothing outlives a step: when that process exits, the kernel kills every
//! other process of its namespace; cancel kills the step's cgroup and that process; if the
//! builder dies, `PR_SET_PDEATHSIG` kills that process (and with it the namespace). Its
//! mounts exist only in its own mount namespace, so none is ever left on the host.

mod cgroup;
mod child;
mod filter;

use std::ffi::{c_int, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};

use async_trait::async_trait;
use serde_json::Value;

use obuilder_engine::confined::{self, ConfinedRoot};
use obuilder_engine::log::StepLog;
use obuilder_engine::sandbox::{RunConfig, Sandbox, SandboxError, UserIds};
use obuilder_engine::CancellationToken;
use obuilder_spec::User;

use crate::oci::{self, HostFiles, Limits};
use crate::NativeOptions;
use child::{Bind, Device, Mount, Plan, ScratchFile, Stage};

/// Step names are `obuilder-n-PID-N`, PID the builder's: a stale cgroup names its dead
/// builder.
static NEXT_STEP: AtomicU64 = AtomicU64::new(0);

pub struct NativeSandbox {
    state_dir: PathBuf,
    opts: NativeOptions,
    limits: Limits,
    last_cap: u32,
    /// The compiled seccomp program (the same for every step of this sandbox).
    filter: OnceLock<Result<Arc<Vec<libc::sock_filter>>, String>>,
    /// `STATE/native/steps-PID-K`, made before this sandbox's first step cgroup and
    /// removed when the sandbox is dropped: one left behind says that a builder died with
    /// cgroups to clean, so that `recover` looks for them only then (listing the host's
    /// cgroups cost a fully cached build 0.2 ms).
    record: OnceLock<PathBuf>,
    /// What the next steps need, being made (see [`Prepared`]).
    ahead: Ahead,
}

/// The network namespace of a step, made ahead of it on a thread of its own while the
/// builder makes the step's tree (the snapshot waits on the disk): 0.6 to 0.8 ms here,
/// half of the `clone` that makes all the other namespaces. Each serves one step only:
/// no namespace is ever used by two. It is the one the clone would make: new, with only
/// its loopback, brought up. (The step's cgroups are made while the child sets itself up,
/// see `run_in`.)
fn netns_ahead() -> Option<OwnedFd> {
    match new_netns() {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::debug!("no network namespace made ahead: {e}");
            None
        }
    }
}

/// A new network namespace with its loopback up, entered by the calling thread.
fn new_netns() -> std::io::Result<OwnedFd> {
    // SAFETY: unshare and open on this thread only; the descriptor is owned below.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if child::loopback_up() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::open(
            c"/proc/thread-self/ns/net".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// The name of a new step cgroup: `obuilder-n-PID-N`.
fn step_name() -> String {
    format!(
        "obuilder-n-{}-{}",
        std::process::id(),
        NEXT_STEP.fetch_add(1, Ordering::Relaxed)
    )
}

/// The steps' network namespaces being made, oldest first.
#[derive(Default)]
struct Ahead {
    pending: std::sync::Mutex<std::collections::VecDeque<mpsc::Receiver<Option<OwnedFd>>>>,
}

/// At most this many wait made (a step that never runs leaves its own for the next).
const AHEAD: usize = 4;

impl Ahead {
    /// Starts making one, unless enough wait already.
    fn start(&self) {
        let mut q = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= AHEAD {
            return;
        }
        let (tx, rx) = mpsc::channel();
        let made = std::thread::Builder::new()
            .name("obuilder-ahead".into())
            .spawn(move || {
                // The spawner thread, if this is the first step, from here rather than
                // from the builder's thread; and before the `unshare` below, which
                // changes this thread's network namespace: a thread started after it
                // would be in the step's namespace, and so would every step cloned from
                // it without one of its own (`(network host)`).
                spawner();
                let _ = tx.send(netns_ahead());
            });
        if made.is_ok() {
            q.push_back(rx);
        }
    }

    /// The oldest one started, waiting for it if need be; `None` if none was started or
    /// it could not be made.
    fn take(&self) -> Option<OwnedFd> {
        let rx = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()?;
        rx.recv().ok().flatten()
    }
}

/// Numbers the sandboxes of this process, for their step records.
static NEXT_SANDBOX: AtomicU64 = AtomicU64::new(0);

/// The largest descriptor number a process may have (`fs.nr_open`, 1 048 576 unless
/// raised), read once: how far the child marks descriptors close-on-exec one by one on a
/// kernel without `close_range` (see `child::seal_descriptors`).
fn fd_limit() -> c_int {
    static LIMIT: std::sync::OnceLock<c_int> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    })
}

/// The prefix of a step record's name (see `NativeSandbox::record`).
const RECORD_PREFIX: &str = "steps-";

fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SandboxError {
    SandboxError::io(what, path)
}

fn cstr(s: impl AsRef<[u8]>) -> Result<CString, SandboxError> {
    CString::new(s.as_ref().to_vec()).map_err(|_| {
        SandboxError::Unsupported(format!(
            "{:?} holds a NUL byte",
            String::from_utf8_lossy(s.as_ref())
        ))
    })
}

/// Capability numbers by name (linux/capability.h).
const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Mount option words that are flags (the rest is the file system's data).
fn mount_flag(opt: &str) -> Option<libc::c_ulong> {
    Some(match opt {
        "ro" => libc::MS_RDONLY,
        "nosuid" => libc::MS_NOSUID,
        "nodev" => libc::MS_NODEV,
        "noexec" => libc::MS_NOEXEC,
        "strictatime" => libc::MS_STRICTATIME,
        "relatime" => libc::MS_RELATIME,
        "noatime" => libc::MS_NOATIME,
        // Binds are always recursive and private to the step's namespace here.
        "rbind" | "bind" | "rprivate" | "private" | "rw" => 0,
        _ => return None,
    })
}

fn under_kernel_fs(dst: &str) -> bool {
    ["/proc", "/dev", "/sys"]
        .iter()
        .any(|p| dst == *p || dst.starts_with(&format!("{p}/")))
}

/// The paths `execve` is tried with: `argv0` itself if it holds a `/`, else each entry of
/// the step's `PATH` (as runc looks a bare name up).
fn exec_candidates(argv0: &str, env: &[(String, String)]) -> Vec<String> {
    if argv0.contains('/') {
        return vec![argv0.to_string()];
    }
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map_or(
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        |(_, v)| v.as_str(),
    );
    path.split(':')
        .map(|d| if d.is_empty() { "." } else { d })
        .map(|d| format!("{}/{argv0}", d.trim_end_matches('/')))
        .collect()
}

/// Makes the missing mount point of a bind at container path `dst` (a directory for a
/// directory source, else an empty file), through the confined root: a symlink the
/// previous step left is followed inside the tree, never out of it.
fn mount_point(root: &ConfinedRoot, dst: &str, dir: bool) -> std::io::Result<()> {
    if dir {
        return root.create_dirs(dst, 0o755, None).map(drop);
    }
    // A file target that is a symlink (an image's /etc/resolv.conf pointing into /run) is
    // followed as the container would, and its target made if missing, as runc does.
    let mut path = dst.to_string();
    for _ in 0..40 {
        let parts = confined::components(&path);
        let Some((name, parent)) = parts.split_last() else {
            return Ok(());
        };
        let parent_path = format!("/{}", parent.join("/"));
        let parent_fd = root.create_dirs(&parent_path, 0o755, None)?;
        match confined::kind_at(&parent_fd, name)? {
            None => {
                confined::create_file_at(&parent_fd, name, 0o644)?;
                return Ok(());
            }
            Some((rustix::fs::FileType::Symlink, _)) => {
                let target = rustix::fs::readlinkat(&parent_fd, *name, Vec::new())?;
                let target = target.to_string_lossy().into_owned();
                path = if target.starts_with('/') {
                    target
                } else {
                    format!("{parent_path}/{target}")
                };
            }
            Some(_) => return Ok(()),
        }
    }
    Err(std::io::Error::from_raw_os_error(libc::ELOOP))
}

/// The home directory of `uid` in the tree's `/etc/passwd` (read through the confined
/// root, never following a symlink out of it), or `/`.
fn home_of(root: &ConfinedRoot, uid: u32) -> String {
    use std::io::Read;
    let read = || -> std::io::Result<String> {
        let Some((dir, name)) = root.parent("/etc/passwd", confined::Follow::InRoot)? else {
            return Ok(String::new());
        };
        let fd = rustix::fs::openat(
            &dir,
            name.as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let mut text = String::new();
        std::fs::File::from(fd)
            .take(1 << 20)
            .read_to_string(&mut text)?;
        Ok(text)
    };
    let text = read().unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 6 && f[2].parse() == Ok(uid)).then(|| f[5].to_string())
        })
        .find(|h| !h.is_empty())
        .unwrap_or_else(|| "/".into())
}

/// A request to the spawner thread.
struct Job {
    /// Held until the clone returns, when the child no longer reads it (it has called
    /// `execve` or exited): even if the step's owner gives up on it meanwhile (its future
    /// dropped), the plan outlives the child's use of it.
    plan: Arc<Plan>,
    flags: u64,
    /// Where the kernel writes the child's pid (`CLONE_PARENT_SETTID`), before it runs.
    pid: Arc<std::sync::atomic::AtomicI32>,
    /// The spawner's copy of the child's `started` pipe: dropped once the clone returned,
    /// so that a clone that failed reads as EOF there.
    started: OwnedFd,
    reply: mpsc::Sender<std::io::Result<()>>,
}

/// Starts the step's first process, which sets itself up from `plan` (see
/// [`child::run`]): returns its pid and a pid descriptor once it exists, before it has
/// set anything up, and the plan, now shared with the child (which reads it in the
/// builder's memory until its `execve`).
///
/// The clone is made by a thread that lives as long as the builder: `PR_SET_PDEATHSIG`
/// fires when the *thread* that made a process exits, so a pool thread that retires would
/// kill a running step. It is a `vfork`-like clone (`CLONE_VM | CLONE_VFORK`, on a stack
/// of the spawner's): nothing of the builder's memory is copied, so neither the clone,
/// nor the child's `execve`, nor the builder's next writes (copy-on-write faults) pay for
/// the builder's size. The spawner thread is suspended until the child's `execve` or
/// exit; the child tells its existence through the `started` pipe meanwhile.
fn spawn(mut plan: Plan, flags: u64) -> std::io::Result<(i32, OwnedFd, Arc<Plan>)> {
    let (started_r, started_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    plan.started = started_w.as_raw_fd();
    let plan = Arc::new(plan);
    let pid = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let (reply, answer) = mpsc::channel();
    spawner()
        .send(Job {
            plan: plan.clone(),
            flags,
            pid: pid.clone(),
            started: started_w,
            reply,
        })
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    let mut byte = [0u8; 1];
    let started = loop {
        match rustix::io::read(&started_r, &mut byte) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r,
        }
    };
    if started != Ok(1) {
        // The clone failed (the spawner dropped its end): it says why.
        return Err(match answer.recv() {
            Ok(Err(e)) => e,
            _ => std::io::Error::other("the spawner thread is gone"),
        });
    }
    let pid = pid.load(Ordering::Acquire);
    // Our child, not reaped before we wait for it: the pid cannot have been reused.
    match rustix::process::Pid::from_raw(pid)
        .ok_or_else(|| std::io::Error::other("the clone gave no pid"))
        .and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                .map_err(std::io::Error::from)
        }) {
        Ok(fd) => Ok((pid, fd, plan)),
        Err(e) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut status = 0;
            unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
            Err(e)
        }
    }
}

/// The spawner thread's queue, starting the thread on first use.
fn spawner() -> &'static mpsc::Sender<Job> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("obuilder-spawner".into())
            .spawn(move || {
                // Every signal blocked: a child starts with the builder's handlers (it
                // resets them, then unblocks), and must not run one in shared memory.
                unsafe {
                    let mut all: libc::sigset_t = std::mem::zeroed();
                    libc::sigfillset(&mut all);
                    libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
                }
                let stack = match ChildStack::new() {
                    Ok(s) => s,
                    Err(e) => {
                        for job in rx {
                            let _ = job.reply.send(Err(std::io::Error::other(format!(
                                "cannot map a stack for the step's first process: {e}"
                            ))));
                        }
                        return;
                    }
                };
                for job in rx {
                    // The child's change of credentials makes its memory undumpable (so
                    // that no process of the step's user can ptrace into it before its
                    // `execve`), and that memory is the builder's: its flag is put back
                    // once the child has its own.
                    let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
                    let r =
                        unsafe { clone_vfork(Arc::as_ptr(&job.plan), job.flags, &job.pid, &stack) };
                    if dumpable >= 0 && unsafe { libc::prctl(libc::PR_GET_DUMPABLE) } != dumpable {
                        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, dumpable as libc::c_ulong) };
                    }
                    drop(job.started);
                    let _ = job.reply.send(r);
                }
            })
            .expect("cannot start the native sandbox's spawner thread");
        tx
    })
}

/// The stack the step's first process runs on until its `execve`: the spawner's, reused
/// by each clone (the spawner is suspended while a child uses it), with a guard page.
struct ChildStack {
    base: *mut libc::c_void,
}

/// 256 KiB: the child's set-up allocates nothing and recurses nowhere.
const CHILD_STACK: usize = 256 * 1024;
const GUARD: usize = 4096;

impl ChildStack {
    fn new() -> std::io::Result<ChildStack> {
        // SAFETY: a fresh anonymous mapping, owned here.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                CHILD_STACK + GUARD,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            if libc::mprotect(base, GUARD, libc::PROT_NONE) != 0 {
                let e = std::io::Error::last_os_error();
                libc::munmap(base, CHILD_STACK + GUARD);
                return Err(e);
            }
            Ok(ChildStack { base })
        }
    }

    fn top(&self) -> *mut libc::c_void {
        // (16-byte aligned: the mapping is page-aligned)
        unsafe { (self.base as *mut u8).add(CHILD_STACK + GUARD) as *mut libc::c_void }
    }
}

extern "C" fn child_entry(plan: *mut libc::c_void) -> c_int {
    // SAFETY: the plan of the spawner's job, which holds it until this clone returns.
    unsafe { child::run(&*(plan as *const Plan)) }
}

/// `clone` with `flags` and `CLONE_VM | CLONE_VFORK`, the child running [`child::run`] on
/// `stack`; returns once the child has called `execve` or exited.
unsafe fn clone_vfork(
    plan: *const Plan,
    flags: u64,
    pid: &std::sync::atomic::AtomicI32,
    stack: &ChildStack,
) -> std::io::Result<()> {
    let flags = flags
        | (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID) as u64
        | libc::SIGCHLD as u64;
    let r = libc::clone(
        child_entry,
        stack.top(),
        flags as c_int,
        plan as *mut libc::c_void,
        pid.as_ptr(),
    );
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| SandboxError::io("cannot make a pipe", "native sandbox")(e.into()))
}

/// How the step's first process ended.
enum Ended {
    Exited(i32),
    Signalled(i32),
}

/// Waits for the process of `pidfd` to end, on the runtime (a pid fd is readable once
/// its process has exited), and reaps it.
async fn wait_async(pidfd: &OwnedFd) -> std::io::Result<Ended> {
    // SAFETY: `pidfd` is borrowed for longer than `ready` lives, so the descriptor stays
    // open and the same for all of its life.
    let ready = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            pidfd.as_raw_fd(),
            tokio::io::Interest::READABLE,
        )
    }?;
    loop {
        let mut guard = ready.readable().await?;
        if let Some(ended) = reap(pidfd, libc::WNOHANG)? {
            return Ok(ended);
        }
        guard.clear_ready();
    }
}

/// Waits for the process of `pidfd` to end and reaps it.
fn wait(pidfd: &OwnedFd) -> std::io::Result<Ended> {
    loop {
        if let Some(ended) = reap(pidfd, 0)? {
            return Ok(ended);
        }
    }
}

/// `waitid` on `pidfd` with `flags` (WEXITED and these): how the process ended, or `None`
/// if it has not (WNOHANG) or the wait was interrupted.
fn reap(pidfd: &OwnedFd, flags: c_int) -> std::io::Result<Option<Ended>> {
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | flags,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(None);
        }
        return Err(e);
    }
    // (With WNOHANG and the process still running, waitid leaves the pid at 0.)
    if unsafe { info.si_pid() } == 0 {
        return Ok(None);
    }
    let status = unsafe { info.si_status() };
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => Ended::Exited(status),
        _ => Ended::Signalled(status),
    }))
}

fn kill(pidfd: &OwnedFd) {
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

impl NativeSandbox {
    pub fn new(state_dir: &Path, opts: NativeOptions) -> NativeSandbox {
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
            .min(63);
        NativeSandbox {
            state_dir: state_dir.to_path_buf(),
            limits: Limits::for_host(opts.fast_sync, opts.max_pids, opts.max_memory),
            opts,
            last_cap,
            filter: OnceLock::new(),
            record: OnceLock::new(),
            ahead: Ahead::default(),
        }
    }

    /// Makes this sandbox's step record, once (see `record`).
    fn make_record(&self) {
        self.record.get_or_init(|| {
            // (`warm` may come before any step has made the directory, in a process that
            // was not alone on the store and so did not recover it.)
            let _ = std::fs::create_dir_all(self.scratch());
            let p = self.scratch().join(format!(
                "{RECORD_PREFIX}{}-{}",
                std::process::id(),
                NEXT_SANDBOX.fetch_add(1, Ordering::Relaxed)
            ));
            if let Err(e) = std::fs::File::create(&p) {
                tracing::warn!("cannot make {}: {e}", p.display());
            }
            p
        });
    }

    /// The directory the child covers with its scratch tmpfs.
    fn scratch(&self) -> PathBuf {
        self.state_dir.join("native")
    }

    fn filter(&self, profile: &Value) -> Result<Arc<Vec<libc::sock_filter>>, SandboxError> {
        self.filter
            .get_or_init(|| {
                filter::compile_cached(profile, &self.state_dir.join("native-filters"))
                    .map(Arc::new)
            })
            .clone()
            .map_err(SandboxError::Unsupported)
    }

    /// The child's plan from the step's OCI config.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        c: &RunConfig,
        config: &Value,
        rootfs: &Path,
        confined: &ConfinedRoot,
        scratch_files: Vec<ScratchFile>,
        stdio: [RawFd; 3],
        go: (RawFd, RawFd),
        report: RawFd,
    ) -> Result<(Plan, u64), SandboxError> {
        let mut flags = 0u64;
        let mut loopback = false;
        for ns in config["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
        {
            flags |= match ns["type"].as_str() {
                Some("network") => {
                    loopback = true;
                    libc::CLONE_NEWNET
                }
                Some("pid") => libc::CLONE_NEWPID,
                Some("ipc") => libc::CLONE_NEWIPC,
                Some("uts") => libc::CLONE_NEWUTS,
                Some("mount") => libc::CLONE_NEWNS,
                other => {
                    return Err(SandboxError::Unsupported(format!(
                        "the native sandbox has no {other:?} namespace"
                    )))
                }
            } as u64;
        }
        let mut binds = Vec::new();
        let mut mounts = Vec::new();
        for m in config["mounts"].as_array().into_iter().flatten() {
            let dst = m["destination"].as_str().unwrap_or_default();
            let src = m["source"].as_str().unwrap_or_default();
            let mut fl: libc::c_ulong = 0;
            let mut data = Vec::new();
            for o in m["options"].as_array().into_iter().flatten() {
                let o = o.as_str().unwrap_or_default();
                match mount_flag(o) {
                    Some(f) => fl |= f,
                    None => data.push(o),
                }
            }
            match m["type"].as_str() {
                Some("bind") => {
                    if under_kernel_fs(dst) {
                        return Err(SandboxError::Unsupported(format!(
                            "{dst}: the native sandbox cannot mount into /proc, /dev or /sys"
                        )));
                    }
                    let dir = !scratch_files
                        .iter()
                        .any(|f| f.path.as_bytes() == src.as_bytes())
                        && std::fs::metadata(src).map(|m| m.is_dir()).unwrap_or(false);
                    mount_point(confined, dst, dir)
                        .map_err(io("cannot make the mount point", confined.shown(dst)))?;
                    binds.push(Bind {
                        source: cstr(src)?,
                        target: cstr(dst.trim_start_matches('/'))?,
                        remount: fl,
                    });
                }
                Some("cgroup") => mounts.push(Mount {
                    // An empty read-only tmpfs: the step's cgroups are the builder's.
                    target: cstr(dst)?,
                    fstype: cstr("tmpfs")?,
                    source: cstr("tmpfs")?,
                    flags: fl | libc::MS_RDONLY,
                    data: Some(cstr("mode=755")?),
                }),
                Some(fstype) => mounts.push(Mount {
                    target: cstr(dst)?,
                    fstype: cstr(fstype)?,
                    source: cstr(src)?,
                    flags: fl,
                    data: if data.is_empty() {
                        None
                    } else {
                        Some(cstr(data.join(","))?)
                    },
                }),
                None => {}
            }
        }
        // The standard device nodes and links of runc's default /dev.
        let chr = |path: &str, major: u32, minor: u32| -> Result<Device, SandboxError> {
            Ok(Device {
                path: cstr(path)?,
                mode: libc::S_IFCHR | 0o666,
                dev: libc::makedev(major, minor),
            })
        };
        let devices = vec![
            chr("/dev/null", 1, 3)?,
            chr("/dev/zero", 1, 5)?,
            chr("/dev/full", 1, 7)?,
            chr("/dev/random", 1, 8)?,
            chr("/dev/urandom", 1, 9)?,
            chr("/dev/tty", 5, 0)?,
        ];
        let mut dev_links = Vec::new();
        for (target, link) in [
            ("/proc/self/fd", "/dev/fd"),
            ("/proc/self/fd/0", "/dev/stdin"),
            ("/proc/self/fd/1", "/dev/stdout"),
            ("/proc/self/fd/2", "/dev/stderr"),
            ("pts/ptmx", "/dev/ptmx"),
        ] {
            dev_links.push((cstr(target)?, cstr(link)?));
        }
        let strings = |v: &Value| -> Result<Vec<CString>, SandboxError> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str())
                .map(cstr)
                .collect()
        };
        let masked = strings(&config["linux"]["maskedPaths"])?;
        let readonly = strings(&config["linux"]["readonlyPaths"])?;
        let process = &config["process"];
        let mut rlimits = Vec::new();
        for r in process["rlimits"].as_array().into_iter().flatten() {
            let res = match r["type"].as_str() {
                Some("RLIMIT_NOFILE") => libc::RLIMIT_NOFILE,
                Some("RLIMIT_NPROC") => libc::RLIMIT_NPROC,
                Some("RLIMIT_CORE") => libc::RLIMIT_CORE,
                other => {
                    return Err(SandboxError::Unsupported(format!(
                        "the native sandbox does not set {other:?}"
                    )))
                }
            };
            rlimits.push((
                res as c_int,
                r["soft"].as_u64().unwrap_or(0),
                r["hard"].as_u64().unwrap_or(0),
            ));
        }
        let mut caps = 0u64;
        for name in process["capabilities"]["bounding"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let name = name.as_str().unwrap_or_default();
            let n = CAP_NAMES
                .iter()
                .position(|c| *c == name)
                .ok_or_else(|| SandboxError::Unsupported(format!("unknown capability {name}")))?;
            caps |= 1 << n;
        }
        let filter = self.filter(&config["linux"]["seccomp"])?;
        let argv0 = c.argv.first().map(String::as_str).unwrap_or_default();
        let exec = exec_candidates(argv0, &c.env)
            .into_iter()
            .map(cstr)
            .collect::<Result<Vec<_>, _>>()?;
        let argv_owned = c.argv.iter().map(cstr).collect::<Result<Vec<_>, _>>()?;
        let mut env_owned = c
            .env
            .iter()
            .map(|(k, v)| cstr(format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        if !c.env.iter().any(|(k, _)| k == "HOME") {
            // As runc: the user's home from the image's /etc/passwd, else /.
            env_owned.push(cstr(format!("HOME={}", home_of(confined, c.user.uid)))?);
        }
        let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|s| s.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = env_owned.iter().map(|s| s.as_ptr()).collect();
        envp.push(std::ptr::null());
        let plan = Plan {
            scratch: cstr(self.scratch().as_os_str().as_bytes())?,
            files: scratch_files,
            rootfs: cstr(rootfs.as_os_str().as_bytes())?,
            binds,
            mounts,
            devices,
            dev_links,
            masked,
            readonly,
            hostname: cstr(config["hostname"].as_str().unwrap_or(oci::HOSTNAME))?,
            netns: -1,
            loopback,
            rlimits,
            cwd: cstr(process["cwd"].as_str().unwrap_or("/"))?,
            uid: c.user.uid,
            gid: c.user.gid,
            caps,
            last_cap: self.last_cap,
            filter: filter.as_ref().clone(),
            exec,
            argv,
            envp,
            _strings: (argv_owned, env_owned),
            stdio,
            go: go.0,
            go_parent: go.1,
            report,
            fd_limit: fd_limit(),
            started: -1,
        };
        Ok((plan, flags))
    }
}

/// A failed set-up, as the step's error.
enum SetupError {
    /// The command could not be started: its status as a shell gives it (127 not found,
    /// 126 not executable), and why, for the log.
    Exec {
        note: String,
        error: SandboxError,
    },
    Other(SandboxError),
}

/// What a failed set-up step means, for the step's error.
fn setup_error(c: &RunConfig, plan: &Plan, stage: Stage, index: usize, errno: i32) -> SetupError {
    let err = std::io::Error::from_raw_os_error(errno);
    let argv0 = c.argv.first().cloned().unwrap_or_default();
    let at = |v: &[CString]| {
        v.get(index)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let message = match stage {
        Stage::Exec => {
            let (status, why) = match errno {
                libc::ENOENT | libc::ENOTDIR if argv0.contains('/') => {
                    (127, "no such command in the image".to_string())
                }
                libc::ENOENT | libc::ENOTDIR => (
                    127,
                    format!("no such command in the image (PATH is {})", plan_path(c)),
                ),
                libc::EACCES => (126, "not executable (permission denied)".to_string()),
                _ => (126, err.to_string()),
            };
            let cmd = obuilder_engine::exec::Cmd::new(c.argv.clone()).display();
            return SetupError::Exec {
                note: format!("cannot run `{argv0}`: {why}"),
                error: SandboxError::Failed { cmd, status },
            };
        }
        Stage::Workdir => format!("cannot make the working directory {}: {err}", c.cwd),
        Stage::Chdir => format!("cannot enter the working directory {}: {err}", c.cwd),
        Stage::Bind | Stage::BindOpen | Stage::BindRemount => format!(
            "cannot mount /{} into the step: {err}",
            plan.binds
                .get(index)
                .map(|b| b.target.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        Stage::Mount | Stage::Mkdir => format!(
            "cannot mount {} in the step: {err}",
            plan.mounts
                .get(index)
                .map(|m| m.target.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        Stage::Mask => format!("cannot mask {}: {err}", at(&plan.masked)),
        Stage::ReadOnly => format!("cannot make {} read-only: {err}", at(&plan.readonly)),
        other => format!("the native sandbox could not set up the step ({other:?} {index}): {err}"),
    };
    SetupError::Other(SandboxError::Unsupported(message))
}

/// A set-up failure of the child, if it reported one: stage, index, errno, written before
/// it exited. (Non-blocking: a process cloned meanwhile for another step may hold a copy
/// of the write end until its own execve.)
fn setup_failure(
    c: &RunConfig,
    plan: &Plan,
    report_r: &OwnedFd,
    log: &StepLog,
) -> Option<SandboxError> {
    let _ = rustix::fs::fcntl_setfl(report_r, rustix::fs::OFlags::NONBLOCK);
    let mut buf = [0u8; 12];
    if rustix::io::read(report_r, &mut buf) != Ok(12) {
        return None;
    }
    let word = |i: usize| [buf[i], buf[i + 1], buf[i + 2], buf[i + 3]];
    let stage = Stage::from_u32(u32::from_ne_bytes(word(0))).unwrap_or(Stage::Exec);
    let index = u32::from_ne_bytes(word(4)) as usize;
    let errno = i32::from_ne_bytes(word(8));
    Some(match setup_error(c, plan, stage, index, errno) {
        SetupError::Exec { note, error } => {
            let _ = log.write(format!("obuilder: {note}\n").as_bytes());
            error
        }
        SetupError::Other(e) => e,
    })
}

fn plan_path(c: &RunConfig) -> String {
    c.env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or_else(|| "not set".into(), |(_, v)| v.clone())
}

#[async_trait]
impl Sandbox for NativeSandbox {
    /// Numeric users only, as the runc sandbox.
    fn user(&self, user: &User) -> Result<UserIds, SandboxError> {
        crate::numeric_user(user, "native")
    }

    /// On the builder's thread: the step's network namespace is reserved here (the step
    /// waits for it), and made on a thread of its own, which also starts the spawner.
    fn warm(&self) {
        self.ahead.start();
    }

    async fn recover(&self) -> Result<(), SandboxError> {
        let d = self.scratch();
        std::fs::create_dir_all(&d).map_err(io("cannot create", &d))?;
        // Only the process that is alone on the store recovers: every record left is a
        // dead builder's. (A dead builder's step processes died with it, by the pid
        // namespace and PR_SET_PDEATHSIG: what a record finds is mostly empty directories.)
        let records: Vec<PathBuf> = std::fs::read_dir(&d)
            .map_err(io("cannot list", &d))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(RECORD_PREFIX))
            .map(|e| e.path())
            .collect();
        if !records.is_empty() {
            cgroup::remove_stale();
            for r in records {
                let _ = std::fs::remove_file(r);
            }
        }
        Ok(())
    }

    async fn kill_stale(&self, _rootfs: &Path) -> Result<(), SandboxError> {
        // A step's processes die with its first one or with its builder: none can be
        // left on a tree.
        Ok(())
    }

    async fn run(
        &self,
        c: &RunConfig,
        rootfs: &Path,
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<(), SandboxError> {
        let confined = ConfinedRoot::open(rootfs).map_err(io("cannot open", rootfs))?;
        if let Some(argv0) = c.argv.first() {
            crate::runc::check_command(&confined, argv0)?;
        }
        let scratch = self.scratch();
        std::fs::create_dir_all(&scratch).map_err(io("cannot create", &scratch))?;
        let mut files = vec![ScratchFile {
            path: cstr(scratch.join("hosts").as_os_str().as_bytes())?,
            data: b"127.0.0.1 localhost builder\n".to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
        }];
        let mut secret_paths = Vec::new();
        for (i, s) in c.secrets.iter().enumerate() {
            let p = scratch.join(format!("secret-{i}"));
            secret_paths.push(p.to_string_lossy().into_owned());
            files.push(ScratchFile {
                path: cstr(p.as_os_str().as_bytes())?,
                data: s.value.clone(),
                mode: 0o400,
                uid: c.user.uid,
                gid: c.user.gid,
            });
        }
        let host_files = HostFiles {
            hosts: scratch.join("hosts").to_string_lossy().into_owned(),
            resolv_conf: "/etc/resolv.conf".into(),
            secrets: secret_paths,
        };
        let config = oci::config(c, &rootfs.to_string_lossy(), &host_files, &self.limits)?;
        // Secret targets that did not exist are removed after the step (see runc.rs).
        let made: Vec<Vec<String>> = c
            .secrets
            .iter()
            .map(|s| confined::missing_components(&confined, &s.target))
            .collect();
        let result = self
            .run_in(c, rootfs, &confined, &config, files, log, cancel)
            .await;
        for paths in made {
            confined::remove_made(&confined, &paths);
        }
        result
    }
}

impl Drop for NativeSandbox {
    fn drop(&mut self) {
        // Each step removed its own cgroups: none of this sandbox's is left when its
        // record goes. (Namespaces made ahead for steps that never ran go with their
        // descriptors, whenever their threads end.)
        if let Some(p) = self.record.get() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Restores the builder's process group as the terminal's foreground when dropped.
struct Foreground {
    tty: RawFd,
}

impl Drop for Foreground {
    fn drop(&mut self) {
        unsafe {
            // Taking the terminal back from the background: SIGTTOU must not stop us.
            let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            libc::tcsetpgrp(self.tty, libc::getpgrp());
            libc::signal(libc::SIGTTOU, old);
        }
    }
}

impl NativeSandbox {
    #[allow(clippy::too_many_arguments)]
    async fn run_in(
        &self,
        c: &RunConfig,
        rootfs: &Path,
        confined: &ConfinedRoot,
        config: &Value,
        files: Vec<ScratchFile>,
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<(), SandboxError> {
        let tty = c.stdin
            && std::io::IsTerminal::is_terminal(&std::io::stdin())
            && std::io::IsTerminal::is_terminal(&std::io::stdout());
        let (out_r, out_w) = pipe()?;
        let (go_r, go_w) = pipe()?;
        let (report_r, report_w) = pipe()?;
        let null = std::fs::File::open("/dev/null").map_err(io("cannot open", "/dev/null"))?;
        let stdio = if tty {
            [0, 1, 2]
        } else {
            [
                if c.stdin { 0 } else { null.as_raw_fd() },
                out_w.as_raw_fd(),
                out_w.as_raw_fd(),
            ]
        };
        let (mut plan, mut flags) = self.plan(
            c,
            config,
            rootfs,
            confined,
            files,
            stdio,
            (go_r.as_raw_fd(), go_w.as_raw_fd()),
            report_w.as_raw_fd(),
        )?;
        // The step's network namespace, made while its tree was made if it was: the child
        // joins it instead of the clone making one. (The descriptor is held until the
        // child has its copy.)
        let netns = self
            .ahead
            .take()
            .filter(|_| flags & libc::CLONE_NEWNET as u64 != 0);
        if let Some(fd) = &netns {
            flags &= !(libc::CLONE_NEWNET as u64);
            plan.netns = fd.as_raw_fd();
            plan.loopback = false;
        }
        // (The record first: from here a cgroup of this process may exist.)
        self.make_record();
        let name = step_name();
        let (pid, pidfd, plan) = match spawn(plan, flags) {
            Ok(p) => p,
            Err(e) => {
                // The default sandbox on Linux: say what it needs, and the other way.
                return Err(SandboxError::Unsupported(format!(
                    "the native sandbox cannot start a step: {e} (it needs root, Linux 5.3+ \
                     and new mount, pid, ipc, uts and network namespaces; `--sandbox runc` \
                     runs the same container with runc)"
                )));
            }
        };
        drop(netns);
        let pidfd = Arc::new(pidfd);
        // The child sets up its tree until `pivot_root`, then waits for `go` before it
        // joins the network namespace or runs anything of the step's: its cgroups are made
        // meanwhile (0.3 to 0.5 ms of directories and limits, off the step's path), and it
        // is put in them first.
        let (cgroups, unapplied) =
            cgroup::StepCgroups::create(&name, self.opts.max_pids, self.opts.max_memory);
        for what in unapplied {
            let _ = log.write(format!("obuilder: warning: not applied: {what}\n").as_bytes());
        }
        if let Err(e) = cgroups.add(pid) {
            kill(&pidfd);
            let _ = wait(&pidfd);
            cgroups.remove();
            // (A child that failed before `go` has exited: its own error says why.)
            return Err(setup_failure(c, &plan, &report_r, log).unwrap_or_else(|| {
                SandboxError::io("cannot add the step to its cgroup", &name)(e)
            }));
        }
        let _foreground = if tty {
            unsafe {
                libc::setpgid(pid, pid);
                let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
                libc::tcsetpgrp(0, pid);
                libc::signal(libc::SIGTTOU, old);
            }
            Some(Foreground { tty: 0 })
        } else {
            None
        };
        let _ = rustix::io::write(&go_w, b"g");
        // The child's ends: once it has exec'd (or died), only it holds them.
        drop((go_r, report_w, out_w, null));
        let pumping = crate::pump(out_r, log.clone());
        let waiter = wait_async(&pidfd);
        tokio::pin!(waiter);
        let ended = tokio::select! {
            r = &mut waiter => Some(r),
            _ = cancel.cancelled() => None,
        };
        let ended = match ended {
            Some(r) => r,
            None => {
                cgroups.kill();
                kill(&pidfd);
                let _ = waiter.await;
                let _ = pumping.await;
                cgroups.remove();
                return Err(SandboxError::Cancelled);
            }
        };
        let ended = ended.map_err(io("cannot wait for the step", &name))?;
        drop(go_w);
        let _ = pumping.await;
        cgroups.remove();
        if let Some(e) = setup_failure(c, &plan, &report_r, log) {
            return Err(e);
        }
        let (code, signal) = match ended {
            Ended::Exited(code) => (Some(code), None),
            Ended::Signalled(sig) => (None, Some(sig)),
        };
        crate::runc::step_status(
            &c.argv,
            code,
            signal,
            self.opts.max_pids,
            self.opts.max_memory,
            log,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_are_looked_up_in_the_step_path() {
        let env = vec![("PATH".to_string(), "/usr/bin:/bin/".to_string())];
        assert_eq!(exec_candidates("sh", &env), ["/usr/bin/sh", "/bin/sh"]);
        assert_eq!(exec_candidates("./x", &env), ["./x"]);
        assert_eq!(exec_candidates("/bin/sh", &[]), ["/bin/sh"]);
        assert_eq!(exec_candidates("ls", &[]).len(), 6);
    }

    /// A namespace made ahead is a new one (not the builder's), with its loopback up, and
    /// serves one step: taking another without starting one gives none.
    #[test]
    fn a_network_namespace_made_ahead_is_new_with_its_loopback_up() {
        use std::os::unix::fs::MetadataExt;
        if !testkit::require(module_path!(), &[testkit::Cap::Root]) {
            return;
        }
        let ahead = Ahead::default();
        assert!(ahead.take().is_none());
        ahead.start();
        let fd = ahead.take().expect("a network namespace made ahead");
        assert!(ahead.take().is_none(), "one per start");
        let host = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        let made = std::fs::File::from(fd.try_clone().unwrap())
            .metadata()
            .unwrap()
            .ino();
        assert_ne!(host, made, "the builder's own namespace");
        // Joined on a thread of its own: its loopback is up there.
        let up = std::thread::spawn(move || unsafe {
            assert_eq!(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET), 0);
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            let mut req = child::IfFlags {
                name: [0; 16],
                flags: 0,
                _pad: [0; 22],
            };
            req.name[..2].copy_from_slice(b"lo");
            assert_eq!(libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut req), 0);
            libc::close(s);
            req.flags & libc::IFF_UP as i16 != 0
        })
        .join()
        .unwrap();
        assert!(up, "the loopback is down");
    }

    /// A step's first process shares the builder's memory until its `execve`: what it
    /// runs (set-up as root, the step as its user) leaves the builder as it was, and its
    /// end is seen through the pid descriptor.
    #[test]
    fn a_step_shares_the_builders_memory_without_changing_it() {
        if !testkit::require(
            module_path!(),
            &[testkit::Cap::Root, testkit::Cap::File("/bin/busybox")],
        ) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        testkit::e2e::make_busybox(&rootfs);
        let sandbox = NativeSandbox::new(&dir.path().join("state"), NativeOptions::default());
        let log_path = dir.path().join("log");
        let log = StepLog::create(&log_path).unwrap();
        let config = |argv: &[&str], uid| RunConfig {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/".into(),
            user: UserIds { uid, gid: uid },
            user_name: None,
            network: Vec::new(),
            caches: Vec::new(),
            secrets: Vec::new(),
            stdin: false,
        };
        let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let cancel = CancellationToken::new();
            for uid in [0, 1000] {
                sandbox
                    .run(
                        &config(&["/bin/sh", "-c", "echo ran-as-$(id -u)"], uid),
                        &rootfs,
                        &log,
                        &cancel,
                    )
                    .await
                    .unwrap();
            }
            let e = sandbox
                .run(
                    &config(&["/bin/sh", "-c", "exit 3"], 1000),
                    &rootfs,
                    &log,
                    &cancel,
                )
                .await
                .unwrap_err();
            assert!(e.to_string().contains("status 3"), "{e}");
            let e = sandbox
                .run(&config(&["/no/such/command"], 0), &rootfs, &log, &cancel)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("does not exist"), "{e}");
        });
        log.finish();
        let out = std::fs::read_to_string(&log_path).unwrap();
        assert!(
            out.contains("ran-as-0") && out.contains("ran-as-1000"),
            "{out}"
        );
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE) }, dumpable);
    }

    #[test]
    fn stages_go_through_the_report_pipe_as_numbers() {
        for n in 1..=28 {
            assert_eq!(Stage::from_u32(n).unwrap().number(), n);
        }
        assert_eq!(Stage::from_u32(1), Some(Stage::Propagation));
        assert_eq!(Stage::from_u32(28), Some(Stage::Exec));
        assert_eq!(Stage::from_u32(0), None);
        assert_eq!(Stage::from_u32(29), None);
    }

    #[test]
    fn kernel_file_systems_are_not_bind_targets() {
        assert!(under_kernel_fs("/proc"));
        assert!(under_kernel_fs("/dev/shm/x"));
        assert!(!under_kernel_fs("/devel"));
        assert!(!under_kernel_fs("/root/.cache"));
    }

    #[test]
    fn every_capability_of_the_config_is_known() {
        for c in oci::CAPABILITIES {
            assert!(CAP_NAMES.contains(&c), "{c}");
        }
        assert_eq!(CAP_NAMES[21], "CAP_SYS_ADMIN");
        assert_eq!(CAP_NAMES[40], "CAP_CHECKPOINT_RESTORE");
    }
}
