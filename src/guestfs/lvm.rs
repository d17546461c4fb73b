//! LVM2, read-only from a disk's bytes: a physical volume's label and header, its metadata
//! areas (the committed text in their circular buffer, checked against its checksum), the text
//! parsed by our own bounded parser (`lvm/text.rs`), and from it the volume group and the
//! extents of its linear logical volumes on the physical volumes' data areas.
//!
//! Must not: trust the guest's metadata. Every count is bounded ([`MAX_PVS`], [`MAX_LVS`],
//! [`MAX_SEGMENTS`], [`MAX_METADATA`] bytes of text), every segment must lie inside its PV's
//! data area, all arithmetic is checked; what is wrong becomes a reason on the volume that
//! names it, never a panic. No LVM tool of the host is used.
//!
//! Names: a logical volume is `/DEVICE/lvm/VG/LV`, DEVICE the disk that holds the volume
//! group's first physical volume (in the metadata's order) found in the snapshot, so that a
//! volume group spanning two disks lists under one of them.

pub mod text;

use super::{Extent, ReadAt};
use text::{Section, Value};

/// Sectors at the start of a physical volume where its label may be.
pub const LABEL_SECTORS: u64 = 4;
/// The largest metadata text read (LVM's default metadata area is 1 MiB).
pub const MAX_METADATA: u64 = 4 << 20;
/// The most physical volumes a volume group may list.
pub const MAX_PVS: usize = 256;
/// The most logical volumes a volume group may list.
pub const MAX_LVS: usize = 1024;
/// The most segments one logical volume may have.
pub const MAX_SEGMENTS: usize = 1024;
/// The most entries of a PV header's list of data or metadata areas.
pub const MAX_AREAS: usize = 8;

const SECTOR: u64 = 512;
const MDA_HEADER: u64 = 512;
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
const INITIAL_CRC: u32 = 0xf597_a6cf;

/// LVM's checksum: CRC-32 (the usual polynomial) from LVM's initial value, not inverted.
fn lvm_crc(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(!INITIAL_CRC);
    for p in parts {
        h.update(p);
    }
    !h.finalize()
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A physical volume as its label and metadata areas describe it.
#[derive(Debug, Clone)]
pub struct PvInfo {
    /// The PV's UUID, 32 characters without dashes.
    pub uuid: String,
    /// Its data area, bytes from the PV's start: offset and end.
    pub data_start: u64,
    pub data_end: u64,
    /// The newest metadata of its areas: the sequence number, the VG's name and its section.
    pub metadata: Option<(i64, String, Section)>,
}

fn read(r: &mut dyn ReadAt, at: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    r.read_exact_at(at, &mut buf)
        .map_err(|e| format!("cannot read {len} bytes at byte {at}: {e}"))?;
    Ok(buf)
}

/// Reads the PV at bytes `start..start + len` of `r`.
pub fn read_pv(r: &mut dyn ReadAt, start: u64, len: u64) -> Result<PvInfo, String> {
    let n = (LABEL_SECTORS * SECTOR).min(len) as usize;
    let head = read(r, start, n)?;
    let mut found = None;
    for s in 0..LABEL_SECTORS as usize {
        let at = s * SECTOR as usize;
        if head.len() >= at + SECTOR as usize
            && &head[at..at + 8] == b"LABELONE"
            && &head[at + 24..at + 32] == b"LVM2 001"
        {
            found = Some((s, &head[at..at + SECTOR as usize]));
            break;
        }
    }
    let Some((s, label)) = found else {
        return Err("no LVM2 label in its first 4 sectors".into());
    };
    if le64(label, 8) != s as u64 {
        return Err(format!(
            "the label in sector {s} says it is in sector {}",
            le64(label, 8)
        ));
    }
    let crc = lvm_crc(&[&label[20..]]);
    if crc != le32(label, 16) {
        return Err(format!(
            "label checksum {:#010x} does not match its bytes ({crc:#010x})",
            le32(label, 16)
        ));
    }
    let off = le32(label, 20) as usize;
    // The PV header: a 32-byte UUID, the device size, then two lists of (offset, size) ended
    // by a zero entry: data areas, metadata areas. All of it inside the label's sector.
    if !(32..=SECTOR as usize - 40).contains(&off) {
        return Err(format!(
            "the PV header's offset {off} lies outside the label sector"
        ));
    }
    let uuid_bytes = &label[off..off + 32];
    if !uuid_bytes.iter().all(|c| c.is_ascii_alphanumeric()) {
        return Err("the PV UUID is not 32 letters and digits".into());
    }
    let uuid = String::from_utf8_lossy(uuid_bytes).into_owned();
    let mut at = off + 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for (i, list) in lists.iter_mut().enumerate() {
        loop {
            if at + 16 > SECTOR as usize {
                return Err("the PV header's area lists run past the label sector".into());
            }
            let (o, sz) = (le64(label, at), le64(label, at + 8));
            at += 16;
            if o == 0 {
                break;
            }
            if list.len() >= MAX_AREAS {
                return Err(format!(
                    "more than {MAX_AREAS} {} areas",
                    ["data", "metadata"][i]
                ));
            }
            list.push((o, sz));
        }
    }
    let [data, mdas] = lists;
    let Some(&(data_start, data_size)) = data.first() else {
        return Err("the PV header lists no data area".into());
    };
    let data_end = if data_size == 0 {
        len
    } else {
        data_start.saturating_add(data_size)
    };
    if data_start > len || data_end > len || data_end < data_start {
        return Err(format!(
            "its data area {data_start}..{data_end} lies outside the volume ({len} bytes)"
        ));
    }
    let mut metadata: Option<(i64, String, Section)> = None;
    let mut errors = Vec::new();
    for (i, &(mo, ms)) in mdas.iter().enumerate() {
        match read_mda(r, start, len, mo, ms) {
            Ok(Some(m)) => {
                if metadata.as_ref().is_none_or(|b| m.0 > b.0) {
                    metadata = Some(m);
                }
            }
            Ok(None) => {}
            Err(e) => errors.push(format!("metadata area {}: {e}", i + 1)),
        }
    }
    if metadata.is_none() && !errors.is_empty() {
        return Err(errors.join("; "));
    }
    Ok(PvInfo {
        uuid,
        data_start,
        data_end,
        metadata,
    })
}

/// Reads the committed metadata of the area at `mo` (`ms` bytes) of the PV at `start`.
fn read_mda(
    r: &mut dyn ReadAt,
    start: u64,
    len: u64,
    mo: u64,
    ms: u64,
) -> Result<Option<(i64, String, Section)>, String> {
    if ms <= MDA_HEADER || mo.checked_add(ms).is_none_or(|e| e > len) {
        return Err(format!(
            "bytes {mo}..+{ms} do not fit the volume ({len} bytes)"
        ));
    }
    let h = read(r, start + mo, MDA_HEADER as usize)?;
    let crc = lvm_crc(&[&h[4..]]);
    if crc != le32(&h, 0) {
        return Err(format!(
            "header checksum {:#010x} does not match its bytes ({crc:#010x})",
            le32(&h, 0)
        ));
    }
    if &h[4..20] != MDA_MAGIC || le32(&h, 20) != 1 {
        return Err("no LVM2 metadata header (magic or version 1)".into());
    }
    if le64(&h, 24) != mo || le64(&h, 32) != ms {
        return Err(format!(
            "the header says it is at {}..+{}, the PV header at {mo}..+{ms}",
            le64(&h, 24),
            le64(&h, 32)
        ));
    }
    // The first location is the committed metadata; flag 1 means "ignored".
    let (to, tsize, tcrc, flags) = (le64(&h, 40), le64(&h, 48), le32(&h, 56), le32(&h, 60));
    if to == 0 || flags & 1 != 0 {
        return Ok(None);
    }
    if tsize == 0 || tsize > MAX_METADATA {
        return Err(format!(
            "a metadata text of {tsize} bytes (at most {MAX_METADATA} are read)"
        ));
    }
    if to < MDA_HEADER || to >= ms || tsize > ms - MDA_HEADER {
        return Err(format!(
            "its text at {to}..+{tsize} does not fit the area of {ms} bytes"
        ));
    }
    // A circular buffer: the text may wrap to just after the header.
    let first = tsize.min(ms - to);
    let mut text = read(r, start + mo + to, first as usize)?;
    if first < tsize {
        text.extend(read(r, start + mo + MDA_HEADER, (tsize - first) as usize)?);
    }
    let crc = lvm_crc(&[&text]);
    if crc != tcrc {
        return Err(format!(
            "text checksum {tcrc:#010x} does not match its bytes ({crc:#010x})"
        ));
    }
    let top = text::parse(&text)?;
    let Some((name, vg)) = top
        .sections
        .into_iter()
        .find(|(_, s)| s.section("physical_volumes").is_some())
    else {
        return Err("the metadata text holds no volume group".into());
    };
    let seqno = vg
        .int("seqno")
        .ok_or_else(|| format!("volume group {name}: no seqno"))?;
    Ok(Some((seqno, name, vg)))
}

/// A physical volume found in a snapshot: where it is and what it says.
#[derive(Debug, Clone)]
pub struct PvFound {
    /// Index of the disk in the snapshot, its device and path-safe name.
    pub disk: usize,
    pub device: String,
    pub dev_path: String,
    /// Its volume's path (`/vda/part2`) and bytes on the disk.
    pub volume: String,
    pub start: u64,
    pub len: u64,
    pub info: PvInfo,
}

/// A logical volume: its path, the disk it is named under, size, extents (empty when it
/// cannot be read) and why it cannot be opened.
#[derive(Debug, Clone)]
pub struct LvFound {
    pub path: String,
    pub device: String,
    pub size: u64,
    pub extents: Vec<Extent>,
    pub reason: Option<String>,
}

/// What the LVM step says: the logical volumes, and a note for each PV volume (by its path).
#[derive(Debug, Default)]
pub struct Found {
    pub lvs: Vec<LvFound>,
    pub pv_notes: Vec<(String, String)>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 128
        && n != "."
        && n != ".."
        && !n.starts_with('-')
        && n.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'+'))
}

/// Groups the PVs into volume groups (by the VG id of their newest metadata) and finds their
/// logical volumes.
pub fn logical_volumes(pvs: &[PvFound]) -> Found {
    let mut out = Found::default();
    // Volume groups by id: the PV holding the newest metadata.
    let mut vgs: Vec<(String, usize)> = Vec::new();
    for (i, pv) in pvs.iter().enumerate() {
        let Some((seq, _, vg)) = &pv.info.metadata else {
            continue;
        };
        let id = vg.str("id").unwrap_or("").to_string();
        match vgs.iter_mut().find(|(v, _)| *v == id) {
            Some((_, best)) => {
                if pvs[*best]
                    .info
                    .metadata
                    .as_ref()
                    .is_some_and(|m| m.0 < *seq)
                {
                    *best = i;
                }
            }
            None => vgs.push((id, i)),
        }
    }
    let mut taken: Vec<String> = Vec::new();
    let mut explained = vec![false; pvs.len()];
    for (_, best) in vgs {
        let Some((_, name, vg)) = &pvs[best].info.metadata else {
            continue;
        };
        match volume_group(pvs, name, vg, &mut taken) {
            Ok((lvs, members, path)) => {
                for m in members {
                    explained[m] = true;
                    out.pv_notes.push((
                        pvs[m].volume.clone(),
                        format!(
                            "lvm2 physical volume of volume group {name}: its logical volumes \
                             are under {path}"
                        ),
                    ));
                }
                out.lvs.extend(lvs);
            }
            Err(e) => {
                for (i, pv) in pvs.iter().enumerate() {
                    if pv_in_vg(vg, &pv.info.uuid) {
                        explained[i] = true;
                        out.pv_notes.push((
                            pv.volume.clone(),
                            format!("lvm2 physical volume of volume group {name}: {e}"),
                        ));
                    }
                }
            }
        }
    }
    for (i, pv) in pvs.iter().enumerate() {
        if !explained[i] {
            out.pv_notes.push((
                pv.volume.clone(),
                "lvm2 physical volume: no volume group metadata found for it".into(),
            ));
        }
    }
    out
}

fn plain_uuid(s: &str) -> String {
    s.chars().filter(|c| *c != '-').collect()
}

fn pv_in_vg(vg: &Section, uuid: &str) -> bool {
    vg.section("physical_volumes").is_some_and(|p| {
        p.sections
            .iter()
            .take(MAX_PVS)
            .any(|(_, s)| s.str("id").is_some_and(|id| plain_uuid(id) == uuid))
    })
}

/// A VG's PV as its metadata lists it, and where it was found.
struct VgPv<'a> {
    name: String,
    uuid: String,
    pe_start: u64,
    pe_count: u64,
    found: Option<&'a PvFound>,
}

fn uint(s: &Section, key: &str, what: &str) -> Result<u64, String> {
    match s.int(key) {
        Some(v) if v >= 0 => Ok(v as u64),
        Some(v) => Err(format!("{what}: {key} is {v}")),
        None => Err(format!("{what}: no {key}")),
    }
}

type VgResult = (Vec<LvFound>, Vec<usize>, String);

fn volume_group(
    pvs: &[PvFound],
    name: &str,
    vg: &Section,
    taken: &mut Vec<String>,
) -> Result<VgResult, String> {
    if !valid_name(name) {
        return Err(format!("{name:?} is not a valid volume group name"));
    }
    let extent_sectors = uint(vg, "extent_size", "the volume group")?;
    let extent = extent_sectors
        .checked_mul(SECTOR)
        .filter(|&e| e > 0)
        .ok_or_else(|| format!("extent size of {extent_sectors} sectors"))?;
    let list = vg
        .section("physical_volumes")
        .ok_or("no physical_volumes")?;
    if list.sections.len() > MAX_PVS {
        return Err(format!("more than {MAX_PVS} physical volumes"));
    }
    let mut members = Vec::new();
    let mut vpvs = Vec::new();
    for (pv_name, s) in &list.sections {
        let what = format!("physical volume {pv_name}");
        let uuid = plain_uuid(s.str("id").ok_or(format!("{what}: no id"))?);
        let found = pvs.iter().position(|p| p.info.uuid == uuid);
        if let Some(i) = found {
            if !members.contains(&i) {
                members.push(i);
            }
        }
        vpvs.push(VgPv {
            name: pv_name.clone(),
            pe_start: uint(s, "pe_start", &what)?,
            pe_count: uint(s, "pe_count", &what)?,
            uuid,
            found: found.map(|i| &pvs[i]),
        });
    }
    let Some(home) = vpvs.iter().find_map(|p| p.found) else {
        return Err("none of its physical volumes was found".into());
    };
    let base = format!("/{}/lvm/{name}", home.dev_path);
    if taken.contains(&base) {
        return Err(format!(
            "another volume group named {name} is listed under /{}/lvm already",
            home.dev_path
        ));
    }
    taken.push(base.clone());
    let lv_list = vg.section("logical_volumes");
    let lv_sections = lv_list.map(|l| l.sections.as_slice()).unwrap_or(&[]);
    if lv_sections.len() > MAX_LVS {
        return Err(format!("more than {MAX_LVS} logical volumes"));
    }
    // Snapshots: their COW store is an LV of its own, written by a hidden `snapshot` segment.
    let mut cow: Vec<&str> = Vec::new();
    for (_, lv) in lv_sections {
        for (_, seg) in &lv.sections {
            if seg.str("type") == Some("snapshot") {
                if let Some(c) = seg.str("cow_store") {
                    cow.push(c);
                }
            }
        }
    }
    let mut lvs = Vec::new();
    for (lv_name, lv) in lv_sections {
        if !lv.has_flag("status", "VISIBLE") {
            continue;
        }
        let path = format!("{base}/{lv_name}");
        let mut found = LvFound {
            path,
            device: home.device.clone(),
            size: 0,
            extents: Vec::new(),
            reason: None,
        };
        if !valid_name(lv_name) {
            found.path = format!("{base}/lv{}", lvs.len());
            found.reason = Some(format!(
                "lvm: {lv_name:?} is not a valid logical volume name"
            ));
            lvs.push(found);
            continue;
        }
        match logical_volume(lv, extent, &vpvs, cow.contains(&lv_name.as_str())) {
            Ok((size, extents, reason)) => {
                found.size = size;
                found.extents = extents;
                found.reason = reason;
            }
            Err(e) => found.reason = Some(format!("lvm: logical volume {lv_name}: {e}")),
        }
        lvs.push(found);
    }
    Ok((lvs, members, base))
}

/// The size, extents (when it is linear and whole) and reason of one LV.
fn logical_volume(
    lv: &Section,
    extent: u64,
    pvs: &[VgPv],
    is_cow: bool,
) -> Result<(u64, Vec<Extent>, Option<String>), String> {
    let segs: Vec<&(String, Section)> = lv
        .sections
        .iter()
        .filter(|(n, _)| n.starts_with("segment"))
        .collect();
    if segs.is_empty() {
        return Err("no segments".into());
    }
    if segs.len() > MAX_SEGMENTS {
        return Err(format!("more than {MAX_SEGMENTS} segments"));
    }
    let mut parsed = Vec::with_capacity(segs.len());
    for (n, s) in &segs {
        parsed.push((
            n.as_str(),
            uint(s, "start_extent", n)?,
            uint(s, "extent_count", n)?,
            s,
        ));
    }
    parsed.sort_by_key(|p| p.1);
    let mut next = 0u64;
    let mut kind: Option<String> = None;
    for &(n, start, count, s) in &parsed {
        if start != next || count == 0 {
            return Err(format!(
                "{n} covers extents {start}..+{count}, not from {next} on"
            ));
        }
        next = start
            .checked_add(count)
            .ok_or_else(|| format!("{n}: extents overflow"))?;
        let ty = s.str("type").unwrap_or("");
        let not = match ty {
            "striped" => match s.int("stripe_count") {
                Some(1) => None,
                Some(k) => Some(format!(
                    "striped volumes ({k} stripes) are not supported yet"
                )),
                None => return Err(format!("{n}: no stripe_count")),
            },
            "thin" => Some("thin volumes are not supported yet".into()),
            "thin-pool" => Some("thin pools are not supported yet".into()),
            "mirror" => Some("mirror volumes are not supported yet".into()),
            t if t.starts_with("raid") => Some(format!("raid volumes ({t}) are not supported yet")),
            "cache" | "cache-pool" | "writecache" => {
                Some("cache volumes are not supported yet".into())
            }
            "snapshot" => Some("snapshot volumes are not supported yet".into()),
            t => Some(format!("{t:?} volumes are not supported yet")),
        };
        if kind.is_none() {
            kind = not;
        }
    }
    let size = next
        .checked_mul(extent)
        .ok_or("its size overflows 64 bits")?;
    if is_cow && kind.is_none() {
        kind = Some("snapshot volumes are not supported yet".into());
    }
    if let Some(k) = kind {
        return Ok((size, Vec::new(), Some(format!("lvm: {k}"))));
    }
    let mut extents = Vec::with_capacity(parsed.len());
    let mut missing = None;
    for &(n, start, count, s) in &parsed {
        let Some(Value::Array(st)) = s.get("stripes") else {
            return Err(format!("{n}: no stripes"));
        };
        let (pv_name, pe) = match st.as_slice() {
            [Value::Str(p), Value::Int(pe)] if *pe >= 0 => (p.as_str(), *pe as u64),
            _ => return Err(format!("{n}: stripes is not [\"pvN\", extent]")),
        };
        let pv = pvs
            .iter()
            .find(|p| p.name == pv_name)
            .ok_or_else(|| format!("{n}: no physical volume {pv_name} in the volume group"))?;
        let Some(f) = pv.found else {
            if missing.is_none() {
                missing = Some(format!(
                    "lvm: physical volume {pv_name} (UUID {}) of its volume group is missing \
                     from the snapshot",
                    pv.uuid
                ));
            }
            continue;
        };
        let bad = || {
            format!(
                "{n}: extents {pe}..+{count} of {pv_name} lie outside its data area \
                 ({} extents from sector {})",
                pv.pe_count, pv.pe_start
            )
        };
        if pe.checked_add(count).is_none_or(|e| e > pv.pe_count) {
            return Err(bad());
        }
        // Bytes from the PV's start; the whole segment inside the header's data area.
        let from = pv
            .pe_start
            .checked_mul(SECTOR)
            .and_then(|b| b.checked_add(pe.checked_mul(extent)?))
            .ok_or_else(bad)?;
        let len = count.checked_mul(extent).ok_or_else(bad)?;
        let to = from.checked_add(len).ok_or_else(bad)?;
        if from < f.info.data_start || to > f.info.data_end || to > f.len {
            return Err(bad());
        }
        extents.push(Extent {
            at: start * extent,
            disk: f.disk,
            offset: f.start + from,
            len,
        });
    }
    if let Some(m) = missing {
        return Ok((size, Vec::new(), Some(m)));
    }
    Ok((size, extents, None))
}

#[cfg(test)]
mod tests;
