//! Crash recovery against the real binary: for every FSM and every step,
//! flyd kills its own process (SIGKILL) just before or just after that step
//! (`flyd.crash_at`), `hangar dev` is started again on the same data dir,
//! and the machine must end where the operation was going: the model is
//! "an acknowledged or recorded operation completes". Its process exists
//! if and only if it ends `started`, and no run is left unfinished.

mod common;

use common::{ECHO_MACHINE, Hangar, assert_no_process_mentions, processes_mentioning};
use reqwest::Method;
use std::os::unix::process::ExitStatusExt;

/// The state an operation leads to.
fn model(kind: &str) -> &'static str {
    match kind {
        "create" | "start" | "restart" | "update" | "cordon" => "started",
        "stop" => "stopped",
        "suspend" => "suspended",
        "destroy" => "destroyed",
        other => panic!("no model for {other}"),
    }
}

/// Runs `kind`, crashing at `kind/step/when`, recovers, and checks the model.
async fn crash_and_recover(kind: &str, step: &str, when: &str) {
    let point = format!("{kind}/{step}/{when}");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let config = format!("[flyd]\ncrash_at = \"{point}\"\n[flaps.rate_limits]\nenabled = false\n");
    let mut h = Hangar::start_with(&dir, Some(&config)).await;
    let (status, _) = h.post("/v1/apps", r#"{"app_name":"crash"}"#).await;
    assert_eq!(status, 201);

    // Bring the machine to where `kind` starts, then run `kind`, which crashes.
    let machines = "/v1/apps/crash/machines";
    let id = if kind == "create" {
        None
    } else {
        Some(h.app_machine_started("crash").await)
    };
    let op = match (kind, &id) {
        ("create", _) => h.try_call(Method::POST, machines, Some(ECHO_MACHINE)).await,
        ("start", Some(id)) => {
            let (status, body) = h.post(&format!("{machines}/{id}/stop"), "").await;
            assert_eq!(status, 200, "{body}");
            h.try_call(Method::POST, &format!("{machines}/{id}/start"), None)
                .await
        }
        ("stop" | "suspend" | "restart" | "cordon", Some(id)) => {
            h.try_call(Method::POST, &format!("{machines}/{id}/{kind}"), None)
                .await
        }
        ("update", Some(id)) => {
            let update = r#"{"config":{"image":"hangar/echo","env":{"V":"2"},"services":[{"internal_port":8080,
                "ports":[{"port":80,"handlers":["http"]}]}]}}"#;
            h.try_call(Method::POST, &format!("{machines}/{id}"), Some(update))
                .await
        }
        ("destroy", Some(id)) => {
            h.try_call(Method::DELETE, &format!("{machines}/{id}?force=true"), None)
                .await
        }
        _ => unreachable!(),
    };
    assert!(
        op.is_err(),
        "{point}: the call should have died with the server: {op:?}"
    );
    let exit = h.wait_exit();
    assert_eq!(
        exit.signal(),
        Some(9),
        "{point}: hangar should have killed itself:\n{}",
        h.log()
    );
    drop(h);

    // Recover.
    let h = Hangar::start_in(&dir).await;
    let id = match id {
        Some(id) => id,
        None => {
            let (status, list) = h.get(machines).await;
            assert_eq!(status, 200, "{list}");
            let list = list.as_array().unwrap();
            assert_eq!(
                list.len(),
                1,
                "{point}: exactly the machine being created: {list:?}"
            );
            list[0]["id"].as_str().unwrap().to_string()
        }
    };
    let want = model(kind);
    // The resumed run holds the machine's lock from before flyd serves; a
    // metadata write queues behind it, so once it answers the run is done
    // (a `wait` could see the old state before the run moves on).
    let (status, body) = h
        .post(
            &format!("{machines}/{id}/metadata/settled"),
            r#"{"value":"yes"}"#,
        )
        .await;
    assert_eq!(status, 204, "{point}: {body}\n{}", h.log());
    let (status, machine) = h.get(&format!("{machines}/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(machine["state"], want, "{point}: {machine}");
    match kind {
        "update" => assert_eq!(machine["config"]["env"]["V"], "2", "{point}: {machine}"),
        "cordon" => assert_eq!(machine["cordoned"], true, "{point}: {machine}"),
        _ => {}
    }
    if want == "started" {
        assert!(!processes_mentioning(&id).is_empty(), "{point}: no process");
        if kind != "cordon" {
            let (status, body) = h.via_proxy("crash.localhost", "/").await;
            assert_eq!(status, 200, "{point}: {body}");
            assert!(body.contains(&id), "{point}: {body}");
        }
    } else if want == "suspended" {
        assert!(!processes_mentioning(&id).is_empty(), "{point}: no process");
    } else {
        assert_no_process_mentions(&id).await;
    }
    drop(h); // SIGTERM: stops what runs, then exits.

    use hangar_flyd::store::FsmStore;
    let store = hangar_flyd::store::Store::open(&dir.join("flyd.redb")).unwrap();
    let unfinished = store.unfinished_runs().unwrap();
    assert!(
        unfinished.is_empty(),
        "{point}: runs left unfinished: {unfinished:?}"
    );
    assert_no_process_mentions(&id).await;
}

async fn every_step(kind: &str, steps: &[&str]) {
    for step in steps {
        for when in ["before", "after"] {
            crash_and_recover(kind, step, when).await;
        }
    }
}

#[tokio::test]
async fn crash_during_create() {
    every_step("create", &["record", "spawn", "ready", "started"]).await;
}

#[tokio::test]
async fn crash_during_start() {
    every_step("start", &["spawn", "ready", "started"]).await;
}

#[tokio::test]
async fn crash_during_stop() {
    every_step("stop", &["signal", "exited"]).await;
}

#[tokio::test]
async fn crash_during_suspend_and_cordon() {
    every_step("suspend", &["freeze"]).await;
    every_step("cordon", &["cordon"]).await;
}

#[tokio::test]
async fn crash_during_restart() {
    every_step(
        "restart",
        &["signal", "exited", "spawn", "ready", "started"],
    )
    .await;
}

#[tokio::test]
async fn crash_during_update() {
    every_step(
        "update",
        &[
            "reconfigure",
            "signal",
            "exited",
            "spawn",
            "ready",
            "started",
        ],
    )
    .await;
}

#[tokio::test]
async fn crash_during_destroy() {
    every_step("destroy", &["teardown", "destroyed"]).await;
}

#[tokio::test]
async fn kill_9_with_creates_in_flight_loses_no_acknowledged_machine() {
    const CREATES: usize = 20;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut h = Hangar::start_in(&dir).await;
    let (status, _) = h.post("/v1/apps", r#"{"app_name":"busy"}"#).await;
    assert_eq!(status, 201);

    let mut inflight = tokio::task::JoinSet::new();
    for _ in 0..CREATES {
        let req = h
            .http
            .post(h.api("/v1/apps/busy/machines"))
            .bearer_auth(&h.token)
            .body(ECHO_MACHINE);
        inflight.spawn(async move {
            let resp = req.send().await.ok()?;
            (resp.status() == 200).then_some(())?;
            let machine: serde_json::Value = resp.json().await.ok()?;
            Some(machine["id"].as_str()?.to_string())
        });
    }
    // Kill once a few creates are acknowledged and the rest are in flight.
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 3 {
        match inflight.join_next().await {
            Some(result) => acknowledged.extend(result.unwrap()),
            None => break,
        }
    }
    h.stop_with(nix::sys::signal::Signal::SIGKILL);
    while let Some(result) = inflight.join_next().await {
        acknowledged.extend(result.unwrap());
    }
    drop(h);
    assert!(acknowledged.len() >= 3, "{acknowledged:?}");

    let h = Hangar::start_in(&dir).await;
    let (status, list) = h.get("/v1/apps/busy/machines").await;
    assert_eq!(status, 200, "{list}");
    let list = list.as_array().unwrap().clone();
    let listed: Vec<&str> = list.iter().map(|m| m["id"].as_str().unwrap()).collect();
    for id in &acknowledged {
        assert!(
            listed.contains(&id.as_str()),
            "acknowledged {id} lost: {listed:?}"
        );
    }
    eprintln!(
        "acknowledged {} of {CREATES}; {} recorded",
        acknowledged.len(),
        listed.len()
    );
    // Every machine that was recorded finishes its create and serves.
    for m in &list {
        let id = m["id"].as_str().unwrap();
        let (status, body) = h
            .get(&format!(
                "/v1/apps/busy/machines/{id}/wait?state=started&timeout=20"
            ))
            .await;
        assert_eq!(status, 200, "{id}: {body}\n{}", h.log());
        let ip = m["private_ip"].as_str().unwrap();
        let echo: serde_json::Value = h
            .http
            .get(format!("http://{ip}:8080/"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(echo["machine_id"], id);
    }
    // No pilot runs for a machine the API does not list.
    let machines_dir = dir.join("machines");
    for entry in std::fs::read_dir(&machines_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(listed.contains(&name.as_str()), "orphan machine dir {name}");
    }
    drop(h);
    assert_no_process_mentions(&machines_dir.display().to_string()).await;
    for id in &listed {
        assert_no_process_mentions(id).await;
    }
}
