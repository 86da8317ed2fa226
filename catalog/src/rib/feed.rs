//! The change feed: every write appends to it in its transaction; the FIB
//! follows it by sequence number, reading through [`RibView`].

use super::apps::app_from_row;
use super::schema::LAST_SEQ;
use super::{AppRow, CertificateRow, Change, IpRow, Rib, RibError, RouteRow, Routes};
use rusqlite::{Connection, OptionalExtension, params};

impl Rib {
    // ---- change feed ----

    /// The sequence number of the newest change.
    pub fn last_seq(&self) -> Result<u64, RibError> {
        self.read("last_seq", |c| RibView(c).last_seq())
    }

    /// Up to `limit` changes after `seq`, oldest first.
    pub fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Change>, RibError> {
        self.read("changes_since", |c| RibView(c).changes_since(seq, limit))
    }

    /// Deletes all but the newest `keep` changes. Followers still behind the
    /// deleted ones notice through [`Rib::compacted_through`] and reload.
    /// Returns how many changes were deleted.
    pub fn compact_feed(&self, keep: u64) -> Result<u64, RibError> {
        self.write("compact_feed", |tx| {
            let last: i64 = tx.query_row(LAST_SEQ, [], |r| r.get(0))?;
            let done: i64 =
                tx.query_row("SELECT compacted_through FROM feed_meta", [], |r| r.get(0))?;
            let cutoff = last - keep as i64;
            if cutoff <= done {
                return Ok(0);
            }
            let n = tx.execute("DELETE FROM changes WHERE seq <= ?1", [cutoff])?;
            tx.execute("UPDATE feed_meta SET compacted_through = ?1", [cutoff])?;
            Ok(n as u64)
        })
    }

    /// The sequence number up to which the feed was compacted: a follower
    /// whose position is below it has missed changes.
    pub fn compacted_through(&self) -> Result<u64, RibError> {
        self.read("compacted_through", |c| RibView(c).compacted_through())
    }
}

pub(super) fn append_change(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    key: &str,
    app: Option<&str>,
) -> Result<u64, rusqlite::Error> {
    tx.prepare_cached("INSERT INTO changes (tbl, key, app) VALUES (?1, ?2, ?3)")?
        .execute(params![table, key, app])?;
    Ok(tx.last_insert_rowid() as u64)
}

/// Reads on one connection. [`Rib`]'s read methods run these on the shared
/// reader; the FIB runs them on its own connection inside one read
/// transaction per catch-up (see `Rib::follow_read`), which both saves a
/// lock round per query and gives it one consistent view of the RIB.
pub struct RibView<'c>(pub(super) &'c Connection);

/// The columns [`RibView::for_each_route`] reads.
const ROUTE_SELECT: &str =
    "SELECT id, app, region, host, state, private_ip, cordoned, healthy, services, primary_region
     FROM machines WHERE state != 'destroyed'";

impl RibView<'_> {
    pub fn app(&self, name: &str) -> Result<Option<AppRow>, RibError> {
        let c = self.0;
        Ok(c.query_row(
            "SELECT name, id, org_slug, network, created_at FROM apps WHERE name = ?1",
            [name],
            app_from_row,
        )
        .optional()?)
    }

    pub fn apps(&self, org_slug: Option<&str>) -> Result<Vec<AppRow>, RibError> {
        let c = self.0;
        let mut stmt = c.prepare_cached(
            "SELECT name, id, org_slug, network, created_at FROM apps
                 WHERE ?1 IS NULL OR org_slug = ?1 ORDER BY name",
        )?;
        let rows = stmt.query_map([org_slug], app_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn certificates(&self, app: Option<&str>) -> Result<Vec<CertificateRow>, RibError> {
        let c = self.0;
        let mut stmt = c.prepare_cached(
            "SELECT hostname, app, fullchain, sealed_key, created_at FROM certificates
                 WHERE ?1 IS NULL OR app = ?1 ORDER BY hostname",
        )?;
        let rows = stmt.query_map([app], |r| {
            Ok(CertificateRow {
                hostname: r.get(0)?,
                app: r.get(1)?,
                fullchain: r.get(2)?,
                sealed_key: r.get(3)?,
                created_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn ips(&self, app: Option<&str>) -> Result<Vec<IpRow>, RibError> {
        let c = self.0;
        let mut stmt = c.prepare_cached(
            "SELECT ip, app, kind, network, region, service_name, created_at FROM ip_assignments
                 WHERE ?1 IS NULL OR app = ?1 ORDER BY ip",
        )?;
        let rows = stmt.query_map([app], |r| {
            Ok(IpRow {
                ip: r.get(0)?,
                app: r.get(1)?,
                kind: r.get(2)?,
                network: r.get(3)?,
                region: r.get(4)?,
                service_name: r.get(5)?,
                created_at: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn last_seq(&self) -> Result<u64, RibError> {
        let c = self.0;
        let seq: i64 = c.query_row(LAST_SEQ, [], |r| r.get(0))?;
        Ok(seq as u64)
    }

    pub fn changes_since(&self, seq: u64, limit: usize) -> Result<Vec<Change>, RibError> {
        let c = self.0;
        let mut stmt = c.prepare_cached(
            "SELECT seq, tbl, key, app, image FROM changes WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![seq as i64, limit as i64], |r| {
            Ok(Change {
                seq: r.get::<_, i64>(0)? as u64,
                table: r.get(1)?,
                key: r.get(2)?,
                app: r.get(3)?,
                image: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn compacted_through(&self) -> Result<u64, RibError> {
        let c = self.0;
        let v: i64 = c.query_row("SELECT compacted_through FROM feed_meta", [], |r| r.get(0))?;
        Ok(v as u64)
    }

    pub fn data_version(&self) -> Result<u64, RibError> {
        let c = self.0;
        let v: i64 = c
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        Ok(v as u64)
    }

    /// Calls `f` with every machine that is not destroyed among `which`, in
    /// no particular order. For the FIB: no row is decoded further than it
    /// needs.
    pub(crate) fn for_each_route(
        &self,
        which: Routes<'_>,
        mut f: impl FnMut(RouteRow<'_>),
    ) -> Result<(), RibError> {
        let c = self.0;
        let (mut stmt, key) = match which {
            Routes::All => (c.prepare_cached(ROUTE_SELECT)?, None),
            Routes::App(app) => (
                c.prepare_cached(&format!("{ROUTE_SELECT} AND app = ?1"))?,
                Some(app),
            ),
            Routes::Machine(id) => (
                c.prepare_cached(&format!("{ROUTE_SELECT} AND id = ?1"))?,
                Some(id),
            ),
        };
        let mut rows = match key {
            Some(key) => stmt.query([key])?,
            None => stmt.query([])?,
        };
        while let Some(r) = rows.next()? {
            let text = |i: usize| -> Result<&str, RibError> {
                Ok(r.get_ref(i)?.as_str().map_err(rusqlite::Error::from)?)
            };
            let id = text(0)?;
            let state = text(4)?.parse().map_err(|reason| RibError::Corrupt {
                key: id.to_string(),
                reason,
            })?;
            f(RouteRow {
                id,
                app: text(1)?,
                region: text(2)?,
                host: text(3)?,
                state,
                private_ip: text(5)?,
                cordoned: r.get(6)?,
                healthy: r.get(7)?,
                services: text(8)?,
                primary_region: r
                    .get_ref(9)?
                    .as_str_or_null()
                    .map_err(rusqlite::Error::from)?,
            });
        }
        Ok(())
    }
}
