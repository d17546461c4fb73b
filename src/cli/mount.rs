//! `livemount mount SNAPSHOT [--name NAME] [--read-only] [--network keep|disconnect]`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::human;
use crate::agent::MountRequest;
use crate::control::{Client, MountReply};

/// `--state`, shared by the commands that talk to a running server.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// The running server's state directory.
    #[arg(long, env = "LIVEMOUNT_STATE", value_name = "DIR")]
    pub state: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Network {
    Keep,
    Disconnect,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    #[command(flatten)]
    state: StateArgs,
    /// VM@TIME, a unique id prefix, or a VM name (its latest snapshot).
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,
    /// With a VM name: its latest snapshot at or before this RFC 3339 time.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// The mount's name: its folder in the datastore [default: VM-lmN].
    #[arg(long)]
    name: Option<String>,
    /// Refuse every change to the mount.
    #[arg(long)]
    read_only: bool,
    /// Keep the VM's NICs connected, or disconnect them (default) so the recovered VM cannot
    /// clash with the production one.
    #[arg(long, value_enum, default_value = "disconnect")]
    network: Network,
    /// Only this host (an address, or a CIDR such as 10.1.0.0/16) may use the mount; repeat
    /// for more [default: every host the server allows].
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: MountArgs) -> anyhow::Result<ExitCode> {
    let at = a.at.as_deref().map(crate::repo::parse_time).transpose()?;
    let req = MountRequest {
        snapshot: a.snapshot.clone(),
        at,
        name: a.name.clone(),
        read_only: a.read_only,
        keep_network: matches!(a.network, Network::Keep),
        hosts: a.allow.clone(),
    };
    let client = Client::from_state(&a.state.state)?;
    let reply: MountReply = client
        .request(
            "POST",
            "/v1/mounts".into(),
            Some(serde_json::to_value(&req)?),
        )
        .await?;
    if a.json {
        super::print_json(&reply)?;
        return Ok(ExitCode::SUCCESS);
    }
    let m = &reply.mount;
    println!(
        "mounted {} as {}{}",
        m.spec.snapshot_name,
        m.spec.name,
        if m.spec.read_only { " (read-only)" } else { "" }
    );
    for f in &m.files {
        println!("  {:<40} {:>10}", f.name, human(f.size));
    }
    match m.hypervisor {
        crate::vmconfig::Hypervisor::Esxi => {
            println!("ESXi:");
            for c in &reply.attach.esxi {
                println!("  {c}");
            }
        }
        crate::vmconfig::Hypervisor::Kvm => {
            println!("KVM:");
            for c in &reply.attach.kvm {
                println!("  {c}");
            }
        }
    }
    println!("disks:");
    for u in &reply.attach.disk_urls {
        println!("  {u}");
    }
    Ok(ExitCode::SUCCESS)
}
