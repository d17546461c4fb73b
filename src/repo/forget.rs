//! Forget: taking snapshots out of the repository's list, by a retention policy or by name.
//!
//! A forgotten snapshot's manifest moves from `snapshots/` to `forgotten/` (written there
//! first, then removed from `snapshots/`); its chunks stay until a prune finds no snapshot
//! that needs them. A prune still counts a forgotten manifest while a lease names it, or for
//! one lease expiry after it was forgotten: an agent that read the manifest just before it
//! went has a lease in the repository by then (decision 0017).
//!
//! A snapshot that a live lease names (a live mount, a relocation, a restore, here or on
//! another agent) is never forgotten: named, the whole command is refused, naming the mount
//! and the agent; under a policy, it is kept and reported as in use.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::catalog::SnapshotInfo;
use super::lease::{live_leases, LiveLease};
use super::retention::Policy;
use super::store::Area;
use super::{RepoError, Repository, SnapshotId, SnapshotSpec};

/// What to forget.
#[derive(Debug, Clone)]
pub enum ForgetTarget {
    /// What a policy does not keep, for these VMs (none: every VM).
    Policy { policy: Policy, vms: Vec<String> },
    /// These snapshots (`VM@TIME` or id prefixes; a bare VM name is refused).
    Named(Vec<String>),
}

/// One snapshot in a plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Verdict {
    pub id: SnapshotId,
    /// `VM@TIME`.
    pub name: String,
    pub vm: String,
    pub taken: jiff::Timestamp,
    /// Why it is kept (`last`, `daily 2026-12-06`, `in use: mount w (agent ... on host h)`);
    /// empty when it is forgotten.
    pub reasons: Vec<String>,
}

/// What a forget keeps and removes.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ForgetPlan {
    pub keep: Vec<Verdict>,
    pub remove: Vec<Verdict>,
}

/// The uses of each snapshot by live leases, described.
fn uses_by_snapshot(leases: &[LiveLease]) -> BTreeMap<SnapshotId, Vec<String>> {
    let mut out: BTreeMap<SnapshotId, Vec<String>> = BTreeMap::new();
    for l in leases {
        for u in &l.lease.uses {
            out.entry(u.snapshot).or_default().push(l.describe(u));
        }
    }
    out
}

fn verdict(s: &SnapshotInfo, reasons: Vec<String>) -> Verdict {
    Verdict {
        id: s.id,
        name: s.name.clone(),
        vm: s.vm.name.clone(),
        taken: s.taken,
        reasons,
    }
}

impl Repository {
    /// Decides what a forget keeps and removes, changing nothing.
    pub async fn plan_forget(&self, target: &ForgetTarget) -> Result<ForgetPlan, RepoError> {
        let (all, bad) = self.list_snapshots().await?;
        let now = self.store().now().await?;
        let (leases, _) = live_leases(&**self.store(), now).await?;
        let in_use = uses_by_snapshot(&leases);
        let mut plan = ForgetPlan::default();
        match target {
            ForgetTarget::Policy { policy, vms } => {
                policy.check()?;
                if !bad.is_empty() {
                    let (id, e) = &bad[0];
                    return Err(RepoError::Invalid(format!(
                        "{} snapshot manifest(s) cannot be read (e.g. {}: {e}): a policy cannot \
                         tell which snapshots of their VM to keep; run `livemount verify`, or \
                         forget snapshots by name",
                        bad.len(),
                        id.short()
                    )));
                }
                let known: BTreeSet<&str> = all.iter().map(|s| s.vm.name.as_str()).collect();
                for vm in vms {
                    if !known.contains(vm.as_str()) {
                        return Err(RepoError::Invalid(format!(
                            "no snapshot of a VM named {vm:?} in the repository (its VMs: {})",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.iter().copied().collect::<Vec<_>>().join(", ")
                            }
                        )));
                    }
                }
                let mut groups: BTreeMap<&str, Vec<&SnapshotInfo>> = BTreeMap::new();
                for s in &all {
                    if vms.is_empty() || vms.contains(&s.vm.name) {
                        groups.entry(&s.vm.name).or_default().push(s);
                    }
                }
                for snaps in groups.values() {
                    let taken: Vec<jiff::Timestamp> = snaps.iter().map(|s| s.taken).collect();
                    for (s, reasons) in snaps.iter().zip(policy.apply(&taken)) {
                        let mut why: Vec<String> = reasons.iter().map(|r| r.to_string()).collect();
                        if let Some(uses) = in_use.get(&s.id) {
                            why.extend(uses.iter().map(|u| format!("in use: {u}")));
                        }
                        if why.is_empty() {
                            plan.remove.push(verdict(s, why));
                        } else {
                            plan.keep.push(verdict(s, why));
                        }
                    }
                }
            }
            ForgetTarget::Named(names) => {
                if names.is_empty() {
                    return Err(RepoError::Invalid(
                        "name the snapshots to forget (VM@TIME or an id prefix), or give a \
                         policy (--keep-... or --policy)"
                            .into(),
                    ));
                }
                let vms: BTreeSet<&str> = all.iter().map(|s| s.vm.name.as_str()).collect();
                let mut chosen = BTreeSet::new();
                for name in names {
                    if vms.contains(name.trim()) {
                        return Err(RepoError::Invalid(format!(
                            "{name:?} is a VM, not one snapshot: name a snapshot as VM@TIME or \
                             by id, or give a policy for the VM (e.g. `forget {name} \
                             --keep-last 3`; --keep-last 0 forgets all its snapshots)"
                        )));
                    }
                    let s = self.resolve(&SnapshotSpec::new(name, None)).await?;
                    if let Some(uses) = in_use.get(&s.id) {
                        return Err(RepoError::InUse {
                            snapshot: s.name.clone(),
                            uses: uses.join("; "),
                        });
                    }
                    if chosen.insert(s.id) {
                        plan.remove.push(verdict(&s, Vec::new()));
                    }
                }
            }
        }
        plan.keep
            .sort_by(|a, b| (&a.vm, a.taken).cmp(&(&b.vm, b.taken)));
        plan.remove
            .sort_by(|a, b| (&a.vm, a.taken).cmp(&(&b.vm, b.taken)));
        Ok(plan)
    }

    /// Forgets one snapshot: its manifest is copied to `forgotten/`, then removed from
    /// `snapshots/`. Forgetting one that is gone already is no error.
    pub async fn forget_snapshot(&self, id: &SnapshotId) -> Result<(), RepoError> {
        let bytes: Bytes = match self.store().get_manifest(id).await {
            Ok(b) => b,
            Err(RepoError::NoSnapshot { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.store()
            .put_record(Area::Forgotten, &format!("{id}.json"), bytes)
            .await?;
        self.store().delete_manifest(id).await
    }
}
