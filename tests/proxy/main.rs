//! The edge proxy end to end, through the real binary, a module per
//! feature: load limits and the wait queue (`limits`), retries and the
//! proxy's own errors with their codes (`delivery`), clients that
//! misbehave, upgrades and framing (`clients`), apps' own addresses and
//! flycast (`addresses`), autostart and autostop (`scaling`), routing
//! headers, replays and sticky sessions (`routing`). The helpers they share
//! are here.

#[path = "../common/mod.rs"]
mod common;

mod addresses;
mod clients;
mod delivery;
mod limits;
mod routing;
mod scaling;

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
    let what = format!("{sample} in /metrics");
    common::until(&what, || async {
        let text = metrics(h).await;
        if text.contains(sample) {
            Ok(())
        } else {
            Err(format!("{text}\n{}", h.log()))
        }
    })
    .await
}

/// Asks flaps to `stop` or `suspend` a machine and waits until it is.
async fn put_down(h: &Hangar, app: &str, id: &str, how: &str, state: &str) {
    let (status, body) = h
        .post(&format!("/v1/apps/{app}/machines/{id}/{how}"), "{}")
        .await;
    assert_eq!(status, 200, "{how}: {body}");
    h.wait_state(app, id, state).await;
}
