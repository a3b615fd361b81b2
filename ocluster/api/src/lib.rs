//! OCluster's RPC interfaces, generated from `schema/schema.capnp` (OCluster's own schema,
//! file id `0x8378b104cef5b2eb`, written from its declarations so that every interface id
//! and struct layout is the original's) and `schema/persistent.capnp` (`Persistent.save`,
//! interface id `0xc8cb212fcd9f5691`).
//!
//! Interface ids travel in every call, so [`ids`] pins them; `tests/ids.rs` checks the
//! generated code against them and against the ids the OCaml programs use on the wire.

#![allow(clippy::all, clippy::pedantic)]

#[allow(unused_parens, dead_code, missing_docs)]
pub mod schema_capnp {
    include!(concat!(env!("OUT_DIR"), "/schema_capnp.rs"));
}

#[allow(unused_parens, dead_code, missing_docs)]
pub mod persistent_capnp {
    include!(concat!(env!("OUT_DIR"), "/persistent_capnp.rs"));
}

pub use persistent_capnp::persistent;
pub use schema_capnp::*;

/// The interface ids OCaml's OCluster uses on the wire (as captured from its programs).
pub mod ids {
    pub const SCHEMA_FILE: u64 = 0x8378_b104_cef5_b2eb;
    pub const SUBMISSION: u64 = 0xf4e8_a768_b32a_7c42;
    pub const TICKET: u64 = 0x9497_c03b_7ca5_b27b;
    pub const JOB: u64 = 0xca66_fd1f_972e_fccc;
    pub const QUEUE: u64 = 0x817f_986f_8026_3aaf;
    pub const WORKER: u64 = 0xe06e_edcf_95bf_7905;
    pub const REGISTRATION: u64 = 0xe098_a12b_91e3_5740;
    pub const PROGRESS: u64 = 0xd752_9e27_02cd_958a;
    pub const POOL_ADMIN: u64 = 0xd906_b771_b408_2451;
    pub const ADMIN: u64 = 0xdd51_f355_40da_c6ad;
    pub const PERSISTENT: u64 = 0xc8cb_212f_cd9f_5691;
}
