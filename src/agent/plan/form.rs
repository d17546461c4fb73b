//! A recovery plan's form: [`Plan`] and its [`PlanEntry`]s, read from the operator's TOML
//! (each entry on its own, so that an error names it) and carried over the API as JSON; and
//! what a mount's spec says about the snapshot an entry names.
//! Must not: look at the agent's state or the repository.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::DEFAULT_GROUP_WAIT;
use crate::agent::{MountRequest, PrestageMode};
use crate::mount::MountSpec;
use crate::vmconfig::{DiskBus, Hypervisor, NetworkMode, NicModel};

/// `snapshot = "latest"`: the VM's latest snapshot (with `at`: its latest at or before it).
pub const LATEST: &str = "latest";

/// A recovery plan.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// How long a group's VMs are given to boot before the next group is mounted, e.g.
    /// `"90s"` (default [`DEFAULT_GROUP_WAIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    /// The entries, `[[vm]]` in TOML.
    #[serde(default)]
    pub vm: Vec<PlanEntry>,
}

/// One VM of a plan: what to mount, under which name, in which group; the other keys are
/// `livemount mount`'s options under its flags' names.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanEntry {
    /// The VM's name in the repository.
    pub vm: String,
    /// `latest` (default), a snapshot id prefix, or `VM@TIME`.
    #[serde(default = "latest")]
    pub snapshot: String,
    /// With `latest`: the latest snapshot at or before this RFC 3339 time (`mount --at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// The mount's name (`mount --name`); required, so that applying the plan again finds it.
    pub name: String,
    /// 1 is mounted first, then 2, ... (default 1).
    #[serde(default = "first_group")]
    pub group: i64,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub network: NetworkMode,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_map: BTreeMap<String, String>,
    /// `mount --allow`: only these hosts (addresses or CIDRs) may use the mount; each must be
    /// within the server's own `--allow` list. `hosts` is read the same.
    #[serde(default, alias = "hosts", skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default)]
    pub disks_only: bool,
    /// `background` (default): the mount pre-stages its boot set, and the plan warms it into
    /// the disk cache while the group before boots; `off`: neither. `wait` is `background`.
    #[serde(default)]
    pub prestage: PrestageMode,
    /// `mount --for`: the hypervisor to recover on.
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub target: Option<Hypervisor>,
    #[serde(default, skip_serializing_if = "DiskBus::is_auto")]
    pub disk_bus: DiskBus,
    #[serde(default, skip_serializing_if = "NicModel::is_auto")]
    pub nic_model: NicModel,
}

fn latest() -> String {
    LATEST.to_owned()
}

fn first_group() -> i64 {
    1
}

impl Plan {
    /// Reads a plan file's text. Errors name the entry (`entry 2 (vm db01, name db01-dr)`)
    /// and the key; every bad entry is named, not only the first.
    pub fn from_toml(text: &str) -> Result<Plan, String> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
        let mut plan = Plan::default();
        let mut problems = Vec::new();
        for (key, value) in table {
            match key.as_str() {
                "wait" => match value {
                    toml::Value::String(s) => plan.wait = Some(s),
                    other => problems.push(format!(
                        "wait = {other}: write it as a duration in quotes, e.g. wait = \"90s\""
                    )),
                },
                "vm" => {
                    let Some(items) = value.as_array() else {
                        problems.push("`vm` must be a list of [[vm]] tables".into());
                        continue;
                    };
                    for (i, item) in items.iter().enumerate() {
                        match item.clone().try_into::<PlanEntry>() {
                            Ok(e) => plan.vm.push(e),
                            Err(e) => problems.push(format!(
                                "{}: {}",
                                raw_label(i + 1, item),
                                e.message()
                            )),
                        }
                    }
                }
                other => problems.push(format!(
                    "unknown key `{other}` at the top of the plan; a plan has `wait` and [[vm]] entries"
                )),
            }
        }
        if problems.is_empty() {
            Ok(plan)
        } else {
            Err(problems.join("\n"))
        }
    }

    /// The plan's id: a hash of its JSON form, the same for the same file.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        blake3::hash(&json).to_hex()[..16].to_string()
    }

    /// The groups, in order.
    pub(super) fn groups(&self) -> Vec<i64> {
        let set: BTreeSet<i64> = self.vm.iter().map(|e| e.group).collect();
        set.into_iter().collect()
    }
}

/// `entry N (vm V, name M)` of an entry that did not parse, from what it has.
fn raw_label(index: usize, item: &toml::Value) -> String {
    let get = |k| {
        item.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_owned()
    };
    format!("entry {index} (vm {}, name {})", get("vm"), get("name"))
}

impl PlanEntry {
    pub(super) fn label(&self, index: usize) -> String {
        format!("entry {index} (vm {}, name {})", self.vm, self.name)
    }

    pub(super) fn is_latest(&self) -> bool {
        let s = self.snapshot.trim();
        s.eq_ignore_ascii_case(LATEST) || s == self.vm
    }

    /// The mount request for the resolved snapshot `id`.
    pub(super) fn request(&self, id: &str) -> MountRequest {
        MountRequest {
            snapshot: id.to_owned(),
            at: None,
            name: Some(self.name.clone()),
            read_only: self.read_only,
            network: self.network,
            network_map: self.network_map.clone(),
            disks_only: self.disks_only,
            hosts: self.allow.clone(),
            prestage: self.prestage,
            target: self.target,
            disk_bus: self.disk_bus,
            nic_model: self.nic_model,
        }
    }
}

/// The plan's `wait`, checked.
pub(super) fn plan_wait(plan: &Plan) -> Result<Duration, String> {
    match &plan.wait {
        None => Ok(DEFAULT_GROUP_WAIT),
        Some(t) => crate::units::parse_duration(t).map_err(|e| format!("wait = {t:?}: {e}")),
    }
}

/// Whether the mount `m` holds the snapshot the entry names, judged from its spec alone:
/// `latest` is any snapshot of the VM (the one latest when it was mounted; with `at`, one
/// taken at or before it), an id prefix must match, `VM@TIME` must be that time.
pub(super) fn names_snapshot(e: &PlanEntry, at: Option<jiff::Timestamp>, m: &MountSpec) -> bool {
    let taken = |name: &str| {
        name.rsplit_once('@')
            .and_then(|(_, t)| t.parse::<jiff::Timestamp>().ok())
    };
    if e.is_latest() {
        return match at {
            None => true,
            Some(at) => taken(&m.snapshot_name).is_some_and(|t| t <= at),
        };
    }
    let text = e.snapshot.trim();
    match text.rsplit_once('@') {
        Some((vm, _)) => {
            vm == e.vm && taken(text).is_some() && taken(text) == taken(&m.snapshot_name)
        }
        None => m
            .snapshot
            .to_string()
            .starts_with(&text.to_ascii_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::check_name;

    fn parse(text: &str) -> Result<Plan, String> {
        Plan::from_toml(text)
    }

    #[test]
    fn a_plan_reads_entries_with_defaults_and_mount_options() {
        let plan = parse(
            r#"
            wait = "90s"
            [[vm]]
            vm = "db01"
            name = "db01-dr"
            [[vm]]
            vm = "web01"
            snapshot = "web01@2026-11-20T10:00:00Z"
            name = "web01-dr"
            group = 2
            read_only = true
            network = "keep"
            network_map = { default = "lab" }
            hosts = ["10.0.0.0/8"]
            for = "esxi"
            disk_bus = "sata"
            prestage = "off"
            "#,
        )
        .unwrap();
        assert_eq!(plan.wait.as_deref(), Some("90s"));
        let (a, b) = (&plan.vm[0], &plan.vm[1]);
        assert_eq!((a.snapshot.as_str(), a.group), ("latest", 1));
        assert!(a.is_latest() && !b.is_latest());
        assert_eq!(a.network, NetworkMode::Disconnect);
        assert_eq!(a.prestage, PrestageMode::Background);
        assert_eq!(b.network, NetworkMode::Keep);
        assert_eq!(b.network_map["default"], "lab");
        assert_eq!(b.allow, ["10.0.0.0/8"]);
        assert_eq!(b.target, Some(Hypervisor::Esxi));
        assert_eq!(b.disk_bus, DiskBus::Sata);
        assert_eq!(b.prestage, PrestageMode::Off);
        assert_eq!(plan.groups(), [1, 2]);
        // The JSON the CLI sends reads back the same, with the same id.
        let json = serde_json::to_string(&plan).unwrap();
        let back: Plan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
        assert_eq!(back.id(), plan.id());
        assert_eq!(plan.id().len(), 16);
        let req = b.request("abcd");
        assert_eq!(req.name.as_deref(), Some("web01-dr"));
        assert_eq!(req.hosts, ["10.0.0.0/8"]);
        assert!(req.read_only && req.at.is_none());
    }

    #[test]
    fn unknown_keys_are_refused_naming_the_key_and_the_entry() {
        let err = parse(
            "[[vm]]\nvm = \"a\"\nname = \"a1\"\n[[vm]]\nvm = \"db01\"\nname = \"db01-dr\"\ncolour = \"red\"\n",
        )
        .unwrap_err();
        assert!(
            err.contains("entry 2 (vm db01, name db01-dr)")
                && err.contains("unknown field `colour`"),
            "{err}"
        );
        let err =
            parse("[[vm]]\nname = \"x\"\n[[vm]]\nvm = \"b\"\nnetwork = \"off\"\n").unwrap_err();
        assert!(
            err.contains("entry 1 (vm ?, name x): missing field `vm`"),
            "{err}"
        );
        assert!(err.contains("entry 2 (vm b, name ?)"), "{err}");
        let err = parse("waits = \"1s\"\n").unwrap_err();
        assert!(err.contains("unknown key `waits`"), "{err}");
        let err = parse("wait = 5\n").unwrap_err();
        assert!(err.contains("wait = \"90s\""), "{err}");
        assert!(parse("[[vm\n").is_err());
        // An empty file is a plan with no entries: the agent refuses it.
        assert!(parse("").unwrap().vm.is_empty());
    }

    #[test]
    fn the_example_plan_reads() {
        let text = include_str!("../../../examples/recovery-plan.toml");
        let plan = Plan::from_toml(text).unwrap();
        assert_eq!(plan.vm.len(), 4);
        assert_eq!(plan.groups(), [1, 2, 3]);
        assert!(plan_wait(&plan).is_ok());
        for e in &plan.vm {
            check_name(&e.name).unwrap();
        }
        assert_eq!(plan.vm[1].network, NetworkMode::Keep);
        assert_eq!(plan.vm[2].allow, ["10.20.0.0/16"]);
        assert_eq!(plan.vm[3].target, Some(Hypervisor::Kvm));
    }

    fn spec(name: &str, snapshot_name: &str, id: char) -> MountSpec {
        MountSpec {
            name: name.into(),
            id: 1,
            snapshot: crate::repo::SnapshotId::from_hex(&id.to_string().repeat(64)).unwrap(),
            snapshot_name: snapshot_name.into(),
            read_only: false,
            network: NetworkMode::Disconnect,
            network_map: BTreeMap::new(),
            default_network_map: BTreeMap::new(),
            network_rewrite: crate::mount::NETWORK_REWRITE,
            created: jiff::Timestamp::UNIX_EPOCH,
            hosts: Vec::new(),
            disks_only: false,
            convert: None,
        }
    }

    fn entry(snapshot: &str) -> PlanEntry {
        let mut p = parse(&format!(
            "[[vm]]\nvm = \"db01\"\nname = \"d\"\nsnapshot = \"{snapshot}\"\n"
        ))
        .unwrap();
        p.vm.remove(0)
    }

    #[test]
    fn a_mounted_snapshot_is_matched_from_its_spec() {
        let m = spec("d", "db01@2026-11-20T10:00:00Z", 'a');
        assert!(names_snapshot(&entry("latest"), None, &m));
        assert!(names_snapshot(&entry("db01"), None, &m));
        let at = |t: &str| Some(t.parse().unwrap());
        assert!(names_snapshot(
            &entry("latest"),
            at("2026-11-20T10:00:00Z"),
            &m
        ));
        assert!(!names_snapshot(
            &entry("latest"),
            at("2026-11-20T09:59:59Z"),
            &m
        ));
        assert!(names_snapshot(
            &entry("db01@2026-11-20T10:00:00Z"),
            None,
            &m
        ));
        assert!(names_snapshot(
            &entry("db01@2026-11-20T11:00:00+01:00"),
            None,
            &m
        ));
        assert!(!names_snapshot(
            &entry("db01@2026-11-21T10:00:00Z"),
            None,
            &m
        ));
        assert!(!names_snapshot(
            &entry("web01@2026-11-20T10:00:00Z"),
            None,
            &m
        ));
        assert!(names_snapshot(&entry("aaaa"), None, &m));
        assert!(names_snapshot(&entry("AAAAaa"), None, &m));
        assert!(!names_snapshot(&entry("aaab"), None, &m));
    }
}
