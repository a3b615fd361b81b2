#![cfg(target_os = "linux")]
//! A whole builder on a docker: store of an engine of Windows containers, through the
//! command seam (no Windows engine here): the real engine, database and Docker sandbox,
//! with every `docker` command recorded and answered by `RecordingExec` (a fake), which
//! prints what a Windows container would for the step.

use std::sync::Arc;

use obuilder_config::{healthcheck, BuilderConfig, HealthcheckOptions, StoreSpec};
use obuilder_stores::docker::{prefix, Platform};
use testkit::RecordingExec;

/// The worker's healthcheck on a Windows engine: no busybox (a Linux image), but
/// servercore pulled by the engine and `echo` run by `cmd` as ContainerAdministrator in a
/// Hyper-V container; its step is removed after it, not the base (real builds share it).
#[tokio::test]
async fn windows_seam_the_healthcheck_builds_on_servercore_with_cmd() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let p = prefix(&root);
    let exec = RecordingExec::windows_engine();
    let id = format!("sha256:{}", "cd".repeat(32));
    exec.answer(
        &["docker", "image", "inspect", "--format", "{{.Id}}"],
        &format!("{id}\n"),
    );
    exec.answer(
        &["docker", "image", "inspect", "--format", "{{json .Config}}"],
        r#"{"Env":["PATH=C:\\Windows\\system32;C:\\Windows"],"User":"ContainerAdministrator"}"#,
    );
    exec.answer(
        &["docker", "image", "inspect", "--format"],
        "null\n[\"c:\\\\windows\\\\system32\\\\cmd.exe\"]\n",
    );
    // The step's container, as `docker run` of it prints.
    exec.spawn_instead(&["sh", "-c", "printf 'healthcheck\\r\\n'"]);
    let store = StoreSpec::Docker {
        root: root.clone(),
        cli: "docker".into(),
        platform: Platform::Windows,
        pull: false,
    };
    let mut config = BuilderConfig::new(store.clone());
    config.exec = Arc::new(exec.clone());
    let builder = config.open().await.expect("open on the recorded engine");
    let opts = HealthcheckOptions::for_store(&store);
    assert_eq!(
        opts.image.as_deref(),
        Some("mcr.microsoft.com/windows/servercore:ltsc2022")
    );
    healthcheck(&builder, &config.images(), &config.exec, &opts)
        .await
        .expect("healthcheck");
    let argvs = exec.argvs();
    let img = "mcr.microsoft.com/windows/servercore:ltsc2022";
    let pos = |prefix: &str| {
        argvs
            .iter()
            .position(|a| a.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {argvs:#?}"))
    };
    let pull = pos(&format!("docker pull {img}"));
    let tag = pos(&format!("docker tag {id} {p}:"));
    let run = pos("docker run --name ");
    let commit = pos("docker commit --change=ENTRYPOINT [] --change=CMD [\"c:\\\\windows\\\\system32\\\\cmd.exe\"] ");
    let rmi = pos(&format!("docker rmi {p}:"));
    let run_at = run;
    assert!(
        pull < tag && tag < run && run < commit && commit < rmi,
        "{argvs:#?}"
    );
    let run = &argvs[run];
    assert!(
        run.contains("--hostname builder --workdir C:/ --user ContainerAdministrator --isolation hyperv --network none")
            && run.contains("--env PATH=C:\\Windows\\system32;C:\\Windows")
            && run.ends_with(" /S /C echo healthcheck")
            && run.contains(" --entrypoint cmd "),
        "{run}"
    );
    // The step is gone again; the base, which builds on servercore share, stays.
    let rmis: Vec<&String> = argvs
        .iter()
        .filter(|a| a.starts_with("docker rmi "))
        .collect();
    assert_eq!(rmis.len(), 1, "{argvs:#?}");
    let step = rmis[0].rsplit(':').next().unwrap();
    assert!(
        argvs[run_at].contains(&format!("--name {p}-{step} ")),
        "the step's result: {rmis:?}"
    );
}
