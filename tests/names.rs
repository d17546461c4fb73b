//! Bad names against every procedure that takes a name, over a real socket: a table of names x
//! procedures, each cell the exact `nfsstat3` that `nfs/fs.rs` documents (`check_name`: `/`,
//! NUL and empty names NFS3ERR_ACCES, over MAX_NAME NFS3ERR_NAMETOOLONG; `new_name`: `.` and
//! `..` NFS3ERR_EXIST, non-UTF-8 NFS3ERR_INVAL; the backup's disks NFS3ERR_PERM, or EXIST for a
//! new file; SYMLINK, MKNOD and LINK NFS3ERR_NOTSUPP; the export root NFS3ERR_ACCES for every
//! change). Afterwards the folder lists exactly the expected files, `..` leads no higher than the
//! datastore root, and the disks read back byte for byte as the source image.

mod common;

use common::nfs::*;
use common::*;
use nfs3_client::nfs3_types::nfs3::nfsstat3::{
    NFS3ERR_ACCES as ACCES, NFS3ERR_EXIST as EXIST, NFS3ERR_INVAL as INVAL,
    NFS3ERR_NAMETOOLONG as TOOLONG, NFS3ERR_NOENT as NOENT, NFS3ERR_NOTDIR as NOTDIR,
    NFS3ERR_NOTSUPP as NOTSUPP, NFS3ERR_PERM as PERM, NFS3_OK as OK,
};
use nfs3_client::nfs3_types::nfs3::*;

/// `fs::MAX_NAME` (private; PATHCONF's `name_max` is checked against it below).
const MAX_NAME: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Proc {
    Lookup,
    CreateUnchecked,
    CreateGuarded,
    CreateExclusive,
    Mkdir,
    Rmdir,
    Remove,
    /// RENAME of the name to `renamed`.
    RenameFrom,
    /// RENAME of `scratch` to the name (in the export root: of `web-lm`, the mount's folder).
    RenameTo,
    Symlink,
    Mknod,
    Link,
}
use Proc::*;

/// The procedures, in the order each row runs them (later cells see what earlier ones did).
const PROCS: [Proc; 12] = [
    Lookup,
    CreateUnchecked,
    CreateGuarded,
    CreateExclusive,
    Mkdir,
    Rmdir,
    Remove,
    RenameFrom,
    RenameTo,
    Symlink,
    Mknod,
    Link,
];

/// The config is the hypervisor's to replace or remove (mount/files.rs), so these cells of its
/// row are not run in the table; renaming it away and back is checked after it.
const NOT_RUN_ON_CONFIG: [Proc; 3] = [Remove, RenameFrom, RenameTo];
const CONFIG: &[u8] = b"web.vmx";

/// (label, name, statuses in the mount's folder in `PROCS` order (None: not run there),
/// LOOKUP's status in the export root, where every other procedure gets NFS3ERR_ACCES).
type Case = (
    &'static str,
    &'static [u8],
    Option<[nfsstat3; 12]>,
    nfsstat3,
);

#[rustfmt::skip]
const CASES: &[Case] = &[
    //                                           LOOKUP   C-UNCH   C-GUARD  C-EXCL   MKDIR    RMDIR    REMOVE   RN-FROM  RN-TO    SYMLINK  MKNOD    LINK      root
    ("dotdot",      b"..",                 Some([OK,      EXIST,   EXIST,   EXIST,   EXIST,   INVAL,   INVAL,   INVAL,   EXIST,   NOTSUPP, NOTSUPP, NOTSUPP]), OK),
    ("dot",         b".",                  Some([OK,      EXIST,   EXIST,   EXIST,   EXIST,   INVAL,   INVAL,   INVAL,   EXIST,   NOTSUPP, NOTSUPP, NOTSUPP]), OK),
    ("empty",       b"",                   Some([ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   NOTSUPP, NOTSUPP, NOTSUPP]), ACCES),
    ("slash",       b"/",                  Some([ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   NOTSUPP, NOTSUPP, NOTSUPP]), ACCES),
    ("a/b",         b"a/b",                Some([ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   NOTSUPP, NOTSUPP, NOTSUPP]), ACCES),
    ("../x",        b"../x",               Some([ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   NOTSUPP, NOTSUPP, NOTSUPP]), ACCES),
    ("nul",         b"a\0b",               Some([ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   ACCES,   NOTSUPP, NOTSUPP, NOTSUPP]), ACCES),
    ("max+1 bytes", &[b'x'; MAX_NAME + 1], Some([TOOLONG, TOOLONG, TOOLONG, TOOLONG, TOOLONG, TOOLONG, TOOLONG, TOOLONG, TOOLONG, NOTSUPP, NOTSUPP, NOTSUPP]), TOOLONG),
    // Allowed: made, then found taken; removed; then `scratch` is renamed to it (and stays).
    ("max bytes",   &[b'x'; MAX_NAME],     Some([NOENT,   OK,      EXIST,   EXIST,   EXIST,   NOTDIR,  OK,      NOENT,   OK,      NOTSUPP, NOTSUPP, NOTSUPP]), NOENT),
    ("non-utf8",    &[0xff, 0xfe],         Some([NOENT,   INVAL,   INVAL,   INVAL,   INVAL,   NOENT,   NOENT,   NOENT,   INVAL,   NOTSUPP, NOTSUPP, NOTSUPP]), NOENT),
    // The backup's files: never replaced, removed or renamed, whatever the procedure.
    ("disk",        b"web-flat.vmdk",      Some([OK,      EXIST,   EXIST,   EXIST,   EXIST,   PERM,    PERM,    PERM,    PERM,    NOTSUPP, NOTSUPP, NOTSUPP]), NOENT),
    ("descriptor",  b"web.vmdk",           Some([OK,      EXIST,   EXIST,   EXIST,   EXIST,   PERM,    PERM,    PERM,    PERM,    NOTSUPP, NOTSUPP, NOTSUPP]), NOENT),
    // UNCHECKED finds the existing config; REMOVE and RENAME (OK) are not run (NOT_RUN_ON_CONFIG).
    ("config",      CONFIG,                Some([OK,      OK,      EXIST,   EXIST,   EXIST,   NOTDIR,  OK,      OK,      OK,      NOTSUPP, NOTSUPP, NOTSUPP]), NOENT),
    // The export root only (in the folder it would be any free name).
    ("mount name",  b"web-lm",             None, OK),
];

fn status<T, E>(r: Nfs3Result<T, E>) -> nfsstat3 {
    match r {
        Nfs3Result::Ok(_) => OK,
        Nfs3Result::Err((s, _)) => s,
    }
}

fn at(dir: &nfs_fh3, name: &[u8]) -> diropargs3<'static> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3::from(name.to_vec()),
    }
}

/// Runs one cell: `p` on `name` in `dir`; `scratch` is RenameTo's source, `file` LINK's.
async fn run(
    c: &mut Conn,
    p: Proc,
    dir: &nfs_fh3,
    name: &[u8],
    scratch: &[u8],
    file: &nfs_fh3,
) -> nfsstat3 {
    let (w, sa) = (at(dir, name), sattr3::default);
    let r = match p {
        Lookup => c.lookup(&LOOKUP3args { what: w }).await.map(status),
        CreateUnchecked | CreateGuarded | CreateExclusive => {
            let how = match p {
                CreateUnchecked => createhow3::UNCHECKED(sa()),
                CreateGuarded => createhow3::GUARDED(sa()),
                _ => createhow3::EXCLUSIVE(createverf3(*b"namesvrf")),
            };
            c.create(&CREATE3args { where_: w, how }).await.map(status)
        }
        Mkdir => {
            let attributes = sa();
            c.mkdir(&MKDIR3args {
                where_: w,
                attributes,
            })
            .await
            .map(status)
        }
        Rmdir => c.rmdir(&RMDIR3args { object: w }).await.map(status),
        Remove => c.remove(&REMOVE3args { object: w }).await.map(status),
        RenameFrom => {
            let (from, to) = (w, at(dir, b"renamed"));
            c.rename(&RENAME3args { from, to }).await.map(status)
        }
        RenameTo => {
            let (from, to) = (at(dir, scratch), w);
            c.rename(&RENAME3args { from, to }).await.map(status)
        }
        Symlink => {
            let symlink = symlinkdata3 {
                symlink_attributes: sa(),
                symlink_data: nfspath3::from(b"/etc/passwd".to_vec()),
            };
            let args = SYMLINK3args { where_: w, symlink };
            c.symlink(&args).await.map(status)
        }
        Mknod => {
            let what = mknoddata3::NF3FIFO(sa());
            c.mknod(&MKNOD3args { where_: w, what }).await.map(status)
        }
        Link => {
            let file = file.clone();
            c.link(&LINK3args { file, link: w }).await.map(status)
        }
    };
    r.unwrap_or_else(|e| {
        panic!(
            "{p:?} {:?}: no reply (connection lost?): {e:?}",
            String::from_utf8_lossy(name)
        )
    })
}

/// The whole file, read in pieces of at most FSINFO's 1 MiB.
async fn read_file(c: &mut Conn, fh: &nfs_fh3) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let piece = read_at(c, fh, out.len() as u64, 1 << 20)
            .await
            .expect("READ");
        if piece.is_empty() {
            return out;
        }
        out.extend_from_slice(&piece);
    }
}

async fn listing(c: &mut Conn, dir: &nfs_fh3) -> Vec<String> {
    let (names, eof) = readdirplus(c, dir, 0, 64 * 1024)
        .await
        .expect("READDIRPLUS");
    assert!(eof, "the listing fits in one reply");
    let mut names: Vec<String> = names.into_iter().map(|(n, _)| n).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_names_never_leave_the_folder_or_touch_the_backups_files() {
    let t = tempfile::tempdir().unwrap();
    let raw = mixed_disk(2 * MIB, 71);
    write(&t.path().join("src.raw"), &raw);
    let vmdk = t.path().join("web.vmdk");
    convert(
        &t.path().join("src.raw"),
        &vmdk,
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
    );
    let vmx = esxi_config(t.path(), "web", &["web.vmdk"]);
    let repo = repo_with_backup(t.path(), &vmx);
    let mut server = Server::start(&repo, &t.path().join("state"), "off", &[]);
    server.cli(&["mount", "web", "--name", "web-lm"]);

    let root = connect(&server, "").await.root_nfs_fh3();
    let mut c = connect(&server, "web-lm").await;
    let dir = c.root_nfs_fh3();
    let pathconf = c
        .pathconf(&PATHCONF3args {
            object: dir.clone(),
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pathconf.name_max as usize, MAX_NAME, "PATHCONF name_max");
    let disk = lookup(&mut c, &dir, "web-flat.vmdk").await.unwrap();
    let (desc_fh, config_fh) = (
        lookup(&mut c, &dir, "web.vmdk").await.unwrap(),
        lookup(&mut c, &dir, "web.vmx").await.unwrap(),
    );
    let (desc, config) = (
        read_file(&mut c, &desc_fh).await,
        read_file(&mut c, &config_fh).await,
    );

    let mut failures = Vec::new();
    for (label, name, folder, root_lookup) in CASES {
        if let Some(row) = folder {
            create(&mut c, &dir, "scratch").await;
            for (p, want) in PROCS.iter().zip(row) {
                if *name == CONFIG && NOT_RUN_ON_CONFIG.contains(p) {
                    continue;
                }
                let got = run(&mut c, *p, &dir, name, b"scratch", &disk).await;
                if got != *want {
                    failures.push(format!(
                        "{label:>12} | folder | {p:?}: expected {want:?}, got {got:?}"
                    ));
                }
            }
        }
        for p in PROCS {
            let want = if p == Lookup { *root_lookup } else { ACCES };
            let got = run(&mut c, p, &root, name, b"web-lm", &disk).await;
            if got != want {
                failures.push(format!(
                    "{label:>12} | root   | {p:?}: expected {want:?}, got {got:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "cells that differ:\n{}",
        failures.join("\n")
    );
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server is still running"
    );

    // `.` is the folder itself; `..` is the datastore root, whose `..` is itself.
    assert_eq!(lookup(&mut c, &dir, ".").await, Ok(dir.clone()));
    assert_eq!(lookup(&mut c, &dir, "..").await, Ok(root.clone()));
    assert_eq!(lookup(&mut c, &root, "..").await, Ok(root.clone()));
    // Nothing moves between the folder and the root, either way.
    let cross = |from: &nfs_fh3, f: &[u8], to: &nfs_fh3, t: &[u8]| RENAME3args {
        from: at(from, f),
        to: at(to, t),
    };
    for args in [
        cross(&dir, b"scratch", &root, b"x"),
        cross(&root, b"web-lm", &dir, b"x"),
        cross(&dir, b"web-flat.vmdk", &root, b"x"),
    ] {
        assert_eq!(
            status(c.rename(&args).await.unwrap()),
            ACCES,
            "RENAME {args:?}"
        );
    }
    // The config can be renamed away and back (an edit), and keeps its bytes.
    assert_eq!(rename(&mut c, &dir, "web.vmx", "web.vmx.bak").await, OK);
    assert_eq!(rename(&mut c, &dir, "web.vmx.bak", "web.vmx").await, OK);

    let long = "x".repeat(MAX_NAME);
    let mut want = vec!["scratch", "web-flat.vmdk", "web.vmdk", "web.vmx", &long];
    want.sort();
    assert_eq!(listing(&mut c, &dir).await, want, "the mount's folder");
    assert_eq!(listing(&mut c, &root).await, ["web-lm"], "the export root");
    assert_eq!(size(&mut c, &disk).await, raw.len() as u64);
    assert!(
        read_file(&mut c, &disk).await == raw,
        "the disk reads as the source image"
    );
    assert_eq!(
        read_file(&mut c, &desc_fh).await,
        desc,
        "the descriptor is unchanged"
    );
    let config_fh = lookup(&mut c, &dir, "web.vmx").await.unwrap();
    assert_eq!(
        read_file(&mut c, &config_fh).await,
        config,
        "the config is unchanged"
    );
}
