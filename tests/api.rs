//! The Machines API beyond the lifecycle: request ids, the caller's token,
//! platform endpoints, an org's machines, and list filters and paging.

mod common;

use common::{ECHO_MACHINE, Hangar};
use serde_json::Value;

#[tokio::test]
async fn request_ids_token_and_platform() {
    let h = Hangar::start().await;
    for authorized in [true, false] {
        let mut req = h.http.get(h.api("/v1/apps"));
        if authorized {
            req = req.bearer_auth(&h.token);
        }
        let resp = req.send().await.unwrap();
        let id = resp
            .headers()
            .get("fly-request-id")
            .expect("fly-request-id");
        assert_eq!(id.len(), 26, "a ULID");
    }
    let (status, body) = h.get("/v1/tokens/current").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens"][0]["org_slug"], "personal");
    assert!(
        !body.to_string().contains(&h.token),
        "the token itself is never shown"
    );

    let (status, body) = h.get("/v1/platform/regions").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["regions"][0]["code"], "dev");
    assert_eq!(body["nearest"], "dev");
    let (status, body) = h
        .post(
            "/v1/platform/placements",
            r#"{"org_slug":"personal","compute":{"cpus":1,"memory_mb":256}}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["regions"][0]["count"].as_u64().unwrap() > 0, "{body}");
    let (status, _) = h
        .post("/v1/platform/placements", r#"{"org_slug":"someone-else"}"#)
        .await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn machine_lists_filter_and_page() {
    let h = Hangar::start().await;
    assert_eq!(h.post("/v1/apps", r#"{"app_name":"many"}"#).await.0, 201);
    let web = r#"{"config":{"image":"hangar/echo","metadata":{"role":"web"}}}"#;
    let mut ids = Vec::new();
    for body in [ECHO_MACHINE, web, web] {
        let (status, m) = h.post("/v1/apps/many/machines", body).await;
        assert_eq!(status, 200, "{m}");
        ids.push(m["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    let (status, _) = h
        .post(&format!("/v1/apps/many/machines/{}/stop", ids[0]), "")
        .await;
    assert_eq!(status, 200);

    let listed = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = h.get("/v1/apps/many/machines").await;
    assert_eq!(listed(&all), ids);
    let (_, stopped) = h.get("/v1/apps/many/machines?state=stopped").await;
    assert_eq!(listed(&stopped), [ids[0].clone()]);
    let (_, webs) = h.get("/v1/apps/many/machines?metadata.role=web").await;
    assert_eq!(listed(&webs).len(), 2);
    let (_, summary) = h.get("/v1/apps/many/machines?summary=true").await;
    assert!(summary[0].get("config").is_none(), "{summary}");
    assert!(summary[0].get("state").is_some(), "{summary}");

    // Paging: fly-next-cursor until the last page.
    let resp = h
        .http
        .get(h.api("/v1/apps/many/machines?limit=2"))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    let cursor = resp.headers()["fly-next-cursor"]
        .to_str()
        .unwrap()
        .to_string();
    let first: Value = resp.json().await.unwrap();
    assert_eq!(listed(&first), ids[..2]);
    let resp = h
        .http
        .get(h.api(&format!("/v1/apps/many/machines?limit=2&cursor={cursor}")))
        .bearer_auth(&h.token)
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("fly-next-cursor").is_none());
    assert_eq!(listed(&resp.json().await.unwrap()), ids[2..]);
    assert_eq!(h.get("/v1/apps/many/machines?limit=0").await.0, 400);
    assert_eq!(h.get("/v1/apps/many/machines?cursor=x").await.0, 400);

    // Destroyed machines only with include_deleted.
    assert_eq!(
        h.delete(&format!("/v1/apps/many/machines/{}", ids[0]))
            .await
            .0,
        200
    );
    assert_eq!(listed(&h.get("/v1/apps/many/machines").await.1).len(), 2);
    assert_eq!(
        listed(&h.get("/v1/apps/many/machines?include_deleted=true").await.1).len(),
        3
    );

    // The org's view.
    let (status, org) = h.get("/v1/orgs/personal/machines").await;
    assert_eq!(status, 200, "{org}");
    assert_eq!(org["machines"].as_array().unwrap().len(), 2);
    assert_eq!(org["machines"][0]["app_name"], "many");
    assert_eq!(h.get("/v1/orgs/other/machines").await.0, 403);
}

#[tokio::test]
async fn orgs_are_isolated() {
    let h = Hangar::start().await;
    let machine = h.app_with_machine("mine").await;
    let id = machine["id"].as_str().unwrap();
    let rival = h.token_for("rival");
    let as_rival = |method: reqwest::Method, path: &str| {
        h.http
            .request(method, h.api(path))
            .bearer_auth(&rival)
            .send()
    };
    use reqwest::Method;
    let status = |r: reqwest::Response| r.status().as_u16();

    let apps: Value = as_rival(Method::GET, "/v1/apps")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(apps["total_apps"], 0, "{apps}");
    assert_eq!(
        status(as_rival(Method::GET, "/v1/apps/mine").await.unwrap()),
        403
    );
    assert_eq!(
        status(as_rival(Method::DELETE, "/v1/apps/mine").await.unwrap()),
        403
    );
    assert_eq!(
        status(
            as_rival(Method::GET, "/v1/apps/mine/machines")
                .await
                .unwrap()
        ),
        403
    );
    assert_eq!(
        status(
            as_rival(Method::POST, "/v1/apps/mine/machines")
                .await
                .unwrap()
        ),
        403
    );
    for (method, suffix) in [
        (Method::GET, ""),
        (Method::POST, "/stop"),
        (Method::DELETE, "?force=true"),
        (Method::GET, "/metadata"),
        (Method::POST, "/lease"),
    ] {
        let resp = as_rival(
            method.clone(),
            &format!("/v1/apps/mine/machines/{id}{suffix}"),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 404, "{method} {suffix}");
        let body: Value = resp.json().await.unwrap();
        assert!(!body.to_string().contains("started"), "{body}");
    }
    assert_eq!(
        status(
            as_rival(Method::GET, "/v1/orgs/personal/machines")
                .await
                .unwrap()
        ),
        403
    );
    // Every documented operation on the other org's app: refused, never done.
    let doc: Value = h
        .http
        .get(h.api("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/apps/{app_name}") {
            continue;
        }
        for method in ops.as_object().unwrap().keys() {
            let real = common::fill_path(path, "mine", id);
            let resp = h
                .http
                .request(method.to_uppercase().parse().unwrap(), h.api(&real))
                .bearer_auth(&rival)
                .body("{}")
                .send()
                .await
                .unwrap();
            let code = resp.status().as_u16();
            assert!(
                code == 403 || code == 404,
                "{method} {path} as another org: {code}"
            );
        }
    }
    // Names are global, as on Fly: taken is taken.
    let resp = h
        .http
        .post(h.api("/v1/apps"))
        .bearer_auth(&rival)
        .body(r#"{"app_name":"mine"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    // Nothing of the rival's touched the machine.
    let (_, m) = h.get(&format!("/v1/apps/mine/machines/{id}")).await;
    assert_eq!(m["state"], "started");
    assert!(m["config"]["metadata"].is_null(), "{m}");
}

#[tokio::test]
async fn secrets_are_sealed_hidden_and_reach_machines_on_start() {
    let h = Hangar::start().await;
    let machine = h.app_with_machine("sec").await;
    let id = machine["id"].as_str().unwrap();
    let (status, body) = h
        .post(
            "/v1/apps/sec/secrets",
            r#"{"values":{"DB_URL":"postgres://very-secret","OLD":"x"}}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["version"], 1);
    assert!(!body.to_string().contains("very-secret"), "{body}");
    let (status, body) = h
        .post("/v1/apps/sec/secrets", r#"{"values":{"OLD":null}}"#)
        .await;
    assert_eq!((status, body["version"].as_u64()), (200, Some(2)));
    let (status, body) = h
        .post("/v1/apps/sec/secrets/API_KEY", r#"{"value":"k1"}"#)
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["version"], 3);

    let (_, list) = h.get("/v1/apps/sec/secrets").await;
    let names: Vec<&str> = list["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["API_KEY", "DB_URL"]);
    assert!(list["secrets"][0].get("value").is_none(), "{list}");
    let (_, shown) = h.get("/v1/apps/sec/secrets/DB_URL?show_secrets=true").await;
    assert_eq!(shown["value"], "postgres://very-secret");
    assert_eq!(h.get("/v1/apps/sec/secrets/NOPE").await.0, 404);
    assert_eq!(h.delete("/v1/apps/sec/secrets/API_KEY").await.0, 200);
    assert_eq!(h.delete("/v1/apps/sec/secrets/API_KEY").await.0, 404);
    assert_eq!(
        h.post("/v1/apps/sec/secrets/BAD-NAME", r#"{"value":"v"}"#)
            .await
            .0,
        400
    );
    assert_eq!(
        h.post("/v1/apps/sec/secrets", r#"{"values":{}}"#).await.0,
        400
    );

    // Sealed at rest: the RIB and its WAL never hold the value.
    for file in ["rib.sqlite", "rib.sqlite-wal"] {
        let bytes = std::fs::read(h.data_dir.join(file)).unwrap_or_default();
        assert!(
            !bytes.windows(11).any(|w| w == b"very-secret"),
            "{file} holds a secret in clear"
        );
    }

    // The running machine sees it after its next start, not before.
    let exec = |cmd: &str| format!(r#"{{"command":["sh","-c","{cmd}"]}}"#);
    let m = |suffix: &str| format!("/v1/apps/sec/machines/{id}{suffix}");
    let (_, out) = h.post(&m("/exec"), &exec("echo ${DB_URL:-unset}")).await;
    assert_eq!(out["stdout"], "unset\n", "{out}");
    assert_eq!(h.post(&m("/restart"), "").await.0, 200);
    let (_, out) = h.post(&m("/exec"), &exec("echo $DB_URL")).await;
    assert_eq!(out["stdout"], "postgres://very-secret\n", "{out}");
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    // Fly's published limits: the default when the config does not say.
    let h = Hangar::start_with(&tmp.path().join("data"), Some("[flaps]\n")).await;
    assert_eq!(h.post("/v1/apps", r#"{"app_name":"busy"}"#).await.0, 201);
    // Calls until the first 429, bounded: on a slow machine a cell may
    // refill between calls, so the exact count can exceed the burst.
    let allowed = |results: &[u16]| results.iter().take_while(|s| **s != 429).count();

    // Mutations: a burst of 3 per action, then 429.
    let mut writes = Vec::new();
    while writes.last() != Some(&429) && writes.len() < 10 {
        writes.push(h.post("/v1/apps/busy/machines", r#"{"config":{}}"#).await.0);
    }
    assert!((3..10).contains(&allowed(&writes)), "{writes:?}");
    assert!(writes[..3].iter().all(|s| *s == 400), "{writes:?}");
    let resp = h
        .http
        .post(h.api("/v1/apps/busy/machines"))
        .bearer_auth(&h.token)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("rate limit"),
        "{body}"
    );

    // Another action is counted apart; reads have their own, larger budget.
    assert_eq!(
        h.post("/v1/apps/busy/secrets/A", r#"{"value":"1"}"#)
            .await
            .0,
        201
    );
    let mut reads = Vec::new();
    while reads.last() != Some(&429) && reads.len() < 40 {
        reads.push(h.get("/v1/apps/busy").await.0);
    }
    assert!((10..40).contains(&allowed(&reads)), "{reads:?}");
}

#[tokio::test]
async fn custom_certificates_are_served_by_sni_and_route_their_hostname() {
    let h = Hangar::start().await;
    let machine = h.app_with_machine("site").await;
    assert_eq!(h.post("/v1/apps", r#"{"app_name":"other"}"#).await.0, 201);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["www.custom.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let upload = |hostname: &str, key_pem: &str| {
        serde_json::json!({ "hostname": hostname, "fullchain": cert.pem(), "private_key": key_pem })
            .to_string()
    };
    let (status, body) = h
        .post(
            "/v1/apps/site/certificates/custom",
            &upload("www.custom.test", &key.serialize_pem()),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["hostname"], "www.custom.test");

    // Refused: a key of another certificate, another app's hostname, a bad name.
    let stranger = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let (status, body) = h
        .post(
            "/v1/apps/site/certificates/custom",
            &upload("www.custom.test", &stranger),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("does not match"),
        "{body}"
    );
    let (status, _) = h
        .post(
            "/v1/apps/other/certificates/custom",
            &upload("www.custom.test", &key.serialize_pem()),
        )
        .await;
    assert_eq!(status, 409);
    let (status, _) = h
        .post(
            "/v1/apps/site/certificates/custom",
            &upload("x.localhost", &key.serialize_pem()),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(h.post("/v1/apps/site/certificates/acme", "{}").await.0, 501);

    // HTTPS with strict verification against that certificate only: SNI
    // picks it, and the hostname routes to the app's machine.
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.pem().as_bytes()).unwrap())
        .tls_built_in_root_certs(false)
        .resolve("www.custom.test", h.addrs.https)
        .timeout(common::WAIT)
        .build()
        .unwrap();
    let url = format!("https://www.custom.test:{}/", h.addrs.https.port());
    // The FIB follows the RIB asynchronously; retry until it has the hostname.
    let echo: Value = common::until("the hostname served", || async {
        match https.get(&url).send().await {
            Ok(resp) if resp.status() == 200 => Ok(resp.json().await.unwrap()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(echo["machine_id"], machine["id"]);
    assert_eq!(h.via_proxy("www.custom.test", "/").await.0, 200);

    // A second certificate, for another app's hostname: each SNI gets its
    // own, and a client trusting only the first refuses the second.
    let key2 = rcgen::KeyPair::generate().unwrap();
    let cert2 = rcgen::CertificateParams::new(vec!["api.other.test".to_string()])
        .unwrap()
        .self_signed(&key2)
        .unwrap();
    let body = serde_json::json!({ "hostname": "api.other.test", "fullchain": cert2.pem(),
        "private_key": key2.serialize_pem() });
    let (status, body) = h
        .post("/v1/apps/other/certificates/custom", &body.to_string())
        .await;
    assert_eq!(status, 201, "{body}");
    let strict = |pem: &str| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
            .tls_built_in_root_certs(false)
            .resolve("api.other.test", h.addrs.https)
            .resolve("www.custom.test", h.addrs.https)
            .timeout(common::WAIT)
            .build()
            .unwrap()
    };
    let url2 = format!("https://api.other.test:{}/", h.addrs.https.port());
    // "other" has no machine: a 503 after a verified handshake.
    let resp = common::until("the second hostname served", || async {
        strict(&cert2.pem())
            .get(&url2)
            .send()
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["fly-proxy-error"], "PR01");
    assert!(strict(&cert.pem()).get(&url2).send().await.is_err());
    assert!(strict(&cert2.pem()).get(&url).send().await.is_err());
    assert_eq!(
        strict(&cert.pem()).get(&url).send().await.unwrap().status(),
        200
    );

    let (_, list) = h.get("/v1/apps/site/certificates").await;
    assert_eq!(list["total_count"], 1, "{list}");
    let (_, list) = h.get("/v1/apps/other/certificates").await;
    assert_eq!(list["total_count"], 1, "{list}");
    assert_eq!(
        h.delete("/v1/apps/site/certificates/www.custom.test")
            .await
            .0,
        204
    );
    assert_eq!(
        h.get("/v1/apps/site/certificates/www.custom.test").await.0,
        404
    );
    common::eventually("the hostname no longer routed", || async {
        h.via_proxy("www.custom.test", "/").await.0 == 400
    })
    .await;
}

#[tokio::test]
async fn flycast_addresses_are_assigned_listed_and_released() {
    let h = Hangar::start().await;
    assert_eq!(h.post("/v1/apps", r#"{"app_name":"flyc"}"#).await.0, 201);
    let (status, ip) = h
        .post("/v1/apps/flyc/ip_assignments", r#"{"type":"private_v6"}"#)
        .await;
    assert_eq!(status, 200, "{ip}");
    let addr: std::net::Ipv4Addr = ip["ip"].as_str().unwrap().parse().unwrap();
    assert_eq!(addr.octets()[..2], [127, 20]);
    let (status, dedicated) = h
        .post("/v1/apps/flyc/ip_assignments", r#"{"type":"v4"}"#)
        .await;
    assert_eq!(status, 200, "{dedicated}");
    let dedicated: std::net::Ipv4Addr = dedicated["ip"].as_str().unwrap().parse().unwrap();
    assert_eq!(dedicated.octets()[..2], [127, 30]);
    let path = format!("/v1/apps/flyc/ip_assignments/{dedicated}");
    assert_eq!(h.delete(&path).await.0, 204);
    let (status, body) = h
        .post("/v1/apps/flyc/ip_assignments", r#"{"type":"shared_v4"}"#)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(h.post("/v1/apps/flyc/ip_assignments", "{}").await.0, 400);
    let (_, list) = h.get("/v1/apps/flyc/ip_assignments").await;
    assert_eq!(list["ips"][0]["ip"], ip["ip"]);
    let path = format!("/v1/apps/flyc/ip_assignments/{addr}");
    assert_eq!(h.delete(&path).await.0, 204);
    assert_eq!(h.delete(&path).await.0, 404);
    assert_eq!(
        h.get("/v1/apps/flyc/ip_assignments").await.1["ips"],
        serde_json::json!([])
    );
}
