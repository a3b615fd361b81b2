//! The policy layer over any [`Store`] (OBuilder's `Db_store`, with its known races closed):
//!
//! * a result is recorded in the database (parent, children count, last use) when it is
//!   committed; failures are never cached (their log is still shown);
//! * identical steps in flight within the process run once: a second request attaches,
//!   replays the log from the start and follows it live; the step is cancelled only when its
//!   last waiter leaves; a request arriving while a step is being cancelled waits for that to
//!   finish and starts afresh;
//! * across processes sharing the store, a step is built under its own lock; a
//!   process that waits says for whom, and replays that process's log afterwards;
//! * every id a running build has used or is building is *pinned*, and pruning never
//!   removes a pinned id (OBuilder #157/#176);
//! * at start-up the store removes half-done work and the database is reconciled with
//!   what is on disk; under a step's lock, a build dir left by a dead builder is removed.
//!
//! The step semantics (`crate::build`) hand over to this module in one place:
//! [`Policy::step`], with the step's id, its base and the work that makes it.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::db::{self, Db};
use crate::error::{BuildError, StepError};
use crate::key::Id;
use crate::lock::{self, StepLock, StoreLock};
use crate::log::{human_bytes, LogEvent, LogOptions, LogSink, StepLog};
use crate::sandbox::Sandbox;
use crate::store::{BuildDir, Store};

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What makes a step's result, given a fresh build dir, its log and its cancellation.
pub(crate) type Work = Box<
    dyn FnOnce(BuildDir, StepLog, CancellationToken) -> BoxFuture<'static, Result<(), BuildError>>
        + Send,
>;

/// A step's result: where it is.
pub(crate) type StepResult = Result<PathBuf, BuildError>;

/// Below this much free space a store counts as full: a step that leaves less behind is
/// not saved (what it wrote may be cut short), and no step starts.
pub const MIN_FREE_BYTES: u64 = 1 << 20;

/// How a finished in-flight step came to be.
#[derive(Clone)]
struct Done {
    result: StepResult,
    /// Another obuilder process built it (its pid, if known) while this one waited.
    by_other: Option<Option<u32>>,
}

struct InFlight {
    base: Option<Id>,
    /// Waiters still interested; guarded by the in-flight map's lock.
    waiters: Mutex<usize>,
    cancel: CancellationToken,
    log: watch::Sender<Option<StepLog>>,
    /// The process this step waits for, while another process builds it.
    waiting_for: watch::Sender<Option<u32>>,
    result: watch::Sender<Option<Done>>,
}

#[derive(Default)]
struct Shared {
    inflight: HashMap<Id, Arc<InFlight>>,
    /// Ids pinned by running builds, with a count.
    pins: HashMap<Id, usize>,
}

/// Cache statistics, persisted in the store's database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

/// What the database knows of a result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResultInfo {
    pub id: Id,
    pub parent: Option<Id>,
    pub created: String,
    pub used: String,
    /// Results built on it.
    pub children: u64,
}

/// A step in flight in this process, for status reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InFlightStep {
    pub id: Id,
    pub waiters: usize,
}

/// Pins held by one build; released when it ends.
pub(crate) struct Pins {
    shared: Arc<Mutex<Shared>>,
    ids: Mutex<Vec<Id>>,
    /// Cache hits, whose `used` time is recorded when the build ends.
    hits: Mutex<Vec<Id>>,
    /// Steps this build had to run (or attach to).
    misses: AtomicU64,
}

impl Pins {
    fn pin(&self, id: &str) {
        let mut s = lock(&self.shared);
        *s.pins.entry(id.to_string()).or_insert(0) += 1;
        lock(&self.ids).push(id.to_string());
    }

    fn hit(&self, id: &str) {
        lock(&self.hits).push(id.to_string());
    }

    /// How many cache hits this build has had.
    pub(crate) fn hit_count(&self) -> usize {
        lock(&self.hits).len()
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        for id in lock(&self.ids).drain(..) {
            if let Some(n) = s.pins.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    s.pins.remove(&id);
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The policy layer: one per open store.
pub(crate) struct Policy {
    pub(crate) store: Arc<dyn Store>,
    sandbox: Arc<dyn Sandbox>,
    pub(crate) db: Arc<Db>,
    /// The database is opened on a thread of its own at the first step that runs.
    prefetching: std::sync::Once,
    shared: Arc<Mutex<Shared>>,
    lock: StoreLock,
    max_log_bytes: u64,
}

/// A step to get: its id, its base, the log options of the build asking for it.
pub(crate) struct StepRequest<'a> {
    pub id: &'a str,
    pub base: Option<&'a str>,
    pub log: &'a LogSink,
    pub cancel: &'a CancellationToken,
    /// Values to mask in the step's log (the build's secrets).
    pub masked: &'a [Vec<u8>],
    /// If the step fails, keep its tree as result [`kept_id`] (`build --keep-failed`).
    pub keep_failed: bool,
}

/// The id under which a failed step's tree is kept (`build --keep-failed`): derived from
/// the step's id, so a later failure of the same step replaces it, and never a step's id.
pub fn kept_id(id: &str) -> Id {
    crate::key::sha256_hex(format!("obuilder-kept-failed-v1\0{id}").as_bytes())
}

fn io(what: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> BuildError + use<> {
    let f = StepError::io(what, p.to_path_buf());
    move |e| f(e).into()
}

impl Policy {
    /// Opens the database in the store's state dir. If this process is the store's only
    /// user, recovers the sandbox and then the store from any crash and reconciles the
    /// database with the results on disk; otherwise leaves the others' work alone.
    pub(crate) async fn open(
        store: Arc<dyn Store>,
        sandbox: Arc<dyn Sandbox>,
        max_log_bytes: u64,
    ) -> Result<Policy, BuildError> {
        store.ready_state().await.map_err(StepError::from)?;
        let state = store.state_dir();
        std::fs::create_dir_all(&state).map_err(io("cannot create", &state))?;
        let lock = StoreLock::open(&state).map_err(io("cannot open the store lock in", &state))?;
        // Alone: whatever is half-done was left by a crash and can go. Not alone: it may be
        // another process's live work, so leave it.
        let alone = lock.try_exclusive();
        if alone {
            // Containers first: they may still run on a build dir the store is about to remove.
            sandbox.recover().await.map_err(StepError::from)?;
            store.recover().await.map_err(StepError::from)?;
        } else {
            tracing::info!(
                "another obuilder process uses {}; sharing it",
                store.describe()
            );
        }
        let db_dir = state.join("db");
        std::fs::create_dir_all(&db_dir).map_err(io("cannot create", &db_dir))?;
        let db_path = db_dir.join("db.sqlite");
        // Markers left by processes that died: the database may need checking (it is
        // written without waiting for the disk) and reconciling with the disk.
        let dead = if alone {
            lock::markers(&state)
        } else {
            Vec::new()
        };
        // A database that every earlier process closed cleanly is opened at its first use
        // (a fully cached build never needs it; see `Db::lazy`); one that a dead process
        // may have left damaged, one missing, or one that does not start as SQLite's do is
        // opened now, to be checked and, if need be, rebuilt from the store.
        let damaged = db::damaged_marker(&db_path);
        let suspect = !dead.is_empty() || (alone && damaged.exists());
        let eager = suspect || !db::looks_like_sqlite(&db_path);
        let db = if !eager {
            Db::lazy(&db_path)
        } else {
            match Db::open(&db_path) {
                Ok(db) if !suspect || db.check().unwrap_or(false) => db,
                Ok(_) => Self::rebuild(&db_path)?,
                Err(e) if alone && db::is_corrupt(&e) => Self::rebuild(&db_path)?,
                Err(e) => return Err(StepError::from(e).into()),
            }
        };
        let p = Policy {
            store,
            sandbox,
            db: Arc::new(db),
            shared: Arc::default(),
            lock,
            max_log_bytes,
            prefetching: std::sync::Once::new(),
        };
        // Only after a crash is the O(results) reconciliation of the database with the
        // disk needed (a rebuilt or new database has just been filled from it).
        let rebuilt = eager && p.db.count().map(|n| n == 0).unwrap_or(false);
        if !dead.is_empty() || rebuilt {
            p.reconcile().await?;
        }
        if alone {
            let _ = std::fs::remove_file(&damaged);
        }
        if !dead.is_empty() {
            // Alone after a crash: the dead process's step lock files are left over.
            lock::clear_step_locks(&state);
        }
        for m in dead {
            let _ = std::fs::remove_file(m);
        }
        p.lock
            .shared()
            .await
            .map_err(io("cannot lock", p.lock.path()))?;
        // Written only while holding the lock: a process that is alone (exclusive) can then
        // never mistake a starting process's marker for a dead one's.
        let marker = lock::marker(&state);
        let open = state.join("open");
        std::fs::create_dir_all(&open).map_err(io("cannot create", &open))?;
        std::fs::write(&marker, b"").map_err(io("cannot write", &marker))?;
        Ok(p)
    }

    pub(crate) fn pins(&self) -> Pins {
        Pins {
            shared: self.shared.clone(),
            ids: Mutex::default(),
            hits: Mutex::default(),
            misses: AtomicU64::new(0),
        }
    }

    /// Records a finished build's cache hits and misses (one write for all of them).
    pub(crate) fn record(&self, pins: &Pins) {
        let hits = std::mem::take(&mut *lock(&pins.hits));
        let misses = pins.misses.load(Ordering::Relaxed) as i64;
        if let Err(e) = self.db.touch(&hits, &db::now(), hits.len() as i64, misses) {
            tracing::warn!("cannot record cache hits: {e}");
        }
    }

    /// Sets a damaged database aside and starts a new one (filled by `reconcile`).
    fn rebuild(path: &Path) -> Result<Db, BuildError> {
        let aside = db::set_aside(path).map_err(io("cannot set aside", path))?;
        tracing::warn!(
            "the store's database was damaged (a crash of the machine?); kept it as {} and \
             rebuilding it from the results on disk",
            aside.display()
        );
        Ok(Db::open(path).map_err(StepError::from)?)
    }

    /// Makes the database agree with the store: results on disk that the database lacks
    /// (a crash between commit and insert, or a rebuilt database) are added with the
    /// parent their `parent` file names, parents first; rows whose result is gone are
    /// dropped, dependants first.
    async fn reconcile(&self) -> Result<(), BuildError> {
        let on_disk: std::collections::HashSet<Id> = self
            .store
            .list()
            .await
            .map_err(StepError::from)?
            .into_iter()
            .collect();
        let rows = self.db.all().map_err(StepError::from)?;
        let known: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let now = db::now();
        let mut parents = HashMap::new();
        for id in on_disk.iter().filter(|id| !known.contains(id.as_str())) {
            let parent = match self.store.result(id).await.map_err(StepError::from)? {
                Some(dir) => std::fs::read_to_string(dir.join("parent"))
                    .ok()
                    .map(|p| p.trim().to_string())
                    .filter(|p| on_disk.contains(p)),
                None => None,
            };
            parents.insert(id.clone(), parent);
        }
        // Parents before children: add whatever has no parent left to add, repeatedly.
        let mut added = std::collections::HashSet::new();
        while !parents.is_empty() {
            let ready: Vec<Id> = parents
                .iter()
                .filter(|(_, p)| {
                    p.as_ref()
                        .is_none_or(|p| !parents.contains_key(p) || added.contains(p))
                })
                .map(|(id, _)| id.clone())
                .collect();
            let ready = if ready.is_empty() {
                // A cycle cannot happen; if files say so, add them without parents.
                parents.keys().cloned().collect()
            } else {
                ready
            };
            for id in ready {
                let parent = parents.remove(&id).flatten();
                tracing::info!("adding result {id} found on disk to the database");
                self.db
                    .add(&id, parent.as_deref(), &now)
                    .map_err(StepError::from)?;
                added.insert(id);
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
                if self.db.children(id).map_err(StepError::from)?.is_empty() {
                    tracing::info!("dropping database row {id}: its result is gone");
                    self.db.delete(id).map_err(StepError::from)?;
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

    pub(crate) fn try_exclusive(&self) -> bool {
        self.lock.try_exclusive()
    }

    /// Gets result `id`: from the store, by attaching to the same step in flight, or by
    /// running `work` on a fresh build dir. Emits the step's output and a note.
    pub(crate) async fn step(&self, req: StepRequest<'_>, pins: &Pins, work: Work) -> StepResult {
        let id = req.id;
        pins.pin(id);
        let log = req.log;
        let mut work = Some(work);
        loop {
            let existing = lock(&self.shared).inflight.get(id).cloned();
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
                    return self.wait(id, inf, log, req.cancel).await;
                }
                continue;
            }
            if let Some(path) = self.store.result(id).await.map_err(StepError::from)? {
                pins.hit(id);
                replay(&path, log).await?;
                log(&LogEvent::Note(format!("---> using {id:?} from cache")));
                return Ok(path);
            }
            let inf = {
                let mut s = lock(&self.shared);
                if s.inflight.contains_key(id) {
                    continue; // someone started it meanwhile: attach to theirs
                }
                let inf = Arc::new(InFlight {
                    base: req.base.map(str::to_string),
                    waiters: Mutex::new(1),
                    cancel: CancellationToken::new(),
                    log: watch::channel(None).0,
                    waiting_for: watch::channel(None).0,
                    result: watch::channel(None).0,
                });
                s.inflight.insert(id.to_string(), inf.clone());
                inf
            };
            pins.misses.fetch_add(1, Ordering::Relaxed);
            let task = BuildTask {
                store: self.store.clone(),
                sandbox: self.sandbox.clone(),
                db: self.db.clone(),
                shared: self.shared.clone(),
                id: id.to_string(),
                base: req.base.map(str::to_string),
                keep_failed: req.keep_failed,
                inf: inf.clone(),
                log_opts: LogOptions {
                    max_bytes: self.max_log_bytes,
                    masked: req.masked.to_vec(),
                    sync_on_finish: !self.store.commit_is_durable(),
                },
            };
            let work = work
                .take()
                .ok_or(StepError::Internal("step work used twice"))?;
            // What the sandbox can make beside the step's tree (the snapshot waits on the
            // disk) it starts making now, as early as a step is known to be needed: here,
            // on this thread, so that what it starts is there for the step's run whatever
            // order the threads then run in. (Warmed from another thread, the first step
            // sometimes started first: the native sandbox then made the step's network
            // namespace in its clone, and the one made ahead went unused.) The database,
            // which the step's commit records it in, is opened ahead the first time, from
            // a thread of its own.
            self.prefetching.call_once(|| {
                let db = self.db.clone();
                let _ = std::thread::Builder::new()
                    .name("obuilder-db".into())
                    .spawn(move || {
                        if let Err(e) = db.prefetch() {
                            tracing::debug!("opening the database ahead: {e}");
                        }
                    });
            });
            self.sandbox.warm();
            tokio::spawn(task.run(work));
            let r = self.wait(id, inf, log, req.cancel).await;
            if r.is_err() && req.keep_failed {
                let kept = kept_id(id);
                if let Ok(Some(_)) = self.store.result(&kept).await {
                    log(&LogEvent::Note(format!(
                        "---> kept the failed step's tree as {kept:?}: `obuilder shell {}` enters it (delete it with `obuilder delete {}`)",
                        &kept[..12],
                        &kept[..12]
                    )));
                }
            }
            return r;
        }
    }

    /// Counts one more waiter, unless the build is already being cancelled.
    fn attach(&self, id: &str, inf: &Arc<InFlight>) -> bool {
        let s = lock(&self.shared);
        if !s.inflight.get(id).is_some_and(|i| Arc::ptr_eq(i, inf)) || inf.cancel.is_cancelled() {
            return false;
        }
        *lock(&inf.waiters) += 1;
        true
    }

    /// Follows an in-flight step's log and waits for its result; leaving early (our cancel
    /// fired) uncounts us and cancels the step if we were its last waiter.
    async fn wait(
        &self,
        id: &str,
        inf: Arc<InFlight>,
        log: &LogSink,
        cancel: &CancellationToken,
    ) -> StepResult {
        let follow = {
            let inf = inf.clone();
            let log = log.clone();
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
        let waiting = {
            let inf = inf.clone();
            let log = log.clone();
            async move {
                let mut rx = inf.waiting_for.subscribe();
                loop {
                    // (the task may have set it before this waiter subscribed)
                    let pid = *rx.borrow_and_update();
                    if let Some(pid) = pid {
                        log(&LogEvent::Note(format!(
                            "Waiting for process {pid}, which is building this step on the same store"
                        )));
                    }
                    if rx.changed().await.is_err() {
                        // Never: `inf` keeps the sender alive while this runs.
                        std::future::pending::<()>().await;
                    }
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
                    _ => Done {
                        result: Err(StepError::Internal("build task ended without a result").into()),
                        by_other: None,
                    },
                }
            }
        };
        let all = async {
            tokio::select! {
                _ = waiting => Done {
                    result: Err(StepError::Internal("the waiting notes ended").into()),
                    by_other: None,
                },
                r = async { tokio::join!(follow, result).1 } => r,
            }
        };
        tokio::select! {
            done = all => {
                if done.result.is_ok() {
                    log(&LogEvent::Note(match done.by_other {
                        Some(Some(pid)) => format!("---> saved as {id:?} (built by process {pid})"),
                        Some(None) => format!("---> saved as {id:?} (built by another process)"),
                        None => format!("---> saved as {id:?}"),
                    }));
                }
                done.result
            }
            _ = cancel.cancelled() => {
                let _s = lock(&self.shared);
                let mut w = lock(&inf.waiters);
                *w -= 1;
                if *w == 0 {
                    inf.cancel.cancel();
                }
                Err(BuildError::Cancelled)
            }
        }
    }

    /// Waits until no step is in flight, e.g. after a cancellation, so that every container
    /// is killed and every build dir discarded before the process exits.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let any = {
                let s = lock(&self.shared);
                s.inflight.values().next().map(|i| i.result.subscribe())
            };
            let Some(mut rx) = any else { return };
            let _ = rx.wait_for(Option::is_some).await;
            // The task removes itself from the map just before sending its result.
            tokio::task::yield_now().await;
        }
    }

    pub(crate) fn in_flight(&self) -> Vec<InFlightStep> {
        let s = lock(&self.shared);
        let mut v: Vec<InFlightStep> = s
            .inflight
            .iter()
            .map(|(id, i)| InFlightStep {
                id: id.clone(),
                waiters: *lock(&i.waiters),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Deletes `id` and everything built on it (children first), logging each removal.
    pub(crate) async fn delete(&self, id: &str, log: &LogSink) -> Result<usize, BuildError> {
        let mut n = 0;
        for child in self.db.children(id).map_err(StepError::from)? {
            n += Box::pin(self.delete(&child, log)).await?;
        }
        log(&LogEvent::Note(format!("Removing {id}")));
        self.store.delete(id).await.map_err(StepError::from)?;
        self.db.delete(id).map_err(StepError::from)?;
        Ok(n + 1)
    }

    /// Removes up to `limit` least-recently-used leaves last used before `before` (all of
    /// them with `None`), one at a time, never one that a running build has pinned or
    /// builds on. Returns at once; the space may come back later on stores that free it
    /// lazily (see `Store::complete_deletes`).
    pub(crate) async fn prune(
        &self,
        before: Option<OffsetDateTime>,
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
                .map_err(StepError::from)?;
            let victim = {
                let s = lock(&self.shared);
                candidates.into_iter().find(|id| {
                    !s.pins.contains_key(id)
                        && !s.inflight.contains_key(id)
                        && !s.inflight.values().any(|i| i.base.as_deref() == Some(id))
                })
            };
            let Some(id) = victim else { break };
            log(&LogEvent::Note(format!("Removing {id}")));
            self.store.delete(&id).await.map_err(StepError::from)?;
            self.db.delete(&id).map_err(StepError::from)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes least-recently-used leaves, a few at a time, until the store's filesystem has
    /// `percent` free (or nothing more can go). Deletes on btrfs free their space lazily, so
    /// after each batch it waits for them (`Store::complete_deletes`, bounded).
    pub(crate) async fn prune_until_free(
        &self,
        percent: f64,
        log: &LogSink,
    ) -> Result<usize, BuildError> {
        let mut removed = 0;
        loop {
            let usage = self.store.df().await.map_err(StepError::from)?;
            if usage.free_percent() >= percent {
                break;
            }
            let n = self.prune(None, 8, log).await?;
            if n == 0 {
                log(&LogEvent::Note(format!(
                    "{:.1}% free, short of {percent}%, and nothing more can be pruned",
                    usage.free_percent()
                )));
                break;
            }
            removed += n;
            self.store
                .complete_deletes()
                .await
                .map_err(StepError::from)?;
        }
        Ok(removed)
    }
}

impl Drop for Policy {
    /// A clean exit: no reconciliation is needed on this process's account.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(lock::marker(&self.store.state_dir()));
    }
}

/// Replays a finished result's log.
async fn replay(result: &Path, log: &LogSink) -> Result<(), BuildError> {
    let p = result.join("log");
    let replay = StepLog::open_finished(&p).map_err(io("cannot read", &p))?;
    replay
        .follow(|b| log(&LogEvent::Output(b.to_vec())))
        .await
        .map_err(io("cannot read", &p))
}

/// The detached task that runs one step's work, so that the step outlives any one waiter.
struct BuildTask {
    store: Arc<dyn Store>,
    sandbox: Arc<dyn Sandbox>,
    db: Arc<Db>,
    shared: Arc<Mutex<Shared>>,
    id: Id,
    base: Option<Id>,
    keep_failed: bool,
    inf: Arc<InFlight>,
    log_opts: LogOptions,
}

impl BuildTask {
    async fn run(self, work: Work) {
        // `instrument`, never `span.enter()` across an await: a guard held over an await
        // leaks the span into whatever the thread polls next, and the registry then panics
        // on cloning a closed span (seen in CI, from a worker running two builds).
        let span = tracing::info_span!("step", id = %self.id);
        let done = self.build(work).instrument(span).await;
        // Publish the log (if the build died before making one) so followers end.
        self.inf.log.send_if_modified(|l| {
            if l.is_none() {
                *l = StepLog::open_finished(Path::new("/dev/null")).ok();
                true
            } else {
                false
            }
        });
        {
            let mut s = lock(&self.shared);
            if s.inflight
                .get(&self.id)
                .is_some_and(|i| Arc::ptr_eq(i, &self.inf))
            {
                s.inflight.remove(&self.id);
            }
        }
        let _ = self.inf.result.send(Some(done));
    }

    /// A result another process made while this one waited: its log is replayed to the
    /// followers.
    fn adopt(&self, path: PathBuf, by: Option<u32>) -> Done {
        if let Ok(l) = StepLog::open_finished(&path.join("log")) {
            self.inf.log.send_replace(Some(l));
        }
        Done {
            result: Ok(path),
            by_other: Some(by),
        }
    }

    async fn build(&self, work: Work) -> Done {
        let built = |result| Done {
            result,
            by_other: None,
        };
        // Another process, or a build that finished just now, may have made it.
        match self.store.result(&self.id).await {
            Ok(Some(p)) => return self.adopt(p, None),
            Ok(None) => {}
            Err(e) => return built(Err(StepError::from(e).into())),
        }
        // Another obuilder process may be building the same step: wait for it, then take
        // its result.
        let inf = self.inf.clone();
        let mut holder = None;
        let step_lock = StepLock::acquire(
            &self.store.state_dir(),
            &self.id,
            || inf.cancel.is_cancelled(),
            |h| {
                // (The lock is this step's alone; a holder that wrote nothing yet is said
                // at the next round.)
                if let Some(h) = h {
                    holder = Some(h.pid);
                    tracing::info!("waiting for process {:?} building {}", holder, self.id);
                    inf.waiting_for.send_replace(holder);
                }
            },
        )
        .await;
        let _step_lock = match step_lock {
            Ok(Some(l)) => l,
            Ok(None) => return built(Err(BuildError::Cancelled)),
            Err(e) => {
                return built(Err(StepError::io(
                    "cannot lock step",
                    self.store.state_dir(),
                )(e)
                .into()))
            }
        };
        match self.store.result(&self.id).await {
            Ok(Some(p)) => return self.adopt(p, holder),
            Ok(None) => {}
            Err(e) => return built(Err(StepError::from(e).into())),
        }
        built(self.make(work).await)
    }

    /// Runs the work on a fresh build dir and commits it (or discards it on any failure).
    async fn make(&self, work: Work) -> StepResult {
        // Under the step's lock, a build dir for this id can only be a dead builder's.
        if let Some(stale) = self
            .store
            .stale_build(&self.id)
            .await
            .map_err(StepError::from)?
        {
            tracing::warn!(
                "removing {}, left by a builder that died mid-step",
                stale.dir.display()
            );
            if let Err(e) = self.sandbox.kill_stale(&stale.rootfs).await {
                tracing::warn!("stopping what ran on {}: {e}", stale.rootfs.display());
            }
            self.store.discard(&stale).await.map_err(StepError::from)?;
        }
        self.check_space().await?;
        let snap_t = crate::timing::phase("snapshot", &self.id);
        let dir = self
            .store
            .prepare(&self.id, self.base.as_deref())
            .await
            .map_err(StepError::from)?;
        drop(snap_t);
        let log_path = dir.dir.join("log");
        let steplog = match StepLog::create_with(&log_path, &self.log_opts) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.store.discard(&dir).await;
                return Err(StepError::io("cannot create", &log_path)(e).into());
            }
        };
        self.inf.log.send_replace(Some(steplog.clone()));
        let r = if self.inf.cancel.is_cancelled() {
            Err(BuildError::Cancelled)
        } else {
            work(dir.clone(), steplog.clone(), self.inf.cancel.clone()).await
        };
        // A step that filled the disk may have had writes cut short, even if it exited 0.
        let r = match r {
            Ok(()) => self.check_space().await,
            e => e,
        };
        steplog.finish();
        let r = match r {
            Ok(()) => {
                let publish_t = crate::timing::phase("publish", &self.id);
                match self.store.commit(&dir).await {
                    Ok(path) => {
                        drop(publish_t);
                        let _t = crate::timing::phase("record", &self.id);
                        self.db
                            .add(&self.id, self.base.as_deref(), &db::now())
                            .map_err(StepError::from)?;
                        return Ok(path);
                    }
                    Err(e) => Err(StepError::from(e).into()),
                }
            }
            Err(e) => Err(e),
        };
        if self.keep_failed && !matches!(r, Err(BuildError::Cancelled)) && self.keep(&dir).await {
            return r;
        }
        if let Err(c) = self.store.discard(&dir).await {
            // The primary error is kept; the clean-up error is logged beside it.
            tracing::warn!("discarding failed build {}: {c}", self.id);
        }
        r
    }

    /// Publishes a failed build as [`kept_id`], replacing an earlier one; false if it
    /// could not (the caller discards it).
    async fn keep(&self, dir: &BuildDir) -> bool {
        let kept = kept_id(&self.id);
        if let Ok(Some(_)) = self.store.result(&kept).await {
            let _ = self.db.delete(&kept);
            if let Err(e) = self.store.delete(&kept).await {
                tracing::warn!("replacing the kept failure {kept}: {e}");
                return false;
            }
        }
        match self.store.commit_as(dir, &kept).await {
            Ok(_) => {
                if let Err(e) = self.db.add(&kept, self.base.as_deref(), &db::now()) {
                    tracing::warn!("recording the kept failure {kept}: {e}");
                }
                true
            }
            Err(e) => {
                tracing::warn!("cannot keep the failed step {}: {e}", self.id);
                false
            }
        }
    }

    async fn check_space(&self) -> Result<(), BuildError> {
        let u = self.store.df().await.map_err(StepError::from)?;
        if u.total_bytes > 0 && u.free_bytes < MIN_FREE_BYTES {
            return Err(StepError::DiskFull {
                store: self.store.describe(),
                free: human_bytes(u.free_bytes),
            }
            .into());
        }
        Ok(())
    }
}
