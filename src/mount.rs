//! Live mounts: one snapshot presented as a folder of files in the datastore.
//!
//! Owns: a mount's persisted spec ([`MountSpec`]), its folder's files (the VM's config and each
//! disk: for ESXi a `NAME.vmdk` descriptor plus `NAME-flat.vmdk`, for KVM the raw disk under its
//! original file name), their file ids, and the read path of a file.
//! Must not: know about NFS (the `nfs` module maps this onto the protocol) or about chunks (disks
//! are read through [`DiskImage`], whose chunks come through the shared read cache).
//!
//! File ids are stable across restarts: the datastore root is 1, a mount's folder is
//! `mount_id << 32` and its n-th file `(mount_id << 32) | n` (n from 1), where `mount_id` is
//! persisted in the mount's spec.

pub mod files;
pub mod mirror;
pub mod overlay;
pub mod readahead;
pub mod reader;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use overlay::{Overlay, OverlayError};

use crate::prestage::{BootWindow, Prestage};
use crate::profile::BlockMap;
use crate::repo::{
    descriptor_at, plan_files, ChunkId, DiskImage, Extent, Pieces, RepoError, Snapshot, SnapshotId,
};

/// The file id of the datastore's root folder.
pub const ROOT_FILEID: u64 = 1;

/// Errors of mounts. Each names the mount.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount name {name:?} is not valid: {why}")]
    BadName { name: String, why: &'static str },
    #[error("a mount named {name} exists already; choose another --name or unmount it")]
    Exists { name: String },
    #[error("no mount named {name}; `livemount mounts` lists them")]
    NotFound { name: String },
    #[error("mount {mount}: {source}")]
    Repo {
        mount: String,
        #[source]
        source: RepoError,
    },
    #[error("mount {mount}: cannot rewrite the VM's config: {what}")]
    Config { mount: String, what: String },
    #[error(
        "--allow {value:?} is not an address or a CIDR such as 10.1.0.0/16; nothing was mounted"
    )]
    BadHost { value: String },
    #[error("{what}; nothing was mounted")]
    Conversion { what: String },
    #[error("mount state {path}: {what}")]
    State { path: String, what: String },
    #[error("mount {name} is being relocated ({phase}); `livemount relocate {name} --finish` hands it over, `--cancel` stops it")]
    Relocating { name: String, phase: String },
}

/// The NIC rewrite of mounts made now (see [`MountSpec::network_rewrite`]).
pub const NETWORK_REWRITE: u32 = 1;

/// What a mount is, as persisted in the state directory (`mounts/NAME.json`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountSpec {
    pub name: String,
    /// Numeric id; the high 32 bits of every file id in the mount's folder.
    pub id: u32,
    pub snapshot: SnapshotId,
    /// `VM@TIME` of the snapshot, for listings.
    pub snapshot_name: String,
    pub read_only: bool,
    /// What the config does with the VM's NICs (default: disconnect, so it cannot clash with
    /// production). State files from before the mode have `keep_network: BOOL`: true reads as
    /// keep, false as disconnect.
    #[serde(default, alias = "keep_network")]
    pub network: crate::vmconfig::NetworkMode,
    /// The mount's own `OLD -> NEW` network renames.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub network_map: BTreeMap<String, String>,
    /// The server's default network map when the mount was made (kept, so that a restart
    /// serves the same config whatever the config file says by then).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub default_network_map: BTreeMap<String, String>,
    /// How the config's NICs are rewritten: 0 for mounts made before the network plan
    /// (their `disconnect` only set the link down), [`NETWORK_REWRITE`] for later ones; kept so
    /// that an upgrade does not change the config a mount serves.
    #[serde(default)]
    pub network_rewrite: u32,
    pub created: jiff::Timestamp,
    /// Only these client networks may use the mount (empty: every client the server allows).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<ipnet::IpNet>,
    /// Only the disks (and an ESXi disk's descriptor): no config, no files of the VM's
    /// folder (`mount --disks-only`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disks_only: bool,
    /// The config converted to the other hypervisor (`mount --for`), and how; None: the
    /// backup's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convert: Option<crate::vmconfig::Conversion>,
}

impl MountSpec {
    /// The hypervisor the mount's files are laid out for, of a backup of `backup`'s.
    pub fn hypervisor(&self, backup: crate::vmconfig::Hypervisor) -> crate::vmconfig::Hypervisor {
        self.convert.map_or(backup, |c| c.to)
    }
}

/// Runs a mount's file work (making or opening its overlay files, with their fsyncs) on the
/// blocking pool; its error, or a failed task, is a state error of `dir`.
async fn on_blocking_pool<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    dir: &Path,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, MountError> {
    let state = |what: String| MountError::State {
        path: dir.display().to_string(),
        what,
    };
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| state(e.to_string()))?
        .map_err(|e| state(e.to_string()))
}

/// Checks a mount name: it becomes a folder name in the datastore.
pub fn check_name(name: &str) -> Result<(), MountError> {
    let bad = |why| MountError::BadName {
        name: name.to_string(),
        why,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("it must be 1 to 64 characters long"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(bad("it must not start with '.' or '-'"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad("use letters, digits, '-', '_' and '.' only"));
    }
    Ok(())
}

/// What a file of a mount's folder holds.
#[derive(Clone)]
pub enum Content {
    /// Small files made in memory: the config, a VMDK descriptor.
    Bytes(Bytes),
    /// A disk, read through the cache, with the VM's writes in its overlay (none when the mount
    /// is read-only).
    Disk {
        image: DiskImage,
        overlay: Option<Arc<Overlay>>,
        /// Sequential-stream detection and prefetching (none when read-ahead is off).
        readahead: Option<Arc<readahead::ReadAhead>>,
        /// The disk's number in the mount (the order of the snapshot's disks).
        index: usize,
        /// The mount's boot window, while the VM's first boot from it is recorded.
        window: Option<Arc<BootWindow>>,
        /// The disk's name in boot profiles: its file name in a mount for the backup's own
        /// hypervisor, also when this mount is converted to the other (and names it otherwise),
        /// so that both learn and pre-stage the same profile.
        profile_name: Arc<str>,
    },
}

/// One file of a mount's folder.
#[derive(Clone)]
pub struct MountFile {
    pub name: String,
    pub fileid: u64,
    pub content: Content,
}

impl std::fmt::Debug for MountFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountFile")
            .field("name", &self.name)
            .field("fileid", &self.fileid)
            .field("size", &self.size())
            .finish()
    }
}

impl MountFile {
    pub fn size(&self) -> u64 {
        match &self.content {
            Content::Bytes(b) => b.len() as u64,
            Content::Disk { image, .. } => image.size(),
        }
    }

    pub fn is_disk(&self) -> bool {
        matches!(self.content, Content::Disk { .. })
    }

    pub fn is_writable(&self) -> bool {
        matches!(
            self.content,
            Content::Disk {
                overlay: Some(_),
                ..
            }
        )
    }

    /// Writes into the disk's overlay. `sync`: durable before returning.
    pub async fn write(&self, offset: u64, data: &[u8], sync: bool) -> Result<(), OverlayError> {
        match &self.content {
            Content::Disk {
                image,
                overlay: Some(o),
                ..
            } => o.write(image, offset, data, sync).await,
            _ => Err(OverlayError::NotWritable {
                file: self.name.clone(),
            }),
        }
    }

    /// Makes the file's acknowledged writes durable.
    pub async fn commit(&self) -> Result<(), OverlayError> {
        match &self.content {
            Content::Disk {
                overlay: Some(o), ..
            } => o.commit().await,
            _ => Ok(()),
        }
    }

    /// What `[offset, offset + len)` (clipped to the file) holds, as runs (see
    /// [`Extent`]): a disk's zero runs are those the backup recorded as zeros and the VM has
    /// not written; anything else is data.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let end = offset.saturating_add(len).min(self.size());
        match &self.content {
            _ if offset >= end => Vec::new(),
            Content::Bytes(_) => vec![Extent {
                len: end - offset,
                zero: false,
            }],
            Content::Disk {
                image,
                overlay: None,
                ..
            } => image.extents(offset, end - offset),
            Content::Disk {
                image,
                overlay: Some(o),
                ..
            } => o.extents(image, offset, end - offset),
        }
    }

    /// Reads up to `count` bytes at `offset`; the flag says the read reached the end of the file.
    pub async fn read(&self, offset: u64, count: u32) -> Result<(Bytes, bool), OverlayError> {
        let (data, eof) = self.read_pieces(offset, count).await?;
        Ok((data.into_bytes(), eof))
    }

    /// [`MountFile::read`], as the pieces the bytes were found in.
    pub async fn read_pieces(
        &self,
        offset: u64,
        count: u32,
    ) -> Result<(Pieces, bool), OverlayError> {
        let size = self.size();
        let data: Pieces = match &self.content {
            Content::Bytes(b) => {
                let start = offset.min(size) as usize;
                let end = offset.saturating_add(u64::from(count)).min(size) as usize;
                b.slice(start..end).into()
            }
            Content::Disk {
                image,
                overlay,
                readahead,
                index,
                window,
                profile_name,
            } => {
                if let Some(w) = window {
                    w.on_read(*index, profile_name, image, offset, u64::from(count));
                }
                if let Some(r) = readahead {
                    r.on_read(image, offset, u64::from(count));
                }
                match overlay {
                    None => image.read_pieces(offset, count as usize).await?,
                    Some(o) => o.read_pieces(image, offset, count as usize).await?,
                }
            }
        };
        let eof = offset.saturating_add(data.len() as u64) >= size;
        Ok((data, eof))
    }
}

/// A mount, open and ready to serve.
#[derive(Debug)]
pub struct LiveMount {
    pub spec: MountSpec,
    /// The backup's files: disks and descriptors, and for a read-only mount the config.
    pub files: Vec<MountFile>,
    /// The VM's config file's name in the folder (empty for a disks-only mount).
    pub config_name: String,
    /// Files the hypervisor makes, and the config (read-write mounts that are not
    /// disks-only).
    pub folder: Option<Arc<files::FolderFiles>>,
    /// The backed-up VM's name (its boot profile's name).
    pub vm: String,
    /// The boot window of a mount made by this server run (not of one brought back at a
    /// restart: its VM is running already).
    pub window: Option<Arc<BootWindow>>,
    /// Pre-staging of the boot set, when there was a profile to follow.
    pub prestage: OnceLock<Arc<Prestage>>,
    /// What the config does with each of the VM's NICs.
    pub network: Vec<crate::vmconfig::NicReport>,
    /// The hypervisor the mount's config and files are for.
    pub hypervisor: crate::vmconfig::Hypervisor,
    /// A converted config (`mount --for`): what each device became, what was left behind.
    pub devices: Vec<crate::vmconfig::DeviceReport>,
    /// The snapshot as listings show it (kept from the open: a listing needs no store).
    pub snapshot: crate::repo::SnapshotInfo,
}

impl LiveMount {
    /// Whether a client at `ip` may use this mount (`mount --allow`).
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.spec.hosts.is_empty() || self.spec.hosts.iter().any(|n| n.contains(&ip))
    }

    /// The file id of this mount's folder.
    pub fn folder_fileid(&self) -> u64 {
        u64::from(self.spec.id) << 32
    }

    pub fn file_by_name(&self, name: &[u8]) -> Option<&MountFile> {
        self.files.iter().find(|f| f.name.as_bytes() == name)
    }

    pub fn file_by_id(&self, fileid: u64) -> Option<&MountFile> {
        // A handful of files: a scan is as fast as any index.
        self.files.iter().find(|f| f.fileid == fileid)
    }

    /// Opens a mount: loads the snapshot's tables and lays out its folder. Nothing is copied.
    /// `config` is the config file's content as served (rewritten for the mount).
    /// `overlays` is the folder for the disks' overlays (unused for a read-only mount).
    pub async fn open(
        spec: MountSpec,
        snapshot: &Snapshot,
        reader: Arc<reader::MountReader>,
        config: crate::vmconfig::Rewritten,
        overlays: &Path,
        window: Option<Arc<BootWindow>>,
        read_ahead: bool,
    ) -> Result<LiveMount, MountError> {
        let m = &snapshot.manifest;
        let err = |source| MountError::Repo {
            mount: spec.name.clone(),
            source,
        };
        let hypervisor = spec.hypervisor(m.vm.hypervisor);
        let (config_name, names) = plan_files(m, hypervisor, true);
        let (_, native) = plan_files(m, m.vm.hypervisor, true);
        let crate::vmconfig::Rewritten {
            bytes: config,
            nics: network,
            devices,
            disk_slots,
            ..
        } = config;
        let config = Bytes::from(config);
        let config_name = if spec.disks_only {
            String::new()
        } else {
            config_name
        };
        let base = u64::from(spec.id) << 32;
        let mut files = Vec::new();
        // File ids: the config is 1 (a folder file on a read-write mount, so it can be edited),
        // the backup's disk files follow from 2.
        let folder = if spec.read_only || spec.disks_only {
            None
        } else {
            let (dir, name, bytes) = (overlays.to_path_buf(), config_name.clone(), config.clone());
            let f = on_blocking_pool(overlays, move || {
                files::FolderFiles::open(&dir, &name, 1, &bytes)
            })
            .await?;
            Some(Arc::new(f))
        };
        let mut next = if folder.is_some() { 2u64 } else { 1 };
        let mut add = |name: String, content: Content| {
            files.push(MountFile {
                name,
                fileid: base | next,
                content,
            });
            next += 1;
        };
        if folder.is_none() && !spec.disks_only {
            add(config_name.clone(), Content::Bytes(config));
        }
        for (i, ((d, (data, desc)), (profile_name, _))) in
            m.disks.iter().zip(names).zip(native).enumerate()
        {
            let image = snapshot
                .disk(i)
                .await
                .map_err(err)?
                .with_reader(reader.clone() as Arc<dyn crate::repo::ChunkReader>);
            if let Some(desc) = desc {
                // A disk converted to ESXi: its descriptor says the adapter of its new slot.
                let device = disk_slots.get(i).unwrap_or(&d.device);
                if let Some(text) = descriptor_at(d, device, &data, &snapshot.id) {
                    add(desc, Content::Bytes(Bytes::from(text)));
                }
            }
            let overlay = if spec.read_only {
                None
            } else {
                let (dir, size) = (overlays.to_path_buf(), image.size());
                let o = on_blocking_pool(overlays, move || {
                    Overlay::open(&dir, &format!("disk{i}"), size)
                })
                .await?;
                Some(Arc::new(o))
            };
            add(
                data,
                Content::Disk {
                    image,
                    overlay,
                    readahead: read_ahead
                        .then(|| Arc::new(readahead::ReadAhead::new(reader.clone()))),
                    index: i,
                    window: window.clone(),
                    profile_name: profile_name.into(),
                },
            );
        }
        Ok(LiveMount {
            spec,
            files,
            config_name,
            folder,
            vm: m.vm.name.clone(),
            window,
            prestage: OnceLock::new(),
            network,
            hypervisor,
            devices,
            snapshot: crate::repo::SnapshotInfo::from_manifest(snapshot.id, m),
        })
    }
}

/// Disks by name, as pre-staging plans over them: a mount's, or a snapshot's before any mount
/// (named as a mount's folder names them).
pub struct DiskBlocks<'a> {
    disks: Vec<(&'a str, &'a DiskImage)>,
    chunks: OnceLock<HashSet<ChunkId>>,
}

impl<'a> DiskBlocks<'a> {
    pub fn new(disks: Vec<(&'a str, &'a DiskImage)>) -> Self {
        DiskBlocks {
            disks,
            chunks: OnceLock::new(),
        }
    }
}

impl LiveMount {
    pub fn blocks(&self) -> DiskBlocks<'_> {
        DiskBlocks::new(self.disk_images().collect())
    }

    fn disk_images(&self) -> impl Iterator<Item = (&str, &DiskImage)> {
        self.files.iter().filter_map(|f| match &f.content {
            Content::Disk {
                image,
                profile_name,
                ..
            } => Some((&**profile_name, image)),
            Content::Bytes(_) => None,
        })
    }
}

impl BlockMap for DiskBlocks<'_> {
    fn chunk_at(&self, disk: &str, block: u64) -> Option<ChunkId> {
        let (_, image) = self.disks.iter().find(|(n, _)| *n == disk)?;
        image.chunk_of_block(block)
    }

    fn has_chunk(&self, chunk: &ChunkId) -> bool {
        self.chunks
            .get_or_init(|| {
                self.disks
                    .iter()
                    .flat_map(|(_, image)| {
                        (0..image.block_count()).filter_map(|b| image.chunk_of_block(b))
                    })
                    .collect()
            })
            .contains(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_names_are_single_safe_components() {
        for ok in ["web01", "web01-lm1", "a.b_c", "X9"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0b",
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
