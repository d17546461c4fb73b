//! The backup repository: where snapshots of VMs live, deduplicated, compressed and verified.
//!
//! Owns: the on-disk format (see `docs/ARCHITECTURE.md`), the [`ChunkStore`] trait and its local
//! directory backend, snapshot manifests, ingest (backup), the read API that live mounts use
//! ([`DiskImage::read_at`]), verify and restore.
//! Must not: know about NFS, mounts or caches. Callers above wrap [`ChunkReader`] to add caching.
//!
//! Data model:
//! - A repository has one chunk size (a power of two, 64 KiB..=4 MiB) fixed at `repo init`.
//! - A disk is cut into blocks of that size. An all-zero block is stored as nothing. Every other
//!   block is a chunk named by the BLAKE3 digest of its bytes, stored zstd-compressed once per
//!   repository, and checked against that digest on every read.
//! - A snapshot is a small JSON manifest named by the BLAKE3 digest of its own bytes. Its block
//!   tables (one digest per block) and the VM's config file are stored as chunks too, so they are
//!   deduplicated and verified like data.
//!
//! Ordering rules (crash safety): every object is written to `tmp/`, fsynced, then renamed into
//! place; a manifest is written only after [`ChunkStore::sync`] has made every chunk it refers to
//! durable (directory entries included). Writers hold the repository's `lock` file exclusively;
//! readers take no lock, because nothing is ever changed or removed in place.

mod blocks;
mod catalog;
mod codec;
mod forget;
mod ingest;
mod kept;
pub mod lease;
mod local;
mod location;
mod manifest;
mod pool;
mod prune;
mod read;
mod restore;
pub mod retention;
mod s3;
mod slow;
mod store;
mod verify;

use std::path::PathBuf;

pub use blocks::{BlockIdx, ChunkSize};
pub use catalog::{parse_time, SnapshotInfo, SnapshotSpec};
pub use forget::{ForgetPlan, ForgetTarget, Verdict};
pub use ingest::{BackupOptions, BackupSummary, ChangedBlocks, DiskInput};
pub use kept::KeptCopies;
pub use local::LocalStore;
pub use location::RepoLocation;
pub use manifest::{DiskManifest, Manifest, SnapshotId, VmInfo};
pub use prune::{Counts, PruneReport};
pub use read::{ChunkReader, DiskImage, Extent, Pieces, RepoStats, Repository, Snapshot};
pub(crate) use restore::{descriptor_at, plan_files};
pub use restore::{RestoreSummary, RestoredDisk};
pub use s3::{S3Config, S3Store};
pub use slow::{SlowStore, Slowness};
pub use store::{is_record_name, Area, ChunkId, ChunkStore, Record};
pub use verify::{BadChunk, ChunkProblem, VerifyReport};

/// Progress of long work (backup, restore, verify), in bytes. The CLI draws a bar with it.
pub trait Progress: Send + Sync {
    /// The total amount of work, when it becomes known.
    fn set_total(&self, bytes: u64);
    /// Work done since the last call.
    fn advance(&self, bytes: u64);
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// Errors of the repository. Each names the repository object involved.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("repository {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that is not part of the repository (a VM config, a disk, a restore target).
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{repo} is not a livemount repository (no {file}){hint}; create one with `livemount repo init {repo}`", file = local::CONFIG_FILE)]
    NotARepository { repo: RepoLocation, hint: String },
    #[error("{repo} already exists and is not empty; `repo init` needs a new or empty directory, or a bucket prefix that holds no object")]
    AlreadyExists { repo: RepoLocation },
    #[error("repository {repo}: {what}")]
    BadRepository { repo: RepoLocation, what: String },
    #[error("invalid chunk size {given}: it must be a power of two from 64KiB to 4MiB")]
    BadChunkSize { given: String },
    /// The repository as a whole cannot be reached (its directory gone, its storage down).
    #[error("repository {repo} cannot be reached: {what}")]
    Unreachable { repo: RepoLocation, what: String },
    /// The bucket of an S3 repository does not exist.
    #[error("repository {repo}: there is no bucket {bucket:?} at this endpoint (check the bucket name and AWS_ENDPOINT_URL or [repository] endpoint)")]
    NoBucket { repo: RepoLocation, bucket: String },
    /// The object store refused the credentials or the request.
    #[error("repository {repo} refused access: {what} (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or [repository] in the config, and the key's permissions on the bucket)")]
    Denied { repo: RepoLocation, what: String },
    /// Any other failure of the object store.
    #[error("repository {repo}: {what}")]
    Store { repo: RepoLocation, what: String },
    #[error("chunk {chunk} is missing from the repository")]
    MissingChunk { chunk: ChunkId },
    #[error("chunk {chunk} is corrupt: {what}")]
    CorruptChunk { chunk: ChunkId, what: String },
    #[error("snapshot {id} is corrupt: {what}")]
    CorruptManifest { id: String, what: String },
    #[error("no snapshot matches {spec}{hint}")]
    NoSnapshot { spec: String, hint: String },
    #[error("{spec} is ambiguous: it matches {matches}")]
    AmbiguousSnapshot { spec: String, matches: String },
    #[error("repository {repo} is busy: another backup holds its lock; wait for it to finish")]
    Locked { repo: RepoLocation },
    #[error("disk {disk}: {source}")]
    Disk {
        disk: String,
        #[source]
        source: crate::disk::DiskError,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("disk {disk} at offset {offset}, chunk {chunk}: {source}")]
    Read {
        disk: String,
        offset: u64,
        chunk: ChunkId,
        #[source]
        source: Box<RepoError>,
    },
    #[error("restore target {path}: {what}")]
    RestoreTarget { path: PathBuf, what: String },
    #[error("snapshot {snapshot} is in use: {uses}; unmount it (or let the relocation or restore finish) before forgetting it")]
    InUse { snapshot: String, uses: String },
    #[error("a background task failed: {0}")]
    Task(String),
}

impl RepoError {
    /// Whether this failure is the store being away (unreachable, or answering that it cannot
    /// serve now), which a VM's read rides through (`cache::outage`), rather than a failure
    /// of this one chunk or request.
    pub fn is_outage(&self) -> bool {
        match self {
            RepoError::Unreachable { .. } => true,
            RepoError::Read { source, .. } => source.is_outage(),
            _ => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RepoError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Runs blocking work (file I/O, hashing, compression) off the async runtime's threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, RepoError>
where
    F: FnOnce() -> Result<T, RepoError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RepoError::Task(e.to_string()))?
}
