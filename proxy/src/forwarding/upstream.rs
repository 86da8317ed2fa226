//! Connections to machines: HTTP/1.1 keep-alive, pooled per machine address,
//! and used by the task of the request that holds them.
//!
//! A pooled connection is a socket and the proxy's own HTTP/1.1 client
//! ([`crate::forwarding::client`]): the request head (and its body, read whole) is
//! written straight from the request in one write, the response head read
//! and parsed in the request's task, and the response body
//! ([`MachineBody::Pooled`]) reads the rest from the socket itself as the
//! client's connection asks for it. When the body has ended the connection
//! goes back to its machine's idle list. So one request is served by one
//! task with no channel, no connection task and no wake-up in between.
//!
//! An idle connection is polled by nobody. A machine closing it is noticed
//! at the next checkout (readiness, then a read). A request that finds a
//! connection closed before anything of it was written goes on the next
//! connection. A machine that answers before reading the whole request
//! and closes (an early `413`) breaks the write; its answer is read and
//! passed on all the same, and the connection ends with it. A connection
//! that breaks after taking the request, before an answer, is
//! [`SendError::Broken`]: the machine's idle connections are dropped (a
//! machine closing idle connections, or one that went away, closed them
//! all) and the caller sends a copy again when that is safe (idempotent,
//! body read whole).
//!
//! Requests whose body streams (over `retry_body_bytes`) and upgrades go on
//! a new connection of their own through hyper's client, never pooled: the
//! machine may answer before the body is sent, which needs reading and
//! writing at once. A port with `http_options.h2_backend` gets h2 (hyper's):
//! one multiplexed connection per machine and worker, driven by a task of
//! its own.
//!
//! Pools are per worker thread ([`crate::listening::workers`]): a connection is only
//! ever used on the thread whose reactor it is registered with.
//!
//! Bounds: at most `max_idle` idle connections per machine and worker, each
//! idle at most `idle_timeout`. Open connections per machine are those idle
//! plus one per request in flight, which the balancer's limits bound. A sweep every
//! [`SWEEP_EVERY`] drops expired idle connections and closes the pools of
//! machines that are no longer routable (stopped, destroyed, cordoned).

use super::client;
use crate::error::Failed;
use crate::forwarding::body::{BoxError, UpBody};
use crate::forwarding::headers::{Forwarded, add_forwarded};
use crate::h1::body::{Decoder, Step};
use crate::h1::spare;
use crate::hash::FastHash;
use crate::metrics::UpstreamCounters;
use bytes::{Bytes, BytesMut};
use compact_str::CompactString;
use dashmap::DashMap;
use hangar_catalog::FibSnapshot;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::body::{Body, Frame, SizeHint};
use hyper::client::conn::http1;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How often idle connections are checked for age and for their machine
/// still being routable.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The machine a connection goes to: where, and who, so a sweep can tell
/// when it leaves the catalog.
#[derive(Debug, Clone)]
pub(crate) struct Machine {
    pub addr: SocketAddr,
    pub app: CompactString,
    pub id: CompactString,
}

/// Every machine's pool on every worker, and the settings they share.
pub(crate) struct Upstreams {
    /// One map per worker, indexed by the worker's number.
    pools: Box<[DashMap<SocketAddr, Arc<Pool>, FastHash>]>,
    /// `h2_backend` machines' connections, one map per worker.
    h2: Box<[DashMap<SocketAddr, H2Conn, FastHash>]>,
    connect_timeout: Duration,
    max_idle: usize,
    idle_timeout: Duration,
    counters: UpstreamCounters,
    /// Other regions' proxies: pooled like machines, but never routable
    /// in this FIB, so the sweep keeps them by address.
    peers: Vec<SocketAddr>,
}

/// One machine's idle connections.
struct Pool {
    machine: Machine,
    max_idle: usize,
    /// Most recently used last: checkout takes the warmest connection, and
    /// the oldest age out first.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// One connection to a machine, idle or carrying one exchange.
pub(crate) struct Conn {
    io: TcpStream,
    /// Bytes read from the machine and not used yet: the rest of a
    /// response being read; empty between exchanges.
    buf: BytesMut,
    /// The request head being written; kept for the next one.
    out: Vec<u8>,
    pool: Weak<Pool>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

/// Why a request got no response from the machine.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection: refused, unreachable, or the connect timed out. The
    /// request never left, and comes back for another machine (when it was
    /// given away; a lent one stayed with the caller).
    Connect {
        cause: String,
        request: Option<Box<Request<UpBody>>>,
    },
    /// The connection failed after the request was (maybe) written.
    Exchange(String),
    /// The connection broke under the request with nothing answered: the
    /// machine closed it, or went away. Its other idle connections are
    /// dropped too; the request may go again on a new connection when
    /// that is safe (the caller decides). `fresh`: the connection was new,
    /// so the machine is not merely closing idle connections: it is going
    /// away, or drops what it takes.
    Broken { cause: String, fresh: bool },
}

impl SendError {
    /// How the send failed, its cause, and the request when the failure
    /// gives back one it had taken.
    pub(crate) fn failed(self) -> (Failed, String, Option<Box<Request<UpBody>>>) {
        match self {
            Self::Connect { cause, request } => (Failed::Connect, cause, request),
            Self::Broken { cause, fresh } => (Failed::Broken { fresh }, cause, None),
            Self::Exchange(cause) => (Failed::Exchange, cause, None),
        }
    }

    /// The machine could not be connected to; `req` never left.
    fn refused(cause: String, req: Request<UpBody>) -> Self {
        Self::Connect {
            cause,
            request: Some(Box::new(req)),
        }
    }
}

impl Upstreams {
    pub(crate) fn new(
        workers: usize,
        connect_timeout: Duration,
        max_idle: usize,
        idle_timeout: Duration,
        counters: UpstreamCounters,
    ) -> Self {
        Self {
            pools: (0..workers.max(1)).map(|_| DashMap::default()).collect(),
            h2: (0..workers.max(1)).map(|_| DashMap::default()).collect(),
            connect_timeout,
            max_idle,
            idle_timeout,
            counters,
            peers: Vec::new(),
        }
    }

    /// Keeps connections to these addresses (other regions' proxies)
    /// through sweeps.
    pub(crate) fn keeping(mut self, peers: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.peers = peers.into_iter().collect();
        self
    }

    /// Sends `req` (its body read whole) with this hop's headers
    /// (`forwarded`) to `machine` on an idle connection
    /// of `worker`'s, or a new one, and returns the response, whose body
    /// reads the rest from the connection and returns it to the pool at its
    /// end. The request is only lent: it stays the caller's, to send again
    /// (a retry, a replay, another region) without a copy.
    pub(crate) async fn send(
        &self,
        worker: usize,
        machine: &Machine,
        req: &Request<UpBody>,
        forwarded: &Forwarded<'_>,
    ) -> Result<Response<MachineBody>, SendError> {
        debug_assert!(
            matches!(req.body(), UpBody::Buffered(_)),
            "a streamed body goes on a connection of its own (send_unpooled)"
        );
        let pool = self.pool(worker, machine);
        while let Some(conn) = self.checkout(&pool) {
            match conn.exchange(req, forwarded).await {
                Ok(response) => {
                    self.counters.reused.inc();
                    return Ok(response);
                }
                // Closed by the machine while idle, before our request went
                // out: try the next one.
                Err(ExchangeError::Unsent) => {}
                Err(ExchangeError::Lost(cause)) => {
                    // Its siblings likely share its fate (a machine closing
                    // idle connections, or one that died, closes them all).
                    pool.idle.lock().clear();
                    return Err(SendError::Broken {
                        cause,
                        fresh: false,
                    });
                }
                Err(ExchangeError::Bad(cause)) => return Err(SendError::Exchange(cause)),
            }
        }
        let conn = match self.connect(&pool).await {
            Ok(conn) => conn,
            Err(cause) => {
                return Err(SendError::Connect {
                    cause,
                    request: None,
                });
            }
        };
        self.counters.new.inc();
        match conn.exchange(req, forwarded).await {
            Ok(response) => Ok(response),
            Err(ExchangeError::Unsent) => Err(SendError::Exchange(
                "the machine closed a new connection before the request was sent".into(),
            )),
            Err(ExchangeError::Lost(cause)) => {
                pool.idle.lock().clear();
                Err(SendError::Broken { cause, fresh: true })
            }
            Err(ExchangeError::Bad(cause)) => Err(SendError::Exchange(cause)),
        }
    }

    /// Sends an upgrade request, or one whose body streams, on a new
    /// connection of its own through hyper's client, whose driver runs in a
    /// task of its own (after a `101` it hands the connection over,
    /// `hyper::upgrade::on` the response); never pooled.
    pub(crate) async fn send_unpooled(
        &self,
        machine: &Machine,
        req: Request<UpBody>,
        upgrade: bool,
        forwarded: &Forwarded<'_>,
    ) -> Result<Response<MachineBody>, SendError> {
        let tcp = match self.dial(machine.addr).await {
            Ok(tcp) => tcp,
            Err(cause) => return Err(SendError::refused(cause, req)),
        };
        let req = with_forwarded(req, forwarded)?;
        let (mut sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| SendError::Exchange(error_chain(&e)))?;
        self.counters.new.inc();
        if upgrade {
            tokio::spawn(driver.with_upgrades());
        } else {
            tokio::spawn(driver);
        }
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| SendError::Exchange(error_chain(&e)))?;
        Ok(response.map(MachineBody::Hyper))
    }

    fn pool(&self, worker: usize, machine: &Machine) -> Arc<Pool> {
        let pools = &self.pools[worker % self.pools.len()];
        if let Some(pool) = pools.get(&machine.addr) {
            return pool.clone();
        }
        pools
            .entry(machine.addr)
            .or_insert_with(|| {
                Arc::new(Pool {
                    machine: machine.clone(),
                    max_idle: self.max_idle,
                    idle: Mutex::new(Vec::new()),
                })
            })
            .clone()
    }

    /// The warmest idle connection that is still open and young enough.
    fn checkout(&self, pool: &Arc<Pool>) -> Option<Box<Conn>> {
        loop {
            let Idle { mut conn, since } = pool.idle.lock().pop()?;
            if since.elapsed() < self.idle_timeout && conn.still_open() {
                return Some(conn);
            }
        }
    }

    /// A TCP connection to a machine, within the connect timeout. Every
    /// connection to a machine (HTTP/1, h2, raw TCP) is made here.
    pub(crate) async fn dial(&self, addr: SocketAddr) -> Result<TcpStream, String> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| format!("connect timed out after {:?}", self.connect_timeout))?
            .map_err(|e| e.to_string())?;
        // Small request heads should not wait on Nagle.
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn connect(&self, pool: &Arc<Pool>) -> Result<Box<Conn>, String> {
        let io = self.dial(pool.machine.addr).await?;
        Ok(Box::new(Conn {
            io,
            buf: BytesMut::new(),
            out: Vec::with_capacity(512),
            pool: Arc::downgrade(pool),
        }))
    }

    /// Drops idle connections past `idle_timeout`, and every pool whose
    /// machine `routable` no longer knows.
    pub(crate) fn sweep(&self, fib: &FibSnapshot) {
        let idle_timeout = self.idle_timeout;
        for pools in &self.pools {
            pools.retain(|addr, pool| {
                if !self.peers.contains(addr) && !routable(fib, &pool.machine) {
                    return false;
                }
                pool.idle
                    .lock()
                    .retain(|i| i.since.elapsed() < idle_timeout);
                true
            });
        }
        for h2 in &self.h2 {
            h2.retain(|_, conn| !conn.sender.is_closed() && routable(fib, &conn.machine));
        }
    }

    /// Sends `req` over h2 (prior knowledge) to a machine whose port asks
    /// for `h2_backend`: one multiplexed connection per machine and worker,
    /// made on first use, whose driver runs as a task of the worker (it
    /// serves many requests at once, so no one request can drive it). The
    /// request's URI must be absolute: its authority becomes `:authority`.
    pub(crate) async fn send_h2(
        &self,
        worker: usize,
        machine: &Machine,
        req: Request<UpBody>,
        forwarded: &Forwarded<'_>,
    ) -> Result<Response<MachineBody>, SendError> {
        let conns = &self.h2[worker % self.h2.len()];
        let existing = conns
            .get(&machine.addr)
            .map(|c| c.sender.clone())
            .filter(|s| !s.is_closed());
        let mut sender = match existing {
            Some(sender) => {
                self.counters.reused.inc();
                sender
            }
            None => {
                let sender = match self.connect_h2(machine).await {
                    Ok(sender) => sender,
                    Err(cause) => return Err(SendError::refused(cause, req)),
                };
                self.counters.new.inc();
                conns.insert(
                    machine.addr,
                    H2Conn {
                        sender: sender.clone(),
                        machine: machine.clone(),
                    },
                );
                sender
            }
        };
        let req = with_forwarded(req, forwarded)?;
        if let Err(e) = sender.ready().await {
            conns.remove(&machine.addr);
            return Err(SendError::Exchange(error_chain(&e)));
        }
        sender
            .send_request(req)
            .await
            .map(|r| r.map(MachineBody::Hyper))
            .map_err(|e| SendError::Exchange(error_chain(&e)))
    }

    async fn connect_h2(&self, machine: &Machine) -> Result<http2::SendRequest<UpBody>, String> {
        let tcp = self.dial(machine.addr).await?;
        let (sender, driver) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| error_chain(&e))?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, "h2 upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// `req` with this hop's headers in its map, for hyper's client. (Added
/// once a connection is there: a refused request goes back to the caller
/// as it came, to go elsewhere.)
fn with_forwarded(
    mut req: Request<UpBody>,
    forwarded: &Forwarded<'_>,
) -> Result<Request<UpBody>, SendError> {
    add_forwarded(req.headers_mut(), forwarded)
        .map_err(|e| SendError::Exchange(format!("proxy headers: {e}")))?;
    Ok(req)
}

/// Whether `machine` is still one the FIB would send requests to.
fn routable(fib: &FibSnapshot, machine: &Machine) -> bool {
    fib.app(&machine.app).is_some_and(|app| {
        app.candidates()
            .iter()
            .any(|r| r.id == machine.id && r.private_ip == machine.addr.ip())
    })
}

/// A machine's multiplexed h2 connection.
struct H2Conn {
    sender: http2::SendRequest<UpBody>,
    machine: Machine,
}

/// How an exchange failed.
enum ExchangeError {
    /// The connection was closed before any of the request was written.
    Unsent,
    /// The connection closed or broke after the request went out, before
    /// any answer; the cause, as text.
    Lost(String),
    /// The machine answered something that is not an HTTP/1.1 response.
    Bad(String),
}

/// Bytes read from a machine at a time.
const READ_CHUNK: usize = spare::CHUNK;

impl Conn {
    /// Sends one request (its body read whole) and reads the response
    /// head; the response's body takes the connection from there.
    async fn exchange(
        mut self: Box<Self>,
        req: &Request<UpBody>,
        forwarded: &Forwarded<'_>,
    ) -> Result<Response<MachineBody>, ExchangeError> {
        let head_request = req.method() == Method::HEAD;
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let rest = client::encode_request(&mut out, req, forwarded);
        let mut slices = [
            IoSlice::new(&out),
            IoSlice::new(rest.as_deref().unwrap_or_default()),
        ];
        let mut slices = &mut slices[..];
        let mut written = 0;
        // A machine may answer before it has read the whole request (a
        // `413` or `401` to a large upload) and close: the write fails,
        // and the answer is read all the same.
        let mut cut_short = None;
        while !slices.is_empty() && slices.iter().any(|s| !s.is_empty()) {
            match self.io.write_vectored(slices).await {
                Ok(0) => {
                    cut_short = Some("the machine stopped reading the request".to_string());
                    break;
                }
                Ok(n) => {
                    written += n;
                    IoSlice::advance_slices(&mut slices, n);
                }
                Err(_) if written == 0 => return Err(ExchangeError::Unsent),
                Err(e) => {
                    cut_short = Some(e.to_string());
                    break;
                }
            }
        }
        self.out = out;
        let head = match (self.read_head(head_request).await, cut_short) {
            (Ok(head), None) => head,
            // The rest of the request is not coming: the connection ends
            // with this response.
            (Ok(head), Some(_)) => client::ResponseHead {
                reusable: false,
                ..head
            },
            (Err(e), None) => return Err(e),
            (Err(_), Some(cause)) => return Err(ExchangeError::Lost(cause)),
        };
        let client::ResponseHead {
            response,
            body,
            reusable,
        } = head;
        Ok(response.map(|()| MachineBody::Pooled(Pooled::new(self, body, reusable))))
    }

    /// Reads the machine's response head, past any interim answers.
    async fn read_head(
        &mut self,
        head_request: bool,
    ) -> Result<client::ResponseHead, ExchangeError> {
        loop {
            if !self.buf.is_empty() {
                match client::parse_response(&mut self.buf, head_request) {
                    Err(e) => return Err(ExchangeError::Bad(e.into())),
                    // Interim answers (100, 103) are not passed on.
                    Ok(Some(head)) if head.response.status().is_informational() => {
                        if head.response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                            return Err(ExchangeError::Bad(
                                "the machine switched protocols unasked".into(),
                            ));
                        }
                        continue;
                    }
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                }
            }
            let started = !self.buf.is_empty();
            if self.buf.capacity() == 0 {
                self.buf = spare::take();
            }
            self.buf.reserve(READ_CHUNK);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) if started => {
                    return Err(ExchangeError::Bad("the machine closed mid-head".into()));
                }
                Ok(0) => {
                    return Err(ExchangeError::Lost(
                        "the machine closed the connection before answering".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) if started => return Err(ExchangeError::Bad(e.to_string())),
                Err(e) => return Err(ExchangeError::Lost(e.to_string())),
            }
        }
    }

    /// Whether an idle connection is still usable: nothing arrived since
    /// the last response, or what arrived is not the machine's close (or
    /// stray bytes).
    fn still_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Returns the connection to its machine's idle list after a complete
    /// exchange; drops (closes) it when the pool is full or gone.
    pub(crate) fn release(mut self: Box<Self>) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if !self.still_open() {
            return;
        }
        // An idle connection holds no buffer (the last response's head may
        // still share this one).
        spare::give(std::mem::take(&mut self.buf));
        let mut idle = pool.idle.lock();
        if idle.len() < pool.max_idle {
            idle.push(Idle {
                conn: self,
                since: Instant::now(),
            });
        }
    }
}

/// A machine's response body.
#[derive(Debug)]
pub(crate) enum MachineBody {
    /// Over hyper's client: h2, upgrades, streamed request bodies.
    Hyper(Incoming),
    /// Over a pooled connection, read by the proxy's client.
    Pooled(Pooled),
}

/// A response body read straight from its pooled connection, which goes
/// back to the pool when the body has ended (and is closed when it does
/// not end well, or is dropped unfinished).
#[derive(Debug)]
pub(crate) struct Pooled {
    conn: Option<Box<Conn>>,
    decoder: Decoder,
    reusable: bool,
    done: bool,
}

impl Pooled {
    fn new(conn: Box<Conn>, body: Option<Decoder>, reusable: bool) -> Self {
        let mut pooled = Self {
            conn: Some(conn),
            decoder: body.unwrap_or(Decoder::Length(0)),
            reusable,
            done: false,
        };
        // No body to read: the connection is free now (hyper does not poll
        // a body that says it has ended).
        if pooled.decoder.is_done() {
            pooled.finish(true);
        }
        pooled
    }

    fn finish(&mut self, complete: bool) {
        self.done = true;
        if let Some(conn) = self.conn.take()
            && complete
            && self.reusable
        {
            conn.release();
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut().filter(|_| !self.done) else {
                return Poll::Ready(None);
            };
            match self.decoder.decode(&mut conn.buf) {
                Ok(Step::Data(data)) => {
                    if self.decoder.is_done() {
                        self.finish(true);
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(Step::Done) => {
                    self.finish(true);
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {
                    conn.buf.reserve(READ_CHUNK);
                    let read = std::task::ready!(tokio_util::io::poll_read_buf(
                        Pin::new(&mut conn.io),
                        cx,
                        &mut conn.buf
                    ));
                    match read {
                        Ok(0) if matches!(self.decoder, Decoder::UntilClose) => {
                            self.finish(false);
                            return Poll::Ready(None);
                        }
                        Ok(0) => {
                            return self.fail("the machine closed the connection mid-body".into());
                        }
                        Ok(_) => {}
                        Err(e) => return self.fail(e.into()),
                    }
                }
                Err(e) => return self.fail(e.into()),
            }
        }
    }

    fn fail(&mut self, error: BoxError) -> Poll<Option<Result<Bytes, BoxError>>> {
        self.finish(false);
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for MachineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Pooled(body) => body.poll_data(cx).map_ok(Frame::data),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(body) => body.is_end_stream(),
            Self::Pooled(body) => body.done || body.decoder.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(body) => body.size_hint(),
            Self::Pooled(Pooled {
                decoder: Decoder::Length(n),
                ..
            }) => SizeHint::with_exact(*n),
            Self::Pooled(_) => SizeHint::default(),
        }
    }
}

/// An error and its sources as one line: hyper's own message only names the
/// kind ("connection closed before message completed"), the cause is below.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
