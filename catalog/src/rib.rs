//! The RIB: Hangar's routing information base in SQLite.
//!
//! One writer connection, one reader connection for everyone, and one for
//! the FIB follower (`Rib::follow_read`), each behind a [`Guarded`] lock;
//! in WAL mode readers never block the writer. Every
//! write appends to `changes` in the same transaction and then calls the
//! in-process followers' commit hooks; followers in other processes poll
//! SQLite's `data_version` and read `changes` by sequence number.
//!
//! Row ownership: flaps writes orgs, tokens and apps; each flyd writes its
//! host and its machines. Machine rows carry the owner's `row_version`, and an
//! upsert with an older or equal version is ignored, so a late write can never
//! undo a newer one.

use crate::lock::{Guarded, LockTimeout};
use arc_swap::ArcSwap;
use hangar_api::machine::{MachineService, MachineState};
use hangar_api::time::now_ms;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Schema migrations, applied in order at open; `PRAGMA user_version` holds
/// how many have run. Append only: never edit a shipped migration.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE orgs (
    slug        TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,   -- sha256 of the token, hex
    org_slug    TEXT NOT NULL REFERENCES orgs(slug),
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE apps (
    name        TEXT PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    org_slug    TEXT NOT NULL REFERENCES orgs(slug),
    network     TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE hosts (
    id          TEXT PRIMARY KEY,
    region      TEXT NOT NULL,
    address     TEXT NOT NULL,       -- flyd's RPC address
    updated_at  INTEGER NOT NULL
);
CREATE TABLE machines (
    id          TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    region      TEXT NOT NULL,
    host        TEXT NOT NULL,
    state       TEXT NOT NULL,
    private_ip  TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    cordoned    INTEGER NOT NULL,
    services    TEXT NOT NULL,       -- JSON array of MachineService
    row_version INTEGER NOT NULL,    -- set by the owning flyd, increasing
    updated_at  INTEGER NOT NULL
);
CREATE INDEX machines_by_app ON machines(app);
CREATE TABLE changes (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl         TEXT NOT NULL,       -- 'apps' | 'hosts' | 'machines'
    key         TEXT NOT NULL,
    app         TEXT                 -- the app the change touches, if any
);
"#,
    // 2: service health, so the proxy routes around failing machines.
    r#"
ALTER TABLE machines ADD COLUMN healthy INTEGER NOT NULL DEFAULT 1;
"#,
    // 3: host capacity (JSON), for placement.
    r#"
ALTER TABLE hosts ADD COLUMN capacity TEXT NOT NULL DEFAULT '{}';
"#,
    // 4: app secrets, sealed (see secrets.rs), and each app's secrets version.
    r#"
CREATE TABLE secrets (
    app         TEXT NOT NULL,
    name        TEXT NOT NULL,
    sealed      BLOB NOT NULL,
    digest      TEXT NOT NULL,       -- of the value, to tell changes apart
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (app, name)
);
CREATE TABLE secrets_versions (
    app         TEXT PRIMARY KEY,
    version     INTEGER NOT NULL
);
"#,
    // 5: custom certificates: the proxy serves them by SNI and routes their
    // hostnames to the app. The private key is sealed like a secret.
    r#"
CREATE TABLE certificates (
    hostname    TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    fullchain   TEXT NOT NULL,
    sealed_key  BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX certificates_by_app ON certificates(app);
"#,
    // 6: flycast (private) addresses of apps, for the proxy's flycast listeners.
    r#"
CREATE TABLE ip_assignments (
    ip          TEXT PRIMARY KEY,
    app         TEXT NOT NULL,
    kind        TEXT NOT NULL,       -- 'private_v6' (flycast)
    network     TEXT NOT NULL,
    region      TEXT NOT NULL,
    service_name TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX ip_assignments_by_app ON ip_assignments(app);
"#,
    // 7: feed compaction: changes up to `compacted_through` are gone, so a
    // follower behind it must reload.
    r#"
CREATE TABLE feed_meta (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    compacted_through INTEGER NOT NULL
);
INSERT INTO feed_meta (id, compacted_through) VALUES (1, 0);
"#,
    // 8: per-app per-region summaries, derived from the machine rows so they
    // can never disagree with them (machines_by_app finds an app's rows).
    r#"
CREATE VIEW app_region_summaries AS
SELECT app, region,
       SUM(state = 'started')   AS started,
       SUM(state = 'stopped')   AS stopped,
       SUM(state = 'suspended') AS suspended,
       SUM(state = 'started' AND cordoned = 0 AND healthy = 1) AS routable
FROM machines WHERE state != 'destroyed'
GROUP BY app, region;
"#,
    // 9: a machine change carries what the FIB routes on (a `RouteImage`,
    // JSON), so a follower applies it without reading the machine's row.
    r#"
ALTER TABLE changes ADD COLUMN image TEXT;
"#,
    // 10: the app's primary region as the machine's config names it
    // (`env.PRIMARY_REGION`, as Fly's tools set it), for autostop's
    // `min_machines_running`.
    r#"
ALTER TABLE machines ADD COLUMN primary_region TEXT;
"#,
];

/// The newest change's sequence number. After a compaction that kept no
/// change the table is empty, so the compaction point counts too.
const LAST_SEQ: &str = "SELECT MAX(COALESCE((SELECT MAX(seq) FROM changes), 0),
                           (SELECT compacted_through FROM feed_meta))";

/// A failed RIB operation.
#[derive(Debug, thiserror::Error)]
pub enum RibError {
    #[error("rib: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("rib: {0}")]
    Lock(#[from] LockTimeout),
    #[error("rib: {what} {key:?} already exists")]
    Conflict { what: &'static str, key: String },
    #[error("rib: corrupt row {key:?}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// An app row (written by flaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRow {
    pub name: String,
    pub id: String,
    pub org_slug: String,
    pub network: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

/// A host row (written by its flyd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRow {
    pub id: String,
    pub region: String,
    /// The flyd RPC address, `ip:port`.
    pub address: String,
    pub updated_at: i64,
    /// What the host can schedule and what its machines reserve.
    pub capacity: HostCapacity,
}

/// A host's schedulable capacity (physical, times any overcommit) and what
/// its live machines reserve. Stored as JSON so it can grow fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct HostCapacity {
    pub cpus: u64,
    pub memory_mb: u64,
    pub cpus_reserved: u64,
    pub memory_mb_reserved: u64,
}

impl HostCapacity {
    /// Whether a guest of `cpus` and `memory_mb` still fits.
    pub fn fits(&self, cpus: u64, memory_mb: u64) -> bool {
        self.cpus_reserved + cpus <= self.cpus
            && self.memory_mb_reserved + memory_mb <= self.memory_mb
    }
}

/// A machine row (written by the flyd that owns the machine).
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRow {
    pub id: String,
    pub app: String,
    pub region: String,
    pub host: String,
    pub state: MachineState,
    pub private_ip: String,
    pub instance_id: String,
    pub cordoned: bool,
    pub services: Vec<MachineService>,
    /// Whether every service check passes (true when there are none).
    pub healthy: bool,
    /// The app's primary region, from the config's `env.PRIMARY_REGION`.
    pub primary_region: Option<String>,
    /// Increases with every write by the owner; stale writes are dropped.
    pub row_version: u64,
    pub updated_at: i64,
}

/// A sealed app secret (written by flaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRow {
    pub name: String,
    /// Nonce and ciphertext, from [`crate::SecretBox::seal`].
    pub sealed: Vec<u8>,
    pub digest: String,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A custom certificate for a hostname of an app (written by flaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateRow {
    pub hostname: String,
    pub app: String,
    /// PEM, leaf first.
    pub fullchain: String,
    /// The PEM private key, sealed with the secrets key (associated data:
    /// app `certificates`, name = hostname).
    pub sealed_key: Vec<u8>,
    pub created_at: i64,
}

/// An address assigned to an app (written by flaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpRow {
    pub ip: String,
    pub app: String,
    /// The Fly type asked for; Hangar assigns `private_v6` (flycast).
    pub kind: String,
    pub network: String,
    pub region: String,
    pub service_name: String,
    pub created_at: i64,
}

/// A secret value as stored: sealed, with the digest of its clear value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub sealed: Vec<u8>,
    pub digest: String,
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    pub table: String,
    pub key: String,
    pub app: Option<String>,
    /// For a machine change, the machine as the FIB routes on it after the
    /// change (JSON of `RouteImage`).
    pub image: Option<String>,
}

/// What the FIB routes on of one machine, as a machine change carries it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RouteImage {
    pub id: String,
    pub app: String,
    pub region: String,
    pub host: String,
    pub state: MachineState,
    pub private_ip: String,
    pub cordoned: bool,
    pub healthy: bool,
    /// The services JSON, as the row stores it.
    pub services: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
}

impl RouteImage {
    pub fn row(&self) -> RouteRow<'_> {
        RouteRow {
            id: &self.id,
            app: &self.app,
            region: &self.region,
            host: &self.host,
            state: self.state,
            private_ip: &self.private_ip,
            cordoned: self.cordoned,
            healthy: self.healthy,
            services: &self.services,
            primary_region: self.primary_region.as_deref(),
        }
    }
}

/// A machine as the FIB reads it: borrowed columns, services still JSON so
/// the reader can share one decoded copy among machines with equal config.
pub(crate) struct RouteRow<'a> {
    pub id: &'a str,
    pub app: &'a str,
    pub region: &'a str,
    pub host: &'a str,
    pub state: MachineState,
    pub private_ip: &'a str,
    pub cordoned: bool,
    pub healthy: bool,
    pub services: &'a str,
    pub primary_region: Option<&'a str>,
}

/// Which machines [`RibView::for_each_route`] reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Routes<'a> {
    All,
    App(&'a str),
    Machine(&'a str),
}

/// One row of the `app_region_summaries` view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSummaryRow {
    pub region: String,
    pub started: u64,
    pub stopped: u64,
    pub suspended: u64,
    pub routable: u64,
}

/// Called after every commit that appended changes, with the newest
/// sequence number. Runs on the writer's thread: it must not block.
pub type CommitHook = Arc<dyn Fn(u64) + Send + Sync>;

/// The RIB: see the module docs.
pub struct Rib {
    writer: Guarded<Connection>,
    reader: Guarded<Connection>,
    /// The FIB follower's own connection: see [`Rib::follow_read`].
    follower: Guarded<Connection>,
    /// In-process followers to wake after a commit. Read without a lock on
    /// every commit; replaced whole when one registers.
    hooks: ArcSwap<Vec<CommitHook>>,
}

/// How long a caller waits for a RIB connection before giving up. SQLite
/// statements here take microseconds; waiting longer means something is stuck.
const LOCK_WAIT: Duration = Duration::from_secs(5);

fn open_conn(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // A RIB of a million machines is a few hundred MB: 32 MB of page cache
    // instead of SQLite's 2 MB. The writer's stays valid between its own
    // transactions; a reader's lasts one transaction (in WAL mode it is
    // dropped whenever another connection has committed), which for the
    // follower is a whole catch-up, whose lookups share the upper B-tree
    // pages. (256 MB did no better: emptying it costs more.) No memory map:
    // it was slower, as the file grows at each checkpoint and each growth
    // remaps it.
    conn.pragma_update(None, "cache_size", -32 * 1024)?;
    // Another process (a second flyd, a proxy) may hold the write lock briefly.
    conn.busy_timeout(LOCK_WAIT)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let done: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tracing::info!(migration = i + 1, "rib migrated");
    }
    tx.commit()
}

fn append_change(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    key: &str,
    app: Option<&str>,
) -> Result<u64, rusqlite::Error> {
    tx.prepare_cached("INSERT INTO changes (tbl, key, app) VALUES (?1, ?2, ?3)")?
        .execute(params![table, key, app])?;
    Ok(tx.last_insert_rowid() as u64)
}

fn machine_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(MachineRow, String, String)> {
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

fn decode_machine(
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

const MACHINE_COLUMNS: &str = "id, app, region, host, state, private_ip, instance_id, cordoned, services, row_version, updated_at, healthy, primary_region";

impl Rib {
    /// Opens (creating if needed) and migrates the RIB at `path`.
    pub fn open(path: &Path) -> Result<Arc<Self>, RibError> {
        let mut writer = open_conn(path)?;
        migrate(&mut writer)?;
        let reader = open_conn(path)?;
        let follower = open_conn(path)?;
        Ok(Arc::new(Self {
            writer: Guarded::new("rib.writer", LOCK_WAIT, writer),
            reader: Guarded::new("rib.reader", LOCK_WAIT, reader),
            follower: Guarded::new("rib.follower", LOCK_WAIT, follower),
            hooks: ArcSwap::from_pointee(Vec::new()),
        }))
    }

    /// Calls `hook` after every commit of this process that appends changes.
    pub fn on_commit(&self, hook: CommitHook) {
        self.hooks.rcu(|hooks| {
            let mut hooks = Vec::clone(hooks);
            hooks.push(hook.clone());
            hooks
        });
    }

    /// The RIB's connection locks, for telemetry.
    pub fn locks(&self) -> [crate::lock::LockStats; 3] {
        [
            self.writer.stats(),
            self.reader.stats(),
            self.follower.stats(),
        ]
    }

    /// Runs `f` in one read transaction on the FIB follower's own
    /// connection: one consistent view of the RIB for a whole catch-up (or
    /// load), one lock round instead of one per query, and API reads on the
    /// shared reader never wait behind a long load.
    pub(crate) fn follow_read<R>(
        &self,
        label: &'static str,
        f: impl FnOnce(&RibView<'_>) -> Result<R, RibError>,
    ) -> Result<R, RibError> {
        self.follower.with(label, |c| {
            c.execute_batch("BEGIN")?;
            let out = f(&RibView(c));
            // Read only: ending it cannot lose anything, error or not.
            let ended = c.execute_batch("COMMIT");
            let out = out?;
            ended?;
            Ok(out)
        })?
    }

    /// SQLite's `data_version` on the follower's connection: it changes
    /// whenever another connection (this process's writer, or another
    /// process) commits. Checking it costs no disk read, so the follower
    /// polls it every few milliseconds.
    pub(crate) fn follower_data_version(&self) -> Result<u64, RibError> {
        self.follower
            .with("data_version", |c| RibView(c).data_version())?
    }

    /// Runs `f` in one write transaction; wakes followers if it appended changes.
    fn write<R>(
        &self,
        label: &'static str,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<R, RibError>,
    ) -> Result<R, RibError> {
        let (out, last_seq) = self.writer.with(label, |conn| -> Result<_, RibError> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let before: i64 = tx.query_row(LAST_SEQ, [], |r| r.get(0))?;
            let out = f(&tx)?;
            let after: i64 = tx.query_row(LAST_SEQ, [], |r| r.get(0))?;
            tx.commit()?;
            Ok((out, (after > before).then_some(after as u64)))
        })??;
        if let Some(seq) = last_seq {
            for hook in self.hooks.load().iter() {
                hook(seq);
            }
        }
        Ok(out)
    }

    fn read<R>(
        &self,
        label: &'static str,
        f: impl FnOnce(&Connection) -> Result<R, RibError>,
    ) -> Result<R, RibError> {
        self.reader.with(label, |conn| f(conn))?
    }

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

/// Reads on one connection. [`Rib`]'s read methods run these on the shared
/// reader; the FIB runs them on its own connection inside one read
/// transaction per catch-up (see `Rib::follow_read`), which both saves a
/// lock round per query and gives it one consistent view of the RIB.
pub struct RibView<'c>(&'c Connection);

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

fn insert_app(tx: &rusqlite::Transaction<'_>, app: &AppRow) -> Result<(), RibError> {
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

fn services_json(m: &MachineRow) -> Result<String, RibError> {
    serde_json::to_string(&m.services).map_err(|e| RibError::Corrupt {
        key: m.id.clone(),
        reason: e.to_string(),
    })
}

fn upsert_machine(
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

fn app_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AppRow> {
    Ok(AppRow {
        name: r.get(0)?,
        id: r.get(1)?,
        org_slug: r.get(2)?,
        network: r.get(3)?,
        created_at: r.get(4)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(id: &str, version: u64, state: MachineState) -> MachineRow {
        MachineRow {
            id: id.into(),
            app: "hello".into(),
            region: "dev".into(),
            host: "h1".into(),
            state,
            private_ip: "127.10.0.2".into(),
            instance_id: "v1".into(),
            cordoned: false,
            services: vec![],
            row_version: version,
            healthy: true,
            primary_region: None,
            updated_at: 0,
        }
    }

    #[test]
    fn stale_machine_versions_never_overwrite_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let rib = Rib::open(&dir.path().join("rib.sqlite")).unwrap();
        assert!(
            rib.upsert_machine(&machine("m1", 2, MachineState::Started))
                .unwrap()
        );
        assert!(
            !rib.upsert_machine(&machine("m1", 1, MachineState::Stopped))
                .unwrap()
        );
        assert!(
            !rib.upsert_machine(&machine("m1", 2, MachineState::Stopped))
                .unwrap()
        );
        assert_eq!(
            rib.machine("m1").unwrap().unwrap().state,
            MachineState::Started
        );
        assert!(
            rib.upsert_machine(&machine("m1", 3, MachineState::Stopped))
                .unwrap()
        );
        assert_eq!(
            rib.machine("m1").unwrap().unwrap().state,
            MachineState::Stopped
        );
        // Two applied writes, two changes; ignored writes append nothing.
        let changes = rib.changes_since(0, 100).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(rib.last_seq().unwrap(), changes[1].seq);
    }

    #[test]
    fn a_version_1_database_migrates_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.sqlite");
        {
            // What a Hangar with only the first migration left behind.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO machines VALUES ('m1','a','dev','h1','started','127.10.0.2','v1',0,'[]',1,0)",
                [],
            )
            .unwrap();
        }
        let rib = Rib::open(&path).unwrap();
        let m = rib.machine("m1").unwrap().unwrap();
        assert!(m.healthy, "old rows are healthy");
        assert_eq!(m.state, MachineState::Started);
        let version: usize = rib
            .read("test", |c| {
                Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?)
            })
            .unwrap();
        assert_eq!(version, MIGRATIONS.len());
    }

    #[test]
    fn app_names_are_unique_and_reopening_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rib.sqlite");
        {
            let rib = Rib::open(&path).unwrap();
            rib.ensure_org("personal", "Personal").unwrap();
            let app = AppRow {
                name: "hello".into(),
                id: "a1".into(),
                org_slug: "personal".into(),
                network: "default".into(),
                created_at: 1,
            };
            rib.create_app(&app).unwrap();
            assert!(matches!(
                rib.create_app(&app),
                Err(RibError::Conflict { .. })
            ));
        }
        let rib = Rib::open(&path).unwrap();
        assert_eq!(rib.apps(Some("personal")).unwrap().len(), 1);
        assert_eq!(rib.last_seq().unwrap(), 1);
        // An app of an unknown org is refused by the foreign key.
        let orphan = AppRow {
            name: "x".into(),
            id: "a2".into(),
            org_slug: "nope".into(),
            network: "default".into(),
            created_at: 1,
        };
        assert!(matches!(rib.create_app(&orphan), Err(RibError::Sql(_))));
    }
}
