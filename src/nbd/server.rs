//! The NBD server's connections: the accept loop (allow-list, a connection limit, TCP
//! keepalive), the fixed newstyle handshake with its options, and transmission, where up to
//! [`IN_FLIGHT`] requests run at once and their replies go out as each is done (NBD replies
//! carry the request's cookie, so they need not keep order).
//!
//! Limits, as the NFS front has them: the whole negotiation within [`HANDSHAKE`], at most
//! [`MAX_OPTIONS`] options; an option's announced length and a request's length are checked
//! before anything is read or allocated; a connection idle for [`IDLE_CLOSE`] with nothing in
//! flight is closed; a request half sent or a reply the client does not take for [`STALL`]
//! closes it. A graceful stop answers what is in flight, then closes.
//!
//! Must not: know what an export is beyond [`Exports`] and [`BlockDevice`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::proto::{self, *};
use crate::allow::AllowList;
use crate::block::Acceptor;
pub use crate::block::{BlockDevice, BlockError, Pieces};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Requests of one connection in flight at once.
pub const IN_FLIGHT: usize = 16;
/// The whole negotiation, greeting to the last option.
pub const HANDSHAKE: Duration = Duration::from_secs(30);
/// Options one connection may send.
pub const MAX_OPTIONS: usize = 64;
/// A connection with nothing in flight and no request for this long is closed.
pub const IDLE_CLOSE: Duration = Duration::from_secs(6 * 60);
/// A request half read, or a reply not taken, for this long closes the connection.
pub const STALL: Duration = Duration::from_secs(60);
/// The block size offered: any byte range works, 4 KiB is preferred.
const MIN_BLOCK: u32 = 1;
const PREFERRED_BLOCK: u32 = 4096;

/// The exports a client may see and open.
pub trait Exports: Send + Sync {
    /// The names of the exports a client at `peer` may open.
    fn list(&self, peer: IpAddr) -> Vec<String>;
    /// The export `name`, if it exists and `peer` may open it (one answer for both, so a
    /// client cannot learn the names of exports it may not use).
    fn open(&self, name: &str, peer: IpAddr) -> Option<Arc<dyn BlockDevice>>;
}

/// The NBD server on one TCP port.
pub struct NbdServer {
    acceptor: Acceptor,
    exports: Arc<dyn Exports>,
}

impl NbdServer {
    pub async fn bind(
        addr: SocketAddr,
        exports: Arc<dyn Exports>,
        allow: AllowList,
    ) -> std::io::Result<NbdServer> {
        Ok(NbdServer {
            acceptor: Acceptor::bind(addr, allow, MAX_CONNECTIONS, "nbd").await?,
            exports,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.acceptor.local_addr()
    }

    /// Serves until `cancel`; connections run as tasks of `tasks`.
    pub async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        let (exports, stop) = (self.exports, cancel.clone());
        self.acceptor
            .run(cancel, tasks, move |stream, peer| {
                serve(stream, peer.ip(), exports.clone(), stop.clone())
            })
            .await
    }
}

type Res<T> = Result<T, String>;

/// What a connection is: a TCP stream, or (fuzzing) one end of an in-memory pipe.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

async fn read_exact<const N: usize>(s: &mut (impl AsyncRead + Unpin)) -> Res<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    Ok(b)
}

async fn write_all(s: &mut (impl AsyncWrite + Unpin), b: &[u8]) -> Res<()> {
    s.write_all(b).await.map_err(|e| e.to_string())
}

/// One connection: negotiation, then transmission of the export it chose.
pub(crate) async fn serve(
    mut s: impl Conn,
    peer: IpAddr,
    exports: Arc<dyn Exports>,
    cancel: CancellationToken,
) -> Res<()> {
    // A stop does not wait for a client still haggling.
    let chosen = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(HANDSHAKE, negotiate(&mut s, peer, &*exports)) => r,
    };
    let chosen = chosen.map_err(|_| "the negotiation took too long".to_string())??;
    let Some(chosen) = chosen else {
        return Ok(());
    };
    tracing::info!(%peer, export = %chosen.name, structured = chosen.features.structured,
        base_allocation = chosen.features.base_allocation, "nbd: export opened");
    transmit(s, chosen.disk, chosen.features, cancel).await
}

/// What a client negotiated beyond the basics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Features {
    /// Structured replies (`NBD_OPT_STRUCTURED_REPLY`): READs are answered with data or hole
    /// chunks, and errors carry a message.
    pub structured: bool,
    /// The `base:allocation` meta context: `NBD_CMD_BLOCK_STATUS` says which runs read as
    /// zeros.
    pub base_allocation: bool,
}

/// The export a negotiation ended with.
struct Chosen {
    name: String,
    disk: Arc<dyn BlockDevice>,
    features: Features,
}

/// The handshake and option haggling; the export chosen by `NBD_OPT_GO` or
/// `NBD_OPT_EXPORT_NAME`, or `None` when the client aborted.
async fn negotiate(s: &mut impl Conn, peer: IpAddr, exports: &dyn Exports) -> Res<Option<Chosen>> {
    write_all(s, &greeting()).await?;
    let flags = client_flags(read_exact::<4>(s).await?)?;
    let no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export of the last NBD_OPT_SET_META_CONTEXT, if it selected base:allocation.
    let mut meta_export: Option<String> = None;
    let features = |structured: bool, meta_export: &Option<String>, name: &str| Features {
        structured,
        base_allocation: meta_export.as_deref() == Some(name),
    };
    for _ in 0..MAX_OPTIONS {
        let h = option_header(read_exact::<16>(s).await?)?;
        if h.len > MAX_OPTION_LEN {
            // Too long to be one of ours: say so, and drop its data unread only if small
            // enough to skip; a huge one closes the connection.
            return Err(format!("option {} announces {} bytes", h.option, h.len));
        }
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data).await.map_err(|e| e.to_string())?;
        match h.option {
            OPT_ABORT => {
                let _ = write_all(s, &option_reply(OPT_ABORT, REP_ACK, &[])).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    write_all(
                        s,
                        &option_error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data"),
                    )
                    .await?;
                    continue;
                }
                for name in exports.list(peer) {
                    write_all(s, &server_reply(&name)).await?;
                }
                write_all(s, &option_reply(OPT_LIST, REP_ACK, &[])).await?;
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).to_string();
                // No way to refuse but closing the connection.
                let disk = exports
                    .open(&name, peer)
                    .ok_or_else(|| format!("no export {name:?}"))?;
                write_all(
                    s,
                    &export_name_reply(
                        disk.size(),
                        transmission_flags(&*disk, structured),
                        no_zeroes,
                    ),
                )
                .await?;
                let features = features(structured, &meta_export, &name);
                return Ok(Some(Chosen {
                    name,
                    disk,
                    features,
                }));
            }
            OPT_INFO | OPT_GO => {
                let Some(req) = info_request(&data) else {
                    write_all(
                        s,
                        &option_error(h.option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO"),
                    )
                    .await?;
                    continue;
                };
                let name = String::from_utf8_lossy(&req.name).to_string();
                let Some(disk) = exports.open(&name, peer) else {
                    let msg = format!(
                        "no export {name:?}: exports are named MOUNT/DISK (`livemount mounts`)"
                    );
                    write_all(s, &option_error(h.option, REP_ERR_UNKNOWN, &msg)).await?;
                    continue;
                };
                write_all(
                    s,
                    &info_export(
                        h.option,
                        disk.size(),
                        transmission_flags(&*disk, structured),
                    ),
                )
                .await?;
                for asked in &req.asked {
                    match *asked {
                        INFO_BLOCK_SIZE => {
                            write_all(
                                s,
                                &info_block_size(
                                    h.option,
                                    MIN_BLOCK,
                                    PREFERRED_BLOCK,
                                    proto::MAX_IO,
                                ),
                            )
                            .await?
                        }
                        INFO_NAME => write_all(s, &info_text(h.option, INFO_NAME, &name)).await?,
                        _ => {}
                    }
                }
                write_all(s, &option_reply(h.option, REP_ACK, &[])).await?;
                if h.option == OPT_GO {
                    let features = features(structured, &meta_export, &name);
                    return Ok(Some(Chosen {
                        name,
                        disk,
                        features,
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                let reply = if data.is_empty() {
                    structured = true;
                    option_reply(OPT_STRUCTURED_REPLY, REP_ACK, &[])
                } else {
                    option_error(
                        OPT_STRUCTURED_REPLY,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                };
                write_all(s, &reply).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = h.option == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces what an earlier one chose, even when it fails.
                    meta_export = None;
                }
                let refusal = if !structured {
                    Some((
                        REP_ERR_INVALID,
                        "meta contexts need NBD_OPT_STRUCTURED_REPLY first".to_string(),
                    ))
                } else {
                    None
                };
                let req = meta_request(&data);
                let refusal = refusal.or_else(|| match &req {
                    None => Some((REP_ERR_INVALID, "malformed meta context option".into())),
                    Some(r) => {
                        let name = String::from_utf8_lossy(&r.name);
                        exports.open(&name, peer).is_none().then(|| {
                            (
                                REP_ERR_UNKNOWN,
                                format!("no export {name:?}: exports are named MOUNT/DISK"),
                            )
                        })
                    }
                });
                if let Some((kind, msg)) = refusal {
                    write_all(s, &option_error(h.option, kind, &msg)).await?;
                    continue;
                }
                let Some(req) = req else { continue };
                // Listing with no query lists everything; SET with none selects nothing.
                let chosen = (!set && req.queries.is_empty())
                    || req.queries.iter().any(|q| asks_base_allocation(q, !set));
                if chosen {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    write_all(s, &meta_context_reply(h.option, id, BASE_ALLOCATION)).await?;
                    if set {
                        meta_export = Some(String::from_utf8_lossy(&req.name).to_string());
                    }
                }
                write_all(s, &option_reply(h.option, REP_ACK, &[])).await?;
            }
            other => {
                write_all(
                    s,
                    &option_error(other, REP_ERR_UNSUP, "option not supported by livemount"),
                )
                .await?;
            }
        }
    }
    Err(format!("more than {MAX_OPTIONS} options"))
}

fn transmission_flags(disk: &dyn BlockDevice, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if structured {
        // A READ's reply is always one chunk.
        f |= TFLAG_SEND_DF;
    }
    if disk.read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

/// A reply ready to go: its head (a simple reply's header, or structured chunks) and a
/// READ's data.
struct Reply {
    head: Bytes,
    data: Option<Pieces>,
}

/// Transmission: requests read in order, run as tasks (at most [`IN_FLIGHT`]), replies written
/// by one writer as they come.
async fn transmit(
    s: impl Conn,
    disk: Arc<dyn BlockDevice>,
    features: Features,
    cancel: CancellationToken,
) -> Res<()> {
    let (mut rd, mut wr) = tokio::io::split(s);
    let (tx, mut rx) = mpsc::channel::<Reply>(IN_FLIGHT);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // Set when the writer gives up (the client does not take its replies, or is gone): the
    // connection ends then, not when it would next go idle.
    let dead = CancellationToken::new();
    let writer_dead = dead.clone();
    let writer = tokio::spawn(async move {
        let _dead = writer_dead.drop_guard();
        while let Some(r) = rx.recv().await {
            // Head and data in one vectored write where the stream takes one.
            let mut reply = r.head.chain(r.data.unwrap_or_default());
            let write = wr.write_all_buf(&mut reply);
            match tokio::time::timeout(STALL, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("the client did not take a reply for 60 s".into()),
            }
        }
        let _ = wr.shutdown().await;
        Ok(())
    });
    let result = loop {
        // Idle: nothing in flight and no request for IDLE_CLOSE; a stop ends the loop.
        let mut first = [0u8; 1];
        let got = tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            _ = dead.cancelled() => break Ok(()),
            r = tokio::time::timeout(IDLE_CLOSE, rd.read(&mut first)) => r,
        };
        match got {
            Err(_) if slots.available_permits() == IN_FLIGHT => break Err("idle".into()),
            Err(_) => continue,
            Ok(Ok(0)) => break Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Err(e.to_string()),
        }
        let mut rest = [0u8; 27];
        if let Err(e) = read_within(&mut rd, &mut rest).await {
            break Err(e);
        }
        let mut raw = [0u8; 28];
        raw[0] = first[0];
        raw[1..].copy_from_slice(&rest);
        let req = match request(raw) {
            Ok(r) => r,
            Err(e) => break Err(e),
        };
        if req.kind == CMD_DISC {
            break Ok(());
        }
        // A WRITE's data is read before the next request, whatever becomes of it; the
        // buffer grows with the bytes that arrive, not with the length announced.
        let mut data = Vec::new();
        if req.kind == CMD_WRITE {
            if req.len > proto::MAX_IO {
                break Err(format!("a WRITE of {} bytes", req.len));
            }
            if let Err(e) = read_data(&mut rd, req.len, &mut data).await {
                break Err(e);
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break Ok(());
        };
        let (disk, tx) = (disk.clone(), tx.clone());
        tokio::spawn(async move {
            let reply = run(&*disk, req, &data, features).await;
            let _ = tx.send(reply).await;
            drop(slot);
        });
    };
    // Answer what is in flight, then close.
    let _ = slots.acquire_many(IN_FLIGHT as u32).await;
    drop(tx);
    let written = writer.await.map_err(|e| e.to_string())?;
    result.and(written)
}

/// Reads a WRITE's `len` bytes of data into `data`, all within [`STALL`].
async fn read_data(rd: &mut (impl AsyncRead + Unpin), len: u32, data: &mut Vec<u8>) -> Res<()> {
    let mut part = (&mut *rd).take(u64::from(len));
    match tokio::time::timeout(STALL, part.read_to_end(data)).await {
        Ok(Ok(n)) if n == len as usize => Ok(()),
        Ok(Ok(n)) => Err(format!("a WRITE's data ended after {n} of {len} bytes")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("a request stalled halfway for 60 s".into()),
    }
}

/// Reads exactly `buf.len()` bytes, each part arriving within [`STALL`].
async fn read_within(rd: &mut (impl AsyncRead + Unpin), buf: &mut [u8]) -> Res<()> {
    match tokio::time::timeout(STALL, rd.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("a request stalled halfway for 60 s".into()),
    }
}

/// The most extents one BLOCK_STATUS reply carries, and the most bytes it looks at (the client
/// asks again from where the reply ends).
const MAX_EXTENTS: usize = 1 << 16;
const MAX_STATUS_SPAN: u32 = 1 << 30;

/// Runs one request; its reply.
async fn run(disk: &dyn BlockDevice, req: Request, data: &[u8], features: Features) -> Reply {
    let ok = || Reply {
        head: Bytes::copy_from_slice(&simple_reply(0, req.cookie)),
        data: None,
    };
    let fail = |e: BlockError| {
        if let BlockError::Io(text) = &e {
            tracing::error!(offset = req.offset, len = req.len, error = ?text, "nbd: request failed");
        }
        error_reply(req, features, errno(&e), message(&e))
    };
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= disk.size());
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.kind {
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS if !in_range => {
            fail(BlockError::OutOfRange)
        }
        CMD_READ if req.len > proto::MAX_IO => fail(BlockError::OutOfRange),
        CMD_READ => read(disk, req, features).await.unwrap_or_else(fail),
        CMD_BLOCK_STATUS if !features.base_allocation => error_reply(
            req,
            features,
            EINVAL,
            "NBD_CMD_BLOCK_STATUS needs the base:allocation meta context",
        ),
        CMD_BLOCK_STATUS if req.len == 0 => {
            error_reply(req, features, EINVAL, "a block status query of 0 bytes")
        }
        CMD_BLOCK_STATUS => match disk.extents(req.offset, req.len.min(MAX_STATUS_SPAN).into()) {
            Ok(runs) if runs.is_empty() => fail(BlockError::Io("no extents for a range".into())),
            Ok(mut runs) => {
                let most = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    1
                } else {
                    MAX_EXTENTS
                };
                runs.truncate(most);
                Reply {
                    head: block_status(req.cookie, &runs),
                    data: None,
                }
            }
            Err(e) => fail(e),
        },
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if disk.read_only() => fail(BlockError::ReadOnly),
        CMD_WRITE => match disk.write(req.offset, data, fua).await {
            Ok(()) => ok(),
            Err(e) => fail(e),
        },
        CMD_TRIM | CMD_WRITE_ZEROES => {
            match disk.write_zeros(req.offset, req.len.into(), fua).await {
                Ok(()) => ok(),
                Err(e) => fail(e),
            }
        }
        CMD_FLUSH => match disk.flush().await {
            Ok(()) => ok(),
            Err(e) => fail(e),
        },
        _ => error_reply(req, features, EINVAL, "unknown command"),
    }
}

/// A READ's reply: the data, after a simple reply's header or in one data chunk; with
/// structured replies, a range that reads as zeros goes as one hole chunk instead. The read is
/// made either way (zeros cost no fetch), so read-ahead and the mount's counts see it.
async fn read(
    disk: &dyn BlockDevice,
    req: Request,
    features: Features,
) -> Result<Reply, BlockError> {
    let data = disk.read(req.offset, req.len).await?;
    if data.len() != req.len as usize {
        return Err(BlockError::Io(format!(
            "a read of {} bytes at {} gave {} bytes",
            req.len,
            req.offset,
            data.len()
        )));
    }
    if !features.structured {
        return Ok(Reply {
            head: Bytes::copy_from_slice(&simple_reply(0, req.cookie)),
            data: Some(data),
        });
    }
    if req.len == 0 {
        return Ok(Reply {
            head: reply_none(req.cookie),
            data: None,
        });
    }
    if let [only] = disk.extents(req.offset, req.len.into())?[..] {
        if only.zero {
            return Ok(Reply {
                head: offset_hole(req.cookie, req.offset, req.len),
                data: None,
            });
        }
    }
    Ok(Reply {
        head: offset_data_head(req.cookie, req.offset, data.len() as u32),
        data: Some(data),
    })
}

/// A failed request's reply: a simple reply with the error number, or with structured replies
/// an error chunk that also says why.
fn error_reply(req: Request, features: Features, error: u32, message: &str) -> Reply {
    let head = if features.structured {
        structured_error(req.cookie, error, message)
    } else {
        Bytes::copy_from_slice(&simple_reply(error, req.cookie))
    };
    Reply { head, data: None }
}

#[cfg(test)]
mod tests {
    use super::super::fuzzing::{disk, Harness, MemDisk};
    use super::*;
    use tokio::net::TcpStream;

    /// A server on 127.0.0.1 over the two disks, running until the token is cancelled.
    async fn start(rw: &Arc<MemDisk>, ro: &Arc<MemDisk>) -> (SocketAddr, CancellationToken) {
        let exports = Arc::new(super::super::fuzzing::TwoDisks {
            rw: rw.clone(),
            ro: ro.clone(),
        });
        let server = NbdServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            exports,
            AllowList::loopback(),
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(server.run(cancel.clone(), TaskTracker::new()));
        (addr, cancel)
    }

    fn qemu_io(url: &str, cmd: &str) -> std::process::Output {
        // Run by QEMU's own NBD client; a missing qemu-io fails the test.
        std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd, url])
            .output()
            .expect("qemu-io is required (scripts/install-deps installs qemu-utils)")
    }

    /// QEMU's own NBD client against the server: reads, writes, flush, zeroes, a read-only
    /// export refusing writes, an unknown export refused, a read past the end refused.
    #[tokio::test(flavor = "multi_thread")]
    async fn qemu_reads_and_writes_through_the_nbd_server() {
        let (rw, ro) = (disk(4 << 20, 0x11, false), disk(1 << 20, 0x22, true));
        let (addr, cancel) = start(&rw, &ro).await;
        let port = addr.port();
        let url = |name: &str| format!("nbd://127.0.0.1:{port}/{name}");
        let run = |name: &str, cmd: &str| {
            let (u, c) = (url(name), cmd.to_string());
            tokio::task::spawn_blocking(move || qemu_io(&u, &c))
        };

        let out = run("m/rw.img", "read -P 0x11 0 4M").await.unwrap();
        assert!(out.status.success(), "{out:?}");
        let out = run("m/rw.img", "write -P 0x5a 4096 8192").await.unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(rw.bytes.lock().unwrap()[4096..12288]
            .iter()
            .all(|b| *b == 0x5a));
        let out = run("m/rw.img", "write -z 0 4096").await.unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(rw.bytes.lock().unwrap()[..4096].iter().all(|b| *b == 0));
        let out = run("m/rw.img", "flush").await.unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(rw.flushes.load(std::sync::atomic::Ordering::SeqCst) >= 1);

        // The read-only export says so: QEMU opens it read-only, and refuses to open it for
        // writing.
        let u = url("m/ro.img");
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("qemu-io")
                .args(["-r", "-f", "raw", "-c", "read -P 0x22 0 1M", &u])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(out.status.success(), "{out:?}");
        let out = run("m/ro.img", "write -P 1 0 512").await.unwrap();
        assert!(!out.status.success(), "{out:?}");
        assert!(ro.bytes.lock().unwrap().iter().all(|b| *b == 0x22));

        let out = run("nosuch/disk", "read 0 512").await.unwrap();
        assert!(!out.status.success(), "{out:?}");
        cancel.cancel();
    }
    /// Negotiates `name` with NBD_OPT_GO over a raw socket; the transmission flags.
    async fn go(s: &mut TcpStream, name: &str) -> Option<u16> {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt).await.unwrap();
        let mut flags = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).await.unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            s.read_exact(&mut d).await.unwrap();
            match kind {
                REP_INFO if d[..2] == INFO_EXPORT.to_be_bytes() => {
                    flags = Some(u16::from_be_bytes([d[10], d[11]]))
                }
                REP_ACK => return flags,
                k if k & (1 << 31) != 0 => return None,
                _ => {}
            }
        }
    }

    async fn ask(s: &mut TcpStream, kind: u16, offset: u64, len: u32, data: &[u8]) -> u32 {
        let mut r = request(kind, offset, len);
        r.extend_from_slice(data);
        s.write_all(&r).await.unwrap();
        let mut h = [0u8; 16];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(u64::from_be_bytes(h[8..].try_into().unwrap()), 42);
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        if err == 0 && kind == CMD_READ {
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).await.unwrap();
        }
        err
    }

    /// A request header for `kind` (cookie 42), as `ask` sends it, without its data.
    fn request(kind: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&42u64.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    }

    /// Hostile connections harm no other: one that asks for 64 MiB of reads and takes none
    /// of them, one that resets halfway through its handshake, one that announces a WRITE
    /// larger than the limit; meanwhile QEMU opens the export and reads it.
    #[tokio::test(flavor = "multi_thread")]
    async fn hostile_connections_harm_no_other() {
        let (rw, ro) = (disk(4 << 20, 0x11, false), disk(1 << 20, 0x22, true));
        let (addr, cancel) = start(&rw, &ro).await;
        let mut stuck = TcpStream::connect(addr).await.unwrap();
        assert!(go(&mut stuck, "m/rw.img").await.is_some());
        for _ in 0..16 {
            stuck
                .write_all(&request(CMD_READ, 0, 4 << 20))
                .await
                .unwrap();
        }
        let reset = TcpStream::connect(addr).await.unwrap();
        reset.try_write(&3u32.to_be_bytes()).ok();
        socket2::SockRef::from(&reset)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(reset);
        let mut huge = TcpStream::connect(addr).await.unwrap();
        assert!(go(&mut huge, "m/rw.img").await.is_some());
        huge.write_all(&request(CMD_WRITE, 0, proto::MAX_IO + 1))
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = huge.read_to_end(&mut rest).await;
        assert!(
            rest.len() <= 16,
            "the oversize WRITE closes its connection (at most an error reply)"
        );

        let u = format!("nbd://127.0.0.1:{}/m/rw.img", addr.port());
        let out = tokio::task::spawn_blocking(move || qemu_io(&u, "read -P 0x11 0 4M"))
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"),
            "{out:?}"
        );
        drop(stuck);
        cancel.cancel();
    }

    /// What no QEMU sends, sent by hand: a read past the end, a write to a read-only export
    /// (its data still read), an unknown command, an unknown export, a bad magic and an
    /// option announcing more than the limit (the connection closes; others go on).
    #[tokio::test(flavor = "multi_thread")]
    async fn bad_requests_get_their_error_and_nothing_is_written() {
        let (rw, ro) = (disk(1 << 20, 0x11, false), disk(1 << 20, 0x22, true));
        let (addr, cancel) = start(&rw, &ro).await;

        let mut s = TcpStream::connect(addr).await.unwrap();
        let flags = go(&mut s, "m/ro.img").await.unwrap();
        assert!(flags & TFLAG_READ_ONLY != 0);
        assert_eq!(ask(&mut s, CMD_READ, (1 << 20) - 10, 11, &[]).await, EINVAL);
        assert_eq!(ask(&mut s, CMD_READ, u64::MAX - 1, 4, &[]).await, EINVAL);
        assert_eq!(ask(&mut s, CMD_WRITE, 0, 4, &[9; 4]).await, EPERM);
        assert_eq!(ask(&mut s, CMD_WRITE_ZEROES, 0, 4096, &[]).await, EPERM);
        assert_eq!(ask(&mut s, 99, 0, 0, &[]).await, EINVAL);
        assert_eq!(ask(&mut s, CMD_READ, 0, 512, &[]).await, 0);
        assert!(ro.bytes.lock().unwrap().iter().all(|b| *b == 0x22));

        let mut s2 = TcpStream::connect(addr).await.unwrap();
        assert_eq!(go(&mut s2, "m/other.img").await, None, "unknown export");
        let mut s3 = TcpStream::connect(addr).await.unwrap();
        let mut g = [0u8; 18];
        s3.read_exact(&mut g).await.unwrap();
        s3.write_all(&3u32.to_be_bytes()).await.unwrap();
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&u32::MAX.to_be_bytes());
        s3.write_all(&opt).await.unwrap();
        let mut rest = Vec::new();
        let n = s3.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(
            n, 0,
            "a 4 GiB option closes the connection, nothing allocated"
        );
        // A bad request magic closes only its own connection.
        let mut r = vec![0u8; 28];
        r[..4].copy_from_slice(b"JUNK");
        s.write_all(&r).await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        let mut s4 = TcpStream::connect(addr).await.unwrap();
        assert!(go(&mut s4, "m/rw.img").await.is_some());
        assert_eq!(ask(&mut s4, CMD_READ, 0, 4096, &[]).await, 0);
        cancel.cancel();
    }

    /// A connection over an in-memory pipe to [`TwoDisks`]: the client's end and the
    /// server's task.
    fn pipe() -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Res<()>>,
        Arc<MemDisk>,
    ) {
        let (client, server) = tokio::io::duplex(64 << 10);
        let rw = disk(4 << 20, 0x5a, false);
        let exports = Arc::new(super::super::fuzzing::TwoDisks {
            rw: rw.clone(),
            ro: disk(4096, 0, true),
        });
        let peer = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let task = tokio::spawn(serve(server, peer, exports, CancellationToken::new()));
        (client, task, rw)
    }

    /// Opens `m/rw.img` and takes the handshake's replies.
    async fn open_rw(c: &mut tokio::io::DuplexStream) {
        c.write_all(&Harness::go("m/rw.img")).await.unwrap();
        let mut replies = [0u8; 18 + 32 + 20];
        c.read_exact(&mut replies).await.unwrap();
    }

    /// How long until the server ends the connection, and how it ended.
    async fn time_to_end(task: tokio::task::JoinHandle<Res<()>>) -> (Duration, Res<()>) {
        let t = tokio::time::Instant::now();
        let r = task.await.unwrap();
        (t.elapsed(), r)
    }

    fn about(d: Duration, want: Duration) -> bool {
        d >= want && d < want + Duration::from_secs(1)
    }

    /// The clocks of a connection, on a paused clock: a handshake that never ends is cut at
    /// HANDSHAKE; an open export with nothing asked is closed at IDLE_CLOSE, and one asked
    /// something every 5 min is not; a request half sent is cut at STALL.
    #[tokio::test(start_paused = true)]
    async fn a_silent_handshake_an_idle_export_and_a_stalled_request_are_closed_in_time() {
        let (_c, task, _) = pipe();
        let (took, r) = time_to_end(task).await;
        assert!(about(took, HANDSHAKE), "{took:?} {r:?}");

        let (mut c, task, _) = pipe();
        open_rw(&mut c).await;
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(5 * 60)).await;
            c.write_all(&Harness::request(CMD_FLUSH, 0, 0, 0))
                .await
                .unwrap();
            let mut reply = [0u8; 16];
            c.read_exact(&mut reply).await.unwrap();
            assert_eq!(&reply[4..8], &[0, 0, 0, 0], "flush answered");
        }
        let (took, r) = time_to_end(task).await;
        assert!(about(took, IDLE_CLOSE), "{took:?} {r:?}");

        let (mut c, task, _) = pipe();
        open_rw(&mut c).await;
        c.write_all(&Harness::request(CMD_READ, 0, 0, 512)[..10])
            .await
            .unwrap();
        let (took, r) = time_to_end(task).await;
        assert!(about(took, STALL), "{took:?} {r:?}");

        // A WRITE whose data stops halfway: the same.
        let (mut c, task, rw) = pipe();
        open_rw(&mut c).await;
        c.write_all(&Harness::request(CMD_WRITE, 0, 0, 4096))
            .await
            .unwrap();
        c.write_all(&[1u8; 100]).await.unwrap();
        let (took, r) = time_to_end(task).await;
        assert!(about(took, STALL), "{took:?} {r:?}");
        assert!(rw.bytes.lock().unwrap()[..4096].iter().all(|b| *b == 0x5a));
    }

    /// A graceful stop ends a connection still in its handshake at once, not at HANDSHAKE.
    #[tokio::test(start_paused = true)]
    async fn a_stop_ends_a_connection_in_its_handshake_at_once() {
        let (_client, server) = tokio::io::duplex(64 << 10);
        let exports = Arc::new(super::super::fuzzing::TwoDisks {
            rw: disk(4096, 0, false),
            ro: disk(4096, 0, true),
        });
        let cancel = CancellationToken::new();
        let peer = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let task = tokio::spawn(serve(server, peer, exports, cancel.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        cancel.cancel();
        let (took, r) = time_to_end(task).await;
        assert!(took < Duration::from_secs(1) && r.is_ok(), "{took:?} {r:?}");
    }

    /// A client that asks and never takes its replies: the connection ends STALL after the
    /// first reply that cannot be written, not at IDLE_CLOSE.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_no_reply_is_cut_at_stall() {
        let (mut c, task, _) = pipe();
        open_rw(&mut c).await;
        // 4 reads of 1 MiB: far more than the pipe holds.
        for i in 0..4u64 {
            c.write_all(&Harness::request(CMD_READ, 0, i << 20, 1 << 20))
                .await
                .unwrap();
        }
        let (took, r) = time_to_end(task).await;
        assert!(about(took, STALL), "{took:?} {r:?}");
        assert!(r.unwrap_err().contains("did not take a reply"));
    }
}
