//! Services written against capnp's generated `Server` traits (as `capnp_rpc::new_client`
//! objects), served by ocluster-rpc to a capnp-rpc peer: calls in, results with
//! capabilities out, a peer's capability received in parameters and called back through
//! its generated client, and that capability handed on to another connection.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use ocluster_api::{job, queue, submission, ticket};
use ocluster_rpc::{Cap, Conn, Options};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// The job a worker gave, kept by the scheduler-like service.
type Kept = Rc<RefCell<Option<job::Client>>>;

struct Service(Kept);

impl submission::Server for Service {
    async fn submit(
        self: Rc<Self>,
        params: submission::SubmitParams,
        mut results: submission::SubmitResults,
    ) -> Result<(), capnp::Error> {
        let pool = params.get()?.get_pool()?.to_string()?;
        if pool == "bad" {
            return Err(capnp::Error::failed("no pool bad".into()));
        }
        let t: ticket::Client = capnp_rpc::new_client(Ticket(self.0.clone()));
        results.get().set_ticket(t);
        Ok(())
    }
}

impl queue::Server for Service {
    /// Keeps the worker's job and answers with what its `log(7)` said.
    async fn pop(
        self: Rc<Self>,
        params: queue::PopParams,
        mut results: queue::PopResults,
    ) -> Result<(), capnp::Error> {
        let job = params.get()?.get_job()?;
        *self.0.borrow_mut() = Some(job.clone());
        let mut req = job.log_request();
        req.get().set_start(7);
        let r = req.send().promise.await?;
        let log = r.get()?.get_log()?.to_vec();
        results
            .get()
            .init_descr()
            .set_cache_hint(std::str::from_utf8(&log).unwrap_or("?"));
        Ok(())
    }
}

struct Ticket(Kept);

impl ticket::Server for Ticket {
    /// The worker's job if one was given, else a job of our own.
    async fn job(
        self: Rc<Self>,
        _: ticket::JobParams,
        mut results: ticket::JobResults,
    ) -> Result<(), capnp::Error> {
        let j = self.0.borrow().clone();
        let j = j.unwrap_or_else(|| capnp_rpc::new_client(OwnJob));
        results.get().set_job(j);
        Ok(())
    }
}

struct OwnJob;

impl job::Server for OwnJob {
    async fn result(
        self: Rc<Self>,
        _: job::ResultParams,
        mut results: job::ResultResults,
    ) -> Result<(), capnp::Error> {
        tokio::time::sleep(Duration::from_millis(10)).await;
        results.get().set_output("own output");
        Ok(())
    }
}

/// The worker's job, served by capnp-rpc on the peer's side.
struct WorkerJob;

impl job::Server for WorkerJob {
    async fn log(
        self: Rc<Self>,
        params: job::LogParams,
        mut results: job::LogResults,
    ) -> Result<(), capnp::Error> {
        let start = params.get()?.get_start();
        results
            .get()
            .set_log(format!("worker log {start}").as_bytes());
        Ok(())
    }

    async fn result(
        self: Rc<Self>,
        _: job::ResultParams,
        mut results: job::ResultResults,
    ) -> Result<(), capnp::Error> {
        results.get().set_output("worker output");
        Ok(())
    }
}

/// A capnp-rpc client of `make`'s object, served by ocluster-rpc.
fn serve<C: capnp::capability::FromClientHook>(make: impl Fn() -> Cap + 'static) -> C {
    let (a, b) = tokio::io::duplex(1 << 16);
    let conn = Conn::new(Options {
        restorer: Some(Box::new(move |_: &[u8]| Ok(make()))),
        ..Options::default()
    });
    let (r, w) = tokio::io::split(a);
    tokio::task::spawn_local(async move { conn.run(r.compat(), w.compat_write()).await });
    let (r, w) = tokio::io::split(b);
    let net = twoparty::VatNetwork::new(
        r.compat(),
        w.compat_write(),
        Side::Client,
        Default::default(),
    );
    let mut rpc = RpcSystem::new(Box::new(net), None);
    let client: C = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);
    client
}

/// The service's submission interface, as a generated capnp-rpc server.
fn connect(kept: &Kept) -> submission::Client {
    let k = kept.clone();
    serve(move || {
        let c: submission::Client = capnp_rpc::new_client(Service(k.clone()));
        Cap::from_hook(c.client.hook)
    })
}

/// The service's queue interface.
fn connect_queue(kept: &Kept) -> queue::Client {
    let k = kept.clone();
    serve(move || {
        let q: queue::Client = capnp_rpc::new_client(Service(k.clone()));
        Cap::from_hook(q.client.hook)
    })
}

fn run(f: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async move {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("the test took more than 20 s")
    });
}

#[test]
fn generated_servers_answer_through_ocluster_rpc() {
    run(async {
        let kept = Kept::default();
        let s = connect(&kept);
        let mut req = s.submit_request();
        req.get().set_pool("bad");
        let e = match req.send().promise.await {
            Err(e) => e,
            Ok(_) => panic!("pool bad accepted"),
        };
        assert!(e.to_string().contains("no pool bad"), "{e}");
        // Pipelined: submit -> ticket.job -> job.result, on generated servers.
        let mut req = s.submit_request();
        req.get().set_pool("linux");
        let job = req
            .send()
            .pipeline
            .get_ticket()
            .job_request()
            .send()
            .pipeline
            .get_job();
        let r = job.result_request().send().promise.await.expect("result");
        assert_eq!(
            r.get().unwrap().get_output().unwrap().to_str().unwrap(),
            "own output"
        );
    });
}

#[test]
fn a_peers_capability_is_called_through_its_generated_client_and_handed_on() {
    run(async {
        let kept = Kept::default();
        let q = connect_queue(&kept);
        let wjob: job::Client = capnp_rpc::new_client(WorkerJob);
        let mut pop = q.pop_request();
        pop.get().set_job(wjob);
        let d = pop.send().promise.await.expect("pop");
        let hint = d
            .get()
            .unwrap()
            .get_descr()
            .unwrap()
            .get_cache_hint()
            .unwrap();
        assert_eq!(hint.to_str().unwrap(), "worker log 7");
        // A client on another connection gets the worker's job from its ticket, and its
        // calls are relayed to the worker.
        let s = connect(&kept);
        let mut req = s.submit_request();
        req.get().set_pool("linux");
        let job = req
            .send()
            .pipeline
            .get_ticket()
            .job_request()
            .send()
            .pipeline
            .get_job();
        let r = job
            .result_request()
            .send()
            .promise
            .await
            .expect("relayed result");
        assert_eq!(
            r.get().unwrap().get_output().unwrap().to_str().unwrap(),
            "worker output"
        );
        let mut log = job.log_request();
        log.get().set_start(41);
        let l = log.send().promise.await.expect("relayed log");
        assert_eq!(l.get().unwrap().get_log().unwrap(), b"worker log 41");
    });
}
