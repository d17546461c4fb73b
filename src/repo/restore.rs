//! Restore: the classic full restore of a snapshot into a folder (config plus raw disks), the
//! baseline a live mount is measured against.
//!
//! Each disk is written as a sparse raw file of its exact size (zero blocks stay holes), to a
//! temporary file first (a fixed-length name from [`durable::tmp_name`], whatever the disk's
//! name), fsynced and then linked to its name, so a restore that fails leaves no file that
//! looks complete. ESXi disks get a `NAME.vmdk` descriptor next to their `NAME-flat.vmdk`, so the
//! original .vmx finds them. Existing files are never overwritten. The folder is fsynced before
//! the restore returns.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};

use crate::disk::export::{flat_descriptor, AdapterType};
use crate::disk::DiskFormat;
use crate::durable;
use crate::vmconfig::Hypervisor;

use super::manifest::{DiskManifest, SnapshotId};
use super::{blocking, BlockIdx, Progress, RepoError, Repository};

/// Chunks fetched and written at once during a restore.
const RESTORE_CONCURRENCY: usize = 8;

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoredDisk {
    /// The disk's name in the snapshot.
    pub name: String,
    /// The raw data file written.
    pub path: PathBuf,
    /// The VMDK descriptor written next to it (ESXi disks).
    pub descriptor: Option<PathBuf>,
    pub size: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreSummary {
    pub snapshot: SnapshotId,
    pub name: String,
    pub config: PathBuf,
    pub disks: Vec<RestoredDisk>,
    /// Bytes of non-zero blocks written.
    pub written_bytes: u64,
    pub logical_bytes: u64,
    pub seconds: f64,
    /// Logical bytes per second, in MB/s (10^6 bytes).
    pub mb_per_s: f64,
}

/// File names of a snapshot laid out as files (a restore folder, a live mount's folder): the
/// config's, and per disk its data file and, for ESXi, its descriptor. Names are single path
/// components and unique; a disk whose name collides gets its device as a prefix. With
/// `keep_kvm_names` a KVM disk keeps its original file name whatever its source format (a live
/// mount's XML says `raw`); without it a non-raw one is renamed `STEM.raw`.
///
/// `target` is the hypervisor the files are laid out for: the backup's own, or the other one
/// for a live mount converted to it (`mount --for`). Converted to KVM, the config is
/// `STEM.xml` and each disk `STEM.raw`; converted to ESXi, the config is `STEM.vmx` and each
/// disk a descriptor and its flat file, as an ESXi backup's.
pub(crate) fn plan_files(
    m: &super::Manifest,
    target: Hypervisor,
    keep_kvm_names: bool,
) -> (String, Vec<(String, Option<String>)>) {
    let config = safe_name(&m.config.file_name);
    let config = if target == m.vm.hypervisor {
        config
    } else {
        let stem = match config.rsplit_once('.') {
            Some((stem, _)) if !stem.is_empty() => stem,
            _ => config.as_str(),
        };
        match target {
            Hypervisor::Kvm => format!("{stem}.xml"),
            Hypervisor::Esxi => format!("{stem}.vmx"),
        }
    };
    let keep_kvm_names = keep_kvm_names && m.vm.hypervisor == Hypervisor::Kvm;
    let mut taken: HashSet<String> = HashSet::new();
    taken.insert(config.clone());
    let mut disks = Vec::new();
    for d in &m.disks {
        let (base_data, base_desc) = file_names(d, target, keep_kvm_names);
        let (mut data, mut desc) = (base_data.clone(), base_desc.clone());
        // Prefix the device, then a counter, until neither name is taken.
        let tag = d.device.replace([':', '/'], "_");
        let mut n = 1;
        while taken.contains(&data) || desc.as_ref().is_some_and(|x| taken.contains(x)) {
            let prefix = if n == 1 {
                tag.clone()
            } else {
                format!("{tag}-{n}")
            };
            data = format!("{prefix}-{base_data}");
            desc = base_desc.as_ref().map(|x| format!("{prefix}-{x}"));
            n += 1;
        }
        taken.insert(data.clone());
        if let Some(n) = &desc {
            taken.insert(n.clone());
        }
        disks.push((data, desc));
    }
    (config, disks)
}

/// File names for one disk: the data file and, for ESXi, its descriptor.
fn file_names(d: &DiskManifest, hv: Hypervisor, keep_kvm_names: bool) -> (String, Option<String>) {
    let base = Path::new(&d.name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .unwrap_or_else(|| d.device.replace([':', '/'], "_"));
    let stem = match base.rsplit_once('.') {
        Some((s, _)) if !s.is_empty() => s.to_string(),
        _ => base.clone(),
    };
    match hv {
        Hypervisor::Esxi if d.size.is_multiple_of(512) => {
            (format!("{stem}-flat.vmdk"), Some(format!("{stem}.vmdk")))
        }
        Hypervisor::Esxi => (format!("{stem}-flat.vmdk"), None),
        Hypervisor::Kvm if keep_kvm_names || d.source_format == DiskFormat::Raw => (base, None),
        Hypervisor::Kvm => (format!("{stem}.raw"), None),
    }
}

impl Repository {
    /// Restores a snapshot into `dir` (created if missing; existing files are not overwritten).
    pub async fn restore(
        &self,
        id: &SnapshotId,
        dir: &Path,
        progress: &dyn Progress,
    ) -> Result<RestoreSummary, RepoError> {
        // The snapshot is not forgotten, nor its chunks pruned, while the restore runs; the
        // lease is in the repository before the manifest is read (decision 0017).
        let lease = self
            .take_lease(
                super::lease::random_name(super::lease::LeaseKind::Restore),
                super::lease::LeaseKind::Restore,
                "restore".into(),
                vec![super::lease::SnapshotUse {
                    snapshot: *id,
                    what: format!("restore into {}", dir.display()),
                }],
            )
            .await?;
        let result = self.restore_leased(id, dir, progress).await;
        if let Err(e) = lease.release().await {
            tracing::warn!(error = %e, "cannot remove the restore's lease; it expires by itself");
        }
        result
    }

    async fn restore_leased(
        &self,
        id: &SnapshotId,
        dir: &Path,
        progress: &dyn Progress,
    ) -> Result<RestoreSummary, RepoError> {
        let started = Instant::now();
        let snap = self.snapshot(id).await?;
        let m = &snap.manifest;
        let target = |what: String| RestoreTarget(dir.to_path_buf(), what);

        // Plan every file name first and refuse before writing anything.
        let (config_name, names) = plan_files(m, m.vm.hypervisor, false);
        let config_path = dir.join(&config_name);
        let mut taken = vec![config_name];
        let mut plan = Vec::new();
        for (d, (data, desc)) in m.disks.iter().zip(names) {
            taken.push(data.clone());
            taken.extend(desc.clone());
            plan.push((d, dir.join(data), desc.map(|n| dir.join(n))));
        }
        let folder = dir.to_path_buf();
        let (exists, leftover) = blocking(move || {
            durable::create_dir_all(&folder).map_err(|e| RepoError::File {
                path: folder.clone(),
                source: e,
            })?;
            let exists = taken
                .iter()
                .map(|name| folder.join(name))
                .find(|p| p.symlink_metadata().is_ok());
            let leftover = fs::read_dir(&folder)
                .map_err(|e| RepoError::io(&folder, e))?
                .flatten()
                .find(|e| durable::is_tmp_name(&e.file_name()))
                .map(|e| e.path());
            Ok((exists, leftover))
        })
        .await?;
        if let Some(p) = exists {
            return Err(target(format!(
                "{} exists; restore into an empty folder",
                p.display()
            ))
            .into());
        }
        if let Some(p) = leftover {
            return Err(target(format!(
                "{} is left from an interrupted restore; remove it and run the restore again",
                p.display()
            ))
            .into());
        }
        let config = snap.config_bytes().await?;

        progress.set_total(m.disks.iter().map(|d| d.size).sum());
        // Every disk is written to a temporary file; only when all have succeeded are they
        // published, with link(2), which never replaces an existing file. A failure removes the
        // temporary files.
        let mut written = 0u64;
        let mut partials = Vec::new();
        for i in 0..plan.len() {
            let partial = dir.join(durable::tmp_name());
            let result = match snap.disk(i).await {
                Ok(image) => self.restore_disk(&image, &partial, progress).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(n) => {
                    written += n;
                    partials.push(partial);
                }
                Err(e) => {
                    let _ = fs::remove_file(&partial);
                    for p in &partials {
                        let _ = fs::remove_file(p);
                    }
                    return Err(e);
                }
            }
        }
        let mut disks = Vec::new();
        let mut publish = Vec::new();
        for ((d, data_path, desc_path), partial) in plan.into_iter().zip(partials) {
            let flat = data_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let desc = desc_path
                .clone()
                .and_then(|p| descriptor_for(d, &flat, id).map(|text| (p, text)));
            publish.push((partial, data_path.clone(), desc));
            disks.push(RestoredDisk {
                name: d.name.clone(),
                path: data_path,
                descriptor: desc_path,
                size: d.size,
            });
        }
        let (config_file, folder) = (config_path.clone(), dir.to_path_buf());
        blocking(move || {
            for (partial, data_path, desc) in publish {
                fs::hard_link(&partial, &data_path).map_err(|e| {
                    RestoreTarget(
                        folder.clone(),
                        format!("cannot publish {}: {e}", data_path.display()),
                    )
                })?;
                fs::remove_file(&partial).map_err(|e| RepoError::io(&partial, e))?;
                if let Some((path, text)) = desc {
                    durable::create_new(&path, text.as_bytes())
                        .map_err(|e| RepoError::io(&path, e))?;
                }
            }
            // Last, and with an fsync of the folder: every name above is durable with it.
            durable::create_new(&config_file, &config).map_err(|e| RepoError::io(&config_file, e))
        })
        .await?;
        let logical = m.disks.iter().map(|d| d.size).sum();
        let seconds = started.elapsed().as_secs_f64();
        Ok(RestoreSummary {
            snapshot: *id,
            name: m.display_name(),
            config: config_path,
            disks,
            written_bytes: written,
            logical_bytes: logical,
            seconds,
            mb_per_s: logical as f64 / 1e6 / seconds.max(1e-9),
        })
    }

    /// Writes one disk to `path`; returns the non-zero bytes written.
    async fn restore_disk(
        &self,
        image: &super::DiskImage,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<u64, RepoError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| RepoError::io(path, e))?;
        file.set_len(image.size())
            .map_err(|e| RepoError::io(path, e))?;
        let file = Arc::new(file);
        let cs = image.chunk_size();
        let size = image.size();
        let written: Vec<u64> = futures::stream::iter(0..image.block_count())
            .map(|b| {
                let file = file.clone();
                let path = path.to_path_buf();
                async move {
                    let range = cs.block_range(BlockIdx(b), size);
                    let len = range.end - range.start;
                    if image.chunk_of_block(b).is_none() {
                        progress.advance(len);
                        return Ok(0);
                    }
                    let data = image.read_at(range.start, len as usize).await?;
                    blocking(move || {
                        file.write_all_at(&data, range.start)
                            .map_err(|e| RepoError::io(&path, e))
                    })
                    .await?;
                    progress.advance(len);
                    Ok::<u64, RepoError>(len)
                }
            })
            .buffer_unordered(RESTORE_CONCURRENCY)
            .try_collect()
            .await?;
        let path = path.to_path_buf();
        blocking(move || file.sync_all().map_err(|e| RepoError::io(&path, e))).await?;
        Ok(written.iter().sum())
    }
}

/// The VMDK descriptor of an ESXi disk laid out as `flat_name`; its CID derives from the
/// snapshot id, so the same snapshot always gets the same descriptor.
pub(crate) fn descriptor_for(d: &DiskManifest, flat_name: &str, id: &SnapshotId) -> Option<String> {
    descriptor_at(d, &d.device, flat_name, id)
}

/// [`descriptor_for`] a disk that sits at `device` (a `.vmx` slot such as `ide0:1`, which
/// picks the adapter type) rather than where the backup had it: a disk converted to ESXi.
pub(crate) fn descriptor_at(
    d: &DiskManifest,
    device: &str,
    flat_name: &str,
    id: &SnapshotId,
) -> Option<String> {
    let b = id.0 .0;
    let cid = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    flat_descriptor(d.size, flat_name, AdapterType::for_device(device), cid)
}

struct RestoreTarget(PathBuf, String);

impl From<RestoreTarget> for RepoError {
    fn from(t: RestoreTarget) -> Self {
        RepoError::RestoreTarget {
            path: t.0,
            what: t.1,
        }
    }
}

/// A file name from a manifest, made safe to join to a folder.
fn safe_name(name: &str) -> String {
    let base = Path::new(name)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if base.is_empty() || base == "." || base == ".." {
        "vm.config".to_string()
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::ChunkId;

    fn disk(name: &str, device: &str, size: u64, fmt: DiskFormat) -> DiskManifest {
        DiskManifest {
            name: name.into(),
            device: device.into(),
            source_format: fmt,
            size,
            allocated_blocks: 0,
            table: vec![ChunkId::of(b"x")],
        }
    }

    #[test]
    fn restored_file_names_follow_the_hypervisor() {
        let esxi = disk(
            "[ds1] web01/web01.vmdk",
            "scsi0:0",
            1 << 20,
            DiskFormat::Vmdk,
        );
        assert_eq!(
            file_names(&esxi, Hypervisor::Esxi, false),
            ("web01-flat.vmdk".into(), Some("web01.vmdk".into()))
        );
        let odd = disk("odd.vmdk", "scsi0:1", 1000, DiskFormat::Raw);
        assert_eq!(
            file_names(&odd, Hypervisor::Esxi, false),
            ("odd-flat.vmdk".into(), None)
        );
        let q = disk(
            "/var/lib/libvirt/images/db.qcow2",
            "vda",
            1 << 20,
            DiskFormat::Qcow2,
        );
        assert_eq!(
            file_names(&q, Hypervisor::Kvm, false),
            ("db.raw".into(), None)
        );
        let r = disk("/images/db.img", "vdb", 1 << 20, DiskFormat::Raw);
        assert_eq!(
            file_names(&r, Hypervisor::Kvm, false),
            ("db.img".into(), None)
        );
        assert_eq!(
            file_names(&q, Hypervisor::Kvm, true),
            ("db.qcow2".into(), None)
        );
        let weird = disk("..", "vdc", 1 << 20, DiskFormat::Raw);
        assert_eq!(
            file_names(&weird, Hypervisor::Kvm, false),
            ("vdc".into(), None)
        );
        assert_eq!(safe_name("../../etc/passwd"), "passwd");
        assert_eq!(safe_name(".."), "vm.config");
    }
}
