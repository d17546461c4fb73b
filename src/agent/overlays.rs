//! Whose writes a mount's overlay folder (`overlays/NAME`) holds, and removing it durably.
//!
//! Owns: the `not-kept` mark, discarding a folder, and the sweep at a start.
//! - A folder made for a new mount is marked `not-kept` (durably) before it is stamped with its
//!   snapshot: its writes belong to the mount whose spec (`mounts/NAME.json`) names it, and go
//!   with it. Only `unmount --keep-writes` removes the mark, durably and before the spec goes;
//!   that makes the writes kept, for a later mount of the same snapshot under the same name to
//!   adopt. A discarding `unmount` of a folder made before the mark existed marks it first.
//! - So a marked folder that no spec names holds nobody's writes: what a mount that failed (an
//!   error, a crash, a power cut) or a discard that was cut short left. The next mount of the
//!   name discards it instead of taking it for kept writes (which, of another snapshot, would
//!   refuse the mount), and the next start sweeps it.
//! - Discarding renames the folder to a tombstone (`.discarded-NAME-HEX`; no mount name starts
//!   with a dot) and fsyncs `overlays/`, and only then removes the tombstone's files: once
//!   [`discard`] returns, no power cut brings the writes back under NAME. Tombstones that an
//!   interruption left are removed at the next start.
//!
//! Must not: decide whether a mount exists or is served (callers say which names are taken),
//! or read what the overlays hold. Every function blocks: run them on the blocking pool.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;

use crate::durable;

/// The mark of a folder whose writes go with its mount.
pub const NOT_KEPT: &str = "not-kept";
/// What a discarded folder is renamed to, before its name and its mount's name.
const TOMBSTONE: &str = ".discarded-";

/// Marks the overlay folder `dir` (which exists) as holding writes that are not kept, durably.
pub fn mark_not_kept(dir: &Path) -> io::Result<()> {
    durable::replace(
        &dir.join(NOT_KEPT),
        b"livemount: these writes go with the mount that names this folder\n",
    )
}

/// Whether `dir` is a marked overlay folder (false for a missing one).
pub fn is_not_kept(dir: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(dir.join(NOT_KEPT)) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Makes the writes in `dir` kept (`unmount --keep-writes`): removes the mark, durably. A
/// missing folder (a read-only mount's) has nothing to keep.
pub fn keep(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    match fs::remove_file(dir.join(NOT_KEPT)) {
        Ok(()) => durable::fsync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Discards the overlay folder `dir`: once this returns, it is durably gone under its name (a
/// missing one is gone already). Renamed to a tombstone, `overlays/` fsynced, then emptied; a
/// tombstone that cannot be removed now is left to the next start's sweep. When the rename is
/// refused (a full disk may refuse what it lets be removed), the folder is removed in place,
/// its mark last, so that what a cut leaves of it is still marked.
pub fn discard(dir: &Path) -> io::Result<()> {
    let above = dir.parent().unwrap_or(Path::new("."));
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let hex = &durable::tmp_name()[durable::TMP_PREFIX.len()..];
    let tomb = above.join(format!("{TOMBSTONE}{name}-{hex}"));
    match fs::rename(dir, &tomb) {
        Ok(()) => {
            durable::fsync_dir(above)?;
            if let Err(e) = fs::remove_dir_all(&tomb) {
                tracing::warn!(folder = %tomb.display(), error = %e, "a discarded overlay folder is left for the next start to remove");
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(renaming) => {
            let mut mark = false;
            for entry in fs::read_dir(dir)? {
                let entry = entry?;
                if entry.file_name() == NOT_KEPT {
                    mark = true;
                } else if entry.file_type()?.is_dir() {
                    fs::remove_dir_all(entry.path())?;
                } else {
                    fs::remove_file(entry.path())?;
                }
            }
            if mark {
                // The removals above durable before the mark's, when the disk lets them be
                // (a full one may not: then the order is the file system's).
                let _ = durable::fsync_dir(dir);
                fs::remove_file(dir.join(NOT_KEPT))?;
            }
            fs::remove_dir(dir)?;
            tracing::debug!(folder = %dir.display(), error = %renaming, "overlay folder removed in place");
            durable::fsync_dir(above)
        }
    }
}

/// At a start: removes from `overlays` the tombstones, and the marked folders of no mount
/// (`specs`: the names the state directory has specs for). Returns the names removed; one
/// that cannot be removed is logged and left (the next mount of its name tries again). A
/// missing `overlays` has nothing to sweep.
pub fn sweep(overlays: &Path, specs: &BTreeSet<String>) -> io::Result<Vec<String>> {
    let entries = match fs::read_dir(overlays) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let gone = if name.starts_with(TOMBSTONE) {
            fs::remove_dir_all(&path).map(|()| true)
        } else if specs.contains(&name) {
            Ok(false)
        } else {
            match is_not_kept(&path) {
                Ok(true) => discard(&path).map(|()| true),
                other => other,
            }
        };
        match gone {
            Ok(true) => removed.push(name),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(folder = %path.display(), error = %e, "overlay folder of no mount not removed")
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discard_is_durable_by_its_rename_and_a_sweep_takes_only_marked_folders_of_no_mount() {
        let t = tempfile::tempdir().unwrap();
        let overlays = t.path().join("overlays");
        let made = |name: &str, marked: bool| {
            let dir = overlays.join(name);
            durable::create_dir_all(&dir.join("files")).unwrap();
            fs::write(dir.join("snapshot"), "a").unwrap();
            fs::write(dir.join("files/1"), "config").unwrap();
            if marked {
                mark_not_kept(&dir).unwrap();
            }
            dir
        };
        // Discarded: gone from its name once `overlays/` is fsynced, tombstone removed.
        let d = made("d", true);
        assert!(is_not_kept(&d).unwrap());
        let before = durable::synced_under(&overlays).len();
        discard(&d).unwrap();
        assert!(!d.exists());
        assert_eq!(
            durable::synced_under(&overlays)[before..],
            [overlays.as_path()]
        );
        assert!(durable::sorted_names(&overlays).is_empty());
        discard(&d).unwrap();

        // Kept: the mark removed durably (the folder fsynced); twice is harmless.
        let k = made("k", true);
        keep(&k).unwrap();
        assert!(!is_not_kept(&k).unwrap());
        assert_eq!(durable::synced_under(&k).last(), Some(&k));
        keep(&k).unwrap();
        keep(&overlays.join("read-only")).unwrap();

        // The sweep: tombstones, and marked folders no spec names; never kept writes or a
        // mount's own folder.
        made("failed", true);
        made("live", true);
        made("old-kept", false);
        made(".discarded-x-0123456789abcdef", false);
        fs::write(overlays.join("stray"), "not a folder").unwrap();
        let specs: BTreeSet<String> = ["live".to_string()].into();
        let mut gone = sweep(&overlays, &specs).unwrap();
        gone.sort();
        assert_eq!(gone, [".discarded-x-0123456789abcdef", "failed"]);
        assert_eq!(
            durable::sorted_names(&overlays),
            ["k", "live", "old-kept", "stray"]
        );
        assert!(sweep(&t.path().join("none"), &specs).unwrap().is_empty());
    }
}
