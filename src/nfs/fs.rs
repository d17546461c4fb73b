//! The datastore as nfs3_server sees it: `NfsReadFileSystem` + `NfsFileSystem` over the agent's
//! live mounts.
//!
//! Owns: the namespace (root folder -> one folder per mount -> the mount's files), attributes,
//! READ, READDIR(PLUS), FSINFO, and which calls are refused. Names are single components: `/`,
//! NUL, empty and over-long names are refused; `.` and `..` resolve within the datastore and can
//! never leave it.
//! Must not: touch chunks or the repository directly (reads go through `mount`), or hold a lock
//! across an await.
//!
//! This step serves mounts read-only: every change is NFS3ERR_ROFS. The per-mount overlay for the
//! VM's writes is the next step of issue 3.

use std::sync::Arc;

use nfs3_server::nfs3_types::nfs3::{
    self as nfs, fattr3, fileid3, filename3, ftype3, nfspath3, nfsstat3, nfstime3, sattr3,
    specdata3, FSINFO3resok,
};
use nfs3_server::nfs3_types::rpc::auth_unix;
use nfs3_server::vfs::{
    DirEntryPlus, FileHandleU64, NextResult, NfsFileSystem, NfsReadFileSystem, ReadDirPlusIterator,
};

use crate::agent::Agent;
use crate::metrics::Metrics;
use crate::mount::files::{Entry, FolderFiles, Kind};
use crate::mount::{LiveMount, MountFile, ROOT_FILEID};

/// Longest name accepted in LOOKUP (NAME_MAX of common file systems).
const MAX_NAME: usize = 255;
/// Largest READ and WRITE the server offers (FSINFO rtmax/wtmax).
pub const MAX_IO: u32 = 1024 * 1024;

/// The datastore file system.
pub struct DatastoreFs {
    agent: Arc<Agent>,
    fsid: u64,
    allow_auth_none: bool,
}

impl DatastoreFs {
    pub fn new(agent: Arc<Agent>, allow_auth_none: bool) -> Self {
        let id = agent.repo().id().as_bytes();
        let mut b = [0u8; 8];
        for (i, c) in id.iter().enumerate() {
            b[i % 8] ^= c;
        }
        DatastoreFs {
            agent,
            fsid: u64::from_le_bytes(b),
            allow_auth_none,
        }
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

    /// Every entry of a folder, in a fixed order: (fileid, name, attributes).
    fn entries(&self, dir: u64) -> Result<Vec<(fileid3, Vec<u8>, fattr3)>, nfsstat3> {
        let (m, parent) = match self.node(dir)? {
            Node::Root => {
                return Ok(self
                    .agent
                    .mounts()
                    .iter()
                    .map(|m| {
                        (
                            m.folder_fileid(),
                            m.spec.name.as_bytes().to_vec(),
                            self.folder_attr(m),
                        )
                    })
                    .collect())
            }
            Node::Folder(m) => (m, 0),
            Node::Extra(m, low, e) if e.kind == Kind::Dir => (m, low),
            _ => return Err(nfsstat3::NFS3ERR_NOTDIR),
        };
        let mut out: Vec<(fileid3, Vec<u8>, fattr3)> = Vec::new();
        if parent == 0 {
            out.extend(
                m.files
                    .iter()
                    .map(|f| (f.fileid, f.name.as_bytes().to_vec(), self.file_attr(&m, f))),
            );
        }
        if let Some(folder) = &m.folder {
            for (low, e) in folder.list(parent) {
                let a = self.extra_attr(&m, low, &e);
                out.push((a.fileid, e.name.into_bytes(), a));
            }
        }
        Ok(out)
    }

    /// A folder that may change: the mount (read-write), the folder's low id (0: the mount's
    /// folder) and the mount's folder files.
    fn dir_for_change(
        &self,
        dir: &FileHandleU64,
    ) -> Result<(Arc<LiveMount>, u32, Arc<FolderFiles>), nfsstat3> {
        let (m, low) = match self.node(dir.as_u64())? {
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
        d: &FileHandleU64,
        n: &filename3<'_>,
    ) -> Result<(Arc<LiveMount>, u32, Arc<FolderFiles>, String), nfsstat3> {
        let (m, parent, folder) = self.dir_for_change(d)?;
        let name = new_name(n)?;
        if parent == 0 && m.file_by_name(name.as_bytes()).is_some() {
            return Err(nfsstat3::NFS3ERR_EXIST);
        }
        Ok((m, parent, folder, name))
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
fn new_name(name: &filename3<'_>) -> Result<String, nfsstat3> {
    check_name(name.as_ref())?;
    let s = std::str::from_utf8(name.as_ref()).map_err(|_| nfsstat3::NFS3ERR_INVAL)?;
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

impl NfsReadFileSystem for DatastoreFs {
    type Handle = FileHandleU64;

    fn root_dir(&self) -> FileHandleU64 {
        FileHandleU64::new(ROOT_FILEID)
    }

    fn authorize(&self, auth: Option<&auth_unix>) -> bool {
        auth.is_some() || self.allow_auth_none
    }

    async fn lookup(
        &self,
        dir: &FileHandleU64,
        name: &filename3<'_>,
    ) -> Result<FileHandleU64, nfsstat3> {
        let dir = dir.as_u64();
        let name = name.as_ref();
        check_name(name)?;
        let h = FileHandleU64::new;
        match self.node(dir)? {
            Node::Root => match name {
                b"." | b".." => Ok(h(ROOT_FILEID)),
                n => self
                    .agent
                    .mount_by_name(n)
                    .map(|m| h(m.folder_fileid()))
                    .ok_or(nfsstat3::NFS3ERR_NOENT),
            },
            Node::Folder(m) => match name {
                b"." => Ok(h(dir)),
                b".." => Ok(h(ROOT_FILEID)),
                n => {
                    if let Some(f) = m.file_by_name(n) {
                        return Ok(h(f.fileid));
                    }
                    m.folder
                        .as_ref()
                        .and_then(|f| f.lookup(0, n))
                        .map(|low| h(m.folder_fileid() | u64::from(low)))
                        .ok_or(nfsstat3::NFS3ERR_NOENT)
                }
            },
            Node::Extra(m, low, e) if e.kind == Kind::Dir => match name {
                b"." => Ok(h(dir)),
                b".." => Ok(h(m.folder_fileid() | u64::from(e.parent))),
                n => m
                    .folder
                    .as_ref()
                    .and_then(|f| f.lookup(low, n))
                    .map(|c| h(m.folder_fileid() | u64::from(c)))
                    .ok_or(nfsstat3::NFS3ERR_NOENT),
            },
            _ => Err(nfsstat3::NFS3ERR_NOTDIR),
        }
    }

    async fn getattr(&self, id: &FileHandleU64) -> Result<fattr3, nfsstat3> {
        Ok(self.node_attr(&self.node(id.as_u64())?))
    }

    async fn read(
        &self,
        id: &FileHandleU64,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let metrics = self.agent.metrics();
        let count = count.min(MAX_IO);
        let (m, name, result) = match self.node(id.as_u64())? {
            Node::Root | Node::Folder(_) => return Err(nfsstat3::NFS3ERR_ISDIR),
            Node::Backup(m, i) => {
                let r = m.files[i]
                    .read(offset, count)
                    .await
                    .map_err(|e| (e.to_string(), super::errors::overlay_to_nfsstat(&e)));
                let name = m.files[i].name.clone();
                (m, name, r)
            }
            Node::Extra(m, low, e) => {
                let folder = m.folder.clone().ok_or(nfsstat3::NFS3ERR_STALE)?;
                let r = folder
                    .read(low, offset, count)
                    .await
                    .map_err(|e| (e.to_string(), super::errors::files_to_nfsstat(&e)));
                (m, e.name, r)
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
                Ok((data.to_vec(), eof))
            }
            Err((text, status)) => {
                metrics.errors.get_or_create(&label).inc();
                tracing::error!(mount = %m.spec.name, file = %name, offset, count, error = %text, "read failed");
                Err(status)
            }
        }
    }

    async fn readdirplus(
        &self,
        dir: &FileHandleU64,
        cookie: u64,
    ) -> Result<impl ReadDirPlusIterator<FileHandleU64>, nfsstat3> {
        let entries = self.entries(dir.as_u64())?;
        let start = usize::try_from(cookie).map_err(|_| nfsstat3::NFS3ERR_BAD_COOKIE)?;
        if start > entries.len() {
            return Err(nfsstat3::NFS3ERR_BAD_COOKIE);
        }
        Ok(Entries {
            entries,
            next: start,
        })
    }

    async fn readlink(&self, _id: &FileHandleU64) -> Result<nfspath3<'_>, nfsstat3> {
        Err(nfsstat3::NFS3ERR_INVAL)
    }

    async fn fsinfo(&self, root: &FileHandleU64) -> Result<FSINFO3resok, nfsstat3> {
        let attr = self.getattr(root).await.ok();
        let largest = self
            .agent
            .mounts()
            .iter()
            .flat_map(|m| m.files.iter().map(|f| f.size()).collect::<Vec<_>>())
            .max()
            .unwrap_or(0);
        let pref = self.agent.repo().chunk_size().bytes().min(MAX_IO);
        Ok(FSINFO3resok {
            obj_attributes: attr.map_or(nfs::post_op_attr::None, nfs::post_op_attr::Some),
            rtmax: MAX_IO,
            rtpref: pref,
            rtmult: 4096,
            wtmax: MAX_IO,
            wtpref: pref,
            wtmult: 4096,
            dtpref: 64 * 1024,
            // At least the largest disk; 64 TiB leaves room for disks mounted later.
            maxfilesize: largest.max(64 << 40),
            time_delta: nfstime3 {
                seconds: 0,
                nseconds: 1,
            },
            properties: nfs::FSF3_HOMOGENEOUS | nfs::FSF3_CANSETTIME,
        })
    }
}

/// A folder listing being returned; the cookie of an entry is its position plus one.
struct Entries {
    entries: Vec<(fileid3, Vec<u8>, fattr3)>,
    next: usize,
}

impl ReadDirPlusIterator<FileHandleU64> for Entries {
    async fn next(&mut self) -> NextResult<DirEntryPlus<FileHandleU64>> {
        let Some((fileid, name, attr)) = self.entries.get(self.next).cloned() else {
            return NextResult::Eof;
        };
        self.next += 1;
        NextResult::Ok(DirEntryPlus {
            fileid,
            name: name.into(),
            cookie: self.next as u64,
            name_attributes: Some(attr),
            name_handle: Some(FileHandleU64::new(fileid)),
        })
    }
}

/// Changes: the backup's disks take writes into their overlays and can never be removed,
/// renamed or resized (NFS3ERR_PERM); every other file and folder in a mount's folder (the
/// config included) is the hypervisor's to create, write, resize, rename and remove. A
/// read-only mount refuses every change with NFS3ERR_ROFS; the datastore root is not writable.
impl NfsFileSystem for DatastoreFs {
    async fn setattr(&self, id: &FileHandleU64, s: sattr3) -> Result<fattr3, nfsstat3> {
        let node = self.node(id.as_u64())?;
        let size = match s.size {
            nfs::set_size3::Some(v) => Some(v),
            nfs::set_size3::None => None,
        };
        let mode = match s.mode {
            nfs::set_mode3::Some(v) => Some(v),
            nfs::set_mode3::None => None,
        };
        match node {
            Node::Root => Ok(self.root_attr()),
            Node::Folder(ref m) | Node::Backup(ref m, _) | Node::Extra(ref m, _, _)
                if m.spec.read_only =>
            {
                Err(nfsstat3::NFS3ERR_ROFS)
            }
            Node::Backup(m, i) => {
                if size.is_some_and(|v| v != m.files[i].size()) {
                    return Err(nfsstat3::NFS3ERR_PERM);
                }
                Ok(self.file_attr(&m, &m.files[i]))
            }
            Node::Extra(m, low, _) => {
                let folder = m.folder.clone().ok_or(nfsstat3::NFS3ERR_ROFS)?;
                let e = folder
                    .setattr(low, size, mode)
                    .await
                    .map_err(|e| super::errors::files_to_nfsstat(&e))?;
                Ok(self.extra_attr(&m, low, &e))
            }
            node @ Node::Folder(_) => Ok(self.node_attr(&node)),
        }
    }

    async fn write(
        &self,
        id: &FileHandleU64,
        offset: u64,
        data: &[u8],
        stable: nfs::stable_how,
    ) -> Result<(fattr3, nfs::stable_how), nfsstat3> {
        let node = self.node(id.as_u64())?;
        let sync = !matches!(stable, nfs::stable_how::UNSTABLE);
        let done = if sync {
            nfs::stable_how::FILE_SYNC
        } else {
            nfs::stable_how::UNSTABLE
        };
        let metrics = self.agent.metrics();
        let (m, name, result) = match node {
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
                (m, name, r)
            }
            Node::Extra(m, low, e) => {
                let folder = m.folder.clone().ok_or(nfsstat3::NFS3ERR_ROFS)?;
                let r = folder
                    .write(low, offset, data, sync)
                    .await
                    .map(|entry| self.extra_attr(&m, low, &entry))
                    .map_err(|e| (e.to_string(), super::errors::files_to_nfsstat(&e)));
                (m, e.name, r)
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
                Ok((attr, done))
            }
            Err((text, status)) => {
                metrics.errors.get_or_create(&label).inc();
                tracing::error!(mount = %m.spec.name, file = %name, offset, len = data.len(), error = %text, "write failed");
                Err(status)
            }
        }
    }

    async fn create(
        &self,
        d: &FileHandleU64,
        n: &filename3<'_>,
        a: sattr3,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        let (m, parent, folder, name) = self.place_for_new(d, n)?;
        let low = folder
            .create(parent, &name, false)
            .await
            .map_err(|e| super::errors::files_to_nfsstat(&e))?;
        let h = FileHandleU64::new(m.folder_fileid() | u64::from(low));
        let attr = self.setattr(&h, a).await?;
        Ok((h, attr))
    }

    async fn create_exclusive(
        &self,
        d: &FileHandleU64,
        n: &filename3<'_>,
        _v: nfs::createverf3,
    ) -> Result<FileHandleU64, nfsstat3> {
        let (m, parent, folder, name) = self.place_for_new(d, n)?;
        let low = folder
            .create(parent, &name, true)
            .await
            .map_err(|e| super::errors::files_to_nfsstat(&e))?;
        Ok(FileHandleU64::new(m.folder_fileid() | u64::from(low)))
    }

    async fn mkdir(
        &self,
        d: &FileHandleU64,
        n: &filename3<'_>,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        let (m, parent, folder, name) = self.place_for_new(d, n)?;
        let low = folder
            .mkdir(parent, &name)
            .await
            .map_err(|e| super::errors::files_to_nfsstat(&e))?;
        let e = folder.get(low).ok_or(nfsstat3::NFS3ERR_SERVERFAULT)?;
        let h = FileHandleU64::new(m.folder_fileid() | u64::from(low));
        Ok((h, self.extra_attr(&m, low, &e)))
    }

    async fn remove(&self, d: &FileHandleU64, n: &filename3<'_>) -> Result<(), nfsstat3> {
        let (m, parent, folder) = self.dir_for_change(d)?;
        check_name(n.as_ref())?;
        if parent == 0 && m.file_by_name(n.as_ref()).is_some() {
            return Err(nfsstat3::NFS3ERR_PERM);
        }
        let low = folder
            .lookup(parent, n.as_ref())
            .ok_or(nfsstat3::NFS3ERR_NOENT)?;
        let is_dir = folder.get(low).is_some_and(|e| e.kind == Kind::Dir);
        folder
            .remove(parent, n.as_ref(), is_dir)
            .await
            .map_err(|e| super::errors::files_to_nfsstat(&e))
    }

    async fn rename<'a>(
        &self,
        fd: &FileHandleU64,
        fnm: &filename3<'a>,
        td: &FileHandleU64,
        tn: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        let (m1, p1, folder) = self.dir_for_change(fd)?;
        let (m2, p2, _) = self.dir_for_change(td)?;
        if m1.spec.id != m2.spec.id {
            return Err(nfsstat3::NFS3ERR_XDEV);
        }
        check_name(fnm.as_ref())?;
        let to = new_name(tn)?;
        if (p1 == 0 && m1.file_by_name(fnm.as_ref()).is_some())
            || (p2 == 0 && m1.file_by_name(to.as_bytes()).is_some())
        {
            return Err(nfsstat3::NFS3ERR_PERM);
        }
        folder
            .rename(p1, fnm.as_ref(), p2, &to)
            .await
            .map_err(|e| super::errors::files_to_nfsstat(&e))
    }

    async fn symlink<'a>(
        &self,
        d: &FileHandleU64,
        _n: &filename3<'a>,
        _t: &nfspath3<'a>,
        _a: &sattr3,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        self.dir_for_change(d)?;
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    async fn commit(&self, id: &FileHandleU64, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        match self.node(id.as_u64())? {
            Node::Backup(m, i) => m.files[i].commit().await.map_err(|e| {
                tracing::error!(mount = %m.spec.name, file = %m.files[i].name, error = %e, "commit failed");
                super::errors::overlay_to_nfsstat(&e)
            }),
            Node::Extra(m, low, _) => match &m.folder {
                Some(f) => f
                    .commit(low)
                    .await
                    .map_err(|e| super::errors::files_to_nfsstat(&e)),
                None => Ok(()),
            },
            Node::Root | Node::Folder(_) => Ok(()),
        }
    }
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
