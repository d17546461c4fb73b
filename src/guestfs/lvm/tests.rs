//! The LVM reader on a real PV (fuzz/seeds/guestfs-lvm.img.zst: a GPT disk whose partition 1,
//! at sector 64, is a PV made by `pvcreate --metadatasize 64k`, VG `fzvg` of 128 KiB extents,
//! LV `fat` of two segments (extents 0-3 and 12-13) and LV `ext` (extents 4-11)), and on
//! copies of it whose metadata text was changed and checksummed again.

use super::*;
use crate::guestfs::{all_volumes, reader, DiskSource, FsKind, MemDisk};

const PV: u64 = 64 * 512;
const PV_LEN: u64 = 8000 * 512;
const MDA: usize = PV as usize + 4096;

fn seed() -> Vec<u8> {
    zstd::decode_all(&include_bytes!("../../../fuzz/seeds/guestfs-lvm.img.zst")[..]).unwrap()
}

fn rd(b: &[u8], at: usize, n: usize) -> u64 {
    let mut a = [0u8; 8];
    a[..n].copy_from_slice(&b[at..at + n]);
    u64::from_le_bytes(a)
}

fn text_of(img: &[u8]) -> String {
    let (o, n) = (rd(img, MDA + 40, 8) as usize, rd(img, MDA + 48, 8) as usize);
    String::from_utf8(img[MDA + o..MDA + o + n].to_vec()).unwrap()
}

/// The seed with its metadata text replaced by `f(text)`, checksums made right again.
fn with_text(f: impl Fn(&str) -> String) -> Vec<u8> {
    let mut img = seed();
    let t = f(&text_of(&img)).into_bytes();
    let o = rd(&img, MDA + 40, 8) as usize;
    img[MDA + o..MDA + o + t.len()].copy_from_slice(&t);
    img[MDA + 48..MDA + 56].copy_from_slice(&(t.len() as u64).to_le_bytes());
    img[MDA + 56..MDA + 60].copy_from_slice(&lvm_crc(&[&t]).to_le_bytes());
    let crc = lvm_crc(&[&img[MDA + 4..MDA + 512]]);
    img[MDA..MDA + 4].copy_from_slice(&crc.to_le_bytes());
    img
}

fn volumes(img: Vec<u8>) -> Vec<crate::guestfs::Volume> {
    all_volumes(&[DiskSource {
        disk: reader::shared(MemDisk(img)),
        device: "vda".into(),
        dev_path: "vda".into(),
    }])
    .unwrap()
}

fn reason_of<'a>(vols: &'a [crate::guestfs::Volume], path: &str) -> &'a str {
    vols.iter()
        .find(|v| v.path == path)
        .unwrap_or_else(|| panic!("no {path} in {vols:#?}"))
        .reason
        .as_deref()
        .unwrap_or("")
}

#[test]
fn reads_the_real_pv_and_maps_both_segments() {
    let img = seed();
    let info = read_pv(&mut MemDisk(img.clone()), PV, PV_LEN).unwrap();
    assert_eq!(info.uuid, "DS7sBD83zVpEW0bxfzEfYZ9CUPo7h9XK");
    assert_eq!((info.data_start, info.data_end), (131072, PV_LEN));
    let (seq, name, _) = info.metadata.unwrap();
    assert_eq!((seq, name.as_str()), (4, "fzvg"));
    let vols = volumes(img);
    let paths: Vec<(&str, &str, u64)> = vols
        .iter()
        .map(|v| (v.path.as_str(), v.kind.as_str(), v.size))
        .collect();
    assert_eq!(
        paths,
        vec![
            ("/vda/part1", "lvm2", PV_LEN),
            ("/vda/lvm/fzvg/fat", "fat12", 6 << 17),
            ("/vda/lvm/fzvg/ext", "ext4", 8 << 17),
        ]
    );
    assert!(reason_of(&vols, "/vda/part1").contains("under /vda/lvm/fzvg"));
    let e = 128 << 10;
    let base = PV + 131072;
    assert_eq!(
        vols[1].extents,
        vec![
            Extent {
                at: 0,
                disk: 0,
                offset: base,
                len: 4 * e
            },
            Extent {
                at: 4 * e,
                disk: 0,
                offset: base + 12 * e,
                len: 2 * e
            },
        ]
    );
}

#[test]
fn damaged_labels_and_areas_are_reasons_on_the_pv() {
    let cases: Vec<(usize, &str)> = vec![
        (PV as usize + 512 + 100, "label checksum"),
        (PV as usize + 512 + 8, "says it is in sector"),
        (MDA + 100, "header checksum"),
    ];
    for (at, want) in cases {
        let mut img = seed();
        img[at] ^= 0x40;
        let vols = volumes(img);
        let r = reason_of(&vols, "/vda/part1");
        assert!(r.contains(want), "{want}: {r}");
        assert_eq!(vols.len(), 1, "{vols:#?}");
    }
    let mut img = seed();
    let o = rd(&img, MDA + 40, 8) as usize;
    img[MDA + o + 10] ^= 1;
    let r = reason_of(&volumes(img), "/vda/part1").to_string();
    assert!(r.contains("text checksum"), "{r}");
}

#[test]
fn hostile_metadata_gives_reasons_never_wrong_extents() {
    type Edit = Box<dyn Fn(&str) -> String>;
    let cases: Vec<(Edit, &str, &str)> = vec![
        (
            Box::new(|t| t.replace("\"pv0\", 12", "\"pv0\", 29")),
            "/vda/lvm/fzvg/fat",
            "outside its data area",
        ),
        (
            Box::new(|t| t.replace("\"pv0\", 12", "\"pv0\", 18446744073709551615")),
            "/vda/part1",
            "64 bits",
        ),
        (
            Box::new(|t| t.replace("pe_count = 30", "pe_count = 9000")),
            "/vda/lvm/fzvg/ext",
            "",
        ),
        (
            Box::new(|t| t.replace("start_extent = 4", "start_extent = 5")),
            "/vda/lvm/fzvg/fat",
            "not from 4 on",
        ),
        (
            Box::new(|t| {
                t.replace(
                    "stripe_count = 1\n\nstripes = [\n\"pv0\", 4",
                    "stripe_count = 2\n\nstripes = [\n\"pv0\", 4",
                )
            }),
            "/vda/lvm/fzvg/ext",
            "lvm: striped volumes (2 stripes) are not supported yet",
        ),
        (
            Box::new(|t| t.replace("\"pv0\", 4", "\"pv7\", 4")),
            "/vda/lvm/fzvg/ext",
            "no physical volume pv7",
        ),
        (
            Box::new(|t| t.replace("extent_size = 256", "extent_size = 0")),
            "/vda/part1",
            "extent size of 0",
        ),
        (
            Box::new(|t| t.replacen("fzvg {", "../x {", 1)),
            "/vda/part1",
            "",
        ),
        (
            Box::new(|t| t.replace("\nfat {", "\n.. {")),
            "/vda/lvm/fzvg/lv0",
            "not a valid logical volume name",
        ),
        (
            Box::new(|t| {
                t.replace(
                    "type = \"striped\"\nstripe_count = 1\n\nstripes = [\n\"pv0\", 4\n]",
                    "type = \"thin\"\nthin_pool = \"pool\"\ndevice_id = 1",
                )
            }),
            "/vda/lvm/fzvg/ext",
            "lvm: thin volumes are not supported yet",
        ),
    ];
    for (f, path, want) in cases {
        let img = with_text(f);
        let vols = volumes(img);
        let r = reason_of(&vols, path);
        assert!(r.contains(want), "{path}: {want:?}: {r}");
    }
    // A PV of the VG that is not in the snapshot: its LVs say so.
    let img = with_text(|t| {
        t.replace(
            "physical_volumes {\n",
            "physical_volumes {\npv9 {\nid = \"aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa\"\npe_start = 256\npe_count = 30\n}\n",
        )
        .replace("\"pv0\", 4", "\"pv9\", 4")
    });
    let vols = volumes(img);
    let r = reason_of(&vols, "/vda/lvm/fzvg/ext");
    assert!(r.contains("pv9") && r.contains("missing"), "{r}");
    assert_eq!(
        vols.iter()
            .find(|v| v.path == "/vda/lvm/fzvg/fat")
            .unwrap()
            .kind,
        FsKind::Fat12
    );
}

#[test]
fn metadata_bounds_hold() {
    // Too many LVs, too deep: the VG is refused with the reason on its PV.
    let many: String = (0..=MAX_LVS)
        .map(|i| format!("l{i} {{\nstatus = [\"VISIBLE\"]\n}}\n"))
        .collect();
    let img = with_text(|t| {
        t.replace(
            "logical_volumes {\n",
            &format!("logical_volumes {{\n{many}"),
        )
    });
    let r = reason_of(&volumes(img), "/vda/part1").to_string();
    assert!(r.contains("more than 1024 logical volumes"), "{r}");
    let deep = "a {".repeat(text::MAX_DEPTH) + &"}".repeat(text::MAX_DEPTH);
    let img = with_text(|t| {
        t.replace(
            "logical_volumes {\n",
            &format!("logical_volumes {{\n{deep}\n"),
        )
    });
    let r = reason_of(&volumes(img), "/vda/part1").to_string();
    assert!(r.contains("deeper"), "{r}");
}

#[test]
fn lvm_checksum_is_lvms() {
    // The seed's label checksum, as pvcreate wrote it.
    let img = seed();
    let l = PV as usize + 512;
    assert_eq!(
        lvm_crc(&[&img[l + 20..l + 512]]),
        rd(&img, l + 16, 4) as u32
    );
    assert_eq!(lvm_crc(&[b"ab", b"c"]), lvm_crc(&[b"abc"]));
}

#[test]
fn damaged_copies_of_the_seed_never_panic() {
    // Deterministic damage, as the fuzz target does: a few bytes XORed in the PV's label,
    // metadata area and LVs' first blocks, then every reader over the result.
    let img = seed();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let hot = [PV as usize, MDA, MDA + 512, PV as usize + 131072];
    for round in 0..LVM_DAMAGE_ROUNDS {
        let mut d = img.clone();
        for _ in 0..1 + round % 4 {
            let base = hot[(next() % hot.len() as u64) as usize];
            let at = base + (next() % 2048) as usize;
            d[at] ^= (next() % 255 + 1) as u8;
        }
        crate::guestfs::fuzzing::exercise(&d, 2);
    }
}

/// Damaged copies [`damaged_copies_of_the_seed_never_panic`] runs.
const LVM_DAMAGE_ROUNDS: u32 = 1000;
