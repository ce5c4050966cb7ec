//! The network edge the filesystem core and the publisher talk to: the operations
//! they need from shacache and shadir, and nothing about HTTP. [`crate::remote::Remote`]
//! implements it for real servers; [`memory::MemoryStore`] (tests and the
//! `test-support` feature) keeps everything in memory and injects faults, so that the
//! core's rules are tested without sockets, FUSE or real time.
//!
//! Futures are boxed so that the core can hold an `Arc<dyn Store>`; each call does
//! network I/O, next to which one allocation is nothing.

#[cfg(any(test, feature = "test-support"))]
pub mod memory;

use crate::digest::{Sha512, VerifiedFile};
use crate::growing::Growing;
use crate::remote::{DirListing, Limits, Probe, Progress, Remote, RemoteError, Room};
use crate::wire::RawEntry;
use std::fs::File;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

/// What a [`Store`] call returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, RemoteError>> + Send + 'a>>;

/// shacache and shadir as the core sees them. Semantics are those of
/// [`crate::remote`]: only "absent" answers are `Missing`/`Absent`; every failure is a
/// [`RemoteError`] saying what happened (the core decides what is worth a retry).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Both download services are configured.
    fn can_download(&self) -> bool;
    /// Both upload services are configured.
    fn can_upload(&self) -> bool;
    /// Timeouts and bounds of transfers (the core waits for uploads with them).
    fn limits(&self) -> &Limits;
    /// A key's signed entries (`Missing` when shadir never heard of it).
    fn get_dir<'a>(&'a self, key: &'a str) -> StoreFuture<'a, DirListing>;
    /// Adds a signed entry to a key.
    fn put_dir<'a>(&'a self, key: &'a str, entry: &'a RawEntry) -> StoreFuture<'a, ()>;
    /// A blob's existence and size; a whole blob sent instead is kept (its bytes
    /// allowed by `room` as they arrive).
    fn probe_blob<'a>(
        &'a self,
        sha: &'a Sha512,
        tmp_dir: &'a Path,
        room: Room<'a>,
    ) -> StoreFuture<'a, Probe>;
    /// A blob, verified, in a temporary file of `tmp_dir` (bytes allowed by `room`).
    fn fetch_blob<'a>(
        &'a self,
        sha: &'a Sha512,
        tmp_dir: &'a Path,
        progress: Progress<'a>,
        room: Room<'a>,
    ) -> StoreFuture<'a, VerifiedFile>;
    /// Stores the file at `path`, whose hash is `sha`.
    fn post_blob<'a>(
        &'a self,
        path: &'a Path,
        sha: &'a Sha512,
        progress: Progress<'a>,
    ) -> StoreFuture<'a, ()>;
    /// Stores a file still being written, sent as it grows; the hash the server
    /// computed.
    fn post_growing(&self, growing: Arc<Growing>, file: File) -> StoreFuture<'_, Sha512>;
}

impl Store for Remote {
    fn can_download(&self) -> bool {
        Remote::can_download(self)
    }
    fn can_upload(&self) -> bool {
        Remote::can_upload(self)
    }
    fn limits(&self) -> &Limits {
        Remote::limits(self)
    }
    fn get_dir<'a>(&'a self, key: &'a str) -> StoreFuture<'a, DirListing> {
        Box::pin(Remote::get_dir(self, key))
    }
    fn put_dir<'a>(&'a self, key: &'a str, entry: &'a RawEntry) -> StoreFuture<'a, ()> {
        Box::pin(Remote::put_dir(self, key, entry))
    }
    fn probe_blob<'a>(
        &'a self,
        sha: &'a Sha512,
        tmp_dir: &'a Path,
        room: Room<'a>,
    ) -> StoreFuture<'a, Probe> {
        Box::pin(Remote::probe_blob_bounded(self, sha, tmp_dir, room))
    }
    fn fetch_blob<'a>(
        &'a self,
        sha: &'a Sha512,
        tmp_dir: &'a Path,
        progress: Progress<'a>,
        room: Room<'a>,
    ) -> StoreFuture<'a, VerifiedFile> {
        Box::pin(Remote::fetch_blob_bounded(
            self, sha, tmp_dir, progress, room,
        ))
    }
    fn post_blob<'a>(
        &'a self,
        path: &'a Path,
        sha: &'a Sha512,
        progress: Progress<'a>,
    ) -> StoreFuture<'a, ()> {
        Box::pin(Remote::post_blob(self, path, sha, progress))
    }
    fn post_growing(&self, growing: Arc<Growing>, file: File) -> StoreFuture<'_, Sha512> {
        Box::pin(Remote::post_growing(self, growing, file))
    }
}
