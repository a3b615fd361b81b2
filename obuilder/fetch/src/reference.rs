//! Image references as Docker users write them: `alpine`, `alpine:3.20`,
//! `ocaml/opam:debian-12`, `ghcr.io/o/r:tag`, `host:5000/r@sha256:…`.
//!
//! Docker's rules: the first path component names a registry when it contains `.` or `:` or
//! is `localhost`; otherwise the registry is Docker Hub (`docker.io`, served by
//! `registry-1.docker.io`), where one-component names live under `library/`. With neither tag
//! nor digest the tag is `latest`.

use std::fmt;
use std::str::FromStr;

pub const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `127.0.0.1:5000`, …
    pub registry: String,
    /// `library/alpine`, `ocaml/opam`, …
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:…`
    pub digest: Option<String>,
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+ with single separators (., _, __, -+) between.
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && c.as_bytes()[0].is_ascii_alphanumeric()
        && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
}

impl FromStr for Reference {
    type Err = String;

    fn from_str(s: &str) -> Result<Reference, String> {
        let bad = |why: &str| format!("invalid image reference {s:?}: {why}");
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("a digest must be sha256:<64 hex digits>"))?;
                if hex.len() != 64
                    || !hex
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                {
                    return Err(bad("a digest must be sha256:<64 lowercase hex digits>"));
                }
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A tag is after the last ':' of the last path component.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => {
                let t = &name_tag[last_slash + i + 1..];
                let ok = !t.is_empty()
                    && t.len() <= 128
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                    && !t.starts_with(['.', '-']);
                if !ok {
                    return Err(bad(&format!("invalid tag {t:?}")));
                }
                (&name_tag[..last_slash + i], Some(t.to_string()))
            }
            None => (name_tag, None),
        };
        if name.is_empty() {
            return Err(bad("no repository name"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if let Some(c) = repository.split('/').find(|c| !valid_component(c)) {
            return Err(bad(&format!(
                "repository component {c:?} must be lowercase letters, digits and separators (. _ -)"
            )));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl Reference {
    /// The reference to ask the registry for: the digest if pinned, else the tag.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The host (and port) the API is served from.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// Whether the registry is on this machine (plain HTTP is allowed there).
    pub fn is_loopback(&self) -> bool {
        let host = if let Some(rest) = self.registry.strip_prefix('[') {
            rest.split(']').next().unwrap_or("")
        } else {
            self.registry.split(':').next().unwrap_or("")
        };
        host == "localhost" || host == "::1" || host.starts_with("127.")
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        assert_eq!(r("alpine").to_string(), "docker.io/library/alpine:latest");
        assert_eq!(
            r("alpine:3.20").to_string(),
            "docker.io/library/alpine:3.20"
        );
        assert_eq!(
            r("ocaml/opam:debian-12").to_string(),
            "docker.io/ocaml/opam:debian-12"
        );
        assert_eq!(r("docker.io/library/busybox").repository, "library/busybox");
        assert_eq!(r("alpine").api_host(), "registry-1.docker.io");
    }

    #[test]
    fn other_registries_ports_and_digests() {
        let d = format!("sha256:{}", "a".repeat(64));
        let x = r(&format!("host:5000/r@{d}"));
        assert_eq!(
            (
                x.registry.as_str(),
                x.repository.as_str(),
                x.tag.as_deref(),
                x.digest.as_deref()
            ),
            ("host:5000", "r", None, Some(d.as_str()))
        );
        assert_eq!(x.reference(), d);
        let g = r("ghcr.io/o/r:tag");
        assert_eq!(
            (g.registry.as_str(), g.repository.as_str(), g.reference()),
            ("ghcr.io", "o/r", "tag")
        );
        assert_eq!(r("localhost/x").registry, "localhost");
        assert!(r("127.0.0.1:5000/busybox:latest").is_loopback());
        assert!(r("localhost:5000/a").is_loopback());
        assert!(r("[::1]:5000/a").is_loopback());
        assert!(!r("ghcr.io/o/r").is_loopback());
        let both = r(&format!("alpine:3.20@{d}"));
        assert_eq!(both.reference(), d, "a digest wins over a tag");
    }

    #[test]
    fn bad_references_say_why() {
        for (s, why) in [
            ("Alpine", "lowercase"),
            ("alpine:", "invalid tag"),
            ("alpine@sha256:abc", "64"),
            ("alpine@md5:abc", "sha256"),
            ("", "no repository"),
            ("a//b", "lowercase"),
        ] {
            let e = s.parse::<Reference>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
