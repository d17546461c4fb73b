//! Test helpers shared by the format tests: a deterministic sample disk image, a `qemu-img` runner
//! that fails loudly when the tool is missing, and one read check every format must pass.
//!
//! Must not: be compiled outside `cfg(test)`, or skip a test silently. Nothing here writes outside
//! the temporary directories the tests hand it.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{DiskError, DiskSource};

/// The sample disk size: 5 MiB + 4096 + 512, a whole number of sectors but not of 4 KiB, 64 KiB
/// or 2 MiB clusters, so every format has a partial last cluster or grain.
pub const SAMPLE_SIZE: usize = 5 * 1024 * 1024 + 4096 + 512;

const MIB: usize = 1024 * 1024;

/// A deterministic xorshift64* generator: random-looking bytes that do not compress.
struct Rng(u64);

impl Rng {
    fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Fills `out` with compressible but not trivial text.
fn fill_pattern(out: &mut [u8], seed: usize) {
    let mut line = 0usize;
    let mut pos = 0;
    while pos < out.len() {
        let text = format!("livemount block {:08} seed {seed}\n", line);
        let n = text.len().min(out.len() - pos);
        out[pos..pos + n].copy_from_slice(&text.as_bytes()[..n]);
        pos += n;
        line += 1;
    }
}

/// The sample guest image: random, repeated text and zero regions, with compressible text in
/// the partial last cluster.
pub fn sample_image() -> Vec<u8> {
    let mut img = vec![0u8; SAMPLE_SIZE];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    rng.fill(&mut img[..MIB]);
    fill_pattern(&mut img[MIB..2 * MIB], 1);
    // [2 MiB, 3 MiB) stays zero.
    rng.fill(&mut img[3 * MIB..3 * MIB + 300_000]);
    // Zeros up to 4 MiB + 64 KiB.
    rng.fill(&mut img[4 * MIB + 65536..5 * MIB]);
    fill_pattern(&mut img[5 * MIB..], 2);
    img
}

/// Writes `data` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// Runs `qemu-img` with `args`, panicking (failing the test) when it is missing or fails.
pub fn qemu_img(args: &[&str]) {
    let out = match Command::new("qemu-img").args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "qemu-img is not installed: install qemu-utils (apt-get install qemu-utils) to run the \
             disk format tests"
        ),
        Err(e) => panic!("cannot run qemu-img: {e}"),
    };
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Converts the raw file `src` to `dst` with extra `qemu-img convert` options.
pub fn convert(src: &Path, dst: &Path, opts: &[&str]) {
    let mut args = vec!["convert", "-f", "raw"];
    args.extend_from_slice(opts);
    args.push(src.to_str().unwrap());
    args.push(dst.to_str().unwrap());
    qemu_img(&args);
}

fn read(disk: &dyn DiskSource, offset: usize, len: usize) -> Vec<u8> {
    let mut buf = vec![0xa5u8; len];
    disk.read_exact_at(&mut buf, offset as u64)
        .unwrap_or_else(|e| panic!("read of {len} at {offset}: {e}"));
    buf
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: bytes differ (lengths {} and {}, first difference at {first:?})",
            got.len(),
            want.len()
        );
    }
}

/// Reads `disk` in many chunkings and checks every byte against `want`: whole, 1 MiB blocks,
/// odd-sized sequential reads, reads straddling every multiple of each of `granules` (cluster,
/// grain or extent sizes), reads from several threads at once, and reads past the end.
pub fn assert_reads_match(disk: &dyn DiskSource, want: &[u8], granules: &[usize]) {
    assert_eq!(disk.size(), want.len() as u64, "disk size");
    assert_same(&read(disk, 0, want.len()), want, "whole-disk read");
    for (i, block) in want.chunks(MIB).enumerate() {
        assert_same(&read(disk, i * MIB, block.len()), block, "1 MiB block");
    }
    let mut pos = 0;
    for step in [4093usize, 65537, 1000, 131_071, 7].iter().cycle() {
        if pos >= want.len() {
            break;
        }
        let n = (*step).min(want.len() - pos);
        assert_same(&read(disk, pos, n), &want[pos..pos + n], "odd read");
        pos += n;
    }
    for &g in granules.iter().chain(&[512, MIB]) {
        // At most about 200 edges per granule keeps the test quick for small granules.
        let stride = g * (want.len() / g / 200).max(1);
        let mut edge = g;
        while edge < want.len() {
            for (back, len) in [(1, 2), (700, 1500), (g.min(3000), g.min(3000) * 2 + 1)] {
                let start = edge - back.min(edge);
                let end = (start + len).min(want.len());
                assert_same(
                    &read(disk, start, end - start),
                    &want[start..end],
                    "edge read",
                );
            }
            edge += stride;
        }
    }
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for (i, block) in want.chunks(MIB / 2).enumerate().skip(t).step_by(4) {
                    let got = read(disk, i * MIB / 2, block.len());
                    assert_same(&got, block, "threaded read");
                }
            });
        }
    });
    assert_same(
        &read(disk, want.len() - 1, 1),
        &want[want.len() - 1..],
        "last byte",
    );
    assert!(read(disk, want.len(), 0).is_empty());
    let mut buf = [0u8; 2];
    assert!(disk.read_exact_at(&mut buf, want.len() as u64 - 1).is_err());
    assert!(disk.read_exact_at(&mut buf, u64::MAX - 10).is_err());
    let mut big = vec![0u8; 16];
    assert!(disk.read_exact_at(&mut big, u64::MAX).is_err());
}

/// Unwraps the error of `r`, failing the test when it succeeded.
pub fn err<T: std::fmt::Debug>(r: Result<T, DiskError>) -> DiskError {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e,
    }
}

/// Asserts `e` is `Corrupt`, names `path` and mentions `needle`.
pub fn assert_corrupt(e: &DiskError, path: &Path, needle: &str) {
    match e {
        DiskError::Corrupt { path: p, what } => {
            assert_eq!(p, path, "error names the wrong file: {e}");
            assert!(what.contains(needle), "`{e}` does not mention `{needle}`");
        }
        other => panic!("expected Corrupt mentioning `{needle}`, got {other:?}"),
    }
}

/// Asserts `e` is `Unsupported`, names `path` and mentions `needle`.
pub fn assert_unsupported(e: &DiskError, path: &Path, needle: &str) {
    match e {
        DiskError::Unsupported { path: p, what } => {
            assert_eq!(p, path, "error names the wrong file: {e}");
            assert!(what.contains(needle), "`{e}` does not mention `{needle}`");
        }
        other => panic!("expected Unsupported mentioning `{needle}`, got {other:?}"),
    }
}

/// Overwrites a few bytes (or 8-byte fields with extreme values) inside `ranges` of `image`,
/// `count` times, and opens and reads each damaged copy with `open`. Errors are expected; a panic
/// (or a hang) fails the test. Returns how many damaged copies still opened.
pub fn assert_damage_never_panics(
    dir: &Path,
    image: &[u8],
    ranges: &[std::ops::Range<usize>],
    count: usize,
    open: impl Fn(&Path) -> Result<Box<dyn DiskSource>, DiskError>,
) -> usize {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut next = |n: usize| {
        let mut b = [0u8; 8];
        rng.fill(&mut b);
        (u64::from_le_bytes(b) % n.max(1) as u64) as usize
    };
    let path = dir.join("damaged.img");
    let mut opened = 0;
    for _ in 0..count {
        let mut bytes = image.to_vec();
        for _ in 0..1 + next(4) {
            let r = &ranges[next(ranges.len())];
            let at = r.start + next(r.len());
            let field: [u8; 8] = match next(5) {
                0 => [0xff; 8],
                1 => [0; 8],
                2 => (1u64 << next(64)).to_be_bytes(),
                3 => (1u64 << next(64)).to_le_bytes(),
                _ => [next(256) as u8; 8],
            };
            let n = if next(2) == 0 { 1 } else { 8 };
            let end = (at + n).min(bytes.len());
            bytes[at..end].copy_from_slice(&field[..end - at]);
        }
        std::fs::write(&path, &bytes).unwrap();
        let Ok(disk) = open(&path) else { continue };
        opened += 1;
        let size = disk.size();
        let mut buf = vec![0u8; MIB];
        let mut pos = 0u64;
        while pos < size.min(8 * MIB as u64) {
            let n = (size - pos).min(MIB as u64) as usize;
            let _ = disk.read_exact_at(&mut buf[..n], pos);
            pos += n as u64;
        }
        let _ = disk.read_exact_at(&mut buf[..4096], size.saturating_sub(4000));
        let _ = disk.read_exact_at(&mut buf[..16], u64::MAX - 10);
        let _ = disk.is_unallocated(0, size);
        let _ = disk.is_unallocated(size / 2, 1 << 20);
    }
    opened
}
