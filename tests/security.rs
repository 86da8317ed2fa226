//! Every promise of `docs/security.md`, attacked through the real binary:
//! one test per boundary, each an attack that succeeded before its fix.

mod common;

use common::{ECHO_MACHINE, Hangar, raw_request};
use serde_json::Value;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};

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

/// A request through the proxy's HTTP listener for `app`, with `headers`:
/// the status, the proxy's error code, and the echo's JSON.
async fn through_proxy(
    h: &Hangar,
    app: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Option<String>, Value) {
    let mut req = h
        .http
        .get(format!("http://{}{path}", h.addrs.http))
        .header("host", format!("{app}.localhost"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let (status, _, code, body) = common::Answered::of(req.send().await.unwrap())
        .await
        .parts();
    (status, code, body)
}

/// Item 6: a machine could `fly-replay` a request to any org's app (and
/// so start its stopped machines), and a client's own `fly-replay-src` /
/// `fly-replay-failed` reached the machine as if the proxy had set them.
#[tokio::test]
async fn fly_replay_stays_inside_the_org() {
    let h = Hangar::start().await;
    app_of(&h, &h.token, "personal", "asker", "asker-mark").await;
    app_of(&h, &h.token, "personal", "sibling", "sibling-mark").await;
    let rival = h.token_for("rival");
    let victim = app_of(&h, &rival, "rival", "victim", "victim-mark").await;
    let stop = format!("/v1/apps/victim/machines/{victim}/stop");
    let (status, answer) = raw_request(h.addrs.flaps, "POST", &stop, &bearer(&rival), "").await;
    assert_eq!(status, 200, "{answer}");
    let wait = format!("/v1/apps/victim/machines/{victim}/wait?state=stopped&timeout=30");
    let (status, answer) = raw_request(h.addrs.flaps, "GET", &wait, &bearer(&rival), "").await;
    assert_eq!(status, 200, "{answer}");

    // Within the org, a replay goes where it asks.
    let (status, _, body) = through_proxy(&h, "asker", "/?replay=app%3Dsibling", &[]).await;
    assert_eq!(
        (status, body["app"].as_str()),
        (200, Some("sibling")),
        "{body}"
    );
    // To another org's app: the proxy's own answer for an app it does not
    // know, and the victim's stopped machine stays stopped.
    let (status, code, body) = through_proxy(&h, "asker", "/?replay=app%3Dvictim", &[]).await;
    assert_eq!((status, code.as_deref()), (404, Some("PA01")), "{body}");
    assert!(!body.to_string().contains("victim-mark"), "{body}");
    let show = format!("/v1/apps/victim/machines/{victim}");
    let (_, machine) = raw_request(h.addrs.flaps, "GET", &show, &bearer(&rival), "").await;
    let machine: Value = serde_json::from_str(&machine).unwrap();
    assert_eq!(machine["state"], "stopped", "{machine}");

    // What only the proxy may say about a replay never comes from a client.
    let forged = [
        (
            "fly-replay-src",
            "instance=0123456789abcd;region=dev;t=1;state=admin",
        ),
        ("fly-replay-failed", "code=PR01;reason=forged"),
    ];
    let (status, _, body) = through_proxy(&h, "asker", "/", &forged).await;
    assert_eq!(status, 200, "{body}");
    let headers = &body["headers"];
    assert!(headers.get("fly-replay-src").is_none(), "{headers}");
    assert!(headers.get("fly-replay-failed").is_none(), "{headers}");
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

/// A certificate for `names`, signed by `issuer` (self-signed without
/// one): its chain's PEM and its key's.
fn certificate(
    names: &[&str],
    issuer: Option<(&rcgen::Certificate, &rcgen::KeyPair)>,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = match issuer {
        Some((ca, ca_key)) => params.signed_by(&key, ca, ca_key).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    (cert.pem(), key.serialize_pem())
}

async fn upload(
    h: &Hangar,
    token: &str,
    app: &str,
    hostname: &str,
    (chain, key): &(String, String),
) -> (u16, String) {
    let body = serde_json::json!({ "hostname": hostname, "fullchain": chain, "private_key": key });
    let path = format!("/v1/apps/{app}/certificates/custom");
    raw_request(
        h.addrs.flaps,
        "POST",
        &path,
        &bearer(token),
        &body.to_string(),
    )
    .await
}

/// Item 4: any org could upload a certificate for `victim.flycast`, an IP
/// literal, or a name under the platform's domains, and take its traffic;
/// and any self-signed certificate was taken outside dev.
#[tokio::test]
async fn hostnames_belong_to_one_app_and_some_to_none() {
    let h = Hangar::start().await;
    app_of(&h, &h.token, "personal", "victim", "victim-mark").await;
    let (status, ip) = h
        .post("/v1/apps/victim/ip_assignments", r#"{"type":"private_v6"}"#)
        .await;
    assert!(status < 300, "{ip}");
    let rival = h.token_for("rival");
    app_of(&h, &rival, "rival", "thief", "thief-mark").await;
    let owned = certificate(&["www.victim.test"], None);
    assert_eq!(
        upload(&h, &h.token, "victim", "www.victim.test", &owned)
            .await
            .0,
        201
    );

    for name in [
        "victim.flycast",
        "victim.flycast.",
        "Victim.Flycast",
        "top1.nearest.of.victim.internal",
        "victim.localhost",
        "127.0.0.1",
        "127.20.0.1",
    ] {
        let lower = name.trim_end_matches('.').to_ascii_lowercase();
        let pair = certificate(&[&lower], None);
        let (status, answer) = upload(&h, &rival, "thief", name, &pair).await;
        assert_eq!(status, 400, "{name}: {answer}");
    }
    let stolen = certificate(&["www.victim.test"], None);
    let (status, answer) = upload(&h, &rival, "thief", "www.victim.test", &stolen).await;
    assert_eq!(status, 409, "{answer}");
    // The victim's hostname still reaches the victim.
    let (status, _, body) = through_proxy_host(&h, "www.victim.test").await;
    assert_eq!(
        (status, body["app"].as_str()),
        (200, Some("victim")),
        "{body}"
    );

    // Outside dev a certificate must chain to the configured roots.
    let tmp = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let roots = tmp.path().join("roots.pem");
    std::fs::write(&roots, ca.pem()).unwrap();
    let config = format!(
        "[flaps]\nallow_self_signed_certificates = false\ncertificate_roots = {:?}\nplatform_domains = [\"apps.example.net\"]\n",
        roots.display().to_string()
    );
    let strict = Hangar::start_with(&tmp.path().join("data"), Some(&config)).await;
    strict.create_app("site").await;
    let (status, answer) = upload(
        &strict,
        &strict.token,
        "site",
        "www.site.test",
        &certificate(&["www.site.test"], None),
    )
    .await;
    assert_eq!(status, 400, "a self-signed certificate: {answer}");
    assert!(answer.contains("not trusted"), "{answer}");
    let signed = certificate(&["www.site.test"], Some((&ca, &ca_key)));
    let (status, answer) = upload(&strict, &strict.token, "site", "www.site.test", &signed).await;
    assert_eq!(status, 201, "{answer}");
    let platform = certificate(&["site.apps.example.net"], Some((&ca, &ca_key)));
    let (status, answer) = upload(
        &strict,
        &strict.token,
        "site",
        "site.apps.example.net",
        &platform,
    )
    .await;
    assert_eq!(status, 400, "a platform domain: {answer}");
}

/// A plain HTTP request through the proxy with `Host: host`.
async fn through_proxy_host(h: &Hangar, host: &str) -> (u16, Option<String>, Value) {
    let req = h
        .http
        .get(format!("http://{}/", h.addrs.http))
        .header("host", host);
    let (status, _, code, body) = common::Answered::of(req.send().await.unwrap())
        .await
        .parts();
    (status, code, body)
}

/// Item 5: the shared listener served `Host: <app>.flycast:<port>` to
/// anyone, and sent HTTP to a port whose service is raw TCP. Now only a
/// token of the app's org opens it (as to an HTTP proxy), and only a port
/// that handles `http` takes HTTP.
#[tokio::test]
async fn flycast_is_private_to_its_org() {
    let h = Hangar::start().await;
    h.create_app("inner").await;
    let machine = r#"{"config":{"image":"hangar/echo","services":[
        {"protocol":"tcp","internal_port":8080,"ports":[{"port":8080,"handlers":["http"]}]},
        {"protocol":"tcp","internal_port":8080,"ports":[{"port":5432}]}]}}"#;
    h.started_machine("inner", machine).await;
    let (status, ip) = h
        .post("/v1/apps/inner/ip_assignments", r#"{"type":"private_v6"}"#)
        .await;
    assert_eq!(status, 200, "{ip}");
    let rival = h.token_for("rival");

    let http = h.addrs.http;
    let ask = |host: &'static str, token: Option<String>| async move {
        let mut headers = Vec::new();
        if let Some(token) = token {
            headers.push(("Proxy-Authorization", format!("Bearer {token}")));
        }
        raw_request(http, "GET", &format!("http://{host}/"), &headers, "").await
    };
    for (token, who) in [
        (None, "anyone"),
        (Some(rival.clone()), "another org"),
        (Some("hgr_guess".into()), "a guess"),
    ] {
        for host in ["inner.flycast:8080", "inner.flycast"] {
            let (status, answer) = ask(host, token.clone()).await;
            assert_eq!(status, 407, "{who}, {host}: {answer}");
            assert!(!answer.contains("machine_id"), "{answer}");
        }
    }
    // A plain request naming the flycast host is no different.
    let (status, answer) = raw_request(
        http,
        "GET",
        "/",
        &[("Host", "inner.flycast:8080".into())],
        "",
    )
    .await;
    assert_eq!(status, 407, "{answer}");

    // The org's own token opens it; the token is not passed on.
    let (status, answer) = ask("inner.flycast:8080", Some(h.token.clone())).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains(r#""app":"inner""#), "{answer}");
    assert!(
        !answer.contains(&h.token),
        "the machine saw the token: {answer}"
    );
    // HTTP never goes to a raw TCP port.
    let (status, answer) = ask("inner.flycast:5432", Some(h.token.clone())).await;
    assert_eq!(status, 503, "{answer}");
}

/// Item 8: a deleted app's name, made again (by any org), showed the old
/// app's machines with their config and env (`?include_deleted=true`):
/// flyd kept the destroyed records under the name.
#[tokio::test]
async fn a_deleted_app_leaves_nothing_behind() {
    let h = Hangar::start().await;
    let old = app_of(&h, &h.token, "personal", "reused", "old-owner-secret").await;
    let (status, body) = h.delete("/v1/apps/reused").await;
    assert_eq!(status, 202, "{body}");

    let rival = h.token_for("rival");
    let body = r#"{"app_name":"reused","org_slug":"rival"}"#;
    let (status, answer) =
        raw_request(h.addrs.flaps, "POST", "/v1/apps", &bearer(&rival), body).await;
    assert_eq!(status, 201, "{answer}");
    for path in [
        "/v1/apps/reused/machines?include_deleted=true".to_string(),
        format!("/v1/apps/reused/machines/{old}"),
        format!("/v1/apps/reused/machines/{old}/events"),
    ] {
        let (status, answer) = raw_request(h.addrs.flaps, "GET", &path, &bearer(&rival), "").await;
        assert!(
            status == 404 || answer.trim() == "[]",
            "{path}: {status} {answer}"
        );
        assert!(!answer.contains("old-owner-secret"), "{path}: {answer}");
    }
    // Nor does the host itself keep them.
    let member = [("Authorization", format!("Bearer {}", h.cluster_key()))];
    let path = "/v1/apps/reused/machines?include_deleted=true";
    let (status, answer) = h.flyd_request("GET", path, &member, "").await;
    assert_eq!((status, answer.trim()), (200, "[]"));
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
    let config = "[flaps.rate_limits]\nenabled = false\n[flyd]\nrestart_backoff_ms = 100\nrestart_backoff_max_ms = 400\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.create_app("crashy").await;
    let (status, machine) = h
        .post(
            "/v1/apps/crashy/machines",
            r#"{"config":{"image":"crash","init":{"exec":["sh","-c","exit 3"]},"restart":{"policy":"always"}}}"#,
        )
        .await;
    assert_eq!(status, 200, "{machine}");
    let id = machine["id"].as_str().unwrap().to_string();
    let exits = |evs: &[(String, String, i64)]| evs.iter().filter(|e| e.0 == "exit").count();
    let deadline = std::time::Instant::now() + common::WAIT;
    let evs = loop {
        let evs = events(&h, "crashy", &id).await;
        if exits(&evs) >= 6 {
            break evs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no six exits: {evs:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
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
    let h = Hangar::start().await;
    h.create_app("leaky").await;
    // Sleeps no other run of this test has (a failed run may leave its own).
    let n = 40_000 + std::process::id() % 20_000;
    let (detached, workload, execd) = (n.to_string(), (n + 1).to_string(), (n + 2).to_string());
    let init = serde_json::json!({"config": {"image": "leaky", "init": {"exec":
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
    let config =
        "[flaps.rate_limits]\nenabled = false\n[flyd]\nlog_max_bytes = 4096\nlog_files = 2\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.create_app("chatty").await;
    let script = "i=0; while [ $i -lt 3000 ]; do echo line-$i-padding-padding-padding; i=$((i+1)); done; echo done-talking; exec sleep 1000";
    let request =
        serde_json::json!({"config": {"image": "chatty", "init": {"exec": ["sh", "-c", script]}}});
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

/// A connection to `addr` from `source` (a loopback address of the test's
/// choosing, so the proxy sees another client).
async fn connect_from(source: [u8; 4], addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Sends a request head announcing a large body, and a few bytes of it.
async fn start_slow_upload(tcp: &mut tokio::net::TcpStream, app: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {app}.localhost\r\nContent-Length: 100000\r\n\r\nfirst bytes"
    );
    tcp.write_all(head.as_bytes()).await
}

/// Whether the proxy closed `tcp` (or answered) within `within`.
async fn ended(tcp: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, tcp.read(&mut buf))
        .await
        .is_ok()
}

/// Item 9: one client could hold every connection an app may have (slow
/// uploads that never finish), locking out every other client of the app.
/// Now a client address holds at most `max_conns_per_ip`.
#[tokio::test]
async fn one_client_cannot_lock_out_another() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[proxy]\nmax_conns_per_app = 30\nmax_conns_per_ip = 10\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.app_with_machine("busy").await;
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut tcp = connect_from([127, 0, 0, 1], h.addrs.http).await;
        // Past the limit the proxy closes the connection: the write may
        // already fail, or the read shows the end.
        let _ = start_slow_upload(&mut tcp, "busy").await;
        slow.push(tcp);
    }
    let mut closed = 0;
    for tcp in &mut slow {
        if ended(tcp, std::time::Duration::from_millis(200)).await {
            closed += 1;
        }
    }
    assert_eq!(
        closed, 30,
        "all but max_conns_per_ip of the client's connections closed"
    );
    // Another client still gets in.
    let mut other = connect_from([127, 0, 0, 2], h.addrs.http).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: busy.localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let metrics = common::metrics_at(&h.http, h.addrs.metrics).await;
    assert!(
        metrics
            .contains(r#"fly_edge_http_connection_errors_count{reason="too_many_from_client"} 30"#),
        "{metrics}"
    );
}

/// Item 9: a client that starts a body and sends no more held its request
/// (and its share of the app's connections) until the response timeout.
/// Now each wait for body bytes is bounded (`body_timeout_ms`).
#[tokio::test]
async fn a_stalled_body_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[proxy]\nbody_timeout_ms = 300\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.app_with_machine("upload").await;
    let mut tcp = connect_from([127, 0, 0, 1], h.addrs.http).await;
    start_slow_upload(&mut tcp, "upload").await.unwrap();
    use tokio::io::AsyncReadExt;
    let mut answer = String::new();
    tokio::time::timeout(common::WAIT, tcp.read_to_string(&mut answer))
        .await
        .expect("the proxy gave up on the body")
        .unwrap();
    // As nginx answers a stalled body (client_body_timeout).
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("fly-proxy-error: PE08"), "{answer}");
}

/// A machine config whose one service declares `ports` (raw TCP).
fn with_ports(ports: impl Iterator<Item = u16>) -> String {
    let ports: Vec<Value> = ports.map(|p| serde_json::json!({"port": p})).collect();
    serde_json::json!({"config": {"image": "hangar/echo", "services": [
        {"protocol": "tcp", "internal_port": 8080, "ports": ports}
    ]}})
    .to_string()
}

/// Item 9: a machine config could declare any number of services, ports
/// and checks, and an app's address listened on every port any of its
/// machines declared.
#[tokio::test]
async fn configs_and_app_addresses_have_bounds() {
    let h = Hangar::start().await;
    h.create_app("wide").await;
    let services: Vec<Value> = (0..17)
        .map(|i| serde_json::json!({"protocol": "tcp", "internal_port": 8080 + i}))
        .collect();
    let checks: serde_json::Map<String, Value> = (0..33)
        .map(|i| {
            (
                format!("c{i}"),
                serde_json::json!({"type": "tcp", "port": 8080}),
            )
        })
        .collect();
    for (config, field) in [
        (
            serde_json::json!({"image": "hangar/echo", "services": services}),
            "config.services",
        ),
        (
            serde_json::json!({"image": "hangar/echo", "checks": checks}),
            "config.checks",
        ),
    ] {
        let body = serde_json::json!({ "config": config }).to_string();
        let (status, answer) = h.post("/v1/apps/wide/machines", &body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(
            answer["error"].as_str().unwrap().starts_with(field),
            "{answer}"
        );
    }
    let (status, answer) = h
        .post("/v1/apps/wide/machines", &with_ports(20000..20033))
        .await;
    assert_eq!(status, 400, "{answer}");

    // Two machines of 20 ports each: the address listens on 32 of them.
    h.started_machine("wide", &with_ports(20000..20020)).await;
    h.started_machine("wide", &with_ports(20020..20040)).await;
    let (status, ip) = h
        .post("/v1/apps/wide/ip_assignments", r#"{"type":"private_v6"}"#)
        .await;
    assert_eq!(status, 200, "{ip}");
    let ip: std::net::IpAddr = ip["ip"].as_str().unwrap().parse().unwrap();
    let listening = || async move {
        let mut n = 0;
        for port in 20000..20040 {
            if tokio::net::TcpStream::connect((ip, port)).await.is_ok() {
                n += 1;
            }
        }
        n
    };
    common::eventually("32 listeners", || async { listening().await == 32 }).await;
    assert_eq!(listening().await, 32);
}

/// Item 9: the rate limiter keyed on the raw path, so spelling a path
/// another way (`/v1/apps/hell%6f/...`) started a fresh bucket.
#[tokio::test]
async fn the_rate_limiter_keys_on_the_route() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[flaps.rate_limits]\nenabled = true\nget_per_sec = 1\nget_burst = 3\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    h.create_app("hello").await;
    let auth = bearer(&h.token);
    let get = |path: &'static str| raw_request(h.addrs.flaps, "GET", path, &auth, "");
    for _ in 0..3 {
        assert_eq!(get("/v1/apps/hello/machines").await.0, 200);
    }
    for spelling in ["/v1/apps/hell%6f/machines", "/v1/apps/%68ello/machines"] {
        let (status, answer) = get(spelling).await;
        assert_eq!(status, 429, "{spelling}: {answer}");
        assert!(answer.contains("GET /v1/apps/hello/machines"), "{answer}");
    }
}

/// Item 9: an org could create apps, machines, addresses, certificates and
/// secrets without bound, taking the platform's room from every other.
#[tokio::test]
async fn orgs_hold_at_most_their_quotas() {
    let tmp = tempfile::tempdir().unwrap();
    let config = "[flaps]\nallow_self_signed_certificates = true\n[flaps.rate_limits]\nenabled = false\n\
                  [flaps.quotas]\napps = 2\nmachines = 1\nips = 1\ncertificates = 1\nsecrets = 2\n";
    let h = Hangar::start_with(&tmp.path().join("data"), Some(config)).await;
    let over = |(status, answer): (u16, Value)| {
        assert_eq!(status, 403, "{answer}");
        assert_eq!(answer["status"], "quota_exceeded", "{answer}");
    };
    h.create_app("q1").await;
    h.create_app("q2").await;
    over(h.post("/v1/apps", r#"{"app_name":"q3"}"#).await);
    h.started_machine("q1", ECHO_MACHINE).await;
    over(h.post("/v1/apps/q2/machines", ECHO_MACHINE).await);
    let ip = r#"{"type":"private_v6"}"#;
    assert_eq!(h.post("/v1/apps/q1/ip_assignments", ip).await.0, 200);
    over(h.post("/v1/apps/q2/ip_assignments", ip).await);
    let first = certificate(&["a.quota.test"], None);
    assert_eq!(
        upload(&h, &h.token, "q1", "a.quota.test", &first).await.0,
        201
    );
    let second = certificate(&["b.quota.test"], None);
    let (status, answer) = upload(&h, &h.token, "q2", "b.quota.test", &second).await;
    assert_eq!(status, 403, "{answer}");
    // Renewing a certificate the org holds takes nothing more.
    let renewed = certificate(&["a.quota.test"], None);
    assert_eq!(
        upload(&h, &h.token, "q1", "a.quota.test", &renewed).await.0,
        201
    );
    let (status, answer) = h
        .post("/v1/apps/q1/secrets", r#"{"values":{"A":"1","B":"2"}}"#)
        .await;
    assert!(status < 300, "{answer}");
    over(
        h.post("/v1/apps/q2/secrets", r#"{"values":{"C":"3"}}"#)
            .await,
    );
    let (status, answer) = h
        .post("/v1/apps/q1/secrets", r#"{"values":{"A":"new"}}"#)
        .await;
    assert!(status < 300, "changing a secret: {answer}");

    // Another org has its own.
    let rival = h.token_for("rival");
    let body = r#"{"app_name":"r1","org_slug":"rival"}"#;
    assert_eq!(
        raw_request(h.addrs.flaps, "POST", "/v1/apps", &bearer(&rival), body)
            .await
            .0,
        201
    );
}

/// Item 9: flaps asked every host for its whole listing of an app and cut
/// the page itself, so one list call could move a host's every machine.
/// Now a host sends one filtered page (and flaps merges the hosts' pages).
#[tokio::test]
async fn hosts_send_machine_lists_a_page_at_a_time() {
    let h = Hangar::start().await;
    h.create_app("many").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, m) = h
            .post(
                "/v1/apps/many/machines",
                r#"{"config":{"image":"hangar/echo"},"skip_launch":true}"#,
            )
            .await;
        assert_eq!(status, 200, "{m}");
        ids.push(m["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    let member = [("Authorization", format!("Bearer {}", h.cluster_key()))];
    let (status, page) = h
        .flyd_request("GET", "/v1/apps/many/machines?limit=2", &member, "")
        .await;
    assert_eq!(status, 200, "{page}");
    let page: Vec<Value> = serde_json::from_str(&page).unwrap();
    let got: Vec<&str> = page.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(got, [ids[0].as_str(), ids[1].as_str()]);

    // flaps' paging over the hosts' pages: tests/api.rs,
    // machine_lists_filter_and_page.
}
