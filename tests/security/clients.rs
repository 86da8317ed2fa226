//! Client against edge: one client cannot lock out another, stalled bodies time out, configs and app addresses have bounds.

use super::*;

/// A connection to `addr` from `source` (a loopback address of the test's
/// choosing, so the proxy sees another client).
async fn connect_from(source: [u8; 4], addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends a request head announcing a large body, and a few bytes of it.
async fn start_slow_upload(tcp: &mut tokio::net::TcpStream, app: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {app}.localhost\r\nContent-Length: 100000\r\n\r\nfirst bytes"
    );
    tcp.write_all(head.as_bytes()).await
}

/// Whether the proxy closed `tcp` (or answered) within `within`.
async fn ended(tcp: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, tcp.read(&mut buf))
        .await
        .is_ok()
}

/// Item 9: one client could hold every connection an app may have (slow
/// uploads that never finish), locking out every other client of the app.
/// Now a client address holds at most `max_conns_per_ip`.
#[tokio::test]
async fn one_client_cannot_lock_out_another() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[proxy]\nmax_conns_per_app = 30\nmax_conns_per_ip = 10\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.app_with_machine("busy").await;
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut tcp = connect_from([127, 0, 0, 1], h.addrs.http).await;
        // Past the limit the proxy closes the connection: the write may
        // already fail, or the read shows the end.
        let _ = start_slow_upload(&mut tcp, "busy").await;
        slow.push(tcp);
    }
    let mut closed = 0;
    for tcp in &mut slow {
        if ended(tcp, std::time::Duration::from_millis(200)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 30,
        "all but max_conns_per_ip of the client's connections closed"
    );
    // Another client still gets in.
    let mut other = connect_from([127, 0, 0, 2], h.addrs.http).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: busy.localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let metrics = common::metrics_at(&h.http, h.addrs.metrics).await;
    assert!(
        metrics
            .contains(r#"fly_edge_http_connection_errors_count{reason="too_many_from_client"} 30"#),
        "{metrics}"
    );
}

/// Item 9: a client that starts a body and sends no more held its request
/// (and its share of the app's connections) until the response timeout.
/// Now each wait for body bytes is bounded (`body_timeout_ms`).
#[tokio::test]
async fn a_stalled_body_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[proxy]\nbody_timeout_ms = 300\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.app_with_machine("upload").await;
    let mut tcp = connect_from([127, 0, 0, 1], h.addrs.http).await;
    start_slow_upload(&mut tcp, "upload").await.unwrap();
    use tokio::io::AsyncReadExt;
    let mut answer = String::new();
    tokio::time::timeout(common::WAIT, tcp.read_to_string(&mut answer))
        .await
        .expect("the proxy gave up on the body")
        .unwrap();
    // As nginx answers a stalled body (client_body_timeout).
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("fly-proxy-error: PE08"), "{answer}");
}

/// A machine config whose one service declares `ports` (raw TCP).
fn with_ports(ports: impl Iterator<Item = u16>) -> String {
    let ports: Vec<Value> = ports.map(|p| serde_json::json!({"port": p})).collect();
    serde_json::json!({"config": {"image": "hangar/echo", "services": [
        {"protocol": "tcp", "internal_port": 8080, "ports": ports}
    ]}})
    .to_string()
}

/// Item 9: a machine config could declare any number of services, ports
/// and checks, and an app's address listened on every port any of its
/// machines declared.
#[tokio::test]
async fn configs_and_app_addresses_have_bounds() {
    let h = Hangar::start().await;
    h.create_app("wide").await;
    let services: Vec<Value> = (0..17)
        .map(|i| serde_json::json!({"protocol": "tcp", "internal_port": 8080 + i}))
        .collect();
    let checks: serde_json::Map<String, Value> = (0..33)
        .map(|i| {
            (
                format!("c{i}"),
                serde_json::json!({"type": "tcp", "port": 8080}),
            )
        })
        .collect();
    for (config, field) in [
        (
            serde_json::json!({"image": "hangar/echo", "services": services}),
            "config.services",
        ),
        (
            serde_json::json!({"image": "hangar/echo", "checks": checks}),
            "config.checks",
        ),
    ] {
        let body = serde_json::json!({ "config": config }).to_string();
        let (status, answer) = h.post("/v1/apps/wide/machines", &body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().starts_with(field),
            "{answer}"
        );
    }
    let (status, answer) = h
        .post("/v1/apps/wide/machines", &with_ports(20000..20033))
        .await;
    assert_eq!(status, 400, "{answer}");

    // Two machines of 20 ports each: the address listens on 32 of them.
    h.started_machine("wide", &with_ports(20000..20020)).await;
    h.started_machine("wide", &with_ports(20020..20040)).await;
    let (status, ip) = h
        .post("/v1/apps/wide/ip_assignments", r#"{"type":"private_v6"}"#)
        .await;
    assert_eq!(status, 200, "{ip}");
    let ip: std::net::IpAddr = ip["ip"].as_str().unwrap().parse().unwrap();
    let listening = || async move {
        let mut n = 0;
        for port in 20000..20040 {
            if tokio::net::TcpStream::connect((ip, port)).await.is_ok() {
                n += 1;
            }
        }
        n
    };
    common::eventually("32 listeners", || async { listening().await == 32 }).await;
    assert_eq!(listening().await, 32);
}
