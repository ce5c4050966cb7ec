//! Helpers of the write-path tests (`tests/write.rs`), declared there with
//! `#[path = "common/write_util.rs"] mod write_util;`:
//! - [`Server`]: the embedded server over a store directory the test chooses, on its own
//!   runtime, that can be stopped and started again on the same address and store (a
//!   server that goes away and comes back);
//! - [`Mount`]: a `shacachefs mount -f` child that is always unmounted (`umount`, then
//!   `umount -l`) and ended when dropped, even when the test fails or killed the daemon;
//! - bounded commands ([`cmd`], [`cmd_long`], [`bounded`]), random files written in
//!   chunks, SHA-512 of files, the outbox as `shacachefs outbox list --json` shows it.
//!
//! Real-mount tests fail (never skip) when FUSE cannot be used.
#![allow(dead_code)]

use crate::common::{self, http_get, run_with_timeout, shacachefs, Output};
use serde_json::Value;
use shacachefs::digest::Sha512;
use shacachefs::server::{self, RunningServer, ServerOptions};
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a mount may take to appear.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(15);
/// Deadline of small commands (`cp` of small files, `ls`, `rm`, the CLI, …).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of commands moving hundreds of MiB.
pub const LONG_TIMEOUT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------------------
// The server.

/// The embedded server over `root`, restartable on the same address.
pub struct Server {
    running: Option<RunningServer>,
    addr: SocketAddr,
    opts: ServerOptions,
    // Declared last so that it outlives the server while dropping.
    runtime: tokio::runtime::Runtime,
}

impl Server {
    /// Starts on `127.0.0.1:0` over `root`; uploads need `upload_user` when given.
    pub fn start(root: &Path, upload_user: Option<(&str, &str)>) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("cannot build a tokio runtime");
        let opts = ServerOptions {
            root: root.to_path_buf(),
            upload_user: upload_user.map(|(u, p)| (u.to_string(), p.to_string())),
            tls: None,
        };
        let running = runtime
            .block_on(server::start("127.0.0.1:0".parse().unwrap(), opts.clone()))
            .expect("cannot start the embedded server");
        Server {
            addr: running.addr,
            running: Some(running),
            opts,
            runtime,
        }
    }

    /// `http://127.0.0.1:PORT/shacache`.
    pub fn cache_url(&self) -> String {
        format!("http://{}/shacache", self.addr)
    }

    /// `http://127.0.0.1:PORT/shadir`.
    pub fn dir_url(&self) -> String {
        format!("http://{}/shadir", self.addr)
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.opts.root
    }

    /// Stops the server: the port refuses connections once this returns.
    pub fn stop(&mut self) {
        if let Some(s) = self.running.take() {
            self.runtime.block_on(s.shutdown());
        }
    }

    /// Starts the server again on the same address and store.
    pub fn restart(&mut self) {
        self.stop();
        // The port was just closed; binding it again may need a moment (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .runtime
                .block_on(server::start(self.addr, self.opts.clone()))
            {
                Ok(s) => {
                    self.running = Some(s);
                    return;
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restarting the server on {}: {e}; trying again", self.addr);
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("cannot restart the server on {}: {e}", self.addr),
            }
        }
    }

    /// The entries of `key` as shadir answers them (`[inner, signature]` pairs), or
    /// `None` on 404. `key` must be made of URL-safe characters.
    #[track_caller]
    pub fn entries(&self, key: &str) -> Option<Vec<(String, String)>> {
        let url = format!("{}/{key}", self.dir_url());
        let r = http_get(&url);
        match r.status {
            404 => None,
            200 => {
                let v: Value = serde_json::from_slice(&r.body)
                    .unwrap_or_else(|e| panic!("GET {url}: not JSON ({e})"));
                let list = v
                    .as_array()
                    .unwrap_or_else(|| panic!("GET {url}: not a JSON array: {v}"));
                Some(
                    list.iter()
                        .map(|pair| {
                            let inner = pair[0].as_str().expect("inner is a string");
                            let sig = pair[1].as_str().expect("signature is a string");
                            (inner.to_string(), sig.to_string())
                        })
                        .collect(),
                )
            }
            s => panic!(
                "GET {url}: unexpected status {s}: {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }

    /// The parsed inner objects of `key`'s entries whose `file` is `name`, with the
    /// raw inner text and the signature.
    #[track_caller]
    pub fn entries_named(&self, key: &str, name: &str) -> Vec<PublishedEntry> {
        self.entries(key)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(inner, signature)| {
                let meta: serde_json::Map<String, Value> = serde_json::from_str(&inner)
                    .unwrap_or_else(|e| panic!("inner {inner:?} is not a JSON object: {e}"));
                (meta.get("file").and_then(Value::as_str) == Some(name)).then_some(PublishedEntry {
                    inner,
                    signature,
                    meta,
                })
            })
            .collect()
    }

    /// The blob file of `sha` in the store, when present.
    pub fn blob_exists(&self, sha_hex: &str) -> bool {
        self.root()
            .join("shacache")
            .join(&sha_hex[..2])
            .join(sha_hex)
            .is_file()
    }

    /// Size of the largest upload being received (`ROOT/.tmp-*`), if any.
    pub fn upload_in_progress(&self) -> Option<u64> {
        std::fs::read_dir(self.root())
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One published entry, as read from shadir.
#[derive(Debug, Clone)]
pub struct PublishedEntry {
    pub inner: String,
    pub signature: String,
    pub meta: serde_json::Map<String, Value>,
}

impl PublishedEntry {
    pub fn sha512(&self) -> &str {
        self.meta
            .get("sha512")
            .and_then(Value::as_str)
            .expect("entry without sha512")
    }
}

// ---------------------------------------------------------------------------------------
// Mounts.

#[track_caller]
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "real-mount tests need FUSE: /dev/fuse is missing (load the fuse module; \
         scripts/setup-test-deps installs fuse3)"
    );
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "real-mount tests must run as root (they mount FUSE filesystems)"
    );
}

/// Is something mounted exactly on `mp` (as `/proc/mounts` spells it)?
pub fn is_mounted(mp: &Path) -> bool {
    let want = mp
        .to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// Waits for a child at most `limit`; kills it when it runs over.
pub fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Runs a command to its end or kills it after `limit`; never panics (used in `Drop`).
fn quiet_status(mut c: Command, limit: Duration) -> Option<ExitStatus> {
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = c.spawn().ok()?;
    wait_within(&mut child, limit)
}

/// Unmounts `mp` if it is mounted: `umount`, else `umount -l`.
pub fn force_unmount(mp: &Path) {
    if is_mounted(mp) {
        let mut c = Command::new("umount");
        c.arg(mp);
        quiet_status(c, Duration::from_secs(10));
    }
    if is_mounted(mp) {
        let mut c = Command::new("umount");
        c.arg("-l").arg(mp);
        quiet_status(c, Duration::from_secs(10));
    }
}

/// A `shacachefs mount -f` child; unmounted and ended when dropped.
pub struct Mount {
    pub mountpoint: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Mounts `mountpoint` in the foreground with `--log-level info` (the log goes to
    /// `MOUNTPOINT.log`, appended to across remounts) and waits, bounded, until it is
    /// listed in `/proc/mounts`.
    #[track_caller]
    pub fn start(cfg: &Path, cache: &Path, mountpoint: &Path, extra: &[&str]) -> Mount {
        require_fuse();
        std::fs::create_dir_all(mountpoint).expect("creating the mountpoint");
        let log = mountpoint.with_extension("log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("creating the mount log");
        let mut args: Vec<OsString> = ["--log-level", "info", "mount", "-f", "-c"]
            .iter()
            .map(OsString::from)
            .collect();
        args.push(cfg.into());
        args.push("--cache-dir".into());
        args.push(cache.into());
        args.extend(extra.iter().map(OsString::from));
        args.push(mountpoint.into());
        let mut c = shacachefs(args);
        c.stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log file"))
            .stderr(logf);
        let child = c.spawn().expect("starting shacachefs mount");
        let mut m = Mount {
            mountpoint: mountpoint.to_path_buf(),
            log,
            child: Some(child),
        };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_mounted(mountpoint) {
            if let Ok(Some(status)) = m.child.as_mut().expect("child").try_wait() {
                panic!(
                    "shacachefs mount exited ({status}) before mounting:\n{}",
                    m.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not mounted after {MOUNT_TIMEOUT:?}:\n{}",
                mountpoint.display(),
                m.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory of the daemon so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status of the daemon");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// `umount`, then the daemon must exit successfully by itself.
    #[track_caller]
    pub fn unmount(&mut self) {
        let mut c = Command::new("umount");
        c.arg(&self.mountpoint);
        let out = run_with_timeout(c, CMD_TIMEOUT);
        assert!(
            out.success(),
            "umount failed:\n{}\n--- daemon log ---\n{}",
            out.describe(),
            self.log_text()
        );
        let mut child = self.child.take().expect("daemon running");
        let status = wait_within(&mut child, Duration::from_secs(15));
        assert!(
            status.is_some_and(|s| s.success()),
            "the daemon did not exit cleanly after umount ({status:?}):\n{}",
            self.log_text()
        );
        assert!(!is_mounted(&self.mountpoint));
    }

    /// `kill -9` of the daemon, then `umount -l` of the dead mount.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: a plain syscall on the pid of the daemon this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = wait_within(&mut child, Duration::from_secs(10));
        }
        force_unmount(&self.mountpoint);
        assert!(
            !is_mounted(&self.mountpoint),
            "the dead mount {} could not be cleaned",
            self.mountpoint.display()
        );
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        force_unmount(&self.mountpoint);
        if let Some(mut child) = self.child.take() {
            if wait_within(&mut child, Duration::from_secs(5)).is_none() {
                eprintln!("shacachefs mount had to be killed:\n{}", self.log_text());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Commands and files.

/// Runs `program ARGS…` with [`CMD_TIMEOUT`].
#[track_caller]
pub fn cmd<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Output {
    let mut c = Command::new(program);
    c.args(args);
    run_with_timeout(c, CMD_TIMEOUT)
}

/// Runs `program ARGS…` with [`LONG_TIMEOUT`].
#[track_caller]
pub fn cmd_long<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Output {
    let mut c = Command::new(program);
    c.args(args);
    run_with_timeout(c, LONG_TIMEOUT)
}

/// `sh -c SCRIPT` with [`CMD_TIMEOUT`].
#[track_caller]
pub fn sh(script: &str) -> Output {
    cmd("sh", &["-c", script])
}

/// `shacachefs ARGS…` with [`CMD_TIMEOUT`].
#[track_caller]
pub fn cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run_with_timeout(shacachefs(args), CMD_TIMEOUT)
}

/// Runs `f` in a thread and fails the test when it takes over [`CMD_TIMEOUT`] (a
/// filesystem call through a stuck mount must not hang the suite).
#[track_caller]
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(CMD_TIMEOUT)
        .unwrap_or_else(|_| panic!("{what} did not end within {CMD_TIMEOUT:?}"))
}

/// Reads a whole file (through a mount: bounded).
#[track_caller]
pub fn read(path: &Path) -> Vec<u8> {
    let p = path.to_path_buf();
    bounded(&format!("reading {}", path.display()), move || {
        std::fs::read(&p)
    })
    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The names in a directory (through a mount: bounded), sorted.
#[track_caller]
pub fn list_dir(dir: &Path) -> Vec<String> {
    let d = dir.to_path_buf();
    let mut names = bounded(&format!("listing {}", dir.display()), move || {
        std::fs::read_dir(&d).map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
    })
    .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    names.sort();
    names
}

/// `mkdir DIR` (through a mount: bounded).
#[track_caller]
pub fn mkdir(dir: &Path) {
    let d = dir.to_path_buf();
    bounded(&format!("mkdir {}", dir.display()), move || {
        std::fs::create_dir(&d)
    })
    .unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
}

/// Writes `len` pseudo-random bytes (xorshift64*, different per `seed`) to `path` in
/// 1 MiB chunks, so that large files never sit in memory.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(
        File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display())),
    );
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).expect("writing a random file");
        left -= n as u64;
    }
    f.flush().expect("writing a random file");
}

/// Writes `data` to `path`.
pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// Lowercase hex SHA-512 of a file (streamed).
#[track_caller]
pub fn sha512_file(path: &Path) -> String {
    Sha512::of_file(path)
        .unwrap_or_else(|e| panic!("hashing {}: {e}", path.display()))
        .0
        .hex()
}

/// Lowercase hex SHA-512 of bytes.
pub fn sha512_of(data: &[u8]) -> String {
    Sha512::of(data).hex()
}

/// Is the file at `prefix` a prefix of the file at `whole`? (Compared in chunks.)
pub fn is_prefix_of(prefix: &Path, whole: &Path) -> bool {
    let (Ok(mut a), Ok(mut b)) = (File::open(prefix), File::open(whole)) else {
        return false;
    };
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut a, &mut x);
        if n == 0 {
            return true;
        }
        if read_full(&mut b, &mut y[..n]) != n || x[..n] != y[..n] {
            return false;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// The outbox of a cache directory, as `shacachefs outbox list --json` shows it.
#[track_caller]
pub fn outbox_items(cache: &Path) -> Vec<Value> {
    let out = cli(&[
        OsString::from("outbox"),
        "list".into(),
        "--json".into(),
        "--cache-dir".into(),
        cache.into(),
    ]);
    out.assert_success();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("outbox list --json is not JSON ({e}):\n{}", out.describe()));
    v.as_array()
        .unwrap_or_else(|| panic!("outbox list --json is not an array: {v}"))
        .clone()
}

/// The outbox items named `name`.
#[track_caller]
pub fn outbox_named(cache: &Path, name: &str) -> Vec<Value> {
    outbox_items(cache)
        .into_iter()
        .filter(|i| i["name"].as_str() == Some(name))
        .collect()
}

/// Polls `cond` every 50 ms for at most `limit`; true when it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A configuration for `server` that signs with the fixture signer A and trusts only
/// its certificate (indented by two spaces, as SlapOS files write it).
pub fn signed_config(server: &Server, dir: &Path, name: &str) -> PathBuf {
    common::NetworkcacheConfig::for_urls(&server.cache_url(), &server.dir_url())
        .signer_a()
        .write(dir, name)
}

/// `networkcache-download -c CFG -k KEY 'file=="NAME"'` (the reference client), its
/// standard output written to `out`. Returns what it did.
#[track_caller]
pub fn reference_download(cfg: &Path, key: &str, name: &str, out: &Path) -> Output {
    let filter = format!("file=={}", serde_json::to_string(name).unwrap());
    let mut c = common::reference(
        "networkcache-download",
        [
            OsString::from("-c"),
            cfg.into(),
            "-k".into(),
            key.into(),
            filter.into(),
        ],
    );
    c.stdout(File::create(out).expect("creating the download target"));
    run_to_end(c, LONG_TIMEOUT)
}

/// `shacachefs download -c CFG -k KEY 'file=="NAME"' -o OUT`.
#[track_caller]
pub fn shacachefs_download(cfg: &Path, key: &str, name: &str, out: &Path) -> Output {
    let filter = format!("file=={}", serde_json::to_string(name).unwrap());
    run_with_timeout(
        shacachefs([
            OsString::from("download"),
            "-c".into(),
            cfg.into(),
            "-k".into(),
            key.into(),
            "-o".into(),
            out.into(),
            filter.into(),
        ]),
        LONG_TIMEOUT,
    )
}

/// Runs a command whose standard output is already redirected (to a file), capturing
/// standard error; kills it after `limit`.
#[track_caller]
pub fn run_to_end(mut c: Command, limit: Duration) -> Output {
    let what = format!("{c:?}");
    c.stdin(Stdio::null()).stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let status = wait_within(&mut child, limit)
        .unwrap_or_else(|| panic!("{what} ran over {limit:?} and was killed"));
    Output {
        what,
        status,
        stdout: Vec::new(),
        stderr: reader.join().unwrap_or_default(),
    }
}
