//! Access control on the NFS port: the server's `--allow` list, a mount limited to chosen hosts
//! (`mount --allow`), and AUTH_SYS required. Clients connect from chosen loopback addresses
//! (127.0.0.1 and 127.0.0.2) with raw RPC records.

mod common;

use std::net::SocketAddr;

use common::*;
use livemount::nfs::fuzzing::call_record;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const NFS: u32 = 100_003;
const MOUNT: u32 = 100_005;

async fn connect_from(src: &str, port: u16) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(format!("{src}:0").parse::<SocketAddr>().unwrap())?;
    s.connect(([127, 0, 0, 1], port).into()).await
}

/// Sends one record and reads the reply record; `None` if the server closed the connection.
async fn rpc(s: &mut TcpStream, record: &[u8]) -> Option<Vec<u8>> {
    let mut framed = (0x8000_0000u32 | record.len() as u32)
        .to_be_bytes()
        .to_vec();
    framed.extend_from_slice(record);
    s.write_all(&framed).await.ok()?;
    let mut mark = [0u8; 4];
    s.read_exact(&mut mark).await.ok()?;
    let mut reply = vec![0u8; (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize];
    s.read_exact(&mut reply).await.ok()?;
    Some(reply)
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn xdr_string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out.resize(4 + s.len().next_multiple_of(4), 0);
    out
}

/// MNT of `path`: Ok(handle) or Err(mountstat3).
async fn mnt(s: &mut TcpStream, path: &str) -> Result<Vec<u8>, u32> {
    let reply = rpc(
        s,
        &call_record(1, MOUNT, 3, 1, &xdr_string(path.as_bytes())),
    )
    .await
    .expect("a MNT reply");
    assert_eq!(word(&reply, 20), 0, "accepted");
    match word(&reply, 24) {
        0 => {
            let len = word(&reply, 28) as usize;
            Ok(reply[32..32 + len].to_vec())
        }
        e => Err(e),
    }
}

/// GETATTR: the NFS status.
async fn getattr(s: &mut TcpStream, fh: &[u8]) -> u32 {
    let reply = rpc(s, &call_record(2, NFS, 3, 1, &xdr_string(fh)))
        .await
        .expect("a GETATTR reply");
    assert_eq!(word(&reply, 20), 0, "accepted");
    word(&reply, 24)
}

#[tokio::test(flavor = "multi_thread")]
async fn mounts_limited_to_hosts_and_the_server_allow_list_refuse_everyone_else() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "ac", &mixed_disk(MIB, 5));
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "off", &[]);
    server.cli(&["mount", "ac", "--name", "open"]);
    server.cli(&["mount", "ac", "--name", "only2", "--allow", "127.0.0.2"]);
    let port = server.nfs_port;

    // A bad host is a clear error, and nothing is mounted.
    let out = livemount(&[
        "mount",
        "ac",
        "--name",
        "bad",
        "--allow",
        "10.0.0.0/33",
        "--state",
        state.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10.0.0.0/33") && err.contains("CIDR"), "{err}");
    assert!(!server.cli(&["mounts"]).contains("bad"));

    // 127.0.0.2 may use both mounts.
    let mut two = connect_from("127.0.0.2", port).await.unwrap();
    let h2 = mnt(&mut two, "/livemount/only2").await.unwrap();
    assert_eq!(getattr(&mut two, &h2).await, 0);
    let ho = mnt(&mut two, "/livemount/open").await.unwrap();
    assert_eq!(getattr(&mut two, &ho).await, 0);

    // 127.0.0.1 may use only the open one: MNT refused, a handle it got elsewhere refused,
    // and the mount is not listed.
    let mut one = connect_from("127.0.0.1", port).await.unwrap();
    assert_eq!(mnt(&mut one, "/livemount/only2").await.unwrap_err(), 13);
    assert_eq!(getattr(&mut one, &h2).await, 13, "NFS3ERR_ACCES");
    assert_eq!(getattr(&mut one, &ho).await, 0);
    let listing = client(
        "nfs-ls",
        &[&format!(
            "nfs://127.0.0.1/livemount/?nfsport={port}&mountport={port}&version=3"
        )],
    );
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains("open") && !listing.contains("only2"),
        "{listing}"
    );

    // AUTH_NONE is refused (AUTH_ERROR, AUTH_TOOWEAK) for everything but NULL.
    let mut none = call_record(3, NFS, 3, 1, &xdr_string(&ho));
    let cred_len = word(&none, 28) as usize;
    none.splice(24..32 + cred_len, [0u8; 8]);
    let reply = rpc(&mut one, &none).await.unwrap();
    assert_eq!(
        (word(&reply, 8), word(&reply, 12), word(&reply, 16)),
        (1, 1, 5)
    );
    drop((one, two));
    assert!(server.stop().success());

    // The server's own allow-list: only 127.0.0.2 may connect at all.
    let server = Server::start(&repo, &state, "off", &["--allow", "127.0.0.2/32"]);
    let port = server.nfs_port;
    let mut one = connect_from("127.0.0.1", port).await.unwrap();
    assert!(
        rpc(
            &mut one,
            &call_record(4, MOUNT, 3, 1, &xdr_string(b"/livemount"))
        )
        .await
        .is_none(),
        "a connection from outside the allow-list is closed"
    );
    let mut two = connect_from("127.0.0.2", port).await.unwrap();
    assert!(mnt(&mut two, "/livemount").await.is_ok());
}

/// A network namespace of its own with a non-loopback address on its `lo`, removed on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str, addr: &str) -> Netns {
        let name = format!("lm-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &name]);
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &ns.0,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "lo",
        ]);
        ns
    }

    fn command(&self, program: &str) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// `/metrics` answers loopback clients only unless `metrics_public = true`, and `serve` warns
/// when its API listens beyond loopback. The server runs in a network namespace whose `lo`
/// also carries 10.99.0.1, an address that is not loopback, and listens there.
#[test]
fn metrics_stay_on_loopback_unless_made_public_and_a_public_api_is_warned_about() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "vm", &mixed_disk(MIB, 81));
    let ns = Netns::new("metrics", "10.99.0.1");
    for public in [false, true] {
        let state = t.path().join(format!("state-{public}"));
        let conf = t.path().join(format!("serve-{public}.toml"));
        std::fs::write(&conf, format!("metrics_public = {public}\n")).unwrap();
        let log = std::fs::File::create(t.path().join(format!("serve-{public}.log"))).unwrap();
        let mut child = ns
            .command(env!("CARGO_BIN_EXE_livemount"))
            .args(["serve", "--repo", repo.to_str().unwrap()])
            .args(["--state", state.to_str().unwrap()])
            .args(["--config", conf.to_str().unwrap()])
            .args([
                "--nfs",
                "127.0.0.1:0",
                "--portmap",
                "off",
                "--api",
                "10.99.0.1:7480",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while !state.join("api.json").exists() {
            assert!(child.try_wait().unwrap().is_none(), "serve exited");
            assert!(t0.elapsed().as_secs() < 30, "serve did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let curl = ns
            .command("curl")
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                "http://10.99.0.1:7480/metrics",
            ])
            .output()
            .unwrap();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap();
        let out = String::from_utf8_lossy(&curl.stdout).to_string();
        let text = std::fs::read_to_string(t.path().join(format!("serve-{public}.log"))).unwrap();
        assert!(
            text.contains("warning: the control API listens on 10.99.0.1:7480, beyond loopback"),
            "{text}"
        );
        if public {
            assert!(out.ends_with("\n200"), "{out}");
            assert!(out.contains("livemount_mounts"), "{out}");
        } else {
            assert!(out.ends_with("\n403"), "{out}");
            assert!(out.contains("metrics_public = true"), "{out}");
            assert!(!out.contains("livemount_mounts"), "{out}");
        }
    }
}

/// LOOKUP of `name` in `dir`: the handle.
async fn lookup_fh(s: &mut TcpStream, dir: &[u8], name: &str) -> Vec<u8> {
    let mut args = xdr_string(dir);
    args.extend_from_slice(&xdr_string(name.as_bytes()));
    let reply = rpc(s, &call_record(3, NFS, 3, 3, &args))
        .await
        .expect("a LOOKUP reply");
    assert_eq!(word(&reply, 24), 0, "LOOKUP {name}");
    let len = word(&reply, 28) as usize;
    reply[32..32 + len].to_vec()
}

/// Issue 15, item 1: allowed clients that hold connections without using them, or send calls
/// and never read the replies, must not lock a hypervisor out. 300 connections that say
/// nothing (more than the 256 slots) and one that sends 16 READs of 1 MiB with a tiny receive
/// buffer and never reads; then libnfs's nfs-cat (MOUNT and NFS connections of its own) reads
/// the whole disk, byte-identical.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_and_a_client_that_never_reads_do_not_lock_out_a_hypervisor() {
    let t = tempfile::tempdir().unwrap();
    let disk = mixed_disk(16 * MIB, 91);
    let repo = repo_with_disk(t.path(), "vm", &disk);
    let server = Server::start(&repo, &t.path().join("state"), "off", &[]);
    server.cli(&["mount", "vm", "--name", "m"]);
    let port = server.nfs_port;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();

    // The disk's handle, on a connection of its own.
    let fh = {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let root = mnt(&mut s, "/livemount/m").await.unwrap();
        lookup_fh(&mut s, &root, "d.img").await
    };
    // A client that sends 16 READs and never reads: its socket buffer fills at once.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stuck = sock.connect(addr).await.unwrap();
    for i in 0..16u64 {
        let mut args = xdr_string(&fh);
        args.extend_from_slice(&(i * MIB).to_be_bytes());
        args.extend_from_slice(&(MIB as u32).to_be_bytes());
        let record = call_record(100 + i as u32, NFS, 3, 6, &args);
        let mut framed = (0x8000_0000u32 | record.len() as u32)
            .to_be_bytes()
            .to_vec();
        framed.extend_from_slice(&record);
        stuck.write_all(&framed).await.unwrap();
    }
    // 300 connections that say nothing.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Past the time after which an idle connection may give way to a new one.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;

    let out_file = t.path().join("read.img");
    let url = server.libnfs_url("m/d.img");
    let t0 = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || client("nfs-cat", &[&url]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "nfs-cat: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    std::fs::write(&out_file, &out.stdout).unwrap();
    assert!(out.stdout == disk, "nfs-cat read other bytes");
    assert!(t0.elapsed().as_secs() < 20, "{:?}", t0.elapsed());
    assert!(
        server.log_text().contains("in place of one idle longest"),
        "{}",
        server.log_text()
    );
    drop((idle, stuck));
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Issue 15, item 2: the memory of calls in flight is bounded across connections, with
/// `call_memory = "32MiB"` and a 16 MiB cache, under two floods of clients that never read their
/// replies (a 4 KiB receive buffer): 32 that each send 16 one-byte READs of other chunks (as
/// slices they would keep 512 whole chunks alive after the cache let them go), and 16 that each
/// send 16 READs of 1 MiB (256 MiB of data, of which the kernel's socket buffers take a few MiB
/// per connection). The server's RSS grows by much less than that, and a client that reads
/// still reads the whole disk, byte-identical: the connections stalled longest are cut to make
/// room.
#[tokio::test(flavor = "multi_thread")]
async fn reads_nobody_takes_stay_within_the_call_memory_and_others_still_read() {
    const CHUNKS: u64 = 512;
    let t = tempfile::tempdir().unwrap();
    let mut disk = vec![0u8; (CHUNKS * MIB) as usize];
    Rng::new(101).fill(&mut disk);
    let repo = repo_with_disk(t.path(), "vm", &disk);
    let conf = t.path().join("serve.toml");
    std::fs::write(&conf, "call_memory = \"32MiB\"\n").unwrap();
    let server = Server::start(
        &repo,
        &t.path().join("state"),
        "off",
        &["--config", conf.to_str().unwrap(), "--cache-size", "16MiB"],
    );
    server.cli(&["mount", "vm", "--name", "m"]);
    let addr: SocketAddr = ([127, 0, 0, 1], server.nfs_port).into();
    let fh = {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let root = mnt(&mut s, "/livemount/m").await.unwrap();
        lookup_fh(&mut s, &root, "d.img").await
    };
    let before = rss_bytes(server.pid());

    let read_call = |xid: u32, offset: u64, count: u32| {
        let mut args = xdr_string(&fh);
        args.extend_from_slice(&offset.to_be_bytes());
        args.extend_from_slice(&count.to_be_bytes());
        let record = call_record(xid, NFS, 3, 6, &args);
        let mut framed = (0x8000_0000u32 | record.len() as u32)
            .to_be_bytes()
            .to_vec();
        framed.extend_from_slice(&record);
        framed
    };
    let mut stuck = Vec::new();
    for c in 0..48u64 {
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(addr).await.unwrap();
        for i in 0..16u64 {
            let call = if c < 32 {
                read_call(i as u32, ((c * 16 + i) % CHUNKS) * MIB + 7, 1)
            } else {
                read_call(i as u32, ((c * 16 + i) % CHUNKS) * MIB, MIB as u32)
            };
            s.write_all(&call).await.unwrap();
        }
        stuck.push(s);
    }
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let during = rss_bytes(server.pid());
    let grew = during.saturating_sub(before);
    eprintln!(
        "server RSS {} MiB before, {} MiB with 48 clients not reading (+{} MiB)",
        before >> 20,
        during >> 20,
        grew >> 20
    );

    // A client that reads: the whole disk, while the others still hold their connections.
    let url = server.libnfs_url("m/d.img");
    let t0 = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || client("nfs-cat", &[&url]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout == disk, "nfs-cat read other bytes");
    eprintln!("nfs-cat of {CHUNKS} MiB beside them: {:?}", t0.elapsed());
    assert!(t0.elapsed().as_secs() < 60, "{:?}", t0.elapsed());
    assert!(grew < 250 * MIB, "RSS grew by {} MiB", grew >> 20);
    drop(stuck);
}

/// Issue 15, item 11: a handle a client made up is refused by construction. Everything but the
/// key is known to a client (the datastore tag is in every handle, mount ids are sequential,
/// the stamp shows as the folder's ctime): a handle built from them for a mount the client may
/// use is BADHANDLE without the MAC, and one of the layout before the MAC is STALE.
#[tokio::test(flavor = "multi_thread")]
async fn a_handle_a_client_made_up_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let repo = repo_with_disk(t.path(), "hm", &mixed_disk(MIB, 6));
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "off", &[]);
    server.cli(&["mount", "hm", "--name", "open"]);
    let port = server.nfs_port;
    let mut s = connect_from("127.0.0.1", port).await.unwrap();
    let real = mnt(&mut s, "/livemount/open").await.unwrap();
    assert_eq!(getattr(&mut s, &real).await, 0);
    assert_eq!(real.len(), 40);

    let tag = std::fs::read(state.join("datastore-id")).unwrap();
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("mounts/open.json")).unwrap()).unwrap();
    let id = spec["id"].as_u64().unwrap();
    let created: jiff::Timestamp = spec["created"].as_str().unwrap().parse().unwrap();
    let mut body = tag.clone();
    body.extend_from_slice(&(id << 32).to_be_bytes());
    body.extend_from_slice(&(created.as_nanosecond() as u64).max(1).to_be_bytes());
    // The old layout, made up: stale.
    assert_eq!(getattr(&mut s, &body).await, 70, "NFS3ERR_STALE");
    // The new layout with a guessed MAC: bad handle.
    let mut forged = body.clone();
    forged.extend_from_slice(&[0u8; 16]);
    assert_eq!(getattr(&mut s, &forged).await, 10001, "NFS3ERR_BADHANDLE");
    // The real one's body is the made-up one: only the MAC tells them apart.
    assert_eq!(real[..24], body[..]);
}
