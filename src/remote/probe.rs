//! Does a blob exist, and how big is it? `HEAD` first; where HEAD is not implemented
//! (the reference test servers answer 501) a `GET` with `Range: bytes=0-0`, whose 206
//! gives the size. A server that ignores ranges answers that GET with the whole blob: it
//! is read to the end (hanging up mid-body makes the reference test server stop serving),
//! verified, and handed back as [`Probe::Fetched`]. Only a 404 means absent.

use super::fetch::{send_within, stream_into};
use super::http::{self, content_range, is_retryable, log_answer, net_error, retry, ContentRange};
use super::{Probe, Remote, RemoteError, Room};
use crate::digest::{HashingFile, Sha512, VerifyError};
use reqwest::header::{AUTHORIZATION, RANGE};
use reqwest::StatusCode;
use std::path::Path;
use std::time::Instant;

/// What a HEAD told.
enum Head {
    Absent,
    Size(u64),
    /// HEAD not implemented or not allowed (or no `Content-Length`): ask with GET.
    Unsupported,
}

pub(super) async fn probe(
    remote: &Remote,
    sha: &Sha512,
    tmp_dir: &Path,
    room: Room<'_>,
) -> Result<Probe, RemoteError> {
    let inner = &remote.inner;
    let endpoint = Remote::endpoint(&inner.download_cache, "download-cache-url")?;
    let url = endpoint.join(&sha.hex());
    let (url, limits) = (url.as_str(), &inner.limits);
    let head = retry(limits, "HEAD", url, move || async move {
        tokio::time::timeout(limits.request_timeout, head_once(remote, url))
            .await
            .unwrap_or_else(|_| {
                Err(http::timeout_error(
                    url,
                    format!("no answer in {:?}", limits.request_timeout),
                ))
            })
    })
    .await?;
    match head {
        Head::Absent => Ok(Probe::Absent),
        Head::Size(n) => Ok(Probe::Size(n)),
        Head::Unsupported => {
            retry(limits, "GET", url, move || {
                ranged_once(remote, url, sha, tmp_dir, room)
            })
            .await
        }
    }
}

async fn head_once(remote: &Remote, url: &str) -> Result<Head, RemoteError> {
    let inner = &remote.inner;
    let mut req = inner.cache_client.head(url);
    if let Some(auth) = inner.download_cache.as_ref().and_then(|e| e.auth()) {
        req = req.header(AUTHORIZATION, auth.clone());
    }
    let started = Instant::now();
    let resp = req.send().await.map_err(|e| net_error(url, e))?;
    log_answer("HEAD", url, started, resp.status());
    match resp.status() {
        StatusCode::OK => Ok(match http::content_length(&resp) {
            Some(n) => Head::Size(n),
            None => Head::Unsupported,
        }),
        StatusCode::NOT_FOUND => Ok(Head::Absent),
        StatusCode::NOT_IMPLEMENTED | StatusCode::METHOD_NOT_ALLOWED | StatusCode::BAD_REQUEST => {
            Ok(Head::Unsupported)
        }
        _ => Err(http::status_error(url, resp).await),
    }
}

async fn ranged_once(
    remote: &Remote,
    url: &str,
    sha: &Sha512,
    tmp_dir: &Path,
    room: Room<'_>,
) -> Result<Probe, RemoteError> {
    let inner = &remote.inner;
    let limits = &inner.limits;
    let mut req = inner.cache_client.get(url).header(RANGE, "bytes=0-0");
    if let Some(auth) = inner.download_cache.as_ref().and_then(|e| e.auth()) {
        req = req.header(AUTHORIZATION, auth.clone());
    }
    let mut resp = send_within(req, url, limits.request_timeout).await?;
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {
            let size = match content_range(&resp) {
                Some(ContentRange::Bytes {
                    first: 0,
                    total: Some(total),
                    ..
                }) => total,
                _ => {
                    return Err(http::protocol_error(
                        url,
                        "206 without a usable Content-Range",
                    ))
                }
            };
            // The one byte asked for, read so the connection can be reused.
            let mut drained = 0usize;
            while drained < 64 << 10 {
                match tokio::time::timeout(limits.low_speed_timeout, resp.chunk()).await {
                    Ok(Ok(Some(c))) => drained += c.len(),
                    _ => break,
                }
            }
            Ok(Probe::Size(size))
        }
        StatusCode::RANGE_NOT_SATISFIABLE => match content_range(&resp) {
            // Byte 0 does not exist: the blob is empty.
            Some(ContentRange::Unsatisfied { total: 0 }) => Ok(Probe::Size(0)),
            _ => Err(http::protocol_error(
                url,
                "416 to a request for byte 0 of a non-empty blob",
            )),
        },
        StatusCode::OK => {
            let len = http::content_length(&resp);
            let mut file = HashingFile::new_in(tmp_dir)?;
            let read = stream_into(
                &mut resp,
                &mut file,
                len,
                len,
                url,
                limits.low_speed_timeout,
                &|_, _| {},
                room,
            )
            .await;
            match (read, len) {
                (Ok(()), _) => {}
                // The answer's head already told the size, which is what was asked.
                (Err(e), Some(len)) if is_retryable(&e) => {
                    tracing::warn!(%url, error = %e, "reading a whole blob while probing it");
                    return Ok(Probe::Size(len));
                }
                (Err(e), _) => return Err(e),
            }
            match file.verify(sha) {
                Ok(v) => Ok(Probe::Fetched(v)),
                Err(VerifyError::Mismatch(m)) => Err(RemoteError::Corrupt {
                    url: url.to_string(),
                    expected: m.expected,
                    actual: m.actual,
                }),
                Err(VerifyError::Io(e)) => Err(RemoteError::Io(e)),
            }
        }
        StatusCode::NOT_FOUND => Ok(Probe::Absent),
        _ => Err(http::status_error(url, resp).await),
    }
}
