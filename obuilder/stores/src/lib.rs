//! Snapshot stores for obuilder, one module per backend, and [`StoreSpec`], the
//! `--store` value that picks one at run time.

pub mod btrfs;
mod btrfs_ioctl;
pub mod cache;
pub mod common;
pub mod overlayfs;
pub mod rsync;
pub mod spec;
pub mod xfs;

pub use spec::{detect_default, StoreSpec};
