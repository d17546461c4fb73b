//! Relocation: moving a running live-mounted VM's disks to primary storage while it runs, its
//! reads first, then handing over with every write kept.
//!
//! Owns: one [`Relocator`] per relocation: the copy task (chunk-sized extents in disk order,
//! fetched in the scheduler's background class without entering the cache, backing off while
//! VM reads are active, capped by `--rate`), its checkpoints (the state machine in [`state`],
//! persisted as `relocations/MOUNT.json`), the handover (fence, copy the rest, verify, write
//! the config) and the cleanup of a cancelled copy.
//! Must not: speak NFS or HTTP, or decide what a mount is (the agent opens mounts and retires
//! them; this module only asks it to); touch its destination other than through the
//! destination's folder handle ([`dest::DestDir`], reached through `relocate_roots`), or write
//! a file there whose name is not a plain name.
//!
//! The VM's writes reach the copy through each disk's [`Mirror`], attached to its overlay for
//! the relocation's whole life (see `mount::mirror` for why no write is lost in between).
//! Durability: a checkpoint syncs the destination files before it records their frontier, and
//! a COMMIT of the VM syncs the mirror with the overlay, so after a crash every byte below a
//! recorded frontier is in the copy, and everything above it is copied again.

pub mod dest;
pub mod state;

use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use dest::{DestDir, DestError, RelocateRoots};
pub use state::{DiskCopy, Event, Next, Phase, Refused, Relocation, Resume};

use crate::agent::Agent;
use crate::cache::ChunkCache;
use crate::durable;
use crate::fetch::FetchClass;
use crate::mount::mirror::Mirror;
use crate::mount::overlay::Overlay;
use crate::mount::{Content, LiveMount};
use crate::repo::{ChunkId, DiskImage};

/// Errors of relocations; each names the mount and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RelocateError {
    #[error("no mount named {name}; `livemount mounts` lists them")]
    NoMount { name: String },
    #[error(
        "mount {mount} has no relocation; start one with `livemount relocate {mount} --to DIR`"
    )]
    NoRelocation { mount: String },
    #[error("mount {mount} is being relocated to {dest} already ({phase}); wait for it, --finish it or --cancel it")]
    Busy {
        mount: String,
        dest: String,
        phase: Phase,
    },
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Roots(#[from] DestError),
    #[error("relocation destination {path}: {what}")]
    Dest { path: String, what: String },
    #[error(
        "the VM of {mount} still writes to its disks (last write {ago:.1} s ago): shut it down, \
         then finish; --force finishes anyway and refuses its further writes"
    )]
    Running { mount: String, ago: f64 },
    #[error("relocation state {path}: {what}")]
    State { path: String, what: String },
    #[error(
        "mount {mount} holds only disks (mount --disks-only): there is no VM to relocate; copy \
         a disk with `qemu-img convert` from its NFS or NBD URL instead"
    )]
    DisksOnly { mount: String },
}

/// How long a mount's disks must have had no write before `--finish` believes the VM stopped.
pub const QUIET_BEFORE_FINISH: Duration = Duration::from_secs(3);
/// Time between checkpoints of a running copy.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
/// Extents fetched at once while no VM reads; while they are active, one.
const MAX_WIDTH: usize = 8;
/// Pause between extents while VM reads are active: from the first to the last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(200));
/// Folder files bigger than this are not carried over at handover (swap files, core dumps).
const MAX_FOLDER_FILE: u64 = 16 << 20;

/// A relocation as listings and the CLI show it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RelocationStatus {
    pub mount: String,
    pub dest: PathBuf,
    pub phase: Phase,
    /// Bytes copied so far (the frontiers now; the record's durable ones may be behind).
    pub copied: u64,
    pub total: u64,
    /// Copy speed over the last seconds, bytes per second (holes count: they are copied too).
    pub bytes_per_second: f64,
    /// Bytes of the backup this copy read (from the read cache or the repository) since the
    /// server started.
    pub fetched: u64,
    pub eta_seconds: Option<f64>,
    pub rate_limit: Option<u64>,
    /// Bytes of the copy checked against the mount's view at handover.
    pub verified: u64,
    pub error: Option<String>,
    pub started: jiff::Timestamp,
    /// After the handover: the VM's config in its new home, and how to start it from there.
    pub config: Option<PathBuf>,
    pub start: Vec<String>,
}

/// The config the handover writes: made up front (KVM: disks pointing at the copies), or the
/// mount's own config file as the hypervisor left it (ESXi: its disk names are relative).
#[derive(Debug, Clone)]
pub enum FinalConfig {
    Fixed { name: String, bytes: Bytes },
    FromMount { name: String },
}

struct Job {
    /// The disk's name in the mount and in the destination.
    file: String,
    image: DiskImage,
    overlay: Option<Arc<Overlay>>,
    mirror: Arc<Mirror>,
}

/// One relocation.
pub struct Relocator {
    record: Mutex<Relocation>,
    /// The destination folder, held open while the copy is made (copying, synced, finishing);
    /// otherwise reached through `roots` when needed (the cleanup).
    dest: Option<Arc<DestDir>>,
    roots: RelocateRoots,
    /// Serialises events, so each is persisted before the next is applied.
    applying: tokio::sync::Mutex<()>,
    path: PathBuf,
    mount: Arc<LiveMount>,
    jobs: Vec<Job>,
    config: FinalConfig,
    /// Start instructions for the relocated VM (ESXi or KVM), filled in by the agent.
    start: Vec<String>,
    wake: tokio::sync::Notify,
    meter: Mutex<VecDeque<(Instant, u64)>>,
    fetched: AtomicU64,
    verified: AtomicU64,
    outcome: Mutex<Option<PathBuf>>,
    /// A task carries the relocation on (see [`Relocator::drive`]).
    running: AtomicBool,
    /// An event was applied since the task last looked at the phase.
    kicked: AtomicBool,
}

impl std::fmt::Debug for Relocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relocator")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn dest_err(path: &Path, e: impl std::fmt::Display) -> RelocateError {
    RelocateError::Dest {
        path: path.display().to_string(),
        what: e.to_string(),
    }
}

/// Writes a relocation record durably ([`durable::replace`]).
pub fn persist(path: &Path, r: &Relocation) -> Result<(), RelocateError> {
    let err = |e: std::io::Error| RelocateError::State {
        path: path.display().to_string(),
        what: e.to_string(),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    durable::create_dir_all(dir).map_err(err)?;
    let bytes = serde_json::to_vec_pretty(r).map_err(|e| err(std::io::Error::other(e)))?;
    durable::replace(path, &bytes).map_err(err)
}

fn remove_record(path: &Path) -> Result<(), RelocateError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(RelocateError::State {
                path: path.display().to_string(),
                what: e.to_string(),
            })
        }
    }
    if let Some(dir) = path.parent() {
        let _ = durable::fsync_dir(dir);
    }
    Ok(())
}

/// Names of the files a relocation of `mount` writes into its destination: the disks, their
/// descriptors, the config.
fn planned_files(mount: &LiveMount, config: &FinalConfig) -> Vec<String> {
    let mut names: Vec<String> = mount.files.iter().map(|f| f.name.clone()).collect();
    let c = match config {
        FinalConfig::Fixed { name, .. } | FinalConfig::FromMount { name } => name.clone(),
    };
    if !names.contains(&c) {
        names.push(c);
    }
    names
}

impl Relocator {
    /// Opens the relocation `record` of `mount` (made new by the caller or read back at a
    /// start): opens the destination folder through `roots` (`create`: makes it, and its
    /// files), opens its files and attaches the mirrors, so every VM write from now on reaches
    /// the copy. `path` is where the record lives. Blocks (file I/O).
    pub fn open(
        record: Relocation,
        path: PathBuf,
        mount: Arc<LiveMount>,
        config: FinalConfig,
        start: Vec<String>,
        create: bool,
        roots: &RelocateRoots,
    ) -> Result<Arc<Relocator>, RelocateError> {
        let copying = !matches!(
            record.phase,
            Phase::Cancelling | Phase::Done | Phase::Failed
        );
        // Nothing copied yet (a retry, or a crash right after the record was made): the folder
        // is made if it is missing, as are its files below.
        let fresh = create || (record.phase == Phase::Copying && record.copied() == 0);
        let dest = if copying {
            Some(Arc::new(roots.open(&record.dest, fresh)?))
        } else {
            // Nothing to copy or mirror: the files may be gone already.
            None
        };
        if let (true, Some(dest)) = (create, &dest) {
            for name in planned_files(&mount, &config) {
                let p = record.dest.join(&name);
                if dest.exists(&name).map_err(|e| dest_err(&p, e))? {
                    return Err(dest_err(
                        &p,
                        "exists already; relocate into a folder without the VM's files",
                    ));
                }
            }
        }
        let mut jobs = Vec::new();
        // Files made here, removed again if a later one cannot be made.
        let mut made: Vec<String> = Vec::new();
        // Whether a file was made here (then its name is made durable below).
        let mut new_names = false;
        let undo = |made: &[String]| {
            if let Some(dest) = &dest {
                for name in made {
                    let _ = dest.remove(name);
                }
            }
        };
        for (d, f) in mount.files.iter().enumerate() {
            let Content::Disk { image, overlay, .. } = &f.content else {
                continue;
            };
            let Some(copy) = record.disks.iter().find(|c| c.file == f.name) else {
                undo(&made);
                return Err(RelocateError::State {
                    path: path.display().to_string(),
                    what: format!("the record has no disk {} (file {d} of the mount)", f.name),
                });
            };
            let Some(dir) = &dest else {
                continue;
            };
            let p = record.dest.join(&f.name);
            let file = if create {
                dir.create_new(&f.name)
                    .and_then(|file| file.set_len(image.size()).map(|()| file))
            } else if record.phase == Phase::Copying && copy.copied == 0 {
                // Nothing of it is recorded as copied (a retry, or a crash right after the
                // record was made): the file is made if it is missing.
                dir.open_or_create(&f.name).and_then(|(file, new)| {
                    new_names |= new;
                    file.set_len(image.size()).map(|()| file)
                })
            } else {
                dir.open(&f.name)
            };
            let file = match file {
                Ok(file) => file,
                Err(e) => {
                    undo(&made);
                    return Err(dest_err(&p, e));
                }
            };
            if create {
                made.push(f.name.clone());
                new_names = true;
            }
            let mirror = Arc::new(Mirror::new(&p, file, image.size(), copy.copied));
            jobs.push(Job {
                file: f.name.clone(),
                image: image.clone(),
                overlay: overlay.clone(),
                mirror,
            });
        }
        // A checkpoint syncs the copy's data and then records its frontier: its name must be
        // durable before that.
        if let (true, Some(dir)) = (new_names, &dest) {
            if let Err(e) = dir.sync() {
                undo(&made);
                return Err(dest_err(&record.dest, e));
            }
        }
        let r = Arc::new(Relocator {
            record: Mutex::new(record),
            dest,
            roots: roots.clone(),
            applying: tokio::sync::Mutex::new(()),
            path,
            mount,
            jobs,
            config,
            start,
            wake: tokio::sync::Notify::new(),
            meter: Mutex::new(VecDeque::new()),
            fetched: AtomicU64::new(0),
            verified: AtomicU64::new(0),
            outcome: Mutex::new(None),
            running: AtomicBool::new(false),
            kicked: AtomicBool::new(false),
        });
        if matches!(r.phase(), Phase::Copying | Phase::Synced | Phase::Finishing) {
            r.attach();
        }
        Ok(r)
    }

    pub fn mount(&self) -> &Arc<LiveMount> {
        &self.mount
    }

    pub fn record(&self) -> Relocation {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn phase(&self) -> Phase {
        self.record.lock().unwrap_or_else(|p| p.into_inner()).phase
    }

    /// Applies an event: persisted (or the record removed) before it takes effect here.
    pub async fn apply(&self, event: Event) -> Result<Next, RelocateError> {
        let _serial = self.applying.lock().await;
        let next = self.record().apply(event)?;
        let path = self.path.clone();
        let write = next.clone();
        tokio::task::spawn_blocking(move || match &write {
            Next::Keep(r) => persist(&path, r),
            Next::Gone => remove_record(&path),
        })
        .await
        .map_err(|e| RelocateError::State {
            path: self.path.display().to_string(),
            what: e.to_string(),
        })??;
        if let Next::Keep(r) = &next {
            *self.record.lock().unwrap_or_else(|p| p.into_inner()) = r.clone();
        }
        self.wake.notify_one();
        Ok(next)
    }

    /// Wakes the task (after the agent applied an event).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Sends the VM's writes to the copies, from each disk's recorded frontier.
    fn attach(&self) {
        let r = self.record();
        for job in &self.jobs {
            let copied = r
                .disks
                .iter()
                .find(|d| d.file == job.file)
                .map_or(0, |d| d.copied);
            job.mirror.reset(copied);
            if let Some(o) = &job.overlay {
                o.attach_mirror(job.mirror.clone());
            }
        }
    }

    /// Stops sending writes to the copies (and lifts a fence: the VM may write again).
    pub async fn detach(&self) {
        for job in &self.jobs {
            job.mirror.unfence();
            if let Some(o) = &job.overlay {
                o.detach_mirror().await;
            }
        }
    }

    /// How long ago the VM last wrote to any of its disks (none since the relocation's mirrors
    /// were made: `None`).
    pub fn since_last_write(&self) -> Option<Duration> {
        self.jobs
            .iter()
            .filter_map(|j| j.mirror.since_last_write())
            .min()
    }

    pub fn status(&self) -> RelocationStatus {
        let r = self.record();
        let copied: u64 = match r.phase {
            Phase::Copying | Phase::Synced | Phase::Finishing => {
                self.jobs.iter().map(|j| j.mirror.frontier()).sum()
            }
            _ => r.copied(),
        };
        let total = r.total();
        let bps = {
            let mut m = self.meter.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            m.push_back((now, copied));
            while m.len() > 2 && now.duration_since(m[0].0) > Duration::from_secs(10) {
                m.pop_front();
            }
            let (t0, c0) = m[0];
            let dt = now.duration_since(t0).as_secs_f64();
            if dt > 0.2 {
                copied.saturating_sub(c0) as f64 / dt
            } else {
                0.0
            }
        };
        let eta = (r.phase == Phase::Copying && bps > 0.0)
            .then(|| total.saturating_sub(copied) as f64 / bps);
        RelocationStatus {
            mount: r.mount.clone(),
            dest: r.dest.clone(),
            phase: r.phase,
            copied,
            total,
            bytes_per_second: bps,
            fetched: self.fetched.load(Ordering::Relaxed),
            eta_seconds: eta,
            rate_limit: r.rate,
            verified: self.verified.load(Ordering::Relaxed),
            error: r.error.clone(),
            started: r.started,
            config: self
                .outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            start: if r.phase == Phase::Done {
                self.start.clone()
            } else {
                Vec::new()
            },
        }
    }

    /// Makes sure a task carries the relocation on after an event: wakes the one that runs, or
    /// starts one (a failed relocation, or a cleanup that failed, has none).
    pub fn drive(self: &Arc<Self>, agent: &Arc<Agent>) {
        self.kicked.store(true, Ordering::SeqCst);
        if self.running.swap(true, Ordering::SeqCst) {
            self.wake.notify_one();
            return;
        }
        agent.spawn_task(self.clone().run(agent.clone()));
    }

    /// The relocation's task (one at a time, started by [`Relocator::drive`]).
    async fn run(self: Arc<Self>, agent: Arc<Agent>) {
        loop {
            self.steps(&agent).await;
            self.running.store(false, Ordering::SeqCst);
            // An event applied after the last look at the phase found this task running and
            // started none: look again.
            if !self.kicked.load(Ordering::SeqCst) || self.running.swap(true, Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Carries the relocation through its phases until it is over or waits for the operator.
    async fn steps(&self, agent: &Arc<Agent>) {
        loop {
            self.kicked.store(false, Ordering::SeqCst);
            let step = match self.phase() {
                Phase::Copying => self.copy(agent.cache()).await,
                Phase::Synced => self.follow().await,
                // A retry or a cancel starts a new task.
                Phase::Failed => return,
                Phase::Finishing => self.finish(agent).await,
                Phase::Done => {
                    if let Err(e) = agent.retire(self).await {
                        tracing::error!(mount = %self.mount.spec.name, error = %e, "relocated mount not retired; it is retried at the next start");
                    }
                    return;
                }
                Phase::Cancelling => {
                    if self.clean_up().await {
                        agent.forget_relocation(&self.mount.spec.name);
                    }
                    return;
                }
            };
            if let Err(why) = step {
                self.fail(why).await;
            }
        }
    }

    /// Records the failure, then lets the VM's writes go to its overlay alone (in that order:
    /// a record still saying "copying" must not outlive a mirror that missed writes).
    async fn fail(&self, why: String) {
        tracing::error!(mount = %self.mount.spec.name, error = %why, "relocation failed");
        if let Err(e) = self.apply(Event::Fail(why.clone())).await {
            tracing::error!(mount = %self.mount.spec.name, error = %e, "relocation failure not recorded; a restart resumes the copy and its verify catches what was missed");
            // Failed here at least, so the task stops instead of failing again and again.
            let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
            if let Ok(Next::Keep(failed)) = r.apply(Event::Fail(why)) {
                *r = failed;
            }
        }
        self.detach().await;
    }

    /// Synced: the copy follows the VM's writes; wait for the operator, watching the mirrors.
    async fn follow(&self) -> Result<(), String> {
        tokio::select! {
            () = self.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match self.jobs.iter().find_map(|j| j.mirror.failure()) {
            Some(f) if self.phase() == Phase::Synced => Err(f),
            _ => Ok(()),
        }
    }

    /// Copies every disk from its frontier to its end, checkpointing as it goes. Returns early
    /// (Ok) when the phase leaves Copying and Finishing.
    async fn copy(&self, cache: &Arc<ChunkCache>) -> Result<(), String> {
        let record = self.record();
        let class = if record.unprioritized {
            FetchClass::Vm
        } else {
            FetchClass::Background
        };
        let sched = cache.scheduler().clone();
        let run_start = Instant::now();
        let mut issued: u64 = 0;
        for (d, job) in self.jobs.iter().enumerate() {
            let cs = job.image.chunk_size().as_u64();
            let size = job.mirror.size();
            let blocks = job.image.block_count();
            let mut next = job.mirror.frontier() / cs;
            let mut inflight: VecDeque<tokio::task::JoinHandle<_>> = VecDeque::new();
            let mut width = 2usize;
            let mut backoff = Duration::ZERO;
            let mut checkpoint = Instant::now();
            loop {
                let phase = self.phase();
                if !matches!(phase, Phase::Copying | Phase::Finishing) {
                    return Ok(());
                }
                if let Some(f) = job.mirror.failure() {
                    return Err(f);
                }
                while inflight.len() < width && next < blocks {
                    let b = next;
                    next += 1;
                    let off = b * cs;
                    let len = cs.min(size - off);
                    let id: Option<ChunkId> = job.image.chunk_of_block(b);
                    if let (Some(rate), Some(_)) = (record.rate, id) {
                        // --rate: the fetch may start once the bytes before it fit the rate.
                        let due = run_start + Duration::from_secs_f64(issued as f64 / rate as f64);
                        if !self.pace(due).await {
                            return Ok(());
                        }
                    }
                    if id.is_some() {
                        issued += len;
                    }
                    let cache = cache.clone();
                    inflight.push_back(tokio::spawn(async move {
                        let base = match id {
                            None => None,
                            Some(id) => Some(cache.read_through(&id, class).await?),
                        };
                        Ok::<_, crate::repo::RepoError>((off, len, base))
                    }));
                }
                let Some(task) = inflight.pop_front() else {
                    break;
                };
                let (off, len, base) = task
                    .await
                    .map_err(|e| format!("copy task of {}: {e}", job.file))?
                    .map_err(|e| format!("reading the backup of {}: {e}", job.file))?;
                if let Some(b) = &base {
                    if b.len() as u64 != len {
                        return Err(format!(
                            "{}: the backup's block at {off} has {} bytes, not {len}",
                            job.file,
                            b.len()
                        ));
                    }
                    self.fetched.fetch_add(len, Ordering::Relaxed);
                }
                self.put(job, off, len, base)
                    .await
                    .map_err(|e| format!("copying {} at {off}: {e}", job.file))?;
                if !record.unprioritized && phase == Phase::Copying && sched.vm_active() {
                    // VM reads are active: one extent at a time, with a pause that grows while
                    // they last.
                    width = 1;
                    backoff = (backoff * 2).clamp(BACKOFF.0, BACKOFF.1);
                    tokio::time::sleep(backoff).await;
                } else {
                    width = (width + 1).min(MAX_WIDTH);
                    backoff = Duration::ZERO;
                }
                if checkpoint.elapsed() >= CHECKPOINT_EVERY {
                    self.checkpoint(d, job).await?;
                    checkpoint = Instant::now();
                }
            }
            self.checkpoint(d, job).await?;
        }
        Ok(())
    }

    /// Waits until `due`, looking at the phase now and then. False: the copy is to stop
    /// (cancelled or failed meanwhile).
    async fn pace(&self, due: Instant) -> bool {
        loop {
            if !matches!(self.phase(), Phase::Copying | Phase::Finishing) {
                return false;
            }
            let now = Instant::now();
            if now >= due {
                return true;
            }
            tokio::time::sleep((due - now).min(Duration::from_millis(250))).await;
        }
    }

    async fn put(&self, job: &Job, off: u64, len: u64, base: Option<Bytes>) -> Result<(), String> {
        match &job.overlay {
            Some(o) => o
                .copy_to_mirror(&job.mirror, off, len, base)
                .await
                .map_err(|e| e.to_string()),
            None => {
                let m = job.mirror.clone();
                tokio::task::spawn_blocking(move || match base {
                    Some(b) => m.put(off, &b),
                    None => m.put_hole(off, len),
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
        }
    }

    /// Syncs a disk's copy and records its frontier as it was before the sync.
    async fn checkpoint(&self, d: usize, job: &Job) -> Result<(), String> {
        let upto = job.mirror.frontier();
        let m = job.mirror.clone();
        tokio::task::spawn_blocking(move || m.sync())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("syncing {}: {e}", job.mirror.path().display()))?;
        if let Some(f) = job.mirror.failure() {
            // A VM write below `upto` may have missed the copy: `upto` is not true.
            return Err(f);
        }
        let disk = self
            .record()
            .disks
            .iter()
            .position(|c| c.file == job.file)
            .unwrap_or(d);
        match self.apply(Event::Copied { disk, upto }).await {
            Ok(_) => Ok(()),
            // Cancelled meanwhile: the copy stops at the next extent.
            Err(RelocateError::Refused(r)) if r.phase == Phase::Cancelling => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The handover: fence the VM's writes, copy the rest, verify, write the config.
    async fn finish(&self, agent: &Arc<Agent>) -> Result<(), String> {
        for job in &self.jobs {
            job.mirror.fence();
            if let Some(o) = &job.overlay {
                o.quiesce().await;
                o.commit().await.map_err(|e| e.to_string())?;
            }
        }
        self.copy(agent.cache()).await?;
        if self.phase() != Phase::Finishing {
            return Ok(()); // cancelled meanwhile
        }
        if let Some(f) = self.jobs.iter().find_map(|j| j.mirror.failure()) {
            return Err(f);
        }
        self.verify(agent.cache()).await?;
        if self.phase() != Phase::Finishing {
            return Ok(()); // cancelled meanwhile
        }
        let config = self.write_other_files().await?;
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(config);
        match self.apply(Event::Verified).await {
            Ok(_) => Ok(()),
            Err(RelocateError::Refused(r)) if r.phase == Phase::Cancelling => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Checks every extent of every copy against the mount's view: an extent the VM never
    /// wrote must hash to its chunk's digest (or be zeros), so only extents the VM wrote need
    /// the backup's bytes.
    async fn verify(&self, cache: &Arc<ChunkCache>) -> Result<(), String> {
        self.verified.store(0, Ordering::Relaxed);
        for job in &self.jobs {
            let cs = job.image.chunk_size().as_u64();
            let size = job.mirror.size();
            for b in 0..job.image.block_count() {
                if self.phase() != Phase::Finishing {
                    return Ok(());
                }
                let off = b * cs;
                let len = cs.min(size - off);
                let id = job.image.chunk_of_block(b);
                let written = job.overlay.as_ref().is_some_and(|o| o.written_in(off, len));
                let m = job.mirror.clone();
                let copy = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    m.read_at(&mut buf, off).map(|()| buf)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("reading {}: {e}", job.mirror.path().display()))?;
                let same = match (written, id) {
                    (false, None) => copy.iter().all(|x| *x == 0),
                    (false, Some(id)) => ChunkId::of(&copy) == id,
                    (true, id) => {
                        let base = match id {
                            None => Bytes::from(vec![0u8; len as usize]),
                            Some(id) => cache
                                .read_through(&id, FetchClass::Background)
                                .await
                                .map_err(|e| format!("reading the backup of {}: {e}", job.file))?,
                        };
                        let view = job
                            .overlay
                            .as_ref()
                            .expect("written implies an overlay")
                            .compose(off, base)
                            .await
                            .map_err(|e| e.to_string())?;
                        view[..] == copy[..]
                    }
                };
                if !same {
                    return Err(format!(
                        "verify: {} differs from the mount's view in the block at offset {off}",
                        job.mirror.path().display()
                    ));
                }
                self.verified.fetch_add(len, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Writes the descriptors, the config and the mount folder's small files into the
    /// destination (at the start, so the copy is a VM folder from the outset, and again at the
    /// handover), through its folder handle. A folder file whose name is not a plain name is
    /// left out, with a warning. Returns the config's path.
    pub(crate) async fn write_other_files(&self) -> Result<PathBuf, String> {
        let shown = self.record().dest;
        let Some(dest) = self.dest.clone() else {
            return Err(format!(
                "writing into {}: the destination is not open (the relocation is {})",
                shown.display(),
                self.phase()
            ));
        };
        let mut out: Vec<(String, Bytes)> = Vec::new();
        for f in &self.mount.files {
            if let Content::Bytes(b) = &f.content {
                out.push((f.name.clone(), b.clone()));
            }
        }
        let config_name = match &self.config {
            FinalConfig::Fixed { name, bytes } => {
                out.retain(|(n, _)| n != name);
                out.push((name.clone(), bytes.clone()));
                name.clone()
            }
            FinalConfig::FromMount { name } => name.clone(),
        };
        if let Some(folder) = &self.mount.folder {
            for (id, e) in folder.list(0) {
                let skip = e.kind != crate::mount::files::Kind::File
                    || e.size > MAX_FOLDER_FILE
                    || out.iter().any(|(n, _)| *n == e.name)
                    || self.jobs.iter().any(|j| j.file == e.name)
                    || [".log", ".vswp", ".lck"]
                        .iter()
                        .any(|s| e.name.ends_with(s));
                if skip {
                    continue;
                }
                if !dest::plain_name(&e.name) {
                    // Names come from the VM's client; only plain names go into the folder.
                    tracing::warn!(mount = %self.mount.spec.name, name = ?e.name, "a file of the mount's folder is not carried over: its name is not a plain file name");
                    continue;
                }
                let (bytes, _) = folder
                    .read(id, 0, e.size as u32)
                    .await
                    .map_err(|err| format!("reading {} of the mount: {err}", e.name))?;
                out.push((e.name.clone(), bytes));
            }
        }
        let config = shown.join(&config_name);
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            for (name, bytes) in out {
                dest.replace(&name, &bytes)
                    .map_err(|e| format!("writing {name:?} into {}: {e}", dest.path().display()))?;
            }
            dest.sync()
                .map_err(|e| format!("syncing {}: {e}", dest.path().display()))
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok(config)
    }

    /// Cancelling: the mount runs on as it was; the partial copy goes. True once it is gone.
    async fn clean_up(&self) -> bool {
        self.detach().await;
        let r = self.record();
        let mut names = planned_files(&self.mount, &self.config);
        // The folder's small files that `write_other_files` carried over (the destination was
        // new or empty at the start: a file of one of these names in it is ours).
        if let Some(folder) = &self.mount.folder {
            for (_, e) in folder.list(0) {
                if e.kind == crate::mount::files::Kind::File && !names.contains(&e.name) {
                    names.push(e.name);
                }
            }
        }
        // No other name was made there (and none other may be removed there).
        names.retain(|n| dest::plain_name(n));
        let (held, roots, path) = (self.dest.clone(), self.roots.clone(), r.dest.clone());
        let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
            // Not held (resumed after a restart, or failed before): through the roots again.
            let dest = match held {
                Some(d) => d,
                None => match roots.open(&path, false) {
                    Ok(d) => Arc::new(d),
                    // Gone already: nothing to remove.
                    Err(DestError::Missing { .. }) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                },
            };
            for name in names {
                dest.remove(&name).map_err(|e| format!("{name:?}: {e}"))?;
            }
            // What an interrupted `write_other_files` left.
            dest.remove_tmp_files().map_err(|e| e.to_string())?;
            // The folder goes too if nothing else is in it.
            let _ = dest.remove_if_empty();
            Ok(())
        })
        .await;
        let why = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(e.to_string()),
        };
        let event = match &why {
            None => Event::CleanedUp,
            Some(why) => {
                tracing::error!(mount = %r.mount, error = %why, "the partial copy was not removed; retried at the next start");
                Event::Fail(format!(
                    "removing the partial copy in {}: {why}",
                    r.dest.display()
                ))
            }
        };
        if let Err(e) = self.apply(event).await {
            tracing::error!(mount = %r.mount, error = %e, "relocation cleanup not recorded");
            return false;
        }
        if why.is_none() {
            tracing::info!(mount = %r.mount, dest = %r.dest.display(), "relocation cancelled");
        }
        why.is_none()
    }
}
