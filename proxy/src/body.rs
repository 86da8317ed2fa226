//! Bodies at both hops: [`ProxyBody`] for every response the proxy sends
//! (a machine's response streamed through, or a short text the proxy wrote
//! itself), and [`UpBody`] for every request it sends to a machine.

use crate::balance::Lease;
use crate::metrics::InFlight;
use crate::upstream::Conn;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// A response body. Not boxed: the proxy has exactly two kinds.
#[derive(Debug)]
pub struct ProxyBody(Kind);

#[derive(Debug)]
enum Kind {
    /// Text from the proxy; `None` once sent.
    Local(Option<Bytes>),
    /// A machine's body. `held` keeps the request counted as in flight (its
    /// machine lease and the in-flight gauge) until the body ends or the
    /// client goes away, whichever comes first.
    ///
    /// `conn` is the connection the body arrives on, when this task drives
    /// it: polling the body polls it too, and it goes back to the pool once
    /// the body has ended.
    Upstream {
        body: Incoming,
        held: Option<Held>,
        conn: Option<Box<Conn>>,
    },
}

/// What a forwarded request keeps counted until its response body is over.
/// Only dropping it matters.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) _lease: Lease,
    pub(crate) _in_flight: Option<InFlight>,
}

impl ProxyBody {
    /// A complete body written by the proxy.
    pub fn local(text: impl Into<Bytes>) -> Self {
        Self(Kind::Local(Some(text.into())))
    }

    /// A machine's body, streamed through. `held` is dropped when the body
    /// ends, fails, or is dropped unfinished.
    pub(crate) fn upstream(body: Incoming, held: Held, conn: Option<Box<Conn>>) -> Self {
        Self(Kind::Upstream {
            body,
            held: Some(held),
            conn,
        })
    }

    /// No body at all (a `101`, for one).
    pub fn empty() -> Self {
        Self(Kind::Local(None))
    }
}

impl Drop for ProxyBody {
    /// A body that ended without being polled to its end (hyper does not
    /// poll an empty one) still returns its connection.
    fn drop(&mut self) {
        if let Kind::Upstream { body, conn, .. } = &mut self.0
            && body.is_end_stream()
            && let Some(conn) = conn.take()
        {
            conn.release();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Both variants are Unpin (`Incoming` is), so no pin projection.
        match &mut self.get_mut().0 {
            Kind::Local(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            Kind::Upstream { body, held, conn } => {
                // The connection moves the body's bytes; it is this task's
                // to drive (see `upstream`).
                if let Some(c) = conn {
                    let _ = c.poll_drive(cx);
                }
                let polled = Pin::new(&mut *body).poll_frame(cx);
                // Release as soon as the exchange is over, not when hyper
                // gets around to dropping the body.
                let (over, complete) = match &polled {
                    Poll::Ready(None) => (true, true),
                    Poll::Ready(Some(Err(_))) => (true, false),
                    Poll::Ready(Some(Ok(_))) => (body.is_end_stream(), body.is_end_stream()),
                    Poll::Pending => (false, false),
                };
                if over {
                    held.take();
                    // A broken exchange closes its connection.
                    let conn = conn.take();
                    if complete && let Some(conn) = conn {
                        conn.release();
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Local(text) => text.is_none(),
            Kind::Upstream { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Local(text) => SizeHint::with_exact(text.as_ref().map_or(0, |t| t.len() as u64)),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

/// A request body on its way to a machine.
#[derive(Debug)]
pub(crate) enum UpBody {
    /// Read whole before sending (or empty); `None` once sent.
    Buffered(Option<Bytes>),
    /// Streamed from the client as it arrives.
    Streaming(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Streaming(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Buffered(bytes) => bytes.is_none(),
            Self::Streaming(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Streaming(body) => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn local_body_is_sent_once_with_its_length() {
        let body = ProxyBody::local("app \"x\" not found\n");
        assert_eq!(body.size_hint().exact(), Some(18));
        assert!(!body.is_end_stream());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"app \"x\" not found\n");
    }
}
