//! Files and folders a hypervisor makes in a mount's folder: lock files (`.lck-*`), the swap
//! file (`.vswp`, created by setting its size), `vmware.log`, `.nvram`, config edits
//! (`x.vmx~` renamed over `x.vmx`). The mount's config is one of them from the start, so it can
//! be edited, replaced or removed like any other.
//!
//! Owns: a small namespace (`files.json`: name, parent, kind, file id, mode, times) and one data
//! file per regular file (`files/ID`), both in the mount's overlay folder.
//! Must not: touch the backup's disks or descriptors; the caller refuses changes to those.
//!
//! Ordering: a namespace change is durable ([`durable::replace`] of `files.json`) before it is
//! acknowledged. File data follows NFS: UNSTABLE writes are durable at COMMIT, FILE_SYNC ones
//! before the reply; a data file's name is durable (its folder fsynced) as soon as it is made. The namespace is guarded by a std mutex held only for in-memory changes;
//! the JSON is written under an async mutex so that saves are serialised and never torn.

use std::collections::BTreeMap;
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
    pub mtime: jiff::Timestamp,
    /// Logical size of a regular file (its data file may be sparse).
    pub size: u64,
    /// The verifier of the exclusive create that made it, so that a resent create succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verf: Option<[u8; 8]>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    next: u32,
    entries: BTreeMap<u32, Entry>,
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
    save: tokio::sync::Mutex<()>,
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
        let path = dir.join("files.json");
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
                    entries: BTreeMap::new(),
                };
                t.entries.insert(
                    config_id,
                    Entry {
                        name: config_name.to_string(),
                        parent: 0,
                        kind: Kind::File,
                        mode: 0o644,
                        mtime: jiff::Timestamp::now(),
                        size: config.len() as u64,
                        verf: None,
                    },
                );
                save_table(dir, &t)?;
                t
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(FolderFiles {
            dir: dir.to_path_buf(),
            table: Mutex::new(table),
            save: tokio::sync::Mutex::new(()),
        })
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
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.entries
            .iter()
            .find(|(_, e)| e.parent == parent && e.name.as_bytes() == name)
            .map(|(id, _)| *id)
    }

    /// Entries of a folder (0: the mount's folder), in id order.
    pub fn list(&self, parent: u32) -> Vec<(u32, Entry)> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.entries
            .iter()
            .filter(|(_, e)| e.parent == parent)
            .map(|(id, e)| (*id, e.clone()))
            .collect()
    }

    /// Applies a change to the table and makes it durable before returning.
    async fn change<T>(
        &self,
        f: impl FnOnce(&mut Table) -> Result<T, FilesError>,
    ) -> Result<T, FilesError> {
        let _serial = self.save.lock().await;
        let (out, snapshot) = {
            let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
            let out = f(&mut t)?;
            (
                out,
                serde_json::to_vec_pretty(&*t).map_err(|e| FilesError::Io {
                    path: "files.json".into(),
                    source: io::Error::other(e),
                })?,
            )
        };
        let dir = self.dir.clone();
        blocking(move || save_bytes(&dir, &snapshot)).await?;
        Ok(out)
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
            let existing = t
                .entries
                .iter()
                .find(|(_, e)| e.parent == parent && e.name == name);
            if let Some((id, e)) = existing {
                if verf.is_some() && e.verf == verf && e.kind == kind {
                    return Ok(*id);
                }
                return if exclusive || e.kind != kind || kind == Kind::Dir {
                    Err(FilesError::Exists)
                } else {
                    Ok(*id)
                };
            }
            if t.entries.len() >= MAX_ENTRIES {
                return Err(FilesError::Full);
            }
            let id = t.next;
            t.next += 1;
            let (mode, size) = match kind {
                Kind::File => (0o644, 0),
                Kind::Dir => (0o755, 4096),
            };
            t.entries.insert(
                id,
                Entry {
                    name: name.to_string(),
                    parent,
                    kind,
                    mode,
                    mtime: jiff::Timestamp::now(),
                    size,
                    verf,
                },
            );
            Ok(id)
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
                (Kind::Dir, true) if t.entries.values().any(|c| c.parent == id) => {
                    return Err(FilesError::NotEmpty)
                }
                _ => {}
            }
            t.entries.remove(&id);
            Ok(())
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
            if let Some(r) = replaced {
                let rk = t.entries.get(&r).map(|e| e.kind);
                match (kind, rk) {
                    (Kind::File, Some(Kind::Dir)) => return Err(FilesError::IsDir),
                    (Kind::Dir, Some(Kind::File)) => return Err(FilesError::NotDir),
                    (Kind::Dir, Some(Kind::Dir)) if t.entries.values().any(|c| c.parent == r) => {
                        return Err(FilesError::NotEmpty)
                    }
                    _ => {}
                }
                t.entries.remove(&r);
            }
            // A folder may not move into itself or below itself.
            let mut p = to_parent;
            while p != 0 {
                if p == id {
                    return Err(FilesError::NotDir);
                }
                p = t.entries.get(&p).map(|e| e.parent).unwrap_or(0);
            }
            let e = t.entries.get_mut(&id).ok_or(FilesError::NotFound)?;
            e.parent = to_parent;
            e.name = to.to_string();
            e.mtime = jiff::Timestamp::now();
            Ok(())
        })
        .await?;
        if let Some(r) = replaced {
            let _ = fs::remove_file(self.data_path(r));
        }
        Ok(())
    }

    /// Sets a regular file's size (growing is sparse) and/or mode.
    pub async fn setattr(
        &self,
        id: u32,
        size: Option<u64>,
        mode: Option<u32>,
    ) -> Result<Entry, FilesError> {
        if let Some(s) = size {
            if s > MAX_FILE {
                return Err(FilesError::TooBig);
            }
            if self.get(id).is_some_and(|e| e.kind == Kind::Dir) {
                return Err(FilesError::IsDir);
            }
            let path = self.data_path(id);
            blocking(move || {
                let f = open_data(&path)?;
                f.set_len(s).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))
            })
            .await?;
        }
        self.change(|t| {
            let e = t.entries.get_mut(&id).ok_or(FilesError::NotFound)?;
            if let Some(s) = size {
                e.size = s;
            }
            if let Some(m) = mode {
                e.mode = m & 0o7777;
            }
            e.mtime = jiff::Timestamp::now();
            Ok(e.clone())
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
                    let e = t.entries.get_mut(&id).ok_or(FilesError::NotFound)?;
                    e.size = e.size.max(end);
                    e.mtime = jiff::Timestamp::now();
                    Ok(e.clone())
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
    let bytes = serde_json::to_vec_pretty(t).map_err(|e| FilesError::Io {
        path: "files.json".into(),
        source: io::Error::other(e),
    })?;
    save_bytes(dir, &bytes)
}

fn save_bytes(dir: &Path, bytes: &[u8]) -> Result<(), FilesError> {
    let path = dir.join("files.json");
    durable::replace(&path, bytes).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    async fn a_save_that_fails_leaves_no_temporary_file() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("m");
        let f = FolderFiles::open(&dir, "x.vmx", 1, b"x").unwrap();
        // files.json cannot be replaced: a folder that is not empty took its name.
        fs::remove_file(dir.join("files.json")).unwrap();
        fs::create_dir_all(dir.join("files.json/blocked")).unwrap();
        assert!(f.create(0, "vmware.log", false).await.is_err());
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["files", "files.json"]);
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
        f.setattr(id, Some(5), None).await.unwrap();
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
        f.setattr(swap, Some(256 << 20), None).await.unwrap();
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
            f.setattr(swap, Some(MAX_FILE + 1), None).await,
            Err(FilesError::TooBig)
        ));
    }
}
