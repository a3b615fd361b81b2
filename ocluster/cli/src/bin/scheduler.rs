//! `ocluster-scheduler`: the original's flags and files (reference/ocluster.md §4.1).
//! Started on an OCaml scheduler's key file and state directory, it serves the same
//! `.cap` files and clients.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use clap::Parser;
use ocluster::{init_logging, metrics_http, Verbosity};
use ocluster_net::vat::{Listener, Peer, Server};
use ocluster_net::{capfile, Auth, Location, SecretKey, SturdyRef};
use ocluster_scheduler::db::Db;
use ocluster_scheduler::service::{wall_clock, Scheduler};
use ocluster_scheduler::Costs;
use sha2::{Digest, Sha256};

/// Manage build workers: accept jobs from clients and hand them to pools of workers.
#[derive(Parser, Debug)]
#[command(name = "ocluster-scheduler", version)]
struct Args {
    /// The scheduler's secret key (PKCS#8 PEM), made on first start; "" for a new key
    /// each start (every .cap file then changes).
    #[arg(long, value_name = "FILE")]
    capnp_secret_key_file: String,

    /// Where to listen: tcp:HOST:PORT (e.g. tcp:0.0.0.0:9000; port 0 picks a free one and
    /// the cap files name it) or unix:PATH.
    #[arg(long, value_name = "ADDR")]
    capnp_listen_address: Location,

    /// The address written into .cap files, as clients and workers reach this machine
    /// (default: the listen address).
    #[arg(long, value_name = "ADDR")]
    capnp_public_address: Option<Location>,

    /// Plain TCP, no TLS (cap files say `insecure`). Only on a trusted network.
    #[arg(long)]
    capnp_disable_tls: bool,

    /// Where admin.cap, pool-NAME.cap and submit-CLIENT.cap are written. Must exist.
    #[arg(long, value_name = "DIR", default_value = "./capnp-secrets")]
    secrets_dir: PathBuf,

    /// Pools to create, e.g. linux-x86_64,linux-arm64.
    #[arg(long, value_name = "POOLS", value_delimiter = ',', required = true)]
    pools: Vec<String>,

    /// Where the scheduler keeps its database (created if missing).
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,

    /// Serve Prometheus metrics over HTTP on PORT (all interfaces, as the original), or
    /// on HOST:PORT.
    #[arg(long, value_name = "PORT")]
    listen_prometheus: Option<String>,

    /// Serve the live status page (and the metrics) over HTTP on PORT (loopback) or
    /// HOST:PORT: pools, workers, queues, clients and running jobs with their logs.
    /// Loopback readers need no login; others need the token of --http-token-file.
    #[arg(long, value_name = "[HOST:]PORT")]
    listen_http: Option<String>,

    /// A file holding the token that lets non-loopback browsers read the status page
    /// (`Authorization: Bearer TOKEN` or `?token=TOKEN`).
    #[arg(long, value_name = "FILE", requires = "listen_http")]
    http_token_file: Option<PathBuf>,

    /// Runs of a job when its workers are lost: a job whose worker disconnects mid-job
    /// is queued again until it has run this many times (1: fail it at once, as the
    /// original).
    #[arg(long, value_name = "N", default_value_t = ocluster_scheduler::service::DEFAULT_MAX_ATTEMPTS)]
    max_attempts: u32,

    /// Seconds without a heartbeat after which a worker that sends them (ours; OCaml
    /// workers do not) is taken as lost: its jobs run again elsewhere, and it may
    /// register again under its name.
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    heartbeat_timeout: f64,

    /// Seconds a worker's clock may be off the scheduler's (by its heartbeats) before the
    /// worker is paused; it resumes once its clock is right.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    max_clock_skew: f64,

    /// How long a job may run, for every pool (e.g. 6h) or one (POOL=DURATION);
    /// repeatable. A job that runs longer is cancelled and fails saying so. Default 24h.
    #[arg(long, value_name = "[POOL=]DURATION")]
    job_time_limit: Vec<String>,

    /// How much log a job may write, for every pool (e.g. 100M) or one (POOL=SIZE);
    /// repeatable. A job that writes more is cancelled and fails saying so. Default 1G.
    #[arg(long, value_name = "[POOL=]SIZE")]
    job_log_limit: Vec<String>,

    /// Serve no shared pool-NAME.cap: workers register only with a capability of their
    /// own (`ocluster-admin add-worker POOL NAME`), each pinned to its name. OCaml
    /// workers can use those too.
    #[arg(long)]
    no_shared_pool_cap: bool,

    /// Keep queued jobs and clients' fair-share clocks in memory only, as the original:
    /// a restart then loses every queued job. By default they are kept in the state
    /// directory's database, and a client that submits a kept job again after a restart
    /// (as the OCurrent plugin does) gets that job rather than a second run.
    #[arg(long)]
    no_persist_queue: bool,

    /// Clients to provision: submit-NAME.cap is written for each that has none.
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    default_clients: Vec<String>,

    #[command(flatten)]
    verbosity: Verbosity,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("ocluster-scheduler: {msg}");
    std::process::exit(1)
}

/// A positive duration (`90`, `90s`, `30m`, `6h`, `1d`), as the limits want.
fn parse_duration(s: &str) -> Option<std::time::Duration> {
    obuilder_config::units::parse_duration(s)
        .ok()
        .filter(|d| !d.is_zero())
}

/// A positive size (`512`, `100K`, `100M`, `1G`).
fn parse_size(s: &str) -> Option<u64> {
    obuilder_config::units::parse_size(s)
        .ok()
        .filter(|n| *n > 0)
}

/// Applies `--job-time-limit` and `--job-log-limit` to the pools.
fn job_limits(
    args: &Args,
) -> std::collections::BTreeMap<String, ocluster_scheduler::service::JobLimits> {
    let mut limits: std::collections::BTreeMap<_, _> = args
        .pools
        .iter()
        .map(|p| (p.clone(), ocluster_scheduler::service::JobLimits::default()))
        .collect();
    let mut apply =
        |flag: &str,
         values: &[String],
         set: &dyn Fn(&mut ocluster_scheduler::service::JobLimits, &str) -> bool| {
            for v in values {
                let (pool, value) = match v.split_once('=') {
                    Some((p, x)) => (Some(p), x),
                    None => (None, v.as_str()),
                };
                for (name, l) in limits.iter_mut() {
                    if pool.is_none_or(|p| p == name) && !set(l, value) {
                        fail(format!("{flag} {v:?}: not a valid limit"));
                    }
                }
                if let Some(p) = pool {
                    if !args.pools.iter().any(|x| x == p) {
                        fail(format!("{flag} {v:?}: no pool {p:?} (--pools)"));
                    }
                }
            }
        };
    apply("--job-time-limit", &args.job_time_limit, &|l, v| {
        parse_duration(v).map(|d| l.time = d).is_some()
    });
    apply("--job-log-limit", &args.job_log_limit, &|l, v| {
        parse_size(v).map(|n| l.log_bytes = n).is_some()
    });
    limits
}

fn write_cap(dir: &Path, name: &str, uri: &SturdyRef) {
    let path = dir.join(format!("{name}.cap"));
    if let Err(e) = capfile::write(&path, uri) {
        fail(e);
    }
    tracing::info!(
        "Wrote capability reference to {:?}",
        path.display().to_string()
    );
}

fn main() {
    cli_docs::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = Args::parse();
    init_logging(&args.verbosity);
    if args.pools.iter().any(|p| p.is_empty()) {
        fail("--pools: a pool name is empty");
    }
    if !args.secrets_dir.is_dir() {
        fail(format!(
            "--secrets-dir {}: no such directory (create it first: mkdir -p {})",
            args.secrets_dir.display(),
            args.secrets_dir.display()
        ));
    }
    if let Err(e) = std::fs::create_dir_all(&args.state_dir) {
        fail(format!("--state-dir {}: {e}", args.state_dir.display()));
    }
    let key = if args.capnp_secret_key_file.is_empty() {
        SecretKey::generate_rsa()
    } else {
        let path = Path::new(&args.capnp_secret_key_file);
        if !path.exists() {
            tracing::info!("Generating new secret key to store in {path:?}");
        }
        SecretKey::load_or_create(path)
    }
    .unwrap_or_else(|e| fail(e));
    tracing::info!(
        "Key with hash sha-256@{}",
        ocluster_net::uri::b64(&key.fingerprint())
    );
    let db = Db::open(&args.state_dir).unwrap_or_else(|e| fail(e));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(e));
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = Listener::bind(&args.capnp_listen_address)
            .await
            .unwrap_or_else(|e| {
                fail(format!(
                    "cannot listen on {}: {e}",
                    args.capnp_listen_address
                ))
            });
        // Port 0 picks a free port; the cap files then name the one the system chose.
        let public = match (&args.capnp_public_address, &args.capnp_listen_address) {
            (Some(p), _) => p.clone(),
            (None, Location::Tcp { host, port: 0 }) => Location::Tcp {
                host: host.clone(),
                port: listener.local_addr().map(|a| a.port()).unwrap_or(0),
            },
            (None, l) => l.clone(),
        };
        let auth = if args.capnp_disable_tls {
            Auth::Insecure
        } else {
            Auth::Sha256(key.fingerprint())
        };
        let sturdy = {
            let (auth, public) = (auth.clone(), public.clone());
            move |id: &[u8]| SturdyRef {
                auth: auth.clone(),
                location: public.clone(),
                service_id: id.to_vec(),
            }
        };
        let make_uri = {
            let sturdy = sturdy.clone();
            Rc::new(move |id: &[u8]| sturdy(id).to_string())
        };
        let sched = Scheduler::new(
            &args.pools,
            db,
            Costs::DEFAULT,
            Rc::new(wall_clock),
            make_uri,
        )
        .unwrap_or_else(|e| fail(e));
        sched.set_max_attempts(args.max_attempts);
        if args.max_clock_skew.is_nan() || args.max_clock_skew <= 0.0 {
            fail("--max-clock-skew must be more than 0");
        }
        sched.set_max_clock_skew(std::time::Duration::from_secs_f64(args.max_clock_skew));
        sched.set_persist_jobs(!args.no_persist_queue);
        for (pool, limits) in job_limits(&args) {
            sched.set_limits(&pool, limits);
        }
        if args.heartbeat_timeout.is_nan() || args.heartbeat_timeout <= 0.0 {
            fail("--heartbeat-timeout must be more than 0");
        }
        sched.watch_heartbeats(std::time::Duration::from_secs_f64(args.heartbeat_timeout));
        sched.balance(std::time::Duration::from_secs(1));

        // Default clients.
        for name in &args.default_clients {
            let path = args.secrets_dir.join(format!("submit-{name}.cap"));
            if path.exists() {
                continue;
            }
            match sched.add_client(name) {
                Ok(id) => write_cap(&args.secrets_dir, &format!("submit-{name}"), &sturdy(&id)),
                Err(e) => tracing::warn!(
                    "cannot provision client {name:?}: {e}; its cap file {} is missing and only \
                     its hash is kept, so run `ocluster-admin remove-client {name}` and restart \
                     to issue a new one",
                    path.display()
                ),
            }
        }

        // Services by the SHA-256 of their ids.
        let admin_id = key.derived_id("admin");
        let mut fixed: std::collections::HashMap<Vec<u8>, capnp::capability::Client> =
            std::collections::HashMap::new();
        fixed.insert(Sha256::digest(admin_id).to_vec(), sched.admin().client);
        let mut pool_caps = Vec::new();
        for p in &args.pools {
            let id = key.derived_id(&format!("pool-{p}"));
            if args.no_shared_pool_cap {
                // A stale file would only mislead.
                let _ = std::fs::remove_file(args.secrets_dir.join(format!("pool-{p}.cap")));
                continue;
            }
            let reg = sched.registration(p).expect("pool exists");
            fixed.insert(Sha256::digest(id).to_vec(), reg.client);
            pool_caps.push((format!("pool-{p}"), id));
        }
        let restorer_sched = sched.clone();
        let restorer: ocluster_net::vat::Restorer = Rc::new(move |id: &[u8], peer: &Peer| {
            if let Some(c) = fixed.get(&Sha256::digest(id).to_vec()) {
                return Ok(c.clone());
            }
            if let Some(r) = restorer_sched.registration_for_id(id)? {
                return Ok(r.client);
            }
            match restorer_sched.submission_for_id(id)? {
                Some(s) => Ok(s.client),
                None => {
                    tracing::info!("{peer} asked for an unknown service id");
                    Err(capnp::Error::failed("Unknown persistent service ID".into()))
                }
            }
        });
        let tls = if args.capnp_disable_tls {
            None
        } else {
            Some(ocluster_net::tls::server_config(&key).unwrap_or_else(|e| fail(e)))
        };
        tracing::info!(
            "Waiting for {} connections on {}",
            if args.capnp_disable_tls {
                "(unencrypted)"
            } else {
                "(encrypted)"
            },
            listener
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|| args.capnp_listen_address.to_string())
        );
        write_cap(&args.secrets_dir, "admin", &sturdy(&admin_id));
        for (name, id) in &pool_caps {
            write_cap(&args.secrets_dir, name, &sturdy(id));
        }
        if let Some(spec) = &args.listen_http {
            let addr = if spec.contains(':') {
                spec.clone()
            } else {
                format!("127.0.0.1:{spec}")
            };
            let token = args.http_token_file.as_ref().map(|f| {
                let t = std::fs::read_to_string(f)
                    .unwrap_or_else(|e| fail(format!("--http-token-file {}: {e}", f.display())));
                let t = t.trim().to_string();
                if t.len() < 16 {
                    fail(format!(
                        "--http-token-file {}: the token must be at least 16 characters",
                        f.display()
                    ));
                }
                t
            });
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => {
                    let bound = l.local_addr().map(|a| a.to_string()).unwrap_or(addr);
                    tracing::info!("Status page on http://{bound}/");
                    if token.is_none() && !bound.starts_with("127.") && !bound.starts_with("[::1]")
                    {
                        tracing::warn!(
                            "--listen-http {bound}: without --http-token-file only loopback \
                             browsers may read the status page"
                        );
                    }
                    let site = metrics_http::Site {
                        status: true,
                        token,
                    };
                    tokio::task::spawn_local(metrics_http::serve_site(l, sched.clone(), site));
                }
                Err(e) => fail(format!("--listen-http {spec}: {e}")),
            }
        }
        if let Some(spec) = &args.listen_prometheus {
            let addr = if spec.contains(':') {
                spec.clone()
            } else {
                format!("0.0.0.0:{spec}")
            };
            match tokio::net::TcpListener::bind(&addr).await {
                Ok(l) => {
                    tracing::info!("Prometheus metrics on http://{addr}/metrics");
                    tokio::task::spawn_local(metrics_http::serve(l, sched.clone()));
                }
                Err(e) => fail(format!("--listen-prometheus {spec}: {e}")),
            }
        }
        // Gives back to the system what a burst of submissions took, once freed.
        tokio::task::spawn_local(ocluster::heap::trim_after_bursts(Duration::from_secs(1)));
        let server = Server { tls, restorer };
        let stop = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .unwrap_or_else(|e| fail(e));
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        tokio::select! {
            r = server.serve(listener) => {
                if let Err(e) = r {
                    fail(e);
                }
            }
            _ = stop => tracing::info!("stopping"),
        }
    });
}
