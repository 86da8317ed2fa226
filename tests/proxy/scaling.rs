//! Autostart and autostop: stopped apps woken by requests, idle machines put down.

use super::*;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_machines_are_stopped_but_never_with_a_request_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "{CONFIG}autostop_interval_ms = 100\nautostop_idle_ms = 1500\nautostop_drain_ms = 5000\n"
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
        async move { get(&h, "busy", "/?sleep_ms=2000").await }
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
