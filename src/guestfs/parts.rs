//! Partition tables (MBR with its extended chain, GPT) and file system magic.
//!
//! Pure parsing over a [`ReadAt`]: no I/O of its own, no allocation sized by the guest beyond
//! the documented bounds. Every offset and length read from a sector is checked against the
//! disk before it is used; a damaged table is a [`TableError`] saying what was wrong, never a
//! panic or a loop (the extended chain is walked at most [`MAX_LOGICAL`] steps and an EBR seen
//! twice is an error).

use super::ReadAt;

/// Sector size assumed for partition tables (VM disks use 512-byte logical sectors).
pub const SECTOR: u64 = 512;
/// The most logical partitions an extended partition may hold.
pub const MAX_LOGICAL: usize = 128;
/// The most GPT entries read (the usual table has 128).
pub const MAX_GPT_ENTRIES: u32 = 1024;

/// A damaged partition table: what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TableError(pub String);

/// A partition: where it starts and how long it is, in bytes, and its number (`part1`..).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

/// What a disk's first sectors say it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// A partition table and its partitions, in table order.
    Mbr(Vec<Partition>),
    Gpt(Vec<Partition>),
    /// No table: the whole disk is one volume (a file system, or unknown).
    Whole,
}

/// The kind of a volume, by its magic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext2,
    Ext3,
    Ext4,
    Fat12,
    Fat16,
    Fat32,
    Ntfs,
    Xfs,
    Lvm2,
    /// An LVM logical volume of a kind this version does not read (thin, raid, ...).
    Lvm,
    Luks,
    Swap,
    Unknown,
}

impl FsKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::Ext2 => "ext2",
            FsKind::Ext3 => "ext3",
            FsKind::Ext4 => "ext4",
            FsKind::Fat12 => "fat12",
            FsKind::Fat16 => "fat16",
            FsKind::Fat32 => "fat32",
            FsKind::Ntfs => "ntfs",
            FsKind::Xfs => "xfs",
            FsKind::Lvm2 => "lvm2",
            FsKind::Lvm => "lvm",
            FsKind::Luks => "luks",
            FsKind::Swap => "swap",
            FsKind::Unknown => "unknown",
        }
    }

    /// Why a volume of this kind cannot be opened, or `None` when it can.
    pub fn not_openable(self) -> Option<&'static str> {
        match self {
            FsKind::Ext2 | FsKind::Ext3 | FsKind::Ext4 => None,
            FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => None,
            FsKind::Ntfs => None,
            FsKind::Xfs => Some("xfs: not supported yet"),
            FsKind::Lvm2 => Some("lvm2 physical volume: its logical volumes are listed apart"),
            FsKind::Lvm => Some("lvm: this kind of logical volume is not supported yet"),
            FsKind::Luks => Some("luks: encrypted, cannot be opened without its key"),
            FsKind::Swap => Some("swap: holds no files"),
            FsKind::Unknown => Some("unknown: no file system this version reads was found"),
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn read_vec(r: &mut dyn ReadAt, offset: u64, len: usize) -> Result<Vec<u8>, TableError> {
    let mut buf = vec![0u8; len];
    r.read_exact_at(offset, &mut buf)
        .map_err(|e| TableError(format!("cannot read {len} bytes at {offset}: {e}")))?;
    Ok(buf)
}

/// How many bytes [`detect_fs`] wants from a volume's start.
pub const PROBE_BYTES: usize = 8192;

/// A volume's kind from its first bytes (up to [`PROBE_BYTES`]; fewer for a tiny volume).
pub fn detect_fs(b: &[u8]) -> FsKind {
    let at = |o: usize, m: &[u8]| b.len() >= o + m.len() && &b[o..o + m.len()] == m;
    if at(0, b"LUKS\xba\xbe") {
        return FsKind::Luks;
    }
    if at(0, b"XFSB") {
        return FsKind::Xfs;
    }
    if at(3, b"NTFS    ") {
        return FsKind::Ntfs;
    }
    for s in [0usize, 512, 1024, 1536] {
        if at(s, b"LABELONE") && at(s + 24, b"LVM2 001") {
            return FsKind::Lvm2;
        }
    }
    if b.len() >= 1024 + 0x68 && le16(b, 1024 + 0x38) == 0xEF53 {
        let compat = le32(b, 1024 + 0x5C);
        let incompat = le32(b, 1024 + 0x60);
        let ro_compat = le32(b, 1024 + 0x64);
        // ext4's own features: extents, 64bit, flex_bg, huge_file/gdt_csum/dir_nlink/extra_isize.
        if incompat & (0x40 | 0x80 | 0x200) != 0 || ro_compat & (0x8 | 0x10 | 0x20 | 0x40) != 0 {
            return FsKind::Ext4;
        }
        if compat & 0x4 != 0 {
            return FsKind::Ext3;
        }
        return FsKind::Ext2;
    }
    if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        return FsKind::Swap;
    }
    if b.len() >= 512 && at(510, b"\x55\xaa") {
        if at(82, b"FAT32   ") {
            return FsKind::Fat32;
        }
        if at(54, b"FAT16   ") {
            return FsKind::Fat16;
        }
        if at(54, b"FAT12   ") {
            return FsKind::Fat12;
        }
    }
    FsKind::Unknown
}

/// Finds the partition table of a disk of `size` bytes, or says there is none.
pub fn read_layout(r: &mut dyn ReadAt, size: u64) -> Result<Layout, TableError> {
    if size < SECTOR {
        return Ok(Layout::Whole);
    }
    let mbr = read_vec(r, 0, SECTOR as usize)?;
    if &mbr[510..512] != b"\x55\xaa" {
        return Ok(Layout::Whole);
    }
    // A FAT or NTFS boot sector also ends in 55 AA: a file system on the whole disk.
    if !matches!(detect_fs(&mbr), FsKind::Unknown) {
        return Ok(Layout::Whole);
    }
    let entries: Vec<MbrEntry> = (0..4).map(|i| MbrEntry::parse(&mbr, i)).collect();
    // An MBR entry's status byte is 0x00 or 0x80; anything else is not a table.
    if entries.iter().any(|e| e.status != 0 && e.status != 0x80) {
        return Ok(Layout::Whole);
    }
    if entries.iter().any(|e| e.kind == 0xEE) {
        return read_gpt(r, size).map(Layout::Gpt);
    }
    if entries.iter().all(|e| e.kind == 0) {
        return Ok(Layout::Whole);
    }
    read_mbr(r, size, &entries).map(Layout::Mbr)
}

#[derive(Debug, Clone, Copy)]
struct MbrEntry {
    status: u8,
    kind: u8,
    start: u32,
    sectors: u32,
}

impl MbrEntry {
    fn parse(sector: &[u8], i: usize) -> MbrEntry {
        let e = 446 + 16 * i;
        MbrEntry {
            status: sector[e],
            kind: sector[e + 4],
            start: le32(sector, e + 8),
            sectors: le32(sector, e + 12),
        }
    }

    fn is_extended(&self) -> bool {
        matches!(self.kind, 0x05 | 0x0F | 0x85)
    }
}

/// Checks that `p` lies inside `[lo, hi)` (bytes) and overlaps none of `taken`.
fn place(
    p: Partition,
    lo: u64,
    hi: u64,
    taken: &[Partition],
    what: &str,
) -> Result<(), TableError> {
    let end = p
        .start
        .checked_add(p.len)
        .ok_or_else(|| TableError(format!("{what}: its end overflows")))?;
    if p.len == 0 {
        return Err(TableError(format!("{what}: it is empty")));
    }
    if p.start < lo || end > hi {
        return Err(TableError(format!(
            "{what}: bytes {}..{end} lie outside {lo}..{hi}",
            p.start
        )));
    }
    if let Some(o) = taken
        .iter()
        .find(|o| p.start < o.start + o.len && o.start < end)
    {
        return Err(TableError(format!(
            "{what}: bytes {}..{end} overlap partition {} ({}..{})",
            p.start,
            o.number,
            o.start,
            o.start + o.len
        )));
    }
    Ok(())
}

fn read_mbr(
    r: &mut dyn ReadAt,
    size: u64,
    entries: &[MbrEntry],
) -> Result<Vec<Partition>, TableError> {
    let mut out: Vec<Partition> = Vec::new();
    // Primary and extended entries, checked against each other (the extended one included).
    let mut primaries: Vec<Partition> = Vec::new();
    let mut extended: Option<Partition> = None;
    for (i, e) in entries.iter().enumerate() {
        if e.kind == 0 {
            continue;
        }
        let p = Partition {
            number: i as u32 + 1,
            start: u64::from(e.start) * SECTOR,
            len: u64::from(e.sectors) * SECTOR,
        };
        let what = format!("MBR entry {}", i + 1);
        place(p, SECTOR, size, &primaries, &what)?;
        primaries.push(p);
        if e.is_extended() {
            if extended.is_some() {
                return Err(TableError(format!("{what}: a second extended partition")));
            }
            extended = Some(p);
        } else {
            out.push(p);
        }
    }
    if let Some(ext) = extended {
        let logical = read_ebr_chain(r, ext)?;
        out.extend(logical);
    }
    Ok(out)
}

/// Walks the chain of extended boot records in `ext`: logical partitions `part5`, `part6`, ...
fn read_ebr_chain(r: &mut dyn ReadAt, ext: Partition) -> Result<Vec<Partition>, TableError> {
    let ext_end = ext.start + ext.len;
    let mut out: Vec<Partition> = Vec::new();
    let mut seen: Vec<u64> = Vec::new();
    let mut ebr = ext.start;
    loop {
        if seen.contains(&ebr) {
            return Err(TableError(format!(
                "extended partition: the chain of EBRs loops back to the one at byte {ebr}"
            )));
        }
        if out.len() >= MAX_LOGICAL {
            return Err(TableError(format!(
                "extended partition: more than {MAX_LOGICAL} logical partitions"
            )));
        }
        seen.push(ebr);
        let what = format!("EBR at byte {ebr}");
        let sector = read_vec(r, ebr, SECTOR as usize)?;
        if &sector[510..512] != b"\x55\xaa" {
            return Err(TableError(format!("{what}: no 55 AA signature")));
        }
        let first = MbrEntry::parse(&sector, 0);
        let next = MbrEntry::parse(&sector, 1);
        if first.kind != 0 && !first.is_extended() {
            let number = 5 + out.len() as u32;
            let p = Partition {
                number,
                start: ebr
                    .checked_add(u64::from(first.start) * SECTOR)
                    .ok_or_else(|| TableError(format!("{what}: start overflows")))?,
                len: u64::from(first.sectors) * SECTOR,
            };
            place(
                p,
                ebr + SECTOR,
                ext_end,
                &out,
                &format!("{what}: logical partition {number}"),
            )?;
            out.push(p);
        }
        if next.kind == 0 || next.start == 0 {
            return Ok(out);
        }
        if !next.is_extended() {
            return Err(TableError(format!(
                "{what}: its link to the next EBR has type {:#04x}, not an extended type",
                next.kind
            )));
        }
        ebr = ext.start + u64::from(next.start) * SECTOR;
        if ebr >= ext_end {
            return Err(TableError(format!(
                "{what}: the next EBR at byte {ebr} lies outside the extended partition"
            )));
        }
    }
}

/// Reads a GPT: the primary header, or the backup when the primary is damaged.
fn read_gpt(r: &mut dyn ReadAt, size: u64) -> Result<Vec<Partition>, TableError> {
    let last_lba = size / SECTOR - 1;
    match read_gpt_at(r, size, 1) {
        Ok(p) => Ok(p),
        Err(primary) => read_gpt_at(r, size, last_lba).map_err(|backup| {
            TableError(format!(
                "GPT: primary header: {primary}; backup header: {backup}"
            ))
        }),
    }
}

fn read_gpt_at(r: &mut dyn ReadAt, size: u64, lba: u64) -> Result<Vec<Partition>, TableError> {
    let sectors = size / SECTOR;
    let h = read_vec(r, lba * SECTOR, SECTOR as usize)?;
    if &h[0..8] != b"EFI PART" {
        return Err(TableError(format!("no GPT signature at LBA {lba}")));
    }
    let header_size = le32(&h, 12) as usize;
    if !(92..=SECTOR as usize).contains(&header_size) {
        return Err(TableError(format!(
            "header size {header_size} is not 92..512"
        )));
    }
    let stored_crc = le32(&h, 16);
    let mut copy = h[..header_size].to_vec();
    copy[16..20].fill(0);
    let crc = crc32fast::hash(&copy);
    if crc != stored_crc {
        return Err(TableError(format!(
            "header CRC {stored_crc:#010x} does not match its bytes ({crc:#010x})"
        )));
    }
    let first_usable = le64(&h, 40);
    let last_usable = le64(&h, 48);
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80);
    let entry_size = le32(&h, 84);
    let entries_crc = le32(&h, 88);
    if last_usable >= sectors || first_usable > last_usable {
        return Err(TableError(format!(
            "usable LBAs {first_usable}..={last_usable} do not fit a disk of {sectors} sectors"
        )));
    }
    if count > MAX_GPT_ENTRIES {
        return Err(TableError(format!(
            "{count} entries, more than the {MAX_GPT_ENTRIES} read"
        )));
    }
    if !(128..=1024).contains(&entry_size) || !entry_size.is_multiple_of(8) {
        return Err(TableError(format!(
            "entry size {entry_size} is not 128..1024"
        )));
    }
    let table_len = u64::from(count) * u64::from(entry_size);
    let table_end = entries_lba
        .checked_mul(SECTOR)
        .and_then(|s| s.checked_add(table_len))
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            TableError(format!(
                "the entry array at LBA {entries_lba} lies past the disk's end"
            ))
        })?;
    let table = read_vec(r, table_end - table_len, table_len as usize)?;
    let crc = crc32fast::hash(&table);
    if crc != entries_crc {
        return Err(TableError(format!(
            "entry array CRC {entries_crc:#010x} does not match its bytes ({crc:#010x})"
        )));
    }
    let mut out: Vec<Partition> = Vec::new();
    for (i, e) in table.chunks_exact(entry_size as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        let what = format!("GPT entry {}", i + 1);
        if last < first {
            return Err(TableError(format!(
                "{what}: last LBA {last} is before its first {first}"
            )));
        }
        if first < first_usable || last > last_usable {
            return Err(TableError(format!(
                "{what}: LBAs {first}..={last} lie outside the usable {first_usable}..={last_usable}"
            )));
        }
        let p = Partition {
            number: i as u32 + 1,
            start: first * SECTOR,
            len: (last - first + 1) * SECTOR,
        };
        place(p, 0, size, &out, &what)?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestfs::MemDisk;

    fn mbr_entry(s: &mut [u8], i: usize, kind: u8, start: u32, sectors: u32) {
        let e = 446 + 16 * i;
        s[e + 4] = kind;
        s[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        s[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        s[510] = 0x55;
        s[511] = 0xaa;
    }

    fn disk(sectors: usize) -> Vec<u8> {
        vec![0u8; sectors * 512]
    }

    fn layout(d: Vec<u8>) -> Result<Layout, TableError> {
        let size = d.len() as u64;
        read_layout(&mut MemDisk(d), size)
    }

    fn p(number: u32, start_lba: u64, sectors: u64) -> Partition {
        Partition {
            number,
            start: start_lba * 512,
            len: sectors * 512,
        }
    }

    #[test]
    fn mbr_primary_and_logical_partitions() {
        let mut d = disk(400);
        mbr_entry(&mut d, 0, 0x83, 2, 100);
        mbr_entry(&mut d, 1, 0x05, 110, 200);
        // First EBR at 110: logical at +2 for 50 sectors, next EBR at ext+60.
        mbr_entry(&mut d[110 * 512..111 * 512], 0, 0x83, 2, 50);
        mbr_entry(&mut d[110 * 512..111 * 512], 1, 0x05, 60, 100);
        // Second EBR at 170: logical at +1 for 30 sectors, end of chain.
        mbr_entry(&mut d[170 * 512..171 * 512], 0, 0x07, 1, 30);
        assert_eq!(
            layout(d).unwrap(),
            Layout::Mbr(vec![p(1, 2, 100), p(5, 112, 50), p(6, 171, 30)])
        );
    }

    #[test]
    fn no_signature_is_a_whole_disk() {
        assert_eq!(layout(disk(8)).unwrap(), Layout::Whole);
        assert_eq!(layout(vec![0u8; 100]).unwrap(), Layout::Whole);
    }

    #[test]
    fn fat_boot_sector_is_a_whole_disk_not_a_table() {
        let mut d = disk(8);
        d[54..62].copy_from_slice(b"FAT16   ");
        d[510] = 0x55;
        d[511] = 0xaa;
        assert_eq!(layout(d).unwrap(), Layout::Whole);
    }

    #[test]
    fn damaged_mbr_tables_are_errors() {
        type Make = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Make)> = vec![
            (
                "overlap",
                Box::new(|d| {
                    mbr_entry(d, 0, 0x83, 2, 100);
                    mbr_entry(d, 1, 0x83, 50, 100);
                }),
            ),
            ("outside", Box::new(|d| mbr_entry(d, 0, 0x83, 2, 1000))),
            (
                "outside",
                Box::new(|d| mbr_entry(d, 0, 0x83, u32::MAX, u32::MAX)),
            ),
            ("empty", Box::new(|d| mbr_entry(d, 0, 0x83, 2, 0))),
            (
                "loops back",
                Box::new(|d| {
                    mbr_entry(d, 0, 0x05, 10, 100);
                    mbr_entry(&mut d[10 * 512..11 * 512], 0, 0x83, 1, 5);
                    mbr_entry(&mut d[10 * 512..11 * 512], 1, 0x05, 20, 10);
                    mbr_entry(&mut d[30 * 512..31 * 512], 0, 0x83, 1, 5);
                    // The second EBR names itself as the next one.
                    mbr_entry(&mut d[30 * 512..31 * 512], 1, 0x05, 20, 10);
                }),
            ),
            (
                "logical partition 5: bytes 5632..31232 lie outside",
                Box::new(|d| {
                    mbr_entry(d, 0, 0x05, 10, 20);
                    mbr_entry(&mut d[10 * 512..11 * 512], 0, 0x83, 1, 50);
                }),
            ),
            (
                "no 55 AA",
                Box::new(|d| {
                    mbr_entry(d, 0, 0x05, 10, 20);
                }),
            ),
            (
                "second extended",
                Box::new(|d| {
                    mbr_entry(d, 0, 0x05, 10, 20);
                    mbr_entry(d, 1, 0x0F, 40, 20);
                    mbr_entry(&mut d[10 * 512..11 * 512], 0, 0x83, 1, 5);
                }),
            ),
        ];
        for (want, make) in cases {
            let mut d = disk(200);
            make(&mut d);
            let err = layout(d).expect_err(want);
            assert!(err.0.contains(want), "{want}: got {err}");
        }
    }

    /// A GPT disk of `sectors` with the given (first, last) LBAs, headers and CRCs right.
    fn gpt(sectors: u64, parts: &[(u64, u64)]) -> Vec<u8> {
        let mut d = vec![0u8; sectors as usize * 512];
        mbr_entry(&mut d, 0, 0xEE, 1, (sectors - 1) as u32);
        let mut table = vec![0u8; 128 * 128];
        for (i, (first, last)) in parts.iter().enumerate() {
            let e = &mut table[i * 128..(i + 1) * 128];
            e[0] = 0xAF; // any non-zero type GUID
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        let table_crc = crc32fast::hash(&table);
        for (hdr_lba, table_lba) in [(1u64, 2u64), (sectors - 1, sectors - 33)] {
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&hdr_lba.to_le_bytes());
            h[40..48].copy_from_slice(&34u64.to_le_bytes());
            h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
            h[72..80].copy_from_slice(&table_lba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&table_crc.to_le_bytes());
            let crc = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            let at = hdr_lba as usize * 512;
            d[at..at + 92].copy_from_slice(&h);
            let t = table_lba as usize * 512;
            d[t..t + table.len()].copy_from_slice(&table);
        }
        d
    }

    #[test]
    fn gpt_partitions() {
        let d = gpt(300, &[(34, 99), (100, 199)]);
        assert_eq!(
            layout(d).unwrap(),
            Layout::Gpt(vec![p(1, 34, 66), p(2, 100, 100)])
        );
    }

    #[test]
    fn gpt_with_a_bad_primary_crc_uses_the_backup() {
        let mut d = gpt(300, &[(34, 99)]);
        d[512 + 16] ^= 1;
        assert_eq!(layout(d).unwrap(), Layout::Gpt(vec![p(1, 34, 66)]));
    }

    #[test]
    fn gpt_with_both_crcs_bad_is_an_error() {
        let mut d = gpt(300, &[(34, 99)]);
        d[512 + 16] ^= 1;
        d[299 * 512 + 16] ^= 1;
        let err = layout(d).unwrap_err();
        assert!(err.0.contains("header CRC"), "{err}");
    }

    #[test]
    fn gpt_with_a_bad_entry_array_crc_is_an_error() {
        let mut d = gpt(300, &[(34, 99)]);
        d[2 * 512 + 40] ^= 1;
        d[(300 - 33) * 512 + 40] ^= 1;
        let err = layout(d).unwrap_err();
        assert!(err.0.contains("entry array CRC"), "{err}");
    }

    #[test]
    fn damaged_gpt_entries_are_errors() {
        for (parts, want) in [
            (vec![(34u64, 99u64), (90, 150)], "overlap"),
            (vec![(34, 299)], "outside the usable"),
            (vec![(99, 34)], "before its first"),
        ] {
            let err = layout(gpt(300, &parts)).unwrap_err();
            assert!(err.0.contains(want), "{want}: got {err}");
        }
    }

    #[test]
    fn magic_table() {
        let mut b = vec![0u8; PROBE_BYTES];
        assert_eq!(detect_fs(&b), FsKind::Unknown);
        b[1024 + 0x38..1024 + 0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(detect_fs(&b), FsKind::Ext2);
        b[1024 + 0x5C] = 0x4;
        assert_eq!(detect_fs(&b), FsKind::Ext3);
        b[1024 + 0x60] = 0x40;
        assert_eq!(detect_fs(&b), FsKind::Ext4);
        let mut b = vec![0u8; PROBE_BYTES];
        b[0..6].copy_from_slice(b"LUKS\xba\xbe");
        assert_eq!(detect_fs(&b), FsKind::Luks);
        let mut b = vec![0u8; PROBE_BYTES];
        b[512..520].copy_from_slice(b"LABELONE");
        b[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(detect_fs(&b), FsKind::Lvm2);
        let mut b = vec![0u8; PROBE_BYTES];
        b[4086..4096].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(detect_fs(&b), FsKind::Swap);
        let mut b = vec![0u8; 512];
        b[3..11].copy_from_slice(b"NTFS    ");
        assert_eq!(detect_fs(&b), FsKind::Ntfs);
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(b"XFSB");
        assert_eq!(detect_fs(&b), FsKind::Xfs);
        let mut b = vec![0u8; 512];
        b[82..90].copy_from_slice(b"FAT32   ");
        b[510..512].copy_from_slice(b"\x55\xaa");
        assert_eq!(detect_fs(&b), FsKind::Fat32);
        assert_eq!(detect_fs(&[]), FsKind::Unknown);
    }
}
