//! The FUSE adapter: implements `fuser::Filesystem` by handing each request to the
//! filesystem core and translating the result into a reply. It decides nothing: every
//! errno comes from `FsError::errno`, the one table, and names go to the core as they
//! came (`&OsStr`).
//!
//! Requests that may wait (on the network, a lock, an upload) are answered from tasks
//! ([`FuseFs::spawn`]: one place that spawns, traces and replies), so a slow download
//! never blocks other requests. Those answered from memory and the local cache alone
//! (`getattr` with a fresh listing, `open` of a cached blob, `release` of a read handle,
//! `write` into a staged file) are answered on the session thread: a task's round trip
//! would cost more than the work.
//!
//! Files: `passthrough.rs` (how a blob open is answered, backing ids, what the kernel
//! was shown), `process.rs` (the process behind a request), `session.rs` (mounting,
//! kernel notices).

mod passthrough;
mod process;
mod session;

pub use session::{mount, notice_thread, MountConfig, MountError};

use crate::fs::{Attr, Core, DirEntry, FsError, Kind};
use fuser::{
    consts, FileAttr, FileType, Filesystem, KernelConfig, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request,
};
use passthrough::{reply_open, Served};
use process::caller_process;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::runtime::Handle;
use tracing::Instrument;

/// The adapter.
pub struct FuseFs {
    core: Arc<Core>,
    rt: Handle,
    want_passthrough: bool,
    served: Arc<Served>,
    /// Directory listings by directory handle, taken at `opendir`: `readdir` (called
    /// once per few KiB of names) serves them by offset, so a big key costs one listing
    /// per `ls`, and offsets stay stable across a refresh.
    dirs: Arc<Mutex<HashMap<u64, Arc<DirHandle>>>>,
    next_dir: AtomicU64,
}

/// An open directory: its listing taken at `opendir`, and until when `readdirplus` may
/// wait for sizes still being probed (after that, entries whose size is not in memory
/// go out without attributes the kernel may keep: it looks them up one by one).
struct DirHandle {
    entries: Vec<DirEntry>,
    wait_until: tokio::time::Instant,
}

/// How long the `readdirplus` calls of one directory handle may wait, all together, for
/// sizes being probed: a cold big key's first `ls -l` gets them in a few calls, and a
/// slow or unreachable shacache cannot hold a listing for longer than this.
const READDIRPLUS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// A reply that can carry an errno (every fuser reply type).
trait Fail {
    fn fail(self, errno: i32);
}

macro_rules! fail_for {
    ($($t:ty),*) => {
        $(impl Fail for $t {
            fn fail(self, errno: i32) {
                self.error(errno)
            }
        })*
    };
}
fail_for!(
    ReplyAttr,
    ReplyCreate,
    ReplyData,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyEmpty,
    ReplyEntry,
    ReplyOpen,
    ReplyWrite,
    ReplyXattr
);

/// The errno of an error, logged (at debug: the core logs what matters) unless it is
/// an everyday answer.
fn errno(op: &str, e: &FsError) -> i32 {
    let errno = e.errno();
    match e {
        FsError::NotFound | FsError::NoAttr | FsError::Unsupported | FsError::Range => {}
        _ => tracing::debug!("{op}: {e} (errno {errno})"),
    }
    errno
}

/// Answers `reply` with `r`: `done` on success, the errno otherwise.
fn answer<T, R: Fail>(op: &str, r: Result<T, FsError>, reply: R, done: impl FnOnce(T, R)) {
    match r {
        Ok(v) => done(v, reply),
        Err(e) => reply.fail(errno(op, &e)),
    }
}

impl FuseFs {
    pub fn new(core: Arc<Core>, rt: Handle, want_passthrough: bool) -> Self {
        FuseFs {
            core,
            rt,
            want_passthrough,
            served: Arc::default(),
            dirs: Arc::default(),
            next_dir: AtomicU64::new(1),
        }
    }

    /// Runs `work` on the runtime in a tracing span for the request, then answers.
    fn spawn<T, R>(
        &self,
        op: &'static str,
        ino: u64,
        reply: R,
        work: impl Future<Output = Result<T, FsError>> + Send + 'static,
        done: impl FnOnce(T, R) + Send + 'static,
    ) where
        T: Send + 'static,
        R: Fail + Send + 'static,
    {
        let span = tracing::debug_span!("fuse", op, ino);
        self.rt.spawn(
            async move {
                let r = work.await;
                answer(op, r, reply, done);
            }
            .instrument(span),
        );
    }

    /// The directory handle `fh` (its listing taken at `opendir`).
    fn dir_handle(&self, fh: u64) -> Option<Arc<DirHandle>> {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
    }

    /// An attribute reply, its size recorded (see `passthrough::Shown`).
    fn attr_reply(&self) -> impl FnOnce(Attr, ReplyAttr) + Send + 'static {
        let (served, ttl) = (self.served.clone(), self.core.ttl());
        move |a, reply| {
            let fa = to_fuse(&a);
            served.told(&fa);
            reply.attr(&ttl, &fa)
        }
    }

    /// An entry reply, its size recorded.
    fn entry_reply(&self) -> impl FnOnce(Attr, ReplyEntry) + Send + 'static {
        let (served, ttl) = (self.served.clone(), self.core.ttl());
        move |a, reply| {
            let fa = to_fuse(&a);
            served.told(&fa);
            reply.entry(&ttl, &fa, 0)
        }
    }
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

/// Fills a directory reply from `offset` with a listing.
fn fill(entries: &[DirEntry], offset: i64, mut reply: ReplyDirectory) {
    for (i, e) in entries.iter().enumerate().skip(offset.max(0) as usize) {
        if reply.add(e.ino, (i + 1) as i64, file_type(e.kind), &e.name) {
            break;
        }
    }
    reply.ok();
}

/// The attributes of a directory entry for `readdirplus`, and how long the kernel may
/// keep them: from memory when there, else waited for until `wait_until` (sizes being
/// probed), else attributes without validity (the kernel looks the name up when it
/// needs them, and that lookup reports any error).
async fn plus_attr(
    core: &Arc<Core>,
    e: &DirEntry,
    wait_until: tokio::time::Instant,
    ttl: std::time::Duration,
) -> (Attr, std::time::Duration) {
    if e.name == "." || e.name == ".." {
        return (
            core.unknown_attr(e.ino, Kind::Dir),
            std::time::Duration::ZERO,
        );
    }
    if let Some(Ok(a)) = core.attr_in_memory(e.ino) {
        return (a, ttl);
    }
    if tokio::time::Instant::now() < wait_until {
        if let Ok(Ok(a)) = tokio::time::timeout_at(wait_until, core.getattr(e.ino)).await {
            return (a, ttl);
        }
    }
    (core.unknown_attr(e.ino, e.kind), std::time::Duration::ZERO)
}

fn xattr_reply(size: u32, value: &[u8], reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if (size as usize) < value.len() {
        reply.error(FsError::Range.errno());
    } else {
        reply.data(value);
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config
            .set_max_readahead(1 << 20)
            .or_else(|max| config.set_max_readahead(max));
        let _ = config.add_capabilities(consts::FUSE_PARALLEL_DIROPS);
        let _ = config.add_capabilities(consts::FUSE_CACHE_SYMLINKS);
        // Every directory read carries the entries' attributes (not only the first one,
        // as with READDIRPLUS_AUTO): `ls -l` of a 20,000-entry key then needs a few
        // hundred READDIRPLUS requests instead of 20,000 LOOKUPs after its READDIRs.
        let _ = config.add_capabilities(consts::FUSE_DO_READDIRPLUS);
        // O_TRUNC arrives with open (else the kernel sends a separate setattr(size=0)).
        let _ = config.add_capabilities(consts::FUSE_ATOMIC_O_TRUNC);
        if self.want_passthrough {
            let granted = config.add_capabilities(consts::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            self.served.passthrough.store(granted, Ordering::Relaxed);
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
        // A name of a fresh listing whose size is known: answered here.
        if let Some(r) = self.core.lookup_in_memory(parent, name) {
            return answer("lookup", r, reply, self.entry_reply());
        }
        let (core, name) = (self.core.clone(), name.to_owned());
        let done = self.entry_reply();
        self.spawn(
            "lookup",
            parent,
            reply,
            async move { core.lookup(parent, &name).await },
            done,
        );
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        // Most attributes are in memory: answered here, without a task's round trip.
        // (Every read of a writable FUSE mount invalidates the atime, so `cat` asks for
        // the attributes of each file it opens again.)
        if let Some(r) = self.core.attr_in_memory(ino) {
            return answer("getattr", r, reply, self.attr_reply());
        }
        let core = self.core.clone();
        let done = self.attr_reply();
        self.spawn(
            "getattr",
            ino,
            reply,
            async move { core.getattr(ino).await },
            done,
        );
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
        let done = self.attr_reply();
        // Mode, owner and time changes are accepted and ignored.
        let work = async move {
            match size {
                Some(size) => core.truncate(ino, size).await,
                None => core.getattr(ino).await,
            }
        };
        self.spawn("setattr", ino, reply, work, done);
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let core = self.core.clone();
        self.spawn(
            "readlink",
            ino,
            reply,
            async move { core.readlink(ino).await },
            |t, reply| reply.data(t.as_bytes()),
        );
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
        let (core, name) = (self.core.clone(), name.to_owned());
        let done = self.entry_reply();
        self.spawn(
            "mkdir",
            parent,
            reply,
            async move { core.mkdir(parent, &name).await },
            done,
        );
    }

    fn open(&mut self, req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let core = self.core.clone();
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            let opener = caller_process(req);
            let truncate = flags & libc::O_TRUNC != 0;
            // The kernel refuses a non-passthrough open of an inode open with
            // passthrough (and would then release the handle just made, which would
            // publish an empty new version): say so before staging anything.
            if self.served.has_backing(ino) {
                tracing::info!("open for writing: inode {ino} is open for reading (passthrough)");
                return reply.error(FsError::OpenForReading.errno());
            }
            let work = async move { core.open_write(ino, truncate, opener).await };
            return self.spawn("open", ino, reply, work, |(fh, _), reply| {
                reply.opened(fh, consts::FOPEN_DIRECT_IO)
            });
        }
        // A cached blob opens here, at once; anything else (a download) in a task.
        if let Some((fh, handle)) = core.open_cached(ino) {
            return reply_open(&core, &self.served, ino, fh, &handle, reply);
        }
        let served = self.served.clone();
        let core2 = core.clone();
        self.spawn(
            "open",
            ino,
            reply,
            async move { core.open(ino).await },
            move |(fh, handle), reply| reply_open(&core2, &served, ino, fh, &handle, reply),
        );
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
                Err(e) => reply.error(errno("read", &e)),
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
        self.served.release(fh);
        // Read handles are released here; a staged file may still have to publish.
        if !self.core.is_staged_handle(fh) {
            self.core.release(fh);
            return reply.ok();
        }
        let core = self.core.clone();
        let busy = core.busy();
        let work = async move {
            core.release_handle(fh).await;
            drop(busy);
            Ok(())
        };
        self.spawn("release", fh, reply, work, |(), reply| reply.ok());
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
        // Counted from the request's arrival: unmounting waits for it.
        let busy = core.busy();
        let work = async move {
            let r = core.flush(fh, flusher).await;
            drop(busy);
            r
        };
        self.spawn("flush", fh, reply, work, |(), reply| reply.ok());
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
        let (core, name) = (self.core.clone(), name.to_owned());
        let opener = caller_process(req);
        let (served, ttl) = (self.served.clone(), self.core.ttl());
        let work = async move { core.create(parent, &name, opener).await };
        self.spawn("create", parent, reply, work, move |(a, fh, _), reply| {
            let fa = to_fuse(&a);
            served.told(&fa);
            reply.created(&ttl, &fa, 0, fh, consts::FOPEN_DIRECT_IO)
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
        if let Some(r) = self.core.write_unfrozen(fh, offset, data) {
            return answer("write", r, reply, |n, reply| reply.written(n));
        }
        let (core, data) = (self.core.clone(), data.to_vec());
        let work = async move { core.write(fh, offset, &data).await };
        self.spawn("write", fh, reply, work, |n, reply| reply.written(n));
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let (core, name) = (self.core.clone(), name.to_owned());
        let work = async move { core.unlink(parent, &name).await };
        self.spawn("unlink", parent, reply, work, |(), reply| reply.ok());
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        answer(
            "rmdir",
            self.core.rmdir(parent, name),
            reply,
            |(), reply| reply.ok(),
        );
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
        let (name, newname) = (name.to_owned(), newname.to_owned());
        let work = async move { core.rename(parent, &name, newparent, &newname).await };
        self.spawn("rename", parent, reply, work, |(), reply| reply.ok());
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let (core, dirs) = (self.core.clone(), self.dirs.clone());
        let fh = self.next_dir.fetch_add(1, Ordering::Relaxed);
        self.spawn(
            "opendir",
            ino,
            reply,
            async move { core.readdir(ino).await },
            move |entries, reply| {
                let handle = DirHandle {
                    entries,
                    wait_until: tokio::time::Instant::now() + READDIRPLUS_PATIENCE,
                };
                dirs.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(fh, Arc::new(handle));
                reply.opened(fh, 0);
            },
        );
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        reply: ReplyDirectory,
    ) {
        let snapshot = self.dir_handle(fh);
        if let Some(handle) = snapshot {
            return fill(&handle.entries, offset, reply);
        }
        // A handle without a snapshot (none is made for it): listed now.
        let core = self.core.clone();
        self.spawn(
            "readdir",
            ino,
            reply,
            async move { core.readdir(ino).await },
            move |entries, reply| fill(&entries, offset, reply),
        );
    }

    fn readdirplus(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let snapshot = self.dir_handle(fh);
        let Some(handle) = snapshot else {
            return reply.error(FsError::BadHandle.errno());
        };
        let (core, served) = (self.core.clone(), self.served.clone());
        let span = tracing::debug_span!("fuse", op = "readdirplus", ino);
        self.rt.spawn(
            async move {
                let ttl = core.ttl();
                let start = offset.max(0) as usize;
                for (i, e) in handle.entries.iter().enumerate().skip(start) {
                    let (attr, valid) = plus_attr(&core, e, handle.wait_until, ttl).await;
                    let fa = to_fuse(&attr);
                    if reply.add(e.ino, (i + 1) as i64, &e.name, &valid, &fa, 0) {
                        break;
                    }
                    served.told(&fa);
                }
                reply.ok();
            }
            .instrument(span),
        );
    }

    fn releasedir(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        reply: ReplyEmpty,
    ) {
        let handle = self
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
        reply.ok();
        // A big key's listing (and what its reads made) back to the system, not kept
        // by the allocator after each `ls` (the handle is dropped first).
        let entries = handle.map_or(0, |h| h.entries.len());
        crate::fs::return_freed_memory_after(entries);
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let s = self.core.statfs();
        reply.statfs(
            s.blocks, s.free, s.free, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
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
        // Names the tree never has are answered here, without a task's round trip.
        if let Err(e) = crate::fs::xattr::xattr_name(name) {
            return reply.error(e.errno());
        }
        let (core, name) = (self.core.clone(), name.to_owned());
        let work = async move { core.xattr(ino, &name).await };
        self.spawn("getxattr", ino, reply, work, move |v, reply| {
            xattr_reply(size, &v, reply)
        });
    }

    fn listxattr(&mut self, _req: &Request<'_>, ino: u64, size: u32, reply: ReplyXattr) {
        let core = self.core.clone();
        let work = async move { core.xattrs(ino).await };
        self.spawn("listxattr", ino, reply, work, move |a, reply| {
            xattr_reply(size, &crate::fs::xattr::listing(&a), reply)
        });
    }

    fn setxattr(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        // Any attribute but the pin (`cp -a`, `rsync -X`): answered here, no task.
        if let Err(e) = crate::fs::xattr::settable_name(name) {
            return reply.error(e.errno());
        }
        let (core, name, value, uid) = (
            self.core.clone(),
            name.to_owned(),
            value.to_vec(),
            req.uid(),
        );
        let work = async move { core.set_xattr(ino, &name, &value, uid).await };
        self.spawn("setxattr", ino, reply, work, |(), reply| reply.ok());
    }

    fn removexattr(&mut self, req: &Request<'_>, ino: u64, name: &OsStr, reply: ReplyEmpty) {
        if let Err(e) = crate::fs::xattr::settable_name(name) {
            return reply.error(e.errno());
        }
        let (core, name, uid) = (self.core.clone(), name.to_owned(), req.uid());
        let work = async move { core.remove_xattr(ino, &name, uid).await };
        self.spawn("removexattr", ino, reply, work, |(), reply| reply.ok());
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.ok();
    }
}
