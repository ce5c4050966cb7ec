//! The embedded shacache + shadir server (`shacachefs serve`): the protocol of
//! `protocol.md` plus HEAD and Range, over a directory.
//!
//! This module owns the options, the accept loop, TLS and graceful shutdown. The request
//! handling lives in submodules: `routes` (dispatch), `response` (helpers), `blobs`
//! (shacache), `dir` (shadir), `auth` (who may upload) and [`store`] (the on-disk layout,
//! public so tests can find and tamper with stored data).
//!
//! Connections are served with hyper's HTTP/1 connection driver directly (no HTTP/2), so
//! plain TCP and TLS streams go through the same code; each connection knows whether its
//! peer presented a verified client certificate and hands that to every request.
//! On shutdown the listener is closed first (the port refuses connections), then every
//! connection is asked to finish its current request and close; whatever is still
//! running after [`SHUTDOWN_GRACE`] is aborted.
//!
//! What one client may hold is bounded by [`Limits`] (connections in total and per
//! client, header, body and send timeouts, a minimum body rate). At start, temporary files
//! a killed server left (`.tmp-*`: uploads and list rewrites being received) are removed,
//! unless another server is running on the same root (an `flock` on the root directory
//! tells: taken exclusively to clean, then held shared for the server's life).

mod auth;
mod blobs;
mod dir;
mod limits;
pub mod metrics;
mod reqline;
mod response;
mod routes;
pub mod store;
mod tls;

pub use limits::Limits;
pub use metrics::ServerMetrics;
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
    /// Its counters (what `serve --metrics-listen` exposes).
    pub metrics: Arc<ServerMetrics>,
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
    pub(crate) limits: Limits,
    /// Serialises shadir writes per key (striped: keys hash onto a fixed set of locks).
    pub(crate) key_locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    /// Uploads receiving a body at once; each holds a blocking writer thread, so beyond
    /// this the server answers 429 rather than let stalled clients exhaust the pool.
    pub(crate) uploads: std::sync::Arc<tokio::sync::Semaphore>,
    pub(crate) metrics: Arc<ServerMetrics>,
    /// The root directory, `flock`ed shared while this server runs.
    _root_lock: std::fs::File,
}

impl State {
    fn open(
        opts: &ServerOptions,
        limits: &Limits,
        metrics: Arc<ServerMetrics>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(opts.root.join(store::CACHE_DIR))?;
        std::fs::create_dir_all(opts.root.join(store::DIR_DIR))?;
        let root_lock = std::fs::File::open(&opts.root)?;
        if flock(&root_lock, libc::LOCK_EX | libc::LOCK_NB)? {
            let removed = store::remove_temporaries(&opts.root)?;
            if removed > 0 {
                info!(removed, "removed temporary files a previous server left");
            }
        } else {
            info!("another server runs on this root; its temporary files are left alone");
        }
        // Downgrading (or waiting for the other server's shared lock) cannot fail for
        // long: nobody holds the lock exclusively but for the clean-up above.
        flock(&root_lock, libc::LOCK_SH)?;
        metrics.set_root(&opts.root);
        Ok(State {
            metrics,
            root: opts.root.clone(),
            upload_user: opts.upload_user.clone(),
            require_client_cert: opts
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca_file.is_some()),
            limits: limits.clone(),
            key_locks: (0..64)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
            uploads: std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_uploads.max(1))),
            _root_lock: root_lock,
        })
    }
}

/// `flock(2)`; false when a non-blocking request would block.
fn flock(file: &std::fs::File, op: libc::c_int) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor this File owns.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Raises the soft limit on open files to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim = raised;
        }
    }
    Ok(lim.rlim_cur)
}

/// The soft limit on open files.
fn nofile_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a plain system call on a local struct.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim.rlim_cur)
}

/// Descriptors kept out of the connection budget (listener, store, logs, runtime).
const RESERVED_FDS: u64 = 64;

/// Serves on an already bound listener until `shutdown` resolves.
pub async fn serve_with(
    listener: TcpListener,
    opts: ServerOptions,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    serve_counted(listener, opts, limits, Arc::default(), shutdown).await
}

/// [`serve_with`], counting into `metrics`.
pub async fn serve_counted(
    listener: TcpListener,
    opts: ServerOptions,
    limits: Limits,
    metrics: Arc<ServerMetrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let state = State::open(&opts, &limits, metrics)?;
    serve_state(listener, opts, limits, state, shutdown).await
}

/// [`serve_with`] over a store already opened (its root lock held from the start, so
/// that no window lets another server take it for its clean-up of temporary files).
async fn serve_state(
    listener: TcpListener,
    opts: ServerOptions,
    mut limits: Limits,
    state: State,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    // Each connection may hold a socket and a file (a blob being sent or received).
    if let Some(nofile) = nofile_limit() {
        let fit = (nofile.saturating_sub(RESERVED_FDS) / 2).max(1) as usize;
        if limits.max_connections > fit {
            warn!(
                nofile,
                "max connections lowered from {} to {fit} to fit the open-file limit",
                limits.max_connections
            );
            limits.max_connections = fit;
        }
    }
    let state = Arc::new(state);
    let gate = limits::Gate::new(limits.max_connections, limits.max_connections_per_client);
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
                Ok((tcp, peer)) => match gate.admit(peer.ip()) {
                    Ok(ticket) => {
                        conns.spawn(connection(
                            tcp,
                            peer,
                            state.clone(),
                            acceptor.clone(),
                            stop_rx.clone(),
                            ticket,
                        ));
                    }
                    Err(why) => refuse(tcp, peer, why, acceptor.is_none()),
                },
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

/// Binds `addr` (use `127.0.0.1:0` in tests) and serves in a tokio task, with
/// [`Limits::local`] (no cap per client address: every client is local).
pub async fn start(addr: SocketAddr, opts: ServerOptions) -> Result<RunningServer, ServerError> {
    start_with(addr, opts, Limits::local()).await
}

/// [`start`] with explicit limits.
pub async fn start_with(
    addr: SocketAddr,
    opts: ServerOptions,
    limits: Limits,
) -> Result<RunningServer, ServerError> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    // Open the store and check the TLS files now, so `start` reports their errors
    // itself; the store stays open (and its root locked) for the server's life.
    let metrics = Arc::new(ServerMetrics::default());
    let state = State::open(&opts, &limits, metrics.clone())?;
    if let Some(t) = &opts.tls {
        tls::acceptor(t)?;
    }
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_state(listener, opts, limits, state, async move {
        let _ = stopped.await;
    }));
    Ok(RunningServer {
        addr,
        scheme,
        stop: Some(stop),
        task: Some(task),
        metrics,
    })
}

/// A connection over a cap: plain HTTP gets a one-shot 503 (written only if the socket
/// takes it at once), TLS is closed.
fn refuse(tcp: TcpStream, peer: SocketAddr, why: limits::Refused, plain: bool) {
    debug!(%peer, ?why, "connection refused: too many connections");
    if plain {
        let _ = tcp.try_write(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n\
              Content-Type: text/plain\r\nContent-Length: 21\r\n\r\ntoo many connections\n",
        );
    }
}

/// One accepted TCP connection: TLS handshake if configured, then HTTP/1.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    acceptor: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
    _ticket: limits::Ticket,
) {
    let _ = tcp.set_nodelay(true);
    let tcp = metrics::Counted::new(tcp, state.metrics.clone());
    let send_timeout = state.limits.send_timeout;
    let Some(acceptor) = acceptor else {
        return drive(
            TokioIo::new(limits::SendTimeout::new(
                reqline::EncodeRequestLine::new(tcp),
                send_timeout,
            )),
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
                TokioIo::new(limits::SendTimeout::new(
                    reqline::EncodeRequestLine::new(stream),
                    send_timeout,
                )),
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
    let header_timeout = state.limits.header_timeout;
    let service = service_fn(move |req| {
        let state = state.clone();
        async move {
            let method = req.method().clone();
            let resp = routes::handle(&state, req, client_cert).await;
            state.metrics.request(&method, resp.status().as_u16());
            Ok::<_, Infallible>(resp)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
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
