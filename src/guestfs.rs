//! Guest files: the volumes and files inside a snapshot's disks, read without booting anything.
//!
//! Owns: finding volumes on a snapshot's disks (MBR with extended partitions, GPT, a file
//! system on the whole disk; `parts.rs`), telling their kind by magic, opening ext2/3/4
//! (`ext4-view`, `ext.rs`), FAT12/16/32 (`fatfs`, `fat.rs`) and NTFS (`ntfs`, `ntfs.rs`) read-only, listing folders and
//! copying files and folders out into a folder of the host (`extract.rs`).
//!
//! Must not: write to a disk (the readers' write side is an error), trust anything a guest's
//! bytes say (sizes, counts, offsets, names are hostile input: every loop and allocation is
//! bounded by a documented const), follow a guest's symbolic link on the host, or write
//! outside the folder it was given.
//!
//! Threads: the file system crates are synchronous and single-threaded (`ext4-view` holds an
//! `Rc`), so each operation runs whole on one blocking thread (`spawn_blocking`); its disk
//! reads go through [`reader::DiskReader`], which waits for the repository's async read path
//! (`DiskImage::read_at`: every chunk checked against its digest) with `Handle::block_on` and
//! keeps the last chunks it read, so that metadata reads do not fetch a chunk again.
//!
//! Names: a volume is `/DEVICE/partN` (MBR primaries 1-4, logicals from 5; GPT by entry), or
//! `/DEVICE/whole` for a file system on the whole disk, DEVICE the disk's device in the
//! config made path-safe (`scsi0:0` -> `scsi0-0`). A path inside a volume follows it:
//! `/vda/part2/etc/hostname`.

mod ext;
mod extract;
mod fat;
pub mod fuzzing;
pub mod lvm;
mod ntfs;
pub mod parts;
mod reader;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::repo::{ChunkReader, DiskImage, Progress, RepoError, Snapshot};

pub use extract::GetSummary;
pub use parts::FsKind;
pub use reader::{DiskReader, MemDisk};

/// Deepest folder a walk goes into (below the path asked for).
pub const MAX_DEPTH: usize = 256;
/// The most entries one `ls` of a folder or one `get` takes; past it is an error, not a cut.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Pieces of a file read by [`GuestFiles::read_file`] waiting for their reader (each at most
/// the file system reader's buffer, 1 MiB): what one streamed file holds in memory at most.
pub const STREAM_PIECES: usize = 4;
/// What every file system reader's `stat` and `list` say when a name is missing; the one error
/// text that becomes [`GuestFsError::NotFound`].
pub const NOT_FOUND: &str = "no such file or folder";

/// An owner (`uid`, `gid`) the file system does not give (NTFS): shown as `?`, left as the
/// copier's own by `get`.
pub const UNKNOWN_ID: u32 = u32::MAX;

/// A source of bytes at any offset: a disk of a snapshot, or one in memory (tests, fuzzing).
pub trait ReadAt {
    /// The size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), GuestFsError>;
}

#[derive(Debug, thiserror::Error)]
pub enum GuestFsError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(
        "{path}: no such volume in snapshot {snapshot}; `livemount files ls {snapshot}` lists its \
         volumes"
    )]
    NoVolume { snapshot: String, path: String },
    #[error("{volume}: {reason}")]
    NotOpenable { volume: String, reason: String },
    #[error(
        "{volume}: cannot open its {kind} file system: {what} (the volume is damaged or uses a \
         feature this version does not read)"
    )]
    Open {
        volume: String,
        kind: &'static str,
        what: String,
    },
    #[error(
        "{volume}{path}: no such file or folder in snapshot {snapshot}; list its folder with \
         `livemount files ls {snapshot} {volume}`"
    )]
    NotFound {
        snapshot: String,
        volume: String,
        path: String,
    },
    #[error("{volume}{path}: {what}")]
    Fs {
        volume: String,
        path: String,
        what: String,
    },
    #[error("disk {disk}: cannot read {len} bytes at byte {offset}: {what}")]
    Read {
        disk: String,
        offset: u64,
        len: usize,
        what: String,
    },
    #[error("{path}: {what}")]
    Output { path: PathBuf, what: String },
    #[error("{0}")]
    Invalid(String),
    #[error("guest files task failed: {0}")]
    Task(String),
}

/// One volume of a snapshot: a partition, a whole disk or an LVM logical volume.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Volume {
    /// `/vda/part1`, `/vda/lvm/VG/LV`.
    pub path: String,
    /// The disk's device in the config (`vda`, `scsi0:0`); for a logical volume, the disk it
    /// is named under.
    pub device: String,
    #[serde(rename = "type")]
    pub kind: FsKind,
    pub size: u64,
    /// Why it cannot be opened, if it cannot.
    pub reason: Option<String>,
    /// Where its bytes are: one extent for a partition, one per segment for a logical volume
    /// (empty for one that cannot be read).
    #[serde(skip)]
    pub extents: Vec<Extent>,
}

/// A piece of a volume: its bytes `at..at + len` are bytes `offset..offset + len` of disk
/// `disk` (the index of the disk among those opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub at: u64,
    pub disk: usize,
    pub offset: u64,
    pub len: u64,
}

impl Volume {
    fn partition(path: String, device: &str, disk: usize, start: u64, size: u64) -> Volume {
        Volume {
            path,
            device: device.into(),
            kind: FsKind::Unknown,
            size,
            reason: None,
            extents: vec![Extent {
                at: 0,
                disk,
                offset: start,
                len: size,
            }],
        }
    }
}

/// What an entry of a folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    /// A device, FIFO or socket: listed, never copied.
    Special,
}

/// One file, folder or link inside a volume.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// The name as text (bytes that are not UTF-8 shown as U+FFFD).
    pub name: String,
    #[serde(skip)]
    pub raw_name: Vec<u8>,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (`0o7777` part of the mode).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds and nanoseconds since the Unix epoch.
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// A symbolic link's target, as text.
    pub target: Option<String>,
    #[serde(skip)]
    pub raw_target: Option<Vec<u8>>,
}

/// The pieces of a file being read ([`GuestFiles::read_file`]), in order; an error is the last.
pub type FilePieces = tokio::sync::mpsc::Receiver<Result<Bytes, GuestFsError>>;

/// A path inside a volume, as its names (bytes).
pub type GuestPath = Vec<Vec<u8>>;

/// Shows a guest path as `/a/b`.
pub fn show_path(p: &[Vec<u8>]) -> String {
    if p.is_empty() {
        return "/".into();
    }
    p.iter()
        .map(|c| format!("/{}", String::from_utf8_lossy(c)))
        .collect()
}

/// A file system opened read-only. Errors are the `what` of a [`GuestFsError::Fs`].
pub(crate) trait FsView {
    /// The entry at `path`, not following a final symbolic link; `[]` is the root.
    fn stat(&mut self, path: &[Vec<u8>]) -> Result<Entry, String>;
    /// The entries of the folder at `path` (without `.` and `..`), at most [`MAX_ENTRIES`].
    fn list(&mut self, path: &[Vec<u8>]) -> Result<Vec<Entry>, String>;
    /// Streams bytes `start..start + len` of the regular file at `path`, whose size is `size`
    /// (the range cut at its end), into `out`. Each reader seeks to `start`.
    fn copy_range(
        &mut self,
        path: &[Vec<u8>],
        size: u64,
        start: u64,
        len: u64,
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), String>;
    /// Streams the whole regular file at `path`, whose size is `size`, into `out`.
    fn copy(
        &mut self,
        path: &[Vec<u8>],
        size: u64,
        out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), String> {
        self.copy_range(path, size, 0, size, out)
    }
}

/// Bytes a reader copies at a time; its buffer is made once and reused from file to file.
pub const COPY_BUF: usize = 1 << 20;

/// Streams bytes `start..end` of a file of `size` bytes from `read` (already at `start`) into
/// `out`, through `buf`, which grows to at most [`COPY_BUF`] and is kept for the next file (a
/// fresh zeroed megabyte per file cost more than the copy for a tree of small files).
pub(crate) fn pump(
    buf: &mut Vec<u8>,
    (start, end, size): (u64, u64, u64),
    read: &mut dyn FnMut(&mut [u8]) -> Result<usize, String>,
    out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<(), String> {
    let need = (end.saturating_sub(start)).min(COPY_BUF as u64) as usize;
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let mut done = start;
    while done < end {
        let want = (end - done).min(buf.len() as u64) as usize;
        let n = read(&mut buf[..want])?;
        if n == 0 {
            return Err(format!("the file ends at byte {done} of its {size}"));
        }
        out(&buf[..n]).map_err(|e| format!("writing the copy: {e}"))?;
        done += n as u64;
    }
    Ok(())
}

/// A path-safe name for a disk's device: `scsi0:0` -> `scsi0-0`.
pub fn device_name(device: &str, index: usize) -> String {
    let s: String = device
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        format!("disk{index}")
    } else {
        s
    }
}

/// The volumes of one disk. A damaged partition table is one volume (the disk) whose reason
/// says what was wrong; reading the disk failing is an error.
pub fn volumes_of(
    r: &mut dyn ReadAt,
    device: &str,
    dev_path: &str,
    disk: usize,
) -> Result<Vec<Volume>, GuestFsError> {
    let size = r.size();
    let layout = match parts::read_layout(r, size) {
        Ok(l) => l,
        Err(e) => {
            let mut v = Volume::partition(format!("/{dev_path}"), device, disk, 0, size);
            v.reason = Some(format!("damaged partition table: {e}"));
            return Ok(vec![v]);
        }
    };
    let found: Vec<(String, u64, u64)> = match layout {
        parts::Layout::Whole => vec![("whole".into(), 0, size)],
        parts::Layout::Mbr(p) | parts::Layout::Gpt(p) => p
            .into_iter()
            .map(|p| (format!("part{}", p.number), p.start, p.len))
            .collect(),
    };
    let mut out = Vec::with_capacity(found.len());
    for (name, start, len) in found {
        let n = (len.min(parts::PROBE_BYTES as u64)) as usize;
        let mut probe = vec![0u8; n];
        r.read_exact_at(start, &mut probe)?;
        let kind = parts::detect_fs(&probe);
        let mut v = Volume::partition(format!("/{dev_path}/{name}"), device, disk, start, len);
        v.kind = kind;
        v.reason = kind.not_openable().map(str::to_string);
        out.push(v);
    }
    Ok(out)
}

/// A disk of a snapshot for [`all_volumes`]: its reader, device and path-safe name.
pub struct DiskSource {
    pub disk: reader::Shared,
    pub device: String,
    pub dev_path: String,
}

/// The volumes of all `disks`: each disk's partitions (see [`volumes_of`]), then the logical
/// volumes of the LVM2 volume groups on them (a volume group may span disks). A physical
/// volume stays listed, with a reason that says where its logical volumes are or what was
/// wrong with it.
pub fn all_volumes(disks: &[DiskSource]) -> Result<Vec<Volume>, GuestFsError> {
    let mut out = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let mut r = d
            .disk
            .try_borrow_mut()
            .map_err(|_| GuestFsError::Invalid("disk reader re-entered".into()))?;
        out.extend(volumes_of(&mut *r, &d.device, &d.dev_path, i)?);
    }
    let mut pvs = Vec::new();
    for v in out.iter_mut().filter(|v| v.kind == FsKind::Lvm2) {
        let &[e] = v.extents.as_slice() else {
            continue;
        };
        let d = &disks[e.disk];
        let info = {
            let mut r = d
                .disk
                .try_borrow_mut()
                .map_err(|_| GuestFsError::Invalid("disk reader re-entered".into()))?;
            lvm::read_pv(&mut *r, e.offset, e.len)
        };
        match info {
            Ok(info) => pvs.push(lvm::PvFound {
                disk: e.disk,
                device: d.device.clone(),
                dev_path: d.dev_path.clone(),
                volume: v.path.clone(),
                start: e.offset,
                len: e.len,
                info,
            }),
            Err(what) => v.reason = Some(format!("lvm2 physical volume: {what}")),
        }
    }
    if pvs.is_empty() {
        return Ok(out);
    }
    let found = lvm::logical_volumes(&pvs);
    for (path, note) in found.pv_notes {
        if let Some(v) = out.iter_mut().find(|v| v.path == path) {
            v.reason = Some(note);
        }
    }
    let shared: Vec<reader::Shared> = disks.iter().map(|d| d.disk.clone()).collect();
    for lv in found.lvs {
        let mut v = Volume {
            path: lv.path,
            device: lv.device,
            kind: FsKind::Lvm,
            size: lv.size,
            reason: lv.reason,
            extents: lv.extents,
        };
        if v.reason.is_none() {
            let n = v.size.min(parts::PROBE_BYTES as u64) as usize;
            let mut probe = vec![0u8; n];
            let mut w = reader::Window::new(shared.clone(), v.extents.clone(), v.size);
            match std::io::Read::read_exact(&mut w, &mut probe) {
                Ok(()) => {
                    v.kind = parts::detect_fs(&probe);
                    v.reason = v.kind.not_openable().map(str::to_string);
                }
                Err(e) => v.reason = Some(format!("cannot read its first bytes: {e}")),
            }
        }
        out.push(v);
    }
    Ok(out)
}

/// Opens a volume's file system over `disks` (all the disks its extents may name).
pub(crate) fn open_volume(
    vol: &Volume,
    disks: &[reader::Shared],
) -> Result<Box<dyn FsView>, GuestFsError> {
    if let Some(reason) = &vol.reason {
        return Err(GuestFsError::NotOpenable {
            volume: vol.path.clone(),
            reason: reason.clone(),
        });
    }
    let window = reader::Window::new(disks.to_vec(), vol.extents.clone(), vol.size);
    let opened = match vol.kind {
        FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => ext::open(window),
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => fat::open(window),
        FsKind::Ntfs => ntfs::open(window),
        other => Err(other.not_openable().unwrap_or("cannot be opened").into()),
    };
    opened.map_err(|what| GuestFsError::Open {
        volume: vol.path.clone(),
        kind: vol.kind.as_str(),
        what,
    })
}

/// Splits a path given by the user into names; `.` and `..` are refused.
fn split_user_path(path: &str) -> Result<Vec<String>, GuestFsError> {
    let mut out = Vec::new();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        if c == "." || c == ".." {
            return Err(GuestFsError::Invalid(format!(
                "{path}: `.` and `..` are not allowed in a path; name the folder itself"
            )));
        }
        out.push(c.to_string());
    }
    Ok(out)
}

/// The volume a user's path goes into, and the path inside it.
fn find_volume<'v>(
    volumes: &'v [Volume],
    snapshot: &str,
    path: &str,
) -> Result<Option<(&'v Volume, GuestPath)>, GuestFsError> {
    let names = split_user_path(path)?;
    for v in volumes {
        let vnames: Vec<&str> = v.path.split('/').filter(|c| !c.is_empty()).collect();
        if names.len() >= vnames.len() && names.iter().zip(&vnames).all(|(a, b)| a == b) {
            let rest = names[vnames.len()..]
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect();
            return Ok(Some((v, rest)));
        }
    }
    // A disk or the top: no volume, but a known prefix.
    let known = names.is_empty()
        || volumes.iter().any(|v| {
            let vnames: Vec<&str> = v.path.split('/').filter(|c| !c.is_empty()).collect();
            names.len() < vnames.len() && names.iter().zip(&vnames).all(|(a, b)| a == b)
        });
    if known {
        Ok(None)
    } else {
        Err(GuestFsError::NoVolume {
            snapshot: snapshot.into(),
            path: path.into(),
        })
    }
}

/// What `ls` found: the volumes (under the path asked, or all), then the folder's entries.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listing {
    pub snapshot: String,
    pub volumes: Vec<Volume>,
    /// The path listed inside a volume, if the path went into one.
    pub path: Option<String>,
    pub entries: Vec<Entry>,
}

/// A snapshot's disks, opened for reading guest files.
pub struct GuestFiles {
    snapshot: String,
    disks: Vec<DiskImage>,
    volumes: Vec<Volume>,
    /// Chunks each disk's reader keeps (more when it reads the repository itself).
    keep_bytes: u64,
}

async fn blocking<T, F>(f: F) -> Result<T, GuestFsError>
where
    F: FnOnce() -> Result<T, GuestFsError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        if e.is_panic() {
            GuestFsError::Task(format!(
                "a reader crashed on a damaged volume ({e}); this is a bug, please report it"
            ))
        } else {
            GuestFsError::Task(e.to_string())
        }
    })?
}

impl GuestFiles {
    /// Opens every disk of `snap` (or only those `disk` names: device, path-safe device or
    /// disk name) and finds their volumes.
    pub async fn open(snap: &Snapshot, disk: Option<&str>) -> Result<GuestFiles, GuestFsError> {
        Self::open_via(snap, disk, None).await
    }

    /// The same, the disks' chunks read through `chunks` instead of the repository's own
    /// reader (the media agent gives its cache, in the background class of its fetch
    /// scheduler). Either way each disk is a [`DiskImage`]: offsets to chunks by its block
    /// table, and every chunk checked against its digest where it is fetched.
    pub async fn open_via(
        snap: &Snapshot,
        disk: Option<&str>,
        chunks: Option<Arc<dyn ChunkReader>>,
    ) -> Result<GuestFiles, GuestFsError> {
        let snapshot = snap.manifest.display_name();
        let mut disks = Vec::new();
        let mut names = Vec::new();
        for (i, d) in snap.manifest.disks.iter().enumerate() {
            let mut dev = device_name(&d.device, i);
            if names.iter().any(|(_, n): &(String, String)| *n == dev) {
                dev = format!("{dev}-{i}");
            }
            if let Some(want) = disk {
                if want != d.device && want != dev && want != d.name {
                    continue;
                }
            }
            let image = snap.disk(i).await?;
            let image = match &chunks {
                Some(c) => image.with_reader(c.clone()),
                None => image,
            };
            disks.push((i, image));
            names.push((d.device.clone(), dev));
        }
        if disks.is_empty() {
            return Err(GuestFsError::Invalid(format!(
                "snapshot {snapshot} has no disk {}; `livemount show {snapshot}` lists its disks",
                disk.unwrap_or("at all")
            )));
        }
        let handle = tokio::runtime::Handle::current();
        let keep_bytes = match chunks {
            Some(_) => reader::AGENT_CACHE_BYTES,
            None => reader::CACHE_BYTES,
        };
        let images: Vec<DiskImage> = disks.iter().map(|(_, d)| d.clone()).collect();
        let volumes = blocking(move || {
            let sources: Vec<DiskSource> = images
                .into_iter()
                .zip(names)
                .map(|(d, (device, dev_path))| DiskSource {
                    disk: reader::shared(DiskReader::new(d, handle.clone(), keep_bytes)),
                    device,
                    dev_path,
                })
                .collect();
            all_volumes(&sources)
        })
        .await?;
        Ok(GuestFiles {
            snapshot,
            disks: disks.into_iter().map(|(_, d)| d).collect(),
            volumes,
            keep_bytes,
        })
    }

    pub fn snapshot(&self) -> &str {
        &self.snapshot
    }

    pub fn volumes(&self) -> &[Volume] {
        &self.volumes
    }

    fn open_fs(&self, vol: &Volume) -> Result<Box<dyn FsView>, GuestFsError> {
        // A reader per disk; one that no extent names reads nothing.
        let disks: Vec<reader::Shared> = self
            .disks
            .iter()
            .map(|d| {
                reader::shared(DiskReader::new(
                    d.clone(),
                    tokio::runtime::Handle::current(),
                    self.keep_bytes,
                ))
            })
            .collect();
        open_volume(vol, &disks)
    }

    /// Lists `path`: the volumes under it (all for `/`), or the folder (or the one entry) it
    /// names inside a volume.
    pub async fn list(self: &Arc<Self>, path: &str) -> Result<Listing, GuestFsError> {
        let this = self.clone();
        let path = path.to_string();
        let handle = tokio::runtime::Handle::current();
        blocking(move || {
            let _guard = handle.enter();
            this.list_blocking(&path)
        })
        .await
    }

    fn list_blocking(&self, path: &str) -> Result<Listing, GuestFsError> {
        let found = find_volume(&self.volumes, &self.snapshot, path)?;
        let Some((vol, inner)) = found else {
            let names = split_user_path(path)?;
            let volumes = self
                .volumes
                .iter()
                .filter(|v| {
                    let vn: Vec<&str> = v.path.split('/').filter(|c| !c.is_empty()).collect();
                    names.iter().zip(&vn).all(|(a, b)| a == b)
                })
                .cloned()
                .collect();
            return Ok(Listing {
                snapshot: self.snapshot.clone(),
                volumes,
                path: None,
                entries: Vec::new(),
            });
        };
        let mut fs = self.open_fs(vol)?;
        let fs_err = |what: String, p: &[Vec<u8>]| GuestFsError::Fs {
            volume: vol.path.clone(),
            path: show_path(p),
            what,
        };
        let top = fs.stat(&inner).map_err(|w| self.stat_err(vol, &inner, w))?;
        let entries = if top.kind == EntryKind::Dir {
            fs.list(&inner).map_err(|w| fs_err(w, &inner))?
        } else {
            vec![top]
        };
        Ok(Listing {
            snapshot: self.snapshot.clone(),
            volumes: vec![vol.clone()],
            path: Some(format!(
                "{}{}",
                vol.path,
                if inner.is_empty() {
                    String::new()
                } else {
                    show_path(&inner)
                }
            )),
            entries,
        })
    }

    /// A `stat` error of `path` in `vol`: a missing name is [`GuestFsError::NotFound`].
    fn stat_err(&self, vol: &Volume, path: &[Vec<u8>], what: String) -> GuestFsError {
        if what == NOT_FOUND || what == "not a folder" {
            GuestFsError::NotFound {
                snapshot: self.snapshot.clone(),
                volume: vol.path.clone(),
                path: show_path(path),
            }
        } else {
            GuestFsError::Fs {
                volume: vol.path.clone(),
                path: show_path(path),
                what,
            }
        }
    }

    /// The volume and the regular file at `path`; anything else at `path` (a folder, a link,
    /// a device, a volume or disk itself) is [`GuestFsError::Invalid`] saying what it is.
    #[allow(clippy::type_complexity)]
    fn file_at(
        &self,
        path: &str,
    ) -> Result<(Volume, GuestPath, Entry, Box<dyn FsView>), GuestFsError> {
        let Some((vol, inner)) = find_volume(&self.volumes, &self.snapshot, path)? else {
            return Err(GuestFsError::Invalid(format!(
                "{path}: a disk or the top of snapshot {}, not a file; name a file inside a \
                 volume (`livemount files ls {}` lists them)",
                self.snapshot, self.snapshot
            )));
        };
        let mut fs = self.open_fs(vol)?;
        let e = fs.stat(&inner).map_err(|w| self.stat_err(vol, &inner, w))?;
        let shown = format!("{}{}", vol.path, show_path(&inner));
        let what = match e.kind {
            EntryKind::File => return Ok((vol.clone(), inner, e, fs)),
            EntryKind::Dir => "a folder".to_string(),
            EntryKind::Symlink => {
                format!("a symbolic link to {}", e.target.as_deref().unwrap_or("?"))
            }
            EntryKind::Special => "a device, FIFO or socket".to_string(),
        };
        Err(GuestFsError::Invalid(format!(
            "{shown} in snapshot {} is {what}, not a file; `livemount files ls {} {shown}` \
             shows it",
            self.snapshot, self.snapshot
        )))
    }

    /// The regular file at `path`: its volume and entry. Errors as [`GuestFiles::read_file`].
    pub async fn stat_file(self: &Arc<Self>, path: &str) -> Result<(Volume, Entry), GuestFsError> {
        let this = self.clone();
        let path = path.to_string();
        let handle = tokio::runtime::Handle::current();
        blocking(move || {
            let _guard = handle.enter();
            this.file_at(&path).map(|(v, _, e, _)| (v, e))
        })
        .await
    }

    /// Streams bytes `start..start + len` of the regular file at `path` (cut at its end): a
    /// blocking thread reads it and sends it in pieces of at most 1 MiB, at most
    /// [`STREAM_PIECES`] of them waiting; dropping the receiver ends the read at its next
    /// piece. Returns the file's entry and the pieces to come; a read that fails midway sends
    /// its error as the last piece. Not a file at `path` is [`GuestFsError::Invalid`], no such
    /// name [`GuestFsError::NotFound`].
    pub async fn read_file(
        self: &Arc<Self>,
        path: &str,
        start: u64,
        len: u64,
    ) -> Result<(Entry, FilePieces), GuestFsError> {
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_PIECES);
        let (first, found) = tokio::sync::oneshot::channel();
        let this = self.clone();
        let path = path.to_string();
        let handle = tokio::runtime::Handle::current();
        let task = tokio::task::spawn_blocking(move || {
            let _guard = handle.enter();
            let (vol, inner, e, mut fs) = match this.file_at(&path) {
                Ok(x) => x,
                Err(err) => {
                    let _ = first.send(Err(err));
                    return;
                }
            };
            let size = e.size;
            if first.send(Ok(e)).is_err() {
                return;
            }
            let r = fs.copy_range(&inner, size, start, len, &mut |buf: &[u8]| {
                tx.blocking_send(Ok(Bytes::copy_from_slice(buf)))
                    .map_err(|_| std::io::Error::other("the reader went away"))
            });
            if let Err(what) = r {
                let _ = tx.blocking_send(Err(GuestFsError::Fs {
                    volume: vol.path.clone(),
                    path: show_path(&inner),
                    what,
                }));
            }
        });
        match found.await {
            Ok(r) => r.map(|e| (e, rx)),
            // The task ended without a word: it panicked.
            Err(_) => Err(match task.await {
                Err(e) if e.is_panic() => GuestFsError::Task(format!(
                    "a reader crashed on a damaged volume ({e}); this is a bug, please report it"
                )),
                Err(e) => GuestFsError::Task(e.to_string()),
                Ok(()) => GuestFsError::Task("the reader ended without an answer".into()),
            }),
        }
    }

    /// Copies the files and folders at `paths` into `to` (made if missing): see `extract.rs`
    /// for the rules that keep every write inside it.
    pub async fn get(
        self: &Arc<Self>,
        paths: &[String],
        to: &Path,
        progress: Arc<dyn Progress>,
    ) -> Result<GetSummary, GuestFsError> {
        let this = self.clone();
        let paths = paths.to_vec();
        let to = to.to_path_buf();
        let handle = tokio::runtime::Handle::current();
        blocking(move || {
            let _guard = handle.enter();
            let mut sources = Vec::new();
            for p in &paths {
                let Some((vol, inner)) = find_volume(&this.volumes, &this.snapshot, p)? else {
                    return Err(GuestFsError::Invalid(format!(
                        "{p}: name a volume or a path inside one (`livemount files ls {}` lists \
                         them)",
                        this.snapshot
                    )));
                };
                sources.push((vol.clone(), inner));
            }
            let mut opened = Vec::new();
            for (vol, inner) in sources {
                let fs = this.open_fs(&vol)?;
                opened.push((vol, inner, fs));
            }
            extract::get(opened, &to, progress.as_ref())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_are_path_safe() {
        assert_eq!(device_name("vda", 0), "vda");
        assert_eq!(device_name("scsi0:0", 0), "scsi0-0");
        assert_eq!(device_name("", 3), "disk3");
        assert_eq!(device_name("..", 1), "disk1");
        assert_eq!(device_name("a/b", 1), "a-b");
    }

    fn vol(path: &str) -> Volume {
        let mut v = Volume::partition(path.into(), "vda", 0, 0, 1);
        v.kind = FsKind::Ext4;
        v
    }

    /// A file system of one file, `data`, whose reads give at most 3 bytes; `short` makes
    /// the file end early, after that many bytes.
    struct Pieces {
        data: Vec<u8>,
        short: Option<usize>,
        buf: Vec<u8>,
    }

    impl FsView for Pieces {
        fn stat(&mut self, _: &[Vec<u8>]) -> Result<Entry, String> {
            Err(NOT_FOUND.into())
        }
        fn list(&mut self, _: &[Vec<u8>]) -> Result<Vec<Entry>, String> {
            Ok(Vec::new())
        }
        fn copy_range(
            &mut self,
            _: &[Vec<u8>],
            size: u64,
            start: u64,
            len: u64,
            out: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
        ) -> Result<(), String> {
            let end = start.saturating_add(len).min(size);
            if start >= end {
                return Ok(());
            }
            let data = &self.data[..self.short.unwrap_or(self.data.len())];
            let mut pos = start as usize;
            let read = &mut |b: &mut [u8]| {
                let n = b.len().min(3).min(data.len().saturating_sub(pos));
                b[..n].copy_from_slice(&data[pos..pos + n]);
                pos += n;
                Ok(n)
            };
            pump(&mut self.buf, (start, end, size), read, out)
        }
    }

    #[test]
    fn a_range_is_pumped_through_short_reads_and_a_buffer_kept_small() {
        let data: Vec<u8> = (0..20).collect();
        let mut fs = Pieces {
            data: data.clone(),
            short: None,
            buf: Vec::new(),
        };
        let mut range = |start: u64, len: u64| {
            let mut got = Vec::new();
            fs.copy_range(&[], 20, start, len, &mut |b: &[u8]| {
                got.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            got
        };
        assert_eq!(range(0, 20), data);
        assert_eq!(range(4, 5), data[4..9]);
        assert_eq!(range(3, 3), data[3..6]);
        assert_eq!(range(18, u64::MAX), data[18..]);
        assert_eq!(range(20, 5), Vec::<u8>::new());
        assert_eq!(range(u64::MAX, 5), Vec::<u8>::new());
        assert_eq!(range(5, 0), Vec::<u8>::new());
        // The whole file through the default `copy`; the buffer grew to the largest range.
        let mut all = Vec::new();
        fs.copy(&[], 20, &mut |b: &[u8]| {
            all.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!((all, fs.buf.len()), (data.clone(), 20));
        // An error of the output is the range's error.
        let r = fs.copy_range(&[], 20, 2, 5, &mut |_: &[u8]| {
            Err(std::io::Error::other("disk full"))
        });
        assert!(r.unwrap_err().contains("disk full"));
        // A file that ends before its size is an error naming where.
        fs.short = Some(11);
        let r = fs.copy(&[], 20, &mut |_: &[u8]| Ok(()));
        assert_eq!(r.unwrap_err(), "the file ends at byte 11 of its 20");
    }

    #[test]
    fn user_paths_find_their_volume() {
        let vols = [vol("/vda/part1"), vol("/vda/part2")];
        let (v, rest) = find_volume(&vols, "s", "/vda/part2/etc/x")
            .unwrap()
            .unwrap();
        assert_eq!(v.path, "/vda/part2");
        assert_eq!(rest, vec![b"etc".to_vec(), b"x".to_vec()]);
        let (v, rest) = find_volume(&vols, "s", "vda/part1/").unwrap().unwrap();
        assert_eq!((v.path.as_str(), rest.len()), ("/vda/part1", 0));
        assert!(find_volume(&vols, "s", "/vda").unwrap().is_none());
        assert!(find_volume(&vols, "s", "/").unwrap().is_none());
        assert!(matches!(
            find_volume(&vols, "s", "/vdb/part1"),
            Err(GuestFsError::NoVolume { .. })
        ));
        assert!(find_volume(&vols, "s", "/vda/part1/../part2").is_err());
        assert!(find_volume(&vols, "s", "/vda/part10").is_err());
    }
}
