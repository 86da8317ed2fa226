//! Hosts and machines: each flyd writes its own; and the per-region
//! summaries derived from the machines.

use super::feed::append_change;
use super::{HostRow, MachineRow, RegionSummaryRow, Rib, RibError, RouteImage};
use hangar_api::machine::MachineState;
use rusqlite::{OptionalExtension, params};

impl Rib {
    // ---- hosts (flyd) ----

    /// Records (or refreshes) a host.
    pub fn upsert_host(&self, host: &HostRow) -> Result<(), RibError> {
        self.write("upsert_host", |tx| {
            tx.execute(
                "INSERT INTO hosts (id, region, address, updated_at, capacity) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(id) DO UPDATE SET region = excluded.region,
                   address = excluded.address, updated_at = excluded.updated_at,
                   capacity = excluded.capacity",
                params![
                    host.id,
                    host.region,
                    host.address,
                    host.updated_at,
                    serde_json::to_string(&host.capacity).expect("capacity serializes")
                ],
            )?;
            append_change(tx, "hosts", &host.id, None)?;
            Ok(())
        })
    }

    /// Every host, or the hosts of one region, by id.
    pub fn hosts(&self, region: Option<&str>) -> Result<Vec<HostRow>, RibError> {
        self.read("hosts", |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, region, address, updated_at, capacity FROM hosts
                 WHERE ?1 IS NULL OR region = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map([region], |r| {
                let capacity: String = r.get(4)?;
                Ok(HostRow {
                    id: r.get(0)?,
                    region: r.get(1)?,
                    address: r.get(2)?,
                    updated_at: r.get(3)?,
                    // A row this version cannot read counts as no capacity.
                    capacity: serde_json::from_str(&capacity).unwrap_or_default(),
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// One host by id.
    pub fn host(&self, id: &str) -> Result<Option<HostRow>, RibError> {
        Ok(self.hosts(None)?.into_iter().find(|h| h.id == id))
    }

    /// How many live (not destroyed) machines each host runs.
    pub fn host_loads(&self) -> Result<Vec<(String, u64)>, RibError> {
        self.read("host_loads", |c| {
            let mut stmt = c.prepare_cached(
                "SELECT host, COUNT(*) FROM machines WHERE state != 'destroyed' GROUP BY host",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    // ---- machines (flyd) ----

    /// Writes a machine row unless the RIB already has this or a newer
    /// `row_version`. Returns whether the write was applied. A machine's
    /// app and region never change: an update leaves them (and the index on
    /// them) alone.
    pub fn upsert_machine(&self, m: &MachineRow) -> Result<bool, RibError> {
        let services = services_json(m)?;
        self.write("upsert_machine", |tx| upsert_machine(tx, m, &services))
    }

    /// [`Rib::upsert_machine`] for many rows in one transaction (one commit,
    /// one wake-up). Returns how many writes were applied.
    pub fn upsert_machines(&self, rows: &[MachineRow]) -> Result<usize, RibError> {
        let services = rows
            .iter()
            .map(services_json)
            .collect::<Result<Vec<_>, _>>()?;
        self.write("upsert_machines", |tx| {
            let mut applied = 0;
            for (m, services) in rows.iter().zip(&services) {
                applied += usize::from(upsert_machine(tx, m, services)?);
            }
            Ok(applied)
        })
    }

    /// One machine by id (destroyed ones included).
    pub fn machine(&self, id: &str) -> Result<Option<MachineRow>, RibError> {
        let raw = self.read("machine", |c| {
            Ok(c.query_row(
                &format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE id = ?1"),
                [id],
                machine_from_row,
            )
            .optional()?)
        })?;
        raw.map(decode_machine).transpose()
    }

    /// The machines of an app (destroyed ones included), by id.
    pub fn machines_of_app(&self, app: &str) -> Result<Vec<MachineRow>, RibError> {
        let raw = self.read("machines_of_app", |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {MACHINE_COLUMNS} FROM machines WHERE app = ?1 ORDER BY id"
            ))?;
            let rows = stmt.query_map([app], machine_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })?;
        raw.into_iter().map(decode_machine).collect()
    }

    /// An app's machines per region, from the `app_region_summaries` view.
    pub fn region_summaries(&self, app: &str) -> Result<Vec<RegionSummaryRow>, RibError> {
        self.read("region_summaries", |c| {
            let mut stmt = c.prepare_cached(
                "SELECT region, started, stopped, suspended, routable
                 FROM app_region_summaries WHERE app = ?1 ORDER BY region",
            )?;
            let rows = stmt.query_map([app], |r| {
                Ok(RegionSummaryRow {
                    region: r.get(0)?,
                    started: r.get::<_, i64>(1)? as u64,
                    stopped: r.get::<_, i64>(2)? as u64,
                    suspended: r.get::<_, i64>(3)? as u64,
                    routable: r.get::<_, i64>(4)? as u64,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Deletes an app's destroyed machine rows (after the app itself is gone).
    pub fn forget_machines_of_app(&self, app: &str) -> Result<usize, RibError> {
        self.write("forget_machines_of_app", |tx| {
            let n = tx.execute(
                "DELETE FROM machines WHERE app = ?1 AND state = 'destroyed'",
                [app],
            )?;
            if n > 0 {
                append_change(tx, "machines", "*", Some(app))?;
            }
            Ok(n)
        })
    }
}

pub(super) fn machine_from_row(
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<(MachineRow, String, String)> {
    // State and services are decoded by the caller so a bad row names itself.
    Ok((
        MachineRow {
            id: r.get(0)?,
            app: r.get(1)?,
            region: r.get(2)?,
            host: r.get(3)?,
            state: MachineState::Created,
            private_ip: r.get(5)?,
            instance_id: r.get(6)?,
            cordoned: r.get(7)?,
            services: Vec::new(),
            row_version: r.get::<_, i64>(9)? as u64,
            updated_at: r.get(10)?,
            healthy: r.get(11)?,
            primary_region: r.get(12)?,
        },
        r.get(4)?,
        r.get(8)?,
    ))
}

pub(super) fn decode_machine(
    (mut row, state, services): (MachineRow, String, String),
) -> Result<MachineRow, RibError> {
    let corrupt = |reason: String| RibError::Corrupt {
        key: row.id.clone(),
        reason,
    };
    row.state = state.parse().map_err(corrupt)?;
    row.services = serde_json::from_str(&services).map_err(|e| corrupt(e.to_string()))?;
    Ok(row)
}

pub(super) const MACHINE_COLUMNS: &str = "id, app, region, host, state, private_ip, instance_id, cordoned, services, row_version, updated_at, healthy, primary_region";

pub(super) fn services_json(m: &MachineRow) -> Result<String, RibError> {
    serde_json::to_string(&m.services).map_err(|e| RibError::Corrupt {
        key: m.id.clone(),
        reason: e.to_string(),
    })
}

pub(super) fn upsert_machine(
    tx: &rusqlite::Transaction<'_>,
    m: &MachineRow,
    services: &str,
) -> Result<bool, RibError> {
    // RETURNING yields a row only when the write was applied, with the app
    // and region as stored (an update never changes them).
    let stored: Option<(String, String)> = tx
        .prepare_cached(
            "INSERT INTO machines (id, app, region, host, state, private_ip, instance_id,
            cordoned, services, row_version, updated_at, healthy, primary_region)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT(id) DO UPDATE SET
            host = excluded.host, state = excluded.state, private_ip = excluded.private_ip,
            instance_id = excluded.instance_id, cordoned = excluded.cordoned,
            services = excluded.services, row_version = excluded.row_version,
            updated_at = excluded.updated_at, healthy = excluded.healthy,
            primary_region = excluded.primary_region
         WHERE excluded.row_version > machines.row_version
         RETURNING app, region",
        )?
        .query_row(
            params![
                m.id,
                m.app,
                m.region,
                m.host,
                m.state.as_str(),
                m.private_ip,
                m.instance_id,
                m.cordoned,
                services,
                m.row_version as i64,
                m.updated_at,
                m.healthy,
                m.primary_region
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((app, region)) = stored else {
        return Ok(false);
    };
    let image = RouteImage {
        id: m.id.clone(),
        app,
        region,
        host: m.host.clone(),
        state: m.state,
        private_ip: m.private_ip.clone(),
        cordoned: m.cordoned,
        healthy: m.healthy,
        services: services.to_string(),
        primary_region: m.primary_region.clone(),
    };
    let json = serde_json::to_string(&image).map_err(|e| RibError::Corrupt {
        key: m.id.clone(),
        reason: e.to_string(),
    })?;
    tx.prepare_cached(
        "INSERT INTO changes (tbl, key, app, image) VALUES ('machines', ?1, ?2, ?3)",
    )?
    .execute(params![image.id, image.app, json])?;
    Ok(true)
}
