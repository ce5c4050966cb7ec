//! How shadir keys and entries become file names (documented in the README, "Naming").
//!
//! Escaping (keys and entry labels alike): `%`, `/`, control characters (0x00-0x1F,
//! 0x7F) become `%XX` (uppercase hex); a name equal to `.`, `..` or a reserved name gets
//! its first character escaped the same way (`.sha512` → `%2Esha512`). Escaping `%`
//! itself keeps the rule reversible: a key directory name decodes back to exactly one
//! key, and a name that is not the canonical escape of its decoding is not a key.
//! A key whose escaped name would exceed 255 bytes is shown as its first bytes, `%~`
//! and a digest of the whole key; such names are found only through the known-keys table.
//!
//! Entry labels: the first usable of `file_name`, `basename`, `title`, `file` (the
//! placeholders `notused` and `file` are not names), the last path segment of `url`,
//! then of `software_url`; else the first 16 hex digits of the blob's SHA-512. Entries
//! with one label and one blob are one file (the newest entry's metadata wins); one
//! label and several blobs: the newest (largest numeric `timestamp`, entries without
//! one oldest, ties broken by the smaller SHA-512) keeps the bare label, the others are
//! `<label>~<first 12 hex digits of their SHA-512>`. Names never depend on the server's
//! order.

use crate::digest::Sha512;
use serde_json::{Map, Value};
use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};

/// Longest file name the kernel takes.
pub const NAME_MAX: usize = 255;
/// Names shacachefs keeps for itself at the root.
pub const ROOT_RESERVED: &[&str] = &[".sha512"];
/// Names shacachefs keeps for itself in a key directory.
pub const KEY_RESERVED: &[&str] = &["latest", ".entries.json"];

/// Label fields, most specific first.
const LABEL_FIELDS: &[&str] = &["file_name", "basename", "title", "file"];
/// Values of `file` that are placeholders, not names.
const PLACEHOLDERS: &[&str] = &["notused", "file"];

fn needs_escape(c: char) -> bool {
    c == '%' || c == '/' || (c as u32) < 0x20 || c == '\u{7f}'
}

fn push_escaped(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        out.push_str(&format!("%{b:02X}"));
    }
}

/// Escapes a string into a usable file name (without the length rule).
pub fn escape(s: &str, reserved: &[&str]) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if needs_escape(c) {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    if out.is_empty() {
        return out;
    }
    if out == "." || out == ".." || reserved.contains(&out.as_str()) {
        let first = out.chars().next().unwrap_or('.');
        let mut escaped = String::new();
        push_escaped(&mut escaped, first);
        escaped.push_str(&out[first.len_utf8()..]);
        out = escaped;
    }
    out
}

/// Reverses [`escape`]; `None` when `name` is not the canonical escape of anything.
pub fn unescape(name: &str, reserved: &[&str]) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = name.get(i + 1..i + 3)?;
            if !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
            {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).ok()?;
    (escape(&decoded, reserved) == name).then_some(decoded)
}

/// The directory name of a key at the mount's root.
pub fn key_dir_name(key: &str) -> String {
    let name = escape(key, ROOT_RESERVED);
    if name.len() <= NAME_MAX {
        return name;
    }
    let digest = Sha512::of(key.as_bytes()).short(32);
    let keep = truncate_at_boundary(&name, NAME_MAX - 2 - digest.len());
    format!("{keep}%~{digest}")
}

/// The key a root directory name stands for, when the name can be decoded (long keys
/// shown with a digest must be looked up in the known-keys table instead).
pub fn key_from_dir_name(name: &str) -> Option<String> {
    if name.is_empty() || name.contains("%~") {
        return None;
    }
    unescape(name, ROOT_RESERVED)
}

/// Cuts an escaped name to at most `max` bytes without splitting a character or a
/// `%XX` sequence.
fn truncate_at_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    // Do not leave half of a %XX behind.
    if let Some(p) = s[..end].rfind('%') {
        if end - p < 3 {
            end = p;
        }
    }
    &s[..end]
}

fn last_segment(url: &str) -> Option<&str> {
    let url = url.split(['?', '#']).next().unwrap_or(url);
    let url = url.trim_end_matches('/');
    let seg = url.rsplit('/').next()?;
    // A bare "http:" is not a name.
    (!seg.is_empty() && !seg.ends_with(':')).then_some(seg)
}

/// The raw label of an entry's metadata (before escaping), if any field gives one.
pub fn raw_label(metadata: &Map<String, Value>) -> Option<String> {
    for field in LABEL_FIELDS {
        if let Some(Value::String(s)) = metadata.get(*field) {
            if !s.is_empty() && !PLACEHOLDERS.contains(&s.as_str()) {
                return Some(s.clone());
            }
        }
    }
    for field in ["url", "software_url"] {
        if let Some(Value::String(s)) = metadata.get(field) {
            if let Some(seg) = last_segment(s) {
                return Some(seg.to_string());
            }
        }
    }
    None
}

/// Room left for `~` and 12 hex digits after a label.
const LABEL_MAX: usize = NAME_MAX - 13;

/// The file-name label of an entry: escaped, not reserved, at most 242 bytes.
pub fn label(metadata: &Map<String, Value>, sha: &Sha512) -> String {
    let raw = raw_label(metadata).unwrap_or_else(|| sha.short(16));
    let escaped = escape(&raw, KEY_RESERVED);
    let cut = truncate_at_boundary(&escaped, LABEL_MAX);
    if cut.is_empty() {
        sha.short(16)
    } else {
        cut.to_string()
    }
}

/// What naming needs of an entry.
pub trait Nameable {
    fn sha512(&self) -> Sha512;
    fn metadata(&self) -> &Map<String, Value>;
    fn timestamp(&self) -> Option<f64> {
        self.metadata().get("timestamp").and_then(Value::as_f64)
    }
}

/// Shared entries name like the entries themselves (a publish renames a listing's
/// entries without copying them).
impl<T: Nameable + ?Sized> Nameable for std::sync::Arc<T> {
    fn sha512(&self) -> Sha512 {
        (**self).sha512()
    }
    fn metadata(&self) -> &Map<String, Value> {
        (**self).metadata()
    }
}

/// Newest first: larger timestamp, entries without one last, then smaller SHA-512.
pub fn newest_first<E: Nameable>(a: &E, b: &E) -> Ordering {
    let ta = a.timestamp().filter(|t| !t.is_nan());
    let tb = b.timestamp().filter(|t| !t.is_nan());
    match (ta, tb) {
        (Some(x), Some(y)) => y.partial_cmp(&x).unwrap_or(Ordering::Equal),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
    .then_with(|| a.sha512().cmp(&b.sha512()))
}

/// The files of one key directory: each name with the entry it shows, sorted by name,
/// and the name `latest` points to (the newest entry that has a numeric timestamp).
pub struct Named<E> {
    pub files: Vec<(String, E)>,
    pub latest: Option<String>,
}

/// Names a key's entries by the rules in this module's documentation.
pub fn name_entries<E: Nameable>(mut entries: Vec<E>) -> Named<E> {
    entries.sort_by(newest_first);
    // label → blobs in newest-first order; the first entry seen for a (label, blob)
    // is the newest, so its metadata wins.
    let mut by_label: BTreeMap<String, Vec<E>> = BTreeMap::new();
    let mut seen: HashSet<(String, Sha512)> = HashSet::new();
    for e in entries {
        let l = label(e.metadata(), &e.sha512());
        if seen.insert((l.clone(), e.sha512())) {
            by_label.entry(l).or_default().push(e);
        }
    }
    let bare: HashSet<String> = by_label.keys().cloned().collect();
    let mut taken: HashSet<String> = bare.clone();
    let mut files: Vec<(String, E)> = Vec::new();
    let mut newest: Option<(String, usize)> = None;
    for (l, group) in by_label {
        for (i, e) in group.into_iter().enumerate() {
            let name = if i == 0 {
                l.clone()
            } else {
                let short = format!("{l}~{}", e.sha512().short(12));
                if taken.insert(short.clone()) {
                    short
                } else {
                    // Only an adversarial label can collide here; the full digest cannot
                    // collide with another blob's.
                    let full = format!(
                        "{}~{}",
                        truncate_at_boundary(&l, NAME_MAX - 129),
                        e.sha512().hex()
                    );
                    taken.insert(full.clone());
                    full
                }
            };
            files.push((name, e));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    for (idx, (name, e)) in files.iter().enumerate() {
        if e.timestamp().is_some_and(|t| !t.is_nan()) {
            let better = match &newest {
                None => true,
                Some((_, j)) => newest_first(e, &files[*j].1) == Ordering::Less,
            };
            if better {
                newest = Some((name.clone(), idx));
            }
        }
    }
    Named {
        files,
        latest: newest.map(|(n, _)| n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Clone)]
    struct E(Sha512, Map<String, Value>);
    impl Nameable for E {
        fn sha512(&self) -> Sha512 {
            self.0
        }
        fn metadata(&self) -> &Map<String, Value> {
            &self.1
        }
    }
    fn e(content: &str, meta: Value) -> E {
        E(
            Sha512::of(content.as_bytes()),
            meta.as_object().unwrap().clone(),
        )
    }
    fn names(v: Vec<E>) -> (Vec<String>, Option<String>) {
        let n = name_entries(v);
        (n.files.into_iter().map(|(n, _)| n).collect(), n.latest)
    }

    #[test]
    fn escape_round_trips_and_refuses_aliases() {
        for key in [
            "plain",
            "a/b",
            "100%",
            "nul\0x",
            "line\nbreak",
            ".",
            "..",
            ".sha512",
            "é ü",
            "%2F",
        ] {
            let name = escape(key, ROOT_RESERVED);
            assert!(!name.contains('/') && !name.contains('\0'));
            assert_ne!(name, ".");
            assert_ne!(name, "..");
            assert_eq!(
                unescape(&name, ROOT_RESERVED).as_deref(),
                Some(key),
                "{key}"
            );
        }
        assert_eq!(escape(".sha512", ROOT_RESERVED), "%2Esha512");
        assert_eq!(escape("a/b%", ROOT_RESERVED), "a%2Fb%25");
        // Not canonical: `%41` would decode to `A`, whose name is `A`.
        assert_eq!(unescape("%41", ROOT_RESERVED), None);
        assert_eq!(unescape("%2f", ROOT_RESERVED), None);
        assert_eq!(unescape("50%", ROOT_RESERVED), None);
        assert_eq!(unescape(".sha512", ROOT_RESERVED), None);
    }

    #[test]
    fn long_keys_get_a_digest_name() {
        let key = "k".repeat(300);
        let name = key_dir_name(&key);
        assert!(name.len() <= NAME_MAX);
        assert!(name.contains("%~"));
        assert_eq!(key_from_dir_name(&name), None);
        let key = "/".repeat(100); // 300 bytes once escaped
        let name = key_dir_name(&key);
        assert!(name.len() <= NAME_MAX);
        assert!(!name.ends_with('%'));
    }

    #[test]
    fn label_priority_and_placeholders() {
        let sha = Sha512::of(b"x");
        let l = |v: Value| label(v.as_object().unwrap(), &sha);
        assert_eq!(l(json!({"file_name": "a", "basename": "b"})), "a");
        assert_eq!(l(json!({"basename": "b", "title": "t"})), "b");
        assert_eq!(
            l(json!({"file": "notused", "urlmd5": "notused", "title": 3})),
            sha.short(16)
        );
        assert_eq!(
            l(json!({"file": "file", "url": "https://h/p/aspell-0.60.7.tar.gz?x=1"})),
            "aspell-0.60.7.tar.gz"
        );
        assert_eq!(
            l(json!({"software_url": "https://lab/slapos/software.cfg"})),
            "software.cfg"
        );
        assert_eq!(l(json!({"url": "http://"})), sha.short(16));
    }

    #[test]
    fn hostile_labels_stay_inside_the_directory() {
        let sha = Sha512::of(b"x");
        for raw in [
            "..",
            ".",
            "a/b",
            "../../etc/passwd",
            "nul\0",
            "\u{1}ctl",
            "latest",
            ".entries.json",
        ] {
            let l = label(json!({"file": raw}).as_object().unwrap(), &sha);
            assert!(!l.contains('/') && !l.contains('\0') && !l.chars().any(|c| c.is_control()));
            assert!(
                l != "." && l != ".." && l != "latest" && l != ".entries.json",
                "{raw} -> {l}"
            );
        }
        let long = "é".repeat(150); // 300 bytes
        let l = label(json!({"file": long}).as_object().unwrap(), &sha);
        assert!(l.len() <= LABEL_MAX && !l.is_empty());
    }

    #[test]
    fn duplicates_and_versions() {
        let (n, latest) = names(vec![
            e("old", json!({"file": "a.tgz", "timestamp": 1.0})),
            e("new", json!({"file": "a.tgz", "timestamp": 2.0})),
            e("new", json!({"file": "a.tgz", "timestamp": 1.5})),
            e("other", json!({"file": "b.tgz"})),
        ]);
        let old = Sha512::of(b"old").short(12);
        assert_eq!(
            n,
            vec![
                "a.tgz".to_string(),
                format!("a.tgz~{old}"),
                "b.tgz".to_string()
            ]
        );
        assert_eq!(latest.as_deref(), Some("a.tgz"));
    }

    #[test]
    fn names_do_not_depend_on_server_order() {
        let a = vec![
            e("1", json!({"file": "x", "timestamp": 5})),
            e("2", json!({"file": "x", "timestamp": 5})),
            e("3", json!({"file": "x"})),
            e("4", json!({"title": "y", "timestamp": 7})),
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(names(a.clone()), names(b));
        assert_eq!(names(a).1.as_deref(), Some("y"));
    }

    #[test]
    fn newest_metadata_wins_for_one_blob() {
        let n = name_entries(vec![
            e("same", json!({"file": "f", "timestamp": 1, "v": "old"})),
            e("same", json!({"file": "f", "timestamp": 3, "v": "new"})),
        ]);
        assert_eq!(n.files.len(), 1);
        assert_eq!(n.files[0].1 .1["v"], "new");
    }
}
