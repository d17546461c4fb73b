//! The chunk store: where a repository's objects live. An async trait, so that an object-storage
//! backend can come later without touching its callers; [`super::LocalStore`] is the embedded
//! default.
//!
//! A store moves opaque stored bytes (already compressed) under names it is given. It does not
//! compress, decompress or verify: that is [`super::codec`]'s job, above every backend alike.

use async_trait::async_trait;
use bytes::Bytes;

use super::manifest::SnapshotId;
use super::RepoError;

/// The BLAKE3 digest of a chunk's uncompressed bytes, which is its name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        blake3::Hash::from_hex(text)
            .ok()
            .map(|h| ChunkId(*h.as_bytes()))
    }
}

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ChunkId::from_hex(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("not a chunk digest: {text:?}")))
    }
}

/// A folder of small housekeeping objects, beside `chunks/` and `snapshots/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Area {
    /// `leases/`: who uses which snapshot (agents, backups, restores), renewed while they run.
    Leases,
    /// `forgotten/`: manifests `forget` took out of `snapshots/`, kept while a lease may name
    /// them.
    Forgotten,
    /// `prune/`: one record per collection of chunks a prune set aside.
    Prune,
}

impl Area {
    /// The folder (or key prefix) of the area.
    pub fn dir(self) -> &'static str {
        match self {
            Area::Leases => "leases",
            Area::Forgotten => "forgotten",
            Area::Prune => "prune",
        }
    }
}

/// A housekeeping object as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    /// When it was last written, by the store's clock (a file's mtime, an object's
    /// Last-Modified).
    pub modified: jiff::Timestamp,
}

/// Whether `name` may name a record or a bin of set-aside chunks: 1-128 of `[0-9a-z._-]`, not
/// starting with a dot.
pub fn is_record_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b"._-".contains(&b))
}

/// Refuses a record or bin name that is not one of ours (it could reach outside its folder).
pub(crate) fn check_record_name(name: &str) -> Result<(), RepoError> {
    if is_record_name(name) {
        Ok(())
    } else {
        Err(RepoError::Invalid(format!(
            "{name:?} is not a repository record name"
        )))
    }
}

/// Storage of a repository's chunks and snapshot manifests.
///
/// Durability contract: `put_chunk` makes the chunk's bytes durable before it is visible under its
/// name; `sync` makes every name published so far durable. `put_manifest` is called only after
/// `sync`, and publishes the manifest durably before it returns.
#[async_trait]
pub trait ChunkStore: Send + Sync + std::fmt::Debug {
    /// The stored (compressed) bytes of a chunk; [`RepoError::MissingChunk`] if there is none.
    async fn get_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError>;

    /// Whether a chunk is stored.
    async fn has_chunk(&self, id: &ChunkId) -> Result<bool, RepoError>;

    /// Stores a chunk's stored bytes under its name. Storing a chunk that exists is a no-op.
    async fn put_chunk(&self, id: &ChunkId, stored: Bytes) -> Result<(), RepoError>;

    /// Makes every chunk stored so far durable, names included.
    async fn sync(&self) -> Result<(), RepoError>;

    /// The bytes of a snapshot manifest.
    async fn get_manifest(&self, id: &SnapshotId) -> Result<Bytes, RepoError>;

    /// Publishes a manifest durably under its id.
    async fn put_manifest(&self, id: &SnapshotId, bytes: Bytes) -> Result<(), RepoError>;

    /// The ids of every published manifest.
    async fn list_manifests(&self) -> Result<Vec<SnapshotId>, RepoError>;

    /// Stored size in bytes of a chunk, if the backend can tell cheaply.
    async fn chunk_stored_size(&self, id: &ChunkId) -> Result<Option<u64>, RepoError>;

    /// Removes a published manifest (durably); one that is not there is no error.
    async fn delete_manifest(&self, id: &SnapshotId) -> Result<(), RepoError>;

    /// Every stored chunk and its stored size, in no particular order.
    async fn list_chunks(&self) -> Result<Vec<(ChunkId, u64)>, RepoError>;

    /// Writes a housekeeping object whole (durably, atomically). `name` passes
    /// [`is_record_name`].
    async fn put_record(&self, area: Area, name: &str, bytes: Bytes) -> Result<(), RepoError>;

    /// A housekeeping object's bytes, or `None` if there is none.
    async fn get_record(&self, area: Area, name: &str) -> Result<Option<Bytes>, RepoError>;

    /// Every object of an area.
    async fn list_records(&self, area: Area) -> Result<Vec<Record>, RepoError>;

    /// Removes a housekeeping object; one that is not there is no error.
    async fn delete_record(&self, area: Area, name: &str) -> Result<(), RepoError>;

    /// Moves a chunk out of `chunks/` into the bin `bin` of `trash/`: readers still find it
    /// there ([`ChunkStore::get_set_aside`]), [`ChunkStore::has_chunk`] no longer does. A chunk
    /// that is not in `chunks/` is no error.
    async fn set_aside(&self, bin: &str, id: &ChunkId) -> Result<(), RepoError>;

    /// The bins of `trash/`.
    async fn list_bins(&self) -> Result<Vec<String>, RepoError>;

    /// The chunks of a bin and their stored sizes.
    async fn list_set_aside(&self, bin: &str) -> Result<Vec<(ChunkId, u64)>, RepoError>;

    /// A set-aside chunk's stored bytes, or `None` if the bin does not hold it.
    async fn get_set_aside(&self, bin: &str, id: &ChunkId) -> Result<Option<Bytes>, RepoError>;

    /// Moves a set-aside chunk back into `chunks/` (durably), or just drops it from the bin when
    /// `chunks/` has it again.
    async fn put_back(&self, bin: &str, id: &ChunkId) -> Result<(), RepoError>;

    /// Deletes set-aside chunks for good; ones not in the bin are no error.
    async fn delete_set_aside(&self, bin: &str, ids: &[ChunkId]) -> Result<(), RepoError>;

    /// Removes a bin once it is empty.
    async fn remove_bin(&self, bin: &str) -> Result<(), RepoError>;

    /// The store's clock: the time a record written now would show as `modified`.
    async fn now(&self) -> Result<jiff::Timestamp, RepoError>;
}
