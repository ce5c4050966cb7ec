//! Blob upload: `POST {upload-cache-url}` with the file streamed from disk (256 KiB
//! reads, never the whole file in memory) and an exact `Content-Length`. Success is a 201
//! whose body is the SHA-512 the server computed, equal to ours.
//!
//! Timing: no total deadline (uploads of gigabytes are normal); sending fails when the
//! server takes no byte for `limits.low_speed_timeout`, and once the whole body is handed
//! over the answer is awaited for `limits.upload_answer_timeout` (the server hashes the
//! body before it answers). Network errors, timeouts and 5xx are retried with backoff,
//! re-streaming the file from its start: the store is content-addressed, so a repeated
//! upload is harmless.

use super::http::{self, log_answer, net_error, protocol_error, retry, timeout_error};
use super::{Limits, Progress, Remote, RemoteError};
use crate::digest::Sha512;
use crate::growing::Growing;
use futures_util::TryStreamExt;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::StatusCode;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Size of each read from the file (and so of each body chunk).
const READ_SIZE: usize = 256 << 10;
/// Most of a 201's body read (a hash is 128 characters).
const ANSWER_BYTES: usize = 4096;

/// Blobs up to this size are sent from memory (read at once) rather than streamed, and
/// without a probe first (`client::Client::ensure_blob`): their bytes cost less than a
/// round trip.
pub const SMALL_BLOB: u64 = 64 << 10;

pub(super) async fn post(
    remote: &Remote,
    path: &Path,
    sha: &Sha512,
    progress: Progress<'_>,
) -> Result<(), RemoteError> {
    let inner = &remote.inner;
    let endpoint = Remote::endpoint(&inner.upload_cache, "upload-cache-url")?;
    let url = endpoint.base();
    retry(&inner.limits, "POST", url, move || {
        post_once(remote, url, path, sha, progress)
    })
    .await
}

async fn post_once(
    remote: &Remote,
    url: &str,
    path: &Path,
    sha: &Sha512,
    progress: Progress<'_>,
) -> Result<(), RemoteError> {
    let inner = &remote.inner;
    let limits = &inner.limits;
    // Bytes the HTTP stack has pulled from the file so far: hyper asks for the next
    // chunk only when the previous one is written, so this follows the socket.
    let pulled = Arc::new(AtomicU64::new(0));
    let small = std::fs::metadata(path).is_ok_and(|m| m.len() <= SMALL_BLOB);
    let (body, len) = if small {
        // A small file is read here at once (the page cache has it: it was just
        // written) rather than streamed through the blocking pool, whose hops cost
        // more than the read for a `cp` of many small files.
        let bytes = std::fs::read(path)?;
        let len = bytes.len() as u64;
        pulled.store(len, Ordering::Relaxed);
        (reqwest::Body::from(bytes), len)
    } else {
        let file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        let counter = Arc::clone(&pulled);
        let stream = tokio_util::io::ReaderStream::with_capacity(file, READ_SIZE).inspect_ok(
            move |chunk: &bytes::Bytes| {
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            },
        );
        (reqwest::Body::wrap_stream(stream), len)
    };
    let mut req = inner
        .cache_client
        .post(url)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, len)
        .body(body);
    if let Some(auth) = inner.upload_cache.as_ref().and_then(|e| e.auth()) {
        req = req.header(AUTHORIZATION, auth.clone());
    }

    let started = Instant::now();
    let answer = await_sent(
        req.send(),
        || pulled.load(Ordering::Relaxed),
        len,
        limits,
        |sent| progress(sent.min(len), Some(len)),
    )
    .await;
    let resp = match answer {
        Ok(r) => r.map_err(|e| net_error(url, e))?,
        Err(SendWait::Stalled(sent)) => {
            return Err(timeout_error(
                url,
                format!(
                    "upload stalled: nothing sent for {:?} after {sent} of {len} bytes",
                    limits.low_speed_timeout
                ),
            ))
        }
        Err(SendWait::NoAnswer) => {
            return Err(timeout_error(
                url,
                format!(
                    "no answer {:?} after the upload",
                    limits.upload_answer_timeout
                ),
            ))
        }
    };
    log_answer("POST", url, started, resp.status());
    if resp.status() != StatusCode::CREATED {
        return Err(http::status_error(url, resp).await);
    }
    let answer = read_answer(resp, url, limits.request_timeout).await?;
    let answer = answer.trim();
    match Sha512::parse_any_case(answer) {
        Ok(theirs) if theirs == *sha => {
            progress(len, Some(len));
            Ok(())
        }
        _ => Err(protocol_error(
            url,
            format!(
                "server computed a different hash: {:?} (sent {})",
                answer.chars().take(140).collect::<String>(),
                sha.hex()
            ),
        )),
    }
}

/// `POST` of a file while it is still being written ([`Growing`]): the body is sent
/// chunked (its length is not known yet), once, without retries (the caller falls
/// back to [`post`] on any failure). Returns the hash the server computed, which the
/// caller compares with its own.
pub(super) async fn post_growing(
    remote: &Remote,
    growing: Arc<Growing>,
    file: std::fs::File,
) -> Result<Sha512, RemoteError> {
    let inner = &remote.inner;
    let limits = &inner.limits;
    let endpoint = Remote::endpoint(&inner.upload_cache, "upload-cache-url")?;
    let url = endpoint.base();
    let mut req = inner
        .cache_client
        .post(url)
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap_stream(growing.stream(file)));
    if let Some(auth) = inner.upload_cache.as_ref().and_then(|e| e.auth()) {
        req = req.header(AUTHORIZATION, auth.clone());
    }
    let started = Instant::now();
    let resp = req.send().await.map_err(|e| net_error(url, e))?;
    log_answer("POST", url, started, resp.status());
    if resp.status() != StatusCode::CREATED {
        return Err(http::status_error(url, resp).await);
    }
    let answer = read_answer(resp, url, limits.request_timeout).await?;
    Sha512::parse_any_case(answer.trim()).map_err(|_| {
        protocol_error(
            url,
            format!(
                "the answer to an upload is not a hash: {:?}",
                answer.chars().take(140).collect::<String>()
            ),
        )
    })
}

/// Why [`await_sent`] gave up.
#[derive(Debug)]
pub(crate) enum SendWait {
    /// The HTTP stack took nothing for the low-speed timeout, after this many bytes.
    Stalled(u64),
    /// The body was all sent and no answer came within the upload answer timeout.
    NoAnswer,
}

/// Awaits `answer`, a request whose body is being sent, watching `sent()` (the bytes
/// the HTTP stack took so far, of `len`): gives up when nothing moves for
/// `limits.low_speed_timeout` before the body is all sent, or when no answer comes
/// `limits.upload_answer_timeout` after that (the server hashes and stores the body
/// before it answers). `moved` is told each new count.
pub(crate) async fn await_sent<T>(
    answer: impl Future<Output = T>,
    sent: impl Fn() -> u64,
    len: u64,
    limits: &Limits,
    mut moved: impl FnMut(u64),
) -> Result<T, SendWait> {
    tokio::pin!(answer);
    let tick =
        (limits.low_speed_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut seen = sent();
    let mut last_move = Instant::now();
    loop {
        tokio::select! {
            r = &mut answer => return Ok(r),
            _ = tokio::time::sleep(tick) => {}
        }
        let now = sent();
        if now != seen {
            seen = now;
            last_move = Instant::now();
            moved(now);
        }
        if now >= len {
            return tokio::time::timeout(limits.upload_answer_timeout, &mut answer)
                .await
                .map_err(|_| SendWait::NoAnswer);
        }
        if last_move.elapsed() >= limits.low_speed_timeout {
            return Err(SendWait::Stalled(now));
        }
    }
}

/// The body of a 201, bounded in size and time.
async fn read_answer(
    mut resp: reqwest::Response,
    url: &str,
    deadline: Duration,
) -> Result<String, RemoteError> {
    let mut body = Vec::new();
    let read = async {
        while body.len() < ANSWER_BYTES {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c),
                Ok(None) => return Ok(()),
                Err(e) => return Err(net_error(url, e)),
            }
        }
        Ok(())
    };
    tokio::time::timeout(deadline, read)
        .await
        .map_err(|_| timeout_error(url, "reading the answer to the upload"))??;
    Ok(String::from_utf8_lossy(&body).into_owned())
}
