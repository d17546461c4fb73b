//! TEMPORARY STUB, replaced by the real reader.
use super::{DiskError, DiskSource};
use std::path::Path;
#[derive(Debug)]
pub struct Qcow2Disk;
impl Qcow2Disk {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        Err(DiskError::Unsupported {
            path: path.into(),
            what: "stub".into(),
        })
    }
}
impl DiskSource for Qcow2Disk {
    fn size(&self) -> u64 {
        0
    }
    fn read_exact_at(&self, _: &mut [u8], _: u64) -> Result<(), DiskError> {
        Ok(())
    }
}
