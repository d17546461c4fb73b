//! A real hypervisor: QEMU (TCG) boots the project's test guest, its whole disk (MBR, syslinux,
//! kernel, root file system) read through a live mount over nfs://, found via our portmapper.
//!
//! The guest image is built by `scripts/build-guest` from Debian packages (reproducible; cached
//! in target/guest-image). The guest's writes go to the mount's overlay on the server.

mod common;

use common::*;

use common::boot_guest as boot;

#[test]
fn guest_boots_its_whole_disk_from_a_live_mount_over_nfs() {
    let image = guest_image();
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let cfg = kvm_config(t.path(), "lmguest", &[("guest.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);

    let _port111 = port_111_lock();
    let server = Server::start(&repo, &t.path().join("state"), "127.0.0.1:111", &[]);
    server.cli(&["mount", "lmguest"]);
    let url = "nfs://127.0.0.1/livemount/lmguest-lm1/guest.img";
    let log = t.path().join("serial.log");
    // First boot: the guest writes a file to its root file system (on the live mount).
    let write = [
        "-fw_cfg",
        "name=opt/livemount/write,string=kept-by-livemount",
    ];
    let (ok, text) = boot(url, &log, "", &write);
    assert!(
        ok,
        "the guest did not boot from the live mount:\n{text}\nserver:\n{}",
        server.log_text()
    );
    assert!(
        text.contains("LIVEMOUNT-GUEST-BOOTED") && text.contains("LIVEMOUNT-READ"),
        "{text}"
    );
    assert!(text.contains("LIVEMOUNT-WROTE kept-by-livemount"), "{text}");
    eprintln!(
        "{}",
        text.lines()
            .filter(|l| l.starts_with("boot-guest:"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Unmount keeping the writes, mount the same snapshot under the same name: the file is there.
    server.cli(&["unmount", "lmguest-lm1", "--keep-writes"]);
    server.cli(&["mount", "lmguest", "--name", "lmguest-lm1"]);
    let (ok, text) = boot(url, &log, "", &[]);
    assert!(
        ok && text.contains("LIVEMOUNT-FILE kept-by-livemount"),
        "kept writes are back:\n{text}"
    );

    // Unmount discarding the writes: a fresh mount shows the backup as it was.
    server.cli(&["unmount", "lmguest-lm1"]);
    server.cli(&["mount", "lmguest", "--name", "lmguest-lm1"]);
    let (ok, text) = boot(url, &log, ",snapshot=on", &[]);
    assert!(ok, "{text}");
    assert!(
        !text.contains("LIVEMOUNT-FILE"),
        "the discarded write is gone:\n{text}"
    );

    // The reads went through the server's cache: the boot read tens of MB from the repository.
    let status: serde_json::Value =
        serde_json::from_str(&server.cli(&["status", "--json"])).unwrap();
    assert!(status["cache"]["misses"].as_u64().unwrap() > 10, "{status}");
    // The backup is untouched: a fresh mount's disk still equals the image.
    let out = client(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            "nfs://127.0.0.1/livemount/lmguest-lm1/guest.img",
            image.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The VM's boot-window cache hits and misses so far, from `livemount mounts --json`.
fn window(server: &Server, mount: &str) -> (u64, u64) {
    let mounts: serde_json::Value =
        serde_json::from_str(&server.cli(&["mounts", "--json"])).unwrap();
    let m = mounts
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["spec"]["name"] == mount)
        .unwrap_or_else(|| panic!("no mount {mount}: {mounts}"));
    let w = &m["boot"]["window"];
    (w["hits"].as_u64().unwrap(), w["misses"].as_u64().unwrap())
}

/// Boot profiles end to end, against a repository slowed to a few ms per fetch: a first boot
/// (cold, no profile) learns the guest's profile; after a restart (empty cache) a mount with
/// `--prestage wait` has its boot set cached before the VM starts, and the VM's reads during
/// its boot window hit the cache more than 95 % of the time.
#[test]
fn a_learned_boot_profile_prestages_the_next_boot() {
    let image = guest_image();
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let cfg = kvm_config(t.path(), "lmguest", &[("guest.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let config = t.path().join("serve.toml");
    std::fs::write(
        &config,
        "[slow_repository]\nlatency = \"4ms\"\nbandwidth = \"200MB\"\n",
    )
    .unwrap();
    let extra = ["--config", config.to_str().unwrap()];
    let state = t.path().join("state");
    let log = t.path().join("serial.log");
    let url = "nfs://127.0.0.1/livemount/lmguest-lm1/guest.img";
    let _port111 = port_111_lock();

    // First boot: nothing to pre-stage, every first read waits for the slow repository.
    let server = Server::start(&repo, &state, "127.0.0.1:111", &extra);
    let out = server.cli(&["mount", "lmguest", "--prestage", "wait"]);
    assert!(out.contains("no boot profile for this VM yet"), "{out}");
    let (ok, text) = boot(url, &log, ",snapshot=on", &[]);
    assert!(ok, "{text}\nserver:\n{}", server.log_text());
    // (Read-ahead serves the guest's sequential file reads; its first reads of the boot loader,
    // kernel and scattered blocks wait for the repository.)
    let (hits, misses) = window(&server, "lmguest-lm1");
    eprintln!("first boot, cold: {hits} hits, {misses} misses");
    assert!(
        misses as f64 > 0.1 * (hits + misses) as f64,
        "cold first boot: {hits} hits, {misses} misses"
    );
    // Unmounting ends the boot window: the profile is written.
    server.cli(&["unmount", "lmguest-lm1"]);
    let profile: serde_json::Value =
        serde_json::from_str(&server.cli(&["profile", "show", "lmguest", "--json"])).unwrap();
    assert_eq!(profile["boots"], 1, "{profile}");
    let blocks = profile["blocks"].as_array().unwrap().len();
    assert!(blocks > 10, "the boot read tens of MB: {profile}");
    if let Some(keep) = std::env::var_os("LIVEMOUNT_SAVE_PROFILE") {
        std::fs::copy(state.join("profiles/lmguest.json"), keep).unwrap();
    }
    assert!(server.stop().success());

    // A fresh server (empty cache); the profile is in the state directory.
    let server = Server::start(&repo, &state, "127.0.0.1:111", &extra);
    let reply: serde_json::Value = serde_json::from_str(&server.cli(&[
        "mount",
        "lmguest",
        "--name",
        "lmguest-lm1",
        "--prestage",
        "wait",
        "--json",
    ]))
    .unwrap();
    let p = &reply["mount"]["boot"]["prestage"];
    assert_eq!(p["finished"], true, "{reply}");
    assert_eq!(p["chunks"].as_u64().unwrap(), blocks as u64, "{reply}");
    assert_eq!(p["failed"], 0, "{reply}");
    let (ok, text) = boot(url, &log, ",snapshot=on", &[]);
    assert!(ok, "{text}\nserver:\n{}", server.log_text());
    let (hits, misses) = window(&server, "lmguest-lm1");
    let ratio = hits as f64 / (hits + misses) as f64;
    eprintln!(
        "second boot, pre-staged: {hits} hits, {misses} misses ({:.1} %)",
        ratio * 100.0
    );
    assert!(ratio > 0.95, "{hits} hits, {misses} misses");
    server.cli(&["unmount", "lmguest-lm1"]);
    let profile: serde_json::Value =
        serde_json::from_str(&server.cli(&["profile", "show", "lmguest", "--json"])).unwrap();
    assert_eq!(profile["boots"], 2, "the second boot is merged too");
}

/// Relocation end to end with a real hypervisor: a guest boots from a live mount and keeps
/// writing files and reading; meanwhile its disk is relocated, and the server is killed and
/// restarted mid-copy. Once the guest has powered off, the handover verifies the copy; the
/// copy equals the mount's final view, and the guest boots from it with all its files.
/// Boots the test guest from mount MOUNT over NFS in the background, busy for `seconds` (it
/// writes files and reads its libraries again in a loop), and returns once it has booted.
fn boot_busy(
    mount: &str,
    log: &std::path::Path,
    seconds: u32,
) -> std::thread::JoinHandle<(bool, String)> {
    let url = format!("nfs://127.0.0.1/livemount/{mount}/guest.img");
    let busy = format!("name=opt/livemount/busy,string={seconds}");
    boot_guest_until(&url, log, "", &["-fw_cfg", &busy], "LIVEMOUNT-GUEST-BOOTED")
}

#[test]
fn a_running_guest_is_relocated_through_a_kill_and_boots_from_its_new_home() {
    let image = guest_image();
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let cfg = kvm_config(t.path(), "lmguest", &[("guest.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let state = t.path().join("state");
    let dest = t.path().join("primary/lmguest");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nfs = format!("127.0.0.1:{port}");
    let config = relocate_config(t.path(), &[&t.path().join("primary")], "");
    let args = ["--nfs", nfs.as_str(), "--config", config.to_str().unwrap()];
    let _port111 = port_111_lock();
    let server = Server::start(&repo, &state, "127.0.0.1:111", &args);
    server.cli(&["mount", "lmguest", "--name", "lmguest-lm1"]);

    let log = t.path().join("serial.log");
    let guest = boot_busy("lmguest-lm1", &log, 30);
    // The guest is running: relocate it, slowly enough that the kill lands mid-copy.
    server.cli(&[
        "relocate",
        "lmguest-lm1",
        "--to",
        dest.to_str().unwrap(),
        "--rate",
        "5",
    ]);
    std::thread::sleep(std::time::Duration::from_secs(4));
    server.kill();
    let server = Server::start(&repo, &state, "127.0.0.1:111", &args);
    let r = relocation_of(&server, "lmguest-lm1").expect("a relocation");
    assert!(
        r["copied"].as_u64().unwrap() > 0,
        "the copy resumes from its checkpoint: {r}"
    );

    let (ok, text) = guest.join().unwrap();
    assert!(ok, "{text}\nserver:\n{}", server.log_text());
    let files = text
        .lines()
        .find(|l| l.starts_with("LIVEMOUNT-BUSY-FILES"))
        .unwrap_or_else(|| panic!("no busy files: {text}"))
        .trim()
        .to_string();
    let busy = text
        .lines()
        .find(|l| l.starts_with("LIVEMOUNT-BUSY "))
        .unwrap_or_else(|| panic!("{text}"));
    eprintln!("first run: {busy}; {files}");
    assert!(!files.contains("BUSY-FILES 0 "), "{files}");

    let t0 = std::time::Instant::now();
    while relocation_of(&server, "lmguest-lm1").expect("a relocation")["phase"] != "synced" {
        assert!(t0.elapsed().as_secs() < 120, "{}", server.log_text());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The guest is stopped: the mount's final view, read over NFS.
    let view = t.path().join("view.img");
    let out = client(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            "nfs://127.0.0.1/livemount/lmguest-lm1/guest.img",
            view.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(std::time::Duration::from_millis(3200));
    let out = server.cli(&["relocate", "--finish", "lmguest-lm1"]);
    assert!(out.contains("handed over"), "{out}");
    assert!(
        std::fs::read(dest.join("guest.img")).unwrap() == std::fs::read(&view).unwrap(),
        "the relocated disk differs from the mount's final view"
    );
    let xml = std::fs::read_to_string(dest.join("lmguest.xml")).unwrap();
    assert!(xml.contains(&format!(
        "<source file='{}'/>",
        dest.join("guest.img").display()
    )));

    // The guest boots from its new home with every file it wrote.
    let (ok, text) = boot(dest.join("guest.img").to_str().unwrap(), &log, "", &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&files),
        "the files are in the relocated disk: want {files}\n{text}"
    );
}

/// Issue 16: a guest boots and writes from a live mount, and keeps running and reading while
/// its repository is forgotten around it and pruned. The mounted snapshot cannot be forgotten
/// (named: refused; under a policy: kept as in use); an earlier backup of the same VM and
/// another VM's snapshot are forgotten and pruned. The server's cache is small (8 MiB), so the
/// guest's reads after the prune (it drops its page cache and reads its files again in a loop)
/// are fetched from the repository. Then verify is clean.
#[test]
fn a_running_guest_rides_through_forget_and_prune_of_its_repository() {
    let image = guest_image();
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let cfg = kvm_config(t.path(), "lmguest", &[("guest.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let config = t.path().join("retention.toml");
    std::fs::write(&config, "[retention]\nlease_expiry = \"10s\"\n").unwrap();
    let lm = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&[
            "--repo",
            repo.to_str().unwrap(),
            "--repo-config",
            config.to_str().unwrap(),
        ]);
        livemount(&a)
    };
    let ok = |args: &[&str]| {
        let out = lm(args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // A second backup of the guest (the one mounted), and another VM's.
    ok(&["backup", "--config", cfg.to_str().unwrap()]);
    let mut other = vec![0u8; 8 << 20];
    Rng::new(16).fill(&mut other);
    write(&t.path().join("other.img"), &other);
    let other_cfg = kvm_config(t.path(), "other", &[("other.img", "raw")]);
    ok(&["backup", "--config", other_cfg.to_str().unwrap()]);
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&ok(&["backups", "--json"]))
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let guest_snaps: Vec<&String> = names.iter().filter(|n| n.starts_with("lmguest@")).collect();
    assert_eq!(guest_snaps.len(), 2, "{names:?}");
    let (older, mounted) = (guest_snaps[0].clone(), guest_snaps[1].clone());

    let _port111 = port_111_lock();
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "127.0.0.1:111",
        &["--config", config.to_str().unwrap(), "--cache-size", "8MiB"],
    );
    server.cli(&["mount", &mounted, "--name", "lmguest-lm1"]);
    let log = t.path().join("serial.log");
    let guest = boot_busy("lmguest-lm1", &log, 45);

    // The mounted snapshot: refused by name, kept as in use under a policy.
    let out = lm(&["forget", &mounted]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("mount lmguest-lm1"),
        "{err}"
    );
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&["forget", "lmguest", "--keep-last", "0", "--json"])).unwrap();
    assert_eq!(plan["forgotten"], serde_json::json!([older]), "{plan}");
    assert!(
        plan["keep"][0]["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("in use: mount lmguest-lm1"),
        "{plan}"
    );
    ok(&["forget", "other", "--keep-last", "0"]);
    // Forgotten manifests count for one lease expiry (10 s); then the prune takes what only
    // they needed, while the guest runs.
    std::thread::sleep(std::time::Duration::from_secs(11));
    let fetched = |s: &Server| {
        let v: serde_json::Value = serde_json::from_str(&s.cli(&["status", "--json"])).unwrap();
        v["repository_fetches"]["fetches"].as_u64().unwrap()
    };
    let p: serde_json::Value = serde_json::from_str(&ok(&["prune", "--json"])).unwrap();
    eprintln!("prune beside the running guest: {p}");
    assert!(p["deleted"]["chunks"].as_u64().unwrap() >= 8, "{p}");
    let after_prune = fetched(&server);
    assert!(
        !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("LIVEMOUNT-BUSY-FILES"),
        "the guest was still running when the prune ended"
    );

    let (booted, text) = guest.join().unwrap();
    assert!(booted, "{text}\nserver:\n{}", server.log_text());
    assert!(!text.contains("BUSY-FILES 0 "), "{text}");
    assert!(
        fetched(&server) > after_prune,
        "the guest's reads after the prune were fetched from the repository"
    );
    let out = lm(&["verify"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ok(&["backups", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(server.stop().success());
}
