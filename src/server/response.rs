//! The response helpers shared by the handlers (`blobs`, `dir`) and the dispatcher
//! (`routes`). It imports none of them, so the server's modules form no cycle.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use std::io;

/// The body of every response: a fixed buffer or a file stream.
pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;

/// A response with a short plain-text body.
pub(crate) fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from(msg.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A response without a body.
pub(crate) fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *r.status_mut() = status;
    r
}

/// A body from a buffer.
pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A 500 for an I/O failure; the details go to the log, not to the client.
pub(crate) fn internal(what: &str, e: &dyn std::fmt::Display) -> Response<Body> {
    tracing::error!("{what}: {e}");
    text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
}

/// A response after which the connection is closed (the rest of the body is not read).
pub(crate) fn closing(mut r: Response<Body>) -> Response<Body> {
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}
