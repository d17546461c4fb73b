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
