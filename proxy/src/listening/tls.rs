//! TLS for the HTTPS listener: the self-signed dev certificate and the
//! rustls server config built from it.
//!
//! The certificate is an ECDSA P-256 key signed by itself for `*.localhost`
//! and `localhost`, generated on first start and kept under
//! `<data_dir>/tls/` so browsers and clients that were told to trust it keep
//! trusting it across restarts.

use crate::error::ProxyError;
use arc_swap::ArcSwap;
use hangar_catalog::files::write_atomically;
use hangar_catalog::secrets::CERTIFICATE_KEYS;
use hangar_catalog::{CertificateRow, Fib, SecretBox};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign;
use rustls::{CipherSuite, ServerConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The directory under the data dir that holds the dev certificate.
pub const TLS_DIR: &str = "tls";
/// The dev certificate chain, PEM.
pub const CERT_FILE: &str = "dev-cert.pem";
/// The dev certificate's private key, PEM, mode 0600.
pub const KEY_FILE: &str = "dev-key.pem";

/// The names the dev certificate is valid for.
const DEV_NAMES: [&str; 2] = ["*.localhost", "localhost"];

/// ALPN protocols offered, in preference order.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A certificate chain and its key, ready for rustls.
#[derive(Debug)]
pub struct CertifiedKey {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

/// Where the dev certificate and key of `data_dir` live.
pub fn dev_cert_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = data_dir.join(TLS_DIR);
    (dir.join(CERT_FILE), dir.join(KEY_FILE))
}

/// Loads the dev certificate from `data_dir`, generating and saving it first
/// if either file is missing.
pub fn load_or_create_dev_cert(data_dir: &Path) -> Result<CertifiedKey, ProxyError> {
    let (cert_path, key_path) = dev_cert_paths(data_dir);
    if !(cert_path.exists() && key_path.exists()) {
        // A lone file is the leftover of an interrupted first start: a cert
        // without its key (or the reverse) is useless, so replace both.
        create_dev_cert(&cert_path, &key_path)?;
        tracing::info!(cert = %cert_path.display(), "proxy: generated a self-signed dev certificate");
    }
    load(&cert_path, &key_path)
}

/// Builds the HTTPS listener's rustls config: TLS 1.2 and 1.3 on the ring
/// provider, ALPN `h2` then `http/1.1`, certificates chosen by `resolver`.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<Arc<ServerConfig>, ProxyError> {
    // The workspace builds rustls without a default provider, so name it.
    let mut provider = rustls::crypto::ring::default_provider();
    // SHA-256 suites first, chosen by our order rather than the client's:
    // their key schedule runs on the SHA extensions most CPUs have, where
    // SHA-384 (AES-256-GCM's) runs in software and costs a new handshake
    // about a tenth of its time. All remain offered.
    provider.cipher_suites.sort_by_key(|suite| {
        matches!(
            suite.suite(),
            CipherSuite::TLS13_AES_256_GCM_SHA384
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        )
    });
    provider.secure_random = &ThreadRandom;
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.ignore_client_order = true;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// rustls's public random values (hello randoms, session ids, ticket
/// nonces and ids) from the thread's ChaCha generator, seeded and reseeded
/// by the OS, instead of ring's system call for each: a new TLS 1.3
/// session made seven. Secrets (key exchange and signing keys) still come
/// from ring's own source, the OS.
#[derive(Debug)]
struct ThreadRandom;

impl rustls::crypto::SecureRandom for ThreadRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        rand::RngCore::fill_bytes(&mut rand::rng(), buf);
        Ok(())
    }
}

/// A chain and key as rustls signs with them.
pub fn signing_key(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<Arc<sign::CertifiedKey>, rustls::Error> {
    let signer = rustls::crypto::ring::sign::any_supported_type(key)?;
    Ok(Arc::new(sign::CertifiedKey::new(chain, signer)))
}

/// Chooses the certificate by SNI: an app's custom certificate for its
/// hostname (from the FIB), else the dev certificate. Parsed certificates
/// are kept in a copy-on-write cache, so a handshake reads without locking.
pub struct SniResolver {
    fib: Arc<Fib>,
    secrets: Arc<SecretBox>,
    default: Arc<sign::CertifiedKey>,
    /// hostname → (the row's `created_at`, the parsed key): a replaced
    /// certificate has a new `created_at` and is parsed again.
    cache: ArcSwap<HashMap<String, (i64, Arc<sign::CertifiedKey>)>>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver")
            .field("cached", &self.cache.load().len())
            .finish()
    }
}

impl SniResolver {
    /// A resolver over `fib`'s hostnames, falling back to `dev`.
    pub fn new(
        fib: Arc<Fib>,
        secrets: Arc<SecretBox>,
        dev: CertifiedKey,
    ) -> Result<Self, ProxyError> {
        Ok(Self {
            fib,
            secrets,
            default: signing_key(dev.chain, &dev.key)?,
            cache: ArcSwap::from_pointee(HashMap::new()),
        })
    }

    fn custom(&self, row: &CertificateRow) -> Result<Arc<sign::CertifiedKey>, String> {
        if let Some((created, key)) = self.cache.load().get(&row.hostname) {
            if *created == row.created_at {
                return Ok(key.clone());
            }
        }
        let chain = CertificateDer::pem_slice_iter(row.fullchain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("chain: {e}"))?;
        let pem = self
            .secrets
            .open(CERTIFICATE_KEYS, &row.hostname, &row.sealed_key)
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("key: {e}"))?;
        let parsed = signing_key(chain, &key).map_err(|e| e.to_string())?;
        self.cache.rcu(|cache| {
            let mut next = HashMap::clone(cache);
            next.insert(row.hostname.clone(), (row.created_at, parsed.clone()));
            // Forget hostnames the FIB no longer has.
            let snapshot = self.fib.snapshot();
            next.retain(|name, _| snapshot.hostname(name).is_some());
            next
        });
        Ok(parsed)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<sign::CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let snapshot = self.fib.snapshot();
        let Some(row) = snapshot.hostname(&name.to_ascii_lowercase()) else {
            return Some(self.default.clone());
        };
        match self.custom(row) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(hostname = %row.hostname, error = %e, "custom certificate unusable; serving the dev certificate");
                Some(self.default.clone())
            }
        }
    }
}

fn create_dev_cert(cert_path: &Path, key_path: &Path) -> Result<(), ProxyError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(DEV_NAMES.map(String::from).to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Hangar dev proxy");
    let cert = params.self_signed(&key)?;
    if let Some(dir) = key_path.parent() {
        create_private_dir(dir)?;
    }
    // Key first: a crash between the two writes leaves no cert, which the
    // next start treats as "generate again".
    let write = |path: &Path, pem: &str, mode| {
        write_atomically(path, pem.as_bytes(), mode).map_err(|source| ProxyError::CertFile {
            path: path.to_path_buf(),
            source,
        })
    };
    write(key_path, &key.serialize_pem(), 0o600)?;
    write(cert_path, &cert.pem(), 0o644)?;
    Ok(())
}

fn load(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, ProxyError> {
    let pem_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ProxyError::CertPem { path, source }
    };
    let chain = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(pem_error(cert_path))?;
    if chain.is_empty() {
        return Err(ProxyError::CertPem {
            path: cert_path.to_path_buf(),
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(pem_error(key_path))?;
    Ok(CertifiedKey { chain, key })
}

fn create_private_dir(dir: &Path) -> Result<(), ProxyError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| ProxyError::CertFile {
        path: dir.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_dev_cert(dir.path()).unwrap();
        let (cert_path, key_path) = dev_cert_paths(dir.path());
        let cert_pem = std::fs::read(&cert_path).unwrap();
        let key_pem = std::fs::read(&key_path).unwrap();

        let second = load_or_create_dev_cert(dir.path()).unwrap();
        assert_eq!(
            first.chain, second.chain,
            "the second start reuses the certificate"
        );
        assert_eq!(std::fs::read(&cert_path).unwrap(), cert_pem);
        assert_eq!(std::fs::read(&key_path).unwrap(), key_pem);
        assert_eq!(first.key.secret_der(), second.key.secret_der());
        let resolver = test_resolver(dir.path(), second);
        server_config(resolver).unwrap();
    }

    fn test_resolver(dir: &Path, dev: CertifiedKey) -> Arc<SniResolver> {
        let rib = hangar_catalog::Rib::open(&dir.join("rib.sqlite")).unwrap();
        let fib = Fib::load(&rib).unwrap();
        let secrets = Arc::new(SecretBox::load_or_create(&dir.join("secrets.key")).unwrap());
        Arc::new(SniResolver::new(fib, secrets, dev).unwrap())
    }

    #[cfg(unix)]
    #[test]
    fn dev_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        load_or_create_dev_cert(dir.path()).unwrap();
        let (_, key_path) = dev_cert_paths(dir.path());
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_lone_certificate_is_replaced_with_a_fresh_pair() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_dev_cert(dir.path()).unwrap();
        let (_, key_path) = dev_cert_paths(dir.path());
        std::fs::remove_file(&key_path).unwrap();
        let second = load_or_create_dev_cert(dir.path()).unwrap();
        assert_ne!(first.chain, second.chain);
        assert!(key_path.exists());
    }

    #[test]
    fn sha256_suites_come_first_and_every_suite_stays() {
        let dir = tempfile::tempdir().unwrap();
        let dev = load_or_create_dev_cert(dir.path()).unwrap();
        let config = server_config(test_resolver(dir.path(), dev)).unwrap();
        let suites: Vec<_> = config
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(suites[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert!(suites.contains(&CipherSuite::TLS13_AES_256_GCM_SHA384));
        assert_eq!(
            suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
        assert!(config.ignore_client_order);
    }

    #[test]
    fn server_config_offers_h2_then_http1() {
        let dir = tempfile::tempdir().unwrap();
        let dev = load_or_create_dev_cert(dir.path()).unwrap();
        let config = server_config(test_resolver(dir.path(), dev)).unwrap();
        assert_eq!(
            config.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }
}
