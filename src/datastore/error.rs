//! The datastore's errors, in no protocol's terms, and where the errors of the parts below
//! (folder files, overlays, the repository) become them.
//!
//! Each protocol maps [`DatastoreError`] to its own codes in one place (NFS: `nfs/errors.rs`).
//! The text of a failure below (a path, an errno, a chunk) is kept in `Io` and `Internal`, and
//! the datastore logs reads and writes that failed with it before it is converted.

use crate::mount::files::FilesError;
use crate::mount::overlay::OverlayError;
use crate::repo::RepoError;

/// Why a datastore operation was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatastoreError {
    /// No entry of that name in the folder (or no mount of that name).
    #[error("no such file or folder")]
    NotFound,
    /// What a file id named is gone: its mount was unmounted (or made again), the file removed,
    /// or the snapshot below it forgotten.
    #[error("the file or its mount is gone")]
    Stale,
    #[error("a file or folder of that name exists")]
    Exists,
    #[error("not a folder")]
    NotDir,
    #[error("is a folder")]
    IsDir,
    #[error("the folder is not empty")]
    NotEmpty,
    /// A change to a read-only mount.
    #[error("the mount is read-only")]
    ReadOnlyMount,
    /// A write to a disk being handed over to its relocated copy.
    #[error("the disk is being handed over to its relocated copy and takes no more writes")]
    Fenced,
    /// Removing, renaming or resizing one of the backup's own files (disks, descriptors), or
    /// taking one's name.
    #[error("the backup's own files cannot be removed, renamed or resized")]
    BackupFile,
    /// A write to a file of the backup that takes none (a descriptor, a read-only mount's
    /// config).
    #[error("the file takes no writes")]
    NotWritable,
    /// A change to the datastore's root folder: mounts come and go through the control API.
    #[error("the datastore root cannot be changed")]
    Root,
    /// The caller's mode bits do not grant what it asked (a read, a write, a change in a
    /// folder, a size or a time set to now).
    #[error("permission denied by the mode bits for this caller")]
    Denied,
    /// A change only the owner or root may make (mode, times to a given value), or only root
    /// (owner; a group the owner is not in).
    #[error("only the owner or root may change that")]
    NotOwner,
    /// Attributes set on the datastore's root (the server's own, made up at each start) or on
    /// a disks-only mount (which has no namespace to keep them in).
    #[error("the datastore root and disks-only mounts keep no attributes a client sets")]
    AttrsNotKept,
    /// The mount is limited to other hosts (`mount --allow`).
    #[error("this host may not use the mount")]
    HostNotAllowed,
    /// A name that is not one path component: empty, or holding `/` or NUL.
    #[error("a name must be one path component")]
    BadName,
    #[error("a name is at most 255 bytes")]
    NameTooLong,
    /// A request this datastore cannot make sense of (why in the text).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// A rename from one mount's folder to another's.
    #[error("a rename cannot cross mounts")]
    CrossMount,
    /// The state folder is full, or the mount's folder holds all the entries it may.
    #[error("no space left")]
    NoSpace,
    /// A write past the end of a disk, or a file grown past the largest allowed.
    #[error("too big")]
    TooBig,
    /// Something this datastore does not make: symbolic links, device files, hard links.
    #[error("not supported")]
    NotSupported,
    /// The backup could not be read or the overlay's files failed (what failed in the text).
    #[error("I/O error: {0}")]
    Io(String),
    /// A failure that is the server's, not the request's.
    #[error("server fault: {0}")]
    Internal(String),
}

/// ENOSPC.
const NO_SPACE: i32 = 28;

impl From<FilesError> for DatastoreError {
    fn from(e: FilesError) -> Self {
        match e {
            FilesError::NotFound => DatastoreError::NotFound,
            FilesError::Exists => DatastoreError::Exists,
            FilesError::NotDir => DatastoreError::NotDir,
            FilesError::IsDir => DatastoreError::IsDir,
            FilesError::NotEmpty => DatastoreError::NotEmpty,
            FilesError::TooBig => DatastoreError::TooBig,
            FilesError::Full => DatastoreError::NoSpace,
            FilesError::Io { ref source, .. } if source.raw_os_error() == Some(NO_SPACE) => {
                DatastoreError::NoSpace
            }
            e @ FilesError::Io { .. } => DatastoreError::Io(e.to_string()),
        }
    }
}

impl From<OverlayError> for DatastoreError {
    fn from(e: OverlayError) -> Self {
        match e {
            OverlayError::Repo(r) => r.into(),
            OverlayError::Io { ref source, .. } if source.raw_os_error() == Some(NO_SPACE) => {
                DatastoreError::NoSpace
            }
            e @ OverlayError::Io { .. } => DatastoreError::Io(e.to_string()),
            OverlayError::NotWritable { .. } => DatastoreError::NotWritable,
            OverlayError::PastEnd { .. } => DatastoreError::TooBig,
            OverlayError::Fenced { .. } => DatastoreError::Fenced,
            // Never from a VM's request (only the relocation's copy writes a mirror).
            e @ OverlayError::Mirror { .. } => DatastoreError::Io(e.to_string()),
        }
    }
}

/// Every repository failure on the read path is an I/O error for that call only: never wrong
/// bytes, never zeros. A snapshot that is gone makes the file gone.
impl From<RepoError> for DatastoreError {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Read { source, .. } => (*source).into(),
            e @ (RepoError::Io { .. }
            | RepoError::File { .. }
            | RepoError::MissingChunk { .. }
            | RepoError::Unreachable { .. }
            | RepoError::NoBucket { .. }
            | RepoError::Denied { .. }
            | RepoError::Store { .. }
            | RepoError::CorruptChunk { .. }
            | RepoError::CorruptManifest { .. }
            | RepoError::BadRepository { .. }
            | RepoError::NotARepository { .. }
            | RepoError::Disk { .. }
            | RepoError::Task(_)) => DatastoreError::Io(e.to_string()),
            RepoError::NoSnapshot { .. } => DatastoreError::Stale,
            e @ (RepoError::AlreadyExists { .. }
            | RepoError::BadChunkSize { .. }
            | RepoError::AmbiguousSnapshot { .. }
            | RepoError::Locked { .. }
            | RepoError::InUse { .. }
            | RepoError::Invalid(_)
            | RepoError::RestoreTarget { .. }) => DatastoreError::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::ChunkId;

    fn os(code: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(code)
    }

    #[test]
    fn folder_file_errors_keep_their_meaning() {
        let io = |code| FilesError::Io {
            path: "p".into(),
            source: os(code),
        };
        let table = [
            (FilesError::NotFound, DatastoreError::NotFound),
            (FilesError::Exists, DatastoreError::Exists),
            (FilesError::NotDir, DatastoreError::NotDir),
            (FilesError::IsDir, DatastoreError::IsDir),
            (FilesError::NotEmpty, DatastoreError::NotEmpty),
            (FilesError::TooBig, DatastoreError::TooBig),
            (FilesError::Full, DatastoreError::NoSpace),
            (io(NO_SPACE), DatastoreError::NoSpace),
        ];
        for (e, want) in table {
            let text = e.to_string();
            assert_eq!(DatastoreError::from(e), want, "{text}");
        }
        let eio = DatastoreError::from(io(5));
        assert!(
            matches!(&eio, DatastoreError::Io(t) if t.contains("mount folder files p")),
            "the path is kept: {eio}"
        );
    }

    #[test]
    fn overlay_and_read_failures_are_io_errors_with_their_text() {
        let io = |code| OverlayError::Io {
            path: "p".into(),
            source: os(code),
        };
        assert_eq!(DatastoreError::from(io(NO_SPACE)), DatastoreError::NoSpace);
        assert!(matches!(DatastoreError::from(io(5)), DatastoreError::Io(_)));
        let past = OverlayError::PastEnd {
            offset: 1,
            len: 2,
            size: 2,
        };
        assert_eq!(DatastoreError::from(past), DatastoreError::TooBig);
        let ro = OverlayError::NotWritable {
            file: "x.vmx".into(),
        };
        assert_eq!(DatastoreError::from(ro), DatastoreError::NotWritable);
        let fenced = OverlayError::Fenced { file: "d".into() };
        assert_eq!(DatastoreError::from(fenced), DatastoreError::Fenced);

        let chunk = ChunkId([1; 32]);
        let read = RepoError::Read {
            disk: "d".into(),
            offset: 5,
            chunk,
            source: Box::new(RepoError::CorruptChunk {
                chunk,
                what: "x".into(),
            }),
        };
        match DatastoreError::from(OverlayError::Repo(read)) {
            DatastoreError::Io(t) => assert!(t.contains(&chunk.to_string()), "{t}"),
            other => panic!("a corrupt chunk is an I/O error, not {other:?}"),
        }
        let missing = RepoError::MissingChunk { chunk };
        assert!(matches!(
            DatastoreError::from(missing),
            DatastoreError::Io(_)
        ));
        assert!(matches!(
            DatastoreError::from(RepoError::Task("panic".into())),
            DatastoreError::Io(_)
        ));
        assert!(matches!(
            DatastoreError::from(RepoError::Invalid("x".into())),
            DatastoreError::Internal(_)
        ));
    }
}
