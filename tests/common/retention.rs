//! Retention tests' shared parts: a repository (a directory or a bucket) driven through the
//! CLI with a `[retention]` config, and backups and prunes run at the same time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;

/// A repository and how to reach it: `--repo`, a config file for `--repo-config` (its
/// `[retention]`), and the environment (AWS_* for a bucket).
pub struct RepoAt {
    pub repo: String,
    pub config: PathBuf,
    pub env: Vec<(String, String)>,
}

/// A config file with `[retention] lease_expiry` (and whatever `extra` adds), for the CLI's
/// `--repo-config` and serve's `--config`.
pub fn retention_config(dir: &Path, expiry: &str, extra: &str) -> PathBuf {
    let path = dir.join("retention.toml");
    std::fs::write(
        &path,
        format!("[retention]\nlease_expiry = \"{expiry}\"\n{extra}"),
    )
    .unwrap();
    path
}

impl RepoAt {
    /// A new local repository in `dir/repo`, 64 KiB chunks.
    pub fn local(dir: &Path, config: PathBuf) -> RepoAt {
        let repo = dir.join("repo");
        livemount_ok(&[
            "repo",
            "init",
            repo.to_str().unwrap(),
            "--chunk-size",
            "64KiB",
        ]);
        RepoAt {
            repo: repo.to_str().unwrap().to_string(),
            config,
            env: Vec::new(),
        }
    }

    /// The repository's directory (a local one).
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(&self.repo)
    }

    /// Runs livemount with `--repo REPO --repo-config CONFIG` appended.
    pub fn run(&self, args: &[&str]) -> std::process::Output {
        let mut a = args.to_vec();
        a.extend_from_slice(&[
            "--repo",
            &self.repo,
            "--repo-config",
            self.config.to_str().unwrap(),
        ]);
        livemount_env(&a, &self.env)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "livemount {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The snapshots' names, oldest first.
    pub fn snapshot_names(&self) -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["backups", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Backs up the KVM VM `vm` whose disk `dir/vm-VM/d.img` holds `disk`; returns the
    /// snapshot name.
    pub fn backup(&self, dir: &Path, vm: &str, disk: &[u8]) -> String {
        let folder = dir.join(format!("vm-{vm}"));
        std::fs::create_dir_all(&folder).unwrap();
        write(&folder.join("d.img"), disk);
        let cfg = kvm_config(&folder, vm, &[("d.img", "raw")]);
        let out = self.ok(&["backup", "--config", cfg.to_str().unwrap(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["name"].as_str().unwrap().to_string()
    }

    pub fn verify_clean(&self) {
        let out = self.run(&["verify", "--json"]);
        assert!(
            out.status.success(),
            "verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn prune(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["prune", "--json"])).unwrap()
    }
}

/// A disk of `blocks` 64 KiB blocks, each one of a pool of `pool` random blocks (so that
/// backups keep finding chunks that a prune is about to take), chosen by `seed`; block 0 is
/// new every time.
fn pooled_disk(blocks: usize, pool: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(blocks * 65536);
    for i in 0..blocks {
        let which = if i == 0 {
            1_000_000 + seed
        } else {
            rng.below(pool)
        };
        let mut b = Rng::new(which.wrapping_mul(7919) + 13);
        for _ in 0..65536 / 8 {
            out.extend_from_slice(&b.next_u64().to_le_bytes());
        }
    }
    out
}

/// Backups of a VM in a loop on one thread, `forget --keep-last 3` and `prune` in a loop on
/// another, for `how_long`; then a last prune once forgotten manifests stop counting. Every
/// snapshot left restores byte-identical to what was backed up, and verify is clean.
pub fn backups_and_prunes_at_once(r: &RepoAt, dir: &Path, how_long: Duration, expiry: Duration) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backups = {
        let (r, dir, done) = (
            RepoAt {
                repo: r.repo.clone(),
                config: r.config.clone(),
                env: r.env.clone(),
            },
            dir.to_path_buf(),
            done.clone(),
        );
        std::thread::spawn(move || {
            let mut made = Vec::new();
            let t0 = Instant::now();
            let mut seed = 0;
            while t0.elapsed() < how_long {
                seed += 1;
                let disk = pooled_disk(160, 480, seed);
                let name = r.backup(&dir, "loop", &disk);
                made.push((name, blake3::hash(&disk)));
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            made
        })
    };
    let mut deleted = 0u64;
    let mut prunes = 0;
    // Prunes that set chunks aside while a backup ran, and chunks put back for a backup's
    // snapshot that needed them: the race this test is about.
    let mut waited = 0;
    let mut put_back = 0u64;
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        if r.snapshot_names().is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        r.ok(&["forget", "loop", "--keep-last", "3"]);
        let p = r.prune();
        deleted += p["deleted"]["chunks"].as_u64().unwrap();
        put_back += p["put_back"].as_u64().unwrap();
        if p["waiting"]["chunks"].as_u64().unwrap() > 0 {
            waited += 1;
        }
        prunes += 1;
    }
    let made = backups.join().unwrap();
    // Forgotten manifests count for one lease expiry; then the last prune takes their chunks.
    std::thread::sleep(expiry + Duration::from_secs(1));
    r.ok(&["forget", "loop", "--keep-last", "3"]);
    let p = r.prune();
    deleted += p["deleted"]["chunks"].as_u64().unwrap();
    eprintln!(
        "{} backups, {prunes} prunes ({waited} waited for a backup), {deleted} chunks \
         deleted, {put_back} put back; last prune: {p}",
        made.len()
    );
    assert!(
        made.len() >= 10 && prunes >= 5,
        "{} backups, {prunes} prunes",
        made.len()
    );
    assert!(deleted > 0, "the prunes deleted something");
    r.verify_clean();
    let left = r.snapshot_names();
    assert_eq!(left.len(), 3, "{left:?}");
    for name in &left {
        let want = made
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} was not made by the loop"))
            .1;
        let to = dir.join(format!("restore-{}", name.replace([':', '@'], "-")));
        r.ok(&["restore", name, "--to", to.to_str().unwrap(), "--json"]);
        let got = blake3::hash(&std::fs::read(to.join("d.img")).unwrap());
        assert_eq!(got, want, "{name} restores byte-identical");
    }
    // Nothing is left set aside, and the chunks are exactly what the three snapshots need:
    // a second prune finds nothing to delete.
    let p = r.prune();
    assert_eq!(p["deleted"]["chunks"], 0, "{p}");
    assert_eq!(p["waiting"]["chunks"], 0, "{p}");
    assert!(
        waited > 0,
        "no prune ever set chunks aside while a backup ran"
    );
}
