//! OCluster's networking, compatible with OCaml's capnp-rpc-unix: sturdy refs ([`uri`]),
//! `.cap` files ([`capfile`]), keys, certificates, fingerprints and derived ids ([`key`]),
//! TLS that pins the server's key and identifies clients by theirs ([`tls`]), and Cap'n
//! Proto connections that bootstrap by service id ([`vat`]).

mod batch;
pub mod capfile;
pub mod der;
pub mod key;
pub mod tls;
pub mod uri;
pub mod vat;

pub use key::SecretKey;
pub use uri::{Auth, Location, SturdyRef};
