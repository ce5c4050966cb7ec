//! A file that is still being written, read by an upload as it grows.
//!
//! `cp` into the mount writes a staged file from its start to its end; the blob's POST
//! can then run beside the copy instead of after it, so that the server's receiving,
//! hashing and storing overlap the copy and the close waits only for the tail. The
//! writer ([`Growing::grow`], [`Growing::finish`], [`Growing::abandon`]) is the FUSE
//! session thread; the reader is the upload's body stream ([`Growing::stream`]), which
//! reads the bytes from the file (its own descriptor, the page cache) as they land.
//! Sent bytes leave the page cache once on disk ([`crate::behind`]).
//! An abandoned stream fails the body with an error, which makes the request fail:
//! the server then stores nothing (it names a blob only after a complete body).

use crate::behind::Behind;
use bytes::Bytes;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Size of each body chunk read from the file.
const CHUNK: u64 = 256 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Open,
    /// Complete at this length.
    Done(u64),
    Abandoned,
}

#[derive(Debug)]
struct State {
    /// Bytes written from the start, without a gap.
    len: u64,
    end: End,
}

/// The writer's and the reader's shared view of a file being written.
#[derive(Debug)]
pub struct Growing {
    state: Mutex<State>,
    /// The reader's descriptor on the file, given to [`Growing::stream`]. Abandoning
    /// closes it at once: the HTTP stack may keep the body stream itself for a while
    /// (until its connection notices), and a descriptor kept with it would keep a
    /// removed file's disk space.
    file: Mutex<Option<File>>,
    wake: tokio::sync::Notify,
    /// Bytes the reader has handed to the HTTP stack (progress, stall detection).
    sent: AtomicU64,
}

impl Default for Growing {
    fn default() -> Self {
        Growing {
            state: Mutex::new(State {
                len: 0,
                end: End::Open,
            }),
            file: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            sent: AtomicU64::new(0),
        }
    }
}

impl Growing {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file now holds `len` bytes from its start.
    pub fn grow(&self, len: u64) {
        let mut st = self.state();
        if st.end == End::Open && len > st.len {
            st.len = len;
            drop(st);
            self.wake.notify_one();
        }
    }

    /// The file is complete at `len` bytes; false if it cannot be (abandoned, or
    /// another length than what was written).
    pub fn finish(&self, len: u64) -> bool {
        let mut st = self.state();
        let ok = match st.end {
            End::Open => st.len == len,
            End::Done(n) => n == len,
            End::Abandoned => false,
        };
        st.end = if ok { End::Done(len) } else { End::Abandoned };
        drop(st);
        self.wake.notify_one();
        ok
    }

    /// The file will not be sent this way (written out of order, truncated, removed).
    pub fn abandon(&self) {
        self.state().end = End::Abandoned;
        self.file.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.wake.notify_one();
    }

    pub fn is_abandoned(&self) -> bool {
        self.state().end == End::Abandoned
    }

    /// Bytes handed to the HTTP stack so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The body: the file's bytes in order, waiting for the writer as needed; ends at
    /// [`Growing::finish`]'s length, fails at [`Growing::abandon`].
    pub fn stream(
        self: Arc<Self>,
        file: File,
    ) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
        {
            // Under the state lock: an abandon that came first keeps no descriptor.
            let st = self.state();
            if st.end != End::Abandoned {
                *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
            }
        }
        // What was sent leaves the page cache once on disk (the early upload is the last
        // reader; a resend at close reads it back from the disk).
        let behind = Behind::new();
        futures_util::stream::unfold((self, 0u64, behind), |(g, pos, mut behind)| async move {
            loop {
                let (len, end) = {
                    let st = g.state();
                    (st.len, st.end)
                };
                let abandoned = || io::Error::other("the file stopped being written in order");
                match end {
                    End::Abandoned => return Some((Err(abandoned()), (g, pos, behind))),
                    End::Done(n) if pos >= n => {
                        g.file.lock().unwrap_or_else(|p| p.into_inner()).take();
                        return None;
                    }
                    _ => {}
                }
                if pos < len {
                    let want = (len - pos).min(CHUNK) as usize;
                    let mut buf = vec![0u8; want];
                    let read = match &*g.file.lock().unwrap_or_else(|p| p.into_inner()) {
                        Some(file) => file.read_exact_at(&mut buf, pos).inspect(|()| {
                            behind.advance_async(file, pos + want as u64);
                        }),
                        None => Err(abandoned()),
                    };
                    let item = read.map(|()| {
                        g.sent.fetch_add(want as u64, Ordering::Relaxed);
                        Bytes::from(buf)
                    });
                    return Some((item, (g, pos + want as u64, behind)));
                }
                // Nothing new yet: a permit stored by a notify that came before this
                // wait is taken at once, so no write is missed.
                g.wake.notified().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;

    fn collect(g: Arc<Growing>, file: File) -> tokio::task::JoinHandle<Result<Vec<u8>, io::Error>> {
        tokio::spawn(async move {
            let mut out = Vec::new();
            let mut s = std::pin::pin!(g.stream(file));
            while let Some(chunk) = s.next().await {
                out.extend_from_slice(&chunk?);
            }
            Ok(out)
        })
    }

    #[tokio::test]
    async fn reads_what_is_written_as_it_grows_and_ends_at_finish() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let g = Arc::new(Growing::default());
        let reader = collect(g.clone(), f.reopen().unwrap());
        let mut all = Vec::new();
        for i in 0..40u32 {
            // Chunks of uneven sizes, some larger than a body chunk.
            let chunk = vec![i as u8; 1000 + (i as usize * 37_000)];
            f.write_all(&chunk).unwrap();
            all.extend_from_slice(&chunk);
            g.grow(all.len() as u64);
            if i % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert!(g.finish(all.len() as u64));
        let got = tokio::time::timeout(std::time::Duration::from_secs(20), reader)
            .await
            .expect("the stream ends after finish")
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), all.len());
        assert!(got == all, "bytes differ");
        assert_eq!(g.sent(), all.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_was_sent_leaves_the_page_cache_and_the_file_keeps_it() {
        let mut f = crate::behind::tests::disk_tempfile();
        let g = Arc::new(Growing::default());
        let reader = collect(g.clone(), f.reopen().unwrap());
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let n = 64u64;
        for i in 1..=n {
            f.write_all(&chunk).unwrap();
            g.grow(i << 20);
            tokio::task::yield_now().await;
        }
        assert!(g.finish(n << 20));
        let got = tokio::time::timeout(std::time::Duration::from_secs(20), reader)
            .await
            .expect("the stream ends after finish")
            .unwrap()
            .unwrap();
        assert!(got.len() as u64 == n << 20 && got.chunks(1 << 20).all(|c| c == chunk));
        let resident = crate::behind::tests::resident_after_drops(f.as_file(), n << 20).await;
        assert!(resident < n << 20, "nothing sent was dropped");
        let back = std::fs::read(f.path()).unwrap();
        assert!(back == got, "the file changed");
    }

    #[tokio::test]
    async fn abandoning_fails_the_body() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let g = Arc::new(Growing::default());
        let reader = collect(g.clone(), f.reopen().unwrap());
        f.write_all(b"hello").unwrap();
        g.grow(5);
        tokio::task::yield_now().await;
        g.abandon();
        let got = tokio::time::timeout(std::time::Duration::from_secs(20), reader)
            .await
            .expect("the stream ends after abandon")
            .unwrap();
        assert!(got.is_err());
        assert!(g.is_abandoned());
    }

    #[tokio::test]
    async fn abandoning_closes_the_descriptor_at_once() {
        let f = tempfile::NamedTempFile::new().unwrap();
        let g = Arc::new(Growing::default());
        // A stream that nobody polls (as when the HTTP stack waits on its socket).
        let s = g.clone().stream(f.reopen().unwrap());
        assert!(g.file.lock().unwrap().is_some());
        g.abandon();
        assert!(
            g.file.lock().unwrap().is_none(),
            "the descriptor outlived abandon"
        );
        drop(s);
    }

    #[test]
    fn finish_at_another_length_abandons() {
        let g = Growing::default();
        g.grow(10);
        assert!(!g.finish(12), "2 bytes were never announced");
        assert!(g.is_abandoned());
        let g = Growing::default();
        g.grow(10);
        assert!(g.finish(10));
        assert!(g.finish(10), "finishing twice at the same length is fine");
        g.grow(20);
        assert!(!g.finish(20), "growth after the end does not count");
    }
}
