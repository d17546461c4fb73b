//! livemount: instant VM recovery. A hypervisor runs a VM straight from its block-level backup
//! over NFSv3 while the VM's writes go to a per-mount overlay.
//!
//! Crate map (data flows one way, down):
//! - [`cli`]: the operator's commands (clap); the only place that prints.
//! - [`repo`]: the backup repository: chunk store trait and local backend, snapshot manifests,
//!   ingest (backup), the read API, verify, restore.
//! - [`vmconfig`]: `.vmx` and libvirt XML parsing (no I/O).
//! - [`disk`]: source disk formats in (raw, VMDK, qcow2) and VMDK descriptors out.
//! - [`cache`] and [`fetch`]: the shared read cache and the fetch scheduler behind it (VM reads
//!   first, then pre-staging, then background work).
//! - [`mount`], [`agent`], [`nfs`], [`control`]: live mounts, the media agent's state, the NFS
//!   server and the control API.
//! - [`relocate`]: moving a live-mounted VM's disks to primary storage while it runs.
//! - [`durable`]: replacing files atomically and durably, durable new names, the umask.
//! - [`allow`]: the client address allow-list every server checks (NFS, portmapper, NBD, iSCSI).
//! - [`guestfs`]: the volumes and files inside a snapshot's disks (partition tables, ext2/3/4,
//!   FAT), read through the repository, for `files ls` and `files get`.
//!
//! Data flow of a backup: VM config -> `vmconfig` -> disks opened by `disk` -> `repo::ingest`
//! cuts blocks, hashes, deduplicates, compresses -> `ChunkStore` -> manifest.
//! Data flow of a read: NFS READ -> the mount's overlay -> `DiskImage::read_at` -> block table
//! -> `ChunkReader` (the read cache; on a miss a scheduler slot) -> `ChunkStore` -> decode and
//! verify.

pub mod agent;
pub mod allow;
pub mod block;
pub mod cache;
pub mod cli;
pub mod control;
pub mod datastore;
pub mod disk;
pub mod durable;
pub mod fetch;
pub mod guestfs;
pub mod iscsi;
pub mod metrics;
pub mod mount;
pub mod nbd;
pub mod nfs;
pub mod prestage;
pub mod profile;
pub mod relocate;
pub mod repo;
pub mod units;
pub mod vmconfig;
