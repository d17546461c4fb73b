//! Guest files through a running media agent's control API (issue 19): listings and downloads
//! with `curl`, from a disk made by the real Debian tools (`sfdisk`, `mkfs.ext4 -d`,
//! `mkfs.vfat` + `mcopy`, written with `dd conv=notrunc`) and backed up as a KVM VM. Downloads
//! are compared with the files put in (BLAKE3); the agent's `/metrics` shows that their chunks
//! were fetched in the background class and came from the cache the second time; the errors
//! carry the status and message each case should. A missing tool fails the test
//! (scripts/install-deps installs them); nothing is skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::tools::{dd_into, s, tool};
use common::{kvm_config, livemount_ok, repo_with_backup, Rng, Server, MIB};

/// The test disk's size.
const DISK: u64 = 120 * MIB;

struct Fixture {
    _tmp: tempfile::TempDir,
    repo: PathBuf,
    disk: PathBuf,
    ext_src: PathBuf,
    fat_src: PathBuf,
}

/// One MBR disk: part1 ext4 (a 6 MiB file of random bytes over several 1 MiB chunks, a
/// non-ASCII name, a folder, a link, a sparse file of 256 MiB), part2 FAT32, part3 a LUKS header, part4 an ext4 whose
/// group descriptors are garbage.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let ext_src = dir.join("ext-src");
    std::fs::create_dir_all(ext_src.join("etc/sub")).unwrap();
    let mut big = vec![0u8; 6 * MIB as usize + 4321];
    Rng::new(27).fill(&mut big);
    std::fs::write(ext_src.join("large.bin"), &big).unwrap();
    std::fs::write(ext_src.join("etc/hostname"), b"guest\n").unwrap();
    std::fs::write(ext_src.join("etc/sub/deep.txt"), b"deep\n").unwrap();
    std::fs::write(ext_src.join("héllo \"wörld\".txt"), "non-ASCII\n").unwrap();
    std::fs::write(ext_src.join("empty"), b"").unwrap();
    // 256 MiB, nearly all holes: more than the sockets between a server and its client hold.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(ext_src.join("sparse.bin")).unwrap();
        f.set_len(256 * MIB).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"end", 256 * MIB - 3).unwrap();
    }
    std::os::unix::fs::symlink("etc/hostname", ext_src.join("link")).unwrap();
    let ext = dir.join("ext4.img");
    tool(
        "mkfs.ext4",
        &["-q", "-F", "-b", "4096", "-d", s(&ext_src), s(&ext), "40M"],
    );
    let fat_src = dir.join("fat-src");
    std::fs::create_dir_all(&fat_src).unwrap();
    let mut data = vec![0u8; 2 * MIB as usize + 99];
    Rng::new(28).fill(&mut data);
    std::fs::write(fat_src.join("DATA.BIN"), &data).unwrap();
    let fat = dir.join("fat.img");
    tool("mkfs.vfat", &["-F", "32", "-C", s(&fat), "65536"]);
    tool(
        "mcopy",
        &[
            "-i",
            s(&fat),
            "-m",
            "-Q",
            s(&fat_src.join("DATA.BIN")),
            "::/",
        ],
    );
    let bad = dir.join("bad-ext4.img");
    tool("mkfs.ext4", &["-q", "-F", "-b", "4096", s(&bad), "8M"]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
        f.write_all_at(&[0xff; 4096], 4096).unwrap();
    }

    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(DISK).unwrap();
    let script = dir.join("disk.sfdisk");
    // part1 40 MiB at 1 MiB, part2 64 MiB at 42 MiB, part3 1 MiB at 107 MiB, part4 8 MiB at
    // 108 MiB.
    std::fs::write(
        &script,
        "label: dos\nunit: sectors\nstart=2048, size=81920, type=83\n\
         start=86016, size=131072, type=c\nstart=219136, size=2048, type=83\n\
         start=221184, size=16384, type=83\n",
    )
    .unwrap();
    let out = Command::new("sfdisk")
        .args(["-q", s(&disk)])
        .stdin(std::fs::File::open(&script).unwrap())
        .output()
        .expect("running sfdisk (scripts/install-deps installs fdisk)");
    assert!(out.status.success(), "sfdisk: {:?}", out);
    dd_into(&disk, &ext, 2048);
    dd_into(&disk, &fat, 86016);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.write_all_at(b"LUKS\xba\xbe\x00\x02", 219136 * 512)
            .unwrap();
    }
    dd_into(&disk, &bad, 221184);

    let cfg = kvm_config(&dir, "gfa", &[("disk.img", "raw")]);
    let repo = repo_with_backup(&dir, &cfg);
    Fixture {
        _tmp: tmp,
        repo,
        disk,
        ext_src,
        fat_src,
    }
}

/// The API's base URL and token.
fn api(server: &Server) -> (String, String) {
    let a: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.state.join("api.json")).unwrap()).unwrap();
    let token = std::fs::read_to_string(server.state.join("api-token")).unwrap();
    (
        a["url"].as_str().unwrap().to_string(),
        token.trim().to_string(),
    )
}

/// A reply: status, headers (lower-case names), body.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&self.body));
        })
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap().to_string()
    }
}

/// `curl` GET of `route` with `path` (URL-encoded) as the query, and extra arguments.
fn get(server: &Server, route: &str, path: Option<&str>, extra: &[&str]) -> Reply {
    let (url, token) = api(server);
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let auth = format!("Authorization: Bearer {token}");
    let query = path.map(|p| format!("path={p}"));
    let mut args = vec!["-sS", "--get", "-D", s(&head), "-o", s(&body), "-H", &auth];
    if let Some(q) = &query {
        args.extend(["--data-urlencode", q.as_str()]);
    }
    args.extend_from_slice(extra);
    let full = format!("{url}{route}");
    args.push(&full);
    tool("curl", &args);
    let head = std::fs::read_to_string(&head).unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: std::fs::read(&body).unwrap_or_default(),
    }
}

/// A counter's value in the metrics text (0 if absent).
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

const BG: &str = "livemount_fetches_started_total{class=\"background\"}";
const VM: &str = "livemount_fetches_started_total{class=\"vm\"}";
const HITS: &str = "livemount_guest_files_cache_hits_total";
const MISSES: &str = "livemount_guest_files_cache_misses_total";

#[test]
fn api_lists_and_streams_guest_files_through_the_cache_in_the_background_class() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&f.repo, &tmp.path().join("state"), "off", &[]);

    // The top: the volumes, as `files ls --json` (reading the repository directly) has them.
    let top = get(&server, "/v1/snapshots/gfa/files", None, &[]);
    assert_eq!(top.status, 200, "{}", String::from_utf8_lossy(&top.body));
    let cli: serde_json::Value = serde_json::from_str(&livemount_ok(&[
        "files",
        "ls",
        "--repo",
        s(&f.repo),
        "gfa",
        "--json",
    ]))
    .unwrap();
    assert_eq!(top.json(), cli);
    let kinds: Vec<(String, String)> = top.json()["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_string(),
                v["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("/vda/part1", "ext4"),
            ("/vda/part2", "fat32"),
            ("/vda/part3", "luks"),
            ("/vda/part4", "ext4")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    // A folder, equal to the CLI's listing of it.
    let etc = get(
        &server,
        "/v1/snapshots/gfa/files",
        Some("/vda/part1/etc"),
        &[],
    );
    assert_eq!(etc.status, 200);
    let cli: serde_json::Value = serde_json::from_str(&livemount_ok(&[
        "files",
        "ls",
        "--repo",
        s(&f.repo),
        "gfa",
        "/vda/part1/etc",
        "--json",
    ]))
    .unwrap();
    assert_eq!(etc.json(), cli);
    let names: Vec<&str> = cli["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["hostname", "sub"]);

    // A download: the bytes put in, streamed with the headers a browser needs.
    let m0 = server.metrics();
    let want = std::fs::read(f.ext_src.join("large.bin")).unwrap();
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part1/large.bin"),
        &[],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(blake3::hash(&r.body), blake3::hash(&want));
    assert_eq!(r.header("content-length"), Some(&*want.len().to_string()));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"large.bin\"; filename*=UTF-8''large.bin")
    );
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    // Its chunks were fetched in the background class, none as a VM read.
    let m1 = server.metrics();
    assert!(metric(&m1, MISSES) > metric(&m0, MISSES), "{m1}");
    assert!(
        metric(&m1, BG) >= metric(&m0, BG) + 6,
        "6 MiB in 1 MiB chunks fetched in the background class: {m1}"
    );
    assert_eq!(metric(&m1, VM), 0, "{m1}");
    // The second time it comes from the cache: hits, no fetch.
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part1/large.bin"),
        &[],
    );
    assert_eq!(blake3::hash(&r.body), blake3::hash(&want));
    let m2 = server.metrics();
    assert!(
        metric(&m2, HITS) >= metric(&m1, HITS) + 7,
        "the second download's chunks are cache hits: {m2}"
    );
    assert_eq!(metric(&m2, MISSES), metric(&m1, MISSES), "{m2}");
    assert_eq!(metric(&m2, BG), metric(&m1, BG), "{m2}");

    // Ranges: a span across a chunk boundary, from an offset, the last bytes.
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part1/large.bin"),
        &["-r", "1048000-1049999"],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.body, want[1048000..1050000]);
    assert_eq!(
        r.header("content-range"),
        Some(&*format!("bytes 1048000-1049999/{}", want.len()))
    );
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part1/large.bin"),
        &["-r", "5000000-"],
    );
    assert_eq!((r.status, &r.body[..]), (206, &want[5000000..]));
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part1/large.bin"),
        &["-r", "-100"],
    );
    assert_eq!((r.status, &r.body[..]), (206, &want[want.len() - 100..]));
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part1/large.bin"),
        &["-r", "99999999-"],
    );
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(&*format!("bytes */{}", want.len()))
    );

    // From FAT, a range too; a non-ASCII name with quotes; an empty file.
    let data = std::fs::read(f.fat_src.join("DATA.BIN")).unwrap();
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part2/DATA.BIN"),
        &[],
    );
    assert_eq!(blake3::hash(&r.body), blake3::hash(&data));
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part2/DATA.BIN"),
        &["-r", "2000000-2000099"],
    );
    assert_eq!((r.status, &r.body[..]), (206, &data[2000000..2000100]));
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part1/héllo \"wörld\".txt"),
        &[],
    );
    assert_eq!((r.status, &r.body[..]), (200, "non-ASCII\n".as_bytes()));
    assert_eq!(
        r.header("content-disposition"),
        Some(
            "attachment; filename=\"h_llo__w_rld_.txt\"; \
             filename*=UTF-8''h%C3%A9llo%20%22w%C3%B6rld%22.txt"
        )
    );
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part1/empty"),
        &[],
    );
    assert_eq!(
        (r.status, r.body.len(), r.header("content-length")),
        (200, 0, Some("0"))
    );
}

#[test]
fn api_errors_say_what_is_wrong_with_the_status_that_fits() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&f.repo, &tmp.path().join("state"), "off", &[]);
    let content = "/v1/snapshots/gfa/files/content";
    let list = "/v1/snapshots/gfa/files";
    let cases: [(&str, Option<&str>, u16, &[&str]); 12] = [
        // No such snapshot.
        ("/v1/snapshots/nosuchvm/files", None, 404, &["nosuchvm"]),
        (
            "/v1/snapshots/nosuchvm/files/content",
            Some("/vda/part1/etc/hostname"),
            404,
            &["nosuchvm"],
        ),
        // No such volume, no such path.
        (list, Some("/vdb/part1"), 404, &["/vdb/part1", "gfa@"]),
        (
            content,
            Some("/vda/part1/etc/nothing"),
            404,
            &["/vda/part1/etc/nothing", "no such file", "files ls"],
        ),
        (
            list,
            Some("/vda/part1/etc/hostname/x"),
            404,
            &["/vda/part1/etc/hostname/x"],
        ),
        // `..`, a folder, a link, a disk asked as a file; no path at all.
        (content, Some("/vda/part1/etc/../large.bin"), 400, &["`..`"]),
        (
            content,
            Some("/vda/part1/etc"),
            400,
            &["/vda/part1/etc", "a folder, not a file", "gfa@"],
        ),
        (
            content,
            Some("/vda/part1/link"),
            400,
            &["symbolic link to etc/hostname"],
        ),
        (content, Some("/vda"), 400, &["not a file"]),
        (content, None, 400, &["name the file"]),
        // A volume that cannot be opened, and a damaged one.
        (list, Some("/vda/part3"), 409, &["/vda/part3", "luks"]),
        (
            content,
            Some("/vda/part4/x"),
            422,
            &["/vda/part4", "cannot open its ext4 file system"],
        ),
    ];
    for (route, path, status, words) in cases {
        let r = get(&server, route, path, &[]);
        assert_eq!(
            r.status,
            status,
            "{route} {path:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.header("content-type"), Some("application/json"));
        let e = r.error();
        for w in words {
            assert!(e.contains(w), "{route} {path:?}: {e:?} should name {w:?}");
        }
    }
    // Without the token: nothing.
    let (url, _) = api(&server);
    let out = tool(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{url}/v1/snapshots/gfa/files"),
        ],
    );
    assert_eq!(out, b"401");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_runs_while_a_mount_is_read() {
    let f = tokio::task::spawn_blocking(fixture).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&f.repo, &tmp.path().join("state"), "off", &[]);
    let m: serde_json::Value = serde_json::from_str(&server.cli(&[
        "mount",
        "gfa",
        "--name",
        "gfm",
        "--read-only",
        "--json",
    ]))
    .unwrap();
    let disk = m["mount"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["disk"].as_bool().unwrap())
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let source = std::fs::read(&f.disk).unwrap();
    let mut c = common::nfs::connect(&server, "gfm").await;
    let root = c.root_nfs_fh3();
    let fh = common::nfs::lookup(&mut c, &root, &disk).await.unwrap();
    let want = std::fs::read(f.ext_src.join("large.bin")).unwrap();
    // The download runs on a thread of its own while the VM's disk is read over NFS.
    let server = std::sync::Arc::new(server);
    let s2 = server.clone();
    let download = tokio::task::spawn_blocking(move || {
        get(
            &s2,
            "/v1/snapshots/gfa/files/content",
            Some("/vda/part1/large.bin"),
            &[],
        )
    });
    let step = 256 * 1024u32;
    let mut read = 0u64;
    for off in (0..DISK).step_by(step as usize) {
        let data = common::nfs::read_at(&mut c, &fh, off, step).await.unwrap();
        assert!(
            data == source[off as usize..][..step as usize],
            "the disk at {off}"
        );
        read += data.len() as u64;
    }
    let r = download.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(blake3::hash(&r.body), blake3::hash(&want));
    assert_eq!(read, DISK);
    let text = server.metrics();
    assert!(
        metric(&text, VM) > 0,
        "the mount's reads were VM reads: {text}"
    );
    assert!(
        metric(&text, BG) > 0,
        "the download's were background: {text}"
    );
}

/// The restore leases in the repository's `leases/` (their JSON text).
fn restore_leases(repo: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(repo.join("leases")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().into_string().ok()?;
        name.starts_with("restore-")
            .then(|| std::fs::read_to_string(e.path()).unwrap_or_default())
    })
    .collect()
}

/// Waits up to 30 s (a loaded machine) for `cond`.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(
            t0.elapsed().as_secs() < 30,
            "{what} (after {:?})",
            t0.elapsed()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_download_holds_a_restore_lease_until_it_ends_or_its_client_goes_away() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&f.repo, &tmp.path().join("state"), "off", &[]);
    let (url, token) = api(&server);
    // The lease covers the reads from the repository: the sparse file's 256 MiB, more than the
    // sockets hold, keep the server reading as long as the client is slow.
    let want = std::fs::read(f.ext_src.join("sparse.bin")).unwrap();
    let out = tmp.path().join("sparse.bin");
    let slow_curl = |rate: &str| {
        Command::new("curl")
            .args([
                "-sS",
                "--limit-rate",
                rate,
                "-o",
                s(&out),
                "-H",
                &format!("Authorization: Bearer {token}"),
                &format!("{url}/v1/snapshots/gfa/files/content?path=/vda/part1/sparse.bin"),
            ])
            .spawn()
            .expect("running curl (scripts/install-deps installs it)")
    };
    // To its end: the lease is there while the bytes flow (about 5 s at 50 MB/s), then gone.
    let mut curl = slow_curl("50M");
    wait_for("a restore lease while the download runs", || {
        restore_leases(&f.repo)
            .iter()
            .any(|l| l.contains("download of /vda/part1/sparse.bin"))
    });
    assert!(curl.wait().unwrap().success());
    assert_eq!(
        blake3::hash(&std::fs::read(&out).unwrap()),
        blake3::hash(&want)
    );
    wait_for("the lease removed after the download", || {
        restore_leases(&f.repo).is_empty()
    });
    // A client that goes away halfway: its lease goes too.
    let mut curl = slow_curl("2M");
    wait_for("a restore lease while the download runs", || {
        !restore_leases(&f.repo).is_empty()
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    curl.kill().unwrap();
    curl.wait().unwrap();
    wait_for("the lease removed when the client went away", || {
        restore_leases(&f.repo).is_empty()
    });
    // The agent still serves the next one.
    let r = get(
        &server,
        "/v1/snapshots/gfa/files/content",
        Some("/vda/part1/etc/hostname"),
        &[],
    );
    assert_eq!((r.status, &r.body[..]), (200, &b"guest\n"[..]));
    // A download under way (256 MiB at 200 kB/s, 20 minutes) does not hold up a stop: its
    // connection is cut (at once, or after the API's 10 s of grace).
    let mut curl = slow_curl("200K");
    wait_for("a restore lease while the download runs", || {
        !restore_leases(&f.repo).is_empty()
    });
    let t0 = std::time::Instant::now();
    assert!(server.stop().success());
    assert!(
        t0.elapsed().as_secs() < 20,
        "serve stopped in {:?} with a download under way",
        t0.elapsed()
    );
    assert!(!curl.wait().unwrap().success(), "curl saw its download cut");
}
