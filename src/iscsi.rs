//! The iSCSI target (issue 17): a live mount as a target `iqn.2026-12.io.livemount:MOUNT`,
//! each of its disks a LUN, for QEMU's and libiscsi's initiators, Linux `iscsiadm` and ESXi's
//! software adapter.
//!
//! Owns: the SCSI commands a disk answers (`scsi.rs`: CDB in, status, sense and data out),
//! the iSCSI protocol (`pdu.rs`, `login.rs`, `session.rs`, `server.rs`: PDUs, login with and
//! without CHAP, discovery, the full-feature phase, limits), and the datastore's mounts as
//! targets (`targets.rs`).
//! Must not: know about mounts, overlays or chunks beyond the datastore core's disks.

#[doc(hidden)]
pub mod fuzzing;
mod login;
mod pdu;
pub mod scsi;
pub mod server;
mod session;
mod targets;

pub use scsi::Lun;
pub use server::{Chap, IscsiServer, Target, Targets};
pub use targets::{target_name, DatastoreTargets, CHAP_USER, IQN_PREFIX};
