//! Listening: the proxy's sockets and the connections on them, up to the
//! first request of each.
//!
//! - this module: the accept loops (each worker accepts on the shared
//!   listeners itself; app-address connections are handed to the next
//!   worker), the TLS handshake, and each connection's protocol: HTTP/1.1
//!   (`server`), h2 (hyper's), or raw TCP to a machine.
//! - `server`: the HTTP/1.1 server for client connections (no buffers
//!   while idle, the header timeout with its 408, request bodies, upgrades,
//!   lingering close).
//! - [`tls`]: the dev certificate, certificates by SNI, the rustls config.
//! - `workers`: the worker threads, one single-threaded runtime each.
//! - `ports`: listeners on apps' own addresses (flycast and dedicated),
//!   one per service port, following the FIB.
//!
//! Imports: the request path (`path::handle`, which every request goes
//! to), the edge it shares, forwarding (the TCP relay, request bodies, the
//! upstream sweep), routing's `Want` (what a raw TCP connection asks
//! for), scaling's autostop loop (run here until shutdown), and the
//! crate's base.

pub(crate) mod ports;
pub(crate) mod server;
pub mod tls;
pub(crate) mod workers;

use crate::config::{Listener, ProxyConfig};
use crate::conns::{self, Conns, Watcher};
use crate::edge::Edge;
use crate::error::ProxyError;
use crate::forwarding::body::{ClientBody, ProxyBody};
use crate::forwarding::{tcp, upstream};
use crate::metrics::{Handshake, Observed};
use crate::path::{self, Conn};
use crate::routing::balance::Want;
use crate::scaling::autostop::Autostopper;
use crate::tls_session::{self, Tls};
use compact_str::CompactString;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ports::{Accepted, PortListeners, Spec};
use server::{Ended, TimedOut};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use workers::Loads;

/// The shared public listeners, bound, and the workers that will serve
/// them.
pub(crate) struct Listeners {
    http: TcpListener,
    https: TcpListener,
    workers: workers::Workers,
}

impl Listeners {
    /// Binds both listeners and starts the workers.
    pub(crate) async fn bind(cfg: &ProxyConfig) -> Result<Self, ProxyError> {
        Ok(Self {
            http: bind("http", cfg.http_addr).await?,
            https: bind("https", cfg.https_addr).await?,
            workers: workers::Workers::start(cfg.workers()).map_err(ProxyError::Workers)?,
        })
    }

    /// How many workers serve connections.
    pub(crate) fn workers(&self) -> usize {
        self.workers.count()
    }

    pub(crate) fn http_addr(&self) -> SocketAddr {
        local_addr(&self.http)
    }

    pub(crate) fn https_addr(&self) -> SocketAddr {
        local_addr(&self.https)
    }
}

async fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind {
            listener,
            addr,
            source,
        })
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    // A bound TCP listener always has a local address; the fallback only
    // keeps this accessor infallible.
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Serves until `shutdown`, then drains for at most `drain`. Each worker
/// accepts on the shared listeners itself (see [`accept`]); this loop runs
/// the app-address listeners, the upstream sweep and autostop.
pub(crate) async fn serve(
    listeners: Listeners,
    edge: Arc<Edge>,
    autostop: Option<Autostopper>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let Listeners {
        http,
        https,
        mut workers,
    } = listeners;
    let graceful = conns::graceful();
    let (stop, stopping) = watch::channel(false);
    let loads = Loads::new(workers.count());
    let accepting = match (http.into_std(), https.into_std()) {
        (Ok(http), Ok(https)) => workers
            .handles()
            .filter_map(|(worker, runtime)| {
                let listeners = (http.try_clone().ok()?, https.try_clone().ok()?);
                let conns = Conns::new(graceful.clone());
                let (edge, stop) = (edge.clone(), stopping.clone());
                let me = (worker, loads.clone());
                Some(runtime.spawn(accept(edge, me, listeners, conns, stop)))
            })
            .collect(),
        (http, https) => {
            tracing::error!(http = ?http.err(), https = ?https.err(), "proxy: the listeners cannot be shared with the workers");
            Vec::new()
        }
    };
    let mut conns = Conns::new(graceful.clone());
    let mut sweep = tokio::time::interval(upstream::SWEEP_EVERY);
    let mut follow = tokio::time::interval(FOLLOW_PORTS);
    let (to_ports, mut from_ports) = mpsc::channel(1024);
    let mut ports = PortListeners::new(to_ports);
    // Ends with serve: dropping the handle's abort guard stops the loop.
    let _autostop = autostop.map(|a| AbortOnDrop(tokio::spawn(a.run())));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = conns.reap() => {}
            _ = sweep.tick() => {
                edge.upstreams.sweep(&edge.fib.snapshot());
                edge.pins.sweep();
                edge.activity.prune();
            }
            _ = follow.tick() => ports.reconcile(&edge.fib.snapshot()).await,
            Some(Accepted { tcp, peer, spec }) = from_ports.recv() => {
                hand_off(&edge, (&mut workers, &mut conns), tcp, peer, spec);
            }
        }
    }
    // Closing the listeners first makes new clients fail fast instead of
    // queueing on a socket nobody accepts from.
    let _ = stop.send(true);
    drop((ports, from_ports));
    let mut all = vec![conns];
    for worker in accepting {
        if let Ok(conns) = worker.await {
            all.push(conns);
        }
    }
    conns::drain(&graceful, all, "proxy", drain).await;
}

/// One worker's accept loop on the shared listeners (every worker accepts
/// on the same sockets): a connection is served on the thread that
/// accepted it, with no hand-off, like nginx's workers. Ends, closing its
/// copies of the listeners, when `stop` turns true; returns the
/// connections still open, for the drain.
async fn accept(
    edge: Arc<Edge>,
    (worker, loads): (usize, Loads),
    (http, https): (std::net::TcpListener, std::net::TcpListener),
    mut conns: Conns,
    mut stop: watch::Receiver<bool>,
) -> Conns {
    let (http, https) = match (TcpListener::from_std(http), TcpListener::from_std(https)) {
        (Ok(http), Ok(https)) => (http, https),
        (http, https) => {
            tracing::error!(worker, http = ?http.err(), https = ?https.err(), "proxy: a worker cannot accept");
            return conns;
        }
    };
    loop {
        loads.set(worker, conns.len());
        if loads.ahead(worker) {
            // Let a worker with fewer connections take the next one.
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => break,
                () = conns.reap() => continue,
                () = tokio::time::sleep(workers::STEP_BACK) => {}
            }
        }
        // Not `biased`: a busy HTTP listener must not starve the HTTPS one.
        let (accepted, listener) = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => break,
            () = conns.reap() => continue,
            accepted = http.accept() => (accepted, Listener::Http),
            accepted = https.accept() => (accepted, Listener::Https),
        };
        match accepted {
            Ok((tcp, peer)) => {
                edge.metrics.connected(listener);
                let edge = edge.clone();
                conns.spawn(None, move |watcher| {
                    serve_conn(edge, (tcp, peer), listener, None, worker, watcher)
                });
            }
            Err(e) => conns::accept_failed(listener.as_str(), &e).await,
        }
    }
    conns
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How often the app-address listeners are checked against the FIB (a
/// comparison of sequence numbers unless something changed).
const FOLLOW_PORTS: Duration = Duration::from_millis(100);

/// Hands a connection accepted on an app's address to the next worker.
fn hand_off(
    edge: &Arc<Edge>,
    (workers, conns): (&mut workers::Workers, &mut Conns),
    tcp: TcpStream,
    peer: SocketAddr,
    spec: Spec,
) {
    let listener = if spec.has("tls") {
        Listener::Https
    } else {
        Listener::Http
    };
    // The socket moves to the worker's reactor: registered here, it
    // would be driven by this thread.
    let tcp = match tcp.into_std() {
        Ok(tcp) => tcp,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "accepted connection unusable");
            return;
        }
    };
    edge.metrics.connected(listener);
    let edge = edge.clone();
    let (worker, runtime) = workers.next();
    conns.spawn(Some(runtime), move |watcher| async move {
        let Ok(tcp) = TcpStream::from_std(tcp) else {
            return;
        };
        serve_conn(edge, (tcp, peer), listener, Some(spec), worker, watcher).await;
    });
}

/// One accepted connection, on its worker. On the shared listeners, and on
/// an app's port with `http`, it serves HTTP (over TLS on HTTPS or with
/// `tls`); on an app's port without `http` its bytes go to a machine
/// ([`relay`]).
///
/// This and [`connection`] return an `async move` block rather than being
/// `async fn`s: an `async fn` copies its arguments into its future's locals
/// and keeps room for both, and these futures are what every idle
/// connection holds.
#[allow(clippy::manual_async_fn)] // smaller, as said above
fn serve_conn(
    edge: Arc<Edge>,
    (tcp, peer): (TcpStream, SocketAddr),
    listener: Listener,
    spec: Option<Spec>,
    worker: usize,
    watcher: Watcher,
) -> impl Future<Output = ()> + Send {
    async move {
        let Ok(local) = tcp.local_addr() else { return };
        // One client's share: past it, its new connections are closed at once.
        let Some(_client) = edge.client_conns.enter(peer.ip().to_canonical()) else {
            edge.metrics.connection_error("too_many_from_client");
            tracing::debug!(%peer, limit = edge.client_conns.limit(), "too many connections from the client; closing");
            return;
        };
        let (app, want) = match spec {
            None => (None, Want::http(listener)),
            Some(spec) if spec.has("http") => (Some(spec.app), Want::Port(local.port())),
            Some(spec) => {
                // Raw bytes are not HTTP: a shutdown cuts them once the HTTP
                // connections have drained.
                drop(watcher);
                // Boxed, as every path but plain HTTP/1.1 (see [`connection`]).
                return Box::pin(relay(&edge, tcp, peer, local, &spec)).await;
            }
        };
        let conn = Conn {
            listener,
            client_ip: HeaderValue::try_from(peer.ip().to_canonical().to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
            local_port: HeaderValue::from(local.port()),
            worker,
            app,
            want,
            counted: Arc::default(),
        };
        // Boxed: a request's future is several KiB, and an idle connection
        // should not carry room for one.
        let service = {
            let edge = edge.clone();
            move |req: Request<ClientBody>| Box::pin(path::handle(edge.clone(), conn.clone(), req))
        };
        connection(edge, tcp, (listener, peer), service, watcher).await;
    }
}

/// A connection to an app's port without `http`: counted against the app,
/// past TLS with `tls`, then relayed to a machine ([`tcp`]).
async fn relay(edge: &Edge, tcp: TcpStream, peer: SocketAddr, local: SocketAddr, spec: &Spec) {
    let Some(_counted) = edge.app_conns.enter(CompactString::from(&*spec.app)) else {
        tracing::info!(app = %spec.app, %peer, "too many connections for the app; closing");
        return;
    };
    let relay = tcp::Relay {
        slots: &edge.slots,
        upstreams: &edge.upstreams,
        max_attempts: edge.max_attempts,
        metrics: &edge.metrics,
    };
    if !spec.has("tls") {
        return relay.run(tcp, peer, local, &spec.app).await;
    }
    if let Some(stream) = handshake(edge, tcp, peer).await {
        relay.run(stream, peer, local, &spec.app).await;
    }
}

/// Serves one client connection: TLS first on the HTTPS listener, then
/// HTTP/1.1 ([`server`]) or h2 (prior knowledge, or by ALPN; hyper's) until the
/// client or a shutdown closes it.
#[allow(clippy::manual_async_fn)] // as serve_conn
fn connection<S, F>(
    edge: Arc<Edge>,
    tcp: TcpStream,
    (listener, peer): (Listener, SocketAddr),
    service: S,
    watcher: Watcher,
) -> impl Future<Output = ()>
where
    S: Fn(Request<ClientBody>) -> F + Send + Clone + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    async move {
        // Small request and response heads should not wait on Nagle.
        let _ = tcp.set_nodelay(true);
        let ended = match listener {
            Listener::Http => {
                let h1 =
                    |req: Request<crate::h1::body::RequestBody>| service(req.map(ClientBody::Left));
                server::serve(tcp, &edge.h1, true, watcher.clone(), h1).await
            }
            // Boxed, like every path but plain HTTP/1.1: the state of what is
            // awaited is part of every connection's future, and the TLS
            // path's (its HTTP/1.1 server over the session) is larger than
            // the plain one's.
            Listener::Https => match Box::pin(over_tls(&edge, tcp, &service, &watcher, peer)).await
            {
                Some(ended) => ended,
                None => return,
            },
        };
        match ended {
            Ended::H2(io) => Box::pin(h2(&edge, io, service, watcher, peer)).await,
            Ended::TimedOut(how) => header_timeout(&edge, how, peer, listener),
            Ended::Refused(e) => {
                edge.metrics.connection_error("bad_request");
                tracing::debug!(%peer, listener = listener.as_str(), reason = e.reason(), "request head refused");
            }
            // Clients resetting connections is ordinary, hence debug.
            Ended::Failed(e) => {
                tracing::debug!(%peer, listener = listener.as_str(), error = %e, "connection ended with an error");
            }
            Ended::Closed | Ended::Upgraded => {}
        }
    }
}

/// A connection on the HTTPS listener: the handshake, then h2 by ALPN
/// (served here: `None`) or HTTP/1.1, which ends as the caller reads.
///
/// The handshake and h2 are boxed, and the session is ([`Tls`]):
/// what this future holds while a connection waits for its next request is
/// the HTTP/1.1 server's state.
async fn over_tls<S, F>(
    edge: &Edge,
    tcp: TcpStream,
    service: &S,
    watcher: &Watcher,
    peer: SocketAddr,
) -> Option<Ended>
where
    S: Fn(Request<ClientBody>) -> F + Send + Clone + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let tls = Box::pin(handshake(edge, tcp, peer)).await?;
    if tls.alpn_protocol() == Some(b"h2") {
        Box::pin(h2(edge, tls, service.clone(), watcher.clone(), peer)).await;
        return None;
    }
    let h1 = |req: Request<crate::h1::body::RequestBody>| service(req.map(ClientBody::Left));
    Some(server::serve(tls, &edge.h1, false, watcher.clone(), h1).await)
}

/// Serves h2 on a connection until the client closes it, or a shutdown
/// has let its open streams finish.
async fn h2<IO, S, F>(edge: &Edge, io: IO, service: S, watcher: Watcher, peer: SocketAddr)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Fn(Request<ClientBody>) -> F + Send + Clone + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = service(req.map(ClientBody::Right));
        async move { Ok::<_, Infallible>(response.await) }
    });
    let served = edge.h2.serve_connection(TokioIo::new(io), service);
    let result = conns::serve_until_drained(served, watcher).await;
    if let Err(e) = result {
        if e.is_parse() {
            edge.metrics.connection_error("bad_request");
        }
        tracing::debug!(%peer, error = %e, "h2 connection ended with an error");
    }
}

/// A connection closed at the header timeout, counted: with its `408`
/// as a response of the proxy's own when it got one.
fn header_timeout(edge: &Edge, how: TimedOut, peer: SocketAddr, listener: Listener) {
    edge.metrics.connection_error("header_timeout");
    if how == TimedOut::Answered {
        edge.metrics.observe(&Observed {
            app: "",
            region: &edge.region,
            status: StatusCode::REQUEST_TIMEOUT,
            elapsed: edge.h1.header_timeout,
            error: Some("PE05"),
            from_machine: false,
        });
    }
    tracing::debug!(%peer, listener = listener.as_str(), ?how, "no whole request head within the header timeout");
}

/// The TLS handshake ([`tls_session`]), bounded so a silent client cannot
/// hold a task (or the shutdown drain) forever.
async fn handshake(edge: &Edge, tcp: TcpStream, peer: SocketAddr) -> Option<Tls> {
    let started = Instant::now();
    let accept = tls_session::accept(edge.tls.clone(), tcp);
    match tokio::time::timeout(edge.handshake_timeout, accept).await {
        Ok(Ok(session)) => {
            edge.metrics.handshake(Handshake::Ok(started.elapsed()));
            Some(session)
        }
        Ok(Err(e)) => {
            edge.metrics.handshake(Handshake::Error);
            tracing::debug!(%peer, error = %e, "tls handshake failed");
            None
        }
        Err(_) => {
            edge.metrics.handshake(Handshake::Timeout);
            tracing::debug!(%peer, "tls handshake timed out");
            None
        }
    }
}
