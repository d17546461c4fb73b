//! Repository benchmark: backup, restore and read-API throughput on a 1 GiB disk of mixed
//! content (random, repetitive and zero regions), side by side with plain-copy baselines
//! measured in the same run.
//!
//! `cargo bench --bench repo` (or `scripts/bench-repo`). Environment:
//! - `LIVEMOUNT_BENCH_DIR`: where to put the data (default: a temp dir under target/).
//! - `LIVEMOUNT_BENCH_MIB`: disk size in MiB (default 1024).
//! - `LIVEMOUNT_BENCH_CHUNK`: chunk size (default 1MiB).
//!
//! MB/s are 10^6 bytes per second of the disk's logical size. Source, repository and targets
//! share one filesystem; with this machine's RAM they sit in the page cache after the first
//! pass, so the figures are CPU and fsync bound, which is what the code controls.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use livemount::repo::{BackupOptions, ChunkSize, NoProgress, Repository};

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    // `cargo test --benches` runs this with --bench absent; only run in earnest under cargo bench.
    if !std::env::args().any(|a| a == "--bench") {
        println!("repo bench: run with `cargo bench --bench repo`");
        return Ok(());
    }
    let mib: u64 = std::env::var("LIVEMOUNT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let chunk = ChunkSize::parse(
        &std::env::var("LIVEMOUNT_BENCH_CHUNK").unwrap_or_else(|_| "1MiB".into()),
    )?;
    let base = std::env::var("LIVEMOUNT_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tmp"));
    std::fs::create_dir_all(&base)?;
    let dir = tempfile::tempdir_in(&base)?;
    let size = mib * common::MIB;

    let disk = common::mixed_disk(size, 2026);
    let zero = disk
        .chunks(chunk.as_usize())
        .filter(|c| c.iter().all(|b| *b == 0))
        .count();
    let src = dir.path().join("disk.img");
    common::write(&src, &disk);
    drop(disk);
    let cfg = common::kvm_config(dir.path(), "bench", &[("disk.img", "raw")]);
    println!(
        "disk: {mib} MiB mixed content, {:.0}% zero blocks, chunk size {chunk}",
        100.0 * zero as f64 / size.div_ceil(chunk.as_u64()) as f64
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let repo = Repository::init(&dir.path().join("repo"), chunk)?;

    // Baselines: read the source (warms the page cache), and copy it with fsync.
    let (_, read_s) = time(|| std::fs::read(&src).map(|v| v.len()));
    let (_, cp_s) = time(|| -> anyhow::Result<()> {
        std::fs::copy(&src, dir.path().join("copy.img"))?;
        std::fs::File::open(dir.path().join("copy.img"))?.sync_all()?;
        Ok(())
    });
    std::fs::remove_file(dir.path().join("copy.img"))?;

    let opts = BackupOptions::from_config_file(&cfg, &[])?;
    let first = rt.block_on(repo.backup(&opts, &NoProgress))?;
    let again = rt.block_on(repo.backup(&opts, &NoProgress))?;
    let out = dir.path().join("restored");
    let restore = rt.block_on(repo.restore(&first.snapshot, &out, &NoProgress))?;
    let (same, _) = time(|| std::fs::read(&src).ok() == std::fs::read(&restore.disks[0].path).ok());
    anyhow::ensure!(same, "restored disk differs from the source");

    // Read API: the whole disk in 1 MiB reads, 4 in flight, as a client streaming it would.
    let image = rt.block_on(async { repo.snapshot(&first.snapshot).await?.disk(0).await })?;
    let image = Arc::new(image);
    let read_api = |image: Arc<livemount::repo::DiskImage>| {
        rt.block_on(async move {
            let t = Instant::now();
            let n: Vec<usize> = futures::stream::iter((0..size).step_by(common::MIB as usize))
                .map(|off| {
                    let image = image.clone();
                    async move {
                        image
                            .read_at(off, common::MIB as usize)
                            .await
                            .map(|b| b.len())
                    }
                })
                .buffered(4)
                .try_collect()
                .await?;
            anyhow::ensure!(n.iter().sum::<usize>() as u64 == size, "short read");
            Ok::<f64, anyhow::Error>(t.elapsed().as_secs_f64())
        })
    };
    let read1 = read_api(image.clone())?;
    let read2 = read_api(image.clone())?;

    println!();
    println!("| what | seconds | MB/s | vs baseline |");
    println!("|---|---|---|---|");
    println!(
        "| baseline: read source (page cache) | {read_s:.2} | {:.0} | |",
        mbps(size, read_s)
    );
    println!(
        "| baseline: cp + fsync | {cp_s:.2} | {:.0} | 1.00 |",
        mbps(size, cp_s)
    );
    println!(
        "| backup, empty repository | {:.2} | {:.0} | {:.2}x cp |",
        first.seconds,
        first.mb_per_s,
        first.mb_per_s / mbps(size, cp_s)
    );
    println!(
        "| backup again, all chunks known | {:.2} | {:.0} | {:.2}x cp |",
        again.seconds,
        again.mb_per_s,
        again.mb_per_s / mbps(size, cp_s)
    );
    println!(
        "| restore | {:.2} | {:.0} | {:.2}x cp |",
        restore.seconds,
        restore.mb_per_s,
        restore.mb_per_s / mbps(size, cp_s)
    );
    println!(
        "| read API, 1 MiB reads, 4 in flight (run 1) | {read1:.2} | {:.0} | |",
        mbps(size, read1)
    );
    println!(
        "| read API, 1 MiB reads, 4 in flight (run 2) | {read2:.2} | {:.0} | |",
        mbps(size, read2)
    );
    println!();
    println!(
        "stored: {} new chunks, {:.0} MB before compression, {:.0} MB after; dedup ratio {:.2}",
        first.new_chunks,
        first.new_bytes as f64 / 1e6,
        first.stored_bytes as f64 / 1e6,
        first.dedup_ratio.unwrap_or(0.0)
    );
    Ok(())
}
