//! Synchronous readers for the file system crates: a snapshot's disk through the repository's
//! read path (with a small cache of whole chunks), a disk in memory, and a window of either
//! (one volume) that the crates read as `Ext4Read` or `Read + Seek`.
//!
//! Must not: run on a runtime thread (`DiskReader` blocks on the async read); write (the
//! `Write` side every FAT reader needs is an error).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom, Write};
use std::rc::Rc;

use bytes::Bytes;

use super::{Extent, GuestFsError, ReadAt};
use crate::repo::DiskImage;

/// Chunks a [`DiskReader`] keeps, in bytes (at least two chunks), reading the repository
/// itself (the CLI). A file system's metadata and its files' data lie far apart: NTFS filled
/// by ntfs-3g put a 1 GiB tree's file records, folder indexes and data so that a 16 MiB
/// window fetched and checked chunks again and again (`scripts/bench-files`: 19.7 s and
/// 11.2 CPU-s for the tree, about 15 times the CPU of one checked read of its chunks;
/// 4.75 s and 2.3 CPU-s with 128 MiB).
pub const CACHE_BYTES: u64 = 128 << 20;

/// The same, reading through the media agent's cache (whose hits cost a lookup, not a fetch):
/// a window for the small reads within one chunk, kept small as several downloads may run.
pub const AGENT_CACHE_BYTES: u64 = 16 << 20;

/// A snapshot's disk read through the repository (chunks checked on every fetch), keeping the
/// last chunks it read so that small reads of one chunk fetch it once.
pub struct DiskReader {
    disk: DiskImage,
    handle: tokio::runtime::Handle,
    chunk: u64,
    keep: usize,
    cache: VecDeque<(u64, Bytes)>,
    /// Chunks fetched (cache misses), for tests and figures.
    pub fetches: u64,
}

impl DiskReader {
    /// A reader keeping up to `keep_bytes` of chunks ([`CACHE_BYTES`], [`AGENT_CACHE_BYTES`]).
    pub fn new(disk: DiskImage, handle: tokio::runtime::Handle, keep_bytes: u64) -> DiskReader {
        let chunk = disk.chunk_size().as_u64();
        DiskReader {
            keep: (keep_bytes / chunk).max(2) as usize,
            disk,
            handle,
            chunk,
            cache: VecDeque::new(),
            fetches: 0,
        }
    }

    fn chunk_bytes(&mut self, idx: u64) -> Result<Bytes, GuestFsError> {
        if let Some(pos) = self.cache.iter().position(|(i, _)| *i == idx) {
            let hit = self.cache.remove(pos).map(|(_, b)| b).unwrap_or_default();
            self.cache.push_front((idx, hit.clone()));
            return Ok(hit);
        }
        let offset = idx * self.chunk;
        let len = (self.disk.size() - offset).min(self.chunk) as usize;
        let disk = self.disk.clone();
        let bytes = self
            .handle
            .block_on(async move { disk.read_at(offset, len).await })?;
        self.fetches += 1;
        if bytes.len() != len {
            return Err(GuestFsError::Read {
                disk: self.disk.name().into(),
                offset,
                len,
                what: format!("{} bytes came back", bytes.len()),
            });
        }
        self.cache.push_front((idx, bytes.clone()));
        self.cache.truncate(self.keep);
        Ok(bytes)
    }
}

impl ReadAt for DiskReader {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), GuestFsError> {
        check_range(self.disk.name(), self.disk.size(), offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let idx = pos / self.chunk;
            let within = (pos % self.chunk) as usize;
            let bytes = self.chunk_bytes(idx)?;
            let n = (bytes.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&bytes[within..within + n]);
            done += n;
        }
        Ok(())
    }
}

fn check_range(disk: &str, size: u64, offset: u64, len: usize) -> Result<(), GuestFsError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(GuestFsError::Read {
            disk: disk.into(),
            offset,
            len,
            what: format!("past the end of the disk ({size} bytes)"),
        }),
    }
}

/// A disk in memory (tests, fuzzing).
pub struct MemDisk(pub Vec<u8>);

impl ReadAt for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), GuestFsError> {
        check_range("in memory", self.size(), offset, buf.len())?;
        let at = offset as usize;
        buf.copy_from_slice(&self.0[at..at + buf.len()]);
        Ok(())
    }
}

/// A disk shared by the volumes opened on it (one thread).
pub type Shared = Rc<RefCell<dyn ReadAt>>;

pub fn shared<R: ReadAt + 'static>(r: R) -> Shared {
    Rc::new(RefCell::new(r))
}

/// One volume read as a file of its own: its extents (pieces of the snapshot's disks, in
/// volume order, with no gap) mapped onto `disks` (indexed by [`Extent::disk`]).
pub struct Window {
    disks: Vec<Shared>,
    extents: Vec<Extent>,
    len: u64,
    pos: u64,
}

impl Window {
    /// A window of `len` bytes over `extents`; the extents must cover `0..len` in order and
    /// name disks of `disks` (volumes are built so; anything else is an error on every read).
    pub fn new(disks: Vec<Shared>, extents: Vec<Extent>, len: u64) -> Window {
        Window {
            disks,
            extents,
            len,
            pos: 0,
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), GuestFsError> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => {}
            _ => {
                return Err(GuestFsError::Invalid(format!(
                    "a read of {} bytes at byte {offset} of a volume of {} bytes: past its end",
                    buf.len(),
                    self.len
                )))
            }
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            // The extent holding `pos`: the last that starts at or before it.
            let i = self.extents.partition_point(|e| e.at <= pos);
            let e = i
                .checked_sub(1)
                .map(|i| &self.extents[i])
                .filter(|e| pos - e.at < e.len)
                .ok_or_else(|| {
                    GuestFsError::Invalid(format!("byte {pos} of the volume is in no extent"))
                })?;
            let within = pos - e.at;
            let n = ((e.len - within).min((buf.len() - done) as u64)) as usize;
            let disk = self.disks.get(e.disk).ok_or_else(|| {
                GuestFsError::Invalid(format!("an extent names disk {}, not read", e.disk))
            })?;
            disk.try_borrow_mut()
                .map_err(|_| GuestFsError::Invalid("disk reader re-entered".into()))?
                .read_exact_at(e.offset + within, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }
}

impl ext4_view::Ext4Read for Window {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.read_at(start_byte, dst)
            .map_err(|e| Box::new(std::io::Error::other(e.to_string())) as _)
    }
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_at(self.pos, &mut buf[..n])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Window {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let new = new.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range")
        })?;
        self.pos = new;
        Ok(new)
    }
}

/// The FAT reader wants a writable disk; nothing is ever written.
impl Write for Window {
    fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "guest volumes are read-only",
        ))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_reads_inside_its_volume_only() {
        let disk = shared(MemDisk((0..=255u8).collect()));
        let one = Extent {
            at: 0,
            disk: 0,
            offset: 16,
            len: 32,
        };
        let mut w = Window::new(vec![disk], vec![one], 32);
        let mut b = [0u8; 4];
        w.read_exact(&mut b).unwrap();
        assert_eq!(b, [16, 17, 18, 19]);
        w.seek(SeekFrom::Start(30)).unwrap();
        let mut rest = Vec::new();
        w.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, vec![46, 47]);
        assert!(w.read_at(30, &mut [0u8; 4]).is_err());
        assert!(w.read_at(u64::MAX, &mut [0u8; 4]).is_err());
        assert!(w.write(&[1]).is_err());
        assert!(w.seek(SeekFrom::Current(-100)).is_err());
    }

    #[test]
    fn window_maps_reads_through_its_extents_across_disks() {
        let a = shared(MemDisk((0..=99u8).collect()));
        let b = shared(MemDisk((100..=199u8).collect()));
        let ext = |at, disk, offset, len| Extent {
            at,
            disk,
            offset,
            len,
        };
        // 0..4 from a[10..14], 4..10 from b[50..56], 10..12 from a[0..2].
        let w = Window::new(
            vec![a, b],
            vec![ext(0, 0, 10, 4), ext(4, 1, 50, 6), ext(10, 0, 0, 2)],
            12,
        );
        let mut all = [0u8; 12];
        w.read_at(0, &mut all).unwrap();
        assert_eq!(all, [10, 11, 12, 13, 150, 151, 152, 153, 154, 155, 0, 1]);
        let mut mid = [0u8; 3];
        w.read_at(3, &mut mid).unwrap();
        assert_eq!(mid, [13, 150, 151]);
        assert!(w.read_at(11, &mut [0u8; 2]).is_err());
        // A gap or a disk that is not there is an error, not zeros.
        let gap = Window::new(
            vec![shared(MemDisk(vec![1; 10]))],
            vec![ext(0, 0, 0, 2), ext(4, 0, 0, 2)],
            6,
        );
        assert!(gap.read_at(1, &mut [0u8; 2]).is_err());
        assert!(gap.read_at(4, &mut [0u8; 2]).is_ok());
        let nodisk = Window::new(vec![], vec![ext(0, 3, 0, 2)], 2);
        assert!(nodisk.read_at(0, &mut [0u8; 1]).is_err());
    }

    #[test]
    fn mem_disk_refuses_reads_past_its_end() {
        let mut d = MemDisk(vec![0u8; 10]);
        assert!(d.read_exact_at(8, &mut [0u8; 4]).is_err());
        assert!(d.read_exact_at(u64::MAX - 1, &mut [0u8; 4]).is_err());
        assert!(d.read_exact_at(6, &mut [0u8; 4]).is_ok());
    }
}
