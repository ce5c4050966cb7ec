//! The core's rules on the in-memory, fault-injecting store with tokio's paused clock:
//! no FUSE, no socket, no real time. `write.rs` holds the write path's rules and the
//! integrity invariants; `read.rs` listings, trust and reads.

mod pin;
mod read;
mod write;

use super::{Attr, Core, FsError, FsOptions, Kind, ROOT_INO};
use crate::cache::{Cache, CacheOptions};
use crate::client::Client;
use crate::digest::Sha512;
use crate::signature::{Signer, Verifier};
use crate::store::memory::MemoryStore;
use crate::wire::RawEntry;
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The process the tests act as (a flush from it is the opener's).
const ME: Option<u32> = Some(4242);
/// Another process (a child that inherited a descriptor).
const CHILD: Option<u32> = Some(4343);

fn fixture(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/signature")
        .join(name)
}

/// A signer whose certificate the rig trusts (A) and one it does not (B).
fn signer(trusted: bool) -> Signer {
    let name = if trusted {
        "signer-a.pkcs8.key"
    } else {
        "signer-b.key"
    };
    Signer::load(&fixture(name)).expect("fixture key")
}

/// One core over one in-memory store, with its own cache directory.
struct Rig {
    store: Arc<MemoryStore>,
    core: Arc<Core>,
    _dir: tempfile::TempDir,
    cache_dir: PathBuf,
}

impl Rig {
    /// A writable core trusting A, with key `k` configured.
    fn new() -> Rig {
        Rig::with(Arc::new(MemoryStore::new()), |_| {})
    }

    fn with(store: Arc<MemoryStore>, tune: impl FnOnce(&mut FsOptions)) -> Rig {
        let dir = tempfile::tempdir().expect("temporary directory");
        let cache_dir = dir.path().join("cache");
        Rig::at(store, dir, cache_dir, tune)
    }

    fn at(
        store: Arc<MemoryStore>,
        dir: tempfile::TempDir,
        cache_dir: PathBuf,
        tune: impl FnOnce(&mut FsOptions),
    ) -> Rig {
        let cache = Cache::open(CacheOptions {
            dir: cache_dir.clone(),
            max_bytes: 1 << 30,
            namespace: "memory".into(),
        })
        .expect("cache");
        let pem = std::fs::read_to_string(fixture("signer-a.crt")).expect("certificate");
        let (verifier, _) = Verifier::from_pems(&[pem]);
        let client = Client {
            store: store.clone(),
            verifier,
            signer: Some(signer(true)),
            warnings: Vec::new(),
        };
        let mut opts = FsOptions {
            keys: vec!["k".into()],
            writable: true,
            namespace: "memory".into(),
            dir_ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(10),
            ..FsOptions::default()
        };
        tune(&mut opts);
        let core = Core::new(client, cache, opts);
        Rig {
            store,
            core,
            _dir: dir,
            cache_dir,
        }
    }

    /// The same store and cache directory seen by a new core (a remount).
    fn remount(self) -> Rig {
        let Rig {
            store,
            core,
            _dir,
            cache_dir,
        } = self;
        // What `mount` does once its session has ended.
        core.save_listings();
        drop(core);
        Rig::at(store, _dir, cache_dir, |_| {})
    }

    async fn key(&self, key: &str) -> u64 {
        self.core.lookup(ROOT_INO, key).await.expect("key").ino
    }

    /// Names shown in a key directory (without `.`, `..`, `.entries.json`).
    async fn names(&self, key: &str) -> Vec<(String, Kind)> {
        let ino = self.key(key).await;
        self.core
            .readdir(ino)
            .await
            .expect("readdir")
            .into_iter()
            .filter(|e| ![".", "..", ".entries.json"].contains(&e.name.as_str()))
            .map(|e| (e.name, e.kind))
            .collect()
    }

    /// Creates `name` in key `k`, writes `data` and closes it as `cp` does (flush from
    /// the opener, then release); the close's result.
    async fn cp(&self, name: &str, data: &[u8]) -> Result<(), FsError> {
        let parent = self.key("k").await;
        let (_, fh, _) = self.core.create(parent, name, ME).await?;
        if !data.is_empty() {
            self.core.write(fh, 0, data).await?;
        }
        let closed = self.core.flush(fh, ME).await;
        self.core.release_handle(fh).await;
        closed
    }

    /// Reads a whole file through an open handle.
    async fn read(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let (fh, _) = self.core.open(ino).await?;
        let mut out = Vec::new();
        loop {
            let chunk = self.core.read(fh, out.len() as u64, 1 << 16)?;
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        self.core.release(fh);
        Ok(out)
    }

    async fn attr(&self, key: &str, name: &str) -> Result<Attr, FsError> {
        let parent = self.key(key).await;
        self.core.lookup(parent, name).await
    }

    /// The blobs the entries of `key` point to, in the order they were PUT.
    fn published(&self, key: &str) -> Vec<Vec<u8>> {
        self.store
            .entries(key)
            .unwrap_or_default()
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(&e.inner).expect("inner JSON");
                let sha = Sha512::parse(v["sha512"].as_str().expect("sha512")).unwrap();
                self.store.blob(&sha).expect("the entry's blob is stored")
            })
            .collect()
    }
}

/// A signed entry for `data` named `file` (the blob stored too).
fn entry(store: &MemoryStore, signer: &Signer, file: &str, data: &[u8]) -> RawEntry {
    let sha = store.add_blob(data);
    let mut meta = Map::new();
    meta.insert("file".into(), Value::String(file.into()));
    let inner = crate::wire::build_inner(&sha, &meta);
    RawEntry {
        signature: signer.sign(&inner),
        inner,
    }
}
