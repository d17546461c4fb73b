//! The SCSI commands a disk answers (SBC-3/SPC-4 as the Linux, QEMU and ESXi initiators use
//! them): a CDB and the data the initiator sent in; a status, sense data and the data to send
//! back out. Nothing here knows iSCSI.
//!
//! Owns: [`Lun`], [`execute`], [`Sense`] (and its fixed and descriptor formats),
//! [`data_out_len`], the 8-byte LUN encoding of REPORT LUNS ([`encode_lun`], [`decode_lun`]),
//! and the one map from [`BlockError`] to sense data ([`device_sense`]).
//! Must not: know a transport; touch a disk other than through [`BlockDevice`].
//!
//! Order of checks for a command: the LUN exists (INQUIRY, REPORT LUNS and REQUEST SENSE
//! excepted), the CDB is long enough and its fields valid, a write on a read-only LUN is
//! refused, the range lies inside the disk, the transfer is within the limits, the data out is
//! long enough; only then is the device touched, so a refused command changes nothing.
//!
//! Locking: every write (WRITE*, WRITE SAME, UNMAP) holds [`Lun::atomic`] shared while it
//! writes; COMPARE AND WRITE holds it exclusively across its read, compare and write. Reads
//! take no lock. MODE SELECT changes nothing: a parameter list that restates the current
//! values is accepted, any other value is refused (every changeable mask is zero).

use std::sync::Arc;

use bytes::Bytes;

use crate::block::{BlockDevice, BlockError, Extent, Pieces};

/// The logical block size of every LUN.
pub const BLOCK_SIZE: u32 = 512;
/// The most one command may move (Block Limits: maximum transfer length); a larger READ or
/// WRITE is refused with ILLEGAL REQUEST, so the transport may bound its buffers by it.
pub const MAX_TRANSFER: u32 = 8 << 20;

/// SCSI status codes.
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// The most blocks one READ, WRITE, VERIFY with data may move.
const MAX_BLOCKS: u32 = MAX_TRANSFER / BLOCK_SIZE;
/// The most blocks one WRITE SAME or UNMAP may zero (Block Limits). Zeroing writes zeros into
/// the overlay, so it costs time in proportion to the range: 64 MiB keeps one command well
/// inside an initiator's timeout.
pub const MAX_ZERO_BLOCKS: u32 = (16 << 20) / BLOCK_SIZE;
/// The most descriptors one UNMAP parameter list may carry (Block Limits).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 64;
/// The most blocks one COMPARE AND WRITE may compare and write (Block Limits; ESXi uses 1).
pub const MAX_COMPARE_AND_WRITE: u8 = 255;
/// The overlay's block (4 KiB) in logical blocks: the optimal transfer and unmap granularity.
const GRANULARITY: u32 = 8;
/// The optimal transfer length in blocks (1 MiB).
const OPTIMAL_TRANSFER: u32 = (1 << 20) / BLOCK_SIZE;

const VENDOR: &[u8; 8] = b"LIVEMNT ";
const PRODUCT: &[u8; 16] = b"livemount disk  ";
/// The revision of these answers (INQUIRY product revision level).
const REVISION: &[u8; 4] = b"0001";
/// The company id of the NAA designator: locally administered (the U/L bit of the first
/// octet set, the I/G bit clear), since livemount has no registered OUI.
const NAA_COMPANY: u128 = 0x02_4c_4d;

// Operation codes.
const TEST_UNIT_READY: u8 = 0x00;
const REQUEST_SENSE: u8 = 0x03;
const READ_6: u8 = 0x08;
const WRITE_6: u8 = 0x0a;
const INQUIRY: u8 = 0x12;
const MODE_SELECT_6: u8 = 0x15;
const MODE_SENSE_6: u8 = 0x1a;
const START_STOP_UNIT: u8 = 0x1b;
const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
const READ_CAPACITY_10: u8 = 0x25;
const READ_10: u8 = 0x28;
const WRITE_10: u8 = 0x2a;
const VERIFY_10: u8 = 0x2f;
const SYNCHRONIZE_CACHE_10: u8 = 0x35;
const WRITE_SAME_10: u8 = 0x41;
const UNMAP: u8 = 0x42;
const MODE_SELECT_10: u8 = 0x55;
const MODE_SENSE_10: u8 = 0x5a;
const READ_16: u8 = 0x88;
const COMPARE_AND_WRITE: u8 = 0x89;
const WRITE_16: u8 = 0x8a;
const VERIFY_16: u8 = 0x8f;
const SYNCHRONIZE_CACHE_16: u8 = 0x91;
const WRITE_SAME_16: u8 = 0x93;
const SERVICE_ACTION_IN_16: u8 = 0x9e;
const REPORT_LUNS: u8 = 0xa0;
const MAINTENANCE_IN: u8 = 0xa3;
const READ_12: u8 = 0xa8;
const VERIFY_12: u8 = 0xaf;
const WRITE_12: u8 = 0xaa;

// Service actions of SERVICE ACTION IN (16).
const SA_READ_CAPACITY_16: u8 = 0x10;
const SA_GET_LBA_STATUS: u8 = 0x12;
/// MAINTENANCE IN service action.
const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;

// Mode pages.
const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0a;
const PAGE_ALL: u8 = 0x3f;

/// One logical unit: a disk and its name.
pub struct Lun {
    pub dev: Arc<dyn BlockDevice>,
    /// `MOUNT/DISK`: the unit serial number (VPD 0x80) and the designators of VPD 0x83 come
    /// from it, so they stay the same across restarts and differ between disks.
    pub name: String,
    /// Every write takes it shared and COMPARE AND WRITE exclusively, across every session
    /// of the LUN, so a compare and its write are atomic.
    pub atomic: Arc<tokio::sync::RwLock<()>>,
}

/// Sense data: key, additional sense code and qualifier, and the INFORMATION field
/// (MISCOMPARE: the offset of the first differing byte in the data out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    pub info: Option<u32>,
}

// Sense keys.
const KEY_NO_SENSE: u8 = 0x00;
const KEY_MEDIUM_ERROR: u8 = 0x03;
const KEY_ILLEGAL_REQUEST: u8 = 0x05;
const KEY_DATA_PROTECT: u8 = 0x07;
const KEY_MISCOMPARE: u8 = 0x0e;

const NO_SENSE: Sense = Sense::new(KEY_NO_SENSE, 0x00, 0x00);
const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x1a, 0x00);
const INVALID_OPCODE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x20, 0x00);
const LBA_OUT_OF_RANGE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x21, 0x00);
const INVALID_FIELD_IN_CDB: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x24, 0x00);
const LU_NOT_SUPPORTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x25, 0x00);
const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x26, 0x00);
const SAVING_NOT_SUPPORTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x39, 0x00);
const WRITE_PROTECTED: Sense = Sense::new(KEY_DATA_PROTECT, 0x27, 0x00);
const SPACE_ALLOCATION_FAILED: Sense = Sense::new(KEY_DATA_PROTECT, 0x27, 0x07);
const WRITE_ERROR: Sense = Sense::new(KEY_MEDIUM_ERROR, 0x0c, 0x00);
const UNRECOVERED_READ_ERROR: Sense = Sense::new(KEY_MEDIUM_ERROR, 0x11, 0x00);
const MISCOMPARE: Sense = Sense::new(KEY_MISCOMPARE, 0x1d, 0x00);

impl Sense {
    /// Sense data without an INFORMATION field.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
        }
    }

    /// The same sense data with an INFORMATION field.
    pub const fn with_info(self, info: u32) -> Self {
        Sense {
            info: Some(info),
            ..self
        }
    }

    /// Fixed-format sense data (response code 0x70, current error): what the transport sends
    /// with CHECK CONDITION (the control mode page says D_SENSE = 0).
    pub fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        if let Some(info) = self.info {
            b[0] |= 0x80; // VALID
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key & 0x0f;
        b[7] = 10; // additional sense length
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    /// Descriptor-format sense data (response code 0x72), with an information descriptor
    /// when there is an INFORMATION field.
    pub fn descriptor(&self) -> Vec<u8> {
        let mut b = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(info) = self.info {
            b.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
            b.extend_from_slice(&u64::from(info).to_be_bytes());
            b[7] = 12;
        }
        b
    }
}

/// What a command came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// [`GOOD`] or [`CHECK_CONDITION`].
    pub status: u8,
    /// With CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data for the initiator (already cut to the CDB's allocation length), as the pieces it
    /// was read in.
    pub data: Pieces,
}

impl Outcome {
    /// GOOD with `data` for the initiator.
    pub fn good(data: impl Into<Pieces>) -> Self {
        Outcome {
            status: GOOD,
            sense: None,
            data: data.into(),
        }
    }

    /// CHECK CONDITION with `sense`, no data.
    pub fn check(sense: Sense) -> Self {
        Outcome {
            status: CHECK_CONDITION,
            sense: Some(sense),
            data: Pieces::default(),
        }
    }

    fn of(r: Result<impl Into<Pieces>, Sense>) -> Self {
        match r {
            Ok(data) => Outcome::good(data),
            Err(sense) => Outcome::check(sense),
        }
    }
}

/// The sense data for a device error. `write`: the command was writing (a write error rather
/// than a read error). An I/O error's text is logged here, the initiator sees only the code.
pub fn device_sense(e: &BlockError, write: bool) -> Sense {
    match e {
        BlockError::ReadOnly => WRITE_PROTECTED,
        BlockError::OutOfRange => LBA_OUT_OF_RANGE,
        BlockError::NoSpace => SPACE_ALLOCATION_FAILED,
        BlockError::Io(text) => {
            tracing::error!(write, "SCSI command failed on the disk: {text}");
            if write {
                WRITE_ERROR
            } else {
                UNRECOVERED_READ_ERROR
            }
        }
    }
}

/// The length of the CDB of a command this module answers; `None` for any other.
fn cdb_len(op: u8) -> Option<usize> {
    Some(match op {
        TEST_UNIT_READY
        | REQUEST_SENSE
        | READ_6
        | WRITE_6
        | INQUIRY
        | MODE_SELECT_6
        | MODE_SENSE_6
        | START_STOP_UNIT
        | PREVENT_ALLOW_MEDIUM_REMOVAL => 6,
        READ_CAPACITY_10 | READ_10 | WRITE_10 | VERIFY_10 | SYNCHRONIZE_CACHE_10
        | WRITE_SAME_10 | UNMAP | MODE_SELECT_10 | MODE_SENSE_10 => 10,
        READ_12 | WRITE_12 | VERIFY_12 | REPORT_LUNS | MAINTENANCE_IN => 12,
        READ_16 | COMPARE_AND_WRITE | WRITE_16 | VERIFY_16 | SYNCHRONIZE_CACHE_16
        | WRITE_SAME_16 | SERVICE_ACTION_IN_16 => 16,
        _ => return None,
    })
}

/// A CDB copied into 16 bytes, zero-padded past its length, and that length; INVALID
/// OPERATION CODE for a command this module does not answer, INVALID FIELD IN CDB for one too
/// short. Every field is then read at a constant offset below 16.
fn cdb_bytes(cdb: &[u8]) -> Result<([u8; 16], usize), Sense> {
    let op = *cdb.first().ok_or(INVALID_OPCODE)?;
    let n = cdb_len(op).ok_or(INVALID_OPCODE)?;
    let bytes = cdb.get(..n).ok_or(INVALID_FIELD_IN_CDB)?;
    let mut c = [0u8; 16];
    c[..n].copy_from_slice(bytes);
    Ok((c, n))
}

/// [`cdb_bytes`], refusing NACA in the control byte (this server keeps no ACA condition).
fn parse_cdb(cdb: &[u8]) -> Result<[u8; 16], Sense> {
    let (c, n) = cdb_bytes(cdb)?;
    if c[n - 1] & 0x04 != 0 {
        return Err(INVALID_FIELD_IN_CDB);
    }
    Ok(c)
}

fn be16(c: &[u8; 16], at: usize) -> u16 {
    u16::from_be_bytes([c[at], c[at + 1]])
}

fn be24(c: &[u8; 16], at: usize) -> u32 {
    u32::from_be_bytes([0, c[at], c[at + 1], c[at + 2]])
}

fn be32(c: &[u8; 16], at: usize) -> u32 {
    u32::from_be_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]])
}

fn be64(c: &[u8; 16], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&c[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Where a READ or WRITE lands: logical block address, number of blocks, FUA, and the
/// protection field (RDPROTECT/WRPROTECT, must be 0).
struct Rw {
    lba: u64,
    blocks: u64,
    fua: bool,
    protect: u8,
}

fn rw_fields(c: &[u8; 16]) -> Rw {
    let (lba, blocks) = match c[0] {
        // READ (6) and WRITE (6): a 21-bit LBA; a length of 0 means 256 blocks.
        READ_6 | WRITE_6 => {
            let lba = u64::from(be24(c, 1) & 0x1f_ffff);
            let n = match c[4] {
                0 => 256,
                n => u64::from(n),
            };
            return Rw {
                lba,
                blocks: n,
                fua: false,
                protect: 0,
            };
        }
        READ_10 | WRITE_10 | VERIFY_10 => (u64::from(be32(c, 2)), u64::from(be16(c, 7))),
        READ_12 | WRITE_12 | VERIFY_12 => (u64::from(be32(c, 2)), u64::from(be32(c, 6))),
        _ => (be64(c, 2), u64::from(be32(c, 10))),
    };
    Rw {
        lba,
        blocks,
        fua: c[1] & 0x08 != 0,
        protect: c[1] >> 5,
    }
}

/// The bytes of data a command expects from the initiator: 0 for reads and commands without
/// data; `None` for a CDB this module does not answer or one too short (then [`execute`]
/// refuses it without looking at any data).
pub fn data_out_len(cdb: &[u8]) -> Option<u64> {
    let (c, _) = cdb_bytes(cdb).ok()?;
    let block = u64::from(BLOCK_SIZE);
    Some(match c[0] {
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 => rw_fields(&c).blocks * block,
        VERIFY_10 | VERIFY_12 | VERIFY_16 => match (c[1] >> 1) & 0x03 {
            0x01 => rw_fields(&c).blocks * block,
            0x03 => block,
            _ => 0,
        },
        WRITE_SAME_10 => block,
        WRITE_SAME_16 if c[1] & 0x01 != 0 => 0,
        WRITE_SAME_16 => block,
        UNMAP | MODE_SELECT_10 => u64::from(be16(&c, 7)),
        MODE_SELECT_6 => u64::from(c[4]),
        COMPARE_AND_WRITE => 2 * u64::from(c[13]) * block,
        _ => 0,
    })
}

/// A plain WRITE (6, 10, 12 or 16) cut to the whole blocks of `bytes`, as a WRITE (16) at
/// the same LBA with the same FUA; `None` for any other command. When the initiator's
/// expected transfer length is shorter than the CDB's, the command is processed for the data
/// that came and no more (FCP-4's rule, which libiscsi's residual tests check).
pub fn shorten_write(cdb: &[u8], bytes: u64) -> Option<Vec<u8>> {
    let (c, _) = cdb_bytes(cdb).ok()?;
    if !matches!(c[0], WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16) {
        return None;
    }
    let rw = rw_fields(&c);
    let blocks = (bytes / u64::from(BLOCK_SIZE)).min(rw.blocks) as u32;
    let mut out = vec![0u8; 16];
    out[0] = WRITE_16;
    out[1] = (rw.protect << 5) | if rw.fua { 0x08 } else { 0 };
    out[2..10].copy_from_slice(&rw.lba.to_be_bytes());
    out[10..14].copy_from_slice(&blocks.to_be_bytes());
    Some(out)
}

/// The 8-byte LUN field for LUN `n`: single-level peripheral device addressing below 256,
/// flat space addressing up to 16383; `None` above (REPORT LUNS leaves such a LUN out).
pub fn encode_lun(n: u64) -> Option<[u8; 8]> {
    let mut b = [0u8; 8];
    match n {
        0..=0xff => b[1] = n as u8,
        0x100..=0x3fff => {
            b[0] = 0x40 | (n >> 8) as u8;
            b[1] = n as u8;
        }
        _ => return None,
    }
    Some(b)
}

/// The LUN number of an 8-byte LUN field in either encoding of [`encode_lun`]; `None` for
/// any other addressing (a second level, a bus number, logical unit or extended addressing).
pub fn decode_lun(b: &[u8; 8]) -> Option<u64> {
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0b00 if b[0] == 0 => Some(u64::from(b[1])),
        0b01 => Some((u64::from(b[0] & 0x3f) << 8) | u64::from(b[1])),
        _ => None,
    }
}

/// Runs one command. `lun` is `None` for a LUN the target does not have; `luns` are the LUN
/// numbers the target has (REPORT LUNS); `data_out` is what the initiator sent.
pub async fn execute(lun: Option<&Lun>, luns: &[u64], cdb: &[u8], data_out: &[u8]) -> Outcome {
    let op = cdb.first().copied();
    match (op, lun) {
        (Some(INQUIRY), _) => Outcome::of(parse_cdb(cdb).and_then(|c| inquiry(lun, &c))),
        (Some(REPORT_LUNS), _) => Outcome::of(parse_cdb(cdb).and_then(|c| report_luns(luns, &c))),
        (Some(REQUEST_SENSE), _) => {
            Outcome::of(parse_cdb(cdb).map(|c| request_sense(lun.is_some(), &c)))
        }
        (None, _) => Outcome::check(INVALID_OPCODE),
        (Some(_), None) => Outcome::check(LU_NOT_SUPPORTED),
        (Some(_), Some(lun)) => match parse_cdb(cdb) {
            Ok(c) => Outcome::of(run(lun, &c, data_out).await),
            Err(sense) => Outcome::check(sense),
        },
    }
}

async fn run(lun: &Lun, c: &[u8; 16], data_out: &[u8]) -> Result<Pieces, Sense> {
    match c[0] {
        // A read's data stays in the pieces it was read in.
        READ_6 | READ_10 | READ_12 | READ_16 => read(lun, &rw_fields(c)).await,
        _ => run_other(lun, c, data_out).await.map(Pieces::from),
    }
}

async fn run_other(lun: &Lun, c: &[u8; 16], data_out: &[u8]) -> Result<Bytes, Sense> {
    match c[0] {
        TEST_UNIT_READY | START_STOP_UNIT | PREVENT_ALLOW_MEDIUM_REMOVAL => Ok(Bytes::new()),
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 => write(lun, &rw_fields(c), data_out).await,
        VERIFY_10 | VERIFY_12 | VERIFY_16 => verify(lun, c, data_out).await,
        SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => synchronize_cache(lun, c).await,
        READ_CAPACITY_10 => read_capacity_10(lun, c),
        SERVICE_ACTION_IN_16 => match c[1] & 0x1f {
            SA_READ_CAPACITY_16 => read_capacity_16(lun, c),
            SA_GET_LBA_STATUS => get_lba_status(lun, c),
            _ => Err(INVALID_FIELD_IN_CDB),
        },
        MODE_SENSE_6 | MODE_SENSE_10 => mode_sense(lun, c),
        MODE_SELECT_6 | MODE_SELECT_10 => mode_select(lun, c, data_out),
        WRITE_SAME_10 | WRITE_SAME_16 => write_same(lun, c, data_out).await,
        UNMAP => unmap(lun, c, data_out).await,
        COMPARE_AND_WRITE => compare_and_write(lun, c, data_out).await,
        MAINTENANCE_IN if c[1] & 0x1f == SA_REPORT_SUPPORTED_OPCODES => report_supported_opcodes(c),
        MAINTENANCE_IN => Err(INVALID_FIELD_IN_CDB),
        _ => Err(INVALID_OPCODE),
    }
}

/// Every command this module answers, with its service action (if it has one) and its CDB
/// usage data (SPC-4 6.35: the bits of the CDB the device server looks at; the first byte is
/// the operation code).
const SUPPORTED: &[(u8, Option<u8>, &[u8])] = &[
    (TEST_UNIT_READY, None, &[0x00, 0, 0, 0, 0, 0x04]),
    (REQUEST_SENSE, None, &[0x03, 0x01, 0, 0, 0xff, 0x04]),
    (READ_6, None, &[0x08, 0x1f, 0xff, 0xff, 0xff, 0x04]),
    (WRITE_6, None, &[0x0a, 0x1f, 0xff, 0xff, 0xff, 0x04]),
    (INQUIRY, None, &[0x12, 0x01, 0xff, 0xff, 0xff, 0x04]),
    (MODE_SELECT_6, None, &[0x15, 0x11, 0, 0, 0xff, 0x04]),
    (MODE_SENSE_6, None, &[0x1a, 0x08, 0xff, 0xff, 0xff, 0x04]),
    (START_STOP_UNIT, None, &[0x1b, 0x01, 0, 0x0f, 0xf7, 0x04]),
    (
        PREVENT_ALLOW_MEDIUM_REMOVAL,
        None,
        &[0x1e, 0, 0, 0, 0x03, 0x04],
    ),
    (
        READ_CAPACITY_10,
        None,
        &[0x25, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0x01, 0x04],
    ),
    (
        READ_10,
        None,
        &[0x28, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    (
        WRITE_10,
        None,
        &[0x2a, 0x18, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    (
        VERIFY_10,
        None,
        &[0x2f, 0x16, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    (
        SYNCHRONIZE_CACHE_10,
        None,
        &[0x35, 0x02, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    (
        WRITE_SAME_10,
        None,
        &[0x41, 0x08, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, 0x04],
    ),
    (UNMAP, None, &[0x42, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04]),
    (
        MODE_SELECT_10,
        None,
        &[0x55, 0x11, 0, 0, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    (
        MODE_SENSE_10,
        None,
        &[0x5a, 0x18, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, 0x04],
    ),
    (
        READ_16,
        None,
        &[
            0x88, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    (
        COMPARE_AND_WRITE,
        None,
        &[
            0x89, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0xff, 0, 0x04,
        ],
    ),
    (
        WRITE_16,
        None,
        &[
            0x8a, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    (
        VERIFY_16,
        None,
        &[
            0x8f, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    (
        SYNCHRONIZE_CACHE_16,
        None,
        &[
            0x91, 0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    (
        WRITE_SAME_16,
        None,
        &[
            0x93, 0x09, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    (
        SERVICE_ACTION_IN_16,
        Some(SA_READ_CAPACITY_16),
        &[
            0x9e, 0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    (
        SERVICE_ACTION_IN_16,
        Some(SA_GET_LBA_STATUS),
        &[
            0x9e, 0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            0x04,
        ],
    ),
    (
        REPORT_LUNS,
        None,
        &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0x04],
    ),
    (
        MAINTENANCE_IN,
        Some(SA_REPORT_SUPPORTED_OPCODES),
        &[
            0xa3, 0x0c, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    (
        READ_12,
        None,
        &[
            0xa8, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    (
        WRITE_12,
        None,
        &[
            0xaa, 0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
    (
        VERIFY_12,
        None,
        &[
            0xaf, 0x16, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0x04,
        ],
    ),
];

/// The command timeouts descriptor (SPC-4 6.35.4) with RCTD: no timeouts given.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// REPORT SUPPORTED OPERATION CODES: every command (reporting options 0), or one, by
/// operation code (1), with service action (2), or either (3).
fn report_supported_opcodes(c: &[u8; 16]) -> Result<Bytes, Sense> {
    let rctd = c[2] & 0x80 != 0;
    let options = c[2] & 0x07;
    let (op, sa) = (c[3], be16(c, 4));
    let alloc = be32(c, 6) as usize;
    let mut out = Vec::new();
    match options {
        0 => {
            out.extend_from_slice(&[0; 4]);
            for (code, action, usage) in SUPPORTED {
                out.extend_from_slice(&[*code, 0]);
                out.extend_from_slice(&u16::from(action.unwrap_or(0)).to_be_bytes());
                let flags = u8::from(action.is_some()) | if rctd { 0x02 } else { 0 };
                out.extend_from_slice(&[0, flags]);
                out.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                if rctd {
                    out.extend_from_slice(&TIMEOUTS);
                }
            }
            let len = (out.len() - 4) as u32;
            out[..4].copy_from_slice(&len.to_be_bytes());
        }
        1..=3 => {
            let has_actions = SUPPORTED
                .iter()
                .any(|(code, a, _)| *code == op && a.is_some());
            // Option 1 names a command without service actions, option 2 one with them.
            if (options == 1 && has_actions)
                || (options == 2 && !has_actions && cdb_len(op).is_some())
            {
                return Err(INVALID_FIELD_IN_CDB);
            }
            let found = SUPPORTED.iter().find(|(code, action, _)| {
                *code == op && (!has_actions || action.map(u16::from) == Some(sa))
            });
            match found {
                Some((_, _, usage)) => {
                    out.extend_from_slice(&[0, 0x03 | if rctd { 0x80 } else { 0 }]);
                    out.extend_from_slice(&(usage.len() as u16).to_be_bytes());
                    out.extend_from_slice(usage);
                    if rctd {
                        out.extend_from_slice(&TIMEOUTS);
                    }
                }
                // Not supported: SUPPORT 001b and no usage data.
                None => out.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return Err(INVALID_FIELD_IN_CDB),
    }
    Ok(cut(out, alloc))
}

/// `v` cut to the allocation length.
fn cut(mut v: Vec<u8>, alloc: usize) -> Bytes {
    v.truncate(alloc);
    Bytes::from(v)
}

fn blocks_of(dev: &dyn BlockDevice) -> u64 {
    dev.size() / u64::from(BLOCK_SIZE)
}

/// `blocks` blocks at `lba` lie inside the disk (a zero-length range may start at its end).
fn check_range(dev: &dyn BlockDevice, lba: u64, blocks: u64) -> Result<(), Sense> {
    match lba.checked_add(blocks) {
        Some(end) if end <= blocks_of(dev) => Ok(()),
        _ => Err(LBA_OUT_OF_RANGE),
    }
}

/// The byte offset of `lba` (inside the disk, so it does not overflow).
fn offset(lba: u64) -> u64 {
    lba * u64::from(BLOCK_SIZE)
}

async fn read_blocks(dev: &dyn BlockDevice, lba: u64, blocks: u64) -> Result<Pieces, Sense> {
    let len = (blocks * u64::from(BLOCK_SIZE)) as u32; // blocks <= MAX_BLOCKS
    let data = dev
        .read(offset(lba), len)
        .await
        .map_err(|e| device_sense(&e, false))?;
    if data.len() != len as usize {
        let e = BlockError::Io(format!(
            "read of {len} bytes at block {lba} returned {} bytes",
            data.len()
        ));
        return Err(device_sense(&e, false));
    }
    Ok(data)
}

async fn read(lun: &Lun, rw: &Rw) -> Result<Pieces, Sense> {
    if rw.protect != 0 {
        return Err(INVALID_FIELD_IN_CDB);
    }
    check_range(&*lun.dev, rw.lba, rw.blocks)?;
    if rw.blocks == 0 {
        return Ok(Pieces::default());
    }
    if rw.blocks > u64::from(MAX_BLOCKS) {
        return Err(INVALID_FIELD_IN_CDB);
    }
    read_blocks(&*lun.dev, rw.lba, rw.blocks).await
}

/// The first `blocks` blocks of `data_out`; INVALID FIELD IN CDB when the initiator sent
/// less than the CDB announces (never a partial write).
fn take_blocks(data_out: &[u8], blocks: u64) -> Result<&[u8], Sense> {
    let len = usize::try_from(blocks * u64::from(BLOCK_SIZE)).map_err(|_| INVALID_FIELD_IN_CDB)?;
    data_out.get(..len).ok_or(INVALID_FIELD_IN_CDB)
}

fn writable(lun: &Lun) -> Result<(), Sense> {
    if lun.dev.read_only() {
        Err(WRITE_PROTECTED)
    } else {
        Ok(())
    }
}

async fn write(lun: &Lun, rw: &Rw, data_out: &[u8]) -> Result<Bytes, Sense> {
    if rw.protect != 0 {
        return Err(INVALID_FIELD_IN_CDB);
    }
    writable(lun)?;
    check_range(&*lun.dev, rw.lba, rw.blocks)?;
    if rw.blocks == 0 {
        return Ok(Bytes::new());
    }
    if rw.blocks > u64::from(MAX_BLOCKS) {
        return Err(INVALID_FIELD_IN_CDB);
    }
    let data = take_blocks(data_out, rw.blocks)?;
    let _shared = lun.atomic.read().await;
    lun.dev
        .write(offset(rw.lba), data, rw.fua)
        .await
        .map_err(|e| device_sense(&e, true))?;
    Ok(Bytes::new())
}

/// The offset of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<u32> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|i| i as u32) // i < MAX_TRANSFER
}

async fn verify(lun: &Lun, c: &[u8; 16], data_out: &[u8]) -> Result<Bytes, Sense> {
    let rw = rw_fields(c);
    let bytchk = (c[1] >> 1) & 0x03;
    if rw.protect != 0 || bytchk == 0x02 {
        return Err(INVALID_FIELD_IN_CDB);
    }
    check_range(&*lun.dev, rw.lba, rw.blocks)?;
    // BYTCHK 0 (a medium check): the disk answers every read it can, nothing to do.
    if rw.blocks == 0 || bytchk == 0 {
        return Ok(Bytes::new());
    }
    if rw.blocks > u64::from(MAX_BLOCKS) {
        return Err(INVALID_FIELD_IN_CDB);
    }
    let want = take_blocks(data_out, if bytchk == 0x01 { rw.blocks } else { 1 })?;
    let have = read_blocks(&*lun.dev, rw.lba, rw.blocks)
        .await?
        .into_bytes();
    let diff = if bytchk == 0x01 {
        first_difference(&have, want)
    } else {
        have.chunks(BLOCK_SIZE as usize)
            .enumerate()
            .find_map(|(i, block)| first_difference(block, want).map(|d| i as u32 * BLOCK_SIZE + d))
    };
    match diff {
        Some(at) => Err(MISCOMPARE.with_info(at)),
        None => Ok(Bytes::new()),
    }
}

async fn synchronize_cache(lun: &Lun, c: &[u8; 16]) -> Result<Bytes, Sense> {
    let (lba, blocks) = if c[0] == SYNCHRONIZE_CACHE_10 {
        (u64::from(be32(c, 2)), u64::from(be16(c, 7)))
    } else {
        (be64(c, 2), u64::from(be32(c, 10)))
    };
    check_range(&*lun.dev, lba, blocks)?;
    // IMMED is honoured by answering only once the flush is done, which is always allowed.
    lun.dev.flush().await.map_err(|e| device_sense(&e, true))?;
    Ok(Bytes::new())
}

/// The last LBA (0 for a disk smaller than one block, which has none).
fn last_lba(dev: &dyn BlockDevice) -> u64 {
    blocks_of(dev).saturating_sub(1)
}

fn read_capacity_10(lun: &Lun, c: &[u8; 16]) -> Result<Bytes, Sense> {
    // Without PMI (obsolete) the LBA field must be zero.
    if c[8] & 0x01 == 0 && be32(c, 2) != 0 {
        return Err(INVALID_FIELD_IN_CDB);
    }
    let last = u32::try_from(last_lba(&*lun.dev)).unwrap_or(u32::MAX);
    let mut v = Vec::with_capacity(8);
    v.extend_from_slice(&last.to_be_bytes());
    v.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
    Ok(Bytes::from(v))
}

fn read_capacity_16(lun: &Lun, c: &[u8; 16]) -> Result<Bytes, Sense> {
    let alloc = be32(c, 10) as usize;
    let mut v = vec![0u8; 32];
    v[0..8].copy_from_slice(&last_lba(&*lun.dev).to_be_bytes());
    v[8..12].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
    v[14] = 0x80 | 0x40; // LBPME, LBPRZ
    Ok(cut(v, alloc))
}

/// The most bytes one GET LBA STATUS looks at (an initiator asks again from where the
/// answer ends).
const LBA_STATUS_SPAN: u64 = 1 << 30;

fn get_lba_status(lun: &Lun, c: &[u8; 16]) -> Result<Bytes, Sense> {
    let lba = be64(c, 2);
    let alloc = be32(c, 10) as usize;
    let total = blocks_of(&*lun.dev);
    if lba >= total {
        return Err(LBA_OUT_OF_RANGE);
    }
    let bs = u64::from(BLOCK_SIZE);
    let span = (total - lba).min(LBA_STATUS_SPAN / bs);
    let runs = lun
        .dev
        .extents(lba * bs, span * bs)
        .map_err(|e| device_sense(&e, false))?;
    // As many descriptors as the allocation length takes (at least one: the initiator reads
    // the first and asks again).
    let room = alloc.saturating_sub(8) / 16;
    let descriptors = block_runs(&runs, lba * bs, bs);
    let mut v = vec![0u8; 8];
    let mut at = lba;
    for (blocks, deallocated) in descriptors.into_iter().take(room.max(1)) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&at.to_be_bytes());
        d[8..12].copy_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
        // Provisioning status: 0 mapped, 1 deallocated (reads as zeros: LBPRZ).
        d[12] = u8::from(deallocated);
        v.extend_from_slice(&d);
        at += blocks;
    }
    let len = (v.len() - 4) as u32;
    v[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(cut(v, alloc))
}

/// Byte runs starting at `offset` as runs of whole blocks of `bs` bytes: a block is
/// deallocated only if it lies wholly inside zero runs; (blocks, deallocated), adjacent runs
/// of one kind joined.
fn block_runs(runs: &[Extent], offset: u64, bs: u64) -> Vec<(u64, bool)> {
    let mut out: Vec<(u64, bool)> = Vec::new();
    let mut push = |blocks: u64, dealloc: bool| {
        if blocks == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == dealloc => last.0 += blocks,
            _ => out.push((blocks, dealloc)),
        }
    };
    // `done`: the first block not yet placed; `at`: the byte where the next run starts.
    let (mut done, mut at) = (offset / bs, offset);
    for r in runs {
        let end = at + r.len;
        if r.zero {
            // Whole blocks inside the run; a partial first block is data.
            let first = at.div_ceil(bs);
            let last = end / bs;
            if first < last {
                push(first.saturating_sub(done), false);
                push(last - first.max(done), true);
                done = done.max(last);
            }
        }
        at = end;
    }
    // The rest, up to the last whole block covered, is data.
    push((at / bs).saturating_sub(done), false);
    out
}

fn request_sense(have_lun: bool, c: &[u8; 16]) -> Bytes {
    // Sense data goes out with CHECK CONDITION, so none is ever pending here; a LUN the
    // target lacks answers GOOD with LOGICAL UNIT NOT SUPPORTED (SPC-4 REQUEST SENSE).
    let sense = if have_lun { NO_SENSE } else { LU_NOT_SUPPORTED };
    let v = if c[1] & 0x01 != 0 {
        sense.descriptor()
    } else {
        sense.fixed().to_vec()
    };
    cut(v, usize::from(c[4]))
}

fn report_luns(luns: &[u64], c: &[u8; 16]) -> Result<Bytes, Sense> {
    let alloc = be32(c, 6) as usize;
    if alloc < 16 {
        return Err(INVALID_FIELD_IN_CDB);
    }
    let list: Vec<[u8; 8]> = match c[2] {
        0x00 | 0x02 => luns.iter().filter_map(|&n| encode_lun(n)).collect(),
        // Well-known logical units only: this target has none.
        0x01 => Vec::new(),
        _ => return Err(INVALID_FIELD_IN_CDB),
    };
    let mut v = Vec::with_capacity(8 + 8 * list.len());
    v.extend_from_slice(&((8 * list.len()) as u32).to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for lun in &list {
        v.extend_from_slice(lun);
    }
    Ok(cut(v, alloc))
}

/// The unit serial number and designators come from this hash of the LUN name.
fn lun_id(name: &str) -> [u8; 32] {
    blake3::derive_key("livemount iSCSI logical unit identity", name.as_bytes())
}

/// The unit serial number: 32 hex digits.
fn serial(name: &str) -> String {
    lun_id(name)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// NAA 6 (IEEE registered extended): the company id, then 100 bits of the name's hash.
fn naa(name: &str) -> [u8; 16] {
    let id = lun_id(name);
    let mut h = [0u8; 16];
    h.copy_from_slice(&id[16..32]);
    let bits = u128::from_be_bytes(h) & ((1u128 << 100) - 1);
    ((6u128 << 124) | (NAA_COMPANY << 100) | bits).to_be_bytes()
}

fn inquiry(lun: Option<&Lun>, c: &[u8; 16]) -> Result<Bytes, Sense> {
    let evpd = c[1] & 0x01 != 0;
    let page = c[2];
    let alloc = usize::from(be16(c, 3));
    // CMDDT (obsolete) is not supported; without EVPD there is no page to ask for.
    if c[1] & 0x02 != 0 || (!evpd && page != 0) {
        return Err(INVALID_FIELD_IN_CDB);
    }
    if !evpd {
        return Ok(cut(standard_inquiry(lun.is_some()), alloc));
    }
    let lun = lun.ok_or(LU_NOT_SUPPORTED)?;
    let body = match page {
        0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
        0x80 => serial(&lun.name).into_bytes(),
        0x83 => device_identification(&lun.name),
        0xb0 => block_limits(),
        0xb1 => {
            let mut b = vec![0u8; 0x3c];
            b[1] = 0x01; // medium rotation rate: non-rotating
            b
        }
        0xb2 => {
            // LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read as zeros); thin provisioned.
            vec![0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00]
        }
        _ => return Err(INVALID_FIELD_IN_CDB),
    };
    let mut v = Vec::with_capacity(4 + body.len());
    v.extend_from_slice(&[0x00, page]);
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(&body);
    Ok(cut(v, alloc))
}

fn standard_inquiry(have_lun: bool) -> Vec<u8> {
    let mut v = vec![0u8; 66];
    // Peripheral qualifier 0 / direct access block device, or 3 / 0x1f: no unit here.
    v[0] = if have_lun { 0x00 } else { 0x7f };
    v[2] = 0x06; // SPC-4
    v[3] = 0x10 | 0x02; // HiSup, response data format 2
    v[4] = (v.len() - 5) as u8;
    v[7] = 0x02; // CmdQue
    v[8..16].copy_from_slice(VENDOR);
    v[16..32].copy_from_slice(PRODUCT);
    v[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, SPC-4, SBC-3.
    for (i, d) in [0x00a0u16, 0x0460, 0x04c0].iter().enumerate() {
        v[58 + 2 * i..60 + 2 * i].copy_from_slice(&d.to_be_bytes());
    }
    v
}

fn device_identification(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    // NAA, binary, associated with the logical unit.
    v.extend_from_slice(&[0x01, 0x03, 0x00, 16]);
    v.extend_from_slice(&naa(name));
    // T10 vendor id, ASCII: the vendor then the serial number.
    let t10 = [&VENDOR[..], serial(name).as_bytes()].concat();
    v.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
    v.extend_from_slice(&t10);
    v
}

fn block_limits() -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    let mut put = |at: usize, x: &[u8]| b[at - 4..at - 4 + x.len()].copy_from_slice(x);
    // Offsets as in SBC-3 (from the start of the page).
    put(4, &[0x01]); // WSNZ
    put(5, &[MAX_COMPARE_AND_WRITE]);
    put(6, &(GRANULARITY as u16).to_be_bytes());
    put(8, &MAX_BLOCKS.to_be_bytes());
    put(12, &OPTIMAL_TRANSFER.to_be_bytes());
    put(20, &MAX_ZERO_BLOCKS.to_be_bytes()); // maximum UNMAP LBA count
    put(24, &MAX_UNMAP_DESCRIPTORS.to_be_bytes());
    put(28, &GRANULARITY.to_be_bytes()); // optimal unmap granularity
    put(36, &u64::from(MAX_ZERO_BLOCKS).to_be_bytes()); // maximum WRITE SAME length
    b
}

/// A mode page as current (or default) values, or with `changeable` the mask of what MODE
/// SELECT may change (nothing).
fn mode_page(code: u8, changeable: bool) -> Vec<u8> {
    let mut p = match code {
        PAGE_CACHING => {
            let mut p = vec![0u8; 20];
            p[2] = 0x04; // WCE: writes are durable on SYNCHRONIZE CACHE or FUA
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
            p
        }
    };
    if changeable {
        p.iter_mut().for_each(|b| *b = 0);
    }
    p[0] = code;
    p[1] = (p.len() - 2) as u8;
    p
}

fn mode_sense(lun: &Lun, c: &[u8; 16]) -> Result<Bytes, Sense> {
    let ten = c[0] == MODE_SENSE_10;
    let dbd = c[1] & 0x08 != 0;
    let llbaa = ten && c[1] & 0x10 != 0;
    let pc = c[2] >> 6;
    let page = c[2] & 0x3f;
    let subpage = c[3];
    let alloc = if ten {
        usize::from(be16(c, 7))
    } else {
        usize::from(c[4])
    };
    if pc == 0x03 {
        return Err(SAVING_NOT_SUPPORTED);
    }
    let codes: &[u8] = match (page, subpage) {
        (PAGE_CACHING, 0x00) => &[PAGE_CACHING],
        (PAGE_CONTROL, 0x00) => &[PAGE_CONTROL],
        (PAGE_ALL, 0x00 | 0xff) => &[PAGE_CACHING, PAGE_CONTROL],
        _ => return Err(INVALID_FIELD_IN_CDB),
    };
    let pages: Vec<u8> = codes
        .iter()
        .flat_map(|&code| mode_page(code, pc == 0x01))
        .collect();
    // Device-specific parameter: WP for a read-only LUN, DPOFUA (FUA is honoured).
    let wp = if lun.dev.read_only() { 0x80 } else { 0x00 };
    let specific = wp | 0x10;
    let blocks = blocks_of(&*lun.dev);
    let descriptor = match (dbd, llbaa) {
        (true, _) => Vec::new(),
        (false, false) => {
            let mut d = vec![0u8; 8];
            d[0..4].copy_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            d[5..8].copy_from_slice(&BLOCK_SIZE.to_be_bytes()[1..]);
            d
        }
        (false, true) => {
            let mut d = vec![0u8; 16];
            d[0..8].copy_from_slice(&blocks.to_be_bytes());
            d[12..16].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
            d
        }
    };
    let mut v = if ten {
        let mut h = vec![0u8; 8];
        h[3] = specific;
        h[4] = u8::from(llbaa && !dbd); // LONGLBA
        h[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, specific, descriptor.len() as u8]
    };
    v.extend_from_slice(&descriptor);
    v.extend_from_slice(&pages);
    // Mode data length: the bytes after the field itself.
    if ten {
        let n = (v.len() - 2) as u16;
        v[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        v[0] = (v.len() - 1) as u8;
    }
    Ok(cut(v, alloc))
}

/// MODE SELECT: accepted when it restates the current values (block length 512, the pages
/// as MODE SENSE reports them), refused otherwise; nothing is ever changed.
fn mode_select(_lun: &Lun, c: &[u8; 16], data_out: &[u8]) -> Result<Bytes, Sense> {
    let ten = c[0] == MODE_SELECT_10;
    let len = if ten {
        usize::from(be16(c, 7))
    } else {
        usize::from(c[4])
    };
    if c[1] & 0x01 != 0 {
        return Err(INVALID_FIELD_IN_CDB); // SP: nothing can be saved
    }
    if len == 0 {
        return Ok(Bytes::new());
    }
    let list = data_out.get(..len).ok_or(PARAMETER_LIST_LENGTH_ERROR)?;
    let header = if ten { 8 } else { 4 };
    let bad = INVALID_FIELD_IN_PARAMETER_LIST;
    let (descriptors_len, long) = if ten {
        let h = list.get(..8).ok_or(PARAMETER_LIST_LENGTH_ERROR)?;
        (
            usize::from(u16::from_be_bytes([h[6], h[7]])),
            h[4] & 0x01 != 0,
        )
    } else {
        let h = list.get(..4).ok_or(PARAMETER_LIST_LENGTH_ERROR)?;
        (usize::from(h[3]), false)
    };
    let end = header + descriptors_len;
    let descriptors = list.get(header..end).ok_or(PARAMETER_LIST_LENGTH_ERROR)?;
    let size = if long { 16 } else { 8 };
    if descriptors.len() % size != 0 {
        return Err(bad);
    }
    for d in descriptors.chunks(size) {
        let block_len = if long {
            u32::from_be_bytes([d[12], d[13], d[14], d[15]])
        } else {
            u32::from_be_bytes([0, d[5], d[6], d[7]])
        };
        if block_len != BLOCK_SIZE && block_len != 0 {
            return Err(bad);
        }
    }
    let mut rest = list.get(end..).unwrap_or_default();
    while let [code, page_len, ..] = *rest {
        if code & 0x40 != 0 {
            return Err(bad); // a subpage: none is supported
        }
        let code = code & 0x3f;
        let page = rest
            .get(..2 + usize::from(page_len))
            .ok_or(PARAMETER_LIST_LENGTH_ERROR)?;
        if !matches!(code, PAGE_CACHING | PAGE_CONTROL) || page[1..] != mode_page(code, false)[1..]
        {
            return Err(bad);
        }
        rest = rest.get(page.len()..).unwrap_or_default();
    }
    if !rest.is_empty() {
        return Err(PARAMETER_LIST_LENGTH_ERROR);
    }
    Ok(Bytes::new())
}

async fn write_same(lun: &Lun, c: &[u8; 16], data_out: &[u8]) -> Result<Bytes, Sense> {
    let sixteen = c[0] == WRITE_SAME_16;
    let flags = c[1];
    let (lba, blocks) = if sixteen {
        (be64(c, 2), u64::from(be32(c, 10)))
    } else {
        (u64::from(be32(c, 2)), u64::from(be16(c, 7)))
    };
    let ndob = sixteen && flags & 0x01 != 0;
    // WRPROTECT, ANCHOR (not supported), PBDATA and LBDATA (obsolete), a reserved bit in 10.
    if flags & 0xf6 != 0 || (!sixteen && flags & 0x01 != 0) {
        return Err(INVALID_FIELD_IN_CDB);
    }
    writable(lun)?;
    if blocks == 0 || blocks > u64::from(MAX_ZERO_BLOCKS) {
        return Err(INVALID_FIELD_IN_CDB); // WSNZ: zero means the whole disk, refused
    }
    check_range(&*lun.dev, lba, blocks)?;
    let zeros = [0u8; BLOCK_SIZE as usize];
    let block = if ndob {
        &zeros[..]
    } else {
        take_blocks(data_out, 1)?
    };
    let at = offset(lba);
    let len = blocks * u64::from(BLOCK_SIZE);
    let _shared = lun.atomic.read().await;
    // UNMAP or not, zeros go in as zeros; other data is written (unmapped blocks read as
    // zeros, so unmapping cannot stand for it).
    let r = if block.iter().all(|&b| b == 0) {
        lun.dev.write_zeros(at, len, false).await
    } else {
        let step = len.min(u64::from(MAX_TRANSFER)) as usize;
        let pattern = block.repeat(step / BLOCK_SIZE as usize);
        let mut done = 0u64;
        let mut r = Ok(());
        while done < len && r.is_ok() {
            let n = (len - done).min(step as u64) as usize;
            r = lun.dev.write(at + done, &pattern[..n], false).await;
            done += n as u64;
        }
        r
    };
    r.map_err(|e| device_sense(&e, true))?;
    Ok(Bytes::new())
}

async fn unmap(lun: &Lun, c: &[u8; 16], data_out: &[u8]) -> Result<Bytes, Sense> {
    if c[1] & 0x01 != 0 {
        return Err(INVALID_FIELD_IN_CDB); // ANCHOR
    }
    writable(lun)?;
    let len = usize::from(be16(c, 7));
    if len == 0 {
        return Ok(Bytes::new());
    }
    let list = data_out.get(..len).ok_or(PARAMETER_LIST_LENGTH_ERROR)?;
    let [_, _, d0, d1, _, _, _, _, ref body @ ..] = *list else {
        return Err(PARAMETER_LIST_LENGTH_ERROR);
    };
    let descriptors = body
        .get(..usize::from(u16::from_be_bytes([d0, d1])))
        .ok_or(PARAMETER_LIST_LENGTH_ERROR)?;
    // A trailing partial descriptor is ignored (SBC-3).
    let ranges: Vec<(u64, u64)> = descriptors
        .chunks_exact(16)
        .map(|d| {
            let mut lba = [0u8; 8];
            lba.copy_from_slice(&d[0..8]);
            (
                u64::from_be_bytes(lba),
                u64::from(u32::from_be_bytes([d[8], d[9], d[10], d[11]])),
            )
        })
        .collect();
    if ranges.len() > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(INVALID_FIELD_IN_PARAMETER_LIST);
    }
    let mut total = 0u64;
    for &(lba, blocks) in &ranges {
        check_range(&*lun.dev, lba, blocks)?;
        total += blocks;
    }
    if total > u64::from(MAX_ZERO_BLOCKS) {
        return Err(INVALID_FIELD_IN_PARAMETER_LIST);
    }
    let _shared = lun.atomic.read().await;
    for (lba, blocks) in ranges {
        if blocks > 0 {
            lun.dev
                .write_zeros(offset(lba), blocks * u64::from(BLOCK_SIZE), false)
                .await
                .map_err(|e| device_sense(&e, true))?;
        }
    }
    Ok(Bytes::new())
}

async fn compare_and_write(lun: &Lun, c: &[u8; 16], data_out: &[u8]) -> Result<Bytes, Sense> {
    let flags = c[1];
    let lba = be64(c, 2);
    let blocks = u64::from(c[13]);
    if flags >> 5 != 0 {
        return Err(INVALID_FIELD_IN_CDB); // WRPROTECT
    }
    writable(lun)?;
    // The data must be exactly the blocks to compare and the blocks to write: a NUMBER OF
    // LOGICAL BLOCKS of 0 with data (what 256 blocks wrap to in the CDB's one byte) is an
    // error, not a command that does nothing.
    if blocks > u64::from(MAX_COMPARE_AND_WRITE)
        || data_out.len() as u64 != 2 * blocks * u64::from(BLOCK_SIZE)
    {
        return Err(INVALID_FIELD_IN_CDB);
    }
    check_range(&*lun.dev, lba, blocks)?;
    if blocks == 0 {
        return Ok(Bytes::new());
    }
    let both = take_blocks(data_out, 2 * blocks)?;
    let (want, new) = both.split_at(both.len() / 2);
    let _exclusive = lun.atomic.write().await;
    let have = read_blocks(&*lun.dev, lba, blocks).await?.into_bytes();
    if let Some(at) = first_difference(&have, want) {
        return Err(MISCOMPARE.with_info(at));
    }
    lun.dev
        .write(offset(lba), new, flags & 0x08 != 0)
        .await
        .map_err(|e| device_sense(&e, true))?;
    Ok(Bytes::new())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use async_trait::async_trait;
    use proptest::prelude::*;

    use super::*;
    use crate::block::testing::{disk, MemDisk};

    const BLOCKS: u64 = 64;
    const B: usize = BLOCK_SIZE as usize;

    fn lun_on(dev: Arc<dyn BlockDevice>, name: &str) -> Lun {
        Lun {
            dev,
            name: name.into(),
            atomic: Arc::new(tokio::sync::RwLock::new(())),
        }
    }

    fn mem(fill: u8, read_only: bool) -> (Arc<MemDisk>, Lun) {
        let d = disk(BLOCKS as usize * B, fill, read_only);
        let lun = lun_on(d.clone(), "m1/disk0");
        (d, lun)
    }

    async fn cmd(lun: &Lun, cdb: &[u8], data: &[u8]) -> Outcome {
        execute(Some(lun), &[0], cdb, data).await
    }

    async fn good(lun: &Lun, cdb: &[u8], data: &[u8]) -> Vec<u8> {
        let o = cmd(lun, cdb, data).await;
        assert_eq!((o.status, o.sense), (GOOD, None), "cdb {cdb:02x?}");
        o.data.to_vec()
    }

    fn rsoc(options: u8, rctd: bool, op: u8, sa: u16) -> Vec<u8> {
        let mut c = vec![MAINTENANCE_IN, SA_REPORT_SUPPORTED_OPCODES, options];
        if rctd {
            c[2] |= 0x80;
        }
        c.push(op);
        c.extend_from_slice(&sa.to_be_bytes());
        c.extend_from_slice(&4096u32.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    }

    #[tokio::test]
    async fn report_supported_opcodes_lists_every_command_and_one_with_its_usage() {
        let (_, lun) = mem(0, false);
        let all = good(&lun, &rsoc(0, false, 0, 0), &[]).await;
        assert_eq!(be32_of(&all[..4]) as usize, all.len() - 4);
        assert_eq!((all.len() - 4) / 8, SUPPORTED.len());
        // Every listed command is answered (none says INVALID OPERATION CODE).
        for d in all[4..].chunks(8) {
            assert!(cdb_len(d[0]).is_some(), "{d:02x?}");
            assert_eq!(
                usize::from(u16::from_be_bytes([d[6], d[7]])),
                cdb_len(d[0]).unwrap()
            );
        }
        // With RCTD each descriptor carries a timeouts descriptor.
        let timed = good(&lun, &rsoc(0, true, 0, 0), &[]).await;
        assert_eq!((timed.len() - 4) / 20, SUPPORTED.len());
        // One command: READ (10) says DPO and FUA are looked at (MODE SENSE says DPOFUA).
        let one = good(&lun, &rsoc(1, false, READ_10, 0), &[]).await;
        assert_eq!(&one[..4], &[0, 0x03, 0, 10]);
        assert_eq!(one[4], READ_10);
        assert_eq!(one[5] & 0x18, 0x18);
        // A service action: READ CAPACITY (16); asked without it, INVALID FIELD IN CDB.
        let rc16 = good(
            &lun,
            &rsoc(2, false, SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16.into()),
            &[],
        )
        .await;
        assert_eq!(&rc16[..6], &[0, 0x03, 0, 16, 0x9e, 0x10]);
        assert_eq!(
            refused(&lun, &rsoc(1, false, SERVICE_ACTION_IN_16, 0), &[]).await,
            (0x05, 0x24, 0x00)
        );
        // A command not answered here: SUPPORT 001b.
        assert_eq!(
            good(&lun, &rsoc(1, false, 0x5e, 0), &[]).await,
            [0, 0x01, 0, 0]
        );
    }

    #[tokio::test]
    async fn a_write_cut_to_its_data_writes_the_whole_blocks_that_came() {
        let (d, lun) = mem(0, false);
        let w10 = c10(WRITE_10, 0x08, 3, 4); // FUA, LBA 3, 4 blocks
        let short = shorten_write(&w10, 2 * B as u64 + 100).unwrap();
        assert_eq!(data_out_len(&short), Some(2 * B as u64));
        assert_eq!(short[1] & 0x08, 0x08);
        good(&lun, &short, &vec![7u8; 2 * B + 100]).await;
        let b = d.lock();
        assert!(b[3 * B..5 * B].iter().all(|x| *x == 7));
        assert!(b[5 * B..].iter().all(|x| *x == 0) && b[..3 * B].iter().all(|x| *x == 0));
        drop(b);
        // Less than a block: a WRITE of nothing. Not a plain write: no cut.
        assert_eq!(data_out_len(&shorten_write(&w10, 100).unwrap()), Some(0));
        assert_eq!(shorten_write(&c10(WRITE_SAME_10, 0, 0, 1), 0), None);
        assert_eq!(shorten_write(&c10(READ_10, 0, 0, 1), 0), None);
    }

    fn be32_of(b: &[u8]) -> u32 {
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    #[tokio::test]
    async fn compare_and_write_wants_exactly_its_data() {
        let (d, lun) = mem(0, false);
        let caw = |n: u8| {
            let mut c = vec![0u8; 16];
            c[0] = COMPARE_AND_WRITE;
            c[13] = n;
            c
        };
        // 0 blocks (256 wrapped) with data, and one block with too little or too much.
        for (n, len) in [(0u8, 256 * 2 * B), (1, B), (1, 3 * B)] {
            assert_eq!(
                refused(&lun, &caw(n), &vec![0u8; len]).await,
                (0x05, 0x24, 0x00)
            );
        }
        assert!(d.lock().iter().all(|b| *b == 0));
        // 0 blocks with no data does nothing, as SBC says.
        good(&lun, &caw(0), &[]).await;
    }

    async fn refused(lun: &Lun, cdb: &[u8], data: &[u8]) -> (u8, u8, u8) {
        let o = cmd(lun, cdb, data).await;
        assert_eq!(o.status, CHECK_CONDITION, "cdb {cdb:02x?}");
        assert!(o.data.is_empty());
        let s = o.sense.expect("sense with CHECK CONDITION");
        (s.key, s.asc, s.ascq)
    }

    /// A 16-byte-addressed command: LBA at 2..10, count at 10..14.
    fn c16(op: u8, flags: u8, lba: u64, n: u32) -> Vec<u8> {
        let mut c = vec![0u8; 16];
        c[0] = op;
        c[1] = flags;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&n.to_be_bytes());
        c
    }

    /// A 10-byte-addressed command: LBA at 2..6, count at 7..9.
    fn c10(op: u8, flags: u8, lba: u32, n: u16) -> Vec<u8> {
        let mut c = vec![0u8; 10];
        c[0] = op;
        c[1] = flags;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&n.to_be_bytes());
        c
    }

    fn c12(op: u8, lba: u32, n: u32) -> Vec<u8> {
        let mut c = vec![0u8; 12];
        c[0] = op;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[6..10].copy_from_slice(&n.to_be_bytes());
        c
    }

    fn c6(op: u8, lba: u32, n: u8) -> Vec<u8> {
        let l = lba.to_be_bytes();
        vec![op, l[1] & 0x1f, l[2], l[3], n, 0]
    }

    fn caw(lba: u64, n: u8) -> Vec<u8> {
        let mut c = c16(COMPARE_AND_WRITE, 0, lba, 0);
        c[10..14].fill(0);
        c[13] = n;
        c
    }

    fn inq(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
        let a = alloc.to_be_bytes();
        vec![INQUIRY, u8::from(evpd), page, a[0], a[1], 0]
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// A disk that only has a size and fails every read and write with `err`.
    struct Failing {
        size: u64,
        err: BlockError,
    }

    #[async_trait]
    impl BlockDevice for Failing {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_only(&self) -> bool {
            false
        }
        async fn read(&self, _: u64, _: u32) -> Result<crate::block::Pieces, BlockError> {
            Err(self.err.clone())
        }
        async fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), BlockError> {
            Err(self.err.clone())
        }
        async fn flush(&self) -> Result<(), BlockError> {
            Err(self.err.clone())
        }
    }

    #[tokio::test]
    async fn standard_inquiry_is_an_spc4_disk_from_livemount() {
        let (_, lun) = mem(0, false);
        let v = good(&lun, &inq(false, 0, 255), &[]).await;
        assert_eq!(v.len(), 66);
        assert_eq!(&v[..8], &[0x00, 0x00, 0x06, 0x12, 61, 0x00, 0x00, 0x02]);
        assert_eq!(&v[8..16], b"LIVEMNT ");
        assert_eq!(&v[16..32], b"livemount disk  ");
        assert_eq!(&v[58..64], &[0x00, 0xa0, 0x04, 0x60, 0x04, 0xc0]);
        // Cut to the allocation length, and 0 is no data at all.
        assert_eq!(good(&lun, &inq(false, 0, 36), &[]).await, v[..36]);
        assert!(good(&lun, &inq(false, 0, 0), &[]).await.is_empty());
    }

    #[tokio::test]
    async fn inquiry_of_a_missing_lun_is_qualifier_3_with_good_status() {
        let o = execute(None, &[0], &inq(false, 0, 96), &[]).await;
        assert_eq!((o.status, o.sense), (GOOD, None));
        assert_eq!(o.data.to_vec()[0], 0x7f);
        let o = execute(None, &[0], &inq(true, 0x83, 96), &[]).await;
        assert_eq!(o.sense, Some(LU_NOT_SUPPORTED));
    }

    #[tokio::test]
    async fn vpd_pages_have_their_bytes() {
        let (_, lun) = mem(0, false);
        let p0 = good(&lun, &inq(true, 0x00, 255), &[]).await;
        assert_eq!(p0, [0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);

        let p80 = good(&lun, &inq(true, 0x80, 255), &[]).await;
        assert_eq!(&p80[..4], &[0, 0x80, 0, 32]);
        assert!(p80[4..].iter().all(|b| b.is_ascii_hexdigit()));

        let b0 = good(&lun, &inq(true, 0xb0, 255), &[]).await;
        assert_eq!(b0.len(), 64);
        assert_eq!(&b0[..8], &[0, 0xb0, 0, 0x3c, 0x01, 255, 0, 8]);
        assert_eq!(&b0[8..12], &(MAX_TRANSFER / BLOCK_SIZE).to_be_bytes());
        assert_eq!(&b0[20..24], &MAX_ZERO_BLOCKS.to_be_bytes());
        assert_eq!(&b0[24..28], &MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        assert_eq!(&b0[36..44], &u64::from(MAX_ZERO_BLOCKS).to_be_bytes());

        let b1 = good(&lun, &inq(true, 0xb1, 255), &[]).await;
        assert_eq!(&b1[..6], &[0, 0xb1, 0, 0x3c, 0, 1]);
        let b2 = good(&lun, &inq(true, 0xb2, 255), &[]).await;
        assert_eq!(b2, [0, 0xb2, 0, 4, 0, 0xe4, 0x02, 0]);

        // Every page is cut to the allocation length.
        assert_eq!(good(&lun, &inq(true, 0xb0, 6), &[]).await, b0[..6]);
    }

    #[tokio::test]
    async fn identifiers_are_stable_per_name_and_differ_between_names() {
        let (d, lun) = mem(0, false);
        let again = lun_on(d.clone(), "m1/disk0");
        let other = lun_on(d, "m1/disk1");
        let p83 = good(&lun, &inq(true, 0x83, 255), &[]).await;
        assert_eq!(&p83[..4], &[0, 0x83, 0, 4 + 16 + 4 + 40]);
        assert_eq!(&p83[4..8], &[0x01, 0x03, 0x00, 16]);
        assert_eq!(p83[8] >> 4, 6, "NAA 6");
        assert_eq!(&p83[24..28], &[0x02, 0x01, 0x00, 40]);
        assert_eq!(&p83[28..36], b"LIVEMNT ");
        let serial = good(&lun, &inq(true, 0x80, 255), &[]).await;
        assert_eq!(&p83[36..68], &serial[4..]);
        assert_eq!(good(&again, &inq(true, 0x83, 255), &[]).await, p83);
        let p83_other = good(&other, &inq(true, 0x83, 255), &[]).await;
        assert_ne!(p83_other[8..24], p83[8..24]);
        assert_ne!(good(&other, &inq(true, 0x80, 255), &[]).await, serial);
    }

    #[tokio::test]
    async fn bad_inquiry_fields_are_invalid_field_in_cdb() {
        let (_, lun) = mem(0, false);
        let invalid = (0x05, 0x24, 0x00);
        assert_eq!(refused(&lun, &inq(false, 0x83, 255), &[]).await, invalid);
        assert_eq!(refused(&lun, &inq(true, 0x99, 255), &[]).await, invalid);
        assert_eq!(
            refused(&lun, &[INQUIRY, 0x02, 0, 0, 255, 0], &[]).await,
            invalid
        );
        assert_eq!(refused(&lun, &[INQUIRY, 0, 0], &[]).await, invalid);
    }

    #[tokio::test]
    async fn read_capacity_reports_last_lba_and_block_size() {
        let (_, lun) = mem(0, false);
        let v = good(&lun, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
        assert_eq!(v, [0, 0, 0, 63, 0, 0, 2, 0]);
        let rc16 = c16(SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16, 0, 32);
        let v = good(&lun, &rc16, &[]).await;
        let mut want = [0u8; 32];
        want[7] = 63;
        want[10] = 2;
        want[14] = 0xc0; // LBPME, LBPRZ
        assert_eq!(v, want);
        assert_eq!(
            good(&lun, &c16(SERVICE_ACTION_IN_16, 0x10, 0, 12), &[]).await,
            want[..12]
        );
    }

    #[tokio::test]
    async fn read_capacity_10_saturates_when_the_last_lba_does_not_fit() {
        let big: Arc<dyn BlockDevice> = Arc::new(Failing {
            size: (1u64 << 32) * u64::from(BLOCK_SIZE) + 4096,
            err: BlockError::Io("x".into()),
        });
        let lun = lun_on(big, "big");
        let v = good(&lun, &[READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
        assert_eq!(v, [0xff, 0xff, 0xff, 0xff, 0, 0, 2, 0]);
        let v = good(&lun, &c16(SERVICE_ACTION_IN_16, 0x10, 0, 32), &[]).await;
        assert_eq!(&v[..8], &((1u64 << 32) + 7).to_be_bytes());
    }

    /// GET LBA STATUS: runs that read as zeros are deallocated, the rest mapped, from the
    /// LBA asked; as many descriptors as the allocation length holds; an LBA past the end is
    /// refused.
    #[tokio::test]
    async fn get_lba_status_reports_zero_runs_as_deallocated() {
        let (d, lun) = mem(0, false);
        // Data in the disk's second 4 KiB (blocks 8..16).
        d.lock()[4096..8192].fill(0x11);
        let descriptor = |lba: u64, blocks: u32, status: u8| {
            let mut v = lba.to_be_bytes().to_vec();
            v.extend_from_slice(&blocks.to_be_bytes());
            v.extend_from_slice(&[status, 0, 0, 0]);
            v
        };
        let v = good(
            &lun,
            &c16(SERVICE_ACTION_IN_16, SA_GET_LBA_STATUS, 4, 64),
            &[],
        )
        .await;
        let mut want = vec![0, 0, 0, 52, 0, 0, 0, 0];
        want.extend(descriptor(4, 4, 1));
        want.extend(descriptor(8, 8, 0));
        want.extend(descriptor(16, 48, 1));
        assert_eq!(v, want);
        // Room for one descriptor: the first alone, the length says one.
        let v = good(
            &lun,
            &c16(SERVICE_ACTION_IN_16, SA_GET_LBA_STATUS, 10, 24),
            &[],
        )
        .await;
        let mut want = vec![0, 0, 0, 20, 0, 0, 0, 0];
        want.extend(descriptor(10, 6, 0));
        assert_eq!(v, want);
        let v = good(
            &lun,
            &c16(SERVICE_ACTION_IN_16, SA_GET_LBA_STATUS, 60, 24),
            &[],
        )
        .await;
        let mut want = vec![0, 0, 0, 20, 0, 0, 0, 0];
        want.extend(descriptor(60, 4, 1));
        assert_eq!(v, want);
        let past = c16(SERVICE_ACTION_IN_16, SA_GET_LBA_STATUS, BLOCKS, 24);
        assert_eq!(refused(&lun, &past, &[]).await, (0x05, 0x21, 0x00));
        let other = c16(SERVICE_ACTION_IN_16, 0x11, 0, 24);
        assert_eq!(refused(&lun, &other, &[]).await, (0x05, 0x24, 0x00));
    }

    /// Byte runs become block runs: a block is deallocated only when wholly zero.
    #[test]
    fn byte_runs_become_whole_block_runs() {
        let run = |len: u64, zero: bool| Extent { len, zero };
        // Zeros from byte 100 to 1536 at block size 512: only block 1 and 2 are whole.
        let runs = [run(100, false), run(1436, true), run(512, false)];
        assert_eq!(
            block_runs(&runs, 0, 512),
            vec![(1, false), (2, true), (1, false)]
        );
        // A zero run shorter than a block is data.
        let runs = [run(512, false), run(300, true), run(212, false)];
        assert_eq!(block_runs(&runs, 0, 512), vec![(2, false)]);
        // From an offset; all zeros.
        assert_eq!(block_runs(&[run(2048, true)], 1024, 512), vec![(4, true)]);
        assert_eq!(block_runs(&[], 0, 512), vec![]);
    }

    #[tokio::test]
    async fn mode_sense_reports_caching_and_control_pages() {
        let (_, lun) = mem(0, false);
        let caching = {
            let mut p = vec![0u8; 20];
            p[0] = 0x08;
            p[1] = 0x12;
            p[2] = 0x04; // WCE
            p
        };
        let control = {
            let mut p = vec![0u8; 12];
            p[0] = 0x0a;
            p[1] = 0x0a;
            p[3] = 0x10;
            p
        };
        // MODE SENSE 6, caching page, with a short block descriptor.
        let v = good(&lun, &[MODE_SENSE_6, 0, 0x08, 0, 255, 0], &[]).await;
        let mut want = vec![3 + 8 + 20, 0, 0x10, 8, 0, 0, 0, 64, 0, 0, 2, 0];
        want.extend_from_slice(&caching);
        assert_eq!(v, want);
        // MODE SENSE 6, all pages, DBD.
        let v = good(&lun, &[MODE_SENSE_6, 0x08, 0x3f, 0, 255, 0], &[]).await;
        let mut want = vec![3 + 32, 0, 0x10, 0];
        want.extend_from_slice(&caching);
        want.extend_from_slice(&control);
        assert_eq!(v, want);
        // MODE SENSE 10, control page, LLBAA: a long block descriptor.
        let v = good(&lun, &[MODE_SENSE_10, 0x10, 0x0a, 0, 0, 0, 0, 1, 0, 0], &[]).await;
        let mut want = vec![0, 6 + 16 + 12, 0, 0x10, 1, 0, 0, 16];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 64, 0, 0, 0, 0, 0, 0, 2, 0]);
        want.extend_from_slice(&control);
        assert_eq!(v, want);
        // Changeable values: nothing.
        let v = good(&lun, &[MODE_SENSE_6, 0x08, 0x48, 0, 255, 0], &[]).await;
        assert_eq!(
            v,
            [23, 0, 0x10, 0, 0x08, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // Cut to the allocation length.
        assert_eq!(
            good(&lun, &[MODE_SENSE_6, 0, 0x3f, 0, 4, 0], &[])
                .await
                .len(),
            4
        );
    }

    #[tokio::test]
    async fn mode_sense_refusals_and_write_protect_bit() {
        let (_, ro) = mem(0, true);
        let v = good(&ro, &[MODE_SENSE_6, 0x08, 0x3f, 0, 255, 0], &[]).await;
        assert_eq!(v[2], 0x90, "WP and DPOFUA");
        let v = good(&ro, &[MODE_SENSE_10, 0x08, 0x3f, 0, 0, 0, 0, 1, 0, 0], &[]).await;
        assert_eq!(v[3], 0x90);
        let saved = [MODE_SENSE_6, 0, 0xc8, 0, 255, 0];
        assert_eq!(refused(&ro, &saved, &[]).await, (0x05, 0x39, 0x00));
        let unknown = [MODE_SENSE_6, 0, 0x1c, 0, 255, 0];
        assert_eq!(refused(&ro, &unknown, &[]).await, (0x05, 0x24, 0x00));
        let subpage = [MODE_SENSE_6, 0, 0x08, 0x01, 255, 0];
        assert_eq!(refused(&ro, &subpage, &[]).await, (0x05, 0x24, 0x00));
    }

    #[tokio::test]
    async fn mode_select_accepts_the_current_values_and_refuses_a_change() {
        let (_, lun) = mem(0, false);
        let current = good(&lun, &[MODE_SENSE_6, 0, 0x3f, 0, 255, 0], &[]).await;
        let mut list = current.clone();
        list[0] = 0; // mode data length is reserved in MODE SELECT
        let select = [MODE_SELECT_6, 0x10, 0, 0, list.len() as u8, 0];
        good(&lun, &select, &list).await;
        good(&lun, &[MODE_SELECT_6, 0x10, 0, 0, 0, 0], &[]).await;
        let mut change = list.clone();
        change[12 + 2] = 0; // WCE off
        assert_eq!(refused(&lun, &select, &change).await, (0x05, 0x26, 0x00));
        assert_eq!(
            refused(&lun, &select, &list[..10]).await,
            (0x05, 0x1a, 0x00)
        );
        let save = [MODE_SELECT_6, 0x11, 0, 0, list.len() as u8, 0];
        assert_eq!(refused(&lun, &save, &list).await, (0x05, 0x24, 0x00));
    }

    #[tokio::test]
    async fn report_luns_lists_peripheral_and_flat_luns_for_any_lun() {
        let cdb = [REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];
        let o = execute(None, &[0, 5, 300, 1 << 20], &cdb, &[]).await;
        assert_eq!((o.status, o.sense), (GOOD, None));
        let mut want = vec![0, 0, 0, 24, 0, 0, 0, 0];
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0, 5, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
        assert_eq!(o.data.to_vec(), want);
        let short = [REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 15, 0, 0];
        let o = execute(None, &[0], &short, &[]).await;
        assert_eq!(o.sense, Some(INVALID_FIELD_IN_CDB));
        let cut = [REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0];
        assert_eq!(execute(None, &[0, 1], &cut, &[]).await.data.len(), 16);
    }

    #[test]
    fn lun_fields_round_trip() {
        for n in [0u64, 1, 255, 256, 0x3fff] {
            let b = encode_lun(n).unwrap();
            assert_eq!(decode_lun(&b), Some(n), "{n}");
        }
        assert_eq!(encode_lun(0x4000), None);
        assert_eq!(decode_lun(&[0x40, 1, 0, 0, 0, 0, 0, 0]), Some(1));
        assert_eq!(decode_lun(&[0x01, 1, 0, 0, 0, 0, 0, 0]), None, "bus 1");
        assert_eq!(decode_lun(&[0, 1, 0, 1, 0, 0, 0, 0]), None, "second level");
        assert_eq!(decode_lun(&[0xc0, 1, 0, 0, 0, 0, 0, 0]), None);
    }

    #[tokio::test]
    async fn reads_and_writes_round_trip_at_the_last_block_in_every_size() {
        let (d, lun) = mem(0, false);
        let last = BLOCKS - 1;
        let cases: [(Vec<u8>, Vec<u8>); 4] = [
            (c6(WRITE_6, last as u32, 1), c6(READ_6, last as u32, 1)),
            (
                c10(WRITE_10, 0x08, last as u32, 1),
                c10(READ_10, 0, last as u32, 1),
            ),
            (c12(WRITE_12, last as u32, 1), c12(READ_12, last as u32, 1)),
            (c16(WRITE_16, 0x08, last, 1), c16(READ_16, 0, last, 1)),
        ];
        for (i, (w, r)) in cases.iter().enumerate() {
            let data = pattern(B, i as u8);
            good(&lun, w, &data).await;
            assert_eq!(good(&lun, r, &[]).await, data, "case {i}");
            assert_eq!(d.lock()[(last as usize) * B..], data[..]);
        }
        // Two blocks ending at the last one, through READ (16).
        let data = pattern(2 * B, 9);
        good(&lun, &c16(WRITE_16, 0, last - 1, 2), &data).await;
        assert_eq!(good(&lun, &c16(READ_16, 0, last - 1, 2), &[]).await, data);
    }

    #[tokio::test]
    async fn read6_and_write6_of_length_zero_move_256_blocks() {
        let d = disk(300 * B, 7, false);
        let lun = lun_on(d, "m/d");
        assert_eq!(good(&lun, &c6(READ_6, 0, 0), &[]).await.len(), 256 * B);
        let data = pattern(256 * B, 3);
        good(&lun, &c6(WRITE_6, 44, 0), &data).await;
        assert_eq!(good(&lun, &c6(READ_6, 44, 0), &[]).await, data);
    }

    #[tokio::test]
    async fn past_end_is_lba_out_of_range_and_writes_nothing() {
        let (d, lun) = mem(0xaa, false);
        let data = pattern(2 * B, 1);
        let out = (0x05, 0x21, 0x00);
        for cdb in [
            c10(READ_10, 0, BLOCKS as u32, 1),
            c10(READ_10, 0, (BLOCKS - 1) as u32, 2),
            c16(READ_16, 0, u64::MAX, 1),
            c16(READ_16, 0, BLOCKS + 1, 0),
            c10(WRITE_10, 0, (BLOCKS - 1) as u32, 2),
            c16(WRITE_16, 0, u64::MAX - 1, 2),
            c16(VERIFY_16, 0, BLOCKS, 1),
            c10(SYNCHRONIZE_CACHE_10, 0, BLOCKS as u32, 1),
            c16(WRITE_SAME_16, 0, BLOCKS - 1, 2),
            caw(BLOCKS, 1),
        ] {
            assert_eq!(refused(&lun, &cdb, &data).await, out, "{cdb:02x?}");
        }
        assert!(d.lock().iter().all(|&b| b == 0xaa));
    }

    #[tokio::test]
    async fn zero_length_transfers_are_good_and_move_nothing() {
        let (d, lun) = mem(0xaa, false);
        for cdb in [
            c10(READ_10, 0, 3, 0),
            c10(WRITE_10, 0, 3, 0),
            c16(READ_16, 0, BLOCKS, 0),
            c16(WRITE_16, 0, BLOCKS, 0),
            c12(WRITE_12, 0, 0),
        ] {
            assert!(good(&lun, &cdb, &[1; 1024]).await.is_empty(), "{cdb:02x?}");
        }
        assert!(good(&lun, &caw(0, 0), &[]).await.is_empty());
        assert!(d.lock().iter().all(|&b| b == 0xaa));
    }

    #[tokio::test]
    async fn oversized_transfers_are_invalid_field_and_short_data_is_refused() {
        let d = disk(MAX_TRANSFER as usize * 2, 0, false);
        let lun = lun_on(d.clone(), "m/big");
        let over = (MAX_TRANSFER / BLOCK_SIZE + 1) as u16;
        let invalid = (0x05, 0x24, 0x00);
        assert_eq!(refused(&lun, &c10(READ_10, 0, 0, over), &[]).await, invalid);
        let big = vec![1u8; (over as usize) * B];
        assert_eq!(
            refused(&lun, &c10(WRITE_10, 0, 0, over), &big).await,
            invalid
        );
        // The CDB asks for 4 blocks, the initiator sent 3: no partial write.
        let short = vec![1u8; 3 * B];
        assert_eq!(
            refused(&lun, &c10(WRITE_10, 0, 0, 4), &short).await,
            invalid
        );
        assert!(d.lock().iter().all(|&b| b == 0));
        // Protection information is not supported.
        assert_eq!(refused(&lun, &c10(READ_10, 0x20, 0, 1), &[]).await, invalid);
    }

    #[tokio::test]
    async fn read_only_lun_refuses_every_write_command_before_the_disk() {
        let (d, lun) = mem(0x55, true);
        let protect = (0x07, 0x27, 0x00);
        let data = vec![0u8; 4 * B];
        let unmap_list = {
            let mut l = vec![0, 22, 0, 16, 0, 0, 0, 0];
            l.extend_from_slice(&c16(0, 0, 0, 0)[2..14]);
            l.extend_from_slice(&[0; 4]);
            l
        };
        for (cdb, out) in [
            (c6(WRITE_6, 0, 1), &data[..]),
            (c10(WRITE_10, 0, 0, 1), &data[..]),
            (c12(WRITE_12, 0, 1), &data[..]),
            (c16(WRITE_16, 0, 0, 1), &data[..]),
            (c10(WRITE_SAME_10, 0x08, 0, 1), &data[..]),
            (c16(WRITE_SAME_16, 0x01, 0, 1), &data[..]),
            (c10(UNMAP, 0, 0, 24), &unmap_list[..]),
            (caw(0, 1), &data[..]),
        ] {
            assert_eq!(refused(&lun, &cdb, out).await, protect, "{cdb:02x?}");
        }
        assert!(d.lock().iter().all(|&b| b == 0x55));
        // Reads still work.
        assert_eq!(good(&lun, &c10(READ_10, 0, 0, 1), &[]).await, vec![0x55; B]);
    }

    #[tokio::test]
    async fn write_same_repeats_one_block_or_zeroes() {
        let (d, lun) = mem(0xaa, false);
        let block = pattern(B, 5);
        good(&lun, &c10(WRITE_SAME_10, 0, 4, 3), &block).await;
        assert_eq!(d.lock()[4 * B..7 * B], block.repeat(3)[..]);
        assert_eq!(d.lock()[3 * B..4 * B], vec![0xaa; B][..]);
        assert_eq!(d.lock()[7 * B..8 * B], vec![0xaa; B][..]);
        // UNMAP with a zero block, and NDOB, zero the range.
        good(&lun, &c10(WRITE_SAME_10, 0x08, 4, 1), &[0; B]).await;
        assert_eq!(d.lock()[4 * B..5 * B], [0; B][..]);
        good(&lun, &c16(WRITE_SAME_16, 0x01, BLOCKS - 2, 2), &[]).await;
        assert!(d.lock()[(BLOCKS as usize - 2) * B..]
            .iter()
            .all(|&b| b == 0));
        // UNMAP with a non-zero block writes the block.
        good(&lun, &c16(WRITE_SAME_16, 0x08, 10, 1), &block).await;
        assert_eq!(d.lock()[10 * B..11 * B], block[..]);
        let invalid = (0x05, 0x24, 0x00);
        assert_eq!(
            refused(&lun, &c10(WRITE_SAME_10, 0, 4, 0), &block).await,
            invalid
        );
        assert_eq!(
            refused(&lun, &c10(WRITE_SAME_10, 0x10, 4, 1), &block).await,
            invalid
        );
        assert_eq!(
            refused(&lun, &c10(WRITE_SAME_10, 0, 4, 1), &block[..10]).await,
            invalid
        );
    }

    fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
        let n = (ranges.len() * 16) as u16;
        let mut l = Vec::new();
        l.extend_from_slice(&(n + 6).to_be_bytes());
        l.extend_from_slice(&n.to_be_bytes());
        l.extend_from_slice(&[0; 4]);
        for &(lba, blocks) in ranges {
            l.extend_from_slice(&lba.to_be_bytes());
            l.extend_from_slice(&blocks.to_be_bytes());
            l.extend_from_slice(&[0; 4]);
        }
        l
    }

    #[tokio::test]
    async fn unmap_zeroes_every_range_after_checking_them_all() {
        let (d, lun) = mem(0xaa, false);
        let list = unmap_list(&[(1, 2), (BLOCKS - 1, 1), (5, 0)]);
        good(&lun, &c10(UNMAP, 0, 0, list.len() as u16), &list).await;
        {
            let b = d.lock();
            assert_eq!(b[..B], vec![0xaa; B][..]);
            assert!(b[B..3 * B].iter().all(|&x| x == 0));
            assert_eq!(b[3 * B..4 * B], vec![0xaa; B][..]);
            assert!(b[(BLOCKS as usize - 1) * B..].iter().all(|&x| x == 0));
        }
        // One range past the end: nothing is zeroed.
        let list = unmap_list(&[(10, 1), (BLOCKS, 1)]);
        let cdb = c10(UNMAP, 0, 0, list.len() as u16);
        assert_eq!(refused(&lun, &cdb, &list).await, (0x05, 0x21, 0x00));
        assert_eq!(d.lock()[10 * B..11 * B], vec![0xaa; B][..]);
        // ANCHOR, a short list, too many descriptors.
        assert_eq!(
            refused(&lun, &c10(UNMAP, 0x01, 0, 24), &list).await,
            (0x05, 0x24, 0x00)
        );
        assert_eq!(
            refused(&lun, &c10(UNMAP, 0, 0, 6), &list).await,
            (0x05, 0x1a, 0x00)
        );
        assert_eq!(
            refused(&lun, &c10(UNMAP, 0, 0, 100), &list).await,
            (0x05, 0x1a, 0x00)
        );
        let many = unmap_list(&vec![(0, 1); MAX_UNMAP_DESCRIPTORS as usize + 1]);
        let cdb = c10(UNMAP, 0, 0, many.len() as u16);
        assert_eq!(refused(&lun, &cdb, &many).await, (0x05, 0x26, 0x00));
        // A zero parameter list length is nothing to do.
        good(&lun, &c10(UNMAP, 0, 0, 0), &[]).await;
    }

    #[tokio::test]
    async fn compare_and_write_writes_when_the_data_matches() {
        let (d, lun) = mem(0, false);
        let old = pattern(2 * B, 1);
        let new = pattern(2 * B, 2);
        good(&lun, &c16(WRITE_16, 0, 7, 2), &old).await;
        good(&lun, &caw(7, 2), &[old.clone(), new.clone()].concat()).await;
        assert_eq!(d.lock()[7 * B..9 * B], new[..]);
    }

    #[tokio::test]
    async fn compare_and_write_miscompare_names_the_first_difference_and_writes_nothing() {
        let (d, lun) = mem(0, false);
        let old = pattern(2 * B, 1);
        good(&lun, &c16(WRITE_16, 0, 7, 2), &old).await;
        let mut want = old.clone();
        want[B + 17] ^= 0xff;
        want[B + 40] ^= 0xff;
        let o = cmd(&lun, &caw(7, 2), &[want, vec![9; 2 * B]].concat()).await;
        assert_eq!(o.status, CHECK_CONDITION);
        let s = o.sense.unwrap();
        assert_eq!(s, MISCOMPARE.with_info(B as u32 + 17));
        let fixed = s.fixed();
        assert_eq!(fixed[0], 0xf0, "VALID, current error");
        assert_eq!((fixed[2], fixed[12], fixed[13]), (0x0e, 0x1d, 0x00));
        assert_eq!(&fixed[3..7], &(B as u32 + 17).to_be_bytes());
        assert_eq!(d.lock()[7 * B..9 * B], old[..]);
        // Too little data: the compare half only.
        assert_eq!(refused(&lun, &caw(7, 2), &old).await, (0x05, 0x24, 0x00));
        assert_eq!(d.lock()[7 * B..9 * B], old[..]);
    }

    /// A MemDisk whose reads take 10 ms after they have looked at the bytes, so a write can
    /// land between a read and what follows it.
    struct SlowReads(Arc<MemDisk>);

    #[async_trait]
    impl BlockDevice for SlowReads {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_only(&self) -> bool {
            false
        }
        async fn read(&self, offset: u64, len: u32) -> Result<crate::block::Pieces, BlockError> {
            let r = self.0.read(offset, len).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            r
        }
        async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
            self.0.write(offset, data, fua).await
        }
        async fn flush(&self) -> Result<(), BlockError> {
            self.0.flush().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn compare_and_write_is_atomic_against_a_concurrent_write() {
        // The block holds A. COMPARE AND WRITE (A -> C) starts; 1 ms later a WRITE of B. If
        // the compare and its write were not atomic, B would land while the compare's read
        // sleeps and C would overwrite it. Atomic, B is written after C: the block ends B.
        let mem = disk(BLOCKS as usize * B, 0, false);
        let lun = Arc::new(lun_on(Arc::new(SlowReads(mem.clone())), "m/d"));
        let (a, b, c) = (vec![0u8; B], vec![0xbb; B], vec![0xcc; B]);
        let l = lun.clone();
        let caw_task = tokio::spawn(async move { cmd(&l, &caw(3, 1), &[a, c].concat()).await });
        tokio::time::sleep(Duration::from_millis(1)).await;
        let write = cmd(&lun, &c10(WRITE_10, 0, 3, 1), &b).await;
        assert_eq!(write.status, GOOD);
        assert_eq!(caw_task.await.unwrap().status, GOOD);
        let block = mem.lock()[3 * B..4 * B].to_vec();
        assert!(block == b, "the block ends {:#x}, not 0xbb", block[0]);
    }

    #[tokio::test]
    async fn verify_compares_bytes_when_asked() {
        let (_, lun) = mem(0, false);
        let data = pattern(2 * B, 4);
        good(&lun, &c16(WRITE_16, 0, 2, 2), &data).await;
        good(&lun, &c16(VERIFY_16, 0, 2, 2), &[]).await;
        good(&lun, &c16(VERIFY_16, 0x02, 2, 2), &data).await;
        good(&lun, &c10(VERIFY_10, 0x02, 2, 2), &data).await;
        let mut other = data.clone();
        other[3] ^= 1;
        let o = cmd(&lun, &c10(VERIFY_10, 0x02, 2, 2), &other).await;
        assert_eq!(o.sense, Some(MISCOMPARE.with_info(3)));
        // BYTCHK 3: one block against each; block 3 differs from block 2 at its byte 5.
        let mut third = data[..B].to_vec();
        third[5] ^= 1;
        good(&lun, &c10(WRITE_10, 0, 3, 1), &third).await;
        let o = cmd(&lun, &c10(VERIFY_10, 0x06, 2, 2), &data[..B]).await;
        assert_eq!(o.sense, Some(MISCOMPARE.with_info(B as u32 + 5)));
        good(&lun, &c10(VERIFY_10, 0x06, 40, 3), &[0; B]).await;
    }

    #[tokio::test]
    async fn synchronize_cache_flushes_the_disk() {
        let (d, lun) = mem(0, false);
        good(&lun, &c10(SYNCHRONIZE_CACHE_10, 0, 0, 0), &[]).await;
        good(&lun, &c16(SYNCHRONIZE_CACHE_16, 0, 0, BLOCKS as u32), &[]).await;
        assert_eq!(d.flushes.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn harmless_commands_are_good_and_unknown_ones_invalid_opcode() {
        let (_, lun) = mem(0, false);
        for cdb in [
            [TEST_UNIT_READY, 0, 0, 0, 0, 0],
            [START_STOP_UNIT, 0, 0, 0, 1, 0],
            [PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1, 0],
        ] {
            good(&lun, &cdb, &[]).await;
        }
        let invalid_opcode = (0x05, 0x20, 0x00);
        assert_eq!(
            refused(&lun, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 9, 0], &[]).await,
            invalid_opcode
        );
        assert_eq!(refused(&lun, &[0x7f; 40], &[]).await, invalid_opcode);
        assert_eq!(refused(&lun, &[], &[]).await, invalid_opcode);
        // NACA in the control byte.
        assert_eq!(
            refused(&lun, &[TEST_UNIT_READY, 0, 0, 0, 0, 4], &[]).await,
            (0x05, 0x24, 0x00)
        );
    }

    #[tokio::test]
    async fn a_missing_lun_answers_only_inquiry_report_luns_and_request_sense() {
        let not_supported = Some(LU_NOT_SUPPORTED);
        for cdb in [
            vec![TEST_UNIT_READY, 0, 0, 0, 0, 0],
            c10(READ_10, 0, 0, 1),
            vec![0xff; 16],
        ] {
            let o = execute(None, &[0], &cdb, &[]).await;
            assert_eq!((o.status, o.sense), (CHECK_CONDITION, not_supported));
        }
        let o = execute(None, &[0], &[REQUEST_SENSE, 0, 0, 0, 18, 0], &[]).await;
        assert_eq!((o.status, o.sense), (GOOD, None));
        assert_eq!(o.data.to_vec(), LU_NOT_SUPPORTED.fixed().to_vec());
    }

    #[tokio::test]
    async fn request_sense_reports_no_sense_in_either_format() {
        let (_, lun) = mem(0, false);
        let fixed = good(&lun, &[REQUEST_SENSE, 0, 0, 0, 252, 0], &[]).await;
        assert_eq!(fixed.len(), 18);
        assert_eq!((fixed[0], fixed[2], fixed[7], fixed[12]), (0x70, 0, 10, 0));
        let desc = good(&lun, &[REQUEST_SENSE, 1, 0, 0, 252, 0], &[]).await;
        assert_eq!(desc, [0x72, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            good(&lun, &[REQUEST_SENSE, 0, 0, 0, 8, 0], &[]).await.len(),
            8
        );
    }

    #[test]
    fn descriptor_sense_carries_the_information_field() {
        let s = MISCOMPARE.with_info(0x1234).descriptor();
        assert_eq!(
            s,
            [0x72, 0x0e, 0x1d, 0, 0, 0, 0, 12, 0, 0x0a, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34]
        );
        let f = Sense::new(0x05, 0x24, 0x00).fixed();
        assert_eq!(
            (f[0], f[2], f[7], f[12], f[13]),
            (0x70, 0x05, 10, 0x24, 0x00)
        );
    }

    #[test]
    fn device_errors_map_to_sense_data() {
        let table = [
            (BlockError::ReadOnly, false, (0x07, 0x27, 0x00)),
            (BlockError::ReadOnly, true, (0x07, 0x27, 0x00)),
            (BlockError::OutOfRange, false, (0x05, 0x21, 0x00)),
            (BlockError::NoSpace, true, (0x07, 0x27, 0x07)),
            (
                BlockError::Io("chunk gone".into()),
                false,
                (0x03, 0x11, 0x00),
            ),
            (BlockError::Io("overlay".into()), true, (0x03, 0x0c, 0x00)),
        ];
        for (e, write, want) in table {
            let s = device_sense(&e, write);
            assert_eq!((s.key, s.asc, s.ascq), want, "{e:?} write={write}");
            assert_eq!(s.info, None);
        }
    }

    #[tokio::test]
    async fn device_errors_reach_the_initiator_as_sense() {
        for (err, read_want, write_want) in [
            (
                BlockError::Io("x".into()),
                (0x03, 0x11, 0x00),
                (0x03, 0x0c, 0x00),
            ),
            (BlockError::NoSpace, (0x07, 0x27, 0x07), (0x07, 0x27, 0x07)),
        ] {
            let dev: Arc<dyn BlockDevice> = Arc::new(Failing {
                size: 64 * 512,
                err,
            });
            let lun = lun_on(dev, "f");
            assert_eq!(refused(&lun, &c10(READ_10, 0, 0, 1), &[]).await, read_want);
            assert_eq!(
                refused(&lun, &c10(WRITE_10, 0, 0, 1), &[0; B]).await,
                write_want
            );
            let sync = c10(SYNCHRONIZE_CACHE_10, 0, 0, 0);
            assert_eq!(refused(&lun, &sync, &[]).await, write_want);
        }
    }

    #[test]
    fn data_out_len_is_what_the_command_expects() {
        let table: [(Vec<u8>, Option<u64>); 16] = [
            (c10(READ_10, 0, 0, 4), Some(0)),
            (c10(WRITE_10, 0, 0, 4), Some(4 * 512)),
            (c6(WRITE_6, 0, 0), Some(256 * 512)),
            (c12(WRITE_12, 0, 3), Some(3 * 512)),
            (
                c16(WRITE_16, 0, 0, u32::MAX),
                Some(u64::from(u32::MAX) * 512),
            ),
            (c16(VERIFY_16, 0x02, 0, 2), Some(1024)),
            (c16(VERIFY_16, 0x06, 0, 2), Some(512)),
            (c16(VERIFY_16, 0, 0, 2), Some(0)),
            (c10(WRITE_SAME_10, 0, 0, 9), Some(512)),
            (c16(WRITE_SAME_16, 0x01, 0, 9), Some(0)),
            (c10(UNMAP, 0, 0, 24), Some(24)),
            (caw(0, 3), Some(3 * 1024)),
            (vec![MODE_SELECT_6, 0x10, 0, 0, 28, 0], Some(28)),
            (inq(true, 0x83, 255), Some(0)),
            (vec![WRITE_10, 0, 0], None),
            (vec![0x5e; 10], None),
        ];
        for (cdb, want) in table {
            assert_eq!(data_out_len(&cdb), want, "{cdb:02x?}");
        }
    }

    fn byte() -> impl Strategy<Value = u8> {
        prop_oneof![Just(0u8), 0u8..4, Just(0xff), any::<u8>()]
    }

    fn opcode() -> impl Strategy<Value = u8> {
        let known: Vec<u8> = (0..=255u8).filter(|&op| cdb_len(op).is_some()).collect();
        prop_oneof![4 => proptest::sample::select(known), 1 => any::<u8>()]
    }

    /// A CDB of a known command with small, mostly in-range fields.
    fn shaped_cdb() -> impl Strategy<Value = Vec<u8>> {
        let known: Vec<u8> = (0..=255u8).filter(|&op| cdb_len(op).is_some()).collect();
        (
            proptest::sample::select(known),
            byte(),
            0u64..70,
            prop_oneof![0u32..5, 0u32..70, Just(24), Just(40)],
            byte(),
        )
            .prop_map(|(op, flags, lba, n, control)| {
                let mut c = match cdb_len(op) {
                    Some(6) => {
                        let mut c = c6(op, lba as u32, n as u8);
                        c[1] |= flags & 0xe0;
                        c
                    }
                    Some(10) => c10(op, flags, lba as u32, n as u16),
                    Some(12) => {
                        let mut c = c12(op, lba as u32, n);
                        c[1] = flags;
                        c
                    }
                    _ if op == COMPARE_AND_WRITE => {
                        let mut c = caw(lba, n as u8);
                        c[1] = flags;
                        c
                    }
                    _ => c16(op, flags, lba, n),
                };
                if let Some(last) = c.last_mut() {
                    *last = control & 0x07;
                }
                c
            })
    }

    /// Data out: random, or a well-formed UNMAP list (then anything).
    fn data_out() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(byte(), 0..3000),
            (
                prop::collection::vec((0u64..70, 0u32..5), 0..4),
                prop::collection::vec(byte(), 0..600),
            )
                .prop_map(|(ranges, tail)| [unmap_list(&ranges), tail].concat()),
        ]
    }

    fn any_cdb() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            (opcode(), prop::collection::vec(byte(), 0..=259))
                .prop_map(|(op, rest)| std::iter::once(op).chain(rest).collect()),
            shaped_cdb(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn any_cdb_and_data_give_an_outcome_and_never_write_a_read_only_disk(
            cdb in any_cdb(),
            data in data_out(),
            read_only in any::<bool>(),
            have_lun in any::<bool>(),
        ) {
            let (d, lun) = mem(0x5a, read_only);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let lun = have_lun.then_some(&lun);
            let o = rt.block_on(execute(lun, &[0, 3], &cdb, &data));
            match o.status {
                GOOD => prop_assert!(o.sense.is_none()),
                CHECK_CONDITION => {
                    prop_assert!(o.sense.is_some());
                    prop_assert!(o.data.is_empty());
                }
                s => prop_assert!(false, "status {s}"),
            }
            prop_assert!(o.data.len() <= MAX_TRANSFER as usize);
            if read_only || !have_lun {
                prop_assert!(d.lock().iter().all(|&b| b == 0x5a));
            }
            if let Some(n) = data_out_len(&cdb) {
                prop_assert!(n < 1 << 42);
            }
        }
    }
}
