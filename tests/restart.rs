//! A server restart that running clients do not notice: handles, file ids and directory
//! cookies are the same after a graceful stop and after `kill -9`; the write verifier changes
//! only when unstable writes may have been lost; a handle of an unmounted mount is stale.

mod common;

use common::nfs::*;
use common::*;
use nfs3_client::nfs3_types::nfs3::*;

#[tokio::test(flavor = "multi_thread")]
async fn handles_and_cookies_survive_restarts_and_the_verifier_changes_only_after_a_crash() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(4 * MIB, 71);
    write(&t.path().join("d.img"), &raw);
    let cfg = kvm_config(t.path(), "rs", &[("d.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
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

    // kill -9: the old handles still work, a FILE_SYNC write is there, the verifier is new.
    write_how(&mut c, &disk, 12_288, b"durable", stable_how::FILE_SYNC)
        .await
        .unwrap();
    drop(c);
    server.kill();
    let server = Server::start(&repo, &state, "off", &[]);
    let mut c = connect(&server, "rs").await;
    assert_eq!(read_at(&mut c, &disk, 12_288, 7).await.unwrap(), b"durable");
    assert_eq!(
        read_at(&mut c, &disk, 0, 4096).await.unwrap(),
        raw[..4096],
        "the backup's bytes through an old handle"
    );
    let v3 = commit(&mut c, &disk).await.unwrap();
    assert_ne!(
        v3, v1,
        "after a crash the verifier changes, so clients resend"
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
    bad.data = vec![7u8; 24].into();
    assert_eq!(
        read_at(&mut c, &bad, 0, 16).await.unwrap_err(),
        nfsstat3::NFS3ERR_STALE,
        "a handle of another datastore"
    );
    bad.data = vec![7u8; 9].into();
    assert_eq!(
        read_at(&mut c, &bad, 0, 16).await.unwrap_err(),
        nfsstat3::NFS3ERR_BADHANDLE
    );
}
