//! Shared test support: generated disk images, VM configs, and running the binary and qemu-img.
//!
//! Inputs are generated at test time (nothing large is committed). `qemu-img` is a required
//! prerequisite: a missing one fails the test with what to install, it never skips.

#![allow(dead_code)]

pub mod cutfs;
pub mod garage;
pub mod nfs;
pub mod replay;
pub mod retention;
pub mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const MIB: u64 = 1024 * 1024;

/// A deterministic generator (splitmix64), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A disk image of `size` bytes of mixed content, in regions of 64 KiB..2 MiB: random bytes
/// (incompressible), repeated text (compressible, and repeated across regions so that it
/// deduplicates), and zeros.
pub fn mixed_disk(size: u64, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = vec![0u8; size as usize];
    let text: Vec<u8> = b"livemount test pattern: the quick brown fox jumps over the lazy dog. "
        .iter()
        .copied()
        .cycle()
        .take(4 * MIB as usize)
        .collect();
    let mut pos = 0usize;
    while pos < out.len() {
        let len = ((64 * 1024 + rng.below(2 * MIB)) as usize).min(out.len() - pos);
        match rng.below(3) {
            0 => rng.fill(&mut out[pos..pos + len]),
            1 => out[pos..pos + len].copy_from_slice(&text[..len]),
            _ => {}
        }
        pos += len;
    }
    out
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Runs qemu-img; panics with its stderr on failure, or with what to install when missing.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("qemu-img is required for this test (apt-get install qemu-utils): {e}")
        });
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Converts a raw image to another format with qemu-img; extra options go after `-O FMT`.
pub fn convert(raw: &Path, out: &Path, format: &str, extra: &[&str]) {
    let mut args = vec!["convert", "-q", "-f", "raw", "-O", format];
    args.extend_from_slice(extra);
    let (r, o) = (raw.to_str().unwrap(), out.to_str().unwrap());
    args.extend_from_slice(&[r, o]);
    qemu_img(&args);
}

pub const VM_UUID: &str = "6f1c2b9e-3d4a-4c5b-9e8f-0a1b2c3d4e5f";

/// A libvirt domain XML for a KVM VM with file disks `(path, driver type)`.
pub fn kvm_config(dir: &Path, name: &str, disks: &[(&str, &str)]) -> PathBuf {
    let mut devs = String::new();
    for (i, (path, fmt)) in disks.iter().enumerate() {
        let dev = format!("vd{}", (b'a' + i as u8) as char);
        devs.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{fmt}'/>\n      \
             <source file='{path}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n"
        ));
    }
    let xml = format!(
        "<domain type='kvm'>\n  <name>{name}</name>\n  <uuid>{VM_UUID}</uuid>\n  \
         <memory unit='KiB'>262144</memory>\n  <os><type arch='x86_64'>hvm</type></os>\n  \
         <devices>\n{devs}  </devices>\n</domain>\n"
    );
    let path = dir.join(format!("{name}.xml"));
    write(&path, xml.as_bytes());
    path
}

/// A .vmx for an ESXi VM whose SCSI disks are the given .vmdk descriptors.
pub fn esxi_config(dir: &Path, name: &str, vmdks: &[&str]) -> PathBuf {
    let mut text = format!(
        ".encoding = \"UTF-8\"\nconfig.version = \"8\"\nvirtualHW.version = \"19\"\n\
         displayName = \"{name}\"\nguestOS = \"other5xlinux-64\"\nmemSize = \"256\"\n\
         uuid.bios = \"56 4d 11 22 33 44 55 66-77 88 99 aa bb cc dd ee\"\n\
         scsi0.present = \"TRUE\"\nscsi0.virtualDev = \"pvscsi\"\n"
    );
    for (i, v) in vmdks.iter().enumerate() {
        text.push_str(&format!(
            "scsi0:{i}.present = \"TRUE\"\nscsi0:{i}.fileName = \"{v}\"\nscsi0:{i}.deviceType = \"scsi-hardDisk\"\n"
        ));
    }
    let path = dir.join(format!("{name}.vmx"));
    write(&path, text.as_bytes());
    path
}

/// Writes a serve config, `dir/serve.toml`: the lines `extra` (top-level keys), then
/// `relocate_roots` listing `roots` (each made if missing). Returns its path, for `--config`.
pub fn relocate_config(dir: &Path, roots: &[&Path], extra: &str) -> PathBuf {
    for r in roots {
        std::fs::create_dir_all(r).unwrap();
    }
    let list: Vec<String> = roots
        .iter()
        .map(|r| format!("{:?}", r.to_str().unwrap()))
        .collect();
    let path = dir.join("serve.toml");
    let text = format!("{extra}relocate_roots = [{}]\n", list.join(", "));
    write(&path, text.as_bytes());
    path
}

/// Runs the livemount binary.
pub fn livemount(args: &[&str]) -> Output {
    livemount_env(args, &[])
}

/// Runs the livemount binary with extra environment variables (an S3 repository's AWS_*).
pub fn livemount_env(args: &[&str], env: &[(String, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_livemount"))
        .args(args)
        .env("LIVEMOUNT_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running livemount")
}

/// The same, panicking with stderr when it fails; returns stdout.
pub fn livemount_env_ok(args: &[&str], env: &[(String, String)]) -> String {
    let out = livemount_env(args, env);
    assert!(
        out.status.success(),
        "livemount {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs the binary and returns its stdout, panicking with stderr when it fails.
pub fn livemount_ok(args: &[&str]) -> String {
    livemount_env_ok(args, &[])
}

/// All chunk files in a repository.
pub fn chunk_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in std::fs::read_dir(repo.join("chunks")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            out.push(f.unwrap().path());
        }
    }
    out.sort();
    out
}

/// A running `livemount serve` on ephemeral loopback ports; killed on drop.
pub struct Server {
    pub child: std::process::Child,
    pub state: PathBuf,
    pub repo: PathBuf,
    pub nfs_port: u16,
    pub portmap: Option<String>,
    log: PathBuf,
}

impl Server {
    /// Starts a server over `repo` with state in `state`. `portmap` is `off` or an address.
    pub fn start(repo: &Path, state: &Path, portmap: &str, extra: &[&str]) -> Server {
        Server::start_env(repo.to_str().unwrap(), state, portmap, extra, &[])
    }

    /// The same for any repository (a directory or s3://...), with extra environment variables.
    pub fn start_env(
        repo: &str,
        state: &Path,
        portmap: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Server {
        Server::start_with(repo, state, portmap, extra, env, &|_| {})
    }

    /// The same, with `prepare` run on the server's command before it is spawned (to run it
    /// in a namespace of its own, say).
    pub fn start_with(
        repo: &str,
        state: &Path,
        portmap: &str,
        extra: &[&str],
        env: &[(String, String)],
        prepare: &dyn Fn(&mut Command),
    ) -> Server {
        std::fs::create_dir_all(state).unwrap();
        let log = state.with_extension("log");
        let _ = std::fs::remove_file(state.join("api.json"));
        let mut args = vec!["serve", "--repo", repo, "--state", state.to_str().unwrap()];
        // A test that restarts a server under running clients gives it a fixed `--nfs`.
        if !extra.contains(&"--nfs") {
            args.extend_from_slice(&["--nfs", "127.0.0.1:0"]);
        }
        args.extend_from_slice(&["--api", "127.0.0.1:0", "--portmap", portmap]);
        args.extend_from_slice(extra);
        // One open file for both streams, appending (e.g. to the log of an earlier run of the
        // same state directory): two separate opens would overwrite each other's lines.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_livemount"));
        cmd.args(&args)
            .env("LIVEMOUNT_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        prepare(&mut cmd);
        let child = cmd.spawn().expect("starting livemount serve");
        let mut server = Server {
            child,
            state: state.to_path_buf(),
            repo: PathBuf::from(repo),
            nfs_port: 0,
            portmap: (portmap != "off").then(|| portmap.to_string()),
            log,
        };
        let t0 = std::time::Instant::now();
        while !state.join("api.json").exists() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("livemount serve exited ({status}): {}", server.log_text());
            }
            assert!(
                t0.elapsed().as_secs() < 30,
                "server did not start: {}",
                server.log_text()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let status: serde_json::Value =
            serde_json::from_str(&server.cli(&["status", "--json"])).unwrap();
        server.nfs_port = status["nfs_port"].as_u64().unwrap() as u16;
        server
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a CLI command against this server (adds `--state`); panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut a = args.to_vec();
        a.extend_from_slice(&["--state", self.state.to_str().unwrap()]);
        livemount_ok(&a)
    }

    /// The server's `/metrics` text.
    pub fn metrics(&self) -> String {
        let api: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.state.join("api.json")).unwrap()).unwrap();
        ureq::get(&format!("{}/metrics", api["url"].as_str().unwrap()))
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap()
    }

    /// A libnfs URL for PATH under the export, with explicit ports (no portmapper needed).
    pub fn libnfs_url(&self, path: &str) -> String {
        format!(
            "nfs://127.0.0.1/livemount/{path}?nfsport={p}&mountport={p}&version=3",
            p = self.nfs_port
        )
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL (no chance to sync or say goodbye).
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a client tool; panics with what to install when it is missing.
pub fn client(tool: &str, args: &[&str]) -> Output {
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} is required for this test (scripts/install-deps installs it): {e}")
    })
}

/// A tool's stdout and stderr, for an assertion's message.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `qemu-img compare` of two raw images (files or URLs: nbd://, iscsi://, nfs://).
pub fn qemu_compare(a: &str, b: &str) -> Output {
    client("qemu-img", &["compare", "-f", "raw", "-F", "raw", a, b])
}

/// Starts libvirtd and virtlogd with `scripts/libvirt-up` (no systemd on these machines), or
/// panics with what it said.
pub fn libvirt_up() {
    let up = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/libvirt-up"))
        .output()
        .expect("running scripts/libvirt-up");
    assert!(
        up.status.success(),
        "libvirtd did not start: {}",
        String::from_utf8_lossy(&up.stderr)
    );
}

/// `virsh` against the system libvirtd (started by `scripts/libvirt-up`).
pub fn virsh(args: &[&str]) -> Output {
    let mut a = vec!["-c", "qemu:///system"];
    a.extend_from_slice(args);
    client("virsh", &a)
}

/// Destroys and undefines a test domain however the test ends.
pub struct Domain(pub String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0]);
    }
}

/// Boots the project's test guest with `scripts/boot-guest` (QEMU, TCG) from `image` (a file or
/// an nfs:// URL, found through the portmapper on 127.0.0.1:111), with `drive_opts` appended to
/// its -drive and `extra` QEMU arguments. Whether the script succeeded, and everything it and
/// the guest's serial console printed.
pub fn boot_guest(image: &str, log: &Path, drive_opts: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/boot-guest"))
        .args([image, log.to_str().unwrap()])
        .args(extra)
        .env("DRIVE_OPTS", drive_opts)
        .env("BOOT_TIMEOUT", "120")
        .output()
        .expect("running scripts/boot-guest (needs qemu-system-x86_64: scripts/install-deps)");
    let text = format!(
        "{}{}\nserial log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(log).unwrap_or_default()
    );
    (out.status.success(), text)
}

/// `boot_guest` on a thread of its own, returning once the guest's serial log shows `marker`
/// (a line the guest prints while it runs); the thread's result is `boot_guest`'s. Panics with
/// the boot's output if it ends without the marker, or after 120 s.
pub fn boot_guest_until(
    image: &str,
    log: &Path,
    drive_opts: &str,
    extra: &[&str],
    marker: &str,
) -> std::thread::JoinHandle<(bool, String)> {
    // An earlier boot's log must not be mistaken for this one's.
    let _ = std::fs::remove_file(log);
    let guest = {
        let (image, log, drive_opts) =
            (image.to_string(), log.to_path_buf(), drive_opts.to_string());
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        std::thread::spawn(move || {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            boot_guest(&image, &log, &drive_opts, &extra)
        })
    };
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(marker)
    {
        if guest.is_finished() {
            let (_, text) = guest.join().unwrap();
            panic!("the guest ended without {marker}:\n{text}");
        }
        assert!(t0.elapsed().as_secs() < 120, "no {marker} after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    guest
}

/// Holds the machine-wide lock on TCP port 111 (the portmapper port QEMU's NFS driver asks).
pub fn port_111_lock() -> std::fs::File {
    let f =
        std::fs::File::create(std::env::temp_dir().join("livemount-test-port111.lock")).unwrap();
    f.lock().unwrap();
    f
}

/// The project's test guest image (built once per target directory by scripts/build-guest).
pub fn guest_image() -> PathBuf {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest-image");
    let img = out.join("guest.img");
    std::fs::create_dir_all(&out).unwrap();
    let lock = std::fs::File::create(out.join(".lock")).unwrap();
    lock.lock().unwrap();
    // The image is rebuilt when the script that makes it changes.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-guest");
    let stamp = format!(
        "{}",
        blake3::hash(&std::fs::read(&script).unwrap()).to_hex()
    );
    let stamp_path = out.join("guest.img.script-blake3");
    if std::fs::read_to_string(&stamp_path).ok().as_deref() != Some(stamp.as_str()) {
        let _ = std::fs::remove_file(&img);
    }
    if !img.exists() {
        let status =
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-guest"))
                .arg(&out)
                .status()
                .expect("running scripts/build-guest (scripts/install-deps installs its tools)");
        assert!(status.success(), "scripts/build-guest failed");
        std::fs::write(&stamp_path, &stamp).unwrap();
    }
    img
}

/// A repository in `dir/repo` holding one backup of KVM VM `vm` whose one raw disk, `d.img`
/// (written into `dir`), holds `disk`.
pub fn repo_with_disk(dir: &Path, vm: &str, disk: &[u8]) -> PathBuf {
    write(&dir.join("d.img"), disk);
    let cfg = kvm_config(dir, vm, &[("d.img", "raw")]);
    repo_with_backup(dir, &cfg)
}

/// Makes a repository in `dir/repo` and backs up the VM whose config is `config`; returns the
/// repository's path.
pub fn repo_with_backup(dir: &Path, config: &Path) -> PathBuf {
    repo_with_backup_chunks(dir, config, "1MiB")
}

/// The same, with a repository of chunk size `chunk_size` (e.g. `256KiB`).
pub fn repo_with_backup_chunks(dir: &Path, config: &Path, chunk_size: &str) -> PathBuf {
    let repo = dir.join("repo");
    livemount_ok(&[
        "repo",
        "init",
        repo.to_str().unwrap(),
        "--chunk-size",
        chunk_size,
    ]);
    livemount_ok(&[
        "backup",
        "--repo",
        repo.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
    ]);
    repo
}

/// The chunk of every non-zero block of disk `disk` of VM `vm`'s latest snapshot, in order.
pub async fn disk_chunks(
    repo: &livemount::repo::Repository,
    vm: &str,
    disk: usize,
) -> Vec<livemount::repo::ChunkId> {
    let info = repo
        .resolve(&livemount::repo::SnapshotSpec::new(vm, None))
        .await
        .unwrap();
    let image = repo
        .snapshot(&info.id)
        .await
        .unwrap()
        .disk(disk)
        .await
        .unwrap();
    (0..image.block_count())
        .filter_map(|b| image.chunk_of_block(b))
        .collect()
}

/// A mount's relocation as `livemount mounts --json` shows it (`None`: none, or no such mount).
pub fn relocation_of(server: &Server, mount: &str) -> Option<serde_json::Value> {
    let mounts: serde_json::Value =
        serde_json::from_str(&server.cli(&["mounts", "--json"])).unwrap();
    mounts
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["spec"]["name"] == mount)
        .map(|m| m["relocation"].clone())
        .filter(|r| !r.is_null())
}

/// A guest on a block protocol: the test guest boots from `url_of(LISTEN, MOUNT)` with
/// `serve FLAG LISTEN` (a fixed loopback port, so a restarted server is where the first
/// was) and writes `word`; livemount is killed with SIGKILL and started again; the next boot
/// reads `word` back; and a fresh mount of the backup still equals the guest's image.
pub fn guest_write_survives_a_kill(
    vm: &str,
    flag: &str,
    url_of: impl Fn(&str, &str) -> String,
    word: &str,
) {
    let image = guest_image();
    let t = tempfile::tempdir().unwrap();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let cfg = kvm_config(t.path(), vm, &[("guest.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let state = t.path().join("state");
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let server = Server::start(&repo, &state, "off", &[flag, &listen]);
    server.cli(&["mount", vm, "--name", "g"]);
    let url = url_of(&listen, "g");
    let log = t.path().join("serial.log");
    let write = format!("name=opt/livemount/write,string={word}");
    let (ok, out) = boot_guest(&url, &log, "", &["-fw_cfg", &write]);
    assert!(
        ok && out.contains(&format!("LIVEMOUNT-WROTE {word}")),
        "the guest did not boot from {url}:\n{out}\nserver:\n{}",
        server.log_text()
    );

    server.kill();
    let server = Server::start(&repo, &state, "off", &[flag, &listen]);
    let (ok, out) = boot_guest(&url, &log, "", &[]);
    assert!(
        ok && out.contains(&format!("LIVEMOUNT-FILE {word}")),
        "the write is gone after the kill:\n{out}\nserver:\n{}",
        server.log_text()
    );
    // The backup is untouched.
    server.cli(&["mount", vm, "--name", "fresh"]);
    let fresh = url_of(&listen, "fresh");
    let out = qemu_compare(&fresh, image.to_str().unwrap());
    assert!(out.status.success(), "{}", output_text(&out));
}
