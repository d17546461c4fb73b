//! The read side of a repository: open it, open a snapshot, read any byte range of a disk.
//!
//! [`DiskImage::read_at`] is the API live mounts are built on. It serves any offset and length
//! (unaligned, spanning blocks; a short read only at the end of the disk), fetches and decodes the
//! chunks it needs concurrently, and returns zeros only for blocks the backup recorded as zero.
//! Chunks come through a [`ChunkReader`], so a cache can sit between a disk and the repository
//! without the disk knowing.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};

use super::local::{LocalStore, RepoConfig, WriteLock};
use super::manifest::{BlockTable, DiskManifest, Manifest, SnapshotId, MAX_CONFIG_BYTES};
use super::s3::{S3Config, S3Store};
use super::RepoLocation;
use super::{blocking, codec, ChunkId, ChunkSize, ChunkStore, RepoError};

/// How many chunks one `read_at` fetches at once.
const READ_FETCH_CONCURRENCY: usize = 8;

/// Source of decoded, verified chunks.
#[async_trait]
pub trait ChunkReader: Send + Sync {
    /// The chunk's uncompressed bytes, checked against its digest.
    async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError>;
}

/// An open repository. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Repository {
    inner: Arc<Inner>,
}

/// What a repository was asked for since it was opened: every chunk and manifest GET (or file
/// read) of its store, successful or not, and the stored bytes that came back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RepoStats {
    pub fetches: u64,
    pub fetched_bytes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    fetches: std::sync::atomic::AtomicU64,
    fetched_bytes: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Inner {
    location: RepoLocation,
    counters: Arc<Counters>,
    /// The local directory backend, for its writer's lock; `None` on object storage.
    local: Option<Arc<LocalStore>>,
    store: Arc<dyn ChunkStore>,
    config: RepoConfig,
    /// How long this process's leases count after their last renewal.
    lease_expiry: std::time::Duration,
}

impl Repository {
    /// Creates a repository in `dir`, which must be new or empty.
    pub fn init(dir: &Path, chunk_size: ChunkSize) -> Result<Repository, RepoError> {
        LocalStore::init(dir, chunk_size)?;
        Repository::open(dir)
    }

    /// Opens the repository in `dir`.
    pub fn open(dir: &Path) -> Result<Repository, RepoError> {
        let (local, config) = LocalStore::open(dir)?;
        let local = Arc::new(local);
        let store: Arc<dyn ChunkStore> = local.clone();
        Ok(Repository {
            inner: Arc::new(Inner {
                location: RepoLocation::Dir(dir.into()),
                counters: Arc::default(),
                local: Some(local),
                store,
                config,
                lease_expiry: super::lease::DEFAULT_EXPIRY,
            }),
        })
    }

    /// Creates a repository at `location`: a new or empty directory, or a bucket prefix that
    /// holds no object. `s3` says how to reach object storage (unused for a directory).
    pub async fn init_at(
        location: &RepoLocation,
        s3: &S3Config,
        chunk_size: ChunkSize,
    ) -> Result<Repository, RepoError> {
        match location {
            RepoLocation::Dir(dir) => {
                let dir = dir.clone();
                blocking(move || Repository::init(&dir, chunk_size)).await
            }
            RepoLocation::S3 { bucket, prefix } => {
                let store = S3Store::connect(bucket, prefix, s3)?;
                let config = store.init(chunk_size).await?;
                Ok(Repository::on_s3(store, config))
            }
        }
    }

    /// Opens the repository at `location`.
    pub async fn open_at(location: &RepoLocation, s3: &S3Config) -> Result<Repository, RepoError> {
        match location {
            RepoLocation::Dir(dir) => {
                let dir = dir.clone();
                blocking(move || Repository::open(&dir)).await
            }
            RepoLocation::S3 { bucket, prefix } => {
                let store = S3Store::connect(bucket, prefix, s3)?;
                let config = store.open().await?;
                Ok(Repository::on_s3(store, config))
            }
        }
    }

    fn on_s3(store: S3Store, config: RepoConfig) -> Repository {
        Repository {
            inner: Arc::new(Inner {
                location: store.location().clone(),
                counters: Arc::default(),
                local: None,
                store: Arc::new(store),
                config,
                lease_expiry: super::lease::DEFAULT_EXPIRY,
            }),
        }
    }

    /// The same repository with every read slowed as `how` says (see [`super::SlowStore`]).
    pub fn slowed(self, how: super::Slowness) -> Repository {
        let store: Arc<dyn ChunkStore> =
            Arc::new(super::SlowStore::new(self.inner.store.clone(), how));
        Repository {
            inner: Arc::new(Inner {
                location: self.inner.location.clone(),
                counters: self.inner.counters.clone(),
                local: self.inner.local.clone(),
                store,
                config: self.inner.config.clone(),
                lease_expiry: self.inner.lease_expiry,
            }),
        }
    }

    /// The same repository, its leases (backups, restores, a serving agent's) counting for
    /// `expiry` after each renewal (`[retention] lease_expiry`).
    pub fn with_lease_expiry(self, expiry: std::time::Duration) -> Repository {
        Repository {
            inner: Arc::new(Inner {
                location: self.inner.location.clone(),
                counters: self.inner.counters.clone(),
                local: self.inner.local.clone(),
                store: self.inner.store.clone(),
                config: self.inner.config.clone(),
                lease_expiry: expiry.max(super::lease::MIN_EXPIRY),
            }),
        }
    }

    /// How long this process's leases count after their last renewal.
    pub fn lease_expiry(&self) -> std::time::Duration {
        self.inner.lease_expiry
    }

    /// Takes a lease in the repository (see [`super::lease`]): renewed until released.
    pub async fn take_lease(
        &self,
        name: String,
        kind: super::lease::LeaseKind,
        holder: String,
        uses: Vec<super::lease::SnapshotUse>,
    ) -> Result<Arc<super::lease::LeaseHolder>, RepoError> {
        super::lease::LeaseHolder::take(
            self.inner.store.clone(),
            name,
            kind,
            holder,
            self.inner.lease_expiry,
            uses,
        )
        .await
    }

    /// Fetches from the store since the repository was opened.
    pub fn stats(&self) -> RepoStats {
        use std::sync::atomic::Ordering::Relaxed;
        RepoStats {
            fetches: self.inner.counters.fetches.load(Relaxed),
            fetched_bytes: self.inner.counters.fetched_bytes.load(Relaxed),
        }
    }

    /// Where the repository is.
    pub fn location(&self) -> &RepoLocation {
        &self.inner.location
    }

    /// The directory of a local repository; `None` on object storage.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.local.as_ref().map(|l| l.root())
    }

    pub fn chunk_size(&self) -> ChunkSize {
        self.inner.config.chunk_size
    }

    /// The repository's random id, from its config.
    pub fn id(&self) -> &str {
        &self.inner.config.id
    }

    pub fn store(&self) -> &Arc<dyn ChunkStore> {
        &self.inner.store
    }

    /// A local repository's writer's lock. Object storage has none: its writers need no
    /// mutual exclusion (decision 0010).
    pub(crate) fn lock_for_write(&self) -> Result<Option<WriteLock>, RepoError> {
        self.inner
            .local
            .as_ref()
            .map(|l| l.lock_for_write())
            .transpose()
    }

    /// Fetches, decompresses and verifies an object of at most `max_len` bytes.
    pub(crate) async fn read_object(
        &self,
        id: &ChunkId,
        max_len: usize,
    ) -> Result<Bytes, RepoError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.counters.fetches.fetch_add(1, Relaxed);
        let stored = match self.inner.store.get_chunk(id).await {
            Err(RepoError::MissingChunk { chunk }) => self.set_aside_chunk(&chunk).await?,
            r => r?,
        };
        self.inner
            .counters
            .fetched_bytes
            .fetch_add(stored.len() as u64, Relaxed);
        let id = *id;
        blocking(move || codec::decode(&id, &stored, max_len)).await
    }

    /// A chunk that is not in `chunks/` but in a bin of `trash/`: a prune set it aside while a
    /// backup that names it was running, and puts it back once that backup's snapshot is there
    /// (decision 0017). Readers find it meanwhile, so no snapshot ever reads as damaged.
    async fn set_aside_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        for bin in self.inner.store.list_bins().await? {
            if let Some(bytes) = self.inner.store.get_set_aside(&bin, id).await? {
                return Ok(bytes);
            }
        }
        // Put back meanwhile?
        self.inner.store.get_chunk(id).await
    }

    /// Reads and checks a snapshot's manifest.
    pub async fn manifest(&self, id: &SnapshotId) -> Result<Manifest, RepoError> {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.counters.fetches.fetch_add(1, Relaxed);
        let bytes = self.inner.store.get_manifest(id).await?;
        self.inner
            .counters
            .fetched_bytes
            .fetch_add(bytes.len() as u64, Relaxed);
        let m = Manifest::decode(id, &bytes)?;
        if m.chunk_size != self.chunk_size() {
            return Err(RepoError::CorruptManifest {
                id: id.to_string(),
                what: format!(
                    "its chunk size {} differs from the repository's {}",
                    m.chunk_size,
                    self.chunk_size()
                ),
            });
        }
        Ok(m)
    }

    /// Opens a snapshot by id.
    pub async fn snapshot(&self, id: &SnapshotId) -> Result<Snapshot, RepoError> {
        let manifest = self.manifest(id).await?;
        Ok(Snapshot {
            id: *id,
            manifest,
            repo: self.clone(),
        })
    }

    /// Loads a disk's block table.
    pub(crate) async fn block_table(
        &self,
        snapshot: &SnapshotId,
        disk: &DiskManifest,
    ) -> Result<BlockTable, RepoError> {
        let cs = self.chunk_size();
        // Owned ids: a closure over borrowed ones makes this future not Send for all lifetimes.
        let pieces: Vec<Bytes> = futures::stream::iter(disk.table.iter().copied())
            .map(|piece| async move { self.read_object(&piece, cs.as_usize()).await })
            .buffered(READ_FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        BlockTable::from_pieces(&pieces, cs.block_count(disk.size), cs).map_err(|what| {
            RepoError::CorruptManifest {
                id: snapshot.to_string(),
                what: format!("block table of disk {}: {what}", disk.name),
            }
        })
    }
}

#[async_trait]
impl ChunkReader for Repository {
    async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        self.read_object(id, self.chunk_size().as_usize()).await
    }
}

/// One open snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub manifest: Manifest,
    repo: Repository,
}

impl Snapshot {
    /// The VM's original config file bytes.
    pub async fn config_bytes(&self) -> Result<Bytes, RepoError> {
        let c = &self.manifest.config;
        let bytes = self.repo.read_object(&c.chunk, MAX_CONFIG_BYTES).await?;
        if bytes.len() as u64 != c.size {
            return Err(RepoError::CorruptManifest {
                id: self.id.to_string(),
                what: format!(
                    "config {} has {} bytes, the manifest says {}",
                    c.file_name,
                    bytes.len(),
                    c.size
                ),
            });
        }
        Ok(bytes)
    }

    /// Opens disk number `index` (in manifest order) for reading through the repository.
    pub async fn disk(&self, index: usize) -> Result<DiskImage, RepoError> {
        let d = self.manifest.disks.get(index).ok_or_else(|| {
            RepoError::Invalid(format!(
                "snapshot {} has {} disks, there is no disk {index}",
                self.manifest.display_name(),
                self.manifest.disks.len()
            ))
        })?;
        let table = self.repo.block_table(&self.id, d).await?;
        Ok(DiskImage {
            name: d.name.clone(),
            size: d.size,
            chunk_size: self.repo.chunk_size(),
            table: Arc::new(table),
            reader: Arc::new(self.repo.clone()),
        })
    }
}

/// One disk of a snapshot, readable at any offset.
#[derive(Clone)]
pub struct DiskImage {
    name: String,
    size: u64,
    chunk_size: ChunkSize,
    table: Arc<BlockTable>,
    reader: Arc<dyn ChunkReader>,
}

impl std::fmt::Debug for DiskImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskImage")
            .field("name", &self.name)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Zeros for the unwritten parts of a disk, up to the largest chunk, are never allocated.
/// The array is in the zero-initialised data segment: its pages are mapped only when read,
/// and then as the kernel's shared zero page.
static ZEROS: [u8; ChunkSize::MAX as usize] = [0; ChunkSize::MAX as usize];

/// `len` zero bytes: a slice of [`ZEROS`] when it is long enough.
pub fn zeros(len: usize) -> Bytes {
    if len <= ZEROS.len() {
        Bytes::from_static(&ZEROS[..len])
    } else {
        Bytes::from(vec![0u8; len])
    }
}

impl DiskImage {
    /// The same disk, its chunks read through `reader` (a cache, say) instead.
    pub fn with_reader(mut self, reader: Arc<dyn ChunkReader>) -> Self {
        self.reader = reader;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Exact size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    /// The chunk holding block `idx`, or `None` for an all-zero block or past the end.
    pub fn chunk_of_block(&self, idx: u64) -> Option<ChunkId> {
        self.table.get(idx)
    }

    pub fn block_count(&self) -> u64 {
        self.table.len()
    }

    /// Reads `len` bytes at `offset`. Shorter only when the range passes the end of the disk
    /// (empty at or past the end). A chunk that is missing or fails its check is an error naming
    /// the disk, the offset and the chunk.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, RepoError> {
        let cs = self.chunk_size.as_u64();
        let blocks = self
            .chunk_size
            .blocks_covering(offset, len as u64, self.size);
        if blocks.is_empty() {
            return Ok(Bytes::new());
        }
        let end = offset.saturating_add(len as u64).min(self.size);
        // Fast path: the range lies in one block; hand out a slice of the chunk, no copy
        // unless the range is short.
        if blocks.end - blocks.start == 1 {
            let block_start = blocks.start * cs;
            let (lo, hi) = (
                (offset - block_start) as usize,
                (end - block_start) as usize,
            );
            return match self.table.get(blocks.start) {
                None => Ok(zeros(hi - lo)),
                Some(id) => {
                    let chunk = self.fetch(&id, offset).await?;
                    self.check_len(&chunk, blocks.start, &id, offset)?;
                    // A short read is copied out: a slice would keep the whole chunk alive
                    // for as long as its reader holds it (a client slow to take its reply),
                    // after the cache let it go.
                    if (hi - lo) < chunk.len() / 4 {
                        return Ok(Bytes::copy_from_slice(&chunk[lo..hi]));
                    }
                    Ok(chunk.slice(lo..hi))
                }
            };
        }
        let wanted_len = (end - offset) as usize;
        if blocks.clone().all(|b| self.table.get(b).is_none()) {
            return Ok(zeros(wanted_len));
        }
        let mut out = BytesMut::zeroed(wanted_len);
        let wanted = blocks.filter_map(|b| self.table.get(b).map(|id| (b, id)));
        let mut fetches = futures::stream::iter(wanted)
            .map(|(b, id)| async move {
                let chunk = self.fetch(&id, offset).await?;
                self.check_len(&chunk, b, &id, offset)?;
                Ok::<_, RepoError>((b, chunk))
            })
            .buffer_unordered(READ_FETCH_CONCURRENCY);
        while let Some((b, chunk)) = fetches.try_next().await? {
            let range = self.chunk_size.block_range(super::BlockIdx(b), self.size);
            let lo = range.start.max(offset);
            let hi = range.end.min(end);
            let src = &chunk[(lo - range.start) as usize..(hi - range.start) as usize];
            out[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(src);
        }
        Ok(out.freeze())
    }

    async fn fetch(&self, id: &ChunkId, offset: u64) -> Result<Bytes, RepoError> {
        self.reader
            .read_chunk(id)
            .await
            .map_err(|e| self.read_error(offset, id, e))
    }

    /// A chunk must be exactly as long as its block; anything else is a corrupt repository.
    fn check_len(
        &self,
        chunk: &Bytes,
        block: u64,
        id: &ChunkId,
        offset: u64,
    ) -> Result<(), RepoError> {
        let range = self
            .chunk_size
            .block_range(super::BlockIdx(block), self.size);
        if chunk.len() as u64 == range.end - range.start {
            return Ok(());
        }
        Err(self.read_error(
            offset,
            id,
            RepoError::CorruptChunk {
                chunk: *id,
                what: format!(
                    "it has {} bytes, block {block} of disk {} has {}",
                    chunk.len(),
                    self.name,
                    range.end - range.start
                ),
            },
        ))
    }

    fn read_error(&self, offset: u64, chunk: &ChunkId, e: RepoError) -> RepoError {
        RepoError::Read {
            disk: self.name.clone(),
            offset,
            chunk: *chunk,
            source: Box::new(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_of_any_length_are_zeros() {
        for len in [
            0,
            1,
            4096,
            ChunkSize::MAX as usize,
            ChunkSize::MAX as usize + 1,
        ] {
            let z = zeros(len);
            assert_eq!(z.len(), len);
            assert!(z.iter().all(|b| *b == 0));
        }
    }
}
