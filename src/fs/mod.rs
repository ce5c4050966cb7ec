//! The filesystem core: the tree of design §1 (keys as directories, trusted entries as
//! files, `latest`, `.entries.json`, `.sha512/<hex>`), lazy verified reads through the
//! cache, the refresh rules, and writes published on close. No FUSE types here: the
//! adapter in `mount` translates. The network is behind [`crate::store::Store`], so
//! these rules are tested on the in-memory store with tokio's paused clock.
//!
//! `Core` is a façade over parts that each own one concern:
//! - `listings.rs`: key listings (TTL, negative answers, offline fallback, kernel
//!   notices when they change, a publish inserted in place);
//! - `blobs.rs`: sizes (probes) and verified local copies (single-flight downloads);
//! - `tree.rs`: lookup, attributes, directory listings, links, `mkdir`;
//! - `handles.rs`: open files and reads; `xattr.rs`: extended attributes;
//! - `write/`: staged files and their publish (see there); `status.rs`: the status
//!   document; `transfers.rs`: downloads and uploads in flight (for `status` and the
//!   metrics); `inodes.rs`, `flight.rs` (keyed async locks), `error.rs` (the errno table).

mod blobs;
pub mod error;
pub mod flight;
mod handles;
pub mod inodes;
mod listings;
pub mod status;
#[cfg(test)]
mod tests;
pub mod transfers;
mod tree;
mod write;
pub use write::Busy;
pub mod xattr;

pub(crate) use blobs::{read_full_at, room_in};
pub use handles::Handle;
pub(crate) use listings::listing_body;
use listings::{mtime_of, KeyState};
pub use listings::{return_freed_memory_after, FileEntry, KeyListing};
pub use tree::Statfs;

use crate::cache::Cache;
use crate::client::Client;
use crate::digest::Sha512;
pub use error::FsError;
use flight::KeyedLocks;
use inodes::Inodes;
pub use inodes::{Node, ROOT_INO};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;

/// How the tree behaves.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// A key's listing is refreshed after this long (also the kernel's entry/attr TTL).
    pub dir_ttl: Duration,
    /// A key shadir does not know is not asked again before this long.
    pub negative_ttl: Duration,
    /// Keys shown at the root from the start (`--key`, `[shacache] key`).
    pub keys: Vec<String>,
    /// Owner of every node.
    pub uid: u32,
    pub gid: u32,
    /// Size probes in flight at once.
    pub probe_concurrency: usize,
    /// Files can be created in key directories and are published on close.
    pub writable: bool,
    /// Extra metadata added to every published entry (`--meta k=v`).
    pub extra_meta: serde_json::Map<String, Value>,
    /// The shadir server this mount shows (outbox items record it).
    pub namespace: String,
    /// (role, URL) of the configured services, for `status`.
    pub servers: Vec<(String, String)>,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            dir_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(10),
            keys: Vec::new(),
            uid: 0,
            gid: 0,
            probe_concurrency: 16,
            writable: false,
            extra_meta: serde_json::Map::new(),
            namespace: String::new(),
            servers: Vec::new(),
        }
    }
}

/// Node types as the kernel sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// Attributes of a node.
#[derive(Debug, Clone)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub mtime: SystemTime,
    pub uid: u32,
    pub gid: u32,
}

/// One directory entry.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub name: String,
    pub kind: Kind,
}

/// Counters for `status`.
#[derive(Debug, Default)]
pub struct Stats {
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub downloads_in_flight: AtomicU64,
    pub dir_requests: AtomicU64,
    /// Directory listings built for the kernel (one per `opendir`).
    pub dir_listings: AtomicU64,
    /// Names looked up by the kernel (directory reads with attributes spare most).
    pub lookups: AtomicU64,
    pub probes: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub published: AtomicU64,
    /// Uploads started while a file was written, those whose result publishing used,
    /// and those given up (the file then sent again at close).
    pub early_started: AtomicU64,
    pub early_used: AtomicU64,
    pub early_resent: AtomicU64,
    /// Set by the FUSE adapter when the kernel granted passthrough.
    pub passthrough: std::sync::atomic::AtomicBool,
    /// Downloads that failed verification (after the client's second, fresh attempt).
    pub verify_failures: AtomicU64,
    /// shadir answers by outcome: found, missing (404), unreachable (network error,
    /// timeout, 5xx: the saved listing served), other errors.
    pub dir_found: AtomicU64,
    pub dir_missing: AtomicU64,
    pub dir_unreachable: AtomicU64,
    pub dir_failed: AtomicU64,
    /// Seconds from the start of a successful publish to the entry PUT.
    pub publish_seconds: PublishSeconds,
}

/// The publish latency histogram (buckets from 10 ms to about 20 min).
#[derive(Debug, Clone)]
pub struct PublishSeconds(pub prometheus_client::metrics::histogram::Histogram);

impl Default for PublishSeconds {
    fn default() -> Self {
        PublishSeconds(prometheus_client::metrics::histogram::Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.01, 4.0, 10),
        ))
    }
}

impl Stats {
    /// Counts one shadir answer by its outcome.
    pub(crate) fn count_dir_answer(
        &self,
        answer: &Result<crate::remote::DirListing, crate::remote::RemoteError>,
    ) {
        use crate::remote::DirListing;
        let counter = match answer {
            Ok(DirListing::Found(_)) => &self.dir_found,
            Ok(DirListing::Missing) => &self.dir_missing,
            Err(e) if listings::is_unreachable(e) => &self.dir_unreachable,
            Err(_) => &self.dir_failed,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The filesystem core.
pub struct Core {
    client: Client,
    cache: Arc<Cache>,
    opts: FsOptions,
    inodes: Mutex<Inodes>,
    keys: Mutex<HashMap<String, KeyState>>,
    local_keys: Mutex<BTreeSet<String>>,
    key_locks: KeyedLocks<String>,
    blob_locks: KeyedLocks<Sha512>,
    size_locks: KeyedLocks<Sha512>,
    /// One new version at a time per published staged item (see `write`).
    successor_locks: KeyedLocks<String>,
    /// Write-side tasks in flight (see `write::Busy`).
    busy: std::sync::atomic::AtomicUsize,
    probes: Arc<Semaphore>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    started: SystemTime,
    logged_hidden: Mutex<HashSet<(String, String)>>,
    /// Keys whose listing changed by a publish since it was last saved in the cache.
    unsaved: Mutex<HashSet<String>>,
    outbox: Option<crate::outbox::Outbox>,
    staging: Mutex<write::Staging>,
    invalidator: std::sync::OnceLock<Invalidator>,
    /// When the servers last failed to answer (see `listings::mark_unreachable`).
    offline: Mutex<Option<tokio::time::Instant>>,
    /// The last reachability probe of `status` (see `status.rs`).
    probed: tokio::sync::Mutex<Option<status::Probed>>,
    /// Downloads and uploads in flight.
    pub transfers: Arc<transfers::Transfers>,
    pub stats: Stats,
}

/// What the kernel must forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A name in a directory (it now shows another inode, or nothing).
    Entry { parent: u64, name: String },
    /// An inode's attributes and cached content (a symlink's target included).
    Inode(u64),
}

/// Tells the kernel to forget something (set by the FUSE adapter). It must not block:
/// the adapter queues the notice for a thread of its own, since the kernel may wait
/// for a directory lock that a request in flight holds.
pub type Invalidator = Box<dyn Fn(Notice) + Send + Sync>;

/// A name looked up: one that is not UTF-8 cannot exist here (every name the tree
/// shows is).
fn existing(name: &OsStr) -> Result<&str, FsError> {
    name.to_str().ok_or(FsError::NotFound)
}

/// A name to make: one that is not UTF-8 cannot be made here.
fn new_name(name: &OsStr) -> Result<&str, FsError> {
    name.to_str().ok_or(FsError::BadName)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Core {
    pub fn new(client: Client, cache: Arc<Cache>, opts: FsOptions) -> Arc<Core> {
        let probes = Arc::new(Semaphore::new(opts.probe_concurrency.max(1)));
        let outbox = match crate::outbox::Outbox::open(cache.dir()) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::error!("outbox in {}: {e}: writing disabled", cache.dir().display());
                None
            }
        };
        let staging = write::Staging::load(outbox.as_ref(), &opts.namespace);
        // A key holding a pending file exists here even if shadir never heard of it.
        // So does a key named at mount time: the root lists it, so it must open (an
        // empty directory until shadir has entries for it).
        let local_keys: BTreeSet<String> = staging
            .keys()
            .into_iter()
            .chain(opts.keys.iter().cloned())
            .collect();
        let staging = Mutex::new(staging);
        Arc::new(Core {
            outbox,
            staging,
            invalidator: std::sync::OnceLock::new(),
            offline: Mutex::new(None),
            probed: tokio::sync::Mutex::new(None),
            transfers: Arc::default(),
            client,
            cache,
            probes,
            inodes: Mutex::new(Inodes::default()),
            keys: Mutex::new(HashMap::new()),
            local_keys: Mutex::new(local_keys),
            key_locks: KeyedLocks::default(),
            blob_locks: KeyedLocks::default(),
            size_locks: KeyedLocks::default(),
            successor_locks: KeyedLocks::default(),
            busy: Default::default(),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            started: SystemTime::now(),
            logged_hidden: Mutex::new(HashSet::new()),
            unsaved: Mutex::new(HashSet::new()),
            stats: Stats::default(),
            opts,
        })
    }

    pub fn options(&self) -> &FsOptions {
        &self.opts
    }
    pub fn client(&self) -> &Client {
        &self.client
    }
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    fn ino(&self, node: &Node) -> u64 {
        lock(&self.inodes).ino(node)
    }

    fn node(&self, ino: u64) -> Result<Node, FsError> {
        lock(&self.inodes)
            .node(ino)
            .cloned()
            .ok_or(FsError::NotFound)
    }

    /// Queues a notice for the kernel (nothing when there is no kernel: tests).
    pub fn notify(&self, n: Notice) {
        if let Some(f) = self.invalidator.get() {
            f(n);
        }
    }

    /// See [`Inodes::retire`].
    pub fn retire_ino(&self, ino: u64) {
        lock(&self.inodes).retire(ino);
    }

    // ---- operations ----------------------------------------------------------------

    /// The kernel's cache lifetime for entries and attributes.
    pub fn ttl(&self) -> Duration {
        self.opts.dir_ttl
    }
}
