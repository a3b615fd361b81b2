//! The OBuilder engine: turns a spec into cached results over any store, sandbox and
//! fetcher.
//!
//! * [`store::Store`], [`sandbox::Sandbox`], [`fetch::Fetcher`]: the three narrow
//!   interfaces, with their contracts in their docs. Backends live in other crates.
//! * [`Builder`] (`build`): the step semantics (`from`, `run`, `copy`, `env`, `workdir`,
//!   `user`, `shell`, stages), over the policy layer (`policy`: database, de-duplication,
//!   cancellation, pruning, crash recovery).
//! * [`error`]: why a build failed, as data ([`BuildError`]: the step, the kind, the cause).
//! * [`confined`]: writing into a tree a step or an image controls, never outside it.
//! * [`key`]: cache keys, byte-compatible with OBuilder's.
//! * [`log`]: typed build logs and per-step log files that can be followed while written.
//! * [`exec`]: the one seam every external command goes through.

pub mod build;
pub mod confined;
pub mod copy;
pub mod db;
pub mod error;
pub mod exec;
pub mod fetch;
pub mod key;
pub mod lock;
pub mod log;
pub mod policy;
pub mod sandbox;
pub mod store;
pub mod timing;

pub use build::{BuildOptions, Builder, BuilderOptions};
pub use error::{BuildError, FailureKind, StepError, StepRef};
pub use policy::{CacheStats, InFlightStep, ResultInfo};
pub use tokio_util::sync::CancellationToken;
