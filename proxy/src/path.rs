//! The request path, top to bottom:
//!
//! accept → tls → connection →
//!   [handle: host → app → read body → deliver:
//!      (slot (queue, autostart) → force_https → send (retry)
//!       → a `fly-replay`? next hop; no machine? fallback or another region)
//!    → respond] → log
//!
//! One short function per step; a step that cannot go on returns a
//! [`PathError`], and `fail()` alone turns errors into responses. Nothing
//! here takes a lock: the FIB is read through an immutable snapshot and the
//! load counters are atomics.

use crate::autostart::{self, Autostart};
use crate::autostop::FLY_KEEP_ALIVE_UNTIL;
use crate::balance::{self, Lease, Near, NoTarget, Released, Target, Want};
use crate::body::{self, ClientBody, Held, ProxyBody, ReadBody, UpBody};
use crate::conn_limit::{AppConns, ClientConns, Counted};
use crate::conns::{self, Conns, Watcher};
use crate::error::{PathError, Side};
use crate::h1::{self, Ended, TimedOut};
use crate::headers::{self, FLY_PROXY_ERROR, FLY_REQUEST_ID, Forwarded};
use crate::metrics::{EdgeMetrics, Handshake, InFlight, Observed};
use crate::peers::Peers;
use crate::ports::{Accepted, PortListeners, Spec};
use crate::queue::{QueueError, Queues};
use crate::replay::{self, FLY_REPLAY, FLY_REPLAY_FAILED, FLY_REPLAY_SRC, MAX_REPLAYS, Replay};
use crate::steer::{Hop, Steer};
use crate::sticky::{self, Pins};
use crate::tcp;
use crate::upstream::{self, MachineBody, SendError, Upstreams};
use crate::workers::{self, Loads};
use crate::{H2Server, Listener, Proxy};
use compact_str::CompactString;
use hangar_api::AppName;
use hangar_api::machine::HttpResponseOptions;
use hangar_catalog::{AppRoutes, Fib, RouteMachine};
use http::header::{
    CONTENT_TYPE, HOST, HeaderName, HeaderValue, LOCATION, PROXY_AUTHORIZATION, RETRY_AFTER,
    SERVER, VIA,
};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

/// What every request on every connection shares.
pub(crate) struct Edge {
    pub fib: Arc<Fib>,
    /// Keep-alive connections to machines, pooled per `private_ip:port`.
    pub upstreams: Upstreams,
    pub region: String,
    /// `region` as a header value (`Fly-Region`).
    pub region_value: HeaderValue,
    pub metrics: EdgeMetrics,
    pub tls: TlsAcceptor,
    pub handshake_timeout: Duration,
    /// Requests waiting for a slot, per app.
    pub queues: Arc<Queues>,
    /// Machines tried per request when connects fail.
    pub max_attempts: usize,
    /// How long a machine may take to send its response head.
    pub response_timeout: Duration,
    /// Request bodies up to this size are read whole, so the request can
    /// be sent again.
    pub retry_body_bytes: u64,
    /// Largest request body accepted (0: no limit).
    pub max_body_bytes: u64,
    /// What bodies read whole may hold in memory, all requests together.
    pub body_budget: body::BodyBudget,
    /// Client connections per app.
    pub app_conns: Arc<AppConns>,
    /// Open connections per client address (`proxy.max_conns_per_ip`).
    pub client_conns: Arc<ClientConns>,
    /// Starts of stopped machines for requests.
    pub autostart: Arc<Autostart>,
    /// Hosts' and tokens' entries in the RIB (tokens: for flycast on the
    /// shared listeners).
    pub directory: Arc<dyn crate::autostart::Directory>,
    /// What a lease's end tells: the queues (shared with `queues`) and
    /// the machines' idle clocks.
    pub released: Arc<Released>,
    /// Sticky sessions pinned by a header value.
    pub pins: Pins,
    /// The limits of HTTP/1 connections (h2's are the server's).
    pub h1: h1::Settings,
    /// Other regions' proxies.
    pub peers: Peers,
}

/// The connection a request arrived on.
#[derive(Debug, Clone)]
struct Conn {
    /// `Http` or `Https`: the scheme, on a shared listener or an app's
    /// address.
    listener: Listener,
    peer: SocketAddr,
    /// The client's address as the machine is told it (`Fly-Client-IP`,
    /// `X-Forwarded-For`), made once per connection.
    client_ip: HeaderValue,
    /// The port the client connected to, for `X-Forwarded-Port`.
    local_port: HeaderValue,
    /// The worker thread serving the connection; see [`crate::workers`].
    worker: usize,
    /// On an app's own address: that app, whatever the Host says.
    app: Option<Arc<str>>,
    /// What to ask of the machines' services.
    want: Want,
    /// The connection's place in its app's connection count, taken by its
    /// first request; see [`crate::conn_limit`].
    counted: Arc<OnceLock<Counted<CompactString>>>,
}

/// One request as it moves down the path: what the log line reports.
struct Exchange {
    conn: Conn,
    id: HeaderValue,
    started: Instant,
    app: Option<CompactString>,
    machine: Option<CompactString>,
    /// Moves into the response body when the request is forwarded, so the
    /// gauge covers streaming too.
    in_flight: Option<InFlight>,
    /// The response is the machine's.
    from_machine: bool,
    /// The request came through another region's proxy, this one.
    from_region: Option<HeaderValue>,
    /// This hop's `Via` entry, by the client's HTTP version (the request
    /// goes on in HTTP/1.1 whatever it was).
    via: &'static str,
}

// ---- accept ----

/// Serves until `shutdown`, then drains for at most `drain`. Each worker
/// accepts on the shared listeners itself (see [`accept`]); this loop runs
/// the app-address listeners, the upstream sweep and autostop.
pub(crate) async fn serve(proxy: Proxy, shutdown: impl Future<Output = ()>, drain: Duration) {
    let Proxy {
        http,
        https,
        edge,
        mut workers,
        server,
        autostop,
    } = proxy;
    let graceful = conns::graceful();
    let (stop, stopping) = watch::channel(false);
    let loads = Loads::new(workers.count());
    let accepting = match (http.into_std(), https.into_std()) {
        (Ok(http), Ok(https)) => workers
            .handles()
            .filter_map(|(worker, runtime)| {
                let listeners = (http.try_clone().ok()?, https.try_clone().ok()?);
                let conns = Conns::new(graceful.clone());
                let (edge, server, stop) = (edge.clone(), server.clone(), stopping.clone());
                let me = (worker, loads.clone());
                Some(runtime.spawn(accept(edge, server, me, listeners, conns, stop)))
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
                edge.released.activity.prune();
            }
            _ = follow.tick() => ports.reconcile(&edge.fib.snapshot()).await,
            Some(Accepted { tcp, peer, spec }) = from_ports.recv() => {
                hand_off(&edge, &server, (&mut workers, &mut conns), tcp, peer, spec);
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
    server: H2Server,
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
                let (edge, server) = (edge.clone(), server.clone());
                conns.spawn(None, move |watcher| {
                    serve_conn(edge, server, (tcp, peer), listener, None, worker, watcher)
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
    server: &H2Server,
    (workers, conns): (&mut crate::workers::Workers, &mut Conns),
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
    let (edge, server) = (edge.clone(), server.clone());
    let (worker, runtime) = workers.next();
    conns.spawn(Some(runtime), move |watcher| async move {
        let Ok(tcp) = TcpStream::from_std(tcp) else {
            return;
        };
        serve_conn(
            edge,
            server,
            (tcp, peer),
            listener,
            Some(spec),
            worker,
            watcher,
        )
        .await;
    });
}

/// One accepted connection, on its worker. On the shared listeners, and on
/// an app's port with `http`, it serves HTTP (over TLS on HTTPS or with
/// `tls`); on an app's port without `http` its bytes go to a machine
/// ([`relay`]).
async fn serve_conn(
    edge: Arc<Edge>,
    server: H2Server,
    (tcp, peer): (TcpStream, SocketAddr),
    listener: Listener,
    spec: Option<Spec>,
    worker: usize,
    watcher: Watcher,
) {
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
            return relay(&edge, tcp, peer, local, &spec).await;
        }
    };
    let conn = Conn {
        listener,
        peer,
        client_ip: HeaderValue::try_from(peer.ip().to_canonical().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        local_port: HeaderValue::from(local.port()),
        worker,
        app,
        want,
        counted: Arc::default(),
    };
    connection(edge, server, tcp, conn, watcher).await;
}

/// A connection to an app's port without `http`: counted against the app,
/// past TLS with `tls`, then relayed to a machine ([`crate::tcp`]).
async fn relay(edge: &Edge, tcp: TcpStream, peer: SocketAddr, local: SocketAddr, spec: &Spec) {
    let Some(_counted) = edge.app_conns.enter(CompactString::from(&*spec.app)) else {
        tracing::info!(app = %spec.app, %peer, "too many connections for the app; closing");
        return;
    };
    if !spec.has("tls") {
        return tcp::relay(edge, tcp, peer, local, &spec.app).await;
    }
    if let Some(stream) = tls(edge, tcp, peer).await {
        tcp::relay(edge, stream, peer, local, &spec.app).await;
    }
}

// ---- tls → connection ----

/// Serves one client connection: TLS first on the HTTPS listener, then
/// HTTP/1.1 ([`h1`]) or h2 (prior knowledge, or by ALPN; hyper's) until the
/// client or a shutdown closes it.
async fn connection(
    edge: Arc<Edge>,
    server: H2Server,
    tcp: TcpStream,
    conn: Conn,
    watcher: Watcher,
) {
    // Small request and response heads should not wait on Nagle.
    let _ = tcp.set_nodelay(true);
    let (listener, peer) = (conn.listener, conn.peer);
    let service = {
        let edge = edge.clone();
        // Boxed: a request's future is several KiB, and an idle connection
        // should not carry room for one.
        move |req: Request<ClientBody>| Box::pin(handle(edge.clone(), conn.clone(), req))
    };
    let ended = match listener {
        Listener::Http => {
            let h1 = |req: Request<h1::body::RequestBody>| service(req.map(ClientBody::Left));
            h1::serve(tcp, &edge.h1, true, watcher.clone(), h1).await
        }
        Listener::Https => {
            let Some(tls) = tls(&edge, tcp, peer).await else {
                return;
            };
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                return h2(&edge, &server, tls, service, watcher, peer).await;
            }
            let h1 = |req: Request<h1::body::RequestBody>| service(req.map(ClientBody::Left));
            h1::serve(tls, &edge.h1, false, watcher.clone(), h1).await
        }
    };
    match ended {
        Ended::H2(io) => h2(&edge, &server, io, service, watcher, peer).await,
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

/// Serves h2 on a connection until the client closes it, or a shutdown
/// has let its open streams finish.
async fn h2<IO, S, F>(
    edge: &Edge,
    server: &H2Server,
    io: IO,
    service: S,
    watcher: Watcher,
    peer: SocketAddr,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Fn(Request<ClientBody>) -> F + Send + Clone + 'static,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = service(req.map(ClientBody::Right));
        async move { Ok::<_, Infallible>(response.await) }
    });
    let served = server.serve_connection(TokioIo::new(io), service);
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

/// The TLS handshake, bounded so a silent client cannot hold a task (or the
/// shutdown drain) forever.
async fn tls(
    edge: &Edge,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let started = Instant::now();
    match tokio::time::timeout(edge.handshake_timeout, edge.tls.accept(tcp)).await {
        Ok(Ok(stream)) => {
            edge.metrics.handshake(Handshake::Ok(started.elapsed()));
            Some(stream)
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

// ---- handle: host → app → body → slot → send → respond ----

/// Serves one request. Never fails: every error becomes a response in
/// [`fail`], and every request is logged and counted once in [`log`].
async fn handle(edge: Arc<Edge>, conn: Conn, req: Request<ClientBody>) -> Response<ProxyBody> {
    let mut ex = Exchange {
        conn,
        id: request_id(&edge.region),
        started: Instant::now(),
        app: None,
        machine: None,
        in_flight: Some(edge.metrics.in_flight()),
        from_machine: false,
        from_region: None,
        via: match req.version() {
            Version::HTTP_2 => "2 hangar",
            Version::HTTP_10 => "1.0 hangar",
            _ => "1.1 hangar",
        },
    };
    match route(&edge, &mut ex, req).await {
        Ok(response) => {
            log(&edge, &ex, &response, None);
            response
        }
        Err(error) => {
            let response = fail(&ex, &error);
            log(&edge, &ex, &response, Some(&error));
            response
        }
    }
}

/// The steps that pick a machine and forward to it, in order.
async fn route(
    edge: &Edge,
    ex: &mut Exchange,
    req: Request<ClientBody>,
) -> Result<Response<ProxyBody>, PathError> {
    let Decided {
        req,
        mut hop,
        mut upgrade,
        pinned,
    } = decide(edge, ex, req)?;
    let (parts, body) = req.into_parts();
    // Held until the exchange is over: the body read whole lives as long.
    let mut share = edge.body_budget.share();
    let body = body::read_body(body, edge.retry_body_bytes, edge.max_body_bytes, &mut share)
        .await
        .map_err(|e| match e {
            ReadBody::TooLarge { limit } => PathError::BodyTooLarge { limit },
            ReadBody::Failed(cause) => PathError::BodyRead(cause),
            ReadBody::Stalled => PathError::BodyStalled {
                after: edge.h1.body_timeout,
            },
        })?;
    let mut req = Box::new(Request::from_parts(parts, body));
    if let Some(upgrade) = &upgrade {
        upgrade.ask(req.headers_mut());
    }
    deliver(edge, ex, &mut hop, req, &mut upgrade, pinned.as_deref()).await
}

/// Where a request goes, decided before anything is awaited.
struct Decided {
    /// The request as the machine gets it, its body still to be read.
    req: Request<ClientBody>,
    hop: Hop,
    upgrade: Option<headers::Upgrade>,
    /// The machine a sticky session pins the client to.
    pinned: Option<CompactString>,
}

/// The app, the first hop and the request for the machine. (Not part of
/// [`route`]'s future: what an async step borrows keeps its room there for
/// as long as the step runs.)
fn decide(
    edge: &Edge,
    ex: &mut Exchange,
    mut req: Request<ClientBody>,
) -> Result<Decided, PathError> {
    ex.from_region = edge.peers.forwarded(req.headers_mut());
    if ex.from_region.is_some()
        && let Some(id) = req.headers().get(FLY_REQUEST_ID)
    {
        // One id for the request in both regions' logs.
        ex.id = id.clone();
    }
    let host = match &ex.conn.app {
        // An app's own address: the Host is the client's business.
        Some(app) => Host {
            app: app.as_ref().into(),
            replace: (!req.headers().contains_key(HOST)).then(|| HeaderValue::from_static("")),
            flycast: None,
        },
        None => host(&edge.fib, &req)?,
    };
    let app = app(&edge.fib, &host.app)?;
    ex.app = Some(app.name.clone());
    let want = match host.flycast {
        // `<app>.flycast`: what the app's flycast address serves on that
        // port over HTTP, to the app's org only.
        Some(port) => {
            org_token(edge, &app, req.headers())?;
            if app.flycast.is_empty() {
                return Err(PathError::NoFlycast(app.name.to_string()));
            }
            Want::HttpPort(port)
        }
        None => ex.conn.want,
    };
    count_connection(edge, &ex.conn, &app.name)?;
    let upgrade = headers::Upgrade::take(&mut req);
    // A sticky session's machine first, unless the client asks otherwise.
    let pinned = sticky::of(&app, want)
        .and_then(|sticky| edge.pins.pinned(&app.name, sticky, req.headers()));
    let steer = Steer::from_headers(req.headers()).or_pinned(pinned.as_deref());
    let hop = Hop::first(app, want, steer);
    let req = upstream_request(req, host)?;
    Ok(Decided {
        req,
        hop,
        upgrade,
        pinned,
    })
}

/// Checks that a request for `<app>.flycast` on a shared listener shows a
/// token of the app's org (`Proxy-Authorization: Bearer`, as to an HTTP
/// proxy): flycast is the org's private way in.
fn org_token(edge: &Edge, app: &AppRoutes, headers: &HeaderMap) -> Result<(), PathError> {
    let org = headers
        .get(PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(hangar_api::auth::bearer)
        .and_then(|token| edge.directory.token_org(token));
    match org {
        Some(org) if org == app.org => Ok(()),
        _ => Err(PathError::FlycastPrivate(app.name.to_string())),
    }
}

/// A request on its way to a machine. Boxed: it goes through every step
/// of the path (and comes back from them when it can go again), and an
/// async step keeps room for what it is given for as long as it runs, so
/// a request by value (300 bytes) would take that room at every level of
/// the request's future, which is moved whole into a box per request.
type Outgoing = Box<Request<UpBody>>;

/// Sends the request on its first hop and on every hop after: where each
/// `fly-replay` sends it, back to the machine that asked when a replay
/// reaches no machine and it said so, or to another region's proxy when
/// this one has no machine for it.
async fn deliver(
    edge: &Edge,
    ex: &mut Exchange,
    hop: &mut Hop,
    mut req: Outgoing,
    upgrade: &mut Option<headers::Upgrade>,
    pinned: Option<&str>,
) -> Result<Response<ProxyBody>, PathError> {
    loop {
        // The request comes back when it can go again (a replay, a fall
        // back, another region): when its body was read whole.
        let (sent, copy) = forward(edge, ex, hop, req, upgrade.is_some()).await;
        let copy = copy.filter(|req| matches!(req.body(), UpBody::Buffered(_)));
        let (error, copy) = match sent {
            Ok(Reply::Local(response)) => return Ok(response),
            Ok(Reply::Machine(answer)) => {
                let Some(asked) = answer.replay() else {
                    return respond(edge, ex, answer, upgrade.take(), pinned);
                };
                let (next, copy) = replay(edge, ex, hop, answer, asked, copy)?;
                *hop = next;
                req = copy;
                continue;
            }
            Err(error) => (error, copy),
        };
        // A replay that reached no machine goes back to the machine that
        // asked for it, when that one said so.
        let Some(back) = hop.fall_back(&error) else {
            // Nothing here for it: maybe in another region.
            return match (elsewhere(edge, ex, hop, &error), copy) {
                // Boxed, as every rare branch below: a request's future is
                // as large as its largest state, and is moved whole.
                (Some(peer), Some(copy)) => Box::pin(to_peer(edge, ex, peer, copy)).await,
                _ => Err(error),
            };
        };
        let Some(mut copy) = copy else {
            return Err(error);
        };
        tracing::debug!(request_id = ?ex.id, %error, "replay failed; falling back");
        edge.metrics.replays.fell_back.inc();
        let failed = replay::failed(error.code(), &error.to_string());
        copy.headers_mut().insert(FLY_REPLAY_FAILED, failed);
        *hop = back;
        req = copy;
    }
}

/// What one hop of a request came back with.
enum Reply {
    /// The proxy answers itself (a `force_https` redirect).
    Local(Response<ProxyBody>),
    /// A machine's response head.
    Machine(Answer),
}

/// A machine's response head, with the slot it holds (its body holds
/// the connection).
struct Answer {
    target: Target,
    lease: Lease,
    response: Response<MachineBody>,
}

impl Answer {
    /// The machine's `fly-replay`, if it asks for one (a switch of
    /// protocols cannot be replayed).
    fn replay(&self) -> Option<HeaderValue> {
        let headers = self.response.headers();
        if self.response.status() == StatusCode::SWITCHING_PROTOCOLS
            || !headers::has(headers, &FLY_REPLAY)
        {
            return None;
        }
        headers.get(FLY_REPLAY).cloned()
    }
}

/// Sends the request to a machine of the hop's choice; a machine that
/// refused the connection never saw the request, which goes to another
/// one, a bounded number of times. A request whose body was read whole is
/// sent again when the connection broke before any answer. The request
/// comes back with the reply when it can go again.
async fn forward(
    edge: &Edge,
    ex: &mut Exchange,
    hop: &Hop,
    mut req: Outgoing,
    upgrade: bool,
) -> (Result<Reply, PathError>, Option<Outgoing>) {
    let mut app = match hop.app.routes(&edge.fib) {
        Ok(app) => app,
        Err(error) => return (Err(error), Some(req)),
    };
    let mut skip: Vec<CompactString> = hop.exclude.iter().cloned().collect();
    let mut last_refusal = None;
    for attempt in 1.. {
        if attempt > 1 {
            // Fresh routes: the machine tried last may be going down.
            app = match Box::pin(after_refusal(edge, &app.name, &skip)).await {
                Ok(app) => app,
                Err(error) => return (Err(error), Some(req)),
            };
        }
        let slot = slot(edge, &app, hop, &skip);
        let slot = match hop.timeout {
            Some(after) => tokio::time::timeout(after, slot)
                .await
                .unwrap_or(Err(PathError::ReplayTimedOut { after })),
            None => slot.await,
        };
        let (target, lease) = match slot {
            Ok(slot) => slot,
            // No machine left to try: the refusal is the answer.
            Err(error) => return (Err(last_refusal.unwrap_or(error)), Some(req)),
        };
        ex.machine = Some(target.machine().id.clone());
        if let Some(redirect) = force_https(&target, ex.conn.listener, &req) {
            return (Ok(Reply::Local(redirect)), None);
        }
        let (sent, back) = send(edge, ex, &target, req, upgrade).await;
        let failure = match sent {
            Ok(response) => {
                let answer = Answer {
                    target,
                    lease,
                    response,
                };
                return (Ok(Reply::Machine(answer)), back);
            }
            Err(failure) => failure,
        };
        req = match (failure, back) {
            // Refused, or a new connection broke too (the machine is going
            // away, or drops what it takes): another machine gets it, or
            // this one once the catalog has it down (see `after_refusal`).
            (Failure::Refused(error) | Failure::Broken { error, fresh: true }, Some(back))
                if attempt < edge.max_attempts =>
            {
                tracing::debug!(request_id = ?ex.id, %error, detail = ?error.detail(), "trying another machine");
                edge.metrics.retries.inc();
                skip.push(target.machine().id.clone());
                last_refusal = Some(error);
                back
            }
            // A pooled connection broke: the machine may have closed its
            // idle connections, or be gone (they were all dropped); a new
            // connection tells. Sent again at most `max_attempts` times in
            // all, like refusals.
            (Failure::Broken { error, .. }, Some(again)) if attempt < edge.max_attempts => {
                tracing::debug!(request_id = ?ex.id, %error, "the connection broke before an answer; sending again on a new one");
                edge.metrics.retries.inc();
                again
            }
            (
                Failure::Refused(error) | Failure::Failed(error) | Failure::Broken { error, .. },
                back,
            ) => {
                return (Err(error), back);
            }
        };
    }
    unreachable!("the attempts loop only ends by returning")
}

/// How long a request whose only machine refused it waits for the catalog
/// to report that machine down (see [`after_refusal`]).
const REFUSED_SETTLE: Duration = Duration::from_millis(500);

/// Fresh routes after a machine (the last of `skip`) refused the
/// connection, or broke a new one. Either may be a machine going down:
/// flyd marks it stopping before it signals it, or stopped once its
/// process is gone, and the FIB follows within milliseconds. When no other
/// machine could take the request, this waits up to [`REFUSED_SETTLE`] for
/// the catalog to stop routing to the refused one, so the request starts it
/// instead of failing.
async fn after_refusal(
    edge: &Edge,
    app: &str,
    skip: &[CompactString],
) -> Result<Arc<AppRoutes>, PathError> {
    let deadline = Instant::now() + REFUSED_SETTLE;
    loop {
        let routes = edge
            .fib
            .lookup(app)
            .ok_or_else(|| PathError::UnknownApp(app.to_string()))?;
        let candidates = routes.candidates();
        let others = candidates.iter().any(|m| !skip.contains(&m.id));
        let refused_up = candidates.iter().any(|m| Some(&m.id) == skip.last());
        if others || !refused_up || Instant::now() >= deadline {
            return Ok(routes);
        }
        tokio::time::sleep(autostart::POLL).await;
    }
}

/// A machine answered with `fly-replay` (`asked`): its response is
/// dropped, and the next hop goes where it says with the request's copy,
/// marked with `fly-replay-src`.
fn replay(
    edge: &Edge,
    ex: &Exchange,
    hop: &Hop,
    answer: Answer,
    asked: HeaderValue,
    copy: Option<Outgoing>,
) -> Result<(Hop, Outgoing), PathError> {
    let from = answer.target.machine();
    let machine = from.id.to_string();
    let replay = Replay::parse(&asked).map_err(|reason| PathError::BadReplay {
        machine: machine.clone(),
        reason,
    })?;
    if hop.fell_back {
        return Err(PathError::BadReplay {
            machine,
            reason: "the request already came back from a failed replay".into(),
        });
    }
    if hop.replays == MAX_REPLAYS {
        return Err(PathError::TooManyReplays {
            machine,
            limit: MAX_REPLAYS,
        });
    }
    let Some(mut copy) = copy else {
        return Err(PathError::ReplayTooLarge {
            machine,
            limit: edge.retry_body_bytes,
        });
    };
    let src = replay::source(&from.id, &from.region, replay.state.as_deref());
    copy.headers_mut().insert(FLY_REPLAY_SRC, src);
    let next = hop.replay(&replay, &answer.target, Want::http(ex.conn.listener));
    tracing::debug!(request_id = ?ex.id, %machine, replay = ?asked, "replaying");
    edge.metrics.replays.replayed.inc();
    // The answer the client will not see: its slot ends, and its connection
    // (pooled again already when the body was empty) closes otherwise.
    drop(answer);
    Ok((next, copy))
}

/// The peer to send a request to that found no machine here: only a
/// client's own request on a shared listener, not one already forwarded
/// by a peer (no loops) or replayed.
fn elsewhere<'a>(
    edge: &'a Edge,
    ex: &Exchange,
    hop: &Hop,
    error: &PathError,
) -> Option<&'a crate::config::Peer> {
    let nothing_here = matches!(
        error,
        PathError::OnlyElsewhere { .. }
            | PathError::NoStartedMachine(_)
            | PathError::NoHealthyMachine(_)
    );
    if !nothing_here || ex.from_region.is_some() || ex.conn.app.is_some() || hop.replays > 0 {
        return None;
    }
    let app = hop.app.routes(&edge.fib).ok()?;
    edge.peers.choose(&app, hop.steer.forced_region())
}

/// Sends the request to another region's proxy and its response back.
async fn to_peer(
    edge: &Edge,
    ex: &mut Exchange,
    peer: &crate::config::Peer,
    mut req: Outgoing,
) -> Result<Response<ProxyBody>, PathError> {
    let region = HeaderValue::from_str(&edge.region)
        .map_err(|e| PathError::Internal(format!("region header: {e}")))?;
    edge.peers.mark(req.headers_mut(), region);
    let proxy = upstream::Machine {
        addr: peer.addr,
        app: ex.app.as_deref().unwrap_or_default().into(),
        id: format!("proxy-{}", peer.region).into(),
    };
    ex.machine = Some(proxy.id.clone());
    tracing::debug!(request_id = ?ex.id, region = %peer.region, "no machine here; forwarding to the region's proxy");
    edge.metrics.forwarded.inc();
    // A pooled connection the peer closed meanwhile breaks under the
    // request: it goes once more on a new one, when that is safe. (Only a
    // request whose body was read whole comes here, and the pool only
    // borrows it.)
    let fwd = forwarded(edge, ex);
    let send = || {
        tokio::time::timeout(
            edge.response_timeout,
            edge.upstreams.send(ex.conn.worker, &proxy, &req, &fwd),
        )
    };
    let mut sent = send().await;
    if matches!(sent, Ok(Err(SendError::Broken { .. }))) && req.method().is_idempotent() {
        sent = send().await;
    }
    let response = match sent {
        Ok(Ok(response)) => response,
        Ok(Err(SendError::Connect { cause, .. })) => {
            return Err(upstream_error(&proxy, true, cause));
        }
        Ok(Err(SendError::Exchange(cause) | SendError::Broken { cause, .. })) => {
            return Err(upstream_error(&proxy, false, cause));
        }
        Err(_) => {
            return Err(PathError::UpstreamTimeout {
                machine: proxy.id.to_string(),
                after: edge.response_timeout,
            });
        }
    };
    let held = Held {
        _lease: None,
        _in_flight: ex.in_flight.take(),
    };
    ex.from_machine = true;
    downstream_response(response, ex, held, None)
}

/// The machine's response for the client: a tunnel after `101`, else the
/// response with the port's header rules applied. A `fly-keep-alive-until`
/// is the proxy's to read ([`crate::autostop`]), not the client's; a
/// sticky service pins the client ([`crate::sticky`]; `pinned`: the
/// machine the request was pinned to).
fn respond(
    edge: &Edge,
    ex: &mut Exchange,
    answer: Answer,
    upgrade: Option<headers::Upgrade>,
    pinned: Option<&str>,
) -> Result<Response<ProxyBody>, PathError> {
    let Answer {
        target,
        lease,
        mut response,
    } = answer;
    let machine = &target.machine().id;
    if headers::has(response.headers(), &FLY_KEEP_ALIVE_UNTIL)
        && let Some(until) = response.headers_mut().remove(FLY_KEEP_ALIVE_UNTIL)
    {
        edge.released.activity.keep_alive(machine, &until);
    }
    if let Some(sticky) = &target.service().sticky {
        let headers = response.headers_mut();
        edge.pins
            .learn(&target.app().name, sticky, machine, pinned, headers);
    }
    let held = Held {
        _lease: Some(lease),
        _in_flight: ex.in_flight.take(),
    };
    ex.from_machine = true;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(upgrade) = upgrade
    {
        return Ok(tunnel(upgrade, &mut response, held, ex));
    }
    let options = target
        .port()
        .and_then(|p| p.http_options.as_ref()?.response.as_ref());
    downstream_response(response, ex, held, options)
}

/// The host a request is for, and the app it names.
#[derive(Debug)]
struct Host {
    app: CompactString,
    /// What the machine gets as Host in place of the client's `Host`
    /// header: the URI's authority (h2, an absolute-form target), or an
    /// empty one when there is none. `None`: the client's header, as is.
    replace: Option<HeaderValue>,
    /// `<app>.flycast[:port]`: the port (80 by default).
    flycast: Option<u16>,
}

/// Reads the host from the URI authority (h2, or an HTTP/1 absolute-form
/// target, which takes precedence over `Host` per RFC 9112 section 3.2.2),
/// else from the `Host` header.
fn host(fib: &Fib, req: &Request<ClientBody>) -> Result<Host, PathError> {
    let (replace, parsed) = match req.uri().authority() {
        Some(authority) => {
            let raw = HeaderValue::from_str(authority.as_str())
                .map_err(|_| PathError::BadHost(HostError::NotText))?;
            (Some(raw), app_of_host(fib, authority.as_str()))
        }
        None => {
            let raw = req
                .headers()
                .get(HOST)
                .ok_or(PathError::BadHost(HostError::Missing))?;
            let text = raw
                .to_str()
                .map_err(|_| PathError::BadHost(HostError::NotText))?;
            (None, app_of_host(fib, text))
        }
    };
    let (app, flycast) = parsed.map_err(PathError::BadHost)?;
    Ok(Host {
        app,
        replace,
        flycast,
    })
}

/// The app a Host names, with the port of `<app>.flycast[:port]`: an
/// app's custom hostname (one with an uploaded certificate) first, then
/// `<app>.flycast`, then `<app>.localhost`.
fn app_of_host(fib: &Fib, raw: &str) -> Result<(CompactString, Option<u16>), HostError> {
    let name = host_name(raw)?;
    if let Some(custom) = fib.snapshot().hostname(&name) {
        return Ok((custom.app.as_str().into(), None));
    }
    if let Some((app, port)) = flycast(raw, &name) {
        return Ok((app.into(), Some(port)));
    }
    localhost_app(raw, &name).map(|app| (app.into(), None))
}

/// A Host's name as the catalog spells names: without its port or a
/// trailing dot (the fully qualified spelling of the same name), in lower
/// case; inline, without an allocation, up to 24 bytes.
fn host_name(raw: &str) -> Result<CompactString, HostError> {
    if raw.is_empty() {
        return Err(HostError::Missing);
    }
    let mut name = CompactString::from(strip_port(raw)?);
    name.as_mut_str().make_ascii_lowercase();
    if name.ends_with('.') {
        name.pop();
    }
    Ok(name)
}

/// The app's routes from the current FIB snapshot.
fn app(fib: &Fib, name: &str) -> Result<Arc<AppRoutes>, PathError> {
    fib.lookup(name)
        .ok_or_else(|| PathError::UnknownApp(name.to_string()))
}

/// Counts the request's connection against its app, once per connection;
/// past `max_conns_per_app` the request is refused.
fn count_connection(edge: &Edge, conn: &Conn, app: &str) -> Result<(), PathError> {
    if edge.app_conns.limit() == 0 || conn.counted.get().is_some() {
        return Ok(());
    }
    let counted =
        edge.app_conns
            .enter(app.into())
            .ok_or_else(|| PathError::TooManyConnections {
                app: app.to_string(),
                limit: edge.app_conns.limit(),
            })?;
    // A concurrent request on the same (h2) connection may have set it
    // first; this one's count is then dropped again.
    let _ = conn.counted.set(counted);
    Ok(())
}

/// Rewrites the client's request for the machine: origin-form
/// `path?query`, HTTP/1.1, the client's Host, no hop-by-hop headers, split
/// cookies joined. (This hop's own headers are added as it goes out:
/// [`forwarded`].)
fn upstream_request(
    mut req: Request<ClientBody>,
    host: Host,
) -> Result<Request<ClientBody>, PathError> {
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
    // Machines are spoken to in HTTP/1.1 whatever the client used.
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    headers::strip_hop_by_hop(headers);
    // Addressed to this proxy, or only this proxy's to say: never passed on.
    const NOT_PASSED: [HeaderName; 3] = [PROXY_AUTHORIZATION, FLY_REPLAY_SRC, FLY_REPLAY_FAILED];
    if headers.keys().any(|n| NOT_PASSED.contains(n)) {
        for name in NOT_PASSED {
            headers.remove(name);
        }
    }
    if let Some(raw) = host.replace {
        headers.insert(HOST, raw);
    }
    headers::join_cookies(headers)
        .map_err(|e| PathError::Internal(format!("cookie header: {e}")))?;
    Ok(req)
}

/// What this hop tells the machine about the request (`Fly-*`,
/// `X-Forwarded-*`, `Via`), added as the request goes out
/// ([`headers::Forwarded`]).
fn forwarded<'a>(edge: &'a Edge, ex: &'a Exchange) -> Forwarded<'a> {
    Forwarded {
        client_ip: &ex.conn.client_ip,
        proto: ex.conn.listener.as_str(),
        port: &ex.conn.local_port,
        region: &edge.region_value,
        request_id: &ex.id,
        via: ex.via,
        from_region: ex.from_region.as_ref(),
    }
}

/// Picks the machine and takes a slot on it; see [`balance`]. When every
/// machine is at its hard limit the request waits in the app's queue
/// ([`crate::queue`]), reading the app's routes afresh on every try. When
/// the app has no machine up, one is started ([`crate::autostart`]) and the
/// request routed again once it is. The hop's [`Steer`] narrows or orders
/// the choice; machines in `skip` are not chosen.
async fn slot(
    edge: &Edge,
    app: &Arc<AppRoutes>,
    hop: &Hop,
    skip: &[CompactString],
) -> Result<(Target, Lease), PathError> {
    let steer = hop.steer.resolve(app, &edge.region)?;
    let want = hop.want;
    let near = Near {
        region: steer.near,
        closer: edge.peers.order(),
    };
    // A machine that refused the request is skipped, unless it has been
    // started for it since.
    let restarted = OnceLock::new();
    let allowed = |m: &RouteMachine| {
        steer.allows(m) && (!skip.contains(&m.id) || restarted.get() == Some(&m.id))
    };
    // A machine that refused the request and is down now may be started
    // for it: autostart only picks machines the catalog shows down.
    let startable = |m: &RouteMachine| steer.allows(m);
    let attempt = |app: &Arc<AppRoutes>| {
        // A preferred machine that can take the request gets it.
        if let Some(id) = steer.prefer_instance {
            let only = |m: &RouteMachine| !allowed(m) || m.id != id;
            if let Ok(target) = balance::choose(app, want, near, only, &mut rand::rng())
                && let Some(lease) = Lease::acquire(&target, Some(&edge.released))
            {
                return Some(Ok((target, lease)));
            }
        }
        let skip = |m: &RouteMachine| !allowed(m);
        match balance::choose(app, want, near, skip, &mut rand::rng()) {
            // A slot taken between choosing and leasing counts as full.
            Ok(target) => Lease::acquire(&target, Some(&edge.released)).map(|l| Ok((target, l))),
            Err(NoTarget::AtCapacity) => None,
            Err(no) => Some(Err(no)),
        }
    };
    let mut app = app.clone();
    let mut started = false;
    loop {
        let found = match attempt(&app) {
            Some(found) => found,
            None => Box::pin(
                edge.queues
                    .wait(&app.name, || attempt(&edge.fib.lookup(&app.name)?)),
            )
            .await
            .map_err(|reason| PathError::AtCapacity {
                app: app.name.to_string(),
                reason,
            })?,
        };
        let no = match found {
            Ok(slot) => {
                if slot.0.past_soft()
                    && let Some(machine) = autostart::pick(&app, want, near, startable)
                {
                    edge.autostart.start_in_background(&app.name, machine);
                }
                return Ok(slot);
            }
            Err(no @ (NoTarget::NoStartedMachine | NoTarget::NoHealthyMachine)) if !started => no,
            // A forced machine or region with nothing up there: start one.
            Err(no @ NoTarget::NoHttpService) if !started && hop.steer.forces() => no,
            Err(no) => return Err(no_target(&app, no, &edge.region)),
        };
        let Some(machine) = autostart::pick(&app, want, near, startable) else {
            return Err(no_target(&app, no, &edge.region));
        };
        Box::pin(edge.autostart.start(&app.name, machine))
            .await
            .map_err(|reason| PathError::StartFailed {
                app: app.name.to_string(),
                machine: machine.id.to_string(),
                reason,
            })?;
        let _ = restarted.set(machine.id.clone());
        started = true;
        app = edge
            .fib
            .lookup(&app.name)
            .ok_or_else(|| PathError::UnknownApp(app.name.to_string()))?;
    }
}

/// The error for an app without a machine for this request. With none here
/// but some in other regions (a regional catalog keeps only this region's
/// machines), the error names those regions, from the catalog's summaries.
fn no_target(app: &AppRoutes, no: NoTarget, region: &str) -> PathError {
    let name = app.name.to_string();
    let elsewhere = app.regions_elsewhere(region);
    if app.candidates().is_empty() && !elsewhere.is_empty() {
        return PathError::OnlyElsewhere {
            app: name,
            region: region.to_string(),
            elsewhere: elsewhere.iter().map(|r| r.region.to_string()).collect(),
        };
    }
    match no {
        NoTarget::NoStartedMachine => PathError::NoStartedMachine(name),
        NoTarget::NoHealthyMachine => PathError::NoHealthyMachine(name),
        NoTarget::NoHttpService => PathError::NoHttpService(name),
        NoTarget::AtCapacity => PathError::AtCapacity {
            app: name,
            reason: QueueError::Full,
        },
    }
}

/// `301` to the same URL over https, when the service's port for this
/// listener says `force_https`.
fn force_https(
    target: &Target,
    listener: Listener,
    req: &Request<UpBody>,
) -> Option<Response<ProxyBody>> {
    if listener != Listener::Http || target.port()?.force_https != Some(true) {
        return None;
    }
    // The Host as the client sent it, without the plain-text port.
    let host = req.headers().get(HOST)?.to_str().ok()?;
    let host = strip_port(host).unwrap_or(host);
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = HeaderValue::from_str(&format!("https://{host}{path}")).ok()?;
    let mut response = Response::new(ProxyBody::local(""));
    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
    response.headers_mut().insert(LOCATION, location);
    response
        .headers_mut()
        .insert(SERVER, HeaderValue::from_static("hangar"));
    Some(response)
}

/// Sends the request to the target and waits for the response head, for at
/// most the response timeout. A request whose body was read whole goes on
/// a pooled connection, which only borrows it; the rest (an upgrade, which
/// goes on a connection of its own handed over to the tunnel if the
/// machine switches protocols, a streamed body, an h2 machine) go through
/// hyper's client, which takes them. The request comes back when it can
/// go again.
async fn send(
    edge: &Edge,
    ex: &Exchange,
    target: &Target,
    req: Outgoing,
    upgrade: bool,
) -> (Result<Response<MachineBody>, Failure>, Option<Outgoing>) {
    let m = target.machine();
    let machine = upstream::Machine {
        addr: SocketAddr::new(m.private_ip, target.internal_port()),
        app: target.app().name.clone(),
        id: m.id.clone(),
    };
    let (method, buffered) = (
        req.method().clone(),
        matches!(req.body(), UpBody::Buffered(_)),
    );
    let h2 = target
        .port()
        .and_then(|p| p.http_options.as_ref()?.h2_backend)
        == Some(true);
    let within = edge.response_timeout;
    let forwarded = forwarded(edge, ex);
    let (sent, back) = if buffered && !upgrade && !h2 {
        let sent = edge
            .upstreams
            .send(ex.conn.worker, &machine, &req, &forwarded);
        (tokio::time::timeout(within, sent).await, Some(req))
    } else {
        // hyper takes the request: a copy stays (only a body read whole
        // can go again). Boxed: hyper's client futures are large, and
        // these are rare.
        let copy = body::copy(&req).map(Box::new);
        let sent: std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>> = if h2 && !upgrade {
            let req = for_h2(*req, machine.addr);
            Box::pin(
                edge.upstreams
                    .send_h2(ex.conn.worker, &machine, req, &forwarded),
            )
        } else {
            Box::pin(
                edge.upstreams
                    .send_unpooled(&machine, *req, upgrade, &forwarded),
            )
        };
        (tokio::time::timeout(within, sent).await, copy)
    };
    let failure = match sent {
        Ok(Ok(response)) => return (Ok(response), back),
        // A request given away and refused comes back whole.
        Ok(Err(SendError::Connect { cause, request })) => {
            let error = upstream_error(&machine, true, cause);
            return (Err(Failure::Refused(error)), request.or(back));
        }
        Ok(Err(SendError::Broken { cause, fresh })) if method.is_idempotent() && buffered => {
            Failure::Broken {
                error: upstream_error(&machine, false, cause),
                fresh,
            }
        }
        Ok(Err(SendError::Exchange(cause) | SendError::Broken { cause, .. })) => {
            let mut error = upstream_error(&machine, false, cause);
            if let PathError::Upstream { not_retried, .. } = &mut error {
                *not_retried = why_not_retried(&method, buffered, edge.retry_body_bytes);
            }
            Failure::Failed(error)
        }
        Err(_) => Failure::Failed(PathError::UpstreamTimeout {
            machine: machine.id.to_string(),
            after: edge.response_timeout,
        }),
    };
    (Err(failure), back)
}

/// How one attempt to forward failed.
enum Failure {
    /// The machine could not be connected to: the request never left.
    Refused(PathError),
    /// The connection broke under a request that is safe to send again
    /// (idempotent, body read whole) before any answer; `fresh` when it
    /// was a new connection (see [`SendError::Broken`]).
    Broken { error: PathError, fresh: bool },
    /// Anything else.
    Failed(PathError),
}

/// An HTTP/1.1-shaped request made ready for h2: the Host moves into the
/// URI's authority (h2's `:authority`), the machine's address standing in
/// when the client sent none usable.
fn for_h2(mut req: Request<UpBody>, addr: SocketAddr) -> Request<UpBody> {
    let host = req.headers_mut().remove(HOST);
    let authority = host
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| {
            http::uri::Authority::try_from(addr.to_string().as_str())
                .expect("a socket address is an authority")
        });
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path);
    if let Ok(uri) = Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
    req
}

/// Why a request that failed at the machine was not sent again (it is
/// only when it went out on a reused connection that turned out closed,
/// and could be repeated safely).
fn why_not_retried(method: &http::Method, buffered: bool, keep: u64) -> Option<String> {
    if !buffered {
        Some(format!(
            "not retried: the request body was larger than {keep} bytes and was streamed"
        ))
    } else if !method.is_idempotent() {
        Some(format!("not retried: {method} is not idempotent"))
    } else {
        None
    }
}

/// The machine's response for the client: hop-by-hop headers out, request
/// id, `Via` and `Server` in (unless the port asks for `pristine`
/// responses), the port's own response headers applied, body streamed
/// through holding `held`.
fn downstream_response(
    response: Response<MachineBody>,
    ex: &Exchange,
    held: Held,
    options: Option<&HttpResponseOptions>,
) -> Result<Response<ProxyBody>, PathError> {
    let mut response = response.map(|body| ProxyBody::upstream(body, held));
    // The client's connection decides its own version; hyper frames it.
    *response.version_mut() = Version::HTTP_11;
    let headers = response.headers_mut();
    headers::strip_hop_by_hop(headers);
    if options.and_then(|o| o.pristine) != Some(true) {
        headers.insert(FLY_REQUEST_ID, ex.id.clone());
        headers::append_to_list(headers, VIA, &HeaderValue::from_static("1.1 hangar"))
            .map_err(|e| PathError::Internal(format!("response via: {e}")))?;
        headers
            .entry(SERVER)
            .or_insert(HeaderValue::from_static("hangar"));
    }
    if let Some(set) = options.and_then(|o| o.headers.as_ref()) {
        headers::apply_configured(headers, set);
    }
    Ok(response)
}

/// The machine switched protocols: the client gets the `101`, and a task
/// joins the two upgraded connections, holding the request's lease (a
/// tunnel counts against the machine's limits while it is open).
fn tunnel(
    upgrade: headers::Upgrade,
    response: &mut Response<MachineBody>,
    held: Held,
    ex: &Exchange,
) -> Response<ProxyBody> {
    let machine_side = hyper::upgrade::on(&mut *response);
    let id = ex.id.clone();
    let mut switched = Response::new(ProxyBody::empty());
    let headers = switched.headers_mut();
    for (name, value) in response.headers() {
        headers.append(name, value.clone());
    }
    headers::strip_hop_by_hop(headers);
    *switched.status_mut() = upgrade.switched(switched.headers_mut());
    switched.headers_mut().insert(FLY_REQUEST_ID, ex.id.clone());
    tokio::spawn(async move {
        let _held = held;
        match tokio::join!(upgrade.client.io(), machine_side) {
            (Ok(mut client), Ok(machine)) => {
                let mut machine = TokioIo::new(machine);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut machine).await {
                    tracing::debug!(request_id = ?id, error = %e, "tunnel ended with an error");
                }
            }
            (client, machine) => tracing::debug!(
                request_id = ?id,
                client = ?client.err(),
                machine = ?machine.err(),
                "upgrade failed"
            ),
        }
    });
    switched
}

fn upstream_error(machine: &upstream::Machine, connect: bool, cause: String) -> PathError {
    PathError::Upstream {
        machine: machine.id.to_string(),
        addr: machine.addr,
        connect,
        cause,
        not_retried: None,
    }
}

// ---- log ----

/// Counts the response and logs the request: at debug when it went fine or
/// the client was at fault, at warn when the proxy or a machine was.
fn log(edge: &Edge, ex: &Exchange, response: &Response<ProxyBody>, error: Option<&PathError>) {
    let elapsed = ex.started.elapsed();
    let status = response.status();
    let listener = ex.conn.listener;
    edge.metrics.observe(&Observed {
        app: ex.app.as_deref().unwrap_or(""),
        region: &edge.region,
        status,
        elapsed,
        error: error.map(PathError::code),
        from_machine: ex.from_machine,
    });
    let app = ex.app.as_deref().unwrap_or("-");
    let machine = ex.machine.as_deref().unwrap_or("-");
    let id = ex.id.to_str().unwrap_or("-");
    match error {
        Some(e) if e.side() != Side::Client => tracing::warn!(
            request_id = id,
            app,
            machine,
            status = status.as_u16(),
            ?elapsed,
            listener = listener.as_str(),
            side = ?e.side(),
            retryable = e.retryable(),
            error = %e,
            detail = e.detail().as_deref().unwrap_or("-"),
            "request failed"
        ),
        _ => tracing::debug!(
            request_id = id,
            app,
            machine,
            status = status.as_u16(),
            ?elapsed,
            listener = listener.as_str(),
            error = error.map(tracing::field::display),
            "request"
        ),
    }
}

// ---- fail ----

/// The proxy's own answer to a request it could not forward: the status of
/// the error and its one-line message as text.
fn fail(ex: &Exchange, error: &PathError) -> Response<ProxyBody> {
    // Messages quote client input with `{:?}`, which escapes line breaks,
    // so the body is always exactly one line.
    let mut response = Response::new(ProxyBody::local(format!("{error}\n")));
    *response.status_mut() = error.status();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(SERVER, HeaderValue::from_static("hangar"));
    headers.insert(FLY_REQUEST_ID, ex.id.clone());
    headers.insert(FLY_PROXY_ERROR, HeaderValue::from_static(error.code()));
    if let Some(after) = error.retry_after() {
        headers.insert(RETRY_AFTER, HeaderValue::from(after));
    }
    response
}

/// A new request id: a ULID (time-ordered, so logs sort) and the region.
fn request_id(region: &str) -> HeaderValue {
    let mut ulid = [0u8; ulid::ULID_LEN];
    let ulid = ulid::Ulid::new().array_to_str(&mut ulid);
    let mut id = bytes::BytesMut::with_capacity(ulid.len() + 1 + region.len());
    id.extend_from_slice(ulid.as_bytes());
    id.extend_from_slice(b"-");
    id.extend_from_slice(region.as_bytes());
    // A ULID is base32 and `ProxyConfig::validate` keeps the region to
    // [a-z0-9-], so this cannot fail; the fallback keeps it panic-free anyway.
    HeaderValue::from_maybe_shared(id.freeze())
        .unwrap_or_else(|_| HeaderValue::from_static("invalid-request-id"))
}

// ---- host parsing ----

/// Why a request's host names no app. Its `Display` is the client's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// No `Host` header and no URI authority.
    Missing,
    /// The host is not visible ASCII.
    NotText,
    /// The host is not `name[:port]`.
    Malformed(String),
    /// The host is well-formed but not `<app>.localhost`.
    NotAnApp(String),
    /// The label before `.localhost` is not a valid app name.
    BadAppName(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("missing Host header"),
            Self::NotText => f.write_str("Host header is not valid text"),
            Self::Malformed(host) => write!(f, "malformed Host {host:?}"),
            Self::NotAnApp(host) => {
                write!(f, "Host {host:?} is not <app>.localhost or <app>.flycast")
            }
            Self::BadAppName(name) => write!(
                f,
                "{name:?} is not an app name (1-63 characters of a-z, 0-9 and -, not starting or ending with -)"
            ),
        }
    }
}

impl std::error::Error for HostError {}

/// Parses a Host value (`hello.localhost`, `Hello.LocalHost:8080`,
/// `hello.localhost.`) into the app name it routes to.
pub fn parse_host(raw: &str) -> Result<String, HostError> {
    localhost_app(raw, &host_name(raw)?).map(str::to_string)
}

/// The app of `<app>.localhost`, `name` being `raw`'s [`host_name`].
fn localhost_app<'a>(raw: &str, name: &'a str) -> Result<&'a str, HostError> {
    let app = name
        .strip_suffix(".localhost")
        .ok_or_else(|| HostError::NotAnApp(raw.to_string()))?;
    if AppName::valid(app) {
        Ok(app)
    } else {
        Err(HostError::BadAppName(app.to_string()))
    }
}

/// `<app>.flycast[:port]` → the app and the port (80 when none): the name
/// an app's private services go by. Anything else is `None`.
pub fn parse_flycast(raw: &str) -> Option<(String, u16)> {
    let name = host_name(raw).ok()?;
    flycast(raw, &name).map(|(app, port)| (app.to_string(), port))
}

/// The app and port of `<app>.flycast[:port]`, `name` being `raw`'s
/// [`host_name`].
fn flycast<'a>(raw: &str, name: &'a str) -> Option<(&'a str, u16)> {
    let app = name
        .strip_suffix(".flycast")
        .filter(|app| AppName::valid(app))?;
    let port = match raw.rsplit_once(':') {
        Some((_, port)) if !port.is_empty() => port.parse().ok()?,
        _ => 80,
    };
    Some((app, port))
}

/// `name[:port]` → `name`. The port may be empty (RFC 3986 allows it) but
/// otherwise must be a number. An IPv6 literal is well-formed but no app.
fn strip_port(raw: &str) -> Result<&str, HostError> {
    if raw.starts_with('[') {
        return Err(HostError::NotAnApp(raw.to_string()));
    }
    let (name, port) = match raw.split_once(':') {
        Some((name, port)) => (name, port),
        None => (raw, ""),
    };
    // `u16::from_str` alone would accept a leading `+`.
    let port_ok = port.is_empty()
        || (port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok());
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if port_ok && name_ok {
        Ok(name)
    } else {
        Err(HostError::Malformed(raw.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_nothing_here_the_error_names_the_regions_that_have_machines() {
        use hangar_catalog::RegionSummary;
        let summary = |region: &str, routable, capacity| RegionSummary {
            region: region.into(),
            started: routable,
            stopped: 1,
            suspended: 0,
            routable,
            capacity,
        };
        let app = Arc::new(AppRoutes {
            regions: Arc::new([
                summary("ams", 0, 0),
                summary("ord", 1, 20),
                summary("syd", 2, 40),
            ]),
            ..AppRoutes::empty("hello")
        });
        let err = no_target(&app, NoTarget::NoStartedMachine, "ams");
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            err.to_string(),
            "app \"hello\" has no machine taking traffic in region ams; it has in syd, ord"
        );
        let nowhere = Arc::new(AppRoutes::empty("hello"));
        assert!(matches!(
            no_target(&nowhere, NoTarget::NoStartedMachine, "ams"),
            PathError::NoStartedMachine(_)
        ));
    }

    #[test]
    fn good_hosts_name_their_app() {
        for (raw, app) in [
            ("hello.localhost", "hello"),
            ("hello.localhost:8080", "hello"),
            ("Hello.LocalHost:8443", "hello"),
            ("hello.localhost.", "hello"),
            ("hello.localhost:", "hello"),
            ("my-app-2.localhost", "my-app-2"),
            (&format!("{}.localhost", "a".repeat(63)), &"a".repeat(63)),
        ] {
            assert_eq!(parse_host(raw).as_deref(), Ok(app), "{raw}");
        }
    }

    #[test]
    fn malformed_hosts_are_rejected_with_a_reason() {
        use HostError::*;
        let cases: &[(&str, HostError)] = &[
            ("", Missing),
            (
                "hello.localhost:80:80",
                Malformed("hello.localhost:80:80".into()),
            ),
            (
                "hello.localhost:http",
                Malformed("hello.localhost:http".into()),
            ),
            (
                "hello.localhost:99999",
                Malformed("hello.localhost:99999".into()),
            ),
            (
                "hello.localhost:+80",
                Malformed("hello.localhost:+80".into()),
            ),
            (":8080", Malformed(":8080".into())),
            ("hel lo.localhost", Malformed("hel lo.localhost".into())),
            ("hello.localhost/x", Malformed("hello.localhost/x".into())),
            (
                "user@hello.localhost",
                Malformed("user@hello.localhost".into()),
            ),
            ("localhost", NotAnApp("localhost".into())),
            ("localhost:8080", NotAnApp("localhost:8080".into())),
            ("hello.example.com", NotAnApp("hello.example.com".into())),
            ("127.0.0.1:8080", NotAnApp("127.0.0.1:8080".into())),
            ("[::1]:8080", NotAnApp("[::1]:8080".into())),
            (".localhost", BadAppName("".into())),
            ("a.b.localhost", BadAppName("a.b".into())),
            ("my_app.localhost", BadAppName("my_app".into())),
            // flaps never makes such a name, so none routes.
            ("-foo.localhost", BadAppName("-foo".into())),
            ("foo-.localhost", BadAppName("foo-".into())),
            (
                &format!("{}.localhost", "a".repeat(64)),
                BadAppName("a".repeat(64)),
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(parse_host(raw).as_ref(), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn flycast_names_name_their_app_and_port() {
        assert_eq!(parse_flycast("hello.flycast"), Some(("hello".into(), 80)));
        assert_eq!(
            parse_flycast("Hello.Flycast.:8080"),
            Some(("hello".into(), 8080))
        );
        assert_eq!(parse_flycast("hello.flycast:"), Some(("hello".into(), 80)));
        for other in [
            "hello.localhost",
            "a.b.flycast",
            ".flycast",
            "hello.flycast:x",
            "flycast",
        ] {
            assert_eq!(parse_flycast(other), None, "{other}");
        }
    }

    #[test]
    fn host_errors_read_as_one_line() {
        let e = parse_host("evil\u{7f}.localhost").unwrap_err();
        assert!(!e.to_string().contains('\n'));
        assert_eq!(
            parse_host("example.com").unwrap_err().to_string(),
            r#"Host "example.com" is not <app>.localhost or <app>.flycast"#
        );
    }
}
