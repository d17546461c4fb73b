//! The datastore's mounts as iSCSI targets: mount `M` is the target
//! `iqn.2026-12.io.livemount:m` (lower case, `_` as `-`: an IQN allows neither upper case nor
//! `_`), its disks LUN 0, 1, ... in the mount's order, for the hosts the mount allows.
//!
//! Owns: [`DatastoreTargets`], target names, the per-target CHAP secrets (derived from one
//! private key in the state directory, so nothing more is stored per mount), and the
//! COMPARE AND WRITE locks shared by every session of a disk.
//! Must not: look into a mount (the core's [`Disk`] does the reading and writing).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};

use super::scsi::Lun;
use super::server::{Chap, Target, Targets};
use crate::datastore::{DatastoreCore, Disk};

/// Every target's name starts with this.
pub const IQN_PREFIX: &str = "iqn.2026-12.io.livemount:";
/// The CHAP user name every target expects.
pub const CHAP_USER: &str = "livemount";

/// The target name of mount `mount`.
pub fn target_name(mount: &str) -> String {
    let tail: String = mount
        .chars()
        .map(|c| match c {
            '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    format!("{IQN_PREFIX}{tail}")
}

/// The mounts of a running agent as targets.
pub struct DatastoreTargets {
    core: DatastoreCore,
    /// With it every target requires CHAP, its secret derived from this key.
    chap_key: Option<[u8; 32]>,
    locks: Mutex<HashMap<String, Weak<tokio::sync::RwLock<()>>>>,
}

impl DatastoreTargets {
    pub fn new(core: DatastoreCore, chap_key: Option<[u8; 32]>) -> Self {
        DatastoreTargets {
            core,
            chap_key,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The CHAP secret of the target of mount `mount` (number `id`): 24 hexadecimal digits
    /// (96 bits, as RFC 7143 asks), new for every mount, even one made again by the same name.
    pub fn chap_secret(key: &[u8; 32], mount: &str, id: u32) -> String {
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(b"livemount iscsi chap\0");
        h.update(mount.as_bytes());
        h.update(&id.to_le_bytes());
        h.finalize().to_hex()[..24].to_string()
    }

    fn lock_for(&self, name: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = locks.get(name).and_then(Weak::upgrade) {
            return l;
        }
        locks.retain(|_, w| w.strong_count() > 0);
        let l = Arc::new(tokio::sync::RwLock::new(()));
        locks.insert(name.to_string(), Arc::downgrade(&l));
        l
    }

    /// The disks of every mount the peer may use, grouped by target name in mount order.
    fn by_target(&self, peer: IpAddr) -> Vec<(String, Vec<Disk>)> {
        let mut out: Vec<(String, Vec<Disk>)> = Vec::new();
        for d in self.core.disks(peer) {
            let name = target_name(d.mount_name());
            match out.last_mut() {
                Some((n, disks)) if *n == name && disks[0].mount_id() == d.mount_id() => {
                    disks.push(d)
                }
                _ => out.push((name, vec![d])),
            }
        }
        out
    }
}

impl Targets for DatastoreTargets {
    fn list(&self, peer: IpAddr) -> Vec<String> {
        self.by_target(peer).into_iter().map(|(n, _)| n).collect()
    }

    fn open(&self, name: &str, peer: IpAddr) -> Option<Target> {
        let want = name.to_ascii_lowercase();
        let mut found: Vec<(String, Vec<Disk>)> = self
            .by_target(peer)
            .into_iter()
            .filter(|(n, _)| *n == want)
            .collect();
        if found.len() > 1 {
            // Two mounts whose names differ only in case or '_' and '-'.
            tracing::warn!(target_name = ?name, %peer, "iscsi: two mounts have this target name; rename one");
            return None;
        }
        let (tname, disks) = found.pop()?;
        let chap = self.chap_key.as_ref().map(|k| Chap {
            user: CHAP_USER.to_string(),
            secret: Self::chap_secret(k, disks[0].mount_name(), disks[0].mount_id()).into_bytes(),
        });
        let luns = disks
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let name = d.name();
                let lun = Lun {
                    atomic: self.lock_for(&name),
                    name,
                    dev: Arc::new(d),
                };
                (i as u64, Arc::new(lun))
            })
            .collect();
        Some(Target {
            name: tname,
            luns,
            chap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_are_lower_case_iqns() {
        assert_eq!(target_name("Web_01"), "iqn.2026-12.io.livemount:web-01");
        assert_eq!(target_name("db.2"), "iqn.2026-12.io.livemount:db.2");
    }

    #[test]
    fn chap_secrets_differ_by_mount_and_by_mount_number() {
        let k = [7u8; 32];
        let a = DatastoreTargets::chap_secret(&k, "a", 1);
        assert_eq!(a.len(), 24);
        assert_eq!(a, DatastoreTargets::chap_secret(&k, "a", 1));
        assert_ne!(a, DatastoreTargets::chap_secret(&k, "a", 2));
        assert_ne!(a, DatastoreTargets::chap_secret(&k, "b", 1));
        assert_ne!(a, DatastoreTargets::chap_secret(&[8u8; 32], "a", 1));
    }
}
