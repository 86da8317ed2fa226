//! Connections to machines: HTTP/1.1 keep-alive, pooled per machine address,
//! and driven by the task of the request that uses them.
//!
//! hyper's pooled client runs every upstream connection in a task of its own
//! and hands each request to it over a channel, and the response back: extra
//! task wake-ups per request, often across threads. Here a connection's state
//! machine (hyper's client `Connection` future) travels with the request
//! instead. The request's future polls it while waiting for the response
//! head, the response body ([`crate::ProxyBody`]) polls it while streaming,
//! and when the body has ended the connection goes back to its machine's idle
//! list. So one request is served by one task, the client's connection task.
//!
//! An idle connection is polled by nobody. A machine closing it is noticed at
//! the next checkout, where one poll of its driver returns at once. A
//! request that loses the race with such a close is sent again on the next
//! connection when hyper hands it back unsent. A connection that breaks
//! after taking the request, before an answer, is [`SendError::Broken`]:
//! the machine's idle connections are dropped (a machine closing idle
//! connections, or one that went away, closed them all) and the caller
//! sends a copy again when that is safe (idempotent, body read whole).
//!
//! Pools are per worker thread ([`crate::workers`]): a connection is only
//! ever driven on the thread whose reactor it is registered with.
//!
//! A port with `http_options.h2_backend` gets h2 instead: one multiplexed
//! connection per machine and worker, driven by a task of its own.
//!
//! Bounds: at most `max_idle` idle connections per machine and worker, each
//! idle at most `idle_timeout`. Open connections per machine are those idle
//! plus one per request in flight, which the balancer's limits bound. A sweep every
//! [`SWEEP_EVERY`] drops expired idle connections and closes the pools of
//! machines that are no longer routable (stopped, destroyed, cordoned).

use crate::body::UpBody;
use crate::metrics::UpstreamCounters;
use compact_str::CompactString;
use dashmap::DashMap;
use hangar_catalog::FibSnapshot;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
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
    pools: Box<[DashMap<SocketAddr, Arc<Pool>>]>,
    /// `h2_backend` machines' connections, one map per worker.
    h2: Box<[DashMap<SocketAddr, H2Conn>]>,
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

/// One connection to a machine, ready for a request or carrying one.
pub(crate) struct Conn {
    sender: SendRequest<UpBody>,
    driver: Connection<TokioIo<TcpStream>, UpBody>,
    /// The driver has returned: the connection is closed or broken, and must
    /// not be polled again.
    done: bool,
    pool: Weak<Pool>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// Why a request got no response from the machine.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection: refused, unreachable, or the connect timed out. The
    /// request never left, and comes back for another machine.
    Connect {
        cause: String,
        request: Box<Request<UpBody>>,
    },
    /// The connection failed after the request was (maybe) written.
    Exchange(String),
    /// The connection broke under the request with nothing answered: the
    /// machine closed it, or went away. Its other idle connections are
    /// dropped too; the request may go again on a new connection when
    /// that is safe (the caller decides).
    Broken(String),
}

impl SendError {
    /// The machine could not be connected to; `req` never left.
    fn refused(cause: String, req: Request<UpBody>) -> Self {
        Self::Connect {
            cause,
            request: Box::new(req),
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
            pools: (0..workers.max(1)).map(|_| DashMap::new()).collect(),
            h2: (0..workers.max(1)).map(|_| DashMap::new()).collect(),
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

    /// Sends `req` to `machine` on an idle connection of `worker`'s, or a
    /// new one, and returns the response head with the connection, which the
    /// response body must keep driving (see [`Conn::poll_drive`]).
    pub(crate) async fn send(
        &self,
        worker: usize,
        machine: &Machine,
        mut req: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Box<Conn>), SendError> {
        let pool = self.pool(worker, machine);
        while let Some(mut conn) = self.checkout(&pool) {
            match conn.exchange(req).await {
                Ok(response) => {
                    self.counters.reused.inc();
                    return Ok((response, conn));
                }
                // Closed by the machine while idle, before our request went
                // out: try the next one.
                Err(Failed::Unsent(back)) => req = *back,
                Err(Failed::Lost(cause)) => {
                    // Its siblings likely share its fate (a machine closing
                    // idle connections, or one that died, closes them all).
                    pool.idle.lock().clear();
                    return Err(SendError::Broken(cause));
                }
            }
        }
        let mut conn = match self.connect(&pool).await {
            Ok(conn) => conn,
            Err(cause) => return Err(SendError::refused(cause, req)),
        };
        self.counters.new.inc();
        match conn.exchange(req).await {
            Ok(response) => Ok((response, conn)),
            Err(Failed::Unsent(_)) => Err(SendError::Exchange(
                "the machine closed a new connection before the request was sent".into(),
            )),
            Err(Failed::Lost(cause)) => {
                pool.idle.lock().clear();
                Err(SendError::Broken(cause))
            }
        }
    }

    /// Sends an upgrade request on a new connection of its own. Its driver
    /// runs in a task of its own, so that after a `101` it can hand the
    /// connection over (`hyper::upgrade::on` the response); it is never
    /// pooled.
    pub(crate) async fn send_upgrade(
        &self,
        worker: usize,
        machine: &Machine,
        req: Request<UpBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let pool = self.pool(worker, machine);
        let conn = match self.connect(&pool).await {
            Ok(conn) => conn,
            Err(cause) => return Err(SendError::refused(cause, req)),
        };
        self.counters.new.inc();
        let Conn {
            mut sender, driver, ..
        } = *conn;
        tokio::spawn(driver.with_upgrades());
        sender
            .send_request(req)
            .await
            .map_err(|e| SendError::Exchange(error_chain(&e)))
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
        let tcp = self.dial(pool.machine.addr).await?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        // Boxed: the driver is large, and moves between pool and body.
        Ok(Box::new(Conn {
            sender,
            driver,
            done: false,
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
    ) -> Result<Response<Incoming>, SendError> {
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
        if let Err(e) = sender.ready().await {
            conns.remove(&machine.addr);
            return Err(SendError::Exchange(error_chain(&e)));
        }
        sender
            .send_request(req)
            .await
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
enum Failed {
    /// hyper handed the request back without writing any of it.
    Unsent(Box<Request<UpBody>>),
    /// The request was taken and maybe written; the cause, as text.
    Lost(String),
}

impl Conn {
    /// Sends one request and waits for the response head, driving the
    /// connection meanwhile.
    async fn exchange(&mut self, req: Request<UpBody>) -> Result<Response<Incoming>, Failed> {
        // Wait until the dispatcher takes a new request: after the previous
        // response it needs one more poll of the driver to get there.
        let ready = poll_fn(|cx| {
            if self.poll_drive(cx).is_ready() {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await;
        if !ready {
            return Err(Failed::Unsent(Box::new(req)));
        }
        let mut response = std::pin::pin!(self.sender.try_send_request(req));
        let result = poll_fn(|cx| {
            let _ = self.poll_drive(cx);
            // A driver that ended has failed or answered every callback, so
            // the response future is ready now either way.
            response.as_mut().poll(cx)
        })
        .await;
        result.map_err(|mut e| match e.take_message() {
            Some(req) => Failed::Unsent(Box::new(req)),
            None => Failed::Lost(error_chain(e.error())),
        })
    }

    /// Polls the connection's driver: reads and writes whatever is due.
    /// Ready once the connection is closed; never polled after that.
    pub(crate) fn poll_drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        match Pin::new(&mut self.driver).poll(cx) {
            Poll::Ready(result) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                self.done = true;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Whether an idle connection is still usable: one poll of its driver
    /// notices a close (or stray bytes) from the machine.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.poll_drive(&mut cx).is_pending() && !self.sender.is_closed()
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
        let mut idle = pool.idle.lock();
        if idle.len() < pool.max_idle {
            idle.push(Idle {
                conn: self,
                since: Instant::now(),
            });
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
