//! Registry credentials, found where podman, skopeo and docker keep them.
//!
//! Looked up in this order, the first that has the registry winning (podman's order):
//! 1. the containers auth file: `$REGISTRY_AUTH_FILE`, else
//!    `$XDG_RUNTIME_DIR/containers/auth.json`, then `~/.config/containers/auth.json`
//!    (what `skopeo login` and `podman login` write);
//! 2. the Docker config: `--docker-config`, else `$DOCKER_CONFIG/config.json`, else
//!    `~/.docker/config.json` (what `docker login` and `obuilder login` write).
//!
//! In each file, `auths.HOST.auth` (base64 `user:password`), then a credential helper named
//! by `credHelpers.HOST` or `credsStore` (`docker-credential-NAME get`, the server on
//! stdin, `{"Username","Secret"}` on stdout).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// One file's credentials.
#[derive(Debug, Default, Clone)]
struct Source {
    path: PathBuf,
    auths: HashMap<String, String>,
    helpers: HashMap<String, String>,
    store: Option<String>,
}

/// Every credential source, read once.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    sources: Vec<Source>,
}

/// `https://index.docker.io/v1/` → `docker.io`; `host:port/path` → `host:port`.
pub fn normalize_host(h: &str) -> String {
    let h = h
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let h = h.split('/').next().unwrap_or(h);
    match h {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        h => h.to_string(),
    }
}

/// The Docker config file: `explicit`, else `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
pub fn docker_config_path(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit
        .or_else(|| std::env::var_os("DOCKER_CONFIG").map(|d| PathBuf::from(d).join("config.json")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")))
}

/// The containers auth files, most specific first.
fn auth_file_paths() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        return vec![PathBuf::from(p)];
    }
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        v.push(PathBuf::from(d).join("containers/auth.json"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        v.push(PathBuf::from(h).join(".config/containers/auth.json"));
    }
    v
}

fn read_source(path: &Path) -> Option<Source> {
    let bytes = std::fs::read(path).ok()?;
    let v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(_) => {
            tracing::warn!("ignoring {}: not valid JSON", path.display());
            return None;
        }
    };
    let mut s = Source {
        path: path.to_path_buf(),
        ..Source::default()
    };
    if let Some(auths) = v["auths"].as_object() {
        for (host, entry) in auths {
            if let Some(a) = entry["auth"].as_str().filter(|a| !a.is_empty()) {
                s.auths.insert(normalize_host(host), a.to_string());
            }
        }
    }
    if let Some(h) = v["credHelpers"].as_object() {
        for (host, name) in h {
            if let Some(n) = name.as_str() {
                s.helpers.insert(normalize_host(host), n.to_string());
            }
        }
    }
    s.store = v["credsStore"].as_str().map(str::to_string);
    Some(s)
}

impl Credentials {
    /// Reads every source (missing files are skipped).
    pub fn load(docker_config: Option<PathBuf>) -> Credentials {
        let mut paths = auth_file_paths();
        paths.extend(docker_config_path(docker_config));
        Credentials {
            sources: paths.iter().filter_map(|p| read_source(p)).collect(),
        }
    }

    /// `base64(user:password)` for `registry`, if any source has it.
    pub fn get(&self, registry: &str) -> Option<String> {
        let host = normalize_host(registry);
        for s in &self.sources {
            if let Some(a) = s.auths.get(&host) {
                return Some(a.clone());
            }
            let helper = s.helpers.get(&host).or(s.store.as_ref());
            if let Some(h) = helper {
                match run_helper(h, &host) {
                    Ok(Some(a)) => return Some(a),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        "credential helper docker-credential-{h} (from {}) for {host}: {e}",
                        s.path.display()
                    ),
                }
            }
        }
        None
    }

    /// Where credentials were looked for, for error messages.
    pub fn describe() -> String {
        let mut v: Vec<String> = auth_file_paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        v.extend(docker_config_path(None).map(|p| p.display().to_string()));
        v.join(", ")
    }

    /// The auths by registry (for tests and `load_docker_credentials`).
    pub fn auths(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for s in self.sources.iter().rev() {
            out.extend(s.auths.clone());
        }
        out
    }
}

/// `docker-credential-NAME get` for `host`: `Ok(None)` when it has no credentials.
fn run_helper(name: &str, host: &str) -> Result<Option<String>, String> {
    use std::io::Write;
    if name.is_empty() || name.contains('/') {
        return Err(format!("bad helper name {name:?}"));
    }
    let prog = format!("docker-credential-{name}");
    #[allow(clippy::disallowed_methods)] // a credential helper is the user's program, not a seam
    let mut child = std::process::Command::new(&prog)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(host.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if !out.status.success() {
        // "credentials not found in native keychain" is not an error: no credentials.
        return Ok(None);
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{prog} printed no JSON: {e}"))?;
    let (user, secret) = (v["Username"].as_str(), v["Secret"].as_str());
    match (user, secret) {
        (Some(u), Some(s)) if !s.is_empty() => Ok(Some(base64(format!("{u}:{s}").as_bytes()))),
        _ => Ok(None),
    }
}

/// Standard base64 with padding.
pub fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Adds (or with `None`, removes) `host`'s entry in the Docker config at `path`, keeping
/// everything else in the file; the file is 0600.
pub fn store_docker_auth(path: &Path, host: &str, auth: Option<&str>) -> std::io::Result<bool> {
    let mut v: Value = match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not valid JSON: {e}", path.display()),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(e),
    };
    if !v.is_object() {
        v = serde_json::json!({});
    }
    let host = normalize_host(host);
    let key = if host == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.clone()
    };
    let auths = v
        .as_object_mut()
        .and_then(|o| {
            o.entry("auths")
                .or_insert_with(|| serde_json::json!({}))
                .as_object_mut()
        })
        .ok_or_else(|| std::io::Error::other("\"auths\" is not an object"))?;
    let changed = match auth {
        Some(a) => {
            auths.insert(key, serde_json::json!({ "auth": a }));
            true
        }
        None => auths.remove(&key).is_some() || auths.remove(&host).is_some(),
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(&v).map_err(std::io::Error::other)?)?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_everyone() {
        assert_eq!(base64(b"u:p"), "dTpw");
        assert_eq!(base64(b"a:bc"), "YTpiYw==");
        assert_eq!(base64(b"ab:cd"), "YWI6Y2Q=");
    }

    #[test]
    fn sources_in_order_and_written_back() {
        let d = tempfile::tempdir().unwrap();
        let docker = d.path().join("config.json");
        std::fs::write(
            &docker,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpw"},"127.0.0.1:5000":{"auth":"YTpi"}},"credsStore":"none-such-helper","other":1}"#,
        )
        .unwrap();
        let s = read_source(&docker).unwrap();
        assert_eq!(s.auths["docker.io"], "dTpw");
        assert_eq!(s.auths["127.0.0.1:5000"], "YTpi");
        assert_eq!(s.store.as_deref(), Some("none-such-helper"));
        let c = Credentials { sources: vec![s] };
        assert_eq!(c.get("127.0.0.1:5000").as_deref(), Some("YTpi"));
        // A helper that cannot run gives no credentials (and a warning), not a failure.
        assert_eq!(c.get("ghcr.io"), None);
        assert!(store_docker_auth(&docker, "ghcr.io", Some("eDp5")).unwrap());
        let back = read_source(&docker).unwrap();
        assert_eq!(back.auths["ghcr.io"], "eDp5");
        let text = std::fs::read_to_string(&docker).unwrap();
        assert!(text.contains("\"other\": 1"), "other keys kept: {text}");
        assert!(store_docker_auth(&docker, "ghcr.io", None).unwrap());
        assert!(!store_docker_auth(&docker, "ghcr.io", None).unwrap());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&docker).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
