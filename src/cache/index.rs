//! The blob accounting of the cache, apart from any file I/O: which blobs are present,
//! their sizes, the byte total, the recency order and the pins of open blobs.
//!
//! Keeping it pure lets the eviction policy be tested without a disk. The caller
//! ([`super::blobs`]) does the unlinking for every victim this index hands out.
//!
//! Pins carry a generation: a blob removed and cached again while an old pin is still
//! alive gets a new generation, so dropping the old pin cannot unpin the new copy.
//!
//! A blob's slot also remembers (weakly) the one descriptor its open handles share, so
//! a thousand opens of one blob cost the process one descriptor; it dies with the last
//! handle, and with the slot (a blob removed and cached again gets a new descriptor).
//!
//! Downloads in flight hold reservations: `reserved` bytes counted against the limit
//! before their blob is in the index, of which `unwritten` are not on the disk yet
//! (so a `statvfs` does not see them taken).

use crate::digest::Sha512;
use lru::LruCache;
use std::fs::File;
use std::sync::{Arc, Weak};

#[derive(Debug, Clone)]
struct Slot {
    size: u64,
    pins: u32,
    generation: u64,
    file: Weak<File>,
}

/// Blobs by recency (least recently used first out), with their sizes and pin counts.
pub(crate) struct LruIndex {
    order: LruCache<Sha512, Slot>,
    total: u64,
    next_generation: u64,
    /// Bytes reserved by downloads in flight (see [`LruIndex::reserved`]).
    reserved: u64,
    /// Of `reserved`, the bytes not yet written to the disk.
    unwritten: u64,
}

impl LruIndex {
    pub(crate) fn new() -> Self {
        LruIndex {
            order: LruCache::unbounded(),
            total: 0,
            next_generation: 1,
            reserved: 0,
            unwritten: 0,
        }
    }

    /// Bytes reserved by downloads in flight, and of those the ones not yet on disk.
    pub(crate) fn reserved(&self) -> (u64, u64) {
        (self.reserved, self.unwritten)
    }

    /// Changes a download's reservation from (`old_reserved`, `old_unwritten`) to
    /// (`new_reserved`, `new_unwritten`).
    pub(crate) fn rereserve(&mut self, old: (u64, u64), new: (u64, u64)) {
        self.reserved = self.reserved - old.0 + new.0;
        self.unwritten = self.unwritten - old.1 + new.1;
    }

    /// The descriptor the open handles of `sha` share, if any is still open.
    pub(crate) fn shared_file(&self, sha: &Sha512) -> Option<Arc<File>> {
        self.order.peek(sha).and_then(|s| s.file.upgrade())
    }

    /// Forgets the shared descriptor of `sha` (its file was replaced).
    pub(crate) fn clear_shared_file(&mut self, sha: &Sha512) {
        if let Some(slot) = self.order.peek_mut(sha) {
            slot.file = Weak::new();
        }
    }

    /// Remembers the descriptor new handles of `sha` share.
    pub(crate) fn set_shared_file(&mut self, sha: &Sha512, file: &Arc<File>) {
        if let Some(slot) = self.order.peek_mut(sha) {
            slot.file = Arc::downgrade(file);
        }
    }

    /// Records a blob as the most recently used. A blob already known keeps its pins and
    /// generation; its size is updated.
    pub(crate) fn insert(&mut self, sha: Sha512, size: u64) {
        if let Some(slot) = self.order.get_mut(&sha) {
            self.total = self.total - slot.size + size;
            slot.size = size;
            return;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.order.put(
            sha,
            Slot {
                size,
                pins: 0,
                generation,
                file: Weak::new(),
            },
        );
        self.total += size;
    }

    /// The size of a known blob, which becomes the most recently used.
    pub(crate) fn touch(&mut self, sha: &Sha512) -> Option<u64> {
        self.order.get(sha).map(|s| s.size)
    }

    /// The size of a known blob, without changing the order.
    pub(crate) fn peek(&self, sha: &Sha512) -> Option<u64> {
        self.order.peek(sha).map(|s| s.size)
    }

    /// Forgets a blob (pinned or not); returns its size.
    pub(crate) fn remove(&mut self, sha: &Sha512) -> Option<u64> {
        let slot = self.order.pop(sha)?;
        self.total -= slot.size;
        Some(slot.size)
    }

    /// Pins a known blob (and marks it used); returns the generation the pin must give
    /// back to [`LruIndex::unpin`].
    pub(crate) fn pin(&mut self, sha: &Sha512) -> Option<u64> {
        let slot = self.order.get_mut(sha)?;
        slot.pins += 1;
        Some(slot.generation)
    }

    /// Drops one pin of this generation. True when the blob is now unpinned (eviction
    /// may then take it).
    pub(crate) fn unpin(&mut self, sha: &Sha512, generation: u64) -> bool {
        match self.order.peek_mut(sha) {
            Some(slot) if slot.generation == generation && slot.pins > 0 => {
                slot.pins -= 1;
                slot.pins == 0
            }
            _ => false,
        }
    }

    pub(crate) fn is_pinned(&self, sha: &Sha512) -> bool {
        self.order.peek(sha).is_some_and(|s| s.pins > 0)
    }

    /// Bytes of all known blobs.
    pub(crate) fn total(&self) -> u64 {
        self.total
    }

    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }

    /// Bytes that eviction could free now (unpinned blobs other than `keep`).
    pub(crate) fn evictable_bytes(&self, keep: Option<&Sha512>) -> u64 {
        self.order
            .iter()
            .filter(|(sha, slot)| slot.pins == 0 && Some(*sha) != keep)
            .map(|(_, slot)| slot.size)
            .sum()
    }

    /// The least recently used unpinned blob other than `keep`, forgotten and returned,
    /// when the total is over `budget`. The caller unlinks it.
    pub(crate) fn pop_victim(
        &mut self,
        budget: u64,
        keep: Option<&Sha512>,
    ) -> Option<(Sha512, u64)> {
        if self.total <= budget {
            return None;
        }
        self.pop_any_victim(keep)
    }

    /// The least recently used unpinned blob other than `keep`, whatever the total.
    pub(crate) fn pop_any_victim(&mut self, keep: Option<&Sha512>) -> Option<(Sha512, u64)> {
        let victim = self
            .order
            .iter()
            .rev()
            .find(|(sha, slot)| slot.pins == 0 && Some(*sha) != keep)
            .map(|(sha, _)| *sha)?;
        let size = self.remove(&victim)?;
        Some((victim, size))
    }

    /// Every known blob, least recently used first (for tests and diagnostics).
    #[cfg(test)]
    pub(crate) fn lru_order(&self) -> Vec<Sha512> {
        self.order.iter().rev().map(|(sha, _)| *sha).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u8) -> Sha512 {
        Sha512::of(&[n])
    }

    #[test]
    fn totals_follow_inserts_and_removals() {
        let mut ix = LruIndex::new();
        ix.insert(sha(1), 10);
        ix.insert(sha(2), 20);
        assert_eq!((ix.total(), ix.len()), (30, 2));
        ix.insert(sha(1), 15);
        assert_eq!((ix.total(), ix.len()), (35, 2));
        assert_eq!(ix.remove(&sha(2)), Some(20));
        assert_eq!(ix.remove(&sha(2)), None);
        assert_eq!((ix.total(), ix.len()), (15, 1));
    }

    #[test]
    fn victims_come_least_recently_used_first_and_touch_protects() {
        let mut ix = LruIndex::new();
        for n in 1..=3 {
            ix.insert(sha(n), 10);
        }
        assert_eq!(ix.touch(&sha(1)), Some(10));
        assert_eq!(ix.lru_order(), vec![sha(2), sha(3), sha(1)]);
        assert_eq!(ix.pop_victim(25, None), Some((sha(2), 10)));
        assert_eq!(ix.pop_victim(25, None), None, "20 bytes fit in 25");
        assert_eq!(ix.pop_victim(5, None), Some((sha(3), 10)));
        assert_eq!(ix.pop_victim(5, Some(&sha(1))), None, "the kept blob stays");
        assert_eq!(ix.total(), 10);
    }

    #[test]
    fn pinned_blobs_are_never_victims() {
        let mut ix = LruIndex::new();
        ix.insert(sha(1), 100);
        ix.insert(sha(2), 10);
        let g1 = ix.pin(&sha(1)).unwrap();
        let g1b = ix.pin(&sha(1)).unwrap();
        assert_eq!(g1, g1b);
        assert_eq!(ix.evictable_bytes(None), 10);
        assert_eq!(ix.pop_victim(0, None), Some((sha(2), 10)));
        assert_eq!(ix.pop_victim(0, None), None);
        assert!(!ix.unpin(&sha(1), g1), "one pin is left");
        assert!(ix.is_pinned(&sha(1)));
        assert!(ix.unpin(&sha(1), g1));
        assert_eq!(ix.pop_victim(0, None), Some((sha(1), 100)));
    }

    #[test]
    fn a_stale_pin_does_not_unpin_a_new_copy() {
        let mut ix = LruIndex::new();
        ix.insert(sha(1), 10);
        let old = ix.pin(&sha(1)).unwrap();
        ix.remove(&sha(1));
        ix.insert(sha(1), 10);
        let new = ix.pin(&sha(1)).unwrap();
        assert_ne!(old, new);
        assert!(!ix.unpin(&sha(1), old));
        assert!(ix.is_pinned(&sha(1)));
        assert!(ix.unpin(&sha(1), new));
        assert!(!ix.unpin(&sha(1), new), "no pin left to drop");
    }
}
