//! Random-read latency client for `scripts/bench-relocate`: one NFS connection, one 4 KiB read
//! at a time, each in a different chunk of a region of the disk (a random permutation, so no
//! read finds its chunk cached by an earlier one), for SECONDS or until the region is used up.
//! Prints one JSON line: reads, p50_ms, p99_ms, max_ms.
//!
//! Usage: randread PORT MOUNT FILE REGION_START_MIB REGION_MIB SECONDS

use std::time::{Duration, Instant};

use anyhow::Context;
use nfs3_client::nfs3_types::nfs3::*;
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::tokio::TokioConnector;
use nfs3_client::Nfs3ConnectionBuilder;

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, mount, file, start, len, secs] = args.as_slice() else {
        anyhow::bail!("usage: randread PORT MOUNT FILE REGION_START_MIB REGION_MIB SECONDS");
    };
    let port: u16 = port.parse().context("PORT")?;
    let start: u64 = start.parse().context("REGION_START_MIB")?;
    let len: u64 = len.parse().context("REGION_MIB")?;
    let until = Instant::now() + Duration::from_secs_f64(secs.parse().context("SECONDS")?);
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
                name: filename3::from(file.as_bytes().to_vec()),
            },
        })
        .await?
    {
        LOOKUP3res::Ok(ok) => ok.object,
        LOOKUP3res::Err((e, _)) => anyhow::bail!("LOOKUP {file}: {e:?}"),
    };
    // A permutation of the region's MiB (xorshift-driven Fisher-Yates; fixed seed).
    let mut order: Vec<u64> = (start..start + len).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let mut lat = Vec::new();
    for (n, m) in order.into_iter().enumerate() {
        if Instant::now() >= until {
            break;
        }
        let offset = m * MIB + (n as u64 % 256) * 4096;
        let t = Instant::now();
        match c
            .read(&READ3args {
                file: fh.clone(),
                offset,
                count: 4096,
            })
            .await?
        {
            READ3res::Ok(_) => {}
            READ3res::Err((e, _)) => anyhow::bail!("READ at {offset}: {e:?}"),
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    anyhow::ensure!(!lat.is_empty(), "no reads made");
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    println!(
        "{{\"reads\": {}, \"p50_ms\": {:.2}, \"p99_ms\": {:.2}, \"max_ms\": {:.2}}}",
        lat.len(),
        p(0.50),
        p(0.99),
        lat[lat.len() - 1]
    );
    Ok(())
}
