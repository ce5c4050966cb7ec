//! The server's on-disk store, and the only code that turns names into paths.
//!
//! ```text
//! ROOT/.tmp-XXXXXX                      uploads being received (deleted on failure)
//! ROOT/shacache/<2 hex>/<128 hex>       one blob, named by its SHA-512
//! ROOT/shadir/k-<encoded key>           one key's list: a JSON array of [inner, signature]
//! ROOT/shadir/d-<part>/…/k-<last part>  the same for keys whose encoding is long
//! ```
//!
//! A key is any byte string of 1 to [`MAX_KEY_LEN`] bytes. Its file name is the key
//! percent-encoded (every byte outside `A-Z a-z 0-9 . _ - : = +` becomes `%XX`, uppercase
//! hex), so it never contains `/` or NUL, and with the `k-` prefix it can never be `.` or
//! `..`. Encodings longer than [`NAME_CHUNK`] characters are cut into chunks of that size:
//! every chunk but the last names a directory (`d-` prefix), the last the file (`k-`), so
//! every component stays under the usual 255-byte name limit and file and directory names
//! cannot collide. The mapping is reversible ([`key_of_path`]).
//!
//! Every write is durable: data is fsynced before the rename that publishes it, and the
//! directory is fsynced after any entry in it was created or renamed.

use crate::digest::{HashedFile, Sha512};
use crate::pyjson;
use crate::wire::RawEntry;
use percent_encoding::{percent_decode, percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

/// The longest key accepted, in bytes (after percent-decoding the URL).
pub const MAX_KEY_LEN: usize = 1024;
/// Directory of the blobs under the root.
pub const CACHE_DIR: &str = "shacache";
/// Directory of the shadir lists under the root.
pub const DIR_DIR: &str = "shadir";
/// Longest encoded part in one file name (plus a 2-byte prefix: well under 255).
pub const NAME_CHUNK: usize = 200;

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

/// The key stored at `path` (relative to `ROOT/shadir`, or absolute under it), when the
/// path is one [`key_path`] makes.
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
    encoded.push_str(last.strip_prefix("k-")?);
    let key: Vec<u8> = percent_decode(encoded.as_bytes()).collect();
    // Only the canonical spelling counts, so one key has exactly one path.
    (!key.is_empty() && key_path(root, &key) == base.join(rel)).then_some(key)
}

/// Why a shadir write failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("stored list {0} is not a JSON array; refusing to overwrite it")]
    Corrupt(PathBuf),
}

/// Publishes a received blob. Returns false when a blob of that name and size was
/// already there (the new copy is then dropped); a stored file of another size is
/// damaged and is replaced.
pub fn store_blob(root: &Path, hashed: HashedFile) -> io::Result<bool> {
    let dest = blob_path(root, &hashed.sha());
    if let Ok(meta) = fs::metadata(&dest) {
        if meta.is_file() && meta.len() == hashed.len() {
            return Ok(false);
        }
    }
    let dir = dest.parent().unwrap_or(root);
    ensure_dir(root, dir)?;
    hashed.persist(&dest)?;
    sync_dir(dir)?;
    Ok(true)
}

/// Adds `entry` to the list of `key` unless an identical pair is already there.
/// Returns whether it was added. The caller serialises writers of one key.
pub fn append_entry(root: &Path, key: &[u8], entry: &RawEntry) -> Result<bool, StoreError> {
    let path = key_path(root, key);
    let mut items = match fs::read(&path) {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Vec::new(),
        Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Array(items)) => items,
            _ => return Err(StoreError::Corrupt(path)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let duplicate = items
        .iter()
        .any(|item| match item.as_array().map(Vec::as_slice) {
            Some([Value::String(inner), Value::String(sig)]) => {
                *inner == entry.inner && *sig == entry.signature
            }
            _ => false,
        });
    if duplicate {
        return Ok(false);
    }
    items.push(Value::Array(vec![
        Value::String(entry.inner.clone()),
        Value::String(entry.signature.clone()),
    ]));
    let dir = path.parent().unwrap_or(root);
    ensure_dir(root, dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(pyjson::dumps(&Value::Array(items)).as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path).map_err(|e| e.error)?;
    sync_dir(dir)?;
    Ok(true)
}

/// Creates the missing directories from `base` (which exists) down to `dir`, fsyncing
/// each parent that gained an entry.
fn ensure_dir(base: &Path, dir: &Path) -> io::Result<()> {
    let rel = dir
        .strip_prefix(base)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "directory outside the store"))?;
    let mut cur = base.to_path_buf();
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unexpected path component in the store",
            ));
        };
        let parent = cur.clone();
        cur.push(name);
        match fs::create_dir(&cur) {
            Ok(()) => sync_dir(&parent)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes a directory's entries durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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
        assert_eq!(
            key_of_path(root, Path::new("k-a%20b")),
            Some(b"a b".to_vec())
        );
    }

    #[test]
    fn append_dedups_and_keeps_unknown_items() {
        let dir = tempfile::tempdir().unwrap();
        let e = RawEntry {
            inner: "{\"sha512\": \"x\"}".into(),
            signature: String::new(),
        };
        assert!(append_entry(dir.path(), b"k", &e).unwrap());
        assert!(!append_entry(dir.path(), b"k", &e).unwrap());
        let path = key_path(dir.path(), "k");
        fs::write(&path, r#"[["a", "b"], 3]"#).unwrap();
        assert!(append_entry(dir.path(), b"k", &e).unwrap());
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 3);
        fs::write(&path, "{}").unwrap();
        assert!(matches!(
            append_entry(dir.path(), b"k", &e),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(fs::read(&path).unwrap(), b"{}");
    }
}
