//! A fault-injecting shacache + shadir server for tests, written over raw TCP so that it
//! can misbehave in ways a real HTTP server never would.
//!
//! What it owns:
//! - an in-memory store: blobs by SHA-512 and shadir lists by key, served with the
//!   protocol's answers (HEAD, one `Range`, POST answered 201 with the hash, PUT 201);
//! - programmable faults ([`Rule`]: which requests, which [`Fault`], how many times),
//!   checked in order for every request; a rule with a count stops applying once used
//!   up, so "fail twice, then serve normally" is two words;
//! - a log of every request (method, path, `Range`, status, fault) and counters of the
//!   request body bytes received and the response body bytes sent;
//! - stopping (the port refuses connections and every connection is cut at once, as
//!   when a server dies) and restarting on the same address with the same store and no
//!   faults (a healthy server again).
//!
//! Only `127.0.0.1:0` is ever bound. Every connection task ends when the server stops,
//! and every deliberate wait (stall, trickle, hold) is bounded by the duration given.

use serde_json::{Map, Value};
use shacachefs::digest::Sha512;
use shacachefs::server::store::key_of_path;
use shacachefs::signature::Signer;
use shacachefs::wire::{build_inner, parse_put_body, RawEntry};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Largest request head read (a test client never sends more).
const MAX_HEAD: usize = 256 << 10;
/// Size of each write of a response body.
const WRITE_CHUNK: usize = 64 << 10;

/// How a request is mistreated.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Response body: the connection is closed after this many body bytes.
    CutAfter(usize),
    /// Response body: the byte at this index (modulo the body's length) is flipped.
    FlipByte(usize),
    /// Response body: the right `Content-Length` and body, then this many more bytes,
    /// then the connection is closed.
    ExtraBytes(usize),
    /// Response body: no `Content-Length`; the body and this many more bytes, ended by
    /// closing the connection.
    CloseDelimited { extra: usize },
    /// Response: `Content-Length` announces this many bytes fewer than the body, which
    /// is sent whole; then the connection is closed.
    AnnounceFewer(usize),
    /// Response: the right `Content-Length`, but this many bytes fewer are sent, then
    /// the connection is closed.
    SendFewer(usize),
    /// A `Range` header is ignored: 200 with the whole blob.
    IgnoreRange,
    /// HEAD: this `Content-Length` instead of the blob's (a lying probe).
    HeadLength(u64),
    /// GET: a `Range` header is ignored, and the whole blob comes as a 200 without
    /// `Content-Length`, ended by closing the connection.
    WholeUnannounced,
    /// Response body: one byte per interval.
    Trickle(Duration),
    /// The answer's head, then nothing for this long, then the connection is closed.
    Stall(Duration),
    /// This status (with a short text body) instead of the real answer; a request body
    /// is read first.
    Status(u16),
    /// 302 to a login page (production's answer to an unauthenticated upload).
    Redirect,
    /// POST: the body is read, nothing is stored, and 201 comes with another hash.
    WrongEcho,
    /// Request body: the connection is closed after this many body bytes arrived.
    CutRequest(usize),
    /// Request body: this many bytes are read (all of it when larger), then the server
    /// neither reads nor answers for `hold`, then closes.
    HoldRequest { read: usize, hold: Duration },
    /// The request is read whole, then answered normally after this long (a slow
    /// server: a PUT in flight while the test does something else).
    Delay(Duration),
    /// shadir GET: this body (with `Content-Length`) instead of the stored list.
    DirBody(Vec<u8>),
    /// shadir GET: a generated body of `len` bytes, streamed (never held in memory);
    /// announced with `Content-Length`, or sent chunked.
    HugeDirBody { len: u64, announce: bool },
    /// The answer is whatever the script returns for the request (its head; the body
    /// is read after, unless the reply says not to) and its number among the scripted
    /// requests: a server written per test (see [`FaultyServer::scripted`]).
    Script(Script),
}

/// What a script is: the request's head and its number in, the answer out.
type ScriptFn = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// The function of a [`Fault::Script`].
#[derive(Clone)]
pub struct Script(Arc<ScriptFn>);

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Script")
    }
}

/// A request as a script sees it (and [`FaultyServer::scripted_requests`] logs it).
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// The request target as sent (a path, or an absolute URL through a proxy).
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// The request body (empty when the reply said not to read it).
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A scripted answer, and how it misbehaves.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// `Content-Length` to announce instead of the body's length.
    pub length: Option<u64>,
    /// No `Content-Length`: the body ends when the connection closes.
    pub close_delimited: bool,
    /// Close the connection after this many body bytes.
    pub cut_after: Option<usize>,
    /// Send this many body bytes, then hang for this long.
    pub stall_after: Option<(usize, Duration)>,
    /// Do not read the request body: hang for this long, then close.
    pub ignore_body_for: Option<Duration>,
    /// Wait this long (after reading the body) before answering.
    pub delay: Option<Duration>,
}

/// A [`Reply`] with this status, no header and an empty body.
pub fn reply(status: u16) -> Reply {
    Reply {
        status,
        ..Reply::default()
    }
}

impl Reply {
    pub fn header(mut self, k: &str, v: impl ToString) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
}

#[derive(Debug, Clone)]
enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
}

/// Which requests get a fault, and how many times.
#[derive(Debug, Clone)]
pub struct Rule {
    method: Option<String>,
    path: PathMatch,
    fault: Fault,
    /// `None`: forever.
    remaining: Option<usize>,
}

impl Rule {
    /// `fault` for every request, forever (narrow it with the methods below).
    pub fn new(fault: Fault) -> Rule {
        Rule {
            method: None,
            path: PathMatch::Any,
            fault,
            remaining: None,
        }
    }

    /// `fault` for `GET /shacache/<sha>`.
    pub fn blob_get(sha: &Sha512, fault: Fault) -> Rule {
        Rule::new(fault).method("GET").path(&blob_target(sha))
    }

    /// `fault` for `GET /shadir/<key>` (`key` made of URL-safe characters).
    pub fn dir_get(key: &str, fault: Fault) -> Rule {
        Rule::new(fault)
            .method("GET")
            .path(&format!("/shadir/{key}"))
    }

    /// Only requests with this method.
    pub fn method(mut self, m: &str) -> Rule {
        self.method = Some(m.to_string());
        self
    }

    /// Only requests for exactly this path (query excluded).
    pub fn path(mut self, p: &str) -> Rule {
        self.path = PathMatch::Exact(p.to_string());
        self
    }

    /// Only requests whose path starts with this.
    pub fn prefix(mut self, p: &str) -> Rule {
        self.path = PathMatch::Prefix(p.to_string());
        self
    }

    /// Applies to the next `n` matching requests only.
    pub fn times(mut self, n: usize) -> Rule {
        self.remaining = Some(n);
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.remaining != Some(0)
            && self.method.as_deref().is_none_or(|m| m == method)
            && match &self.path {
                PathMatch::Any => true,
                PathMatch::Exact(p) => p == path,
                PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            }
    }
}

/// The entry of `sha` with the metadata `meta` (e.g. `{"file": NAME}`), signed by
/// `signer`.
pub fn signed_entry(signer: &Signer, sha: &Sha512, meta: &Map<String, Value>) -> RawEntry {
    let inner = build_inner(sha, meta);
    RawEntry {
        signature: signer.sign(&inner),
        inner,
    }
}

/// `/shacache/<hex>`.
pub fn blob_target(sha: &Sha512) -> String {
    format!("/shacache/{}", sha.hex())
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    /// The status sent (0 when no answer was sent).
    pub status: u16,
    /// The request body came chunked (no `Content-Length`).
    pub chunked: bool,
    /// The fault applied, if any (shown in failure messages).
    #[allow(dead_code)]
    pub fault: Option<String>,
    /// `Cache-Control: no-cache` and `Pragma: no-cache` both came with it.
    pub no_cache: bool,
}

#[derive(Default)]
struct State {
    blobs: Mutex<HashMap<Sha512, Arc<Vec<u8>>>>,
    dirs: Mutex<BTreeMap<String, Vec<RawEntry>>>,
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<Logged>>,
    /// The requests answered by a script, in order.
    scripted: Mutex<Vec<Request>>,
    /// Request body bytes read, all requests together.
    received: AtomicU64,
    /// Response body bytes written, all requests together.
    sent: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server. Stops (cutting every connection) when dropped.
pub struct FaultyServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: Option<JoinHandle<()>>,
}

impl Drop for FaultyServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl FaultyServer {
    /// Starts on `127.0.0.1:0` in the current tokio runtime, without faults.
    pub async fn start() -> FaultyServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        FaultyServer {
            addr,
            state,
            task: Some(task),
        }
    }

    /// Starts with one rule: every request is answered by `script`, which gets the
    /// request's head and its number (0, 1, … over all connections).
    pub async fn scripted(
        script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> FaultyServer {
        let s = FaultyServer::start().await;
        s.push_rule(Rule::new(Fault::Script(Script(Arc::new(script)))));
        s
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/shacache`.
    pub fn cache_url(&self) -> String {
        format!("http://{}/shacache", self.addr)
    }

    /// `http://127.0.0.1:PORT/shadir`.
    pub fn dir_url(&self) -> String {
        format!("http://{}/shadir", self.addr)
    }

    /// Stops like a crash: the port is closed and every connection cut at once.
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Starts again on the same address, same store, no faults (bounded retries while
    /// the port is still held by the kernel).
    pub async fn restart(&mut self) {
        self.stop().await;
        self.clear_rules();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}; trying again", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        self.task = Some(tokio::spawn(accept_loop(listener, self.state.clone())));
    }

    // ---- the store ---------------------------------------------------------------

    /// Loads the blobs and listings of an embedded server's store directory `root`, each
    /// blob under its file's name with the bytes on disk (a corrupted file stays
    /// corrupted).
    pub fn load_store(&self, root: &Path) {
        for path in super::files_under(&root.join("shacache")) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if let Ok(sha) = Sha512::parse(name) {
                let data = std::fs::read(&path).expect("reading a stored blob");
                lock(&self.state.blobs).insert(sha, Arc::new(data));
            }
        }
        for path in super::files_under(&root.join("shadir")) {
            // `k-<key>` is a key's list (`i-<key>` its index).
            let is_list = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("k-"));
            let Some(key) = key_of_path(root, &path).filter(|_| is_list) else {
                continue;
            };
            let text = std::fs::read(&path).expect("reading a stored listing");
            let list: Vec<(String, String)> = serde_json::from_slice(&text)
                .expect("a stored listing is [inner, signature] pairs");
            for (inner, signature) in list {
                self.add_entry(
                    &String::from_utf8_lossy(&key),
                    RawEntry { inner, signature },
                );
            }
        }
    }

    /// Stores `data` and its entry under `key` with the metadata `meta`, signed by
    /// `signer`; returns the blob's name.
    pub fn publish(
        &self,
        signer: &Signer,
        key: &str,
        data: &[u8],
        meta: &Map<String, Value>,
    ) -> Sha512 {
        let sha = self.add_blob(data);
        self.add_entry(key, signed_entry(signer, &sha, meta));
        sha
    }

    /// Stores a blob; returns its name.
    pub fn add_blob(&self, data: &[u8]) -> Sha512 {
        let sha = Sha512::of(data);
        lock(&self.state.blobs).insert(sha, Arc::new(data.to_vec()));
        sha
    }

    pub fn has_blob(&self, sha: &Sha512) -> bool {
        lock(&self.state.blobs).contains_key(sha)
    }

    pub fn blob(&self, sha: &Sha512) -> Option<Arc<Vec<u8>>> {
        lock(&self.state.blobs).get(sha).cloned()
    }

    pub fn blob_count(&self) -> usize {
        lock(&self.state.blobs).len()
    }

    /// Appends an entry to a key's list (unless already there), as a PUT would.
    pub fn add_entry(&self, key: &str, entry: RawEntry) {
        let mut dirs = lock(&self.state.dirs);
        let list = dirs.entry(key.to_string()).or_default();
        if !list.contains(&entry) {
            list.push(entry);
        }
    }

    /// A key's list; `None` when the key was never written.
    pub fn entries(&self, key: &str) -> Option<Vec<RawEntry>> {
        lock(&self.state.dirs).get(key).cloned()
    }

    /// Every (key, entry) stored.
    pub fn all_entries(&self) -> Vec<(String, RawEntry)> {
        lock(&self.state.dirs)
            .iter()
            .flat_map(|(k, l)| l.iter().map(move |e| (k.clone(), e.clone())))
            .collect()
    }

    /// Entries whose `sha512` names a blob this server does not hold (what must never
    /// be published).
    pub fn dangling_entries(&self) -> Vec<(String, RawEntry)> {
        self.all_entries()
            .into_iter()
            .filter(|(_, e)| {
                let sha = serde_json::from_str::<serde_json::Value>(&e.inner)
                    .ok()
                    .and_then(|v| v["sha512"].as_str().map(String::from))
                    .and_then(|s| Sha512::parse(&s).ok());
                sha.is_none_or(|s| !self.has_blob(&s))
            })
            .collect()
    }

    // ---- faults and observations ---------------------------------------------------

    /// Adds a rule after the existing ones (the first matching rule applies).
    pub fn push_rule(&self, rule: Rule) {
        lock(&self.state.rules).push(rule);
    }

    /// Removes every rule: a healthy server.
    pub fn clear_rules(&self) {
        lock(&self.state.rules).clear();
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Logged> {
        lock(&self.state.log).clone()
    }

    /// The requests a script answered, bodies included, in order.
    pub fn scripted_requests(&self) -> Vec<Request> {
        lock(&self.state.scripted).clone()
    }

    /// Requests seen with this method and exact path.
    pub fn count(&self, method: &str, path: &str) -> usize {
        lock(&self.state.log)
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// Request body bytes read so far.
    pub fn received_bytes(&self) -> u64 {
        self.state.received.load(Ordering::Relaxed)
    }

    /// Response body bytes written so far.
    pub fn sent_bytes(&self) -> u64 {
        self.state.sent.load(Ordering::Relaxed)
    }
}

/// A fault server whose entries the fixture signer A signs, and a temporary directory
/// beside it (caches, configurations).
pub struct SignedServer {
    pub tmp: tempfile::TempDir,
    pub srv: FaultyServer,
    pub signer: Signer,
}

impl SignedServer {
    pub async fn start() -> SignedServer {
        SignedServer {
            tmp: super::tempdir(),
            srv: FaultyServer::start().await,
            signer: super::signer_a(),
        }
    }

    /// Stores `data` and publishes it under `key` as `name`.
    pub fn publish(&self, key: &str, name: &str, data: &[u8]) -> Sha512 {
        let meta = super::meta(serde_json::json!({ "file": name }));
        self.srv.publish(&self.signer, key, data, &meta)
    }
}

/// The server on a runtime of its own, for tests that block (real mounts, commands).
pub struct Background {
    server: FaultyServer,
    // Declared after `server`: the runtime outlives it while dropping.
    runtime: tokio::runtime::Runtime,
}

impl Background {
    pub fn start() -> Background {
        let runtime = super::own_runtime();
        let server = runtime.block_on(FaultyServer::start());
        Background { server, runtime }
    }

    pub fn stop(&mut self) {
        self.runtime.block_on(self.server.stop());
    }

    pub fn restart(&mut self) {
        self.runtime.block_on(self.server.restart());
    }
}

impl std::ops::Deref for Background {
    type Target = FaultyServer;
    fn deref(&self) -> &FaultyServer {
        &self.server
    }
}

// ---------------------------------------------------------------------------------------
// Serving.

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    // Owned here: aborting this task drops the set, which aborts every connection.
    let mut conns = JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                conns.spawn(serve(sock, state.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        while conns.try_join_next().is_some() {}
    }
}

/// A request head.
struct Head {
    method: String,
    target: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }
    fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
    fn content_length(&self) -> usize {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// An answer before any fault is applied.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn answer(status: u16, body: impl Into<Vec<u8>>) -> Answer {
    Answer {
        status,
        headers: Vec::new(),
        body: body.into(),
    }
}

async fn read_head(r: &mut BufReader<OwnedReadHalf>) -> Option<Head> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        let n = (&mut *r)
            .take((MAX_HEAD - raw.len()) as u64)
            .read_until(b'\n', &mut raw)
            .await
            .ok()?;
        if n == 0 {
            return None;
        }
        let line = &raw[before..];
        if line == b"\r\n" || line == b"\n" {
            if before == 0 {
                // A stray empty line before a request: skip it.
                raw.clear();
                continue;
            }
            break;
        }
        if raw.len() >= MAX_HEAD {
            return None;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.lines();
    let mut first = lines.next()?.split_whitespace();
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Some(Head {
        method,
        target,
        path,
        headers,
    })
}

/// Reads up to `n` body bytes (counted as they arrive); returns them, or `None` when
/// the connection ended first.
async fn read_body(r: &mut BufReader<OwnedReadHalf>, n: usize, state: &State) -> Option<Vec<u8>> {
    let mut body = Vec::with_capacity(n.min(64 << 20));
    let mut buf = vec![0u8; 64 << 10];
    while body.len() < n {
        let want = (n - body.len()).min(buf.len());
        let got = r.read(&mut buf[..want]).await.ok()?;
        if got == 0 {
            return None;
        }
        state.received.fetch_add(got as u64, Ordering::Relaxed);
        body.extend_from_slice(&buf[..got]);
    }
    Some(body)
}

/// Most bytes of a chunked request body taken (a test's body is far smaller).
const MAX_CHUNKED_BODY: usize = 256 << 20;

/// Reads a chunked request body (counted as it arrives); `None` when the connection
/// ended first or the framing is broken.
async fn read_chunked_body(r: &mut BufReader<OwnedReadHalf>, state: &State) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let size = usize::from_str_radix(line.trim().split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut t = String::new();
                if r.read_line(&mut t).await.ok()? == 0 {
                    return None;
                }
                if t.trim().is_empty() {
                    return Some(body);
                }
            }
        }
        if body.len() + size > MAX_CHUNKED_BODY {
            return None;
        }
        body.extend_from_slice(&read_body(r, size, state).await?);
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf).await.ok()?;
    }
}

/// The first rule matching, its count used once.
fn take_fault(state: &State, method: &str, path: &str) -> Option<Fault> {
    let mut rules = lock(&state.rules);
    let rule = rules.iter_mut().find(|r| r.matches(method, path))?;
    if let Some(n) = rule.remaining.as_mut() {
        *n -= 1;
    }
    Some(rule.fault.clone())
}

fn log(state: &State, head: &Head, status: u16, fault: &Option<Fault>) {
    let fault = fault.as_ref().map(|f| {
        let text = format!("{f:?}");
        text.chars().take(80).collect()
    });
    lock(&state.log).push(Logged {
        method: head.method.clone(),
        path: head.path.chars().take(300).collect(),
        range: head.header("range").map(String::from),
        status,
        chunked: head.is_chunked(),
        fault,
        no_cache: head
            .header("cache-control")
            .is_some_and(|v| v.eq_ignore_ascii_case("no-cache"))
            && head
                .header("pragma")
                .is_some_and(|v| v.eq_ignore_ascii_case("no-cache")),
    });
}

async fn serve(sock: TcpStream, state: Arc<State>) {
    let _ = sock.set_nodelay(true);
    let (r, mut w) = sock.into_split();
    let mut r = BufReader::new(r);
    // Bounded by the client: each round is one request.
    while let Some(head) = read_head(&mut r).await {
        let fault = take_fault(&state, &head.method, &head.path);
        if let Some(Fault::Script(script)) = &fault {
            if serve_scripted(&mut r, &mut w, &head, script, &state).await {
                continue;
            }
            return;
        }
        let len = head.content_length();
        // Faults on the request body.
        match &fault {
            Some(Fault::CutRequest(n)) => {
                let _ = read_body(&mut r, len.min(*n), &state).await;
                log(&state, &head, 0, &fault);
                return;
            }
            Some(Fault::HoldRequest { read, hold }) => {
                let _ = read_body(&mut r, len.min(*read), &state).await;
                log(&state, &head, 0, &fault);
                tokio::time::sleep(*hold).await;
                return;
            }
            _ => {}
        }
        let body = if head.is_chunked() {
            read_chunked_body(&mut r, &state).await
        } else {
            read_body(&mut r, len, &state).await
        };
        let Some(body) = body else {
            log(&state, &head, 0, &fault);
            return;
        };
        if let Some(Fault::Delay(d)) = &fault {
            tokio::time::sleep(*d).await;
        }
        let keep = respond(&mut w, &head, body, fault, &state).await;
        if !keep
            || head
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        {
            let _ = w.shutdown().await;
            return;
        }
    }
}

/// Answers one request with its script's [`Reply`]; false when the connection is done.
async fn serve_scripted(
    r: &mut BufReader<OwnedReadHalf>,
    w: &mut OwnedWriteHalf,
    head: &Head,
    script: &Script,
    state: &State,
) -> bool {
    let req = Request {
        method: head.method.clone(),
        target: head.target.clone(),
        headers: head.headers.clone(),
        body: Vec::new(),
    };
    let index = {
        let mut l = lock(&state.scripted);
        l.push(req.clone());
        l.len() - 1
    };
    let rep = (script.0)(&req, index);
    log(
        state,
        head,
        rep.status,
        &Some(Fault::Script(script.clone())),
    );
    if let Some(d) = rep.ignore_body_for {
        tokio::time::sleep(d).await;
        return false;
    }
    let mut body = vec![0u8; head.content_length()];
    if r.read_exact(&mut body).await.is_err() {
        return false;
    }
    lock(&state.scripted)[index].body = body;
    if let Some(d) = rep.delay {
        tokio::time::sleep(d).await;
    }
    let mut out = format!("HTTP/1.1 {} X\r\n", rep.status);
    for (k, v) in &rep.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if rep.close_delimited {
        out.push_str("Connection: close\r\n");
    } else {
        let n = rep.length.unwrap_or(rep.body.len() as u64);
        out.push_str(&format!("Content-Length: {n}\r\n"));
    }
    out.push_str("\r\n");
    if w.write_all(out.as_bytes()).await.is_err() {
        return false;
    }
    if head.method == "HEAD" {
        return true;
    }
    if let Some(n) = rep.cut_after {
        let _ = w.write_all(&rep.body[..n]).await;
        let _ = w.shutdown().await;
        return false;
    }
    if let Some((n, d)) = rep.stall_after {
        let _ = w.write_all(&rep.body[..n]).await;
        let _ = w.flush().await;
        tokio::time::sleep(d).await;
        return false;
    }
    if w.write_all(&rep.body).await.is_err() {
        return false;
    }
    if rep.close_delimited {
        let _ = w.shutdown().await;
        return false;
    }
    true
}

/// Sends the answer to one request; false when the connection must be closed.
async fn respond(
    w: &mut OwnedWriteHalf,
    head: &Head,
    body: Vec<u8>,
    fault: Option<Fault>,
    state: &State,
) -> bool {
    let is_head = head.method == "HEAD";
    let ans = match &fault {
        Some(Fault::Status(s)) => answer(*s, format!("injected error {s}\n")),
        Some(Fault::Redirect) => {
            let mut a = answer(302, "");
            a.headers
                .push(("Location".into(), "http://login.invalid/login_form".into()));
            a
        }
        Some(Fault::WrongEcho) => answer(201, Sha512::of(b"not what was sent").hex()),
        Some(Fault::DirBody(b)) => {
            let mut a = answer(200, b.clone());
            a.headers
                .push(("Content-Type".into(), "application/json".into()));
            a
        }
        Some(Fault::HugeDirBody { len, announce }) => {
            log(state, head, 200, &fault);
            return send_huge(w, *len, *announce, state).await;
        }
        _ => normal(
            head,
            &body,
            matches!(fault, Some(Fault::IgnoreRange | Fault::WholeUnannounced)),
            state,
        ),
    };
    log(state, head, ans.status, &fault);

    let mut text = format!("HTTP/1.1 {} X\r\n", ans.status);
    for (k, v) in &ans.headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    // A HEAD announces the length of the body a GET would get, and sends none.
    let true_len = ans.body.len();
    let body = if is_head { Vec::new() } else { ans.body };
    match &fault {
        Some(Fault::CloseDelimited { .. } | Fault::WholeUnannounced) => {
            text.push_str("Connection: close\r\n")
        }
        Some(Fault::HeadLength(n)) if is_head => {
            text.push_str(&format!("Content-Length: {n}\r\n"));
        }
        Some(Fault::AnnounceFewer(n)) => {
            text.push_str(&format!(
                "Content-Length: {}\r\n",
                true_len.saturating_sub(*n)
            ));
        }
        _ => text.push_str(&format!("Content-Length: {true_len}\r\n")),
    }
    text.push_str("\r\n");
    if w.write_all(text.as_bytes()).await.is_err() {
        return false;
    }
    if is_head {
        return !matches!(fault, Some(Fault::AnnounceFewer(_)));
    }
    match fault {
        Some(Fault::CutAfter(n)) => {
            send(w, &body[..n.min(body.len())], state).await;
            false
        }
        Some(Fault::SendFewer(n)) => {
            send(w, &body[..body.len().saturating_sub(n)], state).await;
            false
        }
        Some(Fault::FlipByte(at)) => {
            let mut body = body;
            if !body.is_empty() {
                let i = at % body.len();
                body[i] ^= 0x01;
            }
            send(w, &body, state).await
        }
        Some(Fault::ExtraBytes(n)) | Some(Fault::CloseDelimited { extra: n }) => {
            let mut body = body;
            body.extend(std::iter::repeat_n(b'#', n));
            send(w, &body, state).await;
            false
        }
        Some(Fault::AnnounceFewer(_)) | Some(Fault::WholeUnannounced) => {
            send(w, &body, state).await;
            false
        }
        Some(Fault::Trickle(every)) => {
            for b in body.chunks(1) {
                if !send(w, b, state).await {
                    return false;
                }
                tokio::time::sleep(every).await;
            }
            true
        }
        Some(Fault::Stall(hold)) => {
            let _ = w.flush().await;
            tokio::time::sleep(hold).await;
            false
        }
        _ => send(w, &body, state).await,
    }
}

/// Writes body bytes (counted); false when the peer is gone.
async fn send(w: &mut OwnedWriteHalf, data: &[u8], state: &State) -> bool {
    for chunk in data.chunks(WRITE_CHUNK) {
        if w.write_all(chunk).await.is_err() {
            return false;
        }
        state.sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    w.flush().await.is_ok()
}

/// A generated shadir body of `len` bytes, streamed.
async fn send_huge(w: &mut OwnedWriteHalf, len: u64, announce: bool, state: &State) -> bool {
    let mut head = String::from("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n");
    if announce {
        head.push_str(&format!("Content-Length: {len}\r\n\r\n"));
    } else {
        head.push_str("Transfer-Encoding: chunked\r\n\r\n");
    }
    if w.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    let pattern = b"[\"{\\\"sha512\\\": \\\"00\\\"}\", \"\"], ";
    let mut chunk = Vec::with_capacity(WRITE_CHUNK + pattern.len());
    chunk.push(b'[');
    while chunk.len() < WRITE_CHUNK {
        chunk.extend_from_slice(pattern);
    }
    let mut left = len;
    while left > 0 {
        let n = (chunk.len() as u64).min(left) as usize;
        let ok = if announce {
            w.write_all(&chunk[..n]).await.is_ok()
        } else {
            let mut framed = format!("{n:x}\r\n").into_bytes();
            framed.extend_from_slice(&chunk[..n]);
            framed.extend_from_slice(b"\r\n");
            w.write_all(&framed).await.is_ok()
        };
        if !ok {
            return false;
        }
        state.sent.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
        if chunk[0] == b'[' {
            chunk.remove(0);
        }
    }
    if !announce && w.write_all(b"0\r\n\r\n").await.is_err() {
        return false;
    }
    true
}

/// The protocol's answer to a request, from the store.
fn normal(head: &Head, body: &[u8], ignore_range: bool, state: &State) -> Answer {
    let m = head.method.as_str();
    let path = head.path.as_str();
    if path == "/shacache" || path == "/shacache/" {
        if m != "POST" {
            return answer(405, "method not allowed\n");
        }
        let sha = Sha512::of(body);
        lock(&state.blobs)
            .entry(sha)
            .or_insert_with(|| Arc::new(body.to_vec()));
        return answer(201, sha.hex());
    }
    if let Some(name) = path.strip_prefix("/shacache/") {
        if m != "GET" && m != "HEAD" {
            return answer(405, "method not allowed\n");
        }
        let blob = Sha512::parse(name)
            .ok()
            .and_then(|s| lock(&state.blobs).get(&s).cloned());
        let Some(blob) = blob else {
            return answer(404, "not found\n");
        };
        let range = if ignore_range {
            None
        } else {
            head.header("range").and_then(parse_range)
        };
        let total = blob.len();
        let mut a = match range {
            None => answer(200, blob.as_slice()),
            Some((first, _)) if first >= total => {
                let mut a = answer(416, "");
                a.headers
                    .push(("Content-Range".into(), format!("bytes */{total}")));
                return a;
            }
            Some((first, last)) => {
                let last = last.unwrap_or(total - 1).min(total - 1);
                let mut a = answer(206, &blob[first..=last]);
                a.headers.push((
                    "Content-Range".into(),
                    format!("bytes {first}-{last}/{total}"),
                ));
                a
            }
        };
        a.headers.push(("Accept-Ranges".into(), "bytes".into()));
        return a;
    }
    if let Some(seg) = path.strip_prefix("/shadir/") {
        let key = percent_encoding::percent_decode_str(seg)
            .decode_utf8_lossy()
            .into_owned();
        return match m {
            "GET" | "HEAD" => match lock(&state.dirs).get(&key) {
                Some(list) => {
                    let v: Vec<serde_json::Value> = list
                        .iter()
                        .map(|e| serde_json::json!([e.inner, e.signature]))
                        .collect();
                    let mut a = answer(200, serde_json::to_vec(&v).unwrap_or_default());
                    a.headers
                        .push(("Content-Type".into(), "application/json".into()));
                    a
                }
                None => answer(404, "not found\n"),
            },
            "PUT" => match parse_put_body(body) {
                Ok(entry) => {
                    let mut dirs = lock(&state.dirs);
                    let list = dirs.entry(key).or_default();
                    if !list.contains(&entry) {
                        list.push(entry);
                    }
                    answer(201, "")
                }
                Err(e) => answer(400, format!("{e}\n")),
            },
            _ => answer(405, "method not allowed\n"),
        };
    }
    answer(404, "not found\n")
}

/// `bytes=A-` or `bytes=A-B`.
fn parse_range(v: &str) -> Option<(usize, Option<usize>)> {
    let (a, b) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let first = a.trim().parse().ok()?;
    let last = match b.trim() {
        "" => None,
        s => Some(s.parse().ok()?),
    };
    Some((first, last))
}
