//! One pool's scheduling, as a pure state machine: no I/O, no clock of its own, no async.
//! Behaviour follows OCluster's `scheduler/pool.ml` exactly (reference/ocluster.md §2), so
//! that `show` transcripts match the original's, with two differences of form:
//!
//! * a worker blocked in `pop` is a [`PopId`]; its answer comes back as an [`Event`]
//!   (immediately when work is at hand, otherwise after a later call);
//! * waking a blocked `pop` is deferred to [`Pool::settle`], as Lwt defers a woken thread
//!   to its next turn. The RPC adapter settles after every call; transcript tests settle
//!   where the original's tests yield (`Lwt.pause`), and so see the same states.
//!
//! What the original keeps in SQLite (learned cache hints, client rates, known workers and
//! their admin pause) lives here in memory, loaded at start ([`PoolState`]), and every
//! change is queued as a [`DbWrite`] for the adapter to apply, so the hot path never waits
//! for the disk.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::rc::Rc;

use crate::text::{rough_duration, Wrapped};

/// What a job is to the scheduler.
pub trait Item {
    /// Jobs with the same non-empty hint prefer workers that ran it before.
    fn cache_hint(&self) -> &str;
    /// How `show` names the job: its cache hint, or `(no cache hint)`.
    fn label(&self) -> Cow<'_, str> {
        match self.cache_hint() {
            "" => Cow::Borrowed("(no cache hint)"),
            h => Cow::Borrowed(h),
        }
    }
}

/// Estimated costs of a job, in "seconds" (the original's hard-coded model: 10 cached, 600
/// not; its tests use 2 and 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Costs {
    pub cached: i64,
    pub non_cached: i64,
}

impl Costs {
    /// OCluster's model.
    pub const DEFAULT: Costs = Costs {
        cached: 10,
        non_cached: 600,
    };
}

/// Why a worker takes no work; a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Inactive(u8);

impl Inactive {
    pub const NONE: Inactive = Inactive(0);
    /// The worker paused itself, has not said it is ready yet, or has gone.
    pub const WORKER: Inactive = Inactive(1);
    /// An admin paused it (kept in the database across reconnections).
    pub const ADMIN_PAUSE: Inactive = Inactive(2);
    /// `update` is restarting it (never cleared on this connection).
    pub const SHUTDOWN: Inactive = Inactive(4);
    /// Its clock is off (by its heartbeats); cleared when it is right again.
    pub const CLOCK: Inactive = Inactive(8);

    /// Every reason in `self` is in `other`.
    fn subset_of(self, other: Inactive) -> bool {
        self.0 & other.0 == self.0
    }

    fn union(self, other: Inactive) -> Inactive {
        Inactive(self.0 | other.0)
    }

    fn minus(self, other: Inactive) -> Inactive {
        Inactive(self.0 & !other.0)
    }
}

impl std::fmt::Display for Inactive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return f.write_str("active");
        }
        let mut parts = Vec::new();
        if Inactive::WORKER.subset_of(*self) {
            parts.push("worker pause");
        }
        if Inactive::ADMIN_PAUSE.subset_of(*self) {
            parts.push("admin pause");
        }
        if Inactive::SHUTDOWN.subset_of(*self) {
            parts.push("shutting down");
        }
        if Inactive::CLOCK.subset_of(*self) {
            parts.push("clock skew");
        }
        f.write_str(&parts.join(", "))
    }
}

pub type TicketId = u64;
pub type PopId = u64;
/// One registration of a worker: a worker that reconnects under the same name is another.
pub type WorkerId = u64;

/// What the scheduler learned and must remember, as loaded from its database.
#[derive(Debug, Clone, Default)]
pub struct PoolState {
    /// Cache hint → workers that were given a job with it.
    pub cached: HashMap<String, BTreeSet<String>>,
    /// Client → rate in this pool.
    pub rates: HashMap<String, f64>,
    /// Every worker ever registered or created by an admin → admin-paused.
    pub workers: BTreeMap<String, bool>,
    /// Cache hint → what its jobs took, in seconds (a moving average), on workers without
    /// and with the hint cached.
    pub costs: HashMap<String, [Option<f64>; 2]>,
    /// Client → its fair-share clock (the next fair start time), so that a restart does
    /// not hand a client that had dumped a thousand jobs a fresh share.
    pub clocks: HashMap<String, f64>,
}

/// A change to remember, for the adapter to write to the database.
#[derive(Debug, Clone, PartialEq)]
pub enum DbWrite {
    MarkCached {
        hint: String,
        worker: String,
    },
    SetRate {
        client: String,
        rate: f64,
    },
    /// The client was revoked: its rate and its clock go.
    RemoveRate {
        client: String,
    },
    EnsureWorker {
        worker: String,
    },
    ForgetWorker {
        worker: String,
    },
    SetPaused {
        worker: String,
        paused: bool,
    },
    SetClock {
        client: String,
        next_fair_start: f64,
    },
    SetCost {
        hint: String,
        cached: bool,
        seconds: f64,
    },
}

/// How far a learned cost moves towards each new run time.
const COST_WEIGHT: f64 = 0.3;

/// Something the adapter must act on.
#[derive(Debug)]
pub enum Event<I> {
    /// `pop` answers with this job.
    Assigned {
        pop: PopId,
        worker: WorkerId,
        ticket: TicketId,
        /// Whose job it is, and its priority (kept by the pool, not in every item).
        client: Rc<str>,
        priority: Priority,
        item: I,
        /// The worker had run a job with this cache hint before.
        cached: bool,
    },
    /// The worker has gone: `pop` fails ("Worker disconnected").
    PopFailed { pop: PopId },
}

/// Errors of the calls that can be refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("Worker already registered!")]
    NameTaken,
    #[error("Worker {0:?} is still connected!")]
    StillConnected(String),
    #[error("Worker {0:?} not known in this pool")]
    UnknownWorker(String),
    #[error("the ticket is not queued")]
    NotQueued,
    #[error("rate must be positive")]
    BadRate,
}

/// How soon a job should run: a higher level runs first. The original has one flag,
/// `urgent`; it maps onto [`Priority::URGENT`], and its absence onto
/// [`Priority::NORMAL`], so that with OCaml clients the order is the original's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Priority(pub u8);

impl Priority {
    pub const BACKGROUND: Priority = Priority(0);
    pub const LOW: Priority = Priority(1);
    pub const NORMAL: Priority = Priority(2);
    pub const HIGH: Priority = Priority(3);
    pub const URGENT: Priority = Priority(4);
    /// Every level, lowest first, with its name.
    pub const LEVELS: [(Priority, &'static str); 5] = [
        (Priority::BACKGROUND, "background"),
        (Priority::LOW, "low"),
        (Priority::NORMAL, "normal"),
        (Priority::HIGH, "high"),
        (Priority::URGENT, "urgent"),
    ];

    pub fn name(self) -> &'static str {
        Priority::LEVELS
            .iter()
            .find(|(p, _)| *p == self)
            .map_or("urgent", |(_, n)| n)
    }

    /// A level by name or number (0-4).
    pub fn parse(s: &str) -> Option<Priority> {
        Priority::LEVELS
            .iter()
            .find(|(p, n)| *n == s || p.0.to_string() == s)
            .map(|(p, _)| *p)
    }

    /// Above normal: what the original's `urgent` flag (and its metrics' `high`) means.
    pub fn is_high(self) -> bool {
        self > Priority::NORMAL
    }
}

impl From<bool> for Priority {
    /// OCaml's `urgent` flag.
    fn from(urgent: bool) -> Priority {
        if urgent {
            Priority::URGENT
        } else {
            Priority::NORMAL
        }
    }
}

/// Queue order: the highest priority first, then the earliest fair start time, then
/// submission order.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Key {
    priority: Priority,
    start: f64,
    seq: u64,
}

impl Eq for Key {}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .priority
            .cmp(&self.priority)
            .then(self.start.total_cmp(&other.start))
            .then(self.seq.cmp(&other.seq))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A priority queue of tickets (the pool's backlog or a worker's local queue).
#[derive(Debug, Default)]
struct Queue {
    items: BTreeMap<Key, TicketId>,
}

impl Queue {
    fn pop_first(&mut self) -> Option<TicketId> {
        self.items.pop_first().map(|(_, id)| id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Backlog,
    Worker(WorkerId),
}

/// The bytes a ticket of `I` takes in the pool (boxed), for the memory tests.
pub fn ticket_bytes<I>() -> usize {
    std::mem::size_of::<Ticket<I>>()
}

struct Ticket<I> {
    item: I,
    key: Key,
    /// (Shared by the client's tickets: see [`Pool::client_name`].)
    client: Rc<str>,
    /// The estimated cost it was queued at on a worker; -1 in the backlog.
    cost: i64,
    place: Place,
    /// When it was put in its worker's queue.
    queued_at: f64,
}

enum Main {
    /// No worker is waiting.
    Backlog(Queue),
    /// No work is waiting: pops blocked, newest first (the original's list order).
    Ready(VecDeque<(WorkerId, PopId)>),
}

enum State {
    Running(Queue),
    Inactive(Inactive),
    Finished,
}

struct Worker {
    name: String,
    capacity: i64,
    state: State,
    workload: i64,
    running: i64,
    /// Pops of this worker that wait (in the ready list, or for reactivation).
    waiting: Vec<PopId>,
}

struct Client {
    next_fair_start: f64,
}

/// A pool as the status page shows it ([`Pool::view`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolView {
    pub name: String,
    /// The connected workers' capacity.
    pub capacity: i64,
    /// The pool's queue (no worker is free), first to run first.
    pub backlog: Vec<QueuedView>,
    pub backlog_len: usize,
    /// Free slots waiting for work (no work is waiting).
    pub idle: usize,
    pub workers: Vec<WorkerView>,
    /// Known workers not connected, and whether an admin paused them.
    pub disconnected: Vec<(String, bool)>,
    pub clients: Vec<ClientView>,
    pub counters: Counters,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct QueuedView {
    pub client: String,
    pub label: String,
    pub priority: &'static str,
    /// Seconds until its fair start time (negative: it is due).
    pub start_in: f64,
    /// The cost it was queued at on its worker (-1 in the pool's queue).
    pub cost: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WorkerView {
    pub name: String,
    /// `active`, or `paused (REASONS)`.
    pub state: String,
    pub capacity: i64,
    pub running: i64,
    /// The expected cost of its queue.
    pub workload: i64,
    /// Jobs placed on it, not started, first to run first.
    pub queue: Vec<QueuedView>,
    pub queue_len: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientView {
    pub name: String,
    pub rate: f64,
    /// How far its fair-share clock is ahead of now, in seconds.
    pub ahead: f64,
    pub queued: usize,
}

/// Counts for the Prometheus metrics.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Counters {
    pub submitted: u64,
    pub cancelled: u64,
    pub accepted: u64,
    /// Jobs an idle worker took from a busy one's queue.
    pub stolen: u64,
}

pub struct Pool<I> {
    name: String,
    costs: Costs,
    main: Main,
    /// (Boxed: a bucket of a map that doubles as it grows is mostly empty; a ticket
    /// is ~150 bytes, a box 8.)
    tickets: HashMap<TicketId, Box<Ticket<I>>>,
    workers: HashMap<WorkerId, Worker>,
    /// Connected workers by name.
    connected: BTreeMap<String, WorkerId>,
    clients: BTreeMap<String, Client>,
    /// The names of the clients that have queued jobs, each held once.
    names: HashSet<Rc<str>>,
    cluster_capacity: i64,
    pending_cached: HashMap<String, i64>,
    state: PoolState,
    writes: Vec<DbWrite>,
    events: Vec<Event<I>>,
    woken: VecDeque<WorkerId>,
    next_id: u64,
    counters: Counters,
    /// The latest time the adapter gave (at a submit or a [`Pool::steal`]).
    now: f64,
}

impl<I: Item> Pool<I> {
    pub fn new(name: &str, costs: Costs, mut state: PoolState) -> Pool<I> {
        let clients = std::mem::take(&mut state.clocks)
            .into_iter()
            .map(|(c, next_fair_start)| (c, Client { next_fair_start }))
            .collect();
        Pool {
            name: name.to_string(),
            costs,
            main: Main::Backlog(Queue::default()),
            tickets: HashMap::new(),
            workers: HashMap::new(),
            connected: BTreeMap::new(),
            clients,
            names: HashSet::new(),
            cluster_capacity: 0,
            pending_cached: HashMap::new(),
            state,
            writes: Vec::new(),
            events: Vec::new(),
            woken: VecDeque::new(),
            next_id: 1,
            counters: Counters::default(),
            now: 0.0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Whether database writes are queued.
    pub fn has_writes(&self) -> bool {
        !self.writes.is_empty()
    }

    /// Takes the database writes queued so far.
    pub fn take_writes(&mut self) -> Vec<DbWrite> {
        std::mem::take(&mut self.writes)
    }

    /// Takes the events produced so far.
    pub fn take_events(&mut self) -> Vec<Event<I>> {
        std::mem::take(&mut self.events)
    }

    // ---- clients -------------------------------------------------------------------

    /// `client`'s name, as the tickets hold it.
    fn client_name(&mut self, client: &str) -> Rc<str> {
        if let Some(n) = self.names.get(client) {
            return n.clone();
        }
        let n: Rc<str> = Rc::from(client);
        self.names.insert(n.clone());
        n
    }

    fn client_entry(&mut self, client: &str, now: f64) -> &mut Client {
        self.clients.entry(client.to_string()).or_insert(Client {
            next_fair_start: now,
        })
    }

    /// Makes `client` known to this pool (its fair-share clock starts now).
    pub fn touch_client(&mut self, client: &str, now: f64) {
        self.client_entry(client, now);
    }

    pub fn rate(&self, client: &str) -> f64 {
        self.state.rates.get(client).copied().unwrap_or(1.0)
    }

    /// Sets `client`'s expected share of this pool (the number of jobs it expects to run
    /// at once).
    pub fn set_rate(&mut self, client: &str, rate: f64, now: f64) -> Result<(), PoolError> {
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(PoolError::BadRate);
        }
        self.client_entry(client, now);
        self.state.rates.insert(client.to_string(), rate);
        self.writes.push(DbWrite::SetRate {
            client: client.to_string(),
            rate,
        });
        Ok(())
    }

    /// Forgets a revoked client's rate and clock. Its queued and running jobs go on.
    pub fn remove_client(&mut self, client: &str) {
        self.state.rates.remove(client);
        self.writes.push(DbWrite::RemoveRate {
            client: client.to_string(),
        });
        self.clients.remove(client);
    }

    /// Queues a job from `client`; returns its ticket and its fair start time (to keep
    /// with the job, for [`Pool::restore`]).
    pub fn submit(
        &mut self,
        client: &str,
        item: I,
        priority: impl Into<Priority>,
        now: f64,
    ) -> (TicketId, f64) {
        self.now = self.now.max(now);
        let cost = self.price(item.cache_hint());
        let rate = self.rate(client);
        let c = self.client_entry(client, now);
        let start = now.max(c.next_fair_start);
        c.next_fair_start = start + cost as f64 / rate;
        let next_fair_start = c.next_fair_start;
        self.writes.push(DbWrite::SetClock {
            client: client.to_string(),
            next_fair_start,
        });
        self.counters.submitted += 1;
        (self.enqueue(client, item, priority.into(), start), start)
    }

    /// Queues again a job that was queued before a restart, at the fair start time it had
    /// (its client's clock was kept, so it does not advance).
    pub fn restore(&mut self, client: &str, item: I, priority: Priority, start: f64) -> TicketId {
        self.price(item.cache_hint());
        self.enqueue(client, item, priority, start)
    }

    /// What a new job with `hint` is expected to cost (and counts it as pending).
    fn price(&mut self, hint: &str) -> i64 {
        if hint.is_empty() {
            self.costs.non_cached
        } else {
            let pending = self.pending_cached.entry(hint.to_string()).or_insert(0);
            *pending += 1;
            let cached = *pending > 1 || self.state.cached.get(hint).is_some_and(|w| !w.is_empty());
            self.cost_of(hint, cached)
        }
    }

    /// A job's expected cost with `hint` on a worker that has it cached or not: what its
    /// runs took (a moving average), or the model's guess before any run.
    pub fn cost_of(&self, hint: &str, cached: bool) -> i64 {
        let (non_cached, cached_cost) = self.costs_of(hint);
        if cached {
            cached_cost
        } else {
            non_cached
        }
    }

    /// A job's expected costs with `hint`: (not cached, cached).
    fn costs_of(&self, hint: &str) -> (i64, i64) {
        let secs = |s: f64| (s.ceil() as i64).max(1);
        match self.state.costs.get(hint) {
            None => (self.costs.non_cached, self.costs.cached),
            Some([n, c]) => (
                n.map_or(self.costs.non_cached, secs),
                c.map_or(self.costs.cached, secs),
            ),
        }
    }

    /// A job with `hint` ran for `secs` on a worker that had the hint cached or not: the
    /// hint's cost moves towards it.
    pub fn observe(&mut self, hint: &str, cached: bool, secs: f64) {
        if hint.is_empty() || !secs.is_finite() || secs < 0.0 {
            return;
        }
        let slot = &mut self.state.costs.entry(hint.to_string()).or_default()[usize::from(cached)];
        let old = *slot;
        let avg = match old {
            Some(old) => old + COST_WEIGHT * (secs - old),
            None => secs,
        };
        *slot = Some(avg);
        // Written when the cost as used (whole seconds) changes, not at every job.
        if old.is_some_and(|o| o.ceil() == avg.ceil()) {
            return;
        }
        self.writes.push(DbWrite::SetCost {
            hint: hint.to_string(),
            cached,
            seconds: avg,
        });
    }

    fn enqueue(&mut self, client: &str, item: I, priority: Priority, start: f64) -> TicketId {
        let id = self.fresh_id();
        let key = Key {
            priority,
            start,
            seq: id,
        };
        let client = self.client_name(client);
        self.tickets.insert(
            id,
            Box::new(Ticket {
                item,
                key,
                client,
                cost: -1,
                place: Place::Backlog,
                queued_at: start,
            }),
        );
        self.add(id);
        id
    }

    /// Whose job a queued ticket is.
    pub fn client_of(&self, ticket: TicketId) -> Option<&str> {
        self.tickets.get(&ticket).map(|t| &*t.client)
    }

    /// Takes a queued ticket out (the client cancelled it, or dropped it). A ticket
    /// already given to a worker is not queued: cancel its job instead.
    pub fn cancel(&mut self, ticket: TicketId) -> Result<I, PoolError> {
        let t = self.tickets.remove(&ticket).ok_or(PoolError::NotQueued)?;
        match t.place {
            Place::Backlog => {
                if let Main::Backlog(q) = &mut self.main {
                    q.items.remove(&t.key);
                }
            }
            Place::Worker(w) => {
                if let Some(w) = self.workers.get_mut(&w) {
                    if let State::Running(q) = &mut w.state {
                        q.items.remove(&t.key);
                    }
                    w.workload -= t.cost;
                }
            }
        }
        self.dec_pending(t.item.cache_hint());
        self.counters.cancelled += 1;
        Ok(t.item)
    }

    fn dec_pending(&mut self, hint: &str) {
        if hint.is_empty() {
            return;
        }
        if let Some(n) = self.pending_cached.get_mut(hint) {
            if *n > 1 {
                *n -= 1;
            } else {
                self.pending_cached.remove(hint);
            }
        }
    }

    // ---- placement -----------------------------------------------------------------

    /// The connected, active worker among those that ran `hint` that would start it
    /// soonest: the least queued work per slot of its capacity (at most `max_wait`); on
    /// a tie the last in name order. (The original compares queued work alone, so a
    /// machine of 32 slots and one of 1 looked alike.)
    fn best_worker(&self, hint: &str, max_wait: i64) -> Option<WorkerId> {
        let names = self.state.cached.get(hint)?;
        let mut best: Option<(WorkerId, f64)> = None;
        for name in names {
            let Some(&id) = self.connected.get(name) else {
                continue;
            };
            let w = &self.workers[&id];
            let wait = w.workload as f64 / w.capacity.max(1) as f64;
            if wait > max_wait as f64 || !matches!(w.state, State::Running(_)) {
                continue;
            }
            match best {
                Some((_, load)) if load < wait => {}
                _ => best = Some((id, wait)),
            }
        }
        best.map(|(id, _)| id)
    }

    fn enqueue_on_worker(&mut self, ticket: TicketId, worker: WorkerId, cost: i64) {
        let t = self.tickets.get_mut(&ticket).expect("ticket exists");
        t.cost = cost;
        t.place = Place::Worker(worker);
        t.queued_at = self.now;
        let key = t.key;
        let w = self.workers.get_mut(&worker).expect("worker exists");
        w.workload += cost;
        if let State::Running(q) = &mut w.state {
            q.items.insert(key, ticket);
        }
        self.wake(worker);
    }

    /// Sends the ticket to a worker that has its hint cached, if one is free enough.
    fn assign_preferred(&mut self, ticket: TicketId) -> bool {
        let hint = self.tickets[&ticket].item.cache_hint();
        if hint.is_empty() {
            return false;
        }
        let (non_cached, cached) = self.costs_of(hint);
        match self.best_worker(hint, non_cached) {
            None => false,
            Some(w) => {
                tracing::debug!(pool = %self.name, worker = %self.workers[&w].name, "assigning to the preferred worker");
                self.enqueue_on_worker(ticket, w, cached);
                true
            }
        }
    }

    /// Records that `worker` was given a job with `hint`; whether it had been before.
    fn mark_cached(&mut self, hint: &str, worker: WorkerId) -> bool {
        let name = &self.workers[&worker].name;
        match self.state.cached.get_mut(hint) {
            Some(set) if set.contains(name) => return true,
            Some(set) => {
                set.insert(name.clone());
            }
            None => {
                self.state
                    .cached
                    .insert(hint.to_string(), BTreeSet::from([name.clone()]));
            }
        }
        self.writes.push(DbWrite::MarkCached {
            hint: hint.to_string(),
            worker: name.clone(),
        });
        false
    }

    fn add(&mut self, ticket: TicketId) {
        loop {
            match &mut self.main {
                Main::Backlog(q) => {
                    let t = self.tickets.get_mut(&ticket).expect("ticket exists");
                    t.place = Place::Backlog;
                    t.cost = -1;
                    q.items.insert(t.key, ticket);
                    return;
                }
                Main::Ready(q) if q.is_empty() => {
                    self.main = Main::Backlog(Queue::default());
                }
                Main::Ready(_) => {
                    if self.assign_preferred(ticket) {
                        return;
                    }
                    let Main::Ready(q) = &mut self.main else {
                        unreachable!()
                    };
                    let (worker, _pop) = q.pop_back().expect("not empty");
                    if !matches!(
                        self.workers.get(&worker).map(|w| &w.state),
                        Some(State::Running(_))
                    ) {
                        continue; // A stale entry: try the next.
                    }
                    let hint = self.tickets[&ticket].item.cache_hint().to_string();
                    self.enqueue_on_worker(ticket, worker, self.cost_of(&hint, false));
                    self.mark_cached(&hint, worker);
                    return;
                }
            }
        }
    }

    fn wake(&mut self, worker: WorkerId) {
        if !self.woken.contains(&worker) {
            self.woken.push_back(worker);
        }
    }

    // ---- workers -------------------------------------------------------------------

    /// A worker connects. It starts inactive (as paused by itself, and by an admin if the
    /// database says so) until [`Pool::set_active`] with [`Inactive::WORKER`].
    pub fn register(&mut self, name: &str, capacity: i64) -> Result<WorkerId, PoolError> {
        if self.connected.contains_key(name) {
            return Err(PoolError::NameTaken);
        }
        if !self.state.workers.contains_key(name) {
            self.state.workers.insert(name.to_string(), false);
            self.writes.push(DbWrite::EnsureWorker {
                worker: name.to_string(),
            });
        }
        let mut reasons = Inactive::WORKER;
        if self.state.workers[name] {
            reasons = reasons.union(Inactive::ADMIN_PAUSE);
        }
        let id = self.fresh_id();
        self.workers.insert(
            id,
            Worker {
                name: name.to_string(),
                capacity,
                state: State::Inactive(reasons),
                workload: 0,
                running: 0,
                waiting: Vec::new(),
            },
        );
        self.connected.insert(name.to_string(), id);
        self.cluster_capacity += capacity;
        Ok(id)
    }

    /// The worker asks for a job. The answer is an [`Event`], now if there is work
    /// for it, else later.
    pub fn pop(&mut self, worker: WorkerId) -> PopId {
        let pop = self.fresh_id();
        self.run_pop(worker, pop);
        pop
    }

    fn run_pop(&mut self, worker: WorkerId, pop: PopId) {
        loop {
            let Some(w) = self.workers.get_mut(&worker) else {
                self.events.push(Event::PopFailed { pop });
                return;
            };
            match &mut w.state {
                State::Finished => {
                    self.events.push(Event::PopFailed { pop });
                    return;
                }
                State::Inactive(_) => {
                    w.waiting.push(pop);
                    return;
                }
                State::Running(q) => {
                    if let Some(ticket) = q.pop_first() {
                        let t = self.tickets.remove(&ticket).expect("ticket exists");
                        w.workload -= t.cost;
                        self.start(worker, pop, ticket, *t);
                        return;
                    }
                }
            }
            match &mut self.main {
                Main::Ready(q) => {
                    q.push_front((worker, pop));
                    self.workers.get_mut(&worker).unwrap().waiting.push(pop);
                    return;
                }
                Main::Backlog(q) => match q.pop_first() {
                    None => self.main = Main::Ready(VecDeque::new()),
                    Some(ticket) => {
                        if !self.assign_preferred(ticket) {
                            let t = self.tickets.remove(&ticket).expect("ticket exists");
                            self.start(worker, pop, ticket, *t);
                            return;
                        }
                    }
                },
            }
        }
    }

    fn start(&mut self, worker: WorkerId, pop: PopId, ticket: TicketId, t: Ticket<I>) {
        let had = self.mark_cached(t.item.cache_hint(), worker);
        let cached = had && !t.item.cache_hint().is_empty();
        self.workers.get_mut(&worker).unwrap().running += 1;
        self.counters.accepted += 1;
        self.dec_pending(t.item.cache_hint());
        self.events.push(Event::Assigned {
            pop,
            worker,
            ticket,
            client: t.client,
            priority: t.key.priority,
            item: t.item,
            cached,
        });
    }

    /// Idle workers take work that has waited in a busy worker's queue longer than it was
    /// expected to take there (the original never moves it, so one worker could hoard a
    /// cache hint's jobs while others sat idle). The job is moved as the oldest idle
    /// worker's, at the cost of a run without the cache. Call it every few seconds.
    pub fn steal(&mut self, now: f64) {
        self.now = self.now.max(now);
        if !matches!(&self.main, Main::Ready(q) if !q.is_empty()) {
            return;
        }
        let mut overdue: Vec<(Key, TicketId, WorkerId)> = Vec::new();
        for (id, w) in &self.workers {
            if let State::Running(q) = &w.state {
                for (key, t) in &q.items {
                    let tk = &self.tickets[t];
                    if now - tk.queued_at > tk.cost as f64 {
                        overdue.push((*key, *t, *id));
                    }
                }
            }
        }
        overdue.sort_by_key(|a| a.0);
        for (key, ticket, victim) in overdue {
            let Some(thief) = self.take_idle() else { break };
            let cost = self.tickets[&ticket].cost;
            let v = self.workers.get_mut(&victim).expect("worker exists");
            if let State::Running(q) = &mut v.state {
                q.items.remove(&key);
            }
            v.workload -= cost;
            let hint = self.tickets[&ticket].item.cache_hint().to_string();
            tracing::info!(
                pool = %self.name,
                from = %self.workers[&victim].name,
                to = %self.workers[&thief].name,
                "an idle worker takes a job that waited longer than expected"
            );
            self.enqueue_on_worker(ticket, thief, self.cost_of(&hint, false));
            self.mark_cached(&hint, thief);
            self.counters.stolen += 1;
        }
    }

    /// The idle worker that has waited longest, out of the ready list.
    fn take_idle(&mut self) -> Option<WorkerId> {
        loop {
            let Main::Ready(q) = &mut self.main else {
                return None;
            };
            let (worker, _pop) = q.pop_back()?;
            if matches!(
                self.workers.get(&worker).map(|w| &w.state),
                Some(State::Running(_))
            ) {
                return Some(worker);
            }
        }
    }

    /// The worker no longer waits on this pop (its call was cancelled).
    pub fn cancel_pop(&mut self, worker: WorkerId, pop: PopId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.waiting.retain(|p| *p != pop);
        }
        if let Main::Ready(q) = &mut self.main {
            q.retain(|(_, p)| *p != pop);
        }
    }

    /// The worker's name.
    pub fn worker_name(&self, worker: WorkerId) -> Option<&str> {
        self.workers.get(&worker).map(|w| w.name.as_str())
    }

    /// Runs the pops woken since the last call (work arrived for them, or they were
    /// reactivated, or they have gone).
    pub fn settle(&mut self) {
        while let Some(worker) = self.woken.pop_front() {
            let Some(w) = self.workers.get_mut(&worker) else {
                continue;
            };
            let pops = std::mem::take(&mut w.waiting);
            if let Main::Ready(q) = &mut self.main {
                q.retain(|(w, p)| *w != worker || !pops.contains(p));
            }
            for pop in pops {
                self.run_pop(worker, pop);
            }
            // A worker that has gone is dropped once nothing runs on it.
            if let Some(w) = self.workers.get(&worker) {
                if matches!(w.state, State::Finished) && w.running <= 0 {
                    self.workers.remove(&worker);
                }
            }
        }
    }

    /// A job the worker took has ended.
    pub fn job_finished(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.running -= 1;
            if matches!(w.state, State::Finished) && w.running <= 0 {
                self.workers.remove(&worker);
            }
        }
    }

    /// Whether the worker is inactive for (at least) `reason`.
    pub fn inactive_for(&self, worker: WorkerId, reason: Inactive) -> bool {
        matches!(
            self.workers.get(&worker).map(|w| &w.state),
            Some(State::Inactive(r)) if reason.subset_of(*r)
        )
    }

    /// Jobs running on the worker.
    pub fn running(&self, worker: WorkerId) -> i64 {
        self.workers.get(&worker).map_or(0, |w| w.running)
    }

    fn set_inactive(&mut self, worker: WorkerId, reason: Inactive) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        match &mut w.state {
            State::Finished => {}
            State::Inactive(r) => *r = r.union(reason),
            State::Running(_) => {
                let State::Running(q) = std::mem::replace(&mut w.state, State::Inactive(reason))
                else {
                    unreachable!()
                };
                tracing::info!(pool = %self.name, worker = %w.name, items = q.items.len(), "worker marked inactive");
                let tickets: Vec<TicketId> = q.items.into_values().collect();
                w.workload = 0;
                for t in tickets {
                    // Push back in priority order; on a backlog they keep their order, and
                    // otherwise they are placed afresh.
                    let tk = self.tickets.get_mut(&t).expect("ticket exists");
                    tk.cost = -1;
                    self.add(t);
                }
                self.wake(worker);
            }
        }
    }

    /// Makes the worker active or inactive for `reason`. An admin pause is remembered.
    pub fn set_active(&mut self, worker: WorkerId, reason: Inactive, active: bool) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if Inactive::ADMIN_PAUSE.subset_of(reason) {
            let name = w.name.clone();
            self.state.workers.insert(name.clone(), !active);
            self.writes.push(DbWrite::SetPaused {
                worker: name,
                paused: !active,
            });
        }
        if !active {
            self.set_inactive(worker, reason);
            return;
        }
        let w = self.workers.get_mut(&worker).unwrap();
        if let State::Inactive(reasons) = w.state {
            if reasons.subset_of(reason) {
                tracing::info!(pool = %self.name, worker = %w.name, "worker active");
                w.state = State::Running(Queue::default());
                self.wake(worker);
            } else if reason.subset_of(reasons) {
                w.state = State::Inactive(reasons.minus(reason));
            }
        }
    }

    /// `update`: the worker takes no more work on this connection.
    pub fn shutdown(&mut self, worker: WorkerId) {
        self.set_active(worker, Inactive::SHUTDOWN, false);
    }

    /// The worker has disconnected: its queued jobs go back to the pool; its running jobs
    /// end as their connections break.
    pub fn release(&mut self, worker: WorkerId) {
        self.set_inactive(worker, Inactive::WORKER);
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if matches!(w.state, State::Finished) {
            return;
        }
        w.state = State::Finished;
        let name = w.name.clone();
        self.cluster_capacity -= w.capacity;
        if self.connected.get(&name) == Some(&worker) {
            self.connected.remove(&name);
        }
        self.wake(worker);
    }

    pub fn connected(&self, name: &str) -> Option<WorkerId> {
        self.connected.get(name).copied()
    }

    pub fn is_known(&self, name: &str) -> bool {
        self.state.workers.contains_key(name)
    }

    /// Admin pause or unpause of a worker by name, connected or not; `auto_create` makes
    /// a worker never seen before known (so that a new machine starts paused).
    pub fn admin_set_active(
        &mut self,
        name: &str,
        active: bool,
        auto_create: bool,
    ) -> Result<(), PoolError> {
        if let Some(id) = self.connected(name) {
            self.set_active(id, Inactive::ADMIN_PAUSE, active);
            return Ok(());
        }
        if !auto_create && !self.is_known(name) {
            return Err(PoolError::UnknownWorker(name.to_string()));
        }
        if !self.state.workers.contains_key(name) {
            self.writes.push(DbWrite::EnsureWorker {
                worker: name.to_string(),
            });
        }
        self.state.workers.insert(name.to_string(), !active);
        self.writes.push(DbWrite::SetPaused {
            worker: name.to_string(),
            paused: !active,
        });
        Ok(())
    }

    /// Drops a disconnected worker from the known list.
    pub fn forget(&mut self, name: &str) -> Result<(), PoolError> {
        if !self.is_known(name) {
            return Err(PoolError::UnknownWorker(name.to_string()));
        }
        if self.connected.contains_key(name) {
            return Err(PoolError::StillConnected(name.to_string()));
        }
        self.state.workers.remove(name);
        self.writes.push(DbWrite::ForgetWorker {
            worker: name.to_string(),
        });
        Ok(())
    }

    /// Every known worker: (name, active, connected), in name order.
    pub fn known_workers(&self) -> Vec<(String, bool, bool)> {
        self.state
            .workers
            .iter()
            .map(|(name, &paused)| match self.connected.get(name) {
                None => (name.clone(), !paused, false),
                Some(id) => (
                    name.clone(),
                    matches!(self.workers[id].state, State::Running(_)),
                    true,
                ),
            })
            .collect()
    }

    // ---- metrics -------------------------------------------------------------------

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn cluster_capacity(&self) -> i64 {
        self.cluster_capacity
    }

    pub fn workers_connected(&self) -> usize {
        self.connected.len()
    }

    /// Connected workers that take no work.
    pub fn workers_paused(&self) -> usize {
        self.connected
            .values()
            .filter(|id| !matches!(self.workers[id].state, State::Running(_)))
            .count()
    }

    /// Pops waiting for work.
    pub fn workers_ready(&self) -> usize {
        match &self.main {
            Main::Ready(q) => q.len(),
            Main::Backlog(_) => 0,
        }
    }

    /// Queued tickets: (queue — `incoming` or a worker's name —, urgent) → count.
    pub fn queue_lengths(&self) -> BTreeMap<(String, bool), usize> {
        let mut out = BTreeMap::new();
        for t in self.tickets.values() {
            let queue = match t.place {
                Place::Backlog => "incoming".to_string(),
                Place::Worker(w) => self.workers[&w].name.clone(),
            };
            *out.entry((queue, t.key.priority.is_high())).or_insert(0) += 1;
        }
        out
    }

    /// Queued tickets per (client, urgent).
    pub fn client_queued(&self) -> BTreeMap<(String, bool), usize> {
        let mut counts: HashMap<(&str, bool), usize> = HashMap::new();
        for t in self.tickets.values() {
            *counts
                .entry((&*t.client, t.key.priority.is_high()))
                .or_insert(0) += 1;
        }
        counts
            .into_iter()
            .map(|((c, high), n)| ((c.to_string(), high), n))
            .collect()
    }

    pub fn queued(&self) -> usize {
        self.tickets.len()
    }

    // ---- the status page -----------------------------------------------------------

    /// What the pool holds now, for the status page: at most `limit` queued jobs per
    /// queue (in the order they will run), and the counts of all.
    pub fn view(&self, now: f64, limit: usize) -> PoolView {
        let queued = |q: &Queue| -> Vec<QueuedView> {
            q.items
                .values()
                .take(limit)
                .map(|id| {
                    let t = &self.tickets[id];
                    QueuedView {
                        client: t.client.to_string(),
                        label: t.item.label().into_owned(),
                        priority: t.key.priority.name(),
                        start_in: t.key.start - now,
                        cost: t.cost,
                    }
                })
                .collect()
        };
        let (backlog, backlog_len, idle) = match &self.main {
            Main::Backlog(q) => (queued(q), q.items.len(), 0),
            Main::Ready(r) => (Vec::new(), 0, r.len()),
        };
        let workers = self
            .connected
            .values()
            .map(|id| {
                let w = &self.workers[id];
                let (state, queue, queue_len) = match &w.state {
                    State::Running(q) => ("active".to_string(), queued(q), q.items.len()),
                    State::Inactive(r) => (format!("paused ({r})"), Vec::new(), 0),
                    State::Finished => ("gone".to_string(), Vec::new(), 0),
                };
                WorkerView {
                    name: w.name.clone(),
                    state,
                    capacity: w.capacity,
                    running: w.running,
                    workload: w.workload,
                    queue,
                    queue_len,
                }
            })
            .collect();
        let disconnected = self
            .state
            .workers
            .iter()
            .filter(|(n, _)| !self.connected.contains_key(*n))
            .map(|(n, paused)| (n.clone(), *paused))
            .collect();
        let per_client = self.client_queued();
        let clients = self
            .clients
            .iter()
            .map(|(name, c)| ClientView {
                name: name.clone(),
                rate: self.rate(name),
                ahead: (c.next_fair_start - now).max(0.0),
                queued: [false, true]
                    .iter()
                    .filter_map(|high| per_client.get(&(name.clone(), *high)))
                    .sum(),
            })
            .collect();
        PoolView {
            name: self.name.clone(),
            capacity: self.cluster_capacity,
            backlog,
            backlog_len,
            idle,
            workers,
            disconnected,
            clients,
            counters: self.counters.clone(),
        }
    }

    // ---- show ----------------------------------------------------------------------

    fn fmt_ticket(&self, id: TicketId, now: f64) -> String {
        let t = &self.tickets[&id];
        let mut s = format!(
            "{}:{}@{}",
            t.client,
            t.item.label(),
            rough_duration(t.key.start - now)
        );
        let level = match t.key.priority {
            Priority::NORMAL => String::new(),
            p => format!("+{}", p.name()),
        };
        if t.cost >= 0 {
            s.push_str(&format!("({}{level})", t.cost));
        } else {
            s.push_str(&level);
        }
        s
    }

    /// A queue's tickets, last to run first (as the original prints them).
    fn fmt_queue(&self, q: &Queue, out: &mut Wrapped, now: f64) {
        out.push("[");
        out.open();
        for (i, id) in q.items.values().rev().enumerate() {
            if i > 0 {
                out.space();
            }
            out.push(&self.fmt_ticket(*id, now));
        }
        out.close();
        out.push("]");
    }

    fn fmt_common(&self, now: f64) -> Wrapped {
        let mut out = Wrapped::new();
        out.push(&format!("capacity: {}", self.cluster_capacity));
        out.newline(0);
        out.push("queue: ");
        out.open();
        match &self.main {
            Main::Backlog(q) => {
                out.push("(backlog) ");
                self.fmt_queue(q, &mut out, now);
            }
            Main::Ready(q) => {
                out.push("(ready) [");
                for (i, (w, _)) in q.iter().enumerate() {
                    if i > 0 {
                        out.space();
                    }
                    out.push(self.workers.get(w).map_or("?", |w| &w.name));
                }
                out.push("]");
            }
        }
        out.close();
        out.newline(0);
        out.push("registered:");
        for (name, id) in &self.connected {
            let w = &self.workers[id];
            out.newline(2);
            out.push(&format!("{name} ({}): ", w.workload));
            out.open();
            match &w.state {
                State::Finished => out.push("(finished)"),
                State::Inactive(r) => out.push(&format!("(inactive: {r})")),
                State::Running(q) => self.fmt_queue(q, &mut out, now),
            }
            out.close();
            out.push(&format!(" ({} running)", w.running));
        }
        out.newline(0);
        out.push("disconnected:");
        for (name, paused) in &self.state.workers {
            if self.connected.contains_key(name) {
                continue;
            }
            out.newline(2);
            out.push(name);
            if *paused {
                out.push(" (paused)");
            }
        }
        out.newline(0);
        out.push("clients: ");
        out.open();
        for (i, (id, c)) in self.clients.iter().enumerate() {
            if i > 0 {
                out.space();
            }
            let delay = c.next_fair_start - now;
            let mut s = format!("{id}({:.0})", self.rate(id));
            if delay > 0.0 {
                s.push('+');
                s.push_str(&rough_duration(delay));
            }
            out.push(&s);
        }
        out.close();
        out
    }

    /// The pool's state as `ocluster-admin show POOL` prints it (ends with a newline).
    pub fn show(&self, now: f64) -> String {
        let mut s = self.fmt_common(now).finish();
        s.push('\n');
        s
    }

    /// [`Pool::show`] plus the learned cache hints, as the original's tests print it.
    pub fn dump(&self, now: f64) -> String {
        let mut out = self.fmt_common(now);
        out.newline(0);
        out.push("cached: ");
        out.open();
        let mut hints: Vec<&String> = self
            .state
            .cached
            .iter()
            .filter(|(_, w)| !w.is_empty())
            .map(|(h, _)| h)
            .collect();
        hints.sort();
        for (i, h) in hints.iter().enumerate() {
            if i > 0 {
                out.push(",");
                out.space();
            }
            let names: Vec<&str> = self.state.cached[*h].iter().map(String::as_str).collect();
            out.push(&format!("{h}: [{}]", names.join("; ")));
        }
        out.close();
        let mut s = out.finish();
        s.push('\n');
        s
    }
}
