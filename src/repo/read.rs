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
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};

use super::kept::KeptCopies;
use super::local::{LocalStore, RepoConfig, WriteLock};
use super::manifest::{BlockTable, DiskManifest, Manifest, SnapshotId, MAX_CONFIG_BYTES};
use super::s3::{S3Config, S3Store};
use super::RepoLocation;
use super::{blocking, codec, ChunkId, ChunkSize, ChunkStore, RepoError};

/// How many chunks one `read_at` fetches at once.
const READ_FETCH_CONCURRENCY: usize = 8;

/// What a media agent remembers of its repository (`Repository::open_or_remembered`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Remembered {
    location: String,
    config: RepoConfig,
}

impl Remembered {
    /// The file's content; `None` when it is not there or cannot be read (logged: the agent
    /// then cannot start during an outage, which the error it gets says).
    fn read(path: &Path) -> Option<Remembered> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "the repository's remembered config cannot be read");
                return None;
            }
        };
        toml::from_str(&text)
            .inspect_err(|e| {
                tracing::warn!(file = %path.display(), error = %e, "the repository's remembered config is unreadable");
            })
            .ok()
    }

    fn write(&self, path: &Path) -> Result<(), RepoError> {
        let text = toml::to_string(self).map_err(|e| RepoError::Invalid(e.to_string()))?;
        crate::durable::replace(path, text.as_bytes()).map_err(|e| RepoError::io(path, e))
    }
}

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
    /// The listing fields of every manifest the catalog has read and checked, by id: a
    /// manifest never changes (it is named by its content), so a listing reads only the new
    /// ones. Kept to the ids of the last listing.
    pub(super) listed:
        Arc<std::sync::Mutex<std::collections::HashMap<SnapshotId, super::SnapshotInfo>>>,
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
                listed: Arc::default(),
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

    /// [`Self::open_at`] for a media agent, which keeps what it learnt of the repository in
    /// the file `remembered` ([`Self::remember`]): when the repository cannot be reached at the
    /// start, it is opened from that file, so the agent serves its mounts through the outage. The error that was ridden over comes back too,
    /// for the log. A location the file does not name gets the error as `open_at` does.
    pub async fn open_or_remembered(
        location: &RepoLocation,
        s3: &S3Config,
        remembered: &Path,
    ) -> Result<(Repository, Option<RepoError>), RepoError> {
        let path = remembered.to_path_buf();
        let known = blocking(move || Ok(Remembered::read(&path))).await?;
        match Repository::open_at(location, s3).await {
            Ok(repo) => Ok((repo, None)),
            Err(e) => {
                let away = e.is_outage()
                    || matches!(
                        (&e, location),
                        (
                            RepoError::NotARepository { .. } | RepoError::Io { .. },
                            RepoLocation::Dir(_)
                        )
                    );
                match known {
                    Some(k) if away && k.location == location.to_string() => {
                        let repo = match location {
                            RepoLocation::Dir(dir) => {
                                let local = Arc::new(LocalStore::unchecked(dir));
                                let store: Arc<dyn ChunkStore> = local.clone();
                                Repository {
                                    inner: Arc::new(Inner {
                                        location: location.clone(),
                                        counters: Arc::default(),
                                        local: Some(local),
                                        store,
                                        config: k.config,
                                        lease_expiry: super::lease::DEFAULT_EXPIRY,
                                        listed: Arc::default(),
                                    }),
                                }
                            }
                            RepoLocation::S3 { bucket, prefix } => {
                                Repository::on_s3(S3Store::connect(bucket, prefix, s3)?, k.config)
                            }
                        };
                        Ok((repo, Some(e)))
                    }
                    _ => Err(e),
                }
            }
        }
    }

    /// Writes what [`Self::open_or_remembered`] needs to open this repository while it
    /// cannot be reached to the file `remembered` (unless it says so already); its folder
    /// must exist.
    pub async fn remember(&self, remembered: &Path) -> Result<(), RepoError> {
        let now = Remembered {
            location: self.inner.location.to_string(),
            config: self.inner.config.clone(),
        };
        let path = remembered.to_path_buf();
        blocking(move || {
            if Remembered::read(&path).as_ref() != Some(&now) {
                now.write(&path)?;
            }
            Ok(())
        })
        .await
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
                listed: Arc::default(),
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
                listed: self.inner.listed.clone(),
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
                listed: self.inner.listed.clone(),
            }),
        }
    }

    /// The catalog's listing fields of manifests read before (see `Inner::listed`).
    pub(super) fn listed(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<SnapshotId, super::SnapshotInfo>> {
        self.inner.listed.lock().unwrap_or_else(|p| p.into_inner())
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
        let stored = self.fetch_stored(id).await?;
        let id = *id;
        blocking(move || codec::decode(&id, &stored, max_len)).await
    }

    /// An object's stored (compressed) bytes, as the store has them.
    async fn fetch_stored(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
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
        Ok(stored)
    }

    /// [`Self::read_object`] for an object of `snapshot`'s metadata (its config, a block
    /// table piece) with kept copies: a kept copy is read first (checked as the store's bytes
    /// are: it is named by its content, so it is the store's object), and the object fetched
    /// and kept when there is none or it fails its check.
    async fn read_kept_object(
        &self,
        kept: Option<&KeptCopies>,
        snapshot: &SnapshotId,
        id: &ChunkId,
        max_len: usize,
    ) -> Result<Bytes, RepoError> {
        let Some(kept) = kept else {
            return self.read_object(id, max_len).await;
        };
        let name = id.to_hex();
        if let Some(copy) = kept.get(snapshot, &name).await {
            let obj = *id;
            match blocking(move || codec::decode(&obj, &copy, max_len)).await {
                Ok(decoded) => return Ok(decoded),
                Err(e) => {
                    tracing::warn!(snapshot = %snapshot, object = %name, error = %e, "a kept copy failed its check: removed, and fetched again");
                    kept.remove(snapshot, &name).await;
                }
            }
        }
        let stored = self.fetch_stored(id).await?;
        let (obj, bytes) = (*id, stored.clone());
        let decoded = blocking(move || codec::decode(&obj, &bytes, max_len)).await?;
        kept.keep(snapshot, &name, &stored).await?;
        Ok(decoded)
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
        self.manifest_kept(id, None).await
    }

    /// [`Self::manifest`], read first from a copy in `kept`, fetched and kept there when there
    /// is none (or it fails its check).
    async fn manifest_kept(
        &self,
        id: &SnapshotId,
        kept: Option<&KeptCopies>,
    ) -> Result<Manifest, RepoError> {
        if let Some(kept) = kept {
            if let Some(copy) = kept.get(id, KeptCopies::MANIFEST).await {
                match self.checked_manifest(id, &copy) {
                    Ok(m) => return Ok(m),
                    Err(e) => {
                        tracing::warn!(snapshot = %id, error = %e, "a kept manifest failed its check: removed, and fetched again");
                        kept.remove(id, KeptCopies::MANIFEST).await;
                    }
                }
            }
        }
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.counters.fetches.fetch_add(1, Relaxed);
        let bytes = self.inner.store.get_manifest(id).await?;
        self.inner
            .counters
            .fetched_bytes
            .fetch_add(bytes.len() as u64, Relaxed);
        let m = self.checked_manifest(id, &bytes)?;
        if let Some(kept) = kept {
            kept.keep(id, KeptCopies::MANIFEST, &bytes).await?;
        }
        Ok(m)
    }

    /// A manifest's bytes decoded and checked: its id, and the repository's chunk size.
    fn checked_manifest(&self, id: &SnapshotId, bytes: &[u8]) -> Result<Manifest, RepoError> {
        let m = Manifest::decode(id, bytes)?;
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
            kept: None,
        })
    }

    /// Opens a snapshot by id for serving: what it reads (manifest, config, block tables) is
    /// kept in `kept` and read from there while the store is unreachable (see
    /// [`KeptCopies`]).
    pub async fn snapshot_kept(
        &self,
        id: &SnapshotId,
        kept: &KeptCopies,
    ) -> Result<Snapshot, RepoError> {
        let manifest = self.manifest_kept(id, Some(kept)).await?;
        Ok(Snapshot {
            id: *id,
            manifest,
            repo: self.clone(),
            kept: Some(kept.clone()),
        })
    }

    /// Loads a disk's block table.
    pub(crate) async fn block_table(
        &self,
        snapshot: &SnapshotId,
        disk: &DiskManifest,
        kept: Option<&KeptCopies>,
    ) -> Result<BlockTable, RepoError> {
        let cs = self.chunk_size();
        // Owned ids: a closure over borrowed ones makes this future not Send for all lifetimes.
        let pieces: Vec<Bytes> = futures::stream::iter(disk.table.iter().copied())
            .map(|piece| async move {
                self.read_kept_object(kept, snapshot, &piece, cs.as_usize())
                    .await
            })
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
    /// Where its metadata is kept, when it was opened for serving.
    kept: Option<KeptCopies>,
}

impl Snapshot {
    /// The VM's original config file bytes.
    pub async fn config_bytes(&self) -> Result<Bytes, RepoError> {
        let c = &self.manifest.config;
        let bytes = self
            .repo
            .read_kept_object(self.kept.as_ref(), &self.id, &c.chunk, MAX_CONFIG_BYTES)
            .await?;
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
        let table = self
            .repo
            .block_table(&self.id, d, self.kept.as_ref())
            .await?;
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

/// Bytes read from a disk as the pieces they were found in (slices of chunks, zeros), in
/// order. A protocol writes them out as they are (a [`Buf`] whose chunks go into one vectored
/// write) instead of gathering them into one buffer first.
#[derive(Debug, Clone, Default)]
pub struct Pieces {
    parts: std::collections::VecDeque<Bytes>,
    /// The bytes left, kept as pieces come and go.
    len: usize,
}

impl Pieces {
    /// Appends `b` (an empty one is left out).
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push_back(b);
        }
    }

    /// Appends `len` zero bytes (slices of the static zeros).
    pub fn push_zeros(&mut self, mut len: u64) {
        while len > 0 {
            let n = len.min(ZEROS.len() as u64);
            self.push(zeros(n as usize));
            len -= n;
        }
    }

    /// How many bytes are left.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// A copy of the bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        for p in &self.parts {
            out.extend_from_slice(p);
        }
        out
    }

    /// The bytes as one buffer: the piece itself when there is one, else gathered (a copy).
    pub fn into_bytes(mut self) -> Bytes {
        match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts.pop_front().unwrap_or_default(),
            _ => Bytes::from(self.to_vec()),
        }
    }
}

/// Equal when the bytes are, however they are cut into pieces.
impl PartialEq for Pieces {
    fn eq(&self, other: &Pieces) -> bool {
        self.len() == other.len()
            && self
                .parts
                .iter()
                .flat_map(|b| b.iter())
                .eq(other.parts.iter().flat_map(|b| b.iter()))
    }
}

impl Eq for Pieces {}

impl From<Bytes> for Pieces {
    fn from(b: Bytes) -> Pieces {
        let mut p = Pieces::default();
        p.push(b);
        p
    }
}

impl Buf for Pieces {
    fn remaining(&self) -> usize {
        self.len()
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map(|b| &b[..]).unwrap_or_default()
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, part) in dst.iter_mut().zip(&self.parts) {
            *slot = std::io::IoSlice::new(part);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                panic!("advanced past the end of the pieces");
            };
            if cnt < front.len() {
                front.advance(cnt);
                self.len -= cnt;
                return;
            }
            cnt -= front.len();
            self.len -= front.len();
            self.parts.pop_front();
        }
    }

    /// The next `len` bytes: a slice of the first piece when it holds them all, no copy.
    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        assert!(
            len <= self.len,
            "{len} bytes asked of {} pieces' bytes",
            self.len
        );
        match self.parts.front_mut() {
            Some(front) if front.len() >= len => {
                let out = front.split_to(len);
                self.len -= len;
                if front.is_empty() {
                    self.parts.pop_front();
                }
                out
            }
            _ => {
                let mut out = BytesMut::with_capacity(len);
                out.put((&mut *self).take(len));
                out.freeze()
            }
        }
    }
}

/// A run of a disk's bytes: its length, and whether it is known to read as zeros without
/// fetching anything (`false` means data, or not known).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub zero: bool,
}

impl Extent {
    /// Appends `e` to `runs`, joining it to the last run when both say the same.
    pub fn push(runs: &mut Vec<Extent>, e: Extent) {
        if e.len == 0 {
            return;
        }
        match runs.last_mut() {
            Some(last) if last.zero == e.zero => last.len += e.len,
            _ => runs.push(e),
        }
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

    /// What the backup holds in `[offset, offset + len)` (clipped to the disk), as runs: a
    /// run of blocks the backup recorded as zeros reads as zeros and costs no fetch.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let cs = self.chunk_size.as_u64();
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let b = at / cs;
            let hi = b.saturating_add(1).saturating_mul(cs).min(end);
            Extent::push(
                &mut out,
                Extent {
                    len: hi - at,
                    zero: self.table.get(b).is_none(),
                },
            );
            at = hi;
        }
        out
    }

    /// Reads `len` bytes at `offset`. Shorter only when the range passes the end of the disk
    /// (empty at or past the end). A chunk that is missing or fails its check is an error naming
    /// the disk, the offset and the chunk.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, RepoError> {
        Ok(self.read_pieces(offset, len).await?.into_bytes())
    }

    /// [`DiskImage::read_at`], as the chunks' slices and zeros the bytes are in.
    pub async fn read_pieces(&self, offset: u64, len: usize) -> Result<Pieces, RepoError> {
        let blocks = self
            .chunk_size
            .blocks_covering(offset, len as u64, self.size);
        let end = offset.saturating_add(len as u64).min(self.size);
        let fetches = futures::stream::iter(blocks)
            .map(|b| async move {
                let range = self.chunk_size.block_range(super::BlockIdx(b), self.size);
                let (lo, hi) = (range.start.max(offset), range.end.min(end));
                let (from, to) = ((lo - range.start) as usize, (hi - range.start) as usize);
                let Some(id) = self.table.get(b) else {
                    return Ok(None);
                };
                let chunk = self.fetch(&id, offset).await?;
                self.check_len(&chunk, b, &id, offset)?;
                // A short piece is copied out: a slice would keep the whole chunk alive for
                // as long as its reader holds it (a client slow to take its reply), after the
                // cache let it go.
                if (to - from) < chunk.len() / 4 {
                    return Ok(Some(Bytes::copy_from_slice(&chunk[from..to])));
                }
                Ok::<_, RepoError>(Some(chunk.slice(from..to)))
            })
            .buffered(READ_FETCH_CONCURRENCY);
        let mut pieces = Pieces::default();
        // Zero blocks in a row become one piece of the static zeros where they fit.
        let mut at = offset;
        let mut zeros_from = None;
        futures::pin_mut!(fetches);
        while let Some(piece) = fetches.try_next().await? {
            match piece {
                None => {
                    zeros_from.get_or_insert(at);
                    at = (at / self.chunk_size.as_u64() + 1) * self.chunk_size.as_u64();
                }
                Some(data) => {
                    if let Some(z) = zeros_from.take() {
                        pieces.push_zeros(at - z);
                    }
                    at += data.len() as u64;
                    pieces.push(data);
                }
            }
        }
        if let Some(z) = zeros_from {
            pieces.push_zeros(at.min(end) - z);
        }
        Ok(pieces)
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

    /// Pieces hand out their bytes in order: whole, advanced across pieces, split off with
    /// no copy inside one piece and gathered across two, and as vectored slices.
    #[test]
    fn pieces_are_a_buffer_of_their_bytes_in_order() {
        let mut p = Pieces::default();
        p.push(Bytes::from_static(b"abc"));
        p.push(Bytes::new());
        p.push(Bytes::from_static(b"defg"));
        p.push_zeros(2);
        assert_eq!((p.len(), p.remaining()), (9, 9));
        let mut io = [std::io::IoSlice::new(&[]); 8];
        assert_eq!(p.chunks_vectored(&mut io), 3);
        assert_eq!(&p.clone().into_bytes()[..], b"abcdefg\0\0");
        let mut q = p.clone();
        q.advance(4);
        assert_eq!(q.chunk(), b"efg");
        let first = p.copy_to_bytes(2);
        assert_eq!(&first[..], b"ab");
        assert_eq!(&p.copy_to_bytes(3)[..], b"cde");
        assert_eq!(&p.copy_to_bytes(4)[..], b"fg\0\0");
        assert!(p.is_empty());
        assert_eq!(Pieces::from(Bytes::new()).into_bytes().len(), 0);
    }

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
