//! What the operator's console (and scripts) read and change beyond mounts and relocations:
//! the snapshots by VM with their boot profiles, forgetting a boot profile, and the short
//! history of the server's counters (sampled every [`history::INTERVAL`] by a task of the
//! agent).

use std::sync::Arc;

use super::Agent;
use crate::metrics::history::{self, Counters, History};
use crate::profile::ProfileError;
use crate::repo::{RepoError, SnapshotInfo};

/// A VM's boot profile, in a catalog.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProfileSummary {
    pub boots: u32,
    pub blocks: usize,
    /// The boot set's bytes (blocks times the profile's chunk size).
    pub bytes: u64,
    pub updated: jiff::Timestamp,
}

/// One VM's snapshots, newest first, and its boot profile if it has one.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmSnapshots {
    pub vm: String,
    pub profile: Option<ProfileSummary>,
    pub snapshots: Vec<SnapshotInfo>,
}

/// `GET /v1/snapshots`: every VM with its snapshots; manifests and profiles that cannot be
/// read are named, not fatal.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Catalog {
    /// By name; a VM with a boot profile but no snapshot left (all forgotten) is listed too,
    /// with no snapshots, so that its profile can be forgotten.
    pub vms: Vec<VmSnapshots>,
    /// Snapshot ids whose manifests cannot be read, and why.
    pub unreadable: Vec<String>,
}

impl Agent {
    /// Every VM in the repository with its snapshots and its boot profile.
    pub async fn catalog(&self) -> Result<Catalog, RepoError> {
        let (all, bad) = self.repo.list_snapshots().await?;
        let store = self.profiles.clone();
        let (profiles, bad_profiles) = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| RepoError::Invalid(format!("listing the boot profiles: {e}")))?;
        for e in &bad_profiles {
            tracing::warn!(error = %e, "a boot profile cannot be read");
        }
        let mut profiles: std::collections::BTreeMap<String, ProfileSummary> = profiles
            .into_iter()
            .map(|p| {
                let s = ProfileSummary {
                    boots: p.boots,
                    blocks: p.blocks.len(),
                    bytes: (p.blocks.len() as u64).saturating_mul(p.chunk_size),
                    updated: p.updated,
                };
                (p.vm, s)
            })
            .collect();
        let mut vms: std::collections::BTreeMap<String, Vec<SnapshotInfo>> = Default::default();
        for s in all {
            vms.entry(s.vm.name.clone()).or_default().push(s);
        }
        for vm in profiles.keys() {
            vms.entry(vm.clone()).or_default();
        }
        let vms = vms
            .into_iter()
            .map(|(vm, mut snapshots)| {
                snapshots.reverse(); // newest first
                VmSnapshots {
                    profile: profiles.remove(&vm),
                    vm,
                    snapshots,
                }
            })
            .collect();
        Ok(Catalog {
            vms,
            unreadable: bad.iter().map(|(id, e)| format!("{id}: {e}")).collect(),
        })
    }

    /// Removes VM `vm`'s boot profile (its next boot learns a new one), as `livemount profile
    /// forget` does; a boot being merged into it meanwhile finishes first.
    pub async fn forget_profile(&self, vm: &str) -> Result<(), ProfileError> {
        let store = self.profiles.clone();
        let lock = self.learn_lock.clone();
        let vm = vm.to_string();
        let path = store.path(&vm);
        tokio::task::spawn_blocking(move || {
            let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
            store.forget(&vm)
        })
        .await
        .map_err(|e| ProfileError::Io {
            path,
            source: std::io::Error::other(e.to_string()),
        })?
    }

    /// The history of the server's counters.
    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// Starts sampling the counters into the history, every [`history::INTERVAL`] until the
    /// agent stops.
    pub fn start_history(&self) {
        let (history, cache, metrics) = (
            self.history.clone(),
            self.cache.clone(),
            self.metrics.clone(),
        );
        self.spawn_task(async move {
            let mut tick = tokio::time::interval(history::INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                use std::sync::atomic::Ordering::Relaxed;
                let c = cache.stats();
                let t = &metrics.totals;
                history.record(
                    jiff::Timestamp::now(),
                    Counters {
                        read_bytes: t.read_bytes.load(Relaxed),
                        fetches: t.fetches.load(Relaxed),
                        fetch_nanos: t.fetch_nanos.load(Relaxed),
                        cache_hits: c.hits,
                        cache_misses: c.misses,
                    },
                );
            }
        });
    }
}
