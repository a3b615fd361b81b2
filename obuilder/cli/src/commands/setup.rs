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
use obuilder_fetch::registry::{Progress, ProgressSink, Registry, RegistryOptions};
use obuilder_fetch::{ImageFetcher, PullPolicy};
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

#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// When to ask registries about `(from REF)`: `missing` (only for references never seen;
    /// a tag seen before reuses its recorded digest and works offline), `always` (re-resolve
    /// tags), `never` (local images only).
    #[arg(long, value_name = "POLICY", default_value = "missing", value_parser = ["missing", "always", "never"])]
    pub pull: String,
    /// A registry (`HOST` or `HOST:PORT`) to reach over plain HTTP. Repeatable. Registries on
    /// loopback always may.
    #[arg(
        long = "insecure-registry",
        value_name = "HOST[:PORT]",
        env = "OBUILDER_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure: Vec<String>,
    /// The platform to take from multi-platform images (default: this machine's).
    #[arg(long, value_name = "OS/ARCH")]
    pub platform: Option<String>,
}

impl RegistryArgs {
    pub fn registry(&self) -> anyhow::Result<Arc<Registry>> {
        let mut opts = RegistryOptions {
            insecure: self.insecure.clone(),
            ..RegistryOptions::default()
        };
        if let Some(p) = &self.platform {
            anyhow::ensure!(
                p.contains('/'),
                "--platform {p:?}: expected OS/ARCH, e.g. linux/amd64"
            );
            opts.platform = p.clone();
        }
        Ok(Arc::new(Registry::new(opts).map_err(anyhow::Error::msg)?))
    }

    pub fn fetcher(&self, images: ImageStore) -> anyhow::Result<ImageFetcher> {
        let policy: PullPolicy = self.pull.parse().map_err(anyhow::Error::msg)?;
        Ok(ImageFetcher::with_registry(
            images,
            self.registry()?,
            policy,
            progress_bars(),
        ))
    }
}

/// Download progress: a bar per layer (bytes, rate) on a terminal; nothing extra otherwise
/// (the build log already says when each layer starts and ends).
pub fn progress_bars() -> ProgressSink {
    if !std::io::stderr().is_terminal() {
        return Arc::new(|_| {});
    }
    let multi = indicatif::MultiProgress::new();
    let bars: std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>> =
        Default::default();
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    Arc::new(move |p: &Progress| {
        let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
        match p {
            Progress::Start { digest, size } => {
                let b = multi.add(indicatif::ProgressBar::new(*size));
                b.set_style(style.clone());
                b.set_prefix(digest.chars().take(19).collect::<String>());
                bars.insert(digest.clone(), b);
            }
            Progress::Advance { digest, bytes } => {
                if let Some(b) = bars.get(digest) {
                    b.inc(*bytes);
                }
            }
            Progress::Done { digest } => {
                if let Some(b) = bars.remove(digest) {
                    b.finish();
                }
            }
            Progress::Cached { .. } => {}
        }
    })
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

/// Opens the store (recovering it), the runc sandbox and the image fetcher (local images
/// only unless registry flags are given).
pub async fn builder(store: &StoreArgs, sandbox: &SandboxArgs) -> anyhow::Result<Arc<Builder>> {
    builder_with(store, sandbox, None).await
}

pub async fn builder_with(
    store: &StoreArgs,
    sandbox: &SandboxArgs,
    registry: Option<&RegistryArgs>,
) -> anyhow::Result<Arc<Builder>> {
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
    let fetcher = match registry {
        Some(r) => r.fetcher(ImageStore::new(&state))?,
        None => ImageFetcher::new(ImageStore::new(&state)),
    };
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
