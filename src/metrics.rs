//! `--metrics-listen [ADDR:]PORT` of `mount` and `serve`: Prometheus text exposition
//! (format 0.0.4, written by the `prometheus-client` crate) at `GET /metrics`, on a
//! listener of its own (hyper, HTTP/1), apart from FUSE and from the server's port.
//!
//! The values are read at scrape time from the counters the program keeps anyway
//! (`fs::Stats`, the cache's usage, the transfers in flight, the server's own counters):
//! nothing is counted twice. A bare PORT binds 127.0.0.1: metrics stay on the machine
//! unless an address is given.
//!
//! This module knows the mount's core (its collector) and HTTP; the server's counters
//! live in `server::metrics`, which knows nothing of this module.

use crate::fs::Core;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Parses `[ADDR:]PORT`: a bare port binds 127.0.0.1; `0.0.0.0:9100`, `[::1]:9100`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse::<SocketAddr>()
        .map_err(|_| format!("not [ADDR:]PORT (e.g. 9100, 127.0.0.1:9100, [::1]:9100): {s:?}"))
}

/// Renders the exposition text on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A render function over a registry.
pub fn render_registry(registry: Registry) -> Render {
    Arc::new(move || {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            tracing::warn!("encoding the metrics: {e}");
        }
        out
    })
}

/// A request's headers must arrive within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `addr` and serves `/metrics` in a task until the runtime ends; the bound
/// address is returned (so `:0` can be used in tests).
pub async fn start(addr: SocketAddr, render: Render) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tracing::info!("metrics on http://{bound}/metrics");
    tokio::spawn(serve(listener, render));
    Ok(bound)
}

async fn serve(listener: TcpListener, render: Render) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&req, &render)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service);
            if let Err(e) = conn.await {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

fn answer<B>(req: &Request<B>, render: &Render) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let (status, body, content_type) = match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            render(),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET /metrics\n".to_string(),
            "text/plain",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "metrics are at /metrics\n".to_string(),
            "text/plain",
        ),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The registry of a mount: everything read from `core` at scrape time, plus the
/// publish latency histogram the core keeps.
pub fn mount_registry(core: Arc<Core>) -> Registry {
    let mut registry = Registry::with_prefix("shacachefs");
    registry.register(
        "publish_seconds",
        "Seconds from the start of a publish (close of a written file) to its entry being published",
        core.stats.publish_seconds.0.clone(),
    );
    registry.register_collector(Box::new(MountCollector(core)));
    registry
}

struct MountCollector(Arc<Core>);

impl std::fmt::Debug for MountCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MountCollector")
    }
}

impl Collector for MountCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let core = &self.0;
        let s = &core.stats;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut enc,
            "cache_hits",
            "Opens served from the cache",
            get(&s.cache_hits),
        )?;
        counter(
            &mut enc,
            "cache_misses",
            "Opens that needed a download",
            get(&s.cache_misses),
        )?;
        counter(
            &mut enc,
            "fetched_bytes",
            "Blob bytes downloaded and verified",
            get(&s.bytes_fetched),
        )?;
        counter(
            &mut enc,
            "uploaded_bytes",
            "Blob bytes uploaded by publishes",
            get(&s.bytes_uploaded),
        )?;
        counter(
            &mut enc,
            "published_entries",
            "Entries published through the mount",
            get(&s.published),
        )?;
        counter(
            &mut enc,
            "verification_failures",
            "Downloads whose content did not match its SHA-512 (after a fresh second attempt)",
            get(&s.verify_failures),
        )?;
        let (down, up) = core.transfers.counts();
        let mut m = enc.encode_descriptor(
            "transfers_in_flight",
            "Downloads and uploads running",
            None,
            MetricType::Gauge,
        )?;
        for (dir, n) in [("download", down), ("upload", up)] {
            ConstGauge::new(n as i64).encode(m.encode_family(&[("direction", dir)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "shadir_requests",
            "shadir requests by outcome (unreachable: network error, timeout or 5xx)",
            None,
            MetricType::Counter,
        )?;
        for (outcome, a) in [
            ("found", &s.dir_found),
            ("missing", &s.dir_missing),
            ("unreachable", &s.dir_unreachable),
            ("error", &s.dir_failed),
        ] {
            ConstCounter::new(get(a)).encode(m.encode_family(&[("outcome", outcome)])?)?;
        }
        gauge(
            &mut enc,
            "hidden_entries",
            "Distinct untrusted entries hidden from the listings built so far",
            core.hidden_count() as i64,
        )?;
        gauge(
            &mut enc,
            "outbox_pending",
            "Files written here and not published yet",
            core.pending_count() as i64,
        )?;
        let (used, limit, blobs) = core.cache().usage();
        gauge(
            &mut enc,
            "cache_used_bytes",
            "Blob bytes in the cache",
            used as i64,
        )?;
        gauge(
            &mut enc,
            "cache_limit_bytes",
            "The cache's size limit (--cache-size)",
            limit as i64,
        )?;
        gauge(&mut enc, "cache_blobs", "Blobs in the cache", blobs as i64)?;
        gauge(
            &mut enc,
            "cache_pinned_bytes",
            "Bytes of pinned blobs (never evicted)",
            core.cache().pinned_bytes() as i64,
        )?;
        Ok(())
    }
}

/// One counter without labels (the encoder adds `_total`).
pub fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    let m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

/// One gauge without labels.
pub fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("9100").unwrap(),
            "127.0.0.1:9100".parse().unwrap()
        );
        assert_eq!(
            parse_listen("0.0.0.0:9100").unwrap(),
            "0.0.0.0:9100".parse().unwrap()
        );
        assert_eq!(
            parse_listen("[::1]:9100").unwrap(),
            "[::1]:9100".parse().unwrap()
        );
        assert!(parse_listen("localhost").is_err());
        assert!(parse_listen("70000").is_err());
    }

    #[test]
    fn not_found_and_exposition() {
        let render: Render = Arc::new(|| "x 1\n".to_string());
        let req = |m: Method, p: &str| Request::builder().method(m).uri(p).body(()).unwrap();
        let r = answer(&req(Method::GET, "/metrics"), &render);
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        assert_eq!(answer(&req(Method::GET, "/"), &render).status(), 404);
        assert_eq!(
            answer(&req(Method::POST, "/metrics"), &render).status(),
            405
        );
    }
}
