//! The NFS server: the RPC front (`front.rs`) with the NFS and MOUNT programs (`dispatch.rs`)
//! behind it, on one TCP port, and the limits NFS clients need.
//!
//! Owns: NFS's [`LIMITS`] (a record as large as a WRITE of [`MAX_IO`] bytes, 256 connections,
//! 16 calls in flight each, idle connections closed after 6 min and the idlest closed for a
//! newcomer when every slot is taken, 60 s for a stalled record or an untaken reply, 256 MiB of
//! call memory) and [`NfsServer`], which binds and runs the front with them.
//! Must not: frame, accept or answer calls itself (the front and dispatch do).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::budget;
use super::front::{Limits, RpcServer};
use super::fs::{DatastoreFs, MAX_IO};
use crate::allow::AllowList;

/// Largest fragment accepted: a WRITE of `MAX_IO` bytes plus its RPC and NFS headers.
pub const MAX_FRAGMENT: usize = MAX_IO as usize + 64 * 1024;
/// Largest record (all fragments of one call).
pub const MAX_RECORD: usize = MAX_FRAGMENT;
/// Connections served at once; further ones are closed at once (unless one idle for
/// [`EVICT_AFTER`] makes room).
pub const MAX_CONNECTIONS: usize = 256;
/// Calls served at once per connection; the next record is read when one is answered.
pub const IN_FLIGHT: usize = 16;
/// A connection with no call in flight and no call for this long is closed. Hypervisors talk
/// every few seconds (ESXi's heartbeat is every 12 s); a quiet QEMU reconnects by itself.
pub const IDLE_CLOSE: Duration = Duration::from_secs(6 * 60);
/// With every connection slot taken, a connection idle this long may be closed for a new one.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);
/// A record that has started arriving, or a reply being written, that makes no progress for
/// this long closes the connection.
pub const STALL: Duration = Duration::from_secs(60);

/// NFS's limits on the front.
pub const LIMITS: Limits = Limits {
    max_record: MAX_RECORD,
    max_connections: MAX_CONNECTIONS,
    in_flight: IN_FLIGHT,
    idle_close: IDLE_CLOSE,
    stall: STALL,
    evict_after: Some(EVICT_AFTER),
    call_memory: budget::DEFAULT_BYTES,
};

/// The NFS (and MOUNT) server on one TCP port.
pub struct NfsServer(RpcServer<DatastoreFs>);

impl NfsServer {
    /// Binds the server.
    pub async fn bind(
        addr: SocketAddr,
        fs: Arc<DatastoreFs>,
        allow: AllowList,
    ) -> io::Result<NfsServer> {
        RpcServer::bind(addr, fs, allow, LIMITS)
            .await
            .map(NfsServer)
    }

    /// Bounds the memory of calls in flight across connections to `bytes` (default
    /// [`budget::DEFAULT_BYTES`]).
    pub fn with_call_memory(self, bytes: usize) -> Self {
        NfsServer(self.0.with_call_memory(bytes))
    }

    /// Set when, at a stop, some connection's calls did not finish within the drain time and
    /// were aborted: a write among them may have been applied after the final sync, so the stop
    /// must not count as clean.
    pub fn undrained(&self) -> Arc<AtomicBool> {
        self.0.undrained()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    /// Serves until `cancel` fires. Connection tasks are tracked by `tasks`.
    pub async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        self.0.run(cancel, tasks).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfs::dispatch;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn fragment(last: bool, body: &[u8]) -> Vec<u8> {
        let mark = (u32::from(last) << 31) | body.len() as u32;
        let mut v = mark.to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    /// A server over an agent with no mounts, on 127.0.0.1, and the folder holding its
    /// repository and state. (The clocks below need nothing mounted.)
    async fn server() -> (SocketAddr, CancellationToken, tempfile::TempDir) {
        use crate::repo::{ChunkSize, Repository};
        let dir = tempfile::tempdir().unwrap();
        let repo =
            Repository::init(&dir.path().join("repo"), ChunkSize::new(64 * 1024).unwrap()).unwrap();
        let agent = super::super::fuzzing::agent(repo, dir.path())
            .await
            .unwrap();
        let identity = super::super::handle::Identity::fixed(*b"clocktst", *b"verifier");
        let fs = Arc::new(DatastoreFs::new(Arc::new(agent), false, identity));
        let (addr, cancel) = serve_fs(fs).await;
        (addr, cancel, dir)
    }

    /// An NFS server over `fs` on 127.0.0.1, running until the token is cancelled.
    async fn serve_fs(fs: Arc<DatastoreFs>) -> (SocketAddr, CancellationToken) {
        let server = NfsServer::bind("127.0.0.1:0".parse().unwrap(), fs, AllowList::loopback())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(server.run(cancel.clone(), TaskTracker::new()));
        (addr, cancel)
    }

    /// NFS NULL as one record.
    fn null_call(xid: u32) -> Vec<u8> {
        let call = super::super::fuzzing::call_record(xid, dispatch::NFS_PROGRAM, 3, 0, &[]);
        fragment(true, &call)
    }

    /// Reads one reply record, checks its xid, returns it.
    async fn reply_to(s: &mut TcpStream, xid: u32) -> Vec<u8> {
        let mut mark = [0u8; 4];
        s.read_exact(&mut mark).await.expect("a reply");
        let mut body = vec![0u8; (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize];
        s.read_exact(&mut body).await.expect("the reply's body");
        assert_eq!(body[..4], xid.to_be_bytes());
        body
    }

    /// The front hands NFS the credential as it came (the portmapper takes any); NFS answers
    /// an AUTH_SYS body that does not parse with AUTH_ERROR/AUTH_BADCRED, and the connection
    /// goes on serving.
    #[tokio::test]
    async fn an_auth_sys_body_that_does_not_parse_is_answered_auth_badcred() {
        let (addr, cancel, _dir) = server().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut call = super::super::fuzzing::call_record(9, dispatch::NFS_PROGRAM, 3, 0, &[]);
        call[52..56].copy_from_slice(&17u32.to_be_bytes()); // 17 gids: over the 16 allowed
        s.write_all(&fragment(true, &call)).await.unwrap();
        let reply = reply_to(&mut s, 9).await;
        let words: Vec<u32> = reply
            .chunks(4)
            .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
            .collect();
        // xid, REPLY, MSG_DENIED, AUTH_ERROR, AUTH_BADCRED.
        assert_eq!(words, [9, 1, 1, 1, 1]);
        s.write_all(&null_call(10)).await.unwrap();
        reply_to(&mut s, 10).await;
        cancel.cancel();
    }

    /// How long until the server closes the connection (reading and dropping what comes).
    async fn time_to_close(s: &mut TcpStream) -> Duration {
        let t = tokio::time::Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return t.elapsed(),
                Ok(_) => {}
            }
        }
    }

    /// A connection that talks every 5 min stays open however long it lives; one that falls
    /// silent is closed IDLE_CLOSE after its last call, not before. (Paused clock: the
    /// minutes pass at once.)
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_idle_close_and_a_talking_one_is_not() {
        let (addr, cancel, _dir) = server().await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        for xid in 1..=4 {
            s.write_all(&null_call(xid)).await.unwrap();
            reply_to(&mut s, xid).await;
            tokio::time::sleep(Duration::from_secs(5 * 60)).await;
        }
        // 20 minutes of a call every 5: still served. Then silence.
        s.write_all(&null_call(5)).await.unwrap();
        reply_to(&mut s, 5).await;
        let closed = time_to_close(&mut s).await;
        assert!(
            closed >= IDLE_CLOSE && closed < IDLE_CLOSE + Duration::from_secs(1),
            "closed {closed:?} after its last call, not at {IDLE_CLOSE:?}"
        );
        // A connection that never sent a call is closed the same way.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let closed = time_to_close(&mut s).await;
        assert!(closed >= IDLE_CLOSE && closed < IDLE_CLOSE + Duration::from_secs(1));
        cancel.cancel();
    }

    /// A record that stops halfway closes its connection after STALL, not at IDLE_CLOSE and
    /// not before; a record that arrives slowly but keeps coming within STALL is served.
    #[tokio::test(start_paused = true)]
    async fn a_record_that_stalls_halfway_closes_its_connection_after_stall() {
        let (addr, cancel, _dir) = server().await;
        let call = null_call(7);
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Slow but whole: 16 bytes every 10 s, the record whole within STALL.
        let t = tokio::time::Instant::now();
        for (i, piece) in call.chunks(16).enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
            s.write_all(piece).await.unwrap();
        }
        assert!(t.elapsed() >= Duration::from_secs(30) && t.elapsed() < STALL);
        reply_to(&mut s, 7).await;
        // Half a record, then nothing.
        s.write_all(&call[..call.len() / 2]).await.unwrap();
        let closed = time_to_close(&mut s).await;
        assert!(
            closed >= STALL && closed < STALL + Duration::from_secs(1),
            "a stalled record closed its connection after {closed:?}, not {STALL:?}"
        );
        cancel.cancel();
    }

    /// 16 READs of 1 MiB sent by a client whose socket takes 4 KiB at a time and which
    /// reads nothing: the reply writer waits STALL, then the connection closes. A client
    /// that starts taking its replies before that gets them all.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_no_reply_is_cut_at_stall() {
        use bytes::BufMut;
        let dir = tempfile::tempdir().unwrap();
        let fs = super::super::fuzzing::one_mount(dir.path()).await.unwrap();
        let (_, disk) = super::super::fuzzing::handles(&fs);
        let (addr, cancel) = serve_fs(fs).await;
        let reads = || {
            let mut v = Vec::new();
            for i in 0..16u32 {
                let mut args = bytes::BytesMut::new();
                super::super::rpc::put_opaque(&mut args, &disk);
                args.put_u64(u64::from(i % 2) << 20);
                args.put_u32(1 << 20);
                let call =
                    super::super::fuzzing::call_record(100 + i, dispatch::NFS_PROGRAM, 3, 6, &args);
                v.extend(fragment(true, &call));
            }
            v
        };
        let connect = || async {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_recv_buffer_size(4096).unwrap();
            sock.connect(addr).await.unwrap()
        };
        // Everything a client reads until the connection ends.
        async fn drain(s: &mut TcpStream) -> usize {
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0;
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        }
        let whole = 16 * (1 << 20);

        // Taking the replies just before STALL: all of them arrive.
        // The clocks start when the first reply starts to arrive (the reads are fetched on
        // the blocking pool first, and a paused clock can move on meanwhile).
        let mut s = connect().await;
        s.write_all(&reads()).await.unwrap();
        s.peek(&mut [0u8; 1]).await.unwrap();
        tokio::time::sleep(STALL - Duration::from_secs(1)).await;
        // A ticker: when the runtime waits for the kernel between two socket reads, the
        // paused clock moves on by 10 ms, not to the writer's next deadline.
        let ticker = tokio::spawn(async {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 20];
        while got < whole {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed after {got} bytes");
            got += n;
        }
        ticker.abort();
        drop(s);

        // Taking nothing until just after STALL: the connection is gone, the replies cut.
        let mut s = connect().await;
        s.write_all(&reads()).await.unwrap();
        s.peek(&mut [0u8; 1]).await.unwrap();
        tokio::time::sleep(STALL + Duration::from_secs(1)).await;
        let got = drain(&mut s).await;
        assert!(got < whole, "{got} bytes: every reply was written");
        cancel.cancel();
    }
}
