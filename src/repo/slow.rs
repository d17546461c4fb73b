//! A chunk store slowed down on purpose: a fixed latency per fetch and a shared bandwidth cap,
//! so that tests and benchmarks can reproduce a deduplicating appliance or object storage with
//! a local directory. Set in the serve config (`[slow_repository]`); never on by default.
//!
//! Model: every read (chunk or manifest) first waits `latency` (requests overlap, as round
//! trips to a remote store do), then its stored bytes go through one shared pipe of
//! `bandwidth` bytes per second, one transfer after another. Writes pass straight through.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::manifest::SnapshotId;
use super::store::{Area, Record};
use super::{ChunkId, ChunkStore, RepoError};

/// How much slower than the real store.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Slowness {
    /// Added to every read.
    pub latency: Duration,
    /// Bytes per second through the shared pipe; `None`: unlimited.
    pub bandwidth: Option<u64>,
}

impl Slowness {
    /// Parses the config's texts: a duration such as `5ms` and a rate such as `200MB` (per
    /// second). Errors name the setting.
    pub fn parse(latency: Option<&str>, bandwidth: Option<&str>) -> Result<Slowness, String> {
        let latency = match latency {
            None => Duration::ZERO,
            Some(t) => crate::units::parse_duration(t)
                .map_err(|e| format!("slow_repository.latency {t:?}: {e}"))?,
        };
        let bandwidth = match bandwidth {
            None => None,
            Some(t) => {
                let b = t
                    .trim_end_matches("/s")
                    .parse::<bytesize::ByteSize>()
                    .map_err(|e| {
                        format!("slow_repository.bandwidth {t:?}: {e} (try \"200MB\", per second)")
                    })?;
                if b.as_u64() == 0 {
                    return Err(format!(
                        "slow_repository.bandwidth {t:?} must be above zero"
                    ));
                }
                Some(b.as_u64())
            }
        };
        Ok(Slowness { latency, bandwidth })
    }
}

/// A [`ChunkStore`] that delays reads of another one.
#[derive(Debug)]
pub struct SlowStore {
    inner: Arc<dyn ChunkStore>,
    how: Slowness,
    /// When the shared pipe is free again.
    pipe_free: Mutex<Instant>,
}

impl SlowStore {
    pub fn new(inner: Arc<dyn ChunkStore>, how: Slowness) -> SlowStore {
        SlowStore {
            inner,
            how,
            pipe_free: Mutex::new(Instant::now()),
        }
    }

    /// Waits as long as a read of `bytes` bytes takes on the slow store, counted from `start`.
    async fn delay(&self, start: Instant, bytes: usize) {
        let ready = start + self.how.latency;
        let done = match self.how.bandwidth {
            None => ready,
            Some(bw) => {
                let transfer = Duration::from_secs_f64(bytes as f64 / bw as f64);
                let mut free = self.pipe_free.lock().unwrap_or_else(|p| p.into_inner());
                let begin = (*free).max(ready);
                *free = begin + transfer;
                *free
            }
        };
        tokio::time::sleep_until(done).await;
    }
}

#[async_trait]
impl ChunkStore for SlowStore {
    async fn get_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        let start = Instant::now();
        let bytes = self.inner.get_chunk(id).await?;
        self.delay(start, bytes.len()).await;
        Ok(bytes)
    }

    async fn has_chunk(&self, id: &ChunkId) -> Result<bool, RepoError> {
        self.inner.has_chunk(id).await
    }

    async fn put_chunk(&self, id: &ChunkId, stored: Bytes) -> Result<(), RepoError> {
        self.inner.put_chunk(id, stored).await
    }

    async fn sync(&self) -> Result<(), RepoError> {
        self.inner.sync().await
    }

    async fn get_manifest(&self, id: &SnapshotId) -> Result<Bytes, RepoError> {
        let start = Instant::now();
        let bytes = self.inner.get_manifest(id).await?;
        self.delay(start, bytes.len()).await;
        Ok(bytes)
    }

    async fn put_manifest(&self, id: &SnapshotId, bytes: Bytes) -> Result<(), RepoError> {
        self.inner.put_manifest(id, bytes).await
    }

    async fn list_manifests(&self) -> Result<Vec<SnapshotId>, RepoError> {
        self.inner.list_manifests().await
    }

    async fn chunk_stored_size(&self, id: &ChunkId) -> Result<Option<u64>, RepoError> {
        self.inner.chunk_stored_size(id).await
    }

    // Housekeeping (retention) is not slowed: only reads a VM waits for are.
    async fn delete_manifest(&self, id: &SnapshotId) -> Result<(), RepoError> {
        self.inner.delete_manifest(id).await
    }

    async fn list_chunks(&self) -> Result<Vec<(ChunkId, u64)>, RepoError> {
        self.inner.list_chunks().await
    }

    async fn put_record(&self, area: Area, name: &str, bytes: Bytes) -> Result<(), RepoError> {
        self.inner.put_record(area, name, bytes).await
    }

    async fn get_record(&self, area: Area, name: &str) -> Result<Option<Bytes>, RepoError> {
        self.inner.get_record(area, name).await
    }

    async fn list_records(&self, area: Area) -> Result<Vec<Record>, RepoError> {
        self.inner.list_records(area).await
    }

    async fn delete_record(&self, area: Area, name: &str) -> Result<(), RepoError> {
        self.inner.delete_record(area, name).await
    }

    async fn set_aside(&self, bin: &str, id: &ChunkId) -> Result<(), RepoError> {
        self.inner.set_aside(bin, id).await
    }

    async fn list_bins(&self) -> Result<Vec<String>, RepoError> {
        self.inner.list_bins().await
    }

    async fn list_set_aside(&self, bin: &str) -> Result<Vec<(ChunkId, u64)>, RepoError> {
        self.inner.list_set_aside(bin).await
    }

    async fn get_set_aside(&self, bin: &str, id: &ChunkId) -> Result<Option<Bytes>, RepoError> {
        let start = Instant::now();
        let bytes = self.inner.get_set_aside(bin, id).await?;
        if let Some(b) = &bytes {
            self.delay(start, b.len()).await;
        }
        Ok(bytes)
    }

    async fn put_back(&self, bin: &str, id: &ChunkId) -> Result<(), RepoError> {
        self.inner.put_back(bin, id).await
    }

    async fn delete_set_aside(&self, bin: &str, ids: &[ChunkId]) -> Result<(), RepoError> {
        self.inner.delete_set_aside(bin, ids).await
    }

    async fn remove_bin(&self, bin: &str) -> Result<(), RepoError> {
        self.inner.remove_bin(bin).await
    }

    async fn now(&self) -> Result<jiff::Timestamp, RepoError> {
        self.inner.now().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{ChunkSize, LocalStore};

    #[test]
    fn settings_parse_with_errors_naming_them() {
        let s = Slowness::parse(Some("5ms"), Some("200MB")).unwrap();
        assert_eq!(s.latency, Duration::from_millis(5));
        assert_eq!(s.bandwidth, Some(200_000_000));
        assert_eq!(
            Slowness::parse(None, Some("1MiB/s")).unwrap().bandwidth,
            Some(1 << 20)
        );
        let e = Slowness::parse(Some("soon"), None).unwrap_err();
        assert!(e.contains("slow_repository.latency"), "{e}");
        let e = Slowness::parse(None, Some("0MB")).unwrap_err();
        assert!(e.contains("above zero"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn reads_pay_latency_in_parallel_and_bandwidth_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        LocalStore::init(dir.path(), ChunkSize::DEFAULT).unwrap();
        let (local, _) = LocalStore::open(dir.path()).unwrap();
        let data = Bytes::from(vec![5u8; 100_000]);
        let id = ChunkId::of(&data);
        local.put_chunk(&id, data.clone()).await.unwrap();
        let slow = Arc::new(SlowStore::new(
            Arc::new(local),
            Slowness {
                latency: Duration::from_millis(10),
                bandwidth: Some(1_000_000), // 100 ms per read of 100 kB
            },
        ));
        let t0 = Instant::now();
        let reads: Vec<_> = (0..3)
            .map(|_| {
                let s = slow.clone();
                tokio::spawn(async move { s.get_chunk(&id).await.unwrap() })
            })
            .collect();
        for r in reads {
            assert_eq!(r.await.unwrap(), data);
        }
        // 10 ms of latency (overlapping) + 3 x 100 ms through the pipe.
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(310) && took < Duration::from_millis(330),
            "{took:?}"
        );
    }
}
