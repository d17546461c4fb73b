//! A short history of the server's own counters, for the console's chart: every
//! [`INTERVAL`] one point (NFS read throughput, mean fetch latency of missed chunks, cache hit
//! ratio over that interval), the last [`POINTS`] of them kept in a ring.
//!
//! Owns: the ring and the last counters it saw (to turn running totals into rates).
//! Must not: count anything itself; it reads [`super::Totals`] and the cache's counters.
//! Locking: one std mutex, held to push or copy the ring, never across an await.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

/// Time between two points.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Points kept: ten minutes at [`INTERVAL`].
pub const POINTS: usize = 300;

/// Running totals at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub read_bytes: u64,
    pub fetches: u64,
    pub fetch_nanos: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

/// One interval of the chart.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Point {
    /// The interval's end.
    pub at: jiff::Timestamp,
    pub read_bytes_per_second: f64,
    /// Mean time to fetch a missed chunk in the interval; none: no fetch in it.
    pub fetch_latency_ms: Option<f64>,
    /// Cache hits among chunk lookups in the interval; none: no lookup in it.
    pub hit_ratio: Option<f64>,
}

/// The ring of points.
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    last: Option<(jiff::Timestamp, Counters)>,
    points: VecDeque<Point>,
}

impl History {
    /// Adds the point between the previous call and this one (the first call only sets the
    /// start). Counters that went backwards (they never should) count as no change.
    pub fn record(&self, at: jiff::Timestamp, now: Counters) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((then, before)) = inner.last {
            let seconds = (at.as_millisecond() - then.as_millisecond()) as f64 / 1000.0;
            if seconds > 0.0 {
                let d = |a: u64, b: u64| a.saturating_sub(b);
                let fetches = d(now.fetches, before.fetches);
                let lookups =
                    d(now.cache_hits, before.cache_hits) + d(now.cache_misses, before.cache_misses);
                let point = Point {
                    at,
                    read_bytes_per_second: d(now.read_bytes, before.read_bytes) as f64 / seconds,
                    fetch_latency_ms: (fetches > 0).then(|| {
                        d(now.fetch_nanos, before.fetch_nanos) as f64 / fetches as f64 / 1e6
                    }),
                    hit_ratio: (lookups > 0)
                        .then(|| d(now.cache_hits, before.cache_hits) as f64 / lookups as f64),
                };
                if inner.points.len() == POINTS {
                    inner.points.pop_front();
                }
                inner.points.push_back(point);
            }
        }
        inner.last = Some((at, now));
    }

    /// The points, oldest first.
    pub fn points(&self) -> Vec<Point> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.points.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn points_are_rates_over_their_interval_and_the_ring_keeps_the_last() {
        let h = History::default();
        h.record(at(0), Counters::default());
        assert!(h.points().is_empty(), "the first call only sets the start");
        h.record(
            at(2),
            Counters {
                read_bytes: 4 << 20,
                fetches: 4,
                fetch_nanos: 40_000_000,
                cache_hits: 3,
                cache_misses: 1,
            },
        );
        let p = h.points();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].read_bytes_per_second, (2 << 20) as f64);
        assert_eq!(p[0].fetch_latency_ms, Some(10.0));
        assert_eq!(p[0].hit_ratio, Some(0.75));
        // Nothing happened: no latency and no ratio, rather than zeros.
        let same = Counters {
            read_bytes: 4 << 20,
            fetches: 4,
            fetch_nanos: 40_000_000,
            cache_hits: 3,
            cache_misses: 1,
        };
        h.record(at(4), same);
        let p = h.points();
        assert_eq!(p[1].read_bytes_per_second, 0.0);
        assert_eq!(p[1].fetch_latency_ms, None);
        assert_eq!(p[1].hit_ratio, None);
        // A counter that goes backwards, or no time passing, makes no nonsense.
        h.record(at(4), Counters::default());
        h.record(at(6), Counters::default());
        assert_eq!(h.points().len(), 3);
        assert_eq!(h.points()[2].read_bytes_per_second, 0.0);
        for s in 4..(4 + POINTS as i64 * 2) {
            h.record(at(2 * s), Counters::default());
        }
        let p = h.points();
        assert_eq!(p.len(), POINTS);
        assert!(p.windows(2).all(|w| w[0].at < w[1].at));
    }
}
