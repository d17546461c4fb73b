//! Backup then restore, through the library and the binary, for every input format; incremental
//! backups; corruption; and a backup killed midway.

mod common;

use std::path::Path;

use common::*;
use livemount::repo::{
    BackupOptions, ChangedBlocks, ChunkSize, NoProgress, Repository, SnapshotSpec,
};

fn init_repo(dir: &Path, chunk: u32) -> Repository {
    Repository::init(&dir.join("repo"), ChunkSize::new(chunk).unwrap()).unwrap()
}

async fn backup(repo: &Repository, config: &Path) -> livemount::repo::BackupSummary {
    let opts = BackupOptions::from_config_file(config, &[]).unwrap();
    repo.backup(&opts, &NoProgress).await.unwrap()
}

/// Restores `snapshot` and returns the bytes of each restored disk.
async fn restore_disks(
    repo: &Repository,
    id: &livemount::repo::SnapshotId,
    to: &Path,
) -> Vec<Vec<u8>> {
    let s = repo.restore(id, to, &NoProgress).await.unwrap();
    s.disks
        .iter()
        .map(|d| std::fs::read(&d.path).unwrap())
        .collect()
}

#[tokio::test]
async fn raw_disks_restore_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    // Sizes that are not a multiple of the chunk size, one with a partial last block of 512 B.
    let a = mixed_disk(9 * MIB + 512, 1);
    let b = mixed_disk(3 * MIB + 4096 + 7, 2);
    write(&t.path().join("a.img"), &a);
    write(&t.path().join("b.img"), &b);
    let cfg = kvm_config(t.path(), "kvm-raw", &[("a.img", "raw"), ("b.img", "raw")]);
    let repo = init_repo(t.path(), 1 << 20);
    let s = backup(&repo, &cfg).await;
    assert_eq!(s.logical_bytes, a.len() as u64 + b.len() as u64);
    let disks = restore_disks(&repo, &s.snapshot, &t.path().join("out")).await;
    assert!(disks[0] == a, "disk a differs after restore");
    assert!(disks[1] == b, "disk b differs after restore");
    // The config comes back byte for byte.
    assert_eq!(
        std::fs::read(t.path().join("out/kvm-raw.xml")).unwrap(),
        std::fs::read(&cfg).unwrap()
    );
}

#[tokio::test]
async fn qcow2_disks_restore_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(7 * MIB + 65536 + 512, 3);
    let src = t.path().join("src.raw");
    write(&src, &raw);
    let variants: [(&str, &[&str]); 4] = [
        ("v2.qcow2", &["-o", "compat=0.10"]),
        ("v3.qcow2", &["-o", "compat=1.1,cluster_size=4096"]),
        ("deflate.qcow2", &["-c"]),
        ("zstd.qcow2", &["-c", "-o", "compression_type=zstd"]),
    ];
    let repo = init_repo(t.path(), 256 * 1024);
    for (name, extra) in variants {
        convert(&src, &t.path().join(name), "qcow2", extra);
        let cfg = kvm_config(t.path(), &format!("vm-{name}"), &[(name, "qcow2")]);
        let s = backup(&repo, &cfg).await;
        let disks = restore_disks(&repo, &s.snapshot, &t.path().join(format!("out-{name}"))).await;
        assert!(
            disks[0] == raw,
            "{name}: restored disk differs from the source"
        );
    }
}

#[tokio::test]
async fn vmdk_disks_restore_byte_identical_with_descriptor() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(6 * MIB, 4);
    let src = t.path().join("src.raw");
    write(&src, &raw);
    let repo = init_repo(t.path(), 1 << 20);
    for sub in ["monolithicFlat", "monolithicSparse", "twoGbMaxExtentSparse"] {
        let dir = t.path().join(sub);
        std::fs::create_dir(&dir).unwrap();
        convert(
            &src,
            &dir.join("disk0.vmdk"),
            "vmdk",
            &["-o", &format!("subformat={sub}")],
        );
        let cfg = esxi_config(&dir, &format!("esxi-{sub}"), &["disk0.vmdk"]);
        let s = backup(&repo, &cfg).await;
        let out = t.path().join(format!("out-{sub}"));
        let disks = restore_disks(&repo, &s.snapshot, &out).await;
        assert!(
            disks[0] == raw,
            "{sub}: restored disk differs from the source"
        );
        // The restored descriptor points at the flat file with the exact size, and qemu-img
        // reads the pair as the same disk.
        let desc = std::fs::read_to_string(out.join("disk0.vmdk")).unwrap();
        assert!(
            desc.contains(&format!("RW {} VMFS \"disk0-flat.vmdk\"", raw.len() / 512)),
            "{desc}"
        );
        qemu_img(&[
            "compare",
            "-q",
            "-f",
            "vmdk",
            "-F",
            "raw",
            out.join("disk0.vmdk").to_str().unwrap(),
            src.to_str().unwrap(),
        ]);
    }
}

#[tokio::test]
async fn second_backup_of_slightly_changed_disk_stores_only_changed_chunks() {
    let t = tempfile::tempdir().unwrap();
    let mut disk = mixed_disk(16 * MIB, 5);
    let path = t.path().join("d.img");
    write(&path, &disk);
    let cfg = kvm_config(t.path(), "inc", &[("d.img", "raw")]);
    let repo = init_repo(t.path(), 1 << 20);
    let first = backup(&repo, &cfg).await;
    let before = chunk_files(repo.dir().unwrap()).len();

    // Change three blocks: one byte in block 2, a range across blocks 7 and 8.
    disk[2 * MIB as usize + 100] ^= 0xff;
    for b in &mut disk[(8 * MIB - 10) as usize..(8 * MIB + 10) as usize] {
        *b = b.wrapping_add(1);
    }
    write(&path, &disk);
    let second = backup(&repo, &cfg).await;
    // Three data chunks plus the one block-table piece that names them; the config is unchanged.
    assert_eq!(second.new_chunks, 4, "{second:?}");
    assert_eq!(chunk_files(repo.dir().unwrap()).len(), before + 4);
    assert_eq!(
        second.read_bytes, first.read_bytes,
        "without CBT every non-zero block is read"
    );
    let disks = restore_disks(&repo, &second.snapshot, &t.path().join("out")).await;
    assert!(disks[0] == disk);
}

#[tokio::test]
async fn changed_blocks_reads_only_the_changed_extents() {
    let t = tempfile::tempdir().unwrap();
    let cs = 256 * 1024u64;
    let mut disk = mixed_disk(8 * MIB, 6);
    // Make every block non-zero so that "read" counts are exact.
    for b in (0..disk.len()).step_by(cs as usize) {
        disk[b] = 1;
    }
    let path = t.path().join("d.img");
    write(&path, &disk);
    let cfg = kvm_config(t.path(), "cbt", &[("d.img", "raw")]);
    let repo = init_repo(t.path(), cs as u32);
    let first = backup(&repo, &cfg).await;
    let old = disk.clone();

    // Region A (listed as changed) spans blocks 4..=5; region B (not listed) is block 20.
    for b in &mut disk[(4 * cs + 10) as usize..(5 * cs + 10) as usize] {
        *b ^= 0x5a;
    }
    for b in &mut disk[(20 * cs) as usize..(20 * cs + 100) as usize] {
        *b ^= 0x5a;
    }
    write(&path, &disk);
    let changed = format!(
        r#"{{"disks": {{"d.img": [{{"start": {}, "length": {}}}]}}}}"#,
        4 * cs + 10,
        cs
    );
    let mut opts = BackupOptions::from_config_file(&cfg, &[]).unwrap();
    opts.parent = Some(first.snapshot);
    opts.changed =
        Some(ChangedBlocks::from_json(Path::new("cbt.json"), changed.as_bytes()).unwrap());
    let second = repo.backup(&opts, &NoProgress).await.unwrap();
    assert_eq!(
        second.read_bytes,
        2 * cs,
        "only blocks 4 and 5 are read: {second:?}"
    );
    assert_eq!(second.reused_bytes, disk.len() as u64 - 2 * cs);

    let restored = restore_disks(&repo, &second.snapshot, &t.path().join("out")).await;
    let got = &restored[0];
    assert!(
        got[(4 * cs) as usize..(6 * cs) as usize] == disk[(4 * cs) as usize..(6 * cs) as usize],
        "region A is new"
    );
    assert!(
        got[(20 * cs) as usize..(21 * cs) as usize] == old[(20 * cs) as usize..(21 * cs) as usize],
        "region B was not read, so it is as in the parent"
    );
    let m = repo.manifest(&second.snapshot).await.unwrap();
    assert_eq!(m.parent, Some(first.snapshot));
}

#[tokio::test]
async fn changed_blocks_for_a_disk_the_vm_lacks_is_refused() {
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("d.img"), &mixed_disk(MIB, 7));
    let cfg = kvm_config(t.path(), "cbt2", &[("d.img", "raw")]);
    let repo = init_repo(t.path(), 1 << 20);
    let first = backup(&repo, &cfg).await;
    let mut opts = BackupOptions::from_config_file(&cfg, &[]).unwrap();
    opts.parent = Some(first.snapshot);
    opts.changed =
        Some(ChangedBlocks::from_json(Path::new("x"), br#"{"disks": {"other.img": []}}"#).unwrap());
    let err = repo
        .backup(&opts, &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("other.img") && err.contains("d.img"), "{err}");
    let (all, _) = repo.list_snapshots().await.unwrap();
    assert_eq!(all.len(), 1, "nothing was added");
}

#[tokio::test]
async fn corrupted_chunk_fails_verify_read_and_restore_naming_it() {
    let t = tempfile::tempdir().unwrap();
    let disk = mixed_disk(4 * MIB, 8);
    write(&t.path().join("d.img"), &disk);
    let cfg = kvm_config(t.path(), "corrupt", &[("d.img", "raw")]);
    let repo = init_repo(t.path(), 1 << 20);
    let s = backup(&repo, &cfg).await;
    assert!(repo.verify(None, &NoProgress).await.unwrap().is_clean());

    // Corrupt the chunk of the first non-zero block: flip one byte of its stored frame.
    let snap = repo.snapshot(&s.snapshot).await.unwrap();
    let image = snap.disk(0).await.unwrap();
    let (block, chunk) = (0..image.block_count())
        .find_map(|b| image.chunk_of_block(b).map(|c| (b, c)))
        .unwrap();
    let hex = chunk.to_hex();
    let file = repo
        .dir()
        .unwrap()
        .join("chunks")
        .join(&hex[..2])
        .join(&hex);
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();

    let report = repo.verify(None, &NoProgress).await.unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.bad_chunks.len(), 1);
    assert_eq!(report.bad_chunks[0].chunk, chunk);
    assert!(
        report.bad_chunks[0]
            .used_by
            .iter()
            .any(|u| u.contains("corrupt@") && u.contains("disk d.img")),
        "{:?}",
        report.bad_chunks[0].used_by
    );

    let err = image
        .read_at(block * MIB + 5, 10)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&hex) && err.contains("d.img"), "{err}");

    let out = t.path().join("out");
    let err = repo
        .restore(&s.snapshot, &out, &NoProgress)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&hex), "{err}");
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert!(
        left.is_empty(),
        "a failed restore leaves no file behind: {left:?}"
    );

    // The binary says the same and exits non-zero.
    let repo_arg = repo.dir().unwrap().to_str().unwrap().to_string();
    let out = livemount(&["verify", "--repo", &repo_arg]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("BAD chunk {hex} corrupt")), "{text}");
    assert!(text.contains("used by corrupt@"), "{text}");

    // A missing chunk is named as missing.
    std::fs::remove_file(&file).unwrap();
    let report = repo.verify(Some(s.snapshot), &NoProgress).await.unwrap();
    assert_eq!(
        report.bad_chunks[0].problem,
        livemount::repo::ChunkProblem::Missing
    );
}

#[tokio::test]
async fn read_at_serves_any_range_like_the_reference() {
    let t = tempfile::tempdir().unwrap();
    let disk = mixed_disk(5 * 65536 * 4 + 1234, 9);
    write(&t.path().join("d.img"), &disk);
    let cfg = kvm_config(t.path(), "ranges", &[("d.img", "raw")]);
    let repo = init_repo(t.path(), 65536);
    let s = backup(&repo, &cfg).await;
    let image = repo
        .snapshot(&s.snapshot)
        .await
        .unwrap()
        .disk(0)
        .await
        .unwrap();
    let size = disk.len() as u64;
    let mut rng = Rng::new(42);
    let mut cases: Vec<(u64, usize)> = vec![
        (0, 0),
        (0, 1),
        (65535, 2),
        (size - 1, 1),
        (size - 1, 100),
        (size, 10),
        (size + 5, 10),
        (u64::MAX - 3, 100),
        (0, disk.len()),
        (100, disk.len()),
        (65536 * 3, 65536),
    ];
    for _ in 0..300 {
        let off = rng.below(size + 1000);
        let len = rng.below(4 * 65536) as usize;
        cases.push((off, len));
    }
    for (off, len) in cases {
        let got = image.read_at(off, len).await.unwrap();
        let start = off.min(size) as usize;
        let end = off.saturating_add(len as u64).min(size) as usize;
        let want = &disk[start..end.max(start)];
        assert!(
            got[..] == *want,
            "read_at({off}, {len}) differs: got {} bytes, want {}",
            got.len(),
            want.len()
        );
    }
}

#[tokio::test]
async fn snapshot_names_resolve_by_vm_time_prefix_and_at() {
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("d.img"), &mixed_disk(MIB, 10));
    let cfg = kvm_config(t.path(), "named", &[("d.img", "raw")]);
    let repo = init_repo(t.path(), 1 << 20);
    let a = backup(&repo, &cfg).await;
    let b = backup(&repo, &cfg).await;
    assert_ne!(
        a.name, b.name,
        "two backups in one second still get distinct names"
    );
    let r = |text: &str, at: Option<jiff::Timestamp>| {
        let repo = repo.clone();
        let spec = SnapshotSpec::new(text, at);
        async move { repo.resolve(&spec).await.map(|s| s.id) }
    };
    assert_eq!(r(&a.name, None).await.unwrap(), a.snapshot);
    assert_eq!(r("named", None).await.unwrap(), b.snapshot);
    let a_time: jiff::Timestamp = a.name.split_once('@').unwrap().1.parse().unwrap();
    assert_eq!(r("named", Some(a_time)).await.unwrap(), a.snapshot);
    assert_eq!(
        r(&a.snapshot.to_string()[..10], None).await.unwrap(),
        a.snapshot
    );
    assert!(r("nosuch", None).await.is_err());
}

#[test]
fn cli_backup_list_show_restore_round_trip() {
    let t = tempfile::tempdir().unwrap();
    let disk = mixed_disk(3 * MIB + 512, 11);
    write(&t.path().join("d.raw"), &disk);
    let src = t.path().join("d.raw");
    convert(&src, &t.path().join("d.qcow2"), "qcow2", &["-c"]);
    let cfg = kvm_config(t.path(), "clivm", &[("d.qcow2", "qcow2")]);
    let repo = t.path().join("repo");
    let repo_s = repo.to_str().unwrap();

    livemount_ok(&["repo", "init", repo_s, "--chunk-size", "256KiB"]);
    let out = livemount(&["repo", "init", repo_s]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    let out = livemount(&[
        "repo",
        "init",
        t.path().join("r2").to_str().unwrap(),
        "--chunk-size",
        "3MiB",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("power of two"));

    let summary: serde_json::Value = serde_json::from_str(&livemount_ok(&[
        "backup",
        "--repo",
        repo_s,
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(summary["logical_bytes"], disk.len() as u64);
    let name = summary["name"].as_str().unwrap().to_string();
    assert!(name.starts_with("clivm@"), "{name}");

    let list: serde_json::Value =
        serde_json::from_str(&livemount_ok(&["backups", "--repo", repo_s, "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["vm"]["uuid"], VM_UUID);
    assert_eq!(list[0]["vm"]["hypervisor"], "kvm");
    let text = livemount_ok(&["backups", "--repo", repo_s, "--vm", "clivm"]);
    assert!(text.contains(&name), "{text}");
    assert!(livemount_ok(&["backups", "--repo", repo_s, "--vm", "other"]).contains("no snapshots"));

    let show: serde_json::Value =
        serde_json::from_str(&livemount_ok(&["show", "--repo", repo_s, &name, "--json"])).unwrap();
    assert_eq!(show["manifest"]["disks"][0]["size"], disk.len() as u64);
    assert_eq!(show["manifest"]["disks"][0]["source_format"], "qcow2");
    assert_eq!(show["manifest"]["disks"][0]["device"], "vda");

    let out = livemount(&["show", "--repo", repo_s, "clivm@2001-01-01T00:00:00Z"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&name),
        "the error lists the VM's snapshots"
    );

    let to = t.path().join("restored");
    livemount_ok(&[
        "restore",
        "--repo",
        repo_s,
        "clivm",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(std::fs::read(to.join("d.raw")).unwrap() == disk);
    let out = livemount(&[
        "restore",
        "--repo",
        repo_s,
        "clivm",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists"),
        "never overwrites"
    );
    assert!(livemount_ok(&["verify", "--repo", repo_s, "clivm"]).contains("all good"));

    let out = livemount(&[
        "backup",
        "--repo",
        repo_s,
        "--config",
        cfg.to_str().unwrap(),
        "--parent",
        &name,
    ]);
    assert!(!out.status.success(), "--parent needs --changed-blocks");
    let out = livemount(&["backups", "--repo", t.path().join("nope").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a livemount repository"));
}

#[test]
fn backup_killed_midway_leaves_no_snapshot_and_a_clean_repository() {
    let t = tempfile::tempdir().unwrap();
    // Random data: every block is a new chunk, so the backup takes long enough to be killed.
    let mut rng = Rng::new(12);
    let mut disk = vec![0u8; 192 * MIB as usize];
    rng.fill(&mut disk);
    write(&t.path().join("big.img"), &disk);
    drop(disk);
    let cfg = kvm_config(t.path(), "killed", &[("big.img", "raw")]);
    let repo = t.path().join("repo");
    let repo_s = repo.to_str().unwrap().to_string();
    livemount_ok(&["repo", "init", &repo_s, "--chunk-size", "64KiB"]);

    for kill_after in [1usize, 200, 1500] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_livemount"))
            .args([
                "backup",
                "--repo",
                &repo_s,
                "--config",
                cfg.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let mut killed = false;
        while start.elapsed() < std::time::Duration::from_secs(60) {
            let n = chunk_files(&repo).len() + std::fs::read_dir(repo.join("tmp")).unwrap().count();
            if n >= kill_after {
                child.kill().unwrap();
                killed = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.wait().unwrap();
        assert!(
            killed,
            "the backup finished before {kill_after} chunks; the test needs a bigger disk"
        );
        let list: serde_json::Value =
            serde_json::from_str(&livemount_ok(&["backups", "--repo", &repo_s, "--json"])).unwrap();
        assert_eq!(
            list.as_array().unwrap().len(),
            0,
            "no partial snapshot is visible"
        );
        assert!(livemount_ok(&["verify", "--repo", &repo_s]).contains("all good"));
        assert_every_chunk_file_is_whole(&repo);
    }
    // A backup after the crashes completes, clears tmp/, and restores byte-identical.
    livemount_ok(&[
        "backup",
        "--repo",
        &repo_s,
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_dir(repo.join("tmp")).unwrap().count(), 0);
    let to = t.path().join("out");
    livemount_ok(&[
        "restore",
        "--repo",
        &repo_s,
        "killed",
        "--to",
        to.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(to.join("big.img")).unwrap()
            == std::fs::read(t.path().join("big.img")).unwrap()
    );
    assert!(livemount_ok(&["verify", "--repo", &repo_s]).contains("all good"));
}

#[tokio::test]
async fn changed_blocks_listing_a_disk_twice_or_past_its_end_is_refused_before_any_work() {
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("a.img"), &mixed_disk(MIB, 40));
    let cfg = kvm_config(t.path(), "cbt3", &[("a.img", "raw")]);
    let repo = init_repo(t.path(), 65536);
    let first = backup(&repo, &cfg).await;
    // The VM gains a disk after the parent; an extent past that new disk's end is an error too.
    write(&t.path().join("b.img"), &mixed_disk(MIB, 41));
    let cfg = kvm_config(t.path(), "cbt3", &[("a.img", "raw"), ("b.img", "raw")]);
    let cases = [
        r#"{"disks": {"a.img": [{"start": 0, "length": 1}], "vda": [{"start": 65536, "length": 1}]}}"#,
        r#"{"disks": {"b.img": [{"start": 1000000000000, "length": 5}]}}"#,
    ];
    for json in cases {
        let mut opts = BackupOptions::from_config_file(&cfg, &[]).unwrap();
        opts.parent = Some(first.snapshot);
        opts.changed = Some(ChangedBlocks::from_json(Path::new("c"), json.as_bytes()).unwrap());
        let before = chunk_files(repo.dir().unwrap()).len();
        let err = repo
            .backup(&opts, &NoProgress)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("twice") || err.contains("passes the end of disk b.img"),
            "{err}"
        );
        assert_eq!(
            chunk_files(repo.dir().unwrap()).len(),
            before,
            "nothing stored: {json}"
        );
    }
}

#[tokio::test]
async fn latest_never_silently_skips_an_unreadable_newer_snapshot() {
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("d.img"), &mixed_disk(MIB, 42));
    let cfg = kvm_config(t.path(), "lat", &[("d.img", "raw")]);
    let repo = init_repo(t.path(), 1 << 20);
    let old = backup(&repo, &cfg).await;
    let new = backup(&repo, &cfg).await;
    let path = repo
        .dir()
        .unwrap()
        .join("snapshots")
        .join(format!("{}.json", new.snapshot));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = repo
        .resolve(&SnapshotSpec::new("lat", None))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot be read") && err.contains("VM@TIME"),
        "{err}"
    );
    // Exact names still work.
    assert_eq!(
        repo.resolve(&SnapshotSpec::new(&old.name, None))
            .await
            .unwrap()
            .id,
        old.snapshot
    );
    let prefix = &old.snapshot.to_string()[..12];
    assert_eq!(
        repo.resolve(&SnapshotSpec::new(prefix, None))
            .await
            .unwrap()
            .id,
        old.snapshot
    );
}

#[tokio::test]
async fn restore_names_never_collide_and_a_failed_restore_leaves_nothing_complete() {
    let t = tempfile::tempdir().unwrap();
    for (dir, seed) in [("x", 43), ("z", 44), ("y", 45)] {
        std::fs::create_dir(t.path().join(dir)).unwrap();
        let name = if dir == "z" { "vdc-d.img" } else { "d.img" };
        let mut data = vec![0u8; MIB as usize];
        Rng::new(seed).fill(&mut data);
        write(&t.path().join(dir).join(name), &data);
    }
    let cfg = kvm_config(
        t.path(),
        "coll",
        &[
            ("x/d.img", "raw"),
            ("z/vdc-d.img", "raw"),
            ("y/d.img", "raw"),
        ],
    );
    let repo = init_repo(t.path(), 65536);
    let s = backup(&repo, &cfg).await;
    let out = t.path().join("out");
    let r = repo.restore(&s.snapshot, &out, &NoProgress).await.unwrap();
    let paths: std::collections::HashSet<_> = r.disks.iter().map(|d| d.path.clone()).collect();
    assert_eq!(paths.len(), 3, "three distinct files: {:?}", r.disks);
    for (d, dir) in r.disks.iter().zip(["x/d.img", "z/vdc-d.img", "y/d.img"]) {
        assert!(
            std::fs::read(&d.path).unwrap() == std::fs::read(t.path().join(dir)).unwrap(),
            "{}",
            d.path.display()
        );
    }

    // Remove a chunk of the last disk: the restore fails and leaves no disk behind.
    let image = repo
        .snapshot(&s.snapshot)
        .await
        .unwrap()
        .disk(2)
        .await
        .unwrap();
    let c = (0..image.block_count())
        .find_map(|b| image.chunk_of_block(b))
        .unwrap();
    let hex = c.to_hex();
    std::fs::remove_file(
        repo.dir()
            .unwrap()
            .join("chunks")
            .join(&hex[..2])
            .join(&hex),
    )
    .unwrap();
    let out2 = t.path().join("out2");
    assert!(repo.restore(&s.snapshot, &out2, &NoProgress).await.is_err());
    let left: Vec<_> = std::fs::read_dir(&out2)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "nothing left behind: {left:?}");
}

/// Every file under chunks/ decodes to bytes that hash to its name: a killed writer never
/// leaves a partial chunk under a real name (its temporaries stay in tmp/).
fn assert_every_chunk_file_is_whole(repo: &Path) {
    for f in chunk_files(repo) {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        let data = zstd::decode_all(&std::fs::read(&f).unwrap()[..])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            blake3::hash(&data).to_hex().as_str(),
            name,
            "{}",
            f.display()
        );
    }
}

/// A disk whose file name is NAME_MAX long: its restore must not make a longer name
/// (`NAME.partial`) on the way.
#[tokio::test]
async fn a_disk_with_a_255_byte_name_restores() {
    let t = tempfile::tempdir().unwrap();
    let name = format!("{}.img", "d".repeat(251));
    assert_eq!(name.len(), 255);
    let disk = mixed_disk(2 * MIB + 512, 9);
    write(&t.path().join(&name), &disk);
    let cfg = kvm_config(t.path(), "long", &[(&name, "raw")]);
    let repo = init_repo(t.path(), 1 << 20);
    let s = backup(&repo, &cfg).await;
    let out = t.path().join("out");
    let disks = restore_disks(&repo, &s.snapshot, &out).await;
    assert!(disks[0] == disk, "the disk differs after restore");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [name, "long.xml".to_string()]);
}
