//! Live mounts served over NFSv3 and read by clients nobody here wrote: libnfs-utils (`nfs-ls`,
//! `nfs-cat`) and qemu-img's NFS driver (which finds the server through the portmapper on 111).
//! The server is the real binary on loopback.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::*;

/// A repository with a KVM VM (two raw disks) and an ESXi VM (a monolithicSparse VMDK).
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    repo: PathBuf,
    kvm_disks: Vec<Vec<u8>>,
    esxi_disk: Vec<u8>,
    kvm_config: Vec<u8>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let a = mixed_disk(6 * MIB + 512, 21);
    let b = mixed_disk(2 * MIB, 22);
    write(&root.join("a.img"), &a);
    write(&root.join("b.img"), &b);
    let kvm = kvm_config(&root, "kvm01", &[("a.img", "raw"), ("b.img", "raw")]);
    let esxi_raw = mixed_disk(5 * MIB, 23);
    let esxi_dir = root.join("esxi");
    std::fs::create_dir(&esxi_dir).unwrap();
    write(&esxi_dir.join("src.raw"), &esxi_raw);
    convert(
        &esxi_dir.join("src.raw"),
        &esxi_dir.join("esx01.vmdk"),
        "vmdk",
        &["-o", "subformat=monolithicSparse"],
    );
    let esxi = esxi_config(&esxi_dir, "esx01", &["esx01.vmdk"]);
    let repo = root.join("repo");
    livemount_ok(&[
        "repo",
        "init",
        repo.to_str().unwrap(),
        "--chunk-size",
        "256KiB",
    ]);
    for cfg in [&kvm, &esxi] {
        livemount_ok(&[
            "backup",
            "--repo",
            repo.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ]);
    }
    Fixture {
        kvm_config: std::fs::read(&kvm).unwrap(),
        _dir: dir,
        root,
        repo,
        kvm_disks: vec![a, b],
        esxi_disk: esxi_raw,
    }
}

fn nfs_cat(server: &Server, path: &str) -> std::process::Output {
    client("nfs-cat", &[&server.libnfs_url(path)])
}

fn nfs_ls(server: &Server, path: &str) -> String {
    let out = client("nfs-ls", &[&server.libnfs_url(path)]);
    assert!(
        out.status.success(),
        "nfs-ls {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_ok(server: &Server, path: &str) -> Vec<u8> {
    let out = nfs_cat(server, path);
    assert!(
        out.status.success(),
        "nfs-cat {path}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    out.stdout
}

#[test]
fn libnfs_lists_the_datastore_and_reads_every_file_byte_identical() {
    let f = fixture();
    let server = Server::start(&f.repo, &f.root.join("state"), "off", &[]);
    let kvm: serde_json::Value =
        serde_json::from_str(&server.cli(&["mount", "kvm01", "--json"])).unwrap();
    let esx: serde_json::Value =
        serde_json::from_str(&server.cli(&["mount", "esx01", "--name", "esx-clone", "--json"]))
            .unwrap();
    let kvm_name = kvm["mount"]["spec"]["name"].as_str().unwrap().to_string();
    assert_eq!(kvm_name, "kvm01-lm1");
    assert_eq!(esx["mount"]["spec"]["name"], "esx-clone");
    assert!(kvm["attach"]["disk_urls"][0]
        .as_str()
        .unwrap()
        .ends_with("/livemount/kvm01-lm1/a.img"));
    assert!(esx["attach"]["esxi"][1]
        .as_str()
        .unwrap()
        .contains("vim-cmd solo/registervm /vmfs/volumes/livemount/esx-clone/esx01.vmx"));
    // What an outage of the store does to each, said where the admin attaches the VM.
    let said = |v: &serde_json::Value, key: &str| v["attach"][key].to_string();
    assert!(
        said(&kvm, "kvm").contains("virsh resume kvm01-lm1"),
        "{kvm:#}"
    );
    assert!(said(&kvm, "kvm").contains("error_policy='stop'"), "{kvm:#}");
    assert!(said(&esx, "esxi").contains("all-paths-down"), "{esx:#}");

    let root = nfs_ls(&server, "");
    assert!(
        root.contains("kvm01-lm1") && root.contains("esx-clone"),
        "{root}"
    );
    let listing = nfs_ls(&server, &kvm_name);
    for name in ["kvm01.xml", "a.img", "b.img"] {
        assert!(listing.contains(name), "{listing}");
    }
    assert!(
        listing.contains(&(6 * MIB + 512).to_string()),
        "exact size in the listing: {listing}"
    );
    assert!(read_ok(&server, &format!("{kvm_name}/a.img")) == f.kvm_disks[0]);
    assert!(read_ok(&server, &format!("{kvm_name}/b.img")) == f.kvm_disks[1]);
    // The config is rewritten for the mount: new name and identity, disks read over NFS from
    // this server; nothing else changes.
    let xml = String::from_utf8(read_ok(&server, &format!("{kvm_name}/kvm01.xml"))).unwrap();
    assert!(xml.contains("<name>kvm01-lm1</name>"), "{xml}");
    assert!(!xml.contains(VM_UUID), "a new UUID: {xml}");
    assert!(
        xml.contains("protocol='nfs' name='/livemount/kvm01-lm1/a.img'"),
        "{xml}"
    );
    assert!(xml.contains("<host name='127.0.0.1'/>"), "{xml}");
    assert!(
        xml.contains("<memory unit='KiB'>262144</memory>"),
        "the rest is kept: {xml}"
    );
    assert_ne!(xml.as_bytes(), &f.kvm_config[..]);
    let vmx = String::from_utf8(read_ok(&server, "esx-clone/esx01.vmx")).unwrap();
    assert!(vmx.contains("displayName = \"esx-clone\""), "{vmx}");
    assert!(vmx.contains("scsi0:0.fileName = \"esx01.vmdk\""), "{vmx}");
    assert!(
        !vmx.contains("56 4d 11 22 33 44 55 66-77 88 99 aa bb cc dd ee"),
        "new uuid.bios: {vmx}"
    );

    let listing = nfs_ls(&server, "esx-clone");
    for name in ["esx01.vmx", "esx01.vmdk", "esx01-flat.vmdk"] {
        assert!(listing.contains(name), "{listing}");
    }
    assert!(read_ok(&server, "esx-clone/esx01-flat.vmdk") == f.esxi_disk);
    let desc = String::from_utf8(read_ok(&server, "esx-clone/esx01.vmdk")).unwrap();
    assert!(
        desc.contains(&format!("RW {} VMFS \"esx01-flat.vmdk\"", 5 * MIB / 512)),
        "{desc}"
    );

    // A `..` path, if libnfs resolves it, lands inside the datastore: exactly the file it names
    // there (the server itself refuses `/` in names: tests/folder_files.rs). A missing name fails.
    let via_parent = nfs_cat(&server, &format!("{kvm_name}/../esx-clone/esx01.vmx"));
    if via_parent.status.success() {
        assert_eq!(via_parent.stdout, read_ok(&server, "esx-clone/esx01.vmx"));
    }
    let missing = nfs_cat(&server, &format!("{kvm_name}/nonexistent"));
    assert!(!missing.status.success(), "a missing file is not readable");
    assert!(server.stop().success(), "SIGTERM stops the server cleanly");
}

#[test]
fn qemu_img_compares_live_mounted_disks_over_nfs_urls() {
    let f = fixture();
    let _port111 = port_111_lock();
    let server = Server::start(&f.repo, &f.root.join("state"), "127.0.0.1:111", &[]);
    server.cli(&["mount", "kvm01"]);
    server.cli(&["mount", "esx01"]);
    write(&f.root.join("a.raw"), &f.kvm_disks[0]);
    write(&f.root.join("e.raw"), &f.esxi_disk);
    // The descriptor-and-flat layout ESXi reads. QEMU 10 cannot follow a descriptor's relative
    // extent over nfs:// (its NFS driver gives a file's own path as its folder, so it looks for
    // `…/esx01.vmdk/esx01-flat.vmdk`). So: the flat file is compared over nfs:// below, and the
    // two files exactly as served are fetched into one folder where QEMU opens the descriptor.
    let flat_url = "nfs://127.0.0.1/livemount/esx01-lm2/esx01-flat.vmdk";
    let local = f.root.join("served");
    std::fs::create_dir(&local).unwrap();
    for name in ["esx01.vmdk", "esx01-flat.vmdk"] {
        write(
            &local.join(name),
            &read_ok(&server, &format!("esx01-lm2/{name}")),
        );
    }
    let local_desc = local.join("esx01.vmdk");
    let cases = [
        (
            "raw",
            "nfs://127.0.0.1/livemount/kvm01-lm1/a.img".to_string(),
            f.root.join("a.raw"),
        ),
        ("raw", flat_url.to_string(), f.root.join("e.raw")),
        (
            "vmdk",
            local_desc.to_str().unwrap().to_string(),
            f.root.join("e.raw"),
        ),
    ];
    for (fmt, url, reference) in cases {
        let out = client(
            "qemu-img",
            &[
                "compare",
                "-f",
                fmt,
                "-F",
                "raw",
                &url,
                reference.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "qemu-img compare {url}: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            server.log_text()
        );
    }
}

#[test]
fn mounts_survive_a_restart_and_unmount_removes_them() {
    let f = fixture();
    let state = f.root.join("state");
    let server = Server::start(&f.repo, &state, "off", &[]);
    server.cli(&["mount", "kvm01", "--name", "keep"]);
    server.cli(&["mount", "kvm01", "--name", "clone2", "--read-only"]);
    assert!(server.stop().success());

    let server = Server::start(&f.repo, &state, "off", &[]);
    let mounts: serde_json::Value =
        serde_json::from_str(&server.cli(&["mounts", "--json"])).unwrap();
    let names: Vec<&str> = mounts
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["spec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["keep", "clone2"]);
    assert_eq!(mounts[1]["spec"]["read_only"], true);
    assert!(read_ok(&server, "keep/a.img") == f.kvm_disks[0]);
    assert!(read_ok(&server, "clone2/a.img") == f.kvm_disks[0]);

    server.cli(&["unmount", "keep"]);
    let out = nfs_cat(&server, "keep/a.img");
    assert!(!out.status.success(), "an unmounted folder is gone");
    assert!(server.cli(&["mounts"]).contains("clone2"));
    drop(server);
    let server = Server::start(&f.repo, &state, "off", &[]);
    assert!(
        !server.cli(&["mounts"]).contains("keep"),
        "unmount is persisted"
    );
}

#[test]
fn clones_of_one_snapshot_share_the_read_cache() {
    let f = fixture();
    let server = Server::start(&f.repo, &f.root.join("state"), "off", &[]);
    for i in 0..3 {
        server.cli(&["mount", "kvm01", "--name", &format!("clone{i}")]);
    }
    for i in 0..3 {
        assert!(read_ok(&server, &format!("clone{i}/a.img")) == f.kvm_disks[0]);
    }
    let status: serde_json::Value =
        serde_json::from_str(&server.cli(&["status", "--json"])).unwrap();
    // Zero blocks never reach the cache; repeated content is one chunk.
    let blocks: Vec<&[u8]> = f.kvm_disks[0]
        .chunks(256 * 1024)
        .filter(|b| b.iter().any(|x| *x != 0))
        .collect();
    let distinct: std::collections::HashSet<&[u8]> = blocks.iter().copied().collect();
    let misses = status["cache"]["misses"].as_u64().unwrap();
    assert_eq!(
        misses,
        distinct.len() as u64,
        "each chunk is fetched once for all clones: {status}"
    );
    assert!(
        status["cache"]["hits"].as_u64().unwrap() >= 2 * blocks.len() as u64,
        "{status}"
    );
}

/// The chunks of disk `disk` of the latest snapshot of `kvm01`, block by block.
fn chunks_of_disk(repo: &Path, disk: usize) -> Vec<livemount::repo::ChunkId> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let repo = livemount::repo::Repository::open(repo).unwrap();
    rt.block_on(disk_chunks(&repo, "kvm01", disk))
}

#[test]
fn a_corrupt_chunk_is_an_io_error_for_that_read_only() {
    let f = fixture();
    // Corrupt every chunk of disk b: any read of b must fail, reads of a must still work.
    let snap = chunks_of_disk(&f.repo, 1);
    for c in &snap {
        let hex = c.to_hex();
        let p = f.repo.join("chunks").join(&hex[..2]).join(&hex);
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len();
        bytes[n / 2] ^= 0x40;
        std::fs::write(&p, bytes).unwrap();
    }
    let server = Server::start(&f.repo, &f.root.join("state"), "off", &[]);
    server.cli(&["mount", "kvm01"]);
    let out = nfs_cat(&server, "kvm01-lm1/b.img");
    assert!(!out.status.success(), "reading a corrupt disk fails");
    assert!(
        out.stdout.len() < 256 * 1024,
        "no data past the first bad chunk reaches the client"
    );
    assert!(
        f.kvm_disks[1].starts_with(&out.stdout),
        "whatever arrived is the right bytes, not zeros or garbage"
    );
    let log = server.log_text();
    // The log line names the mount, the file and one of the corrupt chunks (a 1 MiB read
    // fetches its chunks concurrently; whichever fails first is named).
    assert!(
        log.contains("read failed") && log.contains("kvm01-lm1") && log.contains("b.img"),
        "{log}"
    );
    assert!(snap.iter().any(|c| log.contains(&c.to_hex())), "{log}");
    assert!(
        read_ok(&server, "kvm01-lm1/a.img") == f.kvm_disks[0],
        "other disks keep working"
    );
    // The failures are counted per mount and file on /metrics.
    let metrics = server.metrics();
    assert!(
        metrics.contains("livemount_nfs_errors_total{mount=\"kvm01-lm1\",disk=\"b.img\"}"),
        "{metrics}"
    );
    assert!(!metrics.contains("disk=\"a.img\"}"), "{metrics}");

    // A missing chunk (fresh server, so not in the cache): the same, for that disk only.
    assert!(server.stop().success());
    let image_a: Vec<_> = chunks_of_disk(&f.repo, 0)
        .into_iter()
        .filter(|c| !snap.contains(c))
        .collect();
    let gone = image_a[0].to_hex();
    std::fs::remove_file(f.repo.join("chunks").join(&gone[..2]).join(&gone)).unwrap();
    let server = Server::start(&f.repo, &f.root.join("state"), "off", &[]);
    let out = nfs_cat(&server, "kvm01-lm1/a.img");
    assert!(!out.status.success(), "reading past a missing chunk fails");
    assert!(
        f.kvm_disks[0].starts_with(&out.stdout),
        "whatever arrived is the right bytes"
    );
    assert!(
        server.log_text().contains(&gone),
        "the log names the missing chunk"
    );
}

/// Past its grace (1 s here; tests/outage.rs has reads that ride an outage through).
#[test]
fn an_unreachable_repository_fails_uncached_reads_only_and_then_comes_back() {
    use common::nfs::*;
    use nfs3_client::nfs3_types::nfs3::{nfsstat3, stable_how};
    let f = fixture();
    let server = Server::start(
        &f.repo,
        &f.root.join("state"),
        "off",
        &["--store-outage-grace", "1s"],
    );
    server.cli(&["mount", "kvm01", "--name", "vm-a"]);
    server.cli(&["mount", "kvm01", "--name", "vm-b"]);
    // vm-b has read its disk b (now in the read cache); nobody has read disk a.
    assert!(read_ok(&server, "vm-b/b.img") == f.kvm_disks[1]);
    // The repository's storage goes away (an unmounted share looks the same).
    let away = f.root.join("repo-away");
    std::fs::rename(&f.repo, &away).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let step = 256 * 1024u32;
        let mut c = connect(&server, "vm-a").await;
        let dir = c.root_nfs_fh3();
        let a = lookup(&mut c, &dir, "a.img").await.unwrap();
        let mut failed = 0;
        for off in (0..f.kvm_disks[0].len() as u64).step_by(step as usize) {
            match read_at(&mut c, &a, off, step).await {
                // Zero blocks need no fetch: they still read, and as zeros they are right.
                Ok(data) => assert_eq!(data, f.kvm_disks[0][off as usize..][..data.len()]),
                Err(e) => {
                    assert_eq!(e, nfsstat3::NFS3ERR_IO, "at {off}");
                    failed += 1;
                }
            }
        }
        assert!(failed > 0, "reads that need the repository fail");
        // The other mount keeps working from the cache: reads and writes.
        let mut c = connect(&server, "vm-b").await;
        let dir = c.root_nfs_fh3();
        let b = lookup(&mut c, &dir, "b.img").await.unwrap();
        assert_eq!(
            read_at(&mut c, &b, 0, step).await.unwrap(),
            f.kvm_disks[1][..step as usize]
        );
        let data = vec![0x5a; 4096];
        write_how(&mut c, &b, 8192, &data, stable_how::FILE_SYNC)
            .await
            .unwrap();
        assert_eq!(read_at(&mut c, &b, 8192, 4096).await.unwrap(), data);
    });
    let log = server.log_text();
    assert!(
        log.contains("read failed")
            && log.contains("vm-a")
            && log.contains("a.img")
            && log.contains("cannot be reached")
            && log.contains(", chunk "),
        "the log names the mount, file, offset and chunk: {log}"
    );
    let m = server.metrics();
    assert!(
        m.contains("livemount_nfs_errors_total{mount=\"vm-a\",disk=\"a.img\"}"),
        "{m}"
    );
    assert!(!m.contains("mount=\"vm-b\",file="), "{m}");
    // The storage comes back: the same reads succeed, nothing restarted.
    std::fs::rename(&away, &f.repo).unwrap();
    assert!(read_ok(&server, "vm-a/a.img") == f.kvm_disks[0]);
    assert!(server.child_alive());
}

#[test]
fn malformed_connections_are_cut_and_the_server_keeps_serving() {
    let f = fixture();
    let server = Server::start(&f.repo, &f.root.join("state"), "off", &[]);
    server.cli(&["mount", "kvm01"]);
    let addr = format!("127.0.0.1:{}", server.nfs_port);
    // A fragment header announcing 2 GiB: closed before anything is allocated.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "the connection is closed"
    );
    // Connect and reset at once (SO_LINGER 0: an RST, the way a crashing client leaves), many times.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for _ in 0..50 {
            let s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.set_zero_linger().unwrap();
            drop(s);
        }
    });
    // Garbage that is framed correctly gets an RPC answer or a close, never a crash.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let body = [0xabu8; 40];
    s.write_all(&(0x8000_0000u32 | 40).to_be_bytes()).unwrap();
    s.write_all(&body).unwrap();
    drop(s);
    assert!(read_ok(&server, "kvm01-lm1/b.img") == f.kvm_disks[1]);
    assert!(server.child_alive());
}

#[test]
fn serve_refuses_bad_settings_with_an_error_naming_them_and_creates_nothing() {
    let f = fixture();
    let state = f.root.join("state");
    let repo = f.repo.to_str().unwrap();
    let config = |name: &str, text: &str| {
        let p = f.root.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let unknown = config("unknown.toml", "cache = \"1GiB\"\n");
    let slow = config("slow.toml", "[slow_repository]\nlatency = \"soon\"\n");
    let read_ahead = config("ra.toml", "read_ahead = \"yes\"\n");
    let network_map = config("nm.toml", "[network_map]\ndefault = \"\"\n");
    let nothing = f.root.join("nothing");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--config", &unknown], "unknown field `cache`"),
        (vec!["--config", &slow], "slow_repository.latency \"soon\""),
        (vec!["--config", &read_ahead], "read_ahead"),
        (
            vec!["--config", &network_map],
            "[network_map] in the config: network map \"default\"=\"\": a name is empty",
        ),
        (vec!["--cache-size", "lots"], "--cache-size \"lots\""),
        (vec!["--allow", "10.0.0.0/33"], "--allow"),
        (vec!["--portmap", "here"], "--portmap \"here\""),
        (
            vec!["--config", "/nonexistent/serve.toml"],
            "/nonexistent/serve.toml",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["serve", "--repo", repo, "--state", state.to_str().unwrap()];
        args.extend_from_slice(&["--nfs", "127.0.0.1:0", "--api", "127.0.0.1:0"]);
        args.extend_from_slice(&extra);
        let out = livemount(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(err.contains(want), "{extra:?}: {err}");
        assert!(!state.exists(), "{extra:?} created the state directory");
    }
    // A repository that is not there: named, with what to do.
    let out = livemount(&[
        "serve",
        "--repo",
        nothing.to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a livemount repository") && err.contains("repo init"),
        "{err}"
    );
    assert!(!state.exists() && !nothing.exists());
}

#[test]
fn mount_errors_name_the_problem_and_change_nothing() {
    let f = fixture();
    let server = Server::start(&f.repo, &f.root.join("state"), "off", &[]);
    server.cli(&["mount", "kvm01", "--name", "one"]);
    let state = server.state.to_str().unwrap().to_string();
    let err = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--state", &state]);
        let out = livemount(&a);
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(err(&["mount", "nosuchvm"]).contains("no snapshot matches nosuchvm"));
    assert!(err(&["mount", "kvm01", "--name", "one"]).contains("exists already"));
    assert!(err(&["mount", "kvm01", "--name", "../x"]).contains("not valid"));
    assert!(err(&["unmount", "nothere"]).contains("no mount named nothere"));
    let mounts: serde_json::Value =
        serde_json::from_str(&server.cli(&["mounts", "--json"])).unwrap();
    assert_eq!(
        mounts.as_array().unwrap().len(),
        1,
        "failed calls changed nothing"
    );

    // The API refuses calls without the token, and the token file is private.
    let url: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.state.join("api.json")).unwrap()).unwrap();
    let r = ureq::get(&format!("{}/v1/mounts", url["url"].as_str().unwrap())).call();
    assert!(matches!(r, Err(ureq::Error::StatusCode(401))), "{r:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(server.state.join("api-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // No server: a clear error.
    let out = livemount(&[
        "mounts",
        "--state",
        f.root.join("nostate").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running livemount server"));
}

impl Server {
    fn child_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.child.id())).exists()
    }
}

#[test]
fn a_mount_whose_snapshot_is_damaged_does_not_stop_the_others_after_a_restart() {
    let f = fixture();
    let state = f.root.join("state");
    let server = Server::start(&f.repo, &state, "off", &[]);
    server.cli(&["mount", "kvm01", "--name", "good"]);
    let esx: serde_json::Value =
        serde_json::from_str(&server.cli(&["mount", "esx01", "--name", "bad", "--json"])).unwrap();
    assert!(server.stop().success());
    let id = esx["mount"]["spec"]["snapshot"].as_str().unwrap();
    // Damaged in the repository and in the copy the agent kept of it (a good copy alone would
    // serve the mount: it is the manifest the repository had).
    for manifest in [
        f.repo.join("snapshots").join(format!("{id}.json")),
        state.join("snapshots").join(id).join("manifest"),
    ] {
        let mut bytes = std::fs::read(&manifest).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&manifest, bytes).unwrap();
    }

    let server = Server::start(&f.repo, &state, "off", &[]);
    assert!(
        read_ok(&server, "good/a.img") == f.kvm_disks[0],
        "the healthy mount is served"
    );
    let mounts = server.cli(&["mounts"]);
    assert!(
        mounts.contains("good") && !mounts.contains("bad"),
        "{mounts}"
    );
    let log = server.log_text();
    assert!(
        log.contains("mount not served") && log.contains("bad.json"),
        "{log}"
    );
    assert!(
        state.join("mounts/bad.json").exists(),
        "its state is kept for when the snapshot is repaired"
    );
}
