//! An in-memory [`Store`] that injects faults: the test double of shacache and shadir.
//!
//! Blobs and lists live in maps; every call is counted ([`MemoryStore::calls`]) and
//! first goes through the rules set with [`MemoryStore::on`] (in the spirit of
//! mountpoint-s3's failure client): delay it (on tokio's clock, so tests with a paused
//! clock run at once), fail it, lie about a size, corrupt a blob's bytes, or hold it
//! until the test lets it go ([`Hold`]). No socket, no real time.

use super::{Store, StoreFuture};
use crate::digest::{HashingFile, Sha512, VerifiedFile};
use crate::growing::Growing;
use crate::remote::{DirListing, Limits, Probe, Progress, RemoteError, Room};
use crate::wire::{Listing, RawEntry};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The calls a [`Store`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    GetDir,
    PutDir,
    Probe,
    Fetch,
    Post,
    PostGrowing,
}

/// How an injected failure looks to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server cannot be reached (connection refused, reset).
    Unreachable,
    /// No answer in time.
    Timeout,
    /// An HTTP status (5xx: a server error; 4xx and 3xx: refused).
    Status(u16),
}

impl Failure {
    fn error(self, url: String) -> RemoteError {
        match self {
            Failure::Unreachable => RemoteError::Network {
                url,
                message: "connection refused (injected)".into(),
            },
            Failure::Timeout => RemoteError::Timeout {
                url,
                message: "injected".into(),
            },
            Failure::Status(status) if status >= 500 => RemoteError::Status {
                url,
                status,
                detail: " (injected)".into(),
            },
            Failure::Status(status) => RemoteError::Refused {
                url,
                status,
                detail: " (injected)".into(),
            },
        }
    }
}

/// What a rule does to a call.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Waits this long (tokio's clock) before answering.
    Delay(Duration),
    /// Fails the call.
    Fail(Failure),
    /// A probe answers this size, whatever the blob's.
    LieSize(u64),
    /// A fetch or probe-sent blob arrives with its first byte flipped.
    Corrupt,
    /// The call waits until the [`Hold`] is released.
    Hold(Hold),
}

struct Rule {
    op: Op,
    /// Calls left to apply to (`None`: every call).
    left: Option<usize>,
    fault: Fault,
}

/// A gate a held call waits at. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Hold(Arc<HoldInner>);

#[derive(Debug, Default)]
struct HoldInner {
    released: std::sync::atomic::AtomicBool,
    /// Calls that reached the gate.
    arrived: std::sync::atomic::AtomicUsize,
    wake: tokio::sync::Notify,
}

impl Hold {
    /// Lets every held call (and later ones) through.
    pub fn release(&self) {
        self.0
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.0.wake.notify_waiters();
    }

    /// Calls that reached the gate so far.
    pub fn arrived(&self) -> usize {
        self.0.arrived.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `n` calls reached the gate.
    pub async fn wait_arrived(&self, n: usize) {
        while self.arrived() < n {
            let notified = self.0.wake.notified();
            if self.arrived() >= n {
                return;
            }
            notified.await;
        }
    }

    async fn pass(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        self.0.arrived.fetch_add(1, SeqCst);
        self.0.wake.notify_waiters();
        loop {
            let notified = self.0.wake.notified();
            if self.0.released.load(SeqCst) {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Default)]
struct State {
    blobs: HashMap<Sha512, Arc<Vec<u8>>>,
    dirs: HashMap<String, Vec<RawEntry>>,
    rules: Vec<Rule>,
    calls: HashMap<Op, usize>,
}

/// shacache and shadir in memory. See the module documentation.
pub struct MemoryStore {
    state: Mutex<State>,
    limits: Limits,
    upload: bool,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store, both services configured, short transfer timeouts.
    pub fn new() -> MemoryStore {
        MemoryStore {
            state: Mutex::new(State::default()),
            limits: Limits {
                low_speed_timeout: Duration::from_secs(5),
                upload_answer_timeout: Duration::from_secs(5),
                ..Limits::default()
            },
            upload: true,
        }
    }

    /// The same without upload services (a read-only configuration).
    pub fn read_only() -> MemoryStore {
        MemoryStore {
            upload: false,
            ..MemoryStore::new()
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a blob directly (no call counted); its digest.
    pub fn add_blob(&self, data: &[u8]) -> Sha512 {
        let sha = Sha512::of(data);
        self.state().blobs.insert(sha, Arc::new(data.to_vec()));
        sha
    }

    /// Appends a signed entry to a key directly (no call counted).
    pub fn add_entry(&self, key: &str, entry: RawEntry) {
        self.state()
            .dirs
            .entry(key.to_string())
            .or_default()
            .push(entry);
    }

    /// A blob's bytes, if stored.
    pub fn blob(&self, sha: &Sha512) -> Option<Vec<u8>> {
        self.state().blobs.get(sha).map(|b| b.to_vec())
    }

    /// The entries a key holds (`None`: never written).
    pub fn entries(&self, key: &str) -> Option<Vec<RawEntry>> {
        self.state().dirs.get(key).cloned()
    }

    /// Calls of `op` so far.
    pub fn calls(&self, op: Op) -> usize {
        self.state().calls.get(&op).copied().unwrap_or(0)
    }

    /// Applies `fault` to the next `times` calls of `op` (`None`: to every call, until
    /// [`MemoryStore::clear`]). Rules apply in the order they were set.
    pub fn on(&self, op: Op, times: Option<usize>, fault: Fault) {
        self.state().rules.push(Rule {
            op,
            left: times,
            fault,
        });
    }

    /// Holds every later call of `op` until the returned gate is released.
    pub fn hold(&self, op: Op) -> Hold {
        let h = Hold::default();
        self.on(op, None, Fault::Hold(h.clone()));
        h
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.state().rules.clear();
    }

    /// Counts a call and runs the rules for it: the faults other than delays and holds
    /// (done here) are returned for the call to apply.
    async fn enter(&self, op: Op, url: &str) -> Result<Vec<Fault>, RemoteError> {
        let faults: Vec<Fault> = {
            let mut st = self.state();
            *st.calls.entry(op).or_default() += 1;
            let mut out = Vec::new();
            for r in st.rules.iter_mut().filter(|r| r.op == op) {
                match &mut r.left {
                    Some(0) => continue,
                    Some(n) => *n -= 1,
                    None => {}
                }
                out.push(r.fault.clone());
            }
            st.rules.retain(|r| r.left != Some(0));
            out
        };
        let mut rest = Vec::new();
        for f in faults {
            match f {
                Fault::Delay(d) => tokio::time::sleep(d).await,
                Fault::Hold(h) => h.pass().await,
                Fault::Fail(failure) => return Err(failure.error(url.to_string())),
                other => rest.push(other),
            }
        }
        Ok(rest)
    }

    fn blob_bytes(&self, sha: &Sha512) -> Option<Arc<Vec<u8>>> {
        self.state().blobs.get(sha).cloned()
    }
}

/// Writes `data` into a hashing temporary file, as a download would (allowed by
/// `room`), and verifies it against `sha`.
fn receive(
    sha: &Sha512,
    data: &[u8],
    tmp_dir: &Path,
    room: Room<'_>,
    url: &str,
) -> Result<VerifiedFile, RemoteError> {
    room(0, data.len() as u64)?;
    let mut f = HashingFile::new_in(tmp_dir)?;
    f.write_all(data)?;
    f.verify(sha).map_err(|e| match e {
        crate::digest::VerifyError::Mismatch(m) => RemoteError::Corrupt {
            url: url.to_string(),
            expected: m.expected,
            actual: m.actual,
        },
        crate::digest::VerifyError::Io(e) => RemoteError::Io(e),
    })
}

fn corrupted(data: &[u8], faults: &[Fault]) -> Vec<u8> {
    let mut v = data.to_vec();
    if faults.iter().any(|f| matches!(f, Fault::Corrupt)) {
        match v.first_mut() {
            Some(b) => *b ^= 0xff,
            None => v.push(0),
        }
    }
    v
}

impl Store for MemoryStore {
    fn can_download(&self) -> bool {
        true
    }
    fn can_upload(&self) -> bool {
        self.upload
    }
    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn get_dir<'a>(&'a self, key: &'a str) -> StoreFuture<'a, DirListing> {
        Box::pin(async move {
            self.enter(Op::GetDir, &format!("shadir/{key}")).await?;
            Ok(match self.state().dirs.get(key) {
                None => DirListing::Missing,
                Some(entries) => DirListing::Found(Listing {
                    entries: entries.clone(),
                    rejected: Vec::new(),
                }),
            })
        })
    }

    fn put_dir<'a>(&'a self, key: &'a str, entry: &'a RawEntry) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.enter(Op::PutDir, &format!("shadir/{key}")).await?;
            let mut st = self.state();
            let list = st.dirs.entry(key.to_string()).or_default();
            if !list.contains(entry) {
                list.push(entry.clone());
            }
            Ok(())
        })
    }

    fn probe_blob<'a>(
        &'a self,
        sha: &'a Sha512,
        _tmp_dir: &'a Path,
        _room: Room<'a>,
    ) -> StoreFuture<'a, Probe> {
        Box::pin(async move {
            let faults = self.enter(Op::Probe, &format!("shacache/{sha}")).await?;
            let Some(data) = self.blob_bytes(sha) else {
                return Ok(Probe::Absent);
            };
            let lie = faults.iter().find_map(|f| match f {
                Fault::LieSize(n) => Some(*n),
                _ => None,
            });
            Ok(Probe::Size(lie.unwrap_or(data.len() as u64)))
        })
    }

    fn fetch_blob<'a>(
        &'a self,
        sha: &'a Sha512,
        tmp_dir: &'a Path,
        progress: Progress<'a>,
        room: Room<'a>,
    ) -> StoreFuture<'a, VerifiedFile> {
        Box::pin(async move {
            let url = format!("shacache/{sha}");
            let faults = self.enter(Op::Fetch, &url).await?;
            let data = self
                .blob_bytes(sha)
                .ok_or(RemoteError::NotFound { url: url.clone() })?;
            let data = corrupted(&data, &faults);
            progress(data.len() as u64, Some(data.len() as u64));
            receive(sha, &data, tmp_dir, room, &url)
        })
    }

    fn post_blob<'a>(
        &'a self,
        path: &'a Path,
        sha: &'a Sha512,
        progress: Progress<'a>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let url = "shacache".to_string();
            self.enter(Op::Post, &url).await?;
            let data = std::fs::read(path)?;
            let theirs = Sha512::of(&data);
            if theirs != *sha {
                return Err(RemoteError::Protocol {
                    url,
                    message: format!("server computed a different hash: {theirs}"),
                });
            }
            progress(data.len() as u64, Some(data.len() as u64));
            self.state().blobs.insert(theirs, Arc::new(data));
            Ok(())
        })
    }

    fn post_growing(&self, growing: Arc<Growing>, file: File) -> StoreFuture<'_, Sha512> {
        Box::pin(async move {
            self.enter(Op::PostGrowing, "shacache").await?;
            let mut body = Vec::new();
            let mut stream = std::pin::pin!(growing.stream(file));
            while let Some(chunk) = stream.next().await {
                body.extend_from_slice(&chunk?);
            }
            let sha = Sha512::of(&body);
            self.state().blobs.insert(sha, Arc::new(body));
            Ok(sha)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn answers_like_a_server_and_counts_calls() {
        let s = MemoryStore::new();
        let dir = tempfile::tempdir().unwrap();
        let sha = s.add_blob(b"hello");
        assert!(matches!(
            s.probe_blob(&sha, dir.path(), &crate::remote::unbounded)
                .await
                .unwrap(),
            Probe::Size(5)
        ));
        let v = s
            .fetch_blob(&sha, dir.path(), &|_, _| {}, &crate::remote::unbounded)
            .await
            .unwrap();
        assert_eq!(std::fs::read(v.path()).unwrap(), b"hello");
        assert!(matches!(s.get_dir("k").await.unwrap(), DirListing::Missing));
        let e = RawEntry {
            inner: "{}".into(),
            signature: String::new(),
        };
        s.put_dir("k", &e).await.unwrap();
        s.put_dir("k", &e).await.unwrap();
        assert_eq!(s.entries("k").unwrap().len(), 1, "a duplicate is kept once");
        assert_eq!(
            (s.calls(Op::Probe), s.calls(Op::Fetch), s.calls(Op::PutDir)),
            (1, 1, 2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn faults_apply_to_the_number_of_calls_asked() {
        let s = MemoryStore::new();
        let dir = tempfile::tempdir().unwrap();
        let sha = s.add_blob(b"bytes");
        s.on(Op::Fetch, Some(1), Fault::Corrupt);
        s.on(Op::Probe, Some(1), Fault::LieSize(99));
        s.on(Op::GetDir, Some(2), Fault::Fail(Failure::Unreachable));
        let room = &crate::remote::unbounded;
        let err = s.fetch_blob(&sha, dir.path(), &|_, _| {}, room).await;
        assert!(matches!(err, Err(RemoteError::Corrupt { .. })));
        assert!(s
            .fetch_blob(&sha, dir.path(), &|_, _| {}, room)
            .await
            .is_ok());
        assert!(matches!(
            s.probe_blob(&sha, dir.path(), room).await.unwrap(),
            Probe::Size(99)
        ));
        assert!(matches!(
            s.probe_blob(&sha, dir.path(), room).await.unwrap(),
            Probe::Size(5)
        ));
        for _ in 0..2 {
            assert!(matches!(
                s.get_dir("k").await,
                Err(RemoteError::Network { .. })
            ));
        }
        assert!(s.get_dir("k").await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn delays_use_tokios_clock_and_holds_wait_for_release() {
        let s = Arc::new(MemoryStore::new());
        s.on(Op::GetDir, Some(1), Fault::Delay(Duration::from_secs(3600)));
        let t = tokio::time::Instant::now();
        s.get_dir("k").await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_secs(3600),
            "the paused clock moved"
        );
        let hold = s.hold(Op::PutDir);
        let s2 = s.clone();
        let put = tokio::spawn(async move {
            let e = RawEntry {
                inner: "{}".into(),
                signature: String::new(),
            };
            s2.put_dir("k", &e).await
        });
        hold.wait_arrived(1).await;
        assert!(s.entries("k").is_none(), "held: nothing stored yet");
        hold.release();
        put.await.unwrap().unwrap();
        assert_eq!(s.entries("k").unwrap().len(), 1);
    }
}
