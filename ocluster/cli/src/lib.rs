//! What the `ocluster-*` programs share: logging flags, connecting with a cap file, and
//! the scheduler's metrics endpoint.

pub mod heap;
pub mod metrics_http;
pub mod status;

use std::path::Path;

use ocluster_net::{capfile, SecretKey, SturdyRef};

/// `-v`/`--verbosity` as the original's programs take them.
#[derive(clap::Args, Debug, Clone)]
pub struct Verbosity {
    /// More output (-v: info, -vv: debug).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log level: quiet, error, warning, info or debug.
    #[arg(long, value_name = "LEVEL", global = true)]
    pub verbosity: Option<String>,
    /// Colour in logs: auto, always or never (accepted for compatibility).
    #[arg(long, value_name = "WHEN", global = true)]
    pub color: Option<String>,
}

pub fn init_logging(v: &Verbosity) {
    let level = match v.verbosity.as_deref() {
        Some("quiet") => "off",
        Some("error") => "error",
        Some("warning") => "warn",
        Some("info") => "info",
        Some("debug") => "debug",
        _ => match v.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        },
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OCLUSTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Reads a cap file, or says clearly why not.
pub fn load_cap(path: &Path) -> Result<SturdyRef, String> {
    capfile::read(path).map_err(|e| e.to_string())
}

/// Connects to the service of a cap file, printing `Connecting to ADDR... OK` on stderr
/// as the original does. Must run on a `LocalSet`.
pub async fn connect(sr: &SturdyRef) -> Result<ocluster_net::vat::Connected, String> {
    use std::io::Write;
    eprint!("Connecting to {}... ", sr.location);
    let _ = std::io::stderr().flush();
    let key = SecretKey::generate_ephemeral().map_err(|e| e.to_string())?;
    match ocluster_net::vat::connect(sr, &key).await {
        Ok(c) => {
            eprintln!("OK");
            Ok(c)
        }
        Err(e) => {
            eprintln!("ERROR");
            Err(e.to_string())
        }
    }
}

/// A capnp error as a person reads it: the remote message without the protocol's
/// framing.
pub fn error_text(e: &capnp::Error) -> String {
    let s = e.extra.trim();
    let s = s.strip_prefix("remote exception: ").unwrap_or(s);
    s.to_string()
}
