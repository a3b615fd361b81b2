#![cfg(unix)]
//! The FreeBSD jail sandbox through the command seam: FreeBSD cannot run here, so every
//! test (named `freebsd_seam_…`) pins the exact argv and sequence, with `RecordingExec`
//! standing in for `jail`, `jls` and `umount` (its `spawn` runs a harmless stand-in).

use std::path::PathBuf;
use std::sync::Arc;

use obuilder_engine::log::StepLog;
use obuilder_engine::sandbox::{
    CacheMount, RunConfig, Sandbox, SandboxError, SecretMount, UserIds,
};
use obuilder_engine::CancellationToken;
use obuilder_sandbox::jail::JailSandbox;
use testkit::RecordingExec;

struct Setup {
    dir: tempfile::TempDir,
    exec: RecordingExec,
    sb: JailSandbox,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("result/x/rootfs");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(
            rootfs.join("etc/passwd"),
            "# comment\nroot:*:0:0:Charlie &:/root:/bin/sh\nopam:*:1000:1000:opam:/home/opam:/bin/sh\n",
        )
        .unwrap();
        let exec = RecordingExec::new();
        let sb = JailSandbox::new(&dir.path().join("state"), Arc::new(exec.clone()));
        Setup { dir, exec, sb }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("result/x/rootfs")
    }

    async fn run(
        &self,
        c: &RunConfig,
        cancel: &CancellationToken,
    ) -> (Result<(), SandboxError>, String) {
        let log_path = self.dir.path().join("log");
        let log = StepLog::create(&log_path).unwrap();
        let r = self.sb.run(c, &self.rootfs(), &log, cancel).await;
        log.finish();
        (r, std::fs::read_to_string(&log_path).unwrap())
    }

    /// The commands run, with the temp dir written `D` and this process's id `PID`.
    fn calls(&self) -> Vec<String> {
        let d = self.dir.path().display().to_string();
        let pid = format!("obuilder_{}_", std::process::id());
        self.exec
            .argvs()
            .into_iter()
            .map(|c| c.replace(&d, "D").replace(&pid, "obuilder_PID_"))
            .collect()
    }
}

fn config() -> RunConfig {
    RunConfig {
        argv: vec!["/bin/sh".into(), "-c".into(), "echo 'it works'".into()],
        env: vec![
            ("HOME".into(), "/home/opam".into()),
            ("QUOTED".into(), "it's $(here)".into()),
        ],
        cwd: "/home/opam/src".into(),
        user: UserIds {
            uid: 1000,
            gid: 1000,
        },
        user_name: None,
        network: vec![],
        caches: vec![],
        secrets: vec![],
        stdin: false,
    }
}

/// The jail's command words after `command=`, as one string.
const SU: &str = "command=/usr/bin/su -l opam -c cd '/home/opam/src' && env 'HOME=/home/opam' 'QUOTED=it'\\''s $(here)' '/bin/sh' '-c' 'echo '\\''it works'\\'''";

#[tokio::test]
async fn freebsd_seam_a_step_runs_in_a_vnet_jail_and_is_always_torn_down() {
    let s = Setup::new();
    let mut c = config();
    let cache_host = s.dir.path().join("cache tmp/1-c-opam");
    c.caches.push(CacheMount {
        host: cache_host.clone(),
        target: "/home/opam/.opam/download-cache".into(),
    });
    // The stand-in for `jail -c` prints the fstab it was given into the step's log.
    let fstab = s
        .dir
        .path()
        .join(format!("state/jail/obuilder_{}_", std::process::id()));
    s.exec.spawn_instead(&[
        "sh",
        "-c",
        &format!("cat {}*.fstab; echo done", fstab.display()),
    ]);
    let (r, log) = s.run(&c, &CancellationToken::new()).await;
    r.unwrap();
    // The jail's number is whatever this process reached: read it back.
    let calls = s.calls();
    let name = calls[0]["jail -c name=".len()..]
        .split(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(name.starts_with("obuilder_PID_"), "{name}");
    assert_eq!(
        s.calls(),
        [
            format!(
                "jail -c name={name} path=D/result/x/rootfs mount.devfs mount.fstab=D/state/jail/{name}.fstab vnet host.hostname=builder exec.start=/sbin/ifconfig lo0 127.0.0.1/8 {SU}"
            ),
            format!("jail -r {name}"),
            format!("/sbin/umount -a -F D/state/jail/{name}.fstab"),
            "/sbin/umount D/result/x/rootfs/dev".to_string(),
        ]
    );
    // nullfs caches, with the space escaped as fstab(5) wants.
    let d = s.dir.path().display();
    assert_eq!(
        log,
        format!(
            "{d}/cache\\040tmp/1-c-opam {d}/result/x/rootfs/home/opam/.opam/download-cache nullfs rw 0 0\ndone\n"
        )
    );
    // The workdir and the cache's mount point were made in the tree; the fstab is gone.
    assert!(s.rootfs().join("home/opam/src").is_dir());
    assert!(s.rootfs().join("home/opam/.opam/download-cache").is_dir());
    assert_eq!(
        std::fs::read_dir(s.dir.path().join("state/jail"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn freebsd_seam_host_network_a_failing_step_and_root() {
    let s = Setup::new();
    let mut c = config();
    c.network = vec!["host".into()];
    c.user = UserIds { uid: 0, gid: 0 };
    c.env.clear();
    c.cwd = "/".into();
    s.exec.spawn_instead(&["sh", "-c", "exit 3"]);
    let (r, _) = s.run(&c, &CancellationToken::new()).await;
    match r {
        Err(SandboxError::Failed { status: 3, cmd }) => {
            assert!(cmd.contains("echo 'it works'"), "{cmd}")
        }
        other => panic!("{other:?}"),
    }
    let calls = s.calls();
    assert_eq!(calls.len(), 3, "{calls:#?}");
    assert!(
        calls[0].ends_with(
            "path=D/result/x/rootfs mount.devfs ip4=inherit ip6=inherit host=inherit command=/usr/bin/su -l root -c cd '/' && '/bin/sh' '-c' 'echo '\\''it works'\\'''"
        ),
        "{}",
        calls[0]
    );
    assert!(
        calls[1].starts_with("jail -r obuilder_PID_"),
        "torn down after a failure"
    );
    assert_eq!(
        calls[2], "/sbin/umount D/result/x/rootfs/dev",
        "no fstab, no umount -a"
    );
}

#[tokio::test]
async fn freebsd_seam_cancel_removes_the_jail_then_tears_down() {
    let s = Setup::new();
    // A command that outlives the cancel (the stand-in ignores `jail -r`; it ends in 1 s).
    s.exec.spawn_instead(&["sleep", "1"]);
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        c2.cancel();
    });
    let (r, _) = s.run(&config(), &cancel).await;
    assert!(matches!(r, Err(SandboxError::Cancelled)), "{r:?}");
    let calls = s.calls();
    assert_eq!(calls.len(), 4, "{calls:#?}");
    assert!(calls[0].starts_with("jail -c "));
    assert_eq!(
        calls[1], calls[2],
        "jail -r on cancel, and again in the teardown"
    );
    assert!(calls[1].starts_with("jail -r obuilder_PID_"));
    assert_eq!(calls[3], "/sbin/umount D/result/x/rootfs/dev");
}

#[tokio::test]
async fn freebsd_seam_refusals_run_nothing() {
    let s = Setup::new();
    let mut c = config();
    c.secrets.push(SecretMount {
        value: b"s".to_vec(),
        target: "/run/secret".into(),
    });
    let (r, _) = s.run(&c, &CancellationToken::new()).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("cannot mount secrets"), "{e}");

    let mut c = config();
    c.user = UserIds { uid: 4242, gid: 0 };
    let (r, _) = s.run(&c, &CancellationToken::new()).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("no user with uid 4242"), "{e}");

    // /etc/passwd pointing out of the tree is not followed to the host's.
    std::fs::remove_file(s.rootfs().join("etc/passwd")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", s.rootfs().join("etc/passwd")).unwrap();
    let mut c = config();
    c.user = UserIds { uid: 0, gid: 0 };
    let (r, _) = s.run(&c, &CancellationToken::new()).await;
    assert!(r.unwrap_err().to_string().contains("no user with uid 0"));
    assert!(s.calls().is_empty(), "{:?}", s.calls());

    let e =
        s.sb.user(&obuilder_spec::User::Name("opam".into()))
            .unwrap_err()
            .to_string();
    assert!(e.contains("(user (uid N) (gid N))"), "{e}");
}

#[tokio::test]
async fn freebsd_seam_a_workdir_through_a_symlink_stays_in_the_tree() {
    let s = Setup::new();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped");
    std::os::unix::fs::symlink(&target, s.rootfs().join("work")).unwrap();
    let mut c = config();
    c.cwd = "/work/src".into();
    // A dangling link: refused, nothing made on the host (the original's host-side
    // `mkdir -p` would have made it), no jail started.
    let (r, _) = s.run(&c, &CancellationToken::new()).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("cannot make the workdir"), "{e}");
    assert!(!target.exists(), "nothing made on the host");
    assert!(s.calls().is_empty());
    // A link whose target is in the tree is followed there.
    let inside = s.rootfs().join(target.strip_prefix("/").unwrap());
    std::fs::create_dir_all(&inside).unwrap();
    let (r, _) = s.run(&c, &CancellationToken::new()).await;
    r.unwrap();
    assert!(
        inside.join("src").is_dir(),
        "the link is followed inside the tree"
    );
    assert!(!target.exists());
}

#[tokio::test]
async fn freebsd_seam_recovery_removes_only_obuilder_jails() {
    let s = Setup::new();
    s.exec.answer(
        &["jls", "name"],
        "obuilder_77_0\nwebserver\nobuilder_77_3\n",
    );
    std::fs::create_dir_all(s.dir.path().join("state/jail")).unwrap();
    std::fs::write(s.dir.path().join("state/jail/obuilder_77_0.fstab"), "").unwrap();
    s.sb.recover().await.unwrap();
    assert_eq!(
        s.calls(),
        [
            "jls name",
            "jail -r obuilder_77_0",
            "jail -r obuilder_77_3",
            "/sbin/umount -a -F D/state/jail/obuilder_77_0.fstab",
        ]
    );
    assert!(!s.dir.path().join("state/jail/obuilder_77_0.fstab").exists());
}
