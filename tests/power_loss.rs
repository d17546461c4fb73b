//! Power loss and failing disks under the state directory (issue 15, "Tests that are missing").
//!
//! The state directory is a CutFs (tests/common/cutfs.rs): an in-memory FUSE file system that
//! keeps, at a cut, only what was fsynced, which is the most a power cut may take. A test runs
//! an operation once to count its syncs, then again with the power cut at each of them (the
//! sync itself not made, every later call EIO), kills the server, mounts what was durable and
//! starts the server again, as on a new boot (each server runs with a boot id of its own, bound
//! over `/proc/sys/kernel/random/boot_id` in a mount namespace of its own: a kill alone keeps
//! the page cache, which only a reboot loses). Checked after every cut:
//! - mount creation: the server starts and serves every mount it has; the new mount is there
//!   and whole (its disk reads as the backup), or not there at all and can be made again; if
//!   `mount` answered success, it is there;
//! - COMMIT: what a COMMIT acknowledged is there byte for byte; a block written since the last
//!   acknowledged COMMIT is its old bytes or its new ones, never an error or a mix; if any
//!   was lost, the write verifier changed (so NFS clients resend).
//! - (issue 23) mount creation cut short by a crash instead (the server killed at each sync,
//!   the page cache kept): the same; and what a failed mount leaves never blocks its name,
//!   not even for a mount of another snapshot;
//! - (issue 23) `unmount` discarding a mount's writes: once it answered, no cut brings them
//!   back; a later mount of the name starts from the backup. Keeping them: once it answered,
//!   no cut loses them, and the next mount of the same snapshot adopts them;
//! - (issue 23) a mount that answered, cut before the VM's first write, at each sync of its
//!   first writes and COMMITs, or once they settled: it is served, with every acknowledged
//!   write.
//!
//! The same file system fails changes with EIO or ENOSPC on request: a namespace change that
//! cannot be saved gets NFS3ERR_IO and is not visible (ENOSPC is tested on a real full tmpfs in
//! tests/full_disk.rs), and a mount whose creation meets EIO or ENOSPC at any step fails with
//! an error that names the file and the cause, leaves nothing that keeps the server from
//! starting cleanly, and can be made once the disk is healthy.
//!
//! Needs root and /dev/fuse (CI has both); without them the tests fail and say so.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use common::cutfs::CutFs;
use common::nfs::*;
use common::*;
use nfs3_client::nfs3_types::nfs3::*;

const DISK: u64 = 2 * MIB;

/// Starts a server on `state` as if on a new boot of the machine: its own boot id.
fn boot(repo: &Path, state: &Path, boots: &Path) -> Server {
    boot_with(repo, state, boots, &[])
}

/// [`boot`] with more arguments for `serve`.
fn boot_with(repo: &Path, state: &Path, boots: &Path, extra: &[&str]) -> Server {
    std::fs::create_dir_all(boots).unwrap();
    let n = std::fs::read_dir(boots).unwrap().count();
    let id = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), n);
    let file = boots.join(format!("boot-{n}"));
    write(&file, format!("{id}\n").as_bytes());
    start_on(repo, state, &file, extra)
}

/// Starts a server on `state` after a crash of the last one: the same boot of the machine
/// (its boot id), so the page cache, and whatever was written without a sync, is still there.
fn restart(repo: &Path, state: &Path, boots: &Path) -> Server {
    let n = std::fs::read_dir(boots).unwrap().count();
    assert!(n > 0, "restart before any boot");
    start_on(repo, state, &boots.join(format!("boot-{}", n - 1)), &[])
}

/// Starts a server on `state` whose boot id is the content of `boot_file`.
fn start_on(repo: &Path, state: &Path, boot_file: &Path, extra: &[&str]) -> Server {
    let src = std::ffi::CString::new(boot_file.as_os_str().as_bytes()).unwrap();
    let prepare = move |cmd: &mut std::process::Command| {
        let src = src.clone();
        // SAFETY: between fork and exec only system calls, on memory made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return fail();
                }
                let none = std::ptr::null();
                let flags = libc::MS_REC | libc::MS_PRIVATE;
                if libc::mount(none, c"/".as_ptr(), none, flags, std::ptr::null()) != 0 {
                    return fail();
                }
                let dst = c"/proc/sys/kernel/random/boot_id";
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
                Ok(())
            });
        }
    };
    Server::start_with(repo.to_str().unwrap(), state, "off", extra, &[], &prepare)
}

/// The server's log since `from` bytes.
fn log_since(server: &Server, from: usize) -> String {
    server
        .log_text()
        .get(from..)
        .unwrap_or_default()
        .to_string()
}

fn mount_names(server: &Server) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&server.cli(&["mounts", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| m["spec"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// `livemount mount pl --name NAME` against the server on `state`.
fn mount_cmd(state: &Path, name: &str) -> std::process::Output {
    mount_snapshot_cmd(state, "pl", name)
}

/// `livemount mount SNAPSHOT --name NAME` against the server on `state`.
fn mount_snapshot_cmd(state: &Path, snapshot: &str, name: &str) -> std::process::Output {
    livemount(&[
        "mount",
        snapshot,
        "--name",
        name,
        "--state",
        state.to_str().unwrap(),
    ])
}

/// Backs VM pl up again (the same disk, a snapshot of its own); returns the id of the one
/// before, which `pl` no longer names.
fn add_snapshot(s: &Setup) -> String {
    let ids = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(s.repo.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = ids();
    assert_eq!(before.len(), 1, "one snapshot before: {before:?}");
    let config = s.repo.parent().unwrap().join("pl.xml");
    livemount_ok(&[
        "backup",
        "--repo",
        s.repo.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    let after = ids();
    assert_eq!(after.len(), 2, "a second snapshot: {after:?}");
    before[0].clone()
}

/// A connection to mount NAME's folder from an unprivileged port: these tests make hundreds,
/// more than the privileged ports (300-1023) that TIME_WAIT keeps taken for a minute.
async fn conn(server: &Server, mount: &str) -> Conn {
    use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
    nfs3_client::Nfs3ConnectionBuilder::new(
        nfs3_client::tokio::TokioConnector,
        "127.0.0.1",
        format!("/livemount/{mount}"),
    )
    .mount_port(server.nfs_port)
    .nfs3_port(server.nfs_port)
    .credential(opaque_auth::auth_unix(&auth_unix::default()))
    .connect_from_privileged_port(false)
    .mount()
    .await
    .expect("MNT of the mount's folder")
}

/// The mount NAME serves the backup's disk and its config.
fn assert_whole(server: &Server, name: &str, raw: &[u8], why: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (disk, cfg) = rt.block_on(async {
        let mut c = conn(server, name).await;
        let dir = c.root_nfs_fh3();
        let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
        let cfg = lookup(&mut c, &dir, "pl.xml").await.unwrap();
        (read_disk(&mut c, &disk).await, read_all(&mut c, &cfg).await)
    });
    assert!(
        disk == raw,
        "{why}: mount {name}'s disk does not read as the backup"
    );
    assert!(!cfg.is_empty(), "{why}: mount {name}'s config is empty");
}

struct Setup {
    _t: tempfile::TempDir,
    repo: PathBuf,
    state: PathBuf,
    boots: PathBuf,
    raw: Vec<u8>,
    fs: CutFs,
}

impl Setup {
    /// Makes sync `k` from now the moment of a crash (SIGKILL of `server`) or of a power cut.
    fn arm(&self, k: usize, crash: bool, server: &Server) {
        if crash {
            self.fs.kill_at_sync(k, server.pid());
        } else {
            self.fs.cut_at_sync(k);
        }
    }

    /// After the moment: a crash restarts the server on the same boot (nothing written is
    /// lost); a power cut drops what was not fsynced and boots it again.
    fn recover(&mut self, server: Server, crash: bool) -> Server {
        if crash {
            self.fs.reset_counts();
            server.kill();
            restart(&self.repo, &self.state, &self.boots)
        } else {
            self.fs.cut();
            server.kill();
            self.fs.power_on();
            boot(&self.repo, &self.state, &self.boots)
        }
    }
}

fn setup(seed: u64) -> Setup {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(DISK, seed);
    let repo = repo_with_disk(t.path(), "pl", &raw);
    let state = t.path().join("state");
    let boots = t.path().join("boots");
    let fs = CutFs::mount(&state);
    Setup {
        repo,
        state,
        boots,
        raw,
        fs,
        _t: t,
    }
}

/// Issue 15: power lost at each sync of `mount`. A mount is on disk whole before `mount`
/// answers, and a mount cut short is either not there or whole, never refused at the start.
/// Issue 23: the same with a crash (the server killed at each sync, nothing of the page cache
/// lost), and what a failed mount leaves never blocks its name: it can be mounted again, also
/// from another snapshot (a failed mount's folder is not kept writes), and unmounted.
#[test]
fn a_mount_cut_short_by_power_loss_or_a_crash_is_absent_or_whole_and_its_name_stays_free() {
    let mut s = setup(71);
    let older = add_snapshot(&s);
    let mut server = boot(&s.repo, &s.state, &s.boots);
    // A mount that is there all along; then count the syncs of making another.
    server.cli(&["mount", "pl", "--name", "w"]);
    s.fs.reset_counts();
    server.cli(&["mount", "pl", "--name", "m"]);
    let syncs = s.fs.syncs();
    server.cli(&["unmount", "m"]);
    assert!(syncs.len() >= 8, "too few syncs to be durable: {syncs:?}");
    eprintln!("syncs of `mount`: {syncs:?}");

    for crash in [false, true] {
        for k in 0..=syncs.len() {
            s.arm(k, crash, &server);
            let answered = mount_cmd(&s.state, "m").status.success();
            let cut = s.fs.syncs();
            let from = server_log_len(&s.state);
            // Killed at sync k, or (k past the last) just after `mount` answered.
            server = s.recover(server, crash);
            let what = if crash { "crash" } else { "power cut" };
            let why = format!("{what} at sync {k} of {} ({cut:?})", syncs.len());
            let log = log_since(&server, from);
            assert!(
                !log.contains("mount not served"),
                "{why}: a mount was refused at the start:\n{log}"
            );
            let names = mount_names(&server);
            assert!(names.contains(&"w".to_string()), "{why}: mount w is gone");
            if answered {
                assert!(
                    names.contains(&"m".to_string()),
                    "{why}: `mount` answered but m is gone"
                );
            }
            if !names.contains(&"m".to_string()) {
                let out = mount_snapshot_cmd(&s.state, &older, "m");
                assert!(
                    out.status.success(),
                    "{why}: mounting m again (another snapshot) failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert_whole(&server, "m", &s.raw, &why);
            let out = livemount(&["unmount", "m", "--state", s.state.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{why}: unmount of m failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert_whole(&server, "w", &s.raw, "at the end");
    assert!(server.stop().success());
}

fn server_log_len(state: &Path) -> usize {
    std::fs::metadata(state.with_extension("log")).map_or(0, |m| m.len() as usize)
}

/// One round's unstable writes: (offset, bytes) on the disk, and a line for the log file.
fn round_writes(rng: &mut Rng, round: usize) -> (Vec<(u64, Vec<u8>)>, Vec<u8>) {
    let mut out = Vec::new();
    for _ in 0..4 {
        let len = 1 + rng.below(20_000) as usize;
        let off = rng.below(DISK - len as u64);
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        out.push((off, data));
    }
    let line = format!("round {round}: the VM wrote {} ranges\n", out.len());
    (out, line.into_bytes())
}

async fn read_disk(c: &mut Conn, fh: &nfs_fh3) -> Vec<u8> {
    let mut got = Vec::new();
    while (got.len() as u64) < DISK {
        let part = read_at(c, fh, got.len() as u64, 1 << 20)
            .await
            .unwrap_or_else(|e| panic!("READ at {}: {e:?}", got.len()));
        got.extend(part);
    }
    got
}

/// Issue 15: power lost at each sync of COMMIT (a disk's and a folder file's), round after
/// round on one mount. What a COMMIT acknowledged is there after the restart, byte for byte;
/// what was written since is old or new per 4 KiB block, and reads without error; if some of
/// it was lost the write verifier changed.
#[tokio::test(flavor = "multi_thread")]
async fn what_commit_acknowledged_survives_power_loss_at_any_of_its_syncs() {
    let mut s = setup(72);
    let mut server = boot(&s.repo, &s.state, &s.boots);
    server.cli(&["mount", "pl", "--name", "c"]);
    let mut rng = Rng::new(73);
    let mut disk_model = s.raw.clone();
    let mut log_model: Vec<u8> = Vec::new();
    let mut syncs_per_commit = None;
    let mut lost_rounds = 0;
    let rounds = 8;
    for round in 0..rounds {
        let mut c = conn(&server, "c").await;
        let dir = c.root_nfs_fh3();
        let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
        let log = match lookup(&mut c, &dir, "vmware.log").await {
            Ok(fh) => fh,
            Err(_) => create(&mut c, &dir, "vmware.log").await,
        };
        let (writes, line) = round_writes(&mut rng, round);
        let mut disk_new = disk_model.clone();
        let mut verf = None;
        for (off, data) in &writes {
            let v = write_how(&mut c, &disk, *off, data, stable_how::UNSTABLE)
                .await
                .expect("WRITE UNSTABLE");
            verf = Some(v);
            disk_new[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        let log_off = log_model.len() as u64;
        write_how(&mut c, &log, log_off, &line, stable_how::UNSTABLE)
            .await
            .expect("WRITE UNSTABLE to the log");
        let mut log_new = log_model.clone();
        log_new.extend_from_slice(&line);

        // The first round counts the syncs of the two COMMITs; later ones cut at each.
        let k = match syncs_per_commit {
            None => usize::MAX,
            Some(n) => (round - 1) % (n + 1),
        };
        s.fs.cut_at_sync(k);
        let disk_ok = commit(&mut c, &disk).await.is_ok();
        let log_ok = commit(&mut c, &log).await.is_ok();
        let cut = s.fs.syncs();
        if syncs_per_commit.is_none() {
            assert!(disk_ok && log_ok, "COMMIT failed with no cut: {cut:?}");
            assert!(!cut.is_empty(), "COMMITs that sync nothing: {cut:?}");
            syncs_per_commit = Some(cut.len());
        }
        let at = match k {
            usize::MAX => "after the COMMITs answered".to_string(),
            k => format!("at sync {k} of the COMMITs"),
        };
        let why = format!("round {round}, power cut {at} ({cut:?})");
        drop(c);
        s.fs.cut();
        server.kill();
        s.fs.power_on();
        let from = server_log_len(&s.state);
        server = boot(&s.repo, &s.state, &s.boots);
        assert!(
            !log_since(&server, from).contains("mount not served"),
            "{why}: the mount was refused at the start"
        );

        let mut c = conn(&server, "c").await;
        let dir = c.root_nfs_fh3();
        let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
        let got = read_disk(&mut c, &disk).await;
        if disk_ok {
            assert!(
                got == disk_new,
                "{why}: a COMMITted write of the disk is lost"
            );
        }
        let block = 4096usize;
        for b in 0..DISK as usize / block {
            let r = b * block..(b + 1) * block;
            assert!(
                got[r.clone()] == disk_model[r.clone()] || got[r.clone()] == disk_new[r.clone()],
                "{why}: block {b} of the disk is neither its old bytes nor its new ones"
            );
        }
        let log = lookup(&mut c, &dir, "vmware.log")
            .await
            .unwrap_or_else(|e| panic!("{why}: the log file is gone: {e:?}"));
        let log_got = read_all(&mut c, &log).await;
        if log_ok {
            assert_eq!(
                log_got, log_new,
                "{why}: a COMMITted write of the log is lost"
            );
        }
        assert!(
            log_got.len() >= log_model.len() && log_got[..log_model.len()] == log_model[..],
            "{why}: the log lost what an earlier COMMIT acknowledged"
        );
        let lost = got != disk_new || log_got != log_new;
        if lost {
            lost_rounds += 1;
            let after = commit(&mut c, &disk)
                .await
                .expect("COMMIT after the restart");
            assert_ne!(
                Some(after),
                verf,
                "{why}: unstable writes were lost but the write verifier is the same"
            );
        }
        disk_model = got;
        log_model = log_got;
    }
    assert!(
        lost_rounds > 0,
        "no cut lost an unstable write: the test cannot fail"
    );
    assert!(server.stop().success());
}

/// Issue 15, item 14 with EIO: a namespace change whose save fails (the journal's write, or
/// its sync) gets NFS3ERR_IO and is not visible afterwards, not even after a restart; once the
/// disk is healthy the same change works.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_whose_save_meets_eio_is_refused_and_not_visible() {
    let s = setup(74);
    let server = boot(&s.repo, &s.state, &s.boots);
    server.cli(&["mount", "pl", "--name", "w"]);
    let mut c = conn(&server, "w").await;
    let dir = c.root_nfs_fh3();
    // The hypervisor's way of editing a config: a new copy renamed over it (two records).
    create(&mut c, &dir, "pl.xml~").await;
    let journal = "overlays/w/files.journal";
    // Fail the journal's write, then (in the second pass) only its sync and what follows.
    for from in [0, 1] {
        s.fs.fail_from(journal, libc::EIO, from);
        let args = CREATE3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name("vmware.log"),
            },
            how: createhow3::UNCHECKED(sattr3::default()),
        };
        match c.create(&args).await.unwrap() {
            CREATE3res::Err((e, _)) => assert_eq!(e, nfsstat3::NFS3ERR_IO, "from {from}"),
            CREATE3res::Ok(_) => panic!("a create whose save failed (from {from}) succeeded"),
        }
        assert_eq!(
            lookup(&mut c, &dir, "vmware.log").await,
            Err(nfsstat3::NFS3ERR_NOENT),
            "a refused create is visible (from {from})"
        );
        s.fs.fail_from(journal, libc::EIO, from);
        assert_eq!(
            rename(&mut c, &dir, "pl.xml~", "pl.xml").await,
            nfsstat3::NFS3ERR_IO,
            "from {from}"
        );
        assert!(lookup(&mut c, &dir, "pl.xml~").await.is_ok());
        assert!(lookup(&mut c, &dir, "pl.xml").await.is_ok());
        s.fs.heal();
    }
    // Healthy again: a change works (the config removed: a record of the same length as the
    // first of the refused rename's), and after a restart everything is as acknowledged.
    assert_eq!(remove(&mut c, &dir, "pl.xml").await, nfsstat3::NFS3_OK);
    drop(c);
    assert!(server.stop().success());
    let from = server_log_len(&s.state);
    let server = boot(&s.repo, &s.state, &s.boots);
    let log = log_since(&server, from);
    assert!(
        !log.contains("mount not served"),
        "the mount was refused after the failed saves:\n{log}"
    );
    let mut c = conn(&server, "w").await;
    let dir = c.root_nfs_fh3();
    assert!(
        lookup(&mut c, &dir, "pl.xml~").await.is_ok(),
        "the refused rename's source is gone after a restart"
    );
    for gone in ["pl.xml", "vmware.log"] {
        assert_eq!(
            lookup(&mut c, &dir, gone).await,
            Err(nfsstat3::NFS3ERR_NOENT),
            "{gone} after a restart"
        );
    }
    assert_eq!(
        rename(&mut c, &dir, "pl.xml~", "pl.xml").await,
        nfsstat3::NFS3_OK
    );
    create(&mut c, &dir, "vmware.log").await;
    drop(c);
    assert!(server.stop().success());
}

/// Issue 15: EIO and ENOSPC at each change of making a mount (from that change on, until
/// `mount` has answered). `mount` fails with an error naming the file and the cause; the
/// server then restarts cleanly with no broken mount, and the same mount works.
/// Issue 23: also without a restart (the disk healed under the running server), and the name
/// is free for a mount of another snapshot: what the failed mount left is not kept writes.
#[test]
fn a_mount_that_meets_eio_or_enospc_fails_clearly_and_leaves_nothing_broken() {
    let s = setup(75);
    let older = add_snapshot(&s);
    let mut server = boot(&s.repo, &s.state, &s.boots);
    server.cli(&["mount", "pl", "--name", "w"]);
    s.fs.reset_counts();
    server.cli(&["mount", "pl", "--name", "m"]);
    let changes = s.fs.changes();
    server.cli(&["unmount", "m"]);
    eprintln!("changes of `mount`: {changes:?}");
    for (errno, text) in [
        (libc::EIO, "Input/output error"),
        (libc::ENOSPC, "No space left on device"),
    ] {
        for (k, change) in changes.iter().enumerate() {
            for restart in [true, false] {
                s.fs.fail_from("", errno, k);
                let out = mount_cmd(&s.state, "m");
                s.fs.heal();
                let then = if restart { "a restart" } else { "no restart" };
                let why = format!("{text} from change {k} ({change}), then {then}");
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(!out.status.success(), "{why}: `mount` succeeded");
                assert!(
                    err.contains(text) && err.contains(s.state.to_str().unwrap()),
                    "{why}: the error does not name the file and the cause: {err}"
                );
                if restart {
                    assert!(
                        server.stop().success(),
                        "{why}: the server did not stop cleanly"
                    );
                    let from = server_log_len(&s.state);
                    server = boot(&s.repo, &s.state, &s.boots);
                    let log = log_since(&server, from);
                    assert!(
                        !log.contains("mount not served"),
                        "{why}: a mount was refused at the start:\n{log}"
                    );
                }
                // A full disk lets the failed mount remove what it made; a failing one may
                // not (the spec may have taken its name before its folder's sync failed):
                // then, after a restart, the mount is whole.
                let names = mount_names(&server);
                let leftover = s.state.join("overlays/m").exists();
                if errno == libc::ENOSPC || !names.contains(&"m".to_string()) {
                    assert_eq!(names, ["w"], "{why}");
                    assert!(
                        errno != libc::ENOSPC || !leftover,
                        "{why}: the failed mount left its overlay folder"
                    );
                    let out = mount_snapshot_cmd(&s.state, &older, "m");
                    assert!(
                        out.status.success(),
                        "{why}: mounting m (another snapshot) once the disk is healthy \
                         failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                assert_whole(&server, "m", &s.raw, &why);
                server.cli(&["unmount", "m"]);
            }
        }
    }
    assert!(server.stop().success());
}

/// What a VM adds to its config in these tests, to tell an edited one from the backup's.
const CONFIG_EDIT: &[u8] = b"<!-- edited by the VM -->\n";

/// The VM's writes on mount NAME, each acknowledged as durable (FILE_SYNC): ranges of its
/// disk, a new `vmware.log`, a line added to its config. Returns the disk as written.
fn write_as_the_vm(server: &Server, name: &str, raw: &[u8], seed: u64) -> Vec<u8> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = conn(server, name).await;
        let dir = c.root_nfs_fh3();
        let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
        let mut rng = Rng::new(seed);
        let mut out = raw.to_vec();
        for _ in 0..4 {
            let len = 1 + rng.below(20_000) as usize;
            let off = rng.below(DISK - len as u64);
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            nfs_write(&mut c, &disk, off, &data).await;
            out[off as usize..off as usize + len].copy_from_slice(&data);
        }
        let log = create(&mut c, &dir, "vmware.log").await;
        nfs_write(&mut c, &log, 0, b"the VM ran\n").await;
        let cfg = lookup(&mut c, &dir, "pl.xml").await.unwrap();
        let end = size(&mut c, &cfg).await;
        nfs_write(&mut c, &cfg, end, CONFIG_EDIT).await;
        out
    })
}

/// What mount NAME's folder holds: its disk, whether it has `vmware.log`, whether its config
/// carries [`CONFIG_EDIT`].
fn vm_view(server: &Server, name: &str) -> (Vec<u8>, bool, bool) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = conn(server, name).await;
        let dir = c.root_nfs_fh3();
        let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
        let got = read_disk(&mut c, &disk).await;
        let log = lookup(&mut c, &dir, "vmware.log").await.is_ok();
        let cfg = lookup(&mut c, &dir, "pl.xml").await.unwrap();
        let text = read_all(&mut c, &cfg).await;
        let edited = text.windows(CONFIG_EDIT.len()).any(|w| w == CONFIG_EDIT);
        (got, log, edited)
    })
}

/// Issue 23: once `unmount` has answered that a mount's writes are discarded, no power cut
/// brings them back; cut at each of its syncs, or just after it answered. After the restart
/// the mount is either still there with every write it acknowledged (`unmount` did not
/// answer), or gone; either way, a later mount under the same name starts from the backup
/// (disk, config, no file the VM made), never from the discarded overlay.
#[test]
fn discarded_writes_never_come_back_whenever_the_power_goes_during_or_after_unmount() {
    unmount_cut_at_each_sync(false, 76);
}

/// The other side of the same promise: once `unmount --keep-writes` has answered, no power
/// cut loses the writes (nor does the start that follows take them for a failed mount's):
/// a later mount of the same snapshot under the name adopts every one of them, and a mount of
/// another snapshot under it is refused.
#[test]
fn kept_writes_stay_kept_whenever_the_power_goes_during_or_after_unmount() {
    unmount_cut_at_each_sync(true, 78);
}

/// Mounts d, writes as the VM, and cuts the power (then kills the server: a crash) at each
/// sync of `unmount` (`keep`: `--keep-writes`) and just after it answered; checks what the
/// next mount of d finds.
fn unmount_cut_at_each_sync(keep: bool, seed: u64) {
    let mut s = setup(seed);
    let older = add_snapshot(&s);
    let mut server = boot(&s.repo, &s.state, &s.boots);
    server.cli(&["mount", "pl", "--name", "w"]);
    let state = s.state.to_str().unwrap().to_string();
    let mut unmount = vec!["unmount", "d", "--state", &state];
    if keep {
        unmount.push("--keep-writes");
    }
    // Count the syncs of unmounting a mount the VM wrote to.
    server.cli(&["mount", "pl", "--name", "d"]);
    write_as_the_vm(&server, "d", &s.raw, 1);
    s.fs.reset_counts();
    livemount_ok(&unmount);
    let syncs = s.fs.syncs();
    if keep {
        // Adopted, then discarded: each round starts from the backup.
        server.cli(&["mount", "pl", "--name", "d"]);
        server.cli(&["unmount", "d"]);
    }
    assert!(
        !syncs.is_empty(),
        "an unmount that syncs nothing: {syncs:?}"
    );
    eprintln!("syncs of `unmount` (keep writes: {keep}): {syncs:?}");
    let mut came_back = 0;
    for (crash, k) in [false, true]
        .into_iter()
        .flat_map(|crash| (0..=syncs.len()).map(move |k| (crash, k)))
    {
        server.cli(&["mount", "pl", "--name", "d"]);
        let written = write_as_the_vm(&server, "d", &s.raw, 10 + k as u64);
        s.arm(k, crash, &server);
        let answered = livemount(&unmount).status.success();
        let cut = s.fs.syncs();
        let from = server_log_len(&s.state);
        server = s.recover(server, crash);
        let at = if k == syncs.len() {
            "just after `unmount` answered".to_string()
        } else {
            format!("at sync {k} of {}", syncs.len())
        };
        let what = if crash { "crash" } else { "power cut" };
        let why = format!("keep writes: {keep}, {what} {at} ({cut:?})");
        let log = log_since(&server, from);
        assert!(
            !log.contains("mount not served"),
            "{why}: a mount was refused at the start:\n{log}"
        );
        let names = mount_names(&server);
        assert!(names.contains(&"w".to_string()), "{why}: mount w is gone");
        if names.contains(&"d".to_string()) {
            assert!(!answered, "{why}: `unmount` answered but d is back");
            came_back += 1;
            let (disk, log, edited) = vm_view(&server, "d");
            assert!(
                disk == written && log && edited,
                "{why}: d is back without all of its writes (disk as written: {}, \
                 vmware.log: {log}, config edited: {edited})",
                disk == written
            );
            livemount_ok(&unmount);
        }
        if keep {
            let out = mount_snapshot_cmd(&s.state, &older, "d");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("kept writes"),
                "{why}: a mount of another snapshot was not refused for the kept writes: {err}"
            );
        }
        let out = mount_cmd(&s.state, "d");
        assert!(
            out.status.success(),
            "{why}: mounting d again failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (disk, log, edited) = vm_view(&server, "d");
        if keep {
            assert!(
                disk == written && log && edited,
                "{why}: the new mount d lost kept writes (disk as written: {}, vmware.log: \
                 {log}, config edited: {edited})",
                disk == written
            );
        } else {
            assert!(
                disk == s.raw && !log && !edited,
                "{why}: the new mount d holds discarded writes (disk is the backup's: {}, \
                 vmware.log: {log}, config edited: {edited})",
                disk == s.raw
            );
        }
        server.cli(&["unmount", "d"]);
    }
    assert!(
        came_back > 0 && came_back <= 2 * syncs.len(),
        "no cut kept d, or every one did: the cuts missed the unmount ({came_back} of {})",
        2 * (syncs.len() + 1)
    );
    assert!(server.stop().success());
}

/// Where the power goes in `a_mount_that_answered_comes_back_with_its_committed_writes`.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// Just after `mount` answered, before the VM's first write.
    BeforeWrites,
    /// At this sync of the VM's first writes and what follows them.
    AtSync(usize),
    /// Once everything settled (the boot window ended and its profile was saved).
    Settled,
}

/// What the VM's first writes got acknowledged.
#[derive(Debug, Default)]
struct Acked {
    /// The disk as the VM wrote it (every write applied, acknowledged or not).
    disk: Vec<u8>,
    /// Ranges a COMMIT or FILE_SYNC acknowledged as durable.
    durable: Vec<std::ops::Range<usize>>,
    log_created: bool,
    /// The log's bytes a COMMIT acknowledged.
    log_committed: Vec<u8>,
}

/// The VM's first writes on mount NAME, each allowed to fail (the power may be gone): a
/// read that starts the boot window, an UNSTABLE write of the disk (part blocks), a new
/// `vmware.log` with an UNSTABLE write, COMMITs of both, a FILE_SYNC write of the disk, then
/// UNSTABLE writes of both left uncommitted. `steps` gets the sync count after each step.
async fn first_writes(
    server: &Server,
    mount: &str,
    raw: &[u8],
    fs: &CutFs,
    steps: &mut Vec<(&'static str, usize)>,
) -> Acked {
    let mut c = conn(server, mount).await;
    let dir = c.root_nfs_fh3();
    let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
    let mut acked = Acked {
        disk: raw.to_vec(),
        ..Acked::default()
    };
    let _ = read_at(&mut c, &disk, 0, 65536).await;
    let write = |acked: &mut Acked, off: usize, len: usize, fill: u8| {
        let data = vec![fill; len];
        acked.disk[off..off + len].copy_from_slice(&data);
        data
    };
    let a = 10 * 4096 + 100..10 * 4096 + 100 + 10_000;
    let data = write(&mut acked, a.start, a.len(), 0xa1);
    let _ = write_how(&mut c, &disk, a.start as u64, &data, stable_how::UNSTABLE).await;
    steps.push(("UNSTABLE write of the disk", fs.syncs().len()));
    let args = CREATE3args {
        where_: diropargs3 {
            dir: dir.clone(),
            name: name("vmware.log"),
        },
        how: createhow3::UNCHECKED(sattr3::default()),
    };
    let log = match c.create(&args).await.unwrap() {
        CREATE3res::Ok(_) => lookup(&mut c, &dir, "vmware.log").await.ok(),
        CREATE3res::Err(_) => None,
    };
    acked.log_created = log.is_some();
    steps.push(("CREATE vmware.log", fs.syncs().len()));
    let line = b"the VM booted\n";
    let mut log_ok = false;
    if let Some(log) = &log {
        log_ok = write_how(&mut c, log, 0, line, stable_how::UNSTABLE)
            .await
            .is_ok();
    }
    steps.push(("UNSTABLE write of vmware.log", fs.syncs().len()));
    if commit(&mut c, &disk).await.is_ok() {
        acked.durable.push(a.clone());
    }
    steps.push(("COMMIT of the disk", fs.syncs().len()));
    if let Some(log) = &log {
        if log_ok && commit(&mut c, log).await.is_ok() {
            acked.log_committed = line.to_vec();
        }
    }
    steps.push(("COMMIT of vmware.log", fs.syncs().len()));
    let b = 100 * 4096..102 * 4096;
    let data = write(&mut acked, b.start, b.len(), 0xb2);
    if write_how(&mut c, &disk, b.start as u64, &data, stable_how::FILE_SYNC)
        .await
        .is_ok()
    {
        acked.durable.push(b.clone());
    }
    steps.push(("FILE_SYNC write of the disk", fs.syncs().len()));
    let u = 200 * 4096 + 7..203 * 4096;
    let data = write(&mut acked, u.start, u.len(), 0xc3);
    let _ = write_how(&mut c, &disk, u.start as u64, &data, stable_how::UNSTABLE).await;
    if let Some(log) = &log {
        let more = b"and ran\n";
        let _ = write_how(&mut c, log, line.len() as u64, more, stable_how::UNSTABLE).await;
    }
    steps.push(("UNSTABLE writes left uncommitted", fs.syncs().len()));
    acked
}

/// Issue 23: a mount that answered, then lost power at any moment of what follows: before the
/// VM's first write, at each sync of its first writes and COMMITs (the disk's overlay and a
/// new folder file), and once everything settled (its boot window over and the profile saved).
/// After the restart it is served, with every write a COMMIT or FILE_SYNC acknowledged, and
/// every block of its disk is the backup's or the VM's, read without error.
#[tokio::test(flavor = "multi_thread")]
async fn a_mount_that_answered_comes_back_with_its_committed_writes() {
    let mut s = setup(77);
    // The boot window ends 1 s after the VM's last new block, so the test sees it settle.
    let config = s.state.with_extension("toml");
    write(&config, b"[profiles]\nquiet = \"1s\"\n");
    let extra = ["--config", config.to_str().unwrap()];
    let mut server = boot_with(&s.repo, &s.state, &s.boots, &extra);
    server.cli(&["mount", "pl", "--name", "w"]);
    let mut plan = vec![Moment::Settled, Moment::BeforeWrites];
    let mut counted: Option<Vec<String>> = None;
    let mut i = 0;
    while i < plan.len() {
        let moment = plan[i];
        i += 1;
        server.cli(&["mount", "pl", "--name", "n"]);
        let from = server_log_len(&s.state);
        match moment {
            Moment::AtSync(k) => s.fs.cut_at_sync(k),
            _ => s.fs.reset_counts(),
        }
        let mut steps = Vec::new();
        let acked = match moment {
            Moment::BeforeWrites => Acked {
                disk: s.raw.clone(),
                ..Acked::default()
            },
            _ => {
                let acked = first_writes(&server, "n", &s.raw, &s.fs, &mut steps).await;
                // Settled: the boot window ended, and its profile was saved (or, the power
                // gone, could not be).
                let t0 = std::time::Instant::now();
                loop {
                    let log = log_since(&server, from);
                    if log.contains("boot window ended") || log.contains("boot profile not") {
                        break;
                    }
                    assert!(
                        t0.elapsed().as_secs() < 30,
                        "{moment:?}: the boot window never ended:\n{log}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                acked
            }
        };
        let cut = s.fs.syncs();
        if counted.is_none() {
            // The first round (no cut until it settled) counts the syncs to cut at.
            assert!(
                acked.durable.len() == 2 && !acked.log_committed.is_empty(),
                "writes failed with no cut: {acked:?}"
            );
            eprintln!("syncs of the first writes, by step: {steps:?}\nsyncs: {cut:?}");
            plan.extend((0..cut.len()).map(Moment::AtSync));
            counted = Some(cut.clone());
        }
        let why = format!("power cut {moment:?} ({cut:?})");
        s.fs.cut();
        server.kill();
        s.fs.power_on();
        let from = server_log_len(&s.state);
        server = boot_with(&s.repo, &s.state, &s.boots, &extra);
        let log = log_since(&server, from);
        assert!(
            !log.contains("mount not served"),
            "{why}: a mount was refused at the start:\n{log}"
        );
        let names = mount_names(&server);
        assert!(
            names.contains(&"n".to_string()) && names.contains(&"w".to_string()),
            "{why}: a mount that answered is gone: {names:?}"
        );
        let mut c = conn(&server, "n").await;
        let dir = c.root_nfs_fh3();
        let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
        let got = read_disk(&mut c, &disk).await;
        for r in &acked.durable {
            assert!(
                got[r.clone()] == acked.disk[r.clone()],
                "{why}: an acknowledged write of the disk at {r:?} is lost"
            );
        }
        for b in 0..DISK as usize / 4096 {
            let r = b * 4096..(b + 1) * 4096;
            assert!(
                got[r.clone()] == s.raw[r.clone()] || got[r.clone()] == acked.disk[r.clone()],
                "{why}: block {b} of the disk is neither the backup's nor the VM's"
            );
        }
        let log = lookup(&mut c, &dir, "vmware.log").await;
        if acked.log_created {
            let log = log.unwrap_or_else(|e| panic!("{why}: vmware.log is gone: {e:?}"));
            let bytes = read_all(&mut c, &log).await;
            assert!(
                bytes.starts_with(&acked.log_committed),
                "{why}: vmware.log lost what a COMMIT acknowledged: {:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let cfg = lookup(&mut c, &dir, "pl.xml").await.unwrap();
        assert!(!read_all(&mut c, &cfg).await.is_empty(), "{why}: no config");
        drop(c);
        server.cli(&["unmount", "n"]);
    }
    let counted = counted.unwrap();
    assert!(
        counted.len() >= 4,
        "too few syncs for a COMMIT and a FILE_SYNC: {counted:?}"
    );
    assert!(server.stop().success());
}
