//! Key and blob file names: the only code that turns a key or a digest into a path
//! (see the layout in [`super`]).

use crate::digest::Sha512;
use percent_encoding::{percent_decode, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::path::{Component, Path, PathBuf};

/// The longest key accepted, in bytes (after percent-decoding the URL).
pub const MAX_KEY_LEN: usize = 1024;
/// Directory of the blobs under the root.
pub(crate) const CACHE_DIR: &str = "shacache";
/// Directory of the shadir lists under the root.
pub(crate) const DIR_DIR: &str = "shadir";
/// Longest encoded part in one file name (plus a 2-byte prefix: well under 255).
pub(crate) const NAME_CHUNK: usize = 200;

/// Bytes kept as they are in a key's file name.
const KEY_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'_')
    .remove(b'-')
    .remove(b':')
    .remove(b'=')
    .remove(b'+');

/// Where the blob named `sha` lives.
pub fn blob_path(root: &Path, sha: &Sha512) -> PathBuf {
    let hex = sha.hex();
    root.join(CACHE_DIR).join(&hex[..2]).join(hex)
}

/// Where the list of `key` (its bytes, already percent-decoded from the URL) lives.
pub fn key_path(root: &Path, key: impl AsRef<[u8]>) -> PathBuf {
    let encoded = percent_encode(key.as_ref(), KEY_ESCAPES).to_string();
    let chunks: Vec<&[u8]> = encoded.as_bytes().chunks(NAME_CHUNK).collect();
    let mut path = root.join(DIR_DIR);
    for (i, chunk) in chunks.iter().enumerate() {
        let prefix = if i + 1 == chunks.len() { "k-" } else { "d-" };
        // Chunks of an ASCII string are ASCII.
        path.push(format!("{prefix}{}", String::from_utf8_lossy(chunk)));
    }
    path
}

/// The key whose data is stored at `path` (relative to `ROOT/shadir`, or absolute under
/// it): its list, when the path is one [`key_path`] makes, or that list's index
/// ([`index_path`]).
pub fn key_of_path(root: &Path, path: &Path) -> Option<Vec<u8>> {
    let base = root.join(DIR_DIR);
    let rel = path.strip_prefix(&base).unwrap_or(path);
    let parts: Vec<&str> = rel
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let (last, dirs) = parts.split_last()?;
    let mut encoded = String::new();
    for d in dirs {
        encoded.push_str(d.strip_prefix("d-")?);
    }
    let (name, index) = match last.strip_prefix("k-") {
        Some(name) => (name, false),
        None => (last.strip_prefix("i-")?, true),
    };
    encoded.push_str(name);
    let key: Vec<u8> = percent_decode(encoded.as_bytes()).collect();
    // Only the canonical spelling counts, so one key has exactly one path (and index).
    let list = key_path(root, &key);
    let canonical = if index { index_path(&list) } else { list };
    (!key.is_empty() && canonical == base.join(rel)).then_some(key)
}

/// The index file beside a list file.
pub(crate) fn index_path(list: &Path) -> PathBuf {
    let name = list
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = name.strip_prefix("k-").unwrap_or(&name);
    list.with_file_name(format!("i-{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usual_keys_have_readable_names() {
        let root = Path::new("/r");
        assert_eq!(
            key_path(root, "file-urlmd5:f213fcd8e97aa729f685b8cb71b976a7"),
            Path::new("/r/shadir/k-file-urlmd5:f213fcd8e97aa729f685b8cb71b976a7")
        );
        assert_eq!(
            key_path(root, "pypi:pytz=2016.10"),
            Path::new("/r/shadir/k-pypi:pytz=2016.10")
        );
    }

    #[test]
    fn dangerous_keys_stay_inside() {
        let root = Path::new("/r");
        for key in [
            &b".."[..],
            b".",
            b"../x",
            b"a/b",
            b"\0",
            b"/etc/passwd",
            b"%2F",
        ] {
            let p = key_path(root, key);
            let rel = p.strip_prefix("/r/shadir").unwrap();
            assert_eq!(rel.components().count(), 1, "{p:?}");
            assert!(matches!(
                rel.components().next(),
                Some(Component::Normal(_))
            ));
            assert_eq!(key_of_path(root, &p).as_deref(), Some(key));
        }
        assert_eq!(key_path(root, ".."), Path::new("/r/shadir/k-.."));
        assert_eq!(key_path(root, "a/b"), Path::new("/r/shadir/k-a%2Fb"));
        assert_eq!(key_path(root, "%2F"), Path::new("/r/shadir/k-%252F"));
    }

    #[test]
    fn long_keys_are_split_into_short_names() {
        let root = Path::new("/r");
        for len in [199, 200, 201, 400, 401, MAX_KEY_LEN] {
            for byte in [b'a', b'/'] {
                let key = vec![byte; len];
                let p = key_path(root, &key);
                for c in p.strip_prefix("/r/shadir").unwrap().components() {
                    assert!(c.as_os_str().len() <= NAME_CHUNK + 2);
                }
                assert_eq!(key_of_path(root, &p), Some(key));
            }
        }
        // A key whose encoding is exactly one chunk long and one twice as long do not
        // collide: the first is a file, the second a directory and a file.
        let one = key_path(root, vec![b'x'; NAME_CHUNK]);
        let two = key_path(root, vec![b'x'; 2 * NAME_CHUNK]);
        assert!(!two.starts_with(&one));
    }

    #[test]
    fn non_canonical_names_are_not_keys() {
        let root = Path::new("/r");
        assert_eq!(key_of_path(root, Path::new("k-%2f")), None);
        assert_eq!(key_of_path(root, Path::new("k-a b")), None);
        assert_eq!(key_of_path(root, Path::new(".tmp-x")), None);
        assert_eq!(key_of_path(root, Path::new("d-a")), None);
        assert_eq!(key_of_path(root, Path::new("i-%2f")), None);
        assert_eq!(
            key_of_path(root, Path::new("i-a%20b")),
            Some(b"a b".to_vec())
        );
        assert_eq!(key_of_path(root, Path::new("d-a/i-b")), None);
        assert_eq!(
            key_of_path(root, Path::new("k-a%20b")),
            Some(b"a b".to_vec())
        );
    }
}
