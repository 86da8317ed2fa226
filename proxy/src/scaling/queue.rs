//! Requests waiting for a slot when every machine of their app is at its
//! hard limit.
//!
//! Each app with waiters has a queue: a count and a [`Notify`]. A waiter
//! registers for a wake-up, tries to take a slot, and sleeps until a lease
//! of the app is released or its deadline passes; a release wakes one
//! waiter, which tries again. The queue is bounded per app, and the wait by
//! `queue_timeout`: past either, the request gets 503 with `Retry-After`.
//!
//! A new request does not queue behind waiters: it takes a free slot when
//! it sees one, as a waiter woken at the same instant would. Releases cost
//! one atomic load while nobody waits anywhere.

use crate::error::QueueError;
use compact_str::CompactString;
use dashmap::DashMap;
use prometheus::IntGauge;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Every app's waiters.
#[derive(Debug)]
pub struct Queues {
    apps: DashMap<CompactString, Arc<AppQueue>>,
    /// Waiters over all apps: releases skip the map while it is zero.
    waiting: AtomicUsize,
    max_per_app: usize,
    timeout: Duration,
    /// `fly_edge_queued_requests`.
    gauge: IntGauge,
}

#[derive(Debug, Default)]
struct AppQueue {
    waiting: AtomicUsize,
    notify: Notify,
}

impl Queues {
    /// Queues of at most `max_per_app` waiters, each waiting at most
    /// `timeout`. A zero `max_per_app` turns waiting off.
    /// `gauge` follows the number of waiters.
    pub fn new(max_per_app: usize, timeout: Duration, gauge: IntGauge) -> Self {
        Self {
            apps: DashMap::new(),
            waiting: AtomicUsize::new(0),
            max_per_app,
            timeout,
            gauge,
        }
    }

    /// A lease of `app` ended: wake one of its waiters, if any.
    pub fn released(&self, app: &str) {
        if self.waiting.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(queue) = self.apps.get(app) {
            queue.notify.notify_one();
        }
    }

    /// Waits in `app`'s queue until `attempt` returns `Some` (it is tried
    /// at once, then after every release of the app's leases), or the
    /// queue is full or the wait times out.
    pub async fn wait<T>(
        &self,
        app: &str,
        mut attempt: impl FnMut() -> Option<T>,
    ) -> Result<T, QueueError> {
        let queue = self
            .apps
            .entry(CompactString::from(app))
            .or_default()
            .clone();
        let _waiting = Waiting::enter(self, app, &queue).ok_or(QueueError::Full)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            // Registered before the attempt, so a release between the two
            // is not lost.
            let notified = queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(found) = attempt() {
                return Ok(found);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(QueueError::TimedOut(self.timeout));
            }
        }
    }

    /// Requests waiting over all apps.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// One waiter counted in its app's queue and the total; uncounted on drop,
/// and the app's queue removed once nobody waits in it.
struct Waiting<'a> {
    queues: &'a Queues,
    app: &'a str,
    queue: &'a AppQueue,
}

impl<'a> Waiting<'a> {
    fn enter(queues: &'a Queues, app: &'a str, queue: &'a AppQueue) -> Option<Self> {
        queue
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < queues.max_per_app).then_some(n + 1)
            })
            .ok()?;
        queues.waiting.fetch_add(1, Ordering::AcqRel);
        queues.gauge.inc();
        Some(Self { queues, app, queue })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.queues.waiting.fetch_sub(1, Ordering::AcqRel);
        self.queues.gauge.dec();
        if self.queue.waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.queues
                .apps
                .remove_if(self.app, |_, q| q.waiting.load(Ordering::Acquire) == 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn gauge() -> IntGauge {
        IntGauge::new("queued", "test").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_wakes_a_waiter_which_takes_the_slot() {
        let queues = Arc::new(Queues::new(10, Duration::from_secs(5), gauge()));
        let free = Arc::new(AtomicBool::new(false));
        let waiter = tokio::spawn({
            let (queues, free) = (queues.clone(), free.clone());
            async move {
                queues
                    .wait("app", || free.swap(false, Ordering::AcqRel).then_some(()))
                    .await
            }
        });
        while queues.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        free.store(true, Ordering::Release);
        queues.released("app");
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(queues.waiting(), 0);
        assert!(queues.apps.is_empty(), "an empty queue is removed");
    }

    #[tokio::test(start_paused = true)]
    async fn waits_are_bounded_in_time_and_in_number() {
        let queues = Arc::new(Queues::new(1, Duration::from_millis(300), gauge()));
        let first = tokio::spawn({
            let queues = queues.clone();
            async move { queues.wait("app", || None::<()>).await }
        });
        while queues.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            queues.wait("app", || None::<()>).await,
            Err(QueueError::Full)
        );
        // Another app has its own queue.
        assert_eq!(queues.wait("other", || Some(7)).await, Ok(7));
        assert_eq!(
            first.await.unwrap(),
            Err(QueueError::TimedOut(Duration::from_millis(300)))
        );
        assert_eq!(queues.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_release_of_another_app_wakes_nobody_here() {
        let queues = Arc::new(Queues::new(10, Duration::from_secs(1), gauge()));
        let tries = Arc::new(AtomicUsize::new(0));
        let waiter = tokio::spawn({
            let (queues, tries) = (queues.clone(), tries.clone());
            async move {
                queues
                    .wait("app", || {
                        tries.fetch_add(1, Ordering::Relaxed);
                        None::<()>
                    })
                    .await
            }
        });
        while queues.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        queues.released("other");
        assert!(waiter.await.unwrap().is_err());
        assert_eq!(tries.load(Ordering::Relaxed), 1);
    }
}
