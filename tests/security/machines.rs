//! Machine against host: secrets and state private on disk, crash loops backed off, nothing a workload starts outlives its machine, logs bounded.

use super::*;

/// Item 3: opened secrets were written to the machine's `spec.json` (mode
/// 0644) and stayed there after the secret was unset; the data dir and its
/// files were readable by every user of the host.
#[tokio::test]
async fn secrets_and_state_stay_private_on_disk() {
    let h = Hangar::start().await;
    h.create_app("sealed").await;
    let value = "s3cr3t-value-that-must-not-be-on-disk";
    let (status, body) = h
        .post(
            "/v1/apps/sealed/secrets",
            &format!(r#"{{"values":{{"DB_PASSWORD":"{value}"}}}}"#),
        )
        .await;
    assert!(status < 300, "{body}");
    let machine = h.started_machine("sealed", ECHO_MACHINE).await;
    let id = machine["id"].as_str().unwrap();
    // The workload has it...
    let (status, out) = h
        .post(
            &format!("/v1/apps/sealed/machines/{id}/exec"),
            r#"{"command":["sh","-c","echo $DB_PASSWORD"]}"#,
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert!(out["stdout"].as_str().unwrap().contains(value), "{out}");
    // ...and no file of Hangar's holds it in clear, or is open to others.
    let mut files = 0;
    let mut stack = vec![h.data_dir.clone()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        // Image roots and machines' upper layers (the machine's own `/`,
        // 0755) carry their own files' modes, behind closed directories.
        let own_files = path == h.data_dir.join("images/rootfs")
            || path.ends_with("upper")
            || path.ends_with("work");
        if !meta.file_type().is_socket() && !path.ends_with("upper") {
            assert_eq!(
                meta.permissions().mode() & 0o077,
                0,
                "{} is open to others",
                path.display()
            );
        }
        // (The sandbox's runtime config, which holds the environment, is
        // in memory: tests/sandbox.rs.)
        if meta.is_dir() && !own_files {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if meta.is_file() {
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{} holds the secret in clear",
                path.display()
            );
        }
    }
    assert!(files > 5, "walked {files} files");
}

/// The events of a machine, oldest first: (kind, status, timestamp ms).
async fn events(h: &Hangar, app: &str, id: &str) -> Vec<(String, String, i64)> {
    let (status, list) = h
        .get(&format!("/v1/apps/{app}/machines/{id}/events?limit=50"))
        .await;
    assert_eq!(status, 200, "{list}");
    let mut out: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["status"].as_str().unwrap_or_default().to_string(),
                e["timestamp"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    out.reverse();
    out
}

/// Item 10: a workload that crashed at once under `restart.policy =
/// "always"` was started again at once, forever: a crash loop took a core.
/// Now each restart in a row waits twice as long as the one before (from
/// `restart_backoff_ms`, capped).
#[tokio::test]
async fn a_crash_loop_backs_off() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[flaps.rate_limits]\nenabled = false\n[flyd]\nhost_commands = true\nrestart_backoff_ms = 100\nrestart_backoff_max_ms = 400\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.create_app("crashy").await;
    let (status, machine) = h
        .post(
            "/v1/apps/crashy/machines",
            r#"{"config":{"image":"hangar/host","init":{"exec":["sh","-c","exit 3"]},"restart":{"policy":"always"}}}"#,
        )
        .await;
    assert_eq!(status, 200, "{machine}");
    let id = machine["id"].as_str().unwrap().to_string();
    let exits = |evs: &[(String, String, i64)]| evs.iter().filter(|e| e.0 == "exit").count();
    let evs = common::until("six exits", || async {
        let evs = events(&h, "crashy", &id).await;
        if exits(&evs) >= 6 {
            Ok(evs)
        } else {
            Err(format!("{evs:?}"))
        }
    })
    .await;
    // The pause after the k-th exit of the run (k from 0): none, then 100,
    // 200, 400 ms, and 400 from then on.
    let pause = |k: u32| {
        if k == 0 {
            0
        } else {
            (100i64 << (k - 1)).min(400)
        }
    };
    let mut k = 0;
    for (i, (kind, _, at)) in evs.iter().enumerate() {
        if kind != "exit" {
            continue;
        }
        if let Some((_, _, next)) = evs[i + 1..].iter().find(|e| e.0 == "start") {
            assert!(
                next - at >= pause(k),
                "restart {k} came {} ms after its exit: {evs:?}",
                next - at
            );
        }
        k += 1;
    }
    let (status, body) = h
        .delete(&format!("/v1/apps/crashy/machines/{id}?force=true"))
        .await;
    assert!(status == 200 || status == 412, "{body}");
}

/// Item 10: a process the workload detached (`setsid`) kept running after
/// its machine stopped, and so did what an `exec` left behind when its
/// timeout killed it.
#[tokio::test]
async fn nothing_a_workload_starts_outlives_its_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let h = Hangar::start_with(&tmp.path().join("data"), Some(common::HOST_COMMANDS)).await;
    h.create_app("leaky").await;
    // Sleeps no other run of this test has (a failed run may leave its own).
    let n = 40_000 + std::process::id() % 20_000;
    let (detached, workload, execd) = (n.to_string(), (n + 1).to_string(), (n + 2).to_string());
    let init = serde_json::json!({"config": {"image": "hangar/host", "init": {"exec":
        ["sh", "-c", format!("setsid sleep {detached} & exec sleep {workload}")]}}});
    let machine = h.started_machine("leaky", &init.to_string()).await;
    let id = machine["id"].as_str().unwrap();
    common::eventually("the detached process runs", || async {
        !common::processes_mentioning(&detached).is_empty()
    })
    .await;
    let (status, answer) = h
        .post(
            &format!("/v1/apps/leaky/machines/{id}/exec"),
            &serde_json::json!({"command": ["sh", "-c", format!("sleep {execd}; echo never")], "timeout": 1})
                .to_string(),
        )
        .await;
    assert_eq!(status, 408, "{answer}");
    common::assert_no_process_mentions(&execd).await;

    let (status, body) = h
        .post(&format!("/v1/apps/leaky/machines/{id}/stop"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("leaky", id, "stopped").await;
    common::assert_no_process_mentions(&detached).await;
    common::assert_no_process_mentions(&workload).await;
}

/// Item 10: `machine.log` grew without bound. Now it is rotated by size,
/// keeping a few files.
#[tokio::test]
async fn machine_logs_are_rotated_by_size() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[flaps.rate_limits]\nenabled = false\n[flyd]\nhost_commands = true\nlog_max_bytes = 4096\nlog_files = 2\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.create_app("chatty").await;
    let script = "i=0; while [ $i -lt 3000 ]; do echo line-$i-padding-padding-padding; i=$((i+1)); done; echo done-talking; exec sleep 1000";
    let request = serde_json::json!({"config": {"image": "hangar/host", "init": {"exec": ["sh", "-c", script]}}});
    let machine = h.started_machine("chatty", &request.to_string()).await;
    let dir = h
        .data_dir
        .join("machines")
        .join(machine["id"].as_str().unwrap());
    let log = dir.join("machine.log");
    common::eventually("the last line in the log", || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("done-talking"))
    })
    .await;
    for name in ["machine.log", "machine.log.1", "machine.log.2"] {
        let size = std::fs::metadata(dir.join(name)).unwrap().len();
        assert!(size <= 4096, "{name}: {size} bytes");
    }
    assert!(!dir.join("machine.log.3").exists());
}
