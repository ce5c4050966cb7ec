//! shadir: serving a key's list (GET/HEAD) and appending an entry to it (PUT).
//!
//! The key is the URL path segment percent-decoded to bytes (so `a%20b` and a raw
//! `a b` are one key); it is never used as a path itself, only through
//! [`store::key_path`]. A PUT body is checked the way production checks it (a two-string
//! array, base64 signature, an inner object whose `sha512` is 128 hex digits of either
//! case) and answered 400 with a one-line reason otherwise.
//!
//! Writers of one key are serialised by a striped async lock and append to the key's
//! list file, committing through its header (see [`store`]), so concurrent PUTs lose
//! nothing and a reader always sees a complete list. This holds within one server process
//! only. The lock, the append and the commit run in a task of their own: a client that
//! hangs up cannot cancel them half-way, and a 201 is only sent once the entry is stored.

use super::limits::{BodyError, PacedBody};
use super::response::{closing, empty, full, internal, text, Body};
use super::{store, State};
use crate::wire::{self, RawEntry, WireError};
use base64::Engine;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::Value;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{debug, info};

/// The largest PUT body accepted (one entry; real ones are well under a KiB).
pub(crate) const MAX_PUT_BODY: usize = 1024 * 1024;
/// Read size when streaming a list out.
const READ_CHUNK: usize = 64 * 1024;

/// Why a path segment names no key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BadKey {
    Empty,
    TooLong,
}

impl BadKey {
    fn response(self) -> Response<Body> {
        match self {
            BadKey::Empty => text(StatusCode::NOT_FOUND, "not found\n"),
            BadKey::TooLong => text(
                StatusCode::URI_TOO_LONG,
                format!("key longer than {} bytes\n", store::MAX_KEY_LEN),
            ),
        }
    }
}

/// The key a path segment names (percent-decoded bytes).
fn decode_key(segment: &str) -> Result<Vec<u8>, BadKey> {
    let key: Vec<u8> = percent_decode_str(segment).collect();
    if key.is_empty() {
        return Err(BadKey::Empty);
    }
    if key.len() > store::MAX_KEY_LEN {
        return Err(BadKey::TooLong);
    }
    Ok(key)
}

/// A key for the logs: lossy, bounded.
fn show(key: &[u8]) -> String {
    String::from_utf8_lossy(&key[..key.len().min(120)]).into_owned()
}

/// `GET`/`HEAD /shadir/<key>`: the stored list, 404 when the key was never written.
pub(crate) async fn get(state: &State, segment: &str, head: bool) -> Response<Body> {
    let key = match decode_key(segment) {
        Ok(k) => k,
        Err(bad) => return bad.response(),
    };
    let path = store::key_path(&state.root, &key);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return text(StatusCode::NOT_FOUND, "not found\n")
        }
        Err(e) => return internal("opening a shadir list", &e),
    };
    // The committed end is read after opening the list and before its length: an
    // append only ever grows the file past it, so the bytes before it are stable.
    let list = path.clone();
    let header = match tokio::task::spawn_blocking(move || store::read_index_header(&list)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return internal("reading a shadir index", &e),
        Err(e) => return internal("reading a shadir index", &e),
    };
    let (len, inode) = match file.metadata().await {
        Ok(m) if m.is_file() => (m.len(), std::os::unix::fs::MetadataExt::ino(&m)),
        Ok(_) => return internal("opening a shadir list", &"not a regular file"),
        Err(e) => return internal("opening a shadir list", &e),
    };
    let (len, body) = match header.and_then(|h| h.committed_prefix(inode, len)) {
        Some(prefix) => (prefix + 1, stream(file.take(prefix).chain(&b"]"[..]))),
        None if len == 0 => (2, full(Bytes::from_static(b"[]"))),
        None => (len, stream(file)),
    };
    let body = if head { full(Bytes::new()) } else { body };
    let mut r = Response::new(body);
    let headers = r.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    r
}

fn stream(reader: impl AsyncRead + Send + 'static) -> Body {
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, READ_CHUNK);
    StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync()
}

/// `PUT /shadir/<key>`: appends `[inner, signature]` unless already listed; 201.
pub(crate) async fn put(state: &Arc<State>, segment: &str, body: Incoming) -> Response<Body> {
    let key = match decode_key(segment) {
        Ok(k) => k,
        Err(bad) => return bad.response(),
    };
    let mut body = PacedBody::new(body, &state.limits);
    let mut bytes = Vec::new();
    loop {
        match body.data().await {
            Ok(Some(chunk)) => {
                if bytes.len() + chunk.len() > MAX_PUT_BODY {
                    return closing(text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"));
                }
                bytes.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(BodyError::TooSlow) => {
                info!(key = %show(&key), received = body.received(), "shadir PUT body too slow");
                return closing(text(StatusCode::REQUEST_TIMEOUT, "body too slow\n"));
            }
            Err(e) => {
                debug!("shadir PUT body incomplete: {e}");
                return text(StatusCode::BAD_REQUEST, "body incomplete\n");
            }
        }
    }
    let entry = match check_put_body(&bytes) {
        Ok(e) => e,
        Err(reason) => return text(StatusCode::BAD_REQUEST, format!("{reason}\n")),
    };
    let lock = state.key_locks[stripe(&key, state.key_locks.len())].clone();
    let root = state.root.clone();
    let key_for_store = key.clone();
    // Detached: dropping this request (the client hung up) does not stop the write nor
    // release the key's lock before the write is done.
    let stored = tokio::spawn(async move {
        let _guard = lock.lock_owned().await;
        tokio::task::spawn_blocking(move || store::append_entry(&root, &key_for_store, &entry))
            .await
    })
    .await;
    match stored {
        Ok(Ok(Ok(true))) => info!(key = %show(&key), "shadir entry added"),
        Ok(Ok(Ok(false))) => debug!(key = %show(&key), "shadir entry already listed"),
        Ok(Ok(Err(e))) => return internal("storing a shadir entry", &e),
        Ok(Err(e)) | Err(e) => return internal("storing a shadir entry", &e),
    }
    empty(StatusCode::CREATED)
}

fn stripe(key: &[u8], n: usize) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % n.max(1) as u64) as usize
}

/// Checks a PUT body; the error is the reason given to the client.
pub(crate) fn check_put_body(body: &[u8]) -> Result<RawEntry, String> {
    let entry = wire::parse_put_body(body).map_err(|e| match e {
        WireError::NotJson(m) => format!("body is not JSON: {m}"),
        _ => "body must be a JSON array of two strings: [inner, signature]".to_string(),
    })?;
    if !entry.signature.is_empty()
        && base64::engine::general_purpose::STANDARD
            .decode(&entry.signature)
            .is_err()
    {
        return Err("signature is not base64".into());
    }
    let inner: Value =
        serde_json::from_str(&entry.inner).map_err(|e| format!("inner is not JSON: {e}"))?;
    let Value::Object(inner) = inner else {
        return Err("inner is not a JSON object".into());
    };
    let Some(Value::String(sha)) = inner.get("sha512") else {
        return Err("inner has no \"sha512\" string".into());
    };
    if sha.len() != 128 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("sha512 is not 128 hex digits".into());
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "af069ac6a781ffdf3999e6e85dd4ad3c7bd7fa911bc350852877713eef390e3a9ce89663ad621544ccf2e27cd7cd3e9c37c444b962f9a35d44884de03e292c1c";

    fn body(inner: &str, sig: &str) -> Vec<u8> {
        RawEntry {
            inner: inner.into(),
            signature: sig.into(),
        }
        .to_put_body()
        .into_bytes()
    }

    #[test]
    fn good_bodies() {
        let inner = format!(r#"{{"sha512": "{SHA}", "url": "x"}}"#);
        assert!(check_put_body(&body(&inner, "")).is_ok());
        assert!(check_put_body(&body(&inner, "c2lnbmF0dXJl")).is_ok());
        let upper = format!(r#"{{"sha512": "{}"}}"#, SHA.to_uppercase());
        assert!(check_put_body(&body(&upper, "")).is_ok());
    }

    #[test]
    fn bad_bodies() {
        let inner = format!(r#"{{"sha512": "{SHA}"}}"#);
        let cases: Vec<Vec<u8>> = vec![
            b"nope".to_vec(),
            b"{}".to_vec(),
            br#"["a"]"#.to_vec(),
            br#"["a", "b", "c"]"#.to_vec(),
            br#"[1, ""]"#.to_vec(),
            body(&inner, "not base64!"),
            body(&inner, "c2ln\n"),
            body("[1]", ""),
            body("nope", ""),
            body("{}", ""),
            body(r#"{"sha512": 1}"#, ""),
            body(&format!(r#"{{"sha512": "{}"}}"#, &SHA[1..]), ""),
            body(&format!(r#"{{"sha512": "{}g"}}"#, &SHA[1..]), ""),
        ];
        for c in cases {
            assert!(
                check_put_body(&c).is_err(),
                "{}",
                String::from_utf8_lossy(&c)
            );
        }
    }

    #[test]
    fn keys_from_segments() {
        assert_eq!(decode_key("a%20b").unwrap(), b"a b");
        assert_eq!(decode_key("a%2Fb%00").unwrap(), b"a/b\0");
        assert_eq!(decode_key("%FF").unwrap(), [0xff]);
        assert_eq!(decode_key("").unwrap_err(), BadKey::Empty);
        let long = "a".repeat(store::MAX_KEY_LEN + 1);
        assert_eq!(decode_key(&long).unwrap_err(), BadKey::TooLong);
        assert!(decode_key(&long[1..]).is_ok());
    }
}
