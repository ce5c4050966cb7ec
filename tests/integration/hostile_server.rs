//! The embedded server (`shacachefs::server`) under hostile requests, sent over raw TCP:
//! path traversal in keys and blob names (plain and percent-encoded), absurd lengths,
//! invalid hashes, clients that send their headers one byte at a time and stop, a load
//! of 64 connections doing mixed requests, and uploads cut in the middle.
//!
//! After each: every answer was a 4xx or the correct one, nothing outside the server's
//! root was touched (the root is a subdirectory of a temporary directory whose other
//! contents are checked), the store holds only well-formed files, and the server still
//! answers.

use crate::support;
use support::files_under;

use shacachefs::digest::Sha512;
use shacachefs::server::store::key_of_path;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{pseudo_random_bytes, Server};

/// Read/write timeout of every raw connection.
const IO_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 client.

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One connection, answers read one after the other (keep-alive).
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connecting to the server");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
        s.set_write_timeout(Some(IO_TIMEOUT))
            .expect("write timeout");
        let _ = s.set_nodelay(true);
        Conn { s, buf: Vec::new() }
    }

    fn send(&mut self, raw: &[u8]) -> std::io::Result<()> {
        self.s.write_all(raw)
    }

    /// Reads more bytes; false at the end of the stream.
    fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 64 << 10];
        let n = self.s.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The next answer; `None` when the server closed the connection without one.
    fn answer(&mut self, to_head: bool) -> std::io::Result<Option<Answer>> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if !self.fill()? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(std::io::Error::other("connection closed inside an answer"))
                };
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let mut a = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if to_head || status == 204 || status == 304 || (100..200).contains(&status) {
            return Ok(Some(a));
        }
        if let Some(len) = a.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| std::io::Error::other("bad Content-Length"))?;
            while self.buf.len() < len {
                if !self.fill()? {
                    return Err(std::io::Error::other("connection closed inside a body"));
                }
            }
            a.body = self.buf.drain(..len).collect();
        } else if a
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            a.body = self.chunked()?;
        } else {
            while self.fill()? {}
            a.body = std::mem::take(&mut self.buf);
        }
        Ok(Some(a))
    }

    fn chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        // Bounded by the answer's length: each round consumes one chunk.
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                if !self.fill()? {
                    return Err(std::io::Error::other("closed inside a chunk size"));
                }
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                if !self.fill()? {
                    return Err(std::io::Error::other("closed inside a chunk"));
                }
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return Ok(body);
            }
        }
    }

    /// Sends one request and reads its answer.
    fn exchange(&mut self, req: &Request) -> std::io::Result<Option<Answer>> {
        self.send(&req.bytes())?;
        self.answer(req.method == "HEAD")
    }
}

/// A request to build by hand.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn new(method: &str, target: impl Into<String>) -> Request {
        Request {
            method: method.to_string(),
            target: target.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    fn body(mut self, b: impl Into<Vec<u8>>) -> Request {
        self.body = b.into();
        self
    }

    fn header(mut self, k: &str, v: &str) -> Request {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            self.method, self.target
        )
        .into_bytes();
        for (k, v) in &self.headers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        if !self.body.is_empty() || matches!(self.method.as_str(), "POST" | "PUT") {
            out.extend_from_slice(format!("Content-Length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// One request on a new connection.
fn once(addr: SocketAddr, req: &Request) -> Option<Answer> {
    Conn::open(addr)
        .exchange(req)
        .unwrap_or_else(|e| panic!("{} {}: {e}", req.method, short(&req.target)))
}

fn short(s: &str) -> String {
    if s.len() > 120 {
        format!("{}… ({} bytes)", &s[..100], s.len())
    } else {
        s.to_string()
    }
}

/// A PUT body `[inner, ""]` for a blob.
fn put_body(sha: &Sha512, name: &str) -> Vec<u8> {
    let inner = format!(r#"{{"sha512": "{sha}", "file": "{name}"}}"#);
    serde_json::to_vec(&serde_json::json!([inner, ""])).unwrap()
}

// ---------------------------------------------------------------------------------------
// The server and what must not change around it.

/// The embedded server, with a canary directory beside its root.
struct Setup {
    srv: Server,
    addr: SocketAddr,
    known: Vec<u8>,
    known_sha: Sha512,
}

const CANARY: &[u8] = b"must never change\n";

impl Setup {
    fn new() -> Setup {
        let srv = Server::start();
        let outside = srv.store().parent().expect("root's parent").join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("canary.txt"), CANARY).unwrap();
        let addr: SocketAddr = srv
            .cache_url()
            .trim_start_matches("http://")
            .trim_end_matches("/shacache")
            .parse()
            .expect("server address");
        let known = pseudo_random_bytes(100_000, 1);
        let known_sha = Sha512::of(&known);
        let a = once(addr, &Request::new("POST", "/shacache").body(known.clone()))
            .expect("an answer to a POST");
        assert_eq!(a.status, 201, "{a:?}");
        Setup {
            srv,
            addr,
            known,
            known_sha,
        }
    }

    fn root(&self) -> PathBuf {
        self.srv.store()
    }

    /// The server still answers, with the right bytes.
    #[track_caller]
    fn still_serves(&self) {
        let a = once(
            self.addr,
            &Request::new("GET", format!("/shacache/{}", self.known_sha)),
        )
        .expect("an answer");
        assert_eq!(a.status, 200);
        assert!(a.body == self.known, "known blob content");
        let a = once(self.addr, &Request::new("GET", "/shadir/never-written")).expect("answer");
        assert_eq!(a.status, 404);
    }

    /// Nothing beside the root changed; inside it, only blobs under their true names,
    /// lists under names that decode to a key, and (after `settle`) no temporary file.
    #[track_caller]
    fn check_disk(&self, settle: Duration) {
        let root = self.root();
        let parent = root.parent().unwrap();
        let beside: BTreeSet<String> = std::fs::read_dir(parent)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            beside,
            BTreeSet::from(["outside".to_string(), "store".to_string()]),
            "something was created beside the server root"
        );
        let outside: Vec<String> = std::fs::read_dir(parent.join("outside"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(outside, vec!["canary.txt".to_string()]);
        assert_eq!(
            std::fs::read(parent.join("outside/canary.txt")).unwrap(),
            CANARY
        );

        // Temporary files of cut uploads go away by themselves (bounded wait).
        let deadline = Instant::now() + settle;
        let files = loop {
            let files = files_under(&root);
            let temps: Vec<&PathBuf> = files
                .iter()
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(".tmp"))
                })
                .collect();
            if temps.is_empty() {
                break files;
            }
            assert!(
                Instant::now() < deadline,
                "temporary files left after {settle:?}: {temps:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        for path in files {
            let rel = path.strip_prefix(&root).unwrap();
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            assert!(meta.is_file(), "not a regular file: {}", path.display());
            match parts.first().map(String::as_str) {
                Some("shacache") => {
                    assert_eq!(parts.len(), 3, "{}", path.display());
                    let sha = Sha512::parse(&parts[2])
                        .unwrap_or_else(|_| panic!("not a blob name: {}", path.display()));
                    assert!(parts[2].starts_with(&parts[1]), "{}", path.display());
                    let (actual, _) = Sha512::of_file(&path).unwrap();
                    assert_eq!(actual, sha, "blob bytes differ from their name");
                }
                Some("shadir") => {
                    assert!(
                        key_of_path(&root, &path).is_some(),
                        "not a key list: {}",
                        path.display()
                    );
                }
                _ => panic!("unexpected file in the store: {}", path.display()),
            }
        }
    }
}

#[track_caller]
fn assert_4xx(what: &str, a: &Option<Answer>) {
    match a {
        Some(a) => assert!(
            (400..500).contains(&a.status),
            "{what}: answered {} {:?}",
            a.status,
            String::from_utf8_lossy(&a.body[..a.body.len().min(200)])
        ),
        None => panic!("{what}: no answer"),
    }
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn traversal_in_keys_and_blob_names_stays_inside_the_root() {
    let s = Setup::new();
    let sha = s.known_sha;
    // Reading out of the root: every spelling is just a name, and nothing by that name
    // was ever stored.
    let reads = [
        "/shadir/..%2F..%2Foutside%2Fcanary.txt",
        "/shadir/%2e%2e%2f%2e%2e%2foutside%2fcanary.txt",
        "/shadir/%2E%2E%2F%2E%2E%2Foutside%2Fcanary.txt",
        "/shadir/..%5c..%5coutside%5ccanary.txt",
        "/shadir/../../outside/canary.txt",
        "/shadir/..",
        "/shadir/%2e%2e",
        "/shadir/.",
        "/shadir/%00",
        "/shacache/../../outside/canary.txt",
        "/shacache/..%2F..%2Foutside%2Fcanary.txt",
        "/shacache/%2e%2e%2f%2e%2e%2foutside%2fcanary.txt",
        "/shacache/..",
        "/shacache/%2e%2e",
        "/%2e%2e/outside/canary.txt",
        "/shadir/%2e%2e/%2e%2e/outside/canary.txt",
        "http://127.0.0.1/../../outside/canary.txt",
    ];
    for target in reads {
        for method in ["GET", "HEAD"] {
            let a = once(s.addr, &Request::new(method, target));
            assert_4xx(&format!("{method} {target}"), &a);
            assert!(
                !a.as_ref()
                    .unwrap()
                    .body
                    .windows(CANARY.len())
                    .any(|w| w == CANARY),
                "{method} {target} read the canary"
            );
        }
    }
    // Writing under such keys: stored inside the store, under the key as sent, and read
    // back by the same spelling.
    let writes = [
        ("..%2F..%2Foutside%2Fpwned", "../../outside/pwned"),
        ("%2e%2e%2f%2e%2e%2foutside%2fpwned", "../../outside/pwned"),
        ("%2e%2e", ".."),
        ("..", ".."),
        (".", "."),
        ("%2F", "/"),
        ("%00", "\0"),
        ("a%2Fb", "a/b"),
        ("%2e%2e%2f%2e%2e%2fstore%2fshacache", "../../store/shacache"),
    ];
    for (i, (segment, key)) in writes.iter().enumerate() {
        let body = put_body(&sha, &format!("t{i}"));
        let a = once(
            s.addr,
            &Request::new("PUT", format!("/shadir/{segment}")).body(body),
        );
        let a = a.unwrap_or_else(|| panic!("PUT {segment}: no answer"));
        assert!(
            a.status == 201 || (400..500).contains(&a.status),
            "PUT {segment}: {a:?}"
        );
        if a.status == 201 {
            let path = shacachefs::server::key_path(&s.root(), key.as_bytes());
            assert!(
                path.starts_with(s.root().join("shadir")),
                "{}",
                path.display()
            );
            assert!(
                path.is_file(),
                "PUT {segment} stored nothing at {}",
                path.display()
            );
            let back = once(s.addr, &Request::new("GET", format!("/shadir/{segment}")))
                .expect("an answer");
            assert_eq!(back.status, 200, "GET {segment}");
            let list: serde_json::Value = serde_json::from_slice(&back.body).unwrap();
            assert!(
                list.to_string().contains(&format!("t{i}")),
                "GET {segment}: {list}"
            );
        }
    }
    // Methods that do not belong there.
    for (method, target) in [
        ("POST", "/shacache/..%2F..%2Foutside%2Fcanary.txt"),
        ("PUT", "/shacache/..%2F..%2Foutside%2Fcanary.txt"),
        ("DELETE", "/shadir/..%2F..%2Foutside%2Fcanary.txt"),
        ("POST", "/shadir/..%2F..%2Foutside"),
        ("PUT", "/shadir/../../outside/canary.txt"),
    ] {
        let a = once(s.addr, &Request::new(method, target).body("x"));
        assert_4xx(&format!("{method} {target}"), &a);
    }
    s.check_disk(Duration::from_secs(5));
    s.still_serves();
}

#[test]
fn absurd_lengths_and_invalid_hashes_are_refused() {
    let s = Setup::new();
    let hex = s.known_sha.hex();
    let huge = "a".repeat(100 << 10);
    let body = put_body(&s.known_sha, "long");
    // 100 KiB keys and blob names.
    for req in [
        Request::new("GET", format!("/shadir/{huge}")),
        Request::new("HEAD", format!("/shadir/{huge}")),
        Request::new("PUT", format!("/shadir/{huge}")).body(body.clone()),
        Request::new("GET", format!("/shacache/{huge}")),
        Request::new("GET", format!("/shadir/{}", "%2e".repeat(30 << 10))),
    ] {
        let what = format!("{} {}", req.method, short(&req.target));
        assert_4xx(&what, &once(s.addr, &req));
    }
    // Just over the longest key: 414 from the handler; the longest key itself works.
    let over = "k".repeat(shacachefs::server::MAX_KEY_LEN + 1);
    let a = once(
        s.addr,
        &Request::new("PUT", format!("/shadir/{over}")).body(body.clone()),
    );
    assert_4xx("PUT of a key over the limit", &a);
    let longest = "k".repeat(shacachefs::server::MAX_KEY_LEN);
    let a = once(
        s.addr,
        &Request::new("PUT", format!("/shadir/{longest}")).body(body.clone()),
    )
    .expect("an answer");
    assert_eq!(a.status, 201, "PUT of the longest key");
    let a = once(s.addr, &Request::new("GET", format!("/shadir/{longest}"))).expect("answer");
    assert_eq!(a.status, 200);
    // 500 KiB of headers.
    let mut req = Request::new("GET", format!("/shacache/{hex}"));
    for i in 0..100 {
        req = req.header(&format!("X-Junk-{i}"), &"j".repeat(5000));
    }
    let a = Conn::open(s.addr).exchange(&req);
    match a {
        Ok(a) => assert_4xx("500 KiB of headers", &a),
        // Refusing by closing the connection is fine too (the request never ends).
        Err(e) => eprintln!("500 KiB of headers: connection ended: {e}"),
    }
    // Names that are not a lowercase SHA-512.
    let bad_names = [
        hex.to_uppercase(),
        hex[..127].to_string(),
        format!("{hex}0"),
        "g".repeat(128),
        format!("{}%00", &hex[..125]),
        format!("%2F{}", &hex[..125]),
        format!("{hex}%00"),
        format!("{hex}%20"),
        "%".to_string(),
        "%zz".to_string(),
        String::new(),
    ];
    for name in &bad_names {
        for method in ["GET", "HEAD"] {
            let target = format!("/shacache/{name}");
            let a = once(s.addr, &Request::new(method, &target));
            assert_4xx(&format!("{method} {}", short(&target)), &a);
        }
    }
    // Ranges that make no sense: a 206 inside the blob, a 416, or the whole blob.
    for range in [
        "bytes=99999999999999999999-",
        "bytes=5-2",
        "bytes=-0",
        "bytes=0-0,5-9",
        "x",
    ] {
        let req = Request::new("GET", format!("/shacache/{hex}")).header("Range", range);
        let a = once(s.addr, &req).expect("an answer");
        match a.status {
            200 => assert!(a.body == s.known, "{range}: whole body"),
            206 => assert!(s
                .known
                .windows(a.body.len())
                .any(|w| w == a.body.as_slice())),
            416 => {}
            other => panic!("Range {range}: status {other}"),
        }
    }
    s.check_disk(Duration::from_secs(5));
    s.still_serves();
}

#[test]
fn slow_clients_do_not_stop_others() {
    let s = Setup::new();
    // Clients that send their headers one byte at a time, then stop.
    let line = format!("GET /shacache/{} HTTP/1.1\r\nHost: x\r\n", s.known_sha);
    let mut slow: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(s.addr).expect("connect"))
        .collect();
    // Uploads that announce 1 MiB and send 1 KiB per round, then stop.
    let mut uploads: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut c = TcpStream::connect(s.addr).expect("connect");
            c.write_all(b"POST /shacache HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
                .expect("upload head");
            c
        })
        .collect();
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    for round in 0..30 {
        for c in &mut slow {
            // The peer may give up on us; that is allowed.
            let _ = c.write_all(&line.as_bytes()[round..round + 1]);
        }
        for c in &mut uploads {
            let _ = c.write_all(&[b'u'; 1024]);
        }
        // Meanwhile others are served at once: a read and a shadir write.
        let t = Instant::now();
        let a = once(
            s.addr,
            &Request::new("GET", format!("/shacache/{}", s.known_sha)),
        )
        .expect("an answer");
        assert_eq!(a.status, 200);
        assert!(a.body == s.known);
        let a = once(
            s.addr,
            &Request::new("PUT", "/shadir/slow-test")
                .body(put_body(&s.known_sha, &format!("r{round}"))),
        )
        .expect("an answer");
        assert_eq!(a.status, 201, "{a:?}");
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        worst < Duration::from_secs(5),
        "a request took {worst:?} while slow clients were connected"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // The slow clients stopped mid-headers and mid-body; others are still served.
    let t = Instant::now();
    for _ in 0..10 {
        s.still_serves();
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    for c in slow.drain(..).chain(uploads.drain(..)) {
        let _ = c.shutdown(Shutdown::Both);
    }
    s.check_disk(Duration::from_secs(10));
    let uploaded = files_under(&s.root().join("shacache")).len();
    assert_eq!(uploaded, 1, "a partial upload was stored");
    s.still_serves();
}

#[test]
fn concurrent_mixed_load_is_answered_correctly() {
    const THREADS: usize = 64;
    const PER_THREAD: usize = 20;
    const KEYS: usize = 8;
    let s = Arc::new(Setup::new());
    let started = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || -> Result<Vec<String>, String> {
                let mut conn = Conn::open(s.addr);
                let mut put = Vec::new();
                let mut last: Option<(Sha512, Vec<u8>)> = None;
                let key = format!("load-{}", t % KEYS);
                for j in 0..PER_THREAD {
                    let data = pseudo_random_bytes(
                        512 * (1 + (t * PER_THREAD + j) % 64),
                        (t * 1000 + j) as u64,
                    );
                    let sha = Sha512::of(&data);
                    let req = match j % 5 {
                        0 => Request::new("POST", "/shacache").body(data.clone()),
                        1 => match &last {
                            Some((sha, _)) => Request::new("GET", format!("/shacache/{sha}")),
                            None => Request::new("GET", format!("/shacache/{}", s.known_sha)),
                        },
                        2 => Request::new("PUT", format!("/shadir/{key}"))
                            .body(put_body(&s.known_sha, &format!("t{t}-{j}"))),
                        3 => Request::new("GET", format!("/shadir/{key}")),
                        _ => match j % 3 {
                            0 => Request::new("HEAD", format!("/shacache/{}", s.known_sha)),
                            1 => Request::new("GET", format!("/shacache/{sha}")),
                            _ => Request::new("GET", "/shacache/not-a-hash"),
                        },
                    };
                    let a = match conn.exchange(&req) {
                        Ok(Some(a)) => a,
                        Ok(None) | Err(_) => {
                            // The server may close an idle keep-alive connection: one
                            // new connection, one more try.
                            conn = Conn::open(s.addr);
                            conn.exchange(&req)
                                .map_err(|e| format!("{} {}: {e}", req.method, req.target))?
                                .ok_or_else(|| {
                                    format!("{} {}: no answer", req.method, req.target)
                                })?
                        }
                    };
                    let what = format!("thread {t} request {j}: {} {}", req.method, req.target);
                    let ok = match (j % 5, req.method.as_str()) {
                        (0, _) => a.status == 201 && a.body == sha.hex().as_bytes(),
                        (1, _) => {
                            let want = last.as_ref().map_or(&s.known, |(_, d)| d);
                            a.status == 200 && a.body == *want
                        }
                        (2, _) => a.status == 201,
                        (3, _) => {
                            a.status == 200
                                && serde_json::from_slice::<serde_json::Value>(&a.body)
                                    .is_ok_and(|v| v.is_array())
                        }
                        (_, "HEAD") => {
                            a.status == 200
                                && a.header("content-length")
                                    == Some(s.known.len().to_string().as_str())
                        }
                        _ => a.status == 404,
                    };
                    if !ok {
                        return Err(format!(
                            "{what}: {} {:?}",
                            a.status,
                            short(&String::from_utf8_lossy(&a.body))
                        ));
                    }
                    if j % 5 == 0 {
                        last = Some((sha, data));
                    }
                    if j % 5 == 2 {
                        put.push(format!("t{t}-{j}"));
                    }
                }
                Ok(put)
            })
        })
        .collect();
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    for (t, w) in workers.into_iter().enumerate() {
        match w.join() {
            Ok(Ok(names)) => expected
                .entry(format!("load-{}", t % KEYS))
                .or_default()
                .extend(names),
            Ok(Err(e)) => failures.push(e),
            Err(_) => failures.push(format!("thread {t} panicked")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{} requests took {:?}",
        THREADS * PER_THREAD,
        started.elapsed()
    );
    // Concurrent PUTs to one key lost nothing.
    for (key, names) in &expected {
        let a = once(s.addr, &Request::new("GET", format!("/shadir/{key}"))).expect("answer");
        assert_eq!(a.status, 200);
        let list: Vec<(String, String)> = serde_json::from_slice(&a.body).expect("a list");
        let stored: BTreeSet<String> = list
            .iter()
            .filter_map(|(inner, _)| {
                let v: serde_json::Value = serde_json::from_str(inner).ok()?;
                v["file"].as_str().map(String::from)
            })
            .collect();
        assert_eq!(&stored, names, "{key}");
    }
    s.check_disk(Duration::from_secs(5));
    s.still_serves();
}

#[test]
fn uploads_cut_in_the_middle_leave_nothing() {
    let s = Setup::new();
    let full = pseudo_random_bytes(1 << 20, 7);
    let cuts: [(&str, usize); 3] = [
        ("close", 300 << 10),
        ("half-close", 300 << 10),
        ("chunked", 200 << 10),
    ];
    for (how, sent) in cuts {
        let mut c = TcpStream::connect(s.addr).expect("connect");
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        if how == "chunked" {
            c.write_all(
                b"POST /shacache HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
            .unwrap();
            for part in full[..sent].chunks(16 << 10) {
                c.write_all(format!("{:x}\r\n", part.len()).as_bytes())
                    .unwrap();
                c.write_all(part).unwrap();
                c.write_all(b"\r\n").unwrap();
            }
        } else {
            c.write_all(
                format!(
                    "POST /shacache HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                    full.len()
                )
                .as_bytes(),
            )
            .unwrap();
            c.write_all(&full[..sent]).unwrap();
        }
        // Let the server take what was sent before the cut.
        std::thread::sleep(Duration::from_millis(100));
        if how == "half-close" {
            // The server sees the end of the body before Content-Length: a 4xx or
            // nothing.
            c.shutdown(Shutdown::Write).unwrap();
            let mut conn = Conn {
                s: c,
                buf: Vec::new(),
            };
            if let Ok(Some(a)) = conn.answer(false) {
                assert!((400..500).contains(&a.status), "{how}: {a:?}");
            }
        } else {
            drop(c);
        }
        assert!(
            !shacachefs::server::blob_path(&s.root(), &Sha512::of(&full)).exists(),
            "{how}: the whole blob was stored"
        );
        assert!(
            !shacachefs::server::blob_path(&s.root(), &Sha512::of(&full[..sent])).exists(),
            "{how}: the partial body was stored as a blob"
        );
    }
    s.check_disk(Duration::from_secs(5));
    assert_eq!(
        files_under(&s.root().join("shacache")).len(),
        1,
        "only the known blob"
    );
    // The same blob sent whole is stored.
    let a = once(
        s.addr,
        &Request::new("POST", "/shacache").body(full.clone()),
    )
    .expect("answer");
    assert_eq!(a.status, 201);
    assert_eq!(a.body, Sha512::of(&full).hex().into_bytes());
    s.still_serves();
}

/// Raises the soft limit of open files (many connections on both ends in one process).
fn raise_fd_limit(want: u64) {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && (r.rlim_cur as u64) < want {
            r.rlim_cur = (want as libc::rlim_t).min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

#[test]
fn stalled_uploads_do_not_starve_other_requests() {
    const STALLED: usize = 600;
    raise_fd_limit(4 * STALLED as u64);
    let s = Setup::new();
    // Uploads that announce 1 MiB, send 1 KiB, then say nothing more (the connection
    // stays open: no header timeout applies to a body).
    let started = Instant::now();
    let mut stalled = Vec::with_capacity(STALLED);
    for _ in 0..STALLED {
        let mut c = TcpStream::connect_timeout(&s.addr, IO_TIMEOUT).expect("connect");
        c.write_all(b"POST /shacache HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n")
            .expect("upload head");
        c.write_all(&[b's'; 1024]).expect("upload start");
        stalled.push(c);
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    // Others are still served, promptly: a blob read, a shadir write, an upload.
    let (tx, rx) = std::sync::mpsc::channel();
    let (addr, sha) = (s.addr, s.known_sha);
    std::thread::spawn(move || {
        // No panic here: the test may already have given up and stopped the server.
        let status = |req: Request| -> Result<Option<u16>, String> {
            let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let mut c = Conn { s, buf: Vec::new() };
            c.exchange(&req)
                .map(|a| a.map(|a| a.status))
                .map_err(|e| e.to_string())
        };
        let t = Instant::now();
        let get = status(Request::new("GET", format!("/shacache/{sha}")));
        let put = status(Request::new("PUT", "/shadir/starved").body(put_body(&sha, "s")));
        let post = status(Request::new("POST", "/shacache").body(b"small".to_vec()));
        let _ = tx.send((get, put, post, t.elapsed()));
    });
    let outcome = rx.recv_timeout(Duration::from_secs(10));
    for c in &stalled {
        let _ = c.shutdown(Shutdown::Both);
    }
    drop(stalled);
    match outcome {
        Ok((get, put, post, took)) => {
            assert!(
                matches!(get, Ok(Some(200))) && matches!(put, Ok(Some(201))),
                "GET {get:?}, PUT {put:?}"
            );
            // Uploads are capped (each holds a writer thread): with every slot taken by
            // a stalled client a new upload is turned away with 429, never left hanging.
            assert!(
                matches!(post, Ok(Some(201)) | Ok(Some(429))),
                "POST {post:?}"
            );
            assert!(took < Duration::from_secs(5), "took {took:?}");
        }
        Err(_) => panic!(
            "with {STALLED} uploads stalled mid-body (each holding a blocking thread, no \
             body timeout), a GET, a PUT and a POST got no answer within 10 s"
        ),
    }
    s.check_disk(Duration::from_secs(15));
    s.still_serves();
}
