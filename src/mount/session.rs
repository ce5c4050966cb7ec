//! Mounting (options, errors that say what to do) and the thread that sends the
//! core's notices to the kernel.

use super::FuseFs;
use crate::fs::{Invalidator, Notice};
use fuser::MountOption;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub read_only: bool,
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
