//! Pulling from a real registry: Debian's docker-registry on 127.0.0.1, images pushed with
//! skopeo from OCI layouts built here.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use obuilder_engine::fetch::{FetchError, Fetcher};
use obuilder_engine::log::{buffer_sink, null_sink};
use obuilder_fetch::images::ImageStore;
use obuilder_fetch::import::host_platform;
use obuilder_fetch::reference::Reference;
use obuilder_fetch::registry::{Progress, ProgressSink, Registry, RegistryError, RegistryOptions};
use obuilder_fetch::{ImageFetcher, PullPolicy};
use testkit::registry::oci::{write_layout, Image};
use testkit::registry::TestRegistry;
use testkit::{require, Cap};

fn file_layer(path: &str, body: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(body.len() as u64);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, path, body.as_bytes()).unwrap();
    b.into_inner().unwrap()
}

fn host() -> (String, String) {
    let p = host_platform();
    let (o, a) = p.split_once('/').unwrap();
    (o.to_string(), a.to_string())
}

fn push(
    reg: &TestRegistry,
    dir: &Path,
    repo: &str,
    tag: &str,
    images: &[Image],
) -> Vec<(String, Vec<String>)> {
    let layout = dir.join(format!("layout-{}-{tag}", repo.replace('/', "_")));
    let _ = std::fs::remove_dir_all(&layout);
    let out = write_layout(&layout, images);
    reg.push(&layout, repo, tag);
    out
}

fn registry(insecure: &[&str]) -> Arc<Registry> {
    Arc::new(Registry::new(RegistryOptions {
        insecure: insecure.iter().map(|s| s.to_string()).collect(),
        ..RegistryOptions::default()
    }))
}

struct Counter {
    started: Arc<AtomicUsize>,
    cached: Arc<AtomicUsize>,
}

fn counting() -> (Counter, ProgressSink) {
    let (s, c) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (s2, c2) = (s.clone(), c.clone());
    let sink: ProgressSink = Arc::new(move |p: &Progress| match p {
        Progress::Start { .. } => {
            s2.fetch_add(1, Ordering::SeqCst);
        }
        Progress::Cached { .. } => {
            c2.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    });
    (
        Counter {
            started: s,
            cached: c,
        },
        sink,
    )
}

fn caps() -> [Cap; 2] {
    [Cap::Tool("docker-registry"), Cap::Tool("skopeo")]
}

macro_rules! need {
    () => {
        if !testkit::require(module_path!(), &caps()) {
            return;
        }
    };
}

#[tokio::test]
async fn pull_by_tag_picks_the_host_platform_and_extracts() {
    need!();
    let reg = TestRegistry::start();
    let t = tempfile::tempdir().unwrap();
    let (os, arch) = host();
    let pushed = push(
        &reg,
        t.path(),
        "multi",
        "v1",
        &[
            Image {
                os: "linux",
                arch: "s390x",
                layers: vec![file_layer("which", "s390x\n")],
                env: vec!["A=s390x"],
            },
            Image {
                os: &os,
                arch: &arch,
                layers: vec![file_layer("which", "host\n"), file_layer("extra", "x\n")],
                env: vec!["A=host", "PATH=/bin"],
            },
        ],
    );
    let images = ImageStore::new(&t.path().join("state"));
    let (count, progress) = counting();
    let f =
        ImageFetcher::with_registry(images.clone(), registry(&[]), PullPolicy::Missing, progress);
    let name = format!("{}/multi:v1", reg.addr);
    let (sink, log) = buffer_sink();
    let resolved = f.resolve(&name, &sink).await.unwrap();
    assert_eq!(resolved.digest, pushed[1].0, "the host platform's manifest");
    let rootfs = t.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let config = f.fetch(&resolved, &rootfs, &sink).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(rootfs.join("which")).unwrap(),
        "host\n"
    );
    assert_eq!(
        config.env,
        [
            ("A".to_string(), "host".to_string()),
            ("PATH".into(), "/bin".into())
        ]
    );
    assert_eq!(
        count.started.load(Ordering::SeqCst),
        2,
        "two layers downloaded"
    );
    let l = log.lock().unwrap().clone();
    assert!(
        l.contains("Downloading sha256:") && l.contains("Extracting layer 2/2"),
        "{l}"
    );

    // Another platform on request.
    let other = ImageFetcher::with_registry(
        ImageStore::new(&t.path().join("state2")),
        Arc::new(Registry::new(RegistryOptions {
            platform: "linux/s390x".into(),
            ..RegistryOptions::default()
        })),
        PullPolicy::Missing,
        Arc::new(|_| {}),
    );
    assert_eq!(
        other.resolve(&name, &null_sink()).await.unwrap().digest,
        pushed[0].0
    );
    // A platform the image lacks: the error lists what there is.
    let none = Registry::new(RegistryOptions {
        platform: "linux/riscv64".into(),
        ..RegistryOptions::default()
    });
    let e = none
        .resolve(&name.parse().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no manifest for platform linux/riscv64") && e.contains("linux/s390x"),
        "{e}"
    );
}

#[tokio::test]
async fn moved_tags_pinned_digests_and_offline_reuse() {
    need!();
    let reg = TestRegistry::start();
    let t = tempfile::tempdir().unwrap();
    let (os, arch) = host();
    let v1 = push(
        &reg,
        t.path(),
        "app",
        "latest",
        &[Image {
            os: &os,
            arch: &arch,
            layers: vec![file_layer("v", "1\n")],
            env: vec![],
        }],
    );
    let images = ImageStore::new(&t.path().join("state"));
    let name = format!("{}/app", reg.addr);
    let missing = ImageFetcher::with_registry(
        images.clone(),
        registry(&[]),
        PullPolicy::Missing,
        Arc::new(|_| {}),
    );
    let d1 = missing.resolve(&name, &null_sink()).await.unwrap();
    assert_eq!(d1.digest, v1[0].0);
    // The tag moves.
    let v2 = push(
        &reg,
        t.path(),
        "app",
        "latest",
        &[Image {
            os: &os,
            arch: &arch,
            layers: vec![file_layer("v", "2\n")],
            env: vec![],
        }],
    );
    assert_ne!(v1[0].0, v2[0].0);
    assert_eq!(
        missing.resolve(&name, &null_sink()).await.unwrap().digest,
        v1[0].0,
        "missing: the recorded digest, no network"
    );
    let always = ImageFetcher::with_registry(
        images.clone(),
        registry(&[]),
        PullPolicy::Always,
        Arc::new(|_| {}),
    );
    let d2 = always.resolve(&name, &null_sink()).await.unwrap();
    assert_eq!(d2.digest, v2[0].0, "always: re-resolved");
    assert_ne!(
        d1.base_id(),
        d2.base_id(),
        "a moved tag gives a new base id"
    );
    // A pinned digest, once fetched, never needs the network.
    let pinned = format!("{}/app@{}", reg.addr, v1[0].0);
    let rootfs = t.path().join("r1");
    std::fs::create_dir(&rootfs).unwrap();
    let p = always.resolve(&pinned, &null_sink()).await.unwrap();
    always.fetch(&p, &rootfs, &null_sink()).await.unwrap();
    drop(reg);
    let offline = always.resolve(&pinned, &null_sink()).await.unwrap();
    assert_eq!(offline.digest, v1[0].0);
    let rootfs2 = t.path().join("r2");
    std::fs::create_dir(&rootfs2).unwrap();
    always
        .fetch(&offline, &rootfs2, &null_sink())
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(rootfs2.join("v")).unwrap(), "1\n");
    // --pull=never: only what is known.
    let never = ImageFetcher::with_registry(
        images.clone(),
        registry(&[]),
        PullPolicy::Never,
        Arc::new(|_| {}),
    );
    let e = never
        .resolve("127.0.0.1:1/unknown", &null_sink())
        .await
        .unwrap_err();
    assert!(
        matches!(e, FetchError::Unknown { .. }) && e.to_string().contains("--pull=never"),
        "{e}"
    );
}

#[tokio::test]
async fn a_layer_two_images_share_is_downloaded_once() {
    need!();
    let reg = TestRegistry::start();
    let t = tempfile::tempdir().unwrap();
    let (os, arch) = host();
    let shared = file_layer("base", "shared base layer\n");
    push(
        &reg,
        t.path(),
        "one",
        "v",
        &[Image {
            os: &os,
            arch: &arch,
            layers: vec![shared.clone(), file_layer("a", "1")],
            env: vec![],
        }],
    );
    push(
        &reg,
        t.path(),
        "two",
        "v",
        &[Image {
            os: &os,
            arch: &arch,
            layers: vec![shared, file_layer("b", "2")],
            env: vec![],
        }],
    );
    let (count, progress) = counting();
    let f = ImageFetcher::with_registry(
        ImageStore::new(&t.path().join("state")),
        registry(&[]),
        PullPolicy::Missing,
        progress,
    );
    for n in ["one", "two"] {
        let r = f
            .resolve(&format!("{}/{n}:v", reg.addr), &null_sink())
            .await
            .unwrap();
        let root = t.path().join(format!("root-{n}"));
        std::fs::create_dir(&root).unwrap();
        f.fetch(&r, &root, &null_sink()).await.unwrap();
    }
    assert_eq!(
        count.started.load(Ordering::SeqCst),
        3,
        "the shared layer once, plus one each"
    );
    assert_eq!(count.cached.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn bad_answers_name_the_image_and_layer_and_record_nothing() {
    need!();
    let reg = TestRegistry::start();
    let t = tempfile::tempdir().unwrap();
    let (os, arch) = host();
    let pushed = push(
        &reg,
        t.path(),
        "victim",
        "v",
        &[Image {
            os: &os,
            arch: &arch,
            layers: vec![file_layer("f", &"x".repeat(10_000))],
            env: vec![],
        }],
    );
    let r = registry(&[]);
    // Unknown repository and unknown tag.
    let e = r
        .resolve(&format!("{}/nosuch:v", reg.addr).parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::NotFound { .. }) && e.to_string().contains("nosuch"),
        "{e}"
    );
    let e = r
        .resolve(&format!("{}/victim:nosuchtag", reg.addr).parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::NotFound { .. }) && e.to_string().contains("MANIFEST_UNKNOWN"),
        "{e}"
    );
    // Unreachable.
    let e = r
        .resolve(&"127.0.0.1:1/x:v".parse().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::Unreachable { .. }) && e.to_string().contains("127.0.0.1:1"),
        "{e}"
    );
    // A name that does not resolve: said as such, with no hint about plain HTTP (which
    // is given only when a TLS handshake meets something else).
    let e = r
        .resolve(&"registry.invalid/x:v".parse().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("registry.invalid") && !e.contains("--insecure-registry"),
        "{e}"
    );

    // A blob whose content does not match its digest, then a truncated one.
    let layer = pushed[0].1[0].clone();
    let blob = reg.blob_file(&layer);
    let good = std::fs::read(&blob).unwrap();
    let mut evil = good.clone();
    evil[600] ^= 0xff;
    std::fs::write(&blob, &evil).unwrap();
    let images = ImageStore::new(&t.path().join("state"));
    let f = ImageFetcher::with_registry(
        images.clone(),
        r.clone(),
        PullPolicy::Missing,
        Arc::new(|_| {}),
    );
    let name = format!("{}/victim:v", reg.addr);
    let res = f.resolve(&name, &null_sink()).await.unwrap();
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let e = f
        .fetch(&res, &root, &null_sink())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&name) && e.contains(&layer) && e.contains("does not match"),
        "{e}"
    );
    assert!(
        !images.blob_path(&layer).unwrap().exists(),
        "a bad blob is never stored"
    );
    std::fs::write(&blob, &good[..good.len() / 2]).unwrap();
    let e = f
        .fetch(&res, &root, &null_sink())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&layer)
            && (e.contains("truncated")
                || e.contains("interrupted")
                || e.contains("does not match")),
        "{e}"
    );
    assert!(!images.blob_path(&layer).unwrap().exists());
    std::fs::write(&blob, &good).unwrap();
    f.fetch(&res, &root, &null_sink()).await.unwrap();
}

#[tokio::test]
async fn token_auth_with_docker_config_credentials() {
    need!();
    if !testkit::require(module_path!(), &[Cap::Tool("openssl")]) {
        return;
    }
    let reg = TestRegistry::start_with_token_auth(&["private/app"]);
    let t = tempfile::tempdir().unwrap();
    let (os, arch) = host();
    let pushed = push(
        &reg,
        t.path(),
        "private/app",
        "v",
        &[Image {
            os: &os,
            arch: &arch,
            layers: vec![file_layer("secret", "s\n")],
            env: vec![],
        }],
    );
    let name: Reference = format!("{}/private/app:v", reg.addr).parse().unwrap();
    // Without credentials: denied, with a hint.
    let anon = Registry::new(RegistryOptions {
        docker_config: Some(t.path().join("none/config.json")),
        ..RegistryOptions::default()
    });
    let e = anon.resolve(&name).await.unwrap_err();
    assert!(
        matches!(e, RegistryError::Denied { .. }) && e.to_string().contains("config.json"),
        "{e}"
    );
    // With credentials from a Docker config.
    let cfg = reg.docker_config(&t.path().join("docker"));
    let authed = Registry::new(RegistryOptions {
        docker_config: Some(cfg),
        ..RegistryOptions::default()
    });
    let res = authed.resolve(&name).await.unwrap();
    assert_eq!(res.digest, pushed[0].0);
    let images = ImageStore::new(&t.path().join("state"));
    authed
        .download(
            &res,
            &images,
            &(Arc::new(|_: &Progress| {}) as ProgressSink),
        )
        .await
        .unwrap();
    assert!(images.blob_path(&pushed[0].1[0]).unwrap().exists());
    let _ = Mutex::new(());
}

#[test]
fn malicious_pushed_layers_stay_inside_the_root() {
    require!(Cap::Root, Cap::Tool("docker-registry"), Cap::Tool("skopeo"));
    // Covered in depth by tests/images.rs on the extractor; here the same layer comes
    // through the registry path.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let reg = TestRegistry::start();
        let t = tempfile::tempdir().unwrap();
        let (os, arch) = host();
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "escape", &outside).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(1);
        b.append_data(&mut h, "escape/pwned", &b"x"[..]).unwrap();
        let evil = b.into_inner().unwrap();
        push(
            &reg,
            t.path(),
            "evil",
            "v",
            &[Image {
                os: &os,
                arch: &arch,
                layers: vec![evil],
                env: vec![],
            }],
        );
        let f = ImageFetcher::with_registry(
            ImageStore::new(&t.path().join("state")),
            registry(&[]),
            PullPolicy::Missing,
            Arc::new(|_| {}),
        );
        let res = f
            .resolve(&format!("{}/evil:v", reg.addr), &null_sink())
            .await
            .unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let _ = f.fetch(&res, &root, &null_sink()).await;
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing written outside the root"
        );
    });
}

#[tokio::test]
async fn multi_layer_image_with_whiteouts_hard_links_and_zstd() {
    need!();
    if !testkit::require(module_path!(), &[Cap::Root]) {
        return;
    }
    let reg = TestRegistry::start();
    let t = tempfile::tempdir().unwrap();
    let (os, arch) = host();
    let mut b = tar::Builder::new(Vec::new());
    for (path, body) in [
        ("etc/keep", "v1\n"),
        ("etc/gone", "gone\n"),
        ("opaque/old", "old\n"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, path, body.as_bytes()).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "etc/keep-hard", "etc/keep").unwrap();
    let lower = b.into_inner().unwrap();
    let mut b = tar::Builder::new(Vec::new());
    for (path, body) in [
        ("etc/.wh.gone", ""),
        ("opaque/.wh..wh..opq", ""),
        ("opaque/new", "new\n"),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, path, body.as_bytes()).unwrap();
    }
    let upper = zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap();
    push(
        &reg,
        t.path(),
        "layers",
        "v",
        &[Image {
            os: &os,
            arch: &arch,
            layers: vec![lower, upper],
            env: vec![],
        }],
    );
    let f = ImageFetcher::with_registry(
        ImageStore::new(&t.path().join("state")),
        registry(&[]),
        PullPolicy::Missing,
        Arc::new(|_| {}),
    );
    let res = f
        .resolve(&format!("{}/layers:v", reg.addr), &null_sink())
        .await
        .unwrap();
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    f.fetch(&res, &root, &null_sink()).await.unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(!root.join("etc/gone").exists(), "whiteout applied");
    assert!(
        !root.join("opaque/old").exists(),
        "opaque directory applied"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("opaque/new")).unwrap(),
        "new\n",
        "zstd layer extracted"
    );
    assert_eq!(
        std::fs::metadata(root.join("etc/keep")).unwrap().ino(),
        std::fs::metadata(root.join("etc/keep-hard")).unwrap().ino(),
        "hard link kept"
    );
}

/// A registry that accepts the connection and never answers: the log says it is waiting,
/// every 5 s, before any timeout.
#[tokio::test]
async fn a_silent_registry_is_said_to_be_slow() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Accept and hold connections (bounded: the test ends in seconds).
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(7);
        while std::time::Instant::now() < end {
            if let Ok((s, _)) = listener.accept() {
                held.push(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    let t = tempfile::tempdir().unwrap();
    let fetcher = ImageFetcher::with_registry(
        ImageStore::new(&t.path().join("state")),
        registry(&[]),
        PullPolicy::Missing,
        Arc::new(|_| {}),
    );
    let (sink, text) = buffer_sink();
    let name = format!("{addr}/slow:v1");
    let r = tokio::time::timeout(
        std::time::Duration::from_millis(5600),
        fetcher.resolve(&name, &sink),
    )
    .await;
    assert!(r.is_err(), "the registry never answers, so this times out");
    let text = text.lock().unwrap().clone();
    assert!(
        text.contains(&format!("Still waiting for {addr} (5 s)...")),
        "{text}"
    );
    holder.join().unwrap();
}

/// One HTTP/1.1 request read off a connection: its request line, headers (lowercase
/// names) and body.
type Request = (String, Vec<(String, String)>, Vec<u8>);

fn read_request(s: &mut std::net::TcpStream) -> Option<Request> {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).ok()? == 0 {
            return None;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let line = lines.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).ok()?;
    Some((line, headers, body))
}

/// A registry (a stand-in written for this test: no real registry hands out upload URLs
/// on another host) whose upload sessions live on another port: the blobs go there, and
/// the registry's credentials do not.
#[tokio::test]
async fn credentials_never_go_to_an_upload_url_elsewhere() {
    use std::io::Write;
    let reg = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let storage = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (reg_addr, sto_addr) = (reg.local_addr().unwrap(), storage.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<String>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serve = |l: std::net::TcpListener, who: &'static str| {
        let (seen, stop) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            l.set_nonblocking(true).unwrap();
            let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < end {
                let Ok((mut s, _)) = l.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                let Some((line, headers, _)) = read_request(&mut s) else {
                    continue;
                };
                let auth = headers.iter().any(|(k, _)| k == "authorization");
                seen.lock()
                    .unwrap()
                    .push(format!("{who} {line} auth={auth}"));
                let resp = match (who, line.split(' ').next().unwrap_or("")) {
                    ("registry", _) if !auth => {
                        "401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"test\"".to_string()
                    }
                    ("registry", "HEAD") => "404 Not Found".to_string(),
                    ("registry", "POST") => {
                        format!("202 Accepted\r\nLocation: http://{sto_addr}/upload/1?state=x")
                    }
                    _ => "201 Created".to_string(),
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {resp}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        })
    };
    let threads = [serve(reg, "registry"), serve(storage, "storage")];

    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("config.json");
    std::fs::write(
        &cfg,
        format!(r#"{{"auths":{{"{reg_addr}":{{"auth":"dTpw"}}}}}}"#),
    )
    .unwrap();
    let images = ImageStore::new(&t.path().join("state"));
    let layer = images
        .put_blob(&b"not really a tar"[..], None, "test")
        .unwrap();
    let image = obuilder_fetch::export::Image::assemble(
        &images,
        vec![(
            "step".into(),
            obuilder_fetch::export::Layer {
                digest: layer.clone(),
                size: 16,
                media_type: obuilder_fetch::export::LAYER_TYPE.into(),
                diff_id: layer,
            },
        )],
        &Default::default(),
        "2026-12-02 00:00:00.000",
    )
    .unwrap();
    let r = Registry::new(RegistryOptions {
        docker_config: Some(cfg),
        concurrency: 1,
        ..RegistryOptions::default()
    });
    let target: Reference = format!("{reg_addr}/app:v1").parse().unwrap();
    r.push(
        &target,
        &images,
        &image,
        &(Arc::new(|_: &Progress| {}) as ProgressSink),
    )
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    for th in threads {
        th.join().unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let uploads: Vec<&String> = seen
        .iter()
        .filter(|l| l.starts_with("storage PUT"))
        .collect();
    assert_eq!(
        uploads.len(),
        2,
        "config and layer went to the storage: {seen:#?}"
    );
    assert!(
        uploads.iter().all(|l| l.ends_with("auth=false")),
        "{seen:#?}"
    );
    assert!(
        seen.iter().any(|l| l.starts_with("registry PUT /v2/app/manifests/v1") && l.ends_with("auth=true")),
        "{seen:#?}"
    );
}
