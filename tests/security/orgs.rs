//! Org against org: every API path authorized on its final target, hostnames owned by one app, flycast and replays scoped to the org, an app's deletion complete, quotas and rate limits per org.

use super::*;

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
