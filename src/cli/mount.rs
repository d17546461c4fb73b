//! `livemount mount SNAPSHOT [--name NAME] [--read-only] [--disks-only]
//! [--network keep|disconnect|remove] [--network-map OLD=NEW]...
//! [--for kvm|esxi [--disk-bus BUS] [--nic-model MODEL]]`

use std::path::PathBuf;
use std::process::ExitCode;

use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use super::human;
use super::progress::Bar;
use crate::agent::{BootInfo, MountInfo, MountRequest, PrestageMode};
use crate::control::{Client, MountReply};
use crate::prestage::PrestageStatus;
use crate::profile::Source;
use crate::repo::Progress;
use crate::units::parse_duration;
use crate::vmconfig::{DiskBus, Hypervisor, NetworkMode, NicModel};

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
    Remove,
}

/// One `--network-map OLD=NEW`.
fn parse_map_entry(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((old, new)) if !old.is_empty() && !new.is_empty() && !new.contains('=') => {
            Ok((old.to_owned(), new.to_owned()))
        }
        _ => Err(format!(
            "{text:?} is not OLD=NEW (a network, bridge or port group name on each side, \
             e.g. default=lab)"
        )),
    }
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
    /// The VM's NICs: `keep` them connected; `disconnect` them (default), so the recovered VM
    /// cannot clash with the production one and starts on a host that lacks its networks
    /// (libvirt: link down, and a NIC on an unmapped network or bridge becomes a user-mode NIC;
    /// ESXi: startConnected FALSE); or `remove` them.
    #[arg(long, value_enum, default_value = "disconnect")]
    network: Network,
    /// Rename a network: OLD=NEW (libvirt network or bridge names, ESXi port group names);
    /// repeat for more. Over the server's default `network_map`; OLD must be used by a NIC.
    #[arg(long, value_name = "OLD=NEW", value_parser = parse_map_entry)]
    network_map: Vec<(String, String)>,
    /// Only this host (an address, or a CIDR such as 10.1.0.0/16) may use the mount; repeat
    /// for more [default: every host the server allows].
    #[arg(long, value_name = "CIDR")]
    allow: Vec<String>,
    /// Pre-stage the VM's boot set into the read cache from its boot profile (or one it
    /// shares most boot blocks with): `wait` returns once it is cached (or at
    /// --prestage-timeout), `background` returns at once, `off` does not pre-stage.
    #[arg(long, value_enum, default_value = "background")]
    prestage: Prestage,
    /// With `--prestage wait`: the longest wait, e.g. 90s.
    #[arg(long, value_name = "DURATION", default_value = "300s")]
    prestage_timeout: String,
    /// Mount only the disks: no config and no VM folder files, no boot profile or
    /// pre-staging; for attaching a backup's disks to a VM that is already running
    /// (instant disk recovery), over NFS or as block devices (serve --nbd).
    #[arg(long)]
    disks_only: bool,
    /// The hypervisor to recover on [default: the backup's own]. `kvm` for an ESXi backup
    /// serves libvirt domain XML and raw disks; `esxi` for a KVM backup serves a .vmx and a
    /// VMDK descriptor per disk. `mount` lists what each device became and what could not
    /// come along (passthrough devices, vTPM, CD-ROMs, ...).
    #[arg(long = "for", value_enum, value_name = "HYPERVISOR")]
    for_hypervisor: Option<For>,
    /// With --for: the disks' bus. `auto` keeps the source's controller where the target
    /// has it (pvscsi, LSI Logic, LSI SAS, SATA; IDE and NVMe on ESXi) and uses SATA
    /// otherwise; `virtio` (KVM), `scsi` (KVM virtio-scsi, ESXi pvscsi), `sata`, `ide` (ESXi).
    #[arg(long, value_enum, default_value = "auto", value_name = "BUS")]
    disk_bus: Bus,
    /// With --for: the NICs' model; `auto` is e1000e, which every current guest OS has a
    /// driver for.
    #[arg(long, value_enum, default_value = "auto", value_name = "MODEL")]
    nic_model: Model,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum For {
    Kvm,
    Esxi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Bus {
    Auto,
    Virtio,
    Scsi,
    Sata,
    Ide,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Model {
    Auto,
    Virtio,
    E1000e,
    E1000,
    Vmxnet3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Prestage {
    Wait,
    Background,
    Off,
}

pub async fn run(a: MountArgs) -> anyhow::Result<ExitCode> {
    let at = a.at.as_deref().map(crate::repo::parse_time).transpose()?;
    let timeout = parse_duration(&a.prestage_timeout)
        .map_err(|e| anyhow::anyhow!("--prestage-timeout {:?}: {e}", a.prestage_timeout))?;
    let mut network_map = std::collections::BTreeMap::new();
    for (old, new) in &a.network_map {
        if let Some(earlier) = network_map.insert(old.clone(), new.clone()) {
            anyhow::bail!("--network-map {old}={new}: {old} is mapped to {earlier} already");
        }
    }
    let req = MountRequest {
        snapshot: a.snapshot.clone(),
        at,
        name: a.name.clone(),
        read_only: a.read_only,
        network: match a.network {
            Network::Keep => NetworkMode::Keep,
            Network::Disconnect => NetworkMode::Disconnect,
            Network::Remove => NetworkMode::Remove,
        },
        network_map,
        hosts: a.allow.clone(),
        disks_only: a.disks_only,
        prestage: match a.prestage {
            Prestage::Wait => PrestageMode::Wait,
            Prestage::Background => PrestageMode::Background,
            Prestage::Off => PrestageMode::Off,
        },
        target: a.for_hypervisor.map(|h| match h {
            For::Kvm => Hypervisor::Kvm,
            For::Esxi => Hypervisor::Esxi,
        }),
        disk_bus: match a.disk_bus {
            Bus::Auto => DiskBus::Auto,
            Bus::Virtio => DiskBus::Virtio,
            Bus::Scsi => DiskBus::Scsi,
            Bus::Sata => DiskBus::Sata,
            Bus::Ide => DiskBus::Ide,
        },
        nic_model: match a.nic_model {
            Model::Auto => NicModel::Auto,
            Model::Virtio => NicModel::Virtio,
            Model::E1000e => NicModel::E1000e,
            Model::E1000 => NicModel::E1000,
            Model::Vmxnet3 => NicModel::Vmxnet3,
        },
    };
    let client = Client::from_state(&a.state.state)?;
    let mut reply: MountReply = client
        .clone()
        .request(
            "POST",
            "/v1/mounts".into(),
            Some(serde_json::to_value(&req)?),
        )
        .await?;
    if a.prestage == Prestage::Wait {
        if let Some(boot) =
            wait_for_prestage(&client, &reply.mount.spec.name, timeout, a.json).await?
        {
            reply.mount.boot = boot;
        }
    }
    if a.json {
        super::print_json(&reply)?;
        return Ok(ExitCode::SUCCESS);
    }
    let m = &reply.mount;
    println!(
        "mounted {} as {}{}{}",
        m.spec.snapshot_name,
        m.spec.name,
        if m.spec.disks_only {
            ", disks only"
        } else {
            ""
        },
        if m.spec.read_only { " (read-only)" } else { "" }
    );
    for f in &m.files {
        println!("  {:<40} {:>10}", f.name, human(f.size));
    }
    let (label, lines) = match m.hypervisor {
        crate::vmconfig::Hypervisor::Esxi => ("ESXi:", &reply.attach.esxi),
        crate::vmconfig::Hypervisor::Kvm => ("KVM:", &reply.attach.kvm),
    };
    if !lines.is_empty() {
        println!("{label}");
        for c in lines {
            println!("  {c}");
        }
    }
    if let Some(from) = m.converted_from {
        println!(
            "converted from {from} for {}{}:",
            m.hypervisor,
            if m.spec.disks_only {
                " (disks only: the files above are named for it)"
            } else {
                ""
            }
        );
        for d in m.devices.iter().filter(|d| !d.is_dropped()) {
            println!("  {d}");
        }
        let dropped: Vec<_> = m.devices.iter().filter(|d| d.is_dropped()).collect();
        if !dropped.is_empty() {
            println!("not carried over:");
            for d in dropped {
                println!("  {d}");
            }
        }
    }
    if !m.spec.disks_only && !m.network.is_empty() {
        println!("network ({}):", m.spec.network.as_str());
        for nic in &m.network {
            println!("  {nic}");
        }
    }
    println!("disks:");
    for u in &reply.attach.disk_urls {
        println!("  {u}");
    }
    if !reply.attach.block.is_empty() {
        println!("block devices:");
        for c in &reply.attach.block {
            println!("  {c}");
        }
    }
    match &m.boot.prestage {
        Some(p) => println!("pre-staging: {}", describe_prestage(p)),
        None if a.prestage != Prestage::Off => {
            println!("pre-staging: no boot profile for this VM yet (its first boot here makes one)")
        }
        None => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// One line about pre-staging, for `mount` and `mounts`.
pub fn describe_prestage(p: &PrestageStatus) -> String {
    let from = match &p.source {
        Source::Own { vm } => format!("profile of {vm}"),
        Source::Borrowed { vm, shared_percent } => {
            format!("profile of {vm} ({shared_percent}% of its boot blocks shared)")
        }
    };
    format!(
        "{}/{} chunks ({}) from the {from}{}{}",
        p.done(),
        p.chunks,
        human(p.bytes),
        if p.cached > 0 {
            format!(", {} cached already", p.cached)
        } else {
            String::new()
        },
        if p.finished {
            format!(", done in {:.1} s", p.seconds)
        } else {
            ", running".into()
        }
    )
}

/// Polls the mount until its boot set is cached or `timeout` passes, with a progress bar.
/// `None`: the mount has nothing to pre-stage.
async fn wait_for_prestage(
    client: &Client,
    name: &str,
    timeout: Duration,
    quiet: bool,
) -> anyhow::Result<Option<BootInfo>> {
    let bar = Bar::new("pre-staging", false, quiet);
    let deadline = Instant::now() + timeout;
    loop {
        let mounts: Vec<MountInfo> = client
            .clone()
            .request("GET", "/v1/mounts".into(), None)
            .await?;
        let Some(m) = mounts.into_iter().find(|m| m.spec.name == name) else {
            anyhow::bail!("mount {name} went away while its boot set was pre-staged");
        };
        let Some(p) = &m.boot.prestage else {
            bar.finish();
            return Ok(None);
        };
        bar.set_total(p.chunks);
        bar.set_position(p.done());
        if p.finished {
            bar.finish();
            return Ok(Some(m.boot));
        }
        if Instant::now() >= deadline {
            bar.finish();
            eprintln!(
                "warning: pre-staging of {name} not finished after {:.0} s; it goes on in the background",
                timeout.as_secs_f64()
            );
            return Ok(Some(m.boot));
        }
        // Polled often: the VM is started right after this returns.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_map_entries_are_old_equals_new() {
        assert_eq!(
            parse_map_entry("default=lab"),
            Ok(("default".to_owned(), "lab".to_owned()))
        );
        assert_eq!(
            parse_map_entry("VM Network=Isolated Lab"),
            Ok(("VM Network".to_owned(), "Isolated Lab".to_owned()))
        );
        for bad in ["default", "=lab", "default=", "a=b=c", ""] {
            let err = parse_map_entry(bad).unwrap_err();
            assert!(err.contains("is not OLD=NEW"), "{bad}: {err}");
        }
    }
}
