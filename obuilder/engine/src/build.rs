//! The step semantics: how a spec becomes steps, each with an id (its cache key), a base
//! and the work that makes it (OBuilder's `build.ml`). Stages run first, then `(from …)`,
//! then the ops; `comment`, `workdir`, `user`, `env` and `shell` change the context, and
//! `from`, `run` and `copy` are steps, handed to the policy layer (`crate::policy`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use obuilder_spec::sexp::quote_if_needed;
use obuilder_spec::{Base, Copy, DataSource, Op, Run, Spec, User};
use tokio_util::sync::CancellationToken;

use crate::copy;
use crate::error::{BuildError, StepError, StepRef};
use crate::fetch::{Fetcher, ImageConfig};
use crate::key::{secret_digest, CopyInput, CopyOp, Id, RunInput, SecretInput};
use crate::log::{LogEvent, LogSink, StepEvent, StepLog};
use crate::policy::{
    BoxFuture, CacheStats, InFlightStep, Pins, Policy, ResultInfo, StepRequest, Work,
};
use crate::sandbox::{CacheMount, RunConfig, Sandbox, SandboxError, SecretMount, UserIds};
use crate::store::{BuildDir, Store};

/// What the caller gives a build besides the spec.
#[derive(Clone)]
pub struct BuildOptions {
    /// The context directory `copy` reads from.
    pub src_dir: PathBuf,
    pub log: LogSink,
    /// Fires to stop the build: its steps are cancelled unless other builds share them.
    pub cancel: CancellationToken,
    /// Secret values by id (`--secret ID:FILE`). They are masked in every step's log.
    pub secrets: Vec<(String, Vec<u8>)>,
    /// Environment put before the image's (OBuilder's CLI passes none).
    pub env: Vec<(String, String)>,
    /// Stop a `run` step after this long (`--step-timeout`).
    pub step_timeout: Option<Duration>,
    /// Keep a failed step's tree as a result (`policy::kept_id`) to look into.
    pub keep_failed: bool,
}

impl BuildOptions {
    pub fn new(src_dir: impl Into<PathBuf>, log: LogSink) -> BuildOptions {
        BuildOptions {
            src_dir: src_dir.into(),
            log,
            cancel: CancellationToken::new(),
            secrets: Vec::new(),
            env: Vec::new(),
            step_timeout: None,
            keep_failed: false,
        }
    }
}

/// How a builder treats every build (`BuilderConfig` in `obuilder-config` fills it).
#[derive(Debug, Clone)]
pub struct BuilderOptions {
    /// The most a step's stored log keeps (see `log::LogOptions`).
    pub max_log_bytes: u64,
}

impl Default for BuilderOptions {
    fn default() -> BuilderOptions {
        BuilderOptions {
            max_log_bytes: crate::log::DEFAULT_MAX_LOG_BYTES,
        }
    }
}

type Env = Vec<(String, String)>;

/// A base step's id and env, as [`Session::track`] takes it.
struct Tagged(Id, Env);

impl AsRef<str> for Tagged {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The most characters of a step's heading the log shows.
const MAX_HEADING: usize = 2000;

/// Runs specs. Cheap to share (`Arc`) between many concurrent builds.
pub struct Builder {
    policy: Policy,
    sandbox: Arc<dyn Sandbox>,
    fetcher: Arc<dyn Fetcher>,
    /// The store's key for secret digests (see `key::secret_digest`).
    secret_key: [u8; 32],
}

#[derive(Clone)]
struct Context {
    env: Vec<(String, String)>,
    user: User,
    workdir: String,
    shell: Vec<String>,
    /// Stages in scope: name → (result id, env).
    scope: HashMap<String, (Id, Vec<(String, String)>)>,
    /// The heading of the step being made (`/src: (run (shell "make"))`), kept in its
    /// result as `step`.
    heading: String,
}

impl Context {
    /// The context as an image config (what a result records in `config.json`).
    fn config(&self) -> ImageConfig {
        let user = match &self.user {
            User::Unix { uid, gid } => format!("{uid}:{gid}"),
            User::Name(n) => n.clone(),
        };
        ImageConfig {
            env: self.env.clone(),
            workdir: Some(self.workdir.clone()),
            user: Some(user),
            entrypoint: None,
            shell: Some(self.shell.clone()),
        }
    }
}

/// The file of a `copy` step's build dir naming its destination in the tree (as written in
/// the spec, after the sandbox's mapping; `/`-separated, possibly ending in `/`).
pub const COPY_DST: &str = "copy-dst";

/// Writes a step's context as `config.json` in its build dir.
fn write_step_config(
    dir: &BuildDir,
    config: &ImageConfig,
    heading: &str,
) -> Result<(), BuildError> {
    let json = serde_json::to_vec_pretty(config)
        .map_err(|_| StepError::Internal("a step config that is not JSON"))?;
    let p = dir.dir.join("config.json");
    std::fs::write(&p, json).map_err(|e| BuildError::from(StepError::io("cannot write", &p)(e)))?;
    let p = dir.dir.join("step");
    std::fs::write(&p, format!("{heading}\n"))
        .map_err(|e| StepError::io("cannot write", &p)(e).into())
}

/// One build's state: its pins, its step counter, what its logs mask.
struct Session<'a> {
    opts: &'a BuildOptions,
    pins: Pins,
    next_step: AtomicUsize,
    total: usize,
    masked: Vec<Vec<u8>>,
}

impl Session<'_> {
    /// The next step's reference; says that it starts (before its heading).
    fn step_ref(&self, heading: String) -> StepRef {
        let step = StepRef {
            index: self.next_step.fetch_add(1, Ordering::Relaxed) + 1,
            total: self.total,
            heading: obuilder_spec::clip(&heading, crate::exec::MAX_SHOWN).into_owned(),
            id: None,
        };
        (self.opts.log)(&LogEvent::Step(StepEvent::Started {
            index: step.index,
            total: step.total,
            heading: step.heading.clone(),
        }));
        step
    }

    /// Runs a step, saying how it ended (cached or made, how long, or why it failed).
    async fn track<T: AsRef<str>>(
        &self,
        step: &StepRef,
        f: impl std::future::Future<Output = Result<T, BuildError>>,
    ) -> Result<T, BuildError> {
        let t0 = std::time::Instant::now();
        let hits = self.pins.hit_count();
        let r = f.await.map_err(|e| e.in_step(step));
        let secs = t0.elapsed().as_secs_f64();
        let (index, total) = (step.index, step.total);
        let event = match &r {
            Ok(id) => StepEvent::Done {
                index,
                total,
                id: id.as_ref().to_string(),
                cached: self.pins.hit_count() > hits,
                secs,
            },
            Err(BuildError::Cancelled) => return r,
            Err(e) => StepEvent::Failed {
                index,
                total,
                secs,
                status: match e.kind() {
                    crate::error::FailureKind::Exited { status } => Some(status),
                    _ => None,
                },
                error: e.to_string(),
            },
        };
        (self.opts.log)(&LogEvent::Step(event));
        r
    }
}

/// Calls `f` with the id of every secret any `run` of the spec (or its stages) asks for.
fn secrets_wanted(spec: &Spec, f: &mut dyn FnMut(&str)) {
    for (_, child) in &spec.child_builds {
        secrets_wanted(child, f);
    }
    for op in &spec.ops {
        if let Op::Run(r) = op {
            for s in &r.secrets {
                f(&s.id);
            }
        }
    }
}

/// How many steps (`from`, `run`, `copy`) the spec and its stages have.
pub fn count_steps(spec: &Spec) -> usize {
    let own = spec
        .ops
        .iter()
        .filter(|op| matches!(op, Op::Run(_) | Op::Copy(_)))
        .count();
    let from = usize::from(matches!(spec.from, Base::Image(_)));
    own + from
        + spec
            .child_builds
            .iter()
            .map(|(_, c)| count_steps(c))
            .sum::<usize>()
}

/// `path` taken relative to `workdir` (absolute paths are kept), as OBuilder joins them.
pub fn join_workdir(workdir: &str, path: &str) -> String {
    if path.starts_with('/') {
        path.to_string()
    } else if workdir.ends_with('/') {
        format!("{workdir}{path}")
    } else {
        format!("{workdir}/{path}")
    }
}

/// The env of a base image, stored in its result as OBuilder does: `((env ((K V)…)))`.
fn env_file_text(env: &[(String, String)]) -> String {
    use obuilder_spec::Sexp;
    let pairs = Sexp::list(
        env.iter()
            .map(|(k, v)| Sexp::list([Sexp::atom(k.clone()), Sexp::atom(v.clone())])),
    );
    format!("{}\n", Sexp::list([Sexp::field("env", pairs)]).to_hum())
}

fn read_image_config(result: &Path) -> Result<ImageConfig, BuildError> {
    let path = result.join("image.json");
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            StepError::io("corrupt", &path)(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                .into()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ImageConfig::default()),
        Err(e) => Err(StepError::io("cannot read", &path)(e).into()),
    }
}

/// A sandbox's answer about a step's command, as the step's error.
fn sandbox_failure(e: SandboxError) -> BuildError {
    match e {
        SandboxError::Cancelled => BuildError::Cancelled,
        SandboxError::Failed { cmd, status } => StepError::Exited { cmd, status }.into(),
        SandboxError::Signalled { cmd, signal, hint } => {
            StepError::Signalled { cmd, signal, hint }.into()
        }
        e => StepError::Sandbox(e).into(),
    }
}

impl Builder {
    /// Opens the store's database, recovering the store and the sandbox from any crash if
    /// this process is the store's only user (see `crate::policy`), with default options.
    pub async fn new(
        store: Arc<dyn Store>,
        sandbox: Arc<dyn Sandbox>,
        fetcher: Arc<dyn Fetcher>,
    ) -> Result<Builder, BuildError> {
        Builder::with_options(store, sandbox, fetcher, BuilderOptions::default()).await
    }

    pub async fn with_options(
        store: Arc<dyn Store>,
        sandbox: Arc<dyn Sandbox>,
        fetcher: Arc<dyn Fetcher>,
        opts: BuilderOptions,
    ) -> Result<Builder, BuildError> {
        let policy = Policy::open(store, sandbox.clone(), opts.max_log_bytes).await?;
        let state = policy.store.state_dir();
        let secret_key = crate::key::store_secret_key(&state).map_err(StepError::io(
            "cannot read or create the secret key in",
            &state,
        ))?;
        Ok(Builder {
            policy,
            sandbox,
            fetcher,
            secret_key,
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.policy.store
    }

    pub fn sandbox(&self) -> &Arc<dyn Sandbox> {
        &self.sandbox
    }

    /// Takes the store for this process alone (no other obuilder process may use it until
    /// this one exits), as deleting results needs; false if another process uses it.
    pub fn try_exclusive(&self) -> bool {
        self.policy.try_exclusive()
    }

    /// How many results the store holds.
    pub fn count(&self) -> Result<u64, BuildError> {
        Ok(self.policy.db.count().map_err(StepError::from)? as u64)
    }

    /// Steps taken from the cache and steps run, since the store was made.
    pub fn cache_stats(&self) -> Result<CacheStats, BuildError> {
        let (hits, misses) = self.policy.db.hit_miss().map_err(StepError::from)?;
        Ok(CacheStats {
            hits: hits as u64,
            misses: misses as u64,
        })
    }

    /// What the database knows of result `id`.
    pub fn info(&self, id: &str) -> Result<Option<ResultInfo>, BuildError> {
        let row = self.policy.db.get(id).map_err(StepError::from)?;
        Ok(row.map(|r| ResultInfo {
            id: r.id,
            parent: r.parent,
            created: r.created,
            used: r.used,
            children: r.children as u64,
        }))
    }

    /// The context result `id` was made in (its `config.json`; for a base image, the
    /// image's config; for a result from before steps recorded it, the nearest
    /// ancestor's), or `None` if there is no such result.
    pub async fn result_config(&self, id: &str) -> Result<Option<ImageConfig>, BuildError> {
        let mut at = id.to_string();
        for _ in 0..10_000 {
            let Some(dir) = self
                .policy
                .store
                .result(&at)
                .await
                .map_err(StepError::from)?
            else {
                return Ok(None);
            };
            let step = dir.join("config.json");
            if step.exists() {
                let b = std::fs::read(&step).map_err(StepError::io("cannot read", &step))?;
                return serde_json::from_slice(&b).map(Some).map_err(|e| {
                    StepError::io("corrupt", &step)(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e,
                    ))
                    .into()
                });
            }
            if dir.join("image.json").exists() {
                return read_image_config(&dir).map(Some);
            }
            match self.info(&at)?.and_then(|i| i.parent) {
                Some(p) => at = p,
                None => return Ok(Some(ImageConfig::default())),
            }
        }
        Ok(Some(ImageConfig::default()))
    }

    /// The steps in flight in this process and how many builds wait for each.
    pub fn in_flight(&self) -> Vec<InFlightStep> {
        self.policy.in_flight()
    }

    /// Deletes `id` and everything built on it (children first), logging each removal.
    pub async fn delete(&self, id: &str, log: &LogSink) -> Result<usize, BuildError> {
        self.policy.delete(id, log).await
    }

    /// Removes up to `limit` least-recently-used results last used before `before` (any
    /// with `None`), never one a running build uses.
    pub async fn prune(
        &self,
        before: Option<time::OffsetDateTime>,
        limit: usize,
        log: &LogSink,
    ) -> Result<usize, BuildError> {
        self.policy.prune(before, limit, log).await
    }

    /// Prunes least-recently-used results until the store has `percent` free.
    pub async fn prune_until_free(&self, percent: f64, log: &LogSink) -> Result<usize, BuildError> {
        self.policy.prune_until_free(percent, log).await
    }

    /// Waits until no step is in flight, e.g. after a cancellation, so that every container
    /// is killed and every build dir discarded before the process exits.
    pub async fn wait_idle(&self) {
        self.policy.wait_idle().await
    }

    /// Builds `spec`; returns the id of its last step.
    pub async fn build(&self, spec: &Spec, opts: &BuildOptions) -> Result<Id, BuildError> {
        self.build_with_config(spec, opts).await.map(|(id, _)| id)
    }

    /// Builds `spec`; returns the id of its last step and the context the spec ends in
    /// (env, workdir, user, shell: what an image made from the result should say, which
    /// may differ from the last step's own `config.json` when `env` or `workdir` follow it).
    pub async fn build_with_config(
        &self,
        spec: &Spec,
        opts: &BuildOptions,
    ) -> Result<(Id, ImageConfig), BuildError> {
        spec.validate().map_err(StepError::Invalid)?;
        // Every secret the spec asks for must be given, before anything runs.
        let mut missing: Vec<String> = Vec::new();
        secrets_wanted(spec, &mut |id| {
            if !opts.secrets.iter().any(|(s, _)| s == id) && !missing.iter().any(|m| m == id) {
                missing.push(id.to_string());
            }
        });
        if !missing.is_empty() {
            return Err(StepError::MissingSecrets(missing).into());
        }
        let ctx = Context {
            env: opts.env.clone(),
            user: User::ROOT,
            workdir: "/".into(),
            shell: self.sandbox.default_shell(),
            scope: HashMap::new(),
            heading: String::new(),
        };
        let run = Session {
            opts,
            pins: self.policy.pins(),
            next_step: AtomicUsize::new(0),
            total: count_steps(spec),
            masked: opts.secrets.iter().map(|(_, v)| v.clone()).collect(),
        };
        let r = self
            .stage(spec, ctx, &run)
            .await
            .map(|(id, ctx)| (id, ctx.config()));
        self.policy.record(&run.pins);
        r
    }

    fn stage<'a>(
        &'a self,
        spec: &'a Spec,
        initial: Context,
        run: &'a Session<'a>,
    ) -> BoxFuture<'a, Result<(Id, Context), BuildError>> {
        Box::pin(async move {
            let log = &run.opts.log;
            let mut scope = initial.scope.clone();
            for (name, child) in &spec.child_builds {
                log(&LogEvent::Heading(format!("(build {name:?} ...)")));
                let child_ctx = Context {
                    scope: scope.clone(),
                    ..initial.clone()
                };
                let (id, child_end) = self.stage(child, child_ctx, run).await?;
                log(&LogEvent::Note(format!("--> finished {name:?}")));
                scope.insert(name.clone(), (id, child_end.env));
            }
            let (mut base, env) = match &spec.from {
                Base::Image(image) => {
                    let heading = format!("(from {})", quote_if_needed(image));
                    let step = run.step_ref(heading.clone());
                    log(&LogEvent::Heading(heading));
                    let (id, image_env) = run
                        .track(&step, async {
                            self.base(image, run).await.map(|(id, env)| Tagged(id, env))
                        })
                        .await
                        .map(|Tagged(id, env)| (id, env))?;
                    let mut env = initial.env.clone();
                    env.extend(image_env);
                    (id, env)
                }
                Base::Build(name) => {
                    log(&LogEvent::Heading(format!(
                        "(from (build {}))",
                        quote_if_needed(name)
                    )));
                    // The stage's final env already holds the caller's and its image's.
                    scope
                        .get(name)
                        .cloned()
                        .ok_or_else(|| StepError::Invalid(format!("unknown build {name:?}")))?
                }
            };
            let mut ctx = Context {
                scope,
                env,
                ..initial
            };
            for op in &spec.ops {
                let heading = format!("{}: {}", ctx.workdir, op.to_sexp().to_hum());
                let step =
                    matches!(op, Op::Run(_) | Op::Copy(_)).then(|| run.step_ref(heading.clone()));
                // (Stored in the result: secret values are masked there as in logs.)
                ctx.heading =
                    crate::log::mask(&obuilder_spec::clip(&heading, MAX_HEADING), &run.masked);
                log(&LogEvent::Heading(
                    obuilder_spec::clip(&heading, MAX_HEADING).into_owned(),
                ));
                match op {
                    Op::Comment(_) => {}
                    Op::Workdir(dir) => ctx.workdir = join_workdir(&ctx.workdir, dir),
                    Op::User(u) => ctx.user = u.clone(),
                    Op::Shell(s) => ctx.shell = s.clone(),
                    Op::Env(k, v) => {
                        // OBuilder: drop the first binding of k, put the new one first.
                        if let Some(i) = ctx.env.iter().position(|(ek, _)| ek == k) {
                            ctx.env.remove(i);
                        }
                        ctx.env.insert(0, (k.clone(), v.clone()));
                    }
                    Op::Run(r) => {
                        let step =
                            step.ok_or(StepError::Internal("a run step without a number"))?;
                        base = run.track(&step, self.run(&base, r, &ctx, run)).await?
                    }
                    Op::Copy(c) => {
                        let step =
                            step.ok_or(StepError::Internal("a copy step without a number"))?;
                        base = run.track(&step, self.copy(&base, c, &ctx, run)).await?
                    }
                }
            }
            Ok((base, ctx))
        })
    }

    fn request<'a>(
        &self,
        id: &'a str,
        base: Option<&'a str>,
        run: &'a Session<'a>,
    ) -> StepRequest<'a> {
        StepRequest {
            id,
            base,
            log: &run.opts.log,
            cancel: &run.opts.cancel,
            masked: &run.masked,
            keep_failed: run.opts.keep_failed,
        }
    }

    async fn base(&self, image: &str, run: &Session<'_>) -> Result<(Id, Env), BuildError> {
        let log = &run.opts.log;
        let resolved = self
            .fetcher
            .resolve(image, log)
            .await
            .map_err(StepError::from)?;
        if let Some(tagged) = resolved.result {
            // The tagged result is the base: taken from the store (and pinned) as a cached step.
            let (id, name) = (tagged.id.clone(), image.to_string());
            let work: Work = Box::new(move |_dir, _log, _cancel| {
                Box::pin(async move {
                    Err(StepError::Invalid(format!(
                        "image {name:?} names result {}, which is no longer in the store (deleted or pruned); build it again with --tag {name}",
                        tagged.id
                    ))
                    .into())
                })
            });
            self.policy
                .step(self.request(&id, None, run), &run.pins, work)
                .await?;
            return Ok((id, tagged.env));
        }
        let id = resolved.base_id();
        let fetcher = self.fetcher.clone();
        let live = log.clone();
        let work: Work = Box::new(move |dir: BuildDir, _steplog: StepLog, _cancel| {
            Box::pin(async move {
                // The fetcher's notes (downloads, extraction) are shown as they happen, to
                // this build only: they are not the base's output, and a build that finds
                // the base in the store does not replay them (the original's base steps
                // have no log either: a cached `(from …)` is just its "using … from cache").
                let sink: LogSink = Arc::new(move |e: &LogEvent| match e {
                    LogEvent::Step(_) => {}
                    e => live(e),
                });
                let _t = crate::timing::phase("fetch", &dir.id);
                let config = fetcher
                    .fetch(&resolved, &dir.rootfs, &sink)
                    .await
                    .map_err(StepError::from)?;
                let json = serde_json::to_vec_pretty(&config)
                    .map_err(|_| StepError::Internal("an image config that is not JSON"))?;
                let write = |name: &str, data: &[u8]| {
                    let p = dir.dir.join(name);
                    std::fs::write(&p, data)
                        .map_err(|e| BuildError::from(StepError::io("cannot write", &p)(e)))
                };
                write("image.json", &json)?;
                write("env", env_file_text(&config.env).as_bytes())?;
                Ok(())
            })
        });
        let path = self
            .policy
            .step(self.request(&id, None, run), &run.pins, work)
            .await?;
        let config = read_image_config(&path)?;
        Ok((id, config.env))
    }

    fn user(&self, user: &User) -> Result<UserIds, BuildError> {
        self.sandbox
            .user(user)
            .map_err(|e| StepError::Sandbox(e).into())
    }

    async fn run(
        &self,
        base: &str,
        r: &Run,
        ctx: &Context,
        run: &Session<'_>,
    ) -> Result<Id, BuildError> {
        let user = self.user(&ctx.user)?;
        let mut secrets = Vec::new();
        let mut secret_inputs = Vec::new();
        for s in &r.secrets {
            let value = run
                .opts
                .secrets
                .iter()
                .find(|(id, _)| *id == s.id)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| StepError::MissingSecrets(vec![s.id.clone()]))?;
            secret_inputs.push(SecretInput {
                value: secret_digest(&self.secret_key, &value),
                target: s.target.clone(),
            });
            secrets.push(SecretMount {
                value,
                target: s.target.clone(),
            });
        }
        let input = RunInput {
            base: base.to_string(),
            workdir: ctx.workdir.clone(),
            user: ctx.user.clone(),
            env: ctx.env.clone(),
            cmd: r.shell.clone(),
            shell: ctx.shell.clone(),
            network: r.network.clone(),
            mount_secrets: secret_inputs,
        };
        let id = input.id();
        let mut argv = ctx.shell.clone();
        argv.push(r.shell.clone());
        let config = RunConfig {
            argv,
            env: ctx.env.clone(),
            cwd: ctx.workdir.clone(),
            user,
            user_name: ctx.user.name().map(String::from),
            network: r.network.clone(),
            caches: Vec::new(),
            secrets,
            stdin: false,
        };
        let sandbox = self.sandbox.clone();
        let store = self.policy.store.clone();
        let caches: Vec<(String, String)> = r
            .cache
            .iter()
            .map(|c| (c.id.clone(), c.target.clone()))
            .collect();
        let timeout = run.opts.step_timeout;
        let (step_config, heading) = (ctx.config(), ctx.heading.clone());
        let work: Work = Box::new(move |dir: BuildDir, steplog: StepLog, cancel| {
            Box::pin(async move {
                write_step_config(&dir, &step_config, &heading)?;
                let mut config = config;
                // Each cache: a private writable copy for this step, released afterwards.
                let mut copies = Vec::new();
                for (name, target) in &caches {
                    match store.cache_checkout(name, user.uid, user.gid).await {
                        Ok(copy) => {
                            config.caches.push(CacheMount {
                                host: copy.path.clone(),
                                target: target.clone(),
                            });
                            copies.push(copy);
                        }
                        Err(e) => {
                            for c in copies {
                                let _ = store.cache_release(c, false).await;
                            }
                            return Err(StepError::from(e).into());
                        }
                    }
                }
                let t = crate::timing::phase("sandbox", &dir.id);
                let r =
                    run_with_timeout(&*sandbox, &config, &dir.rootfs, &steplog, &cancel, timeout)
                        .await;
                drop(t);
                // As OBuilder: a cache keeps what a step put in it even if the step failed
                // (downloads stay useful); a cancelled step's half-written copy is dropped.
                let keep = !matches!(r, Err(BuildError::Cancelled));
                for c in copies {
                    let name = c.name.clone();
                    if let Err(e) = store.cache_release(c, keep).await {
                        tracing::warn!("releasing cache {name:?}: {e}");
                    }
                }
                r
            })
        });
        self.policy
            .step(self.request(&id, Some(base), run), &run.pins, work)
            .await?;
        Ok(id)
    }

    async fn copy(
        &self,
        base: &str,
        c: &Copy,
        ctx: &Context,
        run: &Session<'_>,
    ) -> Result<Id, BuildError> {
        let user = self.user(&ctx.user)?;
        // From a stage: a read-only view of its result's whole tree, held until the step ends.
        let (src_dir, view) = match &c.from {
            DataSource::Context => (run.opts.src_dir.clone(), None),
            DataSource::Build(name) => {
                let (id, _) = ctx
                    .scope
                    .get(name)
                    .ok_or_else(|| StepError::Invalid(format!("Unknown build {name:?}")))?;
                if self
                    .policy
                    .store
                    .result(id)
                    .await
                    .map_err(StepError::from)?
                    .is_none()
                {
                    return Err(StepError::Invalid(format!("Build result {id:?} not found")).into());
                }
                let v = self
                    .policy
                    .store
                    .view_paths(id, &c.src)
                    .await
                    .map_err(StepError::from)?;
                (v.clone(), Some(v))
            }
        };
        let r = self.copy_from(base, c, ctx, run, src_dir, user).await;
        if let Some(v) = view {
            if let Err(e) = self.policy.store.release_view(&v).await {
                tracing::warn!("releasing the view {}: {e}", v.display());
            }
        }
        r
    }

    async fn copy_from(
        &self,
        base: &str,
        c: &Copy,
        ctx: &Context,
        run: &Session<'_>,
        src_dir: PathBuf,
        user: UserIds,
    ) -> Result<Id, BuildError> {
        let dst = join_workdir(&ctx.workdir, &c.dst);
        let (srcs, exclude, sd) = (c.src.clone(), c.exclude.clone(), src_dir.clone());
        let hash_t = crate::timing::phase("hash", base);
        let db = self.policy.db.clone();
        let op = tokio::task::spawn_blocking(move || {
            let abs = std::fs::canonicalize(&sd).unwrap_or_else(|_| sd.clone());
            let cache = DbHashCache {
                known: db
                    .file_hashes_under(&abs.to_string_lossy())
                    .unwrap_or_default(),
                db,
                new: Default::default(),
            };
            let items = srcs
                .iter()
                .map(|s| copy::manifest_cached(&sd, s, &exclude, &cache))
                .collect::<Result<Vec<_>, _>>()?;
            let new = std::mem::take(&mut *cache.new.lock().unwrap_or_else(|p| p.into_inner()));
            if let Err(e) = cache.db.put_file_hashes(&new) {
                tracing::warn!("cannot record context hashes (they will be computed again): {e}");
            }
            copy::copy_op(items, &dst)
        })
        .await
        .map_err(|_| StepError::Internal("the hashing thread panicked"))?
        .map_err(StepError::from)?;
        drop(hash_t);
        let input = CopyInput {
            base: base.to_string(),
            user: ctx.user.clone(),
            op: op.clone(),
        };
        let id = input.id();
        let sandbox = self.sandbox.clone();
        let (step_config, heading) = (ctx.config(), ctx.heading.clone());
        let work: Work = Box::new(move |dir: BuildDir, _log, _cancel| {
            Box::pin(async move {
                write_step_config(&dir, &step_config, &heading)?;
                let (root, op) = copy::map_dst(op, |dst| sandbox.copy_target(&dir.rootfs, dst))
                    .map_err(StepError::Sandbox)?;
                // Where the files went, for stores that apply the tree to an image (Docker):
                // the directories above it exist there already and must keep their owners.
                let (CopyOp::Item(_, dst) | CopyOp::Items(_, dst)) = &op;
                let p = dir.dir.join(COPY_DST);
                std::fs::write(&p, dst)
                    .map_err(|e| BuildError::from(StepError::io("cannot write", &p)(e)))?;
                tokio::task::spawn_blocking(move || {
                    copy::write_into(&root, &src_dir, &op, user.uid, user.gid)
                })
                .await
                .map_err(|_| StepError::Internal("the copying thread panicked"))?
                .map_err(|e| StepError::from(e).into())
            })
        });
        self.policy
            .step(self.request(&id, Some(base), run), &run.pins, work)
            .await?;
        Ok(id)
    }
}

/// Runs a step's command, stopping it after `timeout` if given.
async fn run_with_timeout(
    sandbox: &dyn Sandbox,
    config: &RunConfig,
    rootfs: &Path,
    log: &StepLog,
    cancel: &CancellationToken,
    timeout: Option<Duration>,
) -> Result<(), BuildError> {
    let Some(limit) = timeout else {
        return sandbox
            .run(config, rootfs, log, cancel)
            .await
            .map_err(sandbox_failure);
    };
    // A child token: the timeout stops this step only, and the caller's cancel still works.
    let stop = cancel.child_token();
    let running = sandbox.run(config, rootfs, log, &stop);
    tokio::pin!(running);
    tokio::select! {
        r = &mut running => r.map_err(sandbox_failure),
        _ = tokio::time::sleep(limit) => {
            stop.cancel();
            match running.await {
                Err(SandboxError::Cancelled) if !cancel.is_cancelled() => {
                    let cmd = crate::exec::Cmd::new(config.argv.clone()).display();
                    Err(StepError::TimedOut { cmd, secs: limit.as_secs() }.into())
                }
                r => r.map_err(sandbox_failure),
            }
        }
    }
}

/// Context-file hashes kept in the store's database, so that an unchanged build context is
/// stat-ed, not read, on the next build.
struct DbHashCache {
    db: Arc<crate::db::Db>,
    /// What the database has for the context directory, read in one query.
    known: HashMap<String, (String, String)>,
    new: std::sync::Mutex<Vec<(String, String, String)>>,
}

impl copy::HashCache for DbHashCache {
    fn get(&self, path: &Path, key: &str) -> Option<String> {
        match self.known.get(path.to_string_lossy().as_ref()) {
            Some((k, h)) if k == key => Some(h.clone()),
            _ => None,
        }
    }

    fn put(&self, path: &Path, key: &str, sha256: &str) {
        self.new.lock().unwrap_or_else(|p| p.into_inner()).push((
            path.to_string_lossy().into_owned(),
            key.to_string(),
            sha256.to_string(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workdir_joins_as_obuilder() {
        assert_eq!(join_workdir("/", "src"), "/src");
        assert_eq!(join_workdir("/a", "src"), "/a/src");
        assert_eq!(join_workdir("/a/", "src/"), "/a/src/");
        assert_eq!(join_workdir("/a", "/abs"), "/abs");
    }

    #[test]
    fn steps_are_counted_across_stages() {
        let spec = Spec::parse(
            "((build a ((from x) (run (shell a)) (copy (src f) (dst /f))))
              (from (build a)) (env A b) (run (shell b)) (copy (from (build a)) (src f) (dst /g)))",
        )
        .unwrap();
        assert_eq!(count_steps(&spec), 5);
    }
}
