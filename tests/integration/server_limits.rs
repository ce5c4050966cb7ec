//! The embedded server under clients that misbehave: hang-ups during PUTs, stalled and
//! trickled bodies, clients that never read, too many connections; crash left-overs,
//! damaged blobs, `If-Range`, and what a PUT to a big key costs.

use reqwest::header::{CONTENT_TYPE, ETAG, IF_RANGE, RANGE};
use reqwest::{Client, StatusCode};
use shacachefs::digest::Sha512;
use shacachefs::server::{self, Limits, RunningServer, ServerOptions};
use shacachefs::wire::RawEntry;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn opts(root: &Path) -> ServerOptions {
    ServerOptions {
        root: root.to_path_buf(),
        upload_user: None,
        tls: None,
    }
}

async fn start_with(root: &Path, limits: Limits) -> RunningServer {
    server::start_with("127.0.0.1:0".parse().unwrap(), opts(root), limits)
        .await
        .unwrap()
}

fn http() -> Client {
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn entry(sha: &str, extra: &str) -> RawEntry {
    RawEntry {
        inner: format!(r#"{{"sha512": "{sha}", "extra": "{extra}"}}"#),
        signature: String::new(),
    }
}

async fn listing(c: &Client, url: &str) -> Vec<RawEntry> {
    let r = c.get(url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    shacachefs::wire::parse_listing(&r.bytes().await.unwrap())
        .unwrap()
        .entries
}

fn extra_of(e: &RawEntry) -> String {
    let v: serde_json::Value = serde_json::from_str(&e.inner).unwrap();
    v["extra"].as_str().unwrap().to_string()
}

/// Reads whatever the server sends until it closes (or `limit` passes); returns the
/// bytes, whether it closed, and when.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool, Duration) {
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = limit.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return (out, false, t0.elapsed()),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true, t0.elapsed()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(answer);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hanging_up_clients_lose_no_acknowledged_entry() {
    // Several bounded runs; each: 6 writers PUT distinct entries one after another and
    // record every 201, while 6 others send a whole PUT and hang up 0-300 ms later.
    const RUNS: usize = 3;
    const RUN_TIME: Duration = Duration::from_secs(3);
    let sha = Sha512::of(b"x").hex();
    // Big entries make each store take a while (write and sync), the window in which a
    // hang-up used to release the key's lock while its write went on.
    let pad = "p".repeat(64 << 10);
    for run in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        let s = start_with(dir.path(), Limits::default()).await;
        let url = format!("{}/race-key", s.dir_url());
        let addr = s.addr;
        let deadline = Instant::now() + RUN_TIME;
        let mut tasks = Vec::new();
        for w in 0..6 {
            let (url, sha, pad) = (url.clone(), sha.clone(), pad.clone());
            tasks.push(tokio::spawn(async move {
                let c = http();
                let mut acked = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    let extra = format!("w{w}-{i}");
                    let body = entry(&sha, &format!("{extra}-{pad}")).to_put_body();
                    let r = c.put(&url).body(body).send().await.unwrap();
                    if r.status() == StatusCode::CREATED {
                        acked.push(extra);
                    }
                    i += 1;
                }
                acked
            }));
        }
        for h in 0..6u64 {
            let (sha, pad) = (sha.clone(), pad.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = crate::support::rng(0x9e37_79b9 + h * 7919 + run as u64 * 104_729);
                let mut i = 0;
                while Instant::now() < deadline {
                    let body = entry(&sha, &format!("h{h}-{i}-{pad}")).to_put_body();
                    let req = format!(
                        "PUT /shadir/race-key HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if let Ok(mut t) = TcpStream::connect(addr).await {
                        let _ = t.write_all(req.as_bytes()).await;
                        // Mostly while the server is storing it, sometimes later.
                        let r = rand::RngCore::next_u64(&mut rng);
                        let wait = if r % 4 == 0 { r % 300 } else { r % 8 };
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    i += 1;
                }
                Vec::new()
            }));
        }
        let mut acked = Vec::new();
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
        assert!(
            acked.len() >= 5,
            "too few PUTs acknowledged: {}",
            acked.len()
        );
        let listed: std::collections::HashSet<String> = listing(&http(), &url)
            .await
            .iter()
            .map(|e| extra_of(e).split('-').take(2).collect::<Vec<_>>().join("-"))
            .collect();
        eprintln!(
            "run {run}: {} acknowledged, {} listed",
            acked.len(),
            listed.len()
        );
        let lost: Vec<&String> = acked.iter().filter(|e| !listed.contains(*e)).collect();
        assert!(
            lost.is_empty(),
            "run {run}: {} of {} acknowledged entries lost: {lost:?}",
            lost.len(),
            acked.len()
        );
        s.shutdown().await;
    }
}

#[tokio::test]
async fn a_reupload_repairs_a_damaged_blob() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), Limits::default()).await;
    let c = http();
    let data = b"the right bytes, stored under their own name".repeat(100);
    let sha = Sha512::of(&data);
    let post = || c.post(s.cache_url()).body(data.clone()).send();
    let r = post().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let path = server::blob_path(dir.path(), &sha);
    // Damaged on disk: other bytes of the same length.
    let mut bad = data.clone();
    for b in bad.iter_mut().take(64) {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bad).unwrap();
    let r = post().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.text().await.unwrap(), sha.hex());
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the damaged file is still there"
    );
    let got = c
        .get(format!("{}/{}", s.cache_url(), sha.hex()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(Sha512::of(&got), sha);
    s.shutdown().await;
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shacachefs"))
}

/// A `shacachefs serve` process on a free loopback port.
struct ServeProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServeProcess {
    fn start(root: &Path, extra: &[&str], env: &[(&str, &str)]) -> ServeProcess {
        // Find a free port, then let serve bind it (bounded retries on a lost race).
        for _ in 0..5 {
            let port = crate::support::free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut cmd = Command::new(bin());
            cmd.arg("serve")
                .arg("--root")
                .arg(root)
                .arg("--listen")
                .arg(addr.to_string())
                .args(extra)
                .env_remove("SHACACHEFS_UPLOAD_USER")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            for (k, v) in env {
                cmd.env(k, v);
            }
            let mut child = cmd.spawn().unwrap();
            for _ in 0..200 {
                if std::net::TcpStream::connect(addr).is_ok() {
                    return ServeProcess { child, addr };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("shacachefs serve did not start");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory (VmHWM) of the server, in bytes.
    fn peak_rss(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:") * 1024
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn temporaries(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().starts_with(".tmp-") {
                out.push(e.path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_files_are_removed_at_start_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let serve = ServeProcess::start(root, &[], &[]);
    // An upload in progress: its temporary file exists when the server is killed.
    let mut t = TcpStream::connect(serve.addr).await.unwrap();
    t.write_all(b"POST /shacache HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        .await
        .unwrap();
    t.write_all(&vec![7u8; 1 << 20]).await.unwrap();
    let mut left = Vec::new();
    for _ in 0..200 {
        left = temporaries(root);
        if !left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!left.is_empty(), "no temporary file while uploading");
    serve.kill9();
    drop(t);
    // And one a list rewrite left under shadir (in a long key's directory).
    let deep = server::key_path(root, "k".repeat(500));
    std::fs::create_dir_all(deep.parent().unwrap()).unwrap();
    std::fs::write(deep.parent().unwrap().join(".tmp-list"), b"[").unwrap();
    assert_eq!(temporaries(root).len(), left.len() + 1);

    // A second server on the same root while one runs leaves the files alone (they may
    // be the running one's).
    let running = start_with(root, Limits::default()).await;
    assert!(temporaries(root).is_empty(), "{:?}", temporaries(root));
    std::fs::write(root.join(".tmp-in-use"), b"x").unwrap();
    let second = start_with(root, Limits::default()).await;
    assert_eq!(temporaries(root), vec![root.join(".tmp-in-use")]);
    second.shutdown().await;
    running.shutdown().await;
    // The next server alone cleans up.
    let alone = start_with(root, Limits::default()).await;
    assert!(temporaries(root).is_empty());
    alone.shutdown().await;
}

fn short_limits() -> Limits {
    Limits {
        body_idle_timeout: Duration::from_secs(1),
        body_min_rate: 1000,
        send_timeout: Duration::from_secs(1),
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_put_and_post_bodies_are_closed_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), short_limits()).await;
    let cases = [
        ("PUT", "/shadir/some-key"),
        ("POST", "/shacache"),
        ("PUT", "/shadir/other-key"),
    ];
    for (method, path) in cases {
        let mut t = TcpStream::connect(s.addr).await.unwrap();
        // 1 MiB announced, 1 MiB - 1 sent, then nothing.
        let len = 1 << 20;
        let head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
        t.write_all(head.as_bytes()).await.unwrap();
        let body = vec![b' '; len - 1];
        let send = t.write_all(&body);
        // The server may give up before taking it all.
        let _ = tokio::time::timeout(Duration::from_secs(5), send).await;
        let (answer, closed, after) = read_until_closed(&mut t, Duration::from_secs(15)).await;
        assert!(closed, "{method} {path}: still open after {after:?}");
        // Allowed: the idle timeout (1 s) plus the rate budget for 1 MiB at 1000 B/s is
        // longer, so it is the idle limit that must fire; generous slack for a busy host.
        assert!(
            after < Duration::from_secs(6),
            "{method} {path}: closed after {after:?}"
        );
        assert_eq!(
            status_of(&answer),
            Some(408),
            "{method} {path}: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }

    // Trickling a byte every 300 ms never trips the idle limit, but falls behind the
    // minimum rate: closed soon after the 1 s grace, not when the client stops.
    for (method, path) in [("POST", "/shacache"), ("PUT", "/shadir/trickle")] {
        let mut t = TcpStream::connect(s.addr).await.unwrap();
        let head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n");
        t.write_all(head.as_bytes()).await.unwrap();
        let t0 = Instant::now();
        let mut closed_at = None;
        for _ in 0..30 {
            if t.write_all(b" ").await.is_err() {
                break;
            }
            let mut buf = [0u8; 512];
            match tokio::time::timeout(Duration::from_millis(300), t.read(&mut buf)).await {
                Ok(Ok(n)) => {
                    let (rest, _, _) = read_until_closed(&mut t, Duration::from_secs(5)).await;
                    let mut answer = buf[..n].to_vec();
                    answer.extend(rest);
                    assert_eq!(status_of(&answer), Some(408), "{method} {path} trickle");
                    closed_at = Some(t0.elapsed());
                    break;
                }
                Ok(Err(_)) => {
                    closed_at = Some(t0.elapsed());
                    break;
                }
                Err(_) => {}
            }
        }
        let at = closed_at.unwrap_or_else(|| panic!("{method} {path}: trickle never closed"));
        assert!(
            at < Duration::from_secs(6),
            "{method} {path}: trickle closed after {at:?}"
        );
    }
    // The server still works.
    let r = http().post(s.cache_url()).body("ok").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_are_dropped_and_others_served() {
    const SIZE: usize = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), short_limits()).await;
    let data = crate::support::pseudo_random_bytes(SIZE, 0x1234_5678_9abc);
    let sha = Sha512::of(&data);
    let c = http();
    let r = c.post(s.cache_url()).body(data).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let req = format!("GET /shacache/{} HTTP/1.1\r\nHost: x\r\n\r\n", sha.hex());
    let mut idle = Vec::new();
    for _ in 0..16 {
        let mut t = TcpStream::connect(s.addr).await.unwrap();
        t.write_all(req.as_bytes()).await.unwrap();
        idle.push(t);
    }
    // Served meanwhile, in full.
    for _ in 0..2 {
        let got = c
            .get(format!("{}/{}", s.cache_url(), sha.hex()))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(Sha512::of(&got), sha);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Each non-reader now finds only what the socket buffers held, then the end.
    for (i, t) in idle.iter_mut().enumerate() {
        let (got, closed, _) = read_until_closed(t, Duration::from_secs(20)).await;
        assert!(closed, "client {i} was not dropped");
        assert!(
            got.len() < SIZE,
            "client {i} got the whole blob: not dropped"
        );
    }
    s.shutdown().await;
}

async fn connect_from(local: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{local}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

/// One request on a new connection from `local`: the status, or `None` when the
/// connection was closed without one.
async fn status_from(local: &str, to: SocketAddr) -> Option<u16> {
    let mut t = connect_from(local, to).await;
    let _ = t
        .write_all(b"GET /shadir/none HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let (answer, _, _) = read_until_closed(&mut t, Duration::from_secs(10)).await;
    status_of(&answer)
}

/// [`status_from`] until it is `want` (each try a new connection that ends at once),
/// at most 50 tries 100 ms apart; the last status seen.
async fn status_eventually(local: &str, to: SocketAddr, want: u16) -> Option<u16> {
    let mut status = None;
    for _ in 0..50 {
        status = status_from(local, to).await;
        if status == Some(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_client_and_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_connections: 6,
        max_connections_per_client: 4,
        ..Limits::default()
    };
    let s = start_with(dir.path(), limits).await;
    // 4 idle connections from 127.0.0.1 fill its share.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from("127.0.0.1", s.addr).await);
    }
    // Once the server accepted them all (bounded wait: a loaded machine may take a
    // while), the next one is refused.
    assert_eq!(status_eventually("127.0.0.1", s.addr, 503).await, Some(503));
    // Another address is still served.
    assert_eq!(status_from("127.0.0.2", s.addr).await, Some(404));
    // Two more from 127.0.0.2 reach the total of 6; then even a new address waits.
    held.push(connect_from("127.0.0.2", s.addr).await);
    held.push(connect_from("127.0.0.2", s.addr).await);
    assert_eq!(status_eventually("127.0.0.3", s.addr, 503).await, Some(503));
    // A place freed is a place taken again (bounded wait for the server to notice).
    drop(held.remove(0));
    assert_eq!(status_eventually("127.0.0.1", s.addr, 404).await, Some(404));
    s.shutdown().await;
}

#[tokio::test]
async fn if_range_that_cannot_match_gets_the_whole_blob() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), Limits::default()).await;
    let c = http();
    let data = b"0123456789abcdefghij".to_vec();
    let sha = Sha512::of(&data);
    assert_eq!(
        c.post(s.cache_url())
            .body(data.clone())
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    let url = format!("{}/{}", s.cache_url(), sha.hex());
    let strong = format!("\"{}\"", sha.hex());
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.headers()[ETAG], strong.as_str());
    for validator in [
        "\"something-else\"".to_string(),
        format!("W/{strong}"),
        "Tue, 01 Dec 2026 00:00:00 GMT".to_string(),
        "Thu, 01 Jan 1970 00:00:00 GMT".to_string(),
    ] {
        let r = c
            .get(&url)
            .header(RANGE, "bytes=2-5")
            .header(IF_RANGE, &validator)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "If-Range: {validator}");
        assert_eq!(r.bytes().await.unwrap(), data, "If-Range: {validator}");
    }
    let r = c
        .get(&url)
        .header(RANGE, "bytes=2-5")
        .header(IF_RANGE, &strong)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&r.bytes().await.unwrap()[..], b"2345");
    s.shutdown().await;
}

/// A list as `json.dumps` writes it, of `n` entries of about 400 bytes.
fn big_list(n: usize, tag: &str) -> Vec<u8> {
    let sha = Sha512::of(tag.as_bytes()).hex();
    let pad = "p".repeat(200);
    let mut out = Vec::with_capacity(n * 420);
    out.push(b'[');
    for i in 0..n {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        let inner =
            format!("{{\\\"sha512\\\": \\\"{sha}\\\", \\\"extra\\\": \\\"{tag}-{i}-{pad}\\\"}}");
        out.extend_from_slice(format!("[\"{inner}\", \"\"]").as_bytes());
    }
    out.push(b']');
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn puts_to_big_keys_append_and_keep_memory_bounded() {
    // 8 keys of about 24 MiB each, in the older form (no index), written as an older
    // server left them; one PUT to each at once (converting them), then another.
    const KEYS: usize = 8;
    const ENTRIES: usize = 60_000;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("shadir")).unwrap();
    let mut originals = Vec::new();
    for k in 0..KEYS {
        let list = big_list(ENTRIES, &format!("key{k}"));
        std::fs::write(server::key_path(root, format!("big-{k}")), &list).unwrap();
        originals.push(list);
    }
    let total: usize = originals.iter().map(Vec::len).sum();
    assert!(total > 160 << 20, "{total}");
    let serve = ServeProcess::start(root, &[], &[]);
    let base = format!("http://{}", serve.addr);
    let c = http();
    // Baseline after a first request.
    let r = c.get(format!("{base}/shadir/none")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let baseline = serve.peak_rss();
    let sha = Sha512::of(b"new").hex();
    for round in 0..2 {
        let tasks: Vec<_> = (0..KEYS)
            .map(|k| {
                let (c, url) = (c.clone(), format!("{base}/shadir/big-{k}"));
                let body = entry(&sha, &format!("round{round}")).to_put_body();
                tokio::spawn(async move { c.put(url).body(body).send().await.unwrap().status() })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap(), StatusCode::CREATED);
        }
    }
    let peak = serve.peak_rss();
    // Each answer is the stored list plus the two new entries, byte for byte.
    let k = 3;
    let got = c
        .get(format!("{base}/shadir/big-{k}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let mut want = originals[k][..originals[k].len() - 1].to_vec();
    for round in 0..2 {
        want.extend_from_slice(b", ");
        let e = entry(&sha, &format!("round{round}"));
        want.extend_from_slice(
            shacachefs::pyjson::dumps(&serde_json::json!([e.inner, e.signature])).as_bytes(),
        );
    }
    want.push(b']');
    assert!(
        got[..] == want[..],
        "answer differs from the stored list plus the new entries"
    );

    // A PUT to a converted key writes in place: same file, same bytes before the end.
    use std::os::unix::fs::MetadataExt;
    let path = server::key_path(root, format!("big-{k}"));
    let before = std::fs::metadata(&path).unwrap();
    let r = c
        .put(format!("{base}/shadir/big-{k}"))
        .body(entry(&sha, "round2").to_put_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(before.ino(), after.ino(), "the list file was replaced");
    let stored = std::fs::read(&path).unwrap();
    assert_eq!(stored[..want.len() - 1], want[..want.len() - 1]);
    assert!(stored.ends_with(b"]"));
    // A duplicate is not added.
    let r = c
        .put(format!("{base}/shadir/big-{k}"))
        .body(entry(&sha, "round2").to_put_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(std::fs::read(&path).unwrap().len(), stored.len());

    // An append in progress (or cut short by a crash): the closing bracket overwritten
    // and half an item written. GET still answers the committed list.
    let committed = std::fs::read(&path).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b", [\"{\\\"sha512", committed.len() as u64 - 1)
            .unwrap();
    }
    let got = c
        .get(format!("{base}/shadir/big-{k}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got[..] == committed[..], "GET showed an append in progress");

    let grew = peak.saturating_sub(baseline);
    eprintln!(
        "serve peak RSS: baseline {} MiB, after 16 PUTs to {} MiB of lists {} MiB (+{} MiB)",
        baseline >> 20,
        total >> 20,
        peak >> 20,
        grew >> 20
    );
    // The lists alone are 170+ MiB; holding even one whole per PUT would be 24+ MiB each.
    assert!(
        grew < 48 << 20,
        "peak RSS grew by {} MiB over {} MiB",
        grew >> 20,
        baseline >> 20
    );
    drop(serve);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_credentials_from_a_file_or_the_environment_stay_off_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-Pa55word";
    let file = dir.path().join("upload-user");
    std::fs::write(&file, format!("uploader:{secret}\n")).unwrap();
    let file_arg = file.to_str().unwrap();
    type Env<'a> = Vec<(&'a str, &'a str)>;
    let cases: Vec<(Vec<&str>, Env)> = vec![
        (vec!["--upload-user-file", file_arg], vec![]),
        (
            vec![],
            vec![("SHACACHEFS_UPLOAD_USER", "uploader:s3cret-Pa55word")],
        ),
    ];
    for (args, env) in cases {
        let root = tempfile::tempdir().unwrap();
        let serve = ServeProcess::start(root.path(), &args, &env);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", serve.pid())).unwrap();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(secret),
            "password visible in the command line"
        );
        let url = format!("http://{}/shadir/k", serve.addr);
        let body = entry(&Sha512::of(b"x").hex(), "auth").to_put_body();
        let c = http();
        let r = c.put(&url).body(body.clone()).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FOUND, "{args:?}: no credentials");
        let r = c
            .put(&url)
            .basic_auth("uploader", Some("wrong"))
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FOUND, "{args:?}: wrong password");
        let r = c
            .put(&url)
            .basic_auth("uploader", Some(secret))
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{args:?}");
        drop(serve);
    }
    // A file without USER:PASS is refused at start.
    std::fs::write(&file, "no-colon\n").unwrap();
    let out = Command::new(bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upload-user-file",
            file_arg,
            "--root",
        ])
        .arg(dir.path().join("r"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("USER:PASS"));
}

#[test]
fn serve_raises_the_soft_open_file_limit_to_the_hard_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    // Started with a low soft limit, as a shell or a unit often gives.
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -Sn 256 && exec {} serve --root {} --listen 127.0.0.1:{port}",
            bin().display(),
            dir.path().join("r").display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut limits = String::new();
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("serve did not start: {limits:?}"));
    let v: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (v[3], v[4]);
    assert_eq!(soft, hard, "{line}");
    assert_ne!(soft, "256", "{line}");
}
