//! Connections to an app's own address on a port without the `http`
//! handler: bytes go to a machine as they are, after TLS termination with
//! `tls` and a PROXY protocol header with `proxy_proto`.
//!
//! accept → [tls] → slot (queue, autostart) → connect (retry) → [PROXY
//! header] → copy
//!
//! The slot is taken as for HTTP ([`Slots::take`]): a connection holds one
//! unit of the machine's load for as long as it is open.

use super::upstream::Upstreams;
use crate::error::{Again, Failed, PathError};
use crate::metrics::EdgeMetrics;
use crate::routing::balance::{Target, Want};
use crate::routing::steer::Steer;
use crate::scaling::slot::Slots;
use compact_str::CompactString;
use hangar_api::machine::MachinePort;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which PROXY protocol header goes first to the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProxyProto {
    V1,
    V2,
}

impl ProxyProto {
    /// The port's choice: none without the `proxy_proto` handler, else
    /// `proxy_proto_options.version` (`v1` unless it says `v2`).
    pub(crate) fn of(port: &MachinePort) -> Option<Self> {
        if !port.handlers.iter().any(|h| h == "proxy_proto") {
            return None;
        }
        let v2 = port
            .proxy_proto_options
            .as_ref()
            .and_then(|o| o.version.as_deref())
            == Some("v2");
        Some(if v2 { Self::V2 } else { Self::V1 })
    }

    /// The header for a connection from `client` to `server` (the address
    /// the client connected to).
    pub(crate) fn header(self, client: SocketAddr, server: SocketAddr) -> Vec<u8> {
        let (client, server) = (canonical(client), canonical(server));
        match self {
            Self::V1 => {
                let family = if client.is_ipv4() && server.is_ipv4() {
                    "TCP4"
                } else {
                    "TCP6"
                };
                format!(
                    "PROXY {family} {} {} {} {}\r\n",
                    client.ip(),
                    server.ip(),
                    client.port(),
                    server.port()
                )
                .into_bytes()
            }
            Self::V2 => {
                let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
                out.push(0x21); // version 2, PROXY command
                match (client, server) {
                    (SocketAddr::V4(c), SocketAddr::V4(s)) => {
                        out.push(0x11); // TCP over IPv4
                        out.extend_from_slice(&12u16.to_be_bytes());
                        out.extend_from_slice(&c.ip().octets());
                        out.extend_from_slice(&s.ip().octets());
                        out.extend_from_slice(&c.port().to_be_bytes());
                        out.extend_from_slice(&s.port().to_be_bytes());
                    }
                    (c, s) => {
                        out.push(0x21); // TCP over IPv6
                        out.extend_from_slice(&36u16.to_be_bytes());
                        out.extend_from_slice(&v6(c.ip()).octets());
                        out.extend_from_slice(&v6(s.ip()).octets());
                        out.extend_from_slice(&c.port().to_be_bytes());
                        out.extend_from_slice(&s.port().to_be_bytes());
                    }
                }
                out
            }
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn v6(ip: std::net::IpAddr) -> std::net::Ipv6Addr {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    }
}

/// What relaying a connection needs of the edge.
pub(crate) struct Relay<'a> {
    pub slots: &'a Slots,
    pub upstreams: &'a Upstreams,
    /// Machines tried per connection when connects fail.
    pub max_attempts: usize,
    pub metrics: &'a EdgeMetrics,
}

impl Relay<'_> {
    /// Carries one client connection (already past TLS when the port says
    /// so) to a machine of `app` serving the public port it came in on
    /// (`local`'s), until either side closes. The slot is taken as a
    /// request's ([`Slots::take`]: the queue, autostart); a machine that
    /// refuses the connection is replaced by another, at most
    /// `max_attempts` machines in all.
    pub(crate) async fn run<C>(&self, mut client: C, peer: SocketAddr, local: SocketAddr, app: &str)
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let want = Want::Port(local.port());
        let mut refused: Vec<CompactString> = Vec::new();
        let (target, _lease, mut machine) = loop {
            let Some(routes) = self.slots.fib.lookup(app) else {
                tracing::debug!(app, %local, "tcp: the app is gone");
                return;
            };
            let (target, lease) = match self
                .slots
                .take(&routes, want, &Steer::default(), &refused)
                .await
            {
                Ok(slot) => slot,
                Err(error) => {
                    tracing::info!(app, %local, %error, "tcp: no machine for the connection; closing");
                    return;
                }
            };
            let error = match self.connect(&target).await {
                Ok(machine) => break (target, lease, machine),
                Err(error) => error,
            };
            // What the failure allows, as for a request.
            match error.again() {
                Again::OtherMachine if refused.len() + 1 < self.max_attempts => {
                    tracing::debug!(app, %error, detail = ?error.detail(), "tcp: trying another machine");
                    self.metrics.retries.inc();
                    refused.push(target.machine().id.clone());
                }
                _ => {
                    tracing::warn!(app, %error, detail = ?error.detail(), "tcp: machine unreachable; closing");
                    return;
                }
            }
        };
        if let Some(proto) = target.port().and_then(ProxyProto::of)
            && let Err(e) = machine.write_all(&proto.header(peer, local)).await
        {
            tracing::debug!(app, error = %e, "tcp: writing the PROXY header");
            return;
        }
        match tokio::io::copy_bidirectional(&mut client, &mut machine).await {
            Ok((up, down)) => {
                tracing::debug!(app, machine = %target.machine().id, up, down, "tcp: closed")
            }
            Err(e) => tracing::debug!(app, error = %e, "tcp: ended with an error"),
        }
    }

    async fn connect(&self, target: &Target) -> Result<TcpStream, PathError> {
        let addr = SocketAddr::new(target.machine().private_ip, target.internal_port());
        // Nothing of the client's was sent: it may go anywhere.
        let machine = (target.machine().id.as_str(), addr);
        self.upstreams
            .dial(addr)
            .await
            .map_err(|cause| PathError::upstream(machine, Failed::Connect, cause, Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_headers_name_both_ends() {
        let client: SocketAddr = "10.1.2.3:51000".parse().unwrap();
        let server: SocketAddr = "127.30.0.7:5432".parse().unwrap();
        assert_eq!(
            ProxyProto::V1.header(client, server),
            b"PROXY TCP4 10.1.2.3 127.30.0.7 51000 5432\r\n"
        );
        let v2 = ProxyProto::V2.header(client, server);
        assert_eq!(&v2[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(&v2[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&v2[16..20], &[10, 1, 2, 3]);
        assert_eq!(&v2[20..24], &[127, 30, 0, 7]);
        assert_eq!(&v2[24..28], &[0xc7, 0x38, 0x15, 0x38]);
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:1".parse().unwrap();
        assert!(
            ProxyProto::V1
                .header(mapped, server)
                .starts_with(b"PROXY TCP4 10.1.2.3 ")
        );
        let six: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(ProxyProto::V2.header(six, server)[13], 0x21);
    }

    #[test]
    fn the_handler_and_options_pick_the_version() {
        let mut port = MachinePort {
            port: Some(5432),
            ..MachinePort::default()
        };
        assert_eq!(ProxyProto::of(&port), None);
        port.handlers = vec!["proxy_proto".into()];
        assert_eq!(ProxyProto::of(&port), Some(ProxyProto::V1));
        port.proxy_proto_options = Some(hangar_api::machine::ProxyProtoOptions {
            version: Some("v2".into()),
            ..Default::default()
        });
        assert_eq!(ProxyProto::of(&port), Some(ProxyProto::V2));
    }
}
