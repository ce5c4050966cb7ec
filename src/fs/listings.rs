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
use crate::naming::{key_dir_name, key_from_dir_name, name_entries};
use crate::remote::{DirListing, RemoteError};
use crate::wire::{parse_listing, Listing, RawEntry};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// A key's trusted entries, named.
#[derive(Debug)]
pub struct KeyListing {
    fetched: Instant,
    pub files: BTreeMap<String, FileEntry>,
    pub latest: Option<String>,
    pub entries_json: Arc<Vec<u8>>,
}

/// A file of a key directory.
#[derive(Debug, Clone)]
pub struct FileEntry {
    pub entry: TrustedEntry,
    pub mtime: SystemTime,
}

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

/// A listing as a shadir body (for the on-disk copy): `[[inner, signature], …]`.
pub(super) fn listing_body(l: &Listing) -> Vec<u8> {
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
        let listing = Listing {
            entries,
            rejected: Vec::new(),
        };
        // The copy on disk too: a mount started within the TTL uses it instead of asking,
        // and must see this publish.
        self.cache
            .store_dir_answer(key, Some(&listing_body(&listing)));
        let mut built = self.build(key, listing);
        built.fetched = old.fetched;
        let built = Arc::new(built);
        lock(&self.keys).insert(key.to_string(), KeyState::Listed(built.clone()));
        self.tell_changes(key, &old, &built);
        self.prefetch_sizes(&built);
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
                if is_offline(&e) {
                    self.mark_unreachable(&e);
                }
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
        {
            let mut logged = lock(&self.logged_hidden);
            for h in hidden {
                if logged.insert((key.to_string(), h.excerpt.clone())) {
                    tracing::debug!("key {key}: entry hidden ({}): {}", h.reason, h.excerpt);
                }
            }
        }
        let named = name_entries(trusted);
        // Written directly (no `Value` of the whole document), then the entries moved
        // into the map, not cloned: both were large parts of a big key's memory peak.
        let json = entries_json_text(&named.files);
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
            fetched: Instant::now(),
            files,
            latest: named.latest,
            entries_json: Arc::new(json.into_bytes()),
        }
    }
}
