//! Health checks: flyd runs a machine's checks while it is started and
//! reports each one's latest result in `machine.checks`. Service checks
//! (`services[].checks`) also decide the RIB row's `healthy` flag, so the
//! proxy routes around a machine whose service checks fail; machine-level
//! checks (`config.checks`) are reported only.
//!
//! Each check runs in its own task, first after its grace period, then every
//! interval, until the machine stops being the run it was started for (its
//! state leaves `started` or its pilot changes). Results are saved only when
//! they change.

use crate::flyd::{Flyd, FlydError};
use crate::record::now_rfc3339;
use bytes::Bytes;
use hangar_api::machine::{CheckStatus, MachineCheck, MachineConfig, MachineState};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Name prefix of service checks; their results gate routing.
pub const SERVICE_CHECK_PREFIX: &str = "servicecheck-";
const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Shortest interval honoured, so a typo cannot make a check spin.
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// A check as flyd runs it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CheckSpec {
    pub name: String,
    pub http: bool,
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    pub grace: Duration,
    pub method: String,
    pub path: String,
}

fn spec(name: String, c: &MachineCheck, default_port: u16) -> CheckSpec {
    CheckSpec {
        name,
        http: c.kind.as_deref() == Some("http"),
        port: c.port.unwrap_or(default_port),
        interval: c
            .interval
            .map(|d| d.0)
            .unwrap_or(DEFAULT_INTERVAL)
            .max(MIN_INTERVAL),
        timeout: c.timeout.map(|d| d.0).unwrap_or(DEFAULT_TIMEOUT),
        grace: c.grace_period.map(|d| d.0).unwrap_or_default(),
        method: c
            .method
            .clone()
            .unwrap_or_else(|| "GET".into())
            .to_ascii_uppercase(),
        path: c.path.clone().unwrap_or_else(|| "/".into()),
    }
}

/// Every check of a config: service checks named
/// `servicecheck-<service>-<type>-<port>` (with `-<n>` for a second one of
/// the same kind), then machine checks by their own names.
pub(crate) fn check_specs(config: &MachineConfig) -> Vec<CheckSpec> {
    let mut out = Vec::new();
    for (i, svc) in config.services.iter().enumerate() {
        for (j, c) in svc.checks.iter().enumerate() {
            let kind = c.kind.as_deref().unwrap_or("tcp");
            let port = c.port.unwrap_or(svc.internal_port);
            let mut name = format!("{SERVICE_CHECK_PREFIX}{i:02}-{kind}-{port}");
            if j > 0 {
                name.push_str(&format!("-{j}"));
            }
            out.push(spec(name, c, svc.internal_port));
        }
    }
    for (name, c) in &config.checks {
        out.push(spec(name.clone(), c, 0));
    }
    out
}

/// The results a machine starts with: every check `warning`, not run yet.
pub(crate) fn initial_statuses(config: &MachineConfig) -> Vec<CheckStatus> {
    check_specs(config)
        .into_iter()
        .map(|s| CheckStatus {
            name: s.name,
            status: "warning".into(),
            output: "not checked yet".into(),
            updated_at: now_rfc3339(),
        })
        .collect()
}

/// Whether every service check passes (true without any).
pub(crate) fn services_healthy(checks: &[CheckStatus]) -> bool {
    checks
        .iter()
        .filter(|c| c.name.starts_with(SERVICE_CHECK_PREFIX))
        .all(|c| c.status == "passing")
}

/// Runs one check once: `passing` or `critical`, with a one-line output.
pub(crate) async fn run_check(ip: IpAddr, spec: &CheckSpec) -> (&'static str, String) {
    let addr = SocketAddr::new(ip, spec.port);
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        if !spec.http {
            return Ok("connection established".to_string());
        }
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake: {e}"))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(spec.method.as_str())
            .uri(spec.path.as_str())
            .header("host", addr.to_string())
            .header("user-agent", "hangar-flyd/healthcheck")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("bad check request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{} {}: {e}", spec.method, spec.path))?;
        let status = resp.status();
        if status.is_success() || status.is_redirection() {
            Ok(format!("HTTP {status}"))
        } else {
            Err(format!("HTTP {status}"))
        }
    };
    match tokio::time::timeout(spec.timeout, attempt).await {
        Ok(Ok(output)) => ("passing", output),
        Ok(Err(output)) => ("critical", output),
        Err(_) => ("critical", format!("timed out after {:?}", spec.timeout)),
    }
}

impl Flyd {
    /// Starts the checks of the run whose pilot is `pilot_pid`.
    pub(crate) fn watch_checks(
        self: &Arc<Self>,
        id: &str,
        pilot_pid: Option<u32>,
    ) -> Result<(), FlydError> {
        let rec = self.record(id)?;
        let Ok(ip) = rec.private_ip.parse::<IpAddr>() else {
            return Ok(());
        };
        for spec in check_specs(&rec.config) {
            let flyd = self.clone();
            let id = id.to_string();
            tokio::spawn(async move {
                tokio::time::sleep(spec.grace).await;
                loop {
                    let (status, output) = run_check(ip, &spec).await;
                    match flyd
                        .record_check(&id, pilot_pid, &spec.name, status, output)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            tracing::warn!(machine = %id, check = %spec.name, error = %e, "recording a check")
                        }
                    }
                    tokio::time::sleep(spec.interval).await;
                }
            });
        }
        Ok(())
    }

    /// Saves a check result if it changed. False when the machine is no
    /// longer the run the check belongs to (the check should end).
    async fn record_check(
        &self,
        id: &str,
        pilot_pid: Option<u32>,
        name: &str,
        status: &str,
        output: String,
    ) -> Result<bool, FlydError> {
        let _guard = match self.lock_machine(id).await {
            Ok(guard) => guard,
            // An operation is in progress; report at the next round.
            Err(FlydError::Busy(_)) => return Ok(true),
            Err(e) => return Err(e),
        };
        let mut rec = match self.record(id) {
            Ok(rec) => rec,
            Err(FlydError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        if rec.state != MachineState::Started || rec.pilot_pid != pilot_pid {
            return Ok(false);
        }
        let Some(entry) = rec.checks.iter_mut().find(|c| c.name == name) else {
            return Ok(false);
        };
        if entry.status == status && entry.output == output {
            return Ok(true);
        }
        if entry.status != status {
            tracing::info!(machine = %id, check = name, status, %output, "check changed");
        }
        entry.status = status.to_string();
        entry.output = output;
        entry.updated_at = now_rfc3339();
        self.save(&mut rec)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_checks_are_named_and_gate_health() {
        let config: MachineConfig = serde_json::from_str(
            r#"{"image":"x","services":[{"internal_port":8080,"checks":[
                 {"type":"http","path":"/healthz","interval":"1s"},{"type":"tcp"}]}],
               "checks":{"db":{"type":"tcp","port":5432}}}"#,
        )
        .unwrap();
        let specs = check_specs(&config);
        let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "servicecheck-00-http-8080",
                "servicecheck-00-tcp-8080-1",
                "db"
            ]
        );
        assert_eq!(specs[0].interval, Duration::from_secs(1));
        assert_eq!(specs[0].path, "/healthz");
        assert_eq!(specs[2].port, 5432);
        let mut statuses = initial_statuses(&config);
        assert!(!services_healthy(&statuses), "unchecked is not healthy");
        for s in statuses.iter_mut().take(2) {
            s.status = "passing".into();
        }
        assert!(
            services_healthy(&statuses),
            "machine checks do not gate routing"
        );
        assert!(services_healthy(&[]));
    }

    #[tokio::test]
    async fn tcp_and_http_checks_pass_and_fail() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let code = if req.uri().path() == "/ok" { 200 } else { 500 };
                            hyper::Response::builder()
                                .status(code)
                                .body(Empty::<Bytes>::new())
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut s = spec(
            "c".into(),
            &MachineCheck {
                kind: Some("tcp".into()),
                ..Default::default()
            },
            port,
        );
        assert_eq!(run_check(ip, &s).await.0, "passing");
        s.http = true;
        s.path = "/ok".into();
        assert_eq!(run_check(ip, &s).await, ("passing", "HTTP 200 OK".into()));
        s.path = "/bad".into();
        assert_eq!(run_check(ip, &s).await.0, "critical");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        s.port = closed.local_addr().unwrap().port();
        drop(closed);
        assert_eq!(run_check(ip, &s).await.0, "critical");
    }
}
