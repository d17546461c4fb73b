//! The live-mount rewrite of libvirt domain XML, on quick-xml's event stream.
//!
//! Owns: which parts of a `<domain>` a live mount changes (`<name>`, `<uuid>`, the `id`
//! attribute, relabelling `<seclabel>`s, each `<interface>`'s `<mac>` and `<link>`, its
//! `<source>` as the network plan maps or detaches it (or the whole interface, removed), the disks'
//! type, `<driver>`, `<source>` and `<backingStore>`, CD-ROM sources) and how new elements are
//! written (single-quoted attributes, as libvirt writes them, indented like their siblings).
//! Must not: change any other byte. quick-xml reads the document into events; each event's
//! exact input bytes are kept, and every event the rewrite does not touch is written back as
//! those bytes (so comments, whitespace, quoting, attribute order, entity references and empty
//! tags stay as they were). Touched start tags are edited in place: a changed attribute keeps
//! its place and quote character, a removed one takes its leading whitespace with it.

use std::borrow::Cow;
use std::ops::Range;

use quick_xml::escape::{escape, partial_escape, unescape};
use quick_xml::events::Event;
use quick_xml::Reader;

use super::rewrite::{
    dashed, has_control, DiskTarget, MacSource, MountRewrite, NetworkMode, NicAction, NicReport,
};
use super::{VmConfig, VmConfigError};

/// Rewrites the domain XML `original` (already known to parse into `config`) as `how` says,
/// with what was done to each `<interface>`.
pub(super) fn rewrite(
    file: &str,
    original: &[u8],
    how: &MountRewrite,
    config: &VmConfig,
    uuid: &[u8; 16],
) -> Result<(Vec<u8>, Vec<NicReport>), VmConfigError> {
    let invalid = |what: String| VmConfigError::Invalid {
        file: file.to_owned(),
        what,
    };
    for (disk, target) in config.disks.iter().zip(&how.disks) {
        let strings: Vec<&str> = match target {
            DiskTarget::RawFile(path) => vec![path],
            DiskTarget::Nfs { host, path } => {
                if !path.starts_with('/') {
                    return Err(invalid(format!(
                        "disk {}: the NFS path {path:?} is not absolute",
                        disk.device
                    )));
                }
                vec![host, path]
            }
            DiskTarget::VmdkFile(_) => {
                return Err(invalid(format!(
                    "disk {}: a libvirt disk needs a RawFile or Nfs target, not VmdkFile",
                    disk.device
                )))
            }
        };
        if strings.iter().any(|s| s.is_empty() || has_control(s)) {
            return Err(invalid(format!(
                "disk {}: the {} target has an empty value or control characters",
                disk.device,
                target.kind()
            )));
        }
    }
    let text = std::str::from_utf8(original).map_err(|_| invalid("not UTF-8".to_owned()))?;
    let (bom, text) = match text.strip_prefix('\u{FEFF}') {
        Some(rest) => ("\u{FEFF}", rest),
        None => ("", text),
    };
    let tokens = tokenize(text).map_err(|what| VmConfigError::Xml {
        file: file.to_owned(),
        what,
    })?;
    let mut rewriter = Rewriter {
        tokens: &tokens,
        out: Out::default(),
        how,
        uuid: dashed(uuid),
        macs: MacSource::qemu(how.mac_seed),
        nic: 0,
        targets: how.disks.iter(),
        report: Vec::new(),
    };
    rewriter.out.put(bom);
    rewriter.document().map_err(invalid)?;
    let report = std::mem::take(&mut rewriter.report);
    Ok((rewriter.out.finish().into_bytes(), report))
}

/// One event, as the bytes it was read from.
#[derive(Debug)]
struct Token<'t> {
    raw: &'t str,
    kind: Kind<'t>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind<'t> {
    /// A start tag; `end` is the index of its end tag.
    Start {
        name: &'t str,
        end: usize,
    },
    Empty {
        name: &'t str,
    },
    End,
    /// Character data; `blank` when it is only whitespace.
    Text {
        blank: bool,
    },
    /// Comments, CDATA, entity references, declarations, processing instructions, doctype.
    Other,
}

/// Reads `text` into tokens whose `raw` strings, joined, are `text`.
fn tokenize(text: &str) -> Result<Vec<Token<'_>>, String> {
    let mut reader = Reader::from_str(text);
    let mut tokens: Vec<Token<'_>> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    let offset = |position: u64| usize::try_from(position).unwrap_or(usize::MAX);
    loop {
        let at = offset(reader.buffer_position());
        let event = reader
            .read_event()
            .map_err(|err| format!("malformed XML: {err}"))?;
        let raw = text
            .get(at..offset(reader.buffer_position()))
            .ok_or_else(|| "quick-xml reported an event outside the document".to_owned())?;
        let kind = match event {
            Event::Eof => break,
            Event::Start(_) => {
                open.push(tokens.len());
                Kind::Start {
                    name: tag_name(raw),
                    end: usize::MAX,
                }
            }
            Event::Empty(_) => Kind::Empty {
                name: tag_name(raw),
            },
            Event::End(_) => {
                let start = open
                    .pop()
                    .ok_or_else(|| "an end tag without a start tag".to_owned())?;
                let index = tokens.len();
                if let Some(Token {
                    kind: Kind::Start { end, .. },
                    ..
                }) = tokens.get_mut(start)
                {
                    *end = index;
                }
                Kind::End
            }
            Event::Text(_) => Kind::Text {
                blank: raw
                    .bytes()
                    .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n')),
            },
            Event::CData(_)
            | Event::Comment(_)
            | Event::Decl(_)
            | Event::PI(_)
            | Event::DocType(_)
            | Event::GeneralRef(_) => Kind::Other,
        };
        tokens.push(Token { raw, kind });
    }
    if !open.is_empty() {
        return Err("the document ends inside an element".to_owned());
    }
    Ok(tokens)
}

/// The element name of a start or empty tag's raw text (`<disk type='file'>` gives `disk`).
fn tag_name(raw: &str) -> &str {
    let body = raw.strip_prefix('<').unwrap_or(raw);
    let end = body
        .find(|c: char| c.is_ascii_whitespace() || c == '/' || c == '>')
        .unwrap_or(body.len());
    &body[..end]
}

/// Where one attribute sits in a tag's raw text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AttributeSpan {
    /// From the whitespace before the name to the closing quote, inclusive.
    whole: Range<usize>,
    key: Range<usize>,
    /// Between the quotes, still escaped.
    value: Range<usize>,
    quote: char,
}

/// The attributes of a start or empty tag's raw text, with where the tag's name ends. Stops at
/// anything that is not `name = 'value'` (quick-xml has already accepted the tag, so that is
/// only its end).
fn attribute_spans(raw: &str) -> (usize, Vec<AttributeSpan>) {
    let bytes = raw.as_bytes();
    let is_space = |at: usize| bytes.get(at).is_some_and(u8::is_ascii_whitespace);
    let ends_tag = |at: usize| matches!(bytes.get(at), None | Some(b'/' | b'>'));
    let mut i = 1;
    while !is_space(i) && !ends_tag(i) {
        i += 1;
    }
    let name_end = i;
    let mut spans = Vec::new();
    loop {
        let whole_start = i;
        while is_space(i) {
            i += 1;
        }
        if ends_tag(i) {
            break;
        }
        let key_start = i;
        while !is_space(i) && !ends_tag(i) && bytes.get(i) != Some(&b'=') {
            i += 1;
        }
        let key = key_start..i;
        while is_space(i) {
            i += 1;
        }
        if bytes.get(i) != Some(&b'=') {
            break;
        }
        i += 1;
        while is_space(i) {
            i += 1;
        }
        let Some(&quote @ (b'\'' | b'"')) = bytes.get(i) else {
            break;
        };
        i += 1;
        let value_start = i;
        while bytes.get(i).is_some_and(|&b| b != quote) {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let value = value_start..i;
        i += 1;
        spans.push(AttributeSpan {
            whole: whole_start..i,
            key,
            value,
            quote: char::from(quote),
        });
    }
    (name_end, spans)
}

/// The value of attribute `key` in a tag's raw text, entities resolved.
fn attribute<'r>(raw: &'r str, key: &str) -> Option<Cow<'r, str>> {
    let (_, spans) = attribute_spans(raw);
    let span = spans
        .into_iter()
        .find(|span| raw.get(span.key.clone()) == Some(key))?;
    let value = raw.get(span.value)?;
    Some(unescape(value).unwrap_or(Cow::Borrowed(value)))
}

/// A start or empty tag's raw text with attributes in `set` given new values (in place, keeping
/// their quote character; added after the last attribute when absent, quoted like the tag's
/// first attribute or with `'`) and those in `remove` taken out.
fn edit_tag(raw: &str, set: &[(&str, &str)], remove: &[&str]) -> String {
    let (name_end, spans) = attribute_spans(raw);
    let slice = |range: Range<usize>| raw.get(range).unwrap_or("");
    let quote = spans.first().map_or('\'', |span| span.quote);
    let mut out = String::with_capacity(raw.len() + 32);
    let mut copied = 0;
    let mut done = vec![false; set.len()];
    for span in &spans {
        let key = slice(span.key.clone());
        if remove.contains(&key) {
            out.push_str(slice(copied..span.whole.start));
            copied = span.whole.end;
        } else if let Some(at) = set.iter().position(|(name, _)| *name == key) {
            if let Some(flag) = done.get_mut(at) {
                *flag = true;
            }
            out.push_str(slice(copied..span.value.start));
            out.push_str(&escape(set[at].1));
            copied = span.value.end;
        }
    }
    let insert_at = spans
        .last()
        .map_or(name_end, |span| span.whole.end)
        .max(copied);
    out.push_str(slice(copied..insert_at));
    for ((key, value), done) in set.iter().zip(done) {
        if !done {
            out.push_str(&format!(" {key}={quote}{}{quote}", escape(*value)));
        }
    }
    out.push_str(slice(insert_at..raw.len()));
    out
}

/// The start tag an empty tag becomes when it gains content: `<a b='1'/>` gives `<a b='1'>`.
fn opened(raw: &str) -> String {
    let body = raw.strip_suffix("/>").unwrap_or(raw);
    format!("{}>", body.trim_end())
}

/// The output, holding back a run of whitespace until it is known whether the element after it
/// stays (a removed element takes the whitespace before it along, so no blank line is left).
#[derive(Debug, Default)]
struct Out<'t> {
    text: String,
    pending: Option<&'t str>,
}

impl<'t> Out<'t> {
    fn put(&mut self, text: &str) {
        if let Some(pending) = self.pending.take() {
            self.text.push_str(pending);
        }
        self.text.push_str(text);
    }

    fn blank(&mut self, text: &'t str) {
        if let Some(pending) = self.pending.replace(text) {
            self.text.push_str(pending);
        }
    }

    fn drop_blank(&mut self) {
        self.pending = None;
    }

    fn finish(mut self) -> String {
        self.put("");
        self.text
    }
}

/// A direct child of an element: an element (its first and last token) or another token.
#[derive(Debug, Clone, Copy)]
enum Child<'t> {
    Element {
        name: &'t str,
        first: usize,
        last: usize,
    },
    Node(usize),
}

struct Rewriter<'t, 'h> {
    tokens: &'t [Token<'t>],
    out: Out<'t>,
    how: &'h MountRewrite,
    uuid: String,
    macs: MacSource,
    /// Interfaces seen so far.
    nic: u64,
    /// Disk targets not yet used.
    targets: std::slice::Iter<'h, DiskTarget>,
    /// What was done to each interface so far.
    report: Vec<NicReport>,
}

impl<'t> Rewriter<'t, '_> {
    fn raw(&self, index: usize) -> &'t str {
        self.tokens.get(index).map_or("", |token| token.raw)
    }

    /// The direct children of the element whose start token is `index` (none for an empty tag).
    fn children(&self, index: usize) -> Vec<Child<'t>> {
        let Some(Token {
            kind: Kind::Start { end, .. },
            ..
        }) = self.tokens.get(index)
        else {
            return Vec::new();
        };
        let mut children = Vec::new();
        let mut at = index + 1;
        while at < *end {
            match self.tokens.get(at).map(|token| token.kind) {
                Some(Kind::Start { name, end }) => {
                    children.push(Child::Element {
                        name,
                        first: at,
                        last: end,
                    });
                    at = end;
                }
                Some(Kind::Empty { name }) => children.push(Child::Element {
                    name,
                    first: at,
                    last: at,
                }),
                _ => children.push(Child::Node(at)),
            }
            at += 1;
        }
        children
    }

    /// The whitespace that comes first inside an element, if any: how its children are indented.
    fn indent(&self, children: &[Child<'t>]) -> &'t str {
        match children.first() {
            Some(Child::Node(at)) if self.is_blank(*at) => self.raw(*at),
            _ => "",
        }
    }

    fn is_blank(&self, index: usize) -> bool {
        matches!(
            self.tokens.get(index).map(|token| token.kind),
            Some(Kind::Text { blank: true })
        )
    }

    /// Writes a token that is not an element: blank text is held back, the rest written.
    fn node(&mut self, index: usize) {
        if self.is_blank(index) {
            self.out.blank(self.raw(index));
        } else {
            self.out.put(self.raw(index));
        }
    }

    /// Writes tokens `first..=last` as they were, except that a `<seclabel>` with a `<label>` or
    /// `<imagelabel>` (at any depth) is left out with the whitespace before it.
    fn copy(&mut self, first: usize, last: usize) {
        let mut at = first;
        while at <= last {
            match self.tokens.get(at).map(|token| token.kind) {
                Some(Kind::Start {
                    name: "seclabel",
                    end,
                }) if self.has_label(at) => {
                    self.out.drop_blank();
                    at = end;
                }
                Some(Kind::Text { blank: true }) => self.out.blank(self.raw(at)),
                _ => self.out.put(self.raw(at)),
            }
            at += 1;
        }
    }

    fn document(&mut self) -> Result<(), String> {
        let mut at = 0;
        while let Some(token) = self.tokens.get(at) {
            match token.kind {
                Kind::Start {
                    name: "domain",
                    end,
                } => {
                    self.domain(at, end)?;
                    at = end;
                }
                Kind::Empty { name: "domain" } => {
                    self.out.put(&edit_tag(token.raw, &[], &["id"]));
                }
                _ => self.out.put(token.raw),
            }
            at += 1;
        }
        Ok(())
    }

    fn domain(&mut self, first: usize, last: usize) -> Result<(), String> {
        self.out.put(&edit_tag(self.raw(first), &[], &["id"]));
        let children = self.children(first);
        let has_uuid = children
            .iter()
            .any(|child| matches!(child, Child::Element { name: "uuid", .. }));
        let (mut name_done, mut uuid_done) = (false, false);
        for child in children {
            let Child::Element { name, first, last } = child else {
                if let Child::Node(at) = child {
                    self.node(at);
                }
                continue;
            };
            match name {
                "name" if !name_done => {
                    name_done = true;
                    let before = self.out.pending.unwrap_or("");
                    let new_name = self.how.display_name.clone();
                    self.replace_text(first, last, &new_name);
                    if !has_uuid {
                        let uuid = format!("{before}<uuid>{}</uuid>", self.uuid);
                        self.out.put(&uuid);
                    }
                }
                "uuid" if !uuid_done => {
                    uuid_done = true;
                    let uuid = self.uuid.clone();
                    self.replace_text(first, last, &uuid);
                }
                "devices" => self.devices(first, last)?,
                _ => self.copy(first, last),
            }
        }
        self.out.put(self.raw(last));
        Ok(())
    }

    /// Writes the element `first..=last` with `content` (escaped) as its only content.
    fn replace_text(&mut self, first: usize, last: usize, content: &str) {
        let raw = self.raw(first);
        let content = partial_escape(content);
        if first == last {
            let text = format!("{}{content}</{}>", opened(raw), tag_name(raw));
            self.out.put(&text);
        } else {
            self.out.put(raw);
            self.out.put(&content);
            self.out.put(self.raw(last));
        }
    }

    /// Whether a `<seclabel>` has a `<label>` or `<imagelabel>` child.
    fn has_label(&self, index: usize) -> bool {
        self.children(index).iter().any(|child| {
            matches!(
                child,
                Child::Element {
                    name: "label" | "imagelabel",
                    ..
                }
            )
        })
    }

    fn devices(&mut self, first: usize, last: usize) -> Result<(), String> {
        self.out.put(self.raw(first));
        if first == last {
            return Ok(());
        }
        for child in self.children(first) {
            match child {
                Child::Node(at) => self.node(at),
                Child::Element {
                    name: "disk",
                    first,
                    last,
                } => {
                    let device = attribute(self.raw(first), "device");
                    match device.as_deref().unwrap_or("disk") {
                        "disk" => {
                            let target = self.targets.next().ok_or_else(|| {
                                "the document has more disks than disk targets".to_owned()
                            })?;
                            self.disk(first, last, target)?;
                        }
                        "cdrom" => self.cdrom(first, last),
                        _ => self.copy(first, last),
                    }
                }
                Child::Element {
                    name: "interface",
                    first,
                    last,
                } => self.interface(first, last),
                Child::Element { first, last, .. } => self.copy(first, last),
            }
        }
        self.out.put(self.raw(last));
        Ok(())
    }

    fn disk(&mut self, first: usize, last: usize, target: &DiskTarget) -> Result<(), String> {
        const DRIVER_SET: &[(&str, &str)] = &[
            ("type", "raw"),
            ("error_policy", "stop"),
            ("rerror_policy", "stop"),
        ];
        let (kind, source) = match target {
            DiskTarget::RawFile(path) => ("file", format!("<source file='{}'/>", escape(path))),
            DiskTarget::Nfs { host, path } => (
                "network",
                format!(
                    "<source protocol='nfs' name='{}'><host name='{}'/></source>",
                    escape(path),
                    escape(host)
                ),
            ),
            DiskTarget::VmdkFile(_) => {
                return Err("a libvirt disk needs a RawFile or Nfs target".to_owned())
            }
        };
        let start = edit_tag(self.raw(first), &[("type", kind)], &[]);
        let children = self.children(first);
        let indent = self.indent(&children);
        let has = |wanted: &str| has_child(&children, wanted);
        let (has_driver, has_source) = (has("driver"), has("source"));
        if first == last {
            self.out.put(&opened(&start));
        } else {
            self.out.put(&start);
        }
        if !has_driver {
            self.out.put(&format!(
                "{indent}<driver name='qemu' type='raw' error_policy='stop' rerror_policy='stop'/>"
            ));
        }
        if !has_source {
            self.out.put(&format!("{indent}{source}"));
        }
        let (mut driver_done, mut source_done) = (false, false);
        for child in children {
            match child {
                Child::Node(at) => self.node(at),
                Child::Element {
                    name: "driver",
                    first,
                    last,
                } if !driver_done => {
                    driver_done = true;
                    // An outage of the store longer than the client's own patience pauses the
                    // VM (`virsh resume` retries the request) instead of failing the guest's
                    // I/O (decision 0031).
                    self.out.put(&edit_tag(self.raw(first), DRIVER_SET, &[]));
                    if first < last {
                        self.copy(first + 1, last);
                    }
                }
                Child::Element { name: "source", .. } if !source_done => {
                    source_done = true;
                    self.out.put(&source);
                }
                Child::Element {
                    name: "backingStore",
                    ..
                } => self.out.drop_blank(),
                Child::Element { first, last, .. } => self.copy(first, last),
            }
        }
        if first == last {
            self.out.put("</disk>");
        } else {
            self.out.put(self.raw(last));
        }
        Ok(())
    }

    /// A CD-ROM loses its `<source>` (the ISO is not in the backup) and with it the
    /// `<backingStore>` that describes that source's chain.
    fn cdrom(&mut self, first: usize, last: usize) {
        self.out.put(self.raw(first));
        if first == last {
            return;
        }
        for child in self.children(first) {
            match child {
                Child::Node(at) => self.node(at),
                Child::Element {
                    name: "source" | "backingStore",
                    ..
                } => self.out.drop_blank(),
                Child::Element { first, last, .. } => self.copy(first, last),
            }
        }
        self.out.put(self.raw(last));
    }

    /// One `<interface>`, as the network plan says: removed (with the whitespace before it);
    /// or with a new `<mac>`, its network, bridge or direct device renamed when the map names
    /// it, and (unless kept) `<link state='down'/>`. Disconnected and not mapped, a `network`,
    /// `bridge` or `direct` interface becomes `type='user'` and keeps only the children that
    /// name no host resource ([`USER_CHILDREN`]), so the domain starts on any host.
    fn interface(&mut self, first: usize, last: usize) {
        let how = self.how;
        let plan = &how.network;
        let number = self.nic;
        self.nic += 1;
        let children = self.children(first);
        let source = children.iter().find_map(|child| match child {
            Child::Element {
                name: "source",
                first,
                ..
            } => Some(*first),
            _ => None,
        });
        let kind = attribute(self.raw(first), "type");
        let (what, key) = match kind.as_deref() {
            Some("network") => ("network", "network"),
            Some("bridge") => ("bridge", "bridge"),
            Some("direct") => ("direct device", "dev"),
            _ => ("", ""),
        };
        let network = source
            .filter(|_| !key.is_empty())
            .and_then(|at| attribute(self.raw(at), key))
            .map(Cow::into_owned);
        let mut report = NicReport {
            nic: format!("interface {number}"),
            mac: None,
            // An interface of another kind that is not `user` (hostdev, vhostuser, vdpa,
            // ethernet, a socket) still needs its host resource: the report names its kind
            // rather than claiming it has none.
            kind: match (&network, kind.as_deref()) {
                (Some(_), _) => Some(what.to_owned()),
                (None, Some(other)) if key.is_empty() && other != "user" => {
                    Some(format!("{other} interface"))
                }
                _ => None,
            },
            network: network.clone(),
            mapped_to: None,
            action: NicAction::Removed,
        };
        if plan.mode == NetworkMode::Remove {
            self.out.drop_blank();
            self.report.push(report);
            return;
        }
        let mac = self.macs.next(number);
        let mapped_to = network
            .as_deref()
            .and_then(|old| plan.target(old))
            .map(str::to_owned);
        let detach = plan.mode == NetworkMode::Disconnect
            && !plan.legacy_link_down_only
            && !key.is_empty()
            && mapped_to.is_none();
        report.mac = Some(mac.clone());
        report.mapped_to.clone_from(&mapped_to);
        report.action = match plan.mode {
            NetworkMode::Keep => NicAction::Kept,
            _ if detach => NicAction::Detached,
            _ => NicAction::Disconnected,
        };
        self.report.push(report);
        let link = (plan.mode != NetworkMode::Keep).then_some("<link state='down'/>");
        let indent = self.indent(&children);
        let has = |wanted: &str| has_child(&children, wanted);
        let (has_mac, has_link) = (has("mac"), has("link"));
        let last_element = children
            .iter()
            .rposition(|child| matches!(child, Child::Element { .. }));
        let start = if detach {
            edit_tag(self.raw(first), &[("type", "user")], &[])
        } else {
            self.raw(first).to_owned()
        };
        if first == last {
            self.out.put(&opened(&start));
        } else {
            self.out.put(&start);
        }
        if !has_mac {
            self.out.put(&format!("{indent}<mac address='{mac}'/>"));
        }
        let added_link = link.filter(|_| !has_link);
        if let (Some(link), None) = (added_link, last_element) {
            self.out.put(&format!("{indent}{link}"));
        }
        let (mut mac_done, mut link_done) = (false, false);
        for (position, child) in children.into_iter().enumerate() {
            match child {
                Child::Node(at) => self.node(at),
                Child::Element { name, .. } if detach && !USER_CHILDREN.contains(&name) => {
                    self.out.drop_blank();
                }
                Child::Element {
                    name: "mac",
                    first,
                    last,
                } if !mac_done => {
                    mac_done = true;
                    self.out
                        .put(&edit_tag(self.raw(first), &[("address", &mac)], &[]));
                    if first < last {
                        self.copy(first + 1, last);
                    }
                }
                Child::Element {
                    name: "source",
                    first,
                    last,
                } if Some(first) == source && mapped_to.is_some() => {
                    let new = mapped_to.as_deref().unwrap_or_default();
                    // A live domain's `<source network=...>` names the old network's port and
                    // bridge, and a port group is the old network's: they go with it.
                    let remove: &[&str] = if key == "network" {
                        &["portid", "bridge", "portgroup"]
                    } else {
                        &[]
                    };
                    self.out
                        .put(&edit_tag(self.raw(first), &[(key, new)], remove));
                    if first < last {
                        self.copy(first + 1, last);
                    }
                }
                Child::Element { name: "link", .. } if link.is_some() => {
                    if link_done {
                        self.out.drop_blank();
                    } else {
                        link_done = true;
                        self.out.put(link.unwrap_or_default());
                    }
                }
                Child::Element { first, last, .. } => self.copy(first, last),
            }
            if let Some(link) = added_link.filter(|_| Some(position) == last_element) {
                self.out.put(&format!("{indent}{link}"));
            }
        }
        if first == last {
            self.out.put("</interface>");
        } else {
            self.out.put(self.raw(last));
        }
    }
}

/// The children a detached interface (now `type='user'`) keeps: the rest (`<source>`,
/// `<target>`, `<virtualport>`, `<vlan>`, `<bandwidth>`, `<filterref>`, `<driver>`, `<mtu>`,
/// `<port>`, `<tune>`, ...) name host resources or settings a user-mode NIC refuses.
const USER_CHILDREN: [&str; 8] = [
    "mac", "model", "address", "alias", "boot", "rom", "link", "acpi",
];

/// Whether `children` holds an element named `wanted`.
fn has_child(children: &[Child<'_>], wanted: &str) -> bool {
    children
        .iter()
        .any(|child| matches!(child, Child::Element { name, .. } if *name == wanted))
}

#[cfg(test)]
mod tests {
    use super::super::rewrite::{rewrite_for_mount, rewrite_for_mount_reported, NetworkPlan};
    use super::super::{parse, DiskRef, VmConfigError};
    use super::*;
    use crate::disk::DiskFormat;

    const UBUNTU: &[u8] = include_bytes!("../../testdata/kvm-ubuntu2204-db01.xml");
    const RHEL_BLOCK: &[u8] = include_bytes!("../../testdata/kvm-rhel9-app02-block.xml");
    const NEW_UUID: &str = "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9";

    fn how(disks: Vec<DiskTarget>, keep_network: bool) -> MountRewrite {
        MountRewrite {
            display_name: "db01-lm-3f2a".to_owned(),
            uuid: NEW_UUID.to_owned(),
            mac_seed: [0x33; 32],
            network: NetworkPlan {
                mode: if keep_network {
                    NetworkMode::Keep
                } else {
                    NetworkMode::Disconnect
                },
                ..NetworkPlan::default()
            },
            disks,
            convert: None,
        }
    }

    fn raw_targets() -> Vec<DiskTarget> {
        vec![
            DiskTarget::RawFile("/mnt/lm/db01/vda.raw".to_owned()),
            DiskTarget::RawFile("/mnt/lm/db01/vdb.raw".to_owned()),
        ]
    }

    fn rewrite_str(input: &[u8], how: &MountRewrite) -> String {
        String::from_utf8(rewrite_for_mount("db01.xml", input, how).unwrap()).unwrap()
    }

    /// Checks that `text` is well-formed XML by reading every event.
    fn well_formed(text: &str) {
        let mut reader = Reader::from_str(text);
        let mut depth = 0i32;
        loop {
            match reader.read_event().unwrap() {
                Event::Eof => break,
                Event::Start(_) => depth += 1,
                Event::End(_) => depth -= 1,
                _ => {}
            }
        }
        assert_eq!(depth, 0);
    }

    #[test]
    fn tokens_rebuild_the_testdata_byte_for_byte() {
        for input in [UBUNTU, RHEL_BLOCK] {
            let text = std::str::from_utf8(input).unwrap();
            let tokens = tokenize(text).unwrap();
            let rebuilt: String = tokens.iter().map(|token| token.raw).collect();
            assert_eq!(rebuilt, text);
            assert!(tokens.len() > 100);
            // Through the rewriter's output path, with whitespace held back and released.
            let how = how(Vec::new(), true);
            let mut rewriter = Rewriter {
                tokens: &tokens,
                out: Out::default(),
                how: &how,
                uuid: String::new(),
                macs: MacSource::qemu([0; 32]),
                nic: 0,
                targets: [].iter(),
                report: Vec::new(),
            };
            for at in 0..tokens.len() {
                rewriter.node(at);
            }
            assert_eq!(rewriter.out.finish(), text);
        }
    }

    #[test]
    fn edits_keep_quotes_order_and_spacing() {
        assert_eq!(
            edit_tag("<domain type='kvm' id='7'>", &[], &["id"]),
            "<domain type='kvm'>"
        );
        assert_eq!(
            edit_tag("<domain id=\"7\"  type='kvm'>", &[], &["id"]),
            "<domain  type='kvm'>"
        );
        assert_eq!(
            edit_tag(
                "<driver name='qemu' type='qcow2' discard='unmap'/>",
                &[("type", "raw")],
                &[]
            ),
            "<driver name='qemu' type='raw' discard='unmap'/>"
        );
        assert_eq!(
            edit_tag("<driver name=\"qemu\" />", &[("type", "raw")], &[]),
            "<driver name=\"qemu\" type=\"raw\" />"
        );
        assert_eq!(
            edit_tag("<disk>", &[("type", "file")], &[]),
            "<disk type='file'>"
        );
        assert_eq!(
            edit_tag("<mac address = 'x'/>", &[("address", "a'b&c")], &[]),
            "<mac address = 'a&apos;b&amp;c'/>"
        );
        assert_eq!(
            opened("<interface type='user'/>"),
            "<interface type='user'>"
        );
        assert_eq!(opened("<x />"), "<x>");
        assert_eq!(tag_name("<disk type='file'>"), "disk");
        assert_eq!(tag_name("<backingStore/>"), "backingStore");
        assert_eq!(
            attribute("<disk type='file' device=\"cd&amp;rom\">", "device").as_deref(),
            Some("cd&rom")
        );
        assert_eq!(attribute("<disk type='file'>", "device"), None);
    }

    #[test]
    fn ubuntu_raw_files_change_exactly_the_expected_parts() {
        let out = rewrite_str(UBUNTU, &how(raw_targets(), false));
        let mac = MacSource::qemu([0x33; 32]).next(0);
        let original = std::str::from_utf8(UBUNTU).unwrap();
        let expected = original
            .replace("<domain type='kvm' id='7'>", "<domain type='kvm'>")
            .replace(
                "<name>ubuntu22.04-db01</name>",
                "<name>db01-lm-3f2a</name>",
            )
            .replace(
                "<uuid>3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05</uuid>",
                &format!("<uuid>{NEW_UUID}</uuid>"),
            )
            .replace(
                "      <driver name='qemu' type='qcow2' discard='unmap'/>\n      <source file='/var/lib/libvirt/images/ubuntu22.04-db01.qcow2' index='3'/>\n      <backingStore type='file' index='4'>\n        <format type='qcow2'/>\n        <source file='/var/lib/libvirt/images/jammy-server-cloudimg-amd64.img'/>\n        <backingStore/>\n      </backingStore>\n",
                "      <driver name='qemu' type='raw' discard='unmap' error_policy='stop' rerror_policy='stop'/>\n      <source file='/mnt/lm/db01/vda.raw'/>\n",
            )
            .replace(
                "      <driver name='qemu' type='raw' cache='none' io='native'/>\n      <source file='/srv/vmdata/db01-pgdata.img' index='2'/>\n      <backingStore/>\n",
                "      <driver name='qemu' type='raw' cache='none' io='native' error_policy='stop' rerror_policy='stop'/>\n      <source file='/mnt/lm/db01/vdb.raw'/>\n",
            )
            .replace(
                "      <source file='/var/lib/libvirt/boot/ubuntu-22.04.4-live-server-amd64.iso' index='1'/>\n      <backingStore/>\n",
                "",
            )
            .replace(
                "    <interface type='network'>\n      <mac address='52:54:00:6b:3c:1d'/>\n      <source network='default' portid='b6a1f0c2-4e7d-4a93-8c15-0d2e9f3a7b64' bridge='virbr0'/>\n      <target dev='vnet6'/>\n",
                &format!("    <interface type='user'>\n      <mac address='{mac}'/>\n"),
            )
            .replace(
                "      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>\n    </interface>",
                "      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>\n      <link state='down'/>\n    </interface>",
            )
            .replace(
                "  <seclabel type='dynamic' model='apparmor' relabel='yes'>\n    <label>libvirt-3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05</label>\n    <imagelabel>libvirt-3f9c2a71-5be4-4d0e-9a86-c21f7d4e8b05</imagelabel>\n  </seclabel>\n  <seclabel type='dynamic' model='dac' relabel='yes'>\n    <label>+64055:+108</label>\n    <imagelabel>+64055:+108</imagelabel>\n  </seclabel>\n",
                "",
            );
        // Each replacement above must have applied.
        for gone in [
            "id='7'",
            "qcow2",
            "backingStore",
            "ubuntu-22.04.4-live-server-amd64.iso",
            "52:54:00:6b:3c:1d",
            "seclabel",
            "vnet6",
            "network='default'",
        ] {
            assert!(!expected.contains(gone), "{gone}");
        }
        assert_eq!(out, expected);
        well_formed(&out);

        let config = parse("db01.xml", out.as_bytes()).unwrap();
        assert_eq!(config.name, "db01-lm-3f2a");
        assert_eq!(config.uuid.as_deref(), Some(NEW_UUID));
        assert_eq!(
            config.disks,
            vec![
                DiskRef {
                    device: "vda".to_owned(),
                    path: "/mnt/lm/db01/vda.raw".to_owned(),
                    declared_format: Some(DiskFormat::Raw),
                },
                DiskRef {
                    device: "vdb".to_owned(),
                    path: "/mnt/lm/db01/vdb.raw".to_owned(),
                    declared_format: Some(DiskFormat::Raw),
                },
            ]
        );
    }

    #[test]
    fn ubuntu_over_nfs_with_network_kept() {
        let targets = vec![
            DiskTarget::Nfs {
                host: "10.0.0.5".to_owned(),
                path: "/livemount/db01-lm/vda.raw".to_owned(),
            },
            DiskTarget::Nfs {
                host: "10.0.0.5".to_owned(),
                path: "/livemount/db01-lm/o'brien & co.raw".to_owned(),
            },
        ];
        let out = rewrite_str(UBUNTU, &how(targets, true));
        well_formed(&out);
        assert!(out.contains(
            "    <disk type='network' device='disk'>\n      \
             <driver name='qemu' type='raw' discard='unmap' error_policy='stop' rerror_policy='stop'/>\n      \
             <source protocol='nfs' name='/livemount/db01-lm/vda.raw'><host name='10.0.0.5'/></source>\n      \
             <target dev='vda' bus='virtio'/>\n"
        ));
        assert!(out.contains(
            "    <disk type='network' device='disk'>\n      \
             <driver name='qemu' type='raw' cache='none' io='native' error_policy='stop' rerror_policy='stop'/>\n      \
             <source protocol='nfs' name='/livemount/db01-lm/o&apos;brien &amp; co.raw'><host name='10.0.0.5'/></source>\n      \
             <target dev='vdb' bus='virtio'/>\n"
        ));
        assert!(out.contains("    <disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>\n      <target dev='sda' bus='sata'/>\n"));
        assert!(!out.contains("<link"));
        assert!(!out.contains("backingStore"));
        assert!(out.contains("<mac address='52:54:00:"));
        // The parser refuses network disks; it gets that far, so the rest reads.
        let err = parse("db01.xml", out.as_bytes()).unwrap_err();
        assert!(matches!(err, VmConfigError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains("type='network'"), "{err}");
    }

    #[test]
    fn missing_pieces_are_added_and_links_replaced() {
        let input = "\u{feff}<?xml version='1.0'?>\r\n<!-- keep me -->\r\n<domain type=\"qemu\">\r\n  <name>a&amp;b</name>\r\n  <devices>\r\n    \
            <disk><source file='/img/a.qcow2'/><target dev='vda'/></disk>\r\n    \
            <interface type='network'>\r\n      <source network='default'/>\r\n      <link state='up'/>\r\n    </interface>\r\n    \
            <interface type='user'/>\r\n    \
            <interface type='bridge'><mac address='52:54:00:00:00:01'/></interface>\r\n    \
            <disk type='file' device='cdrom'/>\r\n    \
            <serial type='file'><source path='/log'>\r\n        <seclabel model='dac'><label>1:1</label></seclabel>\r\n      </source></serial>\r\n  </devices>\r\n  <seclabel type='none'/>\r\n</domain>\r\n";
        let how = how(vec![DiskTarget::RawFile("/x/a.raw".to_owned())], false);
        let out = rewrite_str(input.as_bytes(), &how);
        well_formed(out.trim_start_matches('\u{feff}'));
        let mut macs = MacSource::qemu([0x33; 32]);
        let (m0, m1, m2) = (macs.next(0), macs.next(1), macs.next(2));
        assert_eq!(
            out,
            format!(
                "\u{feff}<?xml version='1.0'?>\r\n<!-- keep me -->\r\n<domain type=\"qemu\">\r\n  <name>db01-lm-3f2a</name>\r\n  <uuid>{NEW_UUID}</uuid>\r\n  <devices>\r\n    \
                 <disk type='file'><driver name='qemu' type='raw' error_policy='stop' rerror_policy='stop'/><source file='/x/a.raw'/><target dev='vda'/></disk>\r\n    \
                 <interface type='user'>\r\n      <mac address='{m0}'/>\r\n      <link state='down'/>\r\n    </interface>\r\n    \
                 <interface type='user'><mac address='{m1}'/><link state='down'/></interface>\r\n    \
                 <interface type='user'><mac address='{m2}'/><link state='down'/></interface>\r\n    \
                 <disk type='file' device='cdrom'/>\r\n    \
                 <serial type='file'><source path='/log'>\r\n      </source></serial>\r\n  </devices>\r\n  <seclabel type='none'/>\r\n</domain>\r\n"
            )
        );
        let config = parse("a.xml", out.as_bytes()).unwrap();
        assert_eq!(config.uuid.as_deref(), Some(NEW_UUID));
        assert_eq!(config.disks[0].path, "/x/a.raw");
        assert_ne!(m0, m1);
        assert_ne!(m1, m2);
    }

    /// An interface that needs a host resource other than a network (a passed-through NIC)
    /// only gets its link down, and the report names its kind instead of "no host network".
    #[test]
    fn a_hostdev_nic_is_reported_by_its_kind() {
        let input = "<domain type='kvm'>\n  <name>a</name>\n  <devices>\n    \
            <disk><source file='/img/a.raw'/><target dev='vda'/></disk>\n    \
            <interface type='hostdev'>\n      <source><address type='pci' domain='0x0000' bus='0x3b' slot='0x10' function='0x2'/></source>\n    </interface>\n  \
            </devices>\n</domain>\n";
        let how = how(vec![DiskTarget::RawFile("/x/a.raw".to_owned())], false);
        let done = rewrite_for_mount_reported("a.xml", input.as_bytes(), &how).unwrap();
        let nic = &done.nics[0];
        assert_eq!(nic.kind.as_deref(), Some("hostdev interface"));
        assert_eq!(nic.action, NicAction::Disconnected);
        let line = nic.to_string();
        assert!(
            line.contains(": hostdev interface (disconnected)"),
            "{line}"
        );
        assert!(!line.contains("no host network"), "{line}");
        let out = String::from_utf8(done.bytes).unwrap();
        assert!(out.contains("<interface type='hostdev'>"), "{out}");
        assert!(out.contains("<link state='down'/>"), "{out}");
    }

    #[test]
    fn names_are_escaped() {
        let mut how = how(raw_targets(), true);
        how.display_name = "R&D <test> \u{2013} 'db'".to_owned();
        let out = rewrite_str(UBUNTU, &how);
        assert!(out.contains("<name>R&amp;D &lt;test&gt; \u{2013} 'db'</name>"));
        assert_eq!(
            parse("db01.xml", out.as_bytes()).unwrap().name,
            how.display_name
        );
    }

    #[test]
    fn same_seed_same_output_other_seed_other_macs() {
        let first = rewrite_str(UBUNTU, &how(raw_targets(), false));
        assert_eq!(first, rewrite_str(UBUNTU, &how(raw_targets(), false)));
        let mut other = how(raw_targets(), false);
        other.mac_seed = [0x34; 32];
        let second = rewrite_str(UBUNTU, &other);
        assert_ne!(first, second);
    }

    #[test]
    fn wrong_targets_are_invalid() {
        let err = rewrite_for_mount(
            "db01.xml",
            UBUNTU,
            &how(vec![DiskTarget::RawFile("/a".to_owned())], false),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "db01.xml: 1 disk target(s) given, but the config has 2 disk(s) (vda, vdb)"
        );
        let err = rewrite_for_mount(
            "db01.xml",
            UBUNTU,
            &how(
                vec![
                    DiskTarget::RawFile("/a".to_owned()),
                    DiskTarget::VmdkFile("b.vmdk".to_owned()),
                ],
                false,
            ),
        )
        .unwrap_err();
        assert!(matches!(err, VmConfigError::Invalid { .. }));
        assert_eq!(
            err.to_string(),
            "db01.xml: disk vdb: a libvirt disk needs a RawFile or Nfs target, not VmdkFile"
        );
        let err = rewrite_for_mount(
            "db01.xml",
            UBUNTU,
            &how(
                vec![
                    DiskTarget::RawFile("/a".to_owned()),
                    DiskTarget::Nfs {
                        host: "h".to_owned(),
                        path: "relative/b".to_owned(),
                    },
                ],
                false,
            ),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "db01.xml: disk vdb: the NFS path \"relative/b\" is not absolute"
        );
        // A config that does not parse gives its parse error.
        let err = rewrite_for_mount("rhel.xml", RHEL_BLOCK, &how(Vec::new(), false)).unwrap_err();
        assert!(err.to_string().contains("type='block'"), "{err}");
    }

    const WEB02: &[u8] = include_bytes!("../../testdata/kvm-debian12-web02-bridge.xml");

    fn plan(mode: NetworkMode, map: &[(&str, &str)], default_map: &[(&str, &str)]) -> MountRewrite {
        let pairs = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(old, new)| ((*old).to_owned(), (*new).to_owned()))
                .collect()
        };
        let mut how = how(
            vec![DiskTarget::RawFile("/mnt/lm/web02/vda.raw".to_owned())],
            false,
        );
        how.network = NetworkPlan {
            mode,
            map: pairs(map),
            default_map: pairs(default_map),
            legacy_link_down_only: false,
        };
        how
    }

    /// The text of the `<interface>` elements of a domain, each with the whitespace before it.
    fn interfaces(text: &str) -> Vec<&str> {
        let mut found = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("<interface") {
            let end = rest[at..].find("</interface>").unwrap() + at + "</interface>".len();
            found.push(&rest[at..end]);
            rest = &rest[end..];
        }
        found
    }

    /// A mount made before the network plan (`legacy_link_down_only`) serves what it did
    /// then: `disconnect` sets the link down and the NICs keep naming their bridge and
    /// network.
    #[test]
    fn a_legacy_disconnect_only_sets_the_link_down() {
        let mut how = plan(NetworkMode::Disconnect, &[], &[]);
        how.network.legacy_link_down_only = true;
        let done = rewrite_for_mount_reported("web02.xml", WEB02, &how).unwrap();
        let text = String::from_utf8(done.bytes).unwrap();
        let nics = interfaces(&text);
        assert_eq!(nics.len(), 2, "{text}");
        assert!(
            nics[0].starts_with("<interface type=\"bridge\">"),
            "{}",
            nics[0]
        );
        assert!(nics[0].contains("<source bridge="), "{}", nics[0]);
        assert!(
            nics[1].starts_with("<interface type='network'>"),
            "{}",
            nics[1]
        );
        assert!(nics[1].contains("<source network="), "{}", nics[1]);
        for nic in &nics {
            assert_eq!(nic.matches("<link state='down'/>").count(), 1, "{nic}");
        }
        assert!(done
            .nics
            .iter()
            .all(|n| n.action == NicAction::Disconnected));
    }

    #[test]
    fn bridge_testdata_parses_with_one_disk_and_a_cdrom() {
        let config = parse("web02.xml", WEB02).unwrap();
        assert_eq!(config.disks.len(), 1);
        assert_eq!(config.disks[0].device, "vda");
    }

    /// What each mode and map does to the bridge NIC and the network NIC of the testdata:
    /// (mode, map, default map, the interfaces after, the report's (mapped_to, action)).
    #[test]
    fn network_plans_on_a_bridge_and_a_network_nic() {
        let mut macs = MacSource::qemu([0x33; 32]);
        let (m0, m1) = (macs.next(0), macs.next(1));
        let bridge_detached = format!(
            "<interface type=\"user\">\n      <mac address=\"{m0}\"/>\n      <model type=\"virtio\"/>\n      <address type=\"pci\" domain=\"0x0000\" bus=\"0x01\" slot=\"0x00\" function=\"0x0\"/>\n      <link state='down'/>\n    </interface>"
        );
        let network_detached = format!(
            "<interface type='user'>\n      <mac address='{m1}'/>\n      <model type='e1000e'/>\n      <link state='down'/>\n      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>\n    </interface>"
        );
        let bridge_kept = |bridge: &str| {
            format!(
                "<interface type=\"bridge\">\n      <mac address=\"{m0}\"/>\n      <source bridge=\"{bridge}\"/>\n      <vlan>\n        <tag id=\"120\"/>\n      </vlan>\n      <target dev=\"vnet3\"/>\n      <model type=\"virtio\"/>\n      <driver name=\"vhost\" queues=\"2\"/>\n      <mtu size=\"9000\"/>\n      <address type=\"pci\" domain=\"0x0000\" bus=\"0x01\" slot=\"0x00\" function=\"0x0\"/>\n    </interface>"
            )
        };
        let bridge_down = |bridge: &str| {
            bridge_kept(bridge).replace(
                "function=\"0x0\"/>\n    </interface>",
                "function=\"0x0\"/>\n      <link state='down'/>\n    </interface>",
            )
        };
        let network = |name: &str, link: &str| {
            format!(
                "<interface type='network'>\n      <mac address='{m1}'/>\n      <source network='{name}'/>\n      <bandwidth>\n        <outbound average='128000'/>\n      </bandwidth>\n      <model type='e1000e'/>\n      <link state='{link}'/>\n      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>\n    </interface>"
            )
        };
        use NetworkMode::*;
        use NicAction::*;
        type Case<'a> = (
            NetworkMode,
            &'a [(&'a str, &'a str)],
            &'a [(&'a str, &'a str)],
            Vec<String>,
            Vec<(Option<&'a str>, NicAction)>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                Disconnect,
                &[],
                &[],
                vec![bridge_detached.clone(), network_detached.clone()],
                vec![(None, Detached), (None, Detached)],
            ),
            (
                Disconnect,
                &[("backup-net", "lab")],
                &[],
                vec![bridge_detached.clone(), network("lab", "down")],
                vec![(None, Detached), (Some("lab"), Disconnected)],
            ),
            (
                Disconnect,
                &[("br-prod", "br-lab")],
                &[("backup-net", "lab"), ("nosuch", "x")],
                vec![bridge_down("br-lab"), network("lab", "down")],
                vec![(Some("br-lab"), Disconnected), (Some("lab"), Disconnected)],
            ),
            // The request's map wins over the default map.
            (
                Keep,
                &[("br-prod", "br-lab")],
                &[("br-prod", "br-other")],
                vec![bridge_kept("br-lab"), network("backup-net", "up")],
                vec![(Some("br-lab"), Kept), (None, Kept)],
            ),
            (
                Keep,
                &[],
                &[],
                vec![bridge_kept("br-prod"), network("backup-net", "up")],
                vec![(None, Kept), (None, Kept)],
            ),
            (
                Remove,
                &[],
                &[("backup-net", "lab")],
                vec![],
                vec![(None, Removed), (None, Removed)],
            ),
        ];
        for (mode, map, default_map, expected, actions) in cases {
            let how = plan(mode, map, default_map);
            let done = rewrite_for_mount_reported("web02.xml", WEB02, &how).unwrap();
            let out = String::from_utf8(done.bytes).unwrap();
            well_formed(&out);
            assert_eq!(
                interfaces(&out),
                expected,
                "{mode:?} {map:?} {default_map:?}"
            );
            let got: Vec<(Option<&str>, NicAction)> = done
                .nics
                .iter()
                .map(|nic| (nic.mapped_to.as_deref(), nic.action))
                .collect();
            assert_eq!(got, actions, "{mode:?} {map:?}");
            assert_eq!(done.nics[0].kind.as_deref(), Some("bridge"));
            assert_eq!(done.nics[0].network.as_deref(), Some("br-prod"));
            assert_eq!(done.nics[1].kind.as_deref(), Some("network"));
            assert_eq!(done.nics[1].network.as_deref(), Some("backup-net"));
            // Outside the interfaces, the same bytes as with any other plan.
            let baseline = rewrite_str(WEB02, &plan(Keep, &[], &[]));
            let strip = |text: &str| {
                let mut text = text.to_owned();
                for nic in interfaces(&text.clone()) {
                    text = text.replacen(nic, "", 1);
                }
                text.replace("    \n", "").replace("\n    \n", "\n")
            };
            if mode != Remove {
                assert_eq!(strip(&out), strip(&baseline));
            } else {
                assert!(!out.contains("<interface"));
                assert!(out.contains("    </controller>\n    <!-- the front-end NIC, on the production VLAN's bridge -->\n    <serial type='pty'>"), "{out}");
            }
            // The SATA CD-ROM keeps its target and loses its ISO.
            assert!(out.contains("<disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>\n      <target dev='sda' bus='sata'/>\n      <readonly/>"), "{out}");
            assert_eq!(parse("web02.xml", out.as_bytes()).unwrap().disks.len(), 1);
        }
    }

    #[test]
    fn the_report_reads_as_a_sentence() {
        let done = rewrite_for_mount_reported(
            "web02.xml",
            WEB02,
            &plan(NetworkMode::Disconnect, &[("backup-net", "lab")], &[]),
        )
        .unwrap();
        let mut macs = MacSource::qemu([0x33; 32]);
        let (m0, m1) = (macs.next(0), macs.next(1));
        let lines: Vec<String> = done.nics.iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                format!("NIC interface 0 ({m0}): bridge br-prod (disconnected, now type='user' with no host network)"),
                format!("NIC interface 1 ({m1}): network backup-net -> lab (disconnected)"),
            ]
        );
    }

    #[test]
    fn a_map_entry_no_nic_uses_is_an_error_naming_it() {
        let err = rewrite_for_mount(
            "web02.xml",
            WEB02,
            &plan(
                NetworkMode::Disconnect,
                &[("defualt", "lab"), ("br-prod", "br0")],
                &[],
            ),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "web02.xml: network map: no NIC uses \"defualt\" (the config's NICs use: bridge \"br-prod\", network \"backup-net\")"
        );
        let err = rewrite_for_mount(
            "web02.xml",
            WEB02,
            &plan(NetworkMode::Remove, &[("br-prod", "br0")], &[]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "web02.xml: a network map has no use when the NICs are removed"
        );
        let err = rewrite_for_mount(
            "web02.xml",
            WEB02,
            &plan(NetworkMode::Keep, &[("br-prod", "")], &[]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("a name is empty"), "{err}");
    }

    #[test]
    fn a_live_domains_network_source_loses_its_port_and_bridge_when_mapped() {
        let mut how = how(raw_targets(), false);
        how.network
            .map
            .insert("default".to_owned(), "lab".to_owned());
        let out = rewrite_str(UBUNTU, &how);
        assert!(out.contains("<interface type='network'>"), "{out}");
        assert!(
            out.contains("      <source network='lab'/>\n      <target dev='vnet6'/>\n"),
            "{out}"
        );
        assert!(out.contains("<link state='down'/>"));
        let input = "<domain><name>n</name><devices><interface type='network'><source network='prod' portgroup='vlan7'/></interface></devices></domain>";
        let mut kept = super::tests::how(Vec::new(), true);
        kept.network.map.insert("prod".to_owned(), "lab".to_owned());
        let out = rewrite_str(input.as_bytes(), &kept);
        assert!(out.contains("<source network='lab'/>"), "{out}");
    }

    proptest::proptest! {
        #[test]
        fn rewrite_never_panics_on_xml_like_devices(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "<disk type='file' device='disk'><source file='/a'/><target dev='vda'/></disk>",
                    "<disk><driver type='raw' io='native'/><source file='/b'/><backingStore/><target dev='vdb'/></disk>",
                    "<disk type='file'>\n  <driver name='q' type='qcow2'>\n  </driver>\n  <source file='/c' index='1'>\n  <seclabel/></source>\n  <backingStore type='file'><source file='/base'/></backingStore>\n  <target dev='vdc'/>\n</disk>",
                    "<disk type='file' device='cdrom'/>",
                    "<disk type='file' device='cdrom'>\n<source file='/i.iso'/>\n<backingStore/>\n<target dev='sda'/>\n</disk>",
                    "<disk device='floppy'><source file='/f'/><target dev='fda'/></disk>",
                    "<interface type='network'>\n<mac address='52:54:00:00:00:01'/>\n</interface>",
                    "<interface type='user'/>", "<interface type='bridge'>  </interface>",
                    "<interface><link state='up'/><link/><mac address='x'><x/></mac></interface>",
                    "<interface><link state='up'>\n</link></interface>",
                    "<seclabel><label>l</label></seclabel>", "<seclabel type='none'/>",
                    "<!-- c -->", "&amp;", " ", "\n", "\r\n", "text", "<a b=c>", "<",
                ]),
                0..12,
            ),
            nfs in proptest::bool::ANY,
            keep in proptest::bool::ANY,
        ) {
            let text = format!(
                "<domain type='kvm' id='1'><name>n</name><devices>{}</devices></domain>",
                parts.concat()
            );
            let count = parse("p.xml", text.as_bytes()).map_or(0, |config| config.disks.len());
            let targets = (0..count)
                .map(|n| {
                    if nfs {
                        DiskTarget::Nfs { host: "h".to_owned(), path: format!("/e/{n}.raw") }
                    } else {
                        DiskTarget::RawFile(format!("/e/{n}.raw"))
                    }
                })
                .collect();
            let result = rewrite_for_mount("p.xml", text.as_bytes(), &how(targets, keep));
            if let Ok(out) = result {
                let out = String::from_utf8(out).unwrap();
                well_formed(&out);
                let reparsed = parse("p.xml", out.as_bytes());
                if nfs && count > 0 {
                    let refused = matches!(reparsed, Err(VmConfigError::Invalid { .. }));
                    proptest::prop_assert!(refused, "{:?}", reparsed);
                } else {
                    let config = reparsed.unwrap();
                    proptest::prop_assert_eq!(config.name, "db01-lm-3f2a");
                    proptest::prop_assert_eq!(config.uuid.as_deref(), Some(NEW_UUID));
                    proptest::prop_assert_eq!(config.disks.len(), count);
                }
            }
        }
    }
}
