//! Free space and files of the filesystem that holds the state directory (where every write of
//! every mount lands), for FSSTAT. ESXi sizes a VM's swap file by the free space it reports.

use std::path::Path;

/// Free space of the filesystem holding a path: (total, free, available to us) in bytes.
pub fn space(path: &Path) -> Option<(u64, u64, u64)> {
    let s = rustix::fs::statvfs(path).ok()?;
    let f = s.f_frsize;
    Some((
        s.f_blocks.saturating_mul(f),
        s.f_bfree.saturating_mul(f),
        s.f_bavail.saturating_mul(f),
    ))
}

/// Files of the filesystem holding a path: (total, free, available to us).
pub fn files(path: &Path) -> Option<(u64, u64, u64)> {
    let s = rustix::fs::statvfs(path).ok()?;
    Some((s.f_files, s.f_ffree, s.f_favail))
}
