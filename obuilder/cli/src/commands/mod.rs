pub mod build;
pub mod cache;
pub mod check;
pub mod dockerfile;
pub mod fmt;
pub mod healthcheck;
pub mod image;
pub mod maintenance;
pub mod process;
pub mod pull;
pub mod setup;

use std::path::Path;

use anyhow::Context;

/// Reads a spec file's text, naming the file in the error.
pub fn read_spec_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("cannot read spec file {}", path.display()))
}
