//! `livemount show SNAPSHOT [--at TIME] [--json]`

use std::process::ExitCode;

use clap::Args;

use super::{human, RepoArgs, SnapshotArgs};

#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    repo: RepoArgs,
    #[command(flatten)]
    snapshot: SnapshotArgs,
    /// Print the snapshot's manifest as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: ShowArgs) -> anyhow::Result<ExitCode> {
    let repo = a.repo.open().await?;
    let info = a.snapshot.resolve(&repo).await?;
    let m = repo.manifest(&info.id).await?;
    if a.json {
        super::print_json(&serde_json::json!({
            "id": info.id,
            "name": info.name,
            "manifest": m,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("snapshot    {}", info.name);
    println!("id          {}", info.id);
    println!("vm          {} ({})", m.vm.name, m.vm.hypervisor);
    println!("uuid        {}", m.vm.uuid.as_deref().unwrap_or("-"));
    println!("taken       {}", m.taken);
    if let Some(p) = m.parent {
        println!("parent      {p}");
    }
    println!(
        "config      {} ({} bytes)",
        m.config.file_name, m.config.size
    );
    println!("chunk size  {}", m.chunk_size);
    println!("disks:");
    for d in &m.disks {
        let data = d
            .allocated_blocks
            .saturating_mul(m.chunk_size.as_u64())
            .min(d.size);
        println!(
            "  {:<10} {:<40} {:>10} ({} bytes), data {}, from {}",
            d.device,
            d.name,
            human(d.size),
            d.size,
            human(data),
            d.source_format
        );
    }
    Ok(ExitCode::SUCCESS)
}
