//! ONC RPC (RFC 5531) as the NFS, MOUNT and portmap services need it: a bounded XDR reader,
//! the call header, and reply headers.
//!
//! Owns: decoding a call's header (xid, program, version, procedure, credential) from a whole
//! record, and encoding the accepted and denied reply headers.
//! Must not: allocate from a length a peer announced before checking it against the bytes that
//! are really there (every read here is checked against the remaining input), or panic on any
//! input.

use bytes::{BufMut, BytesMut};

/// Largest credential or verifier body (RFC 5531: 400 bytes).
pub const MAX_AUTH_BODY: usize = 400;
const RPC_VERSION: u32 = 2;
const MSG_CALL: u32 = 0;
const MSG_REPLY: u32 = 1;
const MSG_ACCEPTED: u32 = 0;
const MSG_DENIED: u32 = 1;
pub const AUTH_NONE: u32 = 0;
pub const AUTH_SYS: u32 = 1;
/// Machine names in AUTH_SYS are at most 255 bytes; gids at most 16.
const MAX_MACHINE_NAME: usize = 255;
const MAX_GIDS: usize = 16;

/// Bounded XDR reader over a slice; every read checks the remaining length first.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.buf.split_first_chunk::<4>()?;
        self.buf = rest;
        Some(u32::from_be_bytes(*head))
    }

    pub fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.buf.split_first_chunk::<8>()?;
        self.buf = rest;
        Some(u64::from_be_bytes(*head))
    }

    /// An XDR bool: 0 or 1, anything else is malformed.
    pub fn bool(&mut self) -> Option<bool> {
        match self.u32()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    /// Fixed-length opaque of `N` bytes (padding skipped).
    pub fn fixed<const N: usize>(&mut self) -> Option<[u8; N]> {
        let padded = N.next_multiple_of(4);
        if padded > self.buf.len() {
            return None;
        }
        let mut out = [0u8; N];
        out.copy_from_slice(&self.buf[..N]);
        self.buf = &self.buf[padded..];
        Some(out)
    }

    /// Variable-length opaque or string of at most `max` bytes (padding skipped).
    pub fn opaque(&mut self, max: usize) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > max {
            return None;
        }
        let padded = len.checked_next_multiple_of(4)?;
        if padded > self.buf.len() {
            return None;
        }
        let (data, rest) = self.buf.split_at(padded);
        self.buf = rest;
        data.get(..len)
    }

    /// What has not been read.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

/// The caller's credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cred {
    None,
    Sys {
        uid: u32,
        gid: u32,
        /// Supplementary groups: at most 16 (RFC 5531).
        gids: Vec<u32>,
    },
    /// A flavor we do not take (RPCSEC_GSS, AUTH_DH, ...).
    Other(u32),
}

/// A call's header; `args` is everything after the verifier.
#[derive(Debug)]
pub struct Call<'a> {
    pub xid: u32,
    pub prog: u32,
    pub vers: u32,
    pub proc_: u32,
    /// The credential's flavor and body (at most [`MAX_AUTH_BODY`] bytes), as sent: what a
    /// service makes of it is its own (see [`Call::cred`]).
    pub auth_flavor: u32,
    pub auth_body: &'a [u8],
    pub args: &'a [u8],
}

impl Call<'_> {
    /// The caller's credential. An AUTH_SYS body that does not parse is
    /// [`BadCall::BadCred`] (answer AUTH_BADCRED); services that check no credential (the
    /// portmapper) need not ask.
    pub fn cred(&self) -> Result<Cred, BadCall> {
        Ok(match self.auth_flavor {
            AUTH_NONE => Cred::None,
            AUTH_SYS => auth_sys(self.auth_body).ok_or(BadCall::BadCred { xid: self.xid })?,
            other => Cred::Other(other),
        })
    }
}

/// Why a record is not a call we can dispatch.
#[derive(Debug, PartialEq, Eq)]
pub enum BadCall {
    /// Too short for a header, or not a CALL: nothing can be answered.
    Unanswerable,
    /// RPC version other than 2: answer RPC_MISMATCH.
    RpcMismatch { xid: u32 },
    /// Credential or verifier malformed: answer AUTH_BADCRED.
    BadCred { xid: u32 },
}

/// Decodes a call's header from a whole record (a TCP record or a UDP datagram): the one
/// header decoder of every RPC service here. The credential's and verifier's lengths are
/// checked; the credential's body is interpreted by [`Call::cred`].
pub fn parse_call(record: &[u8]) -> Result<Call<'_>, BadCall> {
    let mut r = Reader::new(record);
    let xid = r.u32().ok_or(BadCall::Unanswerable)?;
    if r.u32() != Some(MSG_CALL) {
        return Err(BadCall::Unanswerable);
    }
    match r.u32() {
        Some(RPC_VERSION) => {}
        Some(_) => return Err(BadCall::RpcMismatch { xid }),
        None => return Err(BadCall::Unanswerable),
    }
    let (Some(prog), Some(vers), Some(proc_)) = (r.u32(), r.u32(), r.u32()) else {
        return Err(BadCall::Unanswerable);
    };
    let auth_flavor = r.u32().ok_or(BadCall::Unanswerable)?;
    let auth_body = r.opaque(MAX_AUTH_BODY).ok_or(BadCall::BadCred { xid })?;
    let verifier_ok = r.u32().is_some() && r.opaque(MAX_AUTH_BODY).is_some();
    if !verifier_ok {
        return Err(BadCall::BadCred { xid });
    }
    Ok(Call {
        xid,
        prog,
        vers,
        proc_,
        auth_flavor,
        auth_body,
        args: r.rest(),
    })
}

fn auth_sys(body: &[u8]) -> Option<Cred> {
    let mut r = Reader::new(body);
    let _stamp = r.u32()?;
    r.opaque(MAX_MACHINE_NAME)?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let n = r.u32()? as usize;
    if n > MAX_GIDS {
        return None;
    }
    let mut gids = Vec::with_capacity(n);
    for _ in 0..n {
        gids.push(r.u32()?);
    }
    Some(Cred::Sys { uid, gid, gids })
}

/// How an accepted call went (RFC 5531 `accept_stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    Success,
    ProgUnavail,
    ProgMismatch { low: u32, high: u32 },
    ProcUnavail,
    GarbageArgs,
}

/// Why a call was denied (RFC 5531 `auth_stat` values used here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStat {
    BadCred = 1,
    TooWeak = 5,
}

/// Appends an accepted reply's header (with an AUTH_NONE verifier); for `Success` the results
/// follow.
pub fn put_accepted(out: &mut BytesMut, xid: u32, accept: Accept) {
    out.put_u32(xid);
    out.put_u32(MSG_REPLY);
    out.put_u32(MSG_ACCEPTED);
    out.put_u32(AUTH_NONE);
    out.put_u32(0);
    match accept {
        Accept::Success => out.put_u32(0),
        Accept::ProgUnavail => out.put_u32(1),
        Accept::ProgMismatch { low, high } => {
            out.put_u32(2);
            out.put_u32(low);
            out.put_u32(high);
        }
        Accept::ProcUnavail => out.put_u32(3),
        Accept::GarbageArgs => out.put_u32(4),
    }
}

/// A denied reply: the RPC version is not 2.
pub fn rpc_mismatch(xid: u32) -> BytesMut {
    let mut out = BytesMut::with_capacity(24);
    out.put_u32(xid);
    out.put_u32(MSG_REPLY);
    out.put_u32(MSG_DENIED);
    out.put_u32(0); // RPC_MISMATCH
    out.put_u32(RPC_VERSION);
    out.put_u32(RPC_VERSION);
    out
}

/// A denied reply: the credential is refused.
pub fn auth_error(xid: u32, why: AuthStat) -> BytesMut {
    let mut out = BytesMut::with_capacity(20);
    out.put_u32(xid);
    out.put_u32(MSG_REPLY);
    out.put_u32(MSG_DENIED);
    out.put_u32(1); // AUTH_ERROR
    out.put_u32(why as u32);
    out
}

/// The reply for a record that failed [`parse_call`], if one can be sent.
pub fn reply_to_bad_call(bad: &BadCall) -> Option<BytesMut> {
    match *bad {
        BadCall::Unanswerable => None,
        BadCall::RpcMismatch { xid } => Some(rpc_mismatch(xid)),
        BadCall::BadCred { xid } => Some(auth_error(xid, AuthStat::BadCred)),
    }
}

/// Appends an XDR opaque/string (length, bytes, zero padding).
pub fn put_opaque(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(b.len() as u32);
    out.extend_from_slice(b);
    out.put_bytes(0, b.len().next_multiple_of(4) - b.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::nfs::fuzzing::call_record as call;

    #[test]
    fn parses_a_call_and_its_credential() {
        let rec = call(9, 100_003, 3, 1, &[1, 2, 3, 4]);
        let c = parse_call(&rec).unwrap();
        assert_eq!((c.xid, c.prog, c.vers, c.proc_), (9, 100_003, 3, 1));
        assert_eq!(
            c.cred(),
            Ok(Cred::Sys {
                uid: 0,
                gid: 0,
                gids: vec![]
            })
        );
        assert_eq!(c.args, &[1, 2, 3, 4]);
    }

    #[test]
    fn truncated_or_hostile_headers_never_panic() {
        let rec = call(9, 100_003, 3, 1, &[]);
        for cut in 0..rec.len() {
            let r = parse_call(&rec[..cut]);
            assert!(r.is_err(), "cut at {cut}");
        }
        let mut huge = rec.clone();
        huge[28..32].copy_from_slice(&u32::MAX.to_be_bytes()); // credential length
        assert_eq!(parse_call(&huge).unwrap_err(), BadCall::BadCred { xid: 9 });
        // An AUTH_SYS body that does not parse (its gid count says 17) is a bad credential
        // for a service that asks for it; the header itself is whole.
        let mut bad_sys = rec.clone();
        bad_sys[52..56].copy_from_slice(&17u32.to_be_bytes());
        let header = parse_call(&bad_sys).unwrap();
        assert_eq!(header.auth_flavor, AUTH_SYS);
        assert_eq!(header.cred().unwrap_err(), BadCall::BadCred { xid: 9 });
        let mut v1 = rec.clone();
        v1[8..12].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            parse_call(&v1).unwrap_err(),
            BadCall::RpcMismatch { xid: 9 }
        );
    }

    #[test]
    fn reader_refuses_lengths_past_the_input() {
        let mut r = Reader::new(&[0, 0, 0, 9, 1, 2, 3]);
        assert_eq!(r.opaque(100), None);
        let mut r = Reader::new(&[0, 0, 0, 2, 1, 2, 0, 0, 7]);
        assert_eq!(r.opaque(1), None, "over the caller's maximum");
        let mut r = Reader::new(&[0, 0, 0, 2, 1, 2, 0, 0]);
        assert_eq!(r.opaque(2), Some(&[1u8, 2][..]));
        assert!(r.rest().is_empty());
        assert_eq!(Reader::new(&[0, 0, 0, 2]).bool(), None);
    }
}
