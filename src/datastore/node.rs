//! What a file id names ([`Node`]), its attributes in no protocol's terms ([`Attr`]) and the
//! rights each kind of node grants ([`Rights`]).
//!
//! A node is resolved once per request and passed down: it holds the mount it belongs to, so
//! the steps of one request never look the mount (or the file) up again. A folder file's node
//! holds its entry as it was when resolved; [`super::DatastoreCore::attr_now`] reads it again
//! for the attributes a reply gives after a change.

use std::net::IpAddr;
use std::sync::Arc;

use crate::mount::files::{Entry, Kind};
use crate::mount::{LiveMount, ROOT_FILEID};

/// What a file id names: one of the datastore's four kinds of node.
#[derive(Debug, Clone)]
pub enum Node {
    /// The datastore's root folder (file id 1): one folder per mount.
    Root,
    /// A mount's folder (file id `mount_id << 32`).
    MountFolder(Arc<LiveMount>),
    /// A file of the backup (a disk or a descriptor; a read-only mount's config): the index
    /// into the mount's `files`.
    BackupFile(Arc<LiveMount>, usize),
    /// A file or folder the hypervisor made in the mount's folder, or the config of a
    /// read-write mount: its low 32 bits of file id and its entry as resolved.
    FolderFile(Arc<LiveMount>, u32, Entry),
}

/// The type of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    File,
    Dir,
}

/// A node's attributes. Until a client sets them, a node's times are one (a file's last
/// change, a mount's creation, the server's start for the root) and its owner and group root's
/// (a folder file's: its creator's); what a client sets is kept in the mount's namespace
/// (`mount/files.rs`), for the backup's files and the mount's folder too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub kind: FileKind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Logical size in bytes.
    pub size: u64,
    pub fileid: u64,
    pub atime: jiff::Timestamp,
    pub mtime: jiff::Timestamp,
    /// The last change of data or attributes: what a SETATTR guard compares.
    pub ctime: jiff::Timestamp,
}

/// The default modes: a read-write mount's folder and disks are open to every caller the
/// mount's allow-list admits (libvirt runs QEMU as its own user, not root, and hands that id
/// to the NFS client), a read-only mount's and the descriptors are read-only, the root is
/// root's.
pub const ROOT_MODE: u32 = 0o755;
pub const FOLDER_MODE: u32 = 0o777;
pub const FOLDER_MODE_RO: u32 = 0o555;
pub const DISK_MODE: u32 = 0o666;
pub const FILE_MODE_RO: u32 = 0o444;

/// What a client may do to a node. Reading (and looking up, in a folder) is always granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights {
    /// Change the data (a file) or the entries (a folder).
    pub modify: bool,
    /// Grow the file, or add entries to the folder.
    pub extend: bool,
    /// Remove the node from its folder (or, for a folder, entries from it).
    pub delete: bool,
}

impl Node {
    /// The node's file id: stable across restarts.
    pub fn fileid(&self) -> u64 {
        match self {
            Node::Root => ROOT_FILEID,
            Node::MountFolder(m) => m.folder_fileid(),
            Node::BackupFile(m, i) => m.files[*i].fileid,
            Node::FolderFile(m, low, _) => m.folder_fileid() | u64::from(*low),
        }
    }

    /// The generation of the mount the node belongs to (0 for the root): its creation time in
    /// nanoseconds, never 0. A mount unmounted and made again under the same id has another,
    /// so a reference a client kept from the first names nothing in the second.
    pub fn generation(&self) -> u64 {
        self.mount().map_or(0, |m| generation(m))
    }

    /// Whether a client at `ip` may use the node (`mount --allow`); the root: every client.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.mount().is_none_or(|m| m.allows(ip))
    }

    /// The name of the mount the node belongs to (none for the root).
    pub fn mount_name(&self) -> Option<&str> {
        self.mount().map(|m| m.spec.name.as_str())
    }

    pub fn kind(&self) -> FileKind {
        match self {
            Node::Root | Node::MountFolder(_) => FileKind::Dir,
            Node::BackupFile(..) => FileKind::File,
            Node::FolderFile(_, _, e) => kind_of(e),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind() == FileKind::Dir
    }

    /// The rights per kind: the root and everything of a read-only mount are read-only; a
    /// mount's folder and the files the hypervisor made are its to change; a disk of the
    /// backup takes writes into its overlay, but is never grown or removed; a descriptor takes
    /// nothing.
    pub fn rights(&self) -> Rights {
        let all = Rights {
            modify: true,
            extend: true,
            delete: true,
        };
        match self {
            Node::Root => Rights::default(),
            n if n.mount().is_some_and(|m| m.spec.read_only) => Rights::default(),
            Node::MountFolder(_) | Node::FolderFile(..) => all,
            Node::BackupFile(m, i) if m.files[*i].is_writable() => Rights {
                modify: true,
                ..Rights::default()
            },
            Node::BackupFile(..) => Rights::default(),
        }
    }

    /// The node's attributes as resolved; `started` is the root's time. The mount's folder
    /// and the backup's files show what clients set on them over their defaults.
    pub(super) fn attr(&self, started: jiff::Timestamp) -> Attr {
        let base = |kind, mode, size, fileid, t| Attr {
            kind,
            mode,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            size,
            fileid,
            atime: t,
            mtime: t,
            ctime: t,
        };
        match self {
            Node::Root => base(FileKind::Dir, ROOT_MODE, 4096, ROOT_FILEID, started),
            Node::MountFolder(m) => {
                let mode = if m.spec.read_only {
                    FOLDER_MODE_RO
                } else {
                    FOLDER_MODE
                };
                let a = base(FileKind::Dir, mode, 4096, m.folder_fileid(), m.spec.created);
                with_meta(a, m, 0)
            }
            Node::BackupFile(m, i) => {
                let f = &m.files[*i];
                let mode = if f.is_writable() {
                    DISK_MODE
                } else {
                    FILE_MODE_RO
                };
                let a = base(FileKind::File, mode, f.size(), f.fileid, m.spec.created);
                with_meta(a, m, (f.fileid & 0xffff_ffff) as u32)
            }
            Node::FolderFile(m, low, e) => entry_attr(m, *low, e),
        }
    }

    pub(super) fn mount(&self) -> Option<&Arc<LiveMount>> {
        match self {
            Node::Root => None,
            Node::MountFolder(m) | Node::BackupFile(m, _) | Node::FolderFile(m, _, _) => Some(m),
        }
    }
}

/// A folder file's attributes from its entry.
pub(super) fn entry_attr(m: &LiveMount, low: u32, e: &Entry) -> Attr {
    let (kind, nlink) = match e.kind {
        Kind::Dir => (FileKind::Dir, 2),
        Kind::File => (FileKind::File, 1),
    };
    Attr {
        kind,
        mode: e.mode,
        nlink,
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        fileid: m.folder_fileid() | u64::from(low),
        atime: e.atime(),
        mtime: e.mtime,
        ctime: e.ctime(),
    }
}

/// `a` with what clients set on the mount's folder (`low` 0) or a file of the backup.
fn with_meta(mut a: Attr, m: &LiveMount, low: u32) -> Attr {
    let Some(meta) = m.folder.as_ref().and_then(|f| f.meta(low)) else {
        return a;
    };
    a.mode = meta.mode.unwrap_or(a.mode);
    a.uid = meta.uid.unwrap_or(a.uid);
    a.gid = meta.gid.unwrap_or(a.gid);
    a.mtime = meta.mtime.unwrap_or(a.mtime);
    a.atime = meta.atime.unwrap_or(a.atime);
    a.ctime = meta.ctime.unwrap_or(a.ctime).max(a.mtime);
    a
}

fn kind_of(e: &Entry) -> FileKind {
    match e.kind {
        Kind::Dir => FileKind::Dir,
        Kind::File => FileKind::File,
    }
}

/// A mount's generation: its creation time in nanoseconds (never 0).
pub(super) fn generation(m: &LiveMount) -> u64 {
    (m.spec.created.as_nanosecond() as u64).max(1)
}
