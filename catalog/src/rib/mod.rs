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
//!
//! - `schema`: the migrations, applied at open.
//! - `rows`: the rows, as the RIB's callers see them.
//! - `apps`: orgs, tokens, apps and their secrets (flaps).
//! - `machines`: hosts and machines (flyd), and per-region summaries.
//! - `addresses`: certificates and IP assignments (flaps).
//! - `feed`: the change feed, its compaction, and [`RibView`], the reads
//!   the FIB follower makes in one transaction.

mod addresses;
mod apps;
mod feed;
mod machines;
mod rows;
mod schema;

pub use feed::RibView;
pub use rows::{
    AppRow, CertificateRow, Change, HostCapacity, HostRow, IpRow, MachineRow, RegionSummaryRow,
    SealedSecret, SecretRow,
};
pub(crate) use rows::{RouteImage, RouteRow, Routes};

use crate::lock::{Guarded, LockTimeout};
use arc_swap::ArcSwap;
use rusqlite::Connection;
use schema::{LAST_SEQ, migrate, open_conn};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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

/// Called after every commit that appended changes, with the newest
/// sequence number. Runs on the writer's thread: it must not block.
pub type CommitHook = Arc<dyn Fn(u64) + Send + Sync>;

/// The RIB: see the module docs.
pub struct Rib {
    /// The database file.
    path: PathBuf,
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

impl Rib {
    /// Opens (creating if needed) and migrates the RIB at `path`.
    pub fn open(path: &Path) -> Result<Arc<Self>, RibError> {
        let mut writer = open_conn(path)?;
        migrate(&mut writer)?;
        let reader = open_conn(path)?;
        let follower = open_conn(path)?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            writer: Guarded::new("rib.writer", LOCK_WAIT, writer),
            reader: Guarded::new("rib.reader", LOCK_WAIT, reader),
            follower: Guarded::new("rib.follower", LOCK_WAIT, follower),
            hooks: ArcSwap::from_pointee(Vec::new()),
        }))
    }

    /// SQLite's write-ahead log of the RIB: every commit, by any process,
    /// appends to it. It lasts while a connection is open (this `Rib`
    /// holds three).
    pub(crate) fn wal_path(&self) -> PathBuf {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        wal.into()
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
    /// process) commits. Checking it costs no disk read.
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
}

#[cfg(test)]
mod tests {
    use super::schema::MIGRATIONS;
    use super::*;
    use hangar_api::machine::MachineState;

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
