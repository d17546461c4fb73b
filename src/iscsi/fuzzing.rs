//! Support for fuzzing and hostile-input tests of the iSCSI target (not part of the API).
//!
//! Owns: [`TestTargets`], two targets over disks in memory (an open one with a read-write
//! LUN 0 and a read-only LUN 1, and one that requires CHAP); [`Harness`], which runs one
//! whole connection (login, full feature phase) over an in-memory pipe against them; builders
//! of the PDUs an initiator sends, for seeds and tests; [`pdus`], which splits what the
//! target answered into PDUs.
//! Must not: be used by the server itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::login::{chap_response, encode_hex, encode_text};
use super::pdu::{self, DataOut, LoginRequest, ScsiCommand};
use super::scsi::Lun;
use super::server::{serve, Chap, Target, Targets};
pub use crate::block::testing::{disk, MemDisk};

/// The open target: LUN 0 read-write, LUN 1 read-only.
pub const OPEN_TARGET: &str = "iqn.2026-12.io.livemount:m";
/// The target that requires CHAP (user [`CHAP_USER`], secret [`CHAP_SECRET`]): LUN 0.
pub const CHAP_TARGET: &str = "iqn.2026-12.io.livemount:locked";
pub const CHAP_USER: &str = "livemount";
pub const CHAP_SECRET: &str = "0123456789abcdef01234567";
/// The initiator name the builders use.
pub const INITIATOR: &str = "iqn.2026-12.test:client";

/// The two targets.
pub struct TestTargets {
    pub rw: Arc<MemDisk>,
    pub ro: Arc<MemDisk>,
    pub locked: Arc<MemDisk>,
}

impl TestTargets {
    pub fn new(rw: Arc<MemDisk>, ro: Arc<MemDisk>, locked: Arc<MemDisk>) -> Self {
        TestTargets { rw, ro, locked }
    }
}

fn lun(name: &str, dev: Arc<MemDisk>) -> Arc<Lun> {
    Arc::new(Lun {
        dev,
        name: name.to_string(),
        atomic: Arc::new(tokio::sync::RwLock::new(())),
    })
}

impl Targets for TestTargets {
    fn list(&self, _: IpAddr) -> Vec<String> {
        vec![OPEN_TARGET.into(), CHAP_TARGET.into()]
    }

    fn open(&self, name: &str, _: IpAddr) -> Option<Target> {
        match name {
            OPEN_TARGET => Some(Target {
                name: OPEN_TARGET.into(),
                luns: vec![
                    (0, lun("m/rw.img", self.rw.clone())),
                    (1, lun("m/ro.img", self.ro.clone())),
                ],
                chap: None,
            }),
            CHAP_TARGET => Some(Target {
                name: CHAP_TARGET.into(),
                luns: vec![(0, lun("locked/disk.img", self.locked.clone()))],
                chap: Some(Chap {
                    user: CHAP_USER.into(),
                    secret: CHAP_SECRET.as_bytes().to_vec(),
                }),
            }),
            _ => None,
        }
    }
}

/// One iSCSI connection per input, against [`TestTargets`].
pub struct Harness {
    rt: tokio::runtime::Runtime,
    pub targets: Arc<TestTargets>,
}

impl Harness {
    pub fn new() -> std::io::Result<Harness> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Harness {
            rt,
            targets: Arc::new(TestTargets::new(
                disk(1 << 20, 0x5a, false),
                disk(64 << 10, 0xa5, true),
                disk(64 << 10, 0x3c, false),
            )),
        })
    }

    /// Sends `input` as everything an initiator says on one connection, then closes its
    /// side (so the target never waits for a clock: it reads the end); returns what the
    /// target answered.
    pub fn stream(&self, input: &[u8]) -> Vec<u8> {
        let targets: Arc<dyn Targets> = self.targets.clone();
        self.rt.block_on(async move {
            let (client, server) = tokio::io::duplex(64 << 10);
            let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 3260));
            let conn = tokio::spawn(serve(
                server,
                peer,
                local,
                targets,
                CancellationToken::new(),
            ));
            let (mut rd, mut wr) = tokio::io::split(client);
            let reader = tokio::spawn(async move {
                let mut out = Vec::new();
                let _ = rd.read_to_end(&mut out).await;
                out
            });
            let _ = wr.write_all(input).await;
            let _ = wr.shutdown().await;
            let _ = conn.await;
            drop(wr);
            reader.await.unwrap_or_default()
        })
    }

    /// A login in one PDU, straight from the operational stage to the full feature phase
    /// (`target` `None`: a discovery session); its CmdSN is 0, so commands start at 0.
    pub fn login(target: Option<&str>) -> Vec<u8> {
        let mut keys = vec![("InitiatorName", INITIATOR)];
        match target {
            Some(t) => keys.extend([("SessionType", "Normal"), ("TargetName", t)]),
            None => keys.push(("SessionType", "Discovery")),
        }
        keys.extend([
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxRecvDataSegmentLength", "65536"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
        ]);
        Self::login_pdu(pdu::OPERATIONAL, pdu::FULL_FEATURE, true, 0, &keys)
    }

    /// One Login Request.
    pub fn login_pdu(csg: u8, nsg: u8, transit: bool, itt: u32, keys: &[(&str, &str)]) -> Vec<u8> {
        let req = LoginRequest {
            transit,
            cont: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt,
            cid: 0,
            cmd_sn: 0,
            exp_stat_sn: 0,
        };
        req.encode(&text(keys))
    }

    /// CHAP_N and CHAP_R answering challenge `challenge` (hex, `0x...`) with `id` and
    /// `secret`.
    pub fn chap_answer(id: u8, challenge: &str, secret: &str) -> Vec<(String, String)> {
        let c = super::login::decode_binary(challenge).unwrap_or_default();
        vec![
            ("CHAP_N".into(), CHAP_USER.into()),
            (
                "CHAP_R".into(),
                encode_hex(&chap_response(id, secret.as_bytes(), &c)),
            ),
        ]
    }

    /// A SCSI Command on `lun` that reads (up to `edtl` bytes) or moves no data.
    pub fn read(itt: u32, cmd_sn: u32, lun: u64, cdb: &[u8], edtl: u32) -> Vec<u8> {
        command(itt, cmd_sn, lun, cdb, edtl, false, true).encode(&[])
    }

    /// A SCSI Command on `lun` that writes `edtl` bytes, `immediate` of them with it
    /// (`fin`: no unsolicited Data-Out follows).
    pub fn write(
        itt: u32,
        cmd_sn: u32,
        lun: u64,
        cdb: &[u8],
        edtl: u32,
        immediate: &[u8],
        fin: bool,
    ) -> Vec<u8> {
        command(itt, cmd_sn, lun, cdb, edtl, true, fin).encode(immediate)
    }

    /// A Data-Out (`ttt` 0xffffffff: unsolicited).
    pub fn data_out(
        itt: u32,
        ttt: u32,
        lun: u64,
        data_sn: u32,
        offset: u32,
        data: &[u8],
        fin: bool,
    ) -> Vec<u8> {
        DataOut {
            fin,
            itt,
            ttt,
            data_sn,
            offset,
        }
        .encode(lun_field(lun), data)
    }

    /// A Text Request.
    pub fn text(itt: u32, cmd_sn: u32, keys: &[(&str, &str)]) -> Vec<u8> {
        pdu::request(pdu::TEXT, false, itt, cmd_sn).with_data(&text(keys))
    }

    /// A NOP-Out ping carrying `data`.
    pub fn nop(itt: u32, cmd_sn: u32, data: &[u8]) -> Vec<u8> {
        pdu::request(pdu::NOP_OUT, true, itt, cmd_sn).with_data(data)
    }

    /// A Logout Request closing the session.
    pub fn logout(itt: u32, cmd_sn: u32) -> Vec<u8> {
        pdu::request(pdu::LOGOUT, false, itt, cmd_sn).with_data(&[])
    }

    /// A Task Management Function Request of `function` on `lun` (ABORT TASK: `referenced`).
    pub fn task_mgmt(itt: u32, cmd_sn: u32, function: u8, lun: u64, referenced: u32) -> Vec<u8> {
        let mut b = pdu::request(pdu::TASK_MGMT, true, itt, cmd_sn);
        b.0[1] = pdu::FINAL | function;
        b.set_lun(lun_field(lun));
        b.set32(pdu::TTT, referenced);
        b.with_data(&[])
    }

    /// A PDU of any opcode with the common fields.
    pub fn raw(opcode: u8, itt: u32, cmd_sn: u32, data: &[u8]) -> Vec<u8> {
        pdu::request(opcode, false, itt, cmd_sn).with_data(data)
    }
}

fn command(
    itt: u32,
    cmd_sn: u32,
    lun: u64,
    cdb: &[u8],
    edtl: u32,
    write: bool,
    fin: bool,
) -> ScsiCommand {
    let mut c = [0u8; 16];
    let n = cdb.len().min(16);
    c[..n].copy_from_slice(&cdb[..n]);
    ScsiCommand {
        immediate: false,
        fin,
        read: !write && edtl > 0,
        write,
        lun: lun_field(lun),
        itt,
        edtl,
        cmd_sn,
        cdb: c,
    }
}

/// LUN `lun`'s field (LUN 0 for one past what SAM can say, which no test uses).
fn lun_field(lun: u64) -> [u8; 8] {
    super::scsi::encode_lun(lun).unwrap_or_default()
}

fn text(keys: &[(&str, &str)]) -> Vec<u8> {
    let pairs: Vec<(String, String)> = keys
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    encode_text(&pairs)
}

/// An initiator's end of an in-memory pipe to one connection being served, for tests that
/// talk back and forth (a CHAP exchange, R2Ts, clocks).
pub struct Client {
    pub io: tokio::io::DuplexStream,
}

impl Client {
    /// A connection to `targets` over a pipe, and the task serving it.
    pub fn connect(
        targets: Arc<dyn Targets>,
        cancel: CancellationToken,
    ) -> (Client, tokio::task::JoinHandle<Result<(), String>>) {
        let (client, server) = tokio::io::duplex(256 << 10);
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 3260));
        let task = tokio::spawn(serve(server, peer, local, targets, cancel));
        (Client { io: client }, task)
    }

    pub async fn send(&mut self, pdu: &[u8]) {
        self.io.write_all(pdu).await.expect("the target is gone");
    }

    /// The next PDU: its header and data; `None` when the target closed.
    pub async fn recv(&mut self) -> Option<([u8; 48], Vec<u8>)> {
        let mut h = [0u8; 48];
        self.io.read_exact(&mut h).await.ok()?;
        let b = pdu::Bhs(h);
        let len = b.data_len() as usize;
        let mut rest = vec![0u8; b.ahs_len() + len + pdu::padding(len)];
        self.io.read_exact(&mut rest).await.ok()?;
        rest.drain(..b.ahs_len());
        rest.truncate(len);
        Some((h, rest))
    }

    /// Logs in with [`Harness::login`]; panics unless it succeeds.
    pub async fn login(&mut self, target: Option<&str>) {
        self.send(&Harness::login(target)).await;
        let (h, d) = self.recv().await.expect("a login response");
        assert_eq!((h[36], h[37]), (0, 0), "login refused: {:?}", pairs(&d));
    }
}

/// The PDUs in what a target sent: each header and its data (without padding); a trailing
/// piece too short to be a PDU is left out.
pub fn pdus(mut bytes: &[u8]) -> Vec<([u8; 48], Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 48 {
        let mut h = [0u8; 48];
        h.copy_from_slice(&bytes[..48]);
        let b = pdu::Bhs(h);
        let len = b.data_len() as usize;
        let start = 48 + b.ahs_len();
        let end = start + len + pdu::padding(len);
        let Some(data) = bytes.get(start..start + len) else {
            break;
        };
        out.push((h, data.to_vec()));
        bytes = bytes.get(end..).unwrap_or_default();
    }
    out
}

/// The `key=value` pairs of a text or login PDU's data.
pub fn pairs(data: &[u8]) -> Vec<(String, String)> {
    super::login::parse_text(data).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness runs a whole session: a login straight to the full feature phase, a NOP
    /// answered with its data, a logout answered; a discovery session lists both targets.
    #[test]
    fn a_session_over_the_pipe_is_answered() {
        let h = Harness::new().unwrap();
        let mut input = Harness::login(Some(OPEN_TARGET));
        input.extend(Harness::nop(1, 0, b"ping"));
        input.extend(Harness::logout(2, 0));
        let out = pdus(&h.stream(&input));
        let ops: Vec<u8> = out.iter().map(|(h, _)| h[0] & 0x3f).collect();
        assert_eq!(
            ops,
            [pdu::LOGIN_RESPONSE, pdu::NOP_IN, pdu::LOGOUT_RESPONSE]
        );
        assert_eq!((out[0].0[36], out[0].0[37]), (0, 0), "login succeeded");
        assert_eq!(out[1].1, b"ping");

        let mut input = Harness::login(None);
        input.extend(Harness::text(1, 0, &[("SendTargets", "All")]));
        let out = pdus(&h.stream(&input));
        let text = pairs(&out[1].1);
        let names: Vec<&str> = text
            .iter()
            .filter(|(k, _)| k == "TargetName")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(names, [OPEN_TARGET, CHAP_TARGET]);
        assert!(text.contains(&("TargetAddress".into(), "127.0.0.1:3260,1".into())));
    }
}
