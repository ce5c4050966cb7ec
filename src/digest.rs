//! SHA-512 names and the only way to obtain a [`VerifiedFile`]: bytes hashed while they
//! were written, whose digest matched the expected one.
//!
//! Nothing else in the crate may construct a `VerifiedFile`; code that serves or caches a
//! blob takes one, so unverified bytes cannot reach a reader by accident.

use crate::behind::Behind;
use crate::sha512::Hasher as Sha512Hasher;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tempfile::TempPath;

/// A SHA-512 digest, written as 128 lowercase hex digits on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha512([u8; 64]);

/// Why a string is not a SHA-512 name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-512 name (128 lowercase hex digits): {0:?}")]
pub struct BadSha512(pub String);

impl Sha512 {
    /// Parses exactly 128 lowercase hex digits: the form shacache names blobs by.
    pub fn parse(s: &str) -> Result<Self, BadSha512> {
        let bad = || BadSha512(s.chars().take(140).collect());
        if s.len() != 128 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        let mut out = [0u8; 64];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Sha512(out))
    }

    /// Parses 128 hex digits in either case (servers accept both in bodies).
    pub fn parse_any_case(s: &str) -> Result<Self, BadSha512> {
        Self::parse(&s.to_ascii_lowercase()).map_err(|_| BadSha512(s.chars().take(140).collect()))
    }

    /// The digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Self {
        Sha512(crate::sha512::digest(bytes))
    }

    /// The digest of everything a reader yields.
    pub fn of_reader(mut r: impl Read) -> io::Result<(Self, u64)> {
        let mut h = Sha512Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update(&buf[..n]);
            total += n as u64;
        }
        Ok((Self::from_hasher(h), total))
    }

    /// The digest of a file's content.
    pub fn of_file(path: &Path) -> io::Result<(Self, u64)> {
        Self::of_reader(File::open(path)?)
    }

    fn from_hasher(h: Sha512Hasher) -> Self {
        Sha512(h.finalize())
    }

    /// 128 lowercase hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first `n` hex digits (n ≤ 128), for short names and logs.
    pub fn short(&self, n: usize) -> String {
        let mut s = self.hex();
        s.truncate(n.min(128));
        s
    }
}

impl fmt::Display for Sha512 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for Sha512 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha512({}…)", self.short(16))
    }
}

impl FromStr for Sha512 {
    type Err = BadSha512;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A temporary file that hashes what is written to it.
///
/// Used for downloads (then [`HashingFile::verify`]) and for uploads received by the
/// server (then [`HashingFile::finish`], which names the blob by what was received).
/// Past the first few MiB, hashing moves to a thread of its own, so that receiving,
/// writing and hashing a large blob overlap: SHA-512 on one core is what bounds a cold
/// read, and the network and the page cache can run beside it.
pub struct HashingFile {
    file: File,
    path: TempPath,
    hasher: HashState,
    len: u64,
    /// With [`HashingFile::write_behind`]: the disk's writeback and the page cache.
    behind: Option<Behind>,
}

/// A SHA-512 computed incrementally, on a thread of its own once the data is large.
pub struct StreamHasher {
    state: HashState,
    len: u64,
}

impl Default for StreamHasher {
    fn default() -> Self {
        StreamHasher {
            state: HashState::Inline(Sha512Hasher::new()),
            len: 0,
        }
    }
}

impl StreamHasher {
    /// Feeds the next bytes.
    pub fn update(&mut self, data: bytes::Bytes) {
        let n = data.len() as u64;
        self.state.update(data, self.len);
        self.len += n;
    }
    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// True while the hash is computed on the caller's thread: [`StreamHasher::finish`]
    /// then only hashes the last block (no thread to wait for).
    pub fn is_inline(&self) -> bool {
        matches!(self.state, HashState::Inline(_))
    }
    /// The digest of everything fed.
    pub fn finish(self) -> io::Result<Sha512> {
        self.state.finalize()
    }
}

/// Where the hash is computed.
enum HashState {
    Inline(Sha512Hasher),
    Thread {
        tx: std::sync::mpsc::SyncSender<bytes::Bytes>,
        handle: std::thread::JoinHandle<Sha512Hasher>,
    },
}

/// Data hashed inline before a hashing thread is worth starting.
const INLINE_HASH_LIMIT: u64 = 4 << 20;
/// Chunks queued for the hashing thread. A network chunk may keep a whole receive
/// buffer alive, so the queue stays short: memory, not throughput, is what it costs.
const HASH_QUEUE: usize = 16;

impl HashState {
    fn update(&mut self, data: bytes::Bytes, len_before: u64) {
        if let HashState::Inline(h) = self {
            if len_before + data.len() as u64 <= INLINE_HASH_LIMIT {
                h.update(&data);
                return;
            }
            let hasher = std::mem::take(h);
            let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(HASH_QUEUE);
            let handle = std::thread::spawn(move || {
                let mut hasher = hasher;
                for chunk in rx {
                    hasher.update(&chunk);
                }
                hasher
            });
            *self = HashState::Thread { tx, handle };
        }
        if let HashState::Thread { tx, .. } = self {
            // The thread only ends when the sender is dropped; a send error would mean it
            // panicked, which `finalize` reports.
            let _ = tx.send(data);
        }
    }

    fn finalize(self) -> io::Result<Sha512> {
        let hasher = match self {
            HashState::Inline(h) => h,
            HashState::Thread { tx, handle } => {
                drop(tx);
                handle
                    .join()
                    .map_err(|_| io::Error::other("the hashing thread panicked"))?
            }
        };
        Ok(Sha512::from_hasher(hasher))
    }
}

/// The hash did not match: the temporary file is already deleted.
#[derive(Debug, Clone, thiserror::Error)]
#[error("SHA-512 mismatch: expected {expected}, got {actual} ({len} bytes)")]
pub struct Mismatch {
    pub expected: Sha512,
    pub actual: Sha512,
    pub len: u64,
}

impl HashingFile {
    /// A new empty temporary file in `dir` (same filesystem as its destination, so the
    /// final rename is atomic).
    pub fn new_in(dir: &Path) -> io::Result<Self> {
        let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
        let (file, path) = tmp.into_parts();
        Ok(HashingFile {
            file,
            path,
            hasher: HashState::Inline(Sha512Hasher::new()),
            len: 0,
            behind: None,
        })
    }

    /// Starts the disk's writeback of each few MiB as soon as they are written, so
    /// that a durable [`HashingFile::finish`] waits for the last few MiB rather than
    /// for the whole file (the server's uploads: a 512 MiB fsync alone took 0.8 s), and
    /// drops what is on disk from the page cache ([`crate::behind`]). Its writes wait
    /// for the disk now and then: for a thread that may block.
    pub fn write_behind(mut self) -> Self {
        self.behind = Some(Behind::new());
        self
    }

    /// Appends bytes and feeds them to the hash.
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_bytes(bytes::Bytes::copy_from_slice(data))
    }

    /// Appends bytes and feeds them to the hash without copying them again (a network
    /// chunk is shared with the hashing thread).
    pub fn write_bytes(&mut self, data: bytes::Bytes) -> io::Result<()> {
        self.file.write_all(&data)?;
        let n = data.len() as u64;
        self.hasher.update(data, self.len);
        self.len += n;
        if let Some(behind) = &mut self.behind {
            behind.advance(&self.file, self.len);
        }
        Ok(())
    }

    /// Bytes written so far (where a resumed download continues from).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Throws away everything written (a server answered 200 to a resume request).
    pub fn reset(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        let old = std::mem::replace(&mut self.hasher, HashState::Inline(Sha512Hasher::new()));
        let _ = old.finalize();
        self.len = 0;
        if self.behind.is_some() {
            self.behind = Some(Behind::new());
        }
        Ok(())
    }

    /// Ends writing: flushes to disk and returns the digest of what was written.
    pub fn finish(mut self, durable: bool) -> io::Result<HashedFile> {
        self.file.flush()?;
        if durable {
            self.file.sync_all()?;
        }
        let sha = self.hasher.finalize()?;
        Ok(HashedFile {
            path: self.path,
            sha,
            len: self.len,
        })
    }

    /// Ends writing and checks the digest. On a mismatch the file is deleted.
    pub fn verify(self, expected: &Sha512) -> Result<VerifiedFile, VerifyError> {
        let hashed = self.finish(false)?;
        if hashed.sha != *expected {
            return Err(VerifyError::Mismatch(Mismatch {
                expected: *expected,
                actual: hashed.sha,
                len: hashed.len,
            }));
        }
        Ok(VerifiedFile {
            path: hashed.path,
            sha: hashed.sha,
            len: hashed.len,
        })
    }
}

/// A fully written temporary file and the digest of its bytes: a blob named by whatever
/// arrived (the server's uploads, where any content is acceptable).
///
/// Why not a [`VerifiedFile`]: both hold a file whose bytes hash to `sha`, but a
/// `VerifiedFile` also says that this digest is the one a caller *asked for* (a download,
/// a cached blob, a staged file hashed under its lock), and the client's cache accepts
/// only that. A `HashedFile` has no conversion into one, so code that downloads cannot
/// skip the comparison with the expected name by calling [`HashingFile::finish`] instead
/// of [`HashingFile::verify`]; and the server's store takes a `HashedFile`, since it names
/// blobs by their content and expects nothing.
pub struct HashedFile {
    path: TempPath,
    sha: Sha512,
    len: u64,
}

impl HashedFile {
    pub fn sha(&self) -> Sha512 {
        self.sha
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Renames into place (atomic on one filesystem). The blob is named by its own hash,
    /// so this is verified by construction.
    pub fn persist(self, dest: &Path) -> io::Result<()> {
        self.path.persist(dest).map_err(|e| e.error)?;
        Ok(())
    }
}

/// Adopts a file the caller hashed itself, while holding a lock that kept it unchanged
/// (a staged upload just published): it becomes a [`VerifiedFile`] without a second
/// read of possibly gigabytes. Crate-private so only such callers can vouch for a file.
pub(crate) fn adopt_hashed(path: PathBuf, sha: Sha512, len: u64) -> io::Result<VerifiedFile> {
    Ok(VerifiedFile {
        path: TempPath::try_from_path(path)?,
        sha,
        len,
    })
}

/// A download that failed verification, or the I/O that stopped it.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Mismatch(Mismatch),
    #[error("writing the temporary file: {0}")]
    Io(#[from] io::Error),
}

/// A temporary file whose content is known to hash to `sha`, the digest that was expected
/// of it. Only a hash match against an expected digest makes one (see [`HashedFile`] for
/// why the two types stay apart).
#[derive(Debug)]
pub struct VerifiedFile {
    path: TempPath,
    sha: Sha512,
    len: u64,
}

impl VerifiedFile {
    pub fn sha(&self) -> Sha512 {
        self.sha
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Renames into place; the file is no longer temporary.
    pub fn persist(self, dest: &Path) -> io::Result<PathBuf> {
        self.path.persist(dest).map_err(|e| e.error)?;
        Ok(dest.to_path_buf())
    }
    /// Verifies a file already on disk (e.g. a cached blob) by hashing it again.
    /// The file is *not* temporary afterwards unless it was; callers keep ownership of
    /// the path through the returned value only when they want it deleted on drop.
    pub fn check_existing(path: &Path, expected: &Sha512) -> Result<u64, VerifyError> {
        let (actual, len) = Sha512::of_file(path)?;
        if actual != *expected {
            return Err(VerifyError::Mismatch(Mismatch {
                expected: *expected,
                actual,
                len,
            }));
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "af069ac6a781ffdf3999e6e85dd4ad3c7bd7fa911bc350852877713eef390e3a9ce89663ad621544ccf2e27cd7cd3e9c37c444b962f9a35d44884de03e292c1c";

    #[test]
    fn parse_accepts_only_lowercase_128_hex() {
        assert!(Sha512::parse(HELLO).is_ok());
        assert!(Sha512::parse(&HELLO.to_uppercase()).is_err());
        assert!(Sha512::parse(&HELLO[..127]).is_err());
        assert!(Sha512::parse(&format!("{HELLO}0")).is_err());
        assert!(Sha512::parse("../../etc/passwd").is_err());
        assert_eq!(
            Sha512::parse_any_case(&HELLO.to_uppercase()).unwrap().hex(),
            HELLO
        );
    }

    #[test]
    fn digest_of_fixture_content() {
        assert_eq!(Sha512::of(b"hello shacache\n").hex(), HELLO);
        assert_eq!(Sha512::of(b"").hex(), "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e");
    }

    #[test]
    fn hashing_file_verifies_and_resets() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = HashingFile::new_in(dir.path()).unwrap();
        f.write_all(b"garbage").unwrap();
        f.reset().unwrap();
        f.write_all(b"hello ").unwrap();
        f.write_all(b"shacache\n").unwrap();
        let v = f.verify(&Sha512::parse(HELLO).unwrap()).unwrap();
        assert_eq!(v.len(), 15);
        let dest = dir.path().join("blob");
        v.persist(&dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello shacache\n");
    }

    #[test]
    fn large_writes_hash_on_a_thread_with_the_same_result() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..(9u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let expected = Sha512::of(&data);
        let mut f = HashingFile::new_in(dir.path()).unwrap();
        // Past the inline limit, then reset (a 200 answer to a resume), then again.
        f.write_all(&data[..6 << 20]).unwrap();
        f.reset().unwrap();
        for chunk in data.chunks(1 << 20) {
            f.write_bytes(bytes::Bytes::copy_from_slice(chunk)).unwrap();
        }
        let v = f.verify(&expected).unwrap();
        assert_eq!(v.len(), data.len() as u64);
        let mut h = StreamHasher::default();
        for chunk in data.chunks(300_000) {
            h.update(bytes::Bytes::copy_from_slice(chunk));
        }
        assert_eq!(h.finish().unwrap(), expected);
    }

    #[test]
    fn mismatch_deletes_the_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = HashingFile::new_in(dir.path()).unwrap();
        f.write_all(b"evil").unwrap();
        let err = f.verify(&Sha512::parse(HELLO).unwrap()).unwrap_err();
        assert!(matches!(err, VerifyError::Mismatch(_)));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
