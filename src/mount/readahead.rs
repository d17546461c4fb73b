//! Read-ahead for sequential readers of a disk (a hypervisor copying it, a guest streaming a
//! file): while reads keep arriving back to back, the next chunks are fetched into the cache
//! before they are asked for, in a window that doubles up to [`MAX_WINDOW`] chunks.
//!
//! Owns: detecting a sequential stream per disk file, and the prefetches it starts.
//! Must not: delay the read that triggered it (prefetches run as their own tasks), or grow
//! without bound (at most [`MAX_INFLIGHT`] chunk prefetches per disk at once; further ones are
//! skipped, not queued). A prefetch shares its fetch with any VM read of the same chunk through
//! the cache's single-flight fill. Prefetches run in the scheduler's background class, so VM
//! reads overtake them (see [`crate::fetch`]); they are made on behalf of the mount, so its own
//! VM reads do not hold them back, only other VMs' reads do.
//!
//! How deep: a stream read at rate R from a store whose fetches take L each needs R x L / C
//! chunks of size C in flight (Little's law): 700 MB/s at 20 ms per GET is 14 chunks of 1 MiB
//! (the chunk size), at 40 ms 28. [`MAX_WINDOW`] and [`MAX_INFLIGHT`] allow 32, and the
//! scheduler 28 lower-class fetches at once (decision 0012 has the measurements).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::reader::MountReader;
use crate::fetch::FetchClass;
use crate::repo::DiskImage;

/// Largest read-ahead window, in chunks (see the module's note on depth).
pub const MAX_WINDOW: u64 = 32;
/// Chunk prefetches in flight per disk.
pub const MAX_INFLIGHT: usize = 32;

/// Sequential-read detection and prefetching for one disk.
pub struct ReadAhead {
    /// The mount's reader: prefetches are the mount's, in the background class.
    reader: Arc<MountReader>,
    /// The stream's frontier: the highest end of a read in the stream.
    last_end: AtomicU64,
    /// Current window in chunks (0: not sequential).
    window: AtomicU64,
    /// Highest block already prefetched or requested, plus one.
    ahead: AtomicU64,
    inflight: Arc<Semaphore>,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadAhead")
            .field("last_end", &self.last_end)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl ReadAhead {
    pub fn new(reader: Arc<MountReader>) -> Self {
        ReadAhead {
            reader,
            last_end: AtomicU64::new(u64::MAX),
            window: AtomicU64::new(0),
            ahead: AtomicU64::new(0),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        }
    }

    /// Notes a read of `[offset, offset + len)` and, if the stream is sequential, starts
    /// prefetching the chunks after it. Returns at once.
    pub fn on_read(&self, image: &DiskImage, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let cs = image.chunk_size().as_u64();
        // Part of the stream: it starts at the frontier, or (a client with several requests in
        // flight, which arrive out of order) within the current window behind or ahead of it.
        let frontier = self.last_end.load(Ordering::Relaxed);
        let slack = (self.window.load(Ordering::Relaxed) + 1) * cs;
        let in_stream = frontier != u64::MAX
            && offset <= frontier.saturating_add(slack)
            && offset.saturating_add(slack) >= frontier;
        if !in_stream || len == 0 {
            self.last_end.store(end, Ordering::Relaxed);
            self.window.store(0, Ordering::Relaxed);
            self.ahead.store(0, Ordering::Relaxed);
            return;
        }
        let end = self.last_end.fetch_max(end, Ordering::Relaxed).max(end);
        let window = (self.window.load(Ordering::Relaxed) * 2).clamp(1, MAX_WINDOW);
        self.window.store(window, Ordering::Relaxed);
        // From the block holding the next byte, `window` blocks on.
        let first = (end / cs).max(self.ahead.load(Ordering::Relaxed));
        let last = (end / cs + window).min(image.block_count());
        for b in first..last {
            // Zero blocks are never fetched.
            let Some(id) = image.chunk_of_block(b) else {
                self.ahead.fetch_max(b + 1, Ordering::Relaxed);
                continue;
            };
            let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
                return; // enough in flight; the next read will continue from here
            };
            self.ahead.fetch_max(b + 1, Ordering::Relaxed);
            let reader = self.reader.clone();
            tokio::spawn(async move {
                // A failed prefetch is not an error: the read that needs the chunk will fetch
                // it and report any failure to its client.
                let _ = reader.warm(&id, FetchClass::Background).await;
                drop(permit);
            });
        }
    }
}
