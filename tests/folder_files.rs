//! Files a hypervisor makes in a mount's folder, over the NFS protocol: what ESXi does when it
//! powers a VM on (lock folder and file, swap file sized by SETATTR, log, config edit by
//! writing `x.vmx~` and renaming it over `x.vmx`), and what it may not do to the backup's
//! disks. Checked with nfs3_client (a client over TCP) and libnfs's nfs-cp/nfs-cat, across a
//! server restart.

mod common;

use common::nfs::*;
use common::*;
use nfs3_client::nfs3_types::nfs3::*;

#[tokio::test(flavor = "multi_thread")]
async fn esxi_power_on_files_work_and_survive_a_restart_while_disks_stay_protected() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(2 * MIB, 51);
    write(&t.path().join("src.raw"), &raw);
    convert(
        &t.path().join("src.raw"),
        &t.path().join("web.vmdk"),
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
    );
    let vmx = esxi_config(t.path(), "web", &["web.vmdk"]);
    let repo = repo_with_backup(t.path(), &vmx);
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "off", &[]);
    server.cli(&["mount", "web", "--name", "web-lm"]);

    let mut c = connect(&server, "web-lm").await;
    let dir = c.root_nfs_fh3();
    // Lock folder and file, swap file sized by SETATTR, a log.
    let lck = match c
        .mkdir(&MKDIR3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name(".lck-00000000000000a1"),
            },
            attributes: sattr3::default(),
        })
        .await
        .unwrap()
    {
        MKDIR3res::Ok(ok) => match ok.obj {
            post_op_fh3::Some(h) => h,
            post_op_fh3::None => panic!("no handle"),
        },
        MKDIR3res::Err((e, _)) => panic!("MKDIR: {e:?}"),
    };
    create(&mut c, &lck, "lock").await;
    let swap = create(&mut c, &dir, "web-5f2a.vswp").await;
    assert_eq!(set_size(&mut c, &swap, 256 << 20).await, nfsstat3::NFS3_OK);
    assert_eq!(size(&mut c, &swap).await, 256 << 20);
    let log = create(&mut c, &dir, "vmware.log").await;
    nfs_write(&mut c, &log, 0, b"2026-11-22T05:20:00Z| vmx| power on\n").await;
    // Config edit: write web.vmx~, rename it over web.vmx.
    let vmx_fh = lookup(&mut c, &dir, "web.vmx").await.unwrap();
    let mut edited = read_all(&mut c, &vmx_fh).await;
    assert!(
        String::from_utf8_lossy(&edited).contains("displayName = \"web-lm\""),
        "the served config is rewritten"
    );
    edited.extend_from_slice(b"tools.syncTime = \"FALSE\"\n");
    let tilde = create(&mut c, &dir, "web.vmx~").await;
    nfs_write(&mut c, &tilde, 0, &edited).await;
    assert_eq!(
        rename(&mut c, &dir, "web.vmx~", "web.vmx").await,
        nfsstat3::NFS3_OK
    );

    // The backup's disks: no resize, no remove, no rename, nothing renamed over them.
    let flat = lookup(&mut c, &dir, "web-flat.vmdk").await.unwrap();
    assert_eq!(
        set_size(&mut c, &flat, 1 << 20).await,
        nfsstat3::NFS3ERR_PERM
    );
    assert_eq!(
        remove(&mut c, &dir, "web-flat.vmdk").await,
        nfsstat3::NFS3ERR_PERM
    );
    assert_eq!(
        rename(&mut c, &dir, "web.vmdk", "x.vmdk").await,
        nfsstat3::NFS3ERR_PERM
    );
    assert_eq!(
        rename(&mut c, &dir, "vmware.log", "web-flat.vmdk").await,
        nfsstat3::NFS3ERR_PERM
    );
    // Names that try to escape are refused; a non-empty folder is not removed.
    assert_eq!(
        lookup(&mut c, &dir, "../web-lm").await.unwrap_err(),
        nfsstat3::NFS3ERR_ACCES
    );
    assert_eq!(
        rmdir(&mut c, &dir, ".lck-00000000000000a1").await,
        nfsstat3::NFS3ERR_NOTEMPTY
    );
    assert_eq!(
        remove(&mut c, &dir, ".lck-00000000000000a1").await,
        nfsstat3::NFS3ERR_ISDIR,
        "REMOVE of a folder"
    );
    assert_eq!(
        rmdir(&mut c, &dir, "vmware.log").await,
        nfsstat3::NFS3ERR_NOTDIR,
        "RMDIR of a file"
    );
    drop(c);
    drop(server);

    // After a restart (the server was killed): everything is as it was.
    let server = Server::start(&repo, &state, "off", &[]);
    let mut c = connect(&server, "web-lm").await;
    let dir = c.root_nfs_fh3();
    let vmx_fh = lookup(&mut c, &dir, "web.vmx").await.unwrap();
    assert_eq!(
        read_all(&mut c, &vmx_fh).await,
        edited,
        "the config edit survived"
    );
    assert!(lookup(&mut c, &dir, "web.vmx~").await.is_err());
    let swap = lookup(&mut c, &dir, "web-5f2a.vswp").await.unwrap();
    assert_eq!(size(&mut c, &swap).await, 256 << 20);
    let log = lookup(&mut c, &dir, "vmware.log").await.unwrap();
    assert_eq!(
        read_all(&mut c, &log).await,
        b"2026-11-22T05:20:00Z| vmx| power on\n"
    );
    assert_eq!(remove(&mut c, &dir, "vmware.log").await, nfsstat3::NFS3_OK);
    assert!(lookup(&mut c, &dir, "vmware.log").await.is_err());
    drop(c);

    // libnfs writes a new file and lists it with the backup's files.
    write(&t.path().join("nvram"), b"NVRAM contents");
    let out = client(
        "nfs-cp",
        &[
            t.path().join("nvram").to_str().unwrap(),
            &server.libnfs_url("web-lm/web.nvram"),
        ],
    );
    assert!(
        out.status.success(),
        "nfs-cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing =
        String::from_utf8(client("nfs-ls", &[&server.libnfs_url("web-lm")]).stdout).unwrap();
    for n in [
        "web.vmx",
        "web.vmdk",
        "web-flat.vmdk",
        "web.nvram",
        "web-5f2a.vswp",
        ".lck-00000000000000a1",
    ] {
        assert!(listing.contains(n), "{n} missing from:\n{listing}");
    }
    let back = client("nfs-cat", &[&server.libnfs_url("web-lm/web.nvram")]);
    assert_eq!(back.stdout, b"NVRAM contents");

    // FSSTAT reports the space of the filesystem holding the state directory (where writes
    // land), not a made-up figure.
    let mut c = connect(&server, "web-lm").await;
    let dir = c.root_nfs_fh3();
    let fs = match c.fsstat(&FSSTAT3args { fsroot: dir }).await.unwrap() {
        FSSTAT3res::Ok(ok) => ok,
        FSSTAT3res::Err(e) => panic!("FSSTAT: {e:?}"),
    };
    let vfs = rustix::fs::statvfs(&state).unwrap();
    assert_eq!(fs.tbytes, vfs.f_blocks * vfs.f_frsize, "total bytes");
    let avail = vfs.f_bavail * vfs.f_frsize;
    assert!(
        fs.abytes.abs_diff(avail) < 1 << 30,
        "available {} vs {avail}",
        fs.abytes
    );
    assert!(fs.abytes <= fs.fbytes && fs.fbytes <= fs.tbytes);
    drop(c);

    // A read-only mount refuses every change.
    server.cli(&["mount", "web", "--name", "web-ro", "--read-only"]);
    let mut c = connect(&server, "web-ro").await;
    let dir = c.root_nfs_fh3();
    let args = CREATE3args {
        where_: diropargs3 {
            dir: dir.clone(),
            name: name("x.lck"),
        },
        how: createhow3::UNCHECKED(sattr3::default()),
    };
    assert!(matches!(
        c.create(&args).await.unwrap(),
        CREATE3res::Err((nfsstat3::NFS3ERR_ROFS, _))
    ));
    let flat = lookup(&mut c, &dir, "web-flat.vmdk").await.unwrap();
    let w = WRITE3args {
        file: flat,
        offset: 0,
        count: 1,
        stable: stable_how::FILE_SYNC,
        data: (&[1u8][..]).into(),
    };
    assert!(matches!(
        c.write(&w).await.unwrap(),
        WRITE3res::Err((nfsstat3::NFS3ERR_ROFS, _))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graceful_stop_keeps_unstable_writes_that_were_never_committed() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "gs", &mixed_disk(2 * MIB, 61));
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "off", &[]);
    server.cli(&["mount", "gs", "--name", "gs"]);
    let mut c = connect(&server, "gs").await;
    let dir = c.root_nfs_fh3();
    let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
    let log = create(&mut c, &dir, "vmware.log").await;
    for (fh, off, data) in [
        (
            &disk,
            12_345u64,
            &b"written to the disk, never committed"[..],
        ),
        (&log, 0, b"log line\n"),
    ] {
        let args = WRITE3args {
            file: fh.clone(),
            offset: off,
            count: data.len() as u32,
            stable: stable_how::UNSTABLE,
            data: data.into(),
        };
        assert!(matches!(c.write(&args).await.unwrap(), WRITE3res::Ok(_)));
    }
    drop(c);
    assert!(server.stop().success(), "SIGTERM exits 0");

    let server = Server::start(&repo, &state, "off", &[]);
    let mut c = connect(&server, "gs").await;
    let dir = c.root_nfs_fh3();
    let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
    let got = match c
        .read(&READ3args {
            file: disk,
            offset: 12_345,
            count: 36,
        })
        .await
        .unwrap()
    {
        READ3res::Ok(ok) => ok.data.to_vec(),
        READ3res::Err((e, _)) => panic!("READ: {e:?}"),
    };
    assert_eq!(&got[..], b"written to the disk, never committed");
    let log = lookup(&mut c, &dir, "vmware.log").await.unwrap();
    assert_eq!(read_all(&mut c, &log).await, b"log line\n");
}

/// An exclusive CREATE resent after a lost reply (same verifier) succeeds with the same file;
/// another verifier finds the name taken (RFC 1813 EXCLUSIVE), also after a restart.
#[tokio::test(flavor = "multi_thread")]
async fn exclusive_create_is_idempotent_for_its_own_verifier() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "ex", &mixed_disk(MIB, 61));
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "off", &[]);
    server.cli(&["mount", "ex", "--name", "ex"]);
    async fn create(c: &mut Conn, verf: &[u8; 8]) -> Result<nfs_fh3, nfsstat3> {
        let args = CREATE3args {
            where_: diropargs3 {
                dir: c.root_nfs_fh3(),
                name: name(".lck-1"),
            },
            how: createhow3::EXCLUSIVE(createverf3(*verf)),
        };
        match c.create(&args).await.unwrap() {
            CREATE3res::Ok(ok) => match ok.obj {
                post_op_fh3::Some(h) => Ok(h),
                post_op_fh3::None => panic!("CREATE gave no handle"),
            },
            CREATE3res::Err((e, _)) => Err(e),
        }
    }
    let mut c = connect(&server, "ex").await;
    let first = create(&mut c, b"verifier").await.unwrap();
    assert_eq!(
        create(&mut c, b"verifier").await,
        Ok(first.clone()),
        "resent: same file"
    );
    assert_eq!(
        create(&mut c, b"another!").await,
        Err(nfsstat3::NFS3ERR_EXIST),
        "another verifier"
    );
    drop(c);
    server.kill();
    let server = Server::start(&repo, &state, "off", &[]);
    let mut c = connect(&server, "ex").await;
    assert_eq!(
        create(&mut c, b"verifier").await,
        Ok(first),
        "resent after a restart"
    );
}

/// A name a client chose never reaches `/metrics` (it could break the text format or grow a
/// label family without bound), and writes or sizes near 2^64 on a folder file are refused
/// over the wire with FBIG, leaving the file as it was.
#[tokio::test(flavor = "multi_thread")]
async fn client_names_stay_out_of_metrics_and_offsets_near_2_64_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "vm", &mixed_disk(MIB, 71));
    let server = Server::start(&repo, &t.path().join("state"), "off", &[]);
    server.cli(&["mount", "vm", "--name", "m"]);

    let mut c = connect(&server, "m").await;
    let dir = c.root_nfs_fh3();
    let evil = "evil\"} 1\nlivemount_injected{x=\"1";
    let fh = create(&mut c, &dir, evil).await;
    nfs_write(&mut c, &fh, 0, b"kept").await;
    for offset in [u64::MAX - 10, u64::MAX - 4, 1 << 63] {
        let args = WRITE3args {
            file: fh.clone(),
            offset,
            count: 8,
            stable: stable_how::FILE_SYNC,
            data: b"12345678".as_slice().into(),
        };
        match c.write(&args).await.unwrap() {
            WRITE3res::Err((e, _)) => assert_eq!(e, nfsstat3::NFS3ERR_FBIG, "WRITE at {offset}"),
            WRITE3res::Ok(_) => panic!("WRITE at {offset} was taken"),
        }
    }
    for sz in [u64::MAX, u64::MAX - 1, 1 << 63] {
        assert_eq!(
            set_size(&mut c, &fh, sz).await,
            nfsstat3::NFS3ERR_FBIG,
            "size {sz}"
        );
    }
    assert_eq!(read_all(&mut c, &fh).await, b"kept");

    let text = server.metrics();
    assert!(
        !text.contains("evil"),
        "a client's name in /metrics:\n{text}"
    );
    assert!(!text.contains("injected"), "{text}");
    // Every line is a comment or `name{labels} value`, and the errors are counted by mount.
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "not a sample line: {line:?}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("livemount_nfs_errors_total{") && l.contains("mount=\"m\"")),
        "{text}"
    );
    // The log names the file, escaped: the newline in its name starts no line of its own.
    let log = server.log_text();
    assert!(log.contains("write failed"), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("livemount_injected")),
        "{log}"
    );
}

/// READDIR (procedure 16) and READDIRPLUS: a client's counts are capped at the 64 KiB FSINFO
/// offers (a folder of 9,998 entries, the most a mount's folder takes besides its config and
/// the folder itself, asked for with maxcount 2^32-1, comes in several pages, each within
/// 64 KiB, together every entry once); the entry past the limit is NFS3ERR_NOSPC; a count too
/// small for one entry is NFS3ERR_TOOSMALL.
#[tokio::test(flavor = "multi_thread")]
async fn readdir_counts_are_capped_and_too_small_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "vm", &mixed_disk(MIB, 72));
    let server = Server::start(&repo, &t.path().join("state"), "off", &[]);
    server.cli(&["mount", "vm", "--name", "m"]);
    let mut c = connect(&server, "m").await;
    let root = c.root_nfs_fh3();
    let dir = match c
        .mkdir(&MKDIR3args {
            where_: diropargs3 {
                dir: root.clone(),
                name: name("many"),
            },
            attributes: sattr3::default(),
        })
        .await
        .unwrap()
    {
        MKDIR3res::Ok(ok) => match ok.obj {
            post_op_fh3::Some(h) => h,
            post_op_fh3::None => lookup(&mut c, &root, "many").await.unwrap(),
        },
        MKDIR3res::Err((e, _)) => panic!("MKDIR: {e:?}"),
    };
    // The config and the folder are two of the 10,000 entries.
    let t0 = std::time::Instant::now();
    for i in 0..9998 {
        create(&mut c, &dir, &format!("a-rather-long-file-name-{i:05}.log")).await;
    }
    eprintln!("9,998 creates over NFS: {:?}", t0.elapsed());
    let past = CREATE3args {
        where_: diropargs3 {
            dir: dir.clone(),
            name: name("one-too-many"),
        },
        how: createhow3::UNCHECKED(sattr3::default()),
    };
    match c.create(&past).await.unwrap() {
        CREATE3res::Err((e, _)) => assert_eq!(e, nfsstat3::NFS3ERR_NOSPC),
        CREATE3res::Ok(_) => panic!("a 10,001st entry was made"),
    }
    assert_eq!(
        lookup(&mut c, &dir, "one-too-many").await,
        Err(nfsstat3::NFS3ERR_NOENT)
    );
    // Bytes an entry of these names takes at least: READDIR's, and READDIRPLUS's with its
    // attributes and handle.
    let plain_bytes = |n: usize| n * (4 + 8 + 4 + 36 + 8);
    let page_bytes = |n: usize| n * (4 + 8 + 4 + 36 + 8 + 4 + 84 + 4 + 4 + 40);
    for plus in [false, true] {
        let t0 = std::time::Instant::now();
        let (mut cookie, mut seen, mut pages) = (0u64, Vec::new(), 0);
        loop {
            let (names, eof) = if plus {
                readdirplus(&mut c, &dir, cookie, u32::MAX).await.unwrap()
            } else {
                readdir(&mut c, &dir, cookie, u32::MAX).await.unwrap()
            };
            pages += 1;
            let size = if plus {
                page_bytes(names.len())
            } else {
                plain_bytes(names.len())
            };
            assert!(size <= 64 * 1024, "{} entries, plus={plus}", names.len());
            cookie = names.last().map_or(cookie, |n| n.1);
            seen.extend(names.into_iter().map(|n| n.0));
            if eof {
                break;
            }
            assert!(pages < 1000, "no end");
        }
        eprintln!(
            "READDIR plus={plus}: 9,998 entries in {pages} pages, {:?}",
            t0.elapsed()
        );
        assert!(pages > 1, "READDIR plus={plus}: one page of 9,998 entries");
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9998, "plus={plus}");
    }
    // A count too small for one entry.
    assert_eq!(
        readdir(&mut c, &dir, 0, 100).await,
        Err(nfsstat3::NFS3ERR_TOOSMALL)
    );
    assert_eq!(
        readdirplus(&mut c, &dir, 0, 120).await,
        Err(nfsstat3::NFS3ERR_TOOSMALL)
    );
}

/// Files and folders under `root` whose permission bits are not `file` (files) or `dir`
/// (folders), `root` itself left out.
fn modes_other_than(root: &std::path::Path, file: u32, dir: u32) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut bad = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let want = if meta.is_dir() { dir } else { file };
            if mode != want {
                bad.push(format!("{} {mode:o}", p.display()));
            }
            if meta.is_dir() {
                todo.push(p);
            }
        }
    }
    bad
}

#[tokio::test(flavor = "multi_thread")]
async fn state_and_repository_files_are_private_unless_the_umask_says_otherwise() {
    // The usual umask, whatever this test was started with: livemount must not rely on it.
    // SAFETY: umask only sets the process's file creation mask.
    unsafe { libc::umask(0o022) };
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "pv", &mixed_disk(2 * MIB, 71));
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "off", &[]);
    server.cli(&["mount", "pv", "--name", "pv"]);
    server.cli(&["mount", "pv", "--name", "pv-ro", "--read-only"]);
    let mut c = connect(&server, "pv").await;
    let dir = c.root_nfs_fh3();
    let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
    nfs_write(&mut c, &disk, 8192, b"the VM's own bytes").await;
    let nvram = create(&mut c, &dir, "pv.nvram").await;
    nfs_write(&mut c, &nvram, 0, b"nvram").await;
    drop(c);
    // A boot of the read-only mount, ended by its unmount: a profile.
    let mut c = connect(&server, "pv-ro").await;
    let dir = c.root_nfs_fh3();
    let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
    read_at(&mut c, &disk, 0, 65536).await.unwrap();
    drop(c);
    server.cli(&["unmount", "pv-ro"]);
    assert!(server.stop().success());
    for p in [
        "overlays/pv/disk0.data",
        "overlays/pv/files.json",
        "profiles",
    ] {
        assert!(state.join(p).exists(), "{p} was not made");
    }
    let bad = modes_other_than(&state, 0o600, 0o700);
    assert!(bad.is_empty(), "state not private: {bad:#?}");
    let bad = modes_other_than(&repo, 0o600, 0o700);
    assert!(bad.is_empty(), "repository not private: {bad:#?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&repo).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "the repository's folder");

    // Unless told otherwise: --umask (or LIVEMOUNT_UMASK) for any command, `umask` in serve's
    // config.
    let shared = t.path().join("shared-repo");
    livemount_ok(&["--umask", "0027", "repo", "init", shared.to_str().unwrap()]);
    let bad = modes_other_than(&shared, 0o640, 0o750);
    assert!(bad.is_empty(), "--umask 0027 not followed: {bad:#?}");
    let config = t.path().join("serve.toml");
    std::fs::write(&config, "umask = \"0027\"\n").unwrap();
    let state2 = t.path().join("state2");
    let server = Server::start(
        &repo,
        &state2,
        "off",
        &["--config", config.to_str().unwrap()],
    );
    server.cli(&["mount", "pv", "--name", "pv"]);
    assert!(server.stop().success());
    // The API token and the handle key are secrets: 0600 whatever the umask.
    let secrets = ["api-token", "handle-key"].map(|s| format!("{}/{s} 600", state2.display()));
    let bad: Vec<_> = modes_other_than(&state2, 0o640, 0o750)
        .into_iter()
        .filter(|p| !secrets.contains(p))
        .collect();
    assert!(bad.is_empty(), "umask = \"0027\" not followed: {bad:#?}");
    // Bad values are refused, naming the setting.
    let out = livemount(&["--umask", "0999", "repo", "init", shared.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--umask \"0999\""),
        "{err}"
    );
    std::fs::write(&config, "umask = \"rwx\"\n").unwrap();
    let out = livemount(&[
        "serve",
        "--repo",
        repo.to_str().unwrap(),
        "--state",
        state2.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--nfs",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("umask \"rwx\""),
        "{err}"
    );
}
