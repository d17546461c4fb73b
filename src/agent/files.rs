//! Guest files through the media agent: the control API's listings and downloads read a
//! snapshot's disks through the agent's chunk cache, each repository fetch in the background
//! class of its fetch scheduler (behind VM reads and pre-staging; decision 0027).
//!
//! Owns: the chunk reader the agent gives `guestfs` ([`BackgroundChunks`]), the bound on guest
//! file operations at once ([`MAX_GUEST_FILE_OPS`]), and the restore lease a download holds
//! while its bytes flow (decision 0017).
//! Must not: parse HTTP (the API resolves ranges and names), or let `guestfs` see the cache:
//! it gets a [`ChunkReader`] and nothing else.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::Agent;
use crate::cache::{Access, ChunkCache};
use crate::fetch::FetchClass;
use crate::guestfs::{Entry, GuestFiles, GuestFsError, Listing};
use crate::metrics::Metrics;
use crate::repo::lease::{random_name, LeaseHolder, LeaseKind, SnapshotUse};
use crate::repo::{ChunkId, ChunkReader, RepoError, SnapshotId, SnapshotInfo, SnapshotSpec};

/// Guest file listings and downloads running at once; the next waits for one to end. Each
/// holds one blocking thread and at most [`crate::guestfs::STREAM_PIECES`] MiB of a file.
pub const MAX_GUEST_FILE_OPS: usize = 8;
/// Snapshots kept open for guest files (their disks' block tables and volumes), so that
/// browsing a folder after another or downloading file after file does not read the block
/// tables from the repository again. The least recently used goes first.
pub const OPEN_SNAPSHOTS: usize = 4;
/// How long an open snapshot is kept after its last use.
pub const OPEN_FOR: Duration = Duration::from_secs(300);

/// A snapshot open for guest files: its id, the disk it was opened for (none: all), when it
/// was last used.
type OpenGuest = (SnapshotId, Option<String>, Instant, Arc<GuestFiles>);

/// The snapshots open for guest files, most recently used first.
#[derive(Default)]
pub(crate) struct OpenGuests(Mutex<VecDeque<OpenGuest>>);

impl OpenGuests {
    fn get(&self, id: &SnapshotId, disk: Option<&str>) -> Option<Arc<GuestFiles>> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(_, _, used, _)| used.elapsed() < OPEN_FOR);
        let pos = open
            .iter()
            .position(|(i, d, _, _)| i == id && d.as_deref() == disk)?;
        let (i, d, _, f) = open.remove(pos)?;
        open.push_front((i, d, Instant::now(), f.clone()));
        Some(f)
    }

    fn put(&self, id: SnapshotId, disk: Option<&str>, files: Arc<GuestFiles>) {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(i, d, _, _)| !(*i == id && d.as_deref() == disk));
        open.push_front((id, disk.map(str::to_string), Instant::now(), files));
        open.truncate(OPEN_SNAPSHOTS);
    }
}

/// Chunks read for guest files: through the cache (a chunk there is a hit; a missed one is
/// fetched once and kept, under the cache's admission policy, so that a folder browsed again
/// or a file downloaded again costs no fetch), fetched in [`FetchClass::Background`].
pub(crate) struct BackgroundChunks {
    cache: Arc<ChunkCache>,
    metrics: Arc<Metrics>,
}

#[async_trait]
impl ChunkReader for BackgroundChunks {
    async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        let (b, access) = self.cache.read_traced(id, FetchClass::Background).await?;
        match access {
            Access::Hit => self.metrics.guest_files_hits.inc(),
            Access::Miss => self.metrics.guest_files_misses.inc(),
        };
        Ok(b)
    }
}

/// A restore lease that is released when it is dropped (the download ended or its client
/// went away).
struct LeaseGuard(Option<Arc<LeaseHolder>>);

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let (Some(lease), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(async move {
            if let Err(e) = lease.release().await {
                tracing::warn!(error = %e, "cannot remove a download's lease; it expires by itself");
            }
        });
    }
}

/// One file being downloaded: its entry, the bytes asked for, and the pieces to come. It holds
/// its lease and its place among [`MAX_GUEST_FILE_OPS`] until it is dropped.
pub struct FileDownload {
    pub snapshot: String,
    pub entry: Entry,
    pub start: u64,
    /// Bytes that will come: `len` cut at the file's end.
    pub len: u64,
    pub pieces: mpsc::Receiver<Result<Bytes, GuestFsError>>,
    _lease: LeaseGuard,
    _permit: OwnedSemaphorePermit,
}

impl Agent {
    async fn guest_op(&self) -> Result<OwnedSemaphorePermit, GuestFsError> {
        self.guest_ops
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| GuestFsError::Task(e.to_string()))
    }

    /// The snapshot `spec` names (an id prefix, `VM@TIME` or a VM name), opened for guest
    /// files with its chunks read through the cache in the background class.
    async fn guest_files(
        &self,
        spec: &str,
        disk: Option<&str>,
    ) -> Result<(SnapshotInfo, Arc<GuestFiles>), GuestFsError> {
        let info = self.repo.resolve(&SnapshotSpec::new(spec, None)).await?;
        Ok((info.clone(), self.open_guest(&info, disk).await?))
    }

    async fn open_guest(
        &self,
        info: &SnapshotInfo,
        disk: Option<&str>,
    ) -> Result<Arc<GuestFiles>, GuestFsError> {
        if let Some(f) = self.open_guests.get(&info.id, disk) {
            return Ok(f);
        }
        let snap = self.repo.snapshot(&info.id).await?;
        let chunks: Arc<dyn ChunkReader> = Arc::new(BackgroundChunks {
            cache: self.cache.clone(),
            metrics: self.metrics.clone(),
        });
        let files = Arc::new(GuestFiles::open_via(&snap, disk, Some(chunks)).await?);
        self.open_guests.put(info.id, disk, files.clone());
        Ok(files)
    }

    /// `files ls` through the agent: the volumes, or the folder or file `path` names.
    pub async fn list_guest_files(
        &self,
        snapshot: &str,
        path: &str,
        disk: Option<&str>,
    ) -> Result<Listing, GuestFsError> {
        let _permit = self.guest_op().await?;
        let (_, files) = self.guest_files(snapshot, disk).await?;
        files.list(path).await
    }

    /// The size of the regular file at `path` (for a range counted from the end).
    pub async fn guest_file_size(&self, snapshot: &str, path: &str) -> Result<u64, GuestFsError> {
        let _permit = self.guest_op().await?;
        let (_, files) = self.guest_files(snapshot, None).await?;
        Ok(files.stat_file(path).await?.1.size)
    }

    /// Starts reading bytes `start..start + len` of the regular file at `path`, under a
    /// restore lease on the snapshot taken first (neither forgotten nor pruned while the
    /// bytes flow).
    pub async fn download_guest_file(
        &self,
        snapshot: &str,
        path: &str,
        start: u64,
        len: u64,
    ) -> Result<FileDownload, GuestFsError> {
        let permit = self.guest_op().await?;
        let info = self
            .repo
            .resolve(&SnapshotSpec::new(snapshot, None))
            .await?;
        let lease = self
            .repo
            .take_lease(
                random_name(LeaseKind::Restore),
                LeaseKind::Restore,
                "guest file download (control API)".into(),
                vec![SnapshotUse {
                    snapshot: info.id,
                    what: format!("download of {path}"),
                }],
            )
            .await?;
        let lease = LeaseGuard(Some(lease));
        let files = self.open_guest(&info, None).await?;
        let (entry, pieces) = files.read_file(path, start, len).await?;
        let len = len.min(entry.size.saturating_sub(start));
        Ok(FileDownload {
            snapshot: info.name,
            entry,
            start,
            len,
            pieces,
            _lease: lease,
            _permit: permit,
        })
    }
}
