//! Writing into a key directory: files are staged in the outbox (any write pattern,
//! seekable, real size visible) and published when closed, by `flush`, the FUSE call
//! behind every `close()`; `close()` returns only after the blob and the signed entry
//! are on the servers, and fails (EACCES, EIO, ENOSPC) with the file kept, intact and
//! visible as pending, otherwise.
//!
//! Rules: names starting with `.` are staged but not published (temporary files of
//! rsync and editors); renaming one to a plain name publishes it and `rename()` returns
//! the result. Opening a published name with `O_TRUNC` starts a new staged version;
//! other changes to published entries are refused (EPERM: shadir has no delete). A
//! flush with nothing new does nothing. When a file is written again through a handle
//! whose data was already published (several processes sharing a descriptor), the
//! published bytes are copied into a new staged version first, so the cached blob is
//! never modified.

use super::{lock, Attr, Core, FsError, Handle, Invalidator, Kind, Node};
use crate::digest::{adopt_hashed, Sha512, StreamHasher};
use crate::growing::Growing;
use crate::naming::{unescape, KEY_RESERVED};
use crate::outbox::{Outbox, WriterLock};
use crate::publish::{publish, PublishError};
use crate::remote::{await_sent, Probe, RemoteError, SendWait};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// A staged file's state in this mount.
#[derive(Debug, Clone)]
pub struct StagedInfo {
    pub key: String,
    pub name: String,
    pub last_error: Option<String>,
    /// Written since it was last published (or never published).
    pub dirty: bool,
    /// Data was written (or the size set) at least once.
    pub written: bool,
    /// A write into the staged data failed: why, and its errno (reported by every
    /// close until the file is written again from empty; never published meanwhile).
    pub incomplete: Option<(String, i32)>,
    /// The last publish failed and nothing was written since: the last release does
    /// not try again at once (`--retry-uploads` and `outbox retry` do).
    pub failed: bool,
    /// Frozen bytes: a publish holds this exclusively from the moment it starts hashing
    /// until it ends; everything that changes the staged bytes or size holds it shared.
    freeze: Arc<tokio::sync::RwLock<()>>,
    /// One publish of an item at a time; a flush that finds one in flight waits for it.
    publishing: Arc<tokio::sync::Mutex<()>>,
}

impl StagedInfo {
    fn new(key: String, name: String) -> StagedInfo {
        StagedInfo {
            key,
            name,
            last_error: None,
            dirty: true,
            written: false,
            incomplete: None,
            failed: false,
            freeze: Arc::default(),
            publishing: Arc::default(),
        }
    }
}

/// The running digest of a staged file written sequentially from its start (what `cp`
/// does), so that publishing does not read the file again. Any other write pattern
/// drops it, and the file is hashed when published.
#[derive(Default)]
struct SeqHashes(HashMap<String, StreamHasher>);

/// Uploads started while a staged file is still being written in order (see
/// [`crate::growing`]); `publish_staged` waits for one instead of sending the file again.
struct EarlyUpload {
    growing: Arc<Growing>,
    task: tokio::task::JoinHandle<Result<Sha512, RemoteError>>,
}

/// Sequential data a staged file needs before its upload starts while it is written:
/// small files are sent at close, in one go.
const EARLY_UPLOAD_MIN: u64 = 8 << 20;

/// The staged files of this mount's namespace.
#[derive(Default)]
pub struct Staging {
    by_name: HashMap<(String, String), String>,
    items: HashMap<String, StagedInfo>,
    seq: SeqHashes,
    early: HashMap<String, EarlyUpload>,
    /// Where early uploads run (the runtime the mount was created in); none, none.
    runtime: Option<tokio::runtime::Handle>,
    /// Set when an early upload failed for another reason than being abandoned (a
    /// server that refuses a body without a length, say): later files are sent at close.
    early_off: bool,
    /// Items this mount published: id → (key, name, sha, size).
    published: HashMap<String, (String, String, crate::digest::Sha512, u64)>,
    /// A published item → the new version that handles still writing after that
    /// publish share (a copy of the published bytes plus their writes).
    successor: HashMap<String, String>,
}

impl Staging {
    /// Pending items left by earlier runs (for this server), reported at mount time.
    pub fn load(outbox: Option<&Outbox>, namespace: &str) -> Staging {
        let mut s = Staging {
            runtime: tokio::runtime::Handle::try_current().ok(),
            ..Staging::default()
        };
        let Some(outbox) = outbox else {
            return s;
        };
        let (items, broken) = outbox.list();
        for id in broken {
            tracing::warn!("outbox item {id}: unreadable metadata; see `shacachefs outbox list`");
        }
        let mut n = 0;
        for item in items.into_iter().filter(|i| i.meta.namespace == namespace) {
            n += 1;
            let incomplete = outbox.is_incomplete(&item.id).then(|| {
                let why = item.meta.last_error.clone();
                (why.unwrap_or_else(|| "a write failed".into()), libc::EIO)
            });
            let mut info = StagedInfo::new(item.meta.key, item.meta.name);
            info.last_error = item.meta.last_error;
            info.written = true;
            info.incomplete = incomplete;
            s.insert(item.id, info);
        }
        if n > 0 {
            tracing::warn!(
                "{n} upload(s) pending in the outbox {} (shacachefs outbox list)",
                outbox.dir().display()
            );
        }
        s
    }

    /// The keys that hold staged files.
    pub fn keys(&self) -> Vec<String> {
        self.items.values().map(|i| i.key.clone()).collect()
    }

    fn insert(&mut self, id: String, info: StagedInfo) {
        self.by_name
            .insert((info.key.clone(), info.name.clone()), id.clone());
        self.items.insert(id, info);
    }

    fn remove(&mut self, id: &str) -> Option<StagedInfo> {
        self.forget_sequence(id);
        let info = self.items.remove(id)?;
        let k = (info.key.clone(), info.name.clone());
        if self.by_name.get(&k).map(String::as_str) == Some(id) {
            self.by_name.remove(&k);
        }
        Some(info)
    }
}

impl Staging {
    /// The file is no longer known to be written in order from its start: no running
    /// digest, no early upload.
    fn forget_sequence(&mut self, id: &str) {
        self.seq.0.remove(id);
        if let Some(e) = self.early.remove(id) {
            e.growing.abandon();
            // Also when the HTTP stack is not polling the body (connecting, a full
            // socket): the task and its descriptor on the staged file end now.
            e.task.abort();
        }
    }

    /// Gives staged item `id` a new name (its data, running digest and early upload
    /// stay: `rsync` renames its temporary file once written).
    fn rename_item(&mut self, id: &str, name: &str) -> Result<(), FsError> {
        let info = self.items.get_mut(id).ok_or(FsError::NotFound)?;
        let old = (info.key.clone(), info.name.clone());
        info.name = name.to_string();
        let new = (info.key.clone(), name.to_string());
        if self.by_name.get(&old).map(String::as_str) == Some(id) {
            self.by_name.remove(&old);
        }
        self.by_name.insert(new, id.to_string());
        Ok(())
    }

    /// The file starts again from empty (created, or truncated to 0).
    fn restart_sequence(&mut self, id: &str) {
        self.forget_sequence(id);
        self.seq.0.insert(id.to_string(), StreamHasher::default());
    }
}

/// An open staged file.
pub struct StagedHandle {
    pub id: String,
    pub key: String,
    pub name: String,
    pub file: File,
    /// The thread group that opened it: only its flushes publish (children that
    /// inherited the descriptor close it too). `None` when it could not be known.
    pub opener: Option<u32>,
    /// Held while open: `outbox retry` from another process leaves the item alone.
    writer: Option<WriterLock>,
    /// Something was written through this handle: its last release may publish.
    wrote: bool,
}

/// Reads from a staged file.
pub fn read_staged(file: &File, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
    let mut buf = vec![0u8; size as usize];
    let got = super::read_full_at(file, &mut buf, offset)?;
    buf.truncate(got);
    Ok(buf)
}

fn publish_errno(e: PublishError) -> FsError {
    match e {
        PublishError::Remote(r) => FsError::Remote(r),
        PublishError::Io(io) => FsError::Io(io),
        PublishError::Busy => FsError::Busy("being published by another process"),
        PublishError::Gone(_) | PublishError::Incomplete(_) => {
            FsError::Io(std::io::Error::other(e.to_string()))
        }
    }
}

/// Counts a write-side task (a flush's or release's publish) from the moment the FUSE
/// request arrives until it ends, so that unmounting waits for it.
pub struct Busy(Arc<Core>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Core {
    /// Marks a write-side task in flight (taken on the session thread, before the
    /// task is spawned, so that none is missed); see [`Core::settle`].
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// After the session ended (unmount, SIGTERM): waits, at most `limit`, for the
    /// publishes in flight and the releases queued. What is left stays pending in the
    /// outbox, reported at the next mount. Returns how many were still running.
    pub async fn settle(&self, limit: std::time::Duration) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        let mut said = false;
        loop {
            let n = self.busy.load(Ordering::Acquire);
            if n == 0 || tokio::time::Instant::now() >= deadline {
                if n > 0 {
                    tracing::warn!(
                        "{n} publish(es) still running after {limit:?}: left pending in the outbox"
                    );
                }
                return n;
            }
            if !said {
                tracing::info!("waiting for {n} publish(es) in flight before exiting");
                said = true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Set by the FUSE adapter once the session exists.
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidator.set(f);
    }

    fn writable_outbox(&self) -> Result<&Outbox, FsError> {
        match &self.outbox {
            Some(o) if self.opts.writable => Ok(o),
            _ => Err(FsError::ReadOnly),
        }
    }

    pub(super) fn staged_in(&self, key: &str) -> Vec<(String, String)> {
        let st = lock(&self.staging);
        let outbox = self.outbox.as_ref();
        let mut v: Vec<(String, String)> = st
            .by_name
            .iter()
            .filter(|((k, _), _)| k == key)
            // `outbox retry` or `drop` from another process may have taken it.
            .filter(|(_, id)| outbox.is_some_and(|o| o.data_path(id).exists()))
            // Shown escaped like entry labels: never `/`, NUL, `.`, `..` or reserved.
            .map(|((_, n), id)| (crate::naming::escape(n, KEY_RESERVED), id.clone()))
            .collect();
        v.sort();
        v
    }

    /// The staged item shown under a (displayed, possibly escaped) name.
    pub(super) fn staged_id(&self, key: &str, name: &str) -> Option<String> {
        let file_name = unescape(name, KEY_RESERVED).unwrap_or_else(|| name.to_string());
        lock(&self.staging)
            .by_name
            .get(&(key.to_string(), file_name))
            .cloned()
    }

    pub(super) fn staged_error(&self, id: &str) -> Option<String> {
        lock(&self.staging)
            .items
            .get(id)
            .and_then(|i| i.last_error.clone())
    }

    pub(super) fn staged_attr(&self, id: &str) -> Result<Attr, FsError> {
        let ino = self.ino(&Node::Staged(id.to_string()));
        // The kernel may still ask about a staged file's inode after it was published
        // (it forgets the name asynchronously): answer for the published entry.
        if let Some((_, _, _, len)) = self.published_as(id) {
            return Ok(self.file_attr(ino, len, SystemTime::now()));
        }
        let outbox = self.outbox.as_ref().ok_or(FsError::NotFound)?;
        let md = std::fs::metadata(outbox.data_path(id)).map_err(|_| FsError::NotFound)?;
        Ok(Attr {
            perm: 0o644,
            ..self.file_attr(
                ino,
                md.len(),
                md.modified().unwrap_or_else(|_| SystemTime::now()),
            )
        })
    }

    /// What a staged item became when this mount published it: (key, name, sha, size).
    pub(super) fn published_as(
        &self,
        id: &str,
    ) -> Option<(String, String, crate::digest::Sha512, u64)> {
        lock(&self.staging).published.get(id).cloned()
    }

    /// The published entry a staged inode now stands for, as an entry node.
    pub(super) fn published_node(&self, id: &str) -> Option<Node> {
        self.published_as(id)
            .map(|(key, name, sha, _)| Node::Entry { key, name, sha })
    }

    /// Forgets a staged item whose data another process took (`outbox retry`/`drop`).
    pub(super) fn forget_stale(&self, id: &str) {
        let gone = self
            .outbox
            .as_ref()
            .is_none_or(|o| !o.data_path(id).exists());
        if gone {
            lock(&self.staging).remove(id);
        }
    }

    /// Opens staged item `id` (emptied first with `truncate`, which waits for a publish
    /// in flight: a publish works on frozen bytes).
    pub(super) async fn open_staged(
        &self,
        id: &str,
        truncate: bool,
        opener: Option<u32>,
    ) -> Result<Handle, FsError> {
        let outbox = self.outbox.as_ref().ok_or(FsError::NotFound)?;
        let info = lock(&self.staging)
            .items
            .get(id)
            .cloned()
            .ok_or(FsError::NotFound)?;
        let _frozen = if truncate {
            Some(info.freeze.clone().read_owned().await)
        } else {
            None
        };
        if !lock(&self.staging).items.contains_key(id) {
            // Published while this open waited: the published entry is immutable.
            return Err(FsError::NotPermitted("published entries are immutable"));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(self.opts.writable)
            .open(outbox.data_path(id))?;
        if truncate {
            file.set_len(0)?;
            self.mark_dirty(id);
            lock(&self.staging).restart_sequence(id);
            self.clear_incomplete(id);
        }
        self.staged_handle(id.to_string(), info.key, info.name, file, opener)
    }

    /// A handle on staged item `id`, holding the item's writer lock when writable.
    fn staged_handle(
        &self,
        id: String,
        key: String,
        name: String,
        file: File,
        opener: Option<u32>,
    ) -> Result<Handle, FsError> {
        let writer = self.writer_lock(&id)?;
        Ok(Handle::Staged(Mutex::new(StagedHandle {
            id,
            key,
            name,
            file,
            opener,
            writer,
            wrote: false,
        })))
    }

    fn writer_lock(&self, id: &str) -> Result<Option<WriterLock>, FsError> {
        match &self.outbox {
            Some(o) if self.opts.writable => match o.writer_lock(id) {
                Ok(l) => Ok(Some(l)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    Err(FsError::Busy("being published by another process"))
                }
                Err(e) => Err(e.into()),
            },
            _ => Ok(None),
        }
    }

    /// A write into staged item `id` failed: the staged data is not the file any more.
    fn mark_incomplete(&self, id: &str, key: &str, name: &str, offset: u64, e: &FsError) {
        let why = format!("a write at offset {offset} failed: {e}");
        tracing::error!("key {key}: {name}: {why}; it will not be published until written again");
        {
            let mut st = lock(&self.staging);
            st.forget_sequence(id);
            if let Some(i) = st.items.get_mut(id) {
                i.incomplete = Some((why.clone(), e.errno()));
                i.last_error = Some(why.clone());
            }
        }
        if let Some(outbox) = &self.outbox {
            if let Err(err) = outbox.set_incomplete(id, Some(&why)) {
                // Without the mark on disk, another process (or this one after a
                // restart) could publish the truncated data: the item leaves the disk.
                // The mark in memory stays, so that every close still fails; `rm`
                // forgets the name.
                tracing::error!("outbox item {id}: cannot mark it incomplete ({err}); removing it");
                let _ = outbox.remove(id);
            }
        }
    }

    /// Staged item `id` is empty again: whatever failed before no longer matters. The
    /// mark on disk goes first; the one in memory only once that worked.
    fn clear_incomplete(&self, id: &str) {
        if let Some(outbox) = &self.outbox {
            if let Err(e) = outbox.set_incomplete(id, None) {
                tracing::warn!("outbox item {id}: cannot clear its incomplete mark: {e}");
                return;
            }
        }
        if let Some(i) = lock(&self.staging).items.get_mut(id) {
            i.incomplete = None;
        }
    }

    fn mark_dirty(&self, id: &str) {
        if let Some(i) = lock(&self.staging).items.get_mut(id) {
            i.dirty = true;
            i.written = true;
            i.failed = false;
        }
    }

    /// The freeze lock of a staged item, if it is staged.
    fn freeze_of(&self, id: &str) -> Option<Arc<tokio::sync::RwLock<()>>> {
        lock(&self.staging).items.get(id).map(|i| i.freeze.clone())
    }

    /// A new staged item for `key`/`name`, replacing any staged one of that name (once
    /// a publish of that one is over: it works on frozen bytes). One that a handle still
    /// has open is not dropped: it only loses the name, and its handles' close or last
    /// release publishes what was written into it (acknowledged writes are never lost).
    async fn stage(&self, key: &str, name: &str) -> Result<(String, File), FsError> {
        let outbox = self.writable_outbox()?;
        let old = self.staged_id(key, name);
        let _frozen = match old.as_deref().and_then(|o| self.freeze_of(o)) {
            Some(f) => Some(f.read_owned().await),
            None => None,
        };
        let (item, file) = outbox.create(Outbox::new_meta(
            key,
            name,
            &self.opts.namespace,
            &self.opts.extra_meta,
        ))?;
        // Asked before the staging lock: `is_open` locks handles.
        let old = old.filter(|o| !self.is_open(o));
        let mut st = lock(&self.staging);
        if let Some(old) = old.filter(|o| st.items.contains_key(o)) {
            st.remove(&old);
            let _ = outbox.remove(&old);
        }
        st.insert(
            item.id.clone(),
            StagedInfo::new(key.to_string(), name.to_string()),
        );
        st.restart_sequence(&item.id);
        Ok((item.id, file))
    }

    fn key_of_dir(&self, parent: u64) -> Result<String, FsError> {
        match self.node(parent)? {
            Node::Key(k) => Ok(k),
            Node::Root | Node::ShaDir => Err(FsError::NotPermitted(
                "files can only be created inside a key directory",
            )),
            _ => Err(FsError::NotDir),
        }
    }

    /// `create(parent, name)`: a new staged file, open for writing.
    pub async fn create(
        self: &Arc<Self>,
        parent: u64,
        name: &str,
        opener: Option<u32>,
    ) -> Result<(Attr, u64, Arc<Handle>), FsError> {
        let key = self.key_of_dir(parent)?;
        self.writable_outbox()?;
        if KEY_RESERVED.contains(&name) {
            return Err(FsError::NotPermitted("reserved name"));
        }
        // A name shown escaped (`a%2Fb`) is written back under what it stands for.
        let file_name = unescape(name, KEY_RESERVED).unwrap_or_else(|| name.to_string());
        let (id, file) = self.stage(&key, &file_name).await?;
        let handle = self.staged_handle(id.clone(), key, file_name, file, opener)?;
        let (fh, h) = self.add_handle(handle);
        Ok((self.staged_attr(&id)?, fh, h))
    }

    /// `open` for writing: staged files as they are (or truncated); a published entry
    /// only with `O_TRUNC`, which starts a new staged version.
    pub async fn open_write(
        self: &Arc<Self>,
        ino: u64,
        truncate: bool,
        opener: Option<u32>,
    ) -> Result<(u64, Arc<Handle>), FsError> {
        self.writable_outbox()?;
        let handle = match self.node(ino)? {
            Node::Staged(id) => match self.published_node(&id) {
                Some(Node::Entry { key, name, .. }) if truncate => {
                    let (id, file) = self.stage(&key, &name).await?;
                    self.staged_handle(id, key, name, file, opener)?
                }
                Some(_) => return Err(FsError::NotPermitted("published entries are immutable")),
                None => self.open_staged(&id, truncate, opener).await?,
            },
            Node::Entry { key, name, .. } => {
                if !truncate {
                    tracing::info!("key {key}: {name}: published entries cannot be modified (open with O_TRUNC to write a new version)");
                    return Err(FsError::NotPermitted("published entries are immutable"));
                }
                let (id, file) = self.stage(&key, &name).await?;
                self.staged_handle(id, key, name, file, opener)?
            }
            Node::Root | Node::ShaDir | Node::Key(_) => return Err(FsError::IsDir),
            _ => return Err(FsError::NotPermitted("read-only file")),
        };
        Ok(self.add_handle(handle))
    }

    /// `write(fh, offset, data)` when it can be done at once (on the FUSE session
    /// thread, from the request's buffer); `None` when it must wait (a publish of the
    /// item is in flight, or the item was published and the handle moves to a new
    /// version): the caller copies the data and calls [`Core::write`].
    pub fn write_now(&self, fh: u64, offset: u64, data: &[u8]) -> Option<Result<u32, FsError>> {
        let handle = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return Some(Err(e)),
        };
        let Handle::Staged(m) = &*handle else {
            return Some(Err(FsError::BadHandle));
        };
        let mut h = lock(m);
        let freeze = self.freeze_of(&h.id)?;
        let _frozen = freeze.try_read().ok()?;
        Some(self.write_into(&mut h, offset, data))
    }

    /// `write(fh, offset, data)`, waiting for a publish in flight (the bytes a publish
    /// hashes never change under it) and moving to a new version after a publish.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let handle = self.handle(fh)?;
        let Handle::Staged(m) = &*handle else {
            return Err(FsError::BadHandle);
        };
        // Each round either writes or moves the handle on (a new version can itself be
        // published meanwhile): bounded all the same.
        for _ in 0..64 {
            let id = lock(m).id.clone();
            let Some(freeze) = self.freeze_of(&id) else {
                self.move_to_successor(m).await?;
                continue;
            };
            let _frozen = freeze.read_owned().await;
            let mut h = lock(m);
            if h.id != id || !lock(&self.staging).items.contains_key(&id) {
                continue;
            }
            return self.write_into(&mut h, offset, data);
        }
        Err(FsError::Busy("the file keeps being published"))
    }

    /// The handle's item was published (or dropped): its later writes go to the item's
    /// successor, a new version made once (a copy of the published bytes) and shared by
    /// every handle that goes on writing. The copy runs off the runtime's threads.
    async fn move_to_successor(&self, m: &Mutex<StagedHandle>) -> Result<(), FsError> {
        let (old, key, name, src) = {
            let h = lock(m);
            (
                h.id.clone(),
                h.key.clone(),
                h.name.clone(),
                h.file.try_clone()?,
            )
        };
        let outbox = self.writable_outbox()?;
        let _one = self.successor_locks.lock(&old).await;
        let existing = {
            let st = lock(&self.staging);
            st.successor
                .get(&old)
                .filter(|s| st.items.contains_key(*s))
                .cloned()
        };
        let (id, file) = match existing {
            Some(id) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(outbox.data_path(&id))?;
                (id, file)
            }
            None => {
                let (id, file) = self.stage(&key, &name).await?;
                let dst = file.try_clone()?;
                let copied = tokio::task::spawn_blocking(move || {
                    let (mut src, mut dst) = (src, dst);
                    std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(0))?;
                    std::io::copy(&mut src, &mut dst)
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
                if let Err(e) = copied {
                    // A copy cut short (a full disk) must not stay as a pending version.
                    lock(&self.staging).remove(&id);
                    let _ = outbox.remove(&id);
                    return Err(e.into());
                }
                let mut st = lock(&self.staging);
                // Not written in order from its start: hashed when published.
                st.forget_sequence(&id);
                st.successor.insert(old.clone(), id.clone());
                drop(st);
                self.mark_dirty(&id);
                (id, file)
            }
        };
        let writer = self.writer_lock(&id)?;
        let mut h = lock(m);
        if h.id == old {
            h.id = id;
            h.file = file;
            h.writer = writer;
        }
        Ok(())
    }

    /// Writes into the handle's item, which the caller checked is staged and not being
    /// published (it holds the item's freeze lock shared).
    fn write_into(&self, h: &mut StagedHandle, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        if let Err(e) = h.file.write_all_at(data, offset) {
            let e = FsError::from(e);
            self.mark_incomplete(&h.id, &h.key, &h.name, offset, &e);
            return Err(e);
        }
        self.mark_dirty(&h.id);
        h.wrote = true;
        let mut st = lock(&self.staging);
        let sequential = st.seq.0.get(&h.id).is_some_and(|s| s.len() == offset);
        if !sequential {
            st.forget_sequence(&h.id);
            return Ok(data.len() as u32);
        }
        let mut len = 0;
        if let Some(s) = st.seq.0.get_mut(&h.id) {
            s.update(bytes::Bytes::copy_from_slice(data));
            len = s.len();
        }
        match st.early.get(&h.id) {
            Some(e) => e.growing.grow(len),
            None if len >= EARLY_UPLOAD_MIN => self.start_early_upload(&mut st, &h.id, len),
            None => {}
        }
        Ok(data.len() as u32)
    }

    /// Starts sending a staged file that is being written in order while the rest is
    /// still to come (the upload then reads the file as it grows).
    fn start_early_upload(&self, st: &mut Staging, id: &str, len: u64) {
        if st.early_off || st.early.contains_key(id) {
            return;
        }
        let (Some(rt), Some(outbox)) = (st.runtime.clone(), self.outbox.as_ref()) else {
            return;
        };
        let file = match File::open(outbox.data_path(id)) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("outbox item {id}: no early upload: {e}");
                return;
            }
        };
        let growing = Arc::new(Growing::default());
        growing.grow(len);
        let remote = self.client.store.clone();
        let g = growing.clone();
        let task = rt.spawn(async move { remote.post_growing(g, file).await });
        self.stats.early_started.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("outbox item {id}: upload started while the file is written");
        st.early
            .insert(id.to_string(), EarlyUpload { growing, task });
    }

    /// Waits for the early upload of `id` (now complete at `len` bytes): `Some(true)`
    /// when it stored the blob `sha`, `Some(false)` when shacache turned out to have it
    /// already (asked at close when bytes were still to send: the rest is not sent),
    /// `None` after any failure (abandoned, refused, stalled, another hash), logged; the
    /// caller then sends the file again.
    async fn finish_early_upload(
        &self,
        early: EarlyUpload,
        sha: &Sha512,
        len: u64,
    ) -> Option<bool> {
        let EarlyUpload { growing, mut task } = early;
        if !growing.finish(len) {
            task.abort();
            return None;
        }
        let sent = growing.sent();
        tracing::debug!("closed at {len} bytes, {sent} already sent: waiting for the upload");
        if sent < len {
            // The hash is known now: a blob shacache already has need not be sent on.
            let probe = self
                .client
                .store
                .probe_blob(sha, self.cache.tmp_dir(), &crate::remote::unbounded)
                .await;
            if let Ok(Probe::Size(_) | Probe::Fetched(_)) = probe {
                task.abort();
                growing.abandon();
                tracing::debug!("shacache already has {}: upload stopped", sha.short(16));
                return Some(false);
            }
        }
        let waited = await_sent(
            &mut task,
            || growing.sent(),
            len,
            self.client.store.limits(),
            |_| {},
        )
        .await;
        let result = match waited {
            Ok(r) => r,
            Err(why) => {
                task.abort();
                let why = match why {
                    SendWait::Stalled(n) => format!("stalled after {n} of {len} bytes"),
                    SendWait::NoAnswer => format!("no answer after all {len} bytes"),
                };
                tracing::info!("upload while writing {why}; sending again");
                return None;
            }
        };
        match result {
            Ok(Ok(theirs)) if theirs == *sha => Some(true),
            Ok(Ok(theirs)) => {
                tracing::warn!(
                    "the server stored the upload as {} where {} was written; sending again",
                    theirs.short(16),
                    sha.short(16)
                );
                None
            }
            Ok(Err(e)) => {
                // A server that answers (rather than a dropped or idle connection, or
                // a passing 5xx or 429) but will not take a body without a length is
                // asked no more.
                let refused = match &e {
                    RemoteError::Status { status, .. } => {
                        (400..500).contains(status) && *status != 408 && *status != 429
                    }
                    RemoteError::Protocol { .. }
                    | RemoteError::NotFound { .. }
                    | RemoteError::Refused { .. } => true,
                    _ => false,
                };
                let mut st = lock(&self.staging);
                if !refused {
                    tracing::info!("upload while writing failed ({e}); sending again");
                } else if !st.early_off {
                    st.early_off = true;
                    tracing::info!(
                        "upload while writing failed ({e}); files are sent when closed from now on"
                    );
                }
                None
            }
            Err(e) => {
                tracing::debug!("early upload task: {e}");
                None
            }
        }
    }

    /// `setattr(size)`: staged files may change size; published ones may not.
    pub async fn truncate(self: &Arc<Self>, ino: u64, size: u64) -> Result<Attr, FsError> {
        match self.node(ino)? {
            Node::Staged(id) if self.published_as(&id).is_some() => {
                Err(FsError::NotPermitted("published entries are immutable"))
            }
            Node::Staged(id) => {
                let outbox = self.writable_outbox()?;
                let freeze = self.freeze_of(&id).ok_or(FsError::NotFound)?;
                let _frozen = freeze.read_owned().await;
                if self.published_as(&id).is_some() {
                    return Err(FsError::NotPermitted("published entries are immutable"));
                }
                OpenOptions::new()
                    .write(true)
                    .open(outbox.data_path(&id))?
                    .set_len(size)?;
                self.mark_dirty(&id);
                // The running digest stays valid only for a size it already covers
                // exactly; emptying the file starts a new one.
                let mut st = lock(&self.staging);
                if size == 0 {
                    st.restart_sequence(&id);
                } else if st.seq.0.get(&id).is_some_and(|h| h.len() != size) {
                    st.forget_sequence(&id);
                }
                drop(st);
                if size == 0 {
                    self.clear_incomplete(&id);
                }
                self.staged_attr(&id)
            }
            Node::Entry { key, name, .. } => {
                tracing::info!("key {key}: {name}: cannot change the size of a published entry");
                Err(FsError::NotPermitted("published entries are immutable"))
            }
            _ => Err(FsError::NotPermitted("cannot change this file's size")),
        }
    }

    /// `flush(fh)` (every `close()`): publishes new data of a staged file when the
    /// flush comes from the process that opened it (`flusher`, its thread group id). A
    /// child that inherited the descriptor closes it too (close-on-exec after `fork`):
    /// its flush publishes nothing, or a half-written file would go out. When either
    /// side is unknown, the flush publishes.
    pub async fn flush(self: &Arc<Self>, fh: u64, flusher: Option<u32>) -> Result<(), FsError> {
        let handle = self.handle(fh)?;
        let Handle::Staged(m) = &*handle else {
            return Ok(());
        };
        // No fsync: staged data survives the daemon's death in the page cache, and an
        // fsync of a large file would cost more than the upload itself.
        let (id, opener) = {
            let h = lock(m);
            (h.id.clone(), h.opener)
        };
        if let (Some(o), Some(f)) = (opener, flusher) {
            if o != f {
                tracing::debug!("outbox item {id}: flush from process {f}, opened by {o}: not published (the opener's close or the last release publishes)");
                return Ok(());
            }
        }
        let (dirty, written, name, incomplete) = match lock(&self.staging).items.get(&id) {
            Some(i) => (i.dirty, i.written, i.name.clone(), i.incomplete.clone()),
            // Published (by this handle's earlier close, or by another's that covered
            // this handle's writes).
            None => return Ok(()),
        };
        // A file a write into which failed: every close says so again.
        if let Some((_, errno)) = incomplete {
            return Err(FsError::Io(std::io::Error::from_raw_os_error(errno)));
        }
        // A new file nobody wrote to yet is published when its last descriptor goes
        // (release): `echo x > f` closes a duplicate descriptor before writing, and that
        // close must not publish an empty entry.
        if !dirty || !written || name.starts_with('.') {
            return Ok(());
        }
        self.publish_staged(&id).await
    }

    /// `release(fh)`: the last descriptor of an open file is gone. What is left to
    /// publish is published here, when no other handle has the item open: a file
    /// created and closed without data (`touch`, `cp` of an empty file), and what
    /// children wrote after the opener closed. No `close()` can report a failure here:
    /// it goes to the log, and the file stays pending in the outbox.
    pub async fn release_handle(self: &Arc<Self>, fh: u64) {
        let handle = lock(&self.handles).remove(&fh);
        let Some(handle) = handle else {
            return;
        };
        let Handle::Staged(m) = &*handle else {
            return;
        };
        let (id, wrote) = {
            let h = lock(m);
            (h.id.clone(), h.wrote)
        };
        // Written through this handle, or created by it and never written (a pending
        // file from an earlier run that was only read is left to the retries).
        let pending = match lock(&self.staging).items.get(&id) {
            Some(i) => {
                i.dirty
                    && (wrote || !i.written)
                    && !i.failed
                    && i.incomplete.is_none()
                    && !i.name.starts_with('.')
            }
            None => false,
        };
        if pending && !self.is_open(&id) {
            let _ = self.publish_staged(&id).await;
        }
        // The writer lock goes with the handle (after the publish: no `outbox retry`
        // takes the item meanwhile).
        drop(handle);
    }

    /// Whether a handle has staged item `id` open.
    fn is_open(&self, id: &str) -> bool {
        lock(&self.handles).values().any(|h| match &**h {
            Handle::Staged(m) => lock(m).id == id,
            _ => false,
        })
    }

    /// Publishes a staged item; on success its bytes move into the cache.
    async fn publish_staged(self: &Arc<Self>, id: &str) -> Result<(), FsError> {
        let outbox = self.writable_outbox()?.clone();
        let Some(info) = lock(&self.staging).items.get(id).cloned() else {
            return Ok(());
        };
        // One publish at a time; then nothing changes the bytes until it is over.
        let _one = info.publishing.clone().lock_owned().await;
        let frozen = info.freeze.clone().write_owned().await;
        // Whoever published before us may have covered everything.
        let info = match lock(&self.staging).items.get(id) {
            Some(i) if i.dirty => i.clone(),
            _ => return Ok(()),
        };
        if let Some((why, errno)) = &info.incomplete {
            tracing::error!(
                "key {}: {}: not published: {why} (the staged file is kept at {}; write it again, or `shacachefs outbox drop {id}`)",
                info.key,
                info.name,
                outbox.data_path(id).display()
            );
            return Err(FsError::Io(std::io::Error::from_raw_os_error(*errno)));
        }
        let (seq, early) = {
            let mut st = lock(&self.staging);
            (st.seq.0.remove(id), st.early.remove(id))
        };
        let known = match seq {
            Some(h) => {
                let len = h.len();
                tokio::task::spawn_blocking(move || h.finish())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|sha| (sha, len))
            }
            None => None,
        };
        let had_early = early.is_some();
        let blob = match (early, &known) {
            (Some(e), Some((sha, len))) => self.finish_early_upload(e, sha, *len).await,
            (Some(e), None) => {
                e.growing.abandon();
                e.task.abort();
                None
            }
            (None, _) => None,
        };
        if had_early {
            let counter = if blob.is_some() {
                &self.stats.early_used
            } else {
                &self.stats.early_resent
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        match publish(&self.client, &outbox, id, known, blob).await {
            Ok(p) => {
                // Before the data moves into the cache: the staged inode's attributes
                // are then answered for the published entry, never "not found".
                lock(&self.staging).published.insert(
                    id.to_string(),
                    (p.key.clone(), p.name.clone(), p.sha, p.len),
                );
                let data = outbox.data_path(id);
                let kept = adopt_hashed(data, p.sha, p.len)
                    .map_err(|e| e.to_string())
                    .and_then(|v| self.cache.insert_blob(v).map_err(|e| e.to_string()));
                if let Err(e) = kept {
                    tracing::warn!(
                        "key {}: {}: published, but not kept in the cache: {e}",
                        p.key,
                        p.name
                    );
                }
                self.cache.record_size(&p.sha, p.len);
                self.cache.add_known_key(&p.key);
                self.stats.published.fetch_add(1, Ordering::Relaxed);
                if p.uploaded {
                    self.stats
                        .bytes_uploaded
                        .fetch_add(p.len, Ordering::Relaxed);
                }
                let _ = outbox.remove(id);
                lock(&self.staging).remove(id);
                // Writers waiting on the freeze now move to a new version.
                drop(frozen);
                // Show the new entry at once (added to the listing in memory), then
                // make the kernel forget what it cached under that name.
                self.insert_published(&p.key, p.entry.clone()).await;
                tracing::info!(
                    "key {}: {} published ({} bytes, sha512 {}{})",
                    p.key,
                    p.name,
                    p.len,
                    p.sha.short(16),
                    if p.uploaded {
                        ""
                    } else {
                        ", blob already in shacache"
                    }
                );
                self.invalidate(&p.key, &p.name);
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(
                    "key {}: {}: upload failed: {msg}; the file is kept in the outbox at {} (shacachefs outbox list / retry)",
                    info.key,
                    info.name,
                    outbox.data_path(id).display()
                );
                if let Some(i) = lock(&self.staging).items.get_mut(id) {
                    i.last_error = Some(msg);
                    i.failed = true;
                }
                Err(publish_errno(e))
            }
        }
    }

    /// Tells the kernel to forget a name (queued: never inside the request that caused
    /// it, since the kernel may hold the directory's lock until we answer).
    fn invalidate(self: &Arc<Self>, key: &str, name: &str) {
        let parent = self.ino(&Node::Key(key.to_string()));
        self.notify(super::Notice::Entry {
            parent,
            name: crate::naming::escape(name, KEY_RESERVED),
        });
    }

    /// `unlink`: drops a pending file; published entries cannot be removed.
    pub async fn unlink(self: &Arc<Self>, parent: u64, name: &str) -> Result<(), FsError> {
        let key = self.key_of_dir(parent)?;
        if let Some(id) = self.staged_id(&key, name) {
            let outbox = self.outbox.as_ref().ok_or(FsError::ReadOnly)?;
            // Not under a publish in flight: it ends first (then the name is published).
            if let Some(f) = self.freeze_of(&id) {
                let _frozen = f.read_owned().await;
            }
            if !lock(&self.staging).items.contains_key(&id) {
                return Err(FsError::NotPermitted("published entries cannot be removed"));
            }
            lock(&self.staging).remove(&id);
            outbox.remove(&id)?;
            tracing::info!("key {key}: {name}: pending upload dropped");
            return Ok(());
        }
        match self.listing(&key).await? {
            Some(l)
                if l.files.contains_key(name) || name == "latest" || name == ".entries.json" =>
            {
                tracing::info!(
                    "key {key}: {name}: shadir has no delete; published entries cannot be removed"
                );
                Err(FsError::NotPermitted("published entries cannot be removed"))
            }
            _ => Err(FsError::NotFound),
        }
    }

    /// `rename`: only a staged file, within its key directory. A dot-name renamed to a
    /// plain name is published, and the rename returns the result.
    pub async fn rename(
        self: &Arc<Self>,
        parent: u64,
        name: &str,
        newparent: u64,
        newname: &str,
    ) -> Result<(), FsError> {
        let key = self.key_of_dir(parent)?;
        let newkey = self.key_of_dir(newparent)?;
        let outbox = self.writable_outbox()?.clone();
        let Some(id) = self.staged_id(&key, name) else {
            tracing::info!("key {key}: {name}: published entries cannot be renamed");
            return Err(FsError::NotPermitted("published entries cannot be renamed"));
        };
        if newkey != key {
            return Err(FsError::NotPermitted("files cannot move between keys"));
        }
        if KEY_RESERVED.contains(&newname) {
            return Err(FsError::NotPermitted("reserved name"));
        }
        let file_name = unescape(newname, KEY_RESERVED).unwrap_or_else(|| newname.to_string());
        // Neither the renamed file nor one it replaces changes under a publish.
        let freeze = self.freeze_of(&id).ok_or(FsError::NotFound)?;
        let frozen = freeze.read_owned().await;
        let over = self
            .staged_id(&key, &file_name)
            .filter(|o| *o != id)
            .and_then(|o| self.freeze_of(&o));
        let frozen_over = match over {
            Some(f) => Some(f.read_owned().await),
            None => None,
        };
        if !lock(&self.staging).items.contains_key(&id) {
            return Err(FsError::NotPermitted("published entries cannot be renamed"));
        }
        {
            let mut st = lock(&self.staging);
            if let Some(old) = st.by_name.get(&(key.clone(), file_name.clone())).cloned() {
                if old != id {
                    st.remove(&old);
                    let _ = outbox.remove(&old);
                }
            }
            st.rename_item(&id, &file_name)?;
        }
        let mut item = outbox.get(&id).ok_or(FsError::NotFound)?;
        item.meta.name = file_name.clone();
        item.meta.entry = None;
        item.meta.sha512 = None;
        outbox.save(&item)?;
        drop((frozen, frozen_over));
        if file_name.starts_with('.') {
            return Ok(());
        }
        self.mark_dirty(&id);
        self.publish_staged(&id).await
    }

    /// Publishes every pending item that no handle has open (`--retry-uploads`).
    /// Returns (published, failed).
    pub async fn retry_pending(self: &Arc<Self>) -> (usize, usize) {
        let open: Vec<String> = lock(&self.handles)
            .values()
            .filter_map(|h| match &**h {
                Handle::Staged(m) => Some(lock(m).id.clone()),
                _ => None,
            })
            .collect();
        let ids: Vec<String> = lock(&self.staging)
            .items
            .iter()
            .filter(|(id, i)| i.dirty && !i.name.starts_with('.') && !open.contains(id))
            .map(|(id, _)| id.clone())
            .collect();
        let (mut ok, mut failed) = (0, 0);
        for id in ids {
            // An item another process (a second mount) has open for writing is left
            // alone; the claim keeps it from being opened for writing meanwhile.
            let claim = match self.outbox.as_ref().map(|o| o.claim(&id)) {
                Some(Ok(None)) => {
                    tracing::info!(
                        "outbox item {id}: open for writing by another process: left alone"
                    );
                    continue;
                }
                Some(Ok(Some(c))) => Some(c),
                Some(Err(e)) => {
                    tracing::debug!("outbox item {id}: {e}");
                    None
                }
                None => None,
            };
            match self.publish_staged(&id).await {
                Ok(()) => ok += 1,
                Err(_) => failed += 1,
            }
            drop(claim);
        }
        (ok, failed)
    }

    /// Number of staged items (for `status`).
    pub fn pending_count(&self) -> usize {
        lock(&self.staging).items.len()
    }
}

impl Attr {
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }
}
