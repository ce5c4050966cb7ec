//! Trust fails closed and secrets stay private: a configured certificate list with no
//! usable certificate refuses to run (`ls`, `download`, `mount`); shadir answers parsed
//! with Python's leniency; `outbox retry`/`drop` and what they report.

use crate::support;
use crate::support::faulty;

use faulty::{Background, Fault, Rule};
use shacachefs::wire::RawEntry;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use support::*;

/// A key holding one unsigned entry, published with a configuration without certificates.
fn publish_unsigned(srv: &Server, key: &str) {
    let dir = srv.scratch();
    let plain = srv.config().write(&dir, "plain.cfg");
    let file = dir.join("payload.txt");
    std::fs::write(&file, b"unsigned payload\n").unwrap();
    run(shacachefs([
        "upload",
        "-c",
        plain.to_str().unwrap(),
        "-k",
        key,
        "-f",
        file.to_str().unwrap(),
        "file=payload.txt",
    ]))
    .assert_success();
}

/// The first lines of a PEM certificate, without its end line.
fn truncated_pem(dir: &Path) -> std::path::PathBuf {
    let pem = std::fs::read_to_string(fixture("signature/signer-a.crt")).unwrap();
    let cut: Vec<&str> = pem.lines().take(4).collect();
    let path = dir.join("truncated.crt");
    std::fs::write(&path, cut.join("\n") + "\n").unwrap();
    path
}

fn mounted(mnt: &Path) -> bool {
    let want = std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_path_buf());
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == want.to_str())
}

#[test]
fn unusable_certificate_list_fails_closed() {
    let srv = Server::start();
    publish_unsigned(&srv, "trust-key");
    let dir = srv.scratch();
    let cfg = srv
        .config()
        .trust(fixture("signature/ec-p256.crt"))
        .trust(truncated_pem(&dir))
        .write(&dir, "bad-list.cfg");
    let cfg = cfg.to_str().unwrap();

    for args in [
        vec!["ls", "-c", cfg, "trust-key"],
        vec!["download", "-c", cfg, "-k", "trust-key", "-l"],
    ] {
        let out = run(shacachefs(&args));
        out.assert_failure();
        let err = out.stderr_text();
        assert!(
            out.stdout.is_empty(),
            "{args:?} showed an unsigned entry:\n{}",
            out.describe()
        );
        for needle in [
            "none of the 2 certificate(s) in signature-certificate-list is usable",
            "certificate #1 of 2",
            "shacachefs-fixture-ec",
            "certificate #2 of 2",
        ] {
            assert!(err.contains(needle), "{args:?}: no {needle:?} in:\n{err}");
        }
    }

    // The mount refuses to start; nothing is mounted.
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let cache = dir.join("cache");
    let out = run_with_timeout(
        shacachefs([
            "mount",
            "-c",
            cfg,
            "--cache-dir",
            cache.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ]),
        std::time::Duration::from_secs(60),
    );
    if mounted(&mnt) {
        let _ = std::process::Command::new("umount").arg(&mnt).status();
    }
    out.assert_failure();
    assert!(
        out.stderr_text()
            .contains("signature-certificate-list is usable"),
        "{}",
        out.describe()
    );

    // One usable certificate among unusable ones: runs, reports the others by position,
    // and hides the unsigned entry.
    let cfg_mixed = srv
        .config()
        .trust(fixture("signature/ec-p256.crt"))
        .trust(fixture("signature/signer-a.crt"))
        .write(&dir, "mixed.cfg");
    let out = run(shacachefs([
        "ls",
        "-c",
        cfg_mixed.to_str().unwrap(),
        "trust-key",
    ]));
    out.assert_success();
    assert!(
        out.stderr_text()
            .contains("certificate #1 of 2 is unusable"),
        "{}",
        out.describe()
    );
    assert!(out.stdout.is_empty(), "{}", out.describe());
    assert!(
        out.stderr_text().contains("1 entries hidden"),
        "{}",
        out.describe()
    );
}

/// A listing holding a lone UTF-16 surrogate escape (which Python's `json` accepts):
/// `ls` works, only that entry is dropped (with its reason), and an entry whose inner
/// JSON holds one is read as Python reads it.
#[test]
fn lone_surrogate_drops_only_its_entry() {
    let srv = Background::start();
    let good = srv.add_blob(b"good\n");
    let odd = srv.add_blob(b"odd metadata\n");
    let bad = srv.add_blob(b"bad\n");
    let pair = |inner: String| {
        RawEntry {
            inner,
            signature: String::new(),
        }
        .to_put_body()
    };
    let good_pair = pair(format!(
        r#"{{"sha512": "{}", "filename": "good.txt"}}"#,
        good.hex()
    ));
    // The inner text holds the escape `\ud800`: valid UTF-8, Python reads the metadata.
    let odd_pair = pair(format!(
        r#"{{"sha512": "{}", "filename": "odd\ud800.txt"}}"#,
        odd.hex()
    ));
    // The outer text escapes a lone surrogate: the inner string itself holds one.
    let bad_pair = format!(
        r#"["{{\"sha512\": \"{}\", \"filename\": \"bad\ud800.txt\"}}", ""]"#,
        bad.hex()
    );
    let body = format!("[{good_pair}, {bad_pair}, {odd_pair}]");
    srv.push_rule(Rule::dir_get("odd-key", Fault::DirBody(body.into_bytes())));
    let dir = tempdir();
    let cfg =
        NetworkcacheConfig::for_urls(&srv.cache_url(), &srv.dir_url()).write(dir.path(), "c.cfg");
    let out = run(shacachefs([
        "--log-level",
        "debug",
        "ls",
        "-c",
        cfg.to_str().unwrap(),
        "odd-key",
    ]));
    out.assert_success();
    let stdout = out.stdout_text();
    assert!(stdout.contains(&good.short(16)), "{}", out.describe());
    assert!(stdout.contains(&odd.short(16)), "{}", out.describe());
    assert!(!stdout.contains(&bad.short(16)), "{}", out.describe());
    assert!(
        out.stderr_text().contains("lone UTF-16 surrogate"),
        "{}",
        out.describe()
    );
}

/// The mode bits of a path, without the file type.
fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every directory and file under `root` (symbolic links excluded).
fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
        }
        if !m.file_type().is_symlink() {
            out.push(p);
        }
    }
    out
}

fn assert_private(root: &Path) {
    for p in tree(root) {
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&p), want, "{} is {:o}", p.display(), mode(&p));
    }
}

/// A cache directory laid out as the current release makes it, with the modes it
/// leaves (umask 022) and a credentialed URL as its namespace: a namespace directory
/// named after the URL with credentials (known keys, first-seen times, a saved
/// listing) and one pending item whose meta.json names that URL.
fn old_release_cache(root: &Path, url_with_credentials: &str) -> (PathBuf, String) {
    use shacachefs::digest::Sha512;
    let v1 = root.join("v1");
    let ns = v1
        .join("ns")
        .join(Sha512::of(url_with_credentials.as_bytes()).short(32));
    let item = v1.join("outbox").join("18c2f0a1b2c3d-4e5f-0a1b2c3d");
    let blob = Sha512::of(b"hello\n");
    for d in [
        v1.join("tmp"),
        v1.join("blobs").join(&blob.hex()[..2]),
        ns.join("dirs"),
        item.clone(),
    ] {
        std::fs::create_dir_all(&d).unwrap();
    }
    let files: Vec<(PathBuf, Vec<u8>)> = vec![
        (root.join("layout"), b"1\n".to_vec()),
        (v1.join("open.lock"), Vec::new()),
        (
            v1.join("blobs").join(&blob.hex()[..2]).join(blob.hex()),
            b"hello\n".to_vec(),
        ),
        (
            v1.join("sizes.json"),
            format!(r#"{{"{}": 6}}"#, blob.hex()).into_bytes(),
        ),
        (ns.join("namespace"), url_with_credentials.as_bytes().to_vec()),
        (ns.join("keys.json"), br#"["kept-key"]"#.to_vec()),
        (
            ns.join("seen.json"),
            format!(r#"{{"kept-key": {{"{}": 1000000000.5}}}}"#, blob.hex()).into_bytes(),
        ),
        (
            ns.join("dirs")
                .join(format!("{}.json", Sha512::of(b"kept-key").short(32))),
            br#"{"key": "kept-key", "fetched": 1000000000.5, "status": 404}"#.to_vec(),
        ),
        (item.join("data"), b"pending bytes\n".to_vec()),
        (
            item.join("meta.json"),
            format!(
                r#"{{"key": "up-key", "name": "f.txt", "namespace": "{url_with_credentials}", "created": 1000000000.5, "extra": {{}}, "last_error": null, "sha512": null, "entry": null}}"#
            )
            .into_bytes(),
        ),
    ];
    for (path, bytes) in files {
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    for p in tree(root) {
        if p.is_dir() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    (item, blob.hex())
}

/// Secrets on disk: an old cache directory (0755/0644, credentials in its namespace
/// directory and an item's meta.json) is made private and migrated when opened, keeping
/// its known keys, first-seen times, saved listing and pending item; new files are
/// private; `outbox list --json` and `outbox retry` never print the password.
#[test]
fn cache_tree_is_private_and_free_of_credentials() {
    use shacachefs::cache::{Cache, CacheOptions};
    use shacachefs::digest::Sha512;
    let srv = Server::start();
    let dir = tempdir();
    let cache_dir = dir.path().join("cache");
    let secret = "s3cr3t-pass";
    let dir_url = srv.dir_url();
    let with_credentials = dir_url.replacen("http://", &format!("http://user:{secret}@"), 1);
    let (item, blob) = old_release_cache(&cache_dir, &with_credentials);
    let item_id = item.file_name().unwrap().to_str().unwrap().to_string();

    // `outbox list --json` migrates the outbox and prints no password.
    let out = run(shacachefs([
        "outbox",
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "list",
        "--json",
    ]));
    out.assert_success();
    assert!(!out.stdout_text().contains(secret), "{}", out.describe());
    assert!(out.stdout_text().contains(&dir_url), "{}", out.describe());

    // Opening the cache tightens the tree and renames the namespace directory.
    let cache = Cache::open(CacheOptions {
        dir: cache_dir.clone(),
        max_bytes: 1 << 30,
        namespace: dir_url.clone(),
    })
    .unwrap();
    assert_eq!(cache.known_keys(), vec!["kept-key".to_string()]);
    let blob_sha = Sha512::parse(&blob).unwrap();
    assert_eq!(
        cache.first_seen("kept-key", &blob_sha),
        std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(1000000000.5)
    );
    assert!(cache.dir_answer("kept-key").is_some(), "saved listing lost");
    // A blob, its shard directory and the tables written now are private too.
    let content = b"a new blob in a new shard\n";
    let sha = Sha512::of(content);
    assert!(!cache_dir.join("v1/blobs").join(&sha.hex()[..2]).exists());
    let mut hashing = shacachefs::digest::HashingFile::new_in(cache.tmp_dir()).unwrap();
    hashing.write_all(content).unwrap();
    cache
        .insert_blob(hashing.verify(&sha).expect("hash matches"))
        .unwrap();
    cache.add_known_key("new-key");
    cache.flush().unwrap();
    cache.close().unwrap();
    drop(cache);
    assert_private(&cache_dir);
    for p in tree(&cache_dir) {
        if p.is_file() {
            let text = std::fs::read(&p).unwrap();
            assert!(
                !String::from_utf8_lossy(&text).contains(secret),
                "{} holds the password",
                p.display()
            );
        }
    }

    // `outbox retry -c` (with the credentialed URL in its configuration) publishes the
    // migrated item and prints no password.
    let mut cfg = srv.config();
    cfg.download_dir_url = Some(with_credentials.clone());
    cfg.upload_dir_url = Some(with_credentials.clone());
    let cfg = cfg.write(dir.path(), "creds.cfg");
    let out = run(shacachefs([
        "outbox",
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "retry",
        "-c",
        cfg.to_str().unwrap(),
    ]));
    out.assert_success();
    assert!(out.stdout_text().contains(&item_id), "{}", out.describe());
    assert!(!out.stdout_text().contains(secret), "{}", out.describe());
    assert!(!out.stderr_text().contains(secret), "{}", out.describe());
    assert!(!item.exists(), "the item was not published");
    assert_private(&cache_dir);
}

/// An item of the current layout, meant for `namespace`.
fn pending_item(cache_dir: &Path, namespace: &str, name: &str) -> String {
    let outbox = shacachefs::outbox::Outbox::open(cache_dir).unwrap();
    let (item, mut file) = outbox
        .create(shacachefs::outbox::Outbox::new_meta(
            "retry-key",
            name,
            namespace,
            &serde_json::Map::new(),
        ))
        .unwrap();
    std::io::Write::write_all(&mut file, format!("bytes of {name}\n").as_bytes()).unwrap();
    item.id
}

/// `outbox retry` with no `-c` and no default configuration file: an item for another
/// server is skipped, and the command says what to pass and fails. New items are
/// created private.
#[test]
fn retry_fails_when_it_skips_an_item_for_another_server() {
    for p in shacachefs::config::DEFAULT_PATHS {
        assert!(
            !Path::new(p).exists(),
            "this test needs no default configuration file, and {p} exists"
        );
    }
    let srv = Server::start();
    let dir = tempdir();
    let cache_dir = dir.path().join("cache");
    let id = pending_item(&cache_dir, &srv.dir_url(), "other.txt");
    assert_private(&cache_dir.join("v1").join("outbox"));
    let out = run(shacachefs([
        "outbox",
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "retry",
    ]));
    out.assert_failure();
    let err = out.stderr_text();
    assert!(err.contains(&id), "{}", out.describe());
    assert!(err.contains("pass -c FILE"), "{}", out.describe());
    assert!(err.contains(&srv.dir_url()), "{}", out.describe());
    // The item stays.
    assert!(cache_dir.join("v1/outbox").join(&id).join("data").exists());

    // With the right configuration it is published, and the command succeeds.
    let cfg = srv.config().write(dir.path(), "c.cfg");
    let out = run(shacachefs([
        "outbox",
        "--cache-dir",
        cache_dir.to_str().unwrap(),
        "retry",
        "-c",
        cfg.to_str().unwrap(),
    ]));
    out.assert_success();
    assert!(
        out.stdout_text().contains("published"),
        "{}",
        out.describe()
    );
}

/// While a mount holds an item open for writing (its shared writer lock, held here by
/// `flock -s` in another process), `outbox retry` and `outbox drop` leave it alone, say
/// so, and exit 0; once the writer is gone they publish and drop.
#[test]
fn retry_and_drop_leave_items_open_for_writing_alone() {
    let srv = Server::start();
    let dir = tempdir();
    let cache_dir = dir.path().join("cache");
    let held = pending_item(&cache_dir, &srv.dir_url(), "held.txt");
    let held_drop = pending_item(&cache_dir, &srv.dir_url(), "held-drop.txt");
    let free = pending_item(&cache_dir, &srv.dir_url(), "free.txt");
    let item_dir = |id: &str| cache_dir.join("v1/outbox").join(id);
    // A writer in another process: `flock -s` on each held item's directory (the writer
    // lock), for at most 60 s (killed at the end of the test).
    let mut writers: Vec<std::process::Child> = [&held, &held_drop]
        .iter()
        .map(|id| {
            // One process holding the lock (killing it releases it).
            std::process::Command::new("sh")
                .arg("-c")
                .arg(r#"exec 9<"$1" && flock -s 9 && exec sleep 60"#)
                .arg("sh")
                .arg(item_dir(id))
                .spawn()
                .expect("sh and flock(1)")
        })
        .collect();
    // Wait (bounded) until both locks are held.
    let outbox = shacachefs::outbox::Outbox::open(&cache_dir).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let both = [&held, &held_drop]
            .iter()
            .all(|id| outbox.claim(id).unwrap().is_none());
        if both {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "flock -s never held the locks"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let cfg = srv.config().write(dir.path(), "c.cfg");
    let cache_arg = cache_dir.to_str().unwrap().to_string();
    let out = run(shacachefs([
        "outbox",
        "--cache-dir",
        &cache_arg,
        "retry",
        "-c",
        cfg.to_str().unwrap(),
    ]));
    let out_drop = run(shacachefs([
        "outbox",
        "--cache-dir",
        &cache_arg,
        "drop",
        &held_drop,
    ]));
    for w in &mut writers {
        let _ = w.kill();
        let _ = w.wait();
    }
    out.assert_success();
    let err = out.stderr_text();
    assert!(
        err.contains(&format!("{held}: open for writing by a mount")),
        "{}",
        out.describe()
    );
    assert!(out.stdout_text().contains(&free), "{}", out.describe());
    assert!(item_dir(&held).join("data").exists(), "held item published");
    assert!(!item_dir(&free).exists(), "free item not published");
    out_drop.assert_success();
    assert!(
        out_drop
            .stderr_text()
            .contains(&format!("{held_drop}: open for writing by a mount")),
        "{}",
        out_drop.describe()
    );
    assert!(
        item_dir(&held_drop).join("data").exists(),
        "held item dropped"
    );

    // The writers are gone: both go through.
    run(shacachefs([
        "outbox",
        "--cache-dir",
        &cache_arg,
        "drop",
        &held_drop,
    ]))
    .assert_success();
    assert!(!item_dir(&held_drop).exists());
    run(shacachefs([
        "outbox",
        "--cache-dir",
        &cache_arg,
        "retry",
        "-c",
        cfg.to_str().unwrap(),
    ]))
    .assert_success();
    assert!(!item_dir(&held).exists());
}

/// The same listing through the filesystem core (what a mount serves): the key is not
/// EIO, the good entry reads back, and only the entry with the lone surrogate is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_surrogate_does_not_take_a_key_offline_in_the_core() {
    use shacachefs::cache::{Cache, CacheOptions};
    use shacachefs::client::Client;
    use shacachefs::config::Config;
    use shacachefs::fs::{Core, FsOptions, ROOT_INO};
    use shacachefs::remote::Limits;
    let srv = faulty::FaultyServer::start().await;
    let good = srv.add_blob(b"good\n");
    let odd = srv.add_blob(b"odd metadata\n");
    let bad = srv.add_blob(b"bad\n");
    let pair = |inner: String| {
        RawEntry {
            inner,
            signature: String::new(),
        }
        .to_put_body()
    };
    let good_pair = pair(format!(
        r#"{{"sha512": "{}", "file": "good.txt"}}"#,
        good.hex()
    ));
    let odd_pair = pair(format!(
        r#"{{"sha512": "{}", "file": "odd\ud800.txt"}}"#,
        odd.hex()
    ));
    let bad_pair = format!(
        r#"["{{\"sha512\": \"{}\", \"file\": \"bad\ud800.txt\"}}", ""]"#,
        bad.hex()
    );
    let body = format!("[{good_pair}, {bad_pair}, {odd_pair}]");
    srv.push_rule(Rule::dir_get("odd-key", Fault::DirBody(body.into_bytes())));
    let cfg = Config {
        download_cache_url: Some(srv.cache_url()),
        download_dir_url: Some(srv.dir_url()),
        ..Config::default()
    };
    let client = Client::from_config(&cfg, Limits::default()).expect("client");
    let dir = tempdir();
    let cache = Cache::open(CacheOptions {
        dir: dir.path().join("cache"),
        max_bytes: 1 << 30,
        namespace: srv.dir_url(),
    })
    .expect("cache");
    let core = Core::new(client, cache, FsOptions::default());
    let key = core
        .lookup(ROOT_INO, "odd-key")
        .await
        .expect("the key is not EIO")
        .ino;
    let names: Vec<String> = core
        .readdir(key)
        .await
        .expect("readdir of the key")
        .into_iter()
        .skip(2)
        .map(|e| e.name)
        .filter(|n| !n.starts_with('.') && n != "latest")
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"good.txt".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("bad")), "{names:?}");
    let ino = core.lookup(key, "good.txt").await.expect("good.txt").ino;
    let (fh, _) = core.open(ino).await.expect("open");
    let data = core.read(fh, 0, 1 << 16).expect("read");
    core.release(fh);
    assert_eq!(&data[..], b"good\n");
}

/// A cache directory given as a shared directory (sticky, like `/tmp`): its own mode and
/// its other contents are left alone; only the cache's entries are made private.
#[test]
fn a_shared_cache_directory_keeps_its_mode() {
    use shacachefs::cache::{Cache, CacheOptions};
    let dir = tempdir();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let other = shared.join("someone-elses.txt");
    std::fs::write(&other, b"not ours\n").unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cache = Cache::open(CacheOptions {
        dir: shared.clone(),
        max_bytes: 1 << 20,
        namespace: "http://h/shadir".into(),
    })
    .unwrap();
    cache.close().unwrap();
    drop(cache);
    assert_eq!(
        std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    assert_eq!(mode(&other), 0o644);
    assert_private(&shared.join("v1"));
    assert_eq!(mode(&shared.join("layout")), 0o600);
}
