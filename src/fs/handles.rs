//! Open files: a verified blob in the cache (pinned while open), generated content,
//! or a staged file being written; and reads through them.

use super::transfers::Subject;
use super::{lock, read_full_at, write, Core, FsError, Node};
use crate::cache::BlobPin;
use crate::digest::Sha512;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

/// An open file.
pub enum Handle {
    /// A verified blob in the cache, pinned against eviction while open. The handles
    /// of one blob share its descriptor.
    Blob {
        file: Arc<File>,
        size: u64,
        _pin: BlobPin,
    },
    /// Generated content (`.entries.json`), a snapshot taken at open.
    Memory(Arc<Vec<u8>>),
    /// A staged file being written (see `write`).
    Staged(Mutex<write::StagedHandle>),
}

impl Handle {
    /// The cache file, for FUSE passthrough.
    pub fn backing_file(&self) -> Option<&File> {
        match self {
            Handle::Blob { file, .. } => Some(file.as_ref()),
            Handle::Memory(_) | Handle::Staged(_) => None,
        }
    }
    /// The blob's size, for a handle on a blob.
    pub fn blob_size(&self) -> Option<u64> {
        match self {
            Handle::Blob { size, .. } => Some(*size),
            Handle::Memory(_) | Handle::Staged(_) => None,
        }
    }
    /// Generated content and files being written have no stable size: direct I/O.
    pub fn direct_io(&self) -> bool {
        matches!(self, Handle::Memory(_) | Handle::Staged(_))
    }
}

impl Core {
    /// `open(ino)` for reading: the blob is in the cache, verified, when this returns.
    pub async fn open(self: &Arc<Self>, ino: u64) -> Result<(u64, Arc<Handle>), FsError> {
        let handle = match self.node(ino)? {
            Node::Entry { key, name, sha } => {
                self.open_blob(&sha, Subject::entry(&key, &name)).await?
            }
            Node::Blob(sha) => self.open_blob(&sha, Subject::blob(&sha)).await?,
            Node::EntriesJson(key) => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                Handle::Memory(listing.entries_json())
            }
            Node::Staged(id) => match self.published_node(&id) {
                Some(Node::Entry { key, name, sha }) => {
                    self.open_blob(&sha, Subject::entry(&key, &name)).await?
                }
                _ => self.open_staged(&id, false, None).await?,
            },
            Node::Root | Node::ShaDir | Node::Key(_) => return Err(FsError::IsDir),
            Node::Latest(_) => return Err(FsError::Invalid("symbolic link")),
        };
        Ok(self.add_handle(handle))
    }

    /// `open` (read-only) of an entry or `.sha512/` file whose blob is in the cache,
    /// done at once; `None` when it needs more (a download, a staged file, an error to
    /// report), and the caller then uses [`Core::open`].
    pub fn open_cached(&self, ino: u64) -> Option<(u64, Arc<Handle>)> {
        let sha = match self.node(ino).ok()? {
            Node::Entry { sha, .. } | Node::Blob(sha) => sha,
            _ => return None,
        };
        let (file, size, pin) = self.cache.open_blob(&sha).ok()??;
        self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
        Some(self.add_handle(Handle::Blob {
            file,
            size,
            _pin: pin,
        }))
    }

    pub(super) fn add_handle(&self, handle: Handle) -> (u64, Arc<Handle>) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(handle);
        lock(&self.handles).insert(fh, handle.clone());
        (fh, handle)
    }

    pub(super) fn handle(&self, fh: u64) -> Result<Arc<Handle>, FsError> {
        lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    pub(super) async fn open_blob(&self, sha: &Sha512, what: Subject) -> Result<Handle, FsError> {
        let (file, size, pin) = self.cached_or_fetched(sha, what).await?;
        Ok(Handle::Blob {
            file,
            size,
            _pin: pin,
        })
    }

    /// `read(fh, offset, size)`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let handle = lock(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        match &*handle {
            Handle::Blob {
                file, size: total, ..
            } => {
                if offset >= *total {
                    return Ok(Vec::new());
                }
                let want = (size as u64).min(total - offset) as usize;
                let mut buf = vec![0u8; want];
                let got = read_full_at(file, &mut buf, offset)?;
                buf.truncate(got);
                Ok(buf)
            }
            Handle::Memory(data) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                Ok(data[start..end].to_vec())
            }
            Handle::Staged(h) => write::read_staged(&lock(h).file, offset, size),
        }
    }

    /// True when `fh` is a file being written (its release may publish).
    pub fn is_staged_handle(&self, fh: u64) -> bool {
        lock(&self.handles)
            .get(&fh)
            .is_some_and(|h| matches!(**h, Handle::Staged(_)))
    }

    /// `release(fh)`: unpins the blob, forgets the handle.
    pub fn release(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }
}
