//! `obuilderfs --scoreboard DIR --fallback DIR MOUNTPOINT`: mounts the filesystem and
//! serves it until SIGTERM or SIGINT, then unmounts.

use std::path::PathBuf;

use clap::Parser;

/// Gives each build user its own view of a fixed path. Every access to MOUNTPOINT by uid U
/// goes to the directory that the symlink SCOREBOARD/U names (an absolute path to a
/// directory); callers without one (root included) see the fallback directory. Symlinks
/// are never followed by the filesystem itself, and `..` never leaves a view. Runs as
/// root; unmounts on SIGTERM or SIGINT (and, with the default auto-unmount, when the
/// daemon dies: otherwise `umount -l MOUNTPOINT` clears a stale mount).
#[derive(Parser, Debug)]
#[command(name = "obuilderfs", version)]
struct Args {
    /// The directory of symlinks named by uid (e.g. 1000 -> /var/lib/obuilder/…/home).
    #[arg(long, value_name = "DIR")]
    scoreboard: PathBuf,
    /// What callers without a scoreboard entry see (an empty directory will do).
    #[arg(long, value_name = "DIR")]
    fallback: PathBuf,
    /// The uid the stored trees belong to (the obuilder user sandbox's first build uid):
    /// its files are shown to every caller as the caller's own, and what a caller creates
    /// is stored as this uid's, so that a tree made by one build user is every build
    /// user's. Without it, owners are shown as they are.
    #[arg(long, value_name = "UID")]
    owner: Option<u32>,
    /// Serve every read and write in the daemon. By default (Linux 6.9 and later, where
    /// the kernel has FUSE passthrough) an open file is read, written and mapped by the
    /// kernel straight from the stored file, at the speed of direct access.
    #[arg(long)]
    no_passthrough: bool,
    /// Leave the mount behind if the daemon dies (by default the FUSE helper unmounts).
    #[arg(long)]
    no_auto_unmount: bool,
    /// Where to mount (e.g. /usr/local).
    #[arg(value_name = "MOUNTPOINT")]
    mountpoint: PathBuf,
}

/// A line on stderr, which may have been closed (never a panic for it).
#[cfg_attr(not(any(target_os = "linux", target_os = "macos")), allow(dead_code))]
fn say(msg: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "obuilderfs: {msg}");
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("obuilderfs: {msg}");
    std::process::exit(1)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn main() {
    cli_docs::generate_if_asked(<Args as clap::CommandFactory>::command);
    let _ = Args::parse();
    fail("FUSE is supported on Linux and on macOS (macFUSE) only")
}

#[cfg(any(target_os = "linux", target_os = "macos"))]
fn main() {
    use fuser::MountOption;
    use obuilderfs::fs::ObuilderFs;
    use obuilderfs::resolve::Scoreboard;

    cli_docs::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // fuser warns of every operation it answers "not implemented" for.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=error")),
        )
        .init();
    for (what, dir) in [
        ("--scoreboard", &args.scoreboard),
        ("--fallback", &args.fallback),
    ] {
        if !dir.is_absolute() || !dir.is_dir() {
            fail(format!(
                "{what} {}: must be an absolute path to a directory",
                dir.display()
            ));
        }
    }
    // SIGTERM and SIGINT are taken by this thread only (sigwait below): block them before
    // the session's threads start, which inherit the mask.
    // SAFETY: plain signal-mask calls on a sigset_t this function owns.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let fs = ObuilderFs::new(
        Scoreboard {
            dir: args.scoreboard.clone(),
        },
        args.fallback.clone(),
    )
    .with_owner(args.owner)
    .with_passthrough(!args.no_passthrough);
    // The scoreboard as the mount's source, so that a builder can tell an obuilderfs that
    // serves its store from one serving another (a comma would split the option string).
    let sb = args.scoreboard.to_string_lossy();
    let fsname = if sb.contains([',', ' ', '\t', '\n', '\\']) {
        "obuilderfs".to_string()
    } else {
        format!("obuilderfs:{sb}")
    };
    let mut options = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype("obuilderfs".into()),
        MountOption::AllowOther,
        MountOption::DefaultPermissions,
    ];
    if !args.no_auto_unmount {
        options.push(MountOption::AutoUnmount);
    }
    let session = fuser::spawn_mount2(fs, &args.mountpoint, &options).unwrap_or_else(|e| {
        fail(format!(
            "cannot mount on {}: {e}",
            args.mountpoint.display()
        ))
    });
    if !args.no_auto_unmount {
        obuilderfs::fuse_ends_before_helper_wakes();
    }
    say(format_args!("mounted on {}", args.mountpoint.display()));
    let mut sig: libc::c_int = 0;
    // SAFETY: waits for one of the signals blocked above.
    unsafe { libc::sigwait(&set, &mut sig) };
    drop(session);
    obuilderfs::detach(&args.mountpoint);
    say(format_args!(
        "unmounted {} (signal {sig})",
        args.mountpoint.display()
    ));
}
