//! The scheduler's Cap'n Proto services over the pure [`Pool`]s: a thin, single-threaded
//! adapter (run it on a tokio `LocalSet`). Behaviour and error texts follow OCluster's
//! `cluster_scheduler.ml` (reference/ocluster.md §1.2, §2).
//!
//! * `Registration` (one per pool, `pool-NAME.cap`): a worker registers and gets a
//!   `Queue`; dropping the queue (the connection broke) releases the worker.
//! * `Queue.pop` waits for a job; the client's ticket then resolves to the worker's `Job`.
//! * `Submission` (one per client, also `Persistent`): the client's right is checked
//!   again at every submit, so `remove-client` revokes at once.
//!
//! `Submission`, `Ticket` and the client's `Job` are native objects of `ocluster-rpc`
//! (every queued job passes through or keeps them: a call waits as a bare responder);
//! the others are capnp `Server` impls run through its bridge.
//! * `Ticket`: `job` is a promise until a worker takes the job; `cancel` (or dropping the
//!   ticket) takes a queued job out, or forwards to the job once it runs.
//! * `Admin` and `PoolAdmin` (`admin.cap`).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use capnp::capability::FromClientHook;
use capnp::Error;
use futures::channel::oneshot;
use ocluster_api::{
    admin, ids, job, job_descr, persistent, pool_admin, progress, queue, registration, submission,
    ticket, worker,
};
use ocluster_rpc::Cap;
use sha2::{Digest, Sha256};

use crate::db::{ClientError, Db, StoredJob};
use crate::pool::{
    Costs, Event, Inactive, Item, Pool, PoolError, PopId, Priority, TicketId, WorkerId,
};

/// How long `update` waits for a worker to come back.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(600);

/// A queued job: its description, kept as a compact serialized message, and what its
/// client holds of it.
pub struct QueuedJob {
    descr: Box<[u8]>,
    /// (Shared by the jobs with this hint: [`Hints`].)
    hint: Rc<str>,
    /// The job as its client sees it (a promise of `Job`, then a `JobProxy`), from its
    /// submission on, or, for a job restored after a restart, what its client gets once
    /// it submits the job again. (None once it has been told its outcome.)
    shared: Option<Rc<JobShared>>,
    /// Its row in the database's `job_queue`.
    seq: u64,
}

impl Item for QueuedJob {
    fn cache_hint(&self) -> &str {
        &self.hint
    }
}

impl QueuedJob {
    fn fail(mut self, msg: &str) {
        if let Some(shared) = self.shared.take() {
            shared.finish(Err(Error::failed(msg.to_string())));
        }
    }
}

fn serialize_descr(d: job_descr::Reader) -> Result<Vec<u8>, Error> {
    let mut m = capnp::message::Builder::new(
        capnp::message::HeapAllocator::new()
            .first_segment_words(d.total_size()?.word_count as u32 + 1),
    );
    m.set_root(d)?;
    Ok(capnp::serialize::write_message_to_words(&m))
}

type Clock = Rc<dyn Fn() -> f64>;
/// Makes the URI of a service id (the scheduler's address and key).
pub type MakeUri = Rc<dyn Fn(&[u8]) -> String>;
/// A worker's pending `pop`: where to send the job, and the job's capability.
type PendingPop = (oneshot::Sender<Result<Vec<u8>, Error>>, job::Client);

/// The current time, as the pools count it (seconds since the epoch).
pub fn wall_clock() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One pool and its RPC-side state.
pub struct PoolApi {
    pool: Pool<QueuedJob>,
    name: String,
    pending_pops: HashMap<PopId, PendingPop>,
    /// Connected workers' `Worker` capabilities.
    worker_caps: HashMap<String, (WorkerId, worker::Client)>,
    /// Connected workers that registered with a capability of their own: its hash.
    pinned: HashMap<String, Vec<u8>>,
    /// Each running attempt's alarm, by worker: dropped when the worker is released, so
    /// that its jobs are known lost even if their `result` calls never settle.
    attempts: HashMap<WorkerId, HashMap<u64, oneshot::Sender<()>>>,
    next_attempt: u64,
    /// When each worker that sends heartbeats last sent one.
    heartbeats: HashMap<WorkerId, f64>,
    limits: JobLimits,
    /// Fired when a job ends or a worker registers (drain, update).
    changed: Rc<tokio::sync::Notify>,
    this: std::rc::Weak<RefCell<PoolApi>>,
    db: Rc<RefCell<Db>>,
    /// Runs of a job before its worker's loss fails it (1: never run again, as the
    /// original).
    max_attempts: u32,
    /// The next job's row number in `job_queue`.
    next_seq: u64,
    /// Jobs to add to and remove from `job_queue` at the next flush.
    added: Vec<StoredJob>,
    removed: Vec<u64>,
    /// Jobs restored after a restart, by client and description, for their clients to
    /// claim by submitting them again (as the OCurrent plugin does after a restart):
    /// a job must not run twice because its client could not tell that it was kept.
    orphans: HashMap<[u8; 32], VecDeque<Rc<JobShared>>>,
    /// Restored jobs can be claimed until then.
    orphans_until: f64,
    /// New jobs and clocks are written to the database (else kept in memory only, as the
    /// original does).
    persist: bool,
    /// Running attempts, by their key in `attempts`, for the status page.
    running: BTreeMap<u64, RunningJob>,
    /// The group commit of job rows: see [`PoolApi::flush_soon`].
    stored: Rc<Stored>,
    hints: Hints,
}

/// The cache hints of the queued and running jobs, each held once: many jobs share a
/// hint (an image and a commit), and a block per job for a few bytes of text costs 32.
/// Hints no job holds any more are dropped once the set has doubled since the last
/// sweep, so that a sweep costs O(1) per hint added.
#[derive(Default)]
struct Hints {
    set: std::collections::HashSet<Rc<str>>,
    swept: usize,
}

impl Hints {
    fn get(&mut self, hint: &str) -> Rc<str> {
        if let Some(h) = self.set.get(hint) {
            return h.clone();
        }
        if self.set.len() >= 2 * self.swept + 1024 {
            self.set.retain(|h| Rc::strong_count(h) > 1);
            self.swept = self.set.len();
        }
        let h: Rc<str> = Rc::from(hint);
        self.set.insert(h.clone());
        h
    }
}

/// Group commit: the changes of every submit handled in one turn of the event loop go to
/// the database in one transaction, and each submit is answered once it is written (its
/// job's row on the disk before its client hears of the ticket). Other changes are
/// written at once by [`PoolApi::flush`], which also writes any batch pending. Batches
/// are numbered; `done` is the last one written.
#[derive(Default)]
struct Stored {
    /// The batch now collecting changes.
    next: Cell<u64>,
    done: Cell<u64>,
    /// A task will write the batch at the end of this turn.
    scheduled: Cell<bool>,
    /// The submits waiting for their batch: the batch, what answers the call, and the
    /// ticket it answers with (no task per submit).
    waiting: RefCell<Vec<(u64, ocluster_rpc::Responder, Cap)>>,
}

impl Stored {
    /// Answers `resp` with `ticket` once batch `batch` is written (at once if it is).
    fn answer_once_written(&self, batch: u64, resp: ocluster_rpc::Responder, ticket: Cap) {
        if self.done.get() >= batch {
            answer_ticket(resp, ticket);
        } else {
            self.waiting.borrow_mut().push((batch, resp, ticket));
        }
    }

    /// Batch `done` is written: its submits are answered (by a task, so that no borrow
    /// of the pool is held meanwhile).
    fn written(&self) {
        let done = self.done.get();
        let ready: Vec<_> = {
            let mut w = self.waiting.borrow_mut();
            if w.is_empty() {
                return;
            }
            let (ready, later) = std::mem::take(&mut *w)
                .into_iter()
                .partition(|(batch, _, _)| *batch <= done);
            *w = later;
            ready
        };
        tokio::task::spawn_local(async move {
            for (_, resp, ticket) in ready {
                answer_ticket(resp, ticket);
            }
        });
    }
}

/// Answers a `submit` with its ticket.
fn answer_ticket(resp: ocluster_rpc::Responder, ticket: Cap) {
    resp.results(|b, caps| {
        b.init_as::<submission::submit_results::Builder>()
            .set_ticket(caps.client(ticket));
        Ok(())
    })
}

/// A job running on a worker, as the status page shows it.
struct RunningJob {
    worker: String,
    client: String,
    label: String,
    priority: Priority,
    started: std::time::Instant,
    attempt: u32,
    shared: Rc<JobShared>,
}

impl RunningJob {
    fn view(&self, id: u64) -> RunningView {
        RunningView {
            id,
            worker: self.worker.clone(),
            client: self.client.clone(),
            label: self.label.clone(),
            priority: self.priority.name(),
            running_for: self.started.elapsed().as_secs_f64(),
            attempt: self.attempt,
        }
    }
}

/// A running job, for the status page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunningView {
    /// Its id on the status page (unique in its pool while the scheduler runs).
    pub id: u64,
    pub worker: String,
    pub client: String,
    pub label: String,
    pub priority: &'static str,
    /// Seconds since this attempt started.
    pub running_for: f64,
    /// 1, or more if earlier workers were lost.
    pub attempt: u32,
}

/// A pool on the status page.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolStatus {
    #[serde(flatten)]
    pub pool: crate::pool::PoolView,
    pub running: Vec<RunningView>,
}

/// How long after a restart its restored jobs can be claimed by their clients.
const CLAIM_WINDOW: f64 = 3600.0;

/// What identifies a job for de-duplication: its client and its description.
fn dedup_key(client: &str, descr: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(client.as_bytes());
    h.update([0]);
    h.update(descr);
    h.finalize().into()
}

pub struct Scheduler {
    /// Seconds without a heartbeat after which a worker that sends them is lost.
    heartbeat_timeout: std::cell::Cell<f64>,
    /// Seconds a worker's clock may be off ours before it is paused.
    max_clock_skew: std::cell::Cell<f64>,
    pools: BTreeMap<String, Rc<RefCell<PoolApi>>>,
    db: Rc<RefCell<Db>>,
    clock: Clock,
    /// Makes the URI of a service id (this scheduler's address and key).
    make_uri: MakeUri,
}

/// How long a job may run and how much log it may write, per pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    pub time: Duration,
    pub log_bytes: u64,
}

impl Default for JobLimits {
    /// A day, and 1 GiB of log.
    fn default() -> JobLimits {
        JobLimits {
            time: Duration::from_secs(24 * 3600),
            log_bytes: 1 << 30,
        }
    }
}

/// How often a running job's log size is looked at.
const LOG_PROBE: Duration = Duration::from_secs(1);

/// A worker that sends heartbeats is lost after this long without one.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);

/// How far a worker's clock may be off the scheduler's before the worker is paused.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(120);

/// Attempts by default: a job whose worker is lost runs again twice.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

impl Scheduler {
    /// Takes workers that stop sending heartbeats for `timeout` as lost, checking a few
    /// times per timeout. Must run on a `LocalSet`.
    pub fn watch_heartbeats(self: &Rc<Self>, timeout: Duration) {
        self.heartbeat_timeout.set(timeout.as_secs_f64());
        let sched = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(timeout / 4).await;
                let Some(sched) = sched.upgrade() else { return };
                let now = sched.now();
                for (pool_name, p) in &sched.pools {
                    let Ok(mut p) = p.try_borrow_mut() else {
                        continue;
                    };
                    let stale: Vec<(WorkerId, String)> = p
                        .heartbeats
                        .iter()
                        .filter(|(_, t)| now - **t > timeout.as_secs_f64())
                        .filter_map(|(id, _)| Some((*id, p.pool.worker_name(*id)?.to_string())))
                        .collect();
                    for (id, name) in stale {
                        tracing::warn!(
                            "Worker {name:?} of {pool_name:?} sent no heartbeat for {} s: \
                             taking it as lost",
                            timeout.as_secs()
                        );
                        p.release_worker(id, &name);
                    }
                    let db = p.db.clone();
                    p.flush(&db);
                    p.changed.notify_waiters();
                }
            }
        });
    }

    /// Lets idle workers take jobs that wait too long in busy workers' queues, looking
    /// every `every`. Must run on a `LocalSet`.
    pub fn balance(self: &Rc<Self>, every: Duration) {
        let sched = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(sched) = sched.upgrade() else { return };
                let now = sched.now();
                for p in sched.pools.values() {
                    let Ok(mut p) = p.try_borrow_mut() else {
                        continue;
                    };
                    p.pool.steal(now);
                    let db = p.db.clone();
                    p.flush(&db);
                }
            }
        });
    }

    /// Every pool as the status page shows it, with at most `limit` jobs per queue.
    pub fn status(&self, limit: usize) -> Vec<PoolStatus> {
        let now = self.now();
        self.pools
            .values()
            .map(|p| {
                let p = p.borrow();
                PoolStatus {
                    pool: p.pool.view(now, limit),
                    running: p.running.iter().map(|(id, r)| r.view(*id)).collect(),
                }
            })
            .collect()
    }

    /// One running job, for its page.
    pub fn running_job(&self, pool: &str, id: u64) -> Option<RunningView> {
        let p = self.pools.get(pool)?.borrow();
        p.running.get(&id).map(|r| r.view(id))
    }

    /// The end of a running job's log (at most `bytes`), as its worker has it; `None` if
    /// no such job runs. Waits up to a second for a worker that does not answer.
    pub async fn log_tail(&self, pool: &str, id: u64, bytes: u32) -> Option<Vec<u8>> {
        let job = {
            let p = self.pools.get(pool)?.borrow();
            let r = p.running.get(&id)?;
            r.shared.job_of(r.attempt)?
        };
        let mut req = job.log_request();
        req.get().set_start(-i64::from(bytes.max(1)));
        drop(job);
        let answer = tokio::time::timeout(Duration::from_secs(1), req.send().promise).await;
        match answer {
            Ok(Ok(r)) => Some(r.get().ok()?.get_log().ok()?.to_vec()),
            _ => Some(Vec::new()),
        }
    }

    /// Sets a pool's job limits; false if there is no such pool.
    pub fn set_limits(&self, pool: &str, limits: JobLimits) -> bool {
        match self.pools.get(pool) {
            Some(p) => {
                p.borrow_mut().limits = limits;
                true
            }
            None => false,
        }
    }

    /// Whether jobs and clients' clocks are kept in the database, so that a restart loses
    /// no queued job (the default), or only in memory, as the original.
    pub fn set_persist_jobs(&self, on: bool) {
        for p in self.pools.values() {
            p.borrow_mut().persist = on;
        }
    }

    /// How far a worker's clock may be off ours before it is paused (its builds' times
    /// would be wrong, and TLS and caches can break).
    pub fn set_max_clock_skew(&self, limit: Duration) {
        self.max_clock_skew.set(limit.as_secs_f64());
    }

    /// How many times a job may run when its workers are lost (at least 1).
    pub fn set_max_attempts(&self, n: u32) {
        for p in self.pools.values() {
            p.borrow_mut().max_attempts = n.max(1);
        }
    }

    /// Opens the pools with what the database remembers.
    pub fn new(
        pools: &[String],
        db: Db,
        costs: Costs,
        clock: Clock,
        make_uri: MakeUri,
    ) -> Result<Rc<Scheduler>, crate::db::DbError> {
        let mut map = BTreeMap::new();
        let db = Rc::new(RefCell::new(db));
        for name in pools {
            let state = db.borrow().load_pool(name)?;
            let jobs = db.borrow().load_jobs(name)?;
            let pool = Rc::new_cyclic(|this| {
                RefCell::new(PoolApi {
                    pool: Pool::new(name, costs, state),
                    name: name.clone(),
                    pending_pops: HashMap::new(),
                    worker_caps: HashMap::new(),
                    pinned: HashMap::new(),
                    attempts: HashMap::new(),
                    next_attempt: 0,
                    heartbeats: HashMap::new(),
                    limits: JobLimits::default(),
                    changed: Rc::new(tokio::sync::Notify::new()),
                    this: this.clone(),
                    db: db.clone(),
                    max_attempts: DEFAULT_MAX_ATTEMPTS,
                    next_seq: 1,
                    added: Vec::new(),
                    removed: Vec::new(),
                    orphans: HashMap::new(),
                    orphans_until: clock() + CLAIM_WINDOW,
                    persist: true,
                    running: BTreeMap::new(),
                    stored: Rc::new(Stored {
                        next: Cell::new(1),
                        ..Stored::default()
                    }),
                    hints: Hints::default(),
                })
            });
            if !jobs.is_empty() {
                tracing::warn!("{name}: {} jobs kept from before the restart", jobs.len());
            }
            pool.borrow_mut().restore(jobs);
            map.insert(name.clone(), pool);
        }
        Ok(Rc::new(Scheduler {
            heartbeat_timeout: std::cell::Cell::new(DEFAULT_HEARTBEAT_TIMEOUT.as_secs_f64()),
            max_clock_skew: std::cell::Cell::new(DEFAULT_MAX_CLOCK_SKEW.as_secs_f64()),
            pools: map,
            db,
            clock,
            make_uri,
        }))
    }

    pub fn now(&self) -> f64 {
        (self.clock)()
    }

    pub fn pool_names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    pub fn db(&self) -> &Rc<RefCell<Db>> {
        &self.db
    }

    /// The `Registration` service of a pool.
    pub fn registration(self: &Rc<Self>, pool: &str) -> Option<registration::Client> {
        let p = self.pools.get(pool)?.clone();
        Some(capnp_rpc::new_client(RegistrationImpl {
            sched: self.clone(),
            pool: p,
            pinned: None,
        }))
    }

    /// The registration of the worker whose own secret id is `id`, if it is valid.
    pub fn registration_for_id(
        self: &Rc<Self>,
        id: &[u8],
    ) -> Result<Option<registration::Client>, Error> {
        let Some((pool, name)) = self.db.borrow().worker_of_id(id).map_err(db_err)? else {
            return Ok(None);
        };
        let Some(p) = self.pools.get(&pool) else {
            return Ok(None);
        };
        Ok(Some(capnp_rpc::new_client(RegistrationImpl {
            sched: self.clone(),
            pool: p.clone(),
            pinned: Some((name, Sha256::digest(id).to_vec())),
        })))
    }

    /// Gives worker `name` of `pool` a registration capability of its own; returns its
    /// URI.
    pub fn add_worker(&self, pool: &str, name: &str) -> Result<String, Error> {
        if !self.pools.contains_key(pool) {
            return Err(Error::failed(format!("No such pool {pool:?}")));
        }
        if name.is_empty() || name.contains('\n') {
            return Err(Error::failed(format!("Bad worker name {name:?}")));
        }
        let id = ocluster_net_id();
        self.db
            .borrow()
            .add_worker_cap(pool, name, &id)
            .map_err(db_err)?;
        tracing::info!("Created a registration capability for worker {name:?} of pool {pool:?}");
        Ok((self.make_uri)(&id))
    }

    /// Revokes worker `name`'s own registration capability, and disconnects the worker
    /// if it registered with it.
    pub fn remove_worker(&self, pool: &str, name: &str) -> Result<(), Error> {
        let Some(p) = self.pools.get(pool) else {
            return Err(Error::failed(format!("No such pool {pool:?}")));
        };
        let revoked = self
            .db
            .borrow()
            .remove_worker_cap(pool, name)
            .map_err(db_err)?;
        if revoked.is_empty() {
            return Err(Error::failed(format!(
                "Worker {name:?} has no registration capability of its own in {pool:?}"
            )));
        }
        let mut p = p.borrow_mut();
        let with_revoked = p.pinned.get(name).is_some_and(|h| revoked.contains(h));
        if let (true, Some(&(id, _))) = (with_revoked, p.worker_caps.get(name)) {
            tracing::info!("Disconnecting worker {name:?}: its capability was revoked");
            p.release_worker(id, name);
        }
        p.flush(&self.db);
        p.changed.notify_waiters();
        Ok(())
    }

    /// The `Admin` service.
    pub fn admin(self: &Rc<Self>) -> admin::Client {
        capnp_rpc::new_client(AdminImpl {
            sched: self.clone(),
        })
    }

    /// The `Submission` service of the client whose secret id is `id`, if it is
    /// registered.
    pub fn submission_for_id(
        self: &Rc<Self>,
        id: &[u8],
    ) -> Result<Option<submission::Client>, Error> {
        let name = self.db.borrow().client_of_id(id).map_err(db_err)?;
        Ok(name.map(|name| self.submission(&name, id)))
    }

    fn submission(self: &Rc<Self>, name: &str, id: &[u8]) -> submission::Client {
        Cap::local(SubmissionImpl {
            sched: self.clone(),
            client: Rc::from(name),
            id_hash: Sha256::digest(id).to_vec(),
            uri: (self.make_uri)(id),
        })
        .client()
    }

    /// Adds a client; returns its secret id.
    pub fn add_client(&self, name: &str) -> Result<[u8; 20], ClientError> {
        let id = ocluster_net_id();
        self.db.borrow().add_client(name, &id)?;
        tracing::info!("Created new submission endpoint for client {name:?}");
        Ok(id)
    }

    /// Revokes a client: its cap stops working and its rates are forgotten; its queued
    /// and running jobs go on.
    pub fn remove_client(&self, name: &str) -> Result<(), ClientError> {
        self.db.borrow().remove_client(name)?;
        for p in self.pools.values() {
            let mut p = p.borrow_mut();
            p.pool.remove_client(name);
            p.flush(&self.db);
        }
        tracing::info!("Removed endpoint for client {name:?}");
        Ok(())
    }

    /// Prometheus text for the scheduler's metrics (the original's names).
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in rows {
                out.push_str(&format!("{name}{{{labels}}} {v}\n"));
            }
        };
        let pools: Vec<(String, std::cell::Ref<PoolApi>)> = self
            .pools
            .iter()
            .map(|(n, p)| (n.clone(), p.borrow()))
            .collect();
        let per_pool = |f: &dyn Fn(&Pool<QueuedJob>) -> f64| -> Vec<(String, f64)> {
            pools
                .iter()
                .map(|(n, p)| (format!("pool=\"{}\"", esc(n)), f(&p.pool)))
                .collect()
        };
        family(
            "ocluster_pool_jobs_submitted_total",
            "counter",
            "Number of jobs submitted to the pool",
            per_pool(&|p| p.counters().submitted as f64),
        );
        family(
            "ocluster_pool_jobs_cancelled_total",
            "counter",
            "Number of jobs cancelled while queued",
            per_pool(&|p| p.counters().cancelled as f64),
        );
        family(
            "ocluster_pool_jobs_accepted_total",
            "counter",
            "Number of jobs accepted by workers",
            per_pool(&|p| p.counters().accepted as f64),
        );
        family(
            "ocluster_pool_jobs_stolen_total",
            "counter",
            "Number of jobs an idle worker took from a busy worker's queue",
            per_pool(&|p| p.counters().stolen as f64),
        );
        family(
            "ocluster_pool_workers_connected",
            "gauge",
            "Number of connected workers",
            per_pool(&|p| p.workers_connected() as f64),
        );
        family(
            "ocluster_pool_workers_capacity",
            "gauge",
            "Aggregate capacity of connected workers",
            per_pool(&|p| p.cluster_capacity() as f64),
        );
        family(
            "ocluster_pool_workers_ready",
            "gauge",
            "Number of workers ready to accept a new job",
            per_pool(&|p| p.workers_ready() as f64),
        );
        family(
            "ocluster_pool_workers_paused",
            "gauge",
            "Number of workers set to inactive",
            per_pool(&|p| p.workers_paused() as f64),
        );
        let mut rows = Vec::new();
        for (n, p) in &pools {
            for ((queue, urgent), count) in p.pool.queue_lengths() {
                rows.push((
                    format!(
                        "queue=\"{}\",pool=\"{}\",priority=\"{}\"",
                        esc(&queue),
                        esc(n),
                        if urgent { "high" } else { "low" }
                    ),
                    count as f64,
                ));
            }
        }
        family(
            "ocluster_pool_queue_length",
            "gauge",
            "Items in the queue",
            rows,
        );
        let mut rows = Vec::new();
        for (n, p) in &pools {
            for ((client, urgent), count) in p.pool.client_queued() {
                rows.push((
                    format!(
                        "client=\"{}\",pool=\"{}\",priority=\"{}\"",
                        esc(&client),
                        esc(n),
                        if urgent { "high" } else { "low" }
                    ),
                    count as f64,
                ));
            }
        }
        family(
            "ocluster_scheduler_client_submitted_jobs",
            "gauge",
            "Items currently queued",
            rows,
        );
        out
    }

    /// The `Worker` capability of a connected worker.
    pub fn worker(&self, pool: &str, name: &str) -> Option<worker::Client> {
        let p = self.pools.get(pool)?.borrow();
        p.worker_caps.get(name).map(|(_, c)| c.clone())
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn ocluster_net_id() -> [u8; 20] {
    let mut id = [0u8; 20];
    getrandom::getrandom(&mut id).expect("the OS random source works");
    id
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::failed(e.to_string())
}

impl PoolApi {
    /// Queues again the jobs that were queued or running before a restart, in their
    /// order, each waiting for its client to claim it.
    fn restore(&mut self, jobs: Vec<StoredJob>) {
        for j in jobs {
            self.next_seq = self.next_seq.max(j.seq + 1);
            let shared = JobShared::new(&self.this);
            let key = dedup_key(&j.client, &j.descr);
            let ticket = self.pool.restore(
                &j.client,
                QueuedJob {
                    descr: j.descr.into(),
                    hint: self.hints.get(&j.cache_hint),
                    shared: Some(shared.clone()),
                    seq: j.seq,
                },
                Priority(j.priority),
                j.fair_start,
            );
            shared.state.borrow_mut().queued = ticket;
            self.orphans.entry(key).or_default().push_back(shared);
        }
    }

    /// A restored job that `client` submits again, if there is one.
    fn claim(&mut self, client: &str, descr: &[u8], now: f64) -> Option<Rc<JobShared>> {
        if self.orphans.is_empty() {
            return None;
        }
        if now > self.orphans_until {
            self.orphans.clear();
            return None;
        }
        let key = dedup_key(client, descr);
        let q = self.orphans.get_mut(&key)?;
        let shared = q.pop_front();
        if q.is_empty() {
            self.orphans.remove(&key);
        }
        shared
    }

    /// The job is over (finished, failed or cancelled): its row goes (0: it has none).
    fn forget_job(&mut self, seq: u64) {
        if seq != 0 {
            self.removed.push(seq);
        }
    }

    /// After every change: run woken pops, answer them, and store what changed.
    fn flush(&mut self, db: &Rc<RefCell<Db>>) {
        self.settle();
        self.store(db);
    }

    /// As [`PoolApi::flush`], but the store waits for the end of this turn of the event
    /// loop, with the changes of every other call handled in it (group commit). Returns
    /// the batch to wait for (with [`Stored::answer_once_written`]) before telling anyone
    /// of the change.
    fn flush_soon(&mut self) -> u64 {
        self.settle();
        let stored = self.stored.clone();
        if self.added.is_empty() && self.removed.is_empty() && !self.pool.has_writes() {
            // Nothing to write: what is pending is what earlier calls wait for.
            return stored.done.get();
        }
        if !stored.scheduled.replace(true) {
            let this = self.this.clone();
            let db = self.db.clone();
            tokio::task::spawn_local(async move {
                // Every call already read from the connections runs first.
                tokio::task::yield_now().await;
                if let Some(pool) = this.upgrade() {
                    pool.borrow_mut().store(&db);
                }
            });
        }
        stored.next.get()
    }

    /// Runs woken pops and answers them.
    fn settle(&mut self) {
        loop {
            self.pool.settle();
            let events = self.pool.take_events();
            if events.is_empty() {
                break;
            }
            for e in events {
                match e {
                    Event::Assigned {
                        pop,
                        worker,
                        client,
                        priority,
                        item,
                        cached,
                        ..
                    } => self.assigned(pop, worker, (client, priority), item, cached),
                    Event::PopFailed { pop } => {
                        if let Some((tx, _)) = self.pending_pops.remove(&pop) {
                            let _ = tx.send(Err(Error::failed("Worker disconnected".into())));
                        }
                    }
                }
            }
        }
    }

    /// Writes every pending change in one transaction; the batch is then done.
    fn store(&mut self, db: &Rc<RefCell<Db>>) {
        let mut writes = self.pool.take_writes();
        if !self.persist {
            writes.retain(|w| !matches!(w, crate::pool::DbWrite::SetClock { .. }));
        }
        if !writes.is_empty() || !self.added.is_empty() || !self.removed.is_empty() {
            let added = std::mem::take(&mut self.added);
            let removed = std::mem::take(&mut self.removed);
            if let Err(e) = db
                .borrow_mut()
                .apply_jobs(&self.name, &writes, &added, &removed)
            {
                tracing::error!("{e}");
            }
        }
        let stored = &self.stored;
        stored.done.set(stored.next.get());
        stored.next.set(stored.next.get() + 1);
        stored.scheduled.set(false);
        stored.written();
    }

    fn assigned(
        &mut self,
        pop: PopId,
        worker: WorkerId,
        (client, priority): (Rc<str>, Priority),
        mut item: QueuedJob,
        cached: bool,
    ) {
        let started = std::time::Instant::now();
        let Some((tx, job)) = self.pending_pops.remove(&pop) else {
            // Cannot happen: a pop is withdrawn from the pool before its call goes.
            tracing::error!("a job was assigned to a pop that has gone");
            self.pool.job_finished(worker);
            self.forget_job(item.seq);
            item.fail("the worker went away before the job started");
            return;
        };
        let worker_name = self.pool.worker_name(worker).unwrap_or("?").to_string();
        let shared = item
            .shared
            .take()
            .unwrap_or_else(|| JobShared::new(&self.this));
        let attempt = shared.start_attempt(job.clone(), &worker_name);
        if tx.send(Ok(item.descr.to_vec())).is_err() {
            tracing::warn!("worker's pop went away as its job was assigned");
        }
        // One `result` call to the worker per attempt: the pool learns that the job
        // ended, and the client gets its result, or the job runs again elsewhere if the
        // worker was lost.
        let result = job.result_request().send().promise;
        let changed = self.changed.clone();
        let this = self.this.clone();
        let max_attempts = self.max_attempts;
        self.next_attempt += 1;
        let key = self.next_attempt;
        let (alarm, lost) = oneshot::channel::<()>();
        self.attempts.entry(worker).or_default().insert(key, alarm);
        let limits = self.limits;
        let pool_name = self.name.clone();
        self.running.insert(
            key,
            RunningJob {
                worker: worker_name.clone(),
                client: client.to_string(),
                label: item.label().into_owned(),
                priority,
                started,
                attempt,
                shared: shared.clone(),
            },
        );
        tokio::task::spawn_local(async move {
            // The pool's limits: the time since this attempt started, and the size of its
            // log (looked at every second).
            let over_limit = async {
                let probe = async {
                    loop {
                        tokio::time::sleep(LOG_PROBE).await;
                        // Through the job's state, never holding the worker's `Job`: its
                        // release by the client must reach the worker.
                        let Some(job) = shared.job_of(attempt) else {
                            continue;
                        };
                        let mut req = job.log_request();
                        drop(job);
                        req.get().set_start(-1);
                        if let Ok(r) = req.send().promise.await {
                            let next = r.get().map(|r| r.get_next()).unwrap_or(0);
                            if next as u64 > limits.log_bytes {
                                return format!(
                                    "its log passed the limit of {} bytes of pool {pool_name}",
                                    limits.log_bytes
                                );
                            }
                        }
                    }
                };
                tokio::select! {
                    _ = tokio::time::sleep(limits.time) => format!(
                        "it ran longer than the limit of {} s of pool {pool_name}",
                        limits.time.as_secs_f64()
                    ),
                    m = probe => m,
                }
            };
            let outcome: Result<String, Error> = tokio::select! {
                r = async {
                    let r = result.await?;
                    Ok(r.get()?.get_output()?.to_string()?)
                } => r,
                _ = lost => Err(Error::disconnected("Worker disconnected".into())),
                why = over_limit => {
                    let msg = format!("Job stopped: {why}");
                    // The note first, so that the client reads it before the log ends.
                    let job = shared.job_of(attempt);
                    shared.stopped(&format!("\n{msg}\n"));
                    if let Some(job) = job {
                        let _ = job.cancel_request().send().promise.await;
                    }
                    Err(Error::failed(msg))
                }
            };
            let Some(pool) = this.upgrade() else { return };
            let mut p = pool.borrow_mut();
            if let Some(m) = p.attempts.get_mut(&worker) {
                m.remove(&key);
            }
            p.running.remove(&key);
            p.pool.job_finished(worker);
            if outcome.is_ok() {
                // What this hint's jobs take, for placing the next ones.
                p.pool
                    .observe(&item.hint, cached, started.elapsed().as_secs_f64());
            }
            let retry = matches!(&outcome, Err(e) if e.kind == capnp::ErrorKind::Disconnected)
                && attempt < max_attempts
                && shared.wanted();
            if retry {
                let e = outcome.err().map(|e| relayed(e).extra).unwrap_or_default();
                tracing::warn!("worker {worker_name:?} lost during a job ({e}); queueing it again");
                shared.lost(&format!(
                    "\nWorker {worker_name} was lost ({e}): queued again (attempt {} of {max_attempts})\n",
                    attempt + 1
                ));
                let now = wall_clock();
                let (ticket, _) = p.pool.submit(
                    &client,
                    QueuedJob {
                        descr: std::mem::take(&mut item.descr),
                        hint: item.hint.clone(),
                        shared: Some(shared.clone()),
                        seq: item.seq,
                    },
                    priority,
                    now,
                );
                shared.state.borrow_mut().queued = ticket;
            } else {
                p.forget_job(item.seq);
                shared.finish(outcome.map_err(relayed));
            }
            // (At once, not with the turn's group commit: that measured no faster here,
            // and the row is gone before the client's `result` call is answered.)
            let db = p.db.clone();
            p.flush(&db);
            drop(p);
            changed.notify_waiters();
        });
    }

    /// Lets go of a worker: its queued items go back, its running jobs are lost (and run
    /// again elsewhere if they may).
    fn release_worker(&mut self, worker: WorkerId, name: &str) {
        self.pool.release(worker);
        self.attempts.remove(&worker);
        self.heartbeats.remove(&worker);
        if self.worker_caps.get(name).map(|(id, _)| *id) == Some(worker) {
            self.worker_caps.remove(name);
            self.pinned.remove(name);
        }
    }

    /// A worker that sends heartbeats and has not for `timeout` seconds.
    fn stale(&self, worker: WorkerId, now: f64, timeout: f64) -> bool {
        self.heartbeats
            .get(&worker)
            .is_some_and(|t| now - t > timeout)
    }

    fn running_of(&self, name: &str) -> Option<(WorkerId, i64)> {
        let id = self.pool.connected(name)?;
        Some((id, self.pool.running(id)))
    }
}

// ---- The client's view of a job ----------------------------------------------------------------

/// What the scheduler knows of a job. Kept small while it is queued (issue 12: < 1 KiB
/// per queued job): what only a job that a worker took needs is in [`Run`].
struct JobState {
    /// From the first attempt on.
    run: Option<Box<Run>>,
    outcome: Option<Box<Result<String, Error>>>,
    /// Queued (again): its ticket in the pool.
    /// ([`NOT_QUEUED`] when not: 8 bytes where an `Option` takes 16.)
    queued: TicketId,
    cancelled: bool,
    released: bool,
    /// The client's calls that wait for the job to start or end (`log` and `result`
    /// while it is queued), answered by [`JobShared::wake`]: most jobs have two, kept
    /// here; more go in its [`Run`] (made for them if need be).
    waiting: [Option<Waiting>; 2],
}

/// `JobState::queued` of a job that is not queued (the pool counts its ids up from 1).
const NOT_QUEUED: TicketId = TicketId::MAX;

impl Default for JobState {
    fn default() -> JobState {
        JobState {
            run: None,
            outcome: None,
            queued: NOT_QUEUED,
            cancelled: false,
            released: false,
            waiting: [None, None],
        }
    }
}

/// What the scheduler knows of a job once a worker has taken it, across attempts.
#[derive(Default)]
struct Run {
    /// The current attempt's `Job` on its worker, and the attempt's number.
    current: Option<(job::Client, u32)>,
    attempts: u32,
    /// Where the current attempt's log starts in the client's log: after the lines the
    /// scheduler added (`note`, which ends there).
    base: i64,
    note: Vec<u8>,
    /// The furthest the client has read.
    high: i64,
    /// Wakes the tasks that relay the client's `log` calls when the job changes.
    changed: Rc<tokio::sync::Notify>,
    /// Waiting calls beyond the two a job keeps itself.
    more_waiting: Vec<Waiting>,
}

impl JobState {
    fn run(&mut self) -> &mut Run {
        self.run.get_or_insert_with(Default::default)
    }

    fn current(&self) -> Option<&(job::Client, u32)> {
        self.run.as_ref()?.current.as_ref()
    }

    fn attempts(&self) -> u32 {
        self.run.as_ref().map_or(0, |r| r.attempts)
    }

    fn outcome(&self) -> Option<&Result<String, Error>> {
        self.outcome.as_deref()
    }

    fn push_waiting(&mut self, w: Waiting) {
        match self.waiting.iter_mut().find(|s| s.is_none()) {
            Some(slot) => *slot = Some(w),
            None => self.run().more_waiting.push(w),
        }
    }

    /// Lets go of the waiting calls whose callers gave up.
    fn prune_waiting(&mut self) {
        for slot in &mut self.waiting {
            if slot.as_ref().is_some_and(|w| !w.is_open()) {
                *slot = None;
            }
        }
        if let Some(run) = &mut self.run {
            run.more_waiting.retain(Waiting::is_open);
        }
    }

    fn take_waiting(&mut self) -> Vec<Waiting> {
        let mut all: Vec<Waiting> = std::mem::take(&mut self.waiting)
            .into_iter()
            .flatten()
            .collect();
        if let Some(run) = &mut self.run {
            all.append(&mut run.more_waiting);
        }
        all
    }
}

/// A client's call on its job that waits for the job, as little as it can be (24 bytes,
/// and no more as an `Option`): what answers it, and for `log` where the client wants
/// to read from; a `result` call has [`Waiting::RESULT`] there.
struct Waiting {
    start: i64,
    resp: ocluster_rpc::Responder,
}

impl Waiting {
    /// (No `log` call starts there: the furthest back is `-i64::MAX`.)
    const RESULT: i64 = i64::MIN;

    fn is_open(&self) -> bool {
        self.resp.is_open()
    }
}

/// What a `log` call on a job gets now, or what it waits for.
enum LogNow {
    /// Data and where the next read starts.
    Answer(Vec<u8>, i64),
    /// The current attempt's worker has the log: relay the call.
    Relay,
    /// Queued, or between attempts: nothing to read until a worker takes it.
    Wait,
}

struct JobShared {
    state: RefCell<JobState>,
    /// The client's promise of the job ([`started_job`]), while the client holds it.
    promise: Cell<std::rc::Weak<ocluster_rpc::Promise>>,
    pool: std::rc::Weak<RefCell<PoolApi>>,
}

impl JobShared {
    fn new(pool: &std::rc::Weak<RefCell<PoolApi>>) -> Rc<JobShared> {
        Rc::new(JobShared {
            state: RefCell::new(JobState::default()),
            promise: Cell::new(std::rc::Weak::new()),
            pool: pool.clone(),
        })
    }

    /// The client's promise of the job, while the client holds it.
    fn promise(&self) -> Option<Rc<ocluster_rpc::Promise>> {
        let w = self.promise.take();
        let p = w.upgrade();
        self.promise.set(w);
        p
    }

    fn start_attempt(self: &Rc<Self>, job: job::Client, worker: &str) -> u32 {
        let mut st = self.state.borrow_mut();
        st.queued = NOT_QUEUED;
        let run = st.run();
        run.attempts += 1;
        let n = run.attempts;
        run.current = Some((job, n));
        if n > 1 {
            // The client reads the note and waits at its end; it can grow until then.
            let line = format!("Running again on {worker}\n");
            run.note.extend_from_slice(line.as_bytes());
            run.base += line.len() as i64;
        }
        drop(st);
        self.changed();
        self.settle();
        n
    }

    /// Resolves the client's promise once the job has settled: to the proxy once a worker
    /// took it (or it finished), to the job's error if it ended before.
    fn settle(&self) {
        let Some(p) = self.promise() else {
            return;
        };
        if p.is_resolved() {
            return;
        }
        let st = self.state.borrow();
        let to = if st.attempts() > 0 {
            Some(Ok(()))
        } else {
            match st.outcome() {
                Some(Ok(_)) => Some(Ok(())),
                Some(Err(e)) => Some(Err(e.clone())),
                None => None,
            }
        };
        drop(st);
        match to {
            Some(Ok(())) => p.settle(),
            Some(Err(e)) => p.resolve(Cap::broken(e)),
            None => {}
        }
    }

    /// The worker of the current attempt is gone; `note` goes into the log.
    fn lost(self: &Rc<Self>, note: &str) {
        let mut st = self.state.borrow_mut();
        let run = st.run();
        run.current = None;
        let at = run.high.max(run.base);
        run.note = note.as_bytes().to_vec();
        run.base = at + run.note.len() as i64;
        drop(st);
        self.changed();
    }

    /// The worker's `Job` of `attempt`, if it is still the current one.
    fn job_of(&self, attempt: u32) -> Option<job::Client> {
        match self.state.borrow().current() {
            Some((job, n)) if *n == attempt => Some(job.clone()),
            _ => None,
        }
    }

    /// The scheduler stopped the job (a limit): `note` ends its log.
    fn stopped(self: &Rc<Self>, note: &str) {
        self.lost(note);
    }

    fn finish(self: &Rc<Self>, outcome: Result<String, Error>) {
        let mut st = self.state.borrow_mut();
        if st.outcome.is_none() {
            st.outcome = Some(Box::new(outcome));
        }
        drop(st);
        self.changed();
        self.settle();
    }

    /// The job changed: its relaying tasks look again, its waiting calls are answered.
    fn changed(self: &Rc<Self>) {
        let notify = self.state.borrow().run.as_ref().map(|r| r.changed.clone());
        if let Some(n) = notify {
            n.notify_waiters();
        }
        self.wake();
    }

    /// What a relaying task waits on for the job to change.
    fn notify(&self) -> Rc<tokio::sync::Notify> {
        self.state.borrow_mut().run().changed.clone()
    }

    /// The job changed: the calls that waited for it are answered, or relayed to its
    /// worker, or wait on.
    fn wake(self: &Rc<Self>) {
        let waiting = self.state.borrow_mut().take_waiting();
        for w in waiting {
            match w {
                Waiting {
                    start: Waiting::RESULT,
                    resp,
                } => self.result_call(resp),
                Waiting { start, resp } => self.log_call(start, resp),
            }
        }
    }

    /// Keeps a call until the job changes (dropping those whose callers gave up, so
    /// that a client that calls and cancels again and again holds nothing).
    fn wait(&self, w: Waiting) {
        let mut st = self.state.borrow_mut();
        st.prune_waiting();
        st.push_waiting(w);
    }

    /// `Job.result`: the job's outcome, once it has one.
    fn result_call(self: &Rc<Self>, resp: ocluster_rpc::Responder) {
        let outcome = self.state.borrow().outcome().cloned();
        match outcome {
            Some(Ok(out)) => resp.results(|b, _| {
                b.init_as::<job::result_results::Builder>()
                    .set_output(out.as_str());
                Ok(())
            }),
            Some(Err(e)) => resp.error(e),
            None => self.wait(Waiting {
                start: Waiting::RESULT,
                resp,
            }),
        }
    }

    /// `Job.log` from `start`: the scheduler's own lines, the worker's log (relayed by a
    /// task while the job runs), or nothing more once it ended; while it is queued, the
    /// call waits in the job (no task).
    fn log_call(self: &Rc<Self>, start: i64, resp: ocluster_rpc::Responder) {
        match self.log_now(start, 0) {
            LogNow::Answer(data, next) => answer_log(resp, Ok((data, next))),
            LogNow::Wait => self.wait(Waiting { start, resp }),
            LogNow::Relay => {
                let shared = self.clone();
                tokio::task::spawn_local(async move {
                    let r = tokio::select! {
                        r = shared.relay_log(start) => r,
                        _ = resp.cancelled() => return,
                    };
                    answer_log(resp, r)
                });
            }
        }
    }

    /// What a `log` call from `start` gets now, the attempt `dead` aside (its worker
    /// failed a call).
    fn log_now(&self, start: i64, dead: u32) -> LogNow {
        let mut st = self.state.borrow_mut();
        let ended = st.outcome.is_some();
        let Some(run) = st.run.as_mut() else {
            return match ended {
                true => LogNow::Answer(Vec::new(), start.max(0)),
                false => LogNow::Wait,
            };
        };
        let note_start = run.base - run.note.len() as i64;
        if start >= 0 && start < run.base && !run.note.is_empty() {
            let from = (start.max(note_start) - note_start) as usize;
            let data = run.note[from..].to_vec();
            let next = run.base;
            run.high = run.high.max(next);
            return LogNow::Answer(data, next);
        }
        match &run.current {
            Some((_, n)) if *n != dead => LogNow::Relay,
            _ if ended => LogNow::Answer(Vec::new(), start.max(run.high)),
            _ => LogNow::Wait,
        }
    }

    /// `log` relayed to the current attempt's worker, waiting for the next attempt if
    /// this one's worker is lost meanwhile.
    async fn relay_log(self: &Rc<Self>, start: i64) -> Result<(Vec<u8>, i64), Error> {
        let mut dead_attempt = 0;
        let notify = self.notify();
        loop {
            let changed = notify.notified();
            let target = match self.log_now(start, dead_attempt) {
                LogNow::Answer(data, next) => return Ok((data, next)),
                LogNow::Wait => None,
                LogNow::Relay => {
                    let st = self.state.borrow();
                    st.run.as_ref().and_then(|r| {
                        let (job, n) = r.current.as_ref()?;
                        Some((job.clone(), *n, r.base))
                    })
                }
            };
            let Some((job, attempt, base)) = target else {
                changed.await;
                continue;
            };
            // Offsets in the worker's log are offsets in ours less `base`; a negative
            // start counts from the end of the worker's log.
            let worker_start = if start < 0 { start } else { start - base };
            let mut req = job.log_request();
            drop(job);
            req.get().set_start(worker_start);
            // A wedged worker may never answer: stop waiting once its attempt is over.
            let over = async {
                loop {
                    let changed = notify.notified();
                    let current = self.state.borrow().current().map(|(_, n)| *n);
                    if current != Some(attempt) {
                        return;
                    }
                    changed.await;
                }
            };
            let answer = tokio::select! {
                r = req.send().promise => r,
                _ = over => {
                    dead_attempt = attempt;
                    drop(changed);
                    continue;
                }
            };
            match answer {
                Ok(r) => {
                    let r = r.get()?;
                    let next = base + r.get_next();
                    {
                        let mut st = self.state.borrow_mut();
                        let run = st.run();
                        run.high = run.high.max(next);
                    }
                    return Ok((r.get_log()?.to_vec(), next));
                }
                Err(e) if e.kind == capnp::ErrorKind::Disconnected => {
                    // Look again: the attempt may have ended while the call was out.
                    dead_attempt = attempt;
                    drop(changed);
                }
                Err(e) => return Err(relayed(e)),
            }
        }
    }

    /// Answers a `cancel` call (`Job`'s, or `Ticket`'s once the job has left the queue)
    /// once the worker has (a task: the worker is called).
    fn cancel_call(self: &Rc<Self>, resp: ocluster_rpc::Responder) {
        let shared = self.clone();
        tokio::task::spawn_local(async move {
            match shared.cancel().await {
                Ok(()) => resp.empty(),
                Err(e) => resp.error(e),
            }
        });
    }

    async fn cancel(self: Rc<Self>) -> Result<(), Error> {
        let current = {
            let mut st = self.state.borrow_mut();
            st.cancelled = true;
            st.current().map(|(j, _)| j.clone())
        };
        if self.withdraw("Ticket cancelled") {
            return Ok(());
        }
        if let Some(job) = current {
            job.cancel_request().send().promise.await.map_err(relayed)?;
        }
        Ok(())
    }

    /// Someone still wants the result.
    fn wanted(&self) -> bool {
        let st = self.state.borrow();
        !st.cancelled && !st.released
    }

    /// Takes the job out of the queue if it waits there again; true if it did.
    fn withdraw(self: &Rc<Self>, msg: &str) -> bool {
        let ticket = std::mem::replace(&mut self.state.borrow_mut().queued, NOT_QUEUED);
        if ticket == NOT_QUEUED {
            return false;
        }
        if let Some(pool) = self.pool.upgrade() {
            if let Ok(mut p) = pool.try_borrow_mut() {
                // (Whose it is, while the pool has it.)
                if let Some(client) = p.pool.client_of(ticket) {
                    tracing::info!("{msg}: {client}");
                }
                if let Ok(mut item) = p.pool.cancel(ticket) {
                    item.shared = None;
                    p.forget_job(item.seq);
                    let db = p.db.clone();
                    p.flush(&db);
                }
            }
        }
        self.finish(Err(Error::failed(msg.to_string())));
        true
    }
}

/// The client's `Job`, as the original's: a promise that settles once a worker has taken
/// the job (then to a [`JobProxy`]), or breaks if the job ends before (cancelled or
/// released while queued). Clients rely on it: OCurrent's plugin waits for the job to
/// settle to know that it started ("Waiting for worker…", and its timeout runs from
/// then), and drops its ticket then, which would cancel a job still queued.
///
/// It is an `ocluster_rpc::Promise`: on the wire a promise (`senderPromise`, then a
/// `Resolve` to the proxy or to the job's error), a promise at first even when a worker
/// took the job before the client asked for it, as the original's is; but each call made
/// on it while the job waits goes to the [`JobProxy`] at once, whose methods wait for
/// the job themselves (no queue of calls per job). [`JobShared::settle`] resolves it.
fn started_job(shared: &Rc<JobShared>) -> Rc<ocluster_rpc::Promise> {
    let existing = shared.promise();
    let promise = existing.unwrap_or_else(|| {
        // (A proxy is made only here: dropping one releases the job.)
        let proxy = Cap::local(JobProxy {
            shared: shared.clone(),
        });
        let p = ocluster_rpc::Promise::new(Some(proxy));
        shared.promise.set(Rc::downgrade(&p));
        p
    });
    shared.settle();
    promise
}

/// What the client holds for a job that a worker has taken. It relays `log`, `result`
/// and `cancel` to the current attempt's `Job`, so that the job can run again on another
/// worker when its worker is lost, unseen by the client (an OCaml client too) except for
/// a line in the log. The RPC layer could relay by itself, but it would prefix the
/// worker's errors with "remote exception: " at each hop. Its calls hold only the job's
/// state, never the proxy, so that when the client releases its last reference the
/// worker's job is released at once, which cancels it (as in the original).
///
/// A native object of the RPC layer: while the job is queued, its client's `result` and
/// `log` calls wait in the job's state as bare responders ([`Waiting`]), which is most
/// of what keeps a queued job small (issue 12: < 1 KiB per queued job).
struct JobProxy {
    shared: Rc<JobShared>,
}

impl Drop for JobProxy {
    fn drop(&mut self) {
        tracing::debug!("client released its job");
        let mut st = self.shared.state.borrow_mut();
        st.released = true;
        if let Some(run) = st.run.as_mut() {
            run.current = None;
        }
        drop(st);
        self.shared.withdraw("Job released");
    }
}

impl ocluster_rpc::Object for JobProxy {
    fn call(self: Rc<Self>, call: ocluster_rpc::Call) {
        let shared = self.shared.clone();
        drop(self);
        match (call.interface_id, call.method_id) {
            (ids::JOB, 0) => {
                let start = call
                    .params()
                    .and_then(|p| p.get_as::<job::log_params::Reader>())
                    .map(|p| p.get_start());
                match start {
                    Ok(start) => shared.log_call(start, call.responder()),
                    Err(e) => call.responder().error(e),
                }
            }
            (ids::JOB, 1) => shared.result_call(call.responder()),
            (ids::JOB, 2) => shared.cancel_call(call.responder()),
            (i, m) => call.responder().error(unimplemented(i, m, "Job")),
        }
    }

    fn dedupe(&self) -> bool {
        false
    }
}

/// The error for a method an object does not have, as capnp's generated servers say it.
fn unimplemented(interface_id: u64, method_id: u16, name: &str) -> Error {
    Error::unimplemented(format!(
        "Method {method_id} of interface {interface_id:#x} is not implemented by {name}"
    ))
}

/// Answers a `Job.log` call.
fn answer_log(resp: ocluster_rpc::Responder, r: Result<(Vec<u8>, i64), Error>) {
    match r {
        Ok((data, next)) => resp.results(|b, _| {
            let mut out = b.init_as::<job::log_results::Builder>();
            out.set_log(&data);
            out.set_next(next);
            Ok(())
        }),
        Err(e) => resp.error(e),
    }
}

/// The worker's error as the worker said it.
fn relayed(e: Error) -> Error {
    let mut extra = e.extra.as_str();
    while let Some(rest) = extra.strip_prefix("remote exception: ") {
        extra = rest;
    }
    Error {
        kind: e.kind,
        extra: extra.to_string(),
    }
}

// ---- Registration and Queue ---------------------------------------------------------------

struct RegistrationImpl {
    sched: Rc<Scheduler>,
    pool: Rc<RefCell<PoolApi>>,
    /// A worker's own registration: its name, and the SHA-256 of its secret (checked at
    /// every registration, so that `remove-worker` revokes at once).
    pinned: Option<(String, Vec<u8>)>,
}

impl registration::Server for RegistrationImpl {
    async fn register(
        self: Rc<Self>,
        params: registration::RegisterParams,
        mut results: registration::RegisterResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let name = p.get_name()?.to_str()?.to_string();
        let capacity = p.get_capacity();
        let worker_cap = p.get_worker()?;
        if let Some((pinned, hash)) = &self.pinned {
            if self
                .sched
                .db
                .borrow()
                .lookup_hash(hash)
                .map_err(db_err)?
                .is_none()
            {
                return Err(Error::failed("Access has been revoked".into()));
            }
            if *pinned != name {
                return Err(Error::failed(format!(
                    "This capability registers worker {pinned:?}, not {name:?}"
                )));
            }
        }
        let mut api = self.pool.borrow_mut();
        if let Some(old) = api.pool.connected(&name) {
            let now = self.sched.now();
            let timeout = self.sched.heartbeat_timeout.get();
            let same_credential = matches!(
                (&self.pinned, api.pinned.get(&name)),
                (Some((_, mine)), Some(theirs)) if mine == theirs
            );
            if same_credential || api.stale(old, now, timeout) {
                tracing::warn!(
                    "Worker {name:?} registers again{}: replacing its old connection",
                    if same_credential {
                        " with its own capability"
                    } else {
                        " after missing heartbeats"
                    }
                );
                api.release_worker(old, &name);
                api.flush(&self.sched.db);
            }
        }
        let id = match api.pool.register(&name, i64::from(capacity)) {
            Ok(id) => id,
            Err(PoolError::NameTaken) => {
                tracing::warn!("Worker {name:?} already registered!");
                return Err(Error::failed("Worker already registered!".into()));
            }
            Err(e) => return Err(Error::failed(e.to_string())),
        };
        api.pool.set_active(id, Inactive::WORKER, true);
        tracing::info!("Registered new worker {name:?} in pool {:?}", api.name);
        api.worker_caps.insert(name.clone(), (id, worker_cap));
        match &self.pinned {
            Some((_, hash)) => api.pinned.insert(name.clone(), hash.clone()),
            None => api.pinned.remove(&name),
        };
        api.flush(&self.sched.db);
        api.changed.notify_waiters();
        drop(api);
        let q: queue::Client = capnp_rpc::new_client(QueueImpl {
            sched: self.sched.clone(),
            pool: self.pool.clone(),
            worker: id,
            name,
        });
        results.get().set_queue(q);
        Ok(())
    }
}

struct QueueImpl {
    sched: Rc<Scheduler>,
    pool: Rc<RefCell<PoolApi>>,
    worker: WorkerId,
    name: String,
}

/// Withdraws a pop from the pool if its call goes away unanswered.
struct PopGuard {
    pool: Rc<RefCell<PoolApi>>,
    worker: WorkerId,
    pop: PopId,
}

impl Drop for PopGuard {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pool.try_borrow_mut() {
            if p.pending_pops.remove(&self.pop).is_some() {
                p.pool.cancel_pop(self.worker, self.pop);
            }
        }
    }
}

impl queue::Server for QueueImpl {
    async fn pop(
        self: Rc<Self>,
        params: queue::PopParams,
        mut results: queue::PopResults,
    ) -> Result<(), Error> {
        let job = params.get()?.get_job()?;
        let (tx, rx) = oneshot::channel();
        let pop = {
            let mut p = self.pool.borrow_mut();
            let pop = p.pool.pop(self.worker);
            p.pending_pops.insert(pop, (tx, job));
            p.flush(&self.sched.db);
            pop
        };
        let _guard = PopGuard {
            pool: self.pool.clone(),
            worker: self.worker,
            pop,
        };
        let descr = match rx.await {
            Ok(r) => r?,
            Err(_) => return Err(Error::failed("Worker disconnected".into())),
        };
        let msg = capnp::serialize::read_message_from_flat_slice(
            &mut &descr[..],
            capnp::message::ReaderOptions::new(),
        )?;
        results
            .get()
            .set_descr(msg.get_root::<job_descr::Reader>()?)?;
        Ok(())
    }

    async fn set_active(
        self: Rc<Self>,
        params: queue::SetActiveParams,
        _: queue::SetActiveResults,
    ) -> Result<(), Error> {
        let active = params.get()?.get_active();
        let mut p = self.pool.borrow_mut();
        p.pool.set_active(self.worker, Inactive::WORKER, active);
        p.flush(&self.sched.db);
        Ok(())
    }

    async fn heartbeat(
        self: Rc<Self>,
        params: queue::HeartbeatParams,
        _: queue::HeartbeatResults,
    ) -> Result<(), Error> {
        let now = self.sched.now();
        let their_time = params.get()?.get_time();
        let mut p = self.pool.borrow_mut();
        if p.pool.connected(&self.name) != Some(self.worker) {
            return Err(Error::disconnected(
                "this registration was released (missed heartbeats or revoked); register again"
                    .into(),
            ));
        }
        p.heartbeats.insert(self.worker, now);
        if their_time > 0.0 {
            let skew = their_time - now;
            let limit = self.sched.max_clock_skew.get();
            let off = skew.abs() > limit;
            let paused = p.pool.inactive_for(self.worker, Inactive::CLOCK);
            if off == paused {
                return Ok(());
            }
            if off {
                tracing::warn!(
                    "Worker {:?}'s clock is {skew:+.0} s off ours (more than {limit} s): \
                     pausing it until it is right",
                    self.name
                );
            } else {
                tracing::info!("Worker {:?}'s clock is right again: resuming it", self.name);
            }
            p.pool.set_active(self.worker, Inactive::CLOCK, !off);
            let db = p.db.clone();
            p.flush(&db);
        }
        Ok(())
    }
}

impl Drop for QueueImpl {
    /// The worker has gone (or dropped its queue): release it.
    fn drop(&mut self) {
        let Ok(mut p) = self.pool.try_borrow_mut() else {
            tracing::error!("cannot release worker {:?}: pool busy", self.name);
            return;
        };
        tracing::info!("Release worker {:?}", self.name);
        p.release_worker(self.worker, &self.name);
        p.flush(&self.sched.db);
        p.changed.notify_waiters();
    }
}

// ---- Submission and Ticket ----------------------------------------------------------------

struct SubmissionImpl {
    sched: Rc<Scheduler>,
    client: Rc<str>,
    id_hash: Vec<u8>,
    uri: String,
}

/// A native object of the RPC layer: a submit waits for its row to be written as a bare
/// responder in [`Stored`] (every queued job passes here; a task per submit would be
/// allocated between the jobs' own blocks, and the heap would keep the burst's holes).
impl ocluster_rpc::Object for SubmissionImpl {
    fn call(self: Rc<Self>, call: ocluster_rpc::Call) {
        match (call.interface_id, call.method_id) {
            (ids::SUBMISSION, m @ (0 | 1)) => {
                let enqueued = (|| -> Result<_, Error> {
                    let params = call.params()?;
                    let (pool, descr, priority) = if m == 0 {
                        let p = params.get_as::<submission::submit_params::Reader>()?;
                        (
                            p.get_pool()?,
                            p.get_descr()?,
                            Priority::from(p.get_urgent()),
                        )
                    } else {
                        let p =
                            params.get_as::<submission::submit_with_priority_params::Reader>()?;
                        let priority = p.get_priority();
                        if priority > Priority::URGENT.0 {
                            return Err(Error::failed(format!(
                                "priority {priority} is not a level: 0 (background) to 4 (urgent)"
                            )));
                        }
                        (p.get_pool()?, p.get_descr()?, Priority(priority))
                    };
                    Ok(self.enqueue(pool.to_str()?, descr, priority))
                })();
                let resp = call.responder();
                match enqueued {
                    Ok((ticket, None)) => answer_ticket(resp, ticket),
                    Ok((ticket, Some((stored, batch)))) => {
                        stored.answer_once_written(batch, resp, ticket)
                    }
                    Err(e) => resp.error(e),
                }
            }
            (ids::PERSISTENT, 0) => {
                let uri = self.uri.clone();
                call.responder().results(move |b, _| {
                    b.init_as::<persistent::save_results::Builder>()
                        .init_sturdy_ref()
                        .set_as(uri.as_str())
                })
            }
            (i, m) => call.responder().error(unimplemented(i, m, "Submission")),
        }
    }
}

impl SubmissionImpl {
    fn enqueue(
        &self,
        pool_name: &str,
        descr: job_descr::Reader,
        priority: Priority,
    ) -> (Cap, Option<(Rc<Stored>, u64)>) {
        let broken = |msg: String| (Cap::broken(Error::failed(msg)), None);
        match self.sched.db.borrow().lookup_hash(&self.id_hash) {
            Ok(Some(_)) => {}
            Ok(None) => return broken("Access has been revoked".into()),
            Err(e) => return broken(e.to_string()),
        }
        let Some(pool) = self.sched.pools.get(pool_name) else {
            let names: Vec<&str> = self.sched.pools.keys().map(String::as_str).collect();
            return broken(format!(
                "Pool ID {pool_name:?} not one of {{{}}}",
                names.join(", ")
            ));
        };
        let (hint, bytes) = match (|| -> Result<_, Error> {
            Ok((
                descr.get_cache_hint()?.to_str()?.to_string(),
                serialize_descr(descr)?,
            ))
        })() {
            Ok(x) => x,
            Err(e) => return broken(format!("bad job description: {e}")),
        };
        // A job that carries secrets is never written to disk: a restart loses it, as
        // the original does, and its client submits it again.
        let has_secrets = descr.has_secrets() && descr.get_secrets().is_ok_and(|s| !s.is_empty());
        tracing::info!(
            "Received new job request from {:?} (priority {})",
            self.client,
            priority.name()
        );
        let now = self.sched.now();
        let claimed = pool.borrow_mut().claim(&self.client, &bytes, now);
        if let Some(shared) = claimed {
            tracing::info!(
                "{:?} submitted again a job kept from before the restart: it is that job",
                self.client
            );
            let job = started_job(&shared);
            return (Cap::local(TicketImpl { shared, job }), None);
        }
        {
            let mut p = pool.borrow_mut();
            let persist = p.persist && !has_secrets;
            let seq = if persist { p.next_seq } else { 0 };
            p.next_seq += 1;
            let shared = JobShared::new(&p.this);
            let kept = persist.then(|| (hint.clone(), bytes.clone()));
            let shared_hint = p.hints.get(&hint);
            let (id, start) = p.pool.submit(
                &self.client,
                QueuedJob {
                    descr: bytes.into(),
                    hint: shared_hint,
                    shared: Some(shared.clone()),
                    seq,
                },
                priority,
                now,
            );
            shared.state.borrow_mut().queued = id;
            if let Some((cache_hint, descr)) = kept {
                p.added.push(StoredJob {
                    seq,
                    client: self.client.to_string(),
                    priority: priority.0,
                    fair_start: start,
                    cache_hint,
                    descr,
                });
            }
            // Stored before the client hears of its ticket (the caller waits).
            let batch = p.flush_soon();
            let job = started_job(&shared);
            let ticket = Cap::local(TicketImpl { shared, job });
            (ticket, Some((p.stored.clone(), batch)))
        }
    }
}

/// A client's ticket: its job (submitted on this run, or kept from before a restart and
/// submitted again), and the `Job` its client is given. A native object of the RPC layer,
/// exported once (no entry in the connection's identity table).
struct TicketImpl {
    shared: Rc<JobShared>,
    job: Rc<ocluster_rpc::Promise>,
}

impl ocluster_rpc::Object for TicketImpl {
    fn call(self: Rc<Self>, call: ocluster_rpc::Call) {
        match (call.interface_id, call.method_id) {
            (ids::TICKET, 0) => {
                let job = Cap::Promise(self.job.clone());
                call.responder().results(|b, caps| {
                    b.init_as::<ticket::job_results::Builder>()
                        .set_job(caps.client(job));
                    Ok(())
                })
            }
            (ids::TICKET, 1) => {
                let resp = call.responder();
                if self.shared.withdraw("Ticket cancelled") {
                    return resp.empty();
                }
                // A job that ended before a worker took it: its `Job` is broken.
                let ended = {
                    let st = self.shared.state.borrow();
                    match st.outcome() {
                        Some(Err(e)) if st.attempts() == 0 => Some(e.clone()),
                        _ => None,
                    }
                };
                if let Some(e) = ended {
                    return resp.error(e);
                }
                self.shared.cancel_call(resp);
            }
            (i, m) => call.responder().error(unimplemented(i, m, "Ticket")),
        }
    }

    fn dedupe(&self) -> bool {
        false
    }
}

impl Drop for TicketImpl {
    fn drop(&mut self) {
        tracing::debug!("ticket released");
        self.shared.withdraw("Ticket released (cancelled)");
    }
}

// ---- Admin --------------------------------------------------------------------------------

struct AdminImpl {
    sched: Rc<Scheduler>,
}

impl admin::Server for AdminImpl {
    async fn pools(
        self: Rc<Self>,
        _: admin::PoolsParams,
        mut results: admin::PoolsResults,
    ) -> Result<(), Error> {
        let names = self.sched.pool_names();
        let mut l = results.get().init_names(names.len() as u32);
        for (i, n) in names.iter().enumerate() {
            l.set(i as u32, n.as_str());
        }
        Ok(())
    }

    async fn pool(
        self: Rc<Self>,
        params: admin::PoolParams,
        mut results: admin::PoolResults,
    ) -> Result<(), Error> {
        let name = params.get()?.get_name()?.to_str()?.to_string();
        let cap: pool_admin::Client = match self.sched.pools.get(&name) {
            None => FromClientHook::new(
                capnp_rpc::new_broken_cap(Error::failed("No such pool".into())).hook,
            ),
            Some(p) => capnp_rpc::new_client(PoolAdminImpl {
                sched: self.sched.clone(),
                pool: p.clone(),
            }),
        };
        results.get().set_pool(cap);
        Ok(())
    }

    async fn add_client(
        self: Rc<Self>,
        params: admin::AddClientParams,
        mut results: admin::AddClientResults,
    ) -> Result<(), Error> {
        let name = params.get()?.get_id()?.to_str()?.to_string();
        let id = self.sched.add_client(&name).map_err(db_err)?;
        results.get().set_cap(self.sched.submission(&name, &id));
        Ok(())
    }

    async fn remove_client(
        self: Rc<Self>,
        params: admin::RemoveClientParams,
        _: admin::RemoveClientResults,
    ) -> Result<(), Error> {
        let name = params.get()?.get_id()?.to_str()?.to_string();
        self.sched.remove_client(&name).map_err(db_err)
    }

    async fn add_worker(
        self: Rc<Self>,
        params: admin::AddWorkerParams,
        mut results: admin::AddWorkerResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let uri = self
            .sched
            .add_worker(p.get_pool()?.to_str()?, p.get_name()?.to_str()?)?;
        results.get().set_uri(uri.as_str());
        Ok(())
    }

    async fn remove_worker(
        self: Rc<Self>,
        params: admin::RemoveWorkerParams,
        _: admin::RemoveWorkerResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        self.sched
            .remove_worker(p.get_pool()?.to_str()?, p.get_name()?.to_str()?)
    }

    async fn list_clients(
        self: Rc<Self>,
        _: admin::ListClientsParams,
        mut results: admin::ListClientsResults,
    ) -> Result<(), Error> {
        let names = self.sched.db.borrow().list_clients().map_err(db_err)?;
        let mut l = results.get().init_clients(names.len() as u32);
        for (i, n) in names.iter().enumerate() {
            l.set(i as u32, n.as_str());
        }
        Ok(())
    }
}

struct PoolAdminImpl {
    sched: Rc<Scheduler>,
    pool: Rc<RefCell<PoolApi>>,
}

async fn report(progress: &Option<progress::Client>, msg: String) {
    if let Some(p) = progress {
        let mut r = p.report_request();
        r.get().set_status(msg.as_str());
        if let Err(e) = r.send().promise.await {
            tracing::info!("Failed to send progress report ({msg}): {e}");
        }
    }
}

impl PoolAdminImpl {
    /// Waits until the running count of `worker` differs from `prev`, or it has gone.
    async fn running_changed(&self, name: &str, worker: WorkerId, prev: i64) -> i64 {
        loop {
            let changed = self.pool.borrow().changed.clone();
            let notified = changed.notified();
            let now = self.pool.borrow().pool.running(worker);
            if now != prev {
                return now;
            }
            let _ = name;
            notified.await;
        }
    }
}

impl pool_admin::Server for PoolAdminImpl {
    async fn show(
        self: Rc<Self>,
        _: pool_admin::ShowParams,
        mut results: pool_admin::ShowResults,
    ) -> Result<(), Error> {
        let s = self.pool.borrow().pool.show(self.sched.now());
        results.get().set_state(s.as_str());
        Ok(())
    }

    async fn workers(
        self: Rc<Self>,
        _: pool_admin::WorkersParams,
        mut results: pool_admin::WorkersResults,
    ) -> Result<(), Error> {
        let ws = self.pool.borrow().pool.known_workers();
        let mut l = results.get().init_workers(ws.len() as u32);
        for (i, (name, active, connected)) in ws.iter().enumerate() {
            let mut w = l.reborrow().get(i as u32);
            w.set_name(name.as_str());
            w.set_active(*active);
            w.set_connected(*connected);
        }
        Ok(())
    }

    async fn worker(
        self: Rc<Self>,
        params: pool_admin::WorkerParams,
        mut results: pool_admin::WorkerResults,
    ) -> Result<(), Error> {
        let name = params.get()?.get_worker()?.to_str()?.to_string();
        let cap = self
            .pool
            .borrow()
            .worker_caps
            .get(&name)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| Error::failed("Unknown worker".into()))?;
        results.get().set_worker(cap);
        Ok(())
    }

    async fn set_active(
        self: Rc<Self>,
        params: pool_admin::SetActiveParams,
        _: pool_admin::SetActiveResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let name = p.get_worker()?.to_str()?.to_string();
        let (active, auto_create) = (p.get_active(), p.get_auto_create());
        let mut api = self.pool.borrow_mut();
        let r = api.pool.admin_set_active(&name, active, auto_create);
        api.flush(&self.sched.db);
        r.map_err(|_| Error::failed("Unknown worker".into()))
    }

    async fn drain(
        self: Rc<Self>,
        params: pool_admin::DrainParams,
        _: pool_admin::DrainResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let name = p.get_worker()?.to_str()?.to_string();
        let progress = p.get_progress().ok();
        let connected = self.pool.borrow().running_of(&name);
        let Some((id, mut running)) = connected else {
            let known = {
                let mut api = self.pool.borrow_mut();
                let known = api.pool.is_known(&name);
                if known {
                    let _ = api.pool.admin_set_active(&name, false, false);
                    api.flush(&self.sched.db);
                }
                known
            };
            if !known {
                return Err(Error::failed("Unknown worker".into()));
            }
            report(&progress, "Disconnected (nothing to drain)".into()).await;
            return Ok(());
        };
        {
            let mut api = self.pool.borrow_mut();
            api.pool.set_active(id, Inactive::ADMIN_PAUSE, false);
            api.flush(&self.sched.db);
        }
        loop {
            report(&progress, format!("Running jobs: {running}")).await;
            if running <= 0 {
                return Ok(());
            }
            running = self.running_changed(&name, id, running).await;
        }
    }

    async fn update(
        self: Rc<Self>,
        params: pool_admin::UpdateParams,
        _: pool_admin::UpdateResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let name = p.get_worker()?.to_str()?.to_string();
        let progress = p.get_progress().ok();
        let (id, cap) = {
            let api = self.pool.borrow();
            match api.worker_caps.get(&name) {
                Some((id, cap)) => (*id, cap.clone()),
                None => return Err(Error::failed("Unknown worker".into())),
            }
        };
        {
            let mut api = self.pool.borrow_mut();
            tracing::info!("Worker {name:?} is shutting down");
            api.pool.shutdown(id);
            api.flush(&self.sched.db);
        }
        let mut running = self.pool.borrow().pool.running(id);
        while running > 0 {
            report(&progress, format!("Running jobs: {running}")).await;
            running = self.running_changed(&name, id, running).await;
        }
        report(&progress, "Restarting".into()).await;
        tracing::info!("Restarting {name:?}");
        match cap.self_update_request().send().promise.await {
            Ok(_) => {}
            Err(e) if e.kind == capnp::ErrorKind::Disconnected => {}
            Err(e) => return Err(e),
        }
        tracing::info!("Waiting for {name:?} to reconnect after update");
        let wait = async {
            loop {
                let changed = self.pool.borrow().changed.clone();
                let notified = changed.notified();
                if let Some(new) = self.pool.borrow().pool.connected(&name) {
                    if new != id {
                        return;
                    }
                }
                notified.await;
            }
        };
        tokio::time::timeout(RESTART_TIMEOUT, wait)
            .await
            .map_err(|_| Error::failed("Timeout waiting for worker to reconnect!".into()))
    }

    async fn set_rate(
        self: Rc<Self>,
        params: pool_admin::SetRateParams,
        _: pool_admin::SetRateResults,
    ) -> Result<(), Error> {
        let p = params.get()?;
        let client = p.get_id()?.to_str()?.to_string();
        let rate = p.get_rate();
        if !self
            .sched
            .db
            .borrow()
            .client_exists(&client)
            .map_err(db_err)?
        {
            return Err(Error::failed("No such user".into()));
        }
        let now = self.sched.now();
        let mut api = self.pool.borrow_mut();
        api.pool
            .set_rate(&client, rate, now)
            .map_err(|e| Error::failed(e.to_string()))?;
        api.flush(&self.sched.db);
        Ok(())
    }

    async fn forget(
        self: Rc<Self>,
        params: pool_admin::ForgetParams,
        _: pool_admin::ForgetResults,
    ) -> Result<(), Error> {
        let name = params.get()?.get_worker()?.to_str()?.to_string();
        let mut api = self.pool.borrow_mut();
        let r = api.pool.forget(&name);
        api.flush(&self.sched.db);
        r.map_err(|e| Error::failed(e.to_string()))
    }
}

#[cfg(test)]
mod sizes {
    /// A queued job keeps one `JobShared` (and its waiting calls inside it): keep them
    /// small (issue 12: < 1 KiB per queued job, all included).
    #[test]
    fn a_queued_job_s_state_stays_small() {
        use std::mem::size_of;
        assert!(size_of::<Option<super::Waiting>>() <= 24);
        // (An `Rc` of it is then a block of 128 bytes with glibc's header.)
        assert!(size_of::<super::JobShared>() <= 104);
        // The pool's ticket of it (boxed): a block of 128 bytes. Its client and
        // priority are the ticket's, not copies in the job.
        assert!(crate::pool::ticket_bytes::<super::QueuedJob>() <= 120);
    }
}
