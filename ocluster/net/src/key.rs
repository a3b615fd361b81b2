//! A vat's key, as capnp-rpc-unix uses it (reference/ocluster-wire.md §2): the scheduler's
//! RSA-2048 key in a PKCS#8 PEM file (made 0600 on first start), the self-signed
//! certificate made from it at each start (CN=capnp, valid from 1970-01-01 01:01:01 to
//! 9999-12-31 23:59:59), its fingerprint (SHA-256 of the SubjectPublicKeyInfo) and the
//! service ids derived from the file's bytes: `HMAC-SHA256(SHA-256(pem), "admin" |
//! "pool-NAME")`.

use std::io::Write;
use std::path::Path;

use hmac::{Hmac, Mac};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the secret key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the secret key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a PKCS#8 PEM private key (-----BEGIN PRIVATE KEY-----) of RSA or ECDSA: {reason}")]
    Parse { path: String, reason: String },
    #[error("cannot make a key: {0}")]
    Generate(String),
}

/// A private key and what is derived from it.
pub struct SecretKey {
    /// The PEM exactly as stored: derived ids hash these bytes.
    pem: Vec<u8>,
    pair: rcgen::KeyPair,
    spki_hash: [u8; 32],
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey(sha-256:{})", crate::uri::b64(&self.spki_hash))
    }
}

impl SecretKey {
    /// Reads a PEM key; `origin` names it in errors.
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<SecretKey, KeyError> {
        let text = std::str::from_utf8(pem).map_err(|_| KeyError::Parse {
            path: origin.into(),
            reason: "not text".into(),
        })?;
        let pair = rcgen::KeyPair::from_pem(text).map_err(|e| KeyError::Parse {
            path: origin.into(),
            reason: e.to_string(),
        })?;
        let spki_hash = Sha256::digest(pair.public_key_der()).into();
        Ok(SecretKey {
            pem: pem.to_vec(),
            pair,
            spki_hash,
        })
    }

    /// A new RSA-2048 key, as the original makes for a scheduler.
    pub fn generate_rsa() -> Result<SecretKey, KeyError> {
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        let pem = key
            .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        SecretKey::from_pem(pem.as_bytes(), "a new key")
    }

    /// A new ECDSA P-256 key: quick to make, for a client's one-off identity.
    pub fn generate_ephemeral() -> Result<SecretKey, KeyError> {
        let pair = rcgen::KeyPair::generate().map_err(|e| KeyError::Generate(e.to_string()))?;
        SecretKey::from_pem(pair.serialize_pem().as_bytes(), "a new key")
    }

    /// Loads the key at `path`, or makes an RSA-2048 one there (mode 0600, never
    /// overwriting a file that appears meanwhile).
    pub fn load_or_create(path: &Path) -> Result<SecretKey, KeyError> {
        let name = path.display().to_string();
        match std::fs::read(path) {
            Ok(pem) => return SecretKey::from_pem(&pem, &name),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(KeyError::Read { path: name, source }),
        }
        let key = SecretKey::generate_rsa()?;
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(&key.pem)?;
            f.sync_all()
        };
        match write() {
            Ok(()) => Ok(key),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                SecretKey::load_or_create(path)
            }
            Err(source) => Err(KeyError::Write { path: name, source }),
        }
    }

    pub fn pem(&self) -> &[u8] {
        &self.pem
    }

    /// SHA-256 of the SubjectPublicKeyInfo: what `sha-256:` in a URI holds, and a peer's
    /// identity.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.spki_hash
    }

    /// The service id the original derives for `name` (`admin`, `pool-NAME`).
    pub fn derived_id(&self, name: &str) -> [u8; 32] {
        derived_id(&self.pem, name)
    }

    /// The self-signed certificate, made afresh (with a random serial) on each call.
    pub fn certificate(&self) -> Result<CertificateDer<'static>, KeyError> {
        let mut params = rcgen::CertificateParams::default();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "capnp");
        params.distinguished_name = dn;
        params.not_before = time::macros::datetime!(1970-01-01 01:01:01 UTC);
        params.not_after = time::macros::datetime!(9999-12-31 23:59:59 UTC);
        let mut serial = [0u8; 16];
        getrandom::getrandom(&mut serial).map_err(|e| KeyError::Generate(e.to_string()))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let cert = params
            .self_signed(&self.pair)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        Ok(cert.der().clone())
    }

    /// The private key for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pair.serialize_der()))
    }
}

/// `HMAC-SHA256(key = SHA-256(pem), msg = name)`.
pub fn derived_id(pem: &[u8], name: &str) -> [u8; 32] {
    let secret = Sha256::digest(pem);
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret).expect("any key length");
    mac.update(name.as_bytes());
    mac.finalize().into_bytes().into()
}

/// A new random client id: 20 bytes, as the original makes them.
pub fn random_client_id() -> [u8; 20] {
    let mut id = [0u8; 20];
    getrandom::getrandom(&mut id).expect("the OS random source works");
    id
}
