//! qcow2 disks (versions 2 and 3): the header, its checks, and the active L1 table.
//!
//! Owns: [`Qcow2Disk`] and its opening: the header is validated (magic, version, cluster_bits,
//! features, compression type, L1 table within the file and every L1 entry cluster aligned
//! within it) and the active L1 table is loaded. The read path, L2 lookups and compressed
//! clusters (deflate and zstd), lives in `qcow2/read.rs`.
//! Must not: write to the image, follow a backing file, read snapshots (only the active L1 is
//! used), or hold a lock on the read path. Backing files, encryption, external data files,
//! extended L2 entries and unknown incompatible features are refused as `Unsupported`.

use std::fs::File;
use std::path::{Path, PathBuf};

mod read;

use super::{check_read, corrupt, open_file, pread, unsupported, DiskError, DiskSource};

/// Bytes of the version 2 header (version 3 headers are at least 104).
const V2_HEADER_LEN: u64 = 72;
const V3_HEADER_LEN: u64 = 104;
/// Header bytes read at open: the v3 header plus the compression type byte, rounded up.
const HEADER_READ: u64 = 112;
/// Largest active L1 table loaded (qemu's limit: 32 MiB of entries).
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// Host offset bits of L1 and standard L2 entries (bits 9..=55).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// Incompatible feature bits this module knows (dirty, corrupt, data file, compression, ext L2).
const INCOMPAT_KNOWN: u64 = 0x1f;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    /// Raw deflate (no zlib header).
    Deflate,
    /// A zstd frame.
    Zstd,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Disk {
    path: PathBuf,
    file: File,
    file_len: u64,
    size: u64,
    cluster_bits: u32,
    compression: Compression,
    /// The active L1 table, only the entries the virtual size needs.
    l1: Vec<u64>,
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

impl Qcow2Disk {
    /// Opens a qcow2 image read-only, checking its header and loading the active L1 table.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let bad = |what: String| corrupt(path, what);
        let (file, file_len) = open_file(path)?;
        if file_len < V2_HEADER_LEN {
            return Err(bad(format!(
                "truncated header: file is {file_len} bytes, a qcow2 header is at least 72"
            )));
        }
        let mut h = [0u8; HEADER_READ as usize];
        let h = &mut h[..file_len.min(HEADER_READ) as usize];
        pread(&file, path, h, 0)?;
        if &h[..4] != b"QFI\xfb" {
            return Err(bad("no qcow2 magic (QFI\\xfb) at the start".into()));
        }
        let version = be_u32(h, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(path, format!("qcow2 version {version}")));
        }
        let cluster_bits = be_u32(h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster_bits {cluster_bits} is not in 9..=21")));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut compression = Compression::Deflate;
        if version == 3 {
            if file_len < V3_HEADER_LEN {
                return Err(bad(format!(
                    "truncated header: file is {file_len} bytes, a version 3 header is at least \
                     104"
                )));
            }
            let incompat = be_u64(h, 72);
            let header_len = u64::from(be_u32(h, 100));
            if header_len < V3_HEADER_LEN || header_len > cluster_size || header_len > file_len {
                return Err(bad(format!("header_length {header_len}")));
            }
            if incompat & INCOMPAT_CORRUPT != 0 {
                return Err(bad(
                    "the image is marked corrupt (incompatible bit 1)".into()
                ));
            }
            if incompat & !INCOMPAT_KNOWN != 0 {
                return Err(unsupported(
                    path,
                    format!("unknown qcow2 incompatible features {incompat:#x}"),
                ));
            }
            if incompat & INCOMPAT_DATA_FILE != 0 {
                return Err(unsupported(path, "qcow2 with an external data file"));
            }
            if incompat & INCOMPAT_EXTENDED_L2 != 0 {
                return Err(unsupported(
                    path,
                    "qcow2 with extended L2 entries (subclusters)",
                ));
            }
            // header_len > 104 and ≤ file_len means h holds byte 104 (h is min(file, 112) long).
            let ctype = if header_len > V3_HEADER_LEN {
                h[104]
            } else {
                0
            };
            if (ctype != 0) != (incompat & INCOMPAT_COMPRESSION != 0) {
                return Err(bad(format!(
                    "compression type {ctype} disagrees with incompatible features {incompat:#x}"
                )));
            }
            compression = match ctype {
                0 => Compression::Deflate,
                1 => Compression::Zstd,
                other => return Err(unsupported(path, format!("qcow2 compression type {other}"))),
            };
        }
        let crypt = be_u32(h, 32);
        if crypt != 0 {
            return Err(unsupported(
                path,
                format!("encrypted qcow2 (crypt_method {crypt})"),
            ));
        }
        let backing_offset = be_u64(h, 8);
        if backing_offset != 0 {
            let name = Self::backing_name(&file, path, file_len, backing_offset, be_u32(h, 16));
            return Err(unsupported(
                path,
                format!(
                    "qcow2 has a backing file ({name}); back up the consolidated disk (qemu-img \
                     convert) instead"
                ),
            ));
        }
        let size = be_u64(h, 24);
        let l1_size = u64::from(be_u32(h, 36));
        let l1_offset = be_u64(h, 40);
        let span_bits = 2 * cluster_bits - 3; // bytes one L2 table maps: ≤ 2^39
        let needed = size.div_ceil(1u64 << span_bits);
        if needed > l1_size {
            return Err(bad(format!(
                "L1 table has {l1_size} entries, the {size}-byte disk needs {needed}"
            )));
        }
        if needed > MAX_L1_ENTRIES {
            return Err(bad(format!("L1 table of {needed} entries is too large")));
        }
        if !l1_offset.is_multiple_of(cluster_size)
            || l1_offset
                .checked_add(needed * 8)
                .is_none_or(|e| e > file_len)
        {
            return Err(bad(format!(
                "L1 table at offset {l1_offset} ({needed} entries) is not cluster aligned within \
                 the {file_len}-byte file"
            )));
        }
        // needed ≤ MAX_L1_ENTRIES (4 Mi), so the byte count fits a usize.
        let mut raw = vec![0u8; (needed * 8) as usize];
        pread(&file, path, &mut raw, l1_offset)?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be_u64(c, 0)).collect();
        for (i, e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 != 0 && (!l2.is_multiple_of(cluster_size) || l2 + cluster_size > file_len) {
                return Err(bad(format!(
                    "L1 entry {i} points to an L2 table at offset {l2}, not cluster aligned \
                     within the {file_len}-byte file"
                )));
            }
        }
        Ok(Qcow2Disk {
            path: path.to_path_buf(),
            file,
            file_len,
            size,
            cluster_bits,
            compression,
            l1,
        })
    }

    /// The backing file name for an error message, or a placeholder when it cannot be read.
    fn backing_name(file: &File, path: &Path, file_len: u64, offset: u64, len: u32) -> String {
        let fits = offset
            .checked_add(u64::from(len))
            .is_some_and(|e| e <= file_len);
        if len == 0 || len > 1023 || !fits {
            return "name unreadable".into();
        }
        // len ≤ 1023.
        let mut raw = vec![0u8; len as usize];
        match pread(file, path, &mut raw, offset) {
            Ok(()) => String::from_utf8_lossy(&raw).into_owned(),
            Err(_) => "name unreadable".into(),
        }
    }

    /// The file this disk reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

impl DiskSource for Qcow2Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let end = check_read(&self.path, offset, buf.len(), self.size)?;
        self.read_range(buf, offset, end)
    }

    fn is_unallocated(&self, offset: u64, len: u64) -> bool {
        match offset.checked_add(len) {
            Some(end) if end <= self.size && len > 0 => self.range_unallocated(offset, end),
            _ => false,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::testutil::{
        assert_corrupt, assert_damage_never_panics, assert_unsupported, convert, err, qemu_img,
        sample_image, write_file,
    };
    use super::super::{open, DiskFormat};
    use super::*;

    pub(super) const MIB: u64 = 1024 * 1024;

    /// Converts the sample image with `opts` into `dir/name`; returns the path and file bytes.
    pub(super) fn make(dir: &Path, name: &str, opts: &[&str]) -> (PathBuf, Vec<u8>) {
        let raw = dir.join("src.raw");
        if !raw.exists() {
            write_file(dir, "src.raw", &sample_image());
        }
        let path = dir.join(name);
        let mut args = vec!["-O", "qcow2"];
        args.extend_from_slice(opts);
        convert(&raw, &path, &args);
        let bytes = std::fs::read(&path).unwrap();
        (path, bytes)
    }

    pub(super) fn patched(
        dir: &Path,
        name: &str,
        bytes: &[u8],
        at: usize,
        patch: &[u8],
    ) -> PathBuf {
        let mut b = bytes.to_vec();
        b[at..at + patch.len()].copy_from_slice(patch);
        write_file(dir, name, &b)
    }

    /// File offset of the L2 entry for guest cluster `index` (within the first L2 table).
    pub(super) fn l2_entry_at(bytes: &[u8], index: usize) -> usize {
        let l1 = be_u64(bytes, 40) as usize;
        (be_u64(bytes, l1) & OFFSET_MASK) as usize + index * 8
    }

    #[test]
    fn backing_files_and_unsupported_features_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let base = d.join("base.qcow2");
        let top = d.join("top.qcow2");
        let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
        qemu_img(&["create", "-q", "-f", "qcow2", b, "4M"]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
        let e = err(open(&top, None));
        assert_unsupported(&e, &top, "backing file");
        assert!(e.to_string().contains("base.qcow2"), "{e}");
        let ext = d.join("ext.qcow2");
        let x = ext.to_str().unwrap();
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            x,
            "4M",
        ]);
        assert_unsupported(&err(Qcow2Disk::open(&ext)), &ext, "extended L2");

        let (_, bytes) = make(d, "v3.qcow2", &["-o", "compat=1.1"]);
        let cases: [(&str, usize, Vec<u8>, &str); 5] = [
            ("ver", 4, 4u32.to_be_bytes().to_vec(), "version 4"),
            ("crypt", 32, 1u32.to_be_bytes().to_vec(), "encrypted"),
            (
                "datafile",
                79,
                vec![INCOMPAT_DATA_FILE as u8],
                "external data file",
            ),
            ("unknown", 78, vec![1], "unknown"),
            ("ctype", 104, vec![7], "compression type 7"),
        ];
        let mut bytes = bytes;
        for (name, at, patch, needle) in &cases {
            if *name == "ctype" {
                // A compression type needs the feature bit and a header long enough for it.
                bytes[79] = INCOMPAT_COMPRESSION as u8;
                bytes[100..104].copy_from_slice(&112u32.to_be_bytes());
            }
            let path = patched(d, &format!("{name}.qcow2"), &bytes, *at, patch);
            assert_unsupported(&err(Qcow2Disk::open(&path)), &path, needle);
        }
    }

    #[test]
    fn corrupt_headers_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (_, bytes) = make(d, "v3.qcow2", &["-o", "compat=1.1"]);
        for len in [0, 50, 71, 72, 90, 103] {
            let short = write_file(d, "short.qcow2", &bytes[..len]);
            assert_corrupt(&err(Qcow2Disk::open(&short)), &short, "truncated");
        }
        let huge = (bytes.len() as u64 * 4).next_multiple_of(65536);
        let cases: [(&str, usize, Vec<u8>, &str); 9] = [
            ("magic", 0, b"QFI\0".to_vec(), "magic"),
            ("cb40", 20, 40u32.to_be_bytes().to_vec(), "cluster_bits 40"),
            ("cb8", 20, 8u32.to_be_bytes().to_vec(), "cluster_bits 8"),
            ("l1past", 40, huge.to_be_bytes().to_vec(), "L1 table"),
            ("l1odd", 40, 65537u64.to_be_bytes().to_vec(), "L1 table"),
            ("l1small", 36, 0u32.to_be_bytes().to_vec(), "L1 table"),
            ("size", 24, (1u64 << 62).to_be_bytes().to_vec(), "L1 table"),
            (
                "corrupt",
                79,
                vec![INCOMPAT_CORRUPT as u8],
                "marked corrupt",
            ),
            ("hlen", 100, 50u32.to_be_bytes().to_vec(), "header_length"),
        ];
        for (name, at, patch, needle) in &cases {
            let path = patched(d, &format!("{name}.qcow2"), &bytes, *at, patch);
            assert_corrupt(&err(Qcow2Disk::open(&path)), &path, needle);
        }
        let l1 = be_u64(&bytes, 40) as usize;
        let path = patched(d, "l1e.qcow2", &bytes, l1, &(huge | 1 << 63).to_be_bytes());
        assert_corrupt(&err(Qcow2Disk::open(&path)), &path, "L1 entry 0");
        let raw = d.join("src.raw");
        assert_corrupt(&err(open(&raw, Some(DiskFormat::Qcow2))), &raw, "magic");
    }

    #[test]
    fn damaged_images_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        for (name, opts) in [("plain", &[][..]), ("deflate", &["-c"][..])] {
            let (_, bytes) = make(dir.path(), &format!("{name}.qcow2"), opts);
            let l1 = be_u64(&bytes, 40) as usize;
            let l2 = (be_u64(&bytes, l1) & OFFSET_MASK) as usize;
            let ranges = [0..112, l1..l1 + 8, l2..l2 + 8 * 90];
            let opened = assert_damage_never_panics(dir.path(), &bytes, &ranges, 300, |p| {
                Qcow2Disk::open(p).map(|d| Box::new(d) as Box<dyn DiskSource>)
            });
            assert!(opened > 50, "{name}: only {opened} damaged copies opened");
        }
    }
}
