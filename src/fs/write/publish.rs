//! Publishing a staged item on frozen bytes (hash, blob, signed entry; the early
//! upload awaited or given up), what a publish changes in the mount (cache, listing,
//! kernel), the retries, and the count of publishes in flight that unmounting waits
//! for.

use super::super::{lock, Core, FsError, Node};
use super::staging::{EarlyUpload, Phase, Staging};
use crate::digest::{adopt_hashed, Sha512};
use crate::fs::listings::is_offline;
use crate::fs::transfers::{Direction, Subject};
use crate::growing::Growing;
use crate::naming::KEY_RESERVED;
use crate::publish::{publish, PublishError};
use crate::remote::{await_sent, Probe, RemoteError, SendWait};
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Counts a write-side task (a flush's or release's publish) from the moment the FUSE
/// request arrives until it ends, so that unmounting waits for it.
pub struct Busy(Arc<Core>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Core {
    /// Marks a write-side task in flight (taken on the session thread, before the
    /// task is spawned, so that none is missed); see [`Core::settle`].
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// After the session ended (unmount, SIGTERM): waits, at most `limit`, for the
    /// publishes in flight and the releases queued. What is left stays pending in the
    /// outbox, reported at the next mount. Returns how many were still running.
    pub async fn settle(&self, limit: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        let mut said = false;
        loop {
            let n = self.busy.load(Ordering::Acquire);
            if n == 0 || tokio::time::Instant::now() >= deadline {
                if n > 0 {
                    tracing::warn!(
                        "{n} publish(es) still running after {limit:?}: left pending in the outbox"
                    );
                }
                return n;
            }
            if !said {
                tracing::info!("waiting for {n} publish(es) in flight before exiting");
                said = true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Starts sending a staged file that is being written in order while the rest is
    /// still to come (the upload then reads the file as it grows).
    pub(super) fn start_early_upload(&self, st: &mut Staging, id: &str, len: u64) {
        if st.early_off || st.early.contains_key(id) {
            return;
        }
        let (Some(rt), Some(outbox)) = (st.runtime.clone(), self.outbox.as_ref()) else {
            return;
        };
        let file = match File::open(outbox.data_path(id)) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("outbox item {id}: no early upload: {e}");
                return;
            }
        };
        let growing = Arc::new(Growing::default());
        growing.grow(len);
        let subject = match st.items.get(id) {
            Some(i) => Subject::entry(&i.key, &i.name),
            None => Subject::entry("", id),
        };
        let transfer = self.transfers.start_growing(subject, growing.clone());
        let remote = self.client.store.clone();
        let g = growing.clone();
        let task = rt.spawn(async move { remote.post_growing(g, file).await });
        self.stats.early_started.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("outbox item {id}: upload started while the file is written");
        st.early.insert(
            id.to_string(),
            EarlyUpload {
                growing,
                task,
                transfer,
            },
        );
    }

    /// Waits for the early upload of `id` (now complete at `len` bytes): `Some(true)`
    /// when it stored the blob `sha`, `Some(false)` when shacache turned out to have it
    /// already (asked at close when bytes were still to send: the rest is not sent),
    /// `None` after any failure (abandoned, refused, stalled, another hash), logged; the
    /// caller then sends the file again.
    pub(super) async fn finish_early_upload(
        &self,
        early: EarlyUpload,
        sha: &Sha512,
        len: u64,
    ) -> Option<bool> {
        let EarlyUpload {
            growing,
            mut task,
            transfer: _transfer,
        } = early;
        if !growing.finish(len) {
            task.abort();
            return None;
        }
        let sent = growing.sent();
        tracing::debug!("closed at {len} bytes, {sent} already sent: waiting for the upload");
        if sent < len {
            // The hash is known now: a blob shacache already has need not be sent on.
            let probe = self
                .client
                .store
                .probe_blob(sha, self.cache.tmp_dir(), &crate::remote::unbounded)
                .await;
            if let Ok(Probe::Size(_) | Probe::Fetched(_)) = probe {
                task.abort();
                growing.abandon();
                tracing::debug!("shacache already has {}: upload stopped", sha.short(16));
                return Some(false);
            }
        }
        let waited = await_sent(
            &mut task,
            || growing.sent(),
            len,
            self.client.store.limits(),
            |_| {},
        )
        .await;
        let result = match waited {
            Ok(r) => r,
            Err(why) => {
                task.abort();
                let why = match why {
                    SendWait::Stalled(n) => format!("stalled after {n} of {len} bytes"),
                    SendWait::NoAnswer => format!("no answer after all {len} bytes"),
                };
                tracing::info!("upload while writing {why}; sending again");
                return None;
            }
        };
        match result {
            Ok(Ok(theirs)) if theirs == *sha => Some(true),
            Ok(Ok(theirs)) => {
                tracing::warn!(
                    "the server stored the upload as {} where {} was written; sending again",
                    theirs.short(16),
                    sha.short(16)
                );
                None
            }
            Ok(Err(e)) => {
                // A server that answers (rather than a dropped or idle connection, or
                // a passing 5xx or 429) but will not take a body without a length is
                // asked no more.
                let refused = match &e {
                    RemoteError::Status { status, .. } => {
                        (400..500).contains(status) && *status != 408 && *status != 429
                    }
                    RemoteError::Protocol { .. }
                    | RemoteError::NotFound { .. }
                    | RemoteError::Refused { .. } => true,
                    _ => false,
                };
                let mut st = lock(&self.staging);
                if !refused {
                    tracing::info!("upload while writing failed ({e}); sending again");
                } else if !st.early_off {
                    st.early_off = true;
                    tracing::info!(
                        "upload while writing failed ({e}); files are sent when closed from now on"
                    );
                }
                None
            }
            Err(e) => {
                tracing::debug!("early upload task: {e}");
                None
            }
        }
    }

    /// Publishes a staged item; on success its bytes move into the cache.
    pub(super) async fn publish_staged(self: &Arc<Self>, id: &str) -> Result<(), FsError> {
        let started = tokio::time::Instant::now();
        let outbox = self.writable_outbox()?.clone();
        let Some(info) = lock(&self.staging).items.get(id).cloned() else {
            return Ok(());
        };
        // One publish at a time; then nothing changes the bytes until it is over.
        let _one = info.publishing.clone().lock_owned().await;
        let frozen = info.freeze.clone().write_owned().await;
        // Whoever published before us may have covered everything.
        let Some(info) = lock(&self.staging).items.get(id).cloned() else {
            return Ok(());
        };
        if let Phase::Incomplete { why, cause } = &info.phase {
            tracing::error!(
                "key {}: {}: not published: {why} (the staged file is kept at {}; write it again, or `shacachefs outbox drop {id}`)",
                info.key,
                info.name,
                outbox.data_path(id).display()
            );
            return Err(FsError::Incomplete(cause.clone()));
        }
        let (seq, early) = {
            let mut st = lock(&self.staging);
            (st.seq.0.remove(id), st.early.remove(id))
        };
        let known = match seq {
            // Hashed as written: only a hashing thread (big files) is waited for off
            // the runtime.
            Some(h) if h.is_inline() => {
                let len = h.len();
                h.finish().ok().map(|sha| (sha, len))
            }
            Some(h) => {
                let len = h.len();
                tokio::task::spawn_blocking(move || h.finish())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|sha| (sha, len))
            }
            None => None,
        };
        let had_early = early.is_some();
        let blob = match (early, &known) {
            (Some(e), Some((sha, len))) => self.finish_early_upload(e, sha, *len).await,
            (Some(e), None) => {
                e.growing.abandon();
                e.task.abort();
                None
            }
            (None, _) => None,
        };
        if had_early {
            let counter = if blob.is_some() {
                &self.stats.early_used
            } else {
                &self.stats.early_resent
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let transfer = self.transfers.start(
            Direction::Upload,
            Subject::entry(&info.key, &info.name),
            known.map(|(_, len)| len),
        );
        if let (Some(_), Some((_, len))) = (blob, known) {
            // The blob went up while the file was written (or shacache had it).
            transfer.progress(len, Some(len));
        }
        let progress = |done: u64, total: Option<u64>| transfer.progress(done, total);
        let published = if self.known_unreachable() {
            // No connect timeout per file while the servers are known to be away.
            Err(PublishError::Remote(RemoteError::Network {
                url: "shacache/shadir".into(),
                message: "unreachable a moment ago; kept in the outbox until they answer".into(),
            }))
        } else {
            publish(&self.client, &outbox, id, known, blob, &progress).await
        };
        drop(transfer);
        match &published {
            Ok(_) => self.mark_reachable(),
            Err(PublishError::Remote(r)) if is_offline(r) => self.mark_unreachable(r),
            Err(_) => {}
        }
        match published {
            Ok(p) => {
                // Before the data moves into the cache: the staged inode's attributes
                // are then answered for the published entry, never "not found".
                lock(&self.staging).published.insert(
                    id.to_string(),
                    (p.key.clone(), p.name.clone(), p.sha, p.len),
                );
                let data = outbox.data_path(id);
                let kept = adopt_hashed(data, p.sha, p.len)
                    .map_err(|e| e.to_string())
                    .and_then(|v| self.cache.insert_blob(v).map_err(|e| e.to_string()));
                if let Err(e) = kept {
                    tracing::warn!(
                        "key {}: {}: published, but not kept in the cache: {e}",
                        p.key,
                        p.name
                    );
                }
                self.cache.record_size(&p.sha, p.len);
                self.cache.add_known_key(&p.key);
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .publish_seconds
                    .0
                    .observe(started.elapsed().as_secs_f64());
                if p.uploaded {
                    self.stats
                        .bytes_uploaded
                        .fetch_add(p.len, Ordering::Relaxed);
                }
                let _ = outbox.retire(id);
                lock(&self.staging).remove(id);
                // Writers waiting on the freeze now move to a new version.
                drop(frozen);
                // Show the new entry at once (added to the listing in memory), then
                // make the kernel forget what it cached under that name.
                self.insert_published(&p.key, p.entry.clone()).await;
                tracing::info!(
                    "key {}: {} published ({} bytes, sha512 {}{})",
                    p.key,
                    p.name,
                    p.len,
                    p.sha.short(16),
                    if p.uploaded {
                        ""
                    } else {
                        ", blob already in shacache"
                    }
                );
                self.invalidate(&p.key, &p.name);
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(
                    "key {}: {}: upload failed: {msg}; the file is kept in the outbox at {} (shacachefs outbox list / retry)",
                    info.key,
                    info.name,
                    outbox.data_path(id).display()
                );
                if let Some(i) = lock(&self.staging).items.get_mut(id) {
                    i.last_error = Some(msg);
                    i.phase = i.phase.failed();
                }
                Err(FsError::Publish(e))
            }
        }
    }

    /// Tells the kernel to forget a name (queued: never inside the request that caused
    /// it, since the kernel may hold the directory's lock until we answer).
    pub(super) fn invalidate(self: &Arc<Self>, key: &str, name: &str) {
        let parent = self.ino(&Node::Key(key.to_string()));
        self.notify(crate::fs::Notice::Entry {
            parent,
            name: crate::naming::escape(name, KEY_RESERVED),
        });
    }

    /// Publishes every pending item that no handle has open (`--retry-uploads`).
    /// Returns (published, failed).
    pub async fn retry_pending(self: &Arc<Self>) -> (usize, usize) {
        // Items a handle has open are left to that handle's close.
        let ids: Vec<String> = lock(&self.staging)
            .items
            .iter()
            .filter(|(_, i)| i.on_retry() && i.open_count() == 0)
            .map(|(id, _)| id.clone())
            .collect();
        let (mut ok, mut failed) = (0, 0);
        // A round asks the servers again (a failure as unreachable makes the rest of the
        // round fail at once: one timeout per round, not one per file).
        self.recheck_reachability();
        for id in ids {
            // An item another process (a second mount) has open for writing is left
            // alone; the claim keeps it from being opened for writing meanwhile.
            let claim = match self.outbox.as_ref().map(|o| o.claim(&id)) {
                Some(Ok(None)) => {
                    tracing::info!(
                        "outbox item {id}: open for writing by another process: left alone"
                    );
                    continue;
                }
                Some(Ok(Some(c))) => Some(c),
                Some(Err(e)) => {
                    tracing::debug!("outbox item {id}: {e}");
                    None
                }
                None => None,
            };
            match self.publish_staged(&id).await {
                Ok(()) => ok += 1,
                Err(_) => failed += 1,
            }
            drop(claim);
        }
        (ok, failed)
    }
}
