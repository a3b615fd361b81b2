//! The builder: runs a spec step by step over any Store, Sandbox and Fetcher, with the
//! policy layer on top of the store.
//!
//! Policy (OBuilder's `Db_store`, with its known races closed):
//! * a result is recorded in the database (parent, children count, last use) when it is
//!   committed; failures are never cached (their log is still shown);
//! * identical steps in flight within the process run once: a second request attaches,
//!   replays the log from the start and follows it live; the step is cancelled only when its
//!   last waiter leaves; a request arriving while a step is being cancelled waits for that to
//!   finish and starts afresh;
//! * every id a running build has used or is building is *pinned*, and pruning never
//!   removes a pinned id (OBuilder #157/#176);
//! * at start-up the store removes half-done work and the database is reconciled with
//!   what is on disk.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use obuilder_spec::sexp::quote_if_needed;
use obuilder_spec::{Base, Copy, DataSource, Op, Run, Spec, User};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::copy;
use crate::db::{self, Db};
use crate::fetch::{Fetcher, ImageConfig};
use crate::key::{sha256_hex, CopyInput, Id, RunInput, SecretInput};
use crate::lock::{self, StepLock, StoreLock};
use crate::log::{LogEvent, LogSink, StepLog};
use crate::sandbox::{BindMount, RunConfig, Sandbox, SandboxError, SecretMount};
use crate::store::{BuildDir, Store};

/// Why a build did not produce a result. Cloneable: every waiter of a shared step gets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

fn fail(msg: impl std::fmt::Display) -> BuildError {
    BuildError::Failed(msg.to_string())
}

/// What the caller gives a build besides the spec.
#[derive(Clone)]
pub struct BuildOptions {
    /// The context directory `copy` reads from.
    pub src_dir: PathBuf,
    pub log: LogSink,
    /// Fires to stop the build: its steps are cancelled unless other builds share them.
    pub cancel: CancellationToken,
    /// Secret values by id (`--secret ID:FILE`).
    pub secrets: Vec<(String, Vec<u8>)>,
    /// Environment put before the image's (OBuilder's CLI passes none).
    pub env: Vec<(String, String)>,
}

impl BuildOptions {
    pub fn new(src_dir: impl Into<PathBuf>, log: LogSink) -> BuildOptions {
        BuildOptions {
            src_dir: src_dir.into(),
            log,
            cancel: CancellationToken::new(),
            secrets: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// Cache statistics since the builder started.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

type StepResult = Result<PathBuf, BuildError>;
type Env = Vec<(String, String)>;
type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
type Work = Box<
    dyn FnOnce(
            BuildDir,
            StepLog,
            CancellationToken,
        ) -> Pin<Box<dyn Future<Output = Result<(), BuildError>> + Send>>
        + Send,
>;

struct InFlight {
    base: Option<Id>,
    /// Waiters still interested; guarded by the in-flight map's lock.
    waiters: Mutex<usize>,
    cancel: CancellationToken,
    log: watch::Sender<Option<StepLog>>,
    result: watch::Sender<Option<StepResult>>,
}

#[derive(Default)]
struct Shared {
    inflight: HashMap<Id, Arc<InFlight>>,
    /// Ids pinned by running builds, with a count.
    pins: HashMap<Id, usize>,
}

/// Runs specs. Cheap to share (`Arc`) between many concurrent builds.
pub struct Builder {
    store: Arc<dyn Store>,
    sandbox: Arc<dyn Sandbox>,
    fetcher: Arc<dyn Fetcher>,
    db: Arc<Db>,
    shared: Arc<Mutex<Shared>>,
    pub stats: Stats,
    lock: StoreLock,
}

#[derive(Clone)]
struct Context {
    env: Vec<(String, String)>,
    user: User,
    workdir: String,
    shell: Vec<String>,
    /// Stages in scope: name → (result id, env).
    scope: HashMap<String, (Id, Vec<(String, String)>)>,
}

/// Pins held by one build; released when it ends.
struct Pins {
    shared: Arc<Mutex<Shared>>,
    ids: Mutex<Vec<Id>>,
    /// Cache hits, whose `used` time is recorded when the build ends.
    hits: Mutex<Vec<Id>>,
    /// Steps this build had to run (or attach to).
    misses: AtomicU64,
}

impl Pins {
    fn pin(&self, id: &str) {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        *s.pins.entry(id.to_string()).or_insert(0) += 1;
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
    }
}

impl Pins {
    fn hit(&self, id: &str) {
        self.hits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(id.to_string());
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        for id in self.ids.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            if let Some(n) = s.pins.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    s.pins.remove(&id);
                }
            }
        }
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
        Ok(b) => {
            serde_json::from_slice(&b).map_err(|e| fail(format!("corrupt {}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ImageConfig::default()),
        Err(e) => Err(fail(format!("cannot read {}: {e}", path.display()))),
    }
}

impl Builder {
    /// Opens the database in the store's state dir, recovers the store and the sandbox from
    /// any crash, and reconciles the database with the results on disk.
    pub async fn new(
        store: Arc<dyn Store>,
        sandbox: Arc<dyn Sandbox>,
        fetcher: Arc<dyn Fetcher>,
    ) -> Result<Builder, BuildError> {
        let state = store.state_dir();
        std::fs::create_dir_all(&state)
            .map_err(|e| fail(format!("cannot create {}: {e}", state.display())))?;
        let lock = StoreLock::open(&state)
            .map_err(|e| fail(format!("cannot open the store lock: {e}")))?;
        // Alone: whatever is half-done was left by a crash and can go. Not alone: it may be
        // another process's live work, so leave it.
        let alone = lock.try_exclusive();
        if alone {
            // Containers first: they may still run on a build dir the store is about to remove.
            sandbox
                .recover()
                .await
                .map_err(|e| fail(format!("cannot recover sandbox: {e}")))?;
            store
                .recover()
                .await
                .map_err(|e| fail(format!("cannot recover store {}: {e}", store.describe())))?;
        } else {
            tracing::info!(
                "another obuilder process uses {}; sharing it",
                store.describe()
            );
        }
        let db_dir = state.join("db");
        std::fs::create_dir_all(&db_dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", db_dir.display())))?;
        let db = Db::open(&db_dir.join("db.sqlite")).map_err(fail)?;
        let b = Builder {
            store,
            sandbox,
            fetcher,
            db: Arc::new(db),
            shared: Arc::default(),
            stats: Stats::default(),
            lock,
        };
        // Markers left by processes that died: only then is the O(results) reconciliation
        // of the database with the disk needed.
        if alone {
            let dead = lock::markers(&state);
            if !dead.is_empty() {
                b.reconcile().await?;
                for m in dead {
                    let _ = std::fs::remove_file(m);
                }
            }
        }
        b.lock
            .shared()
            .await
            .map_err(|e| fail(format!("cannot lock {}: {e}", b.lock.path().display())))?;
        // Written only while holding the lock: a process that is alone (exclusive) can then
        // never mistake a starting process's marker for a dead one's.
        let marker = lock::marker(&state);
        std::fs::create_dir_all(state.join("open"))
            .map_err(|e| fail(format!("cannot create {}: {e}", state.display())))?;
        std::fs::write(&marker, b"")
            .map_err(|e| fail(format!("cannot write {}: {e}", marker.display())))?;
        Ok(b)
    }

    /// Makes the database agree with the store: results on disk that the database lacks
    /// (a crash between commit and insert) are added; rows whose result is gone are dropped,
    /// dependants first.
    async fn reconcile(&self) -> Result<(), BuildError> {
        let on_disk: std::collections::HashSet<Id> =
            self.store.list().await.map_err(fail)?.into_iter().collect();
        let rows = self.db.all().map_err(fail)?;
        let known: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let now = db::now();
        for id in &on_disk {
            if !known.contains(id.as_str()) {
                tracing::info!("adding result {id} found on disk to the database");
                self.db.add(id, None, &now).map_err(fail)?;
            }
        }
        let mut missing: Vec<&str> = rows
            .iter()
            .map(|r| r.id.as_str())
            .filter(|id| !on_disk.contains(*id))
            .collect();
        while !missing.is_empty() {
            let before = missing.len();
            let mut left = Vec::new();
            for id in missing {
                if self.db.children(id).map_err(fail)?.is_empty() {
                    tracing::info!("dropping database row {id}: its result is gone");
                    self.db.delete(id).map_err(fail)?;
                } else {
                    left.push(id);
                }
            }
            if left.len() == before {
                break; // rows with children that exist on disk: keep them
            }
            missing = left;
        }
        Ok(())
    }

    /// Takes the store for this process alone (no other obuilder process may use it until
    /// this one exits), as CLI pruning and deletion need; false if another process uses it.
    pub fn try_exclusive(&self) -> bool {
        self.lock.try_exclusive()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Builds `spec`; returns the id of its last step.
    pub async fn build(&self, spec: &Spec, opts: &BuildOptions) -> Result<Id, BuildError> {
        spec.validate().map_err(fail)?;
        // Every secret the spec asks for must be given, before anything runs.
        let mut missing = Vec::new();
        secrets_wanted(spec, &mut |id| {
            if !opts.secrets.iter().any(|(s, _)| s == id) && !missing.iter().any(|m| m == id) {
                missing.push(id.to_string());
            }
        });
        if !missing.is_empty() {
            return Err(fail(format!(
                "the spec needs secret(s) {} that were not given; pass each with --secret ID:FILE",
                missing
                    .iter()
                    .map(|m| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let ctx = Context {
            env: opts.env.clone(),
            user: User::ROOT,
            workdir: "/".into(),
            shell: self.sandbox.default_shell(),
            scope: HashMap::new(),
        };
        let pins = Pins {
            shared: self.shared.clone(),
            ids: Mutex::default(),
            hits: Mutex::default(),
            misses: AtomicU64::new(0),
        };
        let r = self.stage(spec, ctx, opts, &pins).await.map(|(id, _)| id);
        // One write for all of this build's cache hits, not one per step.
        let hits = std::mem::take(&mut *pins.hits.lock().unwrap_or_else(|p| p.into_inner()));
        let misses = pins.misses.load(Ordering::Relaxed) as i64;
        if let Err(e) = self.db.touch(&hits, &db::now(), hits.len() as i64, misses) {
            tracing::warn!("cannot record cache hits: {e}");
        }
        r
    }

    fn stage<'a>(
        &'a self,
        spec: &'a Spec,
        initial: Context,
        opts: &'a BuildOptions,
        pins: &'a Pins,
    ) -> BoxFuture<'a, Result<(Id, Env), BuildError>> {
        Box::pin(async move {
            let log = &opts.log;
            let mut scope = initial.scope.clone();
            for (name, child) in &spec.child_builds {
                log(&LogEvent::Heading(format!("(build {name:?} ...)")));
                let child_ctx = Context {
                    scope: scope.clone(),
                    ..initial.clone()
                };
                let (id, env) = self.stage(child, child_ctx, opts, pins).await?;
                log(&LogEvent::Note(format!("--> finished {name:?}")));
                scope.insert(name.clone(), (id, env));
            }
            let (mut base, env) = match &spec.from {
                Base::Image(image) => {
                    let (id, image_env) = self.base(image, opts, pins).await?;
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
                        .ok_or_else(|| fail(format!("unknown build {name:?}")))?
                }
            };
            let mut ctx = Context {
                scope,
                env,
                ..initial
            };
            for op in &spec.ops {
                let heading = format!("{}: {}", ctx.workdir, op.to_sexp().to_hum());
                log(&LogEvent::Heading(heading.clone()));
                let in_step = |e: BuildError| match e {
                    BuildError::Failed(m) => fail(format!("{m}\n  in step {heading}")),
                    c => c,
                };
                match op {
                    Op::Comment(_) => {}
                    Op::Workdir(dir) => {
                        ctx.workdir = if dir.starts_with('/') {
                            dir.clone()
                        } else if ctx.workdir.ends_with('/') {
                            format!("{}{dir}", ctx.workdir)
                        } else {
                            format!("{}/{dir}", ctx.workdir)
                        };
                    }
                    Op::User(u) => ctx.user = u.clone(),
                    Op::Shell(s) => ctx.shell = s.clone(),
                    Op::Env(k, v) => {
                        // OBuilder: drop the first binding of k, put the new one first.
                        if let Some(i) = ctx.env.iter().position(|(ek, _)| ek == k) {
                            ctx.env.remove(i);
                        }
                        ctx.env.insert(0, (k.clone(), v.clone()));
                    }
                    Op::Run(run) => {
                        base = self
                            .run(&base, run, &ctx, opts, pins)
                            .await
                            .map_err(in_step)?
                    }
                    Op::Copy(c) => {
                        base = self
                            .copy(&base, c, &ctx, opts, pins)
                            .await
                            .map_err(in_step)?
                    }
                }
            }
            Ok((base, ctx.env))
        })
    }

    async fn base(
        &self,
        image: &str,
        opts: &BuildOptions,
        pins: &Pins,
    ) -> Result<(Id, Vec<(String, String)>), BuildError> {
        let log = &opts.log;
        log(&LogEvent::Heading(format!(
            "(from {})",
            quote_if_needed(image)
        )));
        let resolved = self.fetcher.resolve(image, log).await.map_err(fail)?;
        let id = resolved.base_id();
        let fetcher = self.fetcher.clone();
        let work: Work = Box::new(move |dir: BuildDir, steplog: StepLog, _cancel| {
            Box::pin(async move {
                // The fetcher's notes (downloads, extraction) go into the base step's own log,
                // so every waiter sees them live and the saved log keeps them.
                let sink: LogSink = Arc::new(move |e: &LogEvent| {
                    let _ = match e {
                        LogEvent::Heading(t) | LogEvent::Note(t) => {
                            steplog.write(format!("{t}\n").as_bytes())
                        }
                        LogEvent::Output(b) => steplog.write(b),
                    };
                });
                let _t = crate::timing::phase("fetch", &dir.id);
                let config = fetcher
                    .fetch(&resolved, &dir.rootfs, &sink)
                    .await
                    .map_err(fail)?;
                let json = serde_json::to_vec_pretty(&config).map_err(fail)?;
                let write = |name: &str, data: &[u8]| {
                    std::fs::write(dir.dir.join(name), data)
                        .map_err(|e| fail(format!("cannot write {name}: {e}")))
                };
                write("image.json", &json)?;
                write("env", env_file_text(&config.env).as_bytes())?;
                Ok(())
            })
        });
        let path = self.step(&id, None, opts, pins, work).await?;
        let config = read_image_config(&path)?;
        Ok((id, config.env))
    }

    async fn run(
        &self,
        base: &str,
        run: &Run,
        ctx: &Context,
        opts: &BuildOptions,
        pins: &Pins,
    ) -> Result<Id, BuildError> {
        let (uid, gid) = match &ctx.user {
            User::Unix { uid, gid } => (*uid, *gid),
            User::Name(n) => {
                return Err(fail(format!(
                    "user {n:?}: this sandbox runs numeric users only; use (user (uid N) (gid N))"
                )))
            }
        };
        let mut secrets = Vec::new();
        let mut secret_inputs = Vec::new();
        for s in &run.secrets {
            let value = opts
                .secrets
                .iter()
                .find(|(id, _)| *id == s.id)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| fail(format!("Couldn't find value for requested secret '{}' (pass it with --secret {}:FILE)", s.id, s.id)))?;
            // The key takes a digest of the value, never the value itself.
            secret_inputs.push(SecretInput {
                value: format!("sha256:{}", sha256_hex(&value)),
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
            cmd: run.shell.clone(),
            shell: ctx.shell.clone(),
            network: run.network.clone(),
            mount_secrets: secret_inputs,
        };
        let id = input.id();
        let mut argv = ctx.shell.clone();
        argv.push(run.shell.clone());
        let config = RunConfig {
            argv,
            env: ctx.env.clone(),
            cwd: ctx.workdir.clone(),
            uid,
            gid,
            hostname: "builder".into(),
            network: run.network.clone(),
            mounts: Vec::new(),
            secrets,
        };
        let sandbox = self.sandbox.clone();
        let store = self.store.clone();
        let caches: Vec<(String, String)> = run
            .cache
            .iter()
            .map(|c| (c.id.clone(), c.target.clone()))
            .collect();
        let work: Work = Box::new(move |dir: BuildDir, steplog: StepLog, cancel| {
            Box::pin(async move {
                let mut config = config;
                // Each cache: a private writable copy for this step, released afterwards.
                let mut copies = Vec::new();
                for (name, target) in &caches {
                    match store.cache_checkout(name, uid, gid).await {
                        Ok(copy) => {
                            config.mounts.push(BindMount {
                                src: copy.path.clone(),
                                dst: target.clone(),
                                readonly: false,
                            });
                            copies.push(copy);
                        }
                        Err(e) => {
                            for c in copies {
                                let _ = store.cache_release(c, false).await;
                            }
                            return Err(fail(format!("cannot check out cache {name:?}: {e}")));
                        }
                    }
                }
                let t = crate::timing::phase("sandbox", &dir.id);
                let r = match sandbox.run(&config, &dir.rootfs, &steplog, &cancel).await {
                    Ok(()) => Ok(()),
                    Err(SandboxError::Cancelled) => Err(BuildError::Cancelled),
                    Err(e) => Err(fail(e)),
                };
                drop(t);
                // As OBuilder: a cache keeps what a step put in it even if the step failed
                // (downloads stay useful); a cancelled step's half-written copy is dropped.
                let keep = r != Err(BuildError::Cancelled);
                for c in copies {
                    let name = c.name.clone();
                    if let Err(e) = store.cache_release(c, keep).await {
                        tracing::warn!("releasing cache {name:?}: {e}");
                    }
                }
                r
            })
        });
        self.step(&id, Some(base), opts, pins, work).await?;
        Ok(id)
    }

    async fn copy(
        &self,
        base: &str,
        c: &Copy,
        ctx: &Context,
        opts: &BuildOptions,
        pins: &Pins,
    ) -> Result<Id, BuildError> {
        let (uid, gid) = match &ctx.user {
            User::Unix { uid, gid } => (*uid, *gid),
            User::Name(n) => {
                return Err(fail(format!("user {n:?}: copy needs a numeric user here")))
            }
        };
        // From a stage: a read-only view of its result's whole tree, held until the step ends.
        let (src_dir, view) = match &c.from {
            DataSource::Context => (opts.src_dir.clone(), None),
            DataSource::Build(name) => {
                let (id, _) = ctx
                    .scope
                    .get(name)
                    .ok_or_else(|| fail(format!("Unknown build {name:?}")))?;
                if self.store.result(id).await.map_err(fail)?.is_none() {
                    return Err(fail(format!("Build result {id:?} not found")));
                }
                let v = self.store.view(id).await.map_err(fail)?;
                (v.clone(), Some(v))
            }
        };
        let r = self
            .copy_from(base, c, ctx, opts, pins, src_dir, uid, gid)
            .await;
        if let Some(v) = view {
            if let Err(e) = self.store.release_view(&v).await {
                tracing::warn!("releasing the view {}: {e}", v.display());
            }
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy_from(
        &self,
        base: &str,
        c: &Copy,
        ctx: &Context,
        opts: &BuildOptions,
        pins: &Pins,
        src_dir: PathBuf,
        uid: u32,
        gid: u32,
    ) -> Result<Id, BuildError> {
        let dst = if c.dst.starts_with('/') {
            c.dst.clone()
        } else if ctx.workdir.ends_with('/') {
            format!("{}{}", ctx.workdir, c.dst)
        } else {
            format!("{}/{}", ctx.workdir, c.dst)
        };
        let (srcs, exclude, sd) = (c.src.clone(), c.exclude.clone(), src_dir.clone());
        let hash_t = crate::timing::phase("hash", base);
        let db = self.db.clone();
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
        .map_err(fail)?
        .map_err(fail)?;
        drop(hash_t);
        let input = CopyInput {
            base: base.to_string(),
            user: ctx.user.clone(),
            op: op.clone(),
        };
        let id = input.id();
        let work: Work = Box::new(move |dir: BuildDir, _log, _cancel| {
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    copy::write_into(&dir.rootfs, &src_dir, &op, uid, gid)
                })
                .await
                .map_err(fail)?
                .map_err(fail)
            })
        });
        self.step(&id, Some(base), opts, pins, work).await?;
        Ok(id)
    }

    /// Gets result `id`: from the store, by attaching to the same step in flight, or by
    /// running `work` on a fresh build dir. Emits the step's output and a note.
    async fn step(
        &self,
        id: &str,
        base: Option<&str>,
        opts: &BuildOptions,
        pins: &Pins,
        work: Work,
    ) -> StepResult {
        pins.pin(id);
        let log = &opts.log;
        let mut work = Some(work);
        loop {
            let existing = {
                let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                s.inflight.get(id).cloned()
            };
            if let Some(inf) = existing {
                if inf.cancel.is_cancelled() {
                    log(&LogEvent::Note(
                        "Waiting for previous build to finish cancelling".into(),
                    ));
                    let mut rx = inf.result.subscribe();
                    let _ = rx.wait_for(Option::is_some).await;
                    continue;
                }
                if self.attach(id, &inf) {
                    pins.misses.fetch_add(1, Ordering::Relaxed);
                    return self.wait(id, inf, opts).await;
                }
                continue;
            }
            if let Some(path) = self.store.result(id).await.map_err(fail)? {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                pins.hit(id);
                let replay = StepLog::open_finished(&path.join("log")).map_err(fail)?;
                replay
                    .follow(|b| log(&LogEvent::Output(b.to_vec())))
                    .await
                    .map_err(fail)?;
                log(&LogEvent::Note(format!("---> using {id:?} from cache")));
                return Ok(path);
            }
            let inf = {
                let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                if s.inflight.contains_key(id) {
                    continue; // someone started it meanwhile: attach to theirs
                }
                let inf = Arc::new(InFlight {
                    base: base.map(str::to_string),
                    waiters: Mutex::new(1),
                    cancel: CancellationToken::new(),
                    log: watch::channel(None).0,
                    result: watch::channel(None).0,
                });
                s.inflight.insert(id.to_string(), inf.clone());
                inf
            };
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            pins.misses.fetch_add(1, Ordering::Relaxed);
            let task = BuildTask {
                store: self.store.clone(),
                db: self.db.clone(),
                shared: self.shared.clone(),
                id: id.to_string(),
                base: base.map(str::to_string),
                inf: inf.clone(),
            };
            let work = work
                .take()
                .ok_or_else(|| fail("internal error: step work used twice"))?;
            tokio::spawn(task.run(work));
            return self.wait(id, inf, opts).await;
        }
    }

    /// Counts one more waiter, unless the build is already being cancelled.
    fn attach(&self, id: &str, inf: &Arc<InFlight>) -> bool {
        let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if !s.inflight.get(id).is_some_and(|i| Arc::ptr_eq(i, inf)) || inf.cancel.is_cancelled() {
            return false;
        }
        *inf.waiters.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        true
    }

    /// Follows an in-flight step's log and waits for its result; leaving early (our cancel
    /// fired) uncounts us and cancels the step if we were its last waiter.
    async fn wait(&self, id: &str, inf: Arc<InFlight>, opts: &BuildOptions) -> StepResult {
        let log = opts.log.clone();
        let follow = {
            let inf = inf.clone();
            async move {
                let mut rx = inf.log.subscribe();
                let steplog = match rx.wait_for(Option::is_some).await {
                    Ok(l) => l.clone(),
                    Err(_) => None,
                };
                if let Some(l) = steplog {
                    let _ = l.follow(|b| log(&LogEvent::Output(b.to_vec()))).await;
                }
            }
        };
        let result = {
            let inf = inf.clone();
            async move {
                let mut rx = inf.result.subscribe();
                let r = rx.wait_for(Option::is_some).await.map(|r| r.clone());
                match r {
                    Ok(Some(r)) => r,
                    _ => Err(fail("internal error: build task ended without a result")),
                }
            }
        };
        let both = async { tokio::join!(follow, result).1 };
        tokio::select! {
            r = both => {
                if r.is_ok() {
                    (opts.log)(&LogEvent::Note(format!("---> saved as {id:?}")));
                }
                r
            }
            _ = opts.cancel.cancelled() => {
                let _s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                let mut w = inf.waiters.lock().unwrap_or_else(|p| p.into_inner());
                *w -= 1;
                if *w == 0 {
                    inf.cancel.cancel();
                }
                Err(BuildError::Cancelled)
            }
        }
    }

    /// Removes least-recently-used leaves, a few at a time, until the store's filesystem has
    /// `percent` free (or nothing more can go). Deletes on btrfs free their space lazily, so
    /// after each batch it waits for them (`Store::complete_deletes`, bounded).
    pub async fn prune_until_free(&self, percent: f64, log: &LogSink) -> Result<usize, BuildError> {
        let mut removed = 0;
        loop {
            let usage = self.store.df().await.map_err(fail)?;
            if usage.free_percent() >= percent {
                break;
            }
            let n = self.prune("9999-12-31 23:59:59.999", 8, log).await?;
            if n == 0 {
                log(&LogEvent::Note(format!(
                    "{:.1}% free, short of {percent}%, and nothing more can be pruned",
                    usage.free_percent()
                )));
                break;
            }
            removed += n;
            self.store.complete_deletes().await.map_err(fail)?;
        }
        Ok(removed)
    }

    /// Waits until no step is in flight, e.g. after a cancellation, so that every container
    /// is killed and every build dir discarded before the process exits.
    pub async fn wait_idle(&self) {
        loop {
            if self
                .shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .inflight
                .is_empty()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Deletes `id` and everything built on it (children first), logging each removal.
    pub async fn delete(&self, id: &str, log: &LogSink) -> Result<usize, BuildError> {
        let mut n = 0;
        for child in self.db.children(id).map_err(fail)? {
            n += Box::pin(self.delete(&child, log)).await?;
        }
        log(&LogEvent::Note(format!("Removing {id}")));
        self.store.delete(id).await.map_err(fail)?;
        self.db.delete(id).map_err(fail)?;
        Ok(n + 1)
    }

    /// Removes up to `limit` least-recently-used leaves last used before `before` (database
    /// time text), one at a time, never one that a running build has pinned or builds on.
    /// Returns at once; the space may come back later on stores that free it lazily (see
    /// `Store::complete_deletes`).
    pub async fn prune(
        &self,
        before: &str,
        limit: usize,
        log: &LogSink,
    ) -> Result<usize, BuildError> {
        let mut removed = 0;
        while removed < limit {
            let candidates = self
                .db
                .lru(
                    before,
                    limit.saturating_sub(removed).saturating_add(16).min(1024),
                )
                .map_err(fail)?;
            let victim = {
                let s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                candidates.into_iter().find(|id| {
                    !s.pins.contains_key(id)
                        && !s.inflight.contains_key(id)
                        && !s.inflight.values().any(|i| i.base.as_deref() == Some(id))
                })
            };
            let Some(id) = victim else { break };
            log(&LogEvent::Note(format!("Removing {id}")));
            self.store.delete(&id).await.map_err(fail)?;
            self.db.delete(&id).map_err(fail)?;
            removed += 1;
        }
        Ok(removed)
    }
}

impl Drop for Builder {
    /// A clean exit: no reconciliation is needed on this process's account.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(lock::marker(&self.store.state_dir()));
    }
}

/// The detached task that runs one step's work, so that the step outlives any one waiter.
struct BuildTask {
    store: Arc<dyn Store>,
    db: Arc<Db>,
    shared: Arc<Mutex<Shared>>,
    id: Id,
    base: Option<Id>,
    inf: Arc<InFlight>,
}

impl BuildTask {
    async fn run(self, work: Work) {
        let span = tracing::info_span!("step", id = %self.id);
        let _e = span.enter();
        let r = self.build(work).await;
        // Publish the log (if the build died before making one) so followers end.
        self.inf.log.send_if_modified(|l| {
            if l.is_none() {
                let empty = StepLog::open_finished(Path::new("/dev/null")).ok();
                *l = empty;
                true
            } else {
                false
            }
        });
        {
            let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            if s.inflight
                .get(&self.id)
                .is_some_and(|i| Arc::ptr_eq(i, &self.inf))
            {
                s.inflight.remove(&self.id);
            }
        }
        let _ = self.inf.result.send(Some(r));
    }

    async fn commit_timed(&self, dir: &BuildDir) -> Result<PathBuf, crate::store::StoreError> {
        let _t = crate::timing::phase("publish", &self.id);
        self.store.commit(dir).await
    }

    async fn build(&self, work: Work) -> StepResult {
        // Another process, or a build that finished just now, may have made it.
        if let Some(p) = self.store.result(&self.id).await.map_err(fail)? {
            return Ok(p);
        }
        // Another obuilder process may be building the same step: wait for it, then take
        // its result.
        let inf = self.inf.clone();
        let id = self.id.clone();
        let _step_lock = StepLock::acquire(
            &self.store.state_dir(),
            &self.id,
            || inf.cancel.is_cancelled(),
            || {
                tracing::info!("waiting for another obuilder process building {id}");
            },
        )
        .await
        .map_err(|e| fail(format!("cannot lock step {}: {e}", self.id)))?
        .ok_or(BuildError::Cancelled)?;
        if let Some(p) = self.store.result(&self.id).await.map_err(fail)? {
            return Ok(p);
        }
        let snap_t = crate::timing::phase("snapshot", &self.id);
        let dir = self
            .store
            .prepare(&self.id, self.base.as_deref())
            .await
            .map_err(|e| fail(format!("cannot prepare a snapshot for {}: {e}", self.id)))?;
        drop(snap_t);
        let steplog = match StepLog::create(&dir.dir.join("log")) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.store.discard(&dir).await;
                return Err(fail(format!(
                    "cannot create the log in {}: {e}",
                    dir.dir.display()
                )));
            }
        };
        self.inf.log.send_replace(Some(steplog.clone()));
        let r = if self.inf.cancel.is_cancelled() {
            Err(BuildError::Cancelled)
        } else {
            work(dir.clone(), steplog.clone(), self.inf.cancel.clone()).await
        };
        steplog.finish();
        match r {
            Ok(()) => match self.commit_timed(&dir).await {
                Ok(path) => {
                    self.db
                        .add(&self.id, self.base.as_deref(), &db::now())
                        .map_err(fail)?;
                    Ok(path)
                }
                Err(e) => {
                    let cleanup = self.store.discard(&dir).await.err();
                    Err(fail(match cleanup {
                        None => format!("cannot save result {}: {e}", self.id),
                        Some(c) => format!(
                            "cannot save result {}: {e} (and cleaning up failed too: {c})",
                            self.id
                        ),
                    }))
                }
            },
            Err(e) => {
                if let Err(c) = self.store.discard(&dir).await {
                    tracing::warn!("discarding failed build {}: {c}", self.id);
                    return Err(match e {
                        BuildError::Cancelled => BuildError::Cancelled,
                        BuildError::Failed(m) => {
                            fail(format!("{m} (and cleaning up failed too: {c})"))
                        }
                    });
                }
                Err(e)
            }
        }
    }
}

/// Context-file hashes kept in the store's database, so that an unchanged build context is
/// stat-ed, not read, on the next build.
struct DbHashCache {
    db: Arc<Db>,
    /// What the database has for the context directory, read in one query.
    known: std::collections::HashMap<String, (String, String)>,
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
