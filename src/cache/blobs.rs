//! The blob store: `blobs/<first 2 hex>/<128 hex>` files, their accounting
//! ([`LruIndex`]) and eviction; `room` holds the downloads' reservations, `scan` finds
//! the files on disk and re-checks them (`fsck`).
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
//! - Persistently pinned blobs ([`super::pins`]) are never evicted: an eviction pass
//!   over the limit first reads the pins again if their directory changed, then checks
//!   each victim's pin file under the pins' shared lock before unlinking it. Pins alone
//!   may exceed the limit: eviction then frees what is not pinned, and a download
//!   still gets the room the disk has (as a blob larger than the limit does).

mod room;
mod scan;

pub use room::Reservation;
use scan::scan;

use super::index::LruIndex;
use super::pins::{PinLock, Pins};
use super::{BlobPin, CacheError};
use crate::digest::{Sha512, VerifiedFile};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

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
    /// The queue to the one thread that runs the background fsyncs, started with the
    /// first (a thread per blob cost a `clone3` per small file copied in); the thread
    /// ends when this store is dropped and the queue is empty.
    sync_queue: Mutex<Option<std::sync::mpsc::Sender<PathBuf>>>,
    pub(crate) pins: Pins,
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

    fn finished_one(&self) {
        let mut pending = self.lock();
        *pending -= 1;
        if *pending == 0 {
            self.done.notify_all();
        }
    }
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

impl BlobStore {
    /// Scans `root` (created if missing) to rebuild the accounting, oldest first, then
    /// evicts down to the limit (sparing pinned blobs).
    pub(crate) fn open(
        root: PathBuf,
        fs_probe: PathBuf,
        max_bytes: u64,
        pins: Pins,
    ) -> Result<Self, CacheError> {
        super::disk::create_private_dir_all(&root).map_err(|e| io_err(&root, e))?;
        let mut found = scan(&root).map_err(|e| io_err(&root, e))?;
        found.sort_by_key(|f| f.mtime);
        let mut index = LruIndex::new();
        for f in found {
            index.insert(f.sha, f.len);
        }
        index.set_kept(pins.changed().unwrap_or_default());
        let store = BlobStore {
            root,
            fs_probe,
            max_bytes,
            index: Mutex::new(index),
            syncs: Arc::new(Syncs::default()),
            sync_queue: Mutex::new(None),
            pins,
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
        if ix.total() <= budget {
            return;
        }
        self.refresh_pins(ix);
        let mut held = None;
        let mut pinned = self.pin_check(&mut held);
        while let Some((sha, size)) = ix.pop_victim(budget, keep, &mut pinned) {
            tracing::debug!(sha = %sha.short(16), size, "evicting blob");
            unlink(&self.path_of(&sha));
        }
    }

    /// Reads the pins again when their directory changed (by this process or another).
    pub(crate) fn refresh_pins(&self, ix: &mut LruIndex) {
        if let Some(kept) = self.pins.changed() {
            ix.set_kept(kept);
        }
    }

    /// The check an eviction makes before handing out a victim: is there a pin file?
    /// The first check takes the pins' shared lock into `held`, which the caller keeps
    /// until its unlinks are done (see [`super::pins`]).
    fn pin_check<'a>(&'a self, held: &'a mut Option<PinLock>) -> impl FnMut(&Sha512) -> bool + 'a {
        move |sha| {
            held.get_or_insert_with(|| self.pins.lock(false));
            self.pins.contains(sha)
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
        *self.syncs.lock() += 1;
        let mut queue = self.sync_queue.lock().unwrap_or_else(|e| e.into_inner());
        let path = match queue.as_ref() {
            Some(q) => match q.send(path) {
                Ok(()) => return,
                // The thread is gone (it panicked): a new one.
                Err(std::sync::mpsc::SendError(path)) => path,
            },
            None => path,
        };
        let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
        let syncs = Arc::clone(&self.syncs);
        let started = std::thread::Builder::new()
            .name("blob-fsync".into())
            .spawn(move || {
                for path in rx {
                    #[cfg(test)]
                    {
                        let delay = *syncs.delay.lock().unwrap_or_else(|e| e.into_inner());
                        std::thread::sleep(delay);
                    }
                    let _ = File::open(&path).and_then(|f| f.sync_all());
                    syncs.finished_one();
                }
            });
        match started {
            Ok(_) => {
                let _ = tx.send(path);
                *queue = Some(tx);
            }
            // No thread: this one is synced now rather than never.
            Err(e) => {
                tracing::warn!(error = %e, "no thread for background fsyncs: syncing now");
                let _ = File::open(&path).and_then(|f| f.sync_all());
                self.syncs.finished_one();
            }
        }
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

    /// Pins `sha` persistently (see [`super::pins`]); true when its file is in place
    /// (false: another process evicted it before the pin was made; fetch it again).
    pub(crate) fn keep(&self, sha: &Sha512) -> io::Result<bool> {
        let path = self.path_of(sha);
        // Not under the index lock: an eviction holding it may wait for the pins' lock.
        let there = self.pins.add(sha, || {
            fs::symlink_metadata(&path).is_ok_and(|m| m.is_file())
        })?;
        self.lock().keep(*sha, true);
        Ok(there)
    }

    /// Removes the persistent pin of `sha` (true when there was one); the blob may be
    /// evicted at once when the cache is over its limit.
    pub(crate) fn unkeep(&self, sha: &Sha512) -> io::Result<bool> {
        let was = self.pins.remove(sha)?;
        let mut ix = self.lock();
        ix.keep(*sha, false);
        self.evict(&mut ix, None);
        Ok(was)
    }

    /// Bytes of the persistently pinned blobs in the cache (pins read again if they
    /// changed).
    pub(crate) fn kept_bytes(&self) -> u64 {
        let mut ix = self.lock();
        self.refresh_pins(&mut ix);
        ix.kept_bytes()
    }

    pub(crate) fn remove(&self, sha: &Sha512) {
        let mut ix = self.lock();
        ix.remove(sha);
        unlink(&self.path_of(sha));
    }

    /// (bytes, limit, count)
    pub(crate) fn usage(&self) -> (u64, u64, usize) {
        let ix = self.lock();
        (ix.total(), self.max_bytes, ix.len())
    }
}

impl Drop for BlobPin {
    fn drop(&mut self) {
        self.store.unpin(&self.sha, self.generation);
    }
}
