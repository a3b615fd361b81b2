//! ocluster-rpc against capnp-rpc, the published Rust implementation, as the peer: each
//! test serves objects of OCluster's schema with this crate on one end of a byte stream
//! and drives them with capnp-rpc's generated clients on the other, so every message is
//! real serialisation of `rpc.capnp` and every reply is checked by another implementation.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
use ocluster_api::{ids, job, queue, submission, ticket};
use ocluster_rpc::{Call, Cap, Conn, Object, Options, Promise, Responder};
use tokio_util::compat::TokioAsyncReadCompatExt;

/// What the server-side objects saw and hold, for the test to look at and drive.
#[derive(Default)]
struct World {
    /// `result` calls left open, answered when the test says.
    results: Vec<Responder>,
    /// The promise the ticket's `job` gave, resolved when the test says.
    promise: Option<Rc<Promise>>,
    /// The job a worker gave with `pop`.
    worker_job: Option<Cap>,
    tickets_dropped: usize,
    jobs_dropped: usize,
    /// Given as the job of the next ticket instead of a promise of our own.
    job_for_tickets: Option<Cap>,
}

type W = Rc<RefCell<World>>;

struct Submission(W);
struct Ticket(W);
struct Job(W);
struct Queue(W);

impl Object for Submission {
    fn call(self: Rc<Self>, call: Call) {
        match (call.interface_id, call.method_id) {
            (ids::SUBMISSION, 0) => {
                let pool = call
                    .params()
                    .and_then(|p| p.get_as::<submission::submit_params::Reader>())
                    .and_then(|p| Ok(p.get_pool()?.to_string()?));
                let w = self.0.clone();
                match pool {
                    Ok(pool) if pool == "bad" => call
                        .responder()
                        .error(capnp::Error::failed("no pool bad".into())),
                    Ok(_) => call.responder().results(|b, caps| {
                        let t: ticket::Client = caps.client(Cap::local(Ticket(w)));
                        b.init_as::<submission::submit_results::Builder>()
                            .set_ticket(t);
                        Ok(())
                    }),
                    Err(e) => call.responder().error(e),
                }
            }
            (ids::QUEUE, 0) => Queue(self.0.clone()).call_pop(call),
            _ => call
                .responder()
                .error(capnp::Error::unimplemented("no such method".into())),
        }
    }
}

impl Object for Ticket {
    fn call(self: Rc<Self>, call: Call) {
        match (call.interface_id, call.method_id) {
            (ids::TICKET, 0) => {
                let given = self.0.borrow().job_for_tickets.clone();
                let cap = match given {
                    Some(c) => c,
                    None => {
                        let p = Promise::new(None);
                        self.0.borrow_mut().promise = Some(p.clone());
                        Cap::Promise(p)
                    }
                };
                call.responder().results(|b, caps| {
                    let j: job::Client = caps.client(cap);
                    b.init_as::<ticket::job_results::Builder>().set_job(j);
                    Ok(())
                })
            }
            (ids::TICKET, 1) => call.responder().empty(),
            _ => call
                .responder()
                .error(capnp::Error::unimplemented("no such method".into())),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.borrow_mut().tickets_dropped += 1;
    }
}

impl Object for Job {
    fn call(self: Rc<Self>, call: Call) {
        match (call.interface_id, call.method_id) {
            (ids::JOB, 0) => {
                let start = call
                    .params()
                    .and_then(|p| p.get_as::<job::log_params::Reader>())
                    .map(|p| p.get_start());
                match start {
                    Ok(start) => call.responder().results(|b, _| {
                        let mut r = b.init_as::<job::log_results::Builder>();
                        r.set_log(format!("log from {start}").as_bytes());
                        r.set_next(start + 1);
                        Ok(())
                    }),
                    Err(e) => call.responder().error(e),
                }
            }
            (ids::JOB, 1) => {
                let r = call.responder();
                self.0.borrow_mut().results.push(r);
            }
            _ => call
                .responder()
                .error(capnp::Error::unimplemented("no such method".into())),
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.0.borrow_mut().jobs_dropped += 1;
    }
}

impl Queue {
    /// `pop(job)`: keeps the worker's job, and answers with a description whose cache
    /// hint is what that job's `log(7)` said (a call from this vat back to the peer).
    fn call_pop(&self, call: Call) {
        let job = call
            .params()
            .and_then(|p| p.get_as::<queue::pop_params::Reader>())
            .and_then(|p| Ok(call.cap(&p.get_job()?)));
        let job = match job {
            Ok(Cap::Remote(i)) => i,
            Ok(_) => {
                return call
                    .responder()
                    .error(capnp::Error::failed("not a remote job".into()))
            }
            Err(e) => return call.responder().error(e),
        };
        self.0.borrow_mut().worker_job = Some(Cap::Remote(job.clone()));
        let reply = job.call(ids::JOB, 0, |b, _| {
            b.init_as::<job::log_params::Builder>().set_start(7);
            Ok(())
        });
        let resp = call.responder();
        tokio::task::spawn_local(async move {
            match reply.await {
                Ok(r) => {
                    let log = r
                        .content()
                        .and_then(|c| c.get_as::<job::log_results::Reader>())
                        .and_then(|l| Ok(l.get_log()?.to_vec()));
                    match log {
                        Ok(log) => resp.results(|b, _| {
                            let mut d = b.init_as::<queue::pop_results::Builder>().init_descr();
                            d.set_cache_hint(std::str::from_utf8(&log).unwrap_or("?"));
                            Ok(())
                        }),
                        Err(e) => resp.error(e),
                    }
                }
                Err(e) => resp.error(e),
            }
        });
    }
}

/// A connection of ours with `opts`, served on one end of an in-memory stream: the
/// connection, the task that serves it (its result is why it ended), the other end.
fn serve(
    opts: Options,
) -> (
    Rc<Conn>,
    tokio::task::JoinHandle<capnp::Error>,
    tokio::io::DuplexStream,
) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let conn = Conn::new(opts);
    let (r, w) = tokio::io::split(a);
    let c = conn.clone();
    let served = tokio::task::spawn_local(async move {
        c.run(
            r.compat(),
            tokio_util::compat::TokioAsyncWriteCompatExt::compat_write(w),
        )
        .await
    });
    (conn, served, b)
}

/// Serves `world`'s submission on one end of a stream; returns a capnp-rpc client of it
/// and the server's connection.
fn connect(
    world: &W,
) -> (
    submission::Client,
    Rc<Conn>,
    tokio::task::JoinHandle<capnp::Error>,
) {
    let w = world.clone();
    let (conn, served, b) = serve(Options {
        restorer: Some(Box::new(move |id: &[u8]| {
            if id.is_empty() {
                Ok(Cap::local(Submission(w.clone())))
            } else {
                Err(capnp::Error::failed("unknown service".into()))
            }
        })),
        ..Options::default()
    });
    let (r, wr) = tokio::io::split(b);
    let net = twoparty::VatNetwork::new(
        r.compat(),
        tokio_util::compat::TokioAsyncWriteCompatExt::compat_write(wr),
        Side::Client,
        Default::default(),
    );
    let mut rpc = RpcSystem::new(Box::new(net), None);
    let client: submission::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);
    (client, conn, served)
}

fn submit(
    s: &submission::Client,
    pool: &str,
) -> capnp::capability::RemotePromise<submission::submit_results::Owned> {
    let mut req = s.submit_request();
    req.get().set_pool(pool);
    req.get().init_descr().set_cache_hint("hint");
    req.send()
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
}

fn run(f: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        tokio::time::timeout(Duration::from_secs(20), f)
            .await
            .expect("the test took more than 20 s")
    });
}

#[test]
fn a_result_pipelined_on_a_promise_is_answered_when_the_object_answers() {
    run(async {
        let world = W::default();
        let (s, conn, _) = connect(&world);
        // submit -> ticket.job -> job.result, all pipelined before any answer.
        let ticket = submit(&s, "linux").pipeline.get_ticket();
        let job = ticket.job_request().send().pipeline.get_job();
        let result = job.result_request().send().promise;
        let log = job.log_request();
        settle().await;
        // The promise waits: the call on it waits in it.
        let p = world
            .borrow()
            .promise
            .clone()
            .expect("the ticket gave a promise");
        assert!(!p.is_resolved());
        let w = world.clone();
        p.resolve(Cap::local(Job(w)));
        settle().await;
        assert_eq!(world.borrow().results.len(), 1, "result reached the job");
        // The client holds the ticket and the job as pipelines on its questions (capnp-rpc
        // releases the imports of results nobody read): the answers keep them.
        let (_, open, kept, _) = conn.table_sizes();
        assert_eq!(open, 1, "one call left open: result");
        assert!(
            kept >= 2,
            "the submit and job answers are kept: {:?}",
            conn.table_sizes()
        );
        let r = world.borrow_mut().results.pop().unwrap();
        r.results(|b, _| {
            b.init_as::<job::result_results::Builder>()
                .set_output("done");
            Ok(())
        });
        let out = result.await.expect("result answered");
        assert_eq!(
            out.get().unwrap().get_output().unwrap().to_str().unwrap(),
            "done"
        );
        // Calls on the resolved job go straight to it.
        let mut log = log;
        log.get().set_start(3);
        let l = log.send().promise.await.expect("log answered");
        assert_eq!(l.get().unwrap().get_log().unwrap(), b"log from 3");
        assert_eq!(l.get().unwrap().get_next(), 4);
    });
}

#[test]
fn errors_travel_as_exceptions_and_the_connection_keeps_serving() {
    run(async {
        let world = W::default();
        let (s, _conn, _) = connect(&world);
        let e = match submit(&s, "bad").promise.await {
            Err(e) => e,
            Ok(_) => panic!("a submit to pool bad succeeded"),
        };
        assert!(e.to_string().contains("no pool bad"), "{e}");
        // An unknown method of a known object.
        let ticket = submit(&s, "linux").pipeline.get_ticket();
        let c: queue::Client = capnp::capability::FromClientHook::new(ticket.client.hook.add_ref());
        let e = match c.set_active_request().send().promise.await {
            Err(e) => e,
            Ok(_) => panic!("an unknown method answered"),
        };
        assert_eq!(e.kind, capnp::ErrorKind::Unimplemented, "{e}");
        // Still serving.
        let t = submit(&s, "linux")
            .promise
            .await
            .expect("submit after errors");
        t.get()
            .unwrap()
            .get_ticket()
            .unwrap()
            .cancel_request()
            .send()
            .promise
            .await
            .unwrap();
    });
}

#[test]
fn dropping_a_waiting_call_cancels_it_and_dropping_a_capability_releases_the_object() {
    run(async {
        let world = W::default();
        let (s, conn, _) = connect(&world);
        world.borrow_mut().job_for_tickets = Some(Cap::local(Job(world.clone())));
        let ticket = {
            let r = submit(&s, "linux").promise.await.unwrap();
            r.get().unwrap().get_ticket().unwrap()
        };
        let job = {
            let r = ticket.job_request().send().promise.await.unwrap();
            r.get().unwrap().get_job().unwrap()
        };
        let result = job.result_request().send();
        settle().await;
        assert_eq!(world.borrow().results.len(), 1);
        assert!(world.borrow().results[0].is_open());
        drop(result);
        settle().await;
        assert!(
            !world.borrow().results[0].is_open(),
            "the Finish closed the answer"
        );
        // A late answer to a canceled call goes nowhere.
        let r = world.borrow_mut().results.pop().unwrap();
        r.results(|_, _| Ok(()));
        let (_, open, _, _) = conn.table_sizes();
        assert_eq!(open, 0);
        assert_eq!(world.borrow().tickets_dropped, 0);
        drop(ticket);
        settle().await;
        assert_eq!(
            world.borrow().tickets_dropped,
            1,
            "Release dropped the ticket"
        );
        world.borrow_mut().job_for_tickets = None;
        drop(job);
        settle().await;
        assert_eq!(world.borrow().jobs_dropped, 1, "Release dropped the job");
    });
}

/// A job of the worker's side, served by capnp-rpc.
struct WorkerJob(Rc<RefCell<bool>>);

impl job::Server for WorkerJob {
    async fn log(
        self: Rc<Self>,
        params: job::LogParams,
        mut results: job::LogResults,
    ) -> Result<(), capnp::Error> {
        let start = params.get()?.get_start();
        let mut r = results.get();
        r.set_log(format!("worker log {start}").as_bytes());
        r.set_next(start + 1);
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

impl Drop for WorkerJob {
    fn drop(&mut self) {
        *self.0.borrow_mut() = true;
    }
}

#[test]
fn a_capability_the_peer_passes_is_called_back_relayed_to_others_and_released() {
    run(async {
        let world = W::default();
        // The worker's connection: pop(job) with a job of its own.
        let (worker, worker_conn, _) = connect(&world);
        let worker_queue: queue::Client =
            capnp::capability::FromClientHook::new(worker.client.hook.add_ref());
        let dropped = Rc::new(RefCell::new(false));
        let wjob: job::Client = capnp_rpc::new_client(WorkerJob(dropped.clone()));
        let mut pop = worker_queue.pop_request();
        pop.get().set_job(wjob);
        let descr = pop.send().promise.await.expect("pop answered");
        let hint = descr
            .get()
            .unwrap()
            .get_descr()
            .unwrap()
            .get_cache_hint()
            .unwrap();
        assert_eq!(
            hint.to_str().unwrap(),
            "worker log 7",
            "the server called the worker's job"
        );
        // A client on another connection gets the worker's job as its ticket's job and
        // calls it: each call is relayed.
        let wj = world.borrow().worker_job.clone().unwrap();
        world.borrow_mut().job_for_tickets = Some(wj);
        let (client, _client_conn, _) = connect(&world);
        let job = submit(&client, "linux")
            .pipeline
            .get_ticket()
            .job_request()
            .send()
            .pipeline
            .get_job();
        let out = job
            .result_request()
            .send()
            .promise
            .await
            .expect("relayed result");
        assert_eq!(
            out.get().unwrap().get_output().unwrap().to_str().unwrap(),
            "worker output"
        );
        let mut log = job.log_request();
        log.get().set_start(41);
        let l = log.send().promise.await.expect("relayed log");
        assert_eq!(l.get().unwrap().get_log().unwrap(), b"worker log 41");
        // Once nothing holds it on the server, the worker's object is released.
        world.borrow_mut().job_for_tickets = None;
        world.borrow_mut().worker_job = None;
        drop(job);
        for _ in 0..50 {
            settle().await;
            if *dropped.borrow() {
                break;
            }
        }
        assert!(*dropped.borrow(), "the worker's job was released");
        assert_eq!(worker_conn.table_sizes().3, 0, "no imports left");
    });
}

#[test]
fn a_peer_that_goes_releases_everything_it_held() {
    run(async {
        let world = W::default();
        let (s, conn, served) = connect(&world);
        world.borrow_mut().job_for_tickets = Some(Cap::local(Job(world.clone())));
        let ticket = submit(&s, "linux").pipeline.get_ticket();
        let job = ticket.job_request().send().pipeline.get_job();
        let _result = job.result_request().send();
        settle().await;
        world.borrow_mut().job_for_tickets = None;
        assert_eq!(world.borrow().results.len(), 1);
        // The client's vat goes away: its RpcSystem is dropped with the clients.
        drop((s, ticket, job, _result));
        // Simulate the peer's disappearance by aborting its end.
        conn.abort(capnp::Error::disconnected("test".into()));
        let why = served.await.unwrap();
        assert!(why.to_string().contains("test"), "{why}");
        settle().await;
        assert_eq!(world.borrow().tickets_dropped, 1);
        assert_eq!(world.borrow().jobs_dropped, 1);
        assert!(!world.borrow().results[0].is_open());
    });
}

#[test]
fn garbage_ends_the_connection_with_an_error_and_no_panic() {
    run(async {
        use tokio::io::AsyncWriteExt;
        let world = W::default();
        let (conn, served, mut b) = serve(Options::default());
        // A segment table that claims 2^30 words.
        b.write_all(&[0, 0, 0, 0, 0, 0, 0, 0x40]).await.unwrap();
        b.write_all(&[0xff; 64]).await.unwrap();
        let why = served.await.unwrap();
        assert!(conn.closed().is_some(), "{why}");
        drop(world);
    });
}

/// Bootstrap messages written by hand: a question id far past the open ones is answered
/// (it goes in the answers table's map, not its vector), and an id asked again before its
/// `Finish` ends the connection with a protocol error, no panic.
#[test]
fn far_question_ids_are_answered_and_an_id_asked_twice_is_refused() {
    run(async {
        use capnp_rpc::rpc_capnp::message;
        use tokio::io::AsyncWriteExt;
        let (conn, served, b) = serve(Options::default());
        let bootstrap = |q: u32| {
            let mut m = capnp::message::Builder::new_default();
            m.init_root::<message::Builder>()
                .init_bootstrap()
                .set_question_id(q);
            capnp::serialize::write_message_to_words(&m)
        };
        // Read what the server writes, so that it never blocks.
        let (mut rd, mut wr) = tokio::io::split(b);
        tokio::spawn(async move {
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut rd, &mut sink).await;
        });
        for q in [u32::MAX - 1, 3_000_000_000, 0] {
            wr.write_all(&bootstrap(q)).await.unwrap();
        }
        settle().await;
        assert!(conn.closed().is_none());
        // Answered (with an error: this vat offers no bootstrap), kept until `Finish`.
        assert_eq!(conn.table_sizes().2, 3);
        wr.write_all(&bootstrap(3_000_000_000)).await.unwrap();
        let why = served.await.unwrap();
        assert!(why.extra.contains("asked again"), "{why}");
        assert!(conn.closed().is_some());
    });
}

/// A peer whose calls are all readable at once (as a TLS record's worth is, without a
/// system call) does not keep the event loop to itself: the connection lets other tasks
/// run every few messages. The scheduler's group commit is such a task: without this, a
/// burst's store batches grew to 30 000 jobs whose calls all waited in memory (issue 12).
#[test]
fn a_peer_with_many_calls_ready_does_not_keep_the_event_loop() {
    run(async {
        use capnp_rpc::rpc_capnp::message;
        let mut bytes = Vec::new();
        for q in 0..1000 {
            let mut m = capnp::message::Builder::new_default();
            m.init_root::<message::Builder>()
                .init_bootstrap()
                .set_question_id(q);
            capnp::serialize::write_message(&mut bytes, &m).unwrap();
        }
        let conn = Conn::new(Options::default());
        let c = conn.clone();
        // (An in-memory reader is never pending and takes none of tokio's budget.)
        let served = tokio::task::spawn_local(async move {
            c.run(futures::io::Cursor::new(bytes), futures::io::sink())
                .await
        });
        let probe =
            tokio::task::spawn_local(
                async move { (conn.closed().is_none(), conn.table_sizes().2) },
            );
        let (open, answered) = probe.await.unwrap();
        assert!(
            open && answered > 0 && answered < 1000,
            "{answered} answered"
        );
        let why = served.await.unwrap();
        assert!(why.extra.contains("closed the connection"), "{why}");
    });
}

/// Messages written by hand: an answer whose results are one capability in a field
/// (`submit`'s ticket) keeps it for calls pipelined on it until its `Finish`, even once
/// the peer has released its reference (even a peer that releases more than it holds);
/// the `Finish` lets it go, and releases the peer's reference too when it asks to.
#[test]
fn a_kept_answer_holds_its_capability_until_its_finish() {
    run(async {
        use capnp::message::Builder;
        use capnp_rpc::rpc_capnp::{cap_descriptor, message, return_};
        use tokio::io::AsyncWriteExt;
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let world = W::default();
        let w = world.clone();
        let (conn, _served, b) = serve(Options {
            restorer: Some(Box::new(move |_: &[u8]| {
                Ok(Cap::local(Submission(w.clone())))
            })),
            ..Options::default()
        });
        let (rd, mut wr) = tokio::io::split(b);
        let mut rd = rd.compat();
        let send = |build: &dyn Fn(message::Builder<'_>)| {
            let mut m = Builder::new_default();
            build(m.init_root());
            capnp::serialize::write_message_to_words(&m)
        };
        // A call of `method` on what `target` (question, pointer field) names.
        let call = |q: u32, target: (u32, Option<u16>), iface: u64, method: u16| {
            send(&|m| {
                let mut c = m.init_call();
                c.set_question_id(q);
                c.set_interface_id(iface);
                c.set_method_id(method);
                let mut pa = c.reborrow().init_target().init_promised_answer();
                pa.set_question_id(target.0);
                if let Some(f) = target.1 {
                    pa.init_transform(1).get(0).set_get_pointer_field(f);
                }
                let p = c.init_params().get_content();
                let mut s = p.init_as::<submission::submit_params::Builder>();
                s.set_pool("linux");
                s.init_descr().set_cache_hint("h");
            })
        };
        // The next message: the answer id of a `Return`, and the export its results give.
        let mut next_return = async || {
            let m = capnp_futures::serialize::try_read_message(&mut rd, Default::default())
                .await
                .unwrap()
                .unwrap();
            let message::Return(r) = m.get_root::<message::Reader>().unwrap().which().unwrap()
            else {
                panic!("not a return");
            };
            let r = r.unwrap();
            let export = match r.which().unwrap() {
                return_::Results(p) => p.unwrap().get_cap_table().unwrap().iter().find_map(|d| {
                    match d.which().unwrap() {
                        cap_descriptor::SenderHosted(i) => Some(i),
                        _ => None,
                    }
                }),
                _ => None,
            };
            (r.get_answer_id(), export)
        };
        let finish = |q: u32, release: bool| {
            send(&|m| {
                let mut f = m.init_finish();
                f.set_question_id(q);
                f.set_release_result_caps(release);
            })
        };
        let dropped = || world.borrow().tickets_dropped;

        wr.write_all(&send(&|m| m.init_bootstrap().set_question_id(0)))
            .await
            .unwrap();
        assert_eq!(next_return().await.0, 0);
        wr.write_all(&call(1, (0, None), ids::SUBMISSION, 0))
            .await
            .unwrap();
        let (q, ticket) = next_return().await;
        assert_eq!(q, 1);
        let ticket = ticket.expect("a ticket exported");

        // The peer lets its reference go (and more than it holds): the answer still
        // holds the ticket, and a call pipelined on it (`cancel`) reaches it.
        wr.write_all(&send(&|m| {
            let mut r = m.init_release();
            r.set_id(ticket);
            r.set_reference_count(5);
        }))
        .await
        .unwrap();
        wr.write_all(&call(2, (1, Some(0)), ids::TICKET, 1))
            .await
            .unwrap();
        assert_eq!(next_return().await, (2, None));
        assert_eq!(dropped(), 0);
        // Its `Finish` lets it go.
        wr.write_all(&finish(1, false)).await.unwrap();
        settle().await;
        assert_eq!(dropped(), 1);

        // A `Finish` that releases the results' capabilities releases the peer's
        // reference as well; one that does not leaves it to the peer.
        for (q, release) in [(3, true), (4, false)] {
            wr.write_all(&call(q, (0, None), ids::SUBMISSION, 0))
                .await
                .unwrap();
            assert_eq!(next_return().await.0, q);
            wr.write_all(&finish(q, release)).await.unwrap();
        }
        settle().await;
        assert_eq!(dropped(), 2);
        assert!(conn.closed().is_none());
        // The ticket of question 4, which the peer holds, and the submission.
        assert_eq!(conn.table_sizes().0, 2);
    });
}
