//! End to end: the README's walkthrough against the real binary, and the
//! bad inputs around it.

mod common;

use common::{ECHO_MACHINE, Hangar, assert_no_process_mentions, processes_mentioning};
use serde_json::Value;

#[tokio::test]
async fn walkthrough_serves_http_and_https_then_destroy_leaves_no_process() {
    let h = Hangar::start().await;
    let machine = h.app_with_machine("hello").await;
    let id = machine["id"].as_str().unwrap().to_string();
    assert_eq!(machine["region"], "dev");
    // Its address is in the machines' network, not on the host's loopback.
    let ip = machine["private_ip"].as_str().unwrap();
    assert!(h.in_machine_network(ip), "{ip}");

    // HTTP through the proxy, answered by the machine.
    let (status, body) = h.via_proxy("hello.localhost", "/some/path?x=1").await;
    assert_eq!(status, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["machine_id"], id.as_str());
    assert_eq!(echo["app"], "hello");
    assert_eq!(echo["path"], "/some/path");
    assert_eq!(echo["headers"]["fly-region"], "dev");
    assert!(
        echo["headers"]["x-forwarded-for"].as_str().is_some(),
        "{echo}"
    );

    // HTTPS, with SNI and Host hello.localhost resolved to the proxy.
    let https = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .resolve("hello.localhost", h.addrs.https)
        .timeout(common::WAIT)
        .build()
        .unwrap();
    let resp = https
        .get(format!("https://hello.localhost:{}/", h.addrs.https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["machine_id"], id.as_str());
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");

    // The API shows it; metrics count it.
    let (status, list) = h.get("/v1/apps/hello/machines").await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let metrics = common::metrics_at(&h.http, h.addrs.metrics).await;
    assert!(
        metrics.contains("fly_app_machines{state=\"started\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"fly_app_http_responses_count{app="hello",region="dev",status="200"}"#),
        "{metrics}"
    );
    // The catalog's debug page: sizes, feed position, lag and locks.
    let debug: Value = h
        .http
        .get(format!("http://{}/debug/catalog", h.addrs.metrics))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(debug["fib"]["mode"], "global", "{debug}");
    assert_eq!(debug["fib"]["apps"], 1, "{debug}");
    assert_eq!(debug["fib"]["machines"], 1, "{debug}");
    assert_eq!(debug["fib"]["writer"]["lock"], "fib.writer", "{debug}");
    assert!(debug["fib"]["writer"]["last_holder"].is_string(), "{debug}");
    assert!(debug["rib"]["last_seq"].as_u64().unwrap() >= debug["fib"]["seq"].as_u64().unwrap());
    assert_eq!(debug["rib"]["locks"][0]["lock"], "rib.writer", "{debug}");

    // A running machine is only destroyed with force.
    let (status, body) = h.delete(&format!("/v1/apps/hello/machines/{id}")).await;
    assert_eq!(status, 412, "{body}");
    assert!(
        !processes_mentioning(&id).is_empty(),
        "machine should still run"
    );
    let (status, body) = h
        .delete(&format!("/v1/apps/hello/machines/{id}?force=true"))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = h
        .get(&format!(
            "/v1/apps/hello/machines/{id}/wait?state=destroyed&timeout=10"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_no_process_mentions(&id).await;
    let ip = machine["private_ip"].as_str().unwrap();
    assert!(
        std::net::TcpStream::connect((ip, 8080)).is_err(),
        "port still open"
    );

    // With its only machine gone the app answers 503 through the proxy.
    let (status, body) = h.via_proxy("hello.localhost", "/").await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_leaves_nothing_running() {
    let h = Hangar::start().await;

    // No token, a malformed header, a wrong token.
    let resp = h.http.get(h.api("/v1/apps")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("Authorization"),
        "{body}"
    );
    let resp = h
        .http
        .get(h.api("/v1/apps"))
        .header("authorization", "Basic x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = h
        .http
        .get(h.api("/v1/apps"))
        .bearer_auth("hgr_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "invalid token"
    );

    // Malformed JSON and invalid names.
    let (status, body) = h.post("/v1/apps", "{\"app_name\":").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("invalid JSON"),
        "{body}"
    );
    let (status, body) = h.post("/v1/apps", r#"{"app_name":"Bad_Name"}"#).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("app_name:"),
        "{body}"
    );
    let (status, _) = h.post("/v1/apps", r#"{"app_name":"dup"}"#).await;
    assert_eq!(status, 201);
    let (status, body) = h.post("/v1/apps", r#"{"name":"dup"}"#).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["status"], "name_taken");

    // Unknown app and unknown machine.
    let (status, body) = h.get("/v1/apps/nope").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = h.post("/v1/apps/nope/machines", ECHO_MACHINE).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = h.get("/v1/apps/dup/machines/0123456789abcd").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not found"),
        "{body}"
    );
    let (status, _) = h
        .get("/v1/apps/dup/machines/0123456789abcd/wait?state=started&timeout=1")
        .await;
    assert_eq!(status, 404);

    // Invalid machine configs are refused before anything runs.
    let (status, body) = h.post("/v1/apps/dup/machines", r#"{"config":{}}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "config.image: required");
    let (status, body) = h
        .post(
            "/v1/apps/dup/machines",
            r#"{"config":{"image":"Not A Reference"}}"#,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a valid reference"),
        "{body}"
    );
    let (status, body) = h
        .post(
            "/v1/apps/dup/machines",
            r#"{"config":{"image":"hangar/echo"},"region":"mars"}"#,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("mars"), "{body}");
    let (status, _) = h.post("/v1/apps/dup/machines", "not json").await;
    assert_eq!(status, 400);
    let (status, body) = h.get("/v1/apps/dup/machines").await;
    assert_eq!((status, body), (200, Value::Array(vec![])));

    // The proxy: unknown app, app without machines, malformed Host.
    let (status, body) = h.via_proxy("nope.localhost", "/").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("nope"), "{body}");
    let (status, body) = h.via_proxy("dup.localhost", "/").await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = h.via_proxy("bad_host!", "/").await;
    assert_eq!(status, 400, "{body}");

    // Nothing was started for any of it.
    let machines_dir = h.data_dir.join("machines");
    let leftovers: Vec<_> = std::fs::read_dir(&machines_dir).unwrap().collect();
    assert!(leftovers.is_empty(), "machine dirs left: {leftovers:?}");
    assert!(processes_mentioning(&machines_dir.display().to_string()).is_empty());
}

#[tokio::test]
async fn shutdown_stops_machines_and_records_them_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut h = Hangar::start_in(&dir).await;
    let machine = h.app_with_machine("sleepy").await;
    let id = machine["id"].as_str().unwrap().to_string();
    assert!(!processes_mentioning(&id).is_empty());

    let status = h.stop_with(nix::sys::signal::Signal::SIGINT);
    assert!(status.success(), "exit status {status}:\n{}", h.log());
    assert_no_process_mentions(&id).await;
    drop(h);

    // A new run on the same data dir sees the machine stopped, and starts it.
    let h = Hangar::start_in(&dir).await;
    let (status, body) = h.get(&format!("/v1/apps/sleepy/machines/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "stopped", "{body}");
    assert_eq!(body["events"][0]["type"], "stop", "{body}");
    let (status, body) = h
        .post(&format!("/v1/apps/sleepy/machines/{id}/start"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["previous_state"], "stopped");
    let (status, body) = h
        .post(&format!("/v1/apps/sleepy/machines/{id}/start"), "")
        .await;
    assert_eq!(status, 412, "{body}");
    let (status, body) = h.via_proxy("sleepy.localhost", "/").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = h
        .post(&format!("/v1/apps/sleepy/machines/{id}/stop"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = h
        .get(&format!(
            "/v1/apps/sleepy/machines/{id}/wait?state=stopped&timeout=10"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_no_process_mentions(&id).await;
    // Deleting the app destroys what is left of its machines.
    let (status, body) = h.delete("/v1/apps/sleepy").await;
    assert_eq!(status, 202, "{body}");
    let (status, _) = h.get("/v1/apps/sleepy").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn echo_image_speaks_h2c_and_honours_its_query_parameters() {
    let h = Hangar::start().await;
    let machine = h.app_with_machine("echo").await;
    let base = format!("http://{}:8080", machine["private_ip"].as_str().unwrap());

    let h2c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(common::WAIT)
        .build()
        .unwrap();
    let resp = h2c.get(format!("{base}/x")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["machine_id"], machine["id"]);
    assert_eq!(echo["region"], "dev");

    let body = h
        .http
        .get(format!("{base}/?bytes=5000"))
        .send()
        .await
        .unwrap();
    assert_eq!(body.bytes().await.unwrap().len(), 5000);
    let health = h.http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let started = std::time::Instant::now();
    let slow = h
        .http
        .get(format!("{base}/?sleep_ms=200"))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.status(), 200);
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));

    // The same through the proxy, which speaks HTTP/1.1 to the machine.
    let (status, body) = h.via_proxy("echo.localhost", "/?bytes=3").await;
    assert_eq!((status, body.as_str()), (200, "xxx"));
}
