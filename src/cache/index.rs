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
//!
//! Persistent pins (`kept`, see [`super::pins`]) are a set of SHA-512s apart from the
//! slots: a pin may name a blob not in the cache (yet). A kept blob is never a victim;
//! eviction also asks the caller, for each victim it is about to hand out, whether a
//! pin was made meanwhile (by another process), and keeps the blob when one was.

use crate::digest::Sha512;
use lru::LruCache;
use std::collections::HashSet;
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
    /// Persistently pinned blobs (present or not).
    kept: HashSet<Sha512>,
}

impl LruIndex {
    pub(crate) fn new() -> Self {
        LruIndex {
            order: LruCache::unbounded(),
            total: 0,
            next_generation: 1,
            reserved: 0,
            unwritten: 0,
            kept: HashSet::new(),
        }
    }

    /// Replaces the set of persistently pinned blobs.
    pub(crate) fn set_kept(&mut self, kept: HashSet<Sha512>) {
        self.kept = kept;
    }

    /// Pins `sha` persistently (`true`) or unpins it.
    pub(crate) fn keep(&mut self, sha: Sha512, kept: bool) {
        if kept {
            self.kept.insert(sha);
        } else {
            self.kept.remove(&sha);
        }
    }

    #[cfg(test)]
    pub(crate) fn is_kept(&self, sha: &Sha512) -> bool {
        self.kept.contains(sha)
    }

    /// Bytes of the persistently pinned blobs present.
    pub(crate) fn kept_bytes(&self) -> u64 {
        self.kept.iter().filter_map(|s| self.peek(s)).sum()
    }

    fn evictable(&self, sha: &Sha512, slot: &Slot, keep: Option<&Sha512>) -> bool {
        slot.pins == 0 && Some(sha) != keep && !self.kept.contains(sha)
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
            .filter(|(sha, slot)| self.evictable(sha, slot, keep))
            .map(|(_, slot)| slot.size)
            .sum()
    }

    /// The least recently used unpinned blob other than `keep`, forgotten and returned,
    /// when the total is over `budget`. The caller unlinks it. `pinned` is asked about
    /// each candidate: one it says is pinned becomes kept and is skipped.
    pub(crate) fn pop_victim(
        &mut self,
        budget: u64,
        keep: Option<&Sha512>,
        pinned: &mut dyn FnMut(&Sha512) -> bool,
    ) -> Option<(Sha512, u64)> {
        if self.total <= budget {
            return None;
        }
        self.pop_any_victim(keep, pinned)
    }

    /// The least recently used unpinned blob other than `keep`, whatever the total.
    pub(crate) fn pop_any_victim(
        &mut self,
        keep: Option<&Sha512>,
        pinned: &mut dyn FnMut(&Sha512) -> bool,
    ) -> Option<(Sha512, u64)> {
        // Bounded: each round keeps one more blob or returns.
        loop {
            let victim = self
                .order
                .iter()
                .rev()
                .find(|(sha, slot)| self.evictable(sha, slot, keep))
                .map(|(sha, _)| *sha)?;
            if pinned(&victim) {
                self.kept.insert(victim);
                continue;
            }
            let size = self.remove(&victim)?;
            return Some((victim, size));
        }
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

    fn no(_: &Sha512) -> bool {
        false
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
        assert_eq!(ix.pop_victim(25, None, &mut no), Some((sha(2), 10)));
        assert_eq!(ix.pop_victim(25, None, &mut no), None, "20 bytes fit in 25");
        assert_eq!(ix.pop_victim(5, None, &mut no), Some((sha(3), 10)));
        assert_eq!(
            ix.pop_victim(5, Some(&sha(1)), &mut no),
            None,
            "the kept blob stays"
        );
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
        assert_eq!(ix.pop_victim(0, None, &mut no), Some((sha(2), 10)));
        assert_eq!(ix.pop_victim(0, None, &mut no), None);
        assert!(!ix.unpin(&sha(1), g1), "one pin is left");
        assert!(ix.is_pinned(&sha(1)));
        assert!(ix.unpin(&sha(1), g1));
        assert_eq!(ix.pop_victim(0, None, &mut no), Some((sha(1), 100)));
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

    #[test]
    fn kept_blobs_are_never_victims_and_late_pins_are_learnt() {
        let mut ix = LruIndex::new();
        for n in 1..=3 {
            ix.insert(sha(n), 10);
        }
        ix.keep(sha(1), true);
        assert_eq!(ix.evictable_bytes(None), 20);
        assert_eq!(ix.kept_bytes(), 10);
        // sha(2) was pinned by another process: the check keeps it.
        let mut asked = Vec::new();
        let mut late = |s: &Sha512| {
            asked.push(*s);
            *s == sha(2)
        };
        assert_eq!(ix.pop_victim(0, None, &mut late), Some((sha(3), 10)));
        assert_eq!(asked, vec![sha(2), sha(3)]);
        assert!(ix.is_kept(&sha(2)));
        assert_eq!(
            ix.pop_victim(0, None, &mut no),
            None,
            "only kept blobs left"
        );
        assert_eq!((ix.total(), ix.kept_bytes()), (20, 20));
        ix.keep(sha(1), false);
        assert_eq!(ix.pop_victim(0, None, &mut no), Some((sha(1), 10)));
        ix.set_kept(HashSet::new());
        assert_eq!(ix.pop_victim(0, None, &mut no), Some((sha(2), 10)));
    }
}
