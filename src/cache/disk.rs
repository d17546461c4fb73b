//! The read cache's disk tier: decoded chunks kept in a folder on the media agent's local disk
//! (an SSD on a real agent), bounded in bytes, surviving a restart. The memory cache stays in
//! front of it; it sits in front of the repository.
//!
//! Layout of the folder:
//! ```text
//! livemount-cache.toml    format = 1
//! chunks/ab/<64 hex>      a chunk's decoded bytes; the name is their BLAKE3 digest
//! tmp/                    entries being written; emptied at open
//! ```
//! Owns: the folder, an index of its entries (size, last use) rebuilt at open from the files
//! (last use from their modification times), least-recently-used eviction when a new entry
//! would pass the capacity, and the check of every entry on read: its bytes must hash to its
//! name. A damaged or unreadable entry is removed and reported as absent, so the caller
//! fetches the chunk again; it is never served.
//! Must not: fetch anything, or fail a read: every error here is "not cached".
//!
//! Durability: none is needed. An entry is written under `tmp/` and renamed into place, with no
//! fsync: after a power cut an entry may be missing or torn, and a torn one fails its check.
//! Ordering: the index lock is held for map updates only, never across file I/O; file I/O runs
//! on tokio's blocking pool. An entry evicted while a reader reads it reads as absent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::repo::ChunkId;

const FORMAT_FILE: &str = "livemount-cache.toml";
const FORMAT: &str = "format = 1\n";
/// Entry writes running at once (on the blocking pool).
const WRITERS: usize = 4;
/// Entry writes waiting or running, each holding its chunk's bytes: a chunk that finds this
/// many is not written (the cache is best effort; a flood of fills must not pile up memory).
const MAX_QUEUED: u64 = 128;

/// A failure to open the cache folder (at start: a clear error, nothing served).
#[derive(Debug, thiserror::Error)]
pub enum DiskCacheError {
    #[error("disk cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk cache {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// Counters of the disk tier.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskCacheStats {
    /// Reads served from disk.
    pub hits: u64,
    /// Entries written.
    pub writes: u64,
    /// Entries dropped because their bytes did not hash to their name (or could not be read).
    pub dropped: u64,
    pub entries: u64,
    pub bytes: u64,
    pub capacity: u64,
    /// Entry writes waiting or running now.
    #[serde(default)]
    pub writes_queued: u64,
}

#[derive(Debug, Default)]
struct Index {
    /// Size and last-use tick of each entry.
    entries: HashMap<ChunkId, (u64, u64)>,
    /// Entries by last use, oldest first.
    by_use: BTreeMap<u64, ChunkId>,
    next_tick: u64,
    bytes: u64,
    /// Entries being written now.
    writing: HashSet<ChunkId>,
}

impl Index {
    fn touch(&mut self, id: &ChunkId) {
        let tick = self.next_tick;
        if let Some((_, t)) = self.entries.get_mut(id) {
            self.by_use.remove(t);
            *t = tick;
            self.by_use.insert(tick, *id);
            self.next_tick += 1;
        }
    }

    fn insert(&mut self, id: ChunkId, size: u64) {
        self.remove(&id);
        let tick = self.next_tick;
        self.next_tick += 1;
        self.entries.insert(id, (size, tick));
        self.by_use.insert(tick, id);
        self.bytes += size;
    }

    fn remove(&mut self, id: &ChunkId) -> bool {
        match self.entries.remove(id) {
            Some((size, tick)) => {
                self.by_use.remove(&tick);
                self.bytes -= size;
                true
            }
            None => false,
        }
    }

    /// Takes out least recently used entries until `room` more bytes fit in `capacity`.
    fn evict_for(&mut self, room: u64, capacity: u64) -> Vec<ChunkId> {
        let mut out = Vec::new();
        while self.bytes + room > capacity {
            let Some((_, id)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((size, _)) = self.entries.remove(&id) {
                self.bytes -= size;
            }
            out.push(id);
        }
        out
    }
}

/// The disk tier. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    hits: AtomicU64,
    writes: AtomicU64,
    dropped: AtomicU64,
    queued: AtomicU64,
    writers: Arc<tokio::sync::Semaphore>,
    tmp_counter: AtomicU64,
}

impl DiskCache {
    /// Opens (or makes) the cache folder `dir` of at most `capacity` bytes: clears `tmp/`,
    /// indexes the entries there, and evicts the oldest if they pass the capacity. Blocking.
    pub fn open(dir: &Path, capacity: u64) -> Result<Arc<DiskCache>, DiskCacheError> {
        let io = |path: &Path, source| DiskCacheError::Io {
            path: path.into(),
            source,
        };
        if capacity == 0 {
            return Err(DiskCacheError::Invalid {
                path: dir.into(),
                what: "its size must be above zero".into(),
            });
        }
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let format = dir.join(FORMAT_FILE);
        match fs::read_to_string(&format) {
            Ok(text) if text == FORMAT => {}
            Ok(_) => {
                return Err(DiskCacheError::Invalid {
                    path: dir.into(),
                    what: format!("its {FORMAT_FILE} is not livemount's format 1; give an empty folder or one livemount made"),
                })
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                if fs::read_dir(dir).map_err(|e| io(dir, e))?.next().is_some() {
                    return Err(DiskCacheError::Invalid {
                        path: dir.into(),
                        what: "it is not empty and not a livemount disk cache; give an empty or new folder".into(),
                    });
                }
                fs::write(&format, FORMAT).map_err(|e| io(&format, e))?;
            }
            Err(e) => return Err(io(&format, e)),
        }
        let tmp = dir.join("tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        let chunks = dir.join("chunks");
        fs::create_dir_all(&chunks).map_err(|e| io(&chunks, e))?;

        // Every entry, oldest use first (modification time: written, or last read).
        let mut found = Vec::new();
        for sub in fs::read_dir(&chunks).map_err(|e| io(&chunks, e))? {
            let sub = sub.map_err(|e| io(&chunks, e))?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in fs::read_dir(&sub).map_err(|e| io(&sub, e))? {
                let f = f.map_err(|e| io(&sub, e))?;
                let Some(id) = f.file_name().to_str().and_then(ChunkId::from_hex) else {
                    continue;
                };
                let Ok(meta) = f.metadata() else { continue };
                let used = meta.modified().ok();
                found.push((used, id, meta.len()));
            }
        }
        found.sort_by_key(|(used, _, _)| *used);
        let cache = DiskCache {
            dir: dir.into(),
            capacity,
            index: Mutex::new(Index::default()),
            hits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            writers: Arc::new(tokio::sync::Semaphore::new(WRITERS)),
            tmp_counter: AtomicU64::new(0),
        };
        let evicted = {
            let mut index = cache.lock();
            for (_, id, size) in found {
                index.insert(id, size);
            }
            index.evict_for(0, capacity)
        };
        for id in evicted {
            let _ = fs::remove_file(cache.path_of(&id));
        }
        Ok(Arc::new(cache))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join("chunks").join(&hex[..2]).join(hex)
    }

    /// Whether the chunk has an entry now.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lock().entries.contains_key(id)
    }

    /// The chunk's bytes, if it has a sound entry. A damaged entry is removed.
    pub async fn get(self: &Arc<Self>, id: &ChunkId) -> Option<Bytes> {
        if !self.contains(id) {
            return None;
        }
        let this = self.clone();
        let id = *id;
        tokio::task::spawn_blocking(move || this.get_blocking(&id))
            .await
            .ok()
            .flatten()
    }

    fn get_blocking(&self, id: &ChunkId) -> Option<Bytes> {
        use std::io::Read;
        let path = self.path_of(id);
        // One open serves the read and the update of the entry's last use.
        let read = fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .and_then(|mut f| {
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)?;
                Ok((f, bytes))
            });
        let (file, bytes) = match read {
            Ok(r) => r,
            // Evicted meanwhile.
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.lock().remove(id);
                return None;
            }
            Err(e) => {
                tracing::warn!(chunk = %id, error = %e, "disk cache entry unreadable; dropped");
                self.drop_entry(id, &path);
                return None;
            }
        };
        if ChunkId::of(&bytes) != *id {
            tracing::warn!(chunk = %id, len = bytes.len(), "disk cache entry damaged (its bytes do not hash to its name); dropped, the chunk is fetched again");
            self.drop_entry(id, &path);
            return None;
        }
        self.lock().touch(id);
        self.hits.fetch_add(1, Relaxed);
        // Its modification time is its last use, for the order of eviction after a restart.
        let _ = file.set_modified(std::time::SystemTime::now());
        Some(Bytes::from(bytes))
    }

    fn drop_entry(&self, id: &ChunkId, path: &Path) {
        self.dropped.fetch_add(1, Relaxed);
        self.lock().remove(id);
        let _ = fs::remove_file(path);
    }

    /// Keeps a chunk's decoded bytes (checked by the caller against its digest), in the
    /// background, [`WRITERS`] at a time. Nothing happens if it is there or being written, if
    /// it is larger than the whole cache, or if [`MAX_QUEUED`] writes are waiting already.
    pub fn put(self: &Arc<Self>, id: ChunkId, bytes: Bytes) {
        let len = bytes.len() as u64;
        if len > self.capacity {
            return;
        }
        {
            let mut index = self.lock();
            if index.entries.contains_key(&id) || !index.writing.insert(id) {
                return;
            }
        }
        if self.queued.fetch_add(1, Relaxed) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Relaxed);
            self.lock().writing.remove(&id);
            tracing::debug!(chunk = %id, "disk cache write queue full; chunk not kept");
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let permit = this.writers.clone().acquire_owned().await;
            let writer = this.clone();
            let _ = tokio::task::spawn_blocking(move || {
                writer.put_blocking(id, &bytes);
                drop(permit);
            })
            .await;
            this.queued.fetch_sub(1, Relaxed);
        });
    }

    /// The same, here and now (blocking).
    pub fn put_blocking(&self, id: ChunkId, bytes: &[u8]) {
        let path = self.path_of(&id);
        let n = self.tmp_counter.fetch_add(1, Relaxed);
        let tmp = self.dir.join("tmp").join(format!("{}.{n}", id.to_hex()));
        let written = (|| {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            let mut f = fs::File::options()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            drop(f);
            fs::rename(&tmp, &path)
        })();
        let evicted = {
            let mut index = self.lock();
            index.writing.remove(&id);
            match &written {
                Ok(()) => {
                    let evicted = index.evict_for(bytes.len() as u64, self.capacity);
                    index.insert(id, bytes.len() as u64);
                    evicted
                }
                Err(_) => Vec::new(),
            }
        };
        match written {
            Ok(()) => {
                self.writes.fetch_add(1, Relaxed);
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                tracing::warn!(chunk = %id, error = %e, "cannot write a disk cache entry");
            }
        }
        for old in evicted {
            let _ = fs::remove_file(self.path_of(&old));
        }
    }

    pub fn stats(&self) -> DiskCacheStats {
        let index = self.lock();
        DiskCacheStats {
            hits: self.hits.load(Relaxed),
            writes: self.writes.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            entries: index.entries.len() as u64,
            bytes: index.bytes,
            capacity: self.capacity,
            writes_queued: self.queued.load(Relaxed),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> (ChunkId, Vec<u8>) {
        let bytes = vec![n; len];
        (ChunkId::of(&bytes), bytes)
    }

    #[tokio::test]
    async fn entries_survive_a_reopen_and_damaged_ones_are_dropped() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("cache");
        let c = DiskCache::open(&dir, 1 << 20).unwrap();
        let (a, a_bytes) = chunk(1, 1000);
        let (b, b_bytes) = chunk(2, 2000);
        c.put_blocking(a, &a_bytes);
        c.put_blocking(b, &b_bytes);
        assert_eq!(c.get(&a).await.as_deref(), Some(&a_bytes[..]));
        drop(c);

        // A restart: both entries are there; one is damaged on disk meanwhile.
        let path_b = dir.join("chunks").join(&b.to_hex()[..2]).join(b.to_hex());
        let mut damaged = b_bytes.clone();
        damaged[7] ^= 1;
        fs::write(&path_b, &damaged).unwrap();
        fs::write(dir.join("tmp").join("leftover"), b"x").unwrap();
        let c = DiskCache::open(&dir, 1 << 20).unwrap();
        assert_eq!(c.stats().entries, 2);
        assert_eq!(
            fs::read_dir(dir.join("tmp")).unwrap().count(),
            0,
            "tmp/ cleared"
        );
        assert_eq!(c.get(&a).await.as_deref(), Some(&a_bytes[..]));
        assert_eq!(c.get(&b).await, None, "a damaged entry is never served");
        assert!(!path_b.exists(), "and it is removed");
        let s = c.stats();
        assert_eq!((s.hits, s.dropped, s.entries, s.bytes), (1, 1, 1, 1000));
    }

    #[tokio::test]
    async fn the_least_recently_used_entries_go_first_and_the_size_holds() {
        let t = tempfile::tempdir().unwrap();
        let c = DiskCache::open(t.path(), 3000).unwrap();
        let (a, ab) = chunk(1, 1000);
        let (b, bb) = chunk(2, 1000);
        let (d, db) = chunk(3, 1000);
        let (e, eb) = chunk(4, 1500);
        c.put_blocking(a, &ab);
        c.put_blocking(b, &bb);
        c.put_blocking(d, &db);
        assert!(
            c.get(&a).await.is_some(),
            "a is used again: b is now the oldest"
        );
        c.put_blocking(e, &eb);
        assert!(c.contains(&a) && c.contains(&e));
        assert!(!c.contains(&b) && !c.contains(&d), "b and d made room");
        assert!(c.stats().bytes <= 3000);
        let files = fs::read_dir(t.path().join("chunks"))
            .unwrap()
            .flat_map(|d| fs::read_dir(d.unwrap().path()).unwrap())
            .count();
        assert_eq!(files, 2, "evicted entries' files are removed");
        // A smaller capacity at the next open evicts down to it.
        let c = DiskCache::open(t.path(), 1600).unwrap();
        assert!(c.stats().bytes <= 1600, "{:?}", c.stats());
        // An entry larger than the cache is not kept.
        let (big, bigb) = chunk(5, 2000);
        c.put(big, Bytes::from(bigb));
        assert!(!c.contains(&big));
    }

    #[test]
    fn a_folder_that_is_not_a_cache_is_refused() {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("precious.txt"), b"keep me").unwrap();
        let e = DiskCache::open(t.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("not a livemount disk cache"), "{e}");
        assert!(t.path().join("precious.txt").exists());
        let e = DiskCache::open(&t.path().join("new"), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("above zero"), "{e}");
    }
}
