//! The datastore as NFSv3 sees it, over the agent's live mounts: what each file id names, its
//! attributes, and every operation, in NFS terms (file ids in, `nfsstat3` out).
//!
//! Owns: the namespace (root folder -> one folder per mount -> the mount's files), handles
//! (through [`Identity`]), attributes, reads, writes, folder changes, and which calls are
//! refused. Names are single components: `/`, NUL, empty and over-long names are refused; `.`
//! and `..` resolve within the datastore and can never leave it.
//! Must not: touch chunks or the repository directly (reads go through `mount`), know about XDR
//! (`dispatch` does), or hold a lock across an await.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use nfs3_types::nfs3::{fattr3, fileid3, ftype3, nfsstat3, nfstime3, specdata3};

use super::handle::{Identity, HANDLE_LEN};

use crate::agent::Agent;
use crate::metrics::Metrics;
use crate::mount::files::{Entry, FolderFiles, Kind};
use crate::mount::{LiveMount, MountFile, ROOT_FILEID};

/// Longest name accepted in LOOKUP (NAME_MAX of common file systems).
pub const MAX_NAME: usize = 255;
/// Largest READ and WRITE the server offers (FSINFO rtmax/wtmax).
pub const MAX_IO: u32 = 1024 * 1024;

/// The datastore file system.
pub struct DatastoreFs {
    agent: Arc<Agent>,
    fsid: u64,
    allow_auth_none: bool,
    identity: Identity,
}

impl DatastoreFs {
    pub fn new(agent: Arc<Agent>, allow_auth_none: bool, identity: Identity) -> Self {
        let id = agent.repo().id().as_bytes();
        let mut b = [0u8; 8];
        for (i, c) in id.iter().enumerate() {
            b[i % 8] ^= c;
        }
        DatastoreFs {
            agent,
            fsid: u64::from_le_bytes(b),
            allow_auth_none,
            identity,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The export path (`/livemount`).
    pub fn export(&self) -> &str {
        self.agent.export()
    }

    /// Calls without an AUTH_SYS credential are served (config `allow_auth_none`).
    pub fn allows_auth_none(&self) -> bool {
        self.allow_auth_none
    }

    /// The state directory, where every mount's writes land.
    pub fn state_dir(&self) -> &std::path::Path {
        self.agent.state_dir()
    }

    fn mount_of(&self, fileid: u64) -> Option<Arc<LiveMount>> {
        self.agent.mount_by_id(u32::try_from(fileid >> 32).ok()?)
    }

    fn root_attr(&self) -> fattr3 {
        let t = time(self.agent.started());
        self.attr(ftype3::NF3DIR, 0o755, 2, 4096, ROOT_FILEID, t)
    }

    fn folder_attr(&self, m: &LiveMount) -> fattr3 {
        let mode = if m.spec.read_only { 0o555 } else { 0o755 };
        let t = time(m.spec.created);
        self.attr(ftype3::NF3DIR, mode, 2, 4096, m.folder_fileid(), t)
    }

    fn file_attr(&self, m: &LiveMount, f: &MountFile) -> fattr3 {
        let mode = if f.is_writable() { 0o644 } else { 0o444 };
        self.attr(
            ftype3::NF3REG,
            mode,
            1,
            f.size(),
            f.fileid,
            time(m.spec.created),
        )
    }

    fn attr(
        &self,
        type_: ftype3,
        mode: u32,
        nlink: u32,
        size: u64,
        fileid: u64,
        t: nfstime3,
    ) -> fattr3 {
        fattr3 {
            type_,
            mode,
            nlink,
            uid: 0,
            gid: 0,
            size,
            used: size,
            rdev: specdata3::default(),
            fsid: self.fsid,
            fileid,
            atime: t,
            mtime: t,
            ctime: t,
        }
    }

    fn extra_attr(&self, m: &LiveMount, low: u32, e: &Entry) -> fattr3 {
        let (t, nlink) = match e.kind {
            Kind::Dir => (ftype3::NF3DIR, 2),
            Kind::File => (ftype3::NF3REG, 1),
        };
        let fileid = (u64::from(m.spec.id) << 32) | u64::from(low);
        self.attr(t, e.mode, nlink, e.size, fileid, time(e.mtime))
    }

    /// What a file id names.
    fn node(&self, fileid: u64) -> Result<Node, nfsstat3> {
        if fileid == ROOT_FILEID {
            return Ok(Node::Root);
        }
        let m = self.mount_of(fileid).ok_or(nfsstat3::NFS3ERR_STALE)?;
        let low = (fileid & 0xffff_ffff) as u32;
        if low == 0 {
            return Ok(Node::Folder(m));
        }
        if let Some(i) = m.files.iter().position(|f| f.fileid == fileid) {
            return Ok(Node::Backup(m, i));
        }
        let entry = m.folder.as_ref().and_then(|f| f.get(low));
        match entry {
            Some(e) => Ok(Node::Extra(m, low, e)),
            None => Err(nfsstat3::NFS3ERR_STALE),
        }
    }

    fn node_attr(&self, node: &Node) -> fattr3 {
        match node {
            Node::Root => self.root_attr(),
            Node::Folder(m) => self.folder_attr(m),
            Node::Backup(m, i) => self.file_attr(m, &m.files[*i]),
            Node::Extra(m, low, e) => self.extra_attr(m, *low, e),
        }
    }

    /// The entries of a folder after `cookie`, in file id order, at most `limit` of them:
    /// (fileid, name). Attributes are not made here: a READDIR page needs them for the entries
    /// it sends only. A page costs what it holds, not the size of the folder.
    fn entries(
        &self,
        dir: u64,
        cookie: u64,
        limit: usize,
    ) -> Result<Vec<(fileid3, Vec<u8>)>, nfsstat3> {
        let (m, parent) = match self.node(dir)? {
            Node::Root => {
                let mut out: Vec<_> = self
                    .agent
                    .mounts()
                    .iter()
                    .map(|m| (m.folder_fileid(), m.spec.name.as_bytes().to_vec()))
                    .filter(|e| e.0 > cookie)
                    .collect();
                out.sort_unstable_by_key(|e| e.0);
                return Ok(out);
            }
            Node::Folder(m) => (m, 0),
            Node::Extra(m, low, e) if e.kind == Kind::Dir => (m, low),
            _ => return Err(nfsstat3::NFS3ERR_NOTDIR),
        };
        let mut out: Vec<(fileid3, Vec<u8>)> = Vec::new();
        if parent == 0 {
            out.extend(
                m.files
                    .iter()
                    .filter(|f| f.fileid > cookie)
                    .map(|f| (f.fileid, f.name.as_bytes().to_vec())),
            );
        }
        if let Some(folder) = &m.folder {
            // Folder files' ids are the mount's id and a low part: resume after the cookie's.
            let base = u64::from(m.spec.id) << 32;
            let after = match cookie.checked_sub(base) {
                Some(low) if low <= u64::from(u32::MAX) => low as u32,
                Some(_) => u32::MAX,
                None => 0,
            };
            for (low, e) in folder.list_after(parent, after, limit) {
                out.push((base | u64::from(low), e.name.into_bytes()));
            }
        }
        out.sort_unstable_by_key(|e| e.0);
        out.truncate(limit);
        Ok(out)
    }

    /// A folder that may change: the mount (read-write), the folder's low id (0: the mount's
    /// folder) and the mount's folder files.
    fn dir_for_change(
        &self,
        dir: u64,
    ) -> Result<(Arc<LiveMount>, u32, Arc<FolderFiles>), nfsstat3> {
        let (m, low) = match self.node(dir)? {
            Node::Root => return Err(nfsstat3::NFS3ERR_ACCES),
            Node::Folder(m) => (m, 0),
            Node::Extra(m, low, e) if e.kind == Kind::Dir => (m, low),
            _ => return Err(nfsstat3::NFS3ERR_NOTDIR),
        };
        if m.spec.read_only {
            return Err(nfsstat3::NFS3ERR_ROFS);
        }
        let folder = m.folder.clone().ok_or(nfsstat3::NFS3ERR_ROFS)?;
        Ok((m, low, folder))
    }
}

impl DatastoreFs {
    /// Where a new file or folder named `n` goes in folder `d`: refused on a read-only mount,
    /// for a bad name, or for a name the backup's files already have.
    fn place_for_new(
        &self,
        d: u64,
        n: &[u8],
    ) -> Result<(Arc<LiveMount>, u32, Arc<FolderFiles>, String), nfsstat3> {
        let (m, parent, folder) = self.dir_for_change(d)?;
        let name = new_name(n)?;
        if parent == 0 && m.file_by_name(name.as_bytes()).is_some() {
            return Err(nfsstat3::NFS3ERR_EXIST);
        }
        Ok((m, parent, folder, name))
    }
}

/// The file a READ or WRITE went to, for its error's metric and log line.
enum FileName {
    /// A disk of the backup (named by the backup's config).
    Disk(String),
    /// A file of the mount's folder (named by a client).
    Folder(String),
}

impl FileName {
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

/// What a file id names.
enum Node {
    Root,
    Folder(Arc<LiveMount>),
    /// A file of the backup: index into the mount's `files`.
    Backup(Arc<LiveMount>, usize),
    /// A file or folder the hypervisor made (or the config of a read-write mount).
    Extra(Arc<LiveMount>, u32, Entry),
}

/// A name for a new file: a single component, UTF-8 (the namespace is stored as JSON).
fn new_name(name: &[u8]) -> Result<String, nfsstat3> {
    check_name(name)?;
    let s = std::str::from_utf8(name).map_err(|_| nfsstat3::NFS3ERR_INVAL)?;
    if s == "." || s == ".." {
        return Err(nfsstat3::NFS3ERR_EXIST);
    }
    Ok(s.to_string())
}

fn time(t: jiff::Timestamp) -> nfstime3 {
    nfstime3 {
        seconds: u32::try_from(t.as_second()).unwrap_or(0),
        nseconds: u32::try_from(t.subsec_nanosecond()).unwrap_or(0),
    }
}

/// Checks a name from a client: one path component, neither empty nor too long.
fn check_name(name: &[u8]) -> Result<(), nfsstat3> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(nfsstat3::NFS3ERR_ACCES);
    }
    if name.len() > MAX_NAME {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    Ok(())
}

/// How CREATE treats a name that exists (RFC 1813 `createmode3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateMode {
    /// Use the existing file.
    Unchecked,
    /// Fail with NFS3ERR_EXIST.
    Guarded,
    /// Fail with NFS3ERR_EXIST unless the file was made by a create with this verifier.
    Exclusive([u8; 8]),
}

/// Attributes a client asks to set; the others (owner, times) are not kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub size: Option<u64>,
    pub mode: Option<u32>,
}

/// Figures for FSINFO.
#[derive(Debug, Clone, Copy)]
pub struct FsInfo {
    pub rtmax: u32,
    pub pref: u32,
    pub maxfilesize: u64,
}

impl DatastoreFs {
    /// The handle of the datastore root.
    pub fn root_handle(&self) -> [u8; HANDLE_LEN] {
        self.identity.handle(ROOT_FILEID, 0)
    }

    /// The handle of a file id, if it names something that exists.
    pub fn handle_of(&self, fileid: u64) -> Option<[u8; HANDLE_LEN]> {
        if fileid == ROOT_FILEID {
            return Some(self.root_handle());
        }
        let m = self.mount_of(fileid)?;
        Some(self.identity.handle(fileid, stamp(&m)))
    }

    /// The file id a client's handle names; NFS3ERR_STALE if it names nothing that exists now
    /// (another datastore, an unmounted mount, a removed file), NFS3ERR_ACCES if its mount is
    /// limited to other hosts than `ip`.
    pub fn resolve(&self, handle: &[u8], ip: IpAddr) -> Result<u64, nfsstat3> {
        let (fileid, mount_stamp) = self.identity.parse(handle)?;
        if fileid == ROOT_FILEID {
            return if mount_stamp == 0 {
                Ok(fileid)
            } else {
                Err(nfsstat3::NFS3ERR_STALE)
            };
        }
        let m = self.mount_of(fileid).ok_or(nfsstat3::NFS3ERR_STALE)?;
        if stamp(&m) != mount_stamp {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        if !m.allows(ip) {
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        self.node(fileid)?;
        Ok(fileid)
    }

    /// Whether a client at `ip` may use what `fileid` names (`mount --allow`).
    pub fn host_allowed(&self, fileid: u64, ip: IpAddr) -> bool {
        fileid == ROOT_FILEID || self.mount_of(fileid).is_some_and(|m| m.allows(ip))
    }

    /// What MOUNT's MNT answers for `path`: the export (`/livemount`, or `""`/`"/"`, which
    /// clients send for an export's root) or a mount's folder in it (`/livemount/NAME`).
    pub fn mount_path(&self, path: &[u8], ip: IpAddr) -> Result<u64, nfsstat3> {
        let export = self.agent.export().as_bytes();
        let rest = match path {
            b"" | b"/" => return Ok(ROOT_FILEID),
            p if p.strip_suffix(b"/").unwrap_or(p) == export => return Ok(ROOT_FILEID),
            p => p.strip_prefix(export).ok_or(nfsstat3::NFS3ERR_NOENT)?,
        };
        let name = rest.strip_prefix(b"/").ok_or(nfsstat3::NFS3ERR_NOENT)?;
        let name = name.strip_suffix(b"/").unwrap_or(name);
        check_name(name)?;
        let m = self
            .agent
            .mount_by_name(name)
            .ok_or(nfsstat3::NFS3ERR_NOENT)?;
        if !m.allows(ip) {
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        Ok(m.folder_fileid())
    }

    pub fn lookup(&self, dir: u64, name: &[u8]) -> Result<u64, nfsstat3> {
        check_name(name)?;
        match self.node(dir)? {
            Node::Root => match name {
                b"." | b".." => Ok(ROOT_FILEID),
                n => self
                    .agent
                    .mount_by_name(n)
                    .map(|m| m.folder_fileid())
                    .ok_or(nfsstat3::NFS3ERR_NOENT),
            },
            Node::Folder(m) => match name {
                b"." => Ok(dir),
                b".." => Ok(ROOT_FILEID),
                n => {
                    if let Some(f) = m.file_by_name(n) {
                        return Ok(f.fileid);
                    }
                    m.folder
                        .as_ref()
                        .and_then(|f| f.lookup(0, n))
                        .map(|low| m.folder_fileid() | u64::from(low))
                        .ok_or(nfsstat3::NFS3ERR_NOENT)
                }
            },
            Node::Extra(m, low, e) if e.kind == Kind::Dir => match name {
                b"." => Ok(dir),
                b".." => Ok(m.folder_fileid() | u64::from(e.parent)),
                n => m
                    .folder
                    .as_ref()
                    .and_then(|f| f.lookup(low, n))
                    .map(|c| m.folder_fileid() | u64::from(c))
                    .ok_or(nfsstat3::NFS3ERR_NOENT),
            },
            _ => Err(nfsstat3::NFS3ERR_NOTDIR),
        }
    }

    pub fn getattr(&self, id: u64) -> Result<fattr3, nfsstat3> {
        Ok(self.node_attr(&self.node(id)?))
    }

    /// Which of the ACCESS bits in `asked` are granted: reading and looking up everywhere;
    /// changing only what a read-write mount lets change (never the backup's disks' size or
    /// name, never the datastore root).
    pub fn access(&self, id: u64, asked: u32) -> Result<u32, nfsstat3> {
        use nfs3_types::nfs3::{
            ACCESS3_DELETE, ACCESS3_EXECUTE, ACCESS3_EXTEND, ACCESS3_LOOKUP, ACCESS3_MODIFY,
            ACCESS3_READ,
        };
        let read = ACCESS3_READ | ACCESS3_LOOKUP | ACCESS3_EXECUTE;
        let granted = match self.node(id)? {
            Node::Root => read,
            Node::Folder(m) | Node::Extra(m, _, _) if m.spec.read_only => read,
            Node::Backup(m, _) if m.spec.read_only => read,
            Node::Folder(_) => read | ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_DELETE,
            Node::Backup(m, i) if m.files[i].is_writable() => read | ACCESS3_MODIFY,
            Node::Backup(..) => read,
            Node::Extra(..) => read | ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_DELETE,
        };
        Ok(asked & granted)
    }

    /// Reads up to `count` bytes (at most [`MAX_IO`]) at `offset`; the flag says the read
    /// reached the end of the file. A failed read is logged with mount, file and offset.
    pub async fn read(&self, id: u64, offset: u64, count: u32) -> Result<(Bytes, bool), nfsstat3> {
        let metrics = self.agent.metrics();
        let count = count.min(MAX_IO);
        let (m, name, result) = match self.node(id)? {
            Node::Root | Node::Folder(_) => return Err(nfsstat3::NFS3ERR_ISDIR),
            Node::Backup(m, i) => {
                let r = m.files[i]
                    .read(offset, count)
                    .await
                    .map_err(|e| (e.to_string(), super::errors::overlay_to_nfsstat(&e)));
                let name = m.files[i].name.clone();
                (m, FileName::Disk(name), r)
            }
            Node::Extra(m, _, e) if e.kind == Kind::Dir => {
                drop(m);
                return Err(nfsstat3::NFS3ERR_ISDIR);
            }
            Node::Extra(m, low, e) => {
                let folder = m.folder.clone().ok_or(nfsstat3::NFS3ERR_STALE)?;
                let r = folder
                    .read(low, offset, count)
                    .await
                    .map_err(|e| (e.to_string(), super::errors::files_to_nfsstat(&e)));
                (m, FileName::Folder(e.name), r)
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
                Ok((data, eof))
            }
            Err((text, status)) => {
                metrics
                    .errors
                    .get_or_create(&Metrics::disk_label(&m.spec.name, name.disk()))
                    .inc();
                // Debug formatting: a name or message with a newline cannot forge log lines.
                tracing::error!(mount = %m.spec.name, file = ?name.text(), offset, count, error = ?text, "read failed");
                Err(status)
            }
        }
    }

    /// Writes `data` at `offset`; with `sync` the data is durable when this returns. Returns
    /// the attributes after the write.
    pub async fn write(
        &self,
        id: u64,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<fattr3, nfsstat3> {
        let metrics = self.agent.metrics();
        let (m, name, result) = match self.node(id)? {
            Node::Root | Node::Folder(_) => return Err(nfsstat3::NFS3ERR_ISDIR),
            Node::Backup(ref m, _) | Node::Extra(ref m, _, _) if m.spec.read_only => {
                return Err(nfsstat3::NFS3ERR_ROFS)
            }
            Node::Backup(m, i) => {
                let f = &m.files[i];
                let r = f
                    .write(offset, data, sync)
                    .await
                    .map(|()| self.file_attr(&m, f))
                    .map_err(|e| (e.to_string(), super::errors::overlay_to_nfsstat(&e)));
                let name = f.name.clone();
                (m, FileName::Disk(name), r)
            }
            Node::Extra(m, low, e) => {
                let folder = m.folder.clone().ok_or(nfsstat3::NFS3ERR_ROFS)?;
                let r = folder
                    .write(low, offset, data, sync)
                    .await
                    .map(|entry| self.extra_attr(&m, low, &entry))
                    .map_err(|e| (e.to_string(), super::errors::files_to_nfsstat(&e)));
                (m, FileName::Folder(e.name), r)
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
            Err((text, status)) => {
                metrics
                    .errors
                    .get_or_create(&Metrics::disk_label(&m.spec.name, name.disk()))
                    .inc();
                tracing::error!(mount = %m.spec.name, file = ?name.text(), offset, len = data.len(), error = ?text, "write failed");
                Err(status)
            }
        }
    }

    /// Makes a file's acknowledged writes durable.
    pub async fn commit(&self, id: u64) -> Result<(), nfsstat3> {
        match self.node(id)? {
            Node::Backup(m, i) => m.files[i].commit().await.map_err(|e| {
                tracing::error!(mount = %m.spec.name, file = ?m.files[i].name, error = ?e.to_string(), "commit failed");
                super::errors::overlay_to_nfsstat(&e)
            }),
            Node::Extra(m, low, _) => match &m.folder {
                Some(f) => f.commit(low).await.map_err(|e| {
                    tracing::error!(mount = %m.spec.name, error = %e, "commit failed");
                    super::errors::files_to_nfsstat(&e)
                }),
                None => Ok(()),
            },
            Node::Root | Node::Folder(_) => Ok(()),
        }
    }

    /// Changes: the backup's disks take writes into their overlays and can never be removed,
    /// renamed or resized (NFS3ERR_PERM); every other file and folder in a mount's folder (the
    /// config included) is the hypervisor's to create, write, resize, rename and remove. A
    /// read-only mount refuses every change with NFS3ERR_ROFS; the datastore root cannot be
    /// changed (NFS3ERR_ACCES).
    pub async fn setattr(&self, id: u64, s: SetAttr) -> Result<fattr3, nfsstat3> {
        let node = self.node(id)?;
        if s == SetAttr::default() {
            return Ok(self.node_attr(&node));
        }
        match node {
            Node::Root => Err(nfsstat3::NFS3ERR_ACCES),
            Node::Folder(ref m) | Node::Backup(ref m, _) | Node::Extra(ref m, _, _)
                if m.spec.read_only =>
            {
                Err(nfsstat3::NFS3ERR_ROFS)
            }
            Node::Backup(m, i) => {
                if s.size.is_some_and(|v| v != m.files[i].size()) {
                    return Err(nfsstat3::NFS3ERR_PERM);
                }
                Ok(self.file_attr(&m, &m.files[i]))
            }
            Node::Extra(m, low, _) => {
                let folder = m.folder.clone().ok_or(nfsstat3::NFS3ERR_ROFS)?;
                let e = folder
                    .setattr(low, s.size, s.mode)
                    .await
                    .map_err(|e| super::errors::files_to_nfsstat(&e))?;
                Ok(self.extra_attr(&m, low, &e))
            }
            node @ Node::Folder(_) => Ok(self.node_attr(&node)),
        }
    }

    /// Creates a regular file; returns its file id.
    pub async fn create(
        &self,
        dir: u64,
        name: &[u8],
        mode: CreateMode,
        attrs: SetAttr,
    ) -> Result<u64, nfsstat3> {
        let (m, parent, folder, name) = self.place_for_new(dir, name)?;
        let made = match mode {
            CreateMode::Unchecked => folder.create(parent, &name, false).await,
            CreateMode::Guarded => folder.create(parent, &name, true).await,
            CreateMode::Exclusive(v) => folder.create_exclusive(parent, &name, v).await,
        };
        let low = made.map_err(|e| super::errors::files_to_nfsstat(&e))?;
        let id = m.folder_fileid() | u64::from(low);
        self.setattr(id, attrs).await?;
        Ok(id)
    }

    pub async fn mkdir(&self, dir: u64, name: &[u8]) -> Result<u64, nfsstat3> {
        let (m, parent, folder, name) = self.place_for_new(dir, name)?;
        let low = folder
            .mkdir(parent, &name)
            .await
            .map_err(|e| super::errors::files_to_nfsstat(&e))?;
        Ok(m.folder_fileid() | u64::from(low))
    }

    /// Refuses what this datastore does not make (symbolic links, device files, hard links)
    /// with the error a client should see for that folder.
    pub fn refuse_special(&self, dir: u64) -> nfsstat3 {
        match self.dir_for_change(dir) {
            Ok(_) => nfsstat3::NFS3ERR_NOTSUPP,
            Err(e) => e,
        }
    }

    /// REMOVE (`rmdir` false) or RMDIR (`rmdir` true).
    pub async fn remove(&self, dir: u64, name: &[u8], rmdir: bool) -> Result<(), nfsstat3> {
        let (m, parent, folder) = self.dir_for_change(dir)?;
        check_name(name)?;
        if name == b"." || name == b".." {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        if parent == 0 && m.file_by_name(name).is_some() {
            return Err(nfsstat3::NFS3ERR_PERM);
        }
        folder
            .remove(parent, name, rmdir)
            .await
            .map_err(|e| super::errors::files_to_nfsstat(&e))
    }

    pub async fn rename(
        &self,
        from_dir: u64,
        from: &[u8],
        to_dir: u64,
        to: &[u8],
    ) -> Result<(), nfsstat3> {
        let (m1, p1, folder) = self.dir_for_change(from_dir)?;
        let (m2, p2, _) = self.dir_for_change(to_dir)?;
        if m1.spec.id != m2.spec.id {
            return Err(nfsstat3::NFS3ERR_XDEV);
        }
        check_name(from)?;
        if from == b"." || from == b".." {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        let to = new_name(to)?;
        if (p1 == 0 && m1.file_by_name(from).is_some())
            || (p2 == 0 && m1.file_by_name(to.as_bytes()).is_some())
        {
            return Err(nfsstat3::NFS3ERR_PERM);
        }
        folder
            .rename(p1, from, p2, &to)
            .await
            .map_err(|e| super::errors::files_to_nfsstat(&e))
    }

    /// The entries of folder `dir` after `cookie` (0: from the start), in file id order. An
    /// entry's cookie is its file id, so a listing resumes at the right place across restarts
    /// and while other entries come and go.
    /// The entries of folder `dir` after `cookie` (a file id), in file id order, at most
    /// `limit` of them.
    pub fn readdir(
        &self,
        dir: u64,
        cookie: u64,
        limit: usize,
    ) -> Result<Vec<(fileid3, Vec<u8>)>, nfsstat3> {
        self.entries(dir, cookie, limit)
    }

    pub fn fsinfo(&self) -> FsInfo {
        let largest = self
            .agent
            .mounts()
            .iter()
            .flat_map(|m| m.files.iter().map(|f| f.size()).collect::<Vec<_>>())
            .max()
            .unwrap_or(0);
        FsInfo {
            rtmax: MAX_IO,
            pref: self.agent.repo().chunk_size().bytes().min(MAX_IO),
            // At least the largest disk; 64 TiB leaves room for disks mounted later.
            maxfilesize: largest.max(64 << 40),
        }
    }
}

/// A mount's stamp in handles: its creation time in nanoseconds (never 0).
fn stamp(m: &LiveMount) -> u64 {
    (m.spec.created.as_nanosecond() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_single_components() {
        assert_eq!(check_name(b""), Err(nfsstat3::NFS3ERR_ACCES));
        assert_eq!(check_name(b"a/b"), Err(nfsstat3::NFS3ERR_ACCES));
        assert_eq!(
            check_name(b"../../etc/shadow"),
            Err(nfsstat3::NFS3ERR_ACCES)
        );
        assert_eq!(check_name(b"a\0b"), Err(nfsstat3::NFS3ERR_ACCES));
        assert_eq!(check_name(&[b'x'; 256]), Err(nfsstat3::NFS3ERR_NAMETOOLONG));
        assert_eq!(check_name(b"web01-flat.vmdk"), Ok(()));
        assert_eq!(
            check_name(&[0xff, 0xfe]),
            Ok(()),
            "non-UTF-8 names are looked up (and not found)"
        );
    }
}
