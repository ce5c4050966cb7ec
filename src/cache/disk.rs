//! Small file-system helpers of the cache: atomic writes, tolerant JSON reads, free
//! space, the shared open lock and the clean-up of temporary files.
//!
//! Nothing here ever removes an entry named `outbox` (the upload outbox lives beside the
//! cache's own directories and must survive every clean-up).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The directory name that no clean-up may touch.
pub(crate) const PROTECTED: &str = "outbox";

/// Temporary files older than this are leftovers even while other processes use the
/// cache: a live download writes continuously and times out long before.
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

/// The mode of every directory of the cache tree (and of the outbox): owner only. The
/// mount is owner-only by default, so the bytes behind it must be too.
pub(crate) const PRIVATE_DIR: u32 = 0o700;
/// The mode of every file of the cache tree (blobs, tables, staged data, metadata).
pub(crate) const PRIVATE_FILE: u32 = 0o600;

/// Creates a directory and its missing parents, each new one owner-only.
pub(crate) fn create_private_dir_all(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR)
        .create(path)
}

/// Creates one directory, owner-only (fails when it exists).
pub(crate) fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(PRIVATE_DIR).create(path)
}

/// Options creating a file owner-only (the mode counts only when the file is new).
pub(crate) fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(PRIVATE_FILE);
    o
}

/// Takes the group and other permission bits off `path` (not following a symbolic
/// link), if it has any. Returns true when it changed the mode.
pub(crate) fn make_private(path: &Path) -> io::Result<bool> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(false);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode & !0o077))?;
    Ok(true)
}

/// [`make_private`] on `root` and everything under it (bounded by the tree: symbolic
/// links are neither followed nor changed). Returns how many entries changed; errors on
/// single entries are logged and skipped (another process may remove files meanwhile).
pub(crate) fn make_tree_private(root: &Path) -> usize {
    let mut changed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        match make_private(&path) {
            Ok(true) => changed += 1,
            Ok(false) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot make private"),
        }
        let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if is_dir {
            if let Ok(rd) = fs::read_dir(&path) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    changed
}

/// Writes `dest` atomically: a temporary file in `tmp_dir` (same file system), fsync,
/// rename, then fsync of the destination directory so the rename survives a crash.
pub(crate) fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(tmp_dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dest).map_err(|e| e.error)?;
    if let Some(parent) = dest.parent() {
        // Best effort: the data is already safe, only the name could be lost.
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Replaces `dest` with `bytes` through a temporary file and a rename, without fsync:
/// for the cache's tables, which are rewritten as requests come (after every listing
/// fetched, every upload) and cost nothing to lose. An fsync here made a request wait
/// for the filesystem's journal, behind all the dirty data of a large copy (0.6 s
/// after a 512 MiB `cp`). A reader sees the old file or the new one; after a power
/// loss, possibly an empty one, which [`read_json`] reads as a table to start again.
pub(crate) fn write_replace(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(tmp_dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

/// Reads a JSON file. Missing gives `None` silently; unreadable or corrupt gives `None`
/// with a warning (the caller starts empty: these tables are caches, not data).
pub(crate) fn read_json(path: &Path) -> Option<serde_json::Value> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cache table unreadable, starting empty");
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cache table corrupt, starting empty");
            None
        }
    }
}

/// Seconds since the Unix epoch, as stored in the tables: millisecond precision, so
/// the value survives a JSON round trip whose float parsing may be one ULP off.
pub(crate) fn to_unix(t: SystemTime) -> f64 {
    let ms = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as f64,
        Err(e) => -(e.duration().as_millis() as f64),
    };
    ms / 1000.0
}

/// The inverse of [`to_unix`] (to the millisecond); nonsense (NaN, infinite, absurd)
/// gives the epoch.
pub(crate) fn from_unix(secs: f64) -> SystemTime {
    let ms = (secs * 1000.0).round();
    if !ms.is_finite() || ms.abs() > 1e15 {
        return UNIX_EPOCH;
    }
    let d = Duration::from_millis(ms.abs() as u64);
    if ms >= 0.0 {
        UNIX_EPOCH.checked_add(d).unwrap_or(UNIX_EPOCH)
    } else {
        UNIX_EPOCH.checked_sub(d).unwrap_or(UNIX_EPOCH)
    }
}

/// Bytes an unprivileged process may still write on the file system holding `path`.
pub(crate) fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of
    // the right type; statvfs fills it or fails.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so the structure is initialised.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// A non-blocking `flock`: `Ok(false)` when another holder is in the way.
fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on a valid open descriptor has no memory effects.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Every process using a cache directory holds a shared `flock` on its lock file for as
/// long as it runs. Whoever obtains it exclusively at open knows it is alone, so
/// everything in `tmp/` is a crash leftover.
pub(crate) struct OpenLock {
    file: Option<File>,
    pub(crate) alone: bool,
}

impl OpenLock {
    /// True when this process can take the lock exclusively now (nobody else uses the
    /// cache); the lock is then shared again.
    pub(crate) fn try_exclusive(&self) -> bool {
        let Some(f) = &self.file else {
            return false;
        };
        let alone = matches!(flock(f, libc::LOCK_EX | libc::LOCK_NB), Ok(true));
        let _ = flock(f, libc::LOCK_SH);
        alone
    }

    pub(crate) fn acquire(path: &Path) -> io::Result<OpenLock> {
        let file = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        let unlocked = |e: io::Error| {
            // A file system without flock: nobody can be proven absent, so keep
            // leftovers (only stale ones are removed).
            tracing::warn!(path = %path.display(), error = %e, "cache lock unavailable");
            OpenLock {
                file: None,
                alone: false,
            }
        };
        match flock(&file, libc::LOCK_EX) {
            Ok(true) => {
                return Ok(OpenLock {
                    file: Some(file),
                    alone: true,
                })
            }
            Ok(false) => {}
            Err(e) => return Ok(unlocked(e)),
        }
        // Someone else holds it: shared, or exclusive for the short time of its own
        // clean-up. Bounded wait for the latter.
        for _ in 0..50 {
            match flock(&file, libc::LOCK_SH) {
                Ok(true) => {
                    return Ok(OpenLock {
                        file: Some(file),
                        alone: false,
                    })
                }
                Ok(false) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Ok(unlocked(e)),
            }
        }
        Ok(unlocked(io::Error::new(
            io::ErrorKind::WouldBlock,
            "held exclusively for 5 s",
        )))
    }

    /// After the clean-up: let other processes in (shared from now on). The lock is
    /// briefly released by the conversion, which is harmless since no temporary file of
    /// ours exists yet.
    pub(crate) fn share(&mut self) {
        if let Some(f) = &self.file {
            if !matches!(flock(f, libc::LOCK_SH), Ok(true)) {
                tracing::warn!("cache lock: could not downgrade to shared");
            }
        }
        self.alone = false;
    }
}

/// Removes crash leftovers from `tmp`: everything when `alone`, else what is stale.
pub(crate) fn clean_tmp(tmp: &Path, alone: bool) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        if entry.file_name() == PROTECTED {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let stale = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > STALE_TMP);
        if alone || stale {
            remove_entry(&entry.path(), meta.is_dir());
        }
    }
}

/// Removes a file or a whole directory we own, logging failures; never `outbox`.
pub(crate) fn remove_entry(path: &Path, is_dir: bool) {
    if path.file_name().is_some_and(|n| n == PROTECTED) {
        return;
    }
    let res = if is_dir {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match res {
        Ok(()) => tracing::debug!(path = %path.display(), "removed from cache"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_times_round_trip() {
        let t = from_unix(1_700_000_000.25);
        assert_eq!(to_unix(t), 1_700_000_000.25);
        assert_eq!(from_unix(f64::NAN), UNIX_EPOCH);
        assert_eq!(to_unix(from_unix(-5.0)), -5.0);
        assert_eq!(from_unix(1e300), UNIX_EPOCH);
        // One ULP off after a JSON round trip still gives the same time.
        let x = to_unix(SystemTime::now());
        assert_eq!(from_unix(f64::from_bits(x.to_bits() + 1)), from_unix(x));
        assert_eq!(from_unix(f64::from_bits(x.to_bits() - 1)), from_unix(x));
    }

    #[test]
    fn second_lock_holder_is_not_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let mut first = OpenLock::acquire(&p).unwrap();
        assert!(first.alone);
        first.share();
        let second = OpenLock::acquire(&p).unwrap();
        assert!(!second.alone);
        drop((first, second));
        assert!(OpenLock::acquire(&p).unwrap().alone);
    }

    #[test]
    fn free_bytes_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
