//! Orgs, tokens, apps and their secrets: flaps writes them.

use super::feed::{RibView, append_change};
use super::{AppRow, Rib, RibError, SealedSecret, SecretRow};
use hangar_api::time::now_ms;
use rusqlite::{OptionalExtension, params};

impl Rib {
    // ---- orgs and tokens (flaps) ----

    /// Creates the org if it does not exist.
    pub fn ensure_org(&self, slug: &str, name: &str) -> Result<(), RibError> {
        self.write("ensure_org", |tx| {
            tx.execute(
                "INSERT OR IGNORE INTO orgs (slug, name, created_at) VALUES (?1, ?2, ?3)",
                params![slug, name, now_ms()],
            )?;
            Ok(())
        })
    }

    /// The org's display name, if the org exists.
    pub fn org_name(&self, slug: &str) -> Result<Option<String>, RibError> {
        self.read("org_name", |c| {
            Ok(
                c.query_row("SELECT name FROM orgs WHERE slug = ?1", [slug], |r| {
                    r.get(0)
                })
                .optional()?,
            )
        })
    }

    /// Records a token by its hash; the token itself is never stored.
    pub fn add_token(&self, hash: &str, org_slug: &str, name: &str) -> Result<(), RibError> {
        self.write("add_token", |tx| {
            tx.execute(
                "INSERT OR IGNORE INTO tokens (hash, org_slug, name, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![hash, org_slug, name, now_ms()],
            )?;
            Ok(())
        })
    }

    /// The org a token hash belongs to.
    pub fn token_org(&self, hash: &str) -> Result<Option<String>, RibError> {
        self.read("token_org", |c| {
            Ok(
                c.query_row("SELECT org_slug FROM tokens WHERE hash = ?1", [hash], |r| {
                    r.get(0)
                })
                .optional()?,
            )
        })
    }

    // ---- apps (flaps) ----

    /// Inserts a new app; `Conflict` if the name is taken.
    pub fn create_app(&self, app: &AppRow) -> Result<(), RibError> {
        self.write("create_app", |tx| insert_app(tx, app))
    }

    /// Inserts many new apps in one transaction; `Conflict` (and nothing
    /// written) if any name is taken.
    pub fn create_apps(&self, apps: &[AppRow]) -> Result<(), RibError> {
        self.write("create_apps", |tx| {
            for app in apps {
                insert_app(tx, app)?;
            }
            Ok(())
        })
    }

    /// Deletes an app row; true if it existed.
    pub fn delete_app(&self, name: &str) -> Result<bool, RibError> {
        self.write("delete_app", |tx| {
            let n = tx.execute("DELETE FROM apps WHERE name = ?1", [name])?;
            if n > 0 {
                append_change(tx, "apps", name, Some(name))?;
            }
            Ok(n > 0)
        })
    }

    /// One app by name.
    pub fn app(&self, name: &str) -> Result<Option<AppRow>, RibError> {
        self.read("app", |c| RibView(c).app(name))
    }

    /// Every app, or every app of one org, by name.
    pub fn apps(&self, org_slug: Option<&str>) -> Result<Vec<AppRow>, RibError> {
        self.read("apps", |c| RibView(c).apps(org_slug))
    }

    // ---- secrets (flaps writes, flyd reads at machine start) ----

    /// Sets (`Some`) or unsets (`None`) secrets of `app` in one transaction
    /// and returns the app's new secrets version.
    pub fn update_secrets(
        &self,
        app: &str,
        changes: &[(String, Option<SealedSecret>)],
    ) -> Result<u64, RibError> {
        self.write("update_secrets", |tx| {
            let now = now_ms();
            for (name, change) in changes {
                match change {
                    Some(SealedSecret { sealed, digest }) => {
                        tx.execute(
                            "INSERT INTO secrets (app, name, sealed, digest, created_at, updated_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                             ON CONFLICT(app, name) DO UPDATE SET sealed = excluded.sealed,
                               digest = excluded.digest, updated_at = excluded.updated_at",
                            params![app, name, sealed, digest, now],
                        )?;
                    }
                    None => {
                        tx.execute(
                            "DELETE FROM secrets WHERE app = ?1 AND name = ?2",
                            params![app, name],
                        )?;
                    }
                }
            }
            tx.execute(
                "INSERT INTO secrets_versions (app, version) VALUES (?1, 1)
                 ON CONFLICT(app) DO UPDATE SET version = version + 1",
                [app],
            )?;
            let version: i64 = tx.query_row(
                "SELECT version FROM secrets_versions WHERE app = ?1",
                [app],
                |r| r.get(0),
            )?;
            Ok(version as u64)
        })
    }

    /// The secrets of `app`, by name.
    pub fn secrets(&self, app: &str) -> Result<Vec<SecretRow>, RibError> {
        self.read("secrets", |c| {
            let mut stmt = c.prepare_cached(
                "SELECT name, sealed, digest, created_at, updated_at FROM secrets WHERE app = ?1 ORDER BY name",
            )?;
            let rows = stmt.query_map([app], |r| {
                Ok(SecretRow {
                    name: r.get(0)?,
                    sealed: r.get(1)?,
                    digest: r.get(2)?,
                    created_at: r.get(3)?,
                    updated_at: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The app's secrets version (0 before any secret was set).
    pub fn secrets_version(&self, app: &str) -> Result<u64, RibError> {
        self.read("secrets_version", |c| {
            let v: Option<i64> = c
                .query_row(
                    "SELECT version FROM secrets_versions WHERE app = ?1",
                    [app],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(v.unwrap_or(0) as u64)
        })
    }

    /// Deletes every secret, certificate and address of an app (when the
    /// app is deleted).
    pub fn forget_app_data(&self, app: &str) -> Result<(), RibError> {
        self.write("forget_app_data", |tx| {
            tx.execute("DELETE FROM secrets WHERE app = ?1", [app])?;
            tx.execute("DELETE FROM secrets_versions WHERE app = ?1", [app])?;
            if tx.execute("DELETE FROM certificates WHERE app = ?1", [app])? > 0 {
                append_change(tx, "certificates", "*", Some(app))?;
            }
            if tx.execute("DELETE FROM ip_assignments WHERE app = ?1", [app])? > 0 {
                append_change(tx, "ip_assignments", "*", Some(app))?;
            }
            Ok(())
        })
    }
}

pub(super) fn insert_app(tx: &rusqlite::Transaction<'_>, app: &AppRow) -> Result<(), RibError> {
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO apps (name, id, org_slug, network, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![app.name, app.id, app.org_slug, app.network, app.created_at],
    )?;
    if inserted == 0 {
        return Err(RibError::Conflict {
            what: "app",
            key: app.name.clone(),
        });
    }
    append_change(tx, "apps", &app.name, Some(&app.name))?;
    Ok(())
}

pub(super) fn app_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AppRow> {
    Ok(AppRow {
        name: r.get(0)?,
        id: r.get(1)?,
        org_slug: r.get(2)?,
        network: r.get(3)?,
        created_at: r.get(4)?,
    })
}
