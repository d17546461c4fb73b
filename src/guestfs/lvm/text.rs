//! LVM2's text metadata format, parsed by our own small bounded parser: sections
//! `name { ... }`, `key = value`, values that are strings (`"..."` with `\"` and `\\`
//! escapes), integers, or arrays of those (`[ "a", 1 ]`); `#` starts a comment to the end of
//! the line. Nothing else LVM writes is needed (no floats in a volume group's metadata).
//!
//! Must not: recurse deeper than [`MAX_DEPTH`] sections, keep more than [`MAX_ITEMS`] items in
//! all, or panic on any input (the text comes from a guest's disk).

/// Deepest nesting of sections (LVM writes 4: VG, its lists, an LV, a segment).
pub const MAX_DEPTH: usize = 8;
/// The most items (keys, sections, array elements) one metadata text may hold.
pub const MAX_ITEMS: usize = 200_000;
/// The longest name or string.
pub const MAX_TOKEN: usize = 4096;

/// A value of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    Int(i64),
    Array(Vec<Value>),
}

/// A section: its keys and its subsections, in the order written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Section {
    pub keys: Vec<(String, Value)>,
    pub sections: Vec<(String, Section)>,
}

impl Section {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.keys.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        match self.get(key) {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        }
    }

    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// Whether the array `key` holds the string `flag` (`status = ["READ", "VISIBLE"]`).
    pub fn has_flag(&self, key: &str, flag: &str) -> bool {
        matches!(self.get(key), Some(Value::Array(a)) if a.iter().any(|v| *v == Value::Str(flag.into())))
    }
}

struct Parser<'a> {
    b: &'a [u8],
    pos: usize,
    items: usize,
}

/// Parses a whole metadata text into its top section.
pub fn parse(text: &[u8]) -> Result<Section, String> {
    let mut p = Parser {
        b: text,
        pos: 0,
        items: 0,
    };
    let top = p.section_body(0)?;
    p.skip_space();
    if p.pos < p.b.len() && p.b[p.pos] != 0 {
        return Err(format!("metadata text: unexpected `}}` at byte {}", p.pos));
    }
    Ok(top)
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-' | b'+')
}

impl Parser<'_> {
    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("metadata text: {what} at byte {}", self.pos))
    }

    fn skip_space(&mut self) {
        while self.pos < self.b.len() {
            match self.b[self.pos] {
                b' ' | b'\t' | b'\r' | b'\n' => self.pos += 1,
                b'#' => {
                    while self.pos < self.b.len() && self.b[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn count(&mut self) -> Result<(), String> {
        self.items += 1;
        if self.items > MAX_ITEMS {
            return self.err(&format!("more than {MAX_ITEMS} items"));
        }
        Ok(())
    }

    fn name(&mut self) -> Result<String, String> {
        let start = self.pos;
        while self.pos < self.b.len() && is_name_byte(self.b[self.pos]) {
            self.pos += 1;
        }
        if self.pos == start {
            return self.err("a name was expected");
        }
        if self.pos - start > MAX_TOKEN {
            return self.err(&format!("a name longer than {MAX_TOKEN} bytes"));
        }
        Ok(String::from_utf8_lossy(&self.b[start..self.pos]).into_owned())
    }

    /// Keys and sections up to a `}` (not taken) or the end (a NUL ends the text too).
    fn section_body(&mut self, depth: usize) -> Result<Section, String> {
        let mut s = Section::default();
        loop {
            self.skip_space();
            match self.b.get(self.pos) {
                None | Some(b'}') | Some(0) => return Ok(s),
                _ => {}
            }
            let name = self.name()?;
            self.count()?;
            self.skip_space();
            match self.b.get(self.pos) {
                Some(b'=') => {
                    self.pos += 1;
                    self.skip_space();
                    let v = self.value(true)?;
                    s.keys.push((name, v));
                }
                Some(b'{') => {
                    if depth + 1 >= MAX_DEPTH {
                        return self.err(&format!("sections nested deeper than {MAX_DEPTH}"));
                    }
                    self.pos += 1;
                    let sub = self.section_body(depth + 1)?;
                    if self.b.get(self.pos) != Some(&b'}') {
                        return self.err(&format!("section {name} is not closed"));
                    }
                    self.pos += 1;
                    s.sections.push((name, sub));
                }
                _ => return self.err(&format!("`=` or `{{` was expected after {name}")),
            }
        }
    }

    fn value(&mut self, array_ok: bool) -> Result<Value, String> {
        match self.b.get(self.pos) {
            Some(b'"') => self.string().map(Value::Str),
            Some(b'[') if array_ok => {
                self.pos += 1;
                let mut out = Vec::new();
                loop {
                    self.skip_space();
                    if self.b.get(self.pos) == Some(&b']') {
                        self.pos += 1;
                        return Ok(Value::Array(out));
                    }
                    if !out.is_empty() {
                        if self.b.get(self.pos) != Some(&b',') {
                            return self.err("`,` or `]` was expected in an array");
                        }
                        self.pos += 1;
                        self.skip_space();
                    }
                    self.count()?;
                    out.push(self.value(false)?);
                }
            }
            Some(c) if c.is_ascii_digit() || *c == b'-' => self.int(),
            _ => self.err("a value was expected"),
        }
    }

    fn int(&mut self) -> Result<Value, String> {
        let start = self.pos;
        if self.b.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        while self.pos < self.b.len() && self.b[self.pos].is_ascii_digit() {
            self.pos += 1;
        }
        let t = std::str::from_utf8(&self.b[start..self.pos]).unwrap_or("");
        match t.parse::<i64>() {
            Ok(v) => Ok(Value::Int(v)),
            Err(_) => {
                self.pos = start;
                self.err("an integer that does not fit 64 bits")
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.pos += 1; // the opening quote
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.b.get(self.pos) else {
                return self.err("a string is not closed");
            };
            self.pos += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.b.get(self.pos) else {
                        return self.err("a string is not closed");
                    };
                    self.pos += 1;
                    out.push(e);
                }
                _ => out.push(c),
            }
            if out.len() > MAX_TOKEN {
                return self.err(&format!("a string longer than {MAX_TOKEN} bytes"));
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lvm_metadata_shapes() {
        let t = br#"vg0 {
id = "abc"
seqno = 3
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192 # 4 MiB
physical_volumes {
pv0 {
device = "/dev/sda2" # Hint only
pe_start = 2048
}
}
logical_volumes {
root {
segment1 {
stripes = [
"pv0", 0
]
}
}
}
}
# Generated by LVM2
contents = "Text \"Format\" \\ Volume"
version = 1
"#;
        let top = parse(t).unwrap();
        let vg = top.section("vg0").unwrap();
        assert_eq!(vg.str("id"), Some("abc"));
        assert_eq!(vg.int("extent_size"), Some(8192));
        assert!(vg.has_flag("status", "READ"));
        assert_eq!(vg.get("flags"), Some(&Value::Array(vec![])));
        let seg = vg
            .section("logical_volumes")
            .and_then(|l| l.section("root"))
            .and_then(|r| r.section("segment1"))
            .unwrap();
        assert_eq!(
            seg.get("stripes"),
            Some(&Value::Array(vec![Value::Str("pv0".into()), Value::Int(0)]))
        );
        assert_eq!(top.str("contents"), Some("Text \"Format\" \\ Volume"));
        assert_eq!(top.int("version"), Some(1));
    }

    #[test]
    fn damaged_texts_are_errors() {
        for (t, want) in [
            (&b"a { b = 1"[..], "not closed"),
            (b"a = \"x", "not closed"),
            (b"a = [1 2]", "`,` or `]`"),
            (b"a = [[1]]", "a value was expected"),
            (b"a = 99999999999999999999", "64 bits"),
            (b"a b", "`=` or `{`"),
            (b"}", "unexpected"),
            (b"= 1", "a name"),
        ] {
            let e = parse(t).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
        let deep = "a {".repeat(MAX_DEPTH + 1) + &"}".repeat(MAX_DEPTH + 1);
        assert!(parse(deep.as_bytes()).unwrap_err().contains("deeper"));
        let many = "a = 1\n".repeat(MAX_ITEMS + 1);
        assert!(parse(many.as_bytes()).unwrap_err().contains("items"));
        let long = format!("a = \"{}\"", "x".repeat(MAX_TOKEN + 1));
        assert!(parse(long.as_bytes()).unwrap_err().contains("longer"));
    }
}
