//! The write path through real FUSE mounts (issue 4: "cp into a key uploads, signed,
//! published, and loud when it fails"): files copied into `MNT/<key>/` are uploaded,
//! signed and published when closed, byte-compatible with the reference client; a
//! failure makes `close()` fail and keeps the file in the outbox; a `kill -9` loses
//! nothing and publishes nothing half-done; the usual tools (`dd`, `rsync`, `tar`, `cp`
//! onto an existing name) work; the rules (no delete, no rename of published entries,
//! dot-files staged only) hold; memory stays bounded while uploading 1 GiB.
//!
//! Every mount is a `shacachefs mount -f` child guarded by `support::Mount`, which
//! always unmounts and ends the daemon. These tests fail (never skip) when FUSE or the
//! reference client (`$SHACACHEFS_VENV`, see `scripts/test`) is missing.

use crate::support;

use serde_json::Value;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{
    bounded, cli, cmd, cmd_long, is_prefix_of, list_dir, mkdir, outbox_items, outbox_named, read,
    reference_download, sha512_file, sha512_of, shacachefs_download, signed_config, wait_until,
    write_file, write_random_file, Mount, Server, LONG_TIMEOUT,
};

const MIB: u64 = 1 << 20;

/// A server over a store in a fresh work directory, and a signing configuration for it.
struct Setup {
    server: Server,
    cfg: PathBuf,
    // Declared last: removed after the server (and after every mount, which tests
    // declare later and so drop first).
    work: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Self::with_auth(None)
    }

    fn with_auth(upload_user: Option<(&str, &str)>) -> Setup {
        // Fail early, with the hint, when the reference client is missing.
        support::reference_venv();
        let work = support::tempdir();
        let server = Server::start_at(&work.path().join("store"), upload_user);
        let cfg = signed_config(&server, work.path(), "slapcache.cfg");
        Setup { server, cfg, work }
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.work.path().join(name);
        std::fs::create_dir_all(&d).expect("creating a work directory");
        d
    }

    fn cache(&self) -> PathBuf {
        self.work.path().join("cache")
    }

    fn mount(&self, extra: &[&str]) -> Mount {
        Mount::in_dir(&self.cfg, self.work.path(), extra)
    }
}

/// `cp SRC DEST` (the real command).
#[track_caller]
fn cp(src: &Path, dest: &Path) -> support::Output {
    cmd_long("cp", &[src, dest])
}

/// Panics with the daemon's log unless `out` succeeded.
#[track_caller]
fn assert_ok(out: &support::Output, m: &Mount) {
    assert!(
        out.success(),
        "{} failed:\n{}\n--- daemon log ---\n{}",
        out.what,
        out.describe(),
        m.log_text()
    );
}

/// Panics unless `out` failed with `message` (e.g. "Operation not permitted") on stderr.
#[track_caller]
fn assert_fails_with(out: &support::Output, messages: &[&str], m: &Mount) {
    let err = out.stderr_text();
    assert!(
        !out.success() && messages.iter().any(|msg| err.contains(msg)),
        "{} should fail with one of {messages:?}:\n{}\n--- daemon log ---\n{}",
        out.what,
        out.describe(),
        m.log_text()
    );
}

/// The one entry named `name` under `key` on shadir; its blob must be the file `src`.
#[track_caller]
fn published_entry(s: &Setup, key: &str, name: &str, src_sha: &str) -> support::PublishedEntry {
    let found = s.server.entries_named(key, name);
    assert_eq!(
        found.len(),
        1,
        "key {key}: expected one entry named {name:?}, shadir has {found:?}"
    );
    let e = found.into_iter().next().unwrap();
    assert_eq!(e.sha512(), src_sha, "key {key}: {name}: wrong sha512");
    assert!(
        !e.signature.is_empty(),
        "key {key}: {name}: the entry is not signed"
    );
    assert!(
        s.server.blob_exists(src_sha),
        "key {key}: {name}: the blob is not on shacache"
    );
    e
}

/// `getfattr -n user.shacachefs.pending --only-values FILE`, when it succeeds.
fn pending_reason(path: &Path) -> Option<String> {
    let out = cmd(
        "getfattr",
        &[
            OsString::from("-n"),
            "user.shacachefs.pending".into(),
            "--only-values".into(),
            path.into(),
        ],
    );
    out.success().then(|| out.stdout_text())
}

/// The reference client and `shacachefs download` both fetch `key`/`name`, and both get
/// the bytes whose SHA-512 is `sha`.
#[track_caller]
fn both_clients_download(s: &Setup, key: &str, name: &str, sha: &str) {
    let out_dir = s.dir("downloads");
    let by_ref = out_dir.join(format!("{name}.reference"));
    let r = reference_download(&s.cfg, key, name, &by_ref);
    assert!(
        r.success(),
        "networkcache-download of {key}/{name}:\n{}",
        r.describe()
    );
    assert_eq!(
        sha512_file(&by_ref),
        sha,
        "networkcache-download of {key}/{name}: other bytes"
    );
    let by_us = out_dir.join(format!("{name}.shacachefs"));
    shacachefs_download(&s.cfg, key, name, &by_us).assert_success();
    assert_eq!(
        sha512_file(&by_us),
        sha,
        "shacachefs download of {key}/{name}: other bytes"
    );
    let _ = std::fs::remove_file(by_ref);
    let _ = std::fs::remove_file(by_us);
}

// ---------------------------------------------------------------------------------------
// 1. cp uploads, signed and published.

#[test]
fn cp_publishes_signed_entries_both_clients_download() {
    let s = Setup::new();
    let src = s.dir("src");
    let key = "write-cp:files";
    let files = [("empty.bin", 0u64), ("one.bin", 1), ("big.bin", 200 * MIB)];
    for (i, (name, len)) in files.iter().enumerate() {
        write_random_file(&src.join(name), *len, 10 + i as u64);
    }
    let mut m = s.mount(&[]);
    mkdir(&m.path(key));
    for (name, len) in files {
        let path = src.join(name);
        let sha = sha512_file(&path);
        let started = Instant::now();
        assert_ok(&cp(&path, &m.path(key)), &m);
        if len == 0 {
            // `cp` of an empty file never writes: the file is published when its last
            // descriptor is released, which the kernel sends after close() returned, so
            // give it a moment (bounded).
            assert!(
                wait_until(Duration::from_secs(5), || !s
                    .server
                    .entries_named(key, name)
                    .is_empty()),
                "{name}: not published within 5 s of cp's end:\n{}",
                m.log_text()
            );
        }
        // close() returned only after the blob and the signed entry were on the servers.
        published_entry(&s, key, name, &sha);
        eprintln!(
            "cp of {name} ({len} bytes) published in {:.1?}",
            started.elapsed()
        );
        // The mount shows it as published, with its size. Polled (bounded): whether
        // this holds at once after close() is the subject of
        // `metadata_calls_right_after_close_see_the_published_file`.
        let file = m.path(&format!("{key}/{name}"));
        let mut seen = String::new();
        let shown = wait_until(Duration::from_secs(5), || {
            let p = file.clone();
            let size = bounded("stat", move || std::fs::metadata(p).map(|md| md.len()));
            let pending = pending_reason(&file);
            seen = format!("size {size:?}, pending {pending:?}");
            matches!(size, Ok(n) if n == len) && pending.is_none()
        });
        assert!(
            shown,
            "{name}: the mount should show it published, {len} bytes; saw {seen}\n{}",
            m.log_text()
        );
    }
    assert!(
        outbox_items(&s.cache()).is_empty(),
        "the outbox should be empty"
    );
    for (name, _) in files {
        both_clients_download(&s, key, name, &sha512_file(&src.join(name)));
    }
    // The signature is what the reference client checked: trusting another signer
    // only, it finds nothing.
    let other = support::NetworkcacheConfig::for_urls(&s.server.cache_url(), &s.server.dir_url())
        .signer_b()
        .write(s.work.path(), "signer-b.cfg");
    let none = reference_download(&other, key, "one.bin", &s.dir("x").join("one"));
    assert!(
        !none.success(),
        "the reference client trusting signer B only found an entry signed by A:\n{}",
        none.describe()
    );
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 2. Byte compatibility of the published entry.

#[test]
fn published_inner_json_is_python_json_dumps() {
    let s = Setup::new();
    let key = "write-json";
    let name = "données.bin";
    let src = s.dir("src").join(name);
    write_file(&src, b"byte compatibility\n");
    let sha = sha512_file(&src);
    let mut m = s.mount(&["--meta", "os=debian", "--meta", "note=café au lait"]);
    mkdir(&m.path(key));
    assert_ok(&cp(&src, &m.path(key)), &m);
    m.unmount();
    let entry = published_entry(&s, key, name, &sha);
    let keys: Vec<&str> = entry.meta.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["sha512", "file", "timestamp", "os", "note"],
        "field order of {:?}",
        entry.inner
    );
    assert!(entry.meta["timestamp"].is_f64(), "timestamp is a float");
    assert_eq!(entry.meta["note"], Value::from("café au lait"));
    let py = support::reference_venv().join("bin/python");
    let mut c = Command::new(py);
    c.args([
        "-c",
        "import json,sys; d=json.loads(sys.argv[1]); print(json.dumps(d), end='')",
        &entry.inner,
    ]);
    let out = support::run_with_timeout(c, support::CMD_TIMEOUT);
    out.assert_success();
    assert_eq!(
        out.stdout_text(),
        entry.inner,
        "the inner JSON differs from Python's json.dumps of the same data"
    );
    assert!(
        entry.inner.is_ascii(),
        "json.dumps escapes non-ASCII: {:?}",
        entry.inner
    );
}

// ---------------------------------------------------------------------------------------
// 3. Failure: the server is down.

/// Issue 14, offline writes: a configured key that was never listed stays writable
/// while the server is down (the copy's `close()` fails with EIO and the file is kept),
/// and `--retry-uploads` publishes it once the server is back, with nothing else done.
#[test]
fn an_offline_cp_into_a_known_key_is_published_when_the_server_returns() {
    let mut s = Setup::new();
    let src = s.dir("src");
    let key = "offline-known";
    write_random_file(&src.join("a.bin"), 40_000, 41);
    write_random_file(&src.join("b.bin"), 50_000, 42);
    let sha_a = sha512_file(&src.join("a.bin"));
    let sha_b = sha512_file(&src.join("b.bin"));
    s.server.stop();
    let m = s.mount(&["--retry-uploads", "--key", key, "--dir-ttl", "1"]);
    // Never listed, server down: the key is there (empty), names in it are absent.
    assert!(
        list_dir(&m.path(key)).iter().all(|n| n == ".entries.json"),
        "{:?}",
        list_dir(&m.path(key))
    );
    for name in ["a.bin", "b.bin"] {
        let out = cp(&src.join(name), &m.path(key));
        assert_fails_with(&out, &["Input/output error"], &m);
    }
    assert_eq!(outbox_items(&s.cache()).len(), 2, "both kept in the outbox");
    s.server.restart();
    // The first retry round comes 15 s after the mount; rounds that found the server
    // away did not use up the retry budget.
    let published = wait_until(Duration::from_secs(90), || {
        !s.server.entries_named(key, "a.bin").is_empty()
            && !s.server.entries_named(key, "b.bin").is_empty()
    });
    assert!(
        published,
        "not published after the server came back:\n{}",
        m.log_text()
    );
    published_entry(&s, key, "a.bin", &sha_a);
    published_entry(&s, key, "b.bin", &sha_b);
    assert!(
        wait_until(Duration::from_secs(10), || outbox_items(&s.cache())
            .is_empty()),
        "the outbox should be empty: {:?}",
        outbox_items(&s.cache())
    );
}

#[test]
fn server_down_close_fails_file_kept_then_outbox_retry_publishes() {
    let mut s = Setup::new();
    let src = s.dir("src");
    let key = "write-offline";
    write_random_file(&src.join("first.bin"), 1000, 31);
    write_random_file(&src.join("second.bin"), 3 * MIB + 17, 32);
    let second_sha = sha512_file(&src.join("second.bin"));
    let mut m = s.mount(&["--dir-ttl", "1"]);
    mkdir(&m.path(key));
    assert_ok(&cp(&src.join("first.bin"), &m.path(key)), &m);

    s.server.stop();
    let out = cp(&src.join("second.bin"), &m.path(key));
    assert_fails_with(&out, &["Input/output error"], &m);
    assert!(
        m.log_text().contains("second.bin"),
        "the daemon log should name the failed file:\n{}",
        m.log_text()
    );
    // Kept in the outbox, intact, and shown by `outbox list`.
    let items = outbox_named(&s.cache(), "second.bin");
    assert_eq!(items.len(), 1, "outbox: {items:?}");
    let data = PathBuf::from(items[0]["path"].as_str().expect("path"));
    assert_eq!(sha512_file(&data), second_sha, "outbox data differs");
    assert!(
        items[0]["last_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "the outbox item should say why it failed: {items:?}"
    );
    let listed = cli(&[
        OsString::from("outbox"),
        "list".into(),
        "--cache-dir".into(),
        s.cache().into(),
    ]);
    listed.assert_success();
    assert!(
        listed.stdout_text().contains("second.bin"),
        "outbox list:\n{}",
        listed.describe()
    );
    // Visible, as pending, in the key directory.
    assert!(
        list_dir(&m.path(key)).contains(&"second.bin".to_string()),
        "{:?}",
        list_dir(&m.path(key))
    );
    let reason = pending_reason(&m.path(&format!("{key}/second.bin")));
    assert!(
        reason.as_deref().is_some_and(|r| !r.is_empty()),
        "user.shacachefs.pending on the failed file: {reason:?}"
    );

    s.server.restart();
    let retried = cli(&[
        OsString::from("outbox"),
        "retry".into(),
        "-c".into(),
        s.cfg.clone().into(),
        "--cache-dir".into(),
        s.cache().into(),
    ]);
    retried.assert_success();
    assert!(
        outbox_items(&s.cache()).is_empty(),
        "the outbox should be empty after the retry"
    );
    published_entry(&s, key, "second.bin", &second_sha);
    let out_file = s.dir("downloads").join("second.bin");
    let r = reference_download(&s.cfg, key, "second.bin", &out_file);
    assert!(r.success(), "{}", r.describe());
    assert_eq!(sha512_file(&out_file), second_sha);
    // The running mount follows: once its listing is refreshed (--dir-ttl 1), the name
    // is the published entry, no longer pending.
    let path = m.path(&format!("{key}/second.bin"));
    let mut last = String::new();
    let shown = wait_until(Duration::from_secs(10), || {
        let p = path.clone();
        match bounded("reading second.bin", move || std::fs::read(p)) {
            Ok(data) if sha512_of(&data) == second_sha && pending_reason(&path).is_none() => true,
            Ok(data) => {
                last = format!("{} bytes, pending {:?}", data.len(), pending_reason(&path));
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    });
    assert!(
        shown,
        "after `outbox retry`, the mount should show {key}/second.bin as the published \
         entry within 10 s (dir-ttl 1 s); last attempt: {last}\n--- daemon log ---\n{}",
        m.log_text()
    );
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 4. Failure: the server refuses the upload.

#[test]
fn refused_upload_fails_with_eacces_and_keeps_the_file() {
    let s = Setup::with_auth(Some(("u", "p")));
    let key = "write-refused";
    let src = s.dir("src").join("refused.bin");
    write_random_file(&src, 2 * MIB + 5, 41);
    let sha = sha512_file(&src);
    let mut m = s.mount(&[]);
    mkdir(&m.path(key));
    let out = cp(&src, &m.path(key));
    assert_fails_with(&out, &["Permission denied"], &m);
    // Nothing published.
    match s.server.entries(key) {
        None => {}
        Some(list) => assert!(
            list.iter().all(|(inner, _)| !inner.contains(&sha)),
            "an entry was published although the upload was refused: {list:?}"
        ),
    }
    assert!(!s.server.blob_exists(&sha), "the blob reached shacache");
    // Kept, intact, and visible as pending.
    let items = outbox_named(&s.cache(), "refused.bin");
    assert_eq!(items.len(), 1, "outbox: {items:?}");
    let data = PathBuf::from(items[0]["path"].as_str().expect("path"));
    assert_eq!(
        sha512_file(&data),
        sha,
        "outbox data differs from the source"
    );
    let file = m.path(&format!("{key}/refused.bin"));
    assert!(
        pending_reason(&file).is_some(),
        "the refused file should be visible as pending"
    );
    // `rm` of a pending file drops it from the outbox.
    let rm = cmd("rm", &[&file]);
    assert_ok(&rm, &m);
    assert!(
        outbox_named(&s.cache(), "refused.bin").is_empty(),
        "rm of the pending file should drop it from the outbox"
    );
    assert!(!list_dir(&m.path(key)).contains(&"refused.bin".to_string()));
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 5. Crash in the middle of a large upload.

#[test]
fn kill_9_during_upload_loses_nothing_and_publishes_nothing() {
    const SIZE: u64 = 500 * MIB;
    let s = Setup::new();
    let key = "write-crash";
    let src = s.dir("src").join("big.bin");
    write_random_file(&src, SIZE, 51);
    let sha = sha512_file(&src);
    let mut m = s.mount(&[]);
    mkdir(&m.path(key));
    let mut copy = Command::new("cp")
        .arg(&src)
        .arg(m.path(key))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting cp");
    // Wait until the daemon's POST reached the server (an upload being received in
    // the store), then kill the daemon.
    let deadline = Instant::now() + LONG_TIMEOUT;
    let received = loop {
        if let Some(n) = s.server.upload_in_progress().filter(|n| *n > 0) {
            break n;
        }
        if let Ok(Some(status)) = copy.try_wait() {
            panic!(
                "cp ended ({status}) before an upload was seen on the server: the upload \
                 was too fast to catch or never started\n{}",
                m.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no upload started:\n{}",
            m.log_text()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    m.kill9();
    let status = support::wait_within(&mut copy, Duration::from_secs(30));
    eprintln!(
        "killed the daemon with {received} bytes received by the server; cp ended with {status:?}"
    );
    assert!(
        status.is_some_and(|s| !s.success()),
        "cp should fail when the daemon dies under it: {status:?}"
    );

    // The staged file is in the outbox: whole if cp had finished writing, else a prefix.
    let items = outbox_named(&s.cache(), "big.bin");
    assert_eq!(items.len(), 1, "outbox after the crash: {items:?}");
    assert_eq!(items[0]["key"], Value::from(key));
    let data = PathBuf::from(items[0]["path"].as_str().expect("path"));
    let len = std::fs::metadata(&data).expect("outbox data").len();
    if len == SIZE {
        assert_eq!(
            sha512_file(&data),
            sha,
            "outbox data differs from the source"
        );
    } else {
        assert!(
            len < SIZE && is_prefix_of(&data, &src),
            "outbox data ({len} bytes) is not a prefix of the source"
        );
    }
    // Nothing published for it: no entry, whatever happened to the blob.
    if let Some(list) = s.server.entries(key) {
        assert!(
            list.iter().all(|(inner, _)| !inner.contains(&sha)),
            "an entry was published by the killed upload: {list:?}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(10), || s
            .server
            .upload_in_progress()
            .is_none()),
        "the server kept the aborted upload's temporary file"
    );

    // Remounted, the file is there again, pending, with its size. What the mount shows
    // is checked last, so that the retry below runs whatever it shows.
    let mut m2 = s.mount(&[]);
    let file = m2.path(&format!("{key}/big.bin"));
    let view = pending_view(&m2.path(key), &file, len);
    let log2 = m2.log_text();
    m2.unmount();
    // Nothing is lost: `outbox retry` publishes it.
    if len == SIZE {
        cli(&[
            OsString::from("outbox"),
            "retry".into(),
            "-c".into(),
            s.cfg.clone().into(),
            "--cache-dir".into(),
            s.cache().into(),
        ])
        .assert_success();
        published_entry(&s, key, "big.bin", &sha);
        assert!(outbox_items(&s.cache()).is_empty());
    }
    if let Err(e) = view {
        panic!("after the crash and a remount on the same cache: {e}\n--- daemon log ---\n{log2}");
    }
}

/// Checks that `file` in the key directory `dir` is listed, marked pending, `len` long.
fn pending_view(dir: &Path, file: &Path, len: u64) -> Result<(), String> {
    let d = dir.to_path_buf();
    let names = bounded("listing the key", move || {
        std::fs::read_dir(d).map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
    })
    .map_err(|e| {
        format!(
            "the key directory {} (a key never published, holding a pending file) \
             cannot be listed: {e}",
            dir.display()
        )
    })?;
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    if !names.contains(&name) {
        return Err(format!("{name} is not listed: {names:?}"));
    }
    if pending_reason(file).is_none() {
        return Err(format!("{name} has no user.shacachefs.pending attribute"));
    }
    let f = file.to_path_buf();
    let size = bounded("stat", move || std::fs::metadata(f).map(|m| m.len()))
        .map_err(|e| format!("stat {name}: {e}"))?;
    if size != len {
        return Err(format!(
            "{name} is {size} bytes in the mount, {len} in the outbox"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 6. Write patterns of the usual tools. Each test writes through one mount, waits until
// the outbox is empty, and reads every published blob back through a fresh mount with
// an empty cache.

/// What a key must show once published: (key, name, sha512).
type Expected = Vec<(String, String, String)>;

/// Writes a directory of files of various sizes; returns (name, sha512) pairs.
fn tree_of_files(dir: &Path, seed: u64) -> Vec<(String, String)> {
    std::fs::create_dir_all(dir).unwrap();
    let sizes = [0u64, 1, 4095, 70_000, MIB + 3];
    sizes
        .iter()
        .enumerate()
        .map(|(i, len)| {
            let name = format!("f{i}-{len}.dat");
            let p = dir.join(&name);
            write_random_file(&p, *len, seed + i as u64);
            (name, sha512_file(&p))
        })
        .collect()
}

/// Empty files are published when released, just after close(): waits (bounded) until
/// the outbox is empty, then unmounts.
#[track_caller]
fn settle_and_unmount(s: &Setup, mut m: Mount) {
    assert!(
        wait_until(Duration::from_secs(10), || outbox_items(&s.cache())
            .is_empty()),
        "the outbox did not empty: {:?}\n--- daemon log ---\n{}",
        outbox_items(&s.cache()),
        m.log_text()
    );
    m.unmount();
}

/// A fresh mount with an empty cache shows every expected file with its bytes.
#[track_caller]
fn verify_in_fresh_mount(s: &Setup, expected: &Expected) {
    let fresh_cache = s.work.path().join("fresh-cache");
    let mut fresh = Mount::start(&s.cfg, &fresh_cache, &s.work.path().join("fresh"), &[]);
    for (key, name, sha) in expected {
        let names = list_dir(&fresh.path(key));
        assert!(
            names.contains(name),
            "{key}/{name} missing from a fresh mount: {names:?}"
        );
        let data = read(&fresh.path(&format!("{key}/{name}")));
        assert_eq!(&sha512_of(&data), sha, "{key}/{name}: other bytes");
    }
    fresh.unmount();
}

#[test]
fn dd_pieces_out_of_order_and_pwrite_through_one_descriptor() {
    let s = Setup::new();
    let key = "write-dd";
    let src = s.dir("src").join("dd.src");
    write_random_file(&src, 16 * 4096 + 123, 61);
    let order = [5usize, 0, 16, 3, 1, 12, 2, 9, 4, 15, 6, 11, 8, 10, 13, 14];
    // Block 7 is never written: zeros.
    let mut want = std::fs::read(&src).unwrap();
    want[7 * 4096..8 * 4096].fill(0);
    let want_sha = sha512_of(&want);
    let m = s.mount(&[]);
    mkdir(&m.path(key));
    // Separate dd runs write into a dot-name (staged only, so it can be opened again
    // without O_TRUNC: a published name could not be); renaming it publishes it.
    let part = m.path(&format!("{key}/.dd.part"));
    for n in order {
        let out = cmd(
            "dd",
            &[
                format!("if={}", src.display()),
                format!("of={}", part.display()),
                "bs=4k".into(),
                format!("skip={n}"),
                format!("seek={n}"),
                "count=1".into(),
                "conv=notrunc".into(),
                "status=none".into(),
            ],
        );
        assert_ok(&out, &m);
    }
    assert!(
        s.server.entries(key).is_none(),
        "the dot-name was published"
    );
    assert_ok(&cmd("mv", &[&part, &m.path(&format!("{key}/dd.bin"))]), &m);
    published_entry(&s, key, "dd.bin", &want_sha);
    // The same pieces through one descriptor (pwrite out of order), then one close.
    let script = "import os,sys\n\
        src=open(sys.argv[1],'rb').read()\n\
        fd=os.open(sys.argv[2],os.O_WRONLY|os.O_CREAT,0o644)\n\
        for n in map(int,sys.argv[3].split(',')):\n\
        \x20   os.pwrite(fd,src[n*4096:(n+1)*4096],n*4096)\n\
        os.close(fd)\n";
    let order_arg = order.map(|n| n.to_string()).join(",");
    let mut c = Command::new(support::reference_venv().join("bin/python"));
    c.arg("-c")
        .arg(script)
        .arg(&src)
        .arg(m.path(&format!("{key}/pwrite.bin")))
        .arg(&order_arg);
    assert_ok(&support::run_with_timeout(c, support::CMD_TIMEOUT), &m);
    published_entry(&s, key, "pwrite.bin", &want_sha);
    settle_and_unmount(&s, m);
    let out = s.dir("downloads").join("dd.bin");
    shacachefs_download(&s.cfg, key, "dd.bin", &out).assert_success();
    assert_eq!(sha512_file(&out), want_sha);
    verify_in_fresh_mount(
        &s,
        &vec![
            (key.into(), "dd.bin".into(), want_sha.clone()),
            (key.into(), "pwrite.bin".into(), want_sha),
        ],
    );
}

/// `rsync -a [--inplace] SRC/ MNT/KEY/` of a directory of files.
fn rsync_into_key(inplace: bool, key: &str, seed: u64) {
    let s = Setup::new();
    let tree_dir = s.dir("tree");
    let tree = tree_of_files(&tree_dir, seed);
    let m = s.mount(&[]);
    mkdir(&m.path(key));
    let mut args: Vec<OsString> = vec!["-a".into()];
    if inplace {
        args.push("--inplace".into());
    }
    args.push(format!("{}/", tree_dir.display()).into());
    args.push(format!("{}/", m.path(key).display()).into());
    assert_ok(&cmd_long("rsync", &args), &m);
    settle_and_unmount(&s, m);
    for (name, sha) in &tree {
        published_entry(&s, key, name, sha);
    }
    let expected: Expected = tree
        .into_iter()
        .map(|(n, h)| (key.to_string(), n, h))
        .collect();
    verify_in_fresh_mount(&s, &expected);
}

/// rsync --inplace writes the destination names directly, then sets modes and times
/// on the published files.
#[test]
fn rsync_inplace_of_a_directory() {
    rsync_into_key(true, "write-rsync-inplace", 70);
}

/// Plain rsync writes `.name.XXXXXX`, sets its modes and times, then renames it.
#[test]
fn rsync_of_a_directory_through_temporary_dot_names() {
    rsync_into_key(false, "write-rsync", 80);
}

/// tar -x of plain files (tar sets owners, modes and times after writing).
#[test]
fn tar_extract_into_a_key() {
    let s = Setup::new();
    let key = "write-tar";
    let tree_dir = s.dir("tree");
    let tree = tree_of_files(&tree_dir, 90);
    let archive = s.dir("src").join("archive.tar");
    let mut args: Vec<OsString> = vec![
        "-c".into(),
        "-f".into(),
        archive.clone().into(),
        "-C".into(),
        tree_dir.into(),
    ];
    args.extend(tree.iter().map(|(n, _)| OsString::from(n)));
    cmd("tar", &args).assert_success();
    let m = s.mount(&[]);
    mkdir(&m.path(key));
    let out = cmd_long(
        "tar",
        &[
            OsString::from("-x"),
            "-C".into(),
            m.path(key).into(),
            "-f".into(),
            archive.into(),
        ],
    );
    assert_ok(&out, &m);
    settle_and_unmount(&s, m);
    for (name, sha) in &tree {
        published_entry(&s, key, name, sha);
    }
    let expected: Expected = tree
        .into_iter()
        .map(|(n, h)| (key.to_string(), n, h))
        .collect();
    verify_in_fresh_mount(&s, &expected);
}

/// cp onto an existing name publishes a new version: the bare name shows it, the old
/// blob stays under `NAME~<12 hex>`.
#[test]
fn cp_onto_an_existing_name_publishes_a_new_version() {
    let s = Setup::new();
    let key = "write-version";
    let (v1, v2) = (s.dir("v1"), s.dir("v2"));
    write_random_file(&v1.join("name.bin"), 10_000, 101);
    write_random_file(&v2.join("name.bin"), 20_000, 102);
    let (sha1, sha2) = (
        sha512_file(&v1.join("name.bin")),
        sha512_file(&v2.join("name.bin")),
    );
    let m = s.mount(&[]);
    mkdir(&m.path(key));
    assert_ok(&cp(&v1.join("name.bin"), &m.path(key)), &m);
    assert_ok(&cp(&v2.join("name.bin"), &m.path(key)), &m);
    assert_eq!(s.server.entries_named(key, "name.bin").len(), 2);
    let old_name = format!("name.bin~{}", &sha1[..12]);
    let names = list_dir(&m.path(key));
    assert!(
        names.contains(&"name.bin".to_string()) && names.contains(&old_name),
        "after cp onto an existing name, expected name.bin and {old_name}: {names:?}"
    );
    assert_eq!(
        sha512_of(&read(&m.path(&format!("{key}/name.bin")))),
        sha2,
        "the bare name should show the new content at once"
    );
    assert_eq!(
        sha512_of(&read(&m.path(&format!("{key}/{old_name}")))),
        sha1,
        "the old version"
    );
    settle_and_unmount(&s, m);
    verify_in_fresh_mount(
        &s,
        &vec![
            (key.into(), "name.bin".into(), sha2),
            (key.into(), old_name, sha1),
        ],
    );
}

/// Metadata calls right after close() (what rsync --inplace and tar do) see the
/// published file: `utime`, `stat` and the xattrs on the name that was just written.
#[test]
fn metadata_calls_right_after_close_see_the_published_file() {
    let s = Setup::new();
    let key = "write-after-close";
    let m = s.mount(&[]);
    mkdir(&m.path(key));
    // One process, so that nothing but the daemon stands between close() and the next
    // call. Each failure is recorded as "size:call:error".
    let script = r#"
import json, os, sys
d = sys.argv[1]
fails = []
for i in range(60):
    for size in (0, 5000):
        p = os.path.join(d, "x%d-%d" % (i, size))
        with open(p, "wb") as f:
            f.write(os.urandom(size))
        for call, f in (("utime", lambda: os.utime(p, (1, 1))),
                        ("stat", lambda: os.stat(p)),
                        ("chmod", lambda: os.chmod(p, 0o600))):
            try:
                f()
            except OSError as e:
                fails.append("%d:%s:%s" % (size, call, e.strerror))
print(json.dumps(fails))
"#;
    let mut c = Command::new(support::reference_venv().join("bin/python"));
    c.arg("-c").arg(script).arg(m.path(key));
    let out = support::run_with_timeout(c, support::LONG_TIMEOUT);
    assert_ok(&out, &m);
    let fails: Vec<String> = serde_json::from_slice(&out.stdout).expect("JSON list");
    let log = m.log_text();
    settle_and_unmount(&s, m);
    assert!(
        fails.is_empty(),
        "{} of 360 metadata calls made right after close() failed (size:call:error): \
         {fails:?}\n--- daemon log ---\n{log}",
        fails.len()
    );
}

// ---------------------------------------------------------------------------------------
// 7. The rules.

#[test]
fn rules_no_delete_no_rename_dot_files_staged() {
    let s = Setup::new();
    let key = "write-rules";
    let src = s.dir("src");
    write_random_file(&src.join("pub.bin"), 5000, 71);
    write_random_file(&src.join("hidden.bin"), 7000, 72);
    let hidden_sha = sha512_file(&src.join("hidden.bin"));
    let mut m = s.mount(&[]);
    mkdir(&m.path(key));
    assert_ok(&cp(&src.join("pub.bin"), &m.path(key)), &m);
    let published = m.path(&format!("{key}/pub.bin"));
    let pub_sha = sha512_file(&src.join("pub.bin"));

    // No delete, no rename of published entries.
    assert_fails_with(
        &cmd("rm", &[OsString::from("-f"), published.clone().into()]),
        &["Operation not permitted"],
        &m,
    );
    assert_fails_with(
        &cmd("mv", &[&published, &m.path(&format!("{key}/moved.bin"))]),
        &["Operation not permitted"],
        &m,
    );
    // Writing into a published entry without O_TRUNC (dd conv=notrunc) is refused.
    assert_fails_with(
        &cmd(
            "dd",
            &[
                "if=/dev/zero".to_string(),
                format!("of={}", published.display()),
                "bs=1".into(),
                "count=1".into(),
                "seek=10".into(),
                "conv=notrunc".into(),
                "status=none".into(),
            ],
        ),
        &["Operation not permitted"],
        &m,
    );
    assert_eq!(sha512_of(&read(&published)), pub_sha, "pub.bin changed");
    // No files at the root.
    assert_fails_with(
        &cmd("touch", &[m.path("newfile")]),
        &["Operation not permitted", "Permission denied"],
        &m,
    );
    // Mode and time changes are accepted and ignored.
    assert_ok(
        &cmd("chmod", &[OsString::from("600"), published.clone().into()]),
        &m,
    );
    assert_ok(
        &cmd("touch", &[OsString::from("-m"), published.clone().into()]),
        &m,
    );
    let mode = bounded("stat", {
        let p = published.clone();
        move || {
            std::fs::metadata(p)
                .map(|md| std::os::unix::fs::PermissionsExt::mode(&md.permissions()))
        }
    })
    .expect("stat pub.bin");
    assert_eq!(mode & 0o777, 0o444, "published files stay 0444");
    assert_eq!(s.server.entries_named(key, "pub.bin").len(), 1);

    // A dot-name is staged, not published, when closed...
    let dot = m.path(&format!("{key}/.hidden.bin"));
    assert_ok(&cp(&src.join("hidden.bin"), &dot), &m);
    assert!(
        s.server.entries_named(key, ".hidden.bin").is_empty(),
        "a dot-file was published at close"
    );
    assert_eq!(outbox_named(&s.cache(), ".hidden.bin").len(), 1);
    assert!(list_dir(&m.path(key)).contains(&".hidden.bin".to_string()));
    // ... and renaming it to a plain name publishes it (rename returns the result).
    assert_ok(
        &cmd("mv", &[&dot, &m.path(&format!("{key}/shown.bin"))]),
        &m,
    );
    published_entry(&s, key, "shown.bin", &hidden_sha);
    assert!(outbox_named(&s.cache(), ".hidden.bin").is_empty());
    assert!(outbox_named(&s.cache(), "shown.bin").is_empty());
    assert_eq!(
        sha512_of(&read(&m.path(&format!("{key}/shown.bin")))),
        hidden_sha
    );

    // `rm` of a pending file drops it from the outbox.
    let scratch = m.path(&format!("{key}/.scratch"));
    assert_ok(&cp(&src.join("hidden.bin"), &scratch), &m);
    assert_eq!(outbox_named(&s.cache(), ".scratch").len(), 1);
    assert_ok(&cmd("rm", &[&scratch]), &m);
    assert!(
        outbox_named(&s.cache(), ".scratch").is_empty(),
        "rm of a pending file should drop it from the outbox"
    );
    assert!(!list_dir(&m.path(key)).contains(&".scratch".to_string()));
    assert!(s.server.entries_named(key, ".scratch").is_empty());
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 8. Memory.

#[test]
fn peak_rss_uploading_1gib_stays_under_64mib() {
    const SIZE: u64 = 1 << 30;
    let s = Setup::new();
    let key = "write-rss";
    let src = s.dir("src").join("huge.bin");
    write_random_file(&src, SIZE, 81);
    let sha = sha512_file(&src);
    let mut m = s.mount(&[]);
    mkdir(&m.path(key));
    let before = m.peak_rss_kib();
    let started = Instant::now();
    assert_ok(&cp(&src, &m.path(key)), &m);
    let took = started.elapsed();
    published_entry(&s, key, "huge.bin", &sha);
    let peak = m.peak_rss_kib();
    eprintln!(
        "peak RSS (VmHWM) of the mount daemon: {before} KiB after mounting, {peak} KiB \
         ({:.1} MiB) after a `cp` of 1 GiB into the mount (write, hash, upload, publish: \
         {took:.1?})",
        peak as f64 / 1024.0
    );
    m.unmount();
    assert!(
        peak < 64 * 1024,
        "daemon peak RSS {peak} KiB is not under 64 MiB"
    );
}

// ---------------------------------------------------------------------------------------
// Uploads that run while the file is written.

/// Lines of the daemon's log that contain `needle`.
fn log_lines(m: &Mount, needle: &str) -> usize {
    log_lines_since(m, 0, needle)
}

/// Lines of the daemon's log after its first `from` bytes that contain `needle`.
fn log_lines_since(m: &Mount, from: usize, needle: &str) -> usize {
    let text = m.log_text();
    text.get(from..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// The daemon's log lines about uploads (what a failed count is explained by).
fn upload_lines(m: &Mount) -> String {
    m.log_text()
        .lines()
        .filter(|l| l.contains("upload") || l.contains("POST") || l.contains("outbox item"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A large `cp` is sent while it is written: one POST, started before the close, and
/// close() then waits only for its end. A file rewritten behind its end while being
/// sent that way is sent again, whole, at close: the blob on shacache is the final
/// content, which both clients download.
#[test]
fn large_files_upload_while_written_and_rewrites_are_sent_again() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let s = Setup::new();
    let src = s.dir("src");
    let key = "write-early";
    let path = src.join("big.bin");
    write_random_file(&path, 40 * MIB, 71);
    let sha = sha512_file(&path);
    let mut m = s.mount(&["--log-level", "debug"]);
    mkdir(&m.path(key));

    assert_ok(&cp(&path, &m.path(key)), &m);
    published_entry(&s, key, "big.bin", &sha);
    let log = m.log_text();
    assert_eq!(
        log_lines(&m, "upload started while the file is written"),
        1,
        "the upload did not start during the copy:\n{log}"
    );
    assert_eq!(
        log_lines(&m, "method=POST"),
        1,
        "the blob was sent more than once (or not at all):\n{log}"
    );
    assert_eq!(log_lines(&m, "sending again"), 0, "{log}");
    both_clients_download(&s, key, "big.bin", &sha);

    // 12 MiB in order (the upload starts at 8), then the first bytes rewritten, then
    // more in order: what is published is the file as closed.
    let mark = m.log_text().len();
    let dest = m.path(&format!("{key}/rewritten.bin"));
    let mut expected = Vec::new();
    let mut f = std::fs::File::create(&dest).expect("create in the mount");
    for i in 0..12u8 {
        let chunk = vec![i; MIB as usize];
        f.write_all(&chunk).expect("write");
        expected.extend_from_slice(&chunk);
    }
    f.write_all_at(b"rewritten", 0).expect("pwrite at 0");
    expected[..9].copy_from_slice(b"rewritten");
    let tail = vec![0xee; 3 * MIB as usize];
    f.write_all(&tail).expect("write after the rewrite");
    expected.extend_from_slice(&tail);
    support::close_checked(f).unwrap_or_else(|e| panic!("close() failed: {e}\n{}", m.log_text()));
    let want = sha512_of(&expected);
    published_entry(&s, key, "rewritten.bin", &want);
    both_clients_download(&s, key, "rewritten.bin", &want);
    // The upload started during the writes (if it started) was abandoned, with no
    // answer and so no log line; the whole file was then sent once at close.
    assert_eq!(
        log_lines_since(&m, mark, "already sent: waiting for the upload"),
        0,
        "{}",
        upload_lines(&m)
    );
    assert_eq!(
        log_lines_since(&m, mark, "method=POST"),
        1,
        "the rewritten file was not sent again whole:\n{}",
        upload_lines(&m)
    );
    assert_eq!(read(&m.path(&format!("{key}/rewritten.bin"))), expected);

    // rsync's way: a temporary dot name written in order, closed, then renamed. The
    // upload started during the writes survives the rename and is the one used.
    let mark = m.log_text().len();
    let tmp = m.path(&format!("{key}/.synced.bin.XXXXXX"));
    let data: Vec<u8> = (0..10 * MIB as usize).map(|i| (i % 251) as u8).collect();
    let mut f = std::fs::File::create(&tmp).expect("create the temporary file");
    f.write_all(&data).expect("write");
    support::close_checked(f).unwrap_or_else(|e| panic!("close() failed: {e}\n{}", m.log_text()));
    std::fs::rename(&tmp, m.path(&format!("{key}/synced.bin")))
        .unwrap_or_else(|e| panic!("rename failed: {e}\n{}", m.log_text()));
    let want = sha512_of(&data);
    published_entry(&s, key, "synced.bin", &want);
    for (needle, n) in [
        ("upload started while the file is written", 1),
        ("already sent: waiting for the upload", 1),
        ("method=POST", 1),
        ("sending again", 0),
    ] {
        assert_eq!(
            log_lines_since(&m, mark, needle),
            n,
            "renamed file: {needle:?}:\n{}",
            upload_lines(&m)
        );
    }
    m.unmount();
}

/// Writing over an entry that a reader holds open through FUSE passthrough fails with
/// ETXTBSY (the kernel cannot serve one inode both ways) and publishes nothing; once the
/// reader is gone, the same copy publishes the new version.
#[test]
fn writing_over_an_entry_open_with_passthrough_is_etxtbsy_then_works() {
    use std::io::Read;
    let s = Setup::new();
    let src = s.dir("src");
    let key = "write-busy";
    let first = src.join("first.bin");
    let second = src.join("second.bin");
    write_random_file(&first, 3 * MIB, 81);
    write_random_file(&second, 2 * MIB, 82);
    let mut m = s.mount(&[]);
    mkdir(&m.path(key));
    let dest = m.path(&format!("{key}/data.bin"));
    assert_ok(&cp(&first, &dest), &m);
    let passthrough = m.log_text().contains("served with FUSE passthrough");

    let mut reader = std::fs::File::open(&dest).expect("open for reading");
    let mut buf = vec![0u8; 4096];
    reader.read_exact(&mut buf).expect("read");
    let busy = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&dest);
    if passthrough {
        let e = busy.expect_err("a write open succeeded while passthrough holds the inode");
        assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY), "{e}");
    } else {
        // Without passthrough nothing stops it: the new version is staged.
        support::close_checked(busy.expect("write open")).expect("close");
    }
    drop(reader);
    std::thread::sleep(Duration::from_millis(200)); // the kernel's release is asynchronous
    let entries = s.server.entries_named(key, "data.bin");
    assert!(
        entries.iter().all(|e| e.sha512() != sha512_of(b"")),
        "an empty version was published: {entries:?}"
    );
    // The reader's release reaches the daemon a moment after its close (bounded wait).
    let mut out = cp(&second, &dest);
    for _ in 0..25 {
        if out.success() || !out.describe().contains("busy") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
        out = cp(&second, &dest);
    }
    assert_ok(&out, &m);
    assert_eq!(read(&dest), read(&second));
    m.unmount();
}
