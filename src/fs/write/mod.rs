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

mod publish;
mod staging;

pub use publish::Busy;
pub(super) use staging::{read_staged, StagedHandle, Staging};
use staging::{FlushDoes, OpenGuard, StagedInfo, EARLY_UPLOAD_MIN};

use super::{existing, lock, new_name, Attr, Core, FsError, Handle, Invalidator, Kind, Node};
use crate::naming::{unescape, KEY_RESERVED};
use crate::outbox::Outbox;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

impl Core {
    /// Set by the FUSE adapter once the session exists.
    pub fn set_invalidator(&self, f: Invalidator) {
        let _ = self.invalidator.set(f);
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
        self.staged_handle(id.to_string(), info.key, info.name, file, opener, None)
    }

    /// A new staged item for `key`/`name`, replacing any staged one of that name (once
    /// a publish of that one is over: it works on frozen bytes). One that a handle still
    /// has open is not dropped: it only loses the name, and its handles' close or last
    /// release publishes what was written into it (acknowledged writes are never lost).
    ///
    /// `from`: the bytes the item starts with (a successor's copy of the published
    /// version), copied before the item is registered: nothing can open it by its name
    /// while the copy runs, so no write lands under the copy and is overwritten. Such an
    /// item never drops another: if the name was staged anew during the copy, the new
    /// one keeps it and this one goes on unnamed (its handles publish it).
    async fn stage(
        &self,
        key: &str,
        name: &str,
        from: Option<File>,
    ) -> Result<(String, File, OpenGuard), FsError> {
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
        let successor = from.is_some();
        if let Some(src) = from {
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
                let _ = outbox.remove(&item.id);
                return Err(e.into());
            }
        }
        // Dropped only when no handle has it open, decided under the staging lock where
        // handles are counted: an open cannot slip in between.
        let mut st = lock(&self.staging);
        let info = StagedInfo::new(key.to_string(), name.to_string());
        // The caller's handle is counted from the start.
        let open = info.open_guard();
        if successor {
            if !st
                .by_name
                .contains_key(&(key.to_string(), name.to_string()))
            {
                st.insert(item.id.clone(), info);
            } else {
                st.items.insert(item.id.clone(), info);
            }
            // Not written in order from its start: hashed when published.
            st.forget_sequence(&item.id);
        } else {
            if let Some(old) = old.filter(|o| st.items.get(o).is_some_and(|i| i.open_count() == 0))
            {
                st.remove(&old);
                let _ = outbox.remove(&old);
            }
            st.insert(item.id.clone(), info);
            st.restart_sequence(&item.id);
        }
        Ok((item.id, file, open))
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
        name: impl AsRef<OsStr>,
        opener: Option<u32>,
    ) -> Result<(Attr, u64, Arc<Handle>), FsError> {
        let name = new_name(name.as_ref())?;
        let key = self.key_of_dir(parent)?;
        self.writable_outbox()?;
        if KEY_RESERVED.contains(&name) {
            return Err(FsError::NotPermitted("reserved name"));
        }
        // A name shown escaped (`a%2Fb`) is written back under what it stands for.
        let file_name = unescape(name, KEY_RESERVED).unwrap_or_else(|| name.to_string());
        let (id, file, open) = self.stage(&key, &file_name, None).await?;
        let handle = self.staged_handle(id.clone(), key, file_name, file, opener, Some(open))?;
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
                    let (id, file, open) = self.stage(&key, &name, None).await?;
                    self.staged_handle(id, key, name, file, opener, Some(open))?
                }
                Some(_) => return Err(FsError::NotPermitted("published entries are immutable")),
                None => self.open_staged(&id, truncate, opener).await?,
            },
            Node::Entry { key, name, .. } => {
                if !truncate {
                    tracing::info!("key {key}: {name}: published entries cannot be modified (open with O_TRUNC to write a new version)");
                    return Err(FsError::NotPermitted("published entries are immutable"));
                }
                let (id, file, open) = self.stage(&key, &name, None).await?;
                self.staged_handle(id, key, name, file, opener, Some(open))?
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
    pub fn write_unfrozen(
        &self,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Option<Result<u32, FsError>> {
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
        // A whole publish may have run between the two lines above (this thread
        // preempted): its data is then a cached blob, never to be written. Held shared,
        // the freeze keeps a publish out, so an item still staged now stays unpublished
        // until this write is done; one gone goes the slow way, to its new version.
        if !lock(&self.staging).items.contains_key(&h.id) {
            return None;
        }
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
        // Counted on the successor under the staging lock, where it is found.
        let existing = {
            let st = lock(&self.staging);
            st.successor
                .get(&old)
                .and_then(|s| st.items.get(s).map(|i| (s.clone(), i.open_guard())))
        };
        let (id, file, open) = match existing {
            Some((id, open)) => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(outbox.data_path(&id))?;
                (id, file, open)
            }
            None => {
                let (id, file, open) = self.stage(&key, &name, Some(src)).await?;
                lock(&self.staging)
                    .successor
                    .insert(old.clone(), id.clone());
                self.mark_dirty(&id);
                (id, file, open)
            }
        };
        let writer = self.writer_lock(&id)?;
        let mut h = lock(m);
        if h.id == old {
            h.id = id;
            h.file = file;
            h.writer = writer;
            // The old item's count drops with its guard.
            h.open = open;
        }
        Ok(())
    }

    /// Writes into the handle's item, which the caller checked is staged and not being
    /// published (it holds the item's freeze lock shared).
    fn write_into(&self, h: &mut StagedHandle, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        if let Err(e) = h.file.write_all_at(data, offset) {
            return Err(self.mark_incomplete(&h.id, &h.key, &h.name, offset, e.into()));
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
        let does = match lock(&self.staging).items.get(&id) {
            Some(i) => i.on_flush(),
            // Published (by this handle's earlier close, or by another's that covered
            // this handle's writes).
            None => return Ok(()),
        };
        // See `StagedInfo::on_flush`: an incomplete file fails every close; a new file
        // nobody wrote to yet is published by its last release.
        match does {
            FlushDoes::Nothing => Ok(()),
            FlushDoes::Fail(cause) => Err(FsError::Incomplete(cause)),
            FlushDoes::Publish => self.publish_staged(&id).await,
        }
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
        // This handle still counts itself (its guard goes with it, below): another
        // handle open on the item is a count above one.
        let (pending, others) = lock(&self.staging)
            .items
            .get(&id)
            .map_or((false, false), |i| {
                (i.on_last_release(wrote), i.open_count() > 1)
            });
        if pending && !others {
            let _ = self.publish_staged(&id).await;
        }
        // The writer lock goes with the handle (after the publish: no `outbox retry`
        // takes the item meanwhile).
        drop(handle);
    }

    /// `unlink`: drops a pending file; published entries cannot be removed.
    pub async fn unlink(
        self: &Arc<Self>,
        parent: u64,
        name: impl AsRef<OsStr>,
    ) -> Result<(), FsError> {
        let name = existing(name.as_ref())?;
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
        name: impl AsRef<OsStr>,
        newparent: u64,
        newname: impl AsRef<OsStr>,
    ) -> Result<(), FsError> {
        let (name, newname) = (existing(name.as_ref())?, new_name(newname.as_ref())?);
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
}

impl Attr {
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }
}
