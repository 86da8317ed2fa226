//! Two regions on one machine: `hangar dev` (region dev) beside a
//! `hangar flyd` and a `hangar proxy` of region ord, all on one data dir,
//! with regional catalogs. The dev proxy forwards what its region has no
//! machine for to ord's proxy, and a forwarded request never comes back.

mod common;

use common::{Answered, Hangar, Part, WAIT};
use serde_json::Value;

/// Test-sized settings, and regional catalogs: each proxy knows its own
/// region's machines and the others' summaries.
const BASE: &str = r#"
[flaps.rate_limits]
enabled = false
[catalog]
mode = "regional"
[flyd]
ready_timeout_ms = 300
cpu_overcommit = 128
"#;

/// A request to `app` through the proxy at `addr`: status, the answering
/// machine, the proxy's error code, and the echo's JSON.
async fn get(
    addr: std::net::SocketAddr,
    app: &str,
) -> (u16, Option<String>, Option<String>, Value) {
    let client = reqwest::Client::builder().timeout(WAIT).build().unwrap();
    let resp = client
        .get(format!("http://{addr}/"))
        .header("host", format!("{app}.localhost"))
        .send()
        .await
        .unwrap();
    Answered::of(resp).await.parts()
}

fn machine_in(region: &str, autostart: bool) -> String {
    serde_json::json!({"region": region, "config": {"image": "hangar/echo", "services": [{
        "protocol": "tcp", "internal_port": 8080, "autostart": autostart,
        "ports": [{"port": 80, "handlers": ["http"]}]
    }]}})
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_without_machines_forwards_to_the_closest_that_has_them() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // ord's host and proxy first, so dev's config can name ord's proxy. Its
    // own peer entry for dev only makes dev's address trusted: were it ever
    // to forward back, it would reach nothing there (port 1).
    let ord_flyd = Part::start(
        "flyd",
        "ord-flyd",
        &data,
        &format!(
            "{BASE}host_id = \"ord-host-1\"\nregion = \"ord\"\nprivate_range = \"127.11.0.0/16\"\n"
        ),
        "addrs-flyd-ord-host-1.json",
    )
    .await;
    let ord = Part::start(
        "proxy",
        "ord-proxy",
        &data,
        &format!("{BASE}[proxy]\nregion = \"ord\"\n[[proxy.peers]]\nregion = \"dev\"\naddr = \"127.0.0.1:1\"\n"),
        "addrs-proxy-ord.json",
    )
    .await;
    let config = format!(
        "{BASE}[[proxy.peers]]\nregion = \"ord\"\naddr = \"{}\"\n",
        ord.addr("http")
    );
    let h = Hangar::start_with(&data, Some(&config)).await;

    // A machine in ord only: dev forwards, ord answers.
    h.create_app("world").await;
    let far = h.started_machine("world", &machine_in("ord", true)).await;
    let far = far["id"].as_str().unwrap().to_string();
    let (status, machine, _, body) = get(h.addrs.http, "world").await;
    assert_eq!(
        (status, machine.as_deref()),
        (200, Some(far.as_str())),
        "{body}\n{}",
        ord.log()
    );
    assert_eq!(body["region"], "ord");
    let headers = &body["headers"];
    assert_eq!(headers["fly-forwarded-region"], "dev");
    assert_eq!(headers["fly-region"], "dev", "the edge the client reached");
    assert_eq!(headers["fly-client-ip"], "127.0.0.1");
    assert_eq!(headers["via"], "1.1 hangar, 1.1 hangar");
    assert!(
        headers["fly-request-id"]
            .as_str()
            .unwrap()
            .ends_with("-dev")
    );

    // A machine in dev too: dev serves it itself.
    let near = h.started_machine("world", &machine_in("dev", true)).await;
    let near = near["id"].as_str().unwrap().to_string();
    for _ in 0..5 {
        let (status, machine, ..) = get(h.addrs.http, "world").await;
        assert_eq!((status, machine.as_deref()), (200, Some(near.as_str())));
    }

    // Stopped in ord with autostart off: ord cannot serve it and, the
    // request being forwarded, does not send it back.
    h.create_app("asleep").await;
    let idle = h.started_machine("asleep", &machine_in("ord", false)).await;
    let idle = idle["id"].as_str().unwrap();
    let (status, _) = h
        .post(&format!("/v1/apps/asleep/machines/{idle}/stop"), "{}")
        .await;
    assert_eq!(status, 200);
    h.wait_state("asleep", idle, "stopped").await;
    let (status, _, code, body) = get(h.addrs.http, "asleep").await;
    assert_eq!((status, code.as_deref()), (503, Some("PR01")), "{body}");

    // Only a stopped machine, in ord, that may start: ord's proxy starts it.
    h.create_app("later").await;
    let later = h.started_machine("later", &machine_in("ord", true)).await;
    let later = later["id"].as_str().unwrap().to_string();
    let (status, _) = h
        .post(&format!("/v1/apps/later/machines/{later}/stop"), "{}")
        .await;
    assert_eq!(status, 200);
    h.wait_state("later", &later, "stopped").await;
    let (status, machine, _, body) = get(h.addrs.http, "later").await;
    assert_eq!(
        (status, machine.as_deref()),
        (200, Some(later.as_str())),
        "{body}"
    );

    let metrics = common::metrics_at(&h.http, h.addrs.metrics).await;
    assert!(
        metrics.contains("fly_edge_http_forwarded_count 3"),
        "{metrics}"
    );
    drop(ord_flyd);
}
