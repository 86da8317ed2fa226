//! The `hangar` client commands: `apps`, `machines` and `status`, talking to
//! the Machines API. Tables for people by default, `--json` for scripts.
//! Exit codes: 0 on success, 1 when the API refuses or cannot be reached
//! (the error is printed), 2 for usage errors, and `machines exec` exits
//! with the command's own code.

use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How to reach the Machines API; each has an environment variable.
#[derive(clap::Args, Clone)]
pub struct Conn {
    /// Machines API base URL (default: the local dev instance's).
    #[arg(long, env = "HANGAR_API_URL", global = true)]
    api_url: Option<String>,
    /// API token (default: the dev token in the data dir).
    #[arg(long, env = "HANGAR_API_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The dev data dir to read the address and token from.
    #[arg(long, default_value = ".hangar", global = true)]
    data_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand)]
pub enum AppsCmd {
    /// Create an app.
    Create {
        name: String,
        #[arg(long, default_value = "personal")]
        org: String,
    },
    /// List your org's apps.
    List,
    /// Destroy an app and its machines.
    Destroy { name: String },
}

#[derive(clap::Subcommand)]
pub enum MachinesCmd {
    /// Create and start a machine, and wait until it is started.
    Run {
        #[arg(long)]
        app: String,
        #[arg(long, default_value = "hangar/echo")]
        image: String,
        /// The service's internal port, exposed on the proxy's HTTP and HTTPS listeners.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long)]
        region: Option<String>,
        /// Environment variables, KEY=VALUE.
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// A host command to run instead of the image's default.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// List an app's machines.
    List {
        #[arg(long)]
        app: String,
    },
    /// Show one machine.
    Status {
        id: String,
        #[arg(long)]
        app: String,
    },
    /// Start a machine.
    Start {
        id: String,
        #[arg(long)]
        app: String,
    },
    /// Stop a machine.
    Stop {
        id: String,
        #[arg(long)]
        app: String,
    },
    /// Suspend a machine.
    Suspend {
        id: String,
        #[arg(long)]
        app: String,
    },
    /// Destroy a machine (`--force` for a running one).
    Destroy {
        id: String,
        #[arg(long)]
        app: String,
        #[arg(long)]
        force: bool,
    },
    /// Wait until a machine reaches a state.
    Wait {
        id: String,
        #[arg(long)]
        app: String,
        #[arg(long, default_value = "started")]
        state: String,
        /// Seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Run a command beside the machine's workload; exits with its code.
    Exec {
        id: String,
        #[arg(long)]
        app: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the machine's log (local dev instances only: read from the data dir).
    Logs { id: String },
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

/// The Machines API client of the CLI.
struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn new(conn: &Conn) -> anyhow::Result<Self> {
        let base = match &conn.api_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => match std::fs::read_to_string(conn.data_dir.join("addrs.json")) {
                Ok(text) => {
                    let addrs: Value = serde_json::from_str(&text)?;
                    format!(
                        "http://{}",
                        addrs["flaps"].as_str().context("addrs.json has no flaps")?
                    )
                }
                Err(_) => "http://127.0.0.1:4280".to_string(),
            },
        };
        let token = match &conn.token {
            Some(t) => t.clone(),
            None => std::fs::read_to_string(conn.data_dir.join("token"))
                .map(|t| t.trim().to_string())
                .with_context(|| {
                    format!(
                        "no token: set HANGAR_API_TOKEN or --token (no dev token in {})",
                        conn.data_dir.display()
                    )
                })?,
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(330))
            .build()?;
        Ok(Self { http, base, token })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the Machines API at {}", self.base))?;
        answer(resp).await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, body).await
    }

    /// Waits for `state`, telling a person on a terminal what it waits for.
    async fn wait(&self, app: &str, id: &str, state: &str, timeout: u64) -> anyhow::Result<Value> {
        if std::io::stderr().is_terminal() {
            eprintln!("waiting for machine {id} to be {state}...");
        }
        self.get(&format!(
            "/v1/apps/{app}/machines/{id}/wait?state={state}&timeout={timeout}"
        ))
        .await
    }
}

fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn machine_rows(machines: &[Value]) -> Vec<Vec<String>> {
    machines
        .iter()
        .map(|m| {
            ["id", "name", "state", "region", "private_ip", "updated_at"]
                .iter()
                .map(|k| text(&m[*k]))
                .collect()
        })
        .collect()
}

const MACHINE_HEADERS: [&str; 6] = ["ID", "NAME", "STATE", "REGION", "PRIVATE IP", "UPDATED"];

/// An answer's JSON, or its error (the API's `error` field) with its status.
pub(crate) async fn answer(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let text = resp.text().await?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = value["error"].as_str().map(str::to_string).unwrap_or(text);
        bail!("{msg} ({status})");
    }
    Ok(value)
}

fn show(json: bool, value: &Value, human: impl FnOnce(&Value)) {
    if json {
        println!("{value}");
    } else {
        human(value);
    }
}

pub async fn apps(conn: Conn, cmd: AppsCmd) -> anyhow::Result<i32> {
    let api = Api::new(&conn)?;
    match cmd {
        AppsCmd::Create { name, org } => {
            let v = api
                .post(
                    "/v1/apps",
                    Some(json!({ "app_name": name, "org_slug": org })),
                )
                .await?;
            show(conn.json, &v, |_| println!("created app {name}"));
        }
        AppsCmd::List => {
            let v = api.get("/v1/apps").await?;
            show(conn.json, &v, |v| {
                let rows = v["apps"]
                    .as_array()
                    .map(|apps| {
                        apps.iter()
                            .map(|a| {
                                vec![
                                    text(&a["name"]),
                                    text(&a["organization"]["slug"]),
                                    text(&a["status"]),
                                    text(&a["machine_count"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(&["NAME", "ORG", "STATUS", "MACHINES"], rows);
            });
        }
        AppsCmd::Destroy { name } => {
            api.call(reqwest::Method::DELETE, &format!("/v1/apps/{name}"), None)
                .await?;
            show(conn.json, &json!({ "ok": true }), |_| {
                println!("destroyed app {name}")
            });
        }
    }
    Ok(0)
}

pub async fn machines(conn: Conn, cmd: MachinesCmd) -> anyhow::Result<i32> {
    if let MachinesCmd::Logs { id } = &cmd {
        use hangar_flyd::{pilot, runtime::process};
        let path = pilot::log_path(&process::machines_dir(&conn.data_dir).join(id));
        let log = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no log at {} (logs are read from a local dev data dir)",
                path.display()
            )
        })?;
        print!("{log}");
        return Ok(0);
    }
    let api = Api::new(&conn)?;
    let m = |app: &str, id: &str, suffix: &str| format!("/v1/apps/{app}/machines/{id}{suffix}");
    match cmd {
        MachinesCmd::Run {
            app,
            image,
            port,
            region,
            env,
            command,
        } => {
            let mut config = json!({
                "image": image,
                "env": env.into_iter().collect::<std::collections::BTreeMap<String, String>>(),
                "services": [{"protocol": "tcp", "internal_port": port, "ports": [
                    {"port": 80, "handlers": ["http"]}, {"port": 443, "handlers": ["tls", "http"]}]}],
            });
            if !command.is_empty() {
                config["init"] = json!({ "exec": command });
            }
            let mut body = json!({ "config": config });
            if let Some(r) = region {
                body["region"] = r.into();
            }
            let created = api
                .post(&format!("/v1/apps/{app}/machines"), Some(body))
                .await?;
            let id = text(&created["id"]);
            api.wait(&app, &id, "started", 60).await?;
            let machine = api.get(&m(&app, &id, "")).await?;
            show(conn.json, &machine, |v| {
                println!(
                    "machine {id} is {} at {}",
                    text(&v["state"]),
                    text(&v["private_ip"])
                )
            });
        }
        MachinesCmd::List { app } => {
            let v = api.get(&format!("/v1/apps/{app}/machines")).await?;
            show(conn.json, &v, |v| {
                print_table(
                    &MACHINE_HEADERS,
                    machine_rows(v.as_array().map(Vec::as_slice).unwrap_or(&[])),
                )
            });
        }
        MachinesCmd::Status { id, app } => {
            let v = api.get(&m(&app, &id, "")).await?;
            show(conn.json, &v, |v| {
                print_table(&MACHINE_HEADERS, machine_rows(std::slice::from_ref(v)));
                for c in v["checks"].as_array().into_iter().flatten() {
                    println!(
                        "check {}: {} ({})",
                        text(&c["name"]),
                        text(&c["status"]),
                        text(&c["output"])
                    );
                }
            });
        }
        MachinesCmd::Start { id, app } => {
            let v = api.post(&m(&app, &id, "/start"), None).await?;
            show(conn.json, &v, |_| println!("started {id}"));
        }
        MachinesCmd::Stop { id, app } => {
            let v = api.post(&m(&app, &id, "/stop"), None).await?;
            show(conn.json, &v, |_| println!("stopped {id}"));
        }
        MachinesCmd::Suspend { id, app } => {
            let v = api.post(&m(&app, &id, "/suspend"), None).await?;
            show(conn.json, &v, |_| println!("suspended {id}"));
        }
        MachinesCmd::Destroy { id, app, force } => {
            let path = m(&app, &id, &format!("?force={force}"));
            let v = api.call(reqwest::Method::DELETE, &path, None).await?;
            show(conn.json, &v, |_| println!("destroyed {id}"));
        }
        MachinesCmd::Wait {
            id,
            app,
            state,
            timeout,
        } => {
            let v = api.wait(&app, &id, &state, timeout).await?;
            show(conn.json, &v, |_| println!("machine {id} is {state}"));
        }
        MachinesCmd::Exec { id, app, command } => {
            let v = api
                .post(&m(&app, &id, "/exec"), Some(json!({ "command": command })))
                .await?;
            if conn.json {
                println!("{v}");
            } else {
                print!("{}", text(&v["stdout"]));
                eprint!("{}", text(&v["stderr"]));
            }
            return Ok(v["exit_code"].as_i64().unwrap_or(1) as i32);
        }
        MachinesCmd::Logs { .. } => unreachable!("handled above"),
    }
    Ok(0)
}

/// `hangar status`: where the API is, who you are, regions, apps and
/// machines by state.
pub async fn status(conn: Conn) -> anyhow::Result<i32> {
    let api = Api::new(&conn)?;
    let token = api.get("/v1/tokens/current").await?;
    let regions = api.get("/v1/platform/regions").await?;
    let org = text(&token["tokens"][0]["org_slug"]);
    let machines = api.get(&format!("/v1/orgs/{org}/machines")).await?;
    let apps = api.get("/v1/apps").await?;
    let mut by_state = std::collections::BTreeMap::<String, u64>::new();
    for m in machines["machines"].as_array().into_iter().flatten() {
        *by_state.entry(text(&m["state"])).or_default() += 1;
    }
    let summary = json!({
        "api_url": api.base,
        "org": org,
        "regions": regions["regions"].as_array().into_iter().flatten().map(|r| r["code"].clone()).collect::<Vec<_>>(),
        "apps": apps["total_apps"],
        "machines": by_state,
    });
    show(conn.json, &summary, |s| {
        println!("Machines API  {}", text(&s["api_url"]));
        println!("org           {}", text(&s["org"]));
        println!(
            "regions       {}",
            s["regions"]
                .as_array()
                .map(|r| r.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        );
        println!("apps          {}", text(&s["apps"]));
        let states: Vec<String> = by_state.iter().map(|(k, v)| format!("{v} {k}")).collect();
        println!(
            "machines      {}",
            if states.is_empty() {
                "none".to_string()
            } else {
                states.join(", ")
            }
        );
    });
    Ok(0)
}

/// How to reach a host's flyd (images are per host).
#[derive(clap::Args, Clone)]
pub struct HostConn {
    /// flyd's address: `ip:port` or `unix:<path>` (default: the local dev
    /// instance's, from `addrs.json`).
    #[arg(long, env = "HANGAR_FLYD", global = true)]
    host: Option<String>,
    /// The dev data dir to read the address and cluster credential from.
    #[arg(long, default_value = ".hangar", global = true)]
    data_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand)]
pub enum ImagesCmd {
    /// List the host's images.
    Ls,
    /// Pull an image into the host's store ahead of any machine.
    Pull { image: String },
    /// Import the images of an archive: an OCI image layout or a
    /// `docker save` archive, plain or gzipped.
    Import { file: PathBuf },
    /// Remove an image (by name, digest or digest prefix), or one of its
    /// names; refused while a machine uses it.
    Rm { image: String },
    /// Remove every image no machine uses.
    Prune,
}

/// A host's flyd, called with the cluster credential.
pub(crate) struct FlydClient {
    http: reqwest::Client,
    base: String,
    key: hangar_catalog::ClusterKey,
    /// Where it is, for messages.
    pub(crate) addr: String,
}

impl FlydClient {
    /// The flyd at `addr` (`ip:port` or `unix:<path>`), with the cluster
    /// credential of `data_dir`.
    pub(crate) fn new(addr: &str, data_dir: &Path) -> anyhow::Result<Self> {
        let key_path = data_dir.join("cluster.key");
        if !key_path.is_file() {
            bail!("no cluster credential in {}", data_dir.display());
        }
        let key = hangar_catalog::ClusterKey::load_or_create(&key_path)?;
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(3600));
        let base = match addr.strip_prefix("unix:") {
            Some(path) => {
                builder = builder.unix_socket(PathBuf::from(path));
                "http://flyd".to_string()
            }
            None => format!("http://{addr}"),
        };
        Ok(Self {
            http: builder.build()?,
            base,
            key,
            addr: addr.to_string(),
        })
    }

    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.key.token())
    }
}

/// `hangar images`: calls the host's flyd with the cluster credential.
pub async fn images(conn: HostConn, cmd: ImagesCmd) -> anyhow::Result<i32> {
    let addr = match &conn.host {
        Some(host) => host.clone(),
        None => {
            let text =
                std::fs::read_to_string(conn.data_dir.join("addrs.json")).with_context(|| {
                    format!(
                        "no running dev instance in {} (or use --host)",
                        conn.data_dir.display()
                    )
                })?;
            let addrs: Value = serde_json::from_str(&text)?;
            addrs["flyd"]
                .as_str()
                .context("addrs.json has no flyd")?
                .to_string()
        }
    };
    let flyd = FlydClient::new(&addr, &conn.data_dir)?;
    let request = |method: reqwest::Method, path: &str| flyd.request(method, path);
    let req = match &cmd {
        ImagesCmd::Ls => request(reqwest::Method::GET, "/v1/images"),
        ImagesCmd::Pull { image } => {
            request(reqwest::Method::POST, "/v1/images/pull").json(&json!({ "image": image }))
        }
        ImagesCmd::Import { file } => {
            let f = tokio::fs::File::open(file)
                .await
                .with_context(|| format!("opening {}", file.display()))?;
            request(reqwest::Method::POST, "/v1/images/import").body(f)
        }
        ImagesCmd::Rm { image } => {
            request(reqwest::Method::DELETE, "/v1/images").query(&[("image", image.as_str())])
        }
        ImagesCmd::Prune => request(reqwest::Method::POST, "/v1/images/prune"),
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach flyd at {addr}"))?;
    let value = answer(resp).await?;
    show(conn.json, &value, |v| {
        let list = match &cmd {
            ImagesCmd::Ls | ImagesCmd::Import { .. } => v["images"].as_array().cloned(),
            ImagesCmd::Prune => v["removed"].as_array().cloned(),
            ImagesCmd::Pull { .. } | ImagesCmd::Rm { .. } => Some(vec![v.clone()]),
        };
        if let ImagesCmd::Rm { image } = &cmd {
            println!("removed {image}");
            return;
        }
        let rows = list
            .unwrap_or_default()
            .iter()
            .map(|i| {
                let names: Vec<String> = i["names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(text)
                    .collect();
                let digest = text(&i["digest"]);
                vec![
                    if names.is_empty() {
                        "<none>".to_string()
                    } else {
                        names.join(", ")
                    },
                    digest.chars().take(19).collect(),
                    format!("{:.1} MB", i["size"].as_f64().unwrap_or(0.0) / 1e6),
                    text(&i["stored_at"]),
                ]
            })
            .collect();
        print_table(&["NAME", "DIGEST", "SIZE", "STORED"], rows);
    });
    Ok(0)
}
