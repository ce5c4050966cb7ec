//! Integrity under real use (issue 11), through real FUSE mounts over the
//! fault-injecting server: no half file published when a writer runs children, a
//! publish works on frozen bytes (a second writer waits, then makes a new version, and
//! the cache never holds bytes under another name), the mount holds its open items
//! against `outbox retry`, a lying HEAD never cuts or pads a read, a blob the cache
//! replaced is what new opens read (passthrough and page cache), and `latest` and the
//! attributes of an old version follow the server.
//!
//! Every mount is a `shacachefs mount -f` child guarded by `support::Mount`; these
//! tests fail (never skip) when FUSE cannot be used.

use crate::support;
use crate::support::faulty;

use faulty::{blob_target, Background, Fault, Rule};
use serde_json::Value;
use shacachefs::digest::Sha512;
use shacachefs::signature::Signer;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{cmd, read, wait_until, Mount, CMD_TIMEOUT};
use support::{pseudo_random_bytes, NetworkcacheConfig};

/// A fault-injecting server, a configuration signing and trusting fixture signer A,
/// and a work directory for caches and mountpoints.
struct World {
    srv: Background,
    cfg: PathBuf,
    signer: Signer,
    // Declared last: removed after every mount (declared later in tests, dropped first).
    tmp: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        let tmp = support::tempdir();
        let srv = Background::start();
        let cfg = NetworkcacheConfig::for_urls(&srv.cache_url(), &srv.dir_url())
            .signer_a()
            .write(tmp.path(), "networkcache.cfg");
        let signer = Signer::load(&support::fixture("signature/signer-a.pkcs1.key"))
            .expect("fixture signer A");
        World {
            srv,
            cfg,
            signer,
            tmp,
        }
    }

    fn cache(&self) -> PathBuf {
        self.tmp.path().join("cache")
    }

    fn mount(&self, extra: &[&str]) -> Mount {
        Mount::in_dir(&self.cfg, self.tmp.path(), extra)
    }

    /// Stores `data` and publishes it as `name` under `key` with timestamp `ts`.
    fn publish(&self, key: &str, name: &str, data: &[u8], ts: f64) -> Sha512 {
        let meta = support::meta(serde_json::json!({"file": name, "timestamp": ts}));
        self.srv.publish(&self.signer, key, data, &meta)
    }

    /// The SHA-512s the server's entries under `key` name for file `name`.
    fn published(&self, key: &str, name: &str) -> Vec<String> {
        self.srv
            .entries(key)
            .unwrap_or_default()
            .iter()
            .filter_map(|e| {
                let v: Value = serde_json::from_str(&e.inner).ok()?;
                (v["file"] == name).then(|| v["sha512"].as_str().unwrap_or("").to_string())
            })
            .collect()
    }

    fn blob_file(&self, sha: &Sha512) -> PathBuf {
        let hex = sha.hex();
        self.cache()
            .join("v1")
            .join("blobs")
            .join(&hex[..2])
            .join(hex)
    }

    /// Every file of the cache's blob store holds exactly the bytes its name says.
    fn assert_cache_consistent(&self) {
        let root = self.cache().join("v1").join("blobs");
        let mut checked = 0;
        for dir in std::fs::read_dir(&root).expect("blob store").flatten() {
            if !dir.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(dir.path()).expect("blob dir").flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.len() != 128 {
                    continue;
                }
                let actual = Sha512::of(&read(&f.path())).hex();
                assert_eq!(actual, name, "cache file {} holds other bytes", name);
                checked += 1;
            }
        }
        assert!(checked > 0, "no blob in the cache to check");
    }
}

/// Runs a Python script with arguments, bounded; returns its stdout.
#[track_caller]
fn python(script: &str, args: &[&str]) -> String {
    let mut c = Command::new("python3");
    c.arg("-c").arg(script).args(args);
    let out = support::run_with_timeout(c, CMD_TIMEOUT);
    assert!(out.success(), "python failed:\n{}", out.describe());
    out.stdout_text()
}

#[track_caller]
fn assert_log_ok(ok: bool, what: &str, m: &Mount) {
    assert!(ok, "{what}\n--- daemon log ---\n{}", m.log_text());
}

// ---------------------------------------------------------------------------------------
// Writes.

/// Case 1: a writer whose child processes close their inherited copies of the
/// descriptor (close-on-exec) publishes once, at its own close, the whole file.
#[test]
fn children_closing_an_inherited_descriptor_publish_nothing() {
    let w = World::new();
    let m = w.mount(&[]);
    std::fs::create_dir(m.path("k")).expect("mkdir k");

    // Python opens files close-on-exec; `subprocess` closes the rest in the child.
    let script = r#"
import hashlib, subprocess, sys
path, half = sys.argv[1], int(sys.argv[2])
data = bytes((i * 7 + i // 256) % 256 for i in range(2 * half))
with open(path, "wb") as f:
    f.write(data[:half]); f.flush()
    subprocess.run(["/bin/true"], check=True)
    subprocess.run(["sh", "-c", "exit 0"], check=True)
    f.write(data[half:]); f.flush()
print(hashlib.sha512(data).hexdigest())
"#;
    let path = m.path("k/py.bin");
    let whole = python(script, &[path.to_str().unwrap(), "300000"]);
    let whole = whole.trim();
    let published = w.published("k", "py.bin");
    assert_log_ok(
        published == vec![whole.to_string()],
        &format!("expected one entry of the whole file {whole}, the server has {published:?}"),
        &m,
    );

    // A shell keeping a descriptor open across commands: each command's exit closes
    // its copy. The next write must work, and only the whole file is published, at the
    // shell's own close. (Commands, not builtins: a builtin writing through a
    // redirection makes the shell itself close a copy, which publishes; so does dash
    // for every redirected command, which it redirects before forking.)
    let file = m.path("k/sh.txt");
    let out = cmd(
        "bash",
        &[
            "-c",
            &format!(
                "exec 3>'{}'; /usr/bin/printf 'first-' >&3; /bin/true; /usr/bin/printf 'second' >&3; exec 3>&-",
                file.display()
            ),
        ],
    );
    assert_log_ok(out.success(), &format!("shell: {}", out.describe()), &m);
    let want = Sha512::of(b"first-second").hex();
    let published = w.published("k", "sh.txt");
    assert_log_ok(
        published == vec![want.clone()],
        &format!("expected one entry of 'first-second', the server has {published:?}"),
        &m,
    );
    assert_eq!(read(&file), b"first-second");

    // A parent that closes before its child finishes writing: the child's bytes make a
    // new version, published at the last release.
    let script = r#"
import os, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.set_inheritable(fd, True)
os.write(fd, b"parent;")
pid = os.fork()
if pid == 0:
    time.sleep(0.5)
    os.write(fd, b"child;")
    os._exit(0)
os.close(fd)
os.waitpid(pid, 0)
"#;
    let file = m.path("k/fork.txt");
    python(script, &[file.to_str().unwrap()]);
    let want = [
        Sha512::of(b"parent;").hex(),
        Sha512::of(b"parent;child;").hex(),
    ];
    let ok = wait_until(Duration::from_secs(20), || {
        let mut p = w.published("k", "fork.txt");
        p.sort();
        let mut e = want.to_vec();
        e.sort();
        p == e
    });
    assert_log_ok(
        ok,
        &format!(
            "expected 'parent;' then 'parent;child;', the server has {:?}",
            w.published("k", "fork.txt")
        ),
        &m,
    );
    w.assert_cache_consistent();
}

/// Case 2 and the session thread: a second writer during a publish waits (while other
/// operations in the key go on), then writes into a new version; the cache never holds
/// bytes under a name they do not hash to, and every close reports its own publish.
#[test]
fn a_publish_works_on_frozen_bytes() {
    let w = World::new();
    let m = w.mount(&[]);
    std::fs::create_dir(m.path("k")).expect("mkdir k");
    let other = pseudo_random_bytes(50_000, 5);
    std::fs::write(m.path("k/other.bin"), &other).expect("publishing other.bin");
    // The next PUT is held for a while.
    w.srv.push_rule(
        Rule::new(Fault::Delay(Duration::from_secs(6)))
            .method("PUT")
            .times(1),
    );
    let script = r#"
import json, os, sys, threading, time
path, other = sys.argv[1], sys.argv[2]
keydir = os.path.dirname(path)
n = 200000
A, B = b"A" * n, b"B" * n
res = {}
fd1 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd1, A)
def close1():
    try:
        os.close(fd1); res["close1"] = "ok"
    except OSError as e:
        res["close1"] = str(e)
    res["t_close1"] = time.monotonic()
t1 = threading.Thread(target=close1); t1.start()
time.sleep(1.5)
fd2 = os.open(path, os.O_WRONLY)
def write2():
    try:
        os.write(fd2, B); res["write2"] = "ok"
    except OSError as e:
        res["write2"] = str(e)
    res["t_write2"] = time.monotonic()
t2 = threading.Thread(target=write2); t2.start()
time.sleep(0.5)
# Meanwhile, other operations in the same key complete.
os.stat(path)
with open(other, "rb") as f:
    res["other_len"] = len(f.read())
with open(os.path.join(keydir, ".scratch"), "wb") as f:
    f.write(b"x")
os.listdir(keydir)
res["t_others"] = time.monotonic()
t2.join(); t1.join()
try:
    os.close(fd2); res["close2"] = "ok"
except OSError as e:
    res["close2"] = str(e)
print(json.dumps(res))
"#;
    let out = python(
        script,
        &[
            m.path("k/f.bin").to_str().unwrap(),
            m.path("k/other.bin").to_str().unwrap(),
        ],
    );
    let res: Value = serde_json::from_str(out.trim()).expect("script output");
    assert_log_ok(
        res["close1"] == "ok" && res["write2"] == "ok" && res["close2"] == "ok",
        &format!("closes and the write must succeed: {res}"),
        &m,
    );
    assert_eq!(res["other_len"], 50_000);
    let t = |k: &str| res[k].as_f64().unwrap();
    assert!(
        t("t_others") < t("t_close1"),
        "stat, read, create and readdir waited for the held publish: {res}"
    );
    assert!(
        t("t_write2") >= t("t_close1") - 0.5,
        "the second writer did not wait for the publish: {res}"
    );
    let a = Sha512::of(&vec![b'A'; 200_000]);
    let b = Sha512::of(&vec![b'B'; 200_000]);
    let mut published = w.published("k", "f.bin");
    published.sort();
    let mut want = vec![a.hex(), b.hex()];
    want.sort();
    assert_log_ok(
        published == want,
        &format!("expected the A and B versions, the server has {published:?}"),
        &m,
    );
    assert_eq!(read(&w.blob_file(&a)), vec![b'A'; 200_000]);
    let via_mount = read(&m.path(&format!(".sha512/{}", a.hex())));
    assert!(
        via_mount == vec![b'A'; 200_000],
        "the mount serves other bytes as A"
    );
    assert_eq!(read(&m.path("k/f.bin")), vec![b'B'; 200_000]);
    w.assert_cache_consistent();
}

/// Case 3 (the mount's side): while a file is open for writing, the mount holds the
/// item's writer lock, which `outbox retry` and `drop` respect.
#[test]
fn an_item_open_for_writing_is_locked_by_the_mount() {
    let w = World::new();
    let m = w.mount(&[]);
    std::fs::create_dir(m.path("k")).expect("mkdir k");
    let path = m.path("k/held.bin");
    let mut child = holding(
        "import sys; f = open(sys.argv[1], 'wb'); f.write(b'x' * 1000); f.flush(); \
         print('open', flush=True); sys.stdin.read(); f.close()",
        &path,
    );
    let outbox = w.cache().join("v1").join("outbox");
    let items: Vec<PathBuf> = std::fs::read_dir(&outbox)
        .expect("outbox")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(items.len(), 1, "{items:?}");
    // The writer lock is a shared flock on the item's directory.
    let held = cmd("flock", &["-n", "-x", items[0].to_str().unwrap(), "true"]);
    assert!(
        !held.success(),
        "the writer lock is not held while the file is open"
    );
    drop(child.stdin.take());
    let status = support::wait_within(&mut child, Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()));
    assert_log_ok(
        wait_until(Duration::from_secs(10), || {
            w.published("k", "held.bin").len() == 1
        }),
        "the file was not published at close",
        &m,
    );
}

// ---------------------------------------------------------------------------------------
// Reads.

/// Case 4: a HEAD that lies about a blob's size neither cuts nor pads reads, and the
/// kernel's size is corrected.
#[test]
fn a_lying_head_never_cuts_or_pads_a_read() {
    let w = World::new();
    let small = pseudo_random_bytes(200_000, 41);
    let sha_small = w.publish("k", "small-said.bin", &small, 1000.0);
    let big = pseudo_random_bytes(3000, 42);
    let sha_big = w.publish("k", "big-said.bin", &big, 1001.0);
    w.srv.push_rule(
        Rule::new(Fault::HeadLength(1000))
            .method("HEAD")
            .path(&blob_target(&sha_small)),
    );
    w.srv.push_rule(
        Rule::new(Fault::HeadLength(5_000_000))
            .method("HEAD")
            .path(&blob_target(&sha_big)),
    );
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let _ = std::fs::remove_dir_all(w.cache());
        let m = w.mount(extra);
        let size = |n: &str| {
            std::fs::metadata(m.path(&format!("k/{n}")))
                .expect("stat")
                .len()
        };
        assert_eq!(
            size("small-said.bin"),
            1000,
            "the probe's size is shown first"
        );
        let out = w.tmp.path().join("copy");
        for (name, want) in [("small-said.bin", &small), ("big-said.bin", &big)] {
            let cp = cmd(
                "cp",
                &[
                    m.path(&format!("k/{name}")).to_str().unwrap(),
                    out.to_str().unwrap(),
                ],
            );
            assert_log_ok(cp.success(), &cp.describe(), &m);
            let got = read(&out);
            assert_log_ok(
                got == *want,
                &format!(
                    "cp {extra:?} of {name} gave {} bytes of {}",
                    got.len(),
                    want.len()
                ),
                &m,
            );
            assert!(
                wait_until(Duration::from_secs(5), || size(name) == want.len() as u64),
                "{name}: the kernel's size was not corrected"
            );
        }
        // The good cached blobs stay.
        assert_eq!(read(&w.blob_file(&sha_small)), small);
        drop(m);
    }
}

/// Starts a process that opens `path`, reads a little and keeps it open until its
/// standard input closes.
fn hold_open(path: &Path) -> std::process::Child {
    holding(
        "import sys; f = open(sys.argv[1], 'rb'); f.read(10); \
         print('open', flush=True); sys.stdin.read()",
        path,
    )
}

/// Starts Python `script` on `path`, which prints `open` once it holds the file and
/// keeps it until its standard input closes; returns once the line came.
fn holding(script: &str, path: &Path) -> std::process::Child {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout")),
        &mut line,
    )
    .expect("python's line");
    assert_eq!(line.trim(), "open");
    child
}

/// Cases 10 and 11: after the cache replaced a blob (a truncated cache file detected
/// and fetched again; a rotted one removed by `fsck` and fetched again), new opens
/// read the new, verified file, with passthrough and through the page cache, while an
/// older descriptor is still open.
#[test]
fn new_opens_read_the_blob_the_cache_has_now() {
    let w = World::new();
    let big = pseudo_random_bytes(2_007_777, 51);
    let sha_big = w.publish("k", "big.bin", &big, 1000.0);
    let small = pseudo_random_bytes(300_000, 52);
    let sha_small = w.publish("k", "small.bin", &small, 1001.0);
    for extra in [&[][..], &["--no-passthrough"][..]] {
        let _ = std::fs::remove_dir_all(w.cache());
        let m = w.mount(extra);
        // Truncated under an open descriptor: detected at the next open, fetched again.
        assert!(read(&m.path("k/big.bin")) == big);
        let mut holder = hold_open(&m.path("k/big.bin"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(w.blob_file(&sha_big))
            .expect("cache file");
        f.set_len(1_003_888).expect("truncating the cache file");
        drop(f);
        let got = read(&m.path("k/big.bin"));
        assert_log_ok(
            got == big,
            &format!(
                "{extra:?}: a new open read {} bytes of {} (or other bytes)",
                got.len(),
                big.len()
            ),
            &m,
        );
        drop(holder.stdin.take());
        let _ = support::wait_within(&mut holder, Duration::from_secs(10));

        // Rotted, read (into the page cache), removed by fsck, fetched again.
        assert!(read(&m.path("k/small.bin")) == small);
        let mut rotted = read(&w.blob_file(&sha_small));
        rotted[1000] ^= 0xff;
        std::fs::write(w.blob_file(&sha_small), &rotted).expect("rotting the cache file");
        let mut holder = hold_open(&m.path("k/small.bin"));
        let _ = read(&m.path("k/small.bin"));
        let fsck = support::run_with_timeout(
            support::shacachefs([
                "fsck".as_ref(),
                "--cache-dir".as_ref(),
                w.cache().as_os_str(),
            ]),
            CMD_TIMEOUT,
        );
        assert!(
            !w.blob_file(&sha_small).exists(),
            "fsck kept a rotted blob: {}",
            fsck.describe()
        );
        let got = read(&m.path("k/small.bin"));
        assert_log_ok(
            got == small,
            &format!("{extra:?}: reads after fsck and a new fetch still see the rotted bytes"),
            &m,
        );
        drop(holder.stdin.take());
        let _ = support::wait_within(&mut holder, Duration::from_secs(10));
        w.assert_cache_consistent();
        drop(m);
    }
}

/// Case 12 and 15: `latest` follows a newer entry published by another client (no
/// cached symlink target outlives a refresh), and a descriptor on an old version keeps
/// that version's time.
#[test]
fn latest_and_old_versions_follow_the_server() {
    let w = World::new();
    let v1 = pseudo_random_bytes(10_000, 61);
    w.publish("k", "a.bin", &v1, 1_000_000_000.0);
    let m = w.mount(&["--dir-ttl", "1"]);
    let latest = m.path("k/latest");
    let target = || {
        std::fs::read_link(&latest)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    assert_eq!(target(), "a.bin");
    assert!(read(&latest) == v1);
    let script = r#"
import os, sys
f = open(sys.argv[1], "rb")
print(int(os.fstat(f.fileno()).st_mtime), flush=True)
sys.stdin.readline()
os.listdir(os.path.dirname(sys.argv[1]))
print(int(os.fstat(f.fileno()).st_mtime), flush=True)
"#;
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(m.path("k/a.bin"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    let mut reader = std::io::BufReader::new(holder.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).expect("first mtime");
    assert_eq!(line.trim(), "1000000000");

    // Another client publishes b.bin (newer) and a new version of a.bin.
    let v2 = pseudo_random_bytes(12_000, 62);
    w.publish("k", "b.bin", &v2, 1_000_000_100.0);
    let v3 = pseudo_random_bytes(9_000, 63);
    w.publish("k", "a.bin", &v3, 1_000_000_050.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while target() != "b.bin" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let _ = std::fs::read_dir(m.path("k")).map(|d| d.count());
    }
    assert_log_ok(
        target() == "b.bin",
        &format!("latest still points to {:?}", target()),
        &m,
    );
    assert!(read(&latest) == v2, "cat latest gives old content");
    assert!(
        wait_until(Duration::from_secs(10), || read(&m.path("k/a.bin")) == v3),
        "a.bin does not show its new version"
    );
    use std::io::Write;
    holder
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("python stdin");
    line.clear();
    std::io::BufRead::read_line(&mut reader, &mut line).expect("second mtime");
    assert_eq!(
        line.trim(),
        "1000000000",
        "a descriptor on the old version reports another version's time"
    );
    drop(holder.stdin.take());
    let _ = support::wait_within(&mut holder, Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------
// Stress.

/// One writer of the stress test: `rounds` times, opens one of two shared files or its
/// own (no `O_TRUNC`), writes a self-describing record at a slot of its own, sometimes
/// forks a child that writes another record through the inherited descriptor (the
/// parent closes after the child exited), sometimes runs a command, then closes.
/// Prints what was acknowledged: records whose write returned success, and closes.
const STRESS_WRITER: &str = r#"
import json, os, random, subprocess, sys, time
keydir, w, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rnd = random.Random(w)
RL = 64
def rec(who, r):
    s = f"w={who:03d} r={r:03d} ".encode()
    return s + b"." * (RL - len(s) - 1) + b"\n"
out = {"acked": [], "closes": [], "refused": 0}
held = {}  # name -> (fd, records written through it)
def close(name, r):
    fd, mine = held.pop(name)
    try:
        os.close(fd)
        out["closes"].append([name, r, "ok", mine])
    except OSError as e:
        out["closes"].append([name, r, str(e), mine])
for r in range(rounds):
    name = rnd.choice(["shared0.log", "shared1.log", f"own{w}.log"])
    if name not in held:
        try:
            fd = os.open(os.path.join(keydir, name), os.O_WRONLY | os.O_CREAT, 0o644)
        except PermissionError:
            # Published and no new version pending: published entries are immutable.
            out["refused"] += 1
            continue
        held[name] = (fd, [])
    fd, mine = held[name]
    slot = w * rounds + r
    os.pwrite(fd, rec(w, r), slot * RL)
    mine.append([name, w, r]); out["acked"].append([name, w, r])
    if rnd.random() < 0.5:
        os.set_inheritable(fd, True)
        pid = os.fork()
        if pid == 0:
            try:
                os.pwrite(fd, rec(100 + w, r), (1000 + slot) * RL)
                os._exit(0)
            except OSError:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        if status == 0:
            mine.append([name, 100 + w, r]); out["acked"].append([name, 100 + w, r])
    if rnd.random() < 0.3:
        subprocess.run(["/bin/true"], check=True)
    time.sleep(rnd.random() * 0.2)
    if rnd.random() < 0.35:
        close(name, r)
for name in list(held):
    close(name, rounds)
print(json.dumps(out))
"#;

/// The records (who, round) in a file's bytes.
fn records(data: &[u8]) -> std::collections::BTreeSet<(u64, u64)> {
    data.chunks(64)
        .filter_map(|c| {
            let s = std::str::from_utf8(c).ok()?;
            let who = s.strip_prefix("w=")?.get(..3)?.parse().ok()?;
            let r = s.get(6..)?.strip_prefix("r=")?.get(..3)?.parse().ok()?;
            Some((who, r))
        })
        .collect()
}

/// Writers, children and re-opens of the same pending files while publishes are
/// slowed: every cached blob matches its name, every acknowledged record is in a
/// published version or pending, and every record acknowledged before a close that
/// returned 0 is in a published version.
#[test]
fn stress_concurrent_writers_children_and_slow_publishes() {
    let mut sample = b"w=101 r=007 ".to_vec();
    sample.resize(63, b'.');
    sample.push(b'\n');
    assert_eq!(
        records(&sample).into_iter().collect::<Vec<_>>(),
        vec![(101, 7)]
    );
    let w = World::new();
    let m = w.mount(&[]);
    std::fs::create_dir(m.path("k")).expect("mkdir k");
    w.srv
        .push_rule(Rule::new(Fault::Delay(Duration::from_millis(400))).method("PUT"));
    let writers: Vec<std::process::Child> = (0..4)
        .map(|i| {
            Command::new("python3")
                .arg("-c")
                .arg(STRESS_WRITER)
                .arg(m.path("k"))
                .arg(i.to_string())
                .arg("24")
                .stdout(Stdio::piped())
                .spawn()
                .expect("python writer")
        })
        .collect();
    let mut outputs = Vec::new();
    for child in writers {
        let out = support::bounded("a stress writer", move || child.wait_with_output());
        let out = out.expect("writer output");
        assert!(out.status.success(), "a writer failed: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).expect("writer JSON");
        outputs.push(v);
    }
    // The last releases publish what is left.
    std::thread::sleep(Duration::from_secs(3));
    w.srv.clear_rules();

    // Published versions and pending data, by file name.
    let mut published: std::collections::HashMap<String, std::collections::BTreeSet<(u64, u64)>> =
        Default::default();
    for e in w.srv.entries("k").unwrap_or_default() {
        let v: Value = serde_json::from_str(&e.inner).expect("entry");
        let sha = Sha512::parse(v["sha512"].as_str().unwrap()).unwrap();
        let blob = w.srv.blob(&sha).expect("a published entry's blob");
        assert_eq!(Sha512::of(&blob), sha);
        published
            .entry(v["file"].as_str().unwrap().to_string())
            .or_default()
            .extend(records(&blob));
    }
    let mut pending: std::collections::HashMap<String, std::collections::BTreeSet<(u64, u64)>> =
        Default::default();
    for item in support::outbox_items(&w.cache()) {
        let id = item["id"].as_str().unwrap_or_default().to_string();
        let name = item["name"].as_str().unwrap_or_default().to_string();
        let data =
            std::fs::read(w.cache().join("v1/outbox").join(&id).join("data")).unwrap_or_default();
        pending.entry(name).or_default().extend(records(&data));
    }
    let mut checked = 0;
    for out in &outputs {
        for a in out["acked"].as_array().unwrap() {
            let name = a[0].as_str().unwrap();
            let rec = (a[1].as_u64().unwrap(), a[2].as_u64().unwrap());
            let found = published.get(name).is_some_and(|s| s.contains(&rec))
                || pending.get(name).is_some_and(|s| s.contains(&rec));
            if !found {
                // Where the record is, if anywhere: a file of the cache directory that
                // holds it says which path wrote it where it does not belong.
                let needle = format!("w={:03} r={:03} ", rec.0, rec.1);
                let holders: Vec<String> = support::files_under(&w.cache())
                    .into_iter()
                    .filter(|p| {
                        std::fs::read(p)
                            .is_ok_and(|d| d.windows(needle.len()).any(|x| x == needle.as_bytes()))
                    })
                    .map(|p| p.display().to_string())
                    .collect();
                assert_log_ok(
                    false,
                    &format!(
                        "acknowledged record {rec:?} of {name} is neither published nor pending \
                         (files of the cache directory holding it: {holders:?}; pending: \
                         {:?})",
                        support::outbox_items(&w.cache())
                    ),
                    &m,
                );
            }
            checked += 1;
        }
        for c in out["closes"].as_array().unwrap() {
            if c[2] != "ok" {
                continue;
            }
            let name = c[0].as_str().unwrap();
            for a in c[3].as_array().unwrap() {
                let rec = (a[1].as_u64().unwrap(), a[2].as_u64().unwrap());
                assert_log_ok(
                    published.get(name).is_some_and(|s| s.contains(&rec)),
                    &format!("{name}: a close returned 0, but record {rec:?} written before it is in no published version"),
                    &m,
                );
            }
        }
    }
    let refused: u64 = outputs
        .iter()
        .map(|o| o["refused"].as_u64().unwrap_or(0))
        .sum();
    eprintln!("stress: {checked} records acknowledged, {refused} opens of published names refused");
    assert!(checked >= 40, "too few records acknowledged: {outputs:?}");
    w.assert_cache_consistent();
}

// ---------------------------------------------------------------------------------------
// Big keys.

/// The daemon's status document (the root's `user.shacachefs.status`).
fn status(m: &Mount) -> Value {
    let out = cmd(
        "getfattr",
        &[
            "--only-values",
            "-n",
            "user.shacachefs.status",
            m.mountpoint.to_str().unwrap(),
        ],
    );
    assert!(out.success(), "getfattr: {}", out.describe());
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

/// `ls` of a key with thousands of entries builds its listing once (at `opendir`),
/// however many `readdir` calls the kernel makes, and verifies each signature once
/// across refreshes.
#[test]
fn listing_a_big_key_builds_it_once() {
    let w = World::new();
    let n = 3000;
    for i in 0..n {
        let data = format!("blob {i}");
        w.publish(
            "big",
            &format!("file-{i:05}.bin"),
            data.as_bytes(),
            1e9 + i as f64,
        );
    }
    let m = w.mount(&["--dir-ttl", "1"]);
    let before = status(&m);
    let out = cmd("ls", &["-f", m.path("big").to_str().unwrap()]);
    assert!(out.success(), "{}", out.describe());
    // `.`, `..`, the files, `latest` and `.entries.json`.
    assert_eq!(out.stdout_text().lines().count(), n + 4);
    let after = status(&m);
    let built = |s: &Value| {
        s["directory_listings"]
            .as_u64()
            .expect("directory_listings")
    };
    assert_eq!(
        built(&after) - built(&before),
        1,
        "one listing per ls, not one per readdir call"
    );
    let verified = |s: &Value| s["signature_verifications"].as_u64().unwrap();
    assert_eq!(verified(&after), n as u64, "each entry verified once");
    // After the TTL, a refresh verifies nothing again.
    std::thread::sleep(Duration::from_millis(1500));
    let out = cmd("ls", &["-f", m.path("big").to_str().unwrap()]);
    assert!(out.success(), "{}", out.describe());
    let again = status(&m);
    assert!(again["shadir_requests"].as_u64() > after["shadir_requests"].as_u64());
    assert_eq!(
        verified(&again),
        n as u64,
        "a refresh verified known entries again"
    );
}

/// A cold `ls -l` of a big key gets the sizes with the directory entries (READDIRPLUS),
/// not with one LOOKUP per file, and asks for no extended attribute per file; a blob
/// whose size cannot be had shows as an error for that file alone, the others listed
/// with their sizes.
#[test]
fn ls_l_of_a_big_key_gets_sizes_with_the_entries() {
    let w = World::new();
    let n = 2000;
    let mut missing = None;
    for i in 0..n {
        let data = format!("{i:05}{}", "x".repeat(i % 700));
        let sha = w.publish("big", &format!("f{i:05}"), data.as_bytes(), 1e9 + i as f64);
        if i == 1234 {
            missing = Some(sha);
        }
    }
    // Size probes of that one blob find nothing (HEAD or GET).
    let missing = missing.unwrap();
    w.srv
        .push_rule(Rule::new(Fault::Status(404)).path(&blob_target(&missing)));
    let m = w.mount(&["--dir-ttl", "300"]);
    let before = status(&m);
    let out = cmd("ls", &["-l", m.path("big").to_str().unwrap()]);
    // ls reports the one file it could not stat.
    assert!(!out.success(), "{}", out.describe());
    assert!(out.stderr_text().contains("f01234"), "{}", out.describe());
    let text = out.stdout_text();
    for i in (0..n).filter(|i| *i != 1234) {
        let line = text
            .lines()
            .find(|l| l.ends_with(&format!(" f{i:05}")))
            .unwrap_or_else(|| panic!("f{i:05} not listed:\n{text}"));
        let size: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert_eq!(size, 5 + (i % 700) as u64, "{line}");
    }
    let after = status(&m);
    let lookups = after["lookups"].as_u64().unwrap() - before["lookups"].as_u64().unwrap();
    assert!(
        lookups < 20,
        "{lookups} lookups for an ls -l of {n} entries: the sizes did not come with the entries"
    );
}

// ---------------------------------------------------------------------------------------
// Unmounting.

/// An unmount right after the last close waits for the publishes still in flight (a
/// file created empty is published at its release, which the kernel sends after
/// `close()` returned; and a PUT held by a slow server): they are published before the
/// daemon exits, nothing left pending.
#[test]
fn unmount_waits_for_publishes_in_flight() {
    let w = World::new();
    let mut m = w.mount(&[]);
    std::fs::create_dir(m.path("k")).expect("mkdir k");
    w.srv
        .push_rule(Rule::new(Fault::Delay(Duration::from_secs(2))).method("PUT"));
    std::fs::File::create(m.path("k/empty.txt")).expect("touch");
    m.unmount();
    assert_eq!(
        w.published("k", "empty.txt"),
        vec![Sha512::of(b"").hex()],
        "the release's publish did not finish before the daemon exited\n{}",
        m.log_text()
    );
    assert!(support::outbox_items(&w.cache()).is_empty(), "left pending");
}
