//! One connection: its four tables (exports, answers, imports, questions) and the
//! messages of `rpc.capnp` that change them. Every handler runs to completion without
//! awaiting; objects get their calls synchronously and answer through [`Responder`]s.
//!
//! Choices that differ from capnp-rpc, each for memory or for a peer we must serve:
//! * an open answer is an entry of `answers` (its question id, a generation and the calls
//!   pipelined on it); its parameters live in the [`Call`] only until the object drops it;
//! * a finished answer keeps its results only when they hold capabilities (for calls
//!   pipelined on them) and only until the peer's `Finish`;
//! * `Return.releaseParamCaps` is always false (a parameter's capability is released by
//!   its own `Release`, as capnp-rpc does), and `Finish.releaseResultCaps` is false once
//!   the results are taken in (true for a question given up before its answer);
//! * a `Finish` for an open answer is answered at once with `Return.canceled`; the
//!   generation keeps the object's late answer from reaching a question id reused since.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll};

use capnp::message::{Builder, HeapAllocator, ReaderOptions};
use capnp::private::capability::{ClientHook, PipelineOp};
use capnp::serialize::OwnedSegments;
use capnp::{any_pointer, Error, ErrorKind};
use capnp_rpc::rpc_capnp::{
    cap_descriptor, disembargo, exception, message, message_target, payload, resolve, return_,
};
use futures::channel::oneshot;
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::hook::{cap_index, table, CapHook};
use crate::{Cap, Promise};

type Msg = capnp::message::Reader<OwnedSegments>;
type CapTable = Vec<Option<Box<dyn ClientHook>>>;

/// The largest first segment an outgoing message starts with (capnp-rpc asks for more,
/// and keeps it for as long as the message lives).
const FIRST_SEGMENT_WORDS: u32 = 32;

/// Reading stops while this much waits to be written (a peer that does not read).
const HIGH_WATER: usize = 1 << 20;

/// A connection lets the event loop's other tasks run after this many messages. A
/// TLS record holds a hundred small calls, read without a system call and so without
/// using tokio's budget: a peer with megabytes of calls ready kept the loop to itself,
/// and the scheduler's group commit (a task) waited for all of them. In a burst its
/// batches grew to 30 000 jobs, whose calls all waited in memory at once, and the heap
/// they took stayed scattered between the jobs that stayed (issue 12).
const YIELD_EVERY: u32 = 64;

/// How a connection is made.
pub struct Options {
    /// The largest message accepted, in 8-byte words; a bigger one ends the connection.
    pub max_message_words: usize,
    /// What a peer's `Bootstrap` gets, by its `deprecatedObjectId` (empty if none).
    #[allow(clippy::type_complexity)]
    pub restorer: Option<Box<dyn Fn(&[u8]) -> Result<Cap, Error>>>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            max_message_words: 8 << 20,
            restorer: None,
        }
    }
}

/// One connection to a peer.
pub struct Conn {
    st: RefCell<State>,
    out: RefCell<Out>,
    wake: tokio::sync::Notify,
    drained: tokio::sync::Notify,
    /// Notified when open answers end unanswered (a `Finish` cancels one, or the
    /// connection closes).
    cancelled: tokio::sync::Notify,
    opts: Options,
}

#[derive(Default)]
struct Out {
    buf: Vec<u8>,
    closing: bool,
}

#[derive(Default)]
struct State {
    closed: Option<Error>,
    exports: Vec<Option<Export>>,
    free_exports: Vec<u32>,
    by_ptr: HashMap<usize, u32>,
    answers: Answers,
    imports: HashMap<u32, Weak<Import>>,
    questions: Vec<Option<Question>>,
    free_questions: Vec<u32>,
    gen: u32,
    /// Promises sent already resolved: their `Resolve` follows the message that sent them.
    resolves: Vec<(u32, Rc<Promise>)>,
}

struct Export {
    cap: Cap,
    /// The peer's references.
    refs: u32,
    /// Kept answers that name it ([`Answer::Field`]): a count of its own, so that a
    /// peer that releases more than it holds cannot free an id they still name.
    pins: u32,
}

/// The answers table, by question id. Peers (capnp-rpc, OCaml's capnp-rpc) give a
/// question the lowest id free, so the ids in use are dense: those below a bound are in
/// a vector (16 bytes an answer, where a hash map took about three times that once a
/// burst had grown it), the others in a map. The bound follows how many answers are
/// open, so that a peer that picks huge ids cannot make the vector big.
#[derive(Default)]
struct Answers {
    dense: Vec<Option<Answer>>,
    sparse: HashMap<u32, Answer>,
    len: usize,
}

impl Answers {
    // (An id in the map stays there when the vector grows past it: lookups try both.)
    fn get(&self, q: &u32) -> Option<&Answer> {
        match self.dense.get(*q as usize) {
            Some(Some(a)) => Some(a),
            _ => self.sparse.get(q),
        }
    }

    fn get_mut(&mut self, q: &u32) -> Option<&mut Answer> {
        match self.dense.get_mut(*q as usize) {
            Some(Some(a)) => Some(a),
            _ => self.sparse.get_mut(q),
        }
    }

    fn contains_key(&self, q: &u32) -> bool {
        self.get(q).is_some()
    }

    fn insert(&mut self, q: u32, a: Answer) -> Option<Answer> {
        let i = q as usize;
        if i >= self.dense.len() && i < 2 * self.len + 1024 {
            let more = i + 1 - self.dense.len();
            grow_by_eighths(&mut self.dense, more);
            self.dense.resize_with(i + 1, || None);
        }
        let in_map = !self.sparse.is_empty() && self.sparse.contains_key(&q);
        let old = match self.dense.get_mut(i) {
            Some(slot) if !in_map => slot.replace(a),
            _ => self.sparse.insert(q, a),
        };
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    fn remove(&mut self, q: &u32) -> Option<Answer> {
        let old = match self.dense.get_mut(*q as usize) {
            Some(slot @ Some(_)) => slot.take(),
            _ => self.sparse.remove(q),
        };
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    fn len(&self) -> usize {
        self.len
    }

    fn values(&self) -> impl Iterator<Item = &Answer> {
        self.dense.iter().flatten().chain(self.sparse.values())
    }
}

/// Makes room in `v` for `more` elements, growing it by an eighth (at least 16) rather
/// than doubling: the answers and exports tables hold a few entries for every queued job,
/// and a doubled vector is half empty after a burst.
fn grow_by_eighths<T>(v: &mut Vec<T>, more: usize) {
    if v.capacity() - v.len() < more {
        v.reserve_exact(more.max(v.len() / 8).max(16));
    }
}

enum Answer {
    Open {
        gen: u32,
        /// What waits for the answer: calls pipelined on it, and promises standing for
        /// capabilities in it (`receiverAnswer` descriptors).
        waiting: Option<Box<Pipelined>>,
    },
    /// Open, and finished by the peer while calls were pipelined on it: answered as
    /// usual for their sake, then dropped (releasing its results' exports if asked).
    Finishing {
        gen: u32,
        waiting: Box<Pipelined>,
        release: bool,
    },
    /// Answered with results whose only capability is pointer field `field` of their
    /// struct (`submit`'s ticket, `job`'s job, `register`'s queue): export `export`,
    /// which the answer pins until the `Finish` (`Export::pins`). Nothing is allocated
    /// for it (see [`Stored`]).
    Field { field: u16, export: u32 },
    /// Answered with other results: kept when they hold capabilities (for calls
    /// pipelined on them). (Two variants rather than a `Result`: 16 bytes an answer,
    /// not 24.)
    Returned(Option<Rc<Stored>>),
    /// Answered with an error.
    Failed(Rc<Error>),
}

impl Answer {
    /// The capability at `ops` in an answered question's results (None while open);
    /// `exports` is the connection's exports table.
    fn pipelined(&self, ops: &[PipelineOp], exports: &[Option<Export>]) -> Option<Cap> {
        match self {
            Answer::Field { field, export } => {
                let mut path = ops.iter().filter(|op| !matches!(op, PipelineOp::Noop));
                Some(match (path.next(), path.next()) {
                    (Some(PipelineOp::GetPointerField(f)), None) if f == field => exports
                        .get(*export as usize)
                        .and_then(Option::as_ref)
                        .map_or_else(|| Cap::broken(gone(*export)), |e| e.cap.clone()),
                    // (What reading the message gives: its only capability is elsewhere.)
                    _ => Cap::broken(Error::failed(
                        "no capability at that path of the results".into(),
                    )),
                })
            }
            Answer::Returned(Some(s)) => Some(s.pipelined(ops)),
            Answer::Returned(None) => Some(Cap::Null),
            Answer::Failed(e) => Some(Cap::Broken(e.clone())),
            Answer::Open { .. } | Answer::Finishing { .. } => None,
        }
    }
}

/// Calls and promises waiting for an open answer, by their path into its results.
type Pipelined = Vec<(Vec<PipelineOp>, Waiting)>;

enum Waiting {
    Call(Call),
    Promise(Rc<Promise>),
}

/// A sent `Return`, kept while calls may be pipelined on its capabilities, when they
/// are not one capability in a field ([`Answer::Field`]): the message flat and exactly
/// its size, with its capabilities by table slot.
///
/// Every queued job's `submit` and `job` answers are kept until the client's `Finish`,
/// which in a burst comes after all its other calls: at its peak a burst of 100 000
/// jobs held them all at once, and what they took and gave back stayed scattered
/// between the jobs' own blocks (issue 12). So the usual results, one capability in a
/// pointer field of their struct, are kept in the answers table itself as its field and
/// its export, with no block of their own; only the others come here.
struct Stored {
    words: Box<[capnp::Word]>,
    slots: Box<[Cap]>,
    /// The exports its results hold, released by a `Finish` that asks for it.
    exports: Box<[u32]>,
}

/// How an answered question's results (`m`, whose capabilities are `slots`, `exports`
/// the exports among them) are kept. An [`Answer::Field`] needs a pin on its export,
/// which the caller adds.
fn keep(m: &Builder<HeapAllocator>, slots: Vec<Cap>, exports: Vec<u32>) -> Answer {
    if slots.is_empty() {
        return Answer::Returned(None);
    }
    if let ([_], &[export]) = (&slots[..], &exports[..]) {
        if let Some(field) = sole_cap_field(m) {
            return Answer::Field { field, export };
        }
    }
    Answer::Returned(Some(Rc::new(Stored::new(m, slots, exports))))
}

impl Stored {
    fn new(m: &Builder<HeapAllocator>, slots: Vec<Cap>, exports: Vec<u32>) -> Stored {
        let bytes = capnp::serialize::write_message_to_words(m);
        let mut words = capnp::Word::allocate_zeroed_vec(bytes.len() / 8);
        capnp::Word::words_to_bytes_mut(&mut words).copy_from_slice(&bytes);
        Stored {
            words: words.into_boxed_slice(),
            slots: slots.into_boxed_slice(),
            exports: exports.into_boxed_slice(),
        }
    }

    fn pipelined(&self, ops: &[PipelineOp]) -> Cap {
        let found = (|| {
            let mut flat = capnp::Word::words_to_bytes(&self.words);
            let msg =
                capnp::serialize::read_message_from_flat_slice(&mut flat, ReaderOptions::new())?;
            let Some(p) = return_results(msg.get_root()?)? else {
                return Ok(None);
            };
            let t = table(self.slots.len());
            let mut content = p.get_content();
            capnp::traits::Imbue::imbue(&mut content, &t);
            let hook = content.get_pipelined_cap(ops)?;
            Ok::<_, Error>(cap_index(&*hook).and_then(|i| self.slots.get(i).cloned()))
        })();
        match found {
            Ok(Some(c)) => c,
            Ok(None) => Cap::Null,
            Err(e) => Cap::broken(e),
        }
    }
}

/// A message's results, if it is a `Return` with results.
fn return_results(root: message::Reader<'_>) -> Result<Option<payload::Reader<'_>>, Error> {
    let message::Return(r) = root.which()? else {
        return Ok(None);
    };
    match r?.which()? {
        return_::Results(p) => Ok(Some(p?)),
        _ => Ok(None),
    }
}

/// The pointer field of a `Return`'s results struct that is the results' only
/// capability pointer, if there is one such field.
fn sole_cap_field(m: &Builder<HeapAllocator>) -> Option<u16> {
    let content = return_results(m.get_root_as_reader().ok()?)
        .ok()??
        .get_content();
    // (Counted over everything the results point to, lists and nested structs too.)
    if content.target_size().ok()?.cap_count != 1 {
        return None;
    }
    // Any struct type reads a struct's sections; `Payload` is at hand.
    let fields = capnp::raw::get_struct_pointer_section(content.get_as::<payload::Reader>().ok()?);
    (0..fields.len()).find_map(|i| {
        let size = fields.get(i).target_size().ok()?;
        // A capability pointer is the only pointer with nothing behind it but a cap.
        (size.word_count == 0 && size.cap_count == 1).then_some(i as u16)
    })
}

struct Question {
    reply: Option<oneshot::Sender<Result<Response, Error>>>,
    /// The exports its parameters hold (released if the `Return` says so).
    param_exports: Vec<u32>,
}

/// A capability a peer exported to this vat. Dropping the last reference sends `Release`.
pub struct Import {
    conn: Rc<Conn>,
    id: u32,
    refs: Cell<u32>,
    /// What the peer resolved this promise to, kept so that its import is held.
    resolved: RefCell<Option<Cap>>,
}

impl Drop for Import {
    fn drop(&mut self) {
        let me = self as *const Import;
        let mut st = self.conn.st.borrow_mut();
        if st.closed.is_some() {
            return;
        }
        if st.imports.get(&self.id).is_some_and(|w| w.as_ptr() == me) {
            st.imports.remove(&self.id);
        }
        drop(st);
        let (id, n) = (self.id, self.refs.get());
        self.conn.send(|m| {
            let mut r = m.init_release();
            r.set_id(id);
            r.set_reference_count(n);
            Ok(())
        });
    }
}

impl Import {
    /// Calls a method of this capability; `build` writes the parameters.
    pub fn call(
        self: &Rc<Self>,
        interface_id: u64,
        method_id: u16,
        build: impl FnOnce(any_pointer::Builder<'_>, &mut CapsOut) -> Result<(), Error>,
    ) -> Reply {
        self.conn.question(
            |mut t| t.set_imported_cap(self.id),
            interface_id,
            method_id,
            build,
        )
    }
}

/// The capabilities of a message being built: `add` one and set the hook it gives in
/// the message (with the generated setters, or `set_as_capability`).
#[derive(Default)]
pub struct CapsOut {
    pub caps: Vec<Cap>,
}

impl CapsOut {
    pub fn add(&mut self, cap: Cap) -> Box<dyn ClientHook> {
        self.caps.push(cap);
        Box::new(CapHook {
            index: self.caps.len() - 1,
        })
    }

    /// `add`, as the generated client type a setter takes.
    pub fn client<C: capnp::capability::FromClientHook>(&mut self, cap: Cap) -> C {
        C::new(self.add(cap))
    }
}

/// A call on an object of this vat.
pub struct Call {
    pub interface_id: u64,
    pub method_id: u16,
    msg: Msg,
    caps: Vec<Cap>,
    table: CapTable,
    resp: Option<Responder>,
}

impl Call {
    /// The parameters (read them with `get_as::<T>()`).
    pub fn params(&self) -> Result<any_pointer::Reader<'_>, Error> {
        call_params(&self.msg, &self.table)
    }

    /// The capability a client read from the parameters stands for.
    pub fn cap(&self, client: &impl capnp::capability::FromClientHook) -> Cap {
        cap_in(&self.caps, client)
    }

    /// Gives up the parameters, keeping what answers the call.
    pub fn responder(mut self) -> Responder {
        self.resp
            .take()
            .expect("a call has its responder until taken")
    }

    /// The parameters and what answers the call, apart.
    pub fn into_parts(self) -> (CallParams, Responder) {
        let Call {
            msg, caps, resp, ..
        } = self;
        let resp = resp.expect("a call has its responder until taken");
        (CallParams { msg, caps }, resp)
    }
}

/// The capability of `caps` that a client read from their message stands for.
fn cap_in(caps: &[Cap], client: &impl capnp::capability::FromClientHook) -> Cap {
    cap_index(client.as_client_hook())
        .and_then(|i| caps.get(i).cloned())
        .unwrap_or(Cap::Null)
}

/// A call message's parameters, their capabilities read through `table`.
fn call_params<'a>(msg: &'a Msg, table: &'a CapTable) -> Result<any_pointer::Reader<'a>, Error> {
    let root = msg.get_root::<message::Reader>()?;
    let message::Call(c) = root.which()? else {
        return Err(Error::failed("not a call".into()));
    };
    let mut content = c?.get_params()?.get_content();
    capnp::traits::Imbue::imbue(&mut content, table);
    Ok(content)
}

/// The parameters of a call, apart from its responder.
pub struct CallParams {
    msg: Msg,
    caps: Vec<Cap>,
}

impl CallParams {
    /// The parameters, their capabilities read through `table` (one hook per capability).
    pub fn content_with<'a>(
        &'a self,
        table: &'a CapTable,
    ) -> Result<any_pointer::Reader<'a>, Error> {
        call_params(&self.msg, table)
    }

    pub fn caps(&self) -> &[Cap] {
        &self.caps
    }
}

/// What answers a call, once. Dropped unanswered, it answers with an error.
pub struct Responder {
    conn: Rc<Conn>,
    question: u32,
    gen: u32,
}

impl Responder {
    /// Answers with results that `build` writes.
    pub fn results(
        self,
        build: impl FnOnce(any_pointer::Builder<'_>, &mut CapsOut) -> Result<(), Error>,
    ) {
        self.conn.answer(self.question, self.gen, Ok(build));
    }

    /// Answers with an empty result.
    pub fn empty(self) {
        self.results(|_, _| Ok(()))
    }

    /// Answers with an error.
    pub fn error(self, e: Error) {
        self.conn.answer(
            self.question,
            self.gen,
            Err::<fn(any_pointer::Builder<'_>, &mut CapsOut) -> Result<(), Error>, _>(e),
        );
    }

    /// Whether the caller still waits for the answer (it has not cancelled it, and the
    /// connection is up).
    pub fn is_open(&self) -> bool {
        matches!(
            self.conn.st.borrow().answers.get(&self.question),
            Some(Answer::Open { gen, .. } | Answer::Finishing { gen, .. }) if *gen == self.gen
        )
    }

    /// Waits until the caller no longer waits for the answer (cancelled, or the
    /// connection closed); at once if it already does not.
    pub async fn cancelled(&self) {
        loop {
            let n = self.conn.cancelled.notified();
            if !self.is_open() {
                return;
            }
            n.await;
        }
    }

    /// The connection the call came on.
    pub fn conn(&self) -> &Rc<Conn> {
        &self.conn
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if self.is_open() {
            self.conn.answer(
                self.question,
                self.gen,
                Err::<fn(any_pointer::Builder<'_>, &mut CapsOut) -> Result<(), Error>, _>(
                    Error::failed("the call was dropped without an answer".into()),
                ),
            );
        }
    }
}

/// The results of a call this vat made.
pub struct Response {
    msg: Msg,
    caps: Vec<Cap>,
    table: CapTable,
}

impl Response {
    pub fn content(&self) -> Result<any_pointer::Reader<'_>, Error> {
        let root = self.msg.get_root::<message::Reader>()?;
        let message::Return(r) = root.which()? else {
            return Err(Error::failed("not a return".into()));
        };
        let return_::Results(p) = r?.which()? else {
            return Err(Error::failed("not results".into()));
        };
        let mut content = p?.get_content();
        capnp::traits::Imbue::imbue(&mut content, &self.table);
        Ok(content)
    }

    /// The capability a client read from the results stands for.
    pub fn cap(&self, client: &impl capnp::capability::FromClientHook) -> Cap {
        cap_in(&self.caps, client)
    }

    /// The capabilities, in the order of the message's table.
    pub fn caps(&self) -> &[Cap] {
        &self.caps
    }
}

/// The answer to a call this vat made; dropping it first cancels the call (`Finish`).
pub struct Reply {
    rx: oneshot::Receiver<Result<Response, Error>>,
    conn: Rc<Conn>,
    question: u32,
    done: bool,
}

impl Future for Reply {
    type Output = Result<Response, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Ready(r) => {
                self.done = true;
                Poll::Ready(
                    r.unwrap_or_else(|_| Err(Error::disconnected("connection lost".into()))),
                )
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let q = self.question;
        let open = {
            let mut st = self.conn.st.borrow_mut();
            let up = st.closed.is_none();
            match st.questions.get_mut(q as usize) {
                Some(Some(question)) if question.reply.is_some() && up => {
                    question.reply = None;
                    true
                }
                _ => false,
            }
        };
        if open {
            self.conn.send(|m| {
                let mut f = m.init_finish();
                f.set_question_id(q);
                f.set_release_result_caps(true);
                Ok(())
            });
        }
    }
}

fn kind_of(e: &Error) -> exception::Type {
    match e.kind {
        ErrorKind::Overloaded => exception::Type::Overloaded,
        ErrorKind::Disconnected => exception::Type::Disconnected,
        ErrorKind::Unimplemented => exception::Type::Unimplemented,
        _ => exception::Type::Failed,
    }
}

fn write_exception(mut ex: exception::Builder<'_>, e: &Error) {
    ex.set_reason(e.extra.as_str());
    ex.set_type(kind_of(e));
}

fn read_exception(ex: exception::Reader<'_>) -> Error {
    let reason = ex
        .get_reason()
        .ok()
        .and_then(|r| r.to_string().ok())
        .unwrap_or_default();
    let kind = match ex.get_type() {
        Ok(exception::Type::Overloaded) => ErrorKind::Overloaded,
        Ok(exception::Type::Disconnected) => ErrorKind::Disconnected,
        Ok(exception::Type::Unimplemented) => ErrorKind::Unimplemented,
        _ => ErrorKind::Failed,
    };
    Error {
        kind,
        extra: reason,
    }
}

fn ops_of(
    t: capnp::struct_list::Reader<'_, capnp_rpc::rpc_capnp::promised_answer::op::Owned>,
) -> Result<Vec<PipelineOp>, Error> {
    use capnp_rpc::rpc_capnp::promised_answer::op;
    t.iter()
        .map(|o| {
            Ok(match o.which()? {
                op::Noop(()) => PipelineOp::Noop,
                op::GetPointerField(i) => PipelineOp::GetPointerField(i),
            })
        })
        .collect()
}

/// Where a message is aimed: an export, or a capability in an answer.
enum Target {
    Export(u32),
    Answer(u32, Vec<PipelineOp>),
}

fn target_of(t: message_target::Reader<'_>) -> Result<Target, Error> {
    Ok(match t.which()? {
        message_target::ImportedCap(id) => Target::Export(id),
        message_target::PromisedAnswer(pa) => {
            let pa = pa?;
            Target::Answer(pa.get_question_id(), ops_of(pa.get_transform()?)?)
        }
    })
}

/// An export that is not there (for a kept answer, cannot happen: it holds its export).
fn gone(id: u32) -> Error {
    Error::failed(format!("no capability {id} is exported"))
}

fn protocol(msg: &str) -> Error {
    Error::failed(format!("protocol error: {msg}"))
}

impl Conn {
    pub fn new(opts: Options) -> Rc<Conn> {
        Rc::new(Conn {
            st: RefCell::new(State::default()),
            out: RefCell::new(Out::default()),
            wake: tokio::sync::Notify::new(),
            drained: tokio::sync::Notify::new(),
            cancelled: tokio::sync::Notify::new(),
            opts,
        })
    }

    /// Why the connection ended, if it has.
    pub fn closed(&self) -> Option<Error> {
        self.st.borrow().closed.clone()
    }

    /// How many objects the peer holds, open answers, kept answers and imports: for
    /// tests and metrics.
    pub fn table_sizes(&self) -> (usize, usize, usize, usize) {
        let st = self.st.borrow();
        let open = st
            .answers
            .values()
            .filter(|a| matches!(a, Answer::Open { .. } | Answer::Finishing { .. }))
            .count();
        (
            st.exports.iter().filter(|e| e.is_some()).count(),
            open,
            st.answers.len() - open,
            st.imports.len(),
        )
    }

    /// Reads and handles messages until the peer goes or the connection is aborted,
    /// writing what is sent meanwhile; returns why it ended.
    pub async fn run<R, W>(self: &Rc<Self>, mut reader: R, mut writer: W) -> Error
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let opts = {
            let mut o = ReaderOptions::new();
            o.traversal_limit_in_words(Some(self.opts.max_message_words));
            o
        };
        let read = async {
            let mut n = 0u32;
            loop {
                n = n.wrapping_add(1);
                if n.is_multiple_of(YIELD_EVERY) {
                    tokio::task::yield_now().await;
                }
                while self.out.borrow().buf.len() > HIGH_WATER && self.closed().is_none() {
                    self.drained.notified().await;
                }
                if self.closed().is_some() {
                    break;
                }
                match capnp_futures::serialize::try_read_message(&mut reader, opts).await {
                    Ok(Some(msg)) => self.handle(msg),
                    Ok(None) => {
                        self.close(Error::disconnected("the peer closed the connection".into()))
                    }
                    Err(e) => self.abort(e),
                }
            }
        };
        let write = async {
            loop {
                let data = {
                    let mut o = self.out.borrow_mut();
                    if o.buf.is_empty() {
                        if o.closing {
                            break;
                        }
                        None
                    } else {
                        Some(std::mem::take(&mut o.buf))
                    }
                };
                match data {
                    None => self.wake.notified().await,
                    Some(data) => {
                        self.drained.notify_waiters();
                        let r = async {
                            writer.write_all(&data).await?;
                            writer.flush().await
                        }
                        .await;
                        if let Err(e) = r {
                            self.close(Error::disconnected(format!("cannot write: {e}")));
                            return;
                        }
                    }
                }
            }
            let _ = writer.close().await;
        };
        futures::join!(read, write);
        self.closed()
            .unwrap_or_else(|| Error::disconnected("connection ended".into()))
    }

    /// Queues a message that `build` writes (nothing once closed).
    fn send(self: &Rc<Self>, build: impl FnOnce(message::Builder<'_>) -> Result<(), Error>) {
        let mut m = Builder::new(HeapAllocator::new().first_segment_words(FIRST_SEGMENT_WORDS));
        if let Err(e) = build(m.init_root()) {
            tracing::warn!("cannot build a message: {e}");
            return;
        }
        self.push(&m);
    }

    fn push(self: &Rc<Self>, m: &Builder<HeapAllocator>) {
        let mut o = self.out.borrow_mut();
        if o.closing {
            return;
        }
        if let Err(e) = capnp::serialize::write_message(&mut o.buf, m) {
            tracing::warn!("cannot write a message: {e}");
        }
        drop(o);
        self.wake.notify_one();
        let resolves = std::mem::take(&mut self.st.borrow_mut().resolves);
        for (id, p) in resolves {
            let cap = p.resolution();
            self.send_resolve(id, &p, &cap);
        }
    }

    /// Ends the connection: everything it held is released, the questions fail.
    pub fn close(self: &Rc<Self>, e: Error) {
        let (exports, answers, questions) = {
            let mut st = self.st.borrow_mut();
            if st.closed.is_some() {
                return;
            }
            st.closed = Some(e.clone());
            st.by_ptr.clear();
            st.imports.clear();
            (
                std::mem::take(&mut st.exports),
                std::mem::take(&mut st.answers),
                std::mem::take(&mut st.questions),
            )
        };
        self.out.borrow_mut().closing = true;
        self.wake.notify_one();
        self.drained.notify_waiters();
        self.cancelled.notify_waiters();
        for q in questions.into_iter().flatten() {
            if let Some(tx) = q.reply {
                let _ = tx.send(Err(e.clone()));
            }
        }
        drop(answers);
        drop(exports);
    }

    /// Sends `Abort` with `e` and ends the connection.
    pub fn abort(self: &Rc<Self>, e: Error) {
        if self.closed().is_some() {
            return;
        }
        tracing::debug!("aborting a connection: {e}");
        self.send(|m| {
            write_exception(m.init_abort(), &e);
            Ok(())
        });
        self.close(e);
    }

    fn handle(self: &Rc<Self>, msg: Msg) {
        if let Err(e) = self.dispatch(msg) {
            self.abort(e);
        }
    }

    fn dispatch(self: &Rc<Self>, msg: Msg) -> Result<(), Error> {
        let root = msg.get_root::<message::Reader>()?;
        match root.which()? {
            message::Call(c) => {
                let c = c?;
                let q = c.get_question_id();
                let target = target_of(c.get_target()?)?;
                let (iface, method) = (c.get_interface_id(), c.get_method_id());
                let to_caller = matches!(
                    c.get_send_results_to().which()?,
                    capnp_rpc::rpc_capnp::call::send_results_to::Caller(())
                );
                let caps = self.import_caps(c.get_params()?.get_cap_table()?)?;
                let gen = self.open_answer(q)?;
                let call = Call {
                    interface_id: iface,
                    method_id: method,
                    table: table(caps.len()),
                    caps,
                    msg,
                    resp: Some(Responder {
                        conn: self.clone(),
                        question: q,
                        gen,
                    }),
                };
                if !to_caller {
                    call.responder().error(Error::unimplemented(
                        "results sent elsewhere than to the caller".into(),
                    ));
                    return Ok(());
                }
                self.route(target, Waiting::Call(call));
            }
            message::Bootstrap(b) => {
                let b = b?;
                let q = b.get_question_id();
                let id = if b.has_deprecated_object_id() {
                    b.get_deprecated_object_id()
                        .get_as::<capnp::text::Reader>()?
                        .as_bytes()
                        .to_vec()
                } else {
                    Vec::new()
                };
                let gen = self.open_answer(q)?;
                let cap = match &self.opts.restorer {
                    Some(r) => r(&id),
                    None => Err(Error::unimplemented("this vat offers no bootstrap".into())),
                };
                let resp = Responder {
                    conn: self.clone(),
                    question: q,
                    gen,
                };
                match cap {
                    Ok(cap) => resp.results(|mut b, caps| {
                        b.set_as_capability(caps.add(cap));
                        Ok(())
                    }),
                    Err(e) => resp.error(e),
                }
            }
            message::Finish(f) => {
                let f = f?;
                self.finish(f.get_question_id(), f.get_release_result_caps());
            }
            message::Release(r) => {
                let r = r?;
                self.release_export(r.get_id(), r.get_reference_count());
            }
            message::Return(r) => {
                let r = r?;
                let q = r.get_answer_id();
                let release_params = r.get_release_param_caps();
                let question = {
                    let mut st = self.st.borrow_mut();
                    match st.questions.get_mut(q as usize).and_then(Option::take) {
                        Some(question) => {
                            st.free_questions.push(q);
                            question
                        }
                        None => {
                            return Err(protocol(&format!(
                                "a return for question {q}, which is not asked"
                            )))
                        }
                    }
                };
                if release_params {
                    for id in &question.param_exports {
                        self.release_export(*id, 1);
                    }
                }
                let result = match r.which()? {
                    return_::Results(p) if question.reply.is_some() => {
                        Ok(self.import_caps(p?.get_cap_table()?)?)
                    }
                    return_::Results(_) => Ok(Vec::new()),
                    return_::Exception(e) => Err(read_exception(e?)),
                    return_::Canceled(()) => Err(Error::failed("the call was canceled".into())),
                    _ => Err(Error::unimplemented(
                        "an answer of a kind this vat does not take".into(),
                    )),
                };
                if let Some(tx) = question.reply {
                    self.send(|m| {
                        let mut f = m.init_finish();
                        f.set_question_id(q);
                        f.set_release_result_caps(false);
                        Ok(())
                    });
                    let _ = tx.send(result.map(|caps| Response {
                        table: table(caps.len()),
                        caps,
                        msg,
                    }));
                }
            }
            message::Resolve(r) => {
                let r = r?;
                let id = r.get_promise_id();
                let cap = match r.which()? {
                    resolve::Cap(d) => self.import_cap(d?)?,
                    resolve::Exception(e) => Cap::broken(read_exception(e?)),
                };
                let import = self.st.borrow().imports.get(&id).and_then(Weak::upgrade);
                if let Some(i) = import {
                    *i.resolved.borrow_mut() = Some(cap);
                }
            }
            message::Disembargo(d) => {
                let d = d?;
                let target = target_of(d.get_target()?)?;
                match d.get_context().which()? {
                    disembargo::context::SenderLoopback(embargo) => {
                        let cap = self.target_cap(&target)?.settled();
                        match cap {
                            Cap::Remote(i) if Rc::ptr_eq(&i.conn, self) => {
                                let id = i.id;
                                self.send(|m| {
                                    let mut d = m.init_disembargo();
                                    d.reborrow().init_target().set_imported_cap(id);
                                    d.init_context().set_receiver_loopback(embargo);
                                    Ok(())
                                });
                            }
                            _ => {
                                return Err(protocol(
                                    "a disembargo whose target does not resolve to the sender",
                                ))
                            }
                        }
                    }
                    disembargo::context::ReceiverLoopback(_) => {
                        tracing::debug!("a receiverLoopback disembargo this vat did not ask for");
                    }
                    _ => self.unimplemented(&root)?,
                }
            }
            message::Abort(e) => {
                let e = read_exception(e?);
                self.close(Error::disconnected(format!(
                    "the peer aborted: {}",
                    e.extra
                )));
            }
            message::Unimplemented(m) => {
                // An echo of a message of ours the peer does not handle.
                match m?.which()? {
                    message::Resolve(r) => {
                        if let resolve::Cap(d) = r?.which()? {
                            match d?.which()? {
                                cap_descriptor::SenderHosted(id)
                                | cap_descriptor::SenderPromise(id) => self.release_export(id, 1),
                                _ => {}
                            }
                        }
                    }
                    message::Call(c) => {
                        let q = c?.get_question_id();
                        let tx = {
                            let mut st = self.st.borrow_mut();
                            let taken = st.questions.get_mut(q as usize).and_then(Option::take);
                            if taken.is_some() {
                                st.free_questions.push(q);
                            }
                            taken.and_then(|q| q.reply)
                        };
                        if let Some(tx) = tx {
                            let _ = tx.send(Err(Error::unimplemented(
                                "the peer does not take calls".into(),
                            )));
                        }
                    }
                    _ => {}
                }
            }
            _ => self.unimplemented(&root)?,
        }
        Ok(())
    }

    fn unimplemented(self: &Rc<Self>, root: &message::Reader<'_>) -> Result<(), Error> {
        let mut m = Builder::new(HeapAllocator::new().first_segment_words(FIRST_SEGMENT_WORDS));
        m.init_root::<message::Builder>().set_unimplemented(*root)?;
        self.push(&m);
        Ok(())
    }

    fn open_answer(&self, q: u32) -> Result<u32, Error> {
        let mut st = self.st.borrow_mut();
        if st.answers.contains_key(&q) {
            return Err(protocol(&format!(
                "question {q} asked again before it was finished"
            )));
        }
        st.gen = st.gen.wrapping_add(1);
        let gen = st.gen;
        st.answers.insert(q, Answer::Open { gen, waiting: None });
        Ok(gen)
    }

    /// The capability a target names, now (a call or promise waiting on an open answer
    /// is not asked for here).
    fn target_cap(&self, t: &Target) -> Result<Cap, Error> {
        let st = self.st.borrow();
        match t {
            Target::Export(id) => st
                .exports
                .get(*id as usize)
                .and_then(Option::as_ref)
                .map(|e| e.cap.clone())
                .ok_or_else(|| protocol(&format!("no export {id}"))),
            Target::Answer(q, ops) => match st.answers.get(q) {
                Some(a @ (Answer::Field { .. } | Answer::Returned(_) | Answer::Failed(_))) => {
                    Ok(a.pipelined(ops, &st.exports).unwrap_or(Cap::Null))
                }
                Some(Answer::Open { .. }) => {
                    Err(protocol(&format!("question {q} has no answer yet")))
                }
                Some(Answer::Finishing { .. }) | None => Err(protocol(&format!("no question {q}"))),
            },
        }
    }

    /// Delivers a call, or a promise for a capability, to what a target names.
    fn route(self: &Rc<Self>, t: Target, w: Waiting) {
        let cap = {
            let mut st = self.st.borrow_mut();
            let State {
                answers, exports, ..
            } = &mut *st;
            match &t {
                Target::Export(id) => match exports.get(*id as usize).and_then(Option::as_ref) {
                    Some(e) => e.cap.clone(),
                    None => Cap::broken(gone(*id)),
                },
                Target::Answer(q, ops) => match answers.get_mut(q) {
                    Some(Answer::Open { waiting, .. }) => {
                        let v = waiting.get_or_insert_with(Default::default);
                        // Room for one at first, not four: in a burst every queued
                        // job has calls pipelined on its `submit` and `job` answers.
                        if v.len() == v.capacity() {
                            v.reserve_exact(v.len().max(1));
                        }
                        v.push((ops.clone(), w));
                        return;
                    }
                    Some(a @ (Answer::Field { .. } | Answer::Returned(_) | Answer::Failed(_))) => {
                        a.pipelined(ops, exports).unwrap_or(Cap::Null)
                    }
                    // (A finished question takes no more pipelined calls.)
                    Some(Answer::Finishing { .. }) | None => {
                        Cap::broken(Error::failed(format!("no question {q} is open")))
                    }
                },
            }
        };
        match w {
            Waiting::Call(c) => cap.deliver(c),
            Waiting::Promise(p) => p.resolve(cap),
        }
    }

    fn finish(self: &Rc<Self>, q: u32, release_results: bool) {
        let answer = self.st.borrow_mut().answers.remove(&q);
        match answer {
            // (The peer's reference too if the finish releases it.)
            Some(Answer::Field { export, .. }) => {
                self.drop_refs(export, u32::from(release_results), 1)
            }
            Some(Answer::Returned(Some(s))) if release_results => {
                for id in &s.exports {
                    self.release_export(*id, 1);
                }
            }
            Some(Answer::Returned(_) | Answer::Failed(_)) => {}
            Some(Answer::Open {
                gen,
                waiting: Some(waiting),
            }) if !waiting.is_empty() => {
                // Calls wait on its results: it is not cancelled.
                self.st.borrow_mut().answers.insert(
                    q,
                    Answer::Finishing {
                        gen,
                        waiting,
                        release: release_results,
                    },
                );
            }
            Some(a @ Answer::Finishing { .. }) => {
                tracing::debug!("a second finish for question {q}");
                self.st.borrow_mut().answers.insert(q, a);
            }
            Some(Answer::Open { waiting, .. }) => {
                self.send(|m| {
                    let mut r = m.init_return();
                    r.set_answer_id(q);
                    r.set_release_param_caps(false);
                    r.set_canceled(());
                    Ok(())
                });
                self.cancelled.notify_waiters();
                let e = Error::failed(format!("question {q} was canceled"));
                for (_, w) in waiting.into_iter().flat_map(|w| *w) {
                    match w {
                        Waiting::Call(c) => c.responder().error(e.clone()),
                        Waiting::Promise(p) => p.resolve(Cap::broken(e.clone())),
                    }
                }
            }
            None => tracing::debug!("a finish for question {q}, which has no answer"),
        }
    }

    /// The peer lets `n` references to export `id` go.
    fn release_export(&self, id: u32, n: u32) {
        self.drop_refs(id, n, 0)
    }

    /// Drops `n` of the peer's references to export `id` and `pins` of its kept
    /// answers'; the export goes when none of either is left.
    fn drop_refs(&self, id: u32, n: u32, pins: u32) {
        let dropped = {
            let mut st = self.st.borrow_mut();
            let Some(Some(e)) = st.exports.get_mut(id as usize) else {
                tracing::debug!("a release of export {id}, which is not exported");
                return;
            };
            e.refs = e.refs.saturating_sub(n);
            e.pins = e.pins.saturating_sub(pins);
            if e.refs > 0 || e.pins > 0 {
                return;
            }
            let e = st.exports[id as usize].take();
            if let Some(e) = &e {
                let p = e.cap.ptr();
                if p != 0 && st.by_ptr.get(&p) == Some(&id) {
                    st.by_ptr.remove(&p);
                }
            }
            st.free_exports.push(id);
            e
        };
        drop(dropped);
    }

    /// Answers an open answer (nothing if it is no longer open with that generation).
    fn answer<F>(self: &Rc<Self>, q: u32, gen: u32, r: Result<F, Error>)
    where
        F: FnOnce(any_pointer::Builder<'_>, &mut CapsOut) -> Result<(), Error>,
    {
        match self.st.borrow().answers.get(&q) {
            Some(Answer::Open { gen: g, .. } | Answer::Finishing { gen: g, .. }) if *g == gen => {}
            _ => return,
        }
        let mut m = Builder::new(HeapAllocator::new().first_segment_words(FIRST_SEGMENT_WORDS));
        let built = match r {
            Ok(build) => {
                let mut ret = m.init_root::<message::Builder>().init_return();
                ret.set_answer_id(q);
                ret.set_release_param_caps(false);
                self.build_payload(ret.init_results(), build)
            }
            Err(e) => Err(e),
        };
        let done = match built {
            Ok((slots, exports)) => {
                self.push(&m);
                let kept = keep(&m, slots, exports);
                if let Answer::Field { export, .. } = kept {
                    if let Some(Some(e)) = self.st.borrow_mut().exports.get_mut(export as usize) {
                        e.pins += 1;
                    }
                }
                kept
            }
            Err(e) => {
                self.send(|m| {
                    let mut ret = m.init_return();
                    ret.set_answer_id(q);
                    ret.set_release_param_caps(false);
                    write_exception(ret.init_exception(), &e);
                    Ok(())
                });
                Answer::Failed(Rc::new(e))
            }
        };
        let (waiting, finished) = {
            let mut st = self.st.borrow_mut();
            match st.answers.insert(q, done) {
                Some(Answer::Open { waiting, .. }) => (waiting, None),
                Some(Answer::Finishing {
                    waiting, release, ..
                }) => (Some(waiting), Some(release)),
                _ => (None, None),
            }
        };
        for (ops, w) in waiting.into_iter().flat_map(|w| *w) {
            self.route(Target::Answer(q, ops), w);
        }
        if let Some(release) = finished {
            self.finish(q, release);
        }
    }

    /// Writes a payload: `build` writes the content, then the capability table.
    /// Returns the capabilities by table slot, and the exports the table holds.
    fn build_payload<F>(
        self: &Rc<Self>,
        mut p: payload::Builder<'_>,
        build: F,
    ) -> Result<(Vec<Cap>, Vec<u32>), Error>
    where
        F: FnOnce(any_pointer::Builder<'_>, &mut CapsOut) -> Result<(), Error>,
    {
        let mut t: CapTable = Vec::new();
        let mut out = CapsOut::default();
        {
            let mut content = p.reborrow().get_content();
            capnp::traits::ImbueMut::imbue_mut(&mut content, &mut t);
            build(content, &mut out)?;
        }
        if t.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let slots: Vec<Cap> = t
            .iter()
            .map(|h| match h {
                Some(h) => crate::bridge::cap_of_hook(&**h, &out.caps),
                None => Cap::Null,
            })
            .collect();
        let mut exports = Vec::new();
        let mut table = p.init_cap_table(slots.len() as u32);
        for (i, cap) in slots.iter().enumerate() {
            self.describe(cap, table.reborrow().get(i as u32), &mut exports);
        }
        Ok((slots, exports))
    }

    /// Writes the descriptor of `cap` as this connection's peer is to see it, exporting
    /// it if need be.
    fn describe(
        self: &Rc<Self>,
        cap: &Cap,
        mut d: cap_descriptor::Builder<'_>,
        exports: &mut Vec<u32>,
    ) {
        // A promise of ours is a promise on the wire until the peer is told what it
        // resolved to, even when it resolved before it was sent (as the original's job
        // is, which a client takes as "a worker took it" when it resolves).
        let cap = match cap {
            Cap::Promise(p) => Cap::Promise(p.clone()),
            c => c.settled(),
        };
        match cap {
            Cap::Null => d.set_none(()),
            Cap::Remote(i) if Rc::ptr_eq(&i.conn, self) => d.set_receiver_hosted(i.id),
            Cap::Promise(p) => {
                // A promise knows where it is exported: no identity-table entry.
                let id = match p.export_on(self).filter(|id| self.add_ref(*id, &p)) {
                    Some(id) => id,
                    None => {
                        let id = self.export(Cap::Promise(p.clone()), false);
                        if p.is_resolved() {
                            self.st.borrow_mut().resolves.push((id, p.clone()));
                        } else {
                            p.exported_on(self, id);
                        }
                        id
                    }
                };
                exports.push(id);
                d.set_sender_promise(id);
            }
            other => {
                let dedupe = match &other {
                    Cap::Local(o) => o.dedupe(),
                    Cap::Remote(_) => true,
                    _ => false,
                };
                let id = self.export(other, dedupe);
                exports.push(id);
                d.set_sender_hosted(id);
            }
        }
    }

    /// Counts one more reference to export `id` if it is still promise `p`.
    fn add_ref(&self, id: u32, p: &Rc<Promise>) -> bool {
        let mut st = self.st.borrow_mut();
        match st.exports.get_mut(id as usize) {
            Some(Some(e)) if matches!(&e.cap, Cap::Promise(q) if Rc::ptr_eq(q, p)) => {
                e.refs += 1;
                true
            }
            _ => false,
        }
    }

    fn export(&self, cap: Cap, dedupe: bool) -> u32 {
        let mut st = self.st.borrow_mut();
        let p = if dedupe { cap.ptr() } else { 0 };
        if p != 0 {
            if let Some(&id) = st.by_ptr.get(&p) {
                if let Some(Some(e)) = st.exports.get_mut(id as usize) {
                    e.refs += 1;
                    return id;
                }
            }
        }
        let e = Some(Export {
            cap,
            refs: 1,
            pins: 0,
        });
        let id = match st.free_exports.pop() {
            Some(id) => {
                st.exports[id as usize] = e;
                id
            }
            None => {
                grow_by_eighths(&mut st.exports, 1);
                st.exports.push(e);
                (st.exports.len() - 1) as u32
            }
        };
        if p != 0 {
            st.by_ptr.insert(p, id);
        }
        id
    }

    fn import_caps(
        self: &Rc<Self>,
        t: capnp::struct_list::Reader<'_, cap_descriptor::Owned>,
    ) -> Result<Vec<Cap>, Error> {
        t.iter().map(|d| self.import_cap(d)).collect()
    }

    fn import_cap(self: &Rc<Self>, d: cap_descriptor::Reader<'_>) -> Result<Cap, Error> {
        Ok(match d.which()? {
            cap_descriptor::None(()) => Cap::Null,
            cap_descriptor::SenderHosted(id) | cap_descriptor::SenderPromise(id) => {
                Cap::Remote(self.import(id))
            }
            cap_descriptor::ThirdPartyHosted(t) => Cap::Remote(self.import(t?.get_vine_id())),
            cap_descriptor::ReceiverHosted(id) => self.target_cap(&Target::Export(id))?,
            cap_descriptor::ReceiverAnswer(pa) => {
                let pa = pa?;
                let t = Target::Answer(pa.get_question_id(), ops_of(pa.get_transform()?)?);
                let open = matches!(
                    self.st.borrow().answers.get(&pa.get_question_id()),
                    Some(Answer::Open { .. })
                );
                if open {
                    let p = Promise::new(None);
                    self.route(t, Waiting::Promise(p.clone()));
                    Cap::Promise(p)
                } else {
                    self.target_cap(&t)?
                }
            }
        })
    }

    fn import(self: &Rc<Self>, id: u32) -> Rc<Import> {
        let mut st = self.st.borrow_mut();
        if let Some(i) = st.imports.get(&id).and_then(Weak::upgrade) {
            i.refs.set(i.refs.get() + 1);
            return i;
        }
        let i = Rc::new(Import {
            conn: self.clone(),
            id,
            refs: Cell::new(1),
            resolved: RefCell::new(None),
        });
        st.imports.insert(id, Rc::downgrade(&i));
        i
    }

    /// Sends a call; the reply comes through the returned future.
    fn question(
        self: &Rc<Self>,
        target: impl FnOnce(message_target::Builder<'_>),
        interface_id: u64,
        method_id: u16,
        build: impl FnOnce(any_pointer::Builder<'_>, &mut CapsOut) -> Result<(), Error>,
    ) -> Reply {
        let (tx, rx) = oneshot::channel();
        let q = {
            let mut st = self.st.borrow_mut();
            match st.free_questions.pop() {
                Some(q) => q,
                None => {
                    st.questions.push(None);
                    (st.questions.len() - 1) as u32
                }
            }
        };
        let reply = Reply {
            rx,
            conn: self.clone(),
            question: q,
            done: false,
        };
        if let Some(e) = self.closed() {
            let _ = tx.send(Err(e));
            self.st.borrow_mut().free_questions.push(q);
            return reply;
        }
        let mut m = Builder::new(HeapAllocator::new().first_segment_words(FIRST_SEGMENT_WORDS));
        let built = {
            let mut c = m.init_root::<message::Builder>().init_call();
            c.set_question_id(q);
            c.set_interface_id(interface_id);
            c.set_method_id(method_id);
            target(c.reborrow().init_target());
            self.build_payload(c.init_params(), build)
        };
        match built {
            Ok((_, param_exports)) => {
                self.st.borrow_mut().questions[q as usize] = Some(Question {
                    reply: Some(tx),
                    param_exports,
                });
                self.push(&m);
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                self.st.borrow_mut().free_questions.push(q);
            }
        }
        reply
    }

    /// Sends the `Resolve` of promise export `id` (if the peer still holds it).
    pub(crate) fn send_resolve(self: &Rc<Self>, id: u32, p: &Promise, cap: &Cap) {
        let held = {
            let st = self.st.borrow();
            st.closed.is_none()
                && matches!(st.exports.get(id as usize), Some(Some(e))
                    if matches!(&e.cap, Cap::Promise(q) if std::ptr::eq(Rc::as_ptr(q), p)))
        };
        if !held {
            return;
        }
        let mut exports = Vec::new();
        self.send(|m| {
            let mut r = m.init_resolve();
            r.set_promise_id(id);
            match cap.settled() {
                Cap::Broken(e) => write_exception(r.init_exception(), &e),
                c => self.describe(&c, r.init_cap(), &mut exports),
            }
            Ok(())
        });
    }
}

/// Relays a call to a peer's capability and its answer back.
pub(crate) fn forward(i: &Rc<Import>, call: Call) {
    let caps = call.caps.clone();
    let reply = i.call(call.interface_id, call.method_id, |mut b, out| {
        out.caps = caps;
        b.set_as(call.params()?)
    });
    let resp = call.responder();
    tokio::task::spawn_local(async move {
        match reply.await {
            Ok(r) => resp.results(|mut b, out| {
                out.caps = r.caps.clone();
                b.set_as(r.content()?)
            }),
            Err(e) => resp.error(e),
        }
    });
}

#[cfg(test)]
mod sizes {
    /// What the scheduler keeps per queued job is made of these: keep them small.
    #[test]
    fn table_entries_stay_small() {
        use std::mem::size_of;
        assert!(size_of::<crate::Cap>() <= 24);
        // With the Rc's counts, a 72-byte request: glibc's 80-byte block.
        assert!(size_of::<crate::Promise>() <= 56);
        assert!(size_of::<super::Export>() <= 32);
        assert!(size_of::<super::Answer>() <= 16);
        assert!(size_of::<Option<super::Answer>>() <= 16);
        assert!(size_of::<super::Responder>() <= 16);
    }
}

#[cfg(test)]
mod answers {
    use super::{Answer, Answers};

    fn open(gen: u32) -> Answer {
        Answer::Open { gen, waiting: None }
    }

    fn gen(a: Option<&Answer>) -> Option<u32> {
        match a {
            Some(Answer::Open { gen, .. }) => Some(*gen),
            _ => None,
        }
    }

    /// Dense ids go in the vector; an id far past what is open goes in the map (a peer
    /// cannot make the vector huge); the vector growing past a mapped id keeps it.
    #[test]
    fn dense_ids_in_the_vector_far_ones_in_the_map() {
        let mut t = Answers::default();
        for q in 0..100 {
            assert!(t.insert(q, open(q)).is_none());
        }
        assert_eq!(t.dense.len(), 100);
        assert!(t.sparse.is_empty());
        assert!(t.insert(u32::MAX, open(7)).is_none());
        assert!(t.insert(2000, open(8)).is_none());
        assert_eq!(t.sparse.len(), 2);
        assert!(t.dense.len() < 2000);
        // More open answers move the bound past 2000: the vector grows, 2000 stays put.
        for q in 100..700 {
            t.insert(q, open(q));
        }
        t.insert(2100, open(9));
        assert!(t.dense.len() > 2000);
        assert_eq!(gen(t.get(&2000)), Some(8));
        assert_eq!(gen(t.insert(2000, open(10)).as_ref()), Some(8));
        assert_eq!(gen(t.get(&2000)), Some(10));
        assert_eq!(gen(t.get(&u32::MAX)), Some(7));
        assert_eq!(t.len(), 703);
        assert_eq!(t.values().count(), 703);
        assert_eq!(gen(t.remove(&2000).as_ref()), Some(10));
        assert!(t.get(&2000).is_none());
        assert!(t.remove(&2000).is_none());
        assert_eq!(gen(t.remove(&5).as_ref()), Some(5));
        assert!(!t.contains_key(&5));
        assert_eq!(t.len(), 701);
    }
}

#[cfg(test)]
mod kept_answers {
    use super::{any_pointer, keep, payload, Answer, Builder, CapTable, Export, HeapAllocator};
    use crate::hook::table;
    use crate::{Cap, Promise};
    use capnp::private::capability::PipelineOp::{GetPointerField, Noop};
    use capnp_rpc::rpc_capnp::{call, message};
    use std::rc::Rc;

    /// A `Return` whose results `build` writes, `caps` the capabilities it sets.
    fn results(
        caps: usize,
        build: impl FnOnce(any_pointer::Builder<'_>, &mut CapTable),
    ) -> Builder<HeapAllocator> {
        let mut m = Builder::new_default();
        let mut t: CapTable = Vec::new();
        {
            let ret = m.init_root::<message::Builder>().init_return();
            let mut content = ret.init_results().get_content();
            capnp::traits::ImbueMut::imbue_mut(&mut content, &mut t);
            let mut hooks = table(caps);
            build(content, &mut hooks);
        }
        assert_eq!(t.len(), caps);
        m
    }

    fn cap() -> (Cap, Rc<Promise>) {
        let p = Promise::new(None);
        (Cap::Promise(p.clone()), p)
    }

    fn is(c: Cap, p: &Rc<Promise>) -> bool {
        matches!(c, Cap::Promise(q) if Rc::ptr_eq(&q, p))
    }

    #[test]
    fn one_capability_in_a_field_keeps_only_it() {
        // As `submit`'s results: a struct (read as a `Payload`) with a cap in field 0.
        let m = results(1, |r, hooks| {
            r.init_as::<payload::Builder>()
                .get_content()
                .set_as_capability(hooks[0].take().unwrap());
        });
        let (c, p) = cap();
        let a = keep(&m, vec![c.clone()], vec![1]);
        assert!(matches!(
            a,
            Answer::Field {
                field: 0,
                export: 1
            }
        ));
        // It is read from the exports table.
        let exports = [
            None,
            Some(Export {
                cap: c,
                refs: 1,
                pins: 1,
            }),
        ];
        let got = |ops: &[_]| a.pipelined(ops, &exports).unwrap();
        assert!(is(got(&[GetPointerField(0)]), &p));
        assert!(is(got(&[Noop, GetPointerField(0)]), &p));
        // Where the results hold no capability, a broken one (as reading them gives).
        for ops in [
            &[][..],
            &[GetPointerField(1)],
            &[GetPointerField(0), GetPointerField(0)],
        ] {
            assert!(matches!(got(ops), Cap::Broken(_)), "{}", ops.len());
        }
        // A capability that is not exported (one the peer hosts) is kept flat.
        let (c, p) = cap();
        let Answer::Returned(Some(s)) = keep(&m, vec![c], vec![]) else {
            panic!("not kept flat");
        };
        assert!(is(s.pipelined(&[GetPointerField(0)]), &p));
        // No capability: nothing kept.
        assert!(matches!(keep(&m, vec![], vec![]), Answer::Returned(None)));
    }

    #[test]
    fn other_results_are_kept_flat_and_read_for_each_call() {
        // One capability, in a struct in a field: not a field of the results' own.
        let m = results(1, |r, hooks| {
            r.init_as::<payload::Builder>()
                .get_content()
                .init_as::<payload::Builder>()
                .get_content()
                .set_as_capability(hooks[0].take().unwrap());
        });
        let (c, p) = cap();
        let Answer::Returned(Some(s)) = keep(&m, vec![c], vec![3]) else {
            panic!("not kept flat");
        };
        assert_eq!(&s.exports[..], &[3]);
        assert!(is(
            s.pipelined(&[GetPointerField(0), GetPointerField(0)]),
            &p
        ));
        assert!(matches!(s.pipelined(&[GetPointerField(0)]), Cap::Broken(_)));

        // Two: one in a field of the results (a `Call`'s pointer 2, `thirdParty`), one
        // deeper (in its `params`, pointer 1).
        let m = results(2, |r, hooks| {
            let mut c = r.init_as::<call::Builder>();
            c.reborrow()
                .init_send_results_to()
                .init_third_party()
                .set_as_capability(hooks[0].take().unwrap());
            c.init_params()
                .get_content()
                .set_as_capability(hooks[1].take().unwrap());
        });
        let ((a, pa), (b, pb)) = (cap(), cap());
        let Answer::Returned(Some(s)) = keep(&m, vec![a, b], vec![1, 2]) else {
            panic!("not kept flat");
        };
        assert_eq!(&s.exports[..], &[1, 2]);
        assert!(is(s.pipelined(&[GetPointerField(2)]), &pa));
        assert!(is(
            s.pipelined(&[GetPointerField(1), GetPointerField(0)]),
            &pb
        ));
    }
}
