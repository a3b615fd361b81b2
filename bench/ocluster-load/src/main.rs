//! Load for `bench/ocluster_bench.py`: simulated workers and clients that talk to a real
//! `ocluster-scheduler` over TLS, and the scheduler's state machine driven on its own.
//! Every role prints `key value` lines on stdout for the driver.

use std::borrow::Cow;
use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use capnp::Error;
use clap::{Parser, Subcommand, ValueEnum};
use ocluster_api::schema_capnp::{job, queue, registration, submission, worker};
use ocluster_net::SecretKey;
use ocluster_scheduler::db::Db;
use ocluster_scheduler::{Costs, Event, Inactive, Item, Pool, PoolState};

#[derive(Parser)]
#[command(name = "ocluster-load")]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Drive the pool state machine alone: N jobs through W workers, no RPC.
    StateMachine {
        #[arg(long, default_value_t = 200)]
        workers: usize,
        #[arg(long, default_value_t = 4)]
        capacity: i64,
        #[arg(long, default_value_t = 100_000)]
        jobs: usize,
        #[arg(long, default_value_t = 10)]
        clients: usize,
        #[arg(long, default_value_t = 100)]
        hints: usize,
        /// Also write the learned cache hints to an in-memory SQLite database, as the
        /// scheduler does.
        #[arg(long)]
        db: bool,
    },
    /// COUNT simulated workers, each on its own TLS connection, finishing every job at once.
    Workers {
        #[arg(long)]
        cap: PathBuf,
        #[arg(long, default_value_t = 50)]
        count: usize,
        #[arg(long, default_value_t = 4)]
        capacity: i32,
        #[arg(long, default_value = "w")]
        prefix: String,
    },
    /// Clients, one connection per cap file, submitting as `ocluster-client` does
    /// (submit, then `job` and `result` pipelined on the ticket).
    Clients {
        #[arg(long = "cap", required = true)]
        caps: Vec<PathBuf>,
        #[arg(long)]
        pool: String,
        /// Jobs per client.
        #[arg(long)]
        jobs: usize,
        #[arg(long, default_value_t = 100)]
        hints: usize,
        #[arg(long, value_enum)]
        mode: Mode,
        /// In queue mode, submit only (hold the tickets) instead of also calling `job` and
        /// `result` on each.
        #[arg(long)]
        submit_only: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Submit every job at once, say `queued` when all tickets are in, then wait for the
    /// results.
    Queue,
    /// One job at a time per client, timing submit → start (from the job's log).
    Closed,
    /// The baseline: one round trip at a time per client (a submit to a pool that does
    /// not exist, which the scheduler answers at once).
    Ping,
}

/// Counts the bytes the process has live, for the state machine's memory per queued job.
struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
        LIVE.fetch_sub(l.size(), std::sync::atomic::Ordering::Relaxed);
        std::alloc::System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live_bytes() -> usize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn hint_of(i: usize, hints: usize) -> String {
    // One job in five has no hint; the rest spread over `hints` hints.
    if i.is_multiple_of(5) {
        String::new()
    } else {
        format!("hint-{}", i % hints.max(1))
    }
}

fn main() {
    let args = Args::parse();
    match args.role {
        Role::StateMachine {
            workers,
            capacity,
            jobs,
            clients,
            hints,
            db,
        } => state_machine(workers, capacity, jobs, clients, hints, db),
        role => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                match role {
                    Role::Workers {
                        cap,
                        count,
                        capacity,
                        prefix,
                    } => run_workers(cap, count, capacity, prefix).await,
                    Role::Clients {
                        caps,
                        pool,
                        jobs,
                        hints,
                        mode,
                        submit_only,
                    } => run_clients(caps, pool, jobs, hints, mode, submit_only).await,
                    Role::StateMachine { .. } => unreachable!(),
                }
            });
        }
    }
}

// ---- the state machine alone ----------------------------------------------------------------

/// What the scheduler queues for a job, as `QueuedJob` holds it: the job description as
/// the client sent it (a one-step OBuilder spec, serialised), its hint and its
/// client's name.
struct BenchJob {
    hint: String,
    _client: String,
    _descr: Vec<u8>,
}

impl Item for BenchJob {
    fn cache_hint(&self) -> &str {
        &self.hint
    }
    fn label(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.hint)
    }
}

fn state_machine(
    workers: usize,
    capacity: i64,
    jobs: usize,
    clients: usize,
    hints: usize,
    with_db: bool,
) {
    let descr_len = {
        let mut m = capnp::message::Builder::new_default();
        let mut d = m.init_root::<ocluster_api::schema_capnp::job_descr::Builder>();
        d.set_cache_hint("hint-42");
        d.init_action()
            .init_obuilder()
            .set_spec("((from busybox) (run (shell \"true\")))");
        capnp::serialize::write_message_to_words(&m).len()
    };
    println!("descr_bytes {descr_len}");
    let mut db = with_db.then(|| Db::in_memory().expect("sqlite"));
    let mut pool: Pool<BenchJob> = Pool::new("bench", Costs::DEFAULT, PoolState::default());
    let ids: Vec<_> = (0..workers)
        .map(|i| {
            let id = pool.register(&format!("w{i}"), capacity).expect("register");
            // As the service does: a worker is active once it has registered.
            pool.set_active(id, Inactive::WORKER, true);
            id
        })
        .collect();
    let mut apply = |pool: &mut Pool<BenchJob>| {
        let writes = pool.take_writes();
        if let Some(db) = &mut db {
            db.apply("bench", &writes).expect("db");
        }
    };
    apply(&mut pool);
    let clients: Vec<String> = (0..clients.max(1)).map(|i| format!("c{i}")).collect();
    let before = live_bytes();
    let t0 = Instant::now();
    for i in 0..jobs {
        let client = &clients[i % clients.len()];
        pool.submit(
            client,
            BenchJob {
                hint: hint_of(i, hints),
                _client: client.clone(),
                _descr: vec![0; descr_len],
            },
            i.is_multiple_of(50),
            1.0 + i as f64 * 1e-6,
        );
    }
    let submit_s = t0.elapsed().as_secs_f64();
    let queued_bytes = live_bytes().saturating_sub(before);
    let t1 = Instant::now();
    for &w in &ids {
        for _ in 0..capacity {
            pool.pop(w);
        }
    }
    let mut assigned = 0usize;
    loop {
        pool.settle();
        let events = pool.take_events();
        apply(&mut pool);
        if events.is_empty() {
            break;
        }
        for e in events {
            if let Event::Assigned { worker, .. } = e {
                assigned += 1;
                pool.job_finished(worker);
                pool.pop(worker);
            }
        }
    }
    let dispatch_s = t1.elapsed().as_secs_f64();
    println!("jobs {jobs}");
    println!("assigned {assigned}");
    println!("submit_s {submit_s:.6}");
    println!("submits_per_s {:.0}", jobs as f64 / submit_s);
    println!("bytes_per_queued_job {}", queued_bytes / jobs.max(1));
    println!("dispatch_s {dispatch_s:.6}");
    println!("assignments_per_s {:.0}", assigned as f64 / dispatch_s);
    if assigned != jobs {
        eprintln!("only {assigned} of {jobs} jobs were assigned");
        std::process::exit(1);
    }
}

// ---- workers ----------------------------------------------------------------------------------

async fn connect(cap: &std::path::Path) -> ocluster_net::vat::Connected {
    let sr = ocluster_net::capfile::read(cap).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let key = SecretKey::generate_ephemeral().expect("key");
    ocluster_net::vat::connect(&sr, &key)
        .await
        .unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        })
}

/// A job that is over as soon as it starts. Its log is one line: `start NANOS`, the wall
/// time it started at.
struct InstantJob {
    start: Rc<Cell<u64>>,
}

impl InstantJob {
    fn start(&self) -> u64 {
        if self.start.get() == 0 {
            self.start.set(now_ns());
        }
        self.start.get()
    }
}

impl job::Server for InstantJob {
    async fn log(
        self: Rc<Self>,
        params: job::LogParams,
        mut results: job::LogResults,
    ) -> Result<(), Error> {
        let line = format!("start {}\n", self.start());
        let start = params.get()?.get_start().max(0) as usize;
        let bytes = line.as_bytes();
        let from = start.min(bytes.len());
        results.get().set_log(&bytes[from..]);
        results.get().set_next(bytes.len() as i64);
        Ok(())
    }

    async fn result(
        self: Rc<Self>,
        _: job::ResultParams,
        mut results: job::ResultResults,
    ) -> Result<(), Error> {
        self.start();
        results.get().set_output("done");
        Ok(())
    }

    async fn cancel(
        self: Rc<Self>,
        _: job::CancelParams,
        _: job::CancelResults,
    ) -> Result<(), Error> {
        Ok(())
    }
}

struct IdleWorker;

impl worker::Server for IdleWorker {}

async fn run_workers(cap: PathBuf, count: usize, capacity: i32, prefix: String) {
    let jobs = Rc::new(Cell::new(0u64));
    let first = Rc::new(Cell::new(0u64));
    for i in 0..count {
        let conn = connect(&cap).await;
        let reg: registration::Client = capnp::capability::FromClientHook::new(conn.cap.hook);
        let mut r = reg.register_request();
        r.get().set_name(format!("{prefix}{i}").as_str());
        r.get().set_capacity(capacity);
        r.get().set_worker(capnp_rpc::new_client(IdleWorker));
        let queue: queue::Client = r.send().pipeline.get_queue();
        for _ in 0..capacity {
            let queue = queue.clone();
            let (jobs, first) = (jobs.clone(), first.clone());
            tokio::task::spawn_local(async move {
                loop {
                    let start = Rc::new(Cell::new(0));
                    let mut pop = queue.pop_request();
                    pop.get().set_job(capnp_rpc::new_client(InstantJob {
                        start: start.clone(),
                    }));
                    if pop.send().promise.await.is_err() {
                        return;
                    }
                    if start.get() == 0 {
                        start.set(now_ns());
                    }
                    if first.get() == 0 || start.get() < first.get() {
                        first.set(start.get());
                    }
                    jobs.set(jobs.get() + 1);
                }
            });
        }
        std::mem::forget(conn.disconnector);
    }
    println!("registered {count}");
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
    term.recv().await;
    println!("jobs {}", jobs.get());
    println!("first_start_ns {}", first.get());
}

// ---- clients ----------------------------------------------------------------------------------

async fn run_clients(
    caps: Vec<PathBuf>,
    pool: String,
    jobs: usize,
    hints: usize,
    mode: Mode,
    submit_only: bool,
) {
    let mut subs = Vec::new();
    for cap in &caps {
        let conn = connect(cap).await;
        let sub: submission::Client = capnp::capability::FromClientHook::new(conn.cap.hook);
        std::mem::forget(conn.disconnector);
        subs.push(sub);
    }
    match mode {
        Mode::Queue => queue_mode(subs, &pool, jobs, hints, submit_only).await,
        Mode::Closed => closed_mode(subs, &pool, jobs, hints).await,
        Mode::Ping => ping_mode(subs, jobs).await,
    }
}

fn submit_request(
    sub: &submission::Client,
    pool: &str,
    hint: &str,
) -> capnp::capability::RemotePromise<submission::submit_results::Owned> {
    let mut r = sub.submit_request();
    r.get().set_pool(pool);
    let mut d = r.get().init_descr();
    d.set_cache_hint(hint);
    d.init_action()
        .init_obuilder()
        .set_spec("((from busybox) (run (shell \"true\")))");
    r.send()
}

async fn queue_mode(
    subs: Vec<submission::Client>,
    pool: &str,
    jobs: usize,
    hints: usize,
    submit_only: bool,
) {
    let mut results = Vec::new();
    let mut logs = Vec::new();
    let mut submitted = Vec::new();
    let mut n = 0;
    for _ in 0..jobs {
        for sub in &subs {
            let s = submit_request(sub, pool, &hint_of(n, hints));
            n += 1;
            // As `ocluster-client` does (see the golden capture of its messages): `job`
            // pipelined on the ticket, `result` and the first `log` on the job, then each
            // question finished once it is answered, keeping only the ticket and the job
            // themselves. The `result` and `log` calls stay open while the job is queued.
            let job = (!submit_only).then(|| {
                let job = s.pipeline.get_ticket().job_request().send();
                results.push(job.pipeline.get_job().result_request().send().promise);
                let mut log = job.pipeline.get_job().log_request();
                log.get().set_start(0);
                logs.push(log.send().promise);
                job.promise
            });
            submitted.push(async move {
                let ticket = s.promise.await?.get()?.get_ticket()?;
                let job = match job {
                    Some(j) => Some(j.await?.get()?.get_job()?),
                    None => None,
                };
                Ok::<_, capnp::Error>((ticket, job))
            });
        }
    }
    let mut failed = 0;
    let mut tickets = Vec::new();
    for r in futures::future::join_all(submitted).await {
        match r {
            Ok(held) => tickets.push(held),
            Err(_) => failed += 1,
        }
    }
    println!("queued {} {}", n - failed, now_ns());
    if submit_only {
        // Hold the tickets until killed.
        std::future::pending::<()>().await;
    }
    let mut ok = 0u64;
    let mut errors = 0u64;
    let mut last = 0u64;
    let mut pending: futures::stream::FuturesUnordered<_> = results.into_iter().collect();
    use futures::StreamExt;
    while let Some(r) = pending.next().await {
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                if errors == 0 {
                    eprintln!("job failed: {e}");
                }
                errors += 1;
            }
        }
        last = now_ns();
    }
    // Each first `log` call was answered when its job started.
    futures::future::join_all(logs).await;
    drop(tickets);
    println!("ok {ok}");
    println!("errors {errors}");
    println!("last_result_ns {last}");
}

async fn ping_mode(subs: Vec<submission::Client>, jobs: usize) {
    let runs = subs.into_iter().map(|sub| async move {
        let mut lat = Vec::with_capacity(jobs);
        for _ in 0..jobs {
            let t0 = now_ns();
            let s = submit_request(&sub, "-no-such-pool-", "");
            if s.promise.await.is_ok() {
                lat.push((now_ns() - t0) / 1000);
            }
        }
        lat
    });
    print_latencies(futures::future::join_all(runs).await);
}

fn print_latencies(runs: Vec<Vec<u64>>) {
    let all: Vec<String> = runs.into_iter().flatten().map(|x| x.to_string()).collect();
    println!("latency_us {}", all.join(","));
}

async fn closed_mode(subs: Vec<submission::Client>, pool: &str, jobs: usize, hints: usize) {
    let runs = subs.into_iter().enumerate().map(|(c, sub)| async move {
        let mut lat = Vec::with_capacity(jobs);
        for i in 0..jobs {
            let t0 = now_ns();
            let s = submit_request(&sub, pool, &hint_of(c * jobs + i, hints));
            let ticket = s.pipeline.get_ticket();
            let job = ticket.job_request().send().pipeline.get_job();
            let mut l = job.log_request();
            l.get().set_start(0);
            let log = l.send().promise;
            let result = job.result_request().send().promise;
            let Ok(log) = log.await else {
                eprintln!("log failed");
                continue;
            };
            let start: u64 = log
                .get()
                .ok()
                .and_then(|r| r.get_log().ok())
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(|s| s.trim().strip_prefix("start ")?.parse().ok())
                .unwrap_or(0);
            if result.await.is_ok() && start >= t0 {
                lat.push((start - t0) / 1000);
            }
            drop((s.promise, ticket, job));
        }
        lat
    });
    print_latencies(futures::future::join_all(runs).await);
}
