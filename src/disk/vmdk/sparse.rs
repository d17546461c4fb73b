//! Hosted sparse VMDK extents (`KDMV` magic): the header, the grain directory and the lookup of
//! grain tables, as used by monolithicSparse and twoGbMaxExtentSparse disks.
//!
//! Owns: [`SparseExtent`], which validates the header and every grain-directory entry at open
//! and answers reads relative to the start of the extent, reading only the grain-table entries a
//! read needs (one positional read per grain table touched) and coalescing contiguous grains.
//! Must not: parse descriptors (that is `vmdk.rs`), cache grain tables behind a lock, or accept
//! compressed grains or markers (streamOptimized), which it refuses as `Unsupported`.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::super::{corrupt, open_file, pread, unsupported, DiskError, ReadRuns};

/// Bytes in a VMDK sector.
const SECTOR: u64 = 512;
/// Size of the on-disk `SparseExtentHeader`.
const HEADER_LEN: usize = 512;
/// Flag: grains are compressed (streamOptimized).
const FLAG_COMPRESSED: u32 = 1 << 16;
/// Flag: the extent contains stream markers (streamOptimized).
const FLAG_MARKERS: u32 = 1 << 17;
/// `gdOffset` meaning "the grain directory is in the footer" (streamOptimized).
const GD_AT_END: u64 = u64::MAX;
/// Largest grain accepted, in sectors (64 MiB; VMware uses 64 KiB).
const MAX_GRAIN_SECTORS: u64 = 1 << 17;
/// Largest grain table accepted, in entries (VMware uses 512).
const MAX_GTES: u64 = 1 << 16;
/// Largest grain directory accepted, in entries (64 MiB of directory).
const MAX_GD_ENTRIES: u64 = 1 << 24;
/// Largest embedded descriptor read, in sectors (1 MiB).
const MAX_DESCRIPTOR_SECTORS: u64 = 2048;
/// Grain table entry meaning "this grain reads as zeros".
const GTE_ZERO: u32 = 1;

/// Where one part of a read comes from.
enum Grain {
    /// Unallocated or zero grain: reads as zeros.
    Zero,
    /// Bytes at this offset of the extent file.
    Data(u64),
}

/// An open hosted sparse extent.
#[derive(Debug)]
pub(super) struct SparseExtent {
    path: PathBuf,
    file: File,
    file_len: u64,
    /// Extent size in bytes (`capacity` sectors).
    capacity: u64,
    grain_bytes: u64,
    gtes: u64,
    /// Primary grain directory: sector offsets of the grain tables, 0 = not allocated.
    gd: Vec<u32>,
    /// Embedded descriptor as (byte offset, byte length), if any.
    descriptor: Option<(u64, u64)>,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl SparseExtent {
    /// Opens the sparse extent file at `path`.
    pub(super) fn open(path: &Path) -> Result<Self, DiskError> {
        let (file, file_len) = open_file(path)?;
        Self::from_file(path, file, file_len)
    }

    /// Reads and checks the header and grain directory of an already open extent file.
    pub(super) fn from_file(path: &Path, file: File, file_len: u64) -> Result<Self, DiskError> {
        let bad = |what: String| corrupt(path, what);
        if file_len < HEADER_LEN as u64 {
            return Err(bad(format!(
                "truncated sparse extent header: file is {file_len} bytes, the header is 512"
            )));
        }
        let mut h = [0u8; HEADER_LEN];
        pread(&file, path, &mut h, 0)?;
        if &h[0..4] != b"KDMV" {
            return Err(bad(
                "sparse extent does not start with the KDMV magic".into()
            ));
        }
        let version = le_u32(&h, 4);
        let flags = le_u32(&h, 8);
        let capacity_sectors = le_u64(&h, 12);
        let grain_sectors = le_u64(&h, 20);
        let desc_offset = le_u64(&h, 28);
        let desc_sectors = le_u64(&h, 36);
        let gtes = u64::from(le_u32(&h, 44));
        let gd_offset = le_u64(&h, 56);
        let compress = u16::from_le_bytes([h[77], h[78]]);
        if flags & (FLAG_COMPRESSED | FLAG_MARKERS) != 0 || compress != 0 || gd_offset == GD_AT_END
        {
            return Err(unsupported(
                path,
                "streamOptimized VMDK (compressed grains, markers or a footer) cannot be read \
                 directly; convert it to monolithicSparse or raw first",
            ));
        }
        if !(1..=3).contains(&version) {
            return Err(unsupported(
                path,
                format!("sparse extent version {version}"),
            ));
        }
        if grain_sectors == 0 || grain_sectors > MAX_GRAIN_SECTORS {
            return Err(bad(format!("grain size of {grain_sectors} sectors")));
        }
        if gtes == 0 || gtes > MAX_GTES {
            return Err(bad(format!("{gtes} entries per grain table")));
        }
        let capacity = capacity_sectors
            .checked_mul(SECTOR)
            .ok_or_else(|| bad(format!("capacity of {capacity_sectors} sectors overflows")))?;
        let grain_bytes = grain_sectors * SECTOR; // ≤ 2^26: bounded above
        let gt_span = grain_bytes * gtes; // ≤ 2^42: bounded above
        let gd_entries = capacity.div_ceil(gt_span);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(bad(format!(
                "grain directory of {gd_entries} entries (capacity {capacity_sectors} sectors) \
                 is too large"
            )));
        }
        let gd_start = gd_offset
            .checked_mul(SECTOR)
            .filter(|&s| s != 0 && s.checked_add(gd_entries * 4).is_some_and(|e| e <= file_len))
            .ok_or_else(|| {
                bad(format!(
                    "grain directory at sector {gd_offset} ({gd_entries} entries) is not within \
                     the {file_len}-byte file"
                ))
            })?;
        // gd_entries ≤ 2^24, so the byte count fits a usize.
        let mut raw = vec![0u8; (gd_entries * 4) as usize];
        pread(&file, path, &mut raw, gd_start)?;
        let gd: Vec<u32> = raw.chunks_exact(4).map(|c| le_u32(c, 0)).collect();
        for (i, &gde) in gd.iter().enumerate() {
            let fits = (u64::from(gde) * SECTOR)
                .checked_add(gtes * 4)
                .is_some_and(|end| end <= file_len);
            if gde != 0 && !fits {
                return Err(bad(format!(
                    "grain directory entry {i} points to a grain table at sector {gde}, past the \
                     end of the {file_len}-byte file"
                )));
            }
        }
        let descriptor = if desc_offset != 0 && desc_sectors != 0 {
            let start = desc_offset.checked_mul(SECTOR);
            let len = desc_sectors.min(MAX_DESCRIPTOR_SECTORS) * SECTOR;
            match start.and_then(|s| s.checked_add(len)) {
                Some(end) if end <= file_len => start.map(|s| (s, len)),
                _ => {
                    return Err(bad(format!(
                        "embedded descriptor at sector {desc_offset} ({desc_sectors} sectors) is \
                         not within the {file_len}-byte file"
                    )))
                }
            }
        } else {
            None
        };
        Ok(SparseExtent {
            path: path.to_path_buf(),
            file,
            file_len,
            capacity,
            grain_bytes,
            gtes,
            gd,
            descriptor,
        })
    }

    /// The extent's size in bytes.
    pub(super) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The embedded descriptor text (up to its first NUL), if the header points at one.
    pub(super) fn embedded_descriptor(&self) -> Result<Option<String>, DiskError> {
        let Some((start, len)) = self.descriptor else {
            return Ok(None);
        };
        // len ≤ MAX_DESCRIPTOR_SECTORS * 512 (1 MiB), so it fits a usize.
        let mut raw = vec![0u8; len as usize];
        pread(&self.file, &self.path, &mut raw, start)?;
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        Ok(Some(String::from_utf8_lossy(&raw[..end]).into_owned()))
    }

    /// Calls `each(pos, len, grain)` for consecutive pieces covering `[offset, offset + len)` of
    /// the extent, one grain table at a time, each table's entries read in one positional read.
    /// Stops early (returning `Ok(false)`) when `each` returns `Ok(false)`.
    fn walk(
        &self,
        offset: u64,
        len: u64,
        mut each: impl FnMut(u64, u64, Grain) -> Result<bool, DiskError>,
    ) -> Result<bool, DiskError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.capacity)
            .ok_or_else(|| {
                corrupt(
                    &self.path,
                    format!("read of {len} bytes at {offset} is past the sparse extent's end"),
                )
            })?;
        let gt_span = self.grain_bytes * self.gtes;
        let mut pos = offset;
        while pos < end {
            let gd_index = pos / gt_span;
            let table_start = gd_index * gt_span;
            let span_end = end.min(table_start.saturating_add(gt_span));
            // pos < capacity, so gd_index < gd.len(); `get` keeps that from ever panicking.
            let gde = usize::try_from(gd_index)
                .ok()
                .and_then(|i| self.gd.get(i).copied())
                .ok_or_else(|| corrupt(&self.path, "grain directory too short for capacity"))?;
            if gde == 0 {
                if !each(pos, span_end - pos, Grain::Zero)? {
                    return Ok(false);
                }
                pos = span_end;
                continue;
            }
            let first = (pos - table_start) / self.grain_bytes;
            let last = (span_end - 1 - table_start) / self.grain_bytes;
            // At most MAX_GTES entries of 4 bytes; the table lies in the file (checked at open).
            let mut raw = vec![0u8; ((last - first + 1) * 4) as usize];
            pread(
                &self.file,
                &self.path,
                &mut raw,
                u64::from(gde) * SECTOR + first * 4,
            )?;
            for (i, entry) in raw.chunks_exact(4).enumerate() {
                let grain_start = table_start + (first + i as u64) * self.grain_bytes;
                let piece_end = span_end.min(grain_start + self.grain_bytes);
                let gte = le_u32(entry, 0);
                let grain = match gte {
                    0 | GTE_ZERO => Grain::Zero,
                    _ => Grain::Data(u64::from(gte) * SECTOR + (pos - grain_start)),
                };
                if !each(pos, piece_end - pos, grain)? {
                    return Ok(false);
                }
                pos = piece_end;
            }
        }
        Ok(true)
    }

    /// Fills `buf` with the extent's bytes at `offset` (relative to the extent's start).
    pub(super) fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let mut runs = ReadRuns::new(&self.file, &self.path, self.file_len, "a grain table");
        // usize is at most 64 bits on every supported target: lossless.
        self.walk(offset, buf.len() as u64, |pos, len, grain| {
            // Both are within buf, whose length is a usize.
            let (from, n) = ((pos - offset) as usize, len as usize);
            match grain {
                Grain::Zero => {
                    runs.flush(buf)?;
                    buf[from..from + n].fill(0);
                }
                Grain::Data(at) => runs.add(buf, at, from, n)?,
            }
            Ok(true)
        })?;
        runs.flush(buf)
    }

    /// True when no grain in `[offset, offset + len)` of the extent holds data.
    pub(super) fn is_unallocated(&self, offset: u64, len: u64) -> Result<bool, DiskError> {
        self.walk(offset, len, |_, _, grain| Ok(matches!(grain, Grain::Zero)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::testutil::{
        assert_corrupt, assert_damage_never_panics, assert_reads_match, assert_unsupported,
        convert, err, qemu_img, sample_image, write_file,
    };
    use super::super::super::{detect, DiskFormat, DiskSource};
    use super::super::VmdkDisk;
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// A qemu-made monolithicSparse copy of the sample image, as (dir, path, file bytes).
    fn monolithic() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let raw = write_file(dir.path(), "src.raw", &sample_image());
        let vmdk = dir.path().join("mono.vmdk");
        convert(
            &raw,
            &vmdk,
            &["-O", "vmdk", "-o", "subformat=monolithicSparse"],
        );
        let bytes = std::fs::read(&vmdk).unwrap();
        (dir, vmdk, bytes)
    }

    /// Writes `bytes` with `patch` applied at `at` as a new file in `dir`.
    fn patched(dir: &Path, name: &str, bytes: &[u8], at: usize, patch: &[u8]) -> PathBuf {
        let mut b = bytes.to_vec();
        b[at..at + patch.len()].copy_from_slice(patch);
        write_file(dir, name, &b)
    }

    #[test]
    fn qemu_sparse_subformats_read_like_the_source() {
        let (dir, mono, _) = monolithic();
        let want = sample_image();
        let raw = dir.path().join("src.raw");
        let split = dir.path().join("split.vmdk");
        convert(
            &raw,
            &split,
            &["-O", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"],
        );
        let extent = dir.path().join("split-s001.vmdk");
        for path in [&mono, &split, &extent] {
            assert_eq!(detect(path).unwrap(), DiskFormat::Vmdk, "{path:?}");
            let disk = VmdkDisk::open(path).unwrap();
            assert_reads_match(&disk, &want, &[65536, 32 * MIB as usize]);
            // The sample's [2 MiB, 3 MiB) is zeros, which qemu-img leaves unallocated.
            assert!(disk.is_unallocated(2 * MIB, MIB));
            assert!(!disk.is_unallocated(2 * MIB - 512, MIB));
            assert!(!disk.is_unallocated(0, 512));
            assert!(!disk.is_unallocated(0, u64::MAX));
        }
    }

    #[test]
    fn zero_grain_entries_read_as_zeros() {
        let (dir, _, bytes) = monolithic();
        // Point the first grain-table entry at the zero-grain marker.
        let gd = le_u64(&bytes, 56) as usize * 512;
        let gt = le_u32(&bytes, gd) as usize * 512;
        let path = patched(dir.path(), "z.vmdk", &bytes, gt, &GTE_ZERO.to_le_bytes());
        let disk = VmdkDisk::open(&path).unwrap();
        let mut buf = vec![1u8; 70000];
        disk.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 0));
        assert_eq!(&buf[65536..], &sample_image()[65536..70000]);
        assert!(disk.is_unallocated(0, 65536));
        assert!(!disk.is_unallocated(0, 65537));
    }

    #[test]
    fn corrupt_headers_are_errors_naming_the_file() {
        let (dir, _, bytes) = monolithic();
        let d = dir.path();
        let short = write_file(d, "short.vmdk", &bytes[..300]);
        assert_corrupt(&err(VmdkDisk::open(&short)), &short, "truncated");
        let cases: [(&str, usize, Vec<u8>, &str); 6] = [
            ("grain0", 20, 0u64.to_le_bytes().to_vec(), "grain size"),
            (
                "grainbig",
                20,
                (1u64 << 40).to_le_bytes().to_vec(),
                "grain size",
            ),
            ("gtes0", 44, 0u32.to_le_bytes().to_vec(), "grain table"),
            ("cap", 12, (u64::MAX / 3).to_le_bytes().to_vec(), "capacity"),
            ("cap2", 12, (1u64 << 50).to_le_bytes().to_vec(), "too large"),
            (
                "gd",
                56,
                (1u64 << 40).to_le_bytes().to_vec(),
                "grain directory",
            ),
        ];
        for (name, at, patch, needle) in &cases {
            let path = patched(d, &format!("{name}.vmdk"), &bytes, *at, patch);
            assert_corrupt(&err(VmdkDisk::open(&path)), &path, needle);
        }
        let gd = le_u64(&bytes, 56) as usize * 512;
        let path = patched(d, "gde.vmdk", &bytes, gd, &0x7fff_fff0u32.to_le_bytes());
        assert_corrupt(
            &err(VmdkDisk::open(&path)),
            &path,
            "grain directory entry 0",
        );
        let path = patched(d, "desc.vmdk", &bytes, 28, &u64::MAX.to_le_bytes());
        assert_corrupt(&err(VmdkDisk::open(&path)), &path, "embedded descriptor");
    }

    #[test]
    fn grain_pointing_past_eof_fails_the_read() {
        let (dir, _, bytes) = monolithic();
        let gd = le_u64(&bytes, 56) as usize * 512;
        let gt = le_u32(&bytes, gd) as usize * 512;
        let path = patched(
            dir.path(),
            "gte.vmdk",
            &bytes,
            gt,
            &0x7fff_0000u32.to_le_bytes(),
        );
        let disk = VmdkDisk::open(&path).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_corrupt(
            &err(disk.read_exact_at(&mut buf, 100)),
            &path,
            "past the end",
        );
        assert!(!disk.is_unallocated(0, 4096));
        // Grains the bad entry does not cover still read.
        disk.read_exact_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, sample_image()[65536..65536 + 4096]);
    }

    #[test]
    fn compressed_flags_versions_and_parents_are_refused() {
        let (dir, _, bytes) = monolithic();
        let d = dir.path();
        let flags = le_u32(&bytes, 8) | FLAG_COMPRESSED;
        let path = patched(d, "flag.vmdk", &bytes, 8, &flags.to_le_bytes());
        assert_unsupported(&err(VmdkDisk::open(&path)), &path, "streamOptimized");
        let path = patched(d, "algo.vmdk", &bytes, 77, &1u16.to_le_bytes());
        assert_unsupported(&err(VmdkDisk::open(&path)), &path, "streamOptimized");
        let path = patched(d, "ver.vmdk", &bytes, 4, &7u32.to_le_bytes());
        assert_unsupported(&err(VmdkDisk::open(&path)), &path, "version 7");

        let base = d.join("base.vmdk");
        let top = d.join("top.vmdk");
        qemu_img(&["create", "-q", "-f", "vmdk", base.to_str().unwrap(), "1M"]);
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        qemu_img(&["create", "-q", "-f", "vmdk", "-b", b, "-F", "vmdk", t]);
        assert_unsupported(&err(VmdkDisk::open(&top)), &top, "parent disk");
        assert_eq!(VmdkDisk::open(&base).unwrap().size(), MIB);
    }

    #[test]
    fn descriptor_larger_than_its_sparse_extent_is_corrupt() {
        let (dir, _, _) = monolithic();
        let text =
            "# Disk DescriptorFile\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\n\
                    RW 99999 SPARSE \"mono.vmdk\"\n";
        let path = write_file(dir.path(), "over.vmdk", text.as_bytes());
        assert_corrupt(&err(VmdkDisk::open(&path)), &path, "sparse extent");
        let bad = write_file(dir.path(), "notkdmv.bin", &[0u8; 4096]);
        let text = text
            .replace("99999", "8")
            .replace("mono.vmdk", "notkdmv.bin");
        let path = write_file(dir.path(), "notkdmv.vmdk", text.as_bytes());
        assert_corrupt(&err(VmdkDisk::open(&path)), &bad, "KDMV");
    }

    #[test]
    fn damaged_images_never_panic() {
        let (dir, _, bytes) = monolithic();
        let gd = le_u64(&bytes, 56) as usize * 512;
        let gt = le_u32(&bytes, gd) as usize * 512;
        let desc = le_u64(&bytes, 28) as usize * 512;
        let ranges = [0..80, gd..gd + 8, gt..gt + 4 * 90, desc..desc + 200];
        let opened = assert_damage_never_panics(dir.path(), &bytes, &ranges, 300, |p| {
            VmdkDisk::open(p).map(|d| Box::new(d) as Box<dyn DiskSource>)
        });
        assert!(opened > 50, "only {opened} damaged copies opened");
    }
}
