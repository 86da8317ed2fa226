//! Clients: force_https, misbehaving clients, upgrades and tunnels, HTTP/1 framing across requests, and shutdown.

use super::*;

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
