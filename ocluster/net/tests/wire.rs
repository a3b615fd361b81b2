//! Real TCP and TLS on 127.0.0.1: bootstrap by service id, the pinned server key, the
//! mandatory client certificate, several services on one connection, and clean refusals
//! (wrong fingerprint, unknown id, garbage, an oversized message), after each of which
//! the server goes on serving.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use ocluster_api::progress;
use ocluster_net::vat::{self, Listener, Peer, Server};
use ocluster_net::{Auth, Location, SecretKey, SturdyRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Recorder {
    seen: Rc<RefCell<Vec<String>>>,
    prefix: &'static str,
}

impl progress::Server for Recorder {
    async fn report(
        self: Rc<Self>,
        params: progress::ReportParams,
        _: progress::ReportResults,
    ) -> Result<(), capnp::Error> {
        let s = params.get()?.get_status()?.to_string()?;
        self.seen.borrow_mut().push(format!("{}{s}", self.prefix));
        Ok(())
    }
}

struct Fixture {
    key: SecretKey,
    port: u16,
    seen: Rc<RefCell<Vec<String>>>,
    peers: Rc<RefCell<Vec<Peer>>>,
}

const ID: &[u8] = b"0123456789abcdefghij";
/// A second service, whose reports are recorded with a `2:` in front.
const ID2: &[u8] = b"second-service-id-20";

async fn start(tls: bool) -> Fixture {
    let key = SecretKey::generate_ephemeral().unwrap();
    let seen = Rc::new(RefCell::new(Vec::new()));
    let peers = Rc::new(RefCell::new(Vec::new()));
    let (s2, p2) = (seen.clone(), peers.clone());
    let server = Server {
        tls: tls.then(|| ocluster_net::tls::server_config(&key).unwrap()),
        restorer: Rc::new(move |id: &[u8], peer: &Peer| {
            p2.borrow_mut().push(peer.clone());
            if id == ID {
                let c: progress::Client = capnp_rpc::new_client(Recorder {
                    seen: s2.clone(),
                    prefix: "",
                });
                Ok(c.client)
            } else if id == ID2 {
                let c: progress::Client = capnp_rpc::new_client(Recorder {
                    seen: s2.clone(),
                    prefix: "2:",
                });
                Ok(c.client)
            } else {
                Err(capnp::Error::failed("Unknown persistent service ID".into()))
            }
        }),
    };
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::task::spawn_local(server.serve(l));
    Fixture {
        key,
        port,
        seen,
        peers,
    }
}

impl Fixture {
    fn sturdy(&self, id: &[u8], tls: bool) -> SturdyRef {
        SturdyRef {
            auth: if tls {
                Auth::Sha256(self.key.fingerprint())
            } else {
                Auth::Insecure
            },
            location: Location::Tcp {
                host: "127.0.0.1".into(),
                port: self.port,
            },
            service_id: id.to_vec(),
        }
    }

    async fn report(&self, sr: &SturdyRef, msg: &str) -> Result<(), String> {
        let client_key = SecretKey::generate_ephemeral().unwrap();
        let c = vat::connect(sr, &client_key)
            .await
            .map_err(|e| e.to_string())?;
        let p: progress::Client = capnp::capability::FromClientHook::new(c.cap.hook);
        let mut req = p.report_request();
        req.get().set_status(msg);
        let r = tokio::time::timeout(Duration::from_secs(10), req.send().promise)
            .await
            .map_err(|_| "timed out".to_string())?;
        r.map(|_| ()).map_err(|e| e.to_string())
    }
}

fn run<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(tokio::task::LocalSet::new().run_until(f));
}

#[test]
fn tls_bootstrap_by_id_and_client_identity() {
    run(async {
        let f = start(true).await;
        f.report(&f.sturdy(ID, true), "hello").await.unwrap();
        assert_eq!(*f.seen.borrow(), ["hello"]);
        // The peer is known by its key.
        assert!(matches!(f.peers.borrow()[0], Peer::Key(_)));
    });
}

#[test]
fn wrong_fingerprint_is_refused_and_says_why() {
    run(async {
        let f = start(true).await;
        let mut sr = f.sturdy(ID, true);
        sr.auth = Auth::Sha256([7; 32]);
        let e = f.report(&sr, "x").await.unwrap_err();
        assert!(e.contains("not the sha-256:"), "{e}");
        assert!(e.contains("127.0.0.1"), "{e}");
        f.report(&f.sturdy(ID, true), "after").await.unwrap();
        assert_eq!(*f.seen.borrow(), ["after"]);
    });
}

#[test]
fn unknown_service_id_fails_the_call() {
    run(async {
        let f = start(true).await;
        let e = f.report(&f.sturdy(b"nope", true), "x").await.unwrap_err();
        assert!(e.contains("Unknown persistent service ID"), "{e}");
        f.report(&f.sturdy(ID, true), "after").await.unwrap();
    });
}

#[test]
fn a_client_without_a_certificate_is_dropped() {
    run(async {
        let f = start(true).await;
        // A TLS client that presents no certificate.
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        #[derive(Debug)]
        struct AcceptAll(std::sync::Arc<rustls::crypto::CryptoProvider>);
        impl rustls::client::danger::ServerCertVerifier for AcceptAll {
            fn verify_server_cert(
                &self,
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &[rustls::pki_types::CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                self.0.signature_verification_algorithms.supported_schemes()
            }
        }
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAll(provider)))
            .with_no_client_auth();
        let s = tokio::net::TcpStream::connect(("127.0.0.1", f.port))
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("capnp").unwrap();
        let r = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
            .connect(name, s)
            .await;
        // TLS 1.3 may finish the handshake from the client's side; either way nothing
        // more is served on it.
        if let Ok(mut t) = r {
            let _ = t.write_all(&[0u8; 64]).await;
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(10), t.read(&mut buf))
                .await
                .expect("the server closes the connection");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        }
        assert!(f.peers.borrow().is_empty(), "nothing restored for it");
        f.report(&f.sturdy(ID, true), "after").await.unwrap();
    });
}

/// A Bootstrap frame for `id` with question `q`, built with the RPC schema.
fn bootstrap_frame(q: u32, id: &[u8]) -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    {
        let msg = m.init_root::<capnp_rpc::rpc_capnp::message::Builder>();
        let mut b = msg.init_bootstrap();
        b.set_question_id(q);
        b.init_deprecated_object_id()
            .set_as(capnp::text::Reader::from(id))
            .unwrap();
    }
    capnp::serialize::write_message_to_words(&m)
}

async fn read_until_closed(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return all,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open"),
        }
    }
}

/// Reads the next whole message from `s` (after what `buf` holds already).
async fn next_message(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> capnp::message::Reader<capnp::serialize::OwnedSegments> {
    loop {
        let mut r = &buf[..];
        if let Ok(m) = capnp::serialize::read_message(&mut r, Default::default()) {
            let used = buf.len() - r.len();
            buf.drain(..used);
            return m;
        }
        let mut more = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut more)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&more[..n]),
            other => panic!("no message: {other:?}"),
        }
    }
}

/// `Progress.report(status)` on the answer to question `target`, as question `q`.
fn report_frame(q: u32, target: u32, status: &str) -> Vec<u8> {
    let mut m = capnp::message::Builder::new_default();
    {
        let msg = m.init_root::<capnp_rpc::rpc_capnp::message::Builder>();
        let mut c = msg.init_call();
        c.set_question_id(q);
        c.set_interface_id(ocluster_api::ids::PROGRESS);
        c.set_method_id(0);
        c.reborrow()
            .init_target()
            .init_promised_answer()
            .set_question_id(target);
        let mut p = c.init_params();
        p.reborrow()
            .get_content()
            .init_as::<progress::report_params::Builder>()
            .set_status(status);
        p.init_cap_table(0);
    }
    capnp::serialize::write_message_to_words(&m)
}

/// An OCaml process reuses its connection to a scheduler for every service it holds
/// there: each `Bootstrap` on one connection gets its own service, and an unknown id
/// is answered with the error itself, as the original answers it.
#[test]
fn several_service_ids_on_one_connection() {
    use capnp_rpc::rpc_capnp::{message, return_};
    run(async {
        let f = start(false).await;
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", f.port))
            .await
            .unwrap();
        s.write_all(&bootstrap_frame(0, ID)).await.unwrap();
        s.write_all(&bootstrap_frame(1, ID2)).await.unwrap();
        s.write_all(&bootstrap_frame(2, b"no-such-service-id!!"))
            .await
            .unwrap();
        s.write_all(&report_frame(3, 0, "one")).await.unwrap();
        s.write_all(&report_frame(4, 1, "two")).await.unwrap();
        let mut buf = Vec::new();
        let mut answers = std::collections::BTreeMap::new();
        while answers.len() < 5 {
            let m = next_message(&mut s, &mut buf).await;
            let msg: message::Reader = m.get_root().unwrap();
            if let Ok(message::Return(Ok(r))) = msg.which() {
                let what = match r.which().unwrap() {
                    return_::Results(p) => {
                        let caps: Vec<String> = p
                            .unwrap()
                            .get_cap_table()
                            .unwrap()
                            .iter()
                            .map(|d| match d.which().unwrap() {
                                capnp_rpc::rpc_capnp::cap_descriptor::SenderHosted(i) => {
                                    format!("hosted {i}")
                                }
                                _ => "other".into(),
                            })
                            .collect();
                        format!("results {caps:?}")
                    }
                    return_::Exception(e) => format!(
                        "exception {}",
                        e.unwrap().get_reason().unwrap().to_str().unwrap()
                    ),
                    _ => "other".into(),
                };
                answers.insert(r.get_answer_id(), what);
            }
        }
        assert_eq!(answers[&0], r#"results ["hosted 0"]"#, "{answers:?}");
        assert_eq!(answers[&1], r#"results ["hosted 1"]"#, "{answers:?}");
        assert_eq!(
            answers[&2], "exception Unknown persistent service ID",
            "{answers:?}"
        );
        assert_eq!(answers[&3], "results []", "{answers:?}");
        assert_eq!(answers[&4], "results []", "{answers:?}");
        assert_eq!(*f.seen.borrow(), ["one", "2:two"]);
        f.report(&f.sturdy(ID, false), "after").await.unwrap();
    });
}

#[test]
fn garbage_oversized_messages_and_the_restorers_question_end_only_their_connection() {
    run(async {
        let f = start(false).await;
        // Garbage.
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", f.port))
            .await
            .unwrap();
        let junk: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let _ = s.write_all(&junk).await;
        read_until_closed(&mut s).await;
        // A frame that claims 1 GiB.
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", f.port))
            .await
            .unwrap();
        let mut frame = vec![0u8; 8];
        frame[4..8].copy_from_slice(&(128u32 << 20).to_le_bytes());
        s.write_all(&frame).await.unwrap();
        read_until_closed(&mut s).await;
        // The question id the server's connection keeps for its restorer, used by the
        // peer: a `Finish` for it, then a `Bootstrap` and a call as question `u32::MAX`.
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", f.port))
            .await
            .unwrap();
        let mut m = capnp::message::Builder::new_default();
        m.init_root::<capnp_rpc::rpc_capnp::message::Builder>()
            .init_finish()
            .set_question_id(u32::MAX);
        s.write_all(&capnp::serialize::write_message_to_words(&m))
            .await
            .unwrap();
        let _ = s.write_all(&bootstrap_frame(0, ID)).await;
        let _ = s.write_all(&bootstrap_frame(u32::MAX, ID)).await;
        let _ = s.write_all(&report_frame(u32::MAX, 0, "hijack")).await;
        drop(s);
        // The server still serves, and nothing else reached the service.
        f.report(&f.sturdy(ID, false), "after").await.unwrap();
        assert_eq!(*f.seen.borrow(), ["after"]);
    });
}

#[test]
fn many_clients_at_once() {
    run(async {
        let f = Rc::new(start(true).await);
        let mut tasks = Vec::new();
        for i in 0..20 {
            let f = f.clone();
            tasks.push(tokio::task::spawn_local(async move {
                f.report(&f.sturdy(ID, true), &format!("c{i}")).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(f.seen.borrow().len(), 20);
    });
}
