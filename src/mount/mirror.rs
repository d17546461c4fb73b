//! A disk's mirror: the copy of a live-mounted disk that a relocation builds on primary storage.
//!
//! Owns: the destination file, the copy's frontier (every byte below it is in the destination as
//! the VM sees it), the writes made to it, and the fence that stops the VM's writes at handover.
//! Must not: decide what to copy or when (the relocation coordinator does), or fail a VM's
//! write: a mirror that cannot be written records why and stops taking writes; the
//! relocation then fails and the VM runs on from its overlay as before.
//!
//! Ordering (the reason this lives beside the overlay): the overlay calls [`Mirror::on_write`]
//! under its per-disk write lock, after the write is in the overlay, and the coordinator copies
//! an extent through [`super::overlay::Overlay::copy_to_mirror`] under the same lock. So a
//! block is either below the frontier when a write reaches it (the write goes to the
//! destination too), or it is copied later from the overlay, with the write in it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The copy of one disk.
#[derive(Debug)]
pub struct Mirror {
    path: PathBuf,
    file: File,
    size: u64,
    /// Bytes from the start of the disk that the destination holds as the VM sees them.
    frontier: AtomicU64,
    /// Set at handover: the VM's writes are refused from now on.
    fenced: AtomicBool,
    /// Why the destination could not be written; the mirror takes no more writes.
    failed: Mutex<Option<String>>,
    /// When the VM last wrote to the disk (ms after `epoch`, 0: not since the mirror was made).
    last_write: AtomicU64,
    epoch: Instant,
}

impl Mirror {
    /// A mirror writing into `file` (opened read-write, already `size` bytes long), whose first
    /// `frontier` bytes are copied already.
    pub fn new(path: &Path, file: File, size: u64, frontier: u64) -> Mirror {
        Mirror {
            path: path.to_path_buf(),
            file,
            size,
            frontier: AtomicU64::new(frontier.min(size)),
            fenced: AtomicBool::new(false),
            failed: Mutex::new(None),
            last_write: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Starts the mirror afresh from `frontier` (a relocation resumed or retried).
    pub fn reset(&self, frontier: u64) {
        self.frontier
            .store(frontier.min(self.size), Ordering::SeqCst);
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.fenced.store(false, Ordering::SeqCst);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn frontier(&self) -> u64 {
        self.frontier.load(Ordering::SeqCst)
    }

    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    pub fn unfence(&self) {
        self.fenced.store(false, Ordering::SeqCst);
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Why the mirror stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn fail(&self, why: String) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::warn!(file = %self.path.display(), error = %why, "relocation copy failed");
            *f = Some(why);
        }
    }

    /// How long ago the VM last wrote to the disk, if it did since the mirror was made.
    pub fn since_last_write(&self) -> Option<std::time::Duration> {
        match self.last_write.load(Ordering::SeqCst) {
            0 => None,
            ms => {
                let at = self.epoch + std::time::Duration::from_millis(ms);
                Some(at.elapsed())
            }
        }
    }

    /// A VM write of `data` at `offset` (whole overlay blocks), made while the overlay's write
    /// lock is held: written through to the destination if it is below the frontier. Never
    /// fails the VM's write.
    pub(crate) fn on_write(&self, offset: u64, data: &[u8]) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.last_write.store(ms, Ordering::SeqCst);
        if offset >= self.frontier() || self.failure().is_some() {
            return;
        }
        if let Err(e) = self.file.write_all_at(data, offset) {
            self.fail(format!("writing {}: {e}", self.path.display()));
        }
    }

    /// Puts the view of `[offset, offset + data.len())` into the destination and moves the
    /// frontier to its end. Called in disk order, under the overlay's write lock when there is
    /// an overlay. All-zero data becomes a hole.
    pub(crate) fn put(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if data.iter().all(|b| *b == 0) {
            punch_hole(&self.file, offset, data.len() as u64)?;
        } else {
            self.file.write_all_at(data, offset)?;
            start_writeback(&self.file, offset, data.len() as u64);
        }
        self.frontier
            .fetch_max(offset + data.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    /// Makes `[offset, offset + len)` of the destination zeros (a hole) and moves the frontier
    /// to its end, as [`Mirror::put`] does for all-zero data.
    pub(crate) fn put_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        punch_hole(&self.file, offset, len)?;
        self.frontier.fetch_max(offset + len, Ordering::SeqCst);
        Ok(())
    }

    /// Makes what the destination holds durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Reads `buf.len()` bytes of the destination at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
}

/// Starts writing a range of the file back to its disk without waiting, so that the next
/// checkpoint's fdatasync finds little left to write (a copy of hundreds of MB per checkpoint
/// otherwise stalls on it). Advisory: an error here is seen by that fdatasync.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain syscall on an open descriptor we own; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Deallocates a range of a file, keeping its size; it then reads as zeros.
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    if len == 0 {
        return Ok(());
    }
    match fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        // A file system without holes: write the zeros.
        Err(rustix::io::Errno::OPNOTSUPP) => file.write_all_at(&vec![0u8; len as usize], offset),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(dir: &Path, size: u64) -> Mirror {
        let path = dir.join("d.img");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(size).unwrap();
        Mirror::new(&path, f, size, 0)
    }

    #[test]
    fn writes_reach_the_destination_only_below_the_frontier() {
        let t = tempfile::tempdir().unwrap();
        let m = mirror(t.path(), 1 << 20);
        m.on_write(0, &[1u8; 4096]);
        let mut buf = [9u8; 4096];
        m.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0u8; 4096], "above the frontier: left for the copy");
        m.put(0, &[2u8; 8192]).unwrap();
        assert_eq!(m.frontier(), 8192);
        m.on_write(4096, &[3u8; 4096]);
        m.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, [3u8; 4096]);
        assert!(m.since_last_write().is_some());
    }

    #[test]
    fn zero_extents_become_holes_and_read_as_zeros() {
        let t = tempfile::tempdir().unwrap();
        let m = mirror(t.path(), 1 << 20);
        m.put(0, &[7u8; 65536]).unwrap();
        m.put(0, &[0u8; 65536]).unwrap();
        let mut buf = vec![1u8; 65536];
        m.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
    }

    #[test]
    fn a_failed_mirror_keeps_its_first_reason() {
        let t = tempfile::tempdir().unwrap();
        let m = mirror(t.path(), 1 << 20);
        m.fail("first".into());
        m.fail("second".into());
        assert_eq!(m.failure().as_deref(), Some("first"));
    }
}
