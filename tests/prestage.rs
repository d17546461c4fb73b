//! Pre-staging against a slow repository: the VM's reads go first.
//!
//! A real repository (made by the CLI) read through the slow-store decorator, the read cache
//! and the fetch scheduler, on a paused clock: the slow store's latency and bandwidth are
//! virtual time, so the figures are exact and the test does not depend on the machine's speed.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use livemount::cache::ChunkCache;
use livemount::fetch::FetchClass;
use livemount::prestage::Prestage;
use livemount::profile::Source;
use livemount::repo::{ChunkId, Repository, Slowness};
use tokio::time::Instant;

const LATENCY: Duration = Duration::from_millis(5);
const BANDWIDTH: u64 = 100_000_000;
const CHUNK: u64 = 256 * 1024;

/// One chunk fetch on an idle slow store: latency plus transfer (stored random data is about
/// the chunk's size).
fn one_fetch() -> Duration {
    LATENCY + Duration::from_secs_f64(CHUNK as f64 / BANDWIDTH as f64)
}

/// A repository holding one VM whose 96 MiB disk is random data (384 distinct chunks).
fn repository(dir: &std::path::Path) -> std::path::PathBuf {
    let disk = {
        let mut rng = Rng::new(5);
        let mut v = vec![0u8; (96 * MIB) as usize];
        rng.fill(&mut v);
        v
    };
    write(&dir.join("d.img"), &disk);
    let cfg = kvm_config(dir, "flood", &[("d.img", "raw")]);
    repo_with_backup_chunks(dir, &cfg, "256KiB")
}

/// Reads each chunk in turn as class `class`; the time each took.
async fn read_each(cache: &ChunkCache, ids: &[ChunkId], class: FetchClass) -> Vec<Duration> {
    let mut out = Vec::new();
    for id in ids {
        let t = Instant::now();
        cache.read_traced(id, class).await.unwrap();
        out.push(t.elapsed());
    }
    out
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(start_paused = true)]
async fn under_a_flood_of_prestaging_a_vm_read_stays_within_one_fetch_of_idle() {
    let dir = tempfile::tempdir().unwrap();
    let path = repository(dir.path());
    let repo = Repository::open(&path).unwrap().slowed(Slowness {
        latency: LATENCY,
        bandwidth: Some(BANDWIDTH),
    });
    let all = disk_chunks(&repo, "flood", 0).await;
    assert_eq!(all.len(), 384);
    let (vm, flood) = all.split_at(40);
    let source = || Arc::new(repo.clone());

    // Idle: the VM reads 20 chunks one after another.
    let idle_cache = ChunkCache::new(source(), 1 << 30);
    let idle = read_each(&idle_cache, &vm[..20], FetchClass::Vm).await;
    let idle_max = *idle.iter().max().unwrap();
    assert!(
        idle_max <= one_fetch() + Duration::from_millis(1),
        "{idle:?}"
    );

    // Two mounts pre-stage 344 chunks (about 90 MB: 0.9 s of the store's bandwidth) while the
    // VM reads 20 other chunks.
    let run = |cache: &Arc<ChunkCache>, vm_class: FetchClass, ids: Vec<ChunkId>| {
        let cache = cache.clone();
        async move {
            let half = flood.len() / 2;
            let mut stagers = Vec::new();
            for part in [&flood[..half], &flood[half..]] {
                let p = Prestage::new(Source::Own { vm: "flood".into() }, part.to_vec(), CHUNK);
                tokio::spawn(p.clone().run(cache.clone()));
                stagers.push(p);
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            let lat = read_each(&cache, &ids, vm_class).await;
            let stats = cache.scheduler_stats();
            for p in stagers {
                assert!(!p.status().finished, "the flood lasted the whole test");
                p.cancel();
            }
            // Let the fetches under way end, so the next run starts on an idle store.
            tokio::time::sleep(Duration::from_secs(1)).await;
            (lat, stats)
        }
    };
    let cache = Arc::new(ChunkCache::new(source(), 1 << 30));
    let (busy, stats) = run(&cache, FetchClass::Vm, vm[20..].to_vec()).await;
    assert!(stats.started[1] > 20, "the flood was running: {stats:?}");
    eprintln!(
        "one fetch {:?}; VM reads idle: median {:?}, max {idle_max:?}; under the flood: \
         median {:?}, first {:?}, max of the rest {:?}",
        one_fetch(),
        median(&idle),
        median(&busy),
        busy[0],
        busy[1..].iter().max().unwrap()
    );
    // Every read but the first: within one fetch of idle. The first finds up to the lower-class
    // slots' transfers (28 of 32) already under way on the store's shared bandwidth.
    assert!(median(&busy) <= idle_max + one_fetch(), "{busy:?}");
    for (i, l) in busy.iter().enumerate().skip(1) {
        assert!(*l <= idle_max + one_fetch(), "read {i}: {busy:?}");
    }
    let transfer = one_fetch() - LATENCY;
    let lower = (livemount::cache::FETCH_SLOTS - livemount::cache::VM_RESERVED_SLOTS) as u32;
    assert!(busy[0] <= idle_max + transfer * lower, "{busy:?}");

    // The same reads without priority (as pre-staging) queue behind the flood's fetches in
    // flight and waiting (about 16 transfers): the test can tell the difference.
    let cache = Arc::new(ChunkCache::new(source(), 1 << 30));
    let (flat, _) = run(&cache, FetchClass::Prestage, vm[20..].to_vec()).await;
    eprintln!(
        "the same reads without priority: median {:?}",
        median(&flat)
    );
    assert!(median(&flat) > 2 * (idle_max + one_fetch()), "{flat:?}");
}
