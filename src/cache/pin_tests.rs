//! Persistent pins on temporary directories: eviction pressure, a second `Cache` on the
//! same directory (as another process would have), reopening, `fsck`.

use super::tests::open;
use super::*;
use crate::digest::HashingFile;
use std::sync::atomic::Ordering;

/// Inserts a blob of `len` bytes of `fill` and returns its name.
fn put(cache: &Cache, fill: u8, len: usize) -> Sha512 {
    let bytes = vec![fill; len];
    let mut f = HashingFile::new_in(cache.tmp_dir()).unwrap();
    f.write_all(&bytes).unwrap();
    let sha = Sha512::of(&bytes);
    cache.insert_blob(f.verify(&sha).unwrap()).unwrap();
    sha
}

/// Pins a cached blob as the mount and `prefetch` do: open it, pin it, close it.
fn pin(cache: &Cache, sha: &Sha512) {
    let (_file, _len, held) = cache.open_blob(sha).unwrap().expect("cached");
    assert!(cache.pin_blob(&held).unwrap(), "the blob is in place");
}

fn present(cache: &Cache, sha: &Sha512) -> bool {
    cache.blob_path(sha).is_file()
}

#[test]
fn a_pinned_blob_survives_eviction_pressure_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 100);
    let a = put(&cache, b'a', 60);
    pin(&cache, &a);
    assert!(cache.is_pinned(&a));
    assert_eq!(cache.pinned_bytes(), 60);
    // Each new blob pushes the total over the limit: the pinned one is never taken.
    let mut others = Vec::new();
    for fill in b'b'..=b'f' {
        others.push(put(&cache, fill, 30));
        assert!(present(&cache, &a));
    }
    let (used, limit, _) = cache.usage();
    assert!(used <= limit, "{used} bytes used of {limit}");
    assert!(
        !present(&cache, &others[0]),
        "the oldest unpinned blob went"
    );
    // Unpinned, it is the least recently used blob and goes at once (over the limit).
    put(&cache, b'g', 30);
    assert!(cache.unpin_blob(&a).unwrap());
    assert!(!cache.unpin_blob(&a).unwrap(), "no pin left");
    assert!(!cache.is_pinned(&a));
    assert_eq!(cache.pinned_bytes(), 0);
    put(&cache, b'h', 30);
    assert!(!present(&cache, &a));
}

#[test]
fn pins_alone_may_exceed_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 100);
    let a = put(&cache, b'a', 80);
    pin(&cache, &a);
    let b = put(&cache, b'b', 80);
    pin(&cache, &b);
    assert!(present(&cache, &a) && present(&cache, &b));
    assert_eq!(cache.pinned_bytes(), 160);
    // A new blob still enters (the disk has room) and is the one evicted next.
    let c = put(&cache, b'c', 10);
    assert!(present(&cache, &c));
    put(&cache, b'd', 10);
    assert!(!present(&cache, &c));
    assert!(present(&cache, &a) && present(&cache, &b));
}

#[test]
fn pins_made_by_another_instance_are_respected_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mount = open(dir.path(), 100);
    let a = put(&mount, b'a', 40);
    let b = put(&mount, b'b', 40);
    // Another process (its own `Cache` on the same directory) pins `a`, the mount's
    // least recently used blob: the mount's next eviction takes `b` instead.
    let prefetch = open(dir.path(), u64::MAX);
    pin(&prefetch, &a);
    drop(prefetch);
    put(&mount, b'c', 40);
    assert!(present(&mount, &a), "the other process's pin was respected");
    assert!(!present(&mount, &b));
    assert_eq!(mount.pinned_bytes(), 40);
    drop(mount);
    // Reopened with a limit smaller than the pins: the pinned blob stays.
    let again = open(dir.path(), 10);
    assert!(present(&again, &a));
    assert!(again.is_pinned(&a));
    // Unpinned by another instance: the next eviction may take it.
    let other = open(dir.path(), u64::MAX);
    assert!(other.unpin_blob(&a).unwrap());
    put(&again, b'd', 5);
    assert!(!present(&again, &a), "unpinned elsewhere, then evicted");
}

#[test]
fn a_pin_finds_the_blob_gone_when_another_process_evicted_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let a = put(&cache, b'a', 10);
    let (_file, _, held) = cache.open_blob(&a).unwrap().unwrap();
    std::fs::remove_file(cache.blob_path(&a)).unwrap();
    assert!(
        !cache.pin_blob(&held).unwrap(),
        "the caller must fetch it again"
    );
    assert!(cache.is_pinned(&a), "the pin itself is kept");
}

#[test]
fn fsck_keeps_pins_and_their_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), 1 << 20);
    let good = put(&cache, b'g', 10);
    let bad = put(&cache, b'b', 10);
    pin(&cache, &good);
    pin(&cache, &bad);
    std::fs::write(cache.blob_path(&bad), b"0123456789").unwrap();
    let report = cache.fsck().unwrap();
    assert_eq!(report.removed, vec![bad]);
    assert!(present(&cache, &good));
    assert!(cache.is_pinned(&good));
    // A wrong blob goes, its pin stays: the next open or prefetch fetches it again.
    assert!(!present(&cache, &bad));
    assert!(cache.is_pinned(&bad));
    drop(cache);
    let fsck = open(dir.path(), u64::MAX);
    fsck.fsck().unwrap();
    assert!(fsck.is_pinned(&good) && present(&fsck, &good));
}

/// Invariant: once `pin_blob` said the blob is in place, it stays, whatever another
/// process evicts meanwhile. A bounded storm: one instance (a mount with a tiny
/// limit) inserts blobs and evicts all the time, another (a `prefetch --pin`) pins
/// blobs the first one just inserted, racing its evictions.
#[test]
fn a_pin_that_succeeded_is_never_evicted_by_another_instance() {
    let dir = tempfile::tempdir().unwrap();
    let mount = open(dir.path(), 400);
    let prefetch = open(dir.path(), u64::MAX);
    const BLOBS: usize = 300;
    let bytes = |i: usize| format!("{i:0100}").into_bytes();
    let latest = Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inserter = {
        let (mount, latest, done) = (Arc::clone(&mount), latest.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 0..BLOBS {
                let b = bytes(i);
                let mut f = HashingFile::new_in(mount.tmp_dir()).unwrap();
                f.write_all(&b).unwrap();
                mount
                    .insert_blob(f.verify(&Sha512::of(&b)).unwrap())
                    .unwrap();
                latest.store(i, Ordering::SeqCst);
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    // Pins the blob inserted last, again and again, until (and once after) the
    // inserter is done; bounded by the number of blobs it tries.
    let mut pinned: Vec<Sha512> = Vec::new();
    let mut tried = 0usize;
    loop {
        let finished = done.load(Ordering::SeqCst);
        let i = latest.load(Ordering::SeqCst);
        let sha = Sha512::of(&bytes(i));
        if i != usize::MAX && !pinned.contains(&sha) {
            tried += 1;
            if let Some((_file, _len, held)) = prefetch.open_blob(&sha).unwrap() {
                if prefetch.pin_blob(&held).unwrap() {
                    assert!(present(&prefetch, &sha), "pinned, yet gone at once");
                    pinned.push(sha);
                }
            }
        }
        if finished || tried > 1000 * BLOBS {
            break;
        }
        std::thread::yield_now();
    }
    inserter.join().unwrap();
    // The mount's eviction goes on after the storm too.
    put(&mount, b'z', 100);
    assert!(!pinned.is_empty(), "nothing pinned");
    for sha in &pinned {
        assert!(
            present(&mount, sha),
            "{} was pinned, then evicted",
            sha.short(16)
        );
    }
    let (used, _, _) = mount.usage();
    assert!(used >= mount.pinned_bytes());
}
