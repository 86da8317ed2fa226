//! Host against host: flyd answers only its cluster, peers are authenticated, and the RIB cannot stay behind flyd.

use super::*;

/// Item 2: flyd's API had no authentication: anything on the host (a
/// workload among them) could list any app's machines, or create one in
/// any app with that app's secrets. Now every call needs the cluster
/// credential, and even with it a machine is found only under its own app.
#[tokio::test]
async fn flyd_answers_only_its_cluster() {
    let h = Hangar::start().await;
    let victim = app_of(&h, &h.token, "personal", "victim", "victim-secret-mark").await;
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
            let (status, answer) = h.flyd_request(method, &path, headers, body).await;
            assert_eq!(status, 401, "{method} {path} with {headers:?}: {answer}");
            assert!(!answer.contains("victim-secret-mark"), "{answer}");
        }
    }
    let (_, listed) = h.get("/v1/apps/victim/machines").await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "nothing was created");

    // A cluster member still finds a machine only under its own app.
    let member = [("Authorization", format!("Bearer {}", h.cluster_key()))];
    let (status, _) = h
        .flyd_request(
            "GET",
            &format!("/v1/apps/victim/machines/{victim}"),
            &member,
            "",
        )
        .await;
    assert_eq!(status, 200);
    let (status, answer) = h
        .flyd_request(
            "GET",
            &format!("/v1/apps/other/machines/{victim}"),
            &member,
            "",
        )
        .await;
    assert_eq!(status, 404, "{answer}");

    // As in dev, flyd has no network listener at all, and its socket is
    // its owner's alone.
    let socket = h.addrs.flyd.strip_prefix("unix:").expect("a unix socket");
    let mode = std::fs::metadata(socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "{socket}: {mode:o}");

    // pilot's control socket takes signals and execs: its owner's alone.
    let dirs = std::fs::read_dir(h.data_dir.join("machines")).unwrap();
    let mut sockets = 0;
    for dir in dirs.flatten() {
        let sock = dir.path().join("pilot.sock");
        if let Ok(meta) = std::fs::metadata(&sock) {
            assert_eq!(meta.permissions().mode() & 0o077, 0, "{}", sock.display());
            sockets += 1;
        }
    }
    assert_eq!(sockets, 1);
}

/// Item 7: with peers configured (on loopback, as `config/regions/` has
/// them), any local client or workload that sent `fly-forwarded-region`
/// was taken for a peer proxy, and its `Fly-Client-IP` passed unchanged.
/// Now a peer proves itself with the cluster credential.
#[tokio::test]
async fn peers_are_authenticated_not_trusted_by_address() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[[proxy.peers]]\nregion = \"ord\"\naddr = \"127.0.0.1:1\"\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    app_of(&h, &h.token, "personal", "web", "web-mark").await;
    for credential in [None, Some("guess"), Some("")] {
        let mut forged = vec![
            ("fly-forwarded-region", "ord"),
            ("fly-client-ip", "203.0.113.9"),
            ("x-forwarded-for", "203.0.113.9"),
            ("fly-region", "ord"),
        ];
        if let Some(c) = credential {
            forged.push(("hangar-peer-credential", c));
        }
        let (status, _, body) = through_proxy(&h, "web", "/", &forged).await;
        assert_eq!(status, 200, "{body}");
        let headers = &body["headers"];
        assert_eq!(headers["fly-client-ip"], "127.0.0.1", "{headers}");
        assert_eq!(headers["fly-region"], "dev", "{headers}");
        // The list keeps the client's claim, and this hop's entry last.
        assert_eq!(
            headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1",
            "{headers}"
        );
        assert!(headers.get("fly-forwarded-region").is_none(), "{headers}");
        assert!(headers.get("hangar-peer-credential").is_none(), "{headers}");
    }
    // The cluster's own credential is what a peer sends, and it never
    // reaches the machine.
    let key = h.cluster_key();
    let peer = [
        ("fly-forwarded-region", "ord"),
        ("fly-client-ip", "203.0.113.9"),
        ("hangar-peer-credential", key.as_str()),
    ];
    let (status, _, body) = through_proxy(&h, "web", "/", &peer).await;
    assert_eq!(status, 200, "{body}");
    let headers = &body["headers"];
    assert_eq!(headers["fly-client-ip"], "203.0.113.9", "{headers}");
    assert_eq!(headers["fly-forwarded-region"], "ord", "{headers}");
    assert!(!body.to_string().contains(&key), "{body}");
}

/// Item 11: a RIB write that failed after flyd's store had changed left
/// the RIB routing to a machine that was stopped, for good. Here another
/// process holds the RIB's write lock while a machine stops; once it lets
/// go, the row is made good without anyone touching the machine again.
#[tokio::test]
async fn the_rib_catches_up_with_flyd_after_a_failed_write() {
    let h = Hangar::start().await;
    let machine = h.app_with_machine("drift").await;
    let id = machine["id"].as_str().unwrap().to_string();
    let path = h.data_dir.join("rib.sqlite");
    let rib = hangar_catalog::Rib::open(&path).unwrap();
    let state = |rib: &hangar_catalog::Rib| rib.machine(&id).unwrap().unwrap().state.to_string();
    assert_eq!(state(&rib), "started");

    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (status, body) = h
        .post(&format!("/v1/apps/drift/machines/{id}/stop"), "")
        .await;
    assert_eq!(status, 200, "{body}");
    h.wait_state("drift", &id, "stopped").await;
    assert_eq!(state(&rib), "started", "the RIB missed the stop");
    blocker.execute_batch("ROLLBACK").unwrap();

    common::eventually("the RIB shows the machine stopped", || async {
        state(&rib) == "stopped"
    })
    .await;
    assert!(h.log().contains("republished"), "{}", h.log());
}
