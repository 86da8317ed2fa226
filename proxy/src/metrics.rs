//! The proxy's Prometheus metrics and the `/metrics` endpoint. Names follow
//! Fly's where Fly has one; `region` is this proxy's region.
//!
//! Per request:
//! - `fly_edge_http_responses_count{app, region, status}`: every response
//!   the edge sent, the proxy's own errors included (`app` is empty when
//!   the request named none).
//! - `fly_edge_http_response_time_seconds{app, region, status}`: time until
//!   the response head was ready.
//! - `fly_app_http_responses_count{app, region, status}`: responses that
//!   came from the app's machines.
//! - `fly_edge_proxy_errors_count{code}`: the proxy's own error responses
//!   by code (`PR04`, ...; see [`crate::PathError::code`]).
//! - `fly_edge_http_retries_count`: requests sent to another machine after
//!   one refused the connection.
//! - `fly_edge_http_forwarded_count`: requests sent to another region's
//!   proxy because this region had no machine for them.
//! - `fly_edge_http_replays_count{result}`: `fly-replay` answers followed
//!   (`replayed`), and replays that could not reach their target and went
//!   back to the machine that asked (`fell_back`).
//! - `fly_edge_autostarts_count{result}` and
//!   `fly_edge_autostart_time_seconds`: machines started for requests;
//!   `fly_edge_autostops_count{result}` and `fly_edge_autostop_time_seconds`:
//!   idle machines stopped.
//! - `fly_edge_upstream_requests_total{connection}`: requests sent to
//!   machines on a `new` or a `reused` keep-alive connection.
//!
//! Per connection:
//! - `fly_edge_tcp_connects_count{listener}`: client connections accepted.
//! - `fly_edge_tls_handshakes_count{result}`: `ok`, `error`, `timeout`.
//! - `fly_edge_tls_handshake_time_seconds`: successful handshakes.
//! - `fly_edge_http_connection_errors_count{reason}`: client connections
//!   ended by the proxy: `header_timeout` (no whole request head in time,
//!   or idle keep-alive), `bad_request` (answered 400/414/431 by the HTTP
//!   layer).
//!
//! Gauges:
//! - `fly_edge_inflight_requests`: requests whose response has not finished.
//! - `fly_edge_queued_requests`: requests waiting for a slot.
//! - `fly_app_concurrency{app, region}`: requests in flight per app and
//!   machine region, read from the FIB at scrape time.
//! - `fly_app_machines{state}`: machines in the FIB by state, read at scrape
//!   time, with every state present (zeros too).
//!
//! `GET /debug/catalog` on the same listener shows the catalog as JSON: FIB
//! size, its feed position and lag behind the RIB, batches and reloads, the
//! writer lock's holder, last holder and waits per call site, and the RIB's
//! connection locks.

use crate::config::Listener;
use crate::conns::Conns;
use crate::hash::FastHash;
use bytes::Bytes;
use compact_str::CompactString;
use dashmap::DashMap;
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
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Response-time buckets, in seconds: a loopback hop is well under a
/// millisecond, a slow app a few seconds.
const RESPONSE_TIME_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// TLS handshake buckets, in seconds.
const HANDSHAKE_BUCKETS: [f64; 8] = [0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25, 1.0];

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

/// `fly-replay` outcomes.
#[derive(Clone)]
pub(crate) struct Replays {
    pub(crate) replayed: IntCounter,
    pub(crate) fell_back: IntCounter,
}

/// The handles the request path updates. Cloning shares the same series.
#[derive(Clone)]
pub(crate) struct EdgeMetrics {
    responses: IntCounterVec,
    response_time: HistogramVec,
    app_responses: IntCounterVec,
    /// The three series above for each (app, region, status) seen, looked
    /// up in their vectors once: a vector lookup hashes every label value
    /// and takes the vector's lock, three times a response.
    series: Arc<DashMap<SeriesKey, Series, FastHash>>,
    errors: IntCounterVec,
    pub(crate) retries: IntCounter,
    pub(crate) replays: Replays,
    pub(crate) forwarded: IntCounter,
    inflight: IntGauge,
    pub(crate) queued: IntGauge,
    pub(crate) upstream: UpstreamCounters,
    /// Indexed by [`Listener::index`].
    tcp_connects: [IntCounter; 2],
    tls_ok: IntCounter,
    tls_error: IntCounter,
    tls_timeout: IntCounter,
    tls_time: Histogram,
    connection_errors: IntCounterVec,
    pub(crate) autostarts: Outcomes,
    pub(crate) autostops: Outcomes,
}

/// Something the proxy does now and then (start a machine, stop one):
/// counted by result, and timed.
#[derive(Clone)]
pub(crate) struct Outcomes {
    ok: IntCounter,
    failed: IntCounter,
    time: Histogram,
}

impl Outcomes {
    /// Counts one, and how long it took.
    pub(crate) fn record(&self, ok: bool, took: Duration) {
        if ok { &self.ok } else { &self.failed }.inc();
        self.time.observe(took.as_secs_f64());
    }
}

/// Requests sent to machines by the kind of connection they went on.
#[derive(Clone)]
pub(crate) struct UpstreamCounters {
    pub(crate) new: IntCounter,
    pub(crate) reused: IntCounter,
}

/// How a TLS handshake ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Handshake {
    Ok(Duration),
    Error,
    Timeout,
}

/// Registers metrics on one registry; every definition here is static, so
/// failing is a programming error.
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn add<C: Collector + Clone + 'static>(&self, metric: C) -> C {
        self.0
            .register(Box::new(metric.clone()))
            .expect("a fresh registry accepts each metric once");
        metric
    }

    fn counter(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(Histogram::with_opts(opts).expect("valid metric"))
    }

    /// A `result` counter (`ok`, `failed`) and a time histogram, as
    /// (name, help) each.
    fn outcomes(&self, count: (&str, &str), time: (&str, &str)) -> Outcomes {
        let counts = self.counter(count.0, count.1, &["result"]);
        Outcomes {
            ok: counts.with_label_values(&["ok"]),
            failed: counts.with_label_values(&["failed"]),
            time: self.histogram(time.0, time.1, &RESPONSE_TIME_BUCKETS),
        }
    }
}

impl Metrics {
    /// Creates the registry with the proxy's metrics and the collectors
    /// reading `fib`.
    pub fn new(fib: Arc<Fib>) -> Self {
        let registry = Registry::new();
        let r = Registrar(&registry);
        let by_app = &["app", "region", "status"];
        let responses = r.counter(
            "fly_edge_http_responses_count",
            "HTTP responses sent by the edge proxy",
            by_app,
        );
        let response_time = r.add(
            HistogramVec::new(
                HistogramOpts::new(
                    "fly_edge_http_response_time_seconds",
                    "Time from request to response head at the edge proxy",
                )
                .buckets(RESPONSE_TIME_BUCKETS.to_vec()),
                by_app,
            )
            .expect("valid metric"),
        );
        let app_responses = r.counter(
            "fly_app_http_responses_count",
            "HTTP responses from the app's machines",
            by_app,
        );
        let errors = r.counter(
            "fly_edge_proxy_errors_count",
            "Responses the proxy produced itself, by error code",
            &["code"],
        );
        let retries = r
            .counter(
                "fly_edge_http_retries_count",
                "Requests sent to another machine after one refused the connection",
                &[],
            )
            .with_label_values(&[] as &[&str]);
        let replays = r.counter(
            "fly_edge_http_replays_count",
            "fly-replay answers followed, and replays that fell back",
            &["result"],
        );
        let forwarded = r
            .counter(
                "fly_edge_http_forwarded_count",
                "Requests sent to another region's proxy: no machine for them here",
                &[],
            )
            .with_label_values(&[] as &[&str]);
        let replays = Replays {
            replayed: replays.with_label_values(&["replayed"]),
            fell_back: replays.with_label_values(&["fell_back"]),
        };
        let inflight = r.gauge(
            "fly_edge_inflight_requests",
            "Requests in flight at the edge proxy, until their response body ends",
        );
        let queued = r.gauge(
            "fly_edge_queued_requests",
            "Requests waiting for a machine of their app to drop below its hard limit",
        );
        let upstream = r.counter(
            "fly_edge_upstream_requests_total",
            "Requests sent to machines, by whether their keep-alive connection was new or reused",
            &["connection"],
        );
        let tcp_connects = r.counter(
            "fly_edge_tcp_connects_count",
            "Client connections accepted",
            &["listener"],
        );
        let tls = r.counter(
            "fly_edge_tls_handshakes_count",
            "TLS handshakes with clients, by result",
            &["result"],
        );
        let tls_time = r.histogram(
            "fly_edge_tls_handshake_time_seconds",
            "Time to complete a TLS handshake with a client",
            &HANDSHAKE_BUCKETS,
        );
        let connection_errors = r.counter(
            "fly_edge_http_connection_errors_count",
            "Client connections the proxy ended for misbehaving, by reason",
            &["reason"],
        );
        let autostarts = r.outcomes(
            (
                "fly_edge_autostarts_count",
                "Machines the proxy started for requests, by result",
            ),
            (
                "fly_edge_autostart_time_seconds",
                "Time from a start's first request until its machine takes traffic",
            ),
        );
        let autostops = r.outcomes(
            (
                "fly_edge_autostops_count",
                "Machines the proxy stopped or suspended for being idle, by result",
            ),
            (
                "fly_edge_autostop_time_seconds",
                "Time to cordon, drain and stop a machine the proxy stopped",
            ),
        );
        r.add(Concurrency::new(fib.clone()));
        r.add(MachineCounts::new(fib.clone()));
        let edge = EdgeMetrics {
            responses,
            response_time,
            app_responses,
            series: Arc::default(),
            errors,
            retries,
            replays,
            forwarded,
            inflight,
            queued,
            upstream: UpstreamCounters {
                new: upstream.with_label_values(&["new"]),
                reused: upstream.with_label_values(&["reused"]),
            },
            tcp_connects: [Listener::Http, Listener::Https]
                .map(|l| tcp_connects.with_label_values(&[l.as_str()])),
            tls_ok: tls.with_label_values(&["ok"]),
            tls_error: tls.with_label_values(&["error"]),
            tls_timeout: tls.with_label_values(&["timeout"]),
            tls_time,
            connection_errors: connection_errors.clone(),
            autostarts,
            autostops,
        };
        for reason in ["header_timeout", "bad_request", "too_many_from_client"] {
            connection_errors.with_label_values(&[reason]);
        }
        Self {
            registry,
            edge,
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
        hangar_catalog::catalog::debug_view(&self.fib, self.rib.as_deref())
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

/// How many (app, region, status) series [`EdgeMetrics`] keeps at hand.
const MAX_CACHED_SERIES: usize = 10_000;

/// App, region, status.
type SeriesKey = (CompactString, CompactString, u16);

/// One (app, region, status)'s response series.
struct Series {
    responses: IntCounter,
    response_time: Histogram,
    /// Made at the first response from a machine: the proxy's own errors
    /// are not the app's.
    app_responses: std::sync::OnceLock<IntCounter>,
}

/// One response, as [`EdgeMetrics::observe`] counts it.
pub(crate) struct Observed<'a> {
    pub app: &'a str,
    pub region: &'a str,
    pub status: StatusCode,
    pub elapsed: Duration,
    /// The proxy's error code when it answered with an error.
    pub error: Option<&'static str>,
    /// The response came from a machine (not an error or a redirect of the
    /// proxy's own).
    pub from_machine: bool,
}

impl EdgeMetrics {
    /// Counts one response and the time to its head.
    pub(crate) fn observe(&self, o: &Observed<'_>) {
        let key = (o.app.into(), o.region.into(), o.status.as_u16());
        let count = |s: &Series| {
            s.responses.inc();
            s.response_time.observe(o.elapsed.as_secs_f64());
            if o.from_machine {
                let labels = [o.app, o.region, o.status.as_str()];
                s.app_responses
                    .get_or_init(|| self.app_responses.with_label_values(&labels))
                    .inc();
            }
        };
        match self.series.get(&key) {
            Some(series) => count(&series),
            None => {
                let labels = [o.app, o.region, o.status.as_str()];
                let series = Series {
                    responses: self.responses.with_label_values(&labels),
                    response_time: self.response_time.with_label_values(&labels),
                    app_responses: std::sync::OnceLock::new(),
                };
                count(&series);
                // Bounded: past it, new series are looked up every time.
                if self.series.len() < MAX_CACHED_SERIES {
                    self.series.insert(key, series);
                }
            }
        }
        if let Some(code) = o.error {
            self.errors.with_label_values(&[code]).inc();
        }
    }

    /// Counts one request in flight until the guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlight {
        self.inflight.inc();
        InFlight(self.inflight.clone())
    }

    /// Counts one accepted client connection.
    pub(crate) fn connected(&self, listener: Listener) {
        self.tcp_connects[listener.index()].inc();
    }

    /// Counts one TLS handshake.
    pub(crate) fn handshake(&self, outcome: Handshake) {
        match outcome {
            Handshake::Ok(took) => {
                self.tls_ok.inc();
                self.tls_time.observe(took.as_secs_f64());
            }
            Handshake::Error => self.tls_error.inc(),
            Handshake::Timeout => self.tls_timeout.inc(),
        }
    }

    /// Counts a client connection the HTTP layer ended: `reason` is
    /// `header_timeout` or `bad_request`.
    pub(crate) fn connection_error(&self, reason: &str) {
        self.connection_errors.with_label_values(&[reason]).inc();
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

/// The `fly_app_concurrency{app, region}` collector: requests in flight on
/// each app's machines, summed per machine region from the FIB at scrape
/// time. Apps with nothing in flight are left out.
#[derive(Clone)]
struct Concurrency {
    fib: Arc<Fib>,
    described: IntGaugeVec,
}

impl Concurrency {
    fn opts() -> Opts {
        Opts::new(
            "fly_app_concurrency",
            "Requests in flight on the app's machines, by machine region",
        )
    }

    fn new(fib: Arc<Fib>) -> Self {
        let described = IntGaugeVec::new(Self::opts(), &["app", "region"]).expect("valid metric");
        Self { fib, described }
    }
}

impl Collector for Concurrency {
    fn desc(&self) -> Vec<&Desc> {
        self.described.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(gauges) = IntGaugeVec::new(Self::opts(), &["app", "region"]) else {
            return Vec::new();
        };
        let mut sums: HashMap<(&str, &str), usize> = HashMap::new();
        let snapshot = self.fib.snapshot();
        for app in snapshot.apps() {
            for m in app.machines().iter() {
                let n = m.load.get();
                if n > 0 {
                    *sums.entry((&app.name, &m.region)).or_default() += n;
                }
            }
        }
        for ((app, region), n) in sums {
            gauges
                .with_label_values(&[app, region])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        gauges.collect()
    }
}

/// The `fly_app_machines{state}` collector: counts are computed from the FIB
/// snapshot at scrape time rather than kept up to date on every change.
#[derive(Clone)]
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
    let graceful = crate::conns::graceful();
    let mut conns = Conns::new(graceful.clone());
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
                conns.spawn(None, |watcher| async move {
                    if let Err(e) = crate::conns::serve_until_drained(conn, watcher).await {
                        tracing::debug!(error = %e, "metrics: connection ended with an error");
                    }
                });
            }
        }
    }
    drop(listener);
    crate::conns::drain(&graceful, vec![conns], "metrics", METRICS_DRAIN).await;
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
        let observed = |status, error: Option<&'static str>| Observed {
            app: "hello",
            region: "dev",
            status,
            elapsed: Duration::from_millis(3),
            error,
            from_machine: error.is_none(),
        };
        edge.observe(&observed(StatusCode::OK, None));
        edge.observe(&observed(StatusCode::SERVICE_UNAVAILABLE, Some("PR04")));
        edge.connected(Listener::Https);
        edge.handshake(Handshake::Ok(Duration::from_millis(2)));
        edge.handshake(Handshake::Timeout);
        let guard = edge.in_flight();

        let text = metrics.render().unwrap();
        for sample in [
            r#"fly_edge_http_responses_count{app="hello",region="dev",status="200"} 1"#,
            r#"fly_edge_http_responses_count{app="hello",region="dev",status="503"} 1"#,
            r#"fly_app_http_responses_count{app="hello",region="dev",status="200"} 1"#,
            r#"fly_edge_http_response_time_seconds_count{app="hello",region="dev",status="200"} 1"#,
            r#"fly_edge_proxy_errors_count{code="PR04"} 1"#,
            r#"fly_edge_tcp_connects_count{listener="https"} 1"#,
            r#"fly_edge_tcp_connects_count{listener="http"} 0"#,
            r#"fly_edge_tls_handshakes_count{result="ok"} 1"#,
            r#"fly_edge_tls_handshakes_count{result="timeout"} 1"#,
            "fly_edge_tls_handshake_time_seconds_count 1",
            r#"fly_edge_http_connection_errors_count{reason="header_timeout"} 0"#,
            "fly_edge_http_retries_count 0",
            r#"fly_edge_http_replays_count{result="fell_back"} 0"#,
            "fly_edge_inflight_requests 1",
            "fly_edge_queued_requests 0",
            r#"fly_edge_upstream_requests_total{connection="reused"} 0"#,
        ] {
            assert!(text.contains(sample), "missing {sample} in\n{text}");
        }
        assert!(
            !text
                .contains(r#"fly_app_http_responses_count{app="hello",region="dev",status="503"}"#),
            "the proxy's own errors are not the app's responses"
        );
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
