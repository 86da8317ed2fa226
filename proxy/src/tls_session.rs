//! A client's TLS session on rustls's unbuffered API ([`TlsSession`]):
//! buffers only while bytes are in flight, as nginx's are.
//!
//! rustls's buffered connection (what tokio-rustls drives) keeps a 4 KiB
//! read buffer for the connection's whole life; with ten thousand idle
//! clients that is 40 MB holding nothing. Here the session owns its
//! buffers: ciphertext read comes into one of the worker's spare buffers
//! ([`spare`]) and goes back as soon as rustls has taken every whole
//! record, ciphertext to send goes back once written, and decrypted bytes
//! are kept only when the reader had no room for them. An idle session
//! holds the TCP stream and rustls's state, nothing else.

use crate::h1::io::ClientIo;
use crate::h1::spare;
use bytes::{Buf, BytesMut};
use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The largest TLS record's plaintext, and the most a vectored write
/// gathers.
const RECORD: usize = 16 * 1024;

/// Plaintext taken per write at most, so a large write does not become
/// ciphertext all at once before any of it is sent.
const MAX_WRITE: usize = 4 * RECORD;

/// Ciphertext held unprocessed at most: rustls joins a handshake message
/// (at most 64 KiB) from the records it came in, in this buffer.
const MAX_INCOMING: usize = 64 * 1024 + 2 * RECORD;

/// What rustls is ready for once it has taken every whole record read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Open {
    /// It needs more bytes from the client to finish the handshake.
    Handshaking,
    /// Application data flows.
    Traffic,
    /// Both sides sent close_notify.
    Closed,
}

/// What to encrypt once rustls lets application data through.
#[derive(Clone, Copy)]
enum Encrypt<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// A server-side TLS session over a client's TCP connection.
pub(crate) struct TlsSession {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet taken by rustls: between calls, at most
    /// a partial record (or, in the handshake, a partial message). Given
    /// back whenever it is empty.
    incoming: BytesMut,
    /// Ciphertext made and not yet written; given back once written.
    outgoing: BytesMut,
    /// Plaintext a read had no room for.
    plain: BytesMut,
    /// The client closed its side of the TCP connection.
    eof: bool,
    /// The client sent close_notify: no more data comes.
    peer_closed: bool,
    close_notify_sent: bool,
}

/// A session as its connection holds it: boxed, as it is over a KiB and
/// moves from the handshake to what serves it.
pub(crate) type Tls = Box<TlsSession>;

impl ClientIo for Tls {
    /// Ready once a read would not wait: at once while plaintext is kept
    /// or the client has closed (a read then ends the stream, even if the
    /// client keeps its socket open after close_notify), else once the
    /// socket has bytes. (rustls has taken every whole record after each
    /// call, so bytes read and kept are never enough.) An idle TLS
    /// connection too waits without a buffer of ours or of rustls's.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.plain.is_empty() && !self.peer_closed && !self.eof {
            self.tcp.poll_read_ready(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

/// Runs the server side of a TLS handshake on `tcp`.
pub(crate) async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<Tls> {
    let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut session = Box::new(TlsSession {
        tcp,
        conn,
        incoming: BytesMut::new(),
        outgoing: BytesMut::new(),
        plain: BytesMut::new(),
        eof: false,
        peer_closed: false,
        close_notify_sent: false,
    });
    poll_fn(|cx| session.poll_handshake(cx)).await?;
    Ok(session)
}

impl TlsSession {
    /// The protocol agreed by ALPN.
    pub(crate) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let open = self.process(None, Encrypt::Nothing)?;
            ready!(self.poll_write_out(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if open == Open::Closed || self.eof || self.peer_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection during the handshake",
                )));
            }
            ready!(self.poll_fill(cx))?;
        }
    }

    /// Hands rustls every whole record read, until it needs more bytes or
    /// both sides closed: decrypted bytes go to `to` while it has room
    /// (and nothing is kept before them), else to `plain`; what rustls has
    /// to send, and `send` once it may be sent, to `outgoing`.
    fn process(
        &mut self,
        mut to: Option<&mut ReadBuf<'_>>,
        mut send: Encrypt<'_>,
    ) -> io::Result<Open> {
        let result = loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let state = match state {
                Ok(state) => state,
                Err(e) => break Err(e),
            };
            let done = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(invalid)?;
                        discard += record.discard;
                        deliver(record.payload, to.as_deref_mut(), &mut self.plain);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut message) => {
                    write_into(&mut self.outgoing, 2 * 1024, |out| {
                        message.encode(out).map_err(encode_room)
                    })?;
                    None
                }
                // What was encoded is in `outgoing`, which the caller writes.
                ConnectionState::TransmitTlsData(sent) => {
                    sent.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Open::Closed),
                ConnectionState::BlockedHandshake => Some(Open::Handshaking),
                ConnectionState::WriteTraffic(mut traffic) => {
                    match std::mem::replace(&mut send, Encrypt::Nothing) {
                        Encrypt::Nothing => {}
                        Encrypt::Data(data) => {
                            let room = data.len() + 64 * data.len().div_ceil(RECORD);
                            write_into(&mut self.outgoing, room, |out| {
                                traffic.encrypt(data, out).map_err(encrypt_room)
                            })?;
                        }
                        Encrypt::CloseNotify => {
                            write_into(&mut self.outgoing, 64, |out| {
                                traffic.queue_close_notify(out).map_err(encrypt_room)
                            })?;
                        }
                    }
                    Some(Open::Traffic)
                }
                // This server accepts no early data (rustls's default).
                ConnectionState::ReadEarlyData(_) => {
                    return Err(invalid("early data, which this server does not accept"));
                }
                other => return Err(io::Error::other(format!("unexpected TLS state {other:?}"))),
            };
            self.incoming.advance(discard);
            if let Some(open) = done {
                break Ok(open);
            }
        };
        let open = match result {
            Ok(open) => open,
            Err(e) => {
                self.send_alert();
                return Err(invalid(e));
            }
        };
        if self.incoming.is_empty() {
            spare::give(std::mem::take(&mut self.incoming));
        }
        // Still handshaking while rustls lets 0.5-RTT data through.
        if open == Open::Traffic && self.conn.is_handshaking() {
            return Ok(Open::Handshaking);
        }
        Ok(open)
    }

    /// After an error, the alert rustls queued for the client, if the
    /// socket takes it now: the connection is over either way. Only while
    /// something is queued: with nothing queued rustls would take the
    /// bytes it failed on again (and fail again).
    fn send_alert(&mut self) {
        while self.conn.wants_write() {
            let Ok(ConnectionState::EncodeTlsData(mut message)) =
                self.conn.process_tls_records(&mut self.incoming).state
            else {
                break;
            };
            let encoded = write_into(&mut self.outgoing, 64, |out| {
                message.encode(out).map_err(encode_room)
            });
            if encoded.is_err() {
                break;
            }
        }
        let _ = self.tcp.try_write(&self.outgoing);
    }

    /// Reads more ciphertext, taking a buffer only once the socket is
    /// readable and giving it back if nothing came.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.incoming.capacity() == 0 {
            ready!(self.tcp.poll_read_ready(cx))?;
            self.incoming = spare::take();
        }
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(invalid("a TLS message larger than any allowed")));
        }
        self.incoming.reserve(spare::CHUNK / 2);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.tcp), cx, &mut self.incoming) {
            Poll::Ready(Ok(0)) => self.eof = true,
            Poll::Ready(Ok(_)) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.incoming.is_empty() {
                    spare::give(std::mem::take(&mut self.incoming));
                }
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what is in `outgoing`, and gives the buffer back once empty.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.advance(n);
        }
        if self.outgoing.capacity() > 0 {
            spare::give(std::mem::take(&mut self.outgoing));
        }
        Poll::Ready(Ok(()))
    }
}

/// `payload` to `to` if it has room and nothing kept comes first, the
/// rest to `plain`.
fn deliver(payload: &[u8], to: Option<&mut ReadBuf<'_>>, plain: &mut BytesMut) {
    let n = match to {
        Some(to) if plain.is_empty() => {
            let n = payload.len().min(to.remaining());
            to.put_slice(&payload[..n]);
            n
        }
        _ => 0,
    };
    plain.extend_from_slice(&payload[n..]);
}

/// Appends to `buf` what `write` puts in the room it is given, starting
/// with `room` bytes and growing to what rustls says it needs (`Some`).
fn write_into(
    buf: &mut BytesMut,
    mut room: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    if buf.capacity() == 0 {
        *buf = spare::take();
    }
    let at = buf.len();
    loop {
        buf.resize(at + room, 0);
        match write(&mut buf[at..]) {
            Ok(n) => {
                buf.truncate(at + n);
                return Ok(());
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => {
                buf.truncate(at);
                return Err(io::Error::other("rustls could not encode a TLS record"));
            }
        }
    }
}

/// The room an encoding needs (`None`: it was encoded already).
fn encode_room(e: EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(size) => Some(size.required_size),
        EncodeError::AlreadyEncoded => None,
    }
}

/// The room an encryption needs (`None`: the keys are used up).
fn encrypt_room(e: EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(size) => Some(size.required_size),
        EncryptError::EncryptExhausted => None,
    }
}

fn invalid(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

thread_local! {
    /// Where a vectored write's slices are gathered into one record.
    static GATHER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl AsyncRead for TlsSession {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.plain[..n]);
                this.plain.advance(n);
                if this.plain.is_empty() {
                    this.plain = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            let open = this.process(Some(buf), Encrypt::Nothing)?;
            // What rustls made (a key update, tickets) goes out; a read
            // does not wait for the socket to take it.
            if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                return Poll::Ready(Err(e));
            }
            if buf.filled().len() > before || open == Open::Closed || this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Many clients close without close_notify: that is the end
                // unless it cut a record short.
                return Poll::Ready(if this.incoming.is_empty() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection mid-record",
                    ))
                });
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl AsyncWrite for TlsSession {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // What was made before goes first: the client takes bytes no
        // faster than this.
        ready!(this.poll_write_out(cx))?;
        let data = &data[..data.len().min(MAX_WRITE)];
        match this.process(None, Encrypt::Data(data))? {
            Open::Traffic => {}
            Open::Handshaking => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
            Open::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
        // Sent now if the socket takes it, else by the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    /// Slices (a response's head and body) are gathered into records:
    /// one encryption and one record's overhead instead of one per slice.
    /// A slice of a record or more goes as it is.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut slices = bufs.iter().filter(|b| !b.is_empty()).peekable();
        let first = slices.next().map_or(&[][..], |b| &b[..]);
        if first.len() >= RECORD || slices.peek().is_none() {
            return self.poll_write(cx, first);
        }
        GATHER.with(|gather| {
            let mut gather = gather.borrow_mut();
            gather.clear();
            gather.extend_from_slice(first);
            for b in slices {
                let room = RECORD - gather.len();
                gather.extend_from_slice(&b[..b.len().min(room)]);
                if gather.len() == RECORD {
                    break;
                }
            }
            self.poll_write(cx, &gather)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_write_out(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_sent {
            this.close_notify_sent = true;
            this.process(None, Encrypt::CloseNotify)?;
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::client::TlsStream;

    /// A server config with a new self-signed certificate (ALPN h2 then
    /// http/1.1), and a client config that trusts it and offers `alpn`.
    fn configs(alpn: &[&[u8]]) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        (Arc::new(server), Arc::new(client))
    }

    /// A session and a tokio-rustls client at the other end, over loopback.
    async fn pair(alpn: &[&[u8]]) -> (Box<TlsSession>, TlsStream<TcpStream>) {
        let (server, client) = configs(alpn);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(client)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        };
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            accept(server, tcp).await.unwrap()
        };
        let (client, session) = tokio::join!(connect, accept);
        (session, client)
    }

    fn holds_nothing(session: &TlsSession) -> bool {
        session.incoming.capacity() == 0
            && session.outgoing.capacity() == 0
            && session.plain.capacity() == 0
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_whole_and_idle_sessions_hold_no_buffers() {
        let (mut session, mut client) = pair(&[b"http/1.1"]).await;
        assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
        // Tickets the server sent after the handshake are read by the
        // client's first read; nothing of ours waits.
        assert!(holds_nothing(&session));

        // Many records, read through a buffer smaller than one.
        let sent = pattern(200_000);
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                client.write_all(&sent).await.unwrap();
                client.flush().await.unwrap();
                client
            })
        };
        let mut got = vec![0; sent.len()];
        let mut at = 0;
        while at < got.len() {
            let end = (at + 1000).min(got.len());
            let n = session.read(&mut got[at..end]).await.unwrap();
            assert!(n > 0, "the stream ended after {at} bytes");
            at += n;
        }
        assert!(got == sent, "the bytes read are the bytes written");
        let mut client = writer.await.unwrap();
        assert!(holds_nothing(&session), "everything read: no buffer kept");

        // Large writes, and small slices gathered into one record.
        let reply = pattern(150_000);
        let large = pattern(20_000);
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 150_000 + 11 + 5 + 20_000];
            client.read_exact(&mut got).await.unwrap();
            (client, got)
        });
        session.write_all(&reply).await.unwrap();
        let slices = [io::IoSlice::new(b"head "), io::IoSlice::new(b"body!!")];
        assert_eq!(session.write_vectored(&slices).await.unwrap(), 11);
        // Gathered up to a record; the rest is the caller's to write.
        let slices = [io::IoSlice::new(b"head "), io::IoSlice::new(&large)];
        assert_eq!(session.write_vectored(&slices).await.unwrap(), RECORD);
        session.write_all(&large[RECORD - 5..]).await.unwrap();
        session.flush().await.unwrap();
        let (mut client, got) = reader.await.unwrap();
        assert!(got[..150_000] == reply[..]);
        assert_eq!(&got[150_000..150_016], b"head body!!head ");
        assert!(got[150_016..] == large[..]);
        assert!(
            holds_nothing(&session),
            "everything written: no buffer kept"
        );

        // close_notify each way: the end of the stream, cleanly.
        client.shutdown().await.unwrap();
        assert_eq!(session.read(&mut [0; 16]).await.unwrap(), 0);
        session.shutdown().await.unwrap();
        assert_eq!(client.read(&mut [0; 16]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_while_the_socket_stays_open() {
        let (mut session, mut client) = pair(&[]).await;
        client.write_all(b"last").await.unwrap();
        client.get_mut().1.send_close_notify();
        client.flush().await.unwrap();
        // Both records (26 and 24 bytes in TLS 1.3) wait in the socket, so
        // one read takes the data and the close_notify.
        let mut peeked = [0; 64];
        let arrived = async {
            while session.tcp.peek(&mut peeked).await.unwrap() < 50 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), arrived)
            .await
            .expect("both records");
        let mut got = [0; 16];
        let n = session.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"last");
        // The client's socket is still open: readiness must not wait for
        // bytes that will not come.
        let ready = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            poll_fn(|cx| session.poll_readable(cx)),
        );
        ready.await.expect("readable after close_notify").unwrap();
        assert_eq!(session.read(&mut got).await.unwrap(), 0);
        drop(client);
    }

    /// The session buffers what the client sends until rustls has a whole
    /// message: a handshake message that never ends must be refused, not
    /// read forever.
    #[tokio::test]
    async fn an_endless_handshake_message_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        // A ClientHello declared 16 MiB long, then full records of it for
        // as long as the socket takes them.
        tokio::spawn(async move {
            let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
            record.resize(5 + RECORD, 0x41);
            while client.write_all(&record).await.is_ok() {
                record.splice(5.., vec![0x41; RECORD]);
            }
        });
        let refused = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            accept(configs(&[]).0, tcp),
        )
        .await
        .expect("refused, not read forever");
        let e = refused.err().expect("no session");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }

    #[tokio::test]
    async fn alpn_agrees_on_h2() {
        let (session, _client) = pair(&[b"h2"]).await;
        assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn a_client_that_does_not_speak_tls_is_refused_with_an_alert() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let e = accept(configs(&[]).0, tcp)
            .await
            .err()
            .expect("a refused handshake");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer.first(), Some(&0x15), "an alert record: {answer:?}");
    }

    #[tokio::test]
    async fn a_client_gone_mid_handshake_or_mid_record_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        drop(client);
        let e = accept(configs(&[]).0, tcp).await.err().expect("no session");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");

        let (mut session, mut client) = pair(&[]).await;
        let tcp = client.get_mut().0;
        tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x40, 1, 2, 3])
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
        let e = session.read(&mut [0; 16]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
