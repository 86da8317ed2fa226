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
    assert!(!h.data_dir.join("runc").join(&id).exists());
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
