//! The boot-storm replay (issue 24): a recorded boot's reads (`scripts/record-boot-trace`)
//! played against a live mount through a real NFS client (`nfs3_client`), keeping the trace's
//! timing and its dependency on the previous read: read `i` starts when read `i - 1` has ended
//! plus the gap the trace shows between them (the guest's own time). So a replay takes the
//! trace's length plus what its storage cost, and that cost is the VM's storage wait.

use std::path::Path;
use std::time::{Duration, Instant};

use nfs3_client::nfs3_types::nfs3::*;

use super::nfs::Conn;

/// One read of a trace: when (after the first read), where, how much.
#[derive(Debug, Clone, Copy)]
pub struct Read {
    pub at: Duration,
    pub offset: u64,
    pub len: u32,
}

/// Loads a trace file (`MICROSECONDS OFFSET BYTES` per line, `#` comments).
pub fn load(path: &Path) -> Vec<Read> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .map(|x| x.parse().unwrap_or_else(|_| panic!("bad trace line {l:?}")))
                .collect();
            assert_eq!(f.len(), 3, "bad trace line {l:?}");
            Read {
                at: Duration::from_micros(f[0]),
                offset: f[1],
                len: u32::try_from(f[2]).unwrap(),
            }
        })
        .collect()
}

/// The project's recorded boot of the test guest.
pub fn boot_trace() -> Vec<Read> {
    load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/boot-trace.txt"))
}

/// The first `n` reads of `trace` on a disk of `size` bytes (offsets folded into it), their
/// gaps scaled by `scale`: a small trace for a test.
pub fn shrink(trace: &[Read], n: usize, size: u64, scale: f64) -> Vec<Read> {
    trace
        .iter()
        .take(n)
        .map(|r| Read {
            at: r.at.mul_f64(scale),
            offset: r.offset % (size - u64::from(r.len)),
            len: r.len,
        })
        .collect()
}

/// What one VM's replay took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Replayed {
    /// From its first read's start to its last read's end.
    pub total: Duration,
    /// Time spent in reads (the storage wait: the total less the trace's gaps).
    pub wait: Duration,
    pub reads: usize,
}

/// Replays `trace` against the file `fh` over `c`.
pub async fn replay(c: &mut Conn, fh: &nfs_fh3, trace: &[Read]) -> Replayed {
    let start = Instant::now();
    let mut wait = Duration::ZERO;
    let mut prev_at = Duration::ZERO;
    for r in trace {
        tokio::time::sleep(r.at.saturating_sub(prev_at)).await;
        prev_at = r.at;
        let t = Instant::now();
        let args = READ3args {
            file: fh.clone(),
            offset: r.offset,
            count: r.len,
        };
        match c.read(&args).await.expect("READ (transport)") {
            READ3res::Ok(ok) => assert_eq!(ok.data.len(), r.len as usize, "short READ"),
            READ3res::Err((e, _)) => panic!("READ at {}: {e:?}", r.offset),
        }
        wait += t.elapsed();
    }
    Replayed {
        total: start.elapsed(),
        wait,
        reads: trace.len(),
    }
}

/// The chunk-sized blocks a trace touches, as block indexes.
pub fn blocks(trace: &[Read], chunk: u64) -> std::collections::BTreeSet<u64> {
    trace
        .iter()
        .flat_map(|r| r.offset / chunk..=(r.offset + u64::from(r.len) - 1) / chunk)
        .collect()
}

/// Replays `trace` against the file `file` of each mount in `mounts` of `server`, all at once
/// (one NFS connection each); their results in the mounts' order.
pub async fn replay_all(
    server: &super::Server,
    mounts: &[String],
    file: &str,
    trace: &[Read],
) -> Vec<Replayed> {
    let mut vms = Vec::new();
    for m in mounts {
        let mut c = super::nfs::connect(server, m).await;
        let root = c.root_nfs_fh3();
        let fh = super::nfs::lookup(&mut c, &root, file).await.unwrap();
        let trace = trace.to_vec();
        vms.push(tokio::spawn(
            async move { replay(&mut c, &fh, &trace).await },
        ));
    }
    let mut out = Vec::new();
    for v in vms {
        out.push(v.await.unwrap());
    }
    out
}
