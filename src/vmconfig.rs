//! VM configuration files: VMware `.vmx` and libvirt domain XML.
//!
//! Owns: parsing a config into the facts a backup needs ([`VmConfig`]: name, identity, hypervisor
//! kind, the disks it refers to) and rewriting a config for a live mount ([`rewrite_for_mount`]).
//! Must not: do I/O. Callers read the file and hand over its bytes; paths in the result are as the
//! config writes them, resolving them against a folder is the caller's business.

mod convert;
mod libvirt;
mod libvirt_rewrite;
mod rewrite;
mod vmx;
mod vmx_rewrite;

pub use convert::{Conversion, DeviceReport, DiskBus, NicModel};
pub use rewrite::{
    check_network_map, rewrite_for_mount, rewrite_for_mount_reported, DiskTarget, MountRewrite,
    NetworkMode, NetworkPlan, NicAction, NicReport, Rewritten,
};

/// Which hypervisor a config belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hypervisor {
    Esxi,
    Kvm,
}

impl std::fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hypervisor::Esxi => "esxi",
            Hypervisor::Kvm => "kvm",
        })
    }
}

/// Errors from parsing a config. `file` is the name the caller gave for messages.
#[derive(Debug, thiserror::Error)]
pub enum VmConfigError {
    #[error("{file}: not a VMware .vmx or libvirt domain XML file")]
    UnknownKind { file: String },
    #[error("{file}: line {line}: {what}")]
    Vmx {
        file: String,
        line: usize,
        what: String,
    },
    #[error("{file}: {what}")]
    Xml { file: String, what: String },
    #[error("{file}: {what}")]
    Invalid { file: String, what: String },
}

/// One virtual disk a config refers to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskRef {
    /// Where the disk is attached: `scsi0:0`, `sata0:1`, `ide0:0`, `nvme0:0` for .vmx; the target
    /// device (`vda`, `sdb`) for libvirt.
    pub device: String,
    /// The path exactly as the config writes it (a `.vmdk` descriptor for .vmx; the
    /// `<source file=...>` for libvirt). Relative paths are relative to the config's folder.
    pub path: String,
    /// The format the config declares, if it declares one (libvirt `<driver type=...>`: `raw`,
    /// `qcow2`, `vmdk`). None for .vmx, whose disks are always VMDK descriptors.
    pub declared_format: Option<crate::disk::DiskFormat>,
}

/// What a backup needs to know of a VM's config.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub hypervisor: Hypervisor,
    /// Display name (`displayName` / `<name>`).
    pub name: String,
    /// The VM's identity: `uuid.bios` for .vmx (normalised to the 8-4-4-4-12 lowercase form),
    /// `<uuid>` for libvirt. None when the config has none.
    pub uuid: Option<String>,
    /// Disks in the config's order: document order for libvirt; for .vmx (whose keys have no
    /// meaningful order) by controller type (scsi, sata, ide, nvme), then bus, then unit number.
    /// CD-ROMs, floppies and devices marked not present are left out.
    pub disks: Vec<DiskRef>,
}

/// Parses a config, telling .vmx from libvirt XML by content. `file` names the config in errors.
///
/// Content that starts (after an optional UTF-8 byte order mark, whitespace, an XML declaration,
/// processing instructions, comments or a doctype) with a `<domain` element is libvirt domain
/// XML; other XML is [`VmConfigError::UnknownKind`]; anything else is read as a `.vmx`.
pub fn parse(file: &str, bytes: &[u8]) -> Result<VmConfig, VmConfigError> {
    if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
        return Err(VmConfigError::Invalid {
            file: file.to_owned(),
            what: "the file is UTF-16; livemount reads VM configs as UTF-8".to_owned(),
        });
    }
    match sniff(bytes) {
        Kind::Libvirt => libvirt::parse(file, bytes),
        Kind::OtherXml => Err(VmConfigError::UnknownKind {
            file: file.to_owned(),
        }),
        Kind::NotXml => vmx::parse(file, bytes),
    }
}

/// What the start of a config's bytes looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// XML whose first element is `<domain`.
    Libvirt,
    /// Markup, but not a libvirt domain.
    OtherXml,
    /// No markup at the start: a `.vmx`, or nothing we know.
    NotXml,
}

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Looks past the XML prolog (declaration, processing instructions, comments, doctype) for the
/// first element. Only looks; well-formedness is the XML parser's business.
fn sniff(bytes: &[u8]) -> Kind {
    let mut rest = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    loop {
        rest = rest.trim_ascii_start();
        if !rest.starts_with(b"<") {
            return Kind::NotXml;
        }
        let skip_to = if rest.starts_with(b"<?") {
            find(rest, b"?>").map(|at| at + 2)
        } else if rest.starts_with(b"<!--") {
            find(rest, b"-->").map(|at| at + 3)
        } else if rest.starts_with(b"<!") {
            find(rest, b">").map(|at| at + 1)
        } else {
            let after = &rest[1..];
            let is_domain = after.strip_prefix(b"domain").is_some_and(|tail| {
                matches!(
                    tail.first(),
                    Some(b' ' | b'\t' | b'\r' | b'\n' | b'>' | b'/') | None
                )
            });
            return if is_domain {
                Kind::Libvirt
            } else {
                Kind::OtherXml
            };
        };
        match skip_to {
            Some(at) => rest = &rest[at..],
            None => return Kind::OtherXml,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Formats 32 hex digits as a lowercase 8-4-4-4-12 UUID; None unless `hex` is exactly 32 ASCII
/// hex digits.
fn dashed_uuid(hex: &str) -> Option<String> {
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let hex = hex.to_ascii_lowercase();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_tells_kinds_apart() {
        assert_eq!(sniff(b"<domain type='kvm'>"), Kind::Libvirt);
        assert_eq!(sniff(b"<domain>"), Kind::Libvirt);
        assert_eq!(sniff(b"<domain/>"), Kind::Libvirt);
        assert_eq!(
            sniff(b"\xEF\xBB\xBF  \n<?xml version='1.0' encoding='UTF-8'?>\n<!-- WARNING: THIS IS AN AUTO-GENERATED FILE -->\n<!DOCTYPE domain>\n<domain type='qemu'>"),
            Kind::Libvirt
        );
        assert_eq!(sniff(b"<domains>"), Kind::OtherXml);
        assert_eq!(
            sniff(b"<network><name>default</name></network>"),
            Kind::OtherXml
        );
        assert_eq!(
            sniff(b"<?xml version='1.0'?><!-- never closed"),
            Kind::OtherXml
        );
        assert_eq!(sniff(b".encoding = \"UTF-8\"\n"), Kind::NotXml);
        assert_eq!(sniff(b"# <domain>\n"), Kind::NotXml);
        assert_eq!(sniff(b""), Kind::NotXml);
    }

    #[test]
    fn parse_dispatches_on_content() {
        let vmx = parse("a.vmx", b"displayName = \"a\"\n").unwrap();
        assert_eq!(vmx.hypervisor, Hypervisor::Esxi);
        let xml = parse(
            "a.xml",
            b"<?xml version='1.0'?>\n<domain type='kvm'><name>a</name></domain>\n",
        )
        .unwrap();
        assert_eq!(xml.hypervisor, Hypervisor::Kvm);
    }

    #[test]
    fn empty_input_is_unknown_kind() {
        for input in [&b""[..], b"\n\n", b"   ", b"\xEF\xBB\xBF"] {
            let err = parse("empty.vmx", input).unwrap_err();
            assert!(
                matches!(&err, VmConfigError::UnknownKind { file } if file == "empty.vmx"),
                "{input:?}: {err:?}"
            );
        }
    }

    #[test]
    fn other_xml_is_unknown_kind() {
        let err = parse("net.xml", b"<network><name>default</name></network>").unwrap_err();
        assert!(matches!(err, VmConfigError::UnknownKind { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "net.xml: not a VMware .vmx or libvirt domain XML file"
        );
    }

    #[test]
    fn binary_junk_is_unknown_kind() {
        let err = parse("disk.img", b"\x00\x01QFI\xfb\x00\x00\x00\x03\xff\xfe").unwrap_err();
        assert!(matches!(err, VmConfigError::UnknownKind { .. }), "{err:?}");
        let err = parse("notes.txt", b"just some notes\nabout a VM\n").unwrap_err();
        assert!(matches!(err, VmConfigError::UnknownKind { .. }), "{err:?}");
    }

    #[test]
    fn utf16_is_a_clear_error() {
        let err = parse("win.vmx", b"\xFF\xFEd\x00i\x00").unwrap_err();
        assert_eq!(
            err.to_string(),
            "win.vmx: the file is UTF-16; livemount reads VM configs as UTF-8"
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics_on_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = parse("p", &bytes);
        }

        #[test]
        fn parse_never_panics_on_vmx_like_lines(
            lines in proptest::collection::vec(
                proptest::sample::select(vec![
                    "displayName = \"x\"", "scsi0:0.fileName = \"a.vmdk\"", "scsi0.present = \"FALSE\"",
                    "nvme0:1.deviceType = \"disk\"", "uuid.bios = \"56 4d\"", "# c", "", "=", "\"",
                    "a = \"|\"", "a = \"|2\"", "a = \"|C3\"", "k=\"v\" x", "\u{e9} = \"\u{e9}\"", "\r",
                    "ide0:99999999999.fileName = \"b.vmdk\"", "sata1:2.present = \"0\"",
                ]),
                0..20,
            )
        ) {
            let _ = parse("p.vmx", lines.join("\n").as_bytes());
        }

        #[test]
        fn parse_never_panics_on_xml_like_fragments(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "<domain>", "</domain>", "<name>", "</name>", "<uuid>", "</uuid>", "<devices>",
                    "</devices>", "<disk type='file' device='disk'>", "<disk type='block'>", "</disk>",
                    "<source file='/a'/>", "<source dev='/d'/>", "<driver type='qcow2'/>",
                    "<driver type='qed'/>", "<target dev='vda'/>", "<backingStore>", "</backingStore>",
                    "&amp;", "&", "&#x41;", "&#0;", "&nope;", "<![CDATA[x]]>", "<!-- c -->", "<?pi?>",
                    "text", " ", "\n", "<a b=c>", "<a b='1' b='2'/>", "<", ">", "'", "\u{e9}",
                ]),
                0..30,
            )
        ) {
            let mut text = "<domain type='kvm'>".to_owned();
            text.push_str(&parts.concat());
            let _ = parse("p.xml", text.as_bytes());
        }
    }

    #[test]
    fn dashed_uuid_formats_and_rejects() {
        assert_eq!(
            dashed_uuid("564D123456789ABCDEF0123456789ABC").as_deref(),
            Some("564d1234-5678-9abc-def0-123456789abc")
        );
        assert_eq!(dashed_uuid("564d123456789abcdef0123456789ab"), None);
        assert_eq!(dashed_uuid("564d123456789abcdef0123456789abg"), None);
        assert_eq!(dashed_uuid("564d1234-5678-9abc-def0-123456789abc"), None);
    }
}
