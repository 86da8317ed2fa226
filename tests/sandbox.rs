//! Machines that run images, each in a sandbox of its own, through the
//! real binary: images built by the tests from busybox and served by a
//! real registry. What runs inside is checked from inside (exec) and from
//! the host, as an attacker in the machine would try it.

mod common;

use common::Hangar;
use common::registry::{Registry, TestImage, layer};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;

/// A busybox image whose command serves `/www` with busybox's httpd on
/// the machine's address, port 8080.
fn web_image(label: &str) -> TestImage {
    let mut image = TestImage::busybox(label);
    let page = format!("hello from {label}\n");
    image
        .layers
        .push(layer(&[("www/index.html", page.as_bytes(), 0o644)], &[]));
    let diff_ids: Vec<String> = image
        .layers
        .iter()
        .map(|l| common::registry::sha256(l))
        .collect();
    image.config["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
    image.config["config"]["Cmd"] =
        serde_json::json!(["exec httpd -f -h /www -p $FLY_PRIVATE_IP:8080"]);
    image
}

fn machine_request(image: &str, extra: Value) -> String {
    let mut config = serde_json::json!({
        "image": image,
        "env": {"FROM_CONFIG": "yes", "IMAGE_LABEL_OVERRIDE": "config"},
        "services": [{"protocol": "tcp", "internal_port": 8080,
                      "ports": [{"port": 80, "handlers": ["http"]}]}],
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    serde_json::json!({ "config": config }).to_string()
}

async fn exec(h: &Hangar, app: &str, id: &str, script: &str) -> Value {
    let body = serde_json::json!({"command": ["/bin/sh", "-c", script], "timeout": 20});
    let (status, out) = h
        .post(
            &format!("/v1/apps/{app}/machines/{id}/exec"),
            &body.to_string(),
        )
        .await;
    assert_eq!(status, 200, "{script}: {out}");
    out
}

fn stdout(v: &Value) -> String {
    v["stdout"].as_str().unwrap_or_default().trim().to_string()
}

/// The page `/` of `app`, through the proxy.
async fn page(h: &Hangar, app: &str) -> String {
    let (status, body) = h.via_proxy(&format!("{app}.localhost"), "/").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The host pids of the processes whose command line mentions `needle`.
fn host_pids(needle: &str) -> Vec<u32> {
    common::processes_mentioning(needle)
}

fn mounts_mentioning(needle: &str) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

#[tokio::test]
async fn an_image_runs_in_a_sandbox_of_its_own() {
    let registry = Registry::start();
    let name = format!("{}/web:v1", registry.addr);
    web_image("v1").push(&registry.addr, "web:v1", None).await;
    let h = Hangar::start().await;
    h.create_app("web").await;
    let machine = h
        .started_machine("web", &machine_request(&name, serde_json::json!({})))
        .await;
    let id = machine["id"].as_str().unwrap().to_string();

    // Its command answers through the proxy.
    assert_eq!(page(&h, "web").await, "hello from v1\n");

    // Inside: its own hostname, root of its own ids, the image's files,
    // the merged environment, and no process but its own.
    let out = exec(
        &h,
        "web",
        &id,
        "hostname; id -u; cat /etc/image; echo; echo $IMAGE $FROM_CONFIG $FLY_MACHINE_ID",
    )
    .await;
    assert_eq!(stdout(&out), format!("{id}\n0\nv1\nv1 yes {id}"), "{out}");
    let out = exec(&h, "web", &id, "ls /proc | grep -c '^[0-9]'").await;
    // init, httpd, and this exec's sh, ls and grep.
    let seen: u32 = stdout(&out).parse().unwrap();
    assert!(seen <= 5, "sees {seen} processes: {out}");
    let (status, ps) = h.get(&format!("/v1/apps/web/machines/{id}/ps")).await;
    assert_eq!(status, 200, "{ps}");
    assert!(
        ps.as_array()
            .unwrap()
            .iter()
            .any(|p| p["command"].as_str().unwrap().contains("httpd"))
    );

    // The host's files are not there: not the data dir, not the token.
    let data = h.data_dir.display().to_string();
    let out = exec(
        &h,
        "web",
        &id,
        &format!("cat {data}/token; ls {data}; cat /etc/shadow; echo done"),
    )
    .await;
    assert_eq!(stdout(&out), "done", "{out}");
    assert!(!out["stdout"].as_str().unwrap().contains("hgr_"));

    // On the host, the workload runs as the machines' unprivileged root.
    let pid = host_pids(&format!("{}:8080", machine["private_ip"].as_str().unwrap()))[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert!(uid_line.contains("1000000000"), "{uid_line}");

    // Its root is mounted on the host where runc can reach it, but no host
    // user can: the way there is closed to all but the machines' root group.
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.contains(&id) && l.contains("overlay"))
        .and_then(|l| l.split_whitespace().nth(4).map(str::to_string))
        .expect("the machine's root is mounted");
    let file = format!("{mount}/etc/image");
    assert_eq!(std::fs::read(&file).unwrap(), b"v1");
    // (Inside, every user walks the root and the image's directories.)
    let root_mode = std::fs::metadata(&mount).unwrap().permissions().mode();
    assert_eq!(root_mode & 0o777, 0o755);
    let as_nobody = std::process::Command::new("cat")
        .arg(&file)
        .uid(common::NOBODY)
        .gid(common::NOBODY)
        .output()
        .unwrap();
    assert!(!as_nobody.status.success(), "a host user read {file}");
    assert!(String::from_utf8_lossy(&as_nobody.stderr).contains("Permission denied"));

    // What the machine writes lasts until it stops: each start is a fresh root.
    exec(&h, "web", &id, "echo scribbled > /etc/image").await;
    let out = exec(&h, "web", &id, "cat /etc/image").await;
    assert_eq!(stdout(&out), "scribbled");
    let (status, body) = h
        .post(&format!("/v1/apps/web/machines/{id}/stop"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("web", &id, "stopped").await;
    assert_eq!(
        mounts_mentioning(&id),
        0,
        "a stopped machine holds no mount"
    );
    let (status, body) = h
        .post(&format!("/v1/apps/web/machines/{id}/start"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("web", &id, "started").await;
    let out = exec(&h, "web", &id, "cat /etc/image").await;
    assert_eq!(stdout(&out), "v1");

    // Suspended: frozen whole, then resumed where it was.
    let (status, body) = h
        .post(&format!("/v1/apps/web/machines/{id}/suspend"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("web", &id, "suspended").await;
    let (status, body) = h
        .post(&format!("/v1/apps/web/machines/{id}/start"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("web", &id, "started").await;
    assert_eq!(page(&h, "web").await, "hello from v1\n");

    // Destroyed: no container, mount or cgroup is left.
    let (status, body) = h
        .delete(&format!("/v1/apps/web/machines/{id}?force=true"))
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("web", &id, "destroyed").await;
    assert_eq!(mounts_mentioning(&id), 0);
    assert!(private_files(&id).is_empty(), "{:?}", private_files(&id));
    for controller in ["memory", "pids", "freezer", "cpu"] {
        let path = format!("/sys/fs/cgroup/{controller}/hangar-dev-host-1/{id}");
        assert!(!std::path::Path::new(&path).exists(), "{path} left");
    }
}

#[tokio::test]
async fn a_machine_cannot_raise_its_limits_or_exhaust_the_host() {
    let registry = Registry::start();
    let name = format!("{}/web:v1", registry.addr);
    web_image("v1").push(&registry.addr, "web:v1", None).await;
    let tmp = tempfile::tempdir().unwrap();
    let config = "[flaps.rate_limits]\nenabled = false\n[flyd.sandbox]\npids_max = 64\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.create_app("limits").await;
    let request = machine_request(
        &name,
        serde_json::json!({"guest": {"memory_mb": 64, "cpus": 1}}),
    );
    let machine = h.started_machine("limits", &request).await;
    let id = machine["id"].as_str().unwrap().to_string();

    // The limits are set...
    let cgroup = format!("/sys/fs/cgroup/memory/hangar-dev-host-1/{id}/memory.limit_in_bytes");
    assert_eq!(
        std::fs::read_to_string(&cgroup).unwrap().trim(),
        (64u64 << 20).to_string()
    );
    // ...and cannot be raised from inside.
    let out = exec(
        &h,
        "limits",
        &id,
        &format!("echo 9999999999 > /sys/fs/cgroup/memory/hangar-dev-host-1/{id}/memory.limit_in_bytes; echo 9999999999 > /sys/fs/cgroup/memory/memory.limit_in_bytes; echo done"),
    )
    .await;
    assert_eq!(stdout(&out), "done", "{out}");
    assert_eq!(
        std::fs::read_to_string(&cgroup).unwrap().trim(),
        (64u64 << 20).to_string()
    );

    // A fork bomb meets the pids limit; the host goes on, and the machine
    // once the bomb's processes are gone.
    // (The shell itself gives up once it cannot fork.)
    exec(
        &h,
        "limits",
        &id,
        "i=0; while [ $i -lt 300 ]; do sleep 3 >/dev/null 2>&1 & i=$((i+1)); done 2>/dev/null",
    )
    .await;
    let pids = format!("/sys/fs/cgroup/pids/hangar-dev-host-1/{id}");
    let current: u32 = std::fs::read_to_string(format!("{pids}/pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 64, "{current} processes");
    let refused = std::fs::read_to_string(format!("{pids}/pids.events")).unwrap();
    assert_ne!(
        refused.trim(),
        "max 0",
        "the limit was never met: {refused}"
    );
    let (status, _) = h.get(&format!("/v1/apps/limits/machines/{id}")).await;
    assert_eq!(status, 200);
    common::eventually("the machine serves again", || async {
        let (status, body) = h.via_proxy("limits.localhost", "/").await;
        status == 200 && body == "hello from v1\n"
    })
    .await;

    // Namespaces and mounts are refused by the seccomp profile.
    let out = exec(
        &h,
        "limits",
        &id,
        "unshare -U true; echo $?; mount -t tmpfs none /tmp; echo $?",
    )
    .await;
    let text = stdout(&out);
    assert!(text.lines().all(|code| code != "0"), "{out}");
}

#[tokio::test]
async fn a_machine_that_cannot_start_says_why_and_leaves_no_mount() {
    let registry = Registry::start();
    let mut ghost = web_image("ghost");
    ghost.config["config"]["User"] = serde_json::json!("ghost");
    ghost.push(&registry.addr, "web:ghost", None).await;
    let missing = web_image("missing");
    missing.push(&registry.addr, "web:missing", None).await;
    let h = Hangar::start().await;
    h.create_app("broken").await;
    let data = h.data_dir.display().to_string();

    // A user its image does not have: refused before anything is mounted.
    let request = machine_request(
        &format!("{}/web:ghost", registry.addr),
        serde_json::json!({}),
    );
    let (status, body) = h.post("/v1/apps/broken/machines", &request).await;
    assert_eq!(status, 500, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("user \"ghost\" is not in its /etc/passwd"),
        "{error}"
    );
    assert_eq!(mounts_mentioning(&data), 0);

    // A command that does not exist: the start fails, saying how it ended.
    let request = machine_request(
        &format!("{}/web:missing", registry.addr),
        serde_json::json!({"init": {"exec": ["/no/such/program"]}}),
    );
    let (status, body) = h.post("/v1/apps/broken/machines", &request).await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("exited while starting"),
        "{body}"
    );
    common::eventually("no mount is left", || async {
        mounts_mentioning(&data) == 0
    })
    .await;
    // The machine stays, stopped, its log saying what init could not run.
    let (_, machines) = h.get("/v1/apps/broken/machines").await;
    let missing = machines
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["image_ref"]["tag"] == "missing")
        .expect("the machine is recorded");
    assert_eq!(missing["state"], "stopped", "{missing}");
    let id = missing["id"].as_str().unwrap();
    let log = std::fs::read_to_string(h.data_dir.join("machines").join(id).join("machine.log"))
        .unwrap_or_default();
    assert!(log.contains("/no/such/program"), "{log:?}");
}

#[tokio::test]
async fn without_root_only_the_built_in_image_runs() {
    let registry = Registry::start();
    let name = format!("{}/web:v1", registry.addr);
    web_image("v1").push(&registry.addr, "web:v1", None).await;
    let h = Hangar::start_unprivileged().await;
    h.create_app("plain").await;
    // hangar/echo runs, as a host process of the unprivileged user.
    let machine = h.started_machine("plain", common::ECHO_MACHINE).await;
    assert!(
        page(&h, "plain")
            .await
            .contains(machine["id"].as_str().unwrap())
    );
    // An image is pulled, but does not start: it needs a sandbox.
    let request = machine_request(&name, serde_json::json!({}));
    let (status, body) = h.post("/v1/apps/plain/machines", &request).await;
    assert_eq!(status, 500, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("need a sandbox") && error.contains("need root"),
        "{error}"
    );
}

/// The files Hangar keeps of machine `id` in its instances' private memory
/// file systems (`/run/hangar/<instance>/private`): its bundle, runc's
/// state.
fn private_files(id: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for instance in std::fs::read_dir("/run/hangar")
        .into_iter()
        .flatten()
        .flatten()
    {
        for kind in ["bundles", "runc"] {
            let dir = instance.path().join("private").join(kind).join(id);
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                found.push(entry.path());
            }
        }
    }
    found
}

#[tokio::test]
async fn a_machines_secrets_are_in_memory_only_while_it_runs() {
    let h = Hangar::start().await;
    let machine = h.app_with_machine("vault").await;
    let id = machine["id"].as_str().unwrap();
    let (status, body) = h
        .post(
            "/v1/apps/vault/secrets",
            r#"{"values":{"TOKEN":"s3cr3t-on-no-disk"}}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = h
        .post(&format!("/v1/apps/vault/machines/{id}/restart"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("vault", id, "started").await;
    let out = exec(&h, "vault", id, "echo $TOKEN").await;
    assert_eq!(stdout(&out), "s3cr3t-on-no-disk", "{out}");

    // runc reads it from the bundle, which is in memory alone.
    let secret = b"s3cr3t-on-no-disk";
    let bundle = private_files(id)
        .into_iter()
        .find(|p| p.ends_with("config.json"))
        .expect("the running machine's bundle");
    assert!(
        std::fs::read(&bundle)
            .unwrap()
            .windows(secret.len())
            .any(|w| w == secret)
    );
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&bundle)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fs.stdout).trim(), "tmpfs");
    // (Nothing in the data dir holds it: tests/security/machines.rs.)

    // Stopped, the machine keeps nothing of it, even in memory.
    let (status, body) = h
        .post(&format!("/v1/apps/vault/machines/{id}/stop"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("vault", id, "stopped").await;
    assert_eq!(private_files(id), Vec::<std::path::PathBuf>::new());
}

/// The link holding `address`, if one does.
fn link_with(address: std::net::Ipv4Addr) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!(" {address}/")))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
}

/// How many ports (machines' veths) the bridge has.
fn ports_of(bridge: &str) -> usize {
    std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .map(|ports| ports.count())
        .unwrap_or(0)
}

/// Runs `hangar dev` with `block` as its machines' network, expecting it to
/// exit with an error (within the harness's wait); returns what it said.
fn hangar_that_fails(block: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
        .arg("dev")
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .args(["--flaps-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args([
            "--https-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--flyd-addr", "unix:flyd.sock", "--machine-network", block])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(tmp.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + common::WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("hangar started with a machine network that overlaps another");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!status.success());
    // It leaves nothing mounted (the instance is named by its data dir).
    let data = tmp.path().join("data").canonicalize().unwrap();
    let instance = &common::registry::sha256(data.as_os_str().as_encoded_bytes())[7..23];
    assert_eq!(mounts_mentioning(&format!("/run/hangar/{instance}")), 0);
    std::fs::read_to_string(tmp.path().join("log")).unwrap()
}

/// A TCP service of the test's own on every address of the host, which
/// answers each connection with `answer` and closes it.
fn host_service(answer: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let reply = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{answer}",
                answer.len()
            );
            let _ = std::io::Write::write_all(&mut conn, reply.as_bytes());
        }
    });
    port
}

/// What `url` answers inside the machine (busybox's wget, bounded by
/// `timeout`: its own `-T` crashes), if it answers.
async fn fetch_inside(h: &Hangar, app: &str, id: &str, url: &str) -> Option<String> {
    let out = exec(
        h,
        app,
        id,
        &format!("timeout 3 wget -q -Y off -O- {url} 2>/dev/null && echo ok"),
    )
    .await;
    let text = stdout(&out);
    text.strip_suffix("ok").map(|body| body.trim().to_string())
}

#[tokio::test]
async fn machines_have_networks_of_their_own_and_reach_nothing_of_the_hosts() {
    let registry = Registry::start();
    let name = format!("{}/web:net", registry.addr);
    web_image("net").push(&registry.addr, "web:net", None).await;
    let h = Hangar::start().await;
    let gateway = h.machine_gateway();
    let bridge = link_with(gateway).expect("the machines' bridge holds their gateway");
    let port = host_service("the host");
    // Through the gateway, the host's service answers the host.
    let mut conn = std::net::TcpStream::connect((gateway, port)).unwrap();
    let mut seen = String::new();
    std::io::Read::read_to_string(&mut conn, &mut seen).unwrap();
    assert!(seen.ends_with("the host"), "{seen}");
    // A second Hangar given the same block refuses to start, saying why:
    // two bridges with one block would take each other's traffic.
    let error = hangar_that_fails(&h.machine_network);
    assert!(
        error.contains("overlaps") && error.contains(&h.machine_network),
        "{error}"
    );

    // Two machines, both on 0.0.0.0:8080 as Fly apps listen: each in a
    // network of its own, both answer.
    let mut machines = Vec::new();
    for app in ["alpha", "beta"] {
        h.create_app(app).await;
        let everywhere =
            serde_json::json!({"init": {"cmd": ["exec httpd -f -h /www -p 0.0.0.0:8080"]}});
        let machine = h
            .started_machine(app, &machine_request(&name, everywhere))
            .await;
        assert_eq!(page(&h, app).await, "hello from net\n");
        let ip = machine["private_ip"].as_str().unwrap().to_string();
        assert!(
            h.in_machine_network(&ip),
            "{ip} is not in {}",
            h.machine_network
        );
        machines.push((app, machine["id"].as_str().unwrap().to_string(), ip));
    }
    assert_eq!(ports_of(&bridge), 2);
    let (alpha, beta) = (&machines[0], &machines[1]);

    // Inside alpha: its address on eth0, its route through the gateway.
    let out = exec(&h, "alpha", &alpha.1, "ip -o addr show dev eth0; ip route").await;
    let text = stdout(&out);
    assert!(text.contains(&format!("inet {}/24", alpha.2)), "{out}");
    // No IPv6 at all, not even a link-local address, until the private
    // network gives it one.
    assert!(!text.contains("inet6"), "{out}");
    assert!(
        text.contains(&format!("default via {gateway} dev eth0")),
        "{out}"
    );
    // Its root can neither take beta's address nor listen on it.
    let out = exec(
        &h,
        "alpha",
        &alpha.1,
        &format!(
            "ip addr add {b}/32 dev eth0 2>&1; echo rc=$?; httpd -f -p {b}:9090 2>&1; echo rc=$?",
            b = beta.2
        ),
    )
    .await;
    let text = stdout(&out);
    assert_eq!(text.matches("rc=").count(), 2, "{out}");
    assert!(!text.contains("rc=0"), "{out}");
    // It reaches neither beta, nor the host's service (through its
    // gateway), nor anything on the host's loopback (Hangar's API there).
    let flaps = h.addrs.flaps.port();
    for url in [
        format!("http://{}:8080/", beta.2),
        format!("http://{gateway}:{port}/"),
        format!("http://127.0.0.1:{flaps}/v1/apps"),
    ] {
        let got = fetch_inside(&h, "alpha", &alpha.1, &url).await;
        assert_eq!(got, None, "alpha fetched {url}");
    }
    // (And beta itself answers on its own address, from inside.)
    let own = fetch_inside(&h, "beta", &beta.1, &format!("http://{}:8080/", beta.2)).await;
    assert_eq!(own.as_deref(), Some("hello from net"));

    // A stopped machine has no link left; a destroyed one neither.
    let (status, body) = h
        .post(&format!("/v1/apps/alpha/machines/{}/stop", alpha.1), "")
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("alpha", &alpha.1, "stopped").await;
    common::eventually("alpha's veth is gone", || async { ports_of(&bridge) == 1 }).await;
    for (app, id, _) in &machines {
        let (status, body) = h
            .delete(&format!("/v1/apps/{app}/machines/{id}?force=true"))
            .await;
        assert_eq!(status, 200, "{body}");
        h.wait_state(app, id, "destroyed").await;
    }
    common::eventually("every veth is gone", || async { ports_of(&bridge) == 0 }).await;

    // Hangar gone, its bridge and filter are too.
    let tables = || {
        let out = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&format!("hangar_{}", &bridge[2..])))
            .count()
    };
    assert_eq!(tables(), 2, "an inet and a bridge table");
    drop(h);
    assert_eq!(link_with(gateway), None, "the bridge is left");
    assert_eq!(tables(), 0, "the filter is left");
}

/// A network namespace of the test's own, beyond the host: a veth from the
/// host (`.1` of a block of its own) to it (`.2`), where busybox's httpd
/// answers on port 8080. Removed on drop.
struct Outside {
    netns: String,
    server: std::process::Child,
    _www: tempfile::TempDir,
    /// The host's end.
    host: std::net::Ipv4Addr,
    address: std::net::Ipv4Addr,
}

impl Outside {
    fn start() -> Self {
        common::packages::require(&["iproute2", "busybox-static"]);
        let block = common::machine_network();
        let base: std::net::Ipv4Addr = block.split('/').next().unwrap().parse().unwrap();
        let (host, address) = (
            std::net::Ipv4Addr::from(u32::from(base) + 1),
            std::net::Ipv4Addr::from(u32::from(base) + 2),
        );
        let tag = format!("{:x}", u32::from(base) & 0xffff);
        let netns = format!("hgt-out-{tag}");
        let link = format!("hgto{tag}");
        let ip = |args: &str| {
            let out = std::process::Command::new("ip")
                .args(args.split_whitespace())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip {args}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &netns])
            .output();
        ip(&format!("netns add {netns}"));
        ip(&format!(
            "link add {link} type veth peer name eth0 netns {netns}"
        ));
        ip(&format!("addr add {host}/24 dev {link}"));
        ip(&format!("link set {link} up"));
        ip(&format!("-n {netns} addr add {address}/24 dev eth0"));
        ip(&format!("-n {netns} link set eth0 up"));
        ip(&format!("-n {netns} link set lo up"));
        ip(&format!("-n {netns} route add default via {host}"));
        let www = tempfile::tempdir().unwrap();
        std::fs::write(www.path().join("index.html"), "outside\n").unwrap();
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "busybox", "httpd", "-f", "-p"])
            .arg(format!("{address}:8080"))
            .arg("-h")
            .arg(www.path())
            .spawn()
            .unwrap();
        Self {
            netns,
            server,
            _www: www,
            host,
            address,
        }
    }

    /// Whether `url` answers from inside the outside namespace (no proxy
    /// the test's environment may name).
    fn fetch(&self, url: &str) -> bool {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.netns, "busybox", "timeout", "3"])
            .args(["busybox", "wget", "-q", "-Y", "off", "-O-", url])
            .output()
            .unwrap()
            .status
            .success()
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        // The veth goes with the namespace.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

#[tokio::test]
async fn outbound_traffic_is_a_switch_and_nothing_outside_reaches_a_machine() {
    let registry = Registry::start();
    let name = format!("{}/web:out", registry.addr);
    web_image("out").push(&registry.addr, "web:out", None).await;
    let outside = Outside::start();
    let url = format!("http://{}:8080/", outside.address);
    common::eventually("the outside server answers", || async {
        outside.fetch(&format!("http://{}:8080/", outside.address))
    })
    .await;

    // Outbound on (dev's default): the machine reaches beyond the host.
    let open = Hangar::start().await;
    open.create_app("open").await;
    let machine = open
        .started_machine("open", &machine_request(&name, serde_json::json!({})))
        .await;
    let (id, ip) = (
        machine["id"].as_str().unwrap(),
        machine["private_ip"].as_str().unwrap(),
    );
    let got = fetch_inside(&open, "open", id, &url).await;
    assert_eq!(got.as_deref(), Some("outside"));
    // But nothing outside opens a connection to it, even routed there.
    let route = std::process::Command::new("ip")
        .args([
            "-n",
            &outside.netns,
            "route",
            "add",
            &open.machine_network,
            "via",
        ])
        .arg(outside.host.to_string())
        .output()
        .unwrap();
    assert!(route.status.success(), "{route:?}");
    assert!(
        !outside.fetch(&format!("http://{ip}:8080/")),
        "the outside reached {ip}"
    );

    // Outbound off: it does not.
    let tmp = tempfile::tempdir().unwrap();
    let closed = Hangar::start_with(
        &tmp.path().join("data"),
        Some("[flaps.rate_limits]\nenabled = false\n[flyd.network]\noutbound = false\n"),
    )
    .await;
    closed.create_app("closed").await;
    let machine = closed
        .started_machine("closed", &machine_request(&name, serde_json::json!({})))
        .await;
    let id = machine["id"].as_str().unwrap();
    assert_eq!(fetch_inside(&closed, "closed", id, &url).await, None);
}
