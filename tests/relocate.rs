//! Relocation through the real server and a real NFS client: the copy follows the VM's writes
//! through a SIGKILL and a restart, resumes where it was, and the handover's copy equals the
//! mount's final view; a cancelled relocation leaves the mount as it was; bad requests change
//! nothing. Destinations stay under `relocate_roots`: outside them, through a symbolic link or
//! `..`, or with none configured, a relocation is refused; a destination swapped for a link
//! after the start, or a folder file whose name is not a plain name, gets no byte outside it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::nfs::*;
use common::*;

const SIZE: u64 = 48 << 20;

/// A server over a repository holding one KVM VM with a 48 MiB mixed disk, mounted as `vm-lm1`.
fn setup(t: &Path) -> (Vec<u8>, std::path::PathBuf) {
    let disk = mixed_disk(SIZE, 7);
    write(&t.join("disk.img"), &disk);
    let cfg = kvm_config(t, "vm", &[("disk.img", "raw")]);
    (disk, repo_with_backup(t, &cfg))
}

/// A server over `repo` whose relocations may write under `t/primary` (its only root).
fn start(t: &Path, repo: &Path, state: &Path) -> Server {
    let config = relocate_config(t, &[&t.join("primary")], "");
    Server::start(repo, state, "off", &["--config", config.to_str().unwrap()])
}

/// Starts relocating `vm-lm1` to `dest` at `rate` MB/s; what the CLI printed.
fn relocate_at(server: &Server, dest: &Path, rate: &str) -> String {
    server.cli(&[
        "relocate",
        "vm-lm1",
        "--to",
        dest.to_str().unwrap(),
        "--rate",
        rate,
    ])
}

fn relocation(server: &Server, mount: &str) -> Option<serde_json::Value> {
    relocation_of(server, mount)
}

fn wait_for_phase(server: &Server, mount: &str, phase: &str) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let r = relocation(server, mount).expect("a relocation");
        if r["phase"] == phase {
            return r;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "relocation not {phase}: {r}\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `n` random 4 KiB..64 KiB pieces through NFS (FILE_SYNC) into the mount's disk and
/// the model, spread over the whole disk.
fn write_some(server: &Server, model: &mut [u8], rng: &mut Rng, n: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = connect(server, "vm-lm1").await;
        let root = c.root_nfs_fh3();
        let fh = lookup(&mut c, &root, "disk.img").await.unwrap();
        for _ in 0..n {
            let len = 512 * (1 + rng.below(128)) as usize;
            let off = rng.below(SIZE - len as u64) & !511;
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            nfs_write(&mut c, &fh, off, &data).await;
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
    });
}

#[test]
fn a_relocation_follows_writes_through_a_kill_and_hands_over_an_exact_copy() {
    let t = tempfile::tempdir().unwrap();
    let (mut model, repo) = setup(t.path());
    let state = t.path().join("state");
    let dest = t.path().join("primary/vm");
    let mut rng = Rng::new(99);
    let server = start(t.path(), &repo, &state);
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    write_some(&server, &mut model, &mut rng, 40);

    // 48 MiB at 8 MB/s: about six seconds, so the kill lands mid-copy.
    let out = relocate_at(&server, &dest, "8");
    assert!(out.contains("relocating vm-lm1"), "{out}");
    // The copy is a VM folder from the start: its config points at the copied disk.
    let xml = std::fs::read_to_string(dest.join("vm.xml")).unwrap();
    assert!(xml.contains(&format!(
        "<source file='{}'/>",
        dest.join("disk.img").display()
    )));
    // Unmounting a mount that is being relocated is refused and changes nothing.
    let refused = livemount(&["unmount", "vm-lm1", "--state", state.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("being relocated"),
        "{refused:?}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    write_some(&server, &mut model, &mut rng, 40);
    let before = relocation(&server, "vm-lm1").unwrap();
    assert_eq!(before["phase"], "copying", "{before}");
    server.kill();

    // Restart: the copy resumes from its last checkpoint, not from zero.
    let server = start(t.path(), &repo, &state);
    let after = relocation(&server, "vm-lm1").expect("the relocation is back");
    let copied = after["copied"].as_u64().unwrap();
    assert!(
        copied > 0 && copied < SIZE,
        "resumed at {copied} of {SIZE}: {after}"
    );
    write_some(&server, &mut model, &mut rng, 40);
    let synced = wait_for_phase(&server, "vm-lm1", "synced");
    assert_eq!(synced["copied"], SIZE, "{synced}");
    // In sync: writes now go to both.
    write_some(&server, &mut model, &mut rng, 40);

    // The VM "still runs" (it just wrote): the handover is refused, nothing changes.
    let refused = livemount(&[
        "relocate",
        "--finish",
        "vm-lm1",
        "--state",
        state.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("still writes"),
        "{refused:?}"
    );
    std::thread::sleep(Duration::from_millis(3200));
    let out = server.cli(&["relocate", "--finish", "vm-lm1"]);
    assert!(
        out.contains("handed over") && out.contains("virsh define"),
        "{out}"
    );

    // The copy equals the mount's final view, byte for byte; zero blocks are holes.
    let copy = std::fs::read(dest.join("disk.img")).unwrap();
    assert!(
        copy == model,
        "the relocated disk differs from the mount's view"
    );
    let meta = std::fs::metadata(dest.join("disk.img")).unwrap();
    assert!(
        meta.blocks() * 512 < SIZE,
        "zero blocks should be holes: {} bytes allocated",
        meta.blocks() * 512
    );
    // The config points at the copy.
    let xml = std::fs::read_to_string(dest.join("vm.xml")).unwrap();
    assert!(
        xml.contains(&format!(
            "<source file='{}'/>",
            dest.join("disk.img").display()
        )),
        "{xml}"
    );
    // The mount is retired, its overlay and the relocation's record gone.
    let mounts = server.cli(&["mounts"]);
    assert!(!mounts.contains("vm-lm1"), "{mounts}");
    assert!(!state.join("overlays/vm-lm1").exists());
    assert!(!state.join("relocations/vm-lm1.json").exists());
    // And the backup is untouched.
    server.cli(&["mount", "vm", "--name", "fresh", "--read-only"]);
    let fresh = read_file(&server, "fresh", "disk.img", SIZE);
    assert!(
        fresh == std::fs::read(t.path().join("disk.img")).unwrap(),
        "backup changed"
    );
}

#[test]
fn a_cancelled_relocation_leaves_the_mount_as_it_was() {
    let t = tempfile::tempdir().unwrap();
    let (mut model, repo) = setup(t.path());
    let state = t.path().join("state");
    let dest = t.path().join("primary/vm");
    let mut rng = Rng::new(5);
    // Read-ahead off here: the reads below check that the setting serves the same bytes.
    let config = relocate_config(
        t.path(),
        &[&t.path().join("primary")],
        "read_ahead = false\n",
    );
    let server = Server::start(
        &repo,
        &state,
        "off",
        &["--config", config.to_str().unwrap()],
    );
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    write_some(&server, &mut model, &mut rng, 20);
    // A small file the hypervisor made in the folder: the relocation carries it over at once.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = connect(&server, "vm-lm1").await;
        let root = c.root_nfs_fh3();
        let fh = create(&mut c, &root, "vm.nvram").await;
        nfs_write(&mut c, &fh, 0, b"nvram").await;
    });
    relocate_at(&server, &dest, "4");
    assert_eq!(std::fs::read(dest.join("vm.nvram")).unwrap(), b"nvram");
    std::thread::sleep(Duration::from_millis(1000));
    write_some(&server, &mut model, &mut rng, 20);
    let out = server.cli(&["relocate", "--cancel", "vm-lm1"]);
    assert!(out.contains("cancelled"), "{out}");
    assert!(
        !dest.exists(),
        "the partial copy (and the files carried over) is removed: {:?}",
        std::fs::read_dir(&dest).map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
    );
    assert!(relocation(&server, "vm-lm1").is_none());
    assert!(!state.join("relocations/vm-lm1.json").exists());
    // The mount is as it was: every byte, and it takes writes.
    write_some(&server, &mut model, &mut rng, 20);
    let seen = read_file(&server, "vm-lm1", "disk.img", SIZE);
    assert!(seen == model, "the mount's view changed");
    server.cli(&["unmount", "vm-lm1"]);
}

#[test]
fn bad_relocation_requests_are_refused_and_change_nothing() {
    let t = tempfile::tempdir().unwrap();
    let (_, repo) = setup(t.path());
    let state = t.path().join("state");
    let server = start(t.path(), &repo, &state);
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    let st = state.to_str().unwrap();
    let busy = t.path().join("primary/busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("other"), b"x").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["relocate", "nope", "--to", "/tmp/x"],
            "no mount named nope",
        ),
        (
            vec!["relocate", "vm-lm1", "--to", busy.to_str().unwrap()],
            "is not empty",
        ),
        (
            vec!["relocate", "vm-lm1", "--to", "/tmp/x", "--rate", "0"],
            "--rate 0",
        ),
        (vec!["relocate", "--finish", "vm-lm1"], "has no relocation"),
        (vec!["relocate", "--cancel", "vm-lm1"], "has no relocation"),
        (vec!["relocate", "vm-lm1"], "--to"),
    ];
    for (args, want) in cases {
        let mut a = args.clone();
        a.extend_from_slice(&["--state", st]);
        let out = livemount(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
    assert!(
        !state.join("relocations").exists()
            || std::fs::read_dir(state.join("relocations"))
                .unwrap()
                .count()
                == 0
    );
    assert!(relocation(&server, "vm-lm1").is_none());
}

/// Unmounts a file system made for a test, whatever happens.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_relocation_that_runs_out_of_space_fails_and_the_mount_runs_on() {
    let t = tempfile::tempdir().unwrap();
    let (mut model, repo) = setup(t.path());
    let state = t.path().join("state");
    let small = t.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    // A 4 MiB file system for a 48 MiB disk (needs root, as the whole suite does).
    let out = client(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=4m",
            "tmpfs",
            small.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "mounting a tmpfs (root needed): {out:?}"
    );
    let _umount = Unmount(small.clone());
    let dest = small.join("vm");
    let mut rng = Rng::new(11);
    let config = relocate_config(t.path(), &[&small], "");
    let server = Server::start(
        &repo,
        &state,
        "off",
        &["--config", config.to_str().unwrap()],
    );
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    write_some(&server, &mut model, &mut rng, 10);

    let out = livemount(&[
        "relocate",
        "vm-lm1",
        "--to",
        dest.to_str().unwrap(),
        "--wait",
        "--state",
        state.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("failed") && err.contains("No space left"),
        "{err}"
    );
    let r = relocation(&server, "vm-lm1").unwrap();
    assert_eq!(r["phase"], "failed", "{r}");
    assert_eq!(r["copied"], 0, "a failure resets progress: {r}");

    // The mount runs on: every byte as before, and it takes writes.
    write_some(&server, &mut model, &mut rng, 10);
    let seen = read_file(&server, "vm-lm1", "disk.img", SIZE);
    assert!(seen == model, "the mount's view changed");
    // A handover of a failed relocation is refused, saying how to retry or cancel.
    let out = livemount(&[
        "relocate",
        "--finish",
        "vm-lm1",
        "--force",
        "--state",
        state.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--cancel"), "{err}");
    // A cancel whose cleanup fails (here: a folder where the copy's file was) says so and keeps
    // the record; a second cancel, once the cause is gone, removes the partial copy.
    let copy = dest.join("disk.img");
    std::fs::remove_file(&copy).unwrap();
    std::fs::create_dir(&copy).unwrap();
    let out = livemount(&[
        "relocate",
        "--cancel",
        "vm-lm1",
        "--state",
        state.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Is a directory"),
        "{err}"
    );
    assert_eq!(
        relocation(&server, "vm-lm1").unwrap()["phase"],
        "cancelling"
    );
    std::fs::remove_dir(&copy).unwrap();
    let out = client(
        "timeout",
        &[
            "60",
            env!("CARGO_BIN_EXE_livemount"),
            "relocate",
            "--cancel",
            "vm-lm1",
            "--state",
            state.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "the second cancel (exit 124: it waited for a task that never ran): {out:?}"
    );
    assert!(!dest.exists(), "the partial copy is removed");
    assert!(relocation(&server, "vm-lm1").is_none());
    server.cli(&["unmount", "vm-lm1"]);
}

#[test]
fn a_handover_cut_short_before_the_retire_retires_the_mount_at_the_next_start() {
    let t = tempfile::tempdir().unwrap();
    let (_, repo) = setup(t.path());
    let state = t.path().join("state");
    let dest = t.path().join("primary/vm");
    let server = start(t.path(), &repo, &state);
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    server.cli(&["relocate", "vm-lm1", "--to", dest.to_str().unwrap()]);
    wait_for_phase(&server, "vm-lm1", "synced");
    server.stop();
    // As if the server stopped right after the handover was recorded, before the mount was
    // retired: the record says done, the mount is still there.
    let record = state.join("relocations/vm-lm1.json");
    let mut r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    r["phase"] = "done".into();
    std::fs::write(&record, serde_json::to_vec(&r).unwrap()).unwrap();

    let server = start(t.path(), &repo, &state);
    // Retired before any client is served: no mount to write to, no record, no overlay.
    let mounts = server.cli(&["mounts", "--json"]);
    assert!(!mounts.contains("vm-lm1"), "{mounts}");
    assert!(!record.exists());
    assert!(!state.join("overlays/vm-lm1").exists());
    assert!(server.log_text().contains("mount retired"));
    assert!(dest.join("disk.img").exists(), "the copy stays");
}

#[test]
fn a_folder_file_with_a_255_byte_name_is_carried_over_cancelled_and_handed_over() {
    let t = tempfile::tempdir().unwrap();
    let (_, repo) = setup(t.path());
    let state = t.path().join("state");
    let dest = t.path().join("primary/vm");
    let server = start(t.path(), &repo, &state);
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    // NAME_MAX exactly: valid over NFS and in the destination, but no room for a suffix.
    let long = format!("{}.nvram", "n".repeat(249));
    assert_eq!(long.len(), 255);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = connect(&server, "vm-lm1").await;
        let root = c.root_nfs_fh3();
        let fh = create(&mut c, &root, &long).await;
        nfs_write(&mut c, &fh, 0, b"nvram").await;
    });
    let to = dest.to_str().unwrap();
    server.cli(&["relocate", "vm-lm1", "--to", to, "--rate", "4"]);
    assert_eq!(
        std::fs::read(dest.join(&long)).unwrap(),
        b"nvram",
        "carried over at the start: {}",
        server.log_text()
    );
    let out = server.cli(&["relocate", "--cancel", "vm-lm1"]);
    assert!(out.contains("cancelled"), "{out}");
    assert!(!dest.exists(), "the cancel removed the partial copy");
    assert!(relocation(&server, "vm-lm1").is_none());

    server.cli(&["relocate", "vm-lm1", "--to", to]);
    wait_for_phase(&server, "vm-lm1", "synced");
    // The VM's last write must be a few seconds old for the handover.
    std::thread::sleep(Duration::from_millis(3200));
    let out = server.cli(&["relocate", "--finish", "vm-lm1"]);
    assert!(out.contains("handed over"), "{out}");
    assert_eq!(std::fs::read(dest.join(&long)).unwrap(), b"nvram");
    let left: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.len() != 255 && n != "disk.img" && n != "vm.xml")
        .collect();
    assert!(
        left.is_empty(),
        "temporary files left in the copy: {left:?}"
    );
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn no_records(state: &Path) -> bool {
    let dir = state.join("relocations");
    !dir.exists() || names(&dir).is_empty()
}

#[test]
fn destinations_outside_the_relocate_roots_are_refused_and_nothing_is_made() {
    let t = tempfile::tempdir().unwrap();
    let (_, repo) = setup(t.path());
    let state = t.path().join("state");
    let primary = t.path().join("primary");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let server = start(t.path(), &repo, &state);
    std::os::unix::fs::symlink(&outside, primary.join("link")).unwrap();
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    let st = state.to_str().unwrap();
    let elsewhere = t.path().join("elsewhere/vm");
    let through_link = primary.join("link/vm");
    let dotdot = format!("{}/../outside/vm", primary.display());
    let cases: Vec<(&str, &str)> = vec![
        (elsewhere.to_str().unwrap(), "is not under relocate_roots"),
        (through_link.to_str().unwrap(), "is a symbolic link"),
        (&dotdot, "has a `..` component"),
        (primary.to_str().unwrap(), "is a relocate root itself"),
    ];
    for (to, want) in &cases {
        let out = livemount(&["relocate", "vm-lm1", "--to", to, "--state", st]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--to {to} succeeded");
        assert!(err.contains(want) && err.contains(to), "--to {to}: {err}");
    }
    assert!(names(&outside).is_empty(), "{:?}", names(&outside));
    assert_eq!(names(&primary), ["link"]);
    assert!(!t.path().join("elsewhere").exists());
    assert!(no_records(&state));
    assert!(relocation(&server, "vm-lm1").is_none());
    server.stop();

    // No roots configured: every relocation is refused, saying what to set.
    let server = Server::start(&repo, &state, "off", &[]);
    let to = primary.join("vm");
    let out = livemount(&[
        "relocate",
        "vm-lm1",
        "--to",
        to.to_str().unwrap(),
        "--state",
        st,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "relocated without roots");
    assert!(
        err.contains("set relocate_roots in serve's config"),
        "{err}"
    );
    assert_eq!(names(&primary), ["link"]);
    assert!(no_records(&state));
    // A bad root is refused at the start, naming it.
    let config = t.path().join("bad.toml");
    std::fs::write(&config, "relocate_roots = [\"relative/dir\"]\n").unwrap();
    let out = livemount(&[
        "serve",
        "--repo",
        repo.to_str().unwrap(),
        "--state",
        st,
        "--config",
        config.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("relocate_roots") && err.contains("relative/dir is not absolute"),
        "{err}"
    );
    drop(server);
}

#[test]
fn a_destination_swapped_for_a_link_after_the_start_gets_no_byte_outside_it() {
    let t = tempfile::tempdir().unwrap();
    let (_, repo) = setup(t.path());
    let state = t.path().join("state");
    let primary = t.path().join("primary");
    // Someone else's files, where the link will point.
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let decoys = ["disk.img", "vm.nvram", "vm.xml"];
    for n in decoys {
        std::fs::write(outside.join(n), b"decoy").unwrap();
    }
    let untouched = || {
        assert_eq!(names(&outside), decoys);
        for n in decoys {
            assert_eq!(std::fs::read(outside.join(n)).unwrap(), b"decoy", "{n}");
        }
    };
    let server = start(t.path(), &repo, &state);
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = connect(&server, "vm-lm1").await;
        let root = c.root_nfs_fh3();
        let fh = create(&mut c, &root, "vm.nvram").await;
        nfs_write(&mut c, &fh, 0, b"nvram").await;
    });

    // Swapped mid-copy, then cancelled: the cancel removes the copy, not what the link reaches.
    let dest = primary.join("vm");
    let to = dest.to_str().unwrap();
    server.cli(&["relocate", "vm-lm1", "--to", to, "--rate", "4"]);
    assert_eq!(std::fs::read(dest.join("vm.nvram")).unwrap(), b"nvram");
    std::fs::rename(&dest, primary.join("vm-moved")).unwrap();
    std::os::unix::fs::symlink(&outside, &dest).unwrap();
    let out = server.cli(&["relocate", "--cancel", "vm-lm1"]);
    assert!(out.contains("cancelled"), "{out}");
    untouched();
    assert!(
        names(&primary.join("vm-moved")).is_empty(),
        "the copy's files are removed where they are"
    );

    // Swapped once in sync, then handed over: the config and the folder's files go where the
    // copy is.
    let dest = primary.join("vm2");
    server.cli(&["relocate", "vm-lm1", "--to", dest.to_str().unwrap()]);
    wait_for_phase(&server, "vm-lm1", "synced");
    std::fs::rename(&dest, primary.join("vm2-moved")).unwrap();
    std::os::unix::fs::symlink(&outside, &dest).unwrap();
    std::thread::sleep(Duration::from_millis(3200));
    let out = server.cli(&["relocate", "--finish", "vm-lm1"]);
    assert!(out.contains("handed over"), "{out}");
    untouched();
    let moved = primary.join("vm2-moved");
    assert_eq!(names(&moved), ["disk.img", "vm.nvram", "vm.xml"]);
    assert_eq!(std::fs::read(moved.join("vm.nvram")).unwrap(), b"nvram");
    assert_eq!(
        std::fs::metadata(moved.join("disk.img")).unwrap().len(),
        SIZE
    );
}

#[test]
fn a_folder_file_whose_name_is_not_a_plain_name_is_neither_carried_over_nor_removed() {
    let t = tempfile::tempdir().unwrap();
    let (_, repo) = setup(t.path());
    let state = t.path().join("state");
    let primary = t.path().join("primary");
    let server = start(t.path(), &repo, &state);
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    server.stop();
    // As if a name got past the NFS checks into the mount folder's namespace.
    let dir = state.join("overlays/vm-lm1");
    let mut table: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("files.json")).unwrap()).unwrap();
    let id = table["next"].as_u64().unwrap();
    table["next"] = (id + 1).into();
    table["entries"][id.to_string()] = serde_json::json!({
        "name": "../keep.nvram", "parent": 0, "kind": "file", "mode": 420,
        "mtime": "2026-01-01T00:00:00Z", "size": 6,
    });
    std::fs::write(dir.join("files.json"), serde_json::to_vec(&table).unwrap()).unwrap();
    std::fs::write(dir.join("files").join(id.to_string()), b"escape").unwrap();
    // Another VM's file where that name points from the destination.
    std::fs::write(primary.join("keep.nvram"), b"not yours").unwrap();

    let server = start(t.path(), &repo, &state);
    let dest = primary.join("vm");
    relocate_at(&server, &dest, "4");
    assert!(dest.join("vm.xml").exists(), "{}", server.log_text());
    assert_eq!(
        std::fs::read(primary.join("keep.nvram")).unwrap(),
        b"not yours"
    );
    assert_eq!(names(&primary), ["keep.nvram", "vm"]);
    let log = server.log_text();
    assert!(
        log.contains("not carried over") && log.contains("\"../keep.nvram\""),
        "{log}"
    );
    let out = server.cli(&["relocate", "--cancel", "vm-lm1"]);
    assert!(out.contains("cancelled"), "{out}");
    assert_eq!(
        std::fs::read(primary.join("keep.nvram")).unwrap(),
        b"not yours"
    );
    assert_eq!(names(&primary), ["keep.nvram"]);
}

#[test]
fn a_relocation_whose_root_left_the_config_fails_at_the_restart_and_is_left_alone() {
    let t = tempfile::tempdir().unwrap();
    let (_, repo) = setup(t.path());
    let state = t.path().join("state");
    let primary = t.path().join("primary");
    let dest = primary.join("vm");
    let server = start(t.path(), &repo, &state);
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    relocate_at(&server, &dest, "4");
    std::thread::sleep(Duration::from_millis(1500));
    server.stop();
    let before: Vec<(String, u64)> = names(&dest)
        .into_iter()
        .map(|n| {
            let len = std::fs::metadata(dest.join(&n)).unwrap().len();
            (n, len)
        })
        .collect();

    // Another root only: the relocation fails at the start, saying why; a retry is refused.
    let other = t.path().join("other");
    let config = t.path().join("other.toml");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        &config,
        format!("relocate_roots = [{:?}]\n", other.to_str().unwrap()),
    )
    .unwrap();
    let server = Server::start(
        &repo,
        &state,
        "off",
        &["--config", config.to_str().unwrap()],
    );
    let r = relocation(&server, "vm-lm1").expect("the relocation is kept");
    assert_eq!(r["phase"], "failed", "{r}");
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("is not under relocate_roots"), "{error}");
    let st = state.to_str().unwrap();
    let out = livemount(&[
        "relocate",
        "vm-lm1",
        "--to",
        dest.to_str().unwrap(),
        "--state",
        st,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is not under relocate_roots"),
        "{err}"
    );
    assert_eq!(relocation(&server, "vm-lm1").unwrap()["phase"], "failed");
    // A cancel cannot reach the copy either: it says so and keeps the record.
    let out = livemount(&["relocate", "--cancel", "vm-lm1", "--state", st]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("relocate_roots"),
        "{err}"
    );
    assert_eq!(
        relocation(&server, "vm-lm1").unwrap()["phase"],
        "cancelling"
    );
    let after: Vec<(String, u64)> = names(&dest)
        .into_iter()
        .map(|n| {
            let len = std::fs::metadata(dest.join(&n)).unwrap().len();
            (n, len)
        })
        .collect();
    assert_eq!(before, after, "the copy is left as it was");
    assert!(names(&other).is_empty());
    server.stop();

    // The root back: the cancel is carried out at the start.
    let server = start(t.path(), &repo, &state);
    let t0 = Instant::now();
    while relocation(&server, "vm-lm1").is_some() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!dest.exists(), "the partial copy is removed");
}

/// Issue 15, item 15: a graceful stop ends a running relocation before the final sync (its
/// task is the agent's, not a bare spawn), the server says every write is on disk, and at the
/// next start the relocation resumes from what it had recorded and can be cancelled cleanly.
#[test]
fn a_graceful_stop_ends_a_running_relocation_cleanly_and_it_resumes() {
    let t = tempfile::tempdir().unwrap();
    let (_model, repo) = setup(t.path());
    let state = t.path().join("state");
    let dest = t.path().join("primary/vm");
    let server = start(t.path(), &repo, &state);
    server.cli(&["mount", "vm", "--name", "vm-lm1"]);
    relocate_at(&server, &dest, "4");
    std::thread::sleep(Duration::from_millis(2500));
    let before = relocation(&server, "vm-lm1").unwrap();
    assert_eq!(before["phase"], "copying", "{before}");
    let t0 = Instant::now();
    let log_path = state.with_extension("log");
    assert!(server.stop().success());
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("every mount's writes are on disk"), "{log}");
    assert!(!log.contains("background tasks still running"), "{log}");

    let server = start(t.path(), &repo, &state);
    let after = relocation(&server, "vm-lm1").expect("the relocation is back");
    assert_eq!(after["phase"], "copying", "{after}");
    let copied = after["copied"].as_u64().unwrap();
    assert!(copied > 0, "{after}");
    // It goes on from there (the frontier is recorded every 2 s).
    std::thread::sleep(Duration::from_millis(3000));
    let later = relocation(&server, "vm-lm1").unwrap();
    assert!(
        later["copied"].as_u64().unwrap() > copied,
        "{after} then {later}"
    );
    let out = server.cli(&["relocate", "--cancel", "vm-lm1"]);
    assert!(out.contains("cancelled"), "{out}");
    assert!(!dest.exists());
    server.cli(&["unmount", "vm-lm1"]);
}
