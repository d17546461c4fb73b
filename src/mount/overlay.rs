//! A disk's overlay: the blocks a VM wrote, kept apart from the backup.
//!
//! Owns: three files per disk in the mount's overlay folder, `N.data` (sparse, the disk's size;
//! written blocks at their own offsets), `N.bitmap` (one bit per 4 KiB block, set once the
//! block's data is durable) and `N.live` (the kernel's boot id, then the bitmap as the writes
//! left it, durable or not), and the read and write paths over them.
//! Must not: touch the backup: reads fall through to the [`DiskImage`] for blocks not written.
//!
//! Ordering rules:
//! - A write covering part of a block first fills the rest of that block from the backup, so a
//!   set bit always means "the whole block is in `N.data`".
//! - Writes to one disk are serialised (an async mutex), which keeps read-modify-write of
//!   partial blocks atomic; reads never wait for it.
//! - Durability: data is fdatasynced before the bitmap pages naming it are written and synced.
//!   Concurrent commits share one sync: a commit that finds its writes already synced returns
//!   at once. The first commit after opening always syncs (writes of an earlier process may
//!   still be only in the page cache).
//! - A killed process loses no acknowledged write: each write also writes the bitmap words it
//!   touched to `N.live` (page cache, no fsync) before it is acknowledged. At open, `N.live` is
//!   merged into the bitmap only if it was written on the same boot of the machine (then the
//!   page cache holds its data too); after a reboot it is discarded, the durable bitmap is
//!   what counts, and the NFS write verifier changes so that clients resend what they had not
//!   seen committed. A bit in `N.bitmap` therefore never reaches the disk before its data.
//! - Bitmap bits are only ever set, never cleared (the disk's size is fixed).
//! - The files' names are durable from their creation (the folder is fsynced when one is
//!   made), so a COMMIT, which syncs only their contents, never syncs a file that a power cut
//!   could unlink.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use super::mirror::Mirror;
use crate::durable;
use crate::repo::{DiskImage, Extent, Pieces, RepoError};

/// Overlay block size: what a bit of the bitmap covers.
pub const BLOCK: u64 = 4096;
/// Bitmap bytes written per dirty page at commit.
const PAGE: u64 = 4096;
/// `N.live` starts with the boot id it was written on, in this many bytes.
const LIVE_HEADER: u64 = 64;
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// The kernel's boot id (empty if unknown: then no boot is "the same").
pub fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// An overlay error: the backup could not be read, or the overlay's files failed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("overlay {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{file} is not writable (only disks of a read-write mount take writes)")]
    NotWritable { file: String },
    #[error(
        "write at {offset} + {len} passes the end of the disk ({size} bytes); disks cannot grow"
    )]
    PastEnd { offset: u64, len: u64, size: u64 },
    #[error("{file} is being handed over to its relocated copy and takes no more writes")]
    Fenced { file: String },
    #[error("relocation copy {path}: {source}")]
    Mirror {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The set bits among `first..end` of a bitmap of `words`, in order, at most `limit` of them.
/// A word with no bit set is skipped whole: a read of 1 MiB asks about 256 blocks, and an
/// overlay is mostly empty.
fn set_bits(words: &[u64], first: u64, end: u64, limit: usize) -> Vec<u64> {
    let mut out = Vec::new();
    let mut b = first;
    while b < end && out.len() < limit {
        let word = words.get((b / 64) as usize).copied().unwrap_or(0);
        let rest = word >> (b % 64);
        if rest == 0 {
            b = (b / 64 + 1) * 64;
            continue;
        }
        b += u64::from(rest.trailing_zeros());
        if b < end {
            out.push(b);
        }
        b += 1;
    }
    out
}

struct Bits {
    words: Vec<u64>,
    /// Bitmap pages (by index) changed since the last commit.
    dirty: BTreeSet<u64>,
}

/// The overlay of one disk.
pub struct Overlay {
    name: String,
    size: u64,
    data: Arc<File>,
    bitmap: Arc<File>,
    live: Arc<File>,
    bits: Mutex<Bits>,
    writes: tokio::sync::Mutex<()>,
    /// Incremented by every write; `synced` is the highest value made durable.
    written: AtomicU64,
    synced: tokio::sync::Mutex<u64>,
    /// The relocation copy that the VM's writes also go to, while a relocation runs.
    mirror: Mutex<Option<Arc<Mirror>>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> OverlayError + '_ {
    move |source| OverlayError::Io {
        path: path.display().to_string(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OverlayError> + Send + 'static,
) -> Result<T, OverlayError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OverlayError::Io {
            path: "overlay task".into(),
            source: io::Error::other(e.to_string()),
        })?
}

impl Overlay {
    /// Opens (or creates) the overlay `stem` in `dir` for a disk of `size` bytes. Blocks (file
    /// I/O and fsyncs).
    pub fn open(dir: &Path, stem: &str, size: u64) -> Result<Overlay, OverlayError> {
        durable::create_dir_all(dir).map_err(io_err(dir))?;
        let data_path = dir.join(format!("{stem}.data"));
        let bitmap_path = dir.join(format!("{stem}.bitmap"));
        let made = std::cell::Cell::new(false);
        let open = |p: &Path| {
            let (f, new) = durable::open_or_create(p).map_err(io_err(p))?;
            made.set(made.get() | new);
            Ok::<File, OverlayError>(f)
        };
        let data = open(&data_path)?;
        data.set_len(size).map_err(io_err(&data_path))?;
        let bitmap = open(&bitmap_path)?;
        let blocks = size.div_ceil(BLOCK);
        let nwords = blocks.div_ceil(64) as usize;
        let mut raw = vec![0u8; nwords * 8];
        let have = bitmap.metadata().map_err(io_err(&bitmap_path))?.len() as usize;
        let n = have.min(raw.len());
        bitmap
            .read_exact_at(&mut raw[..n], 0)
            .map_err(io_err(&bitmap_path))?;
        let mut words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        // The live bitmap: merged if written on this boot, else started afresh.
        let live_path = dir.join(format!("{stem}.live"));
        let live = open(&live_path)?;
        let boot = boot_id();
        let mut header = [0u8; LIVE_HEADER as usize];
        let have = live.metadata().map_err(io_err(&live_path))?.len();
        let same_boot = !boot.is_empty()
            && boot.len() <= LIVE_HEADER as usize
            && have >= LIVE_HEADER
            && live.read_exact_at(&mut header, 0).is_ok()
            && header.starts_with(boot.as_bytes())
            && header[boot.len()..].iter().all(|b| *b == 0);
        let mut dirty = BTreeSet::new();
        if same_boot {
            let n = ((have - LIVE_HEADER) as usize).min(raw.len());
            raw.fill(0);
            live.read_exact_at(&mut raw[..n], LIVE_HEADER)
                .map_err(io_err(&live_path))?;
            for (i, c) in raw.chunks_exact(8).enumerate() {
                let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                if w & !words[i] != 0 {
                    words[i] |= w;
                    dirty.insert(i as u64 * 8 / PAGE);
                }
            }
        } else {
            let mut h = [0u8; LIVE_HEADER as usize];
            let b = boot.as_bytes();
            let n = b.len().min(LIVE_HEADER as usize);
            h[..n].copy_from_slice(&b[..n]);
            live.set_len(0).map_err(io_err(&live_path))?;
            live.write_all_at(&h, 0).map_err(io_err(&live_path))?;
        }
        if made.get() {
            durable::fsync_dir(dir).map_err(io_err(dir))?;
        }
        Ok(Overlay {
            name: data_path.display().to_string(),
            size,
            data: Arc::new(data),
            bitmap: Arc::new(bitmap),
            live: Arc::new(live),
            bits: Mutex::new(Bits { words, dirty }),
            writes: tokio::sync::Mutex::new(()),
            // One more than `synced`: the first commit always syncs.
            written: AtomicU64::new(1),
            synced: tokio::sync::Mutex::new(0),
            mirror: Mutex::new(None),
        })
    }

    /// The written blocks among `first..end`, in order, at most `limit` of them, under one
    /// lock for the range.
    fn written(&self, first: u64, end: u64, limit: usize) -> Vec<u64> {
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        set_bits(&bits.words, first, end, limit)
    }

    /// Sends the VM's writes to `mirror` as well (see [`Mirror`]), from the next write on.
    pub fn attach_mirror(&self, mirror: Arc<Mirror>) {
        *self.mirror.lock().unwrap_or_else(|p| p.into_inner()) = Some(mirror);
    }

    /// Stops sending writes to the mirror. Waits for a write in progress, so none reaches the
    /// mirror after this returns.
    pub async fn detach_mirror(&self) {
        let _serial = self.writes.lock().await;
        *self.mirror.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Waits until no write is in progress (after a mirror was fenced: none will start).
    pub async fn quiesce(&self) {
        drop(self.writes.lock().await);
    }

    fn mirror(&self) -> Option<Arc<Mirror>> {
        self.mirror
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the VM wrote any block of `[offset, offset + len)`.
    pub fn written_in(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.size);
        end > offset
            && !self
                .written(offset / BLOCK, end.div_ceil(BLOCK), 1)
                .is_empty()
    }

    /// `base` (the backup's bytes of `[offset, offset + base.len())`) with the VM's written
    /// blocks laid over it: the range as the VM sees it.
    pub async fn compose(&self, offset: u64, base: Bytes) -> Result<Bytes, OverlayError> {
        let end = offset + base.len() as u64;
        let written = self.written(offset / BLOCK, end.div_ceil(BLOCK), usize::MAX);
        if written.is_empty() {
            return Ok(base);
        }
        self.lay_over(offset, BytesMut::from(&base[..]), written)
            .await
    }

    /// Copies `[offset, offset + len)` as the VM sees it into `mirror` and moves its frontier
    /// past it, with no write of the VM in between (the write lock is held). `base` is the
    /// backup's bytes of the range (`len` of them), or `None` for a zero block.
    pub async fn copy_to_mirror(
        &self,
        mirror: &Arc<Mirror>,
        offset: u64,
        len: u64,
        base: Option<Bytes>,
    ) -> Result<(), OverlayError> {
        let _serial = self.writes.lock().await;
        let view = match base {
            None if !self.written_in(offset, len) => None,
            None => Some(
                self.compose(offset, Bytes::from(vec![0u8; len as usize]))
                    .await?,
            ),
            Some(b) => Some(self.compose(offset, b).await?),
        };
        let m = mirror.clone();
        blocking(move || {
            match view {
                Some(v) => m.put(offset, &v),
                None => m.put_hole(offset, len),
            }
            .map_err(|source| OverlayError::Mirror {
                path: m.path().display().to_string(),
                source,
            })
        })
        .await
    }

    /// How many blocks the VM has written.
    pub fn written_blocks(&self) -> u64 {
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        bits.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// What `[offset, offset + len)` (clipped to the disk) holds, as runs: the backup's zero
    /// runs stay zero except where the VM wrote (written blocks are data, whatever was
    /// written).
    pub fn extents(&self, image: &DiskImage, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Vec::new();
        }
        let base = image.extents(offset, end - offset);
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        let written = |b: u64| {
            bits.words
                .get((b / 64) as usize)
                .is_some_and(|w| w & (1 << (b % 64)) != 0)
        };
        let mut out = Vec::with_capacity(base.len());
        let mut at = offset;
        for e in base {
            let e_end = at + e.len;
            if !e.zero {
                Extent::push(&mut out, e);
                at = e_end;
                continue;
            }
            while at < e_end {
                let b = at / BLOCK;
                // A word with no written block skips its 64 blocks at once.
                let step = if bits.words.get((b / 64) as usize) == Some(&0) {
                    (b / 64 + 1) * 64 * BLOCK
                } else {
                    (b + 1) * BLOCK
                };
                let hi = step.min(e_end);
                Extent::push(
                    &mut out,
                    Extent {
                        len: hi - at,
                        zero: !written(b),
                    },
                );
                at = hi;
            }
        }
        out
    }

    /// Reads `len` bytes at `offset`: written blocks from the overlay, the rest from the backup.
    pub async fn read(
        &self,
        image: &DiskImage,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, OverlayError> {
        Ok(self.read_pieces(image, offset, len).await?.into_bytes())
    }

    /// [`Overlay::read`] as pieces: the backup's own when the VM wrote nothing in the range.
    pub async fn read_pieces(
        &self,
        image: &DiskImage,
        offset: u64,
        len: usize,
    ) -> Result<Pieces, OverlayError> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return Ok(Pieces::default());
        }
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let written = self.written(first, last + 1, usize::MAX);
        if written.is_empty() {
            return Ok(image.read_pieces(offset, len).await?);
        }
        let out = if written.len() as u64 == last - first + 1 {
            BytesMut::zeroed((end - offset) as usize)
        } else {
            BytesMut::from(&image.read_at(offset, len).await?[..])
        };
        Ok(self.lay_over(offset, out, written).await?.into())
    }

    /// `out` (the range starting at `offset`) with the VM's `written` blocks read into it
    /// from `N.data`.
    async fn lay_over(
        &self,
        offset: u64,
        mut out: BytesMut,
        written: Vec<u64>,
    ) -> Result<Bytes, OverlayError> {
        let end = offset + out.len() as u64;
        let (data, name) = (self.data.clone(), self.name.clone());
        let out = blocking(move || {
            for b in written {
                let lo = (b * BLOCK).max(offset);
                let hi = ((b + 1) * BLOCK).min(end);
                data.read_exact_at(&mut out[(lo - offset) as usize..(hi - offset) as usize], lo)
                    .map_err(|source| OverlayError::Io {
                        path: name.clone(),
                        source,
                    })?;
            }
            Ok(out)
        })
        .await?;
        Ok(out.freeze())
    }

    /// Writes `data` at `offset`. With `sync`, the write is durable when this returns.
    pub async fn write(
        &self,
        image: &DiskImage,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<(), OverlayError> {
        let len = data.len() as u64;
        let end =
            offset
                .checked_add(len)
                .filter(|e| *e <= self.size)
                .ok_or(OverlayError::PastEnd {
                    offset,
                    len,
                    size: self.size,
                })?;
        if len == 0 {
            return Ok(());
        }
        let _serial = self.writes.lock().await;
        let mirror = self.mirror();
        if mirror.as_ref().is_some_and(|m| m.is_fenced()) {
            return Err(OverlayError::Fenced {
                file: self.name.clone(),
            });
        }
        // Widen to whole blocks, filling the edges that the write does not cover.
        let start_b = offset / BLOCK;
        let end_b = end.div_ceil(BLOCK);
        let lo = start_b * BLOCK;
        let hi = (end_b * BLOCK).min(self.size);
        let mut buf = BytesMut::zeroed((hi - lo) as usize);
        let edges: BTreeSet<u64> = [start_b, end_b - 1].into_iter().collect();
        for edge in edges {
            let (b_lo, b_hi) = (edge * BLOCK, ((edge + 1) * BLOCK).min(self.size));
            let covered = offset <= b_lo && end >= b_hi;
            if !covered {
                let old = self.read(image, b_lo, (b_hi - b_lo) as usize).await?;
                buf[(b_lo - lo) as usize..(b_hi - lo) as usize].copy_from_slice(&old);
            }
        }
        buf[(offset - lo) as usize..(end - lo) as usize].copy_from_slice(data);
        let file = self.data.clone();
        let name = self.name.clone();
        let buf = blocking(move || {
            file.write_all_at(&buf, lo)
                .map_err(|source| OverlayError::Io { path: name, source })?;
            Ok(buf)
        })
        .await?;
        if let Some(m) = mirror {
            blocking(move || {
                m.on_write(lo, &buf);
                Ok(())
            })
            .await?;
        }
        // The bits are set only now that the data is in the file (a read that sees a bit reads
        // the data). The words go to `N.live` before the write is acknowledged, every time
        // (also when no bit changed: an earlier write of them may have failed).
        let (at, bytes) = {
            let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
            for b in start_b..end_b {
                if let Some(w) = bits.words.get_mut((b / 64) as usize) {
                    *w |= 1 << (b % 64);
                }
                let page = (b / 64) * 8 / PAGE;
                bits.dirty.insert(page);
            }
            let (w0, w1) = ((start_b / 64) as usize, ((end_b - 1) / 64) as usize);
            let bytes: Vec<u8> = bits.words[w0..=w1.min(bits.words.len() - 1)]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect();
            (LIVE_HEADER + w0 as u64 * 8, bytes)
        };
        let (live, name) = (self.live.clone(), self.name.clone());
        blocking(move || {
            live.write_all_at(&bytes, at)
                .map_err(|source| OverlayError::Io { path: name, source })
        })
        .await?;
        self.written.fetch_add(1, Ordering::SeqCst);
        drop(_serial);
        if sync {
            self.commit().await?;
        }
        Ok(())
    }

    /// Makes every write so far durable: data first, then the bitmap pages that name it.
    pub async fn commit(&self) -> Result<(), OverlayError> {
        let target = self.written.load(Ordering::SeqCst);
        let mut synced = self.synced.lock().await;
        if *synced >= target {
            return Ok(()); // a commit that ran while we waited covered our writes
        }
        let now = self.written.load(Ordering::SeqCst);
        // The pages as they are before the data sync: every bit in them names data that the
        // sync makes durable.
        let (pages, words) = {
            let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
            let pages: Vec<u64> = std::mem::take(&mut bits.dirty).into_iter().collect();
            let words = page_bytes(&bits.words, &pages);
            (pages, words)
        };
        let (data, bitmap, name) = (self.data.clone(), self.bitmap.clone(), self.name.clone());
        let mirror = self.mirror();
        let result = blocking(move || {
            let err = |source| OverlayError::Io {
                path: name.clone(),
                source,
            };
            data.sync_data().map_err(err)?;
            if let Some(m) = &mirror {
                // The relocation copy is as durable as the overlay (a failure there fails the
                // relocation, not the VM's commit).
                if let Err(e) = m.sync() {
                    m.fail(format!("syncing {}: {e}", m.path().display()));
                }
            }
            for (off, bytes) in &words {
                bitmap.write_all_at(bytes, *off).map_err(err)?;
            }
            bitmap.sync_data().map_err(err)?;
            Ok(())
        })
        .await;
        match result {
            Ok(()) => {
                *synced = now;
                Ok(())
            }
            Err(e) => {
                // Put the pages back so the next commit writes them.
                let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
                bits.dirty.extend(pages);
                Err(e)
            }
        }
    }
}

/// The bytes of bitmap pages: (file offset, bytes) each.
fn page_bytes(words: &[u64], pages: &[u64]) -> Vec<(u64, Vec<u8>)> {
    pages
        .iter()
        .map(|p| {
            let w0 = ((p * PAGE / 8) as usize).min(words.len());
            let w1 = (w0 + (PAGE / 8) as usize).min(words.len());
            let bytes = words[w0..w1].iter().flat_map(|w| w.to_le_bytes()).collect();
            (p * PAGE, bytes)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bits_finds_what_a_bit_by_bit_scan_finds() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            // Sparse, dense, empty and full words.
            let words: Vec<u64> = (0..6)
                .map(|i| match (round + i) % 4 {
                    0 => 0,
                    1 => u64::MAX,
                    2 => next() & next() & next(),
                    _ => next(),
                })
                .collect();
            let first = next() % 420;
            let end = first + next() % 420;
            let limit = [1, 3, usize::MAX][round % 3];
            let naive: Vec<u64> = (first..end)
                .filter(|&b| {
                    words
                        .get((b / 64) as usize)
                        .is_some_and(|w| w & (1 << (b % 64)) != 0)
                })
                .take(limit)
                .collect();
            assert_eq!(
                set_bits(&words, first, end, limit),
                naive,
                "{words:x?} {first}..{end}"
            );
        }
    }

    #[test]
    fn a_new_overlay_is_durable_by_name_before_open_returns() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("overlays/m");
        Overlay::open(&dir, "disk0", 1 << 20).unwrap();
        // The folders made on the way, then the folder holding the three new files.
        assert_eq!(
            durable::synced_under(t.path()),
            [
                t.path().to_path_buf(),
                t.path().join("overlays"),
                dir.clone()
            ]
        );
        // Opened again: nothing new to make durable.
        Overlay::open(&dir, "disk0", 1 << 20).unwrap();
        assert_eq!(durable::synced_under(t.path()).len(), 3);
    }
}
