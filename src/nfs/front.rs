//! The transport front of the ONC RPC servers here: NFS (with MOUNT) and the portmapper.
//! Everything between a TCP connection (or a UDP datagram) and the service that answers calls.
//!
//! Owns: the accept loop (an address allow-list, a connection limit, no panic on a client that
//! resets at once), ONC RPC record framing with bounded fragment and record sizes (checked
//! before anything is allocated), decoding each call's header once (`rpc::parse_call`) and
//! answering the records no service can (RPC version other than 2, a malformed credential or
//! verifier; a record that is no call at all is dropped), the calls in flight per connection
//! (a bound, so a client that sends faster than it reads cannot grow memory), the order-free
//! reply writer, and a graceful stop (no new calls; calls in flight are answered; then the
//! connection closes). Also the clocks that keep allowed clients from holding what everyone
//! shares: TCP keepalive on every connection; a connection with no call in flight is closed
//! after [`Limits::idle_close`] without a call and, if the service's limits say so, when every
//! slot is taken the one idle longest (at least [`Limits::evict_after`]) is closed to make room
//! for a new one (as knfsd does with its temporary sockets; NFS clients reconnect and resend);
//! a record that stalls halfway, or a reply the client does not take, closes its connection
//! after [`Limits::stall`]. And a UDP responder ([`serve_udp`]): one call a datagram, the same
//! header decoder and allow-list.
//! Must not: interpret calls: that is the [`RpcService`] (NFS and MOUNT in `dispatch`, the
//! portmapper in `portmap`), which gets the parsed header and the argument bytes and returns
//! the reply. Each service brings its own [`Limits`] (NFS's in `server.rs`).
//!
//! Each connection: this task frames records off the socket and spawns one task per call (at
//! most [`Limits::in_flight`] at once); each call's reply goes through a channel to a writer
//! task that writes it as one record, READ data straight from the cache's buffers (vectored
//! write). (See docs/decisions/0003-nfs-transport-front.md and 0005-own-nfs-dispatch.md.)

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::budget::{self, Budget, Taken};
use super::rpc::{self, Call};
use crate::allow::AllowList;

/// At a graceful stop, how long calls in flight get to finish.
const DRAIN: Duration = Duration::from_secs(10);
/// TCP keepalive: first probe after this long without traffic, then every [`KEEPALIVE_EVERY`]
/// (the kernel gives up after 9 unanswered probes: a vanished host frees its slot in 2.5 min).
const KEEPALIVE_AFTER: Duration = Duration::from_secs(60);
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
/// Bytes read from a connection at a time (calls are small; WRITE data larger than this is
/// read straight into its record).
const READ_BUFFER: usize = 16 * 1024;

/// A service's limits on the front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest record (all fragments of one call), and so largest fragment, in bytes.
    pub max_record: usize,
    /// Connections served at once; further ones are closed at once (unless one idle for
    /// [`Limits::evict_after`] makes room).
    pub max_connections: usize,
    /// Calls served at once per connection; the next record is read when one is answered.
    pub in_flight: usize,
    /// A connection with no call in flight and no call for this long is closed.
    pub idle_close: Duration,
    /// A record that has started arriving, or a reply being written, that makes no progress
    /// for this long closes the connection.
    pub stall: Duration,
    /// With every connection slot taken, a connection idle this long may be closed for a new
    /// one; `None`: newcomers are refused.
    pub evict_after: Option<Duration>,
    /// The memory of calls in flight across connections (see `budget.rs`), in bytes.
    pub call_memory: usize,
}

/// How a call arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Where a call came from and arrived at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub peer: SocketAddr,
    /// Our address as the caller reached it (TCP); `None` for UDP on a socket that does not
    /// say which of its addresses a datagram came to.
    pub local: Option<SocketAddr>,
    pub transport: Transport,
}

/// A reply: its header and results, then (for an NFS READ) data that goes out as it is,
/// followed by XDR padding.
#[derive(Debug)]
pub struct Reply {
    pub head: BytesMut,
    pub data: Bytes,
    /// The budget a READ's data holds until the reply is written.
    pub taken: Option<Taken>,
}

impl Reply {
    /// A reply that is all header and results.
    pub fn new(head: BytesMut) -> Self {
        Reply {
            head,
            data: Bytes::new(),
            taken: None,
        }
    }

    /// Length of the whole reply on the wire (without the record mark).
    pub fn wire_len(&self) -> usize {
        self.head.len() + self.data.len().next_multiple_of(4)
    }
}

/// What answers calls behind the front: one ONC RPC program (or a few on one port).
pub trait RpcService: Send + Sync + 'static {
    /// Names the service in log lines.
    const NAME: &'static str;

    /// Answers one call whose header the front decoded. `None`: no reply at all. A READ
    /// waits for room in `budget` for its data before it reads.
    fn call<'a>(
        &'a self,
        call: Call<'a>,
        caller: &'a Caller,
        budget: &'a Budget,
    ) -> impl Future<Output = Option<Reply>> + Send + 'a;
}

/// Answers one record (a TCP record or a UDP datagram): decodes its header, answers what the
/// header alone settles, hands the rest to `service`. `None`: nothing can be answered.
pub async fn answer<S: RpcService>(
    service: &S,
    record: &[u8],
    caller: &Caller,
    budget: &Budget,
) -> Option<Reply> {
    match rpc::parse_call(record) {
        Ok(call) => service.call(call, caller, budget).await,
        Err(bad) => {
            tracing::debug!(peer = %caller.peer, service = S::NAME, ?bad, "call refused by its header");
            rpc::reply_to_bad_call(&bad).map(Reply::new)
        }
    }
}

/// An RPC server on one TCP port.
pub struct RpcServer<S> {
    listener: TcpListener,
    service: Arc<S>,
    allow: AllowList,
    limits: Limits,
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
    /// Its calls in flight, and how many it may have.
    calls: Arc<Semaphore>,
    in_flight: usize,
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
        if self.calls.available_permits() + 1 < self.in_flight {
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

    /// Closes the connection idle longest, if one has been idle at least `after`.
    fn evict_idlest(&self, after: Duration) -> bool {
        let map = self.lock();
        let idlest = map
            .values()
            .filter_map(|c| c.idle_for().map(|d| (d, c)))
            .filter(|(d, c)| *d >= after && !c.close.is_cancelled())
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

impl<S: RpcService> RpcServer<S> {
    /// Binds the server.
    pub async fn bind(
        addr: SocketAddr,
        service: Arc<S>,
        allow: AllowList,
        limits: Limits,
    ) -> io::Result<RpcServer<S>> {
        let listener = TcpListener::bind(addr).await?;
        Ok(RpcServer::on(listener, service, allow, limits))
    }

    /// The server on a listener already bound.
    pub fn on(
        listener: TcpListener,
        service: Arc<S>,
        allow: AllowList,
        mut limits: Limits,
    ) -> RpcServer<S> {
        // A connection that may have no call in flight could never be served.
        limits.in_flight = limits.in_flight.max(1);
        RpcServer {
            listener,
            service,
            allow,
            limits,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            undrained: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Conns::default()),
            budget: Budget::new(0),
        }
        .with_call_memory(limits.call_memory)
    }

    /// Bounds the memory of calls in flight across connections to `bytes` (default
    /// [`Limits::call_memory`]).
    pub fn with_call_memory(mut self, bytes: usize) -> Self {
        let conns = self.conns.clone();
        self.limits.call_memory = bytes;
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

    fn shared(&self) -> Shared<S> {
        Shared {
            service: self.service.clone(),
            limits: self.limits,
            conns: self.conns.clone(),
            undrained: self.undrained.clone(),
            budget: self.budget.clone(),
        }
    }

    /// Serves until `cancel` fires. Connection tasks are tracked by `tasks`.
    pub async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        let name = S::NAME;
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
                    tracing::warn!(service = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if !self.allow.allows(peer.ip()) {
                tracing::warn!(service = name, %peer, "connection refused: address not allowed (see --allow)");
                continue;
            }
            let evict_after = self.limits.evict_after;
            let permit = match self.permits.clone().try_acquire_owned() {
                Ok(p) => p,
                // Every slot taken: close the connection idle longest and wait (briefly) for
                // its slot, off this loop, so that accepting goes on meanwhile.
                Err(_) if evict_after.is_some_and(|after| self.conns.evict_idlest(after)) => {
                    let after = evict_after.unwrap_or_default();
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
                                    shared.conns.evict_idlest(after);
                                }
                                Err(_) => break None,
                            }
                        };
                        match permit {
                            Some(permit) => {
                                tracing::info!(service = name, %peer, "connection accepted in place of one idle longest");
                                serve_tracked(socket, peer, cancel, shared).await;
                                drop(permit);
                            }
                            None => tracing::warn!(service = name, %peer, "connection refused: too many connections"),
                        }
                    });
                    continue;
                }
                Err(_) => {
                    tracing::warn!(service = name, %peer, limit = self.limits.max_connections, "connection refused: too many connections, none idle");
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
struct Shared<S> {
    service: Arc<S>,
    limits: Limits,
    conns: Arc<Conns>,
    undrained: Arc<AtomicBool>,
    budget: Budget,
}

/// Serves one connection, registered in `conns` while it lasts.
async fn serve_tracked<S: RpcService>(
    socket: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
    shared: Shared<S>,
) {
    let state = Arc::new(ConnState {
        last: std::sync::Mutex::new(tokio::time::Instant::now()),
        calls: Arc::new(Semaphore::new(shared.limits.in_flight)),
        in_flight: shared.limits.in_flight,
        close: cancel,
        cut: CancellationToken::new(),
        writing_since: std::sync::Mutex::new(None),
    });
    let id = shared.conns.add(state.clone());
    let drained = serve_connection(
        socket,
        peer,
        shared.service,
        state,
        shared.budget,
        &shared.limits,
    )
    .await;
    if !drained {
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
async fn serve_connection<S: RpcService>(
    socket: TcpStream,
    peer: SocketAddr,
    service: Arc<S>,
    conn: Arc<ConnState>,
    budget: Budget,
    limits: &Limits,
) -> bool {
    let _ = socket.set_nodelay(true);
    keepalive(&socket);
    let caller = Caller {
        peer,
        local: socket.local_addr().ok(),
        transport: Transport::Tcp,
    };
    let Limits {
        max_record,
        in_flight: most,
        idle_close,
        stall,
        ..
    } = *limits;
    // Either token ends the loop that takes calls; a cut also stops the writer at once.
    let cancel = conn.close.clone();
    let cut = conn.cut.clone();
    let (read, mut write) = socket.into_split();
    // A call's header and arguments in one system call, not one for the record mark and one
    // for the rest.
    let mut read = BufReader::with_capacity(READ_BUFFER, read);
    let (tx, mut rx) = mpsc::channel::<(Reply, OwnedSemaphorePermit)>(most);
    let mut writer = tokio::spawn({
        let (conn, cancel) = (conn.clone(), cancel.clone());
        async move {
            while let Some((reply, permit)) = rx.recv().await {
                // A client that does not take its replies closes its connection.
                conn.writing(Some(tokio::time::Instant::now()));
                let written = tokio::select! {
                    r = tokio::time::timeout(stall, write_reply(&mut write, reply)) => r,
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
                            format!("the client took no reply bytes for {} s", stall.as_secs()),
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
        // cancelled); idle with nothing in flight for `idle_close`, the connection closes.
        let idle = tokio::time::sleep(idle_close);
        tokio::pin!(idle);
        let arrived = loop {
            tokio::select! {
                _ = cancel.cancelled() => break Ok(false),
                _ = cut.cancelled() => break Ok(false),
                r = read.fill_buf() => break r.map(|b| !b.is_empty()),
                _ = &mut idle => {
                    if in_flight.available_permits() + 1 >= most {
                        tracing::debug!(%peer, "idle connection closed");
                        break Ok(false);
                    }
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_close);
                }
            }
        };
        match arrived {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(e),
        }
        // A record under way must arrive whole within `stall`.
        let record = tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            _ = cut.cancelled() => break Ok(()),
            r = tokio::time::timeout(stall, read_record(&mut read, &budget, max_record)) => match r {
                Ok(r) => r,
                Err(_) => break Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("a record stalled for {} s", stall.as_secs()),
                )),
            },
        };
        let (record, taken) = match record {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        conn.touch();
        let (service, tx, budget) = (service.clone(), tx.clone(), budget.clone());
        calls.spawn(async move {
            let reply = answer(&*service, &record, &caller, &budget).await;
            // The record's bytes are done with once the call is handled.
            drop((record, taken));
            match reply {
                Some(reply) => {
                    let _ = tx.send((reply, permit)).await;
                }
                None => tracing::debug!(service = S::NAME, %peer, "record that is not an RPC call ignored"),
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

/// Reads one whole record (all its fragments, together at most `max_record` bytes), each
/// fragment's bytes taken from `budget` before they are read. `None`: the client closed
/// between records.
pub(crate) async fn read_record(
    read: &mut (impl AsyncRead + Unpin),
    budget: &Budget,
    max_record: usize,
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
        if len > max_record || record.len() + len > max_record {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("record fragment of {len} bytes is over the {max_record}-byte limit"),
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

/// Writes a reply as one record (record mark, head, data, padding), vectored.
pub async fn write_reply<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    reply: Reply,
) -> io::Result<()> {
    use bytes::Buf;
    use tokio::io::AsyncWriteExt;
    let pad = reply.data.len().next_multiple_of(4) - reply.data.len();
    let len = u32::try_from(reply.wire_len())
        .ok()
        .filter(|&l| l < 0x8000_0000)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "reply too large"))?;
    let mark = (0x8000_0000u32 | len).to_be_bytes();
    let mut buf = Buf::chain(&mark[..], &reply.head[..])
        .chain(&reply.data[..])
        .chain(&[0u8; 3][..pad]);
    while buf.has_remaining() {
        w.write_all_buf(&mut buf).await?;
    }
    // Written: the budget its data held is given back.
    drop(reply.taken);
    Ok(())
}

/// Answers calls that come as UDP datagrams on `socket` until `cancel` fires: one call a
/// datagram, one reply a datagram, answered in turn. A datagram over `max_datagram` bytes,
/// from an address `allow` refuses, or that is no call, is dropped unanswered. A reply is
/// never waited for: when the socket's buffer is full it is lost, as UDP replies may be.
pub async fn serve_udp<S: RpcService>(
    socket: UdpSocket,
    service: Arc<S>,
    allow: AllowList,
    max_datagram: usize,
    cancel: CancellationToken,
) {
    let name = S::NAME;
    let local = socket
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    // Nothing a datagram's call takes outlives the call.
    let budget = Budget::new(usize::MAX);
    // One byte more than the limit, so an oversized datagram is recognisable.
    let mut dgram = vec![0u8; max_datagram.saturating_add(1)];
    loop {
        let received = tokio::select! {
            () = cancel.cancelled() => return,
            r = socket.recv_from(&mut dgram) => r,
        };
        let (len, peer) = match received {
            Ok(x) => x,
            // An ICMP error for an earlier reply, for one; nothing to do but go on.
            Err(e) => {
                tracing::debug!(service = name, error = %e, "UDP receive failed");
                continue;
            }
        };
        if len > max_datagram {
            tracing::debug!(service = name, %peer, len, "oversized UDP datagram ignored");
            continue;
        }
        if !allow.allows(peer.ip()) {
            tracing::debug!(service = name, %peer, "UDP datagram from an address not allowed ignored");
            continue;
        }
        let caller = Caller {
            peer,
            local,
            transport: Transport::Udp,
        };
        let Some(datagram) = dgram.get(..len) else {
            continue;
        };
        let Some(reply) = answer(&*service, datagram, &caller, &budget).await else {
            tracing::debug!(service = name, %peer, "UDP datagram that is not an RPC call ignored");
            continue;
        };
        let mut out = Vec::with_capacity(reply.wire_len());
        out.extend_from_slice(&reply.head);
        out.extend_from_slice(&reply.data);
        out.resize(reply.wire_len(), 0);
        if let Err(e) = socket.try_send_to(&out, peer) {
            tracing::debug!(service = name, %peer, error = %e, "UDP reply not sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record limit as large as NFS's.
    const MAX_RECORD: usize = super::super::server::MAX_RECORD;

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
            let got = read_record(&mut r, &budget, MAX_RECORD).await;
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
}
