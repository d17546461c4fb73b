//! A relocation's destination: the folders relocations may write into (`relocate_roots` in
//! serve's config), the way from a root down to a destination folder, and every file operation
//! in that folder.
//!
//! Owns:
//! - [`RelocateRoots`]: the roots, checked when `serve` starts (absolute, no `..`, existing
//!   folders). With none, relocation is off.
//! - [`DestDir`]: a destination folder held open as a directory handle for its relocation's
//!   life. It is reached from its root one name at a time (openat with O_DIRECTORY|O_NOFOLLOW;
//!   a missing folder made with mkdirat and the folder above it fsynced), so a symbolic link
//!   anywhere below the root is refused, as is `..`. A folder swapped for a link later changes
//!   nothing: every file is made, opened, replaced, synced and removed relative to the handle.
//!   New files are made with O_CREAT|O_EXCL|O_NOFOLLOW, existing ones opened with O_NOFOLLOW
//!   (regular files only), files replaced through [`durable::put_at`], removed with unlinkat.
//! - [`plain_name`]: the only names a destination takes (one component, not `.` or `..`, no
//!   NUL, at most 255 bytes). Every file operation refuses other names.
//!
//! Must not: decide what goes into a destination (the relocation does), or follow a symbolic
//! link below a root. Trust: a root's own path is the operator's and may hold symbolic links;
//! nothing below a root is trusted. Every function blocks (file I/O): async callers run them on
//! the blocking pool.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::durable;

/// The longest name a destination takes (NAME_MAX of Linux file systems).
pub const MAX_NAME: usize = 255;

/// How folders on the way to a destination, and the destination itself, are opened.
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);
/// How files in a destination are opened: to read and write, never through a link.
const FILE_FLAGS: OFlags = OFlags::RDWR
    .union(OFlags::NOFOLLOW)
    .union(OFlags::NOCTTY)
    .union(OFlags::CLOEXEC);

/// Why a destination, or a root, is refused. Each names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    #[error(
        "relocation is off on this server: set relocate_roots in serve's config to the folders \
         relocations may write into, then restart it"
    )]
    NoRoots,
    #[error("relocate_roots in serve's config: {root} {what}")]
    BadRoot { root: String, what: String },
    #[error(
        "relocation destination {path} is not under relocate_roots ({roots}); give a folder \
         under one of them, or add one to relocate_roots in serve's config"
    )]
    Outside { path: String, roots: String },
    #[error(
        "relocation destination {path} has a `..` component; give the folder's path without it"
    )]
    DotDot { path: String },
    #[error("relocation destination {path} is a relocate root itself; give a new folder under it")]
    IsRoot { path: String },
    #[error(
        "relocation destination {path}: {at} is a symbolic link; give the real folder's path \
         (no link below a relocate root is followed)"
    )]
    Link { path: String, at: String },
    #[error("relocation destination {path}: {at} is not a folder")]
    NotAFolder { path: String, at: String },
    #[error("relocation destination {path}: {at} does not exist")]
    Missing { path: String, at: String },
    #[error("relocation destination {path} is not empty; relocate into a new or empty folder")]
    NotEmpty { path: String },
    #[error("relocation destination {path}: {at}: {source}")]
    Io {
        path: String,
        at: String,
        source: io::Error,
    },
}

/// Whether `name` may be a file's name in a destination: a single component, not `.` or `..`,
/// without NUL, at most [`MAX_NAME`] bytes.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
        && name.len() <= MAX_NAME
}

/// `name` if it is a plain name, else an `InvalidInput` error naming it.
fn plain(name: &str) -> io::Result<&str> {
    if plain_name(name) {
        Ok(name)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ))
    }
}

/// The folders relocations may write into (`relocate_roots` in serve's config).
#[derive(Debug, Clone, Default)]
pub struct RelocateRoots(Arc<[PathBuf]>);

impl RelocateRoots {
    /// Checks the roots: each absolute, without `..`, and an existing folder (a symbolic link
    /// to one counts: a root's own path is the operator's). None: relocation is off.
    pub fn new(roots: Vec<PathBuf>) -> Result<RelocateRoots, DestError> {
        for root in &roots {
            let bad = |what: String| DestError::BadRoot {
                root: root.display().to_string(),
                what,
            };
            if !root.is_absolute() {
                return Err(bad("is not absolute; give absolute folders".into()));
            }
            if root.components().any(|c| c == Component::ParentDir) {
                return Err(bad(
                    "has a `..` component; give the folder's path without it".into(),
                ));
            }
            match std::fs::metadata(root) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(bad("is not a folder".into())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(bad(
                        "does not exist; make it, or take it out of the list".into()
                    ))
                }
                Err(e) => return Err(bad(format!("cannot be read: {e}"))),
            }
        }
        Ok(RelocateRoots(roots.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.0
    }

    /// The root `dest` lies under (the deepest, if several) and the names from it to `dest`.
    /// Only the text of the paths is compared: nothing is read.
    fn locate<'a>(&'a self, dest: &'a Path) -> Result<(&'a Path, Vec<&'a OsStr>), DestError> {
        let path = || dest.display().to_string();
        if self.0.is_empty() {
            return Err(DestError::NoRoots);
        }
        if dest.components().any(|c| c == Component::ParentDir) {
            return Err(DestError::DotDot { path: path() });
        }
        let outside = || DestError::Outside {
            path: path(),
            roots: self
                .0
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        };
        let root = self
            .0
            .iter()
            .filter(|r| dest.starts_with(r))
            .max_by_key(|r| r.components().count())
            .ok_or_else(outside)?;
        let rest = dest.strip_prefix(root).map_err(|_| outside())?;
        let mut names = Vec::new();
        for c in rest.components() {
            match c {
                Component::Normal(n) => names.push(n),
                _ => return Err(DestError::DotDot { path: path() }),
            }
        }
        if names.is_empty() {
            return Err(DestError::IsRoot { path: path() });
        }
        Ok((root, names))
    }

    /// Opens the destination folder `dest` from its root, one name at a time, never through a
    /// symbolic link. `create`: the folders missing below the root are made (each durable);
    /// otherwise a missing one is [`DestError::Missing`].
    pub fn open(&self, dest: &Path, create: bool) -> Result<DestDir, DestError> {
        let (root, names) = self.locate(dest)?;
        let path = || dest.display().to_string();
        let io_at = |at: &Path, e: io::Error| DestError::Io {
            path: path(),
            at: at.display().to_string(),
            source: e,
        };
        let mut cur =
            rustix::fs::open(root, DIR_FLAGS, Mode::empty()).map_err(|e| io_at(root, e.into()))?;
        let mut at = root.to_path_buf();
        let mut parent = None;
        for name in &names {
            at.push(name);
            let opened = match open_dir_at(&cur, name) {
                Err(Errno::NOENT) if create => {
                    durable::create_dir_at(&cur, name).map_err(|e| io_at(&at, e))?;
                    open_dir_at(&cur, name)
                }
                r => r,
            };
            let next = match opened {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    return Err(DestError::Missing {
                        path: path(),
                        at: at.display().to_string(),
                    })
                }
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    let link = rustix::fs::statat(&cur, *name, AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink);
                    let at = at.display().to_string();
                    return Err(if link {
                        DestError::Link { path: path(), at }
                    } else {
                        DestError::NotAFolder { path: path(), at }
                    });
                }
                Err(e) => return Err(io_at(&at, e.into())),
            };
            parent = Some(std::mem::replace(&mut cur, next));
        }
        let (Some(parent), Some(name)) = (parent, names.last()) else {
            return Err(DestError::IsRoot { path: path() });
        };
        Ok(DestDir {
            path: dest.to_path_buf(),
            fd: cur,
            parent,
            name: name.to_os_string(),
        })
    }

    /// Checks the destination of a new relocation without making anything: under a root,
    /// reached without a symbolic link, and missing or an empty folder.
    pub fn check_new(&self, dest: &Path) -> Result<(), DestError> {
        match self.open(dest, false) {
            Ok(d) => match d.is_empty() {
                Ok(true) => Ok(()),
                Ok(false) => Err(DestError::NotEmpty {
                    path: dest.display().to_string(),
                }),
                Err(e) => Err(DestError::Io {
                    path: dest.display().to_string(),
                    at: dest.display().to_string(),
                    source: e,
                }),
            },
            Err(DestError::Missing { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn open_dir_at(dir: &OwnedFd, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(dir, name, DIR_FLAGS | OFlags::NOFOLLOW, Mode::empty())
}

/// A relocation's destination folder, held open: every file operation is relative to it.
#[derive(Debug)]
pub struct DestDir {
    /// The path it was reached by, for messages and the VM's config.
    path: PathBuf,
    fd: OwnedFd,
    /// The folder holding it, and its name there (to remove it once empty).
    parent: OwnedFd,
    name: OsString,
}

impl DestDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the folder holds something named `name` (a symbolic link counts, unfollowed).
    pub fn exists(&self, name: &str) -> io::Result<bool> {
        match rustix::fs::statat(&self.fd, plain(name)?, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes the new file `name` to read and write (O_CREAT|O_EXCL|O_NOFOLLOW: an existing
    /// name, a symbolic link among them, is `AlreadyExists`). Its name is durable after
    /// [`DestDir::sync`].
    pub fn create_new(&self, name: &str) -> io::Result<File> {
        let flags = FILE_FLAGS | OFlags::CREATE | OFlags::EXCL;
        let fd = rustix::fs::openat(&self.fd, plain(name)?, flags, Mode::from_raw_mode(0o666))?;
        Ok(File::from(fd))
    }

    /// Opens the existing file `name` to read and write. A symbolic link (O_NOFOLLOW), or
    /// anything but a regular file, is refused.
    pub fn open(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(&self.fd, plain(name)?, FILE_FLAGS, Mode::empty())?;
        let file = File::from(fd);
        if FileType::from_raw_mode(rustix::fs::fstat(&file)?.st_mode) != FileType::RegularFile {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a regular file"),
            ));
        }
        Ok(file)
    }

    /// Opens the file `name`, making it if it does not exist. Returns whether it was made:
    /// then its name is durable after [`DestDir::sync`].
    pub fn open_or_create(&self, name: &str) -> io::Result<(File, bool)> {
        loop {
            match self.open(name) {
                Ok(f) => return Ok((f, false)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            match self.create_new(name) {
                Ok(f) => return Ok((f, true)),
                // Made meanwhile by someone else: open that one (or refuse it).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Replaces the file `name` whole with `bytes` ([`durable::put_at`]: a symbolic link of that
    /// name is replaced, not followed). The folder's names are durable after [`DestDir::sync`].
    pub fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        durable::put_at(&self.fd, OsStr::new(plain(name)?), bytes)
    }

    /// Makes the folder's names durable (fsync through the handle).
    pub fn sync(&self) -> io::Result<()> {
        durable::fsync_dir_at(&self.fd)
    }

    /// Removes the file `name` (a missing one is no error).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.fd, plain(name)?, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the temporary files an interrupted [`DestDir::replace`] left. Returns how many.
    pub fn remove_tmp_files(&self) -> io::Result<usize> {
        durable::remove_tmp_files_at(&self.fd)
    }

    /// Whether the folder holds nothing.
    pub fn is_empty(&self) -> io::Result<bool> {
        for entry in rustix::fs::Dir::read_from(&self.fd)? {
            let name = entry?.file_name().to_bytes().to_vec();
            if name != b"." && name != b".." {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Removes the folder itself if it is empty and its name in the folder above still names
    /// it. Returns whether it was removed.
    pub fn remove_if_empty(&self) -> io::Result<bool> {
        let here = rustix::fs::fstat(&self.fd)?;
        match rustix::fs::statat(&self.parent, &self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_dev == here.st_dev && st.st_ino == here.st_ino => {}
            Ok(_) | Err(Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        match rustix::fs::unlinkat(&self.parent, &self.name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(true),
            Err(Errno::NOTEMPTY | Errno::EXIST | Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    use crate::durable::sorted_names as names;

    /// A root and a folder outside it.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf, RelocateRoots) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        fs::create_dir(&root).unwrap();
        fs::create_dir(&outside).unwrap();
        let roots = RelocateRoots::new(vec![root.clone()]).unwrap();
        (t, root, outside, roots)
    }

    #[test]
    fn roots_must_be_absolute_existing_folders_without_dotdot() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("f");
        fs::write(&file, b"x").unwrap();
        for (root, want) in [
            (PathBuf::from("primary"), "is not absolute"),
            (t.path().join("a/../b"), "`..`"),
            (t.path().join("missing"), "does not exist"),
            (file, "is not a folder"),
        ] {
            let e = RelocateRoots::new(vec![t.path().into(), root.clone()])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("relocate_roots in serve's config"), "{e}");
            assert!(
                e.contains(&root.display().to_string()) && e.contains(want),
                "{e}"
            );
        }
        assert!(RelocateRoots::new(Vec::new()).unwrap().is_empty());
        // A root's own path is the operator's: a link to a folder is taken.
        let link = t.path().join("link");
        symlink(t.path(), &link).unwrap();
        assert_eq!(
            RelocateRoots::new(vec![link.clone()]).unwrap().roots(),
            [link]
        );
    }

    #[test]
    fn destinations_outside_the_roots_through_a_link_or_with_dotdot_are_refused_and_nothing_is_made(
    ) {
        let (t, root, outside, roots) = setup();
        symlink(&outside, root.join("link")).unwrap();
        fs::write(root.join("file"), b"x").unwrap();
        let cases = [
            (t.path().join("elsewhere/vm"), "is not under relocate_roots"),
            (t.path().join("rootx/vm"), "is not under relocate_roots"),
            (root.join("link/vm"), "is a symbolic link"),
            (root.join("link"), "is a symbolic link"),
            (root.join("../outside/vm"), "`..`"),
            (root.join("a/../../outside/vm"), "`..`"),
            (root.clone(), "is a relocate root itself"),
            (root.join("file/vm"), "is not a folder"),
        ];
        for (dest, want) in &cases {
            for create in [false, true] {
                let e = roots.open(dest, create).unwrap_err().to_string();
                assert!(e.contains(want), "{dest:?}: {e}");
                assert!(e.contains(&dest.display().to_string()), "{e}");
            }
            let e = roots.check_new(dest).unwrap_err().to_string();
            assert!(e.contains(want), "{dest:?}: {e}");
        }
        assert!(names(&outside).is_empty());
        assert_eq!(names(&root), ["file", "link"]);
        assert!(!t.path().join("elsewhere").exists());
        // No roots: every destination is refused, saying what to set.
        let none = RelocateRoots::default();
        let e = none.open(&root.join("vm"), true).unwrap_err();
        assert!(matches!(e, DestError::NoRoots), "{e}");
        let e = none.check_new(&root.join("vm")).unwrap_err().to_string();
        assert!(e.contains("set relocate_roots in serve's config"), "{e}");
        assert_eq!(names(&root), ["file", "link"]);
    }

    #[test]
    fn missing_folders_below_a_root_are_made_and_a_new_destination_must_be_empty() {
        let (_t, root, _, roots) = setup();
        let dest = root.join("a/b/vm");
        roots.check_new(&dest).unwrap();
        assert!(names(&root).is_empty(), "a check makes nothing");
        let e = roots.open(&dest, false).unwrap_err();
        assert!(matches!(e, DestError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("a does not exist"), "{e}");
        let d = roots.open(&dest, true).unwrap();
        assert_eq!(d.path(), dest);
        assert!(dest.is_dir());
        roots.check_new(&dest).unwrap();
        d.create_new("x").unwrap();
        let e = roots.check_new(&dest).unwrap_err().to_string();
        assert!(e.contains("is not empty"), "{e}");
        // Nested roots: the deepest one is walked from.
        let nested = RelocateRoots::new(vec![root.clone(), root.join("a")]).unwrap();
        assert_eq!(nested.locate(&dest).unwrap().0, root.join("a"));
        assert!(nested.open(&dest, false).unwrap().exists("x").unwrap());
    }

    #[test]
    fn a_destination_swapped_for_a_link_keeps_every_byte_in_the_folder_it_held() {
        let (_t, root, outside, roots) = setup();
        for n in ["disk.img", "vm.xml"] {
            fs::write(outside.join(n), b"decoy").unwrap();
        }
        let dest = root.join("vm");
        let d = roots.open(&dest, true).unwrap();
        std::io::Write::write_all(&mut d.create_new("disk.img").unwrap(), b"copy").unwrap();
        // Swapped after the start: the folder moved away, a link to elsewhere in its place.
        fs::rename(&dest, root.join("moved")).unwrap();
        symlink(&outside, &dest).unwrap();
        d.replace("vm.xml", b"<domain/>").unwrap();
        d.replace("vm.nvram", b"nvram").unwrap();
        d.sync().unwrap();
        let mut copy = String::new();
        std::io::Read::read_to_string(&mut d.open("disk.img").unwrap(), &mut copy).unwrap();
        assert_eq!(copy, "copy");
        d.remove("disk.img").unwrap();
        assert_eq!(d.remove_tmp_files().unwrap(), 0);
        assert!(!d.remove_if_empty().unwrap(), "not empty");
        assert_eq!(names(&outside), ["disk.img", "vm.xml"]);
        for n in ["disk.img", "vm.xml"] {
            assert_eq!(fs::read(outside.join(n)).unwrap(), b"decoy");
        }
        assert_eq!(names(&root.join("moved")), ["vm.nvram", "vm.xml"]);
        assert_eq!(fs::read(root.join("moved/vm.xml")).unwrap(), b"<domain/>");
        // Reached again through the roots, the link is refused.
        let e = roots.open(&dest, false).unwrap_err();
        assert!(matches!(e, DestError::Link { .. }), "{e}");
        // Emptied, the folder is not removed where it is no longer (the link stays).
        d.remove("vm.xml").unwrap();
        d.remove("vm.nvram").unwrap();
        assert!(!d.remove_if_empty().unwrap());
        assert!(root.join("moved").is_dir() && dest.is_symlink());
    }

    #[test]
    fn files_are_never_opened_through_a_link_and_only_plain_names_are_taken() {
        let (_t, root, outside, roots) = setup();
        let target = outside.join("target");
        fs::write(&target, b"secret").unwrap();
        let d = roots.open(&root.join("vm"), true).unwrap();
        symlink(&target, root.join("vm/link")).unwrap();
        symlink(outside.join("nothing"), root.join("vm/dangling")).unwrap();
        fs::create_dir(root.join("vm/sub")).unwrap();
        for name in ["link", "dangling"] {
            let e = d.create_new(name).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{name}");
            assert!(d.open(name).is_err(), "{name}");
            assert!(d.open_or_create(name).is_err(), "{name}");
            assert!(d.exists(name).unwrap());
        }
        assert!(d.open("sub").is_err());
        assert!(!outside.join("nothing").exists());
        // A replace puts a file in the link's place; the link's target is untouched.
        d.replace("link", b"x").unwrap();
        assert!(!root.join("vm/link").is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"secret");
        let long = "n".repeat(MAX_NAME + 1);
        for bad in ["", ".", "..", "../x", "a/b", "/x", "a\0b", long.as_str()] {
            assert!(!plain_name(bad), "{bad:?}");
            let kinds = [
                d.create_new(bad).map(drop),
                d.open(bad).map(drop),
                d.open_or_create(bad).map(drop),
                d.replace(bad, b"x"),
                d.remove(bad),
                d.exists(bad).map(drop),
            ]
            .map(|r| r.unwrap_err().kind());
            assert_eq!(kinds, [io::ErrorKind::InvalidInput; 6], "{bad:?}");
        }
        for good in ["vm.nvram", ".lck-1", "..x", "n".repeat(MAX_NAME).as_str()] {
            assert!(plain_name(good), "{good:?}");
        }
        assert_eq!(names(&outside), ["target"]);
        assert_eq!(names(&root), ["vm"]);
    }

    #[test]
    fn an_emptied_destination_is_removed_with_its_temporary_files() {
        let (_t, root, _, roots) = setup();
        let d = roots.open(&root.join("vm"), true).unwrap();
        fs::write(root.join("vm").join(durable::tmp_name()), b"half").unwrap();
        let (_, made) = d.open_or_create("a").unwrap();
        assert!(made);
        let (_, made) = d.open_or_create("a").unwrap();
        assert!(!made);
        assert!(!d.is_empty().unwrap());
        assert!(!d.remove_if_empty().unwrap());
        d.remove("a").unwrap();
        d.remove("a").unwrap();
        assert_eq!(d.remove_tmp_files().unwrap(), 1);
        assert!(d.is_empty().unwrap());
        assert!(d.remove_if_empty().unwrap());
        assert!(names(&root).is_empty());
    }
}
