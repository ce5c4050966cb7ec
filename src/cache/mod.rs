//! The local cache directory: verified blobs with LRU eviction, and the small persisted
//! tables the mount needs (blob sizes, known keys, first-seen times, shadir answers).
//!
//! On-disk layout (`DIR` is [`CacheOptions::dir`]):
//!
//! ```text
//! DIR/layout                  "1": the layout version; another value refuses to open
//! DIR/v1/open.lock            flock: shared by every process using the cache
//! DIR/v1/blobs/<2 hex>/<128 hex>   verified blobs, named by SHA-512
//! DIR/v1/tmp/                 temporary files (downloads, table rewrites)
//! DIR/v1/pins/<128 hex>       empty: that blob is pinned for offline use (see `pins`)
//! DIR/v1/pins.lock            flock: pinning (exclusive) against evicting (shared)
//! DIR/v1/sizes.json           {"<sha hex>": size}, global: blobs are named by content
//! DIR/v1/ns/<32 hex>/         per namespace (first 32 hex of SHA-512 of its text):
//!     namespace               the namespace text, for humans
//!     keys.json               ["key", ...] known keys, insertion order
//!     seen.json               {"key": {"<sha hex>": unix seconds}} first-seen times
//!     dirs/<32 hex>.json      the last shadir answer for a key (see `tables`)
//! ```
//!
//! The whole tree is private: directories are created 0700 and files 0600, and a tree
//! made by an older release (0755/0644) is tightened when opened. A namespace is a
//! server URL without credentials (`user:password@` is never stored); a namespace
//! directory an older release named after a URL with credentials is renamed (or merged
//! into the one without) when the cache is opened, so its tables survive.
//!
//! This module owns `blobs/`, `tmp/`, `ns/`, `pins/`, `sizes.json`, `open.lock` and
//! `pins.lock`, and nothing
//! else: the upload outbox (a sibling module, in its own directory) is never read,
//! cleaned or evicted from here, and no clean-up anywhere removes an entry named `outbox`.
//!
//! Leftovers in `tmp/` are deleted at open by a process that finds itself alone (an
//! exclusive `flock` on `open.lock`); with other processes running, only entries older
//! than a day are, since a live download of another process may be there.

mod blobs;
mod disk;
mod index;
mod pins;
mod tables;

#[cfg(test)]
mod pin_tests;
#[cfg(test)]
mod pressure_tests;
#[cfg(test)]
mod tests;

pub(crate) use disk::{create_private_dir, create_private_dir_all, make_private, private_file};

use crate::digest::{Sha512, VerifiedFile};
use blobs::BlobStore;
pub use blobs::Reservation;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tables::Tables;

/// Present while a session uses the cache; removed by [`Cache::close`].
const UNCLEAN_MARKER: &str = "unclean";

/// How long [`Cache::close`] waits for the background fsyncs of new blobs before it
/// leaves the `unclean` marker in place instead.
const SYNC_WAIT: Duration = Duration::from_secs(20);

/// The layout version this code reads and writes (`DIR/layout`).
pub const LAYOUT_VERSION: u32 = 1;

/// Where and how big.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The cache directory (created if missing).
    pub dir: PathBuf,
    /// Blob bytes kept before least-recently-used closed blobs are evicted.
    pub max_bytes: u64,
    /// Separates the tables of different shadir servers sharing one cache directory
    /// (the download-dir-url, or `embedded:<store>`). Blobs are shared: they are named
    /// by content.
    pub namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cache {path}: layout version {found} is not supported (expected {expected})")]
    Version {
        path: PathBuf,
        found: String,
        expected: u32,
    },
    #[error("no space left in the cache for {needed} bytes")]
    NoSpace { needed: u64 },
}

/// Keeps a blob from being evicted while it is open. Dropping it unpins the blob (and
/// evicts it at once when the cache is over its limit and the blob is the LRU victim).
/// Several pins of one blob are counted.
pub struct BlobPin {
    store: Arc<BlobStore>,
    sha: Sha512,
    generation: u64,
}

impl BlobPin {
    /// The pinned blob.
    pub fn sha(&self) -> Sha512 {
        self.sha
    }
}

/// `Read` over a file by positioned reads (a shared descriptor's offset is left alone).
struct ReadAt<'a> {
    file: &'a File,
    offset: u64,
}

impl std::io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

impl std::fmt::Debug for BlobPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobPin").field("sha", &self.sha).finish()
    }
}

/// The result of `fsck`.
#[derive(Debug, Default, Clone)]
pub struct FsckReport {
    /// Blob files hashed.
    pub checked: usize,
    /// Blobs whose bytes did not match their name (or could not be read), removed.
    pub removed: Vec<Sha512>,
    /// Bytes hashed.
    pub bytes: u64,
    /// Blobs found wrong but left in place because this process has them open.
    pub pinned: Vec<Sha512>,
}

/// The cache. All methods take `&self` (internal locking) and may block on disk I/O.
pub struct Cache {
    dir: PathBuf,
    tmp: PathBuf,
    blobs: Arc<BlobStore>,
    tables: Tables,
    // Dropped last: other processes may clean `tmp/` only once nobody holds it.
    _lock: disk::OpenLock,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks `DIR/layout`, writing it when missing.
fn check_layout(dir: &Path) -> Result<(), CacheError> {
    let path = dir.join("layout");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.trim() == LAYOUT_VERSION.to_string() => Ok(()),
        Ok(text) => Err(CacheError::Version {
            path,
            found: text.trim().chars().take(40).collect(),
            expected: LAYOUT_VERSION,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let body = format!("{LAYOUT_VERSION}\n");
            disk::write_atomic(dir, &path, body.as_bytes()).map_err(io_err(&path))
        }
        Err(e) => Err(io_err(&path)(e)),
    }
}

/// Makes a cache tree private when its top directories are not (a tree made by an older
/// release): `DIR/layout` and everything under `DIR/v1` (only group and other bits are
/// removed). `DIR` itself is made 0700 too unless it is not ours or is a shared
/// directory (sticky, like `/tmp`): then only our own entries in it are changed. A
/// tree already private costs a few `stat`s.
fn tighten_tree(dir: &Path, v1: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let open_to_others =
        |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.permissions().mode() & 0o077 != 0);
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let dir_is_ours = std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == euid && m.permissions().mode() & 0o1000 == 0);
    if dir_is_ours && open_to_others(dir) {
        if let Err(e) = disk::make_private(dir) {
            tracing::warn!("cache {}: cannot make it private: {e}", dir.display());
        }
    }
    if [v1, &v1.join("blobs")].iter().any(|p| open_to_others(p)) {
        let _ = disk::make_private(&dir.join("layout"));
        let changed = disk::make_tree_private(v1);
        tracing::info!(
            "cache {}: made private (0700 directories, 0600 files; {changed} entries changed)",
            dir.display()
        );
    }
}

/// Creates the namespace directory and its `namespace` file.
fn namespace_dir(v1: &Path, tmp: &Path, namespace: &str) -> Result<PathBuf, CacheError> {
    let ns_dir = v1
        .join("ns")
        .join(Sha512::of(namespace.as_bytes()).short(32));
    let dirs = ns_dir.join("dirs");
    disk::create_private_dir_all(&dirs).map_err(io_err(&dirs))?;
    let text_path = ns_dir.join("namespace");
    match std::fs::read_to_string(&text_path) {
        Ok(t) if t == namespace => {}
        Ok(t) => tracing::warn!(
            path = %text_path.display(),
            found = %t,
            wanted = %namespace,
            "namespace directory names another namespace (hash prefix collision?)"
        ),
        Err(_) => {
            disk::write_atomic(tmp, &text_path, namespace.as_bytes()).map_err(io_err(&text_path))?
        }
    }
    Ok(ns_dir)
}

impl Cache {
    /// Opens (creating) the cache directory: checks the layout version, removes crash
    /// leftovers, scans the blobs and loads the tables.
    pub fn open(opts: CacheOptions) -> Result<Arc<Cache>, CacheError> {
        let dir = opts.dir;
        disk::create_private_dir_all(&dir).map_err(io_err(&dir))?;
        let v1 = dir.join(format!("v{LAYOUT_VERSION}"));
        tighten_tree(&dir, &v1);
        check_layout(&dir)?;
        let tmp = v1.join("tmp");
        disk::create_private_dir_all(&tmp).map_err(io_err(&tmp))?;
        let lock_path = v1.join("open.lock");
        let mut lock = disk::OpenLock::acquire(&lock_path).map_err(io_err(&lock_path))?;
        disk::clean_tmp(&tmp, lock.alone);
        let alone = lock.alone;
        lock.share();
        tables::migrate_namespaces(&v1, &tmp);
        let ns_dir = namespace_dir(&v1, &tmp, &opts.namespace)?;
        let pins = pins::Pins::open(&v1).map_err(io_err(&v1))?;
        let blobs = BlobStore::open(v1.join("blobs"), v1.clone(), opts.max_bytes, pins)?;
        // Blobs are fsynced after they are named (see `blobs::insert`): a session that
        // did not end cleanly may have left, after a machine crash, a blob whose bytes
        // never reached the disk. Re-hash what that session wrote or touched.
        let marker = v1.join(UNCLEAN_MARKER);
        if let Some(since) = std::fs::metadata(&marker)
            .ok()
            .and_then(|m| m.modified().ok())
        {
            if alone {
                let since = since.checked_sub(Duration::from_secs(60)).unwrap_or(since);
                match blobs.fsck_since(Some(since)) {
                    Ok(r) if !r.removed.is_empty() => tracing::warn!(
                        "cache {}: the last session did not end cleanly; {} of {} recent blobs were wrong and removed",
                        dir.display(),
                        r.removed.len(),
                        r.checked
                    ),
                    Ok(r) => tracing::info!(
                        "cache {}: the last session did not end cleanly; {} recent blobs re-checked",
                        dir.display(),
                        r.checked
                    ),
                    Err(e) => tracing::warn!("cache {}: re-checking recent blobs: {e}", dir.display()),
                }
            }
        }
        let _ = disk::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&marker)
            .and_then(|mut f| {
                std::io::Write::write_all(
                    &mut f,
                    b"a session using this cache is running or ended without closing it\n",
                )
            });
        let tables = Tables::load(&v1, &ns_dir, &tmp);
        Ok(Arc::new(Cache {
            dir,
            tmp,
            blobs: Arc::new(blobs),
            tables,
            _lock: lock,
        }))
    }

    /// Ends a session cleanly: saves the tables and, when no other process uses the
    /// cache, removes the marker that makes the next open re-check recent blobs.
    /// The marker stays when the background fsyncs of the blobs this session wrote
    /// do not end within [`SYNC_WAIT`]: the next open then re-checks them.
    pub fn close(&self) -> Result<(), CacheError> {
        self.flush()?;
        self.close_within(SYNC_WAIT);
        Ok(())
    }

    fn close_within(&self, sync_wait: Duration) {
        if !self.blobs.wait_for_syncs(sync_wait) {
            tracing::warn!(
                "cache {}: blobs still being written to disk after {sync_wait:?}; the next \
                 session will re-check them",
                self.dir.display()
            );
            return;
        }
        if self._lock.try_exclusive() {
            let _ = std::fs::remove_file(
                self.dir
                    .join(format!("v{LAYOUT_VERSION}"))
                    .join(UNCLEAN_MARKER),
            );
        }
    }

    /// The cache directory given at open.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory for temporary files (same filesystem as the blobs).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// Where a blob lives (present or not); for logs and `status`.
    pub fn blob_path(&self, sha: &Sha512) -> PathBuf {
        self.blobs.path_of(sha)
    }

    /// The size of a cached blob, if present (and marks it recently used). A file of a
    /// length other than the one this process knew is removed and is a miss.
    pub fn lookup_blob(&self, sha: &Sha512) -> Option<u64> {
        self.blobs.lookup(sha)
    }

    /// Moves a verified download into the cache; returns its size. The new blob is not
    /// evicted by this call even when larger than the limit (the caller opens it next).
    pub fn insert_blob(&self, file: VerifiedFile) -> Result<u64, CacheError> {
        let sha = file.sha();
        let len = self.blobs.insert(file)?;
        self.tables.record_size(&sha, len);
        Ok(len)
    }

    /// [`Cache::insert_blob`] and [`Cache::open_blob`] in one step: the blob is pinned
    /// from the moment it is named in the cache, so no eviction can take it before the
    /// caller holds it. The download's reservation is given back in that step. The
    /// verified length becomes the recorded size.
    pub fn insert_and_open(
        &self,
        file: VerifiedFile,
        reservation: Option<Reservation>,
    ) -> Result<(Arc<File>, u64, BlobPin), CacheError> {
        let sha = file.sha();
        let opened = self.blobs.insert_and_pin(file, reservation)?;
        self.tables.record_size(&sha, opened.1);
        Ok(opened)
    }

    /// Opens a cached blob for reading and pins it; `None` when absent (or of a length
    /// other than the one this process knew, which removes it). The handles of one
    /// blob share one descriptor. Never hashes: a blob whose length disagrees with the
    /// recorded size (which may come from a server's announcement) is a `None` here,
    /// left in place for [`Cache::open_blob_checked`].
    pub fn open_blob(&self, sha: &Sha512) -> Result<Option<(Arc<File>, u64, BlobPin)>, CacheError> {
        let Some(opened) = self.blobs.open_blob(sha)? else {
            return Ok(None);
        };
        match self.tables.size_of(sha) {
            Some(n) if n != opened.1 => Ok(None),
            _ => Ok(Some(opened)),
        }
    }

    /// [`Cache::open_blob`], settling a disagreement with the recorded size by hashing
    /// the file: a file that matches its name is the truth (the recorded size, perhaps
    /// a server's wrong announcement, is corrected); one that does not is removed. May
    /// read the whole blob: not for a thread that must answer at once.
    pub fn open_blob_checked(
        &self,
        sha: &Sha512,
    ) -> Result<Option<(Arc<File>, u64, BlobPin)>, CacheError> {
        let Some((file, len, pin)) = self.blobs.open_blob(sha)? else {
            return Ok(None);
        };
        let recorded = self.tables.size_of(sha);
        if recorded.is_none_or(|n| n == len) {
            return Ok(Some((file, len, pin)));
        }
        let path = self.blobs.path_of(sha);
        let hashed = Sha512::of_reader(ReadAt {
            file: &file,
            offset: 0,
        });
        match hashed {
            Ok((actual, n)) if actual == *sha && n == len => {
                tracing::warn!(
                    "cache: blob {} is {len} bytes and verifies, not the {} bytes recorded \
                     (announced by a server?): the verified size is kept",
                    sha.short(16),
                    recorded.unwrap_or_default()
                );
                self.tables.record_size(sha, len);
                Ok(Some((file, len, pin)))
            }
            Ok(_) => {
                tracing::warn!(
                    "cache: blob {} does not match its name ({len} bytes, {} recorded), removing",
                    sha.short(16),
                    recorded.unwrap_or_default()
                );
                drop(pin);
                self.blobs.remove(sha);
                Ok(None)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Removes a blob (found wrong or unreadable).
    pub fn remove_blob(&self, sha: &Sha512) {
        self.blobs.remove(sha)
    }

    /// Holds room for a download of `bytes` (evicting closed blobs), counted with the
    /// other downloads in flight until the returned reservation is dropped or given to
    /// [`Cache::insert_and_open`]; `NoSpace` when the filesystem cannot hold it even
    /// then. Downloads start from 0 and grow it with [`Reservation::ensure`] as bytes
    /// arrive.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation, CacheError> {
        self.blobs.reserve(bytes)
    }

    /// Whether a blob of `bytes` could be cached at all (after evicting every closed
    /// blob); `NoSpace` if not. Evicts nothing: a download announced larger than the
    /// disk is refused at once, without emptying the cache for it. (An announced size is
    /// only ever used this way, to refuse; room is reserved as bytes arrive.)
    pub fn could_hold(&self, bytes: u64) -> Result<(), CacheError> {
        self.blobs.could_hold(bytes)
    }

    /// Pins the blob `held` holds open for offline use: never evicted, across remounts
    /// and by every process sharing the cache directory, until [`Cache::unpin_blob`].
    /// False when another process evicted the blob just before the pin was made: the
    /// pin stays, and the caller fetches the blob again. May wait for an fsync.
    pub fn pin_blob(&self, held: &BlobPin) -> Result<bool, CacheError> {
        let pins = self.dir.join(format!("v{LAYOUT_VERSION}")).join("pins");
        self.blobs.keep(&held.sha).map_err(io_err(&pins))
    }

    /// Removes a blob's pin (true when there was one); the blob is then evicted like
    /// any other (at once when the cache is over its limit and nothing holds it open).
    pub fn unpin_blob(&self, sha: &Sha512) -> Result<bool, CacheError> {
        let pins = self.dir.join(format!("v{LAYOUT_VERSION}")).join("pins");
        self.blobs.unkeep(sha).map_err(io_err(&pins))
    }

    /// Whether the blob is pinned (by any process; present in the cache or not).
    pub fn is_pinned(&self, sha: &Sha512) -> bool {
        self.blobs.pins.contains(sha)
    }

    /// Every pinned blob (by any process; present in the cache or not).
    pub fn pinned(&self) -> Vec<Sha512> {
        let mut all: Vec<Sha512> = self.blobs.pins.read_all().into_iter().collect();
        all.sort();
        all
    }

    /// Bytes of the pinned blobs present in the cache (counted in `usage` too).
    pub fn pinned_bytes(&self) -> u64 {
        self.blobs.kept_bytes()
    }

    /// (bytes used by blobs, limit, number of blobs)
    pub fn usage(&self) -> (u64, u64, usize) {
        self.blobs.usage()
    }

    /// Re-hashes every blob and removes the ones that do not match their name.
    pub fn fsck(&self) -> Result<FsckReport, CacheError> {
        self.blobs.fsck()
    }

    pub fn size_of(&self, sha: &Sha512) -> Option<u64> {
        self.tables.size_of(sha)
    }

    pub fn record_size(&self, sha: &Sha512, size: u64) {
        self.tables.record_size(sha, size)
    }

    pub fn known_keys(&self) -> Vec<String> {
        self.tables.known_keys()
    }

    /// Adds a key to the known keys (saved at once).
    pub fn add_known_key(&self, key: &str) {
        self.tables.add_known_key(key)
    }

    /// When this machine first saw `sha` under `key` (recorded now if never).
    pub fn first_seen(&self, key: &str, sha: &Sha512) -> SystemTime {
        self.tables.first_seen(key, sha)
    }

    /// The last shadir answer stored for `key`: when it was fetched, and the body
    /// (`None` for a 404).
    pub fn dir_answer(&self, key: &str) -> Option<(SystemTime, Option<Vec<u8>>)> {
        self.tables.dir_answer(key)
    }

    /// Stores a shadir answer for `key` (`None` for a 404), fetched now; saved at once.
    pub fn store_dir_answer(&self, key: &str, body: Option<&[u8]>) {
        self.tables.store_dir_answer(key, body)
    }

    /// See [`Tables::mark_dir_answer_stale`](tables::Tables::mark_dir_answer_stale).
    pub fn mark_dir_answer_stale(&self, key: &str) {
        self.tables.mark_dir_answer_stale(key)
    }

    /// Writes the in-memory tables to disk (atomically). Also done at most a minute
    /// after a change, and when the cache is dropped.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.tables.flush()
    }
}
