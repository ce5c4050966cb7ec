//! Blobs as the tree needs them: sizes (the cache, the size table, or one probe per
//! blob, many at once for a new listing) and verified local copies (one download per
//! blob however many openers, room in the cache reserved as bytes arrive). Unverified
//! bytes never enter the cache (only a `VerifiedFile` can) and are never served.

use super::listings::return_freed_memory_after;
use super::transfers::{Direction, Subject, Transfer};
use super::{lock, Core, FsError, KeyListing};
use crate::cache::BlobPin;
use crate::digest::{Sha512, VerifiedFile};
use crate::remote::{Probe, RemoteError};
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

impl Core {
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

    /// Starts size probes for every blob of a listing whose size is not known yet, in
    /// the listing's (name) order, which is the order `readdirplus` asks for them, and
    /// `probe_concurrency` at a time from one task: a lookup of another name waits
    /// behind the probes in flight, not behind every probe of the listing.
    pub(super) fn prefetch_sizes(self: &Arc<Self>, listing: &KeyListing) {
        let mut seen = HashSet::new();
        let unknown: Vec<Sha512> = listing
            .files
            .values()
            .map(|f| f.entry.info.sha512)
            .filter(|s| self.cache.size_of(s).is_none() && seen.insert(*s))
            .collect();
        if unknown.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let width = Arc::new(tokio::sync::Semaphore::new(
            self.opts.probe_concurrency.max(1),
        ));
        let core = self.clone();
        let (count, all) = (unknown.len(), width.available_permits());
        rt.spawn(async move {
            for sha in unknown {
                let Ok(permit) = width.clone().acquire_owned().await else {
                    return;
                };
                let core = core.clone();
                tokio::spawn(async move {
                    if let Err(e) = core.blob_size(&sha).await {
                        tracing::debug!("size of {}: {e}", sha.short(16));
                    }
                    drop(permit);
                });
            }
            // Thousands of requests leave their buffers freed in the heap: handed back.
            if width.acquire_many(all as u32).await.is_ok() {
                return_freed_memory_after(count);
            }
        });
    }

    pub(super) async fn entry_size(
        &self,
        key: &str,
        name: &str,
        sha: &Sha512,
    ) -> Result<u64, FsError> {
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
    pub(super) async fn cached_or_fetched(
        &self,
        sha: &Sha512,
        subject: Subject,
    ) -> Result<(Arc<File>, u64, BlobPin), FsError> {
        let what = &subject.to_string();
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
        let transfer = self.transfers.start(Direction::Download, subject, hint);
        let result = self.download(sha, what, &room, &transfer).await;
        drop(transfer);
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
    pub(super) async fn download(
        &self,
        sha: &Sha512,
        what: &str,
        room: crate::remote::Room<'_>,
        transfer: &Transfer,
    ) -> Result<VerifiedFile, FsError> {
        let started = Instant::now();
        let progress = |done: u64, total: Option<u64>| {
            transfer.progress(done, total);
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
                self.stats.verify_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!("{what}: downloaded content does not match twice: {e}");
                Err(e.into())
            }
            Err(e) => {
                tracing::error!("{what}: download failed: {e}");
                Err(e.into())
            }
        }
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends; the bytes read.
/// Grows a download's reservation (see [`crate::cache::Reservation::ensure`]); the
/// cache's `NoSpace` becomes an `ENOSPC` I/O error, which ends the download.
pub(crate) fn room_in(
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
