//! The local directory backend of [`ChunkStore`]: the embedded default repository.
//!
//! Layout of a repository directory:
//! ```text
//! livemount-repo.toml     format version, chunk size, repository id, creation time
//! lock                    held exclusively (flock) by a writer for as long as it writes
//! chunks/00 .. chunks/ff  chunks, as chunks/<first two hex digits>/<64 hex digits>
//! snapshots/<id>.json     snapshot manifests
//! tmp/                    objects being written; emptied by the next writer
//! ```
//! The 256 chunk folders are made at `init`, so a backup never creates a directory.
//!
//! Ordering: an object is written under `tmp/`, fdatasynced, renamed to its name
//! ([`durable::put_via`]); the folders it landed in are fsynced by [`ChunkStore::sync`] (chunks)
//! or at once (manifests). Readers never lock: a name that exists always holds its complete,
//! durable bytes.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::manifest::SnapshotId;
use super::store::{check_record_name, Area, Record};
use super::{blocking, ChunkId, ChunkSize, ChunkStore, RepoError, RepoLocation};
use crate::durable;

/// The repository's config file, at the top of its directory.
pub(crate) const CONFIG_FILE: &str = "livemount-repo.toml";
const FORMAT: u32 = 1;
/// How many folder fsyncs `sync` runs at once.
const SYNC_CONCURRENCY: usize = 16;

/// Contents of `livemount-repo.toml`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RepoConfig {
    /// On-disk format version; this build reads and writes format 1.
    pub format: u32,
    /// Block size in bytes, fixed for the repository's life.
    pub chunk_size: ChunkSize,
    /// A random id, so that tools can tell two repositories apart.
    pub id: String,
    pub created: jiff::Timestamp,
}

impl RepoConfig {
    /// The config of a new repository.
    pub(crate) fn new(chunk_size: ChunkSize) -> RepoConfig {
        RepoConfig {
            format: FORMAT,
            chunk_size,
            id: random_id(),
            created: jiff::Timestamp::now(),
        }
    }

    pub(crate) fn to_toml(&self) -> Result<String, RepoError> {
        toml::to_string(self).map_err(|e| RepoError::Invalid(e.to_string()))
    }

    /// Reads a `livemount-repo.toml` and checks its format version.
    pub(crate) fn parse(text: &str, repo: &RepoLocation) -> Result<RepoConfig, RepoError> {
        let config: RepoConfig = toml::from_str(text).map_err(|e| RepoError::BadRepository {
            repo: repo.clone(),
            what: format!("unreadable {CONFIG_FILE}: {e}"),
        })?;
        if config.format != FORMAT {
            return Err(RepoError::BadRepository {
                repo: repo.clone(),
                what: format!(
                    "format {} is not supported by this livemount (it reads format {FORMAT})",
                    config.format
                ),
            });
        }
        Ok(config)
    }
}

/// A repository in a local directory.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    /// Chunk folders (by first digest byte) that gained a name since the last `sync`.
    dirty: Mutex<BTreeSet<u8>>,
}

/// An exclusive writer's hold on a repository; released on drop.
#[derive(Debug)]
pub(crate) struct WriteLock {
    _file: File,
}

impl LocalStore {
    /// Creates a repository in `root` (a new or empty directory).
    pub(crate) fn init(root: &Path, chunk_size: ChunkSize) -> Result<RepoConfig, RepoError> {
        let io = |e| RepoError::io(root, e);
        if root.exists() {
            let mut entries = fs::read_dir(root).map_err(io)?;
            if entries.next().is_some() {
                return Err(RepoError::AlreadyExists {
                    repo: RepoLocation::Dir(root.into()),
                });
            }
        }
        durable::create_dir_all(root).map_err(io)?;
        let chunks = root.join("chunks");
        fs::create_dir(&chunks).map_err(io)?;
        for b in 0..=255u8 {
            let dir = chunks.join(format!("{b:02x}"));
            fs::create_dir(&dir).map_err(io)?;
        }
        durable::fsync_dir(&chunks).map_err(|e| RepoError::io(&chunks, e))?;
        fs::create_dir(root.join("snapshots")).map_err(io)?;
        fs::create_dir(root.join("tmp")).map_err(io)?;
        File::create(root.join("lock")).map_err(io)?;
        let config = RepoConfig::new(chunk_size);
        let text = config.to_toml()?;
        // The config file is written last: a directory without it is not a repository.
        let path = root.join(CONFIG_FILE);
        durable::put_via(&root.join("tmp"), &path, text.as_bytes())
            .map_err(|e| RepoError::io(&path, e))?;
        durable::fsync_dir(root).map_err(io)?;
        Ok(config)
    }

    /// Opens an existing repository.
    pub(crate) fn open(root: &Path) -> Result<(Self, RepoConfig), RepoError> {
        let path = root.join(CONFIG_FILE);
        let repo = RepoLocation::Dir(root.into());
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(RepoError::NotARepository {
                    hint: not_a_repository_hint(root),
                    repo,
                })
            }
            Err(e) => return Err(RepoError::io(&path, e)),
        };
        let config = RepoConfig::parse(&text, &repo)?;
        let store = LocalStore {
            root: root.into(),
            dirty: Mutex::new(BTreeSet::new()),
        };
        Ok((store, config))
    }

    /// The store in `root` without a look at it: for a repository known to be there that
    /// cannot be reached now (`Repository::open_or_remembered`).
    pub(crate) fn unchecked(root: &Path) -> Self {
        LocalStore {
            root: root.into(),
            dirty: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the writer's lock and clears what an interrupted writer left in `tmp/`.
    pub(crate) fn lock_for_write(&self) -> Result<WriteLock, RepoError> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| RepoError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(RepoError::Locked {
                    repo: RepoLocation::Dir(self.root.clone()),
                })
            }
            Err(fs::TryLockError::Error(e)) => return Err(RepoError::io(&path, e)),
        }
        let tmp = self.root.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(|e| RepoError::io(&tmp, e))? {
            let entry = entry.map_err(|e| RepoError::io(&tmp, e))?;
            fs::remove_file(entry.path()).map_err(|e| RepoError::io(entry.path(), e))?;
        }
        // A writer that was killed may have renamed chunks into place without fsyncing their
        // folders. This writer will reuse such chunks (dedup) without writing them, so it makes
        // every chunk folder durable once before it starts.
        let chunks = self.root.join("chunks");
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..SYNC_CONCURRENCY)
                .map(|k| {
                    let chunks = &chunks;
                    scope.spawn(move || {
                        (0..=255u8)
                            .filter(|b| usize::from(*b) % SYNC_CONCURRENCY == k)
                            .try_for_each(|b| {
                                let dir = chunks.join(format!("{b:02x}"));
                                durable::fsync_dir(&dir).map_err(|e| RepoError::io(&dir, e))
                            })
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(RepoError::Task("fsync".into())))
            })
        })?;
        Ok(WriteLock { _file: file })
    }

    fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(hex)
    }

    fn manifest_path(&self, id: &SnapshotId) -> PathBuf {
        self.root.join("snapshots").join(format!("{id}.json"))
    }

    fn record_path(&self, area: Area, name: &str) -> Result<PathBuf, RepoError> {
        check_record_name(name)?;
        Ok(self.root.join(area.dir()).join(name))
    }

    fn bin_path(&self, bin: &str) -> Result<PathBuf, RepoError> {
        check_record_name(bin)?;
        Ok(self.root.join("trash").join(bin))
    }
}

/// A file's modification time as a timestamp.
fn modified(meta: &fs::Metadata, path: &Path) -> Result<jiff::Timestamp, RepoError> {
    let t = meta.modified().map_err(|e| RepoError::io(path, e))?;
    jiff::Timestamp::try_from(t).map_err(|e| RepoError::Invalid(format!("{}: {e}", path.display())))
}

/// The chunks in a folder of `<64 hex>` files, with their sizes; other names are skipped. A
/// folder that is not there holds none.
fn chunks_in(dir: &Path) -> Result<Vec<(ChunkId, u64)>, RepoError> {
    let Some(entries) = read_dir_if_there(dir)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| RepoError::io(dir, e))?;
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(ChunkId::from_hex) else {
            continue;
        };
        match entry.metadata() {
            Ok(m) => out.push((id, m.len())),
            // Taken away meanwhile (a prune beside this one): not there.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(RepoError::io(entry.path(), e)),
        }
    }
    Ok(out)
}

/// The folder holding `path`.
fn parent_of(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// The entries of folder `dir`, or `None` if there is no such folder.
fn read_dir_if_there(dir: &Path) -> Result<Option<fs::ReadDir>, RepoError> {
    match fs::read_dir(dir) {
        Ok(e) => Ok(Some(e)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(RepoError::io(dir, e)),
    }
}

/// What a file that is not there means: `missing` when the repository is there, its being
/// unreachable when the directory went away (an unmounted share, a moved folder): a file is
/// missing only from a repository that is there.
fn missing_or_gone<T>(root: &Path, missing: RepoError) -> Result<T, RepoError> {
    Err(match root.join(CONFIG_FILE).try_exists() {
        Ok(true) => missing,
        Ok(false) => RepoError::Unreachable {
            repo: RepoLocation::Dir(root.into()),
            what: format!("its {CONFIG_FILE} is gone (is its storage mounted?)"),
        },
        Err(e) => RepoError::Unreachable {
            repo: RepoLocation::Dir(root.into()),
            what: e.to_string(),
        },
    })
}

/// Removes `path`; one that is not there is no error.
fn remove_if_there(path: &Path) -> Result<(), RepoError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RepoError::io(path, e)),
    }
}

#[async_trait]
impl ChunkStore for LocalStore {
    async fn get_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        let path = self.chunk_path(id);
        let root = self.root.clone();
        let id = *id;
        blocking(move || match fs::read(&path) {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                missing_or_gone(&root, RepoError::MissingChunk { chunk: id })
            }
            Err(e) => Err(RepoError::io(&path, e)),
        })
        .await
    }

    async fn has_chunk(&self, id: &ChunkId) -> Result<bool, RepoError> {
        let path = self.chunk_path(id);
        blocking(move || match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RepoError::io(&path, e)),
        })
        .await
    }

    async fn put_chunk(&self, id: &ChunkId, stored: Bytes) -> Result<(), RepoError> {
        let path = self.chunk_path(id);
        let tmp_dir = self.root.join("tmp");
        // Marked dirty before the rename, so a rename that happens is always synced later.
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.0[0]);
        blocking(move || {
            durable::put_via(&tmp_dir, &path, &stored).map_err(|e| RepoError::io(&path, e))
        })
        .await
    }

    async fn sync(&self) -> Result<(), RepoError> {
        let dirty: Vec<u8> = {
            let set = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            set.iter().copied().collect()
        };
        let chunks = self.root.join("chunks");
        // A folder leaves the dirty set only once its fsync has succeeded.
        futures::stream::iter(dirty)
            .map(|b| {
                let dir = chunks.join(format!("{b:02x}"));
                async move {
                    blocking(move || durable::fsync_dir(&dir).map_err(|e| RepoError::io(&dir, e)))
                        .await?;
                    self.dirty
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&b);
                    Ok::<(), RepoError>(())
                }
            })
            .buffer_unordered(SYNC_CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    async fn get_manifest(&self, id: &SnapshotId) -> Result<Bytes, RepoError> {
        let path = self.manifest_path(id);
        let root = self.root.clone();
        let id = id.to_string();
        blocking(move || match fs::read(&path) {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == ErrorKind::NotFound => missing_or_gone(
                &root,
                RepoError::NoSnapshot {
                    spec: id,
                    hint: String::new(),
                },
            ),
            Err(e) => Err(RepoError::io(&path, e)),
        })
        .await
    }

    async fn put_manifest(&self, id: &SnapshotId, bytes: Bytes) -> Result<(), RepoError> {
        let path = self.manifest_path(id);
        let tmp_dir = self.root.join("tmp");
        blocking(move || {
            let dir = path.parent().unwrap_or(Path::new("."));
            durable::put_via(&tmp_dir, &path, &bytes)
                .and_then(|()| durable::fsync_dir(dir))
                .map_err(|e| RepoError::io(&path, e))
        })
        .await
    }

    async fn list_manifests(&self) -> Result<Vec<SnapshotId>, RepoError> {
        let dir = self.root.join("snapshots");
        blocking(move || {
            let mut ids = Vec::new();
            for entry in fs::read_dir(&dir).map_err(|e| RepoError::io(&dir, e))? {
                let entry = entry.map_err(|e| RepoError::io(&dir, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if let Some(id) = name.strip_suffix(".json").and_then(SnapshotId::from_hex) {
                    ids.push(id);
                }
            }
            ids.sort();
            Ok(ids)
        })
        .await
    }

    async fn chunk_stored_size(&self, id: &ChunkId) -> Result<Option<u64>, RepoError> {
        let path = self.chunk_path(id);
        blocking(move || match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io(&path, e)),
        })
        .await
    }

    async fn delete_manifest(&self, id: &SnapshotId) -> Result<(), RepoError> {
        let path = self.manifest_path(id);
        blocking(move || {
            remove_if_there(&path)?;
            durable::fsync_dir(parent_of(&path)).map_err(|e| RepoError::io(&path, e))
        })
        .await
    }

    async fn list_chunks(&self) -> Result<Vec<(ChunkId, u64)>, RepoError> {
        let chunks = self.root.join("chunks");
        // The 256 folders read 16 at a time: a listing of 200,000 chunks is as many stats.
        futures::stream::iter(0..=255u8)
            .map(|b| {
                let dir = chunks.join(format!("{b:02x}"));
                blocking(move || chunks_in(&dir))
            })
            .buffer_unordered(SYNC_CONCURRENCY)
            .try_concat()
            .await
    }

    async fn put_record(&self, area: Area, name: &str, bytes: Bytes) -> Result<(), RepoError> {
        let path = self.record_path(area, name)?;
        // The temporary file in the record's own folder, not in `tmp/`: a backup that starts
        // empties `tmp/`, and records (leases) are written while backups run.
        blocking(move || {
            durable::create_dir_all(parent_of(&path))
                .and_then(|()| durable::replace(&path, &bytes))
                .map_err(|e| RepoError::io(&path, e))
        })
        .await
    }

    async fn get_record(&self, area: Area, name: &str) -> Result<Option<Bytes>, RepoError> {
        let path = self.record_path(area, name)?;
        blocking(move || match fs::read(&path) {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io(&path, e)),
        })
        .await
    }

    async fn list_records(&self, area: Area) -> Result<Vec<Record>, RepoError> {
        let dir = self.root.join(area.dir());
        blocking(move || {
            let Some(entries) = read_dir_if_there(&dir)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| RepoError::io(&dir, e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !super::store::is_record_name(&name) {
                    continue;
                }
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(RepoError::io(entry.path(), e)),
                };
                out.push(Record {
                    modified: modified(&meta, &entry.path())?,
                    name,
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
    }

    async fn delete_record(&self, area: Area, name: &str) -> Result<(), RepoError> {
        let path = self.record_path(area, name)?;
        blocking(move || {
            remove_if_there(&path)?;
            match durable::fsync_dir(parent_of(&path)) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(RepoError::io(&path, e)),
                _ => Ok(()),
            }
        })
        .await
    }

    async fn set_aside(&self, bin: &str, id: &ChunkId) -> Result<(), RepoError> {
        let to = self.bin_path(bin)?.join(id.to_hex());
        let from = self.chunk_path(id);
        blocking(move || {
            durable::create_dir_all(parent_of(&to)).map_err(|e| RepoError::io(&to, e))?;
            match fs::rename(&from, &to) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RepoError::io(&from, e)),
            }
        })
        .await
    }

    async fn list_bins(&self) -> Result<Vec<String>, RepoError> {
        let dir = self.root.join("trash");
        blocking(move || {
            let Some(entries) = read_dir_if_there(&dir)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| RepoError::io(&dir, e))?;
                if let Some(name) = entry.file_name().to_str() {
                    if super::store::is_record_name(name) {
                        out.push(name.to_string());
                    }
                }
            }
            out.sort();
            Ok(out)
        })
        .await
    }

    async fn list_set_aside(&self, bin: &str) -> Result<Vec<(ChunkId, u64)>, RepoError> {
        let dir = self.bin_path(bin)?;
        blocking(move || chunks_in(&dir)).await
    }

    async fn get_set_aside(&self, bin: &str, id: &ChunkId) -> Result<Option<Bytes>, RepoError> {
        let path = self.bin_path(bin)?.join(id.to_hex());
        blocking(move || match fs::read(&path) {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RepoError::io(&path, e)),
        })
        .await
    }

    async fn put_back(&self, bin: &str, id: &ChunkId) -> Result<(), RepoError> {
        let from = self.bin_path(bin)?.join(id.to_hex());
        let to = self.chunk_path(id);
        blocking(move || {
            if to.exists() {
                return remove_if_there(&from);
            }
            match fs::rename(&from, &to) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(RepoError::io(&from, e)),
            }
            durable::fsync_dir(parent_of(&to)).map_err(|e| RepoError::io(&to, e))
        })
        .await
    }

    async fn delete_set_aside(&self, bin: &str, ids: &[ChunkId]) -> Result<(), RepoError> {
        let dir = self.bin_path(bin)?;
        let ids = ids.to_vec();
        blocking(move || {
            for id in ids {
                remove_if_there(&dir.join(id.to_hex()))?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_bin(&self, bin: &str) -> Result<(), RepoError> {
        let dir = self.bin_path(bin)?;
        blocking(move || {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(RepoError::io(&dir, e)),
            }
            durable::fsync_dir(parent_of(&dir)).map_err(|e| RepoError::io(&dir, e))
        })
        .await
    }

    async fn now(&self) -> Result<jiff::Timestamp, RepoError> {
        Ok(jiff::Timestamp::now())
    }
}

/// What to add when `root` holds no repository: a path that does not exist may have been
/// meant as a bucket.
fn not_a_repository_hint(root: &Path) -> String {
    match root.try_exists() {
        Ok(false) => {
            let text = root.to_string_lossy();
            if RepoLocation::parse(&format!("s3://{text}")).is_ok() && !text.starts_with('/') {
                format!(": no such directory (for a bucket, write s3://{text})")
            } else {
                ": no such directory".into()
            }
        }
        _ => String::new(),
    }
}

/// A random-enough id: the digest of the time, the process and a stack address.
fn random_id() -> String {
    let mut h = blake3::Hasher::new();
    h.update(&jiff::Timestamp::now().as_nanosecond().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let local = 0u8;
    h.update(&(&local as *const u8 as usize).to_le_bytes());
    h.finalize().to_hex()[..32].to_string()
}
