//! Block math: which blocks of a disk cover a byte range, and how long each block is.
//!
//! Pure arithmetic, no I/O. Every function is total: offsets near `u64::MAX` and ranges past the
//! end of a disk give empty or clipped results, never an overflow.

use std::ops::Range;

use super::RepoError;

/// The fixed block (and maximum chunk) size of a repository: a power of two, 64 KiB..=4 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct ChunkSize(u32);

/// Index of a block within one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockIdx(pub u64);

impl ChunkSize {
    pub const MIN: u32 = 64 * 1024;
    pub const MAX: u32 = 4 * 1024 * 1024;
    pub const DEFAULT: ChunkSize = ChunkSize(1024 * 1024);

    pub fn new(bytes: u32) -> Result<Self, RepoError> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(ChunkSize(bytes))
        } else {
            Err(RepoError::BadChunkSize {
                given: bytes.to_string(),
            })
        }
    }

    /// Parses a size such as `1MiB`, `256KiB` or `65536`.
    pub fn parse(text: &str) -> Result<Self, RepoError> {
        let bad = || RepoError::BadChunkSize {
            given: text.to_string(),
        };
        let bytes: bytesize::ByteSize = text.trim().parse().map_err(|_| bad())?;
        let bytes = u32::try_from(bytes.as_u64()).map_err(|_| bad())?;
        Self::new(bytes).map_err(|_| bad())
    }

    pub fn bytes(self) -> u32 {
        self.0
    }

    pub fn as_u64(self) -> u64 {
        u64::from(self.0)
    }

    pub fn as_usize(self) -> usize {
        self.0 as usize
    }

    /// How many blocks a disk of `disk_size` bytes has (the last one may be partial).
    pub fn block_count(self, disk_size: u64) -> u64 {
        disk_size.div_ceil(self.as_u64())
    }

    /// The byte range of block `idx` within a disk of `disk_size` bytes: `chunk_size` long except
    /// for a partial last block; empty past the end.
    pub fn block_range(self, idx: BlockIdx, disk_size: u64) -> Range<u64> {
        let start = idx.0.saturating_mul(self.as_u64()).min(disk_size);
        let end = start.saturating_add(self.as_u64()).min(disk_size);
        start..end
    }

    /// The blocks that overlap `[offset, offset + len)`, clipped to the disk.
    pub fn blocks_covering(self, offset: u64, len: u64, disk_size: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(disk_size);
        if offset >= end {
            return 0..0;
        }
        offset / self.as_u64()..end.div_ceil(self.as_u64())
    }
}

impl TryFrom<u32> for ChunkSize {
    type Error = RepoError;
    fn try_from(v: u32) -> Result<Self, RepoError> {
        ChunkSize::new(v)
    }
}

impl From<ChunkSize> for u32 {
    fn from(c: ChunkSize) -> u32 {
        c.0
    }
}

impl std::fmt::Display for ChunkSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", bytesize::ByteSize(self.as_u64()).display().iec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn chunk_size_accepts_powers_of_two_in_range_only() {
        assert!(ChunkSize::new(64 * 1024).is_ok());
        assert!(ChunkSize::new(4 * 1024 * 1024).is_ok());
        assert!(ChunkSize::new(32 * 1024).is_err());
        assert!(ChunkSize::new(8 * 1024 * 1024).is_err());
        assert!(ChunkSize::new(3 * 1024 * 1024).is_err());
        assert_eq!(ChunkSize::parse("1MiB").unwrap().bytes(), 1 << 20);
        assert_eq!(ChunkSize::parse("256KiB").unwrap().bytes(), 256 << 10);
        assert_eq!(ChunkSize::parse("65536").unwrap().bytes(), 65536);
        let err = ChunkSize::parse("1MB").unwrap_err().to_string();
        assert!(err.contains("1MB") && err.contains("power of two"), "{err}");
        assert!(ChunkSize::parse("lots").is_err());
    }

    #[test]
    fn last_partial_block_is_short() {
        let cs = ChunkSize::DEFAULT;
        let size = 5 * MIB + 4096 + 512;
        assert_eq!(cs.block_count(size), 6);
        assert_eq!(cs.block_range(BlockIdx(5), size), 5 * MIB..size);
        assert_eq!(cs.block_range(BlockIdx(6), size), size..size);
        assert_eq!(cs.block_count(0), 0);
        assert_eq!(cs.block_count(MIB), 1);
        assert_eq!(cs.block_count(MIB + 1), 2);
    }

    #[test]
    fn blocks_covering_clips_to_disk_and_handles_huge_offsets() {
        let cs = ChunkSize::DEFAULT;
        let size = 3 * MIB + 10;
        assert_eq!(cs.blocks_covering(0, 1, size), 0..1);
        assert_eq!(cs.blocks_covering(MIB - 1, 2, size), 0..2);
        assert_eq!(cs.blocks_covering(MIB, MIB, size), 1..2);
        assert_eq!(cs.blocks_covering(3 * MIB, 100, size), 3..4);
        assert_eq!(cs.blocks_covering(size, 100, size), 0..0);
        assert_eq!(cs.blocks_covering(0, 0, size), 0..0);
        assert_eq!(cs.blocks_covering(u64::MAX - 10, 100, u64::MAX), {
            let first = (u64::MAX - 10) / MIB;
            first..u64::MAX.div_ceil(MIB)
        });
        assert_eq!(cs.blocks_covering(u64::MAX, u64::MAX, size), 0..0);
        assert_eq!(
            cs.block_range(BlockIdx(u64::MAX), u64::MAX),
            u64::MAX..u64::MAX
        );
    }
}
