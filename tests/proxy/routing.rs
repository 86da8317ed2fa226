//! Where a request goes: Fly's routing headers, fly-replay, and sticky sessions.

use super::*;

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
