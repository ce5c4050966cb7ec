//! shadir calls: `GET {download-dir-url}/{key}` (a bounded body, parsed as a listing)
//! and `PUT {upload-dir-url}/{key}` (one `[inner, signature]` entry, 201 required).
//! Both are small requests under `limits.request_timeout`, retried when transient
//! (re-sending an identical PUT body does not duplicate the entry).

use super::http::{self, log_answer, net_error, protocol_error, retry, timeout_error};
use super::{DirListing, Remote, RemoteError};
use crate::wire::{key_to_path_segment, parse_listing_with, RawEntry};
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::StatusCode;
use std::time::Instant;

pub(super) async fn get(remote: &Remote, key: &str) -> Result<DirListing, RemoteError> {
    let inner = &remote.inner;
    let endpoint = Remote::endpoint(&inner.download_dir, "download-dir-url")?;
    let url = endpoint.join(&key_to_path_segment(key));
    let (url, limits) = (url.as_str(), &inner.limits);
    retry(limits, "GET", url, move || async move {
        tokio::time::timeout(limits.request_timeout, get_once(remote, url))
            .await
            .unwrap_or_else(|_| {
                Err(timeout_error(
                    url,
                    format!("no complete answer in {:?}", limits.request_timeout),
                ))
            })
    })
    .await
}

async fn get_once(remote: &Remote, url: &str) -> Result<DirListing, RemoteError> {
    let inner = &remote.inner;
    let limit = inner.limits.max_dir_body;
    let mut req = inner.dir_client.get(url);
    if let Some(auth) = inner.download_dir.as_ref().and_then(|e| e.auth()) {
        req = req.header(AUTHORIZATION, auth.clone());
    }
    let started = Instant::now();
    let mut resp = req.send().await.map_err(|e| net_error(url, e))?;
    log_answer("GET", url, started, resp.status());
    match resp.status() {
        StatusCode::OK => {}
        StatusCode::NOT_FOUND => return Ok(DirListing::Missing),
        _ => return Err(http::status_error(url, resp).await),
    }
    let too_large = || RemoteError::TooLarge {
        url: url.to_string(),
        limit,
    };
    let announced = http::content_length(&resp);
    if announced.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(announced.unwrap_or(0).min(1 << 20) as usize);
    while let Some(chunk) = resp.chunk().await.map_err(|e| net_error(url, e))? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    let listing = parse_listing_with(&body, inner.limits.max_json_depth)
        .map_err(|e| protocol_error(url, e.to_string()))?;
    if !listing.rejected.is_empty() {
        tracing::warn!(
            %url, rejected = listing.rejected.len(), first = %listing.rejected[0],
            "shadir entries dropped as malformed"
        );
    }
    Ok(DirListing::Found(listing))
}

pub(super) async fn put(remote: &Remote, key: &str, entry: &RawEntry) -> Result<(), RemoteError> {
    let inner = &remote.inner;
    let endpoint = Remote::endpoint(&inner.upload_dir, "upload-dir-url")?;
    let url = endpoint.join(&key_to_path_segment(key));
    let body = entry.to_put_body();
    let (url, body, limits) = (url.as_str(), body.as_str(), &inner.limits);
    retry(limits, "PUT", url, move || async move {
        tokio::time::timeout(limits.request_timeout, put_once(remote, url, body))
            .await
            .unwrap_or_else(|_| {
                Err(timeout_error(
                    url,
                    format!("no answer in {:?}", limits.request_timeout),
                ))
            })
    })
    .await
}

async fn put_once(remote: &Remote, url: &str, body: &str) -> Result<(), RemoteError> {
    let inner = &remote.inner;
    let mut req = inner
        .dir_client
        .put(url)
        .header(CONTENT_TYPE, "application/json")
        .header(CONTENT_LENGTH, body.len())
        .body(body.to_string());
    if let Some(auth) = inner.upload_dir.as_ref().and_then(|e| e.auth()) {
        req = req.header(AUTHORIZATION, auth.clone());
    }
    let started = Instant::now();
    let mut resp = req.send().await.map_err(|e| net_error(url, e))?;
    log_answer("PUT", url, started, resp.status());
    match resp.status() {
        // The body is ignored (production sends none, the reference test server a
        // hash); it is drained, bounded, so the connection can be reused.
        StatusCode::CREATED => {
            let mut drained = 0usize;
            while drained < 64 << 10 {
                match resp.chunk().await {
                    Ok(Some(c)) => drained += c.len(),
                    _ => break,
                }
            }
            Ok(())
        }
        StatusCode::OK => Err(protocol_error(
            url,
            "answered 200 where 201 Created is the only success",
        )),
        _ => Err(http::status_error(url, resp).await),
    }
}
