//! The agent's side of relocations: starting, finishing and cancelling them, bringing them back
//! at a start, and retiring a mount once its copy is handed over.
//!
//! State directory: `relocations/MOUNT.json`, one [`Relocation`] record per relocation.
//! Destinations: only under `relocate_roots` (serve's config, given to
//! [`Agent::resume_relocations`]); a new one is checked before its record is made, and every
//! relocation, also one brought back at a start, reaches its folder through the roots again.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Agent;
use crate::mount::{Content, LiveMount};
use crate::relocate::{
    persist, Event, FinalConfig, Phase, RelocateError, RelocateRoots, Relocation, RelocationStatus,
    Relocator, QUIET_BEFORE_FINISH,
};
use crate::vmconfig::Hypervisor;

/// How the operator asked for a relocation.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelocateRequest {
    /// The destination folder (absolute, under one of `relocate_roots`; new or empty).
    pub to: PathBuf,
    /// At most this many bytes per second.
    #[serde(default)]
    pub rate: Option<u64>,
    /// Benchmarks only: copy in the VM class, ignoring VM reads.
    #[serde(default)]
    pub unprioritized: bool,
}

impl Agent {
    /// The folders relocations may write into (none before `resume_relocations`).
    fn relocate_roots(&self) -> RelocateRoots {
        self.relocate_roots.get().cloned().unwrap_or_default()
    }

    fn relocation_path(&self, mount: &str) -> PathBuf {
        self.state.join("relocations").join(format!("{mount}.json"))
    }

    /// The relocation of a mount, running or handed over since the start.
    pub fn relocation(&self, mount: &str) -> Option<Arc<Relocator>> {
        self.relocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(mount)
            .cloned()
    }

    fn relocators(&self) -> Vec<Arc<Relocator>> {
        self.relocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Every relocation, running or handed over since the start.
    pub fn relocations(&self) -> Vec<RelocationStatus> {
        self.relocators().iter().map(|r| r.status()).collect()
    }

    /// The config the handover writes, and how to start the VM from its new home.
    async fn final_config(
        &self,
        mount: &LiveMount,
        dest: &Path,
    ) -> Result<(FinalConfig, Vec<String>), RelocateError> {
        let state_err = |what: String| RelocateError::State {
            path: self.spec_path(&mount.spec.name).display().to_string(),
            what,
        };
        let snapshot = self
            .open_snapshot(&mount.spec.snapshot)
            .await
            .map_err(|e| state_err(e.to_string()))?;
        let name = mount.config_name.clone();
        let config = dest.join(&name);
        match mount.hypervisor {
            Hypervisor::Esxi => Ok((
                FinalConfig::FromMount { name },
                vec![
                    format!(
                        "vim-cmd solo/registervm {} (the folder as the ESXi host sees it)",
                        config.display()
                    ),
                    "vim-cmd vmsvc/power.on VMID (the id registervm printed)".to_string(),
                ],
            )),
            Hypervisor::Kvm => {
                let original = snapshot
                    .config_bytes()
                    .await
                    .map_err(|e| state_err(e.to_string()))?;
                let bytes = self
                    .config_for_mount(&mount.spec, &snapshot, original, Some(dest))
                    .map_err(|e| state_err(e.to_string()))?
                    .bytes
                    .into();
                Ok((
                    FinalConfig::Fixed { name, bytes },
                    vec![
                        format!("virsh define {}", config.display()),
                        format!("virsh start {}", mount.spec.name),
                    ],
                ))
            }
        }
    }

    /// Sets the folders relocations may write into (`relocate_roots` in serve's config), then
    /// brings back the relocations recorded in the state directory, mirrors attached, and starts
    /// their tasks. Called once, after [`Agent::open`] and before any client is served: the
    /// copies must see every write from the start.
    pub async fn resume_relocations(self: &Arc<Self>, roots: RelocateRoots) -> anyhow::Result<()> {
        if self.relocate_roots.set(roots).is_err() {
            anyhow::bail!("relocations were resumed already");
        }
        self.open_relocations().await?;
        for r in self.relocators() {
            r.drive(self);
        }
        Ok(())
    }

    /// Brings back the relocations recorded in the state directory, mirrors attached. A record
    /// that cannot be resumed (its mount is gone, its copy's files are missing, its destination
    /// is no longer under the roots) is marked failed, not dropped.
    async fn open_relocations(&self) -> anyhow::Result<()> {
        let roots = self.relocate_roots();
        let dir = self.state.join("relocations");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let record: Relocation = serde_json::from_slice(&fs::read(&path)?).map_err(|e| {
                anyhow::anyhow!("{}: unreadable relocation record: {e}", path.display())
            })?;
            let Some(mount) = self.mount_by_name(record.mount.as_bytes()) else {
                if record.phase == Phase::Done {
                    // Handed over, and the mount was retired just before a crash.
                    tracing::info!(record = %path.display(), "relocation was handed over; record removed");
                    fs::remove_file(&path)?;
                } else {
                    tracing::error!(record = %path.display(), "relocation of a mount that is not served; record kept");
                }
                continue;
            };
            if mount.spec.snapshot != record.snapshot {
                tracing::error!(record = %path.display(), "relocation record of another snapshot of this mount; record kept");
                continue;
            }
            if record.phase == Phase::Done {
                // Handed over, and the server stopped before the mount was retired: retire it
                // now, before any client is served (its writes would be in neither place).
                self.remove_mount(&record.mount, false, true).await?;
                fs::remove_file(&path)?;
                tracing::info!(mount = %record.mount, "relocation was handed over; mount retired");
                continue;
            }
            let (config, start) = match self.final_config(&mount, &record.dest).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(record = %path.display(), error = %e, "relocation cannot resume; record kept");
                    continue;
                }
            };
            let r = match Relocator::open(
                record.clone(),
                path.clone(),
                mount.clone(),
                config.clone(),
                start.clone(),
                false,
                &roots,
            ) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(mount = %record.mount, error = %e, "relocation cannot resume; marked failed");
                    let failed = match record.apply(Event::Fail(e.to_string())) {
                        Ok(crate::relocate::Next::Keep(f)) => f,
                        _ => record.clone(),
                    };
                    persist(&path, &failed)?;
                    Relocator::open(failed, path.clone(), mount, config, start, false, &roots)?
                }
            };
            tracing::info!(mount = %record.mount, phase = %r.phase(), "relocation resumed");
            self.relocations
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(record.mount.clone(), r);
        }
        Ok(())
    }

    /// Starts relocating a mount's disks into `req.to`, or retries a failed relocation.
    pub async fn relocate(
        self: &Arc<Self>,
        mount: &str,
        req: &RelocateRequest,
    ) -> Result<RelocationStatus, RelocateError> {
        let _serial = self.changes.lock().await;
        let m = self
            .mount_by_name(mount.as_bytes())
            .ok_or_else(|| RelocateError::NoMount {
                name: mount.to_string(),
            })?;
        if m.spec.disks_only {
            return Err(RelocateError::DisksOnly {
                mount: mount.to_string(),
            });
        }
        if let Some(r) = self.relocation(mount) {
            let rec = r.record();
            match rec.phase {
                Phase::Failed if rec.dest == req.to => return self.retry(&m, rec).await,
                // A handover of an earlier mount of this name.
                Phase::Done if !Arc::ptr_eq(r.mount(), &m) => {}
                phase => {
                    // (Done: handed over, the mount not retired yet; the task retries that.)
                    r.drive(self);
                    return Err(RelocateError::Busy {
                        mount: mount.to_string(),
                        dest: rec.dest.display().to_string(),
                        phase,
                    });
                }
            }
        }
        let dest = &req.to;
        if !dest.is_absolute() {
            return Err(RelocateError::Dest {
                path: dest.display().to_string(),
                what: "give an absolute path".into(),
            });
        }
        if req.rate == Some(0) {
            return Err(RelocateError::Dest {
                path: dest.display().to_string(),
                what: "--rate must be above zero".into(),
            });
        }
        // Under a root, reached without a symbolic link, new or empty; nothing is made yet.
        let roots = self.relocate_roots();
        let checked = dest.clone();
        let check = roots.clone();
        tokio::task::spawn_blocking(move || check.check_new(&checked))
            .await
            .map_err(|e| RelocateError::Dest {
                path: dest.display().to_string(),
                what: e.to_string(),
            })??;
        let disks = m
            .files
            .iter()
            .filter(|f| matches!(f.content, Content::Disk { .. }))
            .map(|f| (f.name.clone(), f.size()))
            .collect();
        let mut record = Relocation::new(
            mount,
            m.spec.snapshot,
            dest.clone(),
            disks,
            req.rate,
            jiff::Timestamp::now(),
        );
        record.unprioritized = req.unprioritized;
        let (config, start) = self.final_config(&m, dest).await?;
        let path = self.relocation_path(mount);
        // The record first: a crash before the files exist leaves a record that fails to
        // resume and can be cancelled, never files nobody knows of.
        let r = persist_and_open(record, path, m.clone(), config, start, true, roots).await?;
        // The config next to the disks from the start (the handover writes it again).
        if let Err(e) = r.write_other_files().await {
            tracing::warn!(mount, error = %e, "config not written yet; the handover writes it");
        }
        self.relocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mount.to_string(), r.clone());
        r.drive(self);
        tracing::info!(mount, dest = %dest.display(), rate = ?req.rate, "relocation started");
        Ok(r.status())
    }

    /// Starts a failed relocation again, from the start, with a new task.
    async fn retry(
        self: &Arc<Self>,
        m: &Arc<LiveMount>,
        rec: Relocation,
    ) -> Result<RelocationStatus, RelocateError> {
        // Still under the roots (they may have changed since)? Refused before the record is.
        let roots = self.relocate_roots();
        let (check, dest) = (roots.clone(), rec.dest.clone());
        tokio::task::spawn_blocking(move || check.open(&dest, true).map(drop))
            .await
            .map_err(|e| RelocateError::Dest {
                path: rec.dest.display().to_string(),
                what: e.to_string(),
            })??;
        let retried = match rec.apply(Event::Retry)? {
            crate::relocate::Next::Keep(r) => r,
            crate::relocate::Next::Gone => unreachable!("a retry keeps its record"),
        };
        let path = self.relocation_path(&rec.mount);
        let (config, start) = self.final_config(m, &rec.dest).await?;
        let r = persist_and_open(retried, path, m.clone(), config, start, false, roots).await?;
        self.relocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.mount.clone(), r.clone());
        r.drive(self);
        tracing::info!(mount = %rec.mount, "relocation retried");
        Ok(r.status())
    }

    /// Asks for the handover of a relocated mount whose VM is stopped. Returns at once; the
    /// relocation's status says when it is done.
    pub async fn finish_relocation(
        &self,
        mount: &str,
        force: bool,
    ) -> Result<RelocationStatus, RelocateError> {
        let r = self
            .relocation(mount)
            .ok_or_else(|| RelocateError::NoRelocation {
                mount: mount.to_string(),
            })?;
        if !force && r.phase() != Phase::Finishing {
            if let Some(ago) = r.since_last_write().filter(|d| *d < QUIET_BEFORE_FINISH) {
                return Err(RelocateError::Running {
                    mount: mount.to_string(),
                    ago: ago.as_secs_f64(),
                });
            }
        }
        r.apply(Event::Finish).await?;
        tracing::info!(mount, "relocation handover started");
        Ok(r.status())
    }

    /// Cancels a relocation: the mount runs on as it was, the partial copy is removed.
    pub async fn cancel_relocation(
        self: &Arc<Self>,
        mount: &str,
    ) -> Result<RelocationStatus, RelocateError> {
        let r = self
            .relocation(mount)
            .ok_or_else(|| RelocateError::NoRelocation {
                mount: mount.to_string(),
            })?;
        r.apply(Event::Cancel).await?;
        // A failed relocation, or one whose cleanup failed, has no task: one runs the cleanup.
        r.drive(self);
        Ok(r.status())
    }

    /// Drops a relocation that is over (cancelled and cleaned up).
    pub(crate) fn forget_relocation(&self, mount: &str) {
        self.relocations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(mount);
    }

    /// Retires a mount whose copy is handed over: its overlay goes (every write is in the
    /// copy), then the relocation's record.
    pub(crate) async fn retire(&self, r: &Relocator) -> Result<(), RelocateError> {
        // The mirrors stay attached and fenced until the mount is gone: a write accepted now
        // would be in neither the copy nor the (about to be removed) overlay.
        let name = r.mount().spec.name.clone();
        match self.remove_mount(&name, false, true).await {
            Ok(_) | Err(crate::mount::MountError::NotFound { .. }) => {}
            Err(e) => {
                return Err(RelocateError::State {
                    path: self.overlay_dir(&name).display().to_string(),
                    what: e.to_string(),
                })
            }
        }
        r.apply(Event::Retired).await?;
        tracing::info!(mount = %name, dest = %r.record().dest.display(), "relocation handed over; mount retired");
        Ok(())
    }
}

/// Persists a relocation's record at `path`, then opens its relocator through `roots`
/// (`create`: a new one, whose record goes again if its files cannot be made), on the blocking
/// pool: both write and fsync files.
async fn persist_and_open(
    record: Relocation,
    path: PathBuf,
    mount: Arc<LiveMount>,
    config: FinalConfig,
    start: Vec<String>,
    create: bool,
    roots: RelocateRoots,
) -> Result<Arc<Relocator>, RelocateError> {
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        persist(&path, &record)?;
        Relocator::open(record, path.clone(), mount, config, start, create, &roots).inspect_err(
            |_| {
                if create {
                    let _ = fs::remove_file(&path);
                }
            },
        )
    })
    .await
    .map_err(|e| RelocateError::State {
        path: shown,
        what: e.to_string(),
    })?
}
