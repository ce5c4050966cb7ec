//! The filesystem core (`shacachefs::fs::Core`) driven directly, without FUSE, against the
//! embedded server, and against a small stand-in server written here (over the same
//! store) that can refuse HEAD, ignore `Range`, slow its bodies down and count requests.
//!
//! Each test has its own server, store and cache directory.

use crate::support;

use serde_json::{json, Value};
use shacachefs::cache::{Cache, CacheOptions};
use shacachefs::client::Client;
use shacachefs::digest::Sha512;
use shacachefs::fs::{Core, FsError, FsOptions, Kind, ROOT_INO};
use shacachefs::server::{self, blob_path, RunningServer, ServerOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};
use support::faulty::{blob_target, Fault, FaultyServer, Rule};
use support::{
    cert_a, cert_b, corrupt_file, files_at_least, publish, publish_raw_inner, publisher,
    quick_limits, reader_config, upload_blob, Who, CN_A, CN_B,
};

// ---------------------------------------------------------------------------------------
// The world of one test.

/// A store served by the embedded server, with a publisher signed by A.
struct World {
    tmp: tempfile::TempDir,
    server: Option<RunningServer>,
    cache_url: String,
    dir_url: String,
    a: Client,
}

impl World {
    async fn new() -> World {
        let tmp = support::tempdir();
        let server = server::start(
            "127.0.0.1:0".parse().unwrap(),
            ServerOptions {
                root: tmp.path().join("store"),
                upload_user: None,
                tls: None,
            },
        )
        .await
        .expect("embedded server");
        let (cache_url, dir_url) = (server.cache_url(), server.dir_url());
        let a = publisher(&cache_url, &dir_url, Who::A);
        World {
            tmp,
            server: Some(server),
            cache_url,
            dir_url,
            a,
        }
    }

    fn store(&self) -> PathBuf {
        self.tmp.path().join("store")
    }

    fn publisher(&self, who: Who) -> Client {
        publisher(&self.cache_url, &self.dir_url, who)
    }

    /// A core reading this world's server (or `urls`, another server over the same
    /// store) with its own cache directory `cache`.
    fn core_at(
        &self,
        urls: Option<(&str, &str)>,
        certs: Vec<String>,
        cache: &str,
        opts: FsOptions,
    ) -> Arc<Core> {
        let (c, d) = urls.unwrap_or((&self.cache_url, &self.dir_url));
        let client = Client::from_config(&reader_config(c, d, certs), quick_limits())
            .expect("reader client");
        let cache = Cache::open(CacheOptions {
            dir: self.tmp.path().join(cache),
            max_bytes: 1 << 30,
            namespace: d.to_string(),
        })
        .expect("cache");
        Core::new(client, cache, opts)
    }

    /// A core trusting signer A, over the embedded server.
    fn core(&self, opts: FsOptions) -> Arc<Core> {
        self.core_at(None, vec![cert_a()], "cache", opts)
    }

    fn cache_tmp(&self, cache: &str) -> PathBuf {
        self.tmp.path().join(cache).join("v1").join("tmp")
    }
}

// ---------------------------------------------------------------------------------------
// Driving the core.

/// The inode of a key directory.
async fn key_ino(core: &Arc<Core>, key: &str) -> u64 {
    let a = core
        .lookup(ROOT_INO, key)
        .await
        .unwrap_or_else(|e| panic!("lookup of key {key}: {e}"));
    assert_eq!(a.kind, Kind::Dir);
    a.ino
}

/// A directory's entries without `.` and `..`: name → kind.
async fn entries(core: &Arc<Core>, ino: u64) -> BTreeMap<String, Kind> {
    let list = core.readdir(ino).await.expect("readdir");
    assert_eq!(list[0].name, ".");
    assert_eq!(list[1].name, "..");
    let mut out = BTreeMap::new();
    for e in &list[2..] {
        assert!(
            out.insert(e.name.clone(), e.kind).is_none(),
            "name {:?} listed twice",
            e.name
        );
    }
    out
}

/// Regular-file names of a key directory (without `.entries.json`).
async fn file_names(core: &Arc<Core>, key: &str) -> BTreeSet<String> {
    let ino = key_ino(core, key).await;
    entries(core, ino)
        .await
        .into_iter()
        .filter(|(n, k)| *k == Kind::File && n != ".entries.json")
        .map(|(n, _)| n)
        .collect()
}

/// The inode of `key/name`.
async fn file_ino(core: &Arc<Core>, key: &str, name: &str) -> u64 {
    let dir = key_ino(core, key).await;
    core.lookup(dir, name)
        .await
        .unwrap_or_else(|e| panic!("lookup of {key}/{name}: {e}"))
        .ino
}

/// Opens, reads to the end in 128 KiB requests, releases.
async fn read_all(core: &Arc<Core>, ino: u64) -> Result<Vec<u8>, FsError> {
    let (fh, _) = core.open(ino).await?;
    let mut out = Vec::new();
    loop {
        let chunk = core.read(fh, out.len() as u64, 128 << 10)?;
        if chunk.is_empty() {
            break;
        }
        out.extend_from_slice(&chunk);
    }
    core.release(fh);
    Ok(out)
}

/// One extended attribute as text.
async fn xattr(core: &Arc<Core>, ino: u64, name: &str) -> Option<String> {
    core.xattrs(ino)
        .await
        .expect("xattrs")
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| String::from_utf8(v).expect("UTF-8 xattr"))
}

fn opts() -> FsOptions {
    FsOptions::default()
}

fn stat(core: &Core, name: &str) -> u64 {
    let s = &core.stats;
    let v = match name {
        "hits" => &s.cache_hits,
        "misses" => &s.cache_misses,
        "fetched" => &s.bytes_fetched,
        "dir" => &s.dir_requests,
        "probes" => &s.probes,
        other => panic!("no counter {other}"),
    };
    v.load(std::sync::atomic::Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------
// A stand-in server over the store: no HEAD and/or no Range when asked, slow bodies,
// and a log of every request.

#[derive(Debug, Clone, Copy, Default)]
struct PlainOpts {
    /// Answer HEAD (else 501, like the reference test server).
    head: bool,
    /// Honour `Range` (else a 200 with the whole body).
    ranges: bool,
    /// Wait this long before answering a blob's GET.
    body_delay: Duration,
}

/// The fault server over a copy of the world's store (as it is on disk now), answering
/// as `opts` says.
async fn plain_server(w: &World, opts: PlainOpts) -> FaultyServer {
    let srv = FaultyServer::start().await;
    srv.load_store(&w.store());
    if !opts.head {
        srv.push_rule(Rule::new(Fault::Status(501)).method("HEAD"));
    }
    if !opts.ranges {
        srv.push_rule(
            Rule::new(Fault::IgnoreRange)
                .method("GET")
                .prefix("/shacache/"),
        );
    }
    if !opts.body_delay.is_zero() {
        srv.push_rule(
            Rule::new(Fault::Delay(opts.body_delay))
                .method("GET")
                .prefix("/shacache/"),
        );
    }
    srv
}

/// GETs of a blob answered with the whole body (200).
fn full_gets(srv: &FaultyServer, sha: &Sha512) -> usize {
    let path = blob_target(sha);
    srv.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == path && r.status == 200)
        .count()
}

// ---------------------------------------------------------------------------------------
// Naming.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naming_duplicates_one_file_per_blob_and_latest() {
    let w = World::new().await;
    let (x, y, z) = (
        b"blob x".to_vec(),
        b"blob y, newer".to_vec(),
        b"blob z".to_vec(),
    );
    let nolabel = b"no label at all".to_vec();
    let dist = b"from a url".to_vec();
    // Published in one order under "k1" and in the reverse order under "k2": the names
    // must not depend on the server's order.
    let pubs: Vec<(&[u8], Value)> = vec![
        (
            x.as_slice(),
            json!({"file": "pkg.tgz", "timestamp": 100.0, "note": "x newest"}),
        ),
        (y.as_slice(), json!({"file": "pkg.tgz", "timestamp": 200.0})),
        (
            x.as_slice(),
            json!({"file": "pkg.tgz", "timestamp": 50.0, "note": "x oldest"}),
        ),
        (
            z.as_slice(),
            json!({"file": "other.bin", "timestamp": 300.0}),
        ),
        (nolabel.as_slice(), json!({"file": "notused", "token": "t"})),
        (
            dist.as_slice(),
            json!({"url": "http://example.org/path/dist.tar.gz?x=1"}),
        ),
    ];
    for (data, m) in &pubs {
        publish(&w.a, "k1", data, m.clone()).await;
    }
    for (data, m) in pubs.iter().rev() {
        publish(&w.a, "k2", data, m.clone()).await;
    }
    let core = w.core(opts());
    let (sx, sy, sz) = (Sha512::of(&x), Sha512::of(&y), Sha512::of(&z));
    let expected: BTreeSet<String> = [
        "pkg.tgz".to_string(),
        format!("pkg.tgz~{}", sx.short(12)),
        "other.bin".to_string(),
        Sha512::of(&nolabel).short(16),
        "dist.tar.gz".to_string(),
    ]
    .into_iter()
    .collect();
    for key in ["k1", "k2"] {
        assert_eq!(file_names(&core, key).await, expected, "names under {key}");
        let l = core.listing(key).await.unwrap().expect("listing");
        let shown: BTreeMap<String, Sha512> = l
            .files
            .iter()
            .map(|(n, f)| (n.clone(), f.entry.info.sha512))
            .collect();
        // The newest blob keeps the bare label; blob x is shown once.
        assert_eq!(shown["pkg.tgz"], sy, "{key}: pkg.tgz shows the newest blob");
        assert_eq!(shown[&format!("pkg.tgz~{}", sx.short(12))], sx);
        assert_eq!(
            shown.values().filter(|s| **s == sx).count(),
            1,
            "{key}: x once"
        );
        assert_eq!(l.latest.as_deref(), Some("other.bin"), "{key}: latest");
        assert_eq!(shown["other.bin"], sz);
    }
    // Contents, metadata of the newest entry for a repeated blob, mtime, latest.
    let ino = file_ino(&core, "k1", "pkg.tgz").await;
    assert_eq!(read_all(&core, ino).await.unwrap(), y);
    let a = core.getattr(ino).await.unwrap();
    assert_eq!(a.mtime, UNIX_EPOCH + Duration::from_secs(200));
    assert_eq!(a.perm, 0o444);
    let xino = file_ino(&core, "k1", &format!("pkg.tgz~{}", sx.short(12))).await;
    assert_eq!(read_all(&core, xino).await.unwrap(), x);
    assert_eq!(
        xattr(&core, xino, "user.shadir.note").await.as_deref(),
        Some("x newest")
    );
    assert_eq!(
        xattr(&core, xino, "user.shadir.timestamp").await.as_deref(),
        Some("100.0")
    );
    let dir = key_ino(&core, "k1").await;
    let kinds = entries(&core, dir).await;
    assert_eq!(kinds.get("latest"), Some(&Kind::Symlink));
    let latest = core.lookup(dir, "latest").await.unwrap();
    assert_eq!(latest.kind, Kind::Symlink);
    assert_eq!(core.readlink(latest.ino).await.unwrap(), "other.bin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_filters_entries_by_signer() {
    let w = World::new().await;
    let b = w.publisher(Who::B);
    let nobody = w.publisher(Who::Nobody);
    let sa = publish(&w.a, "mixed", b"by a", json!({"file": "a.txt"})).await;
    publish(&b, "mixed", b"by b", json!({"file": "b.txt"})).await;
    publish(&nobody, "mixed", b"unsigned", json!({"file": "u.txt"})).await;
    // Signed by A, then altered: the signature no longer matches.
    let st = upload_blob(&w.a, b"tampered").await;
    let good = format!(r#"{{"sha512": "{st}", "file": "t.txt"}}"#);
    let signature = w.a.signer.as_ref().unwrap().sign(&good);
    let entry = shacachefs::wire::RawEntry {
        inner: good.replace("t.txt", "t2.txt"),
        signature,
    };
    w.a.store.put_dir("mixed", &entry).await.unwrap();

    let only_a = w.core(opts());
    let names = file_names(&only_a, "mixed").await;
    assert_eq!(names, BTreeSet::from(["a.txt".to_string()]));
    let dir = key_ino(&only_a, "mixed").await;
    assert_eq!(
        only_a.lookup(dir, "b.txt").await.unwrap_err().errno(),
        libc::ENOENT
    );
    let ia = file_ino(&only_a, "mixed", "a.txt").await;
    assert_eq!(
        xattr(&only_a, ia, "user.shadir.signer").await.as_deref(),
        Some(CN_A)
    );
    assert_eq!(
        xattr(&only_a, ia, "user.shacache.sha512").await,
        Some(sa.hex())
    );
    let mode = xattr(&only_a, ROOT_INO, "user.shacachefs.signature-mode").await;
    assert!(
        mode.as_deref().unwrap_or("").starts_with("verified"),
        "{mode:?}"
    );

    let both = w.core_at(None, vec![cert_a(), cert_b()], "cache-ab", opts());
    let names = file_names(&both, "mixed").await;
    assert_eq!(
        names,
        BTreeSet::from(["a.txt".to_string(), "b.txt".to_string()])
    );
    let ib = file_ino(&both, "mixed", "b.txt").await;
    assert_eq!(
        xattr(&both, ib, "user.shadir.signer").await.as_deref(),
        Some(CN_B)
    );

    let none = w.core_at(None, Vec::new(), "cache-none", opts());
    let names = file_names(&none, "mixed").await;
    let all: BTreeSet<String> = ["a.txt", "b.txt", "u.txt", "t2.txt"]
        .map(String::from)
        .into();
    assert_eq!(names, all);
    for n in &all {
        let ino = file_ino(&none, "mixed", n).await;
        assert_eq!(
            xattr(&none, ino, "user.shadir.signer").await.as_deref(),
            Some("unverified"),
            "{n}"
        );
    }
    let mode = xattr(&none, ROOT_INO, "user.shacachefs.signature-mode").await;
    assert_eq!(mode.as_deref(), Some("unverified"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_labels_never_make_unsafe_names() {
    let w = World::new().await;
    let labels: Vec<String> = vec![
        "..".into(),
        ".".into(),
        "a/b".into(),
        "a%2Fb".into(),
        "../../etc/passwd".into(),
        "/".into(),
        "x".repeat(300),
        "é".repeat(200),
        "a\0b".into(),
        "\0".into(),
        "tab\there\nnewline".into(),
        "del\u{7f}".into(),
        "latest".into(),
        ".entries.json".into(),
        "".into(),
    ];
    let mut blobs: BTreeMap<Sha512, usize> = BTreeMap::new();
    for (i, label) in labels.iter().enumerate() {
        let data = format!("blob number {i}").into_bytes();
        let sha = publish(&w.a, "hostile", &data, json!({ "file": label })).await;
        blobs.insert(sha, data.len());
    }
    // Crafted inner texts, with raw JSON escapes, signed as they are.
    for (i, label_json) in [r#""nul\u0000inside""#, r#""..""#, r#""\/""#]
        .iter()
        .enumerate()
    {
        let data = format!("crafted {i}").into_bytes();
        let sha = upload_blob(&w.a, &data).await;
        blobs.insert(sha, data.len());
        let inner = format!(r#"{{"sha512": "{sha}", "file": {label_json}, "title": "/"}}"#);
        publish_raw_inner(&w.a, "hostile", &inner).await;
    }
    let core = w.core(opts());
    let dir = key_ino(&core, "hostile").await;
    let listed = entries(&core, dir).await;
    let listing = core.listing("hostile").await.unwrap().unwrap();
    // No timestamp anywhere: no `latest`, and the entry labelled "latest" got another name.
    assert!(!listed.contains_key("latest"), "{listed:?}");
    assert!(listing.latest.is_none());
    assert_eq!(listed.get(".entries.json"), Some(&Kind::File));
    let mut seen = BTreeSet::new();
    for (name, kind) in &listed {
        assert!(!name.is_empty(), "empty name");
        assert!(!name.contains('/'), "{name:?} has a slash");
        assert!(!name.contains('\0'), "{name:?} has a NUL");
        assert!(name != "." && name != "..", "{name:?}");
        assert!(name.len() <= 255, "{name:?} is {} bytes", name.len());
        assert!(
            !name.chars().any(|c| c.is_control()),
            "{name:?} has a control char"
        );
        if name == ".entries.json" {
            continue;
        }
        assert_eq!(*kind, Kind::File);
        let f = listing.files.get(name).expect("readdir and listing agree");
        let sha = f.entry.info.sha512;
        let a = core
            .lookup(dir, name)
            .await
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert_eq!(a.size, blobs[&sha] as u64, "{name:?}: size");
        seen.insert(sha);
    }
    // Every entry stays reachable.
    assert_eq!(seen, blobs.keys().copied().collect::<BTreeSet<_>>());
    assert_eq!(listing.files.len(), blobs.len());
}

// ---------------------------------------------------------------------------------------
// Sizes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_are_true_with_head_and_by_probing() {
    let w = World::new().await;
    let sizes = [0usize, 1, 4099, (1 << 20) + 17];
    let mut shas = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        let data = support::pseudo_random_bytes(*n, i as u64 + 1);
        shas.push(publish(&w.a, "sizes", &data, json!({ "file": format!("f{i}") })).await);
    }
    let check = |core: Arc<Core>| async move {
        for (i, n) in sizes.iter().enumerate() {
            let ino = file_ino(&core, "sizes", &format!("f{i}")).await;
            assert_eq!(core.getattr(ino).await.unwrap().size, *n as u64, "f{i}");
        }
        core
    };
    // The embedded server answers HEAD.
    let core = check(w.core(opts())).await;
    assert_eq!(stat(&core, "fetched"), 0, "HEAD is enough to know sizes");

    // No HEAD, ranges honoured: the size comes from a 206 (or a 416 for the empty blob),
    // and nothing is downloaded.
    let ranged = plain_server(
        &w,
        PlainOpts {
            head: false,
            ranges: true,
            ..Default::default()
        },
    )
    .await;
    let (c, d) = (ranged.cache_url(), ranged.dir_url());
    let core = check(w.core_at(
        Some((c.as_str(), d.as_str())),
        vec![cert_a()],
        "cache-ranged",
        opts(),
    ))
    .await;
    assert!(stat(&core, "probes") >= 1);
    let asked = ranged.requests();
    assert!(
        asked
            .iter()
            .any(|r| r.range.as_deref() == Some("bytes=0-0") && r.status == 206),
        "no ranged probe: {asked:?}"
    );
    for sha in &shas {
        assert_eq!(
            full_gets(&ranged, sha),
            0,
            "no full download to learn a size"
        );
    }

    // Neither HEAD nor ranges (like the reference test server): the probe reads the whole
    // blob, which is verified and kept, so reading it costs no second download.
    let plain = plain_server(&w, PlainOpts::default()).await;
    let (c, d) = (plain.cache_url(), plain.dir_url());
    let core = check(w.core_at(
        Some((c.as_str(), d.as_str())),
        vec![cert_a()],
        "cache-plain",
        opts(),
    ))
    .await;
    assert!(plain
        .requests()
        .iter()
        .all(|r| r.method != "HEAD" || r.status == 501));
    for (i, sha) in shas.iter().enumerate() {
        assert_eq!(
            core.cache().lookup_blob(sha),
            Some(sizes[i] as u64),
            "f{i} kept"
        );
        let ino = file_ino(&core, "sizes", &format!("f{i}")).await;
        let data = read_all(&core, ino).await.unwrap();
        assert_eq!(data, support::pseudo_random_bytes(sizes[i], i as u64 + 1));
        assert_eq!(full_gets(&plain, sha), 1, "f{i}: downloads");
    }
}

// ---------------------------------------------------------------------------------------
// Refresh and negative lookups.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_refreshes_after_dir_ttl_not_before() {
    let w = World::new().await;
    let ttl = Duration::from_millis(200);
    publish(&w.a, "ttl", b"one", json!({"file": "one.txt"})).await;
    let two = upload_blob(&w.a, b"two").await;
    let core = w.core(FsOptions {
        dir_ttl: ttl,
        ..opts()
    });
    assert_eq!(
        file_names(&core, "ttl").await,
        BTreeSet::from(["one.txt".to_string()])
    );
    let listed_at = Instant::now();
    let entry =
        w.a.make_entry(&two, &support::meta(json!({"file": "two.txt"})));
    w.a.store.put_dir("ttl", &entry).await.unwrap();
    let names = file_names(&core, "ttl").await;
    let dir = key_ino(&core, "ttl").await;
    let early = core.lookup(dir, "two.txt").await;
    assert!(
        listed_at.elapsed() < ttl,
        "the machine is too slow for this test: publishing took {:?}",
        listed_at.elapsed()
    );
    assert!(!names.contains("two.txt"), "refreshed before the TTL");
    assert_eq!(early.unwrap_err().errno(), libc::ENOENT);
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let names = file_names(&core, "ttl").await;
    assert!(
        names.contains("two.txt"),
        "not refreshed after the TTL: {names:?}"
    );
    let ino = file_ino(&core, "ttl", "two.txt").await;
    assert_eq!(read_all(&core, ino).await.unwrap(), b"two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_lookups_last_negative_ttl() {
    let w = World::new().await;
    let negative_ttl = Duration::from_secs(1);
    let core = w.core(FsOptions {
        negative_ttl,
        ..opts()
    });
    assert!(core.listing("never-written").await.unwrap().is_none());
    let e = core.lookup(ROOT_INO, "later-key").await.unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
    let missed_at = Instant::now();
    let requests = stat(&core, "dir");
    publish(&w.a, "later-key", b"late", json!({"file": "late.txt"})).await;
    let e = core.lookup(ROOT_INO, "later-key").await.unwrap_err();
    assert!(missed_at.elapsed() < negative_ttl, "too slow for this test");
    assert_eq!(
        e.errno(),
        libc::ENOENT,
        "negative answer forgotten too early"
    );
    assert_eq!(
        stat(&core, "dir"),
        requests,
        "shadir asked again within negative_ttl"
    );
    let root = entries(&core, ROOT_INO).await;
    assert!(!root.contains_key("later-key"));
    assert_eq!(root.get(".sha512"), Some(&Kind::Dir));
    tokio::time::sleep(
        negative_ttl.saturating_sub(missed_at.elapsed()) + Duration::from_millis(100),
    )
    .await;
    key_ino(&core, "later-key").await;
    assert_eq!(
        file_names(&core, "later-key").await,
        BTreeSet::from(["late.txt".to_string()])
    );
    assert!(
        entries(&core, ROOT_INO).await.contains_key("later-key"),
        "known key at the root"
    );
}

// ---------------------------------------------------------------------------------------
// Generated files.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_json_lists_every_name() {
    let w = World::new().await;
    let s1 = publish(
        &w.a,
        "ej",
        b"first",
        json!({"file": "one", "timestamp": 1.5}),
    )
    .await;
    publish(
        &w.a,
        "ej",
        b"second",
        json!({"file": "two", "os": ["debian", 12]}),
    )
    .await;
    publish(
        &w.a,
        "ej",
        b"third",
        json!({"file": "one", "timestamp": 0.5}),
    )
    .await;
    let core = w.core(opts());
    let names = file_names(&core, "ej").await;
    let dir = key_ino(&core, "ej").await;
    let attr = core.lookup(dir, ".entries.json").await.unwrap();
    assert_eq!(attr.kind, Kind::File);
    let text = read_all(&core, attr.ino).await.unwrap();
    assert_eq!(attr.size, text.len() as u64);
    let doc: Value = serde_json::from_slice(&text).expect(".entries.json is JSON");
    let arr = doc.as_array().expect("an array");
    let listed: Vec<String> = arr
        .iter()
        .map(|o| o["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), names);
    assert_eq!(listed.len(), names.len());
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(listed, sorted, "in name order");
    for o in arr {
        let sha = o["sha512"].as_str().expect("sha512");
        assert!(Sha512::parse(sha).is_ok(), "{sha}");
        assert_eq!(o["metadata"]["sha512"].as_str(), Some(sha));
        assert_eq!(o["signer"].as_str(), Some(CN_A));
    }
    let one = arr.iter().find(|o| o["name"] == "one").expect("one");
    assert_eq!(one["sha512"].as_str(), Some(s1.hex().as_str()));
    let two = arr.iter().find(|o| o["name"] == "two").expect("two");
    assert_eq!(two["metadata"]["os"], json!(["debian", 12]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha512_directory_finds_blobs_by_hash() {
    let w = World::new().await;
    let data = support::pseudo_random_bytes(70_000, 9);
    let sha = upload_blob(&w.a, &data).await;
    let core = w.core(opts());
    let dir = core.lookup(ROOT_INO, ".sha512").await.unwrap();
    assert_eq!(dir.kind, Kind::Dir);
    let a = core.lookup(dir.ino, &sha.hex()).await.unwrap();
    assert_eq!(a.kind, Kind::File);
    assert_eq!(a.size, data.len() as u64);
    assert_eq!(read_all(&core, a.ino).await.unwrap(), data);
    assert_eq!(
        xattr(&core, a.ino, "user.shacache.sha512").await,
        Some(sha.hex())
    );
    assert_eq!(
        xattr(&core, a.ino, "user.shacachefs.cached")
            .await
            .as_deref(),
        Some("1")
    );
    let unknown = Sha512::of(b"not in the store");
    let e = core.lookup(dir.ino, &unknown.hex()).await.unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
    let e = core.lookup(dir.ino, "not-a-hash").await.unwrap_err();
    assert_eq!(e.errno(), libc::ENOENT);
    assert!(
        entries(&core, dir.ino).await.is_empty(),
        ".sha512 cannot be listed"
    );
}

// ---------------------------------------------------------------------------------------
// Downloads.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_opens_of_a_cold_blob_download_it_once() {
    let w = World::new().await;
    let data = support::pseudo_random_bytes(4 << 20, 4);
    let sha = publish(&w.a, "sf", &data, json!({"file": "big.bin"})).await;
    let srv = plain_server(
        &w,
        PlainOpts {
            head: true,
            ranges: true,
            body_delay: Duration::from_millis(300),
        },
    )
    .await;
    let (c, d) = (srv.cache_url(), srv.dir_url());
    let core = w.core_at(
        Some((c.as_str(), d.as_str())),
        vec![cert_a()],
        "cache",
        opts(),
    );
    let ino = file_ino(&core, "sf", "big.bin").await;
    assert!(core.cache().lookup_blob(&sha).is_none(), "cold");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let core = core.clone();
        tasks.push(tokio::spawn(async move { read_all(&core, ino).await }));
    }
    for t in tasks {
        assert!(t.await.unwrap().unwrap() == data, "content differs");
    }
    assert_eq!(stat(&core, "misses"), 1, "cache misses");
    assert_eq!(stat(&core, "hits"), 3, "cache hits");
    assert_eq!(stat(&core, "fetched"), data.len() as u64, "bytes fetched");
    assert_eq!(full_gets(&srv, &sha), 1, "downloads seen by the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_fails_with_eio_and_is_never_cached() {
    let w = World::new().await;
    let data = support::pseudo_random_bytes(64 << 10, 5);
    let sha = publish(&w.a, "bad", &data, json!({"file": "bad.bin"})).await;
    let stored = blob_path(&w.store(), &sha);
    let good = std::fs::read(&stored).unwrap();
    corrupt_file(&stored);

    // A server with HEAD: the size is known, the open downloads, fails, retries once.
    let srv = plain_server(
        &w,
        PlainOpts {
            head: true,
            ranges: true,
            ..Default::default()
        },
    )
    .await;
    let (c, d) = (srv.cache_url(), srv.dir_url());
    let core = w.core_at(
        Some((c.as_str(), d.as_str())),
        vec![cert_a()],
        "cache",
        opts(),
    );
    let ino = file_ino(&core, "bad", "bad.bin").await;
    for round in 0..2 {
        let e = core
            .open(ino)
            .await
            .err()
            .expect("open of a corrupt blob succeeded");
        assert_eq!(e.errno(), libc::EIO, "round {round}: {e}");
        assert!(
            core.cache().lookup_blob(&sha).is_none(),
            "corrupt blob cached"
        );
        assert_eq!(
            xattr(&core, ino, "user.shacachefs.cached").await.as_deref(),
            Some("0")
        );
        let leftovers = files_at_least(&w.cache_tmp("cache"), 1);
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
    assert_eq!(
        full_gets(&srv, &sha),
        4,
        "one download and one retry per open"
    );
    assert!(files_at_least(&w.tmp.path().join("cache"), data.len() as u64).is_empty());

    // A server without HEAD nor ranges: the size probe itself downloads and must refuse.
    let plain = plain_server(&w, PlainOpts::default()).await;
    let (c, d) = (plain.cache_url(), plain.dir_url());
    let core2 = w.core_at(
        Some((c.as_str(), d.as_str())),
        vec![cert_a()],
        "cache2",
        opts(),
    );
    let dir = key_ino(&core2, "bad").await;
    let failed = match core2.lookup(dir, "bad.bin").await {
        Err(e) => e,
        Ok(a) => core2.open(a.ino).await.err().expect("open succeeded"),
    };
    assert_eq!(failed.errno(), libc::EIO, "{failed}");
    assert!(core2.cache().lookup_blob(&sha).is_none());
    assert!(files_at_least(&w.tmp.path().join("cache2"), data.len() as u64).is_empty());

    // Once the server has the right bytes again, the same mount reads them.
    std::fs::write(&stored, &good).unwrap();
    srv.load_store(&w.store());
    assert_eq!(read_all(&core, ino).await.unwrap(), data);
    assert!(core.cache().lookup_blob(&sha).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_serves_cached_listings_and_blobs() {
    let mut w = World::new().await;
    let a_data = support::pseudo_random_bytes(100_000, 6);
    publish(&w.a, "off", &a_data, json!({"file": "a.bin"})).await;
    publish(&w.a, "off", b"never read", json!({"file": "b.bin"})).await;
    let quick = FsOptions {
        dir_ttl: Duration::from_millis(50),
        ..opts()
    };
    let core = w.core(quick.clone());
    let ino = file_ino(&core, "off", "a.bin").await;
    assert_eq!(read_all(&core, ino).await.unwrap(), a_data);
    let b_ino = file_ino(&core, "off", "b.bin").await;

    w.server.take().unwrap().shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let requests = stat(&core, "dir");
    let names = file_names(&core, "off").await;
    assert!(stat(&core, "dir") > requests, "no refresh was attempted");
    assert_eq!(
        names,
        BTreeSet::from(["a.bin".to_string(), "b.bin".to_string()])
    );
    let ino = file_ino(&core, "off", "a.bin").await;
    assert_eq!(read_all(&core, ino).await.unwrap(), a_data);
    let started = Instant::now();
    let e = core
        .open(b_ino)
        .await
        .err()
        .expect("uncached blob opened offline");
    assert_eq!(e.errno(), libc::EIO, "{e}");
    let e = core.lookup(ROOT_INO, "unknown-key").await.unwrap_err();
    assert_eq!(
        e.errno(),
        libc::EIO,
        "an unreachable server is not ENOENT: {e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "offline errors took {:?}",
        started.elapsed()
    );
    drop(core);

    // A new core over the same cache (a remount), still offline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let core = w.core(quick);
    assert_eq!(
        file_names(&core, "off").await,
        BTreeSet::from(["a.bin".to_string(), "b.bin".to_string()])
    );
    let ino = file_ino(&core, "off", "a.bin").await;
    assert_eq!(core.getattr(ino).await.unwrap().size, a_data.len() as u64);
    assert_eq!(read_all(&core, ino).await.unwrap(), a_data);
    assert_eq!(stat(&core, "fetched"), 0);
    assert!(
        entries(&core, ROOT_INO).await.contains_key("off"),
        "known key remembered"
    );
}

/// `ls -l` of a big key: one shadir request for the listing, every size right, each blob
/// probed once (the probes start together when the listing arrives), nothing downloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_a_big_key_costs_one_shadir_request() {
    let w = World::new().await;
    let n = 200usize;
    for i in 0..n {
        let body = format!("blob number {i} {}", "x".repeat(i));
        publish(
            &w.a,
            "big",
            body.as_bytes(),
            json!({"file": format!("f{i:03}")}),
        )
        .await;
    }
    let core = w.core(opts());
    let dir = key_ino(&core, "big").await;
    let listed = core.readdir(dir).await.unwrap();
    let files: Vec<_> = listed
        .iter()
        .filter(|e| e.kind == Kind::File && e.name.starts_with('f'))
        .collect();
    assert_eq!(files.len(), n);
    // What `ls -l` does next: a lookup (stat) of every name, many at once.
    let mut tasks = Vec::new();
    for e in files {
        let (core, name) = (core.clone(), e.name.clone());
        tasks.push(tokio::spawn(async move {
            (name.clone(), core.lookup(dir, &name).await)
        }));
    }
    for t in tasks {
        let (name, attr) = t.await.unwrap();
        let i: usize = name[1..].parse().unwrap();
        let expected = format!("blob number {i} {}", "x".repeat(i)).len() as u64;
        assert_eq!(attr.unwrap().size, expected, "{name}");
    }
    assert_eq!(
        stat(&core, "dir"),
        1,
        "one shadir request for the whole listing"
    );
    assert_eq!(stat(&core, "probes"), n as u64, "one size probe per blob");
    assert_eq!(stat(&core, "fetched"), 0, "sizes need no download");
}
