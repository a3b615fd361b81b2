#![cfg(target_os = "linux")]
//! The exact commands the stores run, through the command seam (no root needed).

use std::sync::Arc;

use obuilder_engine::store::Store;
use obuilder_stores::btrfs::BtrfsStore;
use obuilder_stores::xfs::XfsStore;
use testkit::RecordingExec;

#[tokio::test]
async fn btrfs_command_sequence() {
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    let exec = RecordingExec::new();
    let store = BtrfsStore::new(&dir, Arc::new(exec.clone()));
    store.recover().await.unwrap();
    let d = store.prepare("a", None).await.unwrap();
    assert_eq!(
        exec.argvs(),
        [format!(
            "btrfs subvolume create {}/result-tmp/a",
            dir.display()
        )]
    );
    // (the recorder makes no subvolume: discard only removes the directory; snapshots and
    // the read-only flag are ioctls, exercised by the conformance suite on real btrfs)
    store.discard(&d).await.unwrap();
    assert!(!dir.join("result-tmp/a").exists());
}

#[tokio::test]
async fn xfs_command_sequence() {
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    let exec = RecordingExec::new();
    let store = XfsStore::new(&dir, Arc::new(exec.clone()));
    store.recover().await.unwrap();
    let d = store.prepare("a", None).await.unwrap();
    store.commit(&d).await.unwrap();
    store.prepare("b", Some("a")).await.unwrap();
    let r = dir.display();
    assert_eq!(
        exec.argvs(),
        [format!("cp --archive --reflink=always --no-target-directory {r}/result/a/rootfs {r}/result-tmp/b/rootfs")]
    );
}

#[tokio::test]
async fn a_failed_snapshot_leaves_nothing() {
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    let exec = RecordingExec::new();
    exec.fail(
        &["btrfs", "subvolume", "create"],
        "ERROR: not a btrfs filesystem",
    );
    let store = BtrfsStore::new(&dir, Arc::new(exec.clone()));
    store.recover().await.unwrap();
    let e = store.prepare("a", None).await.unwrap_err();
    assert!(e.to_string().contains("not a btrfs filesystem"), "{e}");
    assert!(!dir.join("result-tmp/a").exists());
    // A snapshot of a base that is not there: a clear error, nothing left.
    let e = store.prepare("b", Some("missing")).await.unwrap_err();
    assert!(e.to_string().contains("cannot snapshot"), "{e}");
    assert!(!dir.join("result-tmp/b").exists());
}

/// A fresh directory, removed with the returned guard.
fn tempfile_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("obuilder-store-cmds-")
        .tempdir()
        .unwrap()
}

#[tokio::test]
async fn rsync_command_sequences() {
    use obuilder_stores::rsync::{RsyncMode, RsyncStore};
    for (mode, checksum) in [
        (RsyncMode::Copy, None),
        (RsyncMode::Hardlink, Some(true)),
        (RsyncMode::HardlinkUnsafe, Some(false)),
    ] {
        let tmp = tempfile_dir();
        let dir = tmp.path().to_path_buf();
        let exec = RecordingExec::new();
        let store = RsyncStore::new(&dir, mode, Arc::new(exec.clone()));
        store.recover().await.unwrap();
        let a = store.prepare("a", None).await.unwrap();
        store.commit(&a).await.unwrap();
        let b = store.prepare("b", Some("a")).await.unwrap();
        // (what the recorded rsync would have made)
        std::fs::create_dir_all(&b.rootfs).unwrap();
        store.commit(&b).await.unwrap();
        let r = dir.display();
        let mut want = vec![format!(
            "rsync -aHq {r}/result/a/rootfs/ {r}/result-tmp/b/rootfs"
        )];
        if let Some(c) = checksum {
            want.push(format!(
                "rsync -aHq{} --link-dest={r}/result/a/rootfs {r}/result-tmp/b/rootfs/ {r}/result-tmp/b/rootfs.link/",
                if c { " --checksum" } else { "" }
            ));
        }
        assert_eq!(exec.argvs(), want, "{mode:?}");
        assert!(dir.join("result/b").is_dir(), "{mode:?}: published");
        assert!(
            dir.join("result/b/rootfs").is_dir(),
            "{mode:?}: the tree swapped in"
        );
        assert!(!dir.join("result-tmp/b").exists());
        assert!(
            !dir.join("result/b/rootfs.link").exists() && !dir.join("result/b/rootfs.old").exists()
        );
    }
}

#[tokio::test]
async fn btrfs_delete_and_sync_commands() {
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    let exec = RecordingExec::new();
    let store = BtrfsStore::new(&dir, Arc::new(exec.clone()));
    store.recover().await.unwrap();
    std::fs::create_dir_all(dir.join("result/x/rootfs")).unwrap();
    store.delete("x").await.unwrap();
    assert!(!dir.join("result/x").exists(), "renamed away, then removed");
    store.complete_deletes().await.unwrap();
    assert_eq!(
        exec.argvs(),
        [format!("timeout 60 btrfs subvolume sync {}", dir.display())]
    );
}

/// The original's `delete_cache` deleted a cache while containers used it and refused an
/// idle one; here a cache with a copy checked out is refused, an idle one deleted.
#[tokio::test]
async fn docker_cache_delete_is_refused_while_in_use_only() {
    use obuilder_stores::docker::{prefix, DockerStore};
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let exec = RecordingExec::new();
    let p = prefix(&dir);
    let hexname = "646c"; // "dl"
    exec.answer(
        &["docker", "volume", "inspect"],
        "/var/lib/docker/volumes/v/_data\n",
    );
    exec.answer(
        &[
            "docker",
            "volume",
            "ls",
            "-q",
            "--filter",
            &format!("name={p}-ct-"),
        ],
        &format!("{p}-ct-77-0-{hexname}\n"),
    );
    let store = DockerStore::new(&dir, "docker", Arc::new(exec.clone()));
    let e = store.cache_delete("dl").await.unwrap_err().to_string();
    assert!(e.contains("in use by 1"), "{e}");
    assert!(!exec.argvs().iter().any(|c| c.contains("volume rm")));

    let exec = RecordingExec::new();
    exec.answer(
        &["docker", "volume", "inspect"],
        "/var/lib/docker/volumes/v/_data\n",
    );
    let store = DockerStore::new(&dir, "docker", Arc::new(exec.clone()));
    store.cache_delete("dl").await.unwrap();
    assert_eq!(
        exec.argvs().last().unwrap(),
        &format!("docker volume rm {p}-c-{hexname}")
    );
}

fn windows_engine() -> RecordingExec {
    RecordingExec::windows_engine()
}

fn windows_store(
    dir: &std::path::Path,
    exec: &RecordingExec,
) -> obuilder_stores::docker::DockerStore {
    use obuilder_stores::docker::{DockerStore, Platform};
    DockerStore::new(dir, "docker", Arc::new(exec.clone())).with_platform(Platform::Windows)
}

/// Start-up on a Windows engine, the first time: the engine is checked, then the libexec
/// volume (Cygwin's tar) is made from the servercore image of the engine's build, as the
/// original's `create_tar_volume`; the next start finds it and makes nothing.
#[tokio::test]
async fn windows_seam_start_up_makes_the_libexec_volume_once() {
    use obuilder_stores::docker::prefix;
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    let p = prefix(&dir);
    let exec = windows_engine();
    exec.fail(
        &["docker", "volume", "inspect", "--format", "{{.Name}}"],
        "Error response from daemon: get x: no such volume",
    );
    windows_store(&dir, &exec).recover().await.unwrap();
    let argvs = exec.argvs();
    let build = argvs
        .iter()
        .find(|a| a.starts_with("docker build"))
        .expect("an image is built")
        .clone();
    let ctx = build.rsplit(' ').next().unwrap();
    assert!(
        ctx.starts_with(&format!("{}/state/docker-libexec-", dir.display())),
        "{build}"
    );
    let libexec: Vec<&String> = argvs
        .iter()
        .filter(|a| a.contains("libexec") || a.contains("KernelVersion"))
        .collect();
    assert_eq!(
        libexec,
        [
            &format!("docker volume inspect --format {{{{.Name}}}} {p}-libexec"),
            &"docker version --format {{.Server.KernelVersion}}".to_string(),
            &format!("docker volume create {p}-libexec"),
            &format!("docker build --tag {p}-libexec-image {ctx}"),
            &format!(
                "docker run --rm --user ContainerAdministrator --network none \
                 --mount type=volume,src={p}-libexec,dst=C:/obuilder-libexec \
                 --env DESTINATION=C:\\obuilder-libexec --entrypoint cmd {p}-libexec-image \
                 /S /C C:\\extract.cmd"
            ),
            &format!("docker image rm {p}-libexec-image"),
        ]
    );
    assert_eq!(argvs[0], "docker version --format {{.Server.Os}}");
    // Its build context is gone.
    assert!(!std::path::Path::new(ctx).exists());

    // Made already: nothing is built.
    let exec = windows_engine();
    windows_store(&dir, &exec).recover().await.unwrap();
    assert!(
        !exec
            .argvs()
            .iter()
            .any(|a| a.starts_with("docker build") || a.contains("volume create")),
        "{:?}",
        exec.argvs()
    );
}

/// A set-up that fails (here the image's build: no network to cygwin.com) removes the
/// half-made volume, so that the next start tries again; the original kept it, and then
/// took it as made.
#[tokio::test]
async fn windows_seam_a_failed_libexec_set_up_leaves_no_volume() {
    use obuilder_stores::docker::prefix;
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    let p = prefix(&dir);
    let exec = windows_engine();
    exec.fail(
        &["docker", "volume", "inspect", "--format", "{{.Name}}"],
        "Error: no such volume",
    );
    exec.fail(&["docker", "build"], "cannot reach www.cygwin.com");
    let e = windows_store(&dir, &exec)
        .recover()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cygwin.com"), "{e}");
    assert_eq!(
        exec.argvs().last().unwrap(),
        &format!("docker volume rm -f {p}-libexec")
    );
}

/// A store opened for one kind of containers on an engine of the other says which flag
/// to give, before it touches anything.
#[tokio::test]
async fn windows_seam_an_engine_of_the_other_platform_is_refused() {
    use obuilder_stores::docker::DockerStore;
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    let exec = windows_engine();
    let store = DockerStore::new(&dir, "docker", Arc::new(exec.clone()));
    let e = store.recover().await.unwrap_err().to_string();
    assert!(
        e.contains("runs windows containers") && e.contains("--docker-platform windows"),
        "{e}"
    );
    assert_eq!(exec.argvs(), ["docker version --format {{.Server.Os}}"]);
}

/// Cache copies on a Windows engine are made in the engine: one servercore container
/// pipes Cygwin's tar of the master into tar in the copy; a kept copy replaces the master
/// the same way. The copy is named by its volume (no host path).
#[tokio::test]
async fn windows_seam_cache_copies_go_through_servercore_containers() {
    use obuilder_stores::docker::prefix;
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let p = prefix(&dir);
    let exec = windows_engine();
    // With the steps' isolation (here Hyper-V, the default on Windows).
    let store = windows_store(&dir, &exec).with_isolation(Some("hyperv".into()));
    let copy = store.cache_checkout("dl", 0, 0).await.unwrap();
    let vol = copy
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        vol.starts_with(&format!("{p}-ct-")) && vol.ends_with("-646c"),
        "{vol}"
    );
    let tar = "C:\\obuilder-libexec\\tar.exe";
    let run = |from: &str, to: &str| {
        format!(
            "docker run --rm --isolation hyperv --user ContainerAdministrator --network none \
             --env CYGWIN=winsymlinks:native \
             --mount type=volume,src={p}-libexec,dst=C:/obuilder-libexec,readonly \
             --mount type=volume,src={from},dst=C:/obuilder-from,readonly \
             --mount type=volume,src={to},dst=C:/obuilder-to \
             --entrypoint cmd mcr.microsoft.com/windows/servercore:ltsc2022 /S /C \
             {tar} -cf - -C /cygdrive/c/obuilder-from . | {tar} -xpf - -C /cygdrive/c/obuilder-to"
        )
    };
    let master = format!("{p}-c-646c");
    assert_eq!(
        exec.argvs(),
        [
            format!("docker volume inspect --format {{{{.Mountpoint}}}} {master}"),
            format!("docker volume create {vol}"),
            "docker version --format {{.Server.KernelVersion}}".to_string(),
            run(&master, &vol),
        ]
    );
    exec.calls.lock().unwrap().clear();
    store.cache_release(copy, true).await.unwrap();
    assert_eq!(
        exec.argvs(),
        [
            format!("docker volume rm -f {master}"),
            format!("docker volume create {master}"),
            run(&vol, &master),
            format!("docker volume rm -f {vol}"),
        ]
    );
}

/// `(from IMAGE)` on a Windows engine: the engine pulls it (foreign layers cannot be
/// imported), the base id comes from the image's id, its config gives the env, and the
/// base step's result is the image tagged; nothing is imported. An engine that cannot
/// reach the registry uses the image it has, with a note.
#[tokio::test]
async fn windows_seam_base_images_are_pulled_and_tagged() {
    use obuilder_engine::fetch::Fetcher;
    use obuilder_stores::docker::prefix;
    use obuilder_stores::docker_pull::DockerPull;
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let p = prefix(&dir);
    let img = "mcr.microsoft.com/windows/servercore:ltsc2022";
    let id = format!("sha256:{}", "ab".repeat(32));
    let exec = windows_engine();
    exec.answer(
        &["docker", "image", "inspect", "--format", "{{.Id}}"],
        &format!("{id}\n"),
    );
    exec.answer(
        &["docker", "image", "inspect", "--format", "{{json .Config}}"],
        r#"{"Env":["PATH=C:\\Windows\\system32"],"WorkingDir":"","User":"ContainerAdministrator","Entrypoint":null}"#,
    );
    exec.fail(
        &["docker", "container", "inspect"],
        "Error: No such container: x",
    );
    let fetcher = DockerPull::new("docker", Arc::new(exec.clone()));
    let notes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let n2 = notes.clone();
    let log: obuilder_engine::log::LogSink = Arc::new(move |e: &obuilder_engine::log::LogEvent| {
        n2.lock().unwrap().push(format!("{e:?}"))
    });
    let resolved = fetcher.resolve(img, &log).await.unwrap();
    assert_eq!(resolved.digest, id);
    let pulled = exec.argvs();
    let store = windows_store(&dir, &exec);
    store.recover().await.unwrap();
    exec.calls.lock().unwrap().clear();
    let d = store.prepare("base", None).await.unwrap();
    let config = fetcher.fetch(&resolved, &d.rootfs, &log).await.unwrap();
    assert_eq!(
        config.env,
        [("PATH".to_string(), "C:\\Windows\\system32".to_string())]
    );
    assert_eq!(config.user.as_deref(), Some("ContainerAdministrator"));
    store.commit(&d).await.unwrap();
    assert_eq!(
        pulled,
        [
            format!("docker pull {img}"),
            format!("docker image inspect --format {{{{.Id}}}} {img}"),
        ]
    );
    assert_eq!(
        exec.argvs(),
        [
            format!("docker image inspect --format {{{{json .Config}}}} {id}"),
            format!("docker tag {id} {p}:base"),
        ]
    );
    assert!(store.result("base").await.unwrap().is_some());

    // Offline, with the image in the engine.
    let exec = windows_engine();
    exec.fail(
        &["docker", "pull"],
        "dial tcp: lookup mcr.microsoft.com: no such host",
    );
    exec.answer(
        &["docker", "image", "inspect", "--format", "{{.Id}}"],
        &format!("{id}\n"),
    );
    let fetcher = DockerPull::new("docker", Arc::new(exec.clone()));
    assert_eq!(fetcher.resolve(img, &log).await.unwrap().digest, id);
    assert!(notes
        .lock()
        .unwrap()
        .iter()
        .any(|n| n.contains("using the engine's copy")));
    // Offline, without it: the pull's error.
    let exec = windows_engine();
    exec.fail(&["docker", "pull"], "no such host");
    exec.fail(&["docker", "image", "inspect"], "Error: No such image");
    let fetcher = DockerPull::new("docker", Arc::new(exec.clone()));
    let e = fetcher.resolve(img, &log).await.unwrap_err().to_string();
    assert!(e.contains("no such host"), "{e}");
}

/// What a copy step runs in a Windows container: Cygwin's tar from C:/, the ACL of the
/// directory copied into kept across it (a quote in the path doubled for PowerShell).
#[test]
fn windows_seam_copy_steps_untar_with_cygwin_tar_and_keep_the_acl() {
    use obuilder_stores::docker::windows_untar_script;
    assert_eq!(
        windows_untar_script("/src/"),
        "$path = 'C:/src'; if (Test-Path -Path $path -PathType Container) { $acl = Get-Acl \
         -Path $path }; & C:/obuilder-libexec/tar.exe -xpf - -C /cygdrive/c; if (-not $?) { \
         exit 1 }; if ($acl -ne $null) { Set-Acl -Path $path $acl }"
    );
    assert!(windows_untar_script("/src/a.opam").starts_with("$path = 'C:/src';"));
    assert!(windows_untar_script("/x.txt").starts_with("$path = 'C:/';"));
    assert!(windows_untar_script("/it's/").starts_with("$path = 'C:/it''s';"));
    // PowerShell ends a single-quoted string at a typographic quote too.
    assert!(windows_untar_script("/a\u{2019}; rm x/")
        .starts_with("$path = 'C:/a\u{2019}\u{2019}; rm x';"));
}

#[test]
fn windows_seam_servercore_follows_the_engines_build() {
    use obuilder_stores::docker::{libexec_dockerfile, servercore_tag};
    for (kv, tag) in [
        (
            "10.0 17763 (17763.1.amd64fre.rs5_release.180914-1434)",
            "ltsc2019",
        ),
        (
            "10.0 20348 (20348.1.amd64fre.fe_release.210507-1500)",
            "ltsc2022",
        ),
        (
            "10.0 26100 (26100.1.amd64fre.ge_release.240331-1435)",
            "ltsc2025",
        ),
        (
            "10.0 14393 (14393.693.amd64fre.rs1_release.161220-1747)",
            "ltsc2016",
        ),
    ] {
        assert_eq!(servercore_tag(kv).unwrap(), tag, "{kv}");
    }
    let e = servercore_tag("6.8.0-45-generic").unwrap_err();
    assert!(e.contains("Windows build number"), "{e}");
    let d = libexec_dockerfile("mcr.microsoft.com/windows/servercore:ltsc2022");
    assert!(
        d.starts_with("# escape=`\nFROM mcr.microsoft.com/windows/servercore:ltsc2022\n"),
        "{d}"
    );
    assert!(
        d.contains("ADD [\"https://www.cygwin.com/setup-x86_64.exe\", \"C:\\\\cygwin-setup.exe\"]"),
        "{d}"
    );
    assert!(d.contains("RUN C:\\cygwin-setup.exe --quiet-mode"), "{d}");
    assert!(d.contains("--root C:\\cygwin64 --packages tar\n"), "{d}");
    assert!(
        d.ends_with("COPY [\"extract.cmd\", \"C:\\\\extract.cmd\"]\n"),
        "{d}"
    );
}

/// `copy (from (build …))` on a Windows engine: Windows containers cannot be exported, so
/// the copy's sources alone are tarred by Cygwin's tar in a container of the stage's image
/// (paths from C:/), and untarred here into the view.
#[tokio::test]
async fn windows_seam_a_copy_from_a_build_tars_its_sources_in_a_container() {
    use obuilder_stores::docker::{prefix, windows_members};
    let tmp = tempfile_dir();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let p = prefix(&dir);
    let exec = windows_engine();
    let store = windows_store(&dir, &exec);
    let srcs = vec![
        "/src/_build/default/main.exe".to_string(),
        "C:\\opam\\bin\\opam.exe".to_string(),
    ];
    let view = store.view_paths("stage", &srcs).await.unwrap();
    let argvs = exec.argvs();
    assert_eq!(argvs.len(), 2, "{argvs:#?}");
    assert_eq!(
        argvs[0],
        format!(
            "docker run --rm --user ContainerAdministrator --network none \
             --env CYGWIN=winsymlinks:native \
             --mount type=volume,src={p}-libexec,dst=C:/obuilder-libexec,readonly \
             --entrypoint C:/obuilder-libexec/tar.exe {p}:stage -cf - -C /cygdrive/c -- \
             src/_build/default/main.exe opam/bin/opam.exe"
        )
    );
    assert!(
        argvs[1].starts_with("tar -xpf ") && argvs[1].ends_with(&format!(" -C {}", view.display())),
        "{}",
        argvs[1]
    );
    store.release_view(&view).await.unwrap();
    assert!(!view.exists());
    for bad in ["/a/../../b", "D:/x", "/a/b:c"] {
        assert!(windows_members(&[bad.to_string()]).is_err(), "{bad}");
    }
    assert_eq!(windows_members(&["/".to_string()]).unwrap(), ["."]);
}
