//! Sandboxes for obuilder. [`runc`]: Linux containers with an OCI config made by the pure
//! function [`oci::config`].

pub mod oci;
pub mod runc;

pub use runc::{RuncOptions, RuncSandbox};
