//! Finding the blob files on disk (at open, to rebuild the accounting) and checking
//! them again (`fsck`).

use super::super::disk::{remove_entry, PROTECTED};
use super::super::{CacheError, FsckReport};
use super::{io_err, unlink, BlobStore};
use crate::digest::Sha512;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// A blob file found by a scan.
pub(super) struct Found {
    pub(super) sha: Sha512,
    pub(super) len: u64,
    pub(super) mtime: SystemTime,
}

fn is_shard_name(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lists the blob files under `root`, removing whatever cannot be one (bad names,
/// blobs in the wrong shard, directories or links where a blob should be).
pub(super) fn scan(root: &Path) -> io::Result<Vec<Found>> {
    let mut found = Vec::new();
    for shard in fs::read_dir(root)? {
        let shard = shard?;
        let name = shard.file_name();
        let Ok(file_type) = shard.file_type() else {
            continue;
        };
        if name == PROTECTED {
            continue;
        }
        let shard_name = name.to_str().filter(|n| is_shard_name(n));
        let Some(shard_name) = shard_name.filter(|_| file_type.is_dir()) else {
            tracing::warn!(path = %shard.path().display(), "not a blob shard, removing");
            remove_entry(&shard.path(), file_type.is_dir());
            continue;
        };
        let Ok(entries) = fs::read_dir(shard.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let sha = entry
                .file_name()
                .to_str()
                .and_then(|n| Sha512::parse(n).ok())
                .filter(|sha| sha.short(2) == shard_name && file_type.is_file());
            let Some(sha) = sha else {
                tracing::warn!(path = %entry.path().display(), "not a blob, removing");
                remove_entry(&entry.path(), file_type.is_dir());
                continue;
            };
            // A blob unlinked meanwhile by another process is simply not there.
            let Ok(meta) = entry.metadata() else { continue };
            found.push(Found {
                sha,
                len: meta.len(),
                mtime: meta.modified().unwrap_or(UNIX_EPOCH),
            });
        }
    }
    Ok(found)
}

impl BlobStore {
    /// Re-hashes every blob file on disk (not only the ones this process knows) and
    /// removes the wrong or unreadable ones that no pin holds. No lock is held while
    /// hashing; a file replaced meanwhile (another inode) is left alone.
    pub(crate) fn fsck(&self) -> Result<FsckReport, CacheError> {
        self.fsck_since(None)
    }

    /// `fsck` of the blobs modified at or after `since` (all when `None`).
    pub(crate) fn fsck_since(&self, since: Option<SystemTime>) -> Result<FsckReport, CacheError> {
        let found = scan(&self.root).map_err(|e| io_err(&self.root, e))?;
        let mut report = FsckReport::default();
        for f in found {
            if since.is_some_and(|t| f.mtime < t) {
                continue;
            }
            let path = self.path_of(&f.sha);
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path, e)),
            };
            let ino = file.metadata().map(|m| (m.dev(), m.ino())).ok();
            let good = match Sha512::of_reader(&file) {
                Ok((actual, len)) => {
                    report.checked += 1;
                    report.bytes += len;
                    if actual != f.sha {
                        tracing::warn!(expected = %f.sha, %actual, "fsck: blob does not match its name");
                    }
                    actual == f.sha
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "fsck: blob unreadable");
                    false
                }
            };
            if good {
                continue;
            }
            let mut ix = self.lock();
            if ix.is_pinned(&f.sha) {
                report.pinned.push(f.sha);
                continue;
            }
            let now = fs::symlink_metadata(&path).map(|m| (m.dev(), m.ino())).ok();
            if now.is_some() && now == ino {
                ix.remove(&f.sha);
                unlink(&path);
                report.removed.push(f.sha);
            }
        }
        Ok(report)
    }
}
