//! Image import and layer extraction on real archives made by the test.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use obuilder_engine::exec::RealExec;
use obuilder_engine::fetch::Fetcher;
use obuilder_engine::log::null_sink;
use obuilder_fetch::extract::extract_layer;
use obuilder_fetch::images::ImageStore;
use obuilder_fetch::import::{host_platform, import, ImportRequest};
use obuilder_fetch::ImageFetcher;
use serde_json::json;
use sha2::{Digest, Sha256};
use testkit::{require, Cap};

/// One tar entry for [`layer`].
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a str, u32, u64),
    Link(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Fifo(&'a str),
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
            E::File(p, body, mode, uid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*uid);
                h.set_size(body.len() as u64);
                b.append_data(&mut h, p, body.as_bytes()).unwrap();
            }
            E::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Hard(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
            E::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o600);
                h.set_size(0);
                b.append_data(&mut h, p, &[][..]).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A raw entry with a path the tar crate's safe API would refuse (`../…`).
fn raw_layer(path: &str, body: &str) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    {
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
    }
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(body.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(body.as_bytes());
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn base_layer() -> Vec<u8> {
    layer(&[
        E::Dir("etc/", 0o755),
        E::File("etc/keep", "keep\n", 0o644, 0),
        E::File("etc/gone", "gone\n", 0o644, 0),
        E::Dir("opaque/", 0o755),
        E::File("opaque/old", "old\n", 0o644, 0),
        E::File("bin/tool", "#!/bin/sh\n", 0o4755, 0),
        E::Hard("bin/tool-hard", "bin/tool"),
        E::Link("var-run", "/run"),
        E::Fifo("fifo"),
        E::File("home/u/file", "mine\n", 0o600, 1000),
    ])
}

fn top_layer() -> Vec<u8> {
    layer(&[
        E::File("etc/.wh.gone", "", 0o644, 0),
        E::File("opaque/.wh..wh..opq", "", 0o644, 0),
        E::File("opaque/new", "new\n", 0o644, 0),
        E::File("etc/keep", "changed\n", 0o644, 0),
    ])
}

fn write_blob(layout: &Path, bytes: &[u8]) -> String {
    let d = sha(bytes);
    let p = layout
        .join("blobs/sha256")
        .join(d.trim_start_matches("sha256:"));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
    d
}

/// An OCI layout with a two-platform index (ours and another), two layers (one gzipped).
fn oci_layout(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let l1 = write_blob(dir, &gzip(&base_layer()));
    let l2 = write_blob(dir, &top_layer());
    let config = json!({"architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "WorkingDir": "/work", "User": "1000", "Entrypoint": ["/bin/tool"]}});
    let c = write_blob(dir, config.to_string().as_bytes());
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": 1},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l1, "size": 1},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l2, "size": 1}]});
    let m = write_blob(dir, manifest.to_string().as_bytes());
    let other = write_blob(dir, b"{\"not\": \"used\"}");
    let (os, arch) = host_platform()
        .split_once('/')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": other, "size": 1, "platform": {"os": "linux", "architecture": "s390x"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m, "size": 1, "platform": {"os": os, "architecture": arch}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    m
}

fn tar_dir(dir: &Path, out: &Path) {
    let f = std::fs::File::create(out).unwrap();
    let mut b = tar::Builder::new(f);
    b.append_dir_all(".", dir).unwrap();
    b.finish().unwrap();
}

fn check_tree(root: &Path) {
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    assert_eq!(read("etc/keep"), "changed\n", "upper layer wins");
    assert!(!root.join("etc/gone").exists(), "whiteout deletes");
    assert!(
        !root.join("opaque/old").exists(),
        "opaque dir hides the lower contents"
    );
    assert_eq!(read("opaque/new"), "new\n");
    let m = std::fs::metadata(root.join("bin/tool")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o4755, "set-id bits kept");
    assert_eq!(
        m.ino(),
        std::fs::metadata(root.join("bin/tool-hard")).unwrap().ino(),
        "hard link kept"
    );
    assert_eq!(
        std::fs::read_link(root.join("var-run")).unwrap(),
        Path::new("/run"),
        "absolute symlink kept as is"
    );
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &std::fs::symlink_metadata(root.join("fifo"))
            .unwrap()
            .file_type()
    ));
    let h = std::fs::metadata(root.join("home/u/file")).unwrap();
    assert_eq!(
        (h.uid(), h.gid(), h.permissions().mode() & 0o777),
        (1000, 1000, 0o600),
        "ownership kept"
    );
}

#[tokio::test]
async fn oci_layout_and_archive_import_and_extract() {
    require!(Cap::Root);
    let t = tempfile::tempdir().unwrap();
    let images = ImageStore::new(&t.path().join("state"));
    let layout = t.path().join("layout");
    let manifest_digest = oci_layout(&layout);
    let exec = RealExec::shared();
    let rec = import(
        &images,
        &exec,
        ImportRequest {
            name: "app:1",
            path: &layout,
            env: None,
            platform: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        rec.digest, manifest_digest,
        "an OCI image is keyed by its manifest digest"
    );
    assert_eq!(rec.layers.len(), 2);
    assert_eq!(
        rec.config.env,
        [
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
            ("LANG".into(), "C.UTF-8".into())
        ]
    );
    assert_eq!(rec.config.workdir.as_deref(), Some("/work"));
    assert_eq!(rec.config.entrypoint, Some(vec!["/bin/tool".to_string()]));

    let fetcher = ImageFetcher::new(images.clone());
    let resolved = fetcher.resolve("app:1", &null_sink()).await.unwrap();
    let rootfs = t.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let config = fetcher
        .fetch(&resolved, &rootfs, &null_sink())
        .await
        .unwrap();
    assert_eq!(config.env.len(), 2);
    check_tree(&rootfs);

    // The same layout as a tar archive gives the same image.
    let archive = t.path().join("app.oci.tar");
    tar_dir(&layout, &archive);
    let rec2 = import(
        &images,
        &exec,
        ImportRequest {
            name: "app:archive",
            path: &archive,
            env: None,
            platform: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(rec2.digest, manifest_digest);

    // No manifest for the asked platform: a clear error listing what there is.
    let e = import(
        &images,
        &exec,
        ImportRequest {
            name: "x",
            path: &layout,
            env: None,
            platform: Some("linux/riscv64".into()),
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no manifest for platform linux/riscv64") && e.contains("linux/s390x"),
        "{e}"
    );
}

#[tokio::test]
async fn docker_save_archive_import() {
    require!(Cap::Root);
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("save");
    std::fs::create_dir_all(dir.join("abc")).unwrap();
    std::fs::write(dir.join("abc/layer.tar"), base_layer()).unwrap();
    std::fs::write(
        dir.join("cfg.json"),
        json!({"config": {"Env": ["A=1"]}}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("manifest.json"),
        json!([{"Config": "cfg.json", "RepoTags": ["app:latest"], "Layers": ["abc/layer.tar"]}])
            .to_string(),
    )
    .unwrap();
    let archive = t.path().join("save.tar");
    tar_dir(&dir, &archive);
    let images = ImageStore::new(&t.path().join("state"));
    let rec = import(
        &images,
        &RealExec::shared(),
        ImportRequest {
            name: "app:latest",
            path: &archive,
            env: None,
            platform: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(rec.layers, [sha(&base_layer())]);
    assert_eq!(rec.config.env, [("A".to_string(), "1".to_string())]);
}

#[tokio::test]
async fn a_tampered_blob_is_refused_and_nothing_recorded() {
    require!(Cap::Root);
    let t = tempfile::tempdir().unwrap();
    let layout = t.path().join("layout");
    oci_layout(&layout);
    // Corrupt the top layer's bytes, keeping its name (digest).
    let d = sha(&top_layer());
    std::fs::write(
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:")),
        b"evil",
    )
    .unwrap();
    let images = ImageStore::new(&t.path().join("state"));
    let e = import(
        &images,
        &RealExec::shared(),
        ImportRequest {
            name: "app",
            path: &layout,
            env: None,
            platform: None,
        },
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains(&d) && e.contains("does not match"), "{e}");
    assert!(images.get("app").unwrap().is_none());
}

#[test]
fn malicious_layers_cannot_write_outside_the_root() {
    require!(Cap::Root);
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // `../` in a path.
    let e = extract_layer(&root, &raw_layer("../escape", "x")[..])
        .unwrap_err()
        .to_string();
    assert!(e.contains("`..`"), "{e}");
    // An absolute symlink to a host dir, then a file through it: lands inside the root.
    let evil = layer(&[
        E::Link("link", outside.to_str().unwrap()),
        E::File("link/pwned", "x", 0o644, 0),
    ]);
    let r = extract_layer(&root, &evil[..]);
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside: {r:?}"
    );
    // A hard link to a host file resolves inside the root too.
    let evil = layer(&[E::Hard("stolen", "/etc/hostname")]);
    let _ = extract_layer(&root, &evil[..]);
    assert!(
        !root.join("stolen").exists()
            || std::fs::metadata(root.join("stolen")).unwrap().ino()
                != std::fs::metadata("/etc/hostname").unwrap().ino()
    );
    // A truncated layer is an error, not a partial success.
    let mut cut = base_layer();
    cut.truncate(700);
    assert!(extract_layer(&root, &cut[..]).is_err());
}

#[tokio::test]
async fn plain_rootfs_dir_import_is_content_addressed() {
    require!(Cap::Root, Cap::Tool("tar"));
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("root");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::write(dir.join("bin/x"), "1").unwrap();
    let images = ImageStore::new(&t.path().join("state"));
    let exec = RealExec::shared();
    let req = |env| ImportRequest {
        name: "img",
        path: &dir,
        env,
        platform: None,
    };
    let a = import(&images, &exec, req(None)).await.unwrap();
    let b = import(&images, &exec, req(None)).await.unwrap();
    assert_eq!(a.digest, b.digest, "the same tree gives the same digest");
    let c = import(
        &images,
        &exec,
        req(Some(vec![("PATH".into(), "/bin".into())])),
    )
    .await
    .unwrap();
    assert_ne!(a.digest, c.digest, "the config is part of the digest");
    std::fs::write(dir.join("bin/x"), "2").unwrap();
    let d = import(&images, &exec, req(None)).await.unwrap();
    assert_ne!(
        a.digest, d.digest,
        "changed content, new digest: old results are never reused"
    );
    assert_eq!(images.list().unwrap().len(), 1);
    assert!(images.remove("img").unwrap());
    assert!(images.list().unwrap().is_empty());
}

#[tokio::test]
async fn rootfs_dir_is_packed_with_gnu_tar_keeping_owners_and_xattrs() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("root");
    std::fs::create_dir_all(&dir).unwrap();
    let exec = testkit::RecordingExec::new();
    let images = ImageStore::new(&t.path().join("state"));
    let shared: obuilder_engine::exec::SharedExec = std::sync::Arc::new(exec.clone());
    // The recorder writes no tar file, so the import stops after the command: fine here.
    let _ = import(
        &images,
        &shared,
        ImportRequest {
            name: "x",
            path: &dir,
            env: None,
            platform: None,
        },
    )
    .await;
    let argv = exec.argvs();
    assert_eq!(argv.len(), 1);
    assert!(argv[0].starts_with("tar --create --file "), "{}", argv[0]);
    assert!(
        argv[0].ends_with(&format!(
            "--numeric-owner --xattrs --xattrs-include=* --sort=name --format=pax \
             --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime --directory {} .",
            dir.display()
        )),
        "{}",
        argv[0]
    );
    assert!(
        images.get("x").unwrap().is_none(),
        "a failed import records nothing"
    );
}
