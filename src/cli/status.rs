//! `livemount status [--json]`

use std::process::ExitCode;

use clap::Args;

use super::human;
use super::mount::StateArgs;
use crate::control::{Client, StatusReply};

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    state: StateArgs,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let s: StatusReply = Client::from_state(&a.state.state)?
        .request("GET", "/v1/status".into(), None)
        .await?;
    if a.json {
        super::print_json(&s)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("livemount {} up since {}", s.version, s.started);
    println!(
        "repository  {} ({} fetches, {} fetched since start)",
        s.repository,
        s.repository_fetches.fetches,
        human(s.repository_fetches.fetched_bytes)
    );
    println!(
        "datastore   {}:{} (NFS port {}, portmapper {})",
        s.advertise,
        s.export,
        s.nfs_port,
        if s.portmap { "on" } else { "off" }
    );
    match s.nbd_port {
        Some(p) => println!("block       NBD port {p} (exports MOUNT/DISK)"),
        None => println!("block       NBD off (serve --nbd ADDR:PORT)"),
    }
    match s.iscsi_port {
        Some(p) => println!(
            "block       iSCSI port {p} (targets {}MOUNT, CHAP {})",
            crate::iscsi::IQN_PREFIX,
            if s.iscsi_chap { "required" } else { "off" }
        ),
        None => println!("block       iSCSI off (serve --iscsi ADDR:PORT)"),
    }
    println!("mounts      {}", s.mounts);
    println!(
        "cache       {} of {}, {} hits, {} misses, {} fetch errors",
        human(s.cache.bytes),
        human(s.cache.capacity),
        s.cache.hits,
        s.cache.misses,
        s.cache.fetch_errors
    );
    if let Some(d) = &s.cache.disk {
        println!(
            "disk cache  {} of {} in {} entries, {} hits, {} written, {} damaged entries dropped",
            human(d.bytes),
            human(d.capacity),
            d.entries,
            d.hits,
            d.writes,
            d.dropped
        );
    }
    Ok(ExitCode::SUCCESS)
}
