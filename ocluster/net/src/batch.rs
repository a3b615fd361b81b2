//! A writer that batches: every message the RPC system writes goes into a buffer at once,
//! and one task per connection writes out whatever has gathered. capnp's write queue
//! flushes after every message, which over TLS means a record and a system call for each;
//! under load this sends many messages in one, and with nothing queued it writes
//! straight away, so an idle connection pays no delay.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use tokio::io::AsyncWriteExt;

/// Writes wait once this much is waiting to go out.
const HIGH_WATER: usize = 1 << 20;

#[derive(Default)]
struct State {
    buf: Vec<u8>,
    error: Option<(io::ErrorKind, String)>,
    closing: bool,
    closed: bool,
    /// A writer waiting for room, or a closer waiting for the end.
    waiting: Option<Waker>,
}

pub struct BatchWriter {
    state: Rc<RefCell<State>>,
    wake: Rc<tokio::sync::Notify>,
}

impl BatchWriter {
    /// Starts the task that writes to `inner`. Must run on a `LocalSet`.
    pub fn new<W>(mut inner: W) -> BatchWriter
    where
        W: tokio::io::AsyncWrite + Unpin + 'static,
    {
        let state = Rc::new(RefCell::new(State::default()));
        let wake = Rc::new(tokio::sync::Notify::new());
        let (st, notify) = (state.clone(), wake.clone());
        tokio::task::spawn_local(async move {
            loop {
                let data = {
                    let mut s = st.borrow_mut();
                    if s.buf.is_empty() {
                        if s.closing {
                            break;
                        }
                        None
                    } else {
                        if let Some(w) = s.waiting.take() {
                            w.wake();
                        }
                        Some(std::mem::take(&mut s.buf))
                    }
                };
                match data {
                    None => notify.notified().await,
                    Some(mut data) => {
                        let r = async {
                            inner.write_all(&data).await?;
                            inner.flush().await
                        }
                        .await;
                        if let Err(e) = r {
                            let mut s = st.borrow_mut();
                            s.error = Some((e.kind(), e.to_string()));
                            s.closed = true;
                            if let Some(w) = s.waiting.take() {
                                w.wake();
                            }
                            return;
                        }
                        // Keep the allocation for the next batch when it is small.
                        data.clear();
                        let mut s = st.borrow_mut();
                        if s.buf.is_empty() && data.capacity() <= HIGH_WATER {
                            s.buf = data;
                        }
                    }
                }
            }
            let _ = inner.shutdown().await;
            let mut s = st.borrow_mut();
            s.closed = true;
            if let Some(w) = s.waiting.take() {
                w.wake();
            }
        });
        BatchWriter { state, wake }
    }

    fn error(s: &State) -> Option<io::Error> {
        s.error
            .as_ref()
            .map(|(kind, msg)| io::Error::new(*kind, msg.clone()))
    }
}

impl futures::io::AsyncWrite for BatchWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.state.borrow_mut();
        if let Some(e) = Self::error(&s) {
            return Poll::Ready(Err(e));
        }
        if s.closing {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if s.buf.len() >= HIGH_WATER {
            s.waiting = Some(cx.waker().clone());
            return Poll::Pending;
        }
        s.buf.extend_from_slice(buf);
        drop(s);
        self.wake.notify_one();
        Poll::Ready(Ok(buf.len()))
    }

    /// The data is handed to the writing task; that is all a flush promises here.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Self::error(&self.state.borrow()) {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Waits until everything is written and the stream is shut down.
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.state.borrow_mut();
        if s.closed {
            return Poll::Ready(Self::error(&s).map_or(Ok(()), Err));
        }
        s.closing = true;
        s.waiting = Some(cx.waker().clone());
        drop(s);
        self.wake.notify_one();
        Poll::Pending
    }
}

impl Drop for BatchWriter {
    /// What was written still goes out, then the stream is shut down.
    fn drop(&mut self) {
        self.state.borrow_mut().closing = true;
        self.wake.notify_one();
    }
}

/// A reader that takes a peer that closes its TCP connection without TLS's close_notify
/// (a killed process) as having closed it: capnp then reports a plain disconnection, not
/// rustls's "Premature end of file" with a link to its manual.
pub struct EofReader<R>(pub R);

impl<R: futures::io::AsyncRead + Unpin> futures::io::AsyncRead for EofReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(0)),
            other => other,
        }
    }
}
