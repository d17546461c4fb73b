//! The NBD server (issue 17): a live mount's disks as network block devices, for QEMU,
//! `nbd-client` and libnbd. Exports are named `MOUNT/DISK`.
//!
//! Owns: the wire format (`proto.rs`), the connections (`server.rs`: handshake, transmission,
//! limits), and the datastore's disks as exports with its errors as NBD's (`exports.rs`).
//! Must not: know about mounts, overlays or chunks: a disk comes from the datastore core.

mod exports;
#[doc(hidden)]
pub mod fuzzing;
pub mod proto;
pub mod server;

pub use crate::block::to_block;
pub use exports::DatastoreExports;
pub use server::{BlockDevice, BlockError, Exports, NbdServer};
