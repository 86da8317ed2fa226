//! The built-in image `hangar/echo`: a small HTTP server (HTTP/1.1 and h2c)
//! that tells who answered and what it received, so demos, tests and
//! benchmarks need nothing else installed.
//!
//! It binds `FLY_PRIVATE_IP:PORT` and answers every path with JSON naming the
//! machine, app and region and echoing the method, path, query and headers.
//! `?sleep_ms=N` delays the answer; `?bytes=N` answers N bytes instead of
//! JSON; `?header=name:value` (repeatable, URL-encoded) adds a response
//! header; `?replay=V` answers with `fly-replay: V` unless the request is
//! itself a replay or a fallback (it has `fly-replay-src` or
//! `fly-replay-failed`), `?replay_always=V` even then; `?drop=ID` closes
//! the connection without an answer when this is machine ID (a machine
//! that drops what it takes); `/healthz` answers `ok`. An HTTP/1.1 upgrade
//! request (WebSocket or any other protocol) gets `101 Switching Protocols`
//! and then every byte echoed back, which is enough to test a proxy's
//! tunnel. A connection that starts with a PROXY protocol header (v1 or v2)
//! has the client address it names reported as `proxy_protocol_source`.
//! SIGINT or SIGTERM ends it gracefully.

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
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let mut stream = stream;
            let source: Option<Arc<str>> = proxy_header(&mut stream).await.ok().flatten();
            let service =
                hyper::service::service_fn(move |req| answer(id.clone(), source.clone(), req));
            let conn = auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            let _ = watcher.watch(conn).await;
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

/// The first value of `key` in a URL-encoded query, parsed.
fn query_param<T: std::str::FromStr>(query: &str, key: &str) -> Option<T> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// The response headers the query asks for: `header=name:value` pairs,
/// and `fly-replay` from `replay` (not on a request that is a replay or
/// a fallback already) or `replay_always`.
fn asked_headers(query: &str, req_headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    let replayed =
        req_headers.contains_key("fly-replay-src") || req_headers.contains_key("fly-replay-failed");
    form_urlencoded::parse(query.as_bytes())
        .filter_map(|(k, v)| match &*k {
            "header" => v
                .split_once(':')
                .map(|(n, v)| (n.trim().to_string(), v.trim().to_string())),
            "replay" if !replayed => Some(("fly-replay".into(), v.into_owned())),
            "replay_always" => Some(("fly-replay".into(), v.into_owned())),
            _ => None,
        })
        .collect()
}

/// Reads the PROXY protocol header (v1 text or v2 binary) a connection may
/// start with, and returns the client address it names.
async fn proxy_header(stream: &mut tokio::net::TcpStream) -> std::io::Result<Option<Arc<str>>> {
    use tokio::io::AsyncReadExt;
    const V2: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
    let mut peeked = [0u8; 16];
    let n = stream.peek(&mut peeked).await?;
    if peeked[..n].starts_with(b"PROXY ") {
        // One line of at most 107 bytes, ending in CRLF.
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") && line.len() < 108 {
            line.push(stream.read_u8().await?);
        }
        let text = String::from_utf8_lossy(&line);
        let fields: Vec<&str> = text.split_whitespace().collect();
        return Ok(match fields.as_slice() {
            ["PROXY", _, src, _, sport, _] => Some(format!("{src}:{sport}").into()),
            _ => None,
        });
    }
    if n == 16 && peeked[..12] == *V2 {
        let mut head = [0u8; 16];
        stream.read_exact(&mut head).await?;
        let mut rest = vec![0u8; usize::from(u16::from_be_bytes([head[14], head[15]]))];
        stream.read_exact(&mut rest).await?;
        return Ok(match (head[13], rest.as_slice()) {
            (0x11, [a, b, c, d, _, _, _, _, p1, p2, ..]) => {
                let port = u16::from_be_bytes([*p1, *p2]);
                Some(format!("{a}.{b}.{c}.{d}:{port}").into())
            }
            _ => None,
        });
    }
    Ok(None)
}

async fn answer(
    id: Arc<Identity>,
    proxied_for: Option<Arc<str>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    if let Some(protocol) = req.headers().get(hyper::header::UPGRADE).cloned() {
        return Ok(switch(req, protocol));
    }
    let query = req.uri().query().unwrap_or("").to_string();
    if query_param::<String>(&query, "drop").is_some_and(|m| m == id.machine_id) {
        // hyper closes a connection whose service fails, unanswered.
        return Err(std::io::Error::other("dropped as asked"));
    }
    if let Some(ms) = query_param::<u64>(&query, "sleep_ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(MAX_SLEEP_MS))).await;
    }
    let asked = asked_headers(&query, req.headers());
    let respond = |status, ctype, body: Bytes| {
        let mut response = Response::builder()
            .status(status)
            .header("content-type", ctype)
            .header("fly-machine-id", id.machine_id.as_str());
        for (name, value) in &asked {
            response = response.header(name, value);
        }
        Ok(response.body(Full::new(body)).unwrap_or_else(|e| {
            let mut bad = Response::new(Full::new(Bytes::from(format!("bad header: {e}\n"))));
            *bad.status_mut() = StatusCode::BAD_REQUEST;
            bad
        }))
    };
    if req.uri().path() == "/healthz" {
        return respond(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n"));
    }
    // A replay answer has nothing to say: the proxy drops it.
    if asked.iter().any(|(name, _)| name == "fly-replay") {
        return respond(StatusCode::OK, "text/plain", Bytes::new());
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
        "proxy_protocol_source": proxied_for.as_deref(),
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

    #[test]
    fn asked_headers_decode_and_replay_only_once() {
        let query = "header=fly-keep-alive-until%3A%201700000000&replay=region%3Dord%3Bstate%3Dx";
        let fresh = hyper::HeaderMap::new();
        assert_eq!(
            asked_headers(query, &fresh),
            [
                ("fly-keep-alive-until".to_string(), "1700000000".to_string()),
                ("fly-replay".to_string(), "region=ord;state=x".to_string()),
            ]
        );
        let mut replayed = hyper::HeaderMap::new();
        replayed.insert("fly-replay-src", "instance=m1".parse().unwrap());
        assert_eq!(asked_headers(query, &replayed).len(), 1);
        assert_eq!(asked_headers("replay_always=app%3Dx", &replayed).len(), 1);
    }
}
