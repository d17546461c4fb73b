//! The datastore as every protocol sees it, in no protocol's terms: the namespace over the
//! agent's live mounts, the rules per kind of node, and every operation on it.
//!
//! Owns: what a file id names ([`Node`]: the root, a mount's folder, a file of the backup, a
//! file or folder the hypervisor made), resolved once per request and passed down; the rules
//! per kind (what is read-only, what may be resized, renamed or removed, which host may use a
//! mount); name checks (`names.rs`: one component, [`MAX_NAME`], `.` and `..`); attributes and
//! folder listings in neutral form; reads and writes with their metrics and their log line when
//! they fail; a mount's disks by name for block protocols (`disk.rs`); the errors of all this
//! ([`DatastoreError`], `error.rs`), into which the errors of the parts below are converted.
//! Must not: know any protocol (no XDR, no `nfsstat3`, no handles: each adapter maps
//! [`DatastoreError`] to its own codes in one place), touch chunks or the repository (reads go
//! through `mount`), or hold a lock across an await. Limits on what one request may ask (the
//! size of a read) are the adapter's: it knows its protocol's.
//!
//! The namespace: the root (file id 1) holds one folder per mount (`mount_id << 32`), each
//! holding the backup's files (`mount_id << 32 | n`, from 1 or 2) and the files and folders of
//! the mount's folder (`mount_id << 32 | id`, `mount/files.rs`, which also keeps its limit of
//! entries). `.` and `..` resolve inside the datastore and never leave it.

mod access;
mod disk;
mod error;
mod names;
mod node;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use crate::agent::Agent;
use crate::metrics::Metrics;
use crate::mount::files::{FolderFiles, Kind};
use crate::mount::{LiveMount, ROOT_FILEID};
use crate::repo::Pieces;

pub use crate::mount::files::{SetAttr, SetTime};
pub use access::{permits, Who, EXEC, MAX_GROUPS, NOBODY, READ, WRITE};
pub use disk::Disk;
pub use error::DatastoreError;
pub use names::MAX_NAME;
pub use node::{Attr, FileKind, Node, Rights};

use names::{check_name, existing_name, new_name};

/// The most folders below a mount's folder that a mount path may name.
pub const MAX_MOUNT_DEPTH: usize = 64;

/// How a create treats a name that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// Use the existing file.
    Unchecked,
    /// Fail with [`DatastoreError::Exists`].
    Guarded,
    /// Fail with [`DatastoreError::Exists`] unless the file was made by a create with this
    /// verifier (a client resending after a lost reply).
    Exclusive([u8; 8]),
}

/// One entry of a folder listing; its node, for a listing that gives attributes too.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub fileid: u64,
    pub name: Vec<u8>,
    pub node: Node,
}

/// The datastore over one agent's mounts. Cheap to clone.
#[derive(Clone)]
pub struct DatastoreCore {
    agent: Arc<Agent>,
}

/// A folder that may change: the mount (read-write), the folder's low id (0: the mount's
/// folder) and the mount's folder files.
struct Changeable<'a> {
    mount: &'a Arc<LiveMount>,
    low: u32,
    folder: Arc<FolderFiles>,
}

/// The file a read or write went to, for its error's metric and log line.
enum FileName<'a> {
    /// A disk of the backup (named by the backup's config).
    Disk(&'a str),
    /// A file of the mount's folder (named by a client).
    Folder(&'a str),
}

impl FileName<'_> {
    fn disk(&self) -> Option<&str> {
        match self {
            FileName::Disk(n) => Some(n),
            FileName::Folder(_) => None,
        }
    }

    fn text(&self) -> &str {
        match self {
            FileName::Disk(n) | FileName::Folder(n) => n,
        }
    }
}

impl DatastoreCore {
    pub fn new(agent: Arc<Agent>) -> Self {
        DatastoreCore { agent }
    }

    /// The export path (`/livemount`): the root's path for protocols that name one.
    pub fn export(&self) -> &str {
        self.agent.export()
    }

    /// The state directory, where every mount's writes land.
    pub fn state_dir(&self) -> &Path {
        self.agent.state_dir()
    }

    /// The repository's id: the same for every server of that repository's backups.
    pub fn repo_id(&self) -> &str {
        self.agent.repo().id()
    }

    /// The repository's chunk size in bytes: the unit reads and writes are best made in.
    pub fn chunk_size(&self) -> u32 {
        self.agent.repo().chunk_size().bytes()
    }

    /// The size of the largest file of the backups mounted now.
    pub fn largest_backup_file(&self) -> u64 {
        self.agent
            .mounts()
            .iter()
            .flat_map(|m| m.files.iter().map(|f| f.size()).collect::<Vec<_>>())
            .max()
            .unwrap_or(0)
    }

    /// What a file id names now: [`DatastoreError::Stale`] if nothing (its mount is gone, or
    /// its file removed).
    pub fn resolve(&self, fileid: u64) -> Result<Node, DatastoreError> {
        if fileid == ROOT_FILEID {
            return Ok(Node::Root);
        }
        let m = self.mount_of(fileid).ok_or(DatastoreError::Stale)?;
        node_in(m, fileid)
    }

    /// What a file id that a client kept names, for that client: the mount must be the one
    /// the id was handed out for ([`Node::generation`]; 0 for the root), else
    /// [`DatastoreError::Stale`], and must allow the client's host, else
    /// [`DatastoreError::HostNotAllowed`].
    pub fn resolve_held(
        &self,
        fileid: u64,
        generation: u64,
        host: IpAddr,
    ) -> Result<Node, DatastoreError> {
        if fileid == ROOT_FILEID {
            return match generation {
                0 => Ok(Node::Root),
                _ => Err(DatastoreError::Stale),
            };
        }
        let m = self.mount_of(fileid).ok_or(DatastoreError::Stale)?;
        if node::generation(&m) != generation {
            return Err(DatastoreError::Stale);
        }
        if !m.allows(host) {
            return Err(DatastoreError::HostNotAllowed);
        }
        node_in(m, fileid)
    }

    /// The node's attributes as resolved.
    pub fn attr(&self, node: &Node) -> Attr {
        node.attr(self.agent.started())
    }

    /// The node's attributes now (a folder file's entry read again: a change may have moved
    /// them since the node was resolved); none if it is gone.
    pub fn attr_now(&self, node: &Node) -> Option<Attr> {
        match node {
            Node::FolderFile(m, low, _) => {
                let e = m.folder.as_ref()?.get(*low)?;
                Some(node::entry_attr(m, *low, &e))
            }
            n => Some(self.attr(n)),
        }
    }

    /// The root (an empty path, `/`, or the export), a mount's folder (`EXPORT/NAME`) or a
    /// folder in it (`EXPORT/NAME/SUB/...`, as clients that mount a file's folder ask), as a
    /// client mounting part of the datastore names it. At most [`MAX_MOUNT_DEPTH`] components
    /// below the mount's folder are walked.
    pub fn mount_path(&self, path: &[u8], host: IpAddr) -> Result<Node, DatastoreError> {
        let export = self.agent.export().as_bytes();
        let rest = match path {
            b"" | b"/" => return Ok(Node::Root),
            p if p.strip_suffix(b"/").unwrap_or(p) == export => return Ok(Node::Root),
            p => p.strip_prefix(export).ok_or(DatastoreError::NotFound)?,
        };
        let rest = rest.strip_prefix(b"/").ok_or(DatastoreError::NotFound)?;
        let rest = rest.strip_suffix(b"/").unwrap_or(rest);
        let mut parts = rest.split(|b| *b == b'/');
        let name = parts.next().unwrap_or_default();
        check_name(name)?;
        let m = self
            .agent
            .mount_by_name(name)
            .ok_or(DatastoreError::NotFound)?;
        if !m.allows(host) {
            return Err(DatastoreError::HostNotAllowed);
        }
        let mut node = Node::MountFolder(m);
        for (depth, part) in parts.enumerate() {
            if depth >= MAX_MOUNT_DEPTH || matches!(part, b"." | b"..") {
                return Err(DatastoreError::NotFound);
            }
            node = self.lookup(&node, part, host)?;
        }
        match node.is_dir() {
            true => Ok(node),
            false => Err(DatastoreError::NotDir),
        }
    }

    /// The entry `name` of folder `dir`, if the client's host may use it.
    pub fn lookup(&self, dir: &Node, name: &[u8], host: IpAddr) -> Result<Node, DatastoreError> {
        check_name(name)?;
        let found = match dir {
            Node::Root => match name {
                b"." | b".." => Node::Root,
                n => Node::MountFolder(
                    self.agent
                        .mount_by_name(n)
                        .ok_or(DatastoreError::NotFound)?,
                ),
            },
            Node::MountFolder(m) => match name {
                b"." => dir.clone(),
                b".." => Node::Root,
                n => match m.files.iter().position(|f| f.name.as_bytes() == n) {
                    Some(i) => Node::BackupFile(m.clone(), i),
                    None => folder_child(m, 0, n)?,
                },
            },
            Node::FolderFile(m, low, e) if e.kind == Kind::Dir => match name {
                b"." => dir.clone(),
                b".." if e.parent == 0 => Node::MountFolder(m.clone()),
                b".." => folder_node(m, e.parent).ok_or(DatastoreError::Stale)?,
                n => folder_child(m, *low, n)?,
            },
            _ => return Err(DatastoreError::NotDir),
        };
        if !found.allows(host) {
            return Err(DatastoreError::HostNotAllowed);
        }
        Ok(found)
    }

    /// The entries of folder `dir` after `cookie` (a file id; 0: from the start), in file id
    /// order, at most `limit` of them, less those the client's host may not use. An entry's
    /// file id is its cookie, so a listing resumes at the right place across restarts and
    /// while other entries come and go. A page costs what it holds, not the folder's size.
    pub fn readdir(
        &self,
        dir: &Node,
        cookie: u64,
        limit: usize,
        host: IpAddr,
    ) -> Result<Vec<DirEntry>, DatastoreError> {
        let (m, parent) = match dir {
            Node::Root => {
                let mut out: Vec<DirEntry> = self
                    .agent
                    .mounts()
                    .into_iter()
                    .filter(|m| m.folder_fileid() > cookie)
                    .map(|m| DirEntry {
                        fileid: m.folder_fileid(),
                        name: m.spec.name.as_bytes().to_vec(),
                        node: Node::MountFolder(m),
                    })
                    .collect();
                out.sort_unstable_by_key(|e| e.fileid);
                // The root lists only the mounts this client may use.
                out.retain(|e| e.node.allows(host));
                return Ok(out);
            }
            Node::MountFolder(m) => (m, 0),
            Node::FolderFile(m, low, e) if e.kind == Kind::Dir => (m, *low),
            _ => return Err(DatastoreError::NotDir),
        };
        let mut out: Vec<DirEntry> = Vec::new();
        if parent == 0 {
            out.extend(
                m.files
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.fileid > cookie)
                    .map(|(i, f)| DirEntry {
                        fileid: f.fileid,
                        name: f.name.as_bytes().to_vec(),
                        node: Node::BackupFile(m.clone(), i),
                    }),
            );
        }
        if let Some(folder) = &m.folder {
            // Folder files' ids are the mount's id and a low part: resume after the cookie's.
            let base = m.folder_fileid();
            let after = match cookie.checked_sub(base) {
                Some(low) if low <= u64::from(u32::MAX) => low as u32,
                Some(_) => u32::MAX,
                None => 0,
            };
            for (low, e) in folder.list_after(parent, after, limit) {
                out.push(DirEntry {
                    fileid: base | u64::from(low),
                    name: e.name.as_bytes().to_vec(),
                    node: Node::FolderFile(m.clone(), low, e),
                });
            }
        }
        out.sort_unstable_by_key(|e| e.fileid);
        out.truncate(limit);
        out.retain(|e| e.node.allows(host));
        Ok(out)
    }

    /// Reads up to `count` bytes at `offset` (the caller bounds `count`); the flag says the
    /// read reached the end of the file. Counted per mount; a failed read is counted per disk
    /// and logged with mount, file and offset.
    pub async fn read(
        &self,
        node: &Node,
        offset: u64,
        count: u32,
    ) -> Result<(Bytes, bool), DatastoreError> {
        let (data, eof) = self.read_pieces(node, offset, count).await?;
        Ok((data.into_bytes(), eof))
    }

    /// [`DatastoreCore::read`], as the pieces the bytes were found in (for a protocol that
    /// writes them out without gathering them).
    pub async fn read_pieces(
        &self,
        node: &Node,
        offset: u64,
        count: u32,
    ) -> Result<(Pieces, bool), DatastoreError> {
        let metrics = self.agent.metrics();
        let (m, name, result) = match node {
            Node::Root | Node::MountFolder(_) => return Err(DatastoreError::IsDir),
            Node::FolderFile(_, _, e) if e.kind == Kind::Dir => return Err(DatastoreError::IsDir),
            Node::BackupFile(m, i) => {
                let f = &m.files[*i];
                let r = f.read_pieces(offset, count).await.map_err(failure);
                (m, FileName::Disk(&f.name), r)
            }
            Node::FolderFile(m, low, e) => {
                let folder = m.folder.as_ref().ok_or(DatastoreError::Stale)?;
                let r = folder
                    .read(*low, offset, count)
                    .await
                    .map(|(data, eof)| (Pieces::from(data), eof))
                    .map_err(failure);
                (m, FileName::Folder(&e.name), r)
            }
        };
        let label = Metrics::label(&m.spec.name);
        match result {
            Ok((data, eof)) => {
                metrics.reads.get_or_create(&label).inc();
                metrics
                    .read_bytes
                    .get_or_create(&label)
                    .inc_by(data.len() as u64);
                metrics.totals.on_read(data.len() as u64);
                Ok((data, eof))
            }
            Err((text, e)) => {
                metrics
                    .errors
                    .get_or_create(&Metrics::disk_label(&m.spec.name, name.disk()))
                    .inc();
                // Debug formatting: a name or message with a newline cannot forge log lines.
                tracing::error!(mount = %m.spec.name, file = ?name.text(), offset, count, error = ?text, "read failed");
                Err(e)
            }
        }
    }

    /// Writes `data` at `offset`; with `sync` the data is durable when this returns. Returns
    /// the attributes after the write. Counted and logged as reads are.
    pub async fn write(
        &self,
        node: &Node,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<Attr, DatastoreError> {
        let metrics = self.agent.metrics();
        let (m, name, result) = match node {
            Node::Root | Node::MountFolder(_) => return Err(DatastoreError::IsDir),
            Node::BackupFile(m, _) | Node::FolderFile(m, _, _) if m.spec.read_only => {
                return Err(DatastoreError::ReadOnlyMount)
            }
            Node::BackupFile(m, i) => {
                let f = &m.files[*i];
                let r = f
                    .write(offset, data, sync)
                    .await
                    .map(|()| self.attr(node))
                    .map_err(failure);
                (m, FileName::Disk(&f.name), r)
            }
            Node::FolderFile(m, low, e) => {
                let folder = m.folder.as_ref().ok_or(DatastoreError::ReadOnlyMount)?;
                let r = folder
                    .write(*low, offset, data, sync)
                    .await
                    .map(|entry| node::entry_attr(m, *low, &entry))
                    .map_err(failure);
                (m, FileName::Folder(&e.name), r)
            }
        };
        let label = Metrics::label(&m.spec.name);
        match result {
            Ok(attr) => {
                metrics.writes.get_or_create(&label).inc();
                metrics
                    .write_bytes
                    .get_or_create(&label)
                    .inc_by(data.len() as u64);
                Ok(attr)
            }
            Err((text, e)) => {
                metrics
                    .errors
                    .get_or_create(&Metrics::disk_label(&m.spec.name, name.disk()))
                    .inc();
                tracing::error!(mount = %m.spec.name, file = ?name.text(), offset, len = data.len(), error = ?text, "write failed");
                Err(e)
            }
        }
    }

    /// Makes a file's acknowledged writes durable (nothing to do for a folder).
    pub async fn commit(&self, node: &Node) -> Result<(), DatastoreError> {
        match node {
            Node::BackupFile(m, i) => m.files[*i].commit().await.map_err(|e| {
                tracing::error!(mount = %m.spec.name, file = ?m.files[*i].name, error = ?e.to_string(), "commit failed");
                e.into()
            }),
            Node::FolderFile(m, low, _) => match &m.folder {
                Some(f) => f.commit(*low).await.map_err(|e| {
                    tracing::error!(mount = %m.spec.name, error = %e, "commit failed");
                    e.into()
                }),
                None => Ok(()),
            },
            Node::Root | Node::MountFolder(_) => Ok(()),
        }
    }

    /// Whether `who` has the permissions `want` ([`READ`], [`WRITE`], [`EXEC`]) on `node` by
    /// its mode bits, owner and group as they are now: [`DatastoreError::Denied`] if not. A
    /// protocol that carries a caller asks this before a read, a write, or a change in a
    /// folder, so that it refuses what its access check answers it would.
    pub fn check(&self, node: &Node, who: &Who, want: u32) -> Result<(), DatastoreError> {
        let a = self.attr_now(node).ok_or(DatastoreError::Stale)?;
        match permits(&a, who, want) {
            true => Ok(()),
            false => Err(DatastoreError::Denied),
        }
    }

    /// Changes: the backup's disks take writes into their overlays and can never be removed,
    /// renamed or resized ([`DatastoreError::BackupFile`]); every other file and folder in a
    /// mount's folder (the config included) is the hypervisor's to create, write, resize,
    /// rename and remove. A read-only mount refuses every change
    /// ([`DatastoreError::ReadOnlyMount`]); the root and a disks-only mount keep nothing a
    /// client sets ([`DatastoreError::AttrsNotKept`]). Mode, owner, group and times are kept in the mount's
    /// namespace for every node of a read-write mount, the mount's folder and the backup's
    /// files too, as POSIX lets `who` set them ([`access::may_set`]). Setting nothing is never
    /// refused.
    pub async fn setattr(
        &self,
        node: &Node,
        who: &Who,
        s: SetAttr,
    ) -> Result<Attr, DatastoreError> {
        if s == SetAttr::default() {
            return Ok(self.attr(node));
        }
        match node {
            Node::Root => return Err(DatastoreError::AttrsNotKept),
            Node::MountFolder(m) | Node::BackupFile(m, _) | Node::FolderFile(m, _, _)
                if m.spec.read_only =>
            {
                return Err(DatastoreError::ReadOnlyMount)
            }
            _ => {}
        }
        let now = self.attr_now(node).ok_or(DatastoreError::Stale)?;
        access::may_set(&now, who, &s)?;
        match node {
            Node::Root => Err(DatastoreError::AttrsNotKept),
            Node::BackupFile(m, i) => {
                if s.size.is_some_and(|v| v != m.files[*i].size()) {
                    return Err(DatastoreError::BackupFile);
                }
                let low = (m.files[*i].fileid & 0xffff_ffff) as u32;
                self.set_meta(m, low, s).await?;
                Ok(self.attr(node))
            }
            Node::MountFolder(m) => {
                if s.size.is_some() {
                    return Err(DatastoreError::IsDir);
                }
                self.set_meta(m, 0, s).await?;
                Ok(self.attr(node))
            }
            Node::FolderFile(m, low, _) => {
                let folder = m.folder.as_ref().ok_or(DatastoreError::ReadOnlyMount)?;
                let e = folder.setattr(*low, s).await?;
                Ok(node::entry_attr(m, *low, &e))
            }
        }
    }

    /// Keeps what a client set on the mount's folder (`low` 0) or a file of the backup; the
    /// size is not among it (refused or unchanged).
    async fn set_meta(&self, m: &LiveMount, low: u32, s: SetAttr) -> Result<(), DatastoreError> {
        let s = SetAttr { size: None, ..s };
        if s == SetAttr::default() {
            return Ok(());
        }
        // A read-write mount without a folder is a disks-only one.
        let folder = m.folder.as_ref().ok_or(DatastoreError::AttrsNotKept)?;
        folder.set_meta(low, s).await?;
        Ok(())
    }

    /// Creates a regular file in folder `dir` and sets `attrs` on it (its owner and group among
    /// them: the caller's); returns its node. A create of a file that exists (UNCHECKED) sets
    /// only its size.
    pub async fn create(
        &self,
        dir: &Node,
        name: &[u8],
        mode: CreateMode,
        attrs: SetAttr,
    ) -> Result<Node, DatastoreError> {
        let (c, name) = place_for_new(dir, name)?;
        let existed = c.folder.lookup(c.low, name.as_bytes()).is_some();
        let made = match mode {
            CreateMode::Unchecked => c.folder.create(c.low, &name, false).await,
            CreateMode::Guarded => c.folder.create(c.low, &name, true).await,
            CreateMode::Exclusive(v) => c.folder.create_exclusive(c.low, &name, v).await,
        };
        let low = made?;
        let attrs = match existed {
            true => SetAttr {
                size: attrs.size,
                ..SetAttr::default()
            },
            false => unchanged_owner_dropped(attrs, c.folder.get(low)),
        };
        let entry = if attrs == SetAttr::default() {
            c.folder.get(low).ok_or(DatastoreError::Stale)?
        } else {
            c.folder.setattr(low, attrs).await?
        };
        Ok(Node::FolderFile(c.mount.clone(), low, entry))
    }

    /// Makes a folder in folder `dir` with `attrs` (mode, owner, group; a size is ignored);
    /// returns its node.
    pub async fn mkdir(
        &self,
        dir: &Node,
        name: &[u8],
        attrs: SetAttr,
    ) -> Result<Node, DatastoreError> {
        let (c, name) = place_for_new(dir, name)?;
        let low = c.folder.mkdir(c.low, &name).await?;
        let attrs = unchanged_owner_dropped(
            SetAttr {
                size: None,
                ..attrs
            },
            c.folder.get(low),
        );
        if attrs != SetAttr::default() {
            c.folder.setattr(low, attrs).await?;
        }
        folder_node(c.mount, low).ok_or(DatastoreError::Stale)
    }

    /// The refusal of what this datastore does not make (symbolic links, device files, hard
    /// links) in folder `dir`: the error a change there gets, else `NotSupported`.
    pub fn refuse_special(&self, dir: &Node) -> DatastoreError {
        match changeable(dir) {
            Ok(_) => DatastoreError::NotSupported,
            Err(e) => e,
        }
    }

    /// Removes the file (`rmdir` false) or the empty folder (`rmdir` true) `name` of `dir`.
    pub async fn remove(&self, dir: &Node, name: &[u8], rmdir: bool) -> Result<(), DatastoreError> {
        let c = changeable(dir)?;
        let name = existing_name(name)?;
        if c.low == 0 && c.mount.file_by_name(name).is_some() {
            return Err(DatastoreError::BackupFile);
        }
        Ok(c.folder.remove(c.low, name, rmdir).await?)
    }

    /// Renames `from` in `from_dir` to `to` in `to_dir`, within one mount's folder.
    pub async fn rename(
        &self,
        from_dir: &Node,
        from: &[u8],
        to_dir: &Node,
        to: &[u8],
    ) -> Result<(), DatastoreError> {
        let c1 = changeable(from_dir)?;
        let c2 = changeable(to_dir)?;
        if c1.mount.spec.id != c2.mount.spec.id {
            return Err(DatastoreError::CrossMount);
        }
        let from = existing_name(from)?;
        let to = new_name(to)?;
        let m = c1.mount;
        if (c1.low == 0 && m.file_by_name(from).is_some())
            || (c2.low == 0 && m.file_by_name(to.as_bytes()).is_some())
        {
            return Err(DatastoreError::BackupFile);
        }
        Ok(c1.folder.rename(c1.low, from, c2.low, &to).await?)
    }

    fn mount_of(&self, fileid: u64) -> Option<Arc<LiveMount>> {
        self.agent.mount_by_id(u32::try_from(fileid >> 32).ok()?)
    }
}

/// `attrs` less an owner and group a new entry already has (root's, for a hypervisor): a create
/// by root then costs one durable change, not two.
fn unchanged_owner_dropped(attrs: SetAttr, entry: Option<crate::mount::files::Entry>) -> SetAttr {
    let Some(e) = entry else {
        return attrs;
    };
    SetAttr {
        uid: attrs.uid.filter(|u| *u != e.uid),
        gid: attrs.gid.filter(|g| *g != e.gid),
        ..attrs
    }
}

/// A failure below, as its text (for the log line) and the datastore's error.
fn failure<E: std::fmt::Display + Into<DatastoreError>>(e: E) -> (String, DatastoreError) {
    (e.to_string(), e.into())
}

/// What `fileid` names in mount `m`.
fn node_in(m: Arc<LiveMount>, fileid: u64) -> Result<Node, DatastoreError> {
    let low = (fileid & 0xffff_ffff) as u32;
    if low == 0 {
        return Ok(Node::MountFolder(m));
    }
    if let Some(i) = m.files.iter().position(|f| f.fileid == fileid) {
        return Ok(Node::BackupFile(m, i));
    }
    folder_node(&m, low).ok_or(DatastoreError::Stale)
}

/// The folder file `low` of mount `m`, if it exists.
fn folder_node(m: &Arc<LiveMount>, low: u32) -> Option<Node> {
    let e = m.folder.as_ref()?.get(low)?;
    Some(Node::FolderFile(m.clone(), low, e))
}

/// The folder file `name` in folder `parent` (0: the mount's folder) of mount `m`.
fn folder_child(m: &Arc<LiveMount>, parent: u32, name: &[u8]) -> Result<Node, DatastoreError> {
    m.folder
        .as_ref()
        .and_then(|f| f.lookup(parent, name))
        .and_then(|low| folder_node(m, low))
        .ok_or(DatastoreError::NotFound)
}

/// A folder that may change: a folder of a read-write mount.
fn changeable(dir: &Node) -> Result<Changeable<'_>, DatastoreError> {
    let (mount, low) = match dir {
        Node::Root => return Err(DatastoreError::Root),
        Node::MountFolder(m) => (m, 0),
        Node::FolderFile(m, low, e) if e.kind == Kind::Dir => (m, *low),
        _ => return Err(DatastoreError::NotDir),
    };
    if mount.spec.read_only {
        return Err(DatastoreError::ReadOnlyMount);
    }
    let folder = mount.folder.clone().ok_or(DatastoreError::ReadOnlyMount)?;
    Ok(Changeable { mount, low, folder })
}

/// Where a new file or folder named `name` goes in `dir`: refused on a read-only mount, for a
/// bad name, or for a name the backup's files already have.
fn place_for_new<'a>(
    dir: &'a Node,
    name: &[u8],
) -> Result<(Changeable<'a>, String), DatastoreError> {
    let c = changeable(dir)?;
    let name = new_name(name)?;
    if c.low == 0 && c.mount.file_by_name(name.as_bytes()).is_some() {
        return Err(DatastoreError::Exists);
    }
    Ok((c, name))
}
