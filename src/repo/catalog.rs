//! The snapshot catalog: listing snapshots and resolving what an operator types to one snapshot.
//!
//! An operator names a snapshot as `VM@TIME` (RFC 3339, UTC, whole seconds), as a unique prefix
//! of its id (at least 4 hex digits), or as a VM name, which means that VM's latest snapshot; with
//! `--at TIME`, a VM name means its latest snapshot taken at or before TIME.

use futures::StreamExt;

use super::manifest::{format_time, Manifest, SnapshotId, VmInfo};
use super::{RepoError, Repository};

/// How many manifests a listing reads at once.
const LIST_CONCURRENCY: usize = 16;
/// Shortest id prefix accepted, so that a short VM name is not taken for an id.
const MIN_ID_PREFIX: usize = 4;

/// A snapshot as listings show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    /// `VM@TIME`.
    pub name: String,
    pub vm: VmInfo,
    pub taken: jiff::Timestamp,
    pub parent: Option<SnapshotId>,
    pub disks: Vec<DiskInfo>,
    /// Sum of the disks' sizes.
    pub size: u64,
    /// Bytes in non-zero blocks.
    pub allocated: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskInfo {
    pub name: String,
    pub device: String,
    pub size: u64,
}

impl SnapshotInfo {
    pub fn from_manifest(id: SnapshotId, m: &Manifest) -> Self {
        let cs = m.chunk_size.as_u64();
        SnapshotInfo {
            id,
            name: m.display_name(),
            vm: m.vm.clone(),
            taken: m.taken,
            parent: m.parent,
            disks: m
                .disks
                .iter()
                .map(|d| DiskInfo {
                    name: d.name.clone(),
                    device: d.device.clone(),
                    size: d.size,
                })
                .collect(),
            size: m.disks.iter().map(|d| d.size).sum(),
            allocated: m
                .disks
                .iter()
                .map(|d| d.allocated_blocks.saturating_mul(cs).min(d.size))
                .sum(),
        }
    }
}

/// What the operator typed to name a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpec {
    pub text: String,
    pub at: Option<jiff::Timestamp>,
}

impl SnapshotSpec {
    pub fn new(text: &str, at: Option<jiff::Timestamp>) -> Self {
        SnapshotSpec {
            text: text.trim().to_string(),
            at,
        }
    }
}

/// Parses an RFC 3339 time (`2026-11-22T04:03:41Z`, or with an offset).
pub fn parse_time(text: &str) -> Result<jiff::Timestamp, RepoError> {
    text.trim().parse::<jiff::Timestamp>().map_err(|e| {
        RepoError::Invalid(format!(
            "{text:?} is not an RFC 3339 time such as 2026-11-22T04:03:41Z: {e}"
        ))
    })
}

impl Repository {
    /// Every readable snapshot, oldest first, and the ids of manifests that could not be read.
    pub async fn list_snapshots(
        &self,
    ) -> Result<(Vec<SnapshotInfo>, Vec<(SnapshotId, RepoError)>), RepoError> {
        let ids = self.store().list_manifests().await?;
        // What an earlier listing read and checked (manifests never change), for the ids
        // listed now; only the others are read.
        let mut good = Vec::new();
        let mut new = Vec::new();
        {
            let mut known = self.listed();
            let listed: std::collections::HashSet<SnapshotId> = ids.iter().copied().collect();
            known.retain(|id, _| listed.contains(id));
            for id in ids {
                match known.get(&id) {
                    Some(info) => good.push(info.clone()),
                    None => new.push(id),
                }
            }
        }
        let results: Vec<(SnapshotId, Result<Manifest, RepoError>)> = futures::stream::iter(new)
            .map(|id| async move { (id, self.manifest(&id).await) })
            .buffer_unordered(LIST_CONCURRENCY)
            .collect()
            .await;
        let mut bad = Vec::new();
        for (id, r) in results {
            match r {
                Ok(m) => {
                    let info = SnapshotInfo::from_manifest(id, &m);
                    self.listed().insert(id, info.clone());
                    good.push(info);
                }
                // Listed, then gone: forgotten meanwhile (or Garage still listing a deleted key).
                Err(RepoError::NoSnapshot { .. }) => {}
                Err(e) => bad.push((id, e)),
            }
        }
        good.sort_by(|a, b| (a.taken, &a.vm.name, a.id).cmp(&(b.taken, &b.vm.name, b.id)));
        bad.sort_by_key(|(id, _)| *id);
        Ok((good, bad))
    }

    /// Resolves what the operator typed to exactly one snapshot.
    ///
    /// When some manifests cannot be read, only exact names resolve (`VM@TIME`, an id prefix
    /// that matches no unreadable manifest): "the latest" could be one of the unreadable ones,
    /// and silently taking an older snapshot would restore the wrong point in time.
    pub async fn resolve(&self, spec: &SnapshotSpec) -> Result<SnapshotInfo, RepoError> {
        let (all, bad) = self.list_snapshots().await?;
        let found = resolve_in(&all, spec)?;
        if bad.is_empty() {
            return Ok(found.clone());
        }
        let text = spec.text.to_ascii_lowercase();
        let by_time = spec
            .text
            .rsplit_once('@')
            .is_some_and(|(_, t)| parse_time(t).is_ok());
        let by_id = found.id.to_string().starts_with(&text)
            && !bad.iter().any(|(id, _)| id.to_string().starts_with(&text));
        if by_time || by_id {
            return Ok(found.clone());
        }
        let (id, e) = &bad[0];
        Err(RepoError::Invalid(format!(
            "{} means the latest snapshot, but {} snapshot manifest(s) cannot be read (e.g. {}: {e}) and a newer one may be among them; name the snapshot as VM@TIME or by id, and run `livemount verify`",
            spec.text,
            bad.len(),
            id.short()
        )))
    }
}

/// Resolution over a listing (pure, for tests).
pub(crate) fn resolve_in<'a>(
    all: &'a [SnapshotInfo],
    spec: &SnapshotSpec,
) -> Result<&'a SnapshotInfo, RepoError> {
    let text = spec.text.as_str();
    let none = |hint: String| RepoError::NoSnapshot {
        spec: text.to_string(),
        hint,
    };
    if text.is_empty() {
        return Err(RepoError::Invalid("a snapshot name is empty".into()));
    }
    // VM@TIME, when what follows the last '@' is a time.
    if let Some((vm, time)) = text.rsplit_once('@') {
        if let Ok(t) = parse_time(time) {
            if spec.at.is_some() {
                return Err(RepoError::Invalid(format!(
                    "{text} names a time already; give either VM@TIME or VM --at TIME"
                )));
            }
            let t = format_time(t);
            return all
                .iter()
                .rev()
                .find(|s| s.vm.name == vm && format_time(s.taken) == t)
                .ok_or_else(|| none(list_hint(all, vm)));
        }
    }
    let by_vm: Vec<&SnapshotInfo> = all
        .iter()
        .filter(|s| s.vm.name == text)
        .filter(|s| spec.at.is_none_or(|at| s.taken <= at))
        .collect();
    let is_prefix = text.len() >= MIN_ID_PREFIX && text.chars().all(|c| c.is_ascii_hexdigit());
    let by_id: Vec<&SnapshotInfo> = if is_prefix && spec.at.is_none() {
        let lower = text.to_ascii_lowercase();
        all.iter()
            .filter(|s| s.id.to_string().starts_with(&lower))
            .collect()
    } else {
        Vec::new()
    };
    match (by_vm.last(), by_id.as_slice()) {
        (Some(_), [_, ..]) => Err(RepoError::AmbiguousSnapshot {
            spec: text.to_string(),
            matches: format!("VM {text} and snapshot id {}", by_id[0].id.short()),
        }),
        (Some(latest), []) => Ok(latest),
        (None, [one]) => Ok(one),
        (None, [_, _, ..]) => Err(RepoError::AmbiguousSnapshot {
            spec: text.to_string(),
            matches: by_id
                .iter()
                .map(|s| format!("{} ({})", s.id.short(), s.name))
                .collect::<Vec<_>>()
                .join(", "),
        }),
        (None, []) => {
            if let Some(at) = spec.at {
                if all.iter().any(|s| s.vm.name == text) {
                    return Err(none(format!(
                        " at or before {}; the oldest of {text} is {}",
                        format_time(at),
                        all.iter()
                            .find(|s| s.vm.name == text)
                            .map(|s| s.name.clone())
                            .unwrap_or_default()
                    )));
                }
            }
            Err(none(list_hint(all, text)))
        }
    }
}

fn list_hint(all: &[SnapshotInfo], vm: &str) -> String {
    let of_vm: Vec<&str> = all
        .iter()
        .filter(|s| s.vm.name == vm)
        .map(|s| s.name.as_str())
        .collect();
    if of_vm.is_empty() {
        "; `livemount backups` lists the snapshots".to_string()
    } else {
        format!("; snapshots of {vm}: {}", of_vm.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::ChunkId;
    use crate::vmconfig::Hypervisor;

    #[tokio::test(flavor = "multi_thread")]
    async fn a_listing_reads_only_the_manifests_no_listing_read_before() {
        let t = tempfile::tempdir().unwrap();
        let (repo, id) = crate::repo::kept::tests::backed_up(t.path()).await;
        let (all, _) = repo.list_snapshots().await.unwrap();
        assert_eq!(all.len(), 1);
        let fetches = repo.stats().fetches;
        for _ in 0..5 {
            let found = repo.resolve(&SnapshotSpec::new("vm", None)).await.unwrap();
            assert_eq!(found.id, id);
        }
        assert_eq!(repo.stats().fetches, fetches, "no manifest read again");
        // Forgotten: gone from the listing at once.
        repo.forget_snapshot(&id).await.unwrap();
        assert!(repo.list_snapshots().await.unwrap().0.is_empty());
        assert!(repo.listed().is_empty());
    }

    fn info(vm: &str, time: &str, seed: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: SnapshotId(ChunkId::of(seed.as_bytes())),
            name: format!("{vm}@{time}"),
            vm: VmInfo {
                name: vm.into(),
                uuid: None,
                hypervisor: Hypervisor::Kvm,
            },
            taken: time.parse().unwrap(),
            parent: None,
            disks: vec![],
            size: 0,
            allocated: 0,
        }
    }

    fn catalog() -> Vec<SnapshotInfo> {
        vec![
            info("web01", "2026-11-20T10:00:00Z", "a"),
            info("web01", "2026-11-21T10:00:00Z", "b"),
            info("db", "2026-11-21T11:00:00Z", "c"),
        ]
    }

    fn resolve(text: &str, at: Option<&str>) -> Result<String, String> {
        let all = catalog();
        let spec = SnapshotSpec::new(text, at.map(|t| t.parse().unwrap()));
        resolve_in(&all, &spec)
            .map(|s| s.name.clone())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn vm_at_time_names_one_snapshot() {
        assert_eq!(
            resolve("web01@2026-11-20T10:00:00Z", None).unwrap(),
            "web01@2026-11-20T10:00:00Z"
        );
        let err = resolve("web01@2026-11-20T10:00:01Z", None).unwrap_err();
        assert!(
            err.contains("snapshots of web01: web01@2026-11-20T10:00:00Z"),
            "{err}"
        );
        assert!(resolve("web01@2026-11-20T10:00:00Z", Some("2026-11-21T00:00:00Z")).is_err());
    }

    #[test]
    fn vm_name_means_latest_or_latest_at_or_before() {
        assert_eq!(
            resolve("web01", None).unwrap(),
            "web01@2026-11-21T10:00:00Z"
        );
        assert_eq!(
            resolve("web01", Some("2026-11-21T09:59:59Z")).unwrap(),
            "web01@2026-11-20T10:00:00Z"
        );
        assert_eq!(
            resolve("web01", Some("2026-11-21T10:00:00Z")).unwrap(),
            "web01@2026-11-21T10:00:00Z"
        );
        let err = resolve("web01", Some("2026-11-01T00:00:00Z")).unwrap_err();
        assert!(err.contains("oldest of web01"), "{err}");
        let err = resolve("nosuchvm", None).unwrap_err();
        assert!(err.contains("livemount backups"), "{err}");
    }

    #[test]
    fn id_prefix_must_be_unique() {
        let all = catalog();
        let id = all[2].id.to_string();
        assert_eq!(resolve(&id[..8], None).unwrap(), "db@2026-11-21T11:00:00Z");
        assert_eq!(
            resolve(&id[..8].to_uppercase(), None).unwrap(),
            "db@2026-11-21T11:00:00Z"
        );
        assert!(resolve(&id[..3], None).is_err(), "3 digits is too short");
        assert!(resolve("", None).is_err());
    }
}
