//! The OBuilder engine: turns a spec into cached results over any store, sandbox and
//! fetcher.
//!
//! * [`store::Store`], [`sandbox::Sandbox`], [`fetch::Fetcher`]: the three narrow
//!   interfaces, with their contracts in their docs. Backends live in other crates.
//! * [`Builder`]: the policy layer (database, de-duplication, cancellation, pruning) and the
//!   step semantics (`from`, `run`, `copy`, `env`, `workdir`, `user`, `shell`, stages).
//! * [`key`]: cache keys, byte-compatible with OBuilder's.
//! * [`log`]: typed build logs and per-step log files that can be followed while written.
//! * [`exec`]: the one seam every external command goes through.

pub mod builder;
pub mod confined;
pub mod copy;
pub mod db;
pub mod exec;
pub mod fetch;
pub mod key;
pub mod lock;
pub mod log;
pub mod sandbox;
pub mod store;
pub mod timing;

pub use builder::{BuildError, BuildOptions, Builder};
pub use tokio_util::sync::CancellationToken;
