//! A bounded soak (issue 6): for `SHACACHEFS_SOAK_SECONDS` (default 60) 8 reader
//! threads and 2 writer threads work through one real mount against the embedded server.
//! Readers read random published entries (the first reads cold) and compare the bytes
//! and the `user.shacache.sha512` attribute with the SHA-512 the entry was published
//! with, and now and then `.entries.json`; writers `cp` new random files under distinct
//! names and read each back. The cache is small (`--cache-size 32M`), so blobs are
//! evicted and fetched again while others are open.
//!
//! At the end: zero errors, every hash right, everything the writers published is on
//! shadir and in a fresh mount's `.entries.json`; the daemon's open descriptors
//! (`/proc/PID/fd`, sampled every 2 s) stay within [`FD_PEAK_SLACK`] of the start under
//! load and within [`FD_END_SLACK`] once idle again, and its RSS (`VmRSS`) stays under
//! [`RSS_LIMIT_KIB`]. The figures are printed. Every loop is bounded by time and count.
//! Real mounts: the test fails (never skips) when FUSE is unusable.

use crate::support;
use rand::{Rng as _, RngCore as _};

use shacachefs::digest::Sha512;
use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{
    cli, list_dir, sha512_file, signed_config, wait_within, write_random_file, Mount, Server,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const KEY: &str = "soak";
const READERS: usize = 8;
const WRITERS: usize = 2;
/// Entries published before the mount (read cold at first).
const INITIAL_ENTRIES: usize = 16;
/// Descriptors the daemon may hold over its idle start while 10 threads work (open
/// blobs, staged files, HTTP connections).
const FD_PEAK_SLACK: usize = 32;
/// Descriptors it may hold over its idle start once the load is over (a leak shows
/// here).
const FD_END_SLACK: usize = 16;
/// Resident memory the daemon must stay under.
const RSS_LIMIT_KIB: u64 = 96 * 1024;
/// Per-thread bound on operations, besides the time limit.
const MAX_OPS: usize = 100_000;
/// How often the daemon is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Errors kept for the report (all are counted).
const MAX_KEPT_ERRORS: usize = 50;

fn soak_duration() -> Duration {
    let secs = std::env::var("SHACACHEFS_SOAK_SECONDS")
        .ok()
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("SHACACHEFS_SOAK_SECONDS={s:?} is not a number"))
        })
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// What the threads share.
#[derive(Default)]
struct Shared {
    /// Published entries (name, sha512), the initial ones first.
    published: Mutex<Vec<(String, String)>>,
    errors: Mutex<Vec<String>>,
    error_count: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    listings: AtomicU64,
    writes: AtomicU64,
    written_bytes: AtomicU64,
}

impl Shared {
    fn error(&self, what: String) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut kept = self.errors.lock().unwrap();
        if kept.len() < MAX_KEPT_ERRORS {
            kept.push(what);
        }
    }
    fn snapshot(&self) -> Vec<(String, String)> {
        self.published.lock().unwrap().clone()
    }
}

/// `getxattr(path, name)` as text.
fn xattr(path: &Path, name: &str) -> std::io::Result<String> {
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    let c_name = CString::new(name)?;
    let mut buf = vec![0u8; 1024];
    // SAFETY: both strings are NUL-terminated and the buffer's length is passed.
    let n = unsafe {
        libc::getxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Reads `path` through the mount, hashing as it goes.
fn hash_through(path: &Path) -> std::io::Result<(String, u64)> {
    let (sha, len) = Sha512::of_reader(File::open(path)?)?;
    Ok((sha.hex(), len))
}

/// Checks one entry through the mount: attribute, then content.
fn check_entry(dir: &Path, name: &str, sha: &str) -> Result<u64, String> {
    let path = dir.join(name);
    let attr = xattr(&path, "user.shacache.sha512").map_err(|e| format!("getxattr {name}: {e}"))?;
    if attr != sha {
        return Err(format!(
            "{name}: user.shacache.sha512 is {attr}, want {sha}"
        ));
    }
    let (got, len) = hash_through(&path).map_err(|e| format!("reading {name}: {e}"))?;
    if got != sha {
        return Err(format!(
            "{name}: read {len} bytes hashing to {got}, want {sha}"
        ));
    }
    Ok(len)
}

/// `.entries.json` agrees with what is known: every known name it lists has the known
/// blob, and the entries published before the mount are all there.
fn check_entries_json(dir: &Path, known: &[(String, String)]) -> Result<(), String> {
    let text = std::fs::read(dir.join(".entries.json"))
        .map_err(|e| format!("reading .entries.json: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!(".entries.json is not JSON: {e}"))?;
    let listed: BTreeMap<&str, &str> = v
        .as_array()
        .ok_or(".entries.json is not an array")?
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["sha512"].as_str()?)))
        .collect();
    for (i, (name, sha)) in known.iter().enumerate() {
        match listed.get(name.as_str()) {
            Some(s) if s == sha => {}
            Some(s) => return Err(format!(".entries.json: {name} has {s}, want {sha}")),
            None if i < INITIAL_ENTRIES => {
                return Err(format!(".entries.json lacks {name}"));
            }
            None => {}
        }
    }
    Ok(())
}

fn reader(shared: Arc<Shared>, dir: PathBuf, deadline: Instant, seed: u64) {
    let mut rng = support::rng(seed);
    for i in 0..MAX_OPS {
        if Instant::now() >= deadline {
            break;
        }
        let known = shared.snapshot();
        if i % 16 == 15 {
            match check_entries_json(&dir, &known) {
                Ok(()) => shared.listings.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    shared.error(e);
                    0
                }
            };
            continue;
        }
        let (name, sha) = &known[rng.gen_range(0..known.len())];
        match check_entry(&dir, name, sha) {
            Ok(len) => {
                shared.reads.fetch_add(1, Ordering::Relaxed);
                shared.read_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) => shared.error(e),
        }
    }
}

fn writer(shared: Arc<Shared>, dir: PathBuf, scratch: PathBuf, deadline: Instant, id: usize) {
    let mut rng = support::rng(0x5eed + id as u64);
    for i in 0..MAX_OPS {
        if Instant::now() >= deadline {
            break;
        }
        let name = format!("w{id}-{i:04}.bin");
        let src = scratch.join(&name);
        let size = 16 * KIB + rng.gen_range(0..4 * MIB);
        write_random_file(&src, size, rng.next_u64());
        let sha = sha512_file(&src);
        let mut child = match Command::new("cp")
            .arg(&src)
            .arg(dir.join(&name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                shared.error(format!("cannot start cp: {e}"));
                break;
            }
        };
        match wait_within(&mut child, Duration::from_secs(120)) {
            Some(s) if s.success() => {}
            other => {
                shared.error(format!("cp of {name} ({size} bytes) failed: {other:?}"));
                let _ = std::fs::remove_file(&src);
                continue;
            }
        }
        let _ = std::fs::remove_file(&src);
        match check_entry(&dir, &name, &sha) {
            Ok(_) => {
                shared.writes.fetch_add(1, Ordering::Relaxed);
                shared.written_bytes.fetch_add(size, Ordering::Relaxed);
                shared.published.lock().unwrap().push((name, sha));
            }
            Err(e) => shared.error(format!("after cp: {e}")),
        }
    }
}

/// Open descriptors and resident memory (KiB) of a process.
fn sample(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count())
        .expect("/proc/PID/fd of the daemon");
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmRSS of the daemon");
    (fds, rss)
}

#[test]
fn readers_and_writers_through_one_mount_stay_correct_and_bounded() {
    let duration = soak_duration();
    let work = support::tempdir();
    let server = Server::start_at(&work.path().join("store"), None);
    let cfg = signed_config(&server, work.path(), "slapcache.cfg");
    let scratch = work.path().join("scratch");
    std::fs::create_dir_all(&scratch).expect("scratch directory");

    // Entries published before the mount, with the CLI.
    let shared = Arc::new(Shared::default());
    let mut rng = support::rng(42);
    for i in 0..INITIAL_ENTRIES {
        let name = format!("initial-{i:02}.bin");
        let src = scratch.join(&name);
        write_random_file(&src, 4 * KIB + rng.gen_range(0..2 * MIB), rng.next_u64());
        let sha = sha512_file(&src);
        cli(&[
            OsString::from("upload"),
            "-c".into(),
            cfg.clone().into(),
            "-k".into(),
            KEY.into(),
            "-f".into(),
            src.clone().into(),
            format!("file={name}").into(),
        ])
        .assert_success();
        std::fs::remove_file(&src).expect("removing a source");
        shared.published.lock().unwrap().push((name, sha));
    }

    let cache = work.path().join("cache");
    let mnt = work.path().join("mnt");
    let mut m = Mount::start(&cfg, &cache, &mnt, &["--cache-size", "32M"]);
    let dir = m.path(KEY);
    let names = entry_names(&dir);
    assert_eq!(
        names.len(),
        INITIAL_ENTRIES,
        "the key should list the initial entries: {names:?}"
    );
    let pid = m.pid();
    let (fd_start, rss_start) = sample(pid);

    let started = Instant::now();
    let deadline = started + duration;
    let mut threads = Vec::new();
    for r in 0..READERS {
        let (s, d) = (shared.clone(), dir.clone());
        threads.push(std::thread::spawn(move || {
            reader(s, d, deadline, 1000 + r as u64)
        }));
    }
    for w in 0..WRITERS {
        let (s, d, sc) = (shared.clone(), dir.clone(), scratch.clone());
        threads.push(std::thread::spawn(move || writer(s, d, sc, deadline, w)));
    }

    let (mut fd_max, mut rss_max, mut samples) = (fd_start, rss_start, 0);
    // Bounded: the threads end at the deadline; a stuck one fails the test after grace.
    let grace = Duration::from_secs(150);
    while threads.iter().any(|t| !t.is_finished()) {
        assert!(
            started.elapsed() < duration + grace,
            "soak threads still running {grace:?} after the deadline: a call through the \
             mount hangs\n{}",
            m.log_text()
        );
        let (fds, rss) = sample(pid);
        fd_max = fd_max.max(fds);
        rss_max = rss_max.max(rss);
        samples += 1;
        let until = Instant::now() + SAMPLE_EVERY;
        while Instant::now() < until && threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let elapsed = started.elapsed();
    for t in threads {
        if t.join().is_err() {
            shared.error("a soak thread panicked".into());
        }
    }
    // Idle again: what is still open now was kept, not in use.
    std::thread::sleep(Duration::from_secs(2));
    let (fd_end, rss_end) = sample(pid);
    fd_max = fd_max.max(fd_end);
    rss_max = rss_max.max(rss_end);

    let known = shared.snapshot();
    let reads = shared.reads.load(Ordering::Relaxed);
    let read_mib = shared.read_bytes.load(Ordering::Relaxed) as f64 / MIB as f64;
    let writes = shared.writes.load(Ordering::Relaxed);
    let written_mib = shared.written_bytes.load(Ordering::Relaxed) as f64 / MIB as f64;
    let listings = shared.listings.load(Ordering::Relaxed);
    let errors = shared.error_count.load(Ordering::Relaxed);
    eprintln!(
        "soak: {:.1} s, {READERS} readers + {WRITERS} writers: {reads} reads ({read_mib:.0} MiB), \
         {listings} .entries.json checks, {writes} files written ({written_mib:.0} MiB), \
         {errors} errors",
        elapsed.as_secs_f64()
    );
    eprintln!(
        "soak: daemon fds: start {fd_start}, max {fd_max} (bound {}), idle end {fd_end} \
         (bound {}); VmRSS: start {} MiB, max {:.1} MiB, end {:.1} MiB (bound {} MiB); \
         {samples} samples",
        fd_start + FD_PEAK_SLACK,
        fd_start + FD_END_SLACK,
        rss_start / 1024,
        rss_max as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        RSS_LIMIT_KIB / 1024
    );
    let kept = shared.errors.lock().unwrap().clone();
    assert!(
        errors == 0,
        "{errors} errors during the soak, the first ones:\n{}\n--- daemon log (end) ---\n{}",
        kept.join("\n"),
        log_tail(&m.log_text())
    );
    assert!(reads > 0 && writes > 0, "the soak did nothing");
    assert!(
        fd_max <= fd_start + FD_PEAK_SLACK,
        "the daemon's descriptors grew from {fd_start} to {fd_max} under load"
    );
    assert!(
        fd_end <= fd_start + FD_END_SLACK,
        "the daemon kept {fd_end} descriptors once idle (started with {fd_start}): a leak?"
    );
    assert!(
        rss_max < RSS_LIMIT_KIB,
        "the daemon's RSS reached {rss_max} KiB (bound {RSS_LIMIT_KIB} KiB)"
    );
    m.unmount();

    // Everything written is on shadir with its blob, and a fresh mount lists it right.
    let on_shadir: BTreeMap<String, String> = server
        .entries(KEY)
        .unwrap_or_default()
        .into_iter()
        .map(|(inner, _)| {
            let v: serde_json::Value = serde_json::from_str(&inner).expect("inner JSON");
            (
                v["file"].as_str().expect("file").to_string(),
                v["sha512"].as_str().expect("sha512").to_string(),
            )
        })
        .collect();
    for (name, sha) in &known {
        assert_eq!(
            on_shadir.get(name),
            Some(sha),
            "{name}: not on shadir with its blob"
        );
        assert!(server.blob_exists(sha), "{name}: shacache lacks {sha}");
    }
    let mut m = Mount::start(&cfg, &cache, &mnt, &[]);
    if let Err(e) = check_entries_json(&m.path(KEY), &known) {
        panic!("fresh mount: {e}");
    }
    let listed = entry_names(&m.path(KEY));
    let want: Vec<String> = known
        .iter()
        .map(|(n, _)| n.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(listed, want, "fresh mount: the names");
    m.unmount();
}

/// The entry names of a key directory (without `latest` and `.entries.json`), sorted.
fn entry_names(dir: &Path) -> Vec<String> {
    list_dir(dir)
        .into_iter()
        .filter(|n| n != "latest" && n != ".entries.json")
        .collect()
}

fn log_tail(log: &str) -> &str {
    let start = log.len().saturating_sub(6000);
    let start = (start..log.len())
        .find(|&i| log.is_char_boundary(i))
        .unwrap_or(log.len());
    &log[start..]
}
