//! Request dispatch: a path and a method to a handler of `blobs` or `dir`.
//!
//! Only two prefixes exist: `/shacache` (POST to it; GET/HEAD `/shacache/<sha512>`) and
//! `/shadir/<key>` (GET/HEAD/PUT). Everything else is 404; a known path with another
//! method is 405. The path is taken as sent (still percent-encoded), so `%2F` in a key
//! cannot split it into two segments. Query strings are ignored.

use super::auth::{self, Denied};
use super::response::{empty, text, Body};
use super::{blobs, dir, State};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use std::sync::Arc;
use tracing::debug;

/// Which resource a path names.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    /// `/shacache` or `/shacache/`: where blobs are POSTed.
    CacheRoot,
    /// `/shacache/<name>` (name not yet checked).
    Blob(&'a str),
    /// `/shadir/<segment>` (segment still percent-encoded, non-empty).
    Key(&'a str),
    NotFound,
}

fn route(path: &str) -> Route<'_> {
    if let Some(rest) = path.strip_prefix("/shacache") {
        if rest.is_empty() || rest == "/" {
            return Route::CacheRoot;
        }
        if let Some(name) = rest.strip_prefix('/') {
            if !name.contains('/') {
                return Route::Blob(name);
            }
        }
    } else if let Some(seg) = path.strip_prefix("/shadir/") {
        if !seg.is_empty() && !seg.contains('/') {
            return Route::Key(seg);
        }
    }
    Route::NotFound
}

/// Answers one request. Never fails: errors become status codes.
pub(crate) async fn handle(
    state: &Arc<State>,
    req: Request<Incoming>,
    client_cert: bool,
) -> Response<Body> {
    let method = req.method().clone();
    let path: String = req.uri().path().chars().take(300).collect();
    let resp = dispatch(state, req, client_cert).await;
    debug!(%method, %path, status = resp.status().as_u16(), "request");
    resp
}

async fn dispatch(state: &Arc<State>, req: Request<Incoming>, client_cert: bool) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let head = method == Method::HEAD;
    match (route(&path), method) {
        (Route::CacheRoot, Method::POST) => {
            if let Err(d) = auth::check_upload(state, req.headers(), client_cert) {
                drain(state, req.into_body()).await;
                return denied(d);
            }
            blobs::upload(state, req.into_body()).await
        }
        (Route::CacheRoot, _) => not_allowed("POST"),
        (Route::Blob(name), Method::GET | Method::HEAD) => {
            blobs::download(state, name, head, req.headers()).await
        }
        (Route::Blob(_), _) => not_allowed("GET, HEAD"),
        (Route::Key(seg), Method::GET | Method::HEAD) => dir::get(state, seg, head).await,
        (Route::Key(seg), Method::PUT) => {
            if let Err(d) = auth::check_upload(state, req.headers(), client_cert) {
                drain(state, req.into_body()).await;
                return denied(d);
            }
            dir::put(state, seg, req.into_body()).await
        }
        (Route::Key(_), _) => not_allowed("GET, HEAD, PUT"),
        (Route::NotFound, _) => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Reads and discards a refused upload's body (up to [`DRAIN_LIMIT`], under the body
/// limits), so the client, still sending, gets the refusal instead of a broken pipe.
async fn drain(state: &State, body: Incoming) {
    let mut body = super::limits::PacedBody::new(body, &state.limits);
    while body.received() < DRAIN_LIMIT {
        match body.data().await {
            Ok(Some(_)) => {}
            _ => return,
        }
    }
}

/// The most of a refused body read before answering anyway.
const DRAIN_LIMIT: u64 = 256 << 20;

fn denied(d: Denied) -> Response<Body> {
    match d {
        Denied::NoClientCert => text(
            StatusCode::FORBIDDEN,
            "uploads need a TLS client certificate\n",
        ),
        Denied::Login => {
            let mut r = empty(StatusCode::FOUND);
            r.headers_mut()
                .insert(LOCATION, HeaderValue::from_static("/login"));
            r
        }
    }
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/shacache"), Route::CacheRoot);
        assert_eq!(route("/shacache/"), Route::CacheRoot);
        assert_eq!(route("/shacache/abc"), Route::Blob("abc"));
        assert_eq!(route("/shacache/a/b"), Route::NotFound);
        assert_eq!(route("/shacachex"), Route::NotFound);
        assert_eq!(route("/shadir/k%2Fx"), Route::Key("k%2Fx"));
        assert_eq!(route("/shadir/"), Route::NotFound);
        assert_eq!(route("/shadir"), Route::NotFound);
        assert_eq!(route("/shadir/a/b"), Route::NotFound);
        assert_eq!(route("/abc"), Route::NotFound);
        assert_eq!(route("/"), Route::NotFound);
    }

    /// The dispatcher imports the handlers and the helpers; no handler imports it or
    /// another handler, and the helpers import nothing of the server: no cycle.
    #[test]
    fn handlers_and_helpers_never_import_the_dispatcher() {
        let code = |text: &'static str| -> String {
            let lines = text.lines().filter(|l| !l.trim_start().starts_with("//"));
            lines.collect::<Vec<_>>().join("\n")
        };
        let blobs = code(include_str!("blobs.rs"));
        let dir = code(include_str!("dir.rs"));
        let response = code(include_str!("response.rs"));
        for (file, text) in [("blobs.rs", &blobs), ("dir.rs", &dir)] {
            assert!(!text.contains("routes"), "{file} refers to routes");
            assert!(
                text.contains("super::response::"),
                "{file}: helpers elsewhere?"
            );
        }
        assert!(!blobs.contains("dir::") && !dir.contains("blobs::"));
        assert!(
            !response.contains("super::"),
            "response.rs imports from the server"
        );
    }
}
