//! Snapshot manifests and block tables.
//!
//! A manifest is a small JSON document (format below) named by the BLAKE3 digest of its bytes,
//! so a damaged manifest is detected when it is read. The per-disk block tables are not inline:
//! a table is a list of 32-byte chunk digests, one per block (32 zero bytes for an all-zero
//! block), cut into pieces of at most `chunk_size / 32` entries, each piece stored as a chunk.
//! Listing snapshots thus reads a few hundred bytes per snapshot whatever the disk sizes, and
//! tables are deduplicated and verified like data.
//!
//! ```json
//! { "format": 1, "vm": {"name": "web01", "uuid": "…", "hypervisor": "esxi"},
//!   "taken": "2026-11-22T04:03:41Z", "chunk_size": 1048576, "parent": null,
//!   "config": {"file_name": "web01.vmx", "size": 2301, "chunk": "<digest>"},
//!   "disks": [{"name": "web01.vmdk", "device": "scsi0:0", "source_format": "vmdk",
//!              "size": 17179869184, "allocated_blocks": 812, "table": ["<digest>", …]}] }
//! ```

use crate::disk::DiskFormat;
use crate::vmconfig::Hypervisor;

use super::{ChunkId, ChunkSize, RepoError};

/// Manifest format written by this build.
pub(crate) const MANIFEST_FORMAT: u32 = 1;
/// A VM config larger than this is refused at backup (real ones are a few KiB).
pub(crate) const MAX_CONFIG_BYTES: usize = 16 * 1024 * 1024;

/// The id of a snapshot: the BLAKE3 digest of its manifest's bytes.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct SnapshotId(pub ChunkId);

impl SnapshotId {
    pub fn of(manifest_bytes: &[u8]) -> Self {
        SnapshotId(ChunkId::of(manifest_bytes))
    }
    pub fn from_hex(text: &str) -> Option<Self> {
        ChunkId::from_hex(text).map(SnapshotId)
    }
    /// The first 12 hex digits, as listings show it.
    pub fn short(&self) -> String {
        self.0.to_hex()[..12].to_string()
    }
}

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.to_hex())
    }
}

impl std::fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotId({})", self.short())
    }
}

/// Who the snapshot is of.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    pub name: String,
    /// The VM's identity from its config (`uuid.bios`, libvirt `<uuid>`), if it has one.
    pub uuid: Option<String>,
    pub hypervisor: Hypervisor,
}

/// The VM's original config file, stored as a chunk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigRef {
    pub file_name: String,
    pub size: u64,
    pub chunk: ChunkId,
}

/// One disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskManifest {
    /// The disk's path as the config refers to it.
    pub name: String,
    /// Where the config attaches it (`scsi0:0`, `vda`).
    pub device: String,
    /// The format it was read from.
    pub source_format: DiskFormat,
    /// Exact guest-visible size in bytes.
    pub size: u64,
    /// Blocks that are not all zeros.
    pub allocated_blocks: u64,
    /// The block table's pieces, in order.
    pub table: Vec<ChunkId>,
}

/// One point in time of one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub vm: VmInfo,
    /// When the backup started (UTC, whole seconds).
    pub taken: jiff::Timestamp,
    pub chunk_size: ChunkSize,
    /// The snapshot an incremental backup took unchanged blocks from.
    pub parent: Option<SnapshotId>,
    pub config: ConfigRef,
    pub disks: Vec<DiskManifest>,
}

impl Manifest {
    /// Serialises the manifest; the id is the digest of exactly these bytes.
    pub(crate) fn encode(&self) -> Result<(SnapshotId, Vec<u8>), RepoError> {
        let mut bytes =
            serde_json::to_vec_pretty(self).map_err(|e| RepoError::Invalid(e.to_string()))?;
        bytes.push(b'\n');
        Ok((SnapshotId::of(&bytes), bytes))
    }

    /// Parses manifest bytes read under `id`, checking they hash to it.
    pub(crate) fn decode(id: &SnapshotId, bytes: &[u8]) -> Result<Self, RepoError> {
        let corrupt = |what: String| RepoError::CorruptManifest {
            id: id.to_string(),
            what,
        };
        let actual = SnapshotId::of(bytes);
        if actual != *id {
            return Err(corrupt(format!("its bytes hash to {actual}")));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| corrupt(format!("unreadable: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(corrupt(format!(
                "manifest format {} is not supported by this livemount",
                m.format
            )));
        }
        for d in &m.disks {
            let blocks = m.chunk_size.block_count(d.size);
            let pieces = blocks.div_ceil(entries_per_piece(m.chunk_size) as u64);
            if d.table.len() as u64 != pieces {
                return Err(corrupt(format!(
                    "disk {} of {} bytes needs {pieces} table pieces, the manifest has {}",
                    d.name,
                    d.size,
                    d.table.len()
                )));
            }
        }
        Ok(m)
    }

    /// `VM@TIME`, the snapshot's human name.
    pub fn display_name(&self) -> String {
        format!("{}@{}", self.vm.name, format_time(self.taken))
    }
}

/// RFC 3339, UTC, whole seconds: `2026-11-22T04:03:41Z`.
pub(crate) fn format_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// How many block digests one table piece holds.
pub(crate) fn entries_per_piece(chunk_size: ChunkSize) -> usize {
    chunk_size.as_usize() / 32
}

/// The block table of one disk: the chunk of each block, `None` for an all-zero block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockTable(Vec<ChunkId>);

const ZERO_ENTRY: ChunkId = ChunkId([0; 32]);

impl BlockTable {
    pub fn from_blocks(blocks: Vec<Option<ChunkId>>) -> Self {
        BlockTable(
            blocks
                .into_iter()
                .map(|b| b.unwrap_or(ZERO_ENTRY))
                .collect(),
        )
    }

    pub fn len(&self) -> u64 {
        self.0.len() as u64
    }

    pub fn get(&self, idx: u64) -> Option<ChunkId> {
        usize::try_from(idx)
            .ok()
            .and_then(|i| self.0.get(i))
            .filter(|c| **c != ZERO_ENTRY)
            .copied()
    }

    /// Every chunk the table names, zero blocks left out.
    pub fn chunks(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.0.iter().filter(|c| **c != ZERO_ENTRY).copied()
    }

    /// The table cut into piece bytes for storage.
    pub fn to_pieces(&self, chunk_size: ChunkSize) -> Vec<Vec<u8>> {
        self.0
            .chunks(entries_per_piece(chunk_size))
            .map(|piece| piece.iter().flat_map(|c| c.0).collect())
            .collect()
    }

    /// Rebuilds a table of `blocks` entries from its pieces' bytes.
    pub fn from_pieces(
        pieces: &[bytes::Bytes],
        blocks: u64,
        chunk_size: ChunkSize,
    ) -> Result<Self, String> {
        let per = entries_per_piece(chunk_size);
        for (i, p) in pieces.iter().enumerate() {
            if p.len() % 32 != 0 || p.len() / 32 > per {
                return Err(format!("table piece {i} has {} bytes", p.len()));
            }
        }
        // Check the entries add up before allocating for them: a crafted manifest may claim a
        // disk far larger than its table.
        let entries: u64 = pieces.iter().map(|p| p.len() as u64 / 32).sum();
        if entries != blocks {
            return Err(format!(
                "table has {entries} entries, the disk has {blocks} blocks"
            ));
        }
        let mut out = Vec::with_capacity(usize::try_from(blocks).map_err(|e| e.to_string())?);
        for p in pieces {
            out.extend(p.chunks_exact(32).map(|e| {
                let mut d = [0u8; 32];
                d.copy_from_slice(e);
                ChunkId(d)
            }));
        }
        Ok(BlockTable(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            vm: VmInfo {
                name: "web01".into(),
                uuid: Some("564d1234-5678-9abc-def0-123456789abc".into()),
                hypervisor: Hypervisor::Esxi,
            },
            taken: "2026-11-22T04:03:41Z".parse().unwrap(),
            chunk_size: ChunkSize::DEFAULT,
            parent: None,
            config: ConfigRef {
                file_name: "web01.vmx".into(),
                size: 10,
                chunk: ChunkId::of(b"config"),
            },
            disks: vec![DiskManifest {
                name: "web01.vmdk".into(),
                device: "scsi0:0".into(),
                source_format: DiskFormat::Vmdk,
                size: 3 * 1024 * 1024 + 1,
                allocated_blocks: 2,
                table: vec![ChunkId::of(b"piece")],
            }],
        }
    }

    #[test]
    fn manifest_round_trips_and_is_named_by_its_digest() {
        let m = sample();
        let (id, bytes) = m.encode().unwrap();
        assert_eq!(Manifest::decode(&id, &bytes).unwrap(), m);
        assert_eq!(m.display_name(), "web01@2026-11-22T04:03:41Z");
    }

    #[test]
    fn damaged_manifest_is_detected() {
        let (id, mut bytes) = sample().encode().unwrap();
        let pos = bytes.iter().position(|b| *b == b'w').unwrap();
        bytes[pos] = b'W';
        let err = Manifest::decode(&id, &bytes).unwrap_err().to_string();
        assert!(
            err.contains(&id.to_string()) && err.contains("hash"),
            "{err}"
        );
    }

    #[test]
    fn manifest_with_wrong_table_length_is_refused() {
        let mut m = sample();
        m.disks[0].table.push(ChunkId::of(b"extra"));
        let (id, bytes) = m.encode().unwrap();
        let err = Manifest::decode(&id, &bytes).unwrap_err().to_string();
        assert!(err.contains("table pieces"), "{err}");
    }

    #[test]
    fn block_table_round_trips_through_pieces() {
        let cs = ChunkSize::new(64 * 1024).unwrap(); // 2048 entries a piece
        let blocks: Vec<Option<ChunkId>> = (0..5000u32)
            .map(|i| (i % 3 != 0).then(|| ChunkId::of(&i.to_le_bytes())))
            .collect();
        let table = BlockTable::from_blocks(blocks.clone());
        let pieces: Vec<bytes::Bytes> = table
            .to_pieces(cs)
            .into_iter()
            .map(bytes::Bytes::from)
            .collect();
        assert_eq!(pieces.len(), 3);
        let back = BlockTable::from_pieces(&pieces, 5000, cs).unwrap();
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(back.get(i as u64), *b);
        }
        assert_eq!(back.get(5000), None);
        assert_eq!(back.chunks().count(), 3333);
        assert!(BlockTable::from_pieces(&pieces, 4999, cs).is_err());
        assert!(BlockTable::from_pieces(&[bytes::Bytes::from_static(&[1; 33])], 1, cs).is_err());
        // A crafted manifest claiming a huge disk over a small table is refused, not allocated.
        let err = BlockTable::from_pieces(&pieces, 1 << 40, cs).unwrap_err();
        assert!(err.contains("5000 entries"), "{err}");
    }
}
