//! Our own portmapper / rpcbind (ONC RPC program 100000): its protocol, on the RPC front that
//! NFS uses (TCP) and the front's UDP responder.
//!
//! Owns: answering portmap v2 (NULL, SET, UNSET, GETPORT, DUMP; CALLIT refused) and rpcbind
//! v3/v4 (NULL, SET, UNSET, GETADDR, DUMP; v4 also GETADDRLIST) from a fixed table of
//! [`Mapping`]s given at [`Portmapper::bind`]; binding TCP and UDP on one port number; the
//! portmapper's [`LIMITS`] on the front (64 KiB records, 64 connections, 30 s idle). QEMU's
//! libnfs and ESXi find the MOUNT and NFS ports only through this service.
//!
//! Must not: register or unregister anything on behalf of other callers (SET/UNSET answer
//! `false`), forward calls (CALLIT), talk to a system rpcbind, panic on any input, or allocate
//! more than the stated limits because a peer announced a large length. Accepting, framing,
//! the call header, the allow-list and reply headers are the front's and `rpc.rs`'s.
//!
//! XDR: results (`mapping`, `pmaplist`, strings) use the types of `nfs3_types`; arguments with
//! strings are decoded with the bounded reader of `rpc.rs` (`nfs3_types`' `Opaque` decoder
//! allocates the announced length before checking it against the input).

use std::io::{self, Cursor};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use nfs3_types::portmap::{mapping, pmaplist, IPPROTO_TCP, IPPROTO_UDP, PROGRAM};
use nfs3_types::xdr_codec::{List, Opaque, Pack, Unpack};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::budget::Budget;
use super::front::{self, Caller, Limits, Reply, RpcServer, RpcService, Transport};
use super::rpc::{self, Accept, Call, Reader};
use crate::allow::AllowList;

/// Largest accepted TCP fragment and TCP record (sum of fragments), in bytes.
const MAX_RECORD: usize = 64 * 1024;
/// Largest accepted UDP datagram, in bytes.
const MAX_DATAGRAM: usize = 8 * 1024;
/// Most TCP connections served at once; further ones are closed on accept.
const MAX_CONNECTIONS: usize = 64;
/// A TCP connection that does not complete a record (or take a reply), or sends no call, for
/// this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The portmapper's limits on the RPC front: calls are tiny and answered at once.
pub const LIMITS: Limits = Limits {
    max_record: MAX_RECORD,
    max_connections: MAX_CONNECTIONS,
    in_flight: 4,
    idle_close: IDLE_TIMEOUT,
    stall: IDLE_TIMEOUT,
    evict_after: None,
    call_memory: MAX_CONNECTIONS * MAX_RECORD,
};
/// Most mappings a portmapper serves (keeps every DUMP reply well under one UDP datagram).
const MAX_MAPPINGS: usize = 64;
/// Largest string accepted in rpcbind arguments (netid, universal address, owner).
const MAX_ARG_STRING: usize = 1024;
/// Attempts to find a port number free on both TCP and UDP when binding port 0.
const BIND_ATTEMPTS: usize = 32;
/// Owner string shown by rpcbind v3/v4 DUMP.
const OWNER: &str = "livemount";

/// Portmap v2 procedures.
const PMAPPROC_NULL: u32 = 0;
const PMAPPROC_SET: u32 = 1;
const PMAPPROC_UNSET: u32 = 2;
const PMAPPROC_GETPORT: u32 = 3;
const PMAPPROC_DUMP: u32 = 4;
/// rpcbind v3/v4 procedures that we answer (others get PROC_UNAVAIL).
const RPCBPROC_GETADDR: u32 = 3;
const RPCBPROC_DUMP: u32 = 4;
const RPCBPROC_GETADDRLIST: u32 = 11;
/// netconfig semantics in `rpcb_entry`: connection-oriented with orderly release, connectionless.
const NC_TPI_COTS_ORD: u32 = 3;
const NC_TPI_CLTS: u32 = 1;
const LOW_VERSION: u32 = 2;
const HIGH_VERSION: u32 = 4;

/// One registered service: program `prog` version `vers` over `prot` (6 = TCP, 17 = UDP) on `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub prog: u32,
    pub vers: u32,
    /// 6 = TCP, 17 = UDP.
    pub prot: u32,
    pub port: u16,
}

/// A bound portmapper; call [`Portmapper::run`] to serve.
pub struct Portmapper {
    tcp: TcpListener,
    udp: UdpSocket,
    local: SocketAddr,
    portmap: Arc<Portmap>,
    allow: AllowList,
    limits: Limits,
}

/// The protocol: the table and what it answers.
struct Portmap {
    /// Caller's mappings, preceded by the portmapper's own entries.
    table: Vec<Mapping>,
    /// The IP we were bound to (possibly unspecified).
    bind_ip: IpAddr,
}

impl Portmapper {
    /// Binds TCP and UDP on `addr` (port 0 = ephemeral; both on the same port number, retrying
    /// if the UDP port is taken). Only callers `allow` lets in are served (TCP: others'
    /// connections are closed at once; UDP: their datagrams are ignored). Fails with
    /// `InvalidInput` for more than 64 mappings or a protocol other than 6 (TCP) / 17 (UDP).
    pub async fn bind(
        addr: SocketAddr,
        mappings: Vec<Mapping>,
        allow: AllowList,
    ) -> io::Result<Portmapper> {
        if mappings.len() > MAX_MAPPINGS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_MAPPINGS} portmap mappings"),
            ));
        }
        if let Some(m) = mappings
            .iter()
            .find(|m| m.prot != IPPROTO_TCP && m.prot != IPPROTO_UDP)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("portmap mapping {m:?}: protocol must be 6 (TCP) or 17 (UDP)"),
            ));
        }
        let (tcp, udp) = bind_pair(addr).await?;
        let local = tcp.local_addr()?;
        let mut table = Vec::with_capacity(mappings.len() + 6);
        if !mappings.iter().any(|m| m.prog == PROGRAM) {
            for vers in LOW_VERSION..=HIGH_VERSION {
                for prot in [IPPROTO_TCP, IPPROTO_UDP] {
                    table.push(Mapping {
                        prog: PROGRAM,
                        vers,
                        prot,
                        port: local.port(),
                    });
                }
            }
        }
        table.extend(mappings);
        Ok(Portmapper {
            tcp,
            udp,
            local,
            portmap: Arc::new(Portmap {
                table,
                bind_ip: local.ip(),
            }),
            allow,
            limits: LIMITS,
        })
    }

    /// The bound address (TCP and UDP share it).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves TCP (on the RPC front, its connections tracked by `tasks`) and UDP until
    /// `cancel` fires; never panics on bad input. Returns when both have stopped taking calls;
    /// open TCP connections close as the front closes them at a stop.
    pub async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        let Portmapper {
            tcp,
            udp,
            local,
            portmap,
            allow,
            limits,
        } = self;
        debug!(%local, "portmapper serving");
        let server = RpcServer::on(tcp, portmap.clone(), allow.clone(), limits);
        tokio::join!(
            server.run(cancel.clone(), tasks),
            front::serve_udp(udp, portmap, allow, MAX_DATAGRAM, cancel),
        );
        debug!(%local, "portmapper stopped");
    }
}

impl RpcService for Portmap {
    const NAME: &'static str = "portmap";

    async fn call<'a>(
        &'a self,
        call: Call<'a>,
        caller: &'a Caller,
        _budget: &'a Budget,
    ) -> Option<Reply> {
        Some(self.answer(&call, caller))
    }
}

/// Binds TCP then UDP on the same port; for port 0, retries when UDP finds that port taken.
async fn bind_pair(addr: SocketAddr) -> io::Result<(TcpListener, UdpSocket)> {
    if addr.port() != 0 {
        let tcp = TcpListener::bind(addr).await?;
        let udp = UdpSocket::bind(addr).await?;
        return Ok((tcp, udp));
    }
    let mut last_err = None;
    for _ in 0..BIND_ATTEMPTS {
        let tcp = TcpListener::bind(addr).await?;
        let port = tcp.local_addr()?.port();
        match UdpSocket::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(udp) => return Ok((tcp, udp)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)))
}

/// Maps an IPv4-mapped IPv6 address to plain IPv4, so uaddrs see IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// rpcbind v3/v4 `rpcb` entry (RFC 1833), packed with `nfs3_types`' XDR primitives.
#[derive(Debug)]
struct Rpcb<'a> {
    prog: u32,
    vers: u32,
    netid: Opaque<'a>,
    addr: Opaque<'a>,
    owner: Opaque<'a>,
}

impl Pack for Rpcb<'_> {
    fn packed_size(&self) -> usize {
        8 + self.netid.packed_size() + self.addr.packed_size() + self.owner.packed_size()
    }

    fn pack(&self, out: &mut impl io::Write) -> nfs3_types::xdr_codec::Result<usize> {
        Ok(self.prog.pack(out)?
            + self.vers.pack(out)?
            + self.netid.pack(out)?
            + self.addr.pack(out)?
            + self.owner.pack(out)?)
    }
}

/// rpcbind v4 `rpcb_entry` (RFC 1833), answer element of GETADDRLIST.
#[derive(Debug)]
struct RpcbEntry<'a> {
    maddr: Opaque<'a>,
    netid: Opaque<'a>,
    semantics: u32,
    protofmly: Opaque<'a>,
    proto: Opaque<'a>,
}

impl Pack for RpcbEntry<'_> {
    fn packed_size(&self) -> usize {
        4 + self.maddr.packed_size()
            + self.netid.packed_size()
            + self.protofmly.packed_size()
            + self.proto.packed_size()
    }

    fn pack(&self, out: &mut impl io::Write) -> nfs3_types::xdr_codec::Result<usize> {
        Ok(self.maddr.pack(out)?
            + self.netid.pack(out)?
            + self.semantics.pack(out)?
            + self.protofmly.pack(out)?
            + self.proto.pack(out)?)
    }
}

/// Decodes `rpcb` arguments with bounded strings; only the fields we use are returned.
fn decode_rpcb(args: &[u8]) -> Option<(u32, u32, &[u8])> {
    let mut r = Reader::new(args);
    let prog = r.u32()?;
    let vers = r.u32()?;
    let netid = r.opaque(MAX_ARG_STRING)?;
    r.opaque(MAX_ARG_STRING)?; // r_addr
    r.opaque(MAX_ARG_STRING)?; // r_owner
    Some((prog, vers, netid))
}

fn decode_mapping(args: &[u8]) -> Option<mapping> {
    // Fixed size (four u32), so nfs3_types' decoder cannot over-allocate.
    mapping::unpack(&mut Cursor::new(args)).ok().map(|(m, _)| m)
}

fn encode<T: Pack>(value: &T) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(value.packed_size());
    match value.pack(&mut out) {
        Ok(_) => Some(out),
        Err(e) => {
            warn!(error = %e, "portmap: cannot encode reply");
            None
        }
    }
}

/// netid for a protocol number and address family (RFC 1833 / netconfig names).
fn netid(prot: u32, ip: IpAddr) -> Option<&'static str> {
    match (prot, ip.is_ipv6()) {
        (IPPROTO_TCP, false) => Some("tcp"),
        (IPPROTO_UDP, false) => Some("udp"),
        (IPPROTO_TCP, true) => Some("tcp6"),
        (IPPROTO_UDP, true) => Some("udp6"),
        _ => None,
    }
}

/// Universal address: `h1.h2.h3.h4.p1.p2` (IPv4) or `x:..:x.p1.p2` (IPv6).
fn uaddr(ip: IpAddr, port: u16) -> String {
    format!("{ip}.{}.{}", port >> 8, port & 0xff)
}

impl Portmap {
    /// Answers a call whose header the front decoded. Any credential flavor is taken (the
    /// portmapper's answers are public).
    fn answer(&self, call: &Call<'_>, caller: &Caller) -> Reply {
        let caller = Caller {
            peer: canonical(caller.peer),
            ..*caller
        };
        let (xid, prog, vers, proc) = (call.xid, call.prog, call.vers, call.proc_);
        debug!(peer = %caller.peer, transport = ?caller.transport, prog, vers, proc, "portmap call");
        let (accept, results) = self.dispatch(prog, vers, proc, call.args, &caller);
        let mut head = BytesMut::with_capacity(24 + results.len());
        rpc::put_accepted(&mut head, xid, accept);
        head.extend_from_slice(&results);
        Reply::new(head)
    }

    /// How the call went and, for `Success`, its results.
    fn dispatch(
        &self,
        prog: u32,
        vers: u32,
        proc: u32,
        args: &[u8],
        caller: &Caller,
    ) -> (Accept, Vec<u8>) {
        if prog != PROGRAM {
            return (Accept::ProgUnavail, Vec::new());
        }
        let result = match vers {
            2 => self.pmap_v2(proc, args),
            3 | 4 => self.rpcb_v34(vers, proc, args, caller),
            _ => {
                let mismatch = Accept::ProgMismatch {
                    low: LOW_VERSION,
                    high: HIGH_VERSION,
                };
                return (mismatch, Vec::new());
            }
        };
        match result {
            Ok(Some(bytes)) => (Accept::Success, bytes),
            Ok(None) => (Accept::ProcUnavail, Vec::new()),
            Err(()) => (Accept::GarbageArgs, Vec::new()),
        }
    }

    /// Portmap v2. `Ok(None)`: unknown or unsupported procedure; `Err`: bad arguments.
    fn pmap_v2(&self, proc: u32, args: &[u8]) -> Result<Option<Vec<u8>>, ()> {
        Ok(match proc {
            PMAPPROC_NULL => Some(Vec::new()),
            PMAPPROC_SET | PMAPPROC_UNSET => {
                decode_mapping(args).ok_or(())?;
                encode(&false)
            }
            PMAPPROC_GETPORT => {
                let want = decode_mapping(args).ok_or(())?;
                let port = self
                    .table
                    .iter()
                    .find(|m| m.prog == want.prog && m.vers == want.vers && m.prot == want.prot)
                    .map_or(0, |m| u32::from(m.port));
                debug!(
                    prog = want.prog,
                    vers = want.vers,
                    prot = want.prot,
                    port,
                    "portmap GETPORT"
                );
                encode(&port)
            }
            PMAPPROC_DUMP => {
                let list: pmaplist = List(
                    self.table
                        .iter()
                        .map(|m| mapping {
                            prog: m.prog,
                            vers: m.vers,
                            prot: m.prot,
                            port: u32::from(m.port),
                        })
                        .collect(),
                );
                encode(&list)
            }
            _ => None, // CALLIT and unknown
        })
    }

    /// rpcbind v3/v4. Same conventions as [`Portmap::pmap_v2`].
    fn rpcb_v34(
        &self,
        vers: u32,
        proc: u32,
        args: &[u8],
        caller: &Caller,
    ) -> Result<Option<Vec<u8>>, ()> {
        Ok(match proc {
            PMAPPROC_NULL => Some(Vec::new()),
            PMAPPROC_SET | PMAPPROC_UNSET => {
                decode_rpcb(args).ok_or(())?;
                encode(&false)
            }
            RPCBPROC_GETADDR => {
                let (prog, vers, want_netid) = decode_rpcb(args).ok_or(())?;
                let ip = self.reply_ip(caller);
                let found = self.table.iter().find(|m| {
                    m.prog == prog
                        && m.vers == vers
                        && match netid(m.prot, ip) {
                            Some(n) => {
                                n.as_bytes() == want_netid
                                    || (want_netid.is_empty()
                                        && (m.prot == IPPROTO_TCP)
                                            == (caller.transport == Transport::Tcp))
                            }
                            None => false,
                        }
                });
                let addr = found.map(|m| uaddr(ip, m.port)).unwrap_or_default();
                debug!(prog, vers, %addr, "rpcbind GETADDR");
                encode(&Opaque::owned(addr.into_bytes()))
            }
            RPCBPROC_DUMP => {
                let ip = self.reply_ip(caller);
                let list = List(
                    self.table
                        .iter()
                        .filter_map(|m| {
                            Some(Rpcb {
                                prog: m.prog,
                                vers: m.vers,
                                netid: Opaque::borrowed(netid(m.prot, ip)?.as_bytes()),
                                addr: Opaque::owned(uaddr(ip, m.port).into_bytes()),
                                owner: Opaque::borrowed(OWNER.as_bytes()),
                            })
                        })
                        .collect(),
                );
                encode(&list)
            }
            RPCBPROC_GETADDRLIST if vers == 4 => {
                let (prog, prog_vers, _) = decode_rpcb(args).ok_or(())?;
                let ip = self.reply_ip(caller);
                let list = List(
                    self.table
                        .iter()
                        .filter(|m| m.prog == prog && m.vers == prog_vers)
                        .filter_map(|m| {
                            let (semantics, proto) = if m.prot == IPPROTO_TCP {
                                (NC_TPI_COTS_ORD, "tcp")
                            } else {
                                (NC_TPI_CLTS, "udp")
                            };
                            Some(RpcbEntry {
                                maddr: Opaque::owned(uaddr(ip, m.port).into_bytes()),
                                netid: Opaque::borrowed(netid(m.prot, ip)?.as_bytes()),
                                semantics,
                                protofmly: Opaque::borrowed(if ip.is_ipv6() {
                                    b"inet6"
                                } else {
                                    b"inet"
                                }),
                                proto: Opaque::borrowed(proto.as_bytes()),
                            })
                        })
                        .collect(),
                );
                encode(&list)
            }
            _ => None,
        })
    }

    /// Our IP as the caller reaches it, for universal addresses.
    fn reply_ip(&self, caller: &Caller) -> IpAddr {
        if let Some(local) = caller.local {
            return local.ip().to_canonical();
        }
        if !self.bind_ip.is_unspecified() {
            return self.bind_ip;
        }
        // UDP on a wildcard address: ask the routing table which source address reaches the
        // caller (connecting a UDP socket sends nothing).
        let probe = std::net::UdpSocket::bind(SocketAddr::new(self.bind_ip, 0))
            .and_then(|s| s.connect(caller.peer).and_then(|()| s.local_addr()));
        match probe {
            Ok(a) => a.ip().to_canonical(),
            Err(e) => {
                debug!(error = %e, "portmap: cannot determine local address for uaddr");
                self.bind_ip
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nfs3_client::io::{AsyncRead as ClientRead, AsyncWrite as ClientWrite};
    use nfs3_client::rpc::RpcClient;
    use nfs3_client::{PortmapError, PortmapperClient};
    use nfs3_types::rpc::{
        accept_stat_data, auth_stat, call_body, fragment_header, msg_body, opaque_auth,
        reject_stat, rejected_reply, reply_body, rpc_msg,
    };
    use nfs3_types::xdr_codec::Void;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::task::JoinHandle;

    const T: Duration = Duration::from_secs(10);
    const NFS: Mapping = Mapping {
        prog: 100_003,
        vers: 3,
        prot: IPPROTO_TCP,
        port: 2049,
    };
    const MOUNT_TCP: Mapping = Mapping {
        prog: 100_005,
        vers: 3,
        prot: IPPROTO_TCP,
        port: 20048,
    };
    const MOUNT_UDP: Mapping = Mapping {
        prog: 100_005,
        vers: 3,
        prot: IPPROTO_UDP,
        port: 20048,
    };

    fn localhost() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
    }

    struct Server {
        addr: SocketAddr,
        cancel: CancellationToken,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn stop(self) {
            self.cancel.cancel();
            tokio::time::timeout(T, self.task)
                .await
                .expect("run() returns after cancel")
                .expect("run() does not panic");
        }
    }

    async fn start_with(pm: Portmapper) -> Server {
        let addr = pm.local_addr();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(pm.run(cancel.clone(), TaskTracker::new()));
        Server { addr, cancel, task }
    }

    async fn start() -> Server {
        let pm = Portmapper::bind(
            localhost(),
            vec![NFS, MOUNT_TCP, MOUNT_UDP],
            AllowList::loopback(),
        )
        .await
        .expect("bind");
        start_with(pm).await
    }

    /// Builds a CALL message (no record mark) with AUTH_NONE.
    fn call(xid: u32, rpcvers: u32, prog: u32, vers: u32, proc: u32, args: &[u8]) -> Vec<u8> {
        let msg = rpc_msg {
            xid,
            body: msg_body::CALL(call_body {
                rpcvers,
                prog,
                vers,
                proc,
                cred: opaque_auth::default(),
                verf: opaque_auth::default(),
            }),
        };
        let mut out = Vec::new();
        msg.pack(&mut out).expect("pack call");
        out.extend_from_slice(args);
        out
    }

    fn mapping_args(prog: u32, vers: u32, prot: u32) -> Vec<u8> {
        encode(&mapping {
            prog,
            vers,
            prot,
            port: 0,
        })
        .expect("pack mapping")
    }

    /// `msg` as one record: a last-fragment mark, then the message.
    fn frame(msg: &[u8]) -> Vec<u8> {
        let len = u32::try_from(msg.len()).expect("small message");
        let mut out = fragment_header::new(len, true).into_xdr_buf().to_vec();
        out.extend_from_slice(msg);
        out
    }

    async fn send_record(stream: &mut TcpStream, msg: &[u8]) {
        stream.write_all(&frame(msg)).await.expect("write call");
    }

    /// Reads one record; `None`: the server closed first.
    async fn read_reply(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
        let budget = Budget::new(MAX_RECORD);
        let got = front::read_record(stream, &budget, MAX_RECORD).await?;
        Ok(got.map(|(record, _)| record.to_vec()))
    }

    async fn recv_record(stream: &mut TcpStream) -> Vec<u8> {
        let got = tokio::time::timeout(T, read_reply(stream))
            .await
            .expect("reply in time")
            .expect("read reply");
        got.expect("server closed instead of replying")
    }

    async fn tcp_call(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        send_record(&mut stream, msg).await;
        recv_record(&mut stream).await
    }

    async fn udp_call(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
        let sock = UdpSocket::bind(localhost()).await.expect("udp bind");
        sock.send_to(msg, addr).await.expect("udp send");
        let mut buf = vec![0u8; 65536];
        let (n, from) = tokio::time::timeout(T, sock.recv_from(&mut buf))
            .await
            .expect("udp reply in time")
            .expect("udp recv");
        assert_eq!(from, addr);
        buf.truncate(n);
        buf
    }

    /// Decodes a reply: (xid, reply body, result bytes).
    fn parse(reply: &[u8]) -> (u32, reply_body<'static>, Vec<u8>) {
        let mut cur = Cursor::new(reply);
        let (msg, _) = rpc_msg::unpack(&mut cur).expect("decode reply");
        let pos = usize::try_from(cur.position()).expect("pos");
        let msg_body::REPLY(body) = msg.body else {
            panic!("got a CALL back");
        };
        (msg.xid, body, reply[pos..].to_vec())
    }

    /// Asserts an accepted reply with `xid` and returns (status, results).
    fn accepted_of(reply: &[u8], xid: u32) -> (accept_stat_data, Vec<u8>) {
        let (got_xid, body, rest) = parse(reply);
        assert_eq!(got_xid, xid);
        match body {
            reply_body::MSG_ACCEPTED(a) => (a.reply_data, rest),
            reply_body::MSG_DENIED(d) => panic!("denied: {d:?}"),
        }
    }

    fn success_of(reply: &[u8], xid: u32) -> Vec<u8> {
        let (stat, rest) = accepted_of(reply, xid);
        assert!(matches!(stat, accept_stat_data::SUCCESS), "{stat:?}");
        rest
    }

    fn decode<T: Unpack>(bytes: &[u8]) -> T {
        let mut cur = Cursor::new(bytes);
        let (v, _) = T::unpack(&mut cur).expect("decode result");
        assert_eq!(cur.position(), bytes.len() as u64, "trailing bytes");
        v
    }

    /// True if the server closes (EOF or reset) the connection without replying.
    async fn is_closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(T, stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// nfs3_client transport over a tokio stream; EOF becomes an error (its read_exact would spin).
    struct Io(TcpStream);

    impl ClientRead for Io {
        async fn async_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.read(buf).await?;
            if n == 0 && !buf.is_empty() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            Ok(n)
        }
    }

    impl ClientWrite for Io {
        async fn async_write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf).await
        }
    }

    async fn client_io(addr: SocketAddr) -> Io {
        Io(TcpStream::connect(addr).await.expect("connect"))
    }

    impl nfs3_types::xdr_codec::Unpack for Rpcb<'static> {
        fn unpack(r: &mut impl io::Read) -> nfs3_types::xdr_codec::Result<(Self, usize)> {
            let (prog, a) = u32::unpack(r)?;
            let (vers, b) = u32::unpack(r)?;
            let (netid, c) = Opaque::unpack(r)?;
            let (addr, d) = Opaque::unpack(r)?;
            let (owner, e) = Opaque::unpack(r)?;
            let rpcb = Rpcb {
                prog,
                vers,
                netid,
                addr,
                owner,
            };
            Ok((rpcb, a + b + c + d + e))
        }
    }

    impl nfs3_types::xdr_codec::Unpack for RpcbEntry<'static> {
        fn unpack(r: &mut impl io::Read) -> nfs3_types::xdr_codec::Result<(Self, usize)> {
            let (maddr, a) = Opaque::unpack(r)?;
            let (netid, b) = Opaque::unpack(r)?;
            let (semantics, c) = u32::unpack(r)?;
            let (protofmly, d) = Opaque::unpack(r)?;
            let (proto, e) = Opaque::unpack(r)?;
            let entry = RpcbEntry {
                maddr,
                netid,
                semantics,
                protofmly,
                proto,
            };
            Ok((entry, a + b + c + d + e))
        }
    }

    fn rpcb_args(prog: u32, vers: u32, netid: &'static str) -> Rpcb<'static> {
        Rpcb {
            prog,
            vers,
            netid: Opaque::borrowed(netid.as_bytes()),
            addr: Opaque::borrowed(b""),
            owner: Opaque::borrowed(b""),
        }
    }

    #[tokio::test]
    async fn null_over_tcp_and_udp() {
        let s = start().await;
        let msg = call(7, 2, PROGRAM, 2, PMAPPROC_NULL, &[]);
        assert!(success_of(&tcp_call(s.addr, &msg).await, 7).is_empty());
        assert!(success_of(&udp_call(s.addr, &msg).await, 7).is_empty());
        // Also through nfs3_client's portmapper client.
        let mut pm = PortmapperClient::new(client_io(s.addr).await);
        tokio::time::timeout(T, pm.null())
            .await
            .expect("in time")
            .expect("NULL");
        s.stop().await;
    }

    #[tokio::test]
    async fn getport_registered_and_unregistered() {
        let s = start().await;
        let mut pm = PortmapperClient::new(client_io(s.addr).await);
        let port = tokio::time::timeout(T, pm.getport(100_003, 3, IPPROTO_TCP))
            .await
            .expect("in time")
            .expect("GETPORT nfs");
        assert_eq!(port, 2049);
        let port = pm.getport(100_005, 3, IPPROTO_UDP).await.expect("mount");
        assert_eq!(port, 20048);
        // nfs3_client maps port 0 to ProgramUnavailable.
        let missing = pm.getport(100_003, 3, IPPROTO_UDP).await;
        assert!(
            matches!(missing, Err(PortmapError::ProgramUnavailable)),
            "{missing:?}"
        );
        let missing = pm.getport(100_021, 4, IPPROTO_TCP).await;
        assert!(matches!(missing, Err(PortmapError::ProgramUnavailable)));
        // The portmapper lists itself on its own port.
        let own = pm.getport(PROGRAM, 2, IPPROTO_TCP).await.expect("self");
        assert_eq!(own, s.addr.port());
        // Raw over UDP: registered and explicit 0.
        let msg = call(
            9,
            2,
            PROGRAM,
            2,
            PMAPPROC_GETPORT,
            &mapping_args(100_003, 3, 6),
        );
        assert_eq!(
            decode::<u32>(&success_of(&udp_call(s.addr, &msg).await, 9)),
            2049
        );
        let msg = call(
            10,
            2,
            PROGRAM,
            2,
            PMAPPROC_GETPORT,
            &mapping_args(4242, 1, 6),
        );
        assert_eq!(
            decode::<u32>(&success_of(&udp_call(s.addr, &msg).await, 10)),
            0
        );
        s.stop().await;
    }

    #[tokio::test]
    async fn dump_returns_all_mappings() {
        let s = start().await;
        let mut pm = PortmapperClient::new(client_io(s.addr).await);
        let list = tokio::time::timeout(T, pm.dump())
            .await
            .expect("in time")
            .expect("DUMP");
        let got: Vec<Mapping> = list
            .iter()
            .map(|m| Mapping {
                prog: m.prog,
                vers: m.vers,
                prot: m.prot,
                port: u16::try_from(m.port).expect("port fits"),
            })
            .collect();
        let port = s.addr.port();
        let mut want = Vec::new();
        for vers in 2..=4 {
            for prot in [IPPROTO_TCP, IPPROTO_UDP] {
                want.push(Mapping {
                    prog: PROGRAM,
                    vers,
                    prot,
                    port,
                });
            }
        }
        want.extend([NFS, MOUNT_TCP, MOUNT_UDP]);
        assert_eq!(got, want);
        // Same over UDP.
        let msg = call(3, 2, PROGRAM, 2, PMAPPROC_DUMP, &[]);
        let list: pmaplist = decode(&success_of(&udp_call(s.addr, &msg).await, 3));
        assert_eq!(list.0.len(), want.len());
        s.stop().await;
    }

    #[tokio::test]
    async fn rpcbind_v3_v4_getaddr_and_dump() {
        let s = start().await;
        let mut rpc = RpcClient::new(client_io(s.addr).await);
        let addr: Opaque<'static> = tokio::time::timeout(
            T,
            rpc.call(PROGRAM, 4, RPCBPROC_GETADDR, &rpcb_args(100_003, 3, "tcp")),
        )
        .await
        .expect("in time")
        .expect("GETADDR v4");
        assert_eq!(addr.as_ref(), b"127.0.0.1.8.1");
        let addr: Opaque<'static> = rpc
            .call(PROGRAM, 3, RPCBPROC_GETADDR, &rpcb_args(100_005, 3, "udp"))
            .await
            .expect("GETADDR v3");
        assert_eq!(addr.as_ref(), b"127.0.0.1.78.80"); // 20048 = 78 * 256 + 80
                                                       // Empty netid: the transport of the call (TCP here).
        let addr: Opaque<'static> = rpc
            .call(PROGRAM, 4, RPCBPROC_GETADDR, &rpcb_args(100_005, 3, ""))
            .await
            .expect("GETADDR empty netid");
        assert_eq!(addr.as_ref(), b"127.0.0.1.78.80");
        // Not registered, wrong transport, other family: empty string.
        for (prog, netid) in [(4242, "tcp"), (100_003, "udp"), (100_003, "tcp6")] {
            let addr: Opaque<'static> = rpc
                .call(PROGRAM, 4, RPCBPROC_GETADDR, &rpcb_args(prog, 3, netid))
                .await
                .expect("GETADDR missing");
            assert!(addr.is_empty(), "{prog} {netid}: {addr:?}");
        }
        let list: List<Rpcb<'static>> = rpc
            .call(PROGRAM, 4, RPCBPROC_DUMP, &Void)
            .await
            .expect("DUMP v4");
        let nfs = list
            .0
            .iter()
            .find(|r| r.prog == 100_003)
            .expect("nfs in dump");
        assert_eq!((nfs.vers, nfs.netid.as_ref()), (3, &b"tcp"[..]));
        assert_eq!(nfs.addr.as_ref(), b"127.0.0.1.8.1");
        assert_eq!(nfs.owner.as_ref(), OWNER.as_bytes());
        assert_eq!(list.0.len(), 9);
        // v4 GETADDRLIST: both transports of MOUNT v3.
        let list: List<RpcbEntry<'static>> = rpc
            .call(PROGRAM, 4, RPCBPROC_GETADDRLIST, &rpcb_args(100_005, 3, ""))
            .await
            .expect("GETADDRLIST");
        type Row<'a> = (&'a [u8], &'a [u8], u32, &'a [u8], &'a [u8]);
        let got: Vec<Row<'_>> = list
            .0
            .iter()
            .map(|e| {
                (
                    e.maddr.as_ref(),
                    e.netid.as_ref(),
                    e.semantics,
                    e.protofmly.as_ref(),
                    e.proto.as_ref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    &b"127.0.0.1.78.80"[..],
                    &b"tcp"[..],
                    3,
                    &b"inet"[..],
                    &b"tcp"[..]
                ),
                (
                    &b"127.0.0.1.78.80"[..],
                    &b"udp"[..],
                    1,
                    &b"inet"[..],
                    &b"udp"[..]
                ),
            ]
        );
        // GETADDR over UDP (the uaddr uses the bound address).
        let args = encode(&rpcb_args(100_003, 3, "tcp")).expect("args");
        let msg = call(5, 2, PROGRAM, 3, RPCBPROC_GETADDR, &args);
        let addr: Opaque<'static> = decode(&success_of(&udp_call(s.addr, &msg).await, 5));
        assert_eq!(addr.as_ref(), b"127.0.0.1.8.1");
        s.stop().await;
    }

    #[tokio::test]
    async fn error_replies() {
        let s = start().await;
        // Other program.
        let r = tcp_call(s.addr, &call(1, 2, 100_003, 3, 0, &[])).await;
        assert!(matches!(
            accepted_of(&r, 1).0,
            accept_stat_data::PROG_UNAVAIL
        ));
        // Portmap version 5.
        let r = tcp_call(s.addr, &call(2, 2, PROGRAM, 5, 0, &[])).await;
        assert!(matches!(
            accepted_of(&r, 2).0,
            accept_stat_data::PROG_MISMATCH { low: 2, high: 4 }
        ));
        // Unknown procedure, CALLIT, v4 GETVERSADDR.
        for (xid, vers, proc) in [(3, 2, 77), (4, 2, 5), (5, 4, 9), (8, 3, 11)] {
            let r = udp_call(s.addr, &call(xid, 2, PROGRAM, vers, proc, &[])).await;
            assert!(matches!(
                accepted_of(&r, xid).0,
                accept_stat_data::PROC_UNAVAIL
            ));
        }
        // SET / UNSET answer false.
        let args = mapping_args(100_003, 3, 6);
        for proc in [PMAPPROC_SET, PMAPPROC_UNSET] {
            let r = tcp_call(s.addr, &call(6, 2, PROGRAM, 2, proc, &args)).await;
            assert!(!decode::<bool>(&success_of(&r, 6)));
        }
        let args = encode(&rpcb_args(100_003, 3, "tcp")).expect("args");
        let r = tcp_call(s.addr, &call(7, 2, PROGRAM, 4, PMAPPROC_SET, &args)).await;
        assert!(!decode::<bool>(&success_of(&r, 7)));
        s.stop().await;
    }

    #[tokio::test]
    async fn rpc_version_3_gets_rpc_mismatch() {
        let s = start().await;
        for reply in [
            tcp_call(s.addr, &call(11, 3, PROGRAM, 2, 0, &[])).await,
            udp_call(s.addr, &call(11, 3, PROGRAM, 2, 0, &[])).await,
        ] {
            let (xid, body, _) = parse(&reply);
            assert_eq!(xid, 11);
            assert!(
                matches!(
                    body,
                    reply_body::MSG_DENIED(rejected_reply::RPC_MISMATCH { low: 2, high: 2 })
                ),
                "{body:?}"
            );
        }
        let _ = reject_stat::RPC_MISMATCH;
        s.stop().await;
    }

    #[tokio::test]
    async fn truncated_args_get_garbage_args() {
        let s = start().await;
        let short = &mapping_args(100_003, 3, 6)[..8];
        let r = tcp_call(s.addr, &call(12, 2, PROGRAM, 2, PMAPPROC_GETPORT, short)).await;
        assert!(matches!(
            accepted_of(&r, 12).0,
            accept_stat_data::GARBAGE_ARGS
        ));
        // rpcb whose netid length runs past the end.
        let mut args = Vec::new();
        for w in [100_003u32, 3, 1000] {
            args.extend_from_slice(&w.to_be_bytes());
        }
        let r = udp_call(s.addr, &call(13, 2, PROGRAM, 4, RPCBPROC_GETADDR, &args)).await;
        assert!(matches!(
            accepted_of(&r, 13).0,
            accept_stat_data::GARBAGE_ARGS
        ));
        // A credential announcing 4 GiB: AUTH_BADCRED, nothing allocated.
        let mut msg = Vec::new();
        for w in [14u32, 0, 2, PROGRAM, 2, 0, 1, u32::MAX] {
            msg.extend_from_slice(&w.to_be_bytes());
        }
        let (_, body, _) = parse(&tcp_call(s.addr, &msg).await);
        assert!(matches!(
            body,
            reply_body::MSG_DENIED(rejected_reply::AUTH_ERROR(auth_stat::AUTH_BADCRED))
        ));
        s.stop().await;
    }

    #[tokio::test]
    async fn any_auth_flavor_is_accepted() {
        let s = start().await;
        // AUTH_SYS-like body with flavor 1, and an unknown flavor 390004 (RPCSEC_GSS is 6).
        let mut msg = Vec::new();
        for w in [
            21u32,
            0,
            2,
            PROGRAM,
            2,
            PMAPPROC_NULL,
            1,
            8,
            0,
            0,
            390_004,
            0,
        ] {
            msg.extend_from_slice(&w.to_be_bytes());
        }
        assert!(success_of(&tcp_call(s.addr, &msg).await, 21).is_empty());
        s.stop().await;
    }

    #[tokio::test]
    async fn fragmented_record_is_reassembled() {
        let s = start().await;
        let msg = call(
            31,
            2,
            PROGRAM,
            2,
            PMAPPROC_GETPORT,
            &mapping_args(100_003, 3, 6),
        );
        let (a, b) = msg.split_at(10);
        let mut stream = TcpStream::connect(s.addr).await.expect("connect");
        let mut wire = Vec::new();
        wire.extend_from_slice(&fragment_header::new(10, false).into_xdr_buf());
        wire.extend_from_slice(a);
        wire.extend_from_slice(&fragment_header::new(0, false).into_xdr_buf());
        wire.extend_from_slice(
            &fragment_header::new(u32::try_from(b.len()).unwrap(), true).into_xdr_buf(),
        );
        wire.extend_from_slice(b);
        stream.write_all(&wire).await.expect("write");
        let r = recv_record(&mut stream).await;
        assert_eq!(decode::<u32>(&success_of(&r, 31)), 2049);
        // Same connection serves a second call.
        send_record(&mut stream, &call(32, 2, PROGRAM, 2, 0, &[])).await;
        success_of(&recv_record(&mut stream).await, 32);
        s.stop().await;
    }

    #[tokio::test]
    async fn huge_fragment_header_closes_connection() {
        let s = start().await;
        let mut stream = TcpStream::connect(s.addr).await.expect("connect");
        // Last fragment, 2 GiB - 1 long.
        stream
            .write_all(&[0xff, 0xff, 0xff, 0xff])
            .await
            .expect("write");
        assert!(is_closed(&mut stream).await);
        // Records growing past 64 KiB through many fragments are refused too.
        let mut stream = TcpStream::connect(s.addr).await.expect("connect");
        let chunk = vec![0u8; 40 * 1024];
        let mut wire = Vec::new();
        for _ in 0..2 {
            wire.extend_from_slice(&fragment_header::new(40 * 1024, false).into_xdr_buf());
            wire.extend_from_slice(&chunk);
        }
        let _ = stream.write_all(&wire).await;
        assert!(is_closed(&mut stream).await);
        // A fragment of exactly 64 KiB + 1 is refused from its header alone.
        let mut stream = TcpStream::connect(s.addr).await.expect("connect");
        stream
            .write_all(&fragment_header::new(64 * 1024 + 1, true).into_xdr_buf())
            .await
            .expect("write");
        assert!(is_closed(&mut stream).await);
        // The server still answers.
        success_of(&tcp_call(s.addr, &call(1, 2, PROGRAM, 2, 0, &[])).await, 1);
        s.stop().await;
    }

    #[tokio::test]
    async fn oversized_udp_datagram_is_ignored() {
        let s = start().await;
        let sock = UdpSocket::bind(localhost()).await.expect("bind");
        let mut big = call(41, 2, PROGRAM, 2, 0, &[]);
        big.resize(MAX_DATAGRAM + 4, 0);
        sock.send_to(&big, s.addr).await.expect("send");
        let mut buf = [0u8; 256];
        let got = tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await;
        assert!(got.is_err(), "oversized datagram must not be answered");
        // Garbage too short for a header: ignored, server still fine.
        sock.send_to(&[1, 2, 3], s.addr).await.expect("send");
        success_of(
            &udp_call(s.addr, &call(42, 2, PROGRAM, 2, 0, &[])).await,
            42,
        );
        s.stop().await;
    }

    #[tokio::test]
    #[allow(
        deprecated,
        reason = "SO_LINGER 0 is the point: it makes drop send a RST"
    )]
    async fn connect_and_reset_100_times() {
        let s = start().await;
        for _ in 0..100 {
            let stream = TcpStream::connect(s.addr).await.expect("connect");
            stream.set_linger(Some(Duration::ZERO)).expect("linger");
            drop(stream);
        }
        // Also reset in the middle of a record.
        for _ in 0..10 {
            let mut stream = TcpStream::connect(s.addr).await.expect("connect");
            stream
                .write_all(&[0x80, 0, 0, 40, 0, 0])
                .await
                .expect("write");
            stream.set_linger(Some(Duration::ZERO)).expect("linger");
            drop(stream);
        }
        success_of(
            &tcp_call(s.addr, &call(51, 2, PROGRAM, 2, 0, &[])).await,
            51,
        );
        success_of(
            &udp_call(s.addr, &call(52, 2, PROGRAM, 2, 0, &[])).await,
            52,
        );
        assert!(!s.task.is_finished());
        s.stop().await;
    }

    #[tokio::test]
    async fn connection_65_is_closed() {
        let s = start().await;
        let mut held = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            let mut stream = TcpStream::connect(s.addr).await.expect("connect");
            // A reply proves the server holds a slot for this connection.
            let xid = u32::try_from(i).unwrap();
            send_record(&mut stream, &call(xid, 2, PROGRAM, 2, 0, &[])).await;
            success_of(&recv_record(&mut stream).await, xid);
            held.push(stream);
        }
        let mut extra = TcpStream::connect(s.addr).await.expect("connect 65th");
        assert!(
            is_closed(&mut extra).await,
            "65th connection must be closed"
        );
        // UDP is not limited by TCP connections.
        success_of(
            &udp_call(s.addr, &call(99, 2, PROGRAM, 2, 0, &[])).await,
            99,
        );
        // Freeing one slot lets a new connection in.
        drop(held.pop());
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let mut stream = TcpStream::connect(s.addr).await.expect("connect");
            send_record(&mut stream, &call(100, 2, PROGRAM, 2, 0, &[])).await;
            if let Ok(Ok(Some(buf))) = tokio::time::timeout(T, read_reply(&mut stream)).await {
                success_of(&buf, 100);
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.stop().await;
    }

    #[tokio::test]
    async fn address_not_allowed_is_dropped() {
        // A list without 127.0.0.1.
        let others = AllowList::parse(&["10.0.0.0/8".into(), "::1".into()]).expect("list");
        let pm = Portmapper::bind(localhost(), vec![NFS], others)
            .await
            .expect("bind");
        let s = start_with(pm).await;
        let mut stream = TcpStream::connect(s.addr).await.expect("connect");
        let _ = stream
            .write_all(&frame(&call(1, 2, PROGRAM, 2, 0, &[])))
            .await;
        assert!(is_closed(&mut stream).await);
        let sock = UdpSocket::bind(localhost()).await.expect("bind");
        sock.send_to(&call(2, 2, PROGRAM, 2, 0, &[]), s.addr)
            .await
            .expect("send");
        let mut buf = [0u8; 256];
        let got = tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await;
        assert!(got.is_err(), "UDP from a refused address must be ignored");
        s.stop().await;
        // And the allowed case answers.
        let pm = Portmapper::bind(localhost(), vec![NFS], AllowList::loopback())
            .await
            .expect("bind");
        let s = start_with(pm).await;
        success_of(&tcp_call(s.addr, &call(3, 2, PROGRAM, 2, 0, &[])).await, 3);
        s.stop().await;
    }

    #[tokio::test]
    async fn idle_connection_is_closed() {
        let mut pm = Portmapper::bind(localhost(), vec![NFS], AllowList::loopback())
            .await
            .expect("bind");
        pm.limits.idle_close = Duration::from_millis(200);
        pm.limits.stall = Duration::from_millis(200);
        let s = start_with(pm).await;
        let mut stream = TcpStream::connect(s.addr).await.expect("connect");
        // Half a header, then silence.
        stream.write_all(&[0x80, 0]).await.expect("write");
        let started = tokio::time::Instant::now();
        assert!(is_closed(&mut stream).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        s.stop().await;
    }

    #[tokio::test]
    async fn cancel_stops_run_with_open_connections() {
        let s = start().await;
        let mut open = TcpStream::connect(s.addr).await.expect("connect");
        send_record(&mut open, &call(1, 2, PROGRAM, 2, 0, &[])).await;
        success_of(&recv_record(&mut open).await, 1);
        s.stop().await; // asserts run() returns within 10 s
        assert!(is_closed(&mut open).await);
    }

    #[tokio::test]
    async fn bind_validates_and_shares_port() {
        let pm = Portmapper::bind(localhost(), vec![NFS], AllowList::loopback())
            .await
            .expect("bind");
        let port = pm.local_addr().port();
        assert_ne!(port, 0);
        // UDP really is on the same port: a UDP NULL to local_addr() is answered.
        let s = start_with(pm).await;
        success_of(&udp_call(s.addr, &call(1, 2, PROGRAM, 2, 0, &[])).await, 1);
        s.stop().await;
        let bad = Mapping { prot: 132, ..NFS };
        let err = Portmapper::bind(localhost(), vec![bad], AllowList::loopback())
            .await
            .err()
            .expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = Portmapper::bind(
            localhost(),
            vec![NFS; MAX_MAPPINGS + 1],
            AllowList::loopback(),
        )
        .await
        .err()
        .expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn uaddr_format() {
        assert_eq!(
            uaddr(IpAddr::V4(Ipv4Addr::LOCALHOST), 2049),
            "127.0.0.1.8.1"
        );
        assert_eq!(uaddr("::1".parse().unwrap(), 111), "::1.0.111");
    }

    fn portmap() -> Portmap {
        Portmap {
            table: vec![NFS, MOUNT_TCP],
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }

    /// Answers `msg` as the front does (header, then the portmapper).
    fn handle(msg: &[u8], transport: Transport) -> Option<Reply> {
        let caller = Caller {
            peer: localhost(),
            local: None,
            transport,
        };
        let budget = Budget::new(MAX_RECORD);
        futures::executor::block_on(front::answer(&portmap(), msg, &caller, &budget))
    }

    proptest! {
        #[test]
        fn handle_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = handle(&bytes, Transport::Udp);
        }

        #[test]
        fn handle_never_panics_on_valid_header_with_garbage(
            vers in 0u32..6,
            proc in 0u32..14,
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let msg = call(1, 2, PROGRAM, vers, proc, &tail);
            let reply = handle(&msg, Transport::Tcp);
            prop_assert!(reply.is_some());
        }
    }

    // ---- real client: rpcinfo from Debian's rpcbind package ----

    fn rpcinfo_path() -> String {
        for p in ["/usr/sbin/rpcinfo", "/sbin/rpcinfo", "/usr/bin/rpcinfo"] {
            if std::path::Path::new(p).exists() {
                return p.to_string();
            }
        }
        panic!(
            "rpcinfo not found: install it with `apt-get install -y --no-install-recommends rpcbind` \
             (do not start the rpcbind daemon)"
        );
    }

    async fn rpcinfo(args: &[&str]) -> (bool, String) {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(rpcinfo_path())
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("rpcinfo finished in time")
        .expect("rpcinfo ran");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Debian's rpcinfo (1.2.6) asks rpcbind on port 111 even with `-n PORT`, so the ping
    /// test uses `-a UADDR -T tcp|udp`, which goes straight to our port.
    #[tokio::test]
    async fn rpcinfo_pings_tcp_and_udp() {
        let s = start().await;
        let ua = uaddr(s.addr.ip(), s.addr.port());
        for t in ["tcp", "udp"] {
            let (ok, out) = rpcinfo(&["-a", &ua, "-T", t, "100000", "2"]).await;
            assert!(ok, "rpcinfo -a -T {t} 100000 2: {out}");
            assert!(
                out.contains("program 100000 version 2 ready and waiting"),
                "{out}"
            );
            // No version: rpcinfo calls version 0, reads PROG_MISMATCH 2..4, pings each.
            let (ok, out) = rpcinfo(&["-a", &ua, "-T", t, "100000"]).await;
            assert!(ok, "rpcinfo -a -T {t} 100000: {out}");
            for v in 2..=4 {
                assert!(
                    out.contains(&format!("program 100000 version {v} ready and waiting")),
                    "{out}"
                );
            }
        }
        // Another program on our port is refused.
        let (ok, out) = rpcinfo(&["-a", &ua, "-T", "tcp", "100003", "3"]).await;
        assert!(!ok, "{out}");
        assert!(out.contains("not available"), "{out}");
        s.stop().await;
    }

    /// `rpcinfo -p`, `-s` and `-l` always ask port 111, so this binds 127.0.0.111:111:
    /// needs root and no rpcbind listening on the wildcard address (scripts/install-deps
    /// installs rpcbind for rpcinfo without starting its daemon).
    #[tokio::test]
    async fn rpcinfo_dump_on_port_111() {
        let addr: SocketAddr = "127.0.0.111:111".parse().unwrap();
        let pm = Portmapper::bind(addr, vec![NFS, MOUNT_TCP, MOUNT_UDP], AllowList::loopback())
            .await
            .expect("bind 127.0.0.111:111 (root? rpcbind running?)");
        let s = start_with(pm).await;
        let (ok, out) = rpcinfo(&["-p", "127.0.0.111"]).await;
        eprintln!("rpcinfo -p:\n{out}");
        assert!(ok, "{out}");
        assert!(out.contains("100003    3   tcp   2049"), "{out}");
        assert!(out.contains("100005    3   udp  20048"), "{out}");
        let (ok, out) = rpcinfo(&["-s", "127.0.0.111"]).await;
        assert!(ok, "{out}");
        assert!(out.contains("100003"), "{out}");
        let (ok, out) = rpcinfo(&["-l", "127.0.0.111", "100003", "3"]).await;
        eprintln!("rpcinfo -l:\n{out}");
        assert!(ok, "{out}");
        assert!(out.contains("127.0.0.111.8.1"), "{out}");
        // -T uses rpcbind GETADDR to find the service, then pings it (here: ourselves).
        let (ok, out) = rpcinfo(&["-T", "tcp", "127.0.0.111", "100000", "4"]).await;
        assert!(ok, "{out}");
        // -n PORT also asks rpcbind on 111 first (Debian's rpcinfo), so it only works here.
        for t in ["-t", "-u"] {
            let (ok, out) = rpcinfo(&["-n", "111", t, "127.0.0.111", "100000", "2"]).await;
            assert!(ok, "{t}: {out}");
            assert!(out.contains("ready and waiting"), "{out}");
        }
        let (ok, out) = rpcinfo(&["127.0.0.111"]).await;
        eprintln!("rpcinfo:\n{out}");
        assert!(ok, "{out}");
        assert!(out.contains("127.0.0.111.8.1"), "{out}");
        s.stop().await;
    }
}
