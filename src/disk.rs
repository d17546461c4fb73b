//! Virtual disk formats: reading a source disk as the guest sees it, and the block math of a disk.
//!
//! Owns: the formats a backup can read (raw, VMDK descriptors with flat/VMFS/zero/sparse extents,
//! monolithicSparse VMDK, qcow2 v2/v3 including compressed clusters) behind one trait,
//! [`DiskSource`], which hands out the guest-visible bytes at any offset.
//! Must not: know about chunks, repositories or NFS. All I/O here is blocking `std` file I/O;
//! async callers run it on a blocking thread.
//!
//! Every offset and size read from a file is untrusted: it is checked with checked arithmetic and
//! against the file's size, and a bad value is a [`DiskError::Corrupt`] naming the file, never a
//! panic.

use std::path::{Path, PathBuf};

pub mod export;
mod qcow2;
mod raw;
#[cfg(test)]
mod testutil;
mod vmdk;

pub use qcow2::Qcow2Disk;
pub use raw::RawDisk;
pub use vmdk::VmdkDisk;

/// Errors from opening or reading a source disk. Each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot read disk {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path} is not a supported format: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("disk {path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
}

/// The on-disk format of a source disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Vmdk,
    Qcow2,
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Vmdk => "vmdk",
            DiskFormat::Qcow2 => "qcow2",
        })
    }
}

/// A source disk, read as the guest sees it: `size()` bytes, unallocated areas read as zeros.
///
/// Implementations are `Sync` and reads take `&self` (positional I/O), so several threads can read
/// different blocks of one disk at once.
pub trait DiskSource: Send + Sync + std::fmt::Debug {
    /// The guest-visible size in bytes (the virtual size, not the file size).
    fn size(&self) -> u64;

    /// Fills `buf` with the guest-visible bytes at `offset`. `offset + buf.len()` must not exceed
    /// `size()`; a read past the end is an error, not a short read.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;

    /// True when the format itself says `[offset, offset + len)` holds no data (unallocated or
    /// explicitly zero), so the caller may skip reading it. `false` means "unknown or allocated".
    fn is_unallocated(&self, offset: u64, len: u64) -> bool {
        let _ = (offset, len);
        false
    }
}

/// Opens a disk. With `format` given the file is read in that format; without it the format is
/// detected from the file's first bytes (qcow2 magic, VMDK sparse magic, VMDK text descriptor,
/// otherwise raw).
pub fn open(path: &Path, format: Option<DiskFormat>) -> Result<Box<dyn DiskSource>, DiskError> {
    let format = match format {
        Some(f) => f,
        None => detect(path)?,
    };
    Ok(match format {
        DiskFormat::Raw => Box::new(RawDisk::open(path)?),
        DiskFormat::Vmdk => Box::new(VmdkDisk::open(path)?),
        DiskFormat::Qcow2 => Box::new(Qcow2Disk::open(path)?),
    })
}

/// How many leading bytes [`detect`] looks at.
const DETECT_BYTES: u64 = 1024;

/// Detects the format of a disk file from its first bytes.
///
/// qcow2 magic `QFI\xfb` is qcow2; the VMDK sparse magic `KDMV` (or the ESX `COWD` sparse magic,
/// which [`VmdkDisk::open`] then refuses with a clear message rather than letting it be read as
/// raw) is VMDK; a VMDK text descriptor is VMDK; anything else, including an empty file, is raw.
pub fn detect(path: &Path) -> Result<DiskFormat, DiskError> {
    let (file, len) = open_file(path)?;
    // At most DETECT_BYTES (1 KiB), so the cast cannot truncate.
    let mut head = vec![0u8; len.min(DETECT_BYTES) as usize];
    pread(&file, path, &mut head, 0)?;
    Ok(detect_bytes(&head))
}

/// The format the first bytes of a file say it has (see [`detect`]).
fn detect_bytes(head: &[u8]) -> DiskFormat {
    if head.starts_with(b"QFI\xfb") {
        DiskFormat::Qcow2
    } else if head.starts_with(b"KDMV") || head.starts_with(b"COWD") || looks_like_descriptor(head)
    {
        DiskFormat::Vmdk
    } else {
        DiskFormat::Raw
    }
}

/// True when `head` (the first KiB of a file) is a VMDK text descriptor: it starts with
/// `# Disk DescriptorFile` after optional whitespace, or it is text (NUL padding at the end is
/// allowed, as qemu-img pads descriptors to a sector) and contains `createType=`.
fn looks_like_descriptor(head: &[u8]) -> bool {
    if head
        .trim_ascii_start()
        .starts_with(b"# Disk DescriptorFile")
    {
        return true;
    }
    let text_end = head.iter().position(|&b| b == 0).unwrap_or(head.len());
    let (text, padding) = head.split_at(text_end);
    let is_text = padding.iter().all(|&b| b == 0)
        && text
            .iter()
            .all(|&b| (b >= 0x20 && b != 0x7f) || matches!(b, b'\t' | b'\n' | b'\r' | 0x0c));
    is_text && text.windows(11).any(|w| w == b"createType=")
}

/// A [`DiskError::Corrupt`] for `path`.
pub(crate) fn corrupt(path: &Path, what: impl Into<String>) -> DiskError {
    DiskError::Corrupt {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// A [`DiskError::Unsupported`] for `path`.
pub(crate) fn unsupported(path: &Path, what: impl Into<String>) -> DiskError {
    DiskError::Unsupported {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

/// A [`DiskError::Io`] for `path`.
pub(crate) fn io_error(path: &Path, source: std::io::Error) -> DiskError {
    DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens `path` read-only and returns it with its size in bytes. Works for block devices too (the
/// size comes from seeking to the end, which only moves the cursor positional reads ignore).
pub(crate) fn open_file(path: &Path) -> Result<(std::fs::File, u64), DiskError> {
    use std::io::Seek;
    let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    if meta.is_dir() {
        return Err(unsupported(path, "it is a directory, not a disk file"));
    }
    let len = (&file)
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| io_error(path, e))?;
    Ok((file, len))
}

/// Fills `buf` from `file` at `offset` with one positional read (no shared cursor, so callers on
/// several threads do not interfere). A file that ends early is [`DiskError::Corrupt`].
pub(crate) fn pread(
    file: &std::fs::File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), DiskError> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(
                path,
                format!(
                    "file ends before the {} bytes at offset {offset} it should hold",
                    buf.len()
                ),
            )
        } else {
            io_error(path, e)
        }
    })
}

/// Positional reads of a sparse image file gathered into runs: pieces of a guest read that lie
/// back to back in the file are read with one `pread`. `pointer` names what points into the
/// file (an L2 entry, a grain table), for the error when it points past the file's end.
pub(crate) struct ReadRuns<'a> {
    file: &'a std::fs::File,
    path: &'a Path,
    file_len: u64,
    pointer: &'static str,
    /// Not read yet: (file offset, offset in the buffer, length).
    run: Option<(u64, usize, usize)>,
}

impl<'a> ReadRuns<'a> {
    pub(crate) fn new(
        file: &'a std::fs::File,
        path: &'a Path,
        file_len: u64,
        pointer: &'static str,
    ) -> Self {
        ReadRuns {
            file,
            path,
            file_len,
            pointer,
            run: None,
        }
    }

    /// `buf[from..from + n]` is to hold the file's bytes at `at`.
    pub(crate) fn add(
        &mut self,
        buf: &mut [u8],
        at: u64,
        from: usize,
        n: usize,
    ) -> Result<(), DiskError> {
        match &mut self.run {
            Some((r_at, _, r_n)) if r_at.checked_add(*r_n as u64) == Some(at) => {
                *r_n += n;
                Ok(())
            }
            _ => {
                self.flush(buf)?;
                self.run = Some((at, from, n));
                Ok(())
            }
        }
    }

    /// Reads the pending run: before `buf` is filled any other way, and at the end.
    pub(crate) fn flush(&mut self, buf: &mut [u8]) -> Result<(), DiskError> {
        let Some((at, from, n)) = self.run.take() else {
            return Ok(());
        };
        if at.checked_add(n as u64).is_none_or(|e| e > self.file_len) {
            return Err(corrupt(
                self.path,
                format!(
                    "{} points to data at byte {at}, past the end of the {}-byte file",
                    self.pointer, self.file_len
                ),
            ));
        }
        pread(self.file, self.path, &mut buf[from..from + n], at)
    }
}

/// Checks that a guest read of `len` bytes at `offset` lies within a disk of `size` bytes and
/// returns its end. A read past the end (or one whose end overflows) is an `InvalidInput` I/O
/// error naming the disk: the caller asked for bytes that do not exist, the disk is not corrupt.
pub(crate) fn check_read(
    path: &Path,
    offset: u64,
    len: usize,
    size: u64,
) -> Result<u64, DiskError> {
    // usize is at most 64 bits on every target std supports, so this widening is lossless.
    let len = len as u64;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(end),
        _ => Err(io_error(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("read of {len} bytes at offset {offset} is past the end of the {size}-byte disk"),
            ),
        )),
    }
}
