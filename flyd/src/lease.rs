//! Machine leases and metadata.
//!
//! A lease reserves a machine for one caller: while it is held, mutating
//! calls must carry its nonce (`fly-machine-lease-nonce`) or get 409 naming
//! the holder and expiry. Leases are part of the machine record, so they
//! survive a flyd restart, and expire on their own.

use crate::flyd::{Flyd, FlydError};
use crate::record::{MachineRecord, now_rfc3339};
use hangar_api::machine::{CreateLeaseRequest, Lease};
use hangar_api::time::now_ms;
use std::collections::BTreeMap;

/// Lease length when the request gives none.
const DEFAULT_LEASE_TTL: u64 = 30;
/// Longest lease accepted (one day).
const MAX_LEASE_TTL: u64 = 86_400;

fn new_nonce() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether `key` may name a metadata entry: 1-256 characters of letters,
/// digits, `-`, `_` and `.`.
fn valid_key(key: &str) -> bool {
    (1..=256).contains(&key.len())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Flyd {
    /// Refuses (409) a mutating call on a leased machine without the
    /// lease's nonce.
    pub(crate) fn check_lease(
        &self,
        rec: &MachineRecord,
        nonce: Option<&str>,
    ) -> Result<(), FlydError> {
        match rec.active_lease() {
            Some(lease) if nonce != Some(lease.nonce.as_str()) => {
                Err(FlydError::Conflict(format!(
                    "machine {} is leased by {} until {} (unix time): send its nonce in fly-machine-lease-nonce",
                    rec.id, lease.owner, lease.expires_at
                )))
            }
            _ => Ok(()),
        }
    }

    /// Takes a lease, or extends the one held when `nonce` is its nonce.
    pub async fn lease_acquire(
        &self,
        id: &str,
        nonce: Option<&str>,
        req: CreateLeaseRequest,
    ) -> Result<Lease, FlydError> {
        let ttl = req.ttl.unwrap_or(DEFAULT_LEASE_TTL);
        if ttl == 0 || ttl > MAX_LEASE_TTL {
            return Err(FlydError::BadRequest(format!(
                "ttl: must be between 1 and {MAX_LEASE_TTL} seconds"
            )));
        }
        let (_guard, mut rec) = self.begin(id, nonce).await?;
        let expires_at = now_ms() / 1000 + ttl as i64;
        let lease = match rec.active_lease() {
            Some(held) => Lease {
                expires_at,
                description: req.description.unwrap_or_else(|| held.description.clone()),
                ..held.clone()
            },
            None => Lease {
                nonce: new_nonce(),
                expires_at,
                owner: "flaps".to_string(),
                description: req.description.unwrap_or_default(),
                version: rec.version.clone(),
            },
        };
        rec.lease = Some(lease.clone());
        self.store.put_machine(&rec)?;
        Ok(lease)
    }

    /// The lease held now (404 when none is).
    pub fn lease_get(&self, id: &str) -> Result<Lease, FlydError> {
        let rec = self.record(id)?;
        rec.active_lease()
            .cloned()
            .ok_or_else(|| FlydError::NoSuch(format!("machine {id} has no active lease")))
    }

    /// Releases the lease whose nonce is `nonce`.
    pub async fn lease_release(&self, id: &str, nonce: Option<&str>) -> Result<(), FlydError> {
        let _guard = self.lock_machine(id).await?;
        let mut rec = self.record(id)?;
        if rec.active_lease().is_none() {
            return Err(FlydError::NoSuch(format!(
                "machine {id} has no active lease"
            )));
        }
        self.check_lease(&rec, nonce)?;
        rec.lease = None;
        self.store.put_machine(&rec)?;
        Ok(())
    }

    /// The machine's metadata.
    pub fn metadata(&self, id: &str) -> Result<BTreeMap<String, String>, FlydError> {
        Ok(self.record(id)?.config.metadata)
    }

    /// Changes the metadata through `change`, after checking the lease and
    /// every key.
    pub async fn metadata_update(
        &self,
        id: &str,
        nonce: Option<&str>,
        change: impl FnOnce(&mut BTreeMap<String, String>) -> Result<(), FlydError>,
    ) -> Result<(), FlydError> {
        let (_guard, mut rec) = self.begin(id, nonce).await?;
        change(&mut rec.config.metadata)?;
        if let Some(bad) = rec.config.metadata.keys().find(|k| !valid_key(k)) {
            return Err(FlydError::BadRequest(format!(
                "metadata: invalid key {bad:?}: use 1-256 letters, digits, '-', '_' or '.'"
            )));
        }
        rec.updated_at = now_rfc3339();
        self.store.put_machine(&rec)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_keys_are_checked() {
        assert!(valid_key("fly_platform_version"));
        assert!(valid_key("a.b-c"));
        assert!(!valid_key(""));
        assert!(!valid_key("a b"));
        assert!(!valid_key("ключ"));
    }

    #[test]
    fn nonces_are_random_hex() {
        let (a, b) = (new_nonce(), new_nonce());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
    }
}
