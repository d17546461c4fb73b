//! What an NFS client may hold across server restarts: file handles and the write verifier.
//!
//! Owns: the handle layout, the datastore's identity (a random tag made once per state
//! directory, and a secret key for handles), and the write verifier's life cycle.
//! Must not: depend on anything that changes when the process restarts.
//!
//! A handle is 40 bytes: the datastore tag, the file id, the stamp of the mount the file
//! belongs to (its creation time; 0 for the datastore root), and a MAC of those 24 bytes (the
//! first 16 bytes of BLAKE3 keyed with `handle-key`, 32 random bytes made once per state
//! directory, 0600). The tag makes handles of another datastore NFS3ERR_STALE; the stamp does
//! the same for a handle of a mount that was unmounted, even if a later mount were given the
//! same id. The MAC makes a handle a client made up itself (another mount's file id, guessed
//! from sequential ids and a folder's ctime) NFS3ERR_BADHANDLE by construction, before any
//! mount's host list is consulted. Nothing in a handle depends on the server's run, so handles
//! survive restarts and `kill -9`. A 24-byte handle of the layout before the MAC is STALE: its
//! client looks its files up again.
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
pub const HANDLE_LEN: usize = 40;
/// Bytes of a handle before the MAC.
const BODY_LEN: usize = 24;
const TAG_FILE: &str = "datastore-id";
const KEY_FILE: &str = "handle-key";
const CLEAN_STOP_FILE: &str = "clean-stop";
const VERIFIER_FILE: &str = "write-verifier";

/// The datastore's identity and this run's write verifier.
#[derive(Debug, Clone)]
pub struct Identity {
    tag: [u8; 8],
    /// The key of the handles' MAC.
    key: [u8; 32],
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

/// 32 bytes from the kernel's random source, for a secret.
fn secret32() -> io::Result<[u8; 32]> {
    use std::io::Read;
    let mut key = [0u8; 32];
    fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    Ok(key)
}

/// The handle key in `state`, made the first time (0600, durable).
fn load_key(state: &Path) -> io::Result<[u8; 32]> {
    let path = state.join(KEY_FILE);
    match fs::read(&path) {
        Ok(b) => <[u8; 32]>::try_from(b.as_slice()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not 32 bytes long: restore it from a backup of the state folder \
                     (removing it makes every NFS client's handles stale)",
                    path.display()
                ),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let key = secret32()?;
            durable::replace_private(&path, &key)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
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
        let key = load_key(state)?;
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
            key,
            verifier,
            resumed,
        })
    }

    /// An identity for tests: fixed tag and verifier (and a key made from the tag).
    pub fn fixed(tag: [u8; 8], verifier: [u8; 8]) -> Identity {
        Identity {
            tag,
            key: *blake3::hash(&tag).as_bytes(),
            verifier,
            resumed: false,
        }
    }

    fn mac(&self, body: &[u8]) -> [u8; HANDLE_LEN - BODY_LEN] {
        let mut out = [0u8; HANDLE_LEN - BODY_LEN];
        out.copy_from_slice(
            &blake3::keyed_hash(&self.key, body).as_bytes()[..HANDLE_LEN - BODY_LEN],
        );
        out
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
        h[16..BODY_LEN].copy_from_slice(&stamp.to_be_bytes());
        let mac = self.mac(&h[..BODY_LEN]);
        h[BODY_LEN..].copy_from_slice(&mac);
        h
    }

    /// The (file id, mount stamp) a handle names. A handle of another datastore, or of the
    /// layout before the MAC, is STALE; one of another shape, or whose MAC is not this
    /// datastore's, is BADHANDLE.
    pub fn parse(&self, h: &[u8]) -> Result<(u64, u64), nfsstat3> {
        if h.len() == BODY_LEN {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        let h: &[u8; HANDLE_LEN] = h.try_into().map_err(|_| nfsstat3::NFS3ERR_BADHANDLE)?;
        if h[..8] != self.tag {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        let mac = self.mac(&h[..BODY_LEN]);
        // Compared in constant time: how far a guess matches must not show in the timing.
        let diff = mac
            .iter()
            .zip(&h[BODY_LEN..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(nfsstat3::NFS3ERR_BADHANDLE);
        }
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[r]);
            u64::from_be_bytes(b)
        };
        Ok((word(8..16), word(16..BODY_LEN)))
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
        // The layout before the MAC: stale, so that clients look their files up again.
        assert_eq!(id.parse(&h[..24]), Err(nfsstat3::NFS3ERR_STALE));
    }

    #[test]
    fn a_handle_a_client_made_up_is_refused_by_construction() {
        let id = Identity::fixed(*b"datastor", *b"verifier");
        // Another mount's folder, its stamp known (a folder's ctime shows it): the tag is
        // right, the MAC is not.
        let mine = id.handle(0x0000_0003_0000_0000, 77);
        let mut forged = mine;
        forged[8..16].copy_from_slice(&0x0000_0004_0000_0000u64.to_be_bytes());
        forged[16..24].copy_from_slice(&88u64.to_be_bytes());
        assert_eq!(id.parse(&forged), Err(nfsstat3::NFS3ERR_BADHANDLE));
        // Every bit of the MAC counts.
        for bit in 0..128 {
            let mut h = mine;
            h[24 + bit / 8] ^= 1 << (bit % 8);
            assert_eq!(id.parse(&h), Err(nfsstat3::NFS3ERR_BADHANDLE), "bit {bit}");
        }
        // The same tag with another key (a state folder copied without its key): refused.
        let mut other = Identity::fixed(*b"datastor", *b"verifier");
        other.key = [9; 32];
        assert_eq!(other.parse(&mine), Err(nfsstat3::NFS3ERR_BADHANDLE));
    }

    #[test]
    fn the_key_is_made_once_private_and_kept_across_restarts() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_on_boot(dir.path(), "b").unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let h = first.handle(0x0000_0001_4000_0002, 5);
        let second = Identity::load_on_boot(dir.path(), "b").unwrap();
        assert_eq!(second.parse(&h), Ok((0x0000_0001_4000_0002, 5)));
        // A damaged key is an error that names it, not a new key.
        fs::write(dir.path().join(KEY_FILE), b"short").unwrap();
        let err = Identity::load_on_boot(dir.path(), "b").unwrap_err();
        assert!(err.to_string().contains(KEY_FILE), "{err}");
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
