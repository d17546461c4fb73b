//! Converting a VM's config to the other hypervisor (`mount --for kvm|esxi`): a `.vmx` becomes
//! libvirt domain XML, domain XML becomes a `.vmx`, with a report of what each device became
//! and of what could not come along (decision 0023; the table is in docs/conversion.md).
//!
//! Owns: the choice of bus per disk ([`DiskBus`]) and of NIC model ([`NicModel`]) on the
//! other side, and the checks that the result fits it (slots per controller). The conversion
//! keeps the source's identity, MAC addresses and network names: the live-mount rewrite
//! ([`super::rewrite_for_mount_reported`]) then gives the result its new name, UUID and MACs
//! and applies the network plan, exactly as for a config of the backup's own hypervisor.
//! Must not: do I/O, or drop a device without a line in the report.

mod machine;
mod to_libvirt;
mod to_vmx;

use super::{Hypervisor, VmConfig, VmConfigError};

/// `mount --for`: the hypervisor the config is for, and how disks and NICs are mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversion {
    pub to: Hypervisor,
    #[serde(default)]
    pub disk_bus: DiskBus,
    #[serde(default)]
    pub nic_model: NicModel,
}

impl Conversion {
    /// Whether the target has the bus and NIC model asked for: `Err` names the option and
    /// what to use instead.
    pub fn check(&self) -> Result<(), String> {
        match (self.to, self.disk_bus, self.nic_model) {
            (Hypervisor::Esxi, DiskBus::Virtio, _) => Err(
                "--disk-bus virtio: ESXi has no virtio disks; use scsi (pvscsi) or sata".to_owned(),
            ),
            (Hypervisor::Esxi, _, NicModel::Virtio) => {
                Err("--nic-model virtio: ESXi has no virtio NICs; use e1000e or vmxnet3".to_owned())
            }
            (Hypervisor::Kvm, DiskBus::Ide, _) => Err(
                "--disk-bus ide: libvirt's q35 machine has no IDE controller; use sata".to_owned(),
            ),
            _ => Ok(()),
        }
    }
}

/// The bus the converted config puts disks on (`--disk-bus`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// The source's controller where the other side has it (pvscsi, LSI Logic, LSI SAS, SATA;
    /// IDE on ESXi), otherwise SATA, which every guest OS of the last two decades can boot
    /// from.
    #[default]
    Auto,
    /// virtio-blk (KVM only).
    Virtio,
    /// KVM: virtio-scsi; ESXi: pvscsi.
    Scsi,
    Sata,
    /// ESXi only (libvirt's q35 machine has no IDE).
    Ide,
}

impl DiskBus {
    /// `auto`, the default.
    pub fn is_auto(&self) -> bool {
        *self == DiskBus::Auto
    }
}

impl std::str::FromStr for DiskBus {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(DiskBus::Auto),
            "virtio" => Ok(DiskBus::Virtio),
            "scsi" => Ok(DiskBus::Scsi),
            "sata" => Ok(DiskBus::Sata),
            "ide" => Ok(DiskBus::Ide),
            _ => Err(format!(
                "disk bus {text:?} is not one of auto, virtio, scsi, sata, ide"
            )),
        }
    }
}

/// The NIC model of the converted config (`--nic-model`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// e1000e on both sides: every Windows since 2012 and every Linux has its driver, which
    /// is not true of vmxnet3 on KVM's guests or of virtio on ESXi's.
    #[default]
    Auto,
    /// virtio-net (KVM only).
    Virtio,
    E1000e,
    E1000,
    Vmxnet3,
}

impl NicModel {
    /// `auto`, the default.
    pub fn is_auto(&self) -> bool {
        *self == NicModel::Auto
    }
}

impl std::str::FromStr for NicModel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(NicModel::Auto),
            "virtio" => Ok(NicModel::Virtio),
            "e1000e" => Ok(NicModel::E1000e),
            "e1000" => Ok(NicModel::E1000),
            "vmxnet3" => Ok(NicModel::Vmxnet3),
            _ => Err(format!(
                "NIC model {text:?} is not one of auto, virtio, e1000e, e1000, vmxnet3"
            )),
        }
    }
}

/// What one device of the source became, or why it did not come along.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceReport {
    /// The device as the source names it: `scsi0:1`, `vda`, `ethernet0`, `vtpm`, `firmware`.
    pub device: String,
    /// What it was: `pvscsi disk`, `vmxnet3 NIC`, `virtual TPM`.
    pub from: String,
    /// What it is in the converted config; None when it was left behind.
    #[serde(default)]
    pub to: Option<String>,
    /// Why, or what to do.
    #[serde(default)]
    pub note: Option<String>,
}

impl DeviceReport {
    /// True for a device the converted config does not have.
    pub fn is_dropped(&self) -> bool {
        self.to.is_none()
    }
}

impl std::fmt::Display for DeviceReport {
    /// `scsi0:1 (pvscsi disk) -> sdb on a vmpvscsi SCSI controller` or
    /// `vtpm (virtual TPM): not carried over: ...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.device, self.from)?;
        if let Some(to) = &self.to {
            write!(f, " -> {to}")?;
        }
        if let Some(note) = &self.note {
            write!(f, ": {note}")?;
        }
        Ok(())
    }
}

/// What a renderer makes of a [`machine::Machine`].
struct Rendered {
    bytes: Vec<u8>,
    /// Each source disk's place in the result.
    slots: Vec<String>,
    /// A line per disk, NIC and setting that carried over.
    report: Vec<DeviceReport>,
}

/// A converted config, before the live-mount rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Converted {
    /// The config in the other format, with the source's identity and networks.
    pub(super) bytes: Vec<u8>,
    /// For each disk of the converted config, in the order [`super::parse`] lists them: the
    /// index of the source disk it is.
    pub(super) order: Vec<usize>,
    /// For each source disk: where it sits in the converted config (`sata0:0`, `sdb`).
    pub(super) slots: Vec<String>,
    pub(super) devices: Vec<DeviceReport>,
}

/// Converts `original` (parsed as `config`) as `how` says; `disk_files[i]` is the file the
/// converted config names for source disk `i` (a `.vmdk` descriptor for ESXi, a path for
/// libvirt, which the mount rewrite then makes a network disk).
///
/// Errors: the conversion is to the config's own hypervisor, a bus or model the target lacks
/// (`--disk-bus virtio` for ESXi), more disks than the target's controllers take, or a
/// setting of the source that cannot be read.
pub(super) fn convert(
    file: &str,
    original: &[u8],
    config: &VmConfig,
    how: &Conversion,
    disk_files: &[String],
) -> Result<Converted, VmConfigError> {
    let invalid = |what: String| VmConfigError::Invalid {
        file: file.to_owned(),
        what,
    };
    if how.to == config.hypervisor {
        return Err(invalid(format!(
            "the config is already for {}; nothing to convert",
            how.to
        )));
    }
    if disk_files.len() != config.disks.len() {
        return Err(invalid(format!(
            "{} disk files given for {} disks",
            disk_files.len(),
            config.disks.len()
        )));
    }
    let machine = match config.hypervisor {
        Hypervisor::Esxi => machine::from_vmx(file, original, config)?,
        Hypervisor::Kvm => machine::from_libvirt(file, original, config)?,
    };
    let Rendered {
        bytes,
        slots,
        report: mut devices,
    } = match how.to {
        Hypervisor::Kvm => to_libvirt::render(&machine, how, disk_files).map_err(invalid)?,
        Hypervisor::Esxi => to_vmx::render(&machine, how, disk_files).map_err(invalid)?,
    };
    devices.extend(machine.dropped);
    // The result must read back as a config of the target with the same disks: the mount
    // rewrite and the hypervisor both rely on it.
    let back = super::parse(file, &bytes).map_err(|e| {
        invalid(format!(
            "the converted config does not read back ({e}); this is a livemount bug"
        ))
    })?;
    let order = back
        .disks
        .iter()
        .map(|d| {
            disk_files
                .iter()
                .position(|f| *f == d.path)
                .ok_or_else(|| invalid(format!("converted disk {} is not one given", d.path)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = order.clone();
    seen.sort_unstable();
    seen.dedup();
    if back.hypervisor != how.to || seen.len() != disk_files.len() {
        return Err(invalid(
            "the converted config lost or repeated a disk; this is a livemount bug".to_owned(),
        ));
    }
    Ok(Converted {
        bytes,
        order,
        slots,
        devices,
    })
}

/// Letters of the `n`th drive (from 0): a..z, aa..az, ...: `sda`, `vdab`.
fn drive_letters(n: usize) -> String {
    let mut n = n;
    let mut out = Vec::new();
    loop {
        out.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests;
