//! Tests of the cache under pressure: blobs pinned from the moment they enter, the
//! reservations of downloads in flight counted together, sizes announced by a server
//! never trusted over a verified file, one descriptor per blob, and `close` waiting for
//! the background fsyncs.

use super::tests::open;
use super::*;
use crate::digest::HashingFile;
use std::fs;
use std::io::Read;

fn verified(cache: &Cache, bytes: &[u8]) -> VerifiedFile {
    let mut f = HashingFile::new_in(cache.tmp_dir()).unwrap();
    f.write_all(bytes).unwrap();
    f.verify(&Sha512::of(bytes)).unwrap()
}

fn put(cache: &Cache, bytes: &[u8]) -> Sha512 {
    cache.insert_blob(verified(cache, bytes)).unwrap();
    Sha512::of(bytes)
}

fn read_all(f: &File) -> Vec<u8> {
    let mut out = Vec::new();
    ReadAt { file: f, offset: 0 }.read_to_end(&mut out).unwrap();
    out
}

/// Case 9 of issue 11: a blob inserted by one thread while others insert and unpin
/// (each unpin runs an eviction) is always there for its opener.
#[test]
fn an_inserted_blob_is_pinned_before_any_eviction() {
    let dir = tempfile::tempdir().unwrap();
    // Room for about two blobs: every insert and every unpin evicts.
    let cache = open(dir.path(), 2_500);
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                for round in 0..150u32 {
                    let mut data = vec![t; 1_000];
                    data[..4].copy_from_slice(&round.to_le_bytes());
                    let (file, len, pin) = cache
                        .insert_and_open(verified(&cache, &data), None)
                        .unwrap_or_else(|e| panic!("thread {t} round {round}: {e}"));
                    assert_eq!(len, 1_000);
                    assert_eq!(read_all(&file), data);
                    assert!(cache.blob_path(&pin.sha()).exists() || cache.usage().0 > 0);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(cache.usage().0 <= 2_500, "{:?}", cache.usage());
}

/// Case 14 of issue 11, the limit's side: two downloads in flight each reserve room,
/// and the second one's reservation evicts for both.
#[test]
fn reservations_in_flight_count_together_against_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 100);
    let a = put(&cache, &[b'a'; 30]);
    let b = put(&cache, &[b'b'; 30]);
    let c = put(&cache, &[b'c'; 30]);
    // Present, without marking it used.
    let present = |sha: &Sha512| cache.blob_path(sha).exists();
    let first = cache.reserve(25).unwrap();
    assert!(!present(&a), "90 + 25 > 100: the oldest goes");
    assert!(present(&b) && present(&c));
    let second = cache.reserve(25).unwrap();
    assert!(!present(&b), "60 + 25 in flight + 25 > 100: another goes");
    assert!(present(&c));
    // Growing as bytes arrive counts too; giving a reservation back frees its room.
    drop(first);
    let mut third = cache.reserve(0).unwrap();
    third.ensure(0, 10, Some(10)).unwrap();
    assert_eq!(
        third.bytes(),
        10,
        "a hint smaller than a step bounds the step"
    );
    assert!(present(&c), "30 + 25 + 10 fit");
    drop(second);
    drop(third);
    let blobs = cache.blobs.lock();
    assert_eq!(blobs.reserved(), (0, 0), "every reservation given back");
}

/// Case 4 of issue 11: a reservation never grows from an announced size, only from
/// the bytes at hand (plus one step, less when the announcement is smaller).
#[test]
fn an_announced_size_is_never_reserved_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 20 << 20);
    let kept: Vec<Sha512> = (0..4u8).map(|n| put(&cache, &vec![n; 2 << 20])).collect();
    let mut r = cache.reserve(0).unwrap();
    // A server said a terabyte; 64 KiB arrive.
    r.ensure(0, 64 << 10, Some(1 << 40)).unwrap();
    assert!(r.bytes() <= (64 << 10) + (1 << 20), "{}", r.bytes());
    for sha in &kept {
        assert_eq!(cache.lookup_blob(sha), Some(2 << 20), "nothing evicted");
    }
    // Bytes past any announcement are reserved as they come.
    r.ensure(64 << 10, 3 << 20, Some(100)).unwrap();
    assert!(r.bytes() >= 3 << 20);
    drop(r);
    // The file system's free space bounds a body of unknown length.
    let mut r = cache.reserve(0).unwrap();
    assert!(matches!(
        r.ensure(0, u64::MAX / 4, None),
        Err(CacheError::NoSpace { .. })
    ));
    for sha in &kept {
        assert_eq!(
            cache.lookup_blob(sha),
            Some(2 << 20),
            "hopeless: nothing evicted"
        );
    }
}

/// Case 4 of issue 11: bytes past the size a server announced (it lied small) take free
/// space only, never a cached blob's place.
#[test]
fn bytes_past_an_announced_size_evict_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 100);
    let a = put(&cache, &[b'a'; 30]);
    let b = put(&cache, &[b'b'; 30]);
    let mut r = cache.reserve(0).unwrap();
    r.ensure(0, 10, Some(10)).unwrap();
    r.ensure(10, 80, Some(10)).unwrap();
    assert!(r.bytes() >= 80);
    assert!(cache.blob_path(&a).exists() && cache.blob_path(&b).exists());
    // Within an announcement (or without one) the limit evicts as usual.
    drop(r);
    let mut r = cache.reserve(0).unwrap();
    r.ensure(0, 80, None).unwrap();
    assert!(!cache.blob_path(&a).exists());
}

/// Case 4 of issue 11: a recorded size that disagrees with a blob that verifies (a
/// server announced it wrongly) is corrected, and the blob kept; a blob that does not
/// verify is removed.
#[test]
fn a_wrong_recorded_size_does_not_throw_a_good_blob_away() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let good = put(&cache, b"a good blob of 26 bytes...");
    cache.record_size(&good, 1000);
    assert!(
        cache.open_blob(&good).unwrap().is_none(),
        "the quick open does not hash"
    );
    let (f, len, _pin) = cache.open_blob_checked(&good).unwrap().expect("kept");
    assert_eq!((read_all(&f).len() as u64, len), (26, 26));
    assert_eq!(
        cache.size_of(&good),
        Some(26),
        "the verified size is recorded"
    );
    assert!(cache.open_blob(&good).unwrap().is_some());

    let bad = put(&cache, b"will be cut short");
    let path = cache.blob_path(&bad);
    fs::write(&path, b"will be").unwrap();
    // Another process cut it: the index of a fresh open does not know the length.
    let other = open(dir.path(), 1 << 20);
    other.record_size(&bad, 17);
    assert!(other.open_blob_checked(&bad).unwrap().is_none());
    assert!(!path.exists(), "a blob that does not verify is removed");
}

/// Case 13 of issue 11: the handles of one blob share one descriptor, which closes
/// with the last of them.
#[test]
fn open_handles_of_a_blob_share_one_descriptor() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let sha = put(&cache, b"shared descriptor");
    let opened: Vec<_> = (0..100)
        .map(|_| cache.open_blob(&sha).unwrap().unwrap())
        .collect();
    assert!(opened.iter().all(|(f, _, _)| Arc::ptr_eq(f, &opened[0].0)));
    let weak = Arc::downgrade(&opened[0].0);
    drop(opened);
    assert!(weak.upgrade().is_none(), "closed with the last handle");
    let (f, _, _pin) = cache.open_blob(&sha).unwrap().unwrap();
    assert_eq!(read_all(&f), b"shared descriptor");
    // A blob replaced in the cache gets a descriptor of its own.
    drop(f);
    drop(_pin);
    let (old, _, old_pin) = cache.open_blob(&sha).unwrap().unwrap();
    cache.remove_blob(&sha);
    let (new, _, _) = cache
        .insert_and_open(verified(&cache, b"shared descriptor"), None)
        .unwrap();
    assert!(!Arc::ptr_eq(&old, &new));
    drop(old_pin);
}

/// "Also harden" of issue 11: `close` waits for the background fsyncs of new blobs
/// (bounded) before it removes the `unclean` marker, and keeps the marker when they
/// do not end in time.
#[test]
fn close_waits_for_background_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("v1").join(UNCLEAN_MARKER);
    let cache = open(dir.path(), 1 << 20);
    cache.blobs.set_sync_delay(Duration::from_millis(400));
    put(&cache, b"synced late");
    cache.close().unwrap();
    assert!(!marker.exists());
    assert!(
        cache.blobs.wait_for_syncs(Duration::ZERO),
        "the marker went only once every fsync had ended"
    );
    drop(cache);

    let cache = open(dir.path(), 1 << 20);
    cache.blobs.set_sync_delay(Duration::from_secs(3));
    put(&cache, b"synced too late");
    cache.close_within(Duration::from_millis(100));
    assert!(
        marker.exists(),
        "an fsync still running keeps the marker for the next open"
    );
}
