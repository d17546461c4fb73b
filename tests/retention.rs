//! Retention (issue 16): `forget` and `prune` through the real CLI and real servers.
//!
//! - A snapshot live-mounted by any agent that shares the repository is never forgotten: named,
//!   the forget is refused naming the mount and the agent; under a policy it is kept and
//!   reported. A killed agent's lease stops counting after `lease_expiry`.
//! - Backups and prunes run at the same time, in a loop: no chunk any snapshot needs is lost
//!   (verify clean, every snapshot restores byte-identical).
//! - A prune killed with SIGKILL at random moments leaves a repository verify finds clean, and
//!   the next prune finishes the work.
//! - Bad input is refused with a clear error and changes nothing.
//!
//! The guest that runs from a mount while its repository is pruned is in `guest_boot.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A config file with `[retention] lease_expiry` (and whatever `extra` adds), for the CLI's
/// `--repo-config` and serve's `--config`.
fn retention_config(dir: &Path, expiry: &str, extra: &str) -> PathBuf {
    let path = dir.join("retention.toml");
    std::fs::write(
        &path,
        format!("[retention]\nlease_expiry = \"{expiry}\"\n{extra}"),
    )
    .unwrap();
    path
}

/// Runs livemount with `--repo REPO --repo-config CONFIG` appended.
fn lm(repo: &Path, config: &Path, args: &[&str]) -> std::process::Output {
    let mut a = args.to_vec();
    a.extend_from_slice(&[
        "--repo",
        repo.to_str().unwrap(),
        "--repo-config",
        config.to_str().unwrap(),
    ]);
    livemount(&a)
}

fn lm_ok(repo: &Path, config: &Path, args: &[&str]) -> String {
    let out = lm(repo, config, args);
    assert!(
        out.status.success(),
        "livemount {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The snapshots' names, oldest first.
fn snapshot_names(repo: &Path, config: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&lm_ok(repo, config, &["backups", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// Backs up the KVM VM `vm` whose disk `dir/VM.img` holds `disk`; returns the snapshot name.
fn backup(repo: &Path, config: &Path, dir: &Path, vm: &str, disk: &[u8]) -> String {
    let folder = dir.join(format!("vm-{vm}"));
    std::fs::create_dir_all(&folder).unwrap();
    write(&folder.join("d.img"), disk);
    let cfg = kvm_config(&folder, vm, &[("d.img", "raw")]);
    let out = lm_ok(
        repo,
        config,
        &["backup", "--config", cfg.to_str().unwrap(), "--json"],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["name"].as_str().unwrap().to_string()
}

fn new_repo(dir: &Path) -> PathBuf {
    let repo = dir.join("repo");
    livemount_ok(&[
        "repo",
        "init",
        repo.to_str().unwrap(),
        "--chunk-size",
        "64KiB",
    ]);
    repo
}

fn verify_clean(repo: &Path, config: &Path) {
    let out = lm(repo, config, &["verify", "--json"]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn prune_json(repo: &Path, config: &Path) -> serde_json::Value {
    serde_json::from_str(&lm_ok(repo, config, &["prune", "--json"])).unwrap()
}

#[test]
fn snapshots_mounted_by_any_agent_are_never_forgotten_until_the_lease_expires() {
    let t = tempfile::tempdir().unwrap();
    let repo = new_repo(t.path());
    let config = retention_config(t.path(), "10s", "");
    let s1 = backup(&repo, &config, t.path(), "one", &mixed_disk(MIB, 1));
    let s2 = backup(&repo, &config, t.path(), "two", &mixed_disk(MIB, 2));
    let cfg = ["--config", config.to_str().unwrap()];
    let a = Server::start(&repo, &t.path().join("state-a"), "off", &cfg);
    let b = Server::start(&repo, &t.path().join("state-b"), "off", &cfg);
    a.cli(&["mount", &s1, "--name", "web-a"]);
    b.cli(&["mount", &s2, "--name", "web-b"]);

    // Named: refused, naming the mount and the agent, whichever agent mounted it.
    for (snap, mount, state) in [(&s1, "web-a", "state-a"), (&s2, "web-b", "state-b")] {
        let out = lm(&repo, &config, &["forget", snap]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(&format!("mount {mount}")), "{err}");
        assert!(err.contains(state), "names the agent: {err}");
    }
    // Under a policy: kept, and said so.
    let out = lm_ok(&repo, &config, &["forget", "--keep-last", "0", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["remove"].as_array().unwrap().is_empty(), "{v}");
    let kept = v["keep"].as_array().unwrap();
    assert_eq!(kept.len(), 2, "{v}");
    for k in kept {
        assert!(
            k["reasons"][0]
                .as_str()
                .unwrap()
                .starts_with("in use: mount web-"),
            "{v}"
        );
    }
    assert_eq!(snapshot_names(&repo, &config).len(), 2);

    // Agent b is killed: its lease counts until it expires (10 s after its last renewal),
    // then the snapshot may go. The killed agent runs on this host, so its lease is gone at
    // once only if its process space matches; the kill leaves no process, so it is.
    b.kill();
    let t0 = Instant::now();
    loop {
        let out = lm(&repo, &config, &["forget", &s2]);
        if out.status.success() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(snapshot_names(&repo, &config), vec![s1.clone()]);
    // Agent a's mount still protects s1, and its chunks survive a prune.
    let r = prune_json(&repo, &config);
    assert_eq!(r["deleted"]["chunks"], 0, "{r}");
    verify_clean(&repo, &config);
    // Unmounted, s1 may be forgotten.
    a.cli(&["unmount", "web-a"]);
    lm_ok(&repo, &config, &["forget", &s1]);
    assert!(snapshot_names(&repo, &config).is_empty());
    assert!(a.stop().success());
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

#[test]
fn backups_and_prunes_at_once_lose_no_chunk() {
    let t = tempfile::tempdir().unwrap();
    let repo = new_repo(t.path());
    let config = retention_config(t.path(), "10s", "");
    backups_and_prunes_at_once(&repo, &config, t.path(), Duration::from_secs(40));
}

/// Backups of a VM in a loop on one thread, `forget --keep-last 3` and `prune` in a loop on
/// another, for `how_long`; then a last prune once forgotten manifests stop counting. Every
/// snapshot left restores byte-identical to what was backed up, and verify is clean.
pub fn backups_and_prunes_at_once(repo: &Path, config: &Path, dir: &Path, how_long: Duration) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backups = {
        let (repo, config, dir, done) = (
            repo.to_path_buf(),
            config.to_path_buf(),
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
                let name = backup(&repo, &config, &dir, "loop", &disk);
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
        if snapshot_names(repo, config).is_empty() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        lm_ok(repo, config, &["forget", "loop", "--keep-last", "3"]);
        let r = prune_json(repo, config);
        deleted += r["deleted"]["chunks"].as_u64().unwrap();
        put_back += r["put_back"].as_u64().unwrap();
        if r["waiting"]["chunks"].as_u64().unwrap() > 0 {
            waited += 1;
        }
        prunes += 1;
    }
    let made = backups.join().unwrap();
    // Forgotten manifests count for one lease expiry; then the last prune takes their chunks.
    std::thread::sleep(Duration::from_secs(11));
    lm_ok(repo, config, &["forget", "loop", "--keep-last", "3"]);
    let r = prune_json(repo, config);
    deleted += r["deleted"]["chunks"].as_u64().unwrap();
    eprintln!(
        "{} backups, {prunes} prunes ({waited} waited for a backup), {deleted} chunks \
         deleted, {put_back} put back; last prune: {r}",
        made.len()
    );
    assert!(
        made.len() >= 10 && prunes >= 5,
        "{} backups, {prunes} prunes",
        made.len()
    );
    assert!(deleted > 0, "the prunes deleted something");
    verify_clean(repo, config);
    let left = snapshot_names(repo, config);
    assert_eq!(left.len(), 3, "{left:?}");
    for name in &left {
        let want = made
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} was not made by the loop"))
            .1;
        let to = dir.join(format!("restore-{}", name.replace([':', '@'], "-")));
        lm_ok(
            repo,
            config,
            &["restore", name, "--to", to.to_str().unwrap(), "--json"],
        );
        let got = blake3::hash(&std::fs::read(to.join("d.img")).unwrap());
        assert_eq!(got, want, "{name} restores byte-identical");
    }
    // Nothing is left set aside, and the chunks are exactly what the three snapshots need:
    // a second prune finds nothing to delete.
    let r = prune_json(repo, config);
    assert_eq!(r["deleted"]["chunks"], 0, "{r}");
    assert_eq!(r["waiting"]["chunks"], 0, "{r}");
    assert!(
        waited > 0,
        "no prune ever set chunks aside while a backup ran"
    );
}

#[test]
fn a_prune_killed_at_random_moments_leaves_the_repository_clean() {
    let t = tempfile::tempdir().unwrap();
    let repo = new_repo(t.path());
    let config = retention_config(t.path(), "10s", "");
    let keep_disk = mixed_disk(2 * MIB, 3);
    let keep = backup(&repo, &config, t.path(), "keep", &keep_disk);
    // 48 MiB of chunks only the forgotten snapshots need.
    for i in 0..3 {
        backup(
            &repo,
            &config,
            t.path(),
            "gone",
            &mixed_disk(16 * MIB, 10 + i),
        );
    }
    lm_ok(&repo, &config, &["forget", "gone", "--keep-last", "0"]);
    std::thread::sleep(Duration::from_secs(11));
    let before = chunk_files(&repo).len();

    // How long a whole prune takes, measured on a copy, bounds the kill times.
    let copy = t.path().join("copy");
    let status = Command::new("cp")
        .args(["-a", repo.to_str().unwrap(), copy.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let t0 = Instant::now();
    prune_json(&copy, &config);
    let whole = t0.elapsed();

    let mut rng = Rng::new(77);
    for round in 0..8 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_livemount"))
            .args([
                "prune",
                "--repo",
                repo.to_str().unwrap(),
                "--repo-config",
                config.to_str().unwrap(),
                "--json",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let at = Duration::from_micros(rng.below(whole.as_micros() as u64 + 1));
        std::thread::sleep(at);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        eprintln!("round {round}: killed at {at:?} of {whole:?}: {status}");
        verify_clean(&repo, &config);
    }
    // The next prune finishes what the killed ones began.
    let r = prune_json(&repo, &config);
    eprintln!("final prune: {r}");
    assert_eq!(r["waiting"]["chunks"], 0, "{r}");
    verify_clean(&repo, &config);
    let after = chunk_files(&repo).len();
    assert!(after < before, "{after} chunks of {before}");
    assert!(
        !repo.join("trash").exists()
            || std::fs::read_dir(repo.join("trash"))
                .unwrap()
                .next()
                .is_none()
    );
    let to = t.path().join("restored");
    lm_ok(
        &repo,
        &config,
        &["restore", &keep, "--to", to.to_str().unwrap()],
    );
    assert!(std::fs::read(to.join("d.img")).unwrap() == keep_disk);
    // The kept snapshot's chunks and nothing else.
    let r = prune_json(&repo, &config);
    assert_eq!(r["deleted"]["chunks"], 0, "{r}");
}

#[test]
fn bad_forget_input_is_refused_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let repo = new_repo(t.path());
    let config = retention_config(t.path(), "10s", "");
    let s = backup(&repo, &config, t.path(), "vm1", &mixed_disk(MIB, 4));
    let listing = || lm_ok(&repo, &config, &["backups", "--json"]);
    let before = listing();
    let cases: &[(&[&str], &str)] = &[
        (&["forget", "--keep-daily", "-1"], "-1"),
        (&["forget", "--keep-daily", "0"], "--keep-daily 0"),
        (
            &["forget", "--keep-last", "0", "--keep-daily", "2"],
            "goes alone",
        ),
        (&["forget"], "name the snapshots"),
        (
            &["forget", "--keep-last", "1", "nosuchvm"],
            "no snapshot of a VM named",
        ),
        (&["forget", "vm1"], "is a VM, not one snapshot"),
        (&["forget", "vm1@2000-01-01T00:00:00Z"], "no snapshot"),
        (&["forget", "--keep-weekly", "many"], "many"),
        (&["forget", "--keep-last", "4294967296"], "4294967296"),
    ];
    for (args, says) in cases {
        let out = lm(&repo, &config, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // --policy needs a [retention] with a rule.
    let out = livemount(&["forget", "--policy", "--repo", repo.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--repo-config"));
    let out = lm(&repo, &config, &["forget", "--policy"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no retention rule"),
        "{out:?}"
    );
    let bad = t.path().join("bad.toml");
    std::fs::write(&bad, "[retention]\nkeep_daily = -3\n").unwrap();
    let out = lm(&repo, &bad, &["forget", "--policy"]);
    assert!(!out.status.success());
    std::fs::write(&bad, "[retention]\nlease_expiry = \"1s\"\n").unwrap();
    let out = lm(&repo, &bad, &["prune"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lease_expiry"));
    assert_eq!(listing(), before, "nothing changed");
    assert!(!repo.join("forgotten").exists());

    // The config's policy is applied by --policy; a dry run changes nothing.
    let policy = retention_config(t.path(), "10s", "keep_last = 1\n");
    let s2 = backup(&repo, &policy, t.path(), "vm1", &mixed_disk(MIB, 5));
    let out = lm_ok(&repo, &policy, &["forget", "--policy", "--dry-run"]);
    assert!(out.contains(&format!("would forget {s}")), "{out}");
    assert_eq!(snapshot_names(&repo, &policy), vec![s.clone(), s2.clone()]);
    let out = lm_ok(&repo, &policy, &["forget", "--policy"]);
    assert!(out.contains(&format!("keep    {s2}  last")), "{out}");
    assert_eq!(snapshot_names(&repo, &policy), vec![s2]);
}
