//! Apps' own addresses: each port with its handlers (raw TCP, TLS, PROXY protocol, HTTP), and flycast.

use super::*;

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
