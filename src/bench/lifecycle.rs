//! `hangar bench lifecycle`: machine lifecycle latencies through the
//! Machines API (create → started, stop, start, suspend, resume), sustained
//! creates per second, and flyd's redb step-commit latency.

use super::percentile;
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Flags of `hangar bench lifecycle`.
#[derive(clap::Args)]
pub struct LifecycleArgs {
    /// Machines per measured operation.
    #[arg(long, default_value_t = 50)]
    count: usize,
    /// Creates in flight at once for the sustained-rate measurement.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Machines API to measure (default: start a dev instance of this binary).
    #[arg(long, requires = "token")]
    flaps: Option<String>,
    /// Token for --flaps.
    #[arg(long)]
    token: Option<String>,
    /// The image the machines run (serving port 8080).
    #[arg(long, default_value = "hangar/echo")]
    image: String,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// A `hangar dev` started for the benchmark, stopped on drop.
pub(super) struct DevInstance {
    child: Child,
    dir: tempfile::TempDir,
}

impl DevInstance {
    pub(super) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for DevInstance {
    fn drop(&mut self) {
        // SIGTERM: it stops its machines and exits.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }
}

/// Starts `hangar dev` on port 0 in a temp dir; returns it, the API base
/// URL and the token.
async fn start_dev() -> anyhow::Result<(DevInstance, String, String)> {
    let (instance, addrs, token) = start_dev_with_addrs().await?;
    let base = format!(
        "http://{}",
        addrs["flaps"].as_str().context("addrs.json has no flaps")?
    );
    Ok((instance, base, token))
}

/// Starts `hangar dev` on port 0 in a temp dir; returns it, its bound
/// addresses (`addrs.json`) and the token.
pub(super) async fn start_dev_with_addrs() -> anyhow::Result<(DevInstance, Value, String)> {
    let dir = tempfile::tempdir()?;
    let data: PathBuf = dir.path().join("data");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("dev").arg("--data-dir").arg(&data);
    for flag in [
        "--flaps-addr",
        "--http-addr",
        "--https-addr",
        "--metrics-addr",
        "--flyd-addr",
    ] {
        cmd.args([flag, "127.0.0.1:0"]);
    }
    let child = cmd
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("hangar.log"))?)
        .spawn()?;
    let mut instance = DevInstance { child, dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    let addrs: Value = loop {
        if let Ok(text) = std::fs::read_to_string(data.join("addrs.json")) {
            break serde_json::from_str(&text)?;
        }
        if let Some(status) = instance.child.try_wait()? {
            bail!("hangar dev exited with {status} before it was ready");
        }
        if Instant::now() > deadline {
            bail!("hangar dev was not ready within 60s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let token = std::fs::read_to_string(data.join("token"))?
        .trim()
        .to_string();
    Ok((instance, addrs, token))
}

/// The Machines API, as the benchmark calls it.
#[derive(Clone)]
pub(super) struct Api {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
    pub(super) token: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub(super) async fn wait(&self, app: &str, id: &str, state: &str) -> anyhow::Result<()> {
        let path = format!("/v1/apps/{app}/machines/{id}/wait?state={state}&timeout=60");
        self.call(reqwest::Method::GET, &path, None).await.map(drop)
    }

    pub(super) async fn post(&self, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, body).await
    }
}

/// Percentiles of a sample, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(super) struct Latency {
    pub(super) p50: f64,
    pub(super) p90: f64,
    pub(super) p99: f64,
}

pub(super) fn latency(samples: Vec<Duration>) -> Latency {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    Latency {
        p50: percentile(&ms, 0.50),
        p90: percentile(&ms, 0.90),
        p99: percentile(&ms, 0.99),
    }
}

/// Times `op` then waits for `state`, for each machine.
async fn timed<F, Fut>(
    api: &Api,
    app: &str,
    ids: &[String],
    state: &str,
    op: F,
) -> anyhow::Result<Latency>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut samples = Vec::with_capacity(ids.len());
    for id in ids {
        let started = Instant::now();
        op(id.clone()).await?;
        api.wait(app, id, state).await?;
        samples.push(started.elapsed());
    }
    Ok(latency(samples))
}

/// How long one FSM step record takes to commit in redb.
fn step_commit_latency(count: usize) -> anyhow::Result<Latency> {
    use hangar_flyd::fsm::{FsmKind, FsmRun};
    use hangar_flyd::store::FsmStore;
    let dir = tempfile::tempdir()?;
    let store = hangar_flyd::store::Store::open(&dir.path().join("flyd.redb"))?;
    let mut run = FsmRun::new(FsmKind::Start, "bench", Value::Null);
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        run.step = i % 3;
        let started = Instant::now();
        store.put_run(&run)?;
        samples.push(started.elapsed());
    }
    Ok(latency(samples))
}

async fn destroy_all(api: &Api, machines: &str, ids: &[String]) -> anyhow::Result<()> {
    for id in ids {
        let path = format!("{machines}/{id}?force=true");
        api.call(reqwest::Method::DELETE, &path, None).await?;
    }
    Ok(())
}

pub async fn lifecycle(args: LifecycleArgs) -> anyhow::Result<()> {
    if args.count == 0 || args.concurrency == 0 {
        bail!("--count and --concurrency must be at least 1");
    }
    let (_instance, base, token) = match (&args.flaps, &args.token) {
        (Some(url), Some(token)) => (None, url.trim_end_matches('/').to_string(), token.clone()),
        _ => {
            let (instance, base, token) = start_dev().await?;
            (Some(instance), base, token)
        }
    };
    let api = Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(90))
            .build()?,
        base,
        token,
    };
    let app = format!("bench-{}", std::process::id());
    api.post("/v1/apps", Some(&json!({ "app_name": app })))
        .await?;
    let machines = format!("/v1/apps/{app}/machines");
    let config = json!({"config": {"image": args.image, "services": [{"internal_port": 8080,
        "ports": [{"port": 80, "handlers": ["http"]}]}]}});

    // create → started, one at a time.
    let mut ids = Vec::with_capacity(args.count);
    let mut samples = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        let started = Instant::now();
        let m = api.post(&machines, Some(&config)).await?;
        let id = m["id"]
            .as_str()
            .context("create answered no id")?
            .to_string();
        api.wait(&app, &id, "started").await?;
        samples.push(started.elapsed());
        ids.push(id);
    }
    let create = latency(samples);
    let op = |suffix: &'static str| {
        let (api, machines) = (api.clone(), machines.clone());
        move |id: String| {
            let (api, path) = (api.clone(), format!("{machines}/{id}/{suffix}"));
            async move { api.post(&path, None).await.map(drop) }
        }
    };
    let stop = timed(&api, &app, &ids, "stopped", op("stop")).await?;
    let start = timed(&api, &app, &ids, "started", op("start")).await?;
    let suspend = timed(&api, &app, &ids, "suspended", op("suspend")).await?;
    let resume = timed(&api, &app, &ids, "started", op("start")).await?;

    destroy_all(&api, &machines, &ids).await?;

    // Sustained creates: `count` creates, `concurrency` in flight.
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let mut launched = 0;
    let mut more = Vec::new();
    while launched < args.count || !set.is_empty() {
        while launched < args.count && set.len() < args.concurrency {
            let (api, machines, config) = (api.clone(), machines.clone(), config.clone());
            set.spawn(async move { api.post(&machines, Some(&config)).await });
            launched += 1;
        }
        if let Some(done) = set.join_next().await {
            let m = done??;
            more.push(m["id"].as_str().unwrap_or_default().to_string());
        }
    }
    let creates_per_sec = args.count as f64 / started.elapsed().as_secs_f64();
    let commit = step_commit_latency(args.count.max(100))?;

    destroy_all(&api, &machines, &more).await?;
    api.call(reqwest::Method::DELETE, &format!("/v1/apps/{app}"), None)
        .await?;

    println!("lifecycle of {} machines ({} each)", args.image, args.count);
    println!(
        "{:<28} {:>9} {:>9} {:>9}",
        "operation (ms)", "p50", "p90", "p99"
    );
    for (name, l) in [
        ("create -> started", create),
        ("stop -> stopped", stop),
        ("start -> started", start),
        ("suspend -> suspended", suspend),
        ("resume -> started", resume),
        ("redb step commit", commit),
    ] {
        println!("{name:<28} {:>9.3} {:>9.3} {:>9.3}", l.p50, l.p90, l.p99);
    }
    println!(
        "sustained creates: {creates_per_sec:.1}/s ({} in flight)",
        args.concurrency
    );
    if args.json {
        let out = json!({
            "bench": "lifecycle",
            "image": args.image,
            "count": args.count,
            "create_ms": create,
            "stop_ms": stop,
            "start_ms": start,
            "suspend_ms": suspend,
            "resume_ms": resume,
            "creates_per_sec": creates_per_sec,
            "concurrency": args.concurrency,
            "step_commit_ms": commit,
        });
        println!("{out}");
    }
    Ok(())
}
