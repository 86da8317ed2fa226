//! Test harness: runs the real `hangar dev` binary on port 0 in a temp dir,
//! reads the bound addresses back from `addrs.json`, and stops it on drop
//! (SIGTERM first, so it stops its machines; SIGKILL if it hangs).

#![allow(dead_code)]

pub mod packages;
pub mod registry;

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The unprivileged user (`nobody`).
pub const NOBODY: u32 = 65534;

/// Bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Addrs {
    pub flaps: SocketAddr,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub metrics: SocketAddr,
    /// `ip:port`, or `unix:<path>`.
    pub flyd: String,
}

pub struct Hangar {
    child: Option<Child>,
    pub data_dir: PathBuf,
    /// The block of its sandboxed machines' addresses (`--machine-network`).
    pub machine_network: String,
    _tmp: Option<tempfile::TempDir>,
    pub addrs: Addrs,
    pub token: String,
    pub http: reqwest::Client,
}

impl Hangar {
    /// Starts `hangar dev` in a new temp dir.
    pub async fn start() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().join("data");
        let mut h = Self::start_in(&dir).await;
        h._tmp = Some(tmp);
        h
    }

    /// Starts `hangar dev` with `dir` as its data dir (which may hold a
    /// previous run's state).
    pub async fn start_in(dir: &Path) -> Self {
        Self::start_with(dir, None).await
    }

    /// Starts `hangar dev` in `dir`, with `config` (TOML) as its config file
    /// when given. Listen addresses are always port 0.
    pub async fn start_with(dir: &Path, config: Option<&str>) -> Self {
        Self::launch(dir, config, None).await
    }

    /// Starts `hangar dev` as an unprivileged user (`nobody`) in a new
    /// temp dir: no sandboxes.
    pub async fn start_unprivileged() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("temp dir");
        // nobody walks to its data dir, and writes only there.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY)).unwrap();
        let mut h = Self::launch(&dir, None, Some(NOBODY)).await;
        h._tmp = Some(tmp);
        h
    }

    async fn launch(dir: &Path, config: Option<&str>, user: Option<u32>) -> Self {
        // Machines run in sandboxes under runc, on CI's fresh machines too.
        packages::require(SANDBOX_PACKAGES);
        std::fs::create_dir_all(dir).unwrap();
        // A killed run leaves its addrs.json; never read that one.
        let _ = std::fs::remove_file(dir.join("addrs.json"));
        let parent = dir.parent().unwrap();
        let log = std::fs::File::create(parent.join("hangar.log")).unwrap();
        let network = machine_network_of(&parent.join("machine-network"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hangar"));
        if let Some(text) = config {
            let path = parent.join("hangar.toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("dev").arg("--config").arg(path);
        } else {
            cmd.arg("dev");
        }
        if let Some(id) = user {
            use std::os::unix::process::CommandExt;
            cmd.uid(id).gid(id);
        }
        let child = cmd
            .current_dir(parent)
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--flaps-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--https-addr",
                "127.0.0.1:0",
            ])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                // As dev's config has it: nothing outside calls this host.
                "--flyd-addr",
                "unix:flyd.sock",
                "--machine-network",
                &network,
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hangar");
        let mut child = Some(child);
        let addrs_path = dir.join("addrs.json");
        let deadline = Instant::now() + WAIT;
        let addrs: Addrs = loop {
            if let Ok(text) = std::fs::read_to_string(&addrs_path) {
                break serde_json::from_str(&text).expect("addrs.json parses");
            }
            if let Some(status) = child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "hangar exited with {status} before it was ready:\n{}",
                    read_log(dir)
                );
            }
            assert!(
                Instant::now() < deadline,
                "hangar not ready within {WAIT:?}:\n{}",
                read_log(dir)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let token = std::fs::read_to_string(dir.join("token"))
            .unwrap()
            .trim()
            .to_string();
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .timeout(WAIT)
            .build()
            .unwrap();
        Self {
            child,
            data_dir: dir.to_path_buf(),
            machine_network: network,
            _tmp: None,
            addrs,
            token,
            http,
        }
    }

    /// Whether `ip` is in the block of its sandboxed machines (a /24).
    pub fn in_machine_network(&self, ip: &str) -> bool {
        let gateway = self.machine_gateway();
        ip.parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| u32::from(ip) >> 8 == u32::from(gateway) >> 8 && ip != gateway)
    }

    /// Its machines' gateway: the first address of their block.
    pub fn machine_gateway(&self) -> std::net::Ipv4Addr {
        let base: std::net::Ipv4Addr = self
            .machine_network
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        std::net::Ipv4Addr::from(u32::from(base) + 1)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends `signal` and waits (bounded) for the process to exit.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let pid = self.pid();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        self.wait_exit()
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("still running");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "hangar did not exit within {WAIT:?}:\n{}",
                    read_log(&self.data_dir)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server log so far (for assertion messages).
    pub fn log(&self) -> String {
        read_log(&self.data_dir)
    }

    /// A new API token of `org` (the org made if new), by the CLI beside
    /// the running instance.
    pub fn token_for(&self, org: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_hangar"))
            .args(["tokens", "create", "--org", org, "--data-dir"])
            .arg(&self.data_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// The cluster credential, as a member of the cluster presents it (the
    /// hex of the 32 bytes in `cluster.key`).
    pub fn cluster_key(&self) -> String {
        let key = std::fs::read(self.data_dir.join("cluster.key")).unwrap();
        assert_eq!(key.len(), 32);
        key.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Sends one HTTP/1.1 request to flyd (on its unix socket or TCP
    /// address) exactly as written; returns the status and body.
    pub async fn flyd_request(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, String)],
        body: &str,
    ) -> (u16, String) {
        match self.addrs.flyd.strip_prefix("unix:") {
            Some(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.unwrap();
                exchange(stream, "flyd", method, target, headers, body).await
            }
            None => {
                let addr: SocketAddr = self.addrs.flyd.parse().unwrap();
                raw_request(addr, method, target, headers, body).await
            }
        }
    }

    pub fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.addrs.flaps)
    }

    /// An authorized API call; returns status and JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> (u16, Value) {
        self.try_call(method, path, body).await.expect("api call")
    }

    /// An authorized API call that may fail (the server may be crashing).
    pub async fn try_call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, Value), reqwest::Error> {
        let mut req = self
            .http
            .request(method, self.api(path))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, json))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &str) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// Creates a started hangar/echo machine in an existing app; returns its id.
    pub async fn app_machine_started(&self, app: &str) -> String {
        let (status, machine) = self
            .post(&format!("/v1/apps/{app}/machines"), ECHO_MACHINE)
            .await;
        assert_eq!(status, 200, "{machine}\n{}", self.log());
        machine["id"].as_str().unwrap().to_string()
    }

    /// Creates an app and a started hangar/echo machine; returns the machine.
    pub async fn app_with_machine(&self, app: &str) -> Value {
        self.app_with_machine_config(app, ECHO_MACHINE).await
    }

    /// Creates an app and a started machine from `request` (a create
    /// request's JSON); returns the machine.
    pub async fn app_with_machine_config(&self, app: &str, request: &str) -> Value {
        self.create_app(app).await;
        self.started_machine(app, request).await
    }

    /// Creates an app in the dev org.
    pub async fn create_app(&self, app: &str) {
        let body = format!(r#"{{"app_name":"{app}","org_slug":"personal"}}"#);
        let (status, body) = self.post("/v1/apps", &body).await;
        assert_eq!(status, 201, "{body}");
    }

    /// Creates a machine from `request` (a create request's JSON) in an
    /// existing app and waits until it is started; returns the machine.
    pub async fn started_machine(&self, app: &str, request: &str) -> Value {
        let (status, machine) = self
            .post(&format!("/v1/apps/{app}/machines"), request)
            .await;
        assert_eq!(status, 200, "{machine}\n{}", self.log());
        let id = machine["id"].as_str().unwrap();
        self.wait_state(app, id, "started").await;
        machine
    }

    /// Waits until the machine is in `state`.
    pub async fn wait_state(&self, app: &str, id: &str, state: &str) {
        let path = format!("/v1/apps/{app}/machines/{id}/wait?state={state}&timeout=30");
        let (status, body) = self.get(&path).await;
        assert_eq!(status, 200, "wait {state}: {body}");
    }

    /// A GET through the proxy's HTTP listener with `Host: host`.
    pub async fn via_proxy(&self, host: &str, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(format!("http://{}{path}", self.addrs.http))
            .header("host", host)
            .send()
            .await
            .expect("proxy request");
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

/// What a response (through the proxy, usually) carried: the status, the
/// answering machine, the proxy's error code, and the body as JSON (the
/// echo's) or else as a JSON string.
#[derive(Debug)]
pub struct Answered {
    pub status: u16,
    pub machine: Option<String>,
    pub code: Option<String>,
    pub body: Value,
}

impl Answered {
    pub async fn of(resp: reqwest::Response) -> Self {
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let (status, machine, code) = (
            resp.status().as_u16(),
            header("fly-machine-id"),
            header("fly-proxy-error"),
        );
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Self {
            status,
            machine,
            code,
            body,
        }
    }

    /// Status, machine, code and body as a tuple, for one-line asserts.
    pub fn parts(self) -> (u16, Option<String>, Option<String>, Value) {
        (self.status, self.machine, self.code, self.body)
    }
}

/// The metrics text served at `metrics`.
pub async fn metrics_at(http: &reqwest::Client, metrics: SocketAddr) -> String {
    http.get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// One more part beside a `hangar dev` (`hangar flyd` or `hangar proxy`),
/// sharing its data dir, on port 0; stopped with SIGTERM on drop.
pub struct Part {
    child: Child,
    log: PathBuf,
    /// What the part wrote to its addrs file.
    pub addrs: Value,
}

impl Part {
    /// Starts `hangar <kind>` with `config` (TOML) in `data_dir`, and
    /// waits for `<data_dir>/<addrs_file>`. `name` names its config and
    /// log files beside the data dir.
    pub async fn start(
        kind: &str,
        name: &str,
        data_dir: &Path,
        config: &str,
        addrs_file: &str,
    ) -> Self {
        packages::require(SANDBOX_PACKAGES);
        std::fs::create_dir_all(data_dir).unwrap();
        let parent = data_dir.parent().unwrap();
        let config_path = parent.join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let log = parent.join(format!("{name}.log"));
        let addrs_path = data_dir.join(addrs_file);
        let _ = std::fs::remove_file(&addrs_path);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hangar"));
        cmd.arg(kind)
            .arg("--config")
            .arg(&config_path)
            .arg("--data-dir")
            .arg(data_dir);
        let ports: &[&str] = match kind {
            "flyd" => &["--flyd-addr"],
            _ => &["--http-addr", "--https-addr", "--metrics-addr"],
        };
        for flag in ports {
            cmd.args([flag, "127.0.0.1:0"]);
        }
        if kind == "flyd" {
            let network = machine_network_of(&parent.join(format!("{name}.machine-network")));
            cmd.args(["--machine-network", &network]);
        }
        let mut child = cmd
            .current_dir(parent)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn hangar part");
        let deadline = Instant::now() + WAIT;
        let addrs = loop {
            if let Ok(text) = std::fs::read_to_string(&addrs_path) {
                break serde_json::from_str(&text).expect("addrs file parses");
            }
            let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(status) = child.try_wait().unwrap() {
                panic!("hangar {kind} exited with {status}:\n{}", log_text());
            }
            assert!(
                Instant::now() < deadline,
                "hangar {kind} not ready:\n{}",
                log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Self { child, log, addrs }
    }

    /// An address the part wrote (`http`, `flyd`, ...).
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.addrs[name].as_str().unwrap().parse().unwrap()
    }

    /// The part's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + WAIT;
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Hangar {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_with(nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// What sandboxed machines need of the host: runc, and nftables for their
/// networks' filter.
pub const SANDBOX_PACKAGES: &[&str] = &["runc", "nftables"];

/// The block of machine addresses kept in `file` (one Hangar's, across its
/// restarts), or a new one written there.
fn machine_network_of(file: &Path) -> String {
    if let Ok(block) = std::fs::read_to_string(file) {
        return block;
    }
    let block = machine_network();
    std::fs::write(file, &block).unwrap();
    block
}

/// An address block no other Hangar the tests start uses meanwhile: the
/// test binaries run at once and share the host's routes, where two
/// bridges with one block would take each other's traffic. The /24s of
/// 10.128.0.0/9 in turn, counted in a file under a lock.
pub fn machine_network() -> String {
    use std::io::{Read, Seek, Write};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open("/tmp/hangar-tests-networks")
        .expect("the networks' counter");
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("locking the networks' counter");
    let mut file: &std::fs::File = &held;
    let mut text = String::new();
    file.read_to_string(&mut text).unwrap();
    let n: u32 = text.trim().parse().unwrap_or(0) % (1 << 15);
    file.rewind().unwrap();
    file.set_len(0).unwrap();
    write!(file, "{}", n + 1).unwrap();
    format!("10.{}.{}.0/24", 128 + (n >> 8), n & 0xff)
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("../hangar.log")).unwrap_or_default()
}

/// The machine the README's walkthrough creates.
/// Config that lets machines run host commands (`hangar/host`).
pub const HOST_COMMANDS: &str =
    "[flaps.rate_limits]\nenabled = false\n[flyd]\nhost_commands = true\n";

pub const ECHO_MACHINE: &str = r#"{"config":{"image":"hangar/echo","services":[{"protocol":"tcp","internal_port":8080,
  "ports":[{"port":80,"handlers":["http"]},{"port":443,"handlers":["tls","http"]}]}]}}"#;

/// [`ECHO_MACHINE`] with autostart off: the proxy never starts it, so a
/// test can watch it stay stopped or suspended.
pub const ECHO_MACHINE_MANUAL: &str = r#"{"config":{"image":"hangar/echo","services":[{"protocol":"tcp","internal_port":8080,
  "autostart":false,
  "ports":[{"port":80,"handlers":["http"]},{"port":443,"handlers":["tls","http"]}]}]}}"#;

/// Sends one HTTP/1.1 request to `addr` exactly as written (no client
/// normalizes its path, as an attacker's would not) and returns the
/// status and body.
pub async fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(stream, &addr.to_string(), method, target, headers, body).await
}

/// One request written as given on `stream`, and its answer.
async fn exchange(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    host: &str,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {host}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits until `check` holds, checking every 10 ms for at most [`WAIT`];
/// panics naming `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until(what, || {
        let checked = check();
        async move {
            if checked.await {
                Ok(())
            } else {
                Err(String::new())
            }
        }
    })
    .await
}

/// Asks `check` every 10 ms until it gives a value, and returns it; past
/// [`WAIT`], fails naming `what` and the last thing `check` saw (its
/// `Err`).
pub async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = match check().await {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "not within {WAIT:?}: {what}; last seen: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Pids of processes whose command line or environment mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let found = ["cmdline", "environ"].iter().any(|f| {
            std::fs::read(entry.path().join(f))
                .map(|bytes| String::from_utf8_lossy(&bytes).contains(needle))
                .unwrap_or(false)
        });
        // Zombies keep their cmdline empty; skip exited-but-unreaped entries.
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        if found && !zombie {
            pids.push(pid);
        }
    }
    pids
}

/// Waits (bounded) until no process mentions `needle`.
pub async fn assert_no_process_mentions(needle: &str) {
    let what = format!("no process running for {needle}");
    until(&what, || async {
        match processes_mentioning(needle) {
            pids if pids.is_empty() => Ok(()),
            pids => Err(format!("{pids:?}")),
        }
    })
    .await
}

/// A documented path (`/v1/apps/{app_name}/...`) with its placeholders
/// filled: `app` and machine `id`, and fixed values for the rest.
pub fn fill_path(template: &str, app: &str, id: &str) -> String {
    template
        .replace("{app_name}", app)
        .replace("{machine_id}", id)
        .replace("{org_slug}", "personal")
        .replace("{key}", "k")
        .replace("{secret_name}", "S")
        .replace("{hostname}", "h.example.com")
        .replace("{ip}", "127.20.0.1")
}
