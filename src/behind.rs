//! Write-behind and drop-behind for a large file written once, in order, and not read
//! again soon: a blob the server stores, a staged file whose bytes its upload has sent.
//!
//! Left alone, such a file grows the page cache by its whole size, and every page it
//! takes is one the kernel must find free. On the virtual machines this runs on that is
//! the dominant cost: the host takes back guest memory freed a few seconds ago (free
//! page reporting), and a page touched for the first time since costs about 10 µs.
//! Measured (BENCHMARKS.md, sixth pass): writing 512 MiB into new page-cache pages took
//! 1.3-1.6 s of system time where the same write into pages freed a moment before took
//! 0.1 s, and a 512 MiB write with this module's drop-behind, fsync included, 0.23 s.
//!
//! [`Behind`] starts the disk's writeback of each [`STEP`] as soon as it is complete and,
//! [`LAG`] behind, waits until that range is on disk and drops it from the page cache
//! (`POSIX_FADV_DONTNEED`): the pages it frees are the ones the next writes take. Only
//! clean pages are dropped, so nothing written is lost; a range whose writeback failed
//! is kept, and dropping stops for the file.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes between two writeback starts.
pub const STEP: u64 = 8 << 20;
/// How far behind the written end the dropped range stays: the writeback of what lies
/// between has had time to finish, and a reader close behind the writer still finds
/// its pages.
pub const LAG: u64 = 32 << 20;

/// The write-behind state of one file; see the module's documentation.
#[derive(Debug, Default)]
pub struct Behind {
    /// Writeback started for `[0, pushed)`.
    pushed: u64,
    /// Dropped (or being dropped) `[0, dropped)`.
    dropped: u64,
    /// A drop runs on the blocking pool ([`Behind::advance_async`]).
    busy: Arc<AtomicBool>,
    /// A writeback failed: nothing more is dropped.
    failed: Arc<AtomicBool>,
}

impl Behind {
    pub fn new() -> Self {
        Self::default()
    }

    /// `[0, done)` of `file` is written and will not be needed in memory soon. Waits, on
    /// the caller's thread, for the disk to take a range [`LAG`] behind: for a thread
    /// that may block (the server's upload writer).
    pub fn advance(&mut self, file: &File, done: u64) {
        if let Some((from, to)) = self.next(file, done) {
            drop_range(file, from, to, &self.failed);
        }
    }

    /// Same as [`Behind::advance`], but the wait and the drop run on tokio's blocking
    /// pool, one at a time: a step that comes while one runs is left to the next
    /// (the caller is an async task that must not wait for the disk). Without a
    /// runtime, done on this thread.
    pub fn advance_async(&mut self, file: &File, done: u64) {
        if self.busy.load(Ordering::Acquire) {
            return;
        }
        let Some((from, to)) = self.next(file, done) else {
            return;
        };
        let (Ok(handle), Ok(dup)) = (tokio::runtime::Handle::try_current(), file.try_clone())
        else {
            return drop_range(file, from, to, &self.failed);
        };
        self.busy.store(true, Ordering::Release);
        let (busy, failed) = (self.busy.clone(), self.failed.clone());
        handle.spawn_blocking(move || {
            drop_range(&dup, from, to, &failed);
            busy.store(false, Ordering::Release);
        });
    }

    /// Starts the writeback of what is complete since the last step, and returns the
    /// range to drop, if one is due.
    fn next(&mut self, file: &File, done: u64) -> Option<(u64, u64)> {
        if done < self.pushed.saturating_add(STEP) {
            return None;
        }
        start_writeback(file, self.pushed, done - self.pushed);
        self.pushed = done;
        let to = self.pushed.saturating_sub(LAG);
        if self.failed.load(Ordering::Acquire) || to < self.dropped.saturating_add(STEP) {
            return None;
        }
        let from = std::mem::replace(&mut self.dropped, to);
        Some((from, to))
    }
}

/// Asks the kernel to start writing a range of `file` to disk, without waiting for it
/// (best effort: a filesystem without it just writes back later).
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: a valid descriptor owned by `file`; the call reads no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Waits until `[from, to)` is on disk, then drops its pages from the page cache. A
/// failed writeback keeps them (and marks `failed`): only clean pages may go.
fn drop_range(file: &File, from: u64, to: u64, failed: &AtomicBool) {
    let fd = file.as_raw_fd();
    let (off, len) = (from as libc::off64_t, (to - from) as libc::off64_t);
    let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid descriptor owned by `file`; neither call reads memory of ours.
    unsafe {
        if libc::sync_file_range(fd, off, len, all) != 0 {
            failed.store(true, Ordering::Release);
            return;
        }
        libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_DONTNEED);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Pages of `file` in the page cache, by `mincore` on a mapping of it.
    pub(crate) fn resident_pages(file: &File, len: u64) -> usize {
        let page = 4096u64;
        let pages = len.div_ceil(page) as usize;
        // SAFETY: a read-only shared mapping of a file we hold open, unmapped below;
        // mincore writes `pages` bytes into a vector of that length.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            let mut vec = vec![0u8; pages];
            assert_eq!(libc::mincore(map, len as usize, vec.as_mut_ptr()), 0);
            libc::munmap(map, len as usize);
            vec.iter().filter(|b| **b & 1 == 1).count()
        }
    }

    /// A temporary file beside the test binary: on a disk file system (a tmpfs `/tmp`
    /// would keep every page).
    pub(crate) fn disk_tempfile() -> tempfile::NamedTempFile {
        let exe = std::env::current_exe().unwrap();
        tempfile::NamedTempFile::new_in(exe.parent().unwrap()).unwrap()
    }

    /// Bytes of the first `len` of `file` still in the page cache, after waiting (at
    /// most 2 s) for a drop that may still run on the blocking pool to leave fewer
    /// than `len`.
    pub(crate) async fn resident_after_drops(file: &File, len: u64) -> u64 {
        let resident = || resident_pages(file, len) as u64 * 4096;
        for _ in 0..200 {
            if resident() < len {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        resident()
    }

    fn write_with(advance: impl Fn(&mut Behind, &File, u64)) -> (tempfile::NamedTempFile, u64) {
        let mut tmp = disk_tempfile();
        let mut behind = Behind::new();
        let chunk = vec![7u8; 1 << 20];
        let mut done = 0u64;
        for _ in 0..64 {
            tmp.write_all(&chunk).unwrap();
            done += chunk.len() as u64;
            advance(&mut behind, tmp.as_file(), done);
        }
        (tmp, done)
    }

    #[test]
    fn steps_are_pushed_and_what_lags_is_dropped() {
        let mut b = Behind::new();
        let f = tempfile::tempfile().unwrap();
        assert_eq!(b.next(&f, STEP - 1), None, "less than a step: nothing");
        assert_eq!(b.pushed, 0);
        assert_eq!(b.next(&f, STEP), None, "a step pushed, nothing lags yet");
        assert_eq!(b.pushed, STEP);
        assert_eq!(b.next(&f, LAG + STEP), Some((0, STEP)));
        assert_eq!(
            b.next(&f, LAG + STEP + 1),
            None,
            "within a step of the last push"
        );
        assert_eq!(b.next(&f, LAG + 3 * STEP), Some((STEP, 3 * STEP)));
        b.failed.store(true, Ordering::Release);
        assert_eq!(
            b.next(&f, LAG + 5 * STEP),
            None,
            "a failed writeback stops drops"
        );
        assert_eq!(b.pushed, LAG + 5 * STEP, "but not pushes");
    }

    #[test]
    fn a_written_file_keeps_its_bytes_and_only_its_last_lag_in_memory() {
        let (tmp, len) = write_with(|b, f, done| b.advance(f, done));
        let resident = resident_pages(tmp.as_file(), len) as u64 * 4096;
        assert!(
            resident <= LAG + STEP,
            "{resident} bytes of {len} still in the page cache"
        );
        let back = std::fs::read(tmp.path()).unwrap();
        assert_eq!(back.len() as u64, len);
        assert!(back.iter().all(|b| *b == 7), "bytes changed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_async_drop_runs_on_the_blocking_pool_and_keeps_the_bytes() {
        let (tmp, len) = write_with(|b, f, done| b.advance_async(f, done));
        let resident = resident_after_drops(tmp.as_file(), len).await;
        assert!(
            resident < len,
            "nothing was dropped ({resident} of {len} bytes)"
        );
        let back = std::fs::read(tmp.path()).unwrap();
        assert!(back.len() as u64 == len && back.iter().all(|b| *b == 7));
    }
}
