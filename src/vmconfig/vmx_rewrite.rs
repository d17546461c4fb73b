//! The live-mount rewrite of a `.vmx`, line by line on a [`VmxDocument`].
//!
//! Owns: which `.vmx` keys a live mount changes (`displayName`, `uuid.bios`, the disks'
//! `.fileName`, the NICs' addresses, `startConnected`, `present` and `networkName`, as the
//! [`NetworkPlan`](super::rewrite::NetworkPlan) says), which it removes (`uuid.location`,
//! `vc.uuid`, `sched.swap.derivedName`, generated-address keys), and where added keys go (right
//! after the last line of their device, or of `displayName` for `uuid.bios`).
//! Must not: touch any other byte. Changed values are spliced into the value span of the line
//! that counts (the last of duplicate keys), so key spelling, spacing, comments, order and line
//! endings stay as written; removed keys lose every line that carries them, so that no earlier
//! duplicate comes back into force.

use std::collections::{BTreeMap, HashSet};

use super::rewrite::{
    has_control, DiskTarget, MacSource, MountRewrite, NetworkMode, NicAction, NicReport,
};
use super::vmx::{escape, LineEnding, VmxDocument};
use super::{VmConfig, VmConfigError};

/// Keys whose every line is removed: vCenter would otherwise see the live mount as the
/// original VM, and the swap file name belongs to the original's folder.
const REMOVED_KEYS: [&str; 3] = ["uuid.location", "vc.uuid", "sched.swap.derivedName"];

/// Rewrites the `.vmx` `original` (already known to parse into `config`) as `how` says, with
/// what was done to each NIC.
///
/// NICs: `keep` leaves `startConnected` alone; `disconnect` sets `startConnected = "FALSE"` and
/// keeps the port group's name unless the map renames it (the assumption, from VMware's
/// documented behaviour: ESXi powers on a VM whose NIC names a port group the host lacks when
/// that NIC is not connected at power-on; the NIC shows as not connected until it is given a
/// port group); `remove` sets `ethernetN.present = "FALSE"` (the keys stay, so the NIC can be
/// brought back by hand, and the VM has no NIC). A mapped NIC gets `networkName = NEW`; a
/// distributed-switch NIC (`dvs.portgroupId`, no usable `networkName`) mapped by its port group
/// id loses its `dvs.*` keys and gets `networkName = NEW` (a standard port group).
pub(super) fn rewrite(
    file: &str,
    original: &[u8],
    how: &MountRewrite,
    config: &VmConfig,
    uuid: &[u8; 16],
) -> Result<(Vec<u8>, Vec<NicReport>), VmConfigError> {
    let invalid = |what: String| VmConfigError::Invalid {
        file: file.to_owned(),
        what,
    };
    let mut file_names = Vec::with_capacity(how.disks.len());
    for (disk, target) in config.disks.iter().zip(&how.disks) {
        let DiskTarget::VmdkFile(name) = target else {
            return Err(invalid(format!(
                "disk {}: a .vmx disk needs a VmdkFile target, not {}",
                disk.device,
                target.kind()
            )));
        };
        let is_vmdk = name.len() > 5
            && name
                .get(name.len() - 5..)
                .is_some_and(|tail| tail.eq_ignore_ascii_case(".vmdk"));
        if !is_vmdk || has_control(name) {
            return Err(invalid(format!(
                "disk {}: the new fileName {name:?} is not a .vmdk descriptor name",
                disk.device
            )));
        }
        file_names.push((disk.device.as_str(), name.as_str()));
    }

    let doc = VmxDocument::parse(file, original)?;
    let mut edit = Edit::new(&doc);
    let missing = |key: &str| invalid(format!("{key} vanished between parse and rewrite"));

    let name_line = doc
        .index_of("displayName")
        .ok_or_else(|| missing("displayName"))?;
    edit.set(name_line, &how.display_name);
    let bios = vmware_uuid(uuid);
    match doc.index_of("uuid.bios") {
        Some(line) => edit.set(line, &bios),
        None => edit.add_after(name_line, "uuid.bios", &bios),
    }
    for key in REMOVED_KEYS {
        edit.remove_key(key);
    }
    for (device, name) in file_names {
        let key = format!("{device}.fileName");
        let line = doc.index_of(&key).ok_or_else(|| missing(&key))?;
        edit.set(line, name);
    }

    let mut macs = MacSource::vmware(how.mac_seed);
    let plan = &how.network;
    let mut report = Vec::new();
    for (nic, last_line) in nics(&doc) {
        let prefix = format!("ethernet{nic}.");
        let key = |attribute: &str| format!("{prefix}{attribute}");
        let address_type = doc.index_of(&key("addressType"));
        let is_static = address_type
            .and_then(|line| doc.lines.get(line)?.entry.as_ref())
            .is_some_and(|entry| entry.value.trim().eq_ignore_ascii_case("static"));
        if !is_static {
            edit.set_or_add(address_type, last_line, &key("addressType"), "static");
            edit.remove_key(&key("generatedAddress"));
            edit.remove_key(&key("generatedAddressOffset"));
        }
        let mac = macs.next(u64::from(nic));
        edit.set_or_add(
            doc.index_of(&key("address")),
            last_line,
            &key("address"),
            &mac,
        );
        // A NIC the VM does not have (`present = "FALSE"`) keeps its network keys as they
        // are and uses no network (a map entry matching only it is still unused).
        if doc.get(&key("present")).is_some_and(super::vmx::is_false) {
            report.push(NicReport {
                nic: format!("ethernet{nic}"),
                mac: Some(mac),
                kind: None,
                network: None,
                mapped_to: None,
                action: NicAction::Removed,
            });
            continue;
        }
        let port_group = doc.get(&key("networkName")).filter(|name| !name.is_empty());
        let dvs = doc
            .get(&key("dvs.portgroupId"))
            .filter(|name| !name.is_empty());
        let (kind, network) = match (port_group, dvs) {
            (Some(name), _) => (Some("port group"), Some(name)),
            (None, Some(id)) => (Some("distributed port group"), Some(id)),
            (None, None) => (None, None),
        };
        let mapped_to = match plan.mode {
            NetworkMode::Remove => None,
            _ => network.and_then(|name| plan.target(name)),
        };
        if let Some(new) = mapped_to {
            edit.set_or_add(
                doc.index_of(&key("networkName")),
                last_line,
                &key("networkName"),
                new,
            );
            // A distributed switch backing wins over `networkName` on ESXi: it goes, or the
            // map would change nothing.
            edit.remove_prefix(&key("dvs."));
        }
        let action = match plan.mode {
            NetworkMode::Keep => NicAction::Kept,
            NetworkMode::Disconnect => {
                edit.set_or_add(
                    doc.index_of(&key("startConnected")),
                    last_line,
                    &key("startConnected"),
                    "FALSE",
                );
                NicAction::Disconnected
            }
            NetworkMode::Remove => {
                edit.set_or_add(
                    doc.index_of(&key("present")),
                    last_line,
                    &key("present"),
                    "FALSE",
                );
                NicAction::Removed
            }
        };
        report.push(NicReport {
            nic: format!("ethernet{nic}"),
            mac: Some(mac),
            kind: kind.map(str::to_owned),
            network: network.map(str::to_owned),
            mapped_to: mapped_to.map(str::to_owned),
            action,
        });
    }
    Ok((edit.render(), report))
}

/// `uuid.bios` form: `56 4d 9c 0e 3a 71 b2 48-e5 0f 6d 21 c8 94 a3 7b`.
fn vmware_uuid(uuid: &[u8; 16]) -> String {
    let hex: Vec<String> = uuid.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{}-{}", hex[..8].join(" "), hex[8..].join(" "))
}

/// Every `ethernetN` that has a key, with the index of its last line, by N.
fn nics(doc: &VmxDocument) -> BTreeMap<u32, usize> {
    let mut nics = BTreeMap::new();
    for (index, line) in doc.lines.iter().enumerate() {
        let Some(entry) = &line.entry else { continue };
        if let Some(nic) = nic_number(&entry.key) {
            nics.insert(nic, index);
        }
    }
    nics
}

/// N of a key `ethernetN.something` (any case); None for other keys.
fn nic_number(key: &str) -> Option<u32> {
    let prefix = key.get(..8)?;
    if !prefix.eq_ignore_ascii_case("ethernet") {
        return None;
    }
    let rest = &key[8..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || rest.as_bytes().get(digits) != Some(&b'.') {
        return None;
    }
    rest[..digits].parse().ok()
}

/// Changes planned on a document, applied all at once by [`Edit::render`] so that line indices
/// stay those of the document as parsed.
struct Edit<'a> {
    doc: &'a VmxDocument,
    /// New text for a line.
    replaced: BTreeMap<usize, String>,
    removed: HashSet<usize>,
    /// New lines (text without ending) to write after the line with this index.
    added: BTreeMap<usize, Vec<String>>,
}

impl<'a> Edit<'a> {
    fn new(doc: &'a VmxDocument) -> Self {
        Edit {
            doc,
            replaced: BTreeMap::new(),
            removed: HashSet::new(),
            added: BTreeMap::new(),
        }
    }

    /// Sets the value on line `index` (which must carry an entry), keeping everything else on it.
    fn set(&mut self, index: usize, value: &str) {
        let Some(line) = self.doc.lines.get(index) else {
            return;
        };
        let Some(entry) = &line.entry else { return };
        let span = entry.value_span.clone();
        let (Some(before), Some(after)) = (line.text.get(..span.start), line.text.get(span.end..))
        else {
            return;
        };
        self.replaced
            .insert(index, format!("{before}{}{after}", escape(value)));
    }

    /// Removes every line whose key starts with `prefix` (compared without regard to case).
    fn remove_prefix(&mut self, prefix: &str) {
        for (index, line) in self.doc.lines.iter().enumerate() {
            let starts = line.entry.as_ref().is_some_and(|entry| {
                entry
                    .key
                    .get(..prefix.len())
                    .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
            });
            if starts {
                self.removed.insert(index);
            }
        }
    }

    /// Sets the value on line `existing` if there is one, else adds `key = "value"` after line
    /// `anchor`.
    fn set_or_add(&mut self, existing: Option<usize>, anchor: usize, key: &str, value: &str) {
        match existing {
            Some(index) => self.set(index, value),
            None => self.add_after(anchor, key, value),
        }
    }

    fn add_after(&mut self, anchor: usize, key: &str, value: &str) {
        self.added
            .entry(anchor)
            .or_default()
            .push(format!("{key} = \"{}\"", escape(value)));
    }

    /// Removes every line whose key is `key` (compared without regard to case).
    fn remove_key(&mut self, key: &str) {
        for (index, line) in self.doc.lines.iter().enumerate() {
            if line
                .entry
                .as_ref()
                .is_some_and(|entry| entry.key.eq_ignore_ascii_case(key))
            {
                self.removed.insert(index);
            }
        }
    }

    /// The document with the changes applied. Added lines take the ending of the line they
    /// follow; a file that ended without a newline still does.
    fn render(&self) -> Vec<u8> {
        let doc = self.doc;
        let usual = doc
            .lines
            .iter()
            .map(|line| line.ending)
            .find(|ending| *ending != LineEnding::None)
            .unwrap_or(LineEnding::Lf);
        let mut lines: Vec<(&str, LineEnding)> = Vec::with_capacity(doc.lines.len() + 8);
        for (index, line) in doc.lines.iter().enumerate() {
            if !self.removed.contains(&index) {
                let text = self.replaced.get(&index).unwrap_or(&line.text);
                lines.push((text, line.ending));
            }
            for added in self.added.get(&index).into_iter().flatten() {
                lines.push((added, line.ending));
            }
        }
        let ends_without_newline = doc
            .lines
            .last()
            .is_some_and(|line| line.ending == LineEnding::None);
        let count = lines.len();
        let mut out = Vec::with_capacity(doc.lines.iter().map(|l| l.text.len() + 2).sum());
        if doc.bom {
            out.extend_from_slice(super::UTF8_BOM);
        }
        for (at, (text, ending)) in lines.into_iter().enumerate() {
            let ending = if at + 1 == count && ends_without_newline {
                LineEnding::None
            } else if ending == LineEnding::None {
                usual
            } else {
                ending
            };
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(ending.as_str().as_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::rewrite::{rewrite_for_mount, rewrite_for_mount_reported, NetworkPlan};
    use super::super::{parse, VmConfigError};
    use super::*;

    const WINDOWS: &[u8] = include_bytes!("../../testdata/esxi8-ws2022-app01.vmx");
    const LINUX: &[u8] = include_bytes!("../../testdata/esxi8-rocky9-web01.vmx");
    const NEW_UUID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";
    const NEW_BIOS: &str = "0a 1b 2c 3d 4e 5f 60 71-82 93 a4 b5 c6 d7 e8 f9";

    fn how(disks: &[&str], keep_network: bool) -> MountRewrite {
        MountRewrite {
            display_name: "web01-lm-3f2a".to_owned(),
            uuid: NEW_UUID.to_owned(),
            mac_seed: [0x5a; 32],
            network: NetworkPlan {
                mode: if keep_network {
                    NetworkMode::Keep
                } else {
                    NetworkMode::Disconnect
                },
                ..NetworkPlan::default()
            },
            disks: disks
                .iter()
                .map(|name| DiskTarget::VmdkFile((*name).to_owned()))
                .collect(),
            convert: None,
        }
    }

    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).unwrap()
    }

    fn lines(bytes: &[u8]) -> Vec<&str> {
        text(bytes).split_inclusive('\n').collect()
    }

    /// The value of the single line whose key is `key` (exact spelling), checking there is one.
    fn only_value<'a>(output: &'a str, key: &str) -> &'a str {
        let found: Vec<&str> = output
            .lines()
            .filter_map(|line| line.strip_prefix(&format!("{key} = \"")))
            .collect();
        assert_eq!(found.len(), 1, "{key}: {found:?}");
        found[0].strip_suffix('"').unwrap()
    }

    const LINUX_DISKS: [&str; 4] = ["lm_1.vmdk", "lm_3.vmdk", "lm_2.vmdk", "lm.vmdk"];

    #[test]
    fn linux_vm_changes_exactly_the_named_lines() {
        let out = rewrite_for_mount("web01.vmx", LINUX, &how(&LINUX_DISKS, false)).unwrap();
        let before = lines(LINUX);
        let after = lines(&out);
        // Every original line is either kept unchanged, in order, or one of the expected changes.
        let removed = [
            "ethernet0.generatedAddress = \"00:0c:29:5e:a1:47\"\n",
            "ethernet0.generatedAddressOffset = \"0\"\n",
            "uuid.location = \"56 4d 9c 0e 3a 71 b2 48-e5 0f 6d 21 c8 94 a3 7b\"\n",
            "vc.uuid = \"52 7e 41 d3 09 ab 6c 5f-13 e8 b4 2d 7a 60 f1 9c\"\n",
            "sched.swap.derivedName = \"/vmfs/volumes/datastore-ssd02/web01/web01-6b0d3f12.vswp\"\n",
        ];
        let changed_keys = [
            "displayName",
            "uuid.bios",
            "nvme0:0.fileName",
            "scsi0:10.fileName",
            "scsi0:2.fileName",
            "sata0:1.fileName",
            "ethernet0.addressType",
        ];
        let kept: Vec<&str> = before
            .iter()
            .copied()
            .filter(|line| !removed.contains(line))
            .filter(|line| {
                !changed_keys
                    .iter()
                    .any(|k| line.starts_with(&format!("{k} =")))
            })
            .collect();
        let unchanged_in_output: Vec<&str> = after
            .iter()
            .copied()
            .filter(|line| before.contains(line))
            .collect();
        assert_eq!(unchanged_in_output, kept);
        assert_eq!(after.len(), before.len() - removed.len() + 2);

        let out = text(&out);
        assert_eq!(only_value(out, "displayName"), "web01-lm-3f2a");
        assert_eq!(only_value(out, "uuid.bios"), NEW_BIOS);
        assert_eq!(only_value(out, "nvme0:0.fileName"), "lm.vmdk");
        assert_eq!(only_value(out, "scsi0:10.fileName"), "lm_3.vmdk");
        assert_eq!(only_value(out, "scsi0:2.fileName"), "lm_1.vmdk");
        assert_eq!(only_value(out, "sata0:1.fileName"), "lm_2.vmdk");
        // Disabled disks keep their file names.
        assert_eq!(only_value(out, "scsi0:3.fileName"), "web01_old-logs.vmdk");
        assert_eq!(only_value(out, "scsi1:0.fileName"), "web01_scratch.vmdk");
        assert_eq!(only_value(out, "ethernet0.addressType"), "static");
        // The added keys follow the device's last line in its group, in a fixed order.
        let at = after
            .iter()
            .position(|line| *line == "ethernet0.pciSlotNumber = \"192\"\n")
            .unwrap();
        assert!(after[at + 1].starts_with("ethernet0.address = \"00:50:56:"));
        assert_eq!(after[at + 2], "ethernet0.startConnected = \"FALSE\"\n");
        assert_eq!(after[at + 3], "svga.present = \"TRUE\"\n");
        for key in ["uuid.location", "vc.uuid", "sched.swap.derivedName"] {
            assert!(!out.contains(&format!("{key} =")), "{key}");
        }
        // The escaped annotation is untouched.
        assert!(out.contains(
            "annotation = \"Nginx front end for |22shop|22 (prod)|0AOwner: web-ops|7Con-call\"\n"
        ));

        let config = parse("web01.vmx", out.as_bytes()).unwrap();
        assert_eq!(config.name, "web01-lm-3f2a");
        assert_eq!(config.uuid.as_deref(), Some(NEW_UUID));
        let paths: Vec<&str> = config.disks.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, LINUX_DISKS);
    }

    #[test]
    fn the_ethernet_tail_of_the_linux_vm_is_exact() {
        let out = rewrite_for_mount("web01.vmx", LINUX, &how(&LINUX_DISKS, false)).unwrap();
        let mut source = MacSource::vmware([0x5a; 32]);
        let mac = source.next(0);
        let expected = "ethernet0.virtualDev = \"vmxnet3\"\n\
             ethernet0.networkName = \"DMZ-VLAN120\"\n\
             ethernet0.addressType = \"static\"\n\
             ethernet0.wakeOnPcktRcv = \"FALSE\"\n\
             ethernet0.present = \"TRUE\"\n\
             displayName = \"web01-lm-3f2a\"\n";
        assert!(text(&out).contains(expected), "{}", text(&out));
        let expected = format!(
            "scsi0.pciSlotNumber = \"160\"\n\
             ethernet0.pciSlotNumber = \"192\"\n\
             ethernet0.address = \"{mac}\"\n\
             ethernet0.startConnected = \"FALSE\"\n\
             svga.present = \"TRUE\"\n"
        );
        assert!(text(&out).contains(&expected), "{}", text(&out));
    }

    /// A NIC with both a port group name and a distributed switch backing, and a NIC the VM
    /// does not have (`present = "FALSE"`): mapped, the first loses its `dvs.*` keys (ESXi
    /// would keep using the switch); the second is left as it is, reported removed, and a map
    /// entry naming only its port group is an unused entry.
    #[test]
    fn distributed_backings_go_when_mapped_and_absent_nics_are_left_alone() {
        let vmx = text(LINUX).replace(
            "ethernet0.present = \"TRUE\"\n",
            "ethernet0.present = \"TRUE\"\nethernet0.dvs.switchId = \"50 2a\"\n\
             ethernet0.dvs.portgroupId = \"dvportgroup-12\"\n\
             ethernet1.virtualDev = \"e1000e\"\nethernet1.networkName = \"Old-PG\"\n\
             ethernet1.present = \"FALSE\"\n",
        );
        let how = plan(
            &LINUX_DISKS,
            NetworkMode::Disconnect,
            &[("DMZ-VLAN120", "Lab")],
            &[],
        );
        let done = rewrite_for_mount_reported("web01.vmx", vmx.as_bytes(), &how).unwrap();
        let out = text(&done.bytes);
        assert!(!out.contains("ethernet0.dvs."), "{out}");
        assert_eq!(only_value(out, "ethernet0.networkName"), "Lab");
        // ethernet1: its keys as they were, nothing added.
        assert_eq!(only_value(out, "ethernet1.networkName"), "Old-PG");
        assert!(!out.contains("ethernet1.startConnected"), "{out}");
        let report: Vec<(&str, Option<&str>, NicAction)> = done
            .nics
            .iter()
            .map(|n| (n.nic.as_str(), n.mapped_to.as_deref(), n.action))
            .collect();
        assert_eq!(
            report,
            vec![
                ("ethernet0", Some("Lab"), NicAction::Disconnected),
                ("ethernet1", None, NicAction::Removed),
            ]
        );
        let how = plan(
            &LINUX_DISKS,
            NetworkMode::Disconnect,
            &[("Old-PG", "Lab")],
            &[],
        );
        let err = rewrite_for_mount_reported("web01.vmx", vmx.as_bytes(), &how).unwrap_err();
        assert!(err.to_string().contains("no NIC uses \"Old-PG\""), "{err}");
    }

    fn plan(
        disks: &[&str],
        mode: NetworkMode,
        map: &[(&str, &str)],
        default_map: &[(&str, &str)],
    ) -> MountRewrite {
        let pairs = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(old, new)| ((*old).to_owned(), (*new).to_owned()))
                .collect()
        };
        let mut how = how(disks, false);
        how.network = NetworkPlan {
            mode,
            map: pairs(map),
            default_map: pairs(default_map),
            legacy_link_down_only: false,
        };
        how
    }

    /// The lines of `out` about ethernet0 that are not in `original`, and those of `original`
    /// about ethernet0 that are gone (the address lines left out: other tests check those).
    fn nic_changes(original: &[u8], out: &[u8]) -> (Vec<String>, Vec<String>) {
        let nic = |bytes: &[u8]| -> Vec<String> {
            text(bytes)
                .lines()
                .filter(|line| line.starts_with("ethernet0."))
                .filter(|line| !line.contains("ddress"))
                .map(str::to_owned)
                .collect()
        };
        let (before, after) = (nic(original), nic(out));
        let added = after
            .iter()
            .filter(|l| !before.contains(l))
            .cloned()
            .collect();
        let gone = before
            .iter()
            .filter(|l| !after.contains(l))
            .cloned()
            .collect();
        (added, gone)
    }

    /// What each mode and map does to the port group NIC of the Linux VM and the distributed
    /// port group NIC of the Windows VM: (vmx, mode, map, default map, lines added, lines
    /// gone, the report's (kind, network, mapped_to, action)).
    #[test]
    fn network_plans_on_port_groups() {
        use NetworkMode::*;
        use NicAction::*;
        let win: &[&str] = &["APP01-lm.vmdk", "APP01-lm_1.vmdk"];
        let dvs_gone = [
            "ethernet0.dvs.switchId = \"50 3a 1c 9e 27 d4 6b 0f-81 5e c2 7a 90 14 3d e8\"",
            "ethernet0.dvs.portId = \"37\"",
            "ethernet0.dvs.portgroupId = \"dvportgroup-1043\"",
            "ethernet0.dvs.connectionId = \"1184329077\"",
        ];
        type Case<'a> = (
            &'a [u8],
            &'a [&'a str],
            NetworkMode,
            &'a [(&'a str, &'a str)],
            &'a [(&'a str, &'a str)],
            Vec<&'a str>,
            Vec<&'a str>,
            (&'a str, &'a str, Option<&'a str>, NicAction),
        );
        let pg = "port group";
        let dpg = "distributed port group";
        let cases: Vec<Case<'_>> = vec![
            (
                LINUX,
                &LINUX_DISKS,
                Disconnect,
                &[],
                &[],
                vec!["ethernet0.startConnected = \"FALSE\""],
                vec![],
                (pg, "DMZ-VLAN120", None, Disconnected),
            ),
            (
                LINUX,
                &LINUX_DISKS,
                Disconnect,
                &[("DMZ-VLAN120", "Isolated Lab")],
                &[],
                vec![
                    "ethernet0.networkName = \"Isolated Lab\"",
                    "ethernet0.startConnected = \"FALSE\"",
                ],
                vec!["ethernet0.networkName = \"DMZ-VLAN120\""],
                (pg, "DMZ-VLAN120", Some("Isolated Lab"), Disconnected),
            ),
            (
                LINUX,
                &LINUX_DISKS,
                Keep,
                &[],
                &[("DMZ-VLAN120", "Lab"), ("unused", "x")],
                vec!["ethernet0.networkName = \"Lab\""],
                vec!["ethernet0.networkName = \"DMZ-VLAN120\""],
                (pg, "DMZ-VLAN120", Some("Lab"), Kept),
            ),
            (
                LINUX,
                &LINUX_DISKS,
                Keep,
                &[],
                &[],
                vec![],
                vec![],
                (pg, "DMZ-VLAN120", None, Kept),
            ),
            (
                LINUX,
                &LINUX_DISKS,
                Remove,
                &[],
                &[("DMZ-VLAN120", "Lab")],
                vec!["ethernet0.present = \"FALSE\""],
                vec!["ethernet0.present = \"TRUE\""],
                (pg, "DMZ-VLAN120", None, Removed),
            ),
            (
                WINDOWS,
                win,
                Disconnect,
                &[],
                &[],
                vec!["ethernet0.startConnected = \"FALSE\""],
                vec![],
                (dpg, "dvportgroup-1043", None, Disconnected),
            ),
            (
                WINDOWS,
                win,
                Disconnect,
                &[("dvportgroup-1043", "VM Network")],
                &[],
                vec![
                    "ethernet0.networkName = \"VM Network\"",
                    "ethernet0.startConnected = \"FALSE\"",
                ],
                dvs_gone.to_vec(),
                (dpg, "dvportgroup-1043", Some("VM Network"), Disconnected),
            ),
        ];
        for (vmx, disks, mode, map, default_map, added, gone, nic) in cases {
            let how = plan(disks, mode, map, default_map);
            let done = rewrite_for_mount_reported("x.vmx", vmx, &how).unwrap();
            let (got_added, got_gone) = nic_changes(vmx, &done.bytes);
            assert_eq!(
                (got_added, got_gone),
                (
                    added.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>(),
                    gone.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>()
                ),
                "{mode:?} {map:?} {default_map:?}"
            );
            let [report] = done.nics.as_slice() else {
                panic!("{:?}", done.nics)
            };
            assert_eq!(report.nic, "ethernet0");
            assert_eq!(
                (
                    report.kind.as_deref().unwrap(),
                    report.network.as_deref().unwrap(),
                    report.mapped_to.as_deref(),
                    report.action
                ),
                nic
            );
            assert!(parse("x.vmx", &done.bytes).is_ok());
        }
    }

    #[test]
    fn a_map_entry_no_nic_uses_is_an_error_naming_it_in_a_vmx() {
        let err = rewrite_for_mount(
            "web01.vmx",
            LINUX,
            &plan(
                &LINUX_DISKS,
                NetworkMode::Disconnect,
                &[("DMZ-VLAN12", "Lab")],
                &[],
            ),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "web01.vmx: network map: no NIC uses \"DMZ-VLAN12\" (the config's NICs use: port group \"DMZ-VLAN120\")"
        );
        let done = rewrite_for_mount_reported(
            "web01.vmx",
            LINUX,
            &plan(
                &LINUX_DISKS,
                NetworkMode::Disconnect,
                &[("DMZ-VLAN120", "Lab")],
                &[],
            ),
        )
        .unwrap();
        let mac = MacSource::vmware([0x5a; 32]).next(0);
        assert_eq!(
            done.nics[0].to_string(),
            format!("NIC ethernet0 ({mac}): port group DMZ-VLAN120 -> Lab (disconnected)")
        );
    }

    #[test]
    fn windows_vm_with_vpx_address_and_kept_network() {
        let disks = ["APP01-lm.vmdk", "APP01-lm_1.vmdk"];
        let out = rewrite_for_mount("app01.vmx", WINDOWS, &how(&disks, true)).unwrap();
        let before = lines(WINDOWS);
        let after = lines(&out);
        let differing_before: Vec<&str> = before
            .iter()
            .copied()
            .filter(|line| !after.contains(line))
            .collect();
        assert_eq!(
            differing_before,
            [
                "scsi0:0.fileName = \"WS2022-APP01.vmdk\"\n",
                "scsi0:1.fileName = \"WS2022-APP01_1.vmdk\"\n",
                "ethernet0.addressType = \"vpx\"\n",
                "ethernet0.generatedAddress = \"00:50:56:9a:3c:7e\"\n",
                "displayName = \"WS2022-APP01\"\n",
                "uuid.bios = \"42 1a 7c 3e 5d 90 8b 14-c2 6f 0a 93 de 47 b8 25\"\n",
                "vc.uuid = \"50 1a 2f 6d 83 c4 49 e1-9b 07 5a 3c 18 f2 64 d9\"\n",
                "sched.swap.derivedName = \"/vmfs/volumes/6512a3f4-8c1e2d30-7b4a-0050569a1b2c/WS2022-APP01/WS2022-APP01-1c2b9e4a.vswp\"\n",
                "uuid.location = \"56 4d 8a 31 0e 7f c2 95-4b 16 da 03 7e 58 c1 a9\"\n",
            ]
        );
        let new_lines: Vec<&str> = after
            .iter()
            .copied()
            .filter(|line| !before.contains(line))
            .collect();
        let mac = MacSource::vmware([0x5a; 32]).next(0);
        assert_eq!(
            new_lines,
            [
                "scsi0:0.fileName = \"APP01-lm.vmdk\"\n".to_owned(),
                "scsi0:1.fileName = \"APP01-lm_1.vmdk\"\n".to_owned(),
                "ethernet0.addressType = \"static\"\n".to_owned(),
                "displayName = \"web01-lm-3f2a\"\n".to_owned(),
                format!("uuid.bios = \"{NEW_BIOS}\"\n"),
                format!("ethernet0.address = \"{mac}\"\n"),
            ]
        );
        // The address follows ethernet0's last line (its pciSlotNumber, far down the file).
        let at = after
            .iter()
            .position(|line| *line == "ethernet0.pciSlotNumber = \"192\"\n")
            .unwrap();
        assert_eq!(after[at + 1], format!("ethernet0.address = \"{mac}\"\n"));
        assert!(!text(&out).contains("ethernet0.startConnected"));
        let config = parse("app01.vmx", &out).unwrap();
        assert_eq!(config.name, "web01-lm-3f2a");
        assert_eq!(config.uuid.as_deref(), Some(NEW_UUID));
        let paths: Vec<&str> = config.disks.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, disks);
    }

    #[test]
    fn several_nics_get_distinct_deterministic_macs() {
        let input = b"displayName = \"n\"\r\n\
            ethernet0.present = \"TRUE\"\r\n\
            ethernet1.present = \"TRUE\"\r\n\
            ETHERNET1.AddressType = \"static\"\r\n\
            ethernet1.address = \"00:50:56:01:02:03\"\r\n\
            ethernet1.startConnected = \"TRUE\"\r\n\
            # a comment\r\n\
            ethernet10.addressType = \"generated\"\r\n\
            ethernet10.generatedAddress = \"00:0c:29:00:00:01\"\r\n\
            ethernet2.addressType = \"vpx\"";
        let rewrite = |seed: u8| {
            let mut how = how(&[], false);
            how.mac_seed = [seed; 32];
            rewrite_for_mount("n.vmx", input, &how).unwrap()
        };
        let out = rewrite(1);
        assert_eq!(out, rewrite(1));
        assert_ne!(out, rewrite(2));
        let out = text(&out);
        assert!(out.lines().all(|line| !line.contains('\r')));
        assert!(out.split("\r\n").all(|part| !part.contains('\n')));
        assert!(!out.ends_with('\n'), "no final newline, as in the input");
        let macs: Vec<&str> = out
            .split("\r\n")
            .filter_map(|line| {
                let (key, value) = line.split_once(" = ")?;
                key.to_ascii_lowercase()
                    .ends_with(".address")
                    .then(|| value.trim_matches('"'))
            })
            .collect();
        assert_eq!(macs.len(), 4, "{out}");
        let distinct: HashSet<&&str> = macs.iter().collect();
        assert_eq!(distinct.len(), 4);
        for mac in &macs {
            let bytes: Vec<u8> = mac
                .split(':')
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect();
            assert_eq!(bytes.len(), 6);
            assert_eq!(&bytes[..3], [0x00, 0x50, 0x56]);
            assert!(bytes[3] <= 0x3F, "{mac}");
        }
        // The static NIC keeps its key spelling, its address is replaced in place.
        assert!(out.contains("ETHERNET1.AddressType = \"static\"\r\n"));
        assert!(!out.contains("00:50:56:01:02:03"));
        assert!(out.contains("ethernet1.startConnected = \"FALSE\"\r\n# a comment"));
        assert!(!out.contains("generatedAddress"));
        // ethernet2's additions end the file; the line they follow gains the usual ending.
        assert!(out.contains("ethernet2.addressType = \"static\"\r\nethernet2.address = "));
        assert!(out.ends_with("ethernet2.startConnected = \"FALSE\""));
        let mac0 = MacSource::vmware([1; 32]).next(0);
        assert!(out.contains(&format!(
            "ethernet0.present = \"TRUE\"\r\n\
             ethernet0.addressType = \"static\"\r\n\
             ethernet0.address = \"{mac0}\"\r\n\
             ethernet0.startConnected = \"FALSE\"\r\n\
             ethernet1.present"
        )));
    }

    #[test]
    fn values_are_escaped_and_round_trip() {
        let input = "displayName = \"old\"\nuuid.bios = \"00 00 00 00 00 00 00 00-00 00 00 00 00 00 00 00\"\nscsi0:0.fileName = \"a.vmdk\"\n";
        let mut how = how(&["we|rd \"x\".vmdk"], false);
        how.display_name = "say \"hi\" | caf\u{e9} #1".to_owned();
        let out = rewrite_for_mount("e.vmx", input.as_bytes(), &how).unwrap();
        let out = text(&out);
        assert!(out.contains("displayName = \"say |22hi|22 |7C caf\u{e9} #1\"\n"));
        assert!(out.contains("scsi0:0.fileName = \"we|7Crd |22x|22.vmdk\"\n"));
        let config = parse("e.vmx", out.as_bytes()).unwrap();
        assert_eq!(config.name, how.display_name);
        assert_eq!(config.disks[0].path, "we|rd \"x\".vmdk");
    }

    #[test]
    fn duplicates_change_the_line_that_counts_and_missing_uuid_is_added() {
        let input = b"\xEF\xBB\xBFdisplayName = \"first\"\nDisplayName  =  \"second\"  \n\
            scsi0:0.fileName = \"a.vmdk\"\nvc.uuid = \"1\"\nVC.UUID = \"2\"\nannotation = \"keep\"\n";
        let out = rewrite_for_mount("d.vmx", input, &how(&["b.vmdk"], false)).unwrap();
        assert_eq!(
            text(&out),
            format!(
                "\u{feff}displayName = \"first\"\nDisplayName  =  \"web01-lm-3f2a\"  \n\
                 uuid.bios = \"{NEW_BIOS}\"\nscsi0:0.fileName = \"b.vmdk\"\nannotation = \"keep\"\n"
            )
        );
    }

    #[test]
    fn wrong_targets_are_invalid() {
        let mut wrong_kind = how(&LINUX_DISKS, false);
        wrong_kind.disks[2] = DiskTarget::RawFile("/x.img".to_owned());
        let err = rewrite_for_mount("web01.vmx", LINUX, &wrong_kind).unwrap_err();
        assert!(matches!(err, VmConfigError::Invalid { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "web01.vmx: disk sata0:1: a .vmx disk needs a VmdkFile target, not RawFile"
        );

        let err = rewrite_for_mount("web01.vmx", LINUX, &how(&LINUX_DISKS[..3], false))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "web01.vmx: 3 disk target(s) given, but the config has 4 disk(s) (scsi0:2, \
             scsi0:10, sata0:1, nvme0:0)"
        );

        let err = rewrite_for_mount("web01.vmx", LINUX, &how(&["a.img", "b", "c", "d"], false))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "web01.vmx: disk scsi0:2: the new fileName \"a.img\" is not a .vmdk descriptor name"
        );

        let mut bad_uuid = how(&LINUX_DISKS, false);
        bad_uuid.uuid = "564d9c0e3a71b248e50f6d21c894a37b".to_owned();
        let err = rewrite_for_mount("web01.vmx", LINUX, &bad_uuid)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("web01.vmx: the new UUID"), "{err}");

        let mut bad_name = how(&LINUX_DISKS, false);
        bad_name.display_name = " ".to_owned();
        assert!(rewrite_for_mount("web01.vmx", LINUX, &bad_name).is_err());
    }

    #[test]
    fn a_config_that_does_not_parse_is_its_parse_error() {
        let err = rewrite_for_mount(
            "bad.vmx",
            b"displayName = \"x\"\nbroken\n",
            &how(&[], false),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad.vmx: line 2: expected `key = \"value\"`, a comment or a blank line, found \"broken\""
        );
    }

    #[test]
    fn nic_numbers() {
        assert_eq!(nic_number("ethernet0.present"), Some(0));
        assert_eq!(nic_number("Ethernet12.address"), Some(12));
        assert_eq!(nic_number("ethernet.present"), None);
        assert_eq!(nic_number("ethernet0"), None);
        assert_eq!(nic_number("ethernet0x.present"), None);
        assert_eq!(nic_number("sched.ethernet0.x"), None);
        assert_eq!(nic_number("ethérnet0.x"), None);
    }

    proptest::proptest! {
        #[test]
        fn rewrite_never_panics_on_vmx_like_lines(
            lines in proptest::collection::vec(
                proptest::sample::select(vec![
                    "displayName = \"x\"", "scsi0:0.fileName = \"a.vmdk\"", "scsi0.present = \"FALSE\"",
                    "uuid.bios = \"56 4d 00 11 22 33 44 55-66 77 88 99 aa bb cc dd\"", "uuid.bios = \"56\"",
                    "vc.uuid = \"x\"", "ethernet0.present = \"TRUE\"", "ethernet1.addressType = \"static\"",
                    "ETHERNET0.addressType = \"vpx\"", "ethernet0.generatedAddress = \"x\"",
                    "ethernet3.startConnected = \"TRUE\"", "ethernet99999999999.x = \"y\"", "# c", "",
                    "=", "\"", "a = \"|\"", "a = \"|2\"", "\r", "k=\"v\" x", "\u{e9} = \"\u{e9}\"",
                    "sata0:1.fileName = \"b.vmdk\"", "sched.swap.derivedName = \"s\"",
                ]),
                0..20,
            ),
            disks in 0usize..3,
            keep in proptest::bool::ANY,
        ) {
            let input = lines.join("\n");
            let names: Vec<String> = (0..disks).map(|n| format!("d{n}.vmdk")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            if let Ok(out) = rewrite_for_mount("p.vmx", input.as_bytes(), &how(&names, keep)) {
                let config = parse("p.vmx", &out).unwrap();
                proptest::prop_assert_eq!(config.name, "web01-lm-3f2a");
                proptest::prop_assert_eq!(config.uuid.as_deref(), Some(NEW_UUID));
            }
        }
    }
}
