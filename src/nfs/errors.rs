//! The one place repository errors become NFS status codes.

use nfs3_server::nfs3_types::nfs3::nfsstat3;

use crate::repo::RepoError;

/// The NFS status a client gets for a failed read. Every repository failure on the read path is
/// an I/O error for that call only: never wrong bytes, never zeros.
pub fn to_nfsstat(e: &RepoError) -> nfsstat3 {
    match e {
        RepoError::Read { source, .. } => to_nfsstat(source),
        RepoError::Io { .. }
        | RepoError::MissingChunk { .. }
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
    }
}
