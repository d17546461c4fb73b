//! Raw disks: a plain file or block device whose bytes are the guest's bytes, byte for byte.
//!
//! Owns: [`RawDisk`], positional reads of the file and the bounds check of each read.
//! Must not: interpret the contents (a raw disk holding a qcow2 image is still read as raw), keep
//! a file cursor or lock on the read path, or claim a range is unallocated (without `lseek`'s
//! `SEEK_DATA`, which `std` does not expose, it cannot know; the trait's `false` stands).

use std::fs::File;
use std::path::{Path, PathBuf};

use super::{check_read, open_file, pread, DiskError, DiskSource};

/// A raw disk image: the guest sees the file's bytes as they are; its size is the file's size.
#[derive(Debug)]
pub struct RawDisk {
    path: PathBuf,
    file: File,
    size: u64,
}

impl RawDisk {
    /// Opens a raw disk file (or block device) read-only.
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let (file, size) = open_file(path)?;
        Ok(RawDisk {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    /// The file this disk reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl DiskSource for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_read(&self.path, offset, buf.len(), self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        pread(&self.file, &self.path, buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{assert_reads_match, err, sample_image, write_file, SAMPLE_SIZE};
    use super::super::{detect, open, DiskFormat};
    use super::*;

    #[test]
    fn reads_match_source_in_every_chunking() {
        let dir = tempfile::tempdir().unwrap();
        let want = sample_image();
        let path = write_file(dir.path(), "disk.img", &want);
        let disk = RawDisk::open(&path).unwrap();
        assert_eq!(disk.path(), path);
        assert_reads_match(&disk, &want, &[4096, 65536]);
        let boxed = open(&path, None).unwrap();
        assert_eq!(boxed.size(), SAMPLE_SIZE as u64);
        assert!(!boxed.is_unallocated(2 * 1024 * 1024, 4096));
    }

    #[test]
    fn detect_says_raw_for_plain_data_and_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        let data = write_file(dir.path(), "disk.img", &sample_image());
        assert_eq!(detect(&data).unwrap(), DiskFormat::Raw);
        let empty = write_file(dir.path(), "empty.img", b"");
        assert_eq!(detect(&empty).unwrap(), DiskFormat::Raw);
        // Text that is not a descriptor, and binary data that happens to contain createType=.
        let text = write_file(dir.path(), "notes.txt", b"hello\nworld\n");
        assert_eq!(detect(&text).unwrap(), DiskFormat::Raw);
        let mut bin = vec![0u8; 2048];
        bin[100..111].copy_from_slice(b"createType=");
        bin[5] = 0x01;
        let bin = write_file(dir.path(), "bin.img", &bin);
        assert_eq!(detect(&bin).unwrap(), DiskFormat::Raw);
        // Magic bytes beyond the first position do not count.
        let late = write_file(dir.path(), "late.img", b"\0QFI\xfbKDMV");
        assert_eq!(detect(&late).unwrap(), DiskFormat::Raw);
    }

    #[test]
    fn empty_disk_has_size_zero_and_rejects_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "empty.img", b"");
        let disk = open(&path, None).unwrap();
        assert_eq!(disk.size(), 0);
        disk.read_exact_at(&mut [], 0).unwrap();
        let e = err(disk.read_exact_at(&mut [0u8; 1], 0));
        assert!(e.to_string().contains("empty.img"), "{e}");
    }

    #[test]
    fn reads_past_the_end_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), "small.img", &[7u8; 4096]);
        let disk = RawDisk::open(&path).unwrap();
        let mut buf = [0u8; 16];
        for offset in [4090, 4096, u64::MAX - 10, u64::MAX] {
            let e = err(disk.read_exact_at(&mut buf, offset));
            match &e {
                DiskError::Io { path: p, source } => {
                    assert_eq!(p, &path);
                    assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput);
                }
                other => panic!("expected an InvalidInput Io error, got {other:?}"),
            }
            assert!(e.to_string().contains("small.img"), "{e}");
        }
        disk.read_exact_at(&mut buf, 4080).unwrap();
        assert_eq!(buf, [7u8; 16]);
    }

    #[test]
    fn missing_file_and_directory_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        match err(RawDisk::open(&missing)) {
            DiskError::Io { path, source } => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert!(matches!(err(detect(&missing)), DiskError::Io { .. }));
        match err(RawDisk::open(dir.path())) {
            DiskError::Unsupported { path, what } => {
                assert_eq!(path, dir.path());
                assert!(what.contains("directory"), "{what}");
            }
            other => panic!("expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn forced_raw_format_reads_a_qcow2_file_as_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = b"QFI\xfb".to_vec();
        data.resize(1000, 3);
        let path = write_file(dir.path(), "looks.qcow2", &data);
        let disk = open(&path, Some(DiskFormat::Raw)).unwrap();
        let mut buf = vec![0u8; 1000];
        disk.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, data);
    }
}
