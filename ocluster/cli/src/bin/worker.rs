//! `ocluster-worker`: takes jobs from a scheduler's pool and runs them in this process
//! with the obuilder engine (reference/ocluster.md §3).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use obuilder_config::{BuilderConfig, StoreSpec};
use ocluster::{init_logging, load_cap, Verbosity};
use ocluster_worker::{Exit, Stop, WorkerConfig, EXIT_UPDATE};

/// Run builds for an OCluster scheduler.
///
/// Stopping: SIGTERM drains the worker: it takes no more jobs and exits once the running
/// ones have finished (at most --drain-timeout seconds). A second SIGTERM, SIGINT or the
/// end of the timeout abort the running jobs: their containers are killed and the
/// scheduler runs them again elsewhere (ours, per its --max-attempts; an OCaml scheduler
/// fails them).
///
/// Exit status: 0 after a stop, 1 after `ocluster-admin update` has drained it (the
/// service manager starts the new binary), 2 for bad flags, a bad cap file or a store or
/// sandbox that cannot be used (restarting will not help), 3 when the healthcheck fails
/// at start-up (it may pass later).
#[derive(Parser, Debug)]
#[command(name = "ocluster-worker", version)]
struct Args {
    /// The pool's cap file (pool-NAME.cap, from the scheduler's --secrets-dir).
    #[arg(short = 'c', long = "connect", value_name = "FILE")]
    connect: PathBuf,
    /// This worker's name, unique in its pool.
    #[arg(long, value_name = "ID")]
    name: String,
    /// Jobs at once.
    #[arg(long, value_name = "N", default_value_t = 10)]
    capacity: u32,
    /// Where Git mirrors and temporary build contexts are kept.
    #[arg(long, value_name = "PATH")]
    state_dir: PathBuf,
    /// The obuilder store: btrfs:/PATH, xfs:/PATH, overlayfs:/PATH, rsync:/PATH, zfs:POOL or
    /// zfs:/PREFIX/POOL.
    #[arg(long, value_name = "STORE")]
    obuilder_store: String,
    /// For a new rsync store: copy, hardlink or hardlink_unsafe.
    #[arg(long, value_name = "MODE")]
    rsync_mode: Option<obuilder_stores::rsync::RsyncMode>,
    /// The sandbox and its flags, as `obuilder build` takes them.
    #[command(flatten)]
    sandbox: obuilder_cli::sandbox_args::SandboxArgs,
    /// Prune the store while its free space is below this percentage.
    #[arg(long, value_name = "PCT", default_value_t = 30.0)]
    obuilder_prune_threshold: f64,
    /// Results deleted per prune round.
    #[arg(long, value_name = "N", default_value_t = 100)]
    obuilder_prune_limit: usize,
    /// Seconds between healthchecks (0: none; the worker still checks at start-up unless 0).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    obuilder_healthcheck: u64,
    /// The static busybox the healthcheck builds its image from.
    #[arg(long, value_name = "PATH", default_value = "/bin/busybox")]
    obuilder_healthcheck_busybox: PathBuf,
    /// An image the healthcheck builds on instead of busybox (default with
    /// --obuilder-docker-platform windows: mcr.microsoft.com/windows/servercore:ltsc2022).
    #[arg(long, value_name = "IMAGE")]
    obuilder_healthcheck_image: Option<String>,
    /// With a docker: store: the engine's containers, linux (default) or windows (an
    /// engine of Windows containers, e.g. a Windows host's reached through DOCKER_HOST).
    #[arg(long, value_name = "PLATFORM")]
    obuilder_docker_platform: Option<obuilder_stores::docker::Platform>,
    /// Seconds between heartbeats to the scheduler (ours takes a worker that stops
    /// sending them as lost; an OCaml scheduler takes none, and gets none).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    heartbeat_interval: f64,
    /// Extra metrics to relay: NAME:URI (http://…), repeatable or comma-separated.
    #[arg(long, value_name = "NAME:URI", value_delimiter = ',')]
    additional_metrics: Vec<String>,
    /// Run Dockerfile jobs with this Docker-compatible CLI: docker, buildah or podman
    /// (default: Dockerfile jobs are refused).
    #[arg(long, value_name = "PROGRAM")]
    docker_cli: Option<String>,
    /// A registry (HOST:PORT) that Dockerfile jobs reach over plain HTTP, repeatable
    /// (buildah and podman; a docker daemon has its own setting).
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',')]
    insecure_registry: Vec<String>,
    /// Repositories a Dockerfile job may push to (e.g. registry:5000/org/app); a push
    /// anywhere else fails the job.
    #[arg(long, value_name = "REPO", value_delimiter = ',')]
    allow_push: Vec<String>,
    /// Docker pruning (accepted for compatibility; no effect on an OBuilder worker).
    #[arg(long, value_name = "PCT")]
    prune_threshold: Option<f64>,
    /// Docker pruning (accepted for compatibility; no effect on an OBuilder worker).
    #[arg(long, value_name = "GB")]
    docker_max_df_size: Option<f64>,
    /// Seconds a SIGTERM waits for running jobs before aborting them (0: abort at once).
    /// Keep it below the service manager's stop timeout (systemd's TimeoutStopSec).
    #[arg(long, value_name = "SECS", default_value_t = 3000)]
    drain_timeout: u64,
    #[command(flatten)]
    verbosity: Verbosity,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("ocluster-worker: {msg}");
    std::process::exit(2)
}

fn main() {
    obuilder_engine::exec::seal_inherited_descriptors();
    obuilder_engine::exec::use_build_umask();
    cli_docs::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = Args::parse();
    init_logging(&args.verbosity);
    let pool = load_cap(&args.connect).unwrap_or_else(|e| fail(e));
    let mut store = StoreSpec::parse(&args.obuilder_store, args.rsync_mode)
        .unwrap_or_else(|e| fail(format!("--obuilder-store: {e}")));
    if let Some(p) = args.obuilder_docker_platform {
        match &mut store {
            StoreSpec::Docker { platform, .. } => *platform = p,
            _ => fail("--obuilder-docker-platform needs --obuilder-store docker:/PATH"),
        }
    }
    let mut sandbox_args = args.sandbox.clone();
    if sandbox_args.sandbox.is_none() && matches!(store, StoreSpec::Docker { .. }) {
        // A docker: store's steps run in its engine (Windows workers).
        sandbox_args.sandbox = Some("docker".into());
    }
    let sandbox = sandbox_args.spec().unwrap_or_else(|e| fail(e));
    let mut builder = BuilderConfig::new(store);
    builder.sandbox = Some(sandbox);
    let mut config = WorkerConfig::new(&args.name, args.state_dir.clone(), builder);
    config.capacity = args.capacity.max(1);
    config.prune_threshold = args.obuilder_prune_threshold;
    config.prune_limit = args.obuilder_prune_limit;
    config.healthcheck_period = Duration::from_secs(args.obuilder_healthcheck);
    config.busybox = args.obuilder_healthcheck_busybox.clone();
    config.healthcheck_image = args.obuilder_healthcheck_image.clone();
    if args.heartbeat_interval.is_nan() || args.heartbeat_interval <= 0.0 {
        fail("--heartbeat-interval must be more than 0");
    }
    config.heartbeat = Duration::from_secs_f64(args.heartbeat_interval);
    for m in &args.additional_metrics {
        let Some((name, uri)) = m.split_once(':') else {
            fail(format!("--additional-metrics {m:?}: expected NAME:URI"))
        };
        if config.additional_metrics.iter().any(|(n, _)| n == name) {
            fail(format!("--additional-metrics: {name:?} is given twice"));
        }
        config
            .additional_metrics
            .push((name.to_string(), uri.to_string()));
    }
    config.docker = args
        .docker_cli
        .clone()
        .map(|program| ocluster_worker::docker::DockerCli {
            program,
            insecure: args.insecure_registry.clone(),
        });
    config.allow_push = args.allow_push.clone();
    if args.prune_threshold.is_some() || args.docker_max_df_size.is_some() {
        tracing::warn!(
            "--prune-threshold and --docker-max-df-size are accepted for compatibility; \
             Docker's own storage is not pruned by this worker"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(e));
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&rt, async move {
        let stop = Stop::default();
        tokio::task::spawn_local(signals(
            stop.clone(),
            Duration::from_secs(args.drain_timeout),
        ));
        match ocluster_worker::run(config, pool, stop).await {
            Ok(Exit::Update) => EXIT_UPDATE,
            Ok(Exit::Stopped | Exit::Drained) => 0,
            // A failed healthcheck may pass later: let the service manager try again.
            Err(e @ ocluster_worker::WorkerError::Unhealthy(_)) => {
                eprintln!("ocluster-worker: {e}");
                3
            }
            Err(e) => {
                eprintln!("ocluster-worker: {e}");
                2
            }
        }
    });
    // Let cancelled builds kill their containers.
    drop(local);
    rt.shutdown_timeout(Duration::from_secs(10));
    std::process::exit(code)
}

/// SIGTERM drains, then aborts after `timeout` or at the next SIGTERM; SIGINT aborts.
async fn signals(stop: Stop, timeout: Duration) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    let abort = |why: &str| {
        tracing::info!("stopping: {why}: aborting the running jobs");
        stop.abort.cancel();
    };
    tokio::select! {
        _ = int.recv() => return abort("SIGINT"),
        _ = term.recv() => {}
    }
    if timeout.is_zero() {
        return abort("SIGTERM");
    }
    stop.drain.cancel();
    tokio::select! {
        _ = int.recv() => abort("SIGINT"),
        _ = term.recv() => abort("second SIGTERM"),
        _ = tokio::time::sleep(timeout) => abort("--drain-timeout reached"),
    }
}
