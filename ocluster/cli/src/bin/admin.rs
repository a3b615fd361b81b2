//! `ocluster-admin`: every verb of the original, with the same arguments, output and
//! behaviour (reference/ocluster.md §4.2). `-c/--connect admin.cap` may come before or
//! after the verb.

use std::path::PathBuf;
use std::rc::Rc;

use clap::{Parser, Subcommand};
use ocluster::{connect, error_text, init_logging, load_cap, Verbosity};
use ocluster_api::{admin, pool_admin, progress};

/// A command-line admin client for the ocluster-scheduler.
#[derive(Parser, Debug)]
#[command(name = "ocluster-admin", version)]
struct Args {
    /// Path of the admin.cap file from ocluster-scheduler.
    #[arg(short = 'c', long = "connect", value_name = "ADDR", global = true)]
    connect: Option<PathBuf>,

    #[command(flatten)]
    verbosity: Verbosity,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new client endpoint for submitting jobs (prints its cap: redirect it
    /// into NAME.cap).
    AddClient {
        /// Unique name or ID for the client.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Give a worker a registration capability of its own, pinned to its name (prints
    /// it: redirect it into the worker's cap file). An extension: OCaml schedulers do not
    /// have it.
    AddWorker {
        #[arg(value_name = "POOL")]
        pool: String,
        #[arg(value_name = "WORKER")]
        name: String,
    },
    /// Revoke a worker's own registration capability, disconnecting the worker.
    RemoveWorker {
        #[arg(value_name = "POOL")]
        pool: String,
        #[arg(value_name = "WORKER")]
        name: String,
    },
    /// Unregister a client: its cap stops working at once.
    RemoveClient {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// List registered clients.
    ListClients,
    /// Set expected number of parallel jobs for a pool/client combination.
    SetRate {
        #[arg(value_name = "POOL")]
        pool: String,
        #[arg(value_name = "ID")]
        client: String,
        /// Number of parallel jobs.
        #[arg(value_name = "RATE")]
        rate: f64,
    },
    /// Show information about a service, pool or worker.
    Show {
        /// Just list names of the workers.
        #[arg(long)]
        terse: bool,
        #[arg(value_name = "POOL")]
        pool: Option<String>,
        #[arg(value_name = "WORKER")]
        worker: Option<String>,
    },
    /// Execute a command for each worker in a pool; `{}` in it is replaced by the
    /// worker's name (e.g. exec POOL -- ssh {} uptime).
    Exec {
        #[arg(value_name = "POOL")]
        pool: String,
        #[arg(
            value_name = "CMD",
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        command: Vec<String>,
    },
    /// Set a worker to be unavailable for further jobs.
    Pause {
        /// All workers.
        #[arg(long)]
        all: bool,
        /// Create worker first if unknown.
        #[arg(long)]
        auto_create: bool,
        /// Wait until no jobs are running.
        #[arg(long)]
        wait: bool,
        #[arg(value_name = "POOL")]
        pool: String,
        #[arg(value_name = "WORKER")]
        worker: Option<String>,
    },
    /// Resume a paused worker.
    Unpause {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        auto_create: bool,
        #[arg(value_name = "POOL")]
        pool: String,
        #[arg(value_name = "WORKER")]
        worker: Option<String>,
    },
    /// Drain and then update worker(s): one first, then the rest.
    Update {
        #[arg(value_name = "POOL")]
        pool: String,
        #[arg(value_name = "WORKER")]
        worker: Option<String>,
    },
    /// Forget about an old (disconnected) worker.
    Forget {
        #[arg(value_name = "POOL")]
        pool: String,
        #[arg(value_name = "WORKER")]
        worker: Option<String>,
    },
}

/// An extension's call refused by a scheduler that does not have it (an OCaml one).
fn extension(e: capnp::Error) -> capnp::Error {
    if e.kind == capnp::ErrorKind::Unimplemented {
        capnp::Error::failed(
            "this scheduler does not support per-worker capabilities (an OCaml scheduler?)".into(),
        )
    } else {
        e
    }
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("{msg}");
    std::process::exit(1)
}

trait OrDie<T> {
    fn or_die(self) -> T;
}

impl<T> OrDie<T> for Result<T, capnp::Error> {
    fn or_die(self) -> T {
        self.unwrap_or_else(|e| die(error_text(&e)))
    }
}

impl<T> OrDie<T> for Result<T, std::str::Utf8Error> {
    fn or_die(self) -> T {
        self.unwrap_or_else(|e| die(format!("the scheduler sent text that is not UTF-8: {e}")))
    }
}

struct Printer {
    label: String,
}

impl progress::Server for Printer {
    async fn report(
        self: Rc<Self>,
        params: progress::ReportParams,
        _: progress::ReportResults,
    ) -> Result<(), capnp::Error> {
        let s = params.get()?.get_status()?.to_string()?;
        println!("{}: {s}", self.label);
        Ok(())
    }
}

fn printer(label: &str) -> progress::Client {
    capnp_rpc::new_client(Printer {
        label: label.to_string(),
    })
}

struct WorkerInfo {
    name: String,
    active: bool,
    connected: bool,
}

impl std::fmt::Display for WorkerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.active { "active" } else { "paused" };
        let conn = if self.connected {
            "connected"
        } else {
            "disconnected"
        };
        write!(f, "{} ({state}, {conn})", self.name)
    }
}

fn pool_of(admin: &admin::Client, name: &str) -> pool_admin::Client {
    let mut r = admin.pool_request();
    r.get().set_name(name);
    r.send().pipeline.get_pool()
}

async fn workers(pool: &pool_admin::Client) -> Vec<WorkerInfo> {
    let r = pool.workers_request().send().promise.await.or_die();
    let list = r.get().and_then(|r| r.get_workers()).or_die();
    list.iter()
        .map(|w| WorkerInfo {
            name: w
                .get_name()
                .and_then(|n| n.to_string().map_err(Into::into))
                .unwrap_or_default(),
            active: w.get_active(),
            connected: w.get_connected(),
        })
        .collect()
}

async fn set_active(pool: &pool_admin::Client, worker: &str, active: bool, auto_create: bool) {
    let mut r = pool.set_active_request();
    r.get().set_worker(worker);
    r.get().set_active(active);
    r.get().set_auto_create(auto_create);
    r.send().promise.await.or_die();
}

async fn drain(pool: &pool_admin::Client, names: &[String]) {
    println!("Waiting for jobs to finish…");
    let calls = names.iter().map(|w| {
        let mut r = pool.drain_request();
        r.get().set_worker(w.as_str());
        r.get().set_progress(printer(w));
        r.send().promise
    });
    for r in futures::future::join_all(calls).await {
        r.or_die();
    }
}

async fn update_one(pool: &pool_admin::Client, worker: &str) -> Result<(), capnp::Error> {
    let mut r = pool.update_request();
    r.get().set_worker(worker);
    r.get().set_progress(printer(worker));
    r.send().promise.await.map(|_| ())
}

async fn run(cmd: Command, admin: admin::Client) {
    match cmd {
        Command::AddClient { id } => {
            let mut r = admin.add_client_request();
            r.get().set_id(id.as_str());
            let cap = r.send().pipeline.get_cap();
            let save: ocluster_api::persistent::Client =
                capnp::capability::FromClientHook::new(cap.client.hook);
            let resp = save.save_request().send().promise.await.or_die();
            let uri: capnp::text::Reader = resp.get().or_die().get_sturdy_ref().get_as().or_die();
            println!("{}", uri.to_string().or_die());
        }
        Command::AddWorker { pool, name } => {
            let mut r = admin.add_worker_request();
            r.get().set_pool(pool.as_str());
            r.get().set_name(name.as_str());
            let resp = r.send().promise.await.map_err(extension).or_die();
            println!(
                "{}",
                resp.get()
                    .and_then(|r| r.get_uri())
                    .or_die()
                    .to_string()
                    .or_die()
            );
        }
        Command::RemoveWorker { pool, name } => {
            let mut r = admin.remove_worker_request();
            r.get().set_pool(pool.as_str());
            r.get().set_name(name.as_str());
            r.send().promise.await.map_err(extension).or_die();
        }
        Command::RemoveClient { id } => {
            let mut r = admin.remove_client_request();
            r.get().set_id(id.as_str());
            r.send().promise.await.or_die();
        }
        Command::ListClients => {
            let r = admin.list_clients_request().send().promise.await.or_die();
            let list = r.get().and_then(|r| r.get_clients()).or_die();
            if list.is_empty() {
                eprintln!("No clients.");
            }
            for c in list.iter() {
                println!("{}", c.or_die().to_string().or_die());
            }
        }
        Command::SetRate { pool, client, rate } => {
            let p = pool_of(&admin, &pool);
            let mut r = p.set_rate_request();
            r.get().set_id(client.as_str());
            r.get().set_rate(rate);
            r.send().promise.await.or_die();
        }
        Command::Show {
            terse,
            pool: None,
            worker: _,
        } => {
            let _ = terse;
            let r = admin.pools_request().send().promise.await.or_die();
            for n in r.get().and_then(|r| r.get_names()).or_die().iter() {
                println!("{}", n.or_die().to_string().or_die());
            }
        }
        Command::Show {
            terse,
            pool: Some(pool),
            worker: None,
        } => {
            let p = pool_of(&admin, &pool);
            if terse {
                for w in workers(&p).await {
                    println!("{}", w.name);
                }
            } else {
                let r = p.show_request().send().promise.await.or_die();
                let s = r.get().and_then(|r| r.get_state()).or_die();
                println!("{}", s.to_string().or_die().trim());
            }
        }
        Command::Show {
            terse,
            pool: Some(pool),
            worker: Some(worker),
        } => {
            let p = pool_of(&admin, &pool);
            let status = match workers(&p).await.into_iter().find(|w| w.name == worker) {
                None => "Not found",
                Some(w) if w.active => "Running",
                Some(_) => "Paused",
            };
            if terse {
                println!("{status}");
            } else {
                println!("{worker}: {status}");
            }
        }
        Command::Exec { pool, command } => {
            let p = pool_of(&admin, &pool);
            let ws = workers(&p).await;
            let runs = ws.iter().map(|w| {
                let argv: Vec<String> = command
                    .iter()
                    .map(|a| if a == "{}" { w.name.clone() } else { a.clone() })
                    .collect();
                async move {
                    // The operator's own command, run once per worker: there is
                    // nothing for a test to script here, so no Exec seam.
                    #[allow(clippy::disallowed_methods)]
                    let status = tokio::process::Command::new(&argv[0])
                        .args(&argv[1..])
                        .status()
                        .await;
                    match status {
                        Ok(s) if s.success() => Ok(()),
                        Ok(s) => Err(match s.code() {
                            Some(c) => format!("Sub-process failed with exit code {c}"),
                            None => format!("Sub-process failed: {s}"),
                        }),
                        Err(e) => Err(format!("{}: {e}", argv[0])),
                    }
                }
            });
            for r in futures::future::join_all(runs).await {
                if let Err(e) = r {
                    die(e);
                }
            }
        }
        Command::Pause {
            all,
            auto_create,
            wait,
            pool,
            worker,
        } => set_active_cmd(&admin, false, all, auto_create, wait, &pool, worker).await,
        Command::Unpause {
            all,
            auto_create,
            pool,
            worker,
        } => set_active_cmd(&admin, true, all, auto_create, false, &pool, worker).await,
        Command::Update { pool, worker } => {
            let p = pool_of(&admin, &pool);
            match worker {
                Some(w) => match update_one(&p, &w).await {
                    Ok(()) => println!("Restarted"),
                    Err(e) => die(error_text(&e)),
                },
                None => {
                    let ws = workers(&p).await;
                    let (connected, disconnected): (Vec<_>, Vec<_>) =
                        ws.into_iter().partition(|w| w.connected);
                    let Some((first, rest)) = connected.split_first() else {
                        die("No workers connected to pool!");
                    };
                    println!("Testing update on first worker in pool: {:?}", first.name);
                    if let Err(e) = update_one(&p, &first.name).await {
                        die(error_text(&e));
                    }
                    let names: Vec<&str> = rest.iter().map(|w| w.name.as_str()).collect();
                    println!(
                        "Canary updated OK. Updating the others: [{}]",
                        names.join(" ")
                    );
                    let calls = rest.iter().map(|w| {
                        let p = p.clone();
                        async move { (w.name.clone(), update_one(&p, &w.name).await) }
                    });
                    let mut failed = false;
                    for (name, r) in futures::future::join_all(calls).await {
                        match r {
                            Ok(()) => println!("{name:?} restarted OK."),
                            Err(e) => {
                                println!("{name:?}: {}", error_text(&e));
                                failed = true;
                            }
                        }
                    }
                    if failed {
                        die("Failed update(s)");
                    }
                    println!("All pool workers restarted.");
                    if !disconnected.is_empty() {
                        println!("WARNING: disconnected workers not updated:");
                        for w in &disconnected {
                            println!("  {}", w.name);
                        }
                    }
                }
            }
        }
        Command::Forget { pool, worker } => {
            let p = pool_of(&admin, &pool);
            match worker {
                Some(w) => {
                    let mut r = p.forget_request();
                    r.get().set_worker(w.as_str());
                    r.send().promise.await.or_die();
                }
                None => {
                    let ws = workers(&p).await;
                    if ws.is_empty() {
                        die("No workers in pool!");
                    }
                    let disconnected: Vec<&WorkerInfo> =
                        ws.iter().filter(|w| !w.connected).collect();
                    let shown: Vec<&WorkerInfo> = if disconnected.is_empty() {
                        ws.iter().collect()
                    } else {
                        disconnected
                    };
                    eprintln!("Specify which worker you want to forget.\nCandidates are:");
                    for w in shown {
                        eprintln!("{w}");
                    }
                    std::process::exit(1);
                }
            }
        }
    }
}

async fn set_active_cmd(
    admin: &admin::Client,
    active: bool,
    all: bool,
    auto_create: bool,
    wait: bool,
    pool: &str,
    worker: Option<String>,
) {
    let p = pool_of(admin, pool);
    if let Some(w) = worker {
        set_active(&p, &w, active, auto_create).await;
        if wait {
            drain(&p, &[w]).await;
        }
        println!("Success.");
        return;
    }
    let ws = workers(&p).await;
    if ws.is_empty() {
        println!("No workers connected to pool (nothing to do).");
        return;
    }
    if !all {
        eprintln!("Specify which worker you want to affect (or use --all).\nCandidates are:");
        for w in &ws {
            eprintln!("{w}");
        }
        std::process::exit(1);
    }
    let mut todo = Vec::new();
    for w in ws {
        if w.active == active {
            println!("(worker {:?} is already done)", w.name);
        } else {
            todo.push(w.name);
        }
    }
    if todo.is_empty() {
        println!("Nothing to do.");
        return;
    }
    println!("Updating {}…", todo.join(", "));
    for w in &todo {
        set_active(&p, w, active, false).await;
    }
    if wait {
        drain(&p, &todo).await;
    }
    println!("Success.");
}

fn main() {
    cli_docs::generate_if_asked(<Args as clap::CommandFactory>::command);
    let args = Args::parse();
    init_logging(&args.verbosity);
    let Some(cap_path) = args.connect.clone() else {
        die("ocluster-admin: -c/--connect ADMIN.CAP is required (the admin.cap file the scheduler wrote into its --secrets-dir)");
    };
    let sr = load_cap(&cap_path).unwrap_or_else(|e| die(format!("ocluster-admin: {e}")));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| die(e));
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let conn = connect(&sr)
            .await
            .unwrap_or_else(|e| die(format!("ocluster-admin: {e}")));
        let admin: admin::Client = capnp::capability::FromClientHook::new(conn.cap.hook);
        run(args.command, admin).await;
    });
}
