//! A mutex that is only entered through a closure, with a bounded wait.
//!
//! Fly's Catalog hung when a guard outlived the scope its author had in mind.
//! Here no guard escapes: [`Guarded::with`] runs a synchronous closure (so
//! nothing can await under the lock), waits at most the configured time, and
//! remembers who holds the lock and who held it last, so a stall names its
//! actors in the log without a debugger.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The lock could not be taken in time; the caller should retry or skip.
#[derive(Debug, Clone, thiserror::Error)]
#[error("lock {lock}: {label} waited {waited:?}; held by {holder}")]
pub struct LockTimeout {
    pub lock: &'static str,
    pub label: &'static str,
    pub waited: Duration,
    pub holder: &'static str,
}

/// `T` behind a mutex entered only through [`Guarded::with`].
pub struct Guarded<T> {
    name: &'static str,
    max_wait: Duration,
    inner: Mutex<T>,
    /// (current holder, last holder). Its own lock is held for a store only.
    holders: Mutex<(Option<&'static str>, Option<&'static str>)>,
    timeouts: AtomicU64,
}

impl<T> Guarded<T> {
    /// A lock named `name` whose callers wait at most `max_wait`.
    pub fn new(name: &'static str, max_wait: Duration, value: T) -> Self {
        Self {
            name,
            max_wait,
            inner: Mutex::new(value),
            holders: Mutex::new((None, None)),
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
        let Some(mut guard) = self.inner.try_lock_for(self.max_wait) else {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
            let holder = self
                .holders
                .lock()
                .0
                .unwrap_or("nobody (released meanwhile)");
            let err = LockTimeout {
                lock: self.name,
                label,
                waited: self.max_wait,
                holder,
            };
            tracing::warn!(lock = self.name, label, holder, "lock wait timed out");
            return Err(err);
        };
        self.holders.lock().0 = Some(label);
        let out = f(&mut guard);
        {
            let mut h = self.holders.lock();
            *h = (None, Some(label));
        }
        // The guard is released here, after the holder record is cleared.
        drop(guard);
        Ok(out)
    }

    /// The label of the current holder, if any.
    pub fn holder(&self) -> Option<&'static str> {
        self.holders.lock().0
    }

    /// The label of the last caller that released the lock.
    pub fn last_holder(&self) -> Option<&'static str> {
        self.holders.lock().1
    }

    /// How many callers gave up waiting.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
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
        release_tx.send(()).unwrap();
        t.join().unwrap();
        lock.with("after", |v| *v += 1).unwrap();
        assert_eq!(lock.last_holder(), Some("after"));
        assert_eq!(lock.with("read", |v| *v).unwrap(), 1);
    }
}
