//! Support for fuzzing and hostile-input tests of the NBD server (not part of the API).
//!
//! Owns: [`MemDisk`], a disk in memory; [`Harness`], which runs one whole connection
//! (handshake, options, transmission) over an in-memory pipe against two such disks, a
//! read-write `m/rw.img` and a read-only `m/ro.img`.
//! Must not: be used by the server itself.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::server::{serve, BlockDevice, Exports};
pub use crate::block::testing::{disk, MemDisk};

/// Two exports: `m/rw.img` and `m/ro.img` (read-only).
pub struct TwoDisks {
    pub rw: Arc<MemDisk>,
    pub ro: Arc<MemDisk>,
}

impl Exports for TwoDisks {
    fn list(&self, _: IpAddr) -> Vec<String> {
        vec!["m/rw.img".into(), "m/ro.img".into()]
    }
    fn open(&self, name: &str, _: IpAddr) -> Option<Arc<dyn BlockDevice>> {
        match name {
            "m/rw.img" => Some(self.rw.clone()),
            "m/ro.img" => Some(self.ro.clone()),
            _ => None,
        }
    }
}

/// One NBD connection per input, against [`TwoDisks`].
pub struct Harness {
    rt: tokio::runtime::Runtime,
    exports: Arc<TwoDisks>,
}

impl Harness {
    pub fn new() -> std::io::Result<Harness> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Harness {
            rt,
            exports: Arc::new(TwoDisks {
                rw: disk(1 << 20, 0x5a, false),
                ro: disk(64 << 10, 0xa5, true),
            }),
        })
    }

    /// Sends `input` as everything a client says on one connection, then closes its side
    /// (so the server never waits for a clock: it reads the end); returns how many bytes the
    /// server answered.
    pub fn stream(&self, input: &[u8]) -> usize {
        let exports: Arc<dyn Exports> = self.exports.clone();
        self.rt.block_on(async move {
            let (client, server) = tokio::io::duplex(64 << 10);
            let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let conn = tokio::spawn(serve(server, peer, exports, CancellationToken::new()));
            let (mut rd, mut wr) = tokio::io::split(client);
            let reader = tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                let mut total = 0;
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                total
            });
            let _ = wr.write_all(input).await;
            let _ = wr.shutdown().await;
            let _ = conn.await;
            drop(wr);
            reader.await.unwrap_or(0)
        })
    }

    /// The handshake that opens `export` (fixed newstyle, NBD_OPT_GO), for seeds.
    pub fn go(export: &str) -> Vec<u8> {
        let mut v = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
        v.extend_from_slice(b"IHAVEOPT");
        v.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        let name = export.as_bytes();
        v.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&0u16.to_be_bytes());
        v
    }

    /// The handshake that asks for structured replies and the `base:allocation` meta context,
    /// then opens `export`, for seeds.
    pub fn go_structured(export: &str) -> Vec<u8> {
        let mut v = 3u32.to_be_bytes().to_vec(); // FIXED_NEWSTYLE | NO_ZEROES
        v.extend_from_slice(b"IHAVEOPT");
        v.extend_from_slice(&8u32.to_be_bytes()); // NBD_OPT_STRUCTURED_REPLY
        v.extend_from_slice(&0u32.to_be_bytes());
        let (name, query) = (export.as_bytes(), b"base:allocation");
        v.extend_from_slice(b"IHAVEOPT");
        v.extend_from_slice(&10u32.to_be_bytes()); // NBD_OPT_SET_META_CONTEXT
        v.extend_from_slice(&(4 + name.len() as u32 + 4 + 4 + query.len() as u32).to_be_bytes());
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend_from_slice(&(query.len() as u32).to_be_bytes());
        v.extend_from_slice(query);
        v.extend_from_slice(&Self::go(export)[4..]);
        v
    }

    /// One transmission request.
    pub fn request(kind: u16, flags: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&7u64.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness runs a whole session: a read of 512 bytes comes back (16-byte reply
    /// header, then the data), a write to the read-only disk is refused and changes nothing.
    #[test]
    fn a_session_over_the_pipe_is_answered() {
        let h = Harness::new().unwrap();
        let mut input = Harness::go("m/rw.img");
        input.extend(Harness::request(0, 0, 4096, 512));
        input.extend(Harness::request(2, 0, 0, 0)); // DISC
        let answered = h.stream(&input);
        // greeting 18 + GO: info reply 32, ack 20; read reply 16 + 512.
        assert_eq!(answered, 18 + 32 + 20 + 16 + 512);

        let mut input = Harness::go("m/ro.img");
        input.extend(Harness::request(1, 0, 0, 4));
        input.extend(b"abcd");
        h.stream(&input);
        assert!(h.exports.ro.lock().iter().all(|b| *b == 0xa5));
        // A WRITE announcing 32 MiB with 4 bytes behind it: no reply, no panic.
        let mut input = Harness::go("m/rw.img");
        input.extend(Harness::request(1, 0, 0, 32 << 20));
        input.extend(b"abcd");
        assert_eq!(h.stream(&input), 18 + 32 + 20);
    }

    /// With structured replies and `base:allocation`: a zeroed range is a hole in BLOCK
    /// STATUS and in a READ, data is a data chunk; without the meta context BLOCK STATUS is
    /// an error chunk.
    #[test]
    fn a_structured_session_reports_holes() {
        let h = Harness::new().unwrap();
        let mut input = Harness::go_structured("m/rw.img");
        input.extend(Harness::request(6, 0, 0, 8192)); // WRITE_ZEROES
        input.extend(Harness::request(7, 0, 0, 16384)); // BLOCK_STATUS
        input.extend(Harness::request(0, 0, 0, 4096)); // READ of zeros
        input.extend(Harness::request(0, 0, 8192, 512)); // READ of data
        input.extend(Harness::request(2, 0, 0, 0));
        // greeting 18; STRUCTURED_REPLY ack 20; SET_META_CONTEXT: context 20 + 4 + 15, ack
        // 20; GO: info 32, ack 20. Simple reply 16; block status 20 + 4 + 2 * 8; hole 20 +
        // 12; data 20 + 8 + 512.
        let want = 18 + 20 + 39 + 20 + 32 + 20 + 16 + 40 + 32 + 540;
        assert_eq!(h.stream(&input), want);

        // BLOCK_STATUS without the meta context: an error chunk (20 + 4 + 2 + message).
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend_from_slice(b"IHAVEOPT");
        input.extend_from_slice(&8u32.to_be_bytes());
        input.extend_from_slice(&0u32.to_be_bytes());
        input.extend_from_slice(&Harness::go("m/rw.img")[4..]);
        input.extend(Harness::request(7, 0, 0, 4096));
        input.extend(Harness::request(2, 0, 0, 0));
        let message = "NBD_CMD_BLOCK_STATUS needs the base:allocation meta context";
        assert_eq!(h.stream(&input), 18 + 20 + 32 + 20 + 26 + message.len());
    }
}
