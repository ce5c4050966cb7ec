//! The HTTP client for shacache and shadir: pooled connections (reqwest + rustls), the
//! protocol's status-code rules, resume with `Range`, bounded retries with backoff,
//! connect and low-speed timeouts, and errors that name the URL (never its password).
//!
//! Files: `http.rs` (credentials, redaction, status rules, retries), `tls.rs` (rustls
//! set-up), `identity.rs` (our client certificate and key as configured: X.509 v1, RSA
//! keys of any size), `proxy.rs` (proxies from the environment), `dir.rs` (shadir GET/PUT),
//! `probe.rs` (HEAD and its ranged-GET fallback), `fetch.rs` (resumable download),
//! `upload.rs` (streamed POST).
//!
//! Semantics every call shares:
//! - Redirects are never followed. A 3xx, 401, 403 or 407 is [`RemoteError::Refused`].
//! - Only 404 means "absent"; every other failure is an error.
//! - Transient failures (connection errors, timeouts, 5xx other than 501/505, 408, 429)
//!   are retried up to `limits.attempts` times with exponential backoff from
//!   `limits.backoff` (capped at 30 s); nothing else is retried.
//! - Every connection has `limits.connect_timeout`. Small requests (shadir GET/PUT, HEAD,
//!   the head of a ranged probe) have the whole-request deadline `limits.request_timeout`.
//!   Blob transfers have no total deadline but fail when no byte moves for
//!   `limits.low_speed_timeout`; the answer to an upload is awaited for
//!   `limits.upload_answer_timeout` once the body is sent.
//! - `user:password@` in a base URL is sent as HTTP Basic and shown nowhere.

// `RemoteError` is ~150 bytes because `Corrupt` carries two digests by value (part of the
// fixed interface). Errors are rare and never on a hot path, so the size is accepted here.
#![allow(clippy::result_large_err)]

mod dir;
mod fetch;
mod http;
mod identity;
mod probe;
mod proxy;
mod tls;
mod upload;

pub use http::redact_url;
pub use upload::SMALL_BLOB;
pub(crate) use upload::{await_sent, SendWait};

use crate::config::TlsFiles;
use crate::digest::{Sha512, VerifiedFile};
use crate::wire::{Listing, RawEntry};
use http::Endpoint;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Where the services are, and how to reach them.
#[derive(Debug, Clone, Default)]
pub struct RemoteConfig {
    pub download_cache_url: Option<String>,
    pub download_dir_url: Option<String>,
    pub upload_cache_url: Option<String>,
    pub upload_dir_url: Option<String>,
    pub shacache_tls: TlsFiles,
    pub shadir_tls: TlsFiles,
    pub limits: Limits,
}

/// Timeouts, retries and size bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// TCP + TLS connection set-up.
    pub connect_timeout: Duration,
    /// A transfer that makes no progress for this long fails (no FUSE request hangs).
    pub low_speed_timeout: Duration,
    /// Deadline for a whole small request (shadir GET/PUT, HEAD, POST answer wait
    /// excluded: the server hashes big uploads before it answers).
    pub request_timeout: Duration,
    /// How long to wait for the answer to a POST once its body is sent.
    pub upload_answer_timeout: Duration,
    /// Attempts per operation for transient failures (connection errors, timeouts,
    /// 5xx); 1 means no retry.
    pub attempts: u32,
    /// First backoff delay; doubled at each retry.
    pub backoff: Duration,
    /// Largest shadir body accepted.
    pub max_dir_body: u64,
    /// Deepest JSON nesting accepted in a shadir body.
    pub max_json_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(10),
            low_speed_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            upload_answer_timeout: Duration::from_secs(3600),
            attempts: 4,
            backoff: Duration::from_millis(250),
            max_dir_body: 64 << 20,
            max_json_depth: crate::wire::DEFAULT_MAX_DEPTH,
        }
    }
}

/// What a shadir `GET` found.
#[derive(Debug, Clone)]
pub enum DirListing {
    /// 404: the key was never written.
    Missing,
    /// 200 (possibly `[]`).
    Found(Listing),
}

/// What a size probe found.
#[derive(Debug)]
pub enum Probe {
    /// 404.
    Absent,
    /// The size, from HEAD or from a 206's `Content-Range`.
    Size(u64),
    /// The server ignored `Range` and sent the whole blob, which was read to the end and
    /// verified (keep it: it is the blob).
    Fetched(VerifiedFile),
}

/// Called with (bytes done, total when known) as a transfer progresses.
pub type Progress<'a> = &'a (dyn Fn(u64, Option<u64>) + Send + Sync);

/// Asked before each piece of a downloaded body is written: the file holds the first
/// argument's bytes and is about to hold the second's. An error ends the download with
/// that error (the cache's bound: the disk space it may use). Never given a size a
/// server announced in advance.
pub type Room<'a> = &'a (dyn Fn(u64, u64) -> std::io::Result<()> + Send + Sync);

/// A [`Room`] without bound.
pub fn unbounded(_have: u64, _to: u64) -> std::io::Result<()> {
    Ok(())
}

/// Every way a remote call fails. Messages name the URL with any password removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("no {0} configured")]
    NotConfigured(&'static str),
    #[error("{url}: not found (404)")]
    NotFound { url: String },
    #[error("{url}: refused: {status}{detail}")]
    Refused {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{url}: server error {status}{detail}")]
    Status {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{url}: {message}")]
    Network { url: String, message: String },
    #[error("{url}: timed out ({message})")]
    Timeout { url: String, message: String },
    #[error("{url}: blob content does not match its SHA-512 (expected {expected}, got {actual})")]
    Corrupt {
        url: String,
        expected: Sha512,
        actual: Sha512,
    },
    #[error("{url}: protocol violation: {message}")]
    Protocol { url: String, message: String },
    #[error("{url}: shadir answer over {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS set-up: {0}")]
    Tls(String),
}

/// The client. Cheap to clone (one shared connection pool per service).
#[derive(Clone)]
pub struct Remote {
    inner: Arc<Inner>,
}

struct Inner {
    /// shacache connections (its own TLS files).
    cache_client: reqwest::Client,
    /// shadir connections (its own TLS files).
    dir_client: reqwest::Client,
    download_cache: Option<Endpoint>,
    download_dir: Option<Endpoint>,
    upload_cache: Option<Endpoint>,
    upload_dir: Option<Endpoint>,
    limits: Limits,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.inner;
        f.debug_struct("Remote")
            .field("download_cache", &i.download_cache)
            .field("download_dir", &i.download_dir)
            .field("upload_cache", &i.upload_cache)
            .field("upload_dir", &i.upload_dir)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// Builds the client (loads TLS files, proxies from the environment).
    ///
    /// This is the one place outside `config` that reads environment variables:
    /// `http_proxy`, `https_proxy`, `no_proxy` (lower case first, then upper case), as
    /// every HTTP tool does. See [`Remote::new_with_env`].
    pub fn new(cfg: RemoteConfig) -> Result<Remote, RemoteError> {
        Self::new_with_env(cfg, |name| std::env::var(name).ok())
    }

    /// [`Remote::new`] with the proxy variables looked up through `env` instead of the
    /// process environment (tests, or a caller that wants no proxy: `|_| None`).
    ///
    /// Loopback hosts (`localhost`, `127.0.0.0/8`, `::1`) never go through a proxy.
    pub fn new_with_env(
        cfg: RemoteConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Remote, RemoteError> {
        let parse = |u: &Option<String>| u.as_deref().map(Endpoint::parse).transpose();
        let download_cache = parse(&cfg.download_cache_url)?;
        let download_dir = parse(&cfg.download_dir_url)?;
        let upload_cache = parse(&cfg.upload_cache_url)?;
        let upload_dir = parse(&cfg.upload_dir_url)?;
        let proxies = proxy::from_env(&env)?;

        let https = |a: &Option<Endpoint>, b: &Option<Endpoint>| {
            [a, b]
                .iter()
                .any(|e| e.as_ref().is_some_and(Endpoint::is_https))
        };
        let cache_client = build_client(
            "shacache",
            &cfg.shacache_tls,
            https(&download_cache, &upload_cache),
            &cfg.limits,
            &proxies,
        )?;
        let dir_client = build_client(
            "shadir",
            &cfg.shadir_tls,
            https(&download_dir, &upload_dir),
            &cfg.limits,
            &proxies,
        )?;
        Ok(Remote {
            inner: Arc::new(Inner {
                cache_client,
                dir_client,
                download_cache,
                download_dir,
                upload_cache,
                upload_dir,
                limits: cfg.limits,
            }),
        })
    }

    /// Both download URLs are configured.
    pub fn can_download(&self) -> bool {
        self.inner.download_cache.is_some() && self.inner.download_dir.is_some()
    }

    /// Both upload URLs are configured.
    pub fn can_upload(&self) -> bool {
        self.inner.upload_cache.is_some() && self.inner.upload_dir.is_some()
    }

    /// The limits this client was built with.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// `GET {download-dir-url}/{key}`: 404 is [`DirListing::Missing`], 200 a listing
    /// (the body is bounded by `limits.max_dir_body`).
    pub async fn get_dir(&self, key: &str) -> Result<DirListing, RemoteError> {
        dir::get(self, key).await
    }

    /// `PUT {upload-dir-url}/{key}` with `[inner, signature]`; exactly 201 is success
    /// (a 200 is a protocol error: no known server answers it, so it cannot be trusted
    /// to mean "stored").
    pub async fn put_dir(&self, key: &str, entry: &RawEntry) -> Result<(), RemoteError> {
        dir::put(self, key, entry).await
    }

    /// Existence and size of a blob: HEAD, else a ranged GET (see [`Probe`]).
    pub async fn probe_blob(&self, sha: &Sha512, tmp_dir: &Path) -> Result<Probe, RemoteError> {
        probe::probe(self, sha, tmp_dir, &unbounded).await
    }

    /// [`Remote::probe_blob`], a whole blob sent instead of the probe's byte bounded by
    /// `room`.
    pub async fn probe_blob_bounded(
        &self,
        sha: &Sha512,
        tmp_dir: &Path,
        room: Room<'_>,
    ) -> Result<Probe, RemoteError> {
        probe::probe(self, sha, tmp_dir, room).await
    }

    /// Downloads a blob into a temporary file in `tmp_dir`, hashing as it goes, resuming
    /// with `Range` after a dropped connection; the result is verified. Bytes that do
    /// not match are fetched once more with `Cache-Control: no-cache` and `Pragma:
    /// no-cache`, so that a caching proxy or CDN on the way that holds a bad copy asks
    /// the origin (and replaces its copy) instead of serving it again.
    pub async fn fetch_blob(
        &self,
        sha: &Sha512,
        tmp_dir: &Path,
        progress: Progress<'_>,
    ) -> Result<VerifiedFile, RemoteError> {
        self.fetch_blob_bounded(sha, tmp_dir, progress, &unbounded)
            .await
    }

    /// [`Remote::fetch_blob`], each piece of the body first allowed by `room` (the
    /// cache's reservation grown as bytes arrive, whatever length was announced).
    pub async fn fetch_blob_bounded(
        &self,
        sha: &Sha512,
        tmp_dir: &Path,
        progress: Progress<'_>,
        room: Room<'_>,
    ) -> Result<VerifiedFile, RemoteError> {
        match fetch::fetch(self, sha, tmp_dir, progress, room, false).await {
            Err(RemoteError::Corrupt {
                url,
                expected,
                actual,
            }) => {
                tracing::error!(
                    "{url}: downloaded content does not match: expected SHA-512 {expected}, got {actual}; fetching once more, asking caches on the way for a fresh copy"
                );
                fetch::fetch(self, sha, tmp_dir, progress, room, true).await
            }
            other => other,
        }
    }

    /// `POST {upload-cache-url}` streaming the file; 201 with the echoed hash required.
    pub async fn post_blob(
        &self,
        path: &Path,
        sha: &Sha512,
        progress: Progress<'_>,
    ) -> Result<(), RemoteError> {
        upload::post(self, path, sha, progress).await
    }

    /// `POST {upload-cache-url}` of a file still being written, sent as it grows (see
    /// [`crate::growing`]); the hash the server computed.
    pub async fn post_growing(
        &self,
        growing: std::sync::Arc<crate::growing::Growing>,
        file: std::fs::File,
    ) -> Result<Sha512, RemoteError> {
        upload::post_growing(self, growing, file).await
    }

    fn endpoint<'a>(
        e: &'a Option<Endpoint>,
        option: &'static str,
    ) -> Result<&'a Endpoint, RemoteError> {
        e.as_ref().ok_or(RemoteError::NotConfigured(option))
    }
}

/// One connection pool for one service. Redirects are off: a 302 is the production
/// server's way to refuse an upload, and following it would hide that.
fn build_client(
    service: &str,
    tls_files: &TlsFiles,
    needs_roots: bool,
    limits: &Limits,
    proxies: &[reqwest::Proxy],
) -> Result<reqwest::Client, RemoteError> {
    let tls = tls::client_config(service, tls_files, needs_roots)?;
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(limits.connect_timeout)
        .user_agent(concat!("shacachefs/", env!("CARGO_PKG_VERSION")))
        .http2_adaptive_window(true)
        .no_proxy();
    for p in proxies {
        builder = builder.proxy(p.clone());
    }
    builder
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| RemoteError::Tls(format!("{service}: building the HTTP client: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_outside_a_runtime_and_hides_credentials() {
        let cfg = RemoteConfig {
            download_cache_url: Some("https://u:secret@cache.example/shacache".into()),
            upload_dir_url: Some("http://dir.example".into()),
            ..RemoteConfig::default()
        };
        let r = Remote::new_with_env(cfg, |_| None).unwrap();
        assert!(!r.can_download() && !r.can_upload());
        let shown = format!("{r:?}");
        assert!(shown.contains("https://cache.example/shacache"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn a_bad_url_is_an_error_at_construction() {
        let cfg = RemoteConfig {
            download_dir_url: Some("ftp://u:secret@h/x".into()),
            ..RemoteConfig::default()
        };
        let err = Remote::new_with_env(cfg, |_| None).unwrap_err();
        assert!(matches!(err, RemoteError::Protocol { .. }), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
