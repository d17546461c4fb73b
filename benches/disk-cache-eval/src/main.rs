//! livemount's disk tier (`livemount::cache::disk::DiskCache`) against foyer's hybrid cache
//! used as a disk tier, on the same chunks, one run (decision 0011).
//!
//! For each: write N chunks of 1 MiB of random bytes; close; drop the page cache; reopen (the
//! restart: how long, how many entries found); read every chunk with 8 reads in flight, each
//! checked against its BLAKE3 digest (livemount's tier does that itself; for foyer the check is
//! done here, since a chunk must never be served unchecked); then flip one byte inside one
//! stored chunk on disk, reopen, read all again and count hits, misses and bytes served wrong.
//! Prints seconds, MB/s and CPU-seconds per GiB of this process.
//!
//! Run as root (it drops the page cache): `cargo run --release -- [CHUNKS] [DIR] [CHUNK_KIB]`.
//! Defaults: 1024 chunks of 1024 KiB (1 GiB) under target/disk-cache-eval.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use foyer::{
    BlockEngineConfig, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, RecoverMode,
};
use livemount::cache::disk::DiskCache;
use livemount::repo::ChunkId;

const MIB: usize = 1 << 20;
/// Bytes per chunk (the third argument, in KiB; 1 MiB by default).
static CHUNK: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

fn chunk_len() -> usize {
    *CHUNK.get().unwrap_or(&MIB)
}
const IN_FLIGHT: usize = 8;

/// CPU-seconds (user + system) of this process so far.
fn cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn drop_page_cache() {
    let _ = std::process::Command::new("sync").status();
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        eprintln!("(not root: the page cache was not dropped; reads may be warm)");
    }
}

struct Timing {
    secs: f64,
    cpu: f64,
}

impl Timing {
    fn start() -> (Instant, f64) {
        (Instant::now(), cpu())
    }
    fn end(s: (Instant, f64)) -> Timing {
        Timing {
            secs: s.0.elapsed().as_secs_f64(),
            cpu: cpu() - s.1,
        }
    }
    fn show(&self, what: &str, bytes: usize) {
        let gib = bytes as f64 / (1u64 << 30) as f64;
        println!(
            "  {what:<28} {:7.3} s  {:6.0} MB/s  {:5.2} CPU-s/GiB",
            self.secs,
            bytes as f64 / 1e6 / self.secs,
            self.cpu / gib
        );
    }
}

fn chunks(n: usize) -> Vec<(ChunkId, Bytes)> {
    // Random bytes from BLAKE3's XOF: fast and reproducible.
    (0..n)
        .map(|i| {
            let mut b = vec![0u8; chunk_len()];
            blake3::Hasher::new()
                .update(&(i as u64).to_le_bytes())
                .finalize_xof()
                .fill(&mut b);
            (ChunkId::of(&b), Bytes::from(b))
        })
        .collect()
}

async fn ours(dir: &Path, data: &[(ChunkId, Bytes)]) {
    println!("livemount DiskCache (one file per chunk, index rebuilt at open)");
    let bytes = data.len() * chunk_len();
    let cap = (bytes as u64) * 2;
    let _ = std::fs::remove_dir_all(dir);
    let c = DiskCache::open(dir, cap).unwrap();
    let t = Timing::start();
    let writes: Vec<_> = data
        .chunks(data.len().div_ceil(4))
        .map(|part| {
            let c = c.clone();
            let part = part.to_vec();
            tokio::task::spawn_blocking(move || {
                for (id, b) in part {
                    c.put_blocking(id, &b);
                }
            })
        })
        .collect();
    for w in writes {
        w.await.unwrap();
    }
    Timing::end(t).show("write (4 writers)", bytes);
    drop(c);
    drop_page_cache();
    let t = Timing::start();
    let c = DiskCache::open(dir, cap).unwrap();
    let open = Timing::end(t);
    println!(
        "  reopen                       {:7.3} s  {} entries found",
        open.secs,
        c.stats().entries
    );
    let t = Timing::start();
    let cc = c.clone();
    let (h, m, w) = read_all_parallel(data, move |id| {
        let c = cc.clone();
        async move { c.get(&id).await }
    })
    .await;
    Timing::end(t).show("read cold, checked", bytes);
    println!("  hits {h}, misses {m}, wrong {w}");
    drop(c);
    // Damage: one byte of one entry.
    let (id, _) = &data[data.len() / 2];
    let hex = id.to_hex();
    let path = dir.join("chunks").join(&hex[..2]).join(&hex);
    flip_byte(&path, chunk_len() as u64 / 2);
    let c = DiskCache::open(dir, cap).unwrap();
    let cc = c.clone();
    let (h, m, w) = read_all_parallel(data, move |id| {
        let c = cc.clone();
        async move { c.get(&id).await }
    })
    .await;
    println!("  after one flipped byte: hits {h}, misses {m}, wrong {w}");
}

async fn foyer_tier(dir: &Path, data: &[(ChunkId, Bytes)]) {
    println!("foyer 0.22 HybridCache (block engine on a file device, 16 MiB blocks, 4 flushers, 16 MiB memory, write on insertion, queue and buffers larger than the data)");
    let bytes = data.len() * chunk_len();
    let cap = bytes * 2;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let open = |dir: PathBuf| async move {
        let device = FsDeviceBuilder::new(&dir)
            .with_capacity(cap)
            .build()
            .unwrap();
        let c: HybridCache<String, Bytes> = HybridCacheBuilder::new()
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .memory(16 * MIB)
            .with_weighter(|_k: &String, v: &Bytes| v.len())
            .storage()
            .with_recover_mode(RecoverMode::Quiet)
            // A flush buffer and a submit queue larger than the run's data: foyer drops an entry
            // when its queue passes 16 MiB (the default), and this run compares entries
            // written, not dropped.
            .with_engine_config(
                BlockEngineConfig::new(device)
                    .with_block_size(16 * MIB)
                    .with_buffer_pool_size(cap)
                    .with_submit_queue_size_threshold(cap)
                    .with_flushers(4),
            )
            .build()
            .await
            .unwrap();
        c
    };
    let c = open(dir.into()).await;
    let t = Timing::start();
    for (id, b) in data {
        c.insert(id.to_hex(), b.clone());
    }
    c.close().await.unwrap();
    Timing::end(t).show("write (insert, close)", bytes);
    drop(c);
    drop_page_cache();
    let t = Timing::start();
    let c = open(dir.into()).await;
    let reopen = Timing::end(t);
    let present = data.iter().filter(|(id, _)| c.contains(&id.to_hex())).count();
    println!(
        "  reopen                       {:7.3} s  {present} entries in memory right after (the rest on disk)",
        reopen.secs
    );
    let t = Timing::start();
    let cc = Arc::new(c);
    let (h, m, w) = read_all_parallel(data, foyer_get(cc.clone())).await;
    Timing::end(t).show("read cold, checked here", bytes);
    println!("  hits {h}, misses {m}, wrong {w}");
    cc.close().await.unwrap();
    drop(cc);
    // Damage: one byte in the middle of the device's data.
    let file = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .unwrap();
    let len = std::fs::metadata(&file).unwrap().len();
    flip_byte(&file, (len / 4).min(bytes as u64 / 2) + 12345);
    let c = Arc::new(open(dir.into()).await);
    let (h, m, w) = read_all_parallel(data, foyer_get(c.clone())).await;
    println!("  after one flipped byte in {}: hits {h}, misses {m}, wrong {w}", file.display());
    c.close().await.unwrap();
}

/// A reader of the foyer cache by chunk id: its bytes, or `None` on a miss or an error.
fn foyer_get(
    c: Arc<HybridCache<String, Bytes>>,
) -> impl Fn(ChunkId) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<Bytes>> + Send>>
       + Clone
       + Send
       + Sync
       + 'static {
    move |id| {
        let c = c.clone();
        Box::pin(async move {
            match c.get(&id.to_hex()).await {
                Ok(Some(e)) => Some(e.value().clone()),
                _ => None,
            }
        })
    }
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::options().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x20;
    f.write_all_at(&b, at).unwrap();
}

/// `read_all` with IN_FLIGHT tasks at once.
async fn read_all_parallel<F, Fut>(data: &[(ChunkId, Bytes)], get: F) -> (usize, usize, usize)
where
    F: Fn(ChunkId) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<Bytes>> + Send + 'static,
{
    let ids: Vec<ChunkId> = data.iter().map(|(id, _)| *id).collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::new();
    for id in ids {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let get = get.clone();
        tasks.push(tokio::spawn(async move {
            let got = get(id).await;
            drop(permit);
            (id, got)
        }));
    }
    let mut out = (0, 0, 0);
    for t in tasks {
        let (id, got) = t.await.unwrap();
        match got {
            None => out.1 += 1,
            Some(b) if ChunkId::of(&b) == id => out.0 += 1,
            Some(_) => out.2 += 1,
        }
    }
    out
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse().unwrap()).unwrap_or(1024);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "target/disk-cache-eval".into()));
    if let Some(kib) = args.next() {
        CHUNK.set(kib.parse::<usize>().unwrap() * 1024).unwrap();
    }
    let data = chunks(n);
    println!(
        "{n} chunks of {} KiB of random bytes; {IN_FLIGHT} reads in flight",
        chunk_len() / 1024
    );
    ours(&dir.join("ours"), &data).await;
    foyer_tier(&dir.join("foyer"), &data).await;
}
