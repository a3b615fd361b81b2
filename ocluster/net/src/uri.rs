//! Sturdy refs as capnp-rpc-unix writes them (reference/ocluster-wire.md §2):
//!
//! ```text
//! capnp://sha-256:FINGERPRINT@HOST:PORT/SERVICE-ID
//! capnp://insecure@HOST:PORT/SERVICE-ID          (--capnp-disable-tls)
//! capnp://sha-256:FINGERPRINT@/path/to/socket/SERVICE-ID
//! ```
//!
//! FINGERPRINT is the SHA-256 of the server key's SubjectPublicKeyInfo and SERVICE-ID the
//! raw bytes of the service's secret id, both base64url without padding. Addresses given
//! on command lines (`--capnp-listen-address`) are `tcp:HOST:PORT` or `unix:PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// How the client checks the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Plain TCP: no check at all.
    Insecure,
    /// TLS, and the server's key must hash to this.
    Sha256([u8; 32]),
}

/// Where a vat listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// A capability's address and secret: the contents of a `.cap` file.
#[derive(Clone, PartialEq, Eq)]
pub struct SturdyRef {
    pub auth: Auth,
    pub location: Location,
    pub service_id: Vec<u8>,
}

impl fmt::Debug for SturdyRef {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SturdyRef")
            .field("auth", &self.auth)
            .field("location", &self.location)
            .field(
                "service_id",
                &format_args!("<{} bytes>", self.service_id.len()),
            )
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UriError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, UriError> {
    Err(UriError(msg.into()))
}

/// base64url without padding, as capnp-rpc writes it.
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Reads base64url; padding is tolerated.
pub fn unb64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

impl fmt::Display for Location {
    /// `tcp:HOST:PORT` or `unix:PATH`, as capnp-rpc prints addresses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Location::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl FromStr for Location {
    type Err = UriError;

    /// `tcp:HOST:PORT` or `unix:PATH`.
    fn from_str(s: &str) -> Result<Location, UriError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return err(format!("{s:?}: the socket path is missing (unix:PATH)"));
            }
            return Ok(Location::Unix(PathBuf::from(path)));
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            let (host, port) = split_host_port(hp)
                .ok_or_else(|| UriError(format!("{s:?}: expected tcp:HOST:PORT")))?;
            return Ok(Location::Tcp { host, port });
        }
        err(format!(
            "{s:?}: an address is tcp:HOST:PORT (e.g. tcp:0.0.0.0:9000) or unix:PATH"
        ))
    }
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        s.rsplit_once(':')?
    };
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

impl fmt::Display for SturdyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("capnp://")?;
        match &self.auth {
            Auth::Insecure => f.write_str("insecure@")?,
            Auth::Sha256(fp) => write!(f, "sha-256:{}@", b64(fp))?,
        }
        let id = b64(&self.service_id);
        match &self.location {
            Location::Tcp { host, port } => {
                if host.contains(':') {
                    write!(f, "[{host}]:{port}/{id}")
                } else {
                    write!(f, "{host}:{port}/{id}")
                }
            }
            Location::Unix(p) => write!(f, "{}/{id}", p.display()),
        }
    }
}

impl FromStr for SturdyRef {
    type Err = UriError;

    fn from_str(s: &str) -> Result<SturdyRef, UriError> {
        let s = s.trim();
        let Some(rest) = s.strip_prefix("capnp://") else {
            return match s.split_once("://") {
                Some((scheme, _)) => err(format!(
                    "unknown scheme {scheme:?} (expected 'capnp://...')"
                )),
                None => err("not a capnp:// URI (expected 'capnp://...')"),
            };
        };
        let Some((userinfo, addr)) = rest.split_once('@') else {
            return err(
                "missing digest (e.g. 'capnp://sha-256:DIGEST@...' or 'capnp://insecure@...')",
            );
        };
        let auth = match userinfo.split_once(':') {
            None if userinfo == "insecure" => Auth::Insecure,
            None => {
                return err(format!(
                    "missing digest value after {userinfo:?} (e.g. 'capnp://sha-256:DIGEST@...')"
                ))
            }
            Some(("sha-256", digest)) => {
                let bytes = unb64(digest).ok_or_else(|| {
                    UriError(format!("the fingerprint {digest:?} is not base64url"))
                })?;
                let fp: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
                    UriError(format!(
                        "the fingerprint is {} bytes; a sha-256 fingerprint is 32",
                        b.len()
                    ))
                })?;
                Auth::Sha256(fp)
            }
            Some((hash, _)) => {
                return err(format!("unknown hash type {hash:?} (expected sha-256)"))
            }
        };
        let decode = |id: &str| {
            unb64(id).ok_or_else(|| UriError(format!("the service id {id:?} is not base64url")))
        };
        if addr.starts_with('/') {
            let (path, id) = addr.rsplit_once('/').expect("starts with /");
            if path.is_empty() {
                return err("the socket path is missing");
            }
            return Ok(SturdyRef {
                auth,
                location: Location::Unix(PathBuf::from(path)),
                service_id: decode(id)?,
            });
        }
        let (hostport, id) = addr.split_once('/').unwrap_or((addr, ""));
        let (host, port) = split_host_port(hostport)
            .ok_or_else(|| UriError(format!("{hostport:?}: expected HOST:PORT after '@'")))?;
        Ok(SturdyRef {
            auth,
            location: Location::Tcp { host, port },
            service_id: decode(id)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "capnp://sha-256:Agx4_dWKZm4kR-aHdFsDXEMVkIyWi61YbocXcbKUYyw@127.0.0.1:9400/dmU8ApNbwHVFYY4LRKMUn3K51sV2oLi7Oe5Qt18H_tM";

    #[test]
    fn round_trips_the_originals_forms() {
        for s in [
            ADMIN,
            "capnp://insecure@127.0.0.1:9410/MM6couw0sPuPrnl5Xr2drgmkAKY",
            "capnp://sha-256:Agx4_dWKZm4kR-aHdFsDXEMVkIyWi61YbocXcbKUYyw@/run/sched.sock/MM6couw0sPuPrnl5Xr2drgmkAKY",
        ] {
            let r: SturdyRef = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        let r: SturdyRef = ADMIN.parse().unwrap();
        assert_eq!(r.service_id.len(), 32);
        assert_eq!(
            r.location,
            Location::Tcp {
                host: "127.0.0.1".into(),
                port: 9400
            }
        );
        let r: SturdyRef = "capnp://insecure@127.0.0.1:9410/MM6couw0sPuPrnl5Xr2drgmkAKY"
            .parse()
            .unwrap();
        assert_eq!(r.service_id.len(), 20);
        assert_eq!(r.auth, Auth::Insecure);
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        for (s, want) in [
            ("http://x", "unknown scheme \"http\""),
            ("hello", "not a capnp:// URI"),
            ("capnp://127.0.0.1:9000/abc", "missing digest"),
            ("capnp://sha-256@h:1/abc", "missing digest value"),
            ("capnp://md5:abc@h:1/x", "unknown hash type \"md5\""),
            ("capnp://sha-256:AAAA@h:1/x", "3 bytes"),
            ("capnp://sha-256:!!@h:1/x", "not base64url"),
            ("capnp://insecure@h/x", "expected HOST:PORT"),
            ("capnp://insecure@h:99999/x", "expected HOST:PORT"),
            ("capnp://insecure@h:1/***", "service id"),
        ] {
            let e = s.parse::<SturdyRef>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn addresses() {
        assert_eq!(
            "tcp:0.0.0.0:9000".parse::<Location>().unwrap().to_string(),
            "tcp:0.0.0.0:9000"
        );
        assert_eq!(
            "unix:/tmp/s".parse::<Location>().unwrap(),
            Location::Unix("/tmp/s".into())
        );
        assert!("0.0.0.0:9000".parse::<Location>().is_err());
        assert!("tcp:host".parse::<Location>().is_err());
    }

    #[test]
    fn debug_hides_the_secret() {
        let r: SturdyRef = ADMIN.parse().unwrap();
        assert!(!format!("{r:?}").contains("dmU8"));
    }
}
