//! Persistent pins: blobs kept for offline use, never evicted, across remounts and
//! across the processes sharing the cache directory.
//!
//! A pin is an empty file `v1/pins/<128 hex>` named by the blob's SHA-512: creating or
//! removing it is one atomic directory operation, so two processes (a running mount
//! and `shacachefs prefetch --pin`) never corrupt each other's pins, and a crash
//! leaves each pin made or not made. The pin survives the blob: a pinned blob that
//! `fsck` removed (wrong bytes) stays pinned and is fetched again by its next open or
//! `prefetch`.
//!
//! The race between one process pinning a blob and another evicting it is closed by
//! `v1/pins.lock`: an eviction holds it shared from the moment it checks a victim's pin
//! file until it has unlinked the blob; a pin holds it exclusively while it creates the
//! pin file and checks that the blob file is still there. So either the eviction saw
//! the pin, or the pinner sees the blob gone (and fetches it again).
//!
//! Each process remembers the pins it knows (for the accounting and to skip pinned
//! blobs cheaply) and reads the directory again when its mtime changed; the pin file
//! itself is checked before every unlink, so a pin made by another process a moment
//! ago is respected even when the directory's mtime did not move (coarse timestamps).

use super::disk::private_file;
use crate::digest::Sha512;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A directory whose mtime is this close to the moment it was read may change again
/// within the same timestamp tick: it is read again next time.
const RACY: Duration = Duration::from_secs(1);

pub(crate) struct Pins {
    dir: PathBuf,
    lock_path: PathBuf,
    /// The directory's mtime when last read, unless that read was racy.
    seen: Mutex<Option<SystemTime>>,
}

/// A `flock` held until dropped (closing the descriptor releases it).
pub(crate) struct PinLock {
    _file: Option<File>,
}

impl Pins {
    /// `v1/pins` (created if missing) and `v1/pins.lock`.
    pub(crate) fn open(v1: &Path) -> io::Result<Pins> {
        let dir = v1.join("pins");
        super::disk::create_private_dir_all(&dir)?;
        Ok(Pins {
            dir,
            lock_path: v1.join("pins.lock"),
            seen: Mutex::new(None),
        })
    }

    fn path_of(&self, sha: &Sha512) -> PathBuf {
        self.dir.join(sha.hex())
    }

    /// Whether a pin file exists for `sha` (made by any process).
    pub(crate) fn contains(&self, sha: &Sha512) -> bool {
        fs::symlink_metadata(self.path_of(sha)).is_ok()
    }

    /// Every pin on disk (names that are not a SHA-512 are ignored).
    pub(crate) fn read_all(&self) -> HashSet<Sha512> {
        let mut out = HashSet::new();
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if let Some(sha) = e.file_name().to_str().and_then(|n| Sha512::parse(n).ok()) {
                    out.insert(sha);
                }
            }
        }
        out
    }

    /// Every pin on disk, when the directory may have changed since the last call;
    /// `None` when it did not (one `stat`).
    pub(crate) fn changed(&self) -> Option<HashSet<Sha512>> {
        let mtime = fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if mtime.is_some() && *seen == mtime {
            return None;
        }
        let now = SystemTime::now();
        let pins = self.read_all();
        *seen = mtime.filter(|m| now.duration_since(*m).is_ok_and(|age| age >= RACY));
        Some(pins)
    }

    /// Forgets the last read, so the next [`Pins::changed`] reads the directory.
    fn stale(&self) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Takes `pins.lock` shared (`exclusive`: exclusively), waiting for it. A file
    /// system without `flock` gives a lock that holds nothing (logged).
    pub(crate) fn lock(&self, exclusive: bool) -> PinLock {
        let file = private_file()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path);
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        match file {
            Ok(f) => loop {
                // SAFETY: flock on a valid open descriptor has no memory effects.
                if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
                    return PinLock { _file: Some(f) };
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::warn!(path = %self.lock_path.display(), error = %e, "pin lock unavailable");
                    return PinLock { _file: None };
                }
            },
            Err(e) => {
                tracing::warn!(path = %self.lock_path.display(), error = %e, "pin lock unavailable");
                PinLock { _file: None }
            }
        }
    }

    /// Makes the pin of `sha` (durably), then, still under the exclusive lock, asks
    /// `present` whether the blob file is in place. Returns that answer: `false` means
    /// another process evicted the blob before the pin was made (the pin stays).
    pub(crate) fn add(&self, sha: &Sha512, present: impl FnOnce() -> bool) -> io::Result<bool> {
        let path = self.path_of(sha);
        let there = {
            let _lock = self.lock(true);
            private_file().create(true).write(true).open(&path)?;
            present()
        };
        self.stale();
        sync_dir(&self.dir);
        Ok(there)
    }

    /// Removes the pin of `sha`; true when there was one.
    pub(crate) fn remove(&self, sha: &Sha512) -> io::Result<bool> {
        let removed = match fs::remove_file(self.path_of(sha)) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        self.stale();
        sync_dir(&self.dir);
        Ok(removed)
    }
}

/// Best effort: the pin's name survives a power loss.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
