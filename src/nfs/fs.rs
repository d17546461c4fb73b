//! The datastore in NFSv3's terms: a thin adapter over [`DatastoreCore`].
//!
//! Owns: file handles (through [`Identity`]: a handle names a file id and its mount's
//! generation), attributes as `fattr3` (times, owner, the file system id), the caller as the
//! core sees it ([`Who`], from AUTH_SYS; root squashed to `nobody` with `root_squash`), ACCESS3
//! bits from the core's rights and the mode bits for that caller, the largest READ and WRITE
//! ([`MAX_IO`]), FSINFO's figures, and the core's errors as `nfsstat3` (through `errors.rs`,
//! the one map).
//! Must not: decide what an operation means for the datastore or which node may do what (the
//! core does), know about XDR (`dispatch` does), or look a node up twice in one call:
//! `dispatch` resolves a handle to a [`Node`] once and passes it down.

use std::net::IpAddr;

use bytes::Bytes;
use nfs3_types::nfs3::{fattr3, ftype3, nfsstat3, nfstime3, specdata3};

use super::errors::to_nfsstat;
use super::handle::{Identity, HANDLE_LEN};
use super::rpc::Cred;

use crate::agent::Agent;
use crate::datastore::{
    permits, Attr, CreateMode, DatastoreCore, DirEntry, FileKind, Node, SetAttr, Who, EXEC, READ,
    WRITE,
};
use crate::mount::ROOT_FILEID;

/// The most mount folders MOUNT's EXPORT lists (a reply stays well under a UDP datagram's
/// 64 KiB even with long names: 255 bytes each).
pub const MAX_EXPORTS: usize = 200;

/// Largest READ and WRITE the server offers (FSINFO rtmax/wtmax).
pub const MAX_IO: u32 = 1024 * 1024;

/// The datastore file system as NFS sees it.
pub struct DatastoreFs {
    core: DatastoreCore,
    fsid: u64,
    allow_auth_none: bool,
    root_squash: bool,
    identity: Identity,
}

/// Figures for FSINFO.
#[derive(Debug, Clone, Copy)]
pub struct FsInfo {
    pub rtmax: u32,
    pub pref: u32,
    pub maxfilesize: u64,
}

type Nfs<T> = Result<T, nfsstat3>;

impl DatastoreFs {
    pub fn new(agent: std::sync::Arc<Agent>, allow_auth_none: bool, identity: Identity) -> Self {
        let core = DatastoreCore::new(agent);
        // The file system id: the repository's id folded into 8 bytes.
        let mut b = [0u8; 8];
        for (i, c) in core.repo_id().as_bytes().iter().enumerate() {
            b[i % 8] ^= c;
        }
        DatastoreFs {
            core,
            fsid: u64::from_le_bytes(b),
            allow_auth_none,
            root_squash: false,
            identity,
        }
    }

    /// Calls from root (uid 0) act as `nobody` (config `root_squash`; default off: hypervisors
    /// connect as root and must create their files).
    pub fn with_root_squash(mut self, squash: bool) -> Self {
        self.root_squash = squash;
        self
    }

    /// The caller a credential names: AUTH_SYS's ids (root as `nobody` when squashed), and
    /// `nobody` for AUTH_NONE (served only with `allow_auth_none`).
    pub fn who(&self, cred: &Cred) -> Who {
        match cred {
            Cred::Sys { uid: 0, .. } if self.root_squash => Who::nobody(),
            Cred::Sys { uid, gid, gids } => Who::new(*uid, *gid, gids),
            Cred::None | Cred::Other(_) => Who::nobody(),
        }
    }

    /// Whether `who` may read, write or change entries of `node` (`want`: the core's permission
    /// bits), refused as ACCESS would answer: NFS3ERR_ACCES.
    pub fn check(&self, node: &Node, who: &Who, want: u32) -> Nfs<()> {
        self.core.check(node, who, want).map_err(|e| to_nfsstat(&e))
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The export path (`/livemount`).
    pub fn export(&self) -> &str {
        self.core.export()
    }

    /// Calls without an AUTH_SYS credential are served (config `allow_auth_none`).
    pub fn allows_auth_none(&self) -> bool {
        self.allow_auth_none
    }

    /// The state directory, where every mount's writes land.
    pub fn state_dir(&self) -> &std::path::Path {
        self.core.state_dir()
    }

    /// The handle of the datastore root.
    pub fn root_handle(&self) -> [u8; HANDLE_LEN] {
        self.identity.handle(ROOT_FILEID, 0)
    }

    /// The handle of a node: its file id and its mount's generation.
    pub fn handle(&self, node: &Node) -> [u8; HANDLE_LEN] {
        self.identity.handle(node.fileid(), node.generation())
    }

    /// What a client's handle names: NFS3ERR_BADHANDLE if this datastore did not make it,
    /// NFS3ERR_STALE if it names nothing that exists now (another datastore, an unmounted
    /// mount, a removed file), NFS3ERR_ACCES if its mount is limited to other hosts than `ip`.
    pub fn resolve(&self, handle: &[u8], ip: IpAddr) -> Nfs<Node> {
        let (fileid, generation) = self.identity.parse(handle)?;
        self.core
            .resolve_held(fileid, generation, ip)
            .map_err(|e| to_nfsstat(&e))
    }

    /// The node's attributes as resolved.
    pub fn getattr(&self, node: &Node) -> fattr3 {
        self.fattr(&self.core.attr(node))
    }

    /// The node's attributes now (after a change); none if it is gone.
    pub fn attr_now(&self, node: &Node) -> Option<fattr3> {
        self.core.attr_now(node).map(|a| self.fattr(&a))
    }

    pub fn fattr(&self, a: &Attr) -> fattr3 {
        fattr3 {
            type_: match a.kind {
                FileKind::File => ftype3::NF3REG,
                FileKind::Dir => ftype3::NF3DIR,
            },
            mode: a.mode,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            used: a.size,
            rdev: specdata3::default(),
            fsid: self.fsid,
            fileid: a.fileid,
            atime: time(a.atime),
            mtime: time(a.mtime),
            ctime: time(a.ctime),
        }
    }

    /// Which of the ACCESS bits in `asked` `who` has on the node: what the node's kind allows
    /// (the core's rights) and its mode bits, owner and group grant that caller. The same
    /// checks refuse READ, WRITE and changes in a folder ([`DatastoreFs::check`]), so ACCESS
    /// and the calls agree.
    pub fn access(&self, node: &Node, who: &Who, asked: u32) -> u32 {
        use nfs3_types::nfs3::{
            ACCESS3_DELETE, ACCESS3_EXECUTE, ACCESS3_EXTEND, ACCESS3_LOOKUP, ACCESS3_MODIFY,
            ACCESS3_READ,
        };
        let Some(a) = self.core.attr_now(node) else {
            return 0;
        };
        let r = node.rights();
        let dir = a.kind == FileKind::Dir;
        let may = |want| permits(&a, who, want);
        // Changing a folder's entries takes write and search on it.
        let change = if dir { WRITE | EXEC } else { WRITE };
        let mut granted = 0;
        for (ok, bit) in [
            (may(READ), ACCESS3_READ),
            (dir && may(EXEC), ACCESS3_LOOKUP),
            (!dir && may(EXEC), ACCESS3_EXECUTE),
            (r.modify && may(change), ACCESS3_MODIFY),
            (r.extend && may(change), ACCESS3_EXTEND),
            (r.delete && may(change), ACCESS3_DELETE),
        ] {
            if ok {
                granted |= bit;
            }
        }
        asked & granted
    }

    /// What MOUNT's MNT answers for `path`: the export (`/livemount`, or `""`/`"/"`, which
    /// clients send for an export's root) or a mount's folder in it (`/livemount/NAME`).
    pub fn mount_path(&self, path: &[u8], ip: IpAddr) -> Nfs<Node> {
        self.core.mount_path(path, ip).map_err(|e| to_nfsstat(&e))
    }

    /// The names of the mounts the client at `ip` may use (MOUNT's EXPORT), at most
    /// [`MAX_EXPORTS`].
    pub fn mount_names(&self, ip: IpAddr) -> Vec<String> {
        self.core
            .readdir(&Node::Root, 0, MAX_EXPORTS, ip)
            .unwrap_or_default()
            .into_iter()
            .take(MAX_EXPORTS)
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .collect()
    }

    pub fn lookup(&self, dir: &Node, name: &[u8], ip: IpAddr) -> Nfs<Node> {
        self.core.lookup(dir, name, ip).map_err(|e| to_nfsstat(&e))
    }

    /// Reads up to `count` bytes (at most [`MAX_IO`]) at `offset`; the flag says the read
    /// reached the end of the file.
    pub async fn read(&self, node: &Node, offset: u64, count: u32) -> Nfs<(Bytes, bool)> {
        let count = count.min(MAX_IO);
        self.core
            .read(node, offset, count)
            .await
            .map_err(|e| to_nfsstat(&e))
    }

    /// Writes `data` at `offset`; with `sync` the data is durable when this returns. Returns
    /// the attributes after the write.
    pub async fn write(&self, node: &Node, offset: u64, data: &[u8], sync: bool) -> Nfs<fattr3> {
        match self.core.write(node, offset, data, sync).await {
            Ok(a) => Ok(self.fattr(&a)),
            Err(e) => Err(to_nfsstat(&e)),
        }
    }

    /// Makes a file's acknowledged writes durable.
    pub async fn commit(&self, node: &Node) -> Nfs<()> {
        self.core.commit(node).await.map_err(|e| to_nfsstat(&e))
    }

    pub async fn setattr(&self, node: &Node, who: &Who, s: SetAttr) -> Nfs<fattr3> {
        match self.core.setattr(node, who, s).await {
            Ok(a) => Ok(self.fattr(&a)),
            Err(e) => Err(to_nfsstat(&e)),
        }
    }

    /// Creates a regular file; returns its node.
    pub async fn create(
        &self,
        dir: &Node,
        name: &[u8],
        mode: CreateMode,
        attrs: SetAttr,
    ) -> Nfs<Node> {
        self.core
            .create(dir, name, mode, attrs)
            .await
            .map_err(|e| to_nfsstat(&e))
    }

    pub async fn mkdir(&self, dir: &Node, name: &[u8], attrs: SetAttr) -> Nfs<Node> {
        self.core
            .mkdir(dir, name, attrs)
            .await
            .map_err(|e| to_nfsstat(&e))
    }

    /// Refuses what this datastore does not make (symbolic links, device files, hard links)
    /// with the error a client should see for that folder.
    pub fn refuse_special(&self, dir: &Node) -> nfsstat3 {
        to_nfsstat(&self.core.refuse_special(dir))
    }

    /// REMOVE (`rmdir` false) or RMDIR (`rmdir` true).
    pub async fn remove(&self, dir: &Node, name: &[u8], rmdir: bool) -> Nfs<()> {
        self.core
            .remove(dir, name, rmdir)
            .await
            .map_err(|e| to_nfsstat(&e))
    }

    pub async fn rename(&self, from_dir: &Node, from: &[u8], to_dir: &Node, to: &[u8]) -> Nfs<()> {
        self.core
            .rename(from_dir, from, to_dir, to)
            .await
            .map_err(|e| to_nfsstat(&e))
    }

    /// The entries of folder `dir` after `cookie` (a file id; 0: from the start), in file id
    /// order, at most `limit` of them, those the client at `ip` may use.
    pub fn readdir(&self, dir: &Node, cookie: u64, limit: usize, ip: IpAddr) -> Nfs<Vec<DirEntry>> {
        self.core
            .readdir(dir, cookie, limit, ip)
            .map_err(|e| to_nfsstat(&e))
    }

    pub fn fsinfo(&self) -> FsInfo {
        FsInfo {
            rtmax: MAX_IO,
            pref: self.core.chunk_size().min(MAX_IO),
            // At least the largest disk; 64 TiB leaves room for disks mounted later.
            maxfilesize: self.core.largest_backup_file().max(64 << 40),
        }
    }
}

fn time(t: jiff::Timestamp) -> nfstime3 {
    nfstime3 {
        seconds: u32::try_from(t.as_second()).unwrap_or(0),
        nseconds: u32::try_from(t.subsec_nanosecond()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_1970_or_after_2106_are_zero() {
        let t = jiff::Timestamp::from_second(1_700_000_000).unwrap();
        assert_eq!(time(t).seconds, 1_700_000_000);
        assert_eq!(time(jiff::Timestamp::from_second(-1).unwrap()).seconds, 0);
        assert_eq!(
            time(jiff::Timestamp::from_second(1 << 33).unwrap()).seconds,
            0
        );
    }
}
