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
}
