//! Verify: re-read every chunk a set of snapshots references and check it against its digest.
//!
//! Reports each missing or corrupt chunk once, with every snapshot and disk that uses it, and
//! every manifest that cannot be read. Never stops at the first problem: an operator wants the
//! whole list in one run.

use std::collections::HashMap;
use std::time::Instant;

use futures::StreamExt;

use super::manifest::{SnapshotId, MAX_CONFIG_BYTES};
use super::{ChunkId, Progress, RepoError, Repository, SnapshotInfo};

/// Chunks verified at once.
const VERIFY_CONCURRENCY: usize = 8;

/// What went wrong with a chunk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "detail")]
pub enum ChunkProblem {
    Missing,
    Corrupt(String),
    /// It could not be read (an I/O error); it may be fine.
    Unreadable(String),
}

/// A bad chunk and who uses it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BadChunk {
    pub chunk: ChunkId,
    pub problem: ChunkProblem,
    /// `SNAPSHOT: what` pairs, e.g. `web01@2026-11-22T04:03:41Z: disk web01.vmdk`.
    pub used_by: Vec<String>,
}

/// The outcome of a verify run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub snapshots: Vec<String>,
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub bad_chunks: Vec<BadChunk>,
    /// Manifests that could not be read at all, with why.
    pub bad_snapshots: Vec<(String, String)>,
    pub seconds: f64,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.bad_chunks.is_empty() && self.bad_snapshots.is_empty()
    }
}

/// Who uses a chunk: (index into the snapshot list, what within it).
type Uses = Vec<(usize, String)>;

impl Repository {
    /// Verifies one snapshot, or every snapshot when `only` is `None`.
    pub async fn verify(
        &self,
        only: Option<SnapshotId>,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, RepoError> {
        let started = Instant::now();
        let (mut snaps, mut bad_snapshots): (Vec<SnapshotInfo>, Vec<(String, String)>) = match only
        {
            Some(id) => (
                vec![SnapshotInfo::from_manifest(id, &self.manifest(&id).await?)],
                vec![],
            ),
            None => {
                let (good, bad) = self.list_snapshots().await?;
                let bad = bad
                    .into_iter()
                    .map(|(id, e)| (id.to_string(), e.to_string()))
                    .collect();
                (good, bad)
            }
        };
        snaps.sort_by_key(|s| s.taken);

        // Gather every chunk and who uses it. Table pieces are read (and so verified) here.
        let mut uses: HashMap<ChunkId, Uses> = HashMap::new();
        let mut max_len: HashMap<ChunkId, usize> = HashMap::new();
        let mut bad: HashMap<ChunkId, ChunkProblem> = HashMap::new();
        for (si, s) in snaps.iter().enumerate() {
            let m = match self.manifest(&s.id).await {
                Ok(m) => m,
                Err(e) => {
                    bad_snapshots.push((s.name.clone(), e.to_string()));
                    continue;
                }
            };
            uses.entry(m.config.chunk)
                .or_default()
                .push((si, format!("config {}", m.config.file_name)));
            max_len.insert(m.config.chunk, MAX_CONFIG_BYTES);
            for d in &m.disks {
                for piece in &d.table {
                    uses.entry(*piece)
                        .or_default()
                        .push((si, format!("block table of disk {}", d.name)));
                }
                match self.block_table(&s.id, d, None).await {
                    Ok(table) => {
                        for c in table.chunks() {
                            let u = uses.entry(c).or_default();
                            if u.last().is_none_or(|(i, _)| *i != si) {
                                u.push((si, format!("disk {}", d.name)));
                            }
                        }
                    }
                    Err(e) => {
                        // Find which piece is at fault, so the report names it.
                        for piece in &d.table {
                            if let Err(pe) =
                                self.read_object(piece, self.chunk_size().as_usize()).await
                            {
                                bad.insert(*piece, problem_of(&pe));
                            }
                        }
                        if !d.table.iter().any(|p| bad.contains_key(p)) {
                            bad_snapshots.push((s.name.clone(), e.to_string()));
                        }
                    }
                }
            }
        }

        progress.set_total(uses.len() as u64);
        let cs = self.chunk_size().as_usize();
        let todo: Vec<ChunkId> = uses
            .keys()
            .filter(|c| !bad.contains_key(c))
            .copied()
            .collect();
        let mut checks = futures::stream::iter(todo)
            .map(|c| {
                let limit = max_len.get(&c).copied().unwrap_or(cs);
                async move { (c, self.read_object(&c, limit).await) }
            })
            .buffer_unordered(VERIFY_CONCURRENCY);
        let mut chunks_checked = bad.len() as u64;
        let mut bytes_checked = 0u64;
        progress.advance(bad.len() as u64);
        while let Some((c, r)) = checks.next().await {
            chunks_checked += 1;
            progress.advance(1);
            match r {
                Ok(bytes) => bytes_checked += bytes.len() as u64,
                Err(e) => {
                    tracing::error!(chunk = %c, error = %e, "verify: bad chunk");
                    bad.insert(c, problem_of(&e));
                }
            }
        }

        let mut bad_chunks: Vec<BadChunk> = bad
            .into_iter()
            .map(|(chunk, problem)| {
                let mut used_by: Vec<String> = uses
                    .get(&chunk)
                    .map(|u| {
                        u.iter()
                            .map(|(si, what)| format!("{}: {what}", snaps[*si].name))
                            .collect()
                    })
                    .unwrap_or_default();
                used_by.dedup();
                BadChunk {
                    chunk,
                    problem,
                    used_by,
                }
            })
            .collect();
        bad_chunks.sort_by_key(|b| b.chunk);
        Ok(VerifyReport {
            snapshots: snaps.iter().map(|s| s.name.clone()).collect(),
            chunks_checked,
            bytes_checked,
            bad_chunks,
            bad_snapshots,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

fn problem_of(e: &RepoError) -> ChunkProblem {
    match e {
        RepoError::MissingChunk { .. } => ChunkProblem::Missing,
        RepoError::CorruptChunk { what, .. } => ChunkProblem::Corrupt(what.clone()),
        other => ChunkProblem::Unreadable(other.to_string()),
    }
}
