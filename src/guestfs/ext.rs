//! ext2/3/4 through the `ext4-view` crate (read-only; it checks metadata checksums and bounds
//! its own path resolution: 40 links, 4096-byte paths).

use ext4_view::{Ext4, Ext4Error, FileType, Metadata};

use super::reader::Window;
use super::{pump, Entry, EntryKind, FsView, MAX_ENTRIES};

pub(crate) struct ExtView {
    fs: Ext4,
    /// The copy buffer, reused from file to file.
    buf: Vec<u8>,
}

pub(crate) fn open(window: Window) -> Result<Box<dyn FsView>, String> {
    let fs = Ext4::load(Box::new(window)).map_err(|e| e.to_string())?;
    Ok(Box::new(ExtView {
        fs,
        buf: Vec::new(),
    }))
}

/// `/a/b` from names.
fn ext_path(path: &[Vec<u8>]) -> Vec<u8> {
    if path.is_empty() {
        return b"/".to_vec();
    }
    let mut out = Vec::new();
    for c in path {
        out.push(b'/');
        out.extend_from_slice(c);
    }
    out
}

fn err(e: Ext4Error) -> String {
    match e {
        Ext4Error::NotFound => "no such file or folder".into(),
        Ext4Error::NotADirectory => "not a folder".into(),
        e => e.to_string(),
    }
}

fn entry(name: &[u8], m: &Metadata, target: Option<Vec<u8>>) -> Entry {
    let ft = m.file_type();
    let kind = if ft == FileType::Directory {
        EntryKind::Dir
    } else if ft == FileType::Symlink {
        EntryKind::Symlink
    } else if ft == FileType::Regular {
        EntryKind::File
    } else {
        EntryKind::Special
    };
    let mtime = m.modified();
    Entry {
        name: String::from_utf8_lossy(name).into_owned(),
        raw_name: name.to_vec(),
        kind,
        size: m.len(),
        mode: u32::from(m.mode()) & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: mtime.seconds(),
        mtime_nsec: mtime.nanoseconds().min(999_999_999),
        target: target
            .as_ref()
            .map(|t| String::from_utf8_lossy(t).into_owned()),
        raw_target: target,
    }
}

impl ExtView {
    fn path(&self, path: &[Vec<u8>]) -> Result<ext4_view::PathBuf, String> {
        ext4_view::PathBuf::try_from(ext_path(path)).map_err(|e| format!("bad path: {e}"))
    }

    fn target(&self, p: &ext4_view::PathBuf, m: &Metadata) -> Result<Option<Vec<u8>>, String> {
        if m.file_type() != FileType::Symlink {
            return Ok(None);
        }
        let t = self.fs.read_link(p).map_err(err)?;
        Ok(Some(AsRef::<[u8]>::as_ref(&t).to_vec()))
    }
}

impl FsView for ExtView {
    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Entry, String> {
        let p = self.path(path)?;
        let m = self.fs.symlink_metadata(&p).map_err(err)?;
        let target = self.target(&p, &m)?;
        let name = path.last().map(|n| n.as_slice()).unwrap_or(b"/");
        Ok(entry(name, &m, target))
    }

    fn list(&mut self, path: &[Vec<u8>]) -> Result<Vec<Entry>, String> {
        let p = self.path(path)?;
        let mut out = Vec::new();
        for e in self.fs.read_dir(&p).map_err(err)? {
            let e = e.map_err(err)?;
            let name = e.file_name();
            let name: &[u8] = name.as_ref();
            if name == b"." || name == b".." {
                continue;
            }
            if out.len() >= MAX_ENTRIES {
                return Err(format!("more than {MAX_ENTRIES} entries in one folder"));
            }
            let m = e.metadata().map_err(err)?;
            let target = self.target(&e.path(), &m)?;
            out.push(entry(name, &m, target));
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
        if start >= end {
            return Ok(());
        }
        let p = self.path(path)?;
        let mut f = self.fs.open(&p).map_err(err)?;
        f.seek_to(start).map_err(err)?;
        let read = &mut |b: &mut [u8]| f.read_bytes(b).map_err(err);
        pump(&mut self.buf, (start, end, size), read, out)
    }
}
