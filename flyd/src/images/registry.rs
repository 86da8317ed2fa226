//! Pulling from registries: the OCI distribution protocol through
//! `oci-client`, which resolves an index to this host's platform, handles
//! token and basic auth, and checks every manifest and blob against its
//! digest. This file chooses the credentials and the protocol per
//! registry, and says what went wrong in words a user can act on.

use super::ImageError;
use super::blobs::Blobs;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// How to reach one registry: `[flyd.images.registries."<host[:port]>"]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    pub username: Option<String>,
    pub password: Option<String>,
    /// Plain HTTP instead of HTTPS. Registries on a loopback address are
    /// reached over plain HTTP without it, as Docker does.
    pub insecure: bool,
}

/// An image's manifest and config, as its registry has them.
pub struct Fetched {
    /// The manifest's digest (of the platform's manifest, for an index).
    pub digest: String,
    pub manifest: OciImageManifest,
    /// The config blob, byte for byte.
    pub config: Vec<u8>,
}

/// The registries this host pulls from.
pub struct Registries {
    https: Client,
    http: Client,
    config: BTreeMap<String, RegistryConfig>,
}

/// How long to wait for a registry to accept a connection, and for any
/// read: a registry that hangs fails the pull instead of holding it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

fn client(protocol: ClientProtocol) -> Result<Client, ImageError> {
    let config = ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(oci_client::client::current_platform_resolver)),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        user_agent: concat!("hangar/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    };
    Client::try_from(config)
        .map_err(|e| ImageError::Io(format!("building the registry client: {e}")))
}

impl Registries {
    pub fn new(config: BTreeMap<String, RegistryConfig>) -> Result<Self, ImageError> {
        Ok(Self {
            https: client(ClientProtocol::Https)?,
            http: client(ClientProtocol::Http)?,
            config,
        })
    }

    fn client_for(&self, reference: &Reference) -> &Client {
        // Keyed as users write registries (`docker.io`), as for credentials.
        let registry = reference.registry();
        let insecure = self.config.get(registry).is_some_and(|c| c.insecure);
        if insecure || is_loopback(registry) {
            &self.http
        } else {
            &self.https
        }
    }

    fn auth_for(&self, reference: &Reference) -> RegistryAuth {
        match self.config.get(reference.registry()) {
            Some(RegistryConfig {
                username: Some(user),
                password: Some(pass),
                ..
            }) => RegistryAuth::Basic(user.clone(), pass.clone()),
            _ => RegistryAuth::Anonymous,
        }
    }

    /// The image's manifest (for this host's platform) and config.
    pub async fn manifest(&self, reference: &Reference) -> Result<Fetched, ImageError> {
        let client = self.client_for(reference);
        let (manifest, digest, config) = client
            .pull_manifest_and_config(reference, &self.auth_for(reference))
            .await
            .map_err(|e| explain(reference, e))?;
        Ok(Fetched {
            digest,
            manifest,
            config: config.into_bytes(),
        })
    }

    /// Fetches the blob `layer` of `reference` into `blobs`, unless it is
    /// there already. `manifest` must have been called for the same
    /// reference first (it authenticates).
    pub async fn blob(
        &self,
        reference: &Reference,
        layer: &OciDescriptor,
        blobs: &Blobs,
    ) -> Result<(), ImageError> {
        if blobs.has(&layer.digest) {
            return Ok(());
        }
        if blobs.path(&layer.digest).is_none() {
            return Err(ImageError::Invalid(format!(
                "image {}: layer digest {:?} is not a sha256 digest",
                reference.whole(),
                layer.digest
            )));
        }
        let (staged, file) = blobs
            .stage()
            .map_err(|e| ImageError::from_io("staging a layer", e))?;
        let mut file = tokio::fs::File::from_std(file);
        let pulled = match self
            .client_for(reference)
            .pull_blob(reference, layer, &mut file)
            .await
        {
            // tokio's file writes in the background: wait for the last.
            Ok(()) => file.flush().await.map_err(OciDistributionError::IoError),
            Err(e) => Err(e),
        };
        drop(file);
        if let Err(e) = pulled {
            let _ = std::fs::remove_file(&staged);
            return Err(explain(reference, e));
        }
        // oci-client checked the digest as the bytes came; adopting checks
        // the file once more, so what lands on disk is what was named.
        match blobs.adopt(&staged, &layer.digest) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(actual)) => Err(ImageError::DigestMismatch {
                image: reference.whole(),
                expected: layer.digest.clone(),
                actual,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                Err(ImageError::from_io("storing a layer", e))
            }
        }
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A pull error, in the user's terms.
fn explain(reference: &Reference, e: OciDistributionError) -> ImageError {
    let image = reference.whole();
    let registry = reference.registry().to_string();
    match e {
        OciDistributionError::RegistryError { envelope, .. } => {
            let unknown = envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            });
            let denied = envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied));
            if unknown {
                ImageError::NotFound(image)
            } else if denied {
                ImageError::Unauthorized { image, registry }
            } else {
                ImageError::Registry {
                    registry,
                    reason: envelope.to_string(),
                }
            }
        }
        OciDistributionError::ServerError { code: 404, .. }
        | OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotFound(image),
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_)
        | OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => ImageError::Unauthorized { image, registry },
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected,
            actual,
        }) => ImageError::DigestMismatch {
            image,
            expected,
            actual,
        },
        OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
            ImageError::Unreachable {
                registry,
                reason: e.to_string(),
            }
        }
        OciDistributionError::IoError(e) => ImageError::from_io("writing a layer", e),
        OciDistributionError::UnsupportedMediaTypeError(_)
        | OciDistributionError::IncompatibleLayerMediaTypeError(_)
        | OciDistributionError::ManifestParsingError(_)
        | OciDistributionError::VersionedParsingError(_)
        | OciDistributionError::UnsupportedSchemaVersionError(_)
        | OciDistributionError::SpecViolationError(_) => {
            ImageError::Invalid(format!("image {image}: {e}"))
        }
        other => ImageError::Registry {
            registry,
            reason: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_recognised() {
        for yes in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "docker.io",
            "10.0.0.1:5000",
            "ghcr.io",
            "localhost.example:80",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }
}
