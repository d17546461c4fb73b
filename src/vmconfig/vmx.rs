//! VMware `.vmx` files: a line-by-line reading that keeps every line as written
//! ([`VmxDocument`]), and the facts a backup needs drawn from it ([`parse`]).
//!
//! Owns: the `.vmx` syntax (`key = "value"` lines, `#` comments, blank lines, `|XX` hex escapes in
//! values, keys compared without regard to case, the last of duplicate keys winning) and the rules
//! for which devices are disks (`scsiN:M`, `sataN:M`, `ideN:M`, `nvmeN:M` with a `.fileName`, a
//! disk `.deviceType` or none, and neither device nor controller marked not present).
//! Must not: do I/O, resolve disk paths (they stay exactly as written), or decide what a rewrite
//! changes. The line representation keeps each line's text, ending and value span so that the
//! live-mount rewrite (`vmx_rewrite`) can change single values and leave every other byte alone;
//! this module only supplies the pieces for that ([`VmxDocument::index_of`], [`escape`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;

use super::{dashed_uuid, DiskRef, Hypervisor, VmConfig, VmConfigError};

/// `.deviceType` values (compared without regard to case) that make a device with a `.fileName`
/// a virtual disk. An absent `.deviceType` also means a disk.
const DISK_DEVICE_TYPES: [&str; 3] = ["scsi-hardDisk", "disk", "ata-hardDisk"];

/// `.deviceType` values of devices that hold no VM data to back up (CD-ROMs, SCSI passthrough).
/// Any other type (an RDM `rawDisk`, say) is an error rather than a disk silently left out.
const NON_DISK_DEVICE_TYPES: [&str; 4] =
    ["cdrom-image", "atapi-cdrom", "cdrom-raw", "scsi-passthru"];

/// Reads a `.vmx` into a [`VmConfig`].
pub(crate) fn parse(file: &str, bytes: &[u8]) -> Result<VmConfig, VmConfigError> {
    let doc = VmxDocument::parse(file, bytes)?;
    if doc.last.is_empty() {
        // Empty, or only comments and blank lines: nothing says this is a .vmx.
        return Err(VmConfigError::UnknownKind {
            file: file.to_owned(),
        });
    }
    let invalid = |what: String| VmConfigError::Invalid {
        file: file.to_owned(),
        what,
    };

    let name = match doc.get("displayName") {
        Some(name) if !name.trim().is_empty() => name.to_owned(),
        Some(_) => return Err(invalid("displayName is empty".to_owned())),
        None => {
            return Err(invalid(
                "no displayName: the .vmx does not name its VM".to_owned(),
            ))
        }
    };

    let uuid = match doc.get("uuid.bios") {
        None => None,
        Some(value) => Some(bios_uuid(value).ok_or_else(|| {
            invalid(format!(
                "uuid.bios {value:?} is not a UUID (expected 16 hex bytes such as \
                 \"56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc\")"
            ))
        })?),
    };

    Ok(VmConfig {
        hypervisor: Hypervisor::Esxi,
        name,
        uuid,
        disks: disks(&doc, file)?,
    })
}

/// Normalises a `uuid.bios` value (`56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc`) to
/// `564d1234-5678-9abc-def0-123456789abc`. Spaces and dashes are separators wherever they are;
/// what remains must be exactly 32 hex digits.
fn bios_uuid(value: &str) -> Option<String> {
    let hex: String = value.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    dashed_uuid(&hex)
}

/// The disks of a `.vmx`, ordered by controller type, bus and unit.
fn disks(doc: &VmxDocument, file: &str) -> Result<Vec<DiskRef>, VmConfigError> {
    // Gather per-device and per-controller settings from the effective (last-wins) entries.
    let mut devices: BTreeMap<Slot, DeviceSettings<'_>> = BTreeMap::new();
    let mut controller_off: HashMap<(Controller, u32), bool> = HashMap::new();
    for (key, entry) in doc.entries() {
        match device_key(key) {
            Some((Target::Device(slot), attribute)) => {
                let settings = devices.entry(slot).or_default();
                match attribute {
                    "filename" => settings.file_name = Some(&entry.value),
                    "devicetype" => settings.device_type = Some(&entry.value),
                    "present" => settings.off = is_false(&entry.value),
                    _ => {}
                }
            }
            Some((Target::Controller(controller, bus), "present")) => {
                controller_off.insert((controller, bus), is_false(&entry.value));
            }
            Some((Target::Controller(..), _)) | None => {}
        }
    }

    let mut disks = Vec::new();
    for (slot, settings) in devices {
        let Some(file_name) = settings.file_name else {
            continue;
        };
        let controller_is_off = controller_off
            .get(&(slot.controller, slot.bus))
            .copied()
            .unwrap_or(false);
        if settings.off || controller_is_off {
            continue;
        }
        if let Some(device_type) = settings.device_type {
            let is_disk = DISK_DEVICE_TYPES
                .iter()
                .any(|disk_type| disk_type.eq_ignore_ascii_case(device_type));
            let is_other = NON_DISK_DEVICE_TYPES
                .iter()
                .any(|t| t.eq_ignore_ascii_case(device_type));
            if is_other {
                continue;
            }
            if !is_disk {
                return Err(VmConfigError::Invalid {
                    file: file.to_owned(),
                    what: format!(
                        "{slot}: deviceType {device_type:?} ({file_name}) is not a virtual disk \
                         livemount can back up; detach it or mark it present = \"FALSE\""
                    ),
                });
            }
        }
        if !ends_with_ignore_case(file_name, ".vmdk") {
            let kind = match settings.device_type {
                Some(device_type) => format!("its deviceType is {device_type:?}"),
                None => "it has no deviceType".to_owned(),
            };
            return Err(VmConfigError::Invalid {
                file: file.to_owned(),
                what: format!(
                    "{slot}: fileName {file_name:?} is not a .vmdk, yet the device is a disk \
                     ({kind})"
                ),
            });
        }
        disks.push(DiskRef {
            device: slot.to_string(),
            path: file_name.to_owned(),
            declared_format: None,
        });
    }
    Ok(disks)
}

/// What the entries of one device slot say.
#[derive(Debug, Default)]
struct DeviceSettings<'a> {
    file_name: Option<&'a str>,
    device_type: Option<&'a str>,
    /// `.present` says FALSE.
    off: bool,
}

/// VMware's false: `FALSE` in any case (what VMware writes), plus `no` and `0`.
pub(super) fn is_false(value: &str) -> bool {
    let value = value.trim();
    ["false", "no", "0"]
        .iter()
        .any(|word| word.eq_ignore_ascii_case(value))
}

fn ends_with_ignore_case(text: &str, suffix: &str) -> bool {
    let (text, suffix) = (text.as_bytes(), suffix.as_bytes());
    text.len() >= suffix.len() && text[text.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// A disk controller type. The declaration order is the order disks are listed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Controller {
    Scsi,
    Sata,
    Ide,
    Nvme,
}

impl Controller {
    const ALL: [Controller; 4] = [
        Controller::Scsi,
        Controller::Sata,
        Controller::Ide,
        Controller::Nvme,
    ];

    fn prefix(self) -> &'static str {
        match self {
            Controller::Scsi => "scsi",
            Controller::Sata => "sata",
            Controller::Ide => "ide",
            Controller::Nvme => "nvme",
        }
    }
}

/// A device position such as `scsi0:1`. Orders by controller type, bus, then unit, numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    controller: Controller,
    bus: u32,
    unit: u32,
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}:{}", self.controller.prefix(), self.bus, self.unit)
    }
}

/// What a device-related key is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// `scsi0.present`: the controller.
    Controller(Controller, u32),
    /// `scsi0:1.fileName`: a device on it.
    Device(Slot),
}

/// Splits a lowercase key such as `scsi0:1.filename` or `scsi0.present` into what it is about
/// and the attribute (`filename`, `present`). None for keys of anything else, including
/// `sched.scsi0:0.shares`.
fn device_key(key: &str) -> Option<(Target, &str)> {
    let (controller, rest) = Controller::ALL
        .iter()
        .find_map(|c| key.strip_prefix(c.prefix()).map(|rest| (*c, rest)))?;
    let (bus, rest) = leading_number(rest)?;
    if let Some(attribute) = rest.strip_prefix('.') {
        return Some((Target::Controller(controller, bus), attribute));
    }
    let (unit, rest) = leading_number(rest.strip_prefix(':')?)?;
    let attribute = rest.strip_prefix('.')?;
    Some((
        Target::Device(Slot {
            controller,
            bus,
            unit,
        }),
        attribute,
    ))
}

/// Splits off leading ASCII digits as a number. None if there are none or they overflow.
fn leading_number(text: &str) -> Option<(u32, &str)> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    let number = text[..digits].parse().ok()?;
    Some((number, &text[digits..]))
}

/// A `.vmx` as a list of lines, each kept as written.
#[derive(Debug, Clone)]
pub(crate) struct VmxDocument {
    /// The file started with a UTF-8 byte order mark (not part of the first line's text).
    pub(crate) bom: bool,
    /// Every line in order; line `n` (1-based, as in messages) is `lines[n - 1]`.
    pub(crate) lines: Vec<Line>,
    /// Lowercase key to the index in `lines` of its last entry, which is the one that counts.
    last: HashMap<String, usize>,
}

/// One line of a `.vmx`.
#[derive(Debug, Clone)]
pub(crate) struct Line {
    /// The line as written, without its ending.
    pub(crate) text: String,
    pub(crate) ending: LineEnding,
    /// The setting on this line; None for blank lines and comments.
    pub(crate) entry: Option<Entry>,
}

/// How a line ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineEnding {
    Lf,
    CrLf,
    /// The last line of a file that does not end in a newline.
    None,
}

impl LineEnding {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LineEnding::Lf => "\n",
            LineEnding::CrLf => "\r\n",
            LineEnding::None => "",
        }
    }
}

/// A `key = "value"` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The key as written (original case; compare without regard to case).
    pub(crate) key: String,
    /// The value with `|XX` escapes decoded.
    pub(crate) value: String,
    /// Where the value sits in the line's text: the bytes between the quotes, still escaped.
    pub(crate) value_span: Range<usize>,
}

impl VmxDocument {
    /// Splits `bytes` into lines and reads each. A line that is neither blank, a comment nor
    /// `key = "value"` is a [`VmConfigError::Vmx`] error naming it, except that a first
    /// non-blank, non-comment line without any `=` means this is no `.vmx` at all
    /// ([`VmConfigError::UnknownKind`]).
    pub(crate) fn parse(file: &str, bytes: &[u8]) -> Result<Self, VmConfigError> {
        let (bom, body) = match bytes.strip_prefix(super::UTF8_BOM) {
            Some(body) => (true, body),
            None => (false, bytes),
        };
        let mut doc = VmxDocument {
            bom,
            lines: Vec::new(),
            last: HashMap::new(),
        };
        for raw in body.split_inclusive(|&b| b == b'\n') {
            let number = doc.lines.len() + 1;
            let (raw, ending) = if let Some(raw) = raw.strip_suffix(b"\r\n") {
                (raw, LineEnding::CrLf)
            } else if let Some(raw) = raw.strip_suffix(b"\n") {
                (raw, LineEnding::Lf)
            } else {
                (raw, LineEnding::None)
            };
            let line_error = |what: String| {
                if doc.last.is_empty() && !raw.contains(&b'=') {
                    VmConfigError::UnknownKind {
                        file: file.to_owned(),
                    }
                } else {
                    VmConfigError::Vmx {
                        file: file.to_owned(),
                        line: number,
                        what,
                    }
                }
            };
            let text = std::str::from_utf8(raw).map_err(|_| {
                let declared = match doc.get(".encoding") {
                    Some(encoding) if !is_utf8_name(encoding) => {
                        format!(" (the file declares .encoding = {encoding:?})")
                    }
                    _ => String::new(),
                };
                line_error(format!(
                    "not valid UTF-8{declared}; livemount reads .vmx files as UTF-8"
                ))
            })?;
            let entry = parse_line(text).map_err(line_error)?;
            if let Some(entry) = &entry {
                doc.last
                    .insert(entry.key.to_ascii_lowercase(), doc.lines.len());
            }
            doc.lines.push(Line {
                text: text.to_owned(),
                ending,
                entry,
            });
        }
        Ok(doc)
    }

    /// The value of `key` (compared without regard to case; the last entry wins).
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.get_entry(key).map(|entry| entry.value.as_str())
    }

    /// The entry that counts for `key` (compared without regard to case; the last entry wins).
    pub(crate) fn get_entry(&self, key: &str) -> Option<&Entry> {
        let index = *self.last.get(&key.to_ascii_lowercase())?;
        self.lines.get(index)?.entry.as_ref()
    }

    /// The index in [`VmxDocument::lines`] of the entry that counts for `key` (compared without
    /// regard to case; the last entry wins).
    pub(crate) fn index_of(&self, key: &str) -> Option<usize> {
        self.last.get(&key.to_ascii_lowercase()).copied()
    }

    /// The entries that count (the last for each key), each with its key in lowercase, in no
    /// particular order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.last.iter().filter_map(|(key, &index)| {
            let entry = self.lines.get(index)?.entry.as_ref()?;
            Some((key.as_str(), entry))
        })
    }
}

fn is_utf8_name(encoding: &str) -> bool {
    encoding.eq_ignore_ascii_case("UTF-8") || encoding.eq_ignore_ascii_case("UTF8")
}

/// Reads one line (without its ending): Ok(None) for blank lines and comments, the entry for
/// `key = "value"`, and a description of the problem otherwise.
fn parse_line(text: &str) -> Result<Option<Entry>, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let Some(eq) = text.find('=') else {
        return Err(format!(
            "expected `key = \"value\"`, a comment or a blank line, found {trimmed:?}"
        ));
    };
    let key = text[..eq].trim();
    if key.is_empty() {
        return Err(format!("no key before `=` in {trimmed:?}"));
    }
    if key.contains(|c: char| c.is_whitespace() || c == '"') {
        return Err(format!("key {key:?} contains a space or a quote"));
    }
    let after_eq = &text[eq + 1..];
    let quoted = after_eq.trim_start();
    let Some(inner) = quoted.strip_prefix('"') else {
        return Err(format!("the value of {key} is not in double quotes"));
    };
    let Some(close) = inner.find('"') else {
        return Err(format!("the value of {key} has no closing quote"));
    };
    let tail = inner[close + 1..].trim();
    if !tail.is_empty() {
        return Err(format!(
            "unexpected {tail:?} after the quoted value of {key}"
        ));
    }
    let start = eq + 1 + (after_eq.len() - quoted.len()) + 1;
    let value_span = start..start + close;
    let value = unescape(&text[value_span.clone()])
        .map_err(|()| format!("the value of {key} decodes (after |XX escapes) to invalid UTF-8"))?;
    Ok(Some(Entry {
        key: key.to_owned(),
        value,
        value_span,
    }))
}

/// Decodes VMware's `|XX` escapes (two hex digits for one byte: `|22` is `"`, `|7C` is `|`,
/// `|0A` a newline). A `|` not followed by two hex digits stays as it is. Err if the decoded
/// bytes are not UTF-8.
fn unescape(raw: &str) -> Result<String, ()> {
    if !raw.contains('|') {
        return Ok(raw.to_owned());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'|' {
            if let Some(&[high, low]) = bytes.get(i + 1..i + 3) {
                if let (Some(high), Some(low)) = (hex_digit(high), hex_digit(low)) {
                    out.push(high << 4 | low);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(b);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ())
}

/// Encodes a value for writing between the quotes of a `.vmx` line: `"`, `|` and control
/// characters become `|XX` (uppercase hex, as VMware writes them); everything else stays. The
/// inverse of [`unescape`] for every string.
pub(crate) fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c == '"' || c == '|' || c.is_ascii_control() {
            out.push_str(&format!("|{:02X}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOWS: &[u8] = include_bytes!("../../testdata/esxi8-ws2022-app01.vmx");
    const LINUX: &[u8] = include_bytes!("../../testdata/esxi8-rocky9-web01.vmx");

    fn disk(device: &str, path: &str) -> DiskRef {
        DiskRef {
            device: device.to_owned(),
            path: path.to_owned(),
            declared_format: None,
        }
    }

    /// The bytes a document was read from, rebuilt from its lines.
    fn render(doc: &VmxDocument) -> Vec<u8> {
        let mut out = Vec::new();
        if doc.bom {
            out.extend_from_slice(crate::vmconfig::UTF8_BOM);
        }
        for line in &doc.lines {
            out.extend_from_slice(line.text.as_bytes());
            out.extend_from_slice(line.ending.as_str().as_bytes());
        }
        out
    }

    fn vmx_error(input: &str) -> (usize, String) {
        match parse("t.vmx", input.as_bytes()) {
            Err(VmConfigError::Vmx { file, line, what }) => {
                assert_eq!(file, "t.vmx");
                (line, what)
            }
            other => panic!("expected a Vmx error for {input:?}, got {other:?}"),
        }
    }

    fn invalid(input: &[u8]) -> String {
        match parse("t.vmx", input) {
            Err(VmConfigError::Invalid { file, what }) => {
                assert_eq!(file, "t.vmx");
                what
            }
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn windows_server_vm() {
        let config = parse("WS2022-APP01.vmx", WINDOWS).unwrap();
        assert_eq!(
            config,
            VmConfig {
                hypervisor: Hypervisor::Esxi,
                name: "WS2022-APP01".to_owned(),
                uuid: Some("421a7c3e-5d90-8b14-c26f-0a93de47b825".to_owned()),
                disks: vec![
                    disk("scsi0:0", "WS2022-APP01.vmdk"),
                    disk("scsi0:1", "WS2022-APP01_1.vmdk"),
                ],
            }
        );
    }

    #[test]
    fn windows_server_document() {
        let doc = VmxDocument::parse("WS2022-APP01.vmx", WINDOWS).unwrap();
        assert_eq!(doc.lines.len(), 109);
        assert!(!doc.bom);
        assert_eq!(doc.get(".encoding"), Some("UTF-8"));
        assert_eq!(
            doc.get("ethernet0.generatedAddress"),
            Some("00:50:56:9a:3c:7e")
        );
        assert_eq!(
            doc.get("vc.uuid"),
            Some("50 1a 2f 6d 83 c4 49 e1-9b 07 5a 3c 18 f2 64 d9")
        );
        assert_eq!(doc.get("nvram"), Some("WS2022-APP01.nvram"));
        assert_eq!(doc.get("annotation"), Some(""));
        assert_eq!(doc.get("checkpoint.vmState"), Some(""));
        assert_eq!(
            doc.get("viv.moid"),
            Some("a3c91f2e-6b7d-4e58-9f10-2c4d8e6a7b31:vm-2217:Qx8mT4kR2vJp9LwN1sYdA6fHcZ0uGbE5nVoXiK3qMrU=")
        );
        assert_eq!(render(&doc), WINDOWS);
    }

    #[test]
    fn linux_vm_with_nvme_disabled_disks_and_numeric_order() {
        let config = parse("web01.vmx", LINUX).unwrap();
        assert_eq!(
            config,
            VmConfig {
                hypervisor: Hypervisor::Esxi,
                name: "web01.dmz.example.net".to_owned(),
                uuid: Some("564d9c0e-3a71-b248-e50f-6d21c894a37b".to_owned()),
                disks: vec![
                    disk("scsi0:2", "web01_1.vmdk"),
                    disk(
                        "scsi0:10",
                        "/vmfs/volumes/datastore-ssd02/web01/web01_3.vmdk"
                    ),
                    disk("sata0:1", "web01_2.vmdk"),
                    disk("nvme0:0", "web01.vmdk"),
                ],
            }
        );
    }

    #[test]
    fn linux_vm_document_decodes_escapes() {
        let doc = VmxDocument::parse("web01.vmx", LINUX).unwrap();
        assert_eq!(
            doc.get("annotation"),
            Some("Nginx front end for \"shop\" (prod)\nOwner: web-ops|on-call")
        );
        let entry = doc.get_entry("ANNOTATION").unwrap();
        assert_eq!(entry.key, "annotation");
        let line = doc
            .lines
            .iter()
            .find(|line| line.entry.as_ref() == Some(entry))
            .unwrap();
        assert_eq!(
            &line.text[entry.value_span.clone()],
            "Nginx front end for |22shop|22 (prod)|0AOwner: web-ops|7Con-call"
        );
        assert!(doc.lines[16].text.starts_with("# Data disks"));
        assert_eq!(doc.lines[16].entry, None);
        assert_eq!(render(&doc), LINUX);
    }

    #[test]
    fn crlf_bom_and_missing_final_newline_round_trip() {
        let input = b"\xEF\xBB\xBF.encoding = \"UTF-8\"\r\n\r\ndisplayName = \"crlf\"";
        let doc = VmxDocument::parse("t.vmx", input).unwrap();
        assert!(doc.bom);
        assert_eq!(doc.lines.len(), 3);
        assert_eq!(doc.lines[0].ending, LineEnding::CrLf);
        assert_eq!(doc.lines[0].text, ".encoding = \"UTF-8\"");
        assert_eq!(doc.lines[2].ending, LineEnding::None);
        assert_eq!(render(&doc), input);
        assert_eq!(parse("t.vmx", input).unwrap().name, "crlf");
    }

    #[test]
    fn value_span_points_between_the_quotes() {
        let doc = VmxDocument::parse("t.vmx", b"  displayName   =\t\"a|22b\"  \n").unwrap();
        let entry = doc.lines[0].entry.as_ref().unwrap();
        assert_eq!(entry.key, "displayName");
        assert_eq!(entry.value, "a\"b");
        assert_eq!(entry.value_span, 19..24);
        assert_eq!(&doc.lines[0].text[entry.value_span.clone()], "a|22b");
    }

    #[test]
    fn whitespace_around_equals_is_optional() {
        let config = parse("t.vmx", b"displayName=\"tight\"\nuuid.bios  =  \"56 4d 00 11 22 33 44 55-66 77 88 99 aa bb cc dd\"\n").unwrap();
        assert_eq!(config.name, "tight");
        assert_eq!(
            config.uuid.as_deref(),
            Some("564d0011-2233-4455-6677-8899aabbccdd")
        );
    }

    #[test]
    fn keys_ignore_case_and_the_last_duplicate_wins() {
        let config = parse(
            "t.vmx",
            b"displayName = \"first\"\nDISPLAYNAME = \"second\"\ndisplayname = \"third\"\n\
              SCSI0:0.FileName = \"a.vmdk\"\nscsi0:0.filename = \"b.vmdk\"\n",
        )
        .unwrap();
        assert_eq!(config.name, "third");
        assert_eq!(config.disks, vec![disk("scsi0:0", "b.vmdk")]);
        assert_eq!(config.uuid, None);
    }

    #[test]
    fn a_later_present_false_disables_an_earlier_true() {
        let config = parse(
            "t.vmx",
            b"displayName = \"d\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.fileName = \"a.vmdk\"\n\
              scsi0:0.present = \"false\"\n",
        )
        .unwrap();
        assert_eq!(config.disks, vec![]);
    }

    #[test]
    fn escapes_decode() {
        assert_eq!(unescape("plain").unwrap(), "plain");
        assert_eq!(unescape("|22quoted|22").unwrap(), "\"quoted\"");
        assert_eq!(unescape("pipe|7Cpipe|7c").unwrap(), "pipe|pipe|");
        assert_eq!(unescape("line|0Aline").unwrap(), "line\nline");
        assert_eq!(unescape("caf|C3|A9").unwrap(), "café");
        assert_eq!(
            unescape("not |zz an escape |").unwrap(),
            "not |zz an escape |"
        );
        assert_eq!(unescape("short |2").unwrap(), "short |2");
        assert_eq!(unescape("|FF"), Err(()));
        let config = parse("t.vmx", b"displayName = \"say |22hi|22\"\n").unwrap();
        assert_eq!(config.name, "say \"hi\"");
    }

    #[test]
    fn escape_encodes_what_unescape_decodes() {
        assert_eq!(escape("plain caf\u{e9}"), "plain caf\u{e9}");
        assert_eq!(
            escape("say \"hi\" | a\nb\r\t\u{7f}"),
            "say |22hi|22 |7C a|0Ab|0D|09|7F"
        );
        assert_eq!(escape("|22"), "|7C22");
        assert_eq!(unescape(&escape("|22")).unwrap(), "|22");
    }

    proptest::proptest! {
        #[test]
        fn escape_round_trips_through_a_line(
            chars in proptest::collection::vec(proptest::char::any(), 0..40)
        ) {
            let value: String = chars.into_iter().collect();
            let escaped = escape(&value);
            proptest::prop_assert_eq!(unescape(&escaped).unwrap(), value.clone());
            let line = format!("annotation = \"{escaped}\"\n");
            let doc = VmxDocument::parse("p.vmx", line.as_bytes()).unwrap();
            proptest::prop_assert_eq!(doc.lines.len(), 1);
            proptest::prop_assert_eq!(doc.get("annotation"), Some(value.as_str()));
        }
    }

    #[test]
    fn escape_to_invalid_utf8_is_an_error() {
        let (line, what) = vmx_error("displayName = \"x\"\nannotation = \"bad |FF byte\"\n");
        assert_eq!(line, 2);
        assert_eq!(
            what,
            "the value of annotation decodes (after |XX escapes) to invalid UTF-8"
        );
    }

    #[test]
    fn malformed_lines_name_their_line() {
        let (line, what) = vmx_error("displayName = \"x\"\n# fine\n\nthis is not a setting\n");
        assert_eq!(line, 4);
        assert_eq!(
            what,
            "expected `key = \"value\"`, a comment or a blank line, found \"this is not a setting\""
        );

        let (line, what) = vmx_error("displayName = \"x\"\nnumvcpus = 2\n");
        assert_eq!(line, 2);
        assert_eq!(what, "the value of numvcpus is not in double quotes");

        let (line, what) = vmx_error("displayName = \"x\"\nmemSize = \"4096\n");
        assert_eq!(line, 2);
        assert_eq!(what, "the value of memSize has no closing quote");

        let (line, what) = vmx_error("displayName = \"x\"\n\nguestOS = \"other\" extra\n");
        assert_eq!(line, 3);
        assert_eq!(
            what,
            "unexpected \"extra\" after the quoted value of guestOS"
        );

        let (line, what) = vmx_error("displayName = \"x\"\n = \"orphan\"\n");
        assert_eq!(line, 2);
        assert_eq!(what, "no key before `=` in \"= \\\"orphan\\\"\"");

        let (line, what) = vmx_error("displayName = \"x\"\nguest OS = \"other\"\n");
        assert_eq!(line, 2);
        assert_eq!(what, "key \"guest OS\" contains a space or a quote");
    }

    #[test]
    fn malformed_first_line_with_equals_is_a_vmx_error() {
        let (line, what) = vmx_error("config.version = 8\ndisplayName = \"x\"\n");
        assert_eq!(line, 1);
        assert_eq!(what, "the value of config.version is not in double quotes");
    }

    #[test]
    fn error_message_includes_file_and_line() {
        let err = parse("vm1.vmx", b"displayName = \"x\"\nbroken\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "vm1.vmx: line 2: expected `key = \"value\"`, a comment or a blank line, found \"broken\""
        );
    }

    #[test]
    fn first_line_without_equals_is_unknown_kind() {
        for input in [
            &b"hello world\ndisplayName = \"x\"\n"[..],
            b"# only\n# comments\n\n",
        ] {
            let err = parse("t.vmx", input).unwrap_err();
            assert!(matches!(err, VmConfigError::UnknownKind { .. }), "{err:?}");
        }
    }

    #[test]
    fn non_utf8_is_a_clear_error() {
        let (line, what) = vmx_error_bytes(b"displayName = \"x\"\nannotation = \"caf\xe9\"\n");
        assert_eq!(line, 2);
        assert_eq!(what, "not valid UTF-8; livemount reads .vmx files as UTF-8");

        let (line, what) = vmx_error_bytes(
            b".encoding = \"windows-1252\"\ndisplayName = \"x\"\nannotation = \"caf\xe9\"\n",
        );
        assert_eq!(line, 3);
        assert_eq!(
            what,
            "not valid UTF-8 (the file declares .encoding = \"windows-1252\"); livemount reads \
             .vmx files as UTF-8"
        );
    }

    #[test]
    fn ascii_content_with_a_legacy_encoding_is_fine() {
        let config = parse(
            "t.vmx",
            b".encoding = \"windows-1252\"\ndisplayName = \"old\"\n",
        )
        .unwrap();
        assert_eq!(config.name, "old");
    }

    fn vmx_error_bytes(input: &[u8]) -> (usize, String) {
        match parse("t.vmx", input) {
            Err(VmConfigError::Vmx { line, what, .. }) => (line, what),
            other => panic!("expected a Vmx error, got {other:?}"),
        }
    }

    #[test]
    fn missing_display_name_is_invalid() {
        let what = invalid(b".encoding = \"UTF-8\"\nscsi0:0.fileName = \"a.vmdk\"\n");
        assert_eq!(what, "no displayName: the .vmx does not name its VM");
        let what = invalid(b"displayName = \"  \"\n");
        assert_eq!(what, "displayName is empty");
    }

    #[test]
    fn uuid_bios_normalises() {
        let config = parse(
            "t.vmx",
            b"displayName = \"u\"\nuuid.bios = \"56 4D 12 34 56 78 9A BC-DE F0 12 34 56 78 9A BC\"\n",
        )
        .unwrap();
        assert_eq!(
            config.uuid.as_deref(),
            Some("564d1234-5678-9abc-def0-123456789abc")
        );
    }

    #[test]
    fn vc_uuid_is_not_a_fallback() {
        let config = parse(
            "t.vmx",
            b"displayName = \"u\"\nvc.uuid = \"50 1a 2f 6d 83 c4 49 e1-9b 07 5a 3c 18 f2 64 d9\"\n",
        )
        .unwrap();
        assert_eq!(config.uuid, None);
    }

    #[test]
    fn bad_uuid_bios_is_invalid() {
        for bad in [
            "56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a",
            "56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a zz",
            "56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc 00",
            "",
        ] {
            let input = format!("displayName = \"u\"\nuuid.bios = \"{bad}\"\n");
            let what = invalid(input.as_bytes());
            assert_eq!(
                what,
                format!(
                    "uuid.bios {bad:?} is not a UUID (expected 16 hex bytes such as \
                     \"56 4d 12 34 56 78 9a bc-de f0 12 34 56 78 9a bc\")"
                )
            );
        }
    }

    #[test]
    fn unknown_device_types_are_refused_not_skipped() {
        let err = parse(
            "x.vmx",
            b"displayName = \"c\"\nscsi0:1.deviceType = \"rawDisk\"\nscsi0:1.fileName = \"rdm.vmdk\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("scsi0:1") && err.contains("rawDisk"), "{err}");
        let ok = parse(
            "x.vmx",
            b"displayName = \"c\"\nscsi0:3.deviceType = \"scsi-passthru\"\nscsi0:3.fileName = \"/dev/sg1\"\n",
        )
        .unwrap();
        assert!(ok.disks.is_empty());
    }

    #[test]
    fn cdroms_are_skipped() {
        let config = parse(
            "t.vmx",
            b"displayName = \"c\"\n\
              sata0:0.deviceType = \"cdrom-image\"\nsata0:0.fileName = \"/vmfs/volumes/ds/iso/x.iso\"\n\
              ide1:0.deviceType = \"ATAPI-CDROM\"\nide1:0.fileName = \"CD/DVD drive 0\"\n\
              ide0:0.deviceType = \"cdrom-raw\"\nide0:0.fileName = \"/dev/sr0\"\n\
              sata0:1.deviceType = \"ata-hardDisk\"\nsata0:1.fileName = \"c.VMDK\"\n",
        )
        .unwrap();
        assert_eq!(config.disks, vec![disk("sata0:1", "c.VMDK")]);
    }

    #[test]
    fn disk_device_types_are_case_insensitive() {
        let config = parse(
            "t.vmx",
            b"displayName = \"c\"\nscsi0:0.deviceType = \"SCSI-HARDDISK\"\nscsi0:0.fileName = \"a.vmdk\"\n\
              ide0:0.deviceType = \"Disk\"\nide0:0.fileName = \"b.vmdk\"\n",
        )
        .unwrap();
        assert_eq!(
            config.disks,
            vec![disk("scsi0:0", "a.vmdk"), disk("ide0:0", "b.vmdk")]
        );
    }

    #[test]
    fn disabled_controller_disables_its_devices() {
        let config = parse(
            "t.vmx",
            b"displayName = \"c\"\nscsi0.present = \"FALSE\"\nscsi0:0.fileName = \"a.vmdk\"\n\
              scsi0:0.present = \"TRUE\"\nscsi1.present = \"TRUE\"\nscsi1:0.fileName = \"b.vmdk\"\n",
        )
        .unwrap();
        assert_eq!(config.disks, vec![disk("scsi1:0", "b.vmdk")]);
    }

    #[test]
    fn device_without_file_name_is_not_a_disk() {
        let config = parse(
            "t.vmx",
            b"displayName = \"c\"\nscsi0:0.present = \"TRUE\"\nscsi0:0.deviceType = \"scsi-hardDisk\"\n",
        )
        .unwrap();
        assert_eq!(config.disks, vec![]);
    }

    #[test]
    fn disk_that_is_not_a_vmdk_is_invalid() {
        let what = invalid(
            b"displayName = \"c\"\nscsi0:1.deviceType = \"scsi-hardDisk\"\nscsi0:1.fileName = \"data.img\"\n",
        );
        assert_eq!(
            what,
            "scsi0:1: fileName \"data.img\" is not a .vmdk, yet the device is a disk \
             (its deviceType is \"scsi-hardDisk\")"
        );
        let what = invalid(b"displayName = \"c\"\nide0:0.fileName = \"boot.iso\"\n");
        assert_eq!(
            what,
            "ide0:0: fileName \"boot.iso\" is not a .vmdk, yet the device is a disk \
             (it has no deviceType)"
        );
    }

    #[test]
    fn disabled_non_vmdk_disk_is_not_an_error() {
        let config = parse(
            "t.vmx",
            b"displayName = \"c\"\nscsi0:1.fileName = \"data.img\"\nscsi0:1.present = \"FALSE\"\n",
        )
        .unwrap();
        assert_eq!(config.disks, vec![]);
    }

    #[test]
    fn disks_order_by_controller_type_bus_and_unit() {
        let config = parse(
            "t.vmx",
            b"displayName = \"o\"\nnvme0:0.fileName = \"n.vmdk\"\nide0:1.fileName = \"i.vmdk\"\n\
              sata1:0.fileName = \"s10.vmdk\"\nsata0:3.fileName = \"s03.vmdk\"\n\
              scsi1:0.fileName = \"c10.vmdk\"\nscsi0:10.fileName = \"c010.vmdk\"\n\
              scsi0:2.fileName = \"c02.vmdk\"\n",
        )
        .unwrap();
        let devices: Vec<&str> = config.disks.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(
            devices,
            ["scsi0:2", "scsi0:10", "scsi1:0", "sata0:3", "sata1:0", "ide0:1", "nvme0:0"]
        );
    }

    #[test]
    fn device_keys_split() {
        let slot = |controller, bus, unit| {
            Target::Device(Slot {
                controller,
                bus,
                unit,
            })
        };
        assert_eq!(
            device_key("scsi0:1.filename"),
            Some((slot(Controller::Scsi, 0, 1), "filename"))
        );
        assert_eq!(
            device_key("nvme3:15.present"),
            Some((slot(Controller::Nvme, 3, 15), "present"))
        );
        assert_eq!(
            device_key("sata0.present"),
            Some((Target::Controller(Controller::Sata, 0), "present"))
        );
        assert_eq!(device_key("sched.scsi0:0.shares"), None);
        assert_eq!(device_key("scsi0:0"), None);
        assert_eq!(device_key("scsi:0.filename"), None);
        assert_eq!(device_key("scsi0:.filename"), None);
        assert_eq!(device_key("scsi99999999999:0.filename"), None);
        assert_eq!(device_key("ethernet0.present"), None);
    }

    #[test]
    fn slots_order_numerically() {
        let a = Slot {
            controller: Controller::Scsi,
            bus: 0,
            unit: 2,
        };
        let b = Slot {
            controller: Controller::Scsi,
            bus: 0,
            unit: 10,
        };
        assert!(a < b);
        assert_eq!(b.to_string(), "scsi0:10");
    }
}
