#![cfg(unix)]
//! The Docker sandbox's exact `docker run` argv, through the command seam: the flags only
//! Windows takes (`--isolation hyperv`, a `nat` network for `(network host)`) cannot run
//! here, so they are pinned (tests named `windows_seam_…`); Linux runs are tested for real
//! with podman in `obuilder/cli/tests/docker.rs`.

use std::path::PathBuf;
use std::sync::Arc;

use obuilder_engine::sandbox::{CacheMount, RunConfig, UserIds};
use obuilder_sandbox::docker::{DockerOptions, DockerSandbox};
use testkit::RecordingExec;

fn config() -> RunConfig {
    RunConfig {
        argv: vec!["cmd".into(), "/S".into(), "/C".into(), "echo hi".into()],
        env: vec![("PATH".into(), "C:/cygwin64/bin".into())],
        cwd: "C:/Users/opam".into(),
        user: UserIds { uid: 0, gid: 0 },
        user_name: None,
        network: vec!["host".into()],
        caches: vec![CacheMount {
            host: PathBuf::from("/var/lib/docker/volumes/v/_data"),
            target: "C:/Users/opam/AppData/Local/opam/download-cache".into(),
        }],
        secrets: vec![],
        stdin: false,
    }
}

/// A Docker sandbox with the default options, over a recording (fake) exec.
fn default_sandbox() -> DockerSandbox {
    DockerSandbox::new(
        std::path::Path::new("/state"),
        DockerOptions::default(),
        Arc::new(RecordingExec::new()),
    )
}

#[test]
fn windows_seam_run_argv_with_hyperv_isolation_limits_and_a_nat_network() {
    let sb = DockerSandbox::new(
        std::path::Path::new("/state"),
        DockerOptions {
            cli: "docker".into(),
            prefix: "obuilder-0123abcd".into(),
            cpus: Some(2.0),
            memory: Some("4g".into()),
            isolation: Some("hyperv".into()),
            network: Some("nat".into()),
        },
        Arc::new(RecordingExec::new()),
    );
    let argv = sb
        .run_argv(
            &config(),
            "obuilder-0123abcd-ID",
            "obuilder-0123abcd:PARENT",
            &[],
        )
        .unwrap();
    assert_eq!(
        argv.join(" "),
        "docker run --name obuilder-0123abcd-ID --hostname builder --workdir C:/Users/opam \
         --user 0:0 --cpus 2 --memory 4g --isolation hyperv --network nat \
         --env PATH=C:/cygwin64/bin \
         --mount type=bind,src=/var/lib/docker/volumes/v/_data,dst=C:/Users/opam/AppData/Local/opam/download-cache \
         --entrypoint cmd obuilder-0123abcd:PARENT /S /C echo hi"
    );
}

#[test]
fn windows_seam_no_network_unless_asked_and_secrets_read_only() {
    let sb = default_sandbox();
    let mut c = config();
    c.network.clear();
    c.caches.clear();
    c.secrets.push(obuilder_engine::sandbox::SecretMount {
        value: b"v".to_vec(),
        target: "/run/secrets/tok".into(),
    });
    let argv = sb
        .run_argv(&c, "C", "I", &[PathBuf::from("/state/docker-secrets/C/0")])
        .unwrap()
        .join(" ");
    assert!(argv.contains("--network none"), "{argv}");
    assert!(
        argv.contains(
            "--mount type=bind,src=/state/docker-secrets/C/0,dst=/run/secrets/tok,readonly"
        ),
        "{argv}"
    );
    assert!(
        !argv.contains("--isolation") && !argv.contains("--cpus"),
        "{argv}"
    );
    // A comma would split --mount's fields: refused.
    c.secrets[0].target = "/run/a,b".into();
    let e = sb
        .run_argv(&c, "C", "I", &[PathBuf::from("/s/0")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("comma"), "{e}");
}

/// `(user (name ContainerAdministrator))`, the original's Windows user: given to `--user`
/// by name; a name the CLI would take apart is refused.
#[test]
fn windows_seam_a_user_by_name() {
    use obuilder_engine::sandbox::Sandbox;
    use obuilder_spec::User;
    let sb = default_sandbox();
    let admin = User::Name("ContainerAdministrator".into());
    assert_eq!(sb.user(&admin).unwrap(), UserIds { uid: 0, gid: 0 });
    let mut c = config();
    c.user_name = Some("ContainerAdministrator".into());
    let argv = sb.run_argv(&c, "C", "I", &[]).unwrap().join(" ");
    assert!(
        argv.contains("--workdir C:/Users/opam --user ContainerAdministrator --network"),
        "{argv}"
    );
    for bad in ["", "a:b", "two words", "--privileged"] {
        let e = sb.user(&User::Name(bad.into())).unwrap_err().to_string();
        assert!(e.contains("one word"), "{bad:?}: {e}");
    }
}
