//! Bad input, generated: random bodies (bytes, arbitrary JSON, and valid
//! requests with one field replaced by arbitrary JSON) sent to every
//! endpoint, with odd path parameters. Nothing may answer 5xx or take the
//! server down, every error is `{"error": ...}`, and nothing half-created
//! remains.

mod common;

use common::{ECHO_MACHINE, Hangar};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid machine request with one field, at any depth, replaced.
fn mutated_machine() -> impl Strategy<Value = Value> {
    let base: Value = serde_json::from_str(ECHO_MACHINE).unwrap();
    (json_value(), 0usize..16).prop_map(move |(replacement, pick)| {
        let mut v = base.clone();
        let mut paths = Vec::new();
        collect_paths(&v, String::new(), &mut paths);
        let path = &paths[pick % paths.len()];
        if let Some(slot) = v.pointer_mut(path) {
            *slot = replacement;
        }
        v
    })
}

fn collect_paths(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, c)| collect_paths(c, format!("{at}/{k}"), out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, c)| collect_paths(c, format!("{at}/{i}"), out)),
        _ => {}
    }
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        mutated_machine().prop_map(|v| v.to_string().into_bytes()),
    ]
}

/// Path segments that are odd but valid in a URL.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("fuzz".to_string()),
        Just("0123456789abcd".to_string()),
        "[a-zA-Z0-9%._~-]{1,40}",
        ".{1,20}".prop_map(|s| s.bytes().map(|b| format!("%{b:02X}")).collect()),
    ]
}

const ENDPOINTS: &[(&str, &str)] = &[
    ("POST", "/v1/apps"),
    ("GET", "/v1/apps/{app}"),
    ("DELETE", "/v1/apps/{app}"),
    ("POST", "/v1/apps/{app}/machines"),
    ("GET", "/v1/apps/{app}/machines"),
    ("GET", "/v1/apps/{app}/machines/{id}"),
    ("POST", "/v1/apps/{app}/machines/{id}"),
    ("DELETE", "/v1/apps/{app}/machines/{id}"),
    ("POST", "/v1/apps/{app}/machines/{id}/stop"),
    ("POST", "/v1/apps/{app}/machines/{id}/start"),
    ("GET", "/v1/apps/{app}/machines/{id}/wait?timeout=1"),
    ("POST", "/v1/apps/{app}/machines/{id}/lease"),
    ("POST", "/v1/apps/{app}/machines/{id}/exec"),
    ("POST", "/v1/apps/{app}/machines/{id}/signal"),
    ("PUT", "/v1/apps/{app}/machines/{id}/metadata"),
    ("POST", "/v1/apps/{app}/machines/{id}/metadata/{id}"),
    ("POST", "/v1/apps/{app}/secrets"),
    ("POST", "/v1/apps/{app}/secrets/{id}"),
    ("POST", "/v1/platform/placements"),
];

#[test]
fn malformed_requests_never_answer_5xx() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let h = rt.block_on(Hangar::start());
    // One real app and machine, so the machine endpoints reach flyd.
    let machine = rt.block_on(h.app_with_machine("fuzz"));
    let real_id = machine["id"].as_str().unwrap().to_string();

    let cases = if std::env::var_os("CI").is_some() {
        200
    } else {
        300
    };
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        0..ENDPOINTS.len(),
        segment(),
        prop_oneof![segment(), Just(real_id.clone())],
        body(),
    );
    let result = runner.run(&strategy, |(endpoint, app, id, body)| {
        let (method, template) = ENDPOINTS[endpoint];
        // Keep the real machine's app so the id can match; fuzz the rest.
        let app = if id == real_id {
            "fuzz".to_string()
        } else {
            app
        };
        let path = template.replace("{app}", &app).replace("{id}", &id);
        let (status, text) = rt.block_on(async {
            let resp = h
                .http
                .request(method.parse().unwrap(), h.api(&path))
                .bearer_auth(&h.token)
                .body(body.clone())
                .send()
                .await
                .expect("the server answers");
            (resp.status().as_u16(), resp.text().await.unwrap())
        });
        prop_assert!(
            status < 500,
            "{method} {path} answered {status}: {text}\nbody: {}",
            String::from_utf8_lossy(&body)
        );
        if status >= 400 {
            let v: Value = serde_json::from_str(&text).map_err(|e| {
                TestCaseError::fail(format!("{method} {path} {status}: not JSON ({e}): {text}"))
            })?;
            prop_assert!(v["error"].is_string(), "{method} {path} {status}: {text}");
        }
        Ok(())
    });
    result.unwrap();

    // Still serving, the real machine untouched or consistently changed,
    // and no machine directory without a machine.
    // The fuzzer may have deleted the app (an encoded "fuzz" in a DELETE):
    // then none of its machines may be left.
    let (status, machines) = rt.block_on(h.get("/v1/apps/fuzz/machines?include_deleted=true"));
    let known: Vec<String> = match status {
        200 => machines
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect(),
        404 => Vec::new(),
        other => panic!("listing machines answered {other}: {machines}"),
    };
    for entry in std::fs::read_dir(h.data_dir.join("machines"))
        .unwrap()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            known.contains(&name),
            "machine dir {name} without a machine"
        );
    }
    drop(h);
}
