//! Real FUSE mounts of `shacachefs mount` (read-only), against the embedded server and
//! against the reference client's test server (`slapos.libnetworkcachetests.Server` with
//! `NCHandler`: no HEAD, no Range) populated by `networkcache-upload`.
//!
//! Every mount is started as a child process and is guarded: whatever happens, the
//! guard unmounts (`umount`, then `umount -l`) and ends the daemon, so a failing test
//! never leaves a mount behind. These tests fail (never skip) when FUSE cannot be used.

use crate::support;

use serde_json::json;
use shacachefs::client::Client;
use shacachefs::digest::Sha512;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{
    corrupt_file, files_at_least, find_named, publish, publish_file, publisher, tamper_key_file,
    Who,
};
use support::{
    fixture, pseudo_random_bytes, reference, reference_venv, run_with_timeout, shacachefs, tempdir,
    write_random_file, NetworkcacheConfig, Server,
};
use support::{force_unmount, is_mounted, require_fuse, wait_within, Mount};

/// Deadline of the small commands (`ls`, `cat`, `umount`, …).
const CMD_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Mounts.

/// A detached daemon found by its mountpoint; unmounted and killed (by pid) when dropped.
struct Detached {
    mountpoint: PathBuf,
    pid: Option<u32>,
}

impl Drop for Detached {
    fn drop(&mut self) {
        force_unmount(&self.mountpoint);
        if let Some(pid) = self.pid.filter(|p| alive(*p)) {
            // SAFETY: plain syscall on the pid of the daemon this test started.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// The pid of the `shacachefs mount` process whose command line names `mp`.
fn daemon_of(mp: &Path) -> Option<u32> {
    let want = mp.as_os_str().as_encoded_bytes();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.contains(&b"mount".as_slice()) && args.contains(&want) {
            return Some(pid);
        }
    }
    None
}

/// The process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S …": the state follows the last ')'.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------
// Small shell helpers.

#[track_caller]
fn cmd(program: &str, args: &[&Path]) -> support::Output {
    let mut c = Command::new(program);
    c.args(args);
    run_with_timeout(c, CMD_TIMEOUT)
}

/// `ls -1A DIR` as a set of names.
#[track_caller]
fn ls(dir: &Path) -> BTreeSet<String> {
    let mut c = Command::new("ls");
    c.arg("-1A").arg(dir);
    let out = run_with_timeout(c, CMD_TIMEOUT);
    out.assert_success();
    out.stdout_text().lines().map(str::to_string).collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Reads a file, failing the test (not hanging) when it takes over `CMD_TIMEOUT`.
#[track_caller]
/// The errno of `lgetxattr(path, name)`, `None` when it succeeds.
fn lgetxattr_errno(path: &Path, name: &str) -> Option<i32> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let p = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(p));
    });
    rx.recv_timeout(CMD_TIMEOUT)
        .unwrap_or_else(|_| panic!("reading {} did not end in {CMD_TIMEOUT:?}", path.display()))
}

// ---------------------------------------------------------------------------------------
// The two servers.

/// A server the scenarios run against.
trait Backend {
    /// Uploads `data` and publishes `{"file": name[, "timestamp": ts]}` under `key`,
    /// signed by signer A.
    fn publish(&self, key: &str, name: &str, data: &[u8], timestamp: Option<f64>) -> Sha512;
    /// Writes a read-only configuration trusting signer A into `dir`.
    fn mount_config(&self, dir: &Path) -> PathBuf;
    /// Where the server keeps a blob.
    fn blob_file(&self, sha: &Sha512) -> PathBuf;
    /// Where the server keeps a key's list.
    fn key_file(&self, key: &str) -> PathBuf;
    /// Downloads of the blob behind `key`/`name` so far (server side when the server
    /// logs requests, else the mount's "fetched" log lines).
    fn downloads(&self, sha: &Sha512, name: &str, mount: &Mount) -> usize;
    /// Stops the server for good.
    fn stop(&mut self);
}

/// The embedded server (library), published to with the client library.
struct Embedded {
    server: Option<Server>,
    cache_url: String,
    dir_url: String,
    store: PathBuf,
    client: Client,
}

impl Embedded {
    fn start() -> Embedded {
        require_fuse();
        let server = Server::start();
        let (cache_url, dir_url) = (server.cache_url(), server.dir_url());
        let client = publisher(&cache_url, &dir_url, Who::A);
        Embedded {
            store: server.store(),
            server: Some(server),
            cache_url,
            dir_url,
            client,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("server stopped")
    }
}

fn reader_config(cache_url: &str, dir_url: &str) -> NetworkcacheConfig {
    NetworkcacheConfig {
        download_cache_url: Some(cache_url.to_string()),
        download_dir_url: Some(dir_url.to_string()),
        ..Default::default()
    }
    .trust(fixture("signature/signer-a.crt"))
}

fn entry_meta(name: &str, timestamp: Option<f64>) -> serde_json::Value {
    match timestamp {
        Some(t) => json!({"file": name, "timestamp": t}),
        None => json!({ "file": name }),
    }
}

impl Backend for Embedded {
    fn publish(&self, key: &str, name: &str, data: &[u8], timestamp: Option<f64>) -> Sha512 {
        self.server().block_on(publish(
            &self.client,
            key,
            data,
            entry_meta(name, timestamp),
        ))
    }

    fn mount_config(&self, dir: &Path) -> PathBuf {
        reader_config(&self.cache_url, &self.dir_url).write(dir, "mount.cfg")
    }

    fn blob_file(&self, sha: &Sha512) -> PathBuf {
        shacachefs::server::blob_path(&self.store, sha)
    }

    fn key_file(&self, key: &str) -> PathBuf {
        shacachefs::server::key_path(&self.store, key)
    }

    fn downloads(&self, _sha: &Sha512, name: &str, mount: &Mount) -> usize {
        let needle = format!("entry {name}: fetched");
        mount
            .log_text()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    fn stop(&mut self) {
        // Dropping the test server shuts it down (and removes its store).
        self.server.take();
    }
}

/// The reference client's test server, run by `$SHACACHEFS_VENV/bin/python`, with its
/// request log (stderr) in a file.
struct Reference {
    child: Option<Child>,
    dir: tempfile::TempDir,
    url: String,
    log: PathBuf,
}

const NCHANDLER: &str = "\
import sys
from slapos.libnetworkcachetests import Server, NCHandler
server = Server(sys.argv[1], ('127.0.0.1', 0), NCHandler)
sys.stdout.write('%d\\n' % server.server_address[1])
sys.stdout.flush()
server.serve_forever()
";

impl Reference {
    fn start() -> Reference {
        require_fuse();
        let venv = reference_venv();
        let dir = tempdir();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(&tree).unwrap();
        let log = dir.path().join("nchandler.log");
        let mut child = Command::new(venv.join("bin/python"))
            .arg("-u")
            .arg("-c")
            .arg(NCHANDLER)
            .arg(&tree)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("starting the reference test server");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut r = Reference {
            child: Some(child),
            url: String::new(),
            log,
            dir,
        };
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "the reference test server did not start (got {line:?}):\n{}",
                r.log_text()
            )
        });
        r.url = format!("http://127.0.0.1:{port}");
        r
    }

    fn tree(&self) -> PathBuf {
        self.dir.path().join("tree")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn config(&self) -> NetworkcacheConfig {
        NetworkcacheConfig::for_urls(
            &format!("{}/shacache", self.url),
            &format!("{}/shadir", self.url),
        )
    }
}

impl Drop for Reference {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Backend for Reference {
    fn publish(&self, key: &str, name: &str, data: &[u8], timestamp: Option<f64>) -> Sha512 {
        let sha = Sha512::of(data);
        let file = self.dir.path().join(format!("upload-{}", sha.short(16)));
        std::fs::write(&file, data).unwrap();
        let meta = self.dir.path().join(format!("meta-{}.json", sha.short(16)));
        std::fs::write(&meta, entry_meta(name, timestamp).to_string()).unwrap();
        let cfg = self
            .config()
            .signer_a()
            .write(self.dir.path(), "upload.cfg");
        let mut c = reference("networkcache-upload", [Path::new("-c"), &cfg]);
        c.arg("-f")
            .arg(&file)
            .arg("-k")
            .arg(key)
            .arg("-m")
            .arg(&meta);
        run_with_timeout(c, CMD_TIMEOUT).assert_success();
        sha
    }

    fn mount_config(&self, dir: &Path) -> PathBuf {
        let c = self.config();
        reader_config(
            c.download_cache_url.as_deref().unwrap(),
            c.download_dir_url.as_deref().unwrap(),
        )
        .write(dir, "mount.cfg")
    }

    fn blob_file(&self, sha: &Sha512) -> PathBuf {
        self.tree().join("shacache").join(sha.hex())
    }

    fn key_file(&self, key: &str) -> PathBuf {
        self.tree().join("shadir").join(key)
    }

    fn downloads(&self, sha: &Sha512, _name: &str, _mount: &Mount) -> usize {
        let needle = format!("\"GET /shacache/{sha} HTTP/1.1\" 200");
        self.log_text()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Scenarios, run against both servers.

/// `ls`, sizes, `cat`, `cp`, `getfattr`, `latest`, `.sha512`, and the root listing the
/// key given with `-k`.
fn browse(b: &mut dyn Backend) {
    let work = tempdir();
    let key = "browse-key";
    let hello = b"hello shacachefs\n".to_vec();
    let data = pseudo_random_bytes(300_000, 11);
    let old = b"an entry without a timestamp".to_vec();
    let sh = b.publish(key, "hello.txt", &hello, Some(100.5));
    let sd = b.publish(key, "data.bin", &data, Some(200.25));
    b.publish(key, "old.txt", &old, None);
    let cfg = b.mount_config(work.path());
    let mut m = Mount::start(
        &cfg,
        &work.path().join("cache"),
        &work.path().join("mnt"),
        &["-k", key],
    );
    let root = ls(&m.mountpoint);
    assert!(root.contains(key), "root listing {root:?} lacks the -k key");
    assert!(root.contains(".sha512"), "{root:?}");
    let dir = m.path(key);
    assert_eq!(
        ls(&dir),
        names(&[
            "data.bin",
            "hello.txt",
            "latest",
            "old.txt",
            ".entries.json"
        ])
    );
    for (name, content) in [
        ("hello.txt", &hello),
        ("data.bin", &data),
        ("old.txt", &old),
    ] {
        let p = dir.join(name);
        let md = std::fs::metadata(&p).unwrap_or_else(|e| panic!("stat {name}: {e}"));
        assert!(md.is_file());
        assert_eq!(md.len(), content.len() as u64, "size of {name}");
        let out = cmd("cat", &[&p]);
        out.assert_success();
        assert!(out.stdout == *content, "cat {name}: content differs");
    }
    let copy = work.path().join("copy.bin");
    cmd("cp", &[&dir.join("data.bin"), &copy]).assert_success();
    assert!(std::fs::read(&copy).unwrap() == data, "cp: content differs");

    let out = cmd("getfattr", &[Path::new("-d"), &dir.join("hello.txt")]);
    out.assert_success();
    let text = out.stdout_text();
    assert!(text.contains("user.shadir.file=\"hello.txt\""), "{text}");
    assert!(
        text.contains(&format!("user.shacache.sha512=\"{sh}\"")),
        "{text}"
    );
    assert!(
        text.contains("user.shadir.signer=\"shacachefs-fixture-a\""),
        "{text}"
    );

    // Namespaces the tree never has answer "not supported" (which `ls -l` remembers for
    // the whole filesystem), names of `user.*` it does not have "no such attribute".
    for (name, errno) in [
        ("security.selinux", libc::EOPNOTSUPP),
        ("system.posix_acl_access", libc::EOPNOTSUPP),
        ("trusted.overlay.opaque", libc::EOPNOTSUPP),
        ("user.no-such-attribute", libc::ENODATA),
    ] {
        assert_eq!(
            lgetxattr_errno(&dir.join("hello.txt"), name),
            Some(errno),
            "lgetxattr {name}"
        );
    }

    let latest = dir.join("latest");
    assert!(std::fs::symlink_metadata(&latest)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_link(&latest).unwrap(), Path::new("data.bin"));
    assert!(std::fs::read(&latest).unwrap() == data);

    let by_hash = m.path(&format!(".sha512/{sd}"));
    assert!(
        read_bounded(&by_hash).unwrap() == data,
        ".sha512/<hex> content"
    );
    m.unmount();
}

/// An entry whose stored inner no longer matches its signature disappears after the TTL.
fn tampered_entry_disappears(b: &mut dyn Backend) {
    let work = tempdir();
    let key = "tamper-key";
    b.publish(key, "good.txt", b"good", None);
    b.publish(key, "victim.txt", b"victim", None);
    let cfg = b.mount_config(work.path());
    let mut m = Mount::start(
        &cfg,
        &work.path().join("cache"),
        &work.path().join("mnt"),
        &["--dir-ttl", "1"],
    );
    let dir = m.path(key);
    assert_eq!(
        ls(&dir),
        names(&["good.txt", "victim.txt", ".entries.json"])
    );
    tamper_key_file(&b.key_file(key), "victim.txt", "victim.txz");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut listed = ls(&dir);
    while listed.contains("victim.txt") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        listed = ls(&dir);
    }
    assert_eq!(
        listed,
        names(&["good.txt", ".entries.json"]),
        "after the TTL"
    );
    let e = std::fs::metadata(dir.join("victim.txt")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(std::fs::read(dir.join("good.txt")).unwrap(), b"good");
    m.unmount();
}

/// A blob whose server copy is corrupt gives EIO and never enters the cache.
fn corrupt_blob_gives_eio(b: &mut dyn Backend) {
    let work = tempdir();
    let key = "corrupt-key";
    let data = pseudo_random_bytes(100_000, 12);
    let sha = b.publish(key, "bad.bin", &data, None);
    b.publish(key, "ok.txt", b"fine", None);
    corrupt_file(&b.blob_file(&sha));
    let cache = work.path().join("cache");
    let cfg = b.mount_config(work.path());
    let mut m = Mount::start(&cfg, &cache, &work.path().join("mnt"), &[]);
    let bad = m.path(&format!("{key}/bad.bin"));
    for round in 0..2 {
        let e = read_bounded(&bad).expect_err("a corrupt blob was read");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "round {round}: {e}");
    }
    let out = cmd("cat", &[&bad]);
    out.assert_failure();
    assert!(
        out.stderr_text().contains("Input/output error"),
        "{}",
        out.stderr_text()
    );
    assert!(
        find_named(&cache, &sha.hex()).is_empty(),
        "corrupt blob in the cache"
    );
    let big = files_at_least(&cache, data.len() as u64);
    assert!(
        big.is_empty(),
        "files of the blob's size in the cache: {big:?}"
    );
    assert_eq!(
        std::fs::read(m.path(&format!("{key}/ok.txt"))).unwrap(),
        b"fine"
    );
    m.unmount();
}

/// Two `cat`s of one cold blob at once: one download.
fn concurrent_cold_reads_download_once(b: &mut dyn Backend, extra: &[&str]) {
    let work = tempdir();
    let key = "flight-key";
    let data = pseudo_random_bytes(8 << 20, 13);
    let sha = b.publish(key, "big.bin", &data, None);
    let cfg = b.mount_config(work.path());
    let mut m = Mount::start(
        &cfg,
        &work.path().join("cache"),
        &work.path().join("mnt"),
        extra,
    );
    let before = b.downloads(&sha, "big.bin", &m);
    let path = m.path(&format!("{key}/big.bin"));
    let mut cats = Vec::new();
    for i in 0..2 {
        let out = work.path().join(format!("out{i}"));
        let err = work.path().join(format!("err{i}"));
        let child = Command::new("cat")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap())
            .spawn()
            .expect("cat");
        cats.push((child, out, err));
    }
    for (mut child, out, err) in cats {
        let status = wait_within(&mut child, CMD_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "cat: {status:?}: {}\nmount log:\n{}",
            std::fs::read_to_string(&err).unwrap_or_default(),
            m.log_text()
        );
        assert!(std::fs::read(&out).unwrap() == data, "cat output differs");
    }
    let after = b.downloads(&sha, "big.bin", &m);
    assert_eq!(
        after - before,
        1,
        "downloads of one blob read twice at once"
    );
    m.unmount();
}

/// Cached data stays readable once the server is gone, in the same mount and after a
/// remount on the same cache directory (which downloads nothing).
fn offline_and_remount(b: &mut dyn Backend) {
    let work = tempdir();
    let key = "offline-key";
    let keep = pseudo_random_bytes(200_000, 14);
    let other = b"maybe never read".to_vec();
    b.publish(key, "keep.bin", &keep, None);
    b.publish(key, "other.bin", &other, None);
    let cache = work.path().join("cache");
    let cfg = b.mount_config(work.path());
    let both = names(&["keep.bin", "other.bin", ".entries.json"]);
    let mut m = Mount::start(&cfg, &cache, &work.path().join("mnt"), &["--dir-ttl", "1"]);
    let dir = m.path(key);
    assert!(read_bounded(&dir.join("keep.bin")).unwrap() == keep);
    b.stop();
    // Past the TTL: the refresh fails and the saved listing is used.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ls(&dir), both, "listing while the server is down");
    assert!(
        read_bounded(&dir.join("keep.bin")).unwrap() == keep,
        "offline read"
    );
    match read_bounded(&dir.join("other.bin")) {
        // The reference server's size probes fetch whole blobs, so it may be cached.
        Ok(d) => assert_eq!(d, other),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    m.unmount();
    drop(m);

    let mut m = Mount::start(&cfg, &cache, &work.path().join("mnt"), &["--dir-ttl", "1"]);
    let dir = m.path(key);
    assert_eq!(ls(&dir), both, "listing after a remount, server down");
    assert!(
        read_bounded(&dir.join("keep.bin")).unwrap() == keep,
        "read after remount"
    );
    let log = m.log_text();
    assert!(!log.contains("fetched"), "the remount downloaded:\n{log}");
    m.unmount();
}

#[test]
fn browse_embedded() {
    browse(&mut Embedded::start());
}

#[test]
fn browse_reference() {
    browse(&mut Reference::start());
}

#[test]
fn tampered_entry_disappears_embedded() {
    tampered_entry_disappears(&mut Embedded::start());
}

#[test]
fn tampered_entry_disappears_reference() {
    tampered_entry_disappears(&mut Reference::start());
}

#[test]
fn corrupt_blob_gives_eio_embedded() {
    corrupt_blob_gives_eio(&mut Embedded::start());
}

#[test]
fn corrupt_blob_gives_eio_reference() {
    corrupt_blob_gives_eio(&mut Reference::start());
}

#[test]
fn concurrent_cold_reads_download_once_embedded() {
    concurrent_cold_reads_download_once(&mut Embedded::start(), &[]);
}

#[test]
fn concurrent_cold_reads_download_once_embedded_no_passthrough() {
    concurrent_cold_reads_download_once(&mut Embedded::start(), &["--no-passthrough"]);
}

#[test]
fn concurrent_cold_reads_download_once_reference() {
    concurrent_cold_reads_download_once(&mut Reference::start(), &[]);
}

/// A file already open (and cached) can be opened and read again by another reader.
#[test]
fn overlapping_opens_of_a_cached_file() {
    let b = Embedded::start();
    let work = tempdir();
    let data = pseudo_random_bytes(1 << 20, 15);
    b.publish("overlap-key", "f.bin", &data, None);
    let cfg = b.mount_config(work.path());
    let mut m = Mount::start(
        &cfg,
        &work.path().join("cache"),
        &work.path().join("mnt"),
        &[],
    );
    let path = m.path("overlap-key/f.bin");
    assert!(read_bounded(&path).unwrap() == data, "first read");
    let held = File::open(&path).expect("first open");
    let second = read_bounded(&path);
    drop(held);
    let second = second
        .unwrap_or_else(|e| panic!("second open while the first is open: {e}\n{}", m.log_text()));
    assert!(second == data, "second read differs");
    m.unmount();
}

#[test]
fn offline_and_remount_embedded() {
    offline_and_remount(&mut Embedded::start());
}

#[test]
fn offline_and_remount_reference() {
    offline_and_remount(&mut Reference::start());
}

// ---------------------------------------------------------------------------------------
// The command itself.

#[test]
fn detached_mount_returns_when_ready_and_umount_ends_it() {
    let b = Embedded::start();
    let work = tempdir();
    let key = "detached-key";
    b.publish(key, "f.txt", b"detached", None);
    let cfg = b.mount_config(work.path());
    let mp = work.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let mut guard = Detached {
        mountpoint: mp.clone(),
        pid: None,
    };
    let mut args: Vec<OsString> = vec!["mount".into(), "-c".into(), cfg.into()];
    args.extend(["--cache-dir".into(), work.path().join("cache").into()]);
    args.extend(["--log-file".into(), work.path().join("daemon.log").into()]);
    args.extend(["-k".into(), key.into(), mp.clone().into()]);
    let out = run_with_timeout(shacachefs(args), CMD_TIMEOUT);
    guard.pid = daemon_of(&mp);
    out.assert_success();
    assert!(
        is_mounted(&mp),
        "`mount` returned before the mount was ready"
    );
    assert!(
        out.stderr_text().contains("mounted on"),
        "{}",
        out.stderr_text()
    );
    let pid = guard.pid.expect("the daemon process");
    assert!(alive(pid));
    assert_eq!(
        read_bounded(&mp.join(key).join("f.txt")).unwrap(),
        b"detached"
    );
    cmd("umount", &[&mp]).assert_success();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(pid), "the daemon is still running after umount");
    assert!(!is_mounted(&mp));
}

#[test]
fn mount_errors_are_clear() {
    require_fuse();
    let work = tempdir();
    let cache = work.path().join("cache");
    let mp = work.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let _guard = Detached {
        mountpoint: mp.clone(),
        pid: None,
    };
    let run_mount = |foreground: bool, cfg: &Path, target: &Path| {
        let mut args: Vec<OsString> = vec!["mount".into()];
        if foreground {
            args.push("-f".into());
        }
        args.extend([
            "-c".into(),
            cfg.into(),
            "--cache-dir".into(),
            cache.clone().into(),
        ]);
        args.push(target.into());
        run_with_timeout(shacachefs(args), CMD_TIMEOUT)
    };
    // "One clear line": exactly one line names the culprit, it is ours, and it says
    // what is wrong once (other lines, such as warnings, may come before it). Every case
    // is checked before the test fails, so that one report lists every problem.
    let mut problems: Vec<String> = Vec::new();
    let mut one_clear_line = |o: &support::Output, culprit: &Path, what: &str, mode: &str| {
        let text = o.stderr_text();
        if o.success() {
            problems.push(format!("{mode}: `mount` succeeded\n{text}"));
            return;
        }
        let culprit = culprit.display().to_string();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&culprit)).collect();
        let clear = lines.len() == 1
            && lines[0].starts_with("shacachefs: ")
            && lines[0].matches(&culprit).count() == 1
            && lines[0].matches(what).count() == 1;
        if !clear {
            problems.push(format!(
                "{mode}: not one clear line naming {culprit} and saying {what:?} once:\n{text}"
            ));
        }
    };
    let mode = |foreground: bool, case: &str| {
        format!(
            "{case} ({})",
            if foreground { "with -f" } else { "detached" }
        )
    };

    let missing = Path::new("/nonexistent/shacachefs-test.cfg");
    for foreground in [true, false] {
        let out = run_mount(foreground, missing, &mp);
        let m = mode(foreground, "missing -c file");
        one_clear_line(&out, missing, "No such file or directory", &m);
        assert!(!is_mounted(&mp));
    }

    let cfg = reader_config("http://127.0.0.1:9/shacache", "http://127.0.0.1:9/shadir")
        .write(work.path(), "mount.cfg");
    let file = work.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    for foreground in [true, false] {
        let out = run_mount(foreground, &cfg, &file);
        let m = mode(foreground, "mountpoint is a file");
        one_clear_line(&out, &file, "not a directory", &m);
        assert!(!is_mounted(&file));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n---\n"));
}

/// Reading a 1 GiB file through the mount keeps the daemon's peak RSS under 64 MiB.
#[test]
fn peak_rss_reading_1gib_stays_under_64mib() {
    const SIZE: u64 = 1 << 30;
    let started = Instant::now();
    let b = Embedded::start();
    let work = tempdir();
    let src = work.path().join("big.bin");
    write_random_file(&src, SIZE, 0x9E37_79B9);
    let sha = b.server().block_on(publish_file(
        &b.client,
        "rss-key",
        &src,
        json!({"file": "big.bin"}),
    ));
    std::fs::remove_file(&src).unwrap();
    let prepared = started.elapsed();
    let cfg = b.mount_config(work.path());
    let mut m = Mount::start(
        &cfg,
        &work.path().join("cache"),
        &work.path().join("mnt"),
        &["--no-passthrough"],
    );
    let path = m.path("rss-key/big.bin");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), SIZE);
    let before = m.peak_rss_kib();
    let read_started = Instant::now();
    let mut c = Command::new("cat");
    c.arg(&path).stdin(Stdio::null()).stdout(Stdio::null());
    let status = wait_within(&mut c.spawn().unwrap(), Duration::from_secs(600));
    assert!(
        status.is_some_and(|s| s.success()),
        "cat of 1 GiB: {status:?}"
    );
    let cold = read_started.elapsed();
    let peak = m.peak_rss_kib();
    // The bytes served are the blob's (read again, warm, through the mount).
    let out = run_with_timeout(
        {
            let mut c = Command::new("sha512sum");
            c.arg(&path);
            c
        },
        Duration::from_secs(600),
    );
    out.assert_success();
    assert!(
        out.stdout_text().starts_with(&sha.hex()),
        "{}",
        out.stdout_text()
    );
    let peak_after_warm = m.peak_rss_kib();
    eprintln!(
        "peak RSS (VmHWM) of the mount daemon: {before} KiB after mounting, {peak} KiB \
         ({:.1} MiB) after a cold `cat` of 1 GiB (download + read, {cold:.1?}), \
         {peak_after_warm} KiB after a warm re-read; setup {prepared:.1?}, total {:.1?}",
        peak as f64 / 1024.0,
        started.elapsed()
    );
    m.unmount();
    assert!(
        peak_after_warm < 64 * 1024,
        "daemon peak RSS {peak_after_warm} KiB is not under 64 MiB"
    );
}
