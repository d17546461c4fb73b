//! The one place the datastore's errors become NFS status codes. (A handle this datastore did
//! not make is NFS3ERR_BADHANDLE in `handle.rs`, before the datastore sees anything, and
//! SETATTR's guard and READDIR's page size are NFS's own, in `dispatch.rs`.)

use nfs3_types::nfs3::nfsstat3;

use crate::datastore::DatastoreError;

/// The NFS status for a refused or failed datastore operation.
pub fn to_nfsstat(e: &DatastoreError) -> nfsstat3 {
    match e {
        DatastoreError::NotFound => nfsstat3::NFS3ERR_NOENT,
        DatastoreError::Stale => nfsstat3::NFS3ERR_STALE,
        DatastoreError::Exists => nfsstat3::NFS3ERR_EXIST,
        DatastoreError::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        DatastoreError::IsDir => nfsstat3::NFS3ERR_ISDIR,
        DatastoreError::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        DatastoreError::ReadOnlyMount | DatastoreError::Fenced => nfsstat3::NFS3ERR_ROFS,
        DatastoreError::BackupFile | DatastoreError::NotOwner | DatastoreError::AttrsNotKept => {
            nfsstat3::NFS3ERR_PERM
        }
        DatastoreError::NotWritable
        | DatastoreError::Denied
        | DatastoreError::Root
        | DatastoreError::HostNotAllowed
        | DatastoreError::BadName => nfsstat3::NFS3ERR_ACCES,
        DatastoreError::NameTooLong => nfsstat3::NFS3ERR_NAMETOOLONG,
        DatastoreError::Invalid(_) => nfsstat3::NFS3ERR_INVAL,
        DatastoreError::CrossMount => nfsstat3::NFS3ERR_XDEV,
        DatastoreError::NoSpace => nfsstat3::NFS3ERR_NOSPC,
        DatastoreError::TooBig => nfsstat3::NFS3ERR_FBIG,
        DatastoreError::NotSupported => nfsstat3::NFS3ERR_NOTSUPP,
        DatastoreError::Io(_) => nfsstat3::NFS3ERR_IO,
        DatastoreError::Internal(_) => nfsstat3::NFS3ERR_SERVERFAULT,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::files::FilesError;
    use crate::mount::overlay::OverlayError;
    use crate::repo::{ChunkId, RepoError};

    /// Each datastore error and the status the NFS server answered for it before the core
    /// existed (where `nfs/fs.rs` chose it in place).
    #[test]
    fn every_datastore_error_maps_to_the_status_clients_got_before() {
        let table = [
            // LOOKUP of a missing name, MNT of an unknown mount.
            (DatastoreError::NotFound, nfsstat3::NFS3ERR_NOENT),
            // A handle of an unmounted mount or a removed file.
            (DatastoreError::Stale, nfsstat3::NFS3ERR_STALE),
            // CREATE/MKDIR of a name that exists, of `.`/`..`, or of a backup file's name.
            (DatastoreError::Exists, nfsstat3::NFS3ERR_EXIST),
            (DatastoreError::NotDir, nfsstat3::NFS3ERR_NOTDIR),
            // READ or WRITE of a folder.
            (DatastoreError::IsDir, nfsstat3::NFS3ERR_ISDIR),
            (DatastoreError::NotEmpty, nfsstat3::NFS3ERR_NOTEMPTY),
            // Any change on a read-only mount; a write to a disk fenced for its relocation.
            (DatastoreError::ReadOnlyMount, nfsstat3::NFS3ERR_ROFS),
            (DatastoreError::Fenced, nfsstat3::NFS3ERR_ROFS),
            // REMOVE, RENAME or a resize of a backup file.
            (DatastoreError::BackupFile, nfsstat3::NFS3ERR_PERM),
            // A SETATTR of mode, owner, group or times the caller may not make (not the owner,
            // not root).
            (DatastoreError::NotOwner, nfsstat3::NFS3ERR_PERM),
            // A SETATTR of the datastore root or of a disks-only mount: nowhere to keep it.
            (DatastoreError::AttrsNotKept, nfsstat3::NFS3ERR_PERM),
            // What the mode bits deny the caller: the same answer as ACCESS's.
            (DatastoreError::Denied, nfsstat3::NFS3ERR_ACCES),
            // A write to a descriptor; a change to the root; a mount of other hosts; a name
            // that is not one component.
            (DatastoreError::NotWritable, nfsstat3::NFS3ERR_ACCES),
            (DatastoreError::Root, nfsstat3::NFS3ERR_ACCES),
            (DatastoreError::HostNotAllowed, nfsstat3::NFS3ERR_ACCES),
            (DatastoreError::BadName, nfsstat3::NFS3ERR_ACCES),
            (DatastoreError::NameTooLong, nfsstat3::NFS3ERR_NAMETOOLONG),
            // REMOVE of `.`, a new name that is not UTF-8.
            (DatastoreError::Invalid("x"), nfsstat3::NFS3ERR_INVAL),
            (DatastoreError::CrossMount, nfsstat3::NFS3ERR_XDEV),
            (DatastoreError::NoSpace, nfsstat3::NFS3ERR_NOSPC),
            (DatastoreError::TooBig, nfsstat3::NFS3ERR_FBIG),
            // SYMLINK, MKNOD, LINK in a folder that may change.
            (DatastoreError::NotSupported, nfsstat3::NFS3ERR_NOTSUPP),
            (DatastoreError::Io("x".into()), nfsstat3::NFS3ERR_IO),
            (
                DatastoreError::Internal("x".into()),
                nfsstat3::NFS3ERR_SERVERFAULT,
            ),
        ];
        let mut seen = [false; VARIANTS];
        for (e, want) in table {
            assert_eq!(to_nfsstat(&e), want, "{e:?}");
            seen[variant(&e)] = true;
        }
        assert!(seen.iter().all(|s| *s), "a variant has no row: {seen:?}");
    }

    /// How many variants [`DatastoreError`] has.
    const VARIANTS: usize = 24;

    /// A variant's number. No wildcard: a new variant does not compile until it has a number
    /// here, and then the test above fails until the table has a row for it.
    fn variant(e: &DatastoreError) -> usize {
        match e {
            DatastoreError::NotFound => 0,
            DatastoreError::Stale => 1,
            DatastoreError::Exists => 2,
            DatastoreError::NotDir => 3,
            DatastoreError::IsDir => 4,
            DatastoreError::NotEmpty => 5,
            DatastoreError::ReadOnlyMount => 6,
            DatastoreError::Fenced => 7,
            DatastoreError::BackupFile => 8,
            DatastoreError::NotWritable => 9,
            DatastoreError::Root => 10,
            DatastoreError::HostNotAllowed => 11,
            DatastoreError::BadName => 12,
            DatastoreError::NameTooLong => 13,
            DatastoreError::Invalid(_) => 14,
            DatastoreError::CrossMount => 15,
            DatastoreError::NoSpace => 16,
            DatastoreError::TooBig => 17,
            DatastoreError::NotSupported => 18,
            DatastoreError::Io(_) => 19,
            DatastoreError::Internal(_) => 20,
            DatastoreError::Denied => 21,
            DatastoreError::NotOwner => 22,
            DatastoreError::AttrsNotKept => 23,
        }
    }

    /// The errors of the parts below reach clients as the old `files_to_nfsstat`,
    /// `overlay_to_nfsstat` and `to_nfsstat(RepoError)` made them.
    #[test]
    fn errors_below_keep_their_old_status() {
        let files_io = |code| FilesError::Io {
            path: "p".into(),
            source: std::io::Error::from_raw_os_error(code),
        };
        let files = [
            (FilesError::NotFound, nfsstat3::NFS3ERR_NOENT),
            (FilesError::Exists, nfsstat3::NFS3ERR_EXIST),
            (FilesError::NotDir, nfsstat3::NFS3ERR_NOTDIR),
            (FilesError::IsDir, nfsstat3::NFS3ERR_ISDIR),
            (FilesError::NotEmpty, nfsstat3::NFS3ERR_NOTEMPTY),
            (FilesError::TooBig, nfsstat3::NFS3ERR_FBIG),
            (FilesError::Full, nfsstat3::NFS3ERR_NOSPC),
            (files_io(28), nfsstat3::NFS3ERR_NOSPC),
            (files_io(5), nfsstat3::NFS3ERR_IO),
        ];
        for (e, want) in files {
            let text = e.to_string();
            assert_eq!(to_nfsstat(&e.into()), want, "{text}");
        }
        let overlay_io = |code| OverlayError::Io {
            path: "p".into(),
            source: std::io::Error::from_raw_os_error(code),
        };
        let chunk = ChunkId([1; 32]);
        let overlay = [
            (overlay_io(28), nfsstat3::NFS3ERR_NOSPC),
            (overlay_io(5), nfsstat3::NFS3ERR_IO),
            (
                OverlayError::NotWritable {
                    file: "x.vmx".into(),
                },
                nfsstat3::NFS3ERR_ACCES,
            ),
            (
                OverlayError::PastEnd {
                    offset: 1,
                    len: 2,
                    size: 2,
                },
                nfsstat3::NFS3ERR_FBIG,
            ),
            (
                OverlayError::Fenced { file: "d".into() },
                nfsstat3::NFS3ERR_ROFS,
            ),
            (
                OverlayError::Mirror {
                    path: "p".into(),
                    source: std::io::Error::from_raw_os_error(5),
                },
                nfsstat3::NFS3ERR_IO,
            ),
            (
                OverlayError::Repo(RepoError::MissingChunk { chunk }),
                nfsstat3::NFS3ERR_IO,
            ),
            (
                OverlayError::Repo(RepoError::Read {
                    disk: "d".into(),
                    offset: 5,
                    chunk,
                    source: Box::new(RepoError::CorruptChunk {
                        chunk,
                        what: "x".into(),
                    }),
                }),
                nfsstat3::NFS3ERR_IO,
            ),
            (
                OverlayError::Repo(RepoError::Task("panic".into())),
                nfsstat3::NFS3ERR_IO,
            ),
            (
                OverlayError::Repo(RepoError::NoSnapshot {
                    spec: "s".into(),
                    hint: String::new(),
                }),
                nfsstat3::NFS3ERR_STALE,
            ),
            (
                OverlayError::Repo(RepoError::Invalid("x".into())),
                nfsstat3::NFS3ERR_SERVERFAULT,
            ),
        ];
        for (e, want) in overlay {
            let text = e.to_string();
            assert_eq!(to_nfsstat(&e.into()), want, "{text}");
        }
    }
}
