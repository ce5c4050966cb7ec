//! Bounded commands ([`cmd`], [`cmd_long`], [`sh`], [`cli`], [`bounded`]), files read and
//! listed through a mount with a deadline, SHA-512 of files, the outbox as `shacachefs
//! outbox list --json` shows it, and the two downloaders (reference and shacachefs).

use super::mount::wait_within;
use super::server::Server;
use super::{self as common, run_with_timeout, shacachefs, Output};
use serde_json::Value;
use shacachefs::digest::Sha512;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Deadline of small commands (`cp` of small files, `ls`, `rm`, the CLI, …).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline of commands moving hundreds of MiB.
pub const LONG_TIMEOUT: Duration = Duration::from_secs(600);

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

/// Every path under `dir`, recursively, directories included (a symbolic link is
/// listed, never followed).
pub fn paths_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
            found.push(e.path());
        }
    }
    found
}

/// Every path under `dir` that is not a directory, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    paths_under(dir)
        .into_iter()
        .filter(|p| !std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()))
        .collect()
}

/// Every file under `dir` (recursively) whose name is `name`.
pub fn find_named(dir: &Path, name: &str) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()) == Some(name))
        .collect()
}

/// Every regular file under `dir` at least `min_len` bytes long.
pub fn files_at_least(dir: &Path, min_len: u64) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file() && m.len() >= min_len))
        .collect()
}

/// A free port on 127.0.0.1 (for a child process to bind; a lost race is retried by the
/// caller, bounded).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}
