//! Pinning through the `user.shacachefs.pin` attribute: fetch-and-pin, who may, which
//! nodes, and every other attribute refused with EOPNOTSUPP.

use super::*;
use crate::store::memory::Op;
use std::ffi::OsStr;

const PIN: &str = crate::fs::xattr::PIN_XATTR;
/// The mount's owner is uid 0 in the rig (`FsOptions::default()`); someone else:
const OTHER_UID: u32 = 1000;

/// A store holding key `k` with `old` and `new` (timestamps 1 and 2: `latest` is `new`).
fn store() -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let a = signer(true);
    for (ts, file, data) in [(1, "old", b"old bytes" as &[u8]), (2, "new", b"new bytes")] {
        let sha = store.add_blob(data);
        let mut meta = Map::new();
        meta.insert("file".into(), Value::String(file.into()));
        meta.insert("timestamp".into(), Value::from(ts));
        let inner = crate::wire::build_inner(&sha, &meta);
        store.add_entry(
            "k",
            RawEntry {
                signature: a.sign(&inner),
                inner,
            },
        );
    }
    store
}

async fn pin_value(rig: &Rig, ino: u64) -> Vec<u8> {
    rig.core
        .xattr(ino, OsStr::new(PIN))
        .await
        .expect("pin attribute")
}

#[tokio::test(start_paused = true)]
async fn setting_the_pin_fetches_verifies_and_pins_the_blob() {
    let rig = Rig::with(store(), |_| {});
    let ino = rig.attr("k", "old").await.unwrap().ino;
    let sha = Sha512::of(b"old bytes");
    assert_eq!(pin_value(&rig, ino).await, b"0");
    assert_eq!(rig.store.calls(Op::Fetch), 0);
    rig.core
        .set_xattr(ino, OsStr::new(PIN), b"1", 0)
        .await
        .expect("pin");
    assert_eq!(rig.store.calls(Op::Fetch), 1, "fetched once, to pin it");
    assert!(rig.core.cache().lookup_blob(&sha).is_some());
    assert!(rig.core.cache().is_pinned(&sha));
    assert_eq!(pin_value(&rig, ino).await, b"1");
    let listed = rig.core.xattrs(ino).await.unwrap();
    assert!(listed.iter().any(|(n, v)| n == PIN && v == b"1"));
    // Pinning again costs no download.
    rig.core
        .set_xattr(ino, OsStr::new(PIN), b"1", 0)
        .await
        .unwrap();
    assert_eq!(rig.store.calls(Op::Fetch), 1);
    // The status document counts it.
    let status = rig.core.status().await;
    assert_eq!(status["cache"]["pinned_bytes"], 9);
    // Removing the attribute (or setting 0) unpins; removing it again is harmless.
    rig.core
        .remove_xattr(ino, OsStr::new(PIN), 0)
        .await
        .unwrap();
    assert!(!rig.core.cache().is_pinned(&sha));
    assert_eq!(pin_value(&rig, ino).await, b"0");
    rig.core
        .remove_xattr(ino, OsStr::new(PIN), 0)
        .await
        .unwrap();
    rig.core
        .set_xattr(ino, OsStr::new(PIN), b"1", 0)
        .await
        .unwrap();
    rig.core
        .set_xattr(ino, OsStr::new(PIN), b"0", 0)
        .await
        .unwrap();
    assert!(!rig.core.cache().is_pinned(&sha));
}

#[tokio::test(start_paused = true)]
async fn latest_and_sha512_files_pin_their_blob() {
    let rig = Rig::with(store(), |_| {});
    let latest = rig.attr("k", "latest").await.unwrap().ino;
    rig.core
        .set_xattr(latest, OsStr::new(PIN), b"1", 0)
        .await
        .unwrap();
    assert!(rig.core.cache().is_pinned(&Sha512::of(b"new bytes")));
    assert!(!rig.core.cache().is_pinned(&Sha512::of(b"old bytes")));
    let shadir = rig.core.lookup(ROOT_INO, ".sha512").await.unwrap().ino;
    let sha = Sha512::of(b"old bytes");
    let blob = rig.core.lookup(shadir, sha.hex()).await.unwrap().ino;
    rig.core
        .set_xattr(blob, OsStr::new(PIN), b"1", 0)
        .await
        .unwrap();
    assert!(rig.core.cache().is_pinned(&sha));
    assert_eq!(pin_value(&rig, blob).await, b"1");
}

#[tokio::test(start_paused = true)]
async fn only_the_owner_and_root_may_pin_and_only_the_pin_can_be_set() {
    let rig = Rig::with(store(), |o| o.uid = 500);
    let ino = rig.attr("k", "old").await.unwrap().ino;
    let sha = Sha512::of(b"old bytes");
    let e = rig
        .core
        .set_xattr(ino, OsStr::new(PIN), b"1", OTHER_UID)
        .await;
    assert_eq!(e.unwrap_err().errno(), libc::EPERM);
    let e = rig.core.remove_xattr(ino, OsStr::new(PIN), OTHER_UID).await;
    assert_eq!(e.unwrap_err().errno(), libc::EPERM);
    assert!(!rig.core.cache().is_pinned(&sha));
    assert_eq!(
        rig.store.calls(Op::Fetch),
        0,
        "nothing fetched for a refused pin"
    );
    rig.core
        .set_xattr(ino, OsStr::new(PIN), b"1", 500)
        .await
        .unwrap();
    rig.core
        .remove_xattr(ino, OsStr::new(PIN), 0)
        .await
        .unwrap();
    // Other attributes, other values, other nodes.
    for name in ["user.foo", "user.shacache.sha512", "security.selinux"] {
        let e = rig.core.set_xattr(ino, OsStr::new(name), b"x", 0).await;
        assert_eq!(e.unwrap_err().errno(), libc::EOPNOTSUPP, "{name}");
        let e = rig.core.remove_xattr(ino, OsStr::new(name), 0).await;
        assert_eq!(e.unwrap_err().errno(), libc::EOPNOTSUPP, "{name}");
    }
    let e = rig.core.set_xattr(ino, OsStr::new(PIN), b"yes", 0).await;
    assert_eq!(e.unwrap_err().errno(), libc::EINVAL);
    let key = rig.key("k").await;
    let json = rig.attr("k", ".entries.json").await.unwrap().ino;
    for node in [ROOT_INO, key, json] {
        let e = rig.core.set_xattr(node, OsStr::new(PIN), b"1", 0).await;
        assert_eq!(e.unwrap_err().errno(), libc::EOPNOTSUPP);
    }
}

#[tokio::test(start_paused = true)]
async fn a_pin_outlives_a_remount() {
    let rig = Rig::with(store(), |_| {});
    let ino = rig.attr("k", "new").await.unwrap().ino;
    rig.core
        .set_xattr(ino, OsStr::new(PIN), b"1", 0)
        .await
        .unwrap();
    let rig = rig.remount();
    let ino = rig.attr("k", "new").await.unwrap().ino;
    assert_eq!(pin_value(&rig, ino).await, b"1");
    assert_eq!(rig.read(ino).await.unwrap(), b"new bytes");
}
