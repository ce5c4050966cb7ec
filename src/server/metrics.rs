//! The server's counters for `serve --metrics-listen`: requests by method and status,
//! bytes in and out (counted on the connection's stream, TLS and headers included),
//! uploads refused, and the store's size (its blobs, measured at most every
//! [`STORE_SIZE_EVERY`] at scrape time, on a blocking thread's walk of `shacache/`).
//!
//! Exposition (HTTP, the format) is the caller's (`crate::metrics`); this module only
//! counts and describes, through `prometheus-client`'s `Collector`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The store's size is measured at most this often.
pub const STORE_SIZE_EVERY: Duration = Duration::from_secs(30);

/// Counters of one server.
#[derive(Debug, Default)]
pub struct ServerMetrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    uploads_refused: AtomicU64,
    root: OnceLock<PathBuf>,
    store_size: Mutex<Option<(Instant, u64, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ServerMetrics {
    pub(crate) fn set_root(&self, root: &Path) {
        let _ = self.root.set(root.to_path_buf());
    }

    /// Counts one answered request. An upload (POST, PUT) answered with a redirect
    /// (to a login) or a 4xx (no credentials, too many uploads, invalid) is refused.
    pub(crate) fn request(&self, method: &hyper::Method, status: u16) {
        let name = match *method {
            hyper::Method::GET => "GET",
            hyper::Method::HEAD => "HEAD",
            hyper::Method::POST => "POST",
            hyper::Method::PUT => "PUT",
            _ => "other",
        };
        *lock(&self.requests)
            .entry((name.to_string(), status))
            .or_default() += 1;
        let upload = matches!(*method, hyper::Method::POST | hyper::Method::PUT);
        if upload && (300..500).contains(&status) {
            self.uploads_refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests answered with this method and status so far.
    pub fn requests(&self, method: &str, status: u16) -> u64 {
        lock(&self.requests)
            .get(&(method.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    /// (blob bytes, blobs) in the store, measured at most every [`STORE_SIZE_EVERY`].
    fn store_size(&self) -> (u64, u64) {
        let mut last = lock(&self.store_size);
        if let Some((at, bytes, blobs)) = *last {
            if at.elapsed() < STORE_SIZE_EVERY {
                return (bytes, blobs);
            }
        }
        let (bytes, blobs) = match self.root.get() {
            Some(root) => measure(&root.join(super::store::CACHE_DIR)),
            None => (0, 0),
        };
        *last = Some((Instant::now(), bytes, blobs));
        (bytes, blobs)
    }

    /// The registry to expose (`shacachefs_server_…`).
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::with_prefix("shacachefs_server");
        registry.register_collector(Box::new(self.clone()));
        registry
    }
}

/// Bytes and files under `shacache/` (two levels: `ab/abcdef…`); temporary files
/// (`.tmp-*`) are not blobs.
fn measure(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut blobs) = (0, 0);
    let Ok(shards) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    for shard in shards.flatten() {
        let Ok(files) = std::fs::read_dir(shard.path()) else {
            continue;
        };
        for f in files.flatten() {
            if f.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if let Ok(m) = f.metadata() {
                if m.is_file() {
                    bytes += m.len();
                    blobs += 1;
                }
            }
        }
    }
    (bytes, blobs)
}

impl Collector for ServerMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let requests = lock(&self.requests).clone();
        let mut m = enc.encode_descriptor(
            "requests",
            "Requests answered, by method and status",
            None,
            MetricType::Counter,
        )?;
        for ((method, status), n) in &requests {
            let status = status.to_string();
            let labels = [("method", method.as_str()), ("status", status.as_str())];
            ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
        }
        let counters = [
            (
                "received_bytes",
                "Bytes received on client connections",
                &self.bytes_in,
            ),
            (
                "sent_bytes",
                "Bytes sent on client connections",
                &self.bytes_out,
            ),
            (
                "uploads_refused",
                "Uploads (POST, PUT) refused: no credentials, too many at once, invalid",
                &self.uploads_refused,
            ),
        ];
        for (name, help, a) in counters {
            let c = ConstCounter::new(a.load(Ordering::Relaxed));
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        // A scrape runs on a runtime's worker: the walk of the store tells the runtime
        // it blocks (possible on a multi-threaded runtime only).
        let flavor = tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor());
        let (bytes, blobs) = match flavor {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.store_size())
            }
            _ => self.store_size(),
        };
        for (name, help, v) in [
            ("store_bytes", "Blob bytes in the store", bytes),
            ("store_blobs", "Blobs in the store", blobs),
        ] {
            let g = ConstGauge::new(v as i64);
            g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// A connection's stream with its bytes counted into the server's metrics.
pub(crate) struct Counted<S> {
    inner: S,
    metrics: Arc<ServerMetrics>,
}

impl<S> Counted<S> {
    pub(crate) fn new(inner: S, metrics: Arc<ServerMetrics>) -> Self {
        Counted { inner, metrics }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let got = buf.filled().len().saturating_sub(before) as u64;
        this.metrics.bytes_in.fetch_add(got, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            this.metrics
                .bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            this.metrics
                .bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refusals_and_store_size() {
        let dir = tempfile::tempdir().unwrap();
        let shard = dir.path().join(super::super::store::CACHE_DIR).join("ab");
        std::fs::create_dir_all(&shard).unwrap();
        std::fs::write(shard.join("ab01"), b"12345").unwrap();
        std::fs::write(shard.join(".tmp-x"), b"123").unwrap();
        let m = Arc::new(ServerMetrics::default());
        m.set_root(dir.path());
        m.request(&hyper::Method::GET, 200);
        m.request(&hyper::Method::GET, 200);
        m.request(&hyper::Method::POST, 429);
        m.request(&hyper::Method::PUT, 201);
        assert_eq!(m.requests("GET", 200), 2);
        assert_eq!(m.uploads_refused.load(Ordering::Relaxed), 1);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &m.registry()).unwrap();
        for line in [
            "shacachefs_server_requests_total{method=\"GET\",status=\"200\"} 2",
            "shacachefs_server_requests_total{method=\"POST\",status=\"429\"} 1",
            "shacachefs_server_uploads_refused_total 1",
            "shacachefs_server_store_bytes 5",
            "shacachefs_server_store_blobs 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
    }
}
