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

pub mod descriptor;
mod qcow2;
mod raw;
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

/// Detects the format of a disk file from its first bytes.
pub fn detect(path: &Path) -> Result<DiskFormat, DiskError> {
    todo!("helper: detect {path:?}")
}
