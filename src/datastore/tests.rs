//! The core's rules per kind of node, on a real agent: a repository with one small KVM backup,
//! mounted read-write twice (`rw`, `rw2`), read-only (`ro`) and for one network only (`lim`).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::agent::{MountRequest, PrestageMode};
use crate::repo::{BackupOptions, ChunkSize, NoProgress, Repository};

const HERE: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const ELSEWHERE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
const DISK: u64 = 1 << 20;

async fn core(dir: &Path) -> DatastoreCore {
    let disk: Vec<u8> = (0..DISK as u32).map(|i| (i >> 9) as u8).collect();
    std::fs::write(dir.join("d.img"), disk).unwrap();
    std::fs::write(
        dir.join("vm.xml"),
        "<domain type='kvm'><name>vm</name><uuid>4b1c9a1e-1111-4222-8333-944455556666</uuid>\
         <memory unit='KiB'>65536</memory><os><type arch='x86_64'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='d.img'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
    )
    .unwrap();
    let repo = Repository::init(&dir.join("repo"), ChunkSize::new(64 * 1024).unwrap()).unwrap();
    let opts = BackupOptions::from_config_file(&dir.join("vm.xml"), &[]).unwrap();
    repo.backup(&opts, &NoProgress).await.unwrap();
    let agent = crate::nfs::fuzzing::agent(repo, dir).await.unwrap();
    for (name, read_only, hosts) in [
        ("rw", false, vec![]),
        ("rw2", false, vec![]),
        ("ro", true, vec![]),
        ("lim", false, vec!["127.0.0.0/8".to_string()]),
    ] {
        agent
            .mount(&MountRequest {
                snapshot: "vm".into(),
                at: None,
                name: Some(name.into()),
                read_only,
                network: Default::default(),
                network_map: Default::default(),
                prestage: PrestageMode::Off,
                hosts,
                disks_only: false,
                ..MountRequest::default()
            })
            .await
            .unwrap();
    }
    DatastoreCore::new(Arc::new(agent))
}

fn folder(c: &DatastoreCore, name: &str) -> Node {
    c.lookup(&Node::Root, name.as_bytes(), HERE).unwrap()
}

fn set_size(size: u64) -> SetAttr {
    SetAttr::size(size)
}

fn root() -> Who {
    Who::root()
}

#[tokio::test]
async fn rules_per_kind_of_node() {
    let dir = tempfile::tempdir().unwrap();
    let c = core(dir.path()).await;
    let (rw, rw2, ro) = (folder(&c, "rw"), folder(&c, "rw2"), folder(&c, "ro"));
    let disk = c.lookup(&rw, b"d.img", HERE).unwrap();
    let ro_disk = c.lookup(&ro, b"d.img", HERE).unwrap();
    assert!(matches!(disk, Node::BackupFile(..)), "{disk:?}");

    // Rights.
    let all = Rights {
        modify: true,
        extend: true,
        delete: true,
    };
    let write_only = Rights {
        modify: true,
        ..Rights::default()
    };
    assert_eq!(Node::Root.rights(), Rights::default());
    assert_eq!(rw.rights(), all);
    assert_eq!(ro.rights(), Rights::default());
    assert_eq!(
        disk.rights(),
        write_only,
        "a disk takes writes, never grows"
    );
    assert_eq!(ro_disk.rights(), Rights::default());

    // The root cannot be changed: it keeps nothing a client sets.
    assert_eq!(
        c.setattr(&Node::Root, &root(), set_size(1))
            .await
            .unwrap_err(),
        DatastoreError::AttrsNotKept
    );
    let made = c
        .create(&Node::Root, b"x", CreateMode::Guarded, SetAttr::default())
        .await;
    assert_eq!(made.unwrap_err(), DatastoreError::Root);
    assert_eq!(c.refuse_special(&Node::Root), DatastoreError::Root);

    // The backup's own files: written, never resized, removed, renamed or replaced.
    assert_eq!(
        c.setattr(&disk, &root(), set_size(DISK + 1))
            .await
            .unwrap_err(),
        DatastoreError::BackupFile
    );
    let same = c.setattr(&disk, &root(), set_size(DISK)).await.unwrap();
    assert_eq!(same.size, DISK);
    assert_eq!(
        c.remove(&rw, b"d.img", false).await.unwrap_err(),
        DatastoreError::BackupFile
    );
    assert_eq!(
        c.rename(&rw, b"d.img", &rw, b"e.img").await.unwrap_err(),
        DatastoreError::BackupFile
    );
    let made = c
        .create(&rw, b"d.img", CreateMode::Unchecked, SetAttr::default())
        .await;
    assert_eq!(made.unwrap_err(), DatastoreError::Exists);
    let after = c.write(&disk, 4096, b"new", true).await.unwrap();
    assert_eq!((after.size, after.fileid), (DISK, disk.fileid()));
    let (data, eof) = c.read(&disk, 4096, 3).await.unwrap();
    assert_eq!((&data[..], eof), (&b"new"[..], false));

    // A read-only mount refuses every change.
    assert_eq!(
        c.write(&ro_disk, 0, b"x", false).await.unwrap_err(),
        DatastoreError::ReadOnlyMount
    );
    assert_eq!(
        c.mkdir(&ro, b"d", SetAttr::default()).await.unwrap_err(),
        DatastoreError::ReadOnlyMount
    );
    assert_eq!(
        c.setattr(&ro_disk, &root(), set_size(1)).await.unwrap_err(),
        DatastoreError::ReadOnlyMount
    );

    // Folders are not read or written; files are not listed.
    assert_eq!(c.read(&rw, 0, 1).await.unwrap_err(), DatastoreError::IsDir);
    assert_eq!(
        c.write(&Node::Root, 0, b"x", false).await.unwrap_err(),
        DatastoreError::IsDir
    );
    assert_eq!(
        c.readdir(&disk, 0, 10, HERE).unwrap_err(),
        DatastoreError::NotDir
    );
    assert_eq!(
        c.lookup(&disk, b"x", HERE).unwrap_err(),
        DatastoreError::NotDir
    );

    // The hypervisor's own files: made, written, resized, renamed, removed.
    let f = c
        .create(&rw, b"vm.vswp", CreateMode::Guarded, set_size(8192))
        .await
        .unwrap();
    assert_eq!(c.attr(&f).size, 8192, "the node is as the create left it");
    assert_eq!(f.rights(), all);
    let again = c
        .create(&rw, b"vm.vswp", CreateMode::Guarded, SetAttr::default())
        .await;
    assert_eq!(again.unwrap_err(), DatastoreError::Exists);
    c.rename(&rw, b"vm.vswp", &rw, b"vm.vswp~").await.unwrap();
    assert_eq!(
        c.rename(&rw, b"vm.vswp~", &rw2, b"x").await.unwrap_err(),
        DatastoreError::CrossMount
    );
    assert_eq!(
        c.rename(&rw, b"vm.vswp~", &rw, b"d.img").await.unwrap_err(),
        DatastoreError::BackupFile
    );
    c.remove(&rw, b"vm.vswp~", false).await.unwrap();
    assert_eq!(
        c.lookup(&rw, b"vm.vswp~", HERE).unwrap_err(),
        DatastoreError::NotFound
    );
    assert_eq!(c.attr_now(&f), None, "a removed file has no attributes");
    assert_eq!(c.refuse_special(&rw), DatastoreError::NotSupported);

    // Names.
    assert_eq!(
        c.create(&rw, b".", CreateMode::Guarded, SetAttr::default())
            .await
            .unwrap_err(),
        DatastoreError::Exists
    );
    assert!(matches!(
        c.remove(&rw, b"..", true).await,
        Err(DatastoreError::Invalid(_))
    ));
    assert_eq!(
        c.lookup(&rw, b"a/b", HERE).unwrap_err(),
        DatastoreError::BadName
    );
    assert_eq!(
        c.lookup(&rw, &[b'x'; 256], HERE).unwrap_err(),
        DatastoreError::NameTooLong
    );
}

#[tokio::test]
async fn dots_stay_inside_and_nodes_resolve_for_their_host() {
    let dir = tempfile::tempdir().unwrap();
    let c = core(dir.path()).await;
    let rw = folder(&c, "rw");
    let sub = c.mkdir(&rw, b"sub", SetAttr::default()).await.unwrap();
    let deeper = c.mkdir(&sub, b"deeper", SetAttr::default()).await.unwrap();
    assert!(sub.is_dir());
    let up = |n: &Node| c.lookup(n, b"..", HERE).unwrap().fileid();
    assert_eq!(up(&deeper), sub.fileid());
    assert_eq!(up(&sub), rw.fileid());
    assert_eq!(up(&rw), crate::mount::ROOT_FILEID);
    assert_eq!(up(&Node::Root), crate::mount::ROOT_FILEID);
    assert_eq!(c.lookup(&sub, b".", HERE).unwrap().fileid(), sub.fileid());
    assert_eq!(
        c.remove(&rw, b"sub", true).await.unwrap_err(),
        DatastoreError::NotEmpty
    );

    // A file id a client kept: its mount's generation and the client's host count.
    let id = deeper.fileid();
    let g = deeper.generation();
    assert_eq!(c.resolve(id).unwrap().fileid(), id);
    assert_eq!(c.resolve_held(id, g, HERE).unwrap().fileid(), id);
    assert_eq!(
        c.resolve_held(id, g + 1, HERE).unwrap_err(),
        DatastoreError::Stale
    );
    assert_eq!(
        c.resolve_held(crate::mount::ROOT_FILEID, 1, HERE)
            .unwrap_err(),
        DatastoreError::Stale
    );
    assert_eq!(
        c.resolve(id | 0x3fff_0000).unwrap_err(),
        DatastoreError::Stale
    );
    assert_eq!(
        c.resolve(0xffff_0000_0000_0000).unwrap_err(),
        DatastoreError::Stale
    );

    // A mount limited to other networks: not found, listed or resolved from elsewhere.
    let lim = c.mount_path(b"/livemount/lim", HERE).unwrap();
    assert_eq!(
        c.mount_path(b"/livemount/lim/", ELSEWHERE).unwrap_err(),
        DatastoreError::HostNotAllowed
    );
    assert_eq!(
        c.lookup(&Node::Root, b"lim", ELSEWHERE).unwrap_err(),
        DatastoreError::HostNotAllowed
    );
    assert_eq!(
        c.resolve_held(lim.fileid(), lim.generation(), ELSEWHERE)
            .unwrap_err(),
        DatastoreError::HostNotAllowed
    );
    let names = |host| -> Vec<String> {
        c.readdir(&Node::Root, 0, 100, host)
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name).unwrap())
            .collect()
    };
    assert_eq!(names(HERE), ["rw", "rw2", "ro", "lim"]);
    assert_eq!(names(ELSEWHERE), ["rw", "rw2", "ro"]);
    assert!(matches!(
        c.mount_path(b"/livemount", ELSEWHERE),
        Ok(Node::Root)
    ));
    assert_eq!(
        c.mount_path(b"/elsewhere/rw", HERE).unwrap_err(),
        DatastoreError::NotFound
    );

    // A listing resumes after its cookie, in file id order.
    let all = c.readdir(&rw, 0, 100, HERE).unwrap();
    let ids: Vec<u64> = all.iter().map(|e| e.fileid).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let rest = c.readdir(&rw, ids[0], 100, HERE).unwrap();
    assert_eq!(rest.len(), all.len() - 1);
    assert_eq!(c.readdir(&rw, 0, 1, HERE).unwrap().len(), 1);
}

#[tokio::test]
async fn a_disk_by_name_for_block_protocols() {
    let dir = tempfile::tempdir().unwrap();
    let c = core(dir.path()).await;
    let d = c.disk("rw/d.img", HERE).unwrap();
    assert_eq!(
        (d.name(), d.size(), d.read_only()),
        ("rw/d.img".into(), DISK, false)
    );
    d.write(DISK - 3, b"end", false).await.unwrap();
    d.flush().await.unwrap();
    assert_eq!(&d.read(DISK - 3, 3).await.unwrap().into_bytes()[..], b"end");
    assert_eq!(d.read(0, 512).await.unwrap().len(), 512);
    assert!(matches!(
        d.read(DISK - 3, 4).await,
        Err(DatastoreError::Invalid(_))
    ));
    assert!(matches!(
        d.read(u64::MAX, 1).await,
        Err(DatastoreError::Invalid(_))
    ));
    assert_eq!(
        d.write(DISK - 1, b"xy", false).await.unwrap_err(),
        DatastoreError::TooBig
    );

    let ro = c.disk("ro/d.img", HERE).unwrap();
    assert!(ro.read_only());
    assert_eq!(
        ro.write(0, b"x", true).await.unwrap_err(),
        DatastoreError::ReadOnlyMount
    );
    assert_eq!(
        &ro.read(DISK - 3, 3).await.unwrap().into_bytes()[..],
        &[((DISK - 3) >> 9) as u8; 3],
        "the other mount's writes are not this one's"
    );

    for missing in ["rw", "rw/", "nope/d.img", "rw/vm.xml", "rw/../rw/d.img"] {
        assert!(c.disk(missing, HERE).is_err(), "{missing}");
    }
    assert_eq!(
        c.disk("lim/d.img", ELSEWHERE).unwrap_err(),
        DatastoreError::HostNotAllowed
    );
    let names = |host| -> Vec<String> { c.disks(host).iter().map(|d| d.name()).collect() };
    assert_eq!(
        names(HERE),
        ["rw/d.img", "rw2/d.img", "ro/d.img", "lim/d.img"]
    );
    assert_eq!(names(ELSEWHERE).len(), 3);

    // A disk held open across an unmount goes stale, and stays stale when a mount of the
    // same name comes back: a block client never reads another mount's bytes.
    let held = c.disk("rw2/d.img", HERE).unwrap();
    held.write(0, b"rw2", true).await.unwrap();
    c.agent.unmount("rw2", false).await.unwrap();
    assert_eq!(held.read(0, 3).await.unwrap_err(), DatastoreError::Stale);
    assert_eq!(
        held.write(0, b"x", false).await.unwrap_err(),
        DatastoreError::Stale
    );
    assert_eq!(held.flush().await.unwrap_err(), DatastoreError::Stale);
    c.agent
        .mount(&MountRequest {
            snapshot: "vm".into(),
            at: None,
            name: Some("rw2".into()),
            read_only: false,
            network: Default::default(),
            network_map: Default::default(),
            prestage: PrestageMode::Off,
            hosts: vec![],
            disks_only: false,
            ..MountRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(held.read(0, 3).await.unwrap_err(), DatastoreError::Stale);
    let again = c.disk("rw2/d.img", HERE).unwrap();
    assert_eq!(&again.read(0, 3).await.unwrap().into_bytes()[..], &[0u8; 3]);
}

/// What a client sets on a file it made, on a disk of the backup and on the mount's folder it
/// reads back; what makes no sense to keep is refused, and nothing of a read-only mount.
#[tokio::test]
async fn set_attributes_are_kept_for_every_node_of_a_mount() {
    let dir = tempfile::tempdir().unwrap();
    let c = core(dir.path()).await;
    let (rw, ro) = (folder(&c, "rw"), folder(&c, "ro"));
    let disk = c.lookup(&rw, b"d.img", HERE).unwrap();
    let t = |s| SetTime::Client(jiff::Timestamp::from_second(s).unwrap());
    let all = SetAttr {
        mode: Some(0o640),
        uid: Some(1000),
        gid: Some(1001),
        atime: Some(t(1_600_000_000)),
        mtime: Some(t(1_500_000_000)),
        size: None,
    };
    let file = c
        .create(&rw, b"x.nvram", CreateMode::Guarded, SetAttr::default())
        .await
        .unwrap();
    for node in [&file, &disk, &rw] {
        let before = c.attr_now(node).unwrap();
        let after = c.setattr(node, &root(), all).await.unwrap();
        let now = c.attr_now(node).unwrap();
        assert_eq!(after, now, "{node:?}: the reply is what is read back");
        assert_eq!(
            (now.mode, now.uid, now.gid),
            (0o640, 1000, 1001),
            "{node:?}"
        );
        assert_eq!(now.atime.as_second(), 1_600_000_000, "{node:?}");
        assert_eq!(now.mtime.as_second(), 1_500_000_000, "{node:?}");
        assert!(now.ctime > before.ctime, "{node:?}: the change time moves");
        assert_eq!((now.size, now.kind), (before.size, before.kind), "{node:?}");
    }
    // Set to now, and the mode's type bits are the server's.
    let now = SetAttr {
        mtime: Some(SetTime::Server),
        mode: Some(0o100_600),
        ..SetAttr::default()
    };
    let a = c.setattr(&disk, &root(), now).await.unwrap();
    assert_eq!(a.mode, 0o600);
    assert!(a.mtime.as_second() > 1_500_000_000);

    // Refused where keeping makes no sense.
    assert_eq!(
        c.setattr(&Node::Root, &root(), all).await.unwrap_err(),
        DatastoreError::AttrsNotKept
    );
    assert_eq!(
        c.setattr(&rw, &root(), set_size(0)).await.unwrap_err(),
        DatastoreError::IsDir
    );
    let ro_disk = c.lookup(&ro, b"d.img", HERE).unwrap();
    assert_eq!(
        c.setattr(&ro_disk, &root(), all).await.unwrap_err(),
        DatastoreError::ReadOnlyMount
    );
    // A disks-only mount has no namespace: nothing to keep attributes in; its size stays.
    c.agent
        .mount(&MountRequest {
            snapshot: "vm".into(),
            name: Some("dsk".into()),
            prestage: PrestageMode::Off,
            disks_only: true,
            ..MountRequest::default()
        })
        .await
        .unwrap();
    let dsk = folder(&c, "dsk");
    let listed = c.readdir(&dsk, 0, 10, HERE).unwrap();
    let only = &listed[0].node;
    assert!(matches!(only, Node::BackupFile(..)), "{only:?}");
    assert_eq!(
        c.setattr(only, &root(), all).await.unwrap_err(),
        DatastoreError::AttrsNotKept
    );
    assert_eq!(
        c.setattr(&dsk, &root(), all).await.unwrap_err(),
        DatastoreError::AttrsNotKept
    );
    let size = c.attr(only).size;
    assert_eq!(
        c.setattr(only, &root(), set_size(size)).await.unwrap().size,
        size
    );

    // Another user may not change what it does not own; the owner may not give it away.
    let owner = Who::new(1000, 1001, &[]);
    let other = Who::new(2000, 2000, &[]);
    let mode = SetAttr {
        mode: Some(0o777),
        ..SetAttr::default()
    };
    assert_eq!(
        c.setattr(&file, &other, mode).await.unwrap_err(),
        DatastoreError::NotOwner
    );
    assert_eq!(c.setattr(&file, &owner, mode).await.unwrap().mode, 0o777);
    let give = SetAttr {
        uid: Some(2000),
        ..SetAttr::default()
    };
    assert_eq!(
        c.setattr(&file, &owner, give).await.unwrap_err(),
        DatastoreError::NotOwner
    );
}

/// A caller's rights follow the mode bits, owner and group, as ACCESS answers them: a read, a
/// write, a create that the bits deny is refused the same way.
#[tokio::test]
async fn checks_follow_mode_bits_and_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let c = core(dir.path()).await;
    let rw = folder(&c, "rw");
    let disk = c.lookup(&rw, b"d.img", HERE).unwrap();
    let user = Who::new(1000, 1000, &[]);
    // The defaults let every caller the allow-list admits use a read-write mount's disks
    // (libvirt's QEMU is not root).
    assert_eq!(c.check(&disk, &user, READ | WRITE), Ok(()));
    assert_eq!(c.check(&rw, &user, WRITE | EXEC), Ok(()));
    let ro_disk = c.lookup(&folder(&c, "ro"), b"d.img", HERE).unwrap();
    assert_eq!(c.check(&ro_disk, &user, WRITE), Err(DatastoreError::Denied));
    // Narrowed by root: others may read, not write; root still may.
    let mode = |m| SetAttr {
        mode: Some(m),
        ..SetAttr::default()
    };
    c.setattr(&disk, &root(), mode(0o644)).await.unwrap();
    assert_eq!(c.check(&disk, &user, READ), Ok(()));
    assert_eq!(c.check(&disk, &user, WRITE), Err(DatastoreError::Denied));
    assert_eq!(c.check(&disk, &root(), WRITE), Ok(()));
    c.setattr(&rw, &root(), mode(0o755)).await.unwrap();
    assert_eq!(
        c.check(&rw, &user, WRITE | EXEC),
        Err(DatastoreError::Denied)
    );
    // A group member gets the group's bits.
    c.setattr(
        &disk,
        &root(),
        SetAttr {
            mode: Some(0o060),
            gid: Some(27),
            ..SetAttr::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        c.check(&disk, &Who::new(1000, 1000, &[27]), READ | WRITE),
        Ok(())
    );
    assert_eq!(c.check(&disk, &user, READ), Err(DatastoreError::Denied));
}

/// Mode, owner, group and times set on a disk, on the mount's folder and on a file a client
/// made are in the mount's namespace on disk: an agent opened again over the same state
/// reads them back.
#[tokio::test]
async fn set_attributes_survive_reopening_the_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let c = core(dir.path()).await;
    let rw = folder(&c, "rw");
    let disk = c.lookup(&rw, b"d.img", HERE).unwrap();
    let file = c
        .create(&rw, b"x.log", CreateMode::Guarded, SetAttr::default())
        .await
        .unwrap();
    let set = SetAttr {
        mode: Some(0o600),
        uid: Some(42),
        gid: Some(43),
        mtime: Some(SetTime::Client(
            jiff::Timestamp::from_second(1_000_000_000).unwrap(),
        )),
        ..SetAttr::default()
    };
    let mut want = Vec::new();
    for node in [&disk, &rw, &file] {
        want.push(c.setattr(node, &root(), set).await.unwrap());
    }
    let m = match &rw {
        Node::MountFolder(m) => m.clone(),
        _ => unreachable!(),
    };
    let folder_dir = m.folder.as_ref().unwrap().dir().to_path_buf();
    // The namespace as a new agent opens it.
    let reopened = crate::mount::files::FolderFiles::open(&folder_dir, "vm.xml", 1, b"").unwrap();
    let low = |n: &Node| (n.fileid() & 0xffff_ffff) as u32;
    let meta = reopened.meta(low(&disk)).unwrap();
    assert_eq!(
        (meta.mode, meta.uid, meta.gid),
        (Some(0o600), Some(42), Some(43))
    );
    assert_eq!(meta.mtime.unwrap().as_second(), 1_000_000_000);
    assert_eq!(reopened.meta(0).unwrap().mode, Some(0o600));
    let e = reopened.get(low(&file)).unwrap();
    assert_eq!((e.mode, e.uid, e.gid), (0o600, 42, 43));
    assert_eq!(e.mtime.as_second(), 1_000_000_000);
    assert_eq!(e.ctime(), want[2].ctime);
}
