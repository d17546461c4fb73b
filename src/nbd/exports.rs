//! The datastore's disks as NBD exports: `MOUNT/DISK`, for the hosts each mount allows.
//!
//! Owns: [`DatastoreExports`] (the [`Exports`] of a running agent).
//! Must not: look into a mount (the core's [`Disk`] does the reading and writing).

use std::net::IpAddr;
use std::sync::Arc;

use super::server::Exports;
use crate::block::BlockDevice;
use crate::datastore::{DatastoreCore, Disk};

/// The disks of every mount, by `MOUNT/DISK`.
pub struct DatastoreExports {
    core: DatastoreCore,
}

impl DatastoreExports {
    pub fn new(core: DatastoreCore) -> Self {
        DatastoreExports { core }
    }
}

impl Exports for DatastoreExports {
    fn list(&self, peer: IpAddr) -> Vec<String> {
        self.core.disks(peer).iter().map(Disk::name).collect()
    }

    fn open(&self, name: &str, peer: IpAddr) -> Option<Arc<dyn BlockDevice>> {
        match self.core.disk(name, peer) {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                // Debug formatting: a name with a newline cannot forge log lines.
                tracing::info!(export = ?name, %peer, error = %e, "nbd: export refused");
                None
            }
        }
    }
}
