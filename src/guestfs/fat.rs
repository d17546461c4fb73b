//! FAT12/16/32 through the `fatfs` crate, read-only.
//!
//! FAT has no owners, links or Unix modes: folders read as 0755 and files 0644 (0555 and 0444
//! with the read-only attribute), owner 0, times as UTC. `fatfs` follows cluster chains
//! without noticing a loop, so a folder is read at most [`MAX_FAT_DIR_ENTRIES`] entries (the
//! most FAT allows) and a file at most its size.

use std::io::{Read, Seek};

use fatfs::{Dir, FileSystem, FsOptions};

use super::reader::Window;
use super::{pump, Entry, EntryKind, FsView};

/// The most entries a FAT folder holds (its size is at most 2 MiB of 32-byte entries).
pub const MAX_FAT_DIR_ENTRIES: usize = 65_536;

pub(crate) struct FatView {
    fs: FileSystem<Window>,
    /// The copy buffer, reused from file to file.
    buf: Vec<u8>,
}

pub(crate) fn open(window: Window) -> Result<Box<dyn FsView>, String> {
    let fs = FileSystem::new(window, FsOptions::new()).map_err(|e| e.to_string())?;
    Ok(Box::new(FatView {
        fs,
        buf: Vec::new(),
    }))
}

type FatEntry<'a> = fatfs::DirEntry<'a, Window>;

fn entry(e: &FatEntry<'_>) -> Entry {
    let name = e.file_name();
    let ro = e.attributes().contains(fatfs::FileAttributes::READ_ONLY);
    let (kind, mode) = if e.is_dir() {
        (EntryKind::Dir, if ro { 0o555 } else { 0o755 })
    } else {
        (EntryKind::File, if ro { 0o444 } else { 0o644 })
    };
    let m = e.modified();
    let mtime = jiff::civil::DateTime::new(
        m.date.year as i16,
        m.date.month as i8,
        m.date.day as i8,
        m.time.hour as i8,
        m.time.min as i8,
        m.time.sec as i8,
        i32::from(m.time.millis) * 1_000_000,
    )
    .ok()
    .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC).ok())
    .map(|z| z.timestamp())
    .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    Entry {
        raw_name: name.as_bytes().to_vec(),
        name,
        kind,
        size: if e.is_dir() { 0 } else { e.len() },
        mode,
        uid: 0,
        gid: 0,
        mtime: mtime.as_second(),
        mtime_nsec: mtime.subsec_nanosecond().max(0) as u32,
        target: None,
        raw_target: None,
    }
}

/// The entries of `dir` without `.`, `..` and volume labels; at most [`MAX_FAT_DIR_ENTRIES`].
fn entries<'a>(dir: &Dir<'a, Window>) -> Result<Vec<FatEntry<'a>>, String> {
    let mut out = Vec::new();
    for (n, e) in dir.iter().enumerate() {
        if n >= MAX_FAT_DIR_ENTRIES {
            return Err(format!(
                "the folder has more than {MAX_FAT_DIR_ENTRIES} entries (a loop in its cluster \
                 chain?)"
            ));
        }
        let e = e.map_err(|e| e.to_string())?;
        let name = e.file_name();
        if name == "." || name == ".." || e.attributes().contains(fatfs::FileAttributes::VOLUME_ID)
        {
            continue;
        }
        out.push(e);
    }
    Ok(out)
}

/// The entry at `path` (not the root), matched by its long name, else case-insensitively.
fn find<'a>(fs: &'a FileSystem<Window>, path: &[Vec<u8>]) -> Result<FatEntry<'a>, String> {
    let mut dir = fs.root_dir();
    let mut found = None;
    for (i, name) in path.iter().enumerate() {
        let name = String::from_utf8_lossy(name);
        let list = entries(&dir)?;
        let hit = list
            .iter()
            .position(|e| e.file_name() == name)
            .or_else(|| {
                list.iter()
                    .position(|e| e.file_name().eq_ignore_ascii_case(&name))
            })
            .ok_or("no such file or folder")?;
        let e = list.into_iter().nth(hit).ok_or("no such file or folder")?;
        if i + 1 < path.len() {
            if !e.is_dir() {
                return Err("not a folder".into());
            }
            dir = e.to_dir();
        }
        found = Some(e);
    }
    found.ok_or_else(|| "the root has no entry".into())
}

impl FsView for FatView {
    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Entry, String> {
        if path.is_empty() {
            return Ok(Entry {
                name: "/".into(),
                raw_name: b"/".to_vec(),
                kind: EntryKind::Dir,
                size: 0,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                target: None,
                raw_target: None,
            });
        }
        find(&self.fs, path).map(|e| entry(&e))
    }

    fn list(&mut self, path: &[Vec<u8>]) -> Result<Vec<Entry>, String> {
        let dir = if path.is_empty() {
            self.fs.root_dir()
        } else {
            let e = find(&self.fs, path)?;
            if !e.is_dir() {
                return Err("not a folder".into());
            }
            e.to_dir()
        };
        let mut out: Vec<Entry> = entries(&dir)?.iter().map(entry).collect();
        out.sort_by(|a, b| a.raw_name.cmp(&b.raw_name));
        Ok(out)
    }

    fn copy_range(
        &mut self,
        path: &[Vec<u8>],
        size: u64,
        start: u64,
        len: u64,
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), String> {
        let end = start.saturating_add(len).min(size);
        if start >= end {
            return Ok(());
        }
        let e = find(&self.fs, path)?;
        if !e.is_file() {
            return Err("not a file".into());
        }
        let mut f = e.to_file();
        f.seek(std::io::SeekFrom::Start(start))
            .map_err(|e| e.to_string())?;
        let read = &mut |b: &mut [u8]| f.read(b).map_err(|e| e.to_string());
        pump(&mut self.buf, (start, end, size), read, out)
    }
}
