//! The client's connection as the HTTP/1 server sees it: shared between the
//! request-body pump and the response writer ([`Shared`]), and handed over
//! whole, with what was read ahead, when it switches protocols
//! ([`Upgraded`]).

use bytes::{Buf, Bytes};
use parking_lot::Mutex;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// A client connection: plain TCP, or TLS ([`crate::tls_session::Tls`]).
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready once there may be bytes to read, without reading them, so an
    /// idle connection can wait without a read buffer. Connections that
    /// cannot tell are always ready.
    fn poll_readable(&self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl ClientIo for TcpStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

/// In-memory connections, for tests on paused time.
#[cfg(test)]
impl ClientIo for tokio::io::DuplexStream {}

/// Any connection, boxed: what an upgrade hands over.
pub(crate) trait AnyIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AnyIo for T {}

/// One connection used by two futures of the same task at once (the
/// request-body pump reads while the response writer writes). The lock is
/// only held inside a poll, never across an await, so it is never
/// contended: both futures run on the connection's one task.
pub(crate) struct Shared<'a, IO>(pub(crate) &'a Mutex<IO>);

impl<IO: AsyncRead + Unpin> AsyncRead for Shared<'_, IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.lock()).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Shared<'_, IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.lock()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.lock()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.lock().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.lock()).poll_shutdown(cx)
    }
}

/// A connection after it switched protocols (or turned out to speak h2):
/// the bytes already read from it come first, then the connection itself.
pub(crate) struct Upgraded {
    read: Bytes,
    io: Box<dyn AnyIo>,
}

impl Upgraded {
    pub(crate) fn new(io: Box<dyn AnyIo>, read: Bytes) -> Self {
        Self { read, io }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The client's side of a connection that is to switch protocols, once
/// the answer (`101`, or `200` to h2's extended CONNECT) has gone out: in
/// the extensions of every HTTP/1.1 request that asks for an upgrade, and
/// made from hyper's for h2.
pub(crate) enum OnUpgrade {
    H1(Handover),
    Hyper(hyper::upgrade::OnUpgrade),
}

/// Where the HTTP/1 server hands the connection over; in a request's
/// extensions, which must be `Clone`, hence the shared slot.
#[derive(Clone)]
pub(crate) struct Handover(std::sync::Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl Handover {
    pub(crate) fn new() -> (oneshot::Sender<Upgraded>, Self) {
        let (give, take) = oneshot::channel();
        (give, Self(std::sync::Arc::new(Mutex::new(Some(take)))))
    }
}

impl OnUpgrade {
    /// The connection, once handed over.
    pub(crate) async fn io(self) -> Result<Box<dyn AnyIo>, String> {
        match self {
            Self::H1(handover) => {
                let handed = handover.0.lock().take();
                match handed {
                    Some(handed) => match handed.await {
                        Ok(io) => Ok(Box::new(io)),
                        Err(_) => Err("the client connection closed before switching".into()),
                    },
                    None => Err("the connection was handed over already".into()),
                }
            }
            Self::Hyper(on) => match on.await {
                Ok(io) => Ok(Box::new(hyper_util::rt::TokioIo::new(io))),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}
