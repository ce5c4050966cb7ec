//! Pin and prefetch for offline use (issue 14, item 1) through real mounts of the
//! embedded server: `setfattr -n user.shacachefs.pin` keeps a blob through eviction
//! pressure and a remount, `setfattr -x` lets it go, `shacachefs prefetch --latest
//! --pin` (another process, mounted or not) fills the cache for a mount that then reads
//! with the server stopped, and every other attribute still answers EOPNOTSUPP. Real
//! mounts, as root; these fail (never skip) when FUSE cannot be used.

use crate::support;

use serde_json::json;
use shacachefs::digest::Sha512;
use std::path::{Path, PathBuf};
use support::*;

const PIN: &str = "user.shacachefs.pin";
/// Each test blob; a 1M cache holds two of them, not three.
const BLOB: usize = 400 << 10;

/// A server with signer A's entries `name` → `pseudo_random_bytes(BLOB, seed)` under
/// key `k` (timestamps in order: the last is `latest`), and a writable configuration
/// (a read-only mount is mounted read-only, where the kernel refuses `setfattr`).
struct World {
    server: Server,
    dir: tempfile::TempDir,
    cfg: PathBuf,
    shas: Vec<(String, Sha512, Vec<u8>)>,
}

impl World {
    fn new(names: &[&str]) -> World {
        require_fuse();
        let server = Server::start();
        let dir = tempdir();
        let cfg = server.config().signer_a().write(dir.path(), "cfg");
        let client = publisher(&server.cache_url(), &server.dir_url(), Who::A);
        let shas = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let data = pseudo_random_bytes(BLOB, 100 + i as u64);
                let meta = json!({"file": name, "timestamp": 1 + i});
                let sha = server.block_on(publish(&client, "k", &data, meta));
                (name.to_string(), sha, data)
            })
            .collect();
        World {
            server,
            dir,
            cfg,
            shas,
        }
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }

    /// `shacachefs prefetch -c CFG --cache-dir CACHE FLAGS… k` from another process.
    fn prefetch(&self, cfg: &Path, flags: &[&str]) -> Output {
        let cache = self.cache();
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["prefetch".as_ref(), "-c".as_ref(), cfg.as_os_str()];
        args.extend(["--cache-dir".as_ref(), cache.as_os_str()]);
        args.extend(flags.iter().map(std::ffi::OsStr::new));
        args.push("k".as_ref());
        cli(&args)
    }

    fn mount(&self) -> Mount {
        Mount::in_dir(
            &self.cfg,
            self.dir.path(),
            &["-k", "k", "--cache-size", "1M"],
        )
    }

    fn entry(&self, name: &str) -> &(String, Sha512, Vec<u8>) {
        self.shas
            .iter()
            .find(|(n, _, _)| n == name)
            .expect("a published name")
    }

    /// Whether the blob of `name` is in the cache directory.
    fn cached(&self, name: &str) -> bool {
        let hex = self.entry(name).1.hex();
        self.cache()
            .join("v1/blobs")
            .join(&hex[..2])
            .join(&hex)
            .is_file()
    }

    fn pin_file(&self, name: &str) -> PathBuf {
        self.cache().join("v1/pins").join(self.entry(name).1.hex())
    }

    /// `cat` of `k/NAME` through the mount gives the published bytes.
    #[track_caller]
    fn read_ok(&self, m: &Mount, name: &str) {
        let got = read(&m.path(&format!("k/{name}")));
        assert!(got == self.entry(name).2, "k/{name}: wrong bytes");
    }
}

fn getfattr(path: &Path) -> String {
    let out = cmd(
        "getfattr",
        &[
            "--only-values".as_ref(),
            "-n".as_ref(),
            PIN.as_ref(),
            path.as_os_str(),
        ],
    );
    out.assert_success();
    out.stdout_text()
}

fn pinned_bytes(m: &Mount) -> serde_json::Value {
    let out = cli(&[
        "status".as_ref(),
        "--json".as_ref(),
        m.mountpoint.as_os_str(),
    ]);
    out.assert_success();
    let status: serde_json::Value =
        serde_json::from_str(&out.stdout_text()).expect("status --json prints JSON");
    status["cache"]["pinned_bytes"].clone()
}

#[test]
fn a_pin_survives_eviction_pressure_and_a_remount_offline() {
    let mut w = World::new(&["a", "b", "c", "d", "e"]);
    let mut m = w.mount();
    let a = m.path("k/a");
    assert_eq!(getfattr(&a), "0");
    cmd("setfattr", &["-n", PIN, "-v", "1", a.to_str().unwrap()]).assert_success();
    assert!(w.cached("a"), "setting the pin fetched the blob");
    assert!(w.pin_file("a").is_file());
    assert_eq!(getfattr(&a), "1");
    assert_eq!(pinned_bytes(&m), json!(BLOB));
    // Four more blobs through a cache of two: `a` stays, the others come and go.
    for name in ["b", "c", "d", "e"] {
        w.read_ok(&m, name);
        assert!(w.cached("a"), "the pinned blob was evicted reading {name}");
    }
    assert!(!w.cached("b"), "unpinned blobs are evicted");
    m.unmount();
    // Remounted with the server stopped: the pin and the blob are still there.
    w.server.stop();
    let m = w.mount();
    assert!(w.cached("a"));
    w.read_ok(&m, "a");
    assert_eq!(getfattr(&m.path("k/a")), "1");
    assert!(read_result(&m.path("k/b")).is_err(), "b needs the server");
}

#[test]
fn unpinning_lets_the_blob_be_evicted() {
    let w = World::new(&["a", "b", "c", "d"]);
    let m = w.mount();
    let a = m.path("k/a");
    cmd("setfattr", &["-n", PIN, "-v", "1", a.to_str().unwrap()]).assert_success();
    w.read_ok(&m, "b");
    w.read_ok(&m, "c");
    assert!(w.cached("a"));
    cmd("setfattr", &["-x", PIN, a.to_str().unwrap()]).assert_success();
    assert!(!w.pin_file("a").exists());
    assert_eq!(pinned_bytes(&m), json!(0));
    // `a` is now the least recently used closed blob: the next download takes its room.
    // (Attributes are read after: `getfattr` marks the blob used.)
    w.read_ok(&m, "d");
    assert!(!w.cached("a"), "unpinned, it was evicted");
    assert_eq!(getfattr(&a), "0");
}

#[test]
fn other_attributes_are_still_not_supported() {
    let w = World::new(&["a"]);
    let m = w.mount();
    let a = m.path("k/a");
    for name in ["user.foo", "user.shacache.sha512", "trusted.foo"] {
        let out = cmd("setfattr", &["-n", name, "-v", "x", a.to_str().unwrap()]);
        out.assert_failure();
        assert!(
            out.stderr_text().contains("Operation not supported"),
            "{name}: {}",
            out.describe()
        );
    }
    let out = cmd("setfattr", &["-x", "user.foo", a.to_str().unwrap()]);
    assert!(
        out.stderr_text().contains("Operation not supported"),
        "{}",
        out.describe()
    );
    // The pin on a directory is not supported either.
    let out = cmd(
        "setfattr",
        &["-n", PIN, "-v", "1", m.path("k").to_str().unwrap()],
    );
    assert!(
        out.stderr_text().contains("Operation not supported"),
        "{}",
        out.describe()
    );
    // `cp -a` of a file with a user attribute into the mount publishes it all the same.
    let src = w.dir.path().join("with-attr.txt");
    std::fs::write(&src, b"copied with cp -a\n").unwrap();
    let _ = cmd(
        "setfattr",
        &["-n", "user.note", "-v", "x", src.to_str().unwrap()],
    );
    cmd(
        "cp",
        &["-a", src.to_str().unwrap(), m.path("k/").to_str().unwrap()],
    )
    .assert_success();
    assert_eq!(read(&m.path("k/with-attr.txt")), b"copied with cp -a\n");
    assert!(w.server.entries_named("k", "with-attr.txt").len() == 1);
}

#[test]
fn prefetch_latest_pin_then_read_offline() {
    let mut w = World::new(&["old", "new"]);
    let out = w.prefetch(&w.cfg, &["--latest", "--pin"]);
    out.assert_success();
    assert!(
        out.stdout_text().contains("k: 1 blobs") && out.stdout_text().contains("1 pinned"),
        "{}",
        out.describe()
    );
    assert!(w.cached("new") && w.pin_file("new").is_file());
    assert!(!w.cached("old"), "only latest was asked for");
    // No network from here on: the mount shows the saved listing and reads `latest`.
    w.server.stop();
    let m = w.mount();
    let latest = read(&m.path("k/latest"));
    assert!(latest == w.entry("new").2, "k/latest: wrong bytes");
    assert_eq!(getfattr(&m.path("k/new")), "1");
}

#[test]
fn a_running_mount_respects_pins_made_by_prefetch() {
    let w = World::new(&["a", "b", "c", "d"]);
    let m = w.mount();
    w.read_ok(&m, "a");
    w.read_ok(&m, "b");
    // Another process pins what the mount holds as its least recently used blobs.
    let out = w.prefetch(&w.cfg, &["--pin"]);
    out.assert_success();
    assert!(out.stdout_text().contains("4 pinned"), "{}", out.describe());
    w.read_ok(&m, "c");
    w.read_ok(&m, "d");
    for name in ["a", "b", "c", "d"] {
        assert!(
            w.cached(name),
            "{name}: pinned by prefetch, evicted by the mount"
        );
    }
    assert_eq!(pinned_bytes(&m), json!(4 * BLOB));
    // `prefetch --unpin` from another process: the mount's next eviction frees the
    // least recently used blobs down to its limit.
    let out = w.prefetch(&w.cfg, &["--unpin"]);
    out.assert_success();
    assert!(
        out.stdout_text().contains("4 unpinned"),
        "{}",
        out.describe()
    );
    assert_eq!(pinned_bytes(&m), json!(0));
    w.read_ok(&m, "d");
    assert!(
        !w.cached("a") && !w.cached("b"),
        "unpinned elsewhere, then evicted"
    );
    assert!(w.cached("d"));
}

/// Reads a file through the mount (bounded), keeping the error.
fn read_result(path: &Path) -> std::io::Result<Vec<u8>> {
    let p = path.to_path_buf();
    bounded("reading through the mount", move || std::fs::read(p))
}

#[test]
fn setfattr_on_latest_pins_the_blob_it_points_to() {
    let w = World::new(&["old", "new"]);
    let m = w.mount();
    let latest = m.path("k/latest");
    cmd(
        "setfattr",
        &["-n", PIN, "-v", "1", latest.to_str().unwrap()],
    )
    .assert_success();
    assert!(w.pin_file("new").is_file() && w.cached("new"));
    assert!(!w.pin_file("old").exists());
    assert_eq!(getfattr(&latest), "1");
    assert_eq!(getfattr(&m.path("k/old")), "0");
    let sha_file = m.path(&format!(".sha512/{}", w.entry("new").1.hex()));
    assert_eq!(
        getfattr(&sha_file),
        "1",
        "the pin is on the blob, whatever its name"
    );
}

#[test]
fn a_read_only_mount_shows_pins_made_by_prefetch_and_refuses_setfattr() {
    let w = World::new(&["a"]);
    let ro_cfg = NetworkcacheConfig {
        download_cache_url: Some(w.server.cache_url()),
        download_dir_url: Some(w.server.dir_url()),
        ..Default::default()
    }
    .trust(fixture("signature/signer-a.crt"))
    .write(w.dir.path(), "ro.cfg");
    let m = Mount::in_dir(&ro_cfg, w.dir.path(), &["-k", "k"]);
    let a = m.path("k/a");
    let out = cmd("setfattr", &["-n", PIN, "-v", "1", a.to_str().unwrap()]);
    assert!(
        out.stderr_text().contains("Read-only file system"),
        "{}",
        out.describe()
    );
    let out = w.prefetch(&ro_cfg, &["--pin"]);
    out.assert_success();
    assert_eq!(getfattr(&a), "1");
    w.read_ok(&m, "a");
}
