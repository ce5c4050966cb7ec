//! The embedded shacache + shadir server over real HTTP: blobs, ranges, shadir lists,
//! validation, concurrency, path safety, authentication, TLS and shutdown.

use crate::support::paths_under;
use crate::support::pki::Pki;
use reqwest::header::{
    ACCEPT_RANGES, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    LOCATION, RANGE,
};
use reqwest::{Client, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use shacachefs::digest::Sha512;
use shacachefs::server::{self, RunningServer, ServerOptions, TlsOptions};
use shacachefs::wire::RawEntry;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn opts(root: &Path) -> ServerOptions {
    ServerOptions {
        root: root.to_path_buf(),
        upload_user: None,
        tls: None,
    }
}

async fn start(opts: ServerOptions) -> RunningServer {
    server::start("127.0.0.1:0".parse().unwrap(), opts)
        .await
        .unwrap()
}

fn tls_config(ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    }
}

/// A client that never follows redirects (uploads must see the 302 itself).
fn client_with(tls: rustls::ClientConfig) -> Client {
    Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn http() -> Client {
    client_with(tls_config(None, None))
}

async fn post(c: &Client, s: &RunningServer, body: Vec<u8>) -> reqwest::Response {
    c.post(s.cache_url())
        .header(CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap()
}

fn entry(sha: &str, extra: &str) -> RawEntry {
    RawEntry {
        inner: format!(r#"{{"sha512": "{sha}", "extra": "{extra}"}}"#),
        signature: String::new(),
    }
}

async fn put(c: &Client, url: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    c.put(url)
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn listing(c: &Client, url: &str) -> Vec<RawEntry> {
    let r = c.get(url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
    shacachefs::wire::parse_listing(&r.bytes().await.unwrap())
        .unwrap()
        .entries
}

/// Sends one raw HTTP/1.1 request (paths reqwest would normalise) and returns the status.
async fn raw(addr: SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

const EMPTY_SHA: &str = "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";

#[tokio::test]
async fn small_blobs_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let c = http();
    for body in [Vec::new(), vec![0x42], b"hello shacache\n".to_vec()] {
        let sha = Sha512::of(&body);
        let r = post(&c, &s, body.clone()).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(r.text().await.unwrap(), sha.hex());
        assert!(server::blob_path(dir.path(), &sha).is_file());

        let r = c
            .get(format!("{}/{sha}", s.cache_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h[CONTENT_LENGTH], body.len().to_string().as_str());
        assert_eq!(h[ACCEPT_RANGES], "bytes");
        assert_eq!(h[CACHE_CONTROL], "public, max-age=31556926");
        assert_eq!(h[CONTENT_TYPE], "application/octet-stream");
        assert_eq!(r.bytes().await.unwrap(), body);
    }
    assert_eq!(Sha512::of(b"").hex(), EMPTY_SHA);
    // Posting again is fine and answers the same name; the trailing-slash form works too.
    let r = c
        .post(format!("{}/", s.cache_url()))
        .body(vec![0x42])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.text().await.unwrap(), Sha512::of(&[0x42]).hex());
    // No temporary file is left behind in the root.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    s.shutdown().await;
}

#[tokio::test]
async fn absent_and_malformed_blob_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let c = http();
    let absent = Sha512::of(b"never uploaded").hex();
    let r = c
        .get(format!("{}/{absent}", s.cache_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c
        .head(format!("{}/{absent}", s.cache_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Uploaded blob, but asked for in upper case or truncated: 404, never a lookup.
    let sha = post(&c, &s, b"x".to_vec()).await.text().await.unwrap();
    for name in [
        sha.to_uppercase(),
        sha[..127].to_string(),
        format!("{sha}0"),
    ] {
        let r = c
            .get(format!("{}/{name}", s.cache_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{name}");
    }
    for path in [
        "/shacache/..",
        "/shacache/%2E%2E%2Fshadir",
        "/shacache/../shadir/x",
        "/",
        "/other",
        "/shadir",
        "/shadir/",
    ] {
        assert_eq!(raw(s.addr, "GET", path, "").await, 404, "{path}");
    }
    // Known paths, wrong methods.
    assert_eq!(raw(s.addr, "GET", "/shacache", "").await, 405);
    assert_eq!(
        raw(s.addr, "DELETE", &format!("/shacache/{sha}"), "").await,
        405
    );
    assert_eq!(raw(s.addr, "POST", "/shadir/k", "").await, 405);
    s.shutdown().await;
}

#[tokio::test]
async fn blobs_of_many_read_chunks_are_sent_whole_and_by_ranges() {
    // Past several of the server's 256 KiB read chunks, with a tail that is not one.
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let c = http();
    let body: Vec<u8> = (0..(5u32 << 20) / 4 + 12_345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let n = body.len();
    let sha = post(&c, &s, body.clone()).await.text().await.unwrap();
    let url = format!("{}/{sha}", s.cache_url());
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.bytes().await.unwrap() == body, "whole blob differs");
    let chunk = 256 << 10;
    for (start, end) in [
        (chunk - 1, chunk),
        (chunk + 7, 3 * chunk + 5),
        (1, n - 2),
        (4 * chunk, n - 1),
    ] {
        let r = c
            .get(&url)
            .header(RANGE, format!("bytes={start}-{end}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        let got = r.bytes().await.unwrap();
        assert!(got == body[start..=end], "range {start}-{end} differs");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn head_and_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let c = http();
    let body: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let sha = post(&c, &s, body.clone()).await.text().await.unwrap();
    let url = format!("{}/{sha}", s.cache_url());

    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[CONTENT_LENGTH], "1000");
    assert_eq!(r.headers()[ACCEPT_RANGES], "bytes");
    assert!(r.bytes().await.unwrap().is_empty());

    for (range, start, end) in [
        ("bytes=0-0", 0, 0),
        ("bytes=10-19", 10, 19),
        ("bytes=990-5000", 990, 999),
        ("bytes=900-", 900, 999),
        ("bytes=-100", 900, 999),
        ("bytes=-5000", 0, 999),
    ] {
        let r = c.get(&url).header(RANGE, range).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.headers()[CONTENT_RANGE],
            format!("bytes {start}-{end}/1000").as_str()
        );
        assert_eq!(
            r.headers()[CONTENT_LENGTH],
            (end - start + 1).to_string().as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), body[start..=end], "{range}");
    }
    // HEAD mirrors GET, ranges included.
    let r = c
        .head(&url)
        .header(RANGE, "bytes=0-0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()[CONTENT_RANGE], "bytes 0-0/1000");

    for range in ["bytes=1000-", "bytes=5000-6000", "bytes=-0"] {
        let r = c.get(&url).header(RANGE, range).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(r.headers()[CONTENT_RANGE], "bytes */1000");
    }
    for range in ["bytes=0-1,5-6", "bytes=5-2", "lines=1-2", "bytes=x-"] {
        let r = c.get(&url).header(RANGE, range).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{range}");
        assert_eq!(r.bytes().await.unwrap(), body, "{range}");
    }
    // The empty blob has no satisfiable range; that tells a prober its size.
    post(&c, &s, Vec::new()).await;
    let r = c
        .get(format!("{}/{EMPTY_SHA}", s.cache_url()))
        .header(RANGE, "bytes=0-0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()[CONTENT_RANGE], "bytes */0");
    s.shutdown().await;
}

/// Chunk `i` of a pseudo-random stream: one random block made once, with the chunk
/// number stamped over its first bytes so no two chunks are equal.
fn pseudo_random_chunk(base: &[u8], i: usize) -> Vec<u8> {
    let mut buf = base.to_vec();
    buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
    buf
}

/// Peak resident memory of this process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Measured on this process's peak RSS, so run alone in a process of its own.
#[test]
fn hundred_mib_upload_is_streamed() {
    crate::support::in_own_process("server::hundred_mib_upload_is_streamed", || {
        crate::support::own_runtime().block_on(hundred_mib_upload_body())
    });
}

async fn hundred_mib_upload_body() {
    const SIZE: usize = 100 << 20;
    const CHUNK: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let c = http();

    // Chunks made on the fly, so the test holds 1 MiB at a time.
    let base = Arc::new(crate::support::pseudo_random_bytes(CHUNK, 100));
    let expected = {
        use sha2::Digest;
        let mut h = sha2::Sha512::new();
        for i in 0..SIZE / CHUNK {
            h.update(pseudo_random_chunk(&base, i));
        }
        hex::encode(h.finalize())
    };
    let sent = base.clone();
    let chunks = futures_util::stream::unfold(0usize, move |i| {
        let base = sent.clone();
        async move {
            (i < SIZE / CHUNK).then(|| {
                (
                    Ok::<_, std::io::Error>(pseudo_random_chunk(&base, i)),
                    i + 1,
                )
            })
        }
    });

    let r = c
        .post(s.cache_url())
        .header(CONTENT_LENGTH, SIZE)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.text().await.unwrap(), expected);

    let mut r = c
        .get(format!("{}/{expected}", s.cache_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.content_length(), Some(SIZE as u64));
    // Compare with the regenerated stream, byte for byte.
    let mut pos = 0;
    let mut current = (usize::MAX, Vec::new());
    while let Some(mut data) = r.chunk().await.unwrap() {
        while !data.is_empty() {
            let (idx, off) = (pos / CHUNK, pos % CHUNK);
            assert!(idx < SIZE / CHUNK, "longer than sent");
            if current.0 != idx {
                current = (idx, pseudo_random_chunk(&base, idx));
            }
            let n = data.len().min(CHUNK - off);
            assert!(
                data[..n] == current.1[off..off + n],
                "differs at byte {pos}"
            );
            pos += n;
            data = data.slice(n..);
        }
    }
    assert_eq!(pos, SIZE);
    // Holding the body whole anywhere (client, server upload or download) would push
    // the peak past 100 MiB.
    let peak = peak_rss();
    assert!(peak < 90 << 20, "peak RSS {} MiB", peak >> 20);
    s.shutdown().await;
}

#[tokio::test]
async fn shadir_put_and_get() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let c = http();
    let url = format!("{}/pypi:pytz=2016.10", s.dir_url());
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    let a = entry(&Sha512::of(b"a").hex(), "a");
    let r = put(&c, &url, a.to_put_body()).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.bytes().await.unwrap().is_empty());
    assert_eq!(listing(&c, &url).await, vec![a.clone()]);
    assert!(server::key_path(dir.path(), "pypi:pytz=2016.10").is_file());

    // Identical again: not duplicated.
    assert_eq!(
        put(&c, &url, a.to_put_body()).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(listing(&c, &url).await, vec![a.clone()]);

    // Another one, signed, with an upper-case sha512: both listed, inner kept verbatim.
    let b = RawEntry {
        inner: format!(
            r#"{{"sha512": "{}"}}"#,
            Sha512::of(b"b").hex().to_uppercase()
        ),
        signature: "c2lnbmF0dXJl".into(),
    };
    assert_eq!(
        put(&c, &url, b.to_put_body()).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(listing(&c, &url).await, vec![a.clone(), b.clone()]);

    // The encoded and the raw spelling of a key are one key.
    let encoded = format!("{}/pypi%3Apytz%3D2016.10", s.dir_url());
    assert_eq!(listing(&c, &encoded).await.len(), 2);
    let spaced = format!("{}/a%20b", s.dir_url());
    assert_eq!(
        put(&c, &spaced, a.to_put_body()).await.status(),
        StatusCode::CREATED
    );
    assert!(server::key_path(dir.path(), "a b").is_file());

    // HEAD gives the size of the list.
    let r = c.head(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let len: usize = r.headers()[CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        len,
        c.get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len()
    );

    // An existing but empty list file reads as [].
    std::fs::write(server::key_path(dir.path(), "empty"), b"").unwrap();
    let r = c
        .get(format!("{}/empty", s.dir_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.text().await.unwrap(), "[]");
    s.shutdown().await;
}

#[tokio::test]
async fn shadir_rejects_bad_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let c = http();
    let url = format!("{}/key", s.dir_url());
    let sha = Sha512::of(b"x").hex();
    let pair = |inner: &str, sig: &str| {
        RawEntry {
            inner: inner.into(),
            signature: sig.into(),
        }
        .to_put_body()
    };
    let good_inner = format!(r#"{{"sha512": "{sha}"}}"#);
    let cases = [
        ("not JSON", "nope".to_string()),
        ("not an array", r#"{"a": 1}"#.to_string()),
        ("one element", r#"["{}"]"#.to_string()),
        (
            "three elements",
            format!(r#"["{}", "", ""]"#, good_inner.replace('"', "\\\"")),
        ),
        ("non-string elements", "[1, 2]".to_string()),
        ("bad base64", pair(&good_inner, "%%%")),
        ("inner not JSON", pair("nope", "")),
        ("inner not an object", pair("[1, 2]", "")),
        ("sha512 missing", pair(r#"{"url": "x"}"#, "")),
        ("sha512 not a string", pair(r#"{"sha512": 12}"#, "")),
        (
            "sha512 short",
            pair(&format!(r#"{{"sha512": "{}"}}"#, &sha[..64]), ""),
        ),
        (
            "sha512 non-hex",
            pair(&format!(r#"{{"sha512": "{}zz"}}"#, &sha[..126]), ""),
        ),
    ];
    for (what, body) in cases {
        let r = put(&c, &url, body).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{what}");
        assert!(
            !r.text().await.unwrap().is_empty(),
            "{what}: a reason is given"
        );
    }
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let big = vec![b' '; 2 << 20];
    assert_eq!(
        put(&c, &url, big).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_to_one_key_are_all_kept() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let c = http();
    let url = format!("{}/slapos-global-key", s.dir_url());
    let sha = Sha512::of(b"x").hex();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (c, url, body) = (
                c.clone(),
                url.clone(),
                entry(&sha, &i.to_string()).to_put_body(),
            );
            tokio::spawn(async move { put(&c, &url, body).await.status() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::CREATED);
    }
    let mut extras: Vec<String> = listing(&c, &url)
        .await
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.inner).unwrap();
            v["extra"].as_str().unwrap().to_string()
        })
        .collect();
    extras.sort_by_key(|e| e.parse::<u32>().unwrap());
    let expected: Vec<String> = (0..32).map(|i| i.to_string()).collect();
    assert_eq!(extras, expected);
    s.shutdown().await;
}

#[tokio::test]
async fn hostile_keys_stay_inside_the_root() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("a").join("b").join("root");
    std::fs::create_dir_all(&root).unwrap();
    let s = start(opts(&root)).await;
    let body = entry(&Sha512::of(b"x").hex(), "hostile").to_put_body();
    let long = "x".repeat(1000);
    let accepted = [
        "..",
        ".",
        "%2E%2E",
        "..%2F..%2F..%2Fescape",
        "%2F..%2F..%2Fabs",
        "%00",
        "a%00b",
        "%2Fetc%2Fpasswd",
        "%FF%FE",
        "%",
        "%zz",
        long.as_str(),
    ];
    for key in accepted {
        let path = format!("/shadir/{key}");
        assert_eq!(raw(s.addr, "PUT", &path, &body).await, 201, "{key}");
        assert_eq!(raw(s.addr, "GET", &path, "").await, 200, "{key}");
    }
    let too_long = "x".repeat(2000);
    assert_eq!(
        raw(s.addr, "PUT", &format!("/shadir/{too_long}"), &body).await,
        414
    );
    let too_long_encoded = "%2F".repeat(1025);
    assert_eq!(
        raw(s.addr, "PUT", &format!("/shadir/{too_long_encoded}"), &body).await,
        414
    );
    // Encoded keys of the full allowed length (every byte escaped) are stored too.
    let max_encoded = "%2F".repeat(1024);
    assert_eq!(
        raw(s.addr, "PUT", &format!("/shadir/{max_encoded}"), &body).await,
        201
    );
    for path in [
        "/shadir/../escape",
        "/shadir/a/../../escape",
        "/shadir/%2E%2E/x",
    ] {
        assert_eq!(raw(s.addr, "PUT", path, &body).await, 404, "{path}");
    }

    let all = crate::support::paths_under(outer.path());
    for p in &all {
        assert!(
            p.starts_with(&root) || root.starts_with(p),
            "file outside the root: {p:?}"
        );
    }
    // Every stored list maps back to the key it was written for.
    assert!(server::key_path(&root, "..").is_file());
    assert!(server::key_path(&root, [0u8]).is_file());
    assert!(server::key_path(&root, "/etc/passwd").is_file());
    assert!(server::key_path(&root, "/".repeat(1024)).is_file());
    s.shutdown().await;
}

#[tokio::test]
async fn basic_auth_guards_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.upload_user = Some(("alice".into(), "s3cret:x".into()));
    let s = start(o).await;
    let c = http();
    let body = b"guarded".to_vec();
    let sha = Sha512::of(&body);
    let key_url = format!("{}/k", s.dir_url());
    let put_body = entry(&sha.hex(), "e").to_put_body();

    // No credentials, then wrong ones: redirected to the login page, nothing stored.
    for auth in [None, Some(("alice", "wrong")), Some(("bob", "s3cret:x"))] {
        let mut req = c.post(s.cache_url()).body(body.clone());
        let mut preq = c.put(&key_url).body(put_body.clone());
        if let Some((u, p)) = auth {
            req = req.basic_auth(u, Some(p));
            preq = preq.basic_auth(u, Some(p));
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()[LOCATION], "/login");
        let r = preq.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()[LOCATION], "/login");
    }
    let r = c
        .post(s.cache_url())
        .header(AUTHORIZATION, "Bearer token")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert!(!server::blob_path(dir.path(), &sha).exists());
    assert_eq!(
        c.get(&key_url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );

    // Right credentials.
    let r = c
        .post(s.cache_url())
        .basic_auth("alice", Some("s3cret:x"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.text().await.unwrap(), sha.hex());
    let r = c
        .put(&key_url)
        .basic_auth("alice", Some("s3cret:x"))
        .body(put_body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    // Reads stay open.
    let r = c
        .get(format!("{}/{sha}", s.cache_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), body);
    assert_eq!(listing(&c, &key_url).await.len(), 1);
    s.shutdown().await;
}

#[tokio::test]
async fn tls_with_optional_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    // A CA, a server certificate for 127.0.0.1/localhost and a client certificate.
    let pki = Pki::new("test CA");
    pki.server("server").client("client", "client");
    let p = |n: &str| pki.path(n);
    let mut o = opts(dir.path());
    o.tls = Some(TlsOptions {
        cert_file: p("server.pem"),
        key_file: p("server.key"),
        client_ca_file: Some(p("ca.pem")),
    });
    let s = start(o).await;
    assert!(s.cache_url().starts_with("https://127.0.0.1:"));
    assert!(s.dir_url().starts_with("https://127.0.0.1:"));

    let anonymous = client_with(tls_config(Some(&p("ca.pem")), None));
    let known = client_with(tls_config(
        Some(&p("ca.pem")),
        Some((&p("client.pem"), &p("client.key"))),
    ));
    let body = b"over TLS".to_vec();
    let sha = Sha512::of(&body).hex();
    let blob_url = format!("{}/{sha}", s.cache_url());
    let key_url = format!("{}/k", s.dir_url());
    let put_body = entry(&sha, "tls").to_put_body();

    // Reads work without a certificate.
    let r = anonymous.get(&blob_url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Uploads without one are refused.
    let r = anonymous
        .post(s.cache_url())
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = put(&anonymous, &key_url, put_body.clone()).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(!server::key_path(dir.path(), "k").exists());

    let r = known
        .post(s.cache_url())
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.text().await.unwrap(), sha);
    assert_eq!(
        put(&known, &key_url, put_body).await.status(),
        StatusCode::CREATED
    );

    let r = anonymous.get(&blob_url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap(), body);
    assert_eq!(listing(&anonymous, &key_url).await.len(), 1);

    // A client that does not trust the server's CA cannot talk to it at all.
    assert!(http().get(&blob_url).send().await.is_err());
    s.shutdown().await;
}

#[tokio::test]
async fn tls_start_reports_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.tls = Some(TlsOptions {
        cert_file: dir.path().join("missing.pem"),
        key_file: dir.path().join("missing.key"),
        client_ca_file: None,
    });
    let err = server::start("127.0.0.1:0".parse().unwrap(), o)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, server::ServerError::Tls(_)), "{err}");
}

#[tokio::test]
async fn shutdown_closes_the_port() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let addr = s.addr;
    let c = http();
    // Leave an idle keep-alive connection open: shutdown must not wait for it.
    let r = c.get(format!("{}/k", s.dir_url())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let t = std::time::Instant::now();
    s.shutdown().await;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    // Dropping the handle stops the server too (in the background).
    let s = start(opts(dir.path())).await;
    let addr = s.addr;
    drop(s);
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "port still open after drop");
}

#[tokio::test]
async fn aborted_upload_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"POST /shacache HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(tcp);
    // The handler notices the broken body and removes its temporary file.
    let mut entries = paths_under(dir.path());
    for _ in 0..100 {
        if entries.iter().all(|p| p.is_dir()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        entries = paths_under(dir.path());
    }
    assert!(entries.iter().all(|p| p.is_dir()), "{entries:?}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_upload_in_flight_finish() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(opts(dir.path())).await;
    let addr = s.addr;
    let url = s.cache_url();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let upload = tokio::spawn(async move {
        http()
            .post(url)
            .header(CONTENT_LENGTH, 6)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .unwrap()
    });
    tx.send(Ok(b"abc".to_vec())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(s.shutdown());
    // New connections are refused at once; the upload in flight goes on.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused);
    tx.send(Ok(b"def".to_vec())).await.unwrap();
    drop(tx);
    let r = upload.await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.text().await.unwrap(), Sha512::of(b"abcdef").hex());
    stopping.await.unwrap();
    assert!(server::blob_path(dir.path(), &Sha512::of(b"abcdef")).is_file());
}
