//! The embedded server (`server::start`, what `shacachefs serve` runs) on a tokio runtime
//! of its own, so that a plain `#[test]` can block on child processes and mounts while
//! the server keeps answering. One builder for every use:
//! - [`Server::start`]: plain HTTP, no upload authentication, a fresh temporary store;
//! - [`Server::builder`]: the store directory the test chooses (kept after the server
//!   stops), upload credentials, TLS, any other [`ServerOptions`];
//! - [`Server::stop`] / [`Server::restart`]: the port refuses connections, then the
//!   server comes back on the same address over the same store (a server that goes away
//!   and comes back);
//! - what the store holds, read back over HTTP ([`Server::entries`]) or on disk.
//!
//! Only `127.0.0.1:0` is ever bound; stopping and restarting are bounded.

use super::{http_get, own_runtime, tempdir, NetworkcacheConfig};
use serde_json::Value;
use shacachefs::server::{self, RunningServer, ServerOptions, TlsOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a [`Server`] is started with.
pub struct ServerBuilder {
    root: Option<PathBuf>,
    opts: ServerOptions,
}

impl ServerBuilder {
    /// The store directory (default: `store` in a temporary directory removed with the
    /// server).
    pub fn root(mut self, root: &Path) -> Self {
        self.root = Some(root.to_path_buf());
        self
    }

    /// Uploads need HTTP Basic authentication as `user`:`password`.
    pub fn upload_user(mut self, user: &str, password: &str) -> Self {
        self.opts.upload_user = Some((user.to_string(), password.to_string()));
        self
    }

    /// HTTPS with these files.
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.opts.tls = Some(tls);
        self
    }

    /// Any other change of the options (the store root is already set).
    pub fn options(mut self, adjust: impl FnOnce(&mut ServerOptions)) -> Self {
        adjust(&mut self.opts);
        self
    }

    /// Starts on `127.0.0.1:0`.
    #[track_caller]
    pub fn start(self) -> Server {
        let tmp = self.root.is_none().then(tempdir);
        let mut opts = self.opts;
        opts.root = match (&self.root, &tmp) {
            (Some(root), _) => root.clone(),
            (None, Some(tmp)) => tmp.path().join("store"),
            (None, None) => unreachable!(),
        };
        let runtime = own_runtime();
        let running = runtime
            .block_on(server::start("127.0.0.1:0".parse().unwrap(), opts.clone()))
            .expect("cannot start the embedded server");
        Server {
            addr: running.addr,
            running: Some(running),
            opts,
            runtime,
            tmp,
        }
    }
}

/// The embedded server, restartable on the same address. Stopped when dropped (and its
/// temporary store removed).
pub struct Server {
    running: Option<RunningServer>,
    addr: SocketAddr,
    opts: ServerOptions,
    runtime: tokio::runtime::Runtime,
    tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// What to start: see [`ServerBuilder`].
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            root: None,
            opts: ServerOptions {
                root: PathBuf::new(),
                upload_user: None,
                tls: None,
            },
        }
    }

    /// Plain HTTP, no upload authentication, over a fresh temporary store.
    #[track_caller]
    pub fn start() -> Server {
        Server::builder().start()
    }

    /// Like [`Server::start`], with the options `adjust` changes (authentication, TLS).
    #[track_caller]
    pub fn start_with(adjust: impl FnOnce(&mut ServerOptions)) -> Server {
        Server::builder().options(adjust).start()
    }

    /// Over the store directory `root`; uploads need `upload_user` when given.
    #[track_caller]
    pub fn start_at(root: &Path, upload_user: Option<(&str, &str)>) -> Server {
        let b = Server::builder().root(root);
        match upload_user {
            Some((u, p)) => b.upload_user(u, p),
            None => b,
        }
        .start()
    }

    fn running(&self) -> &RunningServer {
        self.running.as_ref().expect("server stopped")
    }

    /// `http://127.0.0.1:PORT/shacache` (`https` with TLS).
    pub fn cache_url(&self) -> String {
        self.running().cache_url()
    }

    /// `http://127.0.0.1:PORT/shadir` (`https` with TLS).
    pub fn dir_url(&self) -> String {
        self.running().dir_url()
    }

    /// The store directory (`ROOT/shacache`, `ROOT/shadir`).
    pub fn root(&self) -> &Path {
        &self.opts.root
    }

    /// The store directory, owned.
    pub fn store(&self) -> PathBuf {
        self.opts.root.clone()
    }

    /// A scratch directory beside the store (removed with a temporary store).
    pub fn scratch(&self) -> PathBuf {
        let dir = match &self.tmp {
            Some(tmp) => tmp.path().join("scratch"),
            None => self.opts.root.with_extension("scratch"),
        };
        std::fs::create_dir_all(&dir).expect("cannot create the scratch directory");
        dir
    }

    /// Runs a future on the server's runtime (e.g. an async HTTP client).
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }

    /// A configuration whose four URLs point at this server.
    pub fn config(&self) -> NetworkcacheConfig {
        NetworkcacheConfig::for_urls(&self.cache_url(), &self.dir_url())
    }

    /// Stops the server: the port refuses connections once this returns.
    pub fn stop(&mut self) {
        if let Some(s) = self.running.take() {
            self.runtime.block_on(s.shutdown());
        }
    }

    /// Starts the server again on the same address and store.
    pub fn restart(&mut self) {
        self.stop();
        // The port was just closed; binding it again may need a moment (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .runtime
                .block_on(server::start(self.addr, self.opts.clone()))
            {
                Ok(s) => {
                    self.running = Some(s);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restarting the server on {}: {e}; trying again", self.addr);
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("cannot restart the server on {}: {e}", self.addr),
            }
        }
    }

    /// The entries of `key` as shadir answers them (`[inner, signature]` pairs), or
    /// `None` on 404. `key` must be made of URL-safe characters.
    #[track_caller]
    pub fn entries(&self, key: &str) -> Option<Vec<(String, String)>> {
        let url = format!("{}/{key}", self.dir_url());
        let r = http_get(&url);
        match r.status {
            404 => None,
            200 => {
                let v: Value = serde_json::from_slice(&r.body)
                    .unwrap_or_else(|e| panic!("GET {url}: not JSON ({e})"));
                let list = v
                    .as_array()
                    .unwrap_or_else(|| panic!("GET {url}: not a JSON array: {v}"));
                Some(
                    list.iter()
                        .map(|pair| {
                            let inner = pair[0].as_str().expect("inner is a string");
                            let sig = pair[1].as_str().expect("signature is a string");
                            (inner.to_string(), sig.to_string())
                        })
                        .collect(),
                )
            }
            s => panic!(
                "GET {url}: unexpected status {s}: {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }

    /// The parsed inner objects of `key`'s entries whose `file` is `name`, with the
    /// raw inner text and the signature.
    #[track_caller]
    pub fn entries_named(&self, key: &str, name: &str) -> Vec<PublishedEntry> {
        self.entries(key)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(inner, signature)| {
                let meta: serde_json::Map<String, Value> = serde_json::from_str(&inner)
                    .unwrap_or_else(|e| panic!("inner {inner:?} is not a JSON object: {e}"));
                (meta.get("file").and_then(Value::as_str) == Some(name)).then_some(PublishedEntry {
                    inner,
                    signature,
                    meta,
                })
            })
            .collect()
    }

    /// The blob file of `sha` in the store, when present.
    pub fn blob_exists(&self, sha_hex: &str) -> bool {
        self.root()
            .join("shacache")
            .join(&sha_hex[..2])
            .join(sha_hex)
            .is_file()
    }

    /// Size of the largest upload being received (`ROOT/.tmp-*`), if any.
    pub fn upload_in_progress(&self) -> Option<u64> {
        std::fs::read_dir(self.root())
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One published entry, as read from shadir.
#[derive(Debug, Clone)]
pub struct PublishedEntry {
    pub inner: String,
    pub signature: String,
    pub meta: serde_json::Map<String, Value>,
}

impl PublishedEntry {
    pub fn sha512(&self) -> &str {
        self.meta
            .get("sha512")
            .and_then(Value::as_str)
            .expect("entry without sha512")
    }
}
