//! A server restart that running clients do not notice: handles, file ids and directory
//! cookies are the same after a graceful stop and after `kill -9`; no acknowledged write is lost
//! to `kill -9`, so the write verifier stays (it changes only after a reboot, see the unit tests
//! of `src/nfs/handle.rs`); a handle of an unmounted mount is stale.

mod common;

use common::nfs::*;
use common::*;
use nfs3_client::nfs3_types::nfs3::*;

#[tokio::test(flavor = "multi_thread")]
async fn handles_cookies_and_unstable_writes_survive_restarts_and_kill_9() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(4 * MIB, 71);
    let repo = repo_with_disk(t.path(), "rs", &raw);
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "off", &[]);
    server.cli(&["mount", "rs", "--name", "rs"]);

    let mut c = connect(&server, "rs").await;
    let dir = c.root_nfs_fh3();
    let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
    create(&mut c, &dir, "a.log").await;
    create(&mut c, &dir, "b.log").await;
    let (first, eof) = readdirplus(&mut c, &dir, 0, 300).await.unwrap();
    assert!(
        !eof && !first.is_empty(),
        "a small maxcount gives a partial listing"
    );
    let cookie = first.last().unwrap().1;
    let (rest_before, _) = readdirplus(&mut c, &dir, cookie, 64 * 1024).await.unwrap();
    let v1 = write_how(&mut c, &disk, 4096, b"first", stable_how::UNSTABLE)
        .await
        .unwrap();
    assert_eq!(commit(&mut c, &disk).await.unwrap(), v1);
    write_how(
        &mut c,
        &disk,
        8192,
        b"never committed",
        stable_how::UNSTABLE,
    )
    .await
    .unwrap();
    drop(c);

    // Graceful stop: same handles, same verifier (the stop synced everything).
    assert!(server.stop().success());
    let server = Server::start(&repo, &state, "off", &[]);
    let mut c = connect(&server, "rs").await;
    assert_eq!(c.root_nfs_fh3(), dir, "MNT gives the same handle");
    assert_eq!(
        lookup(&mut c, &dir, "d.img").await.unwrap(),
        disk,
        "LOOKUP gives the same handle"
    );
    assert_eq!(read_at(&mut c, &disk, 4096, 5).await.unwrap(), b"first");
    assert_eq!(
        read_at(&mut c, &disk, 8192, 15).await.unwrap(),
        b"never committed"
    );
    assert_eq!(
        commit(&mut c, &disk).await.unwrap(),
        v1,
        "clean stop: verifier kept"
    );
    let (rest_after, _) = readdirplus(&mut c, &dir, cookie, 64 * 1024).await.unwrap();
    assert_eq!(
        rest_after, rest_before,
        "a cookie resumes the listing where it was"
    );

    // kill -9: the old handles still work, and every acknowledged write is there, UNSTABLE
    // ones included (they were in the page cache), so the verifier stays the same.
    write_how(&mut c, &disk, 12_288, b"durable", stable_how::FILE_SYNC)
        .await
        .unwrap();
    let v2 = write_how(&mut c, &disk, 16_384, b"unstable", stable_how::UNSTABLE)
        .await
        .unwrap();
    assert_eq!(v2, v1);
    drop(c);
    server.kill();
    let server = Server::start(&repo, &state, "off", &[]);
    let mut c = connect(&server, "rs").await;
    assert_eq!(read_at(&mut c, &disk, 12_288, 7).await.unwrap(), b"durable");
    assert_eq!(
        read_at(&mut c, &disk, 16_384, 8).await.unwrap(),
        b"unstable"
    );
    assert_eq!(
        read_at(&mut c, &disk, 0, 4096).await.unwrap(),
        raw[..4096],
        "the backup's bytes through an old handle"
    );
    assert_eq!(
        commit(&mut c, &disk).await.unwrap(),
        v1,
        "nothing was lost, so nothing needs resending"
    );

    // A handle of a mount that was unmounted is stale, even under a new mount of that name.
    drop(c);
    server.cli(&["unmount", "rs"]);
    server.cli(&["mount", "rs", "--name", "rs"]);
    let mut c = connect(&server, "rs").await;
    assert_ne!(c.root_nfs_fh3(), dir);
    assert_eq!(
        read_at(&mut c, &disk, 0, 16).await.unwrap_err(),
        nfsstat3::NFS3ERR_STALE
    );
    let mut bad = disk.clone();
    bad.data = vec![7u8; 40].into();
    assert_eq!(
        read_at(&mut c, &bad, 0, 16).await.unwrap_err(),
        nfsstat3::NFS3ERR_STALE,
        "a handle of another datastore"
    );
    bad.data = vec![7u8; 24].into();
    assert_eq!(
        read_at(&mut c, &bad, 0, 16).await.unwrap_err(),
        nfsstat3::NFS3ERR_STALE,
        "a handle of the layout before the MAC"
    );
    bad.data = vec![7u8; 9].into();
    assert_eq!(
        read_at(&mut c, &bad, 0, 16).await.unwrap_err(),
        nfsstat3::NFS3ERR_BADHANDLE
    );
}

/// QEMU (its own NFS driver, libnfs) writes and reads a live-mounted disk in a loop while the
/// server is killed with SIGKILL and restarted five times on the same port. Every command
/// succeeds (no request is lost: libnfs reconnects and resends), every read right after a write
/// sees it, and the disk at the end equals the model of every write applied to the backup.
#[test]
fn qemu_io_keeps_working_through_repeated_kill_9() {
    let _port111 = port_111_lock();
    let t = tempfile::tempdir().unwrap();
    let size = 8 * MIB as usize;
    let mut model = mixed_disk(size as u64, 72);
    let repo = repo_with_disk(t.path(), "k9", &model);
    let state = t.path().join("state");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let nfs = format!("127.0.0.1:{port}");
    let args = ["--nfs", nfs.as_str()];
    let server = Server::start(&repo, &state, "127.0.0.1:111", &args);
    server.cli(&["mount", "k9", "--name", "k9"]);

    // The script: write a pattern, pause, read it back; offsets and lengths in 512-byte units.
    const WRITES: usize = 150;
    let mut rng = Rng::new(73);
    let mut script = String::new();
    for i in 0..WRITES {
        let len = 512 * (1 + rng.below(512) as usize);
        let off = 512 * rng.below(((size - len) / 512) as u64) as usize;
        let p = (i % 250 + 1) as u8;
        model[off..off + len].fill(p);
        script += &format!("write -P {p} {off} {len}\nsleep 50\nread -P {p} {off} {len}\n");
    }
    let script_path = t.path().join("script");
    write(&script_path, script.as_bytes());
    let url = "nfs://127.0.0.1/livemount/k9/d.img";
    let mut qemu = std::process::Command::new("qemu-io")
        .args(["-f", "raw", url])
        .stdin(std::fs::File::open(&script_path).unwrap())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io is required (scripts/install-deps installs it)");

    let mut server = server;
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(700));
        assert!(
            qemu.try_wait().unwrap().is_none(),
            "qemu-io is still running when the server is killed"
        );
        server.kill();
        server = Server::start(&repo, &state, "127.0.0.1:111", &args);
    }
    let out = qemu.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io failed: {text}");
    for bad in ["fail", "error", "Error"] {
        assert!(!text.contains(bad), "qemu-io reported {bad:?}: {text}");
    }
    assert_eq!(text.matches("wrote ").count(), WRITES, "{text}");
    assert_eq!(text.matches("read ").count(), WRITES, "{text}");
    let kills = server.log_text().matches("livemount serving").count();
    assert_eq!(kills, 6, "five restarts happened while qemu-io ran");

    write(&t.path().join("model.img"), &model);
    let cmp = qemu_compare(t.path().join("model.img").to_str().unwrap(), url);
    assert!(
        cmp.status.success(),
        "the disk differs from the model: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    drop(server);
}

/// SETATTR of mode, owner, group and times on a disk of the backup, on the mount's folder and
/// on a file the client made is answered with, and read back by GETATTR and READDIRPLUS after,
/// a graceful stop and a `kill -9` of the agent; a guard with a stale ctime is refused.
#[tokio::test(flavor = "multi_thread")]
async fn set_mode_owner_and_times_survive_restarts_and_kill_9() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(MIB, 72);
    let repo = repo_with_disk(t.path(), "sa", &raw);
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "off", &[]);
    server.cli(&["mount", "sa", "--name", "sa"]);

    let mut c = connect(&server, "sa").await;
    let dir = c.root_nfs_fh3();
    let disk = lookup(&mut c, &dir, "d.img").await.unwrap();
    let file = create(&mut c, &dir, "x.nvram").await;
    let set = |mode, uid, gid, secs| sattr3 {
        mode: set_mode3::Some(mode),
        uid: set_uid3::Some(uid),
        gid: set_gid3::Some(gid),
        size: set_size3::None,
        atime: set_atime::SET_TO_CLIENT_TIME(nfstime3 {
            seconds: secs + 1,
            nseconds: 5,
        }),
        mtime: set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
            seconds: secs,
            nseconds: 7,
        }),
    };
    let nodes = [
        (&disk, 0o600, 1_400_000_000),
        (&dir, 0o750, 1_500_000_000),
        (&file, 0o640, 1_600_000_000),
    ];
    for (i, (fh, mode, secs)) in nodes.iter().enumerate() {
        let uid = 1000 + i as u32;
        let before = getattr(&mut c, fh).await;
        let res = setattr(&mut c, fh, set(*mode, uid, 2000, *secs), None).await;
        let after = match res {
            SETATTR3res::Ok(ok) => ok.obj_wcc.after.unwrap(),
            SETATTR3res::Err((e, _)) => panic!("SETATTR: {e:?}"),
        };
        assert_eq!((after.mode, after.uid, after.gid), (*mode, uid, 2000));
        assert_eq!((after.mtime.seconds, after.mtime.nseconds), (*secs, 7));
        assert_eq!(after.atime.seconds, secs + 1);
        // A guard with the ctime before the change is stale now.
        let res = setattr(&mut c, fh, sattr3::default(), Some(before.ctime)).await;
        assert!(
            matches!(res, SETATTR3res::Err((nfsstat3::NFS3ERR_NOT_SYNC, _))),
            "a stale guard: {res:?}"
        );
        assert!(matches!(
            setattr(&mut c, fh, sattr3::default(), Some(after.ctime)).await,
            SETATTR3res::Ok(_)
        ));
    }
    let want: Vec<fattr3> = {
        let mut v = Vec::new();
        for (fh, _, _) in &nodes {
            v.push(getattr(&mut c, fh).await);
        }
        v
    };
    drop(c);

    let handles: Vec<nfs_fh3> = nodes.iter().map(|(fh, _, _)| (*fh).clone()).collect();
    assert!(server.stop().success());
    let server = Server::start(&repo, &state, "off", &[]);
    read_back(&server, &handles, &want, "a graceful stop").await;
    server.kill();
    let server = Server::start(&repo, &state, "off", &[]);
    read_back(&server, &handles, &want, "kill -9").await;
}

/// GETATTR of each handle, and the disk's entry in READDIRPLUS, equal `want`.
async fn read_back(server: &Server, handles: &[nfs_fh3], want: &[fattr3], after: &str) {
    let mut c = connect(server, "sa").await;
    for (fh, want) in handles.iter().zip(want) {
        assert_eq!(key(&getattr(&mut c, fh).await), key(want), "after {after}");
    }
    let args = READDIRPLUS3args {
        dir: c.root_nfs_fh3(),
        cookie: 0,
        cookieverf: cookieverf3::default(),
        dircount: 64 * 1024,
        maxcount: 64 * 1024,
    };
    let listed = match c.readdirplus(&args).await.unwrap() {
        READDIRPLUS3res::Ok(ok) => ok.reply.entries.0,
        READDIRPLUS3res::Err((e, _)) => panic!("READDIRPLUS: {e:?}"),
    };
    let disk = listed.iter().find(|e| e.name.as_ref() == b"d.img").unwrap();
    assert_eq!(
        key(&disk.name_attributes.clone().unwrap()),
        key(&want[0]),
        "READDIRPLUS after {after}"
    );
}

/// What a client reads back of a node: mode, owner, group, size, file id and the three times.
fn key(a: &fattr3) -> [u64; 11] {
    let t = |t: &nfstime3| [u64::from(t.seconds), u64::from(t.nseconds)];
    let [a1, a2] = t(&a.atime);
    let [m1, m2] = t(&a.mtime);
    let [c1, c2] = t(&a.ctime);
    [
        u64::from(a.mode),
        u64::from(a.uid),
        u64::from(a.gid),
        a.size,
        a.fileid,
        a1,
        a2,
        m1,
        m2,
        c1,
        c2,
    ]
}

async fn getattr(c: &mut Conn, fh: &nfs_fh3) -> fattr3 {
    match c
        .getattr(&GETATTR3args { object: fh.clone() })
        .await
        .unwrap()
    {
        GETATTR3res::Ok(ok) => ok.obj_attributes,
        GETATTR3res::Err(e) => panic!("GETATTR: {e:?}"),
    }
}

async fn setattr(c: &mut Conn, fh: &nfs_fh3, a: sattr3, guard: Option<nfstime3>) -> SETATTR3res {
    c.setattr(&SETATTR3args {
        object: fh.clone(),
        new_attributes: a,
        guard: match guard {
            Some(t) => sattrguard3::Some(t),
            None => sattrguard3::None,
        },
    })
    .await
    .unwrap()
}
