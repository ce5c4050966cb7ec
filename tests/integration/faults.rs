//! Fault injection: what a user sees when shacache or shadir misbehaves, when an upload
//! is cut or refused, and when the cache lives on a filesystem that is too small.
//!
//! Most tests drive the filesystem core (`shacachefs::fs::Core`) directly against the
//! fault-injecting server of `support/faulty.rs`; a few use a real FUSE mount where what
//! the kernel hands to a program matters (`cat` of a corrupt blob, `cp` whose upload
//! dies). Every wait is bounded, every server is on 127.0.0.1.
//!
//! What each test checks: the read ends with the right bytes (after resume or retry) or
//! fails with the right errno within a bound tied to the configured timeouts;
//! unverified bytes never reach a reader nor the cache; the core goes on serving other
//! files; an upload that fails leaves its file intact in the outbox, publishes no entry
//! for a blob the server does not hold, and `shacachefs outbox retry` later succeeds.

use crate::support;
use crate::support::faulty;
use support::files_under;
use support::{cert_a, signer_a, Tmpfs};

use faulty::{blob_target, signed_entry, Background, Fault, Rule, SignedServer};
use serde_json::{Map, Value};
use shacachefs::cache::{Cache, CacheOptions};
use shacachefs::client::Client;
use shacachefs::config::Config;
use shacachefs::digest::Sha512;
use shacachefs::fs::{Core, FsError, FsOptions, Kind, ROOT_INO};
use shacachefs::outbox::{Item, Outbox};
use shacachefs::remote::Limits;
use shacachefs::signature::Signer;
use shacachefs::wire::{build_inner, RawEntry};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{pseudo_random_bytes, run_with_timeout, shacachefs, NetworkcacheConfig, Output};

/// The client's low-speed timeout in these tests.
const LOW_SPEED: Duration = Duration::from_secs(1);
/// Attempts per remote operation in these tests.
const ATTEMPTS: u32 = 3;
/// No single core operation of a test may take longer than this (a hang fails the test
/// instead of blocking the suite).
const OP_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// The world of one test.

/// Short timeouts, few retries: failures are reported fast.
fn fast() -> Limits {
    Limits {
        connect_timeout: Duration::from_secs(1),
        low_speed_timeout: LOW_SPEED,
        request_timeout: Duration::from_secs(2),
        upload_answer_timeout: Duration::from_secs(2),
        attempts: ATTEMPTS,
        backoff: Duration::from_millis(20),
        max_dir_body: 1 << 20,
        ..Limits::default()
    }
}

fn fixture(rel: &str) -> PathBuf {
    support::fixture(rel)
}

/// An entry whose inner text is given as is, signed by A.
fn signed(signer: &Signer, inner: &str) -> RawEntry {
    RawEntry {
        inner: inner.to_string(),
        signature: signer.sign(inner),
    }
}

/// The entry the reference client would write for `sha` with `{"file": name}`, signed.
fn entry_for(signer: &Signer, sha: &Sha512, name: &str) -> RawEntry {
    signed_entry(
        signer,
        sha,
        &support::meta(serde_json::json!({"file": name})),
    )
}

/// A faulty server, a signer, a temporary directory for caches and configurations.
struct World {
    signed: SignedServer,
    others: AtomicUsize,
}

impl std::ops::Deref for World {
    type Target = SignedServer;
    fn deref(&self) -> &SignedServer {
        &self.signed
    }
}

impl World {
    async fn new() -> World {
        World {
            signed: SignedServer::start().await,
            others: AtomicUsize::new(0),
        }
    }

    fn cache_dir(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }

    /// Reads and writes this server, signing with A and trusting only A.
    fn config(&self) -> Config {
        Config {
            source: PathBuf::from("(faults test)"),
            download_cache_url: Some(self.srv.cache_url()),
            download_dir_url: Some(self.srv.dir_url()),
            upload_cache_url: Some(self.srv.cache_url()),
            upload_dir_url: Some(self.srv.dir_url()),
            signature_private_key_file: Some(fixture("signature/signer-a.pkcs1.key")),
            signature_certificates: vec![cert_a()],
            ..Config::default()
        }
    }

    /// The same configuration as a file, for the `shacachefs` binary.
    fn config_file(&self) -> PathBuf {
        NetworkcacheConfig::for_urls(&self.srv.cache_url(), &self.srv.dir_url())
            .signer_a()
            .write(self.tmp.path(), "networkcache.cfg")
    }

    /// Writable, namespaced as `outbox retry` with [`World::config_file`] sees it.
    fn fs_opts(&self) -> FsOptions {
        FsOptions {
            writable: true,
            namespace: self.srv.dir_url(),
            ..FsOptions::default()
        }
    }

    fn core(&self, limits: Limits) -> Arc<Core> {
        self.core_with(&self.cache_dir(), limits, self.fs_opts(), 1 << 40)
    }

    fn core_with(&self, dir: &Path, limits: Limits, opts: FsOptions, max_bytes: u64) -> Arc<Core> {
        let client = Client::from_config(&self.config(), limits).expect("client");
        let cache = Cache::open(CacheOptions {
            dir: dir.to_path_buf(),
            max_bytes,
            namespace: self.srv.dir_url(),
        })
        .expect("cache");
        Core::new(client, cache, opts)
    }

    /// Publishes a new blob under a new key and reads it through `core`: the core still
    /// serves other files whatever happened before.
    async fn serves_another(&self, core: &Arc<Core>) {
        let n = self.others.fetch_add(1, Ordering::Relaxed);
        let key = format!("other-{n}");
        let data = pseudo_random_bytes(70_000 + n, 1000 + n as u64);
        self.publish(&key, "other.bin", &data);
        let got = within("reading another file", read_entry(core, &key, "other.bin")).await;
        assert!(
            got.as_ref().is_ok_and(|g| *g == data),
            "the core no longer serves other files: {:?}",
            got.err()
        );
    }

    /// `shacachefs outbox retry` against this server, for this world's cache.
    async fn outbox_retry(&self) -> Output {
        let cmd = shacachefs([
            "outbox".as_ref(),
            "retry".as_ref(),
            "-c".as_ref(),
            self.config_file().as_os_str(),
            "--cache-dir".as_ref(),
            self.cache_dir().as_os_str(),
        ]);
        tokio::task::spawn_blocking(move || run_with_timeout(cmd, Duration::from_secs(60)))
            .await
            .expect("outbox retry thread")
    }
}

/// Runs `fut`, failing the test when it takes over [`OP_LIMIT`].
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(OP_LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not end within {OP_LIMIT:?}"))
}

/// Opens, reads to the end in 128 KiB requests, releases.
async fn read_ino(core: &Arc<Core>, ino: u64) -> Result<Vec<u8>, FsError> {
    let (fh, _) = core.open(ino).await?;
    let mut out = Vec::new();
    loop {
        match core.read(fh, out.len() as u64, 128 << 10) {
            Ok(chunk) if chunk.is_empty() => break,
            Ok(chunk) => out.extend_from_slice(&chunk),
            Err(e) => {
                core.release(fh);
                return Err(e);
            }
        }
    }
    core.release(fh);
    Ok(out)
}

/// `cat KEY/NAME` through the core.
async fn read_entry(core: &Arc<Core>, key: &str, name: &str) -> Result<Vec<u8>, FsError> {
    let dir = core.lookup(ROOT_INO, key).await?.ino;
    let ino = core.lookup(dir, name).await?.ino;
    read_ino(core, ino).await
}

/// The error of a read that must fail, and how long it took.
async fn failed_read(core: &Arc<Core>, key: &str, name: &str) -> (FsError, Duration) {
    let started = Instant::now();
    match within(
        &format!("reading {key}/{name}"),
        read_entry(core, key, name),
    )
    .await
    {
        Ok(data) => panic!(
            "reading {key}/{name} succeeded ({} bytes) where it must fail",
            data.len()
        ),
        Err(e) => (e, started.elapsed()),
    }
}

/// Names in a key directory (without `.`, `..`).
async fn names_in(core: &Arc<Core>, key: &str) -> BTreeSet<String> {
    let dir = core
        .lookup(ROOT_INO, key)
        .await
        .unwrap_or_else(|e| panic!("lookup of key {key}: {e}"))
        .ino;
    let list = core.readdir(dir).await.expect("readdir");
    assert!(
        list.len() >= 2 && list[0].name == "." && list[1].name == "..",
        "readdir of {key} does not start with . and ..: {:?}",
        list.iter().take(3).map(|e| &e.name).collect::<Vec<_>>()
    );
    list.into_iter().skip(2).map(|e| e.name).collect()
}

/// The blob is neither known to the cache nor on its disk, and no temporary file is
/// left (unverified bytes never enter the cache).
#[track_caller]
fn assert_not_cached(core: &Core, sha: &Sha512) {
    assert!(
        core.cache().lookup_blob(sha).is_none(),
        "unverified blob {} is in the cache",
        sha.short(16)
    );
    let path = core.cache().blob_path(sha);
    assert!(!path.exists(), "{} exists", path.display());
    let left = files_under(core.cache().tmp_dir());
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[track_caller]
fn assert_bounded(what: &str, elapsed: Duration, bound: Duration) {
    assert!(elapsed < bound, "{what} took {elapsed:?} (bound {bound:?})");
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Every file in a cache directory is one the layout names (README "The cache"): no
/// file anywhere else, no temporary file left, no symbolic link.
#[track_caller]
fn assert_cache_layout(dir: &Path) {
    for path in files_under(dir) {
        let rel = path.strip_prefix(dir).expect("under the cache");
        let parts: Vec<&str> = rel
            .components()
            .map(|c| c.as_os_str().to_str().unwrap_or("\u{fffd}"))
            .collect();
        let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
        let item_id =
            |id: &str| !id.is_empty() && id.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit());
        let known = match parts.as_slice() {
            ["layout"] | ["v1", "open.lock"] | ["v1", "pins.lock"] | ["v1", "sizes.json"] => true,
            ["v1", "pins", name] => is_hex(name, 128),
            // The marker of a session that has not closed the cache (yet).
            ["v1", "unclean"] => true,
            ["v1", "blobs", shard, name] => {
                is_hex(shard, 2) && is_hex(name, 128) && name.starts_with(shard)
            }
            ["v1", "ns", ns, "namespace" | "keys.json" | "seen.json"] => is_hex(ns, 32),
            ["v1", "ns", ns, "dirs", f] => {
                is_hex(ns, 32) && f.strip_suffix(".json").is_some_and(|h| is_hex(h, 32))
            }
            // A published item's directory kept for the next one, meta.json emptied.
            ["v1", "outbox", spare, "meta.json"] if spare.starts_with(".spare-") => true,
            // An item is its data and its metadata, nothing more (its locks are on
            // those: no lock files).
            ["v1", "outbox", id, "data" | "meta.json"] => item_id(id),
            _ => false,
        };
        assert!(
            known && is_file,
            "unexpected file in the cache directory: {}",
            path.display()
        );
    }
}

/// The one outbox item named `name` in a cache directory.
#[track_caller]
fn pending(cache: &Path, name: &str) -> (Item, PathBuf) {
    let outbox = Outbox::open(cache).expect("outbox");
    let (items, broken) = outbox.list();
    assert!(broken.is_empty(), "unreadable outbox items: {broken:?}");
    let mut found: Vec<Item> = items.into_iter().filter(|i| i.meta.name == name).collect();
    assert_eq!(found.len(), 1, "outbox items named {name}: {found:?}");
    let item = found.remove(0);
    let data = outbox.data_path(&item.id);
    (item, data)
}

/// Creates `key/name` through the core, writes `data` in 128 KiB writes, closes it
/// (flush, then release): the result of the first failure, as `cp` would see it.
async fn write_through(
    core: &Arc<Core>,
    key: &str,
    name: &str,
    data: &[u8],
) -> Result<(), FsError> {
    let dir = core.mkdir(ROOT_INO, key).await?.ino;
    let (_, fh, _) = core.create(dir, name, None).await?;
    let mut result = Ok(());
    for (i, chunk) in data.chunks(128 << 10).enumerate() {
        if let Err(e) = core.write(fh, (i * (128 << 10)) as u64, chunk).await {
            result = Err(e);
            break;
        }
    }
    if result.is_ok() {
        result = within(&format!("closing {key}/{name}"), core.flush(fh, None)).await;
    }
    core.release_handle(fh).await;
    result
}

/// An upload that must fail: its error and how long the close took.
async fn failed_write(core: &Arc<Core>, key: &str, name: &str, data: &[u8]) -> (FsError, Duration) {
    let started = Instant::now();
    match write_through(core, key, name, data).await {
        Ok(()) => panic!("writing {key}/{name} succeeded where it must fail"),
        Err(e) => (e, started.elapsed()),
    }
}

/// After a failed upload: the file waits in the outbox with its exact bytes, and the
/// server lists no entry pointing to a blob it does not hold.
#[track_caller]
fn assert_kept_for_later(w: &World, name: &str, data: &[u8]) -> Item {
    let (item, path) = pending(&w.cache_dir(), name);
    let (sha, len) = Sha512::of_file(&path).expect("hashing the staged file");
    assert_eq!(len, data.len() as u64, "{name}: staged size");
    assert_eq!(sha, Sha512::of(data), "{name}: staged bytes changed");
    assert!(
        item.meta.last_error.is_some(),
        "{name}: the failure is not recorded"
    );
    let dangling = w.srv.dangling_entries();
    assert!(
        dangling.is_empty(),
        "entries published for blobs the server lacks: {dangling:?}"
    );
    item
}

/// After `outbox retry`: `key` lists exactly one entry for `name`, its blob is on the
/// server with the right bytes, and the entry is the one signed before the failure.
#[track_caller]
fn assert_published_once(w: &World, key: &str, item: &Item, data: &[u8]) {
    let sha = Sha512::of(data);
    let blob = w
        .srv
        .blob(&sha)
        .expect("blob on the server after the retry");
    assert!(blob.as_slice() == data, "published blob differs");
    let entries = w.srv.entries(key).unwrap_or_default();
    let mine: Vec<&RawEntry> = entries
        .iter()
        .filter(|e| e.inner.contains(&sha.hex()))
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "entries for the blob under {key}: {entries:?}"
    );
    if let Some((inner, signature)) = &item.meta.entry {
        assert_eq!(&mine[0].inner, inner, "the retry signed a new entry");
        assert_eq!(&mine[0].signature, signature);
    }
    assert!(w.srv.dangling_entries().is_empty());
}

// ---------------------------------------------------------------------------------------
// Reads: dropped connections, resume, ranges.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_resume_with_range() {
    let w = World::new().await;
    let a = pseudo_random_bytes(1 << 20, 1);
    let b = pseudo_random_bytes(700_000, 2);
    let sa = w.publish("resume", "a.bin", &a);
    let sb = w.publish("resume", "b.bin", &b);
    w.srv
        .push_rule(Rule::blob_get(&sa, Fault::CutAfter(100_000)).times(1));
    // Announces the right length, sends fewer bytes, closes.
    w.srv
        .push_rule(Rule::blob_get(&sb, Fault::SendFewer(1000)).times(1));
    let core = w.core(fast());

    let got = within("reading a.bin", read_entry(&core, "resume", "a.bin")).await;
    assert!(got.unwrap() == a, "a.bin content");
    let got = within("reading b.bin", read_entry(&core, "resume", "b.bin")).await;
    assert!(got.unwrap() == b, "b.bin content");

    for (sha, at, len) in [(sa, 100_000, a.len()), (sb, b.len() - 1000, b.len())] {
        let gets: Vec<_> = w
            .srv
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path == blob_target(&sha))
            .collect();
        assert_eq!(gets.len(), 2, "one cut GET and one resume: {gets:?}");
        assert_eq!(gets[0].range, None);
        assert_eq!(
            gets[1].range.as_deref(),
            Some(format!("bytes={at}-").as_str())
        );
        assert_eq!(gets[1].status, 206);
        assert_eq!(core.cache().lookup_blob(&sha), Some(len as u64));
    }
    w.serves_another(&core).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_range_restarts_from_zero() {
    let w = World::new().await;
    let data = pseudo_random_bytes(900_000, 3);
    let sha = w.publish("norange", "c.bin", &data);
    w.srv
        .push_rule(Rule::blob_get(&sha, Fault::CutAfter(300_000)).times(1));
    w.srv.push_rule(Rule::blob_get(&sha, Fault::IgnoreRange));
    let core = w.core(fast());
    let got = within("reading c.bin", read_entry(&core, "norange", "c.bin")).await;
    assert!(got.unwrap() == data, "content after a 200 to a resume");
    let gets: Vec<_> = w
        .srv
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == blob_target(&sha))
        .collect();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[1].range.as_deref(), Some("bytes=300000-"));
    assert_eq!(gets[1].status, 200, "the server ignored the range");
    assert_eq!(core.cache().lookup_blob(&sha), Some(data.len() as u64));
    w.serves_another(&core).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_every_time_fail_with_eio_in_bounded_time() {
    let w = World::new().await;
    let data = pseudo_random_bytes(1 << 20, 4);
    // Cut before any byte: no progress at all.
    let s0 = w.publish("cut", "zero.bin", &data[..500_000]);
    w.srv.push_rule(Rule::blob_get(&s0, Fault::CutAfter(0)));
    // Cut after a little each time: progress, but never the end.
    let s1 = w.publish("cut", "some.bin", &data);
    w.srv.push_rule(Rule::blob_get(&s1, Fault::CutAfter(2000)));
    let core = w.core(fast());

    let (e, took) = failed_read(&core, "cut", "zero.bin").await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded("a download cut at byte 0", took, LOW_SPEED * 10);
    assert_eq!(
        w.srv.count("GET", &blob_target(&s0)),
        ATTEMPTS as usize,
        "attempts without progress"
    );
    assert_not_cached(&core, &s0);

    let (e, took) = failed_read(&core, "cut", "some.bin").await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded("a download cut every 2000 bytes", took, LOW_SPEED * 20);
    let gets = w.srv.count("GET", &blob_target(&s1));
    assert!(
        gets > ATTEMPTS as usize && gets <= 25 * ATTEMPTS as usize,
        "{gets} GETs: progress allows more attempts, but a bounded number"
    );
    assert_not_cached(&core, &s1);
    w.serves_another(&core).await;
}

// ---------------------------------------------------------------------------------------
// Reads: wrong bytes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_is_never_served_nor_cached() {
    let w = World::new().await;
    let data = pseudo_random_bytes(300_000, 5);
    let sha = w.publish("flip", "bad.bin", &data);
    w.srv
        .push_rule(Rule::blob_get(&sha, Fault::FlipByte(123_456)));
    let once = pseudo_random_bytes(200_000, 6);
    let sonce = w.publish("flip", "once.bin", &once);
    w.srv
        .push_rule(Rule::blob_get(&sonce, Fault::FlipByte(7)).times(1));
    let core = w.core(fast());

    let (e, took) = failed_read(&core, "flip", "bad.bin").await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded("a corrupt download", took, LOW_SPEED * 10);
    assert_eq!(
        w.srv.count("GET", &blob_target(&sha)),
        2,
        "fetched once more, then EIO"
    );
    // The second fetch asks caches on the way for a fresh copy; the first does not.
    let no_cache: Vec<bool> = w
        .srv
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == blob_target(&sha))
        .map(|r| r.no_cache)
        .collect();
    assert_eq!(
        no_cache,
        vec![false, true],
        "Cache-Control/Pragma no-cache on the retry"
    );
    assert_not_cached(&core, &sha);

    // Corrupt once: the second download verifies.
    let got = within("reading once.bin", read_entry(&core, "flip", "once.bin")).await;
    assert!(got.unwrap() == once, "once.bin content");
    assert_eq!(w.srv.count("GET", &blob_target(&sonce)), 2);

    // Once the server sends the right bytes, the same core reads them.
    w.srv.clear_rules();
    let got = within(
        "reading bad.bin again",
        read_entry(&core, "flip", "bad.bin"),
    )
    .await;
    assert!(got.unwrap() == data, "bad.bin content once repaired");
    w.serves_another(&core).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_longer_or_shorter_than_announced() {
    let w = World::new().await;
    let core = w.core(fast());
    // The right Content-Length, then junk: the junk is not part of the blob.
    let extra = pseudo_random_bytes(400_000, 7);
    let se = w.publish("len", "extra.bin", &extra);
    w.srv
        .push_rule(Rule::blob_get(&se, Fault::ExtraBytes(5000)));
    let got = within("reading extra.bin", read_entry(&core, "len", "extra.bin")).await;
    assert!(got.unwrap() == extra, "extra.bin content");

    // No Content-Length, junk before the close: the hash cannot match.
    let closed = pseudo_random_bytes(400_000, 8);
    let sc = w.publish("len-closed", "closed.bin", &closed);
    w.srv
        .push_rule(Rule::blob_get(&sc, Fault::CloseDelimited { extra: 10 }));
    let (e, took) = failed_read(&core, "len-closed", "closed.bin").await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded("a close-delimited body with junk", took, LOW_SPEED * 10);
    assert_not_cached(&core, &sc);

    // Content-Length smaller than the blob: the announced bytes cannot match.
    let fewer = pseudo_random_bytes(400_000, 9);
    let sf = w.publish("len-fewer", "fewer.bin", &fewer);
    w.srv
        .push_rule(Rule::blob_get(&sf, Fault::AnnounceFewer(10)));
    let (e, took) = failed_read(&core, "len-fewer", "fewer.bin").await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded("a body longer than announced", took, LOW_SPEED * 10);
    assert_not_cached(&core, &sf);
    w.serves_another(&core).await;
}

// ---------------------------------------------------------------------------------------
// Reads: slow and silent servers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_blob_fails_within_bounded_time() {
    let w = World::new().await;
    // 1 byte per 100 ms (production's "1 byte per second", scaled to the 1 s low-speed
    // timeout of the test): 64 KiB would take almost two hours.
    let data = pseudo_random_bytes(64 << 10, 10);
    let sha = w.publish("slow", "trickle.bin", &data);
    w.srv.push_rule(Rule::blob_get(
        &sha,
        Fault::Trickle(Duration::from_millis(100)),
    ));
    let core = w.core(fast());
    let dir = core.lookup(ROOT_INO, "slow").await.expect("key").ino;
    let ino = core.lookup(dir, "trickle.bin").await.expect("entry").ino;
    let started = Instant::now();
    let bound = LOW_SPEED * 10;
    let result = tokio::time::timeout(bound + Duration::from_secs(5), read_ino(&core, ino)).await;
    let took = started.elapsed();
    let Ok(result) = result else {
        panic!(
            "open of a blob trickling at 10 B/s did not end within {:?} (low-speed timeout \
             {LOW_SPEED:?}): the low-speed timeout only catches total silence",
            bound + Duration::from_secs(5)
        );
    };
    match result {
        Ok(_) => panic!("a trickling download succeeded"),
        Err(e) => assert_eq!(e.errno(), libc::EIO, "{e}"),
    }
    assert_bounded("a trickling download", took, bound);
    assert_not_cached(&core, &sha);
    w.serves_another(&core).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_answers_fail_with_eio_in_bounded_time() {
    let w = World::new().await;
    let limits = Limits {
        request_timeout: Duration::from_secs(1),
        ..fast()
    };
    let data = pseudo_random_bytes(200_000, 11);
    let sha = w.publish("stall", "stalled.bin", &data);
    w.srv
        .push_rule(Rule::blob_get(&sha, Fault::Stall(Duration::from_secs(30))));
    let core = w.core(limits);
    // Headers, then silence.
    let (e, took) = failed_read(&core, "stall", "stalled.bin").await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded("a stalled download", took, LOW_SPEED * 10);
    assert_eq!(w.srv.count("GET", &blob_target(&sha)), ATTEMPTS as usize);
    assert_not_cached(&core, &sha);

    // A shadir answer that never ends: the key cannot be looked up (no earlier answer).
    w.publish("silent", "x.bin", b"x");
    w.srv.push_rule(Rule::dir_get(
        "silent",
        Fault::Stall(Duration::from_secs(30)),
    ));
    let started = Instant::now();
    let e = within("lookup of a stalled key", core.lookup(ROOT_INO, "silent"))
        .await
        .expect_err("lookup of a key whose shadir answer stalls");
    assert_eq!(e.errno(), libc::EIO, "unreachable is not ENOENT: {e}");
    assert_bounded(
        "a stalled shadir answer",
        started.elapsed(),
        Duration::from_secs(10),
    );
    assert_eq!(w.srv.count("GET", "/shadir/silent"), ATTEMPTS as usize);
    w.serves_another(&core).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_then_reported() {
    let w = World::new().await;
    let core = w.core(fast());
    // Two 503 then the blob: the read succeeds.
    let d1 = pseudo_random_bytes(100_000, 12);
    let s1 = w.publish("errors", "busy.bin", &d1);
    w.srv
        .push_rule(Rule::blob_get(&s1, Fault::Status(503)).times(2));
    // shadir answers 500 twice, then the list.
    w.publish("flaky-key", "f.bin", b"flaky");
    w.srv
        .push_rule(Rule::dir_get("flaky-key", Fault::Status(500)).times(2));
    let got = within("reading busy.bin", read_entry(&core, "errors", "busy.bin")).await;
    assert!(got.unwrap() == d1);
    assert_eq!(w.srv.count("GET", &blob_target(&s1)), 3);
    let got = within("reading f.bin", read_entry(&core, "flaky-key", "f.bin")).await;
    assert_eq!(got.unwrap(), b"flaky");
    assert_eq!(w.srv.count("GET", "/shadir/flaky-key"), 3);

    // Always 500: EIO after the configured attempts.
    let d2 = pseudo_random_bytes(100_000, 13);
    let s2 = w.publish("errors-broken", "broken.bin", &d2);
    w.srv.push_rule(Rule::blob_get(&s2, Fault::Status(500)));
    let (e, took) = failed_read(&core, "errors-broken", "broken.bin").await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded("a blob always answered 500", took, LOW_SPEED * 10);
    assert_eq!(w.srv.count("GET", &blob_target(&s2)), ATTEMPTS as usize);
    assert_not_cached(&core, &s2);

    // 404 for a blob an entry names: EIO (the file exists, its blob does not), no retry.
    let d3 = pseudo_random_bytes(1000, 14);
    let s3 = w.publish("errors-gone", "gone.bin", &d3);
    w.srv.push_rule(Rule::blob_get(&s3, Fault::Status(404)));
    let (e, _) = failed_read(&core, "errors-gone", "gone.bin").await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(
        w.srv.count("GET", &blob_target(&s3)),
        1,
        "a 404 is not retried"
    );

    // A key shadir always answers 503 for, never seen before: EIO, not ENOENT.
    w.srv
        .push_rule(Rule::dir_get("down-key", Fault::Status(503)));
    let e = within("lookup of down-key", core.lookup(ROOT_INO, "down-key"))
        .await
        .expect_err("lookup of a key answered 503");
    assert_eq!(e.errno(), libc::EIO, "{e}");

    // A key listed before: its last listing is served while shadir fails.
    let quick = w.core_with(
        &w.tmp.path().join("cache-ttl"),
        fast(),
        FsOptions {
            dir_ttl: Duration::from_millis(100),
            ..w.fs_opts()
        },
        1 << 40,
    );
    assert!(names_in(&quick, "errors").await.contains("busy.bin"));
    w.srv.push_rule(Rule::dir_get("errors", Fault::Status(500)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = w.srv.count("GET", "/shadir/errors");
    let names = within("listing errors offline", names_in(&quick, "errors")).await;
    assert!(
        w.srv.count("GET", "/shadir/errors") > before,
        "no refresh was attempted"
    );
    assert!(
        names.contains("busy.bin"),
        "last listing not served: {names:?}"
    );
    w.serves_another(&core).await;
}

// ---------------------------------------------------------------------------------------
// shadir: hostile bodies.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_shadir_body_stops_at_max_dir_body() {
    let w = World::new().await;
    let core = w.core(fast());
    let len = 200u64 << 20;
    for (key, announce) in [("huge-chunked", false), ("huge-announced", true)] {
        w.srv
            .push_rule(Rule::dir_get(key, Fault::HugeDirBody { len, announce }));
        let started = Instant::now();
        let e = within(&format!("lookup of {key}"), core.lookup(ROOT_INO, key))
            .await
            .expect_err("a 200 MiB shadir answer was accepted");
        assert_eq!(e.errno(), libc::EIO, "{key}: {e}");
        assert_bounded(key, started.elapsed(), Duration::from_secs(10));
        assert_eq!(
            w.srv.count("GET", &format!("/shadir/{key}")),
            1,
            "not retried"
        );
    }
    // The client hung up: the server could not push much past the limit (socket
    // buffers aside).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = w.srv.sent_bytes();
    assert!(sent < 64 << 20, "{sent} bytes of shadir body were read");
    w.serves_another(&core).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_shadir_bodies_fail_cleanly() {
    let w = World::new().await;
    let core = w.core(fast());
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    // The wire layer refuses it before any parser recurses.
    assert!(matches!(
        shacachefs::wire::parse_listing_with(&deep, 32),
        Err(shacachefs::wire::WireError::TooDeep(32))
    ));
    assert!(shacachefs::wire::check_depth(&deep, 100).is_err());
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("deep", deep),
        ("not-utf8", b"[[\"\xff\xfe\xfd\", \"\"]]".to_vec()),
        (
            "not-json",
            b"<html><body>Please log in</body></html>".to_vec(),
        ),
        ("object", b"{\"sha512\": \"x\"}".to_vec()),
        ("truncated", b"[[\"{\\\"sha512\\\": ".to_vec()),
    ];
    for (key, body) in bodies {
        w.srv.push_rule(Rule::dir_get(key, Fault::DirBody(body)));
        let started = Instant::now();
        let e = within(&format!("lookup of {key}"), core.lookup(ROOT_INO, key))
            .await
            .expect_err("a malformed shadir answer was accepted");
        assert_eq!(e.errno(), libc::EIO, "{key}: {e}");
        assert_bounded(key, started.elapsed(), Duration::from_secs(5));
    }

    // Entries that are not pairs of strings, and an inner nested 100,000 deep (signed):
    // dropped one by one, the good entry beside them is shown.
    let good = pseudo_random_bytes(5000, 15);
    let sha = w.srv.add_blob(&good);
    let deep_inner = format!(
        r#"{{"sha512": "{sha}", "file": "deep.bin", "x": {}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_entry = signed(&w.signer, &deep_inner);
    let ok = entry_for(&w.signer, &sha, "good.bin");
    let body = serde_json::to_vec(&serde_json::json!([
        1,
        "x",
        ["only one"],
        [1, 2],
        [deep_entry.inner, deep_entry.signature],
        [ok.inner, ok.signature],
    ]))
    .unwrap();
    w.srv
        .push_rule(Rule::dir_get("mixed", Fault::DirBody(body)));
    let names = within("listing mixed", names_in(&core, "mixed")).await;
    assert_eq!(
        names,
        BTreeSet::from(["good.bin".to_string(), ".entries.json".to_string()])
    );
    let got = within("reading good.bin", read_entry(&core, "mixed", "good.bin")).await;
    assert!(got.unwrap() == good);
    w.serves_another(&core).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_with_bad_sha512_are_hidden_and_never_fetched() {
    let w = World::new().await;
    let data = pseudo_random_bytes(4000, 16);
    let sha = w.srv.add_blob(&data);
    let hex = sha.hex();
    let bad_inners = [
        r#"{"file": "missing.bin"}"#.to_string(),
        r#"{"sha512": 12345, "file": "number.bin"}"#.to_string(),
        r#"{"sha512": null, "file": "null.bin"}"#.to_string(),
        format!(
            r#"{{"sha512": "{}", "file": "upper.bin"}}"#,
            hex.to_uppercase()
        ),
        format!(r#"{{"sha512": "{}", "file": "short.bin"}}"#, &hex[..64]),
        format!(r#"{{"sha512": "{hex}0", "file": "long.bin"}}"#),
        format!(
            r#"{{"sha512": "{}", "file": "nothex.bin"}}"#,
            "g".repeat(128)
        ),
        format!(
            r#"{{"sha512": "../../{}", "file": "path.bin"}}"#,
            &hex[..122]
        ),
        format!(r#"["{hex}"]"#),
    ];
    for inner in &bad_inners {
        w.srv.add_entry("badsha", signed(&w.signer, inner));
    }
    w.srv
        .add_entry("badsha", entry_for(&w.signer, &sha, "good.bin"));
    let core = w.core(fast());
    let names = within("listing badsha", names_in(&core, "badsha")).await;
    assert_eq!(
        names,
        BTreeSet::from(["good.bin".to_string(), ".entries.json".to_string()])
    );
    let got = within("reading good.bin", read_entry(&core, "badsha", "good.bin")).await;
    assert!(got.unwrap() == data);
    let blob_requests: Vec<_> = w
        .srv
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/shacache/") && r.path != blob_target(&sha))
        .collect();
    assert!(
        blob_requests.is_empty(),
        "blobs requested by malformed names: {blob_requests:?}"
    );
    w.serves_another(&core).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_labels_stay_inside_the_key_directory() {
    let w = World::new().await;
    let labels: Vec<String> = vec![
        "..".into(),
        ".".into(),
        "a/b".into(),
        "../../../../etc/escape".into(),
        "/".into(),
        "x".repeat(300),
        "é".repeat(150),
        "nul\0inside".into(),
        "\0".into(),
        "ctl\u{1}\u{1f}".into(),
        "new\nline".into(),
        "del\u{7f}".into(),
        "latest".into(),
        ".entries.json".into(),
        ".sha512".into(),
        "".into(),
    ];
    let mut blobs = Vec::new();
    for (i, label) in labels.iter().enumerate() {
        let data = pseudo_random_bytes(1000 + i, 100 + i as u64);
        let sha = w.srv.add_blob(&data);
        let mut meta = Map::new();
        meta.insert("file".into(), Value::String(label.clone()));
        w.srv
            .add_entry("hostile", signed(&w.signer, &build_inner(&sha, &meta)));
        blobs.push((sha, data));
    }
    let core = w.core(fast());
    let dir = core.lookup(ROOT_INO, "hostile").await.expect("key").ino;
    let listed = within("readdir", core.readdir(dir)).await.expect("readdir");
    let mut read_back = BTreeSet::new();
    for e in listed.iter().skip(2) {
        let name = &e.name;
        assert!(!name.is_empty(), "an empty name");
        assert!(name != "." && name != "..", "{name:?}");
        assert!(!name.contains('/'), "{name:?} has a slash");
        assert!(!name.contains('\0'), "{name:?} has a NUL");
        assert!(
            !name.chars().any(|c| c.is_control()),
            "{name:?} has a control character"
        );
        assert!(name.len() <= 255, "{name:?} is {} bytes", name.len());
        if name == ".entries.json" {
            continue;
        }
        assert_eq!(e.kind, Kind::File, "{name:?}");
        let a = core
            .lookup(dir, name)
            .await
            .unwrap_or_else(|err| panic!("lookup of listed {name:?}: {err}"));
        let data = within("reading a hostile name", read_ino(&core, a.ino))
            .await
            .unwrap_or_else(|err| panic!("reading {name:?}: {err}"));
        let sha = Sha512::of(&data);
        assert!(
            blobs.iter().any(|(s, d)| *s == sha && *d == data),
            "{name:?} shows bytes of no published blob"
        );
        read_back.insert(sha);
    }
    assert_eq!(read_back.len(), blobs.len(), "every entry is reachable");

    // Names written through the mount that stand for hostile labels (`%2E.` is how
    // `..` is shown): staged by id, published as metadata only. Dot-names stay staged
    // (never published); the others are published.
    for (i, name) in ["%2E.", "%2E%2E", "a%2Fb", "..%2F..%2Fescape", "%00"]
        .iter()
        .enumerate()
    {
        let data = pseudo_random_bytes(2000 + i, 200 + i as u64);
        within(
            "writing a hostile name",
            write_through(&core, "hostile-w", name, &data),
        )
        .await
        .unwrap_or_else(|e| panic!("writing {name:?}: {e}"));
    }
    // A name standing for `x/y` whose upload fails: pending, and listed as such.
    w.srv.push_rule(
        Rule::new(Fault::Status(500))
            .method("PUT")
            .path("/shadir/hostile-fail"),
    );
    let (e, _) = failed_write(&core, "hostile-fail", "x%2Fy", b"pending").await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_cache_layout(&w.cache_dir());
    // Nothing beside the cache directory either.
    let beside: BTreeSet<String> = std::fs::read_dir(w.tmp.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        beside
            .iter()
            .all(|n| n == "cache" || n == "networkcache.cfg"),
        "{beside:?}"
    );
    w.serves_another(&core).await;

    let mut unsafe_names = Vec::new();
    for key in ["hostile-w", "hostile-fail"] {
        let dir = core.lookup(ROOT_INO, key).await.expect("key").ino;
        let listed = within("readdir", core.readdir(dir)).await.expect("readdir");
        for (i, e) in listed.iter().enumerate() {
            let own = match i {
                0 => e.name == "." && e.kind == Kind::Dir,
                1 => e.name == ".." && e.kind == Kind::Dir,
                _ => false,
            };
            let name = &e.name;
            if !own && (name.contains('/') || name.contains('\0') || name == ".." || name == ".") {
                unsafe_names.push(format!("{key}/{name:?} ({:?}, position {i})", e.kind));
            }
        }
        if listed
            .get(1)
            .is_none_or(|e| e.name != ".." || e.kind != Kind::Dir)
        {
            unsafe_names.push(format!("{key}: the directory's own \"..\" entry is gone"));
        }
    }
    // The pending file answers to the name it was created by.
    let dir = core
        .lookup(ROOT_INO, "hostile-fail")
        .await
        .expect("key")
        .ino;
    if let Err(e) = core.lookup(dir, "x%2Fy").await {
        unsafe_names.push(format!("lookup of the pending hostile-fail/x%2Fy: {e}"));
    }
    assert!(
        unsafe_names.is_empty(),
        "staged (pending) files are listed under unsafe names: {unsafe_names:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Uploads under faults.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_cut_or_unanswered_is_kept_then_retried() {
    let w = World::new().await;
    let core = w.core(Limits {
        upload_answer_timeout: Duration::from_secs(1),
        ..fast()
    });
    // The connection is cut after 64 KiB of every POST.
    w.srv
        .push_rule(Rule::new(Fault::CutRequest(64 << 10)).method("POST"));
    let cut = pseudo_random_bytes(1 << 20, 20);
    let (e, took) = failed_write(&core, "up", "cut.bin", &cut).await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded("closing a file whose upload is cut", took, LOW_SPEED * 10);
    assert_eq!(w.srv.count("POST", "/shacache"), ATTEMPTS as usize);
    assert!(!w.srv.has_blob(&Sha512::of(&cut)));
    assert!(w.srv.entries("up").is_none(), "an entry was published");
    let cut_item = assert_kept_for_later(&w, "cut.bin", &cut);
    assert!(
        names_in(&core, "up").await.contains("cut.bin"),
        "the pending file is visible"
    );

    // The body is taken whole, then no answer ever comes.
    w.srv.clear_rules();
    w.srv.push_rule(
        Rule::new(Fault::HoldRequest {
            read: usize::MAX,
            hold: Duration::from_secs(30),
        })
        .method("POST"),
    );
    let mute = pseudo_random_bytes(300_000, 21);
    let (e, took) = failed_write(&core, "up", "mute.bin", &mute).await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded(
        "closing a file whose upload is never answered",
        took,
        Duration::from_secs(15),
    );
    let mute_item = assert_kept_for_later(&w, "mute.bin", &mute);
    assert!(w.srv.entries("up").is_none(), "an entry was published");
    w.serves_another(&core).await;

    // A healthy server again: `outbox retry` publishes both, each exactly once.
    w.srv.clear_rules();
    let out = w.outbox_retry().await;
    out.assert_success();
    assert_published_once(&w, "up", &cut_item, &cut);
    assert_published_once(&w, "up", &mute_item, &mute);
    assert!(Outbox::open(&w.cache_dir()).unwrap().list().0.is_empty());
}

/// The POSTs the server logged after the first `skip`: (chunked, status).
fn posts_since(w: &World, skip: usize) -> Vec<(bool, u16)> {
    w.srv
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .skip(skip)
        .map(|r| (r.chunked, r.status))
        .collect()
}

/// Uploads started while a file is written (chunked, past 8 MiB written in order) that
/// go wrong: a 201 with another hash, then a 411 (a front end that wants a length). Each
/// time the file is sent again whole at close and published right; after the refusal,
/// later files are sent at close only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_while_writing_fall_back_when_misanswered_or_refused() {
    let w = World::new().await;
    let core = w.core(fast());

    // A healthy server: one chunked POST, used.
    let d0 = pseudo_random_bytes(12 << 20, 600);
    within(
        "writing ok.bin",
        write_through(&core, "early", "ok.bin", &d0),
    )
    .await
    .expect("ok.bin published");
    assert_eq!(posts_since(&w, 0), vec![(true, 201)]);
    assert!(w.srv.has_blob(&Sha512::of(&d0)));

    // 201 with another hash for the early upload: sent again, whole, with a length.
    w.srv
        .push_rule(Rule::new(Fault::WrongEcho).method("POST").times(1));
    let before = posts_since(&w, 0).len();
    let d1 = pseudo_random_bytes(12 << 20, 601);
    within(
        "writing echo.bin",
        write_through(&core, "early", "echo.bin", &d1),
    )
    .await
    .expect("echo.bin published after the wrong echo");
    assert_eq!(posts_since(&w, before), vec![(true, 201), (false, 201)]);
    assert!(w.srv.has_blob(&Sha512::of(&d1)));

    // 411 for the early upload: sent again whole; the next file is not tried early.
    w.srv
        .push_rule(Rule::new(Fault::Status(411)).method("POST").times(1));
    let before = posts_since(&w, 0).len();
    let d2 = pseudo_random_bytes(12 << 20, 602);
    within(
        "writing len.bin",
        write_through(&core, "early", "len.bin", &d2),
    )
    .await
    .expect("len.bin published after the 411");
    assert_eq!(posts_since(&w, before), vec![(true, 411), (false, 201)]);
    let before = posts_since(&w, 0).len();
    let d3 = pseudo_random_bytes(12 << 20, 603);
    within(
        "writing next.bin",
        write_through(&core, "early", "next.bin", &d3),
    )
    .await
    .expect("next.bin published");
    assert_eq!(
        posts_since(&w, before),
        vec![(false, 201)],
        "early uploads go on after a 411"
    );
    for (name, d) in [
        ("ok.bin", &d0),
        ("echo.bin", &d1),
        ("len.bin", &d2),
        ("next.bin", &d3),
    ] {
        let sha = Sha512::of(d);
        assert!(w.srv.has_blob(&sha), "{name}: blob missing");
        let entries = w.srv.entries("early").expect("entries of early");
        assert!(
            entries.iter().any(|e| e.inner.contains(&sha.hex())),
            "{name}: no entry for its bytes"
        );
    }
    assert!(w.srv.dangling_entries().is_empty());
    // What `shacachefs status` reports of it.
    let status = within("status", core.status()).await;
    let early = &status["uploads_while_writing"];
    assert_eq!(
        (&early["started"], &early["used"], &early["sent_again"]),
        (
            &serde_json::json!(3),
            &serde_json::json!(1),
            &serde_json::json!(2)
        ),
        "{status}"
    );
}

/// A file whose blob shacache already has, copied over a link too slow to have sent it
/// all by the close (here: a server that takes no byte of the upload): the close asks
/// shacache, stops the upload, and publishes the entry at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_while_writing_stops_at_close_when_the_blob_is_already_there() {
    let w = World::new().await;
    let core = w.core(fast());
    let data = pseudo_random_bytes(40 << 20, 610);
    let sha = w.srv.add_blob(&data);
    let blobs = w.srv.blob_count();
    w.srv.push_rule(
        Rule::new(Fault::HoldRequest {
            read: 0,
            hold: Duration::from_secs(20),
        })
        .method("POST")
        .times(1),
    );
    within(
        "writing known.bin",
        write_through(&core, "known", "known.bin", &data),
    )
    .await
    .expect("known.bin published");
    let entries = w.srv.entries("known").expect("entries of known");
    assert!(entries.iter().any(|e| e.inner.contains(&sha.hex())));
    assert_eq!(w.srv.blob_count(), blobs, "nothing new stored");
    let answered: Vec<_> = w
        .srv
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.status != 0)
        .collect();
    assert!(answered.is_empty(), "the blob was sent again: {answered:?}");
    // Counted as used (its answer, "already there", is the one taken), not as sent
    // again: without asking at close, the close would wait for the stalled upload to
    // time out, then fall back.
    let status = within("status", core.status()).await;
    let early = &status["uploads_while_writing"];
    assert_eq!(early["used"], 1, "{status}");
    assert_eq!(early["sent_again"], 0, "{status}");
    assert_eq!(status["bytes_uploaded"], 0, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_refused_or_misanswered_publishes_nothing() {
    let w = World::new().await;
    let core = w.core(fast());
    // 500 on every PUT: the blob is stored (it goes first), the entry is not.
    w.srv.push_rule(Rule::new(Fault::Status(500)).method("PUT"));
    let d1 = pseudo_random_bytes(500_000, 22);
    let (e, took) = failed_write(&core, "refused", "put500.bin", &d1).await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_bounded("closing with shadir answering 500", took, LOW_SPEED * 10);
    assert!(w.srv.has_blob(&Sha512::of(&d1)), "the blob goes first");
    assert!(w.srv.entries("refused").is_none());
    assert_eq!(w.srv.count("PUT", "/shadir/refused"), ATTEMPTS as usize);
    let i1 = assert_kept_for_later(&w, "put500.bin", &d1);
    assert!(
        i1.meta.entry.is_some(),
        "the entry is signed and saved before the PUT"
    );

    // 201 with another hash than the one sent: not stored, never retried blindly.
    w.srv.clear_rules();
    w.srv.push_rule(Rule::new(Fault::WrongEcho).method("POST"));
    let d2 = pseudo_random_bytes(400_000, 23);
    let posts = w.srv.count("POST", "/shacache");
    let (e, _) = failed_write(&core, "refused", "echo.bin", &d2).await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    assert_eq!(
        w.srv.count("POST", "/shacache"),
        posts + 1,
        "a wrong echo is not retried"
    );
    assert!(!w.srv.has_blob(&Sha512::of(&d2)));
    assert_eq!(
        w.srv.count("PUT", "/shadir/refused"),
        ATTEMPTS as usize,
        "no PUT"
    );
    let i2 = assert_kept_for_later(&w, "echo.bin", &d2);

    // 302 to a login page on POST: EACCES, nothing retried, no PUT.
    w.srv.clear_rules();
    w.srv.push_rule(Rule::new(Fault::Redirect).method("POST"));
    let d3 = pseudo_random_bytes(300_000, 24);
    let posts = w.srv.count("POST", "/shacache");
    let (e, _) = failed_write(&core, "refused", "login.bin", &d3).await;
    assert_eq!(e.errno(), libc::EACCES, "{e}");
    assert_eq!(
        w.srv.count("POST", "/shacache"),
        posts + 1,
        "a redirect is not retried"
    );
    assert_eq!(w.srv.count("PUT", "/shadir/refused"), ATTEMPTS as usize);
    let i3 = assert_kept_for_later(&w, "login.bin", &d3);

    // 302 on PUT only: the blob is there, the entry is not.
    w.srv.clear_rules();
    w.srv.push_rule(Rule::new(Fault::Redirect).method("PUT"));
    let d4 = pseudo_random_bytes(200_000, 25);
    let (e, _) = failed_write(&core, "refused", "login-put.bin", &d4).await;
    assert_eq!(e.errno(), libc::EACCES, "{e}");
    assert!(w.srv.has_blob(&Sha512::of(&d4)));
    assert_eq!(
        w.srv.count("PUT", "/shadir/refused"),
        ATTEMPTS as usize + 1,
        "a redirect is not retried"
    );
    assert!(w.srv.entries("refused").is_none());
    let i4 = assert_kept_for_later(&w, "login-put.bin", &d4);
    w.serves_another(&core).await;

    w.srv.clear_rules();
    let out = w.outbox_retry().await;
    out.assert_success();
    for (item, data) in [(&i1, &d1), (&i2, &d2), (&i3, &d3), (&i4, &d4)] {
        assert_published_once(&w, "refused", item, data);
    }
    assert!(Outbox::open(&w.cache_dir()).unwrap().list().0.is_empty());
}

// ---------------------------------------------------------------------------------------
// The cache on a tiny filesystem.

/// Free bytes of the filesystem holding `path`.
fn free_bytes(path: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statvfs {}", path.display());
    st.f_bavail as u64 * st.f_frsize as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_cache_evicts_then_refuses_what_cannot_fit() {
    let w = World::new().await;
    let mnt = w.tmp.path().join("tiny");
    let _fs = Tmpfs::mount(&mnt, "24m");
    let cache_dir = mnt.join("cache");
    let core = w.core_with(&cache_dir, fast(), w.fs_opts(), 1 << 40);

    // Five 8 MiB blobs through a 24 MiB filesystem: older ones are evicted.
    let mut blobs = Vec::new();
    for i in 0..5u64 {
        let data = pseudo_random_bytes(8 << 20, 300 + i);
        let name = format!("b{i}.bin");
        let sha = w.publish("tiny", &name, &data);
        blobs.push((name, sha, data));
    }
    for (name, _, data) in &blobs {
        let got = within(
            "reading through a tiny cache",
            read_entry(&core, "tiny", name),
        )
        .await;
        match got {
            Ok(g) => assert!(g == *data, "{name}: content"),
            Err(e) => panic!("{name}: {e} (errno {})", e.errno()),
        }
    }
    let (_, _, count) = core.cache().usage();
    assert!(count <= 2, "{count} blobs of 8 MiB in a 24 MiB cache");

    // Larger than the filesystem: ENOSPC at once, without downloading, without
    // emptying the cache on the way.
    let big = pseudo_random_bytes(30 << 20, 310);
    let sbig = w.publish("tiny-big", "big.bin", &big);
    let free_before = free_bytes(&mnt);
    let (e, took) = failed_read(&core, "tiny-big", "big.bin").await;
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_bounded(
        "refusing a blob larger than the disk",
        took,
        Duration::from_secs(5),
    );
    assert_eq!(
        w.srv.count("GET", &blob_target(&sbig)),
        0,
        "downloaded anyway"
    );
    assert_not_cached(&core, &sbig);
    assert_eq!(
        core.cache().usage().2,
        count,
        "the cache was emptied for nothing"
    );
    assert!(free_bytes(&mnt) + (64 << 10) >= free_before, "space leaked");

    // HEAD lies (1 MiB): the download itself runs out of space.
    let liar = pseudo_random_bytes(30 << 20, 311);
    let sliar = w.publish("liar", "liar.bin", &liar);
    w.srv.push_rule(
        Rule::new(Fault::AnnounceFewer(29 << 20))
            .method("HEAD")
            .path(&blob_target(&sliar)),
    );
    let (e, took) = failed_read(&core, "liar", "liar.bin").await;
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_bounded(
        "a download that fills the disk",
        took,
        Duration::from_secs(10),
    );
    assert_not_cached(&core, &sliar);

    // Nothing is corrupted, and the cache goes on.
    let report = core.cache().fsck().expect("fsck");
    assert!(
        report.removed.is_empty(),
        "fsck removed {:?}",
        report.removed
    );
    assert!(report.checked >= 1);
    assert_cache_layout(&cache_dir);
    let (name, _, data) = &blobs[0];
    let got = within("reading b0 again", read_entry(&core, "tiny", name)).await;
    assert!(got.unwrap() == *data, "b0 after the failures");
    w.serves_another(&core).await;
    drop(core);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_that_does_not_fit_fails_with_enospc() {
    let w = World::new().await;
    let mnt = w.tmp.path().join("tiny");
    let _fs = Tmpfs::mount(&mnt, "24m");
    let cache_dir = mnt.join("cache");
    let core = w.core_with(&cache_dir, fast(), w.fs_opts(), 1 << 40);
    let dir = core.mkdir(ROOT_INO, "full").await.expect("mkdir").ino;

    // 40 MiB written into 24 MiB: a write fails with ENOSPC.
    let (_, fh, _) = core.create(dir, "huge.bin", None).await.expect("create");
    let chunk = pseudo_random_bytes(1 << 20, 400);
    let mut failed = None;
    for i in 0..40u64 {
        if let Err(e) = core.write(fh, i << 20, &chunk).await {
            failed = Some((i, e));
            break;
        }
    }
    let (at, e) = failed.expect("40 MiB fit in a 24 MiB filesystem");
    assert_eq!(e.errno(), libc::ENOSPC, "write {at}: {e}");
    // `cp` closes after the failed write: the truncated file must not be published.
    let closed = within("closing after ENOSPC", core.flush(fh, None)).await;
    core.release_handle(fh).await;
    assert!(
        w.srv.entries("full").is_none(),
        "a truncated file was published (close returned {closed:?})"
    );
    assert!(w.srv.dangling_entries().is_empty());
    // Findings checked at the end, so that every stage runs.
    let mut problems = Vec::new();
    if let Err(e) = &closed {
        if e.errno() != libc::ENOSPC {
            problems.push(format!(
                "close after ENOSPC failed with errno {} instead of ENOSPC: {e}",
                e.errno()
            ));
        }
    }

    // The disk full to the last byte: creating a file fails with ENOSPC, and leaves no
    // half-made outbox item.
    let ballast = mnt.join("ballast");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&ballast).expect("ballast");
        let block = vec![0u8; 64 << 10];
        // Bounded: the filesystem is 24 MiB.
        while f.write_all(&block).is_ok() {}
        let _ = f.write_all(&block[..1]);
    }
    let outbox = Outbox::open(&cache_dir).expect("outbox");
    let before: BTreeSet<String> = outbox.list().0.into_iter().map(|i| i.id).collect();
    match core.create(dir, "nospace.bin", None).await {
        Ok((_, fh, _)) => {
            // Creating may succeed (an empty file); writing cannot.
            let e = core
                .write(fh, 0, &chunk[..4096])
                .await
                .expect_err("writing into a full filesystem");
            assert_eq!(e.errno(), libc::ENOSPC, "{e}");
            core.release_handle(fh).await;
            let _ = core.unlink(dir, "nospace.bin").await;
        }
        Err(e) if e.errno() == libc::ENOSPC => {}
        Err(e) => problems.push(format!(
            "create on a full disk failed with errno {} instead of ENOSPC: {e}",
            e.errno()
        )),
    }
    let (after, half_made) = outbox.list();
    if !half_made.is_empty() {
        problems.push(format!(
            "a create that failed on a full disk left half-made outbox items (data \
             without meta.json): {half_made:?}"
        ));
    }
    let after: BTreeSet<String> = after.into_iter().map(|i| i.id).collect();
    assert!(after.is_subset(&before), "{after:?}");
    std::fs::remove_file(&ballast).expect("removing the ballast");

    // With space again, retrying (as `--retry-uploads` and `outbox retry` do) must not
    // publish the truncated file: it is marked incomplete, in memory and in the outbox.
    let (published, failed) = within("retrying pending uploads", core.retry_pending()).await;
    assert_eq!((published, failed), (0, 1), "retry of the truncated file");
    assert!(
        w.srv.entries("full").is_none(),
        "a retry published the truncated file"
    );
    let (items, _) = outbox.list();
    // (The reason, in `last_error`, is best effort: the full disk may refuse it.)
    let marked = items
        .iter()
        .any(|i| i.meta.name == "huge.bin" && outbox.is_incomplete(&i.id));
    assert!(
        marked,
        "the truncated item is not marked incomplete: {items:?}"
    );
    if let Some(item) = items.iter().find(|i| i.meta.name == "huge.bin") {
        let client = core.client().clone();
        let r = within(
            "publishing the truncated item directly",
            shacachefs::publish::publish(&client, &outbox, &item.id, None, None, &|_, _| {}),
        )
        .await;
        assert!(
            matches!(r, Err(shacachefs::publish::PublishError::Incomplete(_))),
            "outbox retry would publish the truncated file: {:?}",
            r.map(|p| p.sha)
        );
    }

    // The pending truncated file can be dropped, which gives the space back.
    within("dropping the pending file", core.unlink(dir, "huge.bin"))
        .await
        .expect("rm of a pending file");
    let (items, _) = outbox.list();
    assert!(items.is_empty(), "{items:?}");
    let open_fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .filter(|p| p.contains("outbox"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        free_bytes(&mnt) > 20 << 20,
        "space not given back; open in this process: {open_fds:?}"
    );

    // Nothing is corrupted, and a file that fits is published.
    let report = core.cache().fsck().expect("fsck");
    assert!(
        report.removed.is_empty(),
        "fsck removed {:?}",
        report.removed
    );
    let small = pseudo_random_bytes(1 << 20, 401);
    within(
        "writing small.bin",
        write_through(&core, "full", "small.bin", &small),
    )
    .await
    .expect("a file that fits");
    let entries = w.srv.entries("full").expect("small.bin published");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(w.srv.has_blob(&Sha512::of(&small)));
    assert_cache_layout(&cache_dir);
    drop(core);
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---------------------------------------------------------------------------------------
// Real mounts: what programs see.

/// Mount options for short timeouts.
const MOUNT_FAST: &[&str] = &["--low-speed-timeout", "1", "--connect-timeout", "1"];

#[test]
fn mount_cat_of_a_corrupt_blob_gets_eio_and_no_byte() {
    support::require_fuse();
    let srv = Background::start();
    let tmp = support::tempdir();
    let signer = signer_a();
    let good = pseudo_random_bytes(500_000, 30);
    let bad = pseudo_random_bytes(2 << 20, 31);
    let sgood = srv.add_blob(&good);
    let sbad = srv.add_blob(&bad);
    srv.add_entry("k", entry_for(&signer, &sgood, "good.bin"));
    srv.add_entry("k", entry_for(&signer, &sbad, "bad.bin"));
    srv.push_rule(Rule::blob_get(&sbad, Fault::FlipByte(1 << 20)));
    let cfg = NetworkcacheConfig::for_urls(&srv.cache_url(), &srv.dir_url())
        .signer_a()
        .write(tmp.path(), "net.cfg");
    let cache = tmp.path().join("cache");
    let m = support::Mount::start(&cfg, &cache, &tmp.path().join("mnt"), MOUNT_FAST);

    let started = Instant::now();
    let mut cat = Command::new("cat");
    cat.arg(m.path("k/bad.bin"));
    let out = run_with_timeout(cat, Duration::from_secs(60));
    assert!(!out.success(), "cat of a corrupt blob succeeded");
    assert!(
        out.stdout.is_empty(),
        "{} unverified bytes reached cat",
        out.stdout.len()
    );
    assert!(
        out.stderr_text().contains("Input/output error"),
        "{}",
        out.describe()
    );
    assert_bounded(
        "cat of a corrupt blob",
        started.elapsed(),
        Duration::from_secs(15),
    );
    assert_eq!(srv.count("GET", &blob_target(&sbad)), 2);
    let hex = sbad.hex();
    let leaked: Vec<PathBuf> = files_under(&cache)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == hex.as_str()))
        .collect();
    assert!(
        leaked.is_empty(),
        "the corrupt blob entered the cache: {leaked:?}"
    );
    let path = m.path("k/good.bin");
    let got = support::bounded("reading good.bin", move || std::fs::read(path));
    match got {
        Ok(g) => assert!(g == good, "good.bin content"),
        Err(e) => panic!(
            "reading good.bin: {e}\n--- daemon log ---\n{}",
            m.log_text()
        ),
    }
}

#[test]
fn mount_cp_fails_when_the_server_dies_mid_upload_then_retry_publishes() {
    support::require_fuse();
    let mut srv = Background::start();
    let tmp = support::tempdir();
    let cfg = NetworkcacheConfig::for_urls(&srv.cache_url(), &srv.dir_url())
        .signer_a()
        .write(tmp.path(), "net.cfg");
    let cache = tmp.path().join("cache");
    let src = tmp.path().join("big.bin");
    support::write_random_file(&src, 8 << 20, 32);
    let want = support::sha512_file(&src);
    // The server takes 256 KiB of the upload, then stops reading.
    srv.push_rule(
        Rule::new(Fault::HoldRequest {
            read: 256 << 10,
            hold: Duration::from_secs(60),
        })
        .method("POST"),
    );
    let mut m = support::Mount::start(&cfg, &cache, &tmp.path().join("mnt"), MOUNT_FAST);
    support::mkdir(&m.path("up"));

    let dest = m.path("up/big.bin");
    let (s, d) = (src.clone(), dest.clone());
    let cp = std::thread::spawn(move || {
        let mut c = Command::new("cp");
        c.arg(&s).arg(&d);
        run_with_timeout(c, Duration::from_secs(120))
    });
    assert!(
        support::wait_until(Duration::from_secs(30), || srv.received_bytes()
            >= 256 << 10),
        "the upload never started:\n{}",
        m.log_text()
    );
    let killed = Instant::now();
    srv.stop();
    let out = cp.join().expect("cp thread");
    assert!(
        !out.success(),
        "cp succeeded with the server dead:\n{}",
        out.describe()
    );
    assert_bounded(
        "cp after the server died",
        killed.elapsed(),
        Duration::from_secs(30),
    );
    assert!(srv.entries("up").is_none(), "an entry was published");
    assert!(srv.dangling_entries().is_empty());
    assert_eq!(srv.blob_count(), 0, "a blob was stored");

    let items = support::outbox_named(&cache, "big.bin");
    assert_eq!(items.len(), 1, "{items:?}");
    let staged = PathBuf::from(items[0]["path"].as_str().expect("path"));
    assert_eq!(support::sha512_file(&staged), want, "staged bytes changed");
    assert!(items[0]["last_error"].is_string(), "{:?}", items[0]);

    // The server comes back healthy; after unmounting, `outbox retry` publishes.
    srv.restart();
    assert!(support::list_dir(&m.path("up")).contains(&"big.bin".to_string()));
    m.unmount();
    let out = support::cli(&[
        "outbox".as_ref(),
        "retry".as_ref(),
        "-c".as_ref(),
        cfg.as_os_str(),
        "--cache-dir".as_ref(),
        cache.as_os_str(),
    ]);
    out.assert_success();
    let entries = srv.entries("up").expect("published after the retry");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].inner.contains(&want), "{:?}", entries[0]);
    let sha = Sha512::parse(&want).unwrap();
    let blob = srv.blob(&sha).expect("blob uploaded by the retry");
    assert_eq!(Sha512::of(&blob), sha);
    assert!(support::outbox_items(&cache).is_empty());
}

// ---------------------------------------------------------------------------------------
// What a publish and a refresh cost.

/// A publish adds its signed entry to the listing in memory: the key is not fetched
/// again, and each entry's signature is verified once, also across a refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_adds_its_entry_without_fetching_the_key_again() {
    let w = World::new().await;
    let core = w.core(fast());
    write_through(&core, "inplace", "first.bin", b"first")
        .await
        .expect("first publish");
    let gets = w.srv.count("GET", "/shadir/inplace");
    let verified = core.client().verifier.verifications();
    // Written into the key as it is (`write_through` makes the directory first).
    let dir = core.lookup(ROOT_INO, "inplace").await.expect("lookup").ino;
    for i in 0..5 {
        let data = pseudo_random_bytes(1000 + i, 300 + i as u64);
        let (_, fh, _) = core
            .create(dir, &format!("f{i}.bin"), None)
            .await
            .expect("create");
        core.write(fh, 0, &data).await.expect("write");
        within("closing", core.flush(fh, None))
            .await
            .expect("publish");
        core.release_handle(fh).await;
    }
    assert_eq!(
        w.srv.count("GET", "/shadir/inplace"),
        gets,
        "a publish fetched the whole key again"
    );
    assert_eq!(w.srv.entries("inplace").map(|e| e.len()), Some(6));
    let names = names_in(&core, "inplace").await;
    for n in ["first.bin", "f0.bin", "f4.bin", "latest"] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
    assert_eq!(
        core.client().verifier.verifications() - verified,
        5,
        "each new entry is verified once"
    );
    // A refresh verifies nothing it verified before.
    let before = core.client().verifier.verifications();
    core.refresh("inplace").await.expect("refresh");
    assert_eq!(w.srv.count("GET", "/shadir/inplace"), gets + 1);
    assert_eq!(core.client().verifier.verifications(), before);
    // Another client republishes a known blob under a changed signature: verified
    // again, and hidden (not signed by a trusted key).
    let (sha, inner) = {
        let e = &w.srv.entries("inplace").unwrap()[1];
        let v: Value = serde_json::from_str(&e.inner).unwrap();
        (v["sha512"].as_str().unwrap().to_string(), e.inner.clone())
    };
    let mut forged = inner.clone();
    forged.insert_str(forged.len() - 1, ", \"x\": 1");
    let b = Signer::load(&fixture("signature/signer-b.key")).expect("signer B");
    w.srv.add_entry("inplace", signed(&b, &forged));
    core.refresh("inplace").await.expect("refresh");
    assert_eq!(core.client().verifier.verifications(), before + 1);
    assert!(!names_in(&core, "inplace")
        .await
        .iter()
        .any(|n| n.contains(&sha[..12])));
}

/// `--retry-uploads` (`Core::retry_pending`) leaves alone an item that another
/// process has open for writing (it holds the item's writer lock), and publishes it
/// once that process let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_pending_leaves_items_another_process_writes_alone() {
    let w = World::new().await;
    let core = w.core(fast());
    w.srv.push_rule(Rule::new(Fault::Status(500)).method("PUT"));
    let data = pseudo_random_bytes(4000, 77);
    let (e, _) = failed_write(&core, "held", "held.bin", &data).await;
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let item = assert_kept_for_later(&w, "held.bin", &data);
    w.srv.clear_rules();
    // Another process's mount has it open: a lock on another open file description.
    let other = Outbox::open(&w.cache_dir()).expect("outbox");
    let held = other.writer_lock(&item.id).expect("writer lock");
    let (ok, failed) = within("retrying", core.retry_pending()).await;
    assert_eq!(
        (ok, failed),
        (0, 0),
        "an item open for writing elsewhere was retried"
    );
    assert!(w.srv.entries("held").is_none());
    drop(held);
    let (ok, failed) = within("retrying", core.retry_pending()).await;
    assert_eq!((ok, failed), (1, 0));
    assert_eq!(w.srv.entries("held").map(|e| e.len()), Some(1));
}
