//! The OCaml programs' own messages against our scheduler.
//!
//! The golden files' `plain/` holds the bytes that the original `ocluster-client`,
//! `ocluster-admin` and `ocluster-worker` sent to the original scheduler, and what it
//! answered (captured by a relay, `--capnp-disable-tls`). These tests start our scheduler
//! on that scheduler's key and database, send it the same messages in the same order
//! (the bootstrap by service id, the pipelined calls, the finishes and releases, the
//! question ids reused), and check that it answers as the original did: the same
//! messages, the same capabilities of the same kinds (a ticket, then the job as a
//! promise that resolves once a worker takes it), the same results.
//!
//! The only changes made to the captured messages are the capability ids that the
//! scheduler chose: a captured `Release` or a call on an imported capability names the
//! original's export id, which is mapped to ours by the answers carrying it. A message
//! is sent once what it depends on has come (a `Finish` after its `Return`), as the
//! original program did. The worker's side is the captured worker's messages, and it
//! answers the scheduler's calls on its `Job` with the log chunks and the result that
//! the original client was given.

// Tests start the real programs as processes.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capnp::message::{Builder, HeapAllocator};
use capnp_rpc::rpc_capnp::{message, message_target, resolve};
use ocluster_api::{ids, job, persistent, queue, submission};

use common::replay::{
    caps, capture, desc, messages_from, params, parse, plain, raw_capture, results, root, show,
    Msg, Served,
};
use common::Scheduler;
use std::path::PathBuf;

/// One connection to the scheduler, speaking as the captured program did.
struct Session {
    name: &'static str,
    out: TcpStream,
    rx: mpsc::Receiver<Msg>,
    /// What the original scheduler sent on this connection.
    theirs: Vec<Msg>,
    /// What ours sent, in order.
    ours: Vec<Msg>,
    /// The original scheduler's capability ids and ours, as the answers paired them.
    exports: HashMap<u32, u32>,
    /// Our `Return`s so far, by answer id; and our `Resolve`s.
    returns: HashMap<u32, usize>,
    resolves: usize,
    /// Calls our scheduler made on the capabilities this side exports.
    calls: VecDeque<usize>,
    /// Each of our answers paired with the original's: (ours, theirs) indexes.
    pairs: Vec<(usize, usize)>,
    /// What did not match.
    problems: Vec<String>,
    /// The `Finish`es sent so far, by question id.
    finished: HashMap<u32, usize>,
}

impl Session {
    fn open(name: &'static str, port: u16, theirs: Vec<Msg>) -> Session {
        let out = TcpStream::connect(("127.0.0.1", port)).unwrap();
        out.set_nodelay(true).unwrap();
        let rx = messages_from(&out);
        Session {
            name,
            out,
            rx,
            theirs,
            ours: Vec::new(),
            exports: HashMap::new(),
            returns: HashMap::new(),
            resolves: 0,
            calls: VecDeque::new(),
            pairs: Vec::new(),
            problems: Vec::new(),
            finished: HashMap::new(),
        }
    }

    /// The original's `n`th message that `pick` selects.
    fn nth_theirs(&self, n: usize, pick: impl Fn(&Msg) -> bool) -> Option<usize> {
        (0..self.theirs.len())
            .filter(|&i| pick(&self.theirs[i]))
            .nth(n)
    }

    /// Pairs the capabilities in our descriptors with the original's.
    fn pair_caps(
        &mut self,
        what: &str,
        ours: &[(&'static str, u32)],
        theirs: &[(&'static str, u32)],
    ) {
        if ours.iter().map(|c| c.0).ne(theirs.iter().map(|c| c.0)) {
            self.problems.push(format!(
                "{what}: capabilities {ours:?}, the original's {theirs:?}"
            ));
        }
        for (o, t) in ours.iter().zip(theirs) {
            self.exports.insert(t.1, o.1);
        }
    }

    /// Takes in one message from the scheduler, waiting at most until `deadline`.
    fn pump(&mut self, deadline: Instant) -> bool {
        let wait = deadline.saturating_duration_since(Instant::now());
        let Ok(m) = self.rx.recv_timeout(wait) else {
            return false;
        };
        self.take(m);
        true
    }

    /// Takes in a message if one has come.
    fn poll(&mut self) -> bool {
        match self.rx.try_recv() {
            Ok(m) => {
                self.take(m);
                true
            }
            Err(_) => false,
        }
    }

    /// Pairs one message from our scheduler with the original's.
    fn take(&mut self, m: Msg) {
        let i = self.ours.len();
        self.ours.push(m);
        let m = &self.ours[i];
        match root(m).which().unwrap() {
            message::Return(r) => {
                let a = r.unwrap().get_answer_id();
                let k = *self.returns.entry(a).or_default();
                self.returns.insert(a, k + 1);
                let pick = |t: &Msg| {
                    matches!(root(t).which().unwrap(),
                        message::Return(Ok(r)) if r.get_answer_id() == a)
                };
                match self.nth_theirs(k, pick) {
                    None => self
                        .problems
                        .push(format!("{}: the original did not send", show(m))),
                    Some(t) => {
                        let theirs = &self.theirs[t];
                        match (results(m), results(theirs)) {
                            (Ok(o), Ok(th)) => {
                                let (o, th) = (caps(o), caps(th));
                                self.pair_caps(&show(&self.ours[i]), &o, &th);
                                self.pairs.push((i, t));
                            }
                            _ => self.problems.push(format!(
                                "{}, the original: {}",
                                show(m),
                                show(theirs)
                            )),
                        }
                    }
                }
            }
            message::Resolve(r) => {
                let r = r.unwrap();
                let k = self.resolves;
                self.resolves += 1;
                let ours_p = r.get_promise_id();
                let ours_c = match r.which().unwrap() {
                    resolve::Cap(c) => Some(desc(c.unwrap())),
                    resolve::Exception(_) => None,
                };
                let pick = |t: &Msg| matches!(root(t).which().unwrap(), message::Resolve(_));
                let Some(t) = self.nth_theirs(k, pick) else {
                    self.problems
                        .push(format!("{}: the original did not send", show(m)));
                    return;
                };
                let message::Resolve(tr) = root(&self.theirs[t]).which().unwrap() else {
                    unreachable!()
                };
                let tr = tr.unwrap();
                if self.exports.get(&tr.get_promise_id()) != Some(&ours_p) {
                    self.problems.push(format!(
                        "{}: not the promise the original resolved ({})",
                        show(m),
                        show(&self.theirs[t])
                    ));
                }
                let theirs_c = match tr.which().unwrap() {
                    resolve::Cap(c) => Some(desc(c.unwrap())),
                    resolve::Exception(_) => None,
                };
                match (ours_c, theirs_c) {
                    (Some(o), Some(th)) => {
                        let what = show(&self.ours[i]);
                        self.pair_caps(&what, &[o], &[th]);
                    }
                    _ => self.problems.push(format!(
                        "{}, the original: {}",
                        show(&self.ours[i]),
                        show(&self.theirs[t])
                    )),
                }
            }
            message::Call(_) => self.calls.push_back(i),
            message::Abort(_) => self.problems.push(show(m)),
            _ => {}
        }
    }

    /// Whether the captured message `m` can go: what it names has come.
    fn ready(&self, m: &Msg) -> bool {
        match root(m).which().unwrap() {
            message::Finish(f) => {
                let q = f.unwrap().get_question_id();
                self.returns.get(&q).copied().unwrap_or(0)
                    > self.finished.get(&q).copied().unwrap_or(0)
            }
            message::Release(r) => self.exports.contains_key(&r.unwrap().get_id()),
            message::Call(c) => match c.unwrap().get_target().unwrap().which().unwrap() {
                message_target::ImportedCap(id) => self.exports.contains_key(&id),
                message_target::PromisedAnswer(_) => true,
            },
            _ => true,
        }
    }

    /// Sends the captured message `raw`, with the original's capability ids made ours.
    /// A message that names none goes as it was captured, byte for byte.
    fn send_captured(&mut self, raw: &[u8]) {
        let m = &parse(raw);
        let names_ours = match root(m).which().unwrap() {
            message::Release(_) => true,
            message::Call(c) => matches!(
                c.unwrap().get_target().unwrap().which().unwrap(),
                message_target::ImportedCap(_)
            ),
            message::Finish(f) => {
                *self
                    .finished
                    .entry(f.unwrap().get_question_id())
                    .or_default() += 1;
                false
            }
            _ => false,
        };
        if !names_ours {
            self.out.write_all(raw).unwrap();
            self.out.flush().unwrap();
            return;
        }
        let mut b = Builder::new_default();
        b.set_root(root(m)).unwrap();
        {
            let r: message::Builder<'_> = b.get_root().unwrap();
            match r.which().unwrap() {
                message::Call(c) => {
                    let mut t = c.unwrap().get_target().unwrap();
                    let imported = match t.reborrow().which().unwrap() {
                        message_target::ImportedCap(id) => Some(id),
                        _ => None,
                    };
                    if let Some(id) = imported {
                        t.set_imported_cap(self.exports[&id]);
                    }
                }
                message::Release(r) => {
                    let mut r = r.unwrap();
                    let id = r.reborrow().get_id();
                    r.set_id(self.exports[&id]);
                }
                _ => {}
            }
        }
        self.send(&b);
    }

    fn send(&mut self, b: &Builder<HeapAllocator>) {
        capnp::serialize::write_message(&mut self.out, b).unwrap();
        self.out.flush().unwrap();
    }

    /// Sends the captured messages `mine`, each once it can go. Calls our scheduler makes
    /// meanwhile wait in `calls` (`ok` fails on any left unanswered).
    fn play(&mut self, mine: &[Vec<u8>], deadline: Instant) {
        for raw in mine {
            let m = &parse(raw);
            while !self.ready(m) {
                assert!(
                    self.pump(deadline),
                    "{}: no answer in time for the original's {}\nours so far:\n{}\nproblems: {:?}",
                    self.name,
                    show(m),
                    self.ours.iter().map(show).collect::<Vec<_>>().join("\n"),
                    self.problems
                );
            }
            self.send_captured(raw);
        }
    }

    /// Keeps taking messages in until `done` or the deadline.
    fn until(&mut self, deadline: Instant, done: &dyn Fn(&Session) -> bool) {
        while !done(self) && self.pump(deadline) {}
    }

    /// Everything matched the original's, and no call of our scheduler's is left
    /// unanswered (this side expected none it did not answer).
    fn ok(&self) {
        let unexpected: Vec<String> = self
            .calls
            .iter()
            .map(|&c| format!("unexpected {}", show(&self.ours[c])))
            .collect();
        assert!(
            self.problems.is_empty() && unexpected.is_empty(),
            "{}: {:?} {unexpected:?}\nours:\n{}\nthe original's:\n{}",
            self.name,
            self.problems,
            self.ours.iter().map(show).collect::<Vec<_>>().join("\n"),
            self.theirs.iter().map(show).collect::<Vec<_>>().join("\n"),
        );
    }
}

/// Our scheduler, on the original's key and state (`plain/`, no TLS).
fn scheduler(plain: &std::path::Path, sql: &str) -> Scheduler {
    let dir = common::replay::original_state(plain, sql);
    Scheduler::start_in(dir, &["linux-x86_64"], &["--capnp-disable-tls"])
}

/// The original's log, as its client was given it: each `(start, log, next)` answer.
fn original_log(submit_s2c: &[Msg], submit_c2s: &[Msg]) -> (Vec<(i64, Vec<u8>, i64)>, String) {
    let answers = |a: u32| {
        submit_s2c.iter().filter(move |m| {
            matches!(root(m).which().unwrap(), message::Return(Ok(r)) if r.get_answer_id() == a)
        })
    };
    // The client's `log` calls are question 4, one at a time; `result` is question 3.
    let starts = submit_c2s
        .iter()
        .filter_map(|m| match root(m).which().unwrap() {
            message::Call(c) => {
                let c = c.unwrap();
                (c.get_interface_id() == ids::JOB && c.get_method_id() == 0).then(|| {
                    let p: job::log_params::Reader<'_> = params(c);
                    p.get_start()
                })
            }
            _ => None,
        });
    let chunks = starts
        .zip(answers(4))
        .map(|(start, m)| {
            let r: job::log_results::Reader<'_> =
                results(m).unwrap().get_content().get_as().unwrap();
            (start, r.get_log().unwrap().to_vec(), r.get_next())
        })
        .collect();
    let output = answers(3)
        .map(|m| {
            let r: job::result_results::Reader<'_> =
                results(m).unwrap().get_content().get_as().unwrap();
            r.get_output().unwrap().to_string().unwrap()
        })
        .next()
        .expect("the original's result");
    (chunks, output)
}

/// The captured `ocluster-client submit-obuilder` and `ocluster-worker`, one job: the
/// client's messages get the original's answers, the job goes to the worker as the
/// original gave it, and the log and result come back through our scheduler unchanged.
#[test]
fn the_original_client_and_worker_messages_get_the_originals_answers() {
    let Some(plain) = plain() else { return };
    let s = scheduler(&plain, "");
    let deadline = Instant::now() + common::TIMEOUT;

    let client_raw = raw_capture(&plain, "submit-client-to-scheduler.bin");
    let client_msgs: Vec<Msg> = client_raw.iter().map(|b| parse(b)).collect();
    let (chunks, output) = original_log(
        &capture(&plain, "submit-scheduler-to-client.bin"),
        &client_msgs,
    );
    let full: Vec<u8> = chunks.iter().flat_map(|c| c.1.clone()).collect();
    assert!(
        String::from_utf8_lossy(&full).contains("Building on worker-1"),
        "{}",
        String::from_utf8_lossy(&full)
    );

    // The worker: registers and asks for a job, as captured (its first three messages).
    let worker_msgs = raw_capture(&plain, "worker-worker-to-scheduler.bin");
    let mut w = Session::open(
        "worker",
        s.port,
        capture(&plain, "worker-scheduler-to-worker.bin"),
    );
    w.play(&worker_msgs[..3], deadline);
    // Its `Job` answers the scheduler's calls as the original worker's answers reached
    // the original client.
    let worker_answers = |w: &mut Session, c: usize| {
        let (q, iface, method, start) = {
            let message::Call(call) = root(&w.ours[c]).which().unwrap() else {
                unreachable!()
            };
            let call = call.unwrap();
            let start = (call.get_interface_id() == ids::JOB && call.get_method_id() == 0)
                .then(|| params::<job::log_params::Reader<'_>>(call).get_start());
            (
                call.get_question_id(),
                call.get_interface_id(),
                call.get_method_id(),
                start,
            )
        };
        let mut b = Builder::new_default();
        {
            let mut ret = b.init_root::<message::Builder<'_>>().init_return();
            ret.set_answer_id(q);
            let mut p = ret.init_results();
            match (iface, method) {
                (ids::JOB, 0) => {
                    let start = start.unwrap_or(0);
                    let (log, next) = match chunks.iter().find(|c| c.0 == start) {
                        Some((_, log, next)) => (log.clone(), *next),
                        None if (start as usize) < full.len() => {
                            (full[start as usize..].to_vec(), full.len() as i64)
                        }
                        None => (Vec::new(), start),
                    };
                    let mut r = p
                        .reborrow()
                        .get_content()
                        .init_as::<job::log_results::Builder<'_>>();
                    r.set_log(&log);
                    r.set_next(next);
                }
                (ids::JOB, 1) => {
                    p.reborrow()
                        .get_content()
                        .init_as::<job::result_results::Builder<'_>>()
                        .set_output(output.as_str());
                }
                _ => {
                    let what = show(&w.ours[c]);
                    w.problems.push(format!("unexpected {what}"));
                    return;
                }
            }
            p.init_cap_table(0);
        }
        w.send(&b);
    };

    // The client: submits, takes the job (a promise), and follows its log and result.
    let mut c = Session::open(
        "client",
        s.port,
        capture(&plain, "submit-scheduler-to-client.bin"),
    );
    // Both sides' messages interleave: the client's go as they can, the worker's calls
    // are answered meanwhile.
    let mut next = 0;
    while next < client_msgs.len() {
        if c.ready(&client_msgs[next]) {
            c.send_captured(&client_raw[next]);
            next += 1;
            continue;
        }
        let mut progressed = false;
        for s in [&mut c, &mut w] {
            progressed |= s.poll();
        }
        while let Some(call) = w.calls.pop_front() {
            worker_answers(&mut w, call);
            progressed = true;
        }
        if !progressed {
            assert!(
                Instant::now() < deadline,
                "client: no answer in time for the original's {}\nours so far:\n{}\nworker:\n{}\nproblems: {:?} {:?}",
                show(&client_msgs[next]),
                c.ours.iter().map(show).collect::<Vec<_>>().join("\n"),
                w.ours.iter().map(show).collect::<Vec<_>>().join("\n"),
                c.problems,
                w.problems,
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    c.ok();
    w.ok();

    // The client's answers: the bootstrap, the ticket, the job as a promise resolved to
    // a capability once the worker took the job, every log chunk and the result, each as
    // the original's.
    let kinds: Vec<String> = c.ours.iter().map(show).collect();
    assert!(
        kinds
            .iter()
            .any(|k| k.starts_with("return a2 caps [(\"senderPromise\"")),
        "{kinds:#?}"
    );
    assert!(
        kinds.iter().any(|k| k.starts_with("resolve ")),
        "{kinds:#?}"
    );
    for &(o, t) in &c.pairs {
        let (ours, theirs) = (results(&c.ours[o]).unwrap(), results(&c.theirs[t]).unwrap());
        let a = match root(&c.ours[o]).which().unwrap() {
            message::Return(r) => r.unwrap().get_answer_id(),
            _ => unreachable!(),
        };
        match a {
            3 => {
                let o: job::result_results::Reader<'_> = ours.get_content().get_as().unwrap();
                assert_eq!(o.get_output().unwrap().to_str().unwrap(), output);
            }
            4 => {
                let o: job::log_results::Reader<'_> = ours.get_content().get_as().unwrap();
                let t: job::log_results::Reader<'_> = theirs.get_content().get_as().unwrap();
                assert_eq!(
                    (o.get_log().unwrap(), o.get_next()),
                    (t.get_log().unwrap(), t.get_next()),
                    "a log chunk"
                );
            }
            _ => {}
        }
    }
    assert_eq!(c.returns.get(&4), Some(&chunks.len()), "{kinds:#?}");
    assert_eq!(c.returns.get(&3), Some(&1), "{kinds:#?}");

    // The worker was given the job as the original gave it: the same spec.
    let submitted = {
        let message::Call(call) = root(&client_msgs[1]).which().unwrap() else {
            panic!("the client's second message is its submit")
        };
        let p: submission::submit_params::Reader<'_> = params(call.unwrap());
        spec_of(p.get_descr().unwrap())
    };
    let popped = |ms: &[Msg]| {
        ms.iter()
            .find_map(|m| match root(m).which().unwrap() {
                message::Return(Ok(r)) if r.get_answer_id() == 2 => {
                    let p: queue::pop_results::Reader<'_> =
                        results(m).ok()?.get_content().get_as().ok()?;
                    Some(spec_of(p.get_descr().ok()?))
                }
                _ => None,
            })
            .expect("a job given to the worker")
    };
    assert_eq!(popped(&w.ours), submitted);
    assert_eq!(popped(&w.theirs), submitted);
    drop(s);
}

/// A job description's action and cache hint, as text to compare.
fn spec_of(d: ocluster_api::job_descr::Reader<'_>) -> String {
    use ocluster_api::job_descr::action;
    let action = match d.get_action().which().unwrap() {
        action::Obuilder(o) => {
            format!(
                "obuilder {:?}",
                o.unwrap().get_spec().unwrap().to_str().unwrap()
            )
        }
        action::DockerBuild(_) => "docker".into(),
        action::Custom(_) => "custom".into(),
    };
    format!(
        "{action} hint={:?}",
        d.get_cache_hint().unwrap().to_str().unwrap()
    )
}

/// The captured `ocluster-admin add-client carol`: `addClient`, then `Persistent.save`
/// pipelined on its answer, which gives the new client's URI.
#[test]
fn the_original_admin_add_client_messages_get_the_originals_answers() {
    let Some(plain) = plain() else { return };
    // The database as it was before the captured `add-client carol`.
    let s = scheduler(
        &plain,
        "DELETE FROM sturdy_refs WHERE type = 'ocluster-client' AND args = CAST('carol' AS BLOB);",
    );
    let deadline = Instant::now() + common::TIMEOUT;
    let admin_msgs = raw_capture(&plain, "add-client-admin-to-scheduler.bin");
    let mut a = Session::open(
        "admin",
        s.port,
        capture(&plain, "add-client-scheduler-to-admin.bin"),
    );
    a.play(&admin_msgs, deadline);
    a.until(deadline, &|a| a.returns.len() == 3);
    a.ok();
    let uri = a
        .ours
        .iter()
        .find_map(|m| match root(m).which().unwrap() {
            message::Return(Ok(r)) if r.get_answer_id() == 2 => {
                let p: persistent::save_results::Reader<'_> =
                    results(m).ok()?.get_content().get_as().ok()?;
                Some(
                    p.get_sturdy_ref()
                        .get_as::<capnp::text::Reader<'_>>()
                        .ok()?
                        .to_string()
                        .ok()?,
                )
            }
            _ => None,
        })
        .expect("the saved URI");
    let prefix = format!("capnp://insecure@127.0.0.1:{}/", s.port);
    let id = uri.strip_prefix(&prefix).unwrap_or_else(|| panic!("{uri}"));
    // 20 random bytes, as the original's client ids.
    assert_eq!(id.len(), 27, "{uri}");
    assert_eq!(s.admin_ok(&["list-clients"]), "alice\ncarol\n");
    drop(a);
}

/// `cap` (a cap file of the golden files' `plain/`) pointed at `port` on 127.0.0.1.
fn moved_cap(plain: &std::path::Path, cap: &str, port: u16, dir: &std::path::Path) -> PathBuf {
    let uri = std::fs::read_to_string(plain.join(cap)).unwrap();
    let (a, b) = (uri.find('@').unwrap(), uri.rfind('/').unwrap());
    let moved = format!("{}@127.0.0.1:{port}{}", &uri[..a], &uri[b..]);
    let p = dir.join(cap);
    std::fs::write(&p, moved).unwrap();
    p
}

/// Runs `cmd` with stdout and stderr into one file, as `> f 2>&1` did for the golden
/// outputs; returns its exit code and that output.
fn run_into_one_file(
    mut cmd: std::process::Command,
    dir: &std::path::Path,
    play: impl FnOnce(),
) -> (i32, String) {
    let out = dir.join("output");
    let f = std::fs::File::create(&out).unwrap();
    let mut child = cmd
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    play();
    let deadline = Instant::now() + common::TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "{cmd:?} did not exit:\n{}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (
        status.code().unwrap_or(-1),
        std::fs::read_to_string(&out).unwrap(),
    )
}

/// Plays the original scheduler's messages of `capture` to the program of ours that
/// connects to `listener`; returns what ours sent, shown.
fn serve_capture(
    listener: std::net::TcpListener,
    plain: &std::path::Path,
    capture: &str,
) -> String {
    let mut s = Served::accept(listener, common::TIMEOUT, String::new);
    s.play(
        &raw_capture(plain, capture),
        Instant::now() + common::TIMEOUT,
        String::new,
    );
    s.until(Instant::now() + Duration::from_secs(1), |_| false);
    s.shown()
}

/// Our `ocluster-client submit-obuilder`, given the original scheduler's captured
/// answers, asks as the original client did and prints what it printed, byte for byte
/// (the streamed log, `Job succeeded`, the result), but for the port it connected to.
#[test]
fn our_client_prints_what_the_original_printed() {
    let Some(plain) = plain() else { return };
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cap = moved_cap(&plain, "submit-alice.cap", port, dir.path());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ocluster-client"));
    cmd.arg("submit-obuilder")
        .arg("-c")
        .arg(&cap)
        .arg("--pool=linux-x86_64")
        .arg("--local-file")
        .arg(plain.join("spec-hi-sh"));
    let mut shown = String::new();
    let (code, output) = run_into_one_file(cmd, dir.path(), || {
        shown = serve_capture(listener, &plain, "submit-scheduler-to-client.bin")
    });
    let expected = std::fs::read_to_string(plain.join("submit-alice-spec-hi-sh.txt"))
        .unwrap()
        .replace("127.0.0.1:9411", &format!("127.0.0.1:{port}"));
    assert_eq!(output, expected, "ours sent:\n{shown}");
    assert_eq!(code, 0);
}

/// Our `ocluster-admin add-client`, given the original scheduler's captured answers,
/// asks as the original did (`addClient`, then `save` pipelined) and prints the same URI
/// and the same line on stderr.
#[test]
fn our_admin_add_client_prints_what_the_original_printed() {
    let Some(plain) = plain() else { return };
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cap = moved_cap(&plain, "admin.cap", port, dir.path());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ocluster-admin"));
    cmd.arg("add-client").arg("-c").arg(&cap).arg("carol");
    let mut shown = String::new();
    let (code, output) = run_into_one_file(cmd, dir.path(), || {
        shown = serve_capture(listener, &plain, "add-client-scheduler-to-admin.bin")
    });
    let expected = format!(
        "{}{}",
        std::fs::read_to_string(plain.join("add-client.stderr"))
            .unwrap()
            .replace("127.0.0.1:9411", &format!("127.0.0.1:{port}")),
        std::fs::read_to_string(plain.join("carol.cap")).unwrap()
    );
    assert_eq!(output, expected, "ours sent:\n{shown}");
    assert_eq!(code, 0);
}
