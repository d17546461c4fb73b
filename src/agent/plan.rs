//! Recovery plans (`livemount plan apply|status`, decision 0032): a list of VMs mounted in
//! groups, group 1 first; while a group's VMs boot, the next group's boot sets are warmed into
//! the disk cache (the warm-up of `livemount prestage`), then that group is mounted.
//!
//! Owns: the plan's form ([`Plan`], [`PlanEntry`]; TOML from the operator, JSON over the API),
//! its validation (whole, before anything is mounted), the runs of plans (one background task
//! each, kept in memory by plan id) and where each entry stands ([`PlanStatus`]).
//! Files: `plan/form.rs` (the form and its parsing, pure), `plan/status.rs` (what a status
//! shows), this one (checks, runs, status from the agent's state).
//! Must not: mount, warm or unmount by any other path than [`Agent::mount`] and
//! [`Agent::warm`]; a plan adds no state on disk (its mounts' specs are the state: applying a
//! plan again finds them).
//! Ordering: a run mounts its entries one at a time, in group order and then in the plan's
//! order; it checks the agent's stop between steps, never inside a mount, so a stop never
//! leaves a mount half made. Locking: each run's state is a `std::sync::Mutex` held for short
//! sections only, never across an await.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

mod form;
mod status;

pub use form::{Plan, PlanEntry};
pub use status::{Action, EntryState, EntryStatus, PlanStatus, RunInfo, RunPhase};

use form::{names_snapshot, plan_wait};

use super::{conversion, Agent, MountRequest, PrestageMode, WarmRequest};
use crate::allow::AllowList;
use crate::mount::{check_name, LiveMount, MountSpec};
use crate::repo::{SnapshotInfo, SnapshotSpec};
use crate::vmconfig::Hypervisor;

/// The most entries a plan may have (a site's worth of VMs, with room to spare).
pub const MAX_PLAN_ENTRIES: usize = 1000;
/// How long a group's VMs are given to boot before the next group is mounted, unless the
/// plan's `wait` says otherwise: the boot window's default limit.
pub const DEFAULT_GROUP_WAIT: Duration = Duration::from_secs(120);
/// Runs of plans kept for `GET /v1/plans/{id}`; past it the oldest finished run is forgotten.
pub const MAX_RUNS: usize = 64;
/// How often a run looks whether a group's VMs have booted.
const BOOT_POLL: Duration = Duration::from_millis(250);

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
