//! The proxy's configuration: where it listens (and which public
//! [`Listener`] is which), which region it reports, and
//! the timeouts and pool sizes of its upstream client.

use hangar_api::Region;
use serde::Deserialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Configuration of the edge proxy, loaded once at start.
///
/// Every field has a default, so an empty `[proxy]` table is a working dev
/// setup. [`ProxyConfig::validate`] lists every problem at once.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Plain-text listener (HTTP/1.1 and h2c). Port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// TLS listener (HTTP/1.1 and h2 by ALPN). Port 0 picks a free port.
    pub https_addr: SocketAddr,
    /// The region this proxy runs in, sent upstream as `Fly-Region` and used
    /// as the suffix of request ids.
    pub region: Region,
    /// How long a TCP connect to a machine may take before the request fails
    /// with 502.
    pub connect_timeout_ms: u64,
    /// Idle keep-alive connections kept per machine address.
    pub max_idle_per_machine: usize,
    /// How long an idle upstream connection stays in the pool.
    pub idle_timeout_ms: u64,
    /// How long a client may take to finish the TLS handshake; bounds what a
    /// silent client can hold (including the shutdown drain).
    pub handshake_timeout_ms: u64,
    /// Worker threads serving connections, each a single-threaded runtime;
    /// 0 means one per CPU.
    pub workers: usize,
    /// Machines tried per request when connecting fails (refused, timed
    /// out); at least 1.
    pub max_attempts: usize,
    /// How long a machine may take to send its response head before the
    /// request fails with 504.
    pub response_timeout_ms: u64,
    /// Requests of one app that may wait for a slot while every machine is
    /// at its hard limit; 0 answers 503 at once.
    pub queue_max_per_app: usize,
    /// How long a request waits for a slot before 503 with `Retry-After`.
    pub queue_timeout_ms: u64,
    /// How long a client may take to send a whole request head; also how
    /// long an HTTP/1 keep-alive connection may sit idle.
    pub header_timeout_ms: u64,
    /// Largest request head accepted (431 beyond); at least 8192.
    pub max_header_bytes: usize,
    /// On shutdown (SIGTERM), how long requests in flight may take to
    /// finish after the listeners close; the rest are cut.
    pub drain_ms: u64,
    /// Request bodies up to this size are read whole before the request is
    /// sent, so it can be sent again (a stale keep-alive connection, a
    /// replay); larger ones stream and are never retried.
    pub retry_body_bytes: u64,
    /// Largest request body accepted, else 413 (0: no limit).
    pub max_body_bytes: u64,
    /// Client connections one app may have open at once; past it requests
    /// get 503 (0: no limit).
    pub max_conns_per_app: usize,
    /// Client connections one client address may hold open at once; more
    /// are closed as they come (0: no limit).
    pub max_conns_per_ip: usize,
    /// Longest wait for the next bytes of a request body (as nginx's
    /// `client_body_timeout`); past it the request fails and its connection
    /// closes.
    pub body_timeout_ms: u64,
    /// Request body bytes all requests together may hold in memory while
    /// they are read whole (see `retry_body_bytes`); past it, bodies are
    /// streamed (and not retried) instead of buffered.
    pub max_buffered_body_bytes: u64,
    /// How long a request may wait for a machine the proxy starts for it
    /// (autostart) before 503 with `Retry-After`.
    pub autostart_hold_ms: u64,
    /// Requests of one app that may wait for its machine to start; more
    /// get 503 with `Retry-After` at once.
    pub autostart_max_waiting: usize,
    /// How often the autostop loop looks for idle machines (0: never).
    pub autostop_interval_ms: u64,
    /// How long a lone machine must go without a request to be stopped.
    pub autostop_idle_ms: u64,
    /// How long a machine picked for stopping may take to finish its
    /// requests after being cordoned; busier than that, it is left running.
    pub autostop_drain_ms: u64,
    /// Other regions' proxies, closest first: where a request goes when
    /// this proxy's region has no machine for it (see proxy/DESIGN.md,
    /// Regions).
    pub peers: Vec<Peer>,
}

/// Another region's proxy (`[[proxy.peers]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// The region it serves.
    pub region: Region,
    /// Its HTTP listener.
    pub addr: SocketAddr,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            https_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 8443)),
            region: "dev".parse().expect("a region name"),
            connect_timeout_ms: 2_000,
            max_idle_per_machine: 64,
            idle_timeout_ms: 90_000,
            handshake_timeout_ms: 10_000,
            workers: 0,
            max_attempts: 3,
            response_timeout_ms: 60_000,
            queue_max_per_app: 256,
            queue_timeout_ms: 5_000,
            header_timeout_ms: 10_000,
            max_header_bytes: 32 * 1024,
            drain_ms: 5_000,
            retry_body_bytes: 10 * 1024 * 1024,
            max_body_bytes: 0,
            max_conns_per_app: 10_000,
            max_conns_per_ip: 1_000,
            body_timeout_ms: 60_000,
            max_buffered_body_bytes: 256 << 20,
            autostart_hold_ms: 30_000,
            autostart_max_waiting: 1024,
            autostop_interval_ms: 30_000,
            autostop_idle_ms: 300_000,
            autostop_drain_ms: 10_000,
            peers: Vec::new(),
        }
    }
}

impl ProxyConfig {
    /// Checks the whole config and returns every problem found, each naming
    /// its field.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.http_addr.port() != 0 && self.http_addr == self.https_addr {
            problems.push(format!(
                "proxy.http_addr and proxy.https_addr: both are {}",
                self.http_addr
            ));
        }
        for (field, ms) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("response_timeout_ms", self.response_timeout_ms),
            ("queue_timeout_ms", self.queue_timeout_ms),
            ("header_timeout_ms", self.header_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            ("drain_ms", self.drain_ms),
            ("autostart_hold_ms", self.autostart_hold_ms),
            ("autostop_drain_ms", self.autostop_drain_ms),
        ] {
            if ms == 0 {
                problems.push(format!("proxy.{field}: must be greater than 0"));
            }
        }
        for (i, peer) in self.peers.iter().enumerate() {
            if peer.region == self.region {
                problems.push(format!(
                    "proxy.peers[{i}].region: {:?} is this proxy's own region",
                    peer.region
                ));
            }
            if self.peers[..i].iter().any(|p| p.region == peer.region) {
                problems.push(format!(
                    "proxy.peers[{i}].region: {:?} is listed twice",
                    peer.region
                ));
            }
        }
        if self.max_header_bytes < 8192 {
            problems.push(format!(
                "proxy.max_header_bytes: must be at least 8192, got {}",
                self.max_header_bytes
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The number of worker threads: [`Self::workers`], or one per CPU.
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// [`Self::connect_timeout_ms`] as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// [`Self::idle_timeout_ms`] as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// [`Self::response_timeout_ms`] as a duration.
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }

    /// [`Self::queue_timeout_ms`] as a duration.
    pub fn queue_timeout(&self) -> Duration {
        Duration::from_millis(self.queue_timeout_ms)
    }

    /// [`Self::body_timeout_ms`] as a duration.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    /// [`Self::header_timeout_ms`] as a duration.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    /// [`Self::autostart_hold_ms`] as a duration.
    pub fn autostart_hold(&self) -> Duration {
        Duration::from_millis(self.autostart_hold_ms)
    }

    /// [`Self::autostop_drain_ms`] as a duration.
    pub fn autostop_drain(&self) -> Duration {
        Duration::from_millis(self.autostop_drain_ms)
    }

    /// [`Self::drain_ms`] as a duration.
    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }

    /// [`Self::handshake_timeout_ms`] as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// Which public listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// Plain text: HTTP/1.1 and h2c.
    Http,
    /// TLS: HTTP/1.1 and h2 by ALPN.
    Https,
}

impl Listener {
    /// `http` or `https`: the metric label and `X-Forwarded-Proto`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }

    /// The public port a machine's service declares for this listener
    /// (`services[].ports[].port`), whatever port the proxy really binds.
    pub fn public_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }

    /// A dense index for per-listener arrays.
    pub(crate) fn index(self) -> usize {
        match self {
            Self::Http => 0,
            Self::Https => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_gives_the_documented_defaults() {
        let cfg: ProxyConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(cfg, ProxyConfig::default());
        assert_eq!(cfg.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.https_addr.to_string(), "127.0.0.1:8443");
        assert_eq!(cfg.region.as_str(), "dev");
        assert_eq!(cfg.connect_timeout(), Duration::from_secs(2));
        assert_eq!(cfg.max_idle_per_machine, 64);
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn validate_lists_every_problem() {
        let cfg = ProxyConfig {
            https_addr: "127.0.0.1:8080".parse().unwrap(),
            connect_timeout_ms: 0,
            ..ProxyConfig::default()
        };
        let problems = cfg.validate().unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("proxy.http_addr and proxy.https_addr"));
        assert!(problems[1].starts_with("proxy.connect_timeout_ms"));
    }

    #[test]
    fn a_region_is_a_region_name() {
        // It ends up in header values and metric labels.
        let err = serde_json::from_str::<ProxyConfig>(r#"{"region":"Dev Region"}"#).unwrap_err();
        assert!(err.to_string().contains("is not a region name"), "{err}");
    }

    #[test]
    fn port_zero_on_both_listeners_is_fine() {
        let cfg = ProxyConfig {
            http_addr: "127.0.0.1:0".parse().unwrap(),
            https_addr: "127.0.0.1:0".parse().unwrap(),
            ..ProxyConfig::default()
        };
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<ProxyConfig>(r#"{"http_adr":"127.0.0.1:1"}"#).unwrap_err();
        assert!(err.to_string().contains("http_adr"), "{err}");
    }
}
