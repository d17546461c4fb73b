//! Leases: who uses which snapshot, recorded in the repository itself so that every agent,
//! backup and prune that shares it sees them (decision 0017).
//!
//! A lease is a small JSON object in `leases/`: what holds it (a media agent, a backup, a
//! restore), where it runs, the snapshots it uses and for what, and how long after its last
//! renewal it stops counting. Its holder rewrites it every tenth of that time; the store's
//! clock stamps each write (a file's mtime, an object's Last-Modified), and a lease whose
//! stamp is older than its expiry by the store's clock now is gone: its holder stopped
//! without removing it (killed, a lost host).
//!
//! Owns: the lease format, a holder's renewal task, reading the live leases.
//! Must not: know what a mount or a relocation is: a use is a snapshot and a line of text.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;

use super::store::{Area, ChunkStore};
use super::{RepoError, SnapshotId};

/// How long a lease counts after its last renewal, unless the config says otherwise
/// (`[retention] lease_expiry`).
pub const DEFAULT_EXPIRY: Duration = Duration::from_secs(600);
/// The shortest expiry accepted: renewals every tenth of it must not flood the store.
pub const MIN_EXPIRY: Duration = Duration::from_secs(10);
const FORMAT: u32 = 1;

/// What holds a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseKind {
    /// A media agent (`livemount serve`): its live mounts and relocations.
    Agent,
    /// A backup: it may reuse chunks it found present; a prune waits for it.
    Backup,
    /// A restore.
    Restore,
    /// A prune: one at a time per repository.
    Prune,
}

/// A snapshot in use, and for what (`mount web01-test`, `relocation of mount web01-test`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotUse {
    pub snapshot: SnapshotId,
    pub what: String,
}

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub format: u32,
    pub kind: LeaseKind,
    /// Who holds it, as an operator would name it (`agent 3f2a9c01`).
    pub holder: String,
    pub host: String,
    pub pid: u32,
    /// The kernel's boot id and the process's pid namespace (`BOOT_ID/pid:[INODE]`): a lease
    /// of this kernel and namespace whose pid is not running is gone at once, without waiting
    /// for its expiry (a holder killed on this host).
    #[serde(default)]
    pub process_space: Option<String>,
    pub started: Timestamp,
    /// Seconds after its last renewal that the lease stops counting.
    pub expiry_seconds: u64,
    pub uses: Vec<SnapshotUse>,
}

/// A lease that counts now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveLease {
    /// Its record name in `leases/`.
    pub name: String,
    pub renewed: Timestamp,
    #[serde(flatten)]
    pub lease: Lease,
}

impl LiveLease {
    /// `mount w (agent 3f2a9c01 on host h1)`, for messages.
    pub fn describe(&self, u: &SnapshotUse) -> String {
        format!(
            "{} ({} on host {})",
            u.what, self.lease.holder, self.lease.host
        )
    }
}

/// This host's name, for leases.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// This process's kernel boot id and pid namespace, if they can be read.
fn process_space() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    Some(format!("{}/{}", boot.trim(), ns.to_string_lossy()))
}

/// Whether the lease's holder is a process of this kernel and pid namespace that is no
/// longer running. A pid reused since only makes the lease count longer (until its expiry).
fn holder_is_gone(lease: &Lease) -> bool {
    let Some(space) = &lease.process_space else {
        return false;
    };
    if process_space().as_ref() != Some(space) || lease.pid == std::process::id() {
        return false;
    }
    matches!(
        std::fs::metadata(format!("/proc/{}", lease.pid)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound
    )
}

/// The leases that count at the store's time `now`, and the names of those that expired (or
/// whose holder, on this host, is gone).
pub async fn live_leases(
    store: &dyn ChunkStore,
    now: Timestamp,
) -> Result<(Vec<LiveLease>, Vec<String>), RepoError> {
    let mut live = Vec::new();
    let mut expired = Vec::new();
    for rec in store.list_records(Area::Leases).await? {
        // Removed since the listing: released.
        let Some(bytes) = store.get_record(Area::Leases, &rec.name).await? else {
            continue;
        };
        let lease: Lease = serde_json::from_slice(&bytes).map_err(|e| {
            RepoError::Invalid(format!(
                "lease leases/{} in the repository is unreadable ({e}); a prune or forget \
                 cannot tell what it protects: remove it if its holder is gone",
                rec.name
            ))
        })?;
        let until = rec
            .modified
            .checked_add(Duration::from_secs(lease.expiry_seconds))
            .unwrap_or(Timestamp::MAX);
        if until < now || holder_is_gone(&lease) {
            expired.push(rec.name);
        } else {
            live.push(LiveLease {
                name: rec.name,
                renewed: rec.modified,
                lease,
            });
        }
    }
    Ok((live, expired))
}

/// A lease held by this process: written at once, renewed in the background every tenth of
/// its expiry, removed by [`LeaseHolder::release`]. Dropped without a release, it stops being
/// renewed and expires.
pub struct LeaseHolder {
    store: Arc<dyn ChunkStore>,
    name: String,
    lease: Mutex<Lease>,
    /// One write at a time, each of the uses as they are when it starts: a renewal cannot
    /// land after (and undo) a write of newer uses.
    writing: tokio::sync::Mutex<()>,
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for LeaseHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseHolder")
            .field("name", &self.name)
            .finish()
    }
}

impl LeaseHolder {
    /// Writes the lease `NAME` (a record name; the same name replaces an earlier lease of this
    /// holder, as a restarted agent does) and starts renewing it.
    pub async fn take(
        store: Arc<dyn ChunkStore>,
        name: String,
        kind: LeaseKind,
        holder: String,
        expiry: Duration,
        uses: Vec<SnapshotUse>,
    ) -> Result<Arc<LeaseHolder>, RepoError> {
        let h = LeaseHolder::new(store, name, kind, holder, expiry, uses);
        h.write().await?;
        h.start_renewing();
        Ok(h)
    }

    /// A lease not written yet: [`LeaseHolder::write`] writes it, and
    /// [`LeaseHolder::start_renewing`] keeps it written.
    pub fn new(
        store: Arc<dyn ChunkStore>,
        name: String,
        kind: LeaseKind,
        holder: String,
        expiry: Duration,
        uses: Vec<SnapshotUse>,
    ) -> Arc<LeaseHolder> {
        let expiry = expiry.max(MIN_EXPIRY);
        let lease = Lease {
            format: FORMAT,
            kind,
            holder,
            host: host_name(),
            pid: std::process::id(),
            process_space: process_space(),
            started: Timestamp::now(),
            expiry_seconds: expiry.as_secs(),
            uses,
        };
        Arc::new(LeaseHolder {
            store,
            name,
            lease: Mutex::new(lease),
            writing: tokio::sync::Mutex::new(()),
            renewer: Mutex::new(None),
        })
    }

    /// Rewrites the lease every tenth of its expiry from now on, until released or dropped.
    pub fn start_renewing(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = Duration::from_secs(self.expiry_seconds()) / 10;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(h) = weak.upgrade() else { return };
                if let Err(e) = h.write().await {
                    tracing::warn!(lease = %h.name, error = %e, "cannot renew a lease in the repository; if this lasts, a prune elsewhere may take what it protects once it expires");
                }
            }
        });
        if let Some(old) = self
            .renewer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(task)
        {
            old.abort();
        }
    }

    fn expiry_seconds(&self) -> u64 {
        self.lease
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .expiry_seconds
    }

    /// The record name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn bytes(&self) -> Bytes {
        let lease = self.lease.lock().unwrap_or_else(|p| p.into_inner());
        // Serialising plain data cannot fail.
        Bytes::from(serde_json::to_vec_pretty(&*lease).unwrap_or_default())
    }

    /// Writes the lease now.
    pub async fn write(&self) -> Result<(), RepoError> {
        let _one = self.writing.lock().await;
        self.store
            .put_record(Area::Leases, &self.name, self.bytes())
            .await
    }

    /// Replaces the uses and writes the lease now: a use added is in the repository when this
    /// returns.
    pub async fn set_uses(&self, uses: Vec<SnapshotUse>) -> Result<(), RepoError> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).uses = uses;
        self.write().await
    }

    /// Stops renewing and removes the lease. A renewal under way finishes first, so none
    /// writes the lease again after it is removed.
    pub async fn release(&self) -> Result<(), RepoError> {
        let _one = self.writing.lock().await;
        self.stop_renewing();
        self.store.delete_record(Area::Leases, &self.name).await
    }

    fn stop_renewing(&self) {
        if let Some(t) = self
            .renewer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        self.stop_renewing();
    }
}

/// A fresh random record name for a lease of `kind`: `backup-<16 hex>`.
pub fn random_name(kind: LeaseKind) -> String {
    let tag = match kind {
        LeaseKind::Agent => "agent",
        LeaseKind::Backup => "backup",
        LeaseKind::Restore => "restore",
        LeaseKind::Prune => "prune",
    };
    let hex = crate::durable::tmp_name();
    format!("{tag}-{}", &hex[crate::durable::TMP_PREFIX.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::{ChunkSize, LocalStore};

    #[tokio::test]
    async fn a_lease_counts_until_its_expiry_and_goes_when_released() {
        let t = tempfile::tempdir().unwrap();
        LocalStore::init(t.path(), ChunkSize::new(65536).unwrap()).unwrap();
        let (store, _) = LocalStore::open(t.path()).unwrap();
        let store: Arc<dyn ChunkStore> = Arc::new(store);
        let snap = SnapshotId::of(b"x");
        let h = LeaseHolder::take(
            store.clone(),
            random_name(LeaseKind::Restore),
            LeaseKind::Restore,
            "restore".into(),
            Duration::from_secs(60),
            vec![SnapshotUse {
                snapshot: snap,
                what: "restore to /x".into(),
            }],
        )
        .await
        .unwrap();
        let now = store.now().await.unwrap();
        let (live, expired) = live_leases(&*store, now).await.unwrap();
        assert_eq!(live.len(), 1);
        assert!(expired.is_empty());
        assert_eq!(live[0].lease.uses[0].snapshot, snap);
        // Seen from 61 s later, it has expired.
        let later = now.checked_add(Duration::from_secs(61)).unwrap();
        let (live, expired) = live_leases(&*store, later).await.unwrap();
        assert!(live.is_empty());
        assert_eq!(expired, vec![h.name().to_string()]);
        h.release().await.unwrap();
        let (live, expired) = live_leases(&*store, later).await.unwrap();
        assert!(live.is_empty() && expired.is_empty());
    }
}
