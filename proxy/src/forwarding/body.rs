//! Bodies at both hops: [`ClientBody`] for every request a client sends,
//! [`ProxyBody`] for every response the proxy sends (a machine's response
//! streamed through, or a short text the proxy wrote itself), and
//! [`UpBody`] for every request it sends to a machine.

use crate::forwarding::upstream::MachineBody;
use crate::h1::body::{BodyError, RequestBody};
use crate::metrics::InFlight;
use crate::routing::balance::Lease;
use bytes::Bytes;
use http::Request;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// An error of a body's stream, whichever kind of body.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body from a client: read by the proxy's HTTP/1 server
/// (`Left`), or by hyper's h2 one (`Right`).
pub(crate) type ClientBody = http_body_util::Either<RequestBody, Incoming>;

/// A response body. Not boxed: the proxy has exactly two kinds.
#[derive(Debug)]
pub struct ProxyBody(Kind);

#[derive(Debug)]
enum Kind {
    /// Text from the proxy; `None` once sent.
    Local(Option<Bytes>),
    /// A machine's body (which holds its connection, see
    /// [`crate::forwarding::upstream`]). `held` keeps the request counted as in flight
    /// (its machine lease and the in-flight gauge) until the body ends or
    /// the client goes away, whichever comes first.
    Upstream {
        body: MachineBody,
        held: Option<Held>,
    },
}

/// What a forwarded request keeps counted until its response body is over.
/// Only dropping it matters.
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) _lease: Option<Lease>,
    pub(crate) _in_flight: Option<InFlight>,
}

impl ProxyBody {
    /// A complete body written by the proxy.
    pub fn local(text: impl Into<Bytes>) -> Self {
        Self(Kind::Local(Some(text.into())))
    }

    /// A machine's body, streamed through. `held` is dropped when the body
    /// ends, fails, or is dropped unfinished.
    pub(crate) fn upstream(body: MachineBody, held: Held) -> Self {
        Self(Kind::Upstream {
            body,
            held: Some(held),
        })
    }

    /// No body at all (a `101`, for one).
    pub fn empty() -> Self {
        Self(Kind::Local(None))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Both variants are Unpin, so no pin projection.
        match &mut self.get_mut().0 {
            Kind::Local(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            Kind::Upstream { body, held } => {
                let polled = Pin::new(&mut *body).poll_frame(cx);
                // Let go as soon as the exchange is over, not when the
                // body gets dropped.
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

/// A request body on its way to a machine.
#[derive(Debug)]
pub(crate) enum UpBody {
    /// Read whole before sending (or empty), so the request can be sent
    /// again; `None` once sent.
    Buffered(Option<Bytes>),
    /// Too large to keep: what was read already, then the rest as it
    /// arrives from the client.
    Streaming {
        prefix: Option<Bytes>,
        rest: ClientBody,
    },
}

impl UpBody {
    /// A copy to send again, for a buffered body.
    pub(crate) fn replay(&self) -> Option<Self> {
        match self {
            Self::Buffered(bytes) => Some(Self::Buffered(bytes.clone())),
            Self::Streaming { .. } => None,
        }
    }
}

/// A copy of a request whose body was read whole, to send again.
pub(crate) fn copy(req: &Request<UpBody>) -> Option<Request<UpBody>> {
    let mut copy = Request::new(req.body().replay()?);
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// Why a request body could not be read for the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadBody {
    /// Larger than the proxy accepts.
    TooLarge { limit: u64 },
    /// The client's stream failed.
    Failed(String),
    /// The client sent nothing more of it within the body timeout.
    Stalled,
}

/// The request body bytes every request together may hold in memory while
/// read whole (`proxy.max_buffered_body_bytes`), so slow or large uploads
/// cannot take the proxy's memory: past it, bodies are streamed.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    left: std::sync::atomic::AtomicU64,
}

/// What one request holds of the [`BodyBudget`]; given back on drop.
#[derive(Debug)]
pub(crate) struct BodyShare<'a> {
    budget: &'a BodyBudget,
    held: u64,
}

impl BodyBudget {
    pub(crate) fn new(bytes: u64) -> Self {
        Self { left: bytes.into() }
    }

    /// An empty share, to grow as a body is read.
    pub(crate) fn share(&self) -> BodyShare<'_> {
        BodyShare {
            budget: self,
            held: 0,
        }
    }
}

impl BodyShare<'_> {
    /// Takes `n` more bytes of the budget, if it has them.
    fn grow(&mut self, n: u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let taken = self
            .budget
            .left
            .fetch_update(Relaxed, Relaxed, |left| left.checked_sub(n))
            .is_ok();
        if taken {
            self.held += n;
        }
        taken
    }
}

impl Drop for BodyShare<'_> {
    fn drop(&mut self) {
        self.budget
            .left
            .fetch_add(self.held, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads a request body for the machine: whole when it is at most `keep`
/// bytes and `share` can grow to hold it (so the request can be retried or
/// replayed), else what was read and the rest streamed. A body over `max`
/// bytes (0: no limit) is refused before anything is sent when its length
/// is declared or it ends within `keep`; a longer undeclared one is cut
/// mid-stream.
pub(crate) async fn read_body(
    mut body: ClientBody,
    keep: u64,
    max: u64,
    share: &mut BodyShare<'_>,
) -> Result<UpBody, ReadBody> {
    use http_body_util::BodyExt;
    let over = |n: u64| max > 0 && n > max;
    let declared = body.size_hint().exact();
    if let Some(n) = declared
        && over(n)
    {
        return Err(ReadBody::TooLarge { limit: max });
    }
    if body.is_end_stream() {
        return Ok(UpBody::Buffered(None));
    }
    if declared.is_some_and(|n| n > keep) {
        return Ok(UpBody::Streaming {
            prefix: None,
            rest: body,
        });
    }
    let mut read = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match e.downcast_ref::<BodyError>() {
            Some(stalled) if *stalled == BodyError::STALLED => ReadBody::Stalled,
            _ => ReadBody::Failed(e.to_string()),
        })?;
        // Trailers are dropped: HTTP/1.1 machines rarely take them.
        let mut kept = true;
        if let Ok(data) = frame.into_data() {
            // A frame the budget cannot hold is kept all the same, as the
            // streamed body's first bytes: the budget is passed by one
            // frame (16 KiB from HTTP/1) at most per request.
            kept = share.grow(data.len() as u64);
            read.extend_from_slice(&data);
        }
        let n = read.len() as u64;
        if over(n) {
            return Err(ReadBody::TooLarge { limit: max });
        }
        if n > keep || !kept {
            return Ok(UpBody::Streaming {
                prefix: Some(read.freeze()),
                rest: body,
            });
        }
    }
    Ok(UpBody::Buffered(Some(read.freeze())))
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Streaming { prefix, rest } => match prefix.take() {
                Some(read) => Poll::Ready(Some(Ok(Frame::data(read)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Buffered(bytes) => bytes.is_none(),
            Self::Streaming { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Streaming { prefix, rest } => {
                let read = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let left = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(left.lower() + read);
                if let Some(upper) = left.upper() {
                    hint.set_upper(upper + read);
                }
                hint
            }
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

    #[tokio::test]
    async fn bodies_are_read_whole_only_within_the_shared_budget() {
        use crate::h1::body::RequestBody;
        let body =
            || ClientBody::Left(RequestBody::full(Some(Bytes::from_static(b"hello world!"))));
        let budget = BodyBudget::new(20);
        let mut first = budget.share();
        let read = read_body(body(), 1024, 0, &mut first).await.unwrap();
        assert!(matches!(read, UpBody::Buffered(Some(_))));
        // 8 bytes left: the next body is streamed, and holds nothing.
        let mut second = budget.share();
        let read = read_body(body(), 1024, 0, &mut second).await.unwrap();
        assert!(matches!(
            read,
            UpBody::Streaming {
                prefix: Some(_),
                ..
            }
        ));
        assert_eq!(second.held, 0);
        drop((first, second));
        let mut third = budget.share();
        let read = read_body(body(), 1024, 0, &mut third).await.unwrap();
        assert!(matches!(read, UpBody::Buffered(Some(_))), "given back");
    }
}
