//! The filesystem core: the tree of design §1 (keys as directories, trusted entries as
//! files, `latest`, `.entries.json`, `.sha512/<hex>`), lazy verified reads through the
//! cache, and the refresh rules. No FUSE types here: the adapter in `mount` translates.
//! Tests drive this directly against the embedded server.
//!
//! Subtle cases and how they are handled:
//! - Keys cannot be listed on any server, so a key exists when shadir answers 200 for it
//!   (also `[]`); a 404 is remembered for `negative_ttl`. `mkdir` makes a local key that
//!   shows as an empty directory until something is written into it.
//! - A listing is refreshed after `dir_ttl`. When the server cannot be reached (network
//!   error, timeout, 5xx) the last answer (in memory, else on disk) is used and the key
//!   is not asked again before another `dir_ttl`, so an offline mount does not wait for
//!   a timeout at every `stat`.
//! - Sizes come from the cache, the persisted size table, or one probe per blob; a
//!   listing starts concurrent probes for every unknown size at once, so `ls -l` of a
//!   1,000-entry key costs one shadir request and parallel probes.
//! - One download per blob however many openers (single flight); a blob that does not
//!   verify is fetched once more, then the open fails with EIO. Unverified bytes never
//!   enter the cache (only a `VerifiedFile` can) and are never served.

pub mod error;
pub mod flight;
pub mod inodes;
pub mod status;
mod write;
pub use write::Busy;
pub mod xattr;

use crate::cache::{BlobPin, Cache};
use crate::client::{entries_json, select_trusted, Client, TrustedEntry};
use crate::digest::{Sha512, VerifiedFile};
use crate::naming::{self, key_dir_name, key_from_dir_name, name_entries};
use crate::pyjson::{dumps_with, Style};
use crate::remote::{DirListing, Probe, RemoteError};
use crate::wire::{parse_listing, Listing, RawEntry};
pub use error::FsError;
use flight::KeyedLocks;
use inodes::Inodes;
pub use inodes::{Node, ROOT_INO};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
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

/// A file of a key directory.
#[derive(Debug, Clone)]
pub struct FileEntry {
    pub entry: TrustedEntry,
    pub mtime: SystemTime,
}

/// A key's trusted entries, named.
#[derive(Debug)]
pub struct KeyListing {
    fetched: Instant,
    pub files: BTreeMap<String, FileEntry>,
    pub latest: Option<String>,
    pub entries_json: Arc<Vec<u8>>,
}

enum KeyState {
    Listed(Arc<KeyListing>),
    Missing(Instant),
}

/// An open file.
pub enum Handle {
    /// A verified blob in the cache, pinned against eviction while open. The handles
    /// of one blob share its descriptor.
    Blob {
        file: Arc<File>,
        size: u64,
        _pin: BlobPin,
    },
    /// Generated content (`.entries.json`), a snapshot taken at open.
    Memory(Arc<Vec<u8>>),
    /// A staged file being written (see `write`).
    Staged(Mutex<write::StagedHandle>),
}

impl Handle {
    /// The cache file, for FUSE passthrough.
    pub fn backing_file(&self) -> Option<&File> {
        match self {
            Handle::Blob { file, .. } => Some(file.as_ref()),
            Handle::Memory(_) | Handle::Staged(_) => None,
        }
    }
    /// The blob's size, for a handle on a blob.
    pub fn blob_size(&self) -> Option<u64> {
        match self {
            Handle::Blob { size, .. } => Some(*size),
            Handle::Memory(_) | Handle::Staged(_) => None,
        }
    }
    /// Generated content and files being written have no stable size: direct I/O.
    pub fn direct_io(&self) -> bool {
        matches!(self, Handle::Memory(_) | Handle::Staged(_))
    }
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
    outbox: Option<crate::outbox::Outbox>,
    staging: Mutex<write::Staging>,
    invalidator: std::sync::OnceLock<Invalidator>,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Errors after which the last known answer is better than nothing.
fn is_unreachable(e: &RemoteError) -> bool {
    match e {
        RemoteError::Network { .. } | RemoteError::Timeout { .. } => true,
        RemoteError::Status { status, .. } => *status >= 500,
        _ => false,
    }
}

fn time_of(ts: f64) -> Option<SystemTime> {
    if ts.is_finite() && (0.0..1e11).contains(&ts) {
        Some(UNIX_EPOCH + Duration::from_secs_f64(ts))
    } else {
        None
    }
}

/// The time of the entry an inode shows: the one under `name` when it still shows
/// `sha`, else the version of that blob under another name (an older version of the
/// name, which a descriptor opened before the refresh still reads).
fn mtime_of(listing: &KeyListing, name: &str, sha: &Sha512) -> Option<SystemTime> {
    match listing.files.get(name) {
        Some(f) if f.entry.info.sha512 == *sha => Some(f.mtime),
        _ => listing
            .files
            .values()
            .find(|f| f.entry.info.sha512 == *sha)
            .map(|f| f.mtime),
    }
}

/// A listing as a shadir body (for the on-disk copy): `[[inner, signature], …]`.
fn listing_body(l: &Listing) -> Vec<u8> {
    let arr = l
        .entries
        .iter()
        .map(|e| {
            Value::Array(vec![
                Value::String(e.inner.clone()),
                Value::String(e.signature.clone()),
            ])
        })
        .collect();
    crate::pyjson::dumps(&Value::Array(arr)).into_bytes()
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

    fn dir_attr(&self, ino: u64, mtime: SystemTime) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            perm: 0o755,
            nlink: 2,
            mtime,
            uid: self.opts.uid,
            gid: self.opts.gid,
        }
    }

    fn file_attr(&self, ino: u64, size: u64, mtime: SystemTime) -> Attr {
        Attr {
            ino,
            kind: Kind::File,
            size,
            perm: 0o444,
            nlink: 1,
            mtime,
            uid: self.opts.uid,
            gid: self.opts.gid,
        }
    }

    /// Keys shown at the root: configured, known to the cache, made with `mkdir`.
    pub fn root_keys(&self) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = self.opts.keys.iter().cloned().collect();
        keys.extend(self.cache.known_keys());
        keys.extend(lock(&self.local_keys).iter().cloned());
        keys
    }

    /// The key a root directory name stands for.
    fn key_of_name(&self, name: &str) -> Option<String> {
        if let Some(k) = key_from_dir_name(name) {
            return Some(k);
        }
        // Long keys are shown with a digest: only known keys can be found that way.
        self.root_keys()
            .into_iter()
            .find(|k| key_dir_name(k) == name)
    }

    fn fresh_state(&self, key: &str) -> Option<Option<Arc<KeyListing>>> {
        let keys = lock(&self.keys);
        match keys.get(key)? {
            KeyState::Listed(l) if l.fetched.elapsed() < self.opts.dir_ttl => Some(Some(l.clone())),
            KeyState::Missing(t) if t.elapsed() < self.opts.negative_ttl => Some(None),
            _ => None,
        }
    }

    fn stale_listing(&self, key: &str) -> Option<Arc<KeyListing>> {
        match lock(&self.keys).get(key) {
            Some(KeyState::Listed(l)) => Some(l.clone()),
            _ => None,
        }
    }

    fn remember(self: &Arc<Self>, key: &str, listing: Listing) -> Arc<KeyListing> {
        let built = Arc::new(self.build(key, listing));
        let old = lock(&self.keys).insert(key.to_string(), KeyState::Listed(built.clone()));
        if let Some(KeyState::Listed(old)) = old {
            self.tell_changes(key, &old, &built);
        }
        self.prefetch_sizes(&built);
        built
    }

    /// A refresh changed what names of `key` show: the kernel forgets what it cached of
    /// them (a name now showing another blob or gone, `latest`'s target, the size of
    /// `.entries.json`), else it would serve the old answers until its own timeouts,
    /// or for ever for a cached symlink.
    fn tell_changes(&self, key: &str, old: &KeyListing, new: &KeyListing) {
        let mut notices = Vec::new();
        {
            let inodes = lock(&self.inodes);
            let Some(parent) = inodes.known(&Node::Key(key.to_string())) else {
                return;
            };
            for (name, f) in &old.files {
                let now = new.files.get(name).map(|n| n.entry.info.sha512);
                if now != Some(f.entry.info.sha512) {
                    notices.push(Notice::Entry {
                        parent,
                        name: name.clone(),
                    });
                }
            }
            if old.latest != new.latest {
                if let Some(ino) = inodes.known(&Node::Latest(key.to_string())) {
                    notices.push(Notice::Inode(ino));
                }
                notices.push(Notice::Entry {
                    parent,
                    name: "latest".into(),
                });
            }
            if old.entries_json != new.entries_json {
                if let Some(ino) = inodes.known(&Node::EntriesJson(key.to_string())) {
                    notices.push(Notice::Inode(ino));
                }
            }
        }
        for n in notices {
            self.notify(n);
        }
    }

    /// A publish through this mount: its signed entry joins the key's listing in memory
    /// at once (verified like any other; the kernel told about the name), without
    /// fetching the key again. The next refresh after the TTL reconciles with shadir.
    /// A key not listed yet is fetched.
    pub(crate) async fn insert_published(self: &Arc<Self>, key: &str, entry: RawEntry) {
        let _guard = self.key_locks.lock(&key.to_string()).await;
        let listed = match lock(&self.keys).get(key) {
            Some(KeyState::Listed(l)) => Some(l.clone()),
            _ => None,
        };
        let old = match listed {
            Some(l) => l,
            None => {
                drop(_guard);
                if let Err(e) = self.refresh(key).await {
                    tracing::warn!("key {key}: refreshing after a publish: {e}");
                }
                return;
            }
        };
        let mut entries: Vec<RawEntry> = old.files.values().map(|f| f.entry.raw.clone()).collect();
        entries.push(entry);
        let mut built = self.build(
            key,
            Listing {
                entries,
                rejected: Vec::new(),
            },
        );
        built.fetched = old.fetched;
        let built = Arc::new(built);
        lock(&self.keys).insert(key.to_string(), KeyState::Listed(built.clone()));
        self.tell_changes(key, &old, &built);
        self.prefetch_sizes(&built);
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

    /// The trusted, named entries of a key; `None` when shadir does not know the key.
    pub async fn listing(self: &Arc<Self>, key: &str) -> Result<Option<Arc<KeyListing>>, FsError> {
        self.fetch_listing(key, false).await
    }

    /// The listing of a key (`None` is an error here: the caller knows it exists).
    async fn refresh_if_needed(self: &Arc<Self>, key: &str) -> Result<Arc<KeyListing>, FsError> {
        self.listing(key).await?.ok_or(FsError::NotFound)
    }

    /// Asks shadir again now, whatever the TTL (after a write through this mount).
    pub async fn refresh(self: &Arc<Self>, key: &str) -> Result<Option<Arc<KeyListing>>, FsError> {
        self.fetch_listing(key, true).await
    }

    async fn fetch_listing(
        self: &Arc<Self>,
        key: &str,
        force: bool,
    ) -> Result<Option<Arc<KeyListing>>, FsError> {
        if !force {
            if let Some(r) = self.fresh_state(key) {
                return Ok(r);
            }
        }
        let _guard = self.key_locks.lock(&key.to_string()).await;
        if !force {
            if let Some(r) = self.fresh_state(key) {
                return Ok(r);
            }
        }
        // A fresh answer saved by an earlier mount spares a request.
        if !force && self.stale_listing(key).is_none() {
            if let Some((when, Some(body))) = self.cache.dir_answer(key) {
                let age = SystemTime::now()
                    .duration_since(when)
                    .unwrap_or(Duration::MAX);
                if age < self.opts.dir_ttl {
                    if let Ok(l) = parse_listing(&body) {
                        return Ok(Some(self.remember(key, l)));
                    }
                }
            }
        }
        self.stats.dir_requests.fetch_add(1, Ordering::Relaxed);
        match self.client.store.get_dir(key).await {
            Ok(DirListing::Found(l)) => {
                self.cache.store_dir_answer(key, Some(&listing_body(&l)));
                self.cache.add_known_key(key);
                Ok(Some(self.remember(key, l)))
            }
            Ok(DirListing::Missing) => {
                self.cache.store_dir_answer(key, None);
                if lock(&self.local_keys).contains(key) {
                    return Ok(Some(self.remember(key, Listing::default())));
                }
                lock(&self.keys).insert(key.to_string(), KeyState::Missing(Instant::now()));
                Ok(None)
            }
            Err(e) if is_unreachable(&e) => {
                let saved = self
                    .stale_listing(key)
                    .map(|l| Listing {
                        entries: l
                            .files
                            .values()
                            .map(|f| f.entry.raw.clone())
                            .collect::<Vec<RawEntry>>(),
                        rejected: Vec::new(),
                    })
                    .or_else(|| match self.cache.dir_answer(key) {
                        Some((_, Some(body))) => parse_listing(&body).ok(),
                        _ => None,
                    });
                match saved {
                    Some(l) => {
                        tracing::warn!(
                            "key {key}: shadir unreachable ({e}); serving the last known listing"
                        );
                        Ok(Some(self.remember(key, l)))
                    }
                    None => {
                        tracing::error!("key {key}: {e}");
                        Err(e.into())
                    }
                }
            }
            Err(e) => {
                tracing::error!("key {key}: {e}");
                Err(e.into())
            }
        }
    }

    fn build(&self, key: &str, listing: Listing) -> KeyListing {
        let (trusted, hidden) = select_trusted(listing, &self.client.verifier);
        {
            let mut logged = lock(&self.logged_hidden);
            for h in hidden {
                if logged.insert((key.to_string(), h.excerpt.clone())) {
                    tracing::debug!("key {key}: entry hidden ({}): {}", h.reason, h.excerpt);
                }
            }
        }
        let named = name_entries(trusted);
        let mut files = BTreeMap::new();
        for (name, entry) in named.files.iter().cloned() {
            let mtime = entry
                .info
                .timestamp()
                .and_then(time_of)
                .unwrap_or_else(|| self.cache.first_seen(key, &entry.info.sha512));
            files.insert(name, FileEntry { entry, mtime });
        }
        let mut json = dumps_with(
            &entries_json(&named.files),
            Style {
                indent: Some(2),
                sort_keys: false,
            },
        );
        json.push('\n');
        KeyListing {
            fetched: Instant::now(),
            files,
            latest: named.latest,
            entries_json: Arc::new(json.into_bytes()),
        }
    }

    /// Starts size probes for every blob of a listing whose size is not known yet.
    fn prefetch_sizes(self: &Arc<Self>, listing: &KeyListing) {
        let unknown: HashSet<Sha512> = listing
            .files
            .values()
            .map(|f| f.entry.info.sha512)
            .filter(|s| self.cache.size_of(s).is_none())
            .collect();
        if unknown.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for sha in unknown {
            let core = self.clone();
            rt.spawn(async move {
                if let Err(e) = core.blob_size(&sha).await {
                    tracing::debug!("size of {}: {e}", sha.short(16));
                }
            });
        }
    }

    /// The size of a blob (`None`: shacache does not have it).
    pub async fn blob_size(&self, sha: &Sha512) -> Result<Option<u64>, FsError> {
        if let Some(n) = self.cache.size_of(sha) {
            return Ok(Some(n));
        }
        let _g = self.size_locks.lock(sha).await;
        if let Some(n) = self.cache.size_of(sha) {
            return Ok(Some(n));
        }
        let _permit = self.probes.acquire().await;
        self.stats.probes.fetch_add(1, Ordering::Relaxed);
        // A server that answers the probe with the whole blob: bounded like a download.
        let reservation = Mutex::new(self.cache.reserve(0)?);
        let room = |have: u64, to: u64| room_in(&reservation, have, to, None);
        match self
            .client
            .store
            .probe_blob(sha, self.cache.tmp_dir(), &room)
            .await?
        {
            Probe::Size(n) => {
                self.cache.record_size(sha, n);
                Ok(Some(n))
            }
            Probe::Fetched(v) => {
                let n = v.len();
                self.stats.bytes_fetched.fetch_add(n, Ordering::Relaxed);
                self.cache.insert_blob(v)?;
                self.cache.record_size(sha, n);
                Ok(Some(n))
            }
            Probe::Absent => Ok(None),
        }
    }

    async fn entry_size(&self, key: &str, name: &str, sha: &Sha512) -> Result<u64, FsError> {
        match self.blob_size(sha).await {
            Ok(Some(n)) => Ok(n),
            Ok(None) => {
                tracing::warn!(
                    "key {key}: entry {name}: blob {} is not in shacache",
                    sha.short(16)
                );
                Err(FsError::Remote(RemoteError::NotFound {
                    url: format!("shacache/{sha}"),
                }))
            }
            Err(e) => {
                tracing::warn!(
                    "key {key}: entry {name}: cannot find the size of {}: {e}",
                    sha.short(16)
                );
                Err(e)
            }
        }
    }

    /// Opens a cached blob, downloading it first when needed: one download per blob
    /// however many openers wait (single flight). The downloaded blob is pinned as it
    /// enters the cache, so eviction cannot take it before this open holds it. Room in
    /// the cache is reserved as the bytes arrive, never from a size a server announced.
    async fn cached_or_fetched(
        &self,
        sha: &Sha512,
        what: &str,
    ) -> Result<(Arc<File>, u64, BlobPin), FsError> {
        if let Some(h) = self.cache.open_blob(sha)? {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(h);
        }
        let _g = self.blob_locks.lock(sha).await;
        // A blob whose length disagrees with a recorded (perhaps announced) size is
        // hashed here: a good one is kept, whatever a server said.
        let cache = Arc::clone(&self.cache);
        let owned = *sha;
        let checked = tokio::task::spawn_blocking(move || cache.open_blob_checked(&owned))
            .await
            .map_err(|e| FsError::Io(std::io::Error::other(e.to_string())))?;
        if let Some(h) = checked? {
            self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(h);
        }
        self.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
        let hint = self.cache.size_of(sha);
        if let Some(n) = hint {
            // Refused at once when announced larger than the cache could ever hold:
            // nothing evicted, nothing downloaded.
            if let Err(e) = self.cache.could_hold(n) {
                tracing::error!("{what}: cannot make room for {n} bytes in the cache: {e}");
                return Err(e.into());
            }
        }
        let reservation = Mutex::new(self.cache.reserve(0)?);
        let room = |have: u64, to: u64| room_in(&reservation, have, to, hint);
        self.stats
            .downloads_in_flight
            .fetch_add(1, Ordering::Relaxed);
        let result = self.download(sha, what, &room).await;
        self.stats
            .downloads_in_flight
            .fetch_sub(1, Ordering::Relaxed);
        let verified = result?;
        // The verified length is the truth; a probe's size was a hint (a HEAD can lie).
        let n = verified.len();
        if let Some(hint) = self.cache.size_of(sha).filter(|h| *h != n) {
            tracing::warn!(
                "{what}: the size announced was {hint} bytes, the verified blob has {n}"
            );
        }
        self.cache.record_size(sha, n);
        let reservation = reservation.into_inner().unwrap_or_else(|p| p.into_inner());
        Ok(self.cache.insert_and_open(verified, Some(reservation))?)
    }

    /// Downloads and verifies a blob (a mismatch is fetched once more by the client,
    /// asking caches on the way for a fresh copy), then EIO.
    async fn download(
        &self,
        sha: &Sha512,
        what: &str,
        room: crate::remote::Room<'_>,
    ) -> Result<VerifiedFile, FsError> {
        let started = Instant::now();
        let progress = |done: u64, total: Option<u64>| {
            tracing::trace!("{what}: {done}/{total:?} bytes");
        };
        match self
            .client
            .store
            .fetch_blob(sha, self.cache.tmp_dir(), &progress, room)
            .await
        {
            Ok(v) => {
                let n = v.len();
                self.stats.bytes_fetched.fetch_add(n, Ordering::Relaxed);
                tracing::info!("{what}: fetched {n} bytes in {:.1?}", started.elapsed());
                Ok(v)
            }
            Err(e @ RemoteError::Corrupt { .. }) => {
                tracing::error!("{what}: downloaded content does not match twice: {e}");
                Err(e.into())
            }
            Err(e) => {
                tracing::error!("{what}: download failed: {e}");
                Err(e.into())
            }
        }
    }

    // ---- operations ----------------------------------------------------------------

    /// `lookup(parent, name)`.
    pub async fn lookup(self: &Arc<Self>, parent: u64, name: &str) -> Result<Attr, FsError> {
        match self.node(parent)? {
            Node::Root => {
                if name == ".sha512" {
                    let ino = self.ino(&Node::ShaDir);
                    return Ok(self.dir_attr(ino, self.started));
                }
                let key = self.key_of_name(name).ok_or(FsError::NotFound)?;
                match self.listing(&key).await? {
                    Some(_) => Ok(self.dir_attr(self.ino(&Node::Key(key)), self.started)),
                    None => Err(FsError::NotFound),
                }
            }
            Node::ShaDir => {
                let sha = Sha512::parse(name).map_err(|_| FsError::NotFound)?;
                match self.blob_size(&sha).await? {
                    Some(size) => {
                        Ok(self.file_attr(self.ino(&Node::Blob(sha)), size, self.started))
                    }
                    None => Err(FsError::NotFound),
                }
            }
            Node::Key(key) => {
                if let Some(id) = self.staged_id(&key, name) {
                    match self.staged_attr(&id) {
                        Ok(a) => return Ok(a),
                        Err(_) => self.forget_stale(&id),
                    }
                }
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                self.key_child_attr(&key, &listing, name).await
            }
            _ => Err(FsError::NotDir),
        }
    }

    async fn key_child_attr(
        &self,
        key: &str,
        listing: &KeyListing,
        name: &str,
    ) -> Result<Attr, FsError> {
        if name == "latest" {
            let target = listing.latest.as_ref().ok_or(FsError::NotFound)?;
            let ino = self.ino(&Node::Latest(key.to_string()));
            let mtime = listing
                .files
                .get(target)
                .map(|f| f.mtime)
                .unwrap_or(self.started);
            return Ok(Attr {
                kind: Kind::Symlink,
                size: target.len() as u64,
                perm: 0o777,
                ..self.file_attr(ino, 0, mtime)
            });
        }
        if name == ".entries.json" {
            let ino = self.ino(&Node::EntriesJson(key.to_string()));
            return Ok(self.file_attr(ino, listing.entries_json.len() as u64, self.started));
        }
        let f = listing.files.get(name).ok_or(FsError::NotFound)?;
        let sha = f.entry.info.sha512;
        let size = self.entry_size(key, name, &sha).await?;
        let ino = self.ino(&Node::Entry {
            key: key.to_string(),
            name: name.to_string(),
            sha,
        });
        Ok(self.file_attr(ino, size, f.mtime))
    }

    /// `getattr(ino)`.
    pub async fn getattr(self: &Arc<Self>, ino: u64) -> Result<Attr, FsError> {
        match self.node(ino)? {
            Node::Root | Node::ShaDir | Node::Key(_) => Ok(self.dir_attr(ino, self.started)),
            Node::Blob(sha) => match self.blob_size(&sha).await? {
                Some(size) => Ok(self.file_attr(ino, size, self.started)),
                None => Err(FsError::NotFound),
            },
            Node::Entry { key, name, sha } => {
                let mtime = match self.listing(&key).await {
                    Ok(Some(l)) => mtime_of(&l, &name, &sha),
                    _ => None,
                }
                .unwrap_or(self.started);
                let size = self.entry_size(&key, &name, &sha).await?;
                Ok(self.file_attr(ino, size, mtime))
            }
            Node::Latest(key) | Node::EntriesJson(key) => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                let name = if matches!(self.node(ino)?, Node::Latest(_)) {
                    "latest"
                } else {
                    ".entries.json"
                };
                self.key_child_attr(&key, &listing, name).await
            }
            Node::Staged(id) => self.staged_attr(&id),
        }
    }

    /// `getattr` answered from memory alone, without a request or a wait: `None` when
    /// it would need one (stale listing, unknown size), and the caller then uses
    /// [`Core::getattr`]. Lets the FUSE adapter answer on the session thread.
    pub fn getattr_now(&self, ino: u64) -> Option<Result<Attr, FsError>> {
        match self.node(ino) {
            Err(e) => Some(Err(e)),
            Ok(Node::Root | Node::ShaDir | Node::Key(_)) => {
                Some(Ok(self.dir_attr(ino, self.started)))
            }
            Ok(Node::Blob(sha)) => {
                let size = self.cache.size_of(&sha)?;
                Some(Ok(self.file_attr(ino, size, self.started)))
            }
            Ok(Node::Entry { key, name, sha }) => {
                let Some(Some(listing)) = self.fresh_state(&key) else {
                    return None;
                };
                let mtime = mtime_of(&listing, &name, &sha)?;
                let size = self.cache.size_of(&sha)?;
                Some(Ok(self.file_attr(ino, size, mtime)))
            }
            Ok(Node::Staged(id)) => Some(self.staged_attr(&id)),
            Ok(Node::Latest(_) | Node::EntriesJson(_)) => None,
        }
    }

    /// `readdir(ino)`: every entry, `.` and `..` included.
    pub async fn readdir(self: &Arc<Self>, ino: u64) -> Result<Vec<DirEntry>, FsError> {
        self.stats.dir_listings.fetch_add(1, Ordering::Relaxed);
        let mut out = vec![
            DirEntry {
                ino,
                name: ".".into(),
                kind: Kind::Dir,
            },
            DirEntry {
                ino: ROOT_INO,
                name: "..".into(),
                kind: Kind::Dir,
            },
        ];
        match self.node(ino)? {
            Node::Root => {
                out.push(DirEntry {
                    ino: self.ino(&Node::ShaDir),
                    name: ".sha512".into(),
                    kind: Kind::Dir,
                });
                for key in self.root_keys() {
                    let ino = self.ino(&Node::Key(key.clone()));
                    out.push(DirEntry {
                        ino,
                        name: key_dir_name(&key),
                        kind: Kind::Dir,
                    });
                }
            }
            Node::ShaDir => {}
            Node::Key(key) => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                for (name, f) in &listing.files {
                    let ino = self.ino(&Node::Entry {
                        key: key.clone(),
                        name: name.clone(),
                        sha: f.entry.info.sha512,
                    });
                    out.push(DirEntry {
                        ino,
                        name: name.clone(),
                        kind: Kind::File,
                    });
                }
                let staged = self.staged_in(&key);
                out.retain(|e| !staged.iter().any(|(n, _)| *n == e.name));
                for (name, id) in staged {
                    out.push(DirEntry {
                        ino: self.ino(&Node::Staged(id)),
                        name,
                        kind: Kind::File,
                    });
                }
                if listing.latest.is_some() {
                    out.push(DirEntry {
                        ino: self.ino(&Node::Latest(key.clone())),
                        name: "latest".into(),
                        kind: Kind::Symlink,
                    });
                }
                out.push(DirEntry {
                    ino: self.ino(&Node::EntriesJson(key.clone())),
                    name: ".entries.json".into(),
                    kind: Kind::File,
                });
            }
            _ => return Err(FsError::NotDir),
        }
        Ok(out)
    }

    /// `readlink(ino)`.
    pub async fn readlink(self: &Arc<Self>, ino: u64) -> Result<String, FsError> {
        match self.node(ino)? {
            Node::Latest(key) => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                listing.latest.clone().ok_or(FsError::NotFound)
            }
            _ => Err(FsError::Invalid("not a symbolic link")),
        }
    }

    /// `open(ino)` for reading: the blob is in the cache, verified, when this returns.
    pub async fn open(self: &Arc<Self>, ino: u64) -> Result<(u64, Arc<Handle>), FsError> {
        let handle = match self.node(ino)? {
            Node::Entry { key, name, sha } => {
                self.open_blob(&sha, &format!("key {key}: entry {name}"))
                    .await?
            }
            Node::Blob(sha) => {
                self.open_blob(&sha, &format!(".sha512/{}", sha.short(16)))
                    .await?
            }
            Node::EntriesJson(key) => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                Handle::Memory(listing.entries_json.clone())
            }
            Node::Staged(id) => match self.published_node(&id) {
                Some(Node::Entry { key, name, sha }) => {
                    self.open_blob(&sha, &format!("key {key}: entry {name}"))
                        .await?
                }
                _ => self.open_staged(&id, false, None).await?,
            },
            Node::Root | Node::ShaDir | Node::Key(_) => return Err(FsError::IsDir),
            Node::Latest(_) => return Err(FsError::Invalid("symbolic link")),
        };
        Ok(self.add_handle(handle))
    }

    /// `open` (read-only) of an entry or `.sha512/` file whose blob is in the cache,
    /// done at once; `None` when it needs more (a download, a staged file, an error to
    /// report), and the caller then uses [`Core::open`].
    pub fn open_now(&self, ino: u64) -> Option<(u64, Arc<Handle>)> {
        let sha = match self.node(ino).ok()? {
            Node::Entry { sha, .. } | Node::Blob(sha) => sha,
            _ => return None,
        };
        let (file, size, pin) = self.cache.open_blob(&sha).ok()??;
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(self.add_handle(Handle::Blob {
            file,
            size,
            _pin: pin,
        }))
    }

    fn add_handle(&self, handle: Handle) -> (u64, Arc<Handle>) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(handle);
        lock(&self.handles).insert(fh, handle.clone());
        (fh, handle)
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    async fn open_blob(&self, sha: &Sha512, what: &str) -> Result<Handle, FsError> {
        let (file, size, pin) = self.cached_or_fetched(sha, what).await?;
        Ok(Handle::Blob {
            file,
            size,
            _pin: pin,
        })
    }

    /// `read(fh, offset, size)`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let handle = lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        match &*handle {
            Handle::Blob {
                file, size: total, ..
            } => {
                if offset >= *total {
                    return Ok(Vec::new());
                }
                let want = (size as u64).min(total - offset) as usize;
                let mut buf = vec![0u8; want];
                let got = read_full_at(file, &mut buf, offset)?;
                buf.truncate(got);
                Ok(buf)
            }
            Handle::Memory(data) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                Ok(data[start..end].to_vec())
            }
            Handle::Staged(h) => write::read_staged(&lock(h).file, offset, size),
        }
    }

    /// True when `fh` is a file being written (its release may publish).
    pub fn is_staged_handle(&self, fh: u64) -> bool {
        lock(&self.handles)
            .get(&fh)
            .is_some_and(|h| matches!(**h, Handle::Staged(_)))
    }

    /// `release(fh)`: unpins the blob, forgets the handle.
    pub fn release(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    /// One extended attribute's value (`None`: the node has no such attribute). The
    /// root's status document is computed only when it is asked for.
    pub async fn xattr(self: &Arc<Self>, ino: u64, name: &str) -> Result<Option<Vec<u8>>, FsError> {
        if name == status::STATUS_XATTR && self.node(ino)? == Node::Root {
            return Ok(Some(
                serde_json::to_vec_pretty(&self.status().await).unwrap_or_default(),
            ));
        }
        Ok(self
            .xattrs(ino)
            .await?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v))
    }

    /// Extended attributes of a node (for listing; see [`Core::xattr`] for values).
    pub async fn xattrs(self: &Arc<Self>, ino: u64) -> Result<Vec<(String, Vec<u8>)>, FsError> {
        match self.node(ino)? {
            Node::Root => {
                let mode = if self.client.verifier.is_empty() {
                    "unverified".to_string()
                } else {
                    format!(
                        "verified ({} certificates)",
                        self.client.verifier.certs.len()
                    )
                };
                Ok(vec![
                    ("user.shacachefs.signature-mode".into(), mode.into_bytes()),
                    // Listed here; its value (which asks the servers) only through `xattr`.
                    (status::STATUS_XATTR.into(), Vec::new()),
                ])
            }
            Node::Entry { key, name, sha } => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                let f = listing
                    .files
                    .get(&name)
                    .filter(|f| f.entry.info.sha512 == sha)
                    .ok_or(FsError::NotFound)?;
                let cached = self.cache.lookup_blob(&sha).is_some();
                Ok(xattr::entry_xattrs(
                    &sha.hex(),
                    &f.entry.info.metadata,
                    f.entry.signer.label(),
                    cached,
                ))
            }
            Node::Blob(sha) => {
                let cached = self.cache.lookup_blob(&sha).is_some();
                Ok(vec![
                    ("user.shacache.sha512".into(), sha.hex().into_bytes()),
                    (
                        "user.shacachefs.cached".into(),
                        if cached { b"1".to_vec() } else { b"0".to_vec() },
                    ),
                ])
            }
            Node::Staged(id) if self.published_node(&id).is_some() => {
                // Published a moment ago; the kernel has not forgotten the staged inode.
                match self.published_node(&id) {
                    Some(Node::Entry { key, name, sha }) => {
                        let listing = self.refresh_if_needed(&key).await?;
                        match listing
                            .files
                            .get(&name)
                            .filter(|f| f.entry.info.sha512 == sha)
                        {
                            Some(f) => Ok(xattr::entry_xattrs(
                                &sha.hex(),
                                &f.entry.info.metadata,
                                f.entry.signer.label(),
                                self.cache.lookup_blob(&sha).is_some(),
                            )),
                            None => Ok(vec![(
                                "user.shacache.sha512".into(),
                                sha.hex().into_bytes(),
                            )]),
                        }
                    }
                    _ => Ok(Vec::new()),
                }
            }
            Node::Staged(id) => Ok(vec![(
                "user.shacachefs.pending".into(),
                self.staged_error(&id)
                    .unwrap_or_else(|| "not published yet".into())
                    .into_bytes(),
            )]),
            Node::ShaDir | Node::Key(_) | Node::Latest(_) | Node::EntriesJson(_) => Ok(Vec::new()),
        }
    }

    /// `mkdir(root, name)`: a local key, shown until the mount ends.
    pub async fn mkdir(self: &Arc<Self>, parent: u64, name: &str) -> Result<Attr, FsError> {
        if self.node(parent)? != Node::Root {
            return Err(FsError::NotPermitted("directories exist only at the root"));
        }
        if name == ".sha512" || name.starts_with('.') && name.len() <= 2 {
            return Err(FsError::NotPermitted("reserved name"));
        }
        let key = key_from_dir_name(name).ok_or(FsError::Invalid("not a usable key name"))?;
        lock(&self.local_keys).insert(key.clone());
        lock(&self.keys).remove(&key);
        Ok(self.dir_attr(self.ino(&Node::Key(key)), SystemTime::now()))
    }

    /// The kernel's cache lifetime for entries and attributes.
    pub fn ttl(&self) -> Duration {
        self.opts.dir_ttl
    }

    /// The label rules, exposed for `ls` and tests.
    pub fn label_of(entry: &TrustedEntry) -> String {
        naming::label(&entry.info.metadata, &entry.info.sha512)
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends; the bytes read.
/// Grows a download's reservation (see [`crate::cache::Reservation::ensure`]); the
/// cache's `NoSpace` becomes an `ENOSPC` I/O error, which ends the download.
fn room_in(
    reservation: &Mutex<crate::cache::Reservation>,
    have: u64,
    to: u64,
    hint: Option<u64>,
) -> std::io::Result<()> {
    match lock(reservation).ensure(have, to, hint) {
        Ok(()) => Ok(()),
        Err(crate::cache::CacheError::Io { source, .. }) => Err(source),
        Err(e) => Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            e.to_string(),
        )),
    }
}

pub(crate) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
