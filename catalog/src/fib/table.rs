//! The app table: a hash table split into shards behind `Arc`s, so a new
//! snapshot shares every shard its batch did not touch.
//!
//! Copying a million-entry map for each batch of changes would cost
//! milliseconds and megabytes; here a batch copies the shard pointer array
//! and only the shards it writes (each a few dozen entries). A lookup hashes
//! the name once: some bits pick the shard, the table inside uses the same
//! hash, and the entry is the app itself (its name is the key), so a hit
//! touches the shard, one bucket and the app.

use super::AppRoutes;
use hashbrown::{DefaultHashBuilder, HashTable};
use std::hash::BuildHasher;
use std::sync::Arc;

/// Apps per shard the table aims for when it is built.
const APPS_PER_SHARD: usize = 32;
const MIN_SHARDS: usize = 16;
const MAX_SHARDS: usize = 1 << 16;
/// The shard comes from hash bits 40.. : hashbrown uses the low bits for the
/// bucket and the top 7 for its control bytes, so none of them is constant
/// within a shard.
const SHARD_SHIFT: u32 = 40;

type Shard = HashTable<Arc<AppRoutes>>;

#[derive(Clone)]
pub(crate) struct AppTable {
    hasher: DefaultHashBuilder,
    shards: Box<[Arc<Shard>]>,
    len: usize,
}

impl AppTable {
    /// An empty table sized for about `apps` apps. The shard count is fixed
    /// until the next full load; a table that grows far past its size only
    /// gets longer shards.
    pub fn with_capacity(apps: usize) -> Self {
        let shards = (apps / APPS_PER_SHARD)
            .next_power_of_two()
            .clamp(MIN_SHARDS, MAX_SHARDS);
        Self {
            hasher: DefaultHashBuilder::default(),
            shards: (0..shards).map(|_| Arc::new(Shard::new())).collect(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn locate(&self, name: &str) -> (u64, usize) {
        let hash = self.hasher.hash_one(name);
        let shard = (hash >> SHARD_SHIFT) as usize & (self.shards.len() - 1);
        (hash, shard)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<AppRoutes>> {
        let (hash, shard) = self.locate(name);
        self.shards[shard].find(hash, |app| &*app.name == name)
    }

    /// Inserts or replaces the app of the same name; copies its shard first
    /// if an older snapshot still shares it.
    pub fn insert(&mut self, app: Arc<AppRoutes>) {
        let (hash, shard) = self.locate(&app.name);
        let hasher = &self.hasher;
        let table = Arc::make_mut(&mut self.shards[shard]);
        match table.find_mut(hash, |old| old.name == app.name) {
            Some(slot) => *slot = app,
            None => {
                table.insert_unique(hash, app, |a| hasher.hash_one(&*a.name));
                self.len += 1;
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<AppRoutes>> {
        let (hash, shard) = self.locate(name);
        // Look before copying: removing an absent app must not copy a shard.
        self.shards[shard].find(hash, |app| &*app.name == name)?;
        let table = Arc::make_mut(&mut self.shards[shard]);
        let removed = table
            .find_entry(hash, |app| &*app.name == name)
            .ok()
            .map(|entry| entry.remove().0);
        self.len -= usize::from(removed.is_some());
        removed
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<AppRoutes>> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    /// Bytes of the table itself (not of the apps): shard pointers, shard
    /// headers and their bucket arrays.
    pub fn table_bytes(&self) -> usize {
        self.shards.len() * size_of::<Arc<Shard>>()
            + self
                .shards
                .iter()
                .map(|s| size_of::<Shard>() + s.allocation_size())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str) -> Arc<AppRoutes> {
        Arc::new(AppRoutes::empty(name))
    }

    #[test]
    fn a_copy_shares_untouched_shards_and_sees_none_of_the_new_writes() {
        let mut table = AppTable::with_capacity(10_000);
        for i in 0..10_000 {
            table.insert(app(&format!("app-{i}")));
        }
        assert_eq!(table.len(), 10_000);
        let before = table.clone();
        table.insert(app("new"));
        assert!(table.remove("app-7").is_some());
        assert!(table.remove("absent").is_none());
        assert_eq!(table.len(), 10_000);
        assert!(before.get("new").is_none() && before.get("app-7").is_some());
        assert!(table.get("new").is_some() && table.get("app-7").is_none());
        let shared = table
            .shards
            .iter()
            .zip(before.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count();
        assert!(
            shared >= table.shards.len() - 2,
            "only touched shards are copied"
        );
        assert_eq!(table.iter().count(), 10_000);
    }
}
