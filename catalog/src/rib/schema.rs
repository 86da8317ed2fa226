//! The schema: migrations, applied in order at open.

use super::LOCK_WAIT;
use rusqlite::Connection;
use std::path::Path;

/// Schema migrations, applied in order at open; `PRAGMA user_version` holds
/// how many have run. Append only: never edit a shipped migration.
pub(super) const MIGRATIONS: &[&str] = &[
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
pub(super) const LAST_SEQ: &str = "SELECT MAX(COALESCE((SELECT MAX(seq) FROM changes), 0),
                           (SELECT compacted_through FROM feed_meta))";

pub(super) fn open_conn(path: &Path) -> Result<Connection, rusqlite::Error> {
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

pub(super) fn migrate(conn: &mut Connection) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let done: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
        tracing::info!(migration = i + 1, "rib migrated");
    }
    tx.commit()
}
