//! The integration tests' support, one place per concept (in the manner of cargo's
//! `cargo-test-support`):
//! - [`server`]: the embedded server on its own runtime, restartable on the same port and
//!   store ([`Server`], [`ServerBuilder`]);
//! - [`faulty`]: the rules-driven fault-injecting HTTP/1 server (delays, trickles,
//!   statuses, lying sizes, corrupt bytes, hang-ups, held requests);
//! - [`mount`]: the mount guard ([`Mount`], [`MountBuilder`]), mounted with bounded waits
//!   and always unmounted when dropped;
//! - [`pki`]: CA, server and client certificates made in Rust ([`pki::Pki`]);
//! - [`random`]: seeded random data (`rand`);
//! - [`publish`]: the fixture signers and a publishing client; [`files`]: bounded
//!   commands and file helpers;
//! - here: [`NetworkcacheConfig`] (a `[networkcache]` file as SlapOS operators write it),
//!   [`run`] and [`shacachefs`] (child processes with a hard deadline), [`reference_venv`]
//!   (the reference client's virtual environment; interop tests fail, never skip, when
//!   it is missing), [`http_get`] (a raw HTTP/1.0 GET), [`fixture`], [`tempdir`].

pub mod faulty;
pub mod files;
pub mod mount;
pub mod pki;
pub mod publish;
pub mod random;
pub mod server;

pub use files::*;
pub use mount::*;
pub use publish::*;
pub use random::*;
pub use server::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Default deadline of a child process started by a test.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Environment variables that would send a child's requests to 127.0.0.1 through a proxy.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

/// A file under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// A tokio runtime of its own (two workers) for a server that must keep answering while
/// a plain `#[test]` blocks on child processes and mounts.
pub fn own_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime")
}

/// Closes `f`, returning the error of `close()` (which `File`'s drop ignores): that is
/// where shacachefs reports a failed upload.
pub fn close_checked(f: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: we own the descriptor and close it once.
    if unsafe { libc::close(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `body` as the test `name` (its full path, e.g. `server::t`) alone in a fresh
/// process of this test binary, for a test that measures the whole process (its peak
/// RSS): in this process the other tests running meanwhile would count too.
#[track_caller]
pub fn in_own_process(name: &str, body: impl FnOnce()) {
    const VAR: &str = "SHACACHEFS_TEST_OWN_PROCESS";
    if std::env::var_os(VAR).is_some_and(|v| v == name) {
        body();
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let mut c = Command::new(exe);
    c.args([name, "--exact", "--test-threads=1"]).env(VAR, name);
    let out = run_with_timeout(c, CHILD_TIMEOUT);
    out.assert_success();
    assert!(
        out.stdout_text().contains("1 passed"),
        "{name} did not run in its own process:\n{}",
        out.describe()
    );
}

/// A fresh temporary directory (removed when dropped).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("shacachefs-test-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// The `[networkcache]` section of a configuration file.
#[derive(Debug, Clone, Default)]
pub struct NetworkcacheConfig {
    pub download_cache_url: Option<String>,
    pub download_dir_url: Option<String>,
    pub upload_cache_url: Option<String>,
    pub upload_dir_url: Option<String>,
    /// `signature-private-key-file`.
    pub signing_key: Option<PathBuf>,
    /// PEM files whose certificates make up `signature-certificate-list`, in order.
    pub certificates: Vec<PathBuf>,
    /// Any other `option = value` lines, written as given.
    pub extra: Vec<(String, String)>,
}

impl NetworkcacheConfig {
    /// Download and upload URLs set to the given bases; no signing, no certificates.
    pub fn for_urls(cache_url: &str, dir_url: &str) -> Self {
        NetworkcacheConfig {
            download_cache_url: Some(cache_url.to_string()),
            download_dir_url: Some(dir_url.to_string()),
            upload_cache_url: Some(cache_url.to_string()),
            upload_dir_url: Some(dir_url.to_string()),
            ..Default::default()
        }
    }

    /// Signs with `key` (a PEM file).
    pub fn signing_key(mut self, key: impl Into<PathBuf>) -> Self {
        self.signing_key = Some(key.into());
        self
    }

    /// Adds a trusted certificate (a PEM file).
    pub fn trust(mut self, cert: impl Into<PathBuf>) -> Self {
        self.certificates.push(cert.into());
        self
    }

    /// Signs with the fixture signer A and trusts only it.
    pub fn signer_a(self) -> Self {
        self.signing_key(fixture("signature/signer-a.pkcs1.key"))
            .trust(fixture("signature/signer-a.crt"))
    }

    /// Signs with the fixture signer B and trusts only it.
    pub fn signer_b(self) -> Self {
        self.signing_key(fixture("signature/signer-b.key"))
            .trust(fixture("signature/signer-b.crt"))
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::from("[networkcache]\n");
        let options = [
            ("download-cache-url", &self.download_cache_url),
            ("download-dir-url", &self.download_dir_url),
            ("upload-cache-url", &self.upload_cache_url),
            ("upload-dir-url", &self.upload_dir_url),
        ];
        for (name, value) in options {
            if let Some(v) = value {
                out.push_str(&format!("{name} = {v}\n"));
            }
        }
        if let Some(key) = &self.signing_key {
            out.push_str(&format!("signature-private-key-file = {}\n", key.display()));
        }
        for (name, value) in &self.extra {
            out.push_str(&format!("{name} = {value}\n"));
        }
        if !self.certificates.is_empty() {
            // A multi-line value: continuation lines are indented (two spaces).
            out.push_str("signature-certificate-list =\n");
            for cert in &self.certificates {
                let pem = std::fs::read_to_string(cert)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", cert.display()));
                for line in pem.lines().filter(|l| !l.trim().is_empty()) {
                    out.push_str("  ");
                    out.push_str(line.trim());
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Writes the file as `dir/name` and returns its path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.render())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

/// What a finished child process did.
#[derive(Debug)]
pub struct Output {
    /// The command line, for messages.
    pub what: String,
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Panics, showing both streams, unless the child exited with status 0.
    #[track_caller]
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "{} failed:\n{}", self.what, self.describe());
        self
    }

    /// Panics, showing both streams, unless the child exited with a nonzero status.
    #[track_caller]
    pub fn assert_failure(&self) -> &Self {
        assert!(
            !self.success(),
            "{} unexpectedly succeeded:\n{}",
            self.what,
            self.describe()
        );
        self
    }

    /// Status, stdout (first 4 KiB) and stderr (last 8 KiB) for failure messages.
    pub fn describe(&self) -> String {
        let out = &self.stdout[..self.stdout.len().min(4096)];
        let err = &self.stderr[self.stderr.len().saturating_sub(8192)..];
        format!(
            "status: {}\n--- stdout ({} bytes) ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.stdout.len(),
            String::from_utf8_lossy(out),
            String::from_utf8_lossy(err)
        )
    }
}

/// Runs `cmd` to completion with stdin closed, capturing both streams. A child still
/// running after `timeout` is killed and the calling test fails.
#[track_caller]
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    // Drain both pipes in threads so a chatty child never blocks on a full pipe.
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out_pipe.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err_reader.join().unwrap_or_default();
                panic!(
                    "{what} ran over {timeout:?} and was killed; stderr:\n{}",
                    String::from_utf8_lossy(&stderr)
                );
            }
            Err(e) => panic!("cannot wait for {what}: {e}"),
        }
    };
    Output {
        what,
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// [`run_with_timeout`] with [`CHILD_TIMEOUT`].
#[track_caller]
pub fn run(cmd: Command) -> Output {
    run_with_timeout(cmd, CHILD_TIMEOUT)
}

/// Removes the proxy variables, so requests to the test server go straight to it.
pub fn without_proxy(cmd: &mut Command) -> &mut Command {
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// The `shacachefs` binary built for this test run.
pub fn shacachefs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shacachefs"))
}

/// A `shacachefs ARGS…` command (no proxy), ready for [`run`].
pub fn shacachefs<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(shacachefs_bin());
    without_proxy(&mut cmd).args(args);
    cmd
}

/// A running mount's status document: `shacachefs status --json MOUNTPOINT`.
pub fn status_json(mnt: &Path) -> serde_json::Value {
    let out = run(shacachefs([
        "status".as_ref(),
        "--json".as_ref(),
        mnt.as_os_str(),
    ]));
    out.assert_success();
    serde_json::from_str(&out.stdout_text()).expect("status --json prints JSON")
}

/// The reference client's virtual environment (`$SHACACHEFS_VENV`). Panics, telling to
/// run `scripts/test`, when the variable is unset or the environment lacks the client.
#[track_caller]
pub fn reference_venv() -> PathBuf {
    const HOW: &str = "the reference client (slapos.libnetworkcache) is needed: run \
         `scripts/test` (it runs scripts/setup-test-deps and exports SHACACHEFS_VENV), or \
         run scripts/setup-test-deps and export SHACACHEFS_VENV=$PWD/.venv";
    let venv = match std::env::var_os("SHACACHEFS_VENV") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!("SHACACHEFS_VENV is not set: {HOW}"),
    };
    for tool in ["networkcache-upload", "networkcache-download", "python"] {
        let path = venv.join("bin").join(tool);
        assert!(
            path.is_file(),
            "{} is missing (SHACACHEFS_VENV={}): {HOW}",
            path.display(),
            venv.display()
        );
    }
    venv
}

/// A command running `$SHACACHEFS_VENV/bin/<tool> ARGS…` (no proxy).
#[track_caller]
pub fn reference<I, S>(tool: &str, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = Command::new(reference_venv().join("bin").join(tool));
    without_proxy(&mut cmd).args(args);
    cmd
}

/// A plain HTTP answer.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// `GET url` (`http://HOST:PORT/PATH` only) as HTTP/1.0, so the body ends with the
/// connection and is never chunked. Times out after 30 s.
#[track_caller]
pub fn http_get(url: &str) -> HttpResponse {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("http_get needs an http:// URL, got {url}"));
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream =
        TcpStream::connect(host).unwrap_or_else(|e| panic!("cannot connect to {host}: {e}"));
    let limit = Some(Duration::from_secs(30));
    stream.set_read_timeout(limit).expect("set_read_timeout");
    stream.set_write_timeout(limit).expect("set_write_timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {url}: no end of headers in the answer"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split("\r\n")
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {url}: bad status line in {head:?}"));
    HttpResponse {
        status,
        body: raw[split + 4..].to_vec(),
    }
}
