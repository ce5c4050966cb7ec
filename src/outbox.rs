//! The upload outbox: files written into the mount wait here until they are published,
//! and stay here, intact, when publishing fails. Nothing in it is ever evicted.
//!
//! Layout: `CACHE/v1/outbox/<id>/` holds `data` (the staged bytes) and `meta.json` (key,
//! name, namespace, last error, and — once signed — the blob's SHA-512 and the exact
//! entry to PUT). The signed entry is saved before the PUT and reused by every retry of
//! unchanged data, so a retry after a lost answer resends the same bytes (which shadir
//! does not duplicate).
//!
//! Two `flock`s, on inodes the item has anyway: the *publishing* lock, exclusive, on
//! `data` (two processes never publish one item at once), and the *writer* lock on the
//! item's directory, shared by the handles of a mount that has the item open for writing
//! and taken exclusively by a process that publishes or drops the item from outside it
//! (`claim`). Earlier versions kept these locks on two files of their own (`lock`,
//! `writing`; left in old items, harmless, and not seen by this version's locks, so do not
//! run two versions on one cache directory at once): with them and a metadata file
//! renamed into place at each save, a copied file cost six new inodes, which ext4 without
//! a journal allocates slowly once many were freed in the last 30 s (BENCHMARKS.md).
//!
//! `meta.json` is a log of versions of the item's metadata, one compact JSON object a
//! line, the last whole one in force: a save appends a line instead of writing a new
//! file (no new inode; a torn append leaves the version before it), and a log grown past
//! [`META_LOG_LIMIT`] is replaced whole, atomically. A file that is one JSON document
//! (older releases wrote it pretty-printed) reads as it always did.
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
use std::sync::{Arc, Mutex};
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
    /// Names of the spare item directories this process may reuse (see [`Outbox::retire`]).
    spares: Arc<Mutex<Vec<String>>>,
}

/// How a spare item directory's name starts (a dot-name: never an item id).
const SPARE_PREFIX: &str = ".spare-";
/// Spare directories kept, at most, by one process (and found at open).
const MAX_SPARES: usize = 64;
/// How the name of a directory being removed starts (see [`Outbox::remove_tree`]).
const GONE_PREFIX: &str = ".gone-";

fn spares_of(m: &Mutex<Vec<String>>) -> std::sync::MutexGuard<'_, Vec<String>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

fn not_an_item() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an outbox item id")
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

/// An item's metadata as one line of its `meta.json` log (newline included).
fn meta_line(meta: &ItemMeta) -> std::io::Result<Vec<u8>> {
    let mut line = serde_json::to_vec(meta).map_err(std::io::Error::other)?;
    line.push(b'\n');
    Ok(line)
}

/// Writes `data` as the whole content of `path` (created private, or truncated), in
/// place: for files no reader can see half-written (a new item's, an emptied spare's).
fn write_in_place(path: &Path, data: &[u8]) -> std::io::Result<()> {
    private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?
        .write_all(data)
}

/// Past this size a save rewrites `meta.json` whole (see the module's doc).
const META_LOG_LIMIT: u64 = 16 * 1024;

/// The metadata in force in the text of a `meta.json`: the whole text when it is one
/// document, else its last line that is one (earlier lines are older versions; a torn
/// last line is skipped).
fn parse_meta(text: &[u8]) -> Option<ItemMeta> {
    if let Ok(meta) = serde_json::from_slice(text) {
        return Some(meta);
    }
    text.split(|&b| b == b'\n')
        .rev()
        .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
        .find_map(|line| serde_json::from_slice(line).ok())
}

impl Outbox {
    /// The outbox under a cache directory (created if missing).
    pub fn open(cache_dir: &Path) -> std::io::Result<Outbox> {
        let dir = cache_dir.join("v1").join("outbox");
        create_private_dir_all(&dir)?;
        let outbox = Outbox {
            dir,
            spares: Arc::default(),
        };
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
            let name = e.file_name().to_str().map(String::from);
            let name_starts = |prefix: &str| name.as_deref().is_some_and(|n| n.starts_with(prefix));
            if name_starts(SPARE_PREFIX) {
                let name = name.as_deref().unwrap_or_default();
                let mut spares = spares_of(&self.spares);
                if spares.len() < MAX_SPARES {
                    spares.push(name.to_string());
                } else {
                    drop(spares);
                    let _ = self.remove_tree(name);
                }
                continue;
            }
            if name_starts(GONE_PREFIX) {
                // Renamed to be removed by a process that stopped before it was done.
                let _ = std::fs::remove_dir_all(&path);
                continue;
            }
            if let Ok(files) = std::fs::read_dir(&path) {
                for f in files.flatten() {
                    let _ = make_private(&f.path());
                }
            }
            let Some(id) = name else {
                continue;
            };
            let Some(mut item) = self.get(&id) else {
                continue;
            };
            let clean = crate::config::without_credentials(&item.meta.namespace);
            if clean == item.meta.namespace {
                continue;
            }
            // Not while another process publishes it; an item without data has nothing
            // to publish, so no lock to take.
            let free = match self.try_lock(&id) {
                Ok(Some(lock)) => Some(Some(lock)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
                _ => None,
            };
            if free.is_none() {
                tracing::warn!(item = %id, "outbox item busy: its namespace keeps credentials until the next start");
                continue;
            }
            item.meta.namespace = clean;
            // Rewritten whole, not appended: the old version must not stay.
            if let Err(err) = self.rewrite(&item) {
                tracing::warn!(item = %id, error = %err, "cannot remove credentials from an outbox item's namespace");
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
        if !self.take_spare(&dir) {
            create_private_dir(&dir)?;
        }
        // Truncated, not created anew: a spare directory may still hold what a crash
        // kept from retiring it (see `retire`), never an unpublished item's data.
        let _ = std::fs::remove_file(dir.join("incomplete"));
        let file = private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("data"))?;
        let item = Item { id, meta };
        // Written in place: the item is new, and a crash before this line leaves an item
        // with no data either (listed as broken, removed by `outbox drop`).
        let first = meta_line(&item.meta).and_then(|l| write_in_place(&dir.join("meta.json"), &l));
        if let Err(e) = first {
            // No half-made item: nothing was written into it yet.
            let _ = self.remove_tree(&item.id);
            return Err(e);
        }
        Ok((item, file))
    }

    /// Saves an item's metadata: a new version appended to `meta.json` (one `write`;
    /// readers take the last whole line), or the file replaced atomically once the log
    /// has grown past [`META_LOG_LIMIT`].
    pub fn save(&self, item: &Item) -> std::io::Result<()> {
        // The leading newline ends a line a crash may have left torn.
        let mut entry = vec![b'\n'];
        entry.extend(meta_line(&item.meta)?);
        let path = self.item_dir(&item.id).join("meta.json");
        let mut log = private_file().append(true).create(true).open(&path)?;
        if log.metadata()?.len() > META_LOG_LIMIT {
            drop(log);
            return write_atomic(&path, &entry[1..]);
        }
        log.write_all(&entry)
    }

    /// Replaces an item's `meta.json` by its current metadata alone (atomically): no
    /// earlier version stays in the file.
    pub fn rewrite(&self, item: &Item) -> std::io::Result<()> {
        write_atomic(
            &self.item_dir(&item.id).join("meta.json"),
            &meta_line(&item.meta)?,
        )
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
        let meta = parse_meta(&text)?;
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

    /// Moves a spare directory to `to`; false when this process knows of none left.
    fn take_spare(&self, to: &Path) -> bool {
        loop {
            let Some(name) = spares_of(&self.spares).pop() else {
                return false;
            };
            // Another process may have taken it (or removed it) meanwhile.
            if std::fs::rename(self.dir.join(&name), to).is_ok() {
                return true;
            }
        }
    }

    /// Removes a published item, keeping its directory, with an empty `meta.json`, as a
    /// spare that a new item of this process takes over (a rename) instead of creating a
    /// directory and a metadata file: with the data moved into the cache, a copied file
    /// then costs one new inode and frees none (BENCHMARKS.md: ext4 without a journal
    /// allocates slowly after many frees). At most [`MAX_SPARES`] are kept; past that,
    /// or when anything fails, the item is removed as by [`Outbox::remove`].
    pub fn retire(&self, id: &str) -> std::io::Result<()> {
        if !is_item_id(id) {
            return Err(not_an_item());
        }
        if spares_of(&self.spares).len() >= MAX_SPARES {
            return self.remove(id);
        }
        let keep = || -> std::io::Result<String> {
            let dir = self.item_dir(id);
            // Only meta.json stays (data the cache could not take, older versions'
            // lock files and any marker go), emptied before the directory leaves the
            // item's name: a spare never shows as an item.
            for e in std::fs::read_dir(&dir)? {
                let e = e?;
                if e.file_name() != "meta.json" {
                    std::fs::remove_file(e.path())?;
                }
            }
            write_in_place(&dir.join("meta.json"), b"")?;
            let name = format!("{SPARE_PREFIX}{:016x}", rand::random::<u64>());
            std::fs::rename(&dir, self.dir.join(&name))?;
            Ok(name)
        };
        match keep() {
            Ok(name) => {
                spares_of(&self.spares).push(name);
                Ok(())
            }
            Err(_) => self.remove(id),
        }
    }

    /// Removes an item and its data.
    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        if !is_item_id(id) {
            return Err(not_an_item());
        }
        self.remove_tree(id)
    }

    /// Removes directory `name` of the outbox: first renamed to a name nobody takes
    /// (`.gone-*`), then removed. Removing a tree goes through a descriptor on its
    /// directory, and a directory here can become another item under another name (a
    /// spare taken by a rename, here or in another process): removed in place, a
    /// removal racing with that could delete the new item's files. Renamed first, it
    /// removes only what it renamed, or nothing when another rename came first. A
    /// `.gone-*` left by a crash is removed at the next open.
    fn remove_tree(&self, name: &str) -> std::io::Result<()> {
        let gone = self
            .dir
            .join(format!("{GONE_PREFIX}{:016x}", rand::random::<u64>()));
        std::fs::rename(self.dir.join(name), &gone)?;
        std::fs::remove_dir_all(&gone)
    }

    /// Takes an item's publishing lock (an exclusive `flock` on its `data`) without
    /// waiting; `None` when another process (or another handle) holds it.
    pub fn try_lock(&self, id: &str) -> std::io::Result<Option<ItemLock>> {
        if !is_item_id(id) {
            return Err(not_an_item());
        }
        let file = File::open(self.data_path(id))?;
        Ok(flock(&file, libc::LOCK_EX)?.then_some(ItemLock { _file: file }))
    }

    /// The item's directory, opened for its writer lock.
    fn writing_file(&self, id: &str) -> std::io::Result<File> {
        if !is_item_id(id) {
            return Err(not_an_item());
        }
        File::open(self.item_dir(id))
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
    fn an_item_is_two_files_and_its_locks_need_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path()).unwrap();
        let (mut item, _f) = ob
            .create(Outbox::new_meta("k", "a", "ns", &Map::new()))
            .unwrap();
        let _w = ob.writer_lock(&item.id).unwrap();
        let _l = ob.try_lock(&item.id).unwrap().expect("publishing lock");
        item.meta.sha512 = Some("ab".repeat(64));
        item.meta.entry = Some(("inner".into(), "sig".into()));
        ob.save(&item).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(ob.dir().join(&item.id))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["data", "meta.json"]);
        // The two locks are independent: a writer does not keep the publisher out, and
        // a claim is refused while a writer holds the item.
        assert!(ob.claim(&item.id).unwrap().is_none());
        assert!(ob.try_lock(&item.id).unwrap().is_none(), "held above");
        std::fs::remove_file(ob.data_path(&item.id)).unwrap();
        // No data, nothing to publish: NotFound, which a publisher reports as an item
        // gone when its metadata is gone too.
        assert_eq!(
            ob.try_lock(&item.id).err().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
        assert_eq!(
            ob.try_lock("no-such-item").err().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn metadata_saves_append_and_the_last_whole_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path()).unwrap();
        let (mut item, _f) = ob
            .create(Outbox::new_meta("k", "a", "ns", &Map::new()))
            .unwrap();
        let path = ob.dir().join(&item.id).join("meta.json");
        let first_len = std::fs::metadata(&path).unwrap().len();
        item.meta.last_error = Some("one".into());
        ob.save(&item).unwrap();
        item.meta.last_error = Some("two".into());
        ob.save(&item).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() as u64 > 2 * first_len, "appended: {text}");
        assert_eq!(
            ob.get(&item.id).unwrap().meta.last_error.as_deref(),
            Some("two")
        );
        // A torn append (a crash in the middle of the write) leaves the version before.
        let mut torn = text.clone().into_bytes();
        torn.extend_from_slice(b"\n{\"key\": \"k\", \"name\": \"a\", \"last_er");
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(
            ob.get(&item.id).unwrap().meta.last_error.as_deref(),
            Some("two")
        );
        // ...and the next save after it is read whole.
        item.meta.last_error = Some("three".into());
        ob.save(&item).unwrap();
        assert_eq!(
            ob.get(&item.id).unwrap().meta.last_error.as_deref(),
            Some("three")
        );
        // An older release's pretty-printed document reads as before, and appends work
        // on it.
        item.meta.last_error = Some("pretty".into());
        std::fs::write(&path, serde_json::to_vec_pretty(&item.meta).unwrap()).unwrap();
        assert_eq!(
            ob.get(&item.id).unwrap().meta.last_error.as_deref(),
            Some("pretty")
        );
        item.meta.last_error = Some("after pretty".into());
        ob.save(&item).unwrap();
        assert_eq!(
            ob.get(&item.id).unwrap().meta.last_error.as_deref(),
            Some("after pretty")
        );
        // A log past the limit is replaced by its last version alone.
        item.meta.last_error = Some("x".repeat(1000));
        while std::fs::metadata(&path).unwrap().len() <= META_LOG_LIMIT {
            ob.save(&item).unwrap();
        }
        item.meta.last_error = Some("compacted".into());
        ob.save(&item).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(
            ob.get(&item.id).unwrap().meta.last_error.as_deref(),
            Some("compacted")
        );
    }

    #[test]
    fn retired_items_become_spares_a_new_item_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path()).unwrap();
        let meta = |name: &str| Outbox::new_meta("k", name, "ns", &Map::new());
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let (a, mut f) = ob.create(meta("a")).unwrap();
        f.write_all(b"published bytes").unwrap();
        ob.set_incomplete(&a.id, Some("a marker that must not survive"))
            .unwrap();
        let a_dir = inode(&ob.dir().join(&a.id));
        ob.retire(&a.id).unwrap();
        // Gone as an item; one hidden spare with an empty meta.json.
        assert!(ob.get(&a.id).is_none());
        let (items, broken) = ob.list();
        assert!(items.is_empty() && broken.is_empty());
        let spares: Vec<PathBuf> = std::fs::read_dir(ob.dir())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(spares.len(), 1, "{spares:?}");
        let names: Vec<_> = std::fs::read_dir(&spares[0])
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["meta.json"]);
        assert_eq!(
            std::fs::metadata(spares[0].join("meta.json"))
                .unwrap()
                .len(),
            0
        );
        // The next item is that directory, with nothing of the old one in it.
        let (b, _) = ob.create(meta("b")).unwrap();
        assert_eq!(inode(&ob.dir().join(&b.id)), a_dir);
        assert_eq!(std::fs::read(ob.data_path(&b.id)).unwrap(), b"");
        assert!(!ob.is_incomplete(&b.id));
        assert_eq!(ob.get(&b.id).unwrap().meta.name, "b");
        assert_eq!(ob.list().0.len(), 1);
        // Another process (a new Outbox on the same directory) finds spares at open.
        ob.retire(&b.id).unwrap();
        let other = Outbox::open(dir.path()).unwrap();
        let (c, _) = other.create(meta("c")).unwrap();
        assert_eq!(inode(&other.dir().join(&c.id)), a_dir);
        // The first process's name for it is stale: it makes a new directory.
        let (d, _) = ob.create(meta("d")).unwrap();
        assert_ne!(inode(&ob.dir().join(&d.id)), a_dir);
        let (items, broken) = ob.list();
        assert!(broken.is_empty());
        assert_eq!(items.len(), 2);
        // At most MAX_SPARES kept; past that an item is removed.
        for i in 0..MAX_SPARES + 3 {
            let (x, _) = other.create(meta(&format!("x{i}"))).unwrap();
            other.retire(&x.id).unwrap();
        }
        let mut made = Vec::new();
        for i in 0..MAX_SPARES + 3 {
            made.push(ob.create(meta(&format!("y{i}"))).unwrap().0);
        }
        for x in &made {
            ob.retire(&x.id).unwrap();
        }
        let spare_count = std::fs::read_dir(ob.dir())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(SPARE_PREFIX)
            })
            .count();
        assert!(spare_count <= 2 * MAX_SPARES, "{spare_count}");
        let reopened = Outbox::open(dir.path()).unwrap();
        assert!(spares_of(&reopened.spares).len() <= MAX_SPARES);
    }

    #[test]
    fn a_removal_renames_first_and_never_reaches_a_reused_directory() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(dir.path()).unwrap();
        let meta = |name: &str| Outbox::new_meta("k", name, "ns", &Map::new());
        let (a, _) = ob.create(meta("a")).unwrap();
        ob.retire(&a.id).unwrap();
        let (b, mut f) = ob.create(meta("b")).unwrap();
        f.write_all(b"b's bytes").unwrap();
        // A removal of `a` that comes late (its directory is `b`'s now) removes nothing.
        assert_eq!(
            ob.remove(&a.id).err().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
        assert_eq!(std::fs::read(ob.data_path(&b.id)).unwrap(), b"b's bytes");
        assert_eq!(ob.get(&b.id).unwrap().meta.name, "b");
        // A removal leaves nothing behind; one cut short is finished at the next open.
        ob.remove(&b.id).unwrap();
        let names = || -> Vec<String> {
            std::fs::read_dir(ob.dir())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        };
        assert!(names().is_empty(), "{:?}", names());
        let (c, _) = ob.create(meta("c")).unwrap();
        let cut_short = ob.dir().join(format!("{GONE_PREFIX}0123456789abcdef"));
        std::fs::rename(ob.dir().join(&c.id), &cut_short).unwrap();
        let reopened = Outbox::open(dir.path()).unwrap();
        assert!(!cut_short.exists());
        assert!(reopened.list().0.is_empty() && reopened.list().1.is_empty());
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
