//! Boot windows and the pre-stager: the moving parts around [`crate::profile`].
//!
//! Owns: [`BootWindow`], a new mount's record of its VM's boot (which blocks it reads first, in
//! order, from its first read until [`Learning::quiet`] passes with no new block or
//! [`Learning::limit`] is reached; cache hits and misses of the VM's reads meanwhile, and the
//! storage wait: the time in which at least one VM read waited for the repository), and
//! [`Prestage`], the task that warms a mount's boot set into the cache's staging area in the
//! profile's order, in the fetch scheduler's pre-staging class (VM reads overtake it).
//! Must not: decide what a profile says (that is `profile`), or fetch outside the cache.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;

use crate::cache::ChunkCache;
use crate::profile::{BootTrace, Source, TraceRead};
use crate::repo::{ChunkId, DiskImage};

/// How boot windows are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Learning {
    /// Longest boot window.
    pub limit: Duration,
    /// A window ends once this long passes without a block read for the first time.
    pub quiet: Duration,
}

impl Default for Learning {
    fn default() -> Self {
        Learning {
            limit: Duration::from_secs(120),
            quiet: Duration::from_secs(15),
        }
    }
}

/// A mount's boot window.
#[derive(Debug)]
pub struct BootWindow {
    learning: Learning,
    start: OnceLock<Instant>,
    trace: Mutex<Trace>,
    ended: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    wait: Mutex<StorageWait>,
}

/// The time during which at least one of the VM's reads waited for the repository: the union
/// of the waits' intervals, so reads waiting side by side count once, as the VM feels them.
#[derive(Debug, Default)]
struct StorageWait {
    total: Duration,
    /// The end of the last wait counted; waits end (and are added) in about this order.
    busy_until: Option<Instant>,
}

impl StorageWait {
    fn add(&mut self, start: Instant, end: Instant) {
        let from = match self.busy_until {
            Some(b) if b > start => b,
            _ => start,
        };
        if end > from {
            self.total += end - from;
        }
        if self.busy_until.is_none_or(|b| end > b) {
            self.busy_until = Some(end);
        }
    }
}

#[derive(Debug, Default)]
struct Trace {
    seen: HashSet<(usize, u64)>,
    /// Chunks the VM has read in the window (their first read is the one counted).
    chunks: HashSet<ChunkId>,
    reads: Vec<TraceRead>,
    last_new: Option<Instant>,
}

/// A boot window as listings show it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowStatus {
    /// `waiting` (no read yet), `recording`, or `ended`.
    pub state: String,
    /// Blocks read for the first time so far.
    pub blocks: u64,
    /// Chunks the VM read in the window whose first read was served from the cache, and
    /// those whose first read waited for the repository (later reads of a chunk are not
    /// counted: they hit because of the first).
    pub hits: u64,
    pub misses: u64,
    /// Seconds during which at least one VM read in the window waited for a repository fetch
    /// (its chunk was neither cached nor staged): what storage added to the boot.
    #[serde(default)]
    pub storage_wait_seconds: f64,
}

impl BootWindow {
    pub fn new(learning: Learning) -> Arc<BootWindow> {
        Arc::new(BootWindow {
            learning,
            start: OnceLock::new(),
            trace: Mutex::new(Trace::default()),
            ended: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            wait: Mutex::new(StorageWait::default()),
        })
    }

    /// Whether reads are still being recorded.
    pub fn recording(&self) -> bool {
        !self.ended.load(Relaxed)
    }

    /// Notes a VM read of `len` bytes at `offset` of disk number `disk` (the mount's disk
    /// files in order), named `name`.
    pub fn on_read(&self, disk: usize, name: &str, image: &DiskImage, offset: u64, len: u64) {
        if !self.recording() || len == 0 {
            return;
        }
        let now = Instant::now();
        let start = *self.start.get_or_init(|| now);
        let cs = image.chunk_size().as_u64();
        let first = offset / cs;
        let last = (offset.saturating_add(len) - 1) / cs;
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        for block in first..=last.min(image.block_count().saturating_sub(1)) {
            // Zero blocks are never fetched: nothing to learn about them.
            let Some(chunk) = image.chunk_of_block(block) else {
                continue;
            };
            if t.seen.insert((disk, block)) {
                t.reads.push(TraceRead {
                    disk: name.to_string(),
                    block,
                    chunk,
                    at_ms: now.duration_since(start).as_millis() as u64,
                });
                t.last_new = Some(now);
            }
        }
    }

    /// Counts the VM's first read of a chunk during the window.
    pub fn on_access(&self, chunk: &ChunkId, hit: bool) {
        if !self.recording() {
            return;
        }
        let first = self
            .trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .chunks
            .insert(*chunk);
        if first {
            if hit {
                self.hits.fetch_add(1, Relaxed);
            } else {
                self.misses.fetch_add(1, Relaxed);
            }
        }
    }

    /// Counts a VM read that waited for the repository from `start` to `end`.
    pub fn on_wait(&self, start: Instant, end: Instant) {
        if !self.recording() {
            return;
        }
        self.wait
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(start, end);
    }

    /// Whether the window is over at `now`: quiet for long enough, or at its limit.
    pub fn due(&self, now: Instant) -> bool {
        let Some(start) = self.start.get() else {
            return false;
        };
        let t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        let quiet_since = t.last_new.unwrap_or(*start);
        now.duration_since(*start) >= self.learning.limit
            || now.duration_since(quiet_since) >= self.learning.quiet
    }

    /// Ends the window; the trace if the VM read anything and the window was still open.
    pub fn end(&self) -> Option<BootTrace> {
        if self.ended.swap(true, Relaxed) {
            return None;
        }
        let t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        (!t.reads.is_empty()).then(|| BootTrace {
            reads: t.reads.clone(),
        })
    }

    pub fn status(&self) -> WindowStatus {
        let blocks = self
            .trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reads
            .len() as u64;
        let state = if !self.recording() {
            "ended"
        } else if self.start.get().is_some() {
            "recording"
        } else {
            "waiting"
        };
        WindowStatus {
            state: state.into(),
            blocks,
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            storage_wait_seconds: self
                .wait
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .total
                .as_secs_f64(),
        }
    }
}

/// Where a pre-stager puts a boot set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The memory cache's staging area, for a mount whose VM is about to boot.
    Staging,
    /// The disk tier, ahead of any mount.
    Disk,
}

/// Chunk fetches a pre-stager keeps going at once (in order of the profile).
pub const PRESTAGE_CONCURRENCY: usize = 8;

/// A mount's pre-staging: its boot set and how far it has come.
#[derive(Debug)]
pub struct Prestage {
    pub source: Source,
    chunks: Vec<ChunkId>,
    chunk_size: u64,
    fetched: AtomicU64,
    cached: AtomicU64,
    failed: AtomicU64,
    finished: AtomicBool,
    cancelled: AtomicBool,
    started: Instant,
    took_ms: AtomicU64,
    /// Its fetches' rank among pre-stagers: its start order (`fetch::next_rank`).
    rank: u64,
}

/// Pre-staging as listings show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PrestageStatus {
    pub source: Source,
    /// Chunks in the boot set, and their bytes (at most one chunk size each).
    pub chunks: u64,
    pub bytes: u64,
    /// Chunks fetched into the staging area, found cached already, and failed to fetch.
    pub fetched: u64,
    pub cached: u64,
    pub failed: u64,
    pub finished: bool,
    /// Seconds from the start to the end of pre-staging (so far, while it runs).
    pub seconds: f64,
}

impl PrestageStatus {
    /// Chunks dealt with (fetched, found cached or failed).
    pub fn done(&self) -> u64 {
        self.fetched + self.cached + self.failed
    }
}

impl Prestage {
    pub fn new(source: Source, chunks: Vec<ChunkId>, chunk_size: u64) -> Arc<Prestage> {
        Arc::new(Prestage {
            source,
            chunks,
            chunk_size,
            fetched: AtomicU64::new(0),
            cached: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            started: Instant::now(),
            took_ms: AtomicU64::new(0),
            rank: crate::fetch::next_rank(),
        })
    }

    /// Warms the boot set into `cache`'s staging area, in order, [`PRESTAGE_CONCURRENCY`]
    /// fetches at a time, ranked after the pre-stagers made before it (the scheduler serves
    /// their fetches first). A chunk that fails is counted and skipped: the VM's own read of it
    /// will report it.
    pub async fn run(self: Arc<Self>, cache: Arc<ChunkCache>) {
        self.run_into(cache, Target::Staging).await
    }

    /// The same into the cache's disk tier, ahead of any mount (`livemount prestage`).
    pub async fn run_into(self: Arc<Self>, cache: Arc<ChunkCache>, target: Target) {
        let me = self.clone();
        let mut results = futures::stream::iter(self.chunks.clone())
            .take_while(move |_| std::future::ready(!me.cancelled.load(Relaxed)))
            .map(|id| {
                let (cache, rank) = (cache.clone(), self.rank);
                async move {
                    match target {
                        Target::Staging => cache.stage(&id, rank).await,
                        Target::Disk => cache.warm_disk(&id, rank).await,
                    }
                }
            })
            .buffered(PRESTAGE_CONCURRENCY);
        while let Some(r) = results.next().await {
            match r {
                Ok(true) => self.fetched.fetch_add(1, Relaxed),
                Ok(false) => self.cached.fetch_add(1, Relaxed),
                Err(e) => {
                    tracing::warn!(error = %e, "pre-staging a chunk failed");
                    self.failed.fetch_add(1, Relaxed)
                }
            };
        }
        self.took_ms
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
        self.finished.store(true, Relaxed);
    }

    /// Stops starting fetches (the mount is going away); those under way finish.
    pub fn cancel(&self) {
        self.cancelled.store(true, Relaxed);
    }

    pub fn status(&self) -> PrestageStatus {
        let finished = self.finished.load(Relaxed);
        let ms = if finished {
            self.took_ms.load(Relaxed)
        } else {
            self.started.elapsed().as_millis() as u64
        };
        PrestageStatus {
            source: self.source.clone(),
            chunks: self.chunks.len() as u64,
            bytes: self.chunks.len() as u64 * self.chunk_size,
            fetched: self.fetched.load(Relaxed),
            cached: self.cached.load(Relaxed),
            failed: self.failed.load(Relaxed),
            finished,
            seconds: ms as f64 / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_waits_for_the_first_read_and_ends_when_quiet_or_at_its_limit() {
        let w = BootWindow::new(Learning {
            limit: Duration::from_secs(60),
            quiet: Duration::from_secs(5),
        });
        let t0 = Instant::now();
        assert!(!w.due(t0 + Duration::from_secs(3600)), "no read yet");
        assert_eq!(w.status().state, "waiting");
        w.start.set(t0).unwrap();
        w.trace.lock().unwrap().last_new = Some(t0 + Duration::from_secs(4));
        assert!(!w.due(t0 + Duration::from_secs(8)));
        assert!(
            w.due(t0 + Duration::from_secs(9)),
            "5 s without a new block"
        );
        w.trace.lock().unwrap().last_new = Some(t0 + Duration::from_secs(59));
        assert!(w.due(t0 + Duration::from_secs(60)), "the limit");
        w.on_access(&ChunkId([1; 32]), true);
        w.on_access(&ChunkId([2; 32]), false);
        w.on_access(&ChunkId([2; 32]), true);
        assert_eq!(w.end(), None, "nothing read");
        assert_eq!(w.end(), None);
        w.on_access(&ChunkId([3; 32]), true);
        let s = w.status();
        assert_eq!((s.state.as_str(), s.hits, s.misses), ("ended", 1, 1));
    }

    /// A store that takes 10 ms a fetch and records the order of fetches.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<u8>>);

    #[async_trait::async_trait]
    impl crate::repo::ChunkReader for Recorder {
        async fn read_chunk(&self, id: &ChunkId) -> Result<bytes::Bytes, crate::repo::RepoError> {
            tokio::time::sleep(Duration::from_millis(10)).await;
            self.0.lock().unwrap().push(id.0[0]);
            Ok(bytes::Bytes::from(id.0.to_vec()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn of_two_boot_sets_warmed_at_once_the_first_started_is_warm_first() {
        let src = Arc::new(Recorder::default());
        let sched = crate::fetch::FetchScheduler::new(2, 1);
        let cache = Arc::new(ChunkCache::with_scheduler(src.clone(), 64 << 20, sched));
        let set = |first: u8| {
            (0..40u8)
                .map(|i| ChunkId([first + i; 32]))
                .collect::<Vec<_>>()
        };
        let source = Source::Own { vm: "p".into() };
        let (a, b) = (
            Prestage::new(source.clone(), set(0), 4096),
            Prestage::new(source, set(100), 4096),
        );
        // The later one is run first: rank, not arrival, decides.
        let second = tokio::spawn(b.clone().run(cache.clone()));
        tokio::task::yield_now().await;
        let first = tokio::spawn(a.clone().run(cache.clone()));
        first.await.unwrap();
        let done_b = b.status().done();
        second.await.unwrap();
        let order = src.0.lock().unwrap().clone();
        let last_a = order.iter().rposition(|&x| x < 100).unwrap();
        let b_before = order[..last_a].iter().filter(|&&x| x >= 100).count();
        assert!(
            b_before <= crate::prestage::PRESTAGE_CONCURRENCY,
            "{b_before} of the later boot set fetched before the first was warm: {order:?}"
        );
        assert!(done_b < 40, "the later one finished with the first");
    }

    #[test]
    fn storage_wait_counts_overlapping_waits_once() {
        let w = BootWindow::new(Learning::default());
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Two reads waiting side by side (0..100 and 50..120), then one alone (200..230).
        w.on_wait(ms(0), ms(100));
        w.on_wait(ms(50), ms(120));
        w.on_wait(ms(200), ms(230));
        // A wait inside one already counted adds nothing.
        w.on_wait(ms(205), ms(210));
        let got = w.status().storage_wait_seconds;
        assert!((got - 0.150).abs() < 1e-9, "{got}");
        w.end();
        w.on_wait(ms(300), ms(400));
        assert!(
            (w.status().storage_wait_seconds - 0.150).abs() < 1e-9,
            "after the window"
        );
    }
}
