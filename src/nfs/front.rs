//! The transport front of the NFS server: everything between a TCP connection and the
//! NFS/MOUNT dispatch.
//!
//! Owns: the accept loop (an address allow-list, a connection limit, no panic on a client that
//! resets at once), ONC RPC record framing with bounded fragment and record sizes (checked
//! before anything is allocated), the calls in flight per connection (a bound, so a client that
//! sends faster than it reads cannot grow memory), the order-free reply writer, and a graceful
//! stop (no new calls; calls in flight are answered; then the connection closes).
//! Also the clocks that keep allowed clients from holding what everyone shares: TCP keepalive
//! on every connection; a connection with no call in flight is closed after [`IDLE_CLOSE`]
//! without a call, and, when every slot is taken, the one idle longest (at least
//! [`EVICT_AFTER`]) is closed to make room for a new one (as knfsd does with its temporary
//! sockets; NFS clients reconnect and resend); a record that stalls halfway, or a reply the
//! client does not take, closes its connection after [`STALL`].
//! Must not: interpret calls (that is `dispatch`).
//!
//! Each connection: this task frames records off the socket and spawns one task per call (at
//! most [`IN_FLIGHT`] at once); each call's reply goes through a channel to a writer task that
//! writes it as one record, READ data straight from the cache's buffers (vectored write).
//! (See docs/decisions/0003-nfs-transport-front.md and 0005-own-nfs-dispatch.md.)

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::budget::{self, Budget, Taken};
use super::dispatch::{self, Reply};
use super::fs::{DatastoreFs, MAX_IO};
use crate::allow::AllowList;

/// Largest fragment accepted: a WRITE of `MAX_IO` bytes plus its RPC and NFS headers.
pub const MAX_FRAGMENT: usize = MAX_IO as usize + 64 * 1024;
/// Largest record (all fragments of one call).
pub const MAX_RECORD: usize = MAX_FRAGMENT;
/// Connections served at once; further ones are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Calls served at once per connection; the next record is read when one is answered.
pub const IN_FLIGHT: usize = 16;
/// At a graceful stop, how long calls in flight get to finish.
const DRAIN: Duration = Duration::from_secs(10);
/// A connection with no call in flight and no call for this long is closed. Hypervisors talk
/// every few seconds (ESXi's heartbeat is every 12 s); a quiet QEMU reconnects by itself.
pub const IDLE_CLOSE: Duration = Duration::from_secs(6 * 60);
/// With every connection slot taken, a connection idle this long may be closed for a new one.
pub const EVICT_AFTER: Duration = Duration::from_secs(1);
/// A record that has started arriving, or a reply being written, that makes no progress for
/// this long closes the connection.
pub const STALL: Duration = Duration::from_secs(60);
/// TCP keepalive: first probe after this long without traffic, then every [`KEEPALIVE_EVERY`]
/// (the kernel gives up after 9 unanswered probes: a vanished host frees its slot in 2.5 min).
const KEEPALIVE_AFTER: Duration = Duration::from_secs(60);
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
/// Bytes read from a connection at a time (calls are small; WRITE data larger than this is
/// read straight into its record).
const READ_BUFFER: usize = 16 * 1024;

/// The NFS (and MOUNT) server on one TCP port.
pub struct NfsServer {
    listener: TcpListener,
    fs: Arc<DatastoreFs>,
    allow: AllowList,
    permits: Arc<Semaphore>,
    undrained: Arc<AtomicBool>,
    conns: Arc<Conns>,
    /// The memory of calls in flight, across connections.
    budget: Budget,
}

/// The connections being served, for closing the one idle longest when every slot is taken.
#[derive(Default)]
struct Conns {
    next: std::sync::atomic::AtomicU64,
    map: std::sync::Mutex<std::collections::HashMap<u64, Arc<ConnState>>>,
}

/// What the accept loop may see of one connection.
struct ConnState {
    /// When its last call arrived or its last reply was written.
    last: std::sync::Mutex<tokio::time::Instant>,
    /// Its calls in flight.
    calls: Arc<Semaphore>,
    /// Closes it, answering the calls in flight first.
    close: CancellationToken,
    /// Cuts it at once (its client does not take its replies and others need the memory).
    cut: CancellationToken,
    /// Since when the reply being written has waited for the client, if one is.
    writing_since: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl ConnState {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
    }

    fn writing(&self, since: Option<tokio::time::Instant>) {
        *self.writing_since.lock().unwrap_or_else(|p| p.into_inner()) = since;
    }

    fn idle_for(&self) -> Option<Duration> {
        // The connection's loop holds one permit while it waits for the next record.
        if self.calls.available_permits() + 1 < IN_FLIGHT {
            return None; // calls in flight: not idle
        }
        Some(
            self.last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed(),
        )
    }
}

impl Conns {
    fn add(&self, state: Arc<ConnState>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, state);
        id
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes the connection idle longest, if one has been idle at least [`EVICT_AFTER`].
    fn evict_idlest(&self) -> bool {
        let map = self.lock();
        let idlest = map
            .values()
            .filter_map(|c| c.idle_for().map(|d| (d, c)))
            .filter(|(d, c)| *d >= EVICT_AFTER && !c.close.is_cancelled())
            .max_by_key(|(d, _)| *d);
        match idlest {
            Some((_, c)) => {
                c.close.cancel();
                true
            }
            None => false,
        }
    }

    /// Cuts the connection whose reply has waited longest for its client, if one has waited
    /// at least [`budget::PRESSURE_AFTER`]: its replies and calls give their memory back.
    fn cut_stalled(&self) {
        let map = self.lock();
        let stalled = map
            .values()
            .filter(|c| !c.cut.is_cancelled())
            .filter_map(|c| {
                let since = *c.writing_since.lock().unwrap_or_else(|p| p.into_inner());
                since.map(|t| (t.elapsed(), c))
            })
            .filter(|(d, _)| *d >= budget::PRESSURE_AFTER)
            .max_by_key(|(d, _)| *d);
        if let Some((d, c)) = stalled {
            tracing::warn!(waited = ?d, "call memory is short: the connection whose client has not taken a reply for longest is cut");
            c.cut.cancel();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Arc<ConnState>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl NfsServer {
    /// Binds the server.
    pub async fn bind(
        addr: SocketAddr,
        fs: Arc<DatastoreFs>,
        allow: AllowList,
    ) -> io::Result<NfsServer> {
        let listener = TcpListener::bind(addr).await?;
        Ok(NfsServer {
            listener,
            fs,
            allow,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            undrained: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Conns::default()),
            budget: Budget::new(0),
        }
        .with_call_memory(budget::DEFAULT_BYTES))
    }

    /// Bounds the memory of calls in flight across connections to `bytes` (default
    /// [`budget::DEFAULT_BYTES`]).
    pub fn with_call_memory(mut self, bytes: usize) -> Self {
        let conns = self.conns.clone();
        self.budget = Budget::new(bytes).on_pressure(Arc::new(move || conns.cut_stalled()));
        self
    }

    /// Set when, at a stop, some connection's calls did not finish within the drain time and
    /// were aborted: a write among them may have been applied after the final sync, so the stop
    /// must not count as clean.
    pub fn undrained(&self) -> Arc<AtomicBool> {
        self.undrained.clone()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    fn shared(&self) -> Shared {
        Shared {
            fs: self.fs.clone(),
            conns: self.conns.clone(),
            undrained: self.undrained.clone(),
            budget: self.budget.clone(),
        }
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
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if !self.allow.allows(peer.ip()) {
                tracing::warn!(%peer, "connection refused: address not allowed (see --allow)");
                continue;
            }
            let permit = match self.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                // Every slot taken: close the connection idle longest and wait (briefly) for
                // its slot, off this loop, so that accepting goes on meanwhile.
                Err(_) if self.conns.evict_idlest() => {
                    let permits = self.permits.clone();
                    let shared = self.shared();
                    let cancel = cancel.child_token();
                    tasks.spawn(async move {
                        // Several newcomers at once wait in turn; one whose slot went to
                        // another closes the next idlest connection, for up to 5 s.
                        let until = tokio::time::Instant::now() + Duration::from_secs(5);
                        let permit = loop {
                            let wait = permits.clone().acquire_owned();
                            match tokio::time::timeout(Duration::from_millis(500), wait).await {
                                Ok(Ok(p)) => break Some(p),
                                Ok(Err(_)) => break None,
                                Err(_) if tokio::time::Instant::now() < until => {
                                    shared.conns.evict_idlest();
                                }
                                Err(_) => break None,
                            }
                        };
                        match permit {
                            Some(permit) => {
                                tracing::info!(%peer, "connection accepted in place of one idle longest");
                                serve_tracked(socket, peer, cancel, shared).await;
                                drop(permit);
                            }
                            None => tracing::warn!(%peer, "connection refused: too many connections"),
                        }
                    });
                    continue;
                }
                Err(_) => {
                    tracing::warn!(%peer, limit = MAX_CONNECTIONS, "connection refused: too many connections, none idle");
                    continue;
                }
            };
            let shared = self.shared();
            let cancel = cancel.child_token();
            tasks.spawn(async move {
                serve_tracked(socket, peer, cancel, shared).await;
                drop(permit);
            });
        }
    }
}

/// What every connection shares.
struct Shared {
    fs: Arc<DatastoreFs>,
    conns: Arc<Conns>,
    undrained: Arc<AtomicBool>,
    budget: Budget,
}

/// Serves one connection, registered in `conns` while it lasts.
async fn serve_tracked(
    socket: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
    shared: Shared,
) {
    let state = Arc::new(ConnState {
        last: std::sync::Mutex::new(tokio::time::Instant::now()),
        calls: Arc::new(Semaphore::new(IN_FLIGHT)),
        close: cancel,
        cut: CancellationToken::new(),
        writing_since: std::sync::Mutex::new(None),
    });
    let id = shared.conns.add(state.clone());
    if !serve_connection(socket, peer, shared.fs, state, shared.budget).await {
        shared.undrained.store(true, Ordering::SeqCst);
    }
    shared.conns.remove(id);
}

/// TCP keepalive, so that a client host that vanished frees its connection.
fn keepalive(socket: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_AFTER)
        .with_interval(KEEPALIVE_EVERY);
    if let Err(e) = socket2::SockRef::from(socket).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

/// Serves one connection until it closes, goes idle, stalls, or `conn.close` fires. Returns
/// false if calls in flight had to be aborted at the end.
async fn serve_connection(
    socket: TcpStream,
    peer: SocketAddr,
    fs: Arc<DatastoreFs>,
    conn: Arc<ConnState>,
    budget: Budget,
) -> bool {
    let _ = socket.set_nodelay(true);
    keepalive(&socket);
    // Either token ends the loop that takes calls; a cut also stops the writer at once.
    let cancel = conn.close.clone();
    let cut = conn.cut.clone();
    let (read, mut write) = socket.into_split();
    // A call's header and arguments in one system call, not one for the record mark and one
    // for the rest.
    let mut read = BufReader::with_capacity(READ_BUFFER, read);
    let (tx, mut rx) = mpsc::channel::<(Reply, OwnedSemaphorePermit)>(IN_FLIGHT);
    let mut writer = tokio::spawn({
        let (conn, cancel) = (conn.clone(), cancel.clone());
        async move {
            while let Some((reply, permit)) = rx.recv().await {
                // A client that does not take its replies closes its connection.
                conn.writing(Some(tokio::time::Instant::now()));
                let written = tokio::select! {
                    r = tokio::time::timeout(STALL, dispatch::write_reply(&mut write, reply)) => r,
                    _ = conn.cut.cancelled() => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "cut: the client does not take its replies and call memory is short",
                        ));
                    }
                };
                conn.writing(None);
                match written {
                    Ok(Ok(())) => conn.touch(),
                    Ok(Err(e)) => {
                        cancel.cancel();
                        return Err(e);
                    }
                    Err(_) => {
                        cancel.cancel();
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the client took no reply bytes for {} s", STALL.as_secs()),
                        ));
                    }
                }
                drop(permit);
            }
            Ok::<_, io::Error>(())
        }
    });
    let in_flight = conn.calls.clone();
    let mut calls = JoinSet::new();
    let ended = loop {
        while calls.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            _ = cut.cancelled() => break Ok(()),
            p = in_flight.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        // Wait for the first byte of the next record (without taking it: `fill_buf` can be
        // cancelled); idle with nothing in flight for IDLE_CLOSE, the connection closes.
        let idle = tokio::time::sleep(IDLE_CLOSE);
        tokio::pin!(idle);
        let arrived = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(false),
                _ = cut.cancelled() => break Ok(false),
                r = read.fill_buf() => break r.map(|b| !b.is_empty()),
                _ = &mut idle => {
                    if in_flight.available_permits() + 1 >= IN_FLIGHT {
                        tracing::debug!(%peer, "idle connection closed");
                        break Ok(false);
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + IDLE_CLOSE);
                }
            }
        };
        match arrived {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
        // A record under way must arrive whole within STALL.
        let record = tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            _ = cut.cancelled() => break Ok(()),
            r = tokio::time::timeout(STALL, read_record(&mut read, &budget)) => match r {
                Ok(r) => r,
                Err(_) => break Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("a record stalled for {} s", STALL.as_secs()),
                )),
            },
        };
        let (record, taken) = match record {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        conn.touch();
        let (fs, tx, budget) = (fs.clone(), tx.clone(), budget.clone());
        calls.spawn(async move {
            let reply = dispatch::handle_within(&fs, &record, peer.ip(), &budget).await;
            // The record's bytes are done with once the call is handled.
            drop((record, taken));
            match reply {
                Some(reply) => {
                    let _ = tx.send((reply, permit)).await;
                }
                None => tracing::debug!(%peer, "record that is not an RPC call ignored"),
            }
        });
    };
    match ended {
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
    // Answer what is in flight (a graceful stop waits for it, bounded), then close. Calls
    // still running after that are aborted, so none finishes after the server's final sync.
    drop(tx);
    let mut drained = true;
    let finish = async { while calls.join_next().await.is_some() {} };
    if tokio::time::timeout(DRAIN, finish).await.is_err() {
        tracing::warn!(%peer, "calls still running at close are aborted; their clients will resend");
        calls.abort_all();
        drained = false;
    }
    match tokio::time::timeout(DRAIN, &mut writer).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::debug!(%peer, error = %e, "reply not sent"),
        Ok(Err(e)) => tracing::error!(%peer, error = %e, "reply writer failed"),
        Err(_) => {
            tracing::warn!(%peer, "client not taking replies at close");
            writer.abort();
        }
    }
    drained
}

/// Reads one whole record (all its fragments), each fragment's bytes taken from `budget`
/// before they are read. `None`: the client closed between records.
pub(crate) async fn read_record(
    read: &mut (impl AsyncRead + Unpin),
    budget: &Budget,
) -> io::Result<Option<(Bytes, Taken)>> {
    let mut record = BytesMut::new();
    let mut taken = Taken::nothing();
    loop {
        let mut header = [0u8; 4];
        match read.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && record.is_empty() => {
                return Ok(None)
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
        taken.merge(budget.take(len).await);
        // The buffer grows with the bytes that arrive, not with the length announced.
        let mut left = len;
        while left > 0 {
            record.reserve(left.min(64 * 1024));
            let n = (&mut *read).take(left as u64).read_buf(&mut record).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            left -= n;
        }
        if last {
            return Ok(Some((record.freeze(), taken)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn fragment(last: bool, body: &[u8]) -> Vec<u8> {
        let mark = (u32::from(last) << 31) | body.len() as u32;
        let mut v = mark.to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    async fn records(stream: &[u8]) -> Vec<io::Result<Option<Vec<u8>>>> {
        let budget = Budget::new(4 * MAX_RECORD);
        let mut r = stream;
        let mut out = Vec::new();
        loop {
            let got = read_record(&mut r, &budget).await;
            let end = !matches!(got, Ok(Some(_)));
            out.push(got.map(|o| o.map(|(b, _)| b.to_vec())));
            if end {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn records_spread_over_fragments_and_empty_fragments_are_put_together() {
        let mut s = fragment(false, b"abc");
        s.extend(fragment(false, b""));
        s.extend(fragment(false, b"defg"));
        s.extend(fragment(true, b"h"));
        // An empty last fragment ends a record too; an empty record is a record.
        s.extend(fragment(false, b"xy"));
        s.extend(fragment(true, b""));
        s.extend(fragment(true, b""));
        let got = records(&s).await;
        assert_eq!(got.len(), 4, "three records, then the end");
        assert_eq!(got[0].as_ref().unwrap().as_deref(), Some(&b"abcdefgh"[..]));
        assert_eq!(got[1].as_ref().unwrap().as_deref(), Some(&b"xy"[..]));
        assert_eq!(got[2].as_ref().unwrap().as_deref(), Some(&b""[..]));
        assert!(matches!(got[3], Ok(None)));
    }

    #[tokio::test]
    async fn a_record_over_the_limit_across_fragments_is_refused_before_it_is_read() {
        // Fragments each within the limit, together over it: refused at the fragment that
        // would cross it, whose bytes were never sent.
        let half = vec![1u8; MAX_RECORD / 2 + 1];
        let mut s = fragment(false, &half);
        s.extend(((MAX_RECORD / 2 + 1) as u32).to_be_bytes());
        let got = records(&s).await;
        let err = got[0].as_ref().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("limit"), "{err}");
        // A fragment announcing 2 GiB is refused the same way, not allocated.
        let s = 0x7fff_ffffu32.to_be_bytes();
        let got = records(&s).await;
        assert_eq!(
            got[0].as_ref().unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        // A stream cut halfway through a fragment is an error, not a short record.
        let mut s = fragment(true, b"abcdef");
        s.truncate(7);
        let got = records(&s).await;
        assert_eq!(
            got[0].as_ref().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
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

    /// Reads one reply record and checks its xid.
    async fn reply_to(s: &mut TcpStream, xid: u32) {
        let mut mark = [0u8; 4];
        s.read_exact(&mut mark).await.expect("a reply");
        let mut body = vec![0u8; (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize];
        s.read_exact(&mut body).await.expect("the reply's body");
        assert_eq!(body[..4], xid.to_be_bytes());
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
