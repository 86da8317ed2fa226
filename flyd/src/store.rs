//! flyd's durable state in redb: machine records and FSM runs.
//!
//! Two tables, both keyed by id with JSON values so a record read back by a
//! newer flyd still decodes (serde defaults fill fields it did not have):
//! - `machines`: one [`MachineRecord`] per machine this host owns, destroyed
//!   ones included (they answer `GET` and `wait?state=destroyed`).
//! - `fsm_runs`: one [`FsmRun`] per lifecycle operation; a run whose status is
//!   `running` when flyd starts is resumed at its recorded step.
//!
//! Every write is its own redb transaction, committed durably before the
//! caller goes on: that is what lets a step be retried after a crash.

use crate::fsm::{FsmRun, RunStatus};
use crate::record::MachineRecord;
use redb::{Database, ReadableTable, TableDefinition};
use std::path::Path;

const MACHINES: TableDefinition<&str, &[u8]> = TableDefinition::new("machines");
const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("fsm_runs");

/// A failed store operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("flyd store: {0}")]
    Db(#[source] Box<redb::Error>),
    /// The store cannot be reached or used any more: a store over the
    /// network, or the model test's store after its crash.
    #[error("flyd store: {0}")]
    Unavailable(String),
    #[error("flyd store: record {key:?} does not decode: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// flyd's redb database.
pub struct Store {
    db: Database,
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(MACHINES).map_err(db_err)?;
        tx.open_table(RUNS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Self { db })
    }

    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(table).map_err(db_err)?;
            t.insert(key, value).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    fn delete(
        &self,
        table: TableDefinition<&str, &[u8]>,
        ids: &[String],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(table).map_err(db_err)?;
            for id in ids {
                t.remove(id.as_str()).map_err(db_err)?;
            }
        }
        tx.commit().map_err(db_err)
    }

    fn all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let value = serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                key: k.value().to_string(),
                source,
            })?;
            out.push(value);
        }
        Ok(out)
    }
}

/// What the FSM engine keeps: machine records and FSM runs. Every write is
/// durable when it returns: that is what lets a step run again after a
/// crash. [`Store`] (redb) is the one flyd runs on; the engine's model test
/// uses one that keeps only what was written before a chosen write, as a
/// crash at that write would.
pub trait FsmStore: Send + Sync + 'static {
    /// Writes a machine record.
    fn put_machine(&self, m: &MachineRecord) -> Result<(), StoreError>;

    /// One machine record.
    fn machine(&self, id: &str) -> Result<Option<MachineRecord>, StoreError>;

    /// Every machine record, by id.
    fn machines(&self) -> Result<Vec<MachineRecord>, StoreError>;

    /// Removes the records of `ids`, all or none.
    fn delete_machines(&self, ids: &[String]) -> Result<(), StoreError>;

    /// Writes an FSM run record.
    fn put_run(&self, run: &FsmRun) -> Result<(), StoreError>;

    /// Every FSM run, oldest first (run ids are ULIDs).
    fn runs(&self) -> Result<Vec<FsmRun>, StoreError>;

    /// Removes the runs of `ids`, all or none.
    fn delete_runs(&self, ids: &[String]) -> Result<(), StoreError>;

    /// The runs that had not finished when flyd last stopped.
    fn unfinished_runs(&self) -> Result<Vec<FsmRun>, StoreError> {
        Ok(self
            .runs()?
            .into_iter()
            .filter(|r| r.status == RunStatus::Running)
            .collect())
    }

    /// Deletes finished runs beyond the newest `keep`; unfinished runs are
    /// never deleted. Returns how many were deleted.
    fn prune_runs(&self, keep: usize) -> Result<usize, StoreError> {
        let finished: Vec<String> = self
            .runs()?
            .into_iter()
            .filter(|r| r.status != RunStatus::Running)
            .map(|r| r.id)
            .collect();
        // Ids are ULIDs, so the first ones are the oldest.
        let excess = finished.len().saturating_sub(keep);
        if excess > 0 {
            self.delete_runs(&finished[..excess])?;
        }
        Ok(excess)
    }
}

impl FsmStore for Store {
    fn put_machine(&self, m: &MachineRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(m).expect("machine records serialize");
        self.put(MACHINES, &m.id, &bytes)
    }

    fn machine(&self, id: &str) -> Result<Option<MachineRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(MACHINES).map_err(db_err)?;
        let Some(v) = t.get(id).map_err(db_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(|source| StoreError::Decode {
                key: id.to_string(),
                source,
            })
    }

    fn machines(&self) -> Result<Vec<MachineRecord>, StoreError> {
        self.all(MACHINES)
    }

    fn delete_machines(&self, ids: &[String]) -> Result<(), StoreError> {
        self.delete(MACHINES, ids)
    }

    fn put_run(&self, run: &FsmRun) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(run).expect("fsm runs serialize");
        self.put(RUNS, &run.id, &bytes)
    }

    fn runs(&self) -> Result<Vec<FsmRun>, StoreError> {
        self.all(RUNS)
    }

    fn delete_runs(&self, ids: &[String]) -> Result<(), StoreError> {
        self.delete(RUNS, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::FsmKind;

    #[test]
    fn pruning_keeps_unfinished_and_newest_runs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("flyd.redb")).unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let mut run = FsmRun::new(FsmKind::Start, &format!("m{i}"), serde_json::Value::Null);
            // Ids that sort in creation order, as ULIDs from distinct milliseconds do.
            run.id = format!("{i:026}");
            if i != 0 {
                run.status = RunStatus::Done;
            }
            store.put_run(&run).unwrap();
            ids.push(run.id);
        }
        assert_eq!(store.prune_runs(2).unwrap(), 2);
        let left: Vec<String> = store.runs().unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(left, [ids[0].clone(), ids[3].clone(), ids[4].clone()]);
        assert_eq!(store.unfinished_runs().unwrap().len(), 1);
        // Reopening reads the same.
        drop(store);
        let store = Store::open(&dir.path().join("flyd.redb")).unwrap();
        assert_eq!(store.runs().unwrap().len(), 3);
    }
}
