//! Lifecycle operations beyond create/stop/start/destroy, against the real
//! binary: suspend, restart, update, cordon, leases, metadata, signal,
//! exec, ps, the restart policy and auto_destroy; and each call against a
//! machine in the wrong state, with a bad lease nonce, a stale version or a
//! malformed body.

mod common;

use common::{Hangar, processes_mentioning};
use reqwest::Method;
use serde_json::{Value, json};

/// `(status, body)` of a call carrying a lease nonce.
async fn with_nonce(
    h: &Hangar,
    method: Method,
    path: &str,
    nonce: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = h
        .http
        .request(method, h.api(path))
        .bearer_auth(&h.token)
        .header("fly-machine-lease-nonce", nonce);
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Whether every process of the machine is stopped by a signal (state T).
fn all_frozen(id: &str) -> bool {
    let pids = processes_mentioning(id);
    let workload: Vec<_> = pids
        .iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .map(|e| String::from_utf8_lossy(&e).contains(&format!("FLY_MACHINE_ID={id}")))
                .unwrap_or(false)
        })
        .collect();
    // Stopped by a signal (a host process), or in a frozen cgroup (a sandbox).
    let frozen = |pid: &u32| {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        cgroups
            .lines()
            .find_map(|l| l.split_once(":freezer:").map(|(_, path)| path.to_string()))
            .and_then(|path| {
                std::fs::read_to_string(format!("/sys/fs/cgroup/freezer{path}/freezer.state")).ok()
            })
            .is_some_and(|state| state.trim() == "FROZEN")
    };
    !workload.is_empty()
        && workload.iter().all(|pid| {
            frozen(pid)
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.rsplit_once(')').unwrap().1.trim_start().starts_with('T'))
                    .unwrap_or(false)
        })
}

#[tokio::test]
async fn suspend_restart_cordon_and_wrong_states() {
    let h = Hangar::start().await;
    // Autostart off: this test makes every transition itself.
    let machine = h
        .app_with_machine_config("life", common::ECHO_MACHINE_MANUAL)
        .await;
    let id = machine["id"].as_str().unwrap();
    let m = |suffix: &str| format!("/v1/apps/life/machines/{id}{suffix}");

    // Suspend freezes the workload; the proxy stops routing to it.
    let (status, body) = h.post(&m("/suspend"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.get(&m("")).await.1["state"], "suspended");
    assert!(all_frozen(id), "workload not frozen");
    assert_eq!(h.via_proxy("life.localhost", "/").await.0, 503);
    let (status, body) = h.post(&m("/suspend"), "").await;
    assert_eq!(status, 412, "{body}");
    let (status, body) = h.post(&m("/start"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["previous_state"], "suspended");
    assert!(!all_frozen(id));
    assert_eq!(h.via_proxy("life.localhost", "/").await.0, 200);

    // Restart: a new process, same version.
    let pids_before = processes_mentioning(id);
    let (status, body) = h.post(&m("/restart?signal=SIGTERM&timeout=5s"), "").await;
    assert_eq!(status, 200, "{body}");
    let after = h.get(&m("")).await.1;
    assert_eq!(after["state"], "started");
    assert_eq!(after["version"], machine["version"]);
    assert_ne!(processes_mentioning(id), pids_before);
    assert_eq!(h.via_proxy("life.localhost", "/").await.0, 200);
    // Regression: the old run's pilot, exiting after the new one bound the
    // control socket, used to delete the new socket. Once only the new
    // pilot and its workload remain, the socket must still answer.
    common::eventually("the old pilot exits", || async {
        let pilots = processes_mentioning(id).into_iter().filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("pilot"))
        });
        pilots.count() == 1
    })
    .await;
    let (status, body) = h.get(&m("/ps")).await;
    assert_eq!(status, 200, "{body}");

    // Cordon keeps it running but out of the proxy's choice.
    assert_eq!(h.post(&m("/cordon"), "").await.0, 200);
    assert_eq!(h.get(&m("")).await.1["cordoned"], true);
    assert_eq!(h.via_proxy("life.localhost", "/").await.0, 503);
    assert_eq!(h.post(&m("/uncordon"), "").await.0, 200);
    assert_eq!(h.via_proxy("life.localhost", "/").await.0, 200);

    // Events, newest first, include what happened.
    let (status, events) = h.get(&m("/events?limit=50")).await;
    assert_eq!(status, 200);
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for kind in ["launch", "start", "suspend", "stop"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    assert_eq!(kinds.last(), Some(&"launch"));

    // Wrong states, bad bodies, and what Hangar cannot do.
    assert_eq!(h.post(&m("/start"), "").await.0, 412);
    assert_eq!(
        h.post(&m("/stop"), "{\"signal\":\"SIGBOGUS\"}").await.0,
        400
    );
    assert_eq!(h.post(&m("/stop"), "{not json").await.0, 400);
    let (status, body) = h.get(&m("/memory")).await;
    assert_eq!(status, 501, "{body}");
    let (status, _) = h.post(&m("/stop"), "").await;
    assert_eq!(status, 200);
    let (status, _) = h.get(&m("/wait?state=stopped&timeout=10")).await;
    assert_eq!(status, 200);
    for op in ["/suspend", "/restart", "/stop"] {
        let (status, body) = h.post(&m(op), "").await;
        assert_eq!(status, 412, "{op}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("stopped"),
            "{op}: {body}"
        );
    }
    let (status, body) = h.post(&m("/signal"), r#"{"signal":"SIGUSR1"}"#).await;
    assert_eq!(status, 412, "{body}");
    let (status, body) = h.get(&m("/wait?state=started&timeout=1")).await;
    assert_eq!(status, 408, "{body}");
}

#[tokio::test]
async fn update_versions_and_current_version_guard() {
    let h = Hangar::start().await;
    let machine = h.app_with_machine("upd").await;
    let id = machine["id"].as_str().unwrap();
    let m = |suffix: &str| format!("/v1/apps/upd/machines/{id}{suffix}");
    let v1 = machine["version"].as_str().unwrap();

    let mut config = machine["config"].clone();
    config["env"] = json!({"GREETING": "hello"});
    config["metadata"] = json!({"role": "web"});
    let stale = json!({"config": config, "current_version": "01STALE"}).to_string();
    let (status, body) = h.post(&m(""), &stale).await;
    assert_eq!(status, 409, "{body}");
    let update = json!({"config": config, "current_version": v1}).to_string();
    let (status, body) = h.post(&m(""), &update).await;
    assert_eq!(status, 200, "{body}");
    let v2 = body["version"].as_str().unwrap().to_string();
    assert_ne!(v2, v1);
    assert_eq!(body["state"], "started");
    assert_eq!(body["config"]["env"]["GREETING"], "hello");

    // The new process has the new environment.
    let (status, exec) = h
        .post(&m("/exec"), r#"{"command":["sh","-c","echo $GREETING"]}"#)
        .await;
    assert_eq!(status, 200, "{exec}");
    assert_eq!(exec["stdout"], "hello\n");
    let (status, versions) = h.get(&m("/versions")).await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = versions
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [v2.as_str(), v1]);
    // The old version's wait no longer matches; the new one does.
    assert_eq!(
        h.get(&m(&format!("/wait?state=started&version={v1}&timeout=1")))
            .await
            .0,
        408
    );
    assert_eq!(
        h.get(&m(&format!("/wait?state=started&version={v2}&timeout=1")))
            .await
            .0,
        200
    );

    let (status, body) = h.post(&m(""), r#"{"config":{"image":""}}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "config.image: required");
}

#[tokio::test]
async fn leases_metadata_signal_exec_and_ps() {
    let h = Hangar::start().await;
    let machine = h.app_with_machine("lease").await;
    let id = machine["id"].as_str().unwrap();
    let m = |suffix: &str| format!("/v1/apps/lease/machines/{id}{suffix}");

    // Lease: others get 409 naming the holder; the holder goes ahead.
    assert_eq!(h.get(&m("/lease")).await.0, 404);
    let (status, lease) = h
        .post(&m("/lease"), r#"{"ttl":60,"description":"deploy"}"#)
        .await;
    assert_eq!(status, 201, "{lease}");
    assert_eq!(lease["status"], "success");
    let nonce = lease["data"]["nonce"].as_str().unwrap().to_string();
    let (status, body) = h.post(&m("/stop"), "").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("leased by"),
        "{body}"
    );
    let (status, body) = with_nonce(&h, Method::POST, &m("/stop"), "wrong", None).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(h.post(&m("/metadata/k"), r#"{"value":"v"}"#).await.0, 409);
    let (status, body) = with_nonce(
        &h,
        Method::POST,
        &m("/lease"),
        &nonce,
        Some(r#"{"ttl":120}"#),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        body["data"]["nonce"],
        nonce.as_str(),
        "refresh keeps the nonce"
    );
    let (status, body) = with_nonce(&h, Method::POST, &m("/stop"), &nonce, None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = with_nonce(&h, Method::POST, &m("/start"), &nonce, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        with_nonce(&h, Method::DELETE, &m("/lease"), &nonce, None)
            .await
            .0,
        200
    );
    assert_eq!(h.get(&m("/lease")).await.0, 404);

    // Metadata.
    assert_eq!(
        h.post(&m("/metadata/role"), r#"{"value":"web"}"#).await.0,
        204
    );
    let (status, body) = h.get(&m("/metadata/role")).await;
    assert_eq!((status, body["value"].as_str()), (200, Some("web")));
    let patch = r#"{"metadata":{"tier":"1"}}"#;
    let resp = h
        .http
        .patch(h.api(&m("/metadata")))
        .bearer_auth(&h.token)
        .body(patch)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        h.get(&m("/metadata")).await.1,
        json!({"role": "web", "tier": "1"})
    );
    assert_eq!(h.delete(&m("/metadata/role")).await.0, 204);
    assert_eq!(h.delete(&m("/metadata/role")).await.0, 404);
    assert_eq!(h.get(&m("/metadata/role")).await.0, 404);
    assert_eq!(
        h.post(&m("/metadata/bad%20key"), r#"{"value":"v"}"#)
            .await
            .0,
        400
    );

    // exec and ps.
    let (status, exec) = h
        .post(
            &m("/exec"),
            r#"{"command":["sh","-c","echo out; echo err >&2; exit 3"]}"#,
        )
        .await;
    assert_eq!(status, 200, "{exec}");
    assert_eq!(
        (
            exec["exit_code"].as_i64(),
            exec["stdout"].as_str(),
            exec["stderr"].as_str()
        ),
        (Some(3), Some("out\n"), Some("err\n"))
    );
    let (status, body) = h
        .post(&m("/exec"), r#"{"command":["sleep","5"],"timeout":1}"#)
        .await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(h.post(&m("/exec"), r#"{"command":[]}"#).await.0, 400);
    let (status, ps) = h.get(&m("/ps")).await;
    assert_eq!(status, 200, "{ps}");
    let ps = ps.as_array().unwrap();
    assert!(
        ps.iter()
            .any(|p| p["command"].as_str().unwrap().ends_with("hangar echo")),
        "{ps:?}"
    );
    assert!(ps.iter().all(|p| p["rss"].as_u64().unwrap() > 0), "{ps:?}");

    // A signal the workload does not handle kills it; the default
    // restart policy (on-failure) brings it back.
    let before = h.get(&m("")).await.1["events"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, body) = h.post(&m("/signal"), r#"{"signal":"SIGUSR1"}"#).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = h
        .get(&m(&format!(
            "/wait?state=started&from_event_id={before}&timeout=10"
        )))
        .await;
    assert_eq!(status, 200, "{body}\n{}", h.log());
    let events = h.get(&m("/events")).await.1;
    assert_eq!(events[1]["type"], "exit", "{events}");
    assert_eq!(events[1]["request"]["exit_event"]["signal"], 10, "{events}");
    assert_eq!(h.via_proxy("lease.localhost", "/").await.0, 200);
}

#[tokio::test]
async fn restart_policy_and_auto_destroy_for_host_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hangar::start_with(&tmp.path().join("data"), Some(common::HOST_COMMANDS)).await;
    assert_eq!(h.post("/v1/apps", r#"{"app_name":"jobs"}"#).await.0, 201);

    // Fails every time: restarted twice, then left stopped.
    let failing = r#"{"config":{"image":"hangar/host","init":{"exec":["sh","-c","exit 1"]},
        "restart":{"policy":"on-failure","max_retries":2}}}"#;
    let (status, machine) = h.post("/v1/apps/jobs/machines", failing).await;
    assert_eq!(status, 200, "{machine}");
    let id = machine["id"].as_str().unwrap();
    let exits = common::until("three exits, then stopped", || async {
        let m = h.get(&format!("/v1/apps/jobs/machines/{id}")).await.1;
        let exits = m["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "exit")
            .count();
        if m["state"] == "stopped" && exits >= 3 {
            Ok(exits)
        } else {
            Err(m.to_string())
        }
    })
    .await;
    assert_eq!(exits, 3, "one run and two restarts");

    // Succeeds once with auto_destroy: gone afterwards.
    let job = r#"{"config":{"image":"hangar/host","init":{"exec":["true"]},"auto_destroy":true,
        "restart":{"policy":"no"}}}"#;
    let (status, machine) = h.post("/v1/apps/jobs/machines", job).await;
    assert_eq!(status, 200, "{machine}");
    let id = machine["id"].as_str().unwrap();
    let (status, body) = h
        .get(&format!(
            "/v1/apps/jobs/machines/{id}/wait?state=destroyed&timeout=20"
        ))
        .await;
    assert_eq!(status, 200, "{body}\n{}", h.log());
}

/// Polls the machine until `pred` holds (bounded), returning it.
async fn machine_until(h: &Hangar, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    common::until("the machine's condition", || async {
        let (status, m) = h.get(path).await;
        assert_eq!(status, 200, "{m}");
        if pred(&m) { Ok(m) } else { Err(m.to_string()) }
    })
    .await
}

#[tokio::test]
async fn service_checks_are_reported_and_gate_routing() {
    let h = Hangar::start().await;
    for app in ["healthy", "sick"] {
        let (status, _) = h
            .post("/v1/apps", &format!(r#"{{"app_name":"{app}"}}"#))
            .await;
        assert_eq!(status, 201);
    }
    let with_check = |check: &str| {
        format!(
            r#"{{"config":{{"image":"hangar/echo","services":[{{"internal_port":8080,
            "ports":[{{"port":80,"handlers":["http"]}}],"checks":[{check}]}}]}}}}"#
        )
    };
    let good = with_check(r#"{"type":"http","path":"/healthz","interval":"100ms","timeout":"1s"}"#);
    let (status, m) = h.post("/v1/apps/healthy/machines", &good).await;
    assert_eq!(status, 200, "{m}");
    let path = format!("/v1/apps/healthy/machines/{}", m["id"].as_str().unwrap());
    let m = machine_until(&h, &path, |m| m["checks"][0]["status"] == "passing").await;
    assert_eq!(m["checks"][0]["name"], "servicecheck-00-http-8080");
    assert_eq!(m["checks"][0]["output"], "HTTP 200 OK");
    common::eventually("the healthy machine routed", || async {
        h.via_proxy("healthy.localhost", "/").await.0 == 200
    })
    .await;

    // Nothing listens on port 9: the check fails and the proxy stays away.
    let bad = with_check(r#"{"type":"tcp","port":9,"interval":"100ms","timeout":"200ms"}"#);
    let (status, m) = h.post("/v1/apps/sick/machines", &bad).await;
    assert_eq!(status, 200, "{m}");
    let path = format!("/v1/apps/sick/machines/{}", m["id"].as_str().unwrap());
    let m = machine_until(&h, &path, |m| m["checks"][0]["status"] == "critical").await;
    assert_eq!(m["state"], "started");
    let (status, body) = h.via_proxy("sick.localhost", "/").await;
    assert_eq!(status, 503, "{body}");

    let (status, body) = h
        .post("/v1/apps/sick/machines", &with_check(r#"{"type":"grpc"}"#))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("config.services[0].checks[0].type"),
        "{body}"
    );
}

#[tokio::test]
async fn capacity_is_reserved_on_create_and_released_on_destroy() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[flyd]\ncpus = 2\nmemory_mb = 1024\ncpu_overcommit = 1\n\
                  [flaps.rate_limits]\nenabled = false\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    assert_eq!(h.post("/v1/apps", r#"{"app_name":"big"}"#).await.0, 201);
    let sized = |cpus: u32, mem: u32| {
        format!(
            r#"{{"config":{{"image":"hangar/echo","guest":{{"cpus":{cpus},"memory_mb":{mem}}}}}}}"#
        )
    };
    let (status, first) = h.post("/v1/apps/big/machines", &sized(1, 768)).await;
    assert_eq!(status, 200, "{first}");
    let (status, body) = h.post("/v1/apps/big/machines", &sized(1, 512)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "insufficient_capacity", "{body}");
    let (status, body) = h.post("/v1/apps/big/machines", &sized(2, 128)).await;
    assert_eq!(status, 503, "{body}");
    // What fits still goes.
    let (status, second) = h.post("/v1/apps/big/machines", &sized(1, 256)).await;
    assert_eq!(status, 200, "{second}");
    // Destroying frees the room.
    let id = first["id"].as_str().unwrap();
    assert_eq!(
        h.delete(&format!("/v1/apps/big/machines/{id}?force=true"))
            .await
            .0,
        200
    );
    let (status, body) = h.post("/v1/apps/big/machines", &sized(1, 512)).await;
    assert_eq!(status, 200, "{body}");
}
