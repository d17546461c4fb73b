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
