//! `hangar dev`: builds every part in one process, writes the bound
//! addresses and the dev token for scripts, and shuts down in order on
//! Ctrl-C or SIGTERM: the proxy and flaps stop taking requests and drain,
//! then flyd stops every machine and records it stopped.

use crate::config::Config;
use anyhow::Context;
use hangar_catalog::{Catalog, ClusterKey, Rib, SecretBox, files};
use hangar_flyd::{Flyd, Listen};
use hangar_proxy::{Metrics, Proxy};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Resolves once shutdown has begun.
async fn stopping(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

/// The addresses every listener is bound to, as `addrs.json` records them.
#[derive(serde::Serialize)]
struct Addrs {
    flaps: SocketAddr,
    http: SocketAddr,
    https: SocketAddr,
    metrics: SocketAddr,
    /// `ip:port`, or `unix:<path>`.
    flyd: String,
}

/// Writes `text` to `path` whole (see [`files::write_atomically`]).
fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    // Addresses are no secret: readable as any file the user writes.
    files::write_atomically(path, text.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))
}

/// What every part shares: the RIB, the secrets key and the cluster
/// credential in the data dir.
struct Shared {
    rib: Arc<Rib>,
    secrets: Arc<SecretBox>,
    cluster: Arc<ClusterKey>,
}

impl Shared {
    fn open(data_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        // A data dir made before (or by hand) may be open to others.
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", data_dir.display()))?;
        Ok(Self {
            rib: Rib::open(&data_dir.join("rib.sqlite"))?,
            secrets: Arc::new(SecretBox::load_or_create(&data_dir.join("secrets.key"))?),
            cluster: Arc::new(ClusterKey::load_or_create(&data_dir.join("cluster.key"))?),
        })
    }
}

/// A running flyd: its RPC server, registered in the RIB as its host.
struct FlydPart {
    flyd: Arc<Flyd>,
    /// `ip:port`, or `unix:<path>`.
    addr: String,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Opens flyd on `dir` (its store and machines), resumes what a previous
/// run left, and serves its RPC.
async fn start_flyd(
    cfg: &Config,
    dir: &Path,
    shared: &Shared,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<FlydPart> {
    let flyd = Flyd::open(
        cfg.flyd.clone(),
        dir,
        shared.rib.clone(),
        shared.secrets.clone(),
    )
    .await?;
    let router = hangar_flyd::rpc::router(flyd.clone(), shared.cluster.clone());
    let stopped = stopping(stop.clone());
    let (addr, server) = match &cfg.flyd.listen {
        Listen::Tcp(at) => {
            let listener = bind(*at, "flyd").await?;
            let addr = listener.local_addr()?.to_string();
            let server = axum::serve(listener, router).with_graceful_shutdown(stopped);
            (addr, tokio::spawn(server.into_future()))
        }
        Listen::Unix(path) => {
            // Absolute: the RIB gives it to processes in other directories.
            let path = std::path::absolute(dir.join(path))?;
            // A socket left by a run that did not stop cleanly.
            let _ = std::fs::remove_file(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("binding the flyd socket {}", path.display()))?;
            // Owner only, whatever the umask: the credential is not all.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            let server = axum::serve(listener, router).with_graceful_shutdown(stopped);
            (
                format!("unix:{}", path.display()),
                tokio::spawn(server.into_future()),
            )
        }
    };
    flyd.register(addr.clone())?;
    Ok(FlydPart { flyd, addr, server })
}

/// A running proxy with its FIB, the follower keeping it current, and the
/// metrics endpoint.
struct EdgePart {
    http: SocketAddr,
    https: SocketAddr,
    metrics: SocketAddr,
    proxy: tokio::task::JoinHandle<()>,
    metrics_server: tokio::task::JoinHandle<()>,
    drain: Duration,
    _catalog: Catalog,
}

async fn start_edge(
    cfg: &Config,
    shared: &Shared,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<EdgePart> {
    let catalog = Catalog::start(&cfg.catalog, shared.rib.clone(), &cfg.proxy.region)?;
    let fib = catalog.fib().clone();
    let metrics = Arc::new(Metrics::new(fib.clone()).with_rib(shared.rib.clone()));
    let hosts = Arc::new(RibHosts(shared.rib.clone()));
    let proxy = Proxy::bind(
        cfg.proxy.clone(),
        fib,
        &cfg.data_dir,
        &metrics,
        shared.secrets.clone(),
        hosts,
        shared.cluster.clone(),
    )
    .await?;
    let (http, https) = (proxy.http_addr(), proxy.https_addr());
    let drain = cfg.proxy.drain();
    let proxy = tokio::spawn(proxy.serve(stopping(stop.clone()), drain));
    let metrics_listener = bind(cfg.metrics.listen, "metrics").await?;
    let metrics_addr = metrics_listener.local_addr()?;
    let metrics_server = tokio::spawn(hangar_proxy::serve_metrics(
        metrics_listener,
        metrics,
        stopping(stop.clone()),
    ));
    Ok(EdgePart {
        http,
        https,
        metrics: metrics_addr,
        proxy,
        metrics_server,
        drain,
        _catalog: catalog,
    })
}

impl EdgePart {
    /// Stops taking requests and lets those in flight finish.
    async fn drain(self) {
        for (name, task, drain) in [
            ("proxy", self.proxy, self.drain),
            ("metrics", self.metrics_server, DRAIN),
        ] {
            if tokio::time::timeout(drain + Duration::from_secs(1), task)
                .await
                .is_err()
            {
                tracing::warn!(part = name, "did not stop in time");
            }
        }
    }
}

/// Waits for a server task to end after shutdown began.
async fn join_server(name: &str, task: tokio::task::JoinHandle<std::io::Result<()>>) {
    match tokio::time::timeout(DRAIN, task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(part = name, error = %e, "server error"),
        _ => tracing::warn!(part = name, "did not stop in time"),
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let data_dir = cfg.data_dir.clone();
    let shared = Shared::open(&data_dir)?;
    let addrs_path = data_dir.join("addrs.json");
    // A stale file would send scripts to the previous run's ports.
    let _ = std::fs::remove_file(&addrs_path);
    let rib = shared.rib.clone();
    let token = hangar_flaps::auth::dev_token(&rib, &cfg.flaps.dev_org, &data_dir.join("token"))?;
    let (stop_tx, stop_rx) = watch::channel(false);

    // flyd first: it resumes what a previous run left before anyone calls it.
    let flyd = start_flyd(&cfg, &data_dir, &shared, &stop_rx).await?;
    let edge = start_edge(&cfg, &shared, &stop_rx).await?;

    let flaps = hangar_flaps::Flaps::new(
        cfg.flaps.clone(),
        rib.clone(),
        shared.secrets.clone(),
        &shared.cluster,
    );
    let flaps_listener = bind(cfg.flaps.listen, "Machines API").await?;
    let flaps_addr = flaps_listener.local_addr()?;
    let flaps_server = tokio::spawn(
        axum::serve(flaps_listener, hangar_flaps::router(flaps))
            .with_graceful_shutdown(stopping(stop_rx.clone()))
            .into_future(),
    );

    let addrs = Addrs {
        flaps: flaps_addr,
        http: edge.http,
        https: edge.https,
        metrics: edge.metrics,
        flyd: flyd.addr.clone(),
    };
    write_atomic(&addrs_path, &serde_json::to_string(&addrs)?)?;
    println!(
        "Hangar is running (data in {dir})\n\
         \x20 Machines API  http://{flaps_addr}/v1\n\
         \x20 proxy HTTP    http://{http_addr}   (apps answer at http://<app>.localhost:{http_port})\n\
         \x20 proxy HTTPS   https://{https_addr}  (self-signed certificate for *.localhost)\n\
         \x20 metrics       http://{metrics_addr}/metrics\n\
         \x20 flyd RPC      {flyd_addr} (cluster credential in cluster.key)\n\
         \x20 dev token     {token}\n\n\
         export TOKEN={token}\n\
         Press Ctrl-C to stop.",
        dir = data_dir.display(),
        http_addr = edge.http,
        https_addr = edge.https,
        metrics_addr = edge.metrics,
        flyd_addr = flyd.addr,
        http_port = edge.http.port(),
    );

    wait_for_signal().await?;
    tracing::info!("shutting down: draining requests, then stopping machines");
    let _ = stop_tx.send(true);
    edge.drain().await;
    join_server("flaps", flaps_server).await;
    join_server("flyd", flyd.server).await;
    flyd.flyd.shutdown().await;
    let _ = std::fs::remove_file(&addrs_path);
    tracing::info!("stopped");
    Ok(())
}

/// `hangar flyd`: one more host, in `flyd.region`, beside a `hangar dev`
/// sharing the data dir (its RIB and secrets key). Its store and machines
/// live in `<data dir>/hosts/<host_id>`; it writes its address to
/// `<data dir>/addrs-flyd-<host_id>.json`. Give each host its own
/// `flyd.private_range`.
pub async fn run_flyd(cfg: Config) -> anyhow::Result<()> {
    let shared = Shared::open(&cfg.data_dir)?;
    let dir = cfg.data_dir.join("hosts").join(&cfg.flyd.host_id);
    let addrs_path = cfg
        .data_dir
        .join(format!("addrs-flyd-{}.json", cfg.flyd.host_id));
    let _ = std::fs::remove_file(&addrs_path);
    let (stop_tx, stop_rx) = watch::channel(false);
    let flyd = start_flyd(&cfg, &dir, &shared, &stop_rx).await?;
    let addrs = serde_json::json!({ "flyd": flyd.addr });
    write_atomic(&addrs_path, &addrs.to_string())?;
    println!(
        "flyd {} (region {}) is running: {}",
        cfg.flyd.host_id, cfg.flyd.region, flyd.addr
    );
    wait_for_signal().await?;
    let _ = stop_tx.send(true);
    join_server("flyd", flyd.server).await;
    flyd.flyd.shutdown().await;
    let _ = std::fs::remove_file(&addrs_path);
    Ok(())
}

/// `hangar proxy`: one more edge, in `proxy.region`, beside a `hangar dev`
/// sharing the data dir; it writes its addresses to
/// `<data dir>/addrs-proxy-<region>.json`.
pub async fn run_proxy(cfg: Config) -> anyhow::Result<()> {
    let shared = Shared::open(&cfg.data_dir)?;
    let addrs_path = cfg
        .data_dir
        .join(format!("addrs-proxy-{}.json", cfg.proxy.region));
    let _ = std::fs::remove_file(&addrs_path);
    let (stop_tx, stop_rx) = watch::channel(false);
    let edge = start_edge(&cfg, &shared, &stop_rx).await?;
    let addrs = serde_json::json!({
        "http": edge.http,
        "https": edge.https,
        "metrics": edge.metrics,
    });
    write_atomic(&addrs_path, &addrs.to_string())?;
    println!(
        "proxy (region {}) is running: http://{}  https://{}",
        cfg.proxy.region, edge.http, edge.https
    );
    wait_for_signal().await?;
    let _ = stop_tx.send(true);
    edge.drain().await;
    let _ = std::fs::remove_file(&addrs_path);
    Ok(())
}

/// The proxy finds each host's flyd (to start machines), and the org of
/// a token it is shown, in the RIB.
struct RibHosts(Arc<Rib>);

impl hangar_proxy::scaling::autostart::Directory for RibHosts {
    fn address(&self, host: &str) -> Option<String> {
        match self.0.host(host) {
            Ok(row) => row.map(|h| h.address),
            Err(e) => {
                tracing::warn!(host, error = %e, "reading a host's address");
                None
            }
        }
    }

    fn token_org(&self, token: &str) -> Option<String> {
        match self.0.token_org(&hangar_flaps::auth::hash_token(token)) {
            Ok(org) => org,
            Err(e) => {
                tracing::warn!(error = %e, "reading a token's org");
                None
            }
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
