//! The HTTP client (`shacachefs::remote`) against a small fault-injecting HTTP/1.1
//! server written here over raw TCP, so a test can answer anything: wrong statuses,
//! redirects, bodies cut after N bytes, stalls, ignored ranges.

use crate::support::faulty::{reply, FaultyServer, Reply, Request};
use crate::support::pseudo_random_bytes;
use base64::Engine;
use shacachefs::digest::Sha512;
use shacachefs::remote::{DirListing, Limits, Probe, Remote, RemoteConfig, RemoteError};
use shacachefs::wire::RawEntry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// Helpers.

fn limits() -> Limits {
    Limits {
        connect_timeout: Duration::from_secs(2),
        low_speed_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        upload_answer_timeout: Duration::from_secs(5),
        attempts: 3,
        backoff: Duration::from_millis(10),
        max_dir_body: 1 << 20,
        max_json_depth: shacachefs::wire::DEFAULT_MAX_DEPTH,
    }
}

fn config(base: &str, limits: Limits) -> RemoteConfig {
    RemoteConfig {
        download_cache_url: Some(format!("{base}/shacache")),
        download_dir_url: Some(format!("{base}/shadir")),
        upload_cache_url: Some(format!("{base}/shacache")),
        upload_dir_url: Some(format!("{base}/shadir")),
        limits,
        ..RemoteConfig::default()
    }
}

fn remote(base: &str, limits: Limits) -> Remote {
    Remote::new_with_env(config(base, limits), |_| None).unwrap()
}

fn no_progress(_: u64, _: Option<u64>) {}

fn entry(sha: &Sha512) -> RawEntry {
    RawEntry {
        inner: format!(r#"{{"sha512": "{}", "file": "x"}}"#, sha.hex()),
        signature: String::new(),
    }
}

fn files_in(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

// ---------------------------------------------------------------------------------------
// shadir.

#[tokio::test]
async fn dir_404_is_missing_and_empty_array_is_found() {
    let srv = FaultyServer::scripted(|req, _| match req.target.as_str() {
        "/shadir/empty" => reply(200).body("[]"),
        _ => reply(404).body("no such key"),
    })
    .await;
    let r = remote(&srv.base(), limits());
    assert!(matches!(
        r.get_dir("missing").await.unwrap(),
        DirListing::Missing
    ));
    match r.get_dir("empty").await.unwrap() {
        DirListing::Found(l) => assert!(l.entries.is_empty() && l.rejected.is_empty()),
        other => panic!("{other:?}"),
    }
    assert_eq!(srv.scripted_requests().len(), 2, "a 404 is not retried");
}

#[tokio::test]
async fn dir_listing_is_parsed() {
    let sha = Sha512::of(b"x");
    let body = format!("[{}]", entry(&sha).to_put_body());
    let srv = FaultyServer::scripted(move |_, _| reply(200).body(body.clone())).await;
    match remote(&srv.base(), limits()).get_dir("k").await.unwrap() {
        DirListing::Found(l) => assert_eq!(l.entries, vec![entry(&sha)]),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn dir_key_is_percent_encoded() {
    let srv = FaultyServer::scripted(|_, _| reply(200).body("[]")).await;
    let r = remote(&srv.base(), limits());
    r.get_dir("a b").await.unwrap();
    r.get_dir("pypi:pytz=2016.10").await.unwrap();
    let targets: Vec<String> = srv
        .scripted_requests()
        .into_iter()
        .map(|q| q.target)
        .collect();
    assert_eq!(targets, ["/shadir/a%20b", "/shadir/pypi:pytz=2016.10"]);
}

#[tokio::test]
async fn dir_body_over_the_limit_is_too_large() {
    let big = format!("[{}]", vec!["[\"a\", \"b\"]"; 100].join(", "));
    let srv = FaultyServer::scripted(move |req, _| {
        let r = reply(200).body(big.clone());
        if req.target.ends_with("streamed") {
            // No Content-Length: only counting while reading can catch it.
            Reply {
                close_delimited: true,
                ..r
            }
        } else {
            r
        }
    })
    .await;
    let r = remote(
        &srv.base(),
        Limits {
            max_dir_body: 100,
            ..limits()
        },
    );
    for key in ["announced", "streamed"] {
        let err = r.get_dir(key).await.unwrap_err();
        assert!(
            matches!(err, RemoteError::TooLarge { limit: 100, .. }),
            "{key}: {err}"
        );
    }
    assert_eq!(srv.scripted_requests().len(), 2, "TooLarge is not retried");
}

#[tokio::test]
async fn dir_body_that_is_not_a_json_array_is_an_error() {
    let srv = FaultyServer::scripted(|req, _| match req.target.as_str() {
        "/shadir/html" => reply(200).body("<html>login</html>"),
        _ => reply(200).body("{}"),
    })
    .await;
    let r = remote(&srv.base(), limits());
    for key in ["html", "object"] {
        let err = r.get_dir(key).await.unwrap_err();
        assert!(matches!(err, RemoteError::Protocol { .. }), "{key}: {err}");
    }
}

#[tokio::test]
async fn put_dir_sends_the_entry_and_needs_201() {
    let sha = Sha512::of(b"y");
    let srv = FaultyServer::scripted(|req, _| match req.target.as_str() {
        "/shadir/created" => reply(201).body("some hash"),
        "/shadir/ok" => reply(200),
        _ => reply(400).body("signature is not base64"),
    })
    .await;
    let r = remote(&srv.base(), limits());
    r.put_dir("created", &entry(&sha)).await.unwrap();
    let seen = &srv.scripted_requests()[0];
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.body, entry(&sha).to_put_body().into_bytes());

    let err = r.put_dir("ok", &entry(&sha)).await.unwrap_err();
    assert!(matches!(err, RemoteError::Protocol { .. }), "{err}");
    let err = r.put_dir("bad", &entry(&sha)).await.unwrap_err();
    assert!(
        matches!(err, RemoteError::Status { status: 400, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("signature is not base64"), "{err}");
    assert_eq!(srv.scripted_requests().len(), 3, "nothing retried");
}

// ---------------------------------------------------------------------------------------
// Redirects, retries.

#[tokio::test]
async fn redirect_on_post_and_put_is_refused_without_retry() {
    let srv =
        FaultyServer::scripted(|_, _| reply(302).header("Location", "http://login.example/form"))
            .await;
    let r = remote(&srv.base(), limits());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, b"data").unwrap();
    let sha = Sha512::of(b"data");

    let err = r.post_blob(&file, &sha, &no_progress).await.unwrap_err();
    assert!(
        matches!(err, RemoteError::Refused { status: 302, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("login.example"), "{err}");
    let err = r.put_dir("k", &entry(&sha)).await.unwrap_err();
    assert!(
        matches!(err, RemoteError::Refused { status: 302, .. }),
        "{err}"
    );
    let methods: Vec<String> = srv
        .scripted_requests()
        .into_iter()
        .map(|q| q.method)
        .collect();
    assert_eq!(
        methods,
        ["POST", "PUT"],
        "one request each, no redirect followed"
    );
}

#[tokio::test]
async fn unauthorized_is_refused() {
    let srv = FaultyServer::scripted(|_, _| reply(403).body("forbidden")).await;
    let err = remote(&srv.base(), limits())
        .get_dir("k")
        .await
        .unwrap_err();
    assert!(
        matches!(err, RemoteError::Refused { status: 403, .. }),
        "{err}"
    );
    assert_eq!(srv.scripted_requests().len(), 1);
}

#[tokio::test]
async fn server_errors_are_retried_until_success() {
    let srv = FaultyServer::scripted(|_, n| {
        if n < 2 {
            reply(500).body("oops")
        } else {
            reply(200).body("[]")
        }
    })
    .await;
    let got = remote(&srv.base(), limits()).get_dir("k").await.unwrap();
    assert!(matches!(got, DirListing::Found(_)));
    assert_eq!(srv.scripted_requests().len(), 3);
}

#[tokio::test]
async fn server_errors_forever_fail_after_exactly_the_allowed_attempts() {
    let srv = FaultyServer::scripted(|_, _| reply(503)).await;
    let r = remote(
        &srv.base(),
        Limits {
            attempts: 4,
            ..limits()
        },
    );
    let err = r.get_dir("k").await.unwrap_err();
    assert!(
        matches!(err, RemoteError::Status { status: 503, .. }),
        "{err}"
    );
    assert_eq!(srv.scripted_requests().len(), 4);

    // The same for an upload: the body is streamed again each time.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, b"payload").unwrap();
    let err = r
        .post_blob(&file, &Sha512::of(b"payload"), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Status { .. }), "{err}");
    let reqs = srv.scripted_requests();
    assert_eq!(reqs.len(), 8);
    assert!(reqs[4..].iter().all(|q| q.body == b"payload"));
}

#[tokio::test]
async fn connection_refused_is_a_network_error_after_retries() {
    // A port nobody listens on: bind, note it, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = remote(&format!("http://127.0.0.1:{port}"), limits());
    let err = r.get_dir("k").await.unwrap_err();
    assert!(matches!(err, RemoteError::Network { .. }), "{err}");
}

// ---------------------------------------------------------------------------------------
// Upload.

#[tokio::test]
async fn post_streams_the_file_and_checks_the_echoed_hash() {
    let data = pseudo_random_bytes(1 << 20, 7);
    let sha = Sha512::of(&data);
    let srv = FaultyServer::scripted(move |req, _| {
        if req.target == "/shacache" {
            reply(201).body(format!("{}\n", sha.hex()))
        } else {
            reply(201).body(Sha512::of(b"something else").hex())
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, &data).unwrap();
    let done = AtomicU64::new(0);
    let progress = |n: u64, total: Option<u64>| {
        assert_eq!(total, Some(1 << 20));
        done.store(n, Ordering::Relaxed);
    };
    remote(&srv.base(), limits())
        .post_blob(&file, &sha, &progress)
        .await
        .unwrap();
    assert_eq!(done.load(Ordering::Relaxed), 1 << 20);
    let seen = &srv.scripted_requests()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, "/shacache");
    assert_eq!(
        seen.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(seen.header("content-length"), Some("1048576"));
    assert_eq!(seen.header("transfer-encoding"), None);
    assert!(seen.body == data);

    // Another hash in the 201: an error, not retried.
    let mut cfg = config(&srv.base(), limits());
    cfg.upload_cache_url = Some(format!("{}/other", srv.base()));
    let r = Remote::new_with_env(cfg, |_| None).unwrap();
    let err = r.post_blob(&file, &sha, &no_progress).await.unwrap_err();
    assert!(matches!(err, RemoteError::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("different hash"), "{err}");
    assert_eq!(srv.scripted_requests().len(), 2);
}

#[tokio::test]
async fn post_answer_that_never_comes_times_out() {
    let srv = FaultyServer::scripted(|_, _| Reply {
        delay: Some(Duration::from_secs(30)),
        ..reply(201)
    })
    .await;
    let r = remote(
        &srv.base(),
        Limits {
            upload_answer_timeout: Duration::from_millis(300),
            attempts: 1,
            ..limits()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, b"abc").unwrap();
    let started = Instant::now();
    let err = r
        .post_blob(&file, &Sha512::of(b"abc"), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn post_to_a_server_that_stops_reading_times_out() {
    let srv = FaultyServer::scripted(|_, _| Reply {
        ignore_body_for: Some(Duration::from_secs(30)),
        ..reply(201)
    })
    .await;
    let r = remote(
        &srv.base(),
        Limits {
            low_speed_timeout: Duration::from_millis(300),
            attempts: 1,
            ..limits()
        },
    );
    // Larger than what the socket buffers on both sides absorb (a few MiB on loopback).
    let data = vec![7u8; 32 << 20];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    std::fs::write(&file, &data).unwrap();
    // Never checked: the server does not answer.
    let sha = Sha512::of(b"unused");
    let started = Instant::now();
    let err = r.post_blob(&file, &sha, &no_progress).await.unwrap_err();
    assert!(matches!(err, RemoteError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("stalled"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?} {err}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Probe.

#[tokio::test]
async fn probe_without_head_nor_range_reads_and_verifies_the_whole_blob() {
    let data = pseudo_random_bytes(3 << 20, 11);
    let sha = Sha512::of(&data);
    let body = data.clone();
    let srv = FaultyServer::scripted(move |req, _| match req.method.as_str() {
        "HEAD" => reply(501).body("not implemented"),
        _ => reply(200).body(body.clone()),
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let got = remote(&srv.base(), limits())
        .probe_blob(&sha, tmp.path())
        .await
        .unwrap();
    let Probe::Fetched(v) = got else {
        panic!("{got:?}")
    };
    assert_eq!(v.sha(), sha);
    assert_eq!(std::fs::read(v.path()).unwrap(), data);
    let reqs = srv.scripted_requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].method, "HEAD");
    assert_eq!(reqs[1].header("range"), Some("bytes=0-0"));
}

#[tokio::test]
async fn probe_that_gets_a_corrupt_whole_blob_says_corrupt() {
    let data = pseudo_random_bytes(100_000, 5);
    let sha = Sha512::of(b"not this");
    let srv = FaultyServer::scripted(move |req, _| match req.method.as_str() {
        "HEAD" => reply(405),
        _ => reply(200).body(data.clone()),
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let err = remote(&srv.base(), limits())
        .probe_blob(&sha, tmp.path())
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Corrupt { .. }), "{err}");
    assert_eq!(files_in(tmp.path()), 0);
}

#[tokio::test]
async fn probe_uses_head_then_ranges() {
    let total = 123_456u64;
    let srv = FaultyServer::scripted(move |req, _| {
        let t = req.target.as_str();
        let sha_of = |s: &str| Sha512::of(s.as_bytes()).hex();
        if req.method == "HEAD" {
            if t.ends_with(&sha_of("head")) {
                return reply(200).header("Content-Length", total).body("");
            }
            if t.ends_with(&sha_of("absent")) {
                return reply(404);
            }
            if t.ends_with(&sha_of("forbidden")) {
                return reply(403);
            }
            return reply(501);
        }
        if t.ends_with(&sha_of("ranged")) {
            reply(206)
                .header("Content-Range", format!("bytes 0-0/{total}"))
                .body("x")
        } else if t.ends_with(&sha_of("empty")) {
            reply(416).header("Content-Range", "bytes */0")
        } else if t.ends_with(&sha_of("broken")) {
            reply(500)
        } else {
            reply(404)
        }
    })
    .await;
    let r = remote(&srv.base(), limits());
    let tmp = tempfile::tempdir().unwrap();
    let probe = |name: &'static str| {
        let r = r.clone();
        let dir = tmp.path().to_path_buf();
        async move { r.probe_blob(&Sha512::of(name.as_bytes()), &dir).await }
    };
    assert!(matches!(probe("head").await.unwrap(), Probe::Size(n) if n == total));
    assert!(matches!(probe("absent").await.unwrap(), Probe::Absent));
    assert!(matches!(probe("ranged").await.unwrap(), Probe::Size(n) if n == total));
    assert!(matches!(probe("empty").await.unwrap(), Probe::Size(0)));
    assert!(matches!(probe("gone").await.unwrap(), Probe::Absent));
    let err = probe("forbidden").await.unwrap_err();
    assert!(
        matches!(err, RemoteError::Refused { status: 403, .. }),
        "{err}"
    );
    let err = probe("broken").await.unwrap_err();
    assert!(
        matches!(err, RemoteError::Status { status: 500, .. }),
        "only a 404 means absent: {err}"
    );
}

// ---------------------------------------------------------------------------------------
// Fetch.

/// A server whose first GET of the blob dies after `cut` bytes; later GETs are answered
/// by `resume` (given the request).
async fn dropping_server(
    data: Arc<Vec<u8>>,
    cut: usize,
    resume: impl Fn(&Request, &[u8]) -> Reply + Send + Sync + 'static,
) -> FaultyServer {
    FaultyServer::scripted(move |req, n| {
        if n == 0 {
            Reply {
                cut_after: Some(cut),
                ..reply(200).body(data.to_vec())
            }
        } else {
            resume(req, &data)
        }
    })
    .await
}

#[tokio::test]
async fn fetch_resumes_with_a_range_after_a_dropped_connection() {
    let data = Arc::new(pseudo_random_bytes(2 << 20, 13));
    let sha = Sha512::of(&data);
    let cut = 700_001;
    let srv = dropping_server(Arc::clone(&data), cut, |req, data| {
        let from: usize = req
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        reply(206)
            .header(
                "Content-Range",
                format!("bytes {from}-{}/{}", data.len() - 1, data.len()),
            )
            .body(data[from..].to_vec())
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let last = AtomicU64::new(0);
    let progress = |n: u64, _: Option<u64>| last.store(n, Ordering::Relaxed);
    let v = remote(&srv.base(), limits())
        .fetch_blob(&sha, tmp.path(), &progress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(v.path()).unwrap(), *data);
    assert_eq!(last.load(Ordering::Relaxed), data.len() as u64);
    let reqs = srv.scripted_requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].header("range"), None);
    assert_eq!(
        reqs[1].header("range"),
        Some(format!("bytes={cut}-").as_str())
    );
    assert_eq!(
        reqs[0].target,
        format!("/shacache/{}", sha.hex()),
        "blob URL"
    );
}

#[tokio::test]
async fn fetch_restarts_when_the_resume_is_answered_200() {
    let data = Arc::new(pseudo_random_bytes(1 << 20, 17));
    let sha = Sha512::of(&data);
    let srv = dropping_server(Arc::clone(&data), 300_000, |_, data| {
        reply(200).body(data.to_vec())
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let v = remote(&srv.base(), limits())
        .fetch_blob(&sha, tmp.path(), &no_progress)
        .await
        .unwrap();
    assert_eq!(v.len(), data.len() as u64);
    assert_eq!(std::fs::read(v.path()).unwrap(), *data);
    assert_eq!(
        srv.scripted_requests()[1].header("range"),
        Some("bytes=300000-"),
        "it asked for the rest"
    );
}

#[tokio::test]
async fn fetch_refuses_a_continuation_from_the_wrong_offset() {
    let data = Arc::new(pseudo_random_bytes(100_000, 19));
    let sha = Sha512::of(&data);
    let srv = dropping_server(Arc::clone(&data), 50_000, |_, data| {
        reply(206)
            .header(
                "Content-Range",
                format!("bytes 0-{}/{}", data.len() - 1, data.len()),
            )
            .body(data.to_vec())
    })
    .await;
    let tmp = tempfile::tempdir().unwrap();
    let err = remote(&srv.base(), limits())
        .fetch_blob(&sha, tmp.path(), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Protocol { .. }), "{err}");
    assert_eq!(files_in(tmp.path()), 0, "the partial file is gone");
}

#[tokio::test]
async fn fetch_of_a_corrupt_blob_is_corrupt_and_leaves_nothing() {
    let mut data = pseudo_random_bytes(500_000, 23);
    let sha = Sha512::of(&data);
    data[1234] ^= 1;
    let srv = FaultyServer::scripted(move |_, _| reply(200).body(data.clone())).await;
    let tmp = tempfile::tempdir().unwrap();
    let err = remote(&srv.base(), limits())
        .fetch_blob(&sha, tmp.path(), &no_progress)
        .await
        .unwrap_err();
    let RemoteError::Corrupt {
        expected, actual, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*expected, sha);
    assert_ne!(*actual, sha);
    assert_eq!(files_in(tmp.path()), 0);
    // Fetched once more (asking caches on the way for a fresh copy), then corrupt.
    assert_eq!(srv.scripted_requests().len(), 2);
}

#[tokio::test]
async fn fetch_of_a_stalled_body_times_out_quickly() {
    let data = pseudo_random_bytes(1 << 20, 29);
    let sha = Sha512::of(&data);
    let srv = FaultyServer::scripted(move |_, _| Reply {
        stall_after: Some((10_000, Duration::from_secs(60))),
        ..reply(200).body(data.clone())
    })
    .await;
    let r = remote(
        &srv.base(),
        Limits {
            low_speed_timeout: Duration::from_millis(300),
            attempts: 1,
            ..limits()
        },
    );
    let tmp = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let err = r
        .fetch_blob(&sha, tmp.path(), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Timeout { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(srv.scripted_requests().len(), 1, "attempts = 1: no retry");
    assert_eq!(files_in(tmp.path()), 0);
}

#[tokio::test]
async fn fetch_of_an_absent_blob_is_not_found() {
    let srv = FaultyServer::scripted(|_, _| reply(404)).await;
    let tmp = tempfile::tempdir().unwrap();
    let err = remote(&srv.base(), limits())
        .fetch_blob(&Sha512::of(b"?"), tmp.path(), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::NotFound { .. }), "{err}");
    assert_eq!(srv.scripted_requests().len(), 1);
}

// ---------------------------------------------------------------------------------------
// Credentials, configuration, proxies.

#[tokio::test]
async fn credentials_in_the_url_become_basic_auth_and_are_never_shown() {
    let srv = FaultyServer::scripted(|_, _| reply(500).body("broken")).await;
    let base = srv.base().replace("http://", "http://u:p%40ss@");
    let r = Remote::new_with_env(
        RemoteConfig {
            download_dir_url: Some(format!("{base}/x")),
            limits: Limits {
                attempts: 1,
                ..limits()
            },
            ..RemoteConfig::default()
        },
        |_| None,
    )
    .unwrap();
    let err = r.get_dir("k").await.unwrap_err();
    let shown = format!("{err} {err:?} {r:?}");
    assert!(
        !shown.contains("p%40ss") && !shown.contains("p@ss"),
        "{shown}"
    );
    assert!(
        err.to_string().contains(&format!("{}/x/k", srv.base())),
        "{err}"
    );
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("u:p@ss")
    );
    let reqs = srv.scripted_requests();
    assert_eq!(reqs[0].header("authorization"), Some(expected.as_str()));
    assert_eq!(reqs[0].target, "/x/k");
}

#[tokio::test]
async fn unset_urls_are_reported_by_option_name() {
    let r = Remote::new_with_env(RemoteConfig::default(), |_| None).unwrap();
    assert!(!r.can_download() && !r.can_upload());
    let tmp = tempfile::tempdir().unwrap();
    let sha = Sha512::of(b"");
    let name = |e: RemoteError| match e {
        RemoteError::NotConfigured(n) => n,
        other => panic!("{other}"),
    };
    assert_eq!(name(r.get_dir("k").await.unwrap_err()), "download-dir-url");
    assert_eq!(
        name(r.put_dir("k", &entry(&sha)).await.unwrap_err()),
        "upload-dir-url"
    );
    assert_eq!(
        name(r.probe_blob(&sha, tmp.path()).await.unwrap_err()),
        "download-cache-url"
    );
    assert_eq!(
        name(
            r.fetch_blob(&sha, tmp.path(), &no_progress)
                .await
                .unwrap_err()
        ),
        "download-cache-url"
    );
    assert_eq!(
        name(
            r.post_blob(tmp.path(), &sha, &no_progress)
                .await
                .unwrap_err()
        ),
        "upload-cache-url"
    );

    let full = remote("http://127.0.0.1:1", limits());
    assert!(full.can_download() && full.can_upload());
    let read_only = Remote::new_with_env(
        RemoteConfig {
            upload_cache_url: None,
            ..config("http://h", limits())
        },
        |_| None,
    )
    .unwrap();
    assert!(read_only.can_download() && !read_only.can_upload());
}

#[tokio::test]
async fn http_proxy_is_used_except_for_loopback() {
    let proxy = FaultyServer::scripted(|_, _| reply(200).body("[]")).await;
    let direct = FaultyServer::scripted(|_, _| reply(200).body("[]")).await;
    let proxy_url = proxy.base().clone();
    let env = move |name: &str| (name == "http_proxy").then(|| proxy_url.clone());

    let far = Remote::new_with_env(config("http://shadir.invalid", limits()), env.clone()).unwrap();
    far.get_dir("k").await.unwrap();
    let seen = proxy.scripted_requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].target, "http://shadir.invalid/shadir/k");

    let near = Remote::new_with_env(config(&direct.base(), limits()), env).unwrap();
    near.get_dir("k").await.unwrap();
    assert_eq!(direct.scripted_requests().len(), 1);
    assert_eq!(
        proxy.scripted_requests().len(),
        1,
        "loopback bypasses the proxy"
    );
}

// ---------------------------------------------------------------------------------------
// Against the embedded server (`shacachefs::server`), which implements HEAD and Range.

mod embedded {
    use super::*;
    use crate::support::pki::Pki;
    use shacachefs::config::TlsFiles;
    use shacachefs::server::{self, ServerOptions, TlsOptions};
    use std::path::Path;

    async fn start(root: &Path, tls: Option<TlsOptions>) -> server::RunningServer {
        let opts = ServerOptions {
            root: root.to_path_buf(),
            upload_user: Some(("u".into(), "p@ss".into())),
            tls,
        };
        server::start("127.0.0.1:0".parse().unwrap(), opts)
            .await
            .unwrap()
    }

    /// Download URLs as the server gives them; upload URLs with `creds@` when given.
    fn config_for(s: &server::RunningServer, creds: Option<&str>) -> RemoteConfig {
        let with = |u: String| match creds {
            Some(c) => u.replacen("://", &format!("://{c}@"), 1),
            None => u,
        };
        RemoteConfig {
            download_cache_url: Some(s.cache_url()),
            download_dir_url: Some(s.dir_url()),
            upload_cache_url: Some(with(s.cache_url())),
            upload_dir_url: Some(with(s.dir_url())),
            limits: limits(),
            ..RemoteConfig::default()
        }
    }

    #[tokio::test]
    async fn round_trip_of_a_10_mib_blob_and_its_entry() {
        let store = tempfile::tempdir().unwrap();
        let s = start(store.path(), None).await;
        let r = Remote::new_with_env(config_for(&s, Some("u:p%40ss")), |_| None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let data = pseudo_random_bytes(10 << 20, 31);
        let sha = Sha512::of(&data);
        let file = tmp.path().join("upload");
        std::fs::write(&file, &data).unwrap();

        assert!(matches!(r.get_dir("k").await.unwrap(), DirListing::Missing));
        assert!(matches!(
            r.probe_blob(&sha, tmp.path()).await.unwrap(),
            Probe::Absent
        ));
        r.post_blob(&file, &sha, &no_progress).await.unwrap();
        assert!(
            matches!(r.probe_blob(&sha, tmp.path()).await.unwrap(), Probe::Size(n) if n == 10 << 20)
        );
        let v = r.fetch_blob(&sha, tmp.path(), &no_progress).await.unwrap();
        assert_eq!(v.len(), 10 << 20);
        assert!(std::fs::read(v.path()).unwrap() == data);

        r.put_dir("k", &entry(&sha)).await.unwrap();
        r.put_dir("k", &entry(&sha)).await.unwrap();
        match r.get_dir("k").await.unwrap() {
            DirListing::Found(l) => assert_eq!(l.entries, vec![entry(&sha)], "no duplicate"),
            other => panic!("{other:?}"),
        }

        // Without the credentials, uploads are refused (302 to a login page).
        let anonymous = Remote::new_with_env(config_for(&s, None), |_| None).unwrap();
        let err = anonymous.put_dir("k", &entry(&sha)).await.unwrap_err();
        assert!(
            matches!(err, RemoteError::Refused { status: 302, .. }),
            "{err}"
        );
        let err = anonymous
            .post_blob(&file, &sha, &no_progress)
            .await
            .unwrap_err();
        assert!(
            matches!(err, RemoteError::Refused { status: 302, .. }),
            "{err}"
        );
        s.shutdown().await;
    }

    /// Throughput of a plain-HTTP download from the embedded server (run with
    /// `cargo test --release --test remote -- --ignored --nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a benchmark: slow in debug builds"]
    async fn download_throughput() {
        let store = tempfile::tempdir().unwrap();
        let s = start(store.path(), None).await;
        let r = Remote::new_with_env(config_for(&s, Some("u:p%40ss")), |_| None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let data = pseudo_random_bytes(256 << 20, 37);
        let sha = Sha512::of(&data);
        let file = tmp.path().join("upload");
        std::fs::write(&file, &data).unwrap();
        drop(data);
        let started = Instant::now();
        r.post_blob(&file, &sha, &no_progress).await.unwrap();
        let up = started.elapsed();
        let started = Instant::now();
        let v = r.fetch_blob(&sha, tmp.path(), &no_progress).await.unwrap();
        let down = started.elapsed();
        assert_eq!(v.sha(), sha);
        let mib = 256.0;
        eprintln!(
            "upload {:.0} MiB/s, download {:.0} MiB/s",
            mib / up.as_secs_f64(),
            mib / down.as_secs_f64()
        );
        s.shutdown().await;
    }

    #[tokio::test]
    async fn https_with_a_ca_file_and_a_client_certificate() {
        // A CA, a server certificate for 127.0.0.1 and a client certificate.
        let pki = Pki::new("remote test CA");
        pki.server("server").client("client", "client");
        let p = |n: &str| pki.path(n);
        let store = tempfile::tempdir().unwrap();
        let s = start(
            store.path(),
            Some(TlsOptions {
                cert_file: p("server.pem"),
                key_file: p("server.key"),
                client_ca_file: Some(p("ca.pem")),
            }),
        )
        .await;
        assert!(s.cache_url().starts_with("https://"));
        let tmp = tempfile::tempdir().unwrap();
        let data = b"over TLS".to_vec();
        let sha = Sha512::of(&data);
        let file = tmp.path().join("upload");
        std::fs::write(&file, &data).unwrap();

        // Trusting the CA, no client certificate: reads work, uploads are refused.
        let ca_only = TlsFiles {
            ca_file: Some(p("ca.pem")),
            ..TlsFiles::default()
        };
        let anonymous = Remote::new_with_env(
            RemoteConfig {
                shacache_tls: ca_only.clone(),
                shadir_tls: ca_only.clone(),
                ..config_for(&s, None)
            },
            |_| None,
        )
        .unwrap();
        assert!(matches!(
            anonymous.get_dir("k").await.unwrap(),
            DirListing::Missing
        ));
        let err = anonymous
            .post_blob(&file, &sha, &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(err, RemoteError::Refused { .. }), "{err}");

        // With the client certificate: uploads work.
        let identity = TlsFiles {
            cert_file: Some(p("client.pem")),
            key_file: Some(p("client.key")),
            ..ca_only
        };
        let known = Remote::new_with_env(
            RemoteConfig {
                shacache_tls: identity.clone(),
                shadir_tls: identity,
                ..config_for(&s, Some("u:p%40ss"))
            },
            |_| None,
        )
        .unwrap();
        known.post_blob(&file, &sha, &no_progress).await.unwrap();
        known.put_dir("k", &entry(&sha)).await.unwrap();
        let v = anonymous
            .fetch_blob(&sha, tmp.path(), &no_progress)
            .await
            .unwrap();
        assert_eq!(std::fs::read(v.path()).unwrap(), data);

        // Not trusting the CA (system roots only): the server cannot be verified.
        let untrusting = Remote::new_with_env(config_for(&s, None), |_| None).unwrap();
        let err = untrusting.get_dir("k").await.unwrap_err();
        assert!(matches!(err, RemoteError::Network { .. }), "{err}");
        s.shutdown().await;
    }
}
