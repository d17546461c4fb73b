//! Block devices in memory, for tests and fuzzing of the block protocols (not part of the API).
//!
//! Owns: [`MemDisk`].
//! Must not: be used by a server itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlockDevice, BlockError, Extent, Pieces};

/// A disk in memory; counts its flushes.
pub struct MemDisk {
    pub bytes: Mutex<Vec<u8>>,
    pub read_only: bool,
    pub flushes: AtomicUsize,
}

/// A disk of `len` bytes of `fill`.
pub fn disk(len: usize, fill: u8, read_only: bool) -> Arc<MemDisk> {
    Arc::new(MemDisk {
        bytes: Mutex::new(vec![fill; len]),
        read_only,
        flushes: AtomicUsize::new(0),
    })
}

impl MemDisk {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    // The server checks every range against the size before it calls these; a range past
    // the end here is a finding (the slice panics).
    async fn read(&self, offset: u64, len: u32) -> Result<Pieces, BlockError> {
        let b = self.lock();
        Ok(Bytes::copy_from_slice(&b[offset as usize..offset as usize + len as usize]).into())
    }
    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BlockError> {
        assert!(!self.read_only, "a write reached a read-only disk");
        let mut b = self.lock();
        b[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    /// Runs of [`MEM_BLOCK`]-byte blocks that are all zeros are zero runs; the range is
    /// checked as `read` checks it.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        let b = self.lock();
        let (start, end) = (offset as usize, (offset + len) as usize);
        let range = &b[start..end];
        let mut runs = Vec::new();
        let mut at = start;
        while at < end {
            let hi = ((at / MEM_BLOCK + 1) * MEM_BLOCK).min(end);
            let zero = range[at - start..hi - start].iter().all(|x| *x == 0);
            Extent::push(
                &mut runs,
                Extent {
                    len: (hi - at) as u64,
                    zero,
                },
            );
            at = hi;
        }
        Ok(runs)
    }
}

/// What a [`MemDisk`] reports extents in.
pub const MEM_BLOCK: usize = 4096;
