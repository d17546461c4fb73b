//! A mount's disks by name (`MOUNT/DISK`), for protocols that serve block devices rather
//! than files: a [`Disk`] has a size, reads, writes and a flush, and says whether it takes
//! writes. Its reads and writes take the same path as a file's (overlay, cache, metrics,
//! the log line of a failure), so a block protocol never touches a mount itself.
//!
//! `DISK` is the name of the disk's data file in the mount's folder (as a file protocol lists
//! it); descriptors and configs are not disks.

use std::net::IpAddr;
use std::sync::Arc;

use super::names::check_name;
use super::{DatastoreCore, DatastoreError, Node};
use crate::mount::{LiveMount, MountFile};
use crate::repo::{Extent, Pieces};

/// One disk of one mount, resolved for one client. Cheap to clone.
#[derive(Clone)]
pub struct Disk {
    core: DatastoreCore,
    mount: Arc<LiveMount>,
    /// Index into the mount's files: always a disk.
    index: usize,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("name", &self.name())
            .field("size", &self.size())
            .finish()
    }
}

impl DatastoreCore {
    /// The disk named `MOUNT/DISK`, if the client's host may use its mount.
    pub fn disk(&self, name: &str, host: IpAddr) -> Result<Disk, DatastoreError> {
        let (mount, disk) = name.split_once('/').ok_or(DatastoreError::NotFound)?;
        check_name(mount.as_bytes())?;
        check_name(disk.as_bytes())?;
        let m = self
            .agent
            .mount_by_name(mount.as_bytes())
            .ok_or(DatastoreError::NotFound)?;
        if !m.allows(host) {
            return Err(DatastoreError::HostNotAllowed);
        }
        let i = m
            .files
            .iter()
            .position(|f| f.is_disk() && f.name == disk)
            .ok_or(DatastoreError::NotFound)?;
        Ok(Disk {
            core: self.clone(),
            mount: m,
            index: i,
        })
    }

    /// The disks the client's host may use, by mount and in the mount's order.
    pub fn disks(&self, host: IpAddr) -> Vec<Disk> {
        let mut mounts = self.agent.mounts();
        mounts.retain(|m| m.allows(host));
        mounts.sort_unstable_by_key(|m| m.spec.id);
        mounts
            .into_iter()
            .flat_map(|m| {
                (0..m.files.len())
                    .filter(|i| m.files[*i].is_disk())
                    .map(|i| Disk {
                        core: self.clone(),
                        mount: m.clone(),
                        index: i,
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Disk {
    fn file(&self) -> &MountFile {
        &self.mount.files[self.index]
    }

    /// `MOUNT/DISK`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.mount.spec.name, self.file().name)
    }

    /// The name of the disk's mount.
    pub fn mount_name(&self) -> &str {
        &self.mount.spec.name
    }

    /// The number of the disk's mount: never reused by a later mount of the agent.
    pub fn mount_id(&self) -> u32 {
        self.mount.spec.id
    }

    /// The disk's size in bytes (it never changes).
    pub fn size(&self) -> u64 {
        self.file().size()
    }

    /// Whether writes are refused: the mount is read-only.
    pub fn read_only(&self) -> bool {
        !self.file().is_writable()
    }

    /// The disk as a node of the namespace (its attributes; a file protocol's reference).
    pub fn node(&self) -> Node {
        Node::BackupFile(self.mount.clone(), self.index)
    }

    /// [`DatastoreError::Stale`] once the disk's mount is unmounted (or made again): a
    /// block client that holds the disk open gets errors, never another mount's bytes.
    fn current(&self) -> Result<(), DatastoreError> {
        match self.core.agent.mount_by_id(self.mount.spec.id) {
            Some(m) if Arc::ptr_eq(&m, &self.mount) => Ok(()),
            _ => Err(DatastoreError::Stale),
        }
    }

    /// Reads `len` bytes at `offset`, all within the disk (else [`DatastoreError::Invalid`]);
    /// the caller bounds `len`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Pieces, DatastoreError> {
        self.current()?;
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > self.size())
        {
            return Err(DatastoreError::Invalid("a read past the end of the disk"));
        }
        let (data, _eof) = self.core.read_pieces(&self.node(), offset, len).await?;
        Ok(data)
    }

    /// Writes `data` at `offset` into the disk's overlay; with `sync` it is durable when this
    /// returns. A read-only mount refuses ([`DatastoreError::ReadOnlyMount`]); a write past
    /// the end is [`DatastoreError::TooBig`] (disks do not grow).
    pub async fn write(&self, offset: u64, data: &[u8], sync: bool) -> Result<(), DatastoreError> {
        self.current()?;
        self.core.write(&self.node(), offset, data, sync).await?;
        Ok(())
    }

    /// What `[offset, offset + len)` holds, as runs that add up to `len`: runs that read as
    /// zeros without a fetch (the backup recorded them as zeros and nothing was written
    /// there), and data. All within the disk (else [`DatastoreError::Invalid`]).
    pub fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, DatastoreError> {
        self.current()?;
        if offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(DatastoreError::Invalid("a range past the end of the disk"));
        }
        Ok(self.file().extents(offset, len))
    }

    /// Makes every acknowledged write durable (NFS's COMMIT).
    pub async fn flush(&self) -> Result<(), DatastoreError> {
        self.current()?;
        self.core.commit(&self.node()).await
    }
}
