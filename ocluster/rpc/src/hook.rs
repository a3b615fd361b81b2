//! Capabilities inside a message. capnp's generated code reads and writes capability
//! pointers through a table of `ClientHook`s; here each hook only stands for an index
//! into the capability list that goes with the message (a [`crate::Call`]'s, a
//! [`crate::Response`]'s, or a [`crate::CapsOut`] being built), so no RPC state hides in
//! the generated code. A hook is recognised by its brand, and its index is its `get_ptr`.

use capnp::capability::{Promise, Request};
use capnp::private::capability::{ClientHook, ParamsHook, ResultsHook};
use capnp::{any_pointer, Error, MessageSize};

/// The brand of the hooks of this crate (the address of a static of its own).
static BRAND: u8 = 0;

fn brand() -> usize {
    &BRAND as *const u8 as usize
}

/// A hook standing for capability `index` of its message's list.
pub struct CapHook {
    pub index: usize,
}

/// The index a hook of this crate stands for, or None for any other hook.
pub fn cap_index(hook: &dyn ClientHook) -> Option<usize> {
    (hook.get_brand() == brand()).then(|| hook.get_ptr())
}

/// A capability table whose entry `i` stands for capability `i`.
pub(crate) fn table(n: usize) -> Vec<Option<Box<dyn ClientHook>>> {
    (0..n)
        .map(|index| Some(Box::new(CapHook { index }) as Box<dyn ClientHook>))
        .collect()
}

fn not_callable() -> Error {
    Error::failed("a capability read from a message is called through ocluster-rpc's Cap".into())
}

impl ClientHook for CapHook {
    fn add_ref(&self) -> Box<dyn ClientHook> {
        Box::new(CapHook { index: self.index })
    }

    /// A request that fails when sent.
    fn new_call(
        &self,
        interface_id: u64,
        method_id: u16,
        size_hint: Option<MessageSize>,
    ) -> Request<any_pointer::Owned, any_pointer::Owned> {
        crate::CapClient::new(crate::Cap::broken(not_callable())).new_call(
            interface_id,
            method_id,
            size_hint,
        )
    }

    fn call(
        &self,
        _interface_id: u64,
        _method_id: u16,
        _params: Box<dyn ParamsHook>,
        _results: Box<dyn ResultsHook>,
    ) -> Promise<(), Error> {
        Promise::err(not_callable())
    }

    fn get_brand(&self) -> usize {
        brand()
    }

    fn get_ptr(&self) -> usize {
        self.index
    }

    fn get_resolved(&self) -> Option<Box<dyn ClientHook>> {
        None
    }

    fn when_more_resolved(&self) -> Option<Promise<Box<dyn ClientHook>, Error>> {
        None
    }

    fn when_resolved(&self) -> Promise<(), Error> {
        Promise::ok(())
    }
}
