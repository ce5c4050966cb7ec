//! Single flight: one async lock per key, so that concurrent requests for one blob or
//! one shadir key wait for a single download instead of starting their own. The winner
//! does the work; the others find its result in the cache once the lock is theirs.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::OwnedMutexGuard;

/// Locks keyed by `K`, forgotten once nobody holds or waits for them.
pub struct KeyedLocks<K> {
    map: Mutex<Locks<K>>,
}

struct Locks<K> {
    by_key: HashMap<K, Weak<tokio::sync::Mutex<()>>>,
    /// Forgotten locks are swept when the map reaches this size, which then doubles
    /// the live count: a sweep costs O(n) once per n new keys, not at every call (a
    /// cold listing of 20,000 blobs spent 17 % of its time sweeping).
    sweep_at: usize,
}

const FIRST_SWEEP: usize = 1024;

impl<K> Default for KeyedLocks<K> {
    fn default() -> Self {
        KeyedLocks {
            map: Mutex::new(Locks {
                by_key: HashMap::new(),
                sweep_at: FIRST_SWEEP,
            }),
        }
    }
}

impl<K: Hash + Eq + Clone> KeyedLocks<K> {
    /// Waits for the lock of `key`.
    pub async fn lock(&self, key: &K) -> OwnedMutexGuard<()> {
        let m = {
            let mut locks = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if locks.by_key.len() >= locks.sweep_at {
                locks.by_key.retain(|_, w| w.strong_count() > 0);
                locks.sweep_at = (locks.by_key.len() * 2).max(FIRST_SWEEP);
            }
            match locks.by_key.get(key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    locks.by_key.insert(key.clone(), Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn forgotten_locks_are_swept_and_held_ones_kept() {
        let locks = KeyedLocks::<u32>::default();
        let mut held = Vec::new();
        for k in 0..10u32 {
            held.push(locks.lock(&k).await);
        }
        for k in 10..20_000u32 {
            drop(locks.lock(&k).await);
        }
        let n = locks.map.lock().unwrap().by_key.len();
        assert!(n <= 2 * FIRST_SWEEP, "{n} locks remembered");
        // The held ones are still the same locks: a second locker waits.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock(&3));
        assert!(waiting.await.is_err(), "lock 3 is held");
        drop(held);
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(5), locks.lock(&3))
                .await
                .is_ok()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_worker_per_key() {
        let locks = Arc::new(KeyedLocks::<u32>::default());
        let done = Arc::new(Mutex::new(false));
        let work = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, done, work) = (locks.clone(), done.clone(), work.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock(&7).await;
                if !*done.lock().unwrap() {
                    work.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    *done.lock().unwrap() = true;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(work.load(Ordering::SeqCst), 1);
    }
}
