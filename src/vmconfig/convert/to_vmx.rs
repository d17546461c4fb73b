//! A [`Machine`] as a `.vmx`, for ESXi: virtual hardware 19 (ESXi 7.0 U2 and later), firmware
//! BIOS or EFI with secure boot as the source had it, disks on SCSI, SATA, IDE or NVMe slots
//! naming the VMDK descriptors the mount serves, NICs on port groups of the source's network
//! names (the network plan maps or disconnects them).
//!
//! Must not: invent identity (name and UUID are the source's until the rewrite, which also
//! gives every NIC its new static address).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::super::vmx::escape;
use super::machine::{Controller, Firmware, Machine};
use super::{Conversion, DeviceReport, DiskBus, NicModel, Rendered};

/// Where one disk goes on ESXi.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Bus {
    /// A SCSI controller with this `virtualDev`.
    Scsi(&'static str),
    Sata,
    Ide,
    Nvme,
}

/// Controllers of one kind a VM may have: two IDE channels, four of the others.
fn controllers(bus: Bus) -> u32 {
    match bus {
        Bus::Ide => 2,
        _ => 4,
    }
}

fn bus_for(controller: &Controller, how: DiskBus) -> Result<(Bus, Option<&'static str>), String> {
    Ok(match how {
        DiskBus::Virtio => {
            return Err(
                "--disk-bus virtio: ESXi has no virtio disks; use scsi (pvscsi) or sata".to_owned(),
            )
        }
        DiskBus::Scsi => (Bus::Scsi("pvscsi"), None),
        DiskBus::Sata => (Bus::Sata, None),
        DiskBus::Ide => (Bus::Ide, None),
        DiskBus::Auto => match controller {
            Controller::Virtio => (
                Bus::Sata,
                Some(
                    "ESXi has no virtio; every guest boots from SATA (--disk-bus scsi gives \
                     pvscsi, for guests that have its driver)",
                ),
            ),
            Controller::Scsi(model) => match model.as_str() {
                "pvscsi" | "vmpvscsi" => (Bus::Scsi("pvscsi"), None),
                "lsisas1068" => (Bus::Scsi("lsisas1068"), None),
                "lsilogic" => (
                    Bus::Sata,
                    Some(
                        "QEMU's lsilogic is a 53C895A, ESXi's an LSI 53C1030 (another \
                         driver): SATA, which every guest boots from",
                    ),
                ),
                _ => (
                    Bus::Sata,
                    Some("ESXi has no such SCSI controller; every guest boots from SATA"),
                ),
            },
            Controller::Sata => (Bus::Sata, None),
            Controller::Ide => (Bus::Ide, None),
            Controller::Nvme => (Bus::Nvme, None),
            Controller::Other(_) => (Bus::Sata, None),
        },
    })
}

/// The unit numbers a controller offers, in order (SCSI skips 7, the controller's own).
fn units(bus: Bus) -> Vec<u32> {
    match bus {
        Bus::Scsi("pvscsi") => (0..64).filter(|&u| u != 7).collect(),
        Bus::Scsi(_) => (0..16).filter(|&u| u != 7).collect(),
        Bus::Sata => (0..30).collect(),
        Bus::Ide => vec![0, 1],
        Bus::Nvme => (0..15).collect(),
    }
}

fn prefix(bus: Bus) -> &'static str {
    match bus {
        Bus::Scsi(_) => "scsi",
        Bus::Sata => "sata",
        Bus::Ide => "ide",
        Bus::Nvme => "nvme",
    }
}

/// NICs an ESXi VM may have.
const MAX_NICS: usize = 10;

/// ESXi's `guestOS` for the guest the source describes.
fn guest_os(m: &Machine) -> (&'static str, Option<&'static str>) {
    if m.windows {
        return (
            "windows2019srvNext-64",
            Some("a Windows guest of unstated version: Windows Server 2022 assumed"),
        );
    }
    let id = match m.linux.as_deref() {
        Some("debian10") => "debian10-64",
        Some("debian11") => "debian11-64",
        Some("debian12") => "debian12-64",
        Some("rhel7") => "rhel7-64",
        Some("rhel8") => "rhel8-64",
        Some("rhel9" | "rhel") => "rhel9-64",
        Some("centos7") => "centos7-64",
        Some("centos8") => "centos8-64",
        Some("centos9") => "centos9-64",
        Some("sles12") => "sles12-64",
        Some("sles15") => "sles15-64",
        Some("ubuntu") => "ubuntu-64",
        Some("fedora") => "fedora-64",
        _ => {
            return (
                "other5xlinux-64",
                Some("the domain does not say which OS; set guestOS if it is not Linux"),
            )
        }
    };
    (id, None)
}

/// The `.vmx`, each disk's slot (`sata0:1`), and a report line per disk and NIC.
pub(super) fn render(
    m: &Machine,
    how: &Conversion,
    disk_files: &[String],
) -> Result<Rendered, String> {
    let mut report = Vec::new();
    let mut x = String::new();
    let mut put = |key: &str, value: &str| {
        let _ = writeln!(x, "{key} = \"{}\"", escape(value));
    };
    put(".encoding", "UTF-8");
    put("config.version", "8");
    put("virtualHW.version", "19");
    put("displayName", &m.name);
    put(
        "annotation",
        &format!("Converted by livemount from the KVM VM {:?}", m.name),
    );
    let (os, os_note) = guest_os(m);
    put("guestOS", os);
    report.push(DeviceReport {
        device: "guest OS".to_owned(),
        from: if m.windows {
            "Windows".to_owned()
        } else {
            m.linux.clone().unwrap_or_else(|| "not stated".to_owned())
        },
        to: Some(format!("guestOS = {os}")),
        note: os_note.map(str::to_owned),
    });
    // ESXi takes memory in multiples of 4 MB.
    let memory = (m.memory_mib / 4 * 4).max(4);
    put("memSize", &memory.to_string());
    if memory != m.memory_mib {
        report.push(DeviceReport {
            device: "memory".to_owned(),
            from: format!("{} MiB", m.memory_mib),
            to: Some(format!("memSize = {memory}")),
            note: Some("ESXi takes memory in multiples of 4 MB".to_owned()),
        });
    }
    put("numvcpus", &m.vcpus.to_string());
    put("cpuid.coresPerSocket", &m.cores_per_socket.to_string());
    match m.firmware {
        Firmware::Bios => put("firmware", "bios"),
        Firmware::Efi { secure_boot } => {
            put("firmware", "efi");
            if secure_boot {
                put("uefi.secureBoot.enabled", "TRUE");
            }
        }
    }
    report.push(DeviceReport {
        device: "firmware".to_owned(),
        from: match m.firmware {
            Firmware::Bios => "BIOS".to_owned(),
            Firmware::Efi { secure_boot: true } => "EFI, secure boot".to_owned(),
            Firmware::Efi { .. } => "EFI".to_owned(),
        },
        to: Some(match m.firmware {
            Firmware::Bios => "firmware = bios".to_owned(),
            Firmware::Efi { secure_boot: true } => {
                "firmware = efi, uefi.secureBoot.enabled = TRUE".to_owned()
            }
            Firmware::Efi { .. } => "firmware = efi".to_owned(),
        }),
        note: None,
    });
    if let Some(uuid) = &m.uuid {
        let hex: String = uuid.chars().filter(|c| *c != '-').collect();
        let pairs: Vec<&str> = (0..16).filter_map(|i| hex.get(i * 2..i * 2 + 2)).collect();
        if pairs.len() == 16 {
            put(
                "uuid.bios",
                &format!("{}-{}", pairs[..8].join(" "), pairs[8..].join(" ")),
            );
        }
    }
    put("pciBridge0.present", "TRUE");
    for bridge in 4..8 {
        put(&format!("pciBridge{bridge}.present"), "TRUE");
        put(&format!("pciBridge{bridge}.virtualDev"), "pcieRootPort");
        put(&format!("pciBridge{bridge}.functions"), "8");
    }
    put("svga.present", "TRUE");
    put("tools.syncTime", "FALSE");

    // Controllers: (kind, number) -> units left; filled in the source's disk order.
    let mut open: BTreeMap<Bus, (u32, usize)> = BTreeMap::new();
    let mut used_numbers: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut made: Vec<(Bus, u32)> = Vec::new();
    let mut slots = Vec::new();
    let mut first_boot = None;
    let boot_disk = m
        .disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.boot_order.map(|o| (o, i)))
        .min()
        .map_or(0, |(_, i)| i);
    let mut disk_lines = String::new();
    for (i, (disk, file)) in m.disks.iter().zip(disk_files).enumerate() {
        let (bus, why) = bus_for(&disk.controller, how.disk_bus)?;
        let offered = units(bus);
        let full = open
            .get(&bus)
            .is_none_or(|&(_, next)| next == offered.len());
        if full {
            let kind = prefix(bus);
            let number = used_numbers.entry(kind).or_insert(0);
            if *number == controllers(bus) {
                return Err(format!(
                    "disk {}: the {} {kind} controllers ESXi allows are full; choose a bus \
                     with room for every disk (--disk-bus sata: 120, scsi: 252)",
                    disk.device,
                    controllers(bus)
                ));
            }
            open.insert(bus, (*number, 0));
            made.push((bus, *number));
            *number += 1;
        }
        let Some(entry) = open.get_mut(&bus) else {
            return Err("a controller vanished; this is a livemount bug".to_owned());
        };
        let slot = format!("{}{}:{}", prefix(bus), entry.0, offered[entry.1]);
        entry.1 += 1;
        let _ = writeln!(disk_lines, "{slot}.present = \"TRUE\"");
        match bus {
            Bus::Scsi(_) => {
                let _ = writeln!(disk_lines, "{slot}.deviceType = \"scsi-hardDisk\"");
            }
            Bus::Ide => {
                let _ = writeln!(disk_lines, "{slot}.deviceType = \"ata-hardDisk\"");
            }
            Bus::Sata | Bus::Nvme => {}
        }
        let _ = writeln!(disk_lines, "{slot}.fileName = \"{}\"", escape(file));
        let to = match bus {
            Bus::Scsi(dev) => format!("{slot} on a {dev} SCSI controller"),
            Bus::Sata => format!("{slot} on SATA"),
            Bus::Ide => format!("{slot} on IDE"),
            Bus::Nvme => format!("{slot} on NVMe"),
        };
        report.push(DeviceReport {
            device: disk.device.clone(),
            from: format!("{} disk", disk.controller.label()),
            to: Some(to),
            note: why.map(str::to_owned),
        });
        if i == boot_disk {
            first_boot = Some(slot.clone());
        }
        slots.push(slot);
    }
    for (bus, number) in &made {
        let kind = prefix(*bus);
        put(&format!("{kind}{number}.present"), "TRUE");
        if let Bus::Scsi(dev) = bus {
            put(&format!("{kind}{number}.virtualDev"), dev);
        }
    }
    x.push_str(&disk_lines);
    let mut put = |key: &str, value: &str| {
        let _ = writeln!(x, "{key} = \"{}\"", escape(value));
    };
    if let (Firmware::Bios, Some(slot)) = (m.firmware, &first_boot) {
        put("bios.hddOrder", slot);
    }

    let model = match how.nic_model {
        NicModel::Auto | NicModel::E1000e => "e1000e",
        NicModel::E1000 => "e1000",
        NicModel::Vmxnet3 => "vmxnet3",
        NicModel::Virtio => {
            return Err(
                "--nic-model virtio: ESXi has no virtio NICs; use e1000e or vmxnet3".to_owned(),
            )
        }
    };
    for (n, nic) in m.nics.iter().enumerate() {
        if n >= MAX_NICS {
            report.push(DeviceReport {
                device: nic.label.clone(),
                from: format!("{} NIC", nic.model),
                to: None,
                note: Some(format!("not carried over: ESXi takes {MAX_NICS} NICs")),
            });
            continue;
        }
        let key = |attribute: &str| format!("ethernet{n}.{attribute}");
        put(&key("present"), "TRUE");
        put(&key("virtualDev"), model);
        if let Some(network) = &nic.network {
            put(&key("networkName"), network);
        }
        put(&key("addressType"), "generated");
        put(
            &key("startConnected"),
            if nic.connected { "TRUE" } else { "FALSE" },
        );
        report.push(DeviceReport {
            device: nic.label.clone(),
            from: format!("{} NIC", nic.model),
            to: Some(format!(
                "ethernet{n}, {model}{}",
                nic.network
                    .as_deref()
                    .map_or(String::new(), |p| format!(" on port group {p}"))
            )),
            note: None,
        });
    }
    Ok(Rendered {
        bytes: x.into_bytes(),
        slots,
        report,
    })
}
