//! Support for fuzzing and hostile-input tests of the request path (not part of the API).
//!
//! Owns: [`Harness`], a whole datastore (a repository in a temporary folder, one read-write
//! live mount of a small KVM backup) whose dispatch takes raw call records; and
//! [`seed_calls`], one well-formed call record per NFS and MOUNT procedure, for mutation.
//! Must not: be used by the server itself.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use super::dispatch::{self, MOUNT_PROGRAM, NFS_PROGRAM};
use super::fs::DatastoreFs;
use super::handle::Identity;
use super::rpc::{put_opaque, AUTH_NONE, AUTH_SYS};
use crate::agent::PrestageMode;
use crate::agent::{Agent, Datastore, MountRequest};
use crate::repo::{BackupOptions, ChunkSize, NoProgress, Repository};

/// A datastore with one mount (`fz`, a 2 MiB disk `d.img` and its config), answering raw call
/// records as the server does.
pub struct Harness {
    rt: tokio::runtime::Runtime,
    fs: Arc<DatastoreFs>,
    dir: PathBuf,
    seeds: Vec<Vec<u8>>,
}

impl Harness {
    pub fn new() -> anyhow::Result<Harness> {
        let dir = std::env::temp_dir().join(format!("livemount-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let fs = rt.block_on(one_mount(&dir))?;
        let (d, f) = handles(&fs);
        Ok(Harness {
            rt,
            fs,
            dir,
            seeds: seed_calls(&d, &f),
        })
    }

    /// A fuzzer's input as a call: a first byte below 64 sends the rest as it is; from 64 to
    /// 127 the rest is a TCP stream of record fragments, framed as the NFS front frames them
    /// (several fragments, empty ones, records over the limit), each record answered; from 128
    /// it picks a well-formed call (so that deep paths are reached without a corpus) and the
    /// rest mutates it: byte pairs (position, xor), and an odd last byte cuts the record.
    pub fn call_structured(&self, data: &[u8]) -> usize {
        let Some((&mode, rest)) = data.split_first() else {
            return 0;
        };
        if mode < 64 {
            return self.call(rest);
        }
        if mode < 128 {
            return self.stream(rest);
        }
        let mut rec = self.seeds[usize::from(mode) % self.seeds.len()].clone();
        let mut pairs = rest.chunks_exact(2);
        for p in pairs.by_ref() {
            let at = usize::from(p[0]) * 7 % rec.len();
            rec[at] ^= p[1];
        }
        if let [cut] = pairs.remainder() {
            rec.truncate(rec.len() * usize::from(*cut) / 255);
        }
        self.call(&rec)
    }

    /// Frames `stream` into records as the NFS front does and answers each; returns the total
    /// length of the replies. Stops at the first framing error (the front closes the
    /// connection there).
    pub fn stream(&self, stream: &[u8]) -> usize {
        let max = super::server::MAX_RECORD;
        let budget = super::budget::Budget::new(4 * max);
        self.rt.block_on(async {
            let mut r = stream;
            let mut total = 0;
            while let Ok(Some((record, _taken))) =
                super::front::read_record(&mut r, &budget, max).await
            {
                total += dispatch::handle(&self.fs, &record, LOCALHOST)
                    .await
                    .map_or(0, |r| r.wire_len());
            }
            total
        })
    }

    /// Answers one call record; returns the reply's length (0: no reply).
    pub fn call(&self, record: &[u8]) -> usize {
        self.rt
            .block_on(dispatch::handle(&self.fs, record, LOCALHOST))
            .map_or(0, |r| r.wire_len())
    }

    /// Answers one call record; returns the reply's header and results (not READ data).
    pub fn reply(&self, record: &[u8]) -> Option<Vec<u8>> {
        self.rt
            .block_on(dispatch::handle(&self.fs, record, LOCALHOST))
            .map(|r| r.head.to_vec())
    }

    /// Handles of the mount's folder and its disk, for [`seed_calls`].
    pub fn handles(&self) -> (Vec<u8>, Vec<u8>) {
        handles(&self.fs)
    }
}

/// A datastore over a repository in `dir` holding one backup of a small KVM VM, mounted
/// read-write as `fz` (its disk `d.img`, 2 MiB).
pub async fn one_mount(dir: &std::path::Path) -> anyhow::Result<Arc<DatastoreFs>> {
    let disk: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(31) >> 7) as u8)
        .collect();
    std::fs::write(dir.join("d.img"), disk)?;
    std::fs::write(
        dir.join("fz.xml"),
        "<domain type='kvm'><name>fz</name><uuid>4b1c9a1e-1111-4222-8333-944455556666</uuid>\
         <memory unit='KiB'>65536</memory><os><type arch='x86_64'>hvm</type></os><devices>\
         <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
         <source file='d.img'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
    )?;
    let repo = Repository::init(&dir.join("repo"), ChunkSize::new(64 * 1024)?)?;
    let opts = BackupOptions::from_config_file(&dir.join("fz.xml"), &[])?;
    repo.backup(&opts, &NoProgress).await?;
    let agent = agent(repo, dir).await?;
    agent
        .mount(&MountRequest {
            snapshot: "fz".into(),
            at: None,
            name: Some("fz".into()),
            read_only: false,
            network: Default::default(),
            network_map: Default::default(),
            prestage: PrestageMode::Off,
            hosts: Vec::new(),
            disks_only: false,
            ..MountRequest::default()
        })
        .await?;
    let identity = Identity::fixed(*b"fuzzfuzz", *b"verifier");
    Ok(Arc::new(DatastoreFs::new(Arc::new(agent), false, identity)))
}

/// An agent over `repo`, its state in `dir/state`, exporting `/livemount` as 127.0.0.1, with
/// a 16 MiB cache and read-ahead (for tests and fuzzing).
pub async fn agent(repo: Repository, dir: &std::path::Path) -> anyhow::Result<Agent> {
    let datastore = Datastore {
        host: "127.0.0.1".into(),
        export: "/livemount".into(),
    };
    Agent::open(
        repo,
        datastore,
        &dir.join("state"),
        16 << 20,
        None,
        None,
        true,
    )
    .await
}

/// Handles of the folder and the disk of [`one_mount`]'s mount.
pub fn handles(fs: &DatastoreFs) -> (Vec<u8>, Vec<u8>) {
    let dir = fs.mount_path(b"/livemount/fz", LOCALHOST).ok();
    let disk = dir
        .as_ref()
        .and_then(|d| fs.lookup(d, b"d.img", LOCALHOST).ok());
    let h = |node: Option<crate::datastore::Node>| {
        node.map(|n| fs.handle(&n).to_vec()).unwrap_or_default()
    };
    (h(dir), h(disk))
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const LOCALHOST: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// A call record: RPC header with an AUTH_SYS credential (uid 0), then `args`.
pub fn call_record(xid: u32, prog: u32, vers: u32, proc_: u32, args: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    for w in [xid, 0, 2, prog, vers, proc_] {
        b.put_u32(w);
    }
    let mut cred = BytesMut::new();
    cred.put_u32(0);
    put_opaque(&mut cred, b"fuzz");
    cred.put_u32(0);
    cred.put_u32(0);
    cred.put_u32(0);
    b.put_u32(AUTH_SYS);
    put_opaque(&mut b, &cred);
    b.put_u32(AUTH_NONE);
    b.put_u32(0);
    b.extend_from_slice(args);
    b.to_vec()
}

/// One well-formed call per NFSv3 procedure (0-21) and MOUNT v3 procedure (0-5), given the
/// handles of a folder and of a file in it.
pub fn seed_calls(dir: &[u8], file: &[u8]) -> Vec<Vec<u8>> {
    let fh = |b: &mut BytesMut, h: &[u8]| put_opaque(b, h);
    let name = |b: &mut BytesMut, n: &str| put_opaque(b, n.as_bytes());
    let sattr = |b: &mut BytesMut| {
        b.put_u32(1); // mode
        b.put_u32(0o644);
        b.put_u32(0); // uid
        b.put_u32(0); // gid
        b.put_u32(1); // size
        b.put_u64(4096);
        b.put_u32(1); // atime: server time
        b.put_u32(0); // mtime: don't change
    };
    let mut out = Vec::new();
    for proc_ in 0..22u32 {
        let mut a = BytesMut::new();
        match proc_ {
            0 => {}
            1 | 5 | 18 | 19 | 20 => fh(&mut a, file),
            2 => {
                fh(&mut a, file);
                sattr(&mut a);
                a.put_u32(0);
            }
            3 | 12 | 13 => {
                fh(&mut a, dir);
                name(&mut a, "vmware.log");
            }
            4 => {
                fh(&mut a, file);
                a.put_u32(0x3f);
            }
            6 => {
                fh(&mut a, file);
                a.put_u64(4000);
                a.put_u32(8192);
            }
            7 => {
                fh(&mut a, file);
                a.put_u64(4000);
                a.put_u32(100);
                a.put_u32(0);
                put_opaque(&mut a, &[0x5a; 100]);
            }
            8 => {
                fh(&mut a, dir);
                name(&mut a, "vmware.log");
                a.put_u32(0);
                sattr(&mut a);
            }
            9 => {
                fh(&mut a, dir);
                name(&mut a, ".lck-1");
                sattr(&mut a);
            }
            10 => {
                fh(&mut a, dir);
                name(&mut a, "link");
                sattr(&mut a);
                name(&mut a, "target");
            }
            11 => {
                fh(&mut a, dir);
                name(&mut a, "fifo");
                a.put_u32(7); // NF3FIFO
                sattr(&mut a);
            }
            14 => {
                fh(&mut a, dir);
                name(&mut a, "vmware.log");
                fh(&mut a, dir);
                name(&mut a, "vmware-1.log");
            }
            15 => {
                fh(&mut a, file);
                fh(&mut a, dir);
                name(&mut a, "hard");
            }
            16 => {
                fh(&mut a, dir);
                a.put_u64(0);
                a.put_u64(0);
                a.put_u32(4096);
            }
            17 => {
                fh(&mut a, dir);
                a.put_u64(0);
                a.put_u64(0);
                a.put_u32(1024);
                a.put_u32(8192);
            }
            21 => {
                fh(&mut a, file);
                a.put_u64(0);
                a.put_u32(0);
            }
            _ => unreachable!("procedures 0-21"),
        }
        out.push(call_record(proc_, NFS_PROGRAM, 3, proc_, &a));
    }
    for proc_ in 0..6u32 {
        let mut a = BytesMut::new();
        if proc_ == 1 || proc_ == 3 {
            name(&mut a, "/livemount/fz");
        }
        out.push(call_record(100 + proc_, MOUNT_PROGRAM, 3, proc_, &a));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_is_answered_and_truncations_never_panic() {
        let h = Harness::new().unwrap();
        let (dir, file) = h.handles();
        assert_eq!(dir.len(), super::super::handle::HANDLE_LEN);
        for seed in seed_calls(&dir, &file) {
            let reply = h.reply(&seed).unwrap();
            let word = |i: usize| u32::from_be_bytes(reply[i..i + 4].try_into().unwrap());
            assert_eq!(
                (word(4), word(8), word(20)),
                (1, 0, 0),
                "an accepted reply, SUCCESS (the arguments decoded) for {:?}",
                &seed[12..24]
            );
            for cut in (0..seed.len()).step_by(3) {
                h.call(&seed[..cut]);
            }
        }
    }
}
