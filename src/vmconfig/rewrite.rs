//! Rewriting a VM's config for a live mount: the public entry point ([`rewrite_for_mount`]), what
//! the caller asks for ([`MountRewrite`], [`DiskTarget`]), the checks on that request, and the
//! derivation of new MAC addresses from the caller's seed.
//!
//! Owns: validating the request against the parsed config (number and kind of disk targets, the
//! new name and UUID, the network map), dispatching to the `.vmx` or libvirt rewriter, the
//! network plan ([`NetworkPlan`]) and its per-NIC report ([`NicReport`]), and [`MacSource`],
//! which turns a seed into distinct addresses inside a fixed prefix.
//! Must not: do I/O, pick names, UUIDs or seeds itself (the caller decides them, so the result is
//! a pure function of the inputs), or edit bytes of a config (the format modules do that and keep
//! every byte they are not told to change).

use std::collections::{BTreeMap, HashSet};

use super::convert::{Conversion, DeviceReport};
use super::{Hypervisor, VmConfig, VmConfigError};

/// What a live mount changes in a VM's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRewrite {
    /// The new VM name, e.g. `web01-lm-3f2a`.
    pub display_name: String,
    /// The new UUID in 8-4-4-4-12 form (hex digits in either case; written in lowercase).
    pub uuid: String,
    /// Seed for new MAC addresses; the same seed gives the same addresses.
    pub mac_seed: [u8; 32],
    /// What happens to the NICs: kept, disconnected or removed, and networks renamed.
    pub network: NetworkPlan,
    /// For each disk of the parsed config, in [`VmConfig::disks`] order: what the rewritten
    /// config must point at (a target of the kind the converted config takes, with `convert`).
    pub disks: Vec<DiskTarget>,
    /// The config converted to the other hypervisor first (`mount --for`); None, or a
    /// conversion to the config's own hypervisor: no conversion.
    pub convert: Option<Conversion>,
}

/// What a live mount does with a VM's NICs (decision 0022).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// NICs stay connected (to the mapped network where the map names theirs).
    Keep,
    /// NICs start unplugged, and the config starts on a host that lacks the original
    /// networks: libvirt `<link state='down'/>`, and a NIC on an unmapped network or bridge
    /// becomes `type='user'` (it names no host network); `.vmx` `startConnected = "FALSE"`.
    #[default]
    Disconnect,
    /// No NIC at all: libvirt `<interface>` elements removed, `.vmx` `ethernetN.present =
    /// "FALSE"`.
    Remove,
}

impl NetworkMode {
    /// The mode's name, as the CLI and the API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Keep => "keep",
            NetworkMode::Disconnect => "disconnect",
            NetworkMode::Remove => "remove",
        }
    }
}

impl std::str::FromStr for NetworkMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "keep" => Ok(NetworkMode::Keep),
            "disconnect" => Ok(NetworkMode::Disconnect),
            "remove" => Ok(NetworkMode::Remove),
            _ => Err(format!(
                "network mode {text:?} is not one of keep, disconnect, remove"
            )),
        }
    }
}

/// Reads a mode from its name, or from the boolean of the `keep_network` field that mount
/// requests and persisted mounts had before the mode existed (true: keep, false: disconnect).
impl<'de> serde::Deserialize<'de> for NetworkMode {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Either {
            Keep(bool),
            Name(String),
        }
        match Either::deserialize(deserializer)? {
            Either::Keep(true) => Ok(NetworkMode::Keep),
            Either::Keep(false) => Ok(NetworkMode::Disconnect),
            Either::Name(name) => name.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The NICs' fate in a live mount: a mode and a map of network names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPlan {
    pub mode: NetworkMode,
    /// `OLD -> NEW`: libvirt network or bridge names, `.vmx` port group names (`networkName`,
    /// or a distributed port group's `dvs.portgroupId`). Every entry must match a NIC of the
    /// config: an entry that matches none is an error naming it (a typo must not pass).
    pub map: BTreeMap<String, String>,
    /// Applied to a NIC whose network `map` does not name (the media agent's default map);
    /// entries no NIC uses are ignored.
    pub default_map: BTreeMap<String, String>,
    /// `disconnect` as mounts made before the plan existed had it: the link down and nothing
    /// else (a libvirt NIC keeps naming its network), so that such a mount serves the same
    /// config bytes after an upgrade.
    pub legacy_link_down_only: bool,
}

impl NetworkPlan {
    /// The new name for a NIC's network `old`, if either map has one.
    pub(super) fn target(&self, old: &str) -> Option<&str> {
        self.map
            .get(old)
            .or_else(|| self.default_map.get(old))
            .map(String::as_str)
    }
}

/// What a live mount did with one NIC.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NicReport {
    /// The NIC: `ethernetN` in a `.vmx`, `interface N` (its position, from 0) in domain XML.
    pub nic: String,
    /// Its new MAC address (none for a removed libvirt interface).
    #[serde(default)]
    pub mac: Option<String>,
    /// What kind of thing `network` is: `network`, `bridge` (libvirt), `port group`,
    /// `distributed port group` (`.vmx`).
    #[serde(default)]
    pub kind: Option<String>,
    /// The name of what it was attached to (none when the config names nothing, e.g. a libvirt
    /// `type='user'` interface): what the map's OLD names match.
    #[serde(default)]
    pub network: Option<String>,
    /// The network it was mapped to (of the same kind).
    #[serde(default)]
    pub mapped_to: Option<String>,
    pub action: NicAction,
}

/// The fate of one NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NicAction {
    /// Left connected.
    Kept,
    /// Starts unplugged, still on its (possibly mapped) network.
    Disconnected,
    /// Starts unplugged and names no host network any more (libvirt: now `type='user'`).
    Detached,
    /// Gone from the config (or not present).
    Removed,
}

impl std::fmt::Display for NicReport {
    /// `NIC interface 0 (52:54:00:12:34:56): network default -> lab (disconnected)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NIC {}", self.nic)?;
        if let Some(mac) = &self.mac {
            write!(f, " ({mac})")?;
        }
        match (&self.kind, &self.network) {
            (Some(kind), Some(network)) => write!(f, ": {kind} {network}")?,
            (None, Some(network)) => write!(f, ": {network}")?,
            (Some(kind), None) => write!(f, ": {kind}")?,
            _ => write!(f, ": no host network")?,
        }
        if let Some(to) = &self.mapped_to {
            write!(f, " -> {to}")?;
        }
        let action = match self.action {
            NicAction::Kept => "kept connected",
            NicAction::Disconnected => "disconnected",
            NicAction::Detached => "disconnected, now type='user' with no host network",
            NicAction::Removed => "removed",
        };
        write!(f, " ({action})")
    }
}

/// A rewritten config and what was done to its NICs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewritten {
    pub bytes: Vec<u8>,
    pub nics: Vec<NicReport>,
    /// The hypervisor the config is for.
    pub hypervisor: Hypervisor,
    /// A converted config: what each device became and what was left behind (empty without a
    /// conversion).
    pub devices: Vec<DeviceReport>,
    /// A converted config: each disk's place in it (`sata0:1`, `sdb`), in the source's disk
    /// order (empty without a conversion).
    pub disk_slots: Vec<String>,
}

/// Where one disk of the rewritten config points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskTarget {
    /// `.vmx`: the new `fileName` (a descriptor in the mount folder, e.g. `web01.vmdk`).
    VmdkFile(String),
    /// libvirt: a local path (a file disk, driver type raw).
    RawFile(String),
    /// libvirt: a network disk read over NFS (`<source protocol='nfs' name='PATH'><host
    /// name='HOST'/></source>`, driver type raw). `path` is the export path plus the file.
    Nfs { host: String, path: String },
}

impl DiskTarget {
    /// The variant's name, for messages.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            DiskTarget::VmdkFile(_) => "VmdkFile",
            DiskTarget::RawFile(_) => "RawFile",
            DiskTarget::Nfs { .. } => "Nfs",
        }
    }
}

/// Rewrites a config (`.vmx` or libvirt domain XML, told apart as [`super::parse`] does) for a
/// live mount. `file` names the config in errors.
///
/// Errors: the config does not parse (the parse error), the new name or UUID is unusable, the
/// number of disk targets differs from the number of disks, or a target is of the wrong kind for
/// the hypervisor ([`VmConfigError::Invalid`]).
pub fn rewrite_for_mount(
    file: &str,
    original: &[u8],
    how: &MountRewrite,
) -> Result<Vec<u8>, VmConfigError> {
    rewrite_for_mount_reported(file, original, how).map(|done| done.bytes)
}

/// [`rewrite_for_mount`], with the report of what was done to each NIC.
///
/// Errors also: a `map` entry that no NIC's network matches (naming it and the networks the
/// config uses), a map with mode remove, or an empty or control-character name in the map.
pub fn rewrite_for_mount_reported(
    file: &str,
    original: &[u8],
    how: &MountRewrite,
) -> Result<Rewritten, VmConfigError> {
    let config = super::parse(file, original)?;
    let invalid = |what: String| VmConfigError::Invalid {
        file: file.to_owned(),
        what,
    };
    let name = &how.display_name;
    if name.trim().is_empty() || name.trim() != name || has_control(name) {
        return Err(invalid(format!(
            "the new display name {name:?} is empty, starts or ends with whitespace, or \
             contains control characters"
        )));
    }
    let uuid = uuid_bytes(&how.uuid).ok_or_else(|| {
        invalid(format!(
            "the new UUID {:?} is not in 8-4-4-4-12 form (e.g. \
             3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05)",
            how.uuid
        ))
    })?;
    check_disk_count(&config, how).map_err(invalid)?;
    check_map(&how.network).map_err(invalid)?;
    let converted = match how.convert {
        Some(conversion) if conversion.to != config.hypervisor => {
            let files = how
                .disks
                .iter()
                .map(|target| match target {
                    DiskTarget::VmdkFile(name) | DiskTarget::RawFile(name) => name.clone(),
                    DiskTarget::Nfs { path, .. } => path.clone(),
                })
                .collect::<Vec<_>>();
            Some(super::convert::convert(
                file,
                original,
                &config,
                &conversion,
                &files,
            )?)
        }
        _ => None,
    };
    let (bytes, nics, hypervisor, devices, disk_slots) = match converted {
        None => {
            let (bytes, nics) = rewrite_as(file, original, how, &config, &uuid)?;
            (bytes, nics, config.hypervisor, Vec::new(), Vec::new())
        }
        Some(converted) => {
            let config = super::parse(file, &converted.bytes)?;
            let mut how = how.clone();
            how.disks = converted
                .order
                .iter()
                .map(|&source| how.disks[source].clone())
                .collect();
            let (bytes, nics) = rewrite_as(file, &converted.bytes, &how, &config, &uuid)?;
            (
                bytes,
                nics,
                config.hypervisor,
                converted.devices,
                converted.slots,
            )
        }
    };
    check_map_used(&how.network, &nics).map_err(invalid)?;
    Ok(Rewritten {
        bytes,
        nics,
        hypervisor,
        devices,
        disk_slots,
    })
}

/// The rewrite of a config of either format (`config` is what `original` parses into).
fn rewrite_as(
    file: &str,
    original: &[u8],
    how: &MountRewrite,
    config: &VmConfig,
    uuid: &[u8; 16],
) -> Result<(Vec<u8>, Vec<NicReport>), VmConfigError> {
    match config.hypervisor {
        Hypervisor::Esxi => super::vmx_rewrite::rewrite(file, original, how, config, uuid),
        Hypervisor::Kvm => super::libvirt_rewrite::rewrite(file, original, how, config, uuid),
    }
}

fn check_map(plan: &NetworkPlan) -> Result<(), String> {
    if plan.mode == NetworkMode::Remove && !plan.map.is_empty() {
        return Err("a network map has no use when the NICs are removed".to_owned());
    }
    check_network_map(&plan.map)?;
    check_network_map(&plan.default_map)
}

/// A network map's names: none empty, none with control characters (serve checks its
/// default map with this at start, so a bad entry cannot fail every later mount).
pub fn check_network_map(map: &BTreeMap<String, String>) -> Result<(), String> {
    for (old, new) in map {
        for name in [old, new] {
            if name.is_empty() || has_control(name) {
                return Err(format!(
                    "network map {old:?}={new:?}: a name is empty or has control characters"
                ));
            }
        }
    }
    Ok(())
}

/// Every entry of the request's map must have matched a NIC's network.
fn check_map_used(plan: &NetworkPlan, nics: &[NicReport]) -> Result<(), String> {
    let used: HashSet<&str> = nics
        .iter()
        .filter_map(|nic| nic.network.as_deref())
        .collect();
    let unused: Vec<&str> = plan
        .map
        .keys()
        .map(String::as_str)
        .filter(|old| !used.contains(old))
        .collect();
    if unused.is_empty() {
        return Ok(());
    }
    let mut networks: Vec<String> = Vec::new();
    for nic in nics {
        if let (Some(kind), Some(network)) = (&nic.kind, &nic.network) {
            let named = format!("{kind} {network:?}");
            if !networks.contains(&named) {
                networks.push(named);
            }
        }
    }
    Err(format!(
        "network map: no NIC uses {} (the config's NICs use: {})",
        unused
            .iter()
            .map(|old| format!("{old:?}"))
            .collect::<Vec<_>>()
            .join(", "),
        if networks.is_empty() {
            "nothing".to_owned()
        } else {
            networks.join(", ")
        }
    ))
}

fn check_disk_count(config: &VmConfig, how: &MountRewrite) -> Result<(), String> {
    if how.disks.len() == config.disks.len() {
        return Ok(());
    }
    let devices: Vec<&str> = config.disks.iter().map(|d| d.device.as_str()).collect();
    Err(format!(
        "{} disk target(s) given, but the config has {} disk(s) ({})",
        how.disks.len(),
        config.disks.len(),
        if devices.is_empty() {
            "none".to_owned()
        } else {
            devices.join(", ")
        }
    ))
}

/// True if `text` holds a control character (none of which a config can carry in a name or
/// path: XML 1.0 forbids most, and the rest would at best be confusing).
pub(super) fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// The 16 bytes of an 8-4-4-4-12 UUID (hex digits in either case); None for anything else.
pub(super) fn uuid_bytes(text: &str) -> Option<[u8; 16]> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut hex = Vec::with_capacity(32);
    for (at, &b) in bytes.iter().enumerate() {
        if matches!(at, 8 | 13 | 18 | 23) {
            if b != b'-' {
                return None;
            }
        } else {
            hex.push(hex_value(b)?);
        }
    }
    let mut out = [0u8; 16];
    for (slot, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *slot = pair[0] << 4 | pair[1];
    }
    Some(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Lowercase 8-4-4-4-12 form of 16 bytes.
pub(super) fn dashed(uuid: &[u8; 16]) -> String {
    let mut out = String::with_capacity(36);
    for (at, byte) in uuid.iter().enumerate() {
        if matches!(at, 4 | 6 | 8 | 10) {
            out.push('-');
        }
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Hands out MAC addresses `PREFIX:XX:XX:XX` derived from a seed: the address for a NIC depends
/// only on the seed, a context naming the format, the NIC's number and the addresses handed out
/// before it, and no address is handed out twice.
pub(super) struct MacSource {
    seed: [u8; 32],
    context: &'static str,
    prefix: [u8; 3],
    /// Mask for the fourth byte (VMware's static range is `00:50:56:00..3F`).
    fourth_mask: u8,
    used: HashSet<[u8; 3]>,
}

impl MacSource {
    /// VMware's range for static addresses: `00:50:56:00:00:00` to `00:50:56:3F:FF:FF`.
    pub(super) fn vmware(seed: [u8; 32]) -> Self {
        MacSource {
            seed,
            context: "livemount vmx nic",
            prefix: [0x00, 0x50, 0x56],
            fourth_mask: 0x3F,
            used: HashSet::new(),
        }
    }

    /// QEMU/KVM's locally administered prefix `52:54:00`.
    pub(super) fn qemu(seed: [u8; 32]) -> Self {
        MacSource {
            seed,
            context: "livemount libvirt nic",
            prefix: [0x52, 0x54, 0x00],
            fourth_mask: 0xFF,
            used: HashSet::new(),
        }
    }

    /// The address for NIC number `nic` (`ethernetN`'s N, or the `<interface>`'s position), as
    /// `xx:xx:xx:xx:xx:xx` in lowercase.
    pub(super) fn next(&mut self, nic: u64) -> String {
        let mut attempt: u64 = 0;
        let tail = loop {
            let mut hasher = blake3::Hasher::new_keyed(&self.seed);
            hasher.update(self.context.as_bytes());
            hasher.update(&nic.to_le_bytes());
            hasher.update(&attempt.to_le_bytes());
            let hash = hasher.finalize();
            let bytes = hash.as_bytes();
            let tail = [bytes[0] & self.fourth_mask, bytes[1], bytes[2]];
            // The space holds millions of addresses and a config a handful of NICs, so a
            // repeat is rare and another attempt soon finds a free one.
            if self.used.insert(tail) {
                break tail;
            }
            attempt = attempt.wrapping_add(1);
        };
        let [a, b, c] = self.prefix;
        let [d, e, f] = tail;
        format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_bytes_accepts_only_the_dashed_form() {
        let bytes = uuid_bytes("3F9C2A71-5be4-4d0e-9a86-c21f7d4e8b05").unwrap();
        assert_eq!(bytes[0], 0x3f);
        assert_eq!(bytes[15], 0x05);
        assert_eq!(dashed(&bytes), "3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05");
        for bad in [
            "3f9c2a715be44d0e9a86c21f7d4e8b05",
            "3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b0",
            "3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b0g",
            "3f9c2a7-15be4-4d0e-9a86-c21f7d4e8b05",
            "",
        ] {
            assert_eq!(uuid_bytes(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn macs_are_deterministic_distinct_and_in_range() {
        let seed = [7u8; 32];
        let mut first = MacSource::vmware(seed);
        let mut second = MacSource::vmware(seed);
        let a: Vec<String> = (0..200).map(|n| first.next(n)).collect();
        let b: Vec<String> = (0..200).map(|n| second.next(n)).collect();
        assert_eq!(a, b);
        let distinct: HashSet<&String> = a.iter().collect();
        assert_eq!(distinct.len(), a.len());
        for mac in &a {
            assert!(mac.starts_with("00:50:56:"), "{mac}");
            let fourth = u8::from_str_radix(&mac[9..11], 16).unwrap();
            assert!(fourth <= 0x3F, "{mac}");
        }
        let mut other = MacSource::vmware([8u8; 32]);
        assert_ne!(other.next(0), a[0]);
        let mut qemu = MacSource::qemu(seed);
        assert!(qemu.next(0).starts_with("52:54:00:"));
    }

    #[test]
    fn a_repeated_nic_number_still_gets_a_new_address() {
        let mut source = MacSource::qemu([1u8; 32]);
        let first = source.next(0);
        let second = source.next(0);
        assert_ne!(first, second);
    }
}
