//! Load generator for `scripts/load-test`: C clients (one NFS connection each, over
//! nfs3_client) on M live mounts of one disk, mixed 4-64 KiB reads (70 %) and FILE_SYNC or
//! UNSTABLE writes (30 %) at random 4 KiB-aligned offsets, for S seconds. Every reply is
//! checked: an error, or a read whose bytes differ from the backup plus that client's own
//! writes, fails the run. Prints throughput, latency percentiles and the server's RSS.
//!
//! Usage: load PORT PID SOURCE_DISK SECONDS CLIENTS MOUNT...

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nfs3_client::nfs3_types::nfs3::*;
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::tokio::TokioConnector;
use nfs3_client::Nfs3ConnectionBuilder;

const BLOCK: u64 = 4096;

fn rss_mib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |k| k / 1024)
}

struct Stats {
    lat_us: Vec<u32>,
    bytes: u64,
}

async fn client(
    port: u16,
    mount: String,
    disk: std::sync::Arc<Vec<u8>>,
    region: (u64, u64),
    seed: u64,
    until: Instant,
) -> anyhow::Result<Stats> {
    let mut c =
        Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", format!("/livemount/{mount}"))
            .mount_port(port)
            .nfs3_port(port)
            .credential(opaque_auth::auth_unix(&auth_unix::default()))
            .mount()
            .await?;
    let dir = c.root_nfs_fh3();
    let fh = match c
        .lookup(&LOOKUP3args {
            what: diropargs3 {
                dir,
                name: filename3::from(b"d.img".to_vec()),
            },
        })
        .await?
    {
        LOOKUP3res::Ok(ok) => ok.object,
        LOOKUP3res::Err((e, _)) => anyhow::bail!("LOOKUP: {e:?}"),
    };
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // This client's own writes: block -> pattern byte. Its region is its own.
    let mut written: HashMap<u64, u8> = HashMap::new();
    let mut stats = Stats {
        lat_us: Vec::new(),
        bytes: 0,
    };
    let (lo, hi) = region;
    while Instant::now() < until {
        let blocks = 1 + next() % 16;
        let first = lo / BLOCK + next() % ((hi - lo) / BLOCK - blocks);
        let (off, len) = (first * BLOCK, blocks * BLOCK);
        let t = Instant::now();
        if next() % 10 < 7 {
            let r = c
                .read(&READ3args {
                    file: fh.clone(),
                    offset: off,
                    count: len as u32,
                })
                .await?;
            let data = match r {
                READ3res::Ok(ok) => ok.data.to_vec(),
                READ3res::Err((e, _)) => anyhow::bail!("READ at {off}: {e:?}"),
            };
            stats.lat_us.push(t.elapsed().as_micros() as u32);
            anyhow::ensure!(data.len() as u64 == len, "short READ at {off}");
            for b in 0..blocks {
                let at = (b * BLOCK) as usize;
                let got = &data[at..at + BLOCK as usize];
                let ok = match written.get(&(first + b)) {
                    Some(p) => got.iter().all(|x| x == p),
                    None => got == &disk[(off as usize + at)..(off as usize + at + BLOCK as usize)],
                };
                anyhow::ensure!(ok, "wrong bytes at {}", off + b * BLOCK);
            }
        } else {
            let p = (next() % 255 + 1) as u8;
            let stable = if next() % 2 == 0 {
                stable_how::UNSTABLE
            } else {
                stable_how::FILE_SYNC
            };
            let data = vec![p; len as usize];
            match c
                .write(&WRITE3args {
                    file: fh.clone(),
                    offset: off,
                    count: len as u32,
                    stable,
                    data: data.as_slice().into(),
                })
                .await?
            {
                WRITE3res::Ok(_) => {}
                WRITE3res::Err((e, _)) => anyhow::bail!("WRITE at {off}: {e:?}"),
            }
            stats.lat_us.push(t.elapsed().as_micros() as u32);
            for b in 0..blocks {
                written.insert(first + b, p);
            }
        }
        stats.bytes += len;
    }
    Ok(stats)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        a.len() >= 7,
        "usage: load PORT PID SOURCE_DISK SECONDS CLIENTS MOUNT..."
    );
    let port: u16 = a[1].parse()?;
    let pid = a[2].clone();
    let disk = std::sync::Arc::new(std::fs::read(&a[3])?);
    let secs: u64 = a[4].parse()?;
    let clients: usize = a[5].parse()?;
    let mounts = &a[6..];
    let per_mount = clients.div_ceil(mounts.len()) as u64;
    let rss_start = rss_mib(&pid);
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(secs);
    let size = disk.len() as u64;
    let mut tasks = Vec::new();
    for i in 0..clients {
        let slot = i as u64 / mounts.len() as u64;
        let span = size / per_mount / BLOCK * BLOCK;
        let region = (slot * span, (slot + 1) * span);
        tasks.push(tokio::spawn(client(
            port,
            mounts[i % mounts.len()].clone(),
            disk.clone(),
            region,
            0x9e37_79b9 ^ i as u64,
            until,
        )));
    }
    // RSS while running, every 10 s.
    let watch = {
        let pid = pid.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while Instant::now() < until {
                peak = peak.max(rss_mib(&pid));
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            peak
        })
    };
    let mut lat = Vec::new();
    let mut bytes = 0;
    for t in tasks {
        let s = t.await??;
        lat.extend(s.lat_us);
        bytes += s.bytes;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let peak = watch.await?;
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{clients} clients on {} mounts, {elapsed:.0} s: {} requests, 0 errors, {:.0} requests/s, {:.1} MB/s",
        mounts.len(),
        lat.len(),
        lat.len() as f64 / elapsed,
        bytes as f64 / 1e6 / elapsed
    );
    println!(
        "latency p50 {} us, p99 {} us, p99.9 {} us, max {} us",
        pct(0.50),
        pct(0.99),
        pct(0.999),
        lat[lat.len() - 1]
    );
    println!(
        "server RSS: start {rss_start} MiB, peak {} MiB, end {} MiB",
        peak.max(rss_mib(&pid)),
        rss_mib(&pid)
    );
    Ok(())
}
