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
            windows: true,
        },
        Arc::new(RecordingExec::new()),
    );
    let mut c = config();
    // A Windows cache copy is a volume of the engine, named by the path's last part.
    c.caches[0].host = PathBuf::from("/store/state/docker-volumes/obuilder-0123abcd-ct-1-0-6f");
    let argv = sb
        .run_argv(&c, "obuilder-0123abcd-ID", "obuilder-0123abcd:PARENT", &[])
        .unwrap();
    assert_eq!(
        argv.join(" "),
        "docker run --name obuilder-0123abcd-ID --hostname builder --workdir C:/Users/opam \
         --user ContainerAdministrator --cpus 2 --memory 4g --isolation hyperv --network nat \
         --env PATH=C:/cygwin64/bin \
         --mount type=volume,src=obuilder-0123abcd-ct-1-0-6f,dst=C:/Users/opam/AppData/Local/opam/download-cache \
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

/// On an engine of Windows containers: numeric users other than root are refused (root is
/// ContainerAdministrator), and so are secrets (this host's files cannot be mounted there).
#[test]
fn windows_seam_numeric_users_and_secrets_are_refused_on_a_windows_engine() {
    use obuilder_engine::sandbox::Sandbox;
    use obuilder_spec::User;
    let sb = DockerSandbox::new(
        std::path::Path::new("/state"),
        DockerOptions {
            prefix: "obuilder-0123abcd".into(),
            windows: true,
            ..DockerOptions::default()
        },
        Arc::new(RecordingExec::new()),
    );
    assert_eq!(sb.user(&User::ROOT).unwrap(), UserIds { uid: 0, gid: 0 });
    // Hyper-V isolation unless told otherwise, as the original; a Unix-style workdir is
    // on C:, and the default shell is cmd's.
    let mut c = config();
    c.cwd = "/src".into();
    let argv = sb.run_argv(&c, "C", "I", &[]).unwrap().join(" ");
    assert!(argv.contains("--isolation hyperv"), "{argv}");
    assert!(argv.contains("--workdir C:/src "), "{argv}");
    assert_eq!(sb.default_shell(), ["cmd", "/S", "/C"]);
    let e = sb
        .user(&User::Unix {
            uid: 1000,
            gid: 1000,
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("by name"), "{e}");
    let mut c = config();
    c.secrets.push(obuilder_engine::sandbox::SecretMount {
        value: b"v".to_vec(),
        target: "C:/secret".into(),
    });
    let e = sb.run_argv(&c, "C", "I", &[]).unwrap_err().to_string();
    assert!(e.contains("secrets cannot"), "{e}");
}

/// A copy into a Windows container's `C:/src` lands at `/src` of the tree the store
/// extracts from `C:/`; backslashes are separators; another drive is refused.
#[test]
fn windows_seam_copy_destinations_are_paths_from_c() {
    use obuilder_sandbox::docker::windows_copy_path;
    for (given, want) in [
        ("C:/src/./", "/src/./"),
        ("c:\\Users\\opam\\", "/Users/opam/"),
        ("C:", "/"),
        ("/src/a.opam", "/src/a.opam"),
    ] {
        assert_eq!(windows_copy_path(given).unwrap(), want, "{given}");
    }
    let e = windows_copy_path("D:/data/").unwrap_err().to_string();
    assert!(e.contains("C: drive only"), "{e}");
}
