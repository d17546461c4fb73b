//! Warming a snapshot's boot set into the disk cache ahead of any mount (`livemount prestage`):
//! a recovery plan warms its VMs before they are needed, so that their first boot from a live
//! mount reads local disk instead of the repository.
//!
//! The boot set comes from the VM's boot profile (or the profile sharing most of its boot
//! chunks), planned over the snapshot's disks named as a mount's folder would name them. The
//! chunks are fetched in the pre-staging class and written to the disk tier, not kept in
//! memory. One warm-up per snapshot at a time; asking again returns the one under way.

use std::sync::Arc;

use super::Agent;
use crate::mount::DiskBlocks;
use crate::prestage::{Prestage, PrestageStatus, Target};
use crate::profile::plan;
use crate::repo::{plan_files, RepoError, SnapshotId, SnapshotSpec};

/// What the operator asked to warm.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    /// VM@TIME, an id prefix, or a VM name (its latest snapshot).
    pub snapshot: String,
    #[serde(default)]
    pub at: Option<jiff::Timestamp>,
}

/// A warm-up, as the API shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WarmInfo {
    /// The snapshot's id.
    pub id: String,
    /// `VM@TIME`.
    pub name: String,
    pub vm: String,
    pub status: PrestageStatus,
}

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("this server has no disk cache to warm; start it with --cache-dir DIR --cache-disk-size SIZE")]
    NoDiskCache,
    #[error("no boot profile for VM {vm} (nor one sharing half its boot chunks) to say what to warm; boot it once from a live mount, or `livemount profile import` one")]
    NoProfile { vm: String },
    #[error("no warm-up of snapshot {id}; `livemount prestage SNAPSHOT` starts one")]
    NotFound { id: String },
    #[error("{0}")]
    Repo(#[from] RepoError),
}

pub(super) type Warmups = std::sync::Mutex<std::collections::BTreeMap<SnapshotId, Arc<Warmup>>>;

#[derive(Debug)]
pub(super) struct Warmup {
    name: String,
    vm: String,
    prestage: Arc<Prestage>,
}

impl Agent {
    /// Starts warming a snapshot's boot set into the disk cache (or returns the warm-up under
    /// way for it).
    pub async fn warm(&self, req: &WarmRequest) -> Result<WarmInfo, WarmError> {
        let Some(disk) = self.cache.disk() else {
            return Err(WarmError::NoDiskCache);
        };
        let info = self
            .repo
            .resolve(&SnapshotSpec::new(&req.snapshot, req.at))
            .await?;
        if let Some(w) = self.warm_running(&info.id) {
            return Ok(w);
        }
        let snapshot = self.repo.snapshot(&info.id).await?;
        let m = &snapshot.manifest;
        let (_, names) = plan_files(m, m.vm.hypervisor, true);
        let mut images = Vec::new();
        for (i, (data, _)) in names.into_iter().enumerate() {
            images.push((data, snapshot.disk(i).await?));
        }
        let blocks = DiskBlocks::new(images.iter().map(|(n, d)| (n.as_str(), d)).collect());
        let (profiles, bad) = self.profiles.list();
        for e in bad {
            tracing::warn!(error = %e, "boot profile skipped");
        }
        let cs = self.repo.chunk_size().as_u64();
        let max = usize::try_from(disk.stats().capacity / cs).unwrap_or(usize::MAX);
        let vm = snapshot.manifest.vm.name.clone();
        let Some((source, chunks)) = plan(&vm, &profiles, &blocks, max) else {
            return Err(WarmError::NoProfile { vm });
        };
        tracing::info!(snapshot = %info.name, ?source, chunks = chunks.len(), "warming the boot set into the disk cache");
        let prestage = Prestage::new(source, chunks, cs);
        let w = Arc::new(Warmup {
            name: info.name.clone(),
            vm,
            prestage: prestage.clone(),
        });
        {
            let mut all = self.warmups.lock().unwrap_or_else(|p| p.into_inner());
            // Another request may have started one meanwhile; it stands.
            if let Some(running) = all.get(&info.id).filter(|w| !w.prestage.status().finished) {
                return Ok(warm_info(&info.id, running));
            }
            all.insert(info.id, w.clone());
        }
        self.spawn_task(prestage.run_into(self.cache.clone(), Target::Disk));
        Ok(warm_info(&info.id, &w))
    }

    fn warm_running(&self, id: &SnapshotId) -> Option<WarmInfo> {
        let all = self.warmups.lock().unwrap_or_else(|p| p.into_inner());
        all.get(id)
            .filter(|w| !w.prestage.status().finished)
            .map(|w| warm_info(id, w))
    }

    /// The warm-up of the snapshot whose id starts with `id` (running or finished).
    pub fn warm_status(&self, id: &str) -> Result<WarmInfo, WarmError> {
        let all = self.warmups.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .find(|(sid, _)| {
                sid.to_string().starts_with(&id.to_ascii_lowercase()) && !id.is_empty()
            })
            .map(|(sid, w)| warm_info(sid, w))
            .ok_or_else(|| WarmError::NotFound { id: id.to_string() })
    }
}

fn warm_info(id: &SnapshotId, w: &Warmup) -> WarmInfo {
    WarmInfo {
        id: id.to_string(),
        name: w.name.clone(),
        vm: w.vm.clone(),
        status: w.prestage.status(),
    }
}
