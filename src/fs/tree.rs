//! The tree of design §1 as the kernel walks it: keys as directories, trusted entries
//! as files, `latest`, `.entries.json`, `.sha512/<hex>`; attributes, directory
//! listings, links, and local keys made with `mkdir`.
//!
//! Keys cannot be listed on any server, so a key exists when shadir answers 200 for it
//! (also `[]`); a 404 is remembered for `negative_ttl`. `mkdir` makes a local key that
//! shows as an empty directory until something is written into it.

use super::{
    existing, lock, mtime_of, new_name, Attr, Core, DirEntry, FsError, KeyListing, Kind, Node,
    ROOT_INO,
};
use crate::digest::Sha512;
use crate::naming::{key_dir_name, key_from_dir_name};
use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

impl Core {
    pub(super) fn dir_attr(&self, ino: u64, mtime: SystemTime) -> Attr {
        Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            perm: 0o755,
            nlink: 2,
            mtime,
            uid: self.opts.uid,
            gid: self.opts.gid,
        }
    }

    pub(super) fn file_attr(&self, ino: u64, size: u64, mtime: SystemTime) -> Attr {
        Attr {
            ino,
            kind: Kind::File,
            size,
            perm: 0o444,
            nlink: 1,
            mtime,
            uid: self.opts.uid,
            gid: self.opts.gid,
        }
    }

    /// `lookup(parent, name)`.
    pub async fn lookup(
        self: &Arc<Self>,
        parent: u64,
        name: impl AsRef<OsStr>,
    ) -> Result<Attr, FsError> {
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let name = existing(name.as_ref())?;
        match self.node(parent)? {
            Node::Root => {
                if name == ".sha512" {
                    let ino = self.ino(&Node::ShaDir);
                    return Ok(self.dir_attr(ino, self.started));
                }
                let key = self.key_of_name(name).ok_or(FsError::NotFound)?;
                match self.listing(&key).await? {
                    Some(_) => Ok(self.dir_attr(self.ino(&Node::Key(key)), self.started)),
                    None => Err(FsError::NotFound),
                }
            }
            Node::ShaDir => {
                let sha = Sha512::parse(name).map_err(|_| FsError::NotFound)?;
                match self.blob_size(&sha).await? {
                    Some(size) => {
                        Ok(self.file_attr(self.ino(&Node::Blob(sha)), size, self.started))
                    }
                    None => Err(FsError::NotFound),
                }
            }
            Node::Key(key) => {
                if let Some(id) = self.staged_id(&key, name) {
                    match self.staged_attr(&id) {
                        Ok(a) => return Ok(a),
                        Err(_) => self.forget_stale(&id),
                    }
                }
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                self.key_child_attr(&key, &listing, name).await
            }
            _ => Err(FsError::NotDir),
        }
    }

    pub(super) async fn key_child_attr(
        &self,
        key: &str,
        listing: &KeyListing,
        name: &str,
    ) -> Result<Attr, FsError> {
        if name == "latest" {
            let target = listing.latest.as_ref().ok_or(FsError::NotFound)?;
            let ino = self.ino(&Node::Latest(key.to_string()));
            let mtime = listing
                .files
                .get(target)
                .map(|f| f.mtime)
                .unwrap_or(self.started);
            return Ok(Attr {
                kind: Kind::Symlink,
                size: target.len() as u64,
                perm: 0o777,
                ..self.file_attr(ino, 0, mtime)
            });
        }
        if name == ".entries.json" {
            let ino = self.ino(&Node::EntriesJson(key.to_string()));
            return Ok(self.file_attr(ino, listing.entries_json_len(), self.started));
        }
        let f = listing.files.get(name).ok_or(FsError::NotFound)?;
        let sha = f.entry.info.sha512;
        let size = self.entry_size(key, name, &sha).await?;
        let ino = self.ino(&Node::Entry {
            key: key.to_string(),
            name: name.to_string(),
            sha,
        });
        Ok(self.file_attr(ino, size, f.mtime))
    }

    /// `getattr(ino)`.
    pub async fn getattr(self: &Arc<Self>, ino: u64) -> Result<Attr, FsError> {
        if let Some(r) = self.attr_in_memory(ino) {
            return r;
        }
        match self.node(ino)? {
            Node::Root | Node::ShaDir | Node::Key(_) => Ok(self.dir_attr(ino, self.started)),
            Node::Blob(sha) => match self.blob_size(&sha).await? {
                Some(size) => Ok(self.file_attr(ino, size, self.started)),
                None => Err(FsError::NotFound),
            },
            Node::Entry { key, name, sha } => {
                let mtime = match self.listing(&key).await {
                    Ok(Some(l)) => mtime_of(&l, &name, &sha),
                    _ => None,
                }
                .unwrap_or(self.started);
                let size = self.entry_size(&key, &name, &sha).await?;
                Ok(self.file_attr(ino, size, mtime))
            }
            Node::Latest(key) | Node::EntriesJson(key) => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                let name = if matches!(self.node(ino)?, Node::Latest(_)) {
                    "latest"
                } else {
                    ".entries.json"
                };
                self.key_child_attr(&key, &listing, name).await
            }
            Node::Staged(id) => self.staged_attr(&id),
        }
    }

    /// `getattr` answered from memory alone, without a request or a wait: `None` when
    /// it would need one (stale listing, unknown size), and the caller then uses
    /// [`Core::getattr`]. Lets the FUSE adapter answer on the session thread.
    pub fn attr_in_memory(&self, ino: u64) -> Option<Result<Attr, FsError>> {
        match self.node(ino) {
            Err(e) => Some(Err(e)),
            Ok(Node::Root | Node::ShaDir | Node::Key(_)) => {
                Some(Ok(self.dir_attr(ino, self.started)))
            }
            Ok(Node::Blob(sha)) => {
                let size = self.cache.size_of(&sha)?;
                Some(Ok(self.file_attr(ino, size, self.started)))
            }
            Ok(Node::Entry { key, name, sha }) => {
                let Some(Some(listing)) = self.fresh_state(&key) else {
                    return None;
                };
                let mtime = mtime_of(&listing, &name, &sha)?;
                let size = self.cache.size_of(&sha)?;
                Some(Ok(self.file_attr(ino, size, mtime)))
            }
            Ok(Node::Staged(id)) => Some(self.staged_attr(&id)),
            Ok(Node::Latest(_) | Node::EntriesJson(_)) => None,
        }
    }

    /// `lookup` answered from memory alone (a fresh listing, a known size), `None` when
    /// it would need a request or a wait (then [`Core::lookup`]). Lets the adapter
    /// answer on the session thread: an `ls -l` of a big key that the kernel has
    /// forgotten is one LOOKUP a file. A staged name always takes the full path.
    pub fn lookup_in_memory(&self, parent: u64, name: &OsStr) -> Option<Result<Attr, FsError>> {
        let name = match existing(name) {
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        let key = match self.node(parent) {
            Err(e) => return Some(Err(e)),
            Ok(Node::Key(key)) => key,
            Ok(_) => return None,
        };
        if name == "latest" || name == ".entries.json" || self.staged_id(&key, name).is_some() {
            return None;
        }
        let Some(Some(listing)) = self.fresh_state(&key) else {
            return None;
        };
        let Some(f) = listing.files.get(name) else {
            self.stats.lookups.fetch_add(1, Ordering::Relaxed);
            return Some(Err(FsError::NotFound));
        };
        let sha = f.entry.info.sha512;
        let size = self.cache.size_of(&sha)?;
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let ino = self.ino(&Node::Entry {
            key,
            name: name.to_string(),
            sha,
        });
        Some(Ok(self.file_attr(ino, size, f.mtime)))
    }

    /// Attributes that say nothing yet (size 0), for a directory entry whose own could
    /// not be had in time: given to the kernel with no validity, so that it asks again
    /// (`lookup`) before using them.
    pub fn unknown_attr(&self, ino: u64, kind: Kind) -> Attr {
        match kind {
            Kind::Dir => self.dir_attr(ino, self.started),
            Kind::File => self.file_attr(ino, 0, self.started),
            Kind::Symlink => Attr {
                kind: Kind::Symlink,
                perm: 0o777,
                ..self.file_attr(ino, 0, self.started)
            },
        }
    }

    /// `readdir(ino)`: every entry, `.` and `..` included.
    pub async fn readdir(self: &Arc<Self>, ino: u64) -> Result<Vec<DirEntry>, FsError> {
        self.stats.dir_listings.fetch_add(1, Ordering::Relaxed);
        let mut out = vec![
            DirEntry {
                ino,
                name: ".".into(),
                kind: Kind::Dir,
            },
            DirEntry {
                ino: ROOT_INO,
                name: "..".into(),
                kind: Kind::Dir,
            },
        ];
        match self.node(ino)? {
            Node::Root => {
                out.push(DirEntry {
                    ino: self.ino(&Node::ShaDir),
                    name: ".sha512".into(),
                    kind: Kind::Dir,
                });
                for key in self.root_keys() {
                    let ino = self.ino(&Node::Key(key.clone()));
                    out.push(DirEntry {
                        ino,
                        name: key_dir_name(&key),
                        kind: Kind::Dir,
                    });
                }
            }
            Node::ShaDir => {}
            Node::Key(key) => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                for (name, f) in &listing.files {
                    let ino = self.ino(&Node::Entry {
                        key: key.clone(),
                        name: name.clone(),
                        sha: f.entry.info.sha512,
                    });
                    out.push(DirEntry {
                        ino,
                        name: name.clone(),
                        kind: Kind::File,
                    });
                }
                let staged = self.staged_in(&key);
                out.retain(|e| !staged.iter().any(|(n, _)| *n == e.name));
                for (name, id) in staged {
                    out.push(DirEntry {
                        ino: self.ino(&Node::Staged(id)),
                        name,
                        kind: Kind::File,
                    });
                }
                if listing.latest.is_some() {
                    out.push(DirEntry {
                        ino: self.ino(&Node::Latest(key.clone())),
                        name: "latest".into(),
                        kind: Kind::Symlink,
                    });
                }
                out.push(DirEntry {
                    ino: self.ino(&Node::EntriesJson(key.clone())),
                    name: ".entries.json".into(),
                    kind: Kind::File,
                });
            }
            _ => return Err(FsError::NotDir),
        }
        Ok(out)
    }

    /// `readlink(ino)`.
    pub async fn readlink(self: &Arc<Self>, ino: u64) -> Result<String, FsError> {
        match self.node(ino)? {
            Node::Latest(key) => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                listing.latest.clone().ok_or(FsError::NotFound)
            }
            _ => Err(FsError::Invalid("not a symbolic link")),
        }
    }

    /// `mkdir(root, name)`: a local key, shown until the mount ends.
    pub async fn mkdir(
        self: &Arc<Self>,
        parent: u64,
        name: impl AsRef<OsStr>,
    ) -> Result<Attr, FsError> {
        let name = new_name(name.as_ref())?;
        if self.node(parent)? != Node::Root {
            return Err(FsError::NotPermitted("directories exist only at the root"));
        }
        if name == ".sha512" || name.starts_with('.') && name.len() <= 2 {
            return Err(FsError::NotPermitted("reserved name"));
        }
        let key = key_from_dir_name(name).ok_or(FsError::Invalid("not a usable key name"))?;
        lock(&self.local_keys).insert(key.clone());
        lock(&self.keys).remove(&key);
        Ok(self.dir_attr(self.ino(&Node::Key(key)), SystemTime::now()))
    }

    /// `rmdir`: keys are never removed (shadir has no delete).
    pub fn rmdir(&self, _parent: u64, name: &OsStr) -> Result<(), FsError> {
        tracing::info!("rmdir {name:?}: shadir has no delete");
        Err(FsError::NotPermitted("shadir has no delete"))
    }

    /// `statfs`: the cache's limit and use, in 4 KiB blocks.
    pub fn statfs(&self) -> Statfs {
        let (used, limit, count) = self.cache.usage();
        let bsize = 4096u64;
        let free = limit.saturating_sub(used) / bsize;
        Statfs {
            blocks: limit.max(used) / bsize,
            free,
            files: count as u64,
            ffree: u64::MAX / 2,
            bsize: bsize as u32,
            namelen: 255,
        }
    }
}

/// What `statfs` reports: the cache directory's budget.
#[derive(Debug, Clone, Copy)]
pub struct Statfs {
    pub blocks: u64,
    pub free: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}
