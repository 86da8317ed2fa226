//! [`Edge`]: what every connection and request shares, built from the
//! config in one place ([`Edge::new`]).

use crate::config::ProxyConfig;
use crate::conn_limit::{AppConns, ClientConns};
use crate::error::ProxyError;
use crate::forwarding::body::BodyBudget;
use crate::forwarding::upstream::Upstreams;
use crate::h1;
use crate::metrics::{EdgeMetrics, Metrics};
use crate::routing::peers::Peers;
use crate::routing::sticky::Pins;
use crate::scaling::Release;
use crate::scaling::autostart::{Autostart, Directory};
use crate::scaling::autostop::Activity;
use crate::scaling::queue::Queues;
use crate::scaling::slot::Slots;
use hangar_catalog::{ClusterKey, Fib};
use http::header::HeaderValue;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::Arc;
use std::time::Duration;

/// What every request on every connection shares.
pub(crate) struct Edge {
    pub fib: Arc<Fib>,
    /// Keep-alive connections to machines, pooled per `private_ip:port`.
    pub upstreams: Upstreams,
    pub region: String,
    /// `region` as a header value (`Fly-Region`).
    pub region_value: HeaderValue,
    pub metrics: EdgeMetrics,
    pub tls: Arc<rustls::ServerConfig>,
    pub handshake_timeout: Duration,
    /// Taking a slot on a machine: choosing, queueing, autostart.
    pub slots: Slots,
    /// When each machine was last busy, and how long it asked to be kept
    /// (`fly-keep-alive-until`): autostop's clock.
    pub activity: Arc<Activity>,
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
    pub body_budget: BodyBudget,
    /// Client connections per app.
    pub app_conns: Arc<AppConns>,
    /// Open connections per client address (`proxy.max_conns_per_ip`).
    pub client_conns: Arc<ClientConns>,
    /// Hosts' and tokens' entries in the RIB (tokens: for flycast on the
    /// shared listeners).
    pub directory: Arc<dyn Directory>,
    /// Sticky sessions pinned by a header value.
    pub pins: Pins,
    /// The limits of HTTP/1 connections.
    pub h1: h1::Settings,
    /// The h2 server for clients that speak it, with its limits.
    pub h2: H2Server,
    /// Other regions' proxies.
    pub peers: Peers,
}

impl Edge {
    /// The edge `cfg` describes (validated already), with `workers` worker
    /// threads, routes from `fib`, TLS from `tls`, machines started through
    /// the flyd hosts `directory` names with the `cluster` credential.
    pub(crate) fn new(
        cfg: &ProxyConfig,
        (fib, directory): (Arc<Fib>, Arc<dyn Directory>),
        metrics: &Metrics,
        cluster: Arc<ClusterKey>,
        tls: Arc<rustls::ServerConfig>,
        workers: usize,
    ) -> Result<Self, ProxyError> {
        let queues = Arc::new(Queues::new(
            cfg.queue_max_per_app,
            cfg.queue_timeout(),
            metrics.edge().queued,
        ));
        let activity = Arc::new(Activity::new());
        let autostart = Arc::new(Autostart::new(
            fib.clone(),
            directory.clone(),
            (cfg.autostart_hold(), cfg.autostart_max_waiting),
            cluster.token(),
            metrics.edge(),
        ));
        Ok(Self {
            upstreams: Upstreams::new(
                workers,
                cfg.connect_timeout(),
                cfg.max_idle_per_machine,
                cfg.idle_timeout(),
                metrics.edge().upstream,
            )
            .keeping(cfg.peers.iter().map(|p| p.addr)),
            region: cfg.region.to_string(),
            // A region name is a DNS label, so always a header value.
            region_value: HeaderValue::from_str(&cfg.region)
                .map_err(|e| ProxyError::Config(vec![format!("proxy.region: {e}")]))?,
            metrics: metrics.edge(),
            tls,
            handshake_timeout: cfg.handshake_timeout(),
            slots: Slots {
                fib: fib.clone(),
                region: cfg.region.to_string(),
                closer: cfg.peers.clone(),
                released: Arc::new(Release {
                    queues: queues.clone(),
                    activity: activity.clone(),
                }),
                queues,
                autostart,
            },
            activity,
            pins: Pins::new(),
            h1: h1::Settings {
                header_timeout: cfg.header_timeout(),
                max_head: cfg.max_header_bytes,
                body_timeout: cfg.body_timeout(),
            },
            h2: h2_server(cfg),
            peers: Peers::new(cfg.peers.clone(), cluster),
            max_attempts: cfg.max_attempts.max(1),
            response_timeout: cfg.response_timeout(),
            retry_body_bytes: cfg.retry_body_bytes,
            max_body_bytes: cfg.max_body_bytes,
            body_budget: BodyBudget::new(cfg.max_buffered_body_bytes),
            app_conns: AppConns::new(cfg.max_conns_per_app),
            client_conns: ClientConns::new(cfg.max_conns_per_ip),
            directory,
            fib,
        })
    }
}

/// The h2 server for clients, with the limits against bad ones: a request
/// head must fit in `max_header_bytes`, and connections that stop
/// answering pings are closed (HTTP/1 has the same limits, [`h1::Settings`]).
pub(crate) type H2Server = hyper::server::conn::http2::Builder<TokioExecutor>;

fn h2_server(cfg: &ProxyConfig) -> H2Server {
    let mut server = H2Server::new(TokioExecutor::new());
    server
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(cfg.header_timeout())
        .keep_alive_timeout(cfg.header_timeout())
        // WebSockets over h2 (RFC 8441), proxied as HTTP/1.1 upgrades.
        .enable_connect_protocol();
    server
}
