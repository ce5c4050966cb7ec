//! JSON written exactly as Python's `json.dumps` writes it, so the entries we sign and
//! the listings we print are byte-for-byte what the reference client produces.
//!
//! Python's defaults: `", "` and `": "` separators (`","` between items when indenting),
//! `ensure_ascii` (everything outside space..`~` escaped as lowercase `\uXXXX`, with
//! surrogate pairs), insertion order unless `sort_keys`, floats as `repr()`.
//!
//! Also [`lenient`]: a text Python's `json.loads` accepts but serde_json does not, made
//! acceptable (lone surrogates, `NaN`/`Infinity`, a UTF-8 BOM), with where it differed.

use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt::Write;

/// A JSON text rewritten so that serde_json reads what Python's `json.loads(bytes)`
/// reads, and where it had to differ.
#[derive(Debug, Clone)]
pub struct Lenient<'a> {
    pub text: Cow<'a, [u8]>,
    /// For each string that held a lone UTF-16 surrogate (a `\uD800`-`\uDFFF` escape
    /// not part of a pair, or such a code point encoded in the bytes, which Python's
    /// `surrogatepass` decoding takes), the position of that string: the index of each
    /// enclosing array element or object member, outermost first. In `text` each lone
    /// surrogate is `\ufffd` (U+FFFD): Rust strings, like UTF-8, cannot hold one.
    pub lone_surrogates: Vec<Vec<usize>>,
}

fn hex4(text: &[u8], at: usize) -> Option<u32> {
    let digits = text.get(at..at + 4)?;
    let s = std::str::from_utf8(digits).ok()?;
    u32::from_str_radix(s, 16).ok()
}

/// Makes serde_json as lenient as Python's `json.loads` where Python is lenient:
/// a leading UTF-8 BOM is skipped; `NaN`, `Infinity` and `-Infinity` (which Python
/// reads as floats) become `null`; lone surrogates become U+FFFD and are reported (see
/// [`Lenient::lone_surrogates`]). Everything else is left for serde_json to judge.
/// Bounded: one pass over the text.
/// Whether [`lenient`] has anything to change in `body`: a `NaN`/`Infinity` literal
/// (an `N` or `I` outside strings), a `\\uD…` escape inside a string, or UTF-8 bytes of
/// a surrogate (`ED A0..BF`). One pass that follows strings, so that the letters of
/// base64 signatures and names (almost every listing has an `N` or an `I` in a string)
/// do not send the whole body through the copying path.
fn needs_rewrite(body: &[u8]) -> bool {
    let mut in_string = false;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b == 0xED && body.get(i + 1).is_some_and(|c| (0xA0..=0xBF).contains(c)) {
            return true;
        }
        if in_string {
            match b {
                b'"' => in_string = false,
                b'\\' => {
                    if body.get(i + 1) == Some(&b'u')
                        && body.get(i + 2).is_some_and(|c| (c | 0x20) == b'd')
                    {
                        return true;
                    }
                    i += 1; // the escaped byte
                }
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'N' | b'I' => return true,
                _ => {}
            }
        }
        i += 1;
    }
    false
}

pub fn lenient(text: &[u8]) -> Lenient<'_> {
    let body = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(text);
    if !needs_rewrite(body) {
        return Lenient {
            text: Cow::Borrowed(body),
            lone_surrogates: Vec::new(),
        };
    }
    let mut out = Vec::with_capacity(body.len());
    let mut stack: Vec<usize> = Vec::new();
    let mut lone: Vec<Vec<usize>> = Vec::new();
    let mut in_string = false;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if in_string {
            match b {
                b'"' => {
                    in_string = false;
                    out.push(b);
                    i += 1;
                }
                b'\\' if body.get(i + 1) == Some(&b'u') => match hex4(body, i + 2) {
                    Some(0xD800..=0xDBFF)
                        if body.get(i + 6) == Some(&b'\\')
                            && body.get(i + 7) == Some(&b'u')
                            && hex4(body, i + 8)
                                .is_some_and(|l| (0xDC00..=0xDFFF).contains(&l)) =>
                    {
                        out.extend_from_slice(&body[i..i + 12]);
                        i += 12;
                    }
                    Some(0xD800..=0xDFFF) => {
                        out.extend_from_slice(b"\\ufffd");
                        lone.push(stack.clone());
                        i += 6;
                    }
                    Some(_) => {
                        out.extend_from_slice(&body[i..i + 6]);
                        i += 6;
                    }
                    None => {
                        out.extend_from_slice(&body[i..i + 2]);
                        i += 2;
                    }
                },
                b'\\' => {
                    out.extend_from_slice(&body[i..(i + 2).min(body.len())]);
                    i += 2;
                }
                0xED if body.get(i + 1).is_some_and(|c| (0xA0..=0xBF).contains(c))
                    && body.get(i + 2).is_some_and(|c| (0x80..=0xBF).contains(c)) =>
                {
                    out.extend_from_slice(b"\\ufffd");
                    lone.push(stack.clone());
                    i += 3;
                }
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
            continue;
        }
        let rest = &body[i..];
        let literal = [&b"NaN"[..], b"Infinity", b"-Infinity"]
            .into_iter()
            .find(|l| rest.starts_with(l));
        if let Some(l) = literal {
            out.extend_from_slice(b"null");
            i += l.len();
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => stack.push(0),
            b']' | b'}' => {
                stack.pop();
            }
            b',' => {
                if let Some(top) = stack.last_mut() {
                    *top += 1;
                }
            }
            _ => {}
        }
        out.push(b);
        i += 1;
    }
    Lenient {
        text: Cow::Owned(out),
        lone_surrogates: lone,
    }
}

/// How to lay the JSON out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    /// `indent=N`: newlines and N spaces per level.
    pub indent: Option<usize>,
    /// `sort_keys=True`.
    pub sort_keys: bool,
}

/// `json.dumps(value)` with Python's default arguments.
pub fn dumps(value: &Value) -> String {
    dumps_with(value, Style::default())
}

/// `json.dumps(value, indent=…, sort_keys=…)`.
pub fn dumps_with(value: &Value, style: Style) -> String {
    let mut out = String::new();
    write_value(&mut out, value, style, 0);
    out
}

fn newline(out: &mut String, style: Style, level: usize) {
    if let Some(n) = style.indent {
        out.push('\n');
        for _ in 0..n * level {
            out.push(' ');
        }
    }
}

fn write_value(out: &mut String, value: &Value, style: Style, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            // Numbers keep their text (serde_json's arbitrary_precision): an integer
            // literal is a Python int, written exactly however large; anything with a
            // fraction or an exponent is a Python float, written as repr() writes it.
            let text = n.to_string();
            let digits = text.strip_prefix('-').unwrap_or(&text);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                out.push_str(&text);
            } else {
                out.push_str(&float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(if style.indent.is_some() { "," } else { ", " });
                }
                newline(out, style, level + 1);
                write_value(out, item, style, level + 1);
            }
            newline(out, style, level);
            out.push(']');
        }
        Value::Object(map) => write_object(out, map, style, level),
    }
}

/// Appends `map` as [`dumps_with`] writes an object nested `level` deep: for documents
/// written piece by piece (`client::entries_json_text`) without a `Value` of the whole.
pub fn write_object(out: &mut String, map: &Map<String, Value>, style: Style, level: usize) {
    if map.is_empty() {
        out.push_str("{}");
        return;
    }
    let mut pairs: Vec<(&String, &Value)> = map.iter().collect();
    if style.sort_keys {
        pairs.sort_by(|a, b| a.0.cmp(b.0));
    }
    out.push('{');
    for (i, (k, v)) in pairs.into_iter().enumerate() {
        if i > 0 {
            out.push_str(if style.indent.is_some() { "," } else { ", " });
        }
        newline(out, style, level + 1);
        write_string(out, k);
        out.push_str(": ");
        write_value(out, v, style, level + 1);
    }
    newline(out, style, level);
    out.push('}');
}

/// A string literal with `ensure_ascii=True`.
pub fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that round-trip, fixed notation when the
/// decimal exponent is in -4..16, else `1e+16` style; `.0` added to integral values.
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-7".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        if point <= 0 {
            out.push_str("0.");
            for _ in 0..(-point) {
                out.push('0');
            }
            out.push_str(&digits);
        } else {
            let point = point as usize;
            if digits.len() <= point {
                out.push_str(&digits);
                for _ in digits.len()..point {
                    out.push('0');
                }
                out.push_str(".0");
            } else {
                out.push_str(&digits[..point]);
                out.push('.');
                out.push_str(&digits[point..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_reads_what_python_reads() {
        // Lone surrogates, escaped or encoded (surrogatepass), reported by position.
        let body = b"[[\"a\\ud800b\", \"s\"], [\"\\ud83d\\ude00\", \"\\\\ud800\"], [\"x\", \"\xed\xa0\x80\"], [\"\\udc00\\ud800\", \"\"]]";
        let l = lenient(body);
        assert_eq!(
            l.lone_surrogates,
            vec![vec![0, 0], vec![2, 1], vec![3, 0], vec![3, 0]]
        );
        let v: Value = serde_json::from_slice(&l.text).unwrap();
        assert_eq!(v[0][0], "a\u{fffd}b");
        assert_eq!(v[1][0], "\u{1f600}");
        assert_eq!(v[1][1], "\\ud800");
        assert_eq!(v[2][1], "\u{fffd}");
        // NaN and infinities (outside strings only), and a BOM.
        let l = lenient(
            b"\xef\xbb\xbf{\"a\": NaN, \"b\": [Infinity, -Infinity], \"NaN\": \"Infinity\"}",
        );
        let v: Value = serde_json::from_slice(&l.text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": null, "b": [null, null], "NaN": "Infinity"})
        );
        assert!(l.lone_surrogates.is_empty());
        // Plain JSON is not copied.
        assert!(matches!(lenient(b"[1, \"x\"]").text, Cow::Borrowed(_)));
    }

    #[test]
    fn only_what_needs_a_rewrite_is_copied() {
        let borrowed = |b: &[u8]| matches!(lenient(b).text, Cow::Borrowed(_));
        // Letters N and I inside strings (base64 signatures, names), an escaped quote
        // before them, an escaped backslash before "ud800", a BMP escape: untouched.
        assert!(borrowed(
            b"[[\"{\\\"file\\\": \\\"NaN Infinity\\\"}\", \"MIIBIjANBgkq+/NI==\"], [\"a\\\"N\", \"\\\\ud800 \\u00e9\"]]"
        ));
        // Each trigger alone is rewritten: NaN / Infinity outside strings, an escaped
        // surrogate, the UTF-8 bytes of one.
        for body in [
            &b"[NaN]"[..],
            b"{\"t\": -Infinity}",
            b"[\"\\ud800\"]",
            b"[\"\\uDC00\"]",
            b"[\"\xed\xa0\x80\"]",
        ] {
            assert!(!borrowed(body), "{}", String::from_utf8_lossy(body));
        }
    }
    use serde_json::json;

    #[test]
    fn floats_as_python_repr() {
        for (f, s) in [
            (1700000000.5, "1700000000.5"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5e-10, "-2.5e-10"),
            (123456789.123, "123456789.123"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn entry_as_reference_client_writes_it() {
        // The fixture entry-a.json, written by json.dumps in insertion order.
        let v =
            json!({"sha512": "af06", "url": "https://example.com/hello.txt", "file": "hello.txt"});
        assert_eq!(
            dumps(&v),
            r#"{"sha512": "af06", "url": "https://example.com/hello.txt", "file": "hello.txt"}"#
        );
    }

    #[test]
    fn numbers_as_python_reads_and_writes_them() {
        let v: Value =
            serde_json::from_str("[12345678901234567890123, -7, 1E5, 1.5e-7, 2.50, 1e100]")
                .unwrap();
        assert_eq!(
            dumps(&v),
            "[12345678901234567890123, -7, 100000.0, 1.5e-07, 2.5, 1e+100]"
        );
        assert_eq!(dumps(&Value::from(1700000000.25)), "1700000000.25");
    }

    #[test]
    fn ensure_ascii_and_escapes() {
        let v = json!([
            "é",
            "\u{1F600}",
            "a\"b\\c\n\t\u{1}\u{7f}",
            3,
            -4,
            true,
            null,
            [],
            {}
        ]);
        assert_eq!(
            dumps(&v),
            r#"["\u00e9", "\ud83d\ude00", "a\"b\\c\n\t\u0001\u007f", 3, -4, true, null, [], {}]"#
        );
    }

    #[test]
    fn indented_and_sorted_like_download_list() {
        let v = json!([{"b": 1, "a": [1, 2]}]);
        let s = dumps_with(
            &v,
            Style {
                indent: Some(2),
                sort_keys: true,
            },
        );
        assert_eq!(
            s,
            "[\n  {\n    \"a\": [\n      1,\n      2\n    ],\n    \"b\": 1\n  }\n]"
        );
    }
}
