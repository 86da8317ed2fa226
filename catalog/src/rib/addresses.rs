//! Certificates and IP assignments: flaps writes them, the FIB follows.

use super::feed::{RibView, append_change};
use super::{CertificateRow, IpRow, Rib, RibError};
use rusqlite::{OptionalExtension, params};

impl Rib {
    // ---- certificates (flaps writes, the FIB follows) ----

    /// Adds or replaces the certificate of `row.hostname`; `Conflict` when
    /// another app has that hostname.
    pub fn put_certificate(&self, row: &CertificateRow) -> Result<(), RibError> {
        self.write("put_certificate", |tx| {
            let owner: Option<String> = tx
                .query_row(
                    "SELECT app FROM certificates WHERE hostname = ?1",
                    [&row.hostname],
                    |r| r.get(0),
                )
                .optional()?;
            if owner.as_ref().is_some_and(|a| *a != row.app) {
                return Err(RibError::Conflict {
                    what: "hostname",
                    key: row.hostname.clone(),
                });
            }
            tx.execute(
                "INSERT INTO certificates (hostname, app, fullchain, sealed_key, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(hostname) DO UPDATE SET fullchain = excluded.fullchain,
                   sealed_key = excluded.sealed_key, created_at = excluded.created_at",
                params![
                    row.hostname,
                    row.app,
                    row.fullchain,
                    row.sealed_key,
                    row.created_at
                ],
            )?;
            append_change(tx, "certificates", &row.hostname, Some(&row.app))?;
            Ok(())
        })
    }

    /// Deletes the certificate of `hostname` from `app`; true if it existed.
    pub fn delete_certificate(&self, app: &str, hostname: &str) -> Result<bool, RibError> {
        self.write("delete_certificate", |tx| {
            let n = tx.execute(
                "DELETE FROM certificates WHERE app = ?1 AND hostname = ?2",
                [app, hostname],
            )?;
            if n > 0 {
                append_change(tx, "certificates", hostname, Some(app))?;
            }
            Ok(n > 0)
        })
    }

    /// The certificates of an app, by hostname.
    pub fn certificates_of_app(&self, app: &str) -> Result<Vec<CertificateRow>, RibError> {
        self.certificates(Some(app))
    }

    /// Every certificate, or those of one app, by hostname.
    pub fn certificates(&self, app: Option<&str>) -> Result<Vec<CertificateRow>, RibError> {
        self.read("certificates", |c| RibView(c).certificates(app))
    }

    // ---- ip assignments (flaps) ----

    /// Records an assignment; `Conflict` if the address is taken.
    pub fn add_ip(&self, row: &IpRow) -> Result<(), RibError> {
        self.write("add_ip", |tx| {
            let n = tx.execute(
                "INSERT OR IGNORE INTO ip_assignments (ip, app, kind, network, region, service_name, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![row.ip, row.app, row.kind, row.network, row.region, row.service_name, row.created_at],
            )?;
            if n == 0 {
                return Err(RibError::Conflict {
                    what: "ip",
                    key: row.ip.clone(),
                });
            }
            append_change(tx, "ip_assignments", &row.ip, Some(&row.app))?;
            Ok(())
        })
    }

    /// Every assignment, or those of one app, by address.
    pub fn ips(&self, app: Option<&str>) -> Result<Vec<IpRow>, RibError> {
        self.read("ips", |c| RibView(c).ips(app))
    }

    /// Releases `ip` from `app`; true if it was the app's.
    pub fn release_ip(&self, app: &str, ip: &str) -> Result<bool, RibError> {
        self.write("release_ip", |tx| {
            let n = tx.execute(
                "DELETE FROM ip_assignments WHERE app = ?1 AND ip = ?2",
                [app, ip],
            )?;
            if n > 0 {
                append_change(tx, "ip_assignments", ip, Some(app))?;
            }
            Ok(n > 0)
        })
    }
}
