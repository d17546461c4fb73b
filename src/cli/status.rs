//! `livemount status [--json]`

use std::process::ExitCode;

use clap::Args;

use super::human;
use super::mount::StateArgs;
use crate::cache::outage::StoreState;
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
    println!("store       {}", store_line(&s.store));
    println!("mounts      {}", s.mounts);
    println!(
        "cache       {} of {}, {} hits, {} misses ({} fetches joined by other readers), {} fetch errors",
        human(s.cache.bytes),
        human(s.cache.capacity),
        s.cache.hits,
        s.cache.misses,
        s.cache.joined,
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

/// The store's state in one line: reachable (and the last outage), or unreachable since when,
/// why, and the reads held.
pub(crate) fn store_line(st: &StoreState) -> String {
    match st.unreachable_since {
        None => {
            let last = st.last_outage.as_ref().map_or(String::new(), |o| {
                format!(
                    "; {} outage(s) ridden through, the last {} to {} ({:.0} s)",
                    st.outages, o.from, o.to, o.seconds
                )
            });
            format!(
                "reachable (VM reads held up to {:.0} s in an outage){last}",
                st.grace_seconds
            )
        }
        Some(since) => {
            let secs = jiff::Timestamp::now()
                .duration_since(since)
                .as_secs()
                .max(0);
            format!(
                "UNREACHABLE since {since} ({secs} s): {}; {} VM read(s) held (longest {:.0} s), each up to {:.0} s, then an I/O error; cached reads and writes go on",
                st.error.as_deref().unwrap_or("?"),
                st.held_reads,
                st.longest_held_seconds,
                st.grace_seconds
            )
        }
    }
}
