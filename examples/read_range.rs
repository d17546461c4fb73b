//! Reads a byte range of a backed-up disk through the repository's read API and prints it as a
//! hex dump: the call a live mount makes for every NFS READ.
//!
//! `cargo run --example read_range -- REPO SNAPSHOT DISK_INDEX OFFSET LENGTH`
//! e.g. `cargo run --example read_range -- livemount-demo/repo demo 0 16777216 64`

use anyhow::Context;
use livemount::repo::{Repository, SnapshotSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [repo, snapshot, disk, offset, length] = args.as_slice() else {
        anyhow::bail!("usage: read_range REPO SNAPSHOT DISK_INDEX OFFSET LENGTH");
    };
    let repo = Repository::open(repo.as_ref())?;
    let info = repo.resolve(&SnapshotSpec::new(snapshot, None)).await?;
    let snap = repo.snapshot(&info.id).await?;
    let disk = snap.disk(disk.parse().context("DISK_INDEX")?).await?;
    let offset: u64 = offset.parse().context("OFFSET")?;
    let bytes = disk
        .read_at(offset, length.parse().context("LENGTH")?)
        .await?;
    println!(
        "{} disk {} ({} bytes): {} bytes at {offset}",
        info.name,
        disk.name(),
        disk.size(),
        bytes.len()
    );
    for (i, row) in bytes.chunks(16).enumerate() {
        let hex: Vec<String> = row.iter().map(|b| format!("{b:02x}")).collect();
        let text: String = row
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        println!(
            "{:016x}  {:<48} {text}",
            offset + i as u64 * 16,
            hex.join(" ")
        );
    }
    Ok(())
}
