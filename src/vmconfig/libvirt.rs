//! libvirt domain XML (what `virsh dumpxml` prints): the facts a backup needs.
//!
//! Owns: reading `<domain>` with quick-xml — `<name>`, `<uuid>`, and the `<disk>` elements
//! directly under `<devices>` (their `type`/`device` attributes and their own `<source>`,
//! `<driver>` and `<target>` children, never those of a `<backingStore>`) — and the rules for
//! which disks livemount can take (file disks with a raw, qcow2 or vmdk driver type; CD-ROMs,
//! floppies and LUNs are left out; block, network and volume disks are refused with advice).
//! Must not: do I/O, resolve paths, or care about anything else in the document (metadata,
//! other devices, unknown elements and namespaces are read past, only checked for being
//! well-formed).

use quick_xml::encoding::Decoder;
use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::attributes::AttrError;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::{dashed_uuid, DiskRef, Hypervisor, VmConfig, VmConfigError};
use crate::disk::DiskFormat;

/// Reads libvirt domain XML into a [`VmConfig`].
pub(crate) fn parse(file: &str, bytes: &[u8]) -> Result<VmConfig, VmConfigError> {
    let text = std::str::from_utf8(bytes).map_err(|err| VmConfigError::Xml {
        file: file.to_owned(),
        what: format!(
            "not valid UTF-8 at {}; livemount reads libvirt XML as UTF-8",
            position(bytes, err.valid_up_to())
        ),
    })?;
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let domain = read_domain(file, text)?;

    let invalid = |what: String| VmConfigError::Invalid {
        file: file.to_owned(),
        what,
    };
    let name = match domain.name {
        Some(name) if !name.is_empty() => name,
        Some(_) => return Err(invalid("<name> is empty".to_owned())),
        None => {
            return Err(invalid(
                "no <name>: the domain XML does not name its VM".to_owned(),
            ))
        }
    };
    let uuid = match domain.uuid {
        None => None,
        Some(raw) => Some(domain_uuid(&raw).ok_or_else(|| {
            invalid(format!(
                "<uuid> {raw:?} is not a UUID (expected 8-4-4-4-12 or 32 hex digits)"
            ))
        })?),
    };
    let disks = domain
        .disks
        .iter()
        .enumerate()
        .filter_map(|(index, disk)| disk.to_disk_ref(index).map_err(invalid).transpose())
        .collect::<Result<Vec<_>, _>>()?;

    Ok(VmConfig {
        hypervisor: Hypervisor::Kvm,
        name,
        uuid,
        disks,
    })
}

/// Normalises a libvirt `<uuid>`: 8-4-4-4-12 or 32 hex digits, to lowercase 8-4-4-4-12.
fn domain_uuid(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let dashed = bytes.len() == 36
        && [8, 13, 18, 23].iter().all(|&at| bytes[at] == b'-')
        && raw.bytes().filter(|&b| b == b'-').count() == 4;
    if dashed {
        dashed_uuid(&raw.replace('-', ""))
    } else {
        dashed_uuid(raw)
    }
}

/// What the document says, before any judgement on it.
#[derive(Debug, Default)]
struct DomainXml {
    /// Text of the first `<name>`, trimmed.
    name: Option<String>,
    /// Text of the first `<uuid>`, trimmed.
    uuid: Option<String>,
    disks: Vec<DiskXml>,
}

/// One `<disk>` under `<devices>`, as written.
#[derive(Debug, Default)]
struct DiskXml {
    /// `type=`: file, block, network, volume, dir, ... (absent means file, as in libvirt).
    kind: Option<String>,
    /// `device=`: disk, cdrom, floppy, lun (absent means disk, as in libvirt).
    device: Option<String>,
    /// Attributes of the disk's own `<source>`, in document order.
    source: Option<Vec<(String, String)>>,
    /// `<driver type=...>`.
    driver_type: Option<String>,
    /// `<target dev=...>`.
    target_dev: Option<String>,
}

impl DiskXml {
    /// The disk livemount backs up, None for devices it leaves out (CD-ROM, floppy, LUN), or a
    /// description of why it cannot take this disk. `index` counts `<disk>` elements from 0.
    fn to_disk_ref(&self, index: usize) -> Result<Option<DiskRef>, String> {
        let device = self.device.as_deref().unwrap_or("disk");
        match device {
            "cdrom" | "floppy" | "lun" => return Ok(None),
            "disk" => {}
            other => {
                return Err(format!(
                    "{} has device='{other}', which livemount does not know",
                    self.label(index)
                ))
            }
        }
        let Some(dev) = self.target_dev.as_deref().filter(|dev| !dev.is_empty()) else {
            return Err(format!("{} has no <target dev=...>", self.label(index)));
        };
        let kind = self.kind.as_deref().unwrap_or("file");
        if kind != "file" {
            return Err(format!(
                "disk {dev} is a type='{kind}' disk ({}); livemount backs up file disks only, \
                 so pass --disk PATH to give a file holding its data",
                self.describe_source()
            ));
        }
        let Some(path) = self
            .source_attribute("file")
            .filter(|path| !path.is_empty())
        else {
            return Err(format!("disk {dev} has no <source file=...>"));
        };
        let declared_format = match self.driver_type.as_deref() {
            None => None,
            Some("raw") => Some(DiskFormat::Raw),
            Some("qcow2") => Some(DiskFormat::Qcow2),
            Some("vmdk") => Some(DiskFormat::Vmdk),
            Some(other) => {
                return Err(format!(
                    "disk {dev} ({path}) has driver type '{other}'; livemount reads raw, qcow2 \
                     and vmdk disks only"
                ))
            }
        };
        Ok(Some(DiskRef {
            device: dev.to_owned(),
            path: path.to_owned(),
            declared_format,
        }))
    }

    fn source_attribute(&self, name: &str) -> Option<&str> {
        self.source
            .as_ref()?
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// `source dev='/dev/vg/lv'`, `source protocol='rbd' name='pool/image'`, or `no source`.
    fn describe_source(&self) -> String {
        match &self.source {
            None => "no source".to_owned(),
            Some(attributes) => {
                let mut out = "source".to_owned();
                for (key, value) in attributes.iter().filter(|(key, _)| key != "index") {
                    out.push_str(&format!(" {key}='{value}'"));
                }
                out
            }
        }
    }

    /// Names a disk that has no usable target: by its source file if it has one, else by its
    /// place among the `<disk>` elements.
    fn label(&self, index: usize) -> String {
        match self.source_attribute("file") {
            Some(path) => format!("the disk with source file '{path}'"),
            None => format!("disk #{} (counting <disk> elements from 1)", index + 1),
        }
    }
}

/// Where the reader is, by the element it is inside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Domain,
    Name,
    Uuid,
    Devices,
    Disk,
    /// Anything else, and everything inside it.
    Elsewhere,
}

/// Runs quick-xml over the document and keeps what [`DomainXml`] holds. Errors are
/// [`VmConfigError::Xml`] (with line and column) for malformed XML, and
/// [`VmConfigError::UnknownKind`] when the root element is not `<domain>`.
fn read_domain(file: &str, text: &str) -> Result<DomainXml, VmConfigError> {
    let xml_error = |offset: u64, what: String| VmConfigError::Xml {
        file: file.to_owned(),
        what: format!(
            "malformed XML at {}: {what}",
            position(
                text.as_bytes(),
                usize::try_from(offset).unwrap_or(usize::MAX)
            )
        ),
    };
    let mut reader = Reader::from_str(text);
    let decoder = reader.decoder();
    let mut domain = DomainXml::default();
    // Open elements: where each puts the reader, and its name for messages.
    let mut open: Vec<(Place, String)> = Vec::new();
    let mut root_seen = false;
    // Character data of the `<name>` or `<uuid>` being read.
    let mut collected = String::new();

    loop {
        let at = reader.buffer_position();
        let event = reader
            .read_event()
            .map_err(|err| xml_error(reader.error_position(), err.to_string()))?;
        let inside = open.last().map(|(place, _)| *place);
        match event {
            Event::Start(element) => {
                let (place, name) = enter(&element, inside, root_seen, &mut domain, decoder, file)
                    .map_err(|err| err.into_error(at, xml_error))?;
                root_seen = true;
                if matches!(place, Place::Name | Place::Uuid) {
                    collected.clear();
                }
                open.push((place, name));
            }
            Event::Empty(element) => {
                let (place, _) = enter(&element, inside, root_seen, &mut domain, decoder, file)
                    .map_err(|err| err.into_error(at, xml_error))?;
                root_seen = true;
                if matches!(place, Place::Name | Place::Uuid) {
                    collected.clear();
                }
                leave(place, &mut domain, &mut collected);
            }
            Event::End(_) => {
                // quick-xml has checked that the end tag matches its start tag.
                if let Some((place, _)) = open.pop() {
                    leave(place, &mut domain, &mut collected);
                }
            }
            Event::Text(content) => {
                let content = content
                    .decode()
                    .map_err(|err| xml_error(at, err.to_string()))?;
                if inside.is_none() && !content.trim().is_empty() {
                    return Err(xml_error(at, "text outside the root element".to_owned()));
                }
                if matches!(inside, Some(Place::Name | Place::Uuid)) {
                    collected.push_str(&content);
                }
            }
            Event::CData(content) => {
                let content = content
                    .decode()
                    .map_err(|err| xml_error(at, err.to_string()))?;
                if matches!(inside, Some(Place::Name | Place::Uuid)) {
                    collected.push_str(&content);
                }
            }
            Event::GeneralRef(reference) => {
                let resolved = match reference
                    .resolve_char_ref()
                    .map_err(|err| xml_error(at, err.to_string()))?
                {
                    Some(ch) => ch.to_string(),
                    None => {
                        let entity = reference
                            .decode()
                            .map_err(|err| xml_error(at, err.to_string()))?;
                        resolve_xml_entity(&entity)
                            .ok_or_else(|| xml_error(at, format!("unknown entity &{entity};")))?
                            .to_owned()
                    }
                };
                if matches!(inside, Some(Place::Name | Place::Uuid)) {
                    collected.push_str(&resolved);
                }
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if let Some((_, name)) = open.last() {
        return Err(xml_error(
            reader.buffer_position(),
            format!("the document ends inside <{name}>"),
        ));
    }
    if !root_seen {
        return Err(xml_error(
            reader.buffer_position(),
            "no root element".to_owned(),
        ));
    }
    Ok(domain)
}

/// Why an element could not be entered.
enum EnterError {
    /// Malformed XML, with the byte offset of the problem counted from just after the tag's
    /// `<` if known (else the tag itself is the place to point at).
    Xml(Option<usize>, String),
    /// The root element is not `<domain>`.
    NotDomain(VmConfigError),
}

impl EnterError {
    /// The error, for a tag whose `<` is at byte `tag_at`; `xml` makes a positioned Xml error.
    fn into_error(
        self,
        tag_at: u64,
        xml: impl FnOnce(u64, String) -> VmConfigError,
    ) -> VmConfigError {
        match self {
            EnterError::Xml(None, what) => xml(tag_at, what),
            EnterError::Xml(Some(offset), what) => {
                let offset = u64::try_from(offset).unwrap_or(u64::MAX);
                xml(tag_at.saturating_add(1).saturating_add(offset), what)
            }
            EnterError::NotDomain(err) => err,
        }
    }
}

/// Handles a start (or empty) tag found `inside` a place (None: at the top level): records what
/// it says, returns where it puts the reader and the element's name.
fn enter(
    element: &BytesStart<'_>,
    inside: Option<Place>,
    root_seen: bool,
    domain: &mut DomainXml,
    decoder: Decoder,
    file: &str,
) -> Result<(Place, String), EnterError> {
    let name = decoder
        .decode(element.name().as_ref())
        .map_err(|err| EnterError::Xml(None, err.to_string()))?
        .into_owned();
    // Read every element's attributes so that malformed ones anywhere are reported.
    let attributes = attributes(element, decoder)?;
    let attribute = |key: &str| {
        attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, value)| value.clone())
    };
    let place = match (inside, name.as_str()) {
        (None, _) if root_seen => {
            return Err(EnterError::Xml(
                None,
                format!("a second root element <{name}>"),
            ))
        }
        (None, "domain") => Place::Domain,
        (None, _) => {
            return Err(EnterError::NotDomain(VmConfigError::UnknownKind {
                file: file.to_owned(),
            }))
        }
        (Some(Place::Domain), "name") => Place::Name,
        (Some(Place::Domain), "uuid") => Place::Uuid,
        (Some(Place::Domain), "devices") => Place::Devices,
        (Some(Place::Devices), "disk") => {
            domain.disks.push(DiskXml {
                kind: attribute("type"),
                device: attribute("device"),
                ..DiskXml::default()
            });
            Place::Disk
        }
        (Some(Place::Disk), child) => {
            if let Some(disk) = domain.disks.last_mut() {
                match child {
                    "source" if disk.source.is_none() => disk.source = Some(attributes.clone()),
                    "driver" if disk.driver_type.is_none() => disk.driver_type = attribute("type"),
                    "target" if disk.target_dev.is_none() => disk.target_dev = attribute("dev"),
                    _ => {}
                }
            }
            Place::Elsewhere
        }
        _ => Place::Elsewhere,
    };
    Ok((place, name))
}

/// Handles the end of an element that put the reader at `place`.
fn leave(place: Place, domain: &mut DomainXml, collected: &mut String) {
    let slot = match place {
        Place::Name => &mut domain.name,
        Place::Uuid => &mut domain.uuid,
        _ => return,
    };
    if slot.is_none() {
        *slot = Some(collected.trim().to_owned());
    }
    collected.clear();
}

/// An element's attributes, decoded and with entities resolved, in document order. Err for
/// malformed or duplicate attributes.
fn attributes(
    element: &BytesStart<'_>,
    decoder: Decoder,
) -> Result<Vec<(String, String)>, EnterError> {
    let mut out = Vec::new();
    for attribute in element.attributes() {
        let attribute = attribute.map_err(|err| {
            let (offset, what) = match err {
                AttrError::ExpectedEq(at) => (at, "an attribute name without `=`".to_owned()),
                AttrError::ExpectedValue(at) => (at, "`=` without an attribute value".to_owned()),
                AttrError::UnquotedValue(at) => (at, "an attribute value not in quotes".to_owned()),
                AttrError::ExpectedQuote(at, quote) => (
                    at,
                    format!(
                        "an attribute value without its closing {}",
                        char::from(quote)
                    ),
                ),
                AttrError::Duplicated(at, _) => (at, "a duplicated attribute".to_owned()),
            };
            EnterError::Xml(Some(offset), what)
        })?;
        let key = decoder
            .decode(attribute.key.as_ref())
            .map_err(|err| EnterError::Xml(None, err.to_string()))?
            .into_owned();
        let value = attribute
            .decode_and_unescape_value_with(decoder, resolve_xml_entity)
            .map_err(|err| EnterError::Xml(None, format!("attribute {key}: {err}")))?
            .into_owned();
        out.push((key, value));
    }
    Ok(out)
}

/// `line L, column C` (both from 1; columns count characters) of a byte offset.
fn position(bytes: &[u8], offset: usize) -> String {
    let before = &bytes[..offset.min(bytes.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |at| at + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count()
        + 1;
    format!("line {line}, column {column}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const UBUNTU: &[u8] = include_bytes!("../../testdata/kvm-ubuntu2204-db01.xml");
    const RHEL_BLOCK: &[u8] = include_bytes!("../../testdata/kvm-rhel9-app02-block.xml");

    fn domain_with_devices(devices: &str) -> String {
        format!(
            "<domain type='kvm'>\n  <name>t</name>\n  <devices>\n{devices}\n  </devices>\n</domain>\n"
        )
    }

    fn invalid(input: &str) -> String {
        match parse("t.xml", input.as_bytes()) {
            Err(VmConfigError::Invalid { file, what }) => {
                assert_eq!(file, "t.xml");
                what
            }
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    fn xml_error(input: &[u8]) -> String {
        match parse("t.xml", input) {
            Err(VmConfigError::Xml { file, what }) => {
                assert_eq!(file, "t.xml");
                what
            }
            other => panic!("expected an Xml error, got {other:?}"),
        }
    }

    #[test]
    fn ubuntu_guest_as_virsh_dumpxml_prints_it() {
        let config = super::super::parse("ubuntu22.04-db01.xml", UBUNTU).unwrap();
        assert_eq!(
            config,
            VmConfig {
                hypervisor: Hypervisor::Kvm,
                name: "ubuntu22.04-db01".to_owned(),
                uuid: Some("3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05".to_owned()),
                disks: vec![
                    DiskRef {
                        device: "vda".to_owned(),
                        path: "/var/lib/libvirt/images/ubuntu22.04-db01.qcow2".to_owned(),
                        declared_format: Some(DiskFormat::Qcow2),
                    },
                    DiskRef {
                        device: "vdb".to_owned(),
                        path: "/srv/vmdata/db01-pgdata.img".to_owned(),
                        declared_format: Some(DiskFormat::Raw),
                    },
                ],
            }
        );
    }

    #[test]
    fn block_disk_is_refused_with_advice() {
        let err = super::super::parse("rhel9-app02.xml", RHEL_BLOCK).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rhel9-app02.xml: disk vdb is a type='block' disk (source \
             dev='/dev/vg_guests/rhel9-app02-data'); livemount backs up file disks only, so pass \
             --disk PATH to give a file holding its data"
        );
        assert!(matches!(err, VmConfigError::Invalid { .. }));
    }

    #[test]
    fn network_and_volume_disks_are_refused() {
        let what = invalid(&domain_with_devices(
            "<disk type='network' device='disk'><driver name='qemu' type='raw'/>\
             <source protocol='rbd' name='libvirt-pool/app03-data'><host name='ceph-mon1' port='6789'/></source>\
             <target dev='vdc' bus='virtio'/></disk>",
        ));
        assert_eq!(
            what,
            "disk vdc is a type='network' disk (source protocol='rbd' \
             name='libvirt-pool/app03-data'); livemount backs up file disks only, so pass \
             --disk PATH to give a file holding its data"
        );
        let what = invalid(&domain_with_devices(
            "<disk type='volume' device='disk'><source pool='default' volume='app03.qcow2'/>\
             <target dev='sdb' bus='scsi'/></disk>",
        ));
        assert_eq!(
            what,
            "disk sdb is a type='volume' disk (source pool='default' volume='app03.qcow2'); \
             livemount backs up file disks only, so pass --disk PATH to give a file holding its \
             data"
        );
    }

    #[test]
    fn cdrom_floppy_and_lun_are_skipped() {
        let config = parse(
            "t.xml",
            domain_with_devices(
                "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>\
                 <source file='/iso/x.iso'/><target dev='sda' bus='sata'/><readonly/></disk>\
                 <disk type='file' device='cdrom'><target dev='sdb' bus='sata'/></disk>\
                 <disk type='file' device='floppy'><source file='/img/f.img'/><target dev='fda'/></disk>\
                 <disk type='block' device='lun'><source dev='/dev/sdc'/><target dev='sdc' bus='scsi'/></disk>\
                 <disk type='file' device='disk'><source file='/img/d.img'/><target dev='vda' bus='virtio'/></disk>",
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            config.disks,
            vec![DiskRef {
                device: "vda".to_owned(),
                path: "/img/d.img".to_owned(),
                declared_format: None,
            }]
        );
    }

    #[test]
    fn defaults_and_document_order() {
        // No type= means file and no device= means disk, as in libvirt; no driver type: None.
        let config = parse(
            "t.xml",
            domain_with_devices(
                "<disk><source file='/img/z.vmdk'/><driver name='qemu' type='vmdk'/><target dev='vdz'/></disk>\
                 <disk type='file'><target dev='vda'/><source file='/img/a.img'/></disk>",
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            config.disks,
            vec![
                DiskRef {
                    device: "vdz".to_owned(),
                    path: "/img/z.vmdk".to_owned(),
                    declared_format: Some(DiskFormat::Vmdk),
                },
                DiskRef {
                    device: "vda".to_owned(),
                    path: "/img/a.img".to_owned(),
                    declared_format: None,
                },
            ]
        );
        assert_eq!(config.uuid, None);
    }

    #[test]
    fn backing_store_does_not_leak_into_the_disk() {
        let config = parse(
            "t.xml",
            domain_with_devices(
                "<disk type='file' device='disk'>\
                 <backingStore type='file'><format type='qcow2'/><source file='/img/base.qcow2'/>\
                 <target dev='bogus'/><backingStore/></backingStore>\
                 <driver name='qemu' type='qcow2'/><source file='/img/top.qcow2'/>\
                 <target dev='vda' bus='virtio'/></disk>",
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            config.disks,
            vec![DiskRef {
                device: "vda".to_owned(),
                path: "/img/top.qcow2".to_owned(),
                declared_format: Some(DiskFormat::Qcow2),
            }]
        );
    }

    #[test]
    fn unknown_driver_type_is_invalid() {
        for kind in ["qed", "vdi"] {
            let what = invalid(&domain_with_devices(&format!(
                "<disk type='file' device='disk'><driver name='qemu' type='{kind}'/>\
                 <source file='/img/old.{kind}'/><target dev='vdb' bus='virtio'/></disk>"
            )));
            assert_eq!(
                what,
                format!(
                    "disk vdb (/img/old.{kind}) has driver type '{kind}'; livemount reads raw, \
                     qcow2 and vmdk disks only"
                )
            );
        }
    }

    #[test]
    fn disk_without_target_is_invalid() {
        let what = invalid(&domain_with_devices(
            "<disk type='file' device='disk'><source file='/img/a.img'/></disk>",
        ));
        assert_eq!(
            what,
            "the disk with source file '/img/a.img' has no <target dev=...>"
        );
        let what = invalid(&domain_with_devices(
            "<disk type='file' device='cdrom'/><disk type='block' device='disk'><source dev='/dev/x'/><target bus='virtio'/></disk>",
        ));
        assert_eq!(
            what,
            "disk #2 (counting <disk> elements from 1) has no <target dev=...>"
        );
    }

    #[test]
    fn file_disk_without_source_is_invalid() {
        let what = invalid(&domain_with_devices(
            "<disk type='file' device='disk'><target dev='vda'/></disk>",
        ));
        assert_eq!(what, "disk vda has no <source file=...>");
    }

    #[test]
    fn unknown_device_kind_is_invalid() {
        let what = invalid(&domain_with_devices(
            "<disk type='file' device='tape'><source file='/img/t'/><target dev='st0'/></disk>",
        ));
        assert_eq!(
            what,
            "the disk with source file '/img/t' has device='tape', which livemount does not know"
        );
    }

    #[test]
    fn entities_decode_in_names_and_paths() {
        let config = parse(
            "t.xml",
            b"<domain type='qemu'><name>R&amp;D &#x2013; build&#32;01</name>\
              <devices><disk type='file' device='disk'>\
              <source file='/img/o&apos;brien &amp; co.img'/><target dev='vda'/></disk></devices></domain>",
        )
        .unwrap();
        assert_eq!(config.name, "R&D \u{2013} build 01");
        assert_eq!(config.disks[0].path, "/img/o'brien & co.img");
    }

    #[test]
    fn name_is_trimmed_and_cdata_counts() {
        let config = parse(
            "t.xml",
            b"<domain type='kvm'><name>\n  <![CDATA[a<b]]>  \n</name></domain>",
        )
        .unwrap();
        assert_eq!(config.name, "a<b");
    }

    #[test]
    fn child_elements_inside_name_are_read_past() {
        let config = parse(
            "t.xml",
            b"<domain><name>web<!-- c --><x/>01<y>ignored</y></name></domain>",
        )
        .unwrap();
        assert_eq!(config.name, "web01");
    }

    #[test]
    fn names_elsewhere_do_not_count() {
        let config = parse(
            "t.xml",
            b"<domain type='kvm'><metadata><nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'>\
              <nova:name>other</nova:name><name>also-other</name></nova:instance></metadata>\
              <name>real</name><name>second</name></domain>",
        )
        .unwrap();
        assert_eq!(config.name, "real");
    }

    #[test]
    fn uuid_forms() {
        for (raw, expected) in [
            (
                "3F9C2A71-5BE4-4D0E-9A86-C21F7D4E8B05",
                "3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05",
            ),
            (
                "3f9c2a715be44d0e9a86c21f7d4e8b05",
                "3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05",
            ),
            (
                "  3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05\n",
                "3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05",
            ),
        ] {
            let input = format!("<domain><name>u</name><uuid>{raw}</uuid></domain>");
            let config = parse("t.xml", input.as_bytes()).unwrap();
            assert_eq!(config.uuid.as_deref(), Some(expected), "{raw:?}");
        }
    }

    #[test]
    fn bad_uuid_is_invalid() {
        for raw in [
            "3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b0",
            "3f9c2a715-be4-4d0e-9a86-c21f7d4e8b05",
            "3f9c2a71-5be4-4d0e-9a86c21f7d4e8b05-",
            "not-a-uuid",
            "",
        ] {
            let input = format!("<domain><name>u</name><uuid>{raw}</uuid></domain>");
            let what = invalid(&input);
            assert_eq!(
                what,
                format!("<uuid> {raw:?} is not a UUID (expected 8-4-4-4-12 or 32 hex digits)")
            );
        }
    }

    #[test]
    fn missing_or_empty_name_is_invalid() {
        assert_eq!(
            invalid("<domain type='kvm'><uuid>3f9c2a715be44d0e9a86c21f7d4e8b05</uuid></domain>"),
            "no <name>: the domain XML does not name its VM"
        );
        assert_eq!(
            invalid("<domain type='kvm'/>"),
            "no <name>: the domain XML does not name its VM"
        );
        assert_eq!(
            invalid("<domain><name> </name></domain>"),
            "<name> is empty"
        );
    }

    #[test]
    fn malformed_xml_reports_position() {
        assert_eq!(
            xml_error(b"<domain type='kvm'>\n  <name>x</name>\n  <devices>\n  </domain>\n"),
            "malformed XML at line 4, column 3: ill-formed document: expected `</devices>`, but \
             `</domain>` was found"
        );
        assert_eq!(
            xml_error(b"<domain type='kvm'>\n  <name>x</name>\n  <devices>\n"),
            "malformed XML at line 4, column 1: the document ends inside <devices>"
        );
        assert_eq!(
            xml_error(b"<domain type='kvm'>\n  <name>x</name\n"),
            "malformed XML at line 2, column 10: syntax error: tag not closed: `>` not found before end of input"
        );
        assert_eq!(
            xml_error(b"<domain type='kvm'>\n  <name>a & b</name>\n</domain>"),
            "malformed XML at line 2, column 11: ill-formed document: entity or character \
             reference not closed: `;` not found before end of input"
        );
        assert_eq!(
            xml_error(b"<domain>\n<name>x</name>\n<devices><disk type='file' type='block'/></devices></domain>"),
            "malformed XML at line 3, column 28: a duplicated attribute"
        );
        assert_eq!(
            xml_error(b"<domain>\n<name>x</name>\n<devices><disk type=file/></devices></domain>"),
            "malformed XML at line 3, column 21: an attribute value not in quotes"
        );
        assert_eq!(
            xml_error(b"<domain><name>x</name><devices><disk type='file' device='disk'><source file='/a&bogus;'/></disk></devices></domain>"),
            "malformed XML at line 1, column 64: attribute file: at 3..8: unrecognized entity \
             `bogus`"
        );
        assert_eq!(
            xml_error(b"<domain><name>&nbsp;</name></domain>"),
            "malformed XML at line 1, column 15: unknown entity &nbsp;"
        );
        assert_eq!(
            xml_error(b"<domain><name>x</name></domain>\n<domain/>"),
            "malformed XML at line 2, column 1: a second root element <domain>"
        );
        assert_eq!(
            xml_error(b"<domain><name>x</name></domain>\ntrailing"),
            "malformed XML at line 1, column 32: text outside the root element"
        );
    }

    #[test]
    fn non_utf8_is_a_clear_error() {
        assert_eq!(
            xml_error(b"<domain>\n  <name>caf\xe9</name>\n</domain>"),
            "not valid UTF-8 at line 2, column 12; livemount reads libvirt XML as UTF-8"
        );
    }

    #[test]
    fn root_other_than_domain_is_unknown_kind() {
        let err = parse("t.xml", b"<network><name>default</name></network>").unwrap_err();
        assert!(matches!(err, VmConfigError::UnknownKind { .. }), "{err:?}");
    }

    #[test]
    fn position_counts_lines_and_characters() {
        assert_eq!(position(b"abc", 0), "line 1, column 1");
        assert_eq!(position(b"ab\ncd", 4), "line 2, column 2");
        assert_eq!(position("é\né".as_bytes(), 5), "line 2, column 2");
        assert_eq!(position(b"ab", 99), "line 1, column 3");
    }
}
