//! The filesystem core's error type and the one table that turns every error into an
//! errno. The matches are exhaustive on purpose: a new error variant anywhere below does
//! not compile until someone decides what the user sees.

use crate::cache::CacheError;
use crate::publish::PublishError;
use crate::remote::RemoteError;
use std::sync::Arc;

/// What a filesystem operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("operation not permitted: {0}")]
    NotPermitted(&'static str),
    #[error("bad file handle")]
    BadHandle,
    #[error("no such attribute")]
    NoAttr,
    #[error("buffer too small")]
    Range,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// An attribute this node cannot be given (`cp -a`, `rsync -X` go on without it),
    /// or a namespace the tree never has (`security.*`, `system.*`, `trusted.*`), which
    /// `ls -l` remembers per filesystem where "no such attribute" would make it ask
    /// again for every file.
    #[error("operation not supported")]
    Unsupported,
    #[error("busy: {0}")]
    Busy(&'static str),
    /// A name the tree cannot hold (not UTF-8).
    #[error("not a usable name")]
    BadName,
    /// Opened for writing while open for reading with FUSE passthrough.
    #[error("open for reading (passthrough)")]
    OpenForReading,
    /// The inode is done with (its blob was replaced while open): look the name up.
    #[error("stale inode")]
    Stale,
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// A write into a staged file failed: every close reports it, with its errno,
    /// until the file is emptied.
    #[error("the staged file is incomplete: {0}")]
    Incomplete(Arc<FsError>),
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl FsError {
    /// The errno the kernel hands to the application.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::BadHandle => libc::EBADF,
            FsError::NoAttr => libc::ENODATA,
            FsError::Range => libc::ERANGE,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Unsupported => libc::EOPNOTSUPP,
            FsError::Busy(_) => libc::EBUSY,
            FsError::BadName => libc::EINVAL,
            FsError::OpenForReading => libc::ETXTBSY,
            FsError::Stale => libc::ESTALE,
            FsError::Publish(e) => publish_errno(e),
            FsError::Incomplete(cause) => cause.errno(),
            FsError::Remote(e) => remote_errno(e),
            FsError::Cache(e) => cache_errno(e),
            FsError::Io(e) => io_errno(e),
        }
    }
}

fn remote_errno(e: &RemoteError) -> i32 {
    match e {
        // A blob an entry points to that shacache does not have: the file exists (the
        // entry does) but cannot be read.
        RemoteError::NotFound { .. } => libc::EIO,
        RemoteError::Refused { .. } => libc::EACCES,
        RemoteError::NotConfigured(_)
        | RemoteError::Status { .. }
        | RemoteError::Network { .. }
        | RemoteError::Timeout { .. }
        | RemoteError::Corrupt { .. }
        | RemoteError::Protocol { .. }
        | RemoteError::TooLarge { .. }
        | RemoteError::Tls(_) => libc::EIO,
        RemoteError::Io(io) => io_errno(io),
    }
}

fn publish_errno(e: &PublishError) -> i32 {
    match e {
        PublishError::Remote(r) => remote_errno(r),
        PublishError::Io(io) => io_errno(io),
        PublishError::Busy => libc::EBUSY,
        // The item left the outbox (`outbox drop` from another process) or its data
        // is not the file: the close cannot have stored it.
        PublishError::Gone(_) | PublishError::Incomplete(_) => libc::EIO,
    }
}

fn cache_errno(e: &CacheError) -> i32 {
    match e {
        CacheError::NoSpace { .. } => libc::ENOSPC,
        CacheError::Io { source, .. } => io_errno(source),
        CacheError::Version { .. } => libc::EIO,
    }
}

fn io_errno(e: &std::io::Error) -> i32 {
    // Errors wrapped by other crates (tempfile) keep their kind but not the raw code.
    match (e.raw_os_error(), e.kind()) {
        (Some(libc::ENOSPC) | Some(libc::EDQUOT), _) => libc::ENOSPC,
        // Out of descriptors: the application sees it as such, and the log says so.
        (Some(code @ (libc::EMFILE | libc::ENFILE)), _) => {
            warn_descriptors(e);
            code
        }
        (_, std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded) => libc::ENOSPC,
        _ => libc::EIO,
    }
}

/// A warning that the daemon ran out of file descriptors, at most once per 10 s.
fn warn_descriptors(e: &std::io::Error) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 10
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            "out of file descriptors ({e}): opens fail until files are closed; raise the \
             daemon's RLIMIT_NOFILE (LimitNOFILE= in its systemd unit)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos() {
        assert_eq!(FsError::NotFound.errno(), libc::ENOENT);
        assert_eq!(
            FsError::Cache(CacheError::NoSpace { needed: 1 }).errno(),
            libc::ENOSPC
        );
        let refused = RemoteError::Refused {
            url: "u".into(),
            status: 302,
            detail: String::new(),
        };
        assert_eq!(FsError::Remote(refused).errno(), libc::EACCES);
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(FsError::Io(full).errno(), libc::ENOSPC);
        for code in [libc::EMFILE, libc::ENFILE] {
            let out = std::io::Error::from_raw_os_error(code);
            assert_eq!(FsError::Io(out).errno(), code);
            let out = CacheError::Io {
                path: "p".into(),
                source: std::io::Error::from_raw_os_error(code),
            };
            assert_eq!(FsError::Cache(out).errno(), code);
        }
        assert_eq!(
            FsError::Publish(PublishError::Busy).errno(),
            libc::EBUSY,
            "a publish's own errors keep their meaning"
        );
        let refused = RemoteError::Refused {
            url: "u".into(),
            status: 403,
            detail: String::new(),
        };
        assert_eq!(
            FsError::Publish(PublishError::Remote(refused)).errno(),
            libc::EACCES
        );
        let full = FsError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(FsError::Incomplete(Arc::new(full)).errno(), libc::ENOSPC);
        assert_eq!(FsError::OpenForReading.errno(), libc::ETXTBSY);
        assert_eq!(FsError::Stale.errno(), libc::ESTALE);
        let timeout = RemoteError::Timeout {
            url: "u".into(),
            message: "m".into(),
        };
        assert_eq!(FsError::Remote(timeout).errno(), libc::EIO);
    }
}
