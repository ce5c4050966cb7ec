//! The list and its index: appends, repairs, conversions, readers during appends.

use super::*;

#[test]
fn append_dedups_and_keeps_unknown_items() {
    let dir = tempfile::tempdir().unwrap();
    let e = RawEntry {
        inner: "{\"sha512\": \"x\"}".into(),
        signature: String::new(),
    };
    assert!(append_entry(dir.path(), b"k", &e).unwrap());
    assert!(!append_entry(dir.path(), b"k", &e).unwrap());
    let path = key_path(dir.path(), "k");
    fs::write(&path, r#"[["a", "b"], 3]"#).unwrap();
    assert!(append_entry(dir.path(), b"k", &e).unwrap());
    let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);
    fs::write(&path, "{}").unwrap();
    assert!(matches!(
        append_entry(dir.path(), b"k", &e),
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(fs::read(&path).unwrap(), b"{}");
}

/// What GET sends for the list at `path` (the same rule as the handler).
fn served(path: &Path) -> Vec<u8> {
    use std::os::unix::fs::MetadataExt;
    let header = read_index_header(path).unwrap();
    let bytes = fs::read(path).unwrap();
    let meta = fs::metadata(path).unwrap();
    match header.and_then(|h| h.committed_prefix(meta.ino(), meta.len())) {
        Some(n) => [&bytes[..n as usize], b"]"].concat(),
        None => bytes,
    }
}

fn pair(i: usize) -> RawEntry {
    RawEntry {
        inner: format!("{{\"sha512\": \"{i}\"}}"),
        signature: "c2ln".into(),
    }
}

fn dumps_all(items: &[RawEntry]) -> Vec<u8> {
    let v = Value::Array(
        items
            .iter()
            .map(|e| {
                Value::Array(vec![
                    Value::String(e.inner.clone()),
                    Value::String(e.signature.clone()),
                ])
            })
            .collect(),
    );
    pyjson::dumps(&v).into_bytes()
}

#[test]
fn appends_in_place_and_serves_json_dumps() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path = key_path(dir.path(), "k");
    let items: Vec<RawEntry> = (0..5).map(pair).collect();
    assert!(append_entry(dir.path(), b"k", &items[0]).unwrap());
    let ino = fs::metadata(&path).unwrap().ino();
    for e in &items[1..] {
        assert!(append_entry(dir.path(), b"k", e).unwrap());
        assert!(!append_entry(dir.path(), b"k", e).unwrap());
    }
    assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
    // At rest the file itself is the list, exactly as json.dumps writes it.
    assert_eq!(fs::read(&path).unwrap(), dumps_all(&items));
    assert_eq!(served(&path), dumps_all(&items));
}

#[test]
fn an_append_cut_short_is_never_served_and_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_path(dir.path(), "k");
    let items: Vec<RawEntry> = (0..3).map(pair).collect();
    for e in &items[..2] {
        append_entry(dir.path(), b"k", e).unwrap();
    }
    // A crash in the middle of the next append: the closing bracket overwritten,
    // half an item written, the index header not updated.
    let mut torn = fs::read(&path).unwrap();
    torn.pop();
    torn.extend_from_slice(b", [\"{\\\"sha512\\\": \\\"x");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&torn, 0).unwrap();
    }
    assert_eq!(served(&path), dumps_all(&items[..2]));
    // The next PUT rebuilds from the committed part and appends.
    assert!(append_entry(dir.path(), b"k", &items[2]).unwrap());
    assert_eq!(served(&path), dumps_all(&items));
    assert_eq!(fs::read(&path).unwrap(), dumps_all(&items));
    assert!(!append_entry(dir.path(), b"k", &items[0]).unwrap());
}

#[test]
fn lists_without_an_index_are_served_as_they_are_and_converted() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_path(dir.path(), "k");
    let items: Vec<RawEntry> = (0..3).map(pair).collect();
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    // Written by an older server (or by hand, compact).
    fs::write(
        &path,
        serde_json::to_string(&serde_json::json!([
            [items[0].inner, items[0].signature],
            [items[1].inner, items[1].signature]
        ]))
        .unwrap(),
    )
    .unwrap();
    let compact = fs::read(&path).unwrap();
    assert_eq!(served(&path), compact);
    assert!(!append_entry(dir.path(), b"k", &items[1]).unwrap());
    assert!(append_entry(dir.path(), b"k", &items[2]).unwrap());
    assert_eq!(served(&path), dumps_all(&items));
    // An index removed is rebuilt.
    fs::remove_file(index_path(&path)).unwrap();
    assert!(!append_entry(dir.path(), b"k", &items[2]).unwrap());
    // Empty and blank lists.
    for blank in ["", "  \n", "[]"] {
        fs::write(&path, blank).unwrap();
        assert!(append_entry(dir.path(), b"k", &items[0]).unwrap());
        assert_eq!(served(&path), dumps_all(&items[..1]));
    }
}

#[test]
fn readers_never_see_an_append_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let path = key_path(dir.path(), "k");
    append_entry(dir.path(), b"k", &pair(0)).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let root = dir.path().to_path_buf();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let pad = "p".repeat(64 << 10);
            for i in 1..300 {
                let mut e = pair(i);
                e.inner.push_str(&pad);
                append_entry(&root, b"k", &e).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut reads = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let body = served(&path);
        assert!(
            body.ends_with(b"]"),
            "read {reads}: ends with {:?}",
            &body[body.len().saturating_sub(20)..]
        );
        reads += 1;
    }
    writer.join().unwrap();
    assert!(reads > 0);
}
