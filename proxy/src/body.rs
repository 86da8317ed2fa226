//! The body of every response the proxy sends: either a machine's response
//! streamed through, or a short text the proxy wrote itself.

use crate::balance::Lease;
use crate::metrics::InFlight;
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
    Upstream { body: Incoming, held: Option<Held> },
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
    pub(crate) fn upstream(body: Incoming, held: Held) -> Self {
        Self(Kind::Upstream {
            body,
            held: Some(held),
        })
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
            Kind::Upstream { body, held } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                // Release as soon as the exchange is over, not when hyper
                // gets around to dropping the body.
                let over = match &polled {
                    Poll::Ready(None | Some(Err(_))) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    Poll::Pending => false,
                };
                if over {
                    held.take();
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
