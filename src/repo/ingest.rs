//! Ingest: backing up a VM (its config and disks) into a new snapshot.
//!
//! Per disk, blocks flow through a bounded pipeline: read (positional, on a blocking thread) ->
//! all-zero check -> BLAKE3 -> skip if the repository has the chunk -> zstd -> store. Up to
//! [`INGEST_CONCURRENCY`] blocks are in flight, so reading, hashing, compressing and the stores'
//! fsyncs overlap. With a parent snapshot and a changed-block list, a block outside every changed
//! extent is taken from the parent without being read.
//!
//! Order of durability: chunks (each fsynced before its rename) -> `ChunkStore::sync` (their
//! folders) -> the manifest. A backup that stops anywhere before the manifest leaves no snapshot,
//! only unreferenced chunks.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::disk::{self, DiskFormat, DiskSource};
use crate::vmconfig::{self, VmConfig};

use super::lease::{self, LeaseKind};
use super::manifest::{
    BlockTable, ConfigRef, DiskManifest, Manifest, SnapshotId, VmInfo, MANIFEST_FORMAT,
    MAX_CONFIG_BYTES,
};
use super::{blocking, codec, BlockIdx, ChunkId, Progress, RepoError, Repository};

/// Blocks in flight at once during a backup. Enough to overlap two cores of hashing and
/// compression with the stores' fsyncs (measured in docs/decisions/0002-chunk-format.md).
pub const INGEST_CONCURRENCY: usize = 16;

/// One disk to back up.
#[derive(Debug, Clone)]
pub struct DiskInput {
    /// The disk's path as the config refers to it; the name it has in the snapshot.
    pub name: String,
    /// Where the config attaches it.
    pub device: String,
    /// Where to read it.
    pub path: PathBuf,
    /// Its format; `None` detects it from the file.
    pub format: Option<DiskFormat>,
}

/// Changed byte extents per disk since the parent snapshot, as VMware CBT reports them.
///
/// JSON: `{"disks": {"<disk name or device>": [{"start": 0, "length": 65536}, ...]}}`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangedBlocks {
    pub disks: BTreeMap<String, Vec<Extent>>,
}

#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
}

impl ChangedBlocks {
    pub fn from_json(file: &Path, bytes: &[u8]) -> Result<Self, RepoError> {
        serde_json::from_slice(bytes).map_err(|e| {
            RepoError::Invalid(format!(
                "{}: not a changed-blocks file ({e}); expected {{\"disks\": {{\"DISK\": [{{\"start\": N, \"length\": N}}]}}}}",
                file.display()
            ))
        })
    }
}

/// Everything a backup needs.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The config's file name (no folder), kept in the snapshot.
    pub config_file_name: String,
    pub config_bytes: Vec<u8>,
    pub config: VmConfig,
    pub disks: Vec<DiskInput>,
    /// With `changed`: take unchanged blocks from this snapshot.
    pub parent: Option<SnapshotId>,
    pub changed: Option<ChangedBlocks>,
}

impl BackupOptions {
    /// Reads and parses a VM config and finds its disks: relative to the config's folder, or
    /// (for an absolute path that does not exist here) by file name in the config's folder.
    /// `disk_paths`, when not empty, replaces the disks' locations in config order.
    pub fn from_config_file(config_path: &Path, disk_paths: &[PathBuf]) -> Result<Self, RepoError> {
        let file_err = |source| RepoError::File {
            path: config_path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(config_path).map_err(file_err)?;
        if meta.len() > MAX_CONFIG_BYTES as u64 {
            return Err(RepoError::Invalid(format!(
                "{}: {} bytes is too big for a VM config",
                config_path.display(),
                meta.len()
            )));
        }
        let bytes = std::fs::read(config_path).map_err(file_err)?;
        let file_name = config_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                RepoError::Invalid(format!("{} is not a file", config_path.display()))
            })?;
        let config = vmconfig::parse(&file_name, &bytes)
            .map_err(|e| RepoError::Invalid(format!("{}: {e}", config_path.display())))?;
        if config.disks.is_empty() {
            return Err(RepoError::Invalid(format!(
                "{}: the VM {} has no disks to back up",
                config_path.display(),
                config.name
            )));
        }
        if !disk_paths.is_empty() && disk_paths.len() != config.disks.len() {
            return Err(RepoError::Invalid(format!(
                "the config lists {} disks ({}) but --disk was given {} times; give one --disk per disk, in that order",
                config.disks.len(),
                config.disks.iter().map(|d| format!("{} {}", d.device, d.path)).collect::<Vec<_>>().join(", "),
                disk_paths.len()
            )));
        }
        let folder = config_path.parent().unwrap_or(Path::new("."));
        let mut disks = Vec::new();
        for (i, d) in config.disks.iter().enumerate() {
            let (path, format) = match disk_paths.get(i) {
                Some(p) => (p.clone(), None),
                None => (locate_disk(folder, &d.path, &d.device)?, d.declared_format),
            };
            disks.push(DiskInput {
                name: d.path.clone(),
                device: d.device.clone(),
                path,
                format,
            });
        }
        Ok(BackupOptions {
            config_file_name: file_name,
            config_bytes: bytes,
            config,
            disks,
            parent: None,
            changed: None,
        })
    }
}

fn locate_disk(folder: &Path, as_written: &str, device: &str) -> Result<PathBuf, RepoError> {
    let written = Path::new(as_written);
    let mut tried = Vec::new();
    let first = folder.join(written);
    if first.exists() {
        return Ok(first);
    }
    tried.push(first);
    if written.is_absolute() {
        if let Some(name) = written.file_name() {
            let here = folder.join(name);
            if here.exists() {
                return Ok(here);
            }
            tried.push(here);
        }
    }
    Err(RepoError::Invalid(format!(
        "disk {device} ({as_written}) not found (looked at {}); give its location with --disk PATH",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// What a backup did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupSummary {
    pub snapshot: SnapshotId,
    /// `VM@TIME`.
    pub name: String,
    /// Sum of the disks' sizes.
    pub logical_bytes: u64,
    /// Bytes read from the source disks.
    pub read_bytes: u64,
    /// Bytes in all-zero blocks (stored as nothing).
    pub zero_bytes: u64,
    /// Bytes taken from the parent without reading.
    pub reused_bytes: u64,
    /// Chunks this backup added to the repository (data, block tables, config).
    pub new_chunks: u64,
    /// Bytes of new data chunks before compression.
    pub new_bytes: u64,
    /// What the new chunks take in the repository, after compression.
    pub stored_bytes: u64,
    /// Bytes of non-zero blocks divided by new data bytes: what deduplication saved (null when
    /// no data was new).
    pub dedup_ratio: Option<f64>,
    pub seconds: f64,
    /// Logical bytes per second, in MB/s (10^6 bytes).
    pub mb_per_s: f64,
}

#[derive(Default)]
struct Counters {
    read: AtomicU64,
    zero: AtomicU64,
    reused: AtomicU64,
    new_chunks: AtomicU64,
    new_bytes: AtomicU64,
    stored: AtomicU64,
}

/// Per-backup state shared by the blocks in flight.
struct Run<'a> {
    repo: &'a Repository,
    counters: Counters,
    /// Chunks this backup has stored or is storing, so a chunk repeated within it is stored once.
    claimed: Mutex<HashSet<ChunkId>>,
    progress: &'a dyn Progress,
}

impl Repository {
    /// Backs up a VM into a new snapshot and returns what it did.
    pub async fn backup(
        &self,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> Result<BackupSummary, RepoError> {
        let started = Instant::now();
        let _lock = self.lock_for_write()?;
        // A prune that runs meanwhile waits for this backup before it deletes a chunk the
        // backup may have found present (decision 0017). The lease is in the repository
        // before the first chunk is looked for.
        let lease = self
            .take_lease(
                lease::random_name(LeaseKind::Backup),
                LeaseKind::Backup,
                format!("backup of {}", opts.config.name),
                Vec::new(),
            )
            .await?;
        let result = self.backup_leased(opts, progress, started).await;
        if let Err(e) = lease.release().await {
            tracing::warn!(error = %e, "cannot remove the backup's lease; it expires by itself");
        }
        result
    }

    async fn backup_leased(
        &self,
        opts: &BackupOptions,
        progress: &dyn Progress,
        started: Instant,
    ) -> Result<BackupSummary, RepoError> {
        let cs = self.chunk_size();

        let parent = match (&opts.parent, &opts.changed) {
            (Some(id), Some(_)) => Some(self.snapshot(id).await?),
            (None, None) => None,
            _ => {
                return Err(RepoError::Invalid(
                    "--parent and --changed-blocks go together".into(),
                ))
            }
        };
        if let Some(p) = &parent {
            let m = &p.manifest;
            if m.vm.name != opts.config.name || m.vm.uuid != opts.config.uuid {
                return Err(RepoError::Invalid(format!(
                    "parent snapshot {} is of VM {} ({}), not of {} ({})",
                    m.display_name(),
                    m.vm.name,
                    m.vm.uuid.as_deref().unwrap_or("no uuid"),
                    opts.config.name,
                    opts.config.uuid.as_deref().unwrap_or("no uuid"),
                )));
            }
        }
        if let Some(changed) = &opts.changed {
            for key in changed.disks.keys() {
                if !opts
                    .disks
                    .iter()
                    .any(|d| &d.name == key || &d.device == key)
                {
                    return Err(RepoError::Invalid(format!(
                        "the changed-blocks file names disk {key}, which the VM does not have (its disks: {})",
                        opts.disks.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", ")
                    )));
                }
            }
        }

        // Open every disk first, so a missing or unsupported one fails before any work.
        let mut sources: Vec<(Arc<dyn DiskSource>, DiskFormat)> = Vec::new();
        for d in &opts.disks {
            let (path, format, name) = (d.path.clone(), d.format, d.name.clone());
            let opened = blocking(move || {
                let format = match format {
                    Some(f) => Ok(f),
                    None => disk::detect(&path),
                }
                .map_err(|source| RepoError::Disk {
                    disk: name.clone(),
                    source,
                })?;
                let src = disk::open(&path, Some(format))
                    .map_err(|source| RepoError::Disk { disk: name, source })?;
                Ok((Arc::from(src), format))
            })
            .await?;
            sources.push(opened);
        }
        // Every changed extent is checked against its disk before anything is read or stored.
        if let Some(changed) = &opts.changed {
            for (d, (src, _)) in opts.disks.iter().zip(&sources) {
                let by_name = changed.disks.get(&d.name);
                let by_device = changed.disks.get(&d.device);
                if by_name.is_some() && by_device.is_some() && d.name != d.device {
                    return Err(RepoError::Invalid(format!(
                        "the changed-blocks file lists disk {} twice, by name and by device {}; list it once",
                        d.name, d.device
                    )));
                }
                for e in by_name.or(by_device).into_iter().flatten() {
                    if e.start
                        .checked_add(e.length)
                        .is_none_or(|end| end > src.size())
                    {
                        return Err(RepoError::Invalid(format!(
                            "changed area start {} length {} passes the end of disk {} ({} bytes)",
                            e.start,
                            e.length,
                            d.name,
                            src.size()
                        )));
                    }
                }
            }
        }
        progress.set_total(sources.iter().map(|(s, _)| s.size()).sum());

        let taken = self.next_snapshot_time(&opts.config.name).await?;
        let run = Run {
            repo: self,
            counters: Counters::default(),
            claimed: Mutex::new(HashSet::new()),
            progress,
        };

        let mut disks = Vec::new();
        for (d, (src, format)) in opts.disks.iter().zip(&sources) {
            let size = src.size();
            let reuse = match &parent {
                Some(p) => {
                    let changed = opts
                        .changed
                        .as_ref()
                        .and_then(|c| c.disks.get(&d.name).or_else(|| c.disks.get(&d.device)));
                    match (
                        p.manifest.disks.iter().position(|pd| pd.name == d.name),
                        changed,
                    ) {
                        (Some(i), Some(extents)) => {
                            let pd = &p.manifest.disks[i];
                            let table = self.block_table(&p.id, pd, None).await?;
                            Some(ParentReuse::new(
                                table, pd.size, size, extents, cs, &d.name,
                            )?)
                        }
                        _ => {
                            tracing::warn!(disk = %d.name, "no parent disk or no changed-block list for this disk: reading it whole");
                            None
                        }
                    }
                }
                None => None,
            };
            let table = run.disk(src.clone(), reuse.as_ref(), &d.name).await?;
            let allocated_blocks = table.chunks().count() as u64;
            let mut pieces = Vec::new();
            for piece in table.to_pieces(cs) {
                pieces.push(run.store_object(piece).await?);
            }
            disks.push(DiskManifest {
                name: d.name.clone(),
                device: d.device.clone(),
                source_format: *format,
                size,
                allocated_blocks,
                table: pieces,
            });
        }
        let config_chunk = run.store_object(opts.config_bytes.clone()).await?;
        self.store().sync().await?;

        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            vm: VmInfo {
                name: opts.config.name.clone(),
                uuid: opts.config.uuid.clone(),
                hypervisor: opts.config.hypervisor,
            },
            taken,
            chunk_size: cs,
            parent: parent.as_ref().map(|p| p.id),
            config: ConfigRef {
                file_name: opts.config_file_name.clone(),
                size: opts.config_bytes.len() as u64,
                chunk: config_chunk,
            },
            disks,
        };
        let (id, bytes) = manifest.encode()?;
        self.store().put_manifest(&id, Bytes::from(bytes)).await?;

        let c = &run.counters;
        let logical: u64 = manifest.disks.iter().map(|d| d.size).sum();
        let seconds = started.elapsed().as_secs_f64();
        let new_bytes = c.new_bytes.load(Relaxed);
        let nonzero = logical - c.zero.load(Relaxed);
        Ok(BackupSummary {
            snapshot: id,
            name: manifest.display_name(),
            logical_bytes: logical,
            read_bytes: c.read.load(Relaxed),
            zero_bytes: c.zero.load(Relaxed),
            reused_bytes: c.reused.load(Relaxed),
            new_chunks: c.new_chunks.load(Relaxed),
            new_bytes,
            stored_bytes: c.stored.load(Relaxed),
            dedup_ratio: (new_bytes > 0).then(|| nonzero as f64 / new_bytes as f64),
            seconds,
            mb_per_s: logical as f64 / 1e6 / seconds.max(1e-9),
        })
    }

    /// Now, in whole seconds, later than any snapshot of `vm`: names stay unique (`VM@TIME`)
    /// even for two backups within one second, at the cost of waiting for the next second.
    async fn next_snapshot_time(&self, vm: &str) -> Result<jiff::Timestamp, RepoError> {
        let (all, _) = self.list_snapshots().await?;
        let latest = all
            .iter()
            .filter(|s| s.vm.name == vm)
            .map(|s| s.taken)
            .max();
        loop {
            let now = jiff::Timestamp::now();
            let secs = jiff::Timestamp::from_second(now.as_second())
                .map_err(|e| RepoError::Invalid(e.to_string()))?;
            match latest {
                Some(l) if secs <= l => {
                    let wait = l.as_second() + 1 - secs.as_second();
                    if wait > 2 {
                        // The clock went back: a second after the latest keeps names unique
                        // and "latest" truthful, rather than waiting for the clock.
                        return jiff::Timestamp::from_second(l.as_second() + 1)
                            .map_err(|e| RepoError::Invalid(e.to_string()));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(
                        1000 - now.subsec_millisecond().max(0) as u64,
                    ))
                    .await;
                }
                _ => return Ok(secs),
            }
        }
    }
}

/// Which blocks an incremental backup takes from its parent.
struct ParentReuse {
    table: BlockTable,
    parent_size: u64,
    /// Per block of the new disk: changed since the parent.
    changed: Vec<bool>,
}

impl ParentReuse {
    fn new(
        table: BlockTable,
        parent_size: u64,
        size: u64,
        extents: &[super::ingest::Extent],
        cs: super::ChunkSize,
        disk: &str,
    ) -> Result<Self, RepoError> {
        let n = usize::try_from(cs.block_count(size))
            .map_err(|_| RepoError::Invalid(format!("disk {disk} is too large")))?;
        let mut changed = vec![false; n];
        for e in extents {
            let end = e.start.checked_add(e.length).filter(|end| *end <= size);
            if end.is_none() {
                return Err(RepoError::Invalid(format!(
                    "changed area start {} length {} passes the end of disk {disk} ({size} bytes)",
                    e.start, e.length
                )));
            }
            for b in cs.blocks_covering(e.start, e.length, size) {
                changed[b as usize] = true;
            }
        }
        Ok(ParentReuse {
            table,
            parent_size,
            changed,
        })
    }

    /// The parent's entry for `block`, when the block is unchanged and the same length in both.
    fn entry(&self, block: u64, cs: super::ChunkSize, size: u64) -> Option<Option<ChunkId>> {
        let changed = *self.changed.get(block as usize)?;
        let same_range = cs.block_range(BlockIdx(block), size)
            == cs.block_range(BlockIdx(block), self.parent_size);
        (!changed && same_range && block < self.table.len()).then(|| self.table.get(block))
    }
}

impl Run<'_> {
    /// Backs up one disk; returns its block table.
    async fn disk(
        &self,
        src: Arc<dyn DiskSource>,
        reuse: Option<&ParentReuse>,
        name: &str,
    ) -> Result<BlockTable, RepoError> {
        let cs = self.repo.chunk_size();
        let size = src.size();
        let blocks: Vec<Option<ChunkId>> = futures::stream::iter(0..cs.block_count(size))
            .map(|b| {
                let src = src.clone();
                async move {
                    let range = cs.block_range(BlockIdx(b), size);
                    let len = range.end - range.start;
                    let r = self.block(src, b, reuse, name).await;
                    self.progress.advance(len);
                    r
                }
            })
            .buffered(INGEST_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(BlockTable::from_blocks(blocks))
    }

    async fn block(
        &self,
        src: Arc<dyn DiskSource>,
        b: u64,
        reuse: Option<&ParentReuse>,
        name: &str,
    ) -> Result<Option<ChunkId>, RepoError> {
        let cs = self.repo.chunk_size();
        let size = src.size();
        let range = cs.block_range(BlockIdx(b), size);
        let len = range.end - range.start;
        let c = &self.counters;
        if let Some(entry) = reuse.and_then(|r| r.entry(b, cs, size)) {
            c.reused.fetch_add(len, Relaxed);
            if entry.is_none() {
                c.zero.fetch_add(len, Relaxed);
            }
            return Ok(entry);
        }
        if src.is_unallocated(range.start, len) {
            c.zero.fetch_add(len, Relaxed);
            return Ok(None);
        }
        let disk = name.to_string();
        let read = blocking(move || {
            let mut buf = vec![0u8; len as usize];
            src.read_exact_at(&mut buf, range.start)
                .map_err(|source| RepoError::Disk { disk, source })?;
            if is_zero(&buf) {
                return Ok(None);
            }
            let id = ChunkId::of(&buf);
            Ok(Some((id, buf)))
        })
        .await?;
        c.read.fetch_add(len, Relaxed);
        let Some((id, data)) = read else {
            c.zero.fetch_add(len, Relaxed);
            return Ok(None);
        };
        self.store_chunk(id, data, true).await?;
        Ok(Some(id))
    }

    /// Stores a chunk unless this backup or the repository already has it.
    /// `is_data`: a disk block (counted in `new_bytes` and the dedup ratio), not metadata.
    async fn store_chunk(
        &self,
        id: ChunkId,
        data: Vec<u8>,
        is_data: bool,
    ) -> Result<(), RepoError> {
        let first = self
            .claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        if !first || self.repo.store().has_chunk(&id).await? {
            return Ok(());
        }
        let len = data.len() as u64;
        let stored = blocking(move || codec::compress(&data)).await?;
        let stored_len = stored.len() as u64;
        self.repo.store().put_chunk(&id, stored).await?;
        let c = &self.counters;
        c.new_chunks.fetch_add(1, Relaxed);
        if is_data {
            c.new_bytes.fetch_add(len, Relaxed);
        }
        c.stored.fetch_add(stored_len, Relaxed);
        Ok(())
    }

    /// Stores a table piece or the config as a chunk; returns its id.
    async fn store_object(&self, data: Vec<u8>) -> Result<ChunkId, RepoError> {
        let id = ChunkId::of(&data);
        self.store_chunk(id, data, false).await?;
        Ok(id)
    }
}

/// True when every byte is zero. OR-folding fixed slices (no early exit inside one) lets the
/// compiler vectorise the check.
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_sees_a_single_set_byte_anywhere() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for i in [0, 7, 8, 4095, 4098] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            buf[i] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn changed_areas_past_the_end_are_refused() {
        let cs = super::super::ChunkSize::new(65536).unwrap();
        let table = BlockTable::from_blocks(vec![None; 4]);
        let bad = [Extent {
            start: 4 * 65536 - 10,
            length: 11,
        }];
        assert!(ParentReuse::new(table.clone(), 4 * 65536, 4 * 65536, &bad, cs, "d").is_err());
        let overflow = [Extent {
            start: u64::MAX,
            length: 2,
        }];
        assert!(ParentReuse::new(table.clone(), 4 * 65536, 4 * 65536, &overflow, cs, "d").is_err());
        let ok = [Extent {
            start: 65536 + 5,
            length: 65536,
        }];
        let r = ParentReuse::new(table, 4 * 65536, 4 * 65536 + 7, &ok, cs, "d").unwrap();
        assert_eq!(r.entry(0, cs, 4 * 65536 + 7), Some(None));
        assert_eq!(r.entry(1, cs, 4 * 65536 + 7), None, "changed");
        assert_eq!(r.entry(2, cs, 4 * 65536 + 7), None, "changed");
        assert_eq!(r.entry(3, cs, 4 * 65536 + 7), Some(None));
        assert_eq!(
            r.entry(4, cs, 4 * 65536 + 7),
            None,
            "new block past the parent's end"
        );
    }
}
