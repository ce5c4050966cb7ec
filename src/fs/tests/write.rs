//! The write path's rules (`fs/write/`) and the integrity invariants: who publishes,
//! frozen bytes, versions, failures that lose nothing, early uploads and their
//! fall-backs.

use super::*;
use crate::store::memory::{Failure, Fault, Op};

fn errno<T>(r: Result<T, FsError>) -> i32 {
    match r {
        Ok(_) => panic!("an error was expected"),
        Err(e) => e.errno(),
    }
}

#[tokio::test(start_paused = true)]
async fn a_close_publishes_blob_then_entry_and_shows_it_without_asking_again() {
    let rig = Rig::new();
    rig.cp("f", b"hello").await.expect("close");
    assert_eq!(rig.published("k"), vec![b"hello".to_vec()]);
    // A small blob is sent without a probe first.
    assert_eq!(
        (
            rig.store.calls(Op::Probe),
            rig.store.calls(Op::Post),
            rig.store.calls(Op::PutDir)
        ),
        (0, 1, 1)
    );
    let gets = rig.store.calls(Op::GetDir);
    assert_eq!(
        rig.names("k").await,
        vec![("f".into(), Kind::File), ("latest".into(), Kind::Symlink)]
    );
    let ino = rig.attr("k", "f").await.unwrap().ino;
    assert_eq!(rig.read(ino).await.unwrap(), b"hello");
    assert_eq!(
        rig.store.calls(Op::GetDir),
        gets,
        "the publish updated the listing in place"
    );
    assert_eq!(rig.core.pending_count(), 0);
}

/// A blob bigger than `SEND_WITHOUT_PROBE` is probed first, and not sent again when
/// shacache has it; a small one is sent at once.
#[tokio::test(start_paused = true)]
async fn only_blobs_above_the_threshold_are_probed_before_they_are_sent() {
    let rig = Rig::new();
    let big = vec![7u8; crate::client::SEND_WITHOUT_PROBE as usize + 1];
    rig.cp("a", &big).await.expect("close");
    assert_eq!(
        (rig.store.calls(Op::Probe), rig.store.calls(Op::Post)),
        (1, 1)
    );
    rig.cp("b", &big).await.expect("close");
    assert_eq!(
        (rig.store.calls(Op::Probe), rig.store.calls(Op::Post)),
        (2, 1),
        "a blob shacache has was sent again"
    );
    let small = vec![7u8; crate::client::SEND_WITHOUT_PROBE as usize];
    rig.cp("c", &small).await.expect("close");
    assert_eq!(
        (rig.store.calls(Op::Probe), rig.store.calls(Op::Post)),
        (2, 2)
    );
    assert_eq!(rig.published("k").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_mount_started_right_after_a_publish_shows_it() {
    let rig = Rig::new();
    rig.names("k").await;
    rig.cp("f", b"new").await.expect("close");
    // Within the TTL a new mount uses the listing saved in the cache, which must hold
    // the publish (it was added in memory without asking shadir).
    let rig = rig.remount();
    let gets = rig.store.calls(Op::GetDir);
    let names: Vec<String> = rig.names("k").await.into_iter().map(|n| n.0).collect();
    assert_eq!(
        rig.store.calls(Op::GetDir),
        gets,
        "the saved answer was used"
    );
    assert!(names.contains(&"f".to_string()), "{names:?}");
}

/// A publish renames the listing's entries without verifying or parsing them again
/// (the ones it did not change are the very same entries), and the copy of the listing
/// saved in the cache is not rewritten per publish: marked stale at once, saved whole
/// once the publishes pause.
#[tokio::test(start_paused = true)]
async fn a_publish_updates_the_listing_in_place_and_saves_it_once_later() {
    let rig = Rig::new();
    rig.cp("a", b"first").await.expect("close");
    rig.names("k").await;
    let before = rig.core.stale_listing("k").expect("listed");
    let verified = rig.core.client.verifier.verifications();
    let gets = rig.store.calls(Op::GetDir);
    for i in 0..20 {
        rig.cp(&format!("f{i:02}"), format!("data {i}").as_bytes())
            .await
            .expect("close");
    }
    let after = rig.core.stale_listing("k").expect("listed");
    assert_eq!(after.files.len(), 21);
    assert!(
        Arc::ptr_eq(&before.files["a"].entry, &after.files["a"].entry),
        "an entry the publishes did not change was parsed again"
    );
    assert_eq!(
        rig.core.client.verifier.verifications() - verified,
        20,
        "one verification per publish"
    );
    assert_eq!(rig.store.calls(Op::GetDir), gets, "no fetch of the key");
    // A new version of a name (renamed in full) and names that sort anywhere: the
    // listing is what naming all the entries gives.
    for name in ["a", "0", "zz", "f05", "m"] {
        rig.cp(name, format!("again {name}").as_bytes())
            .await
            .expect("close");
    }
    let after = rig.core.stale_listing("k").expect("listed");
    let all = crate::wire::Listing {
        entries: rig.store.entries("k").expect("entries"),
        rejected: Vec::new(),
    };
    let full = rig.core.build("k", all);
    let shown = |l: &crate::fs::KeyListing| {
        l.files
            .iter()
            .map(|(n, f)| (n.clone(), f.entry.info.sha512))
            .collect::<Vec<_>>()
    };
    assert_eq!(shown(&after), shown(&full));
    assert_eq!(after.latest, full.latest);
    assert_eq!(after.entries_json(), full.entries_json());
    // The saved copy: not fresh while the publishes go on, whole after a pause.
    let (when, _) = rig.core.cache.dir_answer("k").expect("saved");
    assert_eq!(
        when,
        std::time::UNIX_EPOCH,
        "the saved copy still looks fresh"
    );
    tokio::time::sleep(super::super::listings::SAVE_AFTER_PUBLISH * 2).await;
    let (when, body) = rig.core.cache.dir_answer("k").expect("saved");
    assert!(when > std::time::UNIX_EPOCH);
    let saved = crate::wire::parse_listing(&body.expect("a body")).expect("a listing");
    assert_eq!(saved.entries.len(), after.files.len());
}

#[tokio::test(start_paused = true)]
async fn only_the_openers_flush_publishes_and_the_last_release_publishes_the_rest() {
    let rig = Rig::new();
    let parent = rig.key("k").await;
    let (_, fh, _) = rig.core.create(parent, "f", ME).await.unwrap();
    rig.core.write(fh, 0, b"a").await.unwrap();
    // A child that inherited the descriptor closes it: nothing goes out.
    rig.core.flush(fh, CHILD).await.unwrap();
    assert_eq!(
        rig.store.calls(Op::PutDir),
        0,
        "a child's close publishes nothing"
    );
    rig.core.flush(fh, ME).await.unwrap();
    assert_eq!(rig.published("k"), vec![b"a".to_vec()]);
    // The child goes on writing through the shared descriptor: a new version, which
    // its close does not publish but the last release does.
    rig.core.write(fh, 1, b"b").await.unwrap();
    rig.core.flush(fh, CHILD).await.unwrap();
    assert_eq!(rig.store.calls(Op::PutDir), 1);
    rig.core.release_handle(fh).await;
    assert_eq!(rig.published("k"), vec![b"a".to_vec(), b"ab".to_vec()]);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_opener_publishes_at_every_close_with_new_data() {
    let rig = Rig::new();
    let parent = rig.key("k").await;
    let (_, fh, _) = rig.core.create(parent, "f", None).await.unwrap();
    rig.core.write(fh, 0, b"x").await.unwrap();
    rig.core.flush(fh, CHILD).await.unwrap();
    assert_eq!(rig.published("k"), vec![b"x".to_vec()]);
    rig.core.flush(fh, CHILD).await.unwrap();
    assert_eq!(
        rig.store.calls(Op::PutDir),
        1,
        "nothing new: nothing published"
    );
    rig.core.release_handle(fh).await;
}

#[tokio::test(start_paused = true)]
async fn an_empty_file_is_published_by_its_release_not_by_a_flush() {
    let rig = Rig::new();
    let parent = rig.key("k").await;
    let (_, fh, _) = rig.core.create(parent, "empty", ME).await.unwrap();
    // `echo x > f` closes a duplicate descriptor before any write.
    rig.core.flush(fh, ME).await.unwrap();
    assert_eq!(rig.store.calls(Op::PutDir), 0);
    rig.core.release_handle(fh).await;
    assert_eq!(rig.published("k"), vec![Vec::<u8>::new()]);
}

#[tokio::test(start_paused = true)]
async fn dot_names_are_staged_and_a_rename_to_a_plain_name_publishes() {
    let rig = Rig::new();
    rig.cp(".f.XXXX", b"rsync's temporary").await.unwrap();
    assert_eq!(rig.store.calls(Op::PutDir), 0);
    assert_eq!(rig.core.pending_count(), 1);
    let parent = rig.key("k").await;
    rig.core
        .rename(parent, ".f.XXXX", parent, "f")
        .await
        .expect("the rename publishes");
    assert_eq!(rig.published("k"), vec![b"rsync's temporary".to_vec()]);
    assert_eq!(
        rig.names("k").await,
        vec![("f".into(), Kind::File), ("latest".into(), Kind::Symlink)]
    );
    // A rename whose publish fails says so.
    rig.cp(".g", b"g").await.unwrap();
    rig.store
        .on(Op::PutDir, Some(1), Fault::Fail(Failure::Status(503)));
    assert_eq!(
        errno(rig.core.rename(parent, ".g", parent, "g").await),
        libc::EIO
    );
    assert_eq!(rig.core.pending_count(), 1, "kept, pending");
}

#[tokio::test(start_paused = true)]
async fn published_entries_are_immutable_and_o_trunc_starts_a_new_version() {
    let rig = Rig::new();
    rig.cp("f", b"v1").await.unwrap();
    let parent = rig.key("k").await;
    let ino = rig.attr("k", "f").await.unwrap().ino;
    assert_eq!(
        errno(rig.core.open_write(ino, false, ME).await),
        libc::EPERM
    );
    assert_eq!(errno(rig.core.truncate(ino, 0).await), libc::EPERM);
    assert_eq!(errno(rig.core.unlink(parent, "f").await), libc::EPERM);
    assert_eq!(
        errno(rig.core.rename(parent, "f", parent, "g").await),
        libc::EPERM
    );
    let (fh, _) = rig.core.open_write(ino, true, ME).await.expect("O_TRUNC");
    rig.core.write(fh, 0, b"v2").await.unwrap();
    rig.core.flush(fh, ME).await.unwrap();
    rig.core.release_handle(fh).await;
    assert_eq!(rig.published("k"), vec![b"v1".to_vec(), b"v2".to_vec()]);
}

#[tokio::test(start_paused = true)]
async fn a_publish_works_on_frozen_bytes_and_later_writes_go_to_a_new_version() {
    let rig = Rig::new();
    let parent = rig.key("k").await;
    let (_, fh, _) = rig.core.create(parent, "f", ME).await.unwrap();
    rig.core.write(fh, 0, b"first").await.unwrap();
    let hold = rig.store.hold(Op::PutDir);
    let core = rig.core.clone();
    let flush = tokio::spawn(async move { core.flush(fh, ME).await });
    hold.wait_arrived(1).await;
    // The publish has hashed and sent the blob; its bytes must not change now.
    assert!(
        rig.core.write_unfrozen(fh, 5, b" second").is_none(),
        "a write does not go in under a publish"
    );
    let core = rig.core.clone();
    let write = tokio::spawn(async move { core.write(fh, 5, b" second").await });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!write.is_finished(), "the write waits for the publish");
    rig.store.clear();
    hold.release();
    flush.await.unwrap().expect("the first close");
    assert_eq!(write.await.unwrap().unwrap(), 7);
    assert_eq!(rig.published("k"), vec![b"first".to_vec()]);
    rig.core.flush(fh, ME).await.expect("the second close");
    rig.core.release_handle(fh).await;
    assert_eq!(
        rig.published("k"),
        vec![b"first".to_vec(), b"first second".to_vec()]
    );
}

/// A handle still writing after a publish moves to a new version made from a copy of the
/// published bytes. That version is opened by its name only once the copy is done: a
/// write through such an open is never overwritten by the copy (found by the stress
/// test: an acknowledged record in no version).
#[tokio::test(start_paused = true)]
async fn a_new_version_is_opened_by_its_name_only_once_its_copy_is_done() {
    let rig = Rig::new();
    let parent = rig.key("k").await;
    let (_, fh, _) = rig.core.create(parent, "f", ME).await.unwrap();
    rig.core.write(fh, 0, b"aaaa").await.unwrap();
    rig.core.flush(fh, ME).await.expect("first close");
    assert_eq!(rig.published("k"), vec![b"aaaa".to_vec()]);
    // fh goes on writing: it moves to a new version, a copy of "aaaa".
    let core = rig.core.clone();
    let moving = tokio::spawn(async move { core.write(fh, 4, b"bbbb").await });
    let mut seen = false;
    for _ in 0..10_000 {
        if rig.core.staged_id("k", "f").is_some() {
            seen = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(seen, "the new version never showed under its name");
    // Another writer opens the name as soon as it shows and writes at its start.
    let ino = rig.attr("k", "f").await.unwrap().ino;
    let (other, _) = rig.core.open_write(ino, false, ME).await.expect("open");
    rig.core.write(other, 0, b"XX").await.unwrap();
    assert_eq!(moving.await.unwrap().unwrap(), 4);
    rig.core.flush(other, ME).await.expect("second close");
    rig.core.release_handle(other).await;
    rig.core.flush(fh, ME).await.expect("third close");
    rig.core.release_handle(fh).await;
    let versions = rig.published("k");
    assert_eq!(
        versions.last().map(Vec::as_slice),
        Some(&b"XXaabbbb"[..]),
        "{:?}",
        versions
            .iter()
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn unlink_and_truncate_wait_for_a_publish_in_flight() {
    let rig = Rig::new();
    let parent = rig.key("k").await;
    let (attr, fh, _) = rig.core.create(parent, "f", ME).await.unwrap();
    rig.core.write(fh, 0, b"data").await.unwrap();
    let hold = rig.store.hold(Op::PutDir);
    let core = rig.core.clone();
    let flush = tokio::spawn(async move { core.flush(fh, ME).await });
    hold.wait_arrived(1).await;
    let core = rig.core.clone();
    let truncate = tokio::spawn(async move { core.truncate(attr.ino, 0).await });
    let core = rig.core.clone();
    let unlink = tokio::spawn(async move { core.unlink(parent, "f").await });
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!truncate.is_finished() && !unlink.is_finished());
    hold.release();
    flush.await.unwrap().unwrap();
    // Both found the file published: immutable.
    assert_eq!(errno(truncate.await.unwrap()), libc::EPERM);
    assert_eq!(errno(unlink.await.unwrap()), libc::EPERM);
    assert_eq!(rig.published("k"), vec![b"data".to_vec()]);
    rig.core.release_handle(fh).await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_publish_keeps_the_file_pending_and_a_retry_publishes_it() {
    let rig = Rig::new();
    rig.store
        .on(Op::PutDir, Some(1), Fault::Fail(Failure::Status(503)));
    assert_eq!(errno(rig.cp("f", b"precious").await), libc::EIO);
    assert!(
        !rig.core.known_unreachable(),
        "a server that answers (503) is not offline: the next close tries it"
    );
    assert_eq!(
        rig.store.calls(Op::PutDir),
        1,
        "the release after a failed close does not try again at once"
    );
    assert_eq!(rig.core.pending_count(), 1);
    let attr = rig
        .attr("k", "f")
        .await
        .expect("pending files stay visible");
    let why = rig
        .core
        .xattr(attr.ino, "user.shacachefs.pending".as_ref())
        .await
        .expect("the pending attribute");
    assert!(String::from_utf8_lossy(&why).contains("503"), "{why:?}");
    // A remount finds it in the outbox, and the retry publishes it.
    let rig = rig.remount();
    assert_eq!(rig.core.pending_count(), 1);
    assert_eq!(rig.core.retry_pending().await, (1, 0));
    assert_eq!(rig.published("k"), vec![b"precious".to_vec()]);
    assert_eq!(rig.core.pending_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_refused_upload_is_eacces_and_an_unreachable_one_eio() {
    let rig = Rig::new();
    rig.store
        .on(Op::Post, Some(1), Fault::Fail(Failure::Status(403)));
    assert_eq!(errno(rig.cp("f", b"x").await), libc::EACCES);
    rig.store
        .on(Op::Post, Some(1), Fault::Fail(Failure::Unreachable));
    assert_eq!(errno(rig.cp("g", b"y").await), libc::EIO);
    assert_eq!(rig.core.pending_count(), 2);
    assert!(rig.store.entries("k").is_none(), "nothing half-published");
}

#[tokio::test(start_paused = true)]
async fn unlink_drops_a_pending_file() {
    let rig = Rig::new();
    rig.cp(".tmp", b"x").await.unwrap();
    let parent = rig.key("k").await;
    rig.core.unlink(parent, ".tmp").await.unwrap();
    assert_eq!(rig.core.pending_count(), 0);
    assert!(rig.names("k").await.is_empty());
    assert_eq!(errno(rig.core.unlink(parent, ".tmp").await), libc::ENOENT);
}

#[tokio::test(start_paused = true)]
async fn files_are_only_created_in_key_directories_with_plain_names() {
    let rig = Rig::new();
    assert_eq!(errno(rig.core.create(ROOT_INO, "f", ME).await), libc::EPERM);
    let parent = rig.key("k").await;
    for reserved in ["latest", ".entries.json"] {
        assert_eq!(
            errno(rig.core.create(parent, reserved, ME).await),
            libc::EPERM,
            "{reserved}"
        );
    }
    let ro = Rig::with(Arc::new(MemoryStore::new()), |o| o.writable = false);
    let parent = ro.key("k").await;
    assert_eq!(errno(ro.core.create(parent, "f", ME).await), libc::EROFS);
}

/// Writes `len` bytes in order, 1 MiB at a time; the content (its first byte `seed`).
async fn write_in_order(rig: &Rig, fh: u64, len: usize, seed: u8) -> Vec<u8> {
    let mut data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    data[0] = seed;
    for (n, chunk) in data.chunks(1 << 20).enumerate() {
        rig.core
            .write(fh, (n << 20) as u64, chunk)
            .await
            .expect("write");
    }
    data
}

#[tokio::test(start_paused = true)]
async fn a_big_file_written_in_order_is_uploaded_while_written() {
    let rig = Rig::new();
    let parent = rig.key("k").await;
    let (_, fh, _) = rig.core.create(parent, "big", ME).await.unwrap();
    let data = write_in_order(&rig, fh, 10 << 20, 0).await;
    rig.core.flush(fh, ME).await.expect("close");
    rig.core.release_handle(fh).await;
    assert_eq!(rig.published("k"), vec![data]);
    assert_eq!(
        (rig.store.calls(Op::PostGrowing), rig.store.calls(Op::Post)),
        (1, 0),
        "sent while written, not again at close"
    );
    let stats = &rig.core.stats;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        (
            stats.early_used.load(Relaxed),
            stats.early_resent.load(Relaxed)
        ),
        (1, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn a_server_refusing_uploads_without_length_gets_files_at_close_from_then_on() {
    let rig = Rig::new();
    rig.store
        .on(Op::PostGrowing, None, Fault::Fail(Failure::Status(411)));
    let parent = rig.key("k").await;
    for (seed, name) in ["one", "two"].into_iter().enumerate() {
        let (_, fh, _) = rig.core.create(parent, name, ME).await.unwrap();
        write_in_order(&rig, fh, 9 << 20, seed as u8).await;
        rig.core.flush(fh, ME).await.expect("close");
        rig.core.release_handle(fh).await;
    }
    assert_eq!(rig.published("k").len(), 2);
    assert_eq!(
        (rig.store.calls(Op::PostGrowing), rig.store.calls(Op::Post)),
        (1, 2),
        "one refusal, then whole files at close"
    );
}

#[tokio::test(start_paused = true)]
async fn out_of_order_writes_drop_the_running_digest_and_still_publish_the_right_hash() {
    let rig = Rig::new();
    let parent = rig.key("k").await;
    let (_, fh, _) = rig.core.create(parent, "f", ME).await.unwrap();
    rig.core.write(fh, 4, b"5678").await.unwrap();
    rig.core.write(fh, 0, b"1234").await.unwrap();
    rig.core.flush(fh, ME).await.unwrap();
    rig.core.release_handle(fh).await;
    assert_eq!(rig.published("k"), vec![b"12345678".to_vec()]);
}

#[tokio::test(start_paused = true)]
async fn a_known_key_stays_writable_offline_and_pending_files_go_out_when_servers_return() {
    let store = Arc::new(MemoryStore::new());
    for op in [Op::GetDir, Op::Probe, Op::Post, Op::PutDir] {
        store.on(op, None, Fault::Fail(Failure::Unreachable));
    }
    let rig = Rig::with(store, |_| {});
    // Configured key `k`, never listed: empty, but there.
    assert!(rig.names("k").await.is_empty());
    // A name not in the (empty) saved listing is absent, not an error.
    let parent = rig.key("k").await;
    assert_eq!(errno(rig.core.lookup(parent, "new").await), libc::ENOENT);
    assert_eq!(errno(rig.cp("one", b"1").await), libc::EIO);
    let calls = |s: &MemoryStore| s.calls(Op::Probe) + s.calls(Op::Post) + s.calls(Op::PutDir);
    let before = calls(&rig.store);
    // Known to be away: the next closes fail at once, without asking.
    assert_eq!(errno(rig.cp("two", b"2").await), libc::EIO);
    assert_eq!(
        calls(&rig.store),
        before,
        "no request while known unreachable"
    );
    assert!(rig.core.known_unreachable());
    assert_eq!(rig.core.pending_count(), 2);
    // A retry round asks once and stops at the first unreachable answer.
    assert_eq!(rig.core.retry_pending().await, (0, 2));
    assert_eq!(calls(&rig.store), before + 1, "one attempt per round");
    // An unknown key is still an error offline.
    assert_eq!(
        errno(rig.core.lookup(ROOT_INO, "never-seen").await),
        libc::EIO
    );
    // The servers are back.
    rig.store.clear();
    assert_eq!(rig.core.retry_pending().await, (2, 0));
    assert!(!rig.core.known_unreachable());
    let mut got = rig.published("k");
    got.sort();
    assert_eq!(got, vec![b"1".to_vec(), b"2".to_vec()]);
    // The staleness window ends by itself too: a close tries again after it.
    rig.store
        .on(Op::Post, Some(1), Fault::Fail(Failure::Unreachable));
    assert_eq!(errno(rig.cp("three", b"3").await), libc::EIO);
    tokio::time::advance(crate::fs::listings::OFFLINE_RECHECK).await;
    let ino = rig.attr("k", "three").await.unwrap().ino;
    let (fh, _) = rig.core.open_write(ino, false, ME).await.unwrap();
    rig.core.write(fh, 1, b"!").await.unwrap();
    rig.core
        .flush(fh, ME)
        .await
        .expect("published once they answer");
    rig.core.release_handle(fh).await;
    assert_eq!(rig.core.pending_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_publish_in_flight_is_listed_as_an_upload_and_timed() {
    use crate::fs::transfers::Direction;
    let rig = Rig::new();
    let parent = rig.key("k").await;
    let (_, fh, _) = rig.core.create(parent, "up.bin", ME).await.unwrap();
    rig.core.write(fh, 0, b"0123456789").await.unwrap();
    let hold = rig.store.hold(Op::PutDir);
    let core = rig.core.clone();
    let flush = tokio::spawn(async move { core.flush(fh, ME).await });
    hold.wait_arrived(1).await;
    let list = rig.core.transfers.list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].direction, Direction::Upload);
    assert_eq!(
        (list[0].key.as_deref(), list[0].name.as_str()),
        (Some("k"), "up.bin")
    );
    assert_eq!(list[0].total_bytes, Some(10));
    assert_eq!(list[0].done_bytes, 10, "the blob went before the entry");
    tokio::time::advance(Duration::from_secs(2)).await;
    hold.release();
    flush.await.unwrap().unwrap();
    rig.core.release_handle(fh).await;
    assert!(rig.core.transfers.list().is_empty());
    let render = crate::metrics::render_registry(crate::metrics::mount_registry(rig.core.clone()));
    let text = render();
    for line in [
        "shacachefs_publish_seconds_count 1",
        "shacachefs_publish_seconds_bucket{le=\"0.64\"} 0",
        "shacachefs_publish_seconds_bucket{le=\"2.56\"} 1",
        "shacachefs_published_entries_total 1",
        "shacachefs_uploaded_bytes_total 10",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
    }
}
