//! Hostile input on a live socket: a few hundred thousand random and mutated call records (well
//! formed calls of every NFS and MOUNT procedure with bytes flipped, cut or extended, pure
//! garbage, broken record marks) from several connections at once. The server answers or
//! closes, never panics, stays within a memory bound, and serves a well-behaved client
//! correctly afterwards.

mod common;

use common::nfs::*;
use common::*;
use livemount::nfs::fuzzing::seed_calls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Records sent in all.
const RECORDS: usize = 300_000;
const CONNECTIONS: usize = 4;

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut rec = seeds[rng.below(seeds.len() as u64) as usize].clone();
    match rng.below(10) {
        // Flip bytes, mostly in the arguments (past the 44-byte header).
        0..=5 => {
            for _ in 0..=rng.below(4) {
                let at = if rng.below(4) == 0 {
                    rng.below(rec.len() as u64)
                } else {
                    44 + rng.below((rec.len() as u64).saturating_sub(44).max(1))
                } as usize;
                if at < rec.len() {
                    rec[at] ^= 1 << rng.below(8);
                }
                if rng.below(3) == 0 && at < rec.len() {
                    rec[at] = [0x00, 0xff, 0x7f, 0x80][rng.below(4) as usize];
                }
            }
        }
        6 => rec.truncate(rng.below(rec.len() as u64) as usize),
        7 => {
            let extra = rng.below(64) as usize;
            let mut tail = vec![0u8; extra];
            rng.fill(&mut tail);
            rec.extend_from_slice(&tail);
        }
        8 => {
            // A length word anywhere set huge.
            let at = (rng.below(rec.len() as u64 / 4) * 4) as usize;
            if at + 4 <= rec.len() {
                rec[at..at + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0xf0]);
            }
        }
        _ => {
            let mut junk = vec![0u8; rng.below(200) as usize];
            rng.fill(&mut junk);
            rec = junk;
        }
    }
    rec
}

async fn blast(port: u16, seeds: Vec<Vec<u8>>, seed: u64, records: usize) -> usize {
    let mut rng = Rng::new(seed);
    let mut sent = 0;
    let mut reconnects = 0;
    while sent < records {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("the server accepts connections");
        reconnects += 1;
        let (mut rd, mut wr) = stream.into_split();
        // Drain replies so the server is never blocked on us.
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(rd.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let mut batch = Vec::new();
        while sent < records {
            let rec = mutate(&mut rng, &seeds);
            if rng.below(2000) == 0 {
                // A broken record mark: the server closes this connection.
                batch.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
                sent += 1;
                break;
            }
            batch.extend_from_slice(&(0x8000_0000u32 | rec.len() as u32).to_be_bytes());
            batch.extend_from_slice(&rec);
            sent += 1;
            if batch.len() > 32 * 1024 {
                if wr.write_all(&batch).await.is_err() {
                    batch.clear();
                    break;
                }
                batch.clear();
            }
        }
        let _ = wr.write_all(&batch).await;
        let _ = wr.shutdown().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), drain).await;
    }
    reconnects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_thousands_of_mutated_records_change_nothing_they_should_not() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(2 * MIB, 81);
    let repo = repo_with_disk(t.path(), "bi", &raw);
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "off", &[]);
    server.cli(&["mount", "bi", "--name", "bi"]);
    server.cli(&["mount", "bi", "--name", "ro", "--read-only"]);
    let mut c = connect(&server, "bi").await;
    let dir = c.root_nfs_fh3();
    let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
    let mut ro = connect(&server, "ro").await;
    let ro_dir = ro.root_nfs_fh3();
    let ro_disk = lookup(&mut ro, &ro_dir, "d.img").await.unwrap();
    let mut seeds = seed_calls(&dir.data, &disk.data);
    seeds.extend(seed_calls(&ro_dir.data, &ro_disk.data));

    let t0 = std::time::Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            tokio::spawn(blast(
                server.nfs_port,
                seeds.clone(),
                90 + i as u64,
                RECORDS / CONNECTIONS,
            ))
        })
        .collect();
    let mut connections = 0;
    for task in tasks {
        connections += task.await.unwrap();
    }
    eprintln!(
        "{RECORDS} records on {connections} connections in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // Still serving, correctly: the read-only mount reads as the backup, the backup's disk
    // files are all there at their size, and the server's memory stayed bounded.
    let mut ro = connect(&server, "ro").await;
    let ro_dir = ro.root_nfs_fh3();
    let ro_disk = lookup(&mut ro, &ro_dir, "d.img").await.unwrap();
    assert_eq!(
        read_at(&mut ro, &ro_disk, 0, 1 << 20).await.unwrap(),
        raw[..1 << 20]
    );
    assert_eq!(size(&mut ro, &ro_disk).await, raw.len() as u64);
    let mut c = connect(&server, "bi").await;
    let dir = c.root_nfs_fh3();
    let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
    assert_eq!(size(&mut c, &disk).await, raw.len() as u64);
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("server peak RSS {} MiB", rss_kib / 1024);
    assert!(rss_kib < 512 * 1024, "peak RSS {rss_kib} KiB");
    let log = server.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
