//! Memory for decoded chunks: fixed-size slots carved from large regions backed by transparent
//! huge pages, handed out as the owners of the chunks' `Bytes` and taken back when the last
//! reference to a chunk goes (an evicted cache entry, a finished read).
//!
//! Why (decision 0021): a cold read decodes every chunk into new memory, and with a buffer from
//! the allocator each 4 KiB page of it costs a page fault, its clearing and its memory-cgroup
//! charge: about a seventh of the server's CPU on a cold sequential read. A region of
//! `madvise(MADV_HUGEPAGE)` memory faults once per 2 MiB, and a slot that comes back is reused
//! without a fault at all, as a busy agent's cache evicts and refills.
//!
//! Owns: the regions (mapped once, never unmapped; their memory is resident for the slots in
//! use and up to 64 MiB of free ones, the rest given back with `MADV_DONTNEED`) and the free
//! slots of each slot size (64 KiB to 8 MiB).
//! Must not: hand out a slot twice (a slot is either in its pool's free list or owned by exactly
//! one [`Slot`], which gives it back once, on drop), or expose memory that was never written:
//! fresh anonymous memory is zero, and a reused slot holds an earlier chunk, so every byte of a
//! slot is initialised, and a chunk's `Bytes` covers only what its decoder wrote.

use std::ptr::NonNull;
use std::sync::Mutex;

use bytes::Bytes;

/// Huge page size on x86-64 and the alignment of regions.
const HUGE: usize = 2 << 20;
/// A region is at least this large (and holds at least [`MIN_SLOTS`] slots).
const REGION: usize = 64 << 20;
const MIN_SLOTS: usize = 16;
/// Slot sizes the pool serves; others come from the allocator.
pub(crate) const MIN_SLOT: usize = 64 << 10;
pub(crate) const MAX_SLOT: usize = 8 << 20;
/// Free slots kept resident per pool; a slot given back beyond these is given back to the
/// kernel too (`MADV_DONTNEED`), so a passing peak of chunks in flight does not stay resident.
const KEEP_FREE_BYTES: usize = 64 << 20;

/// The pools by slot size (a media agent has one: its repository's chunk size).
static POOLS: Mutex<Vec<&'static Pool>> = Mutex::new(Vec::new());

struct Pool {
    slot: usize,
    free: Mutex<Free>,
}

/// Free slots, as raw addresses: every one points into a region of this pool.
#[derive(Default)]
struct Free {
    /// Slots whose memory is still resident (up to [`KEEP_FREE_BYTES`]): handed out first, as
    /// they cost no page fault.
    resident: Vec<usize>,
    /// Slots given back to the kernel, or never touched: their first write faults memory in.
    released: Vec<usize>,
}

impl Free {
    fn pop(&mut self) -> Option<usize> {
        self.resident.pop().or_else(|| self.released.pop())
    }
}

/// A slot being written, then owned by a chunk's `Bytes`.
pub(crate) struct Slot {
    ptr: NonNull<u8>,
    /// Bytes of the chunk (set by [`Slot::freeze`]).
    len: usize,
    pool: &'static Pool,
}

// SAFETY: a Slot owns its memory exclusively (like a Box<[u8]>) until it is dropped; the pool
// is a 'static with its own lock.
unsafe impl Send for Slot {}

impl Slot {
    /// A slot of at least `size` bytes, or None for a size outside [`MIN_SLOT`] ..=
    /// [`MAX_SLOT`] or when no memory could be mapped (the caller uses the allocator).
    pub(crate) fn get(size: usize) -> Option<Slot> {
        if !(MIN_SLOT..=MAX_SLOT).contains(&size) {
            return None;
        }
        let slot = size.div_ceil(4096) * 4096;
        let pool = pool_for(slot);
        // A resident slot first: with a busy cache evicting in bursts, more than the resident
        // allowance comes back at once, and a released slot handed out while a resident one
        // waits would cost a fault per 4 KiB page for nothing (decision 0021).
        let popped = pool.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let addr = match popped {
            Some(addr) => addr,
            None => {
                // Mapped without the lock: slots given back meanwhile are not held up.
                let base = map_region(slot)?;
                let count = region_size(slot) / slot;
                let mut free = pool.free.lock().unwrap_or_else(|p| p.into_inner());
                free.released.extend((1..count).map(|i| base + i * slot));
                base
            }
        };
        Some(Slot {
            ptr: NonNull::new(addr as *mut u8)?,
            len: 0,
            pool,
        })
    }

    /// The whole slot, to decode into.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr starts a slot of pool.slot bytes inside a live mapping, owned by this Slot
        // alone; every byte is initialised (zeroed by the kernel or written before).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.pool.slot) }
    }

    /// The chunk: the first `len` bytes of the slot (`len` at most the slot's size: what a
    /// decoder wrote into [`Slot::as_mut_slice`]).
    pub(crate) fn freeze(mut self, len: usize) -> Bytes {
        assert!(
            len <= self.pool.slot,
            "a slot holds {} bytes",
            self.pool.slot
        );
        self.len = len;
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as in as_mut_slice; len <= pool.slot.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let addr = self.ptr.as_ptr() as usize;
        let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.resident.len() * self.pool.slot < KEEP_FREE_BYTES {
            free.resident.push(addr);
            return;
        }
        // SAFETY: the slot lies in a live mapping and is owned by this Slot alone; its pages
        // read as zeros afterwards, which is still initialised memory.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast(),
                self.pool.slot,
                libc::MADV_DONTNEED,
            );
        }
        free.released.push(addr);
    }
}

fn region_size(slot: usize) -> usize {
    (slot * MIN_SLOTS).max(REGION).div_ceil(HUGE) * HUGE
}

fn pool_for(slot: usize) -> &'static Pool {
    let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pool) = pools.iter().find(|p| p.slot == slot) {
        return pool;
    }
    let pool: &'static Pool = Box::leak(Box::new(Pool {
        slot,
        free: Mutex::new(Free::default()),
    }));
    pools.push(pool);
    pool
}

/// Maps a region for slots of `slot` bytes, aligned to a huge page and advised to use them;
/// its address, or None if the kernel refused the mapping.
fn map_region(slot: usize) -> Option<usize> {
    let size = region_size(slot);
    // One huge page more, to align the start.
    let len = size + HUGE;
    // SAFETY: an anonymous private mapping at an address the kernel picks; no file, no
    // existing memory involved.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return None;
    }
    let start = raw as usize;
    let aligned = start.div_ceil(HUGE) * HUGE;
    // SAFETY: both ranges lie inside the mapping just made and are not used by anything: the
    // head before the aligned start and the tail after the region are given back.
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let tail = aligned + size;
        if start + len > tail {
            libc::munmap(tail as *mut libc::c_void, start + len - tail);
        }
        // Advice only: without huge pages the region works with small ones.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    Some(aligned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_reused_and_hold_what_was_written() {
        let size = 96 << 10;
        let mut held = Vec::new();
        for i in 0..(region_size(4096 * 24) / (96 << 10) + 5) {
            let mut s = Slot::get(size).unwrap();
            let buf = s.as_mut_slice();
            assert!(buf.len() >= size);
            buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
            held.push(s.freeze(8));
        }
        // Every chunk kept its own bytes: no slot was handed out twice.
        for (i, b) in held.iter().enumerate() {
            assert_eq!(b.as_ref(), (i as u64).to_le_bytes());
        }
        let given_back: std::collections::HashSet<usize> =
            held.iter().map(|b| b.as_ptr() as usize).collect();
        assert_eq!(given_back.len(), held.len());
        drop(held);
        // A slot given back is handed out again.
        let again = Slot::get(size).unwrap().freeze(0);
        assert!(given_back.contains(&(again.as_ptr() as usize)));
        let a = Slot::get(size).unwrap().freeze(4);
        let b = a.clone();
        drop(a);
        assert_eq!(b.len(), 4, "a clone keeps the slot");
    }

    #[test]
    fn resident_slots_are_handed_out_before_released_ones() {
        // A slot size of its own: pools are shared by every test of this process.
        let size = 200 << 10;
        let count = KEEP_FREE_BYTES / (200 << 10) + 40;
        let held: Vec<Bytes> = (0..count)
            .map(|_| {
                let mut s = Slot::get(size).unwrap();
                s.as_mut_slice().fill(0xab);
                s.freeze(size)
            })
            .collect();
        // Given back all at once, as a cache evicts in a burst: the last 40 go past the
        // resident allowance and are released (their memory reads as zeros again).
        drop(held);
        // Every resident one comes back before any released one.
        let resident = KEEP_FREE_BYTES.div_ceil(200 << 10);
        let again: Vec<Slot> = (0..resident).map(|_| Slot::get(size).unwrap()).collect();
        for mut s in again {
            assert!(
                s.as_mut_slice()[..size].iter().all(|&b| b == 0xab),
                "a released slot was handed out while a resident one waited"
            );
        }
    }
}
