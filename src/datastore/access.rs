//! Who may do what to a node by its mode bits, owner and group, for a caller named by the ids
//! its protocol carries (NFS's AUTH_SYS uid, gid and groups), as POSIX decides it.
//!
//! Owns: the caller ([`Who`]), the permission check ([`permits`]) and the rules of a SETATTR
//! (who may change the mode, the owner, the group, the times, the size).
//! Must not: know a protocol, or the rules per kind of node ([`super::Rights`]): a change must
//! pass both, and the core checks both.

use super::node::{Attr, FileKind};
use super::{DatastoreError, SetAttr, SetTime};

/// The most supplementary groups a caller carries (AUTH_SYS's limit, RFC 5531).
pub const MAX_GROUPS: usize = 16;

/// The user and group ids `nobody` has: what a squashed root and an unauthenticated caller
/// act as.
pub const NOBODY: u32 = 65534;

/// A caller: user, primary group, and up to [`MAX_GROUPS`] more groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Who {
    /// Root, as hypervisors connect.
    pub fn root() -> Self {
        Who {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// `nobody`.
    pub fn nobody() -> Self {
        Who {
            uid: NOBODY,
            gid: NOBODY,
            groups: Vec::new(),
        }
    }

    /// A caller with `groups` cut to [`MAX_GROUPS`].
    pub fn new(uid: u32, gid: u32, groups: &[u32]) -> Self {
        Who {
            uid,
            gid,
            groups: groups.iter().take(MAX_GROUPS).copied().collect(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// Permission bits: read, write, execute (search, for a folder).
pub const READ: u32 = 4;
pub const WRITE: u32 = 2;
pub const EXEC: u32 = 1;

/// Whether `who` has every permission in `want` (a mix of [`READ`], [`WRITE`], [`EXEC`]) on a
/// node with attributes `a`: root reads and writes anything and executes what anyone may (or
/// searches any folder); everyone else gets the owner's, the group's or the others' bits,
/// whichever class they are in first.
pub fn permits(a: &Attr, who: &Who, want: u32) -> bool {
    if who.is_root() {
        let exec_ok = want & EXEC == 0 || a.kind == FileKind::Dir || a.mode & 0o111 != 0;
        return exec_ok;
    }
    let bits = if who.uid == a.uid {
        (a.mode >> 6) & 7
    } else if who.in_group(a.gid) {
        (a.mode >> 3) & 7
    } else {
        a.mode & 7
    };
    bits & want == want
}

/// Whether `who` may set `s` on a node with attributes `a` (POSIX's rules): the mode and
/// times to a given value only by the owner or root; the owner only by root (setting it to
/// what it is is no change); the group by root, or by the owner to a group of its own; the
/// size, or the times to now, by whoever may write. [`DatastoreError::NotOwner`] or
/// [`DatastoreError::Denied`] otherwise.
pub fn may_set(a: &Attr, who: &Who, s: &SetAttr) -> Result<(), DatastoreError> {
    let owner = who.is_root() || who.uid == a.uid;
    let chown = s.uid.is_some_and(|u| u != a.uid);
    if chown && !who.is_root() {
        return Err(DatastoreError::NotOwner);
    }
    if let Some(g) = s.gid.filter(|g| *g != a.gid) {
        let own_group = who.uid == a.uid && who.in_group(g);
        if !(who.is_root() || own_group) {
            return Err(DatastoreError::NotOwner);
        }
    }
    if s.mode.is_some() && !owner {
        return Err(DatastoreError::NotOwner);
    }
    let client_time = [s.atime, s.mtime]
        .iter()
        .any(|t| matches!(t, Some(SetTime::Client(_))));
    if client_time && !owner {
        return Err(DatastoreError::NotOwner);
    }
    let now_time = [s.atime, s.mtime]
        .iter()
        .any(|t| matches!(t, Some(SetTime::Server)));
    if now_time && !owner && !permits(a, who, WRITE) {
        return Err(DatastoreError::Denied);
    }
    if s.size.is_some() && !permits(a, who, WRITE) {
        return Err(DatastoreError::Denied);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mode: u32, uid: u32, gid: u32) -> Attr {
        let t = jiff::Timestamp::UNIX_EPOCH;
        Attr {
            kind: FileKind::File,
            mode,
            nlink: 1,
            uid,
            gid,
            size: 0,
            fileid: 7,
            atime: t,
            mtime: t,
            ctime: t,
        }
    }

    #[test]
    fn mode_bits_grant_by_class_and_root_reads_and_writes_anything() {
        let user = Who::new(1000, 1000, &[27]);
        // Owner's bits, not the others', for the owner.
        assert!(permits(&file(0o600, 1000, 0), &user, READ | WRITE));
        assert!(!permits(&file(0o066, 1000, 1000), &user, READ));
        // Group bits by primary or supplementary group.
        assert!(permits(&file(0o640, 0, 27), &user, READ));
        assert!(!permits(&file(0o640, 0, 27), &user, WRITE));
        assert!(permits(&file(0o604, 0, 5), &user, READ));
        assert!(!permits(&file(0o600, 0, 5), &user, READ));
        // Root: read and write whatever the bits, execute only what someone may.
        let root = Who::root();
        assert!(permits(&file(0o000, 1000, 1000), &root, READ | WRITE));
        assert!(!permits(&file(0o644, 0, 0), &root, EXEC));
        assert!(permits(&file(0o744, 0, 0), &root, EXEC));
        // More groups than AUTH_SYS carries are cut.
        let many: Vec<u32> = (1..100).collect();
        assert_eq!(Who::new(1, 1, &many).groups.len(), MAX_GROUPS);
    }

    #[test]
    fn setattr_rules_follow_posix() {
        let a = file(0o644, 1000, 1000);
        let owner = Who::new(1000, 1000, &[27]);
        let other = Who::new(1001, 1001, &[]);
        let mode = SetAttr {
            mode: Some(0o600),
            ..SetAttr::default()
        };
        assert!(may_set(&a, &owner, &mode).is_ok());
        assert!(matches!(
            may_set(&a, &other, &mode),
            Err(DatastoreError::NotOwner)
        ));
        let chown = SetAttr {
            uid: Some(1001),
            ..SetAttr::default()
        };
        assert!(matches!(
            may_set(&a, &owner, &chown),
            Err(DatastoreError::NotOwner)
        ));
        assert!(may_set(&a, &Who::root(), &chown).is_ok());
        // The owner to its own group, not another.
        let chgrp = |g| SetAttr {
            gid: Some(g),
            ..SetAttr::default()
        };
        assert!(may_set(&a, &owner, &chgrp(27)).is_ok());
        assert!(may_set(&a, &owner, &chgrp(28)).is_err());
        // Times: a value by the owner; now by whoever may write.
        let touch = |t| SetAttr {
            mtime: Some(t),
            ..SetAttr::default()
        };
        let past = SetTime::Client(jiff::Timestamp::UNIX_EPOCH);
        assert!(may_set(&a, &other, &touch(past)).is_err());
        assert!(matches!(
            may_set(&a, &other, &touch(SetTime::Server)),
            Err(DatastoreError::Denied)
        ));
        assert!(may_set(&file(0o666, 1000, 1000), &other, &touch(SetTime::Server)).is_ok());
        // The size by whoever may write.
        assert!(may_set(&a, &other, &SetAttr::size(0)).is_err());
        assert!(may_set(&file(0o646, 1000, 1000), &other, &SetAttr::size(0)).is_ok());
    }
}
