//! The FreeBSD jail sandbox (`--sandbox jail`), as the original's `sandbox.jail.ml`, with
//! its known faults fixed. Every command goes through the Exec seam; FreeBSD cannot run
//! here, so `tests/jail.rs` pins the exact argv and sequence of each path.
//!
//! A step runs as `jail -c name=obuilder_PID_N path=ROOTFS mount.devfs [mount.fstab=F]
//! NETWORK command=/usr/bin/su -l USER -c 'cd CWD && env K=V… ARGV…'`:
//! * NETWORK is `ip4=inherit ip6=inherit host=inherit` for `(network host)`, otherwise a
//!   `vnet` jail with only a loopback (`exec.start=/sbin/ifconfig lo0 127.0.0.1/8`) named
//!   `builder`.
//! * The user is the name `/etc/passwd` of the step's tree gives its uid, read without
//!   following symlinks out of the tree (the original read the path on the host, so a
//!   step could point it anywhere). The login shell (`su -l`) sources the user's profile
//!   (opam's environment); it must be a POSIX shell, as FreeBSD's default `sh` is.
//! * Every word of the command line is single-quoted with `'` escaped, env values
//!   included (the original wrote `K='V'` unescaped: a value with `'` broke the command
//!   or ran part of it as shell code).
//! * The workdir is made inside the tree through descriptors confined to it (the original
//!   ran `mkdir -p` on the host path, which a symlink in the tree could point outside).
//! * Caches are nullfs lines in a private fstab, their mount points made the same way;
//!   names with spaces are escaped as fstab(5) says.
//!
//! **Teardown on every path** (success, failure, cancel, an error starting): `jail -r NAME`
//! (kills what a step left detached, OBuilder #210), `umount -a -F FSTAB` when there were
//! caches, and `umount ROOTFS/dev`; each may find nothing to do. Cancel repeats `jail -r`
//! every 2 s until the jail's command is gone, for at most 5 minutes.
//!
//! Secrets are refused with a message: the original ignored them silently, so a step
//! expecting one failed later or, worse, ran without it. `obuilder check --platform
//! freebsd` warns about them.

use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use obuilder_engine::confined::{ConfinedRoot, Follow};
use obuilder_engine::exec::{Cmd, SharedExec};
use obuilder_engine::log::StepLog;
use obuilder_engine::sandbox::{RunConfig, Sandbox, SandboxError, UserIds};
use obuilder_engine::CancellationToken;
use obuilder_spec::User;

use crate::user::sh_quote;

static NEXT_JAIL: AtomicU64 = AtomicU64::new(0);

/// How often cancel repeats `jail -r`, and for how long at most.
const REMOVE_EVERY: Duration = Duration::from_secs(2);
const REMOVE_FOR: Duration = Duration::from_secs(300);

pub struct JailSandbox {
    exec: SharedExec,
    tmp: PathBuf,
}

fn io(what: &'static str, p: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> SandboxError {
    SandboxError::io(what, p)
}

/// The name of `uid` in the tree's `/etc/passwd`.
fn user_name(root: &ConfinedRoot, uid: u32) -> Result<String, SandboxError> {
    let not_found = || {
        SandboxError::Unsupported(format!(
            "no user with uid {uid} in the image's /etc/passwd: the jail sandbox runs a \
             step as a user of the image (add one, or use (user (uid 0) (gid 0)))"
        ))
    };
    let Some((dir, name)) = root
        .parent("/etc/passwd", Follow::InRoot)
        .map_err(|_| not_found())?
    else {
        return Err(not_found());
    };
    let fd = rustix::fs::openat(
        dir.as_fd(),
        name.as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|_| not_found())?;
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(4 << 20)
        .read_to_string(&mut text)
        .map_err(|_| not_found())?;
    let want = uid.to_string();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let (name, _pw, id) = (f.next()?, f.next()?, f.next()?);
            (id == want && !name.is_empty()).then(|| name.to_string())
        })
        .next()
        .ok_or_else(not_found)
}

/// A path as fstab(5) writes it: spaces, tabs and backslashes escaped.
fn fstab_escape(p: &str) -> String {
    p.replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
}

/// The shell command `su -l` runs: `cd CWD && env K=V… ARGV…`, every word quoted.
pub fn command_line(cwd: &str, env: &[(String, String)], argv: &[String]) -> String {
    let mut words = vec!["cd".to_string(), sh_quote(cwd), "&&".to_string()];
    if !env.is_empty() {
        words.push("env".into());
        words.extend(env.iter().map(|(k, v)| sh_quote(&format!("{k}={v}"))));
    }
    words.extend(argv.iter().map(|a| sh_quote(a)));
    words.join(" ")
}

impl JailSandbox {
    /// A sandbox keeping its fstabs under `state_dir/jail`.
    pub fn new(state_dir: &Path, exec: SharedExec) -> JailSandbox {
        JailSandbox {
            exec,
            tmp: state_dir.join("jail"),
        }
    }

    /// The `jail -c` argv for one step.
    pub fn jail_argv(
        name: &str,
        rootfs: &Path,
        fstab: Option<&Path>,
        c: &RunConfig,
        user: &str,
    ) -> Vec<String> {
        let mut argv = vec![
            "jail".to_string(),
            "-c".into(),
            format!("name={name}"),
            format!("path={}", rootfs.display()),
            "mount.devfs".into(),
        ];
        if let Some(f) = fstab {
            argv.push(format!("mount.fstab={}", f.display()));
        }
        if c.network.iter().any(|n| n == "host") {
            argv.extend(["ip4=inherit", "ip6=inherit", "host=inherit"].map(String::from));
        } else {
            argv.extend(
                [
                    "vnet",
                    "host.hostname=builder",
                    "exec.start=/sbin/ifconfig lo0 127.0.0.1/8",
                ]
                .map(String::from),
            );
        }
        argv.extend([
            "command=/usr/bin/su".to_string(),
            "-l".into(),
            user.to_string(),
            "-c".into(),
            command_line(&c.cwd, &c.env, &c.argv),
        ]);
        argv
    }

    /// Writes the fstab of a step's caches (none: no file), making their mount points in
    /// the tree.
    fn write_fstab(
        &self,
        root: &ConfinedRoot,
        rootfs: &Path,
        c: &RunConfig,
        name: &str,
    ) -> Result<Option<PathBuf>, SandboxError> {
        if c.caches.is_empty() {
            return Ok(None);
        }
        let mut text = String::new();
        for m in &c.caches {
            root.create_dirs(&m.target, 0o755, None).map_err(io(
                "cannot make the cache mount point",
                root.shown(&m.target),
            ))?;
            let dst = rootfs.join(m.target.trim_start_matches('/'));
            text.push_str(&format!(
                "{} {} nullfs rw 0 0\n",
                fstab_escape(&m.host.to_string_lossy()),
                fstab_escape(&dst.to_string_lossy())
            ));
        }
        std::fs::create_dir_all(&self.tmp).map_err(io("cannot create", &self.tmp))?;
        let path = self.tmp.join(format!("{name}.fstab"));
        std::fs::write(&path, text).map_err(io("cannot write", &path))?;
        Ok(Some(path))
    }

    /// `jail -r`, then the unmounts; every error ignored (each may find nothing to do).
    async fn teardown(&self, name: &str, rootfs: &Path, fstab: Option<&Path>) {
        let _ = self.exec.output(&Cmd::new(["jail", "-r", name])).await;
        if let Some(f) = fstab {
            let f = f.to_string_lossy();
            let _ = self
                .exec
                .output(&Cmd::new(["/sbin/umount", "-a", "-F", &f]))
                .await;
            let _ = std::fs::remove_file(f.as_ref());
        }
        let dev = rootfs.join("dev").to_string_lossy().into_owned();
        let _ = self.exec.output(&Cmd::new(["/sbin/umount", &dev])).await;
    }

    async fn run_jail(
        &self,
        c: &RunConfig,
        argv: Vec<String>,
        name: &str,
        rootfs: &Path,
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<(), SandboxError> {
        let cmd = Cmd::new(argv.clone()).cwd(rootfs);
        let (mut child, pumping) =
            crate::spawn_to_log(&self.exec, &cmd, Stdio::null(), log, rootfs)?;
        let status = tokio::select! {
            s = child.wait() => Some(s.map_err(io("cannot wait for jail in", rootfs))?),
            _ = cancel.cancelled() => None,
        };
        let Some(status) = status else {
            // Removing the jail kills everything in it, and so ends its command.
            let deadline = tokio::time::Instant::now() + REMOVE_FOR;
            loop {
                let _ = self.exec.output(&Cmd::new(["jail", "-r", name])).await;
                match tokio::time::timeout(REMOVE_EVERY, child.wait()).await {
                    Ok(_) => break,
                    Err(_) if tokio::time::Instant::now() < deadline => {}
                    Err(_) => {
                        let _ = child.kill().await;
                        break;
                    }
                }
            }
            let _ = pumping.await;
            return Err(SandboxError::Cancelled);
        };
        let _ = pumping.await;
        crate::exit_result(&c.argv, status)
    }
}

#[async_trait]
impl Sandbox for JailSandbox {
    /// FreeBSD's images have no bash by default.
    fn default_shell(&self) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into()]
    }

    fn user(&self, user: &User) -> Result<UserIds, SandboxError> {
        crate::numeric_user(user, "jail")
    }

    /// Removes jails a crashed builder left (named `obuilder_*`) and their fstabs.
    async fn recover(&self) -> Result<(), SandboxError> {
        if let Ok(out) = self.exec.output(&Cmd::new(["jls", "name"])).await {
            for name in out.stdout_str().lines().map(str::trim) {
                if name.starts_with("obuilder_") {
                    tracing::info!("removing leftover jail {name}");
                    let _ = self.exec.output(&Cmd::new(["jail", "-r", name])).await;
                }
            }
        }
        for f in std::fs::read_dir(&self.tmp).into_iter().flatten().flatten() {
            let p = f.path();
            let _ = self
                .exec
                .output(&Cmd::new([
                    "/sbin/umount",
                    "-a",
                    "-F",
                    &p.to_string_lossy(),
                ]))
                .await;
            let _ = std::fs::remove_file(&p);
        }
        Ok(())
    }

    /// Removes the jail whose path is `rootfs`, if one is left.
    async fn kill_stale(&self, rootfs: &Path) -> Result<(), SandboxError> {
        if let Ok(out) = self.exec.output(&Cmd::new(["jls", "name", "path"])).await {
            for line in out.stdout_str().lines() {
                if let Some((name, path)) = line.split_once(' ') {
                    if Path::new(path.trim()) == rootfs {
                        let _ = self.exec.output(&Cmd::new(["jail", "-r", name])).await;
                    }
                }
            }
        }
        Ok(())
    }

    async fn run(
        &self,
        c: &RunConfig,
        rootfs: &Path,
        log: &StepLog,
        cancel: &CancellationToken,
    ) -> Result<(), SandboxError> {
        if !c.secrets.is_empty() {
            return Err(SandboxError::Unsupported(
                "the jail sandbox cannot mount secrets yet (the original ignored them); \
                 remove (secrets …) for FreeBSD, or build this step on Linux"
                    .into(),
            ));
        }
        if c.stdin {
            return Err(SandboxError::Unsupported(
                "the jail sandbox does not connect a terminal (obuilder shell/run -i)".into(),
            ));
        }
        let root = ConfinedRoot::open(rootfs).map_err(io("cannot open", rootfs))?;
        let user = user_name(&root, c.user.uid)?;
        root.create_dirs(&c.cwd, 0o755, None)
            .map_err(io("cannot make the workdir", root.shown(&c.cwd)))?;
        let name = format!(
            "obuilder_{}_{}",
            std::process::id(),
            NEXT_JAIL.fetch_add(1, Ordering::Relaxed)
        );
        let fstab = self.write_fstab(&root, rootfs, c, &name)?;
        let argv = JailSandbox::jail_argv(&name, rootfs, fstab.as_deref(), c, &user);
        let r = self.run_jail(c, argv, &name, rootfs, log, cancel).await;
        self.teardown(&name, rootfs, fstab.as_deref()).await;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_is_quoted_and_quotes_in_values_survive() {
        let env = vec![
            ("A".to_string(), "it's".to_string()),
            ("B".to_string(), "$(reboot)".to_string()),
        ];
        let argv = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            "echo 'hi' \"$A\"".into(),
        ];
        assert_eq!(
            command_line("/src dir", &env, &argv),
            r#"cd '/src dir' && env 'A=it'\''s' 'B=$(reboot)' '/bin/sh' '-c' 'echo '\''hi'\'' "$A"'"#
        );
        assert_eq!(command_line("/", &[], &argv[..1]), "cd '/' && '/bin/sh'");
        assert_eq!(fstab_escape("/a b\\c\td"), "/a\\040b\\134c\\011d");
    }
}
