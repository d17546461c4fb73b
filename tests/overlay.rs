//! Reads through a disk's overlay and the read cache equal a reference image, for random write
//! histories, offsets and lengths; committed writes survive reopening the overlay.

mod common;

use std::sync::Arc;

use common::*;
use livemount::cache::ChunkCache;
use livemount::mount::overlay::Overlay;
use livemount::repo::{BackupOptions, ChunkReader, ChunkSize, DiskImage, NoProgress, Repository};
use proptest::prelude::*;

/// A backed-up disk (64 KiB chunks, size not a multiple of 4 KiB) read through a cache.
fn disk(dir: &std::path::Path) -> (tokio::runtime::Runtime, DiskImage, Vec<u8>) {
    let (rt, image, data, _) = disk_and_cache(dir);
    (rt, image, data)
}

/// The same, with the cache the disk reads through.
fn disk_and_cache(
    dir: &std::path::Path,
) -> (tokio::runtime::Runtime, DiskImage, Vec<u8>, Arc<ChunkCache>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data = mixed_disk(3 * MIB + 1000, 31);
    write(&dir.join("d.img"), &data);
    let cfg = kvm_config(dir, "ov", &[("d.img", "raw")]);
    let repo = Repository::init(&dir.join("repo"), ChunkSize::new(65536).unwrap()).unwrap();
    let cache = Arc::new(ChunkCache::new(Arc::new(repo.clone()), 8 << 20));
    let reader: Arc<dyn ChunkReader> = cache.clone();
    let image = rt.block_on(async {
        let opts = BackupOptions::from_config_file(&cfg, &[]).unwrap();
        let s = repo.backup(&opts, &NoProgress).await.unwrap();
        repo.snapshot(&s.snapshot)
            .await
            .unwrap()
            .disk(0)
            .await
            .unwrap()
            .with_reader(reader)
    });
    (rt, image, data, cache)
}

fn op() -> impl Strategy<Value = (u64, usize, u8, bool)> {
    (
        0u64..3 * MIB + 1000,
        1usize..70_000,
        any::<u8>(),
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn overlay_reads_equal_the_model_after_random_writes(ops in proptest::collection::vec(op(), 1..25), reads in proptest::collection::vec((0u64..3 * MIB + 2000, 0usize..200_000), 1..20)) {
        let t = tempfile::tempdir().unwrap();
        let (rt, image, mut model) = disk(t.path());
        let size = model.len() as u64;
        let ov_dir = t.path().join("ov");
        let overlay = Overlay::open(&ov_dir, "disk0", size).unwrap();
        rt.block_on(async {
            for (off, len, byte, sync) in &ops {
                let len = (*len as u64).min(size - off) as usize;
                let data = vec![*byte; len];
                overlay.write(&image, *off, &data, *sync).await.unwrap();
                model[*off as usize..*off as usize + len].copy_from_slice(&data);
            }
            for (off, len) in &reads {
                let got = overlay.read(&image, *off, *len).await.unwrap();
                let s = (*off).min(size) as usize;
                let e = off.saturating_add(*len as u64).min(size) as usize;
                prop_assert!(got[..] == model[s..e.max(s)], "read({off}, {len})");
            }
            overlay.commit().await.unwrap();
            Ok(())
        })?;
        // Committed writes survive reopening.
        drop(overlay);
        let again = Overlay::open(&ov_dir, "disk0", size).unwrap();
        let all = rt.block_on(again.read(&image, 0, size as usize)).unwrap();
        prop_assert!(all[..] == model[..]);
    }
}

#[test]
fn writes_past_the_end_are_refused_and_change_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (rt, image, model) = disk(t.path());
    let size = model.len() as u64;
    let overlay = Overlay::open(&t.path().join("ov"), "disk0", size).unwrap();
    rt.block_on(async {
        let e = overlay
            .write(&image, size - 10, &[1; 11], true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("passes the end"), "{e}");
        assert!(overlay
            .write(&image, u64::MAX - 3, &[1; 8], true)
            .await
            .is_err());
        assert_eq!(overlay.written_blocks(), 0);
        let all = overlay.read(&image, 0, size as usize).await.unwrap();
        assert!(all[..] == model[..]);
    });
}

#[test]
fn sequential_reads_warm_the_chunks_ahead_and_random_ones_do_not() {
    use livemount::metrics::Metrics;
    use livemount::mount::readahead::ReadAhead;
    use livemount::mount::reader::MountReader;
    let t = tempfile::tempdir().unwrap();
    let (rt, image, _data, cache) = disk_and_cache(t.path());
    let cs = 65536u64;
    let ahead_cached = |from: u64, to: u64| {
        (from..to)
            .filter(|b| image.chunk_of_block(*b).is_some_and(|c| cache.contains(&c)))
            .count()
    };
    rt.block_on(async {
        // Random reads: nothing is fetched beyond them.
        let reader = Arc::new(MountReader::new(
            cache.clone(),
            Arc::new(Metrics::new()),
            "t",
            None,
        ));
        let ra = ReadAhead::new(reader.clone());
        for off in [5 * cs, 20 * cs, 2 * cs, 30 * cs] {
            ra.on_read(&image, off, 4096);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(cache.stats().misses, 0, "random reads prefetch nothing");
        // Four sequential 64 KiB reads from block 0: blocks ahead of them arrive in the cache.
        let ra = ReadAhead::new(reader);
        for i in 0..4 {
            ra.on_read(&image, i * cs, cs);
        }
    });
    let nonzero_ahead = (4..8)
        .filter(|b| image.chunk_of_block(*b).is_some())
        .count();
    assert!(nonzero_ahead > 0, "the fixture has data ahead");
    let t0 = std::time::Instant::now();
    while ahead_cached(4, 8) < nonzero_ahead && t0.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        ahead_cached(4, 8),
        nonzero_ahead,
        "every non-zero block of the window is cached"
    );
}

/// Reopening on the same boot (a killed process) keeps every write, committed or not; after a
/// reboot (the live bitmap's boot id differs) only committed writes count, and the durable
/// bitmap never names data that was not synced. The first COMMIT after reopening syncs.
#[test]
fn uncommitted_writes_survive_a_killed_process_and_only_committed_ones_a_reboot() {
    let t = tempfile::tempdir().unwrap();
    let (rt, image, model) = disk(t.path());
    let size = model.len() as u64;
    let ov_dir = t.path().join("ov");
    let overlay = Overlay::open(&ov_dir, "disk0", size).unwrap();
    rt.block_on(async {
        overlay.write(&image, 0, &[1; 4096], false).await.unwrap();
        overlay.commit().await.unwrap();
        overlay.write(&image, 8192, &[2; 100], false).await.unwrap();
    });
    drop(overlay); // as if killed: no commit
    let again = Overlay::open(&ov_dir, "disk0", size).unwrap();
    let mut want = model.clone();
    want[..4096].fill(1);
    want[8192..8292].fill(2);
    let all = rt.block_on(again.read(&image, 0, size as usize)).unwrap();
    assert!(all[..] == want[..], "same boot: both writes are there");
    assert_eq!(again.written_blocks(), 2);
    drop(again);

    // A reboot: the live bitmap carries another boot id.
    let live = ov_dir.join("disk0.live");
    let mut bytes = std::fs::read(&live).unwrap();
    bytes[..8].copy_from_slice(b"another-");
    std::fs::write(&live, bytes).unwrap();
    let rebooted = Overlay::open(&ov_dir, "disk0", size).unwrap();
    let mut want = model.clone();
    want[..4096].fill(1);
    let all = rt
        .block_on(rebooted.read(&image, 0, size as usize))
        .unwrap();
    assert!(
        all[..] == want[..],
        "after a reboot: only the committed write"
    );
    assert_eq!(rebooted.written_blocks(), 1);
}
