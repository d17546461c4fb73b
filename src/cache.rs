//! The block read cache: decoded chunks kept in memory, shared by every mount.
//!
//! Owns: a moka cache keyed by chunk digest (so a chunk shared by several disks, snapshots or
//! mounts is cached once), weighted by bytes and bounded by `--cache-size`; single-flight fills
//! (one repository fetch per missed chunk however many readers wait for it); hit/miss counters.
//! Must not: cache errors (a failed fetch is retried by the next reader), or know about NFS.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::repo::{ChunkId, ChunkReader, RepoError};

/// Counters of a cache, as `/metrics` and `livemount status` show them.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Repository fetches that failed (digest mismatch, missing chunk, I/O).
    pub fetch_errors: u64,
    /// Bytes in the cache now (approximately: moka applies evictions lazily).
    pub bytes: u64,
    pub capacity: u64,
}

/// A read-through chunk cache in front of a [`ChunkReader`].
pub struct ChunkCache {
    cache: moka::future::Cache<ChunkId, Bytes>,
    source: Arc<dyn ChunkReader>,
    capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl ChunkCache {
    /// A cache of at most `capacity_bytes` of decoded chunks over `source`.
    pub fn new(source: Arc<dyn ChunkReader>, capacity_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|_: &ChunkId, v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
            .build();
        ChunkCache {
            cache,
            source,
            capacity: capacity_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            fetch_errors: self.errors.load(Relaxed),
            bytes: self.cache.weighted_size(),
            capacity: self.capacity,
        }
    }

    /// Whether a chunk is cached now.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.cache.contains_key(id)
    }
}

/// Whether a lookup was served from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Hit,
    /// The chunk was fetched for this lookup, or this lookup waited for another one's fetch.
    Miss,
}

impl ChunkCache {
    /// Reads a chunk and says whether the cache had it.
    pub async fn read_traced(&self, id: &ChunkId) -> Result<(Bytes, Access), RepoError> {
        if let Some(b) = self.cache.get(id).await {
            self.hits.fetch_add(1, Relaxed);
            return Ok((b, Access::Hit));
        }
        // try_get_with runs one fill per key; concurrent callers wait for it and share the result.
        let result = self
            .cache
            .try_get_with(*id, async {
                self.misses.fetch_add(1, Relaxed);
                self.source.read_chunk(id).await
            })
            .await;
        result
            .map(|b| (b, Access::Miss))
            .map_err(|e: Arc<RepoError>| {
                self.errors.fetch_add(1, Relaxed);
                shared_error(id, &e)
            })
    }
}

#[async_trait]
impl ChunkReader for ChunkCache {
    async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        self.read_traced(id).await.map(|(b, _)| b)
    }
}

/// moka hands every waiter the same `Arc` of the fill's error; give each its own copy.
fn shared_error(id: &ChunkId, e: &RepoError) -> RepoError {
    match e {
        RepoError::MissingChunk { chunk } => RepoError::MissingChunk { chunk: *chunk },
        RepoError::CorruptChunk { chunk, what } => RepoError::CorruptChunk {
            chunk: *chunk,
            what: what.clone(),
        },
        other => RepoError::CorruptChunk {
            chunk: *id,
            what: format!("cannot be read: {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A chunk source that counts fetches, answers slowly, and fails for one chunk.
    struct Counting {
        fetches: AtomicUsize,
        bad: ChunkId,
    }

    #[async_trait]
    impl ChunkReader for Counting {
        async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
            self.fetches.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if *id == self.bad {
                return Err(RepoError::CorruptChunk {
                    chunk: *id,
                    what: "test".into(),
                });
            }
            Ok(Bytes::from(id.0.to_vec()))
        }
    }

    #[tokio::test]
    async fn one_fetch_per_missed_chunk_however_many_readers_wait() {
        let src = Arc::new(Counting {
            fetches: AtomicUsize::new(0),
            bad: ChunkId([9; 32]),
        });
        let cache = Arc::new(ChunkCache::new(src.clone(), 1 << 20));
        let id = ChunkId([1; 32]);
        let readers: Vec<_> = (0..32)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.read_chunk(&id).await })
            })
            .collect();
        for r in readers {
            assert_eq!(&r.await.unwrap().unwrap()[..], &[1; 32]);
        }
        assert_eq!(src.fetches.load(Relaxed), 1);
        assert_eq!(cache.stats().misses, 1);
        cache.read_chunk(&id).await.unwrap();
        assert_eq!(cache.stats().hits, 1);
    }

    #[tokio::test]
    async fn errors_are_not_cached_and_name_the_chunk() {
        let bad = ChunkId([9; 32]);
        let src = Arc::new(Counting {
            fetches: AtomicUsize::new(0),
            bad,
        });
        let cache = ChunkCache::new(src.clone(), 1 << 20);
        for _ in 0..2 {
            let e = cache.read_chunk(&bad).await.unwrap_err().to_string();
            assert!(e.contains(&bad.to_hex()), "{e}");
        }
        assert_eq!(
            src.fetches.load(Relaxed),
            2,
            "a failure is retried, not cached"
        );
        assert_eq!(cache.stats().fetch_errors, 2);
    }

    #[tokio::test]
    async fn cache_stays_within_its_byte_bound() {
        let src = Arc::new(Counting {
            fetches: AtomicUsize::new(0),
            bad: ChunkId([0; 32]),
        });
        let cache = ChunkCache::new(src, 32 * 10);
        for i in 1..=100u8 {
            cache.read_chunk(&ChunkId([i; 32])).await.unwrap();
        }
        cache.cache.run_pending_tasks().await;
        assert!(cache.stats().bytes <= 32 * 10, "{:?}", cache.stats());
    }
}
