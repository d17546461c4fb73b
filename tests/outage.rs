//! Riding through an outage of the repository's store (issue 23) with real clients: libnfs's
//! nfs-cat reads a live-mounted disk while the repository is away (its folder moved aside,
//! which the local store reports as unreachable, as an unmounted share would be). Within the
//! grace the read is held and then served whole; past it the read fails cleanly and the next
//! one, once the store is back, is served without a restart. `status`, `mounts` and
//! `/metrics` tell the outage while it lasts. And the test guest, booting under QEMU from a
//! snapshot in Garage, rides through 30 s with every Garage node stopped. An agent killed
//! during an outage starts again while the store is still down and serves its mounts.

mod common;

use std::time::{Duration, Instant};

use common::garage::Garage;
use common::*;

fn status(server: &Server) -> serde_json::Value {
    serde_json::from_str(&server.cli(&["status", "--json"])).unwrap()
}

/// Waits until `status` says what `ok` wants, or panics after 30 s.
fn wait_status(
    server: &Server,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = status(server);
        if ok(&s) {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what}: {s:#}\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_nfs_read_is_held_through_a_store_outage_and_served_when_it_ends() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(6 * MIB, 23);
    let repo = repo_with_disk(t.path(), "ride", &raw);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--store-outage-grace", "60s"],
    );
    server.cli(&["mount", "ride", "--name", "ride"]);
    let s = status(&server);
    assert_eq!(s["store"]["reachable"], true, "{s:#}");
    assert_eq!(s["store"]["grace_seconds"], 60.0, "{s:#}");

    let away = t.path().join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let url = server.libnfs_url("ride/d.img");
    let started = Instant::now();
    let reader = std::thread::spawn(move || client("nfs-cat", &[&url]));
    let s = wait_status(&server, "the outage is told", |s| {
        s["store"]["reachable"] == false && s["store"]["held_reads"].as_u64() >= Some(1)
    });
    assert!(s["store"]["unreachable_since"].is_string(), "{s:#}");
    assert!(
        s["store"]["error"]
            .as_str()
            .unwrap()
            .contains("cannot be reached"),
        "{s:#}"
    );
    let text = server.cli(&["status"]);
    assert!(text.contains("UNREACHABLE since"), "{text}");
    let text = server.cli(&["mounts"]);
    assert!(text.contains("store: UNREACHABLE"), "{text}");
    let m = server.metrics();
    assert!(m.contains("livemount_store_up 0"), "{m}");
    assert!(!m.contains("livemount_store_held_reads 0\n"), "{m}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!reader.is_finished(), "the read must be held, not failed");

    std::fs::rename(&away, &repo).unwrap();
    let out = reader.join().unwrap();
    assert!(out.status.success(), "nfs-cat: {}", output_text(&out));
    assert!(
        out.stdout == raw,
        "nfs-cat read other bytes after the outage"
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
    let s = wait_status(&server, "the recovery is told", |s| {
        s["store"]["reachable"] == true
    });
    assert_eq!(s["store"]["outages"], 1, "{s:#}");
    assert_eq!(s["store"]["held_reads"], 0, "{s:#}");
    assert!(
        s["store"]["last_outage"]["seconds"].as_f64().unwrap() >= 3.0,
        "{s:#}"
    );
    assert!(
        server.log_text().contains("reachable again"),
        "{}",
        server.log_text()
    );
    let m = server.metrics();
    assert!(m.contains("livemount_store_up 1"), "{m}");
    assert!(m.contains("livemount_store_outages_total 1"), "{m}");
    assert!(
        !m.contains("livemount_store_held_read_seconds_count 0\n"),
        "{m}"
    );
}

#[test]
fn past_the_grace_a_held_read_fails_cleanly_and_the_next_is_served_without_a_restart() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(4 * MIB, 29);
    let repo = repo_with_disk(t.path(), "late", &raw);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--store-outage-grace", "2s"],
    );
    server.cli(&["mount", "late", "--name", "late"]);
    let away = t.path().join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let url = server.libnfs_url("late/d.img");
    let started = Instant::now();
    let out = client("nfs-cat", &[&url]);
    assert!(
        !out.status.success(),
        "a read past the grace must fail: {}",
        output_text(&out)
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(30),
        "failed after {took:?}"
    );
    assert!(
        server.log_text().contains("longer than store_outage_grace"),
        "{}",
        server.log_text()
    );

    std::fs::rename(&away, &repo).unwrap();
    let out = client("nfs-cat", &[&url]);
    assert!(
        out.status.success(),
        "nfs-cat after the outage: {}",
        output_text(&out)
    );
    assert!(
        out.stdout == raw,
        "nfs-cat read other bytes after the outage"
    );
    assert_eq!(status(&server)["store"]["reachable"], true);
}

#[test]
fn held_reads_do_not_keep_writes_and_cached_reads_out_of_the_call_memory() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(8 * MIB, 29);
    let repo = repo_with_disk(t.path(), "held", &raw);
    // Call memory for 4 READs of 1 MiB: 6 readers held through the outage fill it.
    let config = t.path().join("serve.toml");
    std::fs::write(&config, "call_memory = \"4MiB\"\nread_ahead = false\n").unwrap();
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &[
            "--config",
            config.to_str().unwrap(),
            "--store-outage-grace",
            "60s",
        ],
    );
    let m: serde_json::Value =
        serde_json::from_str(&server.cli(&["mount", "held", "--name", "h", "--json"])).unwrap();
    let config_name = m["mount"]["config"].as_str().unwrap().to_string();

    let away = t.path().join("repo-away");
    std::fs::rename(&repo, &away).unwrap();
    let readers: Vec<_> = (0..6)
        .map(|_| {
            let url = server.libnfs_url("h/d.img");
            std::thread::spawn(move || client("nfs-cat", &[&url]))
        })
        .collect();
    wait_status(&server, "the reads are held", |s| {
        s["store"]["held_reads"].as_u64() >= Some(1)
    });
    // Past budget::PRESSURE_AFTER: the held reads have given their room back.
    std::thread::sleep(Duration::from_secs(2));
    assert!(readers.iter().all(|r| !r.is_finished()), "reads are held");

    // A read that needs no store and a write (the mount folder is local) go on meanwhile.
    let t0 = Instant::now();
    let out = client(
        "nfs-cat",
        &[&server.libnfs_url(&format!("h/{config_name}"))],
    );
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("<domain"),
        "{}",
        output_text(&out)
    );
    let local = t.path().join("note.txt");
    std::fs::write(&local, b"written during the outage\n").unwrap();
    let out = client(
        "nfs-cp",
        &[local.to_str().unwrap(), &server.libnfs_url("h/note.txt")],
    );
    assert!(out.status.success(), "nfs-cp: {}", output_text(&out));
    let out = client("nfs-cat", &[&server.libnfs_url("h/note.txt")]);
    assert_eq!(
        out.stdout,
        b"written during the outage\n",
        "{}",
        output_text(&out)
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the cached read and the write took {took:?}"
    );
    assert!(readers.iter().all(|r| !r.is_finished()), "reads are held");
    assert!(
        !server.log_text().contains("is cut"),
        "no connection of held reads is cut: {}",
        server.log_text()
    );

    std::fs::rename(&away, &repo).unwrap();
    for r in readers {
        let out = r.join().unwrap();
        assert!(out.status.success(), "nfs-cat: {}", output_text(&out));
        assert!(
            out.stdout == raw,
            "nfs-cat read other bytes after the outage"
        );
    }
    eprintln!("cached read and write during the outage, with the call memory full of held reads: {took:?}");
}

#[test]
fn a_bad_grace_is_refused_with_the_setting_named() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "g", &mixed_disk(MIB, 3));
    for (grace, says) in [
        ("soon", "--store-outage-grace \"soon\""),
        ("2h", "above 3600 s"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_livemount"))
            .args(["serve", "--repo", repo.to_str().unwrap(), "--state"])
            .arg(t.path().join("state"))
            .args([
                "--nfs",
                "127.0.0.1:0",
                "--api",
                "127.0.0.1:0",
                "--portmap",
                "off",
            ])
            .args(["--store-outage-grace", grace])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let text = output_text(&out);
        assert!(text.contains(says), "{grace}: {text}");
    }
}

/// A repository under `prefix` of Garage's bucket holding one backup of the VM of `cfg`.
fn backed_up(g: &Garage, prefix: &str, cfg: &std::path::Path) -> String {
    let url = g.url(prefix);
    livemount_env_ok(&["repo", "init", &url], &g.env);
    livemount_env_ok(
        &["backup", "--repo", &url, "--config", cfg.to_str().unwrap()],
        &g.env,
    );
    url
}

/// A serve config with every fetch slowed to 200 ms and no read-ahead, so that the guest's
/// reads after its init starts (24 MiB of files the boot has not touched) take seconds and
/// an outage begun at that moment surely comes while it still reads.
fn slow_config(dir: &std::path::Path) -> std::path::PathBuf {
    let config = dir.join("slow.toml");
    std::fs::write(
        &config,
        "read_ahead = false\n[slow_repository]\nlatency = \"200ms\"\n",
    )
    .unwrap();
    config
}

#[test]
fn a_guest_booting_from_garage_rides_through_30_s_without_any_node_and_keeps_its_writes() {
    let image = guest_image();
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let cfg = kvm_config(t.path(), "ogst", &[("guest.img", "raw")]);
    let url = backed_up(&g, "outage", &cfg);
    let env = &g.env;
    let _port111 = port_111_lock();
    // The default grace (120 s): the outage below is well within it; slow fetches, so that it
    // surely comes while the guest reads.
    let config = slow_config(t.path());
    let server = Server::start_env(
        &url,
        &t.path().join("state"),
        "127.0.0.1:111",
        &["--config", config.to_str().unwrap()],
        env,
    );
    server.cli(&["mount", "ogst", "--name", "og"]);
    let word = "rode-through-30s";
    let log = t.path().join("serial.log");
    let write = format!("name=opt/livemount/write,string={word}");
    // Once the guest's kernel runs its init (which goes on to read files the boot has not
    // touched, then writes one), the store goes away: its one node is killed.
    let booting = boot_guest_until(
        "nfs://127.0.0.1/livemount/og/guest.img",
        &log,
        "",
        &["-fw_cfg", &write],
        "LIVEMOUNT-GUEST-BOOTED",
    );
    g.kill_node(1);
    let down = Instant::now();
    if booting.is_finished() {
        let (_, out) = booting.join().unwrap();
        panic!("the boot ended before the store went away; the test needs an earlier kill:\n{out}");
    }
    let s = wait_status(&server, "the guest's reads are held", |s| {
        s["store"]["reachable"] == false && s["store"]["held_reads"].as_u64() >= Some(1)
    });
    eprintln!("store away: {}", s["store"]);
    while down.elapsed() < Duration::from_secs(30) {
        assert!(
            !booting.is_finished(),
            "the guest must wait, not fail or finish"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    g.start_node(1);
    let (ok, out) = booting.join().unwrap();
    assert!(
        ok && out.contains(&format!("LIVEMOUNT-WROTE {word}"))
            && out.contains("LIVEMOUNT-GUEST-DONE"),
        "the guest did not finish after the outage:\n{out}\nserver:\n{}",
        server.log_text()
    );
    for bad in [
        "I/O error",
        "blk_update_request",
        "EXT4-fs error",
        "Buffer I/O",
    ] {
        assert!(!out.contains(bad), "the guest saw {bad:?}:\n{out}");
    }
    let s = wait_status(&server, "the recovery is told", |s| {
        s["store"]["reachable"] == true
    });
    let last = s["store"]["last_outage"]["seconds"].as_f64().unwrap();
    assert!(last >= 25.0, "{s:#}");
    eprintln!("outage ridden through: {}", s["store"]);

    // The guest's write is in the mount's overlay: the next boot reads it back.
    let (ok, out) = boot_guest(
        "nfs://127.0.0.1/livemount/og/guest.img",
        &t.path().join("serial2.log"),
        "",
        &[],
    );
    assert!(
        ok && out.contains(&format!("LIVEMOUNT-FILE {word}")),
        "the guest's write is gone:\n{out}"
    );
}

#[test]
fn under_libvirt_an_outage_past_the_grace_pauses_the_vm_and_virsh_resume_goes_on() {
    libvirt_up();
    let image = guest_image();
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let console = t.path().join("console.log");
    let vm = format!("lmout{}", std::process::id());
    let xml = format!(
        "<domain type='qemu'>\n  <name>{vm}</name>\n  <uuid>41111111-2222-4333-8444-666666666666</uuid>\n  \
         <memory unit='KiB'>262144</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\n  \
         <features><acpi/></features>\n  <on_poweroff>destroy</on_poweroff>\n  <devices>\n    \
         <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
         <source file='guest.img'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    \
         <serial type='file'><source path='{}'/><target port='0'/></serial>\n  </devices>\n</domain>\n",
        console.display()
    );
    let cfg = t.path().join(format!("{vm}.xml"));
    std::fs::write(&cfg, xml).unwrap();
    let url = backed_up(&g, "paused", &cfg);
    let env = &g.env;
    let _port111 = port_111_lock();
    // A grace well inside the outage: the held read fails, and libvirt's policy takes over.
    // Slow fetches and no read-ahead, as above, so that the outage surely comes while the
    // guest still reads.
    let config = slow_config(t.path());
    let server = Server::start_env(
        &url,
        &t.path().join("state"),
        "127.0.0.1:111",
        &[
            "--store-outage-grace",
            "10s",
            "--config",
            config.to_str().unwrap(),
        ],
        env,
    );
    server.cli(&["mount", &vm]);
    let mount = format!("{vm}-lm1");
    let def = client(
        "nfs-cat",
        &[&server.libnfs_url(&format!("{mount}/{vm}.xml"))],
    );
    assert!(def.status.success(), "{}", output_text(&def));
    let def_path = t.path().join("def.xml");
    std::fs::write(&def_path, &def.stdout).unwrap();
    let _domain = Domain(mount.clone());
    for args in [
        vec!["define", def_path.to_str().unwrap()],
        vec!["start", &mount],
    ] {
        let out = virsh(&args);
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            output_text(&out)
        );
    }
    let console_has = |what: &str| {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains(what)
    };
    let t0 = Instant::now();
    while !console_has("LIVEMOUNT-GUEST-BOOTED") {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no boot under libvirt"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest's init goes on to read files the boot has not touched: the store goes away.
    g.kill_node(1);
    let down = Instant::now();
    let state = || {
        String::from_utf8_lossy(&virsh(&["domstate", "--reason", &mount]).stdout)
            .trim()
            .to_string()
    };
    let paused = loop {
        let s = state();
        if s.contains("paused") {
            break s;
        }
        assert!(
            down.elapsed() < Duration::from_secs(80) && !console_has("LIVEMOUNT-GUEST-DONE"),
            "the domain did not pause ({s}) after {:?}:\n{}",
            down.elapsed(),
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(paused.contains("I/O error"), "{paused}");
    eprintln!(
        "domain {paused} after {:.1} s of outage",
        down.elapsed().as_secs_f64()
    );
    while down.elapsed() < Duration::from_secs(90) {
        assert!(
            state().contains("paused"),
            "the domain must stay paused: {}",
            state()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    g.start_node(1);
    // The probe sees the store back with no read coming; then the admin resumes.
    let s = wait_status(&server, "the store is seen back", |s| {
        s["store"]["reachable"] == true
    });
    eprintln!("store back: {}", s["store"]);
    let out = virsh(&["resume", &mount]);
    assert!(out.status.success(), "virsh resume: {}", output_text(&out));
    let t1 = Instant::now();
    while !console_has("LIVEMOUNT-GUEST-DONE") {
        assert!(
            t1.elapsed() < Duration::from_secs(120),
            "the guest did not finish after virsh resume ({}):\n{}",
            state(),
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("LIVEMOUNT-READ"), "{text}");
    for bad in [
        "I/O error",
        "blk_update_request",
        "EXT4-fs error",
        "Buffer I/O",
    ] {
        assert!(!text.contains(bad), "the guest saw {bad:?}:\n{text}");
    }
}

/// `qemu-io` over QEMU's NFS driver (through the portmapper on port 111) running `cmd` on the
/// raw file at `url`.
fn qemu_io(url: &str, cmd: &str) -> std::process::Output {
    client("qemu-io", &["-f", "raw", "-c", cmd, url])
}

fn qemu_io_ok(url: &str, cmd: &str) {
    let out = qemu_io(url, cmd);
    let text = output_text(&out);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmd:?}: {text}"
    );
}

#[test]
fn killed_during_an_outage_and_started_while_the_store_is_down_it_serves_its_mounts() {
    let g = Garage::up(1);
    let t = tempfile::tempdir().unwrap();
    // Two halves of one byte each: the first is read (cached) before the outage, the second
    // never is until the store is back.
    let mut raw = vec![0x11u8; 4 * MIB as usize];
    raw.resize(8 * MIB as usize, 0x22);
    write(&t.path().join("d.img"), &raw);
    let cfg = kvm_config(t.path(), "kept", &[("d.img", "raw")]);
    let url = backed_up(&g, "killed", &cfg);
    let env = &g.env;
    let _port111 = port_111_lock();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let nfs = format!("127.0.0.1:{port}");
    let config = t.path().join("serve.toml");
    std::fs::write(&config, "read_ahead = false\n").unwrap();
    let cache = t.path().join("cache");
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--nfs",
        &nfs,
        "--cache-dir",
        cache.to_str().unwrap(),
        "--cache-disk-size",
        "64MiB",
    ];
    let state = t.path().join("state");
    let server = Server::start_env(&url, &state, "127.0.0.1:111", &args, env);
    server.cli(&["mount", "kept", "--name", "k"]);
    let disk = "nfs://127.0.0.1/livemount/k/d.img";
    qemu_io_ok(disk, "read -P 0x11 1M 3M");
    qemu_io_ok(disk, "write -P 0x5a 0 1M");
    // The first half's chunk is in the disk cache (written behind the read).
    let t0 = Instant::now();
    while server.metrics().contains("livemount_disk_cache_bytes 0\n") {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{}",
            server.metrics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The store goes; a read of the second half is held; the agent is killed under it.
    g.kill_node(1);
    let held = std::thread::spawn(move || qemu_io(disk, "read -P 0x22 4M 1M"));
    wait_status(&server, "a read is held", |s| {
        s["store"]["held_reads"].as_u64() >= Some(1)
    });
    server.kill();

    // Started again while the store is still down: the repository and the mount come from
    // what the agent kept, and the mount is served.
    let t0 = Instant::now();
    let server = Server::start_env(&url, &state, "127.0.0.1:111", &args, env);
    let started = t0.elapsed();
    let log = server.log_text();
    assert!(log.contains("the repository cannot be reached"), "{log}");
    assert!(!log.contains("mount not served"), "{log}");
    let mounts = server.cli(&["mounts", "--json"]);
    assert!(mounts.contains("\"k\""), "{mounts}");
    // Overlay and cached data at once, with no store.
    qemu_io_ok(disk, "read -P 0x5a 0 1M");
    qemu_io_ok(disk, "read -P 0x11 1M 3M");
    // Uncached data waits for the store.
    let waiting = std::thread::spawn(move || qemu_io(disk, "read -P 0x22 4M 4M"));
    wait_status(&server, "the new read is held", |s| {
        s["store"]["reachable"] == false && s["store"]["held_reads"].as_u64() >= Some(1)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!waiting.is_finished(), "the read must wait for the store");
    g.start_node(1);
    let out = waiting.join().unwrap();
    let text = output_text(&out);
    assert!(
        out.status.success() && !text.contains("failed"),
        "after the store came back: {text}\n{}",
        server.log_text()
    );
    // The read that was held when the agent was killed: libnfs reconnected to the new agent
    // and sent it again, and it is served now, with the right bytes.
    let out = held.join().unwrap();
    let text = output_text(&out);
    assert!(
        out.status.success() && !text.contains("failed"),
        "the read held across the kill: {text}"
    );
    eprintln!(
        "restart with the store down took {started:?}; the read held across the kill: {text}"
    );
    wait_status(&server, "the recovery is told", |s| {
        s["store"]["reachable"] == true
    });
    server.cli(&["unmount", "k"]);
    assert_eq!(
        std::fs::read_dir(state.join("snapshots")).unwrap().count(),
        0,
        "the kept copies go with the last mount of their snapshot"
    );
}
