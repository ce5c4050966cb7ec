//! How a read-only open of a blob is answered: FUSE passthrough to the cache file
//! (one backing id per inode, shared by its handles and counted), the kernel's page
//! cache kept across opens, or direct I/O; and what the kernel was shown of each inode
//! (the size in attributes, the cache file served), so that it never serves a length
//! or bytes other than the verified blob's.

use crate::fs::{Core, FsError, Handle as OpenHandle, Notice};
use fuser::{consts, BackingId, FileAttr, FileType, ReplyOpen};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// `FOPEN_NOFLUSH` (fuser 0.16 has no name for it): closing a read-only blob needs no
/// FLUSH round trip.
const FOPEN_NOFLUSH: u32 = 1 << 5;
/// Blobs never change: keep their page cache across opens, and skip the flush. (With
/// passthrough, `FOPEN_KEEP_CACHE` made reads fail with EIO, and the backing file has
/// the page cache anyway: only `FOPEN_NOFLUSH` is given there.)
// Observed on Linux 6.18: a passthrough open with FOPEN_KEEP_CACHE fails reads with EIO.
const READ_FLAGS: u32 = consts::FOPEN_KEEP_CACHE | FOPEN_NOFLUSH;

/// The adapter's view of what the kernel holds, shared by the session thread and the
/// request tasks.
#[derive(Default)]
pub(super) struct Served {
    /// Passthrough wanted (`--passthrough auto`) and granted by the kernel.
    pub(super) passthrough: AtomicBool,
    /// Backing files registered for passthrough, one per inode (the kernel attaches a
    /// single backing file to an inode: a second, different one fails the open with
    /// EIO), shared by that inode's open handles and released with the last of them
    /// (dropping one early makes the kernel fail reads with EIO).
    pub(super) backing: Mutex<Backing>,
    /// What the kernel was shown of each file inode: see [`Shown`].
    pub(super) shown: Mutex<Shown>,
}

impl Served {
    /// Records the size an attribute reply gives the kernel.
    pub(super) fn told(&self, a: &FileAttr) {
        lock(&self.shown).told(a);
    }

    /// True when `ino` has a passthrough backing file registered (open for reading).
    pub(super) fn has_backing(&self, ino: u64) -> bool {
        lock(&self.backing).ids.contains_key(&ino)
    }

    /// A handle is gone: its inode's backing id goes with the last of its users.
    pub(super) fn release(&self, fh: u64) {
        lock(&self.backing).release(fh);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Which file an inode was last served from (`served`: device, inode number and birth
/// time of the cache file, so a blob the cache replaced or fetched again is noticed at
/// the next open), and the size last given to the kernel in attributes (`sizes`).
#[derive(Default)]
pub(super) struct Shown {
    served: HashMap<u64, FileId>,
    sizes: HashMap<u64, u64>,
}

/// A cache file's identity.
type FileId = (u64, u64, Option<std::time::SystemTime>);

fn file_id(file: &std::fs::File) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    let md = file.metadata().ok()?;
    Some((md.dev(), md.ino(), md.created().ok()))
}

/// How a blob open must be answered, given what the kernel holds of its inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Freshness {
    /// Same file as before, size as the kernel knows it.
    Same,
    /// Another cache file than the last open of this inode (replaced, repaired): the
    /// kernel's cached pages of the inode must go.
    NewFile,
    /// The kernel was given another size (a probe's hint) than the verified blob has:
    /// its `i_size` would cut or pad reads.
    WrongSize,
}

impl Shown {
    /// Records an attribute reply's size for a regular file.
    fn told(&mut self, a: &FileAttr) {
        if a.kind == FileType::RegularFile {
            self.sizes.insert(a.ino, a.size);
        }
    }

    fn check(&mut self, ino: u64, id: Option<FileId>, size: u64) -> Freshness {
        let prev = match id {
            Some(id) => self.served.insert(ino, id),
            None => None,
        };
        if self.sizes.get(&ino).is_some_and(|told| *told != size) {
            Freshness::WrongSize
        } else if prev.is_some() && prev != id {
            Freshness::NewFile
        } else {
            Freshness::Same
        }
    }
}

/// Passthrough backing ids by inode, and how many handles use each.
#[derive(Default)]
pub(super) struct Backing {
    ids: HashMap<u64, (BackingId, Option<FileId>)>,
    users: HashMap<u64, usize>,
    ino_of_fh: HashMap<u64, u64>,
}

impl Backing {
    /// Handle `fh` uses its inode's backing id.
    fn attach(&mut self, ino: u64, fh: u64) {
        if self.ino_of_fh.insert(fh, ino).is_none() {
            *self.users.entry(ino).or_default() += 1;
        }
    }

    /// Handle `fh` is gone; its inode's backing id goes with its last user.
    fn release(&mut self, fh: u64) {
        let Some(ino) = self.ino_of_fh.remove(&fh) else {
            return;
        };
        if let Some(users) = self.users.get_mut(&ino) {
            *users -= 1;
            if *users == 0 {
                self.users.remove(&ino);
                self.ids.remove(&ino);
            }
        }
    }
}

/// Blobs up to this size are served through the kernel's page cache of the FUSE file
/// (`FOPEN_KEEP_CACHE`), larger ones with passthrough. For a small file, a read
/// through the page cache costs no request once cached, where each passthrough read
/// makes the kernel forget the atime, and so the next `fstat` (every `cat`) asks the
/// daemon for the attributes again: a round trip that costs more than the read. Past
/// a megabyte, passthrough's direct reads of the cached blob win.
const SMALL_BLOB: u64 = 1 << 20;

/// Answers a read-only open: passthrough to the blob file when the kernel allows it
/// (one backing id per inode, shared by its handles), else served by `read`. Never
/// with a length or content other than the verified blob's: a size the kernel was
/// given that the blob does not have is corrected (attributes invalidated, this open
/// in direct I/O so its reads are not cut or padded at the old size), and an inode
/// whose cache file changed since its last open loses its cached pages (or, when older
/// opens still hold the old file as passthrough backing, is retired: `ESTALE` makes
/// the kernel look the name up again and open the new inode).
pub(super) fn reply_open(
    core: &Core,
    served: &Served,
    ino: u64,
    fh: u64,
    handle: &OpenHandle,
    reply: ReplyOpen,
) {
    if handle.direct_io() {
        return reply.opened(fh, consts::FOPEN_DIRECT_IO);
    }
    let (Some(file), Some(size)) = (handle.backing_file(), handle.blob_size()) else {
        return reply.opened(fh, consts::FOPEN_DIRECT_IO);
    };
    let id = file_id(file);
    let fresh = lock(&served.shown).check(ino, id, size);
    // The size of an inode's blob never changes, so an inode is always served the
    // same way (the kernel refuses to mix passthrough and cached opens of one inode).
    let small = size <= SMALL_BLOB;
    let mut b = lock(&served.backing);
    if let Some((backing_id, served)) = b.ids.get(&ino) {
        if id != *served {
            // Older opens hold the old file as this inode's backing, and the kernel
            // takes no other one while they last: this inode is done with.
            drop(b);
            tracing::info!("inode {ino}: its blob was replaced in the cache while open; the name gets a new inode");
            core.retire_ino(ino);
            core.release(fh);
            return reply.error(FsError::Stale.errno());
        }
        // An inode already served with passthrough stays so, even if passthrough was
        // turned off since (the kernel fails a cached open of it with EIO).
        reply.opened_passthrough(fh, FOPEN_NOFLUSH, backing_id);
        b.attach(ino, fh);
        return;
    }
    if fresh == Freshness::WrongSize {
        drop(b);
        tracing::info!("inode {ino}: the kernel was given another size than the verified blob's {size} bytes: corrected");
        core.notify(Notice::Inode(ino));
        return reply.opened(fh, consts::FOPEN_DIRECT_IO);
    }
    if served.passthrough.load(Ordering::Relaxed) && !small {
        {
            match reply.open_backing(file) {
                Ok(backing_id) => {
                    reply.opened_passthrough(fh, FOPEN_NOFLUSH, &backing_id);
                    b.ids.insert(ino, (backing_id, id));
                    b.attach(ino, fh);
                    return;
                }
                Err(e) => {
                    served.passthrough.store(false, Ordering::Relaxed);
                    core.stats.passthrough.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        "FUSE passthrough refused ({e}); serving with pread from now on"
                    );
                }
            }
        }
    }
    drop(b);
    // A file the cache replaced since: the kernel drops the pages it kept of it at an
    // open without FOPEN_KEEP_CACHE.
    let flags = if fresh == Freshness::NewFile {
        FOPEN_NOFLUSH
    } else {
        READ_FLAGS
    };
    reply.opened(fh, flags);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ino: u64, size: u64) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks: 0,
            atime: std::time::UNIX_EPOCH,
            mtime: std::time::UNIX_EPOCH,
            ctime: std::time::UNIX_EPOCH,
            crtime: std::time::UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    #[test]
    fn a_size_told_that_the_blob_does_not_have_is_noticed() {
        let mut s = Shown::default();
        s.told(&attr(5, 3));
        assert_eq!(s.check(5, Some((1, 2, None)), 5), Freshness::WrongSize);
        s.told(&attr(5, 5));
        assert_eq!(s.check(5, Some((1, 2, None)), 5), Freshness::Same);
    }

    #[test]
    fn another_cache_file_for_an_inode_is_noticed() {
        let mut s = Shown::default();
        assert_eq!(s.check(7, Some((1, 2, None)), 10), Freshness::Same);
        assert_eq!(s.check(7, Some((1, 2, None)), 10), Freshness::Same);
        assert_eq!(s.check(7, Some((1, 3, None)), 10), Freshness::NewFile);
        assert_eq!(s.check(7, Some((1, 3, None)), 10), Freshness::Same);
    }

    #[test]
    fn a_backing_id_lives_until_the_last_handle_of_its_inode() {
        // A backing id needs a kernel; the counting is on the maps alone.
        let mut b = Backing::default();
        b.attach(9, 1);
        b.attach(9, 2);
        b.attach(9, 2);
        assert_eq!(b.users.get(&9), Some(&2), "a handle counts once");
        b.release(1);
        assert_eq!(b.users.get(&9), Some(&1));
        b.release(1);
        assert_eq!(b.users.get(&9), Some(&1), "a handle is released once");
        b.release(2);
        assert!(!b.users.contains_key(&9));
        assert!(b.ino_of_fh.is_empty());
    }
}
