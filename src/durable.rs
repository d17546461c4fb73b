//! Durable files: replacing a file whole so that a power cut leaves the old bytes or the new,
//! making a new file's or folder's name survive a power cut, the names of temporary files, and
//! who may read what livemount writes (the process's file creation mask).
//!
//! Owns:
//! - the replace protocol: a temporary file (in the target's folder, or in a folder the caller
//!   names on the same file system), created with O_EXCL, written, fdatasynced, renamed over
//!   the target, then the target's folder fsynced. After any failure the temporary file is
//!   gone and the target untouched;
//! - temporary names: `.lm-tmp-` and 16 random hex digits, 24 bytes whatever the target's name
//!   (a name made from the target's, `.NAME.tmp`, passes NAME_MAX when NAME is near 255 bytes),
//!   and the removal of those an interrupted writer left;
//! - `fsync_dir`, and creating folders and files durably (create, then fsync the parent);
//! - the same under a folder handle instead of a path (`*_at`: `put_at`, `create_dir_at`,
//!   `fsync_dir_at`, `remove_tmp_files_at`), for folders whose path is not trusted (a
//!   relocation's destination): names are resolved in the handle's folder only, the temporary
//!   file is made with O_EXCL|O_NOFOLLOW and renamed with renameat, so a symbolic link is never
//!   followed. The caller passes single-component names;
//! - the umask: 0077 unless the operator says otherwise (`--umask`, `LIVEMOUNT_UMASK`, serve's
//!   `umask`), so files are made 0600 and folders 0700 (decision 0013).
//!
//! Must not: know what the files hold, or name errors: every function returns
//! `std::io::Error` and the caller maps it into its own error with the path. Every function
//! blocks; async callers run them on the blocking pool, never on a runtime thread.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

/// What every temporary file's name starts with.
pub const TMP_PREFIX: &str = ".lm-tmp-";
/// Length of a temporary file's name: the prefix and 16 hex digits.
pub const TMP_NAME_LEN: usize = TMP_PREFIX.len() + 16;
/// Names tried before a create of a temporary file gives up (each is 64 random bits: a second
/// try is already a sign of something else).
const TMP_TRIES: usize = 8;

/// A new temporary file name: [`TMP_PREFIX`] and 16 hex digits nobody else will pick.
pub fn tmp_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let local = 0u8;
    let h = blake3::Hasher::new()
        .update(b"livemount temporary name")
        .update(&now.to_le_bytes())
        .update(&std::process::id().to_le_bytes())
        .update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes())
        .update(&(&local as *const u8 as usize).to_le_bytes())
        .finalize();
    format!("{TMP_PREFIX}{}", &h.to_hex()[..16])
}

/// Whether `name` is one of our temporary names.
pub fn is_tmp_name(name: &OsStr) -> bool {
    let b = name.as_encoded_bytes();
    b.len() == TMP_NAME_LEN
        && b.starts_with(TMP_PREFIX.as_bytes())
        && b[TMP_PREFIX.len()..]
            .iter()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

/// Creates a new temporary file in `dir` (O_EXCL, a new name if one is taken) for writing.
pub fn create_tmp(dir: &Path) -> io::Result<(PathBuf, File)> {
    create_tmp_mode(dir, 0o666)
}

/// [`create_tmp`] with the permission bits `mode` (the umask still applies).
fn create_tmp_mode(dir: &Path, mode: u32) -> io::Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for _ in 0..TMP_TRIES {
        let path = dir.join(tmp_name());
        let opened = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path);
        match opened {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary name was free")))
}

/// Replaces `path` whole with `bytes`, atomically and durably: a reader, or the next start
/// after a power cut, finds the old bytes or the new, never a mix, and once this returns the
/// new bytes are on disk under `path`. The temporary file is in `path`'s folder.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    put_via(dir, path, bytes)?;
    fsync_dir(dir)
}

/// [`replace`] for a secret: the file is 0600 from its first byte, whatever the umask.
pub fn replace_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent(path);
    let (tmp, f) = create_tmp_mode(dir, 0o600)?;
    write_and_rename(tmp, f, path, bytes)?;
    fsync_dir(dir)
}

/// Writes `bytes` to a new temporary file in `tmp_dir` (on `path`'s file system), fdatasyncs
/// it and renames it to `path`. `path`'s folder is not fsynced: the caller does that, at once
/// or for many files together. After a failure the temporary file is gone and `path` is as it
/// was.
pub fn put_via(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (tmp, f) = create_tmp(tmp_dir)?;
    write_and_rename(tmp, f, path, bytes)
}

/// Writes the temporary file `tmp`, fdatasyncs it and renames it to `path`; removes it after a
/// failure.
fn write_and_rename(tmp: PathBuf, mut f: File, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_data())
        .and_then(|()| {
            drop(f);
            fs::rename(&tmp, path)
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    #[cfg(test)]
    record(path);
    Ok(())
}

/// Makes a new file `path` holding `bytes`, durably (written, fdatasynced, its folder fsynced);
/// never replaces a file: an existing `path` is an `AlreadyExists` error. After a failure a
/// file this made is removed.
pub fn create_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_data())
        .and_then(|()| fsync_dir(parent(path)));
    if written.is_err() {
        drop(f);
        let _ = fs::remove_file(path);
    }
    written?;
    #[cfg(test)]
    record(path);
    Ok(())
}

/// Makes the names in `dir` durable: files created, renamed or removed in it.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    #[cfg(test)]
    record(dir);
    Ok(())
}

/// Creates `dir` and any missing folders above it, each made durable (the folder holding it
/// fsynced). A folder that exists is left as it is.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a folder",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let above = parent(dir);
    if above != dir {
        create_dir_all(above)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Made by someone else meanwhile; the fsync below covers it all the same.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(e),
    }
    fsync_dir(above)
}

/// Opens `path` to read and write, making it if it does not exist. Returns whether it was
/// made: then its name is not durable until the caller fsyncs its folder (once for several).
pub fn open_or_create(path: &Path) -> io::Result<(File, bool)> {
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => return Ok((f, false)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => return Ok((f, true)),
            // Made meanwhile by another opener: open that one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
}

/// Removes the temporary files in `dir` that interrupted writers left (names as
/// [`is_tmp_name`]; nothing else is touched). A missing folder has none. Returns how many.
pub fn remove_tmp_files(dir: &Path) -> io::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry?;
        if is_tmp_name(&entry.file_name()) {
            match fs::remove_file(entry.path()) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(n)
}

/// [`put_via`] under the folder handle `dir`: a new temporary file in `dir` (O_EXCL and
/// O_NOFOLLOW), written, fdatasynced and renamed to `name` in `dir` (renameat: a symbolic link
/// named `name` is replaced, never followed). `dir`'s names are not fsynced: the caller does
/// that ([`fsync_dir_at`]). After a failure the temporary file is gone and `name` is as it was.
/// `name` must be a single component (the caller checks).
pub fn put_at(dir: impl AsFd, name: &OsStr, bytes: &[u8]) -> io::Result<()> {
    let dir = dir.as_fd();
    let (tmp, mut f) = create_tmp_at(dir)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_data())
        .and_then(|()| {
            drop(f);
            Ok(rustix::fs::renameat(dir, tmp.as_str(), dir, name)?)
        });
    if written.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty());
    }
    written
}

/// [`create_tmp`] under the folder handle `dir`; returns the temporary file's name.
fn create_tmp_at(dir: impl AsFd) -> io::Result<(String, File)> {
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut last = None;
    for _ in 0..TMP_TRIES {
        let name = tmp_name();
        match rustix::fs::openat(&dir, name.as_str(), flags, Mode::from_raw_mode(0o666)) {
            Ok(fd) => return Ok((name, File::from(fd))),
            Err(rustix::io::Errno::EXIST) => last = Some(io::Error::from(rustix::io::Errno::EXIST)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no temporary name was free")))
}

/// Makes the folder `name` in the folder handle `dir` durably (mkdirat, then `dir` fsynced).
/// Returns whether it was made here (false: it existed; nothing is synced then). The folder's
/// mode is 0777 less the umask.
pub fn create_dir_at(dir: impl AsFd, name: &OsStr) -> io::Result<bool> {
    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o777)) {
        Ok(()) => {}
        Err(rustix::io::Errno::EXIST) => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    fsync_dir_at(dir)?;
    Ok(true)
}

/// Makes the names in the folder handle `dir` durable (files created, renamed or removed).
pub fn fsync_dir_at(dir: impl AsFd) -> io::Result<()> {
    Ok(rustix::fs::fsync(dir)?)
}

/// [`remove_tmp_files`] in the folder handle `dir`. Returns how many.
pub fn remove_tmp_files_at(dir: impl AsFd) -> io::Result<usize> {
    let mut n = 0;
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name: &OsStr = std::os::unix::ffi::OsStrExt::from_bytes(entry.file_name().to_bytes());
        if is_tmp_name(name) {
            match rustix::fs::unlinkat(&dir, entry.file_name(), AtFlags::empty()) {
                Ok(()) => n += 1,
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(n)
}

/// The folder holding `path` (`.` for a bare name).
fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A file creation mask: the permission bits that files and folders livemount makes do not
/// get. Written in octal, as `umask` takes it: `0077` (the default) makes files 0600 and
/// folders 0700, `0027` lets the group read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Umask(u32);

impl Umask {
    /// The default: only the user livemount runs as may read or write what it makes.
    pub const PRIVATE: Umask = Umask(0o077);
}

impl std::str::FromStr for Umask {
    type Err = String;

    fn from_str(s: &str) -> Result<Umask, String> {
        let t = s.trim();
        let ok = (1..=4).contains(&t.len()) && t.bytes().all(|b| (b'0'..=b'7').contains(&b));
        match u32::from_str_radix(t, 8) {
            Ok(bits) if ok && bits <= 0o777 => Ok(Umask(bits)),
            _ => Err("give an octal mask such as 0077 (files 0600, folders 0700; the default) or 0027 (the group may read)".into()),
        }
    }
}

impl std::fmt::Display for Umask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// Sets the process's file creation mask; returns the one it replaces. Process-wide: set it
/// before any file is made (at the start of a command).
pub fn set_umask(mask: Umask) -> Umask {
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(mask.0));
    Umask(old.as_raw_mode())
}

/// Test support: the paths synced through this module (files whose bytes were synced before
/// they took their name, and folders fsynced), so tests of callers can check what they made
/// durable.
#[cfg(test)]
static SYNCED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

#[cfg(test)]
fn record(path: &Path) {
    SYNCED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(path.to_path_buf());
}

/// Every path under `root` synced through this module so far, in order.
#[cfg(test)]
pub(crate) fn synced_under(root: &Path) -> Vec<PathBuf> {
    SYNCED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|p| p.starts_with(root))
        .cloned()
        .collect()
}

/// The names in `dir`, sorted (for tests of what a folder holds).
#[cfg(test)]
pub(crate) fn sorted_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::sorted_names as names;

    #[test]
    fn replace_leaves_the_new_bytes_and_no_temporary_file_and_syncs_the_folder() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("state.json");
        replace(&path, b"one").unwrap();
        replace(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(names(t.path()), ["state.json"]);
        let synced = synced_under(t.path());
        assert_eq!(
            synced,
            [path.clone(), t.path().into(), path, t.path().into()]
        );
    }

    #[test]
    fn a_failed_replace_leaves_the_target_untouched_and_no_temporary_file() {
        let t = tempfile::tempdir().unwrap();
        // The rename fails: the target is a folder that is not empty.
        let target = t.path().join("busy");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), b"x").unwrap();
        assert!(replace(&target, b"new").is_err());
        assert_eq!(names(t.path()), ["busy"]);
        assert_eq!(names(&target), ["inside"]);
        // The temporary file cannot be made: the folder is gone.
        let gone = t.path().join("gone/file");
        assert_eq!(
            replace(&gone, b"x").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(synced_under(t.path()).is_empty());
    }

    #[test]
    fn temporary_names_have_a_fixed_length_whatever_the_target() {
        let t = tempfile::tempdir().unwrap();
        // NAME_MAX exactly: a name made from it would not fit.
        let long = t.path().join("n".repeat(255));
        replace(&long, b"long").unwrap();
        put_via(t.path(), &long, b"again").unwrap();
        assert_eq!(fs::read(&long).unwrap(), b"again");
        let name = tmp_name();
        assert_eq!(name.len(), TMP_NAME_LEN);
        assert!(is_tmp_name(OsStr::new(&name)));
        assert_ne!(name, tmp_name());
        for other in [
            ".lm-tmp-",
            ".lm-tmp-0123456789abcdeg",
            "x.lm-tmp-0123456789abcde",
        ] {
            assert!(!is_tmp_name(OsStr::new(other)), "{other}");
        }
    }

    #[test]
    fn leftover_temporary_files_are_removed_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let (a, _) = create_tmp(t.path()).unwrap();
        let (b, _) = create_tmp(t.path()).unwrap();
        assert_ne!(a, b);
        fs::write(t.path().join(".lm-tmp-notours"), b"x").unwrap();
        fs::write(t.path().join("keep"), b"x").unwrap();
        assert_eq!(remove_tmp_files(t.path()).unwrap(), 2);
        assert_eq!(names(t.path()), [".lm-tmp-notours", "keep"]);
        assert_eq!(remove_tmp_files(&t.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn create_new_never_replaces_and_cleans_up_after_itself() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("vm.xml");
        create_new(&path, b"<domain/>").unwrap();
        assert_eq!(
            synced_under(t.path()),
            [t.path().to_path_buf(), path.clone()]
        );
        let err = create_new(&path, b"other").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"<domain/>");
    }

    #[test]
    fn folders_and_files_made_here_have_their_parents_synced() {
        let t = tempfile::tempdir().unwrap();
        let deep = t.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        let a = t.path().join("a");
        assert_eq!(
            synced_under(t.path()),
            [t.path().to_path_buf(), a.clone(), a.join("b")]
        );
        // Existing: nothing to do.
        create_dir_all(&deep).unwrap();
        assert_eq!(synced_under(t.path()).len(), 3);
        let file = deep.join("f");
        fs::write(&file, b"x").unwrap();
        assert!(create_dir_all(&file).is_err());
        let (_, made) = open_or_create(&deep.join("g")).unwrap();
        assert!(made);
        let (_, made) = open_or_create(&deep.join("g")).unwrap();
        assert!(!made);
    }

    #[test]
    fn under_a_folder_handle_a_replace_leaves_no_temporary_file_and_folders_are_made_once() {
        let t = tempfile::tempdir().unwrap();
        let dir = File::open(t.path()).unwrap();
        put_at(&dir, OsStr::new("state.json"), b"one").unwrap();
        put_at(&dir, OsStr::new("state.json"), b"two").unwrap();
        fsync_dir_at(&dir).unwrap();
        assert_eq!(fs::read(t.path().join("state.json")).unwrap(), b"two");
        assert_eq!(names(t.path()), ["state.json"]);
        // The rename fails (a folder that is not empty): the temporary file goes.
        assert!(create_dir_at(&dir, OsStr::new("busy")).unwrap());
        assert!(!create_dir_at(&dir, OsStr::new("busy")).unwrap());
        fs::write(t.path().join("busy/inside"), b"x").unwrap();
        assert!(put_at(&dir, OsStr::new("busy"), b"new").is_err());
        assert_eq!(names(t.path()), ["busy", "state.json"]);
        let (_, _) = create_tmp_at(&dir).unwrap();
        fs::write(t.path().join(".lm-tmp-notours"), b"x").unwrap();
        assert_eq!(remove_tmp_files_at(&dir).unwrap(), 1);
        assert_eq!(names(t.path()), [".lm-tmp-notours", "busy", "state.json"]);
    }

    #[test]
    fn umasks_are_octal_and_at_most_0777() {
        for (text, bits) in [("0077", 0o077), ("027", 0o027), ("0", 0), ("0777", 0o777)] {
            assert_eq!(text.parse::<Umask>(), Ok(Umask(bits)), "{text}");
        }
        for bad in ["", "0999", "rwx", "07777", "1000", "-1", "0x1f", "00777"] {
            assert!(bad.parse::<Umask>().is_err(), "{bad}");
        }
        assert_eq!(Umask::PRIVATE.to_string(), "0077");
    }
}
