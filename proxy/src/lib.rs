//! Hangar's edge proxy: the HTTP and HTTPS listeners every app shares
//! (routing by Host, certificates by SNI), listeners on apps' own addresses (routing by
//! address, with each port's handlers), and the path from a client to one of
//! the app's machines. proxy/DESIGN.md describes the whole.
//!
//! The code is in rooms by stage, imports running one way, from the top:
//!
//! - [`listening`]: binding, accept, TLS (certificates by SNI), the HTTP/1
//!   and h2 servers, app-address ports, workers: sockets and connections
//!   up to their requests.
//! - `path`: one request, top to bottom in call order (host → app → body
//!   → deliver: slot → send → replay, fallback or another region → respond
//!   → log), every failure answered by one `fail()`; it reads what every
//!   request shares from `edge` (`Edge::new` builds it
//!   from the config).
//! - `forwarding`: the upstream pool, the HTTP/1 client, bodies, headers,
//!   the TCP relay.
//! - [`scaling`]: autostart, autostop, queues, and taking a slot.
//! - [`routing`]: Host, steering headers, balancing, sticky pins, replay,
//!   peers.
//! - the base every room may use: [`config`], [`error`] ([`ProxyError`],
//!   [`PathError`] with its code and what it allows next), [`metrics`],
//!   `h1` (HTTP/1.1 on the wire, both hops), `tls_session` (a client's
//!   TLS session), `conns` (draining at shutdown), `conn_limit`
//!   (connections per app and per client).

#![warn(missing_docs)]

pub mod config;
mod conn_limit;
mod conns;
mod edge;
pub mod error;
mod forwarding;
mod h1;
mod hash;
pub mod listening;
pub mod metrics;
mod path;
#[cfg(test)]
mod proptests;
pub mod routing;
pub mod scaling;
mod tls_session;

pub use config::{Listener, ProxyConfig};
pub use error::{PathError, ProxyError};
pub use forwarding::body::ProxyBody;
pub use metrics::{Metrics, serve_metrics};

use edge::Edge;
use hangar_catalog::{ClusterKey, Fib, SecretBox};
use listening::tls;
use scaling::{autostart, autostop};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The edge proxy: both listeners bound and ready to serve.
///
/// Built by [`Proxy::bind`], run by [`Proxy::serve`]. Binding is separate so
/// the caller can read the actual addresses (port 0 picks a free port)
/// before traffic flows.
pub struct Proxy {
    listeners: listening::Listeners,
    edge: Arc<Edge>,
    /// The autostop loop, unless turned off.
    autostop: Option<autostop::Autostopper>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("http", &self.http_addr())
            .field("https", &self.https_addr())
            .field("region", &self.edge.region)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Validates `cfg`, loads the dev certificate from `data_dir` (creating
    /// it on first start), and binds both listeners. Requests read routes
    /// from `fib` and are counted in `metrics`; apps' custom certificates
    /// (in the FIB) are opened with `secrets`; stopped machines are started
    /// through the flyd `hosts` names.
    pub async fn bind(
        cfg: ProxyConfig,
        fib: Arc<Fib>,
        data_dir: &Path,
        metrics: &Metrics,
        secrets: Arc<SecretBox>,
        hosts: Arc<dyn autostart::Directory>,
        cluster: Arc<ClusterKey>,
    ) -> Result<Proxy, ProxyError> {
        cfg.validate().map_err(ProxyError::Config)?;
        // Blocking file IO and key generation, but once at start-up and
        // before any traffic, so the runtime has nothing else to do yet.
        let dev = tls::load_or_create_dev_cert(data_dir)?;
        let resolver = tls::SniResolver::new(fib.clone(), secrets, dev)?;
        let tls = tls::server_config(Arc::new(resolver))?;
        let listeners = listening::Listeners::bind(&cfg).await?;
        let edge = Edge::new(
            &cfg,
            (fib.clone(), hosts.clone()),
            metrics,
            cluster.clone(),
            tls,
            listeners.workers(),
        )?;
        let autostop = (cfg.autostop_interval_ms > 0).then(|| autostop::Autostopper {
            fib,
            activity: edge.activity.clone(),
            hosts,
            client: hangar_host_client::HostClient::new(cfg.autostop_drain() * 2, cluster.token()),
            interval: Duration::from_millis(cfg.autostop_interval_ms),
            idle: Duration::from_millis(cfg.autostop_idle_ms),
            drain: cfg.autostop_drain(),
            metrics: metrics.edge(),
        });
        let edge = Arc::new(edge);
        Ok(Proxy {
            listeners,
            edge,
            autostop,
        })
    }

    /// The HTTP listener's bound address.
    pub fn http_addr(&self) -> SocketAddr {
        self.listeners.http_addr()
    }

    /// The HTTPS listener's bound address.
    pub fn https_addr(&self) -> SocketAddr {
        self.listeners.https_addr()
    }

    /// Serves until `shutdown` resolves, then stops accepting, asks open
    /// connections to finish their in-flight requests, and waits at most
    /// `drain` for them before closing the rest and returning.
    pub async fn serve(self, shutdown: impl Future<Output = ()>, drain: Duration) {
        listening::serve(self.listeners, self.edge, self.autostop, shutdown, drain).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hangar_api::machine::{MachinePort, MachineService, MachineState};
    use hangar_catalog::{AppRow, MachineRow, Rib};
    use http::{HeaderMap, Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{mpsc, oneshot};

    /// Bounds the whole end-to-end test; it takes well under a second.
    const DEADLINE: Duration = Duration::from_secs(30);

    /// What the upstream saw of one request.
    struct Seen {
        uri: String,
        headers: HeaderMap,
    }

    fn app_row(name: &str) -> AppRow {
        AppRow {
            name: name.into(),
            id: format!("id-{name}"),
            org_slug: "personal".into(),
            network: "default".into(),
            created_at: 0,
        }
    }

    fn machine_row(id: &str, app: &str, state: MachineState, internal_port: u16) -> MachineRow {
        let port = |port, handlers: &[&str]| MachinePort {
            port: Some(port),
            handlers: handlers.iter().map(|h| h.to_string()).collect(),
            ..MachinePort::default()
        };
        MachineRow {
            id: id.into(),
            app: app.into(),
            region: "dev".into(),
            host: "h1".into(),
            state,
            private_ip: "127.0.0.1".into(),
            instance_id: "v1".into(),
            cordoned: false,
            services: vec![MachineService {
                protocol: "tcp".into(),
                internal_port,
                ports: vec![port(80, &["http"]), port(443, &["tls", "http"])],
                ..MachineService::default()
            }],
            row_version: 1,
            healthy: true,
            primary_region: None,
            updated_at: 0,
        }
    }

    /// A machine's workload: reports each request and echoes its body, with
    /// a hop-by-hop header in the response that the proxy must drop.
    async fn upstream() -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(Seen {
                            uri: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        let body = req.into_body().collect().await?.to_bytes();
                        let mut response = Response::new(Full::new(body));
                        let headers = response.headers_mut();
                        headers.insert("keep-alive", "timeout=5".parse().unwrap());
                        headers.insert("x-upstream", "yes".parse().unwrap());
                        Ok::<_, hyper::Error>(response)
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        (addr, rx)
    }

    async fn http1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn h2<T>(io: T) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn tls_h2(
        data_dir: &Path,
        addr: SocketAddr,
    ) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let (cert_path, _) = tls::dev_cert_paths(data_dir);
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&cert_path).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        // webpki (like browsers) does not let `*.localhost` match a name
        // directly under a single-label domain, so verify as `localhost`;
        // the proxy routes by the request's authority, not by SNI.
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        h2(tls).await
    }

    async fn read(response: Response<Incoming>) -> (StatusCode, HeaderMap, String) {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn get(host: Option<&str>) -> Request<Full<Bytes>> {
        let mut req = Request::get("/");
        if let Some(host) = host {
            req = req.header("host", host);
        }
        req.body(Full::default()).unwrap()
    }

    #[tokio::test]
    async fn routes_by_host_and_answers_failures_in_one_line() {
        tokio::time::timeout(DEADLINE, end_to_end())
            .await
            .expect("end-to-end proxy test finished in time");
    }

    /// No flyd anywhere: these tests start no machines.
    struct NoHosts;

    impl autostart::Directory for NoHosts {
        fn address(&self, _: &str) -> Option<String> {
            None
        }
        fn token_org(&self, _: &str) -> Option<String> {
            None
        }
    }

    /// A proxy serving a temp RIB's apps, and the handles to stop it.
    struct Harness {
        _dir: tempfile::TempDir,
        data_dir: std::path::PathBuf,
        rib: Arc<Rib>,
        fib: Arc<Fib>,
        metrics: Metrics,
        http_addr: SocketAddr,
        https_addr: SocketAddr,
        stop: oneshot::Sender<()>,
        served: tokio::task::JoinHandle<()>,
    }

    /// Starts a proxy for `apps` (app, machine, state, internal port; every
    /// machine on 127.0.0.1) that drains for at most `drain` at shutdown.
    async fn harness(apps: &[(&str, &str, MachineState, u16)], drain: Duration) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
        rib.ensure_org("personal", "Personal").unwrap();
        for (app, machine, state, port) in apps {
            rib.create_app(&app_row(app)).unwrap();
            rib.upsert_machine(&machine_row(machine, app, *state, *port))
                .unwrap();
        }
        let fib = Fib::load(&rib).unwrap();
        let metrics = Metrics::new(fib.clone());
        let cfg = ProxyConfig {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            https_addr: "127.0.0.1:0".parse().unwrap(),
            ..ProxyConfig::default()
        };
        let secrets = Arc::new(SecretBox::load_or_create(&dir.path().join("secrets.key")).unwrap());
        let proxy = Proxy::bind(
            cfg,
            fib.clone(),
            dir.path(),
            &metrics,
            secrets,
            Arc::new(NoHosts),
            Arc::new(ClusterKey::load_or_create(&dir.path().join("cluster.key")).unwrap()),
        )
        .await
        .unwrap();
        let (http_addr, https_addr) = (proxy.http_addr(), proxy.https_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(proxy.serve(
            async {
                let _ = stopped.await;
            },
            drain,
        ));
        Harness {
            data_dir: dir.path().to_path_buf(),
            _dir: dir,
            rib,
            fib,
            metrics,
            http_addr,
            https_addr,
            stop,
            served,
        }
    }

    async fn end_to_end() {
        let (upstream, mut seen) = upstream().await;
        let closed_port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        // A drain longer than DEADLINE: finishing proves the connections
        // closed gracefully rather than being cut at the deadline.
        let Harness {
            _dir,
            data_dir,
            fib,
            rib: _,
            metrics,
            http_addr,
            https_addr,
            stop,
            served,
        } = harness(
            &[
                ("hello", "m1", MachineState::Started, upstream.port()),
                ("sleepy", "m2", MachineState::Stopped, upstream.port()),
                ("broken", "m3", MachineState::Started, closed_port),
            ],
            Duration::from_secs(60),
        )
        .await;

        // Forwarded over HTTP/1.1, body both ways, proxy headers set.
        let mut client = http1(http_addr).await;
        let host = format!("hello.localhost:{}", http_addr.port());
        let req = Request::post("/echo?x=1")
            .header("host", &host)
            .header("x-forwarded-for", "10.0.0.1")
            .header("connection", "x-private")
            .header("x-private", "1")
            .body(Full::new(Bytes::from("ping")))
            .unwrap();
        let (status, headers, body) = read(client.send_request(req).await.unwrap()).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ping"));
        assert_eq!(headers["x-upstream"], "yes");
        assert!(
            headers.get("keep-alive").is_none(),
            "hop-by-hop response header leaked"
        );
        assert_eq!(headers["via"], "1.1 hangar");
        assert_eq!(headers["server"], "hangar");
        let up = seen.recv().await.unwrap();
        assert_eq!(up.uri, "/echo?x=1", "origin-form upstream");
        let h = &up.headers;
        assert_eq!(h["host"], host.as_str());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["fly-client-ip"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-ssl"], "off");
        assert_eq!(h["x-forwarded-port"], http_addr.port().to_string().as_str());
        assert_eq!(
            h["fly-forwarded-port"],
            http_addr.port().to_string().as_str()
        );
        assert_eq!(h["fly-region"], "dev");
        assert_eq!(h["via"], "1.1 hangar");
        assert_eq!(h["fly-request-id"], headers["fly-request-id"]);
        assert!(h["fly-request-id"].to_str().unwrap().ends_with("-dev"));
        assert!(h.get("x-private").is_none() && h.get("connection").is_none());
        let m1 = fib.lookup("hello").unwrap().machines()[0].clone();
        assert_eq!(m1.load.get(), 0, "lease released with the body");

        // Failures, each one line of text from the proxy itself.
        let port = http_addr.port();
        for (host, status, code, text) in [
            (
                Some(format!("nope.localhost:{port}")),
                404,
                "PA01",
                "app \"nope\" not found\n",
            ),
            (
                // Stopped: autostart tries, and this test has no flyd.
                Some("sleepy.localhost".into()),
                503,
                "PM01",
                "app \"sleepy\" has no machine up, and starting machine m2 failed: host h1 of machine m2 is unknown\n",
            ),
            (
                Some("broken.localhost".into()),
                502,
                "PC01",
                "could not connect to machine m3\n",
            ),
            (None, 400, "PE01", "missing Host header\n"),
            (
                Some("example.com".into()),
                400,
                "PE01",
                "Host \"example.com\" is not <app>.localhost or <app>.flycast\n",
            ),
        ] {
            let response = client.send_request(get(host.as_deref())).await.unwrap();
            let (got, headers, body) = read(response).await;
            assert_eq!((got.as_u16(), body.as_str()), (status, text), "{host:?}");
            assert_eq!(headers["server"], "hangar");
            assert_eq!(headers["fly-proxy-error"], code);
            assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
            assert!(headers.contains_key("fly-request-id"));
        }

        // h2c on the plain listener: the authority names the app.
        let mut h2c = h2(TcpStream::connect(http_addr).await.unwrap()).await;
        let req = Request::get(format!("http://hello.localhost:{port}/h2c"))
            .body(Full::default())
            .unwrap();
        let (status, _, _) = read(h2c.send_request(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let up = seen.recv().await.unwrap();
        assert_eq!(up.uri, "/h2c");
        assert_eq!(up.headers["via"], "2 hangar");
        assert_eq!(
            up.headers["host"],
            format!("hello.localhost:{port}").as_str()
        );

        // h2 over TLS with the dev certificate.
        let mut tls = tls_h2(&data_dir, https_addr).await;
        let req = Request::get(format!("https://hello.localhost:{}/tls", https_addr.port()))
            .body(Full::default())
            .unwrap();
        let (status, _, _) = read(tls.send_request(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let up = seen.recv().await.unwrap();
        assert_eq!(up.headers["x-forwarded-proto"], "https");
        assert_eq!(up.headers["x-forwarded-ssl"], "on");
        assert_eq!(
            up.headers["x-forwarded-port"],
            https_addr.port().to_string().as_str()
        );
        assert_eq!(up.headers["via"], "2 hangar");

        let text = metrics.render().unwrap();
        for sample in [
            r#"fly_edge_http_responses_count{app="hello",region="dev",status="200"} 3"#,
            r#"fly_edge_http_responses_count{app="",region="dev",status="400"} 2"#,
            r#"fly_edge_http_responses_count{app="broken",region="dev",status="502"} 1"#,
            r#"fly_edge_proxy_errors_count{code="PC01"} 1"#,
            r#"fly_edge_proxy_errors_count{code="PE01"} 2"#,
            r#"fly_edge_proxy_errors_count{code="PA01"} 1"#,
            r#"fly_edge_proxy_errors_count{code="PM01"} 1"#,
            r#"fly_edge_autostarts_count{result="failed"} 1"#,
            r#"fly_edge_tls_handshakes_count{result="ok"} 1"#,
            r#"fly_app_machines{state="started"} 2"#,
            r#"fly_app_machines{state="stopped"} 1"#,
        ] {
            assert!(text.contains(sample), "missing {sample} in\n{text}");
        }

        // Every response body has ended, so nothing is in flight. A finished
        // h2 body is dropped by its stream task, which may run just after the
        // client saw the end; give it the chance instead of sleeping.
        while !metrics
            .render()
            .unwrap()
            .contains("fly_edge_inflight_requests 0")
        {
            tokio::task::yield_now().await;
        }
        assert!(
            fib.snapshot()
                .apps()
                .all(|app| { app.machines().iter().all(|m| m.load.get() == 0) })
        );

        // Shutdown: idle keep-alive and h2 connections close gracefully, and
        // the listeners are gone.
        stop.send(()).unwrap();
        served.await.unwrap();
        assert!(TcpStream::connect(http_addr).await.is_err());
        assert!(client.send_request(get(Some(&host))).await.is_err());
    }

    #[tokio::test]
    async fn drain_deadline_cuts_requests_that_never_finish() {
        tokio::time::timeout(DEADLINE, async {
            // A machine that takes the request and never answers.
            let machine = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = machine.local_addr().unwrap().port();
            let (arrived, arrival) = oneshot::channel();
            tokio::spawn(async move {
                let (mut tcp, _) = machine.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await;
                let _ = arrived.send(());
                std::future::pending::<()>().await;
                drop(tcp);
            });
            let h = harness(
                &[("stuck", "m1", MachineState::Started, port)],
                Duration::from_millis(200),
            )
            .await;
            let mut client = http1(h.http_addr).await;
            let request = tokio::spawn(client.send_request(get(Some("stuck.localhost"))));
            arrival.await.unwrap();
            let m1 = h.fib.lookup("stuck").unwrap().machines()[0].clone();
            assert_eq!(m1.load.get(), 1);

            h.stop.send(()).unwrap();
            h.served.await.unwrap();
            assert!(request.await.unwrap().is_err(), "the cut request fails");
            assert_eq!(m1.load.get(), 0, "lease released on abort");
            assert!(
                h.metrics
                    .render()
                    .unwrap()
                    .contains("fly_edge_inflight_requests 0")
            );
        })
        .await
        .expect("serve returned at the drain deadline");
    }

    /// What a [`raw_machine`] saw of one connection.
    #[derive(Debug, PartialEq)]
    enum Event {
        Accepted,
        /// The machine closed the connection after answering.
        Closed,
        /// The proxy closed the connection.
        Eof,
    }

    /// How a [`raw_machine`] treats its connections.
    #[derive(Clone, Copy, PartialEq)]
    enum Keep {
        /// Keep-alive, as servers do.
        Alive,
        /// Close after one response, without saying so.
        CloseEach,
        /// Answer the first request, then close on the second without
        /// answering: a keep-alive timeout firing as the request arrives.
        DropSecond,
    }

    /// A machine speaking just enough HTTP/1.1 to answer requests with
    /// `ok`, reporting what happens to its connections.
    async fn raw_machine(keep: Keep) -> (u16, mpsc::UnboundedReceiver<Event>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ = tx.send(Event::Accepted);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    let mut answered = 0;
                    loop {
                        let n = tcp.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            let _ = tx.send(Event::Eof);
                            return;
                        }
                        head.extend_from_slice(&buf[..n]);
                        if !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        head.clear();
                        answered += 1;
                        if keep == Keep::DropSecond && answered == 2 {
                            drop(tcp);
                            let _ = tx.send(Event::Closed);
                            return;
                        }
                        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .unwrap();
                        if keep == Keep::CloseEach {
                            drop(tcp);
                            let _ = tx.send(Event::Closed);
                            return;
                        }
                    }
                });
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn upstream_connections_are_reused_replaced_and_closed_with_their_machine() {
        tokio::time::timeout(DEADLINE, async {
            let (keep, mut keep_events) = raw_machine(Keep::Alive).await;
            let (flaky, mut flaky_events) = raw_machine(Keep::CloseEach).await;
            let h = harness(
                &[
                    ("keep", "m1", MachineState::Started, keep),
                    ("flaky", "m2", MachineState::Started, flaky),
                ],
                Duration::from_secs(5),
            )
            .await;
            let mut client = http1(h.http_addr).await;
            let mut get_ok = async |app: &str| {
                let response = client
                    .send_request(get(Some(&format!("{app}.localhost"))))
                    .await
                    .unwrap();
                let (status, _, body) = read(response).await;
                assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"), "{app}");
            };

            // Three requests, one connection.
            for _ in 0..3 {
                get_ok("keep").await;
            }
            assert_eq!(keep_events.recv().await, Some(Event::Accepted));
            assert!(keep_events.try_recv().is_err(), "no second connection");

            // A machine that closes its idle connections: each request
            // notices the close at checkout and opens a new one.
            for _ in 0..3 {
                get_ok("flaky").await;
                assert_eq!(flaky_events.recv().await, Some(Event::Accepted));
                assert_eq!(flaky_events.recv().await, Some(Event::Closed));
            }
            let text = h.metrics.render().unwrap();
            for sample in [
                r#"fly_edge_upstream_requests_total{connection="new"} 4"#,
                r#"fly_edge_upstream_requests_total{connection="reused"} 2"#,
            ] {
                assert!(text.contains(sample), "missing {sample} in\n{text}");
            }

            // The machine stops: the sweep closes its idle connection.
            let mut row = machine_row("m1", "keep", MachineState::Stopped, keep);
            row.row_version = 2;
            h.rib.upsert_machine(&row).unwrap();
            h.fib.catch_up(&h.rib).unwrap();
            assert_eq!(keep_events.recv().await, Some(Event::Eof));
            h.stop.send(()).unwrap();
            h.served.await.unwrap();
        })
        .await
        .expect("finished in time");
    }

    #[tokio::test]
    async fn a_request_lost_to_a_closing_idle_connection_is_sent_again_when_safe() {
        tokio::time::timeout(DEADLINE, async {
            let (port, mut events) = raw_machine(Keep::DropSecond).await;
            let h = harness(
                &[("stale", "m1", MachineState::Started, port)],
                Duration::from_secs(5),
            )
            .await;
            let mut client = http1(h.http_addr).await;
            let send = async |client: &mut hyper::client::conn::http1::SendRequest<_>, post| {
                let req = Request::builder()
                    .method(if post { "POST" } else { "GET" })
                    .uri("/")
                    .header("host", "stale.localhost")
                    .body(Full::new(Bytes::from_static(b"x")))
                    .unwrap();
                read(client.send_request(req).await.unwrap()).await
            };
            let (status, _, body) = send(&mut client, false).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(events.recv().await, Some(Event::Accepted));
            // The machine drops the pooled connection under the GET: it is
            // sent again on a new one.
            let (status, _, body) = send(&mut client, false).await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
            assert_eq!(events.recv().await, Some(Event::Closed));
            assert_eq!(events.recv().await, Some(Event::Accepted));
            // The same under a POST: not idempotent, so not sent again, and
            // the error says why.
            let (status, headers, body) = send(&mut client, true).await;
            assert_eq!(events.recv().await, Some(Event::Closed));
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
            assert_eq!(headers["fly-proxy-error"], "PU02");
            assert_eq!(
                body,
                "machine m1 did not answer (not retried: POST is not idempotent)\n"
            );
        })
        .await
        .expect("finished in time");
    }
}
