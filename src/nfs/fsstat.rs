//! FSSTAT with real figures. nfs3_server answers FSSTAT with fixed numbers (1 TiB free); ESXi
//! sizes a VM's swap file by the free space it reports, so the front corrects each FSSTAT
//! reply on its way out: total, free and available bytes become those of the filesystem that
//! holds the state directory (where every write of every mount lands).
//!
//! Owns: recognising FSSTAT calls (by xid, on the way in), the reply layout, and the patch.
//! Must not: change any other reply, or a reply it cannot parse (those pass unchanged).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

const NFS_PROGRAM: u32 = 100_003;
const NFSPROC3_FSSTAT: u32 = 18;
/// Pending FSSTAT calls remembered per connection; a client that never reads its replies
/// cannot grow this.
const MAX_PENDING: usize = 1024;
/// Size of fattr3 in XDR.
const FATTR3_LEN: usize = 84;

/// Free space of the filesystem holding a path: (total, free, available to us) in bytes.
pub fn space(path: &Path) -> Option<(u64, u64, u64)> {
    let s = rustix::fs::statvfs(path).ok()?;
    let f = s.f_frsize;
    Some((
        s.f_blocks.saturating_mul(f),
        s.f_bfree.saturating_mul(f),
        s.f_bavail.saturating_mul(f),
    ))
}

/// The xids of FSSTAT calls in flight on one connection.
#[derive(Debug, Default)]
pub struct Pending(Mutex<HashSet<u32>>);

impl Pending {
    /// Notes `record` (a call's body) if it is an NFSv3 FSSTAT.
    pub fn note_call(&self, record: &[u8]) {
        let word = |i: usize| {
            record
                .get(i..i + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let (Some(xid), Some(0), Some(2), Some(NFS_PROGRAM), Some(3), Some(NFSPROC3_FSSTAT)) =
            (word(0), word(4), word(8), word(12), word(16), word(20))
        else {
            return;
        };
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() < MAX_PENDING {
            set.insert(xid);
        }
    }

    /// If `reply` (a reply's body) answers a noted FSSTAT, sets its byte counts.
    pub fn patch_reply(&self, reply: &mut [u8], space: impl FnOnce() -> Option<(u64, u64, u64)>) {
        let Some(xid) = reply
            .get(0..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return;
        };
        if !self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&xid)
        {
            return;
        }
        let Some(at) = bytes_offset(reply) else {
            return;
        };
        let Some((total, free, avail)) = space() else {
            return;
        };
        for (i, v) in [total, free, avail].into_iter().enumerate() {
            reply[at + i * 8..at + i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
    }
}

/// Where `tbytes` starts in a successful FSSTAT reply, if this is one.
fn bytes_offset(r: &[u8]) -> Option<usize> {
    let word = |i: usize| {
        r.get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    // xid, REPLY (1), MSG_ACCEPTED (0), verifier (flavor, length, body), SUCCESS (0).
    if word(4)? != 1 || word(8)? != 0 {
        return None;
    }
    let vlen = word(16)? as usize;
    if vlen > 400 {
        return None;
    }
    let mut at = 20 + vlen.next_multiple_of(4);
    if word(at)? != 0 {
        return None; // accept_stat
    }
    at += 4;
    if word(at)? != 0 {
        return None; // nfsstat3: an error reply has no byte counts
    }
    at += 4;
    match word(at)? {
        0 => at += 4,
        1 => at += 4 + FATTR3_LEN,
        _ => return None,
    }
    // tbytes, fbytes, abytes, tfiles, ffiles, afiles (8 each), invarsec (4).
    (r.len() >= at + 6 * 8 + 4).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(xid: u32, prog: u32, proc_: u32) -> Vec<u8> {
        [xid, 0, 2, prog, 3, proc_, 0, 0, 0, 0]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect()
    }

    fn reply(xid: u32, with_attr: bool, status: u32) -> Vec<u8> {
        let mut r: Vec<u8> = [xid, 1, 0, 0, 0, 0, status]
            .iter()
            .flat_map(|w| w.to_be_bytes())
            .collect();
        if status == 0 {
            r.extend_from_slice(&u32::from(with_attr).to_be_bytes());
            if with_attr {
                r.extend_from_slice(&[7u8; FATTR3_LEN]);
            }
            for _ in 0..6 {
                r.extend_from_slice(&(1u64 << 40).to_be_bytes());
            }
            r.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        r
    }

    #[test]
    fn fsstat_replies_get_real_figures_and_nothing_else_changes() {
        let p = Pending::default();
        for attr in [true, false] {
            p.note_call(&call(7, NFS_PROGRAM, NFSPROC3_FSSTAT));
            let mut r = reply(7, attr, 0);
            let before = r.clone();
            p.patch_reply(&mut r, || Some((100, 40, 30)));
            let at = bytes_offset(&r).unwrap();
            assert_eq!(&r[at..at + 8], &100u64.to_be_bytes());
            assert_eq!(&r[at + 8..at + 16], &40u64.to_be_bytes());
            assert_eq!(&r[at + 16..at + 24], &30u64.to_be_bytes());
            assert_eq!(
                &r[..at],
                &before[..at],
                "the header and attributes are untouched"
            );
            assert_eq!(
                &r[at + 24..],
                &before[at + 24..],
                "file counts are untouched"
            );
        }
        // A reply to another call, or an error reply, passes unchanged.
        let mut other = reply(8, true, 0);
        let copy = other.clone();
        p.patch_reply(&mut other, || Some((1, 1, 1)));
        assert_eq!(other, copy);
        p.note_call(&call(9, NFS_PROGRAM, NFSPROC3_FSSTAT));
        let mut err = reply(9, false, 70);
        let copy = err.clone();
        p.patch_reply(&mut err, || Some((1, 1, 1)));
        assert_eq!(err, copy);
        // Calls of other procedures or programs are not noted.
        p.note_call(&call(10, NFS_PROGRAM, 1));
        p.note_call(&call(11, 100_005, NFSPROC3_FSSTAT));
        assert!(p.0.lock().unwrap().is_empty());
        // Truncated replies never panic.
        let full = reply(12, true, 0);
        for cut in 0..full.len() {
            p.note_call(&call(12, NFS_PROGRAM, NFSPROC3_FSSTAT));
            let mut r = full[..cut].to_vec();
            p.patch_reply(&mut r, || Some((1, 1, 1)));
        }
    }

    #[test]
    fn space_of_a_real_directory() {
        let (total, free, avail) = space(Path::new("/")).unwrap();
        assert!(total > 0 && free <= total && avail <= free);
    }
}
