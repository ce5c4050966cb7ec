//! The embedded shacache + shadir server (`shacachefs serve`): the protocol of
//! `protocol.md` plus HEAD and Range, over a directory.
//!
//! STUB: interface fixed, implementation pending (see the helper brief).

use std::net::SocketAddr;
use std::path::PathBuf;

/// TLS settings of the server.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, uploads (POST, PUT) require a client certificate signed by this CA.
    pub client_ca_file: Option<PathBuf>,
}

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The store: `ROOT/shacache/…` and `ROOT/shadir/…`.
    pub root: PathBuf,
    /// `USER:PASS` required (HTTP Basic) for POST and PUT.
    pub upload_user: Option<(String, String)>,
    pub tls: Option<TlsOptions>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

/// A server running in the background (tests, the embedded default). Stops when
/// [`RunningServer::shutdown`] is called or when dropped.
pub struct RunningServer {
    pub addr: SocketAddr,
}

impl RunningServer {
    /// Base URLs: `http(s)://ADDR/shacache` and `http(s)://ADDR/shadir`.
    pub fn cache_url(&self) -> String {
        todo!()
    }
    pub fn dir_url(&self) -> String {
        todo!()
    }
    pub async fn shutdown(self) {
        todo!()
    }
}

/// Serves on an already bound listener until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let _ = (listener, opts, shutdown);
    todo!("server::serve")
}

/// Binds `addr` (use `127.0.0.1:0` in tests) and serves in a tokio task.
pub async fn start(addr: SocketAddr, opts: ServerOptions) -> Result<RunningServer, ServerError> {
    let _ = (addr, opts);
    todo!("server::start")
}
