//! Listings (TTL, negative answers, offline), trust, sizes and verified reads.

use super::*;
use crate::store::memory::{Failure, Fault, Op};

/// A store holding key `k` with the entries `(file, data)` signed by A.
fn store_with(files: &[(&str, &[u8])]) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let a = signer(true);
    for (file, data) in files {
        store.add_entry("k", entry(&store, &a, file, data));
    }
    store
}

fn rig_with(files: &[(&str, &[u8])]) -> Rig {
    Rig::with(store_with(files), |_| {})
}

#[tokio::test(start_paused = true)]
async fn a_listing_is_asked_again_after_the_ttl_not_before() {
    let rig = rig_with(&[("a", b"A")]);
    rig.names("k").await;
    let first = rig.store.calls(Op::GetDir);
    tokio::time::advance(Duration::from_secs(29)).await;
    rig.names("k").await;
    assert_eq!(rig.store.calls(Op::GetDir), first, "within the TTL");
    rig.store
        .add_entry("k", entry(&rig.store, &signer(true), "b", b"B"));
    tokio::time::advance(Duration::from_secs(2)).await;
    let names: Vec<String> = rig.names("k").await.into_iter().map(|n| n.0).collect();
    assert_eq!(rig.store.calls(Op::GetDir), first + 1, "after the TTL");
    assert!(names.contains(&"b".to_string()), "{names:?}");
}

#[tokio::test(start_paused = true)]
async fn an_unknown_key_is_not_asked_again_within_the_negative_ttl() {
    let rig = rig_with(&[]);
    assert_eq!(
        rig.core.lookup(ROOT_INO, "nope").await.unwrap_err().errno(),
        libc::ENOENT
    );
    let n = rig.store.calls(Op::GetDir);
    rig.core.lookup(ROOT_INO, "nope").await.unwrap_err();
    assert_eq!(rig.store.calls(Op::GetDir), n);
    tokio::time::advance(Duration::from_secs(11)).await;
    rig.core.lookup(ROOT_INO, "nope").await.unwrap_err();
    assert_eq!(rig.store.calls(Op::GetDir), n + 1);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_shadir_serves_the_last_listing_and_waits_a_ttl_to_ask_again() {
    let rig = rig_with(&[("a", b"A")]);
    assert_eq!(rig.names("k").await.len(), 1);
    rig.store
        .on(Op::GetDir, None, Fault::Fail(Failure::Unreachable));
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(rig.names("k").await.len(), 1, "the last answer");
    let n = rig.store.calls(Op::GetDir);
    rig.names("k").await;
    assert_eq!(rig.store.calls(Op::GetDir), n, "not asked at every stat");
    // A remount while offline finds the answer saved in the cache.
    let rig = rig.remount();
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(rig.names("k").await.len(), 1, "saved on disk");
    // A server error with no saved answer is EIO.
    assert_eq!(
        rig.core
            .lookup(ROOT_INO, "other")
            .await
            .unwrap_err()
            .errno(),
        libc::EIO
    );
}

#[tokio::test(start_paused = true)]
async fn untrusted_entries_are_hidden_and_a_changed_signature_is_verified_again() {
    let store = store_with(&[("good", b"G")]);
    store.add_entry("k", entry(&store, &signer(false), "evil", b"E"));
    let rig = Rig::with(store, |_| {});
    let names: Vec<String> = rig.names("k").await.into_iter().map(|n| n.0).collect();
    assert!(names.contains(&"good".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("evil")), "{names:?}");
    let v = &rig.core.client().verifier;
    let before = v.verifications();
    // A refresh with nothing new verifies nothing.
    tokio::time::advance(Duration::from_secs(31)).await;
    rig.names("k").await;
    assert_eq!(v.verifications(), before);
    // The good entry's inner string signed again by B (same sha512): verified, hidden.
    let good = rig.store.entries("k").unwrap()[0].clone();
    let forged = RawEntry {
        signature: signer(false).sign(&good.inner),
        inner: good.inner.clone(),
    };
    rig.store.add_entry("k", forged);
    tokio::time::advance(Duration::from_secs(31)).await;
    let names: Vec<String> = rig.names("k").await.into_iter().map(|n| n.0).collect();
    assert_eq!(v.verifications(), before + 1, "only the changed pair");
    assert_eq!(
        names.iter().filter(|n| n.starts_with("good")).count(),
        1,
        "{names:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_blob_is_never_served_nor_cached() {
    let rig = rig_with(&[("a", b"the bytes")]);
    let ino = rig.attr("k", "a").await.unwrap().ino;
    rig.store.on(Op::Fetch, Some(1), Fault::Corrupt);
    assert_eq!(rig.read(ino).await.unwrap_err().errno(), libc::EIO);
    let sha = Sha512::of(b"the bytes");
    assert!(rig.core.cache().lookup_blob(&sha).is_none());
    assert_eq!(rig.read(ino).await.unwrap(), b"the bytes");
    assert!(rig.core.cache().lookup_blob(&sha).is_some());
}

#[tokio::test(start_paused = true)]
async fn concurrent_opens_of_a_cold_blob_fetch_it_once() {
    let rig = Arc::new(rig_with(&[("a", b"shared")]));
    let ino = rig.attr("k", "a").await.unwrap().ino;
    let hold = rig.store.hold(Op::Fetch);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let rig = rig.clone();
            tokio::spawn(async move { rig.read(ino).await })
        })
        .collect();
    hold.wait_arrived(1).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    hold.release();
    for r in readers {
        assert_eq!(r.await.unwrap().unwrap(), b"shared");
    }
    assert_eq!(rig.store.calls(Op::Fetch), 1);
}

#[tokio::test(start_paused = true)]
async fn a_size_a_probe_lied_about_is_corrected_by_the_verified_blob() {
    let store = store_with(&[("a", b"five!")]);
    store.on(Op::Probe, Some(1), Fault::LieSize(3));
    let rig = Rig::with(store, |_| {});
    let attr = rig.attr("k", "a").await.unwrap();
    assert_eq!(attr.size, 3, "the probe's answer, until verified");
    assert_eq!(rig.read(attr.ino).await.unwrap(), b"five!");
    assert_eq!(rig.core.getattr(attr.ino).await.unwrap().size, 5);
}

#[tokio::test(start_paused = true)]
async fn a_listing_costs_one_request_and_one_probe_per_blob() {
    let files: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| (format!("f{i}"), format!("blob {i}").into_bytes()))
        .collect();
    let refs: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let rig = rig_with(&refs);
    let ino = rig.key("k").await;
    rig.core.readdir(ino).await.unwrap();
    for (name, data) in &files {
        assert_eq!(rig.attr("k", name).await.unwrap().size, data.len() as u64);
    }
    assert_eq!(rig.store.calls(Op::GetDir), 1);
    assert_eq!(rig.store.calls(Op::Probe), 50);
    assert_eq!(
        rig.store.calls(Op::Fetch),
        0,
        "nothing read, nothing fetched"
    );
}

#[tokio::test(start_paused = true)]
async fn a_download_in_flight_is_listed_with_its_entry_until_it_ends() {
    use crate::fs::transfers::Direction;
    let rig = Arc::new(rig_with(&[("a", b"some bytes")]));
    let ino = rig.attr("k", "a").await.unwrap().ino;
    assert!(rig.core.transfers.list().is_empty());
    let hold = rig.store.hold(Op::Fetch);
    let reader = {
        let rig = rig.clone();
        tokio::spawn(async move { rig.read(ino).await })
    };
    hold.wait_arrived(1).await;
    let list = rig.core.transfers.list();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].direction, Direction::Download);
    assert_eq!(
        (list[0].key.as_deref(), list[0].name.as_str()),
        (Some("k"), "a")
    );
    assert_eq!(list[0].total_bytes, Some(10), "the probed size");
    let status = rig.core.status().await;
    assert_eq!(status["transfers"][0]["name"], "a");
    assert_eq!(status["transfers"][0]["direction"], "download");
    hold.release();
    assert_eq!(reader.await.unwrap().unwrap(), b"some bytes");
    assert!(rig.core.transfers.list().is_empty());
    assert_eq!(rig.core.status().await["transfers"], serde_json::json!([]));
}

#[tokio::test(start_paused = true)]
async fn status_probes_the_servers_at_most_every_few_seconds() {
    use crate::fs::status::PROBE_EVERY;
    let rig = rig_with(&[]);
    let (dirs, probes) = (rig.store.calls(Op::GetDir), rig.store.calls(Op::Probe));
    let first = rig.core.status().await;
    assert_eq!(first["shadir"], "answers");
    assert_eq!(rig.store.calls(Op::GetDir), dirs + 1);
    assert_eq!(rig.store.calls(Op::Probe), probes + 1);
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(1)).await;
        let again = rig.core.status().await;
        assert_eq!(again["shadir"], "answers", "the last probe's answer");
    }
    assert_eq!(rig.store.calls(Op::GetDir), dirs + 1, "no request per read");
    tokio::time::advance(PROBE_EVERY).await;
    rig.core.status().await;
    assert_eq!(rig.store.calls(Op::GetDir), dirs + 2);
    assert_eq!(rig.store.calls(Op::Probe), probes + 2);
}
