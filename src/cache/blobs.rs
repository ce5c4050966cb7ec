//! The blob store: `blobs/<first 2 hex>/<128 hex>` files, their accounting
//! ([`LruIndex`]) and eviction.
//!
//! Design notes:
//! - Only a verified file renamed into place ever gets a blob name, so any file found
//!   under a valid name was verified once (another process may have put it there: a blob
//!   found on disk but unknown to the index is adopted). `fsck` checks the bytes again.
//! - File-name operations (stat, open, rename, unlink) happen under the index lock, so
//!   the accounting and the directory agree within this process; hashing and fsync
//!   happen outside it.
//! - Another process sharing the directory may unlink a blob at any time: a missing file
//!   is a miss and is forgotten, never an error. Its open descriptors stay valid (Unix
//!   semantics), so a reader in either process is never cut off.
//! - The blob just inserted is spared by the eviction that its insertion triggers, so a
//!   blob larger than the whole limit can still be opened; it is evicted by the next
//!   eviction once no pin holds it (a pin drop runs one).

use super::disk::{free_bytes, remove_entry, PROTECTED};
use super::index::LruIndex;
use super::{BlobPin, CacheError, FsckReport};
use crate::digest::{Sha512, VerifiedFile};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// How stale a cached blob's mtime (its recency across restarts) may get before an
/// open stamps it again.
const MTIME_GRAIN: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) struct BlobStore {
    root: PathBuf,
    /// Any path on the cache's file system, for `statvfs`.
    fs_probe: PathBuf,
    max_bytes: u64,
    index: Mutex<LruIndex>,
}

/// A blob file found by a scan.
struct Found {
    sha: Sha512,
    len: u64,
    mtime: SystemTime,
}

fn io_err(path: &Path, source: io::Error) -> CacheError {
    CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn unlink(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove a blob"),
    }
}

fn is_shard_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lists the blob files under `root`, removing whatever cannot be one (bad names,
/// blobs in the wrong shard, directories or links where a blob should be).
fn scan(root: &Path) -> io::Result<Vec<Found>> {
    let mut found = Vec::new();
    for shard in fs::read_dir(root)? {
        let shard = shard?;
        let name = shard.file_name();
        let Ok(file_type) = shard.file_type() else {
            continue;
        };
        if name == PROTECTED {
            continue;
        }
        let shard_name = name.to_str().filter(|n| is_shard_name(n));
        let Some(shard_name) = shard_name.filter(|_| file_type.is_dir()) else {
            tracing::warn!(path = %shard.path().display(), "not a blob shard, removing");
            remove_entry(&shard.path(), file_type.is_dir());
            continue;
        };
        let Ok(entries) = fs::read_dir(shard.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let sha = entry
                .file_name()
                .to_str()
                .and_then(|n| Sha512::parse(n).ok())
                .filter(|sha| sha.short(2) == shard_name && file_type.is_file());
            let Some(sha) = sha else {
                tracing::warn!(path = %entry.path().display(), "not a blob, removing");
                remove_entry(&entry.path(), file_type.is_dir());
                continue;
            };
            // A blob unlinked meanwhile by another process is simply not there.
            let Ok(meta) = entry.metadata() else { continue };
            found.push(Found {
                sha,
                len: meta.len(),
                mtime: meta.modified().unwrap_or(UNIX_EPOCH),
            });
        }
    }
    Ok(found)
}

impl BlobStore {
    /// Scans `root` (created if missing) to rebuild the accounting, oldest first, then
    /// evicts down to the limit.
    pub(crate) fn open(
        root: PathBuf,
        fs_probe: PathBuf,
        max_bytes: u64,
    ) -> Result<Self, CacheError> {
        super::disk::create_private_dir_all(&root).map_err(|e| io_err(&root, e))?;
        let mut found = scan(&root).map_err(|e| io_err(&root, e))?;
        found.sort_by_key(|f| f.mtime);
        let mut index = LruIndex::new();
        for f in found {
            index.insert(f.sha, f.len);
        }
        let store = BlobStore {
            root,
            fs_probe,
            max_bytes,
            index: Mutex::new(index),
        };
        let mut ix = store.lock();
        store.evict(&mut ix, None);
        drop(ix);
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, LruIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn path_of(&self, sha: &Sha512) -> PathBuf {
        let hex = sha.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Unlinks least recently used unpinned blobs (sparing `keep`) while over the limit.
    fn evict(&self, ix: &mut LruIndex, keep: Option<&Sha512>) {
        while let Some((sha, size)) = ix.pop_victim(self.max_bytes, keep) {
            tracing::debug!(sha = %sha.short(16), size, "evicting blob");
            unlink(&self.path_of(&sha));
        }
    }

    /// Whether a found length is acceptable: the size the index knew (if any) and the
    /// recorded true size (if any) must both agree.
    fn length_ok(ix: &LruIndex, sha: &Sha512, len: u64, expected: Option<u64>) -> bool {
        ix.peek(sha).is_none_or(|n| n == len) && expected.is_none_or(|n| n == len)
    }

    fn discard(&self, ix: &mut LruIndex, sha: &Sha512, why: &str) {
        tracing::warn!(sha = %sha, reason = why, "removing cached blob");
        ix.remove(sha);
        unlink(&self.path_of(sha));
    }

    /// The size of a present blob (marked used). `expected` is the recorded true size.
    pub(crate) fn lookup(&self, sha: &Sha512, expected: Option<u64>) -> Option<u64> {
        let path = self.path_of(sha);
        let mut ix = self.lock();
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {
                let len = meta.len();
                if !Self::length_ok(&ix, sha, len, expected) {
                    self.discard(&mut ix, sha, "wrong length");
                    return None;
                }
                if ix.touch(sha).is_none() {
                    ix.insert(*sha, len);
                    self.evict(&mut ix, Some(sha));
                }
                Some(len)
            }
            Ok(_) => None,
            Err(e) => {
                if e.kind() == io::ErrorKind::NotFound {
                    ix.remove(sha);
                }
                None
            }
        }
    }

    /// Moves a verified file into place (an existing copy of the right length is kept)
    /// and evicts others if needed. Returns the size.
    pub(crate) fn insert(&self, file: VerifiedFile) -> Result<u64, CacheError> {
        let sha = file.sha();
        let len = file.len();
        let dest = self.path_of(&sha);
        let shard = dest.parent().unwrap_or(&self.root);
        super::disk::create_private_dir_all(shard).map_err(|e| io_err(shard, e))?;
        let mut ix = self.lock();
        let existing = fs::symlink_metadata(&dest).ok().filter(|m| m.is_file());
        if existing.is_some_and(|m| m.len() == len) {
            drop(file);
        } else {
            file.persist(&dest).map_err(|e| io_err(&dest, e))?;
            // Durable in the background: an fsync before the rename costs as much as a
            // third of a cold read. Until it lands only a machine crash (not a process
            // crash) can leave a blob with unwritten bytes, and the cache re-hashes the
            // blobs of a session that did not end cleanly when it is next opened
            // (`Cache::open`).
            let synced = dest.clone();
            std::thread::spawn(move || {
                let _ = File::open(&synced).and_then(|f| f.sync_all());
            });
        }
        ix.insert(sha, len);
        ix.touch(&sha);
        self.evict(&mut ix, Some(&sha));
        Ok(len)
    }

    /// Opens and pins a blob; `None` when missing or of the wrong length (removed).
    pub(crate) fn open_blob(
        self: &Arc<Self>,
        sha: &Sha512,
        expected: Option<u64>,
    ) -> Result<Option<(File, u64, BlobPin)>, CacheError> {
        let path = self.path_of(sha);
        let mut ix = self.lock();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                ix.remove(sha);
                return Ok(None);
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        let meta = file.metadata().map_err(|e| io_err(&path, e))?;
        let len = meta.len();
        if !meta.is_file() || !Self::length_ok(&ix, sha, len, expected) {
            self.discard(&mut ix, sha, "wrong length or not a file");
            return Ok(None);
        }
        if ix.touch(sha).is_none() {
            ix.insert(*sha, len);
        }
        let Some(generation) = ix.pin(sha) else {
            return Ok(None); // unreachable: just inserted
        };
        self.evict(&mut ix, Some(sha));
        drop(ix);
        // Recency survives a restart through the mtime (atime is often not updated),
        // to within a minute: a blob opened again and again (many small files read in
        // a loop) is not re-stamped on every open. Best effort: a read-only or
        // foreign-owned cache only loses the order.
        let now = SystemTime::now();
        let stale = meta.modified().map_or(true, |m| {
            now.duration_since(m).map_or(true, |age| age >= MTIME_GRAIN)
        });
        if stale {
            let _ = file.set_modified(now);
        }
        let pin = BlobPin {
            store: Arc::clone(self),
            sha: *sha,
            generation,
        };
        Ok(Some((file, len, pin)))
    }

    pub(crate) fn unpin(&self, sha: &Sha512, generation: u64) {
        let mut ix = self.lock();
        if ix.unpin(sha, generation) {
            self.evict(&mut ix, None);
        }
    }

    pub(crate) fn remove(&self, sha: &Sha512) {
        let mut ix = self.lock();
        ix.remove(sha);
        unlink(&self.path_of(sha));
    }

    /// Evicts unpinned blobs to make room for `bytes` within the limit, then makes sure
    /// the file system itself has `bytes` free, evicting more if that helps.
    pub(crate) fn reserve(&self, bytes: u64) -> Result<(), CacheError> {
        let mut ix = self.lock();
        let probe = &self.fs_probe;
        let free = free_bytes(probe).map_err(|e| io_err(probe, e))?;
        // Hopeless requests must not empty the cache on their way to failing.
        if free.saturating_add(ix.evictable_bytes(None)) < bytes {
            return Err(CacheError::NoSpace { needed: bytes });
        }
        while let Some((sha, _)) = ix.pop_victim(self.max_bytes.saturating_sub(bytes), None) {
            unlink(&self.path_of(&sha));
        }
        // Bounded by the number of blobs: each round forgets one.
        loop {
            if free_bytes(probe).map_err(|e| io_err(probe, e))? >= bytes {
                return Ok(());
            }
            match ix.pop_any_victim(None) {
                Some((sha, _)) => unlink(&self.path_of(&sha)),
                None => return Err(CacheError::NoSpace { needed: bytes }),
            }
        }
    }

    /// (bytes, limit, count)
    pub(crate) fn usage(&self) -> (u64, u64, usize) {
        let ix = self.lock();
        (ix.total(), self.max_bytes, ix.len())
    }

    /// Re-hashes every blob file on disk (not only the ones this process knows) and
    /// removes the wrong or unreadable ones that no pin holds. No lock is held while
    /// hashing; a file replaced meanwhile (another inode) is left alone.
    pub(crate) fn fsck(&self) -> Result<FsckReport, CacheError> {
        self.fsck_since(None)
    }

    /// `fsck` of the blobs modified at or after `since` (all when `None`).
    pub(crate) fn fsck_since(&self, since: Option<SystemTime>) -> Result<FsckReport, CacheError> {
        let found = scan(&self.root).map_err(|e| io_err(&self.root, e))?;
        let mut report = FsckReport::default();
        for f in found {
            if since.is_some_and(|t| f.mtime < t) {
                continue;
            }
            let path = self.path_of(&f.sha);
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path, e)),
            };
            let ino = file.metadata().map(|m| (m.dev(), m.ino())).ok();
            let good = match Sha512::of_reader(&file) {
                Ok((actual, len)) => {
                    report.checked += 1;
                    report.bytes += len;
                    if actual != f.sha {
                        tracing::warn!(expected = %f.sha, %actual, "fsck: blob does not match its name");
                    }
                    actual == f.sha
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "fsck: blob unreadable");
                    false
                }
            };
            if good {
                continue;
            }
            let mut ix = self.lock();
            if ix.is_pinned(&f.sha) {
                report.pinned.push(f.sha);
                continue;
            }
            let now = fs::symlink_metadata(&path).map(|m| (m.dev(), m.ino())).ok();
            if now.is_some() && now == ino {
                ix.remove(&f.sha);
                unlink(&path);
                report.removed.push(f.sha);
            }
        }
        Ok(report)
    }
}

impl Drop for BlobPin {
    fn drop(&mut self) {
        self.store.unpin(&self.sha, self.generation);
    }
}
