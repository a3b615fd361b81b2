//! What the RPC layer holds for each queued job, ocluster-rpc against capnp-rpc, measured
//! in the same run (issue 12: < 1 KiB per queued job).
//!
//! A server process (this binary, `serve`) offers a Submission whose tickets give a job
//! that never starts: its `result` and `log` calls stay open, as a queued job's do in the
//! scheduler. The parent is the client and does what `ocluster-client` does, as the golden
//! capture of its messages shows: `submit`, `job` on the ticket, then `result` and `log` on
//! the job, with the first three answers finished at once; it keeps the ticket, the job
//! and the two open calls. The server's heap in use (glibc's `mallinfo2`) before and after
//! N jobs, divided by N, is what one queued job costs the RPC layer (the scheduler's own
//! job state, measured apart by `ocluster-load state-machine`, is not in it: the server's
//! job here is a counter).
//!
//! The ocluster-rpc server answers `job` with a promise, as the scheduler does (it
//! resolves when a worker takes the job), whose calls go at once to the job; the capnp-rpc
//! server answers with the job itself (a promise costs capnp-rpc more: this favours the
//! baseline). Each holds an open call in the cheapest form its layer allows: a responder
//! in a list for ocluster-rpc, a future waiting on a shared `Notify` for capnp-rpc.

use std::cell::{Cell, RefCell};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use clap::{Parser, Subcommand, ValueEnum};
use ocluster_api::ids;
use ocluster_api::schema_capnp::{job, submission, ticket};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

#[derive(Parser)]
#[command(name = "rpc-memory")]
struct Args {
    #[command(subcommand)]
    role: Role,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Debug)]
enum Layer {
    Ours,
    CapnpRpc,
}

#[derive(Subcommand)]
enum Role {
    /// Measure: alternate the two layers ROUNDS times with JOBS queued jobs each.
    Run {
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// The server (started by `run`): serves on SOCKET; on stdin, `heap` prints the heap
    /// in use and `open` the number of open calls.
    Serve {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long, value_enum)]
        layer: Layer,
    },
}

/// The heap in use, by glibc's count (0 where there is none: the figures then say so).
fn heap() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let m = unsafe { libc::mallinfo2() };
        m.uordblks + m.hblkhd
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

fn main() {
    match Args::parse().role {
        Role::Run { jobs, rounds } => run(jobs, rounds),
        Role::Serve { socket, layer } => serve(&socket, layer),
    }
}

fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

// ---- the server, with ocluster-rpc ----

mod ours {
    use super::*;
    use ocluster_rpc::{Call, Cap, Object, Promise, Responder};

    #[derive(Default)]
    pub struct Waiting {
        pub calls: RefCell<Vec<Responder>>,
        /// The jobs' promises, held as the scheduler holds them to resolve them.
        pub promises: RefCell<Vec<Rc<Promise>>>,
    }

    pub struct Submission(pub Rc<Waiting>);
    struct Ticket(Rc<Waiting>);
    struct Job(Rc<Waiting>);

    impl Object for Submission {
        fn call(self: Rc<Self>, call: Call) {
            let w = self.0.clone();
            call.responder().results(|b, caps| {
                let t: ticket::Client = caps.client(Cap::local(Ticket(w)));
                b.init_as::<submission::submit_results::Builder>()
                    .set_ticket(t);
                Ok(())
            })
        }
    }

    impl Object for Ticket {
        fn dedupe(&self) -> bool {
            false
        }

        fn call(self: Rc<Self>, call: Call) {
            if (call.interface_id, call.method_id) != (ids::TICKET, 0) {
                return call.responder().empty();
            }
            // A promise, as the scheduler gives (it resolves when a worker takes the
            // job); calls made on it meanwhile go to the job at once.
            let job = Promise::new(Some(Cap::local(Job(self.0.clone()))));
            self.0.promises.borrow_mut().push(job.clone());
            call.responder().results(|b, caps| {
                let j: job::Client = caps.client(Cap::Promise(job));
                b.init_as::<ticket::job_results::Builder>().set_job(j);
                Ok(())
            })
        }
    }

    impl Object for Job {
        fn dedupe(&self) -> bool {
            false
        }

        fn call(self: Rc<Self>, call: Call) {
            self.0.calls.borrow_mut().push(call.responder());
        }
    }
}

// ---- the server, with capnp-rpc ----

mod baseline {
    use super::*;

    #[derive(Default)]
    pub struct Waiting {
        pub open: Cell<usize>,
        pub never: tokio::sync::Notify,
    }

    pub struct Submission(pub Rc<Waiting>);
    struct Ticket(Rc<Waiting>);
    struct Job(Rc<Waiting>);

    impl submission::Server for Submission {
        async fn submit(
            self: Rc<Self>,
            _: submission::SubmitParams,
            mut results: submission::SubmitResults,
        ) -> Result<(), capnp::Error> {
            let t: ticket::Client = capnp_rpc::new_client(Ticket(self.0.clone()));
            results.get().set_ticket(t);
            Ok(())
        }
    }

    impl ticket::Server for Ticket {
        async fn job(
            self: Rc<Self>,
            _: ticket::JobParams,
            mut results: ticket::JobResults,
        ) -> Result<(), capnp::Error> {
            let j: job::Client = capnp_rpc::new_client(Job(self.0.clone()));
            results.get().set_job(j);
            Ok(())
        }
    }

    impl job::Server for Job {
        async fn log(
            self: Rc<Self>,
            _: job::LogParams,
            _: job::LogResults,
        ) -> Result<(), capnp::Error> {
            self.0.open.set(self.0.open.get() + 1);
            self.0.never.notified().await;
            Ok(())
        }

        async fn result(
            self: Rc<Self>,
            _: job::ResultParams,
            _: job::ResultResults,
        ) -> Result<(), capnp::Error> {
            self.0.open.set(self.0.open.get() + 1);
            self.0.never.notified().await;
            Ok(())
        }
    }
}

fn serve(socket: &Path, layer: Layer) {
    local(async move {
        let listener = tokio::net::UnixListener::bind(socket).expect("bind the socket");
        println!("ready");
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let ours_w = Rc::new(ours::Waiting::default());
        let base_w = Rc::new(baseline::Waiting::default());
        let (ow, bw) = (ours_w.clone(), base_w.clone());
        tokio::task::spawn_local(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (r, w) = s.into_split();
                match layer {
                    Layer::Ours => {
                        let ow = ow.clone();
                        let conn = ocluster_rpc::Conn::new(ocluster_rpc::Options {
                            restorer: Some(Box::new(move |_: &[u8]| {
                                Ok(ocluster_rpc::Cap::local(ours::Submission(ow.clone())))
                            })),
                            ..Default::default()
                        });
                        tokio::task::spawn_local(async move {
                            conn.run(r.compat(), w.compat_write()).await;
                        });
                    }
                    Layer::CapnpRpc => {
                        let net = twoparty::VatNetwork::new(
                            r.compat(),
                            w.compat_write(),
                            Side::Server,
                            Default::default(),
                        );
                        let s: submission::Client =
                            capnp_rpc::new_client(baseline::Submission(bw.clone()));
                        tokio::task::spawn_local(RpcSystem::new(Box::new(net), Some(s.client)));
                    }
                }
            }
        });
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        while stdin.read_line(&mut line).await.unwrap_or(0) > 0 {
            match line.trim() {
                "heap" => println!("{}", heap()),
                "open" => println!(
                    "{}",
                    match layer {
                        Layer::Ours => ours_w.calls.borrow().len(),
                        Layer::CapnpRpc => base_w.open.get(),
                    }
                ),
                _ => println!("?"),
            }
            line.clear();
        }
    });
}

// ---- the client and the measurement ----

struct Server {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Server {
    fn ask(&mut self, q: &str) -> usize {
        let stdin = self.child.stdin.as_mut().expect("the server's stdin");
        writeln!(stdin, "{q}").expect("ask the server");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("the server's answer");
        line.trim().parse().expect("a number from the server")
    }
}

/// One round: the server's heap per queued job, in bytes.
// A benchmark that starts itself as its server: no Exec seam to record here.
#[allow(clippy::disallowed_methods)]
fn round(layer: Layer, jobs: usize) -> f64 {
    let dir = std::env::temp_dir().join(format!("rpc-memory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let socket = dir.join("s");
    let layer_arg = match layer {
        Layer::Ours => "ours",
        Layer::CapnpRpc => "capnp-rpc",
    };
    let mut child = Command::new(std::env::current_exe().expect("this program"))
        .args(["serve", "--layer", layer_arg, "--socket"])
        .arg(&socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut ready = String::new();
    out.read_line(&mut ready).expect("the server starts");
    let mut server = Server { child, out };
    let per_job = local(async {
        let s = tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect");
        let (r, w) = s.into_split();
        let net = twoparty::VatNetwork::new(
            r.compat(),
            w.compat_write(),
            Side::Client,
            Default::default(),
        );
        let mut rpc = RpcSystem::new(Box::new(net), None);
        let sub: submission::Client = rpc.bootstrap(Side::Server);
        tokio::task::spawn_local(rpc);
        // Warm up the connection and the tables, then measure.
        let mut held = Vec::new();
        queue(&sub, 100, &mut held).await;
        wait_open(&mut server, 200).await;
        let h0 = server.ask("heap");
        queue(&sub, jobs, &mut held).await;
        wait_open(&mut server, 2 * (jobs + 100)).await;
        let h1 = server.ask("heap");
        (h1 as f64 - h0 as f64) / jobs as f64
    });
    let _ = server.child.kill();
    let _ = server.child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    per_job
}

type Open<T> = capnp::capability::Promise<capnp::capability::Response<T>, capnp::Error>;

/// What a client holds for a queued job.
type Held = (
    ticket::Client,
    job::Client,
    Open<job::result_results::Owned>,
    Open<job::log_results::Owned>,
);

/// Queues N jobs as `ocluster-client` does, keeping what it keeps.
async fn queue(sub: &submission::Client, n: usize, held: &mut Vec<Held>) {
    for _ in 0..n {
        let mut req = sub.submit_request();
        req.get().set_pool("linux");
        req.get().init_descr().set_cache_hint("hint");
        let r = req.send().promise.await.expect("submit");
        let ticket = r.get().expect("results").get_ticket().expect("ticket");
        let r = ticket.job_request().send().promise.await.expect("job");
        let job = r.get().expect("results").get_job().expect("job");
        let result = job.result_request().send().promise;
        let mut log = job.log_request();
        log.get().set_start(0);
        let log = log.send().promise;
        held.push((ticket, job, result, log));
    }
}

async fn wait_open(server: &mut Server, want: usize) {
    let t = Instant::now();
    while server.ask("open") < want {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the server did not get every call"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn run(jobs: usize, rounds: usize) {
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for r in 0..rounds {
        for layer in [Layer::Ours, Layer::CapnpRpc] {
            let b = round(layer, jobs);
            eprintln!("round {} {:?}: {:.0} bytes per queued job", r + 1, layer, b);
            match layer {
                Layer::Ours => ours.push(b),
                Layer::CapnpRpc => base.push(b),
            }
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("jobs {jobs}");
    println!("rounds {rounds}");
    println!("ours_bytes_per_job {:.0}", med(&mut ours));
    println!("capnp_rpc_bytes_per_job {:.0}", med(&mut base));
    println!(
        "ours_all {:?}",
        ours.iter().map(|b| b.round()).collect::<Vec<_>>()
    );
    println!(
        "capnp_rpc_all {:?}",
        base.iter().map(|b| b.round()).collect::<Vec<_>>()
    );
}
