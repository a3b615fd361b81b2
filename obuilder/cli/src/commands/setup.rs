//! The flags the store-using subcommands share, and their conversion into the library's
//! [`BuilderConfig`]: clap stays here, the config is plain data.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use obuilder_config::{BuilderConfig, StoreSpec};
use obuilder_engine::log::{LogEvent, LogSink};
use obuilder_engine::BuilderOptions;
use obuilder_fetch::registry::{Progress, ProgressSink, RegistryOptions};
use obuilder_fetch::{FetchConfig, PullPolicy};
use obuilder_stores::detect_default;
use obuilder_stores::rsync::RsyncMode;

use super::process::usage;

/// Where results live.
pub const DEFAULT_STORE_DIR: &str = "/var/lib/obuilder";

fn parse_pull(s: &str) -> Result<PullPolicy, String> {
    s.parse()
        .map_err(|e: obuilder_fetch::UnknownPullPolicy| e.to_string())
}

/// `linux` or `windows`, listed in `--help` and completions.
pub fn docker_platform(
) -> impl clap::builder::TypedValueParser<Value = obuilder_stores::docker::Platform> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["linux", "windows"])
        .map(|s| s.parse().unwrap_or_default())
}

fn parse_rsync_mode(s: &str) -> Result<RsyncMode, String> {
    s.parse()
        .map_err(|e: obuilder_stores::rsync::UnknownRsyncMode| e.to_string())
}

pub use obuilder_cli::sandbox_args::SandboxArgs;
pub use obuilder_config::units::{parse_duration, parse_size};

#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// Where and how to keep results: btrfs:/PATH, overlayfs:/PATH, rsync:/PATH, xfs:/PATH,
    /// zfs:POOL (mounted at /POOL) or zfs:/PREFIX/POOL.
    /// Default: /var/lib/obuilder with the best backend its filesystem supports.
    #[arg(long, value_name = "STORE", env = "OBUILDER_STORE")]
    pub store: Option<String>,
    /// For a new rsync store: copy, hardlink or hardlink_unsafe (an existing one
    /// remembers its mode).
    #[arg(long, value_name = "MODE", value_parser = parse_rsync_mode, env = "OBUILDER_RSYNC_MODE")]
    pub rsync_mode: Option<RsyncMode>,
    /// For a docker: store: the Docker-compatible CLI to run (docker, podman, a path).
    #[arg(long, value_name = "PROGRAM", env = "OBUILDER_DOCKER_CLI")]
    pub docker_cli: Option<String>,
    /// For a docker: store: the engine's containers, linux (default) or windows (an
    /// engine of Windows containers, e.g. reached through DOCKER_HOST: base images are
    /// pulled by the engine, copies use Cygwin's tar in servercore containers).
    #[arg(long, value_name = "PLATFORM", env = "OBUILDER_DOCKER_PLATFORM", value_parser = docker_platform())]
    pub docker_platform: Option<obuilder_stores::docker::Platform>,
    /// For a docker: store: base images are pulled by the engine (its registries,
    /// mirrors and credentials) instead of obuilder's own fetcher; always so with
    /// --docker-platform windows.
    #[arg(long, env = "OBUILDER_DOCKER_PULL")]
    pub docker_pull: bool,
}

impl StoreArgs {
    pub fn spec(&self) -> anyhow::Result<StoreSpec> {
        match &self.store {
            Some(s) => {
                let spec =
                    StoreSpec::parse(s, self.rsync_mode).map_err(|e| usage(e.to_string()))?;
                match spec {
                    StoreSpec::Docker {
                        root,
                        cli,
                        platform,
                        pull,
                    } => Ok(StoreSpec::Docker {
                        root,
                        cli: self.docker_cli.clone().unwrap_or(cli),
                        platform: self.docker_platform.unwrap_or(platform),
                        pull: pull || self.docker_pull,
                    }),
                    _ if self.docker_cli.is_some() => {
                        Err(usage("--docker-cli needs --store docker:/PATH"))
                    }
                    _ if self.docker_platform.is_some() => {
                        Err(usage("--docker-platform needs --store docker:/PATH"))
                    }
                    _ if self.docker_pull => Err(usage("--docker-pull needs --store docker:/PATH")),
                    spec => Ok(spec),
                }
            }
            None if self.docker_cli.is_some() => {
                Err(usage("--docker-cli needs --store docker:/PATH"))
            }
            None if self.docker_platform.is_some() => {
                Err(usage("--docker-platform needs --store docker:/PATH"))
            }
            None if self.docker_pull => Err(usage("--docker-pull needs --store docker:/PATH")),
            None if self.rsync_mode.is_some() => {
                Err(usage("--rsync-mode needs --store rsync:/PATH"))
            }
            None => Ok(detect_default(&PathBuf::from(DEFAULT_STORE_DIR))),
        }
    }

    /// A config with only the store set (for commands that open no sandbox).
    pub fn config(&self) -> anyhow::Result<BuilderConfig> {
        Ok(BuilderConfig::new(self.spec()?))
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct LogArgs {
    /// The most each step's stored log keeps (its start and its end; the middle is cut).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "10M")]
    pub max_log_size: u64,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RegistryArgs {
    /// When to ask registries about `(from REF)`: `missing` (only for references never seen;
    /// a tag seen before reuses its recorded digest and works offline), `always` (re-resolve
    /// tags), `never` (local images only).
    #[arg(long, value_name = "POLICY", default_value = "missing", value_parser = parse_pull)]
    pub pull: PullPolicy,
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
    pub fn fetch(&self) -> anyhow::Result<FetchConfig> {
        let mut opts = RegistryOptions {
            insecure: self.insecure.clone(),
            ..RegistryOptions::default()
        };
        if let Some(p) = &self.platform {
            if !p.contains('/') {
                return Err(usage(format!(
                    "--platform {p:?}: expected OS/ARCH, e.g. linux/amd64"
                )));
            }
            opts.platform = p.clone();
        }
        Ok(FetchConfig {
            pull: self.pull,
            registry: Some(opts),
            progress: Some(progress_bars()),
        })
    }
}

/// The full config of a command that builds.
pub fn builder_config(
    store: &StoreArgs,
    sandbox: &SandboxArgs,
    registry: Option<&RegistryArgs>,
    log: Option<&LogArgs>,
) -> anyhow::Result<BuilderConfig> {
    let mut c = store.config()?;
    let mut sandbox = sandbox.clone();
    if sandbox.sandbox.is_none() && matches!(c.store, StoreSpec::Docker { .. }) {
        sandbox.sandbox = Some("docker".into());
    }
    c.sandbox = Some(sandbox.spec().map_err(usage)?);
    c.fetch = match registry {
        Some(r) => r.fetch()?,
        None => FetchConfig::local(),
    };
    if let Some(l) = log {
        c.options = BuilderOptions {
            max_log_bytes: l.max_log_size.max(2),
        };
    }
    Ok(c)
}

/// Opens a builder from the config, with the store named in the error.
pub async fn open(config: &BuilderConfig) -> anyhow::Result<Arc<obuilder_engine::Builder>> {
    obuilder_engine::exec::use_build_umask();
    Ok(Arc::new(config.open().await?))
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
        "{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
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
                // (A finished bar goes: the log says the layer is done, and bars left
                // behind are redrawn as stale copies when the log scrolls.)
                if let Some(b) = bars.remove(digest) {
                    b.finish_and_clear();
                }
            }
            Progress::Cached { .. } => {}
        }
    })
}

/// How `build` shows its progress (`--progress`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgressMode {
    /// `tty` when standard output is a terminal, else `plain`.
    #[default]
    Auto,
    /// OBuilder's log, as is (what CI logs and scripts that parse them expect).
    Plain,
    /// The log with a step counter on each step's heading (`[3/7]`) and the time each
    /// step took on its `saved as` line.
    Tty,
    /// One JSON object per line: heading, note, output, step (started, done with
    /// `cached` and `secs`, failed with `status`), then result or error.
    Json,
}

impl ProgressMode {
    pub fn resolve(self) -> ProgressMode {
        match self {
            ProgressMode::Auto if std::io::stdout().is_terminal() => ProgressMode::Tty,
            ProgressMode::Auto => ProgressMode::Plain,
            m => m,
        }
    }
}

/// What a build did, for its closing summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct BuildStats {
    pub steps: usize,
    pub cached: usize,
}

/// Prints the build log like OBuilder: headings in bold blue, notes in yellow (on a
/// terminal), command output as it comes. A note that follows output without a final
/// newline starts on a line of its own. In `tty` mode, step headings get their number and
/// `saved as` lines the step's time. In `json` mode, every event is a JSON line. A closed
/// stdout cancels the build (see `process`).
pub fn console_sink(
    color: bool,
    mode: ProgressMode,
) -> (LogSink, Arc<std::sync::Mutex<BuildStats>>) {
    use obuilder_engine::log::StepEvent;
    let stats: Arc<std::sync::Mutex<BuildStats>> = Default::default();
    let counted = stats.clone();
    let count = move |e: &LogEvent| {
        if let LogEvent::Step(StepEvent::Done { cached, .. }) = e {
            let mut s = counted.lock().unwrap_or_else(|p| p.into_inner());
            s.steps += 1;
            s.cached += usize::from(*cached);
        }
    };
    if mode == ProgressMode::Json {
        let sink: LogSink = Arc::new(move |e: &LogEvent| {
            count(e);
            if let Ok(line) = serde_json::to_string(e) {
                let _ = super::process::out(format_args!("{line}\n"));
            }
        });
        return (sink, stats);
    }
    let counters = mode == ProgressMode::Tty;
    struct State {
        mid_line: bool,
        /// `[3/7] ` for the next heading.
        prefix: Option<String>,
        /// A `saved as` note held until the step's time is known.
        held: Option<String>,
    }
    let state = std::sync::Mutex::new(State {
        mid_line: false,
        prefix: None,
        held: None,
    });
    let paint = move |s: &str, code: &str| {
        if color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    };
    let sink: LogSink = Arc::new(move |e: &LogEvent| {
        count(e);
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let mut text = String::new();
        if let Some(h) = st.held.take() {
            if let LogEvent::Step(StepEvent::Done { secs, .. }) = e {
                text.push_str(&paint(&format!("{h} ({secs:.1}s)"), "33"));
                text.push('\n');
                let _ = super::process::out(format_args!("{text}"));
                return;
            }
            text.push_str(&paint(&h, "33"));
            text.push('\n');
        }
        let nl = if std::mem::take(&mut st.mid_line) {
            "\n"
        } else {
            ""
        };
        match e {
            LogEvent::Step(StepEvent::Started { index, total, .. }) if counters => {
                st.prefix = Some(format!("[{index}/{total}] "));
            }
            LogEvent::Step(_) => {}
            LogEvent::Heading(h) => {
                let prefix = st.prefix.take().unwrap_or_default();
                text.push_str(&format!("{nl}{}\n", paint(&format!("{prefix}{h}"), "1;34")));
            }
            LogEvent::Note(n) if counters && n.starts_with("---> saved as") => {
                text.push_str(nl);
                st.held = Some(n.clone());
            }
            LogEvent::Note(n) => text.push_str(&format!("{nl}{}\n", paint(n, "33"))),
            LogEvent::Output(b) => {
                if !b.is_empty() {
                    st.mid_line = !b.ends_with(b"\n");
                }
                text.push_str(nl);
                text.push_str(&String::from_utf8_lossy(b));
            }
        }
        if !text.is_empty() {
            let _ = super::process::out(format_args!("{text}"));
        }
    });
    (sink, stats)
}

/// `--format` for listing commands.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct FormatArgs {
    /// `text` (a table) or `json` (for scripts).
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = Format::Text)]
    pub format: Format,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Text,
    Json,
}

impl FormatArgs {
    pub fn json(&self) -> bool {
        self.format == Format::Json
    }
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
