//! A mutex that is only entered through a closure, with a bounded wait.
//!
//! Fly's Catalog hung when a guard outlived the scope its author had in mind.
//! Here no guard escapes: [`Guarded::with`] runs a synchronous closure (so
//! nothing can await under the lock), waits at most the configured time, and
//! remembers who holds the lock and who held it last, so a stall names its
//! actors in the log without a debugger.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The lock could not be taken in time; the caller should retry or skip.
#[derive(Debug, Clone, thiserror::Error)]
#[error("lock {lock}: {label} waited {waited:?}; held by {holder}")]
pub struct LockTimeout {
    pub lock: &'static str,
    pub label: &'static str,
    pub waited: Duration,
    pub holder: &'static str,
}

/// How long one call site waited for a lock, summed over its calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Waits {
    pub calls: u64,
    pub total_us: u64,
    pub max_us: u64,
    pub timeouts: u64,
}

/// A lock's telemetry at one moment: who holds it (and for how long), who
/// held it last, and the waits of every call site.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LockStats {
    pub lock: &'static str,
    pub holder: Option<&'static str>,
    pub held_for_us: Option<u64>,
    pub last_holder: Option<&'static str>,
    pub waits: BTreeMap<&'static str, Waits>,
}

#[derive(Default)]
struct Record {
    holder: Option<(&'static str, Instant)>,
    last_holder: Option<&'static str>,
    waits: BTreeMap<&'static str, Waits>,
}

/// `T` behind a mutex entered only through [`Guarded::with`].
pub struct Guarded<T> {
    name: &'static str,
    max_wait: Duration,
    inner: Mutex<T>,
    /// Holders and waits. Its own lock is held for a few stores only, never
    /// while `inner` is being waited for.
    record: Mutex<Record>,
    timeouts: AtomicU64,
}

impl<T> Guarded<T> {
    /// A lock named `name` whose callers wait at most `max_wait`.
    pub fn new(name: &'static str, max_wait: Duration, value: T) -> Self {
        Self {
            name,
            max_wait,
            inner: Mutex::new(value),
            record: Mutex::new(Record::default()),
            timeouts: AtomicU64::new(0),
        }
    }

    /// Runs `f` with the value locked. `label` names the call site in
    /// telemetry. On timeout, logs and counts it and returns an error.
    pub fn with<R>(
        &self,
        label: &'static str,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R, LockTimeout> {
        let asked = Instant::now();
        let Some(mut guard) = self.inner.try_lock_for(self.max_wait) else {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
            let holder = {
                let mut record = self.record.lock();
                let waits = record.waits.entry(label).or_default();
                waits.timeouts += 1;
                record
                    .holder
                    .map_or("nobody (released meanwhile)", |(holder, _)| holder)
            };
            tracing::warn!(lock = self.name, label, holder, waited = ?self.max_wait, "lock wait timed out");
            return Err(LockTimeout {
                lock: self.name,
                label,
                waited: self.max_wait,
                holder,
            });
        };
        let now = Instant::now();
        {
            let mut record = self.record.lock();
            record.holder = Some((label, now));
            let waited = (now - asked).as_micros() as u64;
            let waits = record.waits.entry(label).or_default();
            waits.calls += 1;
            waits.total_us += waited;
            waits.max_us = waits.max_us.max(waited);
        }
        let out = f(&mut guard);
        {
            let mut record = self.record.lock();
            record.holder = None;
            record.last_holder = Some(label);
        }
        // The guard is released here, after the holder record is cleared.
        drop(guard);
        Ok(out)
    }

    /// The label of the current holder and how long it has held the lock.
    pub fn holder(&self) -> Option<(&'static str, Duration)> {
        self.record
            .lock()
            .holder
            .map(|(label, since)| (label, since.elapsed()))
    }

    /// The label of the last caller that released the lock.
    pub fn last_holder(&self) -> Option<&'static str> {
        self.record.lock().last_holder
    }

    /// How many callers gave up waiting.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }

    /// Everything above at once, for `/debug/catalog`.
    pub fn stats(&self) -> LockStats {
        let record = self.record.lock();
        LockStats {
            lock: self.name,
            holder: record.holder.map(|(label, _)| label),
            held_for_us: record
                .holder
                .map(|(_, since)| since.elapsed().as_micros() as u64),
            last_holder: record.last_holder,
            waits: record.waits.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_stalled_holder_is_named_and_waiters_time_out() {
        let lock = Arc::new(Guarded::new("test", Duration::from_millis(20), 0u32));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let l2 = lock.clone();
        let t = std::thread::spawn(move || {
            l2.with("staller", |_| {
                held_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
            .unwrap();
        });
        held_rx.recv().unwrap();
        let err = lock.with("waiter", |v| *v += 1).unwrap_err();
        assert_eq!(err.holder, "staller");
        assert_eq!(err.label, "waiter");
        assert_eq!(lock.timeouts(), 1);
        assert_eq!(lock.holder().map(|(label, _)| label), Some("staller"));
        assert_eq!(lock.stats().waits["waiter"].timeouts, 1);
        release_tx.send(()).unwrap();
        t.join().unwrap();
        lock.with("after", |v| *v += 1).unwrap();
        assert_eq!(lock.last_holder(), Some("after"));
        assert_eq!(lock.with("read", |v| *v).unwrap(), 1);
    }
}
