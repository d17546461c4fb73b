//! `livemount mounts [--json]`

use std::process::ExitCode;

use clap::Args;

use super::human;
use super::mount::StateArgs;
use crate::agent::MountInfo;
use crate::control::{Client, StatusReply};

#[derive(Debug, Args)]
pub struct MountsArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Print the list as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: MountsArgs) -> anyhow::Result<ExitCode> {
    let client = Client::from_state(&a.state.state)?;
    let mounts: Vec<MountInfo> = client.request("GET", "/v1/mounts".into(), None).await?;
    if a.json {
        super::print_json(&mounts)?;
        return Ok(ExitCode::SUCCESS);
    }
    // An outage of the store concerns every mount: said first (`status --json` has it too).
    let status: StatusReply = Client::from_state(&a.state.state)?
        .request("GET", "/v1/status".into(), None)
        .await?;
    if !status.store.reachable {
        println!("store: {}", super::status::store_line(&status.store));
    }
    if mounts.is_empty() {
        println!("no mounts");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24}  {:<40}  {:<4}  {:>10}",
        "NAME", "SNAPSHOT", "MODE", "DISKS"
    );
    for m in &mounts {
        let disks: u64 = m.files.iter().filter(|f| f.disk).map(|f| f.size).sum();
        println!(
            "{:<24}  {:<40}  {:<4}  {:>10}",
            m.spec.name,
            m.spec.snapshot_name,
            if m.spec.read_only { "ro" } else { "rw" },
            human(disks)
        );
        if m.spec.disks_only {
            println!("  disks only (no config, no folder files)");
        }
        if let Some(from) = m.converted_from {
            let dropped = m.devices.iter().filter(|d| d.is_dropped()).count();
            println!(
                "  converted from {from} for {}{}",
                m.hypervisor,
                if dropped > 0 {
                    format!(" ({dropped} settings or devices not carried over; --json lists them)")
                } else {
                    String::new()
                }
            );
        }
        if !m.spec.disks_only {
            for nic in &m.network {
                println!("  {nic}");
            }
        }
        if let Some(r) = &m.relocation {
            println!(
                "  relocation to {}: {}, {} of {} copied{}{}",
                r.dest.display(),
                r.phase,
                human(r.copied),
                human(r.total),
                if r.bytes_per_second > 0.0 {
                    format!(", {:.1} MB/s", r.bytes_per_second / 1e6)
                } else {
                    String::new()
                },
                match (r.eta_seconds, &r.error) {
                    (_, Some(e)) => format!(", error: {e}"),
                    (Some(eta), None) => format!(", eta {eta:.0} s"),
                    (None, None) => String::new(),
                }
            );
        }
        if let Some(w) = &m.boot.window {
            let total = w.hits + w.misses;
            println!(
                "  boot window: {}, {} blocks, cache hits {}/{}{}, storage wait {:.3} s",
                w.state,
                w.blocks,
                w.hits,
                total,
                if total > 0 {
                    format!(" ({:.1} %)", 100.0 * w.hits as f64 / total as f64)
                } else {
                    String::new()
                },
                w.storage_wait_seconds
            );
        }
        if let Some(p) = &m.boot.prestage {
            println!("  pre-staging: {}", super::mount::describe_prestage(p));
        }
    }
    Ok(ExitCode::SUCCESS)
}
