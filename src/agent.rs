//! The media agent's state: the repository, the shared read cache, and the live mounts, with
//! their specs persisted in the state directory so they come back when the server restarts.
//!
//! State directory layout:
//! ```text
//! mounts/NAME.json   one MountSpec per live mount, replaced whole ([`durable::replace`])
//! overlays/NAME/     a mount's writes (`mount::overlay`, `mount::files`), its `snapshot`
//!                    stamp and, unless its writes are kept, its `not-kept` mark (`overlays`)
//! overlays/.discarded-NAME-HEX   a discarded overlay folder on its way out
//! profiles/VM.json   boot profiles learned from the mounts' boot windows (see `profile`)
//! api-token          the control API's bearer token, mode 0600
//! api.json           where the control API listens, for the CLI
//! ```
//! Locking: the mount table is a `std::sync::RwLock` held only to look up or swap entries, never
//! across an await. Mount and unmount are serialised by an async mutex so that names and ids are
//! allocated once.
//! Durability: a new mount is on disk before `mount` answers: its overlay folder (made
//! durably), its `not-kept` mark, its `snapshot` stamp, its overlay and folder files, then its
//! spec. A mount that fails (ENOSPC, EIO) removes what it made, its spec and a new overlay
//! folder, as far as the disk lets it, so that it does not come back at the next start; what
//! it could not remove, or what a crash or a power cut left, is marked `not-kept` and named by
//! no spec, so the next mount of the name and the next start discard it (`overlays`).
//! `unmount` removes the spec durably before it answers; discarding, it renames the overlay
//! folder away (durably) too; keeping writes, it syncs them and removes the mark first.
//! Tasks: relocations, pre-staging, disk-cache warm-ups and boot-window watchers run under the
//! agent's task tracker ([`Agent::spawn_task`]), and so do recovery plans' runs (`plan`: they
//! check the stop between mounts, never inside one); a graceful stop ([`Agent::stop_tasks`]) ends
//! them at an await point and waits for them before the final sync, so none writes after it.
//! Each keeps its state consistent at every await (a relocation resumes from its recorded
//! frontier, a pre-stage or an unfinished boot window is simply not kept).

mod console;
mod files;
mod overlays;
mod plan;
mod relocations;
mod warmups;

pub use console::{Catalog, ProfileSummary, VmSnapshots};
pub use files::{FileDownload, MAX_GUEST_FILE_OPS};

pub use warmups::{WarmError, WarmInfo, WarmRequest};

pub use plan::{
    Action, EntryState, EntryStatus, Plan, PlanEntry, PlanError, PlanStatus, RunInfo, RunPhase,
};

pub use relocations::RelocateRequest;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use bytes::Bytes;

use crate::cache::disk::DiskCache;
use crate::cache::ChunkCache;
use crate::durable;
use crate::metrics::Metrics;
use crate::mount::reader::MountReader;
use crate::mount::{check_name, LiveMount, MountError, MountSpec};
use crate::prestage::{BootWindow, Learning, Prestage, PrestageStatus, WindowStatus};
use crate::profile::{plan, Profile, ProfileStore};
use crate::relocate::{RelocateRoots, RelocationStatus, Relocator};
use crate::repo::lease::{LeaseHolder, LeaseKind, SnapshotUse};
use crate::repo::{
    plan_files, ChunkReader, KeptCopies, Repository, Snapshot, SnapshotId, SnapshotInfo,
};
use crate::vmconfig::{
    rewrite_for_mount_reported, Conversion, DeviceReport, DiskBus, DiskTarget, Hypervisor,
    MountRewrite, NetworkMode, NetworkPlan, NicModel, NicReport, Rewritten,
};

/// Everything the NFS server and the control API share.
pub struct Agent {
    repo: Repository,
    datastore: Datastore,
    cache: Arc<ChunkCache>,
    metrics: Arc<Metrics>,
    state: PathBuf,
    mounts: RwLock<BTreeMap<u32, Arc<LiveMount>>>,
    /// Names whose spec is on disk but whose mount could not be opened at the start: their
    /// overlay folders are a mount's, whatever their mark says.
    unserved: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Copies of what opening each served snapshot reads, for a start while the store is
    /// away (`state/snapshots/`).
    kept: KeptCopies,
    changes: tokio::sync::Mutex<()>,
    started: jiff::Timestamp,
    /// How new mounts record their boot; `None`: they do not.
    learning: Option<Learning>,
    profiles: ProfileStore,
    /// Held while a profile is read, merged and written, so concurrent boots of one VM (its
    /// clones) each count.
    learn_lock: Arc<std::sync::Mutex<()>>,
    /// Relocations by mount name: running ones, and those handed over since the start.
    relocations: std::sync::Mutex<BTreeMap<String, Arc<Relocator>>>,
    /// The folders relocations may write into, set once by `resume_relocations`; none: off.
    relocate_roots: std::sync::OnceLock<RelocateRoots>,
    /// Fetch ahead of sequential readers (`read_ahead` in serve's config).
    read_ahead: bool,
    /// The media agent's default network map (`network_map` in serve's config), set once by
    /// `set_default_network_map`; new mounts record it in their spec.
    default_network_map: std::sync::OnceLock<BTreeMap<String, String>>,
    /// Boot sets warmed into the disk cache ahead of any mount, by snapshot.
    warmups: warmups::Warmups,
    /// The background tasks (relocations, pre-staging, warm-ups, boot windows) and what stops
    /// them.
    tasks: TaskTracker,
    stop: CancellationToken,
    /// This agent's lease in the repository: the snapshots its mounts use, so that no forget
    /// or prune, here or on another agent, takes them (decision 0017).
    lease: Arc<LeaseHolder>,
    /// Guest file listings and downloads running ([`MAX_GUEST_FILE_OPS`] at most).
    guest_ops: Arc<tokio::sync::Semaphore>,
    /// Snapshots open for guest files ([`files::OPEN_SNAPSHOTS`] at most).
    open_guests: files::OpenGuests,
    /// The last minutes of the server's counters, for the console ([`Agent::start_history`]).
    history: Arc<crate::metrics::history::History>,
    /// Recovery plans' runs, and the allow list their entries are checked against.
    plans: plan::Plans,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The lease name of the agent whose state directory is `state` on this host: the same at
/// every start, so a restarted agent replaces its own lease.
fn agent_lease_name(state: &Path) -> String {
    let full = fs::canonicalize(state).unwrap_or_else(|_| state.to_path_buf());
    let h = blake3::Hasher::new()
        .update(b"livemount agent lease")
        .update(crate::repo::lease::host_name().as_bytes())
        .update(full.as_os_str().as_encoded_bytes())
        .finalize();
    format!("agent-{}", &h.to_hex()[..16])
}

/// A mount's use of its snapshot, as leases record it.
fn mount_use(spec: &MountSpec) -> SnapshotUse {
    SnapshotUse {
        snapshot: spec.snapshot,
        what: format!("mount {}", spec.name),
    }
}

/// How hypervisors reach the datastore: rewritten KVM configs point their disks here.
#[derive(Debug, Clone)]
pub struct Datastore {
    /// Host name or address of this server as hypervisors see it.
    pub host: String,
    /// The export path, `/livemount`.
    pub export: String,
}

/// How the operator asked for a mount.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    /// The snapshot resolved by the caller.
    pub snapshot: String,
    #[serde(default)]
    pub at: Option<jiff::Timestamp>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    /// What happens to the VM's NICs (default: disconnect). Older clients' `keep_network`
    /// boolean is read as keep (true) or disconnect (false).
    #[serde(default, alias = "keep_network")]
    pub network: NetworkMode,
    /// `OLD -> NEW` network, bridge or port group names, over the server's default map; each
    /// OLD must be used by a NIC of the VM.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_map: BTreeMap<String, String>,
    /// Only the disks: no config, no files of the VM's folder (a disk attached to a VM that
    /// runs elsewhere).
    #[serde(default)]
    pub disks_only: bool,
    /// Only these hosts (addresses or CIDRs) may use the mount; empty: all the server allows.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Pre-stage the boot set from a profile (`wait` is the client's business: for the server
    /// it is `background`).
    #[serde(default)]
    pub prestage: PrestageMode,
    /// The hypervisor to serve the VM's config for (`mount --for`); None: the backup's own.
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub target: Option<crate::vmconfig::Hypervisor>,
    /// With `for` the other hypervisor: the disks' bus there. Left out of a request when
    /// `auto`, so that a newer CLI still mounts through an older server.
    #[serde(default, skip_serializing_if = "DiskBus::is_auto")]
    pub disk_bus: crate::vmconfig::DiskBus,
    /// With `for` the other hypervisor: the NICs' model there (left out when `auto`).
    #[serde(default, skip_serializing_if = "NicModel::is_auto")]
    pub nic_model: crate::vmconfig::NicModel,
}

/// `mount --prestage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrestageMode {
    Wait,
    #[default]
    Background,
    Off,
}

/// A mount's boot: its window and its pre-staging, when it has them.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct BootInfo {
    pub window: Option<WindowStatus>,
    pub prestage: Option<PrestageStatus>,
}

/// A mount as listings show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountInfo {
    pub spec: MountSpec,
    pub vm: String,
    pub hypervisor: crate::vmconfig::Hypervisor,
    pub config: String,
    pub files: Vec<MountFileInfo>,
    #[serde(default)]
    pub boot: BootInfo,
    /// Its relocation to primary storage, while one runs.
    #[serde(default)]
    pub relocation: Option<RelocationStatus>,
    /// What the mount's config does with each of the VM's NICs.
    #[serde(default)]
    pub network: Vec<NicReport>,
    /// The hypervisor of the backed-up VM, when the config was converted for the other one
    /// (`hypervisor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converted_from: Option<Hypervisor>,
    /// A converted config: what each device became, and what was left behind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceReport>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountFileInfo {
    pub name: String,
    pub size: u64,
    pub disk: bool,
}

impl Agent {
    /// Opens the state directory (creating it) and brings back every persisted mount.
    pub async fn open(
        repo: Repository,
        datastore: Datastore,
        state: &Path,
        cache_bytes: u64,
        disk_cache: Option<Arc<DiskCache>>,
        learning: Option<Learning>,
        read_ahead: bool,
    ) -> anyhow::Result<Agent> {
        let dir = state.to_path_buf();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            durable::create_dir_all(&dir.join("mounts"))?;
            // What writers that were cut short left.
            for sub in ["", "mounts", "relocations", "profiles"] {
                durable::remove_tmp_files(&dir.join(sub))?;
            }
            Ok(())
        })
        .await?
        .map_err(|e| anyhow::anyhow!("state directory {}: {e}", state.display()))?;
        // The persisted mounts' snapshots are in the lease before any of them is opened.
        let mut specs = Vec::new();
        for entry in fs::read_dir(state.join("mounts"))? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let spec: MountSpec = serde_json::from_slice(&fs::read(&path)?)
                .map_err(|e| anyhow::anyhow!("{}: unreadable mount spec: {e}", path.display()))?;
            specs.push((path, spec));
        }
        let lease = LeaseHolder::new(
            repo.store().clone(),
            agent_lease_name(state),
            LeaseKind::Agent,
            format!(
                "agent {}:{} (state {})",
                datastore.host,
                datastore.export,
                state.display()
            ),
            repo.lease_expiry(),
            specs.iter().map(|(_, s)| mount_use(s)).collect(),
        );
        if let Err(e) = lease.write().await {
            // The mounts below cannot open either while the repository cannot be reached;
            // the renewals keep trying.
            tracing::error!(error = %e, "cannot write this agent's lease in the repository: until it is written, a prune on another agent does not know which snapshots this one serves");
        }
        lease.start_renewing();
        let source: Arc<dyn ChunkReader> = Arc::new(repo.clone());
        let cache = Arc::new(ChunkCache::new(source, cache_bytes));
        let metrics = Arc::new(Metrics::with_held_reads(cache.health().held_seconds()));
        if let Some(d) = disk_cache {
            cache.set_disk(d);
        }
        let agent = Agent {
            cache,
            repo,
            datastore,
            metrics,
            state: state.to_path_buf(),
            mounts: RwLock::new(BTreeMap::new()),
            unserved: Default::default(),
            kept: KeptCopies::new(state.join("snapshots")),
            changes: tokio::sync::Mutex::new(()),
            started: jiff::Timestamp::now(),
            learning,
            warmups: Default::default(),
            profiles: ProfileStore::new(state),
            learn_lock: Arc::default(),
            relocations: std::sync::Mutex::new(BTreeMap::new()),
            relocate_roots: std::sync::OnceLock::new(),
            read_ahead,
            default_network_map: std::sync::OnceLock::new(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            lease,
            guest_ops: Arc::new(tokio::sync::Semaphore::new(MAX_GUEST_FILE_OPS)),
            open_guests: Default::default(),
            history: Default::default(),
            plans: Default::default(),
        };
        // What failed mounts and discards cut short left: nobody's writes.
        let (dir, names) = (
            state.join("overlays"),
            specs.iter().map(|(_, s)| s.name.clone()).collect(),
        );
        match tokio::task::spawn_blocking(move || overlays::sweep(&dir, &names)).await {
            Ok(Ok(gone)) if !gone.is_empty() => {
                tracing::info!(
                    ?gone,
                    "removed overlay folders of failed mounts and discards"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "overlay folders of failed mounts not removed")
            }
            Err(e) => tracing::warn!(error = %e, "overlay folder sweep failed"),
        }
        let mount_snapshots: BTreeSet<SnapshotId> = specs.iter().map(|(_, s)| s.snapshot).collect();
        for (path, spec) in specs {
            // One mount that cannot be opened (its snapshot damaged, say) must not keep the
            // others from being served: it is left out, loudly, and its state is kept.
            let name = spec.name.clone();
            match agent.open_mount(spec, false).await {
                Ok(mount) => agent.insert(Arc::new(mount)),
                Err(e) => {
                    tracing::error!(spec = %path.display(), error = %e, "mount not served");
                    agent
                        .unserved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name);
                }
            }
        }
        agent.sweep_kept(&mount_snapshots).await;
        // Relocations come back with `resume_relocations`, before any NFS client is served.
        Ok(agent)
    }

    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// The export path (`/livemount`).
    pub fn export(&self) -> &str {
        &self.datastore.export
    }

    pub fn started(&self) -> jiff::Timestamp {
        self.started
    }

    fn insert(&self, mount: Arc<LiveMount>) {
        let mut map = self.mounts.write().unwrap_or_else(|p| p.into_inner());
        map.insert(mount.spec.id, mount);
    }

    /// Every mount, in id order.
    pub fn mounts(&self) -> Vec<Arc<LiveMount>> {
        let map = self.mounts.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    pub fn mount_by_id(&self, id: u32) -> Option<Arc<LiveMount>> {
        let map = self.mounts.read().unwrap_or_else(|p| p.into_inner());
        map.get(&id).cloned()
    }

    pub fn mount_by_name(&self, name: &[u8]) -> Option<Arc<LiveMount>> {
        let map = self.mounts.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .find(|m| m.spec.name.as_bytes() == name)
            .cloned()
    }

    /// The boot profiles in the state directory.
    pub fn profiles(&self) -> &ProfileStore {
        &self.profiles
    }

    /// Opens a mount; `fresh`: made now (its VM has yet to boot), not brought back at a start.
    async fn open_mount(&self, spec: MountSpec, fresh: bool) -> Result<LiveMount, MountError> {
        let err = |source| MountError::Repo {
            mount: spec.name.clone(),
            source,
        };
        let snapshot = self
            .repo
            .snapshot_kept(&spec.snapshot, &self.kept)
            .await
            .map_err(err)?;
        let config = snapshot.config_bytes().await.map_err(err)?;
        let config = self.config_for_mount(&spec, &snapshot, config, None)?;
        // A disks-only mount's disks are attached to a VM that booted elsewhere: no boot.
        let window = self
            .learning
            .filter(|_| fresh && !spec.disks_only)
            .map(BootWindow::new);
        let reader = Arc::new(MountReader::new(
            self.cache.clone(),
            self.metrics.clone(),
            &spec.name,
            window.clone(),
        ));
        let overlays = self.overlay_dir(&spec.name);
        if !spec.read_only {
            let (dir, claim) = (overlays.clone(), spec.clone());
            on_blocking_pool(&overlays, move || claim_overlays(&dir, &claim)).await?;
        }
        let mount = LiveMount::open(
            spec,
            &snapshot,
            reader,
            config,
            &overlays,
            window,
            self.read_ahead,
        )
        .await?;
        Ok(mount)
    }

    /// Sets the default network map that new mounts record (`network_map` in serve's
    /// config); once, before the first mount.
    pub fn set_default_network_map(&self, map: BTreeMap<String, String>) -> anyhow::Result<()> {
        self.default_network_map
            .set(map)
            .map_err(|_| anyhow::anyhow!("the default network map was set already"))
    }

    /// The config as the mount serves it: a new name (the mount's), UUID and MAC addresses,
    /// NICs as the spec's network plan says (with the report of what was done to each), disks
    /// pointing at the mount's files (KVM:
    /// network disks over NFS from this server). Derived from the spec alone, so a restart
    /// serves the same bytes. With `relocated`: the same config with KVM disks pointing at
    /// copies of the disk files in that folder (a relocation's handover).
    fn config_for_mount(
        &self,
        spec: &MountSpec,
        snapshot: &Snapshot,
        original: Bytes,
        relocated: Option<&Path>,
    ) -> Result<Rewritten, MountError> {
        let m = &snapshot.manifest;
        let hypervisor = spec.hypervisor(m.vm.hypervisor);
        let (_, names) = plan_files(m, hypervisor, true);
        // A disk converted to ESXi needs a descriptor, and a descriptor counts whole sectors.
        if spec.convert.is_some() && hypervisor == Hypervisor::Esxi {
            if let Some(d) = m.disks.iter().find(|d| !d.size.is_multiple_of(512)) {
                return Err(MountError::Conversion {
                    what: format!(
                        "disk {} is {} bytes, not a whole number of 512-byte sectors, which \
                         no VMDK can describe: ESXi cannot use it; mount it for kvm",
                        d.device, d.size
                    ),
                });
            }
        }
        let folder = format!(
            "{}/{}",
            self.datastore.export.trim_end_matches('/'),
            spec.name
        );
        let disks = names
            .into_iter()
            .map(|(data, desc)| match hypervisor {
                Hypervisor::Esxi => DiskTarget::VmdkFile(desc.unwrap_or(data)),
                Hypervisor::Kvm if relocated.is_some() => DiskTarget::RawFile(
                    relocated
                        .unwrap_or(Path::new("/"))
                        .join(&data)
                        .display()
                        .to_string(),
                ),
                Hypervisor::Kvm => DiskTarget::Nfs {
                    host: self.datastore.host.clone(),
                    path: format!("{folder}/{data}"),
                },
            })
            .collect();
        let seed = blake3::Hasher::new()
            .update(b"livemount mount identity")
            .update(spec.snapshot.to_string().as_bytes())
            .update(spec.name.as_bytes())
            .update(&spec.created.as_nanosecond().to_le_bytes())
            .finalize();
        let b = seed.as_bytes();
        // A version 4 UUID shape from the seed's first 16 bytes.
        let uuid = format!(
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-4{:01x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5], b[6] & 0x0f, b[7], (b[8] & 0x3f) | 0x80, b[9],
            b[10], b[11], b[12], b[13], b[14], b[15]
        );
        let how = MountRewrite {
            display_name: spec.name.clone(),
            uuid,
            mac_seed: *blake3::keyed_hash(b, b"mac addresses of this mount.....").as_bytes(),
            network: NetworkPlan {
                mode: spec.network,
                map: spec.network_map.clone(),
                default_map: spec.default_network_map.clone(),
                legacy_link_down_only: spec.network_rewrite == 0,
            },
            disks,
            convert: spec.convert,
        };
        rewrite_for_mount_reported(&m.config.file_name, &original, &how).map_err(|e| {
            MountError::Config {
                mount: spec.name.clone(),
                what: e.to_string(),
            }
        })
    }

    /// Creates a live mount. Returns in well under a second whatever the disk sizes: nothing is
    /// copied, only the snapshot's block tables are read.
    pub async fn mount(&self, req: &MountRequest) -> Result<MountInfo, MountError> {
        let _serial = self.changes.lock().await;
        let spec_err = |e: crate::repo::RepoError| MountError::Repo {
            mount: req.name.clone().unwrap_or_default(),
            source: e,
        };
        let info: SnapshotInfo = self
            .repo
            .resolve(&crate::repo::SnapshotSpec::new(&req.snapshot, req.at))
            .await
            .map_err(spec_err)?;
        let mounts = self.mounts();
        let id = mounts.iter().map(|m| m.spec.id).max().unwrap_or(0) + 1;
        let name = match &req.name {
            Some(n) => n.clone(),
            None => format!("{}-lm{id}", sanitize(&info.vm.name)),
        };
        check_name(&name)?;
        let hosts = req
            .hosts
            .iter()
            .map(|h| {
                h.parse::<ipnet::IpNet>()
                    .or_else(|_| h.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| MountError::BadHost { value: h.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if mounts.iter().any(|m| m.spec.name == name) {
            return Err(MountError::Exists { name });
        }
        let convert = conversion(req, info.vm.hypervisor)?;
        let spec = MountSpec {
            name,
            id,
            snapshot: info.id,
            snapshot_name: info.name.clone(),
            read_only: req.read_only,
            network: req.network,
            network_map: req.network_map.clone(),
            default_network_map: self.default_network_map.get().cloned().unwrap_or_default(),
            network_rewrite: crate::mount::NETWORK_REWRITE,
            created: jiff::Timestamp::now(),
            hosts,
            disks_only: req.disks_only,
            convert,
        };
        let unserved = self
            .unserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&spec.name);
        if !unserved {
            // The name is free: a marked folder under it is what a failed mount or a discard
            // cut short left, not kept writes (which, of another snapshot, would refuse this).
            let dir = self.overlay_dir(&spec.name);
            on_blocking_pool(&dir.clone(), move || {
                match overlays::is_not_kept(&dir) {
                    Ok(true) => overlays::discard(&dir),
                    other => other.map(|_| ()),
                }
                .map_err(|e| state_err(&dir, e))
            })
            .await?;
        }
        // In the lease before the snapshot is opened: a forget that misses the lease has
        // removed the manifest before it is read, and the mount fails (decision 0017).
        let mut uses = self.lease_uses();
        uses.push(mount_use(&spec));
        self.lease.set_uses(uses).await.map_err(spec_err)?;
        // What this call makes, it removes again if the mount fails: a spec that took its name
        // before its folder's sync failed would bring the mount back at the next start, and a
        // new overlay folder would be taken for kept writes.
        let overlays = self.overlay_dir(&spec.name);
        let fresh = !spec.read_only && !overlays.exists();
        let spec_path = self.spec_path(&spec.name);
        let made = async {
            let mount = self.open_mount(spec.clone(), true).await?;
            let (path, persisted) = (spec_path.clone(), spec.clone());
            on_blocking_pool(&path.clone(), move || persist(&path, &persisted)).await?;
            Ok::<_, MountError>(mount)
        }
        .await;
        let mount = match made {
            Ok(m) => Arc::new(m),
            Err(e) => {
                let undone = on_blocking_pool(&spec_path.clone(), move || {
                    undo_mount(&spec_path, fresh.then_some(overlays.as_path()))
                })
                .await;
                if let Err(u) = undone {
                    tracing::warn!(mount = %spec.name, error = %u, "a failed mount's files could not be removed");
                }
                self.renew_lease().await;
                return Err(e);
            }
        };
        if req.prestage != PrestageMode::Off && !spec.disks_only {
            self.start_prestage(&mount);
        }
        if let Some(w) = &mount.window {
            self.spawn_task(watch_window(w.clone(), mount.clone(), self.learner()));
        }
        let out = describe(&mount, &info);
        self.insert(mount);
        tracing::info!(mount = %spec.name, snapshot = %spec.snapshot_name, "mounted");
        Ok(out)
    }

    /// Starts warming the mount's boot set, if there is a profile to follow (the VM's own, or
    /// one it shares enough boot chunks with). At most the staging area's size is planned.
    fn start_prestage(&self, mount: &Arc<LiveMount>) {
        let (profiles, bad) = self.profiles.list();
        for e in bad {
            tracing::warn!(error = %e, "boot profile skipped");
        }
        let cs = self.repo.chunk_size().as_u64();
        let max = usize::try_from(self.cache.staging_capacity() / cs).unwrap_or(usize::MAX);
        let Some((source, chunks)) = plan(&mount.vm, &profiles, &mount.blocks(), max) else {
            return;
        };
        tracing::info!(mount = %mount.spec.name, ?source, chunks = chunks.len(), "pre-staging the boot set");
        let p = Prestage::new(source, chunks, cs);
        if mount.prestage.set(p.clone()).is_ok() {
            self.spawn_task(p.run(self.cache.clone()));
        }
    }

    /// Runs `work` as a background task of the agent: tracked, and ended at its next await
    /// by [`Agent::stop_tasks`].
    pub(crate) fn spawn_task<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) {
        let stop = self.stop.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                biased;
                _ = stop.cancelled() => {}
                _ = work => {}
            }
        });
    }

    /// What this agent's mounts use, for its lease.
    fn lease_uses(&self) -> Vec<SnapshotUse> {
        self.mounts().iter().map(|m| mount_use(&m.spec)).collect()
    }

    /// Writes the lease with the mounts as they are now; a failure is logged (the renewals
    /// keep trying), since what is left out of it is no longer in use.
    async fn renew_lease(&self) {
        if let Err(e) = self.lease.set_uses(self.lease_uses()).await {
            tracing::warn!(error = %e, "cannot update this agent's lease in the repository");
        }
    }

    /// Removes this agent's lease (a graceful stop, after every mount is synced).
    pub async fn release_lease(&self) {
        if let Err(e) = self.lease.release().await {
            tracing::warn!(error = %e, "cannot remove this agent's lease from the repository; it expires by itself");
        }
    }

    /// Background tasks running now.
    pub fn tasks_running(&self) -> usize {
        self.tasks.len()
    }

    /// Ends every background task at its next await and waits for them (at most `within`);
    /// no new one starts after this. False if some did not end in time.
    pub async fn stop_tasks(&self, within: std::time::Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_ok()
    }

    fn learner(&self) -> Learner {
        Learner {
            store: self.profiles.clone(),
            lock: self.learn_lock.clone(),
            chunk_size: self.repo.chunk_size().as_u64(),
        }
    }

    /// Removes a mount. Its writes are discarded unless `keep_writes`, in which case they stay in
    /// the state directory and a later mount of the same snapshot under the same name adopts
    /// them. The backup is untouched either way.
    pub async fn unmount(&self, name: &str, keep_writes: bool) -> Result<MountSpec, MountError> {
        self.remove_mount(name, keep_writes, false).await
    }

    /// Removes a mount. Unless `retiring` (its relocation was handed over and retires it), a
    /// mount being relocated is refused; checked under the lock that starts relocations.
    async fn remove_mount(
        &self,
        name: &str,
        keep_writes: bool,
        retiring: bool,
    ) -> Result<MountSpec, MountError> {
        let _serial = self.changes.lock().await;
        let m = self
            .mount_by_name(name.as_bytes())
            .ok_or_else(|| MountError::NotFound {
                name: name.to_string(),
            })?;
        if let Some(r) = self.relocation(name) {
            let own = Arc::ptr_eq(r.mount(), &m);
            if own && !retiring && r.phase() != crate::relocate::Phase::Done {
                return Err(MountError::Relocating {
                    name: name.to_string(),
                    phase: r.phase().to_string(),
                });
            }
        }
        if let Some(p) = m.prestage.get() {
            p.cancel();
        }
        // The VM has stopped: its boot, if still recorded, is over.
        if let Some(w) = &m.window {
            self.learner().learn(w, &m).await;
        }
        let dir = self.overlay_dir(name);
        let sync_err = |what: String| MountError::State {
            path: dir.display().to_string(),
            what,
        };
        if keep_writes {
            // Durable before the mount goes: whatever the VM had acknowledged; then the mark
            // goes, so that a later mount adopts the writes even if a cut follows at once.
            for f in &m.files {
                f.commit().await.map_err(|e| sync_err(e.to_string()))?;
            }
            if let Some(folder) = &m.folder {
                folder
                    .commit_all()
                    .await
                    .map_err(|e| sync_err(e.to_string()))?;
            }
            let d = dir.clone();
            on_blocking_pool(&dir, move || {
                overlays::keep(&d).map_err(|e| state_err(&d, e))
            })
            .await?;
        } else {
            // A folder from before the mark: marked first, so that a cut between the spec's
            // removal and the discard leaves nobody's writes, never kept ones.
            let d = dir.clone();
            on_blocking_pool(&dir, move || {
                match overlays::is_not_kept(&d) {
                    Ok(false) if d.exists() => overlays::mark_not_kept(&d),
                    other => other.map(|_| ()),
                }
                .map_err(|e| state_err(&d, e))
            })
            .await?;
        }
        let (path, mounts) = (self.spec_path(&m.spec.name), self.state.join("mounts"));
        on_blocking_pool(&path.clone(), move || {
            fs::remove_file(&path).map_err(|e| state_err(&path, e))?;
            durable::fsync_dir(&mounts).map_err(|e| state_err(&mounts, e))
        })
        .await?;
        self.mounts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&m.spec.id);
        if !keep_writes {
            // Durably gone before `unmount` answers: a later mount of this name must not find
            // these writes again, whenever the power goes.
            on_blocking_pool(&dir.clone(), move || {
                overlays::discard(&dir).map_err(|e| state_err(&dir, e))
            })
            .await?;
        }
        self.renew_lease().await;
        let serving = self.mounts().iter().map(|m| m.spec.snapshot).collect();
        self.sweep_kept(&serving).await;
        tracing::info!(mount = %name, "unmounted");
        Ok(m.spec.clone())
    }

    /// Makes every mount's acknowledged writes durable (disks' overlays and folder files), as
    /// COMMIT would. Run at a graceful stop, after the connections are closed.
    pub async fn sync_all(&self) -> Result<(), MountError> {
        for m in self.mounts() {
            let err = |what: String| MountError::State {
                path: self.overlay_dir(&m.spec.name).display().to_string(),
                what,
            };
            for f in &m.files {
                f.commit().await.map_err(|e| err(e.to_string()))?;
            }
            if let Some(folder) = &m.folder {
                folder.commit_all().await.map_err(|e| err(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Every mount as listings show it.
    pub async fn list(&self) -> Vec<MountInfo> {
        let mut out = Vec::new();
        for m in self.mounts() {
            let mut d = describe(&m, &m.snapshot);
            // Only this mount's own relocation (not a handed-over one of an earlier mount of
            // the same name).
            d.relocation = self
                .relocation(&m.spec.name)
                .filter(|r| Arc::ptr_eq(r.mount(), &m))
                .map(|r| r.status());
            out.push(d);
        }
        out
    }

    /// Opens a mount's snapshot, its metadata kept for a start while the store is away.
    pub(crate) async fn open_snapshot(
        &self,
        id: &SnapshotId,
    ) -> Result<Snapshot, crate::repo::RepoError> {
        self.repo.snapshot_kept(id, &self.kept).await
    }

    /// Removes the kept copies of snapshots no mount (served or not) is of; a failure is
    /// logged, and the next sweep tries again.
    async fn sweep_kept(&self, serving: &BTreeSet<SnapshotId>) {
        let (kept, mut serving) = (self.kept.clone(), serving.clone());
        // A mount left unserved keeps its copies: they are what serves it at the next start.
        let specs = self.state.join("mounts");
        let swept = tokio::task::spawn_blocking(move || {
            for entry in fs::read_dir(&specs)? {
                let path = entry?.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                if let Ok(spec) = serde_json::from_slice::<MountSpec>(&fs::read(&path)?) {
                    serving.insert(spec.snapshot);
                }
            }
            kept.sweep(&serving)
        })
        .await;
        match swept {
            Ok(Ok(gone)) if !gone.is_empty() => {
                tracing::info!(
                    ?gone,
                    "removed the kept copies of snapshots no mount serves"
                )
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(folder = %self.kept.dir().display(), error = %e, "kept copies not swept")
            }
            Err(e) => tracing::warn!(error = %e, "kept copies sweep failed"),
        }
    }

    fn overlay_dir(&self, name: &str) -> PathBuf {
        self.state.join("overlays").join(name)
    }

    fn spec_path(&self, name: &str) -> PathBuf {
        self.state.join("mounts").join(format!("{name}.json"))
    }
}

/// Makes sure an overlay folder holds this mount's writes: a new folder is made and stamped
/// with the snapshot id, both durably; kept writes of the same snapshot are adopted; writes
/// kept for another snapshot are never laid over this one.
fn claim_overlays(dir: &Path, spec: &MountSpec) -> Result<(), MountError> {
    let stamp = dir.join("snapshot");
    // A mount converted to the other hypervisor (`--for`) stamps its folder with that
    // hypervisor: the folder keeps the config and files made for it, which a mount for the
    // other one must not adopt.
    let made_for = dir.join("for");
    let want = spec.convert.map(|c| c.to.to_string());
    match fs::read_to_string(&stamp) {
        Ok(id) if id.trim() == spec.snapshot.to_string() => {
            let had = match fs::read_to_string(&made_for) {
                Ok(text) => Some(text.trim().to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(state_err(&made_for, e)),
            };
            if had == want {
                return Ok(());
            }
            let say = |h: &Option<String>| match h {
                Some(h) => format!("--for {h}"),
                None => "the backup's own hypervisor (no --for)".to_owned(),
            };
            Err(MountError::State {
                path: dir.display().to_string(),
                what: format!(
                    "it holds kept writes and files of this mount made for {}, not for {}; \
                     mount it as it was made, or choose another name",
                    say(&had),
                    say(&want)
                ),
            })
        }
        Ok(other) => Err(MountError::State {
            path: dir.display().to_string(),
            what: format!(
                "it holds kept writes of snapshot {}, not of {}; mount that snapshot under this name, or choose another name",
                other.trim(),
                spec.snapshot_name
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            durable::create_dir_all(dir).map_err(|e| state_err(dir, e))?;
            // Before the stamp: a stamped folder that no spec names is kept writes only if
            // `unmount --keep-writes` took the mark away.
            overlays::mark_not_kept(dir).map_err(|e| state_err(dir, e))?;
            if let Some(h) = &want {
                durable::replace(&made_for, h.as_bytes()).map_err(|e| state_err(&made_for, e))?;
            }
            durable::replace(&stamp, spec.snapshot.to_string().as_bytes())
                .map_err(|e| state_err(&stamp, e))
        }
        Err(e) => Err(state_err(&stamp, e)),
    }
}

/// Removes what a failed mount made: its spec, if it took its name, and the overlay folder
/// `made` (new, made by the failed mount: discarded), each durably.
fn undo_mount(spec: &Path, made: Option<&Path>) -> Result<(), MountError> {
    let gone = |path: &Path, removed: std::io::Result<()>| match removed {
        Ok(()) => {
            let above = path.parent().unwrap_or(Path::new("."));
            durable::fsync_dir(above).map_err(|e| state_err(above, e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(state_err(path, e)),
    };
    let spec_gone = gone(spec, fs::remove_file(spec));
    match made {
        Some(dir) => overlays::discard(dir)
            .map_err(|e| state_err(dir, e))
            .and(spec_gone),
        None => spec_gone,
    }
}

/// Writes a mount's spec durably ([`durable::replace`]).
fn persist(path: &Path, spec: &MountSpec) -> Result<(), MountError> {
    let bytes = serde_json::to_vec_pretty(spec).map_err(|e| MountError::State {
        path: path.display().to_string(),
        what: e.to_string(),
    })?;
    durable::replace(path, &bytes).map_err(|e| state_err(path, e))
}

/// Runs state-directory work (file I/O, fsyncs) on the blocking pool; a task that failed is
/// an error of `path`.
async fn on_blocking_pool<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, MountError> + Send + 'static,
) -> Result<T, MountError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| state_err(path, std::io::Error::other(e.to_string())))?
}

/// Merges ended boot windows into profiles.
#[derive(Clone)]
struct Learner {
    store: ProfileStore,
    lock: Arc<std::sync::Mutex<()>>,
    chunk_size: u64,
}

impl Learner {
    /// Ends the window and merges its trace into the VM's profile. Failures are logged: a
    /// profile is an optimisation, never a reason for a mount or unmount to fail.
    async fn learn(&self, w: &BootWindow, m: &LiveMount) {
        let Some(trace) = w.end() else {
            return;
        };
        let status = w.status();
        let (me, vm, mount) = (self.clone(), m.vm.clone(), m.spec.name.clone());
        let result = tokio::task::spawn_blocking(move || {
            let _held = me.lock.lock().unwrap_or_else(|p| p.into_inner());
            let now = jiff::Timestamp::now();
            let old = me
                .store
                .load(&vm)?
                .filter(|p| p.chunk_size == me.chunk_size)
                .unwrap_or_else(|| Profile::new(&vm, me.chunk_size, now));
            let merged = old.merge(&trace, now);
            me.store.save(&merged).map(|path| (path, merged))
        })
        .await;
        match result {
            Ok(Ok((path, p))) => tracing::info!(
                mount = %mount, profile = %path.display(), boots = p.boots, blocks = p.blocks.len(),
                window_blocks = status.blocks, hits = status.hits, misses = status.misses,
                "boot window ended; profile updated"
            ),
            Ok(Err(e)) => tracing::warn!(mount = %mount, error = %e, "boot profile not updated"),
            Err(e) => tracing::error!(mount = %mount, error = %e, "boot profile task failed"),
        }
    }
}

/// Ends a mount's boot window when it is due (quiet, or at its limit) and learns from it.
async fn watch_window(w: Arc<BootWindow>, m: Arc<LiveMount>, learner: Learner) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    while w.recording() {
        tick.tick().await;
        if w.due(std::time::Instant::now()) {
            learner.learn(&w, &m).await;
        }
    }
}

fn describe(m: &LiveMount, info: &SnapshotInfo) -> MountInfo {
    MountInfo {
        spec: m.spec.clone(),
        vm: info.vm.name.clone(),
        hypervisor: m.hypervisor,
        config: m.config_name.clone(),
        files: m
            .files
            .iter()
            .map(|f| MountFileInfo {
                name: f.name.clone(),
                size: f.size(),
                disk: f.is_disk(),
            })
            .chain(m.folder.iter().flat_map(|f| {
                f.list(0).into_iter().map(|(_, e)| MountFileInfo {
                    name: e.name,
                    size: e.size,
                    disk: false,
                })
            }))
            .collect(),
        boot: BootInfo {
            window: m.window.as_ref().map(|w| w.status()),
            prestage: m.prestage.get().map(|p| p.status()),
        },
        relocation: None,
        network: m.network.clone(),
        converted_from: (m.hypervisor != info.vm.hypervisor).then_some(info.vm.hypervisor),
        devices: m.devices.clone(),
    }
}

/// The conversion a mount request asks for, of a backup of a `backup` VM: None for its own
/// hypervisor. Errors: `--disk-bus` or `--nic-model` without a conversion, or naming what
/// the target lacks.
fn conversion(req: &MountRequest, backup: Hypervisor) -> Result<Option<Conversion>, MountError> {
    let what = |what: String| MountError::Conversion { what };
    match req.target {
        Some(to) if to != backup => {
            let c = Conversion {
                to,
                disk_bus: req.disk_bus,
                nic_model: req.nic_model,
            };
            c.check().map_err(what)?;
            Ok(Some(c))
        }
        _ if req.disk_bus != DiskBus::Auto || req.nic_model != NicModel::Auto => {
            Err(what(format!(
                "--disk-bus and --nic-model apply to a config converted with --for {}; this \
                         backup is of a {backup} VM",
                match backup {
                    Hypervisor::Esxi => "kvm",
                    Hypervisor::Kvm => "esxi",
                }
            )))
        }
        _ => Ok(None),
    }
}

/// A VM name made fit for a mount name.
fn sanitize(vm: &str) -> String {
    let s: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(48)
        .collect();
    let s = s.trim_start_matches(['-', '.']).to_string();
    if s.is_empty() {
        "vm".into()
    } else {
        s
    }
}

fn state_err(path: &Path, e: std::io::Error) -> MountError {
    MountError::State {
        path: path.display().to_string(),
        what: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(snapshot: char) -> MountSpec {
        MountSpec {
            name: "m".into(),
            id: 1,
            snapshot: crate::repo::SnapshotId::from_hex(&snapshot.to_string().repeat(64)).unwrap(),
            snapshot_name: "vm@2026-01-01T00:00:00Z".into(),
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

    #[test]
    fn a_new_mount_is_durable_when_its_overlay_is_claimed_and_its_spec_persisted() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path();
        let dir = state.join("overlays/m");
        claim_overlays(&dir, &spec('a')).unwrap();
        let stamp = dir.join("snapshot");
        assert_eq!(fs::read_to_string(&stamp).unwrap(), "a".repeat(64));
        // The folders made, each in its parent; the mark, then the stamp, each written in
        // full and then named.
        assert_eq!(
            durable::synced_under(state),
            [
                state.to_path_buf(),
                state.join("overlays"),
                dir.join(overlays::NOT_KEPT),
                dir.clone(),
                stamp.clone(),
                dir.clone()
            ]
        );
        assert!(overlays::is_not_kept(&dir).unwrap());
        // Adopted by the same snapshot; refused for another, naming both.
        claim_overlays(&dir, &spec('a')).unwrap();
        let err = claim_overlays(&dir, &spec('b')).unwrap_err().to_string();
        assert!(
            err.contains(&"a".repeat(64)) && err.contains("vm@2026"),
            "{err}"
        );
        // Refused for the same snapshot converted to another hypervisor, and the other way.
        let converted = |to| MountSpec {
            convert: Some(Conversion {
                to,
                disk_bus: DiskBus::Auto,
                nic_model: NicModel::Auto,
            }),
            ..spec('a')
        };
        let err = claim_overlays(&dir, &converted(Hypervisor::Esxi))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("made for the backup's own hypervisor (no --for), not for --for esxi"),
            "{err}"
        );
        let other = state.join("overlays/c");
        claim_overlays(&other, &converted(Hypervisor::Kvm)).unwrap();
        claim_overlays(&other, &converted(Hypervisor::Kvm)).unwrap();
        let err = claim_overlays(&other, &spec('a')).unwrap_err().to_string();
        assert!(err.contains("made for --for kvm"), "{err}");
        assert_eq!(fs::read_to_string(other.join("for")).unwrap(), "kvm");

        durable::create_dir_all(&state.join("mounts")).unwrap();
        let path = state.join("mounts/m.json");
        persist(&path, &spec('a')).unwrap();
        let synced = durable::synced_under(&state.join("mounts"));
        assert_eq!(synced[synced.len() - 2..], [path, state.join("mounts")]);
    }

    #[test]
    fn old_keep_network_fields_still_load() {
        let id = "a".repeat(64);
        let old = |keep: bool| {
            format!(
                r#"{{"name":"m","id":1,"snapshot":"{id}","snapshot_name":"vm@t","read_only":false,"keep_network":{keep},"created":"2026-01-01T00:00:00Z"}}"#
            )
        };
        let spec: MountSpec = serde_json::from_str(&old(true)).unwrap();
        assert_eq!(spec.network, NetworkMode::Keep);
        let spec: MountSpec = serde_json::from_str(&old(false)).unwrap();
        assert_eq!(spec.network, NetworkMode::Disconnect);
        assert!(spec.network_map.is_empty());
        // Made before the plan: its config is rewritten as it was then.
        assert_eq!(spec.network_rewrite, 0);
        // Written back in the new form, and read again the same.
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains(r#""network":"disconnect""#), "{text}");
        assert!(
            !text.contains("keep_network") && !text.contains("network_map"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<MountSpec>(&text).unwrap(), spec);

        let req: MountRequest =
            serde_json::from_str(r#"{"snapshot":"vm","keep_network":true}"#).unwrap();
        assert_eq!(req.network, NetworkMode::Keep);
        let req: MountRequest = serde_json::from_str(
            r#"{"snapshot":"vm","network":"remove","network_map":{"default":"lab"}}"#,
        )
        .unwrap();
        assert_eq!(req.network, NetworkMode::Remove);
        assert_eq!(req.network_map["default"], "lab");
        let req: MountRequest = serde_json::from_str(r#"{"snapshot":"vm"}"#).unwrap();
        assert_eq!(req.network, NetworkMode::Disconnect);
        let err = serde_json::from_str::<MountRequest>(r#"{"snapshot":"vm","network":"off"}"#)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("not one of keep, disconnect, remove"),
            "{err}"
        );
    }
}
