#![cfg(target_os = "linux")]
//! The runc sandbox's exact commands, through the command seam (no root, no runc needed).

use std::sync::Arc;

use obuilder_engine::log::StepLog;
use obuilder_engine::sandbox::{RunConfig, Sandbox, UserIds};
use obuilder_engine::CancellationToken;
use obuilder_sandbox::{RuncOptions, RuncSandbox};
use testkit::RecordingExec;

fn config() -> RunConfig {
    RunConfig {
        argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
        env: vec![],
        cwd: "/".into(),
        user: UserIds { uid: 0, gid: 0 },
        user_name: None,
        network: vec![],
        caches: vec![],
        secrets: vec![],
        stdin: false,
    }
}

/// A tree with the `/bin/sh` the config runs (the sandbox checks that it exists).
fn with_shell(rootfs: &std::path::Path) {
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::write(rootfs.join("bin/sh"), "").unwrap();
}

/// Runs `config()` once in a runc sandbox on `dir`; returns the commands it ran.
async fn run_once(dir: &std::path::Path, opts: RuncOptions) -> RecordingExec {
    let exec = RecordingExec::new();
    let sb = RuncSandbox::new(dir, opts, Arc::new(exec.clone()));
    std::fs::create_dir_all(dir.join("runc-tmp")).unwrap();
    with_shell(&dir.join("rootfs"));
    let log = StepLog::create(&dir.join("log")).unwrap();
    sb.run(
        &config(),
        &dir.join("rootfs"),
        &log,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    exec
}

#[tokio::test]
async fn recovery_deletes_every_leftover_container() {
    let dir = tempfile::tempdir().unwrap();
    let exec = RecordingExec::new();
    exec.answer(&["runc", "--root"], "obuilder-1-0\nobuilder-1-1\n");
    let sb = RuncSandbox::new(dir.path(), RuncOptions::default(), Arc::new(exec.clone()));
    // With no container state in runc's root, runc is not even asked.
    sb.recover().await.unwrap();
    assert!(exec.argvs().is_empty());
    std::fs::create_dir_all(dir.path().join("runc/obuilder-1-0")).unwrap();
    sb.recover().await.unwrap();
    let root = dir.path().join("runc").display().to_string();
    assert_eq!(
        exec.argvs(),
        [
            format!("runc --root {root} list -q"),
            format!("runc --root {root} delete --force obuilder-1-0"),
            format!("runc --root {root} delete --force obuilder-1-1"),
        ]
    );
}

#[tokio::test]
async fn a_run_is_one_runc_run_with_its_own_bundle_removed_after() {
    let dir = tempfile::tempdir().unwrap();
    let exec = run_once(
        dir.path(),
        RuncOptions {
            fast_sync: true,
            runc: "/usr/sbin/runc".into(),
            ..RuncOptions::default()
        },
    )
    .await;
    let calls = exec.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "the supervisor, then runc");
    let argv = &calls[1].argv;
    let id = argv.last().unwrap().clone();
    let prefix = format!("obuilder-{}-", std::process::id());
    assert!(
        id.strip_prefix(&prefix)
            .is_some_and(|n| n.parse::<u64>().is_ok()),
        "{id}"
    );
    let bundle = dir.path().join("runc-tmp").join(&id).display().to_string();
    assert_eq!(
        argv,
        &[
            "/usr/sbin/runc",
            "--root",
            &dir.path().join("runc").display().to_string(),
            "run",
            "--bundle",
            &bundle,
            &id
        ]
    );
    assert_eq!(calls[1].cwd.as_ref().unwrap().display().to_string(), bundle);
    // The supervisor that deletes the container if the builder dies: sh, its script,
    // then RUNC ROOT ID BUNDLE.
    let sup = &calls[0].argv;
    assert_eq!(&sup[..2], ["sh", "-c"]);
    assert_eq!(
        &sup[3..],
        [
            "obuilder-supervisor",
            "/usr/sbin/runc",
            &dir.path().join("runc").display().to_string(),
            &id,
            &bundle
        ]
    );
    assert!(
        !std::path::Path::new(&bundle).exists(),
        "the bundle (config, secrets) is removed after the run"
    );
}

#[tokio::test]
async fn unsupported_networks_fail_before_runc_starts() {
    let dir = tempfile::tempdir().unwrap();
    let exec = RecordingExec::new();
    let sb = RuncSandbox::new(dir.path(), RuncOptions::default(), Arc::new(exec.clone()));
    std::fs::create_dir_all(dir.path().join("runc-tmp")).unwrap();
    with_shell(dir.path());
    let log = StepLog::create(&dir.path().join("log")).unwrap();
    let mut c = config();
    c.network = vec!["nat".into()];
    let e = sb
        .run(&c, dir.path(), &log, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("unsupported network configuration"),
        "{e}"
    );
    assert!(exec.calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_missing_command_is_named_before_runc_starts() {
    let dir = tempfile::tempdir().unwrap();
    let exec = RecordingExec::new();
    let sb = RuncSandbox::new(dir.path(), RuncOptions::default(), Arc::new(exec.clone()));
    let log = StepLog::create(&dir.path().join("log")).unwrap();
    let mut c = config();
    c.argv[0] = "/bin/bash".into();
    let e = sb
        .run(&c, dir.path(), &log, &CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/bin/bash does not exist in the image") && e.contains("(shell /bin/sh -c)"),
        "{e}"
    );
    // A symlink resolved inside the tree counts (busybox images are all links).
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::fs::write(dir.path().join("bin/busybox"), "").unwrap();
    std::os::unix::fs::symlink("/bin/busybox", dir.path().join("bin/bash")).unwrap();
    std::fs::create_dir_all(dir.path().join("runc-tmp")).unwrap();
    sb.run(&c, dir.path(), &log, &CancellationToken::new())
        .await
        .unwrap();
    assert!(exec.argvs().iter().any(|a| a.contains(" run --bundle ")));
}

#[tokio::test]
async fn cancellation_kills_then_deletes_the_container() {
    let dir = tempfile::tempdir().unwrap();
    let exec = RecordingExec::new();
    exec.spawn_instead(&["sleep", "0.5"]);
    let sb = RuncSandbox::new(dir.path(), RuncOptions::default(), Arc::new(exec.clone()));
    std::fs::create_dir_all(dir.path().join("runc-tmp")).unwrap();
    with_shell(dir.path());
    let log = StepLog::create(&dir.path().join("log")).unwrap();
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        c2.cancel();
    });
    let e = sb
        .run(&config(), dir.path(), &log, &cancel)
        .await
        .unwrap_err();
    assert!(
        matches!(e, obuilder_engine::sandbox::SandboxError::Cancelled),
        "{e}"
    );
    let root = dir.path().join("runc").display().to_string();
    let argvs = exec.argvs();
    let id = exec.calls.lock().unwrap()[1].argv.last().unwrap().clone();
    assert_eq!(
        argvs[2..],
        [
            format!("runc --root {root} kill {id} KILL"),
            format!("runc --root {root} delete --force {id}")
        ]
    );
}

/// runc names a container's cgroup after its id: two sandboxes in one process (a worker
/// with two stores) must never use the same id, or one container joins the other's cgroup.
#[tokio::test]
async fn two_sandboxes_in_one_process_never_share_a_container_id() {
    let mut ids = Vec::new();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for _ in 0..3 {
        for dir in &dirs {
            let exec = run_once(dir.path(), RuncOptions::default()).await;
            ids.push(exec.calls.lock().unwrap()[1].argv.last().unwrap().clone());
        }
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");
}
