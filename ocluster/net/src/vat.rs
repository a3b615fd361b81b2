//! Cap'n Proto connections as capnp-rpc-unix makes them: TCP (keepalive after 60 s idle)
//! or a unix socket, TLS unless `insecure`, the two-party protocol with unpacked framing,
//! and a `Bootstrap` that names the wanted service by its secret id
//! (`deprecatedObjectId`, as Text).
//!
//! The published capnp-rpc crate does not do bootstrap by id, so this module adds it
//! through the crate's public traits ([`capnp_rpc::VatNetwork`], [`capnp_rpc::Connection`],
//! [`capnp_rpc::OutgoingMessage`]), without changing the crate:
//!
//! * client side, outgoing `Bootstrap` messages get the id written in as they are sent;
//! * server side, connections are served by `ocluster-rpc` ([`Server::serve`]), which
//!   restores each `Bootstrap` by its id itself: its answer is the restored capability
//!   (or the restorer's error), as the original's, and every `Bootstrap` on one
//!   connection gets its own service (an OCaml process reuses one connection to a
//!   scheduler for every service it holds there).
//!
//! Everything here is single-threaded (capnp-rpc is `!Send`): run it on a tokio
//! `LocalSet`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp::capability::{Client, Promise};
use capnp::message::ReaderOptions;
use capnp_rpc::rpc_capnp::message;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, Connection, IncomingMessage, OutgoingMessage, RpcSystem, VatNetwork};
use futures::{AsyncRead, AsyncWrite, FutureExt};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::key::SecretKey;
use crate::uri::{Auth, Location, SturdyRef};

/// The largest first segment an outgoing message starts with.
const MAX_FIRST_SEGMENT_WORDS: u32 = 32;

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest message accepted: 64 MiB (in 8-byte words). A bigger one ends the
/// connection that sent it.
pub const MAX_MESSAGE_WORDS: usize = 8 << 20;

fn reader_options() -> ReaderOptions {
    let mut o = ReaderOptions::new();
    o.traversal_limit_in_words(Some(MAX_MESSAGE_WORDS));
    o
}

type Reader = Pin<Box<dyn AsyncRead + Unpin>>;
type Writer = Pin<Box<dyn AsyncWrite + Unpin>>;

// ---- bootstrap by id: the client side's wrapper ------------------------------------------

struct IdNetwork {
    inner: twoparty::VatNetwork<Reader>,
    /// The id written into outgoing `Bootstrap`s.
    id: Rc<Vec<u8>>,
}

impl IdNetwork {
    fn wrap(&self, c: Box<dyn Connection<Side>>) -> Box<dyn Connection<Side>> {
        Box::new(IdConnection {
            inner: c,
            id: self.id.clone(),
        })
    }
}

impl VatNetwork<Side> for IdNetwork {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn Connection<Side>>> {
        let c = self.inner.connect(host_id)?;
        Some(self.wrap(c))
    }

    fn accept(&mut self) -> Promise<Box<dyn Connection<Side>>, capnp::Error> {
        let id = self.id.clone();
        Promise::from_future(self.inner.accept().map(move |r| {
            r.map(|c| Box::new(IdConnection { inner: c, id }) as Box<dyn Connection<Side>>)
        }))
    }

    fn drive_until_shutdown(&mut self) -> Promise<(), capnp::Error> {
        self.inner.drive_until_shutdown()
    }
}

struct IdConnection {
    inner: Box<dyn Connection<Side>>,
    id: Rc<Vec<u8>>,
}

impl Connection<Side> for IdConnection {
    fn get_peer_vat_id(&self) -> Side {
        self.inner.get_peer_vat_id()
    }

    fn new_outgoing_message(&mut self, first_segment_word_size: u32) -> Box<dyn OutgoingMessage> {
        // capnp-rpc asks for 100 words for every Return and 1024 for every Call, and
        // keeps a Return's message while its answer can be pipelined on. Most messages
        // here are a few words; a bigger one just gets a second segment.
        let first_segment_word_size = first_segment_word_size.min(MAX_FIRST_SEGMENT_WORDS);
        // Room for the id in the first segment, so that a Bootstrap stays one segment,
        // as the original sends it.
        let extra = if first_segment_word_size == 0 {
            0
        } else {
            (self.id.len() as u32 + 1).div_ceil(8) + 1
        };
        Box::new(Wrapped {
            inner: self
                .inner
                .new_outgoing_message(first_segment_word_size + extra),
            id: self.id.clone(),
        })
    }

    fn receive_incoming_message(
        &mut self,
    ) -> Promise<Option<Box<dyn IncomingMessage + 'static>>, capnp::Error> {
        self.inner.receive_incoming_message()
    }

    fn new_stream(
        &mut self,
    ) -> (
        Box<dyn capnp_rpc::FlowController>,
        Promise<(), capnp::Error>,
    ) {
        self.inner.new_stream()
    }

    fn shutdown(&mut self, result: capnp::Result<()>) -> Promise<(), capnp::Error> {
        self.inner.shutdown(result)
    }
}

/// An outgoing message; a `Bootstrap` gets the service id written in as it is sent.
struct Wrapped {
    inner: Box<dyn OutgoingMessage>,
    id: Rc<Vec<u8>>,
}

impl OutgoingMessage for Wrapped {
    fn get_body(&mut self) -> capnp::Result<capnp::any_pointer::Builder<'_>> {
        self.inner.get_body()
    }

    fn get_body_as_reader(&self) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
        self.inner.get_body_as_reader()
    }

    fn send(
        mut self: Box<Self>,
    ) -> (
        Promise<(), capnp::Error>,
        Rc<capnp::message::Builder<capnp::message::HeapAllocator>>,
    ) {
        if let Err(e) = set_bootstrap_id(self.inner.as_mut(), &self.id) {
            tracing::warn!("cannot name the service in the bootstrap message: {e}");
        }
        self.inner.send()
    }

    fn take(self: Box<Self>) -> capnp::message::Builder<capnp::message::HeapAllocator> {
        self.inner.take()
    }

    fn size_in_words(&self) -> usize {
        self.inner.size_in_words()
    }
}

/// Writes the service id into a `Bootstrap` message, as a NUL-terminated Text (the OCaml
/// reader requires the NUL).
fn set_bootstrap_id(m: &mut dyn OutgoingMessage, id: &[u8]) -> capnp::Result<()> {
    if id.is_empty() {
        return Ok(());
    }
    let body = m.get_body()?;
    let msg: message::Builder = body.get_as()?;
    if let Ok(message::Bootstrap(b)) = msg.which() {
        b?.init_deprecated_object_id()
            .set_as(capnp::text::Reader::from(id))?;
    }
    Ok(())
}

// ---- sockets -----------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {location}: {source}")]
    Connect {
        location: Location,
        source: std::io::Error,
    },
    #[error("TLS handshake with {location} failed: {source}")]
    Tls {
        location: Location,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::tls::TlsError),
}

/// Keepalive as capnp-rpc-unix sets it: probes after 60 s of silence.
fn keepalive(s: &tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(s);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!("cannot set TCP keepalive: {e}");
    }
    let _ = s.set_nodelay(true);
}

/// A stream's halves for capnp-rpc: the writer batches (capnp's queue flushes after every
/// message).
fn split<S>(s: S) -> (Reader, Writer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (r, w) = tokio::io::split(s);
    (reader(r), Box::pin(crate::batch::BatchWriter::new(w)))
}

/// A stream's halves for ocluster-rpc, which batches its writes itself.
fn split_plain<S>(s: S) -> (Reader, Writer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (r, w) = tokio::io::split(s);
    (reader(r), Box::pin(w.compat_write()))
}

fn reader<R: tokio::io::AsyncRead + Unpin + 'static>(r: R) -> Reader {
    Box::pin(futures::io::BufReader::with_capacity(
        16 * 1024,
        crate::batch::EofReader(r.compat()),
    ))
}

async fn open_stream(
    location: &Location,
    auth: &Auth,
    key: &SecretKey,
) -> Result<(Reader, Writer), ConnectError> {
    let tls = match auth {
        Auth::Insecure => None,
        Auth::Sha256(fp) => Some(crate::tls::client_config(key, *fp)?),
    };
    let handshake = |source: std::io::Error| ConnectError::Tls {
        location: location.clone(),
        // Our own verifier's message, without rustls's "unexpected error: " around it.
        source: match source
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::General(m)) => std::io::Error::other(m.clone()),
            _ => source,
        },
    };
    match location {
        Location::Tcp { host, port } => {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|source| ConnectError::Resolve {
                    host: host.clone(),
                    source,
                })?
                .collect();
            // IPv4 first, as the original (which knows only IPv4).
            let mut ordered: Vec<SocketAddr> =
                addrs.iter().filter(|a| a.is_ipv4()).copied().collect();
            ordered.extend(addrs.iter().filter(|a| a.is_ipv6()));
            let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
            let mut stream = None;
            for a in ordered {
                match tokio::net::TcpStream::connect(a).await {
                    Ok(s) => {
                        stream = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = stream.ok_or_else(|| ConnectError::Connect {
                location: location.clone(),
                source: last,
            })?;
            keepalive(&s);
            match tls {
                None => Ok(split(s)),
                Some(cfg) => {
                    let name = rustls::pki_types::ServerName::try_from("capnp").expect("valid");
                    let t = tokio::time::timeout(
                        HANDSHAKE_TIMEOUT,
                        tokio_rustls::TlsConnector::from(cfg).connect(name, s),
                    )
                    .await
                    .map_err(|_| handshake(std::io::ErrorKind::TimedOut.into()))?
                    .map_err(handshake)?;
                    Ok(split(t))
                }
            }
        }
        Location::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path)
                .await
                .map_err(|source| ConnectError::Connect {
                    location: location.clone(),
                    source,
                })?;
            match tls {
                None => Ok(split(s)),
                Some(cfg) => {
                    let name = rustls::pki_types::ServerName::try_from("capnp").expect("valid");
                    let t = tokio_rustls::TlsConnector::from(cfg)
                        .connect(name, s)
                        .await
                        .map_err(handshake)?;
                    Ok(split(t))
                }
            }
        }
    }
}

/// A connection to a service: its capability, and the connection's driver (which ends
/// when the connection does).
pub struct Connected {
    pub cap: Client,
    pub disconnector: capnp_rpc::Disconnector<Side>,
    pub driver: tokio::task::JoinHandle<Result<(), capnp::Error>>,
}

/// Connects to the service a sturdy ref names, presenting `key` (for TLS). Must run on a
/// `LocalSet`.
pub async fn connect(sr: &SturdyRef, key: &SecretKey) -> Result<Connected, ConnectError> {
    let (r, w) = open_stream(&sr.location, &sr.auth, key).await?;
    let network = IdNetwork {
        inner: twoparty::VatNetwork::new(r, w, Side::Client, reader_options()),
        id: Rc::new(sr.service_id.clone()),
    };
    let mut system = RpcSystem::new(Box::new(network), None);
    let cap: Client = system.bootstrap(Side::Server);
    let disconnector = system.get_disconnector();
    let driver = tokio::task::spawn_local(system);
    Ok(Connected {
        cap,
        disconnector,
        driver,
    })
}

// ---- serving -------------------------------------------------------------------------------

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// The SHA-256 of the client's public key (TLS).
    Key([u8; 32]),
    /// Plain TCP: the address only.
    Insecure(String),
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Key(k) => write!(f, "sha-256:{}", crate::uri::b64(k)),
            Peer::Insecure(a) => write!(f, "insecure:{a}"),
        }
    }
}

/// Gives the capability for a service id; an error is sent to the client as the
/// bootstrap's failure.
pub type Restorer = Rc<dyn Fn(&[u8], &Peer) -> Result<Client, capnp::Error>>;

/// Serves Cap'n Proto connections, each restoring the service its `Bootstrap` names.
#[derive(Clone)]
pub struct Server {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub restorer: Restorer,
}

/// A listening socket.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl Listener {
    /// Listens on `tcp:HOST:PORT` or `unix:PATH` (a stale socket file is replaced).
    pub async fn bind(location: &Location) -> std::io::Result<Listener> {
        match location {
            Location::Tcp { host, port } => {
                let addr = tokio::net::lookup_host((host.as_str(), *port))
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::other(format!("{host}: no address")))?;
                let sock = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                sock.set_reuseaddr(true)?;
                sock.bind(addr)?;
                // The original's backlog is 5; whole pools reconnect at once after a restart.
                Ok(Listener::Tcp(sock.listen(1024)?))
            }
            Location::Unix(path) => {
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(path);
                }
                Ok(Listener::Unix(tokio::net::UnixListener::bind(path)?))
            }
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }
}

impl Server {
    /// Accepts connections until the listener fails. Must run on a `LocalSet`.
    pub async fn serve(self, listener: Listener) -> std::io::Result<()> {
        loop {
            match &listener {
                Listener::Tcp(l) => {
                    let (s, addr) = match l.accept().await {
                        Ok(x) => x,
                        Err(e) => {
                            // Out of descriptors and the like: wait and go on.
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    keepalive(&s);
                    let this = self.clone();
                    tokio::task::spawn_local(async move {
                        this.handle(s, addr.to_string()).await;
                    });
                }
                Listener::Unix(l) => {
                    let (s, _) = match l.accept().await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let this = self.clone();
                    tokio::task::spawn_local(async move {
                        this.handle(s, "unix socket".into()).await;
                    });
                }
            }
        }
    }

    async fn handle<S>(self, s: S, addr: String)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    {
        let (r, w, peer) = match &self.tls {
            None => {
                let (r, w) = split_plain(s);
                (r, w, Peer::Insecure(addr.clone()))
            }
            Some(cfg) => {
                let accepted = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    tokio_rustls::TlsAcceptor::from(cfg.clone()).accept(s),
                )
                .await;
                let t = match accepted {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::info!("rejecting a connection from {addr}: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(
                            "rejecting a connection from {addr}: TLS handshake timed out"
                        );
                        return;
                    }
                };
                let key = t
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(crate::tls::spki_hash);
                let Some(key) = key else {
                    tracing::info!(
                        "rejecting a connection from {addr}: no client certificate found"
                    );
                    return;
                };
                let (r, w) = split_plain(t);
                (r, w, Peer::Key(key))
            }
        };
        tracing::debug!("connection from {addr} ({peer})");
        // Served by ocluster-rpc (a compact RPC layer of our own: docs/architecture.md);
        // each `Bootstrap` restores the service its id names.
        let restorer = self.restorer.clone();
        let p = peer.clone();
        let conn = ocluster_rpc::Conn::new(ocluster_rpc::Options {
            max_message_words: MAX_MESSAGE_WORDS,
            restorer: Some(Box::new(move |id: &[u8]| {
                restorer(id, &p).map(|c| ocluster_rpc::Cap::from_hook(c.hook))
            })),
        });
        let why = conn.run(r, w).await;
        match why.kind {
            capnp::ErrorKind::Disconnected => {
                tracing::debug!("connection from {addr} ({peer}) closed: {}", why.extra)
            }
            _ => tracing::info!("connection from {addr} ({peer}) ended: {why}"),
        }
    }
}
