//! The entry point the `guestfs` fuzz target drives (fuzz/fuzz_targets/guestfs.rs): a disk
//! image in memory through the partition readers, LVM2 (label, metadata areas, text, volume
//! group, logical volumes), kind detection and every file system reader that opens it: stat
//! and list from the root down, read of each file whole and of a range from its middle. Any
//! panic, endless loop or unbounded allocation is a finding; errors are the expected answer
//! to damage.

use super::{all_volumes, open_volume, reader, DiskSource, EntryKind, FsKind, GuestPath, MemDisk};

/// Entries looked at per image, so that one input stays fast.
const BUDGET: usize = 256;
/// Bytes read per file.
const FILE_BYTES: u64 = 1 << 20;

/// Runs the readers over `image`. `kind_hint` forces the kind of a whole-disk volume when the
/// magic says unknown (so that damaged superblocks reach the file system readers).
pub fn exercise(image: &[u8], kind_hint: u8) {
    let disk = reader::shared(MemDisk(image.to_vec()));
    let vols = all_volumes(&[DiskSource {
        disk: disk.clone(),
        device: "vda".into(),
        dev_path: "vda".into(),
    }]);
    let Ok(mut vols) = vols else {
        return;
    };
    for v in &mut vols {
        if v.kind == FsKind::Unknown
            && v.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("unknown"))
        {
            v.kind = match kind_hint % 4 {
                0 => FsKind::Ext4,
                1 => FsKind::Fat16,
                2 => FsKind::Ntfs,
                _ => FsKind::Unknown,
            };
            v.reason = v.kind.not_openable().map(str::to_string);
        }
        let Ok(mut fs) = open_volume(v, std::slice::from_ref(&disk)) else {
            continue;
        };
        let mut budget = BUDGET;
        let mut stack: Vec<GuestPath> = vec![Vec::new()];
        while let Some(p) = stack.pop() {
            let Ok(entries) = fs.list(&p) else {
                continue;
            };
            for e in entries {
                if budget == 0 {
                    return;
                }
                budget -= 1;
                let mut child = p.clone();
                child.push(e.raw_name.clone());
                let _ = fs.stat(&child);
                match e.kind {
                    EntryKind::Dir if child.len() < 8 => stack.push(child),
                    EntryKind::File => {
                        let mut left = FILE_BYTES;
                        let _ = fs.copy(&child, e.size.min(FILE_BYTES), &mut |b: &[u8]| {
                            left = left.saturating_sub(b.len() as u64);
                            Ok(())
                        });
                        // A range from the middle (a download's `Range`): the readers seek.
                        let _ = fs.copy_range(&child, e.size, e.size / 3, 8192, &mut |_| Ok(()));
                    }
                    _ => {}
                }
            }
        }
    }
}
