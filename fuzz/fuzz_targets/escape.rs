//! Fuzz target: name escaping. For any string `s` and each reserved-name set (none, the
//! root's, a key directory's): `unescape(escape(s)) == s`; the escaped name has no `/`,
//! NUL or other control character and is not `.`, `..` or reserved; key directory names
//! are at most 255 bytes and decode back to their key unless shortened with a digest.
//! Any string that `unescape` accepts is the escape of what it decodes to.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shacachefs::naming::{
    escape, key_dir_name, key_from_dir_name, unescape, KEY_RESERVED, NAME_MAX, ROOT_RESERVED,
};

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();
    for reserved in [&[][..], ROOT_RESERVED, KEY_RESERVED] {
        let name = escape(s, reserved);
        assert_eq!(
            unescape(&name, reserved).as_deref(),
            Some(s),
            "escape {s:?} -> {name:?} does not round-trip (reserved {reserved:?})"
        );
        assert!(
            !name.chars().any(|c| c == '/' || c.is_ascii_control()),
            "escape {s:?} -> {name:?} keeps a '/' or control character"
        );
        if !s.is_empty() {
            assert!(name != "." && name != "..", "escape {s:?} -> {name:?}");
            assert!(
                !reserved.contains(&name.as_str()),
                "escape {s:?} -> {name:?}"
            );
        }
        if let Some(decoded) = unescape(s, reserved) {
            assert_eq!(
                escape(&decoded, reserved),
                s,
                "unescape accepted a non-canonical name"
            );
        }
    }
    if !s.is_empty() {
        let dir = key_dir_name(s);
        assert!(
            dir.len() <= NAME_MAX,
            "key dir name over 255 bytes: {dir:?}"
        );
        assert!(!dir.contains('/') && !dir.contains('\0'), "{dir:?}");
        if !dir.contains("%~") {
            assert_eq!(
                key_from_dir_name(&dir).as_deref(),
                Some(s),
                "key {s:?} -> {dir:?}"
            );
        }
    }
});
