//! Riding through an outage of the repository's store (issue 23, decision 0031).
//!
//! While the store cannot be reached, a fill that a VM's read waits for is not failed: it is
//! tried again with back-off (250 ms doubling to 5 s, its scheduler slot given back while it
//! waits) until the store answers or `store_outage_grace` has passed since the last VM read
//! joined it; only then do its readers get the error (NFS3ERR_IO, an NBD or iSCSI read error).
//! Guesses (read-ahead, pre-staging) are not held: they fail at once and take no slot. While
//! the store is away, the chunk whose fetch found it so is fetched again every 5 s by a probe,
//! so that the end of an outage is seen even when no read comes (a VM paused by its I/O error
//! policy reads nothing until it is resumed).
//!
//! Owns: the grace, the back-off steps, the store's state as the fills see it (reachable, or
//! unreachable since when and why; the outages so far and the last one's length), its
//! transitions in the log, and the histogram of how long held reads waited.
//! Must not: fetch, or decide what an outage is (that is [`RepoError::is_outage`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::repo::RepoError;

/// How long a VM's read that misses the cache may wait for a store that is away, by default
/// (decision 0031: what the clients measured here tolerate).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(120);
/// The longest grace the config accepts.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);
/// The first wait after a failed attempt, doubled after each one up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// While the store is away, it is asked again this often even when no read waits (a paused
/// VM reads nothing), so that `status` says when it is back.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// The store as `livemount status`, `mounts` and the API show it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoreState {
    /// False while the store is unreachable (from the first failed fetch to the next one that
    /// succeeds).
    pub reachable: bool,
    /// When the current outage began.
    pub unreachable_since: Option<jiff::Timestamp>,
    /// The last failure of the current outage.
    pub error: Option<String>,
    /// VM reads waiting now for a fetch held by the outage, and the longest such wait so far.
    pub held_reads: u64,
    pub longest_held_seconds: f64,
    /// How long a read may be held.
    pub grace_seconds: f64,
    /// Outages seen since the server started, and the last one that ended.
    pub outages: u64,
    pub last_outage: Option<PastOutage>,
}

/// An outage that ended.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PastOutage {
    pub from: jiff::Timestamp,
    pub to: jiff::Timestamp,
    pub seconds: f64,
}

/// The store's reachability as the cache's fills find it.
#[derive(Debug)]
pub struct StoreHealth {
    grace_nanos: AtomicU64,
    /// Fast path of [`StoreHealth::on_success`]: whether `down` is set.
    is_down: AtomicBool,
    state: Mutex<Health>,
    held_seconds: Histogram,
}

#[derive(Debug, Default)]
struct Health {
    down: Option<Down>,
    outages: u64,
    last: Option<PastOutage>,
}

#[derive(Debug)]
struct Down {
    since: jiff::Timestamp,
    started: tokio::time::Instant,
    error: String,
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth {
            grace_nanos: AtomicU64::new(DEFAULT_GRACE.as_nanos() as u64),
            is_down: AtomicBool::new(false),
            state: Mutex::new(Health::default()),
            // 100 ms .. ~27 min.
            held_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 15)),
        }
    }
}

impl StoreHealth {
    pub fn grace(&self) -> Duration {
        Duration::from_nanos(self.grace_nanos.load(Relaxed))
    }

    pub fn set_grace(&self, grace: Duration) {
        let nanos = u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX);
        self.grace_nanos.store(nanos, Relaxed);
    }

    /// How long held reads waited (observed when each one ends), for `/metrics`.
    pub fn held_seconds(&self) -> Histogram {
        self.held_seconds.clone()
    }

    #[cfg(test)]
    pub(crate) fn held_seconds_count(&self) -> u64 {
        let mut text = String::new();
        let mut r = prometheus_client::registry::Registry::default();
        r.register("h", "h", self.held_seconds.clone());
        let _ = prometheus_client::encoding::text::encode(&mut text, &r);
        text.lines()
            .find_map(|l| l.strip_prefix("h_count "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn is_up(&self) -> bool {
        !self.is_down.load(Relaxed)
    }

    /// A fetch failed because the store is away; true if that begins an outage.
    pub(crate) fn on_outage(&self, e: &RepoError) -> bool {
        let mut h = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &mut h.down {
            Some(d) => {
                d.error = e.to_string();
                false
            }
            None => {
                tracing::warn!(error = %e, grace_seconds = self.grace().as_secs_f64(),
                    "the repository cannot be reached: VM reads that miss the cache are held until it is back or for the grace (store_outage_grace), cached reads and writes go on");
                h.down = Some(Down {
                    since: jiff::Timestamp::now(),
                    started: tokio::time::Instant::now(),
                    error: e.to_string(),
                });
                self.is_down.store(true, Relaxed);
                true
            }
        }
    }

    /// A fetch succeeded: an outage, if there was one, is over.
    pub(crate) fn on_success(&self) {
        if !self.is_down.load(Relaxed) {
            return;
        }
        let mut h = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = h.down.take() {
            let seconds = d.started.elapsed().as_secs_f64();
            tracing::info!(
                seconds,
                since = %d.since,
                "the repository is reachable again; held reads go on"
            );
            h.outages += 1;
            h.last = Some(PastOutage {
                from: d.since,
                to: jiff::Timestamp::now(),
                seconds,
            });
        }
        self.is_down.store(false, Relaxed);
    }

    /// A read that was held ended after `waited`, with or without its chunk.
    pub(crate) fn on_held_read(&self, waited: Duration, served: bool) {
        self.held_seconds.observe(waited.as_secs_f64());
        if !served {
            tracing::error!(
                seconds = waited.as_secs_f64(),
                "a VM read held for the store failed: the store was away for longer than store_outage_grace"
            );
        }
    }

    /// The state now; `held_reads` and `longest_held` come from the cache's fills.
    pub fn state(&self, held_reads: u64, longest_held: Duration) -> StoreState {
        let h = self.state.lock().unwrap_or_else(|p| p.into_inner());
        StoreState {
            reachable: h.down.is_none(),
            unreachable_since: h.down.as_ref().map(|d| d.since),
            error: h.down.as_ref().map(|d| d.error.clone()),
            held_reads,
            longest_held_seconds: longest_held.as_secs_f64(),
            grace_seconds: self.grace().as_secs_f64(),
            outages: h.outages,
            last_outage: h.last.clone(),
        }
    }
}

/// The wait after `attempts` failed attempts.
pub(crate) fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << attempts.saturating_sub(1).min(8))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let steps: Vec<u128> = (1..=8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(steps, [250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
