//! Crash consistency (issue 6): the mount daemon is killed with `kill -9` at random
//! moments of uploads (`cp` of a few MiB into a key) and cold downloads (`cat` of an entry
//! not yet cached), the dead mount is cleaned (`umount -l`), and then, before the next
//! mount on the same `--cache-dir`:
//! - every file under `DIR/v1/blobs` is a blob whose name is the SHA-512 of its content
//!   (hashed here), and `shacachefs fsck` removes nothing;
//! - every outbox item is one of the files being copied, its `data` a prefix of the
//!   source (or all of it);
//! - every entry on shadir names a blob shacache has (with the right bytes);
//! - a `cp` that succeeded before the kill was published; a `cat` that succeeded gave
//!   the whole blob, one that failed a prefix of it (never other bytes).
//!
//! Each run mounts again on the same cache (a remount after a crash), and a last mount
//! reads everything published. The moments are drawn from a seeded RNG: the seed is
//! printed, and `SHACACHEFS_CRASH_SEED=N` replays it. Real mounts: the test fails (never
//! skips) when FUSE is unusable, and `support::Mount` always unmounts.

use crate::support;
use rand::{Rng as _, RngCore as _};

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{
    bounded, cli, is_prefix_of, list_dir, mkdir, outbox_items, read, sha512_file, sha512_of,
    signed_config, wait_within, write_random_file, Mount, Server,
};

const RUNS: usize = 20;
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The key every run writes into or reads from.
const KEY: &str = "crash-key";
/// What the whole test should take (printed; runs over it are reported, not failed, on
/// a loaded machine).
const TARGET_TOTAL: Duration = Duration::from_secs(90);
/// A hard ceiling on the whole test: beyond it something hangs.
const HARD_TOTAL: Duration = Duration::from_secs(400);
/// Longest wait for the moment a run is killed at.
const EVENT_WAIT: Duration = Duration::from_secs(3);

/// The seed: `SHACACHEFS_CRASH_SEED`, else the clock.
fn seed() -> u64 {
    if let Some(s) = std::env::var_os("SHACACHEFS_CRASH_SEED") {
        let s = s.to_string_lossy();
        return s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SHACACHEFS_CRASH_SEED={s:?} is not a number"));
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

/// When to kill the daemon.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// A random delay after the command started.
    After(Duration),
    /// Once the staged data in the outbox reaches this share (per mille) of the source.
    Staged(u64),
    /// Once the server receives the blob's POST.
    Posting,
    /// Once a download is being written to the cache's temporary directory.
    Downloading,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Upload,
    Download,
}

/// What happened in one run, for the summary.
#[derive(Debug)]
struct RunReport {
    kind: Kind,
    size: u64,
    moment: Moment,
    /// The moment's event was seen (false: the command ended or the wait ran out first).
    event_seen: bool,
    /// The command was still running when the daemon was killed.
    mid_operation: bool,
    /// The command succeeded.
    succeeded: bool,
}

struct World {
    server: Server,
    cfg: PathBuf,
    work: tempfile::TempDir,
    /// Source file of every name ever written or published (names are distinct).
    sources: BTreeMap<String, PathBuf>,
    /// Names whose `cp` succeeded or that were published with the CLI: they must be on
    /// shadir and readable through every later mount.
    must_exist: BTreeMap<String, String>,
    /// Names of every file copied in (only those may be in the outbox).
    uploaded: HashSet<String>,
}

impl World {
    fn cache(&self) -> PathBuf {
        self.work.path().join("cache")
    }
    fn mountpoint(&self) -> PathBuf {
        self.work.path().join("mnt")
    }
    fn src_dir(&self) -> PathBuf {
        let d = self.work.path().join("src");
        std::fs::create_dir_all(&d).expect("creating the source directory");
        d
    }
    /// A mount on the shared cache. `--dir-ttl 0`: a remount would otherwise trust the
    /// listing saved by the previous mount for the TTL, and not see what the CLI
    /// published since.
    fn mount(&self) -> Mount {
        Mount::start(
            &self.cfg,
            &self.cache(),
            &self.mountpoint(),
            &["--dir-ttl", "0"],
        )
    }

    /// Publishes `path` under `name` with the CLI (so that no mount has cached it).
    #[track_caller]
    fn publish_with_cli(&self, path: &Path, name: &str) {
        cli(&[
            OsString::from("upload"),
            "-c".into(),
            self.cfg.clone().into(),
            "-k".into(),
            KEY.into(),
            "-f".into(),
            path.into(),
            format!("file={name}").into(),
        ])
        .assert_success();
    }
}

#[test]
fn kill_9_at_random_moments_keeps_cache_outbox_and_shadir_consistent() {
    let seed = seed();
    eprintln!("crash test seed: {seed} (replay with SHACACHEFS_CRASH_SEED={seed})");
    let started = Instant::now();
    let mut rng = support::rng(seed);
    let work = support::tempdir();
    let server = Server::start_at(&work.path().join("store"), None);
    let cfg = signed_config(&server, work.path(), "slapcache.cfg");
    let mut w = World {
        server,
        cfg,
        work,
        sources: BTreeMap::new(),
        must_exist: BTreeMap::new(),
        uploaded: HashSet::new(),
    };
    let mut reports = Vec::new();
    for run in 0..RUNS {
        assert!(
            started.elapsed() < HARD_TOTAL,
            "the crash runs take over {HARD_TOTAL:?}: something hangs"
        );
        let t0 = Instant::now();
        let report = one_run(&mut w, &mut rng, run);
        let mut context = format!("run {run} (seed {seed}): {report:?}");
        check_after_crash(&w, &mut context);
        eprintln!("{context}; {} ms", t0.elapsed().as_millis());
        reports.push(report);
    }

    // The last remount reads everything published, with the right bytes.
    let mut m = w.mount();
    let published = published_names(&w);
    let names = list_dir(&m.path(KEY));
    for (name, sha) in &published {
        assert!(
            names.contains(name),
            "{name} is published but not listed after the last remount: {names:?}\n{}",
            m.log_text()
        );
        let data = read(&m.path(&format!("{KEY}/{name}")));
        assert_eq!(
            &sha512_of(&data),
            sha,
            "{name}: wrong bytes after the last remount"
        );
    }
    for name in w.must_exist.keys() {
        assert!(
            published.contains_key(name),
            "{name} was published (its cp or upload succeeded) but shadir lost it"
        );
    }
    m.unmount();

    let total = started.elapsed();
    let mid = reports.iter().filter(|r| r.mid_operation).count();
    let uploads = reports.iter().filter(|r| r.kind == Kind::Upload).count();
    let seen = reports.iter().filter(|r| r.event_seen).count();
    let ok = reports.iter().filter(|r| r.succeeded).count();
    let pending = outbox_items(&w.cache()).len();
    let moved = reports.iter().map(|r| r.size).sum::<u64>() / MIB;
    let timed = reports
        .iter()
        .filter(|r| matches!(r.moment, Moment::After(_)))
        .count();
    eprintln!(
        "crash test: {RUNS} runs ({uploads} uploads, {} downloads) in {:.1} s (target {:?}); \
         {moved} MiB; {timed} killed after a random delay, {} at a watched moment \
         ({seen} seen); {mid} killed mid-operation, {ok} commands succeeded; \
         {} entries published, {pending} outbox items left; seed {seed}",
        RUNS - uploads,
        total.as_secs_f64(),
        TARGET_TOTAL,
        RUNS - timed,
        published.len(),
    );
    if total > TARGET_TOTAL {
        eprintln!("crash test: over its {TARGET_TOTAL:?} target (a loaded machine?)");
    }
    assert!(
        mid > 0,
        "no run killed the daemon while a command was running: the test tested nothing"
    );
}

/// One run: mount (a remount after the previous crash), start a command, kill the daemon
/// at the chosen moment, clean the mount, look at what the command did.
fn one_run(w: &mut World, rng: &mut support::TestRng, run: usize) -> RunReport {
    let kind = if rng.gen_range(0..2u64) == 0 {
        Kind::Upload
    } else {
        Kind::Download
    };
    let size = MIB + rng.gen_range(0..5 * MIB) + rng.gen_range(0..64 * KIB);
    let name = format!("run{run:02}-{size}.bin");
    let src = w.src_dir().join(&name);
    write_random_file(&src, size, rng.next_u64());
    let sha = sha512_file(&src);
    w.sources.insert(name.clone(), src.clone());
    let moment = match (kind, rng.gen_range(0..3u64)) {
        (_, 0) => Moment::After(Duration::from_millis(rng.gen_range(0..300u64))),
        (Kind::Upload, 1) => Moment::Staged(rng.gen_range(0..1000u64)),
        (Kind::Upload, _) => Moment::Posting,
        (Kind::Download, _) => Moment::Downloading,
    };
    if kind == Kind::Download {
        w.publish_with_cli(&src, &name);
        w.must_exist.insert(name.clone(), sha.clone());
    } else {
        w.uploaded.insert(name.clone());
    }

    let mut m = w.mount();
    // A remount shows what earlier runs published.
    let key_dir = m.path(KEY);
    if !w.must_exist.is_empty() || key_dir_exists(&key_dir) {
        let names = list_dir(&key_dir);
        for n in w.must_exist.keys() {
            assert!(
                names.contains(n),
                "run {run}: {n} is published but not listed after a remount: {names:?}\n{}",
                m.log_text()
            );
        }
    } else {
        mkdir(&key_dir);
    }

    let out = w.work.path().join(format!("{name}.out"));
    let mut child = match kind {
        Kind::Upload => Command::new("cp")
            .arg(&src)
            .arg(m.path(&format!("{KEY}/{name}")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting cp"),
        Kind::Download => Command::new("cat")
            .arg(m.path(&format!("{KEY}/{name}")))
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("creating the cat output"))
            .stderr(Stdio::null())
            .spawn()
            .expect("starting cat"),
    };
    let event_seen = wait_for_moment(w, &mut child, moment, &name, size);
    let mid_operation = matches!(child.try_wait(), Ok(None));
    m.kill9();
    let status = wait_within(&mut child, Duration::from_secs(30));
    let succeeded = status.is_some_and(|s| s.success());
    drop(m);

    match kind {
        Kind::Upload if succeeded => {
            // close() returned: the entry must be on shadir.
            let found = w.server.entries_named(KEY, &name);
            assert!(
                found.iter().any(|e| e.sha512() == sha),
                "run {run}: cp of {name} succeeded but its entry is not on shadir: {found:?}"
            );
            w.must_exist.insert(name, sha);
        }
        Kind::Upload => {}
        Kind::Download => {
            let got = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            if succeeded {
                assert_eq!(
                    sha512_file(&out),
                    sha,
                    "run {run}: cat of {name} succeeded with wrong bytes"
                );
            } else {
                assert!(
                    got <= size && is_prefix_of(&out, &src),
                    "run {run}: the interrupted cat of {name} gave {got} bytes that are not \
                     a prefix of the blob"
                );
            }
        }
    }
    let _ = std::fs::remove_file(&out);
    RunReport {
        kind,
        size,
        moment,
        event_seen,
        mid_operation,
        succeeded,
    }
}

/// Is `dir` (inside the mount) a directory? Bounded.
fn key_dir_exists(dir: &Path) -> bool {
    let d = dir.to_path_buf();
    bounded("stat of the key directory", move || d.is_dir())
}

/// Waits for `moment` (bounded); true when its event was seen before the command ended.
fn wait_for_moment(w: &World, child: &mut Child, moment: Moment, name: &str, size: u64) -> bool {
    if let Moment::After(d) = moment {
        std::thread::sleep(d);
        return false;
    }
    let deadline = Instant::now() + EVENT_WAIT;
    while Instant::now() < deadline {
        let seen = match moment {
            Moment::After(_) => unreachable!("handled above"),
            Moment::Staged(per_mille) => {
                staged_len(&w.cache(), name).is_some_and(|n| n * 1000 >= size * per_mille)
            }
            Moment::Posting => w.server.upload_in_progress().is_some_and(|n| n > 0),
            Moment::Downloading => downloading(&w.cache()),
        };
        if seen {
            return true;
        }
        if !matches!(child.try_wait(), Ok(None)) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Size of the staged data of the outbox item named `name`, read from the outbox
/// directory directly (`DIR/v1/outbox/<id>/{meta.json,data}`).
fn staged_len(cache: &Path, name: &str) -> Option<u64> {
    let items = std::fs::read_dir(cache.join("v1/outbox")).ok()?;
    for item in items.flatten() {
        let Ok(meta) = std::fs::read_to_string(item.path().join("meta.json")) else {
            continue;
        };
        // A log of versions, one JSON line each: the last whole one is in force.
        let Some(v) = meta
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        else {
            continue;
        };
        if v["name"].as_str() == Some(name) {
            return std::fs::metadata(item.path().join("data"))
                .ok()
                .map(|m| m.len());
        }
    }
    None
}

/// Is a file with data being written in the cache's temporary directory?
fn downloading(cache: &Path) -> bool {
    std::fs::read_dir(cache.join("v1/tmp"))
        .map(|rd| {
            rd.flatten()
                .any(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0))
        })
        .unwrap_or(false)
}

/// The entries of `KEY` on shadir: `file` → sha512 (names are distinct, so one each).
fn published_names(w: &World) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (inner, _) in w.server.entries(KEY).unwrap_or_default() {
        let meta: serde_json::Value = serde_json::from_str(&inner).expect("inner JSON");
        let name = meta["file"].as_str().expect("file").to_string();
        let sha = meta["sha512"].as_str().expect("sha512").to_string();
        if let Some(old) = out.insert(name.clone(), sha.clone()) {
            assert_eq!(old, sha, "{name} published twice with different blobs");
        }
    }
    out
}

/// The checks made while no daemon runs, after each crash. `context` names the run.
fn check_after_crash(w: &World, context: &mut String) {
    // 1. Every file under v1/blobs is a verified blob (before fsck, which would delete
    //    strays silently).
    let (count, bytes) = check_blobs(&w.cache().join("v1/blobs"), context);
    // 2. fsck agrees.
    let out = cli(&[
        OsString::from("fsck"),
        "--cache-dir".into(),
        w.cache().into(),
    ]);
    out.assert_success();
    let text = out.stdout_text();
    assert!(
        text.contains(&format!("{count} blobs checked")) && text.contains(", 0 removed"),
        "{context}: fsck disagrees with the {count} verified blobs found:\n{text}"
    );
    // 3. The outbox holds only intact staged files of interrupted copies.
    let published = published_names(w);
    let items = outbox_items(&w.cache());
    let mut names = HashSet::new();
    for item in &items {
        let name = item["name"].as_str().expect("outbox item name").to_string();
        assert_eq!(
            item["key"].as_str(),
            Some(KEY),
            "{context}: outbox item {item}"
        );
        assert!(
            names.insert(name.clone()),
            "{context}: two outbox items for {name}: {items:?}"
        );
        assert!(
            w.uploaded.contains(&name),
            "{context}: outbox item for a file that was never copied in: {item}"
        );
        let src = &w.sources[&name];
        let data = PathBuf::from(item["path"].as_str().expect("outbox item path"));
        let len = std::fs::metadata(&data)
            .unwrap_or_else(|e| panic!("{context}: outbox item {item} has no data: {e}"))
            .len();
        let src_len = std::fs::metadata(src).expect("source").len();
        assert!(
            len <= src_len && is_prefix_of(&data, src),
            "{context}: outbox data of {name} ({len} bytes) is not a prefix of its source"
        );
        if published.contains_key(&name) {
            assert_eq!(
                len, src_len,
                "{context}: {name} is published while its outbox data is partial"
            );
        }
    }
    // 4. Every entry on shadir names a blob shacache has (GET), and the right one.
    for (name, sha) in &published {
        let r = support::http_get(&format!("{}/{sha}", w.server.cache_url()));
        assert!(
            r.status == 200 && &sha512_of(&r.body) == sha,
            "{context}: {name} is published, but GET of its blob {sha} answers {} \
             (or other bytes)",
            r.status
        );
        let src = w.sources.get(name).expect("source of a published name");
        assert_eq!(
            &sha512_file(src),
            sha,
            "{context}: {name} is published with a blob that is not its source"
        );
    }
    context.push_str(&format!(
        "; cache: {count} blobs, {} MiB; outbox: {} items; shadir: {} entries",
        bytes / MIB,
        items.len(),
        published.len()
    ));
}

/// Hashes every file under `blobs` (`<2 hex>/<128 hex>`); returns (count, bytes).
fn check_blobs(blobs: &Path, context: &str) -> (usize, u64) {
    let (mut count, mut bytes) = (0, 0);
    let Ok(shards) = std::fs::read_dir(blobs) else {
        return (0, 0);
    };
    for shard in shards.flatten() {
        let shard_name = shard.file_name().to_string_lossy().into_owned();
        assert!(
            shard.path().is_dir()
                && shard_name.len() == 2
                && shard_name.bytes().all(|b| b.is_ascii_hexdigit()),
            "{context}: {} is not a blob shard",
            shard.path().display()
        );
        for f in std::fs::read_dir(shard.path())
            .expect("reading a shard")
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            let path = f.path();
            assert!(
                path.is_file() && name.len() == 128 && name.starts_with(&shard_name),
                "{context}: {} is not a blob",
                path.display()
            );
            let actual = sha512_file(&path);
            assert_eq!(
                actual,
                name,
                "{context}: the cached blob {} holds other bytes",
                path.display()
            );
            count += 1;
            bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        }
    }
    (count, bytes)
}
