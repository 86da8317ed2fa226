//! `hangar bench handshakes`: new TLS sessions per second.
//!
//! Each of `--conns` clients in a loop connects, makes a full handshake,
//! sends one `Connection: close` request and reads the response to its
//! end. No session is ever resumed, so every handshake is new: key
//! exchange, certificate and its signature (what a server pays for a
//! client it has not seen). wrk cannot measure this: it resumes sessions,
//! and a resumed TLS 1.2 session skips the key exchange altogether.
//!
//! The certificate is not checked against any root (benchmark targets use
//! self-signed ones), but the handshake's signature is verified, as a real
//! client would.

use super::{Tally, Target, percentile};
use anyhow::Context;
use rustls::client::Resumption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// How long past the end of the run a session may still take.
const GRACE: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct HandshakesArgs {
    #[command(flatten)]
    target: Target,
}

pub async fn handshakes(HandshakesArgs { target: args }: HandshakesArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.conns > 0, "--conns must be positive");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(args.host.clone()).context("--host is not a server name")?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        args.path, args.host
    );
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(1);
    let end = measure_from + Duration::from_secs(args.secs);
    let clients: Vec<_> = (0..args.conns)
        .map(|_| {
            let (connector, name, request) = (connector.clone(), name.clone(), request.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                loop {
                    let began = Instant::now();
                    if began >= end {
                        return tally;
                    }
                    // Bounded: a server that never answers ends the run.
                    let session = session(&connector, args.addr, &name, &request);
                    let done = tokio::time::timeout_at(end + GRACE, session).await;
                    match done.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in time"))) {
                        Ok(()) if began >= measure_from => {
                            tally.micros.push(began.elapsed().as_secs_f64() * 1e6);
                        }
                        Ok(()) => {}
                        Err(e) => {
                            tally.errors += 1;
                            tally.last_error = Some(format!("{e:#}"));
                        }
                    }
                }
            })
        })
        .collect();
    let mut tallies = Vec::new();
    for client in clients {
        tallies.push(client.await.context("handshake client")?);
    }
    let all = Tally::merge(tallies);
    let ms = |q| percentile(&all.micros, q) / 1000.0;
    let rate = all.micros.len() as f64 / args.secs as f64;
    println!(
        "new TLS sessions (full handshake, one request each) for {}s over {} clients: {rate:.0}/s, {} errors",
        args.secs, args.conns, all.errors
    );
    if let Some(e) = &all.last_error {
        println!("last error: {e}");
    }
    println!(
        "session ms: p50 {:.3}  p99 {:.3}  max {:.3}",
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "handshakes",
                "secs": args.secs,
                "conns": args.conns,
                "handshakes_per_sec": rate,
                "errors": all.errors,
                "p50_ms": ms(0.5),
                "p99_ms": ms(0.99),
            })
        );
    }
    Ok(())
}

/// One new session: connect, full handshake, the request, the response
/// read to the server's close; fails unless the answer is a 200.
async fn session(
    connector: &TlsConnector,
    addr: SocketAddr,
    name: &ServerName<'static>,
    request: &str,
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut tls = connector
        .connect(name.clone(), tcp)
        .await
        .context("handshake")?;
    tls.write_all(request.as_bytes()).await?;
    let mut response = Vec::with_capacity(1024);
    match tls.read_to_end(&mut response).await {
        Ok(_) => {}
        // A server that closes without a close_notify after a complete
        // response (nginx does) has still answered.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e).context("reading the response"),
    }
    anyhow::ensure!(
        response.starts_with(b"HTTP/1.1 200 "),
        "answered {:?}",
        String::from_utf8_lossy(&response[..response.len().min(40)])
    );
    Ok(())
}

/// Takes any certificate (benchmark targets are self-signed) but verifies
/// the handshake's signature with it, as a real client's work.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
