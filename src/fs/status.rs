//! What `shacachefs status MOUNTPOINT` shows, served by the running daemon as the root's
//! `user.shacachefs.status` extended attribute (JSON): no socket, and only the mount's
//! owner (or whoever can read the mount) can ask.

use super::Core;
use crate::digest::Sha512;
use crate::remote::redact_url;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The name of the attribute.
pub const STATUS_XATTR: &str = "user.shacachefs.status";

impl Core {
    /// The status document. Asks each service once (bounded by 3 s) whether it answers.
    pub async fn status(self: &Arc<Self>) -> Value {
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
        let (dir_state, cache_state) = tokio::join!(probe_dir, probe_cache);
        let (used, limit, blobs) = self.cache.usage();
        let s = &self.stats;
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
        })
    }
}
