//! Repositories on object storage, against a real Garage started by `scripts/garage`: backup,
//! verify and restore through the binary; a backup killed midway; a damaged object; bad input;
//! two serving agents and a backup sharing one bucket.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::garage::Garage;
use common::*;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// Every object key under `prefix/` in the bucket.
fn objects(g: &Garage, prefix: &str) -> Vec<String> {
    let client = g.client();
    let p = object_store::path::Path::from(prefix);
    rt().block_on(async {
        let list: Vec<_> = client.list(Some(&p)).try_collect().await.unwrap();
        let mut keys: Vec<String> = list.into_iter().map(|o| o.location.to_string()).collect();
        keys.sort();
        keys
    })
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Two raw disks of mixed content and a KVM config naming them.
fn vm(dir: &Path, name: &str, seed: u64, mib: u64) -> (std::path::PathBuf, Vec<Vec<u8>>) {
    let a = mixed_disk(mib * MIB + 512, seed);
    let b = mixed_disk(3 * MIB + 4096 + 7, seed + 100);
    let (fa, fb) = (format!("{name}-a.img"), format!("{name}-b.img"));
    write(&dir.join(&fa), &a);
    write(&dir.join(&fb), &b);
    let cfg = kvm_config(dir, name, &[(&fa, "raw"), (&fb, "raw")]);
    (cfg, vec![a, b])
}

#[test]
fn backup_verify_and_restore_through_garage_are_byte_identical() {
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    let (cfg, disks) = vm(t.path(), "s3vm", 1, 9);
    let url = g.url("site-a/repo");
    let env = &g.env;

    let init = json(&livemount_env_ok(
        &["repo", "init", &url, "--chunk-size", "256KiB", "--json"],
        env,
    ));
    assert_eq!(init["path"], url.as_str());
    assert!(
        objects(&g, "site-a/repo").contains(&"site-a/repo/livemount-repo.toml".to_string()),
        "the config object is there"
    );
    // A second init over a repository is refused and changes nothing.
    let again = livemount_env(&["repo", "init", &url], env);
    assert!(!again.status.success());
    let text = String::from_utf8_lossy(&again.stderr);
    assert!(text.contains("already exists"), "{text}");

    let first = json(&livemount_env_ok(
        &[
            "backup",
            "--repo",
            &url,
            "--config",
            cfg.to_str().unwrap(),
            "--json",
        ],
        env,
    ));
    assert!(first["new_chunks"].as_u64().unwrap() > 10, "{first}");
    // The same VM again: every chunk is in the bucket already.
    let second = json(&livemount_env_ok(
        &[
            "backup",
            "--repo",
            &url,
            "--config",
            cfg.to_str().unwrap(),
            "--json",
        ],
        env,
    ));
    assert_eq!(second["new_chunks"], 0, "{second}");

    let list = json(&livemount_env_ok(
        &["backups", "--repo", &url, "--json"],
        env,
    ));
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let verify = livemount_env_ok(&["verify", "--repo", &url], env);
    assert!(verify.contains("all good"), "{verify}");

    let to = t.path().join("out");
    livemount_env_ok(
        &[
            "restore",
            "--repo",
            &url,
            "s3vm",
            "--to",
            to.to_str().unwrap(),
        ],
        env,
    );
    for (i, want) in disks.iter().enumerate() {
        let name = format!("s3vm-{}.img", ["a", "b"][i]);
        assert!(
            std::fs::read(to.join(&name)).unwrap() == *want,
            "{name} differs after a restore from Garage"
        );
    }
    assert_eq!(
        std::fs::read(to.join("s3vm.xml")).unwrap(),
        std::fs::read(&cfg).unwrap()
    );
}

#[test]
fn a_backup_killed_midway_leaves_no_snapshot_in_the_bucket() {
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(7);
    let mut disk = vec![0u8; 96 * MIB as usize];
    rng.fill(&mut disk);
    write(&t.path().join("big.img"), &disk);
    drop(disk);
    let cfg = kvm_config(t.path(), "killed", &[("big.img", "raw")]);
    let url = g.url("k");
    let env = &g.env;
    livemount_env_ok(&["repo", "init", &url, "--chunk-size", "64KiB"], env);

    for kill_after in [1usize, 300] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_livemount"))
            .args(["backup", "--repo", &url, "--config", cfg.to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let mut killed = false;
        while start.elapsed() < Duration::from_secs(120) {
            if objects(&g, "k/chunks").len() >= kill_after {
                child.kill().unwrap();
                killed = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait().unwrap();
        assert!(
            killed,
            "the backup ended before {kill_after} chunks were stored"
        );
        assert!(
            objects(&g, "k/snapshots").is_empty(),
            "no manifest is stored"
        );
        let list = json(&livemount_env_ok(
            &["backups", "--repo", &url, "--json"],
            env,
        ));
        assert_eq!(
            list.as_array().unwrap().len(),
            0,
            "no partial snapshot is visible"
        );
        let verify = livemount_env_ok(&["verify", "--repo", &url], env);
        assert!(verify.contains("all good"), "{verify}");
    }
    // A backup after the kills completes and restores byte-identical.
    livemount_env_ok(
        &["backup", "--repo", &url, "--config", cfg.to_str().unwrap()],
        env,
    );
    let to = t.path().join("out");
    livemount_env_ok(
        &[
            "restore",
            "--repo",
            &url,
            "killed",
            "--to",
            to.to_str().unwrap(),
        ],
        env,
    );
    assert!(
        std::fs::read(to.join("big.img")).unwrap()
            == std::fs::read(t.path().join("big.img")).unwrap()
    );
    assert!(livemount_env_ok(&["verify", "--repo", &url], env).contains("all good"));
}

/// Runs livemount expecting failure; returns its stderr, checked to be one line that never
/// shows the secret key.
fn fails(args: &[&str], env: &[(String, String)], cwd: &Path, secret: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_livemount"))
        .args(args)
        .current_dir(cwd)
        .env("LIVEMOUNT_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {text}");
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "{args:?}: one line: {text}"
    );
    assert!(text.starts_with("error: "), "{args:?}: {text}");
    assert!(
        !text.contains(secret),
        "{args:?} printed the secret: {text}"
    );
    text
}

#[test]
fn bad_repository_input_is_one_clear_line_and_creates_nothing() {
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    let cwd = t.path();
    let secret = g.var("AWS_SECRET_ACCESS_KEY");
    let env = g.env.clone();
    let with = |k: &str, v: &str| {
        let mut e: Vec<(String, String)> = env.iter().filter(|(n, _)| n != k).cloned().collect();
        e.push((k.to_string(), v.to_string()));
        e
    };
    let good = g.url("bad-input");
    livemount_env_ok(&["repo", "init", &good], &env);
    let before = objects(&g, "");

    // An unknown scheme, for init and for a command that reads.
    let e = fails(&["repo", "init", "gs://bucket/x"], &env, cwd, &secret);
    assert!(e.contains("unknown URL scheme \"gs\""), "{e}");
    let e = fails(
        &["backups", "--repo", "file:///srv/repo"],
        &env,
        cwd,
        &secret,
    );
    assert!(e.contains("unknown URL scheme \"file\""), "{e}");
    // A missing bucket.
    let e = fails(
        &["backups", "--repo", "s3://no-such-bucket/x"],
        &env,
        cwd,
        &secret,
    );
    assert!(e.contains("no bucket \"no-such-bucket\""), "{e}");
    let e = fails(
        &["repo", "init", "s3://no-such-bucket/x"],
        &env,
        cwd,
        &secret,
    );
    assert!(e.contains("no bucket \"no-such-bucket\""), "{e}");
    // Wrong credentials: a wrong secret, and a key the store does not know.
    let e = fails(
        &["backups", "--repo", &good],
        &with("AWS_SECRET_ACCESS_KEY", &"0".repeat(64)),
        cwd,
        &secret,
    );
    assert!(e.contains("refused access"), "{e}");
    let e = fails(
        &["repo", "init", &g.url("other")],
        &with("AWS_ACCESS_KEY_ID", "GK000000000000000000000000"),
        cwd,
        &secret,
    );
    assert!(e.contains("refused access"), "{e}");
    // An endpoint where nothing listens: a clear error within seconds, not a hang.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let e = fails(
        &["backups", "--repo", &good],
        &with("AWS_ENDPOINT_URL", &format!("http://127.0.0.1:{port}")),
        cwd,
        &secret,
    );
    assert!(e.contains("cannot be reached"), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    // A bucket name given where a directory is read, and a path given as a bucket.
    let e = fails(&["backups", "--repo", "livemount"], &env, cwd, &secret);
    assert!(e.contains("for a bucket, write s3://livemount"), "{e}");
    let e = fails(&["backups", "--repo", "s3:///srv/repo"], &env, cwd, &secret);
    assert!(e.contains("names no bucket"), "{e}");
    // A prefix that holds no repository.
    let e = fails(&["backups", "--repo", &g.url("empty")], &env, cwd, &secret);
    assert!(e.contains("is not a livemount repository"), "{e}");
    // serve refuses the same before it makes its state directory.
    let state = t.path().join("state");
    let e = fails(
        &[
            "serve",
            "--repo",
            "s3://no-such-bucket/x",
            "--state",
            state.to_str().unwrap(),
            "--portmap",
            "off",
            "--nfs",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ],
        &env,
        cwd,
        &secret,
    );
    assert!(e.contains("no bucket"), "{e}");
    assert!(!state.exists(), "serve made its state directory");

    assert_eq!(objects(&g, ""), before, "nothing was written to the bucket");
    assert_eq!(
        std::fs::read_dir(cwd).unwrap().count(),
        0,
        "nothing was created in the working directory"
    );
}

#[test]
fn a_damaged_object_is_named_by_verify_and_fails_only_its_own_reads() {
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    let disk = mixed_disk(8 * MIB, 5);
    write(&t.path().join("d.img"), &disk);
    let cfg = kvm_config(t.path(), "dmg", &[("d.img", "raw")]);
    let url = g.url("dmg");
    let env = &g.env;
    livemount_env_ok(&["repo", "init", &url, "--chunk-size", "1MiB"], env);
    livemount_env_ok(
        &["backup", "--repo", &url, "--config", cfg.to_str().unwrap()],
        env,
    );

    // The first and the last non-zero blocks of the disk, and their chunks.
    let blocks: Vec<usize> = (0..8)
        .filter(|b| {
            disk[b * MIB as usize..(b + 1) * MIB as usize]
                .iter()
                .any(|x| *x != 0)
        })
        .collect();
    assert!(blocks.len() >= 2, "the disk needs two non-zero blocks");
    let (bad, good) = (blocks[0], *blocks.last().unwrap());
    let bad_id = blake3::hash(&disk[bad * MIB as usize..(bad + 1) * MIB as usize]).to_hex();
    let good_id = blake3::hash(&disk[good * MIB as usize..(good + 1) * MIB as usize]).to_hex();
    assert_ne!(bad_id, good_id);
    // Overwrite the bad block's object with the good block's bytes: a valid frame, wrong digest.
    let client = g.client();
    let key = |hex: &str| object_store::path::Path::from(format!("dmg/chunks/{}/{hex}", &hex[..2]));
    rt().block_on(async {
        let bytes = client
            .get(&key(&good_id))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        client.put(&key(&bad_id), bytes.into()).await.unwrap();
    });

    let out = livemount_env(&["verify", "--repo", &url], env);
    assert_eq!(out.status.code(), Some(1), "verify exits 1 on a bad chunk");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&bad_id[..16]),
        "verify names the chunk: {text}"
    );

    let server = Server::start_env(&url, &t.path().join("state"), "off", &[], env);
    server.cli(&["mount", "dmg", "--name", "dmg"]);
    rt().block_on(async {
        let mut c = common::nfs::connect(&server, "dmg").await;
        let root = c.root_nfs_fh3();
        let fh = common::nfs::lookup(&mut c, &root, "d.img").await.unwrap();
        let r = common::nfs::read_at(&mut c, &fh, bad as u64 * MIB + 4096, 4096).await;
        assert_eq!(
            r,
            Err(nfs3_types::nfs3::nfsstat3::NFS3ERR_IO),
            "the damaged block"
        );
        let ok = common::nfs::read_at(&mut c, &fh, good as u64 * MIB, 65536)
            .await
            .unwrap();
        assert!(
            ok == disk[good * MIB as usize..good * MIB as usize + 65536],
            "a sound block"
        );
        // The damaged block fails again (an error is not cached as data).
        let r = common::nfs::read_at(&mut c, &fh, bad as u64 * MIB, 512).await;
        assert_eq!(r, Err(nfs3_types::nfs3::nfsstat3::NFS3ERR_IO));
    });
}

#[test]
fn two_agents_and_a_backup_share_a_bucket() {
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    let url = g.url("shared");
    let env = &g.env;
    livemount_env_ok(&["repo", "init", &url, "--chunk-size", "256KiB"], env);
    let (cfg_a, disks_a) = vm(t.path(), "early", 21, 6);
    livemount_env_ok(
        &[
            "backup",
            "--repo",
            &url,
            "--config",
            cfg_a.to_str().unwrap(),
        ],
        env,
    );

    let one = Server::start_env(&url, &t.path().join("state1"), "off", &[], env);
    let two = Server::start_env(&url, &t.path().join("state2"), "off", &[], env);

    // A third process backs up a new VM while both agents serve the earlier one.
    let (cfg_b, disks_b) = vm(t.path(), "late", 22, 24);
    let backup = std::process::Command::new(env!("CARGO_BIN_EXE_livemount"))
        .args([
            "backup",
            "--repo",
            &url,
            "--config",
            cfg_b.to_str().unwrap(),
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    one.cli(&["mount", "early", "--name", "e1"]);
    two.cli(&["mount", "early", "--name", "e2"]);
    let size_a = disks_a[0].len() as u64;
    assert!(common::nfs::read_file(&one, "e1", "early-a.img", size_a) == disks_a[0]);
    assert!(common::nfs::read_file(&two, "e2", "early-a.img", size_a) == disks_a[0]);
    let status = backup.wait_with_output().unwrap();
    assert!(
        status.status.success(),
        "the concurrent backup failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );

    // Both agents see the snapshot made after they started, without a restart.
    one.cli(&["mount", "late", "--name", "l1"]);
    two.cli(&["mount", "late", "--name", "l2"]);
    let size_b = disks_b[0].len() as u64;
    assert!(common::nfs::read_file(&one, "l1", "late-a.img", size_b) == disks_b[0]);
    let size_b2 = disks_b[1].len() as u64;
    assert!(common::nfs::read_file(&two, "l2", "late-b.img", size_b2) == disks_b[1]);
    assert!(livemount_env_ok(&["verify", "--repo", &url], env).contains("all good"));
}

#[test]
fn a_three_node_store_rides_one_node_down_and_reads_heal_when_all_return() {
    let g = Garage::up(3);
    let t = tempfile::tempdir().unwrap();
    let disk = {
        let mut rng = Rng::new(31);
        let mut d = vec![0u8; 8 * MIB as usize];
        rng.fill(&mut d);
        d
    };
    write(&t.path().join("r.img"), &disk);
    let cfg = kvm_config(t.path(), "rep3", &[("r.img", "raw")]);
    let url = g.url("rep3");
    let env = &g.env;
    livemount_env_ok(&["repo", "init", &url, "--chunk-size", "1MiB"], env);
    livemount_env_ok(
        &["backup", "--repo", &url, "--config", cfg.to_str().unwrap()],
        env,
    );
    // A short grace: with every node down, a held read ends in its I/O error within it
    // (tests/outage.rs has reads that ride an outage through).
    let server = Server::start_env(
        &url,
        &t.path().join("state"),
        "off",
        &[
            "--config",
            &no_read_ahead(t.path()),
            "--store-outage-grace",
            "5s",
        ],
        env,
    );
    server.cli(&["mount", "rep3", "--name", "rep3"]);
    let block = |b: u64| &disk[(b * MIB) as usize..((b + 1) * MIB) as usize];
    rt().block_on(async {
        let mut c = common::nfs::connect(&server, "rep3").await;
        let root = c.root_nfs_fh3();
        let fh = common::nfs::lookup(&mut c, &root, "r.img").await.unwrap();
        assert!(
            read_block(&mut c, &fh, 0).await.unwrap() == block(0),
            "block 0 (now cached)"
        );

        // One node of three down: reads go on (replication 3, quorum 2).
        g.kill_node(3);
        assert!(
            read_block(&mut c, &fh, 1).await.unwrap() == block(1),
            "block 1 with a node down"
        );

        // Every node down: an uncached read is an I/O error once its grace (5 s) is over; a
        // cached one is served.
        g.kill_node(2);
        g.kill_node(1);
        let start = Instant::now();
        assert_eq!(
            read_block(&mut c, &fh, 5).await,
            Err(nfs3_types::nfs3::nfsstat3::NFS3ERR_IO),
            "an uncached block with the store down"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
        assert!(
            read_block(&mut c, &fh, 0).await.unwrap() == block(0),
            "a cached block with the store down"
        );

        // The nodes return: the same read works again, with no restart of livemount.
        for i in 1..=3 {
            g.start_node(i);
        }
        let start = Instant::now();
        loop {
            match read_block(&mut c, &fh, 5).await {
                Ok(bytes) => {
                    assert!(bytes == block(5), "block 5 after the store returned");
                    break;
                }
                Err(e) => assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "block 5 still fails 60 s after the store returned: {e:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let log = server.log_text();
    assert!(
        !log.contains(&g.var("AWS_SECRET_ACCESS_KEY")),
        "the secret is in the log"
    );
}

async fn read_block(
    c: &mut common::nfs::Conn,
    fh: &nfs3_types::nfs3::nfs_fh3,
    b: u64,
) -> Result<Vec<u8>, nfs3_types::nfs3::nfsstat3> {
    common::nfs::read_at(c, fh, b * MIB, MIB as u32).await
}

/// A serve config that turns read-ahead off, so a test's reads fetch only what they name.
fn no_read_ahead(dir: &Path) -> String {
    let p = dir.join("serve.toml");
    write(&p, b"read_ahead = false\n");
    p.to_str().unwrap().to_string()
}

/// The guest's boot (its writes kept in QEMU): whether it reached its booted marker, and what
/// it printed.
fn boot_guest(url: &str, log: &Path) -> (bool, String) {
    let (ok, text) = common::boot_guest(url, log, ",snapshot=on", &[]);
    (ok && text.contains("LIVEMOUNT-GUEST-BOOTED"), text)
}

fn status(server: &Server) -> serde_json::Value {
    json(&server.cli(&["status", "--json"]))
}

#[test]
fn the_guest_boots_from_garage_through_a_node_killed_midway_and_its_storage_wait_is_counted() {
    let image = guest_image();
    let g = Garage::up(3);
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let cfg = kvm_config(t.path(), "s3guest", &[("guest.img", "raw")]);
    let url = g.url("guest");
    let env = &g.env;
    livemount_env_ok(&["repo", "init", &url], env);
    livemount_env_ok(
        &["backup", "--repo", &url, "--config", cfg.to_str().unwrap()],
        env,
    );

    let _port111 = port_111_lock();
    let server = Server::start_env(&url, &t.path().join("state"), "127.0.0.1:111", &[], env);
    server.cli(&["mount", "s3guest", "--name", "s3g"]);
    let before = status(&server)["repository_fetches"]["fetches"]
        .as_u64()
        .unwrap();

    let log = t.path().join("serial.log");
    let booting =
        std::thread::spawn(move || boot_guest("nfs://127.0.0.1/livemount/s3g/guest.img", &log));
    // Once the boot has fetched a few chunks, a node of the three goes down.
    let start = Instant::now();
    while status(&server)["repository_fetches"]["fetches"]
        .as_u64()
        .unwrap()
        < before + 3
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the boot fetched nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    g.kill_node(3);
    assert!(
        !booting.is_finished(),
        "the boot ended before the node was killed; the test needs an earlier kill"
    );
    let (ok, text) = booting.join().unwrap();
    assert!(
        ok,
        "the guest did not boot from Garage with a node down:\n{text}\nserver:\n{}",
        server.log_text()
    );
    let fetched = status(&server)["repository_fetches"]["fetches"]
        .as_u64()
        .unwrap()
        - before;
    assert!(fetched > 10, "the boot fetched {fetched} objects");

    // The boot window counted how long the VM's reads waited for the store.
    let mounts = json(&server.cli(&["mounts", "--json"]));
    let w = &mounts[0]["boot"]["window"];
    let wait = w["storage_wait_seconds"].as_f64().unwrap();
    assert!(w["misses"].as_u64().unwrap() > 10, "{w}");
    assert!(
        wait > 0.0,
        "a cold boot from object storage waited for it: {w}"
    );
    let metrics = server.metrics();
    assert!(
        metrics.contains("livemount_boot_storage_wait_seconds{mount=\"s3g\"}"),
        "{metrics}"
    );
    eprintln!("cold boot from Garage (3 nodes, one killed): {fetched} fetches, storage wait {wait:.3} s, window {w}");
}

#[test]
fn after_a_restart_the_guest_boots_from_the_disk_cache_without_a_fetch() {
    let image = guest_image();
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let cfg = kvm_config(t.path(), "dcguest", &[("guest.img", "raw")]);
    let url = g.url("dc");
    let env = &g.env;
    livemount_env_ok(&["repo", "init", &url], env);
    livemount_env_ok(
        &["backup", "--repo", &url, "--config", cfg.to_str().unwrap()],
        env,
    );
    let cache_dir = t.path().join("disk-cache");
    let extra = [
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "--cache-disk-size",
        "1GiB",
    ];
    let state = t.path().join("state");
    let _port111 = port_111_lock();
    let server = Server::start_env(&url, &state, "127.0.0.1:111", &extra, env);
    server.cli(&["mount", "dcguest", "--name", "first"]);
    let (ok, text) = boot_guest(
        "nfs://127.0.0.1/livemount/first/guest.img",
        &t.path().join("1.log"),
    );
    assert!(ok, "first boot:\n{text}\nserver:\n{}", server.log_text());
    // Every chunk fetched went to disk (written in the background).
    let start = Instant::now();
    loop {
        let d = status(&server)["cache"]["disk"].clone();
        if d["writes_queued"] == 0 && d["entries"].as_u64().unwrap() > 10 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "disk writes still queued: {d}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    server.cli(&["unmount", "first"]);
    assert!(server.stop().success());

    // A restart: an empty memory cache, the same disk cache. A new mount of the snapshot boots
    // with every read of its boot window a hit and no repository fetch.
    let server = Server::start_env(&url, &state, "127.0.0.1:111", &extra, env);
    server.cli(&["mount", "dcguest", "--name", "second", "--prestage", "off"]);
    let before = status(&server)["repository_fetches"]["fetches"]
        .as_u64()
        .unwrap();
    let (ok, text) = boot_guest(
        "nfs://127.0.0.1/livemount/second/guest.img",
        &t.path().join("2.log"),
    );
    assert!(ok, "second boot:\n{text}\nserver:\n{}", server.log_text());
    let after = status(&server);
    assert_eq!(
        after["repository_fetches"]["fetches"].as_u64().unwrap(),
        before,
        "the boot from the disk cache fetched from the repository: {after}"
    );
    let mounts = json(&server.cli(&["mounts", "--json"]));
    let w = &mounts[0]["boot"]["window"];
    assert_eq!(w["misses"], 0, "{w}");
    assert!(w["hits"].as_u64().unwrap() > 10, "{w}");
    assert_eq!(w["storage_wait_seconds"].as_f64().unwrap(), 0.0, "{w}");
    assert!(
        after["cache"]["disk"]["hits"].as_u64().unwrap() > 10,
        "{after}"
    );
    let m = server.metrics();
    assert!(m.contains("livemount_disk_cache_hits_total"), "{m}");
}

#[test]
fn a_damaged_disk_cache_entry_is_fetched_again_and_never_served() {
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(41);
    let mut disk = vec![0u8; 4 * MIB as usize];
    rng.fill(&mut disk);
    write(&t.path().join("c.img"), &disk);
    let cfg = kvm_config(t.path(), "dce", &[("c.img", "raw")]);
    let url = g.url("dce");
    let env = &g.env;
    livemount_env_ok(&["repo", "init", &url], env);
    livemount_env_ok(
        &["backup", "--repo", &url, "--config", cfg.to_str().unwrap()],
        env,
    );
    let cache_dir = t.path().join("dc");
    let extra = [
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "--cache-disk-size",
        "64MiB",
        "--config",
        &no_read_ahead(t.path()),
    ];
    let state = t.path().join("state");
    let server = Server::start_env(&url, &state, "off", &extra, env);
    server.cli(&["mount", "dce", "--name", "dce"]);
    assert!(common::nfs::read_file(&server, "dce", "c.img", disk.len() as u64) == disk);
    let start = Instant::now();
    while status(&server)["cache"]["disk"]["entries"]
        .as_u64()
        .unwrap()
        < 4
    {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.stop().success());

    // Damage block 2's entry on disk (one flipped byte), then read everything again after a
    // restart: the right bytes, one more fetch, the entry dropped and written anew.
    let hex = blake3::hash(&disk[2 * MIB as usize..3 * MIB as usize]).to_hex();
    let entry = cache_dir.join("chunks").join(&hex[..2]).join(hex.as_str());
    let mut bytes = std::fs::read(&entry).unwrap();
    bytes[12345] ^= 0x40;
    std::fs::write(&entry, &bytes).unwrap();
    let server = Server::start_env(&url, &state, "off", &extra, env);
    let before = status(&server)["repository_fetches"]["fetches"]
        .as_u64()
        .unwrap();
    assert!(common::nfs::read_file(&server, "dce", "c.img", disk.len() as u64) == disk);
    let after = status(&server);
    assert_eq!(
        after["repository_fetches"]["fetches"].as_u64().unwrap(),
        before + 1,
        "only the damaged chunk is fetched again: {after}"
    );
    assert_eq!(after["cache"]["disk"]["dropped"], 1, "{after}");
    assert_eq!(after["cache"]["disk"]["hits"], 3, "{after}");
    assert!(server.log_text().contains("disk cache entry damaged"));
}

#[test]
fn prestage_warms_a_boot_set_into_the_disk_cache_before_any_mount() {
    let image = guest_image();
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let cfg = kvm_config(t.path(), "pguest", &[("guest.img", "raw")]);
    let url = g.url("pre");
    let env = &g.env;
    livemount_env_ok(&["repo", "init", &url], env);
    livemount_env_ok(
        &["backup", "--repo", &url, "--config", cfg.to_str().unwrap()],
        env,
    );
    let state = t.path().join("state");
    let _port111 = port_111_lock();

    // A first boot, with no disk cache, teaches the server the guest's boot profile.
    let server = Server::start_env(&url, &state, "127.0.0.1:111", &[], env);
    let out = livemount_env(
        &["prestage", "pguest", "--state", state.to_str().unwrap()],
        env,
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("no disk cache"),
        "{text}"
    );
    server.cli(&["mount", "pguest", "--name", "learn"]);
    let (ok, text) = boot_guest(
        "nfs://127.0.0.1/livemount/learn/guest.img",
        &t.path().join("1.log"),
    );
    assert!(ok, "first boot:\n{text}");
    server.cli(&["unmount", "learn"]); // ends the boot window: the profile is written
    assert!(server.stop().success());

    // A restart with an empty disk cache: warm the boot set, then mount and boot.
    let cache_dir = t.path().join("disk-cache");
    let extra = [
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "--cache-disk-size",
        "1GiB",
    ];
    let server = Server::start_env(&url, &state, "127.0.0.1:111", &extra, env);
    let out = livemount_env(
        &["prestage", "nosuchvm", "--state", state.to_str().unwrap()],
        env,
    );
    assert!(!out.status.success(), "an unknown VM is an error");
    let warmed = json(&server.cli(&["prestage", "pguest", "--json"]));
    let st = &warmed["status"];
    assert_eq!(st["finished"], true, "{warmed}");
    assert_eq!(st["failed"], 0, "{warmed}");
    assert!(st["fetched"].as_u64().unwrap() > 10, "{warmed}");
    assert_eq!(
        status(&server)["cache"]["disk"]["entries"]
            .as_u64()
            .unwrap(),
        st["chunks"].as_u64().unwrap(),
        "every chunk of the boot set is on disk"
    );
    // Warming again finds everything there.
    let again = json(&server.cli(&["prestage", "pguest", "--json"]));
    assert_eq!(again["status"]["fetched"], 0, "{again}");

    server.cli(&["mount", "pguest", "--name", "warm", "--prestage", "off"]);
    let (ok, text) = boot_guest(
        "nfs://127.0.0.1/livemount/warm/guest.img",
        &t.path().join("2.log"),
    );
    assert!(ok, "boot after prestage:\n{text}");
    let mounts = json(&server.cli(&["mounts", "--json"]));
    let w = &mounts[0]["boot"]["window"];
    assert_eq!(
        w["misses"], 0,
        "every read of the boot window was on disk: {w}"
    );
    assert_eq!(w["storage_wait_seconds"].as_f64().unwrap(), 0.0, "{w}");
}

/// Retention on object storage (issue 16): backups and `forget` + `prune` at the same time on
/// one bucket, as tests/retention.rs does on a directory. No lock exists on S3; prune sets
/// chunks aside (a server-side copy into trash/, then a delete) and deletes them only once the
/// backups that ran meanwhile have finished. Verify clean, every snapshot left restores
/// byte-identical, and nothing is left in trash/ or prune/.
#[test]
fn backups_and_prunes_at_once_on_garage_lose_no_chunk() {
    use common::retention::{backups_and_prunes_at_once, retention_config, RepoAt};
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    let url = g.url("retention/repo");
    livemount_env_ok(&["repo", "init", &url, "--chunk-size", "64KiB"], &g.env);
    let r = RepoAt {
        repo: url,
        config: retention_config(t.path(), "10s", ""),
        env: g.env.clone(),
    };
    backups_and_prunes_at_once(
        &r,
        t.path(),
        Duration::from_secs(40),
        Duration::from_secs(10),
    );
    assert!(objects(&g, "retention/repo/trash").is_empty());
    assert!(objects(&g, "retention/repo/prune").is_empty());
}
