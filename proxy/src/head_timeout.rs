//! The request header timeout for HTTP/1 clients, with an answer.
//!
//! hyper's own `header_read_timeout` closes a connection without a word.
//! Here the client's side of the connection is wrapped ([`HeadTimeout`]):
//! while the connection waits for a request head (from its start, and
//! again after each response) at most `header_timeout_ms` may pass. Past
//! it, a client that has sent part of a head gets `408 Request Timeout`
//! with `fly-proxy-error: PE05` (as HAProxy answers a slow request); one
//! that sent nothing (a connection opened and left unused, or an idle
//! keep-alive one) is closed without an answer (as nginx closes idle
//! connections). Either way the wrapper then reports the end of the
//! stream, so hyper closes the connection and it costs nothing more.
//!
//! A request is in progress (no timeout) from the moment hyper hands its
//! head to the service until its response body is done: [`Busy`] counts
//! it. h2 connections (prior knowledge, or `h2` by ALPN) are left to
//! hyper's h2 keep-alive.

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What a connection's requests and its timeout share.
#[derive(Debug, Default)]
pub(crate) struct Heads {
    /// Requests between their head and the end of their response.
    busy: AtomicUsize,
    /// How the connection timed out, if it did ([`TimedOut`]).
    timed_out: AtomicU8,
    /// The connection switched protocols: no more request heads.
    upgraded: AtomicBool,
}

/// How a connection ended at the header timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimedOut {
    /// Nothing of a request had come: closed without an answer.
    Idle,
    /// Part of a head had come: answered 408.
    Answered,
}

impl Heads {
    /// Whether, and how, the connection ended at the header timeout.
    pub(crate) fn timed_out(&self) -> Option<TimedOut> {
        match self.timed_out.load(Ordering::Acquire) {
            1 => Some(TimedOut::Idle),
            2 => Some(TimedOut::Answered),
            _ => None,
        }
    }
}

/// One request in progress on a connection, until dropped.
#[derive(Debug)]
pub(crate) struct Busy(Arc<Heads>);

impl Busy {
    pub(crate) fn new(heads: &Arc<Heads>) -> Self {
        heads.busy.fetch_add(1, Ordering::AcqRel);
        Self(heads.clone())
    }
}

impl Busy {
    /// The request switched protocols (`101`): what follows on the
    /// connection is not HTTP, and has no header timeout.
    pub(crate) fn upgraded(self) {
        self.0.upgraded.store(true, Ordering::Release);
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request [`Busy`] until it is done.
pub(crate) struct Tracked<B> {
    body: B,
    _busy: Option<Busy>,
}

impl<B> Tracked<B> {
    pub(crate) fn new(body: B, busy: Option<Busy>) -> Self {
        Self { body, _busy: busy }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The proxy's answer to a request head that did not come whole in time.
const ANSWER: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 52\r\n\
server: hangar\r\n\
fly-proxy-error: PE05\r\n\
connection: close\r\n\
\r\n\
request head not received within the header timeout\n";

/// A client connection's IO with the header timeout; see the module docs.
pub(crate) struct HeadTimeout<IO> {
    io: IO,
    heads: Arc<Heads>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// The timer runs for the head being waited for.
    armed: bool,
    /// Bytes of that head have come.
    started: bool,
    /// Nothing read yet: the first bytes tell h2 prior knowledge apart.
    first: bool,
    /// h2: no timeout here.
    off: bool,
    /// Timed out: every read from now on is the end of the stream.
    ended: bool,
}

impl<IO> HeadTimeout<IO> {
    /// Wraps `io`; `h2`: the connection speaks h2 (ALPN), so there is no
    /// timeout here.
    pub(crate) fn new(io: IO, heads: Arc<Heads>, timeout: Duration, h2: bool) -> Self {
        Self {
            io,
            heads,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
            started: false,
            first: true,
            off: h2,
            ended: false,
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadTimeout<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        if this.off || this.heads.upgraded.load(Ordering::Acquire) {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if this.heads.busy.load(Ordering::Acquire) > 0 {
            // A body, or a pipelined head read while a response is out.
            this.armed = false;
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        if !this.armed {
            this.sleep.as_mut().reset(Instant::now() + this.timeout);
            (this.armed, this.started) = (true, false);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    if this.first && read.starts_with(b"PRI ") {
                        this.off = true;
                    }
                    (this.first, this.started) = (false, true);
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Out of time: answer a started head (best effort: a few hundred
        // bytes into an empty send buffer), then end the stream.
        let how = if this.started {
            let io = Pin::new(&mut this.io);
            if let Poll::Ready(Ok(_)) = io.poll_write(cx, ANSWER) {
                let _ = Pin::new(&mut this.io).poll_flush(cx);
            }
            TimedOut::Answered
        } else {
            TimedOut::Idle
        };
        let code = match how {
            TimedOut::Idle => 1,
            TimedOut::Answered => 2,
        };
        this.heads.timed_out.store(code, Ordering::Release);
        this.ended = true;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadTimeout<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_answer_declares_its_length() {
        let text = std::str::from_utf8(ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }

    async fn wrapped(
        timeout: Duration,
    ) -> (
        HeadTimeout<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<Heads>,
    ) {
        let (ours, theirs) = tokio::io::duplex(4096);
        let heads = Arc::new(Heads::default());
        (
            HeadTimeout::new(ours, heads.clone(), timeout, false),
            theirs,
            heads,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_head_gets_408_and_an_idle_connection_just_ends() {
        let (mut io, mut client, heads) = wrapped(Duration::from_secs(1)).await;
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(io.read(&mut buf).await.unwrap(), 18);
        assert_eq!(
            io.read(&mut buf).await.unwrap(),
            0,
            "end of stream at the timeout"
        );
        assert_eq!(io.read(&mut buf).await.unwrap(), 0, "and after it");
        assert_eq!(heads.timed_out(), Some(TimedOut::Answered));
        let mut answer = vec![0u8; ANSWER.len()];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, ANSWER);

        let (mut io, _client, heads) = wrapped(Duration::from_secs(1)).await;
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        assert_eq!(heads.timed_out(), Some(TimedOut::Idle));
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeout_while_a_request_is_in_progress_or_on_h2() {
        let (mut io, mut client, heads) = wrapped(Duration::from_secs(1)).await;
        let busy = Busy::new(&heads);
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let n = io.read(&mut buf).await.unwrap();
            (n, io)
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        client.write_all(b"body").await.unwrap();
        let (n, _io) = reading.await.unwrap();
        assert_eq!(n, 4, "a slow body is not a slow head");
        drop(busy);
        assert_eq!(heads.timed_out(), None);

        let (mut io, mut client, heads) = wrapped(Duration::from_secs(1)).await;
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(io.read(&mut buf).await.unwrap(), 16);
        let reading = tokio::spawn(async move { io.read(&mut buf).await.unwrap() });
        tokio::time::sleep(Duration::from_secs(5)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(reading.await.unwrap(), 1);
        assert_eq!(heads.timed_out(), None);
    }
}
