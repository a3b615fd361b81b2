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
    let dir = std::env::var_os("OCLUSTER_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/reference/ocluster-golden")
        })
        .join("plain");
    if dir.join("key.pem").exists() {
        return Some(dir);
    }
    if std::env::var_os("OBUILDER_TEST_STRICT").is_some() {
        panic!("golden files missing at {}", dir.display());
    }
    eprintln!("skipped: no golden files at {}", dir.display());
    None
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
