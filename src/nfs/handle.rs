//! What an NFS client may hold across server restarts: file handles and the write verifier.
//!
//! Owns: the handle layout, the datastore's identity (a random tag made once per state
//! directory), and the write verifier's life cycle.
//! Must not: depend on anything that changes when the process restarts.
//!
//! A handle is 24 bytes: the datastore tag, the file id, and the stamp of the mount the file
//! belongs to (its creation time; 0 for the datastore root). The tag makes handles of another
//! datastore NFS3ERR_STALE; the stamp does the same for a handle of a mount that was unmounted,
//! even if a later mount were given the same id. Nothing in a handle depends on the server's
//! run, so handles survive restarts and `kill -9`.
//!
//! The write verifier (RFC 1813 WRITE/COMMIT) must change exactly when UNSTABLE writes may have
//! been lost. An UNSTABLE write is in the page cache (data and overlay bitmap) when it is
//! acknowledged, so a killed process loses none of them; only a machine crash can. The verifier
//! is therefore kept in `write-verifier` with the kernel's boot id, and kept across restarts of
//! the same boot. After a reboot it changes, and clients resend every write they have not seen
//! committed, unless the server stopped gracefully first: a graceful stop makes every write
//! durable and leaves a `clean-stop` file, and the next start keeps the verifier whatever the
//! boot.

use std::fs;
use std::io;
use std::path::Path;

use nfs3_types::nfs3::nfsstat3;

use crate::durable;

/// Bytes in a handle.
pub const HANDLE_LEN: usize = 24;
const TAG_FILE: &str = "datastore-id";
const CLEAN_STOP_FILE: &str = "clean-stop";
const VERIFIER_FILE: &str = "write-verifier";

/// The datastore's identity and this run's write verifier.
#[derive(Debug, Clone)]
pub struct Identity {
    tag: [u8; 8],
    verifier: [u8; 8],
    /// The verifier is the previous run's (a clean stop, or a restart within the same boot).
    pub resumed: bool,
}

/// Eight bytes nobody else will pick: a hash of the time, the process and a counter.
fn random8() -> [u8; 8] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let h = blake3::Hasher::new()
        .update(b"livemount random")
        .update(&now.to_le_bytes())
        .update(&std::process::id().to_le_bytes())
        .update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes())
        .finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

fn read8(path: &Path) -> io::Result<Option<[u8; 8]>> {
    match fs::read(path) {
        Ok(b) => <[u8; 8]>::try_from(b.as_slice()).map(Some).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not 8 bytes long", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Identity {
    /// Loads (or makes) the datastore tag and this run's verifier from the state directory.
    /// Call once at start, before serving.
    pub fn load(state: &Path) -> io::Result<Identity> {
        Identity::load_on_boot(state, &crate::mount::overlay::boot_id())
    }

    /// [`Identity::load`] for a machine whose boot id is `boot` (empty: unknown).
    pub fn load_on_boot(state: &Path, boot: &str) -> io::Result<Identity> {
        let tag = match read8(&state.join(TAG_FILE))? {
            Some(t) => t,
            None => {
                let t = random8();
                durable::replace(&state.join(TAG_FILE), &t)?;
                t
            }
        };
        let clean = state.join(CLEAN_STOP_FILE);
        let last = match fs::read(state.join(VERIFIER_FILE)) {
            Ok(b) if b.len() > 8 => Some((
                <[u8; 8]>::try_from(&b[..8]).unwrap_or_default(),
                b[8..].to_vec(),
            )),
            _ => None,
        };
        let same_boot = |b: &[u8]| !boot.is_empty() && b == boot.as_bytes();
        let (verifier, resumed) = match (read8(&clean), last) {
            (Ok(Some(v)), _) => (v, true),
            (_, Some((v, b))) if same_boot(&b) => (v, true),
            // First start, a reboot since, or unreadable state: unstable writes may be lost.
            _ => (random8(), false),
        };
        let mut record = verifier.to_vec();
        record.extend_from_slice(boot.as_bytes());
        durable::replace(&state.join(VERIFIER_FILE), &record)?;
        match fs::remove_file(&clean) {
            Ok(()) => durable::fsync_dir(state)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Identity {
            tag,
            verifier,
            resumed,
        })
    }

    /// An identity for tests: fixed tag and verifier.
    pub fn fixed(tag: [u8; 8], verifier: [u8; 8]) -> Identity {
        Identity {
            tag,
            verifier,
            resumed: false,
        }
    }

    /// Records that every write is durable, so the next start may keep this verifier. Call
    /// after the last write was synced, as the last thing before exiting.
    pub fn mark_clean_stop(&self, state: &Path) -> io::Result<()> {
        durable::replace(&state.join(CLEAN_STOP_FILE), &self.verifier)
    }

    pub fn verifier(&self) -> [u8; 8] {
        self.verifier
    }

    /// The handle of file `fileid` of the mount stamped `stamp`.
    pub fn handle(&self, fileid: u64, stamp: u64) -> [u8; HANDLE_LEN] {
        let mut h = [0u8; HANDLE_LEN];
        h[..8].copy_from_slice(&self.tag);
        h[8..16].copy_from_slice(&fileid.to_be_bytes());
        h[16..].copy_from_slice(&stamp.to_be_bytes());
        h
    }

    /// The (file id, mount stamp) a handle names. A handle of another shape is BADHANDLE; one
    /// of another datastore is STALE.
    pub fn parse(&self, h: &[u8]) -> Result<(u64, u64), nfsstat3> {
        let h: &[u8; HANDLE_LEN] = h.try_into().map_err(|_| nfsstat3::NFS3ERR_BADHANDLE)?;
        if h[..8] != self.tag {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[r]);
            u64::from_be_bytes(b)
        };
        Ok((word(8..16), word(16..24)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_refuse_strangers() {
        let id = Identity::fixed(*b"datastor", *b"verifier");
        let h = id.handle(0x0000_0003_0000_0001, 77);
        assert_eq!(id.parse(&h), Ok((0x0000_0003_0000_0001, 77)));
        let other = Identity::fixed(*b"elsewher", *b"verifier");
        assert_eq!(other.parse(&h), Err(nfsstat3::NFS3ERR_STALE));
        assert_eq!(id.parse(&h[..8]), Err(nfsstat3::NFS3ERR_BADHANDLE));
        assert_eq!(id.parse(&[]), Err(nfsstat3::NFS3ERR_BADHANDLE));
    }

    #[test]
    fn tag_is_kept_and_verifier_changes_only_when_writes_may_be_lost() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_on_boot(dir.path(), "boot-1").unwrap();
        assert!(!first.resumed);
        // A process crash on the same boot: the page cache kept every write.
        let second = Identity::load_on_boot(dir.path(), "boot-1").unwrap();
        assert_eq!(second.tag, first.tag);
        assert_eq!(second.verifier, first.verifier);
        assert_eq!(second.parse(&first.handle(5, 6)), Ok((5, 6)));
        // A reboot: same handles, new verifier.
        let third = Identity::load_on_boot(dir.path(), "boot-2").unwrap();
        assert_eq!(third.tag, first.tag);
        assert_ne!(third.verifier, second.verifier);
        assert!(!third.resumed);
        // A clean stop keeps the verifier even across a reboot, once.
        third.mark_clean_stop(dir.path()).unwrap();
        let fourth = Identity::load_on_boot(dir.path(), "boot-3").unwrap();
        assert!(fourth.resumed);
        assert_eq!(fourth.verifier, third.verifier);
        let fifth = Identity::load_on_boot(dir.path(), "boot-4").unwrap();
        assert_ne!(fifth.verifier, fourth.verifier);
        // An unknown boot id never counts as the same boot.
        let sixth = Identity::load_on_boot(dir.path(), "").unwrap();
        let seventh = Identity::load_on_boot(dir.path(), "").unwrap();
        assert_ne!(sixth.verifier, seventh.verifier);
    }
}
