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

    /// Every entry of a folder, in a fixed order: (fileid, name, attributes).
    fn entries(&self, dir: u64) -> Result<Vec<(fileid3, Vec<u8>, fattr3)>, nfsstat3> {
        if dir == ROOT_FILEID {
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
                .collect());
        }
        let m = self.mount_of(dir).ok_or(nfsstat3::NFS3ERR_STALE)?;
        if dir != m.folder_fileid() {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        Ok(m.files
            .iter()
            .map(|f| (f.fileid, f.name.as_bytes().to_vec(), self.file_attr(&m, f)))
            .collect())
    }
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
        if dir == ROOT_FILEID {
            return match name {
                b"." | b".." => Ok(FileHandleU64::new(ROOT_FILEID)),
                n => self
                    .agent
                    .mount_by_name(n)
                    .map(|m| FileHandleU64::new(m.folder_fileid()))
                    .ok_or(nfsstat3::NFS3ERR_NOENT),
            };
        }
        let m = self.mount_of(dir).ok_or(nfsstat3::NFS3ERR_STALE)?;
        if dir != m.folder_fileid() {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        match name {
            b"." => Ok(FileHandleU64::new(dir)),
            b".." => Ok(FileHandleU64::new(ROOT_FILEID)),
            n => m
                .file_by_name(n)
                .map(|f| FileHandleU64::new(f.fileid))
                .ok_or(nfsstat3::NFS3ERR_NOENT),
        }
    }

    async fn getattr(&self, id: &FileHandleU64) -> Result<fattr3, nfsstat3> {
        let id = id.as_u64();
        if id == ROOT_FILEID {
            return Ok(self.root_attr());
        }
        let m = self.mount_of(id).ok_or(nfsstat3::NFS3ERR_STALE)?;
        if id == m.folder_fileid() {
            return Ok(self.folder_attr(&m));
        }
        let f = m.file_by_id(id).ok_or(nfsstat3::NFS3ERR_STALE)?;
        Ok(self.file_attr(&m, f))
    }

    async fn read(
        &self,
        id: &FileHandleU64,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let fileid = id.as_u64();
        if fileid == ROOT_FILEID {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        }
        let m = self.mount_of(fileid).ok_or(nfsstat3::NFS3ERR_STALE)?;
        if fileid == m.folder_fileid() {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        }
        let f = m.file_by_id(fileid).ok_or(nfsstat3::NFS3ERR_STALE)?;
        let metrics = self.agent.metrics();
        let label = Metrics::label(&m.spec.name);
        match f.read(offset, count.min(MAX_IO)).await {
            Ok((data, eof)) => {
                metrics.reads.get_or_create(&label).inc();
                metrics
                    .read_bytes
                    .get_or_create(&label)
                    .inc_by(data.len() as u64);
                Ok((data.to_vec(), eof))
            }
            Err(e) => {
                metrics.errors.get_or_create(&label).inc();
                tracing::error!(mount = %m.spec.name, file = %f.name, offset, count, error = %e, "read failed");
                Err(super::errors::overlay_to_nfsstat(&e))
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

/// Writes go to the disks' overlays. New files, removal and renames are not supported yet
/// (NFS3ERR_NOTSUPP; the hypervisor's own files come with the next step); the backup's files
/// can never be removed, renamed or resized (NFS3ERR_PERM). A read-only mount refuses every
/// change with NFS3ERR_ROFS.
impl DatastoreFs {
    /// The mount and file a handle names, for a change: ROFS on a read-only mount.
    fn file_for_change(&self, id: &FileHandleU64) -> Result<(Arc<LiveMount>, usize), nfsstat3> {
        let fileid = id.as_u64();
        if fileid == ROOT_FILEID {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        }
        let m = self.mount_of(fileid).ok_or(nfsstat3::NFS3ERR_STALE)?;
        if m.spec.read_only {
            return Err(nfsstat3::NFS3ERR_ROFS);
        }
        if fileid == m.folder_fileid() {
            return Err(nfsstat3::NFS3ERR_ISDIR);
        }
        let idx = m
            .files
            .iter()
            .position(|f| f.fileid == fileid)
            .ok_or(nfsstat3::NFS3ERR_STALE)?;
        Ok((m, idx))
    }

    fn dir_for_change(&self, dir: &FileHandleU64) -> Result<(), nfsstat3> {
        let d = dir.as_u64();
        if d != ROOT_FILEID {
            let m = self.mount_of(d).ok_or(nfsstat3::NFS3ERR_STALE)?;
            if m.spec.read_only {
                return Err(nfsstat3::NFS3ERR_ROFS);
            }
        }
        Ok(())
    }
}

impl NfsFileSystem for DatastoreFs {
    async fn setattr(&self, id: &FileHandleU64, s: sattr3) -> Result<fattr3, nfsstat3> {
        let (m, idx) = self.file_for_change(id)?;
        let f = &m.files[idx];
        if let nfs::set_size3::Some(size) = s.size {
            if size != f.size() {
                return Err(nfsstat3::NFS3ERR_PERM);
            }
        }
        // Mode, owner and times of the backup's files are fixed; accepting the call keeps
        // clients that touch them working.
        Ok(self.file_attr(&m, f))
    }

    async fn write(
        &self,
        id: &FileHandleU64,
        offset: u64,
        data: &[u8],
        stable: nfs::stable_how,
    ) -> Result<(fattr3, nfs::stable_how), nfsstat3> {
        let (m, idx) = self.file_for_change(id)?;
        let f = &m.files[idx];
        let sync = !matches!(stable, nfs::stable_how::UNSTABLE);
        let metrics = self.agent.metrics();
        let label = Metrics::label(&m.spec.name);
        if let Err(e) = f.write(offset, data, sync).await {
            metrics.errors.get_or_create(&label).inc();
            tracing::error!(mount = %m.spec.name, file = %f.name, offset, len = data.len(), error = %e, "write failed");
            return Err(super::errors::overlay_to_nfsstat(&e));
        }
        let done = if sync {
            nfs::stable_how::FILE_SYNC
        } else {
            nfs::stable_how::UNSTABLE
        };
        Ok((self.file_attr(&m, f), done))
    }

    async fn create(
        &self,
        d: &FileHandleU64,
        _n: &filename3<'_>,
        _a: sattr3,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        self.dir_for_change(d)?;
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }
    async fn create_exclusive(
        &self,
        d: &FileHandleU64,
        _n: &filename3<'_>,
        _v: nfs::createverf3,
    ) -> Result<FileHandleU64, nfsstat3> {
        self.dir_for_change(d)?;
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }
    async fn mkdir(
        &self,
        d: &FileHandleU64,
        _n: &filename3<'_>,
    ) -> Result<(FileHandleU64, fattr3), nfsstat3> {
        self.dir_for_change(d)?;
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }
    async fn remove(&self, d: &FileHandleU64, n: &filename3<'_>) -> Result<(), nfsstat3> {
        self.dir_for_change(d)?;
        self.lookup(d, n).await?;
        Err(nfsstat3::NFS3ERR_PERM)
    }
    async fn rename<'a>(
        &self,
        fd: &FileHandleU64,
        fnm: &filename3<'a>,
        td: &FileHandleU64,
        _tn: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        self.dir_for_change(fd)?;
        self.dir_for_change(td)?;
        self.lookup(fd, fnm).await?;
        Err(nfsstat3::NFS3ERR_PERM)
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
        let (m, idx) = self.file_for_change(id)?;
        let f = &m.files[idx];
        f.commit().await.map_err(|e| {
            tracing::error!(mount = %m.spec.name, file = %f.name, error = %e, "commit failed");
            super::errors::overlay_to_nfsstat(&e)
        })
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
