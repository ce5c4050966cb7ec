//! Blob download: `GET {download-cache-url}/{sha512}` streamed into a [`HashingFile`]
//! (hashed while written, never exposed before it verifies), resumed with
//! `Range: bytes=<have>-` after a dropped connection, a stall or a short body.
//!
//! A resumed answer is trusted only when it is a 206 whose `Content-Range` starts exactly
//! at the bytes already written and ends at the blob's end; a 200 means the server ignored
//! the range, so the file is reset and the body taken from zero (the production origin
//! does that). Bounds: `limits.attempts` consecutive failures that add no new byte end
//! the download, and the total number of attempts is capped at
//! [`TOTAL_ATTEMPTS_FACTOR`] × `limits.attempts`.

use super::http::{
    self, backoff_delay, content_range, is_retryable, log_answer, net_error, protocol_error,
    timeout_error, ContentRange,
};
use super::{Progress, Remote, RemoteError, Room};
use crate::digest::{HashingFile, Sha512, VerifiedFile, VerifyError};
use reqwest::header::{AUTHORIZATION, RANGE};
use reqwest::{Response, StatusCode};
use std::path::Path;
use std::time::{Duration, Instant};

/// Attempts that do make progress may go on longer than `limits.attempts`, up to this
/// many times that number (a flaky link on a multi-gigabyte blob), never without end.
pub(crate) const TOTAL_ATTEMPTS_FACTOR: u32 = 25;

/// The least a transfer must move per `low_speed_timeout` window (as curl's
/// `--speed-limit`, with `--speed-time` = the window).
pub(crate) const LOW_SPEED_BYTES: u64 = 1024;

pub(super) async fn fetch(
    remote: &Remote,
    sha: &Sha512,
    tmp_dir: &Path,
    progress: Progress<'_>,
    room: Room<'_>,
    fresh: bool,
) -> Result<VerifiedFile, RemoteError> {
    let inner = &remote.inner;
    let endpoint = Remote::endpoint(&inner.download_cache, "download-cache-url")?;
    let url = endpoint.join(&sha.hex());
    let limits = &inner.limits;
    let attempts = limits.attempts.max(1);
    let max_tries = attempts.saturating_mul(TOTAL_ATTEMPTS_FACTOR);

    let mut file = HashingFile::new_in(tmp_dir)?;
    let mut total: Option<u64> = None;
    let mut high_water = 0u64;
    let mut without_progress = 0u32;
    let mut tries = 0u32;
    loop {
        tries += 1;
        let result = attempt(remote, &url, &mut file, &mut total, progress, room, fresh).await;
        // A trickle is not progress: it must not reset the count of failed attempts.
        let progressed = file.len() >= high_water.saturating_add(LOW_SPEED_BYTES);
        high_water = high_water.max(file.len());
        let err = match result {
            // A 206 may cover less than asked: go on from where it stopped.
            Ok(()) if total.is_some_and(|t| file.len() < t) => {
                if tries >= max_tries {
                    return Err(protocol_error(&url, "ranges never reached the end"));
                }
                continue;
            }
            Ok(()) => break,
            Err(e) if is_retryable(&e) => e,
            Err(e) => return Err(e),
        };
        without_progress = if progressed { 1 } else { without_progress + 1 };
        if without_progress >= attempts || tries >= max_tries {
            return Err(err);
        }
        let delay = backoff_delay(limits.backoff, without_progress);
        tracing::warn!(
            %url, have = file.len(), total, error = %err,
            "blob download interrupted, resuming in {delay:?}"
        );
        tokio::time::sleep(delay).await;
    }

    match file.verify(sha) {
        Ok(v) => Ok(v),
        Err(VerifyError::Mismatch(m)) => Err(RemoteError::Corrupt {
            url,
            expected: m.expected,
            actual: m.actual,
        }),
        Err(VerifyError::Io(e)) => Err(RemoteError::Io(e)),
    }
}

/// One GET, from byte `file.len()`. `Ok` when the answer's body was read to its end.
async fn attempt(
    remote: &Remote,
    url: &str,
    file: &mut HashingFile,
    total: &mut Option<u64>,
    progress: Progress<'_>,
    room: Room<'_>,
    fresh: bool,
) -> Result<(), RemoteError> {
    let inner = &remote.inner;
    let offset = file.len();
    let mut req = inner.cache_client.get(url);
    if fresh {
        req = req
            .header(reqwest::header::CACHE_CONTROL, "no-cache")
            .header(reqwest::header::PRAGMA, "no-cache");
    }
    if let Some(auth) = inner.download_cache.as_ref().and_then(|e| e.auth()) {
        req = req.header(AUTHORIZATION, auth.clone());
    }
    if offset > 0 {
        req = req.header(RANGE, format!("bytes={offset}-"));
    }
    let mut resp = send_within(req, url, inner.limits.request_timeout).await?;
    let end = match resp.status() {
        StatusCode::OK => {
            let len = http::content_length(&resp);
            if let (Some(known), Some(len)) = (*total, len) {
                if known != len {
                    return Err(protocol_error(
                        url,
                        format!("blob size changed from {known} to {len} bytes"),
                    ));
                }
            }
            if offset > 0 {
                tracing::warn!(%url, offset, "server ignored Range: downloading from the start");
                file.reset()?;
                progress(0, len);
            }
            *total = len;
            len
        }
        StatusCode::PARTIAL_CONTENT if offset > 0 => Some(continuation(&resp, url, offset, total)?),
        StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
            // Everything was already there (the previous answer ended exactly at the end).
            return match content_range(&resp) {
                Some(ContentRange::Unsatisfied { total: t }) if t == offset => {
                    *total = Some(t);
                    Ok(())
                }
                _ => Err(protocol_error(
                    url,
                    format!("416 to a resume at byte {offset}"),
                )),
            };
        }
        StatusCode::PARTIAL_CONTENT => {
            return Err(protocol_error(url, "206 to a request without Range"))
        }
        _ => return Err(http::status_error(url, resp).await),
    };
    stream_into(
        &mut resp,
        file,
        end,
        *total,
        url,
        inner.limits.low_speed_timeout,
        progress,
        room,
    )
    .await
}

/// Checks a 206 to `Range: bytes=<offset>-` and returns where its body ends.
fn continuation(
    resp: &Response,
    url: &str,
    offset: u64,
    total: &mut Option<u64>,
) -> Result<u64, RemoteError> {
    let raw = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_string();
    let bad = |why: &str| {
        protocol_error(
            url,
            format!("206 to a resume at byte {offset} with Content-Range {raw}: {why}"),
        )
    };
    let Some(ContentRange::Bytes {
        first,
        last,
        total: range_total,
    }) = content_range(resp)
    else {
        return Err(bad("not a byte range"));
    };
    if first != offset {
        return Err(bad("does not continue where the file stops"));
    }
    let blob_total = match (range_total, *total) {
        (Some(a), Some(b)) if a != b => return Err(bad("blob size changed")),
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => return Err(bad("unknown blob size")),
    };
    if last >= blob_total {
        return Err(bad("past the end of the blob"));
    }
    if let Some(len) = http::content_length(resp) {
        if len != last - first + 1 {
            return Err(bad("Content-Length disagrees"));
        }
    }
    *total = Some(blob_total);
    Ok(last + 1)
}

/// Sends a request; the answer's head must arrive within `deadline`.
pub(super) async fn send_within(
    req: reqwest::RequestBuilder,
    url: &str,
    deadline: Duration,
) -> Result<Response, RemoteError> {
    let started = Instant::now();
    let resp = tokio::time::timeout(deadline, req.send())
        .await
        .map_err(|_| timeout_error(url, format!("no answer in {deadline:?}")))?
        .map_err(|e| net_error(url, e))?;
    log_answer("GET", url, started, resp.status());
    Ok(resp)
}

/// Reads a body to its end into `file`. `end` is the length the file must reach when the
/// answer announced one: fewer bytes is a (retryable) dropped connection, more is a
/// protocol violation. Each chunk must arrive within `low_speed`, and each `low_speed`
/// window must bring at least [`LOW_SPEED_BYTES`]: a server that trickles a byte now
/// and then fails as surely as one that stalls. Each chunk is first allowed by `room`
/// (which bounds a body of unknown length, and a lying one, by the space there is).
#[allow(clippy::too_many_arguments)]
pub(super) async fn stream_into(
    resp: &mut Response,
    file: &mut HashingFile,
    end: Option<u64>,
    total: Option<u64>,
    url: &str,
    low_speed: Duration,
    progress: Progress<'_>,
    room: Room<'_>,
) -> Result<(), RemoteError> {
    let mut window_start = tokio::time::Instant::now();
    let mut window_bytes = 0u64;
    loop {
        let chunk = match tokio::time::timeout(low_speed, resp.chunk()).await {
            Err(_) => {
                return Err(timeout_error(
                    url,
                    format!(
                        "no data for {low_speed:?} after {} bytes{}",
                        file.len(),
                        of_total(end)
                    ),
                ))
            }
            Ok(Err(e)) => {
                let mut err = net_error(url, e);
                if let RemoteError::Network { message, .. } = &mut err {
                    message.push_str(&format!(" (after {} bytes{})", file.len(), of_total(end)));
                }
                return Err(err);
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        if let Some(end) = end {
            if file.len() + chunk.len() as u64 > end {
                return Err(protocol_error(
                    url,
                    format!("more bytes than the {end} announced"),
                ));
            }
        }
        // A blocking write: it lands in the page cache, cheaper than a thread hop.
        window_bytes += chunk.len() as u64;
        if window_start.elapsed() >= low_speed {
            if window_bytes < LOW_SPEED_BYTES {
                return Err(timeout_error(
                    url,
                    format!(
                        "{window_bytes} bytes in {low_speed:?} (less than {LOW_SPEED_BYTES}) after {} bytes{}",
                        file.len(),
                        of_total(end)
                    ),
                ));
            }
            window_start = tokio::time::Instant::now();
            window_bytes = 0;
        }
        let to = file.len() + chunk.len() as u64;
        if let Err(e) = room(file.len(), to) {
            tracing::error!(%url, have = file.len(), error = %e, "no room for the blob being downloaded");
            return Err(RemoteError::Io(e));
        }
        file.write_bytes(chunk)?;
        progress(file.len(), total);
    }
    match end {
        Some(end) if file.len() < end => Err(RemoteError::Network {
            url: url.to_string(),
            message: format!("connection closed after {} of {end} bytes", file.len()),
        }),
        _ => Ok(()),
    }
}

fn of_total(end: Option<u64>) -> String {
    end.map(|e| format!(" of {e}")).unwrap_or_default()
}
