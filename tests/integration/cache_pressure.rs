//! The read side under pressure (issue 11, cases 4, 9, 13, 14 and the hardening of
//! unannounced bodies): many readers through a cache small enough to evict all the
//! time, a disk too small for every download at once, a server whose HEAD lies or whose
//! 200 has no `Content-Length`, and a daemon short of file descriptors.
//!
//! The core tests drive `shacachefs::fs::Core` against the fault-injecting server of
//! `support/faulty.rs`; the mount tests use real FUSE mounts (as root) of the embedded
//! server. Small disks are tmpfs mounts made for one test. Every wait is bounded, every
//! server is on 127.0.0.1.

use crate::support;
use crate::support::faulty;
use support::{cert_a, Tmpfs};

use faulty::{blob_target, Fault, Rule, SignedServer};
use serde_json::json;
use shacachefs::cache::{Cache, CacheOptions};
use shacachefs::client::Client;
use shacachefs::config::Config;
use shacachefs::digest::Sha512;
use shacachefs::fs::{Core, FsError, FsOptions, ROOT_INO};
use shacachefs::remote::Limits;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use support::{pseudo_random_bytes, run_with_timeout, shacachefs_bin, without_proxy};
use support::{wait_within, Mount, Server};

/// No single core operation may take longer than this.
const OP_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// The core against the faulty server.

fn fast() -> Limits {
    Limits {
        connect_timeout: Duration::from_secs(2),
        low_speed_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        attempts: 2,
        backoff: Duration::from_millis(20),
        ..Limits::default()
    }
}

/// A faulty server with signed entries, and a directory for caches.
struct World(SignedServer);

impl std::ops::Deref for World {
    type Target = SignedServer;
    fn deref(&self) -> &SignedServer {
        &self.0
    }
}

impl World {
    async fn new() -> World {
        World(SignedServer::start().await)
    }

    /// A read-only core with its cache in `dir`, keeping `max_bytes`.
    fn core_at(&self, dir: &Path, max_bytes: u64) -> Arc<Core> {
        let cfg = Config {
            source: PathBuf::from("(cache pressure test)"),
            download_cache_url: Some(self.srv.cache_url()),
            download_dir_url: Some(self.srv.dir_url()),
            signature_certificates: vec![cert_a()],
            ..Config::default()
        };
        let client = Client::from_config(&cfg, fast()).expect("client");
        let cache = Cache::open(CacheOptions {
            dir: dir.to_path_buf(),
            max_bytes,
            namespace: self.srv.dir_url(),
        })
        .expect("cache");
        Core::new(client, cache, FsOptions::default())
    }

    fn core(&self, max_bytes: u64) -> Arc<Core> {
        self.core_at(&self.tmp.path().join("cache"), max_bytes)
    }

    /// Blob GETs answered so far for `sha`.
    fn gets(&self, sha: &Sha512) -> usize {
        self.srv.count("GET", &blob_target(sha))
    }
}

async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(OP_LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not end within {OP_LIMIT:?}"))
}

/// `cat KEY/NAME` through the core: lookup, open, read to the end, release.
async fn read_entry(core: &Arc<Core>, key: &str, name: &str) -> Result<Vec<u8>, FsError> {
    let dir = core.lookup(ROOT_INO, key).await?.ino;
    let ino = core.lookup(dir, name).await?.ino;
    let (fh, _) = core.open(ino).await?;
    let mut out = Vec::new();
    let result = loop {
        match core.read(fh, out.len() as u64, 128 << 10) {
            Ok(chunk) if chunk.is_empty() => break Ok(()),
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(e) => break Err(e),
        }
    };
    core.release(fh);
    result.map(|()| out)
}

async fn read_ok(core: &Arc<Core>, key: &str, name: &str, want: &[u8]) {
    let got = within(
        &format!("reading {key}/{name}"),
        read_entry(core, key, name),
    )
    .await
    .unwrap_or_else(|e| panic!("reading {key}/{name}: {e} (errno {})", e.errno()));
    assert!(
        got == want,
        "{key}/{name}: wrong bytes ({} read)",
        got.len()
    );
}

/// Is the blob in the core's cache (without marking it used)?
fn cached(core: &Arc<Core>, sha: &Sha512) -> bool {
    core.cache().blob_path(sha).exists()
}

/// Case 9: many concurrent readers of 2 MB and 200 KB entries through a 5 MB cache,
/// where every download and every close evicts: no open fails, every read returns the
/// entry's bytes. (Before the fix, about one run in two lost a read or more to "blob
/// vanished from the cache".)
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_readers_through_a_small_cache_never_fail() {
    let w = World::new().await;
    let mut files = Vec::new();
    for i in 0..3u64 {
        let data = pseudo_random_bytes(2_000_000, 10 + i);
        w.publish("pressure", &format!("big{i}.bin"), &data);
        files.push((format!("big{i}.bin"), Arc::new(data)));
    }
    for i in 0..5u64 {
        let data = pseudo_random_bytes(200_000, 20 + i);
        w.publish("pressure", &format!("small{i}.bin"), &data);
        files.push((format!("small{i}.bin"), Arc::new(data)));
    }
    let files = Arc::new(files);
    // Three rounds, each with a cold cache of its own.
    let mut failures = Vec::new();
    let mut core = None;
    for attempt in 0..3 {
        let c = w.core_at(&w.tmp.path().join(format!("cache{attempt}")), 5_000_000);
        let mut tasks = Vec::new();
        for reader in 0..32usize {
            let (core, files) = (Arc::clone(&c), Arc::clone(&files));
            tasks.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                for round in 0..30usize {
                    let (name, data) = &files[(reader * 7 + round * 3) % files.len()];
                    match read_entry(&core, "pressure", name).await {
                        Ok(got) if got == **data => {}
                        Ok(got) => failures.push(format!("{name}: wrong bytes ({})", got.len())),
                        Err(e) => failures.push(format!("{name}: {e} (errno {})", e.errno())),
                    }
                }
                failures
            }));
        }
        for t in tasks {
            failures.extend(within("a reader", t).await.expect("reader task"));
        }
        core = Some(c);
    }
    assert!(
        failures.is_empty(),
        "{} of 3 x 960 reads failed: {failures:?}",
        failures.len()
    );
    let core = core.expect("three rounds");
    let (used, limit, _) = core.cache().usage();
    assert!(used <= limit, "{used} bytes cached over the {limit} limit");
}

/// Case 4: a HEAD announcing far more than the blob (3.5 MiB, within the disk) neither
/// evicts the good cached blobs nor fails the open, and the verified size is the one
/// recorded; one announcing more than the disk (1 TiB) is refused without evicting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_head_evicts_nothing_and_fails_nothing() {
    let w = World::new().await;
    let a = pseudo_random_bytes(1 << 20, 31);
    let b = pseudo_random_bytes(1 << 20, 32);
    let c = pseudo_random_bytes(100_000, 33);
    let d = pseudo_random_bytes(100_000, 34);
    let sha_a = w.publish("lies", "a.bin", &a);
    let sha_b = w.publish("lies", "b.bin", &b);
    let sha_c = w.publish("lies", "c.bin", &c);
    let sha_d = w.publish("lies", "d.bin", &d);
    w.srv.push_rule(
        Rule::new(Fault::HeadLength(3_670_016))
            .method("HEAD")
            .path(&blob_target(&sha_c)),
    );
    w.srv.push_rule(
        Rule::new(Fault::HeadLength(1 << 40))
            .method("HEAD")
            .path(&blob_target(&sha_d)),
    );
    let core = w.core(4 << 20);
    read_ok(&core, "lies", "a.bin", &a).await;
    read_ok(&core, "lies", "b.bin", &b).await;
    read_ok(&core, "lies", "c.bin", &c).await;
    assert!(
        cached(&core, &sha_a) && cached(&core, &sha_b),
        "a HEAD saying 3.5 MiB for a 100 kB blob evicted good blobs"
    );
    assert_eq!(core.cache().size_of(&sha_c), Some(100_000));
    // More than the disk could ever hold: refused at once (ENOSPC), nothing evicted,
    // nothing downloaded (an announced size may refuse, never evict).
    let err = within("reading d.bin", read_entry(&core, "lies", "d.bin"))
        .await
        .expect_err("1 TiB announced");
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert_eq!(w.gets(&sha_d), 0);
    assert!(
        cached(&core, &sha_a) && cached(&core, &sha_b),
        "a HEAD saying 1 TiB evicted good blobs"
    );
}

/// Case 4: a cached blob whose size this process does not know, announced wrongly by
/// a HEAD, is kept (it verifies) instead of being thrown away as "wrong length" and
/// downloaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_head_does_not_make_a_good_cached_blob_wrong() {
    let w = World::new().await;
    let data = pseudo_random_bytes(200_000, 41);
    let sha = w.publish("lies", "e.bin", &data);
    let dir = w.tmp.path().join("cache");
    {
        let core = w.core_at(&dir, 1 << 30);
        read_ok(&core, "lies", "e.bin", &data).await;
        core.cache().close().expect("closing the cache");
    }
    assert_eq!(w.gets(&sha), 1);
    // Another session that lost the sizes (or a blob another process cached).
    std::fs::remove_file(dir.join("v1/sizes.json")).expect("removing sizes.json");
    w.srv
        .push_rule(Rule::new(Fault::HeadLength(1000)).method("HEAD"));
    let core = w.core_at(&dir, 1 << 30);
    read_ok(&core, "lies", "e.bin", &data).await;
    assert_eq!(
        w.gets(&sha),
        1,
        "the cached blob was thrown away and downloaded again"
    );
    assert!(cached(&core, &sha));
    assert_eq!(core.cache().size_of(&sha), Some(200_000));
}

/// Case 14: two concurrent 2.5 MB downloads on an 8 MiB cache disk holding three
/// evictable 2 MB blobs: each download's room is counted with the other's, so closed
/// blobs are evicted for both and neither gets ENOSPC. Four rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_downloads_on_a_small_disk_evict_for_each_other() {
    let w = World::new().await;
    let disk = w.tmp.path().join("disk");
    let _fs = Tmpfs::mount(&disk, "8m");
    let core = w.core_at(&disk.join("cache"), 1 << 30);
    let mut failures = Vec::new();
    for round in 0..4u64 {
        // Published before the key is first listed (listings are kept for a TTL).
        let key = format!("round{round}");
        let olds: Vec<_> = (0..3u64)
            .map(|i| pseudo_random_bytes(2_000_000, 100 + round * 10 + i))
            .collect();
        for (i, data) in olds.iter().enumerate() {
            w.publish(&key, &format!("old{i}.bin"), data);
        }
        let x = Arc::new(pseudo_random_bytes(2_500_000, 200 + round * 10));
        let y = Arc::new(pseudo_random_bytes(2_500_000, 201 + round * 10));
        w.publish(&key, "x.bin", &x);
        w.publish(&key, "y.bin", &y);
        for (i, data) in olds.iter().enumerate() {
            read_ok(&core, &key, &format!("old{i}.bin"), data).await;
        }
        let reads: Vec<_> = [("x.bin", x), ("y.bin", y)]
            .into_iter()
            .map(|(name, data)| {
                let (core, key) = (Arc::clone(&core), key.clone());
                tokio::spawn(async move {
                    match read_entry(&core, &key, name).await {
                        Ok(got) if got == *data => None,
                        Ok(_) => Some(format!("{key}/{name}: wrong bytes")),
                        Err(e) => Some(format!("{key}/{name}: {e} (errno {})", e.errno())),
                    }
                })
            })
            .collect();
        for r in reads {
            failures.extend(within("a concurrent read", r).await.expect("task"));
        }
    }
    assert!(failures.is_empty(), "{failures:?}");
}

/// Rules making the server tell nothing of a blob's size: HEAD is not implemented, and
/// every GET (the probe's ranged one too) gets the whole blob as a 200 without
/// `Content-Length`.
fn unannounced(w: &World, sha: &Sha512) {
    w.srv.push_rule(
        Rule::new(Fault::Status(501))
            .method("HEAD")
            .path(&blob_target(sha)),
    );
    w.srv
        .push_rule(Rule::blob_get(sha, Fault::WholeUnannounced));
}

/// Hardening: a 200 without `Content-Length` is bounded by the disk space the cache
/// may use (its closed blobs included: they are evicted for it), not by the limit: a
/// blob larger than `--cache-size` is readable, one larger than the disk is ENOSPC,
/// and nothing of it is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unannounced_body_is_bounded_by_the_disk_not_the_limit() {
    let w = World::new().await;
    let disk = w.tmp.path().join("disk");
    let _fs = Tmpfs::mount(&disk, "8m");
    let cache_dir = disk.join("cache");
    let core = w.core_at(&cache_dir, 1 << 30);
    // Each in a key of its own: listing a key probes the sizes of all its entries, and
    // a server that answers a probe with the whole blob sends it all.
    let fits = pseudo_random_bytes(4_000_000, 310);
    let sha = w.publish("fits", "fits.bin", &fits);
    unannounced(&w, &sha);
    let huge = pseudo_random_bytes(20_000_000, 311);
    let sha = w.publish("huge", "huge.bin", &huge);
    unannounced(&w, &sha);
    let over = pseudo_random_bytes(3_000_000, 312);
    let sha = w.publish("over", "over.bin", &over);
    unannounced(&w, &sha);
    let mut olds = Vec::new();
    let old_data: Vec<_> = (0..2u64)
        .map(|i| pseudo_random_bytes(2_500_000, 300 + i))
        .collect();
    for (i, data) in old_data.iter().enumerate() {
        olds.push(w.publish("bound", &format!("old{i}.bin"), data));
    }
    for (i, data) in old_data.iter().enumerate() {
        read_ok(&core, "bound", &format!("old{i}.bin"), data).await;
    }
    // 5 MB of closed blobs on an 8 MiB disk: 4 MB more fit only by evicting.
    read_ok(&core, "fits", "fits.bin", &fits).await;
    assert!(
        olds.iter().any(|s| !cached(&core, s)),
        "room was made by eviction"
    );

    let err = within("reading huge.bin", read_entry(&core, "huge", "huge.bin"))
        .await
        .expect_err("a 20 MB blob on an 8 MiB disk");
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    let left: Vec<_> = std::fs::read_dir(cache_dir.join("v1/tmp"))
        .expect("the cache's tmp directory")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind in tmp/: {left:?}");
    drop(core);

    // A blob larger than the limit stays readable.
    let core = w.core_at(&w.tmp.path().join("limited"), 1 << 20);
    read_ok(&core, "over", "over.bin", &over).await;
}

// ---------------------------------------------------------------------------------------
// Real mounts.

/// The embedded server with a publisher signing as A, and a tokio runtime to publish.
struct Published {
    server: Server,
    client: Client,
    runtime: tokio::runtime::Runtime,
    work: tempfile::TempDir,
}

impl Published {
    fn start() -> Published {
        let work = support::tempdir();
        let server = Server::start_at(&work.path().join("store"), None);
        let client = support::publisher(&server.cache_url(), &server.dir_url(), support::Who::A);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Published {
            server,
            client,
            runtime,
            work,
        }
    }

    fn publish(&self, key: &str, name: &str, data: &[u8]) -> Sha512 {
        self.runtime.block_on(support::publish(
            &self.client,
            key,
            data,
            json!({ "file": name }),
        ))
    }

    fn config(&self) -> PathBuf {
        support::signed_config(&self.server, self.work.path(), "mount.cfg")
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }
}

/// Case 9 and the read stress of the acceptance: 16 processes × 20 reads (`cmp` with
/// the published bytes) of 2 MB and 200 KB entries through a 5 MB cache, while
/// `shacachefs fsck` runs on the same cache: no open fails, every read is exact.
fn many_processes_read_through_a_small_cache(extra: &[&str]) {
    let p = Published::start();
    let refs = p.path("ref");
    std::fs::create_dir_all(&refs).unwrap();
    let mut names = Vec::new();
    for i in 0..3u64 {
        let name = format!("big{i}.bin");
        let data = pseudo_random_bytes(2_000_000, 500 + i);
        p.publish("stress", &name, &data);
        std::fs::write(refs.join(&name), &data).unwrap();
        names.push(name);
    }
    for i in 0..5u64 {
        let name = format!("small{i}.bin");
        let data = pseudo_random_bytes(200_000, 510 + i);
        p.publish("stress", &name, &data);
        std::fs::write(refs.join(&name), &data).unwrap();
        names.push(name);
    }
    let cache = p.path("cache");
    let mut args = vec!["--cache-size", "5M"];
    args.extend_from_slice(extra);
    let mut m = Mount::start(&p.config(), &cache, &p.path("mnt"), &args);
    let mut readers = Vec::new();
    for proc_no in 0..32usize {
        let list: Vec<&str> = (0..20)
            .map(|round| names[(proc_no * 7 + round * 3) % names.len()].as_str())
            .collect();
        let script = format!(
            "for f in {}; do cmp \"$1/stress/$f\" \"$2/$f\" || echo \"FAILED $f\"; done",
            list.join(" ")
        );
        let out = p.path(&format!("reader{proc_no}.out"));
        let child = Command::new("sh")
            .args(["-c", &script, "reader"])
            .arg(m.path(""))
            .arg(&refs)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
            .spawn()
            .expect("a reader process");
        readers.push((child, out));
    }
    // fsck of the same cache directory meanwhile (bounded: three runs).
    for _ in 0..3 {
        let mut c = Command::new(shacachefs_bin());
        without_proxy(&mut c)
            .args(["fsck", "--cache-dir"])
            .arg(&cache);
        let out = run_with_timeout(c, Duration::from_secs(120));
        assert!(out.success(), "fsck: {}", out.describe());
    }
    let mut failures = Vec::new();
    for (mut child, out) in readers {
        let status = wait_within(&mut child, Duration::from_secs(300));
        let text = std::fs::read_to_string(&out).unwrap_or_default()
            + &std::fs::read_to_string(out.with_extension("err")).unwrap_or_default();
        if !status.is_some_and(|s| s.success()) || !text.trim().is_empty() {
            failures.push(format!("{}: {status:?}: {text}", out.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} readers failed:\n{}\n--- daemon log (tail) ---\n{}",
        failures.len(),
        failures.join("\n"),
        tail(&m.log_text(), 40)
    );
    let log = m.log_text();
    assert!(!log.contains("vanished"), "{}", tail(&log, 40));
    m.unmount();
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[test]
fn many_processes_read_through_a_small_cache_passthrough() {
    many_processes_read_through_a_small_cache(&[]);
}

#[test]
fn many_processes_read_through_a_small_cache_no_passthrough() {
    many_processes_read_through_a_small_cache(&["--no-passthrough"]);
}

/// A self-describing version of an entry: `lines` lines `NAME vVERSION INDEX`, so that a
/// reader can tell a whole version from a mix of versions, a truncation or a shift.
fn version_bytes(name: &str, version: u32, lines: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines * (name.len() + 16));
    for i in 0..lines {
        out.extend_from_slice(format!("{name} v{version:04} {i:08}\n").as_bytes());
    }
    out
}

/// The acceptance's read stress: 32 processes × 20 reads of 2 MB and 200 KB entries
/// through a 5 MB cache, while another client republishes every name (ten new versions,
/// `--dir-ttl 1`) and `shacachefs fsck` runs on the cache: every read is one whole
/// version of the entry it opened, and no open fails.
fn many_processes_read_while_republished(extra: &[&str]) {
    let p = Published::start();
    let names: Vec<(String, usize)> = (0..3)
        .map(|i| (format!("big{i}.bin"), 100_000))
        .chain((0..5).map(|i| (format!("small{i}.bin"), 10_000)))
        .collect();
    for (name, lines) in &names {
        p.publish("moving", name, &version_bytes(name, 0, *lines));
    }
    let cache = p.path("cache");
    let mut args = vec!["--cache-size", "5M", "--dir-ttl", "1"];
    args.extend_from_slice(extra);
    let mut m = Mount::start(&p.config(), &cache, &p.path("mnt"), &args);
    // Each read: the file must be `lines` lines of one version of its name, in order.
    let check = r#"awk -v n="$f" -v want="$2" '{ if (NR == 1) v = $2; if ($1 != n || $2 != v || $3 + 0 != NR - 1) bad = 1 } END { if (bad || NR != want) exit 1 }'"#;
    let mut readers = Vec::new();
    for proc_no in 0..32usize {
        let list: Vec<String> = (0..20)
            .map(|round| {
                let (name, lines) = &names[(proc_no * 7 + round * 3) % names.len()];
                format!("{name}:{lines}")
            })
            .collect();
        let script = format!(
            "for item in {}; do f=${{item%%:*}}; set -- \"$1\" ${{item#*:}}; \
             {check} \"$1/moving/$f\" || echo \"FAILED $f\"; done",
            list.join(" ")
        );
        let out = p.path(&format!("mover{proc_no}.out"));
        let child = Command::new("sh")
            .args(["-c", &script, "reader"])
            .arg(m.path(""))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(out.with_extension("err")).unwrap())
            .spawn()
            .expect("a reader process");
        readers.push((child, out));
    }
    // Another client republishes every name meanwhile (bounded: ten versions).
    let (cache_url, dir_url) = (p.server.cache_url(), p.server.dir_url());
    let publishing_names = names.clone();
    let publisher = std::thread::spawn(move || {
        let client = support::publisher(&cache_url, &dir_url, support::Who::A);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        for version in 1..=10u32 {
            for (name, lines) in &publishing_names {
                rt.block_on(support::publish(
                    &client,
                    "moving",
                    &version_bytes(name, version, *lines),
                    json!({ "file": name }),
                ));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    for _ in 0..3 {
        let mut c = Command::new(shacachefs_bin());
        without_proxy(&mut c)
            .args(["fsck", "--cache-dir"])
            .arg(&cache);
        let out = run_with_timeout(c, Duration::from_secs(120));
        assert!(out.success(), "fsck: {}", out.describe());
    }
    publisher.join().expect("the publishing thread");
    let mut failures = Vec::new();
    for (mut child, out) in readers {
        let status = wait_within(&mut child, Duration::from_secs(300));
        let text = std::fs::read_to_string(&out).unwrap_or_default()
            + &std::fs::read_to_string(out.with_extension("err")).unwrap_or_default();
        if !status.is_some_and(|s| s.success()) || !text.trim().is_empty() {
            failures.push(format!("{}: {status:?}: {text}", out.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} readers failed:\n{}\n--- daemon log (tail) ---\n{}",
        failures.len(),
        failures.join("\n"),
        tail(&m.log_text(), 40)
    );
    m.unmount();
}

#[test]
fn many_processes_read_while_republished_passthrough() {
    many_processes_read_while_republished(&[]);
}

#[test]
fn many_processes_read_while_republished_no_passthrough() {
    many_processes_read_while_republished(&["--no-passthrough"]);
}

/// A `shacachefs mount -f` started under `prlimit --nofile=SOFT:HARD`.
#[track_caller]
fn limited_mount(cfg: &Path, cache: &Path, mountpoint: &Path, soft: u64, hard: u64) -> Mount {
    let nofile = format!("--nofile={soft}:{hard}");
    Mount::builder(cfg, cache, mountpoint)
        .wrapped_in(&["prlimit", &nofile, "--"])
        .start()
}

/// The daemon's "Max open files" soft and hard limits.
fn nofile(m: &Mount) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", m.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files")
        .to_string();
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].to_string(), f[4].to_string())
}

/// Case 13: the daemon raises its soft open-file limit to the hard one at start.
#[test]
fn the_mount_raises_its_open_file_limit() {
    let p = Published::start();
    let m = limited_mount(&p.config(), &p.path("cache"), &p.path("mnt"), 256, 4096);
    assert_eq!(
        nofile(&m),
        ("4096".to_string(), "4096".to_string()),
        "{}",
        m.log_text()
    );
}

/// Case 13: 300 opens of one cached file cost the daemon one descriptor, and a daemon
/// out of descriptors answers EMFILE (with a warning in its log), not EIO; closing the
/// files makes opens work again.
#[test]
fn out_of_descriptors_is_emfile_and_handles_share_a_descriptor() {
    let p = Published::start();
    let mut datas = Vec::new();
    for i in 0..60u64 {
        let data = pseudo_random_bytes(1000 + i as usize, 600 + i);
        p.publish("fds", &format!("f{i}.bin"), &data);
        datas.push(data);
    }
    let cache = p.path("cache");
    // Everything cached first (downloads need sockets and temporary files).
    {
        let mut m = Mount::start(&p.config(), &cache, &p.path("mnt0"), &[]);
        for (i, data) in datas.iter().enumerate() {
            let got = std::fs::read(m.path(&format!("fds/f{i}.bin"))).unwrap();
            assert!(got == *data, "f{i}.bin");
        }
        m.unmount();
    }
    let m = limited_mount(&p.config(), &cache, &p.path("mnt"), 48, 48);
    let pid = m.pid();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let path = |i: usize| p.path("mnt").join(format!("fds/f{i}.bin"));
    let before = fds();
    let same: Vec<_> = (0..300)
        .map(|n| std::fs::File::open(path(0)).unwrap_or_else(|e| panic!("open {n} of f0: {e}")))
        .collect();
    let during = fds();
    assert!(
        during <= before + 2,
        "300 opens of one blob took {} descriptors",
        during - before
    );
    drop(same);
    let mut held = Vec::new();
    let mut errors = Vec::new();
    for i in 0..datas.len() {
        match std::fs::File::open(path(i)) {
            Ok(f) => held.push(f),
            Err(e) => errors.push(e.raw_os_error()),
        }
    }
    assert!(
        !errors.is_empty(),
        "60 distinct open files under a limit of 48 descriptors all opened"
    );
    assert!(
        errors.iter().all(|e| *e == Some(libc::EMFILE)),
        "errors: {errors:?}\n{}",
        tail(&m.log_text(), 20)
    );
    assert!(
        m.log_text().contains("out of file descriptors"),
        "{}",
        tail(&m.log_text(), 20)
    );
    drop(held);
    // The kernel releases asynchronously: a few tries.
    let reopened = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read(path(datas.len() - 1)).is_ok_and(|d| d == datas[datas.len() - 1])
    });
    assert!(reopened, "opens work again once files are closed");
}
