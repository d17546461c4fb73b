//! A real hypervisor: QEMU (TCG) boots the project's test guest, its whole disk (MBR, syslinux,
//! kernel, root file system) read through a live mount over nfs://, found via our portmapper.
//!
//! The guest image is built by `scripts/build-guest` from Debian packages (reproducible; cached
//! in target/guest-image). The guest's writes go to the mount's overlay on the server.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn boot(image: &str, log: &Path, drive_opts: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/boot-guest"))
        .args([image, log.to_str().unwrap()])
        .args(extra)
        .env("DRIVE_OPTS", drive_opts)
        .env("BOOT_TIMEOUT", "120")
        .output()
        .expect("running scripts/boot-guest (needs qemu-system-x86_64: scripts/install-deps)");
    let text = format!(
        "{}{}\nserial log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(log).unwrap_or_default()
    );
    (out.status.success(), text)
}

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
