//! The INI line rules real SlapOS files depend on (those of Python's `configparser`),
//! applied to the text before rust-ini parses it.
//!
//! rust-ini is the parser, but on its own it differs from `configparser` where real files
//! care, so every line is classified here first and rewritten into a shape on which both
//! agree:
//! - comment lines (`#` or `;` after optional indentation) are dropped, also inside a
//!   multi-line value, where rust-ini would keep them as value text;
//! - line endings become `\n` (rust-ini turns the `\r` of a CRLF continuation line into an
//!   extra empty line of the value);
//! - a line that is neither a section header, an option nor a continuation is an error
//!   here, with its line number (rust-ini would silently glue it to the next option name);
//! - a line ending in `\` gets a trailing blank: with escapes off rust-ini still reads
//!   `\` + newline as a line join, and the blank (trimmed away later) keeps it literal.
//!
//! Quotes and escapes are disabled in rust-ini so values stay literal. Line numbers of the
//! original text are kept for messages. This module knows no option names.

use ini::{Ini, ParseOption};
use std::collections::HashMap;

/// A line the file cannot have, with its 1-based number in the original text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SyntaxError {
    pub line: usize,
    pub message: String,
}

/// An option given more than once in one section (`configparser` refuses those; the
/// caller decides which ones matter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Duplicate {
    pub section: String,
    /// Lower-cased, as option names compare.
    pub key: String,
    pub line: usize,
    pub first_line: usize,
}

/// The parsed file, and the repeated options found on the way.
pub(super) struct Parsed {
    pub ini: Ini,
    pub duplicates: Vec<Duplicate>,
}

/// The rewritten text handed to rust-ini.
struct Prepared {
    text: String,
    /// Original 1-based line number of each line of `text`.
    origin: Vec<usize>,
    duplicates: Vec<Duplicate>,
}

/// Parses INI text with the rules above.
pub(super) fn parse(text: &str) -> Result<Parsed, SyntaxError> {
    let prepared = prepare(text)?;
    let opt = ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        enabled_indented_mutiline_value: true,
        enabled_preserve_key_leading_whitespace: false,
    };
    match Ini::load_from_str_opt(&prepared.text, opt) {
        Ok(ini) => Ok(Parsed {
            ini,
            duplicates: prepared.duplicates,
        }),
        // Not expected once `prepare` accepted the text; map the line back anyway.
        Err(e) => {
            let index = e.line.saturating_sub(1);
            let line = prepared
                .origin
                .get(index)
                .or(prepared.origin.last())
                .copied()
                .unwrap_or(1);
            Err(SyntaxError {
                line,
                message: e.msg.into_owned(),
            })
        }
    }
}

/// Classifies each line and rewrites the text (see the module doc).
fn prepare(text: &str) -> Result<Prepared, SyntaxError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // `configparser` reads with universal newlines: CRLF, CR and LF all end a line.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");

    let mut out = String::with_capacity(text.len() + 16);
    let mut origin = Vec::new();
    let mut duplicates = Vec::new();
    let mut section: Option<String> = None;
    // Whether an indented line continues a value (an option was the last thing read).
    let mut in_option = false;
    // First line of each (section, lower-cased option).
    let mut seen: HashMap<(String, String), usize> = HashMap::new();

    for (index, raw) in text.split('\n').enumerate() {
        let number = index + 1;
        let content = raw.trim();
        let indented = raw.starts_with(char::is_whitespace);

        let line = if content.is_empty() {
            // Kept: inside a value, rust-ini joins it as an empty line, like configparser.
            String::new()
        } else if content.starts_with('#') || content.starts_with(';') {
            continue;
        } else if indented && in_option {
            format!(" {}", literal_end(content))
        } else if content.starts_with('[') {
            let name = section_name(content).map_err(|message| SyntaxError {
                line: number,
                message,
            })?;
            section = Some(name.to_string());
            in_option = false;
            format!("[{name}]")
        } else {
            let key = option_name(content).map_err(|message| SyntaxError {
                line: number,
                message,
            })?;
            let Some(current) = &section else {
                return Err(SyntaxError {
                    line: number,
                    message: format!("option {key} comes before any [section] header"),
                });
            };
            let id = (current.clone(), key.to_lowercase());
            if let Some(&first_line) = seen.get(&id) {
                duplicates.push(Duplicate {
                    section: id.0,
                    key: id.1,
                    line: number,
                    first_line,
                });
            } else {
                seen.insert(id, number);
            }
            in_option = true;
            literal_end(content)
        };
        out.push_str(&line);
        out.push('\n');
        origin.push(number);
    }
    Ok(Prepared {
        text: out,
        origin,
        duplicates,
    })
}

/// The name in a `[name]` header (text after the last `]` is ignored, as configparser
/// does).
fn section_name(content: &str) -> Result<&str, String> {
    let Some(end) = content.rfind(']') else {
        return Err("section header without a closing ']'".to_string());
    };
    let name = content[1..end].trim();
    if name.is_empty() {
        return Err("empty section name '[]'".to_string());
    }
    // rust-ini ends a name at the first ']' and reads '\' as an escape there.
    if name.contains([']', '\\']) {
        return Err(format!("unsupported character in section name [{name}]"));
    }
    Ok(name)
}

/// The option name of a `name = value` / `name: value` line (the first of `=` and `:`
/// separates, as in configparser).
fn option_name(content: &str) -> Result<&str, String> {
    let Some(at) = content.find(['=', ':']) else {
        return Err(format!(
            "expected 'name = value', 'name: value' or '[section]', found {}",
            excerpt(content)
        ));
    };
    let name = content[..at].trim();
    if name.is_empty() {
        return Err(format!(
            "option without a name before '{}'",
            &content[at..=at]
        ));
    }
    // With escapes off, rust-ini would still read '\=' or '\:' as part of the name.
    if name.contains('\\') {
        return Err(format!("'\\' in option name {name}"));
    }
    Ok(name)
}

/// `content` with a blank after a final `\`, so that rust-ini keeps the `\` as text
/// instead of joining the next line (the blank is trimmed from the value).
fn literal_end(content: &str) -> String {
    if content.ends_with('\\') {
        format!("{content} ")
    } else {
        content.to_string()
    }
}

/// The start of a bad line, short enough for a one-line message.
fn excerpt(content: &str) -> String {
    const MAX: usize = 40;
    match content.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}…", &content[..cut]),
        None => format!("{content:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, section: &str, key: &str) -> Option<String> {
        let parsed = parse(text).expect("parses");
        let props = parsed.ini.section(Some(section))?;
        props.get(key).map(str::to_string)
    }

    #[test]
    fn continuation_lines_are_joined_and_comments_dropped() {
        let text = "[s]\nk =\n  one\n  # dropped\n\t two  \n  ; dropped too\n  three\nn = 1\n";
        assert_eq!(value(text, "s", "k").as_deref(), Some("one\ntwo\nthree"));
        assert_eq!(value(text, "s", "n").as_deref(), Some("1"));
    }

    #[test]
    fn empty_line_inside_a_value_is_kept_trailing_ones_are_not() {
        let text = "[s]\nk = a\n\n  b\n\nn = 1\n";
        assert_eq!(value(text, "s", "k").as_deref(), Some("a\n\nb"));
    }

    #[test]
    fn cr_only_line_endings() {
        let text = "[s]\rk =\r  a\r  b\rn = 1\r";
        assert_eq!(value(text, "s", "k").as_deref(), Some("a\nb"));
    }

    #[test]
    fn values_are_literal() {
        let text = "[s]\nq = \"quoted\" 'x'\nb = C:\\dir\\\nc = a\\tb\nd = x # not a comment\n";
        assert_eq!(value(text, "s", "q").as_deref(), Some("\"quoted\" 'x'"));
        assert_eq!(value(text, "s", "b").as_deref(), Some("C:\\dir\\"));
        assert_eq!(value(text, "s", "c").as_deref(), Some("a\\tb"));
        assert_eq!(value(text, "s", "d").as_deref(), Some("x # not a comment"));
    }

    #[test]
    fn first_separator_wins() {
        let text = "[s]\na: b = c\nd = e: f\n";
        assert_eq!(value(text, "s", "a").as_deref(), Some("b = c"));
        assert_eq!(value(text, "s", "d").as_deref(), Some("e: f"));
    }

    #[test]
    fn indented_option_after_a_header_is_an_option() {
        let text = "[s]\n  k = v\n";
        assert_eq!(value(text, "s", "k").as_deref(), Some("v"));
    }

    #[test]
    fn header_with_trailing_text() {
        let text = "[ s ] trailing\nk = v\n";
        assert_eq!(value(text, "s", "k").as_deref(), Some("v"));
    }

    #[test]
    fn bad_lines_are_reported_with_their_original_number() {
        let text = "# c\n[s]\n; c\nk = v\n\nno separator here\n";
        let err = parse(text).err().expect("error");
        assert_eq!(err.line, 6);
        assert!(err.message.contains("no separator here"), "{}", err.message);

        let err = parse("k = v\n").err().expect("error");
        assert_eq!(err.line, 1);
        assert!(err.message.contains("before any [section]"));

        let err = parse("[s]\n[broken\n").err().expect("error");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("']'"));

        let err = parse("[s]\n= v\n").err().expect("error");
        assert_eq!(err.line, 2);
        assert!(err.message.contains("without a name"));

        assert!(parse("[]\n").is_err());
        assert!(parse("[s]\na\\=b = c\n").is_err());
    }

    #[test]
    fn long_bad_line_is_shortened() {
        let text = format!("[s]\n{}\n", "x".repeat(200));
        let err = parse(&text).err().expect("error");
        assert!(err.message.len() < 120, "{}", err.message);
    }

    #[test]
    fn duplicates_are_reported_case_insensitively() {
        let parsed = parse("[s]\nKey = 1\n[t]\nkey = 2\n[s]\nkey = 3\n").expect("parses");
        assert_eq!(
            parsed.duplicates,
            vec![Duplicate {
                section: "s".into(),
                key: "key".into(),
                line: 6,
                first_line: 2,
            }]
        );
    }

    #[test]
    fn bom_is_skipped() {
        let text = "\u{feff}[s]\nk = v\n";
        assert_eq!(value(text, "s", "k").as_deref(), Some("v"));
    }
}
