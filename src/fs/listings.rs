//! Key listings: what shadir says a key holds, trusted and named, kept in memory with
//! its TTL (a 404 too, for `negative_ttl`), saved in the cache for offline use, and
//! what the kernel must forget when a refresh or a publish changes it.
//!
//! A listing is refreshed after `dir_ttl`. When the server cannot be reached (network
//! error, timeout, 5xx) the last answer (in memory, else on disk) is used and the key is
//! not asked again before another `dir_ttl`, so an offline mount does not wait for a
//! timeout at every `stat`.

use super::{lock, Core, FsError, Node, Notice};
use crate::client::{entries_json_text, select_trusted, TrustedEntry};
use crate::digest::Sha512;
use crate::naming::{key_dir_name, key_from_dir_name, label, name_entries, newest_first, Nameable};
use crate::remote::{DirListing, RemoteError};
use crate::wire::{parse_listing, Listing, RawEntry};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// A key's trusted entries, named.
#[derive(Debug)]
pub struct KeyListing {
    fetched: Instant,
    pub files: BTreeMap<String, FileEntry>,
    pub latest: Option<String>,
    /// The size of `.entries.json`, known once asked for. The document itself is
    /// written at each open and freed at the last close, never kept with the listing:
    /// it is as big as the shadir answer (10 MB of a 20,000-entry key's 69 MB heap
    /// peak when it was), and most listings (a refresh, each publish of a `cp` of many
    /// files) are never asked for it.
    entries_json_len: OnceLock<u64>,
}

impl KeyListing {
    /// The `.entries.json` document of this listing (the same bytes at every call).
    pub fn entries_json(&self) -> Arc<Vec<u8>> {
        let files = self.files.iter().map(|(n, f)| (n.as_str(), &f.entry));
        let doc = entries_json_text(files).into_bytes();
        let _ = self.entries_json_len.set(doc.len() as u64);
        Arc::new(doc)
    }

    /// The size of [`KeyListing::entries_json`].
    pub fn entries_json_len(&self) -> u64 {
        match self.entries_json_len.get() {
            Some(n) => *n,
            // (Recorded by `entries_json`.)
            None => {
                let n = self.entries_json().len() as u64;
                return_freed_memory_after(self.files.len());
                n
            }
        }
    }

    /// The entries as a shadir body (for the on-disk copy): `[[inner, signature], …]`.
    fn body(&self) -> Vec<u8> {
        listing_body(self.files.values().map(|f| &f.entry.raw))
    }
}

/// A file of a key directory. The entry is shared: a publish renames a listing's
/// entries without parsing or copying them again.
#[derive(Debug, Clone)]
pub struct FileEntry {
    pub entry: Arc<TrustedEntry>,
    pub mtime: SystemTime,
}

/// A listing this big leaves megabytes of transients behind (the answer's body, its
/// parse, its `.entries.json`, its directory snapshot).
const BIG_LISTING: usize = 1000;

/// Gives the heap's free memory back to the system after work on a listing of `entries`
/// entries, when it was big. glibc keeps what a big listing's build freed (a 20,000-entry
/// key's answer and its parse, tens of MB) in the process for ever otherwise: the
/// daemon's RSS stayed at its peak.
pub fn return_freed_memory_after(entries: usize) {
    if entries < BIG_LISTING {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap memory; it takes the allocator's
    // locks itself.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How long after a publish the key's listing is saved whole in the cache (once for a
/// burst of publishes, not once per file).
pub(crate) const SAVE_AFTER_PUBLISH: Duration = Duration::from_secs(2);

pub(super) enum KeyState {
    Listed(Arc<KeyListing>),
    Missing(Instant),
}

/// How long servers that did not answer are taken as unreachable (closes fail at once)
/// before a close tries them again.
pub(crate) const OFFLINE_RECHECK: Duration = Duration::from_secs(30);

/// Errors that say the servers cannot be reached at all (not a server that answers
/// with an error): closes then fail at once for a while, see `mark_unreachable`.
pub(crate) fn is_offline(e: &RemoteError) -> bool {
    matches!(e, RemoteError::Network { .. } | RemoteError::Timeout { .. })
}

/// Errors after which the last known answer is better than nothing.
pub(crate) fn is_unreachable(e: &RemoteError) -> bool {
    match e {
        RemoteError::Network { .. } | RemoteError::Timeout { .. } => true,
        RemoteError::Status { status, .. } => *status >= 500,
        _ => false,
    }
}

pub(super) fn time_of(ts: f64) -> Option<SystemTime> {
    if ts.is_finite() && (0.0..1e11).contains(&ts) {
        Some(UNIX_EPOCH + Duration::from_secs_f64(ts))
    } else {
        None
    }
}

/// The time of the entry an inode shows: the one under `name` when it still shows
/// `sha`, else the version of that blob under another name (an older version of the
/// name, which a descriptor opened before the refresh still reads).
pub(super) fn mtime_of(listing: &KeyListing, name: &str, sha: &Sha512) -> Option<SystemTime> {
    match listing.files.get(name) {
        Some(f) if f.entry.info.sha512 == *sha => Some(f.mtime),
        _ => listing
            .files
            .values()
            .find(|f| f.entry.info.sha512 == *sha)
            .map(|f| f.mtime),
    }
}

/// Entries as a shadir body (for the on-disk copy): `[[inner, signature], …]`.
pub(crate) fn listing_body<'a>(entries: impl Iterator<Item = &'a RawEntry>) -> Vec<u8> {
    let arr = entries
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
    /// Keys shown at the root: configured, known to the cache, made with `mkdir`.
    pub fn root_keys(&self) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = self.opts.keys.iter().cloned().collect();
        keys.extend(self.cache.known_keys());
        keys.extend(lock(&self.local_keys).iter().cloned());
        keys
    }

    /// The key a root directory name stands for.
    /// A key this machine knows: configured, made with `mkdir`, holding staged files,
    /// or listed by shadir before (the cache remembers).
    pub(super) fn is_known_key(&self, key: &str) -> bool {
        lock(&self.local_keys).contains(key) || self.cache.known_keys().iter().any(|k| k == key)
    }

    pub(super) fn key_of_name(&self, name: &str) -> Option<String> {
        if let Some(k) = key_from_dir_name(name) {
            return Some(k);
        }
        // Long keys are shown with a digest: only known keys can be found that way.
        self.root_keys()
            .into_iter()
            .find(|k| key_dir_name(k) == name)
    }

    pub(super) fn fresh_state(&self, key: &str) -> Option<Option<Arc<KeyListing>>> {
        let keys = lock(&self.keys);
        match keys.get(key)? {
            KeyState::Listed(l) if l.fetched.elapsed() < self.opts.dir_ttl => Some(Some(l.clone())),
            KeyState::Missing(t) if t.elapsed() < self.opts.negative_ttl => Some(None),
            _ => None,
        }
    }

    pub(super) fn stale_listing(&self, key: &str) -> Option<Arc<KeyListing>> {
        match lock(&self.keys).get(key) {
            Some(KeyState::Listed(l)) => Some(l.clone()),
            _ => None,
        }
    }

    pub(super) fn remember(self: &Arc<Self>, key: &str, listing: Listing) -> Arc<KeyListing> {
        let built = Arc::new(self.build(key, listing));
        return_freed_memory_after(built.files.len());
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
    pub(super) fn tell_changes(&self, key: &str, old: &KeyListing, new: &KeyListing) {
        let names = old
            .files
            .iter()
            .filter(|(name, f)| {
                new.files.get(*name).map(|n| n.entry.info.sha512) != Some(f.entry.info.sha512)
            })
            .map(|(name, _)| name.clone());
        // `.entries.json` changes with any entry (a name, a blob, metadata).
        let entries_changed = || {
            old.files.len() != new.files.len()
                || !old.files.iter().all(|(name, f)| {
                    new.files.get(name).is_some_and(|n| {
                        Arc::ptr_eq(&n.entry, &f.entry) || n.entry.raw == f.entry.raw
                    })
                })
        };
        self.tell_kernel(key, old, new, names, entries_changed);
    }

    /// Queues the notices for `key` once the kernel knows its directory: `names` to
    /// forget, `latest` when its target moved from `old` to `new`, `.entries.json`'s
    /// attributes when `entries_changed` says so (both asked only then).
    fn tell_kernel(
        &self,
        key: &str,
        old: &KeyListing,
        new: &KeyListing,
        names: impl IntoIterator<Item = String>,
        entries_changed: impl FnOnce() -> bool,
    ) {
        let mut notices = Vec::new();
        {
            let inodes = lock(&self.inodes);
            let Some(parent) = inodes.known(&Node::Key(key.to_string())) else {
                return;
            };
            notices.extend(names.into_iter().map(|name| Notice::Entry { parent, name }));
            if old.latest != new.latest {
                if let Some(ino) = inodes.known(&Node::Latest(key.to_string())) {
                    notices.push(Notice::Inode(ino));
                }
                notices.push(Notice::Entry {
                    parent,
                    name: "latest".into(),
                });
            }
            if entries_changed() {
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
    /// fetching the key again. Only the new entry is verified and parsed; the others
    /// are renamed as they are (shared). The next refresh after the TTL reconciles with
    /// shadir. A key not listed yet is fetched.
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
        let one = Listing {
            entries: vec![entry],
            rejected: Vec::new(),
        };
        let (trusted, hidden) = select_trusted(one, &self.client.verifier);
        self.log_hidden(key, hidden);
        let Some(new) = trusted.into_iter().next().map(Arc::new) else {
            return;
        };
        let built = match self.with_new_label(key, &old, &new) {
            // A new name: nothing else of the listing changes.
            Some((built, name)) => {
                let built = Arc::new(built);
                lock(&self.keys).insert(key.to_string(), KeyState::Listed(built.clone()));
                // The new name (a negative entry the kernel may hold), `latest` when
                // it moved, `.entries.json`.
                self.tell_kernel(key, &old, &built, [name], || true);
                built
            }
            None => {
                let mut entries: Vec<Arc<TrustedEntry>> =
                    old.files.values().map(|f| f.entry.clone()).collect();
                entries.push(new);
                let built = Arc::new(self.assemble(key, entries, old.fetched));
                lock(&self.keys).insert(key.to_string(), KeyState::Listed(built.clone()));
                self.tell_changes(key, &old, &built);
                self.prefetch_sizes(&built);
                built
            }
        };
        drop(built);
        // The copy on disk: marked stale now (a mount started meanwhile asks shadir
        // rather than trust a copy without this publish), saved whole a little later.
        self.cache.mark_dir_answer_stale(key);
        self.save_listing_soon(key);
    }

    /// `old` with `e` added, when naming it needs no other entry: its label is new to
    /// the key and holds no `~` (so it cannot meet another entry's versioned name), so
    /// it shows under its bare label and every other name stays. The common case of a
    /// `cp` of many files into a key, in O(log n) instead of renaming the whole key.
    /// `None` when the whole listing must be named again.
    fn with_new_label(
        &self,
        key: &str,
        old: &KeyListing,
        e: &Arc<TrustedEntry>,
    ) -> Option<(KeyListing, String)> {
        let name = label(&e.info.metadata, &e.info.sha512);
        if name.contains('~') || old.files.contains_key(&name) {
            return None;
        }
        let mut files = old.files.clone();
        let mtime = e
            .info
            .timestamp()
            .and_then(time_of)
            .unwrap_or_else(|| self.cache.first_seen(key, &e.info.sha512));
        // `latest`: the newest entry with a timestamp, the first name on a tie.
        let newer = e.timestamp().is_some_and(|t| !t.is_nan())
            && match old
                .latest
                .as_ref()
                .and_then(|l| Some((l, old.files.get(l)?)))
            {
                None => true,
                Some((l, f)) => match newest_first(e, &f.entry) {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Equal => name < *l,
                    std::cmp::Ordering::Greater => false,
                },
            };
        let latest = if newer {
            Some(name.clone())
        } else {
            old.latest.clone()
        };
        files.insert(
            name.clone(),
            FileEntry {
                entry: e.clone(),
                mtime,
            },
        );
        let listing = KeyListing {
            fetched: old.fetched,
            files,
            latest,
            entries_json_len: OnceLock::new(),
        };
        Some((listing, name))
    }

    /// Saves `key`'s listing in the cache [`SAVE_AFTER_PUBLISH`] from now, once for
    /// all the publishes meanwhile.
    fn save_listing_soon(self: &Arc<Self>, key: &str) {
        if !lock(&self.unsaved).insert(key.to_string()) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return self.save_listings();
        };
        let core = Arc::downgrade(self);
        rt.spawn(async move {
            tokio::time::sleep(SAVE_AFTER_PUBLISH).await;
            if let Some(core) = core.upgrade() {
                core.save_listings();
            }
        });
    }

    /// Saves the listings changed by publishes since they were last saved (also at
    /// unmount).
    pub fn save_listings(&self) {
        let keys: Vec<String> = lock(&self.unsaved).drain().collect();
        for key in keys {
            if let Some(l) = self.stale_listing(&key) {
                self.cache.store_dir_answer(&key, Some(&l.body()));
            }
        }
    }

    /// The trusted, named entries of a key; `None` when shadir does not know the key.
    pub async fn listing(self: &Arc<Self>, key: &str) -> Result<Option<Arc<KeyListing>>, FsError> {
        self.fetch_listing(key, false).await
    }

    /// The servers could not be reached (a network error, a timeout): until
    /// [`OFFLINE_RECHECK`] has passed, or something answers, closes fail at once
    /// instead of each waiting for its own timeout.
    pub(crate) fn mark_unreachable(&self, e: &RemoteError) {
        let mut off = lock(&self.offline);
        if off.is_none() {
            tracing::warn!(
                "servers unreachable ({e}): files written now stay pending until they answer"
            );
        }
        *off = Some(Instant::now() + OFFLINE_RECHECK);
    }

    /// Something answered.
    pub(crate) fn mark_reachable(&self) {
        if lock(&self.offline).take().is_some() {
            tracing::info!("servers answer again");
        }
    }

    /// The servers failed to answer less than [`OFFLINE_RECHECK`] ago.
    pub fn known_unreachable(&self) -> bool {
        lock(&self.offline).is_some_and(|until| Instant::now() < until)
    }

    /// The next request asks the servers again (a retry round), while they stay marked
    /// unreachable until something answers (no second warning meanwhile).
    pub(crate) fn recheck_reachability(&self) {
        if let Some(until) = lock(&self.offline).as_mut() {
            *until = Instant::now();
        }
    }

    /// The listing of a key (`None` is an error here: the caller knows it exists).
    pub(super) async fn known_listing(
        self: &Arc<Self>,
        key: &str,
    ) -> Result<Arc<KeyListing>, FsError> {
        self.listing(key).await?.ok_or(FsError::NotFound)
    }

    /// Asks shadir again now, whatever the TTL (after a write through this mount).
    pub async fn refresh(self: &Arc<Self>, key: &str) -> Result<Option<Arc<KeyListing>>, FsError> {
        self.fetch_listing(key, true).await
    }

    pub(super) async fn fetch_listing(
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
        let answer = self.client.store.get_dir(key).await;
        self.stats.count_dir_answer(&answer);
        if answer.is_ok() {
            self.mark_reachable();
        }
        match answer {
            Ok(DirListing::Found(l)) => {
                self.cache
                    .store_dir_answer(key, Some(&listing_body(l.entries.iter())));
                lock(&self.unsaved).remove(key);
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
                if is_offline(&e) {
                    self.mark_unreachable(&e);
                }
                let saved = self
                    .stale_listing(key)
                    .map(|l| Listing {
                        entries: l.files.values().map(|f| f.entry.raw.clone()).collect(),
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
                    // A key this machine knows (configured, made here, or listed before)
                    // stays usable offline: empty until shadir answers, so that files
                    // can be staged in it (published when the servers are back).
                    None if self.is_known_key(key) => {
                        tracing::warn!(
                            "key {key}: shadir unreachable ({e}) and no listing saved: shown empty until it answers"
                        );
                        Ok(Some(self.remember(key, Listing::default())))
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

    pub(super) fn build(&self, key: &str, listing: Listing) -> KeyListing {
        let (trusted, hidden) = select_trusted(listing, &self.client.verifier);
        self.log_hidden(key, hidden);
        let entries = trusted.into_iter().map(Arc::new).collect();
        self.assemble(key, entries, Instant::now())
    }

    fn log_hidden(&self, key: &str, hidden: Vec<crate::client::Hidden>) {
        if hidden.is_empty() {
            return;
        }
        let mut logged = lock(&self.logged_hidden);
        for h in hidden {
            if logged.insert((key.to_string(), h.excerpt.clone())) {
                tracing::debug!("key {key}: entry hidden ({}): {}", h.reason, h.excerpt);
            }
        }
    }

    /// Trusted entries named into a listing.
    fn assemble(&self, key: &str, entries: Vec<Arc<TrustedEntry>>, fetched: Instant) -> KeyListing {
        let named = name_entries(entries);
        let mut files = BTreeMap::new();
        for (name, entry) in named.files {
            let mtime = entry
                .info
                .timestamp()
                .and_then(time_of)
                .unwrap_or_else(|| self.cache.first_seen(key, &entry.info.sha512));
            files.insert(name, FileEntry { entry, mtime });
        }
        KeyListing {
            fetched,
            files,
            latest: named.latest,
            entries_json_len: OnceLock::new(),
        }
    }
}
