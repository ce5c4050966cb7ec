//! The FUSE adapter: implements `fuser::Filesystem` by handing each request to the
//! filesystem core on the tokio runtime and translating the result into a reply. It
//! decides nothing: errors become errnos through `FsError::errno`, the one table.
//!
//! Requests that may wait (on the network, a lock, an upload) are answered from tasks,
//! so a slow download never blocks other requests. Those answered from memory and the
//! local cache alone (`getattr` with a fresh listing, `open` of a cached blob, `release`
//! of a read handle, `write` into a staged file) are answered on the session thread:
//! a task's round trip would cost more than the work.

use crate::fs::{Attr, Core, FsError, Handle as OpenHandle, Invalidator, Kind, Notice};
use fuser::BackingId;
use fuser::{
    consts, FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::runtime::Handle;

/// `FOPEN_NOFLUSH` (fuser 0.16 has no name for it): closing a read-only blob needs no
/// FLUSH round trip.
const FOPEN_NOFLUSH: u32 = 1 << 5;
/// Blobs never change: keep their page cache across opens, and skip the flush. (With
/// passthrough, `FOPEN_KEEP_CACHE` made reads fail with EIO, and the backing file has
/// the page cache anyway: only `FOPEN_NOFLUSH` is given there.)
// Observed on Linux 6.18: a passthrough open with FOPEN_KEEP_CACHE fails reads with EIO.
const READ_FLAGS: u32 = consts::FOPEN_KEEP_CACHE | FOPEN_NOFLUSH;

/// The adapter.
pub struct FuseFs {
    core: Arc<Core>,
    rt: Handle,
    /// Passthrough wanted (`--passthrough auto`) and granted by the kernel.
    passthrough: Arc<AtomicBool>,
    want_passthrough: bool,
    /// Backing files registered for passthrough, one per inode (the kernel attaches a
    /// single backing file to an inode: a second, different one fails the open with
    /// EIO), shared by that inode's open handles and released with the last of them
    /// (dropping one early makes the kernel fail reads with EIO).
    backing: Arc<Mutex<Backing>>,
    /// What the kernel was shown of each file inode: see [`Shown`].
    shown: Arc<Mutex<Shown>>,
    /// Directory listings by directory handle, taken at `opendir`: `readdir` (called
    /// once per few KiB of names) serves them by offset, so a big key costs one listing
    /// per `ls`, and offsets stay stable across a refresh.
    dirs: Arc<Mutex<HashMap<u64, Arc<Vec<crate::fs::DirEntry>>>>>,
    next_dir: Arc<std::sync::atomic::AtomicU64>,
}

/// Which file an inode was last served from (`served`: device, inode number and birth
/// time of the cache file, so a blob the cache replaced or fetched again is noticed at
/// the next open), and the size last given to the kernel in attributes (`sizes`).
#[derive(Default)]
struct Shown {
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
enum Freshness {
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

/// Passthrough backing ids by inode, with the handles using each.
#[derive(Default)]
struct Backing {
    by_ino: HashMap<u64, (BackingId, usize, Option<FileId>)>,
    ino_of_fh: HashMap<u64, u64>,
}

impl Backing {
    fn release(&mut self, fh: u64) {
        let Some(ino) = self.ino_of_fh.remove(&fh) else {
            return;
        };
        if let Some((_, users, _)) = self.by_ino.get_mut(&ino) {
            *users -= 1;
            if *users == 0 {
                self.by_ino.remove(&ino);
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

impl FuseFs {
    pub fn new(core: Arc<Core>, rt: Handle, want_passthrough: bool) -> Self {
        FuseFs {
            core,
            rt,
            passthrough: Arc::new(AtomicBool::new(false)),
            want_passthrough,
            backing: Arc::new(Mutex::new(Backing::default())),
            shown: Arc::new(Mutex::new(Shown::default())),
            dirs: Arc::default(),
            next_dir: Arc::new(std::sync::atomic::AtomicU64::new(1)),
        }
    }

    /// Records the size an attribute reply gives the kernel.
    fn told(&self, a: &FileAttr) {
        told(&self.shown, a);
    }
}

fn told(shown: &Mutex<Shown>, a: &FileAttr) {
    shown.lock().unwrap_or_else(|p| p.into_inner()).told(a);
}

/// An [`Invalidator`] that hands notices to a thread of its own, which sends them to
/// the kernel: a notice may wait for a lock that a request in flight holds (the
/// directory's, for a name), so it is never sent from a request's task or the session
/// thread. The thread ends when the core (and so the sender) is dropped.
pub fn notice_thread(notifier: fuser::Notifier) -> Invalidator {
    let (tx, rx) = std::sync::mpsc::channel::<Notice>();
    let spawned = std::thread::Builder::new()
        .name("fuse-notices".into())
        .spawn(move || {
            for n in rx {
                let r = match &n {
                    Notice::Entry { parent, name } => {
                        notifier.inval_entry(*parent, OsStr::new(name))
                    }
                    Notice::Inode(ino) => notifier.inval_inode(*ino, 0, 0),
                };
                if let Err(e) = r {
                    // ENOENT: the kernel had already forgotten it.
                    tracing::debug!("notice {n:?}: {e}");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the kernel notice thread: {e}");
    }
    let tx = Mutex::new(tx);
    Box::new(move |n| {
        let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send(n);
    })
}

impl FuseFs {
    /// True when `ino` has a passthrough backing file registered (open for reading).
    fn backing_of(&self, ino: u64) -> bool {
        self.backing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_ino
            .contains_key(&ino)
    }

    fn reply_open(&self, ino: u64, fh: u64, handle: &OpenHandle, reply: ReplyOpen) {
        reply_open(
            &self.core,
            &self.passthrough,
            &self.backing,
            &self.shown,
            ino,
            fh,
            handle,
            reply,
        );
    }
}

/// Answers a read-only open: passthrough to the blob file when the kernel allows it
/// (one backing id per inode, shared by its handles), else served by `read`. Never
/// with a length or content other than the verified blob's: a size the kernel was
/// given that the blob does not have is corrected (attributes invalidated, this open
/// in direct I/O so its reads are not cut or padded at the old size), and an inode
/// whose cache file changed since its last open loses its cached pages (or, when older
/// opens still hold the old file as passthrough backing, is retired: `ESTALE` makes
/// the kernel look the name up again and open the new inode).
#[allow(clippy::too_many_arguments)]
fn reply_open(
    core: &Core,
    passthrough: &AtomicBool,
    backing: &Mutex<Backing>,
    shown: &Mutex<Shown>,
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
    let fresh = shown
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .check(ino, id, size);
    // The size of an inode's blob never changes, so an inode is always served the
    // same way (the kernel refuses to mix passthrough and cached opens of one inode).
    let small = size <= SMALL_BLOB;
    let mut b = backing.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((backing_id, users, served)) = b.by_ino.get_mut(&ino) {
        if id != *served {
            // Older opens hold the old file as this inode's backing, and the kernel
            // takes no other one while they last: this inode is done with.
            drop(b);
            tracing::info!("inode {ino}: its blob was replaced in the cache while open; the name gets a new inode");
            core.retire_ino(ino);
            core.release(fh);
            return reply.error(libc::ESTALE);
        }
        // An inode already served with passthrough stays so, even if passthrough was
        // turned off since (the kernel fails a cached open of it with EIO).
        *users += 1;
        reply.opened_passthrough(fh, FOPEN_NOFLUSH, backing_id);
        b.ino_of_fh.insert(fh, ino);
        return;
    }
    if fresh == Freshness::WrongSize {
        drop(b);
        tracing::info!("inode {ino}: the kernel was given another size than the verified blob's {size} bytes: corrected");
        core.notify(Notice::Inode(ino));
        return reply.opened(fh, consts::FOPEN_DIRECT_IO);
    }
    if passthrough.load(Ordering::Relaxed) && !small {
        {
            match reply.open_backing(file) {
                Ok(backing_id) => {
                    reply.opened_passthrough(fh, FOPEN_NOFLUSH, &backing_id);
                    b.by_ino.insert(ino, (backing_id, 1, id));
                    b.ino_of_fh.insert(fh, ino);
                    return;
                }
                Err(e) => {
                    passthrough.store(false, Ordering::Relaxed);
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

/// The thread group (process) of the thread that sent a request. The kernel gives the
/// calling thread's id (0 from outside the daemon's pid namespace); `/proc` tells its
/// process, while that thread is alive (it is, inside its system call). `None` when it
/// cannot be known: the caller then does what it would do without that knowledge.
fn tgid_of(pid: u32) -> Option<u32> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// [`tgid_of`] for a request, logged once per mount when it cannot be known.
fn caller_process(req: &Request<'_>) -> Option<u32> {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    let tgid = tgid_of(req.pid());
    if tgid.is_none() {
        LOGGED.call_once(|| {
            tracing::warn!(
                "the process behind request pid {} is unknown (another pid namespace?): files are published at every close after a write, children's included",
                req.pid()
            );
        });
    }
    tgid
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

fn to_fuse(a: &Attr) -> FileAttr {
    FileAttr {
        ino: a.ino,
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

fn log_err(op: &str, e: &FsError) -> i32 {
    let errno = e.errno();
    match e {
        FsError::NotFound | FsError::NoAttr | FsError::Range => {}
        _ => tracing::debug!("{op}: {e} (errno {errno})"),
    }
    errno
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config
            .set_max_readahead(1 << 20)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.add_capabilities(consts::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(consts::FUSE_CACHE_SYMLINKS);
        // O_TRUNC arrives with open (else the kernel sends a separate setattr(size=0)).
        let _ = config.add_capabilities(consts::FUSE_ATOMIC_O_TRUNC);
        if self.want_passthrough {
            let granted = config.add_capabilities(consts::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.passthrough.store(granted, Ordering::Relaxed);
            self.core
                .stats
                .passthrough
                .store(granted, Ordering::Relaxed);
            if granted {
                tracing::info!("cached blobs are served with FUSE passthrough");
            } else {
                tracing::info!("FUSE passthrough not offered by this kernel: cached blobs are served with pread and the page cache kept across opens");
            }
        } else {
            tracing::info!("FUSE passthrough disabled: cached blobs are served with pread");
        }
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let core = self.core.clone();
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(libc::ENOENT);
        };
        let shown = self.shown.clone();
        self.rt.spawn(async move {
            match core.lookup(parent, &name).await {
                Ok(a) => {
                    let fa = to_fuse(&a);
                    told(&shown, &fa);
                    reply.entry(&core.ttl(), &fa, 0)
                }
                Err(e) => reply.error(log_err("lookup", &e)),
            }
        });
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        // Most attributes are in memory: answered here, without a task's round trip.
        // (Every read of a writable FUSE mount invalidates the atime, so `cat` asks for
        // the attributes of each file it opens again.)
        if let Some(r) = self.core.getattr_now(ino) {
            return match r {
                Ok(a) => {
                    let fa = to_fuse(&a);
                    self.told(&fa);
                    reply.attr(&self.core.ttl(), &fa)
                }
                Err(e) => reply.error(log_err("getattr", &e)),
            };
        }
        let core = self.core.clone();
        let shown = self.shown.clone();
        self.rt.spawn(async move {
            match core.getattr(ino).await {
                Ok(a) => {
                    let fa = to_fuse(&a);
                    told(&shown, &fa);
                    reply.attr(&core.ttl(), &fa)
                }
                Err(e) => reply.error(log_err("getattr", &e)),
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let core = self.core.clone();
        let shown = self.shown.clone();
        self.rt.spawn(async move {
            // Mode, owner and time changes are accepted and ignored.
            let result = match size {
                Some(size) => core.truncate(ino, size).await,
                None => core.getattr(ino).await,
            };
            match result {
                Ok(a) => {
                    let fa = to_fuse(&a);
                    told(&shown, &fa);
                    reply.attr(&core.ttl(), &fa)
                }
                Err(e) => reply.error(log_err("setattr", &e)),
            }
        });
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let core = self.core.clone();
        self.rt.spawn(async move {
            match core.readlink(ino).await {
                Ok(t) => reply.data(t.as_bytes()),
                Err(e) => reply.error(log_err("readlink", &e)),
            }
        });
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let core = self.core.clone();
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(libc::EINVAL);
        };
        self.rt.spawn(async move {
            match core.mkdir(parent, &name).await {
                Ok(a) => reply.entry(&core.ttl(), &to_fuse(&a), 0),
                Err(e) => reply.error(log_err("mkdir", &e)),
            }
        });
    }

    fn open(&mut self, req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let core = self.core.clone();
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            let opener = caller_process(req);
            let truncate = flags & libc::O_TRUNC != 0;
            // The kernel refuses a non-passthrough open of an inode open with
            // passthrough (and would then release the handle just made, which would
            // publish an empty new version): say so before staging anything.
            if self.backing_of(ino) {
                tracing::info!("open for writing: inode {ino} is open for reading (passthrough)");
                return reply.error(libc::ETXTBSY);
            }
            self.rt.spawn(async move {
                match core.open_write(ino, truncate, opener).await {
                    Ok((fh, _)) => reply.opened(fh, consts::FOPEN_DIRECT_IO),
                    Err(e) => reply.error(log_err("open", &e)),
                }
            });
            return;
        }
        // A cached blob opens here, at once; anything else (a download) in a task.
        if let Some((fh, handle)) = core.open_now(ino) {
            return self.reply_open(ino, fh, &handle, reply);
        }
        let passthrough = self.passthrough.clone();
        let backing = self.backing.clone();
        let shown = self.shown.clone();
        self.rt.spawn(async move {
            let (fh, handle) = match core.open(ino).await {
                Ok(v) => v,
                Err(e) => return reply.error(log_err("open", &e)),
            };
            reply_open(
                &core,
                &passthrough,
                &backing,
                &shown,
                ino,
                fh,
                &handle,
                reply,
            );
        });
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let core = self.core.clone();
        self.rt
            .spawn_blocking(move || match core.read(fh, offset.max(0) as u64, size) {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(log_err("read", &e)),
            });
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.backing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(fh);
        // Read handles are released here; a staged file may still have to publish.
        if !self.core.is_staged_handle(fh) {
            self.core.release(fh);
            return reply.ok();
        }
        let core = self.core.clone();
        let busy = core.busy();
        self.rt.spawn(async move {
            core.release_handle(fh).await;
            reply.ok();
            drop(busy);
        });
    }

    fn flush(
        &mut self,
        req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        let core = self.core.clone();
        let flusher = if core.is_staged_handle(fh) {
            caller_process(req)
        } else {
            None
        };
        let busy = core.busy();
        self.rt.spawn(async move {
            match core.flush(fh, flusher).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(log_err("flush", &e)),
            }
            drop(busy);
        });
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Staged data is synced when published; nothing else is ever dirty.
        reply.ok();
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let core = self.core.clone();
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(libc::EINVAL);
        };
        let opener = caller_process(req);
        let shown = self.shown.clone();
        self.rt.spawn(async move {
            match core.create(parent, &name, opener).await {
                Ok((a, fh, _)) => {
                    let fa = to_fuse(&a);
                    told(&shown, &fa);
                    reply.created(&core.ttl(), &fa, 0, fh, consts::FOPEN_DIRECT_IO)
                }
                Err(e) => reply.error(log_err("create", &e)),
            }
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        // The data is in the session's buffer: written at once when nothing is in the
        // way; a write that must wait (a publish of the file in flight) is copied out
        // and answered from a task. The kernel sends a file's next write only after
        // this one is answered (it holds the inode's lock over a direct-I/O write), so
        // the order stays.
        let offset = offset.max(0) as u64;
        if let Some(r) = self.core.write_now(fh, offset, data) {
            return match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(log_err("write", &e)),
            };
        }
        let core = self.core.clone();
        let data = data.to_vec();
        self.rt.spawn(async move {
            match core.write(fh, offset, &data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(log_err("write", &e)),
            }
        });
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let core = self.core.clone();
        let name = name.to_string_lossy().into_owned();
        self.rt.spawn(async move {
            match core.unlink(parent, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(log_err("unlink", &e)),
            }
        });
    }

    fn rmdir(&mut self, _req: &Request<'_>, _parent: u64, name: &OsStr, reply: ReplyEmpty) {
        tracing::info!("rmdir {name:?}: shadir has no delete");
        reply.error(libc::EPERM);
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        let core = self.core.clone();
        let (name, newname) = (
            name.to_string_lossy().into_owned(),
            newname.to_string_lossy().into_owned(),
        );
        self.rt.spawn(async move {
            match core.rename(parent, &name, newparent, &newname).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(log_err("rename", &e)),
            }
        });
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let core = self.core.clone();
        let dirs = self.dirs.clone();
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.rt.spawn(async move {
            match core.readdir(ino).await {
                Ok(entries) => {
                    dirs.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(fh, Arc::new(entries));
                    reply.opened(fh, 0);
                }
                Err(e) => reply.error(log_err("opendir", &e)),
            }
        });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        reply: ReplyDirectory,
    ) {
        let snapshot = self
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned();
        let fill = move |entries: &[crate::fs::DirEntry], mut reply: ReplyDirectory| {
            for (i, e) in entries.iter().enumerate().skip(offset.max(0) as usize) {
                if reply.add(e.ino, (i + 1) as i64, file_type(e.kind), &e.name) {
                    break;
                }
            }
            reply.ok();
        };
        if let Some(entries) = snapshot {
            return fill(&entries, reply);
        }
        // A handle without a snapshot (none is made for it): listed now.
        let core = self.core.clone();
        self.rt.spawn(async move {
            match core.readdir(ino).await {
                Ok(entries) => fill(&entries, reply),
                Err(e) => {
                    reply.error(log_err("readdir", &e));
                }
            }
        });
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
        reply.ok();
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let (used, limit, count) = self.core.cache().usage();
        let bsize = 4096u64;
        let blocks = limit.max(used) / bsize;
        let free = limit.saturating_sub(used) / bsize;
        reply.statfs(
            blocks,
            free,
            free,
            count as u64,
            u64::MAX / 2,
            bsize as u32,
            255,
            bsize as u32,
        );
    }

    fn getxattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        size: u32,
        reply: ReplyXattr,
    ) {
        // `ls -l` asks every file for security.* and system.* attributes: none exist.
        if !name.as_encoded_bytes().starts_with(b"user.") {
            return reply.error(libc::ENODATA);
        }
        let core = self.core.clone();
        let name = name.to_string_lossy().into_owned();
        self.rt.spawn(async move {
            match core.xattr(ino, &name).await {
                Ok(Some(v)) => xattr_reply(reply, size, &v),
                Ok(None) => reply.error(libc::ENODATA),
                Err(e) => reply.error(log_err("getxattr", &e)),
            }
        });
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let core = self.core.clone();
        self.rt.spawn(async move {
            match core.xattrs(ino).await {
                Ok(a) => xattr_reply(reply, size, &crate::fs::xattr::listing(&a)),
                Err(e) => reply.error(log_err("listxattr", &e)),
            }
        });
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.ok();
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(libc::ERANGE);
    } else {
        reply.data(value);
    }
}

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub read_only: bool,
    pub passthrough: bool,
}

/// Why a mount could not start.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("FUSE is not available: /dev/fuse is missing (load the fuse module or install fuse3)")]
    NoFuse,
    #[error("cannot mount on {path}: {source}{hint}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{0}: mountpoint does not exist or is not a directory")]
    BadMountpoint(PathBuf),
}

/// Mounts and returns the session; the caller runs it (`session.run()`).
pub fn mount(fs: FuseFs, cfg: &MountConfig) -> Result<fuser::Session<FuseFs>, MountError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::NoFuse);
    }
    if !cfg.mountpoint.is_dir() {
        return Err(MountError::BadMountpoint(cfg.mountpoint.clone()));
    }
    let mut options = vec![
        MountOption::FSName("shacachefs".into()),
        // As a kernel option, so that /proc/mounts says `fuse.shacachefs` when root
        // mounts directly (fuser gives `Subtype` only to fusermount).
        MountOption::CUSTOM("subtype=shacachefs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if cfg.allow_other {
        options.push(MountOption::AllowOther);
    }
    if cfg.read_only {
        options.push(MountOption::RO);
    }
    fuser::Session::new(fs, &cfg.mountpoint, &options).map_err(|source| {
        let hint = match source.raw_os_error() {
            Some(libc::EBUSY) => " (mountpoint busy: already mounted?)",
            Some(libc::EPERM) | Some(libc::EACCES) => {
                " (permission denied: run as root, or install fuse3 for fusermount3)"
            }
            _ => "",
        };
        MountError::Mount {
            path: cfg.mountpoint.clone(),
            source,
            hint,
        }
    })
}

/// Kernel TTL used when nothing better is known.
pub const DEFAULT_TTL: Duration = Duration::from_secs(1);
