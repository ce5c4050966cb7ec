//! Which process sent a request: only the opener's flush publishes (see `fs::write`).

use fuser::Request;

/// The thread group (process) of the thread that sent a request. The kernel gives the
/// calling thread's id (0 from outside the daemon's pid namespace); `/proc` tells its
/// process, while that thread is alive (it is, inside its system call). `None` when it
/// cannot be known: the caller then does what it would do without that knowledge.
fn tgid_of(pid: u32) -> Option<u32> {
    if pid == 0 {
        return None;
    }
    // `Tgid:` is the fourth line (after `Name:`, whose value is at most 64 bytes,
    // `Umask:` and `State:`): one read of the start, not the whole file (a read of
    // /proc grows its buffer from 32 bytes, eight system calls for this file).
    use std::io::Read;
    let mut buf = [0u8; 512];
    let mut f = std::fs::File::open(format!("/proc/{pid}/status")).ok()?;
    let n = f.read(&mut buf).ok()?;
    let status = String::from_utf8_lossy(&buf[..n]);
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// [`tgid_of`] for a request, logged once per mount when it cannot be known.
pub(super) fn caller_process(req: &Request<'_>) -> Option<u32> {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    let tgid = tgid_of(req.pid());
    if tgid.is_none() {
        LOGGED.call_once(|| {
            tracing::warn!(
                "the process behind request pid {} is unknown (another pid namespace?): files are published at every close after a write, children's included",
                req.pid()
            );
        });
    }
    tgid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threads_process_is_its_thread_group() {
        let me = std::process::id();
        assert_eq!(tgid_of(me), Some(me));
        assert_eq!(tgid_of(0), None, "another pid namespace");
        let tid = std::thread::spawn(|| unsafe { libc::gettid() } as u32)
            .join()
            .unwrap();
        // The thread has ended: its process can no longer be known from it.
        assert_eq!(tgid_of(tid), None);
        let tid = unsafe { libc::gettid() } as u32;
        assert_eq!(tgid_of(tid), Some(me));
    }
}
