//! The HTTP client for shacache and shadir: pooled connections (reqwest + rustls), the
//! protocol's status-code rules, resume with `Range`, bounded retries with backoff,
//! connect and low-speed timeouts, and errors that name the URL (never its password).
//!
//! STUB: interface fixed, implementation pending (see the helper brief).

use crate::config::TlsFiles;
use crate::digest::{Sha512, VerifiedFile};
use crate::wire::{Listing, RawEntry};
use std::path::Path;
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

/// The client. Cheap to clone (one shared connection pool).
#[derive(Clone)]
pub struct Remote {
    _private: (),
}

impl Remote {
    /// Builds the client (loads TLS files, proxies from the environment).
    pub fn new(cfg: RemoteConfig) -> Result<Remote, RemoteError> {
        let _ = cfg;
        todo!("remote::Remote::new")
    }

    pub fn can_download(&self) -> bool {
        todo!()
    }

    pub fn can_upload(&self) -> bool {
        todo!()
    }

    /// `GET {download-dir-url}/{key}`.
    pub async fn get_dir(&self, key: &str) -> Result<DirListing, RemoteError> {
        let _ = key;
        todo!("remote::Remote::get_dir")
    }

    /// `PUT {upload-dir-url}/{key}` with `[inner, signature]`; 201 required.
    pub async fn put_dir(&self, key: &str, entry: &RawEntry) -> Result<(), RemoteError> {
        let _ = (key, entry);
        todo!("remote::Remote::put_dir")
    }

    /// Existence and size of a blob: HEAD, else a ranged GET (see [`Probe`]).
    pub async fn probe_blob(&self, sha: &Sha512, tmp_dir: &Path) -> Result<Probe, RemoteError> {
        let _ = (sha, tmp_dir);
        todo!("remote::Remote::probe_blob")
    }

    /// Downloads a blob into a temporary file in `tmp_dir`, hashing as it goes, resuming
    /// with `Range` after a dropped connection; the result is verified.
    pub async fn fetch_blob(
        &self,
        sha: &Sha512,
        tmp_dir: &Path,
        progress: Progress<'_>,
    ) -> Result<VerifiedFile, RemoteError> {
        let _ = (sha, tmp_dir, progress);
        todo!("remote::Remote::fetch_blob")
    }

    /// `POST {upload-cache-url}` streaming the file; 201 with the echoed hash required.
    pub async fn post_blob(
        &self,
        path: &Path,
        sha: &Sha512,
        progress: Progress<'_>,
    ) -> Result<(), RemoteError> {
        let _ = (path, sha, progress);
        todo!("remote::Remote::post_blob")
    }
}
