//! Kept copies: what opening a snapshot reads from the store (its manifest, its config object
//! and its disks' block table pieces), copied to a local folder by a media agent for every
//! snapshot it serves. A restart while the store is away opens the snapshot from them, so the
//! agent's mounts are served (cached and overlay data at once; the rest once the store is
//! back) instead of being left out until the next start (decision 0031, "A restart during an
//! outage").
//!
//! Layout of the folder (the agent's `state/snapshots/`):
//! ```text
//! <snapshot id>/manifest         the manifest's bytes as the store holds them
//! <snapshot id>/<object id>      a config or block table object, as stored (compressed)
//! ```
//! Owns: writing a copy once (durably: written, fdatasynced, renamed, its folder fsynced, so
//! a mount that answered survives a power cut with its copies), reading one back, and removing
//! the folders of snapshots no mount serves.
//! Must not: trust a copy: every copy is checked against its name exactly as the store's
//! bytes are (a manifest hashes to its id, an object decodes and hashes to its id). Named by
//! their content, the copies are the store's objects, so the repository's read path reads
//! them first (a restart opens its mounts with no GET) and fetches only what is not kept.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::manifest::SnapshotId;
use super::{blocking, RepoError};
use crate::durable;

const MANIFEST: &str = "manifest";

/// The kept copies' folder.
#[derive(Debug, Clone)]
pub struct KeptCopies {
    dir: PathBuf,
}

impl KeptCopies {
    /// Copies kept under `dir` (made when the first copy is written).
    pub fn new(dir: impl Into<PathBuf>) -> KeptCopies {
        KeptCopies { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn folder(&self, snapshot: &SnapshotId) -> PathBuf {
        self.dir.join(snapshot.to_string())
    }

    /// Keeps `bytes` as `name` of `snapshot`, unless a copy is there already (copies are
    /// named by their content, so one there is the same).
    pub(crate) async fn keep(
        &self,
        snapshot: &SnapshotId,
        name: &str,
        bytes: &Bytes,
    ) -> Result<(), RepoError> {
        let folder = self.folder(snapshot);
        let path = folder.join(name);
        let bytes = bytes.clone();
        blocking(move || {
            if path.exists() {
                return Ok(());
            }
            let io = |e| RepoError::io(&path, e);
            durable::create_dir_all(&folder).map_err(io)?;
            durable::put_via(&folder, &path, &bytes).map_err(io)?;
            durable::fsync_dir(&folder).map_err(io)
        })
        .await
    }

    /// The copy `name` of `snapshot`, if one was kept and can be read.
    pub(crate) async fn get(&self, snapshot: &SnapshotId, name: &str) -> Option<Bytes> {
        let path = self.folder(snapshot).join(name);
        blocking(move || match fs::read(&path) {
            Ok(v) => Ok(Some(Bytes::from(v))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => {
                tracing::warn!(copy = %path.display(), error = %e, "a kept copy cannot be read");
                Ok(None)
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Removes a copy that failed its check, so that the next success writes a good one.
    pub(crate) async fn remove(&self, snapshot: &SnapshotId, name: &str) {
        let path = self.folder(snapshot).join(name);
        let _ = blocking(move || {
            let _ = fs::remove_file(&path);
            Ok(())
        })
        .await;
    }

    /// Removes the copies of every snapshot not in `serving` (and what a cut-short write
    /// left); returns the snapshots whose copies went.
    pub fn sweep(&self, serving: &BTreeSet<SnapshotId>) -> std::io::Result<Vec<String>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut gone = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let text = name.to_string_lossy();
            let served = SnapshotId::from_hex(&text).is_some_and(|id| serving.contains(&id));
            if served {
                durable::remove_tmp_files(&entry.path())?;
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
            gone.push(text.into_owned());
        }
        if !gone.is_empty() {
            durable::fsync_dir(&self.dir)?;
        }
        Ok(gone)
    }

    pub(crate) const MANIFEST: &'static str = MANIFEST;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::repo::{BackupOptions, ChunkSize, NoProgress, RepoLocation, Repository, S3Config};

    /// A repository in `dir/repo` holding one backup of a 3-block disk; its snapshot id.
    pub(crate) async fn backed_up(dir: &Path) -> (Repository, SnapshotId) {
        let repo = Repository::init(&dir.join("repo"), ChunkSize::new(65536).unwrap()).unwrap();
        let folder = dir.join("vm");
        fs::create_dir_all(&folder).unwrap();
        let disk: Vec<u8> = (0..3 * 65536u32).map(|i| (i % 251) as u8).collect();
        fs::write(folder.join("d.img"), disk).unwrap();
        fs::write(
            folder.join("vm.xml"),
            "<domain type='kvm'><name>vm</name><memory>1024</memory><devices>\
             <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='d.img'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        )
        .unwrap();
        let opts = BackupOptions::from_config_file(&folder.join("vm.xml"), &[]).unwrap();
        let id = repo.backup(&opts, &NoProgress).await.unwrap().snapshot;
        (repo, id)
    }

    /// What the config and the block tables say, opened through `kept`.
    async fn opened(repo: &Repository, id: &SnapshotId, kept: &KeptCopies) -> (Bytes, u64) {
        let s = repo.snapshot_kept(id, kept).await.unwrap();
        let config = s.config_bytes().await.unwrap();
        let disk = s.disk(0).await.unwrap();
        (config, disk.block_count())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_snapshot_opens_from_its_kept_copies_with_no_fetch_and_through_an_outage() {
        let t = tempfile::tempdir().unwrap();
        let (repo, id) = backed_up(t.path()).await;
        let kept = KeptCopies::new(t.path().join("kept"));
        let before = opened(&repo, &id, &kept).await;
        let fetches = repo.stats().fetches;
        assert!(kept.dir().join(id.to_string()).join("manifest").is_file());
        // Kept: opened again with no fetch.
        assert_eq!(opened(&repo, &id, &kept).await, before);
        assert_eq!(repo.stats().fetches, fetches);

        // Away: the plain open fails as unreachable, the kept one serves the same.
        fs::rename(t.path().join("repo"), t.path().join("away")).unwrap();
        let e = repo.snapshot(&id).await.unwrap_err();
        assert!(e.is_outage(), "{e}");
        assert_eq!(opened(&repo, &id, &kept).await, before);

        // A damaged copy is never served: removed, and the object fetched (here: the store is
        // away, so the outage shows).
        let folder = kept.dir().join(id.to_string());
        let object = fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap() != "manifest")
            .unwrap();
        let mut bytes = fs::read(&object).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&object, &bytes).unwrap();
        let s = repo.snapshot_kept(&id, &kept).await.unwrap();
        let e = match (s.config_bytes().await, s.disk(0).await) {
            (Err(e), _) | (_, Err(e)) => e,
            _ => panic!("a damaged copy was served"),
        };
        assert!(e.is_outage(), "{e}");
        assert!(!object.exists(), "the damaged copy is removed");

        // Back: read from the store again (and the copy written anew).
        fs::rename(t.path().join("away"), t.path().join("repo")).unwrap();
        assert_eq!(opened(&repo, &id, &kept).await, before);
        assert!(repo.stats().fetches > fetches);
        assert!(object.exists());

        // Only served snapshots keep their copies.
        assert!(kept.sweep(&[id].into()).unwrap().is_empty());
        assert_eq!(kept.sweep(&BTreeSet::new()).unwrap(), vec![id.to_string()]);
        assert!(!folder.exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_agent_opens_a_repository_it_remembers_while_it_is_away_and_no_other() {
        let t = tempfile::tempdir().unwrap();
        let (repo, _) = backed_up(t.path()).await;
        let dir = t.path().join("repo");
        let remembered = t.path().join("repository.toml");
        let (loc, s3) = (RepoLocation::Dir(dir.clone()), S3Config::default());
        let (opened, away) = Repository::open_or_remembered(&loc, &s3, &remembered)
            .await
            .unwrap();
        assert!(away.is_none());
        opened.remember(&remembered).await.unwrap();
        assert!(remembered.is_file());

        fs::rename(&dir, t.path().join("away")).unwrap();
        let (opened, away) = Repository::open_or_remembered(&loc, &s3, &remembered)
            .await
            .unwrap();
        assert!(away.is_some());
        assert_eq!(opened.id(), repo.id());
        assert_eq!(opened.chunk_size(), repo.chunk_size());

        // Another location is not what the agent remembers.
        let other = RepoLocation::Dir(t.path().join("elsewhere"));
        assert!(Repository::open_or_remembered(&other, &s3, &remembered)
            .await
            .is_err());
        // Without the file, an unreachable repository is an error, as it always was.
        fs::remove_file(&remembered).unwrap();
        assert!(Repository::open_or_remembered(&loc, &s3, &remembered)
            .await
            .is_err());
    }
}
