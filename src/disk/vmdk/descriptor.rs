//! VMDK text descriptors: parsing the `key=value` lines and extent lines, and refusing the
//! descriptors this module must not read.
//!
//! Owns: [`Descriptor`] (createType, parentCID and the extent lines, in order), the parser
//! (`RW|RDONLY|NOACCESS <sectors> <TYPE> ["file name" [offset]]`, file names may hold spaces),
//! and [`check_descriptor`], which refuses streamOptimized, createTypes other than the flat,
//! VMFS and hosted sparse ones, and delta disks (parentCID other than ffffffff).
//! Must not: open extent files or decide extent placement (that is `vmdk.rs`), or trust a
//! number: a sector count or offset that does not parse is `Corrupt` naming the line.

use std::path::Path;

use super::super::{corrupt, unsupported, DiskError};

/// createType values whose extents this module can read.
const SUPPORTED_TYPES: &[&str] = &[
    "monolithicFlat",
    "twoGbMaxExtentFlat",
    "vmfs",
    "vmfsThin",
    "vmfsPreallocated",
    "vmfsEagerZeroedThick",
    "monolithicSparse",
    "twoGbMaxExtentSparse",
];

/// One extent line of a descriptor.
#[derive(Debug)]
pub(super) struct ExtentLine {
    pub(super) line: usize,
    pub(super) access: String,
    pub(super) sectors: u64,
    pub(super) kind: String,
    pub(super) file: Option<String>,
    pub(super) offset: u64,
}

/// The parts of a descriptor this module uses.
#[derive(Debug, Default)]
pub(super) struct Descriptor {
    pub(super) create_type: Option<String>,
    pub(super) parent_cid: Option<String>,
    pub(super) extents: Vec<ExtentLine>,
}

/// Splits the next whitespace-separated token off `s`.
fn token(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// Parses descriptor text. Unknown lines are ignored, as VMware and qemu do.
pub(super) fn parse_descriptor(path: &Path, text: &str) -> Result<Descriptor, DiskError> {
    let mut d = Descriptor::default();
    for (i, raw_line) in text.lines().enumerate() {
        let line = raw_line.trim();
        let lineno = i + 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (access, rest) = token(line);
        if matches!(access, "RW" | "RDONLY" | "NOACCESS") {
            d.extents.push(parse_extent(path, lineno, access, rest)?);
        } else if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().trim_matches('"').to_string();
            match key.trim() {
                "createType" => d.create_type = Some(value),
                "parentCID" => d.parent_cid = Some(value),
                _ => {}
            }
        }
    }
    Ok(d)
}

/// Parses the part of an extent line after its access mode:
/// `<sectors> <type> ["file name" [offset]]`.
fn parse_extent(
    path: &Path,
    line: usize,
    access: &str,
    rest: &str,
) -> Result<ExtentLine, DiskError> {
    let bad = |what: &str| corrupt(path, format!("descriptor line {line}: {what}"));
    let (sectors, rest) = token(rest);
    let sectors: u64 = sectors
        .parse()
        .map_err(|_| bad(&format!("extent size `{sectors}` is not a sector count")))?;
    let (kind, rest) = token(rest);
    if kind.is_empty() {
        return Err(bad("extent has no type"));
    }
    let rest = rest.trim_start();
    let (file, rest) = match rest.strip_prefix('"') {
        Some(quoted) => {
            let close = quoted
                .find('"')
                .ok_or_else(|| bad("extent file name has no closing quote"))?;
            (Some(quoted[..close].to_string()), &quoted[close + 1..])
        }
        None => (None, rest),
    };
    let (offset, _) = token(rest);
    let offset = if offset.is_empty() {
        0
    } else {
        offset
            .parse()
            .map_err(|_| bad(&format!("extent offset `{offset}` is not a sector number")))?
    };
    Ok(ExtentLine {
        line,
        access: access.to_string(),
        sectors,
        kind: kind.to_ascii_uppercase(),
        file,
        offset,
    })
}

/// Refuses descriptors this module must not read: unknown or unsupported createTypes and delta
/// disks. An embedded descriptor may lack a createType (the sparse header is authoritative there); a
/// text descriptor must have one.
pub(super) fn check_descriptor(
    path: &Path,
    d: &Descriptor,
    embedded: bool,
) -> Result<(), DiskError> {
    let create_type = match &d.create_type {
        Some(t) => t.as_str(),
        None if embedded => "monolithicSparse",
        None => return Err(corrupt(path, "descriptor has no createType")),
    };
    if create_type.eq_ignore_ascii_case("streamOptimized") {
        return Err(unsupported(
            path,
            "createType streamOptimized (compressed grains) cannot be read directly; convert it \
             to monolithicSparse or raw first",
        ));
    }
    if !SUPPORTED_TYPES
        .iter()
        .any(|t| t.eq_ignore_ascii_case(create_type))
    {
        return Err(unsupported(
            path,
            format!("VMDK createType {create_type} is not supported"),
        ));
    }
    if let Some(cid) = &d.parent_cid {
        if !cid.eq_ignore_ascii_case("ffffffff") {
            return Err(unsupported(
                path,
                format!("VMDK has a parent disk (parentCID={cid}); back up the consolidated disk"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::super::testutil::{
        assert_corrupt, assert_damage_never_panics, assert_unsupported, err, write_file,
    };
    use super::super::super::DiskSource;
    use super::super::VmdkDisk;
    use super::*;

    /// A descriptor like qemu-img writes, with `create_type` and the given extent lines.
    pub(in super::super) fn descriptor(create_type: &str, extents: &str) -> String {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
             createType=\"{create_type}\"\n\n# Extent description\n{extents}\n\n\
             # The Disk Data Base\n#DDB\nddb.adapterType = \"lsilogic\"\n"
        )
    }

    #[test]
    fn parses_keys_and_extent_lines() {
        let path = Path::new("d.vmdk");
        let text = descriptor(
            "vmfs",
            "RW 100 VMFS \"my disk-flat.vmdk\"\n  RDONLY 8 FLAT \"b.bin\" 16 extra\nRW 4 zero",
        )
        .replace("parentCID=ffffffff", "parentCID = \"FFFFFFFF\"");
        let d = parse_descriptor(path, &text).unwrap();
        assert_eq!(d.create_type.as_deref(), Some("vmfs"));
        assert_eq!(d.parent_cid.as_deref(), Some("FFFFFFFF"));
        let got: Vec<_> = d
            .extents
            .iter()
            .map(|e| {
                (
                    e.access.as_str(),
                    e.sectors,
                    e.kind.as_str(),
                    e.file.as_deref(),
                    e.offset,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("RW", 100, "VMFS", Some("my disk-flat.vmdk"), 0),
                ("RDONLY", 8, "FLAT", Some("b.bin"), 16),
                ("RW", 4, "ZERO", None, 0),
            ]
        );
        assert_eq!(d.extents[0].line, 8);
        check_descriptor(path, &d, false).unwrap();
        let embedded = parse_descriptor(path, "").unwrap();
        check_descriptor(path, &embedded, true).unwrap();
        assert_corrupt(
            &err(check_descriptor(path, &embedded, false)),
            path,
            "createType",
        );
    }

    #[test]
    fn unsupported_types_extents_and_delta_disks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "x.bin", &[0u8; 4096]);
        let cases = [
            ("vmfsSparse", "RW 8 VMFSSPARSE \"x.bin\"", "vmfsSparse"),
            ("seSparse", "RW 8 SESPARSE \"x.bin\"", "seSparse"),
            (
                "vmfsRawDeviceMap",
                "RW 8 VMFSRDM \"x.bin\"",
                "vmfsRawDeviceMap",
            ),
            ("vmfs", "RW 8 VMFSRDM \"x.bin\"", "VMFSRDM"),
            ("vmfs", "RW 8 VMFSSPARSE \"x.bin\"", "VMFSSPARSE"),
            ("vmfs", "NOACCESS 8 FLAT \"x.bin\" 0", "NOACCESS"),
            ("custom", "RW 8 FLAT \"x.bin\" 0", "custom"),
        ];
        for (i, (ty, ext, needle)) in cases.iter().enumerate() {
            let path = write_file(
                dir.path(),
                &format!("u{i}.vmdk"),
                descriptor(ty, ext).as_bytes(),
            );
            assert_unsupported(&err(VmdkDisk::open(&path)), &path, needle);
        }
        let delta = descriptor("monolithicFlat", "RW 8 FLAT \"x.bin\" 0")
            .replace("parentCID=ffffffff", "parentCID=1a2b3c4d");
        let path = write_file(dir.path(), "delta.vmdk", delta.as_bytes());
        let e = err(VmdkDisk::open(&path));
        assert_unsupported(&e, &path, "parent disk");
        assert!(e.to_string().contains("consolidated"), "{e}");
    }

    #[test]
    fn corrupt_descriptors_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "x.bin", &[0u8; 4096]);
        let cases = [
            (
                "RW 99999999999999999999999 FLAT \"x.bin\" 0",
                "sector count",
            ),
            ("RW 36028797018963968 FLAT \"x.bin\" 0", "overflow"),
            (
                "RW 18014398509481984 ZERO\nRW 18014398509481984 ZERO",
                "overflows",
            ),
            ("RW 1000000000 FLAT \"x.bin\" 0", "too short"),
            ("RW 8 FLAT \"x.bin\" 18446744073709551615", "too short"),
            ("RW 8 FLAT \"x.bin\" 1", "too short"),
            ("RW 8 FLAT \"x.bin", "closing quote"),
            ("RW 8 FLAT", "names no file"),
            ("RW 8 FLAT \"x.bin\" nope", "offset"),
            ("RW 8", "no type"),
            ("", "no extents"),
        ];
        for (i, (ext, needle)) in cases.iter().enumerate() {
            let path = write_file(
                dir.path(),
                &format!("c{i}.vmdk"),
                descriptor("monolithicFlat", ext).as_bytes(),
            );
            assert_corrupt(&err(VmdkDisk::open(&path)), &path, needle);
        }
        let untyped = write_file(dir.path(), "untyped.vmdk", b"RW 8 ZERO\n");
        assert_corrupt(&err(VmdkDisk::open(&untyped)), &untyped, "createType");
        let big = write_file(dir.path(), "big.vmdk", &vec![b'#'; 2 << 20]);
        assert_corrupt(&err(VmdkDisk::open(&big)), &big, "descriptor");
    }

    #[test]
    fn damaged_descriptors_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        write_file(dir.path(), "a.bin", &[5u8; 64 * 512]);
        let text = descriptor(
            "monolithicFlat",
            "RW 32 FLAT \"a.bin\" 0\nRW 16 ZERO\nRW 32 FLAT \"a.bin\" 32",
        );
        let bytes = text.as_bytes();
        let start = text.find("RW 32").unwrap();
        let ranges = [0..bytes.len(), start..start + 60];
        let opened = assert_damage_never_panics(dir.path(), bytes, &ranges, 300, |p| {
            VmdkDisk::open(p).map(|d| Box::new(d) as Box<dyn DiskSource>)
        });
        assert!(opened > 10, "only {opened} damaged copies opened");
    }
}
