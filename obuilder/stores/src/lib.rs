//! Snapshot stores for obuilder, one module per backend, and [`StoreSpec`], the
//! `--store` value that picks one at run time.
//!
//! * [`dirstore`]: the core of every store whose results are whole trees, over a small
//!   primitive ([`dirstore::TreeOps`]): [`btrfs`] (subvolumes), [`xfs`] (reflinks),
//!   [`rsync`] (plain copies, portable).
//! * [`zfs`]: results as ZFS datasets, through the `zfs` command; [`zfs_base`]: base
//!   images cloned from `POOL/base-image/NAME`.
//! * [`overlayfs`]: results as layers, stacked per step.
//! * [`docker`]: results as images of a Docker-compatible engine (Windows workers).
//! * [`cache`]: shared caches, over the same primitive.

#[cfg(target_os = "linux")]
pub mod btrfs;
#[cfg(target_os = "linux")]
mod btrfs_ioctl;
pub mod cache;
pub mod dirstore;
pub mod docker;
pub mod docker_pull;
pub mod layout;
#[cfg(target_os = "linux")]
mod linux_fs;
#[cfg(target_os = "linux")]
pub mod overlayfs;
pub mod rsync;
pub mod spec;
#[cfg(target_os = "linux")]
pub mod xfs;
pub mod zfs;
pub mod zfs_base;

pub use spec::{detect_default, StoreSpec, StoreSpecError};
