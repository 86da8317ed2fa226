//! Every promise of `docs/security.md`, attacked through the real binary:
//! one test per promise, each an attack that succeeded before its fix, a
//! module per trust boundary (`orgs`, `hosts`, `machines`, `clients`).

mod clients;
#[path = "../common/mod.rs"]
mod common;
mod hosts;
mod machines;
mod orgs;

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
