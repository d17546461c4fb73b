//! Retention (issue 16): `forget` and `prune` through the real CLI and real servers.
//!
//! - A snapshot live-mounted by any agent that shares the repository is never forgotten: named,
//!   the forget is refused naming the mount and the agent; under a policy it is kept and
//!   reported. A killed agent's lease stops counting after `lease_expiry`.
//! - Backups and prunes run at the same time, in a loop: no chunk any snapshot needs is lost
//!   (verify clean, every snapshot restores byte-identical).
//! - A prune killed with SIGKILL at 12 random moments leaves a repository verify finds clean, and
//!   the next prune finishes the work.
//! - Bad input is refused with a clear error and changes nothing.
//!
//! The guest that runs from a mount while its repository is pruned is in `guest_boot.rs`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::retention::*;
use common::*;

#[test]
fn snapshots_mounted_by_any_agent_are_never_forgotten_until_the_lease_expires() {
    let t = tempfile::tempdir().unwrap();
    let config = retention_config(t.path(), "10s", "");
    let r = RepoAt::local(t.path(), config.clone());
    let repo = r.dir();
    let s1 = r.backup(t.path(), "one", &mixed_disk(MIB, 1));
    let s2 = r.backup(t.path(), "two", &mixed_disk(MIB, 2));
    let cfg = ["--config", config.to_str().unwrap()];
    let a = Server::start(&repo, &t.path().join("state-a"), "off", &cfg);
    let b = Server::start(&repo, &t.path().join("state-b"), "off", &cfg);
    a.cli(&["mount", &s1, "--name", "web-a"]);
    b.cli(&["mount", &s2, "--name", "web-b"]);

    // Named: refused, naming the mount and the agent, whichever agent mounted it.
    for (snap, mount, state) in [(&s1, "web-a", "state-a"), (&s2, "web-b", "state-b")] {
        let out = r.run(&["forget", snap]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(&format!("mount {mount}")), "{err}");
        assert!(err.contains(state), "names the agent: {err}");
    }
    // Under a policy: kept, and said so.
    let out = r.ok(&["forget", "--keep-last", "0", "--json"]);
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
    assert_eq!(r.snapshot_names().len(), 2);

    // Agent b is killed: its lease counts until it expires (10 s after its last renewal),
    // then the snapshot may go. The killed agent runs on this host, so its lease is gone at
    // once only if its process space matches; the kill leaves no process, so it is.
    b.kill();
    let t0 = Instant::now();
    loop {
        let out = r.run(&["forget", &s2]);
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
    assert_eq!(r.snapshot_names(), vec![s1.clone()]);
    // Agent a's mount still protects s1, and its chunks survive a prune.
    let p = r.prune();
    assert_eq!(p["deleted"]["chunks"], 0, "{p}");
    r.verify_clean();
    // Unmounted, s1 may be forgotten.
    a.cli(&["unmount", "web-a"]);
    r.ok(&["forget", &s1]);
    assert!(r.snapshot_names().is_empty());
    assert!(a.stop().success());
}

#[test]
fn backups_and_prunes_at_once_lose_no_chunk() {
    let t = tempfile::tempdir().unwrap();
    let config = retention_config(t.path(), "10s", "");
    let r = RepoAt::local(t.path(), config);
    backups_and_prunes_at_once(
        &r,
        t.path(),
        Duration::from_secs(40),
        Duration::from_secs(10),
    );
}

#[test]
fn a_prune_killed_at_random_moments_leaves_the_repository_clean() {
    let t = tempfile::tempdir().unwrap();
    let config = retention_config(t.path(), "10s", "");
    let r = RepoAt::local(t.path(), config.clone());
    let repo = r.dir();
    let keep_disk = mixed_disk(2 * MIB, 3);
    let keep = r.backup(t.path(), "keep", &keep_disk);
    // 1,536 chunks (96 MiB, incompressible) only the forgotten snapshots need.
    for i in 0..3 {
        let mut disk = vec![0u8; 32 * MIB as usize];
        Rng::new(10 + i).fill(&mut disk);
        r.backup(t.path(), "gone", &disk);
    }
    r.ok(&["forget", "gone", "--keep-last", "0"]);
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
    RepoAt {
        repo: copy.to_str().unwrap().to_string(),
        config: config.clone(),
        env: Vec::new(),
    }
    .prune();
    let whole = t0.elapsed();

    let mut rng = Rng::new(77);
    for round in 0..12 {
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
        let bins = std::fs::read_dir(repo.join("trash"))
            .map(|d| d.count())
            .unwrap_or(0);
        eprintln!(
            "round {round}: killed at {at:?} of {whole:?}: {status}; {} chunks left in chunks/, {bins} bin(s)",
            chunk_files(&repo).len()
        );
        r.verify_clean();
    }
    // The next prune finishes what the killed ones began.
    let p = r.prune();
    eprintln!("final prune: {p}");
    assert_eq!(p["waiting"]["chunks"], 0, "{p}");
    r.verify_clean();
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
    r.ok(&["restore", &keep, "--to", to.to_str().unwrap()]);
    assert!(std::fs::read(to.join("d.img")).unwrap() == keep_disk);
    // The kept snapshot's chunks and nothing else.
    let p = r.prune();
    assert_eq!(p["deleted"]["chunks"], 0, "{p}");
}

#[test]
fn bad_forget_input_is_refused_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let config = retention_config(t.path(), "10s", "");
    let r = RepoAt::local(t.path(), config.clone());
    let repo = r.dir();
    let s = r.backup(t.path(), "vm1", &mixed_disk(MIB, 4));
    let listing = || r.ok(&["backups", "--json"]);
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
        let out = r.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // --policy needs a [retention] with a rule.
    let out = livemount(&["forget", "--policy", "--repo", repo.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--repo-config"));
    let out = r.run(&["forget", "--policy"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no retention rule"),
        "{out:?}"
    );
    let bad = t.path().join("bad.toml");
    std::fs::write(&bad, "[retention]\nkeep_daily = -3\n").unwrap();
    let bad_r = RepoAt {
        repo: r.repo.clone(),
        config: bad.clone(),
        env: Vec::new(),
    };
    let out = bad_r.run(&["forget", "--policy"]);
    assert!(!out.status.success());
    std::fs::write(&bad, "[retention]\nlease_expiry = \"1s\"\n").unwrap();
    let out = bad_r.run(&["prune"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lease_expiry"));
    assert_eq!(listing(), before, "nothing changed");
    assert!(!repo.join("forgotten").exists());

    // The config's policy is applied by --policy; a dry run changes nothing.
    let policy = retention_config(t.path(), "10s", "keep_last = 1\n");
    let p = RepoAt {
        repo: r.repo.clone(),
        config: policy,
        env: Vec::new(),
    };
    let s2 = p.backup(t.path(), "vm1", &mixed_disk(MIB, 5));
    let out = p.ok(&["forget", "--policy", "--dry-run"]);
    assert!(out.contains(&format!("would forget {s}")), "{out}");
    assert_eq!(p.snapshot_names(), vec![s.clone(), s2.clone()]);
    let out = p.ok(&["forget", "--policy"]);
    assert!(out.contains(&format!("keep    {s2}  last")), "{out}");
    assert_eq!(p.snapshot_names(), vec![s2]);
}
