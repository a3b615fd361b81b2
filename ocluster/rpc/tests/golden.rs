//! The bytes OCaml's `ocluster-client submit-obuilder` sent to the original scheduler
//! (../shared/reference/ocluster-golden/plain/submit-client-to-scheduler.bin), replayed
//! into ocluster-rpc serving objects that answer as the scheduler does: the submission
//! gives a ticket, the ticket a promise that resolves to the job at once, the job answers
//! `log` and `result`. The answers must be the original's, message by message, in kind,
//! answer id and capability descriptor: the client's later messages name our export ids
//! (`importedCap = 3`, `release id = 2`), so they only make sense if we numbered as the
//! original did.

use std::cell::Cell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use capnp_rpc::rpc_capnp::{cap_descriptor, message, resolve, return_};
use ocluster_api::{ids, job, submission, ticket};
use ocluster_rpc::{Call, Cap, Conn, Object, Options, Promise};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

fn golden() -> Option<PathBuf> {
    let d = std::env::var_os("OCLUSTER_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/reference/ocluster-golden")
        });
    if d.join("plain/submit-client-to-scheduler.bin").is_file() {
        return Some(d);
    }
    let msg = format!("golden files not found at {}", d.display());
    if std::env::var("OBUILDER_TEST_STRICT").is_ok_and(|v| v == "1") {
        panic!("OBUILDER_TEST_STRICT=1: {msg}");
    }
    eprintln!("SKIP: {msg}");
    None
}

#[derive(Default)]
struct Seen {
    dropped: Cell<usize>,
    logs: Cell<usize>,
    /// The job's promise resolves before `Ticket.job` answers.
    early: Cell<bool>,
    /// `result`, held until the job ends (after the fourth `log`, as in the capture).
    result: std::cell::RefCell<Option<ocluster_rpc::Responder>>,
}

struct Submission(Rc<Seen>);
struct Ticket(Rc<Seen>, bool);
struct Job(Rc<Seen>);

impl Drop for Submission {
    fn drop(&mut self) {
        self.0.dropped.set(self.0.dropped.get() + 1);
    }
}
impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.dropped.set(self.0.dropped.get() + 1);
    }
}
impl Drop for Job {
    fn drop(&mut self) {
        self.0.dropped.set(self.0.dropped.get() + 1);
    }
}

impl Object for Submission {
    fn call(self: Rc<Self>, call: Call) {
        assert_eq!((call.interface_id, call.method_id), (ids::SUBMISSION, 0));
        let spec = call
            .params()
            .and_then(|p| p.get_as::<submission::submit_params::Reader>())
            .and_then(|p| {
                let d = p.get_descr()?;
                Ok(p.get_pool()?.to_string()? + " " + d.get_cache_hint()?.to_str()?)
            })
            .expect("submit's parameters");
        assert!(spec.starts_with("linux-x86_64"), "{spec}");
        let w = self.0.clone();
        call.responder().results(|b, caps| {
            let early = w.early.get();
            let t: ticket::Client = caps.client(Cap::local(Ticket(w, early)));
            b.init_as::<submission::submit_results::Builder>()
                .set_ticket(t);
            Ok(())
        })
    }
}

impl Object for Ticket {
    fn call(self: Rc<Self>, call: Call) {
        assert_eq!((call.interface_id, call.method_id), (ids::TICKET, 0));
        // A promise on the wire even when a worker takes the job at once, as the
        // original's is: `senderPromise`, then `Resolve`.
        let p = Promise::new(None);
        let job = p.clone();
        if self.1 {
            // Resolved before it is sent: still a promise on the wire, then `Resolve`.
            p.resolve(Cap::local(Job(self.0.clone())));
        }
        call.responder().results(|b, caps| {
            let j: job::Client = caps.client(Cap::Promise(job));
            b.init_as::<ticket::job_results::Builder>().set_job(j);
            Ok(())
        });
        p.resolve(Cap::local(Job(self.0.clone())));
    }
}

impl Object for Job {
    fn call(self: Rc<Self>, call: Call) {
        match (call.interface_id, call.method_id) {
            (ids::JOB, 0) => {
                let start = call
                    .params()
                    .and_then(|p| p.get_as::<job::log_params::Reader>())
                    .map(|p| p.get_start())
                    .expect("log's parameters");
                self.0.logs.set(self.0.logs.get() + 1);
                if self.0.logs.get() == 5 {
                    let r = self.0.result.borrow_mut().take().expect("result is open");
                    r.results(|b, _| {
                        b.init_as::<job::result_results::Builder>().set_output("");
                        Ok(())
                    });
                }
                call.responder().results(|b, _| {
                    let mut r = b.init_as::<job::log_results::Builder>();
                    r.set_log(b"hi\n");
                    r.set_next(start + 3);
                    Ok(())
                })
            }
            (ids::JOB, 1) => *self.0.result.borrow_mut() = Some(call.responder()),
            other => panic!("unexpected call {other:?}"),
        }
    }
}

/// A message as the golden decodings show it, reduced to what must match.
fn summary(m: message::Reader<'_>) -> String {
    let desc = |d: cap_descriptor::Reader<'_>| match d.which().unwrap() {
        cap_descriptor::SenderHosted(i) => format!("senderHosted={i}"),
        cap_descriptor::SenderPromise(i) => format!("senderPromise={i}"),
        cap_descriptor::ReceiverHosted(i) => format!("receiverHosted={i}"),
        _ => "other".into(),
    };
    match m.which().unwrap() {
        message::Return(r) => {
            let r = r.unwrap();
            match r.which().unwrap() {
                return_::Results(p) => {
                    let caps: Vec<String> = p
                        .unwrap()
                        .get_cap_table()
                        .unwrap()
                        .iter()
                        .map(desc)
                        .collect();
                    format!(
                        "return {} releaseParamCaps={} [{}]",
                        r.get_answer_id(),
                        r.get_release_param_caps(),
                        caps.join(",")
                    )
                }
                return_::Exception(e) => format!(
                    "return {} exception {}",
                    r.get_answer_id(),
                    e.unwrap().get_reason().unwrap().to_str().unwrap()
                ),
                _ => format!("return {} other", r.get_answer_id()),
            }
        }
        message::Resolve(r) => {
            let r = r.unwrap();
            match r.which().unwrap() {
                resolve::Cap(d) => format!("resolve {} {}", r.get_promise_id(), desc(d.unwrap())),
                resolve::Exception(_) => format!("resolve {} exception", r.get_promise_id()),
            }
        }
        message::Abort(_) => "abort".into(),
        _ => "other".into(),
    }
}

fn read_all(mut bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let m = capnp::serialize::read_message(&mut bytes, Default::default()).expect("a message");
        out.push(summary(m.get_root().unwrap()));
    }
    out
}

#[test]
fn the_ocaml_clients_submission_is_answered_as_the_original_scheduler_answered_it() {
    replay(false);
}

#[test]
fn a_job_taken_before_the_client_asks_is_still_a_promise_on_the_wire() {
    replay(true);
}

fn replay(early: bool) {
    let Some(g) = golden() else { return };
    let sent = std::fs::read(g.join("plain/submit-client-to-scheduler.bin")).unwrap();
    let answered = std::fs::read(g.join("plain/submit-scheduler-to-client.bin")).unwrap();
    // The original's answers, without its closing Abort (its scheduler's "Switch turned
    // off" when the client left).
    let mut want = read_all(&answered);
    assert_eq!(want.pop().as_deref(), Some("abort"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let seen = Rc::new(Seen::default());
    seen.early.set(early);
    let got = tokio::task::LocalSet::new().block_on(&rt, async {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let s = seen.clone();
        let conn = Conn::new(Options {
            restorer: Some(Box::new(move |id: &[u8]| {
                assert_eq!(id.len(), 20, "the client's 20-byte service id");
                Ok(Cap::local(Submission(s.clone())))
            })),
            ..Options::default()
        });
        let (r, w) = tokio::io::split(ours);
        let c = conn.clone();
        let served =
            tokio::task::spawn_local(async move { c.run(r.compat(), w.compat_write()).await });
        peer.write_all(&sent).await.unwrap();
        peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut got))
            .await
            .expect("the connection ends")
            .unwrap();
        let why = served.await.unwrap();
        assert_eq!(why.kind, capnp::ErrorKind::Disconnected, "{why}");
        got
    });
    assert_eq!(read_all(&got), want);
    assert_eq!(seen.logs.get(), 6);
    // The client released the ticket, the job and the submission (and the job made
    // first when it resolved early).
    assert_eq!(seen.dropped.get(), if early { 4 } else { 3 });
}
