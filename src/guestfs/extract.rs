//! `files get`: copies files, folders and links out of guest volumes into a folder of the host.
//!
//! The rules that keep every write inside the folder whatever the guest holds:
//! - First a plan: the whole tree is walked (at most [`MAX_DEPTH`] deep and [`MAX_ENTRIES`]
//!   entries) and every name from the guest is checked: empty, `.`, `..`, a `/` or a NUL byte is
//!   an error naming it. Nothing is written before the plan is whole, and a top-level name that
//!   exists in the folder already is an error too: nothing is ever overwritten.
//! - Then the copy, through folder handles only: each parent is reached from the folder's handle
//!   one name at a time with `openat(O_DIRECTORY | O_NOFOLLOW)`; files are made with
//!   `O_CREAT | O_EXCL | O_NOFOLLOW`, folders with `mkdirat`, links with `symlinkat` (their
//!   target is never read or followed here). A name that exists (a guest with two entries of
//!   one name) is an error.
//! - Mode, owner (only when running as root; set-id bits only then too) and modification time
//!   are set on the handles; a folder's after its contents.
//! - Special files (devices, FIFOs, sockets) are not copied; the summary names them.
//! - Hard links: the readers do not give inode numbers, so each name of a hard-linked file is
//!   copied as a file of its own (same bytes).
//! - A file that fails midway is removed; what was copied before stays (the error says so).
//! - The file system DIR is on is synced (`syncfs`) before the summary is given.

use std::ffi::OsStr;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use super::{show_path, Entry, EntryKind, FsView, GuestFsError, GuestPath, Volume};
use super::{MAX_DEPTH, MAX_ENTRIES};
use crate::repo::Progress;

/// What a `get` copied.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GetSummary {
    pub to: PathBuf,
    pub files: u64,
    pub folders: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Devices, FIFOs and sockets found and not copied, as `VOLUME/PATH`.
    pub not_copied: Vec<String>,
    pub seconds: f64,
}

struct Item {
    /// Which source (volume, file system) it comes from.
    src: usize,
    /// Its path in the guest volume.
    guest: GuestPath,
    /// Its path under the destination folder.
    out: GuestPath,
    entry: Entry,
}

/// A name from the guest that may be written: not empty, `.`, `..`, and with no `/` or NUL.
pub(crate) fn check_name(name: &[u8]) -> Result<(), String> {
    if name.is_empty() {
        return Err("an empty name".into());
    }
    if name == b"." || name == b".." {
        return Err(format!("the name {:?}", String::from_utf8_lossy(name)));
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(format!(
            "the name {:?} holds a `/` or a NUL byte",
            String::from_utf8_lossy(name)
        ));
    }
    if name.len() > 255 {
        return Err(format!("a name of {} bytes (the most is 255)", name.len()));
    }
    Ok(())
}

type Source = (Volume, GuestPath, Box<dyn FsView>);

fn plan(sources: &mut [Source]) -> Result<Vec<Item>, GuestFsError> {
    let mut items: Vec<Item> = Vec::new();
    for (src, (vol, inner, fs)) in sources.iter_mut().enumerate() {
        let fs_err = |what: String, p: &[Vec<u8>]| GuestFsError::Fs {
            volume: vol.path.clone(),
            path: show_path(p),
            what,
        };
        let top = fs.stat(inner).map_err(|w| fs_err(w, inner))?;
        let top_name = match inner.last() {
            Some(n) => n.clone(),
            None => vol
                .path
                .rsplit('/')
                .next()
                .unwrap_or("volume")
                .as_bytes()
                .to_vec(),
        };
        if items
            .iter()
            .any(|i| i.out.len() == 1 && i.out[0] == top_name)
        {
            return Err(GuestFsError::Invalid(format!(
                "two of the paths asked for are named {:?}; get them into different folders",
                String::from_utf8_lossy(&top_name)
            )));
        }
        // Depth-first, folders before their contents.
        let mut stack = vec![(inner.clone(), vec![top_name], top)];
        while let Some((guest, out, entry)) = stack.pop() {
            if items.len() >= MAX_ENTRIES {
                return Err(GuestFsError::Invalid(format!(
                    "{}: more than {MAX_ENTRIES} entries; get smaller folders",
                    vol.path
                )));
            }
            if let Some(name) = out.last() {
                check_name(name).map_err(|w| {
                    fs_err(
                        format!("{w} cannot be written safely; nothing was copied"),
                        &guest,
                    )
                })?;
            }
            if let Some(t) = &entry.raw_target {
                if t.is_empty() || t.contains(&0) {
                    return Err(fs_err(
                        "a link with an empty target or a NUL byte in it; nothing was copied"
                            .into(),
                        &guest,
                    ));
                }
            }
            if entry.kind == EntryKind::Dir {
                if out.len() > MAX_DEPTH {
                    return Err(fs_err(
                        format!("folders nested more than {MAX_DEPTH} deep (a loop?)"),
                        &guest,
                    ));
                }
                let children = fs.list(&guest).map_err(|w| fs_err(w, &guest))?;
                for c in children.into_iter().rev() {
                    let mut g = guest.clone();
                    g.push(c.raw_name.clone());
                    let mut o = out.clone();
                    o.push(c.raw_name.clone());
                    stack.push((g, o, c));
                }
            }
            items.push(Item {
                src,
                guest,
                out,
                entry,
            });
        }
    }
    Ok(items)
}

fn os(name: &[u8]) -> &OsStr {
    OsStr::from_bytes(name)
}

fn out_path(to: &Path, out: &[Vec<u8>]) -> PathBuf {
    let mut p = to.to_path_buf();
    for c in out {
        p.push(os(c));
    }
    p
}

/// The folder `out[..]` under `root`, reached one name at a time, never through a link.
fn open_dir(root: &OwnedFd, out: &[Vec<u8>]) -> rustix::io::Result<OwnedFd> {
    let flags = OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC;
    let mut cur = rustix::fs::openat(root, ".", flags, Mode::empty())?;
    for c in out {
        cur = rustix::fs::openat(&cur, os(c), flags, Mode::empty())?;
    }
    Ok(cur)
}

fn times(e: &Entry) -> Timestamps {
    let t = Timespec {
        tv_sec: e.mtime,
        tv_nsec: i64::from(e.mtime_nsec),
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Owner ids that can be set (`-1` means "leave it").
fn ids(e: &Entry) -> Option<(rustix::fs::Uid, rustix::fs::Gid)> {
    (e.uid != u32::MAX && e.gid != u32::MAX).then(|| {
        (
            rustix::fs::Uid::from_raw(e.uid),
            rustix::fs::Gid::from_raw(e.gid),
        )
    })
}

fn set_attrs(fd: impl AsFd, e: &Entry, root: bool) -> rustix::io::Result<()> {
    if root {
        if let Some((u, g)) = ids(e) {
            rustix::fs::fchown(&fd, Some(u), Some(g))?;
        }
    }
    let mask = if root { 0o7777 } else { 0o1777 };
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(e.mode & mask))?;
    rustix::fs::futimens(&fd, &times(e))
}

/// Writes `buf` at `pos`, leaving all-zero 4 KiB blocks as holes.
fn write_sparse(f: &std::fs::File, pos: u64, buf: &[u8]) -> std::io::Result<()> {
    let mut off = 0usize;
    for piece in buf.chunks(4096) {
        if piece.iter().any(|&b| b != 0) {
            f.write_all_at(piece, pos + off as u64)?;
        }
        off += piece.len();
    }
    Ok(())
}

pub(crate) fn get(
    mut sources: Vec<Source>,
    to: &Path,
    progress: &dyn Progress,
) -> Result<GetSummary, GuestFsError> {
    let started = std::time::Instant::now();
    let items = plan(&mut sources)?;
    let out_err = |p: PathBuf, what: String| GuestFsError::Output { path: p, what };
    std::fs::create_dir_all(to).map_err(|e| out_err(to.into(), format!("cannot make it: {e}")))?;
    let root = rustix::fs::open(
        to,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| out_err(to.into(), format!("cannot open it: {e}")))?;
    for i in items.iter().filter(|i| i.out.len() == 1) {
        match rustix::fs::statat(&root, os(&i.out[0]), AtFlags::SYMLINK_NOFOLLOW) {
            Err(rustix::io::Errno::NOENT) => {}
            Ok(_) => {
                return Err(out_err(
                    out_path(to, &i.out),
                    "exists already; nothing was copied (nothing is overwritten: move it away \
                     or get into another folder)"
                        .into(),
                ))
            }
            Err(e) => return Err(out_err(out_path(to, &i.out), e.to_string())),
        }
    }
    let total: u64 = items
        .iter()
        .filter(|i| i.entry.kind == EntryKind::File)
        .map(|i| i.entry.size)
        .sum();
    progress.set_total(total);
    let is_root = rustix::process::geteuid().is_root();
    let mut s = GetSummary {
        to: to.into(),
        ..GetSummary::default()
    };
    let mut folders: Vec<&Item> = Vec::new();
    for item in &items {
        let (parent_names, name) = item.out.split_at(item.out.len() - 1);
        let name = os(&name[0]);
        let path = out_path(to, &item.out);
        let io = |e: rustix::io::Errno| out_err(path.clone(), e.to_string());
        let parent = open_dir(&root, parent_names).map_err(io)?;
        let e = &item.entry;
        match e.kind {
            EntryKind::Dir => {
                rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700)).map_err(io)?;
                folders.push(item);
                s.folders += 1;
            }
            EntryKind::Symlink => {
                let target = os(e.raw_target.as_deref().unwrap_or_default());
                rustix::fs::symlinkat(target, &parent, name).map_err(io)?;
                if is_root {
                    if let Some((u, g)) = ids(e) {
                        rustix::fs::chownat(
                            &parent,
                            name,
                            Some(u),
                            Some(g),
                            AtFlags::SYMLINK_NOFOLLOW,
                        )
                        .map_err(io)?;
                    }
                }
                rustix::fs::utimensat(&parent, name, &times(e), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(io)?;
                s.symlinks += 1;
            }
            EntryKind::Special => {
                s.not_copied.push(format!(
                    "{}{}",
                    sources[item.src].0.path,
                    show_path(&item.guest)
                ));
            }
            EntryKind::File => {
                let fd = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::WRONLY
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io)?;
                let file = std::fs::File::from(fd);
                let mut pos = 0u64;
                let (vol, _, fs) = &mut sources[item.src];
                let copied = fs.copy(&item.guest, e.size, &mut |buf: &[u8]| {
                    write_sparse(&file, pos, buf)?;
                    pos += buf.len() as u64;
                    progress.advance(buf.len() as u64);
                    Ok(())
                });
                let done = copied
                    .map_err(|what| GuestFsError::Fs {
                        volume: vol.path.clone(),
                        path: show_path(&item.guest),
                        what: format!(
                            "{what}; the partial copy was removed, what was copied before it \
                             stays in {}",
                            to.display()
                        ),
                    })
                    .and_then(|()| {
                        file.set_len(e.size)
                            .and_then(|()| (&file).flush())
                            .map_err(|x| out_err(path.clone(), x.to_string()))
                    })
                    .and_then(|()| set_attrs(&file, e, is_root).map_err(io));
                if let Err(err) = done {
                    let _ = rustix::fs::unlinkat(&parent, name, AtFlags::empty());
                    return Err(err);
                }
                s.files += 1;
                s.bytes += e.size;
            }
        }
    }
    // Folders last, deepest first: their times change as their contents are made.
    for item in folders.iter().rev() {
        let path = out_path(to, &item.out);
        let fd = open_dir(&root, &item.out).map_err(|e| out_err(path.clone(), e.to_string()))?;
        set_attrs(&fd, &item.entry, is_root).map_err(|e| out_err(path, e.to_string()))?;
    }
    // On disk before the summary says copied: one sync of the file system DIR is on.
    rustix::fs::syncfs(&root).map_err(|e| out_err(to.into(), format!("cannot sync it: {e}")))?;
    s.seconds = started.elapsed().as_secs_f64();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestfs::FsKind;

    fn e(name: &[u8], kind: EntryKind, target: Option<&[u8]>) -> Entry {
        Entry {
            name: String::from_utf8_lossy(name).into_owned(),
            raw_name: name.to_vec(),
            kind,
            size: if kind == EntryKind::File { 3 } else { 0 },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            mtime_nsec: 0,
            target: None,
            raw_target: target.map(<[u8]>::to_vec),
        }
    }

    /// A guest whose every folder lists `children` (so a folder holds itself: a loop).
    struct Hostile {
        children: Vec<Entry>,
    }

    impl FsView for Hostile {
        fn stat(&mut self, path: &[Vec<u8>]) -> Result<Entry, String> {
            match path.last() {
                None => Ok(e(b"/", EntryKind::Dir, None)),
                Some(n) => self
                    .children
                    .iter()
                    .find(|c| &c.raw_name == n)
                    .cloned()
                    .ok_or_else(|| "no such file or folder".into()),
            }
        }
        fn list(&mut self, _: &[Vec<u8>]) -> Result<Vec<Entry>, String> {
            Ok(self.children.clone())
        }
        fn copy_range(
            &mut self,
            _: &[Vec<u8>],
            _: u64,
            _: u64,
            _: u64,
            out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
        ) -> Result<(), String> {
            out(b"abc").map_err(|e| e.to_string())
        }
    }

    fn source(children: Vec<Entry>) -> Source {
        let vol = Volume {
            path: "/vda/part1".into(),
            device: "vda".into(),
            kind: FsKind::Ext4,
            size: 1 << 20,
            reason: None,
            extents: Vec::new(),
        };
        (vol, Vec::new(), Box::new(Hostile { children }))
    }

    fn run(children: Vec<Entry>, to: &Path) -> Result<GetSummary, GuestFsError> {
        get(vec![source(children)], to, &crate::repo::NoProgress)
    }

    fn tree(root: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for x in std::fs::read_dir(&d).unwrap() {
                let p = x.unwrap().path();
                if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p.clone());
                }
                out.push(p);
            }
        }
        out.sort();
        out
    }

    #[test]
    fn hostile_names_are_refused_before_anything_is_written() {
        for bad in [&b".."[..], b".", b"", b"a/b", b"../../etc", b"x\0y"] {
            let tmp = tempfile::tempdir().unwrap();
            let to = tmp.path().join("out");
            let kids = vec![
                e(b"ok.txt", EntryKind::File, None),
                e(bad, EntryKind::File, None),
            ];
            let err = run(kids, &to).unwrap_err().to_string();
            assert!(err.contains("nothing was copied"), "{bad:?}: {err}");
            assert!(
                !to.exists() || tree(&to).is_empty(),
                "{bad:?}: {:?}",
                tree(&to)
            );
            assert_eq!(tree(tmp.path()).len(), usize::from(to.exists()));
        }
    }

    #[test]
    fn a_folder_that_holds_itself_is_an_error_not_a_hang() {
        let tmp = tempfile::tempdir().unwrap();
        let to = tmp.path().join("out");
        let err = run(vec![e(b"d", EntryKind::Dir, None)], &to)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nested more than"), "{err}");
        assert!(!to.exists());
    }

    #[test]
    fn a_link_and_a_folder_of_one_name_never_write_through_the_link() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let to = tmp.path().join("out");
        let target = outside.as_os_str().as_bytes().to_vec();
        // The link comes first; the folder of the same name (and the file in it) cannot follow.
        let kids = vec![
            e(b"a", EntryKind::Symlink, Some(&target)),
            e(b"a", EntryKind::Dir, None),
        ];
        // Every folder lists the same two entries: a loop too, cut by the depth bound.
        let err = run(kids.clone(), &to).unwrap_err().to_string();
        assert!(err.contains("nested more than"), "{err}");
        // Without the loop: the folder entry is a file of the same name.
        let kids = vec![
            e(b"a", EntryKind::Symlink, Some(&target)),
            e(b"a", EntryKind::File, None),
        ];
        let err = run(kids, &to).unwrap_err().to_string();
        assert!(
            err.contains("File exists") || err.contains("exists"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(std::fs::symlink_metadata(to.join("part1/a"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn an_existing_name_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let to = tmp.path().join("out");
        std::fs::create_dir_all(to.join("part1")).unwrap();
        std::fs::write(to.join("part1/keep"), b"mine").unwrap();
        let err = run(vec![e(b"keep", EntryKind::File, None)], &to)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exists already"), "{err}");
        assert_eq!(std::fs::read(to.join("part1/keep")).unwrap(), b"mine");
    }

    #[test]
    fn a_plain_tree_is_copied_with_its_times_and_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let to = tmp.path().join("out");
        let mut f = e(b"f", EntryKind::File, None);
        f.mode = 0o640;
        let s = get(
            vec![(
                source(vec![]).0,
                vec![b"f".to_vec()],
                Box::new(Hostile { children: vec![f] }),
            )],
            &to,
            &crate::repo::NoProgress,
        )
        .unwrap();
        assert_eq!((s.files, s.bytes), (1, 3));
        let m = std::fs::metadata(to.join("f")).unwrap();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        assert_eq!(m.mtime(), 1_600_000_000);
        assert_eq!(std::fs::read(to.join("f")).unwrap(), b"abc");
    }

    #[test]
    fn names_from_the_guest_are_checked() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b", &[b'x'; 256]] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in [
            &b"..foo"[..],
            b"...",
            b"foo..",
            b"\xff\xfe",
            "名前".as_bytes(),
            &[b'x'; 255],
        ] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
    }
}
