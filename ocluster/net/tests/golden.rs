//! Checks against files captured from the original OCaml programs
//! (../shared/reference/ocluster-golden/): fingerprints, derived service ids, cap files,
//! the certificate, and the bytes of the first message a client sends.

use std::path::PathBuf;

use ocluster_net::key::{derived_id, SecretKey};
use ocluster_net::{capfile, uri, Auth, SturdyRef};
use sha2::{Digest, Sha256};

/// The golden directory (`$OCLUSTER_GOLDEN`, or `../shared/reference/ocluster-golden`
/// beside the checkout), or None (skip, with the reason) when it is absent; under
/// `OBUILDER_TEST_STRICT=1` its absence fails the test.
pub fn golden() -> Option<PathBuf> {
    let d = std::env::var_os("OCLUSTER_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/reference/ocluster-golden")
        });
    if d.join("tls/key.pem").is_file() {
        return Some(d);
    }
    let msg = format!("golden files not found at {}", d.display());
    if std::env::var("OBUILDER_TEST_STRICT").is_ok_and(|v| v == "1") {
        panic!("OBUILDER_TEST_STRICT=1: {msg}");
    }
    eprintln!("SKIP: {msg}");
    None
}

fn key(dir: &str) -> Option<SecretKey> {
    let g = golden()?;
    let pem = std::fs::read(g.join(dir).join("key.pem")).unwrap();
    Some(SecretKey::from_pem(&pem, "key.pem").unwrap())
}

#[test]
fn fingerprint_is_the_sha256_of_the_public_key_info() {
    let Some(k) = key("tls") else { return };
    assert_eq!(
        uri::b64(&k.fingerprint()),
        "Agx4_dWKZm4kR-aHdFsDXEMVkIyWi61YbocXcbKUYyw"
    );
    let g = golden().unwrap();
    for cap in [
        "admin.cap",
        "pool-linux-x86_64.cap",
        "submit-alice.cap",
        "bob.cap",
    ] {
        let sr = capfile::read(&g.join("tls").join(cap)).unwrap();
        assert_eq!(sr.auth, Auth::Sha256(k.fingerprint()), "{cap}");
    }
}

#[test]
fn admin_and_pool_ids_are_derived_from_the_key_file() {
    for dir in ["tls", "plain"] {
        let Some(k) = key(dir) else { return };
        let g = golden().unwrap().join(dir);
        let admin = capfile::read(&g.join("admin.cap")).unwrap();
        assert_eq!(admin.service_id, k.derived_id("admin"), "{dir}/admin.cap");
        let pool = capfile::read(&g.join("pool-linux-x86_64.cap")).unwrap();
        assert_eq!(
            pool.service_id,
            k.derived_id("pool-linux-x86_64"),
            "{dir}/pool-linux-x86_64.cap"
        );
        assert_eq!(
            derived_id(k.pem(), "admin"),
            k.derived_id("admin"),
            "the id hashes the file's bytes"
        );
    }
}

#[test]
fn client_ids_are_stored_as_their_sha256() {
    let Some(g) = golden() else { return };
    for (dir, cap, name) in [
        ("tls", "submit-alice.cap", "alice"),
        ("tls", "bob.cap", "bob"),
        ("plain", "carol.cap", "carol"),
        ("plain", "submit-alice.cap", "alice"),
    ] {
        let sr = capfile::read(&g.join(dir).join(cap)).unwrap();
        assert_eq!(sr.service_id.len(), 20, "{cap}");
        let dump = std::fs::read_to_string(g.join(dir).join("scheduler.db.dump")).unwrap();
        let row = format!(
            "X'{}','ocluster-client',X'{}'",
            hex(&Sha256::digest(&sr.service_id)),
            hex(name.as_bytes())
        );
        assert!(dump.contains(&row), "{dir}/{cap}: no row {row}");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn cap_files_are_written_byte_for_byte() {
    let Some(g) = golden() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for dir in ["tls", "plain"] {
        for cap in ["admin.cap", "pool-linux-x86_64.cap", "submit-alice.cap"] {
            let original = std::fs::read(g.join(dir).join(cap)).unwrap();
            let sr = capfile::read(&g.join(dir).join(cap)).unwrap();
            let out = tmp.path().join(cap);
            capfile::write(&out, &sr).unwrap();
            assert_eq!(std::fs::read(&out).unwrap(), original, "{dir}/{cap}");
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}

#[test]
fn our_certificate_carries_the_same_key() {
    let Some(k) = key("tls") else { return };
    let cert = k.certificate().unwrap();
    assert_eq!(
        ocluster_net::tls::spki_hash(&cert),
        Some(k.fingerprint()),
        "the certificate's key is the file's key"
    );
    // The original's certificate (captured with openssl s_client) has the same key.
    let g = golden().unwrap();
    let pem = std::fs::read_to_string(g.join("tls/tls-probe/server-cert.pem")).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    use base64::Engine;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(
        ocluster_net::der::spki_of_certificate(&der).map(|s| <[u8; 32]>::from(Sha256::digest(s))),
        Some(k.fingerprint())
    );
}

/// The first message our client sends is byte for byte the one the original client sent
/// (a Bootstrap whose deprecatedObjectId is the service id as NUL-terminated Text).
#[test]
fn bootstrap_message_is_the_originals() {
    let Some(g) = golden() else { return };
    let captured = std::fs::read(g.join("plain/submit-client-to-scheduler.bin")).unwrap();
    let original_cap = capfile::read(&g.join("plain/submit-alice.cap")).unwrap();
    // The tap's copy of the cap file pointed at another port; the id is what matters.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sent = rt.block_on(tokio::task::LocalSet::new().run_until(async move {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let sr = SturdyRef {
            auth: Auth::Insecure,
            location: ocluster_net::Location::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            service_id: original_cap.service_id.clone(),
        };
        let key = SecretKey::generate_ephemeral().unwrap();
        let c = ocluster_net::vat::connect(&sr, &key).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 72];
        tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf)
            .await
            .unwrap();
        drop(c);
        buf
    }));
    assert_eq!(sent, captured[..72], "first frame differs");
}
