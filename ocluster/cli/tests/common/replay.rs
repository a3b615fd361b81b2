//! Messages captured from the original programs (the golden files' `plain/`), read and
//! shown: shared by the tests that replay them against our programs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use capnp::message::{Reader, ReaderOptions};
use capnp::serialize::OwnedSegments;
use capnp_rpc::rpc_capnp::{cap_descriptor, message, message_target, payload, resolve, return_};

pub type Msg = Reader<OwnedSegments>;

/// The golden files' `plain/`, or `None` (skipped) if they are not here.
pub fn plain() -> Option<PathBuf> {
    golden("plain")
}

/// The golden files' `sub` (`tls` or `plain`), from `$OCLUSTER_GOLDEN` or
/// `../shared/reference/ocluster-golden` beside the checkout; `None` (skipped, or a
/// failure under `OBUILDER_TEST_STRICT`) if they are not here.
pub fn golden(sub: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("OCLUSTER_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/reference/ocluster-golden")
        })
        .join(sub);
    if dir.join("key.pem").exists() {
        return Some(dir);
    }
    if std::env::var_os("OBUILDER_TEST_STRICT").is_some() {
        panic!("golden files missing at {}", dir.display());
    }
    eprintln!("skipped: no golden files at {}", dir.display());
    None
}

/// A scheduler's directory (`key.pem`, `secrets/`, `state/scheduler.db`) made from the
/// original scheduler's key and database dump in `golden`, then `sql` run on it.
pub fn original_state(golden: &Path, sql: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::create_dir(dir.path().join("state")).unwrap();
    std::fs::copy(golden.join("key.pem"), dir.path().join("key.pem")).unwrap();
    let dump = std::fs::read_to_string(golden.join("scheduler.db.dump")).unwrap();
    rusqlite::Connection::open(dir.path().join("state/scheduler.db"))
        .unwrap()
        .execute_batch(&format!("{dump}\n{sql}"))
        .unwrap();
    dir
}

/// Every message of a capture, in order.
pub fn capture(dir: &Path, name: &str) -> Vec<Msg> {
    raw_capture(dir, name).iter().map(|b| parse(b)).collect()
}

/// Every message of a capture, as the bytes sent.
pub fn raw_capture(dir: &Path, name: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(dir.join(name)).unwrap();
    let mut r = &bytes[..];
    let mut out = Vec::new();
    while !r.is_empty() {
        let before = r.len();
        capnp::serialize::read_message(&mut r, ReaderOptions::new()).unwrap();
        let at = bytes.len() - before;
        out.push(bytes[at..at + before - r.len()].to_vec());
    }
    out
}

pub fn parse(mut b: &[u8]) -> Msg {
    capnp::serialize::read_message(&mut b, ReaderOptions::new()).unwrap()
}

pub fn root(m: &Msg) -> message::Reader<'_> {
    m.get_root().unwrap()
}

/// A one-line description of a message, for failures.
pub fn show(m: &Msg) -> String {
    match root(m).which().unwrap() {
        message::Bootstrap(b) => format!("bootstrap q{}", b.unwrap().get_question_id()),
        message::Call(c) => {
            let c = c.unwrap();
            let target = match c.get_target().unwrap().which().unwrap() {
                message_target::ImportedCap(id) => format!("import {id}"),
                message_target::PromisedAnswer(p) => {
                    format!("answer {}", p.unwrap().get_question_id())
                }
            };
            format!(
                "call q{} on {target}: {:#x}.{}",
                c.get_question_id(),
                c.get_interface_id(),
                c.get_method_id()
            )
        }
        message::Return(r) => {
            let r = r.unwrap();
            match r.which().unwrap() {
                return_::Results(p) => {
                    format!("return a{} caps {:?}", r.get_answer_id(), caps(p.unwrap()))
                }
                return_::Exception(e) => format!(
                    "return a{} exception {:?}",
                    r.get_answer_id(),
                    e.unwrap().get_reason().unwrap().to_str().unwrap_or("?")
                ),
                _ => format!("return a{} (other)", r.get_answer_id()),
            }
        }
        message::Finish(f) => format!("finish q{}", f.unwrap().get_question_id()),
        message::Release(r) => format!("release {}", r.unwrap().get_id()),
        message::Resolve(r) => {
            let r = r.unwrap();
            match r.which().unwrap() {
                resolve::Cap(c) => {
                    format!("resolve {} to {:?}", r.get_promise_id(), desc(c.unwrap()))
                }
                resolve::Exception(_) => format!("resolve {} to an exception", r.get_promise_id()),
            }
        }
        message::Abort(a) => format!(
            "abort {:?}",
            a.unwrap().get_reason().unwrap().to_str().unwrap_or("?")
        ),
        message::Disembargo(_) => "disembargo".into(),
        _ => "other".into(),
    }
}

/// A capability descriptor's kind and id.
pub fn desc(d: cap_descriptor::Reader<'_>) -> (&'static str, u32) {
    match d.which().unwrap() {
        cap_descriptor::SenderHosted(id) => ("senderHosted", id),
        cap_descriptor::SenderPromise(id) => ("senderPromise", id),
        cap_descriptor::ReceiverHosted(id) => ("receiverHosted", id),
        cap_descriptor::None(()) => ("none", 0),
        _ => ("other", 0),
    }
}

pub fn caps(p: payload::Reader<'_>) -> Vec<(&'static str, u32)> {
    p.get_cap_table().unwrap().iter().map(desc).collect()
}

/// The results of a captured or received `Return`, or why there are none.
pub fn results(m: &Msg) -> Result<payload::Reader<'_>, String> {
    match root(m).which().unwrap() {
        message::Return(r) => match r.unwrap().which().unwrap() {
            return_::Results(p) => Ok(p.unwrap()),
            _ => Err(show(m)),
        },
        _ => Err(show(m)),
    }
}

/// A call's parameters, read as `T`.
pub fn params<'a, T: capnp::traits::FromPointerReader<'a>>(
    c: capnp_rpc::rpc_capnp::call::Reader<'a>,
) -> T {
    c.get_params().unwrap().get_content().get_as().unwrap()
}

/// One of our programs connected to a test that plays the original scheduler's captured
/// messages to it: each is sent once what it depends on has come from ours (a `Return`
/// once ours asked that question, a `Finish` once ours answered it, a call once ours
/// exported its target), byte for byte. The ids must then be the original program's:
/// a test fails, showing both, where ours chose others.
pub struct Served {
    out: std::net::TcpStream,
    rx: std::sync::mpsc::Receiver<Msg>,
    /// What ours sent, in order.
    pub ours: Vec<Msg>,
    /// Its questions (bootstraps and calls) and answers, by id; the ids it exported.
    questions: std::collections::HashMap<u32, usize>,
    pub answered: std::collections::HashMap<u32, usize>,
    exported: std::collections::HashSet<u32>,
    /// The scheduler's side: answers and finishes sent, and calls made, by id.
    sent_returns: std::collections::HashMap<u32, usize>,
    sent_finishes: std::collections::HashMap<u32, usize>,
    pub calls_made: std::collections::HashMap<u32, usize>,
}

/// The messages that come on `stream`, read by a thread of their own until it closes.
pub fn messages_from(stream: &std::net::TcpStream) -> std::sync::mpsc::Receiver<Msg> {
    let (tx, rx) = std::sync::mpsc::channel();
    let input = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut input = std::io::BufReader::new(input);
        while let Ok(m) = capnp::serialize::read_message(&mut input, ReaderOptions::new()) {
            if tx.send(m).is_err() {
                break;
            }
        }
    });
    rx
}

impl Served {
    /// Waits for ours to connect to `listener`; `what` says what to show if it does not.
    pub fn accept(
        listener: std::net::TcpListener,
        timeout: std::time::Duration,
        what: impl Fn() -> String,
    ) -> Served {
        let (conn_tx, conn_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Ok((s, _)) = listener.accept() {
                let _ = conn_tx.send(s);
            }
        });
        let out: std::net::TcpStream = conn_rx
            .recv_timeout(timeout)
            .unwrap_or_else(|_| panic!("our program did not connect:\n{}", what()));
        let rx = messages_from(&out);
        Served {
            out,
            rx,
            ours: Vec::new(),
            questions: Default::default(),
            answered: Default::default(),
            exported: Default::default(),
            sent_returns: Default::default(),
            sent_finishes: Default::default(),
            calls_made: Default::default(),
        }
    }

    /// Takes in one message of ours. Calls of our extensions (the worker's heartbeats)
    /// are answered as an OCaml scheduler does: unimplemented.
    fn take(&mut self, m: Msg) {
        match root(&m).which().unwrap() {
            message::Bootstrap(b) => {
                *self
                    .questions
                    .entry(b.unwrap().get_question_id())
                    .or_default() += 1
            }
            message::Call(c) => {
                let c = c.unwrap();
                let q = c.get_question_id();
                *self.questions.entry(q).or_default() += 1;
                self.exported
                    .extend(caps(c.get_params().unwrap()).iter().map(|d| d.1));
                // Queue.heartbeat (method 2) is ours alone.
                if c.get_interface_id() == ocluster_api::ids::QUEUE && c.get_method_id() == 2 {
                    let mut b = capnp::message::Builder::new_default();
                    let mut r = b.init_root::<message::Builder<'_>>().init_return();
                    r.set_answer_id(q);
                    let mut e = r.init_exception();
                    e.set_reason("Unknown method 2 on interface Queue");
                    e.set_type(capnp_rpc::rpc_capnp::exception::Type::Unimplemented);
                    self.send(&b);
                    *self.sent_returns.entry(q).or_default() += 1;
                }
            }
            message::Return(r) => {
                *self.answered.entry(r.unwrap().get_answer_id()).or_default() += 1
            }
            _ => {}
        }
        self.ours.push(m);
    }

    /// Takes in ours until `deadline`; false if nothing came.
    fn pump(&mut self, deadline: std::time::Instant) -> bool {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match self.rx.recv_timeout(left) {
            Ok(m) => {
                self.take(m);
                true
            }
            Err(_) => false,
        }
    }

    fn ready(&self, m: &Msg) -> bool {
        let n = |h: &std::collections::HashMap<u32, usize>, k: u32| h.get(&k).copied().unwrap_or(0);
        match root(m).which().unwrap() {
            message::Return(r) => {
                let a = r.unwrap().get_answer_id();
                n(&self.questions, a) > n(&self.sent_returns, a)
            }
            message::Finish(f) => {
                let q = f.unwrap().get_question_id();
                n(&self.answered, q) > n(&self.sent_finishes, q)
            }
            message::Call(c) => match c.unwrap().get_target().unwrap().which().unwrap() {
                message_target::ImportedCap(id) => self.exported.contains(&id),
                message_target::PromisedAnswer(_) => true,
            },
            _ => true,
        }
    }

    /// Plays the captured messages `raws` up to the original's `Abort` (which came when
    /// its peer went); `what` says what to show if ours stops short.
    pub fn play(
        &mut self,
        raws: &[Vec<u8>],
        deadline: std::time::Instant,
        what: impl Fn() -> String,
    ) {
        use std::io::Write;
        for raw in raws {
            let m = parse(raw);
            if matches!(root(&m).which().unwrap(), message::Abort(_)) {
                break;
            }
            while !self.ready(&m) {
                if !self.pump(deadline) {
                    panic!(
                        "nothing from ours in time for the original's {}\nours so far:\n{}\n{}",
                        show(&m),
                        self.shown(),
                        what()
                    );
                }
            }
            match root(&m).which().unwrap() {
                message::Return(r) => {
                    *self
                        .sent_returns
                        .entry(r.unwrap().get_answer_id())
                        .or_default() += 1
                }
                message::Finish(f) => {
                    *self
                        .sent_finishes
                        .entry(f.unwrap().get_question_id())
                        .or_default() += 1
                }
                message::Call(c) => {
                    *self
                        .calls_made
                        .entry(c.unwrap().get_question_id())
                        .or_default() += 1
                }
                _ => {}
            }
            // Ours may have hung up once it had what it wanted, as the original did.
            if self
                .out
                .write_all(raw)
                .and_then(|_| self.out.flush())
                .is_err()
            {
                break;
            }
        }
    }

    /// Takes in ours until `done` or `deadline`.
    pub fn until(&mut self, deadline: std::time::Instant, done: impl Fn(&Served) -> bool) -> bool {
        while !done(self) {
            if !self.pump(deadline) {
                return false;
            }
        }
        true
    }

    /// Whether ours has asked question `q`.
    pub fn asked(&self, q: u32) -> bool {
        self.questions.get(&q).copied().unwrap_or(0) > 0
    }

    /// Sends a message of the test's own.
    pub fn send(&mut self, b: &capnp::message::Builder<capnp::message::HeapAllocator>) {
        use std::io::Write;
        capnp::serialize::write_message(&mut self.out, b).unwrap();
        self.out.flush().unwrap();
    }

    /// Calls method `method` of `interface` on ours' export `target`, as question `q`,
    /// with the parameters `fill` writes.
    pub fn call(
        &mut self,
        q: u32,
        target: u32,
        interface: u64,
        method: u16,
        fill: impl FnOnce(capnp::any_pointer::Builder<'_>),
    ) {
        use std::io::Write;
        let mut b = capnp::message::Builder::new_default();
        {
            let mut c = b.init_root::<message::Builder<'_>>().init_call();
            c.set_question_id(q);
            c.set_interface_id(interface);
            c.set_method_id(method);
            c.reborrow().init_target().set_imported_cap(target);
            let mut p = c.init_params();
            fill(p.reborrow().get_content());
            p.init_cap_table(0);
        }
        capnp::serialize::write_message(&mut self.out, &b).unwrap();
        self.out.flush().unwrap();
        *self.calls_made.entry(q).or_default() += 1;
    }

    /// Ours' last answer to question `q`.
    pub fn answer(&self, q: u32) -> Option<&Msg> {
        self.ours.iter().rev().find(
            |m| matches!(root(m).which().unwrap(), message::Return(Ok(r)) if r.get_answer_id() == q),
        )
    }

    /// Whether ours answered every call made on it.
    pub fn all_answered(&self) -> bool {
        self.calls_made
            .iter()
            .all(|(q, n)| self.answered.get(q).copied().unwrap_or(0) >= *n)
    }

    pub fn shown(&self) -> String {
        self.ours.iter().map(show).collect::<Vec<_>>().join("\n")
    }
}
