//! Progress you can see and metrics (issue 14, items 2 and 3): `status` during a slowed
//! download shows the transfer with its bytes moving, `--metrics-listen` of a mount is
//! scraped during and after it, and `serve --metrics-listen` counts requests. Real
//! mounts and processes, as root; loopback only; every wait bounded.

use crate::support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use support::faulty::{Background, Fault, Rule};
use support::*;

/// The value of an exposition line `NAME VALUE` (labels included in `name`).
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls `f` (at most `limit`, every 20 ms) until it returns `Some`.
#[track_caller]
fn poll<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "{what}: not seen within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A blob of 4,000 bytes trickled at one byte every 3 ms takes the server at least 12 s
/// to send: `status` and the metrics are read well inside that, while the download runs
/// (and faster than the low-speed limit of 1,024 bytes per 30 s, so it succeeds).
const SLOW_LEN: usize = 4000;
const TRICKLE: Duration = Duration::from_millis(3);

#[test]
fn status_and_metrics_follow_a_slowed_download() {
    let srv = Background::start();
    let data = pseudo_random_bytes(SLOW_LEN, 14);
    let meta = support::meta(serde_json::json!({"file": "slow.bin"}));
    let sha = srv.publish(&signer_a(), "k", &data, &meta);
    srv.push_rule(Rule::blob_get(&sha, Fault::Trickle(TRICKLE)).method("GET"));
    let dir = tempdir();
    let cfg = NetworkcacheConfig::for_urls(&srv.cache_url(), &srv.dir_url())
        .signer_a()
        .write(dir.path(), "cfg");
    // Port 0: the daemon logs the address it bound.
    let m = Mount::in_dir(&cfg, dir.path(), &["-k", "k", "-o", "metrics_listen=0"]);
    let metrics_url = poll(
        "the metrics address in the log",
        Duration::from_secs(10),
        || {
            let log = m.log_text();
            let at = log.find("metrics on http://")? + "metrics on ".len();
            let url = log[at..].split_whitespace().next()?;
            Some(url.to_string())
        },
    );
    assert!(
        metrics_url.starts_with("http://127.0.0.1:"),
        "{metrics_url}"
    );
    let scrape = || {
        let r = http_get(&metrics_url);
        assert_eq!(r.status, 200);
        String::from_utf8(r.body).expect("UTF-8 exposition")
    };
    let before = scrape();
    assert_eq!(
        sample(&before, "shacachefs_fetched_bytes_total"),
        Some(0.0),
        "{before}"
    );
    assert_eq!(
        sample(
            &before,
            "shacachefs_transfers_in_flight{direction=\"download\"}"
        ),
        Some(0.0),
        "{before}"
    );

    let path = m.path("k/slow.bin");
    let reader = std::thread::spawn(move || std::fs::read(path));
    // The transfer shows up, then its bytes move.
    let listed = |v: &serde_json::Value| -> Option<u64> {
        let t = v["transfers"].as_array()?.first()?.clone();
        assert_eq!(t["direction"], "download", "{v}");
        assert_eq!(t["key"], "k", "{v}");
        assert_eq!(t["name"], "slow.bin", "{v}");
        assert_eq!(t["total_bytes"], SLOW_LEN as u64, "{v}");
        t["done_bytes"].as_u64().filter(|d| *d > 0)
    };
    let first = poll(
        "a download listed with bytes done",
        Duration::from_secs(10),
        || listed(&status_json(&m.mountpoint)),
    );
    let later = poll("the bytes done growing", Duration::from_secs(10), || {
        listed(&status_json(&m.mountpoint)).filter(|d| *d > first)
    });
    assert!(later < SLOW_LEN as u64, "still in flight: {later}");
    let during = scrape();
    // The human form lists it too.
    let text = run(shacachefs(["status".as_ref(), m.mountpoint.as_os_str()]));
    text.assert_success();
    let out = text.stdout_text();
    assert!(out.contains("transfers:  1 in flight"), "{out}");
    assert!(out.contains("download  k  slow.bin  "), "{out}");
    // Still in flight after the scrape, so the scrape saw it running.
    assert!(
        listed(&status_json(&m.mountpoint)).is_some(),
        "the download ended sooner than the trickle allows"
    );
    assert_eq!(
        sample(
            &during,
            "shacachefs_transfers_in_flight{direction=\"download\"}"
        ),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        sample(&during, "shacachefs_cache_misses_total"),
        Some(1.0),
        "{during}"
    );

    let got = reader
        .join()
        .expect("reader thread")
        .expect("read the slow entry");
    assert_eq!(got, data);
    let after = scrape();
    assert_eq!(
        sample(&after, "shacachefs_fetched_bytes_total"),
        Some(SLOW_LEN as f64),
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "shacachefs_transfers_in_flight{direction=\"download\"}"
        ),
        Some(0.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "shacachefs_cache_used_bytes"),
        Some(SLOW_LEN as f64)
    );
    assert!(
        sample(
            &after,
            "shacachefs_shadir_requests_total{outcome=\"found\"}"
        ) >= Some(1.0),
        "{after}"
    );
    let done = status_json(&m.mountpoint);
    assert_eq!(done["transfers"], serde_json::json!([]), "{done}");
    assert_eq!(done["bytes_fetched"], SLOW_LEN as u64, "{done}");
    // Pinned bytes, once the blob is pinned.
    assert_eq!(sample(&after, "shacachefs_cache_pinned_bytes"), Some(0.0));
    let pin = std::process::Command::new("setfattr")
        .args(["-n", "user.shacachefs.pin", "-v", "1"])
        .arg(m.path("k/slow.bin"))
        .status()
        .expect("setfattr");
    assert!(pin.success());
    assert_eq!(
        sample(&scrape(), "shacachefs_cache_pinned_bytes"),
        Some(SLOW_LEN as f64)
    );
}

/// `shacachefs serve` with its metrics on port 0: the addresses it printed.
struct Served {
    child: Child,
    base: String,
    metrics: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(root: &Path) -> Served {
    let mut child = shacachefs([
        "serve".as_ref(),
        "--root".as_ref(),
        root.as_os_str(),
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--metrics-listen".as_ref(),
        "0".as_ref(),
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("start shacachefs serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut base, mut metrics) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while base.is_none() || metrics.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("serve printed its addresses within 20 s");
        let value = |l: &str| l.split('=').nth(1).map(|v| v.trim().to_string());
        if line.trim_start().starts_with("download-cache-url") {
            base = value(&line);
        } else if line.trim_start().starts_with("metrics ") {
            metrics = value(&line);
        }
    }
    Served {
        child,
        base: base.unwrap_or_default(),
        metrics: metrics.unwrap_or_default(),
    }
}

#[test]
fn serve_metrics_count_requests_bytes_and_the_store() {
    let dir = tempdir();
    let root = dir.path().join("store");
    let blob = pseudo_random_bytes(5000, 3);
    let sha = shacachefs::digest::Sha512::of(&blob);
    let shard = root.join("shacache").join(&sha.hex()[..2]);
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::write(shard.join(sha.hex()), &blob).unwrap();
    let s = serve(&root);
    assert!(s.metrics.starts_with("http://127.0.0.1:"), "{}", s.metrics);
    let got = http_get(&format!("{}/{}", s.base, sha.hex()));
    assert_eq!((got.status, got.body.len()), (200, blob.len()));
    assert_eq!(
        http_get(&format!("{}/{}", s.base, "0".repeat(128))).status,
        404
    );
    let text = String::from_utf8(http_get(&s.metrics).body).unwrap();
    assert_eq!(
        sample(
            &text,
            "shacachefs_server_requests_total{method=\"GET\",status=\"200\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "shacachefs_server_requests_total{method=\"GET\",status=\"404\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(&text, "shacachefs_server_sent_bytes_total") > Some(blob.len() as f64),
        "{text}"
    );
    assert!(sample(&text, "shacachefs_server_received_bytes_total") > Some(0.0));
    assert_eq!(
        sample(&text, "shacachefs_server_uploads_refused_total"),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "shacachefs_server_store_bytes"),
        Some(blob.len() as f64)
    );
    assert_eq!(sample(&text, "shacachefs_server_store_blobs"), Some(1.0));
    assert_eq!(http_get(&s.metrics.replace("/metrics", "/")).status, 404);
}

/// Progress bars are for terminals: with standard error a pipe, `upload` and `download`
/// print their results and log lines, never a bar.
#[test]
fn no_progress_bar_when_stderr_is_not_a_terminal() {
    let server = Server::start();
    let dir = tempdir();
    let cfg = server.config().signer_a().write(dir.path(), "cfg");
    let src = dir.path().join("a.bin");
    std::fs::write(&src, pseudo_random_bytes(1 << 20, 5)).unwrap();
    let up = run(shacachefs([
        "upload".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
        "-f".as_ref(),
        src.as_os_str(),
        "-k".as_ref(),
        "k".as_ref(),
        "file=a.bin".as_ref(),
    ]));
    up.assert_success();
    let out = dir.path().join("back.bin");
    let down = shacachefs_download(&cfg, "k", "a.bin", &out);
    down.assert_success();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    for o in [&up, &down] {
        let err = o.stderr_text();
        assert!(
            !err.contains("[==") && !err.contains("eta ") && !err.contains('\r'),
            "a bar on a pipe: {err:?}"
        );
    }
}
