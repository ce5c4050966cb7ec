//! Single flight: one async lock per key, so that concurrent requests for one blob or
//! one shadir key wait for a single download instead of starting their own. The winner
//! does the work; the others find its result in the cache once the lock is theirs.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::OwnedMutexGuard;

/// Locks keyed by `K`, forgotten once nobody holds or waits for them.
pub struct KeyedLocks<K> {
    map: Mutex<HashMap<K, Weak<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for KeyedLocks<K> {
    fn default() -> Self {
        KeyedLocks {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> KeyedLocks<K> {
    /// Waits for the lock of `key`.
    pub async fn lock(&self, key: &K) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.clone(), Arc::downgrade(&m));
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
