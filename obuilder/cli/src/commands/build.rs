//! `obuilder build -f SPEC CONTEXT_DIR`: run a spec, printing its log live.

use std::path::PathBuf;
use std::process::ExitCode;

use obuilder_engine::{BuildError, BuildOptions, FailureKind};
use obuilder_spec::Spec;

use super::process::{exit, interrupt, interrupted_code, usage};
use super::setup::{
    builder_config, console_sink, open, parse_duration, BuildStats, Color, LogArgs, ProgressMode,
    RegistryArgs, SandboxArgs, StoreArgs,
};

#[derive(clap::Args)]
pub struct Args {
    /// The spec file to build (`-`: standard input).
    #[arg(short = 'f', long = "file", value_name = "SPEC")]
    pub(crate) file: PathBuf,
    /// The context directory `copy` reads from.
    #[arg(value_name = "CONTEXT_DIR")]
    pub(crate) context: PathBuf,
    /// A secret for `(run (secrets (ID …)))`: the whole of FILE is its value. Repeatable.
    /// Secret values are masked as *** in the build log.
    #[arg(long = "secret", value_name = "ID:FILE")]
    pub(crate) secrets: Vec<String>,
    /// Stop a `run` step that takes longer than this (e.g. 30m, 2h); no limit by default.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) step_timeout: Option<std::time::Duration>,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    #[command(flatten)]
    pub(crate) sandbox: SandboxArgs,
    #[command(flatten)]
    pub(crate) registry: RegistryArgs,
    #[command(flatten)]
    pub(crate) log: LogArgs,
    /// Name the result, so that a spec can say `(from NAME)` and `run`, `export`, `push`
    /// take it; the name keeps the env, workdir and user the spec ended with. Repeatable.
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub(crate) tags: Vec<String>,
    /// If a step fails, keep its tree (as a result of its own, replaced by the next
    /// failure of the same step) and say how to enter it with `obuilder shell`.
    #[arg(long)]
    pub(crate) keep_failed: bool,
    /// Write the result's id to FILE.
    #[arg(long, value_name = "FILE")]
    pub(crate) iidfile: Option<PathBuf>,
    /// Print only the result's id on standard output (the log is not shown; errors still
    /// go to standard error).
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// How to show progress: auto (tty on a terminal, else plain), plain (OBuilder's log
    /// as is), tty (plus step counters and times), json (one event per line).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = ProgressMode::Auto)]
    pub(crate) progress: ProgressMode,
    /// Colour headings and notes.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub(crate) color: Color,
}

/// The exit code for a failed build (see `process`).
pub fn failure_code(e: &BuildError) -> u8 {
    match e.kind() {
        FailureKind::Spec => exit::USAGE,
        _ if e.is_step_failure() => exit::STEP_FAILED,
        _ => exit::FAILED,
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let text = super::read_spec_text(&args.file)?;
    let name = if args.file.as_os_str() == "-" {
        "<stdin>".to_string()
    } else {
        args.file.display().to_string()
    };
    let spec = match Spec::parse_named(&name, &text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(exit::USAGE));
        }
    };
    let mut secrets = Vec::new();
    for s in &args.secrets {
        let (id, file) = s
            .split_once(':')
            .ok_or_else(|| usage(format!("--secret {s:?}: expected ID:FILE")))?;
        let value = std::fs::read(file)
            .map_err(|e| usage(format!("--secret {id}: cannot read {file}: {e}")))?;
        secrets.push((id.to_string(), value));
    }
    for t in &args.tags {
        super::result::check_tag(t)?;
    }
    if !args.context.is_dir() {
        return Err(usage(format!(
            "context directory {} does not exist or is not a directory",
            args.context.display()
        )));
    }
    let config = builder_config(
        &args.store,
        &args.sandbox,
        Some(&args.registry),
        Some(&args.log),
    )?;
    let builder = open(&config).await?;
    let mode = args.progress.resolve();
    let json = mode == ProgressMode::Json && !args.quiet;
    let (sink, stats) = if args.quiet {
        // Quiet, but where a failed step was kept is still said (on stderr).
        let sink: obuilder_engine::log::LogSink =
            std::sync::Arc::new(|e: &obuilder_engine::log::LogEvent| {
                if let obuilder_engine::log::LogEvent::Note(n) = e {
                    if n.starts_with("---> kept") {
                        eprintln!("{n}");
                    }
                }
            });
        (sink, Default::default())
    } else {
        console_sink(args.color.enabled(), mode)
    };
    let started = std::time::Instant::now();
    let summary = |stats: &std::sync::Mutex<BuildStats>| {
        let s = *stats.lock().unwrap_or_else(|p| p.into_inner());
        (s, started.elapsed().as_secs_f64())
    };
    let mut opts = BuildOptions::new(&args.context, sink);
    opts.secrets = secrets;
    opts.step_timeout = args.step_timeout;
    opts.keep_failed = args.keep_failed;
    // A signal or a closed stdout cancels the build.
    opts.cancel = interrupt().child_token();
    let result = builder.build_with_config(&spec, &opts).await;
    // Let cancelled steps kill their containers and discard their snapshots.
    builder.wait_idle().await;
    match result {
        Ok((id, end)) => {
            let images = config.images();
            if let Err(e) = super::result::record_end(&images, &id, &end) {
                tracing::warn!("cannot record the context {id} ended in: {e}");
            }
            for t in &args.tags {
                super::result::tag(&images, t, &id, end.clone())?;
            }
            if let Some(f) = &args.iidfile {
                super::result::write_iidfile(f, &id)?;
            }
            let (s, secs) = summary(&stats);
            if args.quiet {
                crate::outln!("{id}")?;
            } else if json {
                let v = serde_json::json!({
                    "event": "result", "id": id, "tags": args.tags,
                    "steps": s.steps, "cached": s.cached, "secs": secs,
                });
                crate::outln!("{v}")?;
            } else {
                // One write (stderr is unbuffered: `eprintln!` writes each piece).
                let line = format!(
                    "Built in {secs:.1}s: {} step{}, {} from the cache\n",
                    s.steps,
                    if s.steps == 1 { "" } else { "s" },
                    s.cached
                );
                eprint!("{line}");
                crate::outln!("Got: {id:?}")?;
                for t in &args.tags {
                    crate::outln!("Tagged {t}")?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(BuildError::Cancelled) => {
            if json {
                let v = serde_json::json!({"event": "cancelled"});
                let _ = crate::outln!("{v}");
            }
            eprintln!("Cancelled at user's request");
            Ok(interrupted_code().unwrap_or(ExitCode::from(exit::signal(2))))
        }
        Err(e) => {
            match e.step() {
                Some(step) => eprintln!(
                    "Build step failed: {e}\n  in step {}/{}: {}",
                    step.index, step.total, step.heading
                ),
                None => eprintln!("Build failed: {e}"),
            }
            let mut cause = std::error::Error::source(&e).and_then(std::error::Error::source);
            while let Some(c) = cause {
                eprintln!("  caused by: {c}");
                cause = c.source();
            }
            if json {
                let v = serde_json::json!({
                    "event": "error", "message": e.to_string(), "exit": failure_code(&e),
                    "step": e.step().map(|s| s.index),
                });
                let _ = crate::outln!("{v}");
            }
            Ok(ExitCode::from(failure_code(&e)))
        }
    }
}
