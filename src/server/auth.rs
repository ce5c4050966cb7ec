//! Who may upload. Reads are always open; POST and PUT need, when configured, HTTP Basic
//! credentials and/or a verified TLS client certificate.
//!
//! Missing or wrong credentials get **302 to `/login`**, as the production server
//! answers (clients must treat anything but 201 as failure and not follow it). A missing
//! client certificate gets **403**: the TLS layer already knows who the peer is, so there
//! is no login page to send it to. The certificate is checked first. Authorization headers
//! are never logged.

use super::State;
use base64::Engine;
use hyper::header::AUTHORIZATION;
use hyper::HeaderMap;

/// Why an upload was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Denied {
    /// No verified client certificate: 403.
    NoClientCert,
    /// No or wrong Basic credentials: 302 to the login page.
    Login,
}

/// Checks that this request may write.
pub(crate) fn check_upload(
    state: &State,
    headers: &HeaderMap,
    client_cert: bool,
) -> Result<(), Denied> {
    if state.require_client_cert && !client_cert {
        return Err(Denied::NoClientCert);
    }
    if let Some((user, pass)) = &state.upload_user {
        let ok = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| basic_matches(v, user, pass));
        if !ok {
            return Err(Denied::Login);
        }
    }
    Ok(())
}

/// True when `header` is `Basic base64(user:pass)` with exactly these credentials.
fn basic_matches(header: &str, user: &str, pass: &str) -> bool {
    let Some((scheme, token)) = header.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(token.trim()) else {
        return false;
    };
    let expected = format!("{user}:{pass}");
    constant_time_eq(&decoded, expected.as_bytes())
}

/// Compares without stopping at the first difference, so timing says nothing about
/// how much of a guessed password was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn basic_credentials() {
        assert!(basic_matches(
            &format!("Basic {}", b64("u:p:w")),
            "u",
            "p:w"
        ));
        assert!(basic_matches(&format!("basic  {}", b64("u:p")), "u", "p"));
        assert!(!basic_matches(&format!("Basic {}", b64("u:x")), "u", "p"));
        assert!(!basic_matches(&format!("Basic {}", b64("u:pp")), "u", "p"));
        assert!(!basic_matches(&format!("Bearer {}", b64("u:p")), "u", "p"));
        assert!(!basic_matches("Basic !!!", "u", "p"));
        assert!(!basic_matches("Basic", "u", "p"));
    }
}
