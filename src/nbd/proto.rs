//! The NBD wire format (the protocol document of the NetworkBlockDevice project, fixed newstyle
//! negotiation, simple and structured replies, the `base:allocation` meta context): what the
//! server sends at the start, the client's options and the server's option replies, and
//! transmission requests and replies.
//!
//! Owns: constants, bounded parsing of what a client sends (an announced length is checked
//! against a limit before anything is read or allocated), encoding of what the server sends.
//! Must not: do I/O or know what an export is; the connection loop (`super::server`) does.

use bytes::{BufMut, Bytes, BytesMut};

/// `NBDMAGIC`, then `IHAVEOPT`: the server's first 16 bytes.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags of an export.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) | 7;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunks: the last one of a reply carries `REPLY_FLAG_DONE`.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// The one meta context served, its id, and its status bits.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Error numbers of a reply.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The NBD error number of a failed block request.
pub fn errno(e: &crate::block::BlockError) -> u32 {
    use crate::block::BlockError;
    match e {
        BlockError::ReadOnly => EPERM,
        BlockError::OutOfRange => EINVAL,
        BlockError::NoSpace => ENOSPC,
        BlockError::Io(_) => EIO,
    }
}

/// What a structured error chunk says to a person about a failed block request (the details
/// of an I/O error go to the server's log, not to the client).
pub fn message(e: &crate::block::BlockError) -> &'static str {
    use crate::block::BlockError;
    match e {
        BlockError::ReadOnly => "the export is read-only",
        BlockError::OutOfRange => "the range is past the end of the export, or too long",
        BlockError::NoSpace => "the server's state directory is full",
        BlockError::Io(_) => "the server could not read or write the disk (see its log)",
    }
}

/// The longest option data accepted (an export name and info requests fit many times over).
pub const MAX_OPTION_LEN: u32 = 4096;
/// The longest export name (`MOUNT/DISK`) accepted.
pub const MAX_NAME_LEN: u32 = 1024;
/// The largest READ or WRITE accepted (a larger one is EINVAL, as the block size info says).
pub const MAX_IO: u32 = 32 << 20;

/// The server's greeting: magic, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// The client's flags, checked: unknown bits mean the client wants what we do not speak.
pub fn client_flags(raw: [u8; 4]) -> Result<u32, String> {
    let flags = u32::from_be_bytes(raw);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(format!("unknown client flags {flags:#x}"));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err("the client does not speak fixed newstyle negotiation".into());
    }
    Ok(flags)
}

/// An option header: magic, option, length of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parses an option header (16 bytes).
pub fn option_header(raw: [u8; 16]) -> Result<OptionHeader, String> {
    let magic = u64::from_be_bytes(raw[..8].try_into().unwrap_or_default());
    if magic != IHAVEOPT {
        return Err(format!("bad option magic {magic:#x}"));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(raw[8..12].try_into().unwrap_or_default()),
        len: u32::from_be_bytes(raw[12..16].try_into().unwrap_or_default()),
    })
}

/// What `NBD_OPT_INFO` and `NBD_OPT_GO` carry: the export's name and the information asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: Vec<u8>,
    pub asked: Vec<u16>,
}

/// Parses the data of `NBD_OPT_INFO` or `NBD_OPT_GO`; `None` if it does not add up.
pub fn info_request(data: &[u8]) -> Option<InfoRequest> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?);
    if len > MAX_NAME_LEN {
        return None;
    }
    let name_end = 4usize.checked_add(len as usize)?;
    let name = data.get(4..name_end)?.to_vec();
    let n = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?) as usize;
    let rest = data.get(name_end + 2..)?;
    if rest.len() != n * 2 {
        return None;
    }
    let asked = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some(InfoRequest { name, asked })
}

/// What `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` carry: the export's name
/// and the queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: Vec<u8>,
    pub queries: Vec<Vec<u8>>,
}

/// Parses the data of a meta context option; `None` if it does not add up. (The option's data
/// is bounded by [`MAX_OPTION_LEN`], so the queries are too.)
pub fn meta_request(data: &[u8]) -> Option<MetaRequest> {
    let take = |at: usize| -> Option<(&[u8], usize)> {
        let len = u32::from_be_bytes(data.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize;
        let start = at + 4;
        Some((data.get(start..start.checked_add(len)?)?, start + len))
    };
    let (name, mut at) = take(0)?;
    if name.len() > MAX_NAME_LEN as usize {
        return None;
    }
    let n = u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?);
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let (q, next) = take(at)?;
        queries.push(q.to_vec());
        at = next;
    }
    (at == data.len()).then(|| MetaRequest {
        name: name.to_vec(),
        queries,
    })
}

/// Whether a meta context query names `base:allocation`: exactly, or (listing only) as the
/// whole `base:` namespace.
pub fn asks_base_allocation(query: &[u8], listing: bool) -> bool {
    query == BASE_ALLOCATION.as_bytes() || (listing && query == b"base:")
}

/// `NBD_REP_META_CONTEXT` naming a context and its id.
pub fn meta_context_reply(option: u32, id: u32, name: &str) -> Bytes {
    let mut data = BytesMut::with_capacity(4 + name.len());
    data.put_u32(id);
    data.put_slice(name.as_bytes());
    option_reply(option, REP_META_CONTEXT, &data)
}

/// An option reply with `data`.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPT_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(kind);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

/// An error reply to an option, with a message for people.
pub fn option_error(option: u32, kind: u32, message: &str) -> Bytes {
    option_reply(option, kind, message.as_bytes())
}

/// `NBD_REP_SERVER` naming one export (for `NBD_OPT_LIST`).
pub fn server_reply(name: &str) -> Bytes {
    let mut data = BytesMut::with_capacity(4 + name.len());
    data.put_u32(name.len() as u32);
    data.put_slice(name.as_bytes());
    option_reply(OPT_LIST, REP_SERVER, &data)
}

/// `NBD_REP_INFO` of type `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(option: u32, size: u64, flags: u16) -> Bytes {
    let mut data = BytesMut::with_capacity(12);
    data.put_u16(INFO_EXPORT);
    data.put_u64(size);
    data.put_u16(flags);
    option_reply(option, REP_INFO, &data)
}

/// `NBD_REP_INFO` of type `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(option: u32, min: u32, preferred: u32, max: u32) -> Bytes {
    let mut data = BytesMut::with_capacity(14);
    data.put_u16(INFO_BLOCK_SIZE);
    data.put_u32(min);
    data.put_u32(preferred);
    data.put_u32(max);
    option_reply(option, REP_INFO, &data)
}

/// `NBD_REP_INFO` of type `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_text(option: u32, kind: u16, text: &str) -> Bytes {
    let mut data = BytesMut::with_capacity(2 + text.len());
    data.put_u16(kind);
    data.put_slice(text.as_bytes());
    option_reply(option, REP_INFO, &data)
}

/// What the server answers `NBD_OPT_EXPORT_NAME` with (no option reply: size and flags, then
/// 124 zero bytes unless the client said `NO_ZEROES`).
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(134);
    b.put_u64(size);
    b.put_u16(flags);
    if !no_zeroes {
        b.put_bytes(0, 124);
    }
    b.freeze()
}

/// A transmission request's header (28 bytes; a WRITE's data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parses a request header.
pub fn request(raw: [u8; 28]) -> Result<Request, String> {
    let magic = u32::from_be_bytes(raw[..4].try_into().unwrap_or_default());
    if magic != REQUEST_MAGIC {
        return Err(format!("bad request magic {magic:#x}"));
    }
    Ok(Request {
        flags: u16::from_be_bytes([raw[4], raw[5]]),
        kind: u16::from_be_bytes([raw[6], raw[7]]),
        cookie: u64::from_be_bytes(raw[8..16].try_into().unwrap_or_default()),
        offset: u64::from_be_bytes(raw[16..24].try_into().unwrap_or_default()),
        len: u32::from_be_bytes(raw[24..28].try_into().unwrap_or_default()),
    })
}

/// A simple reply's header (a READ's data follows when `error` is 0).
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk's header, with `len` bytes of payload to follow.
fn chunk_header(b: &mut BytesMut, flags: u16, kind: u16, cookie: u64, len: u32) {
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(len);
}

/// The head of a READ's one `NBD_REPLY_TYPE_OFFSET_DATA` chunk (the `len` bytes of data
/// follow).
pub fn offset_data_head(cookie: u64, offset: u64, len: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(28);
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len + 8,
    );
    b.put_u64(offset);
    b.freeze()
}

/// A `NBD_REPLY_TYPE_NONE` chunk: a reply done, with nothing to say (a READ of 0 bytes).
pub fn reply_none(cookie: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(20);
    chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    b.freeze()
}

/// A READ's one `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `len` bytes of zeros at `offset`.
pub fn offset_hole(cookie: u64, offset: u64, len: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(32);
    chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    b.put_u64(offset);
    b.put_u32(len);
    b.freeze()
}

/// A `NBD_REPLY_TYPE_BLOCK_STATUS` chunk of `base:allocation`: each extent's length (a
/// `u32`, as the request's length bounds it) and its state.
pub fn block_status(cookie: u64, extents: &[crate::block::Extent]) -> Bytes {
    let len = 4 + 8 * extents.len();
    let mut b = BytesMut::with_capacity(20 + len);
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    );
    b.put_u32(BASE_ALLOCATION_ID);
    for e in extents {
        b.put_u32(u32::try_from(e.len).unwrap_or(u32::MAX));
        b.put_u32(if e.zero { STATE_HOLE | STATE_ZERO } else { 0 });
    }
    b.freeze()
}

/// A `NBD_REPLY_TYPE_ERROR` chunk ending a reply.
pub fn structured_error(cookie: u64, error: u32, message: &str) -> Bytes {
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    let mut b = BytesMut::with_capacity(26 + message.len());
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + message.len() as u32,
    );
    b.put_u32(error);
    b.put_u16(message.len() as u16);
    b.put_slice(message);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_errors_become_nbd_error_numbers() {
        use crate::block::BlockError;
        let table = [
            (BlockError::ReadOnly, EPERM),
            (BlockError::OutOfRange, EINVAL),
            (BlockError::NoSpace, ENOSPC),
            (BlockError::Io("x".into()), EIO),
        ];
        for (e, want) in table {
            assert_eq!(errno(&e), want, "{e:?}");
        }
    }

    #[test]
    fn greeting_and_client_flags() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        assert_eq!(client_flags([0, 0, 0, 3]), Ok(3));
        assert_eq!(client_flags([0, 0, 0, 1]), Ok(1));
        assert!(client_flags([0, 0, 0, 0]).is_err(), "oldstyle-only client");
        assert!(client_flags([0, 0, 0, 7]).is_err(), "unknown bit");
    }

    #[test]
    fn option_headers_and_info_requests_are_bounded() {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(b"IHAVEOPT");
        raw[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        raw[12..].copy_from_slice(&20u32.to_be_bytes());
        assert_eq!(
            option_header(raw),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 20
            })
        );
        raw[0] = b'X';
        assert!(option_header(raw).is_err());

        let mut data = Vec::new();
        data.extend_from_slice(&6u32.to_be_bytes());
        data.extend_from_slice(b"w/d.img"[..6].as_ref());
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            info_request(&data),
            Some(InfoRequest {
                name: b"w/d.im".to_vec(),
                asked: vec![INFO_BLOCK_SIZE, INFO_NAME],
            })
        );
        // Truncated, a name longer than the data, too many info requests, a huge name length.
        assert_eq!(info_request(&data[..data.len() - 1]), None);
        let mut long = data.clone();
        long[..4].copy_from_slice(&60u32.to_be_bytes());
        assert_eq!(info_request(&long), None);
        let mut many = data.clone();
        many[10..12].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(info_request(&many), None);
        let mut huge = data;
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(info_request(&huge), None);
        assert_eq!(info_request(&[]), None);
    }

    #[test]
    fn requests_and_replies() {
        let mut raw = [0u8; 28];
        raw[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        raw[4..6].copy_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        raw[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        raw[8..16].copy_from_slice(&7u64.to_be_bytes());
        raw[16..24].copy_from_slice(&4096u64.to_be_bytes());
        raw[24..].copy_from_slice(&512u32.to_be_bytes());
        assert_eq!(
            request(raw),
            Ok(Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 7,
                offset: 4096,
                len: 512
            })
        );
        raw[0] = 0;
        assert!(request(raw).is_err());
        let r = simple_reply(EIO, 9);
        assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..8], &EIO.to_be_bytes());
        assert_eq!(&r[8..], &9u64.to_be_bytes());
        assert_eq!(export_name_reply(1, TFLAG_HAS_FLAGS, false).len(), 134);
        assert_eq!(export_name_reply(1, TFLAG_HAS_FLAGS, true).len(), 10);
        let rep = info_export(OPT_GO, 1 << 30, TFLAG_HAS_FLAGS);
        assert_eq!(&rep[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u32::from_be_bytes(rep[16..20].try_into().unwrap()), 12);
    }
}
