//! A disk's overlay: the blocks a VM wrote, kept apart from the backup.
//!
//! Owns: two files per disk in the mount's overlay folder, `N.data` (sparse, the disk's size;
//! written blocks at their own offsets) and `N.bitmap` (one bit per 4 KiB block, set once the
//! block's data is durable), and the read and write paths over them.
//! Must not: touch the backup: reads fall through to the [`DiskImage`] for blocks not written.
//!
//! Ordering rules:
//! - A write covering part of a block first fills the rest of that block from the backup, so a
//!   set bit always means "the whole block is in `N.data`".
//! - Writes to one disk are serialised (an async mutex), which keeps read-modify-write of
//!   partial blocks atomic; reads never wait for it.
//! - Durability: data is fdatasynced before the bitmap pages naming it are written and synced.
//!   UNSTABLE writes set bits in memory only; `commit` makes them durable. Concurrent commits
//!   share one sync: a commit that finds its writes already synced returns at once.
//! - Bitmap bits are only ever set, never cleared (the disk's size is fixed).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};

use crate::repo::{DiskImage, RepoError};

/// Overlay block size: what a bit of the bitmap covers.
pub const BLOCK: u64 = 4096;
/// Bitmap bytes written per dirty page at commit.
const PAGE: u64 = 4096;

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
    bits: Mutex<Bits>,
    writes: tokio::sync::Mutex<()>,
    /// Incremented by every write; `synced` is the highest value made durable.
    written: AtomicU64,
    synced: tokio::sync::Mutex<u64>,
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
    /// Opens (or creates) the overlay `stem` in `dir` for a disk of `size` bytes.
    pub fn open(dir: &Path, stem: &str, size: u64) -> Result<Overlay, OverlayError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let data_path = dir.join(format!("{stem}.data"));
        let bitmap_path = dir.join(format!("{stem}.bitmap"));
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(io_err(p))
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
        let words = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        Ok(Overlay {
            name: data_path.display().to_string(),
            size,
            data: Arc::new(data),
            bitmap: Arc::new(bitmap),
            bits: Mutex::new(Bits {
                words,
                dirty: BTreeSet::new(),
            }),
            writes: tokio::sync::Mutex::new(()),
            written: AtomicU64::new(0),
            synced: tokio::sync::Mutex::new(0),
        })
    }

    fn has(&self, block: u64) -> bool {
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        bits.words
            .get((block / 64) as usize)
            .is_some_and(|w| w & (1 << (block % 64)) != 0)
    }

    /// How many blocks the VM has written.
    pub fn written_blocks(&self) -> u64 {
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        bits.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Reads `len` bytes at `offset`: written blocks from the overlay, the rest from the backup.
    pub async fn read(
        &self,
        image: &DiskImage,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, OverlayError> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let written: Vec<u64> = (first..=last).filter(|b| self.has(*b)).collect();
        if written.is_empty() {
            return Ok(image.read_at(offset, len).await?);
        }
        let mut out = if written.len() as u64 == last - first + 1 {
            BytesMut::zeroed((end - offset) as usize)
        } else {
            BytesMut::from(&image.read_at(offset, len).await?[..])
        };
        let data = self.data.clone();
        let name = self.name.clone();
        let out = blocking(move || {
            for b in written {
                let lo = (b * BLOCK).max(offset);
                let hi = ((b + 1) * BLOCK).min(end);
                let dst = &mut out[(lo - offset) as usize..(hi - offset) as usize];
                data.read_exact_at(dst, lo)
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
        blocking(move || {
            file.write_all_at(&buf, lo)
                .map_err(|source| OverlayError::Io { path: name, source })
        })
        .await?;
        // The bits are set only now that the data is in the file (a read that sees a bit reads
        // the data). The words that changed go to the bitmap file at once, without fsync: a
        // process that is killed leaves them in the page cache, so an UNSTABLE write survives
        // `kill -9` (only a machine crash can lose it, and that changes the write verifier).
        let changed = {
            let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
            let mut changed = false;
            for b in start_b..end_b {
                if let Some(w) = bits.words.get_mut((b / 64) as usize) {
                    changed |= *w & (1 << (b % 64)) == 0;
                    *w |= 1 << (b % 64);
                }
                let page = (b / 64) * 8 / PAGE;
                bits.dirty.insert(page);
            }
            let (w0, w1) = ((start_b / 64) as usize, ((end_b - 1) / 64) as usize);
            changed.then(|| {
                let bytes: Vec<u8> = bits.words[w0..=w1.min(bits.words.len() - 1)]
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect();
                (w0 as u64 * 8, bytes)
            })
        };
        if let Some((at, bytes)) = changed {
            let (bitmap, name) = (self.bitmap.clone(), self.name.clone());
            blocking(move || {
                bitmap
                    .write_all_at(&bytes, at)
                    .map_err(|source| OverlayError::Io { path: name, source })
            })
            .await?;
        }
        self.written.fetch_add(1, Ordering::SeqCst);
        drop(_serial);
        if sync {
            self.commit().await?;
        }
        Ok(())
    }

    /// The current bytes of bitmap pages: (file offset, bytes) each.
    fn page_bytes(&self, pages: &[u64]) -> Vec<(u64, Vec<u8>)> {
        let bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
        pages
            .iter()
            .map(|p| {
                let w0 = ((p * PAGE / 8) as usize).min(bits.words.len());
                let w1 = (w0 + (PAGE / 8) as usize).min(bits.words.len());
                let bytes = bits.words[w0..w1]
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect();
                (p * PAGE, bytes)
            })
            .collect()
    }

    /// Makes every write so far durable: data first, then the bitmap pages that name it.
    pub async fn commit(&self) -> Result<(), OverlayError> {
        let target = self.written.load(Ordering::SeqCst);
        let mut synced = self.synced.lock().await;
        if *synced >= target {
            return Ok(()); // a commit that ran while we waited covered our writes
        }
        let now = self.written.load(Ordering::SeqCst);
        let pages: Vec<u64> = {
            let mut bits = self.bits.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut bits.dirty).into_iter().collect()
        };
        let (data, bitmap, name) = (self.data.clone(), self.bitmap.clone(), self.name.clone());
        let err = move |source| OverlayError::Io {
            path: name.clone(),
            source,
        };
        let result = async {
            let e = err.clone();
            blocking(move || data.sync_data().map_err(e)).await?;
            // The pages as they are now, written under the writers' lock: a write's own update
            // of its bitmap words (made so that `kill -9` loses nothing) is never overwritten by
            // an older copy of the page.
            let _writers = self.writes.lock().await;
            let words = self.page_bytes(&pages);
            let (b, e) = (bitmap.clone(), err.clone());
            blocking(move || {
                for (off, bytes) in &words {
                    b.write_all_at(bytes, *off).map_err(&e)?;
                }
                Ok(())
            })
            .await?;
            drop(_writers);
            blocking(move || bitmap.sync_data().map_err(err)).await
        }
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
