//! A flyd host that is down: calls fail with a clear 503 and change
//! nothing. (They fail fast by construction: a refused connection at once,
//! a silent host after the client's 2 s connect timeout.)

use hangar_catalog::{AppRow, HostCapacity, HostRow, Rib, SecretBox};
use hangar_flaps::{Flaps, FlapsConfig, auth, router};
use std::sync::Arc;

#[tokio::test]
async fn a_host_that_is_down_answers_503_fast_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
    let token = auth::dev_token(&rib, "personal", &dir.path().join("token")).unwrap();
    rib.create_app(&AppRow {
        name: "app".into(),
        id: "a1".into(),
        org_slug: "personal".into(),
        network: "default".into(),
        created_at: 0,
    })
    .unwrap();
    // A port nothing listens on.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    rib.upsert_host(&HostRow {
        id: "h1".into(),
        region: "dev".into(),
        address: dead.to_string(),
        updated_at: 0,
        capacity: HostCapacity {
            cpus: 16,
            memory_mb: 4096,
            ..Default::default()
        },
    })
    .unwrap();
    let secrets = Arc::new(SecretBox::load_or_create(&dir.path().join("secrets.key")).unwrap());
    let cluster =
        hangar_catalog::ClusterKey::load_or_create(&dir.path().join("cluster.key")).unwrap();
    let flaps = Flaps::new(FlapsConfig::default(), rib.clone(), secrets, &cluster);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(flaps)).await });

    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/v1/apps/app/machines"))
        .bearer_auth(&token)
        .body(r#"{"config":{"image":"hangar/echo"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("unreachable"),
        "{body}"
    );
    assert!(
        rib.machines_of_app("app").unwrap().is_empty(),
        "nothing recorded"
    );
}
