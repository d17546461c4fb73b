//! Recovery plans (`livemount plan apply|status`, decision 0032): a list of VMs mounted in
//! groups, group 1 first; while a group's VMs boot, the next group's boot sets are warmed into
//! the disk cache (the warm-up of `livemount prestage`), then that group is mounted.
//!
//! Owns: the plan's form ([`Plan`], [`PlanEntry`]; TOML from the operator, JSON over the API),
//! its validation (whole, before anything is mounted), the runs of plans (one background task
//! each, kept in memory by plan id) and where each entry stands ([`PlanStatus`]).
//! Must not: mount, warm or unmount by any other path than [`Agent::mount`] and
//! [`Agent::warm`]; a plan adds no state on disk (its mounts' specs are the state: applying a
//! plan again finds them).
//! Ordering: a run mounts its entries one at a time, in group order and then in the plan's
//! order; it checks the agent's stop between steps, never inside a mount, so a stop never
//! leaves a mount half made. Locking: each run's state is a `std::sync::Mutex` held for short
//! sections only, never across an await.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{conversion, Agent, MountRequest, PrestageMode, WarmRequest};
use crate::allow::AllowList;
use crate::mount::{check_name, LiveMount, MountSpec};
use crate::prestage::{PrestageStatus, WindowStatus};
use crate::repo::{SnapshotInfo, SnapshotSpec};
use crate::vmconfig::{DiskBus, Hypervisor, NetworkMode, NicModel};

/// The most entries a plan may have (a site's worth of VMs, with room to spare).
pub const MAX_PLAN_ENTRIES: usize = 1000;
/// How long a group's VMs are given to boot before the next group is mounted, unless the
/// plan's `wait` says otherwise: the boot window's default limit.
pub const DEFAULT_GROUP_WAIT: Duration = Duration::from_secs(120);
/// Runs of plans kept for `GET /v1/plans/{id}`; past it the oldest finished run is forgotten.
pub const MAX_RUNS: usize = 64;
/// How often a run looks whether a group's VMs have booted.
const BOOT_POLL: Duration = Duration::from_millis(250);
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
    fn groups(&self) -> Vec<i64> {
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
    fn label(&self, index: usize) -> String {
        format!("entry {index} (vm {}, name {})", self.vm, self.name)
    }

    fn is_latest(&self) -> bool {
        let s = self.snapshot.trim();
        s.eq_ignore_ascii_case(LATEST) || s == self.vm
    }

    /// The mount request for the resolved snapshot `id`.
    fn request(&self, id: &str) -> MountRequest {
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

/// Why a plan was not applied.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the plan was refused and nothing was mounted:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { problems: Vec<String> },
    #[error("plan {other} is being applied and mounts {name} too; wait for it (`livemount plan status`) and apply this one after")]
    Busy { other: String, name: String },
    #[error("no run of plan {id} on this server since it started; `livemount plan status PLAN.toml` shows where its entries stand")]
    NotFound { id: String },
    #[error("the server is stopping; apply the plan again once it runs")]
    Stopping,
}

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// No mount of its name (and no warm-up of its boot set running).
    NotMounted,
    /// Not mounted; its boot set is being warmed into the disk cache.
    Prestaging,
    /// Mounted; its VM has not read anything yet (or the mount records no boot).
    Mounted,
    /// Mounted; its VM is in its boot window.
    Booting,
    /// Mounted; its boot window has ended (quiet, or at its limit).
    Booted,
    /// Its mount failed in this plan's run.
    Failed,
    /// A mount of its name holds another VM or snapshot than the entry says.
    Conflict,
}

impl EntryState {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryState::NotMounted => "not mounted",
            EntryState::Prestaging => "pre-staging",
            EntryState::Mounted => "mounted",
            EntryState::Booting => "booting",
            EntryState::Booted => "booted",
            EntryState::Failed => "failed",
            EntryState::Conflict => "conflict",
        }
    }
}

/// What a run did with an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Mounted by this run.
    Mounted,
    /// Found mounted as the plan says: left as it was.
    AlreadyMounted,
}

/// One entry as `plan status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EntryStatus {
    /// 1 for the first `[[vm]]`.
    pub index: usize,
    pub vm: String,
    pub name: String,
    pub group: i64,
    pub state: EntryState,
    /// What this plan's run did with it; none: nothing yet, or no run.
    #[serde(default)]
    pub action: Option<Action>,
    /// `VM@TIME` mounted (or to be mounted, once the run has resolved it).
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub mount_id: Option<u32>,
    #[serde(default)]
    pub created: Option<jiff::Timestamp>,
    /// Not mounted: the warm-up of its boot set into the disk cache; mounted: the mount's own
    /// pre-staging.
    #[serde(default)]
    pub prestage: Option<PrestageStatus>,
    #[serde(default)]
    pub window: Option<WindowStatus>,
    /// Why its mount failed, or what conflicts.
    #[serde(default)]
    pub error: Option<String>,
    /// Anything else worth knowing (no warm-up, and why).
    #[serde(default)]
    pub note: Option<String>,
}

/// How a run ended, or that it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunPhase {
    Running,
    /// Every group is mounted.
    Done,
    /// A mount failed: the run stopped there (see `error`).
    Failed,
    /// The server stopped before the run ended.
    Stopped,
}

/// A plan's run on this server.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunInfo {
    pub phase: RunPhase,
    /// The group being mounted or waited for.
    pub group: Option<i64>,
    pub groups: Vec<i64>,
    pub wait_seconds: f64,
    pub started: jiff::Timestamp,
    #[serde(default)]
    pub finished: Option<jiff::Timestamp>,
    /// What stopped the run, and how to undo or go on.
    #[serde(default)]
    pub error: Option<String>,
    /// What happened, in order (a line each).
    pub events: Vec<String>,
}

/// A plan as `plan status` and `plan apply` show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlanStatus {
    pub id: String,
    /// This server's run of the plan, if it has one since it started.
    #[serde(default)]
    pub run: Option<RunInfo>,
    pub entries: Vec<EntryStatus>,
}

/// The agent's plans: runs by plan id, and the server's allow list.
#[derive(Debug, Default)]
pub(super) struct Plans {
    runs: Mutex<BTreeMap<String, Arc<Run>>>,
    allow: OnceLock<AllowList>,
}

#[derive(Debug)]
struct Run {
    plan: Plan,
    started: jiff::Timestamp,
    wait: Duration,
    state: Mutex<RunState>,
}

#[derive(Debug)]
struct RunState {
    phase: RunPhase,
    group: Option<i64>,
    finished: Option<jiff::Timestamp>,
    error: Option<String>,
    events: Vec<String>,
    entries: Vec<EntryRun>,
}

#[derive(Debug, Default, Clone)]
struct EntryRun {
    action: Option<Action>,
    /// The snapshot's id and name, once resolved.
    snapshot: Option<(String, String)>,
    error: Option<String>,
    note: Option<String>,
}

impl Run {
    fn state(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn event(&self, text: String) {
        tracing::info!(plan = %self.plan.id(), "{text}");
        self.state().events.push(text);
    }

    fn running(&self) -> bool {
        self.state().phase == RunPhase::Running
    }
}

/// What validation found for one entry.
enum Checked {
    /// Mounted as the entry says.
    Mounted,
    /// To mount: this request, of this snapshot.
    ToMount(Box<(MountRequest, SnapshotInfo)>),
}

impl Agent {
    /// The server's allow list, against which a plan's `allow` entries are checked; once,
    /// at the start (serve). Without it they are checked for form only.
    pub fn set_allow_list(&self, allow: AllowList) {
        let _ = self.plans.allow.set(allow);
    }

    /// Checks the plan whole and, if it is good, starts applying it in the background (or
    /// returns the run of the same plan under way). Nothing is mounted when it is refused.
    pub async fn apply_plan(self: &Arc<Self>, plan: Plan) -> Result<PlanStatus, PlanError> {
        if self.stop.is_cancelled() {
            return Err(PlanError::Stopping);
        }
        let id = plan.id();
        if let Some(run) = self.run_of(&id).filter(|r| r.running()) {
            return Ok(self.status_of(&run.plan, Some(&run)));
        }
        self.check_busy(&plan, &id)?;
        let checked = self.check_plan(&plan).await?;
        let wait = plan_wait(&plan).map_err(|p| PlanError::Invalid { problems: vec![p] })?;
        let entries = checked
            .iter()
            .map(|c| match c {
                Checked::Mounted => EntryRun {
                    action: Some(Action::AlreadyMounted),
                    ..Default::default()
                },
                Checked::ToMount(m) => EntryRun {
                    snapshot: Some((m.1.id.to_string(), m.1.name.clone())),
                    ..Default::default()
                },
            })
            .collect();
        let run = Arc::new(Run {
            plan: plan.clone(),
            started: jiff::Timestamp::now(),
            wait,
            state: Mutex::new(RunState {
                phase: RunPhase::Running,
                group: None,
                finished: None,
                error: None,
                events: Vec::new(),
                entries,
            }),
        });
        let under_way = {
            let mut runs = self.plans.runs.lock().unwrap_or_else(|p| p.into_inner());
            // A request for the same plan may have started it meanwhile: it stands.
            match runs.get(&id).filter(|r| r.running()) {
                Some(r) => Some(r.clone()),
                None => {
                    runs.insert(id.clone(), run.clone());
                    None
                }
            }
        };
        if let Some(r) = under_way {
            return Ok(self.status_of(&r.plan, Some(&r)));
        }
        {
            let mut runs = self.plans.runs.lock().unwrap_or_else(|p| p.into_inner());
            while runs.len() > MAX_RUNS {
                let oldest = runs
                    .iter()
                    .filter(|(_, r)| !r.running())
                    .min_by_key(|(_, r)| r.started)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => runs.remove(&k),
                    None => break,
                };
            }
        }
        let todo: Vec<Option<MountRequest>> = checked
            .into_iter()
            .map(|c| match c {
                Checked::Mounted => None,
                Checked::ToMount(m) => Some(m.0),
            })
            .collect();
        let already = todo.iter().filter(|t| t.is_none()).count();
        run.event(format!(
            "plan {id}: {} entries in {} group(s); {already} mounted as the plan says already",
            plan.vm.len(),
            plan.groups().len()
        ));
        // Not through `spawn_task`: a stop must not cut a mount at an await; the run checks
        // the stop between its steps instead.
        let (agent, r) = (self.clone(), run.clone());
        self.tasks
            .spawn(async move { agent.run_plan(r, todo).await });
        Ok(self.status_of(&plan, Some(&run)))
    }

    /// The run of plan `id` on this server.
    pub fn plan_run_status(&self, id: &str) -> Result<PlanStatus, PlanError> {
        let run = self
            .run_of(id)
            .ok_or_else(|| PlanError::NotFound { id: id.to_owned() })?;
        Ok(self.status_of(&run.plan, Some(&run)))
    }

    /// Where each entry of `plan` stands, from the mounts (and this server's run of the plan,
    /// if it has one). Reads nothing from the repository.
    pub fn plan_status(&self, plan: &Plan) -> PlanStatus {
        let run = self.run_of(&plan.id());
        self.status_of(plan, run.as_ref())
    }

    fn run_of(&self, id: &str) -> Option<Arc<Run>> {
        let runs = self.plans.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.get(id).cloned()
    }

    /// Refuses a plan while another plan's run that mounts one of its names is under way.
    fn check_busy(&self, plan: &Plan, id: &str) -> Result<(), PlanError> {
        let runs = self.plans.runs.lock().unwrap_or_else(|p| p.into_inner());
        for (other, r) in runs.iter().filter(|(k, r)| *k != id && r.running()) {
            if let Some(e) = plan
                .vm
                .iter()
                .find(|e| r.plan.vm.iter().any(|o| o.name == e.name))
            {
                return Err(PlanError::Busy {
                    other: other.clone(),
                    name: e.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// Checks every entry; all the problems found, each naming its entry, or what each entry
    /// needs. Entries mounted already are judged from their mounts, without the repository.
    async fn check_plan(&self, plan: &Plan) -> Result<Vec<Checked>, PlanError> {
        let mut problems = Vec::new();
        if plan.vm.is_empty() {
            problems.push("the plan has no [[vm]] entries; add one per VM to mount".into());
        }
        if plan.vm.len() > MAX_PLAN_ENTRIES {
            problems.push(format!(
                "the plan has {} entries, more than the {MAX_PLAN_ENTRIES} one plan may have; split it",
                plan.vm.len()
            ));
        }
        if let Err(p) = plan_wait(plan) {
            problems.push(p);
        }
        if !problems.is_empty() {
            return Err(PlanError::Invalid { problems });
        }
        let mut names: BTreeMap<&str, usize> = BTreeMap::new();
        let mut out = Vec::new();
        for (i, e) in plan.vm.iter().enumerate() {
            let label = e.label(i + 1);
            if let Some(first) = names.insert(&e.name, i + 1) {
                problems.push(format!(
                    "{label}: the name {} is used by entry {first} too; give each entry a name of its own",
                    e.name
                ));
                names.insert(&e.name, first);
                continue;
            }
            match self.check_entry(e).await {
                Ok(c) => out.push(c),
                Err(p) => problems.push(format!("{label}: {p}")),
            }
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(PlanError::Invalid { problems })
        }
    }

    async fn check_entry(&self, e: &PlanEntry) -> Result<Checked, String> {
        check_name(&e.name).map_err(|err| format!("{err}; change its `name`"))?;
        if e.group < 1 {
            return Err(format!(
                "group = {}: groups are numbered from 1 (mounted first)",
                e.group
            ));
        }
        let hosts = self.check_hosts(&e.allow)?;
        let at = match &e.at {
            Some(t) if !e.is_latest() => {
                return Err(format!(
                    "at = {t:?} goes with snapshot = \"latest\" (the latest at or before it), not with snapshot = {:?}",
                    e.snapshot
                ))
            }
            Some(t) => Some(crate::repo::parse_time(t).map_err(|err| format!("at: {err}"))?),
            None => None,
        };
        if let Some(m) = self.mount_by_name(e.name.as_bytes()) {
            return same_mount(e, at, &hosts, &m).map(|()| Checked::Mounted);
        }
        let text = if e.is_latest() { &e.vm } else { &e.snapshot };
        let info = self
            .repo
            .resolve(&SnapshotSpec::new(text, at))
            .await
            .map_err(|err| err.to_string())?;
        if info.vm.name != e.vm {
            return Err(format!(
                "snapshot {} is of VM {}, not of {}; fix its `vm` or its `snapshot`",
                info.name, info.vm.name, e.vm
            ));
        }
        let req = e.request(&info.id.to_string());
        let convert = conversion(&req, info.vm.hypervisor).map_err(|err| err.to_string())?;
        // The config as the mount would serve it, made now: a network map naming a network
        // the VM has not, or a disk ESXi cannot describe, refuses the plan before any mount.
        let spec = MountSpec {
            name: e.name.clone(),
            id: 0,
            snapshot: info.id,
            snapshot_name: info.name.clone(),
            read_only: e.read_only,
            network: e.network,
            network_map: e.network_map.clone(),
            default_network_map: self.default_network_map.get().cloned().unwrap_or_default(),
            network_rewrite: crate::mount::NETWORK_REWRITE,
            created: jiff::Timestamp::now(),
            hosts,
            disks_only: e.disks_only,
            convert,
        };
        let snapshot = self
            .repo
            .snapshot(&info.id)
            .await
            .map_err(|err| err.to_string())?;
        let config = snapshot.config_bytes().await.map_err(|e| e.to_string())?;
        self.config_for_mount(&spec, &snapshot, config, None)
            .map_err(|err| err.to_string())?;
        Ok(Checked::ToMount(Box::new((req, info))))
    }

    /// The entry's `allow` list, parsed; each must lie within the server's allow list.
    fn check_hosts(&self, allow: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
        let mut out = Vec::new();
        for h in allow {
            let net = h
                .parse::<ipnet::IpNet>()
                .or_else(|_| h.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    format!("allow {h:?} is not an address or a CIDR such as 10.1.0.0/16")
                })?;
            if let Some(server) = self.plans.allow.get() {
                if !server.covers(&net) {
                    return Err(format!(
                        "allow {h:?} is not within the server's --allow list ({server}), so that \
                         host could never reach the mount; add it to serve's --allow, or take it \
                         out of the entry"
                    ));
                }
            }
            out.push(net);
        }
        Ok(out)
    }

    /// Applies a checked plan: group by group, each entry in turn; the next group's boot sets
    /// warm while a group boots.
    async fn run_plan(self: Arc<Self>, run: Arc<Run>, todo: Vec<Option<MountRequest>>) {
        let plan = &run.plan;
        let groups = plan.groups();
        for (gi, &g) in groups.iter().enumerate() {
            run.state().group = Some(g);
            let members: Vec<usize> = (0..plan.vm.len())
                .filter(|&i| plan.vm[i].group == g)
                .collect();
            let mut mounted = 0;
            for &i in &members {
                let Some(req) = &todo[i] else {
                    continue;
                };
                if self.stop.is_cancelled() {
                    return self.end_run(&run, RunPhase::Stopped, Some(stopped_text()));
                }
                let e = &plan.vm[i];
                match self.mount(req).await {
                    Ok(info) => {
                        mounted += 1;
                        run.state().entries[i].action = Some(Action::Mounted);
                        run.event(format!(
                            "group {g}: mounted {} ({}) as {}",
                            e.vm, info.spec.snapshot_name, e.name
                        ));
                    }
                    Err(err) => {
                        let text = err.to_string();
                        run.state().entries[i].error = Some(text.clone());
                        run.event(format!("group {g}: {} failed: {text}", e.label(i + 1)));
                        let later = groups.len() - gi - 1;
                        let why = format!(
                            "{} could not be mounted: {text}. The plan stopped there: {} \
                             The mounts made before it stay mounted; to undo them, `livemount \
                             unmount NAME` each; or fix the cause and apply the plan again, \
                             which leaves the entries mounted as the plan says as they are and \
                             goes on from this one.",
                            e.label(i + 1),
                            if later > 0 {
                                format!("group {g}'s later entries and the {later} later group(s) were not mounted.")
                            } else {
                                format!("group {g}'s later entries were not mounted.")
                            }
                        );
                        return self.end_run(&run, RunPhase::Failed, Some(why));
                    }
                }
            }
            run.event(format!(
                "group {g}: {mounted} mounted, {} mounted already",
                members.len() - mounted
            ));
            let Some(&next) = groups.get(gi + 1) else {
                break;
            };
            // Nothing of the next group to mount (a plan applied again): nothing to wait for.
            if !(0..plan.vm.len()).any(|i| plan.vm[i].group == next && todo[i].is_some()) {
                continue;
            }
            self.warm_group(&run, next, &todo).await;
            let names: Vec<String> = members.iter().map(|&i| plan.vm[i].name.clone()).collect();
            if !self.wait_for_boots(&run, g, &names).await {
                return self.end_run(&run, RunPhase::Stopped, Some(stopped_text()));
            }
        }
        self.end_run(&run, RunPhase::Done, None);
    }

    /// Starts warming the boot sets of group `g`'s entries still to mount into the disk
    /// cache. A warm-up that cannot start (no disk cache, no profile) is noted, not an error.
    async fn warm_group(&self, run: &Run, g: i64, todo: &[Option<MountRequest>]) {
        let plan = &run.plan;
        if self.cache.disk().is_none() {
            run.event(format!(
                "group {g}: no warm-up: this server has no disk cache (serve --cache-dir DIR \
                 --cache-disk-size SIZE); each mount still pre-stages its own boot set"
            ));
            return;
        }
        let mut started = 0;
        for (i, e) in plan.vm.iter().enumerate() {
            let Some(req) = todo[i].as_ref().filter(|_| e.group == g) else {
                continue;
            };
            if e.prestage == PrestageMode::Off || e.disks_only {
                continue;
            }
            let warm = WarmRequest {
                snapshot: req.snapshot.clone(),
                at: None,
            };
            match self.warm(&warm).await {
                Ok(_) => started += 1,
                Err(err) => {
                    run.state().entries[i].note = Some(format!("no warm-up: {err}"));
                }
            }
        }
        run.event(format!(
            "group {g}: warming {started} boot set(s) into the disk cache"
        ));
    }

    /// Waits until every mount of group `g` has booted (its boot window ended, or it records
    /// none) or the plan's wait passed. False: the server is stopping.
    async fn wait_for_boots(&self, run: &Run, g: i64, names: &[String]) -> bool {
        let t0 = Instant::now();
        loop {
            let waiting: Vec<&String> = names
                .iter()
                .filter(|n| {
                    self.mount_by_name(n.as_bytes())
                        .is_some_and(|m| m.window.as_ref().is_some_and(|w| w.recording()))
                })
                .collect();
            if waiting.is_empty() {
                run.event(format!(
                    "group {g}: booted in {:.1} s",
                    t0.elapsed().as_secs_f64()
                ));
                return true;
            }
            if t0.elapsed() >= run.wait {
                let mut some: Vec<&str> = waiting.iter().take(5).map(|s| s.as_str()).collect();
                if waiting.len() > some.len() {
                    some.push("...");
                }
                run.event(format!(
                    "group {g}: not booted after {:.0} s ({} still waiting or booting: {}); going on",
                    run.wait.as_secs_f64(),
                    waiting.len(),
                    some.join(", ")
                ));
                return true;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                _ = tokio::time::sleep(BOOT_POLL) => {}
            }
        }
    }

    fn end_run(&self, run: &Run, phase: RunPhase, error: Option<String>) {
        let mut s = run.state();
        s.phase = phase;
        s.finished = Some(jiff::Timestamp::now());
        if let Some(e) = &error {
            tracing::warn!(plan = %run.plan.id(), "{e}");
        }
        s.error = error;
        let line = match phase {
            RunPhase::Done => "plan applied: every group is mounted",
            RunPhase::Failed => "plan stopped: a mount failed",
            RunPhase::Stopped => "plan stopped: the server is stopping",
            RunPhase::Running => "",
        };
        s.events.push(line.to_owned());
    }

    fn status_of(&self, plan: &Plan, run: Option<&Arc<Run>>) -> PlanStatus {
        let state = run.map(|r| {
            let s = r.state();
            (
                RunInfo {
                    phase: s.phase,
                    group: s.group,
                    groups: plan.groups(),
                    wait_seconds: r.wait.as_secs_f64(),
                    started: r.started,
                    finished: s.finished,
                    error: s.error.clone(),
                    events: s.events.clone(),
                },
                s.entries.clone(),
            )
        });
        let (info, runs) = match state {
            Some((i, e)) => (Some(i), Some(e)),
            None => (None, None),
        };
        let entries = plan
            .vm
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let r = runs.as_ref().and_then(|r| r.get(i).cloned());
                self.entry_status(i, e, r.unwrap_or_default())
            })
            .collect();
        PlanStatus {
            id: plan.id(),
            run: info,
            entries,
        }
    }

    fn entry_status(&self, i: usize, e: &PlanEntry, r: EntryRun) -> EntryStatus {
        let mut out = EntryStatus {
            index: i + 1,
            vm: e.vm.clone(),
            name: e.name.clone(),
            group: e.group,
            state: EntryState::NotMounted,
            action: r.action,
            snapshot: r.snapshot.as_ref().map(|(_, n)| n.clone()),
            mount_id: None,
            created: None,
            prestage: None,
            window: None,
            error: r.error.clone(),
            note: r.note.clone(),
        };
        match self.mount_by_name(e.name.as_bytes()) {
            Some(m) => {
                out.snapshot = Some(m.spec.snapshot_name.clone());
                out.mount_id = Some(m.spec.id);
                out.created = Some(m.spec.created);
                out.prestage = m.prestage.get().map(|p| p.status());
                out.window = m.window.as_ref().map(|w| w.status());
                let at = e.at.as_deref().and_then(|t| t.parse().ok());
                out.state = if m.vm != e.vm || !names_snapshot(e, at, &m.spec) {
                    out.error = Some(format!(
                        "the mount named {} holds {}, not what the entry says",
                        e.name, m.spec.snapshot_name
                    ));
                    EntryState::Conflict
                } else {
                    match m.window.as_ref().map(|w| w.status().state) {
                        Some(s) if s == "recording" => EntryState::Booting,
                        Some(s) if s == "ended" => EntryState::Booted,
                        _ => EntryState::Mounted,
                    }
                };
            }
            None if r.error.is_some() => out.state = EntryState::Failed,
            None => {
                out.prestage = r
                    .snapshot
                    .as_ref()
                    .and_then(|(id, _)| self.warm_status(id).ok())
                    .map(|w| w.status);
                if out.prestage.as_ref().is_some_and(|p| !p.finished) {
                    out.state = EntryState::Prestaging;
                }
            }
        }
        out
    }
}

fn stopped_text() -> String {
    "the server stopped before the plan was applied; the mounts made stay mounted; apply the \
     plan again once it runs to go on"
        .into()
}

/// The plan's `wait`, checked.
fn plan_wait(plan: &Plan) -> Result<Duration, String> {
    match &plan.wait {
        None => Ok(DEFAULT_GROUP_WAIT),
        Some(t) => crate::units::parse_duration(t).map_err(|e| format!("wait = {t:?}: {e}")),
    }
}

/// Whether the mount `m` holds the snapshot the entry names, judged from its spec alone:
/// `latest` is any snapshot of the VM (the one latest when it was mounted; with `at`, one
/// taken at or before it), an id prefix must match, `VM@TIME` must be that time.
fn names_snapshot(e: &PlanEntry, at: Option<jiff::Timestamp>, m: &MountSpec) -> bool {
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

/// Checks an entry against the mount of its name: the same VM and snapshot, made with the
/// same options. Err: what differs, and what to do.
fn same_mount(
    e: &PlanEntry,
    at: Option<jiff::Timestamp>,
    hosts: &[ipnet::IpNet],
    m: &LiveMount,
) -> Result<(), String> {
    let what = |differs: String| {
        format!(
            "a mount named {} exists ({}) with {differs}; unmount it (`livemount unmount {}`) \
             or give the entry another name",
            e.name, m.spec.snapshot_name, e.name
        )
    };
    if m.vm != e.vm {
        return Err(what(format!("VM {}, not {}", m.vm, e.vm)));
    }
    if !names_snapshot(e, at, &m.spec) {
        return Err(what(format!("another snapshot than {}", e.snapshot)));
    }
    // The backup's own hypervisor: the served one, unless the mount converted it.
    let backup = match m.spec.convert {
        Some(_) => match m.hypervisor {
            Hypervisor::Esxi => Hypervisor::Kvm,
            Hypervisor::Kvm => Hypervisor::Esxi,
        },
        None => m.hypervisor,
    };
    let convert = conversion(&e.request(""), backup).map_err(|err| err.to_string())?;
    let s = &m.spec;
    let mut differs = Vec::new();
    if s.read_only != e.read_only {
        differs.push(format!("read_only = {}", s.read_only));
    }
    if s.network != e.network {
        differs.push(format!("network = {:?}", s.network.as_str()));
    }
    if s.network_map != e.network_map {
        differs.push(format!("network_map = {:?}", s.network_map));
    }
    if s.hosts != hosts {
        let list: Vec<String> = s.hosts.iter().map(|h| h.to_string()).collect();
        differs.push(format!("allow = {list:?}"));
    }
    if s.disks_only != e.disks_only {
        differs.push(format!("disks_only = {}", s.disks_only));
    }
    if s.convert != convert {
        differs.push(match s.convert {
            Some(c) => format!(
                "for = {:?}, disk_bus = {:?}, nic_model = {:?}",
                c.to.to_string(),
                c.disk_bus,
                c.nic_model
            ),
            None => "the backup's own hypervisor (no `for`)".into(),
        });
    }
    if differs.is_empty() {
        Ok(())
    } else {
        Err(what(format!("other options: {}", differs.join(", "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let text = include_str!("../../examples/recovery-plan.toml");
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
