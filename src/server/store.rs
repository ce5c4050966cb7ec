//! The server's on-disk store: `names` (the only code that turns keys and digests into
//! paths), `files` (blobs put in place, directories, temporaries left by a crash) and,
//! here, a key's list appended in place with its digest index.
//!
//! ```text
//! ROOT/.tmp-XXXXXX                      uploads being received (deleted on failure)
//! ROOT/shacache/<2 hex>/<128 hex>       one blob, named by its SHA-512
//! ROOT/shadir/k-<encoded key>           one key's list: a JSON array of [inner, signature]
//!                                       (appended to in place, see below)
//! ROOT/shadir/i-<encoded key>           its index: where the list is committed, and a
//!                                       16-byte digest of each pair listed
//! ROOT/shadir/d-<part>/…/k-<last part>  the same for keys whose encoding is long
//! ```
//!
//! A key is any byte string of 1 to [`MAX_KEY_LEN`] bytes. Its file name is the key
//! percent-encoded (every byte outside `A-Z a-z 0-9 . _ - : = +` becomes `%XX`, uppercase
//! hex), so it never contains `/` or NUL, and with the `k-` prefix it can never be `.` or
//! `..`. Encodings longer than `names::NAME_CHUNK` characters are cut into chunks of that size:
//! every chunk but the last names a directory (`d-` prefix), the last the file (`k-`), so
//! every component stays under the usual 255-byte name limit and file and directory names
//! cannot collide. The mapping is reversible ([`key_of_path`]).
//!
//! Every write is durable: data is fsynced before the rename that publishes it, and the
//! directory is fsynced after any entry in it was created or renamed.

mod files;
mod names;

use files::{ensure_dir, sync_dir, TMP_PREFIX};
pub(crate) use files::{remove_temporaries, store_blob};
pub use names::{blob_path, key_of_path, key_path, MAX_KEY_LEN};
pub(crate) use names::{index_path, CACHE_DIR, DIR_DIR};

use crate::pyjson;
use crate::wire::RawEntry;
use serde_json::Value;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Why a shadir write failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("stored list {0} is not a JSON array; refusing to overwrite it")]
    Corrupt(PathBuf),
}

// A key's list is a plain JSON array of `[inner, signature]` pairs at rest, written as
// Python's `json.dumps` writes it. Beside it, its index (`i-` in place of `k-`): a
// fixed-size header, then a 16-byte digest of every pair listed, so a PUT finds duplicates
// without reading the list. The header names the list file it describes (inode, length,
// modification time) and where the committed list ends.
//
// An append overwrites the list's closing `]` with `, item]` (`item]` in an empty list),
// writes the pair's digest past the index's end, syncs both, then rewrites the index's
// header (one small write in the first sector) and syncs it. A reader takes the committed
// end from the header (read before it looks at the list's length) and sends the list's
// bytes up to the last one, then a `]` of its own, so an append in progress never shows.
// A crash between the append and its commit leaves the committed list readable; the next
// PUT finds the header out of date and rebuilds the index (and the list, from the whole
// file when it parses, else from the committed part).
//
// A list without an index (written by an older server, or edited by hand) is rebuilt the
// same way by the next PUT, streaming: one item at a time is held in memory.

/// How every index starts.
const INDEX_MAGIC: &[u8] = b"#shacachefs-index v1 ";
/// Bytes of the index header.
pub(crate) const INDEX_HEADER: usize = 128;
/// Bytes of one index record.
const DIGEST_LEN: usize = 16;
/// Read size for scans and rebuilds.
const SCAN_CHUNK: usize = 64 * 1024;

/// The committed state of a list, as its index's header records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexHeader {
    /// Inode of the list file described.
    pub(crate) inode: u64,
    /// Committed length of the list (its last byte is the closing `]`).
    pub(crate) list_end: u64,
    /// Committed length of the index, header included.
    pub(crate) index_end: u64,
    /// The list's modification time (ns since the epoch) at the last commit.
    pub(crate) mtime_ns: u64,
}

impl IndexHeader {
    fn encode(&self) -> [u8; INDEX_HEADER] {
        let mut out = [b' '; INDEX_HEADER];
        let text = format!(
            "{}{:020} {:020} {:020} {:020}",
            std::str::from_utf8(INDEX_MAGIC).unwrap_or_default(),
            self.inode,
            self.list_end,
            self.index_end,
            self.mtime_ns
        );
        out[..text.len()].copy_from_slice(text.as_bytes());
        out[INDEX_HEADER - 1] = b'\n';
        out
    }

    /// Parses an index header; `None` when `bytes` is not one.
    pub(crate) fn parse(bytes: &[u8]) -> Option<IndexHeader> {
        let rest = bytes.get(..INDEX_HEADER)?.strip_prefix(INDEX_MAGIC)?;
        let mut parts = std::str::from_utf8(rest).ok()?.split_ascii_whitespace();
        let mut next = || parts.next()?.parse::<u64>().ok();
        let h = IndexHeader {
            inode: next()?,
            list_end: next()?,
            index_end: next()?,
            mtime_ns: next()?,
        };
        let records = h.index_end.checked_sub(INDEX_HEADER as u64)?;
        (h.list_end >= 2 && records % DIGEST_LEN as u64 == 0).then_some(h)
    }

    /// How many bytes of a list of `len` bytes and inode `inode` a reader sends before
    /// its own closing `]`; `None` when this header does not describe that file (no
    /// index yet, or the file was replaced or cut since): then the file is sent as it is.
    pub(crate) fn committed_prefix(&self, inode: u64, len: u64) -> Option<u64> {
        (self.inode == inode && len >= self.list_end).then_some(self.list_end - 1)
    }
}

/// Reads the header of the index of the list at `list` (`None`: no usable index).
pub(crate) fn read_index_header(list: &Path) -> io::Result<Option<IndexHeader>> {
    match File::open(index_path(list)) {
        Ok(f) => header_of(&f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn header_of(index: &File) -> io::Result<Option<IndexHeader>> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; INDEX_HEADER];
    let mut got = 0;
    while got < INDEX_HEADER {
        match index.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(IndexHeader::parse(&buf[..got]))
}

fn mtime_ns(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    (meta.mtime().max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec().max(0) as u64)
}

/// What identifies a pair in the index.
fn pair_digest(inner: &str, signature: &str) -> [u8; DIGEST_LEN] {
    let mut h = crate::sha512::Hasher::new();
    h.update((inner.len() as u64).to_le_bytes());
    h.update(inner.as_bytes());
    h.update(signature.as_bytes());
    let full = h.finalize();
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(&full[..DIGEST_LEN]);
    out
}

/// Whether `digest` is among the index's committed records.
fn index_contains(index: &File, end: u64, digest: &[u8; DIGEST_LEN]) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; SCAN_CHUNK];
    let mut pos = INDEX_HEADER as u64;
    while pos < end {
        let want = (end - pos).min(SCAN_CHUNK as u64) as usize;
        index.read_exact_at(&mut buf[..want], pos)?;
        if buf[..want]
            .chunks_exact(DIGEST_LEN)
            .any(|record| record == digest)
        {
            return Ok(true);
        }
        pos += want as u64;
    }
    Ok(false)
}

/// The list and its index, opened, when the index describes the list exactly as it is.
fn open_current(path: &Path) -> io::Result<Option<(File, File, IndexHeader)>> {
    use std::os::unix::fs::MetadataExt;
    let open_rw = |p: &Path| fs::OpenOptions::new().read(true).write(true).open(p);
    let list = match open_rw(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let index = match open_rw(&index_path(path)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(h) = header_of(&index)? else {
        return Ok(None);
    };
    let meta = list.metadata()?;
    let current = meta.ino() == h.inode
        && meta.len() == h.list_end
        && mtime_ns(&meta) == h.mtime_ns
        && index.metadata()?.len() >= h.index_end;
    Ok(current.then_some((list, index, h)))
}

/// Adds `entry` to the list of `key` unless an identical pair is already there.
/// Returns whether it was added. The caller serialises writers of one key. Neither the
/// list nor its index is ever read whole into memory, and an append writes only the new
/// item and its digest (a list without a current index is rebuilt first, streaming).
pub(crate) fn append_entry(root: &Path, key: &[u8], entry: &RawEntry) -> Result<bool, StoreError> {
    use std::os::unix::fs::FileExt;
    let path = key_path(root, key);
    let dir = path.parent().unwrap_or(root).to_path_buf();
    ensure_dir(root, &dir)?;
    let (list, index, header) = match open_current(&path)? {
        Some(found) => found,
        None => {
            rebuild(&path)?;
            open_current(&path)?.ok_or_else(|| {
                io::Error::other(format!("list {} changed while rebuilt", path.display()))
            })?
        }
    };
    let digest = pair_digest(&entry.inner, &entry.signature);
    if index_contains(&index, header.index_end, &digest)? {
        return Ok(false);
    }
    let item = pyjson::dumps(&Value::Array(vec![
        Value::String(entry.inner.clone()),
        Value::String(entry.signature.clone()),
    ]));
    let sep = if header.list_end == 2 { "" } else { ", " };
    let tail = format!("{sep}{item}]");
    // Over the closing bracket.
    list.write_all_at(tail.as_bytes(), header.list_end - 1)?;
    index.write_all_at(&digest, header.index_end)?;
    list.sync_data()?;
    index.sync_data()?;
    let meta = list.metadata()?;
    let next = IndexHeader {
        inode: header.inode,
        list_end: header.list_end - 1 + tail.len() as u64,
        index_end: header.index_end + DIGEST_LEN as u64,
        mtime_ns: mtime_ns(&meta),
    };
    index.write_all_at(&next.encode(), 0)?;
    index.sync_data()?;
    Ok(true)
}

/// Rewrites the list at `path` (as `json.dumps` writes it) and a fresh index for it,
/// reading the stored list one item at a time: the whole file when it parses, else, when
/// the index describes this file, its committed part (an append was cut short). A missing
/// list becomes an empty one. Both are written to temporary files and renamed into place,
/// the index first (its header names the new list's inode).
fn rebuild(path: &Path) -> Result<(), StoreError> {
    use std::io::{BufWriter, Seek};
    use std::os::unix::fs::MetadataExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut list = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempfile_in(dir)?;
    let mut index = tempfile::Builder::new()
        .prefix(TMP_PREFIX)
        .tempfile_in(dir)?;
    let old = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    let counts = if let Some(mut old) = old {
        let whole = copy_items(&mut old, None, &mut list, &mut index)?;
        match whole {
            Some(c) => c,
            None => {
                let committed = match read_index_header(path)? {
                    Some(h) => {
                        let meta = old.metadata()?;
                        h.committed_prefix(meta.ino(), meta.len())
                    }
                    None => None,
                };
                let Some(prefix) = committed else {
                    return Err(StoreError::Corrupt(path.to_path_buf()));
                };
                for f in [list.as_file_mut(), index.as_file_mut()] {
                    f.set_len(0)?;
                    f.seek(io::SeekFrom::Start(0))?;
                }
                copy_items(&mut old, Some(prefix), &mut list, &mut index)?
                    .ok_or_else(|| StoreError::Corrupt(path.to_path_buf()))?
            }
        }
    } else {
        let mut w = BufWriter::new(list.as_file_mut());
        w.write_all(b"[]")?;
        w.flush()?;
        let mut w = BufWriter::new(index.as_file_mut());
        w.write_all(&[b' '; INDEX_HEADER])?;
        w.flush()?;
        (2, 0)
    };
    list.as_file().sync_all()?;
    let meta = list.as_file().metadata()?;
    let header = IndexHeader {
        inode: meta.ino(),
        list_end: counts.0,
        index_end: INDEX_HEADER as u64 + counts.1 * DIGEST_LEN as u64,
        mtime_ns: mtime_ns(&meta),
    };
    {
        use std::os::unix::fs::FileExt;
        index.as_file().write_all_at(&header.encode(), 0)?;
    }
    index.as_file().sync_all()?;
    index.persist(index_path(path)).map_err(|e| e.error)?;
    list.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)?;
    Ok(())
}

/// Streams the items of the stored list `old` (its first `prefix` bytes and a `]` when
/// given, else the whole file) into a new list and index (header space left blank).
/// Returns the new list's length and the pairs indexed, or `None` when it does not parse
/// as a JSON array (or is not blank).
fn copy_items(
    old: &mut File,
    prefix: Option<u64>,
    list: &mut tempfile::NamedTempFile,
    index: &mut tempfile::NamedTempFile,
) -> io::Result<Option<(u64, u64)>> {
    use std::io::{BufRead, BufReader, BufWriter, Read, Seek};
    old.seek(io::SeekFrom::Start(0))?;
    let old = old.try_clone()?;
    let reader: Box<dyn Read> = match prefix {
        Some(n) => Box::new(old.take(n).chain(&b"]"[..])),
        None => Box::new(old),
    };
    let mut reader = BufReader::with_capacity(SCAN_CHUNK, reader);
    let mut lw = BufWriter::new(list.as_file_mut());
    let mut iw = BufWriter::new(index.as_file_mut());
    iw.write_all(&[b' '; INDEX_HEADER])?;
    lw.write_all(b"[")?;
    // An empty (or blank) file is an empty list.
    let blank = loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break true;
        }
        let skip = buf.iter().take_while(|b| b.is_ascii_whitespace()).count();
        if skip < buf.len() {
            reader.consume(skip);
            break false;
        }
        let n = buf.len();
        reader.consume(n);
    };
    let mut sink = Sink {
        list: &mut lw,
        index: &mut iw,
        list_len: 1,
        pairs: 0,
        io_error: None,
    };
    if !blank {
        let mut de = serde_json::Deserializer::from_reader(reader);
        let parsed =
            serde::de::DeserializeSeed::deserialize(&mut sink, &mut de).and_then(|()| de.end());
        if let Some(e) = sink.io_error.take() {
            return Err(e);
        }
        if parsed.is_err() {
            return Ok(None);
        }
    }
    let (list_len, pairs) = (sink.list_len + 1, sink.pairs);
    lw.write_all(b"]")?;
    lw.flush()?;
    iw.flush()?;
    Ok(Some((list_len, pairs)))
}

/// Receives a stored list's items one at a time while it is parsed, and writes each to
/// the new list (and a pair's digest to the index).
struct Sink<'a, L: Write, I: Write> {
    list: &'a mut L,
    index: &'a mut I,
    list_len: u64,
    pairs: u64,
    io_error: Option<io::Error>,
}

impl<'de, L: Write, I: Write> serde::de::DeserializeSeed<'de> for &mut Sink<'_, L, I> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, L: Write, I: Write> serde::de::Visitor<'de> for &mut Sink<'_, L, I> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array")
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<Value>()? {
            let text = pyjson::dumps(&item);
            let sep = if self.list_len == 1 { "" } else { ", " };
            let digest = match item.as_array().map(Vec::as_slice) {
                Some([Value::String(inner), Value::String(sig)]) => Some(pair_digest(inner, sig)),
                _ => None,
            };
            let written = (|| -> io::Result<()> {
                self.list.write_all(sep.as_bytes())?;
                self.list.write_all(text.as_bytes())?;
                if let Some(d) = digest {
                    self.index.write_all(&d)?;
                }
                Ok(())
            })();
            if let Err(e) = written {
                self.io_error = Some(e);
                return Err(serde::de::Error::custom("write failed"));
            }
            self.list_len += (sep.len() + text.len()) as u64;
            if digest.is_some() {
                self.pairs += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
