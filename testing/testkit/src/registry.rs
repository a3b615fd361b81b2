//! A real OCI registry for tests: Debian's `docker-registry` (CNCF distribution) on
//! 127.0.0.1 with a throw-away storage dir, images pushed into it with `skopeo`, and
//! optionally token auth with a tiny token server of our own (tokens signed with `openssl`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRegistry {
    pub addr: String,
    pub storage: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
    token_server: Option<std::thread::JoinHandle<()>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// With token auth: the user and password the token server accepts.
    pub creds: Option<(String, String)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Signs a registry token (RS256, certificate in `x5c`) with openssl.
fn sign_token(dir: &Path, issuer: &str, service: &str, repos: &[&str]) -> String {
    let der = run(Command::new("openssl")
        .args(["x509", "-in"])
        .arg(dir.join("cert.pem"))
        .args(["-outform", "DER"]));
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [b64(&der)]});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let access: Vec<_> = repos
        .iter()
        .map(|r| serde_json::json!({"type": "repository", "name": r, "actions": ["pull", "push"]}))
        .collect();
    let claims = serde_json::json!({"iss": issuer, "sub": "tester", "aud": service, "exp": now + 3600,
        "nbf": now - 60, "iat": now, "jti": format!("{now}"), "access": access});
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let input_path = dir.join("jwt-input");
    std::fs::write(&input_path, &signing_input).unwrap();
    let sig = run(Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(dir.join("key.pem"))
        .arg(&input_path));
    format!("{signing_input}.{}", b64url(&sig))
}

/// Answers every request with the token if Basic credentials match, else 401.
fn serve_tokens(
    listener: TcpListener,
    token: String,
    expect_basic: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let ok = req.lines().any(|l| {
                    l.to_ascii_lowercase().starts_with("authorization:")
                        && l.contains(&expect_basic)
                });
                let (status, body) = if ok {
                    (
                        "200 OK",
                        serde_json::json!({"token": token, "access_token": token}).to_string(),
                    )
                } else {
                    (
                        "401 Unauthorized",
                        "{\"details\":\"bad credentials\"}".to_string(),
                    )
                };
                let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

impl TestRegistry {
    /// An anonymous registry.
    pub fn start() -> TestRegistry {
        TestRegistry::start_with(None)
    }

    /// A registry behind token auth: tokens for `repos` go to clients that present
    /// `user:password` to the token server.
    pub fn start_with_token_auth(repos: &[&str]) -> TestRegistry {
        TestRegistry::start_with(Some(repos))
    }

    fn start_with(token_repos: Option<&[&str]>) -> TestRegistry {
        let dir = tempfile::Builder::new()
            .prefix("obuilder-registry-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut auth = String::new();
        let mut token_server = None;
        let mut creds = None;
        if let Some(repos) = token_repos {
            run(Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=obuilder-test-token",
                ])
                .arg("-keyout")
                .arg(dir.path().join("key.pem"))
                .arg("-out")
                .arg(dir.path().join("cert.pem")));
            let tport = free_port();
            let token = sign_token(dir.path(), "obuilder-test", "obuilder-registry", repos);
            let (user, pass) = ("tester".to_string(), "s3cret".to_string());
            let basic = b64(format!("{user}:{pass}").as_bytes());
            let listener = TcpListener::bind(format!("127.0.0.1:{tport}")).unwrap();
            let s = stop.clone();
            token_server = Some(std::thread::spawn(move || {
                serve_tokens(listener, token, basic, s)
            }));
            auth = format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{tport}/token\n    service: obuilder-registry\n    issuer: obuilder-test\n    rootcertbundle: {}\n",
                dir.path().join("cert.pem").display()
            );
            creds = Some((user, pass));
        }
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{auth}",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let reg = TestRegistry {
            addr,
            storage,
            child,
            _dir: dir,
            token_server,
            stop,
            creds,
        };
        reg.wait_ready();
        reg
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = write!(s, "GET /v2/ HTTP/1.0\r\n\r\n");
                let mut b = [0u8; 12];
                if s.read(&mut b).is_ok() && b.starts_with(b"HTTP/1.") {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("docker-registry did not start on {}", self.addr);
    }

    /// Pushes an OCI layout (every platform of it) as `repo:tag`.
    pub fn push(&self, layout: &Path, repo: &str, tag: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--all",
            "--preserve-digests",
            "--quiet",
            "--dest-tls-verify=false",
        ]);
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        cmd.arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr));
        run(&mut cmd);
    }

    /// The blob file the registry serves for `digest` (to corrupt it in tests).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// A `config.json` with this registry's credentials, in a fresh dir (for `DOCKER_CONFIG`).
    pub fn docker_config(&self, dir: &Path) -> PathBuf {
        let (u, p) = self.creds.clone().expect("a registry with token auth");
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, serde_json::json!({"auths": {self.addr.clone(): {"auth": b64(format!("{u}:{p}").as_bytes())}}}).to_string()).unwrap();
        path
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.token_server.take() {
            let _ = t.join();
        }
    }
}

/// OCI image layouts built in-process, for pushing.
pub mod oci {
    use std::path::Path;

    use serde_json::json;
    use sha2::{Digest, Sha256};

    pub fn sha(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    fn blob(layout: &Path, bytes: &[u8]) -> String {
        let d = sha(bytes);
        let p = layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
        d
    }

    /// A tar layer of a directory tree (symlinks kept as links).
    pub fn layer_of_dir(dir: &Path) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", dir).unwrap();
        b.into_inner().unwrap()
    }

    /// One platform's image: its layers (bottom first) and env.
    pub struct Image<'a> {
        pub os: &'a str,
        pub arch: &'a str,
        pub layers: Vec<Vec<u8>>,
        pub env: Vec<&'a str>,
    }

    /// Writes an OCI layout holding an index of `images`; returns each image's manifest
    /// digest and its layers' digests.
    pub fn write_layout(layout: &Path, images: &[Image]) -> Vec<(String, Vec<String>)> {
        std::fs::create_dir_all(layout).unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let mut manifests = Vec::new();
        let mut out = Vec::new();
        for img in images {
            let mut layers = Vec::new();
            let mut diff_ids = Vec::new();
            for l in &img.layers {
                diff_ids.push(sha(l));
                layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(layout, l), "size": l.len()}));
            }
            let config = json!({"architecture": img.arch, "os": img.os, "config": {"Env": img.env},
                "rootfs": {"type": "layers", "diff_ids": diff_ids}});
            let cbytes = config.to_string().into_bytes();
            let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(layout, &cbytes), "size": cbytes.len()},
                "layers": layers});
            let mbytes = manifest.to_string().into_bytes();
            let md = blob(layout, &mbytes);
            manifests.push(json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mbytes.len(),
                "platform": {"os": img.os, "architecture": img.arch}}));
            out.push((md, img.layers.iter().map(|l| sha(l)).collect()));
        }
        // One image: the layout's index names its manifest; several: a nested index (a
        // multi-platform image), named `latest` in the layout's index.
        let ref_name = json!({"org.opencontainers.image.ref.name": "latest"});
        let top = if manifests.len() == 1 {
            let mut m = manifests.remove(0);
            m["annotations"] = ref_name;
            m
        } else {
            let nested = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
            let nbytes = nested.to_string().into_bytes();
            json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": blob(layout, &nbytes), "size": nbytes.len(),
                "annotations": ref_name})
        };
        let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [top]});
        std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
        out
    }
}
