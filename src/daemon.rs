//! Detaching a mount from the terminal while keeping start-up errors visible: the
//! command forks before any thread exists; the parent waits on a pipe until the child
//! says "ready" (exit 0) or sends its error (printed, exit 1). The child then points its
//! standard streams at the log file or /dev/null.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The child's end of the start-up pipe.
pub struct Notifier {
    pipe: File,
}

impl Notifier {
    /// Start-up succeeded: the parent exits 0 printing `message`.
    pub fn ready(mut self, message: &str) {
        let _ = write!(self.pipe, "R{message}");
    }
    /// Start-up failed: the parent prints `message` and exits 1.
    pub fn fail(mut self, message: &str) {
        let _ = write!(self.pipe, "E{message}");
    }
}

/// Forks. Returns in the child (with the notifier); the parent never returns.
/// Must be called before any thread is started.
pub fn detach() -> std::io::Result<Notifier> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: single-threaded at this point (the caller's contract); the child only
    // continues with ordinary Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: plain syscall in the child.
            unsafe { libc::setsid() };
            Ok(Notifier {
                pipe: File::from(write_end),
            })
        }
        _child => {
            drop(write_end);
            let mut msg = String::new();
            let _ = File::from(read_end).read_to_string(&mut msg);
            match msg.chars().next() {
                Some('R') => {
                    if msg.len() > 1 {
                        eprintln!("{}", &msg[1..]);
                    }
                    std::process::exit(0)
                }
                Some('E') => {
                    eprintln!("shacachefs: {}", &msg[1..]);
                    std::process::exit(1)
                }
                _ => {
                    eprintln!("shacachefs: the mount process ended during start-up");
                    std::process::exit(1)
                }
            }
        }
    }
}

/// Points stdin at /dev/null and stdout/stderr at `log` (or /dev/null).
pub fn redirect_std(log: Option<&Path>) -> std::io::Result<()> {
    let null = File::options().read(true).write(true).open("/dev/null")?;
    let out = match log {
        Some(p) => File::options().create(true).append(true).open(p)?,
        None => null.try_clone()?,
    };
    // SAFETY: dup2 onto the standard descriptors with descriptors we own.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(out.as_raw_fd(), 1);
        libc::dup2(out.as_raw_fd(), 2);
    }
    Ok(())
}

/// Tells systemd (`Type=notify`) about the service's state when `NOTIFY_SOCKET` is set:
/// `READY=1` once mounted, `STOPPING=1` when unmounting. Silent otherwise.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = result {
        tracing::debug!("sd_notify {state}: {e}");
    }
}
