//! `hangar bench coldstart`: a request to an app whose only machine is
//! stopped (or suspended), through the proxy, until the response head
//! arrives; the proxy starts the machine on the way (autostart).
//!
//! Each sample puts the machine down through the Machines API, waits until
//! it is down, then times one GET through the proxy on a new connection.
//! The proxy's own share is that time minus what the start itself took
//! (the proxy's `fly_edge_autostart_time_seconds` for that start: flyd's
//! start call and the catalog showing the machine).

use super::lifecycle::{Api, latency, start_dev_with_addrs};
use anyhow::{Context, bail};
use serde_json::json;
use std::time::{Duration, Instant};

/// Flags of `hangar bench coldstart`.
#[derive(clap::Args)]
pub struct ColdstartArgs {
    /// Samples per kind (stopped, suspended).
    #[arg(long, default_value_t = 30)]
    count: usize,
    /// The image the machine runs (serving port 8080).
    #[arg(long, default_value = "hangar/echo")]
    image: String,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub async fn coldstart(args: ColdstartArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    let (_instance, addrs, token) = start_dev_with_addrs().await?;
    let addr = |name: &str| -> anyhow::Result<String> {
        Ok(addrs[name]
            .as_str()
            .with_context(|| format!("addrs.json has no {name}"))?
            .to_string())
    };
    let (proxy, metrics) = (addr("http")?, addr("metrics")?);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        // A new connection per request: the measured path includes the
        // accept, as a first visitor's would.
        .pool_max_idle_per_host(0)
        .build()?;
    let api = Api {
        http: http.clone(),
        base: format!("http://{}", addr("flaps")?),
        token,
    };
    api.post("/v1/apps", Some(&json!({ "app_name": "cold" })))
        .await?;
    let machine = api
        .post(
            "/v1/apps/cold/machines",
            Some(
                &json!({"config": {"image": args.image, "services": [{"internal_port": 8080,
                "ports": [{"port": 80, "handlers": ["http"]}]}]}}),
            ),
        )
        .await?;
    let id = machine["id"].as_str().context("machine id")?.to_string();
    api.wait("cold", &id, "started").await?;

    // The proxy's total time spent in starts so far, in seconds.
    let start_time = || async {
        let text = http
            .get(format!("http://{metrics}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        text.lines()
            .find_map(|l| l.strip_prefix("fly_edge_autostart_time_seconds_sum "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .context("no fly_edge_autostart_time_seconds_sum in /metrics")
    };

    let mut report = serde_json::Map::new();
    println!(
        "cold request through the proxy to {}, {} samples each (ms)",
        args.image, args.count
    );
    println!("{:<28} {:>8} {:>8} {:>8}", "from", "p50", "p90", "p99");
    for (how, state) in [("stop", "stopped"), ("suspend", "suspended")] {
        let (mut total, mut proxy_share) = (Vec::new(), Vec::new());
        for _ in 0..args.count {
            api.post(&format!("/v1/apps/cold/machines/{id}/{how}"), None)
                .await?;
            api.wait("cold", &id, state).await?;
            let before = start_time().await?;
            let sent = Instant::now();
            let resp = http
                .get(format!("http://{proxy}/"))
                .header("host", "cold.localhost")
                .send()
                .await?;
            let took = sent.elapsed();
            if !resp.status().is_success() {
                bail!("cold request answered {}", resp.status());
            }
            resp.bytes().await?;
            let start = Duration::from_secs_f64((start_time().await? - before).max(0.0));
            total.push(took);
            proxy_share.push(took.saturating_sub(start));
        }
        for (label, key, samples) in [
            (format!("{state} → first byte"), "to_first_byte", total),
            (
                "  of which the proxy's own".to_string(),
                "proxy_share",
                proxy_share,
            ),
        ] {
            let l = latency(samples);
            println!("{label:<28} {:>8.2} {:>8.2} {:>8.2}", l.p50, l.p90, l.p99);
            report.insert(format!("{state}_{key}"), serde_json::to_value(l)?);
        }
    }
    if args.json {
        report.insert("bench".into(), json!("coldstart"));
        report.insert("count".into(), json!(args.count));
        report.insert("image".into(), json!(args.image));
        println!("{}", serde_json::Value::Object(report));
    }
    Ok(())
}
