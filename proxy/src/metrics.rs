//! The proxy's Prometheus metrics and the `/metrics` endpoint.
//!
//! - `fly_edge_http_requests_total{status, listener}`: responses sent.
//! - `fly_edge_http_response_time_seconds{listener}`: time until the
//!   response head was ready (forwarded or produced by the proxy).
//! - `fly_edge_inflight_requests`: requests whose response has not finished.
//! - `fly_edge_upstream_requests_total{connection}`: requests sent to
//!   machines on a `new` or a `reused` keep-alive connection.
//! - `fly_app_machines{state}`: machines in the FIB by state, read from the
//!   current snapshot at scrape time, with every state present (zeros too).
//!
//! `GET /debug/catalog` on the same listener shows the catalog as JSON: FIB
//! size, its feed position and lag behind the RIB, batches and reloads, the
//! writer lock's holder, last holder and waits per call site, and the RIB's
//! connection locks.

use crate::Listener;
use crate::conns::Conns;
use bytes::Bytes;
use hangar_catalog::{Fib, Rib};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Response-time buckets, in seconds: a loopback hop is well under a
/// millisecond, a slow app a few seconds.
const RESPONSE_TIME_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How long the metrics endpoint waits for open scrapes at shutdown.
/// Scrapes take milliseconds; anything longer is a stuck client.
const METRICS_DRAIN: Duration = Duration::from_secs(2);

/// The proxy's metrics and the registry they are exported from.
///
/// Built once per process and shared: [`crate::Proxy::bind`] takes the
/// handles it updates, [`serve_metrics`] exports the registry.
pub struct Metrics {
    registry: Registry,
    edge: EdgeMetrics,
    fib: Arc<Fib>,
    /// For the RIB side of `/debug/catalog`, when the process has one.
    rib: Option<Arc<Rib>>,
}

/// The handles the request path updates. Cloning shares the same series.
#[derive(Clone)]
pub(crate) struct EdgeMetrics {
    requests: IntCounterVec,
    /// One histogram per listener, resolved once so the hot path skips the
    /// label lookup.
    response_time: [Histogram; 2],
    inflight: IntGauge,
    pub(crate) upstream: UpstreamCounters,
}

/// Requests sent to machines by the kind of connection they went on.
#[derive(Clone)]
pub(crate) struct UpstreamCounters {
    pub(crate) new: IntCounter,
    pub(crate) reused: IntCounter,
}

impl Metrics {
    /// Creates the registry with the proxy's metrics and the
    /// `fly_app_machines` collector reading `fib`.
    pub fn new(fib: Arc<Fib>) -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "fly_edge_http_requests_total",
                "HTTP responses sent by the edge proxy",
            ),
            &["status", "listener"],
        )
        .expect("static metric definition is valid");
        let response_time = HistogramVec::new(
            HistogramOpts::new(
                "fly_edge_http_response_time_seconds",
                "Time from request to response head at the edge proxy",
            )
            .buckets(RESPONSE_TIME_BUCKETS.to_vec()),
            &["listener"],
        )
        .expect("static metric definition is valid");
        let inflight = IntGauge::new(
            "fly_edge_inflight_requests",
            "Requests in flight at the edge proxy, until their response body ends",
        )
        .expect("static metric definition is valid");
        let upstream = IntCounterVec::new(
            Opts::new(
                "fly_edge_upstream_requests_total",
                "Requests sent to machines, by whether their keep-alive connection was new or reused",
            ),
            &["connection"],
        )
        .expect("static metric definition is valid");
        let machines = MachineCounts::new(fib.clone());

        // Registration only fails on duplicate names, and this registry is new.
        registry
            .register(Box::new(requests.clone()))
            .expect("fresh registry accepts fly_edge_http_requests_total");
        registry
            .register(Box::new(response_time.clone()))
            .expect("fresh registry accepts fly_edge_http_response_time_seconds");
        registry
            .register(Box::new(inflight.clone()))
            .expect("fresh registry accepts fly_edge_inflight_requests");
        registry
            .register(Box::new(upstream.clone()))
            .expect("fresh registry accepts fly_edge_upstream_requests_total");
        registry
            .register(Box::new(machines))
            .expect("fresh registry accepts fly_app_machines");

        let response_time = [Listener::Http, Listener::Https]
            .map(|l| response_time.with_label_values(&[l.as_str()]));
        Self {
            registry,
            edge: EdgeMetrics {
                requests,
                response_time,
                inflight,
                upstream: UpstreamCounters {
                    new: upstream.with_label_values(&["new"]),
                    reused: upstream.with_label_values(&["reused"]),
                },
            },
            fib,
            rib: None,
        }
    }

    /// Adds the RIB to what `/debug/catalog` shows.
    pub fn with_rib(mut self, rib: Arc<Rib>) -> Self {
        self.rib = Some(rib);
        self
    }

    /// The body of `/debug/catalog`.
    pub fn catalog_debug(&self) -> serde_json::Value {
        let fib = self.fib.stats();
        let rib = self.rib.as_ref().map(|rib| {
            let last_seq = rib.last_seq().ok();
            serde_json::json!({
                "last_seq": last_seq,
                "fib_lag_changes": last_seq.map(|last| last.saturating_sub(fib.seq)),
                "locks": rib.locks(),
            })
        });
        serde_json::json!({ "fib": fib, "rib": rib })
    }

    /// The registry holding every proxy metric; other parts of the process
    /// may register theirs here too.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry's contents in the Prometheus text format (0.0.4).
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }

    pub(crate) fn edge(&self) -> EdgeMetrics {
        self.edge.clone()
    }
}

impl EdgeMetrics {
    /// Counts one response and the time to its head.
    pub(crate) fn observe(&self, listener: Listener, status: StatusCode, elapsed: Duration) {
        self.requests
            .with_label_values(&[status.as_str(), listener.as_str()])
            .inc();
        self.response_time[listener.index()].observe(elapsed.as_secs_f64());
    }

    /// Counts one request in flight until the guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.inflight.inc();
        InFlight(self.inflight.clone())
    }
}

/// One request in `fly_edge_inflight_requests`; released on drop.
#[derive(Debug)]
pub(crate) struct InFlight(IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The `fly_app_machines{state}` collector: counts are computed from the FIB
/// snapshot at scrape time rather than kept up to date on every change.
struct MachineCounts {
    fib: Arc<Fib>,
    opts: Opts,
    /// Only for [`Collector::desc`]; each scrape fills a fresh vec so two
    /// concurrent scrapes never mix their snapshots.
    described: IntGaugeVec,
}

impl MachineCounts {
    fn new(fib: Arc<Fib>) -> Self {
        let opts = Opts::new(
            "fly_app_machines",
            "Machines known to the edge proxy, by state",
        );
        let described =
            IntGaugeVec::new(opts.clone(), &["state"]).expect("static metric definition is valid");
        Self {
            fib,
            opts,
            described,
        }
    }
}

impl Collector for MachineCounts {
    fn desc(&self) -> Vec<&Desc> {
        self.described.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let snapshot = self.fib.snapshot();
        let gauges = match IntGaugeVec::new(self.opts.clone(), &["state"]) {
            Ok(gauges) => gauges,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: fly_app_machines could not be built");
                return Vec::new();
            }
        };
        for (state, n) in snapshot.machine_counts() {
            gauges
                .with_label_values(&[state.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        gauges.collect()
    }
}

/// Serves `GET /metrics` (Prometheus text format 0.0.4) on `listener` until
/// `shutdown` resolves; every other path is 404. Open scrapes get a short
/// grace period before the function returns.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let mut conns = Conns::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = conns.reap() => {}
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        crate::conns::accept_failed("metrics", &e).await;
                        continue;
                    }
                };
                let metrics = metrics.clone();
                let service = hyper::service::service_fn(move |req| {
                    let response = scrape(&metrics, &req);
                    async move { Ok::<_, Infallible>(response) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service);
                conns.spawn(&tokio::runtime::Handle::current(), |watcher| async move {
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(error = %e, "metrics: connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    conns.drain("metrics", METRICS_DRAIN).await;
}

fn scrape(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match metrics.render() {
            Ok(text) => (StatusCode::OK, prometheus::TEXT_FORMAT, text),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: encoding failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                )
            }
        },
        (&Method::GET, "/debug/catalog") => (
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", metrics.catalog_debug()),
        ),
        (_, "/metrics" | "/debug/catalog") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_catalog::Rib;
    use http_body_util::{BodyExt, Empty};

    fn empty_fib() -> (tempfile::TempDir, Arc<Fib>) {
        let dir = tempfile::tempdir().unwrap();
        let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
        let fib = Fib::load(&rib).unwrap();
        (dir, fib)
    }

    #[test]
    fn text_has_every_metric_and_every_machine_state() {
        let (_dir, fib) = empty_fib();
        let metrics = Metrics::new(fib);
        let edge = metrics.edge();
        edge.observe(Listener::Http, StatusCode::OK, Duration::from_millis(3));
        let guard = edge.in_flight();

        let text = metrics.render().unwrap();
        assert!(
            text.contains(r#"fly_edge_http_requests_total{listener="http",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"fly_edge_http_response_time_seconds_count{listener="http"} 1"#));
        assert!(text.contains(r#"fly_edge_http_response_time_seconds_count{listener="https"} 0"#));
        assert!(text.contains("fly_edge_inflight_requests 1"));
        assert!(text.contains(r#"fly_edge_upstream_requests_total{connection="reused"} 0"#));
        for state in hangar_api::machine::MachineState::ALL {
            let sample = format!("fly_app_machines{{state=\"{state}\"}} 0");
            assert!(text.contains(&sample), "missing {sample} in {text}");
        }
        drop(guard);
        assert!(
            metrics
                .render()
                .unwrap()
                .contains("fly_edge_inflight_requests 0")
        );
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_and_404s_the_rest() {
        let (_dir, fib) = empty_fib();
        let metrics = Arc::new(Metrics::new(fib));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_metrics(listener, metrics, async {
            let _ = stopped.await;
        }));

        tokio::time::timeout(Duration::from_secs(10), async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            for (path, status) in [("/metrics", StatusCode::OK), ("/", StatusCode::NOT_FOUND)] {
                let req = Request::get(path)
                    .header(header::HOST, "localhost")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = sender.send_request(req).await.unwrap();
                assert_eq!(response.status(), status, "{path}");
                let body = response.into_body().collect().await.unwrap().to_bytes();
                if status == StatusCode::OK {
                    assert!(
                        std::str::from_utf8(&body)
                            .unwrap()
                            .contains("fly_app_machines")
                    );
                }
            }
            stop.send(()).unwrap();
            server.await.unwrap();
        })
        .await
        .expect("metrics endpoint answered and shut down in time");
    }
}
