//! The memory budget of calls in flight, across every connection: the bytes of call records
//! being read and handled, and of READ data waiting to be written to its client.
//!
//! Owns: the byte count and waiting for room in it.
//! Must not: know about calls or connections (the front and dispatch take and give back).
//!
//! Without it, 256 connections x 16 calls x a record or reply of about 1 MiB could hold
//! several GB outside `--cache-size` (issue 15). With it, a client that stops reading its
//! replies holds at most what it took until its connection is closed as stalled, and others
//! wait for room rather than grow memory.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A taker that has waited this long calls the budget's pressure hook (and again each time as
/// long again passes).
pub const PRESSURE_AFTER: Duration = Duration::from_secs(1);

/// Default budget: 256 MiB.
pub const DEFAULT_BYTES: usize = 256 << 20;

/// What to do when takers wait: free room (the front closes the connection whose client has
/// not taken a reply for longest).
pub type OnPressure = Arc<dyn Fn() + Send + Sync>;

/// A shared byte budget.
#[derive(Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: usize,
    on_pressure: Option<OnPressure>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("total", &self.total)
            .field("available", &self.sem.available_permits())
            .finish()
    }
}

/// Bytes taken from a budget, given back when dropped.
#[derive(Debug)]
pub struct Taken(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Budget {
    pub fn new(bytes: usize) -> Budget {
        let total = bytes.clamp(1, Semaphore::MAX_PERMITS);
        Budget {
            sem: Arc::new(Semaphore::new(total)),
            total,
            on_pressure: None,
        }
    }

    /// Calls `hook` whenever a taker has waited [`PRESSURE_AFTER`].
    pub fn on_pressure(mut self, hook: OnPressure) -> Budget {
        self.on_pressure = Some(hook);
        self
    }

    /// Waits until `bytes` fit (a request larger than the whole budget waits for all of it).
    pub async fn take(&self, bytes: usize) -> Taken {
        let n = u32::try_from(bytes.clamp(1, self.total)).unwrap_or(u32::MAX);
        let acquire = self.sem.clone().acquire_many_owned(n);
        tokio::pin!(acquire);
        loop {
            match tokio::time::timeout(PRESSURE_AFTER, &mut acquire).await {
                Ok(Ok(p)) => return Taken(Some(p)),
                // Never closed; nothing to hold.
                Ok(Err(_)) => return Taken(None),
                Err(_) => {
                    if let Some(hook) = &self.on_pressure {
                        hook();
                    }
                }
            }
        }
    }

    /// Bytes in use now.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.total - self.sem.available_permits()
    }
}

impl Taken {
    /// Nothing taken yet.
    pub fn nothing() -> Taken {
        Taken(None)
    }

    /// Holds `other` too, until this is dropped.
    pub fn merge(&mut self, other: Taken) {
        match (&mut self.0, other.0) {
            (Some(a), Some(b)) => a.merge(b),
            (a @ None, b) => *a = b,
            (_, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn takers_wait_for_room_and_get_it_back_on_drop() {
        let b = Budget::new(100);
        let mut a = b.take(60).await;
        a.merge(b.take(30).await);
        assert_eq!(b.used(), 90);
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.take(20)).await;
        assert!(waiting.is_err(), "20 more do not fit");
        drop(a);
        assert_eq!(b.used(), 0);
        // More than the whole budget waits for all of it, not for ever.
        let all = b.take(1000).await;
        assert_eq!(b.used(), 100);
        drop(all);
    }

    #[tokio::test(start_paused = true)]
    async fn a_taker_that_waits_calls_the_pressure_hook_until_room_is_made() {
        let held = Arc::new(std::sync::Mutex::new(None));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let b = {
            let (held, calls) = (held.clone(), calls.clone());
            Budget::new(100).on_pressure(Arc::new(move || {
                // The second call frees the room.
                if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    held.lock().unwrap().take();
                }
            }))
        };
        *held.lock().unwrap() = Some(b.take(100).await);
        let t0 = tokio::time::Instant::now();
        let _t = b.take(50).await;
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(t0.elapsed(), PRESSURE_AFTER * 2);
    }
}
