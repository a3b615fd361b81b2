pub mod base_image;
pub mod build;
pub mod cache;
pub mod check;
pub mod dockerfile;
pub mod fmt;
pub mod healthcheck;
pub mod image;
pub mod lazy;
pub mod login;
pub mod maintenance;
pub mod process;
pub mod pull;
pub mod result;
pub mod setup;

use std::path::Path;

use anyhow::Context;

/// Reads a spec file's text, naming the file in the error; a file that is not UTF-8 is a
/// usage error at its first bad byte.
/// `-` is standard input.
pub fn read_spec_text(path: &Path) -> anyhow::Result<String> {
    let bytes = if path == Path::new("-") {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
            .context("cannot read the spec from standard input")?;
        b
    } else {
        std::fs::read(path).with_context(|| format!("cannot read spec file {}", path.display()))?
    };
    obuilder_spec::decode(&path.display().to_string(), bytes)
        .map_err(|e| process::usage(e.to_string()))
}
