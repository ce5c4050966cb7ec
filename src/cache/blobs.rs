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
//! - A downloaded blob is pinned in the same locked step that names it
//!   ([`BlobStore::insert_and_pin`]): no other thread's eviction can take it before its
//!   opener holds it.
//! - The open handles of one blob share one descriptor (kept weakly in the index).
//! - Downloads reserve room as their bytes arrive ([`Reservation`]), never from a size
//!   a server announced; every reservation in flight counts against the limit and
//!   against the free space, so concurrent downloads evict for each other.

use super::disk::{free_bytes, remove_entry, PROTECTED};
use super::index::LruIndex;
use super::{BlobPin, CacheError, FsckReport};
use crate::digest::{Sha512, VerifiedFile};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How stale a cached blob's mtime (its recency across restarts) may get before an
/// open stamps it again.
const MTIME_GRAIN: std::time::Duration = std::time::Duration::from_secs(60);

pub(crate) struct BlobStore {
    root: PathBuf,
    /// Any path on the cache's file system, for `statvfs`.
    fs_probe: PathBuf,
    max_bytes: u64,
    index: Mutex<LruIndex>,
    syncs: Arc<Syncs>,
}

/// The background fsyncs of blobs not yet done (see [`BlobStore::insert`]).
#[derive(Default)]
struct Syncs {
    pending: Mutex<usize>,
    done: Condvar,
    /// Tests: how long each background fsync waits before it starts.
    #[cfg(test)]
    delay: Mutex<Duration>,
}

impl Syncs {
    fn lock(&self) -> MutexGuard<'_, usize> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Room held in the cache for a download in flight: `reserved` bytes counted against
/// the limit and, of them, those not written yet against the free space. Grown by
/// [`Reservation::ensure`] as the bytes arrive; given back when dropped or when the
/// download enters the cache.
pub struct Reservation {
    store: Arc<BlobStore>,
    reserved: u64,
    /// Bytes of the download known to be written when the reservation last grew.
    written: u64,
}

/// How far ahead of the bytes received a reservation grows.
const RESERVE_STEP: u64 = 1 << 20;

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.reserved
    }

    /// The download holds `have` bytes and is about to hold `to`: makes sure that much
    /// is reserved, growing by up to [`RESERVE_STEP`] ahead (less when `hint`, the
    /// size a server announced, says the blob ends sooner; a hint is never reserved
    /// beyond that step). `NoSpace` when the file system cannot hold `to` bytes even
    /// after evicting every closed blob; past the announced size, without evicting any.
    pub fn ensure(&mut self, have: u64, to: u64, hint: Option<u64>) -> Result<(), CacheError> {
        if to <= self.reserved {
            return Ok(());
        }
        let ahead = match hint {
            Some(h) if h >= to => (h - to).min(RESERVE_STEP),
            _ => RESERVE_STEP,
        };
        // Past the size the server announced, the announcement was wrong: such bytes
        // take free space only, never a cached blob's place. (A body whose size was
        // not announced at all may use the room of closed blobs.)
        let evict = hint.is_none_or(|h| to <= h);
        let target = to.saturating_add(ahead);
        let have = have.min(to);
        let store = Arc::clone(&self.store);
        let mut ix = store.lock();
        let held = (self.reserved, self.reserved.saturating_sub(self.written));
        ix.rereserve(held, (0, 0));
        // Every byte this download may write before it asks again is checked against
        // the free space (less what the others may still write); when the step ahead
        // does not fit, only the bytes at hand are asked for.
        let mut result = store.make_room(&mut ix, target, target - have, evict);
        let mut target = target;
        if result.is_err() {
            target = to;
            result = store.make_room(&mut ix, target, target - have, evict);
        }
        match result {
            Ok(()) => {
                ix.rereserve((0, 0), (target, target - have));
                self.reserved = target;
                self.written = have;
                Ok(())
            }
            Err(e) => {
                ix.rereserve((0, 0), held);
                Err(e)
            }
        }
    }

    /// Gives the reservation back, under a lock the caller holds.
    fn release(&mut self, ix: &mut LruIndex) {
        let held = (self.reserved, self.reserved.saturating_sub(self.written));
        ix.rereserve(held, (0, 0));
        self.reserved = 0;
        self.written = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.reserved > 0 {
            let store = Arc::clone(&self.store);
            let mut ix = store.lock();
            self.release(&mut ix);
        }
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("reserved", &self.reserved)
            .field("written", &self.written)
            .finish()
    }
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
            syncs: Arc::new(Syncs::default()),
        };
        let mut ix = store.lock();
        store.evict(&mut ix, None);
        drop(ix);
        Ok(store)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, LruIndex> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn path_of(&self, sha: &Sha512) -> PathBuf {
        let hex = sha.hex();
        self.root.join(&hex[..2]).join(hex)
    }

    /// Unlinks least recently used unpinned blobs (sparing `keep`) while over the limit.
    /// The downloads in flight count against the limit: their blobs are coming.
    fn evict(&self, ix: &mut LruIndex, keep: Option<&Sha512>) {
        let budget = self.max_bytes.saturating_sub(ix.reserved().0);
        while let Some((sha, size)) = ix.pop_victim(budget, keep) {
            tracing::debug!(sha = %sha.short(16), size, "evicting blob");
            unlink(&self.path_of(&sha));
        }
    }

    /// Whether a found length agrees with the size the index knew (if any). The size a
    /// server announced is not checked here: see [`super::Cache::open_blob`].
    fn length_ok(ix: &LruIndex, sha: &Sha512, len: u64) -> bool {
        ix.peek(sha).is_none_or(|n| n == len)
    }

    fn discard(&self, ix: &mut LruIndex, sha: &Sha512, why: &str) {
        tracing::warn!(sha = %sha, reason = why, "removing cached blob");
        ix.remove(sha);
        unlink(&self.path_of(sha));
    }

    /// The size of a present blob (marked used).
    pub(crate) fn lookup(&self, sha: &Sha512) -> Option<u64> {
        let path = self.path_of(sha);
        let mut ix = self.lock();
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => {
                let len = meta.len();
                if !Self::length_ok(&ix, sha, len) {
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

    /// Names a verified file under its hash, under the index lock the caller holds (an
    /// existing copy of the right length is kept), and opens it. Returns the size and
    /// the open file.
    fn place(&self, ix: &mut LruIndex, file: VerifiedFile) -> Result<(u64, File), CacheError> {
        let sha = file.sha();
        let len = file.len();
        let dest = self.path_of(&sha);
        let existing = fs::symlink_metadata(&dest).ok().filter(|m| m.is_file());
        if existing.is_some_and(|m| m.len() == len) {
            if let Ok(f) = File::open(&dest) {
                return Ok((len, f));
            }
        }
        // Opened before the rename: the descriptor is this very file whatever another
        // process does to the name afterwards.
        let opened = File::open(file.path()).map_err(|e| io_err(file.path(), e))?;
        file.persist(&dest).map_err(|e| io_err(&dest, e))?;
        ix.clear_shared_file(&sha);
        // Durable in the background: an fsync before the rename costs as much as a
        // third of a cold read. Until it lands only a machine crash (not a process
        // crash) can leave a blob with unwritten bytes, and the cache re-hashes the
        // blobs of a session that did not end cleanly when it is next opened
        // (`Cache::open`), which `Cache::close` leaves in place when these syncs do not
        // end in time.
        self.sync_in_background(dest);
        Ok((len, opened))
    }

    fn sync_in_background(&self, path: PathBuf) {
        let syncs = Arc::clone(&self.syncs);
        *syncs.lock() += 1;
        std::thread::spawn(move || {
            #[cfg(test)]
            {
                let delay = *syncs.delay.lock().unwrap_or_else(|e| e.into_inner());
                std::thread::sleep(delay);
            }
            let _ = File::open(&path).and_then(|f| f.sync_all());
            let mut pending = syncs.lock();
            *pending -= 1;
            if *pending == 0 {
                syncs.done.notify_all();
            }
        });
    }

    /// Waits at most `limit` for the background fsyncs started so far; true when none
    /// is left.
    pub(crate) fn wait_for_syncs(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut pending = self.syncs.lock();
        while *pending > 0 {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            pending = self
                .syncs
                .done
                .wait_timeout(pending, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    #[cfg(test)]
    pub(crate) fn set_sync_delay(&self, delay: Duration) {
        *self.syncs.delay.lock().unwrap_or_else(|e| e.into_inner()) = delay;
    }

    /// Moves a verified file into place (an existing copy of the right length is kept)
    /// and evicts others if needed. Returns the size.
    pub(crate) fn insert(&self, file: VerifiedFile) -> Result<u64, CacheError> {
        let sha = file.sha();
        let dest = self.path_of(&sha);
        let shard = dest.parent().unwrap_or(&self.root);
        super::disk::create_private_dir_all(shard).map_err(|e| io_err(shard, e))?;
        let mut ix = self.lock();
        let (len, _) = self.place(&mut ix, file)?;
        ix.insert(sha, len);
        ix.touch(&sha);
        self.evict(&mut ix, Some(&sha));
        Ok(len)
    }

    /// [`BlobStore::insert`], and the blob opened and pinned in the same locked step,
    /// so that no eviction can come in between; the download's reservation (if any) is
    /// given back in that step too.
    pub(crate) fn insert_and_pin(
        self: &Arc<Self>,
        file: VerifiedFile,
        reservation: Option<Reservation>,
    ) -> Result<(Arc<File>, u64, BlobPin), CacheError> {
        let sha = file.sha();
        let dest = self.path_of(&sha);
        let shard = dest.parent().unwrap_or(&self.root);
        fs::create_dir_all(shard).map_err(|e| io_err(shard, e))?;
        let mut ix = self.lock();
        if let Some(mut r) = reservation {
            r.release(&mut ix);
        }
        let (len, opened) = self.place(&mut ix, file)?;
        if ix.peek(&sha).is_some_and(|n| n != len) {
            // The index knew another length: that file is gone now.
            ix.remove(&sha);
        }
        ix.insert(sha, len);
        ix.touch(&sha);
        let file = match ix.shared_file(&sha) {
            Some(f) => f,
            None => {
                let f = Arc::new(opened);
                ix.set_shared_file(&sha, &f);
                f
            }
        };
        let generation = ix.pin(&sha).expect("the blob was just inserted");
        self.evict(&mut ix, Some(&sha));
        drop(ix);
        let pin = BlobPin {
            store: Arc::clone(self),
            sha,
            generation,
        };
        Ok((file, len, pin))
    }

    /// Opens and pins a blob; `None` when missing or of a length other than the one
    /// the index knew (removed). The handles of one blob share one descriptor.
    pub(crate) fn open_blob(
        self: &Arc<Self>,
        sha: &Sha512,
    ) -> Result<Option<(Arc<File>, u64, BlobPin)>, CacheError> {
        let path = self.path_of(sha);
        let mut ix = self.lock();
        let (file, fresh) = match ix.shared_file(sha) {
            Some(f) => (f, false),
            None => match File::open(&path) {
                Ok(f) => (Arc::new(f), true),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    ix.remove(sha);
                    return Ok(None);
                }
                Err(e) => return Err(io_err(&path, e)),
            },
        };
        let meta = file.metadata().map_err(|e| io_err(&path, e))?;
        let len = meta.len();
        if !meta.is_file() || !Self::length_ok(&ix, sha, len) {
            self.discard(&mut ix, sha, "wrong length or not a file");
            return Ok(None);
        }
        if ix.touch(sha).is_none() {
            ix.insert(*sha, len);
        }
        let Some(generation) = ix.pin(sha) else {
            return Ok(None); // unreachable: just inserted
        };
        if fresh {
            ix.set_shared_file(sha, &file);
        }
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

    /// A reservation of `bytes` for a download (see [`Reservation`]); `NoSpace` when the
    /// file system cannot hold them even after evicting every closed blob. Most callers
    /// start from 0 and let [`Reservation::ensure`] grow it as bytes arrive.
    pub(crate) fn reserve(self: &Arc<Self>, bytes: u64) -> Result<Reservation, CacheError> {
        let mut r = Reservation {
            store: Arc::clone(self),
            reserved: 0,
            written: 0,
        };
        if bytes > 0 {
            let mut ix = self.lock();
            self.make_room(&mut ix, bytes, bytes, true)?;
            ix.rereserve((0, 0), (bytes, bytes));
            r.reserved = bytes;
        }
        Ok(r)
    }

    /// `NoSpace` when `bytes` could not fit even after evicting every closed blob (the
    /// free space, less what downloads in flight still have to write, plus the closed
    /// blobs). Evicts nothing.
    pub(crate) fn could_hold(&self, bytes: u64) -> Result<(), CacheError> {
        let ix = self.lock();
        let free = free_bytes(&self.fs_probe).map_err(|e| io_err(&self.fs_probe, e))?;
        let room = free
            .saturating_sub(ix.reserved().1)
            .saturating_add(ix.evictable_bytes(None));
        if room < bytes {
            return Err(CacheError::NoSpace { needed: bytes });
        }
        Ok(())
    }

    /// Evicts unpinned blobs so that the blobs, the other reservations and `limit_bytes`
    /// more fit within the limit, then makes sure the file system has `disk_bytes`
    /// free beyond what the other reservations still have to write, evicting more if
    /// that helps. The caller's own reservation is not in the index's books meanwhile.
    /// Without `evict`, only checks the free space.
    fn make_room(
        &self,
        ix: &mut LruIndex,
        limit_bytes: u64,
        disk_bytes: u64,
        evict: bool,
    ) -> Result<(), CacheError> {
        let probe = &self.fs_probe;
        let (others, unwritten) = ix.reserved();
        let free = || -> Result<u64, CacheError> {
            Ok(free_bytes(probe)
                .map_err(|e| io_err(probe, e))?
                .saturating_sub(unwritten))
        };
        if !evict {
            return match free()? >= disk_bytes {
                true => Ok(()),
                false => Err(CacheError::NoSpace { needed: disk_bytes }),
            };
        }
        // Hopeless requests must not empty the cache on their way to failing.
        if free()?.saturating_add(ix.evictable_bytes(None)) < disk_bytes {
            return Err(CacheError::NoSpace { needed: disk_bytes });
        }
        let budget = self
            .max_bytes
            .saturating_sub(others)
            .saturating_sub(limit_bytes);
        while let Some((sha, _)) = ix.pop_victim(budget, None) {
            unlink(&self.path_of(&sha));
        }
        // Bounded by the number of blobs: each round forgets one.
        loop {
            if free()? >= disk_bytes {
                return Ok(());
            }
            match ix.pop_any_victim(None) {
                Some((sha, _)) => unlink(&self.path_of(&sha)),
                None => return Err(CacheError::NoSpace { needed: disk_bytes }),
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
