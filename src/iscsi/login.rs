//! The login phase (RFC 7143 §6, §13): text keys, the security stage with CHAP (RFC 1994,
//! MD5; RFC 7143 §12.1.3) or none, the operational stage's negotiation, and discovery
//! sessions; one connection per session (MaxConnections=1) at ErrorRecoveryLevel=0.
//!
//! Owns: parsing of `key=value` text (bounded), the negotiated [`Params`], CHAP challenges and
//! the check of a response (constant time), the login exchange ([`login`]) up to the full
//! feature phase or a login reject.
//! Must not: see the full feature phase (`super::session`) or know what a target holds
//! beyond [`Targets`] and [`Target::chap`].
//!
//! Limits: a login PDU's data and the text gathered over continued PDUs ([`MAX_TEXT`]), the
//! number of login PDUs ([`MAX_LOGIN_PDUS`]); the caller bounds the whole login in time.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU16, Ordering};

use md5::{Digest, Md5};

use super::pdu::{self, Bhs, LoginRequest};
use super::server::{read_pdu, write_pdu, Conn, Res, Target, Targets};

/// The longest text one login or text exchange may gather, over all its continued PDUs.
pub const MAX_TEXT: usize = 64 << 10;
/// Login PDUs one connection may send.
pub const MAX_LOGIN_PDUS: usize = 32;
/// The longest data segment we accept in the full feature phase (our declared
/// MaxRecvDataSegmentLength).
pub const MAX_RECV_DATA: u32 = 256 << 10;
/// Our MaxBurstLength and FirstBurstLength offers (the lower of ours and the initiator's win).
pub const MAX_BURST: u32 = 1 << 20;
pub const FIRST_BURST: u32 = 256 << 10;
/// Commands one session may have in flight (its CmdSN window).
pub const QUEUE_DEPTH: u32 = 32;
/// The portal group every address of ours is in.
pub const PORTAL_GROUP: u16 = 1;
/// The CHAP challenge's length (RFC 7143 asks for at least as long as the digest).
const CHALLENGE_LEN: usize = 16;
/// The longest CHAP value decoded (RFC 7143 §12.1.3: 1024 bytes).
const MAX_CHAP_VALUE: usize = 1024;

/// What the operational stage settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// The initiator's MaxRecvDataSegmentLength: our Data-In and Text segments fit in it.
    pub initiator_max_recv: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
}

impl Default for Params {
    /// RFC 7143's defaults, for keys the initiator does not send.
    fn default() -> Self {
        Params {
            initiator_max_recv: 8192,
            max_burst: 256 << 10,
            first_burst: 64 << 10,
            initial_r2t: true,
            immediate_data: true,
        }
    }
}

/// Parses `key=value\0...` text; an error for anything else (a pair without `=`, a key
/// longer than 63 bytes, a value longer than 8192 bytes, bytes that are not UTF-8).
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for raw in data.split(|b| *b == 0) {
        if raw.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(raw).map_err(|_| "text that is not UTF-8".to_string())?;
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("a text pair without '=': {:.64}", s))?;
        if k.is_empty() || k.len() > 63 {
            return Err(format!("a bad key {:.64}", k));
        }
        if v.len() > 8192 {
            return Err(format!("the value of {k} is too long"));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// `key=value\0` pairs as text.
pub fn encode_text(pairs: &[(String, String)]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, val) in pairs {
        v.extend_from_slice(k.as_bytes());
        v.push(b'=');
        v.extend_from_slice(val.as_bytes());
        v.push(0);
    }
    v
}

fn number(v: &str, min: u32, max: u32) -> Option<u32> {
    let n: u32 = v.parse().ok()?;
    (min..=max).contains(&n).then_some(n)
}

fn boolean(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

impl Params {
    /// Our answer to an operational key: `None` for a declaration that needs none. Keys of
    /// the login itself (names, session type, authentication) are the caller's.
    pub fn answer(&mut self, key: &str, value: &str) -> Option<String> {
        let reject = || Some("Reject".to_string());
        match key {
            "HeaderDigest" | "DataDigest" => Some(if value.split(',').any(|v| v == "None") {
                "None".to_string()
            } else {
                "Reject".to_string()
            }),
            "MaxConnections" => number(value, 1, 65535).map_or_else(reject, |_| Some("1".into())),
            // InitialR2T is an OR and we would take unsolicited data: the initiator decides.
            "InitialR2T" => boolean(value).map_or_else(reject, |b| {
                self.initial_r2t = b;
                Some(yes_no(b))
            }),
            // An AND, and we take immediate data: the initiator decides.
            "ImmediateData" => boolean(value).map_or_else(reject, |b| {
                self.immediate_data = b;
                Some(yes_no(b))
            }),
            // ORs: we want data in order, which makes them Yes whatever the initiator says.
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                boolean(value).map_or_else(reject, |_| Some("Yes".into()))
            }
            "MaxRecvDataSegmentLength" => match number(value, 512, 0xff_ffff) {
                Some(n) => {
                    self.initiator_max_recv = n;
                    Some(MAX_RECV_DATA.to_string())
                }
                None => reject(),
            },
            "MaxBurstLength" => number(value, 512, 0xff_ffff).map_or_else(reject, |n| {
                self.max_burst = n.min(MAX_BURST);
                Some(self.max_burst.to_string())
            }),
            "FirstBurstLength" => number(value, 512, 0xff_ffff).map_or_else(reject, |n| {
                self.first_burst = n.min(FIRST_BURST);
                Some(self.first_burst.to_string())
            }),
            "DefaultTime2Wait" => {
                number(value, 0, 3600).map_or_else(reject, |n| Some(n.max(2).to_string()))
            }
            "DefaultTime2Retain" => {
                number(value, 0, 3600).map_or_else(reject, |_| Some("0".into()))
            }
            "MaxOutstandingR2T" => {
                number(value, 1, 65535).map_or_else(reject, |_| Some("1".into()))
            }
            "ErrorRecoveryLevel" => number(value, 0, 2).map_or_else(reject, |_| Some("0".into())),
            "OFMarker" | "IFMarker" => Some("No".into()),
            "OFMarkInt" | "IFMarkInt" => Some("Irrelevant".into()),
            "TaskReporting" => Some(if value.split(',').any(|v| v == "RFC3720") {
                "RFC3720".to_string()
            } else {
                "Reject".to_string()
            }),
            "iSCSIProtocolLevel" => {
                number(value, 0, 31).map_or_else(reject, |n| Some(n.min(1).to_string()))
            }
            // Declarations only a target makes, and SendTargets outside a Text exchange.
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" | "SendTargets" => {
                Some("Irrelevant".into())
            }
            "InitiatorAlias" => None,
            _ => Some("NotUnderstood".into()),
        }
    }

    /// FirstBurstLength may not exceed MaxBurstLength (RFC 7143 §13.14).
    fn settle(&mut self) {
        self.first_burst = self.first_burst.min(self.max_burst);
    }
}

/// CHAP's response: MD5 of the identifier, the secret and the challenge (RFC 1994 §4.1).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Whether `got` is the right response, compared in constant time.
pub fn chap_matches(id: u8, secret: &[u8], challenge: &[u8], got: &[u8]) -> bool {
    let want = chap_response(id, secret, challenge);
    if got.len() != want.len() {
        return false;
    }
    want.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// A CHAP binary value: `0x` and hexadecimal digits or `0b` and base64 (RFC 7143 §6.1).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    let (prefix, rest) = (v.get(..2)?, v.get(2..)?);
    let out = match prefix {
        "0x" | "0X" => {
            let digits = rest.as_bytes();
            if digits.len() > 2 * MAX_CHAP_VALUE {
                return None;
            }
            // An odd count: the first digit stands alone.
            let mut out = Vec::with_capacity(digits.len().div_ceil(2));
            let (head, tail) = digits.split_at(digits.len() % 2);
            if let [d] = head {
                out.push(hex_digit(*d)?);
            }
            for pair in tail.chunks_exact(2) {
                out.push(hex_digit(pair[0])? << 4 | hex_digit(pair[1])?);
            }
            out
        }
        "0b" | "0B" => {
            if rest.len() > MAX_CHAP_VALUE * 4 / 3 + 4 {
                return None;
            }
            base64(rest)?
        }
        _ => return None,
    };
    (!out.is_empty()).then_some(out)
}

fn hex_digit(d: u8) -> Option<u8> {
    (d as char).to_digit(16).map(|n| n as u8)
}

fn base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `0x` and lower-case hexadecimal digits.
pub fn encode_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * b.len());
    s.push_str("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Fresh random bytes from the kernel.
fn random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))?;
    Ok(b)
}

/// Session handles; never 0 (an initiator's "new session").
fn next_tsih() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(1);
    loop {
        let t = NEXT.fetch_add(1, Ordering::Relaxed);
        if t != 0 {
            return t;
        }
    }
}

/// Where the security stage stands.
enum Auth {
    /// Nothing agreed yet.
    Start,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N and CHAP_R.
    ChapResponse {
        id: u8,
        challenge: [u8; CHALLENGE_LEN],
    },
    /// Authenticated, or none needed.
    Done,
}

/// A session that reached the full feature phase.
pub struct LoggedIn {
    /// `None`: a discovery session.
    pub target: Option<Target>,
    pub initiator: String,
    pub params: Params,
    /// The next CmdSN expected, and the next StatSN to send.
    pub exp_cmd_sn: u32,
    pub stat_sn: u32,
}

/// Why a login ended without a session: the status sent, and words for the log.
#[derive(Debug)]
struct Refusal((u8, u8), String);

fn refuse<T>(status: (u8, u8), why: impl Into<String>) -> Result<T, Refusal> {
    Err(Refusal(status, why.into()))
}

/// What one login exchange knows between PDUs.
struct Login<'a> {
    peer: IpAddr,
    targets: &'a dyn Targets,
    /// From the first request.
    first: Option<LoginRequest>,
    initiator: String,
    discovery: bool,
    target: Option<Target>,
    auth: Auth,
    params: Params,
    stage: u8,
    declared_recv: bool,
}

/// The login exchange: `Some` when the initiator reached the full feature phase, `None`
/// when it was refused (the reject is sent) or went away.
pub(crate) async fn login(
    s: &mut impl Conn,
    peer: IpAddr,
    targets: &dyn Targets,
) -> Res<Option<LoggedIn>> {
    let mut l = Login {
        peer,
        targets,
        first: None,
        initiator: String::new(),
        discovery: false,
        target: None,
        auth: Auth::Start,
        params: Params::default(),
        stage: pdu::SECURITY,
        declared_recv: false,
    };
    let mut stat_sn = 0u32;
    let mut text: Vec<u8> = Vec::new();
    for _ in 0..MAX_LOGIN_PDUS {
        let Some(p) = read_pdu(s, MAX_TEXT as u32).await? else {
            return Ok(None);
        };
        if p.bhs.opcode() != pdu::LOGIN {
            return Err(format!("opcode {:#04x} during login", p.bhs.opcode()));
        }
        let req = LoginRequest::parse(&p.bhs);
        match l.first {
            // The first StatSN is ours to choose: the one the initiator expects.
            None => {
                stat_sn = req.exp_stat_sn;
                l.first = Some(req);
            }
            Some(f) if f.isid != req.isid => {
                return Err("the ISID changed during login".into());
            }
            Some(_) => {}
        }
        if text.len() + p.data.len() > MAX_TEXT {
            return Err(format!("login text beyond {MAX_TEXT} bytes"));
        }
        text.extend_from_slice(&p.data);
        let window = |b: &mut Bhs, stat_sn: &mut u32| {
            b.set32(pdu::STAT_SN, *stat_sn);
            *stat_sn = stat_sn.wrapping_add(1);
            b.set32(pdu::EXP_CMD_SN, req.cmd_sn);
            b.set32(pdu::MAX_CMD_SN, req.cmd_sn.wrapping_add(QUEUE_DEPTH - 1));
        };
        if req.cont {
            // More text follows: an empty answer asks for it.
            let mut b = pdu::login_response(&req, false, 0, 0, pdu::LOGIN_SUCCESS);
            window(&mut b, &mut stat_sn);
            write_pdu(s, &b, &[]).await?;
            continue;
        }
        let pairs = std::mem::take(&mut text);
        match l.step(&req, &pairs) {
            Ok((answers, transit)) => {
                let next = if transit { req.nsg } else { 0 };
                let tsih = if transit && next == pdu::FULL_FEATURE {
                    next_tsih()
                } else {
                    0
                };
                let mut b = pdu::login_response(&req, transit, next, tsih, pdu::LOGIN_SUCCESS);
                window(&mut b, &mut stat_sn);
                write_pdu(s, &b, &encode_text(&answers)).await?;
                if transit {
                    l.stage = req.nsg;
                }
                if transit && next == pdu::FULL_FEATURE {
                    l.params.settle();
                    return Ok(Some(LoggedIn {
                        target: l.target,
                        initiator: l.initiator,
                        params: l.params,
                        exp_cmd_sn: req.cmd_sn,
                        stat_sn,
                    }));
                }
            }
            Err(Refusal(status, why)) => {
                // Debug formatting: an initiator name or a key with a newline cannot forge log lines.
                tracing::info!(peer = %l.peer, initiator = ?l.initiator, status = ?status, why = ?why, "iscsi: login refused");
                let mut b = pdu::login_response(&req, false, 0, 0, status);
                window(&mut b, &mut stat_sn);
                write_pdu(s, &b, &[]).await?;
                return Ok(None);
            }
        }
    }
    Err(format!("more than {MAX_LOGIN_PDUS} login PDUs"))
}

impl Login<'_> {
    /// One whole request (its text gathered): the answers, and whether we go to its NSG.
    fn step(
        &mut self,
        req: &LoginRequest,
        text: &[u8],
    ) -> Result<(Vec<(String, String)>, bool), Refusal> {
        if req.version_min > 0 {
            return refuse(pdu::LOGIN_UNSUPPORTED_VERSION, "a version above 0");
        }
        if req.tsih != 0 {
            // One connection per session: there is no session to join.
            return refuse(pdu::LOGIN_NO_SESSION, "a login into an existing session");
        }
        if self.initiator.is_empty() && req.csg == pdu::OPERATIONAL {
            // A login may start in the operational stage (no security stage at all).
            self.stage = pdu::OPERATIONAL;
        }
        if req.csg != self.stage || req.csg == 2 || req.csg == pdu::FULL_FEATURE {
            return refuse(pdu::LOGIN_INVALID_REQUEST, format!("stage {} now", req.csg));
        }
        if req.transit && (req.nsg <= req.csg || req.nsg == 2) {
            return refuse(
                pdu::LOGIN_INVALID_REQUEST,
                format!("a step to stage {}", req.nsg),
            );
        }
        let pairs = match parse_text(text) {
            Ok(p) => p,
            Err(e) => return refuse(pdu::LOGIN_INITIATOR_ERROR, e),
        };
        let mut answers = Vec::new();
        let first = self.initiator.is_empty();
        if first {
            self.names(&pairs)?;
            if !self.discovery {
                answers.push(("TargetPortalGroupTag".into(), PORTAL_GROUP.to_string()));
            }
        }
        let chap = self.target.as_ref().and_then(|t| t.chap.clone());
        if req.csg == pdu::OPERATIONAL && !matches!(self.auth, Auth::Done) {
            // Straight to the operational stage: fine only where no authentication is due.
            if chap.is_some() {
                return refuse(
                    pdu::LOGIN_AUTH_FAILED,
                    "no CHAP before the operational stage",
                );
            }
            self.auth = Auth::Done;
        }
        let mut chap_keys: Vec<(&str, &str)> = Vec::new();
        for (k, v) in &pairs {
            match k.as_str() {
                "InitiatorName" | "TargetName" | "SessionType" => {}
                "AuthMethod" if req.csg == pdu::SECURITY => {
                    answers.push((k.clone(), self.auth_method(v, chap.is_some())?));
                }
                "AuthMethod" => answers.push((k.clone(), "Irrelevant".into())),
                k if k.starts_with("CHAP_") && req.csg == pdu::SECURITY => chap_keys.push((k, v)),
                _ => {
                    if let Some(a) = self.params.answer(k, v) {
                        if k == "MaxRecvDataSegmentLength" {
                            self.declared_recv = true;
                        }
                        answers.push((k.clone(), a));
                    }
                }
            }
        }
        if !chap_keys.is_empty() {
            let Some(c) = &chap else {
                return refuse(pdu::LOGIN_AUTH_FAILED, "CHAP keys where no CHAP was agreed");
            };
            answers.extend(self.chap(&chap_keys, c)?);
        }
        if req.csg == pdu::SECURITY && req.transit && matches!(self.auth, Auth::Start) {
            // The initiator offered no AuthMethod and wants to move on.
            if chap.is_some() {
                return refuse(pdu::LOGIN_AUTH_FAILED, "no authentication offered");
            }
            self.auth = Auth::Done;
        }
        let transit = req.transit && matches!(self.auth, Auth::Done);
        if transit && req.nsg == pdu::FULL_FEATURE && !self.declared_recv {
            answers.push(("MaxRecvDataSegmentLength".into(), MAX_RECV_DATA.to_string()));
            self.declared_recv = true;
        }
        Ok((answers, transit))
    }

    /// The first request's names: who logs in, to what, for which kind of session.
    fn names(&mut self, pairs: &[(String, String)]) -> Result<(), Refusal> {
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let Some(initiator) = get("InitiatorName").filter(|n| !n.is_empty()) else {
            return refuse(pdu::LOGIN_MISSING_PARAMETER, "no InitiatorName");
        };
        self.initiator = initiator.to_string();
        match get("SessionType").unwrap_or("Normal") {
            "Normal" => {}
            // Discovery needs no CHAP even when the targets do: it reveals only the names
            // the allow-list already lets this address see (and SendTargets lists only
            // those `Targets::list` gives it).
            "Discovery" => {
                self.discovery = true;
                return Ok(());
            }
            other => {
                return refuse((0x02, 0x09), format!("session type {other:.32}"));
            }
        }
        let Some(name) = get("TargetName") else {
            return refuse(pdu::LOGIN_MISSING_PARAMETER, "no TargetName");
        };
        match self.targets.open(name, self.peer) {
            Some(t) => {
                self.target = Some(t);
                Ok(())
            }
            None => refuse(pdu::LOGIN_NOT_FOUND, format!("no target {name:.256}")),
        }
    }

    fn auth_method(&mut self, offered: &str, chap: bool) -> Result<String, Refusal> {
        if !matches!(self.auth, Auth::Start) {
            return refuse(pdu::LOGIN_INITIATOR_ERROR, "AuthMethod twice");
        }
        let want = if chap { "CHAP" } else { "None" };
        if offered.split(',').any(|m| m == want) {
            self.auth = if chap {
                Auth::ChapAlgorithm
            } else {
                Auth::Done
            };
            Ok(want.to_string())
        } else {
            refuse(
                pdu::LOGIN_AUTH_FAILED,
                format!("AuthMethod={offered:.64} (want {want})"),
            )
        }
    }

    /// The CHAP keys of one request.
    fn chap(
        &mut self,
        keys: &[(&str, &str)],
        c: &super::server::Chap,
    ) -> Result<Vec<(String, String)>, Refusal> {
        let get = |key: &str| keys.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        match self.auth {
            Auth::ChapAlgorithm => {
                let Some(algs) = get("CHAP_A") else {
                    return refuse(pdu::LOGIN_AUTH_FAILED, "CHAP keys before CHAP_A");
                };
                if !algs.split(',').any(|a| a == "5") {
                    return refuse(
                        pdu::LOGIN_AUTH_FAILED,
                        format!("CHAP_A={algs:.64} without MD5"),
                    );
                }
                let Ok(r) = random::<{ CHALLENGE_LEN + 1 }>() else {
                    return refuse(pdu::LOGIN_TARGET_ERROR, "no random bytes for a challenge");
                };
                let id = r[0];
                let mut challenge = [0u8; CHALLENGE_LEN];
                challenge.copy_from_slice(&r[1..]);
                self.auth = Auth::ChapResponse { id, challenge };
                Ok(vec![
                    ("CHAP_A".into(), "5".into()),
                    ("CHAP_I".into(), id.to_string()),
                    ("CHAP_C".into(), encode_hex(&challenge)),
                ])
            }
            Auth::ChapResponse { id, challenge } => {
                if get("CHAP_I").is_some() || get("CHAP_C").is_some() {
                    // Mutual CHAP would need a secret of the target's own; we have none.
                    return refuse(pdu::LOGIN_AUTH_FAILED, "mutual CHAP is not offered");
                }
                let (Some(name), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return refuse(pdu::LOGIN_AUTH_FAILED, "no CHAP_N and CHAP_R");
                };
                let resp = decode_binary(resp).unwrap_or_default();
                let name_ok = name == c.user;
                let resp_ok = chap_matches(id, &c.secret, &challenge, &resp);
                if !(name_ok && resp_ok) {
                    return refuse(
                        pdu::LOGIN_AUTH_FAILED,
                        format!("wrong CHAP response for {name:.64}"),
                    );
                }
                self.auth = Auth::Done;
                Ok(Vec::new())
            }
            Auth::Start | Auth::Done => refuse(pdu::LOGIN_AUTH_FAILED, "CHAP keys out of turn"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::fuzzing::{
        disk, pairs, Client, Harness, TestTargets, CHAP_SECRET, CHAP_TARGET, OPEN_TARGET,
    };
    use super::*;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn text_is_key_value_pairs_and_anything_else_is_refused() {
        let p = parse_text(b"A=1\0B=x=y\0\0C=\0").unwrap();
        assert_eq!(
            p,
            [
                ("A".to_string(), "1".to_string()),
                ("B".into(), "x=y".into()),
                ("C".into(), "".into())
            ]
        );
        assert_eq!(encode_text(&p), b"A=1\0B=x=y\0C=\0");
        assert!(parse_text(b"novalue\0").is_err());
        assert!(parse_text(b"=v\0").is_err());
        assert!(parse_text(format!("{}=1", "k".repeat(64)).as_bytes()).is_err());
        assert!(parse_text(format!("k={}", "v".repeat(8193)).as_bytes()).is_err());
        assert!(parse_text(b"k=\xff\0").is_err());
    }

    /// MD5 of 0x07, "0123456789abcdef01234567" and 00112233..ff, computed apart (Python's
    /// hashlib); the check takes exactly that, in hex or base64.
    #[test]
    fn chap_responses_are_md5_of_id_secret_and_challenge() {
        let challenge = decode_binary("0x00112233445566778899aabbccddeeff").unwrap();
        assert_eq!(
            decode_binary("0bABEiM0RVZneImaq7zN3u/w==").unwrap(),
            challenge
        );
        let r = chap_response(7, CHAP_SECRET.as_bytes(), &challenge);
        assert_eq!(encode_hex(&r), "0x97e01295e87664ddd0779e565c133eef");
        assert!(chap_matches(7, CHAP_SECRET.as_bytes(), &challenge, &r));
        assert!(!chap_matches(8, CHAP_SECRET.as_bytes(), &challenge, &r));
        assert!(!chap_matches(7, b"other secret", &challenge, &r));
        assert!(!chap_matches(
            7,
            CHAP_SECRET.as_bytes(),
            &challenge,
            &r[..15]
        ));
        assert!(!chap_matches(7, CHAP_SECRET.as_bytes(), &challenge, &[]));
        assert_eq!(decode_binary("0x123").unwrap(), [0x01, 0x23], "odd digits");
        for bad in ["", "0x", "12", "0xzz", "0b!!", "0q00"] {
            assert_eq!(decode_binary(bad), None, "{bad}");
        }
        assert_eq!(decode_binary(&format!("0x{}", "00".repeat(1025))), None);
    }

    #[test]
    fn operational_keys_settle_as_rfc_7143_says() {
        let mut p = Params::default();
        let mut a = |k: &str, v: &str| p.answer(k, v);
        assert_eq!(a("HeaderDigest", "CRC32C,None").as_deref(), Some("None"));
        assert_eq!(a("DataDigest", "CRC32C").as_deref(), Some("Reject"));
        assert_eq!(a("MaxConnections", "8").as_deref(), Some("1"));
        assert_eq!(a("InitialR2T", "No").as_deref(), Some("No"));
        assert_eq!(a("ImmediateData", "Yes").as_deref(), Some("Yes"));
        assert_eq!(a("DataPDUInOrder", "No").as_deref(), Some("Yes"));
        assert_eq!(
            a("MaxRecvDataSegmentLength", "131072").as_deref(),
            Some("262144")
        );
        assert_eq!(
            a("MaxRecvDataSegmentLength", "100").as_deref(),
            Some("Reject")
        );
        assert_eq!(a("MaxBurstLength", "16776192").as_deref(), Some("1048576"));
        assert_eq!(a("FirstBurstLength", "4096").as_deref(), Some("4096"));
        assert_eq!(a("DefaultTime2Wait", "0").as_deref(), Some("2"));
        assert_eq!(a("DefaultTime2Retain", "20").as_deref(), Some("0"));
        assert_eq!(a("MaxOutstandingR2T", "4").as_deref(), Some("1"));
        assert_eq!(a("ErrorRecoveryLevel", "2").as_deref(), Some("0"));
        assert_eq!(a("ErrorRecoveryLevel", "3").as_deref(), Some("Reject"));
        assert_eq!(a("IFMarker", "Yes").as_deref(), Some("No"));
        assert_eq!(
            a("X-com.example.Foo", "1").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(a("InitiatorAlias", "host"), None);
        assert_eq!(
            p,
            Params {
                initiator_max_recv: 131072,
                max_burst: MAX_BURST,
                first_burst: 4096,
                initial_r2t: false,
                immediate_data: true,
            }
        );
        let mut q = Params::default();
        q.answer("MaxBurstLength", "1024");
        q.answer("FirstBurstLength", "65536");
        q.settle();
        assert_eq!(q.first_burst, 1024, "never above MaxBurstLength");
    }

    fn targets() -> Arc<TestTargets> {
        Arc::new(TestTargets::new(
            disk(1 << 20, 0, false),
            disk(4096, 0, true),
            disk(1 << 20, 0, false),
        ))
    }

    fn status(h: &[u8; 48]) -> (u8, u8) {
        (h[36], h[37])
    }

    /// The whole CHAP exchange as libiscsi and Linux do it: security stage with
    /// AuthMethod=CHAP, CHAP_A, our challenge, the response, then the operational stage.
    async fn chap_login(secret: &str, mutual: bool) -> ((u8, u8), Client) {
        let (mut c, _task) = Client::connect(targets(), CancellationToken::new());
        c.send(&Harness::login_pdu(
            pdu::SECURITY,
            pdu::OPERATIONAL,
            false,
            1,
            &[
                ("InitiatorName", "iqn.x"),
                ("SessionType", "Normal"),
                ("TargetName", CHAP_TARGET),
                ("AuthMethod", "CHAP,None"),
            ],
        ))
        .await;
        let (h, d) = c.recv().await.unwrap();
        assert_eq!(status(&h), (0, 0));
        let got = pairs(&d);
        assert!(
            got.contains(&("AuthMethod".into(), "CHAP".into())),
            "{got:?}"
        );
        assert!(
            got.contains(&("TargetPortalGroupTag".into(), "1".into())),
            "{got:?}"
        );
        c.send(&Harness::login_pdu(
            pdu::SECURITY,
            pdu::OPERATIONAL,
            false,
            1,
            &[("CHAP_A", "7,5")],
        ))
        .await;
        let (h, d) = c.recv().await.unwrap();
        assert_eq!(status(&h), (0, 0));
        let got = pairs(&d);
        let get = |k: &str| got.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("CHAP_A").as_deref(), Some("5"));
        let id: u8 = get("CHAP_I").unwrap().parse().unwrap();
        let challenge = get("CHAP_C").unwrap();
        assert_eq!(decode_binary(&challenge).unwrap().len(), CHALLENGE_LEN);
        let mut answer = Harness::chap_answer(id, &challenge, secret);
        if mutual {
            answer.push(("CHAP_I".into(), "3".into()));
            answer.push(("CHAP_C".into(), "0x0102030405060708090a0b0c0d0e0f10".into()));
        }
        let keys: Vec<(&str, &str)> = answer
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        c.send(&Harness::login_pdu(
            pdu::SECURITY,
            pdu::OPERATIONAL,
            true,
            1,
            &keys,
        ))
        .await;
        let (h, _) = c.recv().await.unwrap();
        (status(&h), c)
    }

    #[tokio::test]
    async fn chap_with_the_secret_logs_in_and_without_it_is_an_authentication_failure() {
        let (st, mut c) = chap_login(CHAP_SECRET, false).await;
        assert_eq!(st, (0, 0));
        c.send(&Harness::login_pdu(
            pdu::OPERATIONAL,
            pdu::FULL_FEATURE,
            true,
            1,
            &[("MaxRecvDataSegmentLength", "65536")],
        ))
        .await;
        let (h, d) = c.recv().await.unwrap();
        assert_eq!(status(&h), (0, 0));
        assert_eq!(h[1] & 0x83, 0x83, "transit to the full feature phase");
        assert_ne!(u16::from_be_bytes([h[14], h[15]]), 0, "a TSIH");
        assert!(pairs(&d).contains(&("MaxRecvDataSegmentLength".into(), "262144".into())));

        let (st, mut c) = chap_login("0123456789abcdef01234568", false).await;
        assert_eq!(st, pdu::LOGIN_AUTH_FAILED);
        assert!(
            c.recv().await.is_none(),
            "nothing more: the connection ends"
        );
        let (st, _) = chap_login(CHAP_SECRET, true).await;
        assert_eq!(st, pdu::LOGIN_AUTH_FAILED, "mutual CHAP is refused");
    }

    /// Each refusal with its status: one PDU each, then the connection ends.
    #[test]
    fn logins_are_refused_with_the_status_that_says_why() {
        let h = Harness::new().unwrap();
        let refused = |input: Vec<u8>| {
            let out = super::super::fuzzing::pdus(&h.stream(&input));
            assert_eq!(out.len(), 1, "one response");
            status(&out[0].0)
        };
        let login = |keys: &[(&str, &str)]| {
            Harness::login_pdu(pdu::SECURITY, pdu::FULL_FEATURE, true, 1, keys)
        };
        assert_eq!(
            refused(login(&[("TargetName", OPEN_TARGET)])),
            pdu::LOGIN_MISSING_PARAMETER
        );
        assert_eq!(
            refused(login(&[("InitiatorName", "iqn.x")])),
            pdu::LOGIN_MISSING_PARAMETER
        );
        assert_eq!(
            refused(login(&[
                ("InitiatorName", "iqn.x"),
                ("TargetName", "iqn.nosuch")
            ])),
            pdu::LOGIN_NOT_FOUND
        );
        // The CHAP target, with no CHAP offered, or straight to the operational stage.
        assert_eq!(
            refused(login(&[
                ("InitiatorName", "iqn.x"),
                ("TargetName", CHAP_TARGET),
                ("AuthMethod", "None")
            ])),
            pdu::LOGIN_AUTH_FAILED
        );
        assert_eq!(
            refused(Harness::login_pdu(
                pdu::OPERATIONAL,
                pdu::FULL_FEATURE,
                true,
                1,
                &[("InitiatorName", "iqn.x"), ("TargetName", CHAP_TARGET)]
            )),
            pdu::LOGIN_AUTH_FAILED
        );
        assert_eq!(
            refused(login(&[
                ("InitiatorName", "iqn.x"),
                ("SessionType", "Other")
            ])),
            (0x02, 0x09)
        );
        let mut v = login(&[("InitiatorName", "iqn.x"), ("TargetName", OPEN_TARGET)]);
        v[3] = 1; // Version-min
        assert_eq!(refused(v), pdu::LOGIN_UNSUPPORTED_VERSION);
        let mut v = login(&[("InitiatorName", "iqn.x"), ("TargetName", OPEN_TARGET)]);
        v[15] = 9; // TSIH: join a session
        assert_eq!(refused(v), pdu::LOGIN_NO_SESSION);
        // Text that is not key=value pairs.
        let mut v = login(&[("InitiatorName", "iqn.x")]);
        let at = v.iter().position(|b| *b == b'=').unwrap();
        v[at] = b'_';
        assert_eq!(refused(v), pdu::LOGIN_INITIATOR_ERROR);
    }

    /// Text over continued PDUs is gathered (each part answered empty) and bounded; the
    /// open target needs no CHAP and gets AuthMethod=None; a discovery session none either.
    #[test]
    fn continued_login_text_is_gathered_and_bounded() {
        let h = Harness::new().unwrap();
        let part = |text: &[u8], cont: bool, transit: bool| {
            LoginRequest {
                transit,
                cont,
                csg: pdu::SECURITY,
                nsg: if transit { pdu::FULL_FEATURE } else { 0 },
                version_max: 0,
                version_min: 0,
                isid: [0x80, 0, 0, 0, 0, 1],
                tsih: 0,
                itt: 1,
                cid: 0,
                cmd_sn: 0,
                exp_stat_sn: 0,
            }
            .encode(text)
        };
        let mut input = part(b"InitiatorName=iqn.x\0Target", true, false);
        input.extend(part(
            b"Name=iqn.2026-12.io.livemount:m\0AuthMethod=None,CHAP\0",
            false,
            true,
        ));
        let out = super::super::fuzzing::pdus(&h.stream(&input));
        assert_eq!(out.len(), 2);
        assert!(out[0].1.is_empty(), "the first part is answered empty");
        assert_eq!(status(&out[1].0), (0, 0));
        assert!(pairs(&out[1].1).contains(&("AuthMethod".into(), "None".into())));

        // 64 KiB of text and one byte more: the connection ends, unanswered.
        let mut input = Vec::new();
        for _ in 0..2 {
            input.extend(part(&vec![b'a'; 32 << 10], true, false));
        }
        input.extend(part(b"x", false, false));
        let out = super::super::fuzzing::pdus(&h.stream(&input));
        assert_eq!(out.len(), 2, "the two parts, then nothing");

        // Discovery needs no CHAP, whatever the targets need.
        let out = super::super::fuzzing::pdus(&h.stream(&Harness::login_pdu(
            pdu::SECURITY,
            pdu::FULL_FEATURE,
            true,
            1,
            &[
                ("InitiatorName", "iqn.x"),
                ("SessionType", "Discovery"),
                ("AuthMethod", "None"),
            ],
        )));
        assert_eq!(status(&out[0].0), (0, 0));
    }
}
