//! Files and folders a hypervisor makes in a mount's folder: lock files (`.lck-*`), the swap
//! file (`.vswp`, created by setting its size), `vmware.log`, `.nvram`, config edits
//! (`x.vmx~` renamed over `x.vmx`). The mount's config is one of them from the start, so it can
//! be edited, replaced or removed like any other.
//!
//! Owns: a small namespace (`files.json`: name, parent, kind, file id, mode, owner, group,
//! times) and one data file per regular file (`files/ID`), both in the mount's overlay folder;
//! and, in the same namespace and journal, the attributes a client set on the mount's folder
//! and on the backup's files ([`Meta`], by their low file id: 0 for the folder), so that what a
//! client sets it reads back, across restarts.
//! Must not: touch the backup's disks or descriptors; the caller refuses changes to those.
//!
//! Ordering: a namespace change is durable before it is acknowledged, and visible only once it
//! is durable: it is worked out against the table as it stands, appended to `files.journal`
//! (one JSON line per entry changed, then fdatasync) on the blocking pool, and only then
//! applied in memory. So a change costs what it changes, not the size of the folder, and a
//! save that fails (ENOSPC, EIO) leaves the namespace as the client last saw it acknowledged.
//! When the journal outgrows the snapshot (`files.json`, and at least [`COMPACT_AT`]), the
//! snapshot is replaced whole ([`durable::replace`]) and the journal emptied; replaying a
//! journal over a snapshot that already holds its changes is harmless (each line sets or
//! removes one entry by id). A last line torn by a crash was never acknowledged and is cut off
//! at open. File data follows NFS: UNSTABLE writes are durable at COMMIT, FILE_SYNC ones
//! before the reply; a data file's name is durable (its folder fsynced) as soon as it is made.
//! Changes are serialised by an async mutex; the table's std mutex is held only to read it or
//! to apply a saved change, with indexes by (parent, name) and by parent so that a lookup, a
//! create and a page of READDIR cost the same in a folder of 10 entries or of 10,000.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;

use crate::durable;

/// File ids of folder files start here within a mount's 32-bit id space, above any backup file.
pub const FIRST_ID: u32 = 0x4000_0000;
/// Largest file a hypervisor may create: a swap file as big as the VM's RAM.
pub const MAX_FILE: u64 = 16 << 40;
/// Entries a mount's folder may gain.
pub const MAX_ENTRIES: usize = 10_000;
/// The journal is folded into the snapshot once it is this large and larger than the snapshot.
pub const COMPACT_AT: u64 = 256 * 1024;
const SNAPSHOT: &str = "files.json";
const JOURNAL: &str = "files.journal";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
}

/// One entry of the namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    /// Low 32 bits of the parent's file id: 0 for the mount's folder.
    pub parent: u32,
    pub kind: Kind,
    pub mode: u32,
    /// Owner and group (AUTH_SYS ids): the creator's, or what a client set. Namespaces written
    /// before they were kept read as root's; root's are not written, so a namespace in which
    /// nobody set anything reads the same for the versions before.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u32,
    pub mtime: jiff::Timestamp,
    /// Last access a client set; none: the modification time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atime: Option<jiff::Timestamp>,
    /// Last change of the attributes, when later than `mtime` (a SETATTR); none: `mtime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctime: Option<jiff::Timestamp>,
    /// Logical size of a regular file (its data file may be sparse).
    pub size: u64,
    /// The verifier of the exclusive create that made it, so that a resent create succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verf: Option<[u8; 8]>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Entry {
    pub fn atime(&self) -> jiff::Timestamp {
        self.atime.unwrap_or(self.mtime)
    }

    pub fn ctime(&self) -> jiff::Timestamp {
        self.ctime.unwrap_or(self.mtime).max(self.mtime)
    }

    /// Applies a client's attributes (not the size: the caller sizes the data file first).
    fn apply(&mut self, s: &SetAttr, now: jiff::Timestamp) {
        if let Some(m) = s.mode {
            self.mode = m & MODE_BITS;
        }
        if let Some(u) = s.uid {
            self.uid = u;
        }
        if let Some(g) = s.gid {
            self.gid = g;
        }
        if let Some(t) = s.atime {
            self.atime = Some(t.at(now));
        }
        match s.mtime {
            Some(t) => self.mtime = t.at(now),
            // A size change is a change of the data.
            None if s.size.is_some() => self.mtime = now,
            None => {}
        }
        self.ctime = Some(now);
    }
}

/// The permission bits a client may set (with set-id and sticky bits); the type bits are the
/// server's.
pub const MODE_BITS: u32 = 0o7777;

/// A time a client sets: the server's clock now, or the client's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Server,
    Client(jiff::Timestamp),
}

impl SetTime {
    fn at(self, now: jiff::Timestamp) -> jiff::Timestamp {
        match self {
            SetTime::Server => now,
            SetTime::Client(t) => t,
        }
    }
}

/// Attributes a client asks to set, each optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

impl SetAttr {
    /// Only a size.
    pub fn size(size: u64) -> Self {
        SetAttr {
            size: Some(size),
            ..SetAttr::default()
        }
    }
}

/// What a client set on the mount's folder or on a file of the backup (kept by low file id):
/// each attribute none until set, so the defaults (which follow the mount's mode) show through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atime: Option<jiff::Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime: Option<jiff::Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctime: Option<jiff::Timestamp>,
}

impl Meta {
    fn apply(&mut self, s: &SetAttr, now: jiff::Timestamp) {
        if let Some(m) = s.mode {
            self.mode = Some(m & MODE_BITS);
        }
        if let Some(u) = s.uid {
            self.uid = Some(u);
        }
        if let Some(g) = s.gid {
            self.gid = Some(g);
        }
        if let Some(t) = s.atime {
            self.atime = Some(t.at(now));
        }
        if let Some(t) = s.mtime {
            self.mtime = Some(t.at(now));
        }
        self.ctime = Some(now);
    }
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    next: u32,
    entries: BTreeMap<u32, Entry>,
    /// What clients set on the mount's folder (0) and the backup's files (their low ids, all
    /// below [`FIRST_ID`]): at most one per file of the backup, plus one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    meta: BTreeMap<u32, Meta>,
    /// Id by (parent, name).
    #[serde(skip)]
    by_name: HashMap<(u32, String), u32>,
    /// Ids by parent, in id order.
    #[serde(skip)]
    children: HashMap<u32, BTreeSet<u32>>,
}

/// One line of the journal: an entry set (made or changed) or removed, by id.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum Op {
    Put {
        id: u32,
        entry: Entry,
    },
    Del {
        id: u32,
    },
    /// Attributes set on the mount's folder or a file of the backup.
    Meta {
        id: u32,
        meta: Meta,
    },
}

impl Table {
    /// Builds the indexes after a load.
    fn index(&mut self) {
        self.by_name.clear();
        self.children.clear();
        for (id, e) in &self.entries {
            self.by_name.insert((e.parent, e.name.clone()), *id);
            self.children.entry(e.parent).or_default().insert(*id);
        }
    }

    fn lookup(&self, parent: u32, name: &str) -> Option<u32> {
        self.by_name.get(&(parent, name.to_string())).copied()
    }

    fn has_children(&self, id: u32) -> bool {
        self.children.get(&id).is_some_and(|c| !c.is_empty())
    }

    fn unlink(&mut self, id: u32) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.by_name.remove(&(e.parent, e.name.clone()));
        if let Some(c) = self.children.get_mut(&e.parent) {
            c.remove(&id);
            if c.is_empty() {
                self.children.remove(&e.parent);
            }
        }
        Some(e)
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Put { id, entry } => {
                self.unlink(id);
                self.by_name.insert((entry.parent, entry.name.clone()), id);
                self.children.entry(entry.parent).or_default().insert(id);
                self.entries.insert(id, entry);
                self.next = self.next.max(id.saturating_add(1));
            }
            Op::Del { id } => {
                self.unlink(id);
            }
            Op::Meta { id, meta } => {
                self.meta.insert(id, meta);
            }
        }
    }
}

/// Errors, each mapped to one NFS status by the adapter.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("no such file")]
    NotFound,
    #[error("exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file too large")]
    TooBig,
    #[error("too many files in the mount's folder")]
    Full,
    #[error("mount folder files {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The folder files of one mount.
pub struct FolderFiles {
    dir: PathBuf,
    table: Mutex<Table>,
    /// Serialises changes; holds the journal and its length.
    save: tokio::sync::Mutex<Journal>,
}

/// The journal file, appended to under [`FolderFiles::save`].
struct Journal {
    file: std::sync::Arc<Mutex<File>>,
    len: u64,
    /// The snapshot's size when last written.
    snapshot_len: u64,
    /// A failed append may have left bytes past `len` (its cut failed too): the next append
    /// cuts them off first, or an append shorter than them would leave records of a refused
    /// change behind it, to be replayed at the next open.
    torn: bool,
}

impl std::fmt::Debug for FolderFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FolderFiles")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.display().to_string(),
        source,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FilesError> + Send + 'static,
) -> Result<T, FilesError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FilesError::Io {
            path: "task".into(),
            source: io::Error::other(e.to_string()),
        })?
}

impl FolderFiles {
    /// Opens the folder files in `dir`, creating them with the mount's config (file id
    /// `config_id`) the first time.
    pub fn open(
        dir: &Path,
        config_name: &str,
        config_id: u32,
        config: &[u8],
    ) -> Result<Self, FilesError> {
        let data_dir = dir.join("files");
        durable::create_dir_all(&data_dir).map_err(io_err(&data_dir))?;
        // What an interrupted save left.
        for d in [dir, &data_dir] {
            durable::remove_tmp_files(d).map_err(io_err(d))?;
        }
        let path = dir.join(SNAPSHOT);
        let table = match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| FilesError::Io {
                path: path.display().to_string(),
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let data = data_dir.join(config_id.to_string());
                durable::replace(&data, config).map_err(io_err(&data))?;
                let mut t = Table {
                    next: FIRST_ID,
                    ..Table::default()
                };
                t.entries.insert(
                    config_id,
                    Entry {
                        name: config_name.to_string(),
                        parent: 0,
                        kind: Kind::File,
                        mode: 0o644,
                        uid: 0,
                        gid: 0,
                        mtime: jiff::Timestamp::now(),
                        atime: None,
                        ctime: None,
                        size: config.len() as u64,
                        verf: None,
                    },
                );
                save_table(dir, &t)?;
                t
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut table = table;
        table.index();
        let snapshot_len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let (file, len) = open_journal(dir, &mut table)?;
        Ok(FolderFiles {
            dir: dir.to_path_buf(),
            table: Mutex::new(table),
            save: tokio::sync::Mutex::new(Journal {
                file: std::sync::Arc::new(Mutex::new(file)),
                len,
                snapshot_len,
                torn: false,
            }),
        })
    }

    /// The folder the namespace and the data files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn data_path(&self, id: u32) -> PathBuf {
        self.dir.join("files").join(id.to_string())
    }

    pub fn get(&self, id: u32) -> Option<Entry> {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .get(&id)
            .cloned()
    }

    pub fn lookup(&self, parent: u32, name: &[u8]) -> Option<u32> {
        let name = std::str::from_utf8(name).ok()?;
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.lookup(parent, name)
    }

    /// Entries of a folder (0: the mount's folder) with ids above `after`, in id order, at
    /// most `limit` of them.
    pub fn list_after(&self, parent: u32, after: u32, limit: usize) -> Vec<(u32, Entry)> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(ids) = t.children.get(&parent) else {
            return Vec::new();
        };
        ids.range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit)
            .filter_map(|id| t.entries.get(id).map(|e| (*id, e.clone())))
            .collect()
    }

    /// Entries of a folder (0: the mount's folder), in id order.
    pub fn list(&self, parent: u32) -> Vec<(u32, Entry)> {
        self.list_after(parent, 0, usize::MAX)
    }

    /// Works a change out against the table (`f` returns its answer and the entries it sets
    /// or removes), makes it durable, and only then applies it.
    async fn change<T>(
        &self,
        f: impl FnOnce(&Table) -> Result<(T, Vec<Op>), FilesError>,
    ) -> Result<T, FilesError> {
        let mut journal = self.save.lock().await;
        let (out, ops) = {
            let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            f(&t)?
        };
        if ops.is_empty() {
            return Ok(out);
        }
        let mut lines = Vec::new();
        for op in &ops {
            serde_json::to_writer(&mut lines, op).map_err(|e| FilesError::Io {
                path: JOURNAL.into(),
                source: io::Error::other(e),
            })?;
            lines.push(b'\n');
        }
        let (file, path, at) = (journal.file.clone(), self.dir.join(JOURNAL), journal.len);
        let (added, torn) = (lines.len() as u64, journal.torn);
        let (appended, torn) = blocking(move || Ok(append(&file, &path, at, &lines, torn))).await?;
        journal.torn = torn;
        appended?;
        journal.len += added;
        {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            for op in ops {
                t.apply(op);
            }
        }
        if journal.len >= COMPACT_AT && journal.len > journal.snapshot_len {
            self.compact(&mut journal).await?;
        }
        Ok(out)
    }

    /// Folds the journal into a new snapshot and empties it. A failure leaves both as they
    /// were (the journal still holds every change), and is reported: the change that
    /// triggered it is durable all the same, so it is only logged.
    async fn compact(&self, journal: &mut Journal) -> Result<(), FilesError> {
        let snapshot = {
            let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            serde_json::to_vec(&*t).map_err(|e| FilesError::Io {
                path: SNAPSHOT.into(),
                source: io::Error::other(e),
            })?
        };
        let (dir, file) = (self.dir.clone(), journal.file.clone());
        let len = snapshot.len() as u64;
        let done = blocking(move || {
            save_bytes(&dir, &snapshot)?;
            let path = dir.join(JOURNAL);
            let f = file.lock().unwrap_or_else(|p| p.into_inner());
            f.set_len(0)
                .and_then(|()| f.sync_data())
                .map_err(io_err(&path))
        })
        .await;
        match done {
            Ok(()) => {
                journal.len = 0;
                journal.snapshot_len = len;
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "folding the mount folder's journal into its snapshot failed; it is tried again at the next change");
                // Try again only after the journal has grown as much again.
                journal.snapshot_len = journal.len;
            }
        }
        Ok(())
    }

    /// Creates a regular file (or, when `exclusive` is false and it exists, returns it).
    pub async fn create(
        &self,
        parent: u32,
        name: &str,
        exclusive: bool,
    ) -> Result<u32, FilesError> {
        self.add_entry(parent, name, Kind::File, exclusive, None)
            .await
    }

    /// An exclusive create (NFS `createmode3` EXCLUSIVE): fails if the name exists, unless it
    /// was made by a create with the same verifier (a client resending after a lost reply).
    pub async fn create_exclusive(
        &self,
        parent: u32,
        name: &str,
        verf: [u8; 8],
    ) -> Result<u32, FilesError> {
        self.add_entry(parent, name, Kind::File, true, Some(verf))
            .await
    }

    pub async fn mkdir(&self, parent: u32, name: &str) -> Result<u32, FilesError> {
        self.add_entry(parent, name, Kind::Dir, true, None).await
    }

    /// Adds an entry. The name is checked inside the serialised change, so two concurrent
    /// creates of one name make one entry. A regular file's data file is made lazily (a missing
    /// one reads as empty), so a crash between the two leaves nothing inconsistent.
    async fn add_entry(
        &self,
        parent: u32,
        name: &str,
        kind: Kind,
        exclusive: bool,
        verf: Option<[u8; 8]>,
    ) -> Result<u32, FilesError> {
        self.check_parent(parent)?;
        self.change(|t| {
            if let Some(id) = t.lookup(parent, name) {
                let e = t.entries.get(&id).ok_or(FilesError::NotFound)?;
                if verf.is_some() && e.verf == verf && e.kind == kind {
                    return Ok((id, vec![]));
                }
                return if exclusive || e.kind != kind || kind == Kind::Dir {
                    Err(FilesError::Exists)
                } else {
                    Ok((id, vec![]))
                };
            }
            if t.entries.len() >= MAX_ENTRIES {
                return Err(FilesError::Full);
            }
            let id = t.next;
            let (mode, size) = match kind {
                Kind::File => (0o644, 0),
                Kind::Dir => (0o755, 4096),
            };
            let entry = Entry {
                name: name.to_string(),
                parent,
                kind,
                mode,
                uid: 0,
                gid: 0,
                mtime: jiff::Timestamp::now(),
                atime: None,
                ctime: None,
                size,
                verf,
            };
            Ok((id, vec![Op::Put { id, entry }]))
        })
        .await
    }

    fn check_parent(&self, parent: u32) -> Result<(), FilesError> {
        if parent == 0 {
            return Ok(());
        }
        match self.get(parent) {
            Some(e) if e.kind == Kind::Dir => Ok(()),
            Some(_) => Err(FilesError::NotDir),
            None => Err(FilesError::NotFound),
        }
    }

    /// Removes a file (`dir` false) or an empty folder (`dir` true).
    pub async fn remove(&self, parent: u32, name: &[u8], dir: bool) -> Result<(), FilesError> {
        let id = self.lookup(parent, name).ok_or(FilesError::NotFound)?;
        self.change(|t| {
            let e = t.entries.get(&id).ok_or(FilesError::NotFound)?;
            match (e.kind, dir) {
                (Kind::Dir, false) => return Err(FilesError::IsDir),
                (Kind::File, true) => return Err(FilesError::NotDir),
                (Kind::Dir, true) if t.has_children(id) => return Err(FilesError::NotEmpty),
                _ => {}
            }
            Ok(((), vec![Op::Del { id }]))
        })
        .await?;
        let path = self.data_path(id);
        let _ = fs::remove_file(path);
        Ok(())
    }

    /// Renames, replacing a file (or empty folder) of the same kind at the target.
    pub async fn rename(
        &self,
        from_parent: u32,
        from: &[u8],
        to_parent: u32,
        to: &str,
    ) -> Result<(), FilesError> {
        self.check_parent(to_parent)?;
        let id = self.lookup(from_parent, from).ok_or(FilesError::NotFound)?;
        let replaced = self.lookup(to_parent, to.as_bytes()).filter(|r| *r != id);
        self.change(|t| {
            let kind = t.entries.get(&id).ok_or(FilesError::NotFound)?.kind;
            let mut ops = Vec::new();
            if let Some(r) = replaced {
                let rk = t.entries.get(&r).map(|e| e.kind);
                match (kind, rk) {
                    (Kind::File, Some(Kind::Dir)) => return Err(FilesError::IsDir),
                    (Kind::Dir, Some(Kind::File)) => return Err(FilesError::NotDir),
                    (Kind::Dir, Some(Kind::Dir)) if t.has_children(r) => {
                        return Err(FilesError::NotEmpty)
                    }
                    _ => {}
                }
                ops.push(Op::Del { id: r });
            }
            // A folder may not move into itself or below itself.
            let mut p = to_parent;
            while p != 0 {
                if p == id {
                    return Err(FilesError::NotDir);
                }
                p = t.entries.get(&p).map(|e| e.parent).unwrap_or(0);
            }
            let mut e = t.entries.get(&id).ok_or(FilesError::NotFound)?.clone();
            e.parent = to_parent;
            e.name = to.to_string();
            e.mtime = jiff::Timestamp::now();
            e.ctime = None;
            ops.push(Op::Put { id, entry: e });
            Ok(((), ops))
        })
        .await?;
        if let Some(r) = replaced {
            let _ = fs::remove_file(self.data_path(r));
        }
        Ok(())
    }

    /// Sets what a client asks of a file or folder: a regular file's size (growing is sparse),
    /// mode, owner, group and times. The change time becomes now.
    pub async fn setattr(&self, id: u32, s: SetAttr) -> Result<Entry, FilesError> {
        if let Some(size) = s.size {
            if size > MAX_FILE {
                return Err(FilesError::TooBig);
            }
            if self.get(id).is_some_and(|e| e.kind == Kind::Dir) {
                return Err(FilesError::IsDir);
            }
            let path = self.data_path(id);
            blocking(move || {
                let f = open_data(&path)?;
                f.set_len(size).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))
            })
            .await?;
        }
        self.change(|t| {
            let mut e = t.entries.get(&id).ok_or(FilesError::NotFound)?.clone();
            if let Some(size) = s.size {
                e.size = size;
            }
            e.apply(&s, jiff::Timestamp::now());
            Ok((e.clone(), vec![Op::Put { id, entry: e }]))
        })
        .await
    }

    /// What clients set on the mount's folder (`id` 0) or on a file of the backup (its low
    /// file id, below [`FIRST_ID`]).
    pub fn meta(&self, id: u32) -> Option<Meta> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.meta.get(&id).copied()
    }

    /// Keeps what a client sets on the mount's folder or a file of the backup (not its size:
    /// the caller refuses that), durable before it returns. The caller names only ids that
    /// exist, so at most one [`Meta`] per file of the backup is kept.
    pub async fn set_meta(&self, id: u32, s: SetAttr) -> Result<Meta, FilesError> {
        if id >= FIRST_ID {
            return Err(FilesError::NotFound);
        }
        self.change(|t| {
            let mut m = t.meta.get(&id).copied().unwrap_or_default();
            m.apply(&s, jiff::Timestamp::now());
            Ok((m, vec![Op::Meta { id, meta: m }]))
        })
        .await
    }

    pub async fn read(
        &self,
        id: u32,
        offset: u64,
        count: u32,
    ) -> Result<(Bytes, bool), FilesError> {
        let e = self.get(id).ok_or(FilesError::NotFound)?;
        if e.kind == Kind::Dir {
            return Err(FilesError::IsDir);
        }
        let end = offset.saturating_add(u64::from(count)).min(e.size);
        if offset >= end {
            return Ok((Bytes::new(), true));
        }
        let path = self.data_path(id);
        let data = blocking(move || {
            let mut buf = vec![0u8; (end - offset) as usize];
            let f = match File::open(&path) {
                Ok(f) => f,
                // Never written: its bytes are zeros.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(buf),
                Err(e) => return Err(io_err(&path)(e)),
            };
            // Past the data file's end (a size set larger than what was written) reads zeros.
            let mut done = 0;
            while done < buf.len() {
                let n = f
                    .read_at(&mut buf[done..], offset + done as u64)
                    .map_err(io_err(&path))?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            Ok(buf)
        })
        .await?;
        Ok((Bytes::from(data), end >= e.size))
    }

    /// Writes at `offset`, growing the file; `sync`: durable before returning.
    pub async fn write(
        &self,
        id: u32,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<Entry, FilesError> {
        let e = self.get(id).ok_or(FilesError::NotFound)?;
        if e.kind == Kind::Dir {
            return Err(FilesError::IsDir);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= MAX_FILE)
            .ok_or(FilesError::TooBig)?;
        let path = self.data_path(id);
        let bytes = data.to_vec();
        blocking(move || {
            let f = open_data(&path)?;
            f.write_all_at(&bytes, offset).map_err(io_err(&path))?;
            if sync {
                f.sync_data().map_err(io_err(&path))?;
            }
            Ok(())
        })
        .await?;
        if end > e.size {
            return self
                .change(|t| {
                    let mut e = t.entries.get(&id).ok_or(FilesError::NotFound)?.clone();
                    e.size = e.size.max(end);
                    e.mtime = jiff::Timestamp::now();
                    e.ctime = None;
                    Ok((e.clone(), vec![Op::Put { id, entry: e }]))
                })
                .await;
        }
        Ok(e)
    }

    /// Makes every file's data durable.
    pub async fn commit_all(&self) -> Result<(), FilesError> {
        let ids: Vec<u32> = {
            let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            t.entries
                .iter()
                .filter(|(_, e)| e.kind == Kind::File)
                .map(|(id, _)| *id)
                .collect()
        };
        for id in ids {
            self.commit(id).await?;
        }
        Ok(())
    }

    /// Makes a file's data durable.
    pub async fn commit(&self, id: u32) -> Result<(), FilesError> {
        let path = self.data_path(id);
        if self.get(id).is_none_or(|e| e.kind == Kind::Dir) {
            return Ok(());
        }
        blocking(move || match File::open(&path) {
            Ok(f) => f.sync_data().map_err(io_err(&path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path)(e)),
        })
        .await
    }
}

/// A regular file's data file, made if it does not exist yet; a new one's name is made
/// durable at once (a later COMMIT syncs only the file's data).
fn open_data(path: &Path) -> Result<File, FilesError> {
    let (f, made) = durable::open_or_create(path).map_err(io_err(path))?;
    if made {
        let dir = path.parent().unwrap_or(Path::new("."));
        durable::fsync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(f)
}

fn save_table(dir: &Path, t: &Table) -> Result<(), FilesError> {
    let bytes = serde_json::to_vec(t).map_err(|e| FilesError::Io {
        path: SNAPSHOT.into(),
        source: io::Error::other(e),
    })?;
    save_bytes(dir, &bytes)
}

fn save_bytes(dir: &Path, bytes: &[u8]) -> Result<(), FilesError> {
    let path = dir.join(SNAPSHOT);
    durable::replace(&path, bytes).map_err(io_err(&path))
}

/// Opens (or makes) the journal and replays it onto `t`. A last line torn by a crash (not
/// ended, or not a record) is cut off; a bad line before the last is damage, and an error.
/// Returns the file and its length.
fn open_journal(dir: &Path, t: &mut Table) -> Result<(File, u64), FilesError> {
    let path = dir.join(JOURNAL);
    let (file, made) = durable::open_or_create(&path).map_err(io_err(&path))?;
    if made {
        durable::fsync_dir(dir).map_err(io_err(dir))?;
    }
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    let mut good = 0usize;
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            break; // torn: no end of line
        };
        match serde_json::from_slice::<Op>(&rest[..end]) {
            Ok(op) => t.apply(op),
            Err(_) if end + 1 == rest.len() => break, // torn last line
            Err(e) => {
                return Err(FilesError::Io {
                    path: path.display().to_string(),
                    source: io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("line at byte {good} is not a change record: {e}"),
                    ),
                })
            }
        }
        good += end + 1;
        rest = &rest[end + 1..];
    }
    if good < bytes.len() {
        tracing::warn!(journal = %path.display(), kept = good, cut = bytes.len() - good, "a change torn by a crash (never acknowledged) is cut off the journal");
        file.set_len(good as u64)
            .and_then(|()| file.sync_data())
            .map_err(io_err(&path))?;
    }
    Ok((file, good as u64))
}

/// Appends `lines` to the journal at `at` and makes them durable. `torn`: the file may hold
/// bytes past `at` (a failed append's), cut off first. Returns the outcome, and whether the
/// file may now hold bytes past `at`.
fn append(
    file: &Mutex<File>,
    path: &Path,
    at: u64,
    lines: &[u8],
    torn: bool,
) -> (Result<(), FilesError>, bool) {
    let f = file.lock().unwrap_or_else(|p| p.into_inner());
    if torn {
        if let Err(e) = f.set_len(at) {
            return (Err(io_err(path)(e)), true);
        }
    }
    let written = f.write_all_at(lines, at).and_then(|()| f.sync_data());
    if let Err(e) = written {
        // Leave no part of the change behind: a later append starts where this one did, and
        // cuts the file there first if it cannot be cut now.
        let torn = f.set_len(at).is_err();
        return (Err(io_err(path)(e)), torn);
    }
    (Ok(()), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Creates per second with 10 and with 10,000 entries in the folder (issue 15, item 4).
    /// On demand: `cargo test --release --lib creates_per_second -- --ignored --nocapture`
    /// (the folder under $BENCH_DIR, default the system's temporary folder).
    #[tokio::test(flavor = "multi_thread")]
    #[ignore]
    async fn creates_per_second() {
        let base = std::env::var_os("BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let t = tempfile::tempdir_in(base).unwrap();
        let f = FolderFiles::open(&t.path().join("m"), "x.vmx", 1, b"x").unwrap();
        let rate = |n: usize, s: std::time::Duration| n as f64 / s.as_secs_f64();
        for i in 0..9 {
            f.create(0, &format!("warm-{i}"), true).await.unwrap();
        }
        let t0 = std::time::Instant::now();
        for i in 0..100 {
            f.create(0, &format!("small-{i}.log"), true).await.unwrap();
            f.remove(0, format!("small-{i}.log").as_bytes(), false)
                .await
                .unwrap();
        }
        let small = rate(100, t0.elapsed() / 2);
        for i in 0..(MAX_ENTRIES - 11) {
            f.create(0, &format!("file-{i:05}.log"), true)
                .await
                .unwrap();
        }
        let t0 = std::time::Instant::now();
        for i in 0..100 {
            f.create(0, &format!("big-{i}.log"), true).await.unwrap();
            f.remove(0, format!("big-{i}.log").as_bytes(), false)
                .await
                .unwrap();
        }
        let big = rate(100, t0.elapsed() / 2);
        eprintln!(
            "creates per second (each followed by a remove, both durable): {small:.0} with 10 \
             entries, {big:.0} with {} entries",
            MAX_ENTRIES - 1
        );
    }

    /// A namespace written before owners and times were kept reads as root's, with atime and
    /// ctime equal to mtime; an entry nobody changed is written as before (older versions,
    /// which refuse unknown fields, still read it).
    #[test]
    fn entries_written_before_owners_were_kept_read_as_roots() {
        let old = r#"{"name":"x.vmx","parent":0,"kind":"file","mode":420,"mtime":"2024-01-02T03:04:05Z","size":3}"#;
        let e: Entry = serde_json::from_str(old).unwrap();
        assert_eq!(
            (e.uid, e.gid, e.atime(), e.ctime()),
            (0, 0, e.mtime, e.mtime)
        );
        assert_eq!(serde_json::to_string(&e).unwrap(), old);
        let mut set = e.clone();
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        set.apply(
            &SetAttr {
                uid: Some(7),
                mode: Some(0o100_600),
                ..SetAttr::default()
            },
            now,
        );
        assert_eq!(
            (set.uid, set.mode, set.ctime(), set.mtime),
            (7, 0o600, now, e.mtime)
        );
    }

    #[tokio::test]
    async fn new_folder_files_are_durable_by_name() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("m");
        let f = FolderFiles::open(&dir, "x.vmx", 1, b"x").unwrap();
        let files = dir.join("files");
        assert_eq!(
            durable::synced_under(t.path()),
            [
                t.path().to_path_buf(),
                dir.clone(),
                files.join("1"),
                files.clone(),
                dir.join("files.json"),
                dir.clone(),
                // The journal, made empty.
                dir.clone()
            ]
        );
        // A file's data file is made at its first write; its name is durable at once, so
        // that a COMMIT (which syncs its data) keeps it.
        let id = f.create(0, "x.nvram", true).await.unwrap();
        let before = durable::synced_under(&files).len();
        f.write(id, 0, b"nvram", false).await.unwrap();
        assert_eq!(durable::synced_under(&files).len(), before + 1);
        f.write(id, 5, b"!", false).await.unwrap();
        assert_eq!(durable::synced_under(&files).len(), before + 1);
    }

    #[tokio::test]
    async fn a_fold_that_fails_leaves_no_temporary_file_and_loses_no_change() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("m");
        let f = FolderFiles::open(&dir, "x.vmx", 1, b"x").unwrap();
        // files.json cannot be replaced: a folder that is not empty took its name.
        fs::remove_file(dir.join("files.json")).unwrap();
        fs::create_dir_all(dir.join("files.json/blocked")).unwrap();
        // Enough changes to fold the journal: each is acknowledged (the journal has it).
        let mut n = 0;
        while fs::metadata(dir.join(JOURNAL)).unwrap().len() < COMPACT_AT + 4096 {
            f.create(0, &format!("f{n}"), true).await.unwrap();
            n += 1;
        }
        assert_eq!(
            durable::sorted_names(&dir),
            ["files", "files.journal", "files.json"]
        );
        // Once the snapshot can be written again, a reopen after the next fold has them all.
        fs::remove_dir_all(dir.join("files.json")).unwrap();
        fs::write(
            dir.join("files.json"),
            b"{\"next\":1073741824,\"entries\":{}}",
        )
        .unwrap();
        drop(f);
        let f = FolderFiles::open(&dir, "x.vmx", 1, b"x").unwrap();
        for i in 0..n {
            assert!(f.lookup(0, format!("f{i}").as_bytes()).is_some(), "f{i}");
        }
    }

    #[tokio::test]
    async fn changes_are_journalled_folded_and_replayed_and_a_torn_last_line_is_cut() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("m");
        let f = FolderFiles::open(&dir, "x.vmx", 1, b"x").unwrap();
        let a = f.create(0, "a.log", true).await.unwrap();
        let d = f.mkdir(0, "sub").await.unwrap();
        f.create(d, "b.log", true).await.unwrap();
        f.rename(0, b"a.log", d, "c.log").await.unwrap();
        f.setattr(a, SetAttr::size(4096)).await.unwrap();
        // Small changes: the journal has them, the snapshot does not yet.
        assert!(fs::metadata(dir.join(JOURNAL)).unwrap().len() < 2048);
        let snapshot = fs::read_to_string(dir.join(SNAPSHOT)).unwrap();
        assert!(!snapshot.contains("c.log"));
        // A crash halfway through the next append: a torn line, never acknowledged.
        let mut j = fs::OpenOptions::new()
            .append(true)
            .open(dir.join(JOURNAL))
            .unwrap();
        j.write_all(b"{\"put\":{\"id\":99,\"entr").unwrap();
        drop((j, f));
        let f = FolderFiles::open(&dir, "x.vmx", 1, b"x").unwrap();
        assert_eq!(f.lookup(d, b"c.log"), Some(a));
        assert_eq!(f.get(a).unwrap().size, 4096);
        assert_eq!(f.lookup(0, b"a.log"), None);
        assert_eq!(f.list(d).len(), 2);
        assert!(f.get(99).is_none());
        // The torn line is gone: the next change appends after the last good one.
        f.create(0, "e.log", true).await.unwrap();
        drop(f);
        let f = FolderFiles::open(&dir, "x.vmx", 1, b"x").unwrap();
        assert!(f.lookup(0, b"e.log").is_some());
        // Enough changes fold the journal into the snapshot.
        for i in 0..3000 {
            f.create(0, &format!("n{i}"), true).await.unwrap();
        }
        assert!(fs::metadata(dir.join(JOURNAL)).unwrap().len() < COMPACT_AT);
        drop(f);
        let f = FolderFiles::open(&dir, "x.vmx", 1, b"x").unwrap();
        assert!(f.lookup(0, b"n2999").is_some());
        assert_eq!(f.list(0).len(), 3000 + 3);
        // A damaged line before the last is an error that names the journal, not a guess.
        drop(f);
        let mut bytes = fs::read(dir.join(JOURNAL)).unwrap();
        bytes.splice(0..0, b"garbage\n".iter().copied());
        fs::write(dir.join(JOURNAL), &bytes).unwrap();
        let err = FolderFiles::open(&dir, "x.vmx", 1, b"x").unwrap_err();
        assert!(err.to_string().contains("files.journal"), "{err}");
    }

    #[tokio::test]
    async fn concurrent_creates_of_one_name_make_one_entry() {
        let t = tempfile::tempdir().unwrap();
        let f = std::sync::Arc::new(FolderFiles::open(t.path(), "x.vmx", 1, b"x").unwrap());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let f = f.clone();
                tokio::spawn(async move { f.create(0, "vmware.log", false).await.unwrap() })
            })
            .collect();
        let mut ids = std::collections::HashSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap());
        }
        assert_eq!(ids.len(), 1, "one file, whoever won");
        assert_eq!(f.list(0).len(), 2);
        // Never written: reads as empty, then as zeros once sized.
        let id = *ids.iter().next().unwrap();
        assert_eq!(f.read(id, 0, 10).await.unwrap().0.len(), 0);
        f.setattr(id, SetAttr::size(5)).await.unwrap();
        assert_eq!(&f.read(id, 0, 10).await.unwrap().0[..], &[0u8; 5]);
    }

    #[tokio::test]
    async fn esxi_config_edit_lock_files_and_swap_survive_reopening() {
        let t = tempfile::tempdir().unwrap();
        let f = FolderFiles::open(t.path(), "web01.vmx", 1, b"displayName = \"web01\"\n").unwrap();
        // A config edit: write x.vmx~, rename it over x.vmx.
        let tilde = f.create(0, "web01.vmx~", true).await.unwrap();
        f.write(tilde, 0, b"displayName = \"edited\"\n", false)
            .await
            .unwrap();
        f.commit(tilde).await.unwrap();
        f.rename(0, b"web01.vmx~", 0, "web01.vmx").await.unwrap();
        // A lock folder and file, a swap file sized by SETATTR.
        let lck = f.mkdir(0, ".lck-0000000000000011").await.unwrap();
        f.create(lck, "lock", true).await.unwrap();
        let swap = f.create(0, "web01-1a2b.vswp", true).await.unwrap();
        f.setattr(swap, SetAttr::size(256 << 20)).await.unwrap();
        assert!(matches!(
            f.create(0, "web01-1a2b.vswp", true).await,
            Err(FilesError::Exists)
        ));
        assert!(matches!(
            f.remove(0, b".lck-0000000000000011", true).await,
            Err(FilesError::NotEmpty)
        ));
        drop(f);

        let f = FolderFiles::open(t.path(), "web01.vmx", 1, b"ignored once created").unwrap();
        let names: Vec<String> = f.list(0).into_iter().map(|(_, e)| e.name).collect();
        assert_eq!(
            names,
            ["web01.vmx", ".lck-0000000000000011", "web01-1a2b.vswp"]
        );
        let vmx = f.lookup(0, b"web01.vmx").unwrap();
        assert_eq!(vmx, tilde, "the renamed file took the name");
        let (data, eof) = f.read(vmx, 0, 100).await.unwrap();
        assert_eq!(&data[..], b"displayName = \"edited\"\n");
        assert!(eof);
        let swap = f.lookup(0, b"web01-1a2b.vswp").unwrap();
        assert_eq!(f.get(swap).unwrap().size, 256 << 20);
        let (zeros, _) = f.read(swap, (256 << 20) - 10, 100).await.unwrap();
        assert_eq!(&zeros[..], &[0u8; 10]);
        assert!(matches!(
            f.setattr(swap, SetAttr::size(MAX_FILE + 1)).await,
            Err(FilesError::TooBig)
        ));
    }
}
