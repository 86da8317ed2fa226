//! `hangar dev`: builds every part in one process, writes the bound
//! addresses and the dev token for scripts, and shuts down in order on
//! Ctrl-C or SIGTERM: the proxy and flaps stop taking requests and drain,
//! then flyd stops every machine and records it stopped.

use crate::config::{CatalogMode, Config};
use anyhow::Context;
use hangar_catalog::{Fib, FibOptions, Follower, FollowerOptions, Mode, Rib, SecretBox};
use hangar_flyd::Flyd;
use hangar_proxy::{Metrics, Proxy};
use std::net::SocketAddr;
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
    flyd: SocketAddr,
}

/// Writes `text` to `path` through a temporary file, so a reader never sees
/// a partial file.
fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let data_dir = cfg.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let addrs_path = data_dir.join("addrs.json");
    // A stale file would send scripts to the previous run's ports.
    let _ = std::fs::remove_file(&addrs_path);

    let rib = Rib::open(&data_dir.join("rib.sqlite"))?;
    let secrets = Arc::new(SecretBox::load_or_create(&data_dir.join("secrets.key"))?);
    let token = hangar_flaps::auth::dev_token(&rib, &cfg.flaps.dev_org, &data_dir.join("token"))?;
    let (stop_tx, stop_rx) = watch::channel(false);

    // flyd first: it resumes what a previous run left before anyone calls it.
    let flyd = Flyd::open(cfg.flyd.clone(), &data_dir, rib.clone(), secrets.clone()).await?;
    let flyd_listener = bind(cfg.flyd.listen, "flyd").await?;
    let flyd_addr = flyd_listener.local_addr()?;
    flyd.register(flyd_addr)?;
    let flyd_server = tokio::spawn(
        axum::serve(flyd_listener, hangar_flyd::rpc::router(flyd.clone()))
            .with_graceful_shutdown(stopping(stop_rx.clone()))
            .into_future(),
    );

    let fib = Fib::load_with(&rib, fib_options(&cfg))?;
    let follower = Follower::spawn(
        fib.clone(),
        rib.clone(),
        FollowerOptions {
            poll: Duration::from_millis(cfg.catalog.poll_ms),
            watchdog: (cfg.catalog.watchdog_ms > 0)
                .then(|| Duration::from_millis(cfg.catalog.watchdog_ms)),
            ..FollowerOptions::default()
        },
    )?;

    let compactor = tokio::spawn(compact_feed(
        rib.clone(),
        cfg.catalog.keep_changes,
        Duration::from_millis(cfg.catalog.compact_interval_ms),
        stopping(stop_rx.clone()),
    ));

    let flaps = hangar_flaps::Flaps::new(cfg.flaps.clone(), rib.clone(), secrets.clone());
    let flaps_listener = bind(cfg.flaps.listen, "Machines API").await?;
    let flaps_addr = flaps_listener.local_addr()?;
    let flaps_server = tokio::spawn(
        axum::serve(flaps_listener, hangar_flaps::router(flaps))
            .with_graceful_shutdown(stopping(stop_rx.clone()))
            .into_future(),
    );

    let metrics = Arc::new(Metrics::new(fib.clone()).with_rib(rib.clone()));
    let hosts = Arc::new(RibHosts(rib.clone()));
    let proxy = Proxy::bind(
        cfg.proxy.clone(),
        fib.clone(),
        &data_dir,
        &metrics,
        secrets,
        hosts,
    )
    .await?;
    let (http_addr, https_addr) = (proxy.http_addr(), proxy.https_addr());
    let proxy_drain = cfg.proxy.drain();
    let proxy_server = tokio::spawn(proxy.serve(stopping(stop_rx.clone()), proxy_drain));
    let metrics_listener = bind(cfg.metrics.listen, "metrics").await?;
    let metrics_addr = metrics_listener.local_addr()?;
    let metrics_server = tokio::spawn(hangar_proxy::serve_metrics(
        metrics_listener,
        metrics.clone(),
        stopping(stop_rx.clone()),
    ));

    let addrs = Addrs {
        flaps: flaps_addr,
        http: http_addr,
        https: https_addr,
        metrics: metrics_addr,
        flyd: flyd_addr,
    };
    write_atomic(&addrs_path, &serde_json::to_string(&addrs)?)?;
    println!(
        "Hangar is running (data in {dir})\n\
         \x20 Machines API  http://{flaps_addr}/v1\n\
         \x20 proxy HTTP    http://{http_addr}   (apps answer at http://<app>.localhost:{http_port})\n\
         \x20 proxy HTTPS   https://{https_addr}  (self-signed certificate for *.localhost)\n\
         \x20 metrics       http://{metrics_addr}/metrics\n\
         \x20 flyd RPC      http://{flyd_addr}\n\
         \x20 dev token     {token}\n\n\
         export TOKEN={token}\n\
         Press Ctrl-C to stop.",
        dir = data_dir.display(),
        http_port = http_addr.port(),
    );

    wait_for_signal().await?;
    tracing::info!("shutting down: draining requests, then stopping machines");
    let _ = stop_tx.send(true);
    for (name, task, drain) in [
        ("proxy", proxy_server, proxy_drain),
        ("metrics", metrics_server, DRAIN),
    ] {
        if tokio::time::timeout(drain + Duration::from_secs(1), task)
            .await
            .is_err()
        {
            tracing::warn!(part = name, "did not stop in time");
        }
    }
    for (name, task) in [("flaps", flaps_server), ("flyd", flyd_server)] {
        match tokio::time::timeout(DRAIN, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(part = name, error = %e, "server error"),
            _ => tracing::warn!(part = name, "did not stop in time"),
        }
    }
    flyd.shutdown().await;
    drop(follower);
    let _ = compactor.await;
    let _ = std::fs::remove_file(&addrs_path);
    tracing::info!("stopped");
    Ok(())
}

/// The proxy finds each host's flyd (to start machines) in the RIB.
struct RibHosts(Arc<Rib>);

impl hangar_proxy::autostart::HostDirectory for RibHosts {
    fn address(&self, host: &str) -> Option<String> {
        match self.0.host(host) {
            Ok(row) => row.map(|h| h.address),
            Err(e) => {
                tracing::warn!(host, error = %e, "reading a host's address");
                None
            }
        }
    }
}

fn fib_options(cfg: &Config) -> FibOptions {
    FibOptions {
        mode: match cfg.catalog.mode {
            CatalogMode::Global => Mode::Global,
            CatalogMode::Regional => Mode::Regional(cfg.flyd.region.as_str().into()),
        },
        lock_wait: Duration::from_millis(cfg.catalog.lock_wait_ms),
    }
}

/// Compacts the RIB's change feed every `every`, keeping `keep` changes.
async fn compact_feed(rib: Arc<Rib>, keep: u64, every: Duration, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
        match rib.compact_feed(keep) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "compacted the rib change feed"),
            Err(e) => tracing::warn!(error = %e, "compacting the rib change feed"),
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
