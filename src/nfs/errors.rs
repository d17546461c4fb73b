//! The one place repository errors become NFS status codes.

use nfs3_types::nfs3::nfsstat3;

use crate::mount::files::FilesError;
use crate::mount::overlay::OverlayError;
use crate::repo::RepoError;

/// The NFS status for a failed change to a mount's folder files.
pub fn files_to_nfsstat(e: &FilesError) -> nfsstat3 {
    match e {
        FilesError::NotFound => nfsstat3::NFS3ERR_NOENT,
        FilesError::Exists => nfsstat3::NFS3ERR_EXIST,
        FilesError::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        FilesError::IsDir => nfsstat3::NFS3ERR_ISDIR,
        FilesError::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        FilesError::TooBig => nfsstat3::NFS3ERR_FBIG,
        FilesError::Full => nfsstat3::NFS3ERR_NOSPC,
        FilesError::Io { source, .. } if source.raw_os_error() == Some(28) => {
            nfsstat3::NFS3ERR_NOSPC
        }
        FilesError::Io { .. } => nfsstat3::NFS3ERR_IO,
    }
}

/// The NFS status for a failed read or write of a mount's file.
pub fn overlay_to_nfsstat(e: &OverlayError) -> nfsstat3 {
    match e {
        OverlayError::Repo(r) => to_nfsstat(r),
        OverlayError::Io { source, .. } if source.raw_os_error() == Some(28) => {
            nfsstat3::NFS3ERR_NOSPC
        }
        OverlayError::Io { .. } => nfsstat3::NFS3ERR_IO,
        OverlayError::NotWritable { .. } => nfsstat3::NFS3ERR_ACCES,
        OverlayError::PastEnd { .. } => nfsstat3::NFS3ERR_FBIG,
        OverlayError::Fenced { .. } => nfsstat3::NFS3ERR_ROFS,
        // Never from a VM's request (only the relocation's copy writes a mirror).
        OverlayError::Mirror { .. } => nfsstat3::NFS3ERR_IO,
    }
}

/// The NFS status a client gets for a failed read. Every repository failure on the read path is
/// an I/O error for that call only: never wrong bytes, never zeros.
pub fn to_nfsstat(e: &RepoError) -> nfsstat3 {
    match e {
        RepoError::Read { source, .. } => to_nfsstat(source),
        RepoError::Io { .. }
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
        | RepoError::Task(_) => nfsstat3::NFS3ERR_IO,
        RepoError::NoSnapshot { .. } => nfsstat3::NFS3ERR_STALE,
        RepoError::AlreadyExists { .. }
        | RepoError::BadChunkSize { .. }
        | RepoError::AmbiguousSnapshot { .. }
        | RepoError::Locked { .. }
        | RepoError::InUse { .. }
        | RepoError::Invalid(_)
        | RepoError::RestoreTarget { .. } => nfsstat3::NFS3ERR_SERVERFAULT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::ChunkId;

    #[test]
    fn read_failures_are_io_errors() {
        let corrupt = RepoError::CorruptChunk {
            chunk: ChunkId([1; 32]),
            what: "x".into(),
        };
        let table = [
            (
                RepoError::MissingChunk {
                    chunk: ChunkId([1; 32]),
                },
                nfsstat3::NFS3ERR_IO,
            ),
            (
                RepoError::Read {
                    disk: "d".into(),
                    offset: 5,
                    chunk: ChunkId([1; 32]),
                    source: Box::new(corrupt),
                },
                nfsstat3::NFS3ERR_IO,
            ),
            (RepoError::Task("panic".into()), nfsstat3::NFS3ERR_IO),
            (
                RepoError::Invalid("x".into()),
                nfsstat3::NFS3ERR_SERVERFAULT,
            ),
        ];
        for (e, want) in table {
            assert_eq!(to_nfsstat(&e), want, "{e}");
        }
        let io = |code| OverlayError::Io {
            path: "p".into(),
            source: std::io::Error::from_raw_os_error(code),
        };
        assert_eq!(
            overlay_to_nfsstat(&io(28)),
            nfsstat3::NFS3ERR_NOSPC,
            "ENOSPC"
        );
        assert_eq!(overlay_to_nfsstat(&io(5)), nfsstat3::NFS3ERR_IO);
        let past = OverlayError::PastEnd {
            offset: 1,
            len: 2,
            size: 2,
        };
        assert_eq!(overlay_to_nfsstat(&past), nfsstat3::NFS3ERR_FBIG);
        let ro = OverlayError::NotWritable {
            file: "x.vmx".into(),
        };
        assert_eq!(overlay_to_nfsstat(&ro), nfsstat3::NFS3ERR_ACCES);
    }
}
