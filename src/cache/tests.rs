//! Tests of the whole cache on temporary directories.

use super::*;
use crate::digest::HashingFile;
use std::fs;
use std::io::Read;
use std::time::{Duration, UNIX_EPOCH};

fn opts(dir: &Path, max_bytes: u64) -> CacheOptions {
    CacheOptions {
        dir: dir.to_path_buf(),
        max_bytes,
        namespace: "http://shadir.example/".into(),
    }
}

/// A cache on `dir` with a limit of `max_bytes` (shared by the cache's test modules).
pub(super) fn open(dir: &Path, max_bytes: u64) -> Arc<Cache> {
    Cache::open(opts(dir, max_bytes)).unwrap()
}

/// A verified file holding `bytes`, written where downloads are.
fn verified(cache: &Cache, bytes: &[u8]) -> VerifiedFile {
    let mut f = HashingFile::new_in(cache.tmp_dir()).unwrap();
    f.write_all(bytes).unwrap();
    f.verify(&Sha512::of(bytes)).unwrap()
}

fn put(cache: &Cache, bytes: &[u8]) -> Sha512 {
    let len = cache.insert_blob(verified(cache, bytes)).unwrap();
    assert_eq!(len, bytes.len() as u64);
    Sha512::of(bytes)
}

/// The whole file by positioned reads (handles share one descriptor and its offset).
fn read_all(f: impl std::ops::Deref<Target = File>) -> Vec<u8> {
    let mut out = Vec::new();
    ReadAt {
        file: &f,
        offset: 0,
    }
    .read_to_end(&mut out)
    .unwrap();
    out
}

fn set_mtime(path: &Path, secs: u64) {
    let f = File::options().write(true).open(path).unwrap();
    f.set_modified(UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap();
}

#[test]
fn insert_lookup_open_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let sha = Sha512::of(b"hello shacache\n");
    assert_eq!(cache.lookup_blob(&sha), None);
    assert!(cache.open_blob(&sha).unwrap().is_none());
    put(&cache, b"hello shacache\n");
    assert_eq!(cache.lookup_blob(&sha), Some(15));
    assert_eq!(cache.size_of(&sha), Some(15));
    let (file, len, pin) = cache.open_blob(&sha).unwrap().unwrap();
    assert_eq!((len, pin.sha()), (15, sha));
    assert_eq!(read_all(file), b"hello shacache\n");
    let hex = sha.hex();
    assert!(dir
        .path()
        .join("v1/blobs")
        .join(&hex[..2])
        .join(&hex)
        .is_file());
    assert_eq!(
        cache.blob_path(&sha),
        dir.path().join("v1/blobs").join(&hex[..2]).join(&hex)
    );
    assert_eq!(cache.usage(), (15, 1 << 20, 1));
    // The same blob again keeps the existing copy, and the temporary file goes away.
    put(&cache, b"hello shacache\n");
    assert_eq!(cache.usage(), (15, 1 << 20, 1));
    assert_eq!(fs::read_dir(cache.tmp_dir()).unwrap().count(), 0);
    drop(pin);
    cache.remove_blob(&sha);
    assert_eq!(cache.lookup_blob(&sha), None);
    assert_eq!(cache.usage(), (0, 1 << 20, 0));
}

#[test]
fn reopen_finds_everything_again() {
    let dir = tempfile::tempdir().unwrap();
    let sha = Sha512::of(b"abc");
    let other = Sha512::of(b"other");
    let seen;
    {
        let cache = open(dir.path(), 1 << 20);
        put(&cache, b"abc");
        cache.record_size(&other, 12345);
        cache.add_known_key("file-urlmd5:f213");
        cache.add_known_key("slapos-global-key");
        cache.add_known_key("file-urlmd5:f213");
        seen = cache.first_seen("slapos-global-key", &sha);
        assert_eq!(cache.first_seen("slapos-global-key", &sha), seen);
        cache.store_dir_answer("slapos-global-key", Some(b"[[\"{}\", \"\"]]"));
        cache.store_dir_answer("missing", None);
        cache.store_dir_answer("binary", Some(&[0xff, 0x00, 0xfe]));
        cache.flush().unwrap();
    }
    let cache = open(dir.path(), 1 << 20);
    assert_eq!(cache.lookup_blob(&sha), Some(3));
    assert_eq!(cache.size_of(&sha), Some(3));
    assert_eq!(cache.size_of(&other), Some(12345));
    assert_eq!(
        cache.known_keys(),
        vec!["file-urlmd5:f213", "slapos-global-key"]
    );
    assert_eq!(cache.first_seen("slapos-global-key", &sha), seen);
    let (t, body) = cache.dir_answer("slapos-global-key").unwrap();
    assert_eq!(body.as_deref(), Some(&b"[[\"{}\", \"\"]]"[..]));
    assert!(SystemTime::now().duration_since(t).unwrap() < Duration::from_secs(60));
    assert_eq!(cache.dir_answer("missing").unwrap().1, None);
    assert_eq!(
        cache.dir_answer("binary").unwrap().1,
        Some(vec![0xff, 0x00, 0xfe])
    );
    assert!(cache.dir_answer("never").is_none());
    let ns = dir
        .path()
        .join("v1/ns")
        .join(Sha512::of(b"http://shadir.example/").short(32));
    assert_eq!(
        fs::read_to_string(ns.join("namespace")).unwrap(),
        "http://shadir.example/"
    );
    // Another namespace shares the blobs and sizes, not the keys.
    drop(cache);
    let mut o = opts(dir.path(), 1 << 20);
    o.namespace = "embedded:/srv/store".into();
    let cache = Cache::open(o).unwrap();
    assert_eq!(cache.lookup_blob(&sha), Some(3));
    assert_eq!(cache.size_of(&other), Some(12345));
    assert!(cache.known_keys().is_empty());
    assert!(cache.dir_answer("slapos-global-key").is_none());
}

#[test]
fn tables_are_saved_on_drop_without_flush() {
    let dir = tempfile::tempdir().unwrap();
    let sha = Sha512::of(b"x");
    let seen = {
        let cache = open(dir.path(), 1 << 20);
        cache.record_size(&sha, 7);
        cache.first_seen("k", &sha)
    };
    let cache = open(dir.path(), 1 << 20);
    assert_eq!(cache.size_of(&sha), Some(7));
    assert_eq!(cache.first_seen("k", &sha), seen);
}

#[test]
fn lru_eviction_order_and_lookup_protects() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 30);
    let a = put(&cache, &[b'a'; 10]);
    let b = put(&cache, &[b'b'; 10]);
    let c = put(&cache, &[b'c'; 10]);
    assert_eq!(cache.usage(), (30, 30, 3));
    assert_eq!(cache.lookup_blob(&a), Some(10)); // a is now the most recent
    let d = put(&cache, &[b'd'; 10]);
    assert_eq!(cache.lookup_blob(&b), None, "b was the least recently used");
    assert!(!cache.blob_path(&b).exists());
    let e = put(&cache, &[b'e'; 10]);
    assert_eq!(cache.lookup_blob(&c), None);
    for kept in [a, d, e] {
        assert_eq!(cache.lookup_blob(&kept), Some(10));
    }
    assert_eq!(cache.usage(), (30, 30, 3));
}

#[test]
fn reopen_orders_blobs_by_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = {
        let cache = open(dir.path(), 100);
        (
            put(&cache, b"aaaa"),
            put(&cache, b"bbbb"),
            put(&cache, b"cccc"),
        )
    };
    let path = |sha: &Sha512| {
        let hex = sha.hex();
        dir.path().join("v1/blobs").join(&hex[..2]).join(hex)
    };
    set_mtime(&path(&b), 1_000);
    set_mtime(&path(&c), 2_000);
    set_mtime(&path(&a), 3_000);
    // A smaller limit at open evicts the oldest first.
    let cache = open(dir.path(), 8);
    assert_eq!(cache.usage(), (8, 8, 2));
    assert_eq!(cache.lookup_blob(&b), None);
    assert_eq!(cache.lookup_blob(&c), Some(4));
    assert_eq!(cache.lookup_blob(&a), Some(4));
}

#[test]
fn pinned_blobs_stay_and_oversized_goes_when_unpinned() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 20);
    let a = put(&cache, &[b'a'; 10]);
    let (_f, _, pin_a) = cache.open_blob(&a).unwrap().unwrap();
    let (_f2, _, pin_a2) = cache.open_blob(&a).unwrap().unwrap();
    let b = put(&cache, &[b'b'; 10]);
    let c = put(&cache, &[b'c'; 10]);
    // a is the oldest but pinned: b goes instead.
    assert_eq!(cache.lookup_blob(&a), Some(10));
    assert_eq!(cache.lookup_blob(&b), None);
    assert_eq!(cache.lookup_blob(&c), Some(10));

    // A blob bigger than the whole limit can be inserted and read.
    let big = vec![b'z'; 50];
    let (file, len, pin_big) = cache.insert_and_open(verified(&cache, &big), None).unwrap();
    let z = pin_big.sha();
    assert_eq!(len, 50);
    assert_eq!(read_all(file), big);
    assert_eq!(cache.lookup_blob(&c), None, "c was evicted for it");
    assert_eq!(cache.lookup_blob(&z), Some(50));
    drop(pin_big);
    assert_eq!(cache.lookup_blob(&z), None, "evicted as soon as unpinned");
    assert!(!cache.blob_path(&z).exists());
    // Both pins of a count.
    drop(pin_a);
    assert_eq!(cache.lookup_blob(&a), Some(10));
    drop(pin_a2);
    assert_eq!(
        cache.lookup_blob(&a),
        Some(10),
        "within the limit once alone"
    );
    assert_eq!(cache.usage(), (10, 20, 1));
}

#[test]
fn fsck_finds_a_corrupted_blob() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let good = put(&cache, b"good blob");
    let bad = put(&cache, b"bad blob!");
    fs::write(cache.blob_path(&bad), b"BAD BLOB!").unwrap();
    // Same length: only hashing can tell.
    assert_eq!(cache.lookup_blob(&bad), Some(9));
    let report = cache.fsck().unwrap();
    assert_eq!(report.checked, 2);
    assert_eq!(report.bytes, 18);
    assert_eq!(report.removed, vec![bad]);
    assert!(report.pinned.is_empty());
    assert_eq!(cache.lookup_blob(&bad), None);
    assert_eq!(cache.lookup_blob(&good), Some(9));
    assert_eq!(cache.usage().2, 1);
}

#[test]
fn fsck_leaves_pinned_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let bad = put(&cache, b"bad blob!");
    let (_f, _, _pin) = cache.open_blob(&bad).unwrap().unwrap();
    fs::write(cache.blob_path(&bad), b"BAD BLOB!").unwrap();
    let report = cache.fsck().unwrap();
    assert_eq!(report.pinned, vec![bad]);
    assert!(report.removed.is_empty());
    assert!(cache.blob_path(&bad).exists());
}

#[test]
fn wrong_length_is_removed_by_open_blob() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let sha = put(&cache, b"twelve bytes");
    fs::write(cache.blob_path(&sha), b"short").unwrap();
    assert!(cache.open_blob(&sha).unwrap().is_none());
    assert!(!cache.blob_path(&sha).exists());
    assert_eq!(cache.usage(), (0, 1 << 20, 0));
    // After a restart the index only knows the file's length: the size table catches it.
    put(&cache, b"twelve bytes");
    drop(cache);
    let cache = open(dir.path(), 1 << 20);
    fs::write(cache.blob_path(&sha), b"short").unwrap();
    drop(cache);
    let cache = open(dir.path(), 1 << 20);
    assert!(cache.open_blob(&sha).unwrap().is_none());
    assert!(!cache.blob_path(&sha).exists());
}

#[test]
fn open_cleans_garbage_and_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let sha = {
        let cache = open(dir.path(), 1 << 20);
        put(&cache, b"keep me")
    };
    let blobs = dir.path().join("v1/blobs");
    let hex = sha.hex();
    let wrong_shard = if &hex[..2] == "00" { "01" } else { "00" };
    fs::create_dir_all(blobs.join(wrong_shard)).unwrap();
    fs::write(blobs.join(wrong_shard).join(&hex), b"keep me").unwrap();
    fs::write(blobs.join(&hex[..2]).join("not-a-sha"), b"x").unwrap();
    fs::write(blobs.join(&hex[..2]).join(hex.to_uppercase()), b"x").unwrap();
    fs::write(blobs.join("stray"), b"x").unwrap();
    fs::create_dir_all(blobs.join("zz/sub")).unwrap();
    let tmp = dir.path().join("v1/tmp");
    fs::write(tmp.join(".tmp-crashed"), b"partial").unwrap();
    fs::create_dir_all(tmp.join("somedir")).unwrap();

    let cache = open(dir.path(), 1 << 20);
    assert_eq!(cache.usage(), (7, 1 << 20, 1));
    assert_eq!(cache.lookup_blob(&sha), Some(7));
    assert!(!blobs.join(wrong_shard).join(&hex).exists());
    assert!(!blobs.join(&hex[..2]).join("not-a-sha").exists());
    assert!(!blobs.join(&hex[..2]).join(hex.to_uppercase()).exists());
    assert!(!blobs.join("stray").exists());
    assert!(!blobs.join("zz").exists());
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
}

#[test]
fn a_second_process_keeps_the_first_ones_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), 1 << 20);
    let in_flight = verified(&first, b"downloading");
    // Another opener (fsck while mounted) must not delete a live download.
    let second = open(dir.path(), 1 << 20);
    assert!(in_flight.path().exists());
    let sha = first
        .insert_blob(in_flight)
        .map(|_| Sha512::of(b"downloading"))
        .unwrap();
    // Each sees blobs the other added or removed.
    assert_eq!(second.lookup_blob(&sha), Some(11));
    first.remove_blob(&sha);
    assert!(second.open_blob(&sha).unwrap().is_none());
    assert_eq!(second.usage().2, 0);
}

#[test]
fn absurd_reservation_is_no_space_and_evicts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 100);
    let a = put(&cache, &[b'a'; 40]);
    let err = cache.reserve(u64::MAX / 2).unwrap_err();
    assert!(matches!(err, CacheError::NoSpace { needed } if needed == u64::MAX / 2));
    assert_eq!(cache.lookup_blob(&a), Some(40));
    // A reasonable reservation evicts down to the limit.
    let b = put(&cache, &[b'b'; 40]);
    cache.reserve(50).unwrap();
    assert_eq!(cache.lookup_blob(&a), None);
    assert_eq!(cache.lookup_blob(&b), Some(40));
}

#[test]
fn another_layout_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), 100));
    assert_eq!(
        fs::read_to_string(dir.path().join("layout"))
            .unwrap()
            .trim(),
        "1"
    );
    fs::write(dir.path().join("layout"), "2\n").unwrap();
    match Cache::open(opts(dir.path(), 100)) {
        Err(CacheError::Version {
            found, expected, ..
        }) => assert_eq!((found.as_str(), expected), ("2", 1)),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("opened a layout 2 cache"),
    }
}

#[test]
fn corrupt_tables_do_not_prevent_opening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = open(dir.path(), 100);
        cache.add_known_key("k");
        cache.record_size(&Sha512::of(b"s"), 1);
        cache.store_dir_answer("k", Some(b"[]"));
    }
    let ns = dir
        .path()
        .join("v1/ns")
        .join(Sha512::of(b"http://shadir.example/").short(32));
    fs::write(ns.join("keys.json"), b"[\"k\", {{{").unwrap();
    fs::write(ns.join("seen.json"), b"\xff\xfe").unwrap();
    fs::write(dir.path().join("v1/sizes.json"), b"not json").unwrap();
    for entry in fs::read_dir(ns.join("dirs")).unwrap() {
        fs::write(entry.unwrap().path(), b"{\"key\": 3").unwrap();
    }
    let cache = open(dir.path(), 100);
    assert!(cache.known_keys().is_empty());
    assert_eq!(cache.size_of(&Sha512::of(b"s")), None);
    assert!(cache.dir_answer("k").is_none());
    cache.add_known_key("k2");
    assert_eq!(cache.known_keys(), vec!["k2"]);
}

#[test]
fn outbox_directories_survive_everything() {
    let dir = tempfile::tempdir().unwrap();
    let outboxes = [
        dir.path().join("outbox"),
        dir.path().join("v1/outbox"),
        dir.path().join("v1/tmp/outbox"),
        dir.path().join("v1/blobs/outbox"),
    ];
    for o in &outboxes {
        fs::create_dir_all(o).unwrap();
        fs::write(o.join("staged"), b"precious").unwrap();
    }
    let cache = open(dir.path(), 10);
    for n in 0..5u8 {
        put(&cache, &[n; 8]);
    }
    cache.reserve(10).unwrap();
    cache.fsck().unwrap();
    drop(cache);
    let cache = open(dir.path(), 0);
    cache.fsck().unwrap();
    drop(cache);
    for o in &outboxes {
        assert_eq!(
            fs::read(o.join("staged")).unwrap(),
            b"precious",
            "{}",
            o.display()
        );
    }
}

#[test]
fn pins_work_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let sha = put(&cache, b"shared");
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                for _ in 0..50 {
                    let (f, len, _pin) = cache.open_blob(&sha).unwrap().unwrap();
                    assert_eq!(len, 6);
                    assert_eq!(read_all(f), b"shared");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(cache.usage(), (6, 1 << 20, 1));
}

#[test]
fn an_unclean_session_has_its_recent_blobs_rechecked() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = {
        let cache = open(dir.path(), 1 << 30);
        (put(&cache, b"kept intact"), put(&cache, b"will be damaged"))
        // Dropped without `close`: as after a crash, the marker stays.
    };
    let path = dir
        .path()
        .join("v1/blobs")
        .join(&bad.hex()[..2])
        .join(bad.hex());
    std::fs::write(&path, b"WILL be damaged").unwrap();
    let cache = open(dir.path(), 1 << 30);
    assert!(
        cache.lookup_blob(&bad).is_none(),
        "the damaged blob is removed at open"
    );
    assert!(cache.lookup_blob(&good).is_some());
    cache.close().unwrap();
    drop(cache);
    // After a clean close nothing is re-hashed: damage done now is only found by fsck.
    let path = dir
        .path()
        .join("v1/blobs")
        .join(&good.hex()[..2])
        .join(good.hex());
    std::fs::write(&path, b"KEPT intact").unwrap();
    let cache = open(dir.path(), 1 << 30);
    assert!(cache.lookup_blob(&good).is_some());
    assert_eq!(cache.fsck().unwrap().removed, vec![good]);
}
