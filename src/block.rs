//! What the block protocols (NBD, iSCSI) serve: a disk with a size, reads, writes, a flush and
//! zeroing, and why a request failed in words both protocols map to their own codes. The
//! datastore core's [`Disk`] is the one real [`BlockDevice`]; tests and fuzzing bring
//! in-memory ones.
//!
//! Owns: [`BlockDevice`], [`BlockError`], the map from [`DatastoreError`] to [`BlockError`].
//! Must not: know a wire format (NBD error numbers and SCSI sense data live with their
//! servers), or look into a mount (the core's [`Disk`] does the reading and writing).

mod accept;
#[doc(hidden)]
pub mod testing;

pub use accept::Acceptor;

use async_trait::async_trait;

use crate::datastore::{DatastoreError, Disk};
pub use crate::repo::{Extent, Pieces};

/// Why a block request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockError {
    /// The disk is read-only.
    ReadOnly,
    /// The range is past the end of the disk.
    OutOfRange,
    /// The state directory is full.
    NoSpace,
    /// Anything else (a repository read that failed, a disk error); the text is logged.
    Io(String),
}

/// Zeros are written this much at a time.
const ZERO_STEP: usize = 1 << 20;

/// A disk as a block protocol serves it.
#[async_trait]
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    /// Reads `len` bytes at `offset` (inside the disk), as the pieces they were found in.
    async fn read(&self, offset: u64, len: u32) -> Result<Pieces, BlockError>;
    /// Writes `data` at `offset` (inside the disk); durable when it returns if `fua`.
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError>;
    /// Makes every acknowledged write durable.
    async fn flush(&self) -> Result<(), BlockError>;
    /// What `len` bytes at `offset` (inside the disk) hold, as runs adding up to `len`: runs
    /// known to read as zeros, and data (or not known). Unless a device knows better, all
    /// data.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        let _ = offset;
        Ok(vec![Extent { len, zero: false }])
    }
    /// Makes `len` bytes at `offset` (inside the disk) read as zeros: TRIM, WRITE_ZEROES,
    /// UNMAP, WRITE SAME of zeros. Zeros go into the overlay a MiB at a time; the backup is
    /// never touched.
    async fn write_zeros(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        let zeros = vec![0u8; ZERO_STEP];
        let end = offset.checked_add(len).ok_or(BlockError::OutOfRange)?;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(ZERO_STEP as u64) as usize;
            self.write(at, &zeros[..n], false).await?;
            at += n as u64;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        Disk::size(self)
    }

    fn read_only(&self) -> bool {
        Disk::read_only(self)
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Pieces, BlockError> {
        Disk::read(self, offset, len)
            .await
            .map_err(|e| to_block(&e))
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        Disk::write(self, offset, data, fua)
            .await
            .map_err(|e| to_block(&e))
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Disk::flush(self).await.map_err(|e| to_block(&e))
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        Disk::extents(self, offset, len).map_err(|e| to_block(&e))
    }
}

/// The block error for a refused or failed datastore operation.
pub fn to_block(e: &DatastoreError) -> BlockError {
    match e {
        DatastoreError::ReadOnlyMount | DatastoreError::NotWritable | DatastoreError::Fenced => {
            BlockError::ReadOnly
        }
        DatastoreError::TooBig | DatastoreError::Invalid(_) => BlockError::OutOfRange,
        DatastoreError::NoSpace => BlockError::NoSpace,
        e => BlockError::Io(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_errors_become_block_errors() {
        let table = [
            (DatastoreError::ReadOnlyMount, BlockError::ReadOnly),
            (DatastoreError::NotWritable, BlockError::ReadOnly),
            (DatastoreError::Fenced, BlockError::ReadOnly),
            (DatastoreError::TooBig, BlockError::OutOfRange),
            (DatastoreError::Invalid("x"), BlockError::OutOfRange),
            (DatastoreError::NoSpace, BlockError::NoSpace),
        ];
        for (e, want) in table {
            assert_eq!(to_block(&e), want, "{e:?}");
        }
        for e in [
            DatastoreError::Stale,
            DatastoreError::Io("chunk".into()),
            DatastoreError::Internal("x".into()),
        ] {
            assert!(matches!(to_block(&e), BlockError::Io(_)), "{e:?}");
        }
    }
}
