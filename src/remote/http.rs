//! Plumbing shared by every remote call: base URLs split from their credentials (sent as
//! HTTP Basic instead, and never shown), the status-code rules of the protocol, reqwest
//! error mapping, `Content-Range` parsing, and bounded retries with exponential backoff.

use super::{Limits, RemoteError};
use base64::Engine;
use percent_encoding::percent_decode_str;
use reqwest::header::{HeaderValue, CONTENT_LENGTH, LOCATION};
use reqwest::{Response, StatusCode};
use std::future::Future;
use std::time::{Duration, Instant};

/// Longest wait between two attempts, however many there are.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How much of an error answer's body is read to explain the error.
const DETAIL_BYTES: usize = 512;
/// How long reading that explanation may take.
const DETAIL_TIMEOUT: Duration = Duration::from_secs(2);

/// A configured base URL: the URL without `user:password@` (safe to log and to put in
/// errors) and the `Authorization` header made from those credentials.
#[derive(Clone)]
pub(crate) struct Endpoint {
    base: String,
    auth: Option<HeaderValue>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.base)
            .field("auth", &self.auth.is_some())
            .finish()
    }
}

impl Endpoint {
    /// Parses a configured base URL (`http` or `https`). Percent-encoding in the user
    /// name and password is decoded (`p%40ss` is the password `p@ss`).
    pub(crate) fn parse(raw: &str) -> Result<Endpoint, RemoteError> {
        let bad = |message: &str| RemoteError::Protocol {
            url: redact_url(raw),
            message: message.to_string(),
        };
        let mut url = url::Url::parse(raw.trim()).map_err(|e| bad(&format!("bad URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("only http and https URLs are supported"));
        }
        let auth = basic_auth(url.username(), url.password())?;
        if url.set_password(None).is_err() || url.set_username("").is_err() {
            return Err(bad("cannot remove the credentials from this URL"));
        }
        url.set_fragment(None);
        Ok(Endpoint {
            base: url.to_string(),
            auth,
        })
    }

    /// The base URL, credentials removed (what `POST` on shacache goes to).
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// `base/segment` (the segment is already percent-encoded).
    pub(crate) fn join(&self, segment: &str) -> String {
        crate::wire::join_url(&self.base, segment)
    }

    /// The `Authorization` header, when the URL had credentials.
    pub(crate) fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    pub(crate) fn is_https(&self) -> bool {
        self.base.starts_with("https:")
    }
}

/// `Authorization: Basic base64(user:password)` from a URL's (percent-encoded) user
/// info; `None` when the URL has none.
fn basic_auth(user: &str, password: Option<&str>) -> Result<Option<HeaderValue>, RemoteError> {
    if user.is_empty() && password.is_none() {
        return Ok(None);
    }
    let mut raw: Vec<u8> = percent_decode_str(user).collect();
    raw.push(b':');
    raw.extend(percent_decode_str(password.unwrap_or("")));
    let value = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    );
    let mut header = HeaderValue::from_str(&value).map_err(|_| RemoteError::Protocol {
        url: String::new(),
        message: "credentials do not fit in a header".into(),
    })?;
    header.set_sensitive(true);
    Ok(Some(header))
}

/// A URL as it may be shown: anything between `scheme://` and the last `@` of the
/// authority (the user info, password included) is removed. Works on text that is not a
/// valid URL too, since it is also used to report bad URLs.
pub fn redact_url(url: &str) -> String {
    // Without a scheme, the text up to the first `/` is taken as the authority.
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_len].rfind('@') {
        Some(at) => format!("{}{}", &url[..start], &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The error for an answer that is not what the call expected: redirects and
/// authentication refusals are `Refused` (shacache answers an unauthenticated upload
/// with a 302 to a login page), 404 is `NotFound`, anything else is `Status`. Reads a
/// little of the body to say why.
pub(crate) async fn status_error(url: &str, mut resp: Response) -> RemoteError {
    let status = resp.status();
    let url = url.to_string();
    if status.is_redirection() {
        let detail = match resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()) {
            Some(to) => format!(" (redirect to {}, not followed)", redact_url(to)),
            None => " (redirect, not followed)".to_string(),
        };
        return RemoteError::Refused {
            url,
            status: status.as_u16(),
            detail,
        };
    }
    if status == StatusCode::NOT_FOUND {
        return RemoteError::NotFound { url };
    }
    let detail = body_snippet(&mut resp).await;
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    };
    let status = status.as_u16();
    if matches!(status, 401 | 403 | 407) {
        RemoteError::Refused {
            url,
            status,
            detail,
        }
    } else {
        RemoteError::Status {
            url,
            status,
            detail,
        }
    }
}

/// The start of an error answer's body, as one printable line.
async fn body_snippet(resp: &mut Response) -> String {
    let mut raw = Vec::new();
    let read = async {
        while raw.len() < DETAIL_BYTES {
            match resp.chunk().await {
                Ok(Some(c)) => raw.extend_from_slice(&c[..c.len().min(DETAIL_BYTES - raw.len())]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DETAIL_TIMEOUT, read).await;
    let text = String::from_utf8_lossy(&raw);
    let line: String = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    line
}

/// Whether a failed attempt may succeed if tried again: network errors, timeouts, and
/// server errors that say "try later". A 501 (not implemented) or any other 4xx will not
/// change; refusals, protocol violations and corrupt data are not retried either.
pub(crate) fn is_retryable(e: &RemoteError) -> bool {
    match e {
        RemoteError::Network { .. } | RemoteError::Timeout { .. } => true,
        RemoteError::Status { status, .. } => retryable_status(*status),
        _ => false,
    }
}

fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || ((500..600).contains(&status) && !matches!(status, 501 | 505))
}

/// Delay before retry number `retry` (1 for the first retry): `first`, doubled each
/// time, at most [`MAX_BACKOFF`].
pub(crate) fn backoff_delay(first: Duration, retry: u32) -> Duration {
    let factor = 1u32 << retry.saturating_sub(1).min(16);
    first.saturating_mul(factor).min(MAX_BACKOFF)
}

/// Runs `op` up to `limits.attempts` times while it fails with a retryable error,
/// sleeping with exponential backoff in between. Returns the last result.
pub(crate) async fn retry<T, F, Fut>(
    limits: &Limits,
    what: &str,
    url: &str,
    mut op: F,
) -> Result<T, RemoteError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RemoteError>>,
{
    let attempts = limits.attempts.max(1);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < attempts && is_retryable(&e) => {
                let delay = backoff_delay(limits.backoff, attempt);
                tracing::warn!(
                    %what, %url, attempt, attempts, error = %e,
                    "remote call failed, retrying in {delay:?}"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// A reqwest failure as a `RemoteError` naming `url` (already free of credentials).
pub(crate) fn net_error(url: &str, e: reqwest::Error) -> RemoteError {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut message = error_chain(&e);
    if let Some(hint) = super::tls::refusal_hint(&e) {
        message = format!("{message} ({hint})");
    }
    if timeout {
        RemoteError::Timeout {
            url: url.to_string(),
            message,
        }
    } else {
        RemoteError::Network {
            url: url.to_string(),
            message,
        }
    }
}

/// An error and its sources, "a: b: c", without repeating a message its source
/// already gives.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if parts.last().is_none_or(|last| !last.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// The timeout error for `url`.
pub(crate) fn timeout_error(url: &str, message: impl Into<String>) -> RemoteError {
    RemoteError::Timeout {
        url: url.to_string(),
        message: message.into(),
    }
}

/// The protocol-violation error for `url`.
pub(crate) fn protocol_error(url: &str, message: impl Into<String>) -> RemoteError {
    RemoteError::Protocol {
        url: url.to_string(),
        message: message.into(),
    }
}

/// The `Content-Length` header, when present and a number (not the body's size hint,
/// which is 0 for an answer to HEAD).
pub(crate) fn content_length(resp: &Response) -> Option<u64> {
    resp.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A parsed `Content-Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContentRange {
    /// `bytes FIRST-LAST/TOTAL` (`TOTAL` may be `*`: unknown).
    Bytes {
        first: u64,
        last: u64,
        total: Option<u64>,
    },
    /// `bytes */TOTAL`, sent with a 416.
    Unsatisfied { total: u64 },
}

/// Parses `Content-Range` (RFC 9110 §14.4); `None` when malformed or inconsistent.
pub(crate) fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?;
    let rest = rest.strip_prefix(' ')?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = total.trim();
    if range.trim() == "*" {
        return Some(ContentRange::Unsatisfied {
            total: parse_digits(total)?,
        });
    }
    let (first, last) = range.trim().split_once('-')?;
    let (first, last) = (parse_digits(first)?, parse_digits(last)?);
    let total = if total == "*" {
        None
    } else {
        Some(parse_digits(total)?)
    };
    if last < first || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some(ContentRange::Bytes { first, last, total })
}

fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The `Content-Range` of an answer, parsed.
pub(crate) fn content_range(resp: &Response) -> Option<ContentRange> {
    parse_content_range(
        resp.headers()
            .get(reqwest::header::CONTENT_RANGE)?
            .to_str()
            .ok()?,
    )
}

/// Logs one finished exchange (its answer's head) at debug level.
pub(crate) fn log_answer(method: &str, url: &str, started: Instant, status: StatusCode) {
    tracing::debug!(
        %method, %url, status = status.as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "remote answer"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_removes_user_info_only() {
        assert_eq!(
            redact_url("http://u:p%40ss@h.example:8080/x/y?a=b@c"),
            "http://h.example:8080/x/y?a=b@c"
        );
        assert_eq!(redact_url("https://user@h/x"), "https://h/x");
        assert_eq!(redact_url("https://a@b:c@h/x"), "https://h/x");
        assert_eq!(redact_url("http://h/x@y"), "http://h/x@y");
        assert_eq!(redact_url("http://h"), "http://h");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("http://u:secret@"), "http://");
        assert_eq!(redact_url("u:secret@h/x"), "h/x");
    }

    #[test]
    fn credentials_become_basic_auth_and_leave_the_url() {
        let e = Endpoint::parse("http://u:p%40ss@127.0.0.1:8080/shacache").unwrap();
        assert_eq!(e.base(), "http://127.0.0.1:8080/shacache");
        let expected = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("u:p@ss")
        );
        assert_eq!(e.auth().unwrap().to_str().unwrap(), expected);
        assert!(e.auth().unwrap().is_sensitive());
        assert!(!format!("{e:?}").contains("p%40ss"));
        assert_eq!(e.join("k"), "http://127.0.0.1:8080/shacache/k");

        let bare = Endpoint::parse("https://h.example").unwrap();
        assert!(bare.auth().is_none());
        assert!(bare.is_https());
        assert_eq!(bare.join("a%20b"), "https://h.example/a%20b");

        let user_only = Endpoint::parse("http://me@h/").unwrap();
        assert_eq!(user_only.auth().unwrap().to_str().unwrap(), "Basic bWU6");
    }

    #[test]
    fn bad_urls_are_refused_without_their_password() {
        for raw in ["ftp://u:secret@h/x", "http://u:secret@", "u:secret@h"] {
            let err = Endpoint::parse(raw).unwrap_err();
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }

    #[test]
    fn content_range_parsing() {
        use ContentRange::*;
        assert_eq!(
            parse_content_range("bytes 0-0/1234"),
            Some(Bytes {
                first: 0,
                last: 0,
                total: Some(1234)
            })
        );
        assert_eq!(
            parse_content_range("bytes 100-199/*"),
            Some(Bytes {
                first: 100,
                last: 199,
                total: None
            })
        );
        assert_eq!(
            parse_content_range("bytes */0"),
            Some(Unsatisfied { total: 0 })
        );
        for bad in [
            "bytes 5-4/10",
            "bytes 0-10/10",
            "bytes -1-3/10",
            "items 0-1/2",
            "bytes 0-1",
            "bytes */*",
            "bytes a-b/c",
            "",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }

    #[test]
    fn retry_classification() {
        let url = String::from("http://h/x");
        let status = |status| RemoteError::Status {
            url: url.clone(),
            status,
            detail: String::new(),
        };
        assert!(is_retryable(&status(500)));
        assert!(is_retryable(&status(503)));
        assert!(is_retryable(&status(429)));
        assert!(!is_retryable(&status(501)));
        assert!(!is_retryable(&status(400)));
        assert!(is_retryable(&timeout_error(&url, "slow")));
        assert!(is_retryable(&RemoteError::Network {
            url: url.clone(),
            message: "reset".into()
        }));
        assert!(!is_retryable(&RemoteError::Refused {
            url: url.clone(),
            status: 302,
            detail: String::new()
        }));
        assert!(!is_retryable(&RemoteError::NotFound { url: url.clone() }));
        assert!(!is_retryable(&protocol_error(&url, "bad")));
        assert!(!is_retryable(&RemoteError::TooLarge { url, limit: 1 }));
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let first = Duration::from_millis(250);
        assert_eq!(backoff_delay(first, 1), first);
        assert_eq!(backoff_delay(first, 2), Duration::from_millis(500));
        assert_eq!(backoff_delay(first, 3), Duration::from_secs(1));
        assert_eq!(backoff_delay(first, 40), MAX_BACKOFF);
    }

    #[tokio::test]
    async fn retry_stops_after_the_allowed_attempts() {
        let limits = Limits {
            attempts: 3,
            backoff: Duration::from_millis(1),
            ..Limits::default()
        };
        let mut calls = 0;
        let r: Result<(), _> = retry(&limits, "GET", "u", || {
            calls += 1;
            async { Err(timeout_error("u", "slow")) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 3);

        let mut calls = 0;
        let r: Result<(), _> = retry(&limits, "GET", "u", || {
            calls += 1;
            async { Err(protocol_error("u", "bad")) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
