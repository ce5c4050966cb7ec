//! Extended attributes of entry files, and the rule for what does not fit.
//!
//! Names: `user.shacache.sha512`, `user.shadir.<field>` for each metadata field (strings
//! as they are, other values as compact JSON), `user.shadir.signer`,
//! `user.shacachefs.cached`, `user.shacachefs.pin`. The kernel takes names up to 255 bytes, values up to
//! 64 KiB and a whole listing up to 64 KiB: a field whose name or value is too long is
//! left out, and fields are added in metadata order until the listing is full; the rest
//! are left out (they stay in `.entries.json`).
//!
//! The one attribute that can be set is [`PIN_XATTR`], on an entry, `latest` (the
//! kernel follows the link: the blob it points to now) or `.sha512/<hex>`: `1` fetches
//! the blob if needed (verified, as an open does) and pins it in the cache for offline
//! use (see `cache::pins`), `0` or removing the attribute unpins it; reading it gives
//! `1` or `0`. Only the mount's owner and root may change it. Any other attribute, and
//! the pin on another node, answers `EOPNOTSUPP`, so `cp -a`, `rsync -X` and
//! `tar --xattrs` go on without them.

use super::transfers::Subject;
use super::{status, Core, FsError, KeyListing, Node};
use crate::digest::Sha512;
use serde_json::{Map, Value};
use std::ffi::OsStr;
use std::sync::Arc;

/// Longest attribute name.
pub const NAME_MAX: usize = 255;
/// Largest value, and largest listing.
pub const SIZE_MAX: usize = 65536;

/// The attribute that pins a blob for offline use.
pub const PIN_XATTR: &str = "user.shacachefs.pin";

/// How many times a pin fetches a blob that another process keeps evicting.
const PIN_ATTEMPTS: usize = 3;

/// The name of an attribute that can be set or removed: the pin, and nothing else
/// (`Unsupported`, decided without a request or a wait).
pub fn settable_name(name: &OsStr) -> Result<(), FsError> {
    match name.to_str() {
        Some(PIN_XATTR) => Ok(()),
        _ => Err(FsError::Unsupported),
    }
}

/// The attributes of an entry file, in listing order.
pub fn entry_xattrs(
    sha_hex: &str,
    metadata: &Map<String, Value>,
    signer: &str,
    cached: bool,
    pinned: bool,
) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut listing = 0usize;
    let mut push = |name: String, value: Vec<u8>, out: &mut Vec<(String, Vec<u8>)>| {
        if name.len() > NAME_MAX || value.len() > SIZE_MAX || listing + name.len() + 1 > SIZE_MAX {
            return;
        }
        listing += name.len() + 1;
        out.push((name, value));
    };
    push(
        "user.shacache.sha512".into(),
        sha_hex.as_bytes().to_vec(),
        &mut out,
    );
    push(
        "user.shadir.signer".into(),
        signer.as_bytes().to_vec(),
        &mut out,
    );
    push(
        "user.shacachefs.cached".into(),
        if cached { b"1".to_vec() } else { b"0".to_vec() },
        &mut out,
    );
    push(
        PIN_XATTR.into(),
        if pinned { b"1".to_vec() } else { b"0".to_vec() },
        &mut out,
    );
    for (field, value) in metadata {
        let v = match value {
            Value::String(s) => s.clone().into_bytes(),
            other => other.to_string().into_bytes(),
        };
        push(format!("user.shadir.{field}"), v, &mut out);
    }
    out
}

/// The `listxattr` answer: names, each followed by NUL.
pub fn listing(attrs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, _) in attrs {
        out.extend_from_slice(n.as_bytes());
        out.push(0);
    }
    out
}

/// The name of an attribute the tree may have, decided without a request or a wait (the
/// adapter answers the others on the session thread). Only `user.*` names exist; other
/// namespaces (`security.*`, `system.*`, `trusted.*`) are not supported at all, which is
/// what the answer says: `ls -l` asks every file for `security.selinux` and
/// `system.posix_acl_access`, and remembers "not supported" for the whole filesystem
/// where "no such attribute" would make it ask again for each of 20,000 files (40,000
/// FUSE round trips for a warm `ls -l` of a big key).
pub fn xattr_name(name: &OsStr) -> Result<&str, FsError> {
    let name = name.to_str().ok_or(FsError::NoAttr)?;
    if name.starts_with("user.") {
        Ok(name)
    } else {
        Err(FsError::Unsupported)
    }
}

/// Runs cache work that may wait for the disk (an fsync) off the runtime's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, FsError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FsError::Io(std::io::Error::other(e.to_string())))
}

impl Core {
    /// One extended attribute's value (`NoAttr`: the node has no such attribute). The
    /// root's status document is computed only when it is asked for.
    pub async fn xattr(self: &Arc<Self>, ino: u64, name: &OsStr) -> Result<Vec<u8>, FsError> {
        let name = xattr_name(name)?;
        if name == status::STATUS_XATTR && self.node(ino)? == Node::Root {
            return Ok(serde_json::to_vec_pretty(&self.status().await).unwrap_or_default());
        }
        self.xattrs(ino)
            .await?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or(FsError::NoAttr)
    }

    /// Extended attributes of a node (for listing; see [`Core::xattr`] for values).
    pub async fn xattrs(self: &Arc<Self>, ino: u64) -> Result<Vec<(String, Vec<u8>)>, FsError> {
        match self.node(ino)? {
            Node::Root => Ok(vec![
                (
                    "user.shacachefs.signature-mode".into(),
                    self.signature_mode().into_bytes(),
                ),
                // Listed here; its value (which asks the servers) only through `xattr`.
                (status::STATUS_XATTR.into(), Vec::new()),
            ]),
            Node::Entry { key, name, sha } => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                self.entry_attrs(&listing, &name, &sha)
                    .ok_or(FsError::NotFound)
            }
            Node::Blob(sha) => Ok(vec![
                ("user.shacache.sha512".into(), sha.hex().into_bytes()),
                ("user.shacachefs.cached".into(), self.cached_flag(&sha)),
                (PIN_XATTR.into(), self.pinned_flag(&sha)),
            ]),
            Node::Staged(id) => match self.published_node(&id) {
                // Published a moment ago; the kernel has not forgotten the staged inode.
                Some(Node::Entry { key, name, sha }) => {
                    let listing = self.known_listing(&key).await?;
                    Ok(self.entry_attrs(&listing, &name, &sha).unwrap_or_else(|| {
                        vec![("user.shacache.sha512".into(), sha.hex().into_bytes())]
                    }))
                }
                Some(_) => Ok(Vec::new()),
                None => Ok(vec![(
                    "user.shacachefs.pending".into(),
                    self.staged_error(&id)
                        .unwrap_or_else(|| "not published yet".into())
                        .into_bytes(),
                )]),
            },
            Node::ShaDir | Node::Key(_) | Node::Latest(_) | Node::EntriesJson(_) => Ok(Vec::new()),
        }
    }

    /// The attributes of `name` in `listing` while it still shows `sha`.
    fn entry_attrs(
        &self,
        listing: &KeyListing,
        name: &str,
        sha: &Sha512,
    ) -> Option<Vec<(String, Vec<u8>)>> {
        let f = listing
            .files
            .get(name)
            .filter(|f| f.entry.info.sha512 == *sha)?;
        Some(entry_xattrs(
            &sha.hex(),
            &f.entry.info.metadata,
            f.entry.signer.label(),
            self.cache.lookup_blob(sha).is_some(),
            self.cache.is_pinned(sha),
        ))
    }

    fn pinned_flag(&self, sha: &Sha512) -> Vec<u8> {
        if self.cache.is_pinned(sha) {
            b"1"
        } else {
            b"0"
        }
        .to_vec()
    }

    /// `setxattr(ino, name, value)` by user `uid`: see the module's documentation.
    pub async fn set_xattr(
        self: &Arc<Self>,
        ino: u64,
        name: &OsStr,
        value: &[u8],
        uid: u32,
    ) -> Result<(), FsError> {
        settable_name(name)?;
        match value {
            b"1" => self.pin(ino, uid, true).await,
            b"0" => self.pin(ino, uid, false).await,
            _ => Err(FsError::Invalid("user.shacachefs.pin takes 1 or 0")),
        }
    }

    /// `removexattr(ino, name)` by user `uid`: unpins (also when not pinned).
    pub async fn remove_xattr(
        self: &Arc<Self>,
        ino: u64,
        name: &OsStr,
        uid: u32,
    ) -> Result<(), FsError> {
        settable_name(name)?;
        self.pin(ino, uid, false).await
    }

    /// The blob a node shows, for pinning: an entry's, `latest`'s target's (now), a
    /// `.sha512/` file's, or a staged file's once published; `Unsupported` for others.
    async fn pinnable_blob(self: &Arc<Self>, ino: u64) -> Result<(Sha512, Subject), FsError> {
        match self.node(ino)? {
            Node::Entry { key, name, sha } => Ok((sha, Subject::entry(&key, &name))),
            Node::Blob(sha) => Ok((sha, Subject::blob(&sha))),
            Node::Latest(key) => {
                let listing = self.listing(&key).await?.ok_or(FsError::NotFound)?;
                let name = listing.latest.as_ref().ok_or(FsError::NotFound)?;
                let f = listing.files.get(name).ok_or(FsError::NotFound)?;
                Ok((f.entry.info.sha512, Subject::entry(&key, name)))
            }
            Node::Staged(id) => match self.published_node(&id) {
                Some(Node::Entry { key, name, sha }) => Ok((sha, Subject::entry(&key, &name))),
                _ => Err(FsError::Unsupported),
            },
            Node::Root | Node::ShaDir | Node::Key(_) | Node::EntriesJson(_) => {
                Err(FsError::Unsupported)
            }
        }
    }

    /// Pins (fetching the blob first, verified, when it is not cached) or unpins the
    /// blob of a node. Only the mount's owner and root may (with `--allow-other`,
    /// others reach the mount too).
    async fn pin(self: &Arc<Self>, ino: u64, uid: u32, pin: bool) -> Result<(), FsError> {
        let (sha, what) = self.pinnable_blob(ino).await?;
        if uid != 0 && uid != self.opts.uid {
            return Err(FsError::NotPermitted(
                "only the mount's owner and root may pin",
            ));
        }
        let cache = Arc::clone(&self.cache);
        if !pin {
            let was = blocking(move || cache.unpin_blob(&sha)).await??;
            if was {
                tracing::info!("{what}: unpinned blob {}", sha.short(16));
            }
            return Ok(());
        }
        for _ in 0..PIN_ATTEMPTS {
            let (_file, len, held) = self.cached_or_fetched(&sha, what.clone()).await?;
            let cache = Arc::clone(&cache);
            if blocking(move || cache.pin_blob(&held)).await?? {
                tracing::info!("{what}: pinned blob {} ({len} bytes)", sha.short(16));
                return Ok(());
            }
            tracing::info!(
                "{what}: blob {} evicted by another process while being pinned, fetching it again",
                sha.short(16)
            );
        }
        Err(FsError::Busy("the blob was evicted while being pinned"))
    }

    fn cached_flag(&self, sha: &Sha512) -> Vec<u8> {
        let cached = self.cache.lookup_blob(sha).is_some();
        if cached { b"1" } else { b"0" }.to_vec()
    }

    /// How entries are checked: `unverified`, or `verified (N certificates)` (the
    /// root's attribute and `status` say it the same way).
    pub fn signature_mode(&self) -> String {
        let v = &self.client.verifier;
        if v.is_empty() {
            "unverified".to_string()
        } else {
            format!("verified ({} certificates)", v.certs.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_and_limits() {
        let long_name = "n".repeat(300);
        let meta = json!({"sha512": "ab", "file": "a.tgz", "os": ["debian", 12], "ok": true,
                          long_name.as_str(): "x", "big": "v".repeat(70000)});
        let attrs = entry_xattrs("ab", meta.as_object().unwrap(), "CN", true, true);
        let get = |n: &str| {
            attrs
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(get("user.shadir.file").as_deref(), Some("a.tgz"));
        assert_eq!(get("user.shadir.os").as_deref(), Some(r#"["debian",12]"#));
        assert_eq!(get("user.shadir.ok").as_deref(), Some("true"));
        assert_eq!(get("user.shacachefs.cached").as_deref(), Some("1"));
        assert_eq!(get(PIN_XATTR).as_deref(), Some("1"));
        assert!(get(&format!("user.shadir.{long_name}")).is_none());
        assert!(get("user.shadir.big").is_none());
        assert!(listing(&attrs).len() <= SIZE_MAX);
    }

    #[test]
    fn other_namespaces_are_not_supported_and_missing_user_names_absent() {
        for n in ["security.selinux", "system.posix_acl_access", "trusted.x"] {
            let e = xattr_name(OsStr::new(n)).unwrap_err();
            assert_eq!(e.errno(), libc::EOPNOTSUPP, "{n}");
        }
        assert_eq!(xattr_name(OsStr::new("user.a")).unwrap(), "user.a");
    }

    #[test]
    fn listing_is_bounded() {
        let mut meta = Map::new();
        for i in 0..2000 {
            meta.insert(format!("field-{i:04}-{}", "x".repeat(40)), Value::from(i));
        }
        let attrs = entry_xattrs("ab", &meta, "CN", false, false);
        assert!(listing(&attrs).len() <= SIZE_MAX);
        assert!(attrs.len() < 2004);
        assert_eq!(attrs[0].0, "user.shacache.sha512");
    }

    #[test]
    fn only_the_pin_can_be_set() {
        assert!(settable_name(OsStr::new(PIN_XATTR)).is_ok());
        for other in [
            "user.shacache.sha512",
            "user.foo",
            "security.selinux",
            "system.posix_acl_access",
            "trusted.x",
        ] {
            let e = settable_name(OsStr::new(other)).unwrap_err();
            assert_eq!(e.errno(), libc::EOPNOTSUPP, "{other}");
        }
    }
}
