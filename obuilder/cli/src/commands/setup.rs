//! What the store-using subcommands share: `--store` and sandbox flags, and opening a
//! builder over them.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use obuilder_engine::exec::RealExec;
use obuilder_engine::log::{LogEvent, LogSink};
use obuilder_engine::Builder;
use obuilder_fetch::images::ImageStore;
use obuilder_fetch::LocalFetcher;
use obuilder_sandbox::{RuncOptions, RuncSandbox};
use obuilder_stores::rsync::RsyncMode;
use obuilder_stores::{detect_default, StoreSpec};

/// Where results live.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/obuilder";

#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// Where and how to keep results: btrfs:/PATH, overlayfs:/PATH, rsync:/PATH, xfs:/PATH.
    /// Default: /var/lib/obuilder with the best backend its filesystem supports.
    #[arg(long, value_name = "STORE", env = "OBUILDER_STORE")]
    pub store: Option<String>,
    /// With an rsync store: copy, hardlink or hardlink_unsafe.
    #[arg(long, value_name = "MODE", value_parser = ["copy", "hardlink", "hardlink_unsafe"])]
    pub rsync_mode: Option<String>,
}

#[derive(clap::Args, Clone, Debug)]
pub struct SandboxArgs {
    /// Make sync syscalls (fsync, sync, …) no-ops inside the sandbox: much faster on btrfs;
    /// the snapshot commit is what makes results durable.
    #[arg(long)]
    pub fast_sync: bool,
    /// The runc binary to use.
    #[arg(long, value_name = "PATH", default_value = "runc")]
    pub runc: String,
}

impl StoreArgs {
    pub fn spec(&self) -> anyhow::Result<StoreSpec> {
        let mode = self
            .rsync_mode
            .as_deref()
            .map(str::parse::<RsyncMode>)
            .transpose()
            .map_err(anyhow::Error::msg)?;
        match &self.store {
            Some(s) => StoreSpec::parse(s, mode).map_err(anyhow::Error::msg),
            None if mode.is_some() => anyhow::bail!("--rsync-mode needs --store rsync:/PATH"),
            None => Ok(detect_default(&PathBuf::from(DEFAULT_STORE_DIR))),
        }
    }

    /// The state dir of the store, without opening it (for image commands).
    pub fn state_dir(&self) -> anyhow::Result<PathBuf> {
        Ok(self.spec()?.path().join("state"))
    }
}

pub fn images(store: &StoreArgs) -> anyhow::Result<ImageStore> {
    Ok(ImageStore::new(&store.state_dir()?))
}

/// Opens the store (recovering it), the runc sandbox and the local fetcher.
pub async fn builder(store: &StoreArgs, sandbox: &SandboxArgs) -> anyhow::Result<Arc<Builder>> {
    let spec = store.spec()?;
    let exec = RealExec::shared();
    let st = spec.open(exec.clone());
    std::fs::create_dir_all(spec.path())
        .with_context(|| format!("cannot create store directory {}", spec.path().display()))?;
    let state = st.state_dir();
    let sb = RuncSandbox::new(
        &state,
        RuncOptions {
            fast_sync: sandbox.fast_sync,
            runc: sandbox.runc.clone(),
        },
        exec,
    );
    let fetcher = LocalFetcher::new(ImageStore::new(&state));
    let b = Builder::new(st, Arc::new(sb), Arc::new(fetcher))
        .await
        .with_context(|| format!("cannot open store {spec}"))?;
    Ok(Arc::new(b))
}

/// Prints the build log like OBuilder: headings in bold blue, notes in yellow (on a
/// terminal), command output as it comes.
pub fn console_sink(color: bool) -> LogSink {
    Arc::new(move |e: &LogEvent| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = match e {
            LogEvent::Heading(h) if color => writeln!(out, "\x1b[1;34m{h}\x1b[0m"),
            LogEvent::Note(n) if color => writeln!(out, "\x1b[33m{n}\x1b[0m"),
            LogEvent::Heading(s) | LogEvent::Note(s) => writeln!(out, "{s}"),
            LogEvent::Output(b) => out.write_all(b),
        };
        let _ = out.flush();
    })
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum Color {
    #[default]
    Auto,
    Always,
    Never,
}

impl Color {
    pub fn enabled(self) -> bool {
        match self {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        }
    }
}
