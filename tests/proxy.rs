//! The edge proxy end to end, through the real binary: load limits and the
//! wait queue, retries, force_https, the proxy's own errors with their
//! codes, and clients that misbehave.

mod common;

use common::{Answered, Hangar, WAIT, eventually};
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Test-sized limits: a short queue wait and header timeout, a response
/// timeout between the sleeps the tests ask for, and machines reported
/// started quickly even when their service port never opens.
const CONFIG: &str = r#"
[flaps.rate_limits]
enabled = false
[flyd]
ready_timeout_ms = 300
cpu_overcommit = 128
[proxy]
queue_max_per_app = 1
queue_timeout_ms = 1000
response_timeout_ms = 2500
header_timeout_ms = 700
max_body_bytes = 65536
"#;

async fn start() -> (tempfile::TempDir, Hangar) {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hangar::start_with(&tmp.path().join("data"), Some(CONFIG)).await;
    (tmp, h)
}

async fn create_app(h: &Hangar, app: &str) {
    h.create_app(app).await;
}

/// A started hangar/echo machine with `config` merged into its config.
async fn machine(h: &Hangar, app: &str, config: Value) -> String {
    let mut full = serde_json::json!({"image": "hangar/echo"});
    full.as_object_mut()
        .unwrap()
        .extend(config.as_object().unwrap().clone());
    let body = serde_json::json!({ "config": full }).to_string();
    let m = h.started_machine(app, &body).await;
    m["id"].as_str().unwrap().to_string()
}

/// Services of a web machine on `internal_port` with the given limits.
fn web(internal_port: u16, soft: u32, hard: u32) -> Value {
    serde_json::json!({"services": [{
        "protocol": "tcp",
        "internal_port": internal_port,
        "concurrency": {"type": "requests", "soft_limit": soft, "hard_limit": hard},
        "ports": [{"port": 80, "handlers": ["http"]}, {"port": 443, "handlers": ["tls", "http"]}]
    }]})
}

/// What a request through the proxy got back.
#[derive(Debug)]
struct Got {
    status: u16,
    machine: Option<String>,
    code: Option<String>,
    retry_after: Option<String>,
    location: Option<String>,
    body: String,
}

async fn get(h: &Hangar, app: &str, path: &str) -> Got {
    // No redirects followed: the 301 itself is under test.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WAIT)
        .build()
        .unwrap();
    let resp = client
        .get(format!("http://{}{path}", h.addrs.http))
        .header("host", format!("{app}.localhost"))
        .send()
        .await
        .expect("proxy request");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    Got {
        status: resp.status().as_u16(),
        machine: header("fly-machine-id"),
        code: header("fly-proxy-error"),
        retry_after: header("retry-after"),
        location: header("location"),
        body: resp.text().await.unwrap(),
    }
}

async fn metrics(h: &Hangar) -> String {
    common::metrics_at(&h.http, h.addrs.metrics).await
}

/// The value of the series `name` (with its labels) in a metrics text.
fn counter(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Waits until `/metrics` shows `sample`: the proxy's own readiness signal
/// for "requests are in flight" or "a request is queued".
async fn until_metric(h: &Hangar, sample: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = metrics(h).await;
        if text.contains(sample) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {sample} in\n{text}\n{}",
            h.log()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_spread_load_and_a_full_app_queues_then_answers_503() {
    let (_tmp, h) = start().await;
    let h = std::sync::Arc::new(h);

    // Soft limit 1 on two machines: with one busy, the next request goes to
    // the other even though the busy one is far from its hard limit.
    create_app(&h, "spread").await;
    let a = machine(&h, "spread", web(8080, 1, 5)).await;
    let b = machine(&h, "spread", web(8080, 1, 5)).await;
    let slow = tokio::spawn({
        let h = h.clone();
        async move { get(&h, "spread", "/?sleep_ms=600").await }
    });
    until_metric(&h, r#"fly_app_concurrency{app="spread",region="dev"} 1"#).await;
    let quick = get(&h, "spread", "/").await;
    let slow = slow.await.unwrap();
    assert_eq!((slow.status, quick.status), (200, 200));
    assert_ne!(
        slow.machine, quick.machine,
        "the second went to the idle one"
    );
    for m in [&slow.machine, &quick.machine] {
        assert!(*m == Some(a.clone()) || *m == Some(b.clone()));
    }

    // One machine, hard limit 2, both slots taken for 2 s.
    create_app(&h, "full").await;
    machine(&h, "full", web(8080, 1, 2)).await;
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { get(&h, "full", "/?sleep_ms=2000").await })
        })
        .collect();
    until_metric(&h, r#"fly_app_concurrency{app="full",region="dev"} 2"#).await;
    // The third waits in the queue (its only place), the fourth finds the
    // queue full at once, and the third gives up after queue_timeout_ms.
    let queued = tokio::spawn({
        let h = h.clone();
        async move { get(&h, "full", "/").await }
    });
    until_metric(&h, "fly_edge_queued_requests 1").await;
    let rejected = get(&h, "full", "/").await;
    assert_eq!(rejected.status, 503, "{rejected:?}");
    assert_eq!(rejected.code.as_deref(), Some("PR04"));
    assert_eq!(rejected.retry_after.as_deref(), Some("1"));
    assert!(rejected.body.contains("the queue is full"), "{rejected:?}");
    let timed_out = queued.await.unwrap();
    assert_eq!(timed_out.status, 503, "{timed_out:?}");
    assert_eq!(timed_out.code.as_deref(), Some("PR04"));
    assert_eq!(timed_out.retry_after.as_deref(), Some("1"));
    assert!(
        timed_out.body.contains("stayed at its hard limit for 1s"),
        "{timed_out:?}"
    );
    for r in busy {
        assert_eq!(r.await.unwrap().status, 200, "the slow ones finish");
    }

    // A slot that frees while a request waits serves it.
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { get(&h, "full", "/?sleep_ms=200").await })
        })
        .collect();
    until_metric(&h, r#"fly_app_concurrency{app="full",region="dev"} 2"#).await;
    let served = get(&h, "full", "/").await;
    assert_eq!(served.status, 200, "{served:?}");
    for r in busy {
        assert_eq!(r.await.unwrap().status, 200);
    }
    until_metric(&h, "fly_edge_queued_requests 0").await;
}

#[tokio::test]
async fn refused_connects_go_to_another_machine_and_every_error_has_its_code() {
    let (_tmp, h) = start().await;

    // "bad" is started, but its service port is closed: the echo listens on
    // 8080 while the service says 9999.
    create_app(&h, "retry").await;
    let good = machine(&h, "retry", web(8080, 20, 25)).await;
    let mut bad = web(9999, 20, 25);
    bad["env"] = serde_json::json!({"PORT": "8080"});
    machine(&h, "retry", bad.clone()).await;
    for _ in 0..20 {
        let got = get(&h, "retry", "/").await;
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.machine.as_deref(), Some(good.as_str()));
    }
    let text = metrics(&h).await;
    assert!(
        !text.contains("fly_edge_http_retries_count 0"),
        "two choices among equals pick the bad one about half the time:\n{text}"
    );

    // The same over h2 to the machine (hyper's client, which takes the
    // request): a request refused by one machine reaches the next with
    // this hop's headers once.
    create_app(&h, "retry-h2").await;
    let h2 = serde_json::json!({"h2_backend": true});
    let mut good = web(8080, 20, 25);
    good["services"][0]["ports"][0]["http_options"] = h2.clone();
    let good = machine(&h, "retry-h2", good).await;
    let mut bad_h2 = bad.clone();
    bad_h2["services"][0]["ports"][0]["http_options"] = h2;
    machine(&h, "retry-h2", bad_h2).await;
    for _ in 0..20 {
        let got = get(&h, "retry-h2", "/").await;
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.machine.as_deref(), Some(good.as_str()));
        let echo: Value = serde_json::from_str(&got.body).unwrap();
        assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1", "{echo}");
        assert_eq!(echo["headers"]["via"], "1.1 hangar", "{echo}");
    }

    // A machine that takes connections and drops them unanswered is
    // skipped like one that refuses them: preferred, it gets each request
    // once, then the other machine does.
    create_app(&h, "dropping").await;
    let dropping = machine(&h, "dropping", web(8080, 20, 25)).await;
    let other = machine(&h, "dropping", web(8080, 20, 25)).await;
    for _ in 0..5 {
        let resp = h
            .http
            .get(format!("http://{}/?drop={dropping}", h.addrs.http))
            .header("host", "dropping.localhost")
            .header("fly-prefer-instance-id", &dropping)
            .send()
            .await
            .unwrap();
        let got = Answered::of(resp).await;
        assert_eq!(
            (got.status, got.machine.as_deref()),
            (200, Some(other.as_str())),
            "{got:?}"
        );
    }

    // The proxy's own errors: status, code, one line of text.
    create_app(&h, "refusing").await;
    machine(&h, "refusing", bad).await;
    create_app(&h, "empty").await;
    create_app(&h, "tcponly").await;
    machine(
        &h,
        "tcponly",
        serde_json::json!({"services": [{"protocol": "tcp", "internal_port": 8080,
            "ports": [{"port": 5432}]}]}),
    )
    .await;
    create_app(&h, "slow").await;
    machine(&h, "slow", web(8080, 20, 25)).await;
    for (app, path, status, code, text) in [
        ("nope", "/", 404, "PA01", "app \"nope\" not found"),
        ("empty", "/", 503, "PR01", "has no started machine"),
        (
            "tcponly",
            "/",
            503,
            "PR03",
            "no started machine with an http",
        ),
        ("refusing", "/", 502, "PC01", "could not connect to machine"),
        (
            "slow",
            "/?sleep_ms=4000",
            504,
            "PU05",
            "did not answer within 2.5s",
        ),
    ] {
        let got = get(&h, app, path).await;
        assert_eq!(got.status, status, "{app}: {got:?}");
        assert_eq!(got.code.as_deref(), Some(code), "{app}: {got:?}");
        assert!(got.body.contains(text), "{app}: {got:?}");
        assert_eq!(got.body.lines().count(), 1, "{app}: {got:?}");
    }
    // h2_backend: h2 to the machine, whatever the client spoke; h2 on
    // both sides with an h2c client.
    create_app(&h, "grpc").await;
    let mut h2 = web(8080, 20, 25);
    h2["services"][0]["ports"][0]["http_options"] = serde_json::json!({"h2_backend": true});
    machine(&h, "grpc", h2).await;
    let client = |h2: bool| {
        let builder = reqwest::Client::builder()
            .resolve("grpc.localhost", h.addrs.http)
            .timeout(WAIT);
        let builder = if h2 {
            builder.http2_prior_knowledge()
        } else {
            builder.http1_only()
        };
        builder.build().unwrap()
    };
    let url = format!("http://grpc.localhost:{}/grpc", h.addrs.http.port());
    for (client, version) in [
        (client(false), reqwest::Version::HTTP_11),
        (client(true), reqwest::Version::HTTP_2),
    ] {
        for _ in 0..3 {
            let resp = client.get(&url).send().await.unwrap();
            assert_eq!((resp.status().as_u16(), resp.version()), (200, version));
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["version"], "HTTP/2.0", "{body}");
            assert_eq!(body["path"], "/grpc");
            // hyper's client gets this hop's headers in the request's map.
            assert_eq!(body["headers"]["x-forwarded-for"], "127.0.0.1", "{body}");
            assert_eq!(body["headers"]["fly-region"], "dev", "{body}");
        }
    }

    let bad_host = h
        .http
        .get(format!("http://{}/", h.addrs.http))
        .header("host", "not an app")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_host.status(), 400);
    assert_eq!(bad_host.headers()["fly-proxy-error"], "PE01");
    let text = metrics(&h).await;
    for code in ["PA01", "PR01", "PR03", "PC01", "PU05", "PE01"] {
        let sample = format!("fly_edge_proxy_errors_count{{code=\"{code}\"}} 1");
        assert!(text.contains(&sample), "missing {sample} in\n{text}");
    }
}

#[tokio::test]
async fn force_https_redirects_and_bad_clients_cost_only_their_connection() {
    let (_tmp, h) = start().await;
    create_app(&h, "web").await;
    let mut services = web(8080, 20, 25);
    services["services"][0]["ports"][0]["force_https"] = true.into();
    machine(&h, "web", services).await;

    let got = get(&h, "web", "/login?next=%2F").await;
    assert_eq!(got.status, 301, "{got:?}");
    assert_eq!(
        got.location.as_deref(),
        Some("https://web.localhost/login?next=%2F")
    );
    // The dev certificate is self-signed; the name resolves to the proxy.
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve("web.localhost", h.addrs.https)
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://web.localhost:{}/", h.addrs.https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "https is served, not redirected");

    // A pristine port: none of the proxy's headers, and its own applied.
    create_app(&h, "pure").await;
    let mut services = web(8080, 20, 25);
    services["services"][0]["ports"][0]["http_options"] = serde_json::json!({
        "response": {"pristine": true, "headers": {"x-frame-options": "DENY", "fly-machine-id": false}}
    });
    machine(&h, "pure", services).await;
    let resp = h
        .http
        .get(format!("http://{}/", h.addrs.http))
        .header("host", "pure.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers();
    for absent in ["fly-request-id", "via", "server", "fly-machine-id"] {
        assert!(headers.get(absent).is_none(), "{absent} in {headers:?}");
    }
    assert_eq!(headers["x-frame-options"], "DENY");
    let normal = get(&h, "web", "/").await;
    assert!(normal.machine.is_none(), "a 301 is the proxy's own");

    // A slow client sends half a request head and stops: the others are
    // served meanwhile, and the proxy answers it 408 after
    // header_timeout_ms and closes.
    let mut slow = tokio::net::TcpStream::connect(h.addrs.http).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: web.local")
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        let resp = client
            .get(format!("https://web.localhost:{}/", h.addrs.https.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let mut answer = String::new();
    tokio::time::timeout(WAIT, slow.read_to_string(&mut answer))
        .await
        .expect("the slow client is cut off")
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer:?}"
    );
    assert!(
        answer.contains("\r\nfly-proxy-error: PE05\r\n"),
        "{answer:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    // One that sends nothing is closed without a word.
    let mut silent = tokio::net::TcpStream::connect(h.addrs.http).await.unwrap();
    let mut nothing = Vec::new();
    tokio::time::timeout(WAIT, silent.read_to_end(&mut nothing))
        .await
        .expect("the idle client is cut off")
        .unwrap();
    assert!(nothing.is_empty(), "{nothing:?}");

    // Garbage and oversized heads are answered by the HTTP layer.
    let mut raw = tokio::net::TcpStream::connect(h.addrs.http).await.unwrap();
    raw.write_all(b"NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(WAIT, raw.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let big = h
        .http
        .get(format!("http://{}/", h.addrs.http))
        .header("host", "web.localhost")
        .header("x-big", "a".repeat(40 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 431);

    // Bodies: up to max_body_bytes goes through, over it is 413 whether
    // the length is declared or the body is chunked.
    let post = |len: usize| {
        h.http
            .post(format!("http://{}/", h.addrs.http))
            .header("host", "pure.localhost")
            .body(vec![b'x'; len])
            .send()
    };
    assert_eq!(post(60_000).await.unwrap().status(), 200);
    let too_big = post(70_000).await.unwrap();
    assert_eq!(too_big.status(), 413);
    assert_eq!(too_big.headers()["fly-proxy-error"], "PE02");
    let mut chunked = tokio::net::TcpStream::connect(h.addrs.http).await.unwrap();
    chunked
        .write_all(b"POST / HTTP/1.1\r\nHost: pure.localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..10 {
        let chunk = format!("{:x}\r\n{}\r\n", 10_000, "y".repeat(10_000));
        if chunked.write_all(chunk.as_bytes()).await.is_err() {
            break; // the proxy may answer and close before the end
        }
    }
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(WAIT, chunked.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 413");

    // Idle keep-alive connections end the same way, so at least two.
    let text = metrics(&h).await;
    assert!(
        counter(
            &text,
            r#"fly_edge_http_connection_errors_count{reason="header_timeout"}"#
        ) >= 2,
        "{text}"
    );
    assert_eq!(
        counter(&text, r#"fly_edge_proxy_errors_count{code="PE05"}"#),
        1
    );
    assert_eq!(
        counter(
            &text,
            r#"fly_edge_http_connection_errors_count{reason="bad_request"}"#
        ),
        2,
        "{text}"
    );
}

#[tokio::test]
async fn upgrades_become_tunnels_that_hold_a_slot_while_open() {
    let (_tmp, h) = start().await;
    create_app(&h, "ws").await;
    machine(&h, "ws", web(8080, 20, 25)).await;

    let mut tcp = tokio::net::TcpStream::connect(h.addrs.http).await.unwrap();
    tcp.write_all(
        b"GET /chat HTTP/1.1\r\nHost: ws.localhost\r\nConnection: keep-alive, Upgrade\r\n\
          Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    // The head of the 101, byte by byte so nothing after it is swallowed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, tcp.read(&mut byte))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 1, "closed before the head ended: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(head.contains("fly-request-id:"), "{head}");

    // Bytes go both ways through the tunnel, and it holds its slot.
    for message in [&b"hello tunnel"[..], &b"second message"[..]] {
        tcp.write_all(message).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(WAIT, tcp.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, message);
    }
    until_metric(&h, r#"fly_app_concurrency{app="ws",region="dev"} 1"#).await;
    drop(tcp);
    eventually("the tunnel's slot is released", || async {
        !metrics(&h)
            .await
            .contains(r#"fly_app_concurrency{app="ws""#)
    })
    .await;

    // The same over h2 (extended CONNECT, RFC 8441): a 200, then a tunnel
    // to the machine, which saw an HTTP/1.1 upgrade.
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tcp = tokio::net::TcpStream::connect(h.addrs.http).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = |method: hyper::Method| {
        hyper::Request::builder()
            .method(method)
            .uri("http://ws.localhost/chat")
            .header("sec-websocket-version", "13")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    // A plain request first, so the server's settings have arrived.
    let plain = sender
        .send_request(request(hyper::Method::GET))
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    let mut connect = request(hyper::Method::CONNECT);
    connect
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut answer = sender.send_request(connect).await.unwrap();
    assert_eq!(answer.status(), 200, "{:?}", answer.headers());
    assert!(answer.headers().get("upgrade").is_none());
    let mut tunnel = TokioIo::new(hyper::upgrade::on(&mut answer).await.unwrap());
    tunnel.write_all(b"over h2").await.unwrap();
    let mut back = [0u8; 7];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"over h2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_the_listeners_and_finishes_requests_in_flight() {
    let (_tmp, mut h) = start().await;
    create_app(&h, "calm").await;
    machine(&h, "calm", web(8080, 20, 25)).await;
    let url = format!("http://{}/?sleep_ms=800", h.addrs.http);
    let in_flight = tokio::spawn(async move {
        let resp = reqwest::Client::new()
            .get(url)
            .header("host", "calm.localhost")
            .timeout(WAIT)
            .send()
            .await
            .expect("the request in flight is answered");
        (resp.status().as_u16(), resp.text().await.unwrap())
    });
    until_metric(&h, r#"fly_app_concurrency{app="calm",region="dev"} 1"#).await;

    let pid = nix::unistd::Pid::from_raw(h.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    // New connections are refused once the listener is closed...
    eventually("no longer accepting after SIGTERM", || async {
        tokio::net::TcpStream::connect(h.addrs.http).await.is_err()
    })
    .await;
    // ...while the request in flight finishes normally.
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let status = tokio::task::spawn_blocking(move || h.wait_exit())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

/// One HTTP/1.1 request written by hand on `tcp`; the response's status
/// line and JSON body.
async fn raw_get<S>(mut tcp: S) -> (String, Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tcp.write_all(b"GET /raw HTTP/1.1\r\nHost: anything\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut response))
        .await
        .expect("answered in time")
        .unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
    let status = head.lines().next().unwrap().to_string();
    (status, serde_json::from_str(body).expect("echo's JSON"))
}

#[tokio::test]
async fn an_app_address_serves_each_port_with_its_handlers() {
    let (_tmp, h) = start().await;
    create_app(&h, "db").await;
    let (status, ip) = h
        .post("/v1/apps/db/ip_assignments", r#"{"type":"v4"}"#)
        .await;
    assert_eq!(status, 200, "{ip}");
    let ip: std::net::IpAddr = ip["ip"].as_str().unwrap().parse().unwrap();
    let id = machine(
        &h,
        "db",
        serde_json::json!({"services": [{"protocol": "tcp", "internal_port": 8080, "ports": [
            {"port": 7000},
            {"port": 7001, "handlers": ["proxy_proto"]},
            {"port": 7002, "handlers": ["proxy_proto"], "proxy_proto_options": {"version": "v2"}},
            {"port": 7003, "handlers": ["tls"]},
            {"port": 7080, "handlers": ["http"]}
        ]}]}),
    )
    .await;
    let at = |port| std::net::SocketAddr::new(ip, port);
    // The listeners follow the catalog within moments, one port after
    // another (in no set order).
    eventually("a listener on each of the app's ports", || async {
        for port in [7000, 7001, 7002, 7003, 7080] {
            if tokio::net::TcpStream::connect(at(port)).await.is_err() {
                return false;
            }
        }
        true
    })
    .await;

    // No handler: the bytes reach the machine as they are.
    let (status, body) = raw_get(tokio::net::TcpStream::connect(at(7000)).await.unwrap()).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body["machine_id"], id.as_str());
    assert!(
        body["headers"].get("fly-request-id").is_none(),
        "not proxied as HTTP"
    );
    assert!(body["proxy_protocol_source"].is_null());

    // proxy_proto, v1 and v2: the machine learns who the client is.
    for port in [7001, 7002] {
        let tcp = tokio::net::TcpStream::connect(at(port)).await.unwrap();
        let me = tcp.local_addr().unwrap().to_string();
        let (status, body) = raw_get(tcp).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{port}: {status}");
        assert_eq!(body["proxy_protocol_source"], me.as_str(), "{port}");
    }

    // tls: the proxy terminates TLS, the machine gets plain bytes.
    let tls_client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(WAIT)
        .build()
        .unwrap();
    let resp = tls_client
        .get(format!("https://{}/", at(7003)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("fly-request-id").is_none());

    // http: the app's HTTP path, whatever the Host says.
    let resp = h
        .http
        .get(format!("http://{}/", at(7080)))
        .header("host", "not-an-app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("fly-request-id"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["machine_id"], id.as_str());

    // Stopped, the machine is started for a raw TCP connection, as it is
    // for a request: the connection waits, then reaches it.
    put_down(&h, "db", &id, "stop", "stopped").await;
    let (status, body) = raw_get(tokio::net::TcpStream::connect(at(7000)).await.unwrap()).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(body["machine_id"], id.as_str());

    // Released, the address stops being listened on.
    let (status, _) = h.delete(&format!("/v1/apps/db/ip_assignments/{ip}")).await;
    assert_eq!(status, 204);
    eventually("no listener after the release", || async {
        tokio::net::TcpStream::connect(at(7000)).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn an_app_gets_at_most_max_conns_per_app_client_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let config = format!("{CONFIG}max_conns_per_app = 2\n");
    let h = Hangar::start_with(&tmp.path().join("data"), Some(&config)).await;
    create_app(&h, "few").await;
    machine(&h, "few", web(8080, 20, 25)).await;

    /// A keep-alive connection that has sent one request; its status.
    async fn open(h: &Hangar) -> (tokio::net::TcpStream, String) {
        let mut tcp = tokio::net::TcpStream::connect(h.addrs.http).await.unwrap();
        tcp.write_all(b"GET /?bytes=2 HTTP/1.1\r\nHost: few.localhost\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(WAIT, tcp.read_exact(&mut byte))
                .await
                .unwrap()
                .unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        (tcp, head.lines().next().unwrap().to_string())
    }
    let (first, status) = open(&h).await;
    assert!(status.ends_with("200 OK"), "{status}");
    let (_second, status) = open(&h).await;
    assert!(status.ends_with("200 OK"), "{status}");
    let (_third, status) = open(&h).await;
    assert!(status.contains(" 503 "), "{status}");
    // Another app is not affected, and a closed connection frees a place.
    assert_eq!(get(&h, "nope", "/").await.status, 404);
    drop(first);
    eventually("the closed connection's place is freed", || async {
        open(&h).await.1.ends_with("200 OK")
    })
    .await;
    let text = metrics(&h).await;
    assert!(
        text.contains(r#"fly_edge_proxy_errors_count{code="PE04"}"#),
        "{text}"
    );
}

/// Asks flaps to `stop` or `suspend` a machine and waits until it is.
async fn put_down(h: &Hangar, app: &str, id: &str, how: &str, state: &str) {
    let (status, body) = h
        .post(&format!("/v1/apps/{app}/machines/{id}/{how}"), "{}")
        .await;
    assert_eq!(status, 200, "{how}: {body}");
    h.wait_state(app, id, state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_app_answers_its_first_requests_with_exactly_one_start() {
    let (_tmp, h) = start().await;
    let h = std::sync::Arc::new(h);
    create_app(&h, "sleepy").await;
    let id = machine(&h, "sleepy", web(8080, 500, 500)).await;
    let started = |n| format!("fly_edge_autostarts_count{{result=\"ok\"}} {n}");

    // Stopped: the first request starts it and is answered by it.
    put_down(&h, "sleepy", &id, "stop", "stopped").await;
    let got = get(&h, "sleepy", "/").await;
    assert_eq!(got.status, 200, "{got:?}\n{}", h.log());
    assert_eq!(got.machine.as_deref(), Some(id.as_str()));
    assert!(metrics(&h).await.contains(&started(1)));

    // 200 requests at once on a stopped app: one start, every one answered.
    put_down(&h, "sleepy", &id, "stop", "stopped").await;
    let all: Vec<_> = (0..200)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { get(&h, "sleepy", "/").await })
        })
        .collect();
    for r in all {
        let got = r.await.unwrap();
        assert_eq!(got.status, 200, "{got:?}");
    }
    assert!(
        metrics(&h).await.contains(&started(2)),
        "exactly one more start"
    );

    // Suspended: resumed the same way.
    put_down(&h, "sleepy", &id, "suspend", "suspended").await;
    assert_eq!(get(&h, "sleepy", "/").await.status, 200);
    assert!(metrics(&h).await.contains(&started(3)));

    // A service with autostart off stays down.
    create_app(&h, "manual").await;
    let mut services = web(8080, 20, 25);
    services["services"][0]["autostart"] = false.into();
    let manual = machine(&h, "manual", services).await;
    put_down(&h, "manual", &manual, "stop", "stopped").await;
    let got = get(&h, "manual", "/").await;
    assert_eq!(
        (got.status, got.code.as_deref()),
        (503, Some("PR01")),
        "{got:?}"
    );
    assert!(metrics(&h).await.contains(&started(3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_never_gets_ready_answers_503_and_its_waiters_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let config = format!("{CONFIG}autostart_hold_ms = 1500\nautostart_max_waiting = 2\n");
    let h = std::sync::Arc::new(Hangar::start_with(&tmp.path().join("data"), Some(&config)).await);
    create_app(&h, "never").await;
    // Its check probes a port nothing listens on: started, never routable.
    let mut services = web(8080, 20, 25);
    services["services"][0]["checks"] =
        serde_json::json!([{"type": "tcp", "port": 9, "interval": "100ms", "timeout": "50ms"}]);
    let id = machine(&h, "never", services).await;
    put_down(&h, "never", &id, "stop", "stopped").await;
    let all: Vec<_> = (0..6)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { get(&h, "never", "/").await })
        })
        .collect();
    let (mut timed_out, mut turned_away) = (0, 0);
    for r in all {
        let got = r.await.unwrap();
        assert_eq!(
            (got.status, got.code.as_deref(), got.retry_after.as_deref()),
            (503, Some("PM01"), Some("1")),
            "{got:?}"
        );
        if got.body.contains("was not ready within 1.5s") {
            timed_out += 1;
        } else if got.body.contains("2 requests already wait") {
            turned_away += 1;
        }
    }
    assert_eq!((timed_out, turned_away), (2, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_past_their_soft_limit_get_a_stopped_one_started_beside_them() {
    let (_tmp, h) = start().await;
    let h = std::sync::Arc::new(h);
    create_app(&h, "grow").await;
    let a = machine(&h, "grow", web(8080, 1, 25)).await;
    let b = machine(&h, "grow", web(8080, 1, 25)).await;
    put_down(&h, "grow", &b, "stop", "stopped").await;

    // A busy: the next request still goes to A (past soft, under hard) and
    // starts B in the background.
    let slow = tokio::spawn({
        let h = h.clone();
        async move { get(&h, "grow", "/?sleep_ms=1500").await }
    });
    until_metric(&h, r#"fly_app_concurrency{app="grow",region="dev"} 1"#).await;
    let quick = get(&h, "grow", "/").await;
    assert_eq!(quick.status, 200, "{quick:?}");
    assert_eq!(quick.machine.as_deref(), Some(a.as_str()));
    h.wait_state("grow", &b, "started").await;
    until_metric(&h, r#"fly_edge_autostarts_count{result="ok"} 1"#).await;
    // With A still busy, B takes the next one.
    let next = get(&h, "grow", "/").await;
    assert_eq!(next.machine.as_deref(), Some(b.as_str()), "{next:?}");
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_machine_that_answers_before_reading_an_upload_is_heard() {
    // No body limit of the proxy's own: 8 MB is read whole (under
    // retry_body_bytes) and sent on a pooled connection.
    let tmp = tempfile::tempdir().unwrap();
    let config = CONFIG.replace("max_body_bytes = 65536\n", "");
    let h = Hangar::start_with(&tmp.path().join("data"), Some(&config)).await;
    create_app(&h, "early").await;
    let id = machine(&h, "early", web(8080, 20, 25)).await;
    // The echo never reads a body; asked to close, it answers and closes
    // while most of the upload is still coming, which breaks the proxy's
    // write. Its answer reaches the client all the same, each time.
    for _ in 0..3 {
        let resp = h
            .http
            .post(format!("http://{}/?header=connection:close", h.addrs.http))
            .header("host", "early.localhost")
            .body(vec![b'x'; 8 << 20])
            .send()
            .await
            .unwrap();
        let got = Answered::of(resp).await;
        assert_eq!(
            (got.status, got.machine.as_deref()),
            (200, Some(id.as_str())),
            "{got:?}\n{}",
            h.log()
        );
    }
}

#[tokio::test]
async fn a_machine_whose_process_died_is_started_for_the_next_request() {
    let (_tmp, h) = start().await;
    create_app(&h, "fragile").await;
    let mut config = web(8080, 20, 25);
    config["restart"] = serde_json::json!({"policy": "no"});
    let id = machine(&h, "fragile", config).await;
    assert_eq!(get(&h, "fragile", "/").await.status, 200);
    // Its workload dies under it; the catalog may still show it started
    // when the next request comes, which must not fail for that.
    for _ in 0..3 {
        let workloads: Vec<u32> = common::processes_mentioning(&id)
            .into_iter()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("echo"))
            })
            .collect();
        assert_eq!(workloads.len(), 1, "one workload: {workloads:?}");
        let pid = nix::unistd::Pid::from_raw(workloads[0] as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        let got = get(&h, "fragile", "/").await;
        assert_eq!(
            (got.status, got.machine.as_deref()),
            (200, Some(id.as_str())),
            "{got:?}\n{}",
            h.log()
        );
    }
}

#[tokio::test]
async fn routing_headers_force_or_prefer_a_machine_or_a_region() {
    let (_tmp, h) = start().await;
    create_app(&h, "steer").await;
    let a = machine(&h, "steer", web(8080, 20, 25)).await;
    let b = machine(&h, "steer", web(8080, 20, 25)).await;
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let with = |name: &'static str, value: String| {
        let client = client.clone();
        let url = format!("http://{}/", h.addrs.http);
        async move {
            let resp = client
                .get(url)
                .header("host", "steer.localhost")
                .header(name, value)
                .send()
                .await
                .unwrap();
            let got = Answered::of(resp).await;
            (got.status, got.machine, got.code)
        }
    };
    for target in [&a, &b] {
        for name in ["fly-force-instance-id", "fly-prefer-instance-id"] {
            for _ in 0..5 {
                let (status, machine, _) = with(name, target.clone()).await;
                assert_eq!(
                    (status, machine.as_deref()),
                    (200, Some(target.as_str())),
                    "{name}"
                );
            }
        }
    }
    // Unknown targets: forcing is an error, preferring is not.
    assert_eq!(
        with("fly-force-instance-id", "nope".into()).await,
        (404, None, Some("PR06".into()))
    );
    assert_eq!(with("fly-prefer-instance-id", "nope".into()).await.0, 200);
    assert_eq!(with("fly-force-region", "dev".into()).await.0, 200);
    assert_eq!(
        with("fly-force-region", "ams".into()).await,
        (503, None, Some("PR07".into()))
    );
    assert_eq!(with("fly-prefer-region", "ams".into()).await.0, 200);

    // A forced machine that is stopped is started for the request.
    put_down(&h, "steer", &b, "stop", "stopped").await;
    let (status, machine, _) = with("fly-force-instance-id", b.clone()).await;
    assert_eq!((status, machine.as_deref()), (200, Some(b.as_str())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_machines_are_stopped_but_never_with_a_request_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "{CONFIG}autostop_interval_ms = 100\nautostop_idle_ms = 600\nautostop_drain_ms = 5000\n"
    );
    let h = std::sync::Arc::new(Hangar::start_with(&tmp.path().join("data"), Some(&config)).await);
    let with = |autostop: &str, min: u32| {
        let mut services = web(8080, 20, 25);
        services["services"][0]["autostop"] = autostop.into();
        services["services"][0]["min_machines_running"] = min.into();
        services
    };
    create_app(&h, "idle").await;
    let idle = machine(&h, "idle", with("stop", 0)).await;
    create_app(&h, "frozen").await;
    let frozen = machine(&h, "frozen", with("suspend", 0)).await;
    create_app(&h, "kept").await;
    let kept = machine(&h, "kept", with("stop", 1)).await;
    // The minimum holds in the primary region only: this one is ams.
    create_app(&h, "abroad").await;
    let mut abroad_config = with("stop", 1);
    abroad_config["env"] = serde_json::json!({"PRIMARY_REGION": "ams"});
    let abroad = machine(&h, "abroad", abroad_config).await;
    create_app(&h, "home").await;
    let mut home_config = with("stop", 1);
    home_config["env"] = serde_json::json!({"PRIMARY_REGION": "dev"});
    let home = machine(&h, "home", home_config).await;
    create_app(&h, "busy").await;
    let busy = machine(&h, "busy", with("stop", 0)).await;
    create_app(&h, "held").await;
    let held = machine(&h, "held", with("stop", 0)).await;

    // The app asks for its machine to be kept up for 5 s more; the proxy
    // keeps the header to itself.
    let until = std::time::SystemTime::now() + Duration::from_secs(5);
    let until = until
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let got = get(
        &h,
        "held",
        &format!("/?header=fly-keep-alive-until%3A{until}"),
    )
    .await;
    assert_eq!(got.status, 200, "{got:?}");
    let resp = h
        .http
        .get(format!(
            "http://{}/?header=x-seen%3A1&header=fly-keep-alive-until%3A{until}",
            h.addrs.http
        ))
        .header("host", "held.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-seen"], "1");
    assert!(!resp.headers().contains_key("fly-keep-alive-until"));
    // A request longer than the idle time: the machine stays up for it.
    let slow = tokio::spawn({
        let h = h.clone();
        async move { get(&h, "busy", "/?sleep_ms=1500").await }
    });
    h.wait_state("idle", &idle, "stopped").await;
    h.wait_state("frozen", &frozen, "suspended").await;
    h.wait_state("abroad", &abroad, "stopped").await;
    for (app, id) in [("kept", &kept), ("home", &home)] {
        let (_, m) = h.get(&format!("/v1/apps/{app}/machines/{id}")).await;
        assert_eq!(m["state"], "started", "min_machines_running holds {app}");
    }
    let got = slow.await.unwrap();
    assert_eq!(got.status, 200, "the request in flight finished: {got:?}");
    let (_, m) = h.get(&format!("/v1/apps/held/machines/{held}")).await;
    assert_eq!(m["state"], "started", "fly-keep-alive-until holds it");
    h.wait_state("busy", &busy, "stopped").await;
    // Counted once the machine is uncordoned again, just after the stop.
    until_metric(&h, r#"fly_edge_autostops_count{result="ok"} 4"#).await;
    h.wait_state("held", &held, "stopped").await;
    // And the stopped app still answers: autostart brings it back.
    assert_eq!(get(&h, "idle", "/").await.status, 200);
}

#[tokio::test]
async fn a_flycast_address_routes_only_to_its_app_and_starts_it() {
    let (_tmp, h) = start().await;
    for app in ["private", "other"] {
        create_app(&h, app).await;
    }
    // Port 8080, not 80: the test may run without the right to bind 80.
    let flycast_web = serde_json::json!({"services": [{"protocol": "tcp", "internal_port": 8080,
        "ports": [{"port": 8080, "handlers": ["http"]}]}]});
    let mine = machine(&h, "private", flycast_web.clone()).await;
    machine(&h, "other", flycast_web).await;
    let (status, ip) = h
        .post(
            "/v1/apps/private/ip_assignments",
            r#"{"type":"private_v6"}"#,
        )
        .await;
    assert_eq!(status, 200, "{ip}");
    let at = format!("{}:8080", ip["ip"].as_str().unwrap());
    eventually("a listener on the flycast address", || async {
        tokio::net::TcpStream::connect(&at).await.is_ok()
    })
    .await;
    let ask = |host: &'static str| {
        let (client, url) = (h.http.clone(), format!("http://{at}/"));
        async move {
            let resp = client.get(url).header("host", host).send().await.unwrap();
            let machine = resp.headers()["fly-machine-id"]
                .to_str()
                .unwrap()
                .to_string();
            (resp.status().as_u16(), machine)
        }
    };
    // Whatever the Host names, the address's app answers.
    for host in ["private.flycast", "other.localhost", "anything"] {
        assert_eq!(ask(host).await, (200, mine.clone()), "{host}");
    }
    // `<app>.flycast` through the shared listener used as an HTTP proxy
    // (`curl -x`, `http_proxy`) with a token of the org: the app's flycast
    // port; an app without a flycast address has none.
    let proxy_auth =
        reqwest::header::HeaderValue::from_str(&format!("Bearer {}", h.token)).unwrap();
    let via_proxy = reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::http(format!("http://{}", h.addrs.http))
                .unwrap()
                .custom_http_auth(proxy_auth),
        )
        .timeout(WAIT)
        .build()
        .unwrap();
    let resp = via_proxy
        .get("http://private.flycast:8080/")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["fly-machine-id"], mine.as_str());
    let resp = via_proxy
        .get("http://other.flycast:8080/")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            resp.status().as_u16(),
            resp.headers()["fly-proxy-error"].to_str().unwrap()
        ),
        (404, "PA02")
    );
    // Stopped, it is started for the request, as on the shared listeners.
    put_down(&h, "private", &mine, "stop", "stopped").await;
    assert_eq!(ask("private.flycast").await, (200, mine.clone()));
}

/// What a request for app `front` got, for the replay test.
async fn replayed(req: reqwest::RequestBuilder) -> (u16, Option<String>, Option<String>, Value) {
    let resp = req.header("host", "front.localhost").send().await.unwrap();
    Answered::of(resp).await.parts()
}

#[tokio::test]
async fn fly_replay_sends_the_request_on_and_falls_back_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let config = format!("{CONFIG}retry_body_bytes = 4096\n");
    let h = Hangar::start_with(&tmp.path().join("data"), Some(&config)).await;
    create_app(&h, "front").await;
    let a = machine(&h, "front", web(8080, 20, 25)).await;
    let b = machine(&h, "front", web(8080, 20, 25)).await;
    create_app(&h, "back").await;
    let c = machine(&h, "back", web(8080, 20, 25)).await;
    create_app(&h, "cold").await;
    let cold = machine(&h, "cold", web(8080, 20, 25)).await;
    put_down(&h, "cold", &cold, "stop", "stopped").await;

    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let url = format!("http://{}", h.addrs.http);
    // Every request is first sent to `a`; the query is what `a` answers
    // (`replay=` once, `replay_always=` on every hop).
    let from_a = |query: &str| {
        client
            .get(format!("{url}/?{query}"))
            .header("fly-force-instance-id", &a)
    };
    let enc = |s: &str| {
        s.replace('=', "%3D")
            .replace(';', "%3B")
            .replace(',', "%2C")
            .replace('"', "%22")
    };

    // To a machine, with the source and the state passed on.
    let (status, machine, _, body) = replayed(from_a(&format!(
        "replay={}",
        enc(&format!("instance={b};state=s1"))
    )))
    .await;
    assert_eq!(
        (status, machine.as_deref()),
        (200, Some(b.as_str())),
        "{body}"
    );
    let src = body["headers"]["fly-replay-src"].as_str().unwrap();
    assert!(
        src.starts_with(&format!("instance={a};region=dev;t=")),
        "{src}"
    );
    assert!(src.ends_with(";state=s1"), "{src}");

    // A preferred machine that can take it gets it; an unknown one is no
    // error.
    for prefer in [&b, &a] {
        let (_, machine, ..) = replayed(from_a(&format!(
            "replay={}",
            enc(&format!("prefer_instance={prefer}"))
        )))
        .await;
        assert_eq!(machine.as_deref(), Some(prefer.as_str()));
    }
    let (status, ..) = replayed(from_a(&format!("replay={}", enc("prefer_instance=nope")))).await;
    assert_eq!(status, 200);

    // To another app; `elsewhere` to any machine but the one that asked;
    // to the first listed region that has machines.
    let (status, machine, ..) = replayed(from_a(&format!("replay={}", enc("app=back")))).await;
    assert_eq!((status, machine.as_deref()), (200, Some(c.as_str())));
    for _ in 0..5 {
        let (_, machine, ..) = replayed(from_a(&format!("replay={}", enc("elsewhere=true")))).await;
        assert_eq!(machine.as_deref(), Some(b.as_str()));
    }
    let (status, ..) = replayed(from_a(&format!("replay={}", enc("region=\"ams,dev\"")))).await;
    assert_eq!(status, 200);

    // A request body read whole goes along; a streamed one cannot.
    let post = |len: usize| {
        client
            .post(format!("{url}/?replay={}", enc(&format!("instance={b}"))))
            .header("fly-force-instance-id", &a)
            .body(vec![b'x'; len])
    };
    let (status, machine, _, body) = replayed(post(1000)).await;
    assert_eq!(
        (status, machine.as_deref()),
        (200, Some(b.as_str())),
        "{body}"
    );
    assert_eq!(
        (
            body["method"].as_str(),
            body["headers"]["content-length"].as_str()
        ),
        (Some("POST"), Some("1000"))
    );
    let (status, _, code, body) = replayed(post(8000)).await;
    assert_eq!((status, code.as_deref()), (413, Some("PR10")), "{body}");

    // Targets that cannot be reached: an error, or back to the machine
    // that asked with `fallback`, told why in `fly-replay-failed`.
    let (status, _, code, _) = replayed(from_a(&format!("replay={}", enc("app=nowhere")))).await;
    assert_eq!((status, code.as_deref()), (404, Some("PA01")));
    let (status, _, code, _) = replayed(from_a(&format!("replay={}", enc("region=ams")))).await;
    assert_eq!((status, code.as_deref()), (503, Some("PR07")));
    let (status, machine, _, body) = replayed(from_a(&format!(
        "replay={}",
        enc("app=nowhere;fallback=force_self")
    )))
    .await;
    assert_eq!(
        (status, machine.as_deref()),
        (200, Some(a.as_str())),
        "{body}"
    );
    let failed = body["headers"]["fly-replay-failed"].as_str().unwrap();
    assert!(
        failed.starts_with("code=PA01;reason=\"app \\\"nowhere\\\" not found"),
        "{failed}"
    );
    // A start that takes longer than the replay's timeout.
    let slow = format!("app=cold;instance={cold};timeout=1ms");
    let (status, _, code, _) = replayed(from_a(&format!("replay={}", enc(&slow)))).await;
    assert_eq!((status, code.as_deref()), (504, Some("PR11")));
    let (status, machine, _, body) = replayed(from_a(&format!(
        "replay={}",
        enc(&format!("{slow};fallback=prefer_self"))
    )))
    .await;
    assert_eq!(
        (status, machine.as_deref()),
        (200, Some(a.as_str())),
        "{body}"
    );
    assert!(
        body["headers"]["fly-replay-failed"]
            .as_str()
            .unwrap()
            .starts_with("code=PR11")
    );

    // A replay to a stopped machine starts it.
    h.wait_state("cold", &cold, "started").await;
    put_down(&h, "cold", &cold, "stop", "stopped").await;
    let (status, machine, ..) = replayed(from_a(&format!(
        "replay={}",
        enc(&format!("app=cold;instance={cold}"))
    )))
    .await;
    assert_eq!((status, machine.as_deref()), (200, Some(cold.as_str())));

    // Machines that ask for too much, or for nonsense.
    let (status, _, code, body) = replayed(from_a(&format!(
        "replay_always={}",
        enc(&format!("instance={a}"))
    )))
    .await;
    assert_eq!((status, code.as_deref()), (502, Some("PR09")), "{body}");
    let (status, _, code, body) = replayed(from_a("replay=colour%3Dred")).await;
    assert_eq!((status, code.as_deref()), (502, Some("PR08")));
    assert!(
        body.as_str().unwrap().contains("unknown field \"colour\""),
        "{body}"
    );
    let (status, _, code, _) = replayed(from_a(&format!(
        "replay_always={}",
        enc("app=nowhere;fallback=force_self")
    )))
    .await;
    assert_eq!((status, code.as_deref()), (502, Some("PR08")));

    let text = metrics(&h).await;
    assert!(
        counter(&text, r#"fly_edge_http_replays_count{result="replayed"}"#) >= 20,
        "{text}"
    );
    assert_eq!(
        counter(&text, r#"fly_edge_http_replays_count{result="fell_back"}"#),
        3
    );
}

#[tokio::test]
async fn sticky_sessions_pin_a_client_to_its_machine_while_it_is_up() {
    let (_tmp, h) = start().await;
    let sticky = |how: Value| {
        let mut services = web(8080, 20, 25);
        services["services"][0]["sticky"] = how;
        services
    };
    create_app(&h, "cookie").await;
    let by_cookie = sticky(serde_json::json!({"cookie": "pin", "ttl_secs": 600}));
    let c1 = machine(&h, "cookie", by_cookie.clone()).await;
    let c2 = machine(&h, "cookie", by_cookie).await;
    create_app(&h, "mcp").await;
    let by_header = sticky(serde_json::json!({"header": "Mcp-Session-Id"}));
    let m1 = machine(&h, "mcp", by_header.clone()).await;
    let m2 = machine(&h, "mcp", by_header).await;
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let send = |app: &str, path: &str, header: Option<(&str, String)>| {
        let mut req = client
            .get(format!("http://{}{path}", h.addrs.http))
            .header("host", format!("{app}.localhost"));
        if let Some((name, value)) = header {
            req = req.header(name, value);
        }
        async move {
            let resp = req.send().await.unwrap();
            let get = |n: &str| {
                resp.headers()
                    .get(n)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            (get("fly-machine-id").unwrap(), get("set-cookie"))
        }
    };

    // By cookie: the first answer sets it, and the client stays there.
    let (first, set) = send("cookie", "/", None).await;
    let set = set.expect("a pin cookie");
    assert_eq!(
        set,
        format!("pin={first}; Path=/; Max-Age=600; HttpOnly; SameSite=Lax")
    );
    let cookie = format!("pin={first}");
    for _ in 0..10 {
        let (machine, set) = send("cookie", "/", Some(("cookie", cookie.clone()))).await;
        assert_eq!((machine.as_str(), set), (first.as_str(), None));
    }
    // Its machine stops: the client moves, and is pinned to the new one.
    let other = if first == c1 { &c2 } else { &c1 };
    put_down(&h, "cookie", &first, "stop", "stopped").await;
    let (machine, set) = send("cookie", "/", Some(("cookie", cookie.clone()))).await;
    assert_eq!(&machine, other);
    assert!(set.unwrap().starts_with(&format!("pin={other};")));

    // By header: the machine that handed out the session keeps it; other
    // sessions spread.
    let (owner, _) = send("mcp", "/?header=Mcp-Session-Id%3As-1", None).await;
    for _ in 0..10 {
        let (machine, _) = send("mcp", "/", Some(("mcp-session-id", "s-1".into()))).await;
        assert_eq!(machine, owner);
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        seen.insert(
            send("mcp", "/", Some(("mcp-session-id", "unknown".into())))
                .await
                .0,
        );
    }
    assert_eq!(
        seen,
        [m1, m2].into_iter().collect(),
        "unpinned sessions spread"
    );
}

/// Reads one response from `tcp` (bytes already read first, in `buf`):
/// its head, then as many body bytes as its `content-length` says, none
/// for `HEAD`. Leaves what follows in `buf`.
async fn read_response(
    tcp: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> (String, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.parse().unwrap());
            let length = if head_request { 0 } else { length };
            if buf.len() >= end + 4 + length {
                let body = String::from_utf8(buf[end + 4..end + 4 + length].to_vec()).unwrap();
                buf.drain(..end + 4 + length);
                return (head, body);
            }
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, tcp.read(&mut chunk))
            .await
            .expect("a whole response in time")
            .unwrap();
        assert!(n > 0, "closed with {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn http1_framing_holds_across_requests_on_one_connection() {
    let (_tmp, h) = start().await;
    create_app(&h, "frame").await;
    machine(&h, "frame", web(8080, 20, 25)).await;
    assert_eq!(get(&h, "frame", "/").await.status, 200);
    let mut tcp = tokio::net::TcpStream::connect(h.addrs.http).await.unwrap();
    let mut buf = Vec::new();

    // HEAD: the length of the body it would have, and no body.
    tcp.write_all(b"HEAD /?bytes=100 HTTP/1.1\r\nHost: frame.localhost\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut tcp, &mut buf, true).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("content-length: 100"), "{head}");
    assert!(body.is_empty() && buf.is_empty(), "{buf:?}");

    // Expect: 100-continue gets the go-ahead, then the answer.
    tcp.write_all(
        b"POST / HTTP/1.1\r\nHost: frame.localhost\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, _) = read_response(&mut tcp, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 100 Continue"), "{head}");
    tcp.write_all(b"hello").await.unwrap();
    let (head, body) = read_response(&mut tcp, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["headers"]["content-length"], "5");

    // A chunked body reaches the machine decoded, with its length.
    tcp.write_all(
        b"POST / HTTP/1.1\r\nHost: frame.localhost\r\nTransfer-Encoding: chunked\r\n\r\n\
          3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = read_response(&mut tcp, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["headers"]["content-length"], "7", "{echoed}");
    assert!(
        echoed["headers"].get("transfer-encoding").is_none(),
        "{echoed}"
    );

    // HTTP/1.0 without keep-alive: answered, then closed.
    tcp.write_all(b"GET /?bytes=10 HTTP/1.0\r\nHost: frame.localhost\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_response(&mut tcp, &mut buf, false).await;
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "x".repeat(10));
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest))
        .await
        .expect("closed after an HTTP/1.0 answer")
        .unwrap();
    assert!(rest.is_empty() && buf.is_empty(), "{rest:?}");
}
