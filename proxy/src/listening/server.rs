//! The proxy's HTTP/1.1 server for client connections.
//!
//! hyper's server keeps an 8 KiB read buffer and an 8 KiB write buffer for
//! every connection from its start to its end, idle or not, and hands each
//! request across its dispatcher's machinery. An edge holds many idle
//! keep-alive connections and does little per request, so here, as in
//! nginx: a connection waiting for its next request holds no buffer at all
//! (plain TCP waits for readability first); a request head is read into a
//! small buffer that its header values then share ([`head::parse`]); the
//! response head is written with the first body bytes in one write; and
//! everything runs in the connection's one task.
//!
//! One request at a time, in order (pipelined requests wait in the
//! buffer). While the request path works, the connection pumps the request
//! body to it ([`body::Pump`]), and keeps pumping while the response goes
//! out. The connection stays open when both sides allow it and the request
//! body was read to its end.
//!
//! Also here: the header timeout (a client that started a head and did not
//! finish it in time is answered `408` with `PE05`, as HAProxy does; one
//! that sent nothing is closed without a word, as nginx does), refusals of
//! malformed (`400`, `PE06`) and oversized heads (`431`, `PE07`), h2 with
//! prior knowledge (handed back to the caller), upgrades (the connection
//! goes to whoever takes [`io::OnUpgrade`] from the request), graceful
//! shutdown (idle connections close, busy ones after their response), and
//! lingering close (a connection closed while its client may still be
//! sending reads on until it is done, so the client is not reset before it
//! reads its answer).

use crate::forwarding::body::ProxyBody;
use crate::h1::body::{self, Framing, Pumped, RequestBody};
use crate::h1::{Settings, head, io, spare};
use bytes::BytesMut;
use head::{Delimit, Head, HeadError};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Body;
use io::{ClientIo, Handover, Shared, Upgraded};
use parking_lot::Mutex;
use std::future::{Future, poll_fn};
use std::io::Write as _;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Body frames up to this size are copied next to the head (or the chunk
/// framing) to go out in one write; larger ones are written in place.
const COPY_MAX: usize = 4096;

/// Room for a response head as it is made: most fit, so the head is
/// written without growing its buffer.
const HEAD_ROOM: usize = 512;
/// The connection preface of h2 with prior knowledge (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How a connection ended.
pub(crate) enum Ended {
    /// Closed by the client, or by the server after a response.
    Closed,
    /// No whole request head within the header timeout.
    TimedOut(TimedOut),
    /// A request head was refused with this answer.
    Refused(HeadError),
    /// Switched protocols: the connection went to the request's
    /// [`io::OnUpgrade`].
    Upgraded,
    /// The client speaks h2 (prior knowledge): the connection, with what
    /// was read of it, for an h2 server.
    H2(Upgraded),
    /// Reading or writing failed (a reset, a body cut short).
    Failed(String),
}

/// How a connection ended at the header timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimedOut {
    /// Nothing of a request had come: closed without an answer.
    Idle,
    /// Part of a head had come: answered 408.
    Answered,
}

/// Serves HTTP/1.1 on `io` until either side closes it. `h2c`: a client
/// may start with h2's preface instead (plain listeners). `shutdown`
/// turning true closes the connection once it is idle.
///
/// An `async move` block rather than an `async fn`, which would keep room
/// for its arguments twice in the future every idle connection holds.
pub(crate) fn serve<IO, S, F>(
    io: IO,
    settings: &Settings,
    h2c: bool,
    shutdown: watch::Receiver<bool>,
    mut service: S,
) -> impl Future<Output = Ended>
where
    IO: ClientIo,
    S: FnMut(Request<RequestBody>) -> F,
    F: Future<Output = Response<ProxyBody>>,
{
    let io = Mutex::new(io);
    async move {
        let mut buf = BytesMut::new();
        let mut first = true;
        // Made once: waiting for a head is the commonest thing a connection
        // does, and a new timer and a new watch registration each time cost.
        let mut waiting = Waiting {
            timer: Box::pin(tokio::time::sleep(settings.header_timeout)),
            stopping: Box::pin({
                let mut shutdown = shutdown.clone();
                async move {
                    let _ = shutdown.wait_for(|stop| *stop).await;
                }
            }),
        };
        // What ends the loop is a small `Stop`, not the head's room: the
        // value a match looks at stays in the future while its arms wait.
        let stop = loop {
            let head = match read_head(&io, &mut buf, settings, &mut waiting, first && h2c).await {
                Ok(head) => head,
                Err(stop) => break stop,
            };
            first = false;
            let (request, exchange, upgrade) = Exchange::new(head, &mut buf, settings.body_timeout);
            let responding = service(request);
            // Boxed, once per request: what a request needs while it runs is
            // most of a connection's state, and an idle connection should not
            // carry room for it.
            let Exchanged {
                written,
                switching,
                keep_alive,
                pumped,
            } = Box::pin(exchange.run(&io, &mut buf, settings, &shutdown, responding)).await;
            match (written, switching) {
                (Err(e), _) => return Ended::Failed(e),
                (Ok(()), true) => {
                    return match upgrade {
                        Some(give) => {
                            let io = Upgraded::new(Box::new(io.into_inner()), buf.split().freeze());
                            let _ = give.send(io);
                            Ended::Upgraded
                        }
                        None => close(io, None).await,
                    };
                }
                (Ok(()), false) => {}
            }
            // A request body not read to its end leaves the connection
            // somewhere in the middle of it: not reusable.
            if !keep_alive || pumped != Some(Pumped::Complete) {
                // Unless it sent all it meant to, the client may still be
                // sending: a body not read to its end, pipelined requests.
                let more = pumped != Some(Pumped::Complete) || !buf.is_empty();
                return close(io, more.then_some(waiting)).await;
            }
        };
        match stop {
            Stop::Closed => close(io, None).await,
            Stop::H2 => Ended::H2(Upgraded::new(Box::new(io.into_inner()), buf.freeze())),
            Stop::TimedOut(how) => {
                if how == TimedOut::Answered {
                    let answer = head::local(
                        StatusCode::REQUEST_TIMEOUT,
                        "PE05",
                        "request head not received within the header timeout",
                    );
                    let _ = Shared(&io).write_all(&answer).await;
                }
                close(io, None).await;
                Ended::TimedOut(how)
            }
            Stop::Refused(e) => {
                let code = match e {
                    HeadError::Malformed(_) => "PE06",
                    HeadError::TooLarge => "PE07",
                };
                let _ = Shared(&io)
                    .write_all(&head::local(e.status(), code, e.reason()))
                    .await;
                // The client may still be sending the rest of the head, or
                // a body.
                close(io, Some(waiting)).await;
                Ended::Refused(e)
            }
            Stop::Failed(e) => Ended::Failed(e),
        }
    }
}

/// One request, made from its head, and what its connection keeps about it.
struct Exchange {
    pump: Option<body::Pump>,
    keep_alive: bool,
    head_request: bool,
    client: http::Version,
}

/// Where the connection goes if the response switches protocols.
type Upgrade = Option<tokio::sync::oneshot::Sender<Upgraded>>;

/// How an exchange went, for what its connection does next.
struct Exchanged {
    written: Result<(), String>,
    switching: bool,
    keep_alive: bool,
    pumped: Option<Pumped>,
}

impl Exchange {
    fn new(
        head: Head,
        buf: &mut BytesMut,
        body_timeout: Duration,
    ) -> (Request<RequestBody>, Self, Upgrade) {
        let (body, pump) = match head.body {
            None => (RequestBody::full(None), None),
            // Most bodies arrive with their head: no pump.
            Some(Framing::Length(n)) if buf.len() as u64 >= n => (
                RequestBody::full(Some(buf.split_to(n as usize).freeze())),
                None,
            ),
            Some(framing) => {
                let (body, pump) =
                    RequestBody::streaming(framing, head.expect_continue, body_timeout);
                (body, Some(pump))
            }
        };
        let head_request = head.method == Method::HEAD;
        // A CONNECT tunnel is not what this proxy offers; whatever its
        // answer, the connection ends after it.
        let keep_alive = head.keep_alive && head.method != Method::CONNECT;
        let mut request = Request::new(body);
        *request.method_mut() = head.method;
        *request.uri_mut() = head.uri;
        *request.version_mut() = head.version;
        *request.headers_mut() = head.headers;
        let upgrade = head.upgrade.then(|| {
            let (give, handover) = Handover::new();
            request.extensions_mut().insert(handover);
            give
        });
        let exchange = Self {
            pump,
            keep_alive,
            head_request,
            client: head.version,
        };
        (request, exchange, upgrade)
    }

    /// Runs the exchange: the request path (`responding`) works while the
    /// request body comes in, and the response goes out while the rest of
    /// it does.
    async fn run<IO: ClientIo, F>(
        self,
        io: &Mutex<IO>,
        buf: &mut BytesMut,
        settings: &Settings,
        shutdown: &watch::Receiver<bool>,
        responding: F,
    ) -> Exchanged
    where
        F: Future<Output = Response<ProxyBody>>,
    {
        let Self {
            pump,
            mut keep_alive,
            head_request,
            client,
        } = self;
        let mut pumped = pump.is_none().then_some(Pumped::Complete);
        let mut pump = pump;
        let pumping = async {
            match pump.as_mut() {
                Some(pump) => pump.run(io, buf).await,
                None => Pumped::Complete,
            }
        };
        let mut pumping = pin!(pumping);
        let mut responding = pin!(responding);
        // The request path works while the body comes in...
        let response = loop {
            tokio::select! {
                biased;
                response = &mut responding => break response,
                p = &mut pumping, if pumped.is_none() => pumped = Some(p),
            }
        };
        keep_alive &= !*shutdown.borrow();
        let (parts, body) = response.into_parts();
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        keep_alive &= !switching;
        // Made per response, not kept by the connection: an idle
        // connection holds no buffer.
        let mut out = Vec::with_capacity(HEAD_ROOM);
        let delimit = head::encode(
            &mut out,
            parts.status,
            &parts.headers,
            body.size_hint().exact(),
            head_request,
            client,
            &mut keep_alive,
        );
        // ...and the response goes out while the rest of it does.
        let mut writing = pin!(write_response(io, &mut out, body, delimit));
        let written = loop {
            tokio::select! {
                biased;
                written = &mut writing => break written,
                p = &mut pumping, if pumped.is_none() => pumped = Some(p),
            }
        };
        // The rest of a body nobody reads is read past, briefly, so the
        // connection can serve the next request.
        if written.is_ok() && keep_alive && pumped.is_none() {
            pumped = tokio::time::timeout(settings.header_timeout, pumping)
                .await
                .ok();
        }
        Exchanged {
            written,
            switching,
            keep_alive,
            pumped,
        }
    }
}

/// What a connection waits with between requests: the header timeout, and
/// the shutdown signal.
struct Waiting {
    timer: Pin<Box<tokio::time::Sleep>>,
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// Why waiting for a request head came to no head.
enum Stop {
    Closed,
    H2,
    TimedOut(TimedOut),
    Refused(HeadError),
    Failed(String),
}

/// Waits for the next request head, within the header timeout. An idle
/// plain connection waits without a buffer; a shutdown closes it.
async fn read_head<IO: ClientIo>(
    io: &Mutex<IO>,
    buf: &mut BytesMut,
    settings: &Settings,
    waiting: &mut Waiting,
    h2c: bool,
) -> Result<Head, Stop> {
    let Waiting { timer, stopping } = waiting;
    // The timer is moved to this head's deadline only when it goes off
    // before it (it was set for an earlier head): moving a timer in the
    // runtime's wheel for every request costs more than a clock read.
    let deadline = tokio::time::Instant::now() + settings.header_timeout;
    loop {
        let started = !buf.is_empty();
        if started {
            if h2c && H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
                if buf.len() >= H2_PREFACE.len() {
                    return Err(Stop::H2);
                }
            } else {
                match head::parse(buf, settings.max_head) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(e) => return Err(Stop::Refused(e)),
                }
            }
        } else {
            // The connection lets go of its buffer while it waits.
            spare::give(std::mem::take(buf));
        }
        let read = poll_fn(|cx| {
            if buf.capacity() == 0 {
                std::task::ready!(io.lock().poll_readable(cx))?;
                *buf = spare::take();
            }
            buf.reserve(spare::CHUNK);
            let read = tokio_util::io::poll_read_buf(Pin::new(&mut Shared(io)), cx, buf);
            // Readable was a stale mark: tokio clears it after a short
            // read, but a read that filled the TLS session's buffer
            // exactly leaves it set. The buffer goes back until bytes
            // come, so the connection waits without it all the same.
            if read.is_pending() && buf.is_empty() {
                spare::give(std::mem::take(buf));
            }
            read
        });
        tokio::select! {
            biased;
            // Shutting down: an idle connection closes (and, once begun,
            // `stopping` is not polled again: the connection ends here).
            () = stopping.as_mut(), if !started => return Err(Stop::Closed),
            read = read => match read {
                Ok(0) if started => return Err(Stop::Failed("the client closed mid-head".into())),
                Ok(0) => return Err(Stop::Closed),
                Ok(_) => {}
                Err(e) => return Err(Stop::Failed(e.to_string())),
            },
            () = timer.as_mut() => {
                if tokio::time::Instant::now() < deadline {
                    timer.as_mut().reset(deadline);
                    continue;
                }
                return Err(Stop::TimedOut(if started { TimedOut::Answered } else { TimedOut::Idle }));
            }
        }
    }
}

/// Writes a response: its head (in `out`), then its body as `delimit`
/// says, taking every frame that is ready before writing, so a small
/// response goes out in one write.
async fn write_response<IO: ClientIo>(
    io: &Mutex<IO>,
    out: &mut Vec<u8>,
    body: ProxyBody,
    delimit: Delimit,
) -> Result<(), String> {
    let mut body = pin!(body);
    let mut left = match delimit {
        Delimit::Length(n) => n,
        _ => u64::MAX,
    };
    let mut ended = delimit == Delimit::None || body.is_end_stream();
    while !ended {
        let next = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending if out.is_empty() => Poll::Pending,
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        let data = match next {
            // Nothing ready now: send what there is, then wait.
            None => {
                send(io, out, &[]).await?;
                continue;
            }
            Some(None) => break,
            Some(Some(Err(e))) => return Err(format!("the response body failed: {e}")),
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => data,
                // Trailers do not cross: HTTP/1.1 clients rarely take them.
                Err(_) => continue,
            },
        };
        ended = body.is_end_stream();
        if data.is_empty() {
            continue;
        }
        let data = match delimit {
            Delimit::Length(_) if data.len() as u64 > left => {
                return Err("the response body is longer than its length".into());
            }
            Delimit::Length(_) => {
                left -= data.len() as u64;
                data
            }
            Delimit::Chunked => {
                let _ = write!(out, "{:x}\r\n", data.len());
                data
            }
            _ => data,
        };
        let tail: &[u8] = if delimit == Delimit::Chunked {
            b"\r\n"
        } else {
            b""
        };
        if data.len() <= COPY_MAX {
            out.extend_from_slice(&data);
            out.extend_from_slice(tail);
        } else {
            send(io, out, &[&data, tail]).await?;
        }
    }
    match delimit {
        Delimit::Length(_) if left != 0 => {
            send(io, out, &[]).await?;
            return Err("the response body ended before its length".into());
        }
        Delimit::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        _ => {}
    }
    send(io, out, &[]).await
}

/// Writes `out` then `more`, whole, and flushes; `out` is left empty.
async fn send<IO: ClientIo>(
    io: &Mutex<IO>,
    out: &mut Vec<u8>,
    more: &[&[u8]],
) -> Result<(), String> {
    let mut slices = Vec::with_capacity(1 + more.len());
    slices.push(std::io::IoSlice::new(out));
    slices.extend(
        more.iter()
            .filter(|m| !m.is_empty())
            .map(|m| std::io::IoSlice::new(m)),
    );
    let mut slices = &mut slices[..];
    let mut w = Shared(io);
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the client stopped reading".into());
        }
        std::io::IoSlice::advance_slices(&mut slices, n);
    }
    w.flush().await.map_err(|e| e.to_string())?;
    out.clear();
    Ok(())
}

/// How long a closing connection keeps reading what its client still
/// sends, in all and for each read (nginx's `lingering_time` and
/// `lingering_timeout`).
const LINGER_TIME: Duration = Duration::from_secs(30);
const LINGER_READ: Duration = Duration::from_secs(5);

/// Closes the connection, our side first (TLS sends its close_notify; a
/// client that does not read gets a second): the client reads the end of
/// the response, then the end of the stream. `linger` (when the client may
/// still be sending, with what the connection waits with): what it sends
/// is read and dropped until it closes too, within [`LINGER_TIME`] and
/// unless a shutdown comes, as nginx's lingering close does. Closing on
/// unread bytes resets the connection, and a client still writing a body
/// fails on the reset instead of reading the answer it was sent.
///
/// Boxed: its timer would otherwise be room in every connection's future.
fn close<IO: ClientIo>(
    io: Mutex<IO>,
    linger: Option<Waiting>,
) -> Pin<Box<impl Future<Output = Ended>>> {
    Box::pin(async move {
        let mut io = io.into_inner();
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        if let Some(Waiting { stopping, .. }) = linger {
            // In a task of its own: for the proxy (its counts, its logs) the
            // connection has ended; this only drains it.
            tokio::spawn(drain(io, stopping));
        }
        Ended::Closed
    })
}

/// Reads and drops what a closed connection's client still sends; see
/// [`close`].
async fn drain<IO: ClientIo>(mut io: IO, mut stopping: Pin<Box<dyn Future<Output = ()> + Send>>) {
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut sink = vec![0; 4096];
    loop {
        let read = tokio::time::timeout(LINGER_READ, io.read(&mut sink));
        tokio::select! {
            biased;
            () = stopping.as_mut() => return,
            read = tokio::time::timeout_at(deadline, read) => match read {
                Ok(Ok(Ok(n))) if n > 0 => {}
                _ => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncRead, AsyncReadExt, DuplexStream};
    use tokio::net::{TcpListener, TcpStream};

    /// Serves one TCP connection (see [`serve_one`]). Returns the client's
    /// side.
    async fn served(header_timeout: Duration) -> (TcpStream, tokio::task::JoinHandle<Ended>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (tcp, _) = accepted.unwrap();
        (client.unwrap(), serve_one(tcp, header_timeout))
    }

    /// Serves one in-memory connection, for tests of timers that run on
    /// paused time: no socket, so nothing real has to wait.
    fn served_in_memory(
        header_timeout: Duration,
    ) -> (DuplexStream, tokio::task::JoinHandle<Ended>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        (client, serve_one(server, header_timeout))
    }

    /// Serves `io` with a service that answers each request with its
    /// method, path and body length, reading the body unless the path is
    /// `/early`.
    fn serve_one(io: impl ClientIo, header_timeout: Duration) -> tokio::task::JoinHandle<Ended> {
        let settings = Settings {
            header_timeout,
            max_head: 8192,
            body_timeout: Duration::from_secs(60),
        };
        let (stop, shutdown) = watch::channel(false);
        // No shutdown comes: the sender stays while any part of the
        // connection (a lingering close among them) listens.
        tokio::spawn(async move { stop.closed().await });
        tokio::spawn(async move {
            serve(
                io,
                &settings,
                false,
                shutdown,
                |req: Request<RequestBody>| async move {
                    let line = format!("{} {}", req.method(), req.uri().path());
                    let early = req.uri().path() == "/early";
                    let read = if early {
                        0
                    } else {
                        req.into_body().collect().await.unwrap().to_bytes().len()
                    };
                    Response::new(ProxyBody::local(format!("{line} {read}")))
                },
            )
            .await
        })
    }

    /// Reads until `n` responses have come whole (each ends with its body,
    /// whose length the head gives).
    async fn responses(client: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<String> {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        let mut found = Vec::new();
        while found.len() < n {
            let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("an answer in time")
                .unwrap();
            assert!(read > 0, "closed after {found:?}, with {text:?}");
            text.push_str(std::str::from_utf8(&buf[..read]).unwrap());
            while let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |n| n.parse().unwrap());
                if text.len() < end + 4 + len {
                    break;
                }
                found.push(text[end + 4..end + 4 + len].to_string());
                text.drain(..end + 4 + len);
            }
        }
        found
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (mut client, _server) = served(Duration::from_secs(5)).await;
        client
            .write_all(
                b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
                  GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
                  POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nwxyz",
            )
            .await
            .unwrap();
        assert_eq!(
            responses(&mut client, 3).await,
            ["POST /a 5", "GET /b 0", "POST /c 4"]
        );
    }

    #[tokio::test]
    async fn a_body_answered_before_it_is_read_is_read_past() {
        let (mut client, _server) = served(Duration::from_secs(5)).await;
        let head = b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
        client.write_all(head).await.unwrap();
        assert_eq!(responses(&mut client, 1).await, ["POST /early 0"]);
        client.write_all(&vec![b'x'; 100_000]).await.unwrap();
        client
            .write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(responses(&mut client, 1).await, ["GET /next 0"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_not_whole_in_time_gets_408_and_silence_just_closes() {
        let (mut client, server) = served_in_memory(Duration::from_millis(100));
        client.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer}"
        );
        assert!(answer.contains("fly-proxy-error: PE05\r\n"), "{answer}");
        assert!(matches!(
            server.await.unwrap(),
            Ended::TimedOut(TimedOut::Answered)
        ));

        let (client, server) = served_in_memory(Duration::from_millis(100));
        closed_silently(client, server).await;
    }

    /// The connection ends at the header timeout with nothing sent.
    async fn closed_silently(
        mut client: impl AsyncRead + Unpin,
        server: tokio::task::JoinHandle<Ended>,
    ) {
        let mut nothing = Vec::new();
        client.read_to_end(&mut nothing).await.unwrap();
        assert!(nothing.is_empty());
        assert!(matches!(
            server.await.unwrap(),
            Ended::TimedOut(TimedOut::Idle)
        ));
    }

    /// Each head gets the whole header timeout from when the connection
    /// starts waiting for it, not from when it waited for the one before
    /// (the timer is moved only when it goes off early). On paused time the
    /// margins are exact, so a loaded machine cannot blur them.
    #[tokio::test(start_paused = true)]
    async fn every_head_gets_the_whole_header_timeout() {
        let timeout = Duration::from_millis(1000);
        let (mut client, server) = served_in_memory(timeout);
        let started = tokio::time::Instant::now();
        // The first head at 60% of the timeout, the second 70% after the
        // first answer: past the first head's deadline, within its own.
        for wait in [600, 700] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            client
                .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(responses(&mut client, 1).await, ["GET /a 0"]);
        }
        // Then nothing: closed once a whole timeout has passed since the
        // second answer, and not before.
        closed_silently(client, server).await;
        assert_eq!(started.elapsed(), Duration::from_millis(600 + 700 + 1000));
    }

    #[tokio::test]
    async fn malformed_and_smuggling_heads_are_refused_with_400() {
        for raw in [
            &b"NOT HTTP\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let (mut client, server) = served(Duration::from_secs(5)).await;
            client.write_all(raw).await.unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).await.unwrap();
            assert!(
                answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{answer}"
            );
            assert!(answer.contains("fly-proxy-error: PE06\r\n"), "{answer}");
            assert!(matches!(server.await.unwrap(), Ended::Refused(_)));
        }
    }

    /// A client still sending a body when its connection is closed (here
    /// answered without reading the body, with `Connection: close`) is not
    /// reset mid-write: what it sends is read and dropped until it is done,
    /// and it reads its answer.
    #[tokio::test]
    async fn a_client_still_sending_when_its_connection_closes_gets_its_answer() {
        let (mut client, _server) = served(Duration::from_secs(5)).await;
        const LEN: usize = 16 << 20;
        let head = format!(
            "POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: {LEN}\r\nConnection: close\r\n\r\n"
        );
        client.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..LEN / chunk.len() {
            client
                .write_all(&chunk)
                .await
                .expect("the server reads what the client still sends");
        }
        client.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("POST /early 0"), "{answer}");
    }
}
