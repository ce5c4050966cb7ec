//! shacache: receiving blobs (POST) and serving them (GET/HEAD, with one byte range).
//!
//! An upload is never held in memory: the async side forwards body frames through a
//! small bounded channel to a blocking task that writes them to a temporary file in the
//! root while hashing, fsyncs it and renames it to its SHA-512 name. The blob is
//! published only when the body ended cleanly; an aborted upload leaves nothing.
//!
//! A blob name that is not exactly 128 lowercase hex digits is answered 404 without
//! touching the filesystem (the name is checked before any path is built).

use super::limits::{BodyError, PacedBody};
use super::response::{closing, empty, full, internal, text, Body};
use super::{store, State};
use crate::digest::{HashingFile, Sha512};
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{
    HeaderMap, HeaderValue, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, IF_RANGE, RANGE,
};
use hyper::{Response, StatusCode};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::info;

/// Read size when streaming a blob out.
const READ_CHUNK: usize = 256 * 1024;
/// Body frames in flight between the network and the disk writer (hyper frames are at
/// most a few hundred KiB, so this bounds an upload's memory to a few MiB).
const UPLOAD_QUEUE: usize = 16;
/// Production's value: blobs never change.
const CACHE_FOREVER: &str = "public, max-age=31556926";

enum Chunk {
    Data(Bytes),
    /// The body ended cleanly: the writer may publish the blob.
    End,
}

/// `POST /shacache`: stores the body, answers 201 with its SHA-512.
pub(crate) async fn upload(state: &State, body: Incoming) -> Response<Body> {
    let Ok(_permit) = state.uploads.clone().try_acquire_owned() else {
        return text(
            hyper::StatusCode::TOO_MANY_REQUESTS,
            "too many uploads in progress; retry later\n",
        );
    };
    let (tx, mut rx) = mpsc::channel::<Chunk>(UPLOAD_QUEUE);
    let root = state.root.clone();
    let writer = tokio::task::spawn_blocking(move || -> io::Result<Option<(Sha512, u64, bool)>> {
        let mut file = HashingFile::new_in(&root)?.write_behind();
        loop {
            match rx.blocking_recv() {
                Some(Chunk::Data(b)) => file.write_bytes(b)?,
                Some(Chunk::End) => break,
                // The request side gave up: dropping `file` deletes it.
                None => return Ok(None),
            }
        }
        let hashed = file.finish(true)?;
        let (sha, len) = (hashed.sha(), hashed.len());
        let created = store::store_blob(&root, hashed)?;
        Ok(Some((sha, len, created)))
    });
    let mut body = PacedBody::new(body, &state.limits);
    let received = loop {
        match body.data().await {
            Ok(None) => break Ok(()),
            Ok(Some(data)) => {
                // A closed channel means the writer failed; its error is reported below.
                if tx.send(Chunk::Data(data)).await.is_err() {
                    break Ok(());
                }
            }
            Err(e) => break Err(e),
        }
    };
    match received {
        Ok(()) => {
            let _ = tx.send(Chunk::End).await;
        }
        Err(e) => {
            drop(tx);
            let _ = writer.await;
            info!(received = body.received(), "upload aborted: {e}");
            return match e {
                BodyError::TooSlow => {
                    closing(text(StatusCode::REQUEST_TIMEOUT, "upload body too slow\n"))
                }
                BodyError::Broken(_) => text(StatusCode::BAD_REQUEST, "upload body incomplete\n"),
            };
        }
    }
    match writer.await {
        Ok(Ok(Some((sha, len, created)))) => {
            info!(sha512 = %sha.short(16), bytes = len, new = created, "blob uploaded");
            text(StatusCode::CREATED, sha.hex())
        }
        Ok(Ok(None)) => internal("storing an upload", &"writer stopped early"),
        Ok(Err(e)) => internal("storing an upload", &e),
        Err(e) => internal("storing an upload", &e),
    }
}

/// `GET`/`HEAD /shacache/<name>`.
pub(crate) async fn download(
    state: &State,
    name: &str,
    head: bool,
    headers: &HeaderMap,
) -> Response<Body> {
    let Ok(sha) = Sha512::parse(name) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let path = store::blob_path(&state.root, &sha);
    // A HEAD needs the size only: one `stat` on this thread (a few µs for a blob's
    // directory entry, where two hops to the blocking pool cost more, and a cold `ls -l`
    // of a big key makes one HEAD per entry). A GET opens and stats in one hop.
    let opened = if head {
        std::fs::metadata(&path).map(|m| (None, m))
    } else {
        tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&path)?;
            let m = f.metadata()?;
            Ok((Some(f), m))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
    };
    let (file, total) = match opened {
        Ok((f, m)) if m.is_file() => (f, m.len()),
        Ok(_) => return internal("opening a blob", &"not a regular file"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return text(StatusCode::NOT_FOUND, "not found\n")
        }
        Err(e) => return internal("opening a blob", &e),
    };
    // A blob never changes, so its name is a strong validator.
    let etag = format!("\"{}\"", sha.hex());
    let mut ranges = headers.get_all(RANGE).iter();
    let range = match (ranges.next(), ranges.next()) {
        (Some(v), None) if if_range_holds(headers, &etag) => v
            .to_str()
            .map_or(ByteRange::Full, |v| parse_range(v, total)),
        _ => ByteRange::Full,
    };
    let (status, start, len) = match range {
        ByteRange::Full => (StatusCode::OK, 0, total),
        ByteRange::Part(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        ByteRange::Unsatisfiable => {
            let mut r = empty(StatusCode::RANGE_NOT_SATISFIABLE);
            set(&mut r, CONTENT_RANGE, format!("bytes */{total}"));
            set(&mut r, ACCEPT_RANGES, "bytes".into());
            set(&mut r, CONTENT_LENGTH, "0".into());
            return r;
        }
    };
    let body = match file {
        Some(file) if len > 0 => file_body(file, start, len),
        _ => full(Bytes::new()),
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    set(&mut r, CONTENT_TYPE, "application/octet-stream".into());
    set(&mut r, CONTENT_LENGTH, len.to_string());
    set(&mut r, ACCEPT_RANGES, "bytes".into());
    set(&mut r, CACHE_CONTROL, CACHE_FOREVER.into());
    set(&mut r, ETAG, etag);
    if status == StatusCode::PARTIAL_CONTENT {
        set(
            &mut r,
            CONTENT_RANGE,
            format!("bytes {start}-{}/{total}", start + len - 1),
        );
    }
    r
}

/// `len` bytes of `file` from `start`, in [`READ_CHUNK`] pieces, each read on the
/// blocking pool straight into the buffer that is sent, the next one read while this
/// one goes out. (`tokio::fs::File` copied each chunk twice, from its own buffer into
/// the stream's, and hopped to the pool for every read of at most the stream's
/// capacity; no thread is held between chunks here either, so a slow client pins none.)
fn file_body(file: std::fs::File, start: u64, len: u64) -> Body {
    let file = Arc::new(file);
    let end = start + len;
    let read = move |pos: u64| {
        let file = file.clone();
        let n = (end - pos).min(READ_CHUNK as u64) as usize;
        let task = tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let mut buf = vec![0u8; n];
            file.read_exact_at(&mut buf, pos)?;
            Ok(Bytes::from(buf))
        });
        (task, pos + n as u64)
    };
    let first = read(start);
    let stream = futures_util::stream::unfold(Some(first), move |next| {
        let read = read.clone();
        async move {
            let (task, after) = next?;
            let chunk = match task.await {
                Ok(Ok(chunk)) => chunk,
                Ok(Err(e)) => return Some((Err(e), None)),
                Err(e) => return Some((Err(io::Error::other(e)), None)),
            };
            let following = (after < end).then(|| read(after));
            Some((Ok(chunk), following))
        }
    });
    StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync()
}

fn set(r: &mut Response<Body>, name: hyper::header::HeaderName, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        r.headers_mut().insert(name, v);
    }
}

/// Whether a `Range` may be honoured under `If-Range` (RFC 9110 §13.1.5): yes without
/// the header; otherwise only for exactly one strong entity tag equal to the blob's. A date
/// never matches (no `Last-Modified` is sent), nor does a weak tag: then the whole blob
/// is sent with 200.
fn if_range_holds(headers: &HeaderMap, etag: &str) -> bool {
    let mut values = headers.get_all(IF_RANGE).iter();
    match (values.next(), values.next()) {
        (None, _) => true,
        (Some(v), None) => v.to_str().is_ok_and(|v| v.trim() == etag),
        _ => false,
    }
}

/// What a `Range` header asks of a blob of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ByteRange {
    /// No usable range (absent, malformed, several ranges): send everything with 200.
    Full,
    /// Inclusive first and last byte, both inside the blob: 206.
    Part(u64, u64),
    /// A well-formed range that selects nothing: 416.
    Unsatisfiable,
}

/// Parses one `bytes=A-B`, `bytes=A-` or `bytes=-N` against a blob of `total` bytes.
pub(crate) fn parse_range(value: &str, total: u64) -> ByteRange {
    let value = value.trim();
    let Some(spec) = value
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("bytes="))
        .map(|_| value[6..].trim())
    else {
        return ByteRange::Full;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return ByteRange::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Some(n) = number(b) else {
            return ByteRange::Full;
        };
        if n == 0 || total == 0 {
            return ByteRange::Unsatisfiable;
        }
        return ByteRange::Part(total - n.min(total), total - 1);
    }
    let Some(start) = number(a) else {
        return ByteRange::Full;
    };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match number(b) {
            Some(end) if end >= start => end,
            _ => return ByteRange::Full,
        }
    };
    if start >= total {
        return ByteRange::Unsatisfiable;
    }
    ByteRange::Part(start, end.min(total - 1))
}

/// Decimal digits only; values too large for u64 saturate (they are beyond any blob).
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ByteRange::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-0", 10), Part(0, 0));
        assert_eq!(parse_range("bytes=2-5", 10), Part(2, 5));
        assert_eq!(parse_range("bytes=2-500", 10), Part(2, 9));
        assert_eq!(parse_range("Bytes= 3-", 10), Part(3, 9));
        assert_eq!(parse_range("bytes=-3", 10), Part(7, 9));
        assert_eq!(parse_range("bytes=-30", 10), Part(0, 9));
        assert_eq!(
            parse_range("bytes=-99999999999999999999999", 10),
            Part(0, 9)
        );
        assert_eq!(
            parse_range("bytes=0-99999999999999999999999", 10),
            Part(0, 9)
        );
    }

    #[test]
    fn unsatisfiable_ranges() {
        assert_eq!(parse_range("bytes=10-", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=10-20", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 10), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
        assert_eq!(
            parse_range("bytes=99999999999999999999999-", 10),
            Unsatisfiable
        );
    }

    #[test]
    fn ignored_ranges() {
        for v in [
            "",
            "bytes=",
            "bytes=-",
            "bytes=5-2",
            "bytes=0-1,3-4",
            "bytes=a-b",
            "bytes=+1-2",
            "items=0-1",
            "bytes=1",
            "bytes=--1",
            "bytés=0-1",
        ] {
            assert_eq!(parse_range(v, 10), Full, "{v:?}");
        }
    }
}
