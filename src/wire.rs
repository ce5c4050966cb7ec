//! The shadir wire format, shared by the client and the embedded server: a listing is a
//! JSON array of `[inner, signature]` pairs, where `inner` is a JSON *string* holding an
//! object with at least `"sha512"`. Also how keys go into URLs.
//!
//! Parsing is defensive: the body size is bounded by the caller, JSON nesting is bounded
//! by serde_json's recursion limit (a 100,000-deep body is an error, not a stack
//! overflow), and one malformed pair does not hide the others.

use crate::digest::Sha512;
use crate::pyjson;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{Map, Value};

/// One shadir entry exactly as it came over the wire. `inner` is kept byte for byte:
/// signatures are checked over it, never over a re-serialisation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawEntry {
    pub inner: String,
    pub signature: String,
}

impl RawEntry {
    /// The body of a shadir `PUT`: `[inner, signature]`, as `json.dumps` writes it.
    pub fn to_put_body(&self) -> String {
        pyjson::dumps(&Value::Array(vec![
            Value::String(self.inner.clone()),
            Value::String(self.signature.clone()),
        ]))
    }
}

/// Why a shadir body or entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("shadir answer is not UTF-8 JSON: {0}")]
    NotJson(String),
    #[error("shadir answer is not a JSON array")]
    NotArray,
    #[error("entry is not a pair of two strings")]
    NotPair,
    #[error("entry's inner JSON does not parse: {0}")]
    InnerNotJson(String),
    #[error("entry's inner JSON is not an object")]
    InnerNotObject,
    #[error("entry has no \"sha512\" string")]
    MissingSha512,
    #[error("entry's sha512 is invalid: {0}")]
    BadSha512(String),
    #[error("JSON nested deeper than {0} levels")]
    TooDeep(usize),
    /// The inner string holds a lone UTF-16 surrogate, which Python's `json` accepts but
    /// no UTF-8 text can hold: its signature cannot be checked over exact bytes (the
    /// excerpt shows it as U+FFFD).
    #[error("entry's inner string holds a lone UTF-16 surrogate (it has no UTF-8 bytes a signature could cover)")]
    LoneSurrogate(String),
}

/// Nesting allowed in a shadir body by default (a listing needs 2; entries' metadata
/// rarely more than a few).
pub const DEFAULT_MAX_DEPTH: usize = 32;

/// Refuses JSON nested deeper than `max` before any parser recurses into it: a quick
/// scan of brackets outside strings.
pub fn check_depth(text: &[u8], max: usize) -> Result<(), WireError> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(WireError::TooDeep(max));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A parsed listing: the well-formed pairs, and why the others were dropped.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub entries: Vec<RawEntry>,
    pub rejected: Vec<WireError>,
}

/// Parses a shadir `GET` body (nesting bounded by [`DEFAULT_MAX_DEPTH`]).
pub fn parse_listing(body: &[u8]) -> Result<Listing, WireError> {
    parse_listing_with(body, DEFAULT_MAX_DEPTH)
}

/// Parses a shadir `GET` body nested at most `max_depth` levels.
///
/// Read as Python's `json` reads it ([`pyjson::lenient`]): a pair whose inner string
/// holds a lone surrogate is rejected alone ([`WireError::LoneSurrogate`]); one whose
/// signature does is kept with U+FFFD in it, so that it verifies under no certificate.
pub fn parse_listing_with(body: &[u8], max_depth: usize) -> Result<Listing, WireError> {
    check_depth(body, max_depth)?;
    let lenient = pyjson::lenient(body);
    let value: Value =
        serde_json::from_slice(&lenient.text).map_err(|e| WireError::NotJson(e.to_string()))?;
    let Value::Array(items) = value else {
        return Err(WireError::NotArray);
    };
    let mut listing = Listing::default();
    for (index, item) in items.into_iter().enumerate() {
        let inner_lone = lenient
            .lone_surrogates
            .iter()
            .any(|p| p.first() == Some(&index) && p.get(1) == Some(&0));
        match pair_of(item) {
            Ok(e) if inner_lone => listing.rejected.push(WireError::LoneSurrogate(
                e.inner.chars().take(120).collect(),
            )),
            Ok(e) => listing.entries.push(e),
            Err(e) => listing.rejected.push(e),
        }
    }
    Ok(listing)
}

/// Parses a shadir `PUT` body: exactly `[inner, signature]` (as leniently as a
/// listing; an inner string with a lone surrogate is refused).
pub fn parse_put_body(body: &[u8]) -> Result<RawEntry, WireError> {
    let lenient = pyjson::lenient(body);
    let value: Value =
        serde_json::from_slice(&lenient.text).map_err(|e| WireError::NotJson(e.to_string()))?;
    let entry = pair_of(value)?;
    if lenient
        .lone_surrogates
        .iter()
        .any(|p| p.first() == Some(&0))
    {
        return Err(WireError::LoneSurrogate(
            entry.inner.chars().take(120).collect(),
        ));
    }
    Ok(entry)
}

fn pair_of(item: Value) -> Result<RawEntry, WireError> {
    let Value::Array(mut pair) = item else {
        return Err(WireError::NotPair);
    };
    if pair.len() != 2 {
        return Err(WireError::NotPair);
    }
    let signature = pair.pop();
    let inner = pair.pop();
    match (inner, signature) {
        (Some(Value::String(inner)), Some(Value::String(signature))) => {
            Ok(RawEntry { inner, signature })
        }
        _ => Err(WireError::NotPair),
    }
}

/// An entry's inner object, parsed, with its blob name checked.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryInfo {
    pub sha512: Sha512,
    /// The whole inner object, `sha512` included, in the order it was written.
    pub metadata: Map<String, Value>,
}

impl EntryInfo {
    /// Parses `inner`. A `sha512` must be 128 lowercase hex digits: that is the only form
    /// a blob can be fetched by, so anything else is refused rather than guessed at.
    /// Read as leniently as Python reads it ([`pyjson::lenient`]): in the metadata, a
    /// lone surrogate escape reads as U+FFFD and `NaN`/`Infinity` as `null` (the inner
    /// string itself, which signatures cover, is never changed).
    pub fn parse(inner: &str) -> Result<Self, WireError> {
        check_depth(inner.as_bytes(), DEFAULT_MAX_DEPTH)?;
        let lenient = pyjson::lenient(inner.as_bytes());
        let value: Value = serde_json::from_slice(&lenient.text)
            .map_err(|e| WireError::InnerNotJson(e.to_string()))?;
        let Value::Object(metadata) = value else {
            return Err(WireError::InnerNotObject);
        };
        let sha = match metadata.get("sha512") {
            Some(Value::String(s)) => s,
            _ => return Err(WireError::MissingSha512),
        };
        let sha512 = Sha512::parse(sha).map_err(|e| WireError::BadSha512(e.0))?;
        Ok(EntryInfo { sha512, metadata })
    }

    /// The `timestamp` field when it is a number (Unix seconds).
    pub fn timestamp(&self) -> Option<f64> {
        self.metadata.get("timestamp").and_then(Value::as_f64)
    }
}

/// The inner string the reference client would write for this blob and metadata:
/// `json.dumps({"sha512": …, **metadata})`. A `sha512` inside `metadata` is ignored.
pub fn build_inner(sha512: &Sha512, metadata: &Map<String, Value>) -> String {
    let mut obj = Map::new();
    obj.insert("sha512".into(), Value::String(sha512.hex()));
    for (k, v) in metadata {
        if k != "sha512" {
            obj.insert(k.clone(), v.clone());
        }
    }
    pyjson::dumps(&Value::Object(obj))
}

/// What may not stand raw in a URL path segment (RFC 3986 `pchar` is kept:
/// unreserved, sub-delims, `:` and `@`).
const NOT_PCHAR: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// A key as one URL path segment: the usual key characters go out unchanged, exactly as
/// the reference client sends them; the rest is percent-encoded (non-ASCII as UTF-8).
pub fn key_to_path_segment(key: &str) -> String {
    utf8_percent_encode(key, NOT_PCHAR).to_string()
}

/// `base` (with or without a path prefix, with or without a trailing `/`) joined to one
/// already-encoded segment.
pub fn join_url(base: &str, segment: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), segment)
}

/// The key the reference client uses for a URL: `file-urlmd5:` + md5 hex of the URL.
pub fn urlmd5_key(url: &str) -> String {
    use md5::{Digest, Md5};
    format!("file-urlmd5:{}", hex::encode(Md5::digest(url.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "af069ac6a781ffdf3999e6e85dd4ad3c7bd7fa911bc350852877713eef390e3a9ce89663ad621544ccf2e27cd7cd3e9c37c444b962f9a35d44884de03e292c1c";

    #[test]
    fn usual_keys_are_sent_unchanged() {
        for key in [
            "file-urlmd5:f213fcd8e97aa729f685b8cb71b976a7",
            "cccdc51a07e8c575c880f2d70dd4d458",
            "pypi:pytz=2016.10",
            "slapos-global-key",
            "key-private:amarisoft",
            "pypi-index-abc-zc.buildout==2.5.2+slapos014",
            "a_b.c~d!$&'()*,;@",
        ] {
            assert_eq!(key_to_path_segment(key), key);
        }
    }

    #[test]
    fn unusable_characters_are_percent_encoded() {
        assert_eq!(key_to_path_segment("a b"), "a%20b");
        assert_eq!(key_to_path_segment("a/b?c#d%e"), "a%2Fb%3Fc%23d%25e");
        assert_eq!(key_to_path_segment("x[1]<2>"), "x%5B1%5D%3C2%3E");
        assert_eq!(key_to_path_segment("é\n"), "%C3%A9%0A");
        assert_eq!(key_to_path_segment(".."), "..");
    }

    #[test]
    fn join_with_and_without_prefix() {
        assert_eq!(join_url("http://h", "k"), "http://h/k");
        assert_eq!(join_url("http://h/", "k"), "http://h/k");
        assert_eq!(join_url("https://h/shacache/", "k"), "https://h/shacache/k");
        assert_eq!(join_url("https://h/shadir", "k"), "https://h/shadir/k");
    }

    #[test]
    fn lone_surrogates_drop_only_their_entry() {
        let inner = format!(r#"{{"sha512": "{HELLO}", "f": "\ud800"}}"#);
        // [good, inner with a lone surrogate, signature with one, inner JSON with one]
        let body = format!(
            r#"[["{{\"sha512\": \"{HELLO}\"}}", ""], ["{{\"sha512\": \"{HELLO}\", \"f\": \"\ud800\"}}", ""], ["{{\"sha512\": \"{HELLO}\"}}", "\udfff"], {}]"#,
            RawEntry {
                inner: inner.clone(),
                signature: String::new()
            }
            .to_put_body()
        );
        let l = parse_listing(body.as_bytes()).unwrap();
        assert_eq!(l.entries.len(), 3, "{l:?}");
        assert_eq!(l.rejected.len(), 1);
        assert!(
            matches!(&l.rejected[0], WireError::LoneSurrogate(x) if x.starts_with("{\"sha512"))
        );
        assert_eq!(l.entries[1].signature, "\u{fffd}");
        // The inner string is kept byte for byte; its metadata reads as Python reads it.
        assert_eq!(l.entries[2].inner, inner);
        let info = EntryInfo::parse(&inner).unwrap();
        assert_eq!(info.metadata["f"], "\u{fffd}");
        assert!(EntryInfo::parse(&format!(r#"{{"sha512": "{HELLO}", "t": NaN}}"#)).is_ok());
        assert!(matches!(
            parse_put_body(br#"["\ud800", ""]"#),
            Err(WireError::LoneSurrogate(_))
        ));
    }

    #[test]
    fn listing_keeps_good_pairs_and_reports_bad_ones() {
        let body = br#"[["{}", "sig"], ["a"], 3, ["x", 1], ["i", ""]]"#;
        let l = parse_listing(body).unwrap();
        assert_eq!(l.entries.len(), 2);
        assert_eq!(l.rejected.len(), 3);
        assert_eq!(parse_listing(b"{}").unwrap_err(), WireError::NotArray);
        assert!(matches!(
            parse_listing(b"\xff\xfe"),
            Err(WireError::NotJson(_))
        ));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let body = "[".repeat(100_000) + &"]".repeat(100_000);
        assert_eq!(
            parse_listing(body.as_bytes()).unwrap_err(),
            WireError::TooDeep(DEFAULT_MAX_DEPTH)
        );
        let inner = format!(
            r#"{{"sha512": "x", "m": {}{}}}"#,
            "[".repeat(50),
            "]".repeat(50)
        );
        assert!(matches!(
            EntryInfo::parse(&inner),
            Err(WireError::TooDeep(_))
        ));
        // Brackets inside strings do not count; escaped quotes do not end strings.
        let ok = br#"[["{\"a\": \"[[[[[[\\\"[[\"}", ""]]"#;
        assert!(check_depth(ok, 2).is_ok());
        assert!(check_depth(b"[[[]]]", 2).is_err());
        assert!(parse_listing_with(br#"[["{}", ""]]"#, 2).is_ok());
    }

    #[test]
    fn entry_info_checks_sha512() {
        let ok =
            EntryInfo::parse(&format!(r#"{{"sha512": "{HELLO}", "timestamp": 1.5}}"#)).unwrap();
        assert_eq!(ok.sha512.hex(), HELLO);
        assert_eq!(ok.timestamp(), Some(1.5));
        for bad in [
            "{}".to_string(),
            r#"{"sha512": 3}"#.to_string(),
            format!(r#"{{"sha512": "{}"}}"#, HELLO.to_uppercase()),
            r#"{"sha512": "abc"}"#.to_string(),
            "[1]".to_string(),
            "nope".to_string(),
        ] {
            assert!(EntryInfo::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inner_is_byte_compatible_with_reference_client() {
        let fixture = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/signature/entry-a.json"
        ))
        .unwrap();
        let mut meta = Map::new();
        meta.insert("url".into(), "https://example.com/hello.txt".into());
        meta.insert("file".into(), "hello.txt".into());
        assert_eq!(build_inner(&Sha512::parse(HELLO).unwrap(), &meta), fixture);
    }

    #[test]
    fn put_body_round_trips() {
        let e = RawEntry {
            inner: "{\"a\": \"é\"}".into(),
            signature: "c2ln".into(),
        };
        let body = e.to_put_body();
        assert_eq!(body, r#"["{\"a\": \"\u00e9\"}", "c2ln"]"#);
        assert_eq!(parse_put_body(body.as_bytes()).unwrap(), e);
    }

    #[test]
    fn urlmd5_matches_reference() {
        // hashlib.md5(b"http://example.com/a.tar.gz").hexdigest()
        assert_eq!(
            urlmd5_key("http://example.com/a.tar.gz"),
            "file-urlmd5:0db2feb3d37c3b9d7c845f237dbcc03a"
        );
    }
}
