//! The small persisted tables: blob sizes (global: blobs are named by content), and per
//! namespace the known keys, the first-seen times and the last shadir answer per key.
//!
//! Every file is replaced atomically, without fsync ([`super::disk::write_replace`]).
//! A table that cannot be read starts empty with a warning: all of it can be found
//! again from the servers.
//! Before a table is rewritten, the version on disk is read and merged in (entries we do
//! not have are adopted, ours win), so two processes sharing the directory lose little
//! and never corrupt anything; the last rename wins.
//!
//! Shadir answers are one JSON file per key, `dirs/<first 32 hex of SHA-512(key)>.json`:
//! `{"key": <key>, "fetched": <unix seconds float>, "status": 200 | 404, "body": <text>}`,
//! with `"body_base64"` instead of `"body"` when the body is not UTF-8, and no body for
//! a 404. The key is stored so that a hash-prefix collision reads as a miss.

use super::disk::{from_unix, read_json, to_unix, write_replace};
use super::CacheError;
use crate::digest::Sha512;
use base64::Engine;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Sizes and first-seen times recorded since the last flush are written at the latest
/// this long after, on the next call that records one (so a crash loses little).
const AUTO_FLUSH: Duration = Duration::from_secs(60);

type Seen = HashMap<String, HashMap<Sha512, f64>>;

struct State {
    sizes: HashMap<Sha512, u64>,
    sizes_dirty: bool,
    seen: Seen,
    seen_dirty: bool,
    last_flush: Instant,
}

pub(crate) struct Tables {
    tmp: PathBuf,
    sizes_path: PathBuf,
    keys_path: PathBuf,
    seen_path: PathBuf,
    dirs: PathBuf,
    state: Mutex<State>,
    keys: Mutex<Vec<String>>,
    /// Serialises whole flushes (read disk, merge, write) within this process.
    flush_lock: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn parse_sizes(v: Option<Value>) -> HashMap<Sha512, u64> {
    let mut out = HashMap::new();
    if let Some(Value::Object(map)) = v {
        for (k, v) in map {
            if let (Ok(sha), Some(n)) = (Sha512::parse(&k), v.as_u64()) {
                out.insert(sha, n);
            }
        }
    }
    out
}

fn parse_seen(v: Option<Value>) -> Seen {
    let mut out = Seen::new();
    if let Some(Value::Object(map)) = v {
        for (key, shas) in map {
            let Value::Object(shas) = shas else { continue };
            let times = shas
                .into_iter()
                .filter_map(|(s, t)| Some((Sha512::parse(&s).ok()?, t.as_f64()?)))
                .collect();
            out.insert(key, times);
        }
    }
    out
}

/// First-seen times as `seen.json` holds them: `{key: {sha512 hex: unix time}}`.
fn seen_body(seen: &Seen) -> String {
    let map: Map<String, Value> = seen
        .iter()
        .map(|(key, times)| {
            let inner: Map<String, Value> = times
                .iter()
                .map(|(sha, t)| (sha.hex(), Value::from(*t)))
                .collect();
            (key.clone(), Value::Object(inner))
        })
        .collect();
    Value::Object(map).to_string()
}

fn parse_keys(v: Option<Value>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Some(Value::Array(items)) = v {
        for item in items {
            if let Value::String(s) = item {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    }
    out
}

fn key_file_name(key: &str) -> String {
    format!("{}.json", Sha512::of(key.as_bytes()).short(32))
}

/// Beside a saved answer: present while the answer is known to be incomplete.
fn stale_marker(key: &str) -> String {
    format!("{}.stale", Sha512::of(key.as_bytes()).short(32))
}

impl Tables {
    /// Loads the tables; `ns_dir` (with its `dirs/`) must exist.
    pub(crate) fn load(v1: &Path, ns_dir: &Path, tmp: &Path) -> Tables {
        let sizes_path = v1.join("sizes.json");
        let keys_path = ns_dir.join("keys.json");
        let seen_path = ns_dir.join("seen.json");
        let state = State {
            sizes: parse_sizes(read_json(&sizes_path)),
            sizes_dirty: false,
            seen: parse_seen(read_json(&seen_path)),
            seen_dirty: false,
            last_flush: Instant::now(),
        };
        Tables {
            tmp: tmp.to_path_buf(),
            keys: Mutex::new(parse_keys(read_json(&keys_path))),
            sizes_path,
            keys_path,
            seen_path,
            dirs: ns_dir.join("dirs"),
            state: Mutex::new(state),
            flush_lock: Mutex::new(()),
        }
    }

    pub(crate) fn size_of(&self, sha: &Sha512) -> Option<u64> {
        lock(&self.state).sizes.get(sha).copied()
    }

    pub(crate) fn record_size(&self, sha: &Sha512, size: u64) {
        {
            let mut st = lock(&self.state);
            if st.sizes.insert(*sha, size) == Some(size) {
                return;
            }
            st.sizes_dirty = true;
        }
        self.maybe_flush();
    }

    pub(crate) fn first_seen(&self, key: &str, sha: &Sha512) -> SystemTime {
        let secs = {
            let mut st = lock(&self.state);
            if let Some(t) = st.seen.get(key).and_then(|m| m.get(sha)) {
                return from_unix(*t);
            }
            let now = to_unix(SystemTime::now());
            st.seen.entry(key.to_owned()).or_default().insert(*sha, now);
            st.seen_dirty = true;
            now
        };
        self.maybe_flush();
        from_unix(secs)
    }

    pub(crate) fn known_keys(&self) -> Vec<String> {
        lock(&self.keys).clone()
    }

    /// Adds a key and writes the table at once (keys are rare and cannot be found
    /// again: no server lists them).
    pub(crate) fn add_known_key(&self, key: &str) {
        let mut keys = lock(&self.keys);
        if keys.iter().any(|k| k == key) {
            return;
        }
        for k in parse_keys(read_json(&self.keys_path)) {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        if !keys.iter().any(|k| k == key) {
            keys.push(key.to_owned());
        }
        let body = Value::Array(keys.iter().cloned().map(Value::String).collect());
        if let Err(e) = write_replace(&self.tmp, &self.keys_path, body.to_string().as_bytes()) {
            tracing::warn!(path = %self.keys_path.display(), error = %e, "could not save the known keys");
        }
    }

    /// The answer saved for `key` and when it was fetched (the Unix epoch when a
    /// publish marked it stale since: usable offline, never fresh).
    pub(crate) fn dir_answer(&self, key: &str) -> Option<(SystemTime, Option<Vec<u8>>)> {
        let path = self.dirs.join(key_file_name(key));
        let v = read_json(&path)?;
        if v.get("key").and_then(Value::as_str) != Some(key) {
            return None;
        }
        let fetched = if self.dirs.join(stale_marker(key)).exists() {
            UNIX_EPOCH
        } else {
            from_unix(v.get("fetched")?.as_f64()?)
        };
        match v.get("status")?.as_u64()? {
            404 => Some((fetched, None)),
            200 => {
                if let Some(s) = v.get("body").and_then(Value::as_str) {
                    return Some((fetched, Some(s.as_bytes().to_vec())));
                }
                let b64 = v.get("body_base64")?.as_str()?;
                match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(body) => Some((fetched, Some(body))),
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cached shadir answer corrupt");
                        None
                    }
                }
            }
            _ => None,
        }
    }

    pub(crate) fn store_dir_answer(&self, key: &str, body: Option<&[u8]>) {
        let mut v = json!({
            "key": key,
            "fetched": to_unix(SystemTime::now()),
            "status": if body.is_some() { 200 } else { 404 },
        });
        if let (Some(body), Value::Object(map)) = (body, &mut v) {
            match std::str::from_utf8(body) {
                Ok(s) => map.insert("body".into(), Value::String(s.to_owned())),
                Err(_) => map.insert(
                    "body_base64".into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(body)),
                ),
            };
        }
        let path = self.dirs.join(key_file_name(key));
        if let Err(e) = write_replace(&self.tmp, &path, v.to_string().as_bytes()) {
            tracing::warn!(path = %path.display(), error = %e, "could not save a shadir answer");
            return;
        }
        match std::fs::remove_file(self.dirs.join(stale_marker(key))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(key, error = %e, "could not remove a stale marker");
            }
            _ => {}
        }
    }

    /// The saved answer of `key` no longer says everything (a publish through this
    /// mount, saved whole later): until it is saved again, a mount does not take it
    /// as fresh. An empty marker file beside it, so that a publish costs no rewrite.
    pub(crate) fn mark_dir_answer_stale(&self, key: &str) {
        let path = self.dirs.join(stale_marker(key));
        if let Err(e) = std::fs::File::create(&path) {
            tracing::warn!(path = %path.display(), error = %e, "could not mark a shadir answer stale");
        }
    }

    fn maybe_flush(&self) {
        if lock(&self.state).last_flush.elapsed() < AUTO_FLUSH {
            return;
        }
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "could not save the cache tables");
        }
    }

    /// Writes the dirty tables (sizes, first-seen times), merged with their disk copies.
    pub(crate) fn flush(&self) -> Result<(), CacheError> {
        let _serial = lock(&self.flush_lock);
        let (sizes_dirty, seen_dirty) = {
            let mut st = lock(&self.state);
            st.last_flush = Instant::now();
            (st.sizes_dirty, st.seen_dirty)
        };
        if sizes_dirty {
            let disk = parse_sizes(read_json(&self.sizes_path));
            let body = {
                let mut st = lock(&self.state);
                for (sha, n) in disk {
                    st.sizes.entry(sha).or_insert(n);
                }
                st.sizes_dirty = false;
                let map: Map<String, Value> = st
                    .sizes
                    .iter()
                    .map(|(sha, n)| (sha.hex(), Value::from(*n)))
                    .collect();
                Value::Object(map).to_string()
            };
            if let Err(source) = write_replace(&self.tmp, &self.sizes_path, body.as_bytes()) {
                lock(&self.state).sizes_dirty = true;
                return Err(CacheError::Io {
                    path: self.sizes_path.clone(),
                    source,
                });
            }
        }
        if seen_dirty {
            let disk = parse_seen(read_json(&self.seen_path));
            let body = {
                let mut st = lock(&self.state);
                for (key, times) in disk {
                    let mine = st.seen.entry(key).or_default();
                    for (sha, t) in times {
                        mine.entry(sha).or_insert(t);
                    }
                }
                st.seen_dirty = false;
                seen_body(&st.seen)
            };
            if let Err(source) = write_replace(&self.tmp, &self.seen_path, body.as_bytes()) {
                lock(&self.state).seen_dirty = true;
                return Err(CacheError::Io {
                    path: self.seen_path.clone(),
                    source,
                });
            }
        }
        Ok(())
    }
}

impl Drop for Tables {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "could not save the cache tables on close");
        }
    }
}

/// Renames every namespace directory whose `namespace` names a server URL with
/// credentials (as releases before 0.x stored it) to the directory of the same URL
/// without them, rewriting its `namespace` file; when that directory exists already, the
/// known keys, first-seen times (earliest wins) and saved answers (the existing ones
/// win) are merged into it and the old directory is removed. Errors are logged: at
/// worst a namespace starts empty, as a new one would.
pub(crate) fn migrate_namespaces(v1: &Path, tmp: &Path) {
    let Ok(rd) = std::fs::read_dir(v1.join("ns")) else {
        return;
    };
    for entry in rd.flatten() {
        let old = entry.path();
        let Ok(text) = std::fs::read_to_string(old.join("namespace")) else {
            continue;
        };
        let clean = crate::config::without_credentials(&text);
        if clean == text {
            continue;
        }
        let new = v1.join("ns").join(Sha512::of(clean.as_bytes()).short(32));
        if let Err(e) = migrate_one(&old, &new, &clean, tmp) {
            tracing::warn!(dir = %old.display(), error = %e, "cannot migrate a namespace directory named after a URL with credentials");
        } else {
            tracing::info!(
                "cache namespace {clean}: moved out of the directory named after its URL with credentials"
            );
        }
    }
}

fn migrate_one(old: &Path, new: &Path, clean: &str, tmp: &Path) -> std::io::Result<()> {
    if !new.exists() {
        // The namespace file first: a crash in between leaves a directory whose text
        // no longer holds the credentials, found again under its old name (a miss).
        write_replace(tmp, &old.join("namespace"), clean.as_bytes())?;
        return std::fs::rename(old, new);
    }
    let new_dirs = new.join("dirs");
    super::disk::create_private_dir_all(&new_dirs)?;
    let mut keys = parse_keys(read_json(&new.join("keys.json")));
    for k in parse_keys(read_json(&old.join("keys.json"))) {
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    write_replace(
        tmp,
        &new.join("keys.json"),
        Value::from(keys).to_string().as_bytes(),
    )?;
    let mut seen = parse_seen(read_json(&new.join("seen.json")));
    for (key, times) in parse_seen(read_json(&old.join("seen.json"))) {
        let mine = seen.entry(key).or_default();
        for (sha, t) in times {
            let e = mine.entry(sha).or_insert(t);
            *e = e.min(t);
        }
    }
    write_replace(tmp, &new.join("seen.json"), seen_body(&seen).as_bytes())?;
    if let Ok(rd) = std::fs::read_dir(old.join("dirs")) {
        for e in rd.flatten() {
            let dest = new_dirs.join(e.file_name());
            if !dest.exists() {
                std::fs::rename(e.path(), dest)?;
            }
        }
    }
    std::fs::remove_dir_all(old)
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    fn ns_dir(v1: &Path, text: &str) -> PathBuf {
        let d = v1.join("ns").join(Sha512::of(text.as_bytes()).short(32));
        std::fs::create_dir_all(d.join("dirs")).unwrap();
        std::fs::write(d.join("namespace"), text).unwrap();
        d
    }

    #[test]
    fn credentialed_namespace_is_merged_into_the_clean_one() {
        let tmp_dir = tempfile::tempdir().unwrap();
        let v1 = tmp_dir.path().join("v1");
        let tmp = v1.join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let a = Sha512::of(b"a");
        let b = Sha512::of(b"b");
        let old = ns_dir(&v1, "http://u:pw@h/shadir");
        std::fs::write(old.join("keys.json"), r#"["k1", "k2"]"#).unwrap();
        std::fs::write(
            old.join("seen.json"),
            format!(r#"{{"k1": {{"{}": 5.0, "{}": 7.0}}}}"#, a.hex(), b.hex()),
        )
        .unwrap();
        std::fs::write(old.join("dirs").join("x.json"), "old x").unwrap();
        std::fs::write(old.join("dirs").join("y.json"), "old y").unwrap();
        let new = ns_dir(&v1, "http://h/shadir");
        std::fs::write(new.join("keys.json"), r#"["k2", "k3"]"#).unwrap();
        std::fs::write(
            new.join("seen.json"),
            format!(r#"{{"k1": {{"{}": 9.0}}}}"#, a.hex()),
        )
        .unwrap();
        std::fs::write(new.join("dirs").join("x.json"), "new x").unwrap();
        // A third, credentialed, with no clean twin: renamed.
        let lone = ns_dir(&v1, "https://u@other/d");
        std::fs::write(lone.join("keys.json"), r#"["z"]"#).unwrap();

        migrate_namespaces(&v1, &tmp);

        assert!(!old.exists() && !lone.exists());
        assert_eq!(
            parse_keys(read_json(&new.join("keys.json"))),
            vec!["k2", "k3", "k1"]
        );
        let seen = parse_seen(read_json(&new.join("seen.json")));
        assert_eq!(seen["k1"][&a], 5.0, "the earliest first-seen time wins");
        assert_eq!(seen["k1"][&b], 7.0);
        let read = |f: &str| std::fs::read_to_string(new.join("dirs").join(f)).unwrap();
        assert_eq!(read("x.json"), "new x");
        assert_eq!(read("y.json"), "old y");
        let renamed = v1.join("ns").join(Sha512::of(b"https://other/d").short(32));
        assert_eq!(
            std::fs::read_to_string(renamed.join("namespace")).unwrap(),
            "https://other/d"
        );
        assert_eq!(parse_keys(read_json(&renamed.join("keys.json"))), vec!["z"]);
    }
}
