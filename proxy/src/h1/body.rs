//! Request bodies from HTTP/1 clients: [`RequestBody`] is what the request
//! path reads, [`Pump`] is the connection's side that decodes the framing
//! (`Content-Length` or chunked) from the client's bytes and passes the
//! data on, one frame at a time.
//!
//! A body that arrived whole with its head is handed over at once, with no
//! pump: that is most bodies.

use super::io::Shared;
use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Bytes read from the client at a time while pumping a body.
const READ_CHUNK: usize = 16 * 1024;
/// Longest chunk extension or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most body bytes read past once the request path has dropped the body
/// (a refused upload, an early answer), to keep the connection usable and
/// let the client read the answer (closing on unread bytes resets the
/// connection, answer and all). Past it, the connection closes.
const DISCARD_MAX: u64 = 1024 * 1024;

/// Why a request body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(pub(crate) &'static str);

impl BodyError {
    /// The client sent nothing more of the body within the body timeout.
    pub(crate) const STALLED: Self = Self("the client sent nothing more of the body in time");
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for BodyError {}

/// How a request's body is delimited (RFC 9112 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Length(u64),
    Chunked,
}

/// An HTTP/1 request's body.
#[derive(Debug)]
pub struct RequestBody(Inner);

#[derive(Debug)]
enum Inner {
    /// Whole (or empty): `None` once read.
    Full(Option<Bytes>),
    /// Arriving through the connection's [`Pump`].
    Streaming {
        frames: mpsc::Receiver<Result<Bytes, BodyError>>,
        /// Told when the body is first read (`Expect: 100-continue`).
        want: Option<oneshot::Sender<()>>,
        /// Bytes still to come, when the length is declared.
        left: Option<u64>,
        ended: bool,
    },
}

impl RequestBody {
    pub(crate) fn full(bytes: Option<Bytes>) -> Self {
        Self(Inner::Full(bytes.filter(|b| !b.is_empty())))
    }

    /// A body to be read from the connection by the returned pump;
    /// `expect` when the client waits for `100 Continue` before sending it.
    /// A client that sends nothing of it for `timeout` loses the request.
    pub(crate) fn streaming(framing: Framing, expect: bool, timeout: Duration) -> (Self, Pump) {
        let (tx, frames) = mpsc::channel(1);
        let (want, wanted) = if expect {
            let (want, wanted) = oneshot::channel();
            (Some(want), Some(wanted))
        } else {
            (None, None)
        };
        let left = match framing {
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
        };
        let decoder = match framing {
            Framing::Length(n) => Decoder::Length(n),
            Framing::Chunked => Decoder::chunked(),
        };
        let body = Self(Inner::Streaming {
            frames,
            want,
            left,
            ended: false,
        });
        let pump = Pump {
            decoder,
            tx: Some(tx),
            wanted,
            discarded: None,
            timeout,
        };
        (body, pump)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.get_mut().0 {
            Inner::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Inner::Streaming {
                frames,
                want,
                left,
                ended,
            } => {
                if let Some(want) = want.take() {
                    let _ = want.send(());
                }
                if *left == Some(0) {
                    *ended = true;
                    return Poll::Ready(None);
                }
                match frames.poll_recv(cx) {
                    Poll::Ready(Some(Ok(data))) => {
                        if let Some(left) = left {
                            *left = left.saturating_sub(data.len() as u64);
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        *ended = true;
                        Poll::Ready(Some(Err(e)))
                    }
                    Poll::Ready(None) => {
                        *ended = true;
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Full(bytes) => bytes.is_none(),
            Inner::Streaming { left, ended, .. } => *ended || *left == Some(0),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Streaming { left: Some(n), .. } => SizeHint::with_exact(*n),
            Inner::Streaming { .. } => SizeHint::default(),
        }
    }
}

/// How pumping a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pumped {
    /// Read to its end: the connection can take another request.
    Complete,
    /// The request path dropped the body unread, or the client's framing or
    /// connection broke: the connection cannot be reused.
    Cut,
}

/// The connection's side of a streaming [`RequestBody`].
pub(crate) struct Pump {
    decoder: Decoder,
    /// Dropped at the body's end, which the body then sees.
    tx: Option<mpsc::Sender<Result<Bytes, BodyError>>>,
    wanted: Option<oneshot::Receiver<()>>,
    /// Bytes read past since the body was dropped.
    discarded: Option<u64>,
    /// Longest wait for the body's next bytes.
    timeout: Duration,
}

impl Pump {
    /// Reads the body from the connection (what `buf` holds first) and
    /// passes it on; once the body is dropped, reads past the rest (up to
    /// [`DISCARD_MAX`]). Cancel-safe between frames: nothing read is lost
    /// if the future is dropped and made again.
    pub(crate) async fn run<IO>(&mut self, io: &Mutex<IO>, buf: &mut BytesMut) -> Pumped
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(wanted) = self.wanted.take() {
            // Dropped unread: the client has not sent the body, and may or
            // may not send it now.
            if wanted.await.is_err() {
                return Pumped::Cut;
            }
            // A client that sent the body anyway needs no go-ahead.
            if buf.is_empty()
                && Shared(io)
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .await
                    .is_err()
            {
                return Pumped::Cut;
            }
        }
        let Some(tx) = self.tx.clone() else {
            return Pumped::Complete;
        };
        loop {
            let permit = match self.discarded {
                Some(_) => None,
                None => tx.reserve().await.ok(),
            };
            if permit.is_none() && self.discarded.is_none() {
                self.discarded = Some(0);
            }
            match self.decoder.decode(buf) {
                Ok(Step::Data(data)) => match (permit, &mut self.discarded) {
                    (Some(permit), _) => permit.send(Ok(data)),
                    (None, Some(n)) => {
                        *n += data.len() as u64;
                        if *n > DISCARD_MAX {
                            return Pumped::Cut;
                        }
                    }
                    (None, None) => unreachable!("discarding once the body is gone"),
                },
                Ok(Step::Done) => {
                    self.tx = None;
                    return Pumped::Complete;
                }
                Ok(Step::NeedMore) => {
                    drop(permit);
                    buf.reserve(READ_CHUNK);
                    match tokio::time::timeout(self.timeout, Shared(io).read_buf(buf)).await {
                        Ok(Ok(0) | Err(_)) => {
                            let _ = tx.try_send(Err(BodyError(
                                "the client closed the connection mid-body",
                            )));
                            return Pumped::Cut;
                        }
                        Err(_) => {
                            let _ = tx.try_send(Err(BodyError::STALLED));
                            return Pumped::Cut;
                        }
                        Ok(Ok(_)) => {}
                    }
                }
                Err(e) => {
                    if let Some(permit) = permit {
                        permit.send(Err(e));
                    }
                    return Pumped::Cut;
                }
            }
        }
    }
}

/// What the decoder found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Data(Bytes),
    NeedMore,
    Done,
}

/// Where a body ends, and how far it has come.
#[derive(Debug)]
pub(crate) enum Decoder {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunked),
    /// Until the connection closes (responses only): the caller ends it.
    UntilClose,
}

/// Where a chunked body's decoder stands (RFC 9112 section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunked {
    Size { n: u64, digits: u8 },
    Extension { n: u64, len: usize },
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    Trailer { len: usize },
    TrailerLf { len: usize },
}

impl Decoder {
    pub(crate) fn chunked() -> Self {
        Self::Chunked(Chunked::Size { n: 0, digits: 0 })
    }

    /// Whether the body has ended (as far as its framing can tell).
    pub(crate) fn is_done(&self) -> bool {
        matches!(self, Self::Length(0))
    }

    /// The next piece of the body from `buf`, taking it out of `buf`.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, BodyError> {
        match self {
            Self::UntilClose if buf.is_empty() => Ok(Step::NeedMore),
            Self::UntilClose => Ok(Step::Data(buf.split().freeze())),
            Self::Length(0) => Ok(Step::Done),
            Self::Length(_) if buf.is_empty() => Ok(Step::NeedMore),
            Self::Length(left) => {
                let take = (*left).min(buf.len() as u64);
                *left -= take;
                Ok(Step::Data(buf.split_to(take as usize).freeze()))
            }
            Self::Chunked(state) => state.decode(buf),
        }
    }
}

impl Chunked {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, BodyError> {
        use Chunked::*;
        let bad = |why| Err(BodyError(why));
        loop {
            if let Data(left) = *self {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let take = left.min(buf.len() as u64);
                *self = if take == left {
                    DataCr
                } else {
                    Data(left - take)
                };
                return Ok(Step::Data(buf.split_to(take as usize).freeze()));
            }
            let Some(&b) = buf.first() else {
                return Ok(Step::NeedMore);
            };
            buf.advance(1);
            *self = match *self {
                Size { n, digits } => match (b as char).to_digit(16) {
                    Some(_) if digits >= 15 => return bad("chunk size too large"),
                    Some(d) => Size {
                        n: n * 16 + u64::from(d),
                        digits: digits + 1,
                    },
                    None if digits == 0 => return bad("malformed chunk size"),
                    None if b == b'\r' => SizeLf(n),
                    None if b == b';' || b == b' ' || b == b'\t' => Extension { n, len: 0 },
                    None => return bad("malformed chunk size"),
                },
                Extension { n, len } => match b {
                    b'\r' => SizeLf(n),
                    b'\n' => return bad("malformed chunk extension"),
                    _ if len >= MAX_LINE => return bad("chunk extension too long"),
                    _ => Extension { n, len: len + 1 },
                },
                SizeLf(n) if b == b'\n' => {
                    if n == 0 {
                        Trailer { len: 0 }
                    } else {
                        Data(n)
                    }
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Size { n: 0, digits: 0 },
                Trailer { len } => match b {
                    b'\r' => TrailerLf { len },
                    _ if len >= MAX_LINE => return bad("trailer too long"),
                    _ => Trailer { len: len + 1 },
                },
                // Trailers are read past, not passed on.
                TrailerLf { len: 0 } if b == b'\n' => return Ok(Step::Done),
                TrailerLf { .. } if b == b'\n' => Trailer { len: 0 },
                SizeLf(_) | DataCr | DataLf | TrailerLf { .. } => {
                    return bad("malformed chunked framing");
                }
                Data(_) => unreachable!("handled above"),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], split: usize) -> Result<Vec<u8>, BodyError> {
        let mut decoder = Decoder::chunked();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            match decoder.decode(&mut buf)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::Done => return Ok(out),
                Step::NeedMore if rest.is_empty() => return Err(BodyError("truncated")),
                Step::NeedMore => {
                    let n = split.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_arrive() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in [1, 2, 3, 7, 100] {
            assert_eq!(
                decode_all(body, split).unwrap(),
                b"hello, world",
                "split {split}"
            );
        }
        assert_eq!(
            decode_all(b"A\r\n0123456789\r\n0\r\n\r\n", 4).unwrap(),
            b"0123456789"
        );
    }

    #[test]
    fn broken_chunked_framing_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloXX",
            b"5\nhello\r\n",
            b"ffffffffffffffff1\r\n",
            b"\r\n",
        ] {
            assert!(
                decode_all(bad, 100).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_length_body_ends_at_its_length_and_leaves_the_rest() {
        let mut decoder = Decoder::Length(5);
        let mut buf = BytesMut::from(&b"helloGET / HTTP/1.1"[..]);
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Step::Data(Bytes::from_static(b"hello"))
        );
        assert_eq!(decoder.decode(&mut buf).unwrap(), Step::Done);
        assert_eq!(&buf[..], b"GET / HTTP/1.1");
    }
}
