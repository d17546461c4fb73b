//! Block exports over NBD, with clients nobody here wrote: libnbd's `nbdinfo`, `qemu-img`,
//! `qemu-io` and a QEMU guest booting from `nbd://` and getting a disk hot-plugged over QMP,
//! against `serve --nbd`.
//!
//! Exports are `MOUNT/DISK`; the VM's writes go to the mount's overlay, never to the backup.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Output;

use common::*;

/// The running server's NBD port, from `status --json`.
fn nbd_port(server: &Server) -> u16 {
    let status: serde_json::Value =
        serde_json::from_str(&server.cli(&["status", "--json"])).unwrap();
    status["nbd_port"]
        .as_u64()
        .unwrap_or_else(|| panic!("no nbd_port in the status: {status}")) as u16
}

fn text(out: &Output) -> String {
    output_text(out)
}

/// `qemu-io` on an NBD URL (raw), one command.
fn qemu_io(url: &str, cmd: &str) -> Output {
    client("qemu-io", &["-f", "raw", "-c", cmd, url])
}

fn compare(url: &str, file: &std::path::Path) -> Output {
    qemu_compare(url, file.to_str().unwrap())
}

#[test]
fn disks_are_listed_read_and_written_over_nbd_and_the_backup_is_untouched() {
    let t = tempfile::tempdir().unwrap();
    let d = mixed_disk(8 << 20, 17);
    // A size that is not a multiple of the chunk size or of 4 KiB.
    let e = mixed_disk((3 << 20) + 512, 18);
    write(&t.path().join("d.img"), &d);
    write(&t.path().join("e.img"), &e);
    let cfg = kvm_config(t.path(), "blk", &[("d.img", "raw"), ("e.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--nbd", "127.0.0.1:0"],
    );
    let port = nbd_port(&server);
    let url = |export: &str| format!("nbd://127.0.0.1:{port}/{export}");
    let out = server.cli(&["mount", "blk", "--name", "rw"]);
    assert!(
        out.contains(&format!("nbd://127.0.0.1:{port}/rw/d.img")),
        "mount prints how to attach each disk over NBD:\n{out}"
    );
    server.cli(&["mount", "blk", "--name", "ro", "--read-only"]);
    server.cli(&["mount", "blk", "--name", "other", "--allow", "127.0.0.2"]);

    // nbdinfo lists the disks of the mounts this host may use, with their sizes; not the
    // config, not the mount limited to another host.
    let out = client(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://127.0.0.1:{port}")],
    );
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut exports: Vec<(String, u64, bool)> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["export-name"].as_str().unwrap().to_string(),
                x["export-size"].as_u64().unwrap(),
                x["is_read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    exports.sort();
    let want = vec![
        ("ro/d.img".to_string(), d.len() as u64, true),
        ("ro/e.img".to_string(), e.len() as u64, true),
        ("rw/d.img".to_string(), d.len() as u64, false),
        ("rw/e.img".to_string(), e.len() as u64, false),
    ];
    assert_eq!(exports, want, "{}", text(&out));

    // Every disk reads back as the source, byte for byte.
    for export in ["rw/d.img", "ro/d.img"] {
        let out = compare(&url(export), &t.path().join("d.img"));
        assert!(out.status.success(), "{export}: {}", text(&out));
    }
    for export in ["rw/e.img", "ro/e.img"] {
        let out = compare(&url(export), &t.path().join("e.img"));
        assert!(out.status.success(), "{export}: {}", text(&out));
    }

    // Writes, zeroes and trims go to the overlay and read back.
    let rw = url("rw/d.img");
    for cmd in [
        "write -P 0xab 1048576 65536",
        "write -P 0xcd 4095 3",
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
    for cmd in [
        "read -P 0xab 1048576 65536",
        "read -P 0xcd 4095 3",
        "read -P 0 2097152 131072",
        "read -P 0 3145728 65536",
    ] {
        let out = qemu_io(&rw, cmd);
        assert!(
            out.status.success() && !text(&out).contains("Pattern verification failed"),
            "{cmd}: {}",
            text(&out)
        );
    }
    // The bytes around them are the backup's.
    let mut want = d.clone();
    want[1048576..1048576 + 65536].fill(0xab);
    want[4095..4098].fill(0xcd);
    want[2097152..2097152 + 131072].fill(0);
    want[3145728..3145728 + 65536].fill(0);
    write(&t.path().join("want.img"), &want);
    let out = compare(&rw, &t.path().join("want.img"));
    assert!(out.status.success(), "{}", text(&out));

    // A read-only mount says so and refuses writes; nothing changes.
    let ro = url("ro/d.img");
    let out = client("nbdinfo", &["--is", "read-only", &ro]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = qemu_io(&ro, "write -P 0x11 0 4096");
    assert!(
        !out.status.success() || text(&out).contains("error"),
        "a write to a read-only mount must fail: {}",
        text(&out)
    );
    let out = compare(&ro, &t.path().join("d.img"));
    assert!(out.status.success(), "{}", text(&out));

    // Unknown exports, a disk name that is not one, and a mount for another host: refused
    // alike at the handshake.
    for export in [
        "nope/d.img",
        "rw/blk.xml",
        "rw/zz.img",
        "other/d.img",
        "rw",
        "",
    ] {
        let out = client("nbdinfo", &["--size", &url(export)]);
        assert!(
            !out.status.success(),
            "{export:?} must be refused: {}",
            text(&out)
        );
    }

    // The backup itself is untouched: a fresh mount reads as the source.
    server.cli(&["mount", "blk", "--name", "fresh"]);
    let out = compare(&url("fresh/d.img"), &t.path().join("d.img"));
    assert!(out.status.success(), "{}", text(&out));
    // And the server is still well.
    assert!(server.stop().success());
}

/// `qemu-img map --output=json` of `url` as (start, length, zero) runs, adjacent runs of one
/// kind joined.
fn qemu_map(url: &str) -> Vec<(u64, u64, bool)> {
    let out = client("qemu-img", &["map", "--output=json", "-f", "raw", url]);
    assert!(out.status.success(), "qemu-img map {url}: {}", text(&out));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let zero = e["zero"].as_bool().unwrap() && !e["data"].as_bool().unwrap();
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += len,
            _ => runs.push((start, len, zero)),
        }
    }
    runs
}

/// Runs of the backup recorded as zeros are holes to block clients: NBD's `base:allocation`
/// (libnbd's `nbdinfo --map`, `qemu-img map`) and iSCSI's GET LBA STATUS (`qemu-img map` over
/// `iscsi://`); a block the VM wrote inside one is data; a copy with `qemu-img convert` (which
/// skips holes) equals the disk.
#[test]
fn zero_runs_of_a_backup_are_holes_over_nbd_and_iscsi() {
    const M: u64 = 1 << 20;
    let t = tempfile::tempdir().unwrap();
    // Data [0, 1M), zeros [1M, 2M), data [2M, 4M), zeros [4M, 7M), data [7M, 8M).
    let mut d = mixed_disk(8 * M, 31);
    d[..M as usize].fill(0x5a);
    d[M as usize..2 * M as usize].fill(0);
    d[2 * M as usize..4 * M as usize].fill(0x6b);
    d[4 * M as usize..7 * M as usize].fill(0);
    write(&t.path().join("d.img"), &d);
    let cfg = kvm_config(t.path(), "holes", &[("d.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--nbd", "127.0.0.1:0", "--iscsi", "127.0.0.1:0"],
    );
    let port = nbd_port(&server);
    let status: serde_json::Value =
        serde_json::from_str(&server.cli(&["status", "--json"])).unwrap();
    let iport = status["iscsi_port"].as_u64().unwrap();
    server.cli(&["mount", "holes", "--name", "rw"]);
    server.cli(&["mount", "holes", "--name", "ro", "--read-only"]);
    let nbd = |m: &str| format!("nbd://127.0.0.1:{port}/{m}/d.img");
    let iscsi = |m: &str| format!("iscsi://127.0.0.1:{iport}/iqn.2026-12.io.livemount:{m}/0");

    // The VM writes 4 KiB inside the second zero run.
    let at = 5 * M + 8192;
    let out = qemu_io(&nbd("rw"), &format!("write -P 0x77 {at} 4096"));
    assert!(
        out.status.success() && !text(&out).contains("error"),
        "{}",
        text(&out)
    );
    let mut want = d.clone();
    want[at as usize..at as usize + 4096].fill(0x77);
    write(&t.path().join("want.img"), &want);

    let backup = vec![
        (0, M, false),
        (M, M, true),
        (2 * M, 2 * M, false),
        (4 * M, 3 * M, true),
        (7 * M, M, false),
    ];
    let written = vec![
        (0, M, false),
        (M, M, true),
        (2 * M, 2 * M, false),
        (4 * M, at - 4 * M, true),
        (at, 4096, false),
        (at + 4096, 7 * M - at - 4096, true),
        (7 * M, M, false),
    ];
    for (url, want_runs) in [
        (nbd("ro"), &backup),
        (nbd("rw"), &written),
        (iscsi("ro"), &backup),
        (iscsi("rw"), &written),
    ] {
        assert_eq!(&qemu_map(&url), want_runs, "qemu-img map {url}");
    }

    // libnbd says the same: "offset length type description" lines.
    let out = client("nbdinfo", &["--map", &nbd("rw")]);
    assert!(out.status.success(), "{}", text(&out));
    let map: Vec<(u64, u64, bool)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f[i].parse::<u64>().unwrap();
            (n(0), n(1), n(2) == 3)
        })
        .collect();
    assert_eq!(&map, &written, "nbdinfo --map:\n{}", text(&out));

    // Reads of a hole are zeros (a hole chunk over NBD); copies equal the disk.
    let out = qemu_io(&nbd("rw"), &format!("read -P 0 {M} {M}"));
    assert!(
        out.status.success() && !text(&out).contains("failed"),
        "{}",
        text(&out)
    );
    for (url, file) in [
        (nbd("ro"), "d.img"),
        (nbd("rw"), "want.img"),
        (iscsi("ro"), "d.img"),
        (iscsi("rw"), "want.img"),
    ] {
        let copy = t.path().join("copy.img");
        let _ = std::fs::remove_file(&copy);
        let out = client(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                &url,
                copy.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{url}: {}", text(&out));
        assert!(
            std::fs::read(&copy).unwrap() == std::fs::read(t.path().join(file)).unwrap(),
            "the copy of {url} differs from {file}"
        );
    }
    assert!(server.stop().success());
}

/// The test guest boots from `nbd://` (QEMU's own NBD client), writes a file; livemount is
/// killed with SIGKILL and started again on the same port; the next boot sees the file.
#[test]
fn a_guest_boots_over_nbd_and_its_write_survives_a_kill_of_the_server() {
    guest_write_survives_a_kill(
        "nbdguest",
        "--nbd",
        |listen, mount| format!("nbd://{listen}/{mount}/guest.img"),
        "kept-over-nbd",
    );
}

/// A QMP connection to a running QEMU (its `-qmp unix:PATH,server=on,wait=off` socket). A test
/// that panics while one is open asks QEMU to quit, so no guest outlives it.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let writer = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("QMP socket {}: {e}", path.display()));
        writer
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
        };
        let greeting = qmp.message();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        qmp.execute("qmp_capabilities", serde_json::json!({}));
        qmp
    }

    /// The next message from QEMU.
    fn message(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("reading QMP");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs a command; its `return`, or a panic with QEMU's error. Events on the way are skipped.
    fn execute(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        let request = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{request}").expect("writing QMP");
        loop {
            let reply = self.message();
            if let Some(r) = reply.get("return") {
                return r.clone();
            }
            assert!(
                reply.get("event").is_some(),
                "QMP {command} failed: {reply}"
            );
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = writeln!(self.writer, r#"{{"execute": "quit"}}"#);
        }
    }
}

/// Issue 17: a running guest gets a backup's disk hot-plugged over NBD, as one would attach a
/// recovered disk to a VM that is already up. The backup is of a VM with two disks: the test
/// guest, which boots from its mount's `nbd://` export, and a data disk, an ext4 file system
/// (made here with `mkfs.ext4 -d`) holding a known file: a text line, then 3 MiB of random
/// bytes. Once the guest says it is waiting, QMP's `blockdev-add` opens the data disk's export
/// through QEMU's NBD client (read-only) and `device_add` plugs it in as a virtio-blk-pci device;
/// the guest mounts it (/dev/vdb) and prints the file's md5 and first line, then powers off.
#[test]
fn a_running_guest_gets_a_backup_disk_hot_plugged_over_nbd_and_reads_a_file_from_it() {
    let image = guest_image();
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let files = t.path().join("files");
    std::fs::create_dir(&files).unwrap();
    let line = "livemount hot-plug test: the known file";
    let mut known = format!("{line}\n").into_bytes();
    let mut tail = vec![0u8; 3 << 20];
    Rng::new(1717).fill(&mut tail);
    known.extend_from_slice(&tail);
    write(&files.join("known.bin"), &known);
    let data = t.path().join("data.img");
    std::fs::File::create(&data)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let out = client(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "lmdata",
            "-d",
            files.to_str().unwrap(),
            data.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "mkfs.ext4: {}", text(&out));
    let out = client("md5sum", &[files.join("known.bin").to_str().unwrap()]);
    let md5 = String::from_utf8(out.stdout).unwrap()[..32].to_string();

    let cfg = kvm_config(
        t.path(),
        "hotplug",
        &[("guest.img", "raw"), ("data.img", "raw")],
    );
    let repo = repo_with_backup(t.path(), &cfg);
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--nbd", "127.0.0.1:0"],
    );
    let port = nbd_port(&server);
    server.cli(&["mount", "hotplug", "--name", "h"]);

    let log = t.path().join("serial.log");
    let sock = t.path().join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let guest = boot_guest_until(
        &format!("nbd://127.0.0.1:{port}/h/guest.img"),
        &log,
        "",
        &[
            "-qmp",
            &qmp_arg,
            "-fw_cfg",
            "name=opt/livemount/hotplug,string=known.bin",
        ],
        "LIVEMOUNT-WAITING-DISK",
    );
    let mut qmp = Qmp::connect(&sock);
    qmp.execute(
        "blockdev-add",
        serde_json::json!({
            "driver": "raw",
            "node-name": "restored",
            "read-only": true,
            "file": {
                "driver": "nbd",
                "server": { "type": "inet", "host": "127.0.0.1", "port": port.to_string() },
                "export": "h/data.img",
            },
        }),
    );
    qmp.execute(
        "device_add",
        serde_json::json!({ "driver": "virtio-blk-pci", "id": "restored-disk", "drive": "restored" }),
    );
    let (ok, out) = guest.join().unwrap();
    drop(qmp);
    assert!(
        ok && out.contains(&format!("LIVEMOUNT-HOTPLUG {md5} {line}")),
        "the guest did not read the known file from the hot-plugged disk (md5 {md5}):\n{out}\n\
         server:\n{}",
        server.log_text()
    );
    eprintln!(
        "{}",
        out.lines()
            .filter(|l| l.starts_with("boot-guest:") || l.starts_with("LIVEMOUNT-HOTPLUG"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let log = server.log_text();
    assert!(
        !log.contains("ERROR") && !log.contains("WARN"),
        "the server logged a problem:\n{log}"
    );
    assert!(server.stop().success());
}

#[test]
fn serve_refuses_a_bad_nbd_address_and_says_what_to_give() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "v", &[0u8; 4096]);
    let out = livemount(&[
        "serve",
        "--repo",
        repo.to_str().unwrap(),
        "--state",
        t.path().join("state").to_str().unwrap(),
        "--nbd",
        "somewhere:10809",
        "--nfs",
        "127.0.0.1:0",
        "--portmap",
        "off",
        "--api",
        "127.0.0.1:0",
    ]);
    let err = text(&out);
    assert!(!out.status.success());
    assert!(err.contains("--nbd") && err.contains("ADDR:PORT"), "{err}");
}

/// `mount --disks-only`: the mount's folder holds the disks alone (no config, no files of
/// the VM's folder, nothing new can be made there), its disks take writes over NBD, a
/// relocation is refused (there is no VM), and all of it holds across a restart.
#[test]
fn a_disks_only_mount_serves_its_disks_alone() {
    let t = tempfile::tempdir().unwrap();
    let d = mixed_disk(2 << 20, 21);
    write(&t.path().join("d.img"), &d);
    write(&t.path().join("e.img"), &mixed_disk(1 << 20, 22));
    let cfg = kvm_config(t.path(), "dsk", &[("d.img", "raw"), ("e.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let state = t.path().join("state");
    let root = t.path().join("relocated");
    std::fs::create_dir_all(&root).unwrap();
    let config = relocate_config(t.path(), &[&root], "");
    let args = ["--nbd", "127.0.0.1:0", "--config", config.to_str().unwrap()];
    let server = Server::start(&repo, &state, "off", &args);
    let out = server.cli(&["mount", "dsk", "--name", "only", "--disks-only"]);
    assert!(out.contains("disks only"), "{out}");
    assert!(!out.contains("virsh define"), "no VM to define:\n{out}");
    let listing = |server: &Server| {
        let out = client("nfs-ls", &[&server.libnfs_url("only")]);
        assert!(out.status.success(), "{}", text(&out));
        let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().last().map(str::to_string))
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        names
    };
    assert_eq!(listing(&server), ["d.img", "e.img"]);
    // Nothing new can be made in the folder.
    let new = format!(
        "nfs://127.0.0.1/livemount/only/new.img?nfsport={p}&mountport={p}&version=3",
        p = server.nfs_port
    );
    let out = client("qemu-img", &["create", "-f", "raw", &new, "1M"]);
    assert!(!out.status.success(), "{}", text(&out));
    // The disks take writes (into the overlay) and read as the source elsewhere.
    let url = format!("nbd://127.0.0.1:{}/only/d.img", nbd_port(&server));
    let out = qemu_io(&url, "write -P 0x77 65536 4096");
    assert!(
        out.status.success() && !text(&out).contains("error"),
        "{}",
        text(&out)
    );
    // No relocation: there is no VM.
    let out = livemount(&[
        "relocate",
        "only",
        "--to",
        root.join("x").to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ]);
    let err = text(&out);
    assert!(
        !out.status.success() && err.contains("--disks-only"),
        "{err}"
    );
    assert!(!root.join("x").exists());

    // After a restart: the same.
    assert!(server.stop().success());
    let server = Server::start(&repo, &state, "off", &args);
    assert_eq!(listing(&server), ["d.img", "e.img"]);
    let url = format!("nbd://127.0.0.1:{}/only/d.img", nbd_port(&server));
    let out = qemu_io(&url, "read -P 0x77 65536 4096");
    assert!(
        out.status.success() && !text(&out).contains("Pattern verification failed"),
        "{}",
        text(&out)
    );
    let mounts: serde_json::Value =
        serde_json::from_str(&server.cli(&["mounts", "--json"])).unwrap();
    assert_eq!(mounts[0]["spec"]["disks_only"], true, "{mounts}");
}
