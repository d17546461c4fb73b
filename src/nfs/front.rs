//! The transport front of the NFS server: everything between a TCP connection and nfs3_server's
//! request handling.
//!
//! Owns: the accept loop (an address allow-list, a connection limit, no panic on a client that
//! resets at once), ONC RPC record framing with bounded fragment and record sizes (checked
//! before anything is allocated), a rewrite of MOUNT MNT for the export root (`""` and `"/"`,
//! which libnfs and others send), and shutdown.
//! Must not: interpret NFS calls beyond that; nfs3_server decodes and answers them.
//!
//! Each connection: a reader task frames records off the socket, checks and (for MNT) rewrites
//! them, and queues them to a [`RecordIo`]; nfs3_server's `process_socket` reads whole records
//! from it and writes its replies straight to the socket's write half. One `RPCContext` is made
//! at bind time and cloned per connection, so every connection shares one handle generation.
//! (See docs/decisions/0003-nfs-transport-front.md for why nfs3_server's own listener is not used.)

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use nfs3_server::test_reexports::{process_socket, RPCContext};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fs::{DatastoreFs, MAX_IO};
use super::fsstat;

/// Largest fragment accepted: a WRITE of `MAX_IO` bytes plus its RPC and NFS headers.
pub const MAX_FRAGMENT: usize = MAX_IO as usize + 64 * 1024;
/// Largest record (all fragments of one call).
pub const MAX_RECORD: usize = MAX_FRAGMENT;
/// Connections served at once; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Records queued per connection between the framer and nfs3_server.
const RECORD_QUEUE: usize = 4;

const MOUNT_PROGRAM: u32 = 100_005;
const MOUNTPROC_MNT: u32 = 1;

/// Which client addresses may use the server.
#[derive(Debug, Clone)]
pub struct AllowList(Vec<ipnet::IpNet>);

impl AllowList {
    /// Loopback only: 127.0.0.0/8 and ::1.
    pub fn loopback() -> Self {
        AllowList(vec![
            "127.0.0.0/8"
                .parse()
                .unwrap_or_else(|_| unreachable!("constant")),
            "::1/128"
                .parse()
                .unwrap_or_else(|_| unreachable!("constant")),
        ])
    }

    /// Parses CIDRs (`10.0.0.0/8`) or single addresses.
    pub fn parse(items: &[String]) -> Result<Self, String> {
        let mut nets = Vec::new();
        for s in items {
            let net = s
                .parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("{s:?} is not an address or CIDR such as 10.1.0.0/16"))?;
            nets.push(net);
        }
        Ok(AllowList(nets))
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// The NFS (and MOUNT) server on one TCP port.
pub struct NfsServer {
    listener: TcpListener,
    context: RPCContext<DatastoreFs>,
    export: Arc<String>,
    allow: AllowList,
    permits: Arc<Semaphore>,
    /// Where the mounts' writes land: FSSTAT reports this filesystem's space.
    state_dir: Arc<PathBuf>,
}

impl NfsServer {
    /// Binds the server. `export` is the export path (`/livemount`).
    pub async fn bind(
        addr: SocketAddr,
        fs: Arc<DatastoreFs>,
        export: &str,
        allow: AllowList,
    ) -> io::Result<NfsServer> {
        let listener = TcpListener::bind(addr).await?;
        let export = format!("/{}", export.trim_matches('/'));
        let state_dir = Arc::new(fs.state_dir().to_path_buf());
        let mut context = RPCContext::test_ctx(&export, fs);
        context.local_port = listener.local_addr()?.port();
        Ok(NfsServer {
            listener,
            context,
            export: Arc::new(export),
            allow,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            state_dir,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `cancel` fires. Connection tasks are tracked by `tasks`.
    pub async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                a = self.listener.accept() => a,
            };
            let (socket, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Per-connection failures (a reset before accept completes, no file
                    // descriptors left): log, pause briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if !self.allow.allows(peer.ip()) {
                tracing::warn!(%peer, "connection refused: address not allowed (see --allow)");
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = MAX_CONNECTIONS, "connection refused: too many connections");
                continue;
            };
            let mut context = self.context.clone();
            context.client_addr = peer.to_string();
            let export = self.export.clone();
            let state_dir = self.state_dir.clone();
            let cancel = cancel.child_token();
            tasks.spawn(async move {
                serve_connection(socket, peer, context, export, state_dir, cancel).await;
                drop(permit);
            });
        }
    }
}

async fn serve_connection(
    socket: TcpStream,
    peer: SocketAddr,
    context: RPCContext<DatastoreFs>,
    export: Arc<String>,
    state_dir: Arc<PathBuf>,
    cancel: CancellationToken,
) {
    let _ = socket.set_nodelay(true);
    let (read, write) = socket.into_split();
    let (tx, rx) = mpsc::channel(RECORD_QUEUE);
    let pending = Arc::new(fsstat::Pending::default());
    let calls = pending.clone();
    let framer = tokio::spawn(async move {
        match frame_records(read, tx, &export, &calls).await {
            Ok(()) => {}
            // Clients close by resetting as often as not.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
                ) =>
            {
                tracing::debug!(%peer, error = %e, "connection closed");
            }
            Err(e) => tracing::warn!(%peer, error = %e, "connection closed"),
        }
    });
    let io = RecordIo {
        rx,
        current: Bytes::new(),
        write,
        assembling: Vec::new(),
        streaming: 0,
        sending: Vec::new(),
        sent: 0,
        owed: 0,
        continuation: false,
        pending,
        state_dir,
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        r = process_socket(io, context) => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        }
    }
    framer.abort();
}

/// Reads records off the socket until it closes or misbehaves, and queues them, re-framed as one
/// fragment each, for nfs3_server.
async fn frame_records(
    mut read: OwnedReadHalf,
    tx: mpsc::Sender<Bytes>,
    export: &str,
    fsstat_calls: &fsstat::Pending,
) -> io::Result<()> {
    loop {
        let mut record = BytesMut::new();
        loop {
            let mut header = [0u8; 4];
            match read.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && record.is_empty() => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
            let h = u32::from_be_bytes(header);
            let last = h & 0x8000_0000 != 0;
            let len = (h & 0x7fff_ffff) as usize;
            if len > MAX_FRAGMENT || record.len() + len > MAX_RECORD {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("record fragment of {len} bytes is over the {MAX_RECORD}-byte limit"),
                ));
            }
            let start = record.len();
            record.resize(start + len, 0);
            read.read_exact(&mut record[start..]).await?;
            if last {
                break;
            }
        }
        fsstat_calls.note_call(&record);
        let body = rewrite_mount_root(record.freeze(), export);
        let mut framed = BytesMut::with_capacity(body.len() + 4);
        framed.put_u32(0x8000_0000 | body.len() as u32);
        framed.extend_from_slice(&body);
        if tx.send(framed.freeze()).await.is_err() {
            return Ok(());
        }
    }
}

/// A MOUNT MNT of `""` or `"/"` names the export root: rewrite it to the export's path, which is
/// what nfs3_server answers. Every other record passes unchanged, malformed ones included
/// (nfs3_server answers those with the right RPC error).
fn rewrite_mount_root(record: Bytes, export: &str) -> Bytes {
    let Some((args_at, path)) = mnt_path(&record) else {
        return record;
    };
    if !(path.is_empty() || path == b"/") {
        return record;
    }
    let old_len = 4 + path.len().div_ceil(4) * 4;
    let mut out = BytesMut::with_capacity(record.len() + export.len() + 4);
    out.extend_from_slice(&record[..args_at]);
    put_xdr_string(&mut out, export.as_bytes());
    out.extend_from_slice(&record[args_at + old_len..]);
    out.freeze()
}

/// For a MOUNT MNT call: where its argument starts and the path it asks for.
fn mnt_path(record: &[u8]) -> Option<(usize, &[u8])> {
    let mut r = record;
    let word = |r: &mut &[u8]| -> Option<u32> { (r.len() >= 4).then(|| r.get_u32()) };
    let _xid = word(&mut r)?;
    let msg_type = word(&mut r)?;
    let rpcvers = word(&mut r)?;
    let prog = word(&mut r)?;
    let _vers = word(&mut r)?;
    let proc_ = word(&mut r)?;
    if msg_type != 0 || rpcvers != 2 || prog != MOUNT_PROGRAM || proc_ != MOUNTPROC_MNT {
        return None;
    }
    for _ in 0..2 {
        // credential, then verifier: flavor, opaque body of at most 400 bytes.
        let _flavor = word(&mut r)?;
        let len = word(&mut r)? as usize;
        let padded = len.checked_next_multiple_of(4)?;
        if len > 400 || r.len() < padded {
            return None;
        }
        r.advance(padded);
    }
    let args_at = record.len() - r.len();
    let len = word(&mut r)? as usize;
    if len > 1024 || r.len() < len {
        return None;
    }
    Some((args_at, &r[..len]))
}

fn put_xdr_string(out: &mut BytesMut, s: &[u8]) {
    out.put_u32(s.len() as u32);
    out.extend_from_slice(s);
    out.put_bytes(0, s.len().next_multiple_of(4) - s.len());
}

/// Replies up to this size are assembled whole so that FSSTAT replies can be corrected; larger
/// ones (READ data) stream straight to the socket.
const SMALL_REPLY: usize = 512;

/// The stream nfs3_server reads and writes: whole records in; replies out to the socket, small
/// ones assembled first so that [`fsstat::Pending`] can correct FSSTAT figures.
///
/// Write-side rule: a `poll_write` that returns `Pending` has not consumed the caller's bytes
/// (the caller retries with the same slice); bytes absorbed into a record that could not be
/// sent yet are `owed` and acknowledged on the next call, once the record is out.
struct RecordIo {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
    write: OwnedWriteHalf,
    /// The reply fragment being assembled (header first).
    assembling: Vec<u8>,
    /// Body bytes of a large fragment still to pass straight through.
    streaming: usize,
    /// A complete small reply going out, and how much of it has.
    sending: Vec<u8>,
    sent: usize,
    owed: usize,
    /// The previous fragment was not the last of its record.
    continuation: bool,
    pending: Arc<fsstat::Pending>,
    state_dir: Arc<PathBuf>,
}

impl AsyncRead for RecordIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.current.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => self.current = b,
                Poll::Ready(None) => return Poll::Ready(Ok(())), // end of stream
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.current.len().min(buf.remaining());
        buf.put_slice(&self.current[..n]);
        self.current.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for RecordIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            // 1. A complete small reply (or a large one's header) goes out first.
            if this.sent < this.sending.len() {
                match Pin::new(&mut this.write).poll_write(cx, &this.sending[this.sent..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => this.sent += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
                continue;
            }
            if this.owed > 0 {
                return Poll::Ready(Ok(std::mem::take(&mut this.owed)));
            }
            // 2. The body of a large reply passes straight through.
            if this.streaming > 0 {
                let n = buf.len().min(this.streaming);
                return match Pin::new(&mut this.write).poll_write(cx, &buf[..n]) {
                    Poll::Ready(Ok(w)) => {
                        this.streaming -= w;
                        Poll::Ready(Ok(w))
                    }
                    other => other,
                };
            }
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            // 3. Absorb bytes of the next fragment: its header, then (if small) its body.
            let have = this.assembling.len();
            let take = if have < 4 {
                (4 - have).min(buf.len())
            } else {
                (4 + frag_len(&this.assembling) - have).min(buf.len())
            };
            this.assembling.extend_from_slice(&buf[..take]);
            if this.assembling.len() < 4 {
                return Poll::Ready(Ok(take));
            }
            let len = frag_len(&this.assembling);
            let last = this.assembling[0] & 0x80 != 0;
            if this.assembling.len() == 4 && len > SMALL_REPLY {
                // Large: send the header, then stream the body.
                this.sending = std::mem::take(&mut this.assembling);
                this.sent = 0;
                this.owed = take;
                this.streaming = len;
                this.continuation = !last;
                continue;
            }
            if this.assembling.len() < 4 + len {
                return Poll::Ready(Ok(take));
            }
            let mut record = std::mem::take(&mut this.assembling);
            if !this.continuation {
                let dir = this.state_dir.clone();
                this.pending
                    .patch_reply(&mut record[4..], || fsstat::space(&dir));
            }
            this.continuation = !last;
            this.sending = record;
            this.sent = 0;
            this.owed = take;
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.sent < this.sending.len() {
            match Pin::new(&mut this.write).poll_write(cx, &this.sending[this.sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => this.sent += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut this.write).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.write).poll_shutdown(cx)
    }
}

/// The length in a fragment header (the first four bytes of `b`).
fn frag_len(b: &[u8]) -> usize {
    (u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mnt_call(path: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        for w in [7u32, 0, 2, MOUNT_PROGRAM, 3, MOUNTPROC_MNT] {
            b.put_u32(w);
        }
        // AUTH_SYS credential of 20 bytes, AUTH_NONE verifier.
        b.put_u32(1);
        b.put_u32(20);
        b.put_bytes(0xab, 20);
        b.put_u32(0);
        b.put_u32(0);
        put_xdr_string(&mut b, path);
        b.freeze()
    }

    #[test]
    fn mnt_of_export_root_is_rewritten_to_the_export() {
        for root in [&b""[..], b"/"] {
            let out = rewrite_mount_root(mnt_call(root), "/livemount");
            assert_eq!(out, mnt_call(b"/livemount"));
        }
        let other = mnt_call(b"/livemount/web01");
        assert_eq!(rewrite_mount_root(other.clone(), "/livemount"), other);
    }

    #[test]
    fn malformed_records_pass_unchanged_and_never_panic() {
        let good = mnt_call(b"");
        for cut in 0..good.len() {
            let r = good.slice(..cut);
            assert_eq!(rewrite_mount_root(r.clone(), "/x"), r, "cut at {cut}");
        }
        let mut huge = BytesMut::from(&good[..]);
        huge[28..32].copy_from_slice(&u32::MAX.to_be_bytes()); // credential length
        assert_eq!(
            rewrite_mount_root(huge.clone().freeze(), "/x"),
            huge.freeze()
        );
    }

    #[test]
    fn allow_list_matches_cidrs_and_mapped_addresses() {
        let l = AllowList::loopback();
        assert!(l.allows("127.0.0.1".parse().unwrap()));
        assert!(l.allows("127.8.9.1".parse().unwrap()));
        assert!(l.allows("::1".parse().unwrap()));
        assert!(l.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!l.allows("10.0.0.1".parse().unwrap()));
        let l = AllowList::parse(&["10.1.0.0/16".into(), "192.0.2.7".into()]).unwrap();
        assert!(l.allows("10.1.2.3".parse().unwrap()));
        assert!(l.allows("192.0.2.7".parse().unwrap()));
        assert!(!l.allows("192.0.2.8".parse().unwrap()));
        assert!(AllowList::parse(&["10.0.0.0/33".into()]).is_err());
    }
}
