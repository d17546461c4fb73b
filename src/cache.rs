//! The block read cache: decoded chunks kept in memory, shared by every mount.
//!
//! Owns: two moka caches keyed by chunk digest (so a chunk shared by several disks, snapshots or
//! mounts is cached once), weighted by bytes and together bounded by `--cache-size`:
//! - the main cache (moka's TinyLFU admission: a disk copied end to end does not flush the
//!   blocks running VMs read again and again) holds what VM reads and read-ahead fetched;
//! - the staging area (a quarter of the size, plain LRU, which admits everything) holds
//!   guesses: chunks pre-staged or read ahead that no VM has read yet. A VM's read of one adds
//!   it to the main cache too. A guess can evict only other guesses, never a block a running VM
//!   uses, and the main cache's admission cannot turn one away before the VM that it was
//!   fetched for reads it (which would cost that chunk a second fetch; decision 0021).
//!
//! Also owns single-flight fills: one repository fetch per missed chunk however many readers
//! wait for it, and the fetch runs as its own task (a reader that goes away does not cancel it).
//! Every fetch waits for a slot of the [`FetchScheduler`] in the class of the most urgent of
//! its readers: a VM read that needs a chunk a pre-stager asked for raises that fetch's class.
//! With a disk tier ([`disk::DiskCache`], `serve --cache-dir`), a fill looks on disk before it
//! takes a scheduler slot: a sound entry there is a hit that costs no repository fetch; a chunk
//! fetched from the repository is also written to disk, in the background.
//! Must not: cache errors (a failed fetch is retried by the next reader), or know about NFS.

pub mod disk;
pub mod outage;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};

use self::disk::{DiskCache, DiskCacheStats};
use self::outage::{StoreHealth, StoreState};
use crate::fetch::{Demand, FetchClass, FetchScheduler, Requester, SchedulerStats};
use crate::repo::{ChunkId, ChunkReader, RepoError};

/// Counters of a cache, as `/metrics` and `livemount status` show them.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub hits: u64,
    /// Repository fetches started (one per missed chunk, however many readers waited for it).
    pub misses: u64,
    /// Repository fetches that failed (digest mismatch, missing chunk, I/O).
    pub fetch_errors: u64,
    /// Reads that found their chunk's fetch under way and waited for it rather than fetch
    /// it again: fetches are shared by digest, across mounts and snapshots.
    #[serde(default)]
    pub joined: u64,
    /// Bytes in the cache now, staging area included (approximately: moka applies evictions
    /// lazily).
    pub bytes: u64,
    pub capacity: u64,
    /// Chunks fetched by pre-staging into the staging area.
    #[serde(default)]
    pub staged: u64,
    /// VM reads served from the staging area.
    #[serde(default)]
    pub staged_hits: u64,
    /// The disk tier, when there is one.
    #[serde(default)]
    pub disk: Option<DiskCacheStats>,
}

/// A fill's chunk, and whether it came from the disk tier (no repository fetch).
type Fill = Shared<BoxFuture<'static, Result<(Bytes, bool), Arc<RepoError>>>>;

/// A fetch under way: who wants it most, who waits for it (uses or only guesses) and how long
/// it may be held through an outage, and its result to come.
struct Pending {
    demand: Arc<Demand>,
    state: Arc<FillState>,
    fill: Fill,
}

/// Why a chunk is read: for use (a VM's read, a guest file's), or as a guess at what a VM reads
/// next (pre-staging, read-ahead), which goes to the staging area until a use comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    Use,
    Guess,
}

/// A read-through chunk cache in front of a [`ChunkReader`].
pub struct ChunkCache {
    inner: Arc<Inner>,
}

struct Inner {
    main: moka::sync::Cache<ChunkId, Bytes>,
    staging: moka::sync::Cache<ChunkId, Bytes>,
    pending: Mutex<HashMap<ChunkId, Pending>>,
    source: Arc<dyn ChunkReader>,
    sched: Arc<FetchScheduler>,
    disk: OnceLock<Arc<DiskCache>>,
    capacity: u64,
    staging_capacity: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Reads that joined a fetch under way.
    joined: AtomicU64,
    errors: AtomicU64,
    staged: AtomicU64,
    staged_hits: AtomicU64,
    health: StoreHealth,
    /// What fills' deadlines are counted from.
    epoch: tokio::time::Instant,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("capacity", &self.inner.capacity)
            .finish_non_exhaustive()
    }
}

/// Repository fetches at once, and how many of them only VM reads may use. 32: enough GETs in
/// flight to fill an object store's bandwidth when each takes tens of milliseconds (decision
/// 0012); on a local directory they cost nothing while idle.
pub const FETCH_SLOTS: usize = 32;
pub const VM_RESERVED_SLOTS: usize = 4;

impl ChunkCache {
    /// A cache of at most `capacity_bytes` of decoded chunks over `source`, fetching through a
    /// scheduler of [`FETCH_SLOTS`] slots.
    pub fn new(source: Arc<dyn ChunkReader>, capacity_bytes: u64) -> Self {
        Self::with_scheduler(
            source,
            capacity_bytes,
            FetchScheduler::new(FETCH_SLOTS, VM_RESERVED_SLOTS),
        )
    }

    pub fn with_scheduler(
        source: Arc<dyn ChunkReader>,
        capacity_bytes: u64,
        sched: Arc<FetchScheduler>,
    ) -> Self {
        let staging_capacity = capacity_bytes / 4;
        let weigher = |_: &ChunkId, v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX);
        let main = moka::sync::Cache::builder()
            .max_capacity(capacity_bytes - staging_capacity)
            .weigher(weigher)
            .build();
        let staging = moka::sync::Cache::builder()
            .max_capacity(staging_capacity)
            .weigher(weigher)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        ChunkCache {
            inner: Arc::new(Inner {
                main,
                staging,
                pending: Mutex::new(HashMap::new()),
                source,
                sched,
                disk: OnceLock::new(),
                capacity: capacity_bytes,
                staging_capacity,
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                joined: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                staged: AtomicU64::new(0),
                staged_hits: AtomicU64::new(0),
                health: StoreHealth::default(),
                epoch: tokio::time::Instant::now(),
            }),
        }
    }

    pub fn stats(&self) -> CacheStats {
        let i = &self.inner;
        CacheStats {
            hits: i.hits.load(Relaxed),
            misses: i.misses.load(Relaxed),
            joined: i.joined.load(Relaxed),
            fetch_errors: i.errors.load(Relaxed),
            bytes: i.main.weighted_size() + i.staging.weighted_size(),
            capacity: i.capacity,
            staged: i.staged.load(Relaxed),
            staged_hits: i.staged_hits.load(Relaxed),
            disk: i.disk.get().map(|d| d.stats()),
        }
    }

    /// Puts a disk tier behind the memory cache (once, before the cache is used).
    pub fn set_disk(&self, disk: Arc<DiskCache>) {
        let _ = self.inner.disk.set(disk);
    }

    pub fn disk(&self) -> Option<&Arc<DiskCache>> {
        self.inner.disk.get()
    }

    pub fn scheduler(&self) -> &Arc<FetchScheduler> {
        &self.inner.sched
    }

    pub fn scheduler_stats(&self) -> SchedulerStats {
        self.inner.sched.stats()
    }

    /// Bytes the staging area holds at most: a pre-stager stages no more than this at once.
    pub fn staging_capacity(&self) -> u64 {
        self.inner.staging_capacity
    }

    /// Whether a chunk is cached now (in either part).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.inner.main.contains_key(id) || self.inner.staging.contains_key(id)
    }

    /// Brings a chunk into the staging area ahead of a VM's read of it, in the pre-staging
    /// class with its pre-stager's `rank` ([`crate::fetch::Demand::ranked`]). Returns false
    /// (and fetches nothing) if it is cached already.
    pub async fn stage(&self, id: &ChunkId, rank: u64) -> Result<bool, RepoError> {
        if self.contains(id) {
            return Ok(false);
        }
        self.read_demand(
            id,
            Demand::ranked(FetchClass::Prestage, rank),
            Intent::Guess,
        )
        .await
        .map(|_| true)
    }
}

impl ChunkCache {
    /// Puts a chunk into the disk tier ahead of any mount (`livemount prestage`), in the
    /// pre-staging class, without keeping it in memory. Returns false (and fetches nothing) if
    /// the disk tier has it, or if memory has it (then it is written from there). Needs a disk
    /// tier. `rank`: its pre-stager's ([`crate::fetch::Demand::ranked`]).
    pub async fn warm_disk(&self, id: &ChunkId, rank: u64) -> Result<bool, RepoError> {
        let i = &self.inner;
        let Some(disk) = i.disk.get().cloned() else {
            return Err(RepoError::Invalid(
                "there is no disk cache to warm (serve --cache-dir)".into(),
            ));
        };
        if disk.contains(id) {
            return Ok(false);
        }
        let bytes = match i.main.get(id).or_else(|| i.staging.get(id)) {
            Some(b) => (b, false),
            None => {
                let fill = i
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(id)
                    .map(|p| p.fill.clone());
                match fill {
                    // A fill under way writes to disk itself.
                    Some(f) => {
                        i.joined.fetch_add(1, Relaxed);
                        return f.await.map(|_| false).map_err(|e| shared_error(id, &e));
                    }
                    None => {
                        let _slot = i
                            .sched
                            .slot(Demand::ranked(FetchClass::Prestage, rank))
                            .await;
                        i.misses.fetch_add(1, Relaxed);
                        // A guess, not held through an outage; the store's state is told.
                        match i.told(id, i.source.read_chunk(id).await) {
                            Ok(b) => (b, true),
                            Err(e) => {
                                i.errors.fetch_add(1, Relaxed);
                                return Err(e);
                            }
                        }
                    }
                }
            }
        };
        // Written here and now (not through the bounded background queue): a warm-up must
        // leave every chunk on disk.
        let (b, fetched) = bytes;
        let id = *id;
        tokio::task::spawn_blocking(move || disk.put_blocking(id, &b))
            .await
            .map_err(|e| RepoError::Task(e.to_string()))?;
        Ok(fetched)
    }

    /// Reads a chunk for bulk work that must not displace the VMs' blocks (a relocation's
    /// copy): from the cache if it is there, sharing a fill under way, else fetched through
    /// the scheduler in `class` and not kept. Counts neither a hit nor a miss. Rides through
    /// an outage of the store as a VM's read does: tried again with back-off (its slot given
    /// back meanwhile) for up to the grace from its start.
    pub async fn read_through(&self, id: &ChunkId, class: FetchClass) -> Result<Bytes, RepoError> {
        let i = &self.inner;
        if let Some(b) = i.main.get(id).or_else(|| i.staging.get(id)) {
            return Ok(b);
        }
        let fill = i
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|p| p.fill.clone());
        if let Some(fill) = fill {
            i.joined.fetch_add(1, Relaxed);
            return fill.await.map(|(b, _)| b).map_err(|e| shared_error(id, &e));
        }
        if let Some(b) = match i.disk.get() {
            Some(d) => d.get(id).await,
            None => None,
        } {
            return Ok(b);
        }
        let until = tokio::time::Instant::now() + i.health.grace();
        let mut attempts = 0;
        loop {
            let slot = i.sched.slot(Demand::new(class)).await;
            let result = i.told(id, i.source.read_chunk(id).await);
            drop(slot);
            match result {
                Err(e) if e.is_outage() && tokio::time::Instant::now() < until => {
                    attempts += 1;
                    let left = until.saturating_duration_since(tokio::time::Instant::now());
                    tokio::time::sleep(outage::backoff(attempts).min(left)).await;
                }
                r => return r,
            }
        }
    }
}

/// Whether a lookup was served from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Hit,
    /// The chunk was fetched for this lookup, or this lookup waited for another one's fetch.
    Miss,
}

impl ChunkCache {
    /// Reads a chunk on behalf of `class` and says whether the cache had it.
    pub async fn read_traced(
        &self,
        id: &ChunkId,
        class: FetchClass,
    ) -> Result<(Bytes, Access), RepoError> {
        self.read_for(id, class, Requester::ANYONE).await
    }

    /// The same for `requester`: a fetch this read starts is held back only by the VM reads
    /// of other requesters (see [`crate::fetch`]).
    pub async fn read_for(
        &self,
        id: &ChunkId,
        class: FetchClass,
        requester: Requester,
    ) -> Result<(Bytes, Access), RepoError> {
        self.read_intent(id, class, requester, Intent::Use).await
    }

    /// Reads a chunk for `intent`: a guess that misses is fetched into the staging area (unless
    /// a use joins its fetch), a use that finds a chunk there adds it to the main cache.
    pub async fn read_intent(
        &self,
        id: &ChunkId,
        class: FetchClass,
        requester: Requester,
        intent: Intent,
    ) -> Result<(Bytes, Access), RepoError> {
        self.read_demand(id, Demand::on_behalf_of(class, requester), intent)
            .await
    }

    /// [`Self::read_intent`] for a fetch of `demand` (its class, requester and rank).
    async fn read_demand(
        &self,
        id: &ChunkId,
        demand: Arc<Demand>,
        intent: Intent,
    ) -> Result<(Bytes, Access), RepoError> {
        let class = demand.class();
        let i = &self.inner;
        if let Some(b) = i.main.get(id) {
            i.hits.fetch_add(1, Relaxed);
            return Ok((b, Access::Hit));
        }
        if let Some(b) = i.staging.get(id) {
            i.hits.fetch_add(1, Relaxed);
            if intent == Intent::Use {
                // A VM has started using it: it belongs with the VMs' blocks now. It stays in
                // the staging area too (the bytes are shared) until that area needs the room.
                i.staged_hits.fetch_add(1, Relaxed);
                i.main.insert(*id, b.clone());
            }
            return Ok((b, Access::Hit));
        }
        let (fill, state) = {
            let mut pending = i.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get(id) {
                Some(p) => {
                    i.joined.fetch_add(1, Relaxed);
                    if p.demand.raise(class) {
                        i.sched.reconsider();
                    }
                    if intent == Intent::Use {
                        p.state.join_use(i.deadline_after_grace());
                    }
                    (p.fill.clone(), p.state.clone())
                }
                None => {
                    // A fill may have finished between the lookups above and taking the lock;
                    // fills publish to the cache before they leave `pending`.
                    if let Some(b) = i.main.get(id).or_else(|| i.staging.get(id)) {
                        i.hits.fetch_add(1, Relaxed);
                        return Ok((b, Access::Hit));
                    }
                    let state = Arc::new(FillState::default());
                    if intent == Intent::Use {
                        state.join_use(i.deadline_after_grace());
                    }
                    let fill = spawn_fill(i.clone(), *id, demand.clone(), state.clone());
                    pending.insert(
                        *id,
                        Pending {
                            demand,
                            state: state.clone(),
                            fill: fill.clone(),
                        },
                    );
                    (fill, state)
                }
            }
        };
        let waiting = (intent == Intent::Use).then(|| Waiting::new(&state));
        let result = match intent {
            Intent::Guess => fill.await,
            // A use waits for a fill held through an outage until its own grace ends, however
            // long later uses keep the fill trying.
            Intent::Use => {
                let until = tokio::time::Instant::now() + i.health.grace();
                match tokio::time::timeout_at(until, fill.clone()).await {
                    Ok(r) => r,
                    Err(_) => match state.outage_error() {
                        Some(e) => Err(e),
                        // Slow, not held: a fetch that takes long is waited for.
                        None => fill.await,
                    },
                }
            }
        };
        if let Some(w) = waiting {
            if state.held.load(Relaxed) {
                i.health.on_held_read(w.since.elapsed(), result.is_ok());
            }
        }
        result
            .map(|(b, from_disk)| (b, if from_disk { Access::Hit } else { Access::Miss }))
            .map_err(|e| shared_error(id, &e))
    }

    /// The store's state as the fills found it, with the reads held now.
    pub fn store_state(&self) -> StoreState {
        let i = &self.inner;
        let (mut held, mut longest) = (0, Duration::ZERO);
        for p in i.pending.lock().unwrap_or_else(|p| p.into_inner()).values() {
            if let Some(since) = p.state.held_since(i.epoch) {
                held += p.state.waiting.load(Relaxed) as u64;
                longest = longest.max(since.elapsed());
            }
        }
        i.health.state(held, longest)
    }

    /// The store's health: its grace and the held reads' histogram.
    pub fn health(&self) -> &StoreHealth {
        &self.inner.health
    }
}

/// What a fill's readers tell it, and what it tells them.
#[derive(Debug, Default)]
struct FillState {
    /// Whether a use (not only guesses) waits for it.
    used: AtomicBool,
    /// Until when (nanoseconds after the cache's `epoch`) it is held through an outage: the
    /// grace after the last use that joined it. Zero: not at all (guesses only).
    deadline: AtomicU64,
    /// Whether an attempt failed because the store was away, and since when (nanoseconds
    /// after the epoch, plus one).
    held: AtomicBool,
    held_at: AtomicU64,
    /// Uses waiting for it now.
    waiting: AtomicUsize,
    /// The last failure of a held attempt.
    last_outage: Mutex<Option<Arc<RepoError>>>,
}

impl FillState {
    /// A use joins (under the `pending` lock, like the fill's decision to give up).
    fn join_use(&self, deadline: u64) {
        self.used.store(true, Relaxed);
        self.deadline.fetch_max(deadline, Relaxed);
    }

    /// The error a use gets when its grace ends while this fill is still held.
    fn outage_error(&self) -> Option<Arc<RepoError>> {
        if !self.held.load(Relaxed) {
            return None;
        }
        self.last_outage
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn held_since(&self, epoch: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let at = self.held_at.load(Relaxed);
        (at != 0).then(|| epoch + Duration::from_nanos(at - 1))
    }
}

/// A use waiting for a fill, counted while it waits (also when its reader goes away).
struct Waiting {
    state: Arc<FillState>,
    since: tokio::time::Instant,
}

impl Waiting {
    fn new(state: &Arc<FillState>) -> Waiting {
        state.waiting.fetch_add(1, Relaxed);
        Waiting {
            state: state.clone(),
            since: tokio::time::Instant::now(),
        }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.state.waiting.fetch_sub(1, Relaxed);
    }
}

impl Inner {
    /// Nanoseconds since the cache was made: what deadlines are counted in.
    fn nanos_since_epoch(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The deadline of a use joining now.
    fn deadline_after_grace(&self) -> u64 {
        let grace = u64::try_from(self.health.grace().as_nanos()).unwrap_or(u64::MAX);
        self.nanos_since_epoch().saturating_add(grace).max(1)
    }

    /// Tells the store's state what a fetch found (and starts the probe when an outage
    /// begins); passes the result on.
    fn told(
        self: &Arc<Self>,
        id: &ChunkId,
        result: Result<Bytes, RepoError>,
    ) -> Result<Bytes, RepoError> {
        match &result {
            Ok(_) => self.health.on_success(),
            Err(e) if e.is_outage() => {
                if self.health.on_outage(e) {
                    spawn_probe(self, *id);
                }
            }
            Err(_) => {}
        }
        result
    }

    /// Takes a fill out of `pending` if the entry is still its own (a fill that gave up may
    /// have been followed by a new one for the same chunk).
    fn remove_pending(&self, id: &ChunkId, state: &Arc<FillState>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending
            .get(id)
            .is_some_and(|p| Arc::ptr_eq(&p.state, state))
        {
            pending.remove(id);
        }
    }

    /// Fetches a missed chunk through the scheduler. A failure because the store is away is
    /// tried again with back-off, the slot given back while it waits, for as long as a use
    /// waits and its grace lasts (`outage`); the decision to give up is taken under the
    /// `pending` lock, and the fill leaves `pending` with it, so that a use joining later
    /// starts a fill of its own rather than getting this one's error.
    async fn fetch(
        self: &Arc<Self>,
        id: &ChunkId,
        demand: &Arc<Demand>,
        state: &Arc<FillState>,
    ) -> FetchResult {
        self.misses.fetch_add(1, Relaxed);
        let mut attempts = 0;
        loop {
            let slot = self.sched.slot(demand.clone()).await;
            let result = self.source.read_chunk(id).await;
            drop(slot);
            match self.told(id, result) {
                Ok(b) => return FetchResult::Done(Ok(b)),
                Err(e) if e.is_outage() => {
                    let now = self.nanos_since_epoch();
                    {
                        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                        if now >= state.deadline.load(Relaxed) {
                            if pending
                                .get(id)
                                .is_some_and(|p| Arc::ptr_eq(&p.state, state))
                            {
                                pending.remove(id);
                            }
                            return FetchResult::GaveUp(e);
                        }
                    }
                    *state.last_outage.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Arc::new(shared_error(id, &e)));
                    if !state.held.swap(true, Relaxed) {
                        state.held_at.store(now + 1, Relaxed);
                    }
                    attempts += 1;
                    let left =
                        Duration::from_nanos(state.deadline.load(Relaxed).saturating_sub(now));
                    tokio::time::sleep(outage::backoff(attempts).min(left)).await;
                }
                Err(e) => return FetchResult::Done(Err(e)),
            }
        }
    }
}

/// Fetches `id` again every [`outage::PROBE_EVERY`] while the store is away, to see it come
/// back when no read is waiting. Ends with the outage, or with the cache.
fn spawn_probe(i: &Arc<Inner>, id: ChunkId) {
    let cache = Arc::downgrade(i);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(outage::PROBE_EVERY).await;
            let Some(i) = cache.upgrade() else { return };
            if i.health.is_up() {
                return;
            }
            match i.source.read_chunk(&id).await {
                Err(e) if e.is_outage() => {
                    i.health.on_outage(&e);
                }
                // An answer, even a refusal of this chunk, is the store being there.
                _ => i.health.on_success(),
            }
        }
    });
}

/// How a fetch ended: with a chunk or an error to publish, or given up after an outage (out of
/// `pending` already).
enum FetchResult {
    Done(Result<Bytes, RepoError>),
    GaveUp(RepoError),
}

/// Starts the one fill of a missed chunk: from the disk tier if it has a sound entry, else
/// [`Inner::fetch`] (whose chunk also goes to disk); then the memory part its readers say
/// (staging while it is only a guess, main once a use waits for it); then out of `pending`.
fn spawn_fill(i: Arc<Inner>, id: ChunkId, demand: Arc<Demand>, state: Arc<FillState>) -> Fill {
    let after = i.clone();
    let after_state = state.clone();
    let task = tokio::spawn(async move {
        let on_disk = match i.disk.get() {
            Some(d) => d.get(&id).await,
            None => None,
        };
        let from_disk = on_disk.is_some();
        let result = match on_disk {
            Some(b) => Ok(b),
            None => match i.fetch(&id, &demand, &state).await {
                FetchResult::GaveUp(e) => {
                    i.errors.fetch_add(1, Relaxed);
                    return Err(Arc::new(e));
                }
                FetchResult::Done(result) => {
                    if let (Ok(b), Some(d)) = (&result, i.disk.get()) {
                        d.put(id, b.clone());
                    }
                    result
                }
            },
        };
        match &result {
            Ok(b) if !state.used.load(Relaxed) => {
                if demand.class() == FetchClass::Prestage {
                    i.staged.fetch_add(1, Relaxed);
                }
                i.staging.insert(id, b.clone());
            }
            Ok(b) => i.main.insert(id, b.clone()),
            Err(_) => {
                i.errors.fetch_add(1, Relaxed);
            }
        }
        i.remove_pending(&id, &state);
        result.map(|b| (b, from_disk)).map_err(Arc::new)
    });
    async move {
        task.await.unwrap_or_else(|e| {
            // The fill task died before it could leave `pending`: take it out here, or every
            // later reader of this chunk would get this error forever.
            after.remove_pending(&id, &after_state);
            Err(Arc::new(RepoError::Task(format!(
                "fetching chunk {id}: {e}"
            ))))
        })
    }
    .boxed()
    .shared()
}

#[async_trait]
impl ChunkReader for ChunkCache {
    async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        self.read_traced(id, FetchClass::Vm).await.map(|(b, _)| b)
    }
}

/// Every waiter gets the same `Arc` of the fill's error; give each its own copy.
fn shared_error(id: &ChunkId, e: &RepoError) -> RepoError {
    match e {
        RepoError::MissingChunk { chunk } => RepoError::MissingChunk { chunk: *chunk },
        RepoError::CorruptChunk { chunk, what } => RepoError::CorruptChunk {
            chunk: *chunk,
            what: what.clone(),
        },
        RepoError::Unreachable { repo, what } => RepoError::Unreachable {
            repo: repo.clone(),
            what: what.clone(),
        },
        RepoError::Store { repo, what } => RepoError::Store {
            repo: repo.clone(),
            what: what.clone(),
        },
        RepoError::Denied { repo, what } => RepoError::Denied {
            repo: repo.clone(),
            what: what.clone(),
        },
        RepoError::NoBucket { repo, bucket } => RepoError::NoBucket {
            repo: repo.clone(),
            bucket: bucket.clone(),
        },
        other => RepoError::CorruptChunk {
            chunk: *id,
            what: format!("cannot be read: {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// A chunk source that counts fetches, answers slowly, and fails for one chunk.
    struct Counting {
        fetches: AtomicUsize,
        bad: ChunkId,
    }

    #[async_trait]
    impl ChunkReader for Counting {
        async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
            self.fetches.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
            if *id == self.bad {
                return Err(RepoError::CorruptChunk {
                    chunk: *id,
                    what: "test".into(),
                });
            }
            Ok(Bytes::from(id.0.to_vec()))
        }
    }

    #[tokio::test]
    async fn one_fetch_per_missed_chunk_however_many_readers_wait() {
        let src = Arc::new(Counting {
            fetches: AtomicUsize::new(0),
            bad: ChunkId([9; 32]),
        });
        let cache = Arc::new(ChunkCache::new(src.clone(), 1 << 20));
        let id = ChunkId([1; 32]);
        let readers: Vec<_> = (0..32)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.read_chunk(&id).await })
            })
            .collect();
        for r in readers {
            assert_eq!(&r.await.unwrap().unwrap()[..], &[1; 32]);
        }
        assert_eq!(src.fetches.load(Relaxed), 1);
        assert_eq!(cache.stats().misses, 1);
        cache.read_chunk(&id).await.unwrap();
        assert_eq!(cache.stats().hits, 1);
    }

    /// A chunk source of real chunks (bytes that hash to their ids), counting fetches.
    struct Honest {
        chunks: HashMap<ChunkId, Bytes>,
        fetches: AtomicUsize,
    }

    #[async_trait]
    impl ChunkReader for Honest {
        async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
            self.fetches.fetch_add(1, Relaxed);
            self.chunks
                .get(id)
                .cloned()
                .ok_or(RepoError::MissingChunk { chunk: *id })
        }
    }

    #[tokio::test]
    async fn after_a_restart_the_disk_tier_serves_what_was_fetched_without_a_fetch() {
        let t = tempfile::tempdir().unwrap();
        let data: Vec<Bytes> = (0..4u8).map(|n| Bytes::from(vec![n; 4096])).collect();
        let ids: Vec<ChunkId> = data.iter().map(|b| ChunkId::of(b)).collect();
        let src = Arc::new(Honest {
            chunks: ids.iter().copied().zip(data.iter().cloned()).collect(),
            fetches: AtomicUsize::new(0),
        });
        let disk = DiskCache::open(t.path(), 1 << 20).unwrap();
        let cache = ChunkCache::new(src.clone(), 1 << 20);
        cache.set_disk(disk.clone());
        for id in &ids {
            let (_, access) = cache.read_traced(id, FetchClass::Vm).await.unwrap();
            assert_eq!(access, Access::Miss);
        }
        // Entries are written in the background.
        for _ in 0..200 {
            if disk.stats().entries == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(disk.stats().entries, 4);
        drop((cache, disk));

        // A restart: a new memory cache over the same folder.
        let disk = DiskCache::open(t.path(), 1 << 20).unwrap();
        let cache = ChunkCache::new(src.clone(), 1 << 20);
        cache.set_disk(disk.clone());
        for (id, want) in ids.iter().zip(&data) {
            let (b, access) = cache.read_traced(id, FetchClass::Vm).await.unwrap();
            assert_eq!((&b, access), (want, Access::Hit));
        }
        assert_eq!(src.fetches.load(Relaxed), 4, "no fetch after the restart");
        assert_eq!(cache.stats().misses, 0);
        assert_eq!(disk.stats().hits, 4);
        // Now in memory: the next reads do not touch the disk.
        cache.read_chunk(&ids[0]).await.unwrap();
        assert_eq!(disk.stats().hits, 4);
    }

    #[tokio::test]
    async fn errors_are_not_cached_and_name_the_chunk() {
        let bad = ChunkId([9; 32]);
        let src = Arc::new(Counting {
            fetches: AtomicUsize::new(0),
            bad,
        });
        let cache = ChunkCache::new(src.clone(), 1 << 20);
        for _ in 0..2 {
            let e = cache.read_chunk(&bad).await.unwrap_err().to_string();
            assert!(e.contains(&bad.to_hex()), "{e}");
        }
        assert_eq!(
            src.fetches.load(Relaxed),
            2,
            "a failure is retried, not cached"
        );
        assert_eq!(cache.stats().fetch_errors, 2);
    }

    /// A chunk source whose fetches finish only when the test lets them.
    #[derive(Default)]
    struct Gated {
        open: Mutex<std::collections::HashSet<ChunkId>>,
        started: Mutex<Vec<ChunkId>>,
        changed: tokio::sync::Notify,
    }

    impl Gated {
        fn open(&self, id: ChunkId) {
            self.open.lock().unwrap().insert(id);
            self.changed.notify_waiters();
        }
    }

    #[async_trait]
    impl ChunkReader for Gated {
        async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
            self.started.lock().unwrap().push(*id);
            loop {
                let wait = self.changed.notified();
                if self.open.lock().unwrap().contains(id) {
                    return Ok(Bytes::from(id.0.to_vec()));
                }
                wait.await;
            }
        }
    }

    #[tokio::test]
    async fn a_vm_read_raises_the_prestage_fetch_it_joins_and_staged_chunks_stay_apart() {
        let src = Arc::new(Gated::default());
        // Two slots, one kept for VM reads: pre-staging runs one fetch at a time.
        let cache = Arc::new(ChunkCache::with_scheduler(
            src.clone(),
            1 << 20,
            FetchScheduler::new(2, 1),
        ));
        let (a, b) = (ChunkId([1; 32]), ChunkId([2; 32]));
        let stage = |id| {
            let c = cache.clone();
            tokio::spawn(async move { c.stage(&id, 1).await.unwrap() })
        };
        let stage_a = stage(a);
        let stage_b = stage(b);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*src.started.lock().unwrap(), [a], "b waits behind a");
        // A VM needs b: its fetch is raised to the VM class and starts in the reserved slot,
        // and the VM gets b while a is still being fetched.
        let vm = {
            let c = cache.clone();
            tokio::spawn(async move { c.read_traced(&b, FetchClass::Vm).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(*src.started.lock().unwrap(), [a, b]);
        src.open(b);
        let (bytes, access) = tokio::time::timeout(Duration::from_secs(2), vm)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((&bytes[..], access), (&[2u8; 32][..], Access::Miss));
        assert!(
            stage_b.await.unwrap(),
            "the pre-stager's wait ends with the same fetch"
        );
        assert!(
            cache.inner.main.contains_key(&b),
            "fetched for a VM: main cache"
        );
        src.open(a);
        assert!(stage_a.await.unwrap());
        assert!(cache.inner.staging.contains_key(&a));
        assert!(
            !cache.inner.main.contains_key(&a),
            "pre-staged only: staging area"
        );
        assert!(
            !cache.stage(&a, 1).await.unwrap(),
            "staged already: nothing fetched"
        );
        // The VM reads a: a hit, and a joins the VMs' blocks.
        let (_, access) = cache.read_traced(&a, FetchClass::Vm).await.unwrap();
        assert_eq!(access, Access::Hit);
        assert!(cache.inner.main.contains_key(&a));
        let st = cache.stats();
        assert_eq!((st.misses, st.staged, st.staged_hits), (2, 1, 1), "{st:?}");
        assert_eq!(cache.scheduler_stats().started, [1, 1, 0]);
    }

    /// A source whose first fetch panics.
    #[derive(Default)]
    struct PanicsOnce(std::sync::atomic::AtomicBool);

    #[async_trait]
    impl ChunkReader for PanicsOnce {
        async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
            if !self.0.swap(true, Relaxed) {
                panic!("a bug in a fetch");
            }
            Ok(Bytes::from(id.0.to_vec()))
        }
    }

    #[tokio::test]
    async fn a_fill_that_panics_is_an_error_for_its_readers_only() {
        let cache = ChunkCache::new(Arc::new(PanicsOnce::default()), 1 << 20);
        let id = ChunkId([4; 32]);
        let e = cache.read_chunk(&id).await.unwrap_err().to_string();
        assert!(e.contains(&id.to_hex()), "{e}");
        assert_eq!(&cache.read_chunk(&id).await.unwrap()[..], &[4; 32]);
    }

    #[tokio::test]
    async fn cache_stays_within_its_byte_bound() {
        let src = Arc::new(Counting {
            fetches: AtomicUsize::new(0),
            bad: ChunkId([0; 32]),
        });
        let cache = ChunkCache::new(src, 32 * 10);
        for i in 1..=100u8 {
            cache.read_chunk(&ChunkId([i; 32])).await.unwrap();
        }
        cache.inner.main.run_pending_tasks();
        cache.inner.staging.run_pending_tasks();
        assert!(cache.stats().bytes <= 32 * 10, "{:?}", cache.stats());
    }

    #[tokio::test]
    async fn a_chunk_read_ahead_into_a_full_cache_is_there_when_the_vm_reads_it() {
        let src = Arc::new(Counting {
            fetches: AtomicUsize::new(0),
            bad: ChunkId([0; 32]),
        });
        // Room for 30 chunks of 32 bytes in the main cache, 10 in the staging area.
        let cache = ChunkCache::new(src.clone(), 32 * 40);
        // A VM's working set fills the main cache, each chunk read a few times.
        for _ in 0..3 {
            for i in 1..=30u8 {
                cache.read_chunk(&ChunkId([i; 32])).await.unwrap();
            }
            cache.inner.main.run_pending_tasks();
        }
        let fetches = src.fetches.load(Relaxed);
        // Read-ahead guesses the next chunk; the cache's admission must not turn it away.
        let next = ChunkId([31; 32]);
        cache
            .read_intent(
                &next,
                FetchClass::Background,
                Requester::ANYONE,
                Intent::Guess,
            )
            .await
            .unwrap();
        cache.inner.main.run_pending_tasks();
        cache.inner.staging.run_pending_tasks();
        assert_eq!(src.fetches.load(Relaxed), fetches + 1);
        // The VM's read of it a moment later is a hit: no second fetch.
        let (_, access) = cache.read_traced(&next, FetchClass::Vm).await.unwrap();
        assert_eq!(access, Access::Hit);
        assert_eq!(src.fetches.load(Relaxed), fetches + 1);
        // The working set is still there: a guess evicts only other guesses.
        for i in 1..=30u8 {
            let (_, access) = cache
                .read_traced(&ChunkId([i; 32]), FetchClass::Vm)
                .await
                .unwrap();
            assert_eq!(access, Access::Hit, "chunk {i}");
        }
    }

    /// A store that can be taken away: while `down`, every fetch fails as unreachable.
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        fetches: AtomicUsize,
    }

    #[async_trait]
    impl ChunkReader for Flaky {
        async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
            self.fetches.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
            if self.down.load(Relaxed) {
                return Err(RepoError::Unreachable {
                    repo: crate::repo::RepoLocation::Dir("/backup".into()),
                    what: "connection refused".into(),
                });
            }
            Ok(Bytes::from(id.0.to_vec()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_vm_read_rides_through_an_outage_shorter_than_the_grace() {
        let src = Arc::new(Flaky::default());
        let cache = Arc::new(ChunkCache::new(src.clone(), 1 << 20));
        cache.health().set_grace(Duration::from_secs(60));
        let cached = ChunkId([1; 32]);
        cache.read_chunk(&cached).await.unwrap();
        assert!(cache.store_state().reachable);

        src.down.store(true, Relaxed);
        let missed = ChunkId([2; 32]);
        let held = {
            let c = cache.clone();
            tokio::spawn(async move { c.read_chunk(&missed).await })
        };
        tokio::time::sleep(Duration::from_secs(30)).await;
        let st = cache.store_state();
        assert!(!st.reachable && st.unreachable_since.is_some(), "{st:?}");
        assert!(
            st.error.as_deref().unwrap().contains("connection refused"),
            "{st:?}"
        );
        assert_eq!(st.held_reads, 1, "{st:?}");
        assert!(st.longest_held_seconds >= 29.0, "{st:?}");
        // Retried with back-off, not in a tight loop: 30 s at 250 ms doubling to 5 s, and
        // the probe's fetch every 5 s.
        let tries = src.fetches.load(Relaxed);
        assert!((8..=21).contains(&tries), "{tries} fetches in 30 s");
        // Cached reads go on; a guess fails at once and is not held.
        assert_eq!(&cache.read_chunk(&cached).await.unwrap()[..], &[1; 32]);
        let guess = cache
            .read_intent(
                &ChunkId([3; 32]),
                FetchClass::Background,
                Requester::ANYONE,
                Intent::Guess,
            )
            .await;
        assert!(guess.unwrap_err().is_outage());
        assert_eq!(cache.store_state().held_reads, 1);

        src.down.store(false, Relaxed);
        let started = tokio::time::Instant::now();
        assert_eq!(&held.await.unwrap().unwrap()[..], &[2; 32]);
        assert!(started.elapsed() <= outage::MAX_BACKOFF + Duration::from_millis(10));
        let st = cache.store_state();
        assert!(st.reachable && st.unreachable_since.is_none(), "{st:?}");
        assert_eq!((st.held_reads, st.outages), (0, 1), "{st:?}");
        let last = st.last_outage.unwrap();
        assert!((30.0..36.0).contains(&last.seconds), "{last:?}");
        assert_eq!(cache.health().held_seconds_count(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn past_its_grace_a_held_read_fails_and_the_next_read_succeeds_once_the_store_is_back() {
        let src = Arc::new(Flaky::default());
        let cache = Arc::new(ChunkCache::new(src.clone(), 1 << 20));
        cache.health().set_grace(Duration::from_secs(20));
        src.down.store(true, Relaxed);
        let id = ChunkId([5; 32]);
        let first = {
            let c = cache.clone();
            tokio::spawn(async move {
                let t = tokio::time::Instant::now();
                (c.read_chunk(&id).await, t.elapsed())
            })
        };
        // A second read of the same chunk joins 15 s later: it keeps the fetch trying, but
        // the first read still ends at its own grace.
        tokio::time::sleep(Duration::from_secs(15)).await;
        let second = {
            let c = cache.clone();
            tokio::spawn(async move {
                let t = tokio::time::Instant::now();
                (c.read_chunk(&id).await, t.elapsed())
            })
        };
        let (r, took) = first.await.unwrap();
        let e = r.unwrap_err();
        assert!(e.is_outage(), "{e}");
        assert!(e.to_string().contains("cannot be reached"), "{e}");
        assert!(
            (Duration::from_secs(20)..Duration::from_secs(21)).contains(&took),
            "{took:?}"
        );
        let (r, took) = second.await.unwrap();
        assert!(r.unwrap_err().is_outage());
        assert!(
            (Duration::from_secs(20)..Duration::from_secs(26)).contains(&took),
            "{took:?}"
        );
        assert_eq!(cache.store_state().held_reads, 0);
        // Nothing of the outage is left behind: the store back, the next read is served.
        src.down.store(false, Relaxed);
        assert_eq!(&cache.read_chunk(&id).await.unwrap()[..], &[5; 32]);
        assert!(cache.store_state().reachable);
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_grace_a_read_fails_at_once() {
        let src = Arc::new(Flaky::default());
        let cache = ChunkCache::new(src.clone(), 1 << 20);
        cache.health().set_grace(Duration::ZERO);
        src.down.store(true, Relaxed);
        let t = tokio::time::Instant::now();
        assert!(cache
            .read_chunk(&ChunkId([6; 32]))
            .await
            .unwrap_err()
            .is_outage());
        assert!(t.elapsed() < Duration::from_millis(100));
        assert_eq!(src.fetches.load(Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_relocations_read_rides_through_an_outage_and_a_warm_up_tells_it() {
        let src = Arc::new(Flaky::default());
        let cache = Arc::new(ChunkCache::new(src.clone(), 1 << 20));
        cache.health().set_grace(Duration::from_secs(60));
        src.down.store(true, Relaxed);
        let copy = {
            let c = cache.clone();
            tokio::spawn(async move {
                c.read_through(&ChunkId([4; 32]), FetchClass::Background)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!copy.is_finished(), "the relocation's read waits");
        let st = cache.store_state();
        assert!(!st.reachable, "{st:?}");
        src.down.store(false, Relaxed);
        let b = copy.await.unwrap().unwrap();
        assert_eq!(&b[..], &[4; 32]);
        assert!(cache.store_state().reachable);
        // Past the grace it fails, with the outage's error.
        cache.health().set_grace(Duration::from_secs(10));
        src.down.store(true, Relaxed);
        let t = tokio::time::Instant::now();
        let e = cache
            .read_through(&ChunkId([5; 32]), FetchClass::Background)
            .await
            .unwrap_err();
        assert!(e.is_outage(), "{e}");
        assert!(t.elapsed() >= Duration::from_secs(10), "{:?}", t.elapsed());
        src.down.store(false, Relaxed);
        tokio::time::sleep(outage::PROBE_EVERY * 2).await;
        assert!(cache.store_state().reachable);
        // A warm-up (a guess) fails at once, and the status says why.
        let dir = tempfile::tempdir().unwrap();
        cache.set_disk(DiskCache::open(dir.path(), 1 << 20).unwrap());
        src.down.store(true, Relaxed);
        assert!(cache.warm_disk(&ChunkId([6; 32]), 1).await.is_err());
        assert!(!cache.store_state().reachable);
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_an_outage_is_seen_without_any_read() {
        let src = Arc::new(Flaky::default());
        let cache = ChunkCache::new(src.clone(), 1 << 20);
        cache.health().set_grace(Duration::from_secs(1));
        src.down.store(true, Relaxed);
        assert!(cache.read_chunk(&ChunkId([7; 32])).await.is_err());
        assert!(!cache.store_state().reachable);
        // No read comes (a VM paused by its error policy); the store comes back.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!cache.store_state().reachable, "still away");
        src.down.store(false, Relaxed);
        tokio::time::sleep(outage::PROBE_EVERY + Duration::from_millis(100)).await;
        let st = cache.store_state();
        assert!(st.reachable && st.outages == 1, "{st:?}");
        // The probe stopped with the outage: no more fetches.
        let n = src.fetches.load(Relaxed);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(src.fetches.load(Relaxed), n);
    }
}
