//! The proxy's errors: [`ProxyError`] for setting it up, [`PathError`] for
//! one request that could not be served.

use hangar_api::names::AppName;
use http::StatusCode;
use http::header::HeaderName;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Starting the proxy failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration is invalid; one entry per problem.
    #[error("proxy config: {}", .0.join("; "))]
    Config(Vec<String>),
    /// A listener could not be bound.
    #[error("proxy: binding the {listener} listener on {addr}: {source}")]
    Bind {
        /// `http` or `https`.
        listener: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// Why binding failed (in use, permission, ...).
        source: std::io::Error,
    },
    /// The worker threads could not be started.
    #[error("proxy: starting worker threads: {0}")]
    Workers(std::io::Error),
    /// The dev certificate or its directory could not be read or written.
    #[error("proxy: dev certificate {}: {source}", path.display())]
    CertFile {
        /// The file or directory that failed.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("proxy: dev certificate {}: {source}", path.display())]
    CertPem {
        /// The PEM file.
        path: PathBuf,
        /// What is wrong with its contents.
        source: rustls::pki_types::pem::Error,
    },
    /// Generating the dev certificate failed.
    #[error("proxy: generating the dev certificate: {0}")]
    CertGenerate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("proxy: tls config: {0}")]
    Tls(#[from] rustls::Error),
}

/// Who caused a request to fail: decides the log level (what may happen
/// next is [`Again`]'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something the proxy cannot route.
    Client,
    /// The machine could not be reached or broke off the exchange.
    Upstream,
    /// The proxy itself failed.
    Internal,
}

/// One request the proxy answered itself instead of forwarding it.
///
/// Each variant maps to one status in [`PathError::status`]; its `Display`
/// is the one-line body the client sees, so it never includes addresses or
/// error chains meant for operators (those go to the log).
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// The Host header (or h2 authority) is missing or names no app.
    #[error("{0}")]
    BadHost(HostError),
    /// No app of that name is in the FIB.
    #[error("app {0:?} not found")]
    UnknownApp(String),
    /// `<app>.flycast` for an app without a flycast address.
    #[error(
        "app {0:?} has no flycast address (POST /v1/apps/{0}/ip_assignments {{\"type\":\"private_v6\"}})"
    )]
    NoFlycast(String),
    /// `<app>.flycast` on a shared listener without a token of the app's
    /// org: flycast is private to the org.
    #[error(
        "app {0:?} is reachable through flycast only by its own org: send Proxy-Authorization: Bearer <a token of the org>"
    )]
    FlycastPrivate(String),
    /// The app has no machine the proxy may send requests to.
    #[error("app {0:?} has no started machine")]
    NoStartedMachine(String),
    /// The app's started machines are all cordoned or failing checks.
    #[error(
        "app {0:?} has no machine taking traffic: its started machines are cordoned or failing their service checks"
    )]
    NoHealthyMachine(String),
    /// This proxy's region has no candidate (regional catalog), but other
    /// regions do: the request goes to one of their proxies when a peer
    /// is configured for them (`proxy.peers`), else this is the answer.
    #[error(
        "app {app:?} has no machine taking traffic in region {region}; it has in {}",
        elsewhere.join(", ")
    )]
    OnlyElsewhere {
        /// The app.
        app: String,
        /// This proxy's region.
        region: String,
        /// The regions with routable machines, the most capacity first.
        elsewhere: Vec<String>,
    },
    /// The app's started machines expose no HTTP service.
    #[error("app {0:?} has no started machine with an http service")]
    NoHttpService(String),
    /// The chosen machine could not be reached, or failed mid-exchange.
    #[error("{}", upstream_message(.machine, .failed, .again))]
    Upstream {
        /// The machine's id (shown to the client).
        machine: String,
        /// The machine's private address (logged only).
        addr: SocketAddr,
        /// How the attempt failed.
        failed: Failed,
        /// The underlying error chain, for the log.
        cause: String,
        /// What the failure allows next.
        again: Again,
    },
    /// The request body is larger than the proxy accepts.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge {
        /// `proxy.max_body_bytes`.
        limit: u64,
    },
    /// The app had no machine up, and starting one failed or took longer
    /// than the hold timeout.
    #[error("app {app:?} has no machine up, and starting machine {machine} failed: {reason}")]
    StartFailed {
        /// The app.
        app: String,
        /// The machine the proxy tried to start.
        machine: String,
        /// Why (flyd's answer, or the hold timeout).
        reason: String,
    },
    /// `fly-force-instance-id` (or a `fly-replay`) names a machine the
    /// app does not have.
    #[error("app {app:?} has no machine {machine:?} ({by})")]
    NoSuchMachine {
        /// The app.
        app: String,
        /// The machine asked for.
        machine: String,
        /// The header that asked.
        by: &'static str,
    },
    /// `fly-force-region` (or a `fly-replay`) names regions where the app
    /// has no machine.
    #[error("app {app:?} has no machine in region {region:?} ({by})")]
    NotInRegion {
        /// The app.
        app: String,
        /// The region (or regions) asked for.
        region: String,
        /// The header that asked.
        by: &'static str,
    },
    /// A machine answered with a `fly-replay` the proxy cannot follow.
    #[error("machine {machine} asked for a replay the proxy cannot follow: {reason}")]
    BadReplay {
        /// The machine that answered.
        machine: String,
        /// What is wrong with its `fly-replay`.
        reason: String,
    },
    /// The request was replayed as often as allowed, and a machine asked
    /// for one more.
    #[error("machine {machine} asked to replay a request already replayed {limit} times")]
    TooManyReplays {
        /// The machine that asked last.
        machine: String,
        /// At most 10 replays (`replay::MAX_REPLAYS`).
        limit: usize,
    },
    /// A machine asked for a replay of a request whose body was streamed.
    #[error(
        "machine {machine} asked for a replay, but the request body was larger than {limit} bytes and was streamed"
    )]
    ReplayTooLarge {
        /// The machine that asked.
        machine: String,
        /// `proxy.retry_body_bytes`.
        limit: u64,
    },
    /// A replay's `timeout` passed before a machine could take the request.
    #[error("the replay found no machine to take the request within {after:?}")]
    ReplayTimedOut {
        /// The replay's `timeout`.
        after: Duration,
    },
    /// The app already has `proxy.max_conns_per_app` client connections.
    #[error("app {app:?} has too many open connections (limit {limit})")]
    TooManyConnections {
        /// The app.
        app: String,
        /// The limit.
        limit: usize,
    },
    /// The client's request body could not be read.
    #[error("could not read the request body")]
    BodyRead(String),
    /// The client stopped sending its request body (`body_timeout_ms`).
    #[error("no more of the request body came within {after:?}")]
    BodyStalled {
        /// `proxy.body_timeout_ms`.
        after: std::time::Duration,
    },
    /// Every machine of the app is at its hard limit, and no slot came free
    /// in time (or the app's queue is full).
    #[error("{}", at_capacity_message(.app, .reason))]
    AtCapacity {
        /// The app.
        app: String,
        /// Why the request stopped waiting.
        reason: QueueError,
    },
    /// The machine took the request but sent no response head in time.
    #[error("machine {machine} did not answer within {after:?}")]
    UpstreamTimeout {
        /// The machine's id.
        machine: String,
        /// The response timeout.
        after: Duration,
    },
    /// The proxy failed to build the upstream request.
    #[error("internal proxy error")]
    Internal(String),
}

fn at_capacity_message(app: &str, reason: &QueueError) -> String {
    match reason {
        QueueError::Full => format!(
            "app {app:?} is at capacity: every machine is at its hard limit and the queue is full"
        ),
        QueueError::TimedOut(after) => format!(
            "app {app:?} is at capacity: every machine stayed at its hard limit for {after:?}"
        ),
    }
}

fn upstream_message(machine: &str, failed: &Failed, again: &Again) -> String {
    match (failed, again) {
        (Failed::Connect, _) => format!("could not connect to machine {machine}"),
        (_, Again::No(Some(why))) => {
            format!("machine {machine} did not answer (not retried: {why})")
        }
        _ => format!("machine {machine} did not answer"),
    }
}

/// How an attempt to deliver a request (or a connection) to a machine or
/// a peer failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// No connection (refused, unreachable, timed out): nothing left.
    Connect,
    /// The connection broke under the request before any answer. `fresh`:
    /// it was a new connection, so the other side is not merely closing
    /// idle connections; it is going away, or drops what it takes.
    Broken {
        /// The connection was new.
        fresh: bool,
    },
    /// The exchange failed after the request was (maybe) taken.
    Exchange,
}

/// What a failure allows next: where the request (or connection) may go
/// again, if anywhere. Decided once, where the failure is seen
/// ([`Again::after`]), and obeyed alike by every hop: requests to
/// machines, raw TCP connections, requests to another region's proxy
/// (pingora's `Error::retry` is the model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Again {
    /// Nowhere: it may have been acted on, or cannot be sent as it was;
    /// why, when the client should be told.
    No(Option<String>),
    /// To another machine: this one never saw it (the connection was
    /// refused), or a new connection to it broke before any answer (a
    /// machine going away). Once the catalog shows this one down, it may
    /// be started for the request.
    OtherMachine,
    /// To the same machine on a new connection: a pooled connection the
    /// machine had closed broke under it before any answer.
    NewConnection,
    /// To another region's proxy: this region has no machine for it.
    OtherRegion,
}

impl Again {
    /// What an attempt that `failed` allows, `resend` saying whether the
    /// request can be sent again as it was ([`Again::resend`]).
    pub fn after(failed: Failed, resend: Result<(), String>) -> Self {
        match (failed, resend) {
            // Nothing left: whatever the request, it can go elsewhere.
            (Failed::Connect, _) => Self::OtherMachine,
            (Failed::Broken { fresh: true }, Ok(())) => Self::OtherMachine,
            (Failed::Broken { fresh: false }, Ok(())) => Self::NewConnection,
            (Failed::Exchange, Ok(())) => Self::No(None),
            (_, Err(why)) => Self::No(Some(why)),
        }
    }

    /// Whether an HTTP request can be sent again once it may have reached
    /// a machine: only when it is idempotent and its body was read whole
    /// (`buffered`; bodies over `keep` bytes stream), else why not.
    pub fn resend(method: &http::Method, buffered: bool, keep: u64) -> Result<(), String> {
        if !buffered {
            Err(format!(
                "the request body was larger than {keep} bytes and was streamed"
            ))
        } else if !method.is_idempotent() {
            Err(format!("{method} is not idempotent"))
        } else {
            Ok(())
        }
    }
}

impl PathError {
    /// The status the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadHost(_) | Self::BodyRead(_) => StatusCode::BAD_REQUEST,
            Self::BodyStalled { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge { .. } | Self::ReplayTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::UnknownApp(_) | Self::NoFlycast(_) | Self::NoSuchMachine { .. } => {
                StatusCode::NOT_FOUND
            }
            Self::FlycastPrivate(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Self::NotInRegion { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::NoStartedMachine(_)
            | Self::NoHealthyMachine(_)
            | Self::NoHttpService(_)
            | Self::OnlyElsewhere { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::AtCapacity { .. }
            | Self::TooManyConnections { .. }
            | Self::StartFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream { .. } | Self::BadReplay { .. } | Self::TooManyReplays { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout { .. } | Self::ReplayTimedOut { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The error's code, sent in `fly-proxy-error` and logged. Codes follow
    /// the categories of Fly's (second letter: Edge, App, Routing,
    /// Connection, Upstream, Proxy-internal); `PC01`, `PU02` and `PU04`
    /// mean what they mean on Fly, the others are Hangar's own numbering.
    /// `PE05` (a request head not whole in time, 408), `PE06` (a malformed
    /// head, 400) and `PE07` (a head too large, 431) are answered by the
    /// HTTP/1 server (`listening::server`), before there is a request to
    /// route.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadHost(_) => "PE01",
            Self::BodyTooLarge { .. } => "PE02",
            Self::BodyRead(_) => "PE03",
            Self::BodyStalled { .. } => "PE08",
            Self::TooManyConnections { .. } => "PE04",
            Self::StartFailed { .. } => "PM01",
            Self::UnknownApp(_) => "PA01",
            Self::NoFlycast(_) => "PA02",
            Self::FlycastPrivate(_) => "PA03",
            Self::NoStartedMachine(_) => "PR01",
            Self::NoHealthyMachine(_) => "PR02",
            Self::NoHttpService(_) => "PR03",
            Self::AtCapacity { .. } => "PR04",
            Self::OnlyElsewhere { .. } => "PR05",
            Self::NoSuchMachine { .. } => "PR06",
            Self::NotInRegion { .. } => "PR07",
            Self::BadReplay { .. } => "PR08",
            Self::TooManyReplays { .. } => "PR09",
            Self::ReplayTooLarge { .. } => "PR10",
            Self::ReplayTimedOut { .. } => "PR11",
            Self::Upstream {
                failed: Failed::Connect,
                ..
            } => "PC01",
            Self::Upstream { .. } => "PU02",
            Self::UpstreamTimeout { .. } => "PU05",
            Self::Internal(_) => "PU04",
        }
    }

    /// Seconds a client should wait before trying again, for errors that
    /// pass on their own.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            Self::AtCapacity { .. }
            | Self::TooManyConnections { .. }
            | Self::StartFailed { .. } => Some(1),
            _ => None,
        }
    }

    /// Who caused the failure.
    pub fn side(&self) -> Side {
        match self {
            Self::BadHost(_)
            | Self::UnknownApp(_)
            | Self::NoFlycast(_)
            | Self::FlycastPrivate(_)
            | Self::NoSuchMachine { .. }
            | Self::NotInRegion { .. }
            | Self::BodyTooLarge { .. }
            | Self::BodyRead(_)
            | Self::BodyStalled { .. }
            | Self::TooManyConnections { .. } => Side::Client,
            // No capacity is an operator concern, like an unreachable machine.
            Self::NoStartedMachine(_)
            | Self::NoHealthyMachine(_)
            | Self::NoHttpService(_)
            | Self::OnlyElsewhere { .. }
            | Self::AtCapacity { .. }
            | Self::StartFailed { .. }
            | Self::Upstream { .. }
            | Self::UpstreamTimeout { .. }
            | Self::BadReplay { .. }
            | Self::TooManyReplays { .. }
            | Self::ReplayTooLarge { .. }
            | Self::ReplayTimedOut { .. } => Side::Upstream,
            Self::Internal(_) => Side::Internal,
        }
    }

    /// A machine or peer failed the request: `failed` how; `resend`
    /// whether the request could go again as it was (see [`Again::after`]
    /// for what the two allow).
    pub fn upstream(
        (machine, addr): (&str, SocketAddr),
        failed: Failed,
        cause: String,
        resend: Result<(), String>,
    ) -> Self {
        Self::Upstream {
            machine: machine.to_string(),
            addr,
            failed,
            cause,
            again: Again::after(failed, resend),
        }
    }

    /// What the failure allows next: another machine or a new connection
    /// for what a machine failed, another region for an app with nothing
    /// here, nothing for the rest.
    pub fn again(&self) -> Again {
        match self {
            Self::Upstream { again, .. } => again.clone(),
            Self::OnlyElsewhere { .. } | Self::NoStartedMachine(_) | Self::NoHealthyMachine(_) => {
                Again::OtherRegion
            }
            _ => Again::No(None),
        }
    }

    /// Whether the request failed before reaching any machine: the errors
    /// that send a replay with a `fallback` back to the machine that asked.
    pub fn reached_no_machine(&self) -> bool {
        matches!(
            self,
            Self::UnknownApp(_)
                | Self::NoStartedMachine(_)
                | Self::NoHealthyMachine(_)
                | Self::OnlyElsewhere { .. }
                | Self::NoHttpService(_)
                | Self::StartFailed { .. }
                | Self::NoSuchMachine { .. }
                | Self::NotInRegion { .. }
                | Self::AtCapacity { .. }
                | Self::ReplayTimedOut { .. }
                | Self::Upstream {
                    failed: Failed::Connect,
                    ..
                }
        )
    }

    /// Operator detail beyond the client-facing message, for the log.
    pub fn detail(&self) -> Option<String> {
        match self {
            Self::Upstream { addr, cause, .. } => Some(format!("{addr}: {cause}")),
            Self::Internal(cause) | Self::BodyRead(cause) => Some(cause.clone()),
            _ => None,
        }
    }
}

/// On the proxy's own error responses: the error's code (`PR04`, ...).
pub(crate) const FLY_PROXY_ERROR: HeaderName = HeaderName::from_static("fly-proxy-error");

/// Why a request's host names no app. Its `Display` is the client's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostError {
    /// No `Host` header and no URI authority.
    Missing,
    /// The host is not visible ASCII.
    NotText,
    /// The host is not `name[:port]`.
    Malformed(String),
    /// The host is well-formed but not `<app>.localhost`.
    NotAnApp(String),
    /// The label before `.localhost` is not a valid app name.
    BadAppName(String),
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("missing Host header"),
            Self::NotText => f.write_str("Host header is not valid text"),
            Self::Malformed(host) => write!(f, "malformed Host {host:?}"),
            Self::NotAnApp(host) => {
                write!(f, "Host {host:?} is not <app>.localhost or <app>.flycast")
            }
            Self::BadAppName(name) => write!(f, "{name:?} is not {}", AppName::RULE),
        }
    }
}

impl std::error::Error for HostError {}

/// Why a request stopped waiting in its app's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The app already has `max_per_app` requests waiting.
    Full,
    /// No slot came free within the timeout.
    TimedOut(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_can_cross_threads() {
        // The binary wraps them in anyhow and moves them between tasks.
        fn check<T: std::error::Error + Send + Sync + 'static>() {}
        check::<ProxyError>();
        check::<PathError>();
    }

    #[test]
    fn upstream_errors_hide_the_address_from_the_client() {
        let e = PathError::upstream(
            ("m1", "127.10.0.2:8080".parse().unwrap()),
            Failed::Connect,
            "Connection refused".into(),
            Ok(()),
        );
        assert_eq!(e.to_string(), "could not connect to machine m1");
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(e.again(), Again::OtherMachine);
        assert_eq!(e.detail().unwrap(), "127.10.0.2:8080: Connection refused");
    }

    #[test]
    fn what_a_failure_allows_next() {
        use http::Method;
        let safe = Again::resend(&Method::GET, true, 10);
        assert_eq!(safe, Ok(()));
        let streamed = Again::resend(&Method::GET, false, 10).unwrap_err();
        let post = Again::resend(&Method::POST, true, 10).unwrap_err();
        assert_eq!(post, "POST is not idempotent");
        // Refused: nothing left, so anything may go elsewhere.
        let refused = Again::after(Failed::Connect, Err(post.clone()));
        assert_eq!(refused, Again::OtherMachine);
        // A pooled connection the machine closed: the same machine again.
        let closed = Again::after(Failed::Broken { fresh: false }, safe.clone());
        assert_eq!(closed, Again::NewConnection);
        // A new connection broke: the machine is going away.
        let going = Again::after(Failed::Broken { fresh: true }, safe.clone());
        assert_eq!(going, Again::OtherMachine);
        // What may have been acted on goes nowhere, and says why.
        let broken_post = Again::after(Failed::Broken { fresh: false }, Err(post.clone()));
        assert_eq!(broken_post, Again::No(Some(post)));
        assert_eq!(
            Again::after(Failed::Exchange, Err(streamed.clone())),
            Again::No(Some(streamed))
        );
        assert_eq!(Again::after(Failed::Exchange, safe), Again::No(None));
        assert_eq!(
            PathError::NoStartedMachine("a".into()).again(),
            Again::OtherRegion
        );
        assert_eq!(PathError::UnknownApp("a".into()).again(), Again::No(None));
    }
}
