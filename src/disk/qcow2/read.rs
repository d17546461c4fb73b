//! The qcow2 read path: mapping guest clusters through the L1 and L2 tables, and decompressing
//! compressed clusters (raw deflate, or a zstd frame).
//!
//! Owns: the lookup of L2 entries (one positional read per L2 table a read touches), their
//! classification and checks (alignment, within the file), coalescing of contiguous data
//! clusters into one read, and per-cluster decompression with its output-length check.
//! Must not: parse the header (that is `qcow2.rs`), cache L2 tables or clusters behind a lock,
//! or read past a file's end without saying which entry pointed there.

use super::super::{corrupt, pread, DiskError, ReadRuns};
use super::{be_u64, Compression, Qcow2Disk, L2_COMPRESSED, L2_ZERO, OFFSET_MASK};

/// What a guest cluster maps to.
enum Cluster {
    /// Unallocated or an explicit zero cluster: reads as zeros.
    Zero,
    /// An uncompressed cluster starting at this host offset.
    Data(u64),
    /// Compressed data: host offset and stored length (rounded up to sectors).
    Compressed { offset: u64, len: u64 },
}

/// Inflates raw deflate data into `out`; returns the bytes produced.
fn inflate(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    let mut d = flate2::Decompress::new(false);
    d.decompress(input, out, flate2::FlushDecompress::Finish)
        .map_err(|e| format!("deflate error: {e}"))?;
    // total_out ≤ out.len(), a usize.
    Ok(d.total_out() as usize)
}

/// Decodes one zstd frame into `out`, ignoring bytes after the frame (the stored length is
/// rounded up to a sector); returns the bytes produced.
fn unzstd(input: &[u8], out: &mut [u8]) -> Result<usize, String> {
    use zstd::stream::raw::{DParameter, Decoder, Operation};
    let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    // A frame header chooses the window the decoder allocates; clusters are at most 2 MiB, so
    // refuse windows over 8 MiB instead of allocating zstd's default limit of 128 MiB.
    d.set_parameter(DParameter::WindowLogMax(23))
        .map_err(|e| format!("zstd: {e}"))?;
    let (mut read, mut written) = (0, 0);
    loop {
        let status = d
            .run_on_buffers(&input[read..], &mut out[written..])
            .map_err(|e| format!("zstd error: {e}"))?;
        read += status.bytes_read;
        written += status.bytes_written;
        let stalled = status.bytes_read == 0 && status.bytes_written == 0;
        if status.remaining == 0 || written == out.len() || stalled {
            return Ok(written);
        }
    }
}

impl Qcow2Disk {
    /// Classifies the L2 entry of the guest cluster starting at `guest`.
    fn classify(&self, entry: u64, guest: u64) -> Result<Cluster, DiskError> {
        if entry & L2_COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let offset = entry & ((1u64 << x) - 1);
            let sectors = ((entry >> x) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
            // sectors ≤ 2^13 and offset % 512 < 512, so this neither overflows nor underflows.
            let len = sectors * 512 - (offset % 512);
            return Ok(Cluster::Compressed { offset, len });
        }
        let host = entry & OFFSET_MASK;
        if entry & L2_ZERO != 0 || host == 0 {
            return Ok(Cluster::Zero);
        }
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(corrupt(
                &self.path,
                format!(
                    "L2 entry for guest offset {guest}: host offset {host} is not cluster aligned"
                ),
            ));
        }
        Ok(Cluster::Data(host))
    }

    /// Calls `each(pos, len, cluster_start, cluster)` for consecutive pieces covering
    /// `[offset, end)`, reading each L2 table's entries for the range in one positional read.
    /// Stops early (returning `Ok(false)`) when `each` returns `Ok(false)`.
    fn walk(
        &self,
        offset: u64,
        end: u64,
        mut each: impl FnMut(u64, u64, u64, Cluster) -> Result<bool, DiskError>,
    ) -> Result<bool, DiskError> {
        let cb = self.cluster_bits;
        let span_bits = 2 * cb - 3;
        let mut pos = offset;
        while pos < end {
            let l1_index = pos >> span_bits;
            let table_start = l1_index << span_bits;
            let span_end = end.min(table_start + (1u64 << span_bits));
            // pos < size, so l1_index < l1.len() (checked at open); `get` keeps it panic-free.
            let l2 = usize::try_from(l1_index)
                .ok()
                .and_then(|i| self.l1.get(i))
                .ok_or_else(|| corrupt(&self.path, "L1 table too short for the disk size"))?
                & OFFSET_MASK;
            if l2 == 0 {
                if !each(pos, span_end - pos, pos, Cluster::Zero)? {
                    return Ok(false);
                }
                pos = span_end;
                continue;
            }
            let first = (pos - table_start) >> cb;
            let last = (span_end - 1 - table_start) >> cb;
            // At most one cluster (≤ 2 MiB) of entries, inside the L2 table checked at open.
            let mut raw = vec![0u8; ((last - first + 1) * 8) as usize];
            pread(&self.file, &self.path, &mut raw, l2 + first * 8)?;
            for (i, entry) in raw.chunks_exact(8).enumerate() {
                let cluster_start = table_start + ((first + i as u64) << cb);
                let piece_end = span_end.min(cluster_start + self.cluster_size());
                let cluster = self.classify(be_u64(entry, 0), cluster_start)?;
                if !each(pos, piece_end - pos, cluster_start, cluster)? {
                    return Ok(false);
                }
                pos = piece_end;
            }
        }
        Ok(true)
    }

    /// Reads and decompresses the compressed cluster for guest offset `guest` (a cluster start).
    fn decompress(&self, guest: u64, offset: u64, len: u64) -> Result<Vec<u8>, DiskError> {
        let bad = |what: String| {
            corrupt(
                &self.path,
                format!(
                    "compressed cluster for guest offset {guest} at host offset {offset}: {what}"
                ),
            )
        };
        if offset >= self.file_len {
            return Err(bad(format!(
                "past the end of the {}-byte file",
                self.file_len
            )));
        }
        // The data may end inside its last sector at the end of the file. len ≤ 2^22.
        let mut input = vec![0u8; len.min(self.file_len - offset) as usize];
        pread(&self.file, &self.path, &mut input, offset)?;
        // cluster_size ≤ 2 MiB.
        let mut out = vec![0u8; self.cluster_size() as usize];
        let produced = match self.compression {
            Compression::Deflate => inflate(&input, &mut out),
            Compression::Zstd => unzstd(&input, &mut out),
        }
        .map_err(bad)?;
        // Only the last cluster of a disk may be partial; its tail need not decompress.
        let visible = self.cluster_size().min(self.size - guest);
        if (produced as u64) < visible {
            return Err(bad(format!(
                "decompresses to {produced} bytes, the cluster needs {visible}"
            )));
        }
        Ok(out)
    }

    /// Fills `buf` with the guest bytes of `[offset, end)`, already checked to lie within the
    /// disk: zeros for unallocated and zero clusters, one positional read per run of contiguous
    /// data clusters, and one decompression per compressed cluster.
    pub(super) fn read_range(
        &self,
        buf: &mut [u8],
        offset: u64,
        end: u64,
    ) -> Result<(), DiskError> {
        let mut runs = ReadRuns::new(&self.file, &self.path, self.file_len, "an L2 entry");
        self.walk(offset, end, |pos, len, cluster_start, cluster| {
            // Both lie within buf, whose length is a usize.
            let (from, n) = ((pos - offset) as usize, len as usize);
            let within = pos - cluster_start;
            match cluster {
                Cluster::Zero => {
                    runs.flush(buf)?;
                    buf[from..from + n].fill(0);
                }
                Cluster::Compressed { offset: at, len } => {
                    runs.flush(buf)?;
                    let data = self.decompress(cluster_start, at, len)?;
                    // within + n ≤ cluster size = data.len().
                    buf[from..from + n]
                        .copy_from_slice(&data[within as usize..within as usize + n]);
                }
                Cluster::Data(host) => runs.add(buf, host + within, from, n)?,
            }
            Ok(true)
        })?;
        runs.flush(buf)
    }

    /// True when every cluster of `[offset, end)` (within the disk) is unallocated or zero; an
    /// unreadable L2 table counts as "unknown", so false.
    pub(super) fn range_unallocated(&self, offset: u64, end: u64) -> bool {
        self.walk(offset, end, |_, _, _, c| Ok(matches!(c, Cluster::Zero)))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::testutil::{
        assert_corrupt, assert_reads_match, err, sample_image, write_file,
    };
    use super::super::super::{detect, open, DiskFormat, DiskSource};
    use super::super::tests::{l2_entry_at, make, patched, MIB};
    use super::*;

    #[test]
    fn qemu_variants_read_like_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let want = sample_image();
        let variants: [(&str, &[&str], u64); 9] = [
            ("v2", &["-o", "compat=0.10"], 65536),
            ("v3", &["-o", "compat=1.1"], 65536),
            ("deflate", &["-c"], 65536),
            (
                "v2-deflate-4k",
                &["-c", "-o", "compat=0.10,cluster_size=4096"],
                4096,
            ),
            ("zstd", &["-c", "-o", "compression_type=zstd"], 65536),
            (
                "zstd-2m",
                &["-c", "-o", "compression_type=zstd,cluster_size=2M"],
                2 * MIB,
            ),
            ("4k", &["-o", "cluster_size=4096"], 4096),
            ("2m", &["-o", "cluster_size=2M"], 2 * MIB),
            ("512", &["-o", "cluster_size=512"], 512),
        ];
        for (name, opts, cluster) in variants {
            let (path, bytes) = make(dir.path(), &format!("{name}.qcow2"), opts);
            assert_eq!(detect(&path).unwrap(), DiskFormat::Qcow2, "{name}");
            let disk = Qcow2Disk::open(&path).unwrap();
            assert_eq!(disk.cluster_size(), cluster, "{name}");
            assert_eq!(disk.path(), path);
            if opts.contains(&"-c") {
                // Compression really happened: the cluster holding the text at 1 MiB is compressed.
                let entry = be_u64(&bytes, l2_entry_at(&bytes, (MIB / cluster) as usize));
                assert_ne!(
                    entry & L2_COMPRESSED,
                    0,
                    "{name}: text cluster not compressed"
                );
            }
            assert_reads_match(
                &disk,
                &want,
                &[cluster as usize, (cluster * cluster / 8) as usize],
            );
            if cluster <= MIB {
                assert!(disk.is_unallocated(2 * MIB, MIB), "{name}");
            }
            assert!(!disk.is_unallocated(2 * MIB - 512, MIB), "{name}");
            assert!(
                !disk.is_unallocated(MIB, 4096),
                "{name}: compressed or data cluster"
            );
            assert!(!disk.is_unallocated(u64::MAX - 10, 20));
            let boxed = open(&path, None).unwrap();
            assert_eq!(boxed.size(), want.len() as u64);
        }
    }

    #[test]
    fn zero_flag_and_dirty_bit() {
        let dir = tempfile::tempdir().unwrap();
        let (_, bytes) = make(dir.path(), "v3.qcow2", &["-o", "compat=1.1"]);
        let at = l2_entry_at(&bytes, 1);
        let entry = be_u64(&bytes, at) | L2_ZERO;
        let path = patched(dir.path(), "zero.qcow2", &bytes, at, &entry.to_be_bytes());
        let disk = Qcow2Disk::open(&path).unwrap();
        let mut buf = vec![1u8; 3 * 65536];
        disk.read_exact_at(&mut buf, 0).unwrap();
        let want = sample_image();
        assert_eq!(buf[..65536], want[..65536]);
        assert!(buf[65536..131072].iter().all(|&b| b == 0));
        assert_eq!(buf[131072..], want[131072..3 * 65536]);
        assert!(disk.is_unallocated(65536, 65536));
        assert!(!disk.is_unallocated(65535, 2));
        // A dirty (lazy refcounts) image is still readable.
        let dirty = patched(dir.path(), "dirty.qcow2", &bytes, 79, &[1]);
        let disk = Qcow2Disk::open(&dirty).unwrap();
        disk.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, want[..3 * 65536]);
    }

    #[test]
    fn bad_l2_entries_fail_reads_not_opens() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (_, bytes) = make(d, "v3.qcow2", &["-o", "compat=1.1"]);
        let at = l2_entry_at(&bytes, 0);
        let past = (bytes.len() as u64 * 4).next_multiple_of(65536) | 1 << 63;
        let path = patched(d, "past.qcow2", &bytes, at, &past.to_be_bytes());
        let disk = Qcow2Disk::open(&path).unwrap();
        let mut buf = vec![0u8; 8192];
        assert_corrupt(
            &err(disk.read_exact_at(&mut buf, 4000)),
            &path,
            "past the end",
        );
        assert!(!disk.is_unallocated(0, 4096));
        disk.read_exact_at(&mut buf, 65536).unwrap();
        assert_eq!(buf, sample_image()[65536..65536 + 8192]);
        let odd = be_u64(&bytes, at) + 512;
        let path = patched(d, "odd.qcow2", &bytes, at, &odd.to_be_bytes());
        let disk = Qcow2Disk::open(&path).unwrap();
        assert_corrupt(
            &err(disk.read_exact_at(&mut buf, 0)),
            &path,
            "not cluster aligned",
        );
    }

    #[test]
    fn bad_compressed_clusters_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (name, opts) in [
            ("deflate", "compression_type=zlib"),
            ("zstd", "compression_type=zstd"),
        ] {
            let (_, bytes) = make(d, &format!("{name}.qcow2"), &["-c", "-o", opts]);
            // Guest cluster 16 (1 MiB) holds text, so it is compressed.
            let at = l2_entry_at(&bytes, 16);
            let entry = be_u64(&bytes, at);
            assert_ne!(
                entry & L2_COMPRESSED,
                0,
                "{name}: cluster 16 is not compressed"
            );
            let host = (entry & ((1 << 54) - 1)) as usize;
            let mut garbage = bytes.clone();
            garbage[host..host + 64].fill(0xff);
            let path = write_file(d, &format!("{name}-garbage.qcow2"), &garbage);
            let disk = Qcow2Disk::open(&path).unwrap();
            let mut buf = vec![0u8; 100];
            assert_corrupt(
                &err(disk.read_exact_at(&mut buf, MIB)),
                &path,
                "compressed cluster",
            );
            let past = (entry & !((1 << 54) - 1)) | (bytes.len() as u64 + 4096);
            let path = patched(
                d,
                &format!("{name}-past.qcow2"),
                &bytes,
                at,
                &past.to_be_bytes(),
            );
            let disk = Qcow2Disk::open(&path).unwrap();
            assert_corrupt(
                &err(disk.read_exact_at(&mut buf, MIB)),
                &path,
                "past the end",
            );
            // Pointing at the zero padding before the L1 table: too little output.
            let short = (entry & !((1 << 54) - 1)) | 0x1000;
            let path = patched(
                d,
                &format!("{name}-short.qcow2"),
                &bytes,
                at,
                &short.to_be_bytes(),
            );
            let disk = Qcow2Disk::open(&path).unwrap();
            assert!(matches!(
                err(disk.read_exact_at(&mut buf, MIB)),
                DiskError::Corrupt { .. }
            ));
        }
    }
}
