//! Durable placement in the store: blobs renamed into place, directories created and
//! synced, and the temporary files a killed server left removed at start.

use super::names::{blob_path, DIR_DIR};
use crate::digest::HashedFile;
use std::fs::{self, File};
use std::io;
use std::path::{Component, Path};

/// Publishes a received blob, whose content was hashed to its name on the way in.
/// Returns whether no blob of that name was there. An existing file is always replaced
/// (an atomic rename): it may have been damaged, and the new copy is known to be right.
pub(crate) fn store_blob(root: &Path, hashed: HashedFile) -> io::Result<bool> {
    let dest = blob_path(root, &hashed.sha());
    let existed = fs::symlink_metadata(&dest).is_ok();
    let dir = dest.parent().unwrap_or(root);
    ensure_dir(root, dir)?;
    hashed.persist(&dest)?;
    sync_dir(dir)?;
    Ok(!existed)
}

/// Prefix of every temporary file the server creates.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// Removes the temporary files a killed server left: `ROOT/.tmp-*` (uploads) and
/// `.tmp-*` anywhere under `ROOT/shadir` (list rewrites). Returns how many.
pub(crate) fn remove_temporaries(root: &Path) -> io::Result<usize> {
    let mut removed = remove_tmp_in(root, false)?;
    removed += remove_tmp_in(&root.join(DIR_DIR), true)?;
    Ok(removed)
}

fn remove_tmp_in(dir: &Path, recurse: bool) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.as_encoded_bytes();
        let kind = entry.file_type()?;
        if name.starts_with(TMP_PREFIX.as_bytes()) && kind.is_file() {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        } else if recurse && kind.is_dir() && name.starts_with(b"d-") {
            removed += remove_tmp_in(&entry.path(), true)?;
        }
    }
    Ok(removed)
}

/// Creates the missing directories from `base` (which exists) down to `dir`, fsyncing
/// each parent that gained an entry.
pub(super) fn ensure_dir(base: &Path, dir: &Path) -> io::Result<()> {
    let rel = dir
        .strip_prefix(base)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "directory outside the store"))?;
    let mut cur = base.to_path_buf();
    for comp in rel.components() {
        let Component::Normal(name) = comp else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "unexpected path component in the store",
            ));
        };
        let parent = cur.clone();
        cur.push(name);
        match fs::create_dir(&cur) {
            Ok(()) => sync_dir(&parent)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes a directory's entries durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::super::names::CACHE_DIR;
    use super::*;

    #[test]
    fn temporaries_are_found_where_the_server_makes_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join(DIR_DIR).join("d-x")).unwrap();
        fs::create_dir_all(root.join(CACHE_DIR).join("ab")).unwrap();
        fs::write(root.join(".tmp-a"), b"").unwrap();
        fs::write(root.join(DIR_DIR).join(".tmp-b"), b"").unwrap();
        fs::write(root.join(DIR_DIR).join("d-x").join(".tmp-c"), b"").unwrap();
        fs::write(root.join(DIR_DIR).join("k-.tmp-keep"), b"[]").unwrap();
        assert_eq!(remove_temporaries(root).unwrap(), 3);
        assert!(root.join(DIR_DIR).join("k-.tmp-keep").exists());
        assert_eq!(remove_temporaries(root).unwrap(), 0);
    }
}
