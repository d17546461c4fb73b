//! Prune: deleting the chunks no snapshot needs, without a lock that backups would wait for,
//! and without ever taking a chunk from a backup that runs meanwhile (decision 0017).
//!
//! A backup may find a chunk present (and not store it again) at any moment before its
//! manifest is written, and a manifest is the only thing that tells a prune a chunk is needed.
//! So a prune deletes in two steps, as lock-free deduplicating backup tools do:
//! 1. Set aside: every chunk no manifest needs (none in `snapshots/`, none in a forgotten
//!    manifest still counted) moves from `chunks/` into a bin, `trash/BIN/`, whose record
//!    `prune/BIN.json` is written first. From then on `has_chunk` does not see it, so a backup
//!    that starts later stores it again; readers still find it in the bin. Then the prune
//!    reads the live leases and writes in the record the backups that were running: any of
//!    them may name a set-aside chunk.
//! 2. Empty: once none of those backups is running any more (each released or expired its
//!    lease), their snapshots are in `snapshots/`; the prune lists the manifests again, puts
//!    back every chunk of the bin that one of them needs, and deletes the rest. With no
//!    backup running at step 1, the same prune empties the bin at once; otherwise a later
//!    prune does.
//!
//! Killed at any moment, a prune leaves chunks in `chunks/` or in a bin, both of which readers
//! see: no manifest ever names a chunk that is gone. A bin whose record still says it is being
//! filled is finished by the next prune. One prune runs at a time per repository (a lease of
//! kind prune; a second is refused).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::lease::{live_leases, random_name, LeaseHolder, LeaseKind, LiveLease};
use super::manifest::Manifest;
use super::store::Area;
use super::{ChunkId, Progress, RepoError, Repository, SnapshotId};

/// Chunk moves and manifest reads in flight at once.
const PRUNE_CONCURRENCY: usize = 16;
const RECORD_FORMAT: u32 = 1;

/// A number of chunks and their stored bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub chunks: u64,
    pub bytes: u64,
}

impl Counts {
    fn add(&mut self, bytes: u64) {
        self.chunks += 1;
        self.bytes += bytes;
    }
}

/// What a prune did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Snapshots whose chunks were kept (in `snapshots/`, and forgotten ones still counted).
    pub snapshots: usize,
    /// Chunks stored before, in `chunks/` and in bins.
    pub before: Counts,
    /// Chunks stored after.
    pub after: Counts,
    /// Deleted for good.
    pub deleted: Counts,
    /// Set aside in a bin that was emptied but needed again by a snapshot, so put back.
    pub put_back: u64,
    /// Still set aside at the end, waiting for the backups in `waiting_for` to finish.
    pub waiting: Counts,
    /// The backups (lease holder, host) that must finish before a later prune deletes what is
    /// waiting.
    pub waiting_for: Vec<String>,
    /// Forgotten manifests dropped (no lease names them and they are older than the lease
    /// expiry).
    pub forgotten_dropped: usize,
    /// Leases whose holders stopped renewing them longer ago than their expiry, removed.
    pub expired_leases: Vec<String>,
}

/// `prune/BIN.json`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BinRecord {
    format: u32,
    /// `filling` while chunks are moved in; `full` once the backups to wait for are known.
    state: BinState,
    started: jiff::Timestamp,
    /// Lease names of the backups that were running when the bin was full.
    waiting_for: Vec<String>,
    /// The same, described for people.
    waiting_for_text: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum BinState {
    Filling,
    Full,
}

fn bin_record_name(bin: &str) -> String {
    format!("{bin}.json")
}

fn describe(l: &LiveLease) -> String {
    format!(
        "{} on host {} (pid {}, since {})",
        l.lease.holder,
        l.lease.host,
        l.lease.pid,
        super::manifest::format_time(l.lease.started)
    )
}

impl Repository {
    /// Deletes the chunks no snapshot needs (see the module's comment). `grace`: how long a
    /// forgotten manifest still counts without a lease naming it (the lease expiry).
    pub async fn prune(
        &self,
        dry_run: bool,
        grace: Duration,
        progress: &dyn Progress,
    ) -> Result<PruneReport, RepoError> {
        let store = self.store().clone();
        let mut report = PruneReport {
            dry_run,
            ..Default::default()
        };

        // One prune at a time: take a lease, then look for another prune's.
        let lease = if dry_run {
            None
        } else {
            Some(
                LeaseHolder::take(
                    store.clone(),
                    random_name(LeaseKind::Prune),
                    LeaseKind::Prune,
                    "prune".into(),
                    grace,
                    Vec::new(),
                )
                .await?,
            )
        };
        let result = self
            .prune_held(lease.as_deref(), &mut report, grace, progress)
            .await;
        if let Some(l) = &lease {
            if let Err(e) = l.release().await {
                tracing::warn!(error = %e, "cannot remove the prune's lease; it expires by itself");
            }
        }
        result.map(|()| report)
    }

    async fn prune_held(
        &self,
        lease: Option<&LeaseHolder>,
        report: &mut PruneReport,
        grace: Duration,
        progress: &dyn Progress,
    ) -> Result<(), RepoError> {
        let store = self.store().clone();
        let dry_run = report.dry_run;
        let now = store.now().await?;
        let (leases, expired) = live_leases(&*store, now).await?;
        if let Some(other) = leases.iter().find(|l| {
            l.lease.kind == LeaseKind::Prune && Some(l.name.as_str()) != lease.map(|h| h.name())
        }) {
            return Err(RepoError::Invalid(format!(
                "another prune is running: {}; wait for it to finish (a prune that was killed \
                 stops counting {} s after it last renewed its lease leases/{})",
                describe(other),
                other.lease.expiry_seconds,
                other.name
            )));
        }

        // Bins of earlier prunes: finish a filling one (that prune was cut short), and note
        // the ones whose backups have all finished.
        let records: BTreeMap<String, BinRecord> = self.bin_records().await?;
        let mut bins: Vec<(String, BinRecord)> = Vec::new();
        for bin in store.list_bins().await? {
            let rec = records.get(&bin).cloned().unwrap_or(BinRecord {
                format: RECORD_FORMAT,
                state: BinState::Filling,
                started: now,
                waiting_for: Vec::new(),
                waiting_for_text: Vec::new(),
            });
            bins.push((bin, rec));
        }
        for (bin, rec) in &mut bins {
            if rec.state == BinState::Filling {
                let backups: Vec<&LiveLease> = leases
                    .iter()
                    .filter(|l| l.lease.kind == LeaseKind::Backup)
                    .collect();
                rec.state = BinState::Full;
                rec.waiting_for = backups.iter().map(|l| l.name.clone()).collect();
                rec.waiting_for_text = backups.iter().map(|l| describe(l)).collect();
                if !dry_run {
                    self.put_bin_record(bin, rec).await?;
                }
            }
        }
        let live_names: HashSet<&str> = leases.iter().map(|l| l.name.as_str()).collect();
        let ready: Vec<&(String, BinRecord)> = bins
            .iter()
            .filter(|(_, r)| {
                r.waiting_for
                    .iter()
                    .all(|n| !live_names.contains(n.as_str()))
            })
            .collect();

        // What every snapshot needs, listed after the readiness check above: a backup that
        // finished before it has its manifest in `snapshots/` by now.
        let (mut needed, mut seen) = (HashSet::new(), HashSet::new());
        self.add_counted(&mut needed, &mut seen, &leases, now, grace, report)
            .await?;

        // Count what is stored.
        let stored = store.list_chunks().await?;
        let mut binned: Vec<(String, Vec<(ChunkId, u64)>)> = Vec::new();
        for (bin, _) in &bins {
            binned.push((bin.clone(), store.list_set_aside(bin).await?));
        }
        for (_, b) in stored.iter() {
            report.before.add(*b);
        }
        for (_, list) in &binned {
            for (_, b) in list {
                report.before.add(*b);
            }
        }

        // Empty the ready bins.
        for (bin, _) in &ready {
            let list = binned
                .iter()
                .find(|(b, _)| b == bin)
                .map(|(_, l)| l.clone())
                .unwrap_or_default();
            self.empty_bin(bin, &list, &needed, report).await?;
        }

        // Set aside what nothing needs now.
        let unneeded: Vec<(ChunkId, u64)> = stored
            .iter()
            .filter(|(id, _)| !needed.contains(id))
            .copied()
            .collect();
        progress.set_total(unneeded.iter().map(|(_, b)| *b).sum());
        if !unneeded.is_empty() && dry_run {
            for (_, b) in &unneeded {
                report.deleted.add(*b);
            }
        } else if !unneeded.is_empty() {
            let bin = format!(
                "{}-{}",
                jiff::Timestamp::now().as_second(),
                &random_name(LeaseKind::Prune)["prune-".len()..]
            );
            let mut rec = BinRecord {
                format: RECORD_FORMAT,
                state: BinState::Filling,
                started: jiff::Timestamp::now(),
                waiting_for: Vec::new(),
                waiting_for_text: Vec::new(),
            };
            self.put_bin_record(&bin, &rec).await?;
            futures::stream::iter(unneeded.iter())
                .map(|(id, b)| {
                    let store = store.clone();
                    let bin = bin.clone();
                    async move {
                        store.set_aside(&bin, id).await?;
                        progress.advance(*b);
                        Ok::<(), RepoError>(())
                    }
                })
                .buffer_unordered(PRUNE_CONCURRENCY)
                .try_collect::<()>()
                .await?;
            // The backups that may have found one of these chunks before it moved.
            let now2 = store.now().await?;
            let (leases2, _) = live_leases(&*store, now2).await?;
            let backups: Vec<&LiveLease> = leases2
                .iter()
                .filter(|l| l.lease.kind == LeaseKind::Backup)
                .collect();
            rec.state = BinState::Full;
            rec.waiting_for = backups.iter().map(|l| l.name.clone()).collect();
            rec.waiting_for_text = backups.iter().map(|l| describe(l)).collect();
            self.put_bin_record(&bin, &rec).await?;
            if backups.is_empty() {
                // Snapshots finished since the first listing need their chunks back.
                self.add_counted(&mut needed, &mut seen, &leases2, now2, grace, report)
                    .await?;
                self.empty_bin(&bin, &unneeded, &needed, report).await?;
            } else {
                for (_, b) in &unneeded {
                    report.waiting.add(*b);
                }
                report
                    .waiting_for
                    .extend(rec.waiting_for_text.iter().cloned());
            }
        }
        // Bins that were not ready wait on.
        for (bin, rec) in &bins {
            if ready.iter().any(|(b, _)| b == bin) {
                continue;
            }
            if let Some((_, list)) = binned.iter().find(|(b, _)| b == bin) {
                for (_, b) in list {
                    report.waiting.add(*b);
                }
            }
            for w in &rec.waiting_for_text {
                if !report.waiting_for.contains(w) {
                    report.waiting_for.push(w.clone());
                }
            }
        }

        report.after = Counts {
            chunks: report.before.chunks - report.deleted.chunks,
            bytes: report.before.bytes - report.deleted.bytes,
        };

        // Housekeeping: leases of holders gone, forgotten manifests nobody can need.
        report.expired_leases = expired.clone();
        if !dry_run {
            for name in &expired {
                store.delete_record(Area::Leases, name).await?;
            }
            for name in self.droppable_forgotten(&leases, now, grace).await? {
                store.delete_record(Area::Forgotten, &name).await?;
                report.forgotten_dropped += 1;
            }
        }
        Ok(())
    }

    /// The bins' records, by bin.
    async fn bin_records(&self) -> Result<BTreeMap<String, BinRecord>, RepoError> {
        let store = self.store();
        let mut out = BTreeMap::new();
        for rec in store.list_records(Area::Prune).await? {
            let Some(bin) = rec.name.strip_suffix(".json") else {
                continue;
            };
            let Some(bytes) = store.get_record(Area::Prune, &rec.name).await? else {
                continue;
            };
            let r: BinRecord = serde_json::from_slice(&bytes).map_err(|e| {
                RepoError::Invalid(format!(
                    "prune record prune/{} in the repository is unreadable: {e}",
                    rec.name
                ))
            })?;
            out.insert(bin.to_string(), r);
        }
        Ok(out)
    }

    async fn put_bin_record(&self, bin: &str, rec: &BinRecord) -> Result<(), RepoError> {
        let bytes =
            serde_json::to_vec_pretty(rec).map_err(|e| RepoError::Invalid(e.to_string()))?;
        self.store()
            .put_record(Area::Prune, &bin_record_name(bin), Bytes::from(bytes))
            .await
    }

    /// Puts back the chunks of a bin that `needed` names, deletes the rest, then the bin and
    /// its record.
    async fn empty_bin(
        &self,
        bin: &str,
        list: &[(ChunkId, u64)],
        needed: &HashSet<ChunkId>,
        report: &mut PruneReport,
    ) -> Result<(), RepoError> {
        let store = self.store().clone();
        let mut doomed = Vec::new();
        for (id, b) in list {
            if needed.contains(id) {
                if !report.dry_run {
                    store.put_back(bin, id).await?;
                }
                report.put_back += 1;
            } else {
                doomed.push(*id);
                report.deleted.add(*b);
            }
        }
        if report.dry_run {
            return Ok(());
        }
        for batch in doomed.chunks(1000) {
            store.delete_set_aside(bin, batch).await?;
        }
        store.remove_bin(bin).await?;
        store
            .delete_record(Area::Prune, &bin_record_name(bin))
            .await
    }

    /// Adds to `needed` every chunk of the snapshots not in `seen` yet: those in `snapshots/`,
    /// and forgotten ones a live lease names or forgotten less than `grace` ago. A manifest
    /// that cannot be read stops the prune: what it needs is unknown.
    async fn add_counted(
        &self,
        needed: &mut HashSet<ChunkId>,
        seen: &mut HashSet<SnapshotId>,
        leases: &[LiveLease],
        now: jiff::Timestamp,
        grace: Duration,
        report: &mut PruneReport,
    ) -> Result<(), RepoError> {
        self.add_new_snapshots(needed, seen, report).await?;
        let leased: HashSet<SnapshotId> = leases
            .iter()
            .flat_map(|l| l.lease.uses.iter().map(|u| u.snapshot))
            .collect();
        let store = self.store();
        for rec in store.list_records(Area::Forgotten).await? {
            let Some(id) = rec
                .name
                .strip_suffix(".json")
                .and_then(SnapshotId::from_hex)
            else {
                continue;
            };
            let young = rec
                .modified
                .checked_add(grace)
                .map(|t| t >= now)
                .unwrap_or(true);
            if seen.contains(&id) || !(young || leased.contains(&id)) {
                continue;
            }
            let Some(bytes) = store.get_record(Area::Forgotten, &rec.name).await? else {
                continue;
            };
            let m = Manifest::decode(&id, &bytes)?;
            needed.extend(self.manifest_chunks(&id, &m).await?);
            seen.insert(id);
            report.snapshots += 1;
        }
        Ok(())
    }

    /// Adds the chunks of every manifest in `snapshots/` not in `seen` yet.
    async fn add_new_snapshots(
        &self,
        needed: &mut HashSet<ChunkId>,
        seen: &mut HashSet<SnapshotId>,
        report: &mut PruneReport,
    ) -> Result<(), RepoError> {
        let ids: Vec<SnapshotId> = self
            .store()
            .list_manifests()
            .await?
            .into_iter()
            .filter(|id| !seen.contains(id))
            .collect();
        let mut reads = futures::stream::iter(ids)
            .map(|id| async move {
                let m = match self.manifest(&id).await {
                    // Listed, then forgotten: its copy in forgotten/ is counted below.
                    Err(RepoError::NoSnapshot { .. }) => return Ok((id, None)),
                    r => r,
                };
                let m = m.map_err(|e| {
                    RepoError::Invalid(format!(
                        "snapshot {} cannot be read ({e}): a prune cannot tell which chunks \
                         it needs, so it deletes nothing; run `livemount verify`",
                        id.short()
                    ))
                })?;
                Ok::<_, RepoError>((id, Some(self.manifest_chunks(&id, &m).await?)))
            })
            .buffer_unordered(PRUNE_CONCURRENCY / 4);
        while let Some(r) = reads.next().await {
            let (id, chunks) = r?;
            let Some(chunks) = chunks else { continue };
            needed.extend(chunks);
            seen.insert(id);
            report.snapshots += 1;
        }
        Ok(())
    }

    /// Every chunk a snapshot names: its config, its block tables' pieces and their blocks.
    async fn manifest_chunks(
        &self,
        id: &SnapshotId,
        m: &Manifest,
    ) -> Result<Vec<ChunkId>, RepoError> {
        let mut chunks = vec![m.config.chunk];
        for d in &m.disks {
            chunks.extend(d.table.iter().copied());
            chunks.extend(self.block_table(id, d, None).await?.chunks());
        }
        Ok(chunks)
    }

    /// Forgotten manifests no live lease names, forgotten longer than `grace` ago.
    async fn droppable_forgotten(
        &self,
        leases: &[LiveLease],
        now: jiff::Timestamp,
        grace: Duration,
    ) -> Result<Vec<String>, RepoError> {
        let leased: HashSet<SnapshotId> = leases
            .iter()
            .flat_map(|l| l.lease.uses.iter().map(|u| u.snapshot))
            .collect();
        Ok(self
            .store()
            .list_records(Area::Forgotten)
            .await?
            .into_iter()
            .filter(|rec| {
                let old = rec
                    .modified
                    .checked_add(grace)
                    .map(|t| t < now)
                    .unwrap_or(false);
                let id = rec
                    .name
                    .strip_suffix(".json")
                    .and_then(SnapshotId::from_hex);
                old && id.is_some_and(|id| !leased.contains(&id))
            })
            .map(|rec| rec.name)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::lease::SnapshotUse;
    use crate::repo::{BackupOptions, ChunkSize, NoProgress};
    use std::path::Path;
    use std::sync::Arc;

    /// A repository in `dir/repo` and a backup of a one-disk KVM VM `vm` holding `disk`.
    async fn backup(dir: &Path, repo: &Repository, vm: &str, disk: &[u8]) -> SnapshotId {
        let folder = dir.join(vm);
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("d.img"), disk).unwrap();
        let xml = format!(
            "<domain type='kvm'><name>{vm}</name><memory>1024</memory><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='d.img'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
        );
        std::fs::write(folder.join("vm.xml"), xml).unwrap();
        let opts = BackupOptions::from_config_file(&folder.join("vm.xml"), &[]).unwrap();
        repo.backup(&opts, &NoProgress).await.unwrap().snapshot
    }

    fn noise(len: usize, seed: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut h = blake3::Hasher::new();
        h.update(&[seed]);
        let mut r = h.finalize_xof();
        out.resize(len, 0);
        r.fill(&mut out);
        out
    }

    fn repo(dir: &Path) -> Repository {
        Repository::init(&dir.join("repo"), ChunkSize::new(65536).unwrap()).unwrap()
    }

    async fn chunk_count(repo: &Repository) -> usize {
        repo.store().list_chunks().await.unwrap().len()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_chunk_a_running_backup_may_name_is_set_aside_readable_and_put_back() {
        let t = tempfile::tempdir().unwrap();
        let r = repo(t.path());
        let a = backup(t.path(), &r, "a", &noise(4 << 16, 1)).await;
        let keep = backup(t.path(), &r, "k", &noise(2 << 16, 2)).await;
        let manifest_a = r.store().get_manifest(&a).await.unwrap();
        let chunks_a: Vec<ChunkId> = {
            let m = r.manifest(&a).await.unwrap();
            r.manifest_chunks(&a, &m).await.unwrap()
        };
        r.forget_snapshot(&a).await.unwrap();
        // A backup is running: it may have found a's chunks present.
        let running = r
            .take_lease(
                random_name(LeaseKind::Backup),
                LeaseKind::Backup,
                "backup of a".into(),
                Vec::new(),
            )
            .await
            .unwrap();
        let report = r.prune(false, Duration::ZERO, &NoProgress).await.unwrap();
        assert_eq!(report.deleted, Counts::default(), "{report:?}");
        assert_eq!(report.waiting.chunks as usize, chunks_a.len(), "{report:?}");
        assert_eq!(report.waiting_for.len(), 1);
        assert!(report.waiting_for[0].contains("backup of a"), "{report:?}");
        for c in &chunks_a {
            assert!(!r.store().has_chunk(c).await.unwrap(), "set aside: {c:?}");
        }
        // The backup ends by writing a manifest that names those chunks (as a's did).
        r.store().put_manifest(&a, manifest_a).await.unwrap();
        // Readers find them meanwhile.
        let snap = r.snapshot(&a).await.unwrap();
        let disk = snap.disk(0).await.unwrap();
        assert_eq!(
            &disk.read_at(0, 4 << 16).await.unwrap()[..],
            &noise(4 << 16, 1)[..]
        );
        assert!(r.verify(None, &NoProgress).await.unwrap().is_clean());
        // A prune while the backup still runs deletes nothing of the bin.
        let report = r.prune(false, Duration::ZERO, &NoProgress).await.unwrap();
        assert_eq!(report.deleted, Counts::default(), "{report:?}");
        running.release().await.unwrap();
        // Once it has finished, the next prune puts back what its snapshot needs.
        let report = r.prune(false, Duration::ZERO, &NoProgress).await.unwrap();
        assert_eq!(report.put_back as usize, chunks_a.len(), "{report:?}");
        assert_eq!(report.deleted, Counts::default(), "{report:?}");
        assert!(r.store().list_bins().await.unwrap().is_empty());
        for c in &chunks_a {
            assert!(r.store().has_chunk(c).await.unwrap());
        }
        assert!(r.verify(None, &NoProgress).await.unwrap().is_clean());
        // Forgotten again with no backup running: deleted at once, the kept snapshot whole.
        r.forget_snapshot(&a).await.unwrap();
        let before = chunk_count(&r).await;
        let report = r.prune(false, Duration::ZERO, &NoProgress).await.unwrap();
        assert_eq!(report.deleted.chunks as usize, chunks_a.len(), "{report:?}");
        assert_eq!(chunk_count(&r).await, before - chunks_a.len());
        assert!(r.store().list_bins().await.unwrap().is_empty());
        assert!(r
            .store()
            .list_records(Area::Prune)
            .await
            .unwrap()
            .is_empty());
        let v = r.verify(None, &NoProgress).await.unwrap();
        assert!(v.is_clean() && v.snapshots.len() == 1, "{v:?}");
        let _ = keep;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn forgotten_manifests_count_while_leased_or_young() {
        let t = tempfile::tempdir().unwrap();
        let r = repo(t.path());
        let a = backup(t.path(), &r, "a", &noise(3 << 16, 3)).await;
        let n = chunk_count(&r).await;
        r.forget_snapshot(&a).await.unwrap();
        // Young: forgotten less than the grace ago.
        let report = r
            .prune(false, Duration::from_secs(600), &NoProgress)
            .await
            .unwrap();
        assert_eq!(report.deleted.chunks, 0);
        assert_eq!(chunk_count(&r).await, n);
        // Leased (an agent read the manifest just before it went): kept past the grace.
        let agent = r
            .take_lease(
                "agent-test".into(),
                LeaseKind::Agent,
                "agent test".into(),
                vec![SnapshotUse {
                    snapshot: a,
                    what: "mount m".into(),
                }],
            )
            .await
            .unwrap();
        let report = r.prune(false, Duration::ZERO, &NoProgress).await.unwrap();
        assert_eq!(report.deleted.chunks, 0, "{report:?}");
        assert_eq!(report.forgotten_dropped, 0);
        agent.release().await.unwrap();
        let report = r.prune(false, Duration::ZERO, &NoProgress).await.unwrap();
        assert_eq!(report.deleted.chunks as usize, n, "{report:?}");
        assert_eq!(report.forgotten_dropped, 1);
        assert_eq!(chunk_count(&r).await, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_bin_left_filling_by_a_killed_prune_is_finished_by_the_next() {
        let t = tempfile::tempdir().unwrap();
        let r = repo(t.path());
        let a = backup(t.path(), &r, "a", &noise(3 << 16, 4)).await;
        let k = backup(t.path(), &r, "k", &noise(2 << 16, 5)).await;
        let chunks_a = {
            let m = r.manifest(&a).await.unwrap();
            r.manifest_chunks(&a, &m).await.unwrap()
        };
        r.forget_snapshot(&a).await.unwrap();
        // A prune cut short: its record says filling, one chunk moved, no lease left.
        let rec = BinRecord {
            format: RECORD_FORMAT,
            state: BinState::Filling,
            started: jiff::Timestamp::now(),
            waiting_for: Vec::new(),
            waiting_for_text: Vec::new(),
        };
        r.put_bin_record("1-cut", &rec).await.unwrap();
        r.store().set_aside("1-cut", &chunks_a[0]).await.unwrap();
        // Another bin without even its record (cut between mkdir and record is impossible,
        // but a lost record must not lose its chunks either way).
        let ck = {
            let m = r.manifest(&k).await.unwrap();
            r.manifest_chunks(&k, &m).await.unwrap()
        };
        r.store().set_aside("2-lost", &ck[0]).await.unwrap();
        assert!(r.verify(None, &NoProgress).await.unwrap().is_clean());
        let report = r.prune(false, Duration::ZERO, &NoProgress).await.unwrap();
        assert_eq!(report.deleted.chunks as usize, chunks_a.len(), "{report:?}");
        assert_eq!(report.put_back, 1, "k's chunk goes back: {report:?}");
        assert!(r.store().list_bins().await.unwrap().is_empty());
        assert!(r.verify(None, &NoProgress).await.unwrap().is_clean());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn one_prune_at_a_time_and_dry_runs_change_nothing() {
        let t = tempfile::tempdir().unwrap();
        let r = repo(t.path());
        let a = backup(t.path(), &r, "a", &noise(2 << 16, 6)).await;
        r.forget_snapshot(&a).await.unwrap();
        let n = chunk_count(&r).await;
        let dry = r.prune(true, Duration::ZERO, &NoProgress).await.unwrap();
        assert_eq!(dry.deleted.chunks as usize, n);
        assert_eq!(chunk_count(&r).await, n);
        assert_eq!(
            r.store().list_records(Area::Forgotten).await.unwrap().len(),
            1
        );
        let other = r
            .take_lease(
                random_name(LeaseKind::Prune),
                LeaseKind::Prune,
                "prune".into(),
                Vec::new(),
            )
            .await
            .unwrap();
        let e = r
            .prune(false, Duration::ZERO, &NoProgress)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("another prune is running"), "{e}");
        assert_eq!(chunk_count(&r).await, n);
        other.release().await.unwrap();
        let _: Arc<dyn crate::repo::ChunkStore> = r.store().clone();
    }
}
