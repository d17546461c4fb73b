//! The SCSI commands a disk answers (SBC-3/SPC-4 as the Linux, QEMU and ESXi initiators use
//! them): a CDB and the data the initiator sent in; a status, sense data and the data to send
//! back out. Nothing here knows iSCSI.
//!
//! Owns: [`Lun`], [`execute`], [`Sense`].
//! Must not: know a transport; touch a disk other than through [`BlockDevice`].

use std::sync::Arc;

use bytes::Bytes;

use crate::block::BlockDevice;

/// The logical block size of every LUN.
pub const BLOCK_SIZE: u32 = 512;
/// The most one command may move (Block Limits: maximum transfer length); a larger READ or
/// WRITE is refused with ILLEGAL REQUEST, so the transport may bound its buffers by it.
pub const MAX_TRANSFER: u32 = 8 << 20;

/// SCSI status codes.
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

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

/// Sense data: key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

/// What a command came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// [`GOOD`] or [`CHECK_CONDITION`].
    pub status: u8,
    /// With CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data for the initiator (already cut to the CDB's allocation length).
    pub data: Bytes,
}

/// Runs one command. `lun` is `None` for a LUN the target does not have; `luns` are the LUN
/// numbers the target has (REPORT LUNS); `data_out` is what the initiator sent.
pub async fn execute(lun: Option<&Lun>, luns: &[u64], cdb: &[u8], data_out: &[u8]) -> Outcome {
    let _ = (lun, luns, cdb, data_out);
    Outcome {
        status: CHECK_CONDITION,
        sense: Some(Sense {
            key: 0x05,
            asc: 0x20,
            ascq: 0x00,
        }),
        data: Bytes::new(),
    }
}
