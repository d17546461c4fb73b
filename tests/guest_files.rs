//! `files ls` and `files get` against disks made by the real Debian tools: `sfdisk` (an MBR disk
//! with a primary and a logical partition, a GPT disk), `mkfs.ext4 -d` and `mkfs.vfat` +
//! `mcopy`, written into the partitions with `dd conv=notrunc`, backed up as a KVM VM. The files
//! that come back are compared with the ones put in (BLAKE3 of contents, modes, owners, mtimes,
//! link targets); the temp tree is checked for writes outside the destination. Also the project's
//! test guest: its ext4 root lists and its kernel comes back byte-identical to `mcopy`'s copy.
//! NTFS: volumes made by `mkntfs` and filled through `ntfs-3g` (FUSE), compared the same way.
//! A missing tool fails the test (scripts/install-deps installs them); nothing is skipped.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use common::tools::{dd_into, s, tool_text};
use common::{kvm_config, livemount, livemount_ok, repo_with_backup, Rng, MIB};

fn set_mtime(p: &Path, secs: u64) {
    let f = std::fs::File::options().read(true).open(p).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

/// The files that go into the ext4 file system, with every kind the issue names.
fn make_ext_tree(src: &Path, outside: &Path) {
    let mut rng = Rng::new(19);
    let deep = src.join("deep/a/b/c/d/e/f/g/h/i/j/k/l");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom.txt"), b"at the bottom\n").unwrap();
    let long = "a-long-name-".repeat(20); // 240 bytes
    std::fs::write(src.join(&long), b"long name\n").unwrap();
    std::fs::write(src.join("héllo wörld ✓.txt"), "non-ASCII\n").unwrap();
    std::fs::write(src.join("日本語の名前"), "japanese\n").unwrap();
    for name in ["..foo", "...", "foo..", ".hidden"] {
        std::fs::write(src.join(name), name.as_bytes()).unwrap();
    }
    let mut big = vec![0u8; 5 * MIB as usize + 12345];
    rng.fill(&mut big);
    std::fs::write(src.join("large.bin"), &big).unwrap();
    // Sparse: 24 MiB long, data at 0, 8 MiB and the end.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(src.join("sparse.bin")).unwrap();
        f.set_len(24 * MIB).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 8 * MIB).unwrap();
        f.write_all_at(b"end", 24 * MIB - 3).unwrap();
    }
    std::fs::write(src.join("hard1"), b"one inode, two names\n").unwrap();
    std::fs::hard_link(src.join("hard1"), src.join("hard2")).unwrap();
    std::os::unix::fs::symlink("deep/a/b", src.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("abs-link")).unwrap();
    std::os::unix::fs::symlink(outside, src.join("escape")).unwrap();
    std::os::unix::fs::symlink("loop2", src.join("loop1")).unwrap();
    std::os::unix::fs::symlink("loop1", src.join("loop2")).unwrap();
    std::os::unix::fs::symlink("self", src.join("self")).unwrap();
    std::fs::create_dir(src.join("private")).unwrap();
    std::fs::write(src.join("private/secret"), b"0600\n").unwrap();
    std::fs::set_permissions(src.join("private/secret"), PermissionsExt::from_mode(0o600)).unwrap();
    std::fs::set_permissions(src.join("private"), PermissionsExt::from_mode(0o750)).unwrap();
    std::fs::write(src.join("script.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("script.sh"), PermissionsExt::from_mode(0o751)).unwrap();
    std::os::unix::fs::chown(src.join("script.sh"), Some(1234), Some(5678)).unwrap();
    // Known times on every file and folder (links keep theirs: `touch -h` would need a tool).
    let mut t = 1_600_000_000u64;
    for e in walk(src) {
        let m = std::fs::symlink_metadata(src.join(&e)).unwrap();
        if !m.file_type().is_symlink() {
            t += 2;
            // Folders last, so that writing a file does not change its folder's time after.
            if !m.is_dir() {
                set_mtime(&src.join(&e), t);
            }
        }
    }
    let mut dirs: Vec<PathBuf> = walk(src)
        .into_iter()
        .filter(|e| std::fs::symlink_metadata(src.join(e)).unwrap().is_dir())
        .collect();
    dirs.reverse();
    for d in dirs {
        t += 2;
        set_mtime(&src.join(d), t);
    }
}

/// Every path under `root`, relative, sorted (links not followed).
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push(r.clone());
            }
            out.push(r);
        }
    }
    out.sort();
    out
}

/// What a tree holds: per path its kind, mode, owner, mtime and content digest or link target.
fn describe(root: &Path, with_mtime_of_links: bool) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for rel in walk(root) {
        let p = root.join(&rel);
        let m = std::fs::symlink_metadata(&p).unwrap();
        let what = if m.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(&p).unwrap().display())
        } else if m.is_dir() {
            format!("dir {:o} {}", m.mode() & 0o7777, m.mtime())
        } else {
            let bytes = std::fs::read(&p).unwrap();
            format!(
                "file {:o} {} {} {}",
                m.mode() & 0o7777,
                m.len(),
                m.mtime(),
                blake3::hash(&bytes).to_hex()
            )
        };
        let owner = if m.file_type().is_symlink() && !with_mtime_of_links {
            String::new()
        } else {
            format!(" {}:{}", m.uid(), m.gid())
        };
        out.insert(rel, format!("{what}{owner}"));
    }
    out
}

/// Partition starts (sectors) by number, from `sfdisk -J`.
fn starts(disk: &Path) -> BTreeMap<String, u64> {
    let j: serde_json::Value =
        serde_json::from_str(&tool_text("sfdisk", &["-J", s(disk)])).unwrap();
    j["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["node"].as_str().unwrap().to_string(),
                p["start"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn sparse_disk(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

fn run_timed(args: &[&str], limit: Duration) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_livemount"))
        .args(args)
        .env("LIVEMOUNT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("livemount {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    repo: PathBuf,
    ext_src: PathBuf,
    fat_src: PathBuf,
    outside: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let outside = dir.join("outside");
    std::fs::create_dir(&outside).unwrap();
    let ext_src = dir.join("ext-src");
    std::fs::create_dir(&ext_src).unwrap();
    make_ext_tree(&ext_src, &outside);
    let ext = dir.join("ext4.img");
    tool_text(
        "mkfs.ext4",
        &["-q", "-F", "-b", "4096", "-d", s(&ext_src), s(&ext), "48M"],
    );
    // FAT32 filled with mcopy (-m keeps the times; FAT keeps even seconds).
    let fat_src = dir.join("fat-src");
    std::fs::create_dir_all(fat_src.join("Docs/Sub")).unwrap();
    std::fs::write(fat_src.join("Docs/Sub/note.txt"), b"in a FAT folder\n").unwrap();
    std::fs::write(fat_src.join("long name with spaces ünï.txt"), b"lfn\n").unwrap();
    let mut big = vec![0u8; 3 * MIB as usize + 7];
    Rng::new(7).fill(&mut big);
    std::fs::write(fat_src.join("DATA.BIN"), &big).unwrap();
    for (i, e) in walk(&fat_src).iter().enumerate() {
        set_mtime(&fat_src.join(e), 1_700_000_000 + 2 * i as u64);
    }
    let fat = dir.join("fat.img");
    tool_text("mkfs.vfat", &["-F", "32", "-C", s(&fat), "65536"]);
    let items: Vec<String> = std::fs::read_dir(&fat_src)
        .unwrap()
        .map(|e| s(&e.unwrap().path()).to_string())
        .collect();
    let mut args: Vec<&str> = vec!["-i", s(&fat), "-s", "-m", "-Q"];
    args.extend(items.iter().map(|s| s.as_str()));
    args.push("::/");
    tool_text("mcopy", &args);

    // MBR: part1 ext4, an extended partition, logical part5 FAT32.
    let mbr = dir.join("mbr.img");
    sparse_disk(&mbr, 160 * MIB);
    let script = dir.join("mbr.sfdisk");
    std::fs::write(
        &script,
        "label: dos\nunit: sectors\nstart=2048, size=102400, type=83\n\
         start=106496, size=200704, type=5\nstart=108544, size=133120, type=c\n",
    )
    .unwrap();
    sfdisk(&mbr, &script);
    let st = starts(&mbr);
    let part = |n: &str| st[&format!("{}{n}", s(&mbr))];
    dd_into(&mbr, &ext, part("1"));
    dd_into(&mbr, &fat, part("5"));

    // GPT: part1 the same ext4, part2 an ext4 whose group descriptors are garbage.
    let gpt = dir.join("gpt.img");
    sparse_disk(&gpt, 128 * MIB);
    let script = dir.join("gpt.sfdisk");
    std::fs::write(
        &script,
        "label: gpt\nunit: sectors\nstart=2048, size=102400\nstart=104448, size=20480\n\
         start=124928, size=2048\nstart=126976, size=2048\n",
    )
    .unwrap();
    sfdisk(&gpt, &script);
    let st = starts(&gpt);
    dd_into(&gpt, &ext, st[&format!("{}1", s(&gpt))]);
    let bad = dir.join("bad-ext4.img");
    tool_text("mkfs.ext4", &["-q", "-F", "-b", "4096", s(&bad), "10M"]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
        f.write_all_at(&[0xff; 4096], 4096).unwrap();
    }
    dd_into(&gpt, &bad, st[&format!("{}2", s(&gpt))]);
    // Volumes known by their magic that this step does not open: an NTFS boot sector, a LUKS
    // header.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&gpt).unwrap();
        let ntfs = st[&format!("{}3", s(&gpt))] * 512;
        f.write_all_at(b"\xebR\x90NTFS    ", ntfs).unwrap();
        f.write_all_at(b"\x55\xaa", ntfs + 510).unwrap();
        f.write_all_at(b"LUKS\xba\xbe\x00\x02", st[&format!("{}4", s(&gpt))] * 512)
            .unwrap();
    }

    let cfg = kvm_config(&dir, "gf", &[("mbr.img", "raw"), ("gpt.img", "raw")]);
    let repo = repo_with_backup(&dir, &cfg);
    Fixture {
        _tmp: tmp,
        dir,
        repo,
        ext_src,
        fat_src,
        outside,
    }
}

fn sfdisk(disk: &Path, script: &Path) {
    let out = Command::new("sfdisk")
        .args(["-q", s(disk)])
        .stdin(std::fs::File::open(script).unwrap())
        .output()
        .expect("running sfdisk (scripts/install-deps installs fdisk)");
    assert!(
        out.status.success(),
        "sfdisk failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&livemount_ok(args)).unwrap()
}

/// Every path under the temp folder outside `skip` and the repository's `leases/` (`files get`
/// holds a lease while it runs), with size and mtime.
fn snapshot_tree(root: &Path, skip: &Path) -> BTreeMap<PathBuf, (u64, i64)> {
    walk(root)
        .into_iter()
        .filter(|p| !root.join(p).starts_with(skip) && !p.ends_with("leases"))
        .filter(|p| !p.starts_with("repo/leases"))
        .map(|p| {
            let m = std::fs::symlink_metadata(root.join(&p)).unwrap();
            (p, (m.len(), m.mtime()))
        })
        .collect()
}

#[test]
fn files_ls_and_get_give_back_what_the_debian_tools_put_in() {
    let f = fixture();
    let repo = s(&f.repo);

    // The volumes: the extended partition is no volume; the damaged one is listed.
    let top = json(&["files", "ls", "gf", "--repo", repo, "--json"]);
    let vols: Vec<(String, String, u64)> = top["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_string(),
                v["type"].as_str().unwrap().to_string(),
                v["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        vols,
        vec![
            ("/vda/part1".into(), "ext4".into(), 102400 * 512),
            ("/vda/part5".into(), "fat32".into(), 133120 * 512),
            ("/vdb/part1".into(), "ext4".into(), 102400 * 512),
            ("/vdb/part2".into(), "ext4".into(), 20480 * 512),
            ("/vdb/part3".into(), "ntfs".into(), 2048 * 512),
            ("/vdb/part4".into(), "luks".into(), 2048 * 512),
        ]
    );
    let reasons: Vec<&str> = top["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        vec!["luks: encrypted, cannot be opened without its key"]
    );
    let text = livemount_ok(&["files", "ls", "gf", "--repo", repo]);
    assert!(text.contains("(luks: encrypted"), "{text}");
    // The NTFS volume is a boot sector and nothing else: a clear error, not a crash.
    let ntfs = livemount(&["files", "ls", "gf", "/vdb/part3/x", "--repo", repo]);
    assert!(!ntfs.status.success());
    let err = String::from_utf8_lossy(&ntfs.stderr);
    assert!(
        err.contains("/vdb/part3: cannot open its ntfs file system"),
        "{err}"
    );
    assert!(!err.contains("crashed"), "{err}");
    let only_b = json(&[
        "files", "ls", "gf", "--disk", "vdb", "--repo", repo, "--json",
    ]);
    assert_eq!(only_b["volumes"].as_array().unwrap().len(), 4);

    // ls of the ext4 root: names, links and their targets.
    let text = livemount_ok(&["files", "ls", "gf", "/vda/part1", "--repo", repo]);
    for want in [
        "rel-link -> deep/a/b",
        "abs-link -> /etc/passwd",
        "loop1 -> loop2",
        "self -> self",
        "héllo wörld ✓.txt",
        "日本語の名前",
        "..foo",
        "deep/",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    let ls = json(&["files", "ls", "gf", "/vda/part1", "--repo", repo, "--json"]);
    let script = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "script.sh")
        .unwrap();
    assert_eq!(
        (
            script["mode"].as_u64(),
            script["uid"].as_u64(),
            script["gid"].as_u64()
        ),
        (Some(0o751), Some(1234), Some(5678))
    );
    let one = json(&[
        "files",
        "ls",
        "gf",
        "/vda/part1/deep/a/b/c/d/e/f/g/h/i/j/k/l/bottom.txt",
        "--repo",
        repo,
        "--json",
    ]);
    assert_eq!(one["entries"][0]["size"], 14);

    // get the whole ext4 volume; it does not hang on the loops and writes only into out/.
    let before = snapshot_tree(&f.dir, &f.dir.join("out"));
    let out = f.dir.join("out");
    let r = run_timed(
        &[
            "files",
            "get",
            "gf",
            "/vda/part1",
            "--to",
            s(&out),
            "--repo",
            repo,
            "--json",
        ],
        Duration::from_secs(120),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let sum: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let mut want = describe(&f.ext_src, true);
    let mut got = describe(&out.join("part1"), true);
    // lost+found is mkfs's; the test's own folder times are the source's.
    got.retain(|p, _| !p.starts_with("lost+found"));
    want.retain(|p, _| !p.starts_with("lost+found"));
    // Links' own times and owners are not set by this test's source (no tool), compare targets.
    for m in [&mut want, &mut got] {
        for v in m.values_mut() {
            if v.starts_with("link") {
                *v = v.split(' ').take(2).collect::<Vec<_>>().join(" ");
            }
        }
    }
    assert!(want.len() >= 30, "the source tree is too small: {want:#?}");
    assert_eq!(got, want);
    let files = want.values().filter(|v| v.starts_with("file")).count() as u64;
    assert_eq!(sum["files"].as_u64(), Some(files));
    assert_eq!(
        sum["symlinks"].as_u64(),
        Some(want.values().filter(|v| v.starts_with("link")).count() as u64)
    );
    // The hard link's two names hold the same bytes; the sparse file stayed sparse.
    assert_eq!(
        std::fs::read(out.join("part1/hard1")).unwrap(),
        std::fs::read(out.join("part1/hard2")).unwrap()
    );
    let sparse = std::fs::metadata(out.join("part1/sparse.bin")).unwrap();
    assert_eq!(sparse.len(), 24 * MIB);
    assert!(
        sparse.blocks() * 512 < MIB,
        "sparse copy takes {} blocks",
        sparse.blocks()
    );
    // Its lease on the snapshot is gone once it is done.
    let leases = f.repo.join("leases");
    assert!(!leases.exists() || std::fs::read_dir(&leases).unwrap().count() == 0);
    // Nothing outside out/ changed; the link to a host folder was not followed.
    assert_eq!(snapshot_tree(&f.dir, &out), before);
    assert_eq!(std::fs::read_dir(&f.outside).unwrap().count(), 0);
    assert!(std::fs::symlink_metadata(out.join("part1/escape"))
        .unwrap()
        .file_type()
        .is_symlink());

    // A second get into the same folder is refused and changes nothing.
    let out_before = snapshot_tree(&out, &f.dir.join("none"));
    let again = livemount(&[
        "files",
        "get",
        "gf",
        "/vda/part1",
        "--to",
        s(&out),
        "--repo",
        repo,
    ]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("exists already") && err.contains("part1"),
        "{err}"
    );
    assert_eq!(snapshot_tree(&out, &f.dir.join("none")), out_before);

    // Single files and a folder, from the MBR's ext4, the logical FAT32 and the GPT's ext4.
    let out2 = f.dir.join("out2");
    livemount_ok(&[
        "files",
        "get",
        "gf",
        "/vda/part1/large.bin",
        "/vda/part5/Docs",
        "--to",
        s(&out2),
        "--repo",
        repo,
    ]);
    assert_eq!(
        blake3::hash(&std::fs::read(out2.join("large.bin")).unwrap()),
        blake3::hash(&std::fs::read(f.ext_src.join("large.bin")).unwrap())
    );
    assert_eq!(
        std::fs::read(out2.join("Docs/Sub/note.txt")).unwrap(),
        b"in a FAT folder\n"
    );
    let out3 = f.dir.join("out3");
    livemount_ok(&[
        "files",
        "get",
        "gf",
        "/vda/part5",
        "--to",
        s(&out3),
        "--repo",
        repo,
    ]);
    for rel in walk(&f.fat_src) {
        let a = std::fs::metadata(f.fat_src.join(&rel)).unwrap();
        let b = std::fs::metadata(out3.join("part5").join(&rel))
            .unwrap_or_else(|e| panic!("{}: {e}", rel.display()));
        assert_eq!(a.is_dir(), b.is_dir(), "{}", rel.display());
        if !a.is_dir() {
            assert_eq!(a.mtime(), b.mtime(), "{}", rel.display());
            assert_eq!(
                std::fs::read(f.fat_src.join(&rel)).unwrap(),
                std::fs::read(out3.join("part5").join(&rel)).unwrap()
            );
        }
    }
    let out4 = f.dir.join("out4");
    livemount_ok(&[
        "files",
        "get",
        "gf",
        "/vdb/part1/script.sh",
        "--to",
        s(&out4),
        "--repo",
        repo,
    ]);
    let m = std::fs::metadata(out4.join("script.sh")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o751, 1234, 5678));

    // Errors name the volume and path and change nothing.
    let bad = livemount(&["files", "ls", "gf", "/vdb/part2", "--repo", repo]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    eprintln!("damaged volume: {err}");
    assert!(err.contains("/vdb/part2") && err.contains("ext4"), "{err}");
    let missing = livemount(&[
        "files",
        "get",
        "gf",
        "/vda/part1/nope",
        "--to",
        s(&f.dir.join("out5")),
        "--repo",
        repo,
    ]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(
        err.contains("/vda/part1/nope") && err.contains("no such"),
        "{err}"
    );
    assert!(
        !f.dir.join("out5").exists() || std::fs::read_dir(f.dir.join("out5")).unwrap().count() == 0
    );
    let novol = livemount(&["files", "ls", "gf", "/vdc/part1", "--repo", repo]);
    let err = String::from_utf8_lossy(&novol.stderr);
    assert!(
        err.contains("no such volume") && err.contains("files ls gf"),
        "{err}"
    );
    let dots = livemount(&[
        "files",
        "get",
        "gf",
        "/vda/part1/../part5",
        "--to",
        s(&out),
        "--repo",
        repo,
    ]);
    assert!(!dots.status.success());
}

#[test]
fn test_guest_root_lists_and_its_kernel_comes_back_byte_identical() {
    let img = common::guest_image();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(&img, dir.join("guest.img")).unwrap();
    let cfg = kvm_config(dir, "guest", &[("guest.img", "raw")]);
    let repo = repo_with_backup(dir, &cfg);
    let repo = s(&repo);
    let top = livemount_ok(&["files", "ls", "guest", "--repo", repo]);
    assert!(top.contains("/vda/part1") && top.contains("fat16"), "{top}");
    assert!(top.contains("/vda/part2") && top.contains("ext4"), "{top}");
    let root = livemount_ok(&["files", "ls", "guest", "/vda/part2", "--repo", repo]);
    for want in ["etc/", "bin/", "sbin/", "usr/"] {
        assert!(root.contains(want), "no {want} in:\n{root}");
    }
    let out = dir.join("out");
    livemount_ok(&[
        "files",
        "get",
        "guest",
        "/vda/part1/vmlinuz",
        "--to",
        s(&out),
        "--repo",
        repo,
    ]);
    let reference = dir.join("vmlinuz.mcopy");
    tool_text(
        "mcopy",
        &[
            "-i",
            &format!("{}@@1M", s(&img)),
            "::vmlinuz",
            s(&reference),
        ],
    );
    let a = std::fs::read(&reference).unwrap();
    let b = std::fs::read(out.join("vmlinuz")).unwrap();
    assert!(
        a.len() > MIB as usize,
        "mcopy's kernel is {} bytes",
        a.len()
    );
    assert!(
        a == b,
        "the kernel differs from mcopy's ({} and {} bytes)",
        a.len(),
        b.len()
    );
}

/// The LVM tools' config for one test: only `dev` is scanned, nothing touches udev, the
/// kernel's device-mapper (absent on the test machines: no /dev/mapper/control) or
/// /etc/lvm's backups.
fn lvm_config(dev: &str) -> String {
    format!(
        "devices {{ filter = [ \"a|^{dev}$|\", \"r|.*|\" ] obtain_device_list_from_udev = 0 }} \
         activation {{ udev_sync = 0 udev_rules = 0 }} global {{ activation = 0 }} \
         backup {{ backup = 0 archive = 0 }}"
    )
}

/// Runs an LVM command with `cfg`, failing the test with what to install when it is missing.
fn lvm(cmd: &str, cfg: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e} (scripts/install-deps installs lvm2)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A loop device over part of a file and the volume group made on it: on drop the loop device
/// is detached, and the VG (while `vg` is set: a failure while it is being made) removed.
struct LoopPv {
    dev: String,
    cfg: String,
    vg: Option<String>,
}

impl LoopPv {
    fn new(file: &Path, offset: u64, size: u64) -> LoopPv {
        let dev = tool_text(
            "losetup",
            &[
                "-f",
                "--show",
                "-o",
                &offset.to_string(),
                "--sizelimit",
                &size.to_string(),
                s(file),
            ],
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup gave {dev:?}");
        let cfg = lvm_config(&dev);
        LoopPv { dev, cfg, vg: None }
    }
}

impl Drop for LoopPv {
    fn drop(&mut self) {
        if let Some(vg) = &self.vg {
            let _ = Command::new("vgremove")
                .args(["-f", "--config", &self.cfg, vg])
                .env("LVM_SUPPRESS_FD_WARNINGS", "1")
                .output();
        }
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

/// Where each LV's segments are, from LVM's own report: (LV, first extent, PV extent, count).
fn lvm_segments(pv: &LoopPv) -> Vec<(String, u64, u64, u64)> {
    let j: serde_json::Value = serde_json::from_str(&lvm(
        "lvs",
        &pv.cfg,
        &[
            "--reportformat",
            "json",
            "-o",
            "lv_name,seg_start_pe,seg_pe_ranges",
            pv.vg.as_deref().unwrap(),
        ],
    ))
    .unwrap();
    let mut out = Vec::new();
    for r in j["report"][0]["lv"].as_array().unwrap() {
        let range = r["seg_pe_ranges"].as_str().unwrap();
        let Some((_, pes)) = range.rsplit_once(':') else {
            continue;
        };
        let (a, b) = pes.split_once('-').unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        out.push((
            r["lv_name"].as_str().unwrap().to_string(),
            r["seg_start_pe"].as_str().unwrap().parse().unwrap(),
            a,
            b - a + 1,
        ));
    }
    out
}

/// Writes the file system image `fs` into the LV `lv` by its segments (the LV cannot be
/// activated without device-mapper): LV extent `e` is at `pv_at + pe_start + pe * extent`.
fn write_into_lv(
    disk: &Path,
    fs: &Path,
    segs: &[(String, u64, u64, u64)],
    lv: &str,
    pv_at: u64,
    pe_start: u64,
    extent: u64,
) {
    use std::os::unix::fs::FileExt;
    let bytes = std::fs::read(fs).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    let mut written = 0;
    for (_, first, pe, count) in segs.iter().filter(|s| s.0 == lv) {
        let from = (first * extent) as usize;
        let to = (((first + count) * extent) as usize).min(bytes.len());
        if from >= to {
            continue;
        }
        f.write_all_at(&bytes[from..to], pv_at + pe_start + pe * extent)
            .unwrap();
        written += to - from;
    }
    assert_eq!(
        written,
        bytes.len(),
        "{lv} is smaller than {}",
        fs.display()
    );
}

/// A tree of known files for a logical volume: sizes that cross its segments.
fn make_lv_tree(src: &Path, seed: u64, big_files: usize) {
    let mut rng = Rng::new(seed);
    std::fs::create_dir_all(src.join("etc/conf.d")).unwrap();
    std::fs::write(src.join("etc/hostname"), b"lvm-guest\n").unwrap();
    std::fs::write(src.join("etc/conf.d/net"), b"dhcp\n").unwrap();
    std::fs::set_permissions(src.join("etc/conf.d/net"), PermissionsExt::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("etc/hostname", src.join("name-link")).unwrap();
    for i in 0..big_files {
        let mut big = vec![0u8; 7 * MIB as usize + 999 * i];
        rng.fill(&mut big);
        std::fs::write(src.join(format!("big{i}.bin")), &big).unwrap();
    }
    let mut t = 1_650_000_000u64;
    let mut all = walk(src);
    // Files first, folders after (deepest first), so that no write changes a folder's time.
    all.sort_by_key(|p| {
        let m = std::fs::symlink_metadata(src.join(p)).unwrap();
        (m.is_dir(), std::cmp::Reverse(p.components().count()))
    });
    for e in all {
        let m = std::fs::symlink_metadata(src.join(&e)).unwrap();
        if !m.file_type().is_symlink() {
            t += 3;
            set_mtime(&src.join(&e), t);
        }
    }
}

/// The files `get` gave back equal the source (links by target), lost+found aside.
fn assert_same_tree(src: &Path, got: &Path) {
    let clean = |mut m: BTreeMap<PathBuf, String>| {
        m.retain(|p, _| !p.starts_with("lost+found"));
        for v in m.values_mut() {
            if v.starts_with("link") {
                *v = v.split(' ').take(2).collect::<Vec<_>>().join(" ");
            }
        }
        m
    };
    let want = clean(describe(src, true));
    assert!(want.len() >= 5, "{want:#?}");
    assert_eq!(clean(describe(got, true)), want);
}

#[test]
fn lvm_logical_volumes_list_and_give_back_their_files_and_xfs_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // GPT: part1 a PV of 64 MiB, part2 an XFS of 300 MiB (mkfs.xfs's smallest).
    let disk = dir.join("lvm.img");
    sparse_disk(&disk, 400 * MIB);
    let script = dir.join("lvm.sfdisk");
    std::fs::write(
        &script,
        "label: gpt\nunit: sectors\nstart=2048, size=131072, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n\
         start=133120, size=614400\n",
    )
    .unwrap();
    sfdisk(&disk, &script);
    let st = starts(&disk);
    let pv_at = st[&format!("{}1", s(&disk))] * 512;
    let xfs_at = st[&format!("{}2", s(&disk))];

    // The VG: root of 5 extents, data of 3 after it, then root grown by 3 (a second segment
    // after data's extents); a thin pool and a thin LV in its metadata.
    let vg = format!("lmt{}", std::process::id());
    let mut pv = LoopPv::new(&disk, pv_at, 131072 * 512);
    lvm("pvcreate", &pv.cfg, &["-q", &pv.dev]);
    lvm("vgcreate", &pv.cfg, &["-q", "-s", "4m", &vg, &pv.dev]);
    pv.vg = Some(vg.clone());
    let lv = |name: &str, extents: &str| {
        lvm(
            "lvcreate",
            &pv.cfg,
            &["-q", "-an", "-Zn", "-l", extents, "-n", name, &vg],
        )
    };
    lv("root", "5");
    lv("data", "3");
    lvm(
        "lvextend",
        &pv.cfg,
        &["-q", "-l", "8", &format!("{vg}/root")],
    );
    add_thin_lv(&pv, dir, &vg);
    let segs = lvm_segments(&pv);
    let root_segs: Vec<_> = segs.iter().filter(|s| s.0 == "root").collect();
    assert_eq!(
        root_segs.len(),
        2,
        "root should have two segments: {segs:?}"
    );
    let j: serde_json::Value = serde_json::from_str(&lvm(
        "pvs",
        &pv.cfg,
        &[
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "pe_start",
        ],
    ))
    .unwrap();
    let pe_start: u64 = j["report"][0]["pv"][0]["pe_start"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Done with LVM: keep the VG (it is the test's data) and detach the loop device.
    pv.vg = None;
    drop(pv);

    // ext4 in both LVs, written through LVM's own report of their segments.
    let extent = 4 * MIB;
    let root_src = dir.join("root-src");
    make_lv_tree(&root_src, 31, 3);
    let root_img = dir.join("root.img");
    tool_text(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            s(&root_src),
            s(&root_img),
            "32M",
        ],
    );
    write_into_lv(&disk, &root_img, &segs, "root", pv_at, pe_start, extent);
    let data_src = dir.join("data-src");
    make_lv_tree(&data_src, 32, 1);
    let data_img = dir.join("data.img");
    tool_text(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "1024",
            "-d",
            s(&data_src),
            s(&data_img),
            "12M",
        ],
    );
    write_into_lv(&disk, &data_img, &segs, "data", pv_at, pe_start, extent);
    let xfs = dir.join("xfs.img");
    tool_text(
        "mkfs.xfs",
        &[
            "-q",
            "-f",
            "-d",
            &format!("file,name={},size=300m", s(&xfs)),
        ],
    );
    dd_into(&disk, &xfs, xfs_at);

    let cfg = kvm_config(dir, "lv", &[("lvm.img", "raw")]);
    let repo = repo_with_backup(dir, &cfg);
    let repo = s(&repo);
    let top = json(&["files", "ls", "lv", "--repo", repo, "--json"]);
    let mut vols: Vec<(String, String, u64, String)> = top["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_string(),
                v["type"].as_str().unwrap().to_string(),
                v["size"].as_u64().unwrap(),
                v["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let base = format!("/vda/lvm/{vg}");
    vols.sort();
    let mut want: Vec<(String, String, u64, String)> = vec![
        (
            "/vda/part1".into(),
            "lvm2".into(),
            131072 * 512,
            format!(
                "lvm2 physical volume of volume group {vg}: its logical volumes are under \
                     {base}"
            ),
        ),
        (
            "/vda/part2".into(),
            "xfs".into(),
            614400 * 512,
            "xfs: not supported yet".into(),
        ),
        (
            format!("{base}/root"),
            "ext4".into(),
            32 * MIB,
            String::new(),
        ),
        (
            format!("{base}/data"),
            "ext4".into(),
            12 * MIB,
            String::new(),
        ),
        (
            format!("{base}/pool"),
            "lvm".into(),
            2 * extent,
            "lvm: thin pools are not supported yet".into(),
        ),
        (
            format!("{base}/thin"),
            "lvm".into(),
            64 * MIB,
            "lvm: thin volumes are not supported yet".into(),
        ),
    ];
    want.sort();
    assert_eq!(vols, want);
    let text = livemount_ok(&[
        "files",
        "ls",
        "lv",
        &format!("{base}/root/etc"),
        "--repo",
        repo,
    ]);
    assert!(
        text.contains("hostname") && text.contains("conf.d/"),
        "{text}"
    );

    // get gives back exactly the files of both LVs.
    let out = dir.join("out");
    let r = run_timed(
        &[
            "files",
            "get",
            "lv",
            &format!("{base}/root"),
            &format!("{base}/data"),
            "--to",
            s(&out),
            "--repo",
            repo,
        ],
        Duration::from_secs(120),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_same_tree(&root_src, &out.join("root"));
    assert_same_tree(&data_src, &out.join("data"));

    // The thin LV and the XFS volume: ls and get say why, and write nothing.
    for (path, want) in [
        (format!("{base}/thin"), "thin volumes are not supported yet"),
        (
            "/vda/part2".to_string(),
            "/vda/part2: xfs: not supported yet",
        ),
    ] {
        let ls = livemount(&["files", "ls", "lv", &format!("{path}/etc"), "--repo", repo]);
        assert!(!ls.status.success());
        let err = String::from_utf8_lossy(&ls.stderr);
        assert!(err.contains(want), "{err}");
        let to = dir.join("refused");
        let get = livemount(&["files", "get", "lv", &path, "--to", s(&to), "--repo", repo]);
        assert!(!get.status.success());
        let err = String::from_utf8_lossy(&get.stderr);
        assert!(err.contains(want), "{err}");
        assert!(!to.exists() || std::fs::read_dir(&to).unwrap().count() == 0);
    }
}

/// Adds a thin pool (2 extents) and a thin LV of 64 MiB to the VG's metadata. `lvcreate --type
/// thin-pool` needs the kernel's device-mapper, which the test machines lack; so the metadata
/// is taken with `vgcfgbackup`, the LVs are added to it in LVM's text format, and
/// `vgcfgrestore --force` (LVM's own validation) writes it back.
fn add_thin_lv(pv: &LoopPv, dir: &Path, vg: &str) {
    let file = dir.join("vg.txt");
    lvm("vgcfgbackup", &pv.cfg, &["-q", "-f", s(&file), vg]);
    let text = std::fs::read_to_string(&file).unwrap();
    // Free extents of the 15 the PV has: root 0-4, data 5-7, root 8-10; tmeta 11, tdata 12-13.
    let lv = |name: &str, status: &str, seg: &str| {
        // A UUID of LVM's shape (6-4-4-4-4-4-6 characters), unique by the LV's name.
        let n = name.replace('_', "");
        let tail = &n[..n.len().min(6)];
        format!(
            "{name} {{\nid = \"thinlv-aaaa-aaaa-aaaa-aaaa-aaaa-{tail:a>6}\"\nstatus = [{status}]\n\
             flags = []\nsegment_count = 1\nsegment1 {{\nstart_extent = 0\n{seg}\n}}\n}}\n"
        )
    };
    let add = [
        lv(
            "pool",
            "\"READ\", \"WRITE\", \"VISIBLE\"",
            "extent_count = 2\ntype = \"thin-pool\"\nmetadata = \"pool_tmeta\"\n\
             pool = \"pool_tdata\"\ntransaction_id = 1\nchunk_size = 128\n\
             discards = \"passdown\"\nzero_new_blocks = 1",
        ),
        lv(
            "thin",
            "\"READ\", \"WRITE\", \"VISIBLE\"",
            "extent_count = 16\ntype = \"thin\"\nthin_pool = \"pool\"\ntransaction_id = 0\n\
             device_id = 1",
        ),
        lv(
            "pool_tmeta",
            "\"READ\", \"WRITE\"",
            "extent_count = 1\ntype = \"striped\"\nstripe_count = 1\nstripes = [\n\"pv0\", 11\n]",
        ),
        lv(
            "pool_tdata",
            "\"READ\", \"WRITE\"",
            "extent_count = 2\ntype = \"striped\"\nstripe_count = 1\nstripes = [\n\"pv0\", 12\n]",
        ),
    ]
    .concat();
    let at = text
        .find("logical_volumes {\n")
        .expect("logical_volumes in vgcfgbackup's text")
        + "logical_volumes {\n".len();
    let text = format!("{}{add}{}", &text[..at], &text[at..]);
    std::fs::write(&file, text).unwrap();
    lvm(
        "vgcfgrestore",
        &pv.cfg,
        &["-q", "--force", "-f", s(&file), vg],
    );
}

/// An NTFS image mounted with `ntfs-3g` (FUSE) while it lives; unmounted on drop.
struct NtfsMount(PathBuf);

impl NtfsMount {
    fn new(img: &Path, at: &Path) -> NtfsMount {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("ntfs-3g")
            .args([s(img), s(at)])
            .output()
            .expect("running ntfs-3g (scripts/install-deps installs ntfs-3g)");
        assert!(
            out.status.success(),
            "ntfs-3g could not mount {} (it needs /dev/fuse and root): {}",
            img.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        NtfsMount(at.to_path_buf())
    }
}

impl Drop for NtfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn set_mtime_ns(p: &Path, secs: u64, nsec: u32) {
    let f = std::fs::File::open(p).unwrap();
    f.set_modified(SystemTime::UNIX_EPOCH + Duration::new(secs, nsec))
        .unwrap();
}

/// The tree that goes onto NTFS: deep folders, long and non-ASCII names, a sparse file, a file
/// of several MiB, a hard link, links; files 0644 and folders 0755 (what NTFS reads back), times
/// with 100 ns steps (NTFS's).
fn make_ntfs_tree(src: &Path) {
    let deep = src.join("deep/a/b/c/d/e/f/g/h/i/j/k/l");
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom.txt"), b"at the bottom\n").unwrap();
    std::fs::write(src.join("a-long-name-".repeat(20)), b"long name\n").unwrap();
    std::fs::write(src.join("héllo wörld ✓.txt"), "non-ASCII\n").unwrap();
    std::fs::write(src.join("日本語の名前"), "japanese\n").unwrap();
    std::fs::write(src.join("Mixed Case.TXT"), "case\n").unwrap();
    std::fs::write(src.join("tiny"), b"resident").unwrap();
    std::fs::write(src.join("empty"), b"").unwrap();
    let mut big = vec![0u8; 5 * MIB as usize + 12345];
    Rng::new(25).fill(&mut big);
    std::fs::write(src.join("large.bin"), &big).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(src.join("sparse.bin")).unwrap();
        f.set_len(24 * MIB).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 8 * MIB).unwrap();
        f.write_all_at(b"end", 24 * MIB - 3).unwrap();
    }
    std::fs::write(src.join("hard1"), b"one file, two names\n").unwrap();
    std::fs::hard_link(src.join("hard1"), src.join("hard2")).unwrap();
    std::fs::write(src.join("A long file name.txt"), b"has a DOS name too\n").unwrap();
    std::fs::write(src.join("streams.txt"), b"the unnamed stream\n").unwrap();
    std::os::unix::fs::symlink("deep/a/b", src.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", src.join("abs-link")).unwrap();
    let mut t = 1_650_000_000u64;
    let mut all = walk(src);
    // Files first, then folders deepest first: writing a file changes its folder's time.
    all.sort_by_key(|p| {
        (
            std::fs::symlink_metadata(src.join(p)).unwrap().is_dir(),
            std::cmp::Reverse(p.components().count()),
        )
    });
    for e in all {
        let p = src.join(&e);
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.file_type().is_symlink() {
            continue;
        }
        let mode = if m.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(&p, PermissionsExt::from_mode(mode)).unwrap();
        t += 3;
        set_mtime_ns(&p, t, (t % 10_000_000) as u32 * 100);
    }
}

/// An empty NTFS of `mib` MiB in the file `path`, made by `mkntfs`.
fn ntfs_image(path: &Path, mib: u64) {
    sparse_disk(path, mib * MIB);
    tool_text("mkntfs", &["-q", "-F", "-f", "-Q", s(path)]);
}

#[test]
fn ntfs_files_come_back_as_ntfs_3g_put_them_in() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let src = dir.join("src");
    std::fs::create_dir(&src).unwrap();
    make_ntfs_tree(&src);

    // part1: the tree, copied in through ntfs-3g with its times, links and hard links.
    let main = dir.join("main.ntfs");
    ntfs_image(&main, 96);
    {
        let m = NtfsMount::new(&main, &dir.join("mnt"));
        let from = format!("{}/.", s(&src));
        tool_text(
            "cp",
            &[
                "-R",
                "-P",
                "--preserve=timestamps,links",
                "--sparse=always",
                &from,
                s(&m.0),
            ],
        );
        // A DOS 8.3 name beside a long one, and an alternate data stream (both are ntfs-3g
        // extended attributes); then the file's time again.
        let dos = m.0.join("A long file name.txt");
        rustix::fs::setxattr(
            &dos,
            "system.ntfs_dos_name",
            b"ALONGF~1.TXT",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("setting a DOS name through ntfs-3g");
        let ads = m.0.join("streams.txt");
        rustix::fs::setxattr(
            &ads,
            "user.hidden",
            b"a named stream",
            rustix::fs::XattrFlags::empty(),
        )
        .expect("adding a stream through ntfs-3g");
        for n in ["A long file name.txt", "streams.txt"] {
            let t = std::fs::metadata(src.join(n)).unwrap().modified().unwrap();
            std::fs::File::open(m.0.join(n))
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
    }
    // part2: a compressed file (its folder has the compressed attribute).
    let packed = dir.join("packed.ntfs");
    ntfs_image(&packed, 16);
    {
        let m = NtfsMount::new(&packed, &dir.join("mnt2"));
        let d = m.0.join("packed");
        std::fs::create_dir(&d).unwrap();
        let mut a = [0u8; 4];
        rustix::fs::getxattr(&d, "system.ntfs_attrib_be", &mut a[..])
            .expect("reading a folder's NTFS attributes through ntfs-3g");
        let a = (u32::from_be_bytes(a) | 0x800).to_be_bytes();
        rustix::fs::setxattr(
            &d,
            "system.ntfs_attrib_be",
            &a,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        std::fs::write(d.join("z.txt"), "compress me ".repeat(5000)).unwrap();
        std::fs::write(m.0.join("plain.txt"), b"not compressed\n").unwrap();
    }
    // part3: the same, with its MFT overwritten.
    let broken = dir.join("broken.ntfs");
    std::fs::copy(&packed, &broken).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&broken)
            .unwrap();
        let mut boot = [0u8; 512];
        f.read_exact_at(&mut boot, 0).unwrap();
        let cluster = u64::from(u16::from_le_bytes([boot[11], boot[12]])) * u64::from(boot[13]);
        let mft = u64::from_le_bytes(boot[0x30..0x38].try_into().unwrap()) * cluster;
        f.write_all_at(&[0xa5; 16384], mft).unwrap();
    }
    let disk = dir.join("win.img");
    sparse_disk(&disk, 160 * MIB);
    let script = dir.join("win.sfdisk");
    std::fs::write(
        &script,
        "label: dos\nunit: sectors\nstart=2048, size=196608, type=7\n\
         start=198656, size=32768, type=7\nstart=231424, size=32768, type=7\n",
    )
    .unwrap();
    sfdisk(&disk, &script);
    dd_into(&disk, &main, 2048);
    dd_into(&disk, &packed, 198656);
    dd_into(&disk, &broken, 231424);
    let cfg = kvm_config(dir, "win", &[("win.img", "raw")]);
    let repo = repo_with_backup(dir, &cfg);
    let repo = s(&repo);

    let top = json(&["files", "ls", "win", "--repo", repo, "--json"]);
    let vols: Vec<(String, String, Option<String>)> = top["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_string(),
                v["type"].as_str().unwrap().to_string(),
                v["reason"].as_str().map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        vols,
        vec![
            ("/vda/part1".into(), "ntfs".into(), None),
            ("/vda/part2".into(), "ntfs".into(), None),
            ("/vda/part3".into(), "ntfs".into(), None),
        ]
    );

    // ls of the root: each name once (no DOS name, no $MFT ...), sizes and times as put in.
    let ls = json(&["files", "ls", "win", "/vda/part1", "--repo", repo, "--json"]);
    let got: BTreeMap<String, (String, u64, i64, u64, Option<String>)> = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let kind = e["kind"].as_str().unwrap().to_string();
            let link = e["target"].as_str().map(str::to_string);
            let (size, mtime, nsec) = if link.is_some() {
                (0, 0, 0)
            } else {
                (
                    if kind == "dir" {
                        0
                    } else {
                        e["size"].as_u64().unwrap()
                    },
                    e["mtime"].as_i64().unwrap(),
                    e["mtime_nsec"].as_u64().unwrap(),
                )
            };
            (
                e["name"].as_str().unwrap().to_string(),
                (kind, size, mtime, nsec, link),
            )
        })
        .collect();
    let want: BTreeMap<String, (String, u64, i64, u64, Option<String>)> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let name = e.file_name().into_string().unwrap();
            let v = if m.file_type().is_symlink() {
                let t = std::fs::read_link(e.path()).unwrap();
                (
                    "symlink".into(),
                    0,
                    0,
                    0,
                    Some(t.to_str().unwrap().to_string()),
                )
            } else {
                let kind = if m.is_dir() { "dir" } else { "file" };
                let size = if m.is_dir() { 0 } else { m.len() };
                (kind.into(), size, m.mtime(), m.mtime_nsec() as u64, None)
            };
            (name, v)
        })
        .collect();
    assert_eq!(got, want);
    let text = livemount_ok(&["files", "ls", "win", "/vda/part1", "--repo", repo]);
    assert!(text.contains("rel-link -> deep/a/b"), "{text}");
    assert!(
        text.contains("      ?      ? "),
        "owners are unknown on NTFS:\n{text}"
    );
    assert!(
        !text.contains("$MFT") && !text.contains("ALONGF~1"),
        "{text}"
    );
    let one = json(&[
        "files",
        "ls",
        "win",
        "/vda/part1/deep/a/b/c/d/e/f/g/h/i/j/k/l/bottom.txt",
        "--repo",
        repo,
        "--json",
    ]);
    assert_eq!(one["entries"][0]["size"], 14);

    // get the whole volume: contents, modes, times and link targets as put in.
    let out = dir.join("out");
    let r = run_timed(
        &[
            "files",
            "get",
            "win",
            "/vda/part1",
            "--to",
            s(&out),
            "--repo",
            repo,
            "--json",
        ],
        Duration::from_secs(180),
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let want = describe(&src, false);
    let got = describe(&out.join("part1"), false);
    assert!(want.len() >= 25, "the source tree is too small: {want:#?}");
    assert_eq!(got, want);
    for rel in walk(&src) {
        let a = std::fs::symlink_metadata(src.join(&rel)).unwrap();
        let b = std::fs::symlink_metadata(out.join("part1").join(&rel)).unwrap();
        if !a.file_type().is_symlink() {
            assert_eq!(a.mtime_nsec(), b.mtime_nsec(), "{}", rel.display());
        }
    }
    assert_eq!(
        std::fs::read(out.join("part1/streams.txt")).unwrap(),
        b"the unnamed stream\n"
    );
    let sparse = std::fs::metadata(out.join("part1/sparse.bin")).unwrap();
    assert_eq!(sparse.len(), 24 * MIB);
    assert!(
        sparse.blocks() * 512 < MIB,
        "sparse copy takes {} blocks",
        sparse.blocks()
    );

    // A compressed file lists, and get says it cannot be read yet, naming it.
    let ls = json(&[
        "files",
        "ls",
        "win",
        "/vda/part2/packed",
        "--repo",
        repo,
        "--json",
    ]);
    assert_eq!(ls["entries"][0]["name"], "z.txt");
    assert_eq!(ls["entries"][0]["size"], 60000);
    let packed_out = dir.join("out-packed");
    let r = livemount(&[
        "files",
        "get",
        "win",
        "/vda/part2/packed/z.txt",
        "--to",
        s(&packed_out),
        "--repo",
        repo,
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("/vda/part2/packed/z.txt")
            && err.contains("compressed NTFS files are not supported yet"),
        "{err}"
    );
    livemount_ok(&[
        "files",
        "get",
        "win",
        "/vda/part2/plain.txt",
        "--to",
        s(&packed_out),
        "--repo",
        repo,
    ]);
    assert_eq!(
        std::fs::read(packed_out.join("plain.txt")).unwrap(),
        b"not compressed\n"
    );

    // A damaged volume: an error naming it, not a crash.
    for args in [
        &["files", "ls", "win", "/vda/part3", "--repo", repo][..],
        &[
            "files",
            "get",
            "win",
            "/vda/part3",
            "--to",
            s(&dir.join("out-broken")),
            "--repo",
            repo,
        ],
    ] {
        let r = run_timed(args, Duration::from_secs(60));
        assert!(!r.status.success());
        let err = String::from_utf8_lossy(&r.stderr);
        eprintln!("damaged NTFS: {err}");
        assert!(
            err.contains("/vda/part3") && !err.contains("crashed"),
            "{err}"
        );
    }
}
