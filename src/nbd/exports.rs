//! The datastore's disks as NBD exports: `MOUNT/DISK`, for the hosts each mount allows, and
//! the one place the datastore's errors become NBD error numbers.
//!
//! Owns: [`DatastoreExports`] (the [`Exports`] of a running agent) and the map from
//! [`DatastoreError`] to [`BlockError`].
//! Must not: look into a mount (the core's [`Disk`] does the reading and writing).

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::server::{BlockDevice, BlockError, Exports};
use crate::datastore::{DatastoreCore, DatastoreError, Disk};

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
            Ok(d) => Some(Arc::new(NbdDisk(d))),
            Err(e) => {
                // Debug formatting: a name with a newline cannot forge log lines.
                tracing::info!(export = ?name, %peer, error = %e, "nbd: export refused");
                None
            }
        }
    }
}

/// One disk as NBD serves it.
struct NbdDisk(Disk);

#[async_trait]
impl BlockDevice for NbdDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_only(&self) -> bool {
        self.0.read_only()
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        self.0.read(offset, len).await.map_err(|e| to_block(&e))
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BlockError> {
        self.0
            .write(offset, data, fua)
            .await
            .map_err(|e| to_block(&e))
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.0.flush().await.map_err(|e| to_block(&e))
    }
}

/// The NBD error for a refused or failed datastore operation.
pub fn to_block(e: &DatastoreError) -> BlockError {
    match e {
        DatastoreError::ReadOnlyMount | DatastoreError::NotWritable | DatastoreError::Fenced => {
            BlockError::ReadOnly
        }
        DatastoreError::TooBig | DatastoreError::Invalid(_) => BlockError::OutOfRange,
        DatastoreError::NoSpace => BlockError::NoSpace,
        e => BlockError::Io(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::{EINVAL, EIO, ENOSPC, EPERM};

    #[test]
    fn datastore_errors_become_nbd_error_numbers() {
        let table = [
            (DatastoreError::ReadOnlyMount, EPERM),
            (DatastoreError::NotWritable, EPERM),
            (DatastoreError::Fenced, EPERM),
            (DatastoreError::TooBig, EINVAL),
            (DatastoreError::Invalid("x"), EINVAL),
            (DatastoreError::NoSpace, ENOSPC),
            (DatastoreError::Stale, EIO),
            (DatastoreError::Io("chunk".into()), EIO),
            (DatastoreError::Internal("x".into()), EIO),
        ];
        for (e, want) in table {
            assert_eq!(to_block(&e).errno(), want, "{e:?}");
        }
    }
}
