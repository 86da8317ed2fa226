//! The built-in image `hangar/echo`: a small HTTP server (HTTP/1.1 and h2c)
//! that tells who answered and what it received, so demos, tests and
//! benchmarks need nothing else installed.
//!
//! It binds `FLY_PRIVATE_IP:PORT` and answers every path with JSON naming the
//! machine, app and region and echoing the method, path, query and headers.
//! `?sleep_ms=N` delays the answer; `?bytes=N` answers N bytes instead of
//! JSON; `/healthz` answers `ok`. An HTTP/1.1 upgrade request (WebSocket
//! or any other protocol) gets `101 Switching Protocols` and then every
//! byte echoed back, which is enough to test a proxy's tunnel. SIGINT or
//! SIGTERM ends it gracefully.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Largest body `?bytes=` produces (64 MiB), so a typo cannot exhaust memory.
const MAX_BYTES: usize = 64 << 20;
/// Longest `?sleep_ms=` honoured (10 minutes).
const MAX_SLEEP_MS: u64 = 600_000;

struct Identity {
    machine_id: String,
    app: String,
    region: String,
}

/// Runs the echo server until SIGINT or SIGTERM.
pub async fn run() -> anyhow::Result<()> {
    use anyhow::Context;
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let ip = std::env::var("FLY_PRIVATE_IP").unwrap_or_else(|_| "127.0.0.1".into());
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let addr: SocketAddr = format!("{ip}:{port}")
        .parse()
        .with_context(|| format!("FLY_PRIVATE_IP={ip:?} PORT={port:?} is not an address"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let id = Arc::new(Identity {
        machine_id: env("FLY_MACHINE_ID"),
        app: env("FLY_APP_NAME"),
        region: env("FLY_REGION"),
    });
    eprintln!("echo: listening on {addr}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    eprintln!("echo: accept: {e}");
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        let id = id.clone();
        let service = hyper::service::service_fn(move |req| answer(id.clone(), req));
        let conn = auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
    eprintln!("echo: shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
    Ok(())
}

/// Answers an upgrade with 101 and echoes the upgraded connection's bytes.
fn switch(
    mut req: Request<Incoming>,
    protocol: hyper::header::HeaderValue,
) -> Response<Full<Bytes>> {
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let (mut read, mut write) = tokio::io::split(TokioIo::new(upgraded));
        let _ = tokio::io::copy(&mut read, &mut write).await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, protocol)
        .body(Full::default())
        .expect("static response parts are valid")
}

fn query_param<T: std::str::FromStr>(query: &str, key: &str) -> Option<T> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn answer(
    id: Arc<Identity>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if let Some(protocol) = req.headers().get(hyper::header::UPGRADE).cloned() {
        return Ok(switch(req, protocol));
    }
    let query = req.uri().query().unwrap_or("").to_string();
    if let Some(ms) = query_param::<u64>(&query, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_SLEEP_MS))).await;
    }
    let respond = |status, ctype, body: Bytes| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", ctype)
            .header("fly-machine-id", id.machine_id.as_str())
            .body(Full::new(body))
            .expect("static response parts are valid"))
    };
    if req.uri().path() == "/healthz" {
        return respond(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"));
    }
    if let Some(n) = query_param::<usize>(&query, "bytes") {
        return respond(
            StatusCode::OK,
            "application/octet-stream",
            Bytes::from(vec![b'x'; n.min(MAX_BYTES)]),
        );
    }
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = serde_json::json!({
        "machine_id": id.machine_id,
        "app": id.app,
        "region": id.region,
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": query,
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    let mut text = body.to_string();
    text.push('\n');
    respond(StatusCode::OK, "application/json", Bytes::from(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_parse_or_are_ignored() {
        assert_eq!(query_param::<u64>("a=1&sleep_ms=20", "sleep_ms"), Some(20));
        assert_eq!(query_param::<usize>("bytes=abc", "bytes"), None);
        assert_eq!(query_param::<usize>("", "bytes"), None);
    }
}
