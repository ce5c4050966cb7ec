//! The upload outbox: files written into the mount wait here until they are published,
//! and stay here, intact, when publishing fails. Nothing in it is ever evicted.
//!
//! Layout: `CACHE/v1/outbox/<id>/` holds `data` (the staged bytes), `meta.json` (key,
//! name, namespace, last error, and — once signed — the blob's SHA-512 and the exact
//! entry to PUT) and `lock` (an `flock` held while the item is being published, so two
//! processes never publish one item twice). `meta.json` is replaced atomically. The
//! signed entry is saved before the PUT and reused by every retry of unchanged data, so
//! a retry after a lost answer resends the same bytes (which shadir does not duplicate).
//!
//! The outbox is private (0700 directories, 0600 files; an older tree is tightened when
//! opened), and an item's namespace is its server's URL without credentials: an item an
//! older release stored with `user:password@` in it is rewritten when the outbox opens.

use crate::cache::{create_private_dir, create_private_dir_all, make_private, private_file};
use crate::wire::RawEntry;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What is known about a staged file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ItemMeta {
    pub key: String,
    pub name: String,
    /// The shadir server it is meant for (download-dir-url, or `embedded:<store>`).
    pub namespace: String,
    /// Unix seconds.
    pub created: f64,
    /// Extra metadata given at mount time (`--meta k=v`).
    #[serde(default)]
    pub extra: Map<String, Value>,
    /// Why the last attempt failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The blob's SHA-512 when the entry below was signed.
    #[serde(default)]
    pub sha512: Option<String>,
    /// The signed entry, saved before the PUT: `[inner, signature]`.
    #[serde(default)]
    pub entry: Option<(String, String)>,
}

impl ItemMeta {
    pub fn signed_entry(&self) -> Option<RawEntry> {
        self.entry.as_ref().map(|(i, s)| RawEntry {
            inner: i.clone(),
            signature: s.clone(),
        })
    }
}

/// One outbox item.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub meta: ItemMeta,
}

/// The outbox of one cache directory.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

/// Held while an item is published; released on drop.
pub struct ItemLock {
    _file: File,
}

/// Held by a mount while it has an item open for writing (a shared `flock` on the
/// item's `writing` file); released on drop. Other processes (`outbox retry`, another
/// mount's `--retry-uploads`) leave such an item alone: see [`Outbox::open_for_writing`].
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A name that can be an item's directory (no path separator, no dot-file).
fn is_item_id(id: &str) -> bool {
    !id.is_empty() && !id.contains('/') && !id.starts_with('.')
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Replaces `path` whole (a temporary file renamed over it): a crash of the process
/// leaves the old or the new text, never a mix. Not fsynced, like the item's data
/// (design: staged bytes live in the page cache until published): an fsync of the
/// metadata alone would keep, after a power loss, an item whose data is gone, and it
/// cost five disk flushes per copied file (about 1.3 ms a file; BENCHMARKS.md).
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // tempfile creates the file 0600.
    let mut tmp = tempfile::Builder::new().prefix(".meta-").tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl Outbox {
    /// The outbox under a cache directory (created if missing).
    pub fn open(cache_dir: &Path) -> std::io::Result<Outbox> {
        let dir = cache_dir.join("v1").join("outbox");
        create_private_dir_all(&dir)?;
        let outbox = Outbox { dir };
        outbox.tighten_and_migrate();
        Ok(outbox)
    }

    /// Makes every item private and rewrites the metadata of items whose namespace
    /// holds credentials (both left by older releases). An item being published by
    /// another process is left for the next open. Best effort: errors are logged.
    fn tighten_and_migrate(&self) {
        let _ = make_private(&self.dir);
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let path = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = make_private(&path);
                continue;
            }
            let _ = make_private(&path);
            if let Ok(files) = std::fs::read_dir(&path) {
                for f in files.flatten() {
                    let _ = make_private(&f.path());
                }
            }
            let Some(id) = e.file_name().to_str().map(String::from) else {
                continue;
            };
            let Some(mut item) = self.get(&id) else {
                continue;
            };
            let clean = crate::config::without_credentials(&item.meta.namespace);
            if clean == item.meta.namespace {
                continue;
            }
            match self.try_lock(&id) {
                Ok(Some(_lock)) => {
                    item.meta.namespace = clean;
                    if let Err(err) = self.save(&item) {
                        tracing::warn!(item = %id, error = %err, "cannot remove credentials from an outbox item's namespace");
                    }
                }
                _ => {
                    tracing::warn!(item = %id, "outbox item busy: its namespace keeps credentials until the next start")
                }
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn item_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// The staged bytes of an item.
    pub fn data_path(&self, id: &str) -> PathBuf {
        self.item_dir(id).join("data")
    }

    /// A new empty item; returns it and its data file opened read-write.
    pub fn create(&self, meta: ItemMeta) -> std::io::Result<(Item, File)> {
        let id = format!(
            "{:x}-{:x}-{:08x}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0),
            std::process::id(),
            rand::random::<u32>()
        );
        let dir = self.item_dir(&id);
        create_private_dir(&dir)?;
        let file = private_file()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("data"))?;
        let item = Item { id, meta };
        if let Err(e) = self.save(&item) {
            // No half-made item: nothing was written into it yet.
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok((item, file))
    }

    /// Writes an item's metadata (atomically).
    pub fn save(&self, item: &Item) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&item.meta).map_err(std::io::Error::other)?;
        write_atomic(&self.item_dir(&item.id).join("meta.json"), &json)
    }

    /// Marks item `id`'s data incomplete (a write into it failed: it is not the file its
    /// writer meant) with an empty `incomplete` file beside it, or clears the mark. The
    /// mark is a file of its own, so that no rewrite of `meta.json` (a publish in another
    /// process, a rename) can lose it, and creating an empty file needs no data block on
    /// the disk that just refused the data. The reason goes to `last_error`, best effort.
    pub fn set_incomplete(&self, id: &str, why: Option<&str>) -> std::io::Result<()> {
        let marker = self.item_dir(id).join("incomplete");
        match why {
            Some(why) => {
                private_file()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&marker)?;
                if let Some(mut item) = self.get(id) {
                    item.meta.last_error = Some(why.to_string());
                    let _ = self.save(&item);
                }
                Ok(())
            }
            None => match std::fs::remove_file(&marker) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// True when item `id` is marked incomplete (see [`Outbox::set_incomplete`]).
    pub fn is_incomplete(&self, id: &str) -> bool {
        self.item_dir(id).join("incomplete").exists()
    }

    /// One item, if it exists and its metadata reads.
    pub fn get(&self, id: &str) -> Option<Item> {
        let text = std::fs::read(self.item_dir(id).join("meta.json")).ok()?;
        let meta: ItemMeta = serde_json::from_slice(&text).ok()?;
        Some(Item {
            id: id.to_string(),
            meta,
        })
    }

    /// Every item, oldest first. An item whose metadata cannot be read is reported in
    /// the second list (its data is kept; `drop` removes it).
    pub fn list(&self) -> (Vec<Item>, Vec<String>) {
        let mut items = Vec::new();
        let mut broken = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let Some(id) = e.file_name().to_str().map(String::from) else {
                    continue;
                };
                if id.starts_with('.') || !e.path().is_dir() {
                    continue;
                }
                match self.get(&id) {
                    Some(item) => items.push(item),
                    None => broken.push(id),
                }
            }
        }
        items.sort_by(|a, b| {
            a.meta
                .created
                .partial_cmp(&b.meta.created)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then_with(|| a.id.cmp(&b.id))
        });
        (items, broken)
    }

    /// Removes an item and its data.
    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        if !is_item_id(id) {
            return Err(std::io::Error::other("not an outbox item id"));
        }
        std::fs::remove_dir_all(self.item_dir(id))
    }

    /// Takes an item's publishing lock without waiting; `None` when another process
    /// (or another handle) holds it.
    pub fn try_lock(&self, id: &str) -> std::io::Result<Option<ItemLock>> {
        let file = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.item_dir(id).join("lock"))?;
        Ok(flock(&file, libc::LOCK_EX)?.then_some(ItemLock { _file: file }))
    }

    fn writing_file(&self, id: &str) -> std::io::Result<File> {
        if !is_item_id(id) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not an outbox item id",
            ));
        }
        private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.item_dir(id).join("writing"))
    }

    /// Marks an item as open for writing by this process until the returned lock is
    /// dropped (a shared lock: several handles may hold it at once). Fails with
    /// `WouldBlock` while another process has claimed the item ([`Outbox::claim`]).
    pub fn writer_lock(&self, id: &str) -> std::io::Result<WriterLock> {
        let file = self.writing_file(id)?;
        if !flock(&file, libc::LOCK_SH)? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "the item is being published by another process",
            ));
        }
        Ok(WriterLock { _file: file })
    }

    /// Claims an item for a process that publishes or removes it from outside the mount
    /// (`outbox retry`/`drop`): `None` while a mount holds it open for writing. While the
    /// claim is held, no mount can open the item for writing.
    pub fn claim(&self, id: &str) -> std::io::Result<Option<WriterLock>> {
        let file = self.writing_file(id)?;
        Ok(flock(&file, libc::LOCK_EX)?.then_some(WriterLock { _file: file }))
    }

    /// A new item's metadata.
    pub fn new_meta(
        key: &str,
        name: &str,
        namespace: &str,
        extra: &Map<String, Value>,
    ) -> ItemMeta {
        ItemMeta {
            key: key.to_string(),
            name: name.to_string(),
            namespace: namespace.to_string(),
            created: now(),
            extra: extra.clone(),
            last_error: None,
            sha512: None,
            entry: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_save_list_lock_remove() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path()).unwrap();
        let (mut item, mut f) = ob
            .create(Outbox::new_meta("k", "a.bin", "ns", &Map::new()))
            .unwrap();
        f.write_all(b"data").unwrap();
        item.meta.last_error = Some("boom".into());
        ob.save(&item).unwrap();
        let (items, broken) = ob.list();
        assert!(broken.is_empty());
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].meta.last_error.as_deref(), Some("boom"));
        assert_eq!(std::fs::read(ob.data_path(&item.id)).unwrap(), b"data");
        let l = ob.try_lock(&item.id).unwrap();
        assert!(l.is_some());
        // flock is per open file description: a second open cannot take it.
        assert!(ob.try_lock(&item.id).unwrap().is_none());
        drop(l);
        assert!(ob.try_lock(&item.id).unwrap().is_some());
        let w1 = ob.writer_lock(&item.id).unwrap();
        let w2 = ob.writer_lock(&item.id).unwrap();
        assert!(ob.claim(&item.id).unwrap().is_none());
        drop(w1);
        assert!(ob.claim(&item.id).unwrap().is_none());
        drop(w2);
        let c = ob.claim(&item.id).unwrap().expect("no writer left");
        let e = ob.writer_lock(&item.id).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        drop(c);
        ob.writer_lock(&item.id).unwrap();
        ob.remove(&item.id).unwrap();
        assert!(ob.list().0.is_empty());
        assert!(ob.remove("../x").is_err());
    }

    #[test]
    fn unreadable_metadata_is_reported_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path()).unwrap();
        let (item, _) = ob
            .create(Outbox::new_meta("k", "a", "ns", &Map::new()))
            .unwrap();
        std::fs::write(ob.dir().join(&item.id).join("meta.json"), b"{broken").unwrap();
        let (items, broken) = ob.list();
        assert!(items.is_empty());
        assert_eq!(broken, vec![item.id.clone()]);
        assert!(ob.data_path(&item.id).exists());
    }
}
