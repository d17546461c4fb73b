//! The NBD server (issue 17): a live mount's disks as network block devices, for QEMU,
//! `nbd-client` and libnbd. Exports are named `MOUNT/DISK`.
//!
//! Today: the wire format (`proto`). The connection loop follows once the datastore core gives
//! protocols a disk to read and write without knowing about mounts.

pub mod proto;
pub mod server;

pub use server::{BlockDevice, BlockError, Exports, NbdServer};
