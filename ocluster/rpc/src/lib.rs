//! A compact Cap'n Proto RPC layer: the two-party protocol of `rpc.capnp` at level 1
//! (bootstrap, calls with promise pipelining, returns, finish, release, promises that
//! resolve, disembargo echo), speaking the same bytes as capnp-rpc and OCaml's
//! capnp-rpc, written for a server that keeps very many calls open.
//!
//! Why: capnp-rpc keeps, for every call still open, a boxed future chain, a results
//! message, shared futures and queue entries, about 2 KiB each (docs/performance.md). The
//! scheduler holds two open calls (a client's `result` and `log`) and two exported
//! objects (the ticket and the job) for every queued job, and issue 12 asks for less
//! than 1 KiB per queued job. Here an object gets each call as a [`Call`] and answers it
//! when it likes through a [`Responder`]: a connection handle, a question id and a
//! generation, 16 bytes; the call's parameters are dropped as soon as the object has
//! read them. A call left open costs its answer-table entry and its responder.
//!
//! Capabilities are [`Cap`]s: an object of this vat, a promise of this vat (resolved
//! later with a `Resolve`), an import from a peer, null or broken. The generated code of
//! a schema is used for reading parameters and building results; capabilities inside a
//! message travel as small hooks that stand for an index into the message's capability
//! list ([`Call::cap`], [`CapsOut::add`]).
//!
//! Single-threaded (`Rc`): run connections on a tokio `LocalSet`.

mod bridge;
mod conn;
mod hook;

pub use bridge::{CapClient, HookObject};
pub use conn::{Call, CallParams, CapsOut, Conn, Import, Options, Reply, Responder, Response};
pub use hook::{cap_index, CapHook};

use std::cell::RefCell;
use std::rc::{Rc, Weak};

pub use capnp::Error;

/// An object of this vat that answers calls.
pub trait Object {
    /// A call on this object: read its parameters, then answer it now or keep its
    /// [`Responder`] (`call.responder()`) and answer later.
    fn call(self: Rc<Self>, call: Call);

    /// Whether the object, sent twice on one connection, gets the same export id both
    /// times (as capnp-rpc does). That costs an entry in the connection's identity table
    /// for as long as it is exported; an object sent once (a ticket, a job) says false.
    fn dedupe(&self) -> bool {
        true
    }

    /// The capnp client hook this object serves, if it is one ([`HookObject`]): its
    /// identity, and a direct way in for generated clients.
    fn as_hook(&self) -> Option<&dyn capnp::private::capability::ClientHook> {
        None
    }
}

/// A capability as this vat holds it.
#[derive(Clone)]
pub enum Cap {
    /// A null capability: calls on it fail.
    Null,
    /// A broken capability: calls on it fail with this error.
    Broken(Rc<Error>),
    /// An object of this vat.
    Local(Rc<dyn Object>),
    /// A promise of this vat.
    Promise(Rc<Promise>),
    /// A capability a peer exported to this vat.
    Remote(Rc<conn::Import>),
}

impl Cap {
    pub fn local(o: impl Object + 'static) -> Cap {
        Cap::Local(Rc::new(o))
    }

    pub fn broken(e: Error) -> Cap {
        Cap::Broken(Rc::new(e))
    }

    /// What this capability is once its promises have resolved as far as they have.
    pub fn settled(&self) -> Cap {
        let mut c = self.clone();
        loop {
            let next = match &c {
                Cap::Promise(p) => match &*p.st.borrow() {
                    PromiseState::Resolved(r) => Some(r.clone()),
                    PromiseState::Waiting { .. } => None,
                },
                _ => None,
            };
            match next {
                Some(n) => c = n,
                None => return c,
            }
        }
    }

    /// Delivers a call to this capability.
    pub fn deliver(&self, call: Call) {
        match self {
            Cap::Null => call
                .responder()
                .error(Error::failed("call on a null capability".into())),
            Cap::Broken(e) => call.responder().error((**e).clone()),
            Cap::Local(o) => o.clone().call(call),
            Cap::Promise(p) => p.deliver(call),
            Cap::Remote(i) => conn::forward(i, call),
        }
    }

    /// The identity that export tables key on (0: none).
    fn ptr(&self) -> usize {
        match self {
            Cap::Local(o) => match o.as_hook() {
                Some(h) => h.get_ptr(),
                None => Rc::as_ptr(o) as *const () as usize,
            },
            Cap::Promise(p) => Rc::as_ptr(p) as usize,
            Cap::Remote(i) => Rc::as_ptr(i) as usize,
            Cap::Null | Cap::Broken(_) => 0,
        }
    }
}

/// A capability of this vat that stands for another not known yet. On the wire it is a
/// `senderPromise`; when it resolves, each connection it was exported on is sent a
/// `Resolve`. Calls made on it before that go to its `forward` capability if it has one,
/// or wait in it. (Kept small: the scheduler holds one for every queued job.)
pub struct Promise {
    st: RefCell<PromiseState>,
}

enum PromiseState {
    Waiting {
        pending: Pending,
        /// Where it was exported: connection and export id (usually one connection).
        first: Option<(Weak<Conn>, u32)>,
        more: Option<Box<ExportedOn>>,
    },
    Resolved(Cap),
}

/// Connections and export ids.
type ExportedOn = Vec<(Weak<Conn>, u32)>;

enum Pending {
    Forward(Cap),
    /// (Boxed, made at the first call: the promise is a 72-byte request, glibc's 80-byte
    /// block, where a vector of its own made it 96.)
    #[allow(clippy::box_collection)]
    Queue(Option<Box<Vec<Call>>>),
}

impl Promise {
    /// A promise; calls made on it before it resolves go to `forward` if given.
    pub fn new(forward: Option<Cap>) -> Rc<Promise> {
        Rc::new(Promise {
            st: RefCell::new(PromiseState::Waiting {
                pending: match forward {
                    Some(f) => Pending::Forward(f),
                    None => Pending::Queue(None),
                },
                first: None,
                more: None,
            }),
        })
    }

    pub fn is_resolved(&self) -> bool {
        matches!(&*self.st.borrow(), PromiseState::Resolved(_))
    }

    /// What it resolved to (itself while it waits).
    pub(crate) fn resolution(&self) -> Cap {
        match &*self.st.borrow() {
            PromiseState::Resolved(c) => c.clone(),
            PromiseState::Waiting { .. } => Cap::Null,
        }
    }

    /// Resolves the promise (once; later calls do nothing): each peer it was exported to
    /// is sent a `Resolve`, and the calls that waited in it go to `cap`.
    pub fn resolve(&self, cap: Cap) {
        let old = {
            let mut st = self.st.borrow_mut();
            if matches!(&*st, PromiseState::Resolved(_)) {
                return;
            }
            std::mem::replace(&mut *st, PromiseState::Resolved(cap.clone()))
        };
        let PromiseState::Waiting {
            pending,
            first,
            more,
        } = old
        else {
            return;
        };
        for (conn, id) in first.into_iter().chain(more.into_iter().flat_map(|m| *m)) {
            if let Some(conn) = conn.upgrade() {
                conn.send_resolve(id, self, &cap);
            }
        }
        if let Pending::Queue(Some(queued)) = pending {
            for call in *queued {
                cap.deliver(call);
            }
        }
    }

    /// Where its calls go while it waits, if anywhere but its queue.
    pub(crate) fn forward(&self) -> Option<Cap> {
        match &*self.st.borrow() {
            PromiseState::Waiting {
                pending: Pending::Forward(f),
                ..
            } => Some(f.clone()),
            _ => None,
        }
    }

    /// Resolves the promise to the capability its calls were going to meanwhile (a
    /// promise made without one resolves to null).
    pub fn settle(&self) {
        let to = match &*self.st.borrow() {
            PromiseState::Waiting {
                pending: Pending::Forward(f),
                ..
            } => f.clone(),
            PromiseState::Waiting { .. } => Cap::Null,
            PromiseState::Resolved(_) => return,
        };
        self.resolve(to)
    }

    fn deliver(&self, call: Call) {
        let mut st = self.st.borrow_mut();
        let to = match &mut *st {
            PromiseState::Resolved(c) => c.clone(),
            PromiseState::Waiting {
                pending: Pending::Forward(f),
                ..
            } => f.clone(),
            PromiseState::Waiting {
                pending: Pending::Queue(q),
                ..
            } => return q.get_or_insert_with(Default::default).push(call),
        };
        drop(st);
        to.deliver(call)
    }

    /// The export id this promise has on `conn`, if it was exported there.
    fn export_on(&self, conn: &Rc<Conn>) -> Option<u32> {
        let st = self.st.borrow();
        let PromiseState::Waiting { first, more, .. } = &*st else {
            return None;
        };
        first
            .iter()
            .chain(more.iter().flat_map(|m| m.iter()))
            .find(|(c, _)| std::ptr::eq(c.as_ptr(), Rc::as_ptr(conn)))
            .map(|(_, id)| *id)
    }

    fn exported_on(&self, conn: &Rc<Conn>, id: u32) {
        let mut st = self.st.borrow_mut();
        let PromiseState::Waiting { first, more, .. } = &mut *st else {
            return;
        };
        let here = |(c, _): &(Weak<Conn>, u32)| std::ptr::eq(c.as_ptr(), Rc::as_ptr(conn));
        let entry = (Rc::downgrade(conn), id);
        match first {
            Some(f) if here(f) || f.0.strong_count() == 0 => *f = entry,
            None => *first = Some(entry),
            Some(_) => {
                let m = more.get_or_insert_with(Default::default);
                m.retain(|e| e.0.strong_count() > 0 && !here(e));
                m.push(entry);
            }
        }
    }
}
