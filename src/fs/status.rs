//! What `shacachefs status MOUNTPOINT` shows, served by the running daemon as the root's
//! `user.shacachefs.status` extended attribute (JSON): no socket, and only the mount's
//! owner (or whoever can read the mount) can ask.
//!
//! Reading it often (`status --watch` redraws every second) costs no server request per
//! read: whether shadir and shacache answer is probed at most every [`PROBE_EVERY`]; a
//! read in between reuses the last probe's result, with its age (`probed_secs_ago`).
//! Concurrent readers wait for one probe rather than each sending their own.

use super::Core;
use crate::digest::Sha512;
use crate::remote::redact_url;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The name of the attribute.
pub const STATUS_XATTR: &str = "user.shacachefs.status";

/// The reachability probes are sent at most this often.
pub const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Transfers listed at most (oldest first): an extended attribute's value is at most
/// 64 KiB; the rest are counted (`transfers_not_listed`).
pub const MAX_LISTED: usize = 64;

/// The last probe's answers.
pub(super) struct Probed {
    at: tokio::time::Instant,
    shadir: Value,
    shacache: Value,
}

impl Core {
    /// The status document: counters, transfers in flight, and whether each service
    /// answers (probed at most every [`PROBE_EVERY`], bounded by 3 s).
    pub async fn status(self: &Arc<Self>) -> Value {
        let (dir_state, cache_state, probed_ago) = {
            let mut last = self.probed.lock().await;
            let fresh = last
                .as_ref()
                .filter(|p| p.at.elapsed() < PROBE_EVERY)
                .is_some();
            if !fresh {
                let (shadir, shacache) = self.probe_services().await;
                *last = Some(Probed {
                    at: tokio::time::Instant::now(),
                    shadir,
                    shacache,
                });
            }
            match last.as_ref() {
                Some(p) => (
                    p.shadir.clone(),
                    p.shacache.clone(),
                    p.at.elapsed().as_secs_f64(),
                ),
                None => (Value::Null, Value::Null, 0.0),
            }
        };
        self.status_document(dir_state, cache_state, probed_ago)
    }

    /// Asks each service once (bounded by 3 s) whether it answers.
    async fn probe_services(&self) -> (Value, Value) {
        let remote = &self.client.store;
        let probe_dir = async {
            match tokio::time::timeout(
                Duration::from_secs(3),
                remote.get_dir("shacachefs-status-probe"),
            )
            .await
            {
                Ok(Ok(_)) => json!("answers"),
                Ok(Err(e)) => json!(format!("error: {e}")),
                Err(_) => json!("no answer within 3 s"),
            }
        };
        let empty = Sha512::of(b"");
        let probe_cache = async {
            match tokio::time::timeout(
                Duration::from_secs(3),
                remote.probe_blob(&empty, self.cache.tmp_dir(), &crate::remote::unbounded),
            )
            .await
            {
                Ok(Ok(_)) => json!("answers"),
                Ok(Err(e)) => json!(format!("error: {e}")),
                Err(_) => json!("no answer within 3 s"),
            }
        };
        tokio::join!(probe_dir, probe_cache)
    }

    fn status_document(&self, dir_state: Value, cache_state: Value, probed_ago: f64) -> Value {
        let (used, limit, blobs) = self.cache.usage();
        let s = &self.stats;
        let mut transfers = self.transfers.list();
        let not_listed = transfers.len().saturating_sub(MAX_LISTED);
        transfers.truncate(MAX_LISTED);
        let servers: Vec<Value> = self
            .opts
            .servers
            .iter()
            .map(|(role, url)| json!({"role": role, "url": redact_url(url)}))
            .collect();
        json!({
            "servers": servers,
            "shadir": dir_state,
            "shacache": cache_state,
            "probed_secs_ago": (probed_ago * 10.0).round() / 10.0,
            "signature_mode": self.signature_mode(),
            "writable": self.opts.writable,
            "passthrough": s.passthrough.load(Ordering::Relaxed),
            "cache": {"dir": self.cache.dir(), "used_bytes": used, "limit_bytes": limit, "blobs": blobs,
                      "pinned_bytes": self.cache.pinned_bytes()},
            "hits": s.cache_hits.load(Ordering::Relaxed),
            "misses": s.cache_misses.load(Ordering::Relaxed),
            "downloads_in_flight": s.downloads_in_flight.load(Ordering::Relaxed),
            "bytes_fetched": s.bytes_fetched.load(Ordering::Relaxed),
            "bytes_uploaded": s.bytes_uploaded.load(Ordering::Relaxed),
            "entries_published": s.published.load(Ordering::Relaxed),
            "uploads_while_writing": {
                "started": s.early_started.load(Ordering::Relaxed),
                "used": s.early_used.load(Ordering::Relaxed),
                "sent_again": s.early_resent.load(Ordering::Relaxed),
            },
            "shadir_requests": s.dir_requests.load(Ordering::Relaxed),
            "directory_listings": s.dir_listings.load(Ordering::Relaxed),
            "lookups": s.lookups.load(Ordering::Relaxed),
            "signature_verifications": self.client.verifier.verifications(),
            "size_probes": s.probes.load(Ordering::Relaxed),
            "outbox_pending": self.pending_count(),
            "verification_failures": s.verify_failures.load(Ordering::Relaxed),
            "hidden_entries": self.hidden_count(),
            "transfers": transfers,
            "transfers_not_listed": not_listed,
        })
    }
}

impl Core {
    /// Distinct entries hidden (untrusted: unsigned, or signed by no configured
    /// certificate) among the listings this mount has built.
    pub fn hidden_count(&self) -> usize {
        super::lock(&self.logged_hidden).len()
    }
}
