//! Room for downloads in flight: a [`Reservation`] grows as a download's bytes arrive
//! and counts against the cache's limit and the file system's free space; `make_room`
//! evicts for it.

use super::super::disk::free_bytes;
use super::super::index::LruIndex;
use super::super::CacheError;
use super::{io_err, unlink, BlobStore};
use std::sync::Arc;

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
    pub(super) fn release(&mut self, ix: &mut LruIndex) {
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

impl BlobStore {
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
        let mut ix = self.lock();
        self.refresh_pins(&mut ix);
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
        // Pins made by another process count from here on (one `stat` a call: a
        // download asks once per MiB).
        self.refresh_pins(ix);
        // Hopeless requests must not empty the cache on their way to failing.
        if free()?.saturating_add(ix.evictable_bytes(None)) < disk_bytes {
            return Err(CacheError::NoSpace { needed: disk_bytes });
        }
        let budget = self
            .max_bytes
            .saturating_sub(others)
            .saturating_sub(limit_bytes);
        let mut held = None;
        let mut pinned = self.pin_check(&mut held);
        while let Some((sha, _)) = ix.pop_victim(budget, None, &mut pinned) {
            unlink(&self.path_of(&sha));
        }
        // Bounded by the number of blobs: each round forgets one.
        loop {
            if free()? >= disk_bytes {
                return Ok(());
            }
            match ix.pop_any_victim(None, &mut pinned) {
                Some((sha, _)) => unlink(&self.path_of(&sha)),
                None => return Err(CacheError::NoSpace { needed: disk_bytes }),
            }
        }
    }
}
