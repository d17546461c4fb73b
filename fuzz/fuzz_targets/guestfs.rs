//! Fuzz target: the guest file readers (partition tables, LVM2, kind detection, ext2/3/4, FAT
//! and NTFS) over damaged disk images. Any panic, hang or unbounded allocation is a finding; an
//! error is the expected answer.
//! The first byte picks the input's shape: with bit 7 set, one of four real disks made by the
//! Debian tools (fuzz/seeds: an MBR disk with FAT12 and a logical ext4, a GPT disk with an
//! ext4, both built with sfdisk, mkfs.vfat + mcopy and mkfs.ext4 -d; a GPT disk whose
//! partition is an LVM2 PV (pvcreate, vgcreate, lvcreate, lvextend) with a FAT12 LV of two
//! segments and an ext4 LV; an MBR disk with a 2 MiB NTFS made by mkntfs and filled through
//! ntfs-3g: folders, a sparse file, a hard link, a link, a folder with an index allocation)
//! is damaged by the rest of the input, read as 4-byte patches (a 24-bit offset and a byte
//! XORed into the image there);
//! otherwise the rest is the disk itself, and the first byte's low bits say which reader a
//! whole disk of unknown kind is handed to.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

static SEEDS: OnceLock<[Vec<u8>; 4]> = OnceLock::new();

fn seeds() -> &'static [Vec<u8>; 4] {
    SEEDS.get_or_init(|| {
        let unpack = |z: &[u8]| zstd::decode_all(z).expect("fuzz seed image");
        [
            unpack(include_bytes!("../seeds/guestfs-mbr.img.zst")),
            unpack(include_bytes!("../seeds/guestfs-gpt.img.zst")),
            unpack(include_bytes!("../seeds/guestfs-lvm.img.zst")),
            unpack(include_bytes!("../seeds/guestfs-ntfs.img.zst")),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 0x80 == 0 {
        livemount::guestfs::fuzzing::exercise(rest, mode);
        return;
    }
    let mut image = seeds()[usize::from(mode & 0x7f) % 4].clone();
    let len = image.len();
    for p in rest.chunks_exact(4) {
        let at = (usize::from(p[0]) << 16 | usize::from(p[1]) << 8 | usize::from(p[2])) % len;
        image[at] ^= p[3];
    }
    livemount::guestfs::fuzzing::exercise(&image, mode);
});
