//! Boot profiles: what a VM reads while it boots, learned from its earlier boots.
//!
//! Owns: the profile file format (documented in `profiles/README.md`), merging a boot's trace
//! into a profile, ranking, choosing the boot set to pre-stage, finding a donor profile for a
//! VM that has none (by shared chunk digests), and the profile files in the state directory
//! (`profiles/VM.json`, each replaced whole and durably: [`crate::durable::replace`]).
//! Must not: fetch anything or know about mounts and NFS: [`crate::prestage`] records traces
//! and warms the cache; this module only decides.
//!
//! Ranking: each block has a score, the decayed count of the boots that read it: at every merge
//! the old scores are multiplied by [`DECAY`] and the blocks of the new boot get +1. A block read
//! by every boot tends to `1 / (1 - DECAY)`; a block no boot reads any more fades and is dropped
//! below [`DROP_BELOW`] (after four boots without it). Each block also keeps when it is first read
//! in a boot (milliseconds from the boot's first read, averaged over boots); the boot set is
//! pre-staged in that order, so the blocks needed first arrive first.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::durable;
use crate::repo::ChunkId;

/// The profile file format this build reads and writes.
pub const FORMAT: u32 = 1;
/// Old scores are multiplied by this at each merge.
pub const DECAY: f64 = 0.6;
/// Blocks whose score falls below this are dropped from the profile.
pub const DROP_BELOW: f64 = 0.15;

/// One block as a boot first read it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRead {
    /// The disk's file name in the mount (stable across the VM's snapshots).
    pub disk: String,
    /// Block (chunk-sized) index in the disk.
    pub block: u64,
    /// The block's chunk in the snapshot that booted.
    pub chunk: ChunkId,
    /// Milliseconds from the boot's first read to this block's first read.
    pub at_ms: u64,
}

/// What one boot read, in order of first access.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootTrace {
    pub reads: Vec<TraceRead>,
}

/// One block of a profile.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileBlock {
    pub disk: String,
    pub block: u64,
    /// The chunk this block held in the latest boot that read it.
    pub chunk: ChunkId,
    /// Decayed count of the boots that read it.
    pub score: f64,
    /// Milliseconds from a boot's first read to this block's, averaged over the boots.
    pub first_ms: u64,
}

/// A VM's boot profile, as `profiles/VM.json` holds it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub format: u32,
    /// The VM's name, as snapshots name it.
    pub vm: String,
    /// Bytes per block (the repository's chunk size when the profile was learned).
    pub chunk_size: u64,
    /// Boots merged so far.
    pub boots: u32,
    pub updated: jiff::Timestamp,
    /// Ordered by `first_ms`, then disk and block.
    pub blocks: Vec<ProfileBlock>,
}

impl Profile {
    pub fn new(vm: &str, chunk_size: u64, now: jiff::Timestamp) -> Profile {
        Profile {
            format: FORMAT,
            vm: vm.to_string(),
            chunk_size,
            boots: 0,
            updated: now,
            blocks: Vec::new(),
        }
    }

    /// Merges one boot into the profile (pure: the result depends on the arguments only).
    pub fn merge(&self, trace: &BootTrace, now: jiff::Timestamp) -> Profile {
        let mut blocks: HashMap<(String, u64), ProfileBlock> = self
            .blocks
            .iter()
            .map(|b| {
                let mut b = b.clone();
                b.score *= DECAY;
                ((b.disk.clone(), b.block), b)
            })
            .collect();
        let mut seen = HashSet::new();
        for r in &trace.reads {
            let key = (r.disk.clone(), r.block);
            if !seen.insert(key.clone()) {
                continue; // a trace lists first reads only; tolerate repeats
            }
            match blocks.get_mut(&key) {
                Some(b) => {
                    b.score += 1.0;
                    b.chunk = r.chunk;
                    b.first_ms = (b.first_ms + r.at_ms).div_ceil(2);
                }
                None => {
                    blocks.insert(
                        key,
                        ProfileBlock {
                            disk: r.disk.clone(),
                            block: r.block,
                            chunk: r.chunk,
                            score: 1.0,
                            first_ms: r.at_ms,
                        },
                    );
                }
            }
        }
        let mut blocks: Vec<ProfileBlock> = blocks
            .into_values()
            .filter(|b| b.score >= DROP_BELOW)
            .map(|mut b| {
                // Rounded, so that files stay readable and merges reproducible.
                b.score = (b.score * 1e4).round() / 1e4;
                b
            })
            .collect();
        sort_by_first_read(&mut blocks);
        Profile {
            format: FORMAT,
            vm: self.vm.clone(),
            chunk_size: self.chunk_size,
            boots: self.boots.saturating_add(1),
            updated: now,
            blocks,
        }
    }

    /// The blocks to pre-stage, at most `max_blocks` of them: the best-ranked first (ties: the
    /// earlier read), then put back in first-read order.
    pub fn boot_set(&self, max_blocks: usize) -> Vec<&ProfileBlock> {
        let mut ranked: Vec<&ProfileBlock> = self.blocks.iter().collect();
        ranked.sort_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(a.first_ms.cmp(&b.first_ms))
                .then_with(|| (&a.disk, a.block).cmp(&(&b.disk, b.block)))
        });
        ranked.truncate(max_blocks);
        ranked.sort_by(|a, b| {
            a.first_ms
                .cmp(&b.first_ms)
                .then_with(|| (&a.disk, a.block).cmp(&(&b.disk, b.block)))
        });
        ranked
    }

    /// Checks a profile read from a file; the error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format {} is not supported (this livemount reads format {FORMAT})",
                self.format
            ));
        }
        if self.vm.is_empty() {
            return Err("the VM name is empty".into());
        }
        if !self.chunk_size.is_power_of_two() {
            return Err(format!(
                "chunk_size {} is not a power of two",
                self.chunk_size
            ));
        }
        if let Some(b) = self
            .blocks
            .iter()
            .find(|b| !(b.score.is_finite() && b.score > 0.0))
        {
            return Err(format!(
                "block {} of {} has score {}, not a positive number",
                b.block, b.disk, b.score
            ));
        }
        Ok(())
    }
}

fn sort_by_first_read(blocks: &mut [ProfileBlock]) {
    blocks.sort_by(|a, b| {
        a.first_ms
            .cmp(&b.first_ms)
            .then_with(|| (&a.disk, a.block).cmp(&(&b.disk, b.block)))
    });
}

/// A snapshot's blocks as pre-staging sees them: each disk's chunk per block.
pub trait BlockMap {
    /// The chunk of `block` of the disk named `disk`; `None` for a zero block, a block past the
    /// end, or a disk the snapshot does not have.
    fn chunk_at(&self, disk: &str, block: u64) -> Option<ChunkId>;
    /// Whether any disk of the snapshot holds `chunk`.
    fn has_chunk(&self, chunk: &ChunkId) -> bool;
}

/// Where a mount's boot set comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Source {
    /// The VM's own profile.
    Own { vm: String },
    /// Another VM's profile, sharing `shared_percent` of its boot chunks with this snapshot.
    Borrowed { vm: String, shared_percent: u32 },
}

/// Smallest share of a donor's boot chunks a snapshot must hold to borrow its profile.
pub const MIN_SHARED: f64 = 0.5;

/// The chunks to pre-stage for a snapshot of VM `vm`, in order, without repeats, at most
/// `max_blocks`: from the VM's own profile (each profiled block's chunk in *this* snapshot)
/// or, when it has none, from the profile sharing most of its boot chunks with the snapshot
/// (at least [`MIN_SHARED`]; the donor's chunks this snapshot holds).
pub fn plan(
    vm: &str,
    profiles: &[Profile],
    snapshot: &dyn BlockMap,
    max_blocks: usize,
) -> Option<(Source, Vec<ChunkId>)> {
    let mut seen = HashSet::new();
    if let Some(own) = profiles.iter().find(|p| p.vm == vm) {
        let chunks = own
            .boot_set(max_blocks)
            .into_iter()
            .filter_map(|b| snapshot.chunk_at(&b.disk, b.block))
            .filter(|c| seen.insert(*c))
            .collect();
        return Some((Source::Own { vm: vm.into() }, chunks));
    }
    let (donor, share) = profiles
        .iter()
        .filter(|p| !p.blocks.is_empty())
        .map(|p| {
            let held = p
                .blocks
                .iter()
                .filter(|b| snapshot.has_chunk(&b.chunk))
                .count();
            (p, held as f64 / p.blocks.len() as f64)
        })
        .filter(|(_, share)| *share >= MIN_SHARED)
        // Best share; ties to the name, so the choice does not depend on file order.
        .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.vm.cmp(&a.0.vm)))?;
    let chunks = donor
        .boot_set(max_blocks)
        .into_iter()
        .map(|b| b.chunk)
        .filter(|c| snapshot.has_chunk(c) && seen.insert(*c))
        .collect();
    Some((
        Source::Borrowed {
            vm: donor.vm.clone(),
            shared_percent: (share * 100.0).floor() as u32,
        },
        chunks,
    ))
}

/// The profile files of a state directory: `profiles/VM.json`.
#[derive(Debug, Clone)]
pub struct ProfileStore {
    dir: PathBuf,
}

/// Errors of profile files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("profile {path} is not valid: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("no boot profile for VM {vm:?}; `livemount profile list` shows the profiles")]
    NotFound { vm: String },
}

impl ProfileStore {
    /// The profiles of state directory `state` (the folder is made on the first save).
    pub fn new(state: &Path) -> ProfileStore {
        ProfileStore {
            dir: state.join("profiles"),
        }
    }

    /// The file of VM `vm`'s profile. VM names may hold any character; the file name keeps
    /// letters, digits, `-`, `_` and `.` and encodes the rest, so it is one safe component.
    pub fn path(&self, vm: &str) -> PathBuf {
        let mut name = String::new();
        for b in vm.bytes() {
            if b.is_ascii_alphanumeric()
                || matches!(b, b'-' | b'_')
                || (b == b'.' && !name.is_empty())
            {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02x}"));
            }
        }
        self.dir.join(format!("{name}.json"))
    }

    pub fn load(&self, vm: &str) -> Result<Option<Profile>, ProfileError> {
        let path = self.path(vm);
        match fs::read(&path) {
            Ok(bytes) => parse(&path, &bytes).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ProfileError::Io { path, source: e }),
        }
    }

    /// Every readable profile; unreadable files are reported by path, not fatal.
    pub fn list(&self) -> (Vec<Profile>, Vec<ProfileError>) {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (good, bad),
            Err(e) => {
                bad.push(ProfileError::Io {
                    path: self.dir.clone(),
                    source: e,
                });
                return (good, bad);
            }
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for path in paths {
            match fs::read(&path)
                .map_err(|e| ProfileError::Io {
                    path: path.clone(),
                    source: e,
                })
                .and_then(|b| parse(&path, &b))
            {
                Ok(p) => good.push(p),
                Err(e) => bad.push(e),
            }
        }
        (good, bad)
    }

    /// Writes a profile durably ([`durable::replace`]), replacing any earlier one.
    pub fn save(&self, p: &Profile) -> Result<PathBuf, ProfileError> {
        let path = self.path(&p.vm);
        let io = |source| ProfileError::Io {
            path: path.clone(),
            source,
        };
        durable::create_dir_all(&self.dir).map_err(io)?;
        let mut text = serde_json::to_vec_pretty(p).map_err(|e| ProfileError::Invalid {
            path: path.clone(),
            what: e.to_string(),
        })?;
        text.push(b'\n');
        durable::replace(&path, &text).map_err(io)?;
        Ok(path)
    }

    /// Removes VM `vm`'s profile.
    pub fn forget(&self, vm: &str) -> Result<(), ProfileError> {
        let path = self.path(vm);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ProfileError::NotFound { vm: vm.to_string() })
            }
            Err(e) => Err(ProfileError::Io { path, source: e }),
        }
    }
}

/// Parses and checks a profile file's bytes.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Profile, ProfileError> {
    let invalid = |what: String| ProfileError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    let p: Profile = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    p.validate().map_err(invalid)?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    fn chunk(n: u8) -> ChunkId {
        ChunkId([n; 32])
    }

    fn trace(reads: &[(&str, u64, u8, u64)]) -> BootTrace {
        BootTrace {
            reads: reads
                .iter()
                .map(|&(disk, block, c, at_ms)| TraceRead {
                    disk: disk.into(),
                    block,
                    chunk: chunk(c),
                    at_ms,
                })
                .collect(),
        }
    }

    /// Golden files: `testdata/profiles/boot-N.json` are traces of one VM's boots; merging them
    /// in order gives `testdata/profiles/merged.json` exactly. A change of ranking or format
    /// shows as a diff of that file (regenerate with LIVEMOUNT_BLESS=1 and review it).
    #[test]
    fn merging_boot_traces_matches_the_golden_profile() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/profiles");
        let mut p = Profile::new("web01", 1 << 20, t("2026-01-01T00:00:00Z"));
        for n in 1..=5 {
            let text = fs::read_to_string(dir.join(format!("boot-{n}.json"))).unwrap();
            let trace: BootTrace = serde_json::from_str(&text).unwrap();
            p = p.merge(&trace, t(&format!("2026-01-0{n}T12:00:00Z")));
        }
        let got = serde_json::to_string_pretty(&p).unwrap() + "\n";
        let golden = dir.join("merged.json");
        if std::env::var_os("LIVEMOUNT_BLESS").is_some() {
            fs::write(&golden, &got).unwrap();
        }
        assert_eq!(got, fs::read_to_string(&golden).unwrap());
        parse(&golden, got.as_bytes()).unwrap();
    }

    #[test]
    fn blocks_every_boot_reads_rank_first_and_blocks_no_boot_reads_fade_out() {
        let mut p = Profile::new("vm", 1 << 20, t("2026-01-01T00:00:00Z"));
        // The first boot also read block 9 (a one-off: an fsck, say).
        p = p.merge(
            &trace(&[
                ("a.img", 0, 1, 0),
                ("a.img", 9, 9, 50),
                ("a.img", 5, 5, 100),
            ]),
            t("2026-01-02T00:00:00Z"),
        );
        for day in 3..=7 {
            p = p.merge(
                &trace(&[("a.img", 0, 1, 0), ("a.img", 5, 5, 120)]),
                t(&format!("2026-01-0{day}T00:00:00Z")),
            );
            let nine = p.blocks.iter().find(|b| b.block == 9);
            // 0.6, 0.36, 0.216 then 0.13 < DROP_BELOW: gone after the fourth boot without it.
            assert_eq!(nine.is_some(), day < 6, "day {day}: {:?}", p.blocks);
        }
        assert_eq!(p.boots, 6);
        let zero = &p.blocks[0];
        assert_eq!((zero.block, zero.first_ms), (0, 0));
        assert!(zero.score > 2.0 && zero.score < 1.0 / (1.0 - DECAY));
        // Block 5: first read times are averaged towards recent boots.
        assert_eq!(p.blocks[1].block, 5);
        assert!((100..=120).contains(&p.blocks[1].first_ms));
    }

    #[test]
    fn the_boot_set_keeps_the_best_ranked_blocks_in_first_read_order() {
        let mut p = Profile::new("vm", 1 << 20, t("2026-01-01T00:00:00Z"));
        p = p.merge(&trace(&[("a", 1, 1, 10), ("a", 2, 2, 20)]), p.updated);
        p = p.merge(&trace(&[("a", 3, 3, 5), ("a", 2, 2, 20)]), p.updated);
        // Scores: block 2 1.6, block 3 1.0, block 1 0.6. First reads: 3 at 5, 1 at 10, 2 at 20.
        let order = |n| -> Vec<u64> { p.boot_set(n).iter().map(|b| b.block).collect() };
        assert_eq!(order(10), [3, 1, 2]);
        assert_eq!(
            order(2),
            [3, 2],
            "the weakest block is left out, order kept"
        );
        assert_eq!(order(1), [2]);
    }

    /// A snapshot: disk name -> chunk per block (0: a zero block).
    struct Snap(HashMap<String, Vec<u8>>);

    impl BlockMap for Snap {
        fn chunk_at(&self, disk: &str, block: u64) -> Option<ChunkId> {
            let c = *self.0.get(disk)?.get(block as usize)?;
            (c != 0).then(|| chunk(c))
        }
        fn has_chunk(&self, c: &ChunkId) -> bool {
            self.0.values().flatten().any(|&n| n != 0 && chunk(n) == *c)
        }
    }

    #[test]
    fn a_vm_uses_its_own_profile_at_this_snapshots_blocks() {
        let mut p = Profile::new("web01", 1 << 20, t("2026-01-01T00:00:00Z"));
        p = p.merge(
            &trace(&[("a.img", 2, 7, 0), ("a.img", 0, 8, 10), ("a.img", 1, 7, 20)]),
            p.updated,
        );
        // In this snapshot block 2 changed (chunk 4), block 0 is zero, block 1 holds chunk 7.
        let snap = Snap(HashMap::from([("a.img".to_string(), vec![0, 7, 4])]));
        let (src, chunks) = plan("web01", &[p], &snap, 100).unwrap();
        assert_eq!(src, Source::Own { vm: "web01".into() });
        assert_eq!(chunks, [chunk(4), chunk(7)]);
    }

    #[test]
    fn a_vm_without_a_profile_borrows_the_one_sharing_most_boot_chunks() {
        let now = t("2026-01-01T00:00:00Z");
        let tpl = Profile::new("template", 1 << 20, now).merge(
            &trace(&[("t.img", 0, 1, 0), ("t.img", 1, 2, 5), ("t.img", 2, 3, 9)]),
            now,
        );
        let other = Profile::new("db", 1 << 20, now).merge(
            &trace(&[("d.img", 0, 1, 0), ("d.img", 1, 50, 5), ("d.img", 2, 51, 9)]),
            now,
        );
        // The clone holds chunks 1 and 3 of the template (its own disk name and layout).
        let snap = Snap(HashMap::from([("clone.img".to_string(), vec![3, 1, 60])]));
        let (src, chunks) = plan("clone", &[other.clone(), tpl], &snap, 100).unwrap();
        assert_eq!(
            src,
            Source::Borrowed {
                vm: "template".into(),
                shared_percent: 66
            }
        );
        assert_eq!(chunks, [chunk(1), chunk(3)], "the donor's order");
        // Too little in common: nothing borrowed.
        let snap = Snap(HashMap::from([("x.img".to_string(), vec![1, 70, 71])]));
        assert!(plan("clone", &[other], &snap, 100).is_none());
    }

    #[test]
    fn profile_files_round_trip_and_bad_files_name_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore::new(dir.path());
        assert!(store.load("web 01/x").unwrap().is_none());
        let now = t("2026-01-01T00:00:00Z");
        let p = Profile::new("web 01/x", 1 << 20, now).merge(&trace(&[("a", 0, 1, 0)]), now);
        let path = store.save(&p).unwrap();
        assert_eq!(path.file_name().unwrap(), "web%2001%2fx.json");
        assert_eq!(store.load("web 01/x").unwrap().unwrap(), p);
        fs::write(dir.path().join("profiles/bad.json"), b"{\"format\": 9}").unwrap();
        let (good, bad) = store.list();
        assert_eq!(good, [p]);
        assert!(bad[0].to_string().contains("bad.json"), "{}", bad[0]);
        store.forget("web 01/x").unwrap();
        let e = store.forget("web 01/x").unwrap_err().to_string();
        assert!(e.contains("profile list"), "{e}");
        let mut wrong = Profile::new("v", 3, now);
        assert!(wrong.validate().unwrap_err().contains("power of two"));
        wrong.chunk_size = 4096;
        wrong.format = 2;
        assert!(wrong.validate().unwrap_err().contains("format 2"));
    }

    /// Every file in the project's `profiles/` folder (real profiles of the test guests) parses.
    #[test]
    fn the_projects_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
        let mut n = 0;
        for e in fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path.extension().is_some_and(|x| x == "json") {
                let p = parse(&path, &fs::read(&path).unwrap()).unwrap();
                assert!(!p.blocks.is_empty(), "{}", path.display());
                n += 1;
            }
        }
        assert!(n > 0, "profiles/ holds no profile");
    }
}
