//! NTFS through the `ntfs` crate, read-only.
//!
//! What an NTFS volume looks like here:
//! - Folders are read from their directory index (`$I30`). A file is listed once per name it
//!   has in that folder, under its POSIX or Win32 name: the DOS 8.3 names Windows adds beside a
//!   long name are skipped. File records below 16 (`$MFT`, `$Bitmap`, ..., `$Extend` and the
//!   root's own `.`) are NTFS's metadata files and are not listed, as `ntfs-3g` hides them.
//! - A file's bytes are its unnamed `$DATA` stream, resident or not; sparse runs read as zeros
//!   (the copy leaves them as holes). Alternate data streams are not read. Compressed and
//!   encrypted files are an error naming the file.
//! - Times are `$STANDARD_INFORMATION`'s modification time (Windows time, 100 ns since 1601,
//!   made Unix seconds and nanoseconds). Modes are 0755 for folders, 0644 for files (0555 and
//!   0444 with the read-only attribute), 0777 for links; owners are unknown ([`UNKNOWN_ID`]).
//! - Links: reparse points that are symbolic links, junctions (mount points) and WSL links, and
//!   the Interix links `ntfs-3g` makes (a system file that starts `IntxLNK\1`), are listed as
//!   links with their target (Windows `\` made `/`), never followed. Other reparse points (dedup,
//!   cloud files) and Interix devices are listed as special and not copied.
//! - Hostile input: every loop over guest data is bounded by a const below; a record size past
//!   [`MAX_RECORD_BYTES`] is refused before the crate allocates it.

use std::collections::HashMap;

use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{
    Ntfs, NtfsAttributeFlags, NtfsAttributeItem, NtfsAttributeType, NtfsFile, NtfsReadSeek,
};

use super::reader::Window;
use super::{pump, Entry, EntryKind, FsView, MAX_DEPTH, MAX_ENTRIES, UNKNOWN_ID};

/// The root folder's file record.
const ROOT_RECORD: u64 = 5;
/// File records below this are NTFS metadata files, never listed.
const FIRST_USER_RECORD: u64 = 16;
/// Largest file record accepted (Windows uses 1 KiB or 4 KiB; the crate allocates one).
pub const MAX_RECORD_BYTES: u32 = 64 << 10;
/// Index entries read from one folder (names of every namespace, so a folder of
/// [`MAX_ENTRIES`] files with DOS names has twice as many).
pub const MAX_INDEX_ENTRIES: usize = 2 * MAX_ENTRIES + 16;
/// Attributes looked at in one file (its attribute list included).
pub const MAX_ATTRIBUTES: usize = 4096;
/// Largest reparse point read (Windows' limit, 16 KiB).
pub const MAX_REPARSE_BYTES: u64 = 16 << 10;
/// Largest Interix link file read: the magic and a 4096-character UTF-16 target.
pub const MAX_INTERIX_BYTES: u64 = 8 + 2 * 4096;
/// Folder entries kept by name between calls (so a `get` reads each folder's index once).
const MAX_CACHED: usize = 1 << 20;

const TAG_MOUNT_POINT: u32 = 0xA000_0003;
const TAG_SYMLINK: u32 = 0xA000_000C;
const TAG_LX_SYMLINK: u32 = 0xA000_001D;
const INTERIX_LINK: &[u8; 8] = b"IntxLNK\x01";

/// 100 ns intervals from 1601-01-01 to 1970-01-01.
const NT_TO_UNIX_100NS: i128 = 116_444_736_000_000_000;

pub(crate) struct NtfsView {
    ntfs: Ntfs,
    fs: Padded,
    /// Path -> file record, filled as folders are read.
    cache: HashMap<Vec<Vec<u8>>, u64>,
    /// The copy buffer, reused from file to file.
    buf: Vec<u8>,
}

/// The volume as the `ntfs` crate reads it: zeros past its end. The crate turns an error of a
/// read inside one of its structures into a panic (`unreachable!` in its
/// `From<binrw::Error>`: binrw wraps the I/O error in context), so a damaged offset that points
/// past the volume must read as bytes, which the crate then rejects as a structure. Found by
/// the guestfs fuzz target (an empty disk handed to the NTFS reader).
pub(crate) struct Padded(Window);

impl std::io::Read for Padded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::Seek;
        let n = self.0.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        buf.fill(0);
        self.0.seek(std::io::SeekFrom::Current(buf.len() as i64))?;
        Ok(buf.len())
    }
}

impl std::io::Seek for Padded {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        self.0.seek(to)
    }
}

pub(crate) fn open(window: Window) -> Result<Box<dyn FsView>, String> {
    let mut window = Padded(window);
    let ntfs = Ntfs::new(&mut window).map_err(|e| e.to_string())?;
    if ntfs.file_record_size() > MAX_RECORD_BYTES {
        return Err(format!(
            "file records of {} bytes (the most read is {MAX_RECORD_BYTES})",
            ntfs.file_record_size()
        ));
    }
    Ok(Box::new(NtfsView {
        ntfs,
        fs: window,
        cache: HashMap::new(),
        buf: Vec::new(),
    }))
}

/// Windows time (100 ns since 1601) as Unix seconds and nanoseconds.
pub(crate) fn nt_to_unix(nt: u64) -> (i64, u32) {
    let d = i128::from(nt) - NT_TO_UNIX_100NS;
    let secs = d.div_euclid(10_000_000) as i64;
    let nsec = (d.rem_euclid(10_000_000) * 100) as u32;
    (secs, nsec)
}

fn utf16le(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_le_bytes(
        b.get(at..at + 2)?.try_into().ok()?,
    )))
}

/// A reparse point's link target: `Ok(None)` for a kind that is not a link.
pub(crate) fn reparse_target(b: &[u8]) -> Result<Option<String>, String> {
    let bad = || "a damaged reparse point".to_string();
    let tag = u32::from_le_bytes(b.get(0..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let names = |buf_at: usize| -> Result<String, String> {
        let name = |off: usize, len: usize| -> Result<String, String> {
            let s = buf_at.checked_add(off).ok_or_else(bad)?;
            Ok(utf16le(
                b.get(s..s.checked_add(len).ok_or_else(bad)?)
                    .ok_or_else(bad)?,
            ))
        };
        let (sub_off, sub_len) = (
            u16_at(b, 8).ok_or_else(bad)?,
            u16_at(b, 10).ok_or_else(bad)?,
        );
        let (pr_off, pr_len) = (
            u16_at(b, 12).ok_or_else(bad)?,
            u16_at(b, 14).ok_or_else(bad)?,
        );
        let print = name(pr_off, pr_len)?;
        let t = if print.is_empty() {
            let sub = name(sub_off, sub_len)?;
            sub.strip_prefix(r"\??\").map(str::to_string).unwrap_or(sub)
        } else {
            print
        };
        Ok(t.replace('\\', "/"))
    };
    let target = match tag {
        TAG_SYMLINK => names(20)?,
        TAG_MOUNT_POINT => names(16)?,
        TAG_LX_SYMLINK => {
            let len = u16_at(b, 4).ok_or_else(bad)?;
            let t = b.get(12..8 + len).ok_or_else(bad)?;
            String::from_utf8_lossy(t).into_owned()
        }
        _ => return Ok(None),
    };
    if target.is_empty() {
        return Err("a link with an empty target".into());
    }
    Ok(Some(target))
}

fn err(e: ntfs::NtfsError) -> String {
    match e {
        ntfs::NtfsError::NotADirectory { .. } => "not a folder".into(),
        e => e.to_string(),
    }
}

/// The attribute of type `ty` with no name (the unnamed `$DATA`, `$REPARSE_POINT`).
fn find_attr<'n, 'f>(
    fs: &mut Padded,
    f: &'f NtfsFile<'n>,
    ty: NtfsAttributeType,
) -> Result<Option<NtfsAttributeItem<'n, 'f>>, String> {
    let mut it = f.attributes();
    let mut n = 0;
    while let Some(item) = it.next(fs) {
        n += 1;
        if n > MAX_ATTRIBUTES {
            return Err(format!("more than {MAX_ATTRIBUTES} attributes in one file"));
        }
        let item = item.map_err(err)?;
        let a = item.to_attribute().map_err(err)?;
        if a.ty().ok() == Some(ty) && a.name_length() == 0 {
            return Ok(Some(item));
        }
    }
    Ok(None)
}

/// Reads the first `max` bytes of the unnamed attribute `ty` of `f`.
fn read_small(
    fs: &mut Padded,
    f: &NtfsFile<'_>,
    ty: NtfsAttributeType,
    max: u64,
) -> Result<Vec<u8>, String> {
    let item = find_attr(fs, f, ty)?.ok_or("the attribute is missing")?;
    let a = item.to_attribute().map_err(err)?;
    let mut v = a.value(fs).map_err(err)?;
    let mut buf = vec![0u8; v.len().min(max) as usize];
    v.read_exact(fs, &mut buf).map_err(err)?;
    Ok(buf)
}

impl NtfsView {
    /// The names (POSIX or Win32) and file records in the folder `rec`.
    fn names(&mut self, rec: u64) -> Result<Vec<(Vec<u8>, u64)>, String> {
        let dir = self.ntfs.file(&mut self.fs, rec).map_err(err)?;
        let index = dir.directory_index(&mut self.fs).map_err(err)?;
        let mut it = index.entries();
        let mut out = Vec::new();
        let mut n = 0usize;
        while let Some(e) = it.next(&mut self.fs) {
            n += 1;
            if n > MAX_INDEX_ENTRIES {
                return Err(format!(
                    "more than {MAX_INDEX_ENTRIES} index entries in one folder (a loop in its \
                     index?)"
                ));
            }
            let e = e.map_err(err)?;
            let Some(key) = e.key() else { continue };
            let key = key.map_err(err)?;
            if key.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let r = e.file_reference().file_record_number();
            if r < FIRST_USER_RECORD {
                continue;
            }
            if out.len() >= MAX_ENTRIES {
                return Err(format!("more than {MAX_ENTRIES} entries in one folder"));
            }
            out.push((key.name().to_string_lossy().into_bytes(), r));
        }
        Ok(out)
    }

    /// The file record at `path`, reading each folder on the way once.
    fn resolve(&mut self, path: &[Vec<u8>]) -> Result<u64, String> {
        if path.len() > MAX_DEPTH + 1 {
            return Err(format!("a path deeper than {} names", MAX_DEPTH + 1));
        }
        let mut rec = ROOT_RECORD;
        for (i, want) in path.iter().enumerate() {
            if let Some(&r) = self.cache.get(&path[..=i]) {
                rec = r;
                continue;
            }
            let names = self.names(rec)?;
            if self.cache.len() + names.len() > MAX_CACHED {
                self.cache.clear();
            }
            let hit = names.iter().find(|(n, _)| n == want).or_else(|| {
                let w = String::from_utf8_lossy(want).to_lowercase();
                names
                    .iter()
                    .find(|(n, _)| String::from_utf8_lossy(n).to_lowercase() == w)
            });
            let Some(&(_, r)) = hit else {
                return Err(super::NOT_FOUND.into());
            };
            let mut p = path[..i].to_vec();
            for (n, r) in &names {
                p.push(n.clone());
                self.cache.insert(p.clone(), *r);
                p.pop();
            }
            rec = r;
        }
        Ok(rec)
    }

    fn entry(&mut self, name: &[u8], rec: u64) -> Result<Entry, String> {
        let fs = &mut self.fs;
        let f = self.ntfs.file(fs, rec).map_err(err)?;
        let info = f.info().map_err(err)?;
        let attrs = info.file_attributes();
        let ro = attrs.contains(NtfsFileAttributeFlags::READ_ONLY);
        let (mtime, mtime_nsec) = nt_to_unix(info.modification_time().nt_timestamp());
        let mut e = Entry {
            name: String::from_utf8_lossy(name).into_owned(),
            raw_name: name.to_vec(),
            kind: EntryKind::File,
            size: 0,
            mode: if ro { 0o444 } else { 0o644 },
            uid: UNKNOWN_ID,
            gid: UNKNOWN_ID,
            mtime,
            mtime_nsec,
            target: None,
            raw_target: None,
        };
        let mut target = None;
        if attrs.contains(NtfsFileAttributeFlags::REPARSE_POINT) {
            let b = read_small(fs, &f, NtfsAttributeType::ReparsePoint, MAX_REPARSE_BYTES)
                .map_err(|w| format!("its reparse point: {w}"))?;
            match reparse_target(&b)? {
                Some(t) => target = Some(t),
                None => {
                    e.kind = EntryKind::Special;
                    return Ok(e);
                }
            }
        } else if f.is_directory() {
            e.kind = EntryKind::Dir;
            e.mode = if ro { 0o555 } else { 0o755 };
            return Ok(e);
        } else {
            let item = find_attr(fs, &f, NtfsAttributeType::Data)?;
            e.size = match &item {
                Some(item) => item.to_attribute().map_err(err)?.value_length(),
                None => 0,
            };
            if attrs.contains(NtfsFileAttributeFlags::SYSTEM)
                && (8..=MAX_INTERIX_BYTES).contains(&e.size)
            {
                let b = read_small(fs, &f, NtfsAttributeType::Data, MAX_INTERIX_BYTES)?;
                if let Some(t) = b.strip_prefix(INTERIX_LINK) {
                    target = Some(utf16le(t));
                } else if b.starts_with(b"IntxCHR\0") || b.starts_with(b"IntxBLK\0") {
                    e.kind = EntryKind::Special;
                }
            }
        }
        if let Some(t) = target {
            if t.is_empty() {
                return Err("a link with an empty target".into());
            }
            e.kind = EntryKind::Symlink;
            e.mode = 0o777;
            e.size = t.len() as u64;
            e.raw_target = Some(t.clone().into_bytes());
            e.target = Some(t);
        }
        Ok(e)
    }
}

impl FsView for NtfsView {
    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Entry, String> {
        let rec = self.resolve(path)?;
        let name = path.last().map(|n| n.as_slice()).unwrap_or(b"/");
        self.entry(name, rec)
    }

    fn list(&mut self, path: &[Vec<u8>]) -> Result<Vec<Entry>, String> {
        let rec = self.resolve(path)?;
        let names = self.names(rec)?;
        if self.cache.len() + names.len() > MAX_CACHED {
            self.cache.clear();
        }
        let mut out = Vec::with_capacity(names.len());
        let mut p = path.to_vec();
        for (name, r) in names {
            p.push(name.clone());
            self.cache.insert(p.clone(), r);
            p.pop();
            let e = self
                .entry(&name, r)
                .map_err(|w| format!("{}: {w}", String::from_utf8_lossy(&name)))?;
            out.push(e);
        }
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
        let rec = self.resolve(path)?;
        let fs = &mut self.fs;
        let f = self.ntfs.file(fs, rec).map_err(err)?;
        if f.is_directory() {
            return Err("not a file".into());
        }
        let Some(item) = find_attr(fs, &f, NtfsAttributeType::Data)? else {
            return if size == 0 {
                Ok(())
            } else {
                Err(format!("no data stream, but a size of {size}"))
            };
        };
        let a = item.to_attribute().map_err(err)?;
        let flags = a.flags();
        if flags.contains(NtfsAttributeFlags::COMPRESSED) {
            return Err("compressed NTFS files are not supported yet".into());
        }
        if flags.contains(NtfsAttributeFlags::ENCRYPTED) {
            return Err("encrypted NTFS files cannot be read without their key".into());
        }
        let mut v = a.value(fs).map_err(err)?;
        if v.len() < size {
            return Err(format!("the file holds {} bytes, not {size}", v.len()));
        }
        if start >= end {
            return Ok(());
        }
        v.seek(fs, std::io::SeekFrom::Start(start)).map_err(err)?;
        let read = &mut |b: &mut [u8]| v.read(fs, b).map_err(err);
        pump(&mut self.buf, (start, end, size), read, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestfs::{all_volumes, open_volume, reader, DiskSource, FsKind, MemDisk};

    /// Every regular file of the NTFS seed image (made by `mkntfs` and filled through
    /// `ntfs-3g`): each range read by seeking equals that slice of the whole file.
    #[test]
    fn ranges_of_ntfs_files_seek_and_equal_their_slice_of_the_whole() {
        let img =
            zstd::decode_all(&include_bytes!("../../fuzz/seeds/guestfs-ntfs.img.zst")[..]).unwrap();
        let disk = reader::shared(MemDisk(img));
        let vols = all_volumes(&[DiskSource {
            disk: disk.clone(),
            device: "vda".into(),
            dev_path: "vda".into(),
        }])
        .unwrap();
        let vol = vols.iter().find(|v| v.kind == FsKind::Ntfs).unwrap();
        let mut fs = open_volume(vol, &[disk]).unwrap();
        let (mut files, mut folders) = (Vec::new(), vec![Vec::<Vec<u8>>::new()]);
        while let Some(dir) = folders.pop() {
            for e in fs.list(&dir).unwrap() {
                let mut p = dir.clone();
                p.push(e.raw_name.clone());
                match e.kind {
                    EntryKind::Dir => folders.push(p),
                    EntryKind::File => files.push((p, e.size)),
                    _ => {}
                }
            }
        }
        assert!(files.iter().any(|(_, size)| *size > 4096), "{files:?}");
        for (path, size) in files {
            let read = |fs: &mut Box<dyn FsView>, start: u64, len: u64| {
                let mut got = Vec::new();
                fs.copy_range(&path, size, start, len, &mut |b: &[u8]| {
                    got.extend_from_slice(b);
                    Ok(())
                })
                .unwrap();
                got
            };
            let whole = read(&mut fs, 0, size);
            assert_eq!(whole.len() as u64, size);
            let s = size as usize;
            for (start, len) in [(1, 7), (s / 3, 8192), (s.saturating_sub(1), 5), (s, 5)] {
                let end = (start + len).min(s);
                assert_eq!(
                    read(&mut fs, start as u64, len as u64),
                    whole[start.min(s)..end.max(start.min(s))],
                    "{path:?} {start}+{len}"
                );
            }
        }
    }

    #[test]
    fn short_and_empty_disks_through_every_reader_are_errors_not_panics() {
        // The fuzz target's finding: an empty disk handed to the NTFS reader made the `ntfs`
        // crate panic on the failed read of its boot sector.
        for len in [0usize, 1, 511, 512, 4096] {
            for mode in 0..0x80u8 {
                crate::guestfs::fuzzing::exercise(&vec![0u8; len], mode);
            }
        }
    }

    #[test]
    fn windows_times_become_unix_times() {
        assert_eq!(nt_to_unix(116_444_736_000_000_000), (0, 0));
        assert_eq!(
            nt_to_unix(116_444_736_000_000_000 + 15_000_000_001),
            (1500, 100)
        );
        // Before 1970: seconds go down, nanoseconds stay positive.
        assert_eq!(nt_to_unix(116_444_735_999_999_999), (-1, 999_999_900));
        assert_eq!(nt_to_unix(0).0, -11_644_473_600);
        assert_eq!(nt_to_unix(u64::MAX).1 % 100, 0);
    }

    fn reparse(tag: u32, buf_at: usize, print: &str, sub: &str) -> Vec<u8> {
        let p: Vec<u8> = print.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let s: Vec<u8> = sub.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let mut b = vec![0u8; buf_at];
        b[0..4].copy_from_slice(&tag.to_le_bytes());
        b[8..10].copy_from_slice(&0u16.to_le_bytes());
        b[10..12].copy_from_slice(&(s.len() as u16).to_le_bytes());
        b[12..14].copy_from_slice(&(s.len() as u16).to_le_bytes());
        b[14..16].copy_from_slice(&(p.len() as u16).to_le_bytes());
        b.extend_from_slice(&s);
        b.extend_from_slice(&p);
        let len = (b.len() - 8) as u16;
        b[4..6].copy_from_slice(&len.to_le_bytes());
        b
    }

    #[test]
    fn reparse_points_give_link_targets_or_none() {
        let b = reparse(TAG_SYMLINK, 20, r"..\docs\a.txt", r"..\docs\a.txt");
        assert_eq!(
            reparse_target(&b).unwrap().as_deref(),
            Some("../docs/a.txt")
        );
        let b = reparse(TAG_MOUNT_POINT, 16, "", r"\??\C:\Users");
        assert_eq!(reparse_target(&b).unwrap().as_deref(), Some("C:/Users"));
        let mut lx = vec![0u8; 12];
        lx[0..4].copy_from_slice(&TAG_LX_SYMLINK.to_le_bytes());
        lx[4..6].copy_from_slice(&(4u16 + 5).to_le_bytes());
        lx.extend_from_slice(b"/a/b ");
        assert_eq!(reparse_target(&lx).unwrap().as_deref(), Some("/a/b "));
        // Dedup: not a link.
        let mut d = vec![0u8; 8];
        d[0..4].copy_from_slice(&0x8000_0013u32.to_le_bytes());
        assert_eq!(reparse_target(&d).unwrap(), None);
    }

    #[test]
    fn damaged_reparse_points_are_errors() {
        let mut b = reparse(TAG_SYMLINK, 20, "abc", "abc");
        b[14] = 0xff; // print name past the end
        assert!(reparse_target(&b).is_err());
        assert!(reparse_target(&[1, 2]).is_err());
        assert!(reparse_target(&reparse(TAG_SYMLINK, 20, "", "")).is_err());
        let mut lx = vec![0u8; 12];
        lx[0..4].copy_from_slice(&TAG_LX_SYMLINK.to_le_bytes());
        lx[4..6].copy_from_slice(&0xffffu16.to_le_bytes());
        assert!(reparse_target(&lx).is_err());
        lx[4..6].copy_from_slice(&0u16.to_le_bytes());
        assert!(reparse_target(&lx).is_err());
    }
}
