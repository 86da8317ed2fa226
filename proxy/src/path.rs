//! The request path, top to bottom, in call order:
//!
//! handle → route: decide (host → app → steering) → read body → deliver,
//! per hop: forward (slot → force_https → send, again on another machine
//! when the failure allows) → a `fly-replay`? the next hop; no machine?
//! fallback or another region → respond (or tunnel) → log; every failure
//! answered by `fail`.
//!
//! One short function per step; a step that cannot go on returns a
//! [`PathError`], which says what it allows next ([`Again`]), and `fail()`
//! alone turns errors into responses. Nothing here takes a lock: the FIB is
//! read through an immutable snapshot and the load counters are atomics.

use crate::config::Listener;
use crate::conn_limit::Counted;
use crate::edge::Edge;
use crate::error::{Again, FLY_PROXY_ERROR, Failed, PathError, Side};
use crate::forwarding::body::{self, ClientBody, Held, ProxyBody, ReadBody, UpBody};
use crate::forwarding::headers::{self, FLY_REQUEST_ID, Forwarded};
use crate::forwarding::upstream::{self, MachineBody, SendError};
use crate::metrics::{InFlight, Observed};
use crate::routing::balance::{Lease, Target, Want};
use crate::routing::host::{self, Host, strip_port};
use crate::routing::replay::{
    self, FLY_REPLAY, FLY_REPLAY_FAILED, FLY_REPLAY_SRC, MAX_REPLAYS, Replay,
};
use crate::routing::steer::{Hop, Steer};
use crate::routing::sticky;
use crate::scaling::autostop::FLY_KEEP_ALIVE_UNTIL;
use compact_str::CompactString;
use hangar_api::machine::HttpResponseOptions;
use hangar_catalog::{AppRoutes, Fib};
use http::header::{
    CONTENT_TYPE, HOST, HeaderName, HeaderValue, LOCATION, PROXY_AUTHORIZATION, RETRY_AFTER,
    SERVER, VIA,
};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The connection a request arrived on.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    /// `Http` or `Https`: the scheme, on a shared listener or an app's
    /// address.
    pub(crate) listener: Listener,
    /// The client's address as the machine is told it (`Fly-Client-IP`,
    /// `X-Forwarded-For`), made once per connection.
    pub(crate) client_ip: HeaderValue,
    /// The port the client connected to, for `X-Forwarded-Port`.
    pub(crate) local_port: HeaderValue,
    /// The worker thread serving the connection; see [`crate::listening::workers`].
    pub(crate) worker: usize,
    /// On an app's own address: that app, whatever the Host says.
    pub(crate) app: Option<Arc<str>>,
    /// What to ask of the machines' services.
    pub(crate) want: Want,
    /// The connection's place in its app's connection count, taken by its
    /// first request; see [`crate::conn_limit`].
    pub(crate) counted: Arc<OnceLock<Counted<CompactString>>>,
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

/// Serves one request. Never fails: every error becomes a response in
/// [`fail`], and every request is logged and counted once in [`log`].
pub(crate) async fn handle(
    edge: Arc<Edge>,
    conn: Conn,
    req: Request<ClientBody>,
) -> Response<ProxyBody> {
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

/// A new request id: a ULID (time-ordered, so logs sort) and the region.
fn request_id(region: &str) -> HeaderValue {
    let mut ulid = [0u8; ulid::ULID_LEN];
    let ulid = ulid::Ulid::new().array_to_str(&mut ulid);
    let mut id = bytes::BytesMut::with_capacity(ulid.len() + 1 + region.len());
    id.extend_from_slice(ulid.as_bytes());
    id.extend_from_slice(b"-");
    id.extend_from_slice(region.as_bytes());
    // A ULID is base32 and a region name is a DNS label, so this cannot
    // fail; the fallback keeps it panic-free anyway.
    HeaderValue::from_maybe_shared(id.freeze())
        .unwrap_or_else(|_| HeaderValue::from_static("invalid-request-id"))
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
        None => host::host(&edge.fib, &req)?,
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

/// The app's routes from the current FIB snapshot.
fn app(fib: &Fib, name: &str) -> Result<Arc<AppRoutes>, PathError> {
    fib.lookup(name)
        .ok_or_else(|| PathError::UnknownApp(name.to_string()))
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
        let slot = edge.slots.take(&app, hop.want, &hop.steer, &skip);
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
        let error = match sent {
            Ok(response) => {
                let answer = Answer {
                    target,
                    lease,
                    response,
                };
                return (Ok(Reply::Machine(answer)), back);
            }
            Err(error) => error,
        };
        // What the failure allows, while attempts are left (`max_attempts`
        // in all, whatever the reason).
        req = match (error.again(), back) {
            // Refused, or a new connection broke too (the machine is going
            // away, or drops what it takes): another machine gets it, or
            // this one once the catalog has it down (see `after_refusal`).
            (Again::OtherMachine, Some(back)) if attempt < edge.max_attempts => {
                tracing::debug!(request_id = ?ex.id, %error, detail = ?error.detail(), "trying another machine");
                edge.metrics.retries.inc();
                skip.push(target.machine().id.clone());
                last_refusal = Some(error);
                back
            }
            // A pooled connection broke: the machine may have closed its
            // idle connections, or be gone (they were all dropped); a new
            // connection tells.
            (Again::NewConnection, Some(again)) if attempt < edge.max_attempts => {
                tracing::debug!(request_id = ?ex.id, %error, "the connection broke before an answer; sending again on a new one");
                edge.metrics.retries.inc();
                again
            }
            (_, back) => return (Err(error), back),
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
    let settled = |routes: &AppRoutes| {
        let candidates = routes.candidates();
        let others = candidates.iter().any(|m| !skip.contains(&m.id));
        let refused_up = candidates.iter().any(|m| Some(&m.id) == skip.last());
        others || !refused_up
    };
    let deadline = tokio::time::Instant::now() + REFUSED_SETTLE;
    let mut changed = edge.fib.changed();
    changed
        .until(deadline, || {
            edge.fib.lookup(app).is_none_or(|r| settled(&r))
        })
        .await;
    edge.fib
        .lookup(app)
        .ok_or_else(|| PathError::UnknownApp(app.to_string()))
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
) -> (Result<Response<MachineBody>, PathError>, Option<Outgoing>) {
    let m = target.machine();
    let machine = upstream::Machine {
        addr: SocketAddr::new(m.private_ip, target.internal_port()),
        app: target.app().name.clone(),
        id: m.id.clone(),
    };
    let buffered = matches!(req.body(), UpBody::Buffered(_));
    let resend = Again::resend(req.method(), buffered, edge.retry_body_bytes);
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
    match outcome(edge, &machine, sent, resend) {
        Ok(response) => (Ok(response), back),
        // A request given away and refused comes back whole.
        Err((error, request)) => (Err(error), request.or(back)),
    }
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

/// What a send to `machine` (or a peer) came back with: the response, or
/// the error with what it allows next ([`Again::after`]; `resend`: whether
/// the request could go again as it was) and the request, when a failure
/// gave back a request it had taken.
fn outcome(
    edge: &Edge,
    machine: &upstream::Machine,
    sent: Result<Result<Response<MachineBody>, SendError>, tokio::time::error::Elapsed>,
    resend: Result<(), String>,
) -> Result<Response<MachineBody>, (PathError, Option<Outgoing>)> {
    let error = match sent {
        Ok(Ok(response)) => return Ok(response),
        Ok(Err(error)) => error,
        Err(_) => {
            let after = edge.response_timeout;
            let machine = machine.id.to_string();
            return Err((PathError::UpstreamTimeout { machine, after }, None));
        }
    };
    let (failed, cause, request) = error.failed();
    let error = PathError::upstream((&machine.id, machine.addr), failed, cause, resend);
    Err((error, request))
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
    if error.again() != Again::OtherRegion
        || ex.from_region.is_some()
        || ex.conn.app.is_some()
        || hop.replays > 0
    {
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
    // A peer is the region's one way in, so what would go to another
    // machine goes once more to the same peer: a request on a connection
    // that broke under it (a pooled one the peer closed meanwhile, or a new
    // one), when the request allows it. (Only a request whose body was read
    // whole comes here.) A refused connect is not tried again at once.
    let fwd = forwarded(edge, ex);
    let resend = Again::resend(req.method(), true, edge.retry_body_bytes);
    let send = || async {
        let sent = edge.upstreams.send(ex.conn.worker, &proxy, &req, &fwd);
        outcome(
            edge,
            &proxy,
            tokio::time::timeout(edge.response_timeout, sent).await,
            resend.clone(),
        )
    };
    let mut sent = send().await;
    if let Err((
        PathError::Upstream {
            failed: Failed::Broken { .. },
            again: Again::NewConnection | Again::OtherMachine,
            ..
        },
        _,
    )) = &sent
    {
        sent = send().await;
    }
    let response = sent.map_err(|(error, _)| error)?;
    let held = Held {
        _lease: None,
        _in_flight: ex.in_flight.take(),
    };
    ex.from_machine = true;
    downstream_response(response, ex, held, None)
}

/// The machine's response for the client: a tunnel after `101`, else the
/// response with the port's header rules applied. A `fly-keep-alive-until`
/// is the proxy's to read ([`crate::scaling::autostop`]), not the client's; a
/// sticky service pins the client ([`crate::routing::sticky`]; `pinned`: the
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
        edge.activity.keep_alive(machine, &until);
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
            again = ?e.again(),
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
