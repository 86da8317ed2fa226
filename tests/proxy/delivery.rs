//! Getting a request to a machine: retries on another machine, the proxy's own errors with their codes, machines that answer early or die.

use super::*;

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
                // The echo server itself, not the sandbox's init above it.
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("echo") && !c.contains("init")
                })
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
