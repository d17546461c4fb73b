//! VMDK disks: the extents a descriptor lists, and the guest view stitched from them.
//!
//! Owns: [`VmdkDisk`]: reading the descriptor (a `.vmdk` text file, or the one embedded in a
//! monolithicSparse file; parsing and refusals are in `vmdk/descriptor.rs`), opening and checking
//! its extents in order, FLAT/VMFS extents (raw files at a sector offset, named relative to the
//! descriptor's folder), ZERO extents and, through `vmdk/sparse.rs`, hosted sparse extents, then
//! routing each read to the extents it covers. It covers createType monolithicFlat,
//! twoGbMaxExtentFlat, vmfs (and its thin/preallocated variants), monolithicSparse and
//! twoGbMaxExtentSparse.
//! Must not: write anything, follow a parent (delta) disk, or guess at formats it does not read:
//! streamOptimized, vmfsSparse, seSparse, raw device mappings and NOACCESS extents are refused as
//! `Unsupported` with the format named, and a descriptor with a parentCID as a delta disk.

mod descriptor;
mod sparse;

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{check_read, corrupt, open_file, pread, unsupported, DiskError, DiskSource};
use descriptor::{check_descriptor, parse_descriptor, Descriptor};
use sparse::SparseExtent;

/// Bytes in a VMDK sector.
const SECTOR: u64 = 512;
/// Largest text descriptor read (real ones are about 1 KiB).
const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// Where an extent's bytes come from.
#[derive(Debug)]
enum Source {
    /// A raw file (FLAT or VMFS extent); `start` is the byte offset of the extent in it.
    Flat {
        path: PathBuf,
        file: File,
        start: u64,
    },
    /// Reads as zeros.
    Zero,
    /// A hosted sparse extent file.
    Sparse(SparseExtent),
}

/// One extent placed in the guest's address space.
#[derive(Debug)]
struct Extent {
    /// Guest offset of the extent's first byte.
    start: u64,
    len: u64,
    source: Source,
}

/// A VMDK disk opened from a descriptor file or a monolithicSparse file.
#[derive(Debug)]
pub struct VmdkDisk {
    path: PathBuf,
    size: u64,
    extents: Vec<Extent>,
}

impl VmdkDisk {
    /// Opens a VMDK: a text descriptor naming its extent files, or a monolithicSparse file.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let (file, file_len) = open_file(path)?;
        let mut magic = [0u8; 4];
        if file_len >= 4 {
            pread(&file, path, &mut magic, 0)?;
        }
        match &magic {
            b"KDMV" => Self::open_sparse_file(path, file, file_len),
            b"COWD" => Err(unsupported(
                path,
                "ESX COWD sparse extent (vmfsSparse) is not supported",
            )),
            _ => {
                if file_len > MAX_DESCRIPTOR_BYTES {
                    return Err(corrupt(
                        path,
                        format!(
                            "not a VMDK descriptor: {file_len} bytes, more than a descriptor's \
                             1 MiB"
                        ),
                    ));
                }
                // Bounded by MAX_DESCRIPTOR_BYTES just above, so it fits a usize.
                let mut raw = vec![0u8; file_len as usize];
                pread(&file, path, &mut raw, 0)?;
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                let text = String::from_utf8_lossy(&raw[..end]);
                let d = parse_descriptor(path, &text)?;
                check_descriptor(path, &d, false)?;
                Self::from_descriptor(path, &d)
            }
        }
    }

    /// A monolithicSparse file (or a sparse extent opened on its own): the file is its one
    /// extent; an embedded descriptor, if any, is only checked for createType and parentCID (a
    /// twoGbMaxExtentSparse extent file has an all-zero descriptor area, which passes).
    fn open_sparse_file(path: &Path, file: File, file_len: u64) -> Result<Self, DiskError> {
        let extent = SparseExtent::from_file(path, file, file_len)?;
        if let Some(text) = extent.embedded_descriptor()? {
            check_descriptor(path, &parse_descriptor(path, &text)?, true)?;
        }
        let size = extent.capacity();
        Ok(VmdkDisk {
            path: path.to_path_buf(),
            size,
            extents: vec![Extent {
                start: 0,
                len: size,
                source: Source::Sparse(extent),
            }],
        })
    }

    /// Opens the extents a text descriptor lists, in order.
    fn from_descriptor(path: &Path, d: &Descriptor) -> Result<Self, DiskError> {
        if d.extents.is_empty() {
            return Err(corrupt(path, "descriptor lists no extents"));
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut extents = Vec::with_capacity(d.extents.len());
        let mut size = 0u64;
        for e in &d.extents {
            let line = e.line;
            if e.access == "NOACCESS" {
                return Err(unsupported(
                    path,
                    format!("descriptor line {line}: NOACCESS extent"),
                ));
            }
            let len = e.sectors.checked_mul(SECTOR).ok_or_else(|| {
                corrupt(
                    path,
                    format!("descriptor line {line}: {} sectors overflow", e.sectors),
                )
            })?;
            let start = size;
            size = size.checked_add(len).ok_or_else(|| {
                corrupt(
                    path,
                    format!("descriptor line {line}: disk size overflows 64 bits"),
                )
            })?;
            let file_path = || match &e.file {
                Some(name) if !name.is_empty() => Ok(dir.join(name)),
                _ => Err(corrupt(
                    path,
                    format!("descriptor line {line}: {} extent names no file", e.kind),
                )),
            };
            let source = match e.kind.as_str() {
                "ZERO" => Source::Zero,
                "FLAT" | "VMFS" => {
                    let fp = file_path()?;
                    let (file, flen) = open_file(&fp)?;
                    let begin = e.offset.checked_mul(SECTOR);
                    if begin
                        .and_then(|b| b.checked_add(len))
                        .is_none_or(|end| end > flen)
                    {
                        return Err(corrupt(
                            path,
                            format!(
                                "descriptor line {line}: extent file {} is {flen} bytes, too short \
                                 for {} sectors at sector {}",
                                fp.display(),
                                e.sectors,
                                e.offset
                            ),
                        ));
                    }
                    Source::Flat {
                        path: fp,
                        file,
                        start: begin.unwrap_or(0),
                    }
                }
                "SPARSE" => {
                    let fp = file_path()?;
                    let sparse = SparseExtent::open(&fp)?;
                    if sparse.capacity() < len {
                        return Err(corrupt(
                            path,
                            format!(
                                "descriptor line {line}: sparse extent {} holds {} bytes, the \
                                 descriptor says {len}",
                                fp.display(),
                                sparse.capacity()
                            ),
                        ));
                    }
                    Source::Sparse(sparse)
                }
                other => {
                    return Err(unsupported(
                        path,
                        format!("descriptor line {line}: VMDK extent type {other}"),
                    ))
                }
            };
            if len > 0 {
                extents.push(Extent { start, len, source });
            }
        }
        Ok(VmdkDisk {
            path: path.to_path_buf(),
            size,
            extents,
        })
    }

    /// The descriptor (or monolithicSparse) file this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Index of the extent holding guest offset `offset` (< size).
    fn extent_index(&self, offset: u64) -> usize {
        self.extents.partition_point(|e| e.start + e.len <= offset)
    }
}

impl DiskSource for VmdkDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let end = check_read(&self.path, offset, buf.len(), self.size)?;
        let mut pos = offset;
        let mut done = 0usize;
        for extent in self.extents.iter().skip(self.extent_index(offset)) {
            if pos >= end {
                break;
            }
            let piece_end = end.min(extent.start + extent.len);
            // piece_end - pos ≤ buf.len(), so it fits a usize.
            let n = (piece_end - pos) as usize;
            let piece = &mut buf[done..done + n];
            let rel = pos - extent.start;
            match &extent.source {
                Source::Zero => piece.fill(0),
                Source::Flat { path, file, start } => pread(file, path, piece, start + rel)?,
                Source::Sparse(s) => s.read_at(piece, rel)?,
            }
            pos = piece_end;
            done += n;
        }
        if pos < end {
            return Err(corrupt(&self.path, "extents do not cover the disk size"));
        }
        Ok(())
    }

    fn is_unallocated(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len).filter(|&e| e <= self.size) else {
            return false;
        };
        if len == 0 {
            return false;
        }
        let mut pos = offset;
        for extent in self.extents.iter().skip(self.extent_index(offset)) {
            if pos >= end {
                break;
            }
            let piece_end = end.min(extent.start + extent.len);
            let empty = match &extent.source {
                Source::Zero => true,
                Source::Flat { .. } => false,
                Source::Sparse(s) => s
                    .is_unallocated(pos - extent.start, piece_end - pos)
                    .unwrap_or(false),
            };
            if !empty {
                return false;
            }
            pos = piece_end;
        }
        pos >= end
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{
        assert_reads_match, assert_unsupported, convert, err, sample_image, write_file,
    };
    use super::super::{detect, open, DiskFormat};
    use super::descriptor::tests::descriptor;
    use super::*;

    #[test]
    fn qemu_flat_subformats_read_like_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let want = sample_image();
        let raw = write_file(dir.path(), "src.raw", &want);
        for sub in ["monolithicFlat", "twoGbMaxExtentFlat"] {
            let vmdk = dir.path().join(format!("{sub}.vmdk"));
            convert(
                &raw,
                &vmdk,
                &["-O", "vmdk", "-o", &format!("subformat={sub}")],
            );
            assert_eq!(detect(&vmdk).unwrap(), DiskFormat::Vmdk, "{sub}");
            let disk = VmdkDisk::open(&vmdk).unwrap();
            assert_eq!(disk.path(), vmdk);
            assert_reads_match(&disk, &want, &[65536]);
            assert!(!disk.is_unallocated(0, 4096));
            let boxed = open(&vmdk, None).unwrap();
            assert_eq!(boxed.size(), want.len() as u64);
        }
        // The flat extent file itself is raw data.
        let flat = dir.path().join("monolithicFlat-flat.vmdk");
        assert_eq!(detect(&flat).unwrap(), DiskFormat::Raw);
    }

    #[test]
    fn hand_written_descriptor_with_flat_zero_and_vmfs_extents() {
        let dir = tempfile::tempdir().unwrap();
        let img = sample_image();
        let a = &img[..3 * 512 * 1024]; // 1.5 MiB
        let b = &img[3 * 512 * 1024..3 * 512 * 1024 + 777 * 512];
        let c = &img[img.len() - 100 * 512..];
        write_file(dir.path(), "part a.bin", a);
        let mut b_file = vec![0xeeu8; 8 * 512]; // 8 sectors of junk before the extent
        b_file.extend_from_slice(b);
        b_file.extend_from_slice(&[0xdd; 512]); // and a sector after it
        write_file(dir.path(), "b.bin", &b_file);
        write_file(dir.path(), "c.bin", c);
        let extents = format!(
            "RW {} FLAT \"part a.bin\" 0\nRW 2000 ZERO\nRDONLY 777 FLAT \"b.bin\" 8\n\
             RW 0 ZERO\nRW 100 VMFS \"c.bin\"",
            a.len() / 512
        );
        let text = format!("   \n{}", descriptor("monolithicFlat", &extents));
        let path = write_file(dir.path(), "hand.vmdk", text.as_bytes());
        assert_eq!(detect(&path).unwrap(), DiskFormat::Vmdk);
        let mut want = a.to_vec();
        want.extend_from_slice(&[0u8; 2000 * 512]);
        want.extend_from_slice(b);
        want.extend_from_slice(c);
        let disk = VmdkDisk::open(&path).unwrap();
        let zero_start = a.len() as u64;
        assert_reads_match(&disk, &want, &[a.len(), a.len() + 2000 * 512, 4096]);
        assert!(disk.is_unallocated(zero_start, 2000 * 512));
        assert!(!disk.is_unallocated(zero_start - 512, 1024));
        assert!(!disk.is_unallocated(zero_start + 2000 * 512 - 512, 1024));
        assert!(!disk.is_unallocated(u64::MAX - 10, 20));
    }

    #[test]
    fn detect_finds_descriptors_by_header_or_create_type() {
        let dir = tempfile::tempdir().unwrap();
        let plain = write_file(dir.path(), "a.vmdk", b"createType=\"vmfs\"\nRW 1 ZERO\n");
        assert_eq!(detect(&plain).unwrap(), DiskFormat::Vmdk);
        let padded = write_file(
            dir.path(),
            "b.vmdk",
            b"\t\r\n  # Disk DescriptorFile\nthen binary \x01\x02",
        );
        assert_eq!(detect(&padded).unwrap(), DiskFormat::Vmdk);
        let mut nul_padded = b"version=1\ncreateType=\"vmfs\"\n".to_vec();
        nul_padded.resize(512, 0);
        let nul_padded = write_file(dir.path(), "c.vmdk", &nul_padded);
        assert_eq!(detect(&nul_padded).unwrap(), DiskFormat::Vmdk);
        let cowd = write_file(dir.path(), "d.vmdk", b"COWD\x01\0\0\0");
        assert_eq!(detect(&cowd).unwrap(), DiskFormat::Vmdk);
        assert_unsupported(&err(VmdkDisk::open(&cowd)), &cowd, "COWD");
        // A zero-extent-only descriptor opens without any extent file.
        let disk = open(&plain, None).unwrap();
        assert_eq!(disk.size(), 512);
        assert!(disk.is_unallocated(0, 512));
    }

    #[test]
    fn stream_optimized_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let raw = write_file(dir.path(), "src.raw", &sample_image());
        let vmdk = dir.path().join("so.vmdk");
        convert(
            &raw,
            &vmdk,
            &["-O", "vmdk", "-o", "subformat=streamOptimized"],
        );
        assert_eq!(detect(&vmdk).unwrap(), DiskFormat::Vmdk);
        assert_unsupported(&err(open(&vmdk, None)), &vmdk, "streamOptimized");
        let text = descriptor("streamOptimized", "RW 100 SPARSE \"so.vmdk\"");
        let desc = write_file(dir.path(), "so-desc.vmdk", text.as_bytes());
        assert_unsupported(&err(VmdkDisk::open(&desc)), &desc, "streamOptimized");
    }

    #[test]
    fn missing_extent_file_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let text = descriptor("twoGbMaxExtentFlat", "RW 8 FLAT \"gone-f001.vmdk\" 0");
        let path = write_file(dir.path(), "gone.vmdk", text.as_bytes());
        let e = err(VmdkDisk::open(&path));
        match &e {
            DiskError::Io { path: p, source } => {
                assert_eq!(p, &dir.path().join("gone-f001.vmdk"));
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(e.to_string().contains("gone-f001.vmdk"), "{e}");
        let sparse = descriptor("twoGbMaxExtentSparse", "RW 8 SPARSE \"gone-s001.vmdk\"");
        let path = write_file(dir.path(), "gone2.vmdk", sparse.as_bytes());
        assert!(err(VmdkDisk::open(&path))
            .to_string()
            .contains("gone-s001.vmdk"));
    }
}
