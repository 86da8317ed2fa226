//! The client commands, run as the real binary against a dev instance.

mod common;

use common::Hangar;
use serde_json::Value;
use std::process::{Command, Output};

/// Runs `hangar <command> --data-dir <the instance's> <args...>`: the flag
/// goes before the arguments, as anything after `--` is the exec'd command.
fn hangar(h: &Hangar, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hangar"))
        .arg(args[0])
        .arg("--data-dir")
        .arg(&h.data_dir)
        .args(&args[1..])
        .env_remove("HANGAR_API_URL")
        .env_remove("HANGAR_API_TOKEN")
        .output()
        .expect("run hangar")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[tokio::test]
async fn cli_manages_apps_and_machines() {
    let h = Hangar::start().await;
    assert!(ok(&hangar(&h, &["apps", "create", "cliapp"])).contains("created app cliapp"));
    let apps: Value = serde_json::from_str(&ok(&hangar(&h, &["apps", "list", "--json"]))).unwrap();
    assert_eq!(apps["apps"][0]["name"], "cliapp");

    let run = ok(&hangar(
        &h,
        &[
            "machines",
            "run",
            "--app",
            "cliapp",
            "--env",
            "GREETING=hi",
            "--json",
        ],
    ));
    let machine: Value = serde_json::from_str(&run).unwrap();
    assert_eq!(machine["state"], "started");
    let id = machine["id"].as_str().unwrap();
    let table = ok(&hangar(&h, &["machines", "list", "--app", "cliapp"]));
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(id) && table.contains("started"), "{table}");
    let (status, body) = h.via_proxy("cliapp.localhost", "/").await;
    assert_eq!(status, 200, "{body}");

    // exec passes the command's output and exit code through.
    let out = hangar(
        &h,
        &[
            "machines",
            "exec",
            id,
            "--app",
            "cliapp",
            "--",
            "sh",
            "-c",
            "echo $GREETING; exit 4",
        ],
    );
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    ok(&hangar(&h, &["machines", "stop", id, "--app", "cliapp"]));
    ok(&hangar(
        &h,
        &[
            "machines",
            "wait",
            id,
            "--app",
            "cliapp",
            "--state",
            "stopped",
            "--timeout",
            "10",
        ],
    ));
    assert!(ok(&hangar(&h, &["machines", "status", id, "--app", "cliapp"])).contains("stopped"));
    assert!(ok(&hangar(&h, &["machines", "logs", id])).contains("echo: listening"));

    let status: Value = serde_json::from_str(&ok(&hangar(&h, &["status", "--json"]))).unwrap();
    assert_eq!(status["org"], "personal");
    assert_eq!(status["machines"]["stopped"], 1);

    // Failures: a clear message and exit code 1.
    let out = hangar(
        &h,
        &["machines", "status", "0123456789abcd", "--app", "cliapp"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{out:?}"
    );
    let out = hangar(&h, &["machines", "start", id, "--app", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["apps", "list", "--data-dir", "/nonexistent-hangar-dir"])
        .env_remove("HANGAR_API_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no token"),
        "{out:?}"
    );
    let out = hangar(&h, &["machines", "run"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");

    ok(&hangar(&h, &["machines", "destroy", id, "--app", "cliapp"]));
    ok(&hangar(&h, &["apps", "destroy", "cliapp"]));
    assert_eq!(h.get("/v1/apps/cliapp").await.0, 404);
}

/// `hangar bench handshakes` makes new TLS sessions against the HTTPS
/// listener, each a full handshake and one request, and counts the ones
/// not answered 200 as errors.
#[tokio::test]
async fn bench_handshakes_counts_new_sessions_and_failures() {
    let h = Hangar::start().await;
    h.app_with_machine("tlsapp").await;
    let run = |host: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_hangar"))
            .args(["bench", "handshakes", "--addr"])
            .arg(h.addrs.https.to_string())
            .args(["--host", host, "--secs", "1", "--conns", "2", "--json"])
            .output()
            .expect("run hangar bench");
        let stdout = ok(&out);
        let last = stdout.lines().last().expect("a JSON line");
        serde_json::from_str::<Value>(last).unwrap()
    };
    let served = run("tlsapp.localhost");
    assert_eq!(served["errors"], 0, "{served}");
    assert!(
        served["handshakes_per_sec"].as_f64().unwrap() > 0.0,
        "{served}"
    );
    // No such app: the proxy answers 404, and every session is a failure.
    let refused = run("nosuchapp.localhost");
    assert!(refused["errors"].as_u64().unwrap() > 0, "{refused}");
    assert_eq!(refused["handshakes_per_sec"], 0.0, "{refused}");
}
