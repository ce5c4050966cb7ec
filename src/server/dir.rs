//! shadir: serving a key's list (GET/HEAD) and appending an entry to it (PUT).
//!
//! The key is the URL path segment percent-decoded to bytes (so `a%20b` and a raw
//! `a b` are one key); it is never used as a path itself, only through
//! [`store::key_path`]. A PUT body is checked the way production checks it (a two-string
//! array, base64 signature, an inner object whose `sha512` is 128 hex digits of either
//! case) and answered 400 with a one-line reason otherwise.
//!
//! Writers of one key are serialised by a striped async lock and publish the whole new
//! list with an fsynced temp-file-then-rename, so concurrent PUTs lose nothing and a
//! reader always sees a complete list. This holds within one server process only.

use super::routes::{empty, full, internal, text, Body};
use super::{store, State};
use crate::wire::{self, RawEntry, WireError};
use base64::Engine;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use percent_encoding::percent_decode_str;
use serde_json::Value;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
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
    let len = match file.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => return internal("opening a shadir list", &"not a regular file"),
        Err(e) => return internal("opening a shadir list", &e),
    };
    // The file is replaced by rename, never rewritten in place, so the open file is one
    // consistent version whatever writers do meanwhile.
    let (body, len) = if len == 0 {
        (Bytes::from_static(b"[]"), 2)
    } else {
        (Bytes::new(), len)
    };
    let body = if head {
        full(Bytes::new())
    } else if !body.is_empty() {
        full(body)
    } else {
        let stream = tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK);
        StreamBody::new(stream.map_ok(Frame::data)).boxed_unsync()
    };
    let mut r = Response::new(body);
    let headers = r.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// `PUT /shadir/<key>`: appends `[inner, signature]` unless already listed; 201.
pub(crate) async fn put(state: &State, segment: &str, body: Incoming) -> Response<Body> {
    let key = match decode_key(segment) {
        Ok(k) => k,
        Err(bad) => return bad.response(),
    };
    let bytes = match Limited::new(body, MAX_PUT_BODY).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n")
        }
        Err(e) => {
            debug!("shadir PUT body incomplete: {e}");
            return text(StatusCode::BAD_REQUEST, "body incomplete\n");
        }
    };
    let entry = match check_put_body(&bytes) {
        Ok(e) => e,
        Err(reason) => return text(StatusCode::BAD_REQUEST, format!("{reason}\n")),
    };
    let lock = &state.key_locks[stripe(&key, state.key_locks.len())];
    let _guard = lock.lock().await;
    let root = state.root.clone();
    let key_for_store = key.clone();
    let stored =
        tokio::task::spawn_blocking(move || store::append_entry(&root, &key_for_store, &entry))
            .await;
    match stored {
        Ok(Ok(true)) => info!(key = %show(&key), "shadir entry added"),
        Ok(Ok(false)) => debug!(key = %show(&key), "shadir entry already listed"),
        Ok(Err(e)) => return internal("storing a shadir entry", &e),
        Err(e) => return internal("storing a shadir entry", &e),
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
