//! Proxies from the conventional variables (`http_proxy`, `https_proxy`, `no_proxy`,
//! lower case first, then upper case). reqwest's own system-proxy support is compiled
//! out, so the variables are read here, through a lookup function the caller provides
//! (only [`super::Remote::new`] passes the real environment).

use super::http::redact_url;
use super::RemoteError;
use reqwest::{NoProxy, Proxy};

/// Always reached directly: a proxy cannot reach the host's own loopback.
const LOOPBACK: &str = "localhost,127.0.0.0/8,::1";

/// The proxies the variables ask for (none when unset or empty).
pub(crate) fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<Proxy>, RemoteError> {
    let var = |lower: &str, upper: &str| {
        env(lower)
            .or_else(|| env(upper))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let no_proxy = match var("no_proxy", "NO_PROXY") {
        Some(list) => format!("{list},{LOOPBACK}"),
        None => LOOPBACK.to_string(),
    };
    let mut proxies = Vec::new();
    for (lower, upper, https) in [
        ("http_proxy", "HTTP_PROXY", false),
        ("https_proxy", "HTTPS_PROXY", true),
    ] {
        let Some(url) = var(lower, upper) else {
            continue;
        };
        let proxy = if https {
            Proxy::https(url.as_str())
        } else {
            Proxy::http(url.as_str())
        }
        .map_err(|e| RemoteError::Protocol {
            url: redact_url(&url),
            message: format!("unusable proxy in {lower}: {e}"),
        })?;
        tracing::debug!(variable = lower, proxy = %redact_url(&url), "using a proxy");
        proxies.push(proxy.no_proxy(NoProxy::from_string(&no_proxy)));
    }
    Ok(proxies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_variables_no_proxy() {
        assert!(from_env(&env_of(&[])).unwrap().is_empty());
        assert!(from_env(&env_of(&[("http_proxy", " ")]))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn lower_and_upper_case_are_read() {
        let p = from_env(&env_of(&[
            ("HTTP_PROXY", "http://proxy:3128"),
            ("https_proxy", "http://proxy:3129"),
        ]))
        .unwrap();
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn a_bad_proxy_is_reported_without_its_password() {
        let err = from_env(&env_of(&[("http_proxy", "http://u:secret@[::bad")])).unwrap_err();
        assert!(err.to_string().contains("http_proxy"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
    }
}
