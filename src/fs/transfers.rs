//! Transfers in flight, for `status` and the metrics: each download of a blob (one per
//! blob, however many openers wait) and each upload (a publish's POST, an upload while
//! the file is written) registers here while it runs and leaves when it ends, however it
//! ends (the registration is a guard).
//!
//! Cheap on the data path: the map is locked only when a transfer starts or ends and when
//! someone reads the list; bytes are counted with atomic stores from the progress
//! callbacks, no lock per chunk. An upload while writing reports what its body stream
//! took from the growing file ([`crate::growing::Growing::sent`]), read when listed.

use crate::growing::Growing;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Which way the bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Download,
    Upload,
}

/// What a transfer is for: an entry of a key, or a blob asked for by its hash alone
/// (`.sha512/…`: no key, the name is the hash's first 16 digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub key: Option<String>,
    pub name: String,
}

impl Subject {
    pub fn entry(key: &str, name: &str) -> Subject {
        Subject {
            key: Some(key.to_string()),
            name: name.to_string(),
        }
    }
    pub fn blob(sha: &crate::digest::Sha512) -> Subject {
        Subject {
            key: None,
            name: sha.short(16),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "key {key}: entry {}", self.name),
            None => write!(f, ".sha512/{}", self.name),
        }
    }
}

/// `total` when it is not known (yet).
const UNKNOWN: u64 = u64::MAX;

struct Live {
    subject: Subject,
    direction: Direction,
    started: Instant,
    done: AtomicU64,
    total: AtomicU64,
    /// An upload while writing: its bytes are what the stream took.
    growing: Option<Arc<Growing>>,
}

/// The registry (one per mount, in `Core`).
#[derive(Default)]
pub struct Transfers {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<Live>>>,
}

/// One transfer as listed: what `status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransferView {
    pub direction: Direction,
    pub key: Option<String>,
    pub name: String,
    pub done_bytes: u64,
    pub total_bytes: Option<u64>,
    pub elapsed_secs: f64,
    /// Average since the start, bytes a second (0 before any time has passed).
    pub rate_bytes_per_sec: f64,
}

/// A registered transfer; dropping it ends it.
pub struct Transfer {
    registry: Arc<Transfers>,
    id: u64,
    live: Arc<Live>,
}

impl Transfer {
    /// Bytes moved so far, and the total once known. Atomic stores only.
    pub fn progress(&self, done: u64, total: Option<u64>) {
        self.live.done.store(done, Ordering::Relaxed);
        if let Some(t) = total {
            self.live.total.store(t, Ordering::Relaxed);
        }
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        crate::fs::lock(&self.registry.live).remove(&self.id);
    }
}

impl Transfers {
    /// Registers a transfer until the returned guard is dropped.
    pub fn start(
        self: &Arc<Self>,
        direction: Direction,
        subject: Subject,
        total: Option<u64>,
    ) -> Transfer {
        self.register(direction, subject, total, None)
    }

    /// Registers an upload while writing, whose bytes are those `growing` sent.
    pub fn start_growing(self: &Arc<Self>, subject: Subject, growing: Arc<Growing>) -> Transfer {
        self.register(Direction::Upload, subject, None, Some(growing))
    }

    fn register(
        self: &Arc<Self>,
        direction: Direction,
        subject: Subject,
        total: Option<u64>,
        growing: Option<Arc<Growing>>,
    ) -> Transfer {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let live = Arc::new(Live {
            subject,
            direction,
            started: Instant::now(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(total.unwrap_or(UNKNOWN)),
            growing,
        });
        crate::fs::lock(&self.live).insert(id, live.clone());
        Transfer {
            registry: self.clone(),
            id,
            live,
        }
    }

    /// The transfers in flight, oldest first.
    pub fn list(&self) -> Vec<TransferView> {
        let live: Vec<Arc<Live>> = crate::fs::lock(&self.live).values().cloned().collect();
        let now = Instant::now();
        live.iter()
            .map(|l| {
                let done = match &l.growing {
                    Some(g) => g.sent(),
                    None => l.done.load(Ordering::Relaxed),
                };
                let total = l.total.load(Ordering::Relaxed);
                let elapsed = now.saturating_duration_since(l.started).as_secs_f64();
                TransferView {
                    direction: l.direction,
                    key: l.subject.key.clone(),
                    name: l.subject.name.clone(),
                    done_bytes: done,
                    total_bytes: (total != UNKNOWN).then_some(total),
                    elapsed_secs: elapsed,
                    rate_bytes_per_sec: if elapsed > 0.0 {
                        done as f64 / elapsed
                    } else {
                        0.0
                    },
                }
            })
            .collect()
    }

    /// How many transfers go each way: (downloads, uploads).
    pub fn counts(&self) -> (usize, usize) {
        let live = crate::fs::lock(&self.live);
        let down = live
            .values()
            .filter(|l| l.direction == Direction::Download)
            .count();
        (down, live.len() - down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn registered_while_running_with_bytes_and_rate() {
        let reg = Arc::new(Transfers::default());
        let d = reg.start(Direction::Download, Subject::entry("k", "a.bin"), None);
        let u = reg.start(Direction::Upload, Subject::entry("k", "b.bin"), Some(100));
        assert_eq!(reg.counts(), (1, 1));
        tokio::time::advance(Duration::from_secs(2)).await;
        d.progress(1000, Some(4000));
        u.progress(50, None);
        let list = reg.list();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].direction, Direction::Download);
        assert_eq!(list[0].key.as_deref(), Some("k"));
        assert_eq!(list[0].name, "a.bin");
        assert_eq!(
            (list[0].done_bytes, list[0].total_bytes),
            (1000, Some(4000))
        );
        assert_eq!(list[0].elapsed_secs, 2.0);
        assert_eq!(list[0].rate_bytes_per_sec, 500.0);
        // A total given at the start stays when progress does not know it.
        assert_eq!((list[1].done_bytes, list[1].total_bytes), (50, Some(100)));
        drop(d);
        assert_eq!(reg.counts(), (0, 1));
        assert_eq!(reg.list()[0].name, "b.bin");
        drop(u);
        assert!(reg.list().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_while_writing_reports_what_its_stream_took() {
        let reg = Arc::new(Transfers::default());
        let g = Arc::new(Growing::default());
        let sha = crate::digest::Sha512::of(b"x");
        let t = reg.start_growing(Subject::blob(&sha), g.clone());
        let v = &reg.list()[0];
        assert_eq!(
            (v.direction, v.done_bytes, v.total_bytes),
            (Direction::Upload, 0, None)
        );
        assert_eq!(v.key, None);
        assert_eq!(v.name, sha.short(16));
        assert_eq!(
            Subject::blob(&sha).to_string(),
            format!(".sha512/{}", sha.short(16))
        );
        drop(t);
        assert_eq!(reg.counts(), (0, 0));
    }
}
