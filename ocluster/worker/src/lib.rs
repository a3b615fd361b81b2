//! OCluster's worker as a library (reference/ocluster.md §3): it dials out to a
//! scheduler's pool, registers, and keeps one `pop` outstanding per free slot. Each job
//! runs in this process: OBuilder specs through the obuilder engine (many at once on one
//! store), with their log kept in memory for `Job.log`, and Git contexts from a mirror per
//! repository. It pauses itself while it prunes or is unhealthy, reconnects with back-off
//! when the scheduler goes away, and on `selfUpdate` drains and returns
//! [`Exit::Update`] so that the service manager starts the new binary.
//!
//! Everything runs on a `LocalSet` (the RPC objects are not `Send`); the builds' own
//! tasks run on the runtime's threads.

pub mod docker;
pub mod git;
mod http;
pub mod log;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp::Error;
use obuilder_config::{BuilderConfig, HealthcheckOptions};
use obuilder_engine::{BuildError, BuildOptions, Builder, CancellationToken};
use ocluster_api::schema_capnp::{additional_metric, job, job_descr, queue, registration, worker};
use ocluster_net::{SecretKey, SturdyRef};

pub use log::JobLog;

/// The exit status the binary uses after `selfUpdate`, for systemd's `Restart=` or
/// launchd's `KeepAlive` to start the new binary (the original exits with 1 too).
pub const EXIT_UPDATE: i32 = 1;

/// Why [`run`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// `selfUpdate`: every job has finished; exit with [`EXIT_UPDATE`].
    Update,
    /// [`Stop::drain`] fired and every running job has finished.
    Drained,
    /// [`Stop::abort`] fired.
    Stopped,
}

/// How [`run`] is asked to end.
#[derive(Clone, Default)]
pub struct Stop {
    /// Take no more jobs (the scheduler is told this worker is inactive), finish the
    /// running ones, then return [`Exit::Drained`]. A service manager's stop (SIGTERM).
    pub drain: CancellationToken,
    /// Return now: the running jobs' containers are killed and the connection closes
    /// without an answer for them, so a scheduler of ours runs them again on another
    /// worker (its `--max-attempts`); an OCaml scheduler fails them, as it does for a
    /// worker that dies.
    pub abort: CancellationToken,
}

/// A handler for `custom` jobs of one kind. It gets the serialised `Custom` struct (a
/// Cap'n Proto message whose root is `Custom`) and the job's log.
pub type CustomHandler =
    Rc<dyn Fn(Vec<u8>, JobLog, CancellationToken) -> Pin<Box<dyn Future<Output = JobResult>>>>;

/// How a job ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    Ok(String),
    Failed(String),
    Cancelled,
}

/// Everything a worker needs.
pub struct WorkerConfig {
    /// Unique in its pool.
    pub name: String,
    /// Jobs at once (one outstanding `pop` per free slot).
    pub capacity: u32,
    /// Git mirrors and temporary contexts.
    pub state_dir: PathBuf,
    pub builder: BuilderConfig,
    /// Prune while the store's free space is below this percentage.
    pub prune_threshold: f64,
    /// Results deleted per prune round.
    pub prune_limit: usize,
    /// How often to run the healthcheck (zero: never).
    pub healthcheck_period: Duration,
    /// A static busybox for the healthcheck's image.
    pub busybox: PathBuf,
    /// An image the healthcheck builds on instead (else busybox; servercore on an engine
    /// of Windows containers).
    pub healthcheck_image: Option<String>,
    /// `--additional-metrics NAME:URI`.
    pub additional_metrics: Vec<(String, String)>,
    /// The Docker-compatible CLI for Dockerfile jobs (`None`: they are refused).
    pub docker: Option<docker::DockerCli>,
    /// Repositories a Dockerfile job may push to.
    pub allow_push: Vec<String>,
    /// Handlers for `custom` jobs by kind; any other kind is refused.
    pub custom: HashMap<String, CustomHandler>,
    /// First and longest wait before reconnecting.
    pub reconnect: (Duration, Duration),
    /// How often to send the scheduler a heartbeat (an extension; an OCaml scheduler
    /// answers Unimplemented and gets none after that).
    pub heartbeat: Duration,
}

impl WorkerConfig {
    pub fn new(name: &str, state_dir: PathBuf, builder: BuilderConfig) -> WorkerConfig {
        WorkerConfig {
            name: name.to_string(),
            capacity: 10,
            state_dir,
            builder,
            prune_threshold: 30.0,
            prune_limit: 100,
            healthcheck_period: Duration::from_secs(600),
            busybox: PathBuf::from("/bin/busybox"),
            healthcheck_image: None,
            additional_metrics: Vec::new(),
            docker: None,
            allow_push: Vec::new(),
            custom: HashMap::new(),
            reconnect: (Duration::from_secs(1), Duration::from_secs(10)),
            heartbeat: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] obuilder_config::ConfigError),
    #[error("the healthcheck failed at start-up: {0}")]
    Unhealthy(#[from] obuilder_config::HealthcheckError),
    #[error("cannot create {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Reasons this worker has asked the scheduler not to give it jobs.
const PAUSE_PRUNE: u8 = 1;
const PAUSE_UNHEALTHY: u8 = 2;
const PAUSE_DRAINING: u8 = 4;

struct Shared {
    config: WorkerConfig,
    builder: Arc<Builder>,
    mirrors: git::Mirrors,
    queue: RefCell<Option<queue::Client>>,
    paused: Cell<u8>,
    running: Cell<u32>,
    accepted: Cell<u64>,
    outcomes: RefCell<HashMap<&'static str, u64>>,
    unhealthy: Cell<bool>,
    space_free: Cell<f64>,
    updating: Cell<bool>,
    changed: tokio::sync::Notify,
    update_ready: tokio::sync::Notify,
    /// The parent of every job's cancellation token.
    all_jobs: CancellationToken,
}

impl Shared {
    fn set_paused(&self, reason: u8, on: bool) {
        let before = self.paused.get();
        let after = if on {
            before | reason
        } else {
            before & !reason
        };
        self.paused.set(after);
        if (before == 0) != (after == 0) {
            self.tell_active();
        }
    }

    fn tell_active(&self) {
        if let Some(q) = self.queue.borrow().clone() {
            let mut r = q.set_active_request();
            r.get().set_active(self.paused.get() == 0);
            tokio::task::spawn_local(async move {
                if let Err(e) = r.send().promise.await {
                    tracing::warn!("cannot tell the scheduler whether to send jobs: {e}");
                }
            });
        }
    }

    /// Waits until no job runs, and no job is on its way: a pop the scheduler answered
    /// before it learnt that this worker takes no more jobs arrives first.
    async fn finish_running(&self) {
        loop {
            loop {
                let changed = self.changed.notified();
                if self.running.get() == 0 {
                    break;
                }
                changed.await;
            }
            // Replies come in order: once setActive's is back, an earlier pop's has come
            // too, and its slot counts it as running within this pause.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if self.running.get() == 0 {
                return;
            }
        }
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            out.push_str(&format!(
                "# HELP ocluster_worker_{name} {help}\n# TYPE ocluster_worker_{name} {kind}\n"
            ));
            for (labels, v) in rows {
                out.push_str(&format!("ocluster_worker_{name}{labels} {v}\n"));
            }
        };
        family(
            "jobs_accepted_total",
            "counter",
            "Number of jobs accepted",
            vec![(String::new(), self.accepted.get() as f64)],
        );
        family(
            "running_jobs",
            "gauge",
            "Number of jobs running",
            vec![(String::new(), f64::from(self.running.get()))],
        );
        let outcomes = self.outcomes.borrow();
        let mut rows: Vec<(String, f64)> = outcomes
            .iter()
            .map(|(k, v)| (format!("{{result=\"{k}\"}}"), *v as f64))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        family(
            "jobs_finished_total",
            "counter",
            "Jobs finished, by result",
            rows,
        );
        family(
            "unhealthy",
            "gauge",
            "1 while the last healthcheck failed",
            vec![(String::new(), if self.unhealthy.get() { 1.0 } else { 0.0 })],
        );
        family(
            "obuilder_space_free",
            "gauge",
            "Free space in the obuilder store (percent)",
            vec![(String::new(), self.space_free.get())],
        );
        out
    }
}

/// Runs the worker until `stop` fires or `selfUpdate` has drained it. Must run on a
/// `LocalSet`, inside a multi-thread runtime (the builds' tasks run on its threads).
pub async fn run(config: WorkerConfig, pool: SturdyRef, stop: Stop) -> Result<Exit, WorkerError> {
    for d in ["git", "tmp"] {
        let path = config.state_dir.join(d);
        std::fs::create_dir_all(&path).map_err(|source| WorkerError::StateDir { path, source })?;
    }
    let builder = Arc::new(config.builder.open().await?);
    let mirrors = git::Mirrors::new(&config.state_dir, config.builder.exec.clone());
    let shared = Rc::new(Shared {
        config,
        builder,
        mirrors,
        queue: RefCell::new(None),
        paused: Cell::new(0),
        running: Cell::new(0),
        accepted: Cell::new(0),
        outcomes: RefCell::new(HashMap::new()),
        unhealthy: Cell::new(false),
        space_free: Cell::new(100.0),
        updating: Cell::new(false),
        changed: tokio::sync::Notify::new(),
        update_ready: tokio::sync::Notify::new(),
        all_jobs: CancellationToken::new(),
    });
    // The original refuses to start on a failed healthcheck.
    if !shared.config.healthcheck_period.is_zero() {
        healthcheck(&shared).await?;
    }
    let maintenance = tokio::task::spawn_local(maintain(shared.clone()));
    let drainer = tokio::task::spawn_local(drain(shared.clone(), stop.drain.clone()));
    let (first, longest) = shared.config.reconnect;
    let mut wait = first;
    let exit = loop {
        let session = session(&shared, &pool, &mut wait, first);
        let ended = tokio::select! {
            r = session => r,
            _ = stop.abort.cancelled() => break Exit::Stopped,
        };
        match ended {
            Ok(()) if shared.updating.get() => break Exit::Update,
            Ok(()) => break Exit::Drained,
            Err(e) => {
                tracing::warn!(
                    "Lost connection to scheduler ({e}). Will retry in {}s",
                    wait.as_secs_f64()
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.abort.cancelled() => break Exit::Stopped,
                    // Nothing runs while the scheduler is away.
                    _ = stop.drain.cancelled(), if shared.running.get() == 0 => break Exit::Drained,
                }
                wait = (wait * 2).min(longest);
            }
        }
    };
    drainer.abort();
    maintenance.abort();
    shared.queue.borrow_mut().take();
    if exit == Exit::Stopped {
        // Cancel what runs and let the builds kill their containers.
        shared.all_jobs.cancel();
        let drained = async {
            loop {
                let changed = shared.changed.notified();
                if shared.running.get() == 0 {
                    break;
                }
                changed.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), drained)
            .await
            .is_err()
        {
            tracing::warn!("jobs still running 30 s after cancelling them");
        }
    }
    shared.builder.wait_idle().await;
    Ok(exit)
}

/// Once `drain` fires: no more jobs (inactive at the scheduler), and when the running
/// ones have finished, the session ends as after an update.
async fn drain(shared: Rc<Shared>, drain: CancellationToken) {
    drain.cancelled().await;
    tracing::info!(
        "stopping: taking no more jobs, finishing the {} running (stop again to abort them)",
        shared.running.get()
    );
    shared.set_paused(PAUSE_DRAINING, true);
    shared.finish_running().await;
    shared.update_ready.notify_one();
}

/// One connection: register, run the slots until the connection ends (an error) or an
/// update or a drain has emptied the worker (`Ok`).
async fn session(
    shared: &Rc<Shared>,
    pool: &SturdyRef,
    wait: &mut Duration,
    first_wait: Duration,
) -> Result<(), String> {
    let key = SecretKey::generate_ephemeral().map_err(|e| e.to_string())?;
    let conn = ocluster_net::vat::connect(pool, &key)
        .await
        .map_err(|e| e.to_string())?;
    // The connection ends with the session, however it ends: after an abort the
    // scheduler must see this worker go at once, before its jobs' cancellation.
    let _close = AbortOnDrop(conn.driver.abort_handle());
    let reg: registration::Client = capnp::capability::FromClientHook::new(conn.cap.hook);
    let mut r = reg.register_request();
    r.get().set_name(shared.config.name.as_str());
    r.get().set_capacity(shared.config.capacity as i32);
    r.get().set_worker(capnp_rpc::new_client(WorkerImpl {
        shared: shared.clone(),
    }));
    let sent = r.send();
    // As the original worker: the first pops go out at once, pipelined on the
    // registration's answer (one round trip less before the first job); they are sent as
    // the slots are first polled, and fail with the registration if it fails.
    let pipelined: queue::Client = sent.pipeline.get_queue();
    let slots = (0..shared.config.capacity).map(|_| slot(shared.clone(), pipelined.clone()));
    let mut slots = std::pin::pin!(futures::future::join_all(slots));
    let _ = futures::poll!(slots.as_mut());
    let queue = sent
        .promise
        .await
        .and_then(|resp| resp.get()?.get_queue())
        .map_err(|e| format!("cannot register: {}", e.extra))?;
    tracing::info!("Registered as {:?}", shared.config.name);
    *wait = first_wait;
    *shared.queue.borrow_mut() = Some(queue.clone());
    if shared.paused.get() != 0 {
        shared.tell_active();
    }
    let heartbeats = async {
        loop {
            let mut req = queue.heartbeat_request();
            // Our clock: the scheduler pauses a worker whose clock is off.
            req.get().set_time(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            );
            match req.send().promise.await {
                Ok(_) => {}
                Err(e) if e.kind == capnp::ErrorKind::Unimplemented => {
                    tracing::info!("the scheduler takes no heartbeats (an OCaml scheduler?)");
                    return std::future::pending::<String>().await;
                }
                Err(e) if e.kind == capnp::ErrorKind::Disconnected => return e.extra,
                Err(e) => tracing::warn!("heartbeat: {e}"),
            }
            tokio::time::sleep(shared.config.heartbeat).await;
        }
    };
    let result = tokio::select! {
        e = heartbeats => Err(e),
        _ = slots => Err("the scheduler stopped answering pops".to_string()),
        r = conn.driver => Err(match r {
            Ok(Ok(())) => "connection closed".to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        }),
        _ = shared.update_ready.notified() => Ok(()),
    };
    shared.queue.borrow_mut().take();
    result
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One slot: pop a job, run it, again.
async fn slot(shared: Rc<Shared>, queue: queue::Client) {
    loop {
        if shared.updating.get() {
            return;
        }
        let log = JobLog::new();
        let cancel = shared.all_jobs.child_token();
        let (done_tx, done_rx) = tokio::sync::watch::channel(None);
        let mut pop = queue.pop_request();
        pop.get().set_job(capnp_rpc::new_client(JobImpl {
            log: log.clone(),
            cancel: cancel.clone(),
            done: done_rx,
        }));
        let resp = match pop.send().promise.await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("pop ended: {e}");
                return;
            }
        };
        shared.accepted.set(shared.accepted.get() + 1);
        shared.running.set(shared.running.get() + 1);
        // The job runs in a task of its own, so that it ends properly (its container
        // killed) even when this slot is dropped with its connection.
        let job = {
            let shared = shared.clone();
            tokio::task::spawn_local(async move {
                let result = match resp.get().and_then(|r| r.get_descr()) {
                    Ok(descr) => run_job(&shared, descr, &log, &cancel).await,
                    Err(e) => JobResult::Failed(format!("bad job description: {e}")),
                };
                drop(resp);
                let (line, outcome, reply) = match &result {
                    JobResult::Ok(out) => ("Job succeeded".to_string(), "ok", Ok(out.clone())),
                    JobResult::Cancelled => (
                        "Job cancelled".to_string(),
                        "cancelled",
                        Err("Build cancelled".to_string()),
                    ),
                    // As the original: the details are in the log.
                    JobResult::Failed(msg) => {
                        (msg.clone(), "fail", Err("Build failed".to_string()))
                    }
                };
                log.line(&line);
                log.finish();
                *shared.outcomes.borrow_mut().entry(outcome).or_default() += 1;
                let _ = done_tx.send(Some(reply));
                shared.running.set(shared.running.get() - 1);
                shared.changed.notify_waiters();
            })
        };
        let _ = job.await;
    }
}

async fn run_job(
    shared: &Rc<Shared>,
    descr: job_descr::Reader<'_>,
    log: &JobLog,
    cancel: &CancellationToken,
) -> JobResult {
    log.line(&format!("Building on {}", shared.config.name));
    let text = |r: capnp::Result<capnp::text::Reader<'_>>| -> Result<String, String> {
        r.and_then(|t| Ok(t.to_str()?.to_string()))
            .map_err(|e| format!("bad job description: {e}"))
    };
    let common = (|| -> Result<_, String> {
        let repo = text(descr.get_repository())?;
        let commits = descr
            .get_commits()
            .map_err(|e| e.to_string())?
            .iter()
            .map(&text)
            .collect::<Result<Vec<_>, _>>()?;
        let mut secrets = Vec::new();
        for s in descr.get_secrets().map_err(|e| e.to_string())?.iter() {
            secrets.push((text(s.get_id())?, text(s.get_value())?.into_bytes()));
        }
        Ok((repo, commits, secrets))
    })();
    let (repo, commits, secrets) = match common {
        Ok(x) => x,
        Err(e) => return JobResult::Failed(e),
    };
    match descr.get_action().which() {
        Ok(job_descr::action::Obuilder(o)) => {
            let spec = match o.and_then(|o| o.get_spec()).map(|s| s.to_string()) {
                Ok(Ok(s)) => s,
                _ => return JobResult::Failed("bad job description: no spec".into()),
            };
            obuilder_job(shared, &spec, &repo, &commits, secrets, log, cancel).await
        }
        Ok(job_descr::action::DockerBuild(d)) => {
            let Some(cli) = &shared.config.docker else {
                return JobResult::Failed(
                    "Dockerfile jobs are not supported by this worker (start it with \
                     --docker-cli docker|buildah|podman)"
                        .into(),
                );
            };
            let parsed = (|| -> Result<(docker::DockerJob, bool), String> {
                let d = d.map_err(|e| e.to_string())?;
                let mut job = docker::DockerJob {
                    push_target: text(d.get_push_target())?,
                    push_user: text(d.get_push_user())?,
                    push_password: text(d.get_push_password())?,
                    squash: d.get_squash(),
                    buildkit: d.get_buildkit(),
                    ..Default::default()
                };
                for a in d.get_build_args().map_err(|e| e.to_string())?.iter() {
                    job.build_args.push(text(a)?);
                }
                match d.get_dockerfile().which().map_err(|e| e.to_string())? {
                    ocluster_api::schema_capnp::docker_build::dockerfile::Contents(c) => {
                        job.contents = Some(text(c)?)
                    }
                    ocluster_api::schema_capnp::docker_build::dockerfile::Path(p) => {
                        job.path = Some(text(p)?)
                    }
                }
                Ok((job, d.get_include_git()))
            })();
            let (mut job, include_git) = match parsed {
                Ok(x) => x,
                Err(e) => return JobResult::Failed(format!("bad job description: {e}")),
            };
            job.secrets = secrets;
            let ctx = match context(shared, &repo, &commits, include_git, cancel).await {
                Ok(c) => c,
                Err(r) => return r,
            };
            docker::run(
                cli,
                &shared.config.builder.exec,
                job,
                &ctx.path().join("src"),
                &shared.config.allow_push,
                log,
                cancel,
            )
            .await
        }
        Ok(job_descr::action::Custom(c)) => {
            let c = match c {
                Ok(c) => c,
                Err(e) => return JobResult::Failed(format!("bad job description: {e}")),
            };
            let kind = c
                .get_kind()
                .ok()
                .and_then(|k| k.to_string().ok())
                .unwrap_or_default();
            match shared.config.custom.get(&kind) {
                None => JobResult::Failed(format!("Unsupported custom job {kind:?}")),
                Some(h) => {
                    let mut m = capnp::message::Builder::new_default();
                    if let Err(e) = m.set_root(c) {
                        return JobResult::Failed(format!("bad job description: {e}"));
                    }
                    h(
                        capnp::serialize::write_message_to_words(&m),
                        log.clone(),
                        cancel.clone(),
                    )
                    .await
                }
            }
        }
        Err(e) => JobResult::Failed(format!("unknown job type: {e}")),
    }
}

async fn obuilder_job(
    shared: &Rc<Shared>,
    spec_text: &str,
    repo: &str,
    commits: &[String],
    secrets: Vec<(String, Vec<u8>)>,
    log: &JobLog,
    cancel: &CancellationToken,
) -> JobResult {
    let spec = match obuilder_spec::Spec::parse_named("spec", spec_text) {
        Ok(s) => s,
        Err(e) => return JobResult::Failed(format!("Invalid spec: {e}")),
    };
    let tmp = match context(shared, repo, commits, false, cancel).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let ctx = tmp.path().join("src");
    let mut opts = BuildOptions::new(&ctx, log.sink());
    opts.secrets = secrets;
    opts.cancel = cancel.child_token();
    let builder = shared.builder.clone();
    let result = builder.build(&spec, &opts).await;
    drop(tmp);
    match result {
        Ok(id) => JobResult::Ok(id),
        Err(BuildError::Cancelled) => JobResult::Cancelled,
        Err(e) => {
            let mut msg = match e.step() {
                Some(step) => format!(
                    "Build step failed: {e}\n  in step {}/{}: {}",
                    step.index, step.total, step.heading
                ),
                None => format!("Build failed: {e}"),
            };
            let mut cause = std::error::Error::source(&e).and_then(std::error::Error::source);
            while let Some(c) = cause {
                msg.push_str(&format!("\n  caused by: {c}"));
                cause = c.source();
            }
            JobResult::Failed(msg)
        }
    }
}

/// A temporary directory whose `src` is the job's context: empty, or the commits of
/// `repo` merged. Removed when dropped.
async fn context(
    shared: &Rc<Shared>,
    repo: &str,
    commits: &[String],
    keep_git: bool,
    cancel: &CancellationToken,
) -> Result<tempfile::TempDir, JobResult> {
    let tmp = tempfile::Builder::new()
        .prefix("build-context-")
        .tempdir_in(shared.config.state_dir.join("tmp"))
        .map_err(|e| JobResult::Failed(format!("cannot make a build context: {e}")))?;
    let ctx = tmp.path().join("src");
    if commits.is_empty() {
        std::fs::create_dir(&ctx)
            .map_err(|e| JobResult::Failed(format!("cannot make a build context: {e}")))?;
    } else if repo.is_empty() {
        return Err(JobResult::Failed(git::GitError::NoRepository.to_string()));
    } else {
        // As the original: preparing the context is not cancelled part-way.
        shared
            .mirrors
            .checkout(repo, commits, &ctx, keep_git)
            .await
            .map_err(|e| JobResult::Failed(e.to_string()))?;
        if cancel.is_cancelled() {
            return Err(JobResult::Cancelled);
        }
    }
    Ok(tmp)
}

/// Prunes when space is low and runs the healthcheck when it is due, pausing the worker
/// at the scheduler meanwhile.
async fn maintain(shared: Rc<Shared>) {
    let period = shared.config.healthcheck_period;
    let mut next_check = tokio::time::Instant::now() + period;
    loop {
        match shared.builder.store().df().await {
            Ok(df) => {
                let free = df.free_percent();
                shared.space_free.set(free);
                if free < shared.config.prune_threshold {
                    shared.set_paused(PAUSE_PRUNE, true);
                    tracing::info!(
                        "{free:.1}% free, below {}%: pruning",
                        shared.config.prune_threshold
                    );
                    let sink: obuilder_engine::log::LogSink = Arc::new(|e| {
                        if let obuilder_engine::log::LogEvent::Note(n) = e {
                            tracing::info!("{n}");
                        }
                    });
                    if let Err(e) = shared
                        .builder
                        .prune_until_free(shared.config.prune_threshold, &sink)
                        .await
                    {
                        tracing::warn!("prune failed: {e}");
                    }
                    shared.set_paused(PAUSE_PRUNE, false);
                }
            }
            Err(e) => tracing::warn!("cannot measure the store's free space: {e}"),
        }
        if !period.is_zero() && tokio::time::Instant::now() >= next_check {
            match healthcheck(&shared).await {
                Ok(()) => {
                    shared.unhealthy.set(false);
                    shared.set_paused(PAUSE_UNHEALTHY, false);
                    next_check = tokio::time::Instant::now() + period;
                }
                Err(e) => {
                    let retry = Duration::from_secs(60).min(period);
                    tracing::warn!(
                        "healthcheck failed: {e}; pausing, retrying in {} s",
                        retry.as_secs_f64()
                    );
                    shared.unhealthy.set(true);
                    shared.set_paused(PAUSE_UNHEALTHY, true);
                    next_check = tokio::time::Instant::now() + retry;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(30).min(if period.is_zero() {
            Duration::from_secs(30)
        } else {
            period
        }))
        .await;
    }
}

async fn healthcheck(shared: &Shared) -> Result<(), obuilder_config::HealthcheckError> {
    let mut opts = HealthcheckOptions::for_store(&shared.config.builder.store);
    opts.busybox = shared.config.busybox.clone();
    opts.timeout = Duration::from_secs(30);
    if shared.config.healthcheck_image.is_some() {
        opts.image = shared.config.healthcheck_image.clone();
    }
    obuilder_config::healthcheck(
        &shared.builder,
        &shared.config.builder.images(),
        &shared.config.builder.exec,
        &opts,
    )
    .await
}

// ---- the capabilities this worker hosts ------------------------------------------------------

/// A job's capability. Its methods let go of `self` before they wait, so that the release
/// of the last reference drops it at once, which cancels the job (as the original).
struct JobImpl {
    log: JobLog,
    cancel: CancellationToken,
    done: tokio::sync::watch::Receiver<Option<Result<String, String>>>,
}

impl Drop for JobImpl {
    fn drop(&mut self) {
        if self.done.borrow().is_none() {
            self.cancel.cancel();
        }
    }
}

impl job::Server for JobImpl {
    async fn log(
        self: Rc<Self>,
        params: job::LogParams,
        mut results: job::LogResults,
    ) -> Result<(), Error> {
        let start = params.get()?.get_start();
        let log = self.log.clone();
        drop(self);
        let (data, next) = log.read(start).await;
        let mut r = results.get();
        r.set_log(&data);
        r.set_next(next);
        Ok(())
    }

    async fn result(
        self: Rc<Self>,
        _: job::ResultParams,
        mut results: job::ResultResults,
    ) -> Result<(), Error> {
        let mut done = self.done.clone();
        drop(self);
        let outcome = done
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::failed("the worker stopped".into()))?
            .clone();
        match outcome {
            Some(Ok(out)) => {
                results.get().set_output(out.as_str());
                Ok(())
            }
            Some(Err(msg)) => Err(Error::failed(msg)),
            None => Err(Error::failed("the worker stopped".into())),
        }
    }

    async fn cancel(
        self: Rc<Self>,
        _: job::CancelParams,
        _: job::CancelResults,
    ) -> Result<(), Error> {
        self.cancel.cancel();
        Ok(())
    }
}

struct WorkerImpl {
    shared: Rc<Shared>,
}

impl worker::Server for WorkerImpl {
    async fn metrics(
        self: Rc<Self>,
        params: worker::MetricsParams,
        mut results: worker::MetricsResults,
    ) -> Result<(), Error> {
        let (content_type, data) = match params.get()?.get_source()? {
            worker::MetricsSource::Agent => (
                "text/plain; version=0.0.4; charset=utf-8".to_string(),
                self.shared.metrics(),
            ),
            worker::MetricsSource::Host => http::get("http://127.0.0.1:9100/metrics")
                .await
                .map_err(|e| Error::failed(format!("node exporter: {e}")))?,
        };
        let mut r = results.get();
        r.set_content_type(content_type.as_str());
        r.set_data(data.as_str());
        Ok(())
    }

    async fn additional_metric(
        self: Rc<Self>,
        params: worker::AdditionalMetricParams,
        mut results: worker::AdditionalMetricResults,
    ) -> Result<(), Error> {
        let name = params.get()?.get_source()?.to_str()?.to_string();
        let uri = self
            .shared
            .config
            .additional_metrics
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, u)| u.clone());
        let mut m: additional_metric::Builder = results.get().init_metric();
        match uri {
            None => m.set_not_reported(()),
            Some(uri) => {
                let (ct, data) = http::get(&uri)
                    .await
                    .map_err(|e| Error::failed(format!("{name} ({uri}): {e}")))?;
                let mut mm = m.init_metric();
                mm.set_content_type(ct.as_str());
                mm.set_data(data.as_str());
            }
        }
        Ok(())
    }

    async fn self_update(
        self: Rc<Self>,
        _: worker::SelfUpdateParams,
        _: worker::SelfUpdateResults,
    ) -> Result<(), Error> {
        let shared = self.shared.clone();
        drop(self);
        tracing::info!("Update requested: finishing the running jobs, then exiting");
        shared.updating.set(true);
        shared.finish_running().await;
        // Answer first, then end the session.
        tokio::task::spawn_local(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            shared.update_ready.notify_one();
        });
        Ok(())
    }
}
