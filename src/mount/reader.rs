//! A mount's view of the shared read cache: the chunks its disks read, with the mount's cache
//! hits, misses and fetch latency counted in [`Metrics`], and its VM's reads told to the boot
//! window (first reads: hit or miss; how long they waited for fetches).
//!
//! Owns: the fetch class of a mount's reads. [`ChunkReader::read_chunk`] (what a disk image
//! calls) is a VM read, in the scheduler's VM class; [`MountReader::warm`] fetches a chunk
//! ahead of need in a lower class (read-ahead) without returning it.
//! Must not: cache or fetch by itself (that is [`ChunkCache`]'s).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use crate::cache::{Access, ChunkCache, Intent};
use crate::fetch::{FetchClass, Requester};
use crate::metrics::{Metrics, MountLabel};
use crate::prestage::BootWindow;
use crate::repo::{ChunkId, ChunkReader, RepoError};

/// A mount's view of the shared cache: the same chunks, with hits, misses and fetch latency
/// counted for the mount.
pub struct MountReader {
    cache: Arc<ChunkCache>,
    metrics: Arc<Metrics>,
    label: MountLabel,
    /// The mount's boot window, which counts the VM's hits and misses while it records.
    window: Option<Arc<BootWindow>>,
    /// Who the scheduler sees: the mount's read-ahead is not held back by its own VM reads.
    requester: Requester,
}

impl MountReader {
    pub fn new(
        cache: Arc<ChunkCache>,
        metrics: Arc<Metrics>,
        mount: &str,
        window: Option<Arc<BootWindow>>,
    ) -> Self {
        MountReader {
            cache,
            metrics,
            label: Metrics::label(mount),
            window,
            requester: Requester::unique(),
        }
    }
}

#[async_trait]
impl ChunkReader for MountReader {
    async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        self.read_as(id, FetchClass::Vm, Intent::Use).await
    }
}

impl MountReader {
    /// Fetches a chunk into the cache in `class` (read-ahead: the background class) as a guess
    /// at what the VM reads next, without returning it. Counted as the mount's hit or miss,
    /// never in its boot window.
    pub async fn warm(&self, id: &ChunkId, class: FetchClass) -> Result<(), RepoError> {
        self.read_as(id, class, Intent::Guess).await.map(|_| ())
    }

    async fn read_as(
        &self,
        id: &ChunkId,
        class: FetchClass,
        intent: Intent,
    ) -> Result<Bytes, RepoError> {
        let start = Instant::now();
        let result = self
            .cache
            .read_intent(id, class, self.requester, intent)
            .await;
        let window = self.window.as_ref().filter(|_| class == FetchClass::Vm);
        let (bytes, access) = match result {
            Ok(r) => r,
            Err(e) => {
                // A failed fetch was waited for too.
                if let Some(w) = window {
                    w.on_wait(start, Instant::now());
                }
                return Err(e);
            }
        };
        if let Some(w) = window {
            w.on_access(id, access == Access::Hit);
        }
        match access {
            Access::Hit => {
                self.metrics.hits.get_or_create(&self.label).inc();
            }
            Access::Miss => {
                let end = Instant::now();
                if let Some(w) = window {
                    w.on_wait(start, end);
                }
                self.metrics.misses.get_or_create(&self.label).inc();
                self.metrics
                    .fetch_seconds
                    .get_or_create(&self.label)
                    .observe((end - start).as_secs_f64());
                self.metrics.totals.on_fetch(end - start);
            }
        }
        Ok(bytes)
    }
}
