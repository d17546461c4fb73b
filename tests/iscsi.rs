//! Block exports over iSCSI, with clients nobody here wrote: libiscsi's tools (`iscsi-ls`,
//! `iscsi-inq`, the conformance suite `iscsi-test-cu`), `qemu-img` and `qemu-io` over
//! `iscsi://`, and a QEMU guest booting from `iscsi://`, against `serve --iscsi`.
//!
//! A mount is the target `iqn.2026-12.io.livemount:MOUNT`, its disks LUN 0, 1, ...; the VM's
//! writes go to the mount's overlay, never to the backup.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

const IQN: &str = "iqn.2026-12.io.livemount:";
const INITIATOR: &str = "iqn.2026-12.io.livemount:test-client";

/// The running server's iSCSI port, from `status --json`.
fn iscsi_port(server: &Server) -> u16 {
    let status: serde_json::Value =
        serde_json::from_str(&server.cli(&["status", "--json"])).unwrap();
    status["iscsi_port"]
        .as_u64()
        .unwrap_or_else(|| panic!("no iscsi_port in the status: {status}")) as u16
}

fn text(out: &Output) -> String {
    output_text(out)
}

fn qemu_io(url: &str, cmd: &str) -> Output {
    client("qemu-io", &["-f", "raw", "-c", cmd, url])
}

fn compare(url: &str, file: &Path) -> Output {
    qemu_compare(url, file.to_str().unwrap())
}

#[test]
fn mounts_are_targets_and_disks_luns_read_and_written_over_iscsi() {
    let t = tempfile::tempdir().unwrap();
    let d = mixed_disk(8 << 20, 27);
    // A size that is not a multiple of 4 KiB (but of the 512-byte block).
    let e = mixed_disk((3 << 20) + 512, 28);
    write(&t.path().join("d.img"), &d);
    write(&t.path().join("e.img"), &e);
    let cfg = kvm_config(t.path(), "blk", &[("d.img", "raw"), ("e.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--iscsi", "127.0.0.1:0"],
    );
    let port = iscsi_port(&server);
    let url = |target: &str, lun: u32| format!("iscsi://127.0.0.1:{port}/{IQN}{target}/{lun}");
    let out = server.cli(&["mount", "blk", "--name", "rw"]);
    assert!(
        out.contains(&url("rw", 0))
            && out.contains("esxcli iscsi adapter discovery sendtarget add"),
        "mount prints how to attach each disk over iSCSI:\n{out}"
    );
    server.cli(&["mount", "blk", "--name", "Ro_1", "--read-only"]);
    server.cli(&["mount", "blk", "--name", "other", "--allow", "127.0.0.2"]);

    // Discovery lists the targets this host may use, each with its LUNs and sizes; not the
    // mount limited to another host.
    let out = client(
        "iscsi-ls",
        &["-s", "-i", INITIATOR, &format!("iscsi://127.0.0.1:{port}")],
    );
    let listing = text(&out);
    assert!(out.status.success(), "{listing}");
    for want in [
        format!("Target:{IQN}rw Portal:127.0.0.1:{port},1"),
        format!("Target:{IQN}ro-1 Portal:127.0.0.1:{port},1"),
    ] {
        assert!(listing.contains(&want), "{want} missing:\n{listing}");
    }
    assert!(!listing.contains("other"), "{listing}");
    assert_eq!(
        listing.matches("DIRECT_ACCESS").count(),
        4,
        "two LUNs per target:\n{listing}"
    );

    // Every LUN reads back as its source, byte for byte.
    for target in ["rw", "ro-1"] {
        let out = compare(&url(target, 0), &t.path().join("d.img"));
        assert!(out.status.success(), "{target}/0: {}", text(&out));
        let out = compare(&url(target, 1), &t.path().join("e.img"));
        assert!(out.status.success(), "{target}/1: {}", text(&out));
    }

    // Writes, zeroes and discards go to the overlay and read back.
    let rw = url("rw", 0);
    for cmd in [
        "write -P 0xab 1048576 65536",
        "write -P 0xcd 4096 512",
        "write -z 2097152 131072",
        "discard 3145728 65536",
        "flush",
    ] {
        let out = qemu_io(&rw, cmd);
        assert!(
            out.status.success() && !text(&out).contains("error"),
            "{cmd}: {}",
            text(&out)
        );
    }
    let mut want = d.clone();
    want[1048576..1048576 + 65536].fill(0xab);
    want[4096..4096 + 512].fill(0xcd);
    want[2097152..2097152 + 131072].fill(0);
    want[3145728..3145728 + 65536].fill(0);
    write(&t.path().join("want.img"), &want);
    let out = compare(&rw, &t.path().join("want.img"));
    assert!(out.status.success(), "{}", text(&out));

    // A read-only mount refuses writes; nothing changes.
    let ro = url("ro-1", 0);
    let out = qemu_io(&ro, "write -P 0x11 0 4096");
    assert!(
        !out.status.success() || text(&out).contains("error"),
        "a write to a read-only mount must fail: {}",
        text(&out)
    );
    let out = compare(&ro, &t.path().join("d.img"));
    assert!(out.status.success(), "{}", text(&out));

    // A target that does not exist, one for another host, and a LUN the target lacks.
    for bad in [url("nope", 0), url("other", 0), url("rw", 2)] {
        let out = client("iscsi-inq", &["-i", INITIATOR, &bad]);
        assert!(
            !out.status.success(),
            "{bad} must be refused: {}",
            text(&out)
        );
    }

    // The backup itself is untouched: a fresh mount reads as the source.
    server.cli(&["mount", "blk", "--name", "fresh"]);
    let out = compare(&url("fresh", 0), &t.path().join("d.img"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(server.stop().success());
}

#[test]
fn with_chap_a_login_needs_the_targets_secret() {
    let t = tempfile::tempdir().unwrap();
    let d = mixed_disk(2 << 20, 29);
    write(&t.path().join("d.img"), &d);
    let cfg = kvm_config(t.path(), "chap", &[("d.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--iscsi", "127.0.0.1:0", "--iscsi-chap"],
    );
    let port = iscsi_port(&server);
    let out = server.cli(&["mount", "chap", "--name", "a"]);
    // The attach lines carry the user and the target's secret.
    let prefix = "iscsi://livemount%";
    let at = out
        .find(prefix)
        .unwrap_or_else(|| panic!("no CHAP URL in the mount's output:\n{out}"));
    let secret: String = out[at + prefix.len()..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit())
        .collect();
    assert_eq!(secret.len(), 24, "{out}");
    let b = server.cli(&["mount", "chap", "--name", "b"]);
    assert!(!b.contains(&secret), "each target has its own secret:\n{b}");

    let lun = |cred: &str| format!("iscsi://{cred}127.0.0.1:{port}/{IQN}a/0");
    let out = compare(
        &lun(&format!("livemount%{secret}@")),
        &t.path().join("d.img"),
    );
    assert!(
        out.status.success(),
        "the right secret logs in: {}",
        text(&out)
    );
    let wrong = format!("livemount%{}@", "0".repeat(24));
    for cred in ["", wrong.as_str(), &format!("someone%{secret}@")] {
        let out = client("iscsi-inq", &["-i", INITIATOR, &lun(cred)]);
        assert!(
            !out.status.success(),
            "a login with {cred:?} must fail: {}",
            text(&out)
        );
    }
    // Nothing was written by the refused logins, and the server is well.
    let out = compare(
        &lun(&format!("livemount%{secret}@")),
        &t.path().join("d.img"),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(server.stop().success());
}

/// The test guest boots from `iscsi://` (QEMU's libiscsi client), writes a file; livemount is
/// killed with SIGKILL and started again on the same port; the next boot sees the file.
#[test]
fn a_guest_boots_over_iscsi_and_its_write_survives_a_kill_of_the_server() {
    guest_write_survives_a_kill(
        "iscsiguest",
        "--iscsi",
        |listen, mount| format!("iscsi://{listen}/{IQN}{mount}/0"),
        "kept-over-iscsi",
    );
}

/// libiscsi's conformance suite against a LUN of a live mount: every suite that covers the
/// commands a disk answers (scripts/iscsi-conformance lists them) passes; a test the suite
/// skips is printed, not hidden.
#[test]
fn the_libiscsi_conformance_suites_pass() {
    let t = tempfile::tempdir().unwrap();
    write(&t.path().join("d.img"), &mixed_disk(64 << 20, 30));
    let cfg = kvm_config(t.path(), "conf", &[("d.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--iscsi", "127.0.0.1:0"],
    );
    let port = iscsi_port(&server);
    server.cli(&["mount", "conf", "--name", "c"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/iscsi-conformance");
    let out = std::process::Command::new(script)
        .arg(format!("iscsi://127.0.0.1:{port}/{IQN}c/0"))
        .env("LOGDIR", t.path().join("logs"))
        .output()
        .expect("running scripts/iscsi-conformance");
    let table = text(&out);
    println!("{table}");
    assert!(
        out.status.success(),
        "iscsi-test-cu failed:\n{table}\nserver:\n{}",
        server.log_text()
    );
    assert!(server.stop().success());
}

#[test]
fn serve_refuses_a_bad_iscsi_setting_and_says_what_to_give() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "v", &[0u8; 4096]);
    let state = t.path().join("state");
    let serve = |extra: &[&str]| {
        let mut args = vec![
            "serve",
            "--repo",
            repo.to_str().unwrap(),
            "--state",
            state.to_str().unwrap(),
            "--nfs",
            "127.0.0.1:0",
            "--portmap",
            "off",
            "--api",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        livemount(&args)
    };
    let out = serve(&["--iscsi", "somewhere:3260"]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("--iscsi") && err.contains("ADDR:PORT"),
        "{err}"
    );
    let out = serve(&["--iscsi-chap"]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(err.contains("--iscsi-chap needs --iscsi"), "{err}");
    // Neither left a key or a token behind.
    assert!(!state.join("iscsi-chap-key").exists());
}
