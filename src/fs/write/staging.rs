//! The staged files of a mount: each item's [`Phase`] and the rules that follow from
//! it (who publishes, when), its name, its running digest and early upload, and the
//! handles open on it.

use super::super::{lock, Attr, Core, FsError, Handle, Node};
use crate::digest::{Sha512, StreamHasher};
use crate::growing::Growing;
use crate::naming::{unescape, KEY_RESERVED};
use crate::outbox::{Outbox, WriterLock};
use crate::remote::RemoteError;
use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Where a staged file is in its life. Publishing is not a phase of its own: a publish
/// holds the item's `freeze` lock exclusively (its bytes are frozen), and a published
/// item leaves [`Staging`] (recorded in `Staging::published`). So:
///
/// ```text
///   Fresh ──write/truncate──▶ Written ──publish ok──▶ (published: leaves Staging)
///     ╲                        ▲   ╲──publish fails──▶ Failed ──write──▶ Written
///      ╲──publish fails──▶ Failed (nothing written)
///        a write fails ──▶ Incomplete ──emptied (truncate to 0, O_TRUNC)──▶ Written
/// ```
#[derive(Debug, Clone)]
pub enum Phase {
    /// Created, nothing written yet: published only by its last release (`touch`, an
    /// empty `cp`), never by a flush (`echo x > f` closes a duplicate descriptor first).
    Fresh,
    /// Written since created or since its last publish.
    Written,
    /// Its last publish failed and nothing was written since: the last release does
    /// not try again at once (`--retry-uploads` and `outbox retry` do). `written`: it
    /// had data (a flush of its opener tries again).
    Failed { written: bool },
    /// A write into the staged data failed: why, and its errno. Every close reports it
    /// until the file is emptied; it is never published meanwhile.
    Incomplete { why: String, cause: Arc<FsError> },
}

/// What a flush from the opener does with an item.
#[derive(Debug)]
pub enum FlushDoes {
    Nothing,
    Publish,
    /// Fails with this error (an incomplete file).
    Fail(Arc<FsError>),
}

impl Phase {
    /// The phase after a publish failed.
    pub fn failed(&self) -> Phase {
        match self {
            Phase::Fresh => Phase::Failed { written: false },
            Phase::Written => Phase::Failed { written: true },
            other => other.clone(),
        }
    }

    /// Something was written (or the size set): the state after a change.
    pub(super) fn written(&self) -> Phase {
        match self {
            Phase::Incomplete { .. } => self.clone(),
            _ => Phase::Written,
        }
    }
}

/// A staged file's state in this mount.
#[derive(Debug, Clone)]
pub struct StagedInfo {
    pub key: String,
    pub name: String,
    pub last_error: Option<String>,
    /// Where the file is in its life (see [`Phase`]).
    pub phase: Phase,
    /// Frozen bytes: a publish holds this exclusively from the moment it starts hashing
    /// until it ends; everything that changes the staged bytes or size holds it shared.
    pub(super) freeze: Arc<tokio::sync::RwLock<()>>,
    /// One publish of an item at a time; a flush that finds one in flight waits for it.
    pub(super) publishing: Arc<tokio::sync::Mutex<()>>,
    /// Handles open on it (their [`OpenGuard`]s), counted under the staging lock when
    /// made: an item a handle has open is never dropped, only loses its name.
    pub(super) opens: Arc<std::sync::atomic::AtomicUsize>,
}

/// The running digest of a staged file written sequentially from its start (what `cp`
/// does), so that publishing does not read the file again. Any other write pattern
/// drops it, and the file is hashed when published.
#[derive(Default)]
pub(super) struct SeqHashes(pub(super) HashMap<String, StreamHasher>);

/// Uploads started while a staged file is still being written in order (see
/// [`crate::growing`]); `publish_staged` waits for one instead of sending the file again.
pub(super) struct EarlyUpload {
    pub(super) growing: Arc<Growing>,
    pub(super) task: tokio::task::JoinHandle<Result<Sha512, RemoteError>>,
    /// Listed in `status` while it runs (until this is dropped).
    pub(super) transfer: crate::fs::transfers::Transfer,
}

/// Sequential data a staged file needs before its upload starts while it is written:
/// small files are sent at close, in one go.
pub(super) const EARLY_UPLOAD_MIN: u64 = 8 << 20;

/// The staged files of this mount's namespace.
#[derive(Default)]
pub struct Staging {
    pub(super) by_name: HashMap<(String, String), String>,
    pub(super) items: HashMap<String, StagedInfo>,
    pub(super) seq: SeqHashes,
    pub(super) early: HashMap<String, EarlyUpload>,
    /// Where early uploads run (the runtime the mount was created in); none, none.
    pub(super) runtime: Option<tokio::runtime::Handle>,
    /// Set when an early upload failed for another reason than being abandoned (a
    /// server that refuses a body without a length, say): later files are sent at close.
    pub(super) early_off: bool,
    /// Items this mount published: id → (key, name, sha, size).
    pub(super) published: HashMap<String, (String, String, crate::digest::Sha512, u64)>,
    /// A published item → the new version that handles still writing after that
    /// publish share (a copy of the published bytes plus their writes).
    pub(super) successor: HashMap<String, String>,
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
    pub(super) writer: Option<WriterLock>,
    /// Something was written through this handle: its last release may publish.
    pub(super) wrote: bool,
    /// Counts this handle on its item.
    pub(super) open: OpenGuard,
}

/// One handle open on a staged item (see `StagedInfo::opens`); dropped with it.
pub struct OpenGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl StagedInfo {
    /// Counts a new handle on the item (take it under the staging lock).
    pub(super) fn open_guard(&self) -> OpenGuard {
        self.opens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OpenGuard(self.opens.clone())
    }

    /// Handles open on it.
    pub(super) fn open_count(&self) -> usize {
        self.opens.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A dot-name (a temporary file of rsync or an editor): staged, never published
    /// until renamed to a plain name.
    pub fn hidden(&self) -> bool {
        self.name.starts_with('.')
    }

    /// What the opener's flush does (a flush of another process does nothing).
    pub fn on_flush(&self) -> FlushDoes {
        match &self.phase {
            Phase::Incomplete { cause, .. } => FlushDoes::Fail(cause.clone()),
            _ if self.hidden() => FlushDoes::Nothing,
            Phase::Fresh | Phase::Failed { written: false } => FlushDoes::Nothing,
            Phase::Written | Phase::Failed { written: true } => FlushDoes::Publish,
        }
    }

    /// Whether the last release of a handle publishes (`wrote`: something was written
    /// through that handle). A pending file from an earlier run that was only read is
    /// left to the retries; so is one whose publish just failed.
    pub fn on_last_release(&self, wrote: bool) -> bool {
        !self.hidden()
            && match self.phase {
                Phase::Fresh => true,
                Phase::Written => wrote,
                Phase::Failed { .. } | Phase::Incomplete { .. } => false,
            }
    }

    /// Whether `--retry-uploads` and `outbox retry` try it (an incomplete one fails
    /// with its reason, which is logged).
    pub fn on_retry(&self) -> bool {
        !self.hidden()
    }

    pub(super) fn new(key: String, name: String) -> StagedInfo {
        StagedInfo {
            key,
            name,
            last_error: None,
            phase: Phase::Fresh,
            freeze: Arc::default(),
            publishing: Arc::default(),
            opens: Arc::default(),
        }
    }
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
            let mut info = StagedInfo::new(item.meta.key, item.meta.name);
            info.phase = if outbox.is_incomplete(&item.id) {
                // The failed write's errno died with the process that saw it: EIO.
                let why = (item.meta.last_error.clone()).unwrap_or_else(|| "a write failed".into());
                let cause = Arc::new(FsError::Io(std::io::Error::other(why.clone())));
                Phase::Incomplete { why, cause }
            } else {
                Phase::Written
            };
            info.last_error = item.meta.last_error;
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

    pub(super) fn insert(&mut self, id: String, info: StagedInfo) {
        self.by_name
            .insert((info.key.clone(), info.name.clone()), id.clone());
        self.items.insert(id, info);
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<StagedInfo> {
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
    pub(super) fn forget_sequence(&mut self, id: &str) {
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
    pub(super) fn rename_item(&mut self, id: &str, name: &str) -> Result<(), FsError> {
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
    pub(super) fn restart_sequence(&mut self, id: &str) {
        self.forget_sequence(id);
        self.seq.0.insert(id.to_string(), StreamHasher::default());
    }
}

impl Core {
    pub(in crate::fs) fn staged_in(&self, key: &str) -> Vec<(String, String)> {
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
    pub(in crate::fs) fn staged_id(&self, key: &str, name: &str) -> Option<String> {
        let file_name = unescape(name, KEY_RESERVED).unwrap_or_else(|| name.to_string());
        lock(&self.staging)
            .by_name
            .get(&(key.to_string(), file_name))
            .cloned()
    }

    pub(in crate::fs) fn staged_error(&self, id: &str) -> Option<String> {
        lock(&self.staging)
            .items
            .get(id)
            .and_then(|i| i.last_error.clone())
    }

    pub(in crate::fs) fn staged_attr(&self, id: &str) -> Result<Attr, FsError> {
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
    pub(in crate::fs) fn published_as(
        &self,
        id: &str,
    ) -> Option<(String, String, crate::digest::Sha512, u64)> {
        lock(&self.staging).published.get(id).cloned()
    }

    /// The published entry a staged inode now stands for, as an entry node.
    pub(in crate::fs) fn published_node(&self, id: &str) -> Option<Node> {
        self.published_as(id)
            .map(|(key, name, sha, _)| Node::Entry { key, name, sha })
    }

    /// Forgets a staged item whose data another process took (`outbox retry`/`drop`).
    pub(in crate::fs) fn forget_stale(&self, id: &str) {
        let gone = self
            .outbox
            .as_ref()
            .is_none_or(|o| !o.data_path(id).exists());
        if gone {
            lock(&self.staging).remove(id);
        }
    }

    /// A handle on staged item `id`, holding the item's writer lock when writable.
    pub(in crate::fs) fn staged_handle(
        &self,
        id: String,
        key: String,
        name: String,
        file: File,
        opener: Option<u32>,
        open: Option<OpenGuard>,
    ) -> Result<Handle, FsError> {
        let open = match open {
            Some(g) => g,
            None => self.open_guard(&id)?,
        };
        let writer = self.writer_lock(&id)?;
        Ok(Handle::Staged(Mutex::new(StagedHandle {
            id,
            key,
            name,
            file,
            opener,
            writer,
            wrote: false,
            open,
        })))
    }

    /// Counts a new handle on staged item `id`; `Stale` when it was dropped meanwhile
    /// (replaced by a new version: the kernel looks the name up again).
    pub(in crate::fs) fn open_guard(&self, id: &str) -> Result<OpenGuard, FsError> {
        match lock(&self.staging).items.get(id) {
            Some(i) => Ok(i.open_guard()),
            None => Err(FsError::Stale),
        }
    }

    pub(in crate::fs) fn writer_lock(&self, id: &str) -> Result<Option<WriterLock>, FsError> {
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
    /// The error to answer the write with (the same errno).
    pub(in crate::fs) fn mark_incomplete(
        &self,
        id: &str,
        key: &str,
        name: &str,
        offset: u64,
        e: FsError,
    ) -> FsError {
        let why = format!("a write at offset {offset} failed: {e}");
        let cause = Arc::new(e);
        tracing::error!("key {key}: {name}: {why}; it will not be published until written again");
        {
            let mut st = lock(&self.staging);
            st.forget_sequence(id);
            if let Some(i) = st.items.get_mut(id) {
                i.phase = Phase::Incomplete {
                    why: why.clone(),
                    cause: cause.clone(),
                };
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
        FsError::Incomplete(cause)
    }

    /// Staged item `id` is empty again: whatever failed before no longer matters. The
    /// mark on disk goes first; the one in memory only once that worked.
    pub(in crate::fs) fn clear_incomplete(&self, id: &str) {
        if let Some(outbox) = &self.outbox {
            if let Err(e) = outbox.set_incomplete(id, None) {
                tracing::warn!("outbox item {id}: cannot clear its incomplete mark: {e}");
                return;
            }
        }
        if let Some(i) = lock(&self.staging).items.get_mut(id) {
            if matches!(i.phase, Phase::Incomplete { .. }) {
                i.phase = Phase::Written;
            }
        }
    }

    pub(in crate::fs) fn mark_dirty(&self, id: &str) {
        if let Some(i) = lock(&self.staging).items.get_mut(id) {
            i.phase = i.phase.written();
        }
    }

    /// The freeze lock of a staged item, if it is staged.
    pub(in crate::fs) fn freeze_of(&self, id: &str) -> Option<Arc<tokio::sync::RwLock<()>>> {
        lock(&self.staging).items.get(id).map(|i| i.freeze.clone())
    }

    /// Number of staged items (for `status`).
    pub fn pending_count(&self) -> usize {
        lock(&self.staging).items.len()
    }

    pub(in crate::fs) fn writable_outbox(&self) -> Result<&Outbox, FsError> {
        match &self.outbox {
            Some(o) if self.opts.writable => Ok(o),
            _ => Err(FsError::ReadOnly),
        }
    }
}

/// Reads from a staged file.
pub(in crate::fs) fn read_staged(file: &File, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
    let mut buf = vec![0u8; size as usize];
    let got = crate::fs::read_full_at(file, &mut buf, offset)?;
    buf.truncate(got);
    Ok(buf)
}
