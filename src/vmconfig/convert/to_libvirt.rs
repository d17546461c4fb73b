//! A [`Machine`] as libvirt domain XML, for KVM: machine type q35, firmware BIOS or EFI with
//! secure boot as the source had it, disks as file disks (the mount rewrite makes them NFS
//! network disks), NICs on networks of the source's names (the network plan maps or detaches
//! them), a serial console, VGA and VNC.
//!
//! Must not: invent identity (name, UUID and MACs are the source's until the rewrite).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use quick_xml::escape::escape;

use super::machine::{Controller, Firmware, Machine};
use super::{drive_letters, Conversion, DeviceReport, DiskBus, NicModel, Rendered};

/// Where one disk goes on KVM.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bus {
    Virtio,
    Sata,
    /// A SCSI controller of this libvirt model.
    Scsi(&'static str),
}

/// SCSI targets a controller of this model takes, one disk each (QEMU's pvscsi takes 64,
/// mptsas1068 8, megasas 64; virtio-scsi many more).
fn targets_per_controller(model: &str) -> usize {
    match model {
        "virtio-scsi" | "vmpvscsi" | "lsisas1078" => 64,
        _ => 8,
    }
}

fn bus_for(controller: &Controller, how: DiskBus) -> Result<(Bus, Option<&'static str>), String> {
    Ok(match how {
        DiskBus::Virtio => (Bus::Virtio, None),
        DiskBus::Sata => (Bus::Sata, None),
        DiskBus::Scsi => (Bus::Scsi("virtio-scsi"), None),
        DiskBus::Ide => {
            return Err(
                "--disk-bus ide: libvirt's q35 machine has no IDE controller; use sata".to_owned(),
            )
        }
        DiskBus::Auto => match controller {
            Controller::Virtio => (Bus::Virtio, None),
            Controller::Scsi(model) => match model.as_str() {
                "pvscsi" | "vmpvscsi" => (
                    Bus::Scsi("vmpvscsi"),
                    Some("needs a QEMU with pvscsi (RHEL's qemu-kvm has none: --disk-bus sata)"),
                ),
                "lsisas1068" => (
                    Bus::Scsi("lsisas1068"),
                    Some(
                        "needs a QEMU with mptsas1068 (RHEL's qemu-kvm has none: --disk-bus sata)",
                    ),
                ),
                "lsisas1078" => (Bus::Scsi("lsisas1078"), None),
                "virtio-scsi" => (Bus::Scsi("virtio-scsi"), None),
                "lsilogic" => (
                    Bus::Sata,
                    Some(
                        "QEMU has no LSI 53C1030 (its lsilogic is a 53C895A that current \
                         guests have no driver for): SATA, whose driver a guest must have in \
                         its boot image (a host-only initramfs or a Windows installed on SCSI \
                         may not)",
                    ),
                ),
                _ => (Bus::Sata, Some("QEMU has no such SCSI controller")),
            },
            Controller::Sata => (Bus::Sata, None),
            Controller::Ide => (Bus::Sata, Some("libvirt's q35 machine has no IDE")),
            Controller::Nvme => (
                Bus::Sata,
                Some("this libvirt has no NVMe disk bus; the guest needs an AHCI driver"),
            ),
            Controller::Other(_) => (Bus::Sata, None),
        },
    })
}

fn nic_model(how: NicModel) -> &'static str {
    match how {
        NicModel::Auto | NicModel::E1000e => "e1000e",
        NicModel::Virtio => "virtio",
        NicModel::E1000 => "e1000",
        NicModel::Vmxnet3 => "vmxnet3",
    }
}

/// The domain XML, each disk's target device, and a report line per disk and NIC.
pub(super) fn render(
    m: &Machine,
    how: &Conversion,
    disk_files: &[String],
) -> Result<Rendered, String> {
    let mut report = Vec::new();
    let mut x = String::new();
    let secure = matches!(m.firmware, Firmware::Efi { secure_boot: true });
    let _ = writeln!(x, "<domain type='kvm'>");
    let _ = writeln!(x, "  <name>{}</name>", escape(&m.name));
    if let Some(uuid) = &m.uuid {
        let _ = writeln!(x, "  <uuid>{uuid}</uuid>");
    }
    let _ = writeln!(
        x,
        "  <description>{}</description>",
        escape(format!(
            "Converted by livemount from the ESXi VM {:?}",
            m.name
        ))
    );
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", m.memory_mib);
    let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", m.vcpus);
    match m.firmware {
        Firmware::Bios => {
            let _ = writeln!(
                x,
                "  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n  </os>"
            );
        }
        Firmware::Efi { secure_boot } => {
            let on = if secure_boot { "yes" } else { "no" };
            let _ = writeln!(
                x,
                "  <os firmware='efi'>\n    <type arch='x86_64' machine='q35'>hvm</type>\n    \
                 <firmware>\n      <feature enabled='{on}' name='secure-boot'/>\n      \
                 <feature enabled='{on}' name='enrolled-keys'/>\n    </firmware>\n  </os>"
            );
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
            Firmware::Bios => "SeaBIOS on a q35 machine".to_owned(),
            Firmware::Efi { secure_boot: true } => {
                "OVMF with secure boot and Microsoft's keys enrolled (SMM on), q35".to_owned()
            }
            Firmware::Efi { .. } => "OVMF without secure boot, q35".to_owned(),
        }),
        note: None,
    });
    let _ = writeln!(x, "  <features>\n    <acpi/>\n    <apic/>");
    if m.windows {
        let _ = writeln!(
            x,
            "    <hyperv mode='custom'>\n      <relaxed state='on'/>\n      \
             <vapic state='on'/>\n      <spinlocks state='on' retries='8191'/>\n    </hyperv>"
        );
    }
    if secure {
        let _ = writeln!(x, "    <smm state='on'/>");
    }
    let _ = writeln!(x, "  </features>");
    let sockets = m.vcpus / m.cores_per_socket;
    let _ = writeln!(
        x,
        "  <cpu mode='host-model'>\n    <topology sockets='{sockets}' dies='1' cores='{}' \
         threads='1'/>\n  </cpu>",
        m.cores_per_socket
    );
    let clock = if m.windows { "localtime" } else { "utc" };
    let _ = writeln!(x, "  <clock offset='{clock}'/>");
    let _ = writeln!(
        x,
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  \
         <on_crash>destroy</on_crash>"
    );
    let _ = writeln!(x, "  <devices>");

    // Boot order: the disk the source boots first, then the rest in the source's order.
    let first = m
        .disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.boot_order.map(|o| (o, i)))
        .min()
        .map_or(0, |(_, i)| i);
    let mut boot = 1;
    let mut boot_of = vec![0; m.disks.len()];
    if !m.disks.is_empty() {
        boot_of[first] = boot;
        boot += 1;
    }
    for (i, order) in boot_of.iter_mut().enumerate() {
        if i != first {
            *order = boot;
            boot += 1;
        }
    }

    let (mut vd, mut sd) = (0usize, 0usize);
    // SCSI controllers by model: (index, units used) of the one being filled.
    let mut scsi: BTreeMap<&'static str, (usize, usize)> = BTreeMap::new();
    let mut controllers: Vec<(usize, &'static str)> = Vec::new();
    let mut slots = Vec::new();
    for (i, (disk, path)) in m.disks.iter().zip(disk_files).enumerate() {
        let (bus, why) = bus_for(&disk.controller, how.disk_bus)?;
        let (dev, bus_name, address, to) = match bus {
            Bus::Virtio => {
                let dev = format!("vd{}", drive_letters(vd));
                vd += 1;
                (
                    dev.clone(),
                    "virtio",
                    String::new(),
                    format!("{dev} (virtio-blk)"),
                )
            }
            Bus::Sata => {
                let dev = format!("sd{}", drive_letters(sd));
                sd += 1;
                (dev.clone(), "sata", String::new(), format!("{dev} on SATA"))
            }
            Bus::Scsi(model) => {
                let dev = format!("sd{}", drive_letters(sd));
                sd += 1;
                let next_index = controllers.len();
                let slot = scsi.entry(model).or_insert((next_index, 0));
                if slot.1 == targets_per_controller(model) {
                    *slot = (controllers.len(), 0);
                }
                if !controllers.iter().any(|(index, _)| *index == slot.0) {
                    controllers.push((slot.0, model));
                }
                let (index, n) = *slot;
                slot.1 += 1;
                // One disk per SCSI target, LUN 0: QEMU's pvscsi takes no other LUN, and
                // libvirt gives every model but lsilogic `scsi-id` from the target and `lun`
                // from the unit (virtio-scsi takes either).
                let (target, unit) = if model == "lsilogic" { (0, n) } else { (n, 0) };
                (
                    dev.clone(),
                    "scsi",
                    format!(
                        "\n      <address type='drive' controller='{index}' bus='0' \
                         target='{target}' unit='{unit}'/>"
                    ),
                    format!("{dev} on a {model} SCSI controller"),
                )
            }
        };
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
             <source file='{}'/>\n      <target dev='{dev}' bus='{bus_name}'/>{address}\n      \
             <boot order='{}'/>\n    </disk>",
            escape(path),
            boot_of[i]
        );
        report.push(DeviceReport {
            device: disk.device.clone(),
            from: format!("{} disk", disk.controller.label()),
            to: Some(to),
            note: why.map(str::to_owned),
        });
        slots.push(dev);
    }
    for (index, model) in &controllers {
        let _ = writeln!(
            x,
            "    <controller type='scsi' index='{index}' model='{model}'/>"
        );
    }
    let model = nic_model(how.nic_model);
    for nic in &m.nics {
        // A NIC on a port group is on the libvirt network of that name (which the network
        // plan maps or detaches); one that names none starts on the user network.
        let kind = if nic.network.is_some() {
            "network"
        } else {
            "user"
        };
        let _ = writeln!(x, "    <interface type='{kind}'>");
        if let Some(mac) = &nic.mac {
            let _ = writeln!(x, "      <mac address='{mac}'/>");
        }
        if let Some(network) = &nic.network {
            let _ = writeln!(x, "      <source network='{}'/>", escape(network));
        }
        let _ = writeln!(x, "      <model type='{model}'/>");
        if !nic.connected {
            let _ = writeln!(x, "      <link state='down'/>");
        }
        let _ = writeln!(x, "    </interface>");
        report.push(DeviceReport {
            device: nic.label.clone(),
            from: format!("{} NIC", nic.model),
            to: Some(format!(
                "{model} NIC on {}",
                nic.network
                    .as_deref()
                    .map_or("the user network".to_owned(), |n| format!("network {n}"))
            )),
            note: None,
        });
    }
    let _ = writeln!(
        x,
        "    <serial type='pty'>\n      <target port='0'/>\n    </serial>\n    \
         <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n    \
         <input type='tablet' bus='usb'/>\n    <graphics type='vnc' autoport='yes'/>\n    \
         <video>\n      <model type='vga'/>\n    </video>"
    );
    let _ = writeln!(x, "  </devices>\n</domain>");
    report.push(DeviceReport {
        device: "console".to_owned(),
        from: "VM console".to_owned(),
        to: Some("VGA on VNC, and a serial console (virsh console)".to_owned()),
        note: None,
    });
    Ok(Rendered {
        bytes: x.into_bytes(),
        slots,
        report,
    })
}
