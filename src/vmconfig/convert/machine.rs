//! A VM as both hypervisors can describe it ([`Machine`]), read from a `.vmx` or from libvirt
//! domain XML, with what cannot be described that way listed as it is read.
//!
//! Owns: which settings of each format carry over (memory, vCPUs and cores per socket,
//! firmware and secure boot, the disks' controllers, NICs, the guest's family) and which are
//! reported as left behind (passthrough devices, vTPM, encryption, CD-ROMs, snapshot state,
//! host tuning, devices the other side has no counterpart for).
//! Must not: decide what the other hypervisor gets (the renderers do), or do I/O.

use std::collections::{BTreeMap, BTreeSet};

use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::Event;
use quick_xml::Reader;

use super::super::vmx::{is_false, VmxDocument};
use super::super::{VmConfig, VmConfigError};
use super::DeviceReport;

/// The guest firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Firmware {
    Bios,
    Efi { secure_boot: bool },
}

/// The controller (or bus) a disk hangs on in the source config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Controller {
    /// libvirt `bus='virtio'` (virtio-blk).
    Virtio,
    /// A SCSI controller of this model, as the source names it: `.vmx` `virtualDev`
    /// (`pvscsi`, `lsilogic`, `lsisas1068`, `buslogic`) or libvirt `model` (`virtio-scsi`,
    /// `lsilogic`, `vmpvscsi`, ...).
    Scsi(String),
    Sata,
    Ide,
    Nvme,
    /// Anything else (libvirt `usb`, `sd`, `fdc`, ...), by its name.
    Other(String),
}

impl Controller {
    /// How a report names it: `pvscsi`, `virtio-scsi`, `sata`.
    pub(super) fn label(&self) -> String {
        match self {
            Controller::Virtio => "virtio".to_owned(),
            Controller::Scsi(model) => model.clone(),
            Controller::Sata => "sata".to_owned(),
            Controller::Ide => "ide".to_owned(),
            Controller::Nvme => "nvme".to_owned(),
            Controller::Other(name) => name.clone(),
        }
    }
}

/// One disk, in the source config's disk order ([`VmConfig::disks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Disk {
    /// `scsi0:1` or `vda`.
    pub(super) device: String,
    pub(super) controller: Controller,
    /// libvirt `<boot order='N'/>`, or the disk `.vmx` `bios.hddOrder` names first (1).
    pub(super) boot_order: Option<u32>,
}

/// One NIC the VM has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Nic {
    /// `ethernet0` or `interface 0`.
    pub(super) label: String,
    /// `vmxnet3`, `e1000e`, `virtio`, ...
    pub(super) model: String,
    /// The port group, network, bridge or device it is attached to, if it names one.
    pub(super) network: Option<String>,
    pub(super) mac: Option<String>,
    /// Connected at power-on.
    pub(super) connected: bool,
}

/// A VM's hardware as both formats can say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Machine {
    pub(super) name: String,
    pub(super) uuid: Option<String>,
    pub(super) memory_mib: u64,
    pub(super) vcpus: u32,
    pub(super) cores_per_socket: u32,
    pub(super) firmware: Firmware,
    /// The guest is Windows (its clock runs on local time; it has no virtio drivers unless
    /// someone installed them).
    pub(super) windows: bool,
    /// A Linux family and version if the source says (`debian12`, `rhel9`, `ubuntu`).
    pub(super) linux: Option<String>,
    pub(super) disks: Vec<Disk>,
    pub(super) nics: Vec<Nic>,
    /// What the conversion leaves behind, as it was read.
    pub(super) dropped: Vec<DeviceReport>,
}

/// Memory when a config does not say (VMware's and libvirt's examples).
const DEFAULT_MEMORY_MIB: u64 = 1024;
/// Most vCPUs either side takes (ESXi 8: 768, QEMU q35: 288 with x2APIC); more is an error.
const MAX_VCPUS: u32 = 288;

fn dropped(device: impl Into<String>, from: impl Into<String>, why: &str) -> DeviceReport {
    DeviceReport {
        device: device.into(),
        from: from.into(),
        to: None,
        note: Some(why.to_owned()),
    }
}

/// Reads a `.vmx` (already parsed into `config`).
pub(super) fn from_vmx(
    file: &str,
    bytes: &[u8],
    config: &VmConfig,
) -> Result<Machine, VmConfigError> {
    let doc = VmxDocument::parse(file, bytes)?;
    let invalid = |what: String| VmConfigError::Invalid {
        file: file.to_owned(),
        what,
    };
    let number = |key: &str| -> Result<Option<u64>, VmConfigError> {
        match doc.get(key) {
            None => Ok(None),
            Some(text) => text
                .trim()
                .parse::<u64>()
                .map(Some)
                .map_err(|_| invalid(format!("{key} = {text:?} is not a whole number"))),
        }
    };
    let is_true = |key: &str| doc.get(key).is_some_and(|v| !is_false(v));
    let mut dropped_list = Vec::new();

    let memory_mib = match number("memSize")? {
        Some(0) => return Err(invalid("memSize is 0".to_owned())),
        Some(mib) => mib,
        None => {
            dropped_list.push(DeviceReport {
                device: "memory".to_owned(),
                from: "no memSize".to_owned(),
                to: Some(format!("{DEFAULT_MEMORY_MIB} MiB")),
                note: Some("the .vmx does not say; set it before starting".to_owned()),
            });
            DEFAULT_MEMORY_MIB
        }
    };
    let vcpus = cpu_count(number("numvcpus")?.unwrap_or(1), "numvcpus").map_err(invalid)?;
    let cores = cpu_count(
        number("cpuid.coresPerSocket")?.unwrap_or(1),
        "cpuid.coresPerSocket",
    )
    .map_err(invalid)?;
    let cores_per_socket = if vcpus % cores == 0 { cores } else { 1 };
    let firmware = match doc.get("firmware").map(str::trim) {
        Some(fw) if fw.eq_ignore_ascii_case("efi") => Firmware::Efi {
            secure_boot: is_true("uefi.secureBoot.enabled"),
        },
        _ => Firmware::Bios,
    };
    let guest_os = doc.get("guestOS").unwrap_or("").to_ascii_lowercase();
    let windows = guest_os.starts_with("win");
    let linux = vmx_linux(&guest_os);

    // The disk the BIOS boots first: `bios.hddOrder = "scsi0:0,sata0:1"`.
    let first_boot = doc
        .get("bios.hddOrder")
        .and_then(|order| order.split(',').next())
        .map(|d| d.trim().to_ascii_lowercase());
    let mut disks = Vec::new();
    for disk in &config.disks {
        let device = disk.device.to_ascii_lowercase();
        let controller = if let Some(rest) = device.strip_prefix("scsi") {
            let bus = rest.split(':').next().unwrap_or("0");
            let model = doc
                .get(&format!("scsi{bus}.virtualDev"))
                .map(|m| m.trim().to_ascii_lowercase())
                .unwrap_or_else(|| "lsilogic".to_owned());
            if doc
                .get(&format!("scsi{bus}.sharedBus"))
                .is_some_and(|v| !v.trim().eq_ignore_ascii_case("none"))
            {
                dropped_list.push(dropped(
                    format!("scsi{bus}"),
                    "a shared SCSI bus",
                    "not carried over: the disk is no longer shared with other VMs",
                ));
            }
            Controller::Scsi(model)
        } else if device.starts_with("sata") {
            Controller::Sata
        } else if device.starts_with("ide") {
            Controller::Ide
        } else {
            Controller::Nvme
        };
        if is_snapshot_delta(&disk.path) {
            dropped_list.push(dropped(
                disk.device.clone(),
                format!("snapshot delta {}", disk.path),
                "the snapshot tree is not carried over: the disk holds the state it had at the \
                 backup, as one disk",
            ));
        }
        disks.push(Disk {
            boot_order: (first_boot.as_deref() == Some(device.as_str())).then_some(1),
            device: disk.device.clone(),
            controller,
        });
    }

    // Every numbered device, by kind: `ethernet0`, `pciPassthru1`, `serial0`, ...
    let mut numbered: BTreeMap<(String, u32), ()> = BTreeMap::new();
    let mut removables: BTreeSet<String> = BTreeSet::new();
    let mut encryption = false;
    for (key, entry) in doc.entries() {
        if key.starts_with("encryption.") || key == "datafilekey" {
            encryption = true;
        }
        for kind in ["ethernet", "pcipassthru", "serial", "parallel", "floppy"] {
            if let Some(rest) = key.strip_prefix(kind) {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if let Ok(n) = digits.parse::<u32>() {
                    if rest[digits.len()..].starts_with('.') {
                        numbered.insert((kind.to_owned(), n), ());
                    }
                }
            }
        }
        if let Some(slot) = key.strip_suffix(".devicetype") {
            let value = entry.value.to_ascii_lowercase();
            if value.contains("cdrom") || value == "scsi-passthru" {
                removables.insert(slot.to_owned());
            }
        }
    }
    for slot in removables {
        if doc.get(&format!("{slot}.present")).is_some_and(is_false) {
            continue;
        }
        let kind = doc.get(&format!("{slot}.deviceType")).unwrap_or("");
        let (what, why) = if kind.eq_ignore_ascii_case("scsi-passthru") {
            (
                "SCSI passthrough",
                "not carried over: a device of the old host",
            )
        } else {
            (
                "CD-ROM",
                "not carried over: its image or drive is not in the backup; add a drive by \
                 hand if the VM needs one",
            )
        };
        let source = doc.get(&format!("{slot}.fileName")).unwrap_or("");
        dropped_list.push(dropped(slot, format!("{what} {source}").trim_end(), why));
    }

    let mut nics = Vec::new();
    for (kind, n) in numbered.keys() {
        let key = |attribute: &str| format!("{kind}{n}.{attribute}");
        if !is_true(&key("present")) {
            continue;
        }
        match kind.as_str() {
            "ethernet" => {
                let model = doc
                    .get(&key("virtualDev"))
                    .map(|m| m.trim().to_ascii_lowercase())
                    .unwrap_or_else(|| "e1000".to_owned());
                if model == "sriov" || model.contains("passthru") {
                    dropped_list.push(dropped(
                        format!("ethernet{n}"),
                        format!("{model} NIC"),
                        "not carried over: a passthrough NIC belongs to the old host's hardware",
                    ));
                    continue;
                }
                let network = doc
                    .get(&key("networkName"))
                    .filter(|name| !name.is_empty())
                    .or_else(|| {
                        doc.get(&key("dvs.portgroupId"))
                            .filter(|name| !name.is_empty())
                    })
                    .map(str::to_owned);
                let mac = doc
                    .get(&key("address"))
                    .or_else(|| doc.get(&key("generatedAddress")))
                    .filter(|mac| is_mac(mac))
                    .map(str::to_ascii_lowercase);
                nics.push(Nic {
                    label: format!("ethernet{n}"),
                    model,
                    network,
                    mac,
                    connected: !doc.get(&key("startConnected")).is_some_and(is_false),
                });
            }
            "pcipassthru" => dropped_list.push(dropped(
                format!("pciPassthru{n}"),
                "PCI passthrough device",
                "not carried over: a device of the old host's hardware",
            )),
            "serial" | "parallel" => dropped_list.push(dropped(
                format!("{kind}{n}"),
                format!(
                    "{kind} port ({})",
                    doc.get(&key("fileType")).unwrap_or("device")
                ),
                "not carried over: its backing is on the old host",
            )),
            _ => dropped_list.push(dropped(
                format!("floppy{n}"),
                "floppy drive",
                "not carried over",
            )),
        }
    }
    if is_true("vtpm.present") {
        dropped_list.push(dropped(
            "vtpm",
            "virtual TPM",
            "not carried over: its secrets are sealed to the old host's key provider; \
             BitLocker or LUKS keys bound to the TPM will ask for their recovery key",
        ));
    }
    if encryption {
        dropped_list.push(dropped(
            "encryption",
            "VM encryption (encryption.*)",
            "not carried over: the served disks hold the backup's plain data",
        ));
    }
    if doc.get("checkpoint.vmState").is_some_and(|s| !s.is_empty()) {
        dropped_list.push(dropped(
            "checkpoint.vmState",
            "suspended state",
            "not carried over: the VM boots from its disks",
        ));
    }
    for controller in ["usb", "ehci", "usb_xhci", "sound"] {
        if is_true(&format!("{controller}.present")) {
            dropped_list.push(dropped(
                controller,
                if controller == "sound" {
                    "sound card"
                } else {
                    "USB controller"
                },
                "not carried over",
            ));
        }
    }
    if matches!(firmware, Firmware::Efi { .. }) {
        dropped_list.push(dropped(
            "nvram",
            "EFI variables",
            "not carried over: the firmware boots each disk's default loader \
             (\\EFI\\BOOT\\BOOTX64.EFI)",
        ));
    }
    for (key, what) in [
        ("vhv.enable", "nested virtualization (vhv.enable)"),
        ("vbs.enable", "virtualization-based security (vbs.enable)"),
        ("vvtd.enable", "virtual IOMMU (vvtd.enable)"),
        ("nvdimm0.present", "virtual NVDIMM"),
    ] {
        if is_true(key) {
            dropped_list.push(dropped(key, what, "not carried over"));
        }
    }
    if doc.entries().any(|(key, _)| {
        (key.starts_with("sched.cpu.")
            || key.starts_with("sched.mem.")
            || (key.starts_with("numa.") && !key.starts_with("numa.autosize.")))
            && !key.ends_with(".units")
    }) {
        dropped_list.push(dropped(
            "sched",
            "resource settings (sched.cpu.*, sched.mem.*, numa.*)",
            "not carried over: shares, reservations, limits and affinity are the old host's",
        ));
    }
    Ok(Machine {
        name: config.name.clone(),
        uuid: config.uuid.clone(),
        memory_mib,
        vcpus,
        cores_per_socket,
        firmware,
        windows,
        linux,
        disks,
        nics,
        dropped: dropped_list,
    })
}

fn cpu_count(n: u64, key: &str) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(format!("{key} = {n} is not between 1 and {MAX_VCPUS}")),
    }
}

/// `rhel9-64` -> `rhel9`, `debian12-64` -> `debian12`, `ubuntu-64` -> `ubuntu`,
/// `rockylinux-64` -> `rhel`; other Linux and non-Linux guests: None.
fn vmx_linux(guest_os: &str) -> Option<String> {
    let base = guest_os.strip_suffix("-64").unwrap_or(guest_os);
    for family in ["rhel", "centos", "debian", "ubuntu", "sles", "oraclelinux"] {
        if let Some(version) = base.strip_prefix(family) {
            if version.chars().all(|c| c.is_ascii_digit()) {
                return Some(format!("{family}{version}"));
            }
        }
    }
    if base.starts_with("rockylinux") || base.starts_with("almalinux") {
        return Some("rhel".to_owned());
    }
    None
}

/// `web01-000002.vmdk`: a snapshot's delta disk.
fn is_snapshot_delta(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    let Some(stem) = name.strip_suffix(".vmdk") else {
        return false;
    };
    match stem.rsplit_once('-') {
        Some((_, tail)) => tail.len() == 6 && tail.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// `xx:xx:xx:xx:xx:xx` in hex.
fn is_mac(text: &str) -> bool {
    let parts: Vec<&str> = text.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// An element of a small DOM of domain XML: enough to read a domain's devices.
#[derive(Debug, Default)]
struct Element {
    name: String,
    attributes: Vec<(String, String)>,
    children: Vec<Element>,
    text: String,
}

impl Element {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Local name (`libosinfo:os` -> `os`).
    fn local(&self) -> &str {
        self.name.rsplit(':').next().unwrap_or(&self.name)
    }
}

/// Reads domain XML (already known to be well-formed: [`super::super::parse`] read it) into
/// a small DOM.
fn read_tree(file: &str, text: &str) -> Result<Element, VmConfigError> {
    let err = |what: String| VmConfigError::Xml {
        file: file.to_owned(),
        what,
    };
    let mut reader = Reader::from_str(text.strip_prefix('\u{FEFF}').unwrap_or(text));
    let decoder = reader.decoder();
    let mut stack: Vec<Element> = vec![Element::default()];
    let open = |e: &quick_xml::events::BytesStart<'_>| -> Result<Element, VmConfigError> {
        let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        let mut attributes = Vec::new();
        for a in e.attributes() {
            let a = a.map_err(|e| err(e.to_string()))?;
            let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            let value = a
                .decode_and_unescape_value_with(decoder, resolve_xml_entity)
                .map_err(|e| err(e.to_string()))?
                .into_owned();
            attributes.push((key, value));
        }
        Ok(Element {
            name,
            attributes,
            ..Element::default()
        })
    };
    loop {
        match reader.read_event().map_err(|e| err(e.to_string()))? {
            Event::Start(e) => stack.push(open(&e)?),
            Event::Empty(e) => {
                let element = open(&e)?;
                if let Some(parent) = stack.last_mut() {
                    parent.children.push(element);
                }
            }
            Event::End(_) => {
                let element = stack.pop().ok_or_else(|| err("unbalanced".to_owned()))?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(element),
                    None => return Err(err("unbalanced".to_owned())),
                }
            }
            Event::Text(t) => {
                let text = t.decode().map_err(|e| err(e.to_string()))?;
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&text);
                }
            }
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref().map_err(|e| err(e.to_string()))? {
                    Some(ch) => ch.to_string(),
                    None => {
                        let name = r.decode().map_err(|e| err(e.to_string()))?;
                        resolve_xml_entity(&name).unwrap_or("").to_owned()
                    }
                };
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&resolved);
                }
            }
            Event::CData(t) => {
                let text = t.decode().map_err(|e| err(e.to_string()))?;
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&text);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let mut root = stack.pop().ok_or_else(|| err("unbalanced".to_owned()))?;
    root.children
        .pop()
        .filter(|d| d.name == "domain")
        .ok_or_else(|| err("no <domain> root element".to_owned()))
}

/// Device elements a conversion to ESXi replaces with the host's own (ESXi gives every VM a
/// console, video and input) or that carry nothing (the emulator path): not reported.
const REPLACED_DEVICES: [&str; 8] = [
    "emulator",
    "controller",
    "console",
    "input",
    "graphics",
    "video",
    "memballoon",
    "audio",
];

/// Reads libvirt domain XML (already parsed into `config`).
pub(super) fn from_libvirt(
    file: &str,
    bytes: &[u8],
    config: &VmConfig,
) -> Result<Machine, VmConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|e| VmConfigError::Xml {
        file: file.to_owned(),
        what: e.to_string(),
    })?;
    let domain = read_tree(file, text)?;
    let invalid = |what: String| VmConfigError::Invalid {
        file: file.to_owned(),
        what,
    };
    let mut dropped_list = Vec::new();

    let memory_mib = match domain.child("memory") {
        None => {
            dropped_list.push(DeviceReport {
                device: "memory".to_owned(),
                from: "no <memory>".to_owned(),
                to: Some(format!("{DEFAULT_MEMORY_MIB} MiB")),
                note: Some("the domain does not say; set it before starting".to_owned()),
            });
            DEFAULT_MEMORY_MIB
        }
        Some(m) => {
            memory_mib(m.text.trim(), m.attribute("unit").unwrap_or("KiB")).ok_or_else(|| {
                invalid(format!(
                    "<memory unit='{}'>{}</memory> is not a memory size of at least 1 MiB",
                    m.attribute("unit").unwrap_or("KiB"),
                    m.text.trim()
                ))
            })?
        }
    };
    let vcpus = match domain.child("vcpu") {
        None => 1,
        Some(v) => {
            let n = v.text.trim().parse::<u64>().map_err(|_| {
                invalid(format!(
                    "<vcpu>{}</vcpu> is not a whole number",
                    v.text.trim()
                ))
            })?;
            cpu_count(n, "<vcpu>").map_err(invalid)?
        }
    };
    let cores_per_socket = domain
        .child("cpu")
        .and_then(|c| c.child("topology"))
        .map(|t| {
            let n = |k: &str| t.attribute(k).and_then(|v| v.parse::<u32>().ok());
            n("cores")
                .unwrap_or(1)
                .saturating_mul(n("threads").unwrap_or(1))
        })
        .filter(|&c| c >= 1 && vcpus % c == 0)
        .unwrap_or(1);
    let os = domain.child("os");
    let loader = os.and_then(|o| o.child("loader"));
    let efi = os.and_then(|o| o.attribute("firmware")) == Some("efi")
        || loader.is_some_and(|l| {
            let path = l.text.to_ascii_lowercase();
            l.attribute("type") == Some("pflash")
                || path.contains("ovmf")
                || path.contains("edk2")
                || path.contains("aavmf")
        });
    let secure_boot = loader.is_some_and(|l| l.attribute("secure") == Some("yes"))
        || os.and_then(|o| o.child("firmware")).is_some_and(|f| {
            f.children("feature").any(|feature| {
                feature.attribute("name") == Some("secure-boot")
                    && feature.attribute("enabled") == Some("yes")
            })
        });
    let firmware = if efi {
        Firmware::Efi { secure_boot }
    } else {
        Firmware::Bios
    };
    let os_id = domain
        .child("metadata")
        .and_then(|m| m.children.iter().find(|c| c.local() == "libosinfo"))
        .and_then(|l| l.children.iter().find(|c| c.local() == "os"))
        .and_then(|o| o.attribute("id"))
        .unwrap_or("")
        .to_ascii_lowercase();
    let windows = os_id.contains("microsoft.com")
        || domain
            .child("features")
            .is_some_and(|f| f.child("hyperv").is_some())
        || domain
            .child("clock")
            .is_some_and(|c| c.attribute("offset") == Some("localtime"));
    let linux = osinfo_linux(&os_id);

    let no_devices = Element::default();
    let devices = domain.child("devices").unwrap_or(&no_devices);
    let scsi_models: BTreeMap<String, String> = devices
        .children("controller")
        .filter(|c| c.attribute("type") == Some("scsi"))
        .map(|c| {
            (
                c.attribute("index").unwrap_or("0").to_owned(),
                c.attribute("model").unwrap_or("lsilogic").to_owned(),
            )
        })
        .collect();

    let mut disks = Vec::new();
    let mut nics = Vec::new();
    let mut interface_index = 0usize;
    for device in &devices.children {
        let name = device.name.as_str();
        match name {
            "disk" => {
                let kind = device.attribute("device").unwrap_or("disk");
                let target = device.child("target");
                let dev = target.and_then(|t| t.attribute("dev")).unwrap_or("");
                let source = device
                    .child("source")
                    .and_then(|s| s.attribute("file").or_else(|| s.attribute("dev")))
                    .unwrap_or("");
                if kind != "disk" {
                    let (what, why) = match kind {
                        "cdrom" => (
                            "CD-ROM",
                            "not carried over: its image is not in the backup; add a drive by \
                             hand if the VM needs one",
                        ),
                        "floppy" => ("floppy", "not carried over"),
                        _ => (
                            "SCSI LUN passthrough",
                            "not carried over: a device of the old host",
                        ),
                    };
                    dropped_list.push(dropped(dev, format!("{what} {source}").trim_end(), why));
                    continue;
                }
                if !config.disks.iter().any(|d| d.device == dev) {
                    continue;
                }
                if device.child("encryption").is_some()
                    || device
                        .child("source")
                        .is_some_and(|s| s.child("encryption").is_some())
                {
                    dropped_list.push(dropped(
                        dev,
                        "disk encryption (<encryption>)",
                        "not carried over: the served disk holds the data as the backup read it",
                    ));
                }
                for (flag, what) in [
                    ("shareable", "shared with other VMs (<shareable/>)"),
                    ("readonly", "read-only (<readonly/>)"),
                    ("blockio", "its block sizes (<blockio>)"),
                ] {
                    if device.child(flag).is_some() {
                        dropped_list.push(dropped(
                            dev,
                            what,
                            "not carried over: the disk is an ordinary writable disk of \
                             512-byte sectors",
                        ));
                    }
                }
                let bus =
                    target
                        .and_then(|t| t.attribute("bus"))
                        .unwrap_or_else(|| match dev.get(..2) {
                            Some("vd") => "virtio",
                            Some("hd") => "ide",
                            _ => "scsi",
                        });
                let controller = match bus {
                    "virtio" => Controller::Virtio,
                    "scsi" => {
                        let index = device
                            .child("address")
                            .and_then(|a| a.attribute("controller"))
                            .unwrap_or("0");
                        Controller::Scsi(
                            scsi_models
                                .get(index)
                                .cloned()
                                .unwrap_or_else(|| "lsilogic".to_owned()),
                        )
                    }
                    "sata" => Controller::Sata,
                    "ide" => Controller::Ide,
                    "nvme" => Controller::Nvme,
                    other => Controller::Other(other.to_owned()),
                };
                let boot_order = device
                    .child("boot")
                    .and_then(|b| b.attribute("order"))
                    .and_then(|o| o.parse().ok());
                disks.push(Disk {
                    device: dev.to_owned(),
                    controller,
                    boot_order,
                });
            }
            "interface" => {
                let label = format!("interface {interface_index}");
                interface_index += 1;
                let kind = device.attribute("type").unwrap_or("");
                let source = device.child("source");
                let network = match kind {
                    "network" => source.and_then(|s| s.attribute("network")),
                    "bridge" => source.and_then(|s| s.attribute("bridge")),
                    "direct" => source.and_then(|s| s.attribute("dev")),
                    "user" | "ethernet" => None,
                    other => {
                        dropped_list.push(dropped(
                            label,
                            format!("type='{other}' NIC"),
                            "not carried over: it is tied to the old host's devices",
                        ));
                        continue;
                    }
                };
                nics.push(Nic {
                    label,
                    model: device
                        .child("model")
                        .and_then(|m| m.attribute("type"))
                        .unwrap_or("rtl8139")
                        .to_owned(),
                    network: network.filter(|n| !n.is_empty()).map(str::to_owned),
                    mac: device
                        .child("mac")
                        .and_then(|m| m.attribute("address"))
                        .filter(|m| is_mac(m))
                        .map(str::to_ascii_lowercase),
                    connected: device.child("link").and_then(|l| l.attribute("state"))
                        != Some("down"),
                });
            }
            "hostdev" => dropped_list.push(dropped(
                "hostdev",
                format!(
                    "{} passthrough device",
                    device.attribute("type").unwrap_or("host")
                ),
                "not carried over: a device of the old host's hardware",
            )),
            "tpm" => dropped_list.push(dropped(
                "tpm",
                "virtual TPM",
                "not carried over: its state is on the old host; BitLocker or LUKS keys bound \
                 to the TPM will ask for their recovery key",
            )),
            "filesystem" => dropped_list.push(dropped(
                "filesystem",
                "shared folder from the host",
                "not carried over: it is on the old host",
            )),
            "serial" | "parallel" => dropped_list.push(dropped(
                name,
                format!(
                    "{name} port ({})",
                    device.attribute("type").unwrap_or("pty")
                ),
                "not carried over: ESXi's VM console takes the place of a pty console; add a \
                 port by hand if the guest needs one",
            )),
            "controller"
                if device.attribute("type") == Some("usb")
                    && device.attribute("model") != Some("none") =>
            {
                dropped_list.push(dropped("usb", "USB controller", "not carried over"))
            }
            "channel" => dropped_list.push(dropped(
                "channel",
                device
                    .child("target")
                    .and_then(|t| t.attribute("name"))
                    .unwrap_or("guest channel")
                    .to_owned(),
                "not carried over: ESXi talks to the guest through VMware Tools",
            )),
            _ if REPLACED_DEVICES.contains(&name) => {}
            other => dropped_list.push(dropped(
                other,
                format!("<{other}>"),
                "not carried over: no ESXi counterpart",
            )),
        }
    }
    if os.is_some_and(|o| o.child("kernel").is_some()) {
        dropped_list.push(dropped(
            "os",
            "direct kernel boot (<kernel>, <initrd>, <cmdline>)",
            "not carried over: ESXi boots from the disks, which need a boot loader",
        ));
    }
    for (element, what) in [
        ("launchSecurity", "memory encryption (<launchSecurity>)"),
        ("sysinfo", "SMBIOS strings (<sysinfo>)"),
    ] {
        if domain.child(element).is_some() {
            dropped_list.push(dropped(element, what, "not carried over"));
        }
    }
    for tuning in [
        "cputune",
        "numatune",
        "memoryBacking",
        "memtune",
        "blkiotune",
    ] {
        if domain.child(tuning).is_some() {
            dropped_list.push(dropped(
                tuning,
                format!("<{tuning}>"),
                "not carried over: host tuning belongs to the old host",
            ));
        }
    }
    if matches!(firmware, Firmware::Efi { .. }) {
        dropped_list.push(dropped(
            "nvram",
            "EFI variables",
            "not carried over: the firmware boots each disk's default loader \
             (\\EFI\\BOOT\\BOOTX64.EFI)",
        ));
    }
    if disks.len() != config.disks.len() {
        return Err(invalid(format!(
            "read {} disks for the conversion where the config has {}",
            disks.len(),
            config.disks.len()
        )));
    }
    Ok(Machine {
        name: config.name.clone(),
        uuid: config.uuid.clone(),
        memory_mib,
        vcpus,
        cores_per_socket,
        firmware,
        windows,
        linux,
        disks,
        nics,
        dropped: dropped_list,
    })
}

/// MiB of a libvirt memory size (`unit` as libvirt spells it: `b`, `KiB`, `MB`, ...); None if
/// not a number, an unknown unit, or under 1 MiB.
fn memory_mib(value: &str, unit: &str) -> Option<u64> {
    let n: u64 = value.parse().ok()?;
    let bytes: u128 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1024,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    let mib = u128::from(n) * bytes / (1 << 20);
    u64::try_from(mib).ok().filter(|&m| m >= 1)
}

/// The Linux family of a libosinfo id: `http://debian.org/debian/12` -> `debian12`,
/// `http://redhat.com/rhel/9.2` -> `rhel9`, `http://ubuntu.com/ubuntu/22.04` -> `ubuntu`.
fn osinfo_linux(id: &str) -> Option<String> {
    let rest = id.strip_prefix("http://")?;
    let mut parts = rest.split('/');
    let (_, family, version) = (parts.next()?, parts.next()?, parts.next().unwrap_or(""));
    let major: String = version.chars().take_while(char::is_ascii_digit).collect();
    match family {
        "debian" | "rhel" | "centos" | "sles" => Some(format!("{family}{major}")),
        "rocky" | "almalinux" => Some(format!("rhel{major}")),
        "ubuntu" | "fedora" => Some(family.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_memory_units() {
        assert_eq!(memory_mib("2097152", "KiB"), Some(2048));
        assert_eq!(memory_mib("4", "GiB"), Some(4096));
        assert_eq!(memory_mib("512", "M"), Some(512));
        assert_eq!(memory_mib("1000", "KiB"), None);
        assert_eq!(memory_mib("12", "parsecs"), None);
        assert_eq!(memory_mib("x", "KiB"), None);
    }

    #[test]
    fn linux_families() {
        assert_eq!(vmx_linux("rhel9-64").as_deref(), Some("rhel9"));
        assert_eq!(vmx_linux("debian12-64").as_deref(), Some("debian12"));
        assert_eq!(vmx_linux("rockylinux-64").as_deref(), Some("rhel"));
        assert_eq!(vmx_linux("windows2019srvnext-64"), None);
        assert_eq!(
            osinfo_linux("http://debian.org/debian/12").as_deref(),
            Some("debian12")
        );
        assert_eq!(
            osinfo_linux("http://redhat.com/rhel/9.2").as_deref(),
            Some("rhel9")
        );
        assert_eq!(osinfo_linux("http://microsoft.com/win/2k22"), None);
    }

    #[test]
    fn snapshot_deltas_are_told_by_name() {
        assert!(is_snapshot_delta(
            "/vmfs/volumes/ds/web01/web01-000002.vmdk"
        ));
        assert!(!is_snapshot_delta("web01.vmdk"));
        assert!(!is_snapshot_delta("web01-flat.vmdk"));
    }
}
