//! The embedded shacache + shadir server (`shacachefs serve`): the protocol of
//! `protocol.md` plus HEAD and Range, over a directory.
//!
//! This module owns the options, the accept loop, TLS and graceful shutdown. The request
//! handling lives in submodules: `routes` (dispatch, response helpers), `blobs`
//! (shacache), `dir` (shadir), `auth` (who may upload) and [`store`] (the on-disk layout,
//! public so tests can find and tamper with stored data).
//!
//! Connections are served with hyper's HTTP/1 connection driver directly (no HTTP/2), so
//! plain TCP and TLS streams go through the same code; each connection knows whether its
//! peer presented a verified client certificate and hands that to every request.
//! On shutdown the listener is closed first (the port refuses connections), then every
//! connection is asked to finish its current request and close; whatever is still
//! running after [`SHUTDOWN_GRACE`] is aborted.

mod auth;
mod blobs;
mod dir;
mod reqline;
mod routes;
pub mod store;
mod tls;

pub use store::{blob_path, key_path, MAX_KEY_LEN};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// How long in-flight requests may run after shutdown was asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A client must finish the TLS handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
/// A client must send a request's headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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
    scheme: &'static str,
    /// Dropping this sender is the shutdown signal.
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl RunningServer {
    /// Base URLs: `http(s)://ADDR/shacache` and `http(s)://ADDR/shadir`.
    pub fn cache_url(&self) -> String {
        format!("{}://{}/shacache", self.scheme, self.addr)
    }
    pub fn dir_url(&self) -> String {
        format!("{}://{}/shadir", self.scheme, self.addr)
    }
    /// Stops accepting, lets in-flight requests finish (at most [`SHUTDOWN_GRACE`]) and
    /// returns once the listening socket is closed.
    pub async fn shutdown(mut self) {
        self.stop.take();
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("server stopped with an error: {e}"),
                Err(e) => warn!("server task failed: {e}"),
            }
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        // Dropping the sender resolves the shutdown future; the task winds down alone.
        self.stop.take();
    }
}

/// Shared by every connection of one server.
pub(crate) struct State {
    pub(crate) root: PathBuf,
    pub(crate) upload_user: Option<(String, String)>,
    /// Uploads need a verified TLS client certificate.
    pub(crate) require_client_cert: bool,
    /// Serialises shadir writes per key (striped: keys hash onto a fixed set of locks).
    pub(crate) key_locks: Vec<tokio::sync::Mutex<()>>,
    /// Uploads receiving a body at once; each holds a blocking writer thread, so beyond
    /// this the server answers 429 rather than let stalled clients exhaust the pool.
    pub(crate) uploads: std::sync::Arc<tokio::sync::Semaphore>,
}

impl State {
    fn open(opts: &ServerOptions) -> std::io::Result<Self> {
        std::fs::create_dir_all(opts.root.join(store::CACHE_DIR))?;
        std::fs::create_dir_all(opts.root.join(store::DIR_DIR))?;
        Ok(State {
            root: opts.root.clone(),
            upload_user: opts.upload_user.clone(),
            require_client_cert: opts
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca_file.is_some()),
            key_locks: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            uploads: std::sync::Arc::new(tokio::sync::Semaphore::new(blobs::MAX_UPLOADS)),
        })
    }
}

/// Serves on an already bound listener until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    opts: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let state = Arc::new(State::open(&opts)?);
    let acceptor = match &opts.tls {
        Some(t) => Some(tls::acceptor(t)?),
        None => None,
    };
    if let Ok(addr) = listener.local_addr() {
        info!(
            %addr,
            root = %opts.root.display(),
            tls = acceptor.is_some(),
            auth = opts.upload_user.is_some(),
            "shacache/shadir server listening"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    conns.spawn(connection(
                        tcp,
                        peer,
                        state.clone(),
                        acceptor.clone(),
                        stop_rx.clone(),
                    ));
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
        // Reap finished connections so the set does not grow with the server's age.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            "{} connection(s) still busy after {:?}; aborting them",
            conns.len(),
            SHUTDOWN_GRACE
        );
        conns.shutdown().await;
    }
    info!("server stopped");
    Ok(())
}

/// Binds `addr` (use `127.0.0.1:0` in tests) and serves in a tokio task.
pub async fn start(addr: SocketAddr, opts: ServerOptions) -> Result<RunningServer, ServerError> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    // Check the store and the TLS files now, so `start` reports their errors itself.
    State::open(&opts)?;
    if let Some(t) = &opts.tls {
        tls::acceptor(t)?;
    }
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, opts, async move {
        let _ = stopped.await;
    }));
    Ok(RunningServer {
        addr,
        scheme,
        stop: Some(stop),
        task: Some(task),
    })
}

/// One accepted TCP connection: TLS handshake if configured, then HTTP/1.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    acceptor: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = acceptor else {
        return drive(
            TokioIo::new(reqline::EncodeRequestLine::new(tcp)),
            peer,
            state,
            false,
            stop,
        )
        .await;
    };
    let handshake = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => r,
        _ = stop.wait_for(|s| *s) => return,
    };
    match handshake {
        Ok(Ok(stream)) => {
            // The verifier rejects bad certificates during the handshake, so a
            // certificate that is present here was verified against the client CA.
            let verified = stream
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            drive(
                TokioIo::new(reqline::EncodeRequestLine::new(stream)),
                peer,
                state,
                verified,
                stop,
            )
            .await
        }
        Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
        Err(_) => debug!(%peer, "TLS handshake timed out"),
    }
}

/// Runs HTTP/1 on a stream until the peer leaves or shutdown is asked for.
async fn drive<I>(
    io: I,
    peer: SocketAddr,
    state: Arc<State>,
    client_cert: bool,
    mut stop: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(routes::handle(&state, req, client_cert).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(%peer, "connection ended: {e}");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    if let Err(e) = conn.await {
        debug!(%peer, "connection ended during shutdown: {e}");
    }
}
