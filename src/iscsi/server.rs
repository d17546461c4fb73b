//! The iSCSI target's connections: the accept loop (allow-list, a connection limit, TCP
//! keepalive) and one connection's life: login (`super::login`: security and operational
//! negotiation, CHAP, discovery) within [`LOGIN_TIME`], then the full feature phase
//! (`super::session`). One connection per session.
//!
//! Limits, as the NBD server has them: the whole login within [`LOGIN_TIME`]; a PDU's
//! announced lengths are checked before anything is read or allocated; a connection with
//! nothing in flight and nothing received for [`IDLE_CLOSE`] is closed; a PDU half sent, a
//! write's data not sent, or a reply the initiator does not take for [`STALL`] closes it. A
//! graceful stop ends a login at once, answers the commands in flight of a session, then
//! closes.
//!
//! Must not: know what a target is beyond [`Targets`] and [`Lun`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pdu::{self, Bhs, BHS_LEN};
use super::scsi::Lun;
use super::{login, session};
use crate::block::Acceptor;
use crate::nfs::AllowList;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The whole login, first PDU to the full feature phase.
pub const LOGIN_TIME: Duration = Duration::from_secs(30);
/// A session with nothing in flight and no PDU for this long is closed (initiators send
/// NOP-Outs every few seconds to keep theirs).
pub const IDLE_CLOSE: Duration = Duration::from_secs(6 * 60);
/// A PDU half read, a write's data not sent, or a reply not taken, for this long closes the
/// connection.
pub const STALL: Duration = Duration::from_secs(60);

/// CHAP credentials a target requires of an initiator (one-way CHAP, MD5).
#[derive(Clone)]
pub struct Chap {
    pub user: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chap")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// One target as a session sees it: its LUNs (by number) and how a login must authenticate.
pub struct Target {
    pub name: String,
    pub luns: Vec<(u64, Arc<Lun>)>,
    /// `Some`: a login must pass CHAP with these credentials; `None`: no authentication.
    pub chap: Option<Chap>,
}

/// The targets a client may see and log in to.
pub trait Targets: Send + Sync {
    /// The names of the targets a client at `peer` may see (SendTargets).
    fn list(&self, peer: IpAddr) -> Vec<String>;
    /// The target `name`, if it exists and `peer` may use it (one answer for both, so a
    /// client cannot learn the names of targets it may not use).
    fn open(&self, name: &str, peer: IpAddr) -> Option<Target>;
}

/// The iSCSI target on one TCP port.
pub struct IscsiServer {
    acceptor: Acceptor,
    targets: Arc<dyn Targets>,
}

impl IscsiServer {
    pub async fn bind(
        addr: SocketAddr,
        targets: Arc<dyn Targets>,
        allow: AllowList,
    ) -> std::io::Result<IscsiServer> {
        Ok(IscsiServer {
            acceptor: Acceptor::bind(addr, allow, MAX_CONNECTIONS, "iscsi").await?,
            targets,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.acceptor.local_addr()
    }

    /// Serves until `cancel`; connections run as tasks of `tasks`.
    pub async fn run(self, cancel: CancellationToken, tasks: TaskTracker) {
        let (targets, stop) = (self.targets, cancel.clone());
        self.acceptor
            .run(cancel, tasks, move |stream, peer| {
                // SendTargets answers with the address the initiator reached.
                let local = stream
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 3260)));
                serve(stream, peer.ip(), local, targets.clone(), stop.clone())
            })
            .await
    }
}

pub(crate) type Res<T> = Result<T, String>;

/// What a connection is: a TCP stream, or (fuzzing) one end of an in-memory pipe.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// One PDU as read: header, additional header segments, data (without padding).
pub(crate) struct Pdu {
    pub bhs: Bhs,
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

/// Reads one PDU; `None` at a clean end of the stream before it. The rest of the PDU after
/// its first byte must come within [`STALL`].
pub(crate) async fn read_pdu(s: &mut (impl AsyncRead + Unpin), max_data: u32) -> Res<Option<Pdu>> {
    let mut first = [0u8; 1];
    match s.read(&mut first).await {
        Ok(0) => Ok(None),
        Ok(_) => read_rest(s, first[0], max_data).await.map(Some),
        Err(e) => Err(e.to_string()),
    }
}

/// The rest of a PDU whose first byte is `first`: its data segment is refused (the
/// connection ends) if it announces more than `max_data` bytes, before anything is
/// allocated; everything must come within [`STALL`].
pub(crate) async fn read_rest(
    s: &mut (impl AsyncRead + Unpin),
    first: u8,
    max_data: u32,
) -> Res<Pdu> {
    let read = async {
        let mut h = [0u8; BHS_LEN];
        h[0] = first;
        s.read_exact(&mut h[1..]).await.map_err(|e| e.to_string())?;
        let bhs = Bhs(h);
        let len = bhs.data_len();
        if len > max_data {
            return Err(format!(
                "a PDU (opcode {:#04x}) announces {len} bytes of data, over {max_data}",
                bhs.opcode()
            ));
        }
        let mut ahs = vec![0u8; bhs.ahs_len()];
        s.read_exact(&mut ahs).await.map_err(|e| e.to_string())?;
        let padded = len as usize + pdu::padding(len as usize);
        let mut data = Vec::new();
        let n = (&mut *s)
            .take(padded as u64)
            .read_to_end(&mut data)
            .await
            .map_err(|e| e.to_string())?;
        if n != padded {
            return Err(format!("a PDU's data ended after {n} of {padded} bytes"));
        }
        data.truncate(len as usize);
        Ok(Pdu { bhs, ahs, data })
    };
    match tokio::time::timeout(STALL, read).await {
        Ok(r) => r,
        Err(_) => Err("a PDU stalled halfway for 60 s".into()),
    }
}

/// Writes one PDU (its data length set from `data`) within [`STALL`].
pub(crate) async fn write_pdu(
    s: &mut (impl AsyncWrite + Unpin),
    bhs: &Bhs,
    data: &[u8],
) -> Res<()> {
    let wire = bhs.with_data(data);
    match tokio::time::timeout(STALL, s.write_all(&wire)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the initiator did not take a reply for 60 s".into()),
    }
}

/// One connection: login, then the full feature phase of the session it made.
pub(crate) async fn serve(
    mut s: impl Conn,
    peer: IpAddr,
    local: SocketAddr,
    targets: Arc<dyn Targets>,
    cancel: CancellationToken,
) -> Res<()> {
    // A stop does not wait for an initiator still logging in.
    let done = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(LOGIN_TIME, login::login(&mut s, peer, &*targets)) => r,
    };
    let done = done.map_err(|_| "the login took too long".to_string())??;
    let Some(session) = done else {
        return Ok(());
    };
    match &session.target {
        Some(t) => {
            tracing::info!(%peer, initiator = ?session.initiator, target = %t.name, "iscsi: session opened")
        }
        None => {
            tracing::debug!(%peer, initiator = ?session.initiator, "iscsi: discovery session")
        }
    }
    session::run(s, session, peer, local, targets, cancel).await
}

#[cfg(test)]
mod tests {
    use super::super::fuzzing::{
        disk, MemDisk, TestTargets, CHAP_SECRET, CHAP_TARGET, OPEN_TARGET,
    };
    use super::*;

    struct Disks {
        rw: Arc<MemDisk>,
        ro: Arc<MemDisk>,
        locked: Arc<MemDisk>,
    }

    fn disks() -> Disks {
        Disks {
            rw: disk(4 << 20, 0x11, false),
            ro: disk(1 << 20, 0x22, true),
            locked: disk(1 << 20, 0x33, false),
        }
    }

    /// A target on 127.0.0.1 over the disks, running until the token is cancelled.
    async fn start(d: &Disks) -> (SocketAddr, CancellationToken) {
        let targets = Arc::new(TestTargets::new(
            d.rw.clone(),
            d.ro.clone(),
            d.locked.clone(),
        ));
        let server = IscsiServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            targets,
            AllowList::loopback(),
        )
        .await
        .unwrap();
        let addr = server.local_addr().unwrap();
        let cancel = CancellationToken::new();
        tokio::spawn(server.run(cancel.clone(), TaskTracker::new()));
        (addr, cancel)
    }

    /// Runs a client tool off the runtime; `None` when it is not installed (a failure in
    /// CI, a loud skip elsewhere).
    async fn tool(program: &str, args: &[String]) -> Option<std::process::Output> {
        let (p, a) = (program.to_string(), args.to_vec());
        let out =
            tokio::task::spawn_blocking(move || std::process::Command::new(&p).args(&a).output())
                .await
                .unwrap();
        match out {
            Ok(o) => Some(o),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::env::var_os("CI").is_some() {
                    panic!("{program} is required in CI (scripts/install-deps installs libiscsi-bin and qemu-utils)");
                }
                eprintln!("SKIPPED: {program} is not installed; this test proves nothing here");
                None
            }
            Err(e) => panic!("{program}: {e}"),
        }
    }

    fn text(o: &std::process::Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// libiscsi's discovery: a SendTargets=All discovery session lists both targets at the
    /// address the client connected to.
    #[tokio::test(flavor = "multi_thread")]
    async fn iscsi_ls_discovers_every_target_at_our_address() {
        let d = disks();
        let (addr, cancel) = start(&d).await;
        let url = format!("iscsi://127.0.0.1:{}", addr.port());
        let Some(out) = tool("iscsi-ls", &[url]).await else {
            return;
        };
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert!(t.contains(OPEN_TARGET) && t.contains(CHAP_TARGET), "{t}");
        assert!(t.contains(&format!("127.0.0.1:{},1", addr.port())), "{t}");

        // With -s it logs in to each target too and lists its LUNs: with the CHAP
        // credentials, both (the open target takes AuthMethod=None from the same offer).
        let url = format!("iscsi://livemount%{CHAP_SECRET}@127.0.0.1:{}", addr.port());
        let out = tool("iscsi-ls", &["-s".into(), url]).await.unwrap();
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert_eq!(t.matches("Lun:0").count(), 2, "{t}");
        assert_eq!(t.matches("Lun:1").count(), 1, "{t}");
        cancel.cancel();
    }

    /// Hostile connections harm no other: one that logs in and then takes no reply, one
    /// that sends half a PDU and resets, one that announces a 16 MiB segment; meanwhile a
    /// real client logs in and reads.
    #[tokio::test(flavor = "multi_thread")]
    async fn hostile_connections_harm_no_other() {
        use super::super::fuzzing::Harness;
        use tokio::net::TcpStream;
        let d = disks();
        let (addr, cancel) = start(&d).await;
        let mut stuck = TcpStream::connect(addr).await.unwrap();
        stuck
            .write_all(&Harness::login(Some(OPEN_TARGET)))
            .await
            .unwrap();
        for i in 0..64 {
            stuck
                .write_all(&Harness::nop(i, 0, &[1; 65536]))
                .await
                .unwrap();
        }
        let reset = TcpStream::connect(addr).await.unwrap();
        reset
            .try_write(&Harness::login(Some(OPEN_TARGET))[..30])
            .ok();
        socket2::SockRef::from(&reset)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(reset);
        let mut huge = TcpStream::connect(addr).await.unwrap();
        let mut login = Harness::login(Some(OPEN_TARGET));
        login[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
        huge.write_all(&login[..48]).await.unwrap();
        let mut rest = Vec::new();
        let n = huge.read_to_end(&mut rest).await.unwrap_or(0);
        assert_eq!(n, 0, "closed unanswered");

        let url = format!("iscsi://127.0.0.1:{}/{OPEN_TARGET}/0", addr.port());
        let Some(out) = tool(
            "qemu-io",
            &[
                "-f".into(),
                "raw".into(),
                "-c".into(),
                "read -P 0x11 0 1M".into(),
                url,
            ],
        )
        .await
        else {
            return;
        };
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            !text(&out).contains("Pattern verification failed"),
            "{}",
            text(&out)
        );
        drop(stuck);
        cancel.cancel();
    }

    /// libiscsi logs in to a target and INQUIRY is answered, with the right CHAP secret
    /// where one is needed; a wrong secret, none, or an unknown name is a login failure.
    #[tokio::test(flavor = "multi_thread")]
    async fn iscsi_inq_logs_in_with_the_right_chap_secret_only() {
        let d = disks();
        let (addr, cancel) = start(&d).await;
        let port = addr.port();
        let inq = |url: String| async move { tool("iscsi-inq", &[url]).await };

        let Some(out) = inq(format!("iscsi://127.0.0.1:{port}/{OPEN_TARGET}/0")).await else {
            return;
        };
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("LIVEMNT"), "{}", text(&out));
        let out = inq(format!(
            "iscsi://livemount%{CHAP_SECRET}@127.0.0.1:{port}/{CHAP_TARGET}/0"
        ))
        .await
        .unwrap();
        assert!(out.status.success(), "{}", text(&out));

        for (url, why) in [
            (
                format!("iscsi://livemount%wrongwrongwrong1@127.0.0.1:{port}/{CHAP_TARGET}/0"),
                "Authentication failure",
            ),
            (
                format!("iscsi://127.0.0.1:{port}/{CHAP_TARGET}/0"),
                "Authentication failure",
            ),
            (
                format!("iscsi://127.0.0.1:{port}/iqn.2026-12.io.livemount:nosuch/0"),
                "not found",
            ),
        ] {
            let out = inq(url.clone()).await.unwrap();
            assert!(!out.status.success(), "{url}: {}", text(&out));
            assert!(
                text(&out).contains("Failed to log in"),
                "{url}: {}",
                text(&out)
            );
            assert!(text(&out).contains(why), "{url}: {}", text(&out));
        }
        cancel.cancel();
    }

    /// libiscsi's conformance tests of the transport (and the commands the transport
    /// carries most), suite by suite as the tool needs: CmdSN window, DataSN, residuals,
    /// task management, reads and writes. The tool counts a skipped test as passed; a
    /// failure shows in its summary. (tests/iscsi.rs runs every suite of a disk against a
    /// live mount, through scripts/iscsi-conformance.)
    #[tokio::test(flavor = "multi_thread")]
    async fn libiscsi_conformance_suites_pass() {
        let d = disks();
        let (addr, cancel) = start(&d).await;
        let url = format!("iscsi://127.0.0.1:{}/{OPEN_TARGET}/0", addr.port());
        for suite in [
            "iSCSI.iSCSIcmdsn",
            "iSCSI.iSCSIdatasn",
            "iSCSI.iSCSIResiduals",
            "iSCSI.iSCSITMF",
            "SBC.Read10",
            "SBC.Write10",
            "SBC.Write16",
            "SBC.CompareAndWrite",
        ] {
            let args = [
                "-i",
                "iqn.2026-12.test:client",
                "--dataloss",
                "-t",
                suite,
                &url,
            ]
            .map(String::from);
            let Some(out) = tool("iscsi-test-cu", &args).await else {
                return;
            };
            let t = text(&out);
            let failed = t.lines().any(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                matches!(w.as_slice(), ["tests" | "asserts", _, _, _, n, ..] if *n != "0")
            });
            assert!(out.status.success() && !failed, "{suite}:\n{t}");
        }
        cancel.cancel();
    }

    /// QEMU's iSCSI driver (libiscsi) reads and writes through the target: qemu-img
    /// compare against a copy of the disk, qemu-io writes then reads a pattern, a write to
    /// the read-only LUN fails and changes nothing.
    #[tokio::test(flavor = "multi_thread")]
    async fn qemu_reads_and_writes_through_the_target() {
        let d = disks();
        let (addr, cancel) = start(&d).await;
        let url = |lun: u32| format!("iscsi://127.0.0.1:{}/{OPEN_TARGET}/{lun}", addr.port());
        let copy = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(copy.path(), d.rw.lock().as_slice()).unwrap();
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();

        let Some(out) = tool(
            "qemu-img",
            &args(&[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                &url(0),
                &copy.path().to_string_lossy(),
            ]),
        )
        .await
        else {
            return;
        };
        assert!(out.status.success(), "{}", text(&out));

        let io = |lun: u32, cmd: &str| {
            let a = args(&["-f", "raw", "-c", cmd, &url(lun)]);
            async move { tool("qemu-io", &a).await }
        };
        let out = io(0, "write -P 0xab 0 64k").await.unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(d.rw.lock()[..65536].iter().all(|b| *b == 0xab));
        assert_eq!(d.rw.lock()[65536], 0x11);
        // Larger than one burst and one segment: R2Ts and Data-In split.
        let out = io(0, "write -P 0xcd 1M 3M").await.unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(d.rw.lock()[1 << 20..].iter().all(|b| *b == 0xcd));
        let out = io(0, "read -P 0xcd 1M 3M").await.unwrap();
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            !text(&out).contains("Pattern verification failed"),
            "{}",
            text(&out)
        );
        let out = io(0, "read -P 0xab 0 64k").await.unwrap();
        assert!(
            !text(&out).contains("Pattern verification failed"),
            "{}",
            text(&out)
        );

        let out = io(1, "write -P 1 0 4k").await.unwrap();
        assert!(
            !out.status.success() || text(&out).contains("error"),
            "{}",
            text(&out)
        );
        assert!(d.ro.lock().iter().all(|b| *b == 0x22));
        cancel.cancel();
    }
}
