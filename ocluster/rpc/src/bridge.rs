//! Generated code both ways, so that services written against capnp's generated traits run
//! on this layer unchanged, and only the paths that hold many calls open need [`Object`]s:
//!
//! * [`Cap::from_hook`]: any capnp client (a capnp-rpc `new_client` server, a hook of
//!   ours) as a [`Cap`]. A foreign hook is served by [`HookObject`], which hands each call
//!   to the hook as parameters and results hooks over this layer's messages, and answers
//!   when the hook's promise and its results are done.
//! * [`Cap::client`]: a [`Cap`] as a generated client. Its requests go out as this
//!   layer's calls (on an import), or in as calls on the local object.
//!
//! Pipelining on the answer of a request made through a generated client is not offered
//! (the scheduler never pipelines on its own calls): a pipelined capability is broken.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};

use capnp::capability::{Promise as CapPromise, RemotePromise, Request};
use capnp::private::capability::{
    ClientHook, ParamsHook, PipelineHook, PipelineOp, RequestHook, ResponseHook, ResultsHook,
};
use capnp::{any_pointer, Error, MessageSize};
use futures::channel::oneshot;
use futures::FutureExt;

use crate::conn::{Call, CallParams, CapsOut, Response};
use crate::hook::cap_index;
use crate::{Cap, Object};

type CapTable = Vec<Option<Box<dyn ClientHook>>>;

/// The brand of [`CapClient`] hooks.
static CLIENT_BRAND: u8 = 0;

fn client_brand() -> usize {
    &CLIENT_BRAND as *const u8 as usize
}

struct ClientInner {
    cap: Cap,
}

thread_local! {
    /// The live [`CapClient`]s by address, so that a hook met in a message can be turned
    /// back into its [`Cap`] without an unsafe cast.
    static CLIENTS: RefCell<HashMap<usize, Weak<ClientInner>>> = RefCell::new(HashMap::new());
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        let me = self as *const ClientInner as usize;
        let _ = CLIENTS.try_with(|c| c.borrow_mut().remove(&me));
    }
}

/// A [`Cap`] as a capnp client hook.
pub struct CapClient(Rc<ClientInner>);

impl CapClient {
    pub fn new(cap: Cap) -> CapClient {
        let inner = Rc::new(ClientInner { cap });
        let key = Rc::as_ptr(&inner) as usize;
        CLIENTS.with(|c| c.borrow_mut().insert(key, Rc::downgrade(&inner)));
        CapClient(inner)
    }
}

impl Cap {
    /// Any capnp client hook as a [`Cap`].
    pub fn from_hook(hook: Box<dyn ClientHook>) -> Cap {
        if hook.get_brand() == client_brand() {
            let found = CLIENTS.with(|c| c.borrow().get(&hook.get_ptr()).and_then(Weak::upgrade));
            if let Some(inner) = found {
                return inner.cap.clone();
            }
        }
        if cap_index(&*hook).is_some() {
            return Cap::broken(Error::failed(
                "a capability of a message, taken out of its message".into(),
            ));
        }
        Cap::Local(Rc::new(HookObject(hook)))
    }

    /// A generated client (`job::Client`, …) for this capability.
    pub fn client<C: capnp::capability::FromClientHook>(&self) -> C {
        if let Cap::Local(o) = self {
            if let Some(h) = o.as_hook() {
                return C::new(h.add_ref());
            }
        }
        C::new(Box::new(CapClient::new(self.clone())))
    }
}

/// The capabilities of a message as real hooks, for generated code that calls them.
pub(crate) fn client_table(caps: &[Cap]) -> CapTable {
    caps.iter()
        .map(|c| Some(Box::new(CapClient::new(c.clone())) as Box<dyn ClientHook>))
        .collect()
}

/// A hook met in a message being built: its [`Cap`] (`caps` for this crate's index hooks).
pub(crate) fn cap_of_hook(hook: &dyn ClientHook, caps: &[Cap]) -> Cap {
    match cap_index(hook) {
        Some(i) => caps.get(i).cloned().unwrap_or(Cap::Null),
        None => Cap::from_hook(hook.add_ref()),
    }
}

fn unsupported(what: &str) -> Error {
    Error::unimplemented(format!("{what} is not offered by ocluster-rpc's bridge"))
}

/// The capnp hook a call on `cap` goes to in this vat, if it goes to one (an object
/// served by [`HookObject`], or a waiting promise's forward that is one).
fn local_hook(cap: &Cap) -> Option<Box<dyn ClientHook>> {
    match cap.settled() {
        Cap::Local(o) => o.as_hook().map(|h| h.add_ref()),
        Cap::Promise(p) => local_hook(&p.forward()?),
        _ => None,
    }
}

impl ClientHook for CapClient {
    fn add_ref(&self) -> Box<dyn ClientHook> {
        Box::new(CapClient(self.0.clone()))
    }

    fn new_call(
        &self,
        interface_id: u64,
        method_id: u16,
        size_hint: Option<MessageSize>,
    ) -> Request<any_pointer::Owned, any_pointer::Owned> {
        if let Some(h) = local_hook(&self.0.cap) {
            return h.new_call(interface_id, method_id, size_hint);
        }
        Request::new(Box::new(CapRequest {
            cap: self.0.cap.clone(),
            interface_id,
            method_id,
            msg: capnp::message::Builder::new_default(),
            table: Vec::new(),
        }))
    }

    fn call(
        &self,
        interface_id: u64,
        method_id: u16,
        params: Box<dyn ParamsHook>,
        mut results: Box<dyn ResultsHook>,
    ) -> CapPromise<(), Error> {
        if let Some(h) = local_hook(&self.0.cap) {
            return h.call(interface_id, method_id, params, results);
        }
        // The parameters' capabilities are copied through their own table (real hooks),
        // which the message's build turns back into `Cap`s.
        let reply = send(&self.0.cap, interface_id, method_id, |mut b, _| {
            b.set_as(params.get()?)
        });
        CapPromise::from_future(async move {
            let r = reply.await?;
            let table = client_table(r.caps());
            let mut content = r.content()?;
            capnp::traits::Imbue::imbue(&mut content, &table);
            results.get()?.set_as(content)
        })
    }

    fn get_brand(&self) -> usize {
        client_brand()
    }

    fn get_ptr(&self) -> usize {
        Rc::as_ptr(&self.0) as usize
    }

    fn get_resolved(&self) -> Option<Box<dyn ClientHook>> {
        None
    }

    fn when_more_resolved(&self) -> Option<CapPromise<Box<dyn ClientHook>, Error>> {
        None
    }

    fn when_resolved(&self) -> CapPromise<(), Error> {
        CapPromise::ok(())
    }
}

/// Sends a call to `cap`: out on its connection, or in to its object.
fn send(
    cap: &Cap,
    interface_id: u64,
    method_id: u16,
    build: impl FnOnce(any_pointer::Builder<'_>, &mut CapsOut) -> Result<(), Error>,
) -> futures::future::LocalBoxFuture<'static, Result<Response, Error>> {
    match cap.settled() {
        Cap::Remote(i) => i.call(interface_id, method_id, build).boxed_local(),
        Cap::Null => futures::future::ready(Err(Error::failed("call on a null capability".into())))
            .boxed_local(),
        Cap::Broken(e) => futures::future::ready(Err((*e).clone())).boxed_local(),
        _ => {
            drop(build);
            futures::future::ready(Err(unsupported(
                "a call through a generated client on an object of this vat",
            )))
            .boxed_local()
        }
    }
}

/// A request made through a generated client.
struct CapRequest {
    cap: Cap,
    interface_id: u64,
    method_id: u16,
    msg: capnp::message::Builder<capnp::message::HeapAllocator>,
    table: CapTable,
}

impl RequestHook for CapRequest {
    fn get(&mut self) -> any_pointer::Builder<'_> {
        let mut root: any_pointer::Builder<'_> = self.msg.get_root().expect("a root");
        capnp::traits::ImbueMut::imbue_mut(&mut root, &mut self.table);
        root
    }

    fn get_brand(&self) -> usize {
        client_brand()
    }

    fn send(self: Box<Self>) -> RemotePromise<any_pointer::Owned> {
        let CapRequest {
            cap,
            interface_id,
            method_id,
            msg,
            table,
        } = *self;
        let reply = send(&cap, interface_id, method_id, move |mut b, _| {
            let mut root: any_pointer::Reader<'_> = msg.get_root_as_reader()?;
            capnp::traits::Imbue::imbue(&mut root, &table);
            b.set_as(root)
        });
        RemotePromise {
            promise: CapPromise::from_future(async move {
                let r = reply.await?;
                Ok(capnp::capability::Response::new(Box::new(CapResponse {
                    table: client_table(r.caps()),
                    r,
                })))
            }),
            pipeline: any_pointer::Pipeline::new(Box::new(BrokenPipeline)),
        }
    }

    fn send_streaming(self: Box<Self>) -> CapPromise<(), Error> {
        let r = self.send();
        CapPromise::from_future(async move { r.promise.await.map(|_| ()) })
    }

    fn tail_send(self: Box<Self>) -> Option<(u32, CapPromise<(), Error>, Box<dyn PipelineHook>)> {
        None
    }
}

struct CapResponse {
    r: Response,
    table: CapTable,
}

impl ResponseHook for CapResponse {
    fn get(&self) -> Result<any_pointer::Reader<'_>, Error> {
        let mut content = self.r.content()?;
        capnp::traits::Imbue::imbue(&mut content, &self.table);
        Ok(content)
    }
}

struct BrokenPipeline;

impl PipelineHook for BrokenPipeline {
    fn add_ref(&self) -> Box<dyn PipelineHook> {
        Box::new(BrokenPipeline)
    }

    fn get_pipelined_cap(&self, _ops: &[PipelineOp]) -> Box<dyn ClientHook> {
        Box::new(CapClient::new(Cap::broken(unsupported(
            "pipelining on a call made through a generated client",
        ))))
    }
}

/// A capnp client hook (a generated server, say) served as an [`Object`].
pub struct HookObject(pub Box<dyn ClientHook>);

impl Object for HookObject {
    fn call(self: Rc<Self>, call: Call) {
        let (interface_id, method_id) = (call.interface_id, call.method_id);
        let (params, resp) = call.into_parts();
        let table = client_table(params.caps());
        let (tx, rx) = oneshot::channel();
        let results = HookResults {
            msg: Some(capnp::message::Builder::new_default()),
            table: Vec::new(),
            done: Some(tx),
        };
        let promise = self.0.call(
            interface_id,
            method_id,
            Box::new(HookParams { params, table }),
            Box::new(results),
        );
        tokio::task::spawn_local(async move {
            // A call its caller gave up (or whose connection closed) is dropped, which
            // cancels the method, as capnp-rpc does.
            let outcome = tokio::select! {
                r = promise => r,
                _ = resp.cancelled() => return,
            };
            let results = rx.await;
            match (outcome, results) {
                (Ok(()), Ok((msg, table))) => resp.results(|mut b, _| {
                    let mut root: any_pointer::Reader<'_> = msg.get_root_as_reader()?;
                    capnp::traits::Imbue::imbue(&mut root, &table);
                    b.set_as(root)
                }),
                (Err(e), _) => resp.error(e),
                (Ok(()), Err(_)) => {
                    resp.error(Error::failed("the call's results were lost".into()))
                }
            }
        });
    }

    fn as_hook(&self) -> Option<&dyn ClientHook> {
        Some(&*self.0)
    }
}

struct HookParams {
    params: CallParams,
    table: CapTable,
}

impl ParamsHook for HookParams {
    fn get(&self) -> Result<any_pointer::Reader<'_>, Error> {
        self.params.content_with(&self.table)
    }
}

type Built = (
    capnp::message::Builder<capnp::message::HeapAllocator>,
    CapTable,
);

struct HookResults {
    msg: Option<capnp::message::Builder<capnp::message::HeapAllocator>>,
    table: CapTable,
    done: Option<oneshot::Sender<Built>>,
}

impl Drop for HookResults {
    fn drop(&mut self) {
        if let (Some(tx), Some(msg)) = (self.done.take(), self.msg.take()) {
            let _ = tx.send((msg, std::mem::take(&mut self.table)));
        }
    }
}

impl ResultsHook for HookResults {
    fn get(&mut self) -> Result<any_pointer::Builder<'_>, Error> {
        let msg = self
            .msg
            .as_mut()
            .ok_or_else(|| Error::failed("results taken".into()))?;
        let mut root: any_pointer::Builder<'_> = msg.get_root()?;
        capnp::traits::ImbueMut::imbue_mut(&mut root, &mut self.table);
        Ok(root)
    }

    fn set_pipeline(&mut self) -> Result<(), Error> {
        Ok(())
    }

    fn allow_cancellation(&self) {}

    fn tail_call(self: Box<Self>, _request: Box<dyn RequestHook>) -> CapPromise<(), Error> {
        CapPromise::err(unsupported("a tail call"))
    }

    fn direct_tail_call(
        self: Box<Self>,
        _request: Box<dyn RequestHook>,
    ) -> (CapPromise<(), Error>, Box<dyn PipelineHook>) {
        (
            CapPromise::err(unsupported("a tail call")),
            Box::new(BrokenPipeline),
        )
    }
}
