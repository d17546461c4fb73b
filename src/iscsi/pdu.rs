//! The iSCSI wire format (RFC 7143 §11): the 48-byte Basic Header Segment of every PDU, its
//! fields, the opcodes this target reads and writes, data segments padded to 4 bytes. (LUN
//! fields are SAM's: `super::scsi::decode_lun`.)
//!
//! Owns: constants and field offsets, [`Bhs`] accessors (every one bounds-checked: a header
//! is 48 bytes whatever the client sent), builders of the PDUs the target sends, and of the
//! ones an initiator sends (for tests and fuzzing seeds).
//! Must not: do I/O or keep session state; `super::login` and `super::session` do.

/// Every PDU starts with this many bytes.
pub const BHS_LEN: usize = 48;
/// "No task tag" / "no target transfer tag".
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes.
pub const NOP_OUT: u8 = 0x00;
pub const SCSI_COMMAND: u8 = 0x01;
pub const TASK_MGMT: u8 = 0x02;
pub const LOGIN: u8 = 0x03;
pub const TEXT: u8 = 0x04;
pub const DATA_OUT: u8 = 0x05;
pub const LOGOUT: u8 = 0x06;
pub const SNACK: u8 = 0x10;
/// Target opcodes.
pub const NOP_IN: u8 = 0x20;
pub const SCSI_RESPONSE: u8 = 0x21;
pub const TASK_MGMT_RESPONSE: u8 = 0x22;
pub const LOGIN_RESPONSE: u8 = 0x23;
pub const TEXT_RESPONSE: u8 = 0x24;
pub const DATA_IN: u8 = 0x25;
pub const LOGOUT_RESPONSE: u8 = 0x26;
pub const R2T: u8 = 0x31;
pub const REJECT: u8 = 0x3f;

/// Byte 0: the immediate-delivery bit.
pub const IMMEDIATE: u8 = 0x40;
/// Byte 1 flags.
pub const FINAL: u8 = 0x80;
/// Login: transit to the next stage; Text and Login: continue (more text follows).
pub const TRANSIT: u8 = 0x80;
pub const CONTINUE: u8 = 0x40;
/// SCSI Command: data from the target (read) / to the target (write).
pub const READ: u8 = 0x40;
pub const WRITE: u8 = 0x20;
/// SCSI Response and Data-In: residual overflow / underflow; Data-In: status present.
pub const OVERFLOW: u8 = 0x04;
pub const UNDERFLOW: u8 = 0x02;
pub const STATUS: u8 = 0x01;

/// Field offsets (RFC 7143 §11).
pub const ITT: usize = 16;
/// Target Transfer Tag; Referenced Task Tag of a task management request.
pub const TTT: usize = 20;
/// The initiator's CmdSN; the target's StatSN.
pub const CMD_SN: usize = 24;
pub const STAT_SN: usize = 24;
/// The initiator's ExpStatSN; the target's ExpCmdSN.
pub const EXP_STAT_SN: usize = 28;
pub const EXP_CMD_SN: usize = 28;
pub const MAX_CMD_SN: usize = 32;
/// SCSI Command: Expected Data Transfer Length (at the TTT offset).
pub const EDTL: usize = 20;
/// Data-In, Data-Out, R2T: DataSN (R2TSN), Buffer Offset; R2T: Desired Data Transfer Length.
pub const DATA_SN: usize = 36;
pub const BUFFER_OFFSET: usize = 40;
pub const DESIRED_LENGTH: usize = 44;
/// SCSI Response and Data-In: Residual Count; SCSI Response: ExpDataSN.
pub const RESIDUAL: usize = 44;
pub const EXP_DATA_SN: usize = 36;
/// SCSI Command: the CDB (16 bytes; a longer one continues in an AHS).
pub const CDB: usize = 32;

/// AHS type of an extended CDB (RFC 7143 §11.3.1.2).
pub const AHS_EXTENDED_CDB: u8 = 1;

/// Reject reasons (RFC 7143 §11.17.1).
pub const REJECT_SNACK: u8 = 0x03;
pub const REJECT_PROTOCOL_ERROR: u8 = 0x04;
pub const REJECT_NOT_SUPPORTED: u8 = 0x05;
pub const REJECT_INVALID_FIELD: u8 = 0x09;

/// Login stages.
pub const SECURITY: u8 = 0;
pub const OPERATIONAL: u8 = 1;
pub const FULL_FEATURE: u8 = 3;

/// Login status classes and details (RFC 7143 §11.13.5).
pub const LOGIN_SUCCESS: (u8, u8) = (0x00, 0x00);
pub const LOGIN_INITIATOR_ERROR: (u8, u8) = (0x02, 0x00);
pub const LOGIN_AUTH_FAILED: (u8, u8) = (0x02, 0x01);
pub const LOGIN_NOT_FOUND: (u8, u8) = (0x02, 0x03);
pub const LOGIN_UNSUPPORTED_VERSION: (u8, u8) = (0x02, 0x05);
pub const LOGIN_MISSING_PARAMETER: (u8, u8) = (0x02, 0x07);
pub const LOGIN_NO_SESSION: (u8, u8) = (0x02, 0x0a);
pub const LOGIN_INVALID_REQUEST: (u8, u8) = (0x02, 0x0b);
pub const LOGIN_TARGET_ERROR: (u8, u8) = (0x03, 0x00);

/// The padding after a data segment of `len` bytes.
pub fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// A Basic Header Segment.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bhs(op {:#04x} flags {:#04x} itt {:#x} data {})",
            self.opcode(),
            self.flags(),
            self.get32(ITT),
            self.data_len()
        )
    }
}

impl Bhs {
    /// A header of `opcode` with the final bit set and everything else zero.
    pub fn new(opcode: u8) -> Bhs {
        let mut b = [0u8; BHS_LEN];
        b[0] = opcode;
        b[1] = FINAL;
        Bhs(b)
    }

    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }

    pub fn immediate(&self) -> bool {
        self.0[0] & IMMEDIATE != 0
    }

    pub fn flags(&self) -> u8 {
        self.0[1]
    }

    /// The length of the additional header segments, in bytes.
    pub fn ahs_len(&self) -> usize {
        usize::from(self.0[4]) * 4
    }

    /// The data segment's length, without padding.
    pub fn data_len(&self) -> u32 {
        u32::from_be_bytes([0, self.0[5], self.0[6], self.0[7]])
    }

    /// Sets the data segment's length (24 bits; callers keep segments far below 16 MiB).
    pub fn set_data_len(&mut self, n: usize) {
        let n = n.min(0xff_ffff) as u32;
        self.0[5..8].copy_from_slice(&n.to_be_bytes()[1..]);
    }

    pub fn get32(&self, at: usize) -> u32 {
        match self.0.get(at..at + 4) {
            Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
            _ => 0,
        }
    }

    pub fn set32(&mut self, at: usize, v: u32) {
        if let Some(s) = self.0.get_mut(at..at + 4) {
            s.copy_from_slice(&v.to_be_bytes());
        }
    }

    pub fn get16(&self, at: usize) -> u16 {
        match self.0.get(at..at + 2) {
            Some(&[a, b]) => u16::from_be_bytes([a, b]),
            _ => 0,
        }
    }

    pub fn set16(&mut self, at: usize, v: u16) {
        if let Some(s) = self.0.get_mut(at..at + 2) {
            s.copy_from_slice(&v.to_be_bytes());
        }
    }

    pub fn itt(&self) -> u32 {
        self.get32(ITT)
    }

    /// The LUN field (bytes 8..16).
    pub fn lun(&self) -> [u8; 8] {
        let mut l = [0u8; 8];
        l.copy_from_slice(&self.0[8..16]);
        l
    }

    pub fn set_lun(&mut self, lun: [u8; 8]) {
        self.0[8..16].copy_from_slice(&lun);
    }

    /// The header followed by `data` and its padding: one whole PDU.
    pub fn with_data(mut self, data: &[u8]) -> Vec<u8> {
        self.set_data_len(data.len());
        let mut v = Vec::with_capacity(BHS_LEN + data.len() + 3);
        v.extend_from_slice(&self.0);
        v.extend_from_slice(data);
        v.resize(v.len() + padding(data.len()), 0);
        v
    }
}

/// A Login Request's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

impl LoginRequest {
    pub fn parse(b: &Bhs) -> LoginRequest {
        let f = b.flags();
        let mut isid = [0u8; 6];
        isid.copy_from_slice(&b.0[8..14]);
        LoginRequest {
            transit: f & TRANSIT != 0,
            cont: f & CONTINUE != 0,
            csg: (f >> 2) & 3,
            nsg: f & 3,
            version_max: b.0[2],
            version_min: b.0[3],
            isid,
            tsih: b.get16(14),
            itt: b.itt(),
            cid: b.get16(20),
            cmd_sn: b.get32(CMD_SN),
            exp_stat_sn: b.get32(EXP_STAT_SN),
        }
    }

    /// The request as an initiator sends it, with `text` (key=value pairs).
    pub fn encode(&self, text: &[u8]) -> Vec<u8> {
        let mut b = Bhs::new(LOGIN);
        b.0[0] = LOGIN | IMMEDIATE;
        b.0[1] = (if self.transit { TRANSIT } else { 0 })
            | (if self.cont { CONTINUE } else { 0 })
            | ((self.csg & 3) << 2)
            | (self.nsg & 3);
        b.0[2] = self.version_max;
        b.0[3] = self.version_min;
        b.0[8..14].copy_from_slice(&self.isid);
        b.set16(14, self.tsih);
        b.set32(ITT, self.itt);
        b.set16(20, self.cid);
        b.set32(CMD_SN, self.cmd_sn);
        b.set32(EXP_STAT_SN, self.exp_stat_sn);
        b.with_data(text)
    }
}

/// A Login Response: the request's ISID and ITT, our stages and status; StatSN and the
/// command window are filled in by the caller.
pub fn login_response(
    req: &LoginRequest,
    transit: bool,
    nsg: u8,
    tsih: u16,
    status: (u8, u8),
) -> Bhs {
    let mut b = Bhs::new(LOGIN_RESPONSE);
    b.0[1] = (if transit { TRANSIT } else { 0 }) | ((req.csg & 3) << 2) | (nsg & 3);
    b.0[8..14].copy_from_slice(&req.isid);
    b.set16(14, tsih);
    b.set32(ITT, req.itt);
    b.0[36] = status.0;
    b.0[37] = status.1;
    b
}

/// A SCSI Command's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// No unsolicited Data-Out follows.
    pub fin: bool,
    pub read: bool,
    pub write: bool,
    pub lun: [u8; 8],
    pub itt: u32,
    pub edtl: u32,
    pub cmd_sn: u32,
    pub cdb: [u8; 16],
}

impl ScsiCommand {
    pub fn parse(b: &Bhs) -> ScsiCommand {
        let f = b.flags();
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&b.0[CDB..CDB + 16]);
        ScsiCommand {
            immediate: b.immediate(),
            fin: f & FINAL != 0,
            read: f & READ != 0,
            write: f & WRITE != 0,
            lun: b.lun(),
            itt: b.itt(),
            edtl: b.get32(EDTL),
            cmd_sn: b.get32(CMD_SN),
            cdb,
        }
    }

    /// The command as an initiator sends it, with immediate data.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut b = Bhs::new(SCSI_COMMAND);
        if self.immediate {
            b.0[0] |= IMMEDIATE;
        }
        b.0[1] = (if self.fin { FINAL } else { 0 })
            | (if self.read { READ } else { 0 })
            | (if self.write { WRITE } else { 0 })
            | 1; // SIMPLE
        b.set_lun(self.lun);
        b.set32(ITT, self.itt);
        b.set32(EDTL, self.edtl);
        b.set32(CMD_SN, self.cmd_sn);
        b.0[CDB..CDB + 16].copy_from_slice(&self.cdb);
        b.with_data(data)
    }
}

/// A Data-Out's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataOut {
    pub fin: bool,
    pub itt: u32,
    pub ttt: u32,
    pub data_sn: u32,
    pub offset: u32,
}

impl DataOut {
    pub fn parse(b: &Bhs) -> DataOut {
        DataOut {
            fin: b.flags() & FINAL != 0,
            itt: b.itt(),
            ttt: b.get32(TTT),
            data_sn: b.get32(DATA_SN),
            offset: b.get32(BUFFER_OFFSET),
        }
    }

    pub fn encode(&self, lun: [u8; 8], data: &[u8]) -> Vec<u8> {
        let mut b = Bhs::new(DATA_OUT);
        b.0[1] = if self.fin { FINAL } else { 0 };
        b.set_lun(lun);
        b.set32(ITT, self.itt);
        b.set32(TTT, self.ttt);
        b.set32(DATA_SN, self.data_sn);
        b.set32(BUFFER_OFFSET, self.offset);
        b.with_data(data)
    }
}

/// A Data-In: `flags` beyond FINAL are the caller's (STATUS, residual bits, status byte).
pub fn data_in(lun: [u8; 8], itt: u32, data_sn: u32, offset: u32, fin: bool) -> Bhs {
    let mut b = Bhs::new(DATA_IN);
    b.0[1] = if fin { FINAL } else { 0 };
    b.set_lun(lun);
    b.set32(ITT, itt);
    b.set32(TTT, RESERVED_TAG);
    b.set32(DATA_SN, data_sn);
    b.set32(BUFFER_OFFSET, offset);
    b
}

/// A SCSI Response: command completed at target with `status`; residual flags and count.
pub fn scsi_response(itt: u32, status: u8, residual: Residual, exp_data_sn: u32) -> Bhs {
    let mut b = Bhs::new(SCSI_RESPONSE);
    b.0[1] = FINAL | residual.flags();
    b.0[3] = status;
    b.set32(ITT, itt);
    b.set32(EXP_DATA_SN, exp_data_sn);
    b.set32(RESIDUAL, residual.count());
    b
}

/// A residual: how much less (underflow) or more (overflow) the command moved than the
/// initiator's Expected Data Transfer Length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    None,
    Under(u32),
    Over(u32),
}

impl Residual {
    /// Of a command expecting `edtl` bytes that moves (or would move) `moved`.
    pub fn of(edtl: u32, moved: u64) -> Residual {
        let edtl64 = u64::from(edtl);
        if moved < edtl64 {
            Residual::Under((edtl64 - moved) as u32)
        } else if moved > edtl64 {
            Residual::Over((moved - edtl64).min(u64::from(u32::MAX)) as u32)
        } else {
            Residual::None
        }
    }

    pub fn flags(self) -> u8 {
        match self {
            Residual::None => 0,
            Residual::Under(_) => UNDERFLOW,
            Residual::Over(_) => OVERFLOW,
        }
    }

    pub fn count(self) -> u32 {
        match self {
            Residual::None => 0,
            Residual::Under(n) | Residual::Over(n) => n,
        }
    }
}

/// An R2T for `len` bytes at `offset`.
pub fn r2t(lun: [u8; 8], itt: u32, ttt: u32, r2t_sn: u32, offset: u32, len: u32) -> Bhs {
    let mut b = Bhs::new(R2T);
    b.set_lun(lun);
    b.set32(ITT, itt);
    b.set32(TTT, ttt);
    b.set32(DATA_SN, r2t_sn);
    b.set32(BUFFER_OFFSET, offset);
    b.set32(DESIRED_LENGTH, len);
    b
}

/// A NOP-In answering a NOP-Out (its ITT and LUN; the data echoed by the caller).
pub fn nop_in(lun: [u8; 8], itt: u32) -> Bhs {
    let mut b = Bhs::new(NOP_IN);
    b.set_lun(lun);
    b.set32(ITT, itt);
    b.set32(TTT, RESERVED_TAG);
    b
}

/// A Task Management Function Response.
pub fn task_mgmt_response(itt: u32, response: u8) -> Bhs {
    let mut b = Bhs::new(TASK_MGMT_RESPONSE);
    b.0[2] = response;
    b.set32(ITT, itt);
    b
}

/// A Text Response; `cont`: more text follows (then `ttt` names the exchange).
pub fn text_response(itt: u32, ttt: u32, cont: bool) -> Bhs {
    let mut b = Bhs::new(TEXT_RESPONSE);
    b.0[1] = if cont { CONTINUE } else { FINAL };
    b.set32(ITT, itt);
    b.set32(TTT, ttt);
    b
}

/// A Logout Response.
pub fn logout_response(itt: u32, response: u8) -> Bhs {
    let mut b = Bhs::new(LOGOUT_RESPONSE);
    b.0[2] = response;
    b.set32(ITT, itt);
    b
}

/// A Reject of the PDU whose header is `rejected` (sent back as the data segment).
pub fn reject(reason: u8) -> Bhs {
    let mut b = Bhs::new(REJECT);
    b.0[2] = reason;
    b.set32(ITT, RESERVED_TAG);
    b
}

/// An initiator's PDU of `opcode` with the common fields, for tests and seeds.
pub fn request(opcode: u8, immediate: bool, itt: u32, cmd_sn: u32) -> Bhs {
    let mut b = Bhs::new(opcode);
    if immediate {
        b.0[0] |= IMMEDIATE;
    }
    b.set32(ITT, itt);
    b.set32(TTT, RESERVED_TAG);
    b.set32(CMD_SN, cmd_sn);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_requests_round_trip_and_responses_carry_the_isid_and_itt() {
        let req = LoginRequest {
            transit: true,
            cont: false,
            csg: SECURITY,
            nsg: OPERATIONAL,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 1, 2, 3, 4, 5],
            tsih: 0,
            itt: 0x1234,
            cid: 7,
            cmd_sn: 99,
            exp_stat_sn: 0,
        };
        let wire = req.encode(b"InitiatorName=iqn.x\0");
        assert_eq!(wire.len(), 48 + 20);
        let mut h = [0u8; 48];
        h.copy_from_slice(&wire[..48]);
        let b = Bhs(h);
        assert_eq!(b.opcode(), LOGIN);
        assert!(b.immediate());
        assert_eq!(b.data_len(), 20);
        assert_eq!(LoginRequest::parse(&b), req);

        let r = login_response(&req, true, OPERATIONAL, 5, LOGIN_AUTH_FAILED);
        assert_eq!(r.opcode(), LOGIN_RESPONSE);
        assert_eq!(r.flags(), TRANSIT | 1);
        assert_eq!(&r.0[8..14], &req.isid);
        assert_eq!(r.get16(14), 5);
        assert_eq!(r.itt(), 0x1234);
        assert_eq!((r.0[36], r.0[37]), (2, 1));
    }

    #[test]
    fn data_segments_are_padded_to_four_bytes() {
        assert_eq!(padding(0), 0);
        assert_eq!(padding(1), 3);
        assert_eq!(padding(4), 0);
        assert_eq!(padding(6), 2);
        let pdu = Bhs::new(NOP_OUT).with_data(b"abcde");
        assert_eq!(pdu.len(), 48 + 8);
        assert_eq!(&pdu[53..], &[0, 0, 0]);
        let mut b = Bhs::new(NOP_OUT);
        b.set_data_len(0x12_3456);
        assert_eq!(b.data_len(), 0x12_3456);
        b.set_data_len(usize::MAX);
        assert_eq!(b.data_len(), 0xff_ffff);
    }

    #[test]
    fn scsi_commands_and_data_outs_round_trip() {
        let cmd = ScsiCommand {
            immediate: false,
            fin: true,
            read: false,
            write: true,
            lun: [0, 1, 0, 0, 0, 0, 0, 0],
            itt: 3,
            edtl: 4096,
            cmd_sn: 10,
            cdb: [0x2a, 0, 0, 0, 0, 8, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
        };
        let wire = cmd.encode(&[1; 512]);
        let b = Bhs(wire[..48].try_into().unwrap());
        assert_eq!(ScsiCommand::parse(&b), cmd);
        assert_eq!(b.data_len(), 512);

        let d = DataOut {
            fin: true,
            itt: 3,
            ttt: 0x10,
            data_sn: 2,
            offset: 512,
        };
        let wire = d.encode([0, 1, 0, 0, 0, 0, 0, 0], &[2; 100]);
        let b = Bhs(wire[..48].try_into().unwrap());
        assert_eq!(DataOut::parse(&b), d);
        assert_eq!(b.opcode(), DATA_OUT);
    }

    #[test]
    fn residuals_compare_the_expected_length_with_what_moves() {
        assert_eq!(Residual::of(512, 512), Residual::None);
        assert_eq!(Residual::of(1024, 512), Residual::Under(512));
        assert_eq!(Residual::of(0, 512), Residual::Over(512));
        assert_eq!(Residual::of(0, u64::MAX).count(), u32::MAX);
        let r = scsi_response(9, 2, Residual::Over(512), 0);
        assert_eq!(r.flags(), FINAL | OVERFLOW);
        assert_eq!(r.0[3], 2);
        assert_eq!(r.get32(RESIDUAL), 512);
    }

    #[test]
    fn accessors_past_the_header_read_zero_and_write_nothing() {
        let mut b = Bhs::new(NOP_IN);
        b.set32(46, 7);
        assert_eq!(b.get32(46), 0);
        assert_eq!(b.get16(47), 0);
        assert_eq!(b, {
            let mut c = Bhs::new(NOP_IN);
            c.set16(47, 1);
            c
        });
    }
}
