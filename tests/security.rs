//! Every promise of `docs/security.md`, attacked through the real binary:
//! one test per boundary, each an attack that succeeded before its fix.

mod common;

use common::{ECHO_MACHINE, Hangar, raw_request};
use serde_json::Value;
use std::os::unix::fs::FileTypeExt;

/// An app of `org` (by its token) with a started echo machine whose
/// environment holds `mark`; returns the machine's id.
async fn app_of(h: &Hangar, token: &str, org: &str, app: &str, mark: &str) -> String {
    let body = format!(r#"{{"app_name":"{app}","org_slug":"{org}"}}"#);
    let (status, answer) =
        raw_request(h.addrs.flaps, "POST", "/v1/apps", &bearer(token), &body).await;
    assert_eq!(status, 201, "{answer}");
    let machine = format!(
        r#"{{"config":{{"image":"hangar/echo","env":{{"MARK":"{mark}"}},
            "services":[{{"protocol":"tcp","internal_port":8080,"ports":[{{"port":80,"handlers":["http"]}}]}}]}}}}"#
    );
    let path = format!("/v1/apps/{app}/machines");
    let (status, answer) =
        raw_request(h.addrs.flaps, "POST", &path, &bearer(token), &machine).await;
    assert_eq!(status, 200, "{answer}");
    let id = serde_json::from_str::<Value>(&answer).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let wait = format!("{path}/{id}/wait?state=started&timeout=30");
    let (status, answer) = raw_request(h.addrs.flaps, "GET", &wait, &bearer(token), "").await;
    assert_eq!(status, 200, "{answer}");
    id
}

fn bearer(token: &str) -> [(&'static str, String); 1] {
    [("Authorization", format!("Bearer {token}"))]
}

/// Item 1: a path with `..` (raw, encoded, double-encoded) reached another
/// org's machine through flaps: flaps built the host's URL from the
/// client's path, and the URL's normalization climbed out of the caller's
/// app (`GET /v1/apps/mine/machines/$MINE/../$VICTIM` answered the
/// victim's config and env; `.../exec` ran in it).
#[tokio::test]
async fn flaps_forwards_only_what_it_authorized() {
    let h = Hangar::start().await;
    let victim = app_of(&h, &h.token, "personal", "victim", "victim-secret-mark").await;
    let rival = h.token_for("rival");
    let mine = app_of(&h, &rival, "rival", "mine", "rival-mark").await;

    let exec = r#"{"command":["sh","-c","echo pwned; env"]}"#;
    let attacks = [
        ("GET", format!("/v1/apps/mine/machines/{mine}/../{victim}")),
        (
            "GET",
            format!("/v1/apps/mine/machines/{mine}/%2e%2e/{victim}"),
        ),
        (
            "GET",
            format!("/v1/apps/mine/machines/{mine}/%2E%2E/{victim}"),
        ),
        (
            "GET",
            format!("/v1/apps/mine/machines/{mine}/..%2F{victim}"),
        ),
        (
            "GET",
            format!("/v1/apps/mine/machines/{mine}/%252e%252e/{victim}"),
        ),
        (
            "GET",
            format!("/v1/apps/mine/machines/{mine}%2F..%2F{victim}"),
        ),
        (
            "GET",
            format!("/v1/apps/mine/machines/{mine}/metadata/../../{victim}"),
        ),
        (
            "GET",
            format!("/v1/apps/mine/machines/{mine}/metadata/%2e%2e%2f%2e%2e%2f{victim}"),
        ),
        ("GET", format!("/v1/apps/mine/machines/./{victim}")),
        ("GET", format!("/v1/apps/mine/../victim/machines/{victim}")),
        (
            "GET",
            format!("/v1/apps/mine/machines/{mine}/../../../victim/machines/{victim}"),
        ),
        (
            "POST",
            format!("/v1/apps/mine/machines/{mine}/../{victim}/exec"),
        ),
        (
            "POST",
            format!("/v1/apps/mine/machines/{mine}/%2e%2e/{victim}/exec"),
        ),
        (
            "POST",
            format!("/v1/apps/mine/machines/{mine}/../{victim}/stop"),
        ),
        (
            "DELETE",
            format!("/v1/apps/mine/machines/{mine}/../{victim}?force=true"),
        ),
    ];
    for (method, path) in &attacks {
        let body = if path.ends_with("/exec") { exec } else { "" };
        let (status, answer) =
            raw_request(h.addrs.flaps, method, path, &bearer(&rival), body).await;
        assert!(
            matches!(status, 400 | 404 | 405),
            "{method} {path}: {status} {answer}"
        );
        assert!(
            !answer.contains("victim-secret-mark") && !answer.contains("pwned"),
            "{method} {path} reached the victim: {answer}"
        );
        assert!(status < 500, "{method} {path}: {status}");
    }
    // The victim's machine was neither stopped nor destroyed.
    let (status, machine) = h.get(&format!("/v1/apps/victim/machines/{victim}")).await;
    assert_eq!((status, machine["state"].as_str()), (200, Some("started")));

    // The caller's own operations still go through, a metadata key with
    // dots among them.
    let own = format!("/v1/apps/mine/machines/{mine}/metadata/a.b");
    let (status, answer) = raw_request(
        h.addrs.flaps,
        "POST",
        &own,
        &bearer(&rival),
        r#"{"value":"v"}"#,
    )
    .await;
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = raw_request(h.addrs.flaps, "GET", &own, &bearer(&rival), "").await;
    assert_eq!(status, 200, "{answer}");
    let exec_own = format!("/v1/apps/mine/machines/{mine}/exec");
    let (status, answer) =
        raw_request(h.addrs.flaps, "POST", &exec_own, &bearer(&rival), exec).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("rival-mark"), "{answer}");
}

/// Item 2: flyd's API had no authentication: anything on the host (a
/// workload among them) could list any app's machines, or create one in
/// any app with that app's secrets. Now every call needs the cluster
/// credential, and even with it a machine is found only under its own app.
#[tokio::test]
async fn flyd_answers_only_its_cluster() {
    let h = Hangar::start().await;
    let victim = app_of(&h, &h.token, "personal", "victim", "victim-secret-mark").await;
    let flyd = h.addrs.flyd;
    let create = r#"{"config":{"image":"hangar/echo"}}"#;
    let strangers = [
        vec![],
        vec![("Authorization", "Bearer ".to_string())],
        vec![("Authorization", format!("Bearer {}", h.token))],
        vec![("Authorization", format!("Bearer {}x", h.cluster_key()))],
        vec![("Authorization", h.cluster_key())],
    ];
    for headers in &strangers {
        for (method, path, body) in [
            ("GET", "/v1/apps/victim/machines".to_string(), ""),
            ("POST", "/v1/apps/victim/machines".to_string(), create),
            ("GET", format!("/v1/apps/victim/machines/{victim}"), ""),
            (
                "POST",
                format!("/v1/apps/victim/machines/{victim}/exec"),
                r#"{"command":["env"]}"#,
            ),
            ("GET", "/no/such/path".to_string(), ""),
        ] {
            let (status, answer) = raw_request(flyd, method, &path, headers, body).await;
            assert_eq!(status, 401, "{method} {path} with {headers:?}: {answer}");
            assert!(!answer.contains("victim-secret-mark"), "{answer}");
        }
    }
    let (_, listed) = h.get("/v1/apps/victim/machines").await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "nothing was created");

    // A cluster member still finds a machine only under its own app.
    let member = [("Authorization", format!("Bearer {}", h.cluster_key()))];
    let (status, _) = raw_request(
        flyd,
        "GET",
        &format!("/v1/apps/victim/machines/{victim}"),
        &member,
        "",
    )
    .await;
    assert_eq!(status, 200);
    let (status, answer) = raw_request(
        flyd,
        "GET",
        &format!("/v1/apps/other/machines/{victim}"),
        &member,
        "",
    )
    .await;
    assert_eq!(status, 404, "{answer}");

    // pilot's control socket takes signals and execs: its owner's alone.
    let dirs = std::fs::read_dir(h.data_dir.join("machines")).unwrap();
    let mut sockets = 0;
    for dir in dirs.flatten() {
        let sock = dir.path().join("pilot.sock");
        if let Ok(meta) = std::fs::metadata(&sock) {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o077, 0, "{}", sock.display());
            sockets += 1;
        }
    }
    assert_eq!(sockets, 1);
}

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
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if !meta.file_type().is_socket() {
            assert_eq!(
                meta.permissions().mode() & 0o077,
                0,
                "{} is open to others",
                path.display()
            );
        }
        if meta.is_dir() {
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
